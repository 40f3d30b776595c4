/* The hub core (include/luahub/hub.h): publish, fan-out, the channel
 * registry driving the broker's subscriptions, the client-id table. */
#include "luahub/hub.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void on_channel_empty(void *ud, const char *name, size_t len)
{
    struct hub *h = ud;
    h->broker->ops->unsubscribe(h->broker, name, len);
}

void hub_init(struct hub *h, struct hub_broker *broker, const char *instance,
              uint32_t max_channels)
{
    memset(h, 0, sizeof(*h));
    h->broker = broker;
    h->max_channels = max_channels;
    snprintf(h->instance, sizeof(h->instance), "%s", instance);
    hub_chan_registry_init(&h->chans);
    h->chans.on_last = on_channel_empty;
    h->chans.ud = h;
}

void hub_free(struct hub *h)
{
    hub_chan_registry_free(&h->chans);
    hub_htable_free(&h->clients);
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

static void leave_all(struct hub *h, struct hub_client *c)
{
    hub_chan_unsubscribe_all(&h->chans, &c->subs);
    c->nsubs = 0;
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

int hub_subscribe(struct hub *h, struct hub_client *c, const char *channel, size_t len,
                  hub_broker_subscribe_cb cb, void *ud)
{
    if (c->nsubs >= h->max_channels)
        return hub_chan_in_list(&h->chans, c->subs, channel, len) ? 0 : HUB_ELIMIT;
    if (!hub_chan_subscribe(&h->chans, &c->subs, c, channel, len))
        return 0;
    c->nsubs++;
    /* Every new subscription asks the broker, not only a channel's first:
     * a second subscriber must also wait for a SUBSCRIBE still on its way
     * (the broker counts nothing; see struct hub_broker_ops). */
    h->broker->ops->subscribe(h->broker, channel, len, cb, ud);
    return 1;
}

int hub_unsubscribe(struct hub *h, struct hub_client *c, const char *channel, size_t len)
{
    if (hub_chan_unsubscribe(&h->chans, &c->subs, channel, len) < 0)
        return HUB_ENOTFOUND;
    c->nsubs--;
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
    h->published++;
    /* A broker that reaches this process only: a channel nobody here
     * listens to costs nothing (no frame is encoded). */
    if (h->broker->ops->local && !hub_chan_find(&h->chans, channel, len)) {
        if (cb)
            cb(ud, HUB_OK, 0);
        return 0;
    }
    struct hub_msg *m = hub_msg_delivery(channel, len, data, data_len);
    int r = h->broker->ops->publish(h->broker, channel, len, m, cb, ud);
    hub_msg_unref(m);
    return r;
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

void hub_deliver(void *ud, const char *channel, size_t len, struct hub_msg *m)
{
    struct hub *h = ud;
    struct hub_chan *ch = hub_chan_find(&h->chans, channel, len);

    if (!ch)
        return;
    uint32_t n = ch->nsubs;
    /* Culls wait until the loop is over: unlinking now would reorder the
     * array being walked. */
    for (uint32_t i = 0; i < n; i++) {
        struct hub_client *c = ch->subs[i]->owner;
        if (c->culling || c->ops->deliver(c, m) < 0)
            hub_cull(h, c);
    }
    h->deliveries += n;
    hub_cull_now(h);
}
