/* The Lua policy host: one lua_State per process running the operator's
 * script, sandboxed, with an instruction budget per hook call and a memory
 * cap for the whole state; hook dispatch; reload (build aside, verify,
 * swap). Loop thread only.
 *
 * The policy knows no transport: connections are struct hub_policy_conn
 * (part of the host's session) and what it may do to them and to channels
 * goes through the host interface below, which the sessions implement
 * (session_host.c). Hooks are not re-entered: a host op called from a hook must
 * not run another hook.
 *
 * Decisions fall back to deny: a hook that raises, runs out of budget or
 * returns something unexpected refuses the action with `internal`.
 *
 * A hook runs as a coroutine and may wait (hub.redis, hub.history,
 * hub.presence): its entry point then returns HUB_WAIT and the verdict
 * comes later through the caller's struct hub_policy_wait (see there;
 * docs/internals.md, "How a hook waits"). */
#ifndef LUAHUB_POLICY_H
#define LUAHUB_POLICY_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "luahub/broker.h"
#include "luahub/config.h"
#include "luahub/proto.h"
#include "luahub/request.h"
#include "luahub/util.h"

enum hub_hook {
    HUB_HOOK_CONNECT = 0,
    HUB_HOOK_SUBSCRIBE,
    HUB_HOOK_UNSUBSCRIBE,
    HUB_HOOK_PUBLISH,
    HUB_HOOK_RPC,
    HUB_HOOK_DISCONNECT,
    HUB_HOOK__COUNT,
};

/* Outcome of a decision hook. */
enum hub_verdict {
    HUB_ALLOW = 0,      /* go ahead (possibly rewritten) */
    HUB_DENY,           /* the script refused: `reason` says why */
    HUB_FAIL,           /* the script failed (error, budget, bad return): deny with `internal` */
    HUB_LIMIT,          /* the call would have waited past lua_max_waiting: deny with
                         * `limit_exceeded` */
    HUB_WAIT,           /* (entry points only) the call waits: w->done() tells the rest */
};

struct hub_policy;
struct hub_ptimer;          /* a hub.after timer (owned by the policy) */
struct hub_pcall;

/* A connection as the policy sees it: part of the host's session, valid
 * while the connection is open (until hub_policy_conn_gone). The policy
 * reads `id`, replaces `user` and `info_json` (malloc'd strings; the host
 * frees what is left when the connection closes) and caches its Lua object
 * in `lua_ref` (0: none). */
struct hub_policy_conn {
    uint64_t id;
    char *user;             /* conn.user, or NULL */
    char *info_json;        /* conn.info as JSON, or NULL */
    char *protocol;         /* the subprotocol echoed at the upgrade, or NULL (read only) */
    int lua_ref;
};

/* What the policy may ask of its host. Connections are named by id; an op
 * on a connection that is closing does nothing and says so. */
struct hub_policy_host_ops {
    /* The open connection with this id / client name, or NULL. */
    struct hub_policy_conn *(*conn)(void *ud, uint64_t id);
    struct hub_policy_conn *(*conn_named)(void *ud, const char *client);
    /* Writes the client name of `id` ("<instance>-<n>") into out[0..n). */
    void (*conn_name)(void *ud, uint64_t id, char *out, size_t n);
    /* Writes the peer address of an open connection into out[0..n). */
    void (*conn_addr)(void *ud, const struct hub_policy_conn *c, char *out, size_t n);
    /* 1 once a close frame is queued (no more sends). */
    int (*conn_closing)(void *ud, const struct hub_policy_conn *c);
    /* {"op":"push","data":json}; `json` valid, borrowed. */
    void (*conn_send)(void *ud, struct hub_policy_conn *c, const char *json, size_t len);
    /* A close frame with `code` and `reason` (copied). */
    void (*conn_close)(void *ud, struct hub_policy_conn *c, unsigned code, const char *reason);
    /* Server-side (un)subscription, no hook runs: subscribe returns 1 when
     * subscribed now, 0 if it already was, HUB_ELIMIT at
     * max_channels_per_conn; unsubscribe 0, or HUB_ENOTFOUND if it was not
     * subscribed. */
    int (*conn_subscribe)(void *ud, struct hub_policy_conn *c, const char *ch, size_t len);
    int (*conn_unsubscribe)(void *ud, struct hub_policy_conn *c, const char *ch, size_t len);
    /* Calls fn for each channel of the connection. */
    void (*conn_channels)(void *ud, const struct hub_policy_conn *c,
                          void (*fn)(void *arg, const char *ch, size_t len), void *arg);
    /* Calls fn for every open connection (a reload drops their Lua objects). */
    void (*each_conn)(void *ud, void (*fn)(void *arg, struct hub_policy_conn *c), void *arg);
    /* Publishes (fire and forget): the number of local subscribers, 0 if the
     * broker refused. */
    size_t (*publish)(void *ud, const char *ch, size_t len, const char *data, size_t dlen);
    /* Local subscribers of a channel. */
    size_t (*subscribers)(void *ud, const char *ch, size_t len);
    /* This process's clients in a channel and the distinct users among
     * them (hub.presence). */
    void (*presence_local)(void *ud, const char *ch, size_t len, uint64_t *clients,
                           uint64_t *users);
    /* 1 once shutdown has begun. */
    int (*shutting_down)(void *ud);

    /* Optional: a clock of the host's own. NULL in the hub, which keeps the
     * wall clock and libuv timers on host->loop; `luahub test` sets all
     * three to drive a fake clock (docs/testing-policies.md). now_ms is what
     * hub.now(), os.time(), os.date() and hub.jwt_verify read: ms since the
     * Unix epoch. timer_start arms `t` (borrowed): the host calls
     * hub_policy_timer_fire(t) once, `ms` (>= 1) from now, unless
     * timer_stop(t) comes first. Timers due at the same now_ms share one
     * lua_max_instructions, as those of one turn of the loop do. */
    double (*now_ms)(void *ud);
    void (*timer_start)(void *ud, struct hub_ptimer *t, uint64_t ms);
    void (*timer_stop)(void *ud, struct hub_ptimer *t);
    /* Optional: a policy call failed (an error, a budget stop, a bad return
     * value). `hook` is "on_publish", "timer"...; `what` the logged text,
     * "chunk:line: message" (borrowed). Called for every failure, before
     * the log's rate limit. */
    void (*failed)(void *ud, const char *hook, uint64_t conn_id, const char *what);
    /* What hooks may wait for. Each returns 0 and calls `cb` exactly once
     * (redis: never before it returns; history and presence: possibly
     * before), or a negative HUB_E* code without calling it. Arguments are
     * borrowed until it returns; what `cb` gets is borrowed for the call.
     * NULL: not available (HUB_ENOTAVAIL).
     * redis: one command on the policy's Redis (policy_redis, else the redis
     * broker's command connection): HUB_ENOTAVAIL without one,
     * HUB_EUNAVAILABLE when it is down or over its pending cap. */
    int (*redis)(void *ud, int argc, const char **argv, const size_t *lens,
                 hub_broker_reply_cb cb, void *cbud);
    /* hub_history() / hub_presence() of the hub (include/luahub/hub.h). */
    int (*history)(void *ud, const char *ch, size_t len, const struct hub_history_query *q,
                   hub_broker_history_cb cb, void *cbud);
    int (*presence)(void *ud, const char *ch, size_t len, uint32_t max,
                    hub_broker_presence_cb cb, void *cbud);
};

struct hub_policy_host {
    const struct hub_policy_host_ops *ops;
    void *ud;
    uv_loop_t *loop;                /* for timers */
    const struct hub_config *cfg;   /* borrowed; outlives the policy */
};

/* For --check: loads the policy file of `cfg` (or the built-in one) in a
 * scratch state, with the keys of jwt_keys and the modules it requires,
 * runs its main chunk under the budgets and verifies that every hook it
 * defines is a function. Appends "FILE:LINE: message" to `errs` for
 * problems, to `warns` for likely mistakes that do not stop it (a
 * misspelled hook, unused globals: docs/lua.md, "Warnings"). Returns 0 or
 * -1. No loop, no server. */
int hub_policy_check(const struct hub_config *cfg, struct hub_config_errors *errs,
                     struct hub_config_errors *warns);

/* Builds the policy from host->cfg (policy file or the built-in one) for
 * `host` (copied; its ud and cfg must outlive the policy). Returns a new
 * policy, or NULL with every problem appended to `errs`. Warnings are
 * logged (as by a reload). */
struct hub_policy *hub_policy_new(const struct hub_policy_host *host,
                                  struct hub_config_errors *errs);

/* How long one call of a policy built from `cfg` may run before it is
 * stopped, in ms: its instruction budget as time (docs/lua.md, "Budgets"). */
uint64_t hub_policy_time_limit_ms(const struct hub_config *cfg);

/* Frees a policy (and its lua_State). Pending timers are cancelled. */
void hub_policy_free(struct hub_policy *p);

/* Reload (SIGHUP, POST /api/reload): builds a new policy for the same
 * host aside; on success swaps *policy and frees the old one, on failure
 * keeps the old one and logs every error. Returns 0 or -1; on -1 `errs`
 * (may be NULL) receives the problems. Connections stay; conn.user and
 * conn.info survive (they live in the host). */
int hub_policy_reload(struct hub_policy **policy, struct hub_config_errors *errs);

/* 1 if the script defines the hook. Call sites skip hooks that are absent,
 * so a policy without hooks costs nothing. */
int hub_policy_has(const struct hub_policy *p, enum hub_hook h);

/* What a hook that waited decided, for w->done(). Every pointer is
 * borrowed for the duration of done(). */
struct hub_policy_outcome {
    enum hub_verdict verdict;       /* ALLOW, DENY, FAIL or LIMIT */
    const char *reason;             /* DENY: the refusal; FAIL/LIMIT: why ("" if none) */
    const char *channel;            /* on_subscribe ALLOW: the effective channel */
    size_t channel_len;
    const char *result;             /* on_rpc ALLOW: the JSON of the result */
    size_t result_len;
};

/* A hook call that may wait, owned by its caller (embed it where the
 * outputs of the hook live). Give it to an entry point with `done` set
 * (and timeout_ms, 0 for lua_call_timeout); if the entry point returns
 * HUB_WAIT, done() is called exactly once, later (from a Redis reply, the
 * deadline, a reload or the policy's end; never from inside another hook),
 * unless the caller calls hub_policy_cancel() first. The output parameters
 * of the entry point are not written then: done() gets the outcome, and for
 * on_publish `emit` is called before it, on ALLOW. done() may run hooks
 * again. A NULL `w` means the caller cannot wait: hub.redis & co raise. */
struct hub_policy_wait {
    void (*done)(struct hub_policy_wait *w, const struct hub_policy_outcome *o);
    uint32_t timeout_ms;            /* the call's deadline; 0: lua_call_timeout */
    struct hub_pcall *call;         /* private: the waiting call, NULL if none */
};

/* The caller goes away (a connection closed): the waiting call is dropped
 * (its coroutine is never resumed) and done() is not called. No-op when
 * nothing waits. */
void hub_policy_cancel(struct hub_policy_wait *w);

/* What on_connect decided. `user` and `info_json` are new allocations (or
 * NULL) that the caller owns and moves into the connection. */
struct hub_connect_result {
    unsigned status;        /* HTTP status when denied (403 default) */
    char reason[256];       /* body of the refusal */
    char *user;             /* conn.user as set by the hook */
    char *info_json;        /* conn.info, JSON-encoded */
    char *protocol;         /* conn.protocol: one of the offered subprotocols, or NULL */
};

/* on_connect(conn, req) for the WebSocket upgrade request `req`
 * (borrowed; when the call waits, until done()), before the upgrade is
 * answered. `conn_id` is the id the connection will get. conn:send/close/
 * subscribe are not available yet (they raise). `res` must stay valid until
 * done() too: it is filled before done() is called. */
enum hub_verdict hub_policy_on_connect(struct hub_policy *p, const struct hub_request *req,
                                       uint64_t conn_id,
                                       struct hub_connect_result *res,
                                       struct hub_policy_wait *w);

/* on_subscribe(conn, channel): on ALLOW, `out` (HUB_CHANNEL_MAX + 1 bytes)
 * holds the effective channel (the same one, or the valid name the hook
 * rewrote it to) and *out_len its length. `reason` gets the refusal or the
 * failure text. */
enum hub_verdict hub_policy_on_subscribe(struct hub_policy *p, struct hub_policy_conn *c,
                                         const char *channel, size_t len,
                                         char *out, size_t *out_len,
                                         char *reason, size_t reason_len,
                                         struct hub_policy_wait *w);

/* Called by on_publish once per message to publish: channel valid, data
 * valid JSON; both borrowed for the duration of the call. */
typedef void (*hub_emit_fn)(void *ud, const char *channel, size_t channel_len,
                            const char *data, size_t data_len);

/* on_publish(conn, channel, msg): on ALLOW, `emit` has been called for each
 * message the hook let through or produced (once with the original bytes
 * when the hook returned true). Emits happen only on ALLOW, after the hook
 * returned, so a failing hook publishes nothing. A call that waits copies
 * `channel` and `data`; `ud` must stay valid until done(). */
enum hub_verdict hub_policy_on_publish(struct hub_policy *p, struct hub_policy_conn *c,
                                       const char *channel, size_t channel_len,
                                       const char *data, size_t data_len,
                                       hub_emit_fn emit, void *ud,
                                       char *reason, size_t reason_len,
                                       struct hub_policy_wait *w);

/* on_rpc(conn, method, data): on ALLOW, `result` holds the JSON of the
 * returned value (null if none); on DENY `reason` is the rpc_error text. */
enum hub_verdict hub_policy_on_rpc(struct hub_policy *p, struct hub_policy_conn *c,
                                   const char *method, size_t method_len,
                                   const char *data, size_t data_len,
                                   struct hub_buf *result,
                                   char *reason, size_t reason_len,
                                   struct hub_policy_wait *w);

/* Notifications; return values of the hooks are ignored. on_unsubscribe
 * returns HUB_WAIT when it waits (w->done() follows; its outcome means
 * nothing), else HUB_ALLOW. on_disconnect may wait too, on its own: the
 * connection is gone by then, and nobody is told when it ends. */
enum hub_verdict hub_policy_on_unsubscribe(struct hub_policy *p, struct hub_policy_conn *c,
                                           const char *channel, size_t len,
                                           struct hub_policy_wait *w);
void hub_policy_on_disconnect(struct hub_policy *p, struct hub_policy_conn *c,
                              unsigned code, const char *reason);

/* A connection is going away: drops its Lua object (called from CLOSED,
 * after on_disconnect). */
void hub_policy_conn_gone(struct hub_policy *p, struct hub_policy_conn *c);

/* A timer armed with the host's timer_start is due: runs its callback (as
 * the "timer" phase) and frees it. Only for hosts with their own clock. */
void hub_policy_timer_fire(struct hub_ptimer *t);

/* Appends per-hook metrics (calls, errors, budget kills, latency
 * histogram) in Prometheus text. */
void hub_policy_metrics(const struct hub_policy *p, struct hub_buf *b);

#endif
