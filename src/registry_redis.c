/* The connection registry and instance heartbeat in Redis (see registry.h
 * and docs/broker.md, "Connection registry").
 *
 * Local state: the base's table of this process's connections with a user
 * (registry.c); they are also in Redis. Redis traffic goes through the
 * redis broker's command interface (broker_redis.h), so it has the
 * broker's caps, timeouts and fail-fast rules, and never blocks:
 *
 *   - registrations made in one loop iteration are flushed together on the
 *     next one (a 0 ms timer) as EVALs of up to CHUNK connections each
 *     (HSET + PEXPIRE of the conn key, SADD + PEXPIRE of the user set);
 *   - the heartbeat (every refresh_ms) HSETs the instance key and
 *     re-registers every connection the same way: that refreshes the TTLs
 *     and also re-creates what a restarted Redis lost;
 *   - unregistrations are queued and flushed as EVALs of DEL + SREM; when
 *     Redis is unavailable they are kept (up to max_unregisters) and
 *     retried with the heartbeat, past that left to the TTL;
 *   - while the heartbeat fails it is retried every min(refresh_ms, 500) ms.
 *
 * The scripts build no key names from other keys' contents except the
 * query, which reads the conn keys of the ids in a user's set (standalone
 * Redis only, like the rest of the broker: no Cluster). */
#include "registry_impl.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <yajl/yajl_tree.h>

#include "broker_redis.h"
#include "luahub/log.h"
#include "luahub/metrics.h"
#include "luahub/util.h"

#define CHUNK 100               /* connections per EVAL */
#define MAX_ARGS (3 + 5 * CHUNK + 2)
#define QUERY_MAX 10000         /* connections listed per user */
#define SHUTDOWN_GUARD_MS 3000u
#define RETRY_MAX_MS 500u

/* KEYS: (conn key, user key) per connection; ARGV: ttl_ms, instance, then
 * (id, user, connected) per connection. */
static const char register_lua[] =
    "local ttl = ARGV[1]\n"
    "for i = 1, #KEYS / 2 do\n"
    "  local a = 3 + (i - 1) * 3\n"
    "  redis.call('HSET', KEYS[2*i-1], 'user', ARGV[a+1], 'instance', ARGV[2],"
    " 'connected', ARGV[a+2])\n"
    "  redis.call('PEXPIRE', KEYS[2*i-1], ttl)\n"
    "  redis.call('SADD', KEYS[2*i], ARGV[a])\n"
    "  redis.call('PEXPIRE', KEYS[2*i], ttl)\n"
    "end\n"
    "return #KEYS / 2\n";

/* KEYS: (conn key, user key) per connection; ARGV: the ids. */
static const char unregister_lua[] =
    "for i = 1, #ARGV do\n"
    "  redis.call('DEL', KEYS[2*i-1])\n"
    "  redis.call('SREM', KEYS[2*i], ARGV[i])\n"
    "end\n"
    "return #ARGV\n";

/* KEYS[1]: the user set; ARGV: conn key prefix, max entries. Returns
 * (id, user, instance, connected) flattened, ids sorted; ids whose conn
 * key is gone are removed from the set. */
static const char query_lua[] =
    "local ids = redis.call('SMEMBERS', KEYS[1])\n"
    "table.sort(ids)\n"
    "local out, n, max = {}, 0, tonumber(ARGV[2])\n"
    "for _, id in ipairs(ids) do\n"
    "  local v = redis.call('HMGET', ARGV[1] .. id, 'user', 'instance', 'connected')\n"
    "  if v[1] then\n"
    "    if n < max then\n"
    "      out[#out+1] = id; out[#out+1] = v[1]\n"
    "      out[#out+1] = v[2] or ''; out[#out+1] = v[3] or '0'\n"
    "      n = n + 1\n"
    "    end\n"
    "  else\n"
    "    redis.call('SREM', KEYS[1], id)\n"
    "  end\n"
    "end\n"
    "return out\n";

/* An unregistration waiting to be sent (or re-sent). */
struct gone {
    struct gone *next;
    char *user;
    size_t ulen;
    char id[];
};

/* Scratch for one command: arguments appended to one buffer. */
struct cmdb {
    struct hub_buf buf;
    size_t off[MAX_ARGS], len[MAX_ARGS];
    const char *argv[MAX_ARGS];
    int n;
};

struct rreg {
    struct hub_registry base;       /* first */
    struct hub_broker *broker;      /* the redis broker, borrowed */
    unsigned retry_ms;
    struct hub_list queue;          /* rentry.queue: registrations to flush */
    struct gone *ghead, *gtail;     /* unregistrations to flush */
    size_t ngone;

    uv_timer_t tick, flush, guard;
    unsigned open_handles;
    int flush_armed;
    int shutting;
    unsigned inflight;              /* our own commands awaiting a reply */
    unsigned refresh_inflight;      /* refresh EVALs of the last heartbeat */
    hub_registry_shutdown_cb shutdown_cb;
    void *shutdown_ud;
    int hb_ok;                      /* the last heartbeat was answered */
    int hb_failing;                 /* logged "failing" (for the "resumed" line) */
    int hb_ever_ok;                 /* a heartbeat was answered once */
    struct cmdb cmd;
    uint64_t heartbeats, heartbeat_errors, unregister_dropped;
};

/* ------------------------------------------------------------------ */
/* Command building                                                    */
/* ------------------------------------------------------------------ */

static void cmd_reset(struct cmdb *c)
{
    hub_buf_reset(&c->buf);
    c->n = 0;
}

static void cmd_arg(struct cmdb *c, const char *p, size_t len)
{
    c->off[c->n] = c->buf.len;
    c->len[c->n] = len;
    hub_buf_append(&c->buf, p, len);
    c->n++;
}

static void cmd_args(struct cmdb *c, const char *s)
{
    cmd_arg(c, s, strlen(s));
}

/* prefix + kind + name as one argument. */
static void cmd_key(struct rreg *reg, const char *kind, const char *name, size_t len)
{
    struct cmdb *c = &reg->cmd;
    c->off[c->n] = c->buf.len;
    hub_buf_append(&c->buf, reg->base.prefix, reg->base.plen);
    hub_buf_appends(&c->buf, kind);
    hub_buf_append(&c->buf, name, len);
    c->len[c->n] = c->buf.len - c->off[c->n];
    c->n++;
}

static void cmd_argf(struct cmdb *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void cmd_argf(struct cmdb *c, const char *fmt, ...)
{
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    cmd_arg(c, tmp, n < 0 ? 0 : (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* Sends the command built in reg->cmd. Returns what hub_rbroker_command returns. */
static int cmd_send(struct rreg *reg, hub_broker_reply_cb cb, void *ud)
{
    struct cmdb *c = &reg->cmd;
    for (int i = 0; i < c->n; i++)
        c->argv[i] = c->buf.p + c->off[i];
    return hub_rbroker_command(reg->broker, c->n, c->argv, c->len, cb, ud);
}

/* ------------------------------------------------------------------ */
/* Our own commands' completions                                        */
/* ------------------------------------------------------------------ */

static void shutdown_maybe_done(struct rreg *reg)
{
    if (!reg->shutdown_cb || reg->inflight > 0)
        return;
    hub_registry_shutdown_cb cb = reg->shutdown_cb;
    void *ud = reg->shutdown_ud;
    reg->shutdown_cb = NULL;
    if (!reg->base.stopped)
        uv_timer_stop(&reg->guard);
    cb(ud);
}

static void on_tick(uv_timer_t *t);

static void heartbeat_failed(struct rreg *reg, const char *why)
{
    reg->heartbeat_errors++;
    reg->hb_ok = 0;
    /* Before the first success the broker is still connecting (it logs
     * that itself): only a heartbeat that worked and stopped is news. */
    if (!reg->hb_failing && reg->hb_ever_ok) {
        reg->hb_failing = 1;
        hub_log(HUB_LOG_WARN, "registry: heartbeat failed (%s); retrying every %u ms", why,
                reg->retry_ms);
    }
    if (!reg->base.stopped && !reg->shutting)
        uv_timer_start(&reg->tick, on_tick, reg->retry_ms, 0);
}

static void on_heartbeat_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct rreg *reg = ud;
    reg->inflight--;
    if (status == HUB_OK && r->type != HUB_REPLY_ERROR) {
        reg->heartbeats++;
        reg->hb_ok = 1;
        reg->hb_ever_ok = 1;
        if (reg->hb_failing) {
            reg->hb_failing = 0;
            hub_log(HUB_LOG_INFO, "registry: heartbeat resumed (instance %s)", reg->base.instance);
        }
    } else if (!reg->base.stopped && !reg->shutting) {
        heartbeat_failed(reg, status == HUB_OK ? r->str : "Redis unavailable");
    }
    shutdown_maybe_done(reg);
}

static void on_register_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct rreg *reg = ud;
    reg->inflight--;
    /* A failure is repaired by the next heartbeat, which registers every
     * connection again. */
    if (status == HUB_OK && r->type == HUB_REPLY_ERROR)
        hub_log(HUB_LOG_ERROR, "registry: registration script failed: %s", r->str);
    shutdown_maybe_done(reg);
}

static void on_refresh_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct rreg *reg = ud;
    reg->refresh_inflight--;
    on_register_reply(ud, status, r);
}

/* The ids of one unregistration EVAL, to re-queue them if it fails. */
struct gone_batch {
    struct rreg *reg;
    struct gone *list;
};

static void gone_push(struct rreg *reg, struct gone *g);

static void on_unregister_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct gone_batch *gb = ud;
    struct rreg *reg = gb->reg;
    reg->inflight--;
    int failed = status != HUB_OK || r->type == HUB_REPLY_ERROR;
    struct gone *g = gb->list, *next;
    for (; g; g = next) {
        next = g->next;
        if (failed && !reg->base.stopped && !reg->shutting) {
            gone_push(reg, g);      /* retried with the next heartbeat */
        } else {
            free(g->user);
            free(g);
        }
    }
    free(gb);
    shutdown_maybe_done(reg);
}

/* ------------------------------------------------------------------ */
/* Flushing                                                            */
/* ------------------------------------------------------------------ */

static void gone_push(struct rreg *reg, struct gone *g)
{
    if (reg->ngone >= reg->base.max_unregisters) {
        /* Bounded: the TTL removes what we cannot. */
        reg->unregister_dropped++;
        free(g->user);
        free(g);
        return;
    }
    g->next = NULL;
    if (reg->gtail)
        reg->gtail->next = g;
    else
        reg->ghead = g;
    reg->gtail = g;
    reg->ngone++;
}

/* Sends the queued unregistrations. Returns 0, or -1 when the broker
 * refused (what was not sent stays queued). */
static int flush_gone(struct rreg *reg)
{
    while (reg->ghead) {
        struct cmdb *c = &reg->cmd;
        cmd_reset(c);
        cmd_args(c, "EVAL");
        cmd_arg(c, unregister_lua, sizeof(unregister_lua) - 1);
        size_t nkeys_at = (size_t)c->n;
        cmd_args(c, "0");
        struct gone *g = reg->ghead;
        int k = 0;
        for (; g && k < CHUNK; g = g->next, k++) {
            cmd_key(reg, "conn:", g->id, strlen(g->id));
            cmd_key(reg, "user:", g->user, g->ulen);
        }
        g = reg->ghead;
        for (int i = 0; i < k; i++, g = g->next)
            cmd_args(c, g->id);
        /* numkeys, now that it is known: rewrite it in place at the end. */
        char nk[16];
        int nl = snprintf(nk, sizeof(nk), "%d", 2 * k);
        c->off[nkeys_at] = c->buf.len;
        c->len[nkeys_at] = (size_t)nl;
        hub_buf_append(&c->buf, nk, (size_t)nl);

        struct gone_batch *gb = hub_xmalloc(sizeof(*gb));
        gb->reg = reg;
        gb->list = reg->ghead;
        if (cmd_send(reg, on_unregister_reply, gb) < 0) {
            free(gb);
            return -1;
        }
        reg->inflight++;
        /* Detach the k sent ones. */
        struct gone **pp = &reg->ghead;
        for (int i = 0; i < k; i++)
            pp = &(*pp)->next;
        reg->ghead = *pp;
        *pp = NULL;
        if (!reg->ghead)
            reg->gtail = NULL;
        reg->ngone -= (size_t)k;
    }
    return 0;
}

/* The entry of a node of `list` (reg->queue or the base's all list). */
static struct rentry *entry_of(const struct rreg *reg, const struct hub_list *n)
{
    return n == &reg->queue || n->next == NULL ? NULL
           : hub_container_of(n, struct rentry, queue);
}

static void queue_clear(struct rreg *reg)
{
    while (!hub_list_empty(&reg->queue))
        hub_list_remove(reg->queue.next);
}

/* Registers up to CHUNK entries of a list (`queued`: reg->queue, linked by
 * rentry.queue; else the base's list of all, linked by rentry.all),
 * starting at node `start`. Returns the node after the last one covered
 * (the head when done); *sent = 1 when a command went out. When the broker
 * refused: *err = -1 and returns `start`. */
static struct hub_list *send_register(struct rreg *reg, struct hub_list *start, int queued,
                                      hub_broker_reply_cb cb, int *err, int *sent)
{
    struct hub_list *head = queued ? &reg->queue : &reg->base.all, *n;
    struct cmdb *c = &reg->cmd;
    int k = 0;
    (void)entry_of;
#define ENTRY(n) (queued ? hub_container_of(n, struct rentry, queue) \
                         : hub_container_of(n, struct rentry, all))
    *sent = 0;
    cmd_reset(c);
    cmd_args(c, "EVAL");
    cmd_arg(c, register_lua, sizeof(register_lua) - 1);
    size_t nkeys_at = (size_t)c->n;
    cmd_args(c, "0");
    for (n = start; n != head && k < CHUNK; n = n->next) {
        struct rentry *x = ENTRY(n);
        cmd_key(reg, "conn:", x->id, x->idlen);
        cmd_key(reg, "user:", x->user, x->ulen);
        k++;
    }
    struct hub_list *end = n;
    if (k == 0) {
        *err = 0;
        return end;
    }
    cmd_argf(c, "%u", reg->base.ttl_ms);
    cmd_args(c, reg->base.instance);
    for (n = start; n != end; n = n->next) {
        struct rentry *x = ENTRY(n);
        cmd_arg(c, x->id, x->idlen);
        cmd_arg(c, x->user, x->ulen);
        cmd_argf(c, "%lld", x->connected);
    }
#undef ENTRY
    char nk[16];
    int nl = snprintf(nk, sizeof(nk), "%d", 2 * k);
    c->off[nkeys_at] = c->buf.len;
    c->len[nkeys_at] = (size_t)nl;
    hub_buf_append(&c->buf, nk, (size_t)nl);
    if (cmd_send(reg, cb, reg) < 0) {
        *err = -1;
        return start;
    }
    reg->inflight++;
    *err = 0;
    *sent = 1;
    return end;
}

/* Sends the queued registrations, then the queued unregistrations. */
static void flush_now(struct rreg *reg)
{
    if (reg->base.stopped)
        return;
    int err = 0, sent;
    while (!hub_list_empty(&reg->queue) && !err) {
        struct hub_list *end = send_register(reg, reg->queue.next, 1, on_register_reply, &err,
                                             &sent);
        if (err)
            break;
        while (reg->queue.next != end)
            hub_list_remove(reg->queue.next);
    }
    /* Redis unavailable or over the cap: the heartbeat (retried soon)
     * registers every connection anyway. */
    if (err)
        queue_clear(reg);
    flush_gone(reg);
}

static void on_flush(uv_timer_t *t)
{
    struct rreg *reg = t->data;
    reg->flush_armed = 0;
    flush_now(reg);
}

static void schedule_flush(struct rreg *reg)
{
    if (reg->flush_armed || reg->base.stopped)
        return;
    reg->flush_armed = 1;
    uv_timer_start(&reg->flush, on_flush, 0, 0);
}

/* ------------------------------------------------------------------ */
/* Heartbeat                                                           */
/* ------------------------------------------------------------------ */

static void on_tick(uv_timer_t *t)
{
    struct rreg *reg = t->data;
    if (reg->base.stopped || reg->shutting)
        return;
    struct cmdb *c = &reg->cmd;

    cmd_reset(c);
    cmd_args(c, "HSET");
    cmd_key(reg, "instance:", reg->base.instance, strlen(reg->base.instance));
    cmd_args(c, "connections");
    cmd_argf(c, "%zu", hub_registry_local_count(&reg->base));
    cmd_args(c, "started");
    cmd_argf(c, "%lld", reg->base.started);
    cmd_args(c, "address");
    cmd_args(c, reg->base.address);
    cmd_args(c, "pid");
    cmd_argf(c, "%ld", (long)getpid());
    if (cmd_send(reg, on_heartbeat_reply, reg) < 0) {
        heartbeat_failed(reg, "Redis unavailable");
        return;
    }
    reg->inflight++;
    cmd_reset(c);
    cmd_args(c, "PEXPIRE");
    cmd_key(reg, "instance:", reg->base.instance, strlen(reg->base.instance));
    cmd_argf(c, "%u", reg->base.ttl_ms);
    if (cmd_send(reg, on_heartbeat_reply, reg) < 0) {
        heartbeat_failed(reg, "Redis unavailable");
        return;
    }
    reg->inflight++;

    /* Refresh (re-register) every connection, unless the last round is
     * still unanswered: Redis is slow, do not pile up. */
    if (reg->refresh_inflight == 0) {
        int err = 0, sent;
        struct hub_list *n = reg->base.all.next;
        while (n != &reg->base.all) {
            n = send_register(reg, n, 0, on_refresh_reply, &err, &sent);
            if (err)
                break;
            if (sent)
                reg->refresh_inflight++;
        }
        if (!err)
            queue_clear(reg); /* everything queued is covered by the refresh */
    }
    flush_gone(reg);
    uv_timer_start(&reg->tick, on_tick, reg->base.refresh_ms, 0);
}

/* ------------------------------------------------------------------ */
/* Control channel                                                     */
/* ------------------------------------------------------------------ */

static void on_control(void *ud, const char *msg, size_t len)
{
    struct rreg *reg = ud;
    if (reg->base.stopped)
        return;
    reg->base.control_msgs++;
    char *text = hub_xstrndup(msg, len);
    yajl_val v = yajl_tree_parse(text, NULL, 0);
    free(text);
    if (!v) {
        hub_log(HUB_LOG_WARN, "registry: control message ignored: not JSON (%zu bytes)", len);
        return;
    }
    const char *op_path[] = {"op", NULL}, *user_path[] = {"user", NULL};
    yajl_val op = yajl_tree_get(v, op_path, yajl_t_string);
    yajl_val user = yajl_tree_get(v, user_path, yajl_t_string);
    if (op && op->u.string && strcmp(op->u.string, "disconnect") == 0 && user &&
        user->u.string) {
        const char *u = user->u.string;
        hub_log(HUB_LOG_INFO, "registry: disconnecting user \"%s\" (control channel)", u);
        hub_registry_disconnect_here(&reg->base, u, strlen(u));
    } else {
        hub_log(HUB_LOG_DEBUG, "registry: control message ignored (unknown op)");
    }
    yajl_tree_free(v);
}

/* ------------------------------------------------------------------ */
/* Public API                                                          */
/* ------------------------------------------------------------------ */

struct query {
    struct rreg *reg;
    hub_registry_list_cb cb;
    void *ud;
    size_t ulen;
    char user[];
};

static void on_query_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct query *q = ud;
    if (status != HUB_OK || r->type != HUB_REPLY_ARRAY) {
        if (status == HUB_OK && r->type == HUB_REPLY_ERROR)
            hub_log(HUB_LOG_ERROR, "registry: connections query failed: %s", r->str);
        q->cb(q->ud, HUB_EUNAVAILABLE, NULL, 0);
        free(q);
        return;
    }
    struct hub_buf b = {0};
    hub_buf_appends(&b, "{\"user\":");
    hub_buf_append_json_string(&b, q->user, q->ulen);
    hub_buf_printf(&b, ",\"count\":%zu,\"connections\":[", r->n / 4);
    for (size_t i = 0; i + 3 < r->n; i += 4) {
        const struct hub_broker_reply *e = &r->elem[i];
        hub_registry_json_entry(&b, i == 0, e[0].str ? e[0].str : "", e[0].len, e[1].str ? e[1].str : "",
                   e[1].len, e[2].str ? e[2].str : "", e[2].len, e[3].str ? e[3].str : "0",
                   e[3].len);
    }
    hub_buf_appends(&b, "]}");
    q->cb(q->ud, HUB_OK, b.p, b.len);
    hub_buf_free(&b);
    free(q);
}

static int r_connections(struct hub_registry *base, const char *user, size_t len,
                         hub_registry_list_cb cb, void *ud)
{
    struct rreg *reg = (struct rreg *)base;
    /* Registrations made in this iteration go first (same connection,
     * answered in order), so a connection just opened is listed. */
    flush_now(reg);
    struct cmdb *c = &reg->cmd;
    cmd_reset(c);
    cmd_args(c, "EVAL");
    cmd_arg(c, query_lua, sizeof(query_lua) - 1);
    cmd_args(c, "1");
    cmd_key(reg, "user:", user, len);
    cmd_key(reg, "conn:", "", 0);
    cmd_argf(c, "%d", QUERY_MAX);
    struct query *q = hub_xmalloc(sizeof(*q) + len + 1);
    q->reg = reg;
    q->cb = cb;
    q->ud = ud;
    q->ulen = len;
    memcpy(q->user, user, len);
    q->user[len] = '\0';
    int r = cmd_send(reg, on_query_reply, q);
    if (r < 0) {
        free(q);
        return r;
    }
    return 0;
}

struct disc {
    hub_registry_done_cb cb;
    void *ud;
};

static void on_disconnect_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct disc *d = ud;
    if (status == HUB_OK && r->type == HUB_REPLY_INTEGER) {
        if (d->cb)
            d->cb(d->ud, HUB_OK, r->integer);
    } else if (d->cb) {
        d->cb(d->ud, HUB_EUNAVAILABLE, 0);
    }
    free(d);
}

static int r_disconnect(struct hub_registry *base, const char *user, size_t len,
                        hub_registry_done_cb cb, void *ud)
{
    struct rreg *reg = (struct rreg *)base;
    struct hub_buf msg = {0};
    hub_buf_appends(&msg, "{\"op\":\"disconnect\",\"user\":");
    hub_buf_append_json_string(&msg, user, len);
    hub_buf_appends(&msg, ",\"from\":");
    hub_buf_append_json_string(&msg, reg->base.instance, strlen(reg->base.instance));
    hub_buf_appends(&msg, "}");
    struct cmdb *c = &reg->cmd;
    cmd_reset(c);
    cmd_args(c, "PUBLISH");
    cmd_key(reg, HUB_BROKER_CONTROL_CHANNEL, "", 0);
    cmd_arg(c, msg.p, msg.len);
    hub_buf_free(&msg);
    struct disc *d = hub_xmalloc(sizeof(*d));
    d->cb = cb;
    d->ud = ud;
    int r = cmd_send(reg, on_disconnect_reply, d);
    if (r < 0) {
        free(d);
        return r;
    }
    return 0;
}

static void on_guard(uv_timer_t *t)
{
    struct rreg *reg = t->data;
    if (!reg->shutdown_cb)
        return;
    hub_log(HUB_LOG_WARN, "registry: %u commands unanswered after %u ms at shutdown; the "
                          "TTL will remove the rest",
            reg->inflight, SHUTDOWN_GUARD_MS);
    hub_registry_shutdown_cb cb = reg->shutdown_cb;
    reg->shutdown_cb = NULL;
    cb(reg->shutdown_ud);
}

static void r_shutdown(struct hub_registry *base, hub_registry_shutdown_cb cb, void *ud)
{
    struct rreg *reg = (struct rreg *)base;
    if (reg->base.stopped || reg->shutting) {
        reg->shutting = 1;
        if (!reg->base.stopped)
            uv_timer_stop(&reg->tick);
        cb(ud);
        return;
    }
    /* Everything still registered goes, with what was queued. */
    queue_clear(reg);
    struct hub_list *it, *tmp;
    hub_list_foreach_safe(it, tmp, &reg->base.all) {
        struct rentry *e = hub_container_of(it, struct rentry, all);
        struct gone *g = hub_xmalloc(sizeof(*g) + e->idlen + 1);
        memcpy(g->id, e->id, e->idlen + 1);
        g->user = hub_xstrndup(e->user, e->ulen);
        g->ulen = e->ulen;
        gone_push(reg, g);
    }
    reg->shutting = 1;
    uv_timer_stop(&reg->tick);
    flush_gone(reg);
    struct cmdb *c = &reg->cmd;
    cmd_reset(c);
    cmd_args(c, "DEL");
    cmd_key(reg, "instance:", reg->base.instance, strlen(reg->base.instance));
    if (cmd_send(reg, on_heartbeat_reply, reg) == 0)
        reg->inflight++;
    if (reg->inflight == 0) {
        cb(ud);
        return;
    }
    reg->shutdown_cb = cb;
    reg->shutdown_ud = ud;
    uv_timer_start(&reg->guard, on_guard, SHUTDOWN_GUARD_MS, 0);
}

static void on_closed(uv_handle_t *h)
{
    struct rreg *reg = h->data;
    reg->open_handles--;
}


static void r_stop(struct hub_registry *base)
{
    struct rreg *reg = (struct rreg *)base;
    hub_rbroker_control(reg->broker, NULL, NULL);
    uv_close((uv_handle_t *)&reg->tick, on_closed);
    uv_close((uv_handle_t *)&reg->flush, on_closed);
    uv_close((uv_handle_t *)&reg->guard, on_closed);
    queue_clear(reg);
    while (reg->ghead) {
        struct gone *g = reg->ghead;
        reg->ghead = g->next;
        free(g->user);
        free(g);
    }
    reg->gtail = NULL;
    reg->ngone = 0;
    if (reg->shutdown_cb) {
        hub_registry_shutdown_cb cb = reg->shutdown_cb;
        reg->shutdown_cb = NULL;
        cb(reg->shutdown_ud);
    }
}

static void r_free(struct hub_registry *base)
{
    struct rreg *reg = (struct rreg *)base;
    hub_buf_free(&reg->cmd.buf);
    free(reg);
}

static int r_drained(const struct hub_registry *base)
{
    return ((const struct rreg *)base)->open_handles == 0;
}

static int r_heartbeat_up(const struct hub_registry *base)
{
    return ((const struct rreg *)base)->hb_ok;
}

static void r_metrics(const struct hub_registry *base, struct hub_buf *out)
{
    const struct rreg *reg = (const struct rreg *)base;
    hub_metric_one(out, "luahub_registry_heartbeats_total", "counter",
                   "Heartbeat commands answered.", reg->heartbeats);
    hub_metric_one(out, "luahub_registry_heartbeat_errors_total", "counter",
                   "Heartbeats that failed.", reg->heartbeat_errors);
    hub_metric_one(out, "luahub_registry_unregisters_pending", "gauge",
                   "Unregistrations waiting for Redis.", reg->ngone);
    hub_metric_one(out, "luahub_registry_unregisters_dropped_total", "counter",
                   "Unregistrations left to the TTL (queue full).", reg->unregister_dropped);
}

/* A connection with a user opened: registered with the next flush. */
static void r_opened(struct hub_registry *base, struct rentry *e)
{
    struct rreg *reg = (struct rreg *)base;
    if (reg->shutting)
        return;
    hub_list_push_tail(&reg->queue, &e->queue);
    schedule_flush(reg);
}

/* It closed: unregistered with the next flush. */
static void r_closed(struct hub_registry *base, struct rentry *e)
{
    struct rreg *reg = (struct rreg *)base;
    if (reg->base.stopped || reg->shutting)
        return;
    struct gone *g = hub_xmalloc(sizeof(*g) + e->idlen + 1);
    memcpy(g->id, e->id, e->idlen + 1);
    g->user = e->user; /* moves */
    g->ulen = e->ulen;
    e->user = NULL;
    gone_push(reg, g);
    schedule_flush(reg);
}

static const struct hub_registry_ops redis_ops = {
    .opened = r_opened,
    .closed = r_closed,
    .connections = r_connections,
    .disconnect = r_disconnect,
    .shutdown = r_shutdown,
    .stop = r_stop,
    .free = r_free,
    .drained = r_drained,
    .metrics = r_metrics,
    .heartbeat_up = r_heartbeat_up,
};

struct hub_registry *hub_registry_redis_new(struct hub_broker *broker,
                                            const struct hub_registry_options *opt)
{
    struct rreg *reg = hub_xcalloc(1, sizeof(*reg));
    hub_registry_base_init(&reg->base, &redis_ops, broker->loop, opt);
    reg->broker = broker;
    reg->retry_ms = reg->base.refresh_ms < RETRY_MAX_MS ? reg->base.refresh_ms : RETRY_MAX_MS;
    hub_list_init(&reg->queue);
    uv_timer_init(broker->loop, &reg->tick);
    uv_timer_init(broker->loop, &reg->flush);
    uv_timer_init(broker->loop, &reg->guard);
    reg->tick.data = reg->flush.data = reg->guard.data = reg;
    reg->open_handles = 3;
    hub_rbroker_control(broker, on_control, reg);
    /* The first heartbeat on the first loop iteration; until the broker is
     * connected it is retried every retry_ms. */
    uv_timer_start(&reg->tick, on_tick, 0, 0);
    return &reg->base;
}
