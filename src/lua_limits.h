/* Limits of a lua_State, shared by the conf loader (config.c), the
 * policy sandbox (sandbox.c) and the spec state of `luahub test` (spec.c):
 * an allocator that counts every byte of the state and refuses growth past
 * a cap, and an instruction budget that a count hook takes its ticks off
 * (docs/internals.md, "Lua: calls outside the instruction budget").
 * Private to those three; loop thread only.
 *
 * What differs between the callers is a field of the struct, not a second
 * copy:
 * - the conf: the cap always on (cap_on = 1); one run of a fixed budget,
 *   hooked once when it is spent (tick = budget); no time limit, no
 *   allocation charge; the stop is a message (stop).
 * - the policy: the cap on while Lua code runs (cap_on); a budget per call,
 *   hooked every HUB_LUA_TICK instructions; C work and allocations charged
 *   to it; a time limit per call; the stop is a sentinel raised again at
 *   every tick, so that a pcall inside the script cannot swallow it.
 * - a spec (spec.c): the cap always on; a budget per test, hooked every
 *   1000 instructions; the stop yields the test's coroutine. */
#ifndef LUAHUB_LUA_LIMITS_H
#define LUAHUB_LUA_LIMITS_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#define HUB_LUA_WHERE_MAX 128       /* bytes of a "chunk:line" */
#define HUB_COST_ALLOC 64           /* bytes allocated per instruction (alloc_cost) */

/* Why a run was stopped (killed). */
enum { HUB_KILL_INSTRUCTIONS = 1, HUB_KILL_TIME };

struct hub_lua_limits {
    /* set by the owner */
    size_t mem_max;                 /* cap on the bytes of the state */
    int cap_on;                     /* the cap applies and work is charged */
    int64_t budget;                 /* instructions of one run (arm) */
    int tick;                       /* instructions between two hook calls */
    uint64_t time_limit_ns;         /* of one run; 0: none */
    size_t alloc_cost;              /* bytes allocated per instruction charged
                                     * while cap_on; 0: allocations are free */
    /* NULL, or 1 while nothing runs: the hook then counts but never stops. */
    int (*idle)(lua_State *L);
    /* Raises the stop (does not return); NULL: a sentinel light userdata
     * that only the owner's own checks of `killed` tell apart. Called from
     * the count hook, it may instead yield the running coroutine
     * (lua_yield(L, 0)) and return: a yield passes through every pcall of
     * the code, an error does not (`luahub test` runs a spec's tests as
     * coroutines for that). */
    void (*stop)(lua_State *L, struct hub_lua_limits *lim);

    /* kept by the allocator, the hook and hub_lua_limits_charge */
    lua_State *L;                   /* set by hub_lua_limits_newstate; the
                                     * owner clears it before lua_close */
    size_t mem_used;                /* every byte the state holds */
    size_t alloc_bytes;             /* allocated, not charged yet (< alloc_cost) */
    int64_t budget_left;
    uint64_t deadline_ns;           /* the run's time limit (coarse monotonic clock) */
    uint64_t pace_ns;               /* when the hook last measured its speed */
    int pace_count;                 /* instructions hooked since */
    int killed;                     /* the budget ran out in this run: HUB_KILL_* */
    int oom_line;                   /* line running at the last refused allocation, -1 */
    char kill_where[HUB_LUA_WHERE_MAX]; /* "chunk:line" where the budget ran out */
    char oom_where[HUB_LUA_WHERE_MAX];  /* "chunk:line" of the last refused allocation */
};

/* lua_newstate with the counting, capped allocator of `lim` (borrowed: it
 * must outlive the state). Sets lim->L. Returns the state or NULL. */
lua_State *hub_lua_limits_newstate(struct hub_lua_limits *lim);

/* Sets the count hook on lim->L (every lim->tick instructions). */
void hub_lua_limits_hook(struct hub_lua_limits *lim);

/* A fresh budget (and time limit) for a new run; clears `killed`,
 * kill_where and oom_where; sets the hook back to lim->tick. */
void hub_lua_limits_arm(struct hub_lua_limits *lim);

/* A run that was suspended (a coroutine that waited) goes on, on thread
 * `L`: its budget is what it had left, `budget_left`, and its time limit
 * the running time it had left, `time_left_ns` (a wait does not count);
 * clears `killed`, kill_where and oom_where; sets L's hook back to
 * lim->tick. */
void hub_lua_limits_resume(struct hub_lua_limits *lim, lua_State *L, int64_t budget_left,
                           uint64_t time_left_ns);

/* The running time the run in progress has left before its time limit. */
uint64_t hub_lua_limits_time_left(const struct hub_lua_limits *lim);

/* Charges `n` instructions of C work to the run in progress (no-op while
 * the cap is off); raises the stop when the budget is out or the run is
 * past its time limit. */
void hub_lua_limits_charge(struct hub_lua_limits *lim, lua_State *L, int64_t n);

/* Writes "chunk:line" of the innermost Lua function of `L` at `level` or
 * above into out[0..n) ("" if none) and returns the line, or -1. Reads
 * debug info only (no allocation, no error): safe inside the allocator. */
int hub_lua_where(lua_State *L, int level, char *out, size_t n);

#endif
