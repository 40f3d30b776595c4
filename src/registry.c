/* The connection registry's interface (include/luahub/registry.h) and what
 * both implementations share: this process's table of connections with a
 * user, the connection count, listings as JSON. The local implementation is
 * registry_local.c (memory broker), the Redis one registry_redis.c; the
 * broker creates the one that fits it (hub_broker_registry_new): they are
 * the brokers' files, this one knows no broker. */
#include "registry_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "luahub/log.h"
#include "luahub/metrics.h"

void hub_registry_base_init(struct hub_registry *reg, const struct hub_registry_ops *ops,
                            uv_loop_t *loop, const struct hub_registry_options *opt)
{
    reg->ops = ops;
    reg->loop = loop;
    reg->instance = hub_xstrdup(opt->instance ? opt->instance : "");
    reg->address = hub_xstrdup(opt->address ? opt->address : "");
    reg->prefix = hub_xstrdup(opt->prefix ? opt->prefix : "luahub:");
    reg->plen = strlen(reg->prefix);
    reg->ttl_ms = opt->ttl_ms ? opt->ttl_ms : 30000u;
    reg->refresh_ms = opt->refresh_ms ? opt->refresh_ms : 10000u;
    reg->max_unregisters = opt->max_unregisters ? opt->max_unregisters : 100000u;
    reg->disconnect_user = opt->disconnect_user;
    reg->ud = opt->ud;
    reg->started = (long long)time(NULL);
    hub_list_init(&reg->all);
}

static struct rentry *find(const struct hub_registry *reg, const char *id, size_t idlen)
{
    uint64_t h = hub_hash64(id, idlen);
    for (struct hub_hnode *n = hub_htable_chain(&reg->table, h); n; n = n->next) {
        struct rentry *e = hub_container_of(n, struct rentry, node);
        if (n->hash == h && e->idlen == idlen && !memcmp(e->id, id, idlen))
            return e;
    }
    return NULL;
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
    if (find(reg, client_id, idlen))
        return 0;                   /* opened twice: keep the first */
    struct rentry *e = hub_xcalloc(1, sizeof(*e) + idlen + 1);
    memcpy(e->id, client_id, idlen + 1);
    e->idlen = idlen;
    e->node.hash = hub_hash64(client_id, idlen);
    e->connected = (long long)time(NULL);
    e->user = hub_xstrndup(user, user_len);
    e->ulen = user_len;
    hub_list_init(&e->queue);
    reg->nusers++;
    hub_htable_insert(&reg->table, &e->node);
    hub_list_push_tail(&reg->all, &e->all);
    reg->ops->opened(reg, e);
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
    struct rentry *e = find(reg, client_id, strlen(client_id));
    if (!e)
        return;
    hub_htable_remove(&reg->table, &e->node);
    hub_list_remove(&e->all);
    reg->nusers--;
    reg->ops->closed(reg, e);
    hub_list_remove(&e->queue);
    free(e->user);
    free(e);
}

void hub_registry_json_entry(struct hub_buf *b, int first, const char *id, size_t idlen,
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
    size_t k = 0;
    while (k < clen && k < 20 && connected[k] >= '0' && connected[k] <= '9')
        k++;
    if (k == 0)
        hub_buf_appends(b, "0");
    else
        hub_buf_append(b, connected, k);
    hub_buf_appends(b, "}");
}

void hub_registry_disconnect_here(struct hub_registry *reg, const char *user, size_t len)
{
    reg->disconnects++;
    if (reg->disconnect_user)
        reg->disconnect_user(reg->ud, user, len);
}

int hub_registry_connections(struct hub_registry *reg, const char *user, size_t len,
                             hub_registry_list_cb cb, void *ud)
{
    if (reg->stopped)
        return HUB_EUNAVAILABLE;
    return reg->ops->connections(reg, user, len, cb, ud);
}

int hub_registry_disconnect(struct hub_registry *reg, const char *user, size_t len,
                            hub_registry_done_cb cb, void *ud)
{
    if (reg->stopped)
        return HUB_EUNAVAILABLE;
    return reg->ops->disconnect(reg, user, len, cb, ud);
}

void hub_registry_shutdown(struct hub_registry *reg, hub_registry_shutdown_cb cb, void *ud)
{
    reg->ops->shutdown(reg, cb, ud);
}

void hub_registry_stop(struct hub_registry *reg)
{
    if (!reg || reg->stopped)
        return;
    reg->stopped = 1;
    reg->ops->stop(reg);
}

void hub_registry_free(struct hub_registry *reg)
{
    struct hub_hnode *n;

    if (!reg)
        return;
    if (!reg->stopped || !reg->ops->drained(reg)) {
        hub_log(HUB_LOG_ERROR, "registry freed before stop() and a drained loop: leaking it");
        return;
    }
    while ((n = hub_htable_pop(&reg->table))) {
        struct rentry *e = hub_container_of(n, struct rentry, node);
        free(e->user);
        free(e);
    }
    hub_htable_free(&reg->table);
    free(reg->instance);
    free(reg->address);
    free(reg->prefix);
    reg->ops->free(reg);
}

void hub_registry_metrics(const struct hub_registry *reg, struct hub_buf *out)
{
    hub_metric_one(out, "luahub_registry_connections", "gauge",
                   "Connections of this instance with a user (registered in Redis with the "
                   "redis broker).", reg->nusers);
    hub_metric_one(out, "luahub_registry_heartbeat_up", "gauge",
                   "1 when the last instance heartbeat was answered by Redis (memory broker: "
                   "always).", !reg->stopped && reg->ops->heartbeat_up(reg));
    reg->ops->metrics(reg, out);
    hub_metric_one(out, "luahub_registry_control_messages_total", "counter",
                   "Messages received on the control channel.", reg->control_msgs);
    hub_metric_one(out, "luahub_registry_user_disconnects_total", "counter",
                   "Disconnect-user requests handled by this instance.", reg->disconnects);
}

size_t hub_registry_local_count(const struct hub_registry *reg)
{
    return reg->nusers + reg->nanon;
}
