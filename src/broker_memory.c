/* The in-process broker: one process, no upstream. publish() hands the very
 * frame it was given to `deliver` (no copy), then completes. It keeps no
 * copy of the channel registry: the hub finds (or does not find) the
 * channel's subscribers itself.
 *
 * History: a stream per history channel, created by its first publish or
 * read: the offset, a random epoch, and a ring of the last history_size
 * frames (references, no copies). The frames go history_ttl after the last
 * publish, the stream itself max(history_ttl, HUB_STREAM_META_TTL) after it
 * (history_ttl when nothing was ever published); expiry is checked when a
 * stream is used and by a sweep that looks at SWEEP_BATCH streams a second.
 *
 * Presence: per presence channel the clients (id -> entry) and the number
 * of clients per user, for join on a user's first client and leave on its
 * last. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_impl.h"
#include "luahub/hash.h"
#include "luahub/list.h"
#include "luahub/metrics.h"
#include "luahub/util.h"
#include "registry_impl.h"

#define SWEEP_MS 1000
#define SWEEP_BATCH 1000

struct mstream {
    struct hub_hnode node;          /* b->streams, hash of the name */
    struct hub_list all;            /* b->all: the sweep's round */
    uint64_t top;                   /* offset of the last message */
    char epoch[17];
    struct hub_msg **ring;          /* count frames from head, oldest first */
    uint32_t cap, head, count;
    uint64_t touched_ms;            /* last publish (or creation) */
    uint64_t frames_ttl_ms;         /* frames live this long after it */
    uint64_t meta_ttl_ms;           /* the stream this long */
    size_t len;
    char name[];
};

struct ucount {                     /* clients of one user in one channel */
    struct hub_hnode node;
    uint32_t n;
    size_t len;
    char user[];
};

struct pentry {                     /* one client in one channel */
    struct hub_hnode node;
    struct ucount *user;            /* NULL: anonymous */
    char *entry;
    size_t entry_len, idlen;
    char id[];
};

struct mpresence {
    struct hub_hnode node;          /* b->presence */
    struct hub_htable clients;      /* pentry */
    struct hub_htable users;        /* ucount */
    size_t len;
    char name[];
};

struct mbroker {
    struct hub_broker base;     /* first: the ops receive &base */
    int stopped;
    struct hub_htable streams;
    struct hub_list all;        /* every stream; the sweep resumes at its head */
    struct hub_htable presence;
    uv_timer_t sweep;
    int sweep_open;
    uint64_t messages;          /* frames kept in rings (gauge) */
    uint64_t expired;           /* streams expired */
};

/* ---- streams ------------------------------------------------------------ */

static struct mstream *stream_find(struct mbroker *b, const char *name, size_t len, uint64_t h)
{
    for (struct hub_hnode *n = hub_htable_chain(&b->streams, h); n; n = n->next) {
        struct mstream *s = hub_container_of(n, struct mstream, node);
        if (n->hash == h && s->len == len && !memcmp(s->name, name, len))
            return s;
    }
    return NULL;
}

static void frames_drop(struct mbroker *b, struct mstream *s)
{
    for (uint32_t i = 0; i < s->count; i++)
        hub_msg_unref(s->ring[(s->head + i) % s->cap]);
    b->messages -= s->count;
    free(s->ring);
    s->ring = NULL;
    s->cap = s->head = s->count = 0;
}

static void stream_free(struct mbroker *b, struct mstream *s)
{
    frames_drop(b, s);
    hub_htable_remove(&b->streams, &s->node);
    hub_list_remove(&s->all);
    free(s);
}

/* Applies expiry to `s` at `now`: its frames, or all of it. Returns NULL
 * when the stream is gone. */
static struct mstream *stream_expire(struct mbroker *b, struct mstream *s, uint64_t now)
{
    if (now - s->touched_ms >= s->meta_ttl_ms) {
        b->expired++;
        stream_free(b, s);
        return NULL;
    }
    if (s->count && now - s->touched_ms >= s->frames_ttl_ms)
        frames_drop(b, s);
    return s;
}

/* The stream of `name`, created (top 0, a new epoch) when there is none. */
static struct mstream *stream_get(struct mbroker *b, const char *name, size_t len,
                                  const struct hub_channel_opts *o, uint64_t now)
{
    uint64_t h = hub_hash64(name, len);
    struct mstream *s = stream_find(b, name, len, h);
    if (s)
        s = stream_expire(b, s, now);
    if (s)
        return s;
    s = hub_xcalloc(1, sizeof(*s) + len + 1);
    memcpy(s->name, name, len);
    s->len = len;
    s->node.hash = h;
    hub_random_hex(s->epoch, 8);
    s->touched_ms = now;
    s->frames_ttl_ms = s->meta_ttl_ms = (uint64_t)o->history_ttl * 1000u;
    hub_htable_insert(&b->streams, &s->node);
    hub_list_push_tail(&b->all, &s->all);
    return s;
}

static void stream_append(struct mbroker *b, struct mstream *s, struct hub_msg *m,
                          uint32_t size)
{
    if (s->count == size && s->count) {     /* full: the oldest goes */
        hub_msg_unref(s->ring[s->head]);
        s->ring[s->head] = hub_msg_ref(m);
        s->head = (s->head + 1) % s->cap;
        return;
    }
    if (s->count == s->cap) {               /* grow, up to history_size */
        uint32_t cap = s->cap ? s->cap * 2 : 8;
        if (cap > size)
            cap = size;
        struct hub_msg **r = hub_xmalloc(cap * sizeof(*r));
        for (uint32_t i = 0; i < s->count; i++)
            r[i] = s->ring[(s->head + i) % s->cap];
        free(s->ring);
        s->ring = r;
        s->cap = cap;
        s->head = 0;
    }
    s->ring[(s->head + s->count) % s->cap] = hub_msg_ref(m);
    s->count++;
    b->messages++;
}

static void on_sweep(uv_timer_t *t)
{
    struct mbroker *b = t->data;
    uint64_t now = hub_now_ms();
    for (int i = 0; i < SWEEP_BATCH && !hub_list_empty(&b->all); i++) {
        struct mstream *s = hub_container_of(hub_list_first(&b->all), struct mstream, all);
        hub_list_move_tail(&b->all, &s->all);       /* the next round starts after it */
        stream_expire(b, s, now);
    }
}

static int m_publish(struct hub_broker *hb, const char *channel, size_t len, struct hub_msg *m,
                     const struct hub_channel_opts *o, hub_broker_publish_cb cb, void *ud)
{
    struct mbroker *b = (struct mbroker *)hb;
    if (b->stopped)
        return HUB_EUNAVAILABLE;
    if (!o || !o->history_size) {
        hb->deliver(hb->ud, channel, len, m, NULL);
        if (cb)
            cb(ud, HUB_OK, NULL);
        return 0;
    }
    uint64_t now = hub_now_ms();
    struct mstream *s = stream_get(b, channel, len, o, now);
    hub_msg_delivery_close(m, ++s->top);
    s->touched_ms = now;
    s->frames_ttl_ms = (uint64_t)o->history_ttl * 1000u;
    s->meta_ttl_ms = (uint64_t)(o->history_ttl > HUB_STREAM_META_TTL ? o->history_ttl
                                                                      : HUB_STREAM_META_TTL) * 1000u;
    stream_append(b, s, m, o->history_size);
    struct hub_stream_pos pos = {.offset = s->top};
    memcpy(pos.epoch, s->epoch, sizeof(s->epoch));
    hb->deliver(hb->ud, channel, len, m, pos.epoch);
    if (cb)
        cb(ud, HUB_OK, &pos);
    return 0;
}

static int m_history(struct hub_broker *hb, const char *channel, size_t len,
                     const struct hub_channel_opts *o, const struct hub_history_query *q,
                     hub_broker_history_cb cb, void *ud)
{
    struct mbroker *b = (struct mbroker *)hb;
    if (b->stopped)
        return HUB_EUNAVAILABLE;
    struct mstream *s = stream_get(b, channel, len, o, hub_now_ms());
    struct hub_history_result r = {.top.offset = s->top};
    memcpy(r.top.epoch, s->epoch, sizeof(s->epoch));
    r.oldest = s->top - s->count + 1;

    /* Offsets from..top are kept, at ring index offset - oldest. */
    uint64_t from = q->since + 1 > r.oldest ? q->since + 1 : r.oldest;
    size_t avail = from <= s->top ? (size_t)(s->top - from + 1) : 0;
    size_t n = avail < q->limit ? avail : q->limit;
    struct hub_msg **v = n ? hub_xmalloc(n * sizeof(*v)) : NULL;
    for (size_t i = 0; i < n; i++) {
        uint64_t off = q->reverse ? s->top - i : from + i;
        /* references: the callback may publish, which can drop the oldest */
        v[i] = hub_msg_ref(s->ring[(s->head + (off - r.oldest)) % s->cap]);
    }
    r.msgs = v;
    r.n = n;
    cb(ud, HUB_OK, &r);
    for (size_t i = 0; i < n; i++)
        hub_msg_unref(v[i]);
    free(v);
    return 0;
}

/* ---- presence -------------------------------------------------------------- */

static struct mpresence *presence_find(struct mbroker *b, const char *name, size_t len,
                                       uint64_t h)
{
    for (struct hub_hnode *n = hub_htable_chain(&b->presence, h); n; n = n->next) {
        struct mpresence *p = hub_container_of(n, struct mpresence, node);
        if (n->hash == h && p->len == len && !memcmp(p->name, name, len))
            return p;
    }
    return NULL;
}

static struct pentry *pentry_find(struct mpresence *p, const char *id, size_t idlen, uint64_t h)
{
    for (struct hub_hnode *n = hub_htable_chain(&p->clients, h); n; n = n->next) {
        struct pentry *e = hub_container_of(n, struct pentry, node);
        if (n->hash == h && e->idlen == idlen && !memcmp(e->id, id, idlen))
            return e;
    }
    return NULL;
}

static struct ucount *ucount_get(struct mpresence *p, const char *user, size_t len)
{
    uint64_t h = hub_hash64(user, len);
    for (struct hub_hnode *n = hub_htable_chain(&p->users, h); n; n = n->next) {
        struct ucount *u = hub_container_of(n, struct ucount, node);
        if (n->hash == h && u->len == len && !memcmp(u->user, user, len))
            return u;
    }
    struct ucount *u = hub_xcalloc(1, sizeof(*u) + len + 1);
    memcpy(u->user, user, len);
    u->len = len;
    u->node.hash = h;
    hub_htable_insert(&p->users, &u->node);
    return u;
}

/* Delivers {"op":"join"|"leave","channel":C,<entry>} to the channel. */
static void presence_event(struct mbroker *b, const char *op, const char *channel, size_t len,
                           const char *entry, size_t entry_len)
{
    struct hub_buf f = {0};
    hub_buf_printf(&f, "{\"op\":\"%s\",\"channel\":\"", op);
    hub_buf_append(&f, channel, len);
    hub_buf_appends(&f, "\",");
    hub_buf_append(&f, entry, entry_len);
    hub_buf_appends(&f, "}");
    struct hub_msg *m = hub_msg_text(f.p, f.len);
    hub_buf_free(&f);
    b->base.deliver(b->base.ud, channel, len, m, NULL);
    hub_msg_unref(m);
}

static void m_presence_add(struct hub_broker *hb, const char *channel, size_t len,
                           const struct hub_channel_opts *o, const char *client,
                           const char *user, size_t user_len, const char *entry,
                           size_t entry_len)
{
    struct mbroker *b = (struct mbroker *)hb;
    if (b->stopped)
        return;
    uint64_t h = hub_hash64(channel, len);
    struct mpresence *p = presence_find(b, channel, len, h);
    if (!p) {
        p = hub_xcalloc(1, sizeof(*p) + len + 1);
        memcpy(p->name, channel, len);
        p->len = len;
        p->node.hash = h;
        hub_htable_insert(&b->presence, &p->node);
    }
    size_t idlen = strlen(client);
    uint64_t eh = hub_hash64(client, idlen);
    struct pentry *e = pentry_find(p, client, idlen, eh);
    if (e) {                                /* again: the entry may have changed */
        free(e->entry);
        e->entry = hub_xstrndup(entry, entry_len);
        e->entry_len = entry_len;
        return;
    }
    e = hub_xcalloc(1, sizeof(*e) + idlen + 1);
    memcpy(e->id, client, idlen);
    e->idlen = idlen;
    e->node.hash = eh;
    e->entry = hub_xstrndup(entry, entry_len);
    e->entry_len = entry_len;
    if (user)
        e->user = ucount_get(p, user, user_len);
    hub_htable_insert(&p->clients, &e->node);
    int first = !e->user || e->user->n++ == 0;
    if (o->join_leave && first)
        presence_event(b, "join", channel, len, entry, entry_len);
}

static void m_presence_remove(struct hub_broker *hb, const char *channel, size_t len,
                              const struct hub_channel_opts *o, const char *client)
{
    struct mbroker *b = (struct mbroker *)hb;
    uint64_t h = hub_hash64(channel, len);
    struct mpresence *p = presence_find(b, channel, len, h);
    size_t idlen = strlen(client);
    struct pentry *e = p ? pentry_find(p, client, idlen, hub_hash64(client, idlen)) : NULL;
    if (!e)
        return;
    hub_htable_remove(&p->clients, &e->node);
    int last = !e->user || --e->user->n == 0;
    if (e->user && e->user->n == 0) {
        hub_htable_remove(&p->users, &e->user->node);
        free(e->user);
    }
    if (!p->clients.n) {
        hub_htable_remove(&b->presence, &p->node);
        hub_htable_free(&p->clients);
        hub_htable_free(&p->users);
        free(p);
    }
    if (o->join_leave && last && !b->stopped)
        presence_event(b, "leave", channel, len, e->entry, e->entry_len);
    free(e->entry);
    free(e);
}

static int m_presence(struct hub_broker *hb, const char *channel, size_t len,
                      const struct hub_channel_opts *o, uint32_t max,
                      hub_broker_presence_cb cb, void *ud)
{
    struct mbroker *b = (struct mbroker *)hb;
    (void)o;
    if (b->stopped)
        return HUB_EUNAVAILABLE;
    struct mpresence *p = presence_find(b, channel, len, hub_hash64(channel, len));
    struct hub_buf list = {0};
    struct hub_presence_result r = {0};
    if (p) {
        r.clients = p->clients.n;
        r.users = p->users.n;
    }
    if (max) {
        size_t k = 0;
        hub_buf_appends(&list, "[");
        for (size_t i = 0; p && i < p->clients.nb && !r.truncated; i++)
            for (struct hub_hnode *n = p->clients.b[i]; n; n = n->next) {
                if (k == max) {
                    r.truncated = 1;
                    break;
                }
                struct pentry *e = hub_container_of(n, struct pentry, node);
                hub_buf_appends(&list, k++ ? ",{" : "{");
                hub_buf_append(&list, e->entry, e->entry_len);
                hub_buf_appends(&list, "}");
            }
        hub_buf_appends(&list, "]");
        r.list = &list;
    }
    cb(ud, HUB_OK, &r);
    hub_buf_free(&list);
    return 0;
}

/* ---- the rest ------------------------------------------------------------- */

static void m_subscribe(struct hub_broker *hb, const char *channel, size_t len,
                        hub_broker_subscribe_cb cb, void *ud)
{
    struct mbroker *b = (struct mbroker *)hb;
    (void)channel;
    (void)len;
    if (cb)
        cb(ud, b->stopped ? HUB_EUNAVAILABLE : HUB_OK);
}

static void m_unsubscribe(struct hub_broker *hb, const char *channel, size_t len)
{
    (void)hb;
    (void)channel;
    (void)len;
}

static int m_up(const struct hub_broker *hb)
{
    (void)hb;
    return 1;
}

static void m_metrics(const struct hub_broker *hb, struct hub_buf *out)
{
    const struct mbroker *b = (const struct mbroker *)hb;
    hub_metric_one(out, "luahub_broker_up", "gauge",
                   "1 when the broker is connected (memory: always).", 1);
    hub_metric_one(out, "luahub_history_streams", "gauge",
                   "History streams kept (channels with history that were used).",
                   b->streams.n);
    hub_metric_one(out, "luahub_history_messages", "gauge",
                   "Messages kept in history streams.", b->messages);
    hub_metric_one(out, "luahub_history_streams_expired_total", "counter",
                   "History streams dropped after their history_ttl.", b->expired);
    hub_metric_one(out, "luahub_presence_channels", "gauge",
                   "Presence channels with at least one client.", b->presence.n);
}

static void m_stop(struct hub_broker *hb)
{
    struct mbroker *b = (struct mbroker *)hb;
    if (b->stopped)
        return;
    b->stopped = 1;
    if (b->sweep_open)
        uv_close((uv_handle_t *)&b->sweep, NULL);
}

static void m_free(struct hub_broker *hb)
{
    struct mbroker *b = (struct mbroker *)hb;
    struct hub_hnode *n;
    while (!hub_list_empty(&b->all))
        stream_free(b, hub_container_of(hub_list_first(&b->all), struct mstream, all));
    hub_htable_free(&b->streams);
    while ((n = hub_htable_pop(&b->presence))) {
        struct mpresence *p = hub_container_of(n, struct mpresence, node);
        struct hub_hnode *k;
        while ((k = hub_htable_pop(&p->clients))) {
            struct pentry *e = hub_container_of(k, struct pentry, node);
            free(e->entry);
            free(e);
        }
        while ((k = hub_htable_pop(&p->users)))
            free(hub_container_of(k, struct ucount, node));
        hub_htable_free(&p->clients);
        hub_htable_free(&p->users);
        free(p);
    }
    hub_htable_free(&b->presence);
    free(b);
}

static struct hub_registry *m_registry_new(struct hub_broker *hb,
                                           const struct hub_registry_options *o)
{
    return hub_registry_local_new(hb->loop, o);
}

/* No Redis here: commands are not available. */
static int m_command(struct hub_broker *hb, int argc, const char **argv, const size_t *lens,
                     hub_broker_reply_cb cb, void *ud)
{
    return HUB_ENOTAVAIL;
}

static const struct hub_broker_ops memory_ops = {
    .name = "memory",
    .local = 1,
    .publish = m_publish,
    .history = m_history,
    .presence_add = m_presence_add,
    .presence_remove = m_presence_remove,
    .presence = m_presence,
    .subscribe = m_subscribe,
    .unsubscribe = m_unsubscribe,
    .command = m_command,
    .up = m_up,
    .metrics = m_metrics,
    .stop = m_stop,
    .free = m_free,
    .registry_new = m_registry_new,
};

struct hub_broker *hub_broker_memory_new(uv_loop_t *loop, hub_broker_deliver_fn deliver,
                                         hub_broker_health_fn health, void *ud)
{
    struct mbroker *b = hub_xcalloc(1, sizeof(*b));
    b->base.ops = &memory_ops;
    b->base.loop = loop;
    b->base.deliver = deliver;
    b->base.health = health;
    b->base.ud = ud;
    b->base.presence_ttl = 60;
    hub_list_init(&b->all);
    uv_timer_init(loop, &b->sweep);
    b->sweep.data = b;
    b->sweep_open = 1;
    uv_timer_start(&b->sweep, on_sweep, SWEEP_MS, SWEEP_MS);
    uv_unref((uv_handle_t *)&b->sweep);
    return &b->base;
}
