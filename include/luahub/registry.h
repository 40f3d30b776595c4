/* The connection registry and the instance heartbeat (multi-instance): one
 * interface, two implementations, made by the broker that fits
 * (hub_broker_registry_new in broker.h): registry_local.c and
 * registry_redis.c, which belong to the brokers; this header and
 * registry.c know no broker.
 *
 * With the redis broker, every process ("instance") keeps in Redis, on the
 * FIRST server of the broker list, through the broker's command
 * connection:
 *
 *   PREFIX instance:ID   hash {connections, started, address, pid}
 *   PREFIX conn:CLIENT   hash {user, instance, connected}   (connections with a user)
 *   PREFIX user:USER     set of CLIENT ids                  (index by user)
 *
 * all with a TTL (30 s) refreshed every 10 s, so the entries of an
 * instance killed with -9 vanish within the TTL. The control channel
 * (PREFIX !control) carries {"op":"disconnect","user":...} to every
 * instance, the sender included.
 *
 * With the memory broker the same API works on this process's connections
 * only: the server does not need to know which broker it runs on.
 *
 * Loop thread only. Every function that takes a callback follows libuv's
 * contract: it returns 0 and calls the callback exactly once (possibly
 * before it returns, with the memory broker), or returns a negative
 * HUB_E* code and never calls it. */
#ifndef LUAHUB_REGISTRY_H
#define LUAHUB_REGISTRY_H

#include <stddef.h>
#include <uv.h>

#include "luahub/error.h"
#include "luahub/util.h"

struct hub_registry;

/* Closes this process's connections of `user` (user[0..len), not
 * NUL-terminated): the server closes each with 4003 "disconnected by the
 * API". Called from the loop, on a control message (redis) or inside
 * hub_registry_disconnect (memory). It must not free the registry; it may
 * call hub_registry_conn_close for the connections it closes (now or
 * later). */
typedef void (*hub_registry_disconnect_fn)(void *ud, const char *user, size_t len);

/* Result of hub_registry_connections: status HUB_OK with `json`
 * (borrowed, valid during the call), a JSON object
 *   {"user":U,"count":N,"connections":[{"client":C,"user":U,"instance":I,
 *    "connected":UNIX_S}, ...]}
 * or HUB_EUNAVAILABLE with json NULL (Redis lost, timed out,
 * stopped, or answered with an error). */
typedef void (*hub_registry_list_cb)(void *ud, int status, const char *json, size_t len);

/* Result of hub_registry_disconnect: HUB_OK once the control
 * message was handed to every instance listening (redis: PUBLISH answered;
 * `instances` is the number of instances that received it; memory: the
 * local connections were told to close, instances = 1), or
 * HUB_EUNAVAILABLE (instances 0). */
typedef void (*hub_registry_done_cb)(void *ud, int status, long long instances);

/* Completion of hub_registry_shutdown. */
typedef void (*hub_registry_shutdown_cb)(void *ud);

struct hub_registry_options {
    const char *instance;       /* this process's instance id (copied) */
    const char *address;        /* "host:port" it listens on (copied; NULL: "") */
    const char *prefix;         /* key prefix, the conf's redis_prefix (copied; NULL: "luahub:") */
    unsigned ttl_ms;            /* TTL of every key (0: 30000) */
    unsigned refresh_ms;        /* heartbeat period (0: 10000); retried every
                                 * min(refresh_ms, 500) ms while it fails */
    unsigned max_unregisters;   /* failed unregistrations kept for a retry
                                 * (0: 100000); past it they are left to the TTL */
    hub_registry_disconnect_fn disconnect_user;    /* may be NULL */
    void *ud;                   /* for disconnect_user */
};

/* A connection opened (call it from ESTABLISHED, for every connection):
 * `client_id` ("<instance>-<n>", NUL-terminated, copied) and `user`
 * (user[0..user_len), copied; NULL for none). Only connections with a user
 * are registered (here and in Redis); the others are only counted, for the
 * heartbeat. Registrations made in one loop iteration go out together
 * (batched, pipelined). Returns 1 when the connection was registered (pass
 * that to hub_registry_conn_close), else 0. */
int hub_registry_conn_open(struct hub_registry *reg, const char *client_id,
                           const char *user, size_t user_len);

/* The connection closed (call it from CLOSED, once per conn_open, with
 * what conn_open returned; unknown ids are ignored): for a registered one,
 * DEL of its key and SREM from the user's set, batched. If Redis is
 * unavailable it is retried with the next heartbeats (bounded by
 * max_unregisters), else the TTL removes it. */
void hub_registry_conn_close(struct hub_registry *reg, const char *client_id,
                             int registered);

/* The connections of `user` (user[0..len), borrowed) on every instance
 * (memory: on this one), as JSON (see hub_registry_list_cb). Redis: one
 * round trip; ids whose conn key expired (a dead instance) are left out
 * and removed from the user's set. Fails fast with HUB_EUNAVAILABLE
 * when Redis is not connected or over the broker's cap. */
int hub_registry_connections(struct hub_registry *reg, const char *user, size_t len,
                             hub_registry_list_cb cb, void *ud);

/* Disconnects `user` (borrowed) everywhere: redis: PUBLISH
 * {"op":"disconnect","user":U} on the control channel; every instance, this
 * one included, calls its disconnect_user when the message arrives. Memory:
 * calls disconnect_user at once. Fails fast like connections(). */
int hub_registry_disconnect(struct hub_registry *reg, const char *user, size_t len,
                            hub_registry_done_cb cb, void *ud);

/* Clean shutdown, before hub_registry_stop: stops the heartbeat, sends the
 * pending unregistrations, DELs the instance key and the keys of every
 * connection still registered, and calls `cb` exactly once when Redis has
 * answered them or failed (bounded by the broker's command timeout, and
 * by 3 s in any case), possibly before it returns (memory, or Redis down).
 * Connections closed afterwards are not sent to Redis. */
void hub_registry_shutdown(struct hub_registry *reg, hub_registry_shutdown_cb cb, void *ud);

/* Stops everything (no Redis traffic; no DEL: use hub_registry_shutdown
 * first for a clean exit), detaches from the control channel and closes
 * the timers (the loop drains them). Call it BEFORE the broker's stop():
 * the broker then fails the registry's pending commands, and their user
 * callbacks fire with HUB_EUNAVAILABLE. Idempotent; NULL is fine. */
void hub_registry_stop(struct hub_registry *reg);

/* Frees it after hub_registry_stop, once the loop has drained (and after
 * the broker's stop). NULL is fine. */
void hub_registry_free(struct hub_registry *reg);

/* Appends the registry's Prometheus metrics (luahub_registry_*). */
void hub_registry_metrics(const struct hub_registry *reg, struct hub_buf *out);

/* Connections currently open on this instance (with or without a user). */
size_t hub_registry_local_count(const struct hub_registry *reg);

#endif
