/* The Redis broker, second half: publishing and what an OK means (probes,
 * publishes waiting for their probe's echo, liveness), generic commands
 * and script calls (EVALSHA, sent again with EVAL after NOSCRIPT),
 * metrics. The first half (connections, subscriptions, stop and free) is
 * broker_redis.c, whose top comment explains both; what a publish OK
 * promises is docs/internals.md, "Redis: what an acknowledged publish
 * means". Loop thread only. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <hiredis/sds.h>

#include "broker_redis.h"
#include "luahub/log.h"
#include "luahub/msg.h"

static const char *const ref_name[REF_N] = {"down", "pubsub_down", "over_cap",
                                             "not_received"};
static const char *const lost_name[LOST_N] = {"closed", "timeout", "not_subscribed"};

/* ------------------------------------------------------------------ */
/* Publishes waiting for the echo of their probe                      */
/* ------------------------------------------------------------------ */

/* Moves the waiting publishes whose probe number is <= `seq` (all of them:
 * UINT64_MAX) to the tail of `out`, oldest first. They are in probe order:
 * one cmd connection answers in order and probe numbers only grow. */
void hub_rbroker_acks_take(struct shard *sh, uint64_t seq, struct hub_list *out)
{
    struct pending *p;
    while ((p = hub_rbroker_pending_first(&sh->acks)) && p->seq <= seq)
        hub_list_move_tail(out, &p->link);
}

/* Completes the records of `list` (from hub_rbroker_acks_take; a list head
 * of the caller's, in no broker structure). Touches nothing of the broker
 * after the first callback (which may stop it). */
void hub_rbroker_acks_fire(struct rbroker *b, struct hub_list *list, int status)
{
    struct hub_list *n, *tmp;
    hub_list_foreach_safe(n, tmp, list) {
        if (status == HUB_OK) {
            b->publishes++;
        } else {
            b->publish_errors++;
            b->refused[REF_NOT_RECEIVED]++;
        }
    }
    struct pending *p;
    while ((p = hub_rbroker_pending_first(list))) {
        hub_broker_publish_cb cb = p->cb;
        void *ud = p->ud;
        struct hub_stream_pos pos;
        int history = p->call != NULL;
        if (history)
            pos = p->call->pos;
        hub_list_remove(&p->link);
        hub_rbroker_pending_free(p);
        if (cb)
            cb(ud, status, status == HUB_OK && history ? &pos : NULL);
    }
}

/* The probe `s` (its number in decimal) came back on the current sub
 * connection: every publish that waited for it, or for an earlier one, was
 * received by this broker (docs/internals.md). Inside a hiredis callback
 * of sub; fires publish callbacks last. */
void hub_rbroker_probe_echo(struct shard *sh, const char *s, size_t len)
{
    uint64_t seq = 0;
    for (size_t i = 0; i < len && i < 20 && s[i] >= '0' && s[i] <= '9'; i++)
        seq = seq * 10 + (uint64_t)(s[i] - '0');
    /* A smaller number is a probe from before a reconnect, executed late:
     * nothing waits for it any more (numbers only grow). */
    if (seq <= sh->probe_seen)
        return;
    sh->probe_seen = seq;
    struct rconn *rc = &sh->sub;
    struct hub_list *n, *tmp, done;
    hub_list_foreach_safe(n, tmp, &rc->pending) {
        struct pending *p = hub_container_of(n, struct pending, link);
        if (p->kind != P_ECHO)
            continue;
        if (p->seq > seq)
            break;
        hub_list_remove(&p->link);
        free(p);
        sh->echoes--;
    }
    hub_list_init(&done);
    hub_rbroker_acks_take(sh, seq, &done);
    hub_rbroker_acks_fire(sh->b, &done, HUB_OK);
}

/* ------------------------------------------------------------------ */
/* Publishing                                                         */
/* ------------------------------------------------------------------ */

/* A reply (or NULL: the connection went away) for a pending PUBLISH or
 * command: takes it off its connection's books. The caller frees it. */
static struct pending *pending_finish(void *privdata)
{
    struct pending *p = privdata;
    struct rconn *rc = p->rc;
    hub_list_remove(&p->link);
    rc->npending--;
    rc->pending_bytes -= p->bytes;
    return p;
}

void hub_rbroker_pending_free(struct pending *p)
{
    if (p->call)
        hub_rbroker_call_free(p->call);
    free(p);
}

/* Rate-limited (once a second per connection) warning. */
static void warn_limited(struct rconn *rc, const char *what, const char *err)
{
    uint64_t now = hub_now_ms();
    if (now - rc->last_overload_log_ms >= 1000) {
        rc->last_overload_log_ms = now;
        hub_log(HUB_LOG_WARN, "%s: %s failed: %s", rc->sh->tag, what, err);
    }
}

/* The sub connection that was up when `gen` was current is still ours and
 * up: a PUBLISH answered 0 means Redis no longer has it subscribed. */
static int sub_believed_up(const struct shard *sh, uint64_t gen)
{
    return gen == sh->sub_gen && sh->sub.ac && sh->sub.state == C_UP;
}

static int call_send(struct rconn *rc, struct hub_rcall *c, int eval, redisCallbackFn *fn,
                     void *privdata);

/* `r` answers a script call with NOSCRIPT (SCRIPT FLUSH, or a Redis that
 * lost its script cache without dropping us): sends the call of `p` again
 * with EVAL, which also loads the script, on the connection it came from
 * (`ac`). Its place in the connection's order is now at the end
 * (docs/broker.md, "Scripts"). Returns 1 when it was sent (the record is
 * in flight again), else 0. */
static int call_retry(redisAsyncContext *ac, struct pending *p, const redisReply *r,
                      redisCallbackFn *fn)
{
    struct rconn *rc = p->rc;
    struct shard *sh = rc->sh;
    if (!p->call || p->call->retried || r->type != REDIS_REPLY_ERROR ||
        strncmp(r->str, "NOSCRIPT", 8) != 0 || rc->ac != ac || rc->state != C_UP)
        return 0;
    p->call->retried = 1;
    if (call_send(rc, p->call, 1, fn, p) != REDIS_OK)
        return 0;
    sh->b->script_reloads++;
    p->t0_ns = hub_now_ns();
    p->deadline_ms = p->t0_ns / 1000000u + sh->url.command_timeout_ms;
    rc->npending++;
    rc->pending_bytes += p->bytes;
    hub_rbroker_pending_push(rc, p);
    if (p->seq) {
        /* Behind the probe it waited for: it needs the next one. */
        p->seq = sh->probe_sent + 1;
        if (!sh->probe_due) {
            sh->probe_due = 1;
            hub_rbroker_schedule_flush(sh->b);
        }
    }
    return 1;
}

/* The receivers a publish reached, from its reply: PUBLISH answers the
 * number, the publish script {offset, epoch, receivers} (the position goes
 * to p->call->pos). -1 when the reply is not of that shape. */
static long long publish_receivers(const struct pending *p, const redisReply *r)
{
    if (!p->call)
        return r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        r->element[0]->type != REDIS_REPLY_INTEGER || r->element[0]->integer < 1 ||
        r->element[1]->type != REDIS_REPLY_STRING || r->element[1]->len == 0 ||
        r->element[1]->len > HUB_EPOCH_MAX || r->element[2]->type != REDIS_REPLY_INTEGER)
        return -1;
    p->call->pos.offset = (uint64_t)r->element[0]->integer;
    memcpy(p->call->pos.epoch, r->element[1]->str, r->element[1]->len);
    p->call->pos.epoch[r->element[1]->len] = '\0';
    return r->element[2]->integer;
}

static void on_publish_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct pending *p = pending_finish(privdata);
    struct rconn *rc = p->rc;
    struct shard *sh = rc->sh;
    struct rbroker *b = sh->b;
    redisReply *r = reply;
    int status = HUB_EUNAVAILABLE, gone = 0;
    long long n = r && r->type != REDIS_REPLY_ERROR ? publish_receivers(p, r) : -1;
    if (r && call_retry(ac, p, r, on_publish_reply))
        return;
    if (r && r->type != REDIS_REPLY_ERROR && (n >= 0 || !p->call)) {
        hub_hist_observe(&b->rtt, hub_now_ns() - p->t0_ns);
        if (p->self && n < 1 && p->unsubs == sh->unsubs_sent) {
            /* Nobody received it, not even our own subscription: the sub
             * connection is gone although its socket has not said so. Not
             * if an UNSUBSCRIBE went out since (its last local subscriber
             * left): Redis may have run it before this PUBLISH, which came
             * on the other connection, and rightly counted 0 (docs/internals.md,
             * "How the hub keeps it", 2). The probe then decides. */
            b->refused[REF_NOT_RECEIVED]++;
            gone = sub_believed_up(sh, p->gen);
        } else if (p->seq && (p->gen != sh->sub_gen || p->seq > sh->probe_sent)) {
            /* The sub connection was lost since (or the probe never went
             * out): our copy may not have come back. */
            b->refused[REF_NOT_RECEIVED]++;
        } else if (p->seq && sh->probe_seen < p->seq) {
            hub_list_push_tail(&sh->acks, &p->link); /* completed by the echo or conn_fail */
            return;
        } else {
            status = HUB_OK;
        }
    } else if (r) {
        warn_limited(rc, p->call ? "publish script" : "PUBLISH",
                     r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
    }
    if (status == HUB_OK)
        b->publishes++;
    else
        b->publish_errors++;
    hub_broker_publish_cb cb = p->cb;
    void *ud = p->ud;
    struct hub_stream_pos pos;
    int history = p->call != NULL;
    if (history)
        pos = p->call->pos;
    hub_rbroker_pending_free(p);
    if (gone)
        hub_rbroker_conn_drop(&sh->sub,
                              "a PUBLISH to a channel it has subscribed reached no subscriber",
                              HUB_LOG_WARN, LOST_NOT_SUBSCRIBED);
    if (cb)
        cb(ud, status, status == HUB_OK && history ? &pos : NULL);
}

/* Bounded: what waits for Redis (replies, and bytes hiredis could not
 * write yet) has a cap; past it we fail fast rather than queue. Returns 1
 * (and logs, at most once a second) when `bytes` more would pass it. */
static int over_cap(struct shard *sh, struct rconn *rc, size_t bytes)
{
    size_t obuf = rc->ac->c.obuf ? sdslen((sds)rc->ac->c.obuf) : 0;
    if (rc->npending < sh->url.max_pending &&
        rc->pending_bytes + bytes <= sh->url.max_pending_bytes &&
        obuf + bytes <= sh->url.max_pending_bytes)
        return 0;
    uint64_t now = hub_now_ms();
    if (now - rc->last_overload_log_ms >= 1000) {
        rc->last_overload_log_ms = now;
        hub_log(HUB_LOG_WARN,
                "%s: %u PUBLISHes and commands (%zu bytes) await Redis, over the cap: "
                "failing fast",
                sh->tag, rc->npending, rc->pending_bytes);
    }
    return 1;
}

static int refuse(struct rbroker *b, int reason)
{
    b->publish_errors++;
    b->refused[reason]++;
    return HUB_EUNAVAILABLE;
}

/* Sends a publish to `channel`: PUBLISH of `m` (plain), or the script
 * call `c` (history; owned from now on). */
static int publish_send(struct rbroker *b, const char *channel, size_t len, struct hub_msg *m,
                        struct hub_rcall *c, hub_broker_publish_cb cb, void *ud)
{
    struct shard *sh = shard_of(b, channel, len);
    struct rconn *rc = &sh->cmd;
    int reason = -1;
    size_t bytes = 0;
    if (rc->state != C_UP || !rc->ac) {
        reason = REF_DOWN;
    } else if (sh->sub.state != C_UP || !sh->sub.ac) {
        /* Not subscribed (lost, or re-subscribing): our subscribers would
         * miss it, and so would, likely, every hub that lost Redis with us. */
        reason = REF_PUBSUB_DOWN;
    } else {
        bytes = c ? c->buf.len + 16 * (size_t)c->argc : (size_t)m->payload_len + b->plen + len;
        if (over_cap(sh, rc, bytes))
            reason = REF_OVER_CAP;
    }
    if (reason >= 0) {
        if (c)
            hub_rbroker_call_free(c);
        return refuse(b, reason);
    }

    uint64_t h = hub_hash64(channel, len);
    struct rchan *ch = hub_rbroker_chan_find(sh, channel, len, h);
    struct pending *p = hub_rbroker_pending_new(sh, P_PUBLISH, bytes);
    p->cb = cb;
    p->ud = ud;
    p->call = c;
    /* Local subscribers with a confirmed subscription: our own copy must
     * come back before this is OK (the probe of this iteration proves it). */
    p->self = ch && ch->want && ch->sent && ch->subs_confirmed >= ch->subs_sent;
    p->unsubs = sh->unsubs_sent;
    if (p->self && cb)
        p->seq = sh->probe_sent + 1;
    int rv;
    if (c) {
        rv = call_send(rc, c, 0, on_publish_reply, p);
    } else {
        hub_buf_reset(&b->key);
        hub_buf_append(&b->key, b->prefix, b->plen);
        hub_buf_append(&b->key, channel, len);
        const char *argv[3] = {"PUBLISH", b->key.p, (const char *)hub_msg_payload(m)};
        size_t argl[3] = {7, b->key.len, m->payload_len};
        rv = redisAsyncCommandArgv(rc->ac, on_publish_reply, p, 3, argv, argl);
    }
    if (rv != REDIS_OK) {
        hub_rbroker_pending_free(p);
        return refuse(b, REF_DOWN);
    }
    rc->npending++;
    rc->pending_bytes += bytes;
    hub_rbroker_pending_push(rc, p);
    if (p->seq && !sh->probe_due) {
        sh->probe_due = 1;
        hub_rbroker_schedule_flush(b);
    }
    return 0;
}

int hub_rbroker_publish(struct hub_broker *hb, const char *channel, size_t len,
                        struct hub_msg *m, const struct hub_channel_opts *o,
                        hub_broker_publish_cb cb, void *ud)
{
    struct rbroker *b = (struct rbroker *)hb;
    if (b->stopped)
        return refuse(b, REF_DOWN);
    if (o && o->history_size)
        return hub_rbroker_stream_publish(b, channel, len, m, o, cb, ud);
    return publish_send(b, channel, len, m, NULL, cb, ud);
}

int hub_rbroker_publish_call(struct rbroker *b, const char *channel, size_t len,
                             struct hub_rcall *c, hub_broker_publish_cb cb, void *ud)
{
    return publish_send(b, channel, len, NULL, c, cb, ud);
}

/* ------------------------------------------------------------------ */
/* Probes                                                             */
/* ------------------------------------------------------------------ */

static void on_probe_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;
    struct pending *p = privdata;
    struct rconn *rc = p->rc;
    struct shard *sh = rc->sh;
    redisReply *r = reply;
    int gone = 0;
    hub_list_remove(&p->link);
    if (r && p->seq) {
        if (r->type == REDIS_REPLY_ERROR)
            warn_limited(rc, "probe PUBLISH", r->str);
        else if (r->type == REDIS_REPLY_INTEGER && r->integer < 1)
            gone = sub_believed_up(sh, p->gen);
    }
    free(p);
    if (gone)
        hub_rbroker_conn_drop(&sh->sub, "the probe PUBLISH reached no subscriber",
                              HUB_LOG_WARN, LOST_NOT_SUBSCRIBED);
}

/* Sends probe number probe_sent + 1 (PUBLISH on cmd, its echo awaited on
 * sub, both under command_timeout_ms), or with `ping` a PING on cmd only.
 * Both connections (cmd only for a PING) must be up. */
void hub_rbroker_probe_send(struct shard *sh, int ping)
{
    struct rbroker *b = sh->b;
    struct rconn *cmd = &sh->cmd;
    struct pending *p = hub_rbroker_pending_new(sh, P_PROBE, 0);
    int rv;
    if (ping) {
        rv = redisAsyncCommand(cmd->ac, on_probe_reply, p, "PING");
    } else {
        char num[24];
        p->seq = sh->probe_sent + 1;
        int nl = snprintf(num, sizeof(num), "%llu", (unsigned long long)p->seq);
        hub_buf_reset(&b->key);
        hub_buf_append(&b->key, b->prefix, b->plen);
        hub_buf_append(&b->key, b->probe, b->probe_len);
        const char *argv[3] = {"PUBLISH", b->key.p, num};
        size_t argl[3] = {7, b->key.len, (size_t)nl};
        rv = redisAsyncCommandArgv(cmd->ac, on_probe_reply, p, 3, argv, argl);
    }
    if (rv != REDIS_OK) {
        free(p);                /* the context is going away */
        return;
    }
    hub_rbroker_pending_push(cmd, p);
    if (ping)
        return;
    sh->probe_sent = p->seq;
    b->probes++;
    struct pending *e = hub_rbroker_pending_new(sh, P_ECHO, 0);
    e->seq = p->seq;
    e->deadline_ms = p->deadline_ms;
    hub_rbroker_pending_push(&sh->sub, e);
    sh->echoes++;
}

/* Every PROBE_INTERVAL_MS: a Redis that stopped answering (SIGSTOP, a
 * network partition) is noticed even without traffic, within the interval
 * plus command_timeout_ms. One probe in flight per shard at most; when sub
 * is down, a PING keeps watching cmd. */
void hub_rbroker_on_live(uv_timer_t *t)
{
    struct rbroker *b = t->data;
    for (uint32_t i = 0; i < b->n && !b->stopped; i++) {
        struct shard *sh = &b->shards[i];
        if (links_up(sh)) {
            if (sh->echoes == 0)
                hub_rbroker_probe_send(sh, 0);
        } else if (sh->cmd.state == C_UP && sh->cmd.ac && hub_list_empty(&sh->cmd.pending)) {
            hub_rbroker_probe_send(sh, 1);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Generic commands (registry) and script calls (history, presence)  */
/* ------------------------------------------------------------------ */

/* Copies a hiredis reply into `out` (nested arrays get their own
 * allocations; free with reply_free). */
static void reply_conv(const redisReply *r, struct hub_broker_reply *out)
{
    memset(out, 0, sizeof(*out));
    switch (r->type) {
    case REDIS_REPLY_INTEGER:
        out->type = HUB_REPLY_INTEGER;
        out->integer = r->integer;
        break;
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR:
        out->type = r->type == REDIS_REPLY_STRING   ? HUB_REPLY_STRING
                    : r->type == REDIS_REPLY_STATUS ? HUB_REPLY_STATUS
                                                    : HUB_REPLY_ERROR;
        out->str = r->str;      /* lives as long as the hiredis reply */
        out->len = r->len;
        break;
    case REDIS_REPLY_ARRAY: {
        out->type = HUB_REPLY_ARRAY;
        out->n = r->elements;
        if (r->elements) {
            struct hub_broker_reply *e = hub_xcalloc(r->elements, sizeof(*e));
            for (size_t i = 0; i < r->elements; i++)
                reply_conv(r->element[i], &e[i]);
            out->elem = e;
        }
        break;
    }
    default:
        out->type = HUB_REPLY_NIL;
        break;
    }
}

static void reply_free(struct hub_broker_reply *r)
{
    if (r->type != HUB_REPLY_ARRAY || !r->elem)
        return;
    struct hub_broker_reply *e = (struct hub_broker_reply *)r->elem;
    for (size_t i = 0; i < r->n; i++)
        reply_free(&e[i]);
    free(e);
}

static void on_command_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct pending *p = pending_finish(privdata);
    struct rbroker *b = p->rc->sh->b;
    redisReply *r = reply;
    if (r && call_retry(ac, p, r, on_command_reply))
        return;
    hub_broker_reply_cb cb = p->rcb;
    hub_rcall_cb ccb = p->ccb;
    void *ud = p->ud;
    hub_rbroker_pending_free(p);
    if (!r) {
        b->command_errors++;
        if (cb)
            cb(ud, HUB_EUNAVAILABLE, NULL);
        if (ccb)
            ccb(ud, HUB_EUNAVAILABLE, NULL);
        return;
    }
    b->commands++;
    if (ccb)
        ccb(ud, HUB_OK, r);
    if (!cb)
        return;
    struct hub_broker_reply out;
    reply_conv(r, &out);
    cb(ud, HUB_OK, &out);
    reply_free(&out);
}

/* Sends a command on the command connection of `sh`: argv/lens, or the
 * script call `c` (owned from now on); the answer goes to `rcb` (converted)
 * or `ccb` (as hiredis gave it). */
static int command_send(struct shard *sh, int argc, const char **argv, const size_t *lens,
                        struct hub_rcall *c, hub_broker_reply_cb rcb, hub_rcall_cb ccb,
                        void *ud)
{
    struct rbroker *b = sh->b;
    struct rconn *rc = &sh->cmd;
    size_t bytes = 0;
    if (c)
        bytes = c->buf.len + 16 * (size_t)c->argc;
    for (int i = 0; i < argc; i++)
        bytes += lens[i] + 16;          /* + RESP framing */
    if (b->stopped || rc->state != C_UP || !rc->ac || over_cap(sh, rc, bytes))
        goto fail;
    struct pending *p = hub_rbroker_pending_new(sh, P_COMMAND, bytes);
    p->rcb = rcb;
    p->ccb = ccb;
    p->ud = ud;
    p->call = c;
    c = NULL;
    int rv = p->call ? call_send(rc, p->call, 0, on_command_reply, p)
                     : redisAsyncCommandArgv(rc->ac, on_command_reply, p, argc, argv, lens);
    if (rv != REDIS_OK) {
        hub_rbroker_pending_free(p);
        goto fail;
    }
    rc->npending++;
    rc->pending_bytes += bytes;
    hub_rbroker_pending_push(rc, p);
    return 0;
fail:
    if (c)
        hub_rbroker_call_free(c);
    b->command_errors++;
    return HUB_EUNAVAILABLE;
}

int hub_rbroker_command(struct hub_broker *hb, int argc, const char **argv,
                        const size_t *lens, hub_broker_reply_cb cb, void *ud)
{
    struct rbroker *b = (struct rbroker *)hb;
    if (argc < 1) {
        b->command_errors++;
        return HUB_EUNAVAILABLE;
    }
    return command_send(&b->shards[0], argc, argv, lens, NULL, cb, NULL, ud);
}

/* ------------------------------------------------------------------ */
/* Script calls                                                       */
/* ------------------------------------------------------------------ */

struct hub_rcall *hub_rbroker_call_new(int script)
{
    struct hub_rcall *c = hub_xcalloc(1, sizeof(*c));
    c->script = script;
    return c;
}

void hub_rbroker_call_arg(struct hub_rcall *c, const void *p, size_t len)
{
    if ((size_t)c->argc == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 16;
        c->off = hub_xrealloc(c->off, c->cap * sizeof(*c->off));
        c->len = hub_xrealloc(c->len, c->cap * sizeof(*c->len));
    }
    c->off[c->argc] = c->buf.len;
    c->len[c->argc] = len;
    hub_buf_append(&c->buf, p, len);
    c->argc++;
}

void hub_rbroker_call_argf(struct hub_rcall *c, const char *fmt, ...)
{
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    hub_rbroker_call_arg(c, tmp, n < 0 ? 0 : (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

void hub_rbroker_call_key(struct hub_rcall *c, const struct rbroker *b, const char *kind,
                          const char *name, size_t len)
{
    size_t kl = strlen(kind);
    hub_rbroker_call_arg(c, b->prefix, b->plen);
    /* one argument: grow the last one */
    hub_buf_append(&c->buf, kind, kl);
    hub_buf_append(&c->buf, name, len);
    c->len[c->argc - 1] += kl + len;
}

void hub_rbroker_call_free(struct hub_rcall *c)
{
    hub_buf_free(&c->buf);
    free(c->off);
    free(c->len);
    free(c);
}

/* EVALSHA <sha> <args...>, or with `eval` EVAL <script> <args...>. Returns
 * what hiredis returns. */
static int call_send(struct rconn *rc, struct hub_rcall *c, int eval, redisCallbackFn *fn,
                     void *privdata)
{
    struct rbroker *b = rc->sh->b;
    size_t n = (size_t)c->argc + 2;
    const char **argv = hub_xmalloc(n * sizeof(*argv));
    size_t *argl = hub_xmalloc(n * sizeof(*argl));
    const char *text = hub_rbroker_script_text(c->script);
    argv[0] = eval ? "EVAL" : "EVALSHA";
    argl[0] = eval ? 4 : 7;
    argv[1] = eval ? text : b->sha[c->script];
    argl[1] = strlen(argv[1]);
    for (int i = 0; i < c->argc; i++) {
        argv[i + 2] = c->buf.p + c->off[i];
        argl[i + 2] = c->len[i];
    }
    int rv = redisAsyncCommandArgv(rc->ac, fn, privdata, (int)n, argv, argl);
    free(argv);
    free(argl);
    return rv;
}

int hub_rbroker_call(struct shard *sh, struct hub_rcall *c, hub_rcall_cb cb, void *ud)
{
    return command_send(sh, 0, NULL, NULL, c, NULL, cb, ud);
}

/* ------------------------------------------------------------------ */
/* Metrics                                                            */
/* ------------------------------------------------------------------ */

void hub_rbroker_metrics(const struct hub_broker *hb, struct hub_buf *out)
{
    const struct rbroker *b = (const struct rbroker *)hb;
    char labels[320];           /* a server label is host:port, up to 280 bytes */
    unsigned pending = 0;

    hub_metric_one(out, "luahub_broker_up", "gauge",
                   "1 when every Redis server is connected and subscribed.",
                   !b->stopped && b->up);
    hub_metric_family(out, "luahub_broker_server_up", "gauge",
                      "1 when both connections to this Redis server are ready.");
    for (uint32_t i = 0; i < b->n; i++) {
        const struct shard *sh = &b->shards[i];
        snprintf(labels, sizeof(labels), "server=\"%s\"", sh->label);
        hub_metric_value(out, "luahub_broker_server_up", labels, !b->stopped && sh->up);
        pending += sh->cmd.npending;
    }
    hub_metric_family(out, "luahub_broker_publish_refused_total", "counter",
                      "Publishes answered unavailable by this hub's rules: down (command "
                      "connection not ready), pubsub_down (subscriber connection not "
                      "subscribed), over_cap, not_received (Redis took it but this hub's own "
                      "subscription did not get it back).");
    for (int i = 0; i < REF_N; i++) {
        snprintf(labels, sizeof(labels), "reason=\"%s\"", ref_name[i]);
        hub_metric_value(out, "luahub_broker_publish_refused_total", labels, b->refused[i]);
    }
    hub_metric_family(out, "luahub_broker_link_lost_total", "counter",
                      "Established Redis connections lost: closed (by Redis or the network), "
                      "timeout (a command, subscription or probe not answered in time), "
                      "not_subscribed (a PUBLISH or probe reached no subscriber while this "
                      "hub was subscribed).");
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < LOST_N; i++) {
            snprintf(labels, sizeof(labels), "link=\"%s\",cause=\"%s\"",
                     k == ROLE_CMD ? "cmd" : "pubsub", lost_name[i]);
            hub_metric_value(out, "luahub_broker_link_lost_total", labels, b->lost[k][i]);
        }
    hub_metric_one(out, "luahub_broker_probes_total", "counter",
                   "Probe PUBLISHes sent (acknowledgement and liveness).", b->probes);
    hub_metric_one(out, "luahub_broker_reconnects_total", "counter",
                   "Redis connections re-established after a loss.", b->reconnects);
    hub_metric_one(out, "luahub_broker_publishes_total", "counter",
                   "PUBLISHes accepted by Redis.", b->publishes);
    hub_metric_one(out, "luahub_broker_publish_errors_total", "counter",
                   "Publishes that failed (unavailable, over the cap, timed out, Redis error).",
                   b->publish_errors);
    hub_metric_one(out, "luahub_broker_pending_publishes", "gauge",
                   "PUBLISHes (and registry commands) awaiting a reply.", pending);
    hub_metric_one(out, "luahub_broker_channels", "gauge",
                   "Channels subscribed through the broker.", b->wanted);
    hub_metric_one(out, "luahub_broker_received_total", "counter",
                   "Messages received from Redis.", b->received);
    hub_metric_one(out, "luahub_broker_subscribe_commands_total", "counter",
                   "SUBSCRIBE and UNSUBSCRIBE commands sent (each carries up to 500 "
                   "channels).", b->subscribe_cmds);
    hub_metric_one(out, "luahub_broker_commands_total", "counter",
                   "Other commands (registry, history reads, presence) answered by Redis.",
                   b->commands);
    hub_metric_one(out, "luahub_broker_command_errors_total", "counter",
                   "Other commands that failed (unavailable, over the cap, timed out).",
                   b->command_errors);
    hub_metric_family(out, "luahub_broker_redis_rtt_seconds", "histogram",
                      "PUBLISH round trip (queued to reply).");
    hub_metric_hist(out, "luahub_broker_redis_rtt_seconds", NULL, &b->rtt);
    hub_rbroker_stream_metrics(b, out);
    hub_rbroker_presence_metrics(b, out);
}
