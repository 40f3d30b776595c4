/* Presence with the redis broker (issue 11; docs/broker.md, "Presence").
 *
 * Redis keeps, per presence channel, who is in it on every hub (the keys
 * and the scripts are in broker_redis_stream.c): each entry with an expiry
 * score. This process keeps its own clients (channel -> client -> stored
 * value) and:
 *
 *   - sends adds and removes in the order they happen, gathered per loop
 *     iteration (the uv_idle flush) into script calls of up to PRES_CHUNK
 *     clients; a run of changes to one channel is one group of the call;
 *   - refreshes all of them every presence_ttl / 3 (a timer), in pipelined
 *     calls of up to PRES_CHUNK clients, which also re-adds (with their
 *     join events) entries Redis lost, and sweeps the expired entries of
 *     the channels it is in, publishing their leave events: the clients of
 *     a hub that died leave within presence_ttl (an entry lives 2/3 of it
 *     after its last refresh, and a sweep comes at most 1/3 later);
 *   - refreshes at once when its command connection comes back.
 *
 * While Redis is unreachable, changes are dropped (counted): the adds come
 * back with the next refresh, the removed entries expire. Loop thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_redis.h"
#include "luahub/log.h"

#define PRES_CHUNK 100          /* clients + groups per script call */

#define KEY_SET "presence:"
#define KEY_INFO "presence_info:"
#define KEY_USERS "presence_users:"

struct pclient {                /* a client of this process in a channel */
    struct hub_hnode node;      /* pchan.clients, hash of the id */
    char *value;                /* as stored: "a<entry>" or "u<len>:<user><entry>" */
    size_t vlen, idlen;
    char id[];
};

struct pchan {                  /* a presence channel with clients here */
    struct hub_hnode node;      /* b->pchans, hash of the name */
    struct shard *sh;
    struct hub_htable clients;
    int join_leave;
    size_t len;
    char name[];
};

struct pop {                    /* an add or a remove to send */
    struct hub_list link;       /* sh->pops */
    char kind;                  /* 'a', 'r' */
    int join_leave;
    size_t clen, idlen, vlen;   /* data: channel, id, value */
    char data[];
};

static uint64_t ttl_ms(const struct rbroker *b)
{
    return (uint64_t)(b->base.presence_ttl ? b->base.presence_ttl : 60) * 1000u;
}

/* ------------------------------------------------------------------ */
/* Script calls of groups                                              */
/* ------------------------------------------------------------------ */

/* One presence script call being built: its keys and its groups apart
 * (numkeys comes first and is known at the end). */
struct batch {
    struct shard *sh;
    struct hub_rcall *keys, *args;
    unsigned units;             /* clients + groups */
    unsigned groups;
    int refresh;
};

static void batch_open(struct batch *bt, struct shard *sh, int refresh)
{
    bt->sh = sh;
    bt->keys = hub_rbroker_call_new(SCRIPT_PRESENCE);
    bt->args = hub_rbroker_call_new(SCRIPT_PRESENCE);
    bt->units = bt->groups = 0;
    bt->refresh = refresh;
}

/* Room for a group and at least one client. */
static int batch_full(const struct batch *bt)
{
    return bt->units + 2 > PRES_CHUNK;
}

static void append_all(struct hub_rcall *to, const struct hub_rcall *from)
{
    for (int i = 0; i < from->argc; i++)
        hub_rbroker_call_arg(to, from->buf.p + from->off[i], from->len[i]);
}

static void on_ops_reply(void *ud, int status, const redisReply *r);
static void on_refresh_reply(void *ud, int status, const redisReply *r);

/* Sends what the batch holds (if anything) and frees its parts. */
static void batch_send(struct batch *bt)
{
    struct shard *sh = bt->sh;
    struct rbroker *b = sh->b;
    if (bt->groups) {
        uint64_t ttl = ttl_ms(b);
        struct hub_rcall *c = hub_rbroker_call_new(SCRIPT_PRESENCE);
        hub_rbroker_call_argf(c, "%u", bt->groups * 3);
        append_all(c, bt->keys);
        hub_rbroker_call_key(c, b, "", "", 0);      /* the pub/sub prefix */
        hub_rbroker_call_argf(c, "%llu", (unsigned long long)(ttl * 2 / 3));
        hub_rbroker_call_argf(c, "%llu", (unsigned long long)ttl);
        append_all(c, bt->args);
        if (hub_rbroker_call(sh, c, bt->refresh ? on_refresh_reply : on_ops_reply, sh) == 0) {
            if (bt->refresh)
                sh->pres_inflight++;
        } else {
            b->pres_errors++;
        }
    }
    hub_rbroker_call_free(bt->keys);
    hub_rbroker_call_free(bt->args);
    bt->keys = bt->args = NULL;
}

/* Starts a group of `n` clients (0: a sweep) for channel `name`. */
static void batch_group(struct batch *bt, char kind, const char *name, size_t len, int jl,
                        size_t n)
{
    struct rbroker *b = bt->sh->b;
    hub_rbroker_call_key(bt->keys, b, KEY_SET, name, len);
    hub_rbroker_call_key(bt->keys, b, KEY_INFO, name, len);
    hub_rbroker_call_key(bt->keys, b, KEY_USERS, name, len);
    hub_rbroker_call_arg(bt->args, &kind, 1);
    hub_rbroker_call_arg(bt->args, name, len);
    hub_rbroker_call_arg(bt->args, jl ? "1" : "0", 1);
    hub_rbroker_call_argf(bt->args, "%zu", n);
    bt->groups++;
    bt->units++;
}

static void batch_client(struct batch *bt, const char *id, size_t idlen, const char *v,
                         size_t vlen)
{
    hub_rbroker_call_arg(bt->args, id, idlen);
    hub_rbroker_call_arg(bt->args, v, vlen);
    bt->units++;
}

/* A reply's {added, removed, swept}; 0 when it is not of that shape. */
static int counts(const redisReply *r, long long out[3])
{
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 3)
        return 0;
    for (int i = 0; i < 3; i++) {
        if (r->element[i]->type != REDIS_REPLY_INTEGER)
            return 0;
        out[i] = r->element[i]->integer;
    }
    return 1;
}

static void count_reply(struct shard *sh, int status, const redisReply *r, int refresh)
{
    struct rbroker *b = sh->b;
    long long n[3];
    if (status != HUB_OK || !counts(r, n)) {
        b->pres_errors++;
        if (status == HUB_OK)
            hub_log(HUB_LOG_WARN, "%s: presence script failed: %s", sh->tag,
                    r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        return;
    }
    if (refresh)
        b->pres_readded += (uint64_t)n[0];
    b->pres_swept += (uint64_t)n[2];
}

static void on_ops_reply(void *ud, int status, const redisReply *r)
{
    struct shard *sh = ud;
    count_reply(sh, status, r, 0);
}

static void on_refresh_reply(void *ud, int status, const redisReply *r)
{
    struct shard *sh = ud;
    if (sh->pres_inflight)
        sh->pres_inflight--;
    count_reply(sh, status, r, 1);
}

/* ------------------------------------------------------------------ */
/* Sending                                                             */
/* ------------------------------------------------------------------ */

static int cmd_up(const struct shard *sh)
{
    return !sh->b->stopped && sh->cmd.state == C_UP && sh->cmd.ac;
}

/* Sends the queued adds and removes of `sh` in order (runs of one kind on
 * one channel as one group), or drops them when the connection is down. */
static void ops_flush(struct shard *sh)
{
    struct rbroker *b = sh->b;
    struct batch bt;
    struct pop *op;
    int up = cmd_up(sh);
    if (up)
        batch_open(&bt, sh, 0);
    while (!hub_list_empty(&sh->pops)) {
        op = hub_container_of(hub_list_first(&sh->pops), struct pop, link);
        if (!up) {
            b->pres_errors++;
            hub_list_remove(&op->link);
            free(op);
            continue;
        }
        if (batch_full(&bt)) {
            batch_send(&bt);
            batch_open(&bt, sh, 0);
        }
        /* The run of the same kind on the same channel that fits. */
        size_t n = 0, room = PRES_CHUNK - bt.units - 1;
        for (struct hub_list *l = &op->link; l != &sh->pops && n < room; l = l->next, n++) {
            const struct pop *x = hub_container_of(l, struct pop, link);
            if (x->kind != op->kind || x->clen != op->clen ||
                memcmp(x->data, op->data, op->clen))
                break;
        }
        batch_group(&bt, op->kind, op->data, op->clen, op->join_leave, n);
        for (size_t i = 0; i < n; i++) {
            op = hub_container_of(hub_list_first(&sh->pops), struct pop, link);
            batch_client(&bt, op->data + op->clen, op->idlen, op->data + op->clen + op->idlen,
                         op->vlen);
            hub_list_remove(&op->link);
            free(op);
        }
    }
    if (up)
        batch_send(&bt);
}

/* Refreshes every entry of `sh` in Redis (re-adding the missing ones) and,
 * with `sweep`, removes the expired entries of its channels. Skipped while
 * the previous round is unanswered (Redis is slow: nothing piles up). */
static void refresh_shard(struct shard *sh, int sweep)
{
    struct rbroker *b = sh->b;
    if (!cmd_up(sh) || sh->pres_inflight)
        return;
    struct batch bt;
    batch_open(&bt, sh, 1);
    for (size_t i = 0; i < b->pchans.nb; i++)
        for (struct hub_hnode *n = b->pchans.b[i]; n; n = n->next) {
            struct pchan *pc = hub_container_of(n, struct pchan, node);
            if (pc->sh != sh)
                continue;
            size_t left = pc->clients.n, in_group = 0;
            for (size_t j = 0; j < pc->clients.nb; j++)
                for (struct hub_hnode *k = pc->clients.b[j]; k; k = k->next) {
                    struct pclient *e = hub_container_of(k, struct pclient, node);
                    if (in_group == 0) {
                        if (batch_full(&bt)) {
                            batch_send(&bt);
                            batch_open(&bt, sh, 1);
                        }
                        size_t room = PRES_CHUNK - bt.units - 1;
                        in_group = left < room ? left : room;
                        batch_group(&bt, 'f', pc->name, pc->len, pc->join_leave, in_group);
                    }
                    batch_client(&bt, e->id, e->idlen, e->value, e->vlen);
                    b->pres_refreshed++;
                    in_group--;
                    left--;
                }
            if (sweep) {
                if (batch_full(&bt)) {
                    batch_send(&bt);
                    batch_open(&bt, sh, 1);
                }
                batch_group(&bt, 's', pc->name, pc->len, pc->join_leave, 0);
            }
        }
    batch_send(&bt);
}

void hub_rbroker_presence_flush(struct shard *sh)
{
    if (!hub_list_empty(&sh->pops))
        ops_flush(sh);
    if (sh->pres_due) {
        sh->pres_due = 0;
        refresh_shard(sh, 0);
    }
}

void hub_rbroker_presence_resync(struct shard *sh)
{
    struct rbroker *b = sh->b;
    for (size_t i = 0; i < b->pchans.nb; i++)
        for (struct hub_hnode *n = b->pchans.b[i]; n; n = n->next)
            if (hub_container_of(n, struct pchan, node)->sh == sh) {
                sh->pres_due = 1;
                hub_rbroker_schedule_flush(b);
                return;
            }
}

static void on_pres_timer(uv_timer_t *t)
{
    struct rbroker *b = t->data;
    if (b->stopped)
        return;
    if (!b->pchans.n) {
        uv_timer_stop(t);
        b->pres_timer_on = 0;
        return;
    }
    for (uint32_t i = 0; i < b->n; i++) {
        ops_flush(&b->shards[i]);
        refresh_shard(&b->shards[i], 1);
    }
}

/* ------------------------------------------------------------------ */
/* The ops                                                             */
/* ------------------------------------------------------------------ */

static struct pchan *pchan_find(const struct rbroker *b, const char *name, size_t len,
                                uint64_t h)
{
    for (struct hub_hnode *n = hub_htable_chain(&b->pchans, h); n; n = n->next) {
        struct pchan *pc = hub_container_of(n, struct pchan, node);
        if (n->hash == h && pc->len == len && !memcmp(pc->name, name, len))
            return pc;
    }
    return NULL;
}

static struct pclient *pclient_find(const struct pchan *pc, const char *id, size_t idlen,
                                    uint64_t h)
{
    for (struct hub_hnode *n = hub_htable_chain(&pc->clients, h); n; n = n->next) {
        struct pclient *e = hub_container_of(n, struct pclient, node);
        if (n->hash == h && e->idlen == idlen && !memcmp(e->id, id, idlen))
            return e;
    }
    return NULL;
}

static void op_queue(struct rbroker *b, struct shard *sh, char kind, const struct pchan *pc,
                     const char *id, size_t idlen, const char *v, size_t vlen)
{
    struct pop *op = hub_xmalloc(sizeof(*op) + pc->len + idlen + vlen);
    op->kind = kind;
    op->join_leave = pc->join_leave;
    op->clen = pc->len;
    op->idlen = idlen;
    op->vlen = vlen;
    memcpy(op->data, pc->name, pc->len);
    memcpy(op->data + pc->len, id, idlen);
    if (vlen)
        memcpy(op->data + pc->len + idlen, v, vlen);
    hub_list_push_tail(&sh->pops, &op->link);
    hub_rbroker_schedule_flush(b);
}

void hub_rbroker_presence_add(struct hub_broker *hb, const char *channel, size_t len,
                              const struct hub_channel_opts *o, const char *client,
                              const char *user, size_t user_len, const char *entry,
                              size_t entry_len)
{
    struct rbroker *b = (struct rbroker *)hb;
    if (b->stopped)
        return;
    uint64_t h = hub_hash64(channel, len);
    struct pchan *pc = pchan_find(b, channel, len, h);
    if (!pc) {
        pc = hub_xcalloc(1, sizeof(*pc) + len + 1);
        memcpy(pc->name, channel, len);
        pc->len = len;
        pc->node.hash = h;
        pc->sh = shard_of(b, channel, len);
        hub_htable_insert(&b->pchans, &pc->node);
    }
    pc->join_leave = o->join_leave;

    struct hub_buf v = {0};
    if (user) {
        hub_buf_printf(&v, "u%zu:", user_len);
        hub_buf_append(&v, user, user_len);
    } else {
        hub_buf_appends(&v, "a");
    }
    hub_buf_append(&v, entry, entry_len);

    size_t idlen = strlen(client);
    uint64_t eh = hub_hash64(client, idlen);
    struct pclient *e = pclient_find(pc, client, idlen, eh);
    if (e) {                                /* again: the entry may have changed */
        free(e->value);
    } else {
        e = hub_xcalloc(1, sizeof(*e) + idlen + 1);
        memcpy(e->id, client, idlen);
        e->idlen = idlen;
        e->node.hash = eh;
        hub_htable_insert(&pc->clients, &e->node);
        b->pentries++;
    }
    e->value = v.p;
    e->vlen = v.len;
    op_queue(b, pc->sh, 'a', pc, e->id, idlen, e->value, e->vlen);
    if (!b->pres_timer_on) {
        uint64_t every = ttl_ms(b) / 3;
        uv_timer_start(&b->pres_timer, on_pres_timer, every, every);
        b->pres_timer_on = 1;
    }
}

static void pclient_free(struct pclient *e)
{
    free(e->value);
    free(e);
}

static void pchan_free(struct pchan *pc)
{
    struct hub_hnode *n;
    while ((n = hub_htable_pop(&pc->clients)))
        pclient_free(hub_container_of(n, struct pclient, node));
    hub_htable_free(&pc->clients);
    free(pc);
}

void hub_rbroker_presence_remove(struct hub_broker *hb, const char *channel, size_t len,
                                 const struct hub_channel_opts *o, const char *client)
{
    struct rbroker *b = (struct rbroker *)hb;
    (void)o;
    uint64_t h = hub_hash64(channel, len);
    struct pchan *pc = pchan_find(b, channel, len, h);
    size_t idlen = strlen(client);
    struct pclient *e = pc ? pclient_find(pc, client, idlen, hub_hash64(client, idlen)) : NULL;
    if (!e)
        return;
    hub_htable_remove(&pc->clients, &e->node);
    b->pentries--;
    if (!b->stopped)
        op_queue(b, pc->sh, 'r', pc, client, idlen, NULL, 0);
    pclient_free(e);
    if (!pc->clients.n) {
        hub_htable_remove(&b->pchans, &pc->node);
        pchan_free(pc);
    }
}

/* ------------------------------------------------------------------ */
/* Reads                                                               */
/* ------------------------------------------------------------------ */

struct pread {
    struct shard *sh;
    uint32_t max;
    hub_broker_presence_cb cb;
    void *ud;
};

static int presence_parse(const redisReply *r, uint32_t max, struct hub_presence_result *res,
                          struct hub_buf *list)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 || r->elements - 3 > max)
        return -1;
    for (size_t i = 0; i < r->elements; i++)
        if (r->element[i]->type != (i < 3 ? REDIS_REPLY_INTEGER : REDIS_REPLY_STRING) ||
            (i < 3 && r->element[i]->integer < 0))
            return -1;
    memset(res, 0, sizeof(*res));
    res->clients = (uint64_t)r->element[0]->integer;
    res->users = (uint64_t)r->element[1]->integer;
    res->truncated = r->element[2]->integer != 0;
    if (max) {
        hub_buf_appends(list, "[");
        for (size_t i = 3; i < r->elements; i++) {
            hub_buf_appends(list, i > 3 ? ",{" : "{");
            hub_buf_append(list, r->element[i]->str, r->element[i]->len);
            hub_buf_appends(list, "}");
        }
        hub_buf_appends(list, "]");
        res->list = list;
    }
    return 0;
}

static void on_presence_reply(void *ud, int status, const redisReply *r)
{
    struct pread *op = ud;
    struct rbroker *b = op->sh->b;
    hub_broker_presence_cb cb = op->cb;
    void *cud = op->ud;
    struct hub_presence_result res;
    struct hub_buf list = {0};
    int ok = status == HUB_OK && presence_parse(r, op->max, &res, &list) == 0;
    if (status == HUB_OK && !ok)
        hub_log(HUB_LOG_WARN, "%s: presence read failed: %s", op->sh->tag,
                r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
    if (!ok)
        b->pres_errors++;
    free(op);
    cb(cud, ok ? HUB_OK : HUB_EUNAVAILABLE, ok ? &res : NULL);
    hub_buf_free(&list);
}

int hub_rbroker_presence(struct hub_broker *hb, const char *channel, size_t len,
                         const struct hub_channel_opts *o, uint32_t max,
                         hub_broker_presence_cb cb, void *ud)
{
    struct rbroker *b = (struct rbroker *)hb;
    if (b->stopped)
        return HUB_EUNAVAILABLE;
    struct shard *sh = shard_of(b, channel, len);
    /* Changes made before come first (they wait for this iteration's
     * flush otherwise). */
    if (!hub_list_empty(&sh->pops))
        ops_flush(sh);
    struct hub_rcall *c = hub_rbroker_call_new(SCRIPT_PRESENCE_READ);
    hub_rbroker_call_arg(c, "3", 1);
    hub_rbroker_call_key(c, b, KEY_SET, channel, len);
    hub_rbroker_call_key(c, b, KEY_INFO, channel, len);
    hub_rbroker_call_key(c, b, KEY_USERS, channel, len);
    hub_rbroker_call_key(c, b, "", "", 0);          /* the pub/sub prefix */
    hub_rbroker_call_arg(c, channel, len);
    hub_rbroker_call_arg(c, o && o->join_leave ? "1" : "0", 1);
    hub_rbroker_call_argf(c, "%u", max);
    struct pread *op = hub_xmalloc(sizeof(*op));
    op->sh = sh;
    op->max = max;
    op->cb = cb;
    op->ud = ud;
    if (hub_rbroker_call(op->sh, c, on_presence_reply, op) < 0) {
        free(op);
        return HUB_EUNAVAILABLE;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Life cycle, metrics                                                 */
/* ------------------------------------------------------------------ */

void hub_rbroker_presence_init(struct rbroker *b)
{
    b->base.presence_ttl = 60;
    uv_timer_init(b->base.loop, &b->pres_timer);
    b->pres_timer.data = b;
    b->open_handles++;
}

void hub_rbroker_presence_free(struct rbroker *b)
{
    struct hub_hnode *n;
    while ((n = hub_htable_pop(&b->pchans)))
        pchan_free(hub_container_of(n, struct pchan, node));
    hub_htable_free(&b->pchans);
    for (uint32_t i = 0; i < b->n; i++) {
        struct pop *op;
        while (!hub_list_empty(&b->shards[i].pops)) {
            op = hub_container_of(hub_list_first(&b->shards[i].pops), struct pop, link);
            hub_list_remove(&op->link);
            free(op);
        }
    }
}

void hub_rbroker_presence_metrics(const struct rbroker *b, struct hub_buf *out)
{
    hub_metric_one(out, "luahub_presence_channels", "gauge",
                   "Presence channels with at least one client of this process.",
                   b->pchans.n);
    hub_metric_one(out, "luahub_presence_clients", "gauge",
                   "Entries of this process's clients in presence channels (refreshed in "
                   "Redis every presence_ttl / 3).", b->pentries);
    hub_metric_one(out, "luahub_presence_refreshed_total", "counter",
                   "Presence entries sent in refresh rounds.", b->pres_refreshed);
    hub_metric_one(out, "luahub_presence_readded_total", "counter",
                   "Presence entries a refresh found missing in Redis and added again (with "
                   "their join events).", b->pres_readded);
    hub_metric_one(out, "luahub_presence_swept_total", "counter",
                   "Expired presence entries (of hubs that stopped refreshing) this process "
                   "removed, with their leave events.", b->pres_swept);
    hub_metric_one(out, "luahub_presence_errors_total", "counter",
                   "Presence changes or reads that Redis did not take (unavailable, over the "
                   "cap, an error).", b->pres_errors);
}
