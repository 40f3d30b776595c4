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

#include "luahub/chanopt.h"
#include "luahub/error.h"
#include "luahub/msg.h"
#include "luahub/proto.h"
#include "luahub/util.h"

struct hub_broker;
struct hub_registry;
struct hub_registry_options;

/* Statuses are the HUB_E* codes of error.h: HUB_OK; HUB_EUNAVAILABLE (not
 * connected, too much pending, timed out, stopped); HUB_ECANCELED
 * (subscribe only: unsubscribe() came before the confirmation). */

/* ---- history and presence (channels the conf's `channels` names) ------
 *
 * A channel whose options (struct hub_channel_opts) have history_size > 0
 * has a stream: every message published to it gets the next offset (1, 2,
 * ...; the same on every process), the last history_size messages are
 * kept, and the stream has an epoch, a random string fixed when it is
 * created. A stream that was lost (a memory broker's restart, Redis losing
 * its data, the stream expiring) comes back with a new epoch, so an
 * (offset, epoch) pair names one message for ever. The messages are kept
 * history_ttl seconds after the channel's last publish; the position
 * (offset and epoch) max(history_ttl, HUB_STREAM_META_TTL) seconds. */

#define HUB_STREAM_META_TTL (7 * 86400) /* s: the least a position is kept */

/* Where a stream stands: the offset of its last message (0: none yet) and
 * its epoch (never empty). */
struct hub_stream_pos {
    uint64_t offset;
    char epoch[HUB_EPOCH_MAX + 1];
};

/* What a history read asks for. */
struct hub_history_query {
    uint64_t since;     /* only messages with offset > since */
    uint32_t limit;     /* at most this many; 0: the position only */
    int reverse;        /* the newest `limit` of them, newest first */
};

/* What a history read found: the stream's position (a stream is created,
 * with a new epoch, when it did not exist), the oldest offset it still
 * keeps (top.offset + 1 when it keeps none), and the messages asked for:
 * sealed delivery frames (hub_msg_delivery_close, m->offset set) in the
 * order asked, borrowed for the duration of the callback. */
struct hub_history_result {
    struct hub_stream_pos top;
    uint64_t oldest;
    struct hub_msg *const *msgs;
    size_t n;
};

/* Completion of a history read: HUB_OK with `r`, or HUB_EUNAVAILABLE (r
 * NULL). Called exactly once, possibly before history() returns. */
typedef void (*hub_broker_history_cb)(void *ud, int status, const struct hub_history_result *r);

/* Who is subscribed to a presence channel, on every process: each client
 * once, by its id, with its entry: the members of a JSON object without the
 * braces, "client":"<id>","user":"<user>","info":<info> (user and info only
 * when the client has them). The hub builds it; the broker stores and
 * returns it as it is. */
struct hub_presence_result {
    uint64_t clients;   /* clients in the channel */
    uint64_t users;     /* distinct users among them */
    struct hub_buf *list; /* with presence(): "[{entry},...]", at most `max`; borrowed */
    int truncated;      /* the list was cut at `max` */
};

/* Completion of a presence read: HUB_OK with `r`, or HUB_EUNAVAILABLE. */
typedef void (*hub_broker_presence_cb)(void *ud, int status,
                                       const struct hub_presence_result *r);

/* Completion of a publish: `status` is HUB_OK once the message was
 * accepted (memory: handed to `deliver`; redis: Redis executed the PUBLISH
 * while this broker's connections to the channel's server were up and, if
 * this broker has the channel subscribed, the message came back to it and
 * went to `deliver`; see docs/internals.md, "Redis: what an acknowledged
 * publish means"), else HUB_EUNAVAILABLE. On a history channel `pos` is
 * the message's offset and its stream's epoch (NULL otherwise, and on
 * failure). Called exactly once, possibly before publish() returns
 * (memory). */
typedef void (*hub_broker_publish_cb)(void *ud, int status, const struct hub_stream_pos *pos);

/* Completion of a subscribe: HUB_OK once messages published from
 * now on will be delivered (redis: SUBSCRIBE confirmed); else
 * HUB_EUNAVAILABLE (redis: the subscriber connection is down, or went
 * down or timed out before the confirmation, or stop() was called), or
 * HUB_ECANCELED (unsubscribe() of the channel came first). Called
 * exactly once, possibly synchronously. */
typedef void (*hub_broker_subscribe_cb)(void *ud, int status);

/* Where a broker hands a frame for local fan-out: `m` is a sealed frame
 * for `channel` (borrowed; take a reference to keep it): a delivery, or a
 * join/leave event of a presence channel. A delivery on a history channel
 * has m->offset set and `epoch` its stream's (NULL otherwise). Called once
 * per message, from the loop (memory: inside publish()), for the channels
 * subscribed (redis) or for every publish (memory: the hub looks the
 * channel up itself; the broker keeps no copy of the channel registry). It
 * may call the broker (publish, subscribe, unsubscribe, history, presence,
 * stop; not free). */
typedef void (*hub_broker_deliver_fn)(void *ud, const char *channel, size_t len,
                                      struct hub_msg *m, const char *epoch);

/* Called when the broker's health changes (up = 1 connected, 0 down); not
 * at creation: memory starts up, redis starts down. Redis is up when, for
 * every server, the command connection is ready and the subscriber
 * connection has (re)subscribed every channel with local subscribers; a
 * server that stops answering (probed every second) is down within a
 * second plus command_timeout_ms, with or without traffic. */
typedef void (*hub_broker_health_fn)(void *ud, int up);

/* A Redis reply to a command (ops->command), converted from hiredis so that
 * callers need no hiredis header. Strings are `len` bytes followed by a NUL. */
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

/* Completion of a command: HUB_OK with the reply (borrowed: valid during
 * the call only; it may be of type HUB_REPLY_ERROR), or HUB_EUNAVAILABLE
 * with reply NULL (connection lost or timed out before the answer, or
 * stop()). Called exactly once. */
typedef void (*hub_broker_reply_cb)(void *ud, int status, const struct hub_broker_reply *reply);

struct hub_broker_ops {
    const char *name;
    /* 1 when deliveries reach this process only (memory): the hub then
     * skips encoding a publish nobody here listens to. */
    int local;
    /* Publishes a delivery frame (borrowed) to `channel`. Without history
     * (`o` NULL or o->history_size 0) `m` is sealed. With history `m` is
     * open (hub_msg_delivery_open): the broker gives it the stream's next
     * offset, closes it (hub_msg_delivery_close, or the same bytes built
     * elsewhere), keeps it and delivers it, as one step (redis: one
     * script). Returns 0 and calls `cb` exactly once, or returns
     * HUB_EUNAVAILABLE without calling it (fail fast: redis: either
     * connection to the channel's server not ready, the subscriber one not
     * (re)subscribed, or the pending output over its cap). `cb` may be NULL
     * (fire and forget). */
    int (*publish)(struct hub_broker *b, const char *channel, size_t len,
                   struct hub_msg *m, const struct hub_channel_opts *o,
                   hub_broker_publish_cb cb, void *ud);
    /* Reads the stream of history channel `channel` (o->history_size > 0).
     * Returns 0 and calls `cb` exactly once, or HUB_EUNAVAILABLE without
     * calling it. A read that Redis does not answer within the broker's
     * command_timeout_ms calls back HUB_EUNAVAILABLE. */
    int (*history)(struct hub_broker *b, const char *channel, size_t len,
                   const struct hub_channel_opts *o, const struct hub_history_query *q,
                   hub_broker_history_cb cb, void *ud);
    /* Presence (o->presence). A client of this process entered `channel`:
     * `entry` as in struct hub_presence_result (copied), `user` NULL for an
     * anonymous client. Idempotent: a client added twice is there once.
     * With o->join_leave the broker delivers, to the channel's subscribers
     * on every process, {"op":"join","channel":C,<entry>} when the client
     * is anonymous or the first of its user in the channel. Redis: the
     * entry is kept presence_ttl (the conf's) and refreshed by this
     * process while the client stays, so the clients of a process that
     * died leave within presence_ttl, with their leave events; while Redis
     * is unreachable the entry is added once it is back. */
    void (*presence_add)(struct hub_broker *b, const char *channel, size_t len,
                         const struct hub_channel_opts *o, const char *client,
                         const char *user, size_t user_len, const char *entry,
                         size_t entry_len);
    /* The client left `channel` (unsubscribed or disconnected): removed,
     * and with join_leave {"op":"leave",...} when it was anonymous or the
     * last of its user. Unknown clients are ignored. */
    void (*presence_remove)(struct hub_broker *b, const char *channel, size_t len,
                            const struct hub_channel_opts *o, const char *client);
    /* Who is in `channel` on every process: the counts, and with `max` > 0
     * the list of at most `max` entries. Returns 0 and calls `cb` exactly
     * once, or HUB_EUNAVAILABLE without calling it. */
    int (*presence)(struct hub_broker *b, const char *channel, size_t len,
                    const struct hub_channel_opts *o, uint32_t max,
                    hub_broker_presence_cb cb, void *ud);
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
    /* One Redis command (argv[0..argc) with byte lengths `lens`, borrowed
     * until it returns) on the command connection of the first server:
     * returns 0 and calls `cb` (may be NULL) exactly once, never before it
     * returns; or HUB_EUNAVAILABLE (not connected, pending cap reached)
     * without calling it. Never (P)SUBSCRIBE, MULTI or blocking commands:
     * the connection is shared with PUBLISH. memory: HUB_ENOTAVAIL. */
    int (*command)(struct hub_broker *b, int argc, const char **argv, const size_t *lens,
                   hub_broker_reply_cb cb, void *ud);
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
    unsigned presence_ttl;          /* s (the conf's presence_ttl); 60 unless
                                     * the embedder sets it after creation */
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
