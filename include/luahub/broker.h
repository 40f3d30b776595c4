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
 * accepted (memory: handed to `deliver`; redis: Redis executed the PUBLISH
 * while this broker's connections to the channel's server were up and, if
 * this broker has the channel subscribed, the message came back to it and
 * went to `deliver`; see docs/internals.md, "Redis: what an acknowledged
 * publish means"), else HUB_BROKER_UNAVAILABLE. `offset` is a per-channel
 * sequence when the broker keeps one (0 otherwise; room for history).
 * Called exactly once, possibly before publish() returns (memory). */
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
 * connection has (re)subscribed every channel with local subscribers; a
 * server that stops answering (probed every second) is down within a
 * second plus command_timeout_ms, with or without traffic. */
typedef void (*hub_broker_health_fn)(void *ud, int up);

/* A Redis reply to command(), converted from hiredis so that callers need
 * no hiredis header. Strings are `len` bytes followed by a NUL. */
enum hub_broker_reply_type {
    HUB_REPLY_NIL = 0,
    HUB_REPLY_INTEGER,
    HUB_REPLY_STRING,
    HUB_REPLY_STATUS,      /* "+OK" */
    HUB_REPLY_ERROR,       /* Redis answered with an error ("-ERR ...") */
    HUB_REPLY_ARRAY,
};

struct hub_broker_reply {
    int type;                               /* enum hub_broker_reply_type */
    long long integer;                      /* INTEGER */
    const char *str;                        /* STRING, STATUS, ERROR */
    size_t len;
    size_t n;                               /* ARRAY: number of elements */
    const struct hub_broker_reply *elem;    /* ARRAY: n elements */
};

/* Completion of command(): HUB_BROKER_OK with the reply (borrowed: valid
 * during the call only; it may be of type HUB_REPLY_ERROR), or
 * HUB_BROKER_UNAVAILABLE with reply NULL (connection lost or timed out
 * before the answer, or stop()). Called exactly once. */
typedef void (*hub_broker_reply_cb)(void *ud, int status, const struct hub_broker_reply *reply);

/* Receives each message published on the control channel (see control()):
 * `msg` is borrowed, valid during the call. Called from the loop. */
typedef void (*hub_broker_control_fn)(void *ud, const char *msg, size_t len);

/* The control channel's Redis name is the broker prefix followed by this
 * ("luahub:!control" by default). '!' is not allowed in hub channel names,
 * so no hub channel can collide with it. */
#define HUB_BROKER_CONTROL_CHANNEL "!control"

struct hub_broker_ops {
    const char *name;
    /* 1 when deliveries reach this process only (memory): the hub then
     * skips encoding a publish nobody here listens to. */
    int local;
    /* Publishes a sealed delivery frame (borrowed) to `channel`. Returns 0
     * and calls `cb` exactly once, or returns HUB_BROKER_UNAVAILABLE without
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

    /* Optional (NULL in the memory broker: there is no shared store).
     *
     * command: sends one Redis command (argv[0..argc) with byte lengths
     * `lens`, all borrowed until it returns) on the command connection of
     * the FIRST server of the list (the registry's keys live there). Same
     * rules as publish: returns 0 and calls `cb` (may be NULL) exactly once,
     * never synchronously; or returns HUB_BROKER_UNAVAILABLE without calling
     * it when that connection is not up or the pending cap (max_pending,
     * max_pending_bytes, shared with PUBLISH) is reached. An answer not
     * received within command_timeout_ms drops the connection and fails
     * every pending command. Never use (P)SUBSCRIBE or blocking commands. */
    int (*command)(struct hub_broker *b, int argc, const char **argv, const size_t *lens,
                   hub_broker_reply_cb cb, void *ud);
    /* control: subscribes the control channel (prefix +
     * HUB_BROKER_CONTROL_CHANNEL, on the first server) and hands its
     * messages to `fn` instead of `deliver`; the subscription is kept across
     * reconnects (health counts it like any channel). fn == NULL
     * unsubscribes it. Messages published while the subscriber connection
     * is down are lost (pub/sub is at-most-once). */
    void (*control)(struct hub_broker *b, hub_broker_control_fn fn, void *ud);
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
