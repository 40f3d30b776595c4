/* The connection registry and instance heartbeat (see registry.h and
 * docs/broker.md, "Connection registry").
 *
 * Local state: a table of this process's open connections keyed by client
 * id (all of them: the heartbeat counts them; those with a user are also in
 * Redis). Redis traffic goes through the broker's command() op, so it has
 * the broker's caps, timeouts and fail-fast rules, and never blocks:
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
#include "luahub/registry.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <yajl/yajl_tree.h>

#include "broker_impl.h"
#include "luahub/log.h"
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

struct rentry {
    struct hub_bnode node;          /* first: keyed by client id */
    struct rentry *prev, *next;     /* every entry */
    struct rentry *qprev, *qnext;   /* registrations not yet flushed */
    int queued;
    char *user;                     /* NULL: not registered in Redis */
    size_t ulen;
    long long connected;            /* unix seconds */
    char id[];
};

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

struct hub_registry {
    uv_loop_t *loop;
    struct hub_broker *broker;
    int redis;                      /* the broker has command() and control() */
    char *instance, *address, *prefix;
    size_t plen;
    unsigned ttl_ms, refresh_ms, retry_ms, max_unregisters;
    hub_registry_disconnect_fn disconnect_user;
    void *ud;
    long long started;

    struct hub_bset table;
    struct rentry *all;             /* every entry */
    size_t nall, nusers;            /* entries (each has a user; the same) */
    size_t nanon;                   /* connections without a user: counted only */
    struct rentry *qhead, *qtail;   /* registrations to flush */
    struct gone *ghead, *gtail;     /* unregistrations to flush */
    size_t ngone;

    uv_timer_t tick, flush, guard;
    unsigned open_handles;
    int flush_armed;
    int stopped, shutting;
    unsigned inflight;              /* our own commands awaiting a reply */
    unsigned refresh_inflight;      /* refresh EVALs of the last heartbeat */
    hub_registry_shutdown_cb shutdown_cb;
    void *shutdown_ud;
    int hb_ok;                      /* the last heartbeat was answered */
    int hb_failing;                 /* logged "failing" (for the "resumed" line) */
    int hb_ever_ok;                 /* a heartbeat was answered once */
    struct cmdb cmd;

    /* metrics */
    uint64_t heartbeats, heartbeat_errors, unregister_dropped, control_msgs, disconnects;
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
static void cmd_key(struct hub_registry *reg, const char *kind, const char *name, size_t len)
{
    struct cmdb *c = &reg->cmd;
    c->off[c->n] = c->buf.len;
    hub_buf_append(&c->buf, reg->prefix, reg->plen);
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

/* Sends the command built in reg->cmd. Returns what command() returns. */
static int cmd_send(struct hub_registry *reg, hub_broker_reply_cb cb, void *ud)
{
    struct cmdb *c = &reg->cmd;
    for (int i = 0; i < c->n; i++)
        c->argv[i] = c->buf.p + c->off[i];
    return reg->broker->ops->command(reg->broker, c->n, c->argv, c->len, cb, ud);
}

/* ------------------------------------------------------------------ */
/* Our own commands' completions                                        */
/* ------------------------------------------------------------------ */

static void shutdown_maybe_done(struct hub_registry *reg)
{
    if (!reg->shutdown_cb || reg->inflight > 0)
        return;
    hub_registry_shutdown_cb cb = reg->shutdown_cb;
    void *ud = reg->shutdown_ud;
    reg->shutdown_cb = NULL;
    if (!reg->stopped)
        uv_timer_stop(&reg->guard);
    cb(ud);
}

static void on_tick(uv_timer_t *t);

static void heartbeat_failed(struct hub_registry *reg, const char *why)
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
    if (!reg->stopped && !reg->shutting)
        uv_timer_start(&reg->tick, on_tick, reg->retry_ms, 0);
}

static void on_heartbeat_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct hub_registry *reg = ud;
    reg->inflight--;
    if (status == HUB_BROKER_OK && r->type != HUB_REPLY_ERROR) {
        reg->heartbeats++;
        reg->hb_ok = 1;
        reg->hb_ever_ok = 1;
        if (reg->hb_failing) {
            reg->hb_failing = 0;
            hub_log(HUB_LOG_INFO, "registry: heartbeat resumed (instance %s)", reg->instance);
        }
    } else if (!reg->stopped && !reg->shutting) {
        heartbeat_failed(reg, status == HUB_BROKER_OK ? r->str : "Redis unavailable");
    }
    shutdown_maybe_done(reg);
}

static void on_register_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct hub_registry *reg = ud;
    reg->inflight--;
    /* A failure is repaired by the next heartbeat, which registers every
     * connection again. */
    if (status == HUB_BROKER_OK && r->type == HUB_REPLY_ERROR)
        hub_log(HUB_LOG_ERROR, "registry: registration script failed: %s", r->str);
    shutdown_maybe_done(reg);
}

static void on_refresh_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct hub_registry *reg = ud;
    reg->refresh_inflight--;
    on_register_reply(ud, status, r);
}

/* The ids of one unregistration EVAL, to re-queue them if it fails. */
struct gone_batch {
    struct hub_registry *reg;
    struct gone *list;
};

static void gone_push(struct hub_registry *reg, struct gone *g);

static void on_unregister_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct gone_batch *gb = ud;
    struct hub_registry *reg = gb->reg;
    reg->inflight--;
    int failed = status != HUB_BROKER_OK || r->type == HUB_REPLY_ERROR;
    struct gone *g = gb->list, *next;
    for (; g; g = next) {
        next = g->next;
        if (failed && !reg->stopped && !reg->shutting) {
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

static void gone_push(struct hub_registry *reg, struct gone *g)
{
    if (reg->ngone >= reg->max_unregisters) {
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
static int flush_gone(struct hub_registry *reg)
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

static void queue_unlink(struct hub_registry *reg, struct rentry *e)
{
    if (!e->queued)
        return;
    if (e->qprev)
        e->qprev->qnext = e->qnext;
    else
        reg->qhead = e->qnext;
    if (e->qnext)
        e->qnext->qprev = e->qprev;
    else
        reg->qtail = e->qprev;
    e->qprev = e->qnext = NULL;
    e->queued = 0;
}

/* Registers up to CHUNK entries with a user, starting at `start` and
 * following `next` (all) or `qnext` (queued). Returns the entry after the
 * last one covered; *sent = 1 when a command went out. When the broker
 * refused: *err = -1 and returns `start`. */
static struct rentry *send_register(struct hub_registry *reg, struct rentry *start, int queue,
                                    hub_broker_reply_cb cb, int *err, int *sent)
{
    struct cmdb *c = &reg->cmd;
    struct rentry *x;
    int k = 0;
    *sent = 0;
    cmd_reset(c);
    cmd_args(c, "EVAL");
    cmd_arg(c, register_lua, sizeof(register_lua) - 1);
    size_t nkeys_at = (size_t)c->n;
    cmd_args(c, "0");
    for (x = start; x && k < CHUNK; x = queue ? x->qnext : x->next) {
        if (!x->user)
            continue;
        cmd_key(reg, "conn:", x->id, x->node.len);
        cmd_key(reg, "user:", x->user, x->ulen);
        k++;
    }
    struct rentry *end = x;
    if (k == 0) {
        *err = 0;
        return end;
    }
    cmd_argf(c, "%u", reg->ttl_ms);
    cmd_args(c, reg->instance);
    for (x = start; x != end; x = queue ? x->qnext : x->next) {
        if (!x->user)
            continue;
        cmd_arg(c, x->id, x->node.len);
        cmd_arg(c, x->user, x->ulen);
        cmd_argf(c, "%lld", x->connected);
    }
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
static void flush_now(struct hub_registry *reg)
{
    if (!reg->redis || reg->stopped)
        return;
    int err = 0, sent;
    while (reg->qhead && !err) {
        struct rentry *end = send_register(reg, reg->qhead, 1, on_register_reply, &err, &sent);
        if (err)
            break;
        while (reg->qhead && reg->qhead != end)
            queue_unlink(reg, reg->qhead);
    }
    if (err) {
        /* Redis unavailable or over the cap: the heartbeat (retried soon)
         * registers every connection anyway. */
        while (reg->qhead)
            queue_unlink(reg, reg->qhead);
    }
    flush_gone(reg);
}

static void on_flush(uv_timer_t *t)
{
    struct hub_registry *reg = t->data;
    reg->flush_armed = 0;
    flush_now(reg);
}

static void schedule_flush(struct hub_registry *reg)
{
    if (reg->flush_armed || reg->stopped || !reg->redis)
        return;
    reg->flush_armed = 1;
    uv_timer_start(&reg->flush, on_flush, 0, 0);
}

/* ------------------------------------------------------------------ */
/* Heartbeat                                                           */
/* ------------------------------------------------------------------ */

static void on_tick(uv_timer_t *t)
{
    struct hub_registry *reg = t->data;
    if (reg->stopped || reg->shutting)
        return;
    struct cmdb *c = &reg->cmd;

    cmd_reset(c);
    cmd_args(c, "HSET");
    cmd_key(reg, "instance:", reg->instance, strlen(reg->instance));
    cmd_args(c, "connections");
    cmd_argf(c, "%zu", reg->nall + reg->nanon);
    cmd_args(c, "started");
    cmd_argf(c, "%lld", reg->started);
    cmd_args(c, "address");
    cmd_args(c, reg->address);
    cmd_args(c, "pid");
    cmd_argf(c, "%ld", (long)getpid());
    if (cmd_send(reg, on_heartbeat_reply, reg) < 0) {
        heartbeat_failed(reg, "Redis unavailable");
        return;
    }
    reg->inflight++;
    cmd_reset(c);
    cmd_args(c, "PEXPIRE");
    cmd_key(reg, "instance:", reg->instance, strlen(reg->instance));
    cmd_argf(c, "%u", reg->ttl_ms);
    if (cmd_send(reg, on_heartbeat_reply, reg) < 0) {
        heartbeat_failed(reg, "Redis unavailable");
        return;
    }
    reg->inflight++;

    /* Refresh (re-register) every connection, unless the last round is
     * still unanswered: Redis is slow, do not pile up. */
    if (reg->refresh_inflight == 0) {
        int err = 0, sent;
        struct rentry *e = reg->all;
        while (e) {
            e = send_register(reg, e, 0, on_refresh_reply, &err, &sent);
            if (err)
                break;
            if (sent)
                reg->refresh_inflight++;
        }
        if (!err) {
            /* Everything queued is covered by the refresh. */
            while (reg->qhead)
                queue_unlink(reg, reg->qhead);
        }
    }
    flush_gone(reg);
    uv_timer_start(&reg->tick, on_tick, reg->refresh_ms, 0);
}

/* ------------------------------------------------------------------ */
/* Control channel                                                     */
/* ------------------------------------------------------------------ */

static void on_control(void *ud, const char *msg, size_t len)
{
    struct hub_registry *reg = ud;
    if (reg->stopped)
        return;
    reg->control_msgs++;
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
        reg->disconnects++;
        hub_log(HUB_LOG_INFO, "registry: disconnecting user \"%s\" (control channel)", u);
        if (reg->disconnect_user)
            reg->disconnect_user(reg->ud, u, strlen(u));
    } else {
        hub_log(HUB_LOG_DEBUG, "registry: control message ignored (unknown op)");
    }
    yajl_tree_free(v);
}

/* ------------------------------------------------------------------ */
/* Public API                                                          */
/* ------------------------------------------------------------------ */

struct hub_registry *hub_registry_new(uv_loop_t *loop, struct hub_broker *broker,
                                      const struct hub_registry_options *opt)
{
    struct hub_registry *reg = hub_xcalloc(1, sizeof(*reg));
    reg->loop = loop;
    reg->broker = broker;
    reg->redis = broker->ops->command && broker->ops->control;
    reg->instance = hub_xstrdup(opt->instance ? opt->instance : "");
    reg->address = hub_xstrdup(opt->address ? opt->address : "");
    reg->prefix = hub_xstrdup(opt->prefix ? opt->prefix : "luahub:");
    reg->plen = strlen(reg->prefix);
    reg->ttl_ms = opt->ttl_ms ? opt->ttl_ms : 30000u;
    reg->refresh_ms = opt->refresh_ms ? opt->refresh_ms : 10000u;
    reg->retry_ms = reg->refresh_ms < RETRY_MAX_MS ? reg->refresh_ms : RETRY_MAX_MS;
    reg->max_unregisters = opt->max_unregisters ? opt->max_unregisters : 100000u;
    reg->disconnect_user = opt->disconnect_user;
    reg->ud = opt->ud;
    reg->started = (long long)time(NULL);
    reg->hb_ok = !reg->redis;

    uv_timer_init(loop, &reg->tick);
    uv_timer_init(loop, &reg->flush);
    uv_timer_init(loop, &reg->guard);
    reg->tick.data = reg->flush.data = reg->guard.data = reg;
    reg->open_handles = 3;
    if (reg->redis) {
        broker->ops->control(broker, on_control, reg);
        /* The first heartbeat on the first loop iteration; until the
         * broker is connected it is retried every retry_ms. */
        uv_timer_start(&reg->tick, on_tick, 0, 0);
    }
    return reg;
}

int hub_registry_conn_open(struct hub_registry *reg, const char *client_id,
                           const char *user, size_t user_len)
{
    if (reg->stopped)
        return 0;
    if (!user) {                    /* ~130 bytes saved per anonymous connection */
        reg->nanon++;
        return 0;
    }
    size_t idlen = strlen(client_id);
    uint64_t h = hub_broker_hash64(client_id, idlen);
    if (hub_bset_find(&reg->table, client_id, idlen, h))
        return 0;                   /* opened twice: keep the first */
    struct rentry *e = hub_xcalloc(1, sizeof(*e) + idlen + 1);
    memcpy(e->id, client_id, idlen + 1);
    e->node.hash = h;
    e->node.name = e->id;
    e->node.len = idlen;
    e->connected = (long long)time(NULL);
    e->user = hub_xstrndup(user, user_len);
    e->ulen = user_len;
    reg->nusers++;
    hub_bset_insert(&reg->table, &e->node);
    e->next = reg->all;
    if (reg->all)
        reg->all->prev = e;
    reg->all = e;
    reg->nall++;
    if (reg->redis && !reg->shutting) {
        e->queued = 1;
        e->qprev = reg->qtail;
        if (reg->qtail)
            reg->qtail->qnext = e;
        else
            reg->qhead = e;
        reg->qtail = e;
        schedule_flush(reg);
    }
    return 1;
}

void hub_registry_conn_close(struct hub_registry *reg, const char *client_id,
                             int registered)
{
    if (!registered) {
        if (reg->nanon)
            reg->nanon--;
        return;
    }
    size_t idlen = strlen(client_id);
    struct rentry *e = (struct rentry *)hub_bset_find(&reg->table, client_id, idlen,
                                                      hub_broker_hash64(client_id, idlen));
    if (!e)
        return;
    hub_bset_remove(&reg->table, &e->node);
    if (e->prev)
        e->prev->next = e->next;
    else
        reg->all = e->next;
    if (e->next)
        e->next->prev = e->prev;
    reg->nall--;
    queue_unlink(reg, e);
    if (e->user) {
        reg->nusers--;
        if (reg->redis && !reg->stopped && !reg->shutting) {
            struct gone *g = hub_xmalloc(sizeof(*g) + idlen + 1);
            memcpy(g->id, e->id, idlen + 1);
            g->user = e->user;      /* moves */
            g->ulen = e->ulen;
            e->user = NULL;
            gone_push(reg, g);
            schedule_flush(reg);
        }
    }
    free(e->user);
    free(e);
}

static void json_entry(struct hub_buf *b, int first, const char *id, size_t idlen,
                       const char *user, size_t ulen, const char *inst, size_t ilen,
                       const char *connected, size_t clen)
{
    hub_buf_appends(b, first ? "{\"client\":" : ",{\"client\":");
    hub_buf_append_json_string(b, id, idlen);
    hub_buf_appends(b, ",\"user\":");
    hub_buf_append_json_string(b, user, ulen);
    hub_buf_appends(b, ",\"instance\":");
    hub_buf_append_json_string(b, inst, ilen);
    hub_buf_appends(b, ",\"connected\":");
    /* A number, whatever Redis holds: digits only. */
    size_t k = 0;
    while (k < clen && k < 20 && connected[k] >= '0' && connected[k] <= '9')
        k++;
    if (k == 0)
        hub_buf_appends(b, "0");
    else
        hub_buf_append(b, connected, k);
    hub_buf_appends(b, "}");
}

struct query {
    struct hub_registry *reg;
    hub_registry_list_cb cb;
    void *ud;
    size_t ulen;
    char user[];
};

static void on_query_reply(void *ud, int status, const struct hub_broker_reply *r)
{
    struct query *q = ud;
    if (status != HUB_BROKER_OK || r->type != HUB_REPLY_ARRAY) {
        if (status == HUB_BROKER_OK && r->type == HUB_REPLY_ERROR)
            hub_log(HUB_LOG_ERROR, "registry: connections query failed: %s", r->str);
        q->cb(q->ud, HUB_BROKER_UNAVAILABLE, NULL, 0);
        free(q);
        return;
    }
    struct hub_buf b = {0};
    hub_buf_appends(&b, "{\"user\":");
    hub_buf_append_json_string(&b, q->user, q->ulen);
    hub_buf_printf(&b, ",\"count\":%zu,\"connections\":[", r->n / 4);
    for (size_t i = 0; i + 3 < r->n; i += 4) {
        const struct hub_broker_reply *e = &r->elem[i];
        json_entry(&b, i == 0, e[0].str ? e[0].str : "", e[0].len, e[1].str ? e[1].str : "",
                   e[1].len, e[2].str ? e[2].str : "", e[2].len, e[3].str ? e[3].str : "0",
                   e[3].len);
    }
    hub_buf_appends(&b, "]}");
    q->cb(q->ud, HUB_BROKER_OK, b.p, b.len);
    hub_buf_free(&b);
    free(q);
}

int hub_registry_connections(struct hub_registry *reg, const char *user, size_t len,
                             hub_registry_list_cb cb, void *ud)
{
    if (reg->stopped)
        return HUB_BROKER_UNAVAILABLE;
    if (!reg->redis) {
        struct hub_buf b = {0};
        size_t n = 0;
        hub_buf_appends(&b, "{\"user\":");
        hub_buf_append_json_string(&b, user, len);
        hub_buf_appends(&b, ",\"count\":");
        size_t count_at = b.len;
        hub_buf_appends(&b, ",\"connections\":[");
        /* Oldest first, like Redis' sorted ids would roughly be. */
        struct rentry *last = reg->all;
        while (last && last->next)
            last = last->next;
        for (struct rentry *e = last; e; e = e->prev) {
            if (!e->user || e->ulen != len || memcmp(e->user, user, len) != 0)
                continue;
            char t[24];
            int tl = snprintf(t, sizeof(t), "%lld", e->connected);
            json_entry(&b, n == 0, e->id, e->node.len, e->user, e->ulen, reg->instance,
                       strlen(reg->instance), t, (size_t)tl);
            n++;
        }
        hub_buf_appends(&b, "]}");
        /* Splice the count in. */
        char cnt[24];
        int cl = snprintf(cnt, sizeof(cnt), "%zu", n);
        struct hub_buf out = {0};
        hub_buf_append(&out, b.p, count_at);
        hub_buf_append(&out, cnt, (size_t)cl);
        hub_buf_append(&out, b.p + count_at, b.len - count_at);
        hub_buf_free(&b);
        cb(ud, HUB_BROKER_OK, out.p, out.len);
        hub_buf_free(&out);
        return 0;
    }
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
    if (status == HUB_BROKER_OK && r->type == HUB_REPLY_INTEGER) {
        if (d->cb)
            d->cb(d->ud, HUB_BROKER_OK, r->integer);
    } else if (d->cb) {
        d->cb(d->ud, HUB_BROKER_UNAVAILABLE, 0);
    }
    free(d);
}

int hub_registry_disconnect(struct hub_registry *reg, const char *user, size_t len,
                            hub_registry_done_cb cb, void *ud)
{
    if (reg->stopped)
        return HUB_BROKER_UNAVAILABLE;
    if (!reg->redis) {
        reg->disconnects++;
        if (reg->disconnect_user)
            reg->disconnect_user(reg->ud, user, len);
        if (cb)
            cb(ud, HUB_BROKER_OK, 1);
        return 0;
    }
    struct hub_buf msg = {0};
    hub_buf_appends(&msg, "{\"op\":\"disconnect\",\"user\":");
    hub_buf_append_json_string(&msg, user, len);
    hub_buf_appends(&msg, ",\"from\":");
    hub_buf_append_json_string(&msg, reg->instance, strlen(reg->instance));
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
    struct hub_registry *reg = t->data;
    if (!reg->shutdown_cb)
        return;
    hub_log(HUB_LOG_WARN, "registry: %u commands unanswered after %u ms at shutdown; the "
                          "TTL will remove the rest",
            reg->inflight, SHUTDOWN_GUARD_MS);
    hub_registry_shutdown_cb cb = reg->shutdown_cb;
    reg->shutdown_cb = NULL;
    cb(reg->shutdown_ud);
}

void hub_registry_shutdown(struct hub_registry *reg, hub_registry_shutdown_cb cb, void *ud)
{
    if (reg->stopped || reg->shutting || !reg->redis) {
        reg->shutting = 1;
        if (!reg->stopped)
            uv_timer_stop(&reg->tick);
        cb(ud);
        return;
    }
    /* Everything still registered goes, with what was queued. */
    while (reg->qhead)
        queue_unlink(reg, reg->qhead);
    for (struct rentry *e = reg->all; e; e = e->next) {
        if (!e->user)
            continue;
        struct gone *g = hub_xmalloc(sizeof(*g) + e->node.len + 1);
        memcpy(g->id, e->id, e->node.len + 1);
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
    cmd_key(reg, "instance:", reg->instance, strlen(reg->instance));
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
    struct hub_registry *reg = h->data;
    reg->open_handles--;
}

void hub_registry_stop(struct hub_registry *reg)
{
    if (!reg || reg->stopped)
        return;
    reg->stopped = 1;
    if (reg->redis)
        reg->broker->ops->control(reg->broker, NULL, NULL);
    uv_close((uv_handle_t *)&reg->tick, on_closed);
    uv_close((uv_handle_t *)&reg->flush, on_closed);
    uv_close((uv_handle_t *)&reg->guard, on_closed);
    while (reg->qhead)
        queue_unlink(reg, reg->qhead);
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

void hub_registry_free(struct hub_registry *reg)
{
    if (!reg)
        return;
    if (!reg->stopped || reg->open_handles) {
        hub_log(HUB_LOG_ERROR, "registry freed before stop() and a drained loop: leaking it");
        return;
    }
    struct rentry *e = reg->all, *next;
    for (; e; e = next) {
        next = e->next;
        free(e->user);
        free(e);
    }
    hub_bset_free(&reg->table);
    hub_buf_free(&reg->cmd.buf);
    free(reg->instance);
    free(reg->address);
    free(reg->prefix);
    free(reg);
}

void hub_registry_metrics(const struct hub_registry *reg, struct hub_buf *out)
{
    hub_buf_printf(out,
                   "# HELP luahub_registry_connections Connections of this instance with a "
                   "user (registered in Redis with the redis broker).\n"
                   "# TYPE luahub_registry_connections gauge\n"
                   "luahub_registry_connections %zu\n"
                   "# HELP luahub_registry_heartbeat_up 1 when the last instance heartbeat "
                   "was answered by Redis (memory broker: always).\n"
                   "# TYPE luahub_registry_heartbeat_up gauge\n"
                   "luahub_registry_heartbeat_up %d\n"
                   "# HELP luahub_registry_heartbeats_total Heartbeat commands answered.\n"
                   "# TYPE luahub_registry_heartbeats_total counter\n"
                   "luahub_registry_heartbeats_total %llu\n"
                   "# HELP luahub_registry_heartbeat_errors_total Heartbeats that failed.\n"
                   "# TYPE luahub_registry_heartbeat_errors_total counter\n"
                   "luahub_registry_heartbeat_errors_total %llu\n"
                   "# HELP luahub_registry_unregisters_pending Unregistrations waiting for "
                   "Redis.\n"
                   "# TYPE luahub_registry_unregisters_pending gauge\n"
                   "luahub_registry_unregisters_pending %zu\n"
                   "# HELP luahub_registry_unregisters_dropped_total Unregistrations left to "
                   "the TTL (queue full).\n"
                   "# TYPE luahub_registry_unregisters_dropped_total counter\n"
                   "luahub_registry_unregisters_dropped_total %llu\n"
                   "# HELP luahub_registry_control_messages_total Messages received on the "
                   "control channel.\n"
                   "# TYPE luahub_registry_control_messages_total counter\n"
                   "luahub_registry_control_messages_total %llu\n"
                   "# HELP luahub_registry_user_disconnects_total Disconnect-user requests "
                   "handled by this instance.\n"
                   "# TYPE luahub_registry_user_disconnects_total counter\n"
                   "luahub_registry_user_disconnects_total %llu\n",
                   reg->nusers, reg->hb_ok && !reg->stopped,
                   (unsigned long long)reg->heartbeats,
                   (unsigned long long)reg->heartbeat_errors, reg->ngone,
                   (unsigned long long)reg->unregister_dropped,
                   (unsigned long long)reg->control_msgs, (unsigned long long)reg->disconnects);
}

size_t hub_registry_local_count(const struct hub_registry *reg)
{
    return reg->nall + reg->nanon;
}
