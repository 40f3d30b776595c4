/* Running one policy call: a hook, a timer callback or the main chunk,
 * under lua_pcall with the message handler at a fixed stack index and the
 * budgets armed (sandbox.c, lua_limits.c). A failure (error, budget,
 * unexpected return value) is logged as one line
 * `hook=<name> <chunk>:<line>: <message> [conn N]` (at most 10 a second per
 * hook) and counted; the caller's decision is then HUB_FAIL (deny). */
#include "lua_api.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

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

/* Logs one failure line, rate-limited per phase. */
static void log_failure(struct hub_policy *p, int phase, uint64_t conn_id,
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
    log_failure(p, phase, conn_id, b.p ? b.p : "failed");
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
    log_failure(p, phase, conn_id, line);
}

int hub_policy_pcall(struct hub_policy *p, int phase, struct hub_policy_conn *c,
                     uint64_t conn_id, int nargs, int nres)
{
    struct hub_policy_conn *saved_c = p->cur_conn;
    uint64_t saved_id = p->cur_conn_id;

    p->cur_conn = c;
    p->cur_conn_id = conn_id;
    uint64_t t0 = hub_now_ns();
    int st = hub_policy_call(p, phase, nargs, nres);
    hub_hist_observe(&p->st.hook[phase].dur, hub_now_ns() - t0);
    p->cur_conn = saved_c;
    p->cur_conn_id = saved_id;
    if (st == LUA_OK)
        return 0;
    hub_policy_fail(p, phase, conn_id, st);
    return -1;
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

