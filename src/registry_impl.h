/* Private to the registry (registry.c, registry_local.c, registry_redis.c):
 * the part both implementations share (this process's table of open
 * connections with a user, the options, the counters) and the table of
 * operations each implements. Not a public contract. */
#ifndef LUAHUB_REGISTRY_IMPL_H
#define LUAHUB_REGISTRY_IMPL_H

#include "luahub/hash.h"
#include "luahub/list.h"
#include "luahub/registry.h"

struct hub_broker;

/* A connection with a user, in this process. */
struct rentry {
    struct hub_hnode node;          /* the table, keyed by client id */
    struct hub_list all;            /* reg->all, oldest first */
    struct hub_list queue;          /* redis: registrations not yet sent */
    char *user;
    size_t ulen, idlen;
    long long connected;            /* unix seconds */
    char id[];
};

struct hub_registry_ops {
    /* A connection with a user was added (e) / is about to be freed (e; the
     * implementation may take e->user, setting it NULL). */
    void (*opened)(struct hub_registry *reg, struct rentry *e);
    void (*closed)(struct hub_registry *reg, struct rentry *e);
    int (*connections)(struct hub_registry *reg, const char *user, size_t len,
                       hub_registry_list_cb cb, void *ud);
    int (*disconnect)(struct hub_registry *reg, const char *user, size_t len,
                      hub_registry_done_cb cb, void *ud);
    void (*shutdown)(struct hub_registry *reg, hub_registry_shutdown_cb cb, void *ud);
    void (*stop)(struct hub_registry *reg);
    /* Frees the implementation (the base frees the table afterwards). */
    void (*free)(struct hub_registry *reg);
    /* Whether it may be freed now (its handles are closed). */
    int (*drained)(const struct hub_registry *reg);
    /* The implementation's own metrics, after the common ones. */
    void (*metrics)(const struct hub_registry *reg, struct hub_buf *out);
    /* 1 when the last heartbeat was answered (local: always). */
    int (*heartbeat_up)(const struct hub_registry *reg);
};

/* Embedded first in each implementation's struct. */
struct hub_registry {
    const struct hub_registry_ops *ops;
    uv_loop_t *loop;
    char *instance, *address, *prefix;
    size_t plen;
    unsigned ttl_ms, refresh_ms, max_unregisters;
    hub_registry_disconnect_fn disconnect_user;
    void *ud;
    long long started;
    struct hub_htable table;        /* client id -> rentry */
    struct hub_list all;            /* rentry.all, oldest first */
    size_t nusers;                  /* entries */
    size_t nanon;                   /* connections without a user: counted only */
    int stopped;
    uint64_t control_msgs, disconnects;
};

/* Fills the base from the options (copies the strings). */
void hub_registry_base_init(struct hub_registry *reg, const struct hub_registry_ops *ops,
                            uv_loop_t *loop, const struct hub_registry_options *opt);

/* One connection of a listing as JSON, `first` without a leading comma:
 * {"client":C,"user":U,"instance":I,"connected":N}. `connected` is kept to
 * its leading digits (whatever Redis holds, a number comes out). */
void hub_registry_json_entry(struct hub_buf *b, int first, const char *id, size_t idlen,
                             const char *user, size_t ulen, const char *inst, size_t ilen,
                             const char *connected, size_t clen);

/* A disconnect order reached this instance: counts it and closes the
 * user's connections here. */
void hub_registry_disconnect_here(struct hub_registry *reg, const char *user, size_t len);

/* The implementations (behind hub_broker_ops.registry_new). */
struct hub_registry *hub_registry_local_new(uv_loop_t *loop,
                                            const struct hub_registry_options *opt);
struct hub_registry *hub_registry_redis_new(struct hub_broker *redis_broker,
                                            const struct hub_registry_options *opt);

#endif
