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
 * the server fans them out to local subscribers. Loop thread only. */
#ifndef LUAHUB_BROKER_H
#define LUAHUB_BROKER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "luahub/msg.h"
#include "luahub/util.h"

struct hub_broker;

enum hub_broker_status {
    HUB_BROKER_OK = 0,
    HUB_BROKER_UNAVAILABLE = -1,    /* not connected, too much pending, timed out, stopped */
    HUB_BROKER_CANCELED = -2,       /* subscribe only: unsubscribe() came before the
                                     * confirmation (libuv's UV_ECANCELED) */
};

/* Completion of a publish: `status` is HUB_BROKER_OK once the message was
 * accepted (memory: delivered locally; redis: Redis replied to PUBLISH),
 * else HUB_BROKER_UNAVAILABLE. `offset` is a per-channel sequence when the
 * broker keeps one (0 otherwise; room for history). Called exactly once,
 * possibly before publish() returns (memory). */
typedef void (*hub_broker_publish_cb)(void *ud, int status, uint64_t offset);

/* Completion of a subscribe: HUB_BROKER_OK once messages published from
 * now on will be delivered (redis: SUBSCRIBE confirmed); else
 * HUB_BROKER_UNAVAILABLE (redis: the subscriber connection is down, or went
 * down or timed out before the confirmation, or stop() was called), or
 * HUB_BROKER_CANCELED (unsubscribe() of the channel came first). Called
 * exactly once, possibly synchronously. */
typedef void (*hub_broker_subscribe_cb)(void *ud, int status);

/* Where a broker hands a frame for local fan-out: `m` is a sealed delivery
 * frame for `channel` (borrowed; take a reference to keep it). Called only
 * for channels that are subscribed (subscribe() called, unsubscribe() not
 * since), once per message, from the loop (memory: inside publish()). It
 * may call the broker (publish, subscribe, unsubscribe, stop; not free). */
typedef void (*hub_broker_deliver_fn)(void *ud, const char *channel, size_t len,
                                      struct hub_msg *m);

/* Called when the broker's health changes (up = 1 connected, 0 down); not
 * at creation: memory starts up, redis starts down. Redis is up when, for
 * every server, the command connection is ready and the subscriber
 * connection has (re)subscribed every channel with local subscribers. */
typedef void (*hub_broker_health_fn)(void *ud, int up);

struct hub_broker_ops {
    const char *name;
    /* Publishes a sealed delivery frame (borrowed) to `channel`. Returns 0
     * and calls `cb` exactly once, or returns HUB_BROKER_UNAVAILABLE without
     * calling it (fail fast: not connected, or the pending output is over
     * its cap). `cb` may be NULL (fire and forget). */
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
