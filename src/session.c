/* WebSocket sessions (include/luahub/session.h): receive, dispatch,
 * pending replies, the protocol error budget, and the policy's host
 * interface. */
#include "luahub/session.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/config.h"
#include "luahub/log.h"
#include "luahub/metrics.h"
#include "luahub/proto.h"
#include "luahub/registry.h"

#define PROTO_ERROR_WINDOW_MS 10000
/* Rate-limited answers a connection may get in RATE_WINDOW_MS before it is
 * closed with 4029: a client that ignores retry_in_ms. */
#define RATE_LIMITED_MAX 100
#define RATE_WINDOW_MS 10000
/* Commands that may wait behind a hook of their connection that waits
 * (hub.redis & co); past it they are answered limit_exceeded in their turn
 * and count as protocol errors. */
#define QUEUED_MAX 64

/* A command that came while a hook of its connection waited: run in order
 * once it is done (docs/internals.md, "How a hook waits"). */
struct squeued {
    struct squeued *next;
    uint32_t len;
    uint8_t binary;
    uint8_t refused;                /* over QUEUED_MAX: frame[] is its raw id only */
    char frame[];
};

/* A message being reassembled from fragments (the rare path). */
struct hub_rxbuf {
    uint32_t len, cap;
    unsigned char p[];
};

/* What presence shows of a client, and the pc.user and pc.info it was built
 * from (built again when the policy changes them). */
struct hub_pentry {
    const char *user, *info;
    size_t len;
    char text[];                    /* "client":..,"user":..,"info":.. */
};

/* While a hook of the connection waits, and until the commands that came
 * meanwhile have run. */
struct swait {
    int kind;                       /* the op whose hook waits (HUB_OP_*), HUB_OP_NONE: none */
    char *frame;                    /* that command (a copy) */
    size_t len;
    struct pending *op;             /* publish: its reply */
    struct squeued *head, *tail;    /* commands that came meanwhile */
    unsigned n;
    size_t bytes;
};

static struct hub_session *of_client(struct hub_client *c)
{
    return hub_container_of(c, struct hub_session, client);
}

static struct hub_session *of_pc(const struct hub_policy_conn *c)
{
    return hub_container_of(c, struct hub_session, pc);
}

static struct hub_policy *policy(const struct hub_session *s)
{
    return *s->ss->policy;
}

static int has_hook(const struct hub_session *s, enum hub_hook h)
{
    return hub_policy_has(policy(s), h);
}

/* ---- frames out --------------------------------------------------------- */

static void close_with(struct hub_session *s, uint16_t code, const char *reason, int drop)
{
    if (hub_writer_closing(&s->wc))
        return;
    s->close_code = code;
    free(s->close_reason);
    s->close_reason = hub_xstrdup(reason);
    hub_writer_close(&s->wc, code, s->close_reason, drop);
}

/* Queues the reply encoded in ss->scratch and resets it. A client whose
 * queue cannot take it is culled (with the slow consumers). */
static void send_scratch(struct hub_session *s)
{
    struct hub_sessions *ss = s->ss;
    struct hub_msg *m = hub_msg_text(ss->scratch.p, ss->scratch.len);
    if (hub_writer_reply(&s->wc, m) < 0)
        hub_cull(ss->hub, &s->client);
    hub_msg_unref(m);
    hub_buf_reset(&ss->scratch);
}

static int on_deliver(struct hub_client *c, struct hub_msg *m)
{
    return hub_writer_send(&of_client(c)->wc, m);
}

static void on_culled(struct hub_client *c)
{
    struct hub_session *s = of_client(c);
    s->ss->slow_consumer_closes++;
    hub_log(HUB_LOG_WARN,
            "[conn %llu] slow consumer: queue over max_queue_bytes (%llu), closing with 4001",
            (unsigned long long)c->id, (unsigned long long)s->ss->cfg->max_queue_bytes);
    close_with(s, 4001, "slow consumer", 1);
}

/* What presence shows of this client: its name, user and info, built
 * again when the policy has changed conn.user or conn.info since. */
static void client_presence(struct hub_client *c, const char **user, size_t *user_len,
                            const char **entry, size_t *entry_len)
{
    struct hub_session *s = of_client(c);
    struct hub_pentry *pe = s->entry;
    if (!pe || pe->user != s->pc.user || pe->info != s->pc.info_json) {
        struct hub_buf e = {0};
        char client[64];
        hub_client_name(s->ss->hub, c->id, client, sizeof(client));
        hub_buf_appends(&e, "\"client\":");
        hub_buf_append_json_string(&e, client, strlen(client));
        if (s->pc.user) {
            hub_buf_appends(&e, ",\"user\":");
            hub_buf_append_json_string(&e, s->pc.user, strlen(s->pc.user));
        }
        if (s->pc.info_json) {
            hub_buf_appends(&e, ",\"info\":");
            hub_buf_appends(&e, s->pc.info_json);
        }
        free(pe);
        pe = s->entry = hub_xmalloc(sizeof(*pe) + e.len + 1);
        memcpy(pe->text, e.p, e.len + 1);
        pe->len = e.len;
        pe->user = s->pc.user;
        pe->info = s->pc.info_json;
        hub_buf_free(&e);
    }
    *user = s->pc.user;
    *user_len = s->pc.user ? strlen(s->pc.user) : 0;
    *entry = pe->text;
    *entry_len = pe->len;
}

static const struct hub_client_ops client_ops = {
    .deliver = on_deliver,
    .culled = on_culled,
    .presence = client_presence,
};

/* ---- errors ------------------------------------------------------------- */

/* Answers a command with an error. Garbage (malformed or unknown commands)
 * counts against max_protocol_errors per window; past it the connection is
 * closed with 4008. */
/* A command over command_rate or publish_rate (`kind` 0 or 1): answered
 * rate_limited with when to retry; a client that keeps coming is closed. */
static void rate_limited(struct hub_session *s, struct hub_span id, int kind, uint64_t wait)
{
    struct hub_sessions *ss = s->ss;
    char msg[160];
    uint64_t now = hub_now_ms();

    ss->rate_limited[kind]++;
    ss->protocol_errors[HUB_PERR_RATE_LIMITED]++;
    snprintf(msg, sizeof(msg), "over %s (%u per second, bursts of %u): retry in %llu ms",
             kind ? "publish_rate" : "command_rate",
             kind ? ss->cfg->publish_rate : ss->cfg->command_rate,
             kind ? ss->cfg->publish_burst : ss->cfg->command_burst, (unsigned long long)wait);
    hub_proto_encode_rate_limited(&ss->scratch, id, msg, wait);
    send_scratch(s);
    if ((uint32_t)now - s->limited_window_ms >= RATE_WINDOW_MS) { /* mod 2^32 */
        s->limited_window_ms = (uint32_t)now;
        s->limited = 0;
    }
    if (++s->limited > RATE_LIMITED_MAX) {
        hub_log(HUB_LOG_WARN, "[conn %llu] more than %d rate-limited commands in %d s, "
                "closing with 4029", (unsigned long long)s->client.id, RATE_LIMITED_MAX,
                RATE_WINDOW_MS / 1000);
        ss->rate_limit_closes++;
        close_with(s, 4029, "rate limit exceeded", 0);
    }
}

static void count_garbage(struct hub_session *s);

static void proto_error(struct hub_session *s, struct hub_span id, int code,
                        const char *message)
{
    struct hub_sessions *ss = s->ss;

    ss->protocol_errors[code]++;
    hub_proto_encode_error(&ss->scratch, id, code, message);
    send_scratch(s);

    if (code != HUB_PERR_BAD_REQUEST && code != HUB_PERR_UNKNOWN_OP &&
        code != HUB_PERR_INVALID_CHANNEL)
        return;
    count_garbage(s);
}

/* A leaky bucket: each garbage error adds 1000 milli-errors, the bucket
 * drains max_protocol_errors per PROTO_ERROR_WINDOW_MS, and going over
 * max_protocol_errors closes. A burst of more than max errors closes at
 * once; a client that errs now and then never does. O(1) state. */
static void count_garbage(struct hub_session *s)
{
    struct hub_sessions *ss = s->ss;
    uint32_t now = (uint32_t)hub_now_ms(); /* ms mod 2^32: windows of seconds */
    uint64_t max = ss->cfg->max_protocol_errors;
    uint64_t leak = (uint64_t)(uint32_t)(now - s->proto_window_ms) * max * 1000 /
                    PROTO_ERROR_WINDOW_MS;
    s->proto_errors = leak >= s->proto_errors ? 0 : s->proto_errors - (uint32_t)leak;
    s->proto_window_ms = now;
    s->proto_errors += 1000;
    if (s->proto_errors > max * 1000) {
        hub_log(HUB_LOG_WARN,
                "[conn %llu] more than %u protocol errors in %d s, closing with 4008",
                (unsigned long long)s->client.id, ss->cfg->max_protocol_errors,
                PROTO_ERROR_WINDOW_MS / 1000);
        close_with(s, 4008, "too many protocol errors", 0);
    }
}

/* Maps a policy verdict that is not ALLOW to the error reply. */
static void policy_refused(struct hub_session *s, struct hub_span id, enum hub_verdict v,
                           const char *reason, int deny_code)
{
    if (v == HUB_DENY)
        proto_error(s, id, deny_code, reason[0] ? reason : "refused by policy");
    else if (v == HUB_LIMIT)
        proto_error(s, id, HUB_PERR_LIMIT_EXCEEDED, reason);
    else
        proto_error(s, id, HUB_PERR_INTERNAL, "the policy failed; the action was refused");
}

/* ---- hooks that wait ------------------------------------------------------ */

/* The hook of the command being dispatched waits: the command is kept (its
 * reply comes when the hook is done) and what comes meanwhile queues. */
static void begin_wait(struct hub_session *s, int kind, struct pending *op)
{
    struct hub_sessions *ss = s->ss;
    if (!s->sw)
        s->sw = hub_xcalloc(1, sizeof(*s->sw));
    s->sw->kind = kind;
    s->sw->op = op;
    s->sw->len = ss->cur_len;
    s->sw->frame = hub_xmalloc(ss->cur_len ? ss->cur_len : 1);
    if (ss->cur_len)
        memcpy(s->sw->frame, ss->cur_frame, ss->cur_len);
}

/* A message that came while a hook waits goes to the queue. Its text is
 * checked for UTF-8 now: a frame that is not is the connection's failure
 * (1007), not a command's. */
static void enqueue(struct hub_session *s, const char *p, size_t n, int binary)
{
    struct hub_sessions *ss = s->ss;
    struct swait *sw = s->sw;
    struct squeued *q;

    if (!binary && !hub_proto_utf8_valid(p, n)) {
        hub_log(HUB_LOG_INFO, "[conn %llu] text frame with invalid UTF-8: closing with 1007",
                (unsigned long long)s->client.id);
        ss->protocol_errors[HUB_PERR_BAD_REQUEST]++;
        s->flags |= HUB_SESS_RX_INVALID;
        return;
    }
    if (sw->n >= QUEUED_MAX || sw->bytes + n > ss->cfg->max_queue_bytes) {
        struct hub_cmd cmd;
        struct hub_proto_error err;
        cmd.id.len = 0;
        if (!binary)
            hub_proto_decode(p, n, &cmd, &err);
        q = hub_xmalloc(sizeof(*q) + cmd.id.len + 1);
        q->refused = 1;
        q->len = (uint32_t)cmd.id.len;
        if (cmd.id.len)
            memcpy(q->frame, cmd.id.p, cmd.id.len);
        ss->protocol_errors[HUB_PERR_LIMIT_EXCEEDED]++;
        count_garbage(s);
    } else {
        q = hub_xmalloc(sizeof(*q) + n + 1);
        q->refused = 0;
        q->len = (uint32_t)n;
        memcpy(q->frame, p, n);
        sw->bytes += n;
    }
    q->binary = (uint8_t)binary;
    q->next = NULL;
    if (sw->tail)
        sw->tail->next = q;
    else
        sw->head = q;
    sw->tail = q;
    sw->n++;
}

static void dispatch(struct hub_session *s, const char *p, size_t n, int binary);

/* Runs the queued commands, in order, until one's hook waits again; the
 * wait state goes when nothing is left. */
static void drain(struct hub_session *s)
{
    struct swait *sw;
    while ((sw = s->sw) && sw->kind == HUB_OP_NONE && sw->head) {
        struct squeued *q = sw->head;
        sw->head = q->next;
        if (!sw->head)
            sw->tail = NULL;
        sw->n--;
        if (!q->refused)
            sw->bytes -= q->len;
        if (hub_writer_closing(&s->wc)) {
            /* closing: nothing more is answered */
        } else if (q->refused) {
            char msg[128];
            struct hub_span id = {q->frame, q->len};
            snprintf(msg, sizeof(msg), "more than %d commands were waiting behind a policy "
                     "call on this connection: not run", QUEUED_MAX);
            hub_proto_encode_error(&s->ss->scratch, id, HUB_PERR_LIMIT_EXCEEDED, msg);
            send_scratch(s); /* counted when it was refused */
        } else {
            dispatch(s, q->frame, q->len, q->binary);
            hub_cull_now(s->ss->hub);
        }
        free(q);
    }
    if ((sw = s->sw) && sw->kind == HUB_OP_NONE && !sw->head) {
        free(sw);
        s->sw = NULL;
    }
}

/* The connection is gone: the waiting hook is dropped, the queue too. */
static void end_wait(struct hub_session *s)
{
    struct swait *sw = s->sw;
    if (!sw)
        return;
    hub_policy_cancel(&s->pw);
    while (sw->head) {
        struct squeued *q = sw->head;
        sw->head = q->next;
        free(q);
    }
    free(sw->frame);
    free(sw->op);
    free(sw);
    s->sw = NULL;
}

/* ---- replies that wait for the broker ------------------------------------ */

/* A command whose reply waits for the broker (subscribe: the SUBSCRIBE is
 * confirmed; publish: every message was accepted). It names the session
 * by id, never by pointer: the connection may be gone when it completes. */
struct pending {
    struct hub_sessions *ss;
    uint64_t conn_id;
    int remaining;          /* completions still to come (+1 while emitting) */
    int failed;
    int rewind;             /* subscribe: with "rewind" */
    int stats;              /* presence: the counts only */
    int since;              /* history: the answer's epoch must be since_epoch */
    char since_epoch[HUB_EPOCH_MAX + 1];
    uint32_t id_len;
    uint32_t channel_len;
    char id[160];           /* raw JSON id: at most 128 bytes (proto.c) */
    char channel[HUB_CHANNEL_MAX + 1];
};

static struct pending *pending_new(struct hub_session *s, struct hub_span id,
                                   const char *channel, size_t channel_len)
{
    struct pending *op = hub_xmalloc(sizeof(*op));
    op->ss = s->ss;
    op->conn_id = s->client.id;
    op->remaining = 1;
    op->failed = 0;
    op->rewind = op->stats = op->since = 0;
    op->id_len = id.len < sizeof(op->id) ? (uint32_t)id.len : 0;
    if (op->id_len) /* an absent id has p == NULL */
        memcpy(op->id, id.p, op->id_len);
    op->channel_len = (uint32_t)channel_len;
    memcpy(op->channel, channel, channel_len);
    op->channel[channel_len] = '\0';
    return op;
}

/* The session a pending reply is for, if it is still open. */
static struct hub_session *pending_session(const struct pending *op)
{
    struct hub_client *c = hub_client_by_id(op->ss->hub, op->conn_id);
    if (!c)
        return NULL;
    struct hub_session *s = of_client(c);
    return hub_writer_closing(&s->wc) ? NULL : s;
}

static void on_subscribed(void *ud, const struct hub_sub_result *r)
{
    struct pending *op = ud;
    struct hub_session *s = pending_session(op);
    struct hub_span id = {op->id, op->id_len};
    int status = r->status;

    /* CANCELED: the client unsubscribed before Redis confirmed: the
     * subscribe did happen (and was undone), so it is answered ok, before
     * the unsubscribe's own reply. */
    if (s && status == HUB_OK && r->history) {
        hub_proto_encode_ok_pos(&op->ss->scratch, id, op->channel, op->channel_len,
                                r->pos.offset, r->pos.epoch, r->recover ? r->recovered : -1,
                                op->rewind || r->recover ? (int64_t)r->missed : -1);
        send_scratch(s);
    } else if (s && (status == HUB_OK || status == HUB_ECANCELED)) {
        hub_proto_encode_ok(&op->ss->scratch, id, op->channel, op->channel_len);
        send_scratch(s);
    } else if (s) {
        hub_unsubscribe(s->ss->hub, &s->client, op->channel, op->channel_len);
        proto_error(s, id, HUB_PERR_UNAVAILABLE,
                    "the broker is unavailable: not subscribed, try again later");
    }
    free(op);
}

/* A count a client asked for (rewind, limit) within recover_max; else
 * answers bad_request and returns 0. */
static int count_ok(struct hub_session *s, struct hub_span id, const char *field, uint32_t n)
{
    uint32_t max = s->ss->cfg->recover_max;
    if (n <= max)
        return 1;
    char msg[128];
    snprintf(msg, sizeof(msg), "field '%s' must be at most %u (recover_max)", field, max);
    proto_error(s, id, HUB_PERR_BAD_REQUEST, msg);
    return 0;
}

/* The policy decided a subscribe (or there is no on_subscribe: ALLOW with
 * the channel asked for). */
static void subscribe_decided(struct hub_session *s, const struct hub_cmd *cmd,
                              enum hub_verdict v, const char *name, size_t len,
                              const char *reason)
{
    struct hub_sessions *ss = s->ss;

    if (v != HUB_ALLOW) {
        policy_refused(s, cmd->id, v, reason, HUB_PERR_FORBIDDEN);
        return;
    }
    struct hub_sub_req req = {.mode = HUB_SUB_PLAIN};
    if (cmd->recover.set) {
        req.mode = HUB_SUB_RECOVER;
        req.offset = cmd->recover.offset;
        memcpy(req.epoch, cmd->recover.epoch, sizeof(req.epoch));
    } else if (cmd->rewind) {
        req.mode = HUB_SUB_REWIND;
        req.rewind = cmd->rewind;
    }
    struct pending *op = pending_new(s, cmd->id, name, len);
    op->rewind = cmd->rewind != 0;
    int r = hub_subscribe(ss->hub, &s->client, name, len, &req, on_subscribed, op);
    if (r == 1)
        return; /* on_subscribed replies */
    free(op);
    if (r < 0) {
        char msg[128];
        snprintf(msg, sizeof(msg),
                 "at most %u channels per connection (max_channels_per_conn)",
                 ss->cfg->max_channels_per_conn);
        proto_error(s, cmd->id, HUB_PERR_LIMIT_EXCEEDED, msg);
        return;
    }
    /* Subscribed already: the same reply, with the position on a history
     * channel. */
    struct hub_stream_pos pos;
    if (hub_position(ss->hub, name, len, &pos))
        hub_proto_encode_ok_pos(&ss->scratch, cmd->id, name, len, pos.offset, pos.epoch, -1, -1);
    else
        hub_proto_encode_ok(&ss->scratch, cmd->id, name, len);
    send_scratch(s);
}

static void do_subscribe(struct hub_session *s, const struct hub_cmd *cmd)
{
    char eff[HUB_CHANNEL_MAX + 1], reason[256];
    size_t len = cmd->channel_len;

    if (cmd->rewind && !count_ok(s, cmd->id, "rewind", cmd->rewind))
        return;
    if (!has_hook(s, HUB_HOOK_SUBSCRIBE)) {
        subscribe_decided(s, cmd, HUB_ALLOW, cmd->channel, cmd->channel_len, "");
        return;
    }
    enum hub_verdict v = hub_policy_on_subscribe(policy(s), &s->pc, cmd->channel,
                                                 cmd->channel_len, eff, &len, reason,
                                                 sizeof(reason), &s->pw);
    if (v == HUB_WAIT)
        begin_wait(s, HUB_OP_SUBSCRIBE, NULL);
    else
        subscribe_decided(s, cmd, v, eff, len, reason);
}

static void do_unsubscribe(struct hub_session *s, const struct hub_cmd *cmd)
{
    struct hub_sessions *ss = s->ss;

    if (hub_unsubscribe(ss->hub, &s->client, cmd->channel, cmd->channel_len) < 0) {
        char msg[HUB_CHANNEL_MAX + 32];
        snprintf(msg, sizeof(msg), "not subscribed to '%s'", cmd->channel);
        proto_error(s, cmd->id, HUB_PERR_NOT_SUBSCRIBED, msg);
        return;
    }
    hub_proto_encode_ok(&ss->scratch, cmd->id, NULL, 0);
    send_scratch(s);
    if (has_hook(s, HUB_HOOK_UNSUBSCRIBE) &&
        hub_policy_on_unsubscribe(policy(s), &s->pc, cmd->channel, cmd->channel_len,
                                  &s->pw) == HUB_WAIT)
        begin_wait(s, HUB_OP_UNSUBSCRIBE, NULL);
}

/* One message of a publish was accepted or refused by the broker; the
 * reply goes out with the last one. */
static void on_published(void *ud, int status, const struct hub_stream_pos *pos)
{
    struct pending *op = ud;
    (void)pos;

    if (status != HUB_OK)
        op->failed = 1;
    if (--op->remaining > 0)
        return;
    struct hub_session *s = pending_session(op);
    struct hub_span id = {op->id, op->id_len};
    if (s && !op->failed) {
        hub_proto_encode_ok(&op->ss->scratch, id, NULL, 0);
        send_scratch(s);
    } else if (s) {
        proto_error(s, id, HUB_PERR_UNAVAILABLE,
                    "the broker is unavailable: the message was not published");
    }
    free(op);
}

static void emit_publish(void *ud, const char *channel, size_t channel_len,
                         const char *data, size_t data_len)
{
    struct pending *op = ud;
    op->remaining++;
    if (hub_publish(op->ss->hub, channel, channel_len, data, data_len, on_published, op) < 0) {
        op->remaining--;
        op->failed = 1;
    }
}

/* The policy decided a publish; on ALLOW its messages are in flight. */
static void publish_decided(struct hub_session *s, const struct hub_cmd *cmd,
                            struct pending *op, enum hub_verdict v, const char *reason)
{
    if (v != HUB_ALLOW) {
        /* Emits happen only on ALLOW, so nothing is in flight. */
        free(op);
        policy_refused(s, cmd->id, v, reason, HUB_PERR_FORBIDDEN);
        return;
    }
    on_published(op, HUB_OK, NULL); /* drops the guard: replies if all are done */
}

static void do_publish(struct hub_session *s, const struct hub_cmd *cmd)
{
    struct pending *op = pending_new(s, cmd->id, cmd->channel, cmd->channel_len);
    char reason[256];

    if (!has_hook(s, HUB_HOOK_PUBLISH)) {
        emit_publish(op, cmd->channel, cmd->channel_len, cmd->data.p, cmd->data.len);
        publish_decided(s, cmd, op, HUB_ALLOW, "");
        return;
    }
    enum hub_verdict v = hub_policy_on_publish(policy(s), &s->pc, cmd->channel,
                                               cmd->channel_len, cmd->data.p, cmd->data.len,
                                               emit_publish, op, reason, sizeof(reason),
                                               &s->pw);
    if (v == HUB_WAIT)
        begin_wait(s, HUB_OP_PUBLISH, op);
    else
        publish_decided(s, cmd, op, v, reason);
}

/* history and presence read a channel the client is subscribed to (by the
 * name its subscribe reply gave: after on_subscribe's rewrite). */
static int subscribed_or_error(struct hub_session *s, const struct hub_cmd *cmd)
{
    if (hub_subscribed(s->ss->hub, &s->client, cmd->channel, cmd->channel_len))
        return 1;
    char msg[HUB_CHANNEL_MAX + 64];
    snprintf(msg, sizeof(msg), "not subscribed to '%s': subscribe first", cmd->channel);
    proto_error(s, cmd->id, HUB_PERR_NOT_SUBSCRIBED, msg);
    return 0;
}

static void not_available(struct hub_session *s, const struct hub_cmd *cmd, const char *what)
{
    char msg[HUB_CHANNEL_MAX + 128];
    snprintf(msg, sizeof(msg), "channel '%s' has no %s (see the conf's channels)",
             cmd->channel, what);
    proto_error(s, cmd->id, HUB_PERR_NOT_AVAILABLE, msg);
}

static void on_history(void *ud, int status, const struct hub_history_result *r)
{
    struct pending *op = ud;
    struct hub_session *s = pending_session(op);
    struct hub_span id = {op->id, op->id_len};

    if (s && status == HUB_OK && op->since && strcmp(op->since_epoch, r->top.epoch)) {
        /* since named another epoch: the stream was reset */
        char msg[192];
        snprintf(msg, sizeof(msg), "'since' names epoch of another stream: the history was "
                 "reset (now epoch \"%s\"); read it without 'since'", r->top.epoch);
        proto_error(s, id, HUB_PERR_BAD_REQUEST, msg);
    } else if (s && status == HUB_OK) {
        struct hub_buf *b = &op->ss->scratch;
        hub_proto_encode_ok_pos(b, id, op->channel, op->channel_len, r->top.offset,
                                r->top.epoch, -1, -1);
        b->len--;                       /* reopen the object */
        /* One reply frame: it must fit the client's queue with room to
         * spare; the rest is left for another call (truncated). */
        hub_buf_appends(b, ",");
        hub_msg_history_json(b, r->msgs, r->n, op->ss->cfg->max_queue_bytes / 2);
        hub_buf_appends(b, "}");
        send_scratch(s);
    } else if (s) {
        proto_error(s, id, HUB_PERR_UNAVAILABLE,
                    "the broker is unavailable: history not read, try again later");
    }
    free(op);
}

static void do_history(struct hub_session *s, const struct hub_cmd *cmd)
{
    struct hub_history_query q = {.limit = s->ss->cfg->recover_max, .reverse = cmd->reverse};
    if (cmd->limit && !count_ok(s, cmd->id, "limit", cmd->limit))
        return;
    if (!subscribed_or_error(s, cmd))
        return;
    if (cmd->limit)
        q.limit = cmd->limit;
    struct pending *op = pending_new(s, cmd->id, cmd->channel, cmd->channel_len);
    if (cmd->since.set) {
        /* The epoch it names must be the stream's: checked on the answer. */
        q.since = cmd->since.offset;
        op->since = 1;
        memcpy(op->since_epoch, cmd->since.epoch, sizeof(op->since_epoch));
    }
    int r = hub_history(s->ss->hub, cmd->channel, cmd->channel_len, &q, on_history, op);
    if (r == 0)
        return;
    free(op);
    if (r == HUB_ENOTAVAIL)
        not_available(s, cmd, "history");
    else
        proto_error(s, cmd->id, HUB_PERR_UNAVAILABLE,
                    "the broker is unavailable: history not read, try again later");
}

static void on_presence(void *ud, int status, const struct hub_presence_result *r)
{
    struct pending *op = ud;
    struct hub_session *s = pending_session(op);
    struct hub_span id = {op->id, op->id_len};

    if (s && status == HUB_OK) {
        struct hub_buf *b = &op->ss->scratch;
        hub_proto_encode_ok(b, id, op->channel, op->channel_len);
        b->len--;                       /* reopen the object */
        if (op->stats) {
            hub_buf_printf(b, ",\"clients\":%llu,\"users\":%llu}",
                           (unsigned long long)r->clients, (unsigned long long)r->users);
        } else {
            /* One reply frame: it must fit the client's queue with room to
             * spare (like history); the rest is cut (truncated). */
            size_t room = op->ss->cfg->max_queue_bytes / 2, n;
            size_t cut = hub_proto_array_cut(r->list->p, r->list->len,
                                             room > b->len + 40 ? room - b->len - 40 : 0, &n);
            int truncated = r->truncated || cut + 1 < r->list->len;
            hub_buf_appends(b, ",\"clients\":");
            hub_buf_append(b, r->list->p, cut);
            hub_buf_printf(b, "],\"truncated\":%s}", truncated ? "true" : "false");
        }
        send_scratch(s);
    } else if (s) {
        proto_error(s, id, HUB_PERR_UNAVAILABLE,
                    "the broker is unavailable: presence not read, try again later");
    }
    free(op);
}

static void do_presence(struct hub_session *s, const struct hub_cmd *cmd, int stats)
{
    if (!subscribed_or_error(s, cmd))
        return;
    struct pending *op = pending_new(s, cmd->id, cmd->channel, cmd->channel_len);
    op->stats = stats;
    int r = hub_presence(s->ss->hub, cmd->channel, cmd->channel_len,
                         stats ? 0 : s->ss->cfg->presence_max, on_presence, op);
    if (r == 0)
        return;
    free(op);
    if (r == HUB_ENOTAVAIL)
        not_available(s, cmd, "presence");
    else
        proto_error(s, cmd->id, HUB_PERR_UNAVAILABLE,
                    "the broker is unavailable: presence not read, try again later");
}

static void rpc_decided(struct hub_session *s, const struct hub_cmd *cmd, enum hub_verdict v,
                        const char *result, size_t result_len, const char *reason)
{
    if (v == HUB_ALLOW) {
        struct hub_span data = {result, result_len};
        hub_proto_encode_ok_data(&s->ss->scratch, cmd->id, data);
        send_scratch(s);
    } else {
        policy_refused(s, cmd->id, v, reason, HUB_PERR_RPC_ERROR);
    }
}

static void do_rpc(struct hub_session *s, const struct hub_cmd *cmd)
{
    struct hub_buf result = {0};
    char reason[256];

    if (!has_hook(s, HUB_HOOK_RPC)) {
        proto_error(s, cmd->id, HUB_PERR_UNKNOWN_OP,
                    "op 'rpc' needs an on_rpc hook in the policy");
        return;
    }
    enum hub_verdict v = hub_policy_on_rpc(policy(s), &s->pc, cmd->method, cmd->method_len,
                                           cmd->data.p, cmd->data.len, &result, reason,
                                           sizeof(reason), &s->pw);
    if (v == HUB_WAIT)
        begin_wait(s, HUB_OP_RPC, NULL);
    else
        rpc_decided(s, cmd, v, result.p, result.len, reason);
    hub_buf_free(&result);
}

/* A hook of the connection that waited is done: the command it was for
 * gets its reply (decoded again from its copy), then what queued runs. */
static void on_hook_done(struct hub_policy_wait *w, const struct hub_policy_outcome *o)
{
    struct hub_session *s = hub_container_of(w, struct hub_session, pw);
    struct swait *sw = s->sw;
    struct hub_cmd cmd;
    struct hub_proto_error err;

    if (sw->kind != HUB_OP_UNSUBSCRIBE &&
        hub_proto_decode(sw->frame, sw->len, &cmd, &err) == 0) {
        switch (sw->kind) {
        case HUB_OP_SUBSCRIBE:
            subscribe_decided(s, &cmd, o->verdict, o->channel, o->channel_len, o->reason);
            break;
        case HUB_OP_PUBLISH:
            publish_decided(s, &cmd, sw->op, o->verdict, o->reason);
            sw->op = NULL;
            break;
        case HUB_OP_RPC:
            rpc_decided(s, &cmd, o->verdict, o->result, o->result_len, o->reason);
            break;
        default:
            break;
        }
    }
    free(sw->op); /* a publish that could not be decoded again: never */
    sw->op = NULL;
    free(sw->frame);
    sw->frame = NULL;
    sw->kind = HUB_OP_NONE;
    hub_cull_now(s->ss->hub);
    drain(s);
}

/* ---- receive ------------------------------------------------------------ */

/* Runs one message: decode, rate limits, the command. */
static void dispatch(struct hub_session *s, const char *p, size_t n, int binary)
{
    struct hub_cmd cmd;
    struct hub_proto_error err;
    static const struct hub_span no_id;

    s->ss->cur_frame = p;
    s->ss->cur_len = n;
    if (binary) {
        proto_error(s, no_id, HUB_PERR_BAD_REQUEST,
                    "binary frames are not supported: send each command as a JSON text frame");
        return;
    }
    if (hub_proto_decode(p, n, &cmd, &err) < 0) {
        if (err.invalid_utf8) {
            /* Not a protocol error of ours: the frame itself is invalid
             * (RFC 6455 §8.1): the connection fails with 1007. */
            hub_log(HUB_LOG_INFO, "[conn %llu] text frame with invalid UTF-8: closing with 1007",
                    (unsigned long long)s->client.id);
            s->ss->protocol_errors[HUB_PERR_BAD_REQUEST]++;
            s->flags |= HUB_SESS_RX_INVALID;
            return;
        }
        proto_error(s, cmd.id, err.code, err.message);
        return;
    }
    const struct hub_config *cfg = s->ss->cfg;
    if (cfg->command_rate || cfg->publish_rate) {
        uint64_t now = hub_now_ms();
        uint64_t wait = hub_bucket_take(&s->commands, cfg->command_rate, cfg->command_burst,
                                        now);
        if (wait) {
            rate_limited(s, cmd.id, 0, wait);
            return;
        }
        if (cmd.op == HUB_OP_PUBLISH &&
            (wait = hub_bucket_take(&s->publishes, cfg->publish_rate, cfg->publish_burst,
                                    now))) {
            rate_limited(s, cmd.id, 1, wait);
            return;
        }
    }
    switch (cmd.op) {
    case HUB_OP_SUBSCRIBE:
        do_subscribe(s, &cmd);
        break;
    case HUB_OP_UNSUBSCRIBE:
        do_unsubscribe(s, &cmd);
        break;
    case HUB_OP_PUBLISH:
        do_publish(s, &cmd);
        break;
    case HUB_OP_PING:
        hub_proto_encode_ok(&s->ss->scratch, cmd.id, NULL, 0);
        send_scratch(s);
        break;
    case HUB_OP_RPC:
        do_rpc(s, &cmd);
        break;
    case HUB_OP_HISTORY:
        do_history(s, &cmd);
        break;
    case HUB_OP_PRESENCE:
    case HUB_OP_PRESENCE_STATS:
        do_presence(s, &cmd, cmd.op == HUB_OP_PRESENCE_STATS);
        break;
    default:
        proto_error(s, cmd.id, HUB_PERR_INTERNAL, "unhandled op");
        break;
    }
}

/* A message: run now, or queued behind a hook of this connection that
 * waits, so that commands run and are answered in order. */
static void handle(struct hub_session *s, const char *p, size_t n, int binary)
{
    if (s->sw)
        enqueue(s, p, n, binary);
    else
        dispatch(s, p, n, binary);
}

/* After a message: culls what it made slow, and says whether its text was
 * not UTF-8 (-1, close 1007). */
static int after_message(struct hub_session *s, uint16_t *close_code, const char **reason)
{
    hub_cull_now(s->ss->hub);
    if (!(s->flags & HUB_SESS_RX_INVALID))
        return 0;
    s->close_code = 1007;
    *close_code = 1007;
    *reason = "invalid UTF-8";
    hub_writer_abandon(&s->wc);
    return -1;
}

int hub_session_receive(struct hub_session *s, const void *in, size_t len, int final,
                        int binary, uint16_t *close_code, const char **close_reason)
{
    uint64_t max = s->ss->cfg->max_message_size;

    if (hub_writer_closing(&s->wc))
        return 0;
    hub_writer_seen(&s->wc);

    if (!(s->flags & HUB_SESS_RX_ACTIVE)) {
        if (binary)
            s->flags |= HUB_SESS_RX_BINARY;
        else
            s->flags &= ~HUB_SESS_RX_BINARY;
        if (final && len <= max) {
            /* Fast path: the whole message in one callback, no copy. */
            handle(s, in, len, s->flags & HUB_SESS_RX_BINARY);
            return after_message(s, close_code, close_reason);
        }
        s->flags |= HUB_SESS_RX_ACTIVE;
    }

    uint32_t have = s->rx ? s->rx->len : 0, cap0 = s->rx ? s->rx->cap : 0;
    if ((uint64_t)have + len > max) {
        hub_log(HUB_LOG_INFO, "[conn %llu] message over max_message_size (%llu), closing with 1009",
                (unsigned long long)s->client.id, (unsigned long long)max);
        free(s->rx);
        s->rx = NULL;
        s->flags &= ~HUB_SESS_RX_ACTIVE;
        s->close_code = 1009;
        hub_writer_abandon(&s->wc);
        *close_code = 1009;
        *close_reason = "message too large";
        return -1;
    }
    if (!s->rx || have + len > cap0) {
        size_t cap = cap0 ? cap0 : 1024;
        while (cap < have + len)
            cap *= 2;
        if (cap > max)
            cap = max;
        s->rx = hub_xrealloc(s->rx, sizeof(*s->rx) + cap);
        s->rx->len = have;
        s->rx->cap = (uint32_t)cap;
    }
    if (len)
        memcpy(s->rx->p + have, in, len);
    s->rx->len += (uint32_t)len;
    if (!final)
        return 0;

    s->flags &= ~HUB_SESS_RX_ACTIVE;
    handle(s, (const char *)s->rx->p, s->rx->len, s->flags & HUB_SESS_RX_BINARY);
    /* Reassembly is the rare path: give the buffer back between messages. */
    free(s->rx);
    s->rx = NULL;
    return after_message(s, close_code, close_reason);
}

/* ---- lifetime ------------------------------------------------------------ */

void hub_conn_pending_free(struct hub_conn_pending *p)
{
    if (!p)
        return;
    free(p->user);
    free(p->info_json);
    free(p->protocol);
    free(p);
}

/* The client's address: what the HTTP side saw (the TCP peer, or the TLS
 * client behind our socketpair, or behind trusted_proxies the client that
 * X-Forwarded-For names; docs/protocol.md, "Client addresses"), else the
 * socket's peer. */
static void peer_addr(const struct hub_session *s, char *out, size_t n)
{
    if (s->ip.family)
        hub_ip_format(&s->ip, out, n);
    else
        hub_writer_peer(&s->wc, out, n);
}

void hub_session_open(struct hub_session *s, struct hub_sessions *ss, struct lws *wsi,
                      struct hub_conn_pending *pending)
{
    char client[64];
    uint64_t id = pending ? pending->id : hub_next_id(ss->hub);

    s->ss = ss;
    s->close_code = 1006; /* until a close frame says otherwise */
    s->pw.done = on_hook_done;
    hub_client_add(ss->hub, &s->client, &client_ops, id);
    hub_writer_open(ss->writer, &s->wc, wsi, id);
    s->pc.id = id;
    if (pending) {
        s->pc.user = pending->user;
        s->pc.info_json = pending->info_json;
        s->pc.protocol = pending->protocol;
        s->ip = pending->ip;
        free(pending);
    }
    s->flags = HUB_SESS_OPEN;
    ss->connections_total++;

    if (hub_log_enabled(HUB_LOG_DEBUG)) {
        char peer[64];
        peer_addr(s, peer, sizeof(peer));
        hub_log(HUB_LOG_DEBUG, "[conn %llu] connected from %s%s%s", (unsigned long long)id,
                peer, s->pc.user ? " as " : "", s->pc.user ? s->pc.user : "");
    }
    hub_client_name(ss->hub, id, client, sizeof(client));
    if (ss->registry && hub_registry_conn_open(ss->registry, client, s->pc.user,
                                               s->pc.user ? strlen(s->pc.user) : 0))
        s->flags |= HUB_SESS_REGISTERED;
    hub_proto_encode_welcome(&ss->scratch, client, HUB_VERSION, ss->cfg->ping_interval);
    send_scratch(s);
}

void hub_session_closed(struct hub_session *s)
{
    struct hub_sessions *ss = s->ss;

    if (!ss || !(s->flags & HUB_SESS_OPEN)) /* never reached ESTABLISHED */
        return;
    /* Nothing may be queued from here on: leaving the channels below can
     * complete pending subscribes, whose replies must not queue anything. */
    hub_writer_closed(&s->wc);
    if (ss->registry) {
        char client[64];
        hub_client_name(ss->hub, s->client.id, client, sizeof(client));
        hub_registry_conn_close(ss->registry, client, s->flags & HUB_SESS_REGISTERED);
    }
    /* a hook that waits is dropped, and what queued behind it */
    end_wait(s);
    if (has_hook(s, HUB_HOOK_DISCONNECT))
        hub_policy_on_disconnect(policy(s), &s->pc, s->close_code,
                                 s->close_reason ? s->close_reason : "");
    if (policy(s))
        hub_policy_conn_gone(policy(s), &s->pc);
    hub_client_remove(ss->hub, &s->client);
    if (ss->iplimit && s->ip.family)
        hub_iplimit_close(ss->iplimit, &s->ip, hub_now_ms());
    free(s->rx);
    free(s->pc.user);
    free(s->pc.info_json);
    free(s->close_reason);
    free(s->entry);
    free(s->pc.protocol);
    s->rx = NULL;
    s->entry = NULL;
    s->pc.user = s->pc.info_json = s->pc.protocol = s->close_reason = NULL;
    s->flags = 0;
    hub_log(HUB_LOG_DEBUG, "[conn %llu] closed", (unsigned long long)s->client.id);
    if (ss->shutting_down && !hub_clients(ss->hub) && ss->all_gone)
        ss->all_gone(ss->ud);
}

/* A close code a peer may send (RFC 6455 §7.4.1-2, the rule lws 4.1.6
 * applies too). 1005, 1006 and 1015 are never sent on the wire. */
static int close_code_valid(unsigned code)
{
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) ||
           (code >= 3000 && code <= 4999);
}

int hub_session_peer_closed(struct hub_session *s, const void *payload, size_t len)
{
    const unsigned char *p = payload;
    static const unsigned char protocol_error[2] = {1002 >> 8, 1002 & 0xff};

    if (hub_writer_closing(&s->wc))
        return -1; /* the answer to our close: the handshake is complete */
    s->close_code = len >= 2 ? (uint16_t)(p[0] << 8 | p[1]) : 1005;
    /* A 1-byte payload, a code nobody may send, or a reason that is not
     * UTF-8 (RFC 6455 §5.5.1, §7.4, §8.1): answered with 1002, not echoed. */
    if (len == 1 || (len >= 2 && (!close_code_valid(s->close_code) ||
                                  !hub_proto_utf8_valid((const char *)p + 2, len - 2)))) {
        hub_log(HUB_LOG_DEBUG, "[conn %llu] invalid close frame (%zu bytes, code %u): "
                "closing with 1002", (unsigned long long)s->client.id, len,
                len >= 2 ? (unsigned)s->close_code : 0u);
        s->close_code = 1002;
        free(s->close_reason);
        s->close_reason = hub_xstrdup("invalid close frame");
        return hub_writer_echo_close(&s->wc, protocol_error);
    }
    return hub_writer_echo_close(&s->wc, len >= 2 ? p : NULL);
}

void hub_session_close(struct hub_session *s, uint16_t code, const char *reason)
{
    close_with(s, code, reason, 0);
}

/* Every open session, for the rare walks (shutdown, an API disconnect, a
 * reload): the hub's id table holds them all. */
static void each_session(struct hub_sessions *ss, void (*fn)(struct hub_session *, void *),
                         void *arg)
{
    const struct hub_htable *t = &ss->hub->clients;
    for (size_t b = 0; b < t->nb; b++)
        for (struct hub_hnode *n = t->b[b]; n; n = n->next)
            fn(of_client(hub_container_of(n, struct hub_client, node)), arg);
}

static void close_1001(struct hub_session *s, void *arg)
{
    (void)arg;
    hub_session_close(s, 1001, "server shutting down");
}

void hub_sessions_shutdown(struct hub_sessions *ss)
{
    ss->shutting_down = 1;
    hub_writer_no_pause(ss->writer);
    each_session(ss, close_1001, NULL);
    if (!hub_clients(ss->hub) && ss->all_gone)
        ss->all_gone(ss->ud);
}

struct user_arg {
    const char *user;
    size_t len;
};

static void close_user(struct hub_session *s, void *arg)
{
    const struct user_arg *u = arg;
    if (s->pc.user && strlen(s->pc.user) == u->len && !memcmp(s->pc.user, u->user, u->len))
        hub_session_close(s, 4003, "disconnected by the API");
}

void hub_sessions_disconnect_user(struct hub_sessions *ss, const char *user, size_t len)
{
    struct user_arg u = {user, len};
    each_session(ss, close_user, &u); /* closing is asynchronous: the table stays */
}

/* ---- the policy's host interface ------------------------------------------ */

static struct hub_policy_conn *h_conn(void *ud, uint64_t id)
{
    struct hub_sessions *ss = ud;
    struct hub_client *c = hub_client_by_id(ss->hub, id);
    return c ? &of_client(c)->pc : NULL;
}

static struct hub_policy_conn *h_conn_named(void *ud, const char *client)
{
    struct hub_sessions *ss = ud;
    struct hub_client *c = hub_client_by_name(ss->hub, client);
    return c ? &of_client(c)->pc : NULL;
}

static void h_conn_name(void *ud, uint64_t id, char *out, size_t n)
{
    struct hub_sessions *ss = ud;
    hub_client_name(ss->hub, id, out, n);
}

static void h_conn_addr(void *ud, const struct hub_policy_conn *c, char *out, size_t n)
{
    (void)ud;
    peer_addr(of_pc(c), out, n);
}

static int h_conn_closing(void *ud, const struct hub_policy_conn *c)
{
    (void)ud;
    return hub_writer_closing(&of_pc(c)->wc);
}

static void h_conn_send(void *ud, struct hub_policy_conn *c, const char *json, size_t len)
{
    struct hub_sessions *ss = ud;
    struct hub_session *s = of_pc(c);
    hub_buf_appends(&ss->scratch, "{\"op\":\"push\",\"data\":");
    hub_buf_append(&ss->scratch, json, len);
    hub_buf_appends(&ss->scratch, "}");
    send_scratch(s);
}

static void h_conn_close(void *ud, struct hub_policy_conn *c, unsigned code, const char *reason)
{
    (void)ud;
    hub_session_close(of_pc(c), (uint16_t)code, reason);
}

static int h_conn_subscribe(void *ud, struct hub_policy_conn *c, const char *ch, size_t len)
{
    struct hub_sessions *ss = ud;
    return hub_subscribe(ss->hub, &of_pc(c)->client, ch, len, NULL, NULL, NULL);
}

static int h_conn_unsubscribe(void *ud, struct hub_policy_conn *c, const char *ch, size_t len)
{
    struct hub_sessions *ss = ud;
    return hub_unsubscribe(ss->hub, &of_pc(c)->client, ch, len);
}

static void h_conn_channels(void *ud, const struct hub_policy_conn *c,
                            void (*fn)(void *arg, const char *ch, size_t len), void *arg)
{
    (void)ud;
    for (const struct hub_sub *sub = of_pc(c)->client.subs; sub; sub = sub->next)
        fn(arg, sub->chan->name, sub->chan->name_len);
}

struct each_arg {
    void (*fn)(void *arg, struct hub_policy_conn *c);
    void *arg;
};

static void each_pc(struct hub_session *s, void *arg)
{
    struct each_arg *a = arg;
    a->fn(a->arg, &s->pc);
}

static void h_each_conn(void *ud, void (*fn)(void *arg, struct hub_policy_conn *c), void *arg)
{
    struct each_arg a = {fn, arg};
    each_session(ud, each_pc, &a);
}

static size_t h_publish(void *ud, const char *ch, size_t len, const char *data, size_t dlen)
{
    struct hub_sessions *ss = ud;
    size_t n = hub_subscribers(ss->hub, ch, len);
    if (hub_publish(ss->hub, ch, len, data, dlen, NULL, NULL) < 0)
        return 0;
    return n;
}

static size_t h_subscribers(void *ud, const char *ch, size_t len)
{
    struct hub_sessions *ss = ud;
    return hub_subscribers(ss->hub, ch, len);
}

static void h_presence_local(void *ud, const char *ch, size_t len, uint64_t *clients,
                             uint64_t *users)
{
    struct hub_sessions *ss = ud;
    hub_presence_local(ss->hub, ch, len, clients, users);
}

static int h_shutting_down(void *ud)
{
    struct hub_sessions *ss = ud;
    return ss->shutting_down;
}

/* hub.redis: policy_redis's connection, else the broker's. */
static int h_redis(void *ud, int argc, const char **argv, const size_t *lens,
                   hub_broker_reply_cb cb, void *cbud)
{
    struct hub_sessions *ss = ud;
    struct hub_broker *b = ss->redis ? ss->redis : ss->hub->broker;
    return b->ops->command(b, argc, argv, lens, cb, cbud);
}

static int h_history(void *ud, const char *ch, size_t len, const struct hub_history_query *q,
                     hub_broker_history_cb cb, void *cbud)
{
    struct hub_sessions *ss = ud;
    return hub_history(ss->hub, ch, len, q, cb, cbud);
}

static int h_presence(void *ud, const char *ch, size_t len, uint32_t max,
                      hub_broker_presence_cb cb, void *cbud)
{
    struct hub_sessions *ss = ud;
    return hub_presence(ss->hub, ch, len, max, cb, cbud);
}

const struct hub_policy_host_ops hub_session_policy_ops = {
    .conn = h_conn,
    .conn_named = h_conn_named,
    .conn_name = h_conn_name,
    .conn_addr = h_conn_addr,
    .conn_closing = h_conn_closing,
    .conn_send = h_conn_send,
    .conn_close = h_conn_close,
    .conn_subscribe = h_conn_subscribe,
    .conn_unsubscribe = h_conn_unsubscribe,
    .conn_channels = h_conn_channels,
    .each_conn = h_each_conn,
    .publish = h_publish,
    .subscribers = h_subscribers,
    .presence_local = h_presence_local,
    .shutting_down = h_shutting_down,
    .redis = h_redis,
    .history = h_history,
    .presence = h_presence,
};
