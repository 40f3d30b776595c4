/* The Lua policy host: one lua_State per process running the operator's
 * script, sandboxed, with an instruction budget per hook call and a memory
 * cap for the whole state; hook dispatch; reload (build aside, verify,
 * swap). Loop thread only.
 *
 * Decisions fall back to deny: a hook that raises, runs out of budget or
 * returns something unexpected refuses the action with `internal`. */
#ifndef LUAHUB_POLICY_H
#define LUAHUB_POLICY_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/config.h"
#include "luahub/proto.h"
#include "luahub/util.h"

struct hub_server;
struct hub_conn;
struct lws;

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
};

struct hub_policy;

/* For --check: loads the policy file of `cfg` (or the built-in one) in a
 * scratch state, runs its main chunk under the budgets and verifies that
 * every hook it defines is a function. Appends "FILE:LINE: message" to
 * `errs`. Returns 0 or -1. No loop, no server. */
int hub_policy_check(const struct hub_config *cfg, struct hub_config_errors *errs);

/* Builds the policy for `srv` from srv->cfg (policy file or the built-in
 * one). Returns a new policy, or NULL with every problem appended to `errs`. */
struct hub_policy *hub_policy_new(struct hub_server *srv, struct hub_config_errors *errs);

/* How long one call of a policy built from `cfg` may run before it is
 * stopped, in ms: its instruction budget as time (docs/lua.md, "Budgets"). */
uint64_t hub_policy_time_limit_ms(const struct hub_config *cfg);

/* Frees a policy (and its lua_State). Pending timers are cancelled. */
void hub_policy_free(struct hub_policy *p);

/* Reload (SIGHUP, POST /api/reload): builds a new policy from the conf's
 * policy file aside; on success swaps srv->policy and frees the old one,
 * on failure keeps the old one and logs every error. Returns 0 or -1; on -1
 * `errs` (may be NULL) receives the problems. Connections stay; conn.user
 * and conn.info survive (they live in C). */
int hub_policy_reload(struct hub_server *srv, struct hub_config_errors *errs);

/* 1 if the script defines the hook. Call sites skip hooks that are absent,
 * so a policy without hooks costs nothing. */
int hub_policy_has(const struct hub_policy *p, enum hub_hook h);

/* What on_connect decided. `user` and `info_json` are new allocations (or
 * NULL) that the caller owns and moves into the connection. */
struct hub_connect_result {
    unsigned status;        /* HTTP status when denied (403 default) */
    char reason[256];       /* body of the refusal */
    char *user;             /* conn.user as set by the hook */
    char *info_json;        /* conn.info, JSON-encoded */
};

/* on_connect(conn, req), from LWS_CALLBACK_HTTP_CONFIRM_UPGRADE: the
 * headers of `wsi` are readable. `conn_id` is the id the connection will
 * get. conn:send/close/subscribe are not available yet (they raise). */
enum hub_verdict hub_policy_on_connect(struct hub_policy *p, struct lws *wsi,
                                       uint64_t conn_id,
                                       struct hub_connect_result *res);

/* on_subscribe(conn, channel): on ALLOW, `out` (HUB_CHANNEL_MAX + 1 bytes)
 * holds the effective channel (the same one, or the valid name the hook
 * rewrote it to) and *out_len its length. `reason` gets the refusal or the
 * failure text. */
enum hub_verdict hub_policy_on_subscribe(struct hub_policy *p, struct hub_conn *c,
                                         const char *channel, size_t len,
                                         char *out, size_t *out_len,
                                         char *reason, size_t reason_len);

/* Called by on_publish once per message to publish: channel valid, data
 * valid JSON; both borrowed for the duration of the call. */
typedef void (*hub_emit_fn)(void *ud, const char *channel, size_t channel_len,
                            const char *data, size_t data_len);

/* on_publish(conn, channel, msg): on ALLOW, `emit` has been called for each
 * message the hook let through or produced (once with the original bytes
 * when the hook returned true). Emits happen only on ALLOW, after the hook
 * returned, so a failing hook publishes nothing. */
enum hub_verdict hub_policy_on_publish(struct hub_policy *p, struct hub_conn *c,
                                       const char *channel, size_t channel_len,
                                       const char *data, size_t data_len,
                                       hub_emit_fn emit, void *ud,
                                       char *reason, size_t reason_len);

/* on_rpc(conn, method, data): on ALLOW, `result` holds the JSON of the
 * returned value (null if none); on DENY `reason` is the rpc_error text. */
enum hub_verdict hub_policy_on_rpc(struct hub_policy *p, struct hub_conn *c,
                                   const char *method, size_t method_len,
                                   const char *data, size_t data_len,
                                   struct hub_buf *result,
                                   char *reason, size_t reason_len);

/* Notifications; return values of the hooks are ignored. */
void hub_policy_on_unsubscribe(struct hub_policy *p, struct hub_conn *c,
                               const char *channel, size_t len);
void hub_policy_on_disconnect(struct hub_policy *p, struct hub_conn *c,
                              unsigned code, const char *reason);

/* A connection is going away: drops its Lua object (called from CLOSED,
 * after on_disconnect). */
void hub_policy_conn_gone(struct hub_policy *p, struct hub_conn *c);

/* Appends per-hook metrics (calls, errors, budget kills, latency
 * histogram) in Prometheus text. */
void hub_policy_metrics(const struct hub_policy *p, struct hub_buf *b);

#endif
