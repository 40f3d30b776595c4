/* `luahub test`: policy specs without sockets (docs/testing-policies.md).
 * Private contract between the command and the world; nothing else
 * includes it.
 *
 * - spec_host.c: the world a spec drives. The real policy (policy.h: the
 *   same sandbox, budgets, hooks and return-value rules as in the hub) on
 *   a host of its own: connections that record what the policy did to them,
 *   a broker that records every publish and delivers it to the world's
 *   subscribers, and a fake clock that hub.now() reads and that fires the
 *   hub.after timers when the spec advances it. Its functions are seen
 *   from the spec's Lua state (spec_actions.c; lua/spec.lua builds the
 *   spec language on them); the world's insides are spec_world.h.
 * - spec.c: the command: spec files, the spec state and its own budgets,
 *   the reports (text, TAP, JUnit).
 *
 * Loop-free and single-threaded: the world runs everything at once, in
 * the order the spec asks. */
#ifndef LUAHUB_SPEC_IMPL_H
#define LUAHUB_SPEC_IMPL_H

#include <stdint.h>

#include <lua.h>

#include "lua_limits.h"
#include "luahub/config.h"

/* What a new world's clock reads: 2026-01-01T00:00:00Z, in ms. */
#define HUB_SPEC_EPOCH_MS 1767225600000.0
/* Instructions of the spec's own budget that one action on the policy
 * (connect, a command, advance...) costs. */
#define HUB_SPEC_ACTION_COST 1000

struct hub_spec_world;

/* A world for policies built from `cfg` (borrowed: it must outlive the
 * world). `lim` (borrowed) are the limits of the spec state, which every
 * action is charged to. No policy yet: see hub_spec_world_reset. The world
 * takes the log (hub_log_set_sink) until it is freed. */
struct hub_spec_world *hub_spec_world_new(const struct hub_config *cfg,
                                          struct hub_lua_limits *lim);
void hub_spec_world_free(struct hub_spec_world *w);

/* Starts afresh: drops every connection, recording, timer and failure,
 * sets the clock to `start_ms`, and builds a new policy with the conf's
 * policy_vars, or `vars_json` (a JSON object) instead when not NULL.
 * Returns 0, or -1 with every problem ("FILE:LINE: message") in `errs`. */
int hub_spec_world_reset(struct hub_spec_world *w, const char *vars_json, double start_ms,
                         struct hub_config_errors *errs);

/* Calls fn for each warning or error the log got while the last reset
 * built the policy ("function 'on_conect' is not a hook"), oldest first. */
void hub_spec_world_warnings(const struct hub_spec_world *w,
                             void (*fn)(void *ud, const char *line), void *ud);

/* Sets the world's functions (connect, command, advance, ...) as fields of
 * the table on top of L, the spec state's stack. */
void hub_spec_world_open(lua_State *L, struct hub_spec_world *w);

#endif
