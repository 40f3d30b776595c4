/* The Redis broker's connections (see broker_redis.c for the design): the
 * state machine of one connection, IDLE -> RESOLVING -> CONNECTING ->
 * HANDSHAKE (-> SYNCING) -> UP, with its timer (retry backoff, connect
 * deadline, oldest command's deadline), the list of what it awaits, and
 * failure handling. The channel and publish logic are broker_redis.c and
 * broker_redis_pub.c. */
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

#include "broker_redis.h"
#include "luahub/log.h"
#include "luahub/util.h"
#include "redis_uv.h"
/* ------------------------------------------------------------------ */
/* Pending list                                                        */
/* ------------------------------------------------------------------ */

static void on_timer(uv_timer_t *t);

void hub_rbroker_timer_arm(struct rconn *rc, uint64_t delay_ms)
{
    uv_timer_start(&rc->timer, on_timer, delay_ms, 0);
}

struct pending *hub_rbroker_pending_new(struct shard *sh, int kind, size_t bytes)
{
    struct pending *p = hub_xcalloc(1, sizeof(*p));
    p->kind = kind;
    p->bytes = bytes;
    p->t0_ns = hub_now_ns();
    p->deadline_ms = p->t0_ns / 1000000u + sh->url.command_timeout_ms;
    p->gen = sh->sub_gen;
    return p;
}

void hub_rbroker_pending_push(struct rconn *rc, struct pending *p)
{
    p->rc = rc;
    hub_list_push_tail(&rc->pending, &p->link);
    /* Deadlines grow with the list (one timeout per connection), so only
     * the head's matters; when the head leaves early the timer fires
     * harmlessly and re-arms for the new head. */
    if (rc->pending.next == &p->link && (rc->state == C_SYNCING || rc->state == C_UP)) {
        uint64_t now = hub_now_ms();
        hub_rbroker_timer_arm(rc, p->deadline_ms > now ? p->deadline_ms - now : 0);
    }
}

/* Drops our own records of the sub connection (batches, probe echoes):
 * it is gone. */
void hub_rbroker_sub_pending_clear(struct rconn *rc)
{
    struct pending *p;
    while ((p = hub_rbroker_pending_first(&rc->pending))) {
        hub_list_remove(&p->link);
        free(p);
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
    hub_rbroker_conn_fail(rc, why, level, cause);
}

static unsigned next_delay(struct rconn *rc)
{
    struct rbroker *b = rc->sh->b;
    unsigned base = rc->backoff_ms;
    unsigned spread = base * 2 / 5;
    unsigned d = base - base / 5 + (unsigned)(hub_rbroker_rnd(b) % (spread + 1));
    if (d > BACKOFF_MAX_MS)
        d = BACKOFF_MAX_MS;
    rc->backoff_ms = base * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : base * 2;
    return d;
}

/* The connection (or the attempt) is over and rc->ac is already NULL:
 * reset, schedule the retry, log, then tell the user (health, waiters,
 * publishes that waited for their echo on a lost sub connection). `cause`
 * (LOST_*) is counted when the connection had been established. */
void hub_rbroker_conn_fail(struct rconn *rc, const char *why, int level, int cause)
{
    struct shard *sh = rc->sh;
    struct rbroker *b = sh->b;
    if (b->stopped)
        return;
    int was = rc->state;
    struct waiter *failed = NULL;
    struct hub_list unacked;

    if (rc->gai_active && was == C_RESOLVING) {
        rc->gai_stale = 1;
        uv_cancel((uv_req_t *)&rc->gai);
    }
    rc->state = C_IDLE;
    hub_list_init(&unacked);
    if (rc->role == ROLE_SUB) {
        /* What was sent while this connection was up can no longer be
         * proven received: publishes in flight see the new generation on
         * their reply, those already answered fail now. */
        sh->sub_gen++;
        hub_rbroker_acks_take(sh, UINT64_MAX, &unacked);
        hub_rbroker_sub_pending_clear(rc);
        hub_rbroker_chans_reset(sh, &failed);
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
    hub_rbroker_timer_arm(rc, delay);

    if (was == C_UP || was == C_SYNCING) {
        b->lost[rc->role][cause]++;
        hub_log(level, "%s (%s): connection lost: %s; reconnecting in %u ms", sh->tag,
                hub_rbroker_role_name(rc), why, delay);
    } else {
        hub_log(level, "%s (%s): %s, retrying in %u ms", sh->tag, hub_rbroker_role_name(rc), why, delay);
    }

    hub_rbroker_health_update(b);
    hub_rbroker_waiters_fire(failed, HUB_EUNAVAILABLE);
    hub_rbroker_acks_fire(b, &unacked, HUB_EUNAVAILABLE);
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
    hub_rbroker_conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
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


static void handshake_done(struct rconn *rc)
{
    struct rbroker *b = rc->sh->b;
    uv_timer_stop(&rc->timer);
    rc->backoff_ms = BACKOFF_MIN_MS;
    rc->failures = 0;
    if (rc->ever_up)
        b->reconnects++;
    rc->ever_up = 1;
    hub_log(HUB_LOG_DEBUG, "%s (%s): ready", rc->sh->tag, hub_rbroker_role_name(rc));
    if (rc->role == ROLE_CMD)
        rc->state = C_UP;
    else
        hub_rbroker_sync_start(rc);
    hub_rbroker_health_update(b);
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
    int k = rc->hs_i - rc->hs_script0;
    if (rc->role == ROLE_CMD && k >= 0 && k < SCRIPT_N) {
        /* SCRIPT LOAD answers the SHA1 that EVALSHA takes. */
        if (r->type != REDIS_REPLY_STRING || r->len != 40) {
            hub_rbroker_conn_drop(rc, "SCRIPT LOAD did not answer a SHA1", HUB_LOG_ERROR,
                                  LOST_CLOSED);
            return;
        }
        memcpy(rc->sh->b->sha[k], r->str, 41);
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
        hub_rbroker_conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
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
    /* The history and presence scripts, before anything can call them (a
     * restarted Redis has an empty script cache). */
    rc->hs_script0 = rc->hs_n;
    if (rc->role == ROLE_CMD) {
        for (int k = 0; k < SCRIPT_N; k++) {
            const char *text = hub_rbroker_script_text(k);
            const char *argv[3] = {"SCRIPT", "LOAD", text};
            size_t argl[3] = {6, 4, strlen(text)};
            redisAsyncCommandArgv(ac, on_handshake_reply, rc, 3, argv, argl);
            rc->hs_cmd[rc->hs_n++] = "SCRIPT LOAD";
        }
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
        hub_rbroker_conn_fail(rc, "out of memory creating the hiredis context", HUB_LOG_ERROR,
                  LOST_CLOSED);
        return;
    }
    if (ac->err) {
        snprintf(why, sizeof(why), "%s", ac->errstr);
        why[0] = (char)((why[0] >= 'A' && why[0] <= 'Z') ? why[0] + 32 : why[0]);
        redisAsyncFree(ac);
        hub_rbroker_conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
        return;
    }
    int r = hub_redis_uv_attach(ac, b->base.loop);
    if (r < 0) {
        snprintf(why, sizeof(why), "cannot poll the socket: %s", uv_strerror(r));
        redisAsyncFree(ac);
        hub_rbroker_conn_fail(rc, why, HUB_LOG_ERROR, LOST_CLOSED);
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
        hub_rbroker_conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
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
        hub_rbroker_conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
        return;
    }
    connect_to(rc, addrs[rc->failures % (unsigned)n]);
}

static int is_numeric_host(const char *h)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, h, buf) == 1 || inet_pton(AF_INET6, h, buf) == 1;
}

void hub_rbroker_conn_start(struct rconn *rc)
{
    struct rbroker *b = rc->sh->b;
    if (b->stopped)
        return;
    if (rc->gai_active) {
        /* An abandoned lookup is still running in the threadpool (slow
         * DNS): the request struct is busy, try again later. */
        hub_rbroker_timer_arm(rc, next_delay(rc));
        return;
    }
    /* One deadline for resolve + connect + handshake. */
    hub_rbroker_timer_arm(rc, rc->sh->url.connect_timeout_ms);
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
        hub_rbroker_conn_fail(rc, why, HUB_LOG_WARN, LOST_CLOSED);
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
        hub_rbroker_conn_start(rc);
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
        struct pending *p = hub_rbroker_pending_first(&rc->pending);
        if (!p)
            break;
        uint64_t now = hub_now_ms();
        if (p->deadline_ms > now) {
            hub_rbroker_timer_arm(rc, p->deadline_ms - now);
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

