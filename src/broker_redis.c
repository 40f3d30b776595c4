/* The Redis broker: hiredis 0.14.1 async on the hub's libuv loop. This
 * file: connections, subscriptions, stop and free; broker_redis_pub.c:
 * publishing, probes and acknowledgements, commands, metrics; their shared
 * state: broker_redis.h.
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

static void conn_start(struct rconn *rc);
static void conn_fail(struct rconn *rc, const char *why, int level, int cause);
static void flush_shard(struct shard *sh);
static void on_sub_reply(redisAsyncContext *ac, void *reply, void *privdata);

static const char *role_name(const struct rconn *rc)
{
    return rc->role == ROLE_CMD ? "cmd" : "pubsub";
}

static uint64_t rnd(struct rbroker *b)
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

static void waiters_fire(struct waiter *w, int status)
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
static void waiters_take(struct rchan *c, struct waiter **out)
{
    if (!c->wh)
        return;
    c->wt->next = *out;
    *out = c->wh;
    c->wh = c->wt = NULL;
}

/* Re-evaluates the broker's health; calls the user back on a change. May
 * re-enter: call it after the caller's own bookkeeping. */
static void health_update(struct rbroker *b)
{
    if (b->stopped)
        return;
    int up = 1;
    for (uint32_t i = 0; i < b->n; i++) {
        struct shard *sh = &b->shards[i];
        int sup = sh->cmd.state == C_UP && sh->sub.state == C_UP;
        if (sup != sh->up) {
            sh->up = sup;
            if (sup)
                hub_log(HUB_LOG_INFO, "%s: connected", sh->tag);
            else
                hub_log(HUB_LOG_WARN, "%s: down", sh->tag);
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
static void chan_maybe_free(struct shard *sh, struct rchan *c)
{
    if (!c->want && !c->sent && !c->dirty && c->outstanding == 0 && !c->wh)
        chan_free(sh, c);
}

static void chan_mark_dirty(struct shard *sh, struct rchan *c)
{
    if (c->dirty)
        return;
    c->dirty = 1;
    c->dnext = NULL;
    if (sh->dirty_tail)
        sh->dirty_tail->dnext = c;
    else
        sh->dirty_head = c;
    sh->dirty_tail = c;
    hub_rbroker_schedule_flush(sh->b);
}

/* The subscriber connection is gone: nothing is subscribed any more. Takes
 * every waiter into `*out` (to fail them) and forgets channels nobody
 * wants. The wanted ones are re-subscribed by the next sync. */
static void chans_reset(struct shard *sh, struct waiter **out)
{
    struct rchan *dead = NULL;
    for (size_t i = 0; i < sh->chans.nb; i++) {
        for (struct hub_hnode *n = sh->chans.b[i]; n; n = n->next) {
            struct rchan *c = hub_container_of(n, struct rchan, node);
            waiters_take(c, out);
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
/* Pending list                                                        */
/* ------------------------------------------------------------------ */

static void on_timer(uv_timer_t *t);

static void timer_arm(struct rconn *rc, uint64_t delay_ms)
{
    uv_timer_start(&rc->timer, on_timer, delay_ms, 0);
}

void hub_rbroker_pending_push(struct rconn *rc, struct pending *p)
{
    p->rc = rc;
    p->next = NULL;
    p->prev = rc->tail;
    if (rc->tail)
        rc->tail->next = p;
    else
        rc->head = p;
    rc->tail = p;
    /* Deadlines grow with the list (one timeout per connection), so only
     * the head's matters; when the head leaves early the timer fires
     * harmlessly and re-arms for the new head. */
    if (rc->head == p && (rc->state == C_SYNCING || rc->state == C_UP)) {
        uint64_t now = now_ms();
        timer_arm(rc, p->deadline_ms > now ? p->deadline_ms - now : 0);
    }
}

void hub_rbroker_pending_unlink(struct rconn *rc, struct pending *p)
{
    if (p->prev)
        p->prev->next = p->next;
    else
        rc->head = p->next;
    if (p->next)
        p->next->prev = p->prev;
    else
        rc->tail = p->prev;
    p->prev = p->next = NULL;
}

/* Drops our own records of the sub connection (batches, probe echoes):
 * it is gone. */
static void sub_pending_clear(struct rconn *rc)
{
    struct pending *p = rc->head;
    while (p) {
        struct pending *next = p->next;
        hub_rbroker_pending_unlink(rc, p);
        free(p);
        p = next;
    }
    rc->sync_left = 0;
    rc->sh->echoes = 0;
}

/* ------------------------------------------------------------------ */
/* Connection lifecycle                                                */
/* ------------------------------------------------------------------ */

/* Gives up the context we hold: hiredis fails its pending callbacks (NULL
 * reply) synchronously, or right after the hiredis callback we are in
 * returns. Then the connection goes IDLE with a retry. */
void hub_rbroker_conn_drop(struct rconn *rc, const char *why, int level, int cause)
{
    redisAsyncContext *ac = rc->ac;
    rc->ac = NULL;
    if (ac) {
        ac->data = NULL;
        redisAsyncFree(ac);
    }
    conn_fail(rc, why, level, cause);
}

static unsigned next_delay(struct rconn *rc)
{
    struct rbroker *b = rc->sh->b;
    unsigned base = rc->backoff_ms;
    unsigned spread = base * 2 / 5;
    unsigned d = base - base / 5 + (unsigned)(rnd(b) % (spread + 1));
    if (d > BACKOFF_MAX_MS)
        d = BACKOFF_MAX_MS;
    rc->backoff_ms = base * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : base * 2;
    return d;
}

/* The connection (or the attempt) is over and rc->ac is already NULL:
 * reset, schedule the retry, log, then tell the user (health, waiters,
 * publishes that waited for their echo on a lost sub connection). `cause`
 * (LOST_*) is counted when the connection had been established. */
static void conn_fail(struct rconn *rc, const char *why, int level, int cause)
{
    struct shard *sh = rc->sh;
    struct rbroker *b = sh->b;
    if (b->stopped)
        return;
    int was = rc->state;
    struct waiter *failed = NULL;
    struct pending *unacked = NULL;

    if (rc->gai_active && was == C_RESOLVING) {
        rc->gai_stale = 1;
        uv_cancel((uv_req_t *)&rc->gai);
    }
    rc->state = C_IDLE;
    if (rc->role == ROLE_SUB) {
        /* What was sent while this connection was up can no longer be
         * proven received: publishes in flight see the new generation on
         * their reply, those already answered fail now. */
        sh->sub_gen++;
        unacked = hub_rbroker_acks_take(sh, UINT64_MAX);
        sub_pending_clear(rc);
        chans_reset(sh, &failed);
    }
    rc->failures++;
    /* The first retry after losing an established connection is not
     * jittered: when Redis drops every hub at once (restart, CLIENT KILL),
     * they all come back together, so the time in which one hub has
     * resubscribed and another not yet (and misses what the first one
     * publishes) stays short. Later retries spread out. */
    unsigned delay = next_delay(rc);
    if (was == C_UP || was == C_SYNCING)
        delay = BACKOFF_MIN_MS;
    timer_arm(rc, delay);

    if (was == C_UP || was == C_SYNCING) {
        b->lost[rc->role][cause]++;
        hub_log(level, "%s (%s): connection lost: %s; reconnecting in %u ms", sh->tag,
                role_name(rc), why, delay);
    } else {
        hub_log(level, "%s (%s): %s, retrying in %u ms", sh->tag, role_name(rc), why, delay);
    }

    health_update(b);
    waiters_fire(failed, HUB_EUNAVAILABLE);
    hub_rbroker_acks_fire(b, unacked, HUB_EUNAVAILABLE);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    struct rconn *rc = ac->data;
    if (!rc || rc->ac != ac)
        return;
    /* hiredis frees the context when we return. */
    rc->ac = NULL;
    char why[160];
    if (status == REDIS_OK)
        snprintf(why, sizeof(why), "closed");
    else
        snprintf(why, sizeof(why), "%s", ac->errstr ? ac->errstr : ac->c.errstr);
    conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
}

static void keepalive(int fd)
{
    /* Detects a peer that vanished (no RST) on an idle connection, in
     * about 15 + 3 * 5 s; hiredis' own helper sets c->err on failure,
     * which we do not want on an async context. */
    int on = 1, idle = 15, intvl = 5, cnt = 3;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
}

static void sync_start(struct rconn *rc);

static void handshake_done(struct rconn *rc)
{
    struct rbroker *b = rc->sh->b;
    uv_timer_stop(&rc->timer);
    rc->backoff_ms = BACKOFF_MIN_MS;
    rc->failures = 0;
    if (rc->ever_up)
        b->reconnects++;
    rc->ever_up = 1;
    hub_log(HUB_LOG_DEBUG, "%s (%s): ready", rc->sh->tag, role_name(rc));
    if (rc->role == ROLE_CMD)
        rc->state = C_UP;
    else
        sync_start(rc);
    health_update(b);
}

static void on_handshake_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct rconn *rc = privdata;
    redisReply *r = reply;
    /* NULL: the context is going away; on_disconnect (or whoever freed it)
     * handles that. Another context: stale. */
    if (rc->ac != ac || !r)
        return;
    if (r->type == REDIS_REPLY_ERROR) {
        char why[300];
        const char *cmd = rc->hs_cmd[rc->hs_i];
        if (strncmp(r->str, "NOAUTH", 6) == 0)
            snprintf(why, sizeof(why), "%s refused: %s (the server needs a password: "
                                       "redis://:PASSWORD@host:port)", cmd, r->str);
        else if (strcmp(cmd, "AUTH") == 0)
            snprintf(why, sizeof(why), "AUTH failed (wrong password in the broker URL?): %s",
                     r->str);
        else
            snprintf(why, sizeof(why), "%s failed: %s", cmd, r->str);
        /* Inside a hiredis callback: the free is deferred until we return. */
        hub_rbroker_conn_drop(rc, why, HUB_LOG_ERROR, LOST_CLOSED);
        return;
    }
    if (++rc->hs_i == rc->hs_n)
        handshake_done(rc);
}

static void on_connect(const redisAsyncContext *cac, int status)
{
    struct rconn *rc = cac->data;
    if (!rc || rc->ac != cac)
        return;
    redisAsyncContext *ac = rc->ac;
    if (status != REDIS_OK) {
        /* hiredis frees the context when we return: never free it here
         * (nor on success: hiredis keeps using it after this call). */
        rc->ac = NULL;
        char why[160];
        snprintf(why, sizeof(why), "%s", ac->c.errstr[0] ? ac->c.errstr : "connect failed");
        why[0] = (char)((why[0] >= 'A' && why[0] <= 'Z') ? why[0] + 32 : why[0]);
        conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
        return;
    }
    struct hub_redis_url *u = &rc->sh->url;
    rc->state = C_HANDSHAKE;
    keepalive(ac->c.fd);
    rc->hs_n = rc->hs_i = 0;
    if (u->password) {
        const char *argv[3] = {"AUTH", u->user ? u->user : u->password, u->password};
        size_t argl[3] = {4, strlen(argv[1]), strlen(u->password)};
        redisAsyncCommandArgv(ac, on_handshake_reply, rc, u->user ? 3 : 2, argv, argl);
        rc->hs_cmd[rc->hs_n++] = "AUTH";
    }
    if (u->db > 0 && rc->role == ROLE_CMD) {
        /* Pub/sub ignores the database: only the command connection (for
         * the history and presence to come) selects it. */
        char db[16];
        snprintf(db, sizeof(db), "%d", u->db);
        const char *argv[2] = {"SELECT", db};
        size_t argl[2] = {6, strlen(db)};
        redisAsyncCommandArgv(ac, on_handshake_reply, rc, 2, argv, argl);
        rc->hs_cmd[rc->hs_n++] = "SELECT";
    }
    /* PING last: its answer proves the server is serving us (a SIGSTOPped
     * Redis still completes TCP handshakes from its listen backlog). */
    redisAsyncCommand(ac, on_handshake_reply, rc, "PING");
    rc->hs_cmd[rc->hs_n++] = "PING";
    /* The connect deadline keeps running until the PING answer. */
}

static void connect_to(struct rconn *rc, const char *ip)
{
    struct hub_redis_url *u = &rc->sh->url;
    struct rbroker *b = rc->sh->b;
    char why[200];
    redisAsyncContext *ac = redisAsyncConnect(ip, u->port);
    if (!ac) {
        conn_fail(rc, "out of memory creating the hiredis context", HUB_LOG_ERROR,
                  LOST_CLOSED);
        return;
    }
    if (ac->err) {
        snprintf(why, sizeof(why), "%s", ac->errstr);
        why[0] = (char)((why[0] >= 'A' && why[0] <= 'Z') ? why[0] + 32 : why[0]);
        redisAsyncFree(ac);
        conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
        return;
    }
    int r = hub_redis_uv_attach(ac, b->base.loop);
    if (r < 0) {
        snprintf(why, sizeof(why), "cannot poll the socket: %s", uv_strerror(r));
        redisAsyncFree(ac);
        conn_fail(rc, why, HUB_LOG_ERROR, LOST_CLOSED);
        return;
    }
    ac->data = rc;
    rc->ac = ac;
    rc->state = C_CONNECTING;
    /* After the attach: setting the connect callback arms the first write
     * watcher (connect completion is detected on writability). */
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct rconn *rc = req->data;
    struct rbroker *b = rc->sh->b;
    rc->gai_active = 0;
    b->open_handles--;
    if (rc->gai_stale || b->stopped || rc->state != C_RESOLVING) {
        rc->gai_stale = 0;
        uv_freeaddrinfo(res);
        return;
    }
    if (status < 0 || !res) {
        char why[200];
        snprintf(why, sizeof(why), "cannot resolve \"%s\": %s", rc->sh->url.host,
                 uv_strerror(status));
        uv_freeaddrinfo(res);
        conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
        return;
    }
    /* IPv4 first (Redis binds 127.0.0.1 by default while "localhost" often
     * lists ::1 first), then rotate through the addresses on failures. */
    char addrs[8][INET6_ADDRSTRLEN];
    int n = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (struct addrinfo *ai = res; ai && n < 8; ai = ai->ai_next) {
            if (pass == 0 && ai->ai_family == AF_INET)
                uv_ip4_name((struct sockaddr_in *)ai->ai_addr, addrs[n++], INET6_ADDRSTRLEN);
            else if (pass == 1 && ai->ai_family == AF_INET6)
                uv_ip6_name((struct sockaddr_in6 *)ai->ai_addr, addrs[n++], INET6_ADDRSTRLEN);
        }
    }
    uv_freeaddrinfo(res);
    if (n == 0) {
        char why[200];
        snprintf(why, sizeof(why), "\"%s\" has no IPv4/IPv6 address", rc->sh->url.host);
        conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
        return;
    }
    connect_to(rc, addrs[rc->failures % (unsigned)n]);
}

static int is_numeric_host(const char *h)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, h, buf) == 1 || inet_pton(AF_INET6, h, buf) == 1;
}

static void conn_start(struct rconn *rc)
{
    struct rbroker *b = rc->sh->b;
    if (b->stopped)
        return;
    if (rc->gai_active) {
        /* An abandoned lookup is still running in the threadpool (slow
         * DNS): the request struct is busy, try again later. */
        timer_arm(rc, next_delay(rc));
        return;
    }
    /* One deadline for resolve + connect + handshake. */
    timer_arm(rc, rc->sh->url.connect_timeout_ms);
    if (is_numeric_host(rc->sh->url.host)) {
        connect_to(rc, rc->sh->url.host);
        return;
    }
    /* hiredis would call getaddrinfo() itself, blocking the loop: resolve
     * in libuv's threadpool and hand hiredis a numeric address. */
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc->gai.data = rc;
    rc->state = C_RESOLVING;
    int r = uv_getaddrinfo(b->base.loop, &rc->gai, on_resolved, rc->sh->url.host, NULL, &hints);
    if (r < 0) {
        char why[200];
        snprintf(why, sizeof(why), "cannot resolve \"%s\": %s", rc->sh->url.host,
                 uv_strerror(r));
        rc->state = C_IDLE;
        conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
        return;
    }
    rc->gai_active = 1;
    b->open_handles++;
}

static void on_timer(uv_timer_t *t)
{
    struct rconn *rc = t->data;
    char why[200];
    switch (rc->state) {
    case C_IDLE:
        conn_start(rc);
        break;
    case C_RESOLVING:
    case C_CONNECTING:
    case C_HANDSHAKE:
        snprintf(why, sizeof(why), "%s timed out after %u ms",
                 rc->state == C_RESOLVING ? "name lookup"
                 : rc->state == C_CONNECTING ? "connect" : "handshake (AUTH/SELECT/PING)",
                 rc->sh->url.connect_timeout_ms);
        /* A context that never connected gets no callback from hiredis:
         * freeing it is the only way out (docs/internals.md). */
        hub_rbroker_conn_drop(rc, why, HUB_LOG_WARN, LOST_TIMEOUT);
        break;
    case C_SYNCING:
    case C_UP: {
        struct pending *p = rc->head;
        if (!p)
            break;
        uint64_t now = now_ms();
        if (p->deadline_ms > now) {
            timer_arm(rc, p->deadline_ms - now);
            break;
        }
        snprintf(why, sizeof(why), "%s within %u ms",
                 p->kind == P_PUBLISH   ? "PUBLISH not answered"
                 : p->kind == P_COMMAND ? "command not answered"
                 : p->kind == P_PROBE   ? (p->seq ? "probe PUBLISH not answered"
                                                  : "PING not answered")
                 : p->kind == P_ECHO    ? "probe message not received"
                                        : "SUBSCRIBE/UNSUBSCRIBE not answered",
                 rc->sh->url.command_timeout_ms);
        hub_rbroker_conn_drop(rc, why, HUB_LOG_WARN, LOST_TIMEOUT);
        break;
    }
    default:
        break;
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
    if (redisAsyncCommandArgv(rc->ac, on_sub_reply, rc, (int)n + 1, b->argv, b->argl) !=
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
        }
        c->outstanding++;
    }
    struct pending *p = hub_xcalloc(1, sizeof(*p));
    p->kind = P_BATCH;
    p->left = (unsigned)n;
    p->sync = sync;
    p->deadline_ms = now_ms() + rc->sh->url.command_timeout_ms;
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
        chan_maybe_free(sh, dead);
        dead = next;
    }
    if (unsubs)
        flush_dir(sh, unsubs, 0, sync);
    if (subs)
        flush_dir(sh, subs, 1, sync);
}

static void flush_shard(struct shard *sh)
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
            flush_shard(sh);
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
static void sync_start(struct rconn *rc)
{
    struct shard *sh = rc->sh;
    rc->state = C_SYNCING;
    rc->sync_left = 0;
    for (size_t i = 0; i < sh->chans.nb; i++)
        for (struct hub_hnode *n = sh->chans.b[i]; n; n = n->next) {
            struct rchan *c = hub_container_of(n, struct rchan, node);
            if (c->want && !c->dirty) {
                c->dirty = 1;
                c->dnext = NULL;
                if (sh->dirty_tail)
                    sh->dirty_tail->dnext = c;
                else
                    sh->dirty_head = c;
                sh->dirty_tail = c;
            }
        }
    flush_shard_sync(sh, 1);
    if (rc->sync_left == 0)
        rc->state = C_UP;
}

/* One (un)subscribe confirmation: counts it against the oldest batch
 * (probe echoes may sit before it in the list: they complete in their own
 * order). */
static void batch_ack(struct rconn *rc)
{
    struct pending *p = rc->head;
    while (p && p->kind != P_BATCH)
        p = p->next;
    if (!p)
        return;
    if (--p->left > 0)
        return;
    hub_rbroker_pending_unlink(rc, p);
    if (p->sync && rc->sync_left > 0 && --rc->sync_left == 0 && rc->state == C_SYNCING)
        rc->state = C_UP;
    free(p);
}

static void on_sub_reply(redisAsyncContext *ac, void *reply, void *privdata)
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
        struct hub_msg *m = hub_msg_text(r->element[2]->str, r->element[2]->len);
        /* `name` lives in the reply, not in the entry: deliver may make the
         * entry go away (a culled subscriber unsubscribes). */
        b->base.deliver(b->base.ud, name, nlen, m);
        hub_msg_unref(m);
        return;
    }

    int was_up = rc->state == C_UP;
    struct waiter *ready = NULL, **tail = &ready;
    if (strcmp(kind, "subscribe") == 0) {
        batch_ack(rc);
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
        batch_ack(rc);
        if (c) {
            if (c->outstanding)
                c->outstanding--;
            chan_maybe_free(sh, c);
        }
    } else {
        return;
    }
    if (!was_up && rc->state == C_UP)
        health_update(b);
    waiters_fire(ready, HUB_OK);
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
    waiters_take(c, &canceled);
    /* The flush sends UNSUBSCRIBE if a SUBSCRIBE went out, else forgets
     * the entry once no confirmation is outstanding. */
    chan_mark_dirty(sh, c);
    waiters_fire(canceled, HUB_ECANCELED);
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

    struct waiter *failed = NULL;
    struct pending *unacked = NULL, **utail = &unacked;
    for (uint32_t i = 0; i < b->n; i++) {
        struct shard *sh = &b->shards[i];
        *utail = hub_rbroker_acks_take(sh, UINT64_MAX);
        while (*utail)
            utail = &(*utail)->next;
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
                sub_pending_clear(rc);
            rc->state = C_STOPPED;
        }
        chans_reset(sh, &failed);
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
    waiters_fire(failed, HUB_EUNAVAILABLE);
    hub_rbroker_acks_fire(b, unacked, HUB_EUNAVAILABLE);
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
    free(b->shards);
    free(b->prefix);
    hub_buf_free(&b->key);
    hub_buf_free(&b->names);
    free(b);
}

static const struct hub_broker_ops redis_ops = {
    .name = "redis",
    .publish = hub_rbroker_publish,
    .subscribe = r_subscribe,
    .unsubscribe = r_unsubscribe,
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
    uv_timer_init(b->base.loop, &rc->timer);
    rc->timer.data = rc;
    b->open_handles++;
    /* First attempt on the first loop iteration, not inside the
     * constructor. */
    timer_arm(rc, 0);
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
    /* Our probe channel: '!' cannot occur in hub channel names, and the
     * random part keeps other processes' probes out. */
    int pl = snprintf(b->probe, sizeof(b->probe), "!probe:%016llx",
                      (unsigned long long)rnd(b));
    b->probe_len = (size_t)pl;
    for (size_t i = 0; i < n; i++) {
        struct shard *sh = &b->shards[i];
        sh->b = b;
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
