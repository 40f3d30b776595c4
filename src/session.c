/* WebSocket sessions (include/luahub/session.h): receive, dispatch,
 * pending replies, hooks that wait, the protocol error budget. A session's
 * open and close, the hub's client ops and the policy's host interface are
 * session_host.c; what the two share is session_impl.h. */
#include "luahub/session.h"
#include "session_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/config.h"
#include "luahub/log.h"
#include "luahub/proto.h"

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

/* ---- frames out --------------------------------------------------------- */

void hub_session_close_with(struct hub_session *s, uint16_t code, const char *reason, int drop)
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
void hub_session_send_scratch(struct hub_session *s)
{
    struct hub_sessions *ss = s->ss;
    struct hub_msg *m = hub_msg_text(ss->scratch.p, ss->scratch.len);
    if (hub_writer_reply(&s->wc, m) < 0)
        hub_cull(ss->hub, &s->client);
    hub_msg_unref(m);
    hub_buf_reset(&ss->scratch);
}

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
    hub_session_send_scratch(s);
    if ((uint32_t)now - s->limited_window_ms >= RATE_WINDOW_MS) { /* mod 2^32 */
        s->limited_window_ms = (uint32_t)now;
        s->limited = 0;
    }
    if (++s->limited > RATE_LIMITED_MAX) {
        hub_log(HUB_LOG_WARN, "[conn %llu] more than %d rate-limited commands in %d s, "
                "closing with 4029", (unsigned long long)s->client.id, RATE_LIMITED_MAX,
                RATE_WINDOW_MS / 1000);
        ss->rate_limit_closes++;
        hub_session_close_with(s, 4029, "rate limit exceeded", 0);
    }
}

static void count_garbage(struct hub_session *s);

static void proto_error(struct hub_session *s, struct hub_span id, int code,
                        const char *message)
{
    struct hub_sessions *ss = s->ss;

    ss->protocol_errors[code]++;
    hub_proto_encode_error(&ss->scratch, id, code, message);
    hub_session_send_scratch(s);

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
        hub_session_close_with(s, 4008, "too many protocol errors", 0);
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
            hub_session_send_scratch(s); /* counted when it was refused */
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
void hub_session_end_wait(struct hub_session *s)
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
        hub_session_send_scratch(s);
    } else if (s && (status == HUB_OK || status == HUB_ECANCELED)) {
        hub_proto_encode_ok(&op->ss->scratch, id, op->channel, op->channel_len);
        hub_session_send_scratch(s);
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
    hub_session_send_scratch(s);
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
    hub_session_send_scratch(s);
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
        hub_session_send_scratch(s);
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
        hub_session_send_scratch(s);
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
        hub_session_send_scratch(s);
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
        hub_session_send_scratch(s);
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
void hub_session_hook_done(struct hub_policy_wait *w, const struct hub_policy_outcome *o)
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
        hub_session_send_scratch(s);
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
