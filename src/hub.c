/* The hub core (include/luahub/hub.h): publish, fan-out, the channel
 * registry driving the broker's subscriptions, the client-id table. What
 * history and presence add is in hub_stream.c. */
#include "hub_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct hub_chan_ext hub_plain_ext;

static void on_channel_empty(void *ud, struct hub_chan *ch)
{
    struct hub *h = ud;
    h->broker->ops->unsubscribe(h->broker, ch->name, ch->name_len);
    hub_chan_ext_free(ch->ext);
    ch->ext = NULL;
}

void hub_init(struct hub *h, struct hub_broker *broker, const char *instance,
              const struct hub_config *cfg)
{
    memset(h, 0, sizeof(*h));
    h->broker = broker;
    h->cfg = cfg;
    h->max_channels = cfg->max_channels_per_conn;
    snprintf(h->instance, sizeof(h->instance), "%s", instance);
    hub_chan_registry_init(&h->chans);
    h->chans.on_last = on_channel_empty;
    h->chans.ud = h;
}

void hub_free(struct hub *h)
{
    for (size_t i = 0; i < h->chans.chans.nb; i++)
        for (struct hub_hnode *n = h->chans.chans.b[i]; n; n = n->next) {
            struct hub_chan *ch = hub_container_of(n, struct hub_chan, node);
            hub_chan_ext_free(ch->ext);
            ch->ext = NULL;
        }
    hub_chan_registry_free(&h->chans);
    hub_htable_free(&h->clients);
    hub_htable_free(&h->reads); /* each read is freed by its broker callback */
    free(h->recov);
    h->recov = NULL;
}

const struct hub_channel_opts *hub_channel_opts(const struct hub *h, const char *channel,
                                                size_t len)
{
    return h->cfg->nchannels ? hub_config_channel(h->cfg, channel, len) : NULL;
}

struct hub_chan_ext *hub_chan_ext_of(struct hub *h, struct hub_chan *ch)
{
    if (ch->ext)
        return ch->ext;
    const struct hub_channel_opts *o = hub_channel_opts(h, ch->name, ch->name_len);
    if (!o || (!o->history_size && !o->presence)) {
        ch->ext = &hub_plain_ext;
    } else {
        struct hub_chan_ext *x = hub_xcalloc(1, sizeof(*x));
        x->o = o;
        x->gen = ++h->read_seq;
        ch->ext = x;
    }
    return ch->ext;
}

void hub_chan_ext_free(struct hub_chan_ext *x)
{
    if (!x || x == &hub_plain_ext)
        return;
    for (uint32_t i = 0; i < x->nheld; i++)
        hub_msg_unref(x->held[i]);
    free(x->held);
    free(x);
}

uint64_t hub_next_id(struct hub *h)
{
    return ++h->next_id;
}

void hub_client_add(struct hub *h, struct hub_client *c, const struct hub_client_ops *ops,
                    uint64_t id)
{
    memset(c, 0, sizeof(*c));
    c->ops = ops;
    c->id = id;
    c->node.hash = hub_hash_u64(id);
    hub_htable_insert(&h->clients, &c->node);
}

/* Leaves every channel. Presence entries go last, once the client is in
 * none of them: a leave event must not reach the client that leaves. */
static void leave_all(struct hub *h, struct hub_client *c)
{
    struct gone {
        const struct hub_channel_opts *o;
        size_t len;
        char name[HUB_CHANNEL_MAX + 1];
    } *v = NULL;
    size_t n = 0;
    for (struct hub_sub *s = c->subs; s; s = s->next) {
        struct hub_chan_ext *x = s->chan->ext;
        if (!x || !x->o)
            continue;
        hub_stream_cancel(h, s);
        if (x->o->presence) {
            v = hub_xrealloc(v, (n + 1) * sizeof(*v));
            v[n].o = x->o;
            v[n].len = s->chan->name_len;
            memcpy(v[n].name, s->chan->name, v[n].len + 1);
            n++;
        }
    }
    hub_chan_unsubscribe_all(&h->chans, &c->subs);
    c->nsubs = 0;
    for (size_t i = 0; i < n; i++)
        hub_stream_presence_remove(h, c, v[i].o, v[i].name, v[i].len);
    free(v);
}

void hub_client_remove(struct hub *h, struct hub_client *c)
{
    if (c->culling) {
        struct hub_client **pp = &h->culls;
        while (*pp && *pp != c)
            pp = &(*pp)->cull_next;
        if (*pp)
            *pp = c->cull_next;
        c->culling = 0;
    }
    leave_all(h, c);
    hub_htable_remove(&h->clients, &c->node);
}

struct hub_client *hub_client_by_id(const struct hub *h, uint64_t id)
{
    uint64_t hash = hub_hash_u64(id);
    for (struct hub_hnode *n = hub_htable_chain(&h->clients, hash); n; n = n->next) {
        struct hub_client *c = hub_container_of(n, struct hub_client, node);
        if (c->id == id)
            return c;
    }
    return NULL;
}

struct hub_client *hub_client_by_name(const struct hub *h, const char *name)
{
    size_t il = strlen(h->instance);
    char *end;

    if (strncmp(name, h->instance, il) != 0 || name[il] != '-' || name[il + 1] < '0' ||
        name[il + 1] > '9')
        return NULL;
    errno = 0;
    unsigned long long id = strtoull(name + il + 1, &end, 10);
    if (*end || errno)
        return NULL;
    return hub_client_by_id(h, id);
}

void hub_client_name(const struct hub *h, uint64_t id, char *out, size_t n)
{
    snprintf(out, n, "%s-%llu", h->instance, (unsigned long long)id);
}

/* A subscribe on a plain channel: the broker's answer is the result. */
struct plain_op {
    hub_subscribe_cb cb;
    void *ud;
};

static void on_plain_subscribed(void *ud, int status)
{
    struct plain_op *op = ud;
    struct hub_sub_result r = {.status = status};
    op->cb(op->ud, &r);
    free(op);
}

int hub_subscribe(struct hub *h, struct hub_client *c, const char *channel, size_t len,
                  const struct hub_sub_req *req, hub_subscribe_cb cb, void *ud)
{
    if (c->nsubs >= h->max_channels)
        return hub_chan_in_list(&h->chans, c->subs, channel, len) ? 0 : HUB_ELIMIT;
    if (!hub_chan_subscribe(&h->chans, &c->subs, c, channel, len))
        return 0;
    c->nsubs++;
    struct hub_sub *s = c->subs;        /* the new one is first */
    struct hub_chan_ext *x = hub_chan_ext_of(h, s->chan);
    if (x->o)
        return hub_stream_subscribe(h, c, s, x, req, cb, ud);
    /* Every new subscription asks the broker, not only a channel's first:
     * a second subscriber must also wait for a SUBSCRIBE still on its way
     * (the broker counts nothing; see struct hub_broker_ops). */
    struct plain_op *op = NULL;
    if (cb) {
        op = hub_xmalloc(sizeof(*op));
        op->cb = cb;
        op->ud = ud;
    }
    h->broker->ops->subscribe(h->broker, channel, len, op ? on_plain_subscribed : NULL, op);
    return 1;
}

int hub_unsubscribe(struct hub *h, struct hub_client *c, const char *channel, size_t len)
{
    const struct hub_chan *ch = hub_chan_find(&h->chans, channel, len);
    struct hub_sub *s = c->subs;
    while (s && (!ch || s->chan != ch))
        s = s->next;
    if (!s)
        return HUB_ENOTFOUND;
    const struct hub_chan_ext *x = s->chan->ext;
    const struct hub_channel_opts *o = x ? x->o : NULL;
    if (o)
        hub_stream_cancel(h, s);
    hub_chan_unsubscribe(&h->chans, &c->subs, channel, len);
    c->nsubs--;
    if (o && o->presence)
        hub_stream_presence_remove(h, c, o, channel, len);
    return 0;
}

int hub_subscribed(const struct hub *h, const struct hub_client *c, const char *channel,
                   size_t len)
{
    return hub_chan_in_list(&h->chans, c->subs, channel, len);
}

size_t hub_subscribers(const struct hub *h, const char *channel, size_t len)
{
    const struct hub_chan *ch = hub_chan_find(&h->chans, channel, len);
    return ch ? ch->nsubs : 0;
}

int hub_publish(struct hub *h, const char *channel, size_t len, const char *data,
                size_t data_len, hub_broker_publish_cb cb, void *ud)
{
    struct hub_chan *ch = hub_chan_find(&h->chans, channel, len);
    const struct hub_channel_opts *o = ch ? hub_chan_ext_of(h, ch)->o
                                          : hub_channel_opts(h, channel, len);
    int history = o && o->history_size;

    h->published++;
    /* A broker that reaches this process only: a channel nobody here
     * listens to costs nothing (no frame is encoded), unless it keeps the
     * message for later. */
    if (h->broker->ops->local && !ch && !history) {
        if (cb)
            cb(ud, HUB_OK, NULL);
        return 0;
    }
    struct hub_msg *m = history ? hub_msg_delivery_open(channel, len, data, data_len)
                                : hub_msg_delivery(channel, len, data, data_len);
    int r = h->broker->ops->publish(h->broker, channel, len, m, history ? o : NULL, cb, ud);
    hub_msg_unref(m);
    return r;
}

int hub_history(struct hub *h, const char *channel, size_t len,
                const struct hub_history_query *q, hub_broker_history_cb cb, void *ud)
{
    const struct hub_channel_opts *o = hub_channel_opts(h, channel, len);
    if (!o || !o->history_size)
        return HUB_ENOTAVAIL;
    return h->broker->ops->history(h->broker, channel, len, o, q, cb, ud);
}

int hub_presence(struct hub *h, const char *channel, size_t len, uint32_t max,
                 hub_broker_presence_cb cb, void *ud)
{
    const struct hub_channel_opts *o = hub_channel_opts(h, channel, len);
    if (!o || !o->presence)
        return HUB_ENOTAVAIL;
    return h->broker->ops->presence(h->broker, channel, len, o, max, cb, ud);
}

void hub_cull(struct hub *h, struct hub_client *c)
{
    if (c->culling)
        return;
    c->culling = 1;
    c->cull_next = h->culls;
    h->culls = c;
}

void hub_cull_now(struct hub *h)
{
    while (h->culls) {
        struct hub_client *c = h->culls;
        h->culls = c->cull_next;
        c->culling = 0;
        leave_all(h, c);
        h->culled++;
        c->ops->culled(c);
    }
}

void hub_fan_out(struct hub *h, struct hub_chan *ch, struct hub_msg *m)
{
    uint32_t n = ch->nsubs;
    /* Culls wait until the loop is over: unlinking now would reorder the
     * array being walked. */
    for (uint32_t i = 0; i < n; i++) {
        struct hub_sub *s = ch->subs[i];
        struct hub_client *c = s->owner;
        if (s->hold)
            hub_stream_hold(h, s, m);
        else if (c->culling || c->ops->deliver(c, m) < 0)
            hub_cull(h, c);
    }
    h->deliveries += n;
}

void hub_deliver(void *ud, const char *channel, size_t len, struct hub_msg *m,
                 const char *epoch)
{
    struct hub *h = ud;
    struct hub_chan *ch = hub_chan_find(&h->chans, channel, len);

    if (!ch)
        return;
    if (epoch && m->offset) {
        struct hub_chan_ext *x = hub_chan_ext_of(h, ch);
        if (x->o && x->o->history_size)
            hub_stream_deliver(h, ch, x, m, epoch);
        else
            hub_fan_out(h, ch, m);
    } else {
        hub_fan_out(h, ch, m);
    }
    hub_cull_now(h);
}

void hub_broker_health(struct hub *h, int up)
{
    if (!up)
        return;
    for (size_t i = 0; i < h->chans.chans.nb; i++)
        for (struct hub_hnode *n = h->chans.chans.b[i]; n; n = n->next) {
            struct hub_chan *ch = hub_container_of(n, struct hub_chan, node);
            struct hub_chan_ext *x = ch->ext;
            if (x && x->o && x->o->history_size && x->epoch[0] && !x->reading)
                hub_stream_catch_up(h, ch, x);
        }
}

void hub_presence_local(struct hub *h, const char *channel, size_t len, uint64_t *clients,
                        uint64_t *users)
{
    const struct hub_chan *ch = hub_chan_find(&h->chans, channel, len);
    struct hub_htable seen = {0};
    struct unode {
        struct hub_hnode node;
        const char *user;
        size_t len;
    } *v = ch ? hub_xmalloc(ch->nsubs * sizeof(*v)) : NULL;

    *clients = ch ? ch->nsubs : 0;
    *users = 0;
    for (uint32_t i = 0; ch && i < ch->nsubs; i++) {
        struct hub_client *c = ch->subs[i]->owner;
        const char *user, *entry;
        size_t ul, el;
        c->ops->presence(c, &user, &ul, &entry, &el);
        if (!user)
            continue;
        uint64_t hh = hub_hash64(user, ul);
        struct hub_hnode *n = hub_htable_chain(&seen, hh);
        for (; n; n = n->next) {
            struct unode *u = hub_container_of(n, struct unode, node);
            if (n->hash == hh && u->len == ul && !memcmp(u->user, user, ul))
                break;
        }
        if (n)
            continue;
        struct unode *u = &v[(*users)++];
        u->node.hash = hh;
        u->user = user;
        u->len = ul;
        hub_htable_insert(&seen, &u->node);
    }
    hub_htable_free(&seen);
    free(v);
}

int hub_position(const struct hub *h, const char *channel, size_t len,
                 struct hub_stream_pos *pos)
{
    const struct hub_chan *ch = hub_chan_find(&h->chans, channel, len);
    const struct hub_chan_ext *x = ch ? ch->ext : NULL;
    if (!x || !x->o || !x->o->history_size || !x->epoch[0])
        return 0;
    pos->offset = x->top;
    memcpy(pos->epoch, x->epoch, sizeof(pos->epoch));
    return 1;
}
