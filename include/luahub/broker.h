/* The broker: where a publish goes to reach every subscriber, in this
 * process or in others. A struct of function pointers with two
 * implementations, like libuv's backends:
 *
 *   memory  in-process fan-out: publish delivers at once (one process);
 *   redis   PUBLISH of the final delivery frame to Redis, lazily SUBSCRIBEd
 *           per channel; every process (the publisher's too) delivers what
 *           comes back on its subscriber connection, so ordering per
 *           publisher per channel is Redis's order and nobody gets a
 *           message twice.
 *
 * The broker never touches connections: it hands frames to `deliver`, and
 * the server fans them out to local subscribers. Loop thread only.
 *
 * Ownership: hub_broker_new()'s caller owns the broker: ops->stop(), then
 * ops->free() once the loop has drained. Frames handed to `deliver` are
 * borrowed. Re-entrancy: every callback below says what it may call; none
 * may free the broker. */
#ifndef LUAHUB_BROKER_H
#define LUAHUB_BROKER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "luahub/error.h"
#include "luahub/msg.h"
#include "luahub/util.h"

struct hub_broker;
struct hub_registry;
struct hub_registry_options;

/* Statuses are the HUB_E* codes of error.h: HUB_OK; HUB_EUNAVAILABLE (not
 * connected, too much pending, timed out, stopped); HUB_ECANCELED
 * (subscribe only: unsubscribe() came before the confirmation). */

/* Completion of a publish: `status` is HUB_OK once the message was
 * accepted (memory: handed to `deliver`; redis: Redis executed the PUBLISH
 * while this broker's connections to the channel's server were up and, if
 * this broker has the channel subscribed, the message came back to it and
 * went to `deliver`; see docs/internals.md, "Redis: what an acknowledged
 * publish means"), else HUB_EUNAVAILABLE. `offset` is a per-channel
 * sequence when the broker keeps one (0 otherwise; room for history).
 * Called exactly once, possibly before publish() returns (memory). */
typedef void (*hub_broker_publish_cb)(void *ud, int status, uint64_t offset);

/* Completion of a subscribe: HUB_OK once messages published from
 * now on will be delivered (redis: SUBSCRIBE confirmed); else
 * HUB_EUNAVAILABLE (redis: the subscriber connection is down, or went
 * down or timed out before the confirmation, or stop() was called), or
 * HUB_ECANCELED (unsubscribe() of the channel came first). Called
 * exactly once, possibly synchronously. */
typedef void (*hub_broker_subscribe_cb)(void *ud, int status);

/* Where a broker hands a frame for local fan-out: `m` is a sealed delivery
 * frame for `channel` (borrowed; take a reference to keep it). Called once
 * per message, from the loop (memory: inside publish()), for the channels
 * subscribed (redis) or for every publish (memory: the hub looks the
 * channel up itself; the broker keeps no copy of the channel registry). It
 * may call the broker (publish, subscribe, unsubscribe, stop; not free). */
typedef void (*hub_broker_deliver_fn)(void *ud, const char *channel, size_t len,
                                      struct hub_msg *m);

/* Called when the broker's health changes (up = 1 connected, 0 down); not
 * at creation: memory starts up, redis starts down. Redis is up when, for
 * every server, the command connection is ready and the subscriber
 * connection has (re)subscribed every channel with local subscribers; a
 * server that stops answering (probed every second) is down within a
 * second plus command_timeout_ms, with or without traffic. */
typedef void (*hub_broker_health_fn)(void *ud, int up);

struct hub_broker_ops {
    const char *name;
    /* 1 when deliveries reach this process only (memory): the hub then
     * skips encoding a publish nobody here listens to. */
    int local;
    /* Publishes a sealed delivery frame (borrowed) to `channel`. Returns 0
     * and calls `cb` exactly once, or returns HUB_EUNAVAILABLE without
     * calling it (fail fast: redis: either connection to the channel's
     * server not ready, the subscriber one not (re)subscribed, or the
     * pending output over its cap). `cb` may be NULL (fire and forget). */
    int (*publish)(struct hub_broker *b, const char *channel, size_t len,
                   struct hub_msg *m, hub_broker_publish_cb cb, void *ud);
    /* A local subscriber joins `channel` (call it for the first one; more
     * calls are allowed, e.g. to wait for the confirmation, and are not
     * counted). The channel is then subscribed upstream until
     * unsubscribe(), across reconnects; `cb` (may be NULL) fires once
     * delivery from now on is guaranteed (see hub_broker_subscribe_cb).
     * Redis: calls in one loop iteration go out as one batched SUBSCRIBE;
     * when the subscriber connection is down, `cb` gets UNAVAILABLE at once
     * but the channel stays wanted and is subscribed on reconnect. */
    void (*subscribe)(struct hub_broker *b, const char *channel, size_t len,
                      hub_broker_subscribe_cb cb, void *ud);
    /* The last local subscriber left `channel`: unsubscribe upstream (one
     * call ends it, however many subscribe() calls came before). Pending
     * subscribe callbacks of the channel fire CANCELED before it returns. */
    void (*unsubscribe)(struct hub_broker *b, const char *channel, size_t len);
    /* 1 when connected (memory: always). */
    int (*up)(const struct hub_broker *b);
    /* Appends its Prometheus metrics. */
    void (*metrics)(const struct hub_broker *b, struct hub_buf *out);
    /* Closes connections and handles (async: the loop drains them). Every
     * pending publish/subscribe callback fires (UNAVAILABLE) before it
     * returns, or from the hiredis callback it was called in; afterwards
     * publish() returns UNAVAILABLE and subscribe() calls back UNAVAILABLE.
     * Idempotent. */
    void (*stop)(struct hub_broker *b);
    /* Frees it after stop() and after the loop has drained (uv_run
     * returned with no active handles). */
    void (*free)(struct hub_broker *b);

    /* The connection registry that fits this broker (registry.h): memory,
     * this process's table; redis, the table plus Redis with the instance
     * heartbeat and the control channel. Never NULL. */
    struct hub_registry *(*registry_new)(struct hub_broker *b,
                                         const struct hub_registry_options *o);
};

struct hub_broker {
    const struct hub_broker_ops *ops;
    uv_loop_t *loop;
    hub_broker_deliver_fn deliver;
    hub_broker_health_fn health;
    void *ud;                       /* for deliver and health */
};

/* Creates the broker named by `url`: "memory", or one or more
 * "redis://[[user]:password@]host[:port][/db][?option=value&...]" separated
 * by spaces or commas (channels are then sharded by jump consistent hash of
 * their name; see docs/broker.md). Port defaults to 6379; user and password
 * are %-decoded. Options (per server): connect_timeout_ms (2000),
 * command_timeout_ms (2000), max_pending (10000 PUBLISHes awaiting a
 * reply), max_pending_bytes (16 MiB). `prefix` prefixes Redis channel names
 * (NULL: "luahub:"; borrowed). The redis broker starts connecting at once
 * (down until connected). Returns NULL with a message in `err` if the URL
 * does not parse. */
/* Creates the connection registry that fits `b` (registry.h; `b` is
 * borrowed: it must outlive the registry, and be stopped after
 * hub_registry_stop). The Redis one subscribes the control channel and
 * starts the heartbeat at once (it retries until Redis is there). Never
 * NULL. */
struct hub_registry *hub_broker_registry_new(struct hub_broker *b,
                                             const struct hub_registry_options *opt);

struct hub_broker *hub_broker_new(uv_loop_t *loop, const char *url, const char *prefix,
                                  hub_broker_deliver_fn deliver,
                                  hub_broker_health_fn health, void *ud,
                                  char *err, size_t errlen);

/* Validates a broker URL without connecting (for the conf loader). */
int hub_broker_url_valid(const char *url, char *err, size_t errlen);

/* Jump consistent hash (Lamping & Veach) of a channel name over `n`
 * shards: stable while the shard list is unchanged. */
uint32_t hub_broker_shard(const char *channel, size_t len, uint32_t n);

#endif
