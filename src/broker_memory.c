/* The in-process broker: one process, no upstream. publish() hands the very
 * frame it was given to `deliver` (no copy) when the channel is subscribed,
 * then completes. It keeps the set of subscribed channels only so that both
 * implementations honour the same contract (deliver is called for subscribed
 * channels only); that is one hash lookup per publish. */
#include <stdlib.h>
#include <string.h>

#include "broker_impl.h"
#include "luahub/util.h"

struct mchan {
    struct hub_bnode node;
    char name[];
};

struct mbroker {
    struct hub_broker base;     /* first: the ops receive &base */
    struct hub_bset chans;
    int stopped;
    uint64_t published;
};

static int m_publish(struct hub_broker *hb, const char *channel, size_t len, struct hub_msg *m,
                     hub_broker_publish_cb cb, void *ud)
{
    struct mbroker *b = (struct mbroker *)hb;
    if (b->stopped)
        return HUB_BROKER_UNAVAILABLE;
    b->published++;
    /* The set may change inside deliver (a cull unsubscribes): nothing of
     * it is used afterwards. */
    if (hub_bset_find(&b->chans, channel, len, hub_broker_hash64(channel, len)))
        hb->deliver(hb->ud, channel, len, m);
    if (cb)
        cb(ud, HUB_BROKER_OK, 0);
    return 0;
}

static void m_subscribe(struct hub_broker *hb, const char *channel, size_t len,
                        hub_broker_subscribe_cb cb, void *ud)
{
    struct mbroker *b = (struct mbroker *)hb;
    if (b->stopped) {
        if (cb)
            cb(ud, HUB_BROKER_UNAVAILABLE);
        return;
    }
    uint64_t h = hub_broker_hash64(channel, len);
    if (!hub_bset_find(&b->chans, channel, len, h)) {
        struct mchan *c = hub_xmalloc(sizeof(*c) + len + 1);
        memcpy(c->name, channel, len);
        c->name[len] = '\0';
        c->node.hash = h;
        c->node.name = c->name;
        c->node.len = len;
        hub_bset_insert(&b->chans, &c->node);
    }
    if (cb)
        cb(ud, HUB_BROKER_OK);
}

static void m_unsubscribe(struct hub_broker *hb, const char *channel, size_t len)
{
    struct mbroker *b = (struct mbroker *)hb;
    struct hub_bnode *n = hub_bset_find(&b->chans, channel, len, hub_broker_hash64(channel, len));
    if (n) {
        hub_bset_remove(&b->chans, n);
        free(n); /* node is the first member of struct mchan */
    }
}

static int m_up(const struct hub_broker *hb)
{
    (void)hb;
    return 1;
}

static void m_metrics(const struct hub_broker *hb, struct hub_buf *out)
{
    const struct mbroker *b = (const struct mbroker *)hb;
    hub_buf_appends(out,
                    "# HELP luahub_broker_up 1 when the broker is connected (memory: always).\n"
                    "# TYPE luahub_broker_up gauge\n"
                    "luahub_broker_up 1\n");
    hub_buf_printf(out,
                   "# HELP luahub_broker_channels Channels subscribed through the broker.\n"
                   "# TYPE luahub_broker_channels gauge\n"
                   "luahub_broker_channels %zu\n",
                   b->chans.n);
}

static void m_stop(struct hub_broker *hb)
{
    ((struct mbroker *)hb)->stopped = 1;
}

static void m_free(struct hub_broker *hb)
{
    struct mbroker *b = (struct mbroker *)hb;
    if (!b)
        return;
    for (size_t i = 0; i < b->chans.nb; i++) {
        struct hub_bnode *n = b->chans.b[i], *next;
        for (; n; n = next) {
            next = n->next;
            free(n);
        }
    }
    hub_bset_free(&b->chans);
    free(b);
}

static const struct hub_broker_ops memory_ops = {
    .name = "memory",
    .local = 1,
    .publish = m_publish,
    .subscribe = m_subscribe,
    .unsubscribe = m_unsubscribe,
    .up = m_up,
    .metrics = m_metrics,
    .stop = m_stop,
    .free = m_free,
    /* One process, no shared store: no command(), no control channel (the
     * registry works locally; see registry.h). */
    .command = NULL,
    .control = NULL,
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
    return &b->base;
}
