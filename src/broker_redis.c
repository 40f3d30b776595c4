/* The Redis broker: hiredis 0.14.1 async on the hub's libuv loop. This
 * file: channels and subscriptions, stop and free; redis_conn.c: the
 * connections' state machine; broker_redis_pub.c: publishing, probes and
 * acknowledgements, commands and script calls, metrics;
 * broker_redis_stream.c: history; broker_redis_presence.c: presence; their
 * shared state: broker_redis.h.
 *
 * Per Redis server (a "shard") two connections: `cmd` for PUBLISH, `sub` for
 * SUBSCRIBE/UNSUBSCRIBE. Each connection is a small state machine:
 *
 *   IDLE --timer--> RESOLVING --> CONNECTING --connect cb--> HANDSHAKE
 *     (AUTH, SELECT, PING pipelined) --last reply--> UP
 *   sub only: HANDSHAKE --> SYNCING (every wanted channel re-SUBSCRIBEd in
 *     batches) --last batch confirmed--> UP
 *   any failure or timeout --> IDLE with a backoff timer (100 ms doubling to
 *     5 s, +-20% jitter).
 *
 * One uv timer per connection is its retry timer (IDLE), its connect
 * deadline (RESOLVING..HANDSHAKE) or the deadline of its oldest outstanding
 * command (SYNCING, UP). hiredis 0.14.1 has no timeouts of its own
 * (docs/internals.md, "Redis: what an acknowledged publish means"): a
 * command that is not answered in time drops the whole connection, which
 * makes hiredis fail every pending callback once.
 *
 * Channels: each shard keeps a table of channels it has heard of. `want` is
 * what the hub asked for (subscribe/unsubscribe), `sent` what the last
 * command sent to Redis said. A change marks the channel dirty; a uv_idle
 * handle flushes every dirty channel once per loop iteration as SUBSCRIBE /
 * UNSUBSCRIBE commands of up to HUB_REDIS_BATCH names. A subscribe callback
 * waits for the confirmation of the SUBSCRIBE that covers it: the channel
 * counts SUBSCRIBEs sent and confirmed on the current connection, and a
 * waiter fires when `confirmed` reaches the number it needs. Redis answers
 * in order, so that is exact even for subscribe/unsubscribe/subscribe
 * pipelined before any answer.
 *
 * Acknowledged publishes (docs/internals.md): a publish is refused unless
 * both connections of its shard are up, the sub one with every wanted
 * channel subscribed. Every sub connection also subscribes a probe channel
 * of its own ("<prefix>!probe:<random>"). A PUBLISH to a channel this
 * broker has subscribed (and confirmed) is OK only once a probe PUBLISHed
 * after it on the same cmd connection has come back on the sub connection
 * that was up when it was sent: Redis runs one connection's commands in
 * order and writes one subscriber's messages in order, so our own copy
 * came before the probe. The probe goes out once per loop iteration for
 * all the publishes of that iteration (the uv_idle handle), pipelined
 * behind them: no extra round trip. Losing the sub connection fails what
 * waits for an echo. A PUBLISH or probe answered 0 while we were
 * subscribed means the sub connection is gone before its socket said so:
 * it is dropped at once. A timer sends a probe every second when nothing
 * is in flight (a PING on cmd while sub is down), so a Redis that stopped
 * answering is noticed without traffic.
 *
 * Re-entrancy: user callbacks (publish/subscribe completions, deliver,
 * health) may call back into the broker, including stop(). Code that fires
 * them first finishes its own bookkeeping, detaches what it is about to
 * fire into a local list, and touches nothing of the broker afterwards
 * unless it re-checks `stopped`. Contexts are detached (rc->ac = NULL,
 * ac->data = NULL) before we free them, so a late hiredis callback for a
 * context we gave up can recognise it and do nothing. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <hiredis/sds.h>

#include "broker_redis.h"
#include "registry_impl.h"
#include "luahub/log.h"
#include "luahub/msg.h"
#include "luahub/util.h"
#include "redis_uv.h"


const char *hub_rbroker_role_name(const struct rconn *rc)
{
    return rc->role == ROLE_CMD ? "cmd" : "pubsub";
}

uint64_t hub_rbroker_rnd(struct rbroker *b)
{
    /* xorshift64*: jitter only. */
    uint64_t x = b->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    b->rng = x;
    return x * 0x2545f4914f6cdd1dull;
}

/* ------------------------------------------------------------------ */
/* Waiters and health                                                   */
/* ------------------------------------------------------------------ */

void hub_rbroker_waiters_fire(struct waiter *w, int status)
{
    while (w) {
        struct waiter *next = w->next;
        hub_broker_subscribe_cb cb = w->cb;
        void *ud = w->ud;
        free(w);
        cb(ud, status);
        w = next;
    }
}

/* Moves every waiter of `c` to the front of the list `*out`. */
void hub_rbroker_waiters_take(struct rchan *c, struct waiter **out)
{
    if (!c->wh)
        return;
    c->wt->next = *out;
    *out = c->wh;
    c->wh = c->wt = NULL;
}

/* Re-evaluates the broker's health; calls the user back on a change. May
 * re-enter: call it after the caller's own bookkeeping. */
void hub_rbroker_health_update(struct rbroker *b)
{
    if (b->stopped)
        return;
    int up = 1;
    for (uint32_t i = 0; i < b->n; i++) {
        struct shard *sh = &b->shards[i];
        int sup = sh->cmd.state == C_UP && sh->sub.state == C_UP;
        if (sup != sh->up) {
            sh->up = sup;
            if (sup) {
                hub_log(HUB_LOG_INFO, "%s: connected", sh->tag);
                /* Redis may have lost what this process keeps there (a
                 * restart): refreshed now that our subscribers hear the
                 * joins of what comes back. */
                hub_rbroker_presence_resync(sh);
            } else {
                hub_log(HUB_LOG_WARN, "%s: down", sh->tag);
            }
        }
        up &= sup;
    }
    if (up != b->up) {
        b->up = up;
        if (b->base.health)
            b->base.health(b->base.ud, up);
    }
}

/* ------------------------------------------------------------------ */
/* Channel table                                                       */
/* ------------------------------------------------------------------ */

struct rchan *hub_rbroker_chan_find(struct shard *sh, const char *name, size_t len, uint64_t h)
{
    for (struct hub_hnode *n = hub_htable_chain(&sh->chans, h); n; n = n->next) {
        struct rchan *c = hub_container_of(n, struct rchan, node);
        if (n->hash == h && c->len == len && !memcmp(c->name, name, len))
            return c;
    }
    return NULL;
}

#define chan_find hub_rbroker_chan_find

static struct rchan *chan_get(struct shard *sh, const char *name, size_t len, uint64_t h)
{
    struct rchan *c = chan_find(sh, name, len, h);
    if (c)
        return c;
    c = hub_xcalloc(1, sizeof(*c) + len + 1);
    memcpy(c->name, name, len);
    c->name[len] = '\0';
    c->node.hash = h;
    c->len = len;
    hub_htable_insert(&sh->chans, &c->node);
    return c;
}

static void chan_free(struct shard *sh, struct rchan *c)
{
    hub_htable_remove(&sh->chans, &c->node);
    free(c);
}

/* Frees the entry when nothing refers to it any more. */
void hub_rbroker_chan_maybe_free(struct shard *sh, struct rchan *c)
{
    if (!c->want && !c->sent && !c->dirty && c->outstanding == 0 && !c->wh)
        chan_free(sh, c);
}

/* Appends `c` to the shard's channels to (un)subscribe, once. */
static void dirty_push(struct shard *sh, struct rchan *c)
{
    c->dirty = 1;
    c->dnext = NULL;
    if (sh->dirty_tail)
        sh->dirty_tail->dnext = c;
    else
        sh->dirty_head = c;
    sh->dirty_tail = c;
}

static void chan_mark_dirty(struct shard *sh, struct rchan *c)
{
    if (c->dirty)
        return;
    dirty_push(sh, c);
    hub_rbroker_schedule_flush(sh->b);
}

/* The subscriber connection is gone: nothing is subscribed any more. Takes
 * every waiter into `*out` (to fail them) and forgets channels nobody
 * wants. The wanted ones are re-subscribed by the next sync. */
void hub_rbroker_chans_reset(struct shard *sh, struct waiter **out)
{
    struct rchan *dead = NULL;
    for (size_t i = 0; i < sh->chans.nb; i++) {
        for (struct hub_hnode *n = sh->chans.b[i]; n; n = n->next) {
            struct rchan *c = hub_container_of(n, struct rchan, node);
            hub_rbroker_waiters_take(c, out);
            c->sent = 0;
            c->dirty = 0;
            c->subs_sent = c->subs_confirmed = c->outstanding = 0;
            if (!c->want) {
                c->dnext = dead;
                dead = c;
            }
        }
    }
    sh->dirty_head = sh->dirty_tail = NULL;
    /* Removal may shrink the bucket array: not while iterating it. */
    while (dead) {
        struct rchan *next = dead->dnext;
        chan_free(sh, dead);
        dead = next;
    }
}

/* ------------------------------------------------------------------ */
/* Subscriptions                                                       */
/* ------------------------------------------------------------------ */

/* Sends one SUBSCRIBE or UNSUBSCRIBE for b->batch[0..n). Returns 0, or -1
 * when hiredis refused (the context is going away; the next sync redoes
 * it). */
static int batch_send(struct rconn *rc, int subscribe, size_t n, int sync)
{
    struct rbroker *b = rc->sh->b;
    b->argv[0] = subscribe ? "SUBSCRIBE" : "UNSUBSCRIBE";
    b->argl[0] = subscribe ? 9 : 11;
    for (size_t i = 0; i < n; i++) {
        b->argv[i + 1] = b->names.p + b->name_off[i];
        b->argl[i + 1] = b->plen + b->batch[i]->len;
    }
    /* hiredis keeps one callback per channel for SUBSCRIBE (confirmation,
     * messages, and the UNSUBSCRIBE confirmation); UNSUBSCRIBE ignores it. */
    if (redisAsyncCommandArgv(rc->ac, hub_rbroker_on_sub_reply, rc, (int)n + 1, b->argv, b->argl) !=
        REDIS_OK)
        return -1;
    b->subscribe_cmds++;
    for (size_t i = 0; i < n; i++) {
        struct rchan *c = b->batch[i];
        if (subscribe) {
            c->sent = 1;
            c->subs_sent++;
        } else {
            c->sent = 0;
            rc->sh->unsubs_sent++;
        }
        c->outstanding++;
    }
    struct pending *p = hub_rbroker_pending_new(rc->sh, P_BATCH, 0);
    p->left = (unsigned)n;
    p->sync = sync;
    hub_rbroker_pending_push(rc, p);
    if (sync)
        rc->sync_left++;
    return 0;
}

/* Sends what the dirty channels of one direction need, in batches. */
static void flush_dir(struct shard *sh, struct rchan *list, int subscribe, int sync)
{
    struct rbroker *b = sh->b;
    struct rconn *rc = &sh->sub;
    size_t n = 0;
    hub_buf_reset(&b->names);
    for (struct rchan *c = list; c; c = c->dnext) {
        b->name_off[n] = b->names.len;
        hub_buf_append(&b->names, b->prefix, b->plen);
        hub_buf_append(&b->names, c->name, c->len);
        b->batch[n++] = c;
        if (n == HUB_REDIS_BATCH || !c->dnext) {
            if (batch_send(rc, subscribe, n, sync) < 0)
                return;
            n = 0;
            hub_buf_reset(&b->names);
        }
    }
}

/* Turns the dirty list into commands (or, with the subscriber connection
 * down, just forgets what nobody wants: the next sync subscribes the rest).
 * Fires no user callback. */
static void flush_shard_sync(struct shard *sh, int sync)
{
    struct rconn *rc = &sh->sub;
    struct rchan *list = sh->dirty_head, *subs = NULL, *subs_tail = NULL, *unsubs = NULL,
                 *unsubs_tail = NULL, *dead = NULL;
    sh->dirty_head = sh->dirty_tail = NULL;
    int live = rc->ac && (rc->state == C_SYNCING || rc->state == C_UP);
    while (list) {
        struct rchan *c = list;
        list = c->dnext;
        c->dirty = 0;
        c->dnext = NULL;
        if (live && c->want && !c->sent) {
            if (subs_tail)
                subs_tail->dnext = c;
            else
                subs = c;
            subs_tail = c;
        } else if (live && !c->want && c->sent) {
            if (unsubs_tail)
                unsubs_tail->dnext = c;
            else
                unsubs = c;
            unsubs_tail = c;
        } else if (!c->want) {
            c->dnext = dead;
            dead = c;
        }
    }
    while (dead) {
        struct rchan *next = dead->dnext;
        hub_rbroker_chan_maybe_free(sh, dead);
        dead = next;
    }
    if (unsubs)
        flush_dir(sh, unsubs, 0, sync);
    if (subs)
        flush_dir(sh, subs, 1, sync);
}

void hub_rbroker_flush_shard(struct shard *sh)
{
    flush_shard_sync(sh, 0);
}

static void on_idle(uv_idle_t *h)
{
    struct rbroker *b = h->data;
    uv_idle_stop(h);
    b->idle_active = 0;
    for (uint32_t i = 0; i < b->n; i++) {
        struct shard *sh = &b->shards[i];
        if (sh->dirty_head)
            hub_rbroker_flush_shard(sh);
        if (!hub_list_empty(&sh->pops) || sh->pres_due)
            hub_rbroker_presence_flush(sh);
        /* The probe behind this iteration's publishes (if a connection went
         * down since, those publishes fail on their own). */
        if (sh->probe_due) {
            sh->probe_due = 0;
            if (links_up(sh))
                hub_rbroker_probe_send(sh, 0);
        }
    }
}

void hub_rbroker_schedule_flush(struct rbroker *b)
{
    /* An idle handle runs once per loop iteration and keeps the poll from
     * blocking, so everything changed in this iteration (or in this timer
     * phase) goes out together, without waiting for the next I/O. */
    if (!b->idle_active && !b->stopped) {
        uv_idle_start(&b->idle, on_idle);
        b->idle_active = 1;
    }
}

/* Called on the connected subscriber connection: subscribe every wanted
 * channel again, then go UP when all of it is confirmed. */
void hub_rbroker_sync_start(struct rconn *rc)
{
    struct shard *sh = rc->sh;
    rc->state = C_SYNCING;
    rc->sync_left = 0;
    for (size_t i = 0; i < sh->chans.nb; i++)
        for (struct hub_hnode *n = sh->chans.b[i]; n; n = n->next) {
            struct rchan *c = hub_container_of(n, struct rchan, node);
            if (c->want && !c->dirty)
                dirty_push(sh, c);
        }
    flush_shard_sync(sh, 1);
    if (rc->sync_left == 0)
        rc->state = C_UP;
}

/* One (un)subscribe confirmation: counts it against the oldest batch
 * (probe echoes may sit before it in the list: they complete in their own
 * order). */
void hub_rbroker_batch_ack(struct rconn *rc)
{
    struct pending *p = NULL;
    struct hub_list *n;
    for (n = rc->pending.next; n != &rc->pending && !p; n = n->next)
        if (hub_container_of(n, struct pending, link)->kind == P_BATCH)
            p = hub_container_of(n, struct pending, link);
    if (!p)
        return;
    if (--p->left > 0)
        return;
    hub_list_remove(&p->link);
    if (p->sync && rc->sync_left > 0 && --rc->sync_left == 0 && rc->state == C_SYNCING)
        rc->state = C_UP;
    free(p);
}

void hub_rbroker_on_sub_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct rconn *rc = privdata;
    redisReply *r = reply;
    if (!r || rc->ac != ac)
        return;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_STRING)
        return;
    struct shard *sh = rc->sh;
    struct rbroker *b = sh->b;
    const char *kind = r->element[0]->str;
    const char *name = r->element[1]->str;
    size_t nlen = r->element[1]->len;
    struct rchan *c = NULL;
    if (nlen >= b->plen && memcmp(name, b->prefix, b->plen) == 0) {
        name += b->plen;
        nlen -= b->plen;
        c = chan_find(sh, name, nlen, hub_hash64(name, nlen));
    }

    if (strcmp(kind, "message") == 0) {
        if (!c || !c->want || r->element[2]->type != REDIS_REPLY_STRING)
            return;
        if (c->control) {
            if (b->control_fn)
                b->control_fn(b->control_ud, r->element[2]->str, r->element[2]->len);
            return;
        }
        if (c->probe) {
            hub_rbroker_probe_echo(sh, r->element[2]->str, r->element[2]->len);
            return;
        }
        b->received++;
        /* A history delivery: its epoch and offset come with it. */
        if (r->element[2]->len && r->element[2]->str[0] == HUB_RFRAME_MARK &&
            hub_rbroker_stream_message(sh, name, nlen, r->element[2]->str,
                                       r->element[2]->len) == 0)
            return;
        struct hub_msg *m = hub_msg_text(r->element[2]->str, r->element[2]->len);
        /* `name` lives in the reply, not in the entry: deliver may make the
         * entry go away (a culled subscriber unsubscribes). */
        b->base.deliver(b->base.ud, name, nlen, m, NULL);
        hub_msg_unref(m);
        return;
    }

    int was_up = rc->state == C_UP;
    struct waiter *ready = NULL, **tail = &ready;
    if (strcmp(kind, "subscribe") == 0) {
        hub_rbroker_batch_ack(rc);
        if (c) {
            c->subs_confirmed++;
            if (c->outstanding)
                c->outstanding--;
            while (c->wh && c->wh->target <= c->subs_confirmed) {
                struct waiter *w = c->wh;
                c->wh = w->next;
                if (!c->wh)
                    c->wt = NULL;
                w->next = NULL;
                *tail = w;
                tail = &w->next;
            }
        }
    } else if (strcmp(kind, "unsubscribe") == 0) {
        hub_rbroker_batch_ack(rc);
        if (c) {
            if (c->outstanding)
                c->outstanding--;
            hub_rbroker_chan_maybe_free(sh, c);
        }
    } else {
        return;
    }
    if (!was_up && rc->state == C_UP)
        hub_rbroker_health_update(b);
    hub_rbroker_waiters_fire(ready, HUB_OK);
}

/* ------------------------------------------------------------------ */
/* subscribe, unsubscribe, control                                     */
/* ------------------------------------------------------------------ */

/* What a channel of the table is: a hub channel, or one of ours (not
 * counted in the channels metric): the control channel (messages go to
 * control_fn) or the probe channel (messages are probe echoes). */
enum { CH_HUB, CH_CONTROL, CH_PROBE };

/* subscribe() on shard `sh` for a channel of kind CH_*. */
static void subscribe_on(struct rbroker *b, struct shard *sh, const char *channel, size_t len,
                         int kind, hub_broker_subscribe_cb cb, void *ud)
{
    if (b->stopped) {
        if (cb)
            cb(ud, HUB_EUNAVAILABLE);
        return;
    }
    struct rchan *c = chan_get(sh, channel, len, hub_hash64(channel, len));
    if (!c->want) {
        c->want = 1;
        c->control = kind == CH_CONTROL;
        c->probe = kind == CH_PROBE;
        if (kind == CH_HUB)
            b->wanted++;
    }
    if (!c->sent)
        chan_mark_dirty(sh, c);
    if (!cb)
        return;
    struct rconn *rc = &sh->sub;
    if (!rc->ac || (rc->state != C_SYNCING && rc->state != C_UP)) {
        /* Fail fast; the channel stays wanted and the next sync subscribes
         * it. */
        cb(ud, HUB_EUNAVAILABLE);
        return;
    }
    uint32_t target = c->sent ? c->subs_sent : c->subs_sent + 1;
    if (c->sent && c->subs_confirmed >= target) {
        cb(ud, HUB_OK);
        return;
    }
    struct waiter *w = hub_xmalloc(sizeof(*w));
    w->next = NULL;
    w->cb = cb;
    w->ud = ud;
    w->target = target;
    if (c->wt)
        c->wt->next = w;
    else
        c->wh = w;
    c->wt = w;
}

static void r_subscribe(struct hub_broker *hb, const char *channel, size_t len,
                        hub_broker_subscribe_cb cb, void *ud)
{
    struct rbroker *b = (struct rbroker *)hb;
    subscribe_on(b, shard_of(b, channel, len), channel, len, CH_HUB, cb, ud);
}

static void unsubscribe_on(struct rbroker *b, struct shard *sh, const char *channel, size_t len)
{
    if (b->stopped)
        return;
    struct rchan *c = chan_find(sh, channel, len, hub_hash64(channel, len));
    if (!c || !c->want)
        return;
    c->want = 0;
    if (!c->control && !c->probe)
        b->wanted--;
    struct waiter *canceled = NULL;
    hub_rbroker_waiters_take(c, &canceled);
    /* The flush sends UNSUBSCRIBE if a SUBSCRIBE went out, else forgets
     * the entry once no confirmation is outstanding. */
    chan_mark_dirty(sh, c);
    hub_rbroker_waiters_fire(canceled, HUB_ECANCELED);
}

static void r_unsubscribe(struct hub_broker *hb, const char *channel, size_t len)
{
    struct rbroker *b = (struct rbroker *)hb;
    unsubscribe_on(b, shard_of(b, channel, len), channel, len);
}

void hub_rbroker_control(struct hub_broker *hb, hub_broker_control_fn fn, void *ud)
{
    struct rbroker *b = (struct rbroker *)hb;
    static const char name[] = HUB_BROKER_CONTROL_CHANNEL;
    b->control_fn = fn;
    b->control_ud = ud;
    if (fn)
        subscribe_on(b, &b->shards[0], name, sizeof(name) - 1, CH_CONTROL, NULL, NULL);
    else
        unsubscribe_on(b, &b->shards[0], name, sizeof(name) - 1);
}

/* ------------------------------------------------------------------ */
/* up, stop and free                                                   */
/* ------------------------------------------------------------------ */

static int r_up(const struct hub_broker *hb)
{
    const struct rbroker *b = (const struct rbroker *)hb;
    return !b->stopped && b->up;
}

static void on_handle_closed(uv_handle_t *h)
{
    struct rbroker *b = h->data;
    b->open_handles--;
}

static void r_stop(struct hub_broker *hb)
{
    struct rbroker *b = (struct rbroker *)hb;
    if (b->stopped)
        return;
    b->stopped = 1;
    b->up = 0;
    b->idle.data = b;
    uv_close((uv_handle_t *)&b->idle, on_handle_closed);
    b->idle_active = 0;
    b->live.data = b;
    uv_close((uv_handle_t *)&b->live, on_handle_closed);
    b->pres_timer.data = b;
    uv_close((uv_handle_t *)&b->pres_timer, on_handle_closed);

    struct waiter *failed = NULL;
    struct hub_list unacked;
    hub_list_init(&unacked);
    for (uint32_t i = 0; i < b->n; i++) {
        struct shard *sh = &b->shards[i];
        hub_rbroker_acks_take(sh, UINT64_MAX, &unacked);
        struct rconn *rcs[2] = {&sh->cmd, &sh->sub};
        for (int k = 0; k < 2; k++) {
            struct rconn *rc = rcs[k];
            rc->timer.data = b;
            uv_close((uv_handle_t *)&rc->timer, on_handle_closed);
            if (rc->gai_active) {
                rc->gai_stale = 1;
                uv_cancel((uv_req_t *)&rc->gai);
            }
            if (rc->role == ROLE_SUB)
                hub_rbroker_sub_pending_clear(rc);
            rc->state = C_STOPPED;
        }
        hub_rbroker_chans_reset(sh, &failed);
    }
    /* Free the contexts last: their pending PUBLISH callbacks run now (or
     * right after the hiredis callback we are in) with UNAVAILABLE, and
     * may call back into a broker that is already consistently stopped. */
    for (uint32_t i = 0; i < b->n; i++) {
        struct shard *sh = &b->shards[i];
        struct rconn *rcs[2] = {&sh->cmd, &sh->sub};
        for (int k = 0; k < 2; k++) {
            redisAsyncContext *ac = rcs[k]->ac;
            rcs[k]->ac = NULL;
            if (ac) {
                ac->data = NULL;
                redisAsyncFree(ac);
            }
        }
    }
    hub_rbroker_waiters_fire(failed, HUB_EUNAVAILABLE);
    hub_rbroker_acks_fire(b, &unacked, HUB_EUNAVAILABLE);
}

static void r_free(struct hub_broker *hb)
{
    struct rbroker *b = (struct rbroker *)hb;
    if (!b)
        return;
    if (!b->stopped) {
        hub_log(HUB_LOG_ERROR, "redis broker freed without stop(): stopping it and leaking it");
        r_stop(hb);
        return;
    }
    if (b->open_handles) {
        hub_log(HUB_LOG_ERROR,
                "redis broker freed with %u handles still open (run the loop after stop()): "
                "leaking it",
                b->open_handles);
        return;
    }
    for (uint32_t i = 0; i < b->n; i++) {
        struct shard *sh = &b->shards[i];
        struct hub_hnode *n;
        while ((n = hub_htable_pop(&sh->chans)))
            free(hub_container_of(n, struct rchan, node));
        hub_htable_free(&sh->chans);
        free(sh->url.host);
        free(sh->url.user);
        free(sh->url.password);
    }
    hub_rbroker_presence_free(b);
    free(b->shards);
    free(b->prefix);
    hub_buf_free(&b->key);
    hub_buf_free(&b->names);
    free(b);
}

static const struct hub_broker_ops redis_ops = {
    .name = "redis",
    .publish = hub_rbroker_publish,
    .history = hub_rbroker_history,
    .presence_add = hub_rbroker_presence_add,
    .presence_remove = hub_rbroker_presence_remove,
    .presence = hub_rbroker_presence,
    .subscribe = r_subscribe,
    .unsubscribe = r_unsubscribe,
    .command = hub_rbroker_command,
    .up = r_up,
    .metrics = hub_rbroker_metrics,
    .stop = r_stop,
    .free = r_free,
    .registry_new = hub_registry_redis_new,
};

static void rconn_init(struct rbroker *b, struct shard *sh, struct rconn *rc, int role)
{
    rc->sh = sh;
    rc->role = role;
    rc->state = C_IDLE;
    rc->backoff_ms = BACKOFF_MIN_MS;
    hub_list_init(&rc->pending);
    uv_timer_init(b->base.loop, &rc->timer);
    rc->timer.data = rc;
    b->open_handles++;
    /* First attempt on the first loop iteration, not inside the
     * constructor. */
    hub_rbroker_timer_arm(rc, 0);
}

struct hub_broker *hub_broker_redis_new(uv_loop_t *loop, struct hub_redis_url *urls, size_t n,
                                        const char *prefix, hub_broker_deliver_fn deliver,
                                        hub_broker_health_fn health, void *ud)
{
    struct rbroker *b = hub_xcalloc(1, sizeof(*b));
    b->base.ops = &redis_ops;
    b->base.loop = loop;
    b->base.deliver = deliver;
    b->base.health = health;
    b->base.ud = ud;
    b->prefix = hub_xstrdup(prefix);
    b->plen = strlen(prefix);
    hub_hist_init(&b->rtt, hub_hist_bounds_rtt, hub_countof(hub_hist_bounds_rtt));
    b->rng = hub_now_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)b;
    if (!b->rng)
        b->rng = 1;
    b->n = (uint32_t)n;
    b->shards = hub_xcalloc(n, sizeof(*b->shards));
    uv_idle_init(loop, &b->idle);
    b->idle.data = b;
    b->open_handles++;
    uv_timer_init(loop, &b->live);
    b->live.data = b;
    b->open_handles++;
    uv_timer_start(&b->live, hub_rbroker_on_live, PROBE_INTERVAL_MS, PROBE_INTERVAL_MS);
    hub_rbroker_presence_init(b);
    /* Our probe channel: '!' cannot occur in hub channel names, and the
     * random part keeps other processes' probes out. */
    int pl = snprintf(b->probe, sizeof(b->probe), "!probe:%016llx",
                      (unsigned long long)hub_rbroker_rnd(b));
    b->probe_len = (size_t)pl;
    for (size_t i = 0; i < n; i++) {
        struct shard *sh = &b->shards[i];
        sh->b = b;
        hub_list_init(&sh->acks);
        hub_list_init(&sh->pops);
        sh->url = urls[i];          /* takes the strings */
        int v6 = strchr(sh->url.host, ':') != NULL;
        snprintf(sh->label, sizeof(sh->label), "%s%s%s:%d", v6 ? "[" : "", sh->url.host,
                 v6 ? "]" : "", sh->url.port);
        snprintf(sh->tag, sizeof(sh->tag), "redis %s", sh->label);
        rconn_init(b, sh, &sh->cmd, ROLE_CMD);
        rconn_init(b, sh, &sh->sub, ROLE_SUB);
        subscribe_on(b, sh, b->probe, b->probe_len, CH_PROBE, NULL, NULL);
    }
    free(urls);                     /* the array only */
    return &b->base;
}
