/* The in-process broker: one process, no upstream. publish() hands the very
 * frame it was given to `deliver` (no copy), then completes. It keeps no
 * copy of the channel registry: the hub finds (or does not find) the
 * channel's subscribers itself. */
#include <stdlib.h>
#include <string.h>

#include "broker_impl.h"
#include "luahub/metrics.h"
#include "luahub/util.h"
#include "registry_impl.h"

struct mbroker {
    struct hub_broker base;     /* first: the ops receive &base */
    int stopped;
};

static int m_publish(struct hub_broker *hb, const char *channel, size_t len, struct hub_msg *m,
                     hub_broker_publish_cb cb, void *ud)
{
    struct mbroker *b = (struct mbroker *)hb;
    if (b->stopped)
        return HUB_EUNAVAILABLE;
    hb->deliver(hb->ud, channel, len, m);
    if (cb)
        cb(ud, HUB_OK, 0);
    return 0;
}

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
    (void)hb;
    hub_metric_one(out, "luahub_broker_up", "gauge",
                   "1 when the broker is connected (memory: always).", 1);
}

static void m_stop(struct hub_broker *hb)
{
    ((struct mbroker *)hb)->stopped = 1;
}

static void m_free(struct hub_broker *hb)
{
    free(hb);
}

static struct hub_registry *m_registry_new(struct hub_broker *hb,
                                           const struct hub_registry_options *o)
{
    return hub_registry_local_new(hb->loop, o);
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
    return &b->base;
}
