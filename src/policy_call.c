/* Running one policy call: the main chunk under lua_pcall with the
 * message handler at a fixed stack index, and hooks and timer callbacks as
 * coroutines that may wait (hub.redis & co), each with the budgets armed
 * (sandbox.c, lua_limits.c) and carried across its waits. A failure
 * (error, budget, unexpected return value, the deadline of a wait) is
 * logged as one line `hook=<name> <chunk>:<line>: <message> [conn N]` (at
 * most 10 a second per hook) and counted; the caller's decision is then
 * HUB_FAIL (deny).
 *
 * How a hook waits (docs/internals.md, "How a hook waits"): every call
 * runs on a thread of its own (reused when it ends normally). An API
 * function that waits checks that it may (hub_pcall_check), starts its
 * operation and yields (hub_pcall_wait); lua_resume returns LUA_YIELD to
 * the entry point, which returns HUB_WAIT to its caller. The call is put on
 * the policy's list of waiting calls, ordered by deadline (its start plus
 * lua_call_timeout), under one uv timer. The operation's completion resumes
 * the thread (hub_pcall_wake); a continuation function of the API turns the
 * result into Lua values, on that thread, protected. When the call ends its
 * owner gets the verdict through w->done(). A call whose deadline passes,
 * whose owner goes (hub_policy_cancel), or whose policy is reloaded or
 * freed, is dropped: never resumed again (its thread is left to the
 * collector), its operation's completion finds `await->call` NULL. */
#include "lua_api.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#include "luahub/log.h"
#include "luahub/metrics.h"
#include "luahub/watchdog.h"

#define LOG_PER_SECOND 10

static const char *const hook_names[HUB_HOOK__COUNT] = {
    "on_connect", "on_subscribe", "on_unsubscribe", "on_publish", "on_rpc",
    "on_disconnect",
};

const char *hub_policy_phase_name(int phase)
{
    if (phase >= 0 && phase < HUB_HOOK__COUNT)
        return hook_names[phase];
    if (phase == HUB_PHASE_TIMER)
        return "timer";
    if (phase == HUB_PHASE_LOAD)
        return "load";
    return "idle";
}

/* 1 if `s` starts with "something:digits:" (Lua's position prefix). */
static int has_position(const char *s)
{
    const char *c = strchr(s, ':');
    if (!c || c == s || c[1] < '0' || c[1] > '9')
        return 0;
    for (c++; *c >= '0' && *c <= '9'; c++)
        ;
    return *c == ':';
}

/* Writes what went wrong in the last call into `out`: the budget stop, an
 * out-of-memory error, or the error object (with a position). Pops the
 * error object when `status` is an error. */
void hub_policy_describe_failure(struct hub_policy *p, int status, const char *where,
                                 struct hub_buf *out)
{
    lua_State *L = p->L;

    if (p->lim.killed == HUB_KILL_TIME) {
        hub_buf_printf(out, "%s: time limit exceeded (%llu ms, from lua_max_instructions "
                            "= %llu): slow calls in a loop?",
                       p->lim.kill_where[0] ? p->lim.kill_where : where,
                       (unsigned long long)hub_sandbox_time_limit_ms(p->lim.budget),
                       (unsigned long long)p->lim.budget);
    } else if (p->lim.killed) {
        hub_buf_printf(out, "%s: instruction limit exceeded (lua_max_instructions = "
                            "%llu): runaway loop?",
                       p->lim.kill_where[0] ? p->lim.kill_where : where,
                       (unsigned long long)p->lim.budget);
    } else if (status == LUA_ERRMEM || p->mem_failed) {
        hub_buf_printf(out, "%s: not enough memory: the policy's Lua state would "
                            "exceed lua_max_memory (%llu bytes; memory bomb?)",
                       p->lim.oom_where[0] ? p->lim.oom_where : where,
                       (unsigned long long)p->lim.mem_max);
    } else if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        if (!msg || lua_type(L, -1) != LUA_TSTRING) {
            hub_buf_printf(out, "%s: error object is a %s value",
                           p->err_where[0] ? p->err_where : where, luaL_typename(L, -1));
        } else if (has_position(msg)) {
            hub_buf_appends(out, msg);
        } else {
            hub_buf_printf(out, "%s: %s", p->err_where[0] ? p->err_where : where, msg);
        }
    }
    if (status != LUA_OK)
        lua_pop(L, 1);
}

uint64_t hub_policy_time_limit_ms(const struct hub_config *cfg)
{
    return hub_sandbox_time_limit_ms((int64_t)cfg->lua_max_instructions);
}

/* Runs the function under `nargs` arguments with the budgets on. Returns
 * the lua_pcall status, LUA_ERRRUN also when the call ended normally after
 * its budget ran out (the results are then popped). */
int hub_policy_call(struct hub_policy *p, int phase, int nargs, int nres)
{
    lua_State *L = p->L;
    int saved = p->phase;

    hub_sandbox_arm(p);
    p->phase = phase;
    p->lim.cap_on = 1;
    int st = lua_pcall(L, nargs, nres, HUB_LUA_MSGH);
    p->lim.cap_on = 0;
    p->phase = saved;
    hub_watchdog_beat(); /* a call ended: the loop is not stuck */
    if (st == LUA_OK && (p->lim.killed || p->mem_failed)) {
        lua_pop(L, nres);
        lua_pushnil(L); /* an error object for hub_policy_describe_failure to pop */
        st = LUA_ERRRUN;
    }
    return st;
}

void hub_policy_log_failure(struct hub_policy *p, int phase, uint64_t conn_id,
                            const char *what)
{
    struct hub_hook_stats *s = &p->st.hook[phase];
    uint64_t now = hub_now_ns() / 1000000u;
    char tag[48] = "", more[64] = "";

    if (p->host.ops && p->host.ops->failed) /* luahub test records every one */
        p->host.ops->failed(p->host.ud, hub_policy_phase_name(phase), conn_id, what);

    if (now - s->log_window_ms >= 1000) {
        s->log_window_ms = now;
        s->log_count = 0;
    }
    if (++s->log_count > LOG_PER_SECOND) {
        s->log_suppressed++;
        return;
    }
    if (conn_id)
        snprintf(tag, sizeof(tag), " [conn %llu]", (unsigned long long)conn_id);
    if (s->log_suppressed) {
        snprintf(more, sizeof(more), " (%llu similar lines suppressed)",
                 (unsigned long long)s->log_suppressed);
        s->log_suppressed = 0;
    }
    hub_log(HUB_LOG_ERROR, "hook=%s %s%s%s", hub_policy_phase_name(phase), what, tag,
            more);
    if (hub_log_enabled(HUB_LOG_DEBUG) && p->tb.len) {
        hub_log(HUB_LOG_DEBUG, "hook=%s %s", hub_policy_phase_name(phase), p->tb.p);
        hub_buf_reset(&p->tb);
    }
}

/* Counts and logs the failure of the last call (`status`, error on top). */
void hub_policy_fail(struct hub_policy *p, int phase, uint64_t conn_id, int status)
{
    struct hub_hook_stats *s = &p->st.hook[phase];
    struct hub_buf b = {0};
    const char *where = phase < HUB_HOOK__COUNT ? p->hook_where[phase] : p->source_name;

    s->errors++;
    if (p->lim.killed)
        s->kills_instructions++;
    else if (status == LUA_ERRMEM || p->mem_failed)
        s->kills_memory++;
    hub_policy_describe_failure(p, status, where, &b);
    hub_policy_log_failure(p, phase, conn_id, b.p ? b.p : "failed");
    hub_buf_free(&b);
}

void hub_policy_bad_return(struct hub_policy *p, int phase, uint64_t conn_id,
                           const char *fmt, ...)
{
    char msg[768], line[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    p->st.hook[phase].errors++;
    snprintf(line, sizeof(line), "%s: %s",
             phase < HUB_HOOK__COUNT ? p->hook_where[phase] : p->source_name, msg);
    hub_policy_log_failure(p, phase, conn_id, line);
}

static int encode_tramp(lua_State *L)
{
    hub_lua_encode(hub_lua_policy(L), L, 1, lua_tostring(L, 2));
    return 1;
}

/* Encodes the value at `idx` as JSON under the budgets of the call that
 * produced it; the string stays on the stack. Returns 0, or -1 after
 * counting and logging the failure. */
int hub_policy_encode_result(struct hub_policy *p, int phase, uint64_t conn_id, int idx,
                             const char *what, const char **s, size_t *n)
{
    lua_State *L = p->L;

    idx = lua_absindex(L, idx);
    if (!lua_checkstack(L, 4)) {
        hub_policy_bad_return(p, phase, conn_id, "%s: too many values", what);
        return -1;
    }
    lua_pushcfunction(L, encode_tramp);
    lua_pushvalue(L, idx);
    lua_pushstring(L, what);
    p->lim.cap_on = 1;
    int saved = p->phase;
    p->phase = phase;
    int st = lua_pcall(L, 2, 1, HUB_LUA_MSGH);
    p->phase = saved;
    p->lim.cap_on = 0;
    if (st != LUA_OK) {
        hub_policy_fail(p, phase, conn_id, st);
        return -1;
    }
    *s = lua_tolstring(L, -1, n);
    return 0;
}


/* ---- calls as coroutines ----------------------------------------------------- */

#define POOL_MAX ((int)hub_countof(((struct hub_policy *)0)->idle_co))

/* A thread for a new call: one that ended normally before, or a new one
 * (anchored in the registry, and listed in p->ref_threads so that policy
 * code cannot resume or close it). Memory is uncapped here. */
static lua_State *thread_get(struct hub_policy *p, int *ref)
{
    lua_State *L = p->L;

    if (p->nidle) {
        p->nidle--;
        *ref = p->idle_ref[p->nidle];
        return p->idle_co[p->nidle];
    }
    if (!p->ref_threads) {
        lua_newtable(L);
        lua_newtable(L);
        lua_pushliteral(L, "k");
        lua_setfield(L, -2, "__mode");
        lua_setmetatable(L, -2);
        p->ref_threads = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_State *co = lua_newthread(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_threads);
    lua_pushvalue(L, -2);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return co;
}

/* The call's thread is done with: kept for the next call when it ended
 * normally (an empty stack at base level), else left to the collector (a
 * thread that failed or was dropped while suspended is never run again:
 * closing it would run its pending __close handlers outside any call). */
static void thread_put(struct hub_pcall *call, int reuse)
{
    struct hub_policy *p = call->p;

    if (!call->co)
        return;
    if (reuse && p->nidle < POOL_MAX && lua_status(call->co) == LUA_OK) {
        lua_settop(call->co, 0);
        p->idle_co[p->nidle] = call->co;
        p->idle_ref[p->nidle] = call->co_ref;
        p->nidle++;
    } else {
        luaL_unref(p->L, LUA_REGISTRYINDEX, call->co_ref);
    }
    call->co = NULL;
    call->co_ref = LUA_NOREF;
}

int hub_pcall_is_thread(struct hub_policy *p, lua_State *L, int idx)
{
    if (!p->ref_threads || lua_type(L, idx) != LUA_TTHREAD)
        return 0;
    idx = lua_absindex(L, idx);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_threads);
    lua_pushvalue(L, idx);
    int yes = lua_rawget(L, -2) != LUA_TNIL;
    lua_pop(L, 2);
    return yes;
}

/* ---- the waiting calls, by deadline -------------------------------------- */

static void on_deadline(uv_timer_t *t);

static void free_handle(uv_handle_t *h)
{
    free(h);
}

/* The timer fires at the earliest deadline (or stops: nothing waits). */
static void arm_deadline(struct hub_policy *p)
{
    if (!p->host.loop)
        return;
    if (!p->waiting) {
        if (p->wait_timer)
            uv_timer_stop(p->wait_timer);
        return;
    }
    if (!p->wait_timer) {
        p->wait_timer = hub_xmalloc(sizeof(*p->wait_timer));
        uv_timer_init(p->host.loop, p->wait_timer);
        p->wait_timer->data = p;
        /* waiting calls do not keep the loop (and a shutdown) waiting */
        uv_unref((uv_handle_t *)p->wait_timer);
    }
    uint64_t now = uv_now(p->host.loop), at = p->waiting->deadline_ms;
    uv_timer_start(p->wait_timer, on_deadline, at > now ? at - now : 0, 0);
}

/* Deadlines are the start plus a timeout that is the same for most calls:
 * the list is sorted from the tail, in a step or two. */
static void waiting_add(struct hub_policy *p, struct hub_pcall *c)
{
    struct hub_pcall *at = p->waiting_tail;
    while (at && at->deadline_ms > c->deadline_ms)
        at = at->prev;
    c->prev = at;
    c->next = at ? at->next : p->waiting;
    if (c->next)
        c->next->prev = c;
    else
        p->waiting_tail = c;
    if (at)
        at->next = c;
    else
        p->waiting = c;
    p->nwaiting++;
    p->lim.mem_used += sizeof(*c); /* its C side counts in lua_max_memory */
    if (p->waiting == c)
        arm_deadline(p);
}

static void waiting_remove(struct hub_policy *p, struct hub_pcall *c)
{
    int head = p->waiting == c;
    if (c->prev)
        c->prev->next = c->next;
    else
        p->waiting = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        p->waiting_tail = c->prev;
    c->prev = c->next = NULL;
    p->nwaiting--;
    p->lim.mem_used -= sizeof(*c);
    if (head)
        arm_deadline(p);
}

/* ---- one call ----------------------------------------------------------------- */

struct hub_pcall *hub_pcall_new(struct hub_policy *p, int phase, struct hub_policy_conn *c,
                                uint64_t conn_id, struct hub_policy_wait *w)
{
    struct hub_pcall *call = p->spare;
    if (call)
        p->spare = NULL;
    else
        call = hub_xcalloc(1, sizeof(*call));
    /* everything but the buffers: ch_copy and out are written before they
     * are read, result's memory is reused */
    struct hub_buf keep = call->result;
    memset(call, 0, offsetof(struct hub_pcall, ch_copy));
    call->reason[0] = call->out[0] = '\0';
    call->out_len = 0;
    call->result = keep;
    hub_buf_reset(&call->result);
    memset(&call->budget_left, 0, sizeof(*call) - offsetof(struct hub_pcall, budget_left));
    call->p = p;
    call->phase = phase;
    call->conn_id = conn_id;
    call->c0 = c;
    call->w = w;
    call->can_wait = w != NULL;
    call->co_ref = LUA_NOREF;
    call->keep_ref = LUA_NOREF;
    call->timeout_ms = w && w->timeout_ms ? w->timeout_ms : p->cfg->lua_call_timeout * 1000u;
    call->deadline_ms = (p->host.loop ? uv_now(p->host.loop) : 0) + call->timeout_ms;
    return call;
}

void hub_pcall_free(struct hub_pcall *call)
{
    struct hub_policy *p = call->p;
    if (!p->spare) {
        p->spare = call;
        return;
    }
    hub_buf_free(&call->result);
    free(call);
}

/* One run of the call's thread, up to its end or its next wait. */
static int resume(struct hub_pcall *call, int nargs, int *nres)
{
    struct hub_policy *p = call->p;

    p->phase = call->phase;
    p->running = call;
    p->cur_conn_id = call->conn_id;
    /* the connection is looked up again after a wait: it may be gone */
    p->cur_conn = call->c0 ? call->c0
                  : call->conn_id && p->host.ops ? p->host.ops->conn(p->host.ud, call->conn_id)
                                                 : NULL;
    hub_lua_limits_resume(&p->lim, call->co, call->budget_left, call->time_left_ns);
    p->mem_failed = 0;
    p->err_where[0] = '\0';
    p->lim.L = call->co; /* where the allocator and the hook find the position */
    p->lim.cap_on = 1;
    uint64_t t0 = hub_now_ns();
    int st = lua_resume(call->co, p->L, nargs, nres);
    call->run_ns += hub_now_ns() - t0;
    p->lim.cap_on = 0;
    p->lim.L = p->L;
    p->phase = HUB_PHASE_IDLE;
    p->running = NULL;
    p->cur_conn = NULL;
    p->cur_conn_id = 0;
    hub_watchdog_beat(); /* a call ran: the loop is not stuck */
    return st;
}

/* While a call waits, the values it keeps (on p->L above its base) live in
 * a table in the registry. Memory is uncapped here. */
static void stash_keep(struct hub_pcall *call)
{
    lua_State *L = call->p->L;
    if (!call->nkeep)
        return;
    lua_createtable(L, call->nkeep, 0);
    lua_insert(L, -(call->nkeep + 1));
    for (int i = call->nkeep; i >= 1; i--)
        lua_rawseti(L, -(i + 1), i); /* value i on top, the table i + 1 down */
    call->keep_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

static void unstash_keep(struct hub_pcall *call)
{
    lua_State *L = call->p->L;
    call->base = lua_gettop(L);
    if (call->keep_ref == LUA_NOREF)
        return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, call->keep_ref);
    for (int i = 1; i <= call->nkeep; i++)
        lua_rawgeti(L, call->base + 1, i);
    lua_remove(L, call->base + 1);
    luaL_unref(L, LUA_REGISTRYINDEX, call->keep_ref);
    call->keep_ref = LUA_NOREF;
}

/* The call is over: `nres` results on its thread when `ok`. Runs the
 * finish with the kept values and the results on p->L, returns the
 * verdict, leaves p->L at the call's base. */
static enum hub_verdict end_call(struct hub_pcall *call, int ok, int nres)
{
    struct hub_policy *p = call->p;
    lua_State *L = p->L;

    if (call->waited)
        unstash_keep(call);
    if (ok && !lua_checkstack(L, nres + call->nres + LUA_MINSTACK)) {
        hub_policy_bad_return(p, call->phase, call->conn_id, "%s returned too many values",
                              hub_policy_phase_name(call->phase));
        ok = 0;
    }
    if (ok) {
        lua_xmove(call->co, L, nres);
        lua_settop(L, call->base + call->nkeep + call->nres); /* pads with nil */
    }
    thread_put(call, ok);
    hub_hist_observe(&p->st.hook[call->phase].dur, call->run_ns);
    enum hub_verdict v = call->finish ? call->finish(p, call, call->base, ok)
                                      : ok ? HUB_ALLOW : HUB_FAIL;
    lua_settop(L, call->base);
    if (!ok)
        v = call->limit_hit ? HUB_LIMIT : HUB_FAIL;
    if (v == HUB_LIMIT)
        snprintf(call->reason, sizeof(call->reason),
                 "too many policy calls are waiting (lua_max_waiting = %u): try again later",
                 p->cfg->lua_max_waiting);
    else if (v == HUB_FAIL && !call->reason[0])
        snprintf(call->reason, sizeof(call->reason), "the policy's %s failed (see the hub log)",
                 hub_policy_phase_name(call->phase));
    return v;
}

/* A call that waited is over: its owner gets the outcome, the call goes. */
static void complete(struct hub_pcall *call, enum hub_verdict v)
{
    struct hub_policy_wait *w = call->w;
    struct hub_policy_outcome o = {
        .verdict = v,
        .reason = call->reason,
        .channel = call->out,
        .channel_len = call->out_len,
        .result = call->result.p ? call->result.p : "null",
        .result_len = call->result.p ? call->result.len : 4,
    };
    if (w) {
        w->call = NULL;
        w->done(w, &o);
    }
    hub_pcall_free(call);
}

/* Runs the call until it ends or waits: HUB_WAIT, or the verdict. */
static enum hub_verdict segment(struct hub_pcall *call, int nargs)
{
    struct hub_policy *p = call->p;
    lua_State *L = p->L;
    int nres = 0;
    int st = resume(call, nargs, &nres);

    if (st == LUA_YIELD && call->await) {
        call->budget_left = p->lim.budget_left;
        call->time_left_ns = hub_lua_limits_time_left(&p->lim);
        p->st.waits++;
        if (!call->waited) {
            call->waited = 1;
            call->c0 = NULL;
            if (call->detach)
                call->detach(p, call);
            stash_keep(call);
            if (call->w)
                call->w->call = call;
        }
        return HUB_WAIT;
    }
    if (st == LUA_OK && !p->lim.killed && !p->mem_failed)
        return end_call(call, 1, nres);

    if (st == LUA_YIELD) {
        /* coroutine.yield() in the hook itself: there is nothing to yield to */
        hub_lua_where(call->co, 0, p->err_where, sizeof(p->err_where));
        lua_pushliteral(L, "attempt to yield from outside a coroutine");
        st = LUA_ERRRUN;
    } else if (st == LUA_OK) {
        lua_pushnil(L); /* the budget ran out and the call swallowed the stop */
        st = LUA_ERRRUN;
    } else {
        if (!p->lim.killed)
            hub_lua_where(call->co, 0, p->err_where, sizeof(p->err_where));
        if (hub_log_enabled(HUB_LOG_DEBUG) && lua_type(call->co, -1) == LUA_TSTRING) {
            luaL_traceback(L, call->co, lua_tostring(call->co, -1), 0);
            hub_buf_reset(&p->tb);
            hub_buf_appends(&p->tb, lua_tostring(L, -1));
            lua_pop(L, 1);
        }
        lua_xmove(call->co, L, 1);
    }
    hub_policy_fail(p, call->phase, call->conn_id, st);
    return end_call(call, 0, 0);
}

enum hub_verdict hub_pcall_run(struct hub_pcall *call, int nargs)
{
    struct hub_policy *p = call->p;
    lua_State *L = p->L;

    call->base = lua_gettop(L) - nargs - 1 - call->nkeep;
    call->co = thread_get(p, &call->co_ref);
    lua_xmove(L, call->co, nargs + 1);
    call->budget_left = p->lim.budget;
    call->time_left_ns = p->lim.time_limit_ns;
    return segment(call, nargs);
}

/* Drops a waiting call that will not be resumed: its operation's completion
 * finds nothing, its thread goes, its kept values are released. */
static void drop(struct hub_pcall *call)
{
    waiting_remove(call->p, call);
    if (call->await) {
        call->await->call = NULL;
        call->await = NULL;
    }
    thread_put(call, 0);
}

/* Fails a waiting call: one failure line "`where`: <text>", counted in
 * `stats`, and the owner told. */
static void abort_call(struct hub_pcall *call, struct hub_policy_stats *stats, const char *text,
                       const char *reason)
{
    struct hub_policy *p = call->p;
    char where[HUB_LUA_WHERE_MAX], line[512];

    if (hub_lua_where(call->co, 0, where, sizeof(where)) < 0)
        snprintf(where, sizeof(where), "%s", call->phase < HUB_HOOK__COUNT
                                                 ? p->hook_where[call->phase] : p->source_name);
    snprintf(line, sizeof(line), "%s: %s", where, text);
    stats->hook[call->phase].errors++;
    hub_policy_log_failure(p, call->phase, call->conn_id, line);
    drop(call);
    snprintf(call->reason, sizeof(call->reason), "%s", reason);
    complete(call, end_call(call, 0, 0));
}

static void on_deadline(uv_timer_t *t)
{
    struct hub_policy *p = t->data;
    uint64_t now = uv_now(t->loop);
    struct hub_pcall *call;
    char text[256];

    while ((call = p->waiting) && call->deadline_ms <= now) {
        p->st.wait_timeouts++;
        snprintf(text, sizeof(text), "no answer within %u ms (lua_call_timeout): %s still waits "
                 "(is Redis slow or down?)", call->timeout_ms, call->what ? call->what : "the call");
        abort_call(call, &p->st, text, "");
    }
    arm_deadline(p);
}

void hub_pcall_check(lua_State *L, const char *fn)
{
    struct hub_policy *p = hub_lua_policy(L);
    struct hub_pcall *call = p->running;

    if (!p->host.ops || p->phase == HUB_PHASE_LOAD)
        luaL_error(L, "%s is not available while the policy loads: call it from a hook or a "
                      "timer", fn);
    if (!call)
        luaL_error(L, "%s is not available here", fn);
    if (L != call->co)
        luaL_error(L, "%s cannot be called inside a coroutine the policy created "
                      "(coroutine.wrap, coroutine.resume): call it from the hook itself", fn);
    if (!call->can_wait)
        luaL_error(L, "%s is not available here: this call cannot wait", fn);
    if (!lua_isyieldable(L))
        luaL_error(L, "%s cannot wait here: it was called from a function that Lua's library "
                      "or the hub calls from C (a metamethod such as __tostring called by "
                      "tostring(), a string.gsub replacement function, a table.sort "
                      "comparator): wait before or after that call", fn);
    if (p->nwaiting >= p->cfg->lua_max_waiting) {
        call->limit_hit = 1;
        p->st.wait_refused++;
        hub_lua_error(L, "%s: limit_exceeded: %u policy calls are waiting already "
                      "(lua_max_waiting)", fn, p->nwaiting);
    }
    if (p->lim.mem_used + sizeof(*call) > p->lim.mem_max)
        hub_sandbox_oom(p, L);
    call->limit_hit = 0;
    call->what = fn;
}

int hub_pcall_wait(lua_State *L, struct hub_await *a, lua_KFunction k, lua_KContext ctx)
{
    struct hub_policy *p = hub_lua_policy(L);
    struct hub_pcall *call = p->running;

    a->call = call;
    a->woken = 0;
    call->await = a;
    waiting_add(p, call);
    return lua_yieldk(L, 0, ctx, k);
}

void hub_pcall_wake(struct hub_await *a)
{
    struct hub_pcall *call = a->call;
    if (!call)
        return;
    struct hub_policy *p = call->p;

    a->call = NULL;
    a->woken = 1;
    call->await = NULL;
    waiting_remove(p, call);
    if (p->running) {
        /* Completions come from the loop, never from inside a call: if one
         * ever did, resuming here would run two calls at once. */
        hub_log(HUB_LOG_ERROR, "policy: internal: a completion for %s came while %s runs",
                hub_policy_phase_name(call->phase), hub_policy_phase_name(p->phase));
        waiting_add(p, call);
        abort_call(call, &p->st, "internal error: resumed while another call ran", "");
        return;
    }
    enum hub_verdict v = segment(call, 0);
    if (v != HUB_WAIT)
        complete(call, v);
}

void hub_policy_cancel(struct hub_policy_wait *w)
{
    struct hub_pcall *call = w ? w->call : NULL;
    if (!call)
        return;
    w->call = NULL;
    call->w = NULL;
    drop(call);
    end_call(call, 0, 0);
    hub_pcall_free(call);
}

void hub_pcall_cancel_all(struct hub_policy *p, const char *why, struct hub_policy_stats *stats)
{
    struct hub_pcall *call;
    char text[256];

    while ((call = p->waiting)) {
        stats->wait_cancelled++;
        snprintf(text, sizeof(text), "%s while %s waited", why,
                 call->what ? call->what : "the call");
        abort_call(call, stats, text, text);
    }
}

void hub_pcall_close(struct hub_policy *p)
{
    if (p->wait_timer) {
        uv_close((uv_handle_t *)p->wait_timer, free_handle);
        p->wait_timer = NULL;
    }
    if (p->spare) {
        hub_buf_free(&p->spare->result);
        free(p->spare);
        p->spare = NULL;
    }
    p->nidle = 0; /* the threads go with the state */
}
