/* hub.after(seconds, fn): one-shot timers on the hub's loop, each an
 * allocation outside the Lua state (counted in lua_max_memory while
 * pending) with a uv_timer_t; and the timer object's cancel method. Timers
 * made while the policy loads start once it is in service
 * (hub_lua_timers_start); a reload or the end closes them all
 * (hub_lua_timers_close). Callbacks run through hub_policy_pcall as the
 * "timer" phase (docs/internals.md, "Timers (libuv 1.44)").
 *
 * A host with a clock of its own (`luahub test`, policy.h) arms and stops
 * the timers itself and fires them with hub_policy_timer_fire; the uv
 * handle is then unused and a timer is freed at once. */
#include "lua_api.h"

#include <math.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#define TIMER_MT "timer"
#define TIMERS_MAX 65536            /* hub.after timers pending or being released */
#define TIMER_MAX_S (366.0 * 86400) /* longest hub.after delay */
#define TIMER_MIN_MS 1              /* shortest hub.after delay (see hub_lua_after) */
#define TIMER_MIN_COST 1000         /* instructions a timer callback counts at least */

struct hub_ptimer {
    uv_timer_t t;                   /* first: the handle is the allocation */
    struct hub_policy *p;
    struct hub_ptimer *prev, *next;
    int fn_ref, obj_ref;
    uint64_t ms;
    int started;
    int armed;                      /* host clock: armed with timer_start */
};

struct ltimer {
    struct hub_ptimer *t;           /* NULL once fired or cancelled */
};

/* Timer handles closed but not freed yet: their close callbacks run when
 * the loop next turns. Process-wide (one loop per process); counted in
 * TIMERS_MAX so that what is allocated outside the Lua state stays bounded
 * even before the loop turns. */
static unsigned timers_closing;

static void free_timer(uv_handle_t *h)
{
    timers_closing--;
    free(h); /* h is &t->t, the start of the allocation */
}

/* The host drives the timers (policy.h: timer_start) instead of libuv. */
static int host_clock(const struct hub_policy *p)
{
    return p->host.ops && p->host.ops->timer_start;
}

/* Unlinks `t` from its policy, drops its Lua refs and closes the handle
 * (freed in the close callback) or frees it if it never started. */
static void detach_timer(struct hub_ptimer *t)
{
    struct hub_policy *p = t->p;
    lua_State *L = p->L;
    int host = host_clock(p);

    if (t->prev)
        t->prev->next = t->next;
    else
        p->timers = t->next;
    if (t->next)
        t->next->prev = t->prev;
    p->ntimers--;
    p->lim.mem_used -= sizeof(*t); /* charged to lua_max_memory while pending */
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->obj_ref);
    struct ltimer *u = lua_touserdata(L, -1);
    if (u)
        u->t = NULL;
    lua_pop(L, 1);
    luaL_unref(L, LUA_REGISTRYINDEX, t->obj_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->fn_ref);
    t->p = NULL;
    if (host) {
        if (t->armed)
            p->host.ops->timer_stop(p->host.ud, t);
        free(t);
    } else if (t->started) {
        timers_closing++;
        uv_close((uv_handle_t *)&t->t, free_timer);
    } else {
        free(t);
    }
}

/* Timer callbacks due in one loop iteration share one budget: once they
 * have used lua_max_instructions together (each counts at least
 * TIMER_MIN_COST), the rest wait for a later iteration, so that a burst of
 * timers (a callback may arm thousands) cannot keep the loop from its I/O
 * for more than about one hook's budget. An iteration is told by the
 * loop's cached time, which only moves between iterations. */
static int timer_pass_full(struct hub_policy *p, uint64_t now)
{
    if (now != p->timer_pass_ms) {
        p->timer_pass_ms = now;
        p->timer_pass_used = 0;
    }
    return p->timer_pass_used >= p->lim.budget;
}

static void arm(struct hub_policy *p, struct hub_ptimer *t, uint64_t ms);

/* `t` is due; `turn` tells the turn of the loop (the loop's time, or the
 * host clock's ms). */
static void fire(struct hub_ptimer *t, uint64_t turn)
{
    struct hub_policy *p = t->p;
    lua_State *L = p->L;

    if (timer_pass_full(p, turn)) {
        arm(p, t, TIMER_MIN_MS);
        return;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->fn_ref);
    detach_timer(t);
    if (hub_policy_pcall(p, HUB_PHASE_TIMER, NULL, 0, 0, 0) == 0)
        lua_settop(L, HUB_LUA_BASE);
    int64_t used = p->lim.budget - p->lim.budget_left;
    p->timer_pass_used += used > TIMER_MIN_COST ? used : TIMER_MIN_COST;
}

static void on_timer(uv_timer_t *h)
{
    fire((struct hub_ptimer *)h, uv_now(h->loop));
}

void hub_policy_timer_fire(struct hub_ptimer *t)
{
    struct hub_policy *p = t->p;
    t->armed = 0; /* the host has let go of it */
    fire(t, (uint64_t)p->host.ops->now_ms(p->host.ud));
}

/* (Re)starts a started timer to fire in `ms`. */
static void arm(struct hub_policy *p, struct hub_ptimer *t, uint64_t ms)
{
    if (host_clock(p)) {
        t->armed = 1;
        p->host.ops->timer_start(p->host.ud, t, ms);
    } else {
        uv_timer_start(&t->t, on_timer, ms, 0);
    }
}

static void start_timer(struct hub_policy *p, struct hub_ptimer *t)
{
    if (!host_clock(p)) {
        uv_timer_init(p->host.loop, &t->t);
        /* Pending policy timers do not keep the loop (and a shutdown) waiting. */
        uv_unref((uv_handle_t *)&t->t);
    }
    t->started = 1;
    arm(p, t, t->ms);
}

void hub_lua_timers_start(struct hub_policy *p)
{
    p->in_service = 1;
    for (struct hub_ptimer *t = p->timers; t; t = t->next)
        if (!t->started)
            start_timer(p, t);
}

void hub_lua_timers_close(struct hub_policy *p)
{
    while (p->timers)
        detach_timer(p->timers);
    p->in_service = 0;
}

int hub_lua_after(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    lua_Number s = luaL_checknumber(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (!(s >= 0 && s <= TIMER_MAX_S))
        luaL_error(L, "hub.after: the delay must be 0 to %d seconds", (int)TIMER_MAX_S);
    if (p->host.ops && p->host.ops->shutting_down(p->host.ud))
        luaL_error(L, "hub.after: the hub is shutting down");
    if (p->ntimers + timers_closing >= TIMERS_MAX)
        luaL_error(L, "hub.after: too many timers (%d pending or being released)",
                   TIMERS_MAX);
    /* the C side of a timer counts against lua_max_memory */
    if (p->lim.cap_on && p->lim.mem_used + sizeof(struct hub_ptimer) > p->lim.mem_max)
        hub_sandbox_oom(p, L);

    struct ltimer *u = lua_newuserdatauv(L, sizeof(*u), 0);
    u->t = NULL;
    luaL_setmetatable(L, TIMER_MT);
    struct hub_ptimer *t = hub_xcalloc(1, sizeof(*t));
    p->lim.mem_used += sizeof(*t);
    t->t.data = t;
    t->p = p;
    /* At least 1 ms: libuv 1.44 runs a timer of timeout 0 armed from a timer
     * callback in the same pass over the timers (docs/internals.md), so a
     * callback re-arming itself with hub.after(0, f) would never let the
     * loop reach its I/O. 1 ms is due at the next iteration at the earliest. */
    t->ms = (uint64_t)llround(s * 1000.0);
    if (t->ms < TIMER_MIN_MS)
        t->ms = TIMER_MIN_MS;
    lua_pushvalue(L, 2);
    t->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -1);
    t->obj_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    u->t = t;
    t->next = p->timers;
    if (p->timers)
        p->timers->prev = t;
    p->timers = t;
    p->ntimers++;
    if (p->in_service)
        start_timer(p, t);
    return 1;
}

static int l_timer_cancel(lua_State *L)
{
    struct ltimer *u = luaL_checkudata(L, 1, TIMER_MT);
    if (!u->t) {
        lua_pushboolean(L, 0);
        return 1;
    }
    detach_timer(u->t);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_timer_tostring(lua_State *L)
{
    struct ltimer *u = luaL_checkudata(L, 1, TIMER_MT);
    lua_pushstring(L, u->t ? "timer (pending)" : "timer (done)");
    return 1;
}

void hub_lua_timer_open(lua_State *L)
{
    static const luaL_Reg timer_mt[] = {
        {"__tostring", l_timer_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg timer_methods[] = {
        {"cancel", l_timer_cancel},
        {NULL, NULL},
    };

    hub_lua_new_metatable(L, TIMER_MT, timer_mt);
    luaL_getmetatable(L, TIMER_MT);
    luaL_newlib(L, timer_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

void hub_lua_timers_each_fn(struct hub_policy *p, void (*fn)(struct hub_policy *p, void *ud),
                            void *ud)
{
    for (struct hub_ptimer *t = p->timers; t; t = t->next) {
        lua_rawgeti(p->L, LUA_REGISTRYINDEX, t->fn_ref);
        fn(p, ud);
    }
}
