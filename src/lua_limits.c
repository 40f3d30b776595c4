/* The memory cap and the instruction budget of a lua_State, for the conf
 * loader and the policy sandbox (lua_limits.h; docs/internals.md, "Lua:
 * calls outside the instruction budget").
 *
 * - The allocator counts every byte and, while cap_on, refuses growth past
 *   mem_max; Lua turns the refusal into an out-of-memory error (after an
 *   emergency collection). It records where the state was, for the
 *   message. Shrinking is never refused.
 * - Allocating is work (a copy, a GC step): with alloc_cost, every
 *   alloc_cost bytes allocated while cap_on take one instruction off the
 *   budget. The allocator cannot raise; the hook does at its next tick.
 * - The count hook takes `tick` instructions off the budget at each call;
 *   once it is spent, or the run is past its time limit, it raises the
 *   stop, and raises it again at every later tick.
 * - A run with a time limit also watches how fast its ticks go:
 *   instructions that are slow one by one (== or < on two strings of tens
 *   of MB: one instruction, a memcmp) would let a tick of them run for
 *   seconds before the time limit is looked at again, so a tick slower
 *   than SLOW_TICK_NS switches the thread to a hook at every instruction,
 *   and a tick at a sane speed switches it back. */
#include "lua_limits.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>

#include "luahub/util.h"

#define SLOW_TICK_NS 10000000u /* for a tick of 1000 instructions: 1000 times the norm */

static char kill_sentinel; /* its address is the default stop's error object */

int hub_lua_where(lua_State *L, int level, char *out, size_t n)
{
    lua_Debug ar;
    out[0] = '\0';
    for (; lua_getstack(L, level, &ar); level++) {
        if (lua_getinfo(L, "Sl", &ar) && ar.currentline > 0) {
            snprintf(out, n, "%s:%d", ar.short_src, ar.currentline);
            return ar.currentline;
        }
    }
    return -1;
}

static void *limits_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    struct hub_lua_limits *lim = ud;
    size_t old = ptr ? osize : 0; /* with ptr == NULL, osize is a type tag */

    if (nsize == 0) {
        free(ptr);
        lim->mem_used -= old;
        return NULL;
    }
    if (nsize > old && lim->cap_on && lim->mem_used - old + nsize > lim->mem_max) {
        if (lim->L)
            lim->oom_line = hub_lua_where(lim->L, 0, lim->oom_where, sizeof(lim->oom_where));
        return NULL;
    }
    void *q = realloc(ptr, nsize);
    if (!q)
        return NULL;
    lim->mem_used = lim->mem_used - old + nsize;
    if (lim->alloc_cost && lim->cap_on && nsize > old) {
        lim->alloc_bytes += nsize - old;
        if (lim->alloc_bytes >= lim->alloc_cost) {
            lim->budget_left -= (int64_t)(lim->alloc_bytes / lim->alloc_cost);
            lim->alloc_bytes %= lim->alloc_cost;
        }
    }
    return q;
}

/* A clock for time limits: a few ns to read, 1-4 ms resolution. */
static uint64_t coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* HUB_KILL_* if the run in progress is out of instructions or time. */
static int over(struct hub_lua_limits *lim)
{
    if (lim->budget_left <= 0)
        return HUB_KILL_INSTRUCTIONS;
    if (coarse_ns() > lim->deadline_ns)
        return HUB_KILL_TIME;
    return 0;
}

static void count_hook(lua_State *L, lua_Debug *ar);

static void pace(struct hub_lua_limits *lim, lua_State *L, int every)
{
    if ((lim->pace_count += every) < lim->tick)
        return;
    uint64_t now = hub_now_ns();
    int slow = now - lim->pace_ns > SLOW_TICK_NS;
    lim->pace_ns = now;
    lim->pace_count = 0;
    if (slow != (every == 1))
        lua_sethook(L, count_hook, LUA_MASKCOUNT, slow ? 1 : lim->tick);
}

/* Raises the stop; from the count hook (`in_hook`) a stop that yielded
 * the running coroutine instead returns, and the hook with it. */
static void raise_stop(struct hub_lua_limits *lim, lua_State *L, int in_hook)
{
    if (lim->stop)
        lim->stop(L, lim);
    if (in_hook && lua_status(L) == LUA_YIELD)
        return;
    lua_pushlightuserdata(L, &kill_sentinel);
    lua_error(L);
}

static void count_hook(lua_State *L, lua_Debug *ar)
{
    void *ud;
    lua_getallocf(L, &ud);
    struct hub_lua_limits *lim = ud;
    int every = lua_gethookcount(L);

    if (!lim->killed) {
        lim->budget_left -= every;
        if (lim->idle && lim->idle(L))
            return;
        if (!(lim->killed = over(lim))) {
            if (lim->time_limit_ns)
                pace(lim, L, every);
            return;
        }
        if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0)
            snprintf(lim->kill_where, sizeof(lim->kill_where), "%s:%d", ar->short_src,
                     ar->currentline);
        else
            hub_lua_where(L, 0, lim->kill_where, sizeof(lim->kill_where));
    }
    raise_stop(lim, L, 1);
}

lua_State *hub_lua_limits_newstate(struct hub_lua_limits *lim)
{
    lim->L = lua_newstate(limits_alloc, lim);
    return lim->L;
}

void hub_lua_limits_hook(struct hub_lua_limits *lim)
{
    lua_sethook(lim->L, count_hook, LUA_MASKCOUNT, lim->tick);
}

void hub_lua_limits_arm(struct hub_lua_limits *lim)
{
    lim->budget_left = lim->budget;
    lim->alloc_bytes = 0;
    lim->deadline_ns = lim->time_limit_ns ? coarse_ns() + lim->time_limit_ns : UINT64_MAX;
    lim->pace_ns = hub_now_ns();
    lim->pace_count = 0;
    if (lua_gethookcount(lim->L) != lim->tick)
        hub_lua_limits_hook(lim);
    lim->killed = 0;
    lim->kill_where[0] = lim->oom_where[0] = '\0';
}

void hub_lua_limits_charge(struct hub_lua_limits *lim, lua_State *L, int64_t n)
{
    if (!lim->cap_on)
        return;
    if (!lim->killed) {
        /* n may be up to INT64_MAX (a size of 2^62 times a cost) */
        lim->budget_left = n >= lim->budget_left ? 0 : lim->budget_left - n;
        if (!(lim->killed = over(lim)))
            return;
        hub_lua_where(L, 1, lim->kill_where, sizeof(lim->kill_where));
    }
    /* stopped already (e.g. C code that went on after a callback was
     * stopped): stop again */
    raise_stop(lim, L, 0);
}
