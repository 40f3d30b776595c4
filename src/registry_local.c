/* The local connection registry (memory broker): one process, so the
 * registry is this process's table; disconnecting a user closes its
 * connections here, and there is no heartbeat. */
#include "registry_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/metrics.h"

static void l_opened(struct hub_registry *reg, struct rentry *e)
{
    (void)reg;
    (void)e;
}

static void l_closed(struct hub_registry *reg, struct rentry *e)
{
    (void)reg;
    (void)e;
}

static int l_connections(struct hub_registry *reg, const char *user, size_t len,
                         hub_registry_list_cb cb, void *ud)
{
    struct hub_buf list = {0}, out = {0};
    size_t n = 0;
    struct hub_list *it, *tmp;

    hub_list_foreach_safe(it, tmp, &reg->all) {
        struct rentry *e = hub_container_of(it, struct rentry, all);
        if (e->ulen != len || memcmp(e->user, user, len) != 0)
            continue;
        char t[24];
        int tl = snprintf(t, sizeof(t), "%lld", e->connected);
        hub_registry_json_entry(&list, n == 0, e->id, e->idlen, e->user, e->ulen,
                                reg->instance, strlen(reg->instance), t, (size_t)tl);
        n++;
    }
    hub_buf_appends(&out, "{\"user\":");
    hub_buf_append_json_string(&out, user, len);
    hub_buf_printf(&out, ",\"count\":%zu,\"connections\":[", n);
    hub_buf_append(&out, list.p ? list.p : "", list.len);
    hub_buf_appends(&out, "]}");
    cb(ud, HUB_OK, out.p, out.len);
    hub_buf_free(&list);
    hub_buf_free(&out);
    return 0;
}

static int l_disconnect(struct hub_registry *reg, const char *user, size_t len,
                        hub_registry_done_cb cb, void *ud)
{
    hub_registry_disconnect_here(reg, user, len);
    if (cb)
        cb(ud, HUB_OK, 1);
    return 0;
}

static void l_shutdown(struct hub_registry *reg, hub_registry_shutdown_cb cb, void *ud)
{
    (void)reg;
    cb(ud);
}

static void l_stop(struct hub_registry *reg)
{
    (void)reg;
}

static void l_free(struct hub_registry *reg)
{
    free(reg);
}

static int l_drained(const struct hub_registry *reg)
{
    (void)reg;
    return 1;
}

/* The same families as the Redis registry: nothing happens here. */
static void l_metrics(const struct hub_registry *reg, struct hub_buf *out)
{
    (void)reg;
    hub_metric_one(out, "luahub_registry_heartbeats_total", "counter",
                   "Heartbeat commands answered.", 0);
    hub_metric_one(out, "luahub_registry_heartbeat_errors_total", "counter",
                   "Heartbeats that failed.", 0);
    hub_metric_one(out, "luahub_registry_unregisters_pending", "gauge",
                   "Unregistrations waiting for Redis.", 0);
    hub_metric_one(out, "luahub_registry_unregisters_dropped_total", "counter",
                   "Unregistrations left to the TTL (queue full).", 0);
}

static int l_heartbeat_up(const struct hub_registry *reg)
{
    (void)reg;
    return 1;
}

static const struct hub_registry_ops local_ops = {
    .opened = l_opened,
    .closed = l_closed,
    .connections = l_connections,
    .disconnect = l_disconnect,
    .shutdown = l_shutdown,
    .stop = l_stop,
    .free = l_free,
    .drained = l_drained,
    .metrics = l_metrics,
    .heartbeat_up = l_heartbeat_up,
};

struct hub_registry *hub_registry_local_new(uv_loop_t *loop,
                                            const struct hub_registry_options *opt)
{
    struct hub_registry *reg = hub_xcalloc(1, sizeof(*reg));
    hub_registry_base_init(reg, &local_ops, loop, opt);
    return reg;
}
