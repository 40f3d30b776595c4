/* The Lua policy host: loads the operator's script into a sandboxed state
 * (sandbox.c), dispatches hooks, turns their return values into verdicts,
 * reloads by build, verify, swap, and renders the metrics.
 *
 * Every call runs under lua_pcall with the message handler at a fixed stack
 * index and the budgets armed (sandbox.c). A failure (error, budget,
 * unexpected return value) is logged as one line
 * `hook=<name> <chunk>:<line>: <message> [conn N]` (at most 10 a second per
 * hook), counted, and the decision is HUB_FAIL (deny). */
#include "luahub/policy.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#include "lua_api.h"
#include "luahub/log.h"
#include "luahub/watchdog.h"

#define POLICY_MAX_FILE (16 * 1024 * 1024)
#define LOG_PER_SECOND 10
#define ROUTES_MAX HUB_API_MAX_CHANNELS  /* messages one on_publish may produce */

static const char *const hook_names[HUB_HOOK__COUNT] = {
    "on_connect", "on_subscribe", "on_unsubscribe", "on_publish", "on_rpc",
    "on_disconnect",
};

struct hub_emit {
    const char *ch, *data;
    size_t ch_len, data_len;
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

static void add_err(struct hub_config_errors *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void add_err(struct hub_config_errors *e, const char *fmt, ...)
{
    struct hub_buf b = {0};
    va_list ap;
    char tmp[1024];

    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    hub_buf_appends(&b, tmp);
    e->v = hub_xrealloc(e->v, (e->n + 1) * sizeof(*e->v));
    e->v[e->n++] = b.p;
}

/* ---- calls ----------------------------------------------------------------- */

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
static void describe_failure(struct hub_policy *p, int status, const char *where,
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
static int call(struct hub_policy *p, int phase, int nargs, int nres)
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
        lua_pushnil(L); /* an error object for describe_failure to pop */
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
static void fail(struct hub_policy *p, int phase, uint64_t conn_id, int status)
{
    struct hub_hook_stats *s = &p->st.hook[phase];
    struct hub_buf b = {0};
    const char *where = phase < HUB_HOOK__COUNT ? p->hook_where[phase] : p->source_name;

    s->errors++;
    if (p->lim.killed)
        s->kills_instructions++;
    else if (status == LUA_ERRMEM || p->mem_failed)
        s->kills_memory++;
    describe_failure(p, status, where, &b);
    log_failure(p, phase, conn_id, b.p ? b.p : "failed");
    hub_buf_free(&b);
}

/* A hook returned something it may not: logged and counted like an error. */
static void bad_return(struct hub_policy *p, int phase, uint64_t conn_id,
                       const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void bad_return(struct hub_policy *p, int phase, uint64_t conn_id,
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
    int st = call(p, phase, nargs, nres);
    hub_hist_observe(&p->st.hook[phase].dur, hub_now_ns() - t0);
    p->cur_conn = saved_c;
    p->cur_conn_id = saved_id;
    if (st == LUA_OK)
        return 0;
    fail(p, phase, conn_id, st);
    return -1;
}

/* Describes a Lua value for messages: "a number (5)", "nil", "a table". */
static void describe_value(lua_State *L, int idx, char *out, size_t n)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
    case LUA_TNONE:
        snprintf(out, n, "nil (or nothing)");
        break;
    case LUA_TBOOLEAN:
        snprintf(out, n, "%s", lua_toboolean(L, idx) ? "true" : "false");
        break;
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx))
            snprintf(out, n, "a number (%lld)", (long long)lua_tointeger(L, idx));
        else
            snprintf(out, n, "a number (%g)", (double)lua_tonumber(L, idx));
        break;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        snprintf(out, n, "a string ('%.*s%s')", (int)(len > 40 ? 40 : len), s,
                 len > 40 ? "..." : "");
        break;
    }
    default:
        snprintf(out, n, "a %s", luaL_typename(L, idx));
        break;
    }
}

static void set_reason(char *reason, size_t reason_len, lua_State *L, int idx)
{
    if (!reason_len)
        return;
    reason[0] = '\0';
    if (lua_type(L, idx) == LUA_TSTRING)
        snprintf(reason, reason_len, "%s", lua_tostring(L, idx));
}

static void set_fail_reason(char *reason, size_t reason_len, int hook)
{
    if (reason_len)
        snprintf(reason, reason_len, "the policy's %s failed (see the hub log)",
                 hook_names[hook]);
}

/* Pushes the hook's function; -1 if the script has none or a call is
 * already running (hooks do not nest: the API never runs one). */
static int push_hook(struct hub_policy *p, int h)
{
    if (!p || p->hook_ref[h] == LUA_NOREF)
        return -1;
    if (p->phase != HUB_PHASE_IDLE) {
        hub_log(HUB_LOG_ERROR, "policy: internal: %s called while %s runs", hook_names[h],
                hub_policy_phase_name(p->phase));
        return -1;
    }
    lua_rawgeti(p->L, LUA_REGISTRYINDEX, p->hook_ref[h]);
    return 0;
}

static int encode_tramp(lua_State *L)
{
    hub_lua_encode(hub_lua_policy(L), L, 1, lua_tostring(L, 2));
    return 1;
}

/* Encodes the value at `idx` as JSON under the budgets of the call that
 * produced it; the string stays on the stack. Returns 0, or -1 after
 * counting and logging the failure. */
static int encode_result(struct hub_policy *p, int phase, uint64_t conn_id, int idx,
                         const char *what, const char **s, size_t *n)
{
    lua_State *L = p->L;

    idx = lua_absindex(L, idx);
    if (!lua_checkstack(L, 4)) {
        bad_return(p, phase, conn_id, "%s: too many values", what);
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
        fail(p, phase, conn_id, st);
        return -1;
    }
    *s = lua_tolstring(L, -1, n);
    return 0;
}

/* ---- hooks ------------------------------------------------------------------- */

int hub_policy_has(const struct hub_policy *p, enum hub_hook h)
{
    return p && h < HUB_HOOK__COUNT && p->hook_ref[h] != LUA_NOREF;
}

/* req.headers["X-Token"]: names are stored lower-case; a lookup in any
 * case finds them. */
static int headers_index(lua_State *L)
{
    char name[HUB_REQUEST_HEAD_MAX];
    size_t n;
    const char *k = lua_tolstring(L, 2, &n);

    if (!k || n == 0 || n >= sizeof(name))
        return 0;
    for (size_t i = 0; i < n; i++)
        name[i] = (k[i] >= 'A' && k[i] <= 'Z') ? (char)(k[i] + 32) : k[i];
    lua_pushlstring(L, name, n);
    lua_rawget(L, 1);
    return 1;
}

static int push_query_arg(void *ud, const char *name, size_t nl, const char *value, size_t vl)
{
    lua_State *L = ud;
    lua_pushlstring(L, name, nl);
    lua_pushlstring(L, value, vl);
    lua_rawset(L, -3); /* a repeated name: the last one wins */
    return 0;
}

static int push_protocol(void *ud, const char *v, size_t len)
{
    lua_State *L = ud;
    lua_pushlstring(L, v, len);
    lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
    return 0;
}

struct find_protocol {
    const char *name;
    int found;
};

static int find_protocol(void *ud, const char *v, size_t len)
{
    struct find_protocol *f = ud;
    f->found = strlen(f->name) == len && !memcmp(f->name, v, len);
    return f->found;
}

/* Pushes the req table of on_connect. */
static void push_req(struct hub_policy *p, const struct hub_request *r)
{
    lua_State *L = p->L;

    lua_createtable(L, 0, 7);
    lua_newtable(L);
    hub_request_list_each(r, "sec-websocket-protocol", push_protocol, L);
    lua_setfield(L, -2, "protocols");
    lua_pushlstring(L, r->path, r->path_len);
    lua_setfield(L, -2, "path");
    lua_pushlstring(L, r->method, r->method_len);
    lua_setfield(L, -2, "method");

    lua_newtable(L);
    hub_request_query_each(r, push_query_arg, L);
    lua_setfield(L, -2, "query");

    /* Every header by lower-case name; repeated ones joined with ", "
     * (RFC 9110 §5.3). */
    lua_createtable(L, 0, (int)r->nheaders);
    for (size_t i = 0; i < r->nheaders; i++) {
        const struct hub_header *h = &r->headers[i];
        lua_pushlstring(L, h->name, h->name_len);
        if (lua_rawget(L, -2) == LUA_TSTRING) {
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, h->value, h->value_len);
            lua_concat(L, 3);
        } else {
            lua_pop(L, 1);
            lua_pushlstring(L, h->value, h->value_len);
        }
        lua_pushlstring(L, h->name, h->name_len);
        lua_insert(L, -2);
        lua_rawset(L, -3);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_headers_mt);
    lua_setmetatable(L, -2);
    lua_setfield(L, -2, "headers");

    lua_pushstring(L, r->peer ? r->peer : "");
    lua_setfield(L, -2, "remote_addr");
    size_t ol;
    const char *origin = hub_request_header(r, "origin", &ol);
    if (origin) {
        lua_pushlstring(L, origin, ol);
        lua_setfield(L, -2, "origin");
    }
}

enum hub_verdict hub_policy_on_connect(struct hub_policy *p, const struct hub_request *req,
                                       uint64_t conn_id,
                                       struct hub_connect_result *res)
{
    char what[160];
    enum hub_verdict v = HUB_FAIL;

    res->status = 0;
    res->reason[0] = '\0';
    if (push_hook(p, HUB_HOOK_CONNECT) < 0)
        return p && p->phase == HUB_PHASE_IDLE ? HUB_ALLOW : HUB_FAIL;
    lua_State *L = p->L;
    hub_lua_push_pending_conn(p, conn_id, req->peer ? req->peer : "");
    lua_insert(L, -2);                  /* conn object below the function */
    int obj = lua_gettop(L) - 1;
    lua_pushvalue(L, obj);
    push_req(p, req);
    int rc = hub_policy_pcall(p, HUB_HOOK_CONNECT, NULL, conn_id, 2, 3);
    if (rc < 0)
        goto out;

    int r = obj + 1;
    if (lua_type(L, r) == LUA_TBOOLEAN && lua_toboolean(L, r)) {
        v = HUB_ALLOW;
    } else if (lua_type(L, r) == LUA_TBOOLEAN) {
        if (!lua_isnil(L, r + 1) && lua_type(L, r + 1) != LUA_TSTRING) {
            describe_value(L, r + 1, what, sizeof(what));
            bad_return(p, HUB_HOOK_CONNECT, conn_id,
                       "on_connect returned false with %s as the reason: expected a string",
                       what);
            goto out;
        }
        if (!lua_isnil(L, r + 2)) {
            lua_Integer st = lua_isinteger(L, r + 2) ? lua_tointeger(L, r + 2) : 0;
            if (st < 400 || st > 599) {
                describe_value(L, r + 2, what, sizeof(what));
                bad_return(p, HUB_HOOK_CONNECT, conn_id,
                           "on_connect returned %s as the HTTP status: expected an "
                           "integer from 400 to 599", what);
                goto out;
            }
            res->status = (unsigned)st;
        }
        set_reason(res->reason, sizeof(res->reason), L, r + 1);
        v = HUB_DENY;
    } else {
        describe_value(L, r, what, sizeof(what));
        bad_return(p, HUB_HOOK_CONNECT, conn_id,
                   "on_connect returned %s: expected true, or false, \"reason\"[, status]",
                   what);
    }
out:
    hub_lua_pending_done(p, obj, v == HUB_ALLOW, res);
    lua_settop(L, HUB_LUA_BASE);
    if (v == HUB_ALLOW && res->protocol) {
        struct find_protocol f = {res->protocol, 0};
        hub_request_list_each(req, "sec-websocket-protocol", find_protocol, &f);
        if (!f.found) {
            bad_return(p, HUB_HOOK_CONNECT, conn_id,
                       "on_connect set conn.protocol to '%.64s', which the client did not "
                       "offer (it must be one of req.protocols)", res->protocol);
            free(res->user);
            free(res->info_json);
            free(res->protocol);
            res->user = res->info_json = res->protocol = NULL;
            v = HUB_FAIL;
        }
    }
    return v;
}

enum hub_verdict hub_policy_on_subscribe(struct hub_policy *p, struct hub_policy_conn *c,
                                         const char *channel, size_t len,
                                         char *out, size_t *out_len,
                                         char *reason, size_t reason_len)
{
    char what[160];
    enum hub_verdict v = HUB_FAIL;

    if (reason_len)
        reason[0] = '\0';
    if (push_hook(p, HUB_HOOK_SUBSCRIBE) < 0) {
        if (p && p->phase != HUB_PHASE_IDLE) {
            set_fail_reason(reason, reason_len, HUB_HOOK_SUBSCRIBE);
            return HUB_FAIL;
        }
        memcpy(out, channel, len);
        out[len] = '\0';
        *out_len = len;
        return HUB_ALLOW;
    }
    lua_State *L = p->L;
    hub_lua_push_conn(p, c);
    lua_pushlstring(L, channel, len);
    if (hub_policy_pcall(p, HUB_HOOK_SUBSCRIBE, c, c->id, 2, 2) < 0)
        goto out;

    int r = HUB_LUA_BASE + 1;
    int t = lua_type(L, r);
    if (t == LUA_TBOOLEAN && lua_toboolean(L, r)) {
        memcpy(out, channel, len);
        out[len] = '\0';
        *out_len = len;
        v = HUB_ALLOW;
    } else if (t == LUA_TBOOLEAN) {
        set_reason(reason, reason_len, L, r + 1);
        v = HUB_DENY;
    } else if (t == LUA_TSTRING) {
        size_t n;
        const char *s = lua_tolstring(L, r, &n);
        if (!hub_proto_channel_valid(s, n)) {
            describe_value(L, r, what, sizeof(what));
            bad_return(p, HUB_HOOK_SUBSCRIBE, c->id,
                       "on_subscribe rewrote '%.*s' to %s, which is not a valid channel "
                       "name (1 to 255 bytes of A-Z a-z 0-9 and _ : . @ / = # -)",
                       (int)len, channel, what);
            goto out;
        }
        memcpy(out, s, n);
        out[n] = '\0';
        *out_len = n;
        v = HUB_ALLOW;
    } else {
        describe_value(L, r, what, sizeof(what));
        bad_return(p, HUB_HOOK_SUBSCRIBE, c->id,
                   "on_subscribe returned %s: expected true, false[, \"reason\"] or a "
                   "channel name", what);
    }
out:
    if (v == HUB_FAIL)
        set_fail_reason(reason, reason_len, HUB_HOOK_SUBSCRIBE);
    lua_settop(L, HUB_LUA_BASE);
    return v;
}

static int add_emit(struct hub_policy *p, size_t n, const char *ch, size_t chl,
                    const char *d, size_t dl)
{
    if (n >= p->emits_cap) {
        p->emits_cap = p->emits_cap ? p->emits_cap * 2 : 16;
        p->emits = hub_xrealloc(p->emits, p->emits_cap * sizeof(*p->emits));
    }
    p->emits[n] = (struct hub_emit){ch, d, chl, dl};
    return 0;
}

/* One message table {channel = ..., data = ...} at `t`: fills `e`.
 * `channel`/`data` of the publish are the defaults. Returns 0 or -1
 * (failure logged). */
static int route(struct hub_policy *p, struct hub_policy_conn *c, int t, const char *channel,
                 size_t channel_len, const char *data, size_t data_len,
                 struct hub_emit *e)
{
    lua_State *L = p->L;
    char what[160];
    int has_data = 0;

    e->ch = channel;
    e->ch_len = channel_len;
    e->data = data;
    e->data_len = data_len;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        if (k && !strcmp(k, "channel")) {
            size_t n = 0;
            const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
            if (!s || !hub_proto_channel_valid(s, n)) {
                describe_value(L, -1, what, sizeof(what));
                lua_pop(L, 2);
                bad_return(p, HUB_HOOK_PUBLISH, c->id,
                           "on_publish routed '%.*s' to channel %s, which is not a valid "
                           "channel name (1 to 255 bytes of A-Z a-z 0-9 and "
                           "_ : . @ / = # -)", (int)channel_len, channel, what);
                return -1;
            }
            e->ch = lua_tolstring(L, -1, &e->ch_len); /* anchored by the table */
        } else if (k && !strcmp(k, "data")) {
            has_data = 1;
        } else {
            describe_value(L, -2, what, sizeof(what));
            lua_pop(L, 2);
            bad_return(p, HUB_HOOK_PUBLISH, c->id,
                       "on_publish returned a table with the key %s: a message table "
                       "has only channel and data", what);
            return -1;
        }
        lua_pop(L, 1);
    }
    if (!has_data)
        return 0;
    lua_pushliteral(L, "data");
    lua_rawget(L, t);
    if (hub_lua_is_msg(p, -1)) {
        lua_pop(L, 1);
        if (!hub_lua_msg_push_decoded(p))
            return 0; /* the original bytes */
    }
    if (encode_result(p, HUB_HOOK_PUBLISH, c->id, -1, "on_publish: data", &e->data,
                      &e->data_len) < 0)
        return -1;
    lua_remove(L, -2); /* the value; its JSON stays on the stack */
    return 0;
}

/* Is the table at `t` a single message (has channel or data)? */
static int is_message_table(lua_State *L, int t)
{
    lua_pushliteral(L, "channel");
    lua_rawget(L, t);
    lua_pushliteral(L, "data");
    lua_rawget(L, t);
    int yes = !lua_isnil(L, -1) || !lua_isnil(L, -2);
    lua_pop(L, 2);
    return yes;
}

enum hub_verdict hub_policy_on_publish(struct hub_policy *p, struct hub_policy_conn *c,
                                       const char *channel, size_t channel_len,
                                       const char *data, size_t data_len,
                                       hub_emit_fn emit, void *ud,
                                       char *reason, size_t reason_len)
{
    char what[160];
    enum hub_verdict v = HUB_FAIL;
    size_t n = 0;

    if (reason_len)
        reason[0] = '\0';
    if (push_hook(p, HUB_HOOK_PUBLISH) < 0) {
        if (p && p->phase != HUB_PHASE_IDLE) {
            set_fail_reason(reason, reason_len, HUB_HOOK_PUBLISH);
            return HUB_FAIL;
        }
        emit(ud, channel, channel_len, data, data_len);
        return HUB_ALLOW;
    }
    lua_State *L = p->L;
    hub_lua_push_conn(p, c);
    lua_pushlstring(L, channel, channel_len);
    lua_pushvalue(L, HUB_LUA_MSG);
    hub_lua_msg_begin(p, data, data_len);
    if (hub_policy_pcall(p, HUB_HOOK_PUBLISH, c, c->id, 3, 2) < 0)
        goto out;

    int r = HUB_LUA_BASE + 1;
    int t = lua_type(L, r);
    if (t == LUA_TBOOLEAN) {
        if (lua_toboolean(L, r)) {
            /* the fast path: the bytes as they came, no decode, no encode */
            hub_lua_msg_end(p);
            lua_settop(L, HUB_LUA_BASE);
            emit(ud, channel, channel_len, data, data_len);
            return HUB_ALLOW;
        }
        set_reason(reason, reason_len, L, r + 1);
        v = HUB_DENY;
        goto out;
    }
    if (hub_lua_is_msg(p, r)) {
        struct hub_emit e = {channel, data, channel_len, data_len};
        if (hub_lua_msg_push_decoded(p) &&
            encode_result(p, HUB_HOOK_PUBLISH, c->id, -1, "on_publish: msg.data", &e.data,
                          &e.data_len) < 0)
            goto out;
        add_emit(p, n++, e.ch, e.ch_len, e.data, e.data_len);
        v = HUB_ALLOW;
        goto out;
    }
    if (t != LUA_TTABLE) {
        describe_value(L, r, what, sizeof(what));
        bad_return(p, HUB_HOOK_PUBLISH, c->id,
                   "on_publish returned %s: expected true, false[, \"reason\"], msg, a "
                   "table {channel = ..., data = ...} or a list of such tables", what);
        goto out;
    }
    if (is_message_table(L, r)) {
        struct hub_emit e;
        if (route(p, c, r, channel, channel_len, data, data_len, &e) < 0)
            goto out;
        add_emit(p, n++, e.ch, e.ch_len, e.data, e.data_len);
        v = HUB_ALLOW;
        goto out;
    }
    /* a list of message tables (empty: publish nothing) */
    lua_Integer len = (lua_Integer)lua_rawlen(L, r), keys = 0;
    if (len > ROUTES_MAX) {
        bad_return(p, HUB_HOOK_PUBLISH, c->id,
                   "on_publish returned %lld messages: at most %d", (long long)len,
                   ROUTES_MAX);
        goto out;
    }
    lua_pushnil(L);
    while (lua_next(L, r)) {
        keys++;
        int bad = !lua_isinteger(L, -2) || lua_tointeger(L, -2) < 1 ||
                  lua_tointeger(L, -2) > len || !lua_istable(L, -1);
        if (bad) {
            describe_value(L, lua_istable(L, -1) ? -2 : -1, what, sizeof(what));
            lua_pop(L, 2);
            bad_return(p, HUB_HOOK_PUBLISH, c->id,
                       "on_publish returned a table that is neither a message "
                       "{channel = ..., data = ...} nor a list of them (found %s)", what);
            goto out;
        }
        lua_pop(L, 1);
    }
    if (keys != len) {
        bad_return(p, HUB_HOOK_PUBLISH, c->id,
                   "on_publish returned a list with holes: expected a list of message "
                   "tables");
        goto out;
    }
    for (lua_Integer i = 1; i <= len; i++) {
        struct hub_emit e;
        if (!lua_checkstack(L, 8)) {
            bad_return(p, HUB_HOOK_PUBLISH, c->id, "on_publish returned too many messages");
            goto out;
        }
        lua_rawgeti(L, r, i); /* anchored by the list */
        int mt = lua_gettop(L);
        if (route(p, c, mt, channel, channel_len, data, data_len, &e) < 0)
            goto out;
        /* leave the message table (and its JSON, if any) on the stack */
        add_emit(p, n++, e.ch, e.ch_len, e.data, e.data_len);
    }
    v = HUB_ALLOW;
out:
    if (v == HUB_ALLOW) {
        /* every string is anchored on the stack until settop below */
        for (size_t i = 0; i < n; i++)
            emit(ud, p->emits[i].ch, p->emits[i].ch_len, p->emits[i].data,
                 p->emits[i].data_len);
    } else if (v == HUB_FAIL) {
        set_fail_reason(reason, reason_len, HUB_HOOK_PUBLISH);
    }
    hub_lua_msg_end(p);
    lua_settop(L, HUB_LUA_BASE);
    return v;
}

static int decode_tramp(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_decode);
    lua_pushvalue(L, 1);
    lua_call(L, 1, 2);
    if (lua_isnil(L, -2) && lua_type(L, -1) == LUA_TSTRING)
        return luaL_error(L, "rpc data: cannot decode JSON: %s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return 1;
}

enum hub_verdict hub_policy_on_rpc(struct hub_policy *p, struct hub_policy_conn *c,
                                   const char *method, size_t method_len,
                                   const char *data, size_t data_len,
                                   struct hub_buf *result,
                                   char *reason, size_t reason_len)
{
    char what[160];
    enum hub_verdict v = HUB_FAIL;

    if (reason_len)
        reason[0] = '\0';
    if (push_hook(p, HUB_HOOK_RPC) < 0) {
        if (reason_len)
            snprintf(reason, reason_len, "the policy has no on_rpc hook");
        return p && p->phase == HUB_PHASE_IDLE ? HUB_DENY : HUB_FAIL;
    }
    lua_State *L = p->L;
    hub_lua_push_conn(p, c);
    lua_pushlstring(L, method, method_len);
    if (data && data_len) {
        lua_pushcfunction(L, decode_tramp);
        lua_pushlstring(L, data, data_len);
        hub_sandbox_arm(p);
        p->lim.cap_on = 1;
        int st = lua_pcall(L, 1, 1, HUB_LUA_MSGH);
        p->lim.cap_on = 0;
        if (st != LUA_OK) {
            fail(p, HUB_HOOK_RPC, c->id, st);
            goto out;
        }
    } else {
        lua_pushnil(L);
    }
    if (hub_policy_pcall(p, HUB_HOOK_RPC, c, c->id, 3, 2) < 0)
        goto out;

    int r = HUB_LUA_BASE + 1;
    if (lua_isnil(L, r) && !lua_isnil(L, r + 1)) {
        if (lua_type(L, r + 1) != LUA_TSTRING) {
            describe_value(L, r + 1, what, sizeof(what));
            bad_return(p, HUB_HOOK_RPC, c->id,
                       "on_rpc returned nil and %s: expected a result, or nil, \"reason\"",
                       what);
            goto out;
        }
        set_reason(reason, reason_len, L, r + 1);
        v = HUB_DENY;
        goto out;
    }
    const char *s;
    size_t n;
    if (encode_result(p, HUB_HOOK_RPC, c->id, r, "on_rpc: the result", &s, &n) < 0)
        goto out;
    hub_buf_append(result, s, n);
    v = HUB_ALLOW;
out:
    if (v == HUB_FAIL)
        set_fail_reason(reason, reason_len, HUB_HOOK_RPC);
    lua_settop(L, HUB_LUA_BASE);
    return v;
}

void hub_policy_on_unsubscribe(struct hub_policy *p, struct hub_policy_conn *c,
                               const char *channel, size_t len)
{
    if (push_hook(p, HUB_HOOK_UNSUBSCRIBE) < 0)
        return;
    hub_lua_push_conn(p, c);
    lua_pushlstring(p->L, channel, len);
    hub_policy_pcall(p, HUB_HOOK_UNSUBSCRIBE, c, c->id, 2, 0);
    lua_settop(p->L, HUB_LUA_BASE);
}

void hub_policy_on_disconnect(struct hub_policy *p, struct hub_policy_conn *c,
                              unsigned code, const char *reason)
{
    if (push_hook(p, HUB_HOOK_DISCONNECT) < 0)
        return;
    hub_lua_push_conn(p, c);
    lua_pushinteger(p->L, (lua_Integer)code);
    lua_pushstring(p->L, reason ? reason : "");
    hub_policy_pcall(p, HUB_HOOK_DISCONNECT, c, c->id, 3, 0);
    lua_settop(p->L, HUB_LUA_BASE);
}

void hub_policy_conn_gone(struct hub_policy *p, struct hub_policy_conn *c)
{
    if (p)
        hub_lua_conn_gone(p, c);
    else
        c->lua_ref = 0;
}

/* ---- build, check, reload -------------------------------------------------- */

/* Reads the policy file (or takes the built-in one) into `*src`. */
static int read_source(struct hub_policy *p, struct hub_buf *src,
                       struct hub_config_errors *errs)
{
    if (!p->cfg->policy) {
        hub_buf_append(src, hub_lua_default, hub_lua_default_len);
        return 0;
    }
    FILE *f = fopen(p->cfg->policy, "rb");
    if (!f) {
        add_err(errs, "%s: cannot read the policy: %s", p->cfg->policy, strerror(errno));
        return -1;
    }
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) {
        if (src->len + n > POLICY_MAX_FILE) {
            add_err(errs, "%s: the policy is larger than %d MiB", p->cfg->policy,
                    POLICY_MAX_FILE >> 20);
            fclose(f);
            return -1;
        }
        hub_buf_append(src, buf, n);
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        add_err(errs, "%s: cannot read the policy: read error", p->cfg->policy);
        return -1;
    }
    if (!src->p)
        hub_buf_append(src, "", 0);
    return 0;
}

/* Appends a message that may start with Lua's (possibly shortened) chunk
 * name, with the full file name instead. */
static void add_lua_err(struct hub_policy *p, struct hub_config_errors *errs,
                        const char *msg)
{
    size_t n = strlen(p->short_src);
    if (p->short_src[0] && strncmp(msg, p->short_src, n) == 0 && msg[n] == ':')
        add_err(errs, "%s%s", p->source_name, msg + n);
    else
        add_err(errs, "%s", msg);
}

static void destroy(struct hub_policy *p)
{
    if (p->L) {
        hub_lua_timers_close(p);
        lua_close(p->L);
    }
    free(p->chunkname);
    free(p->emits);
    hub_buf_free(&p->tb);
    hub_buf_free(&p->warn);
    free(p);
}

/* Builds a policy: state, sandbox, the script's main chunk under the
 * budgets, hooks verified. `host` is NULL for --check. Returns NULL with
 * every problem in `errs`. Timers the chunk set are not started yet. */
static struct hub_policy *build(const struct hub_policy_host *host,
                                const struct hub_config *cfg,
                                struct hub_config_errors *errs, int warn_unknown)
{
    struct hub_policy *p = hub_xcalloc(1, sizeof(*p));
    struct hub_buf src = {0};
    unsigned first = errs->n;

    if (host)
        p->host = *host;
    p->cfg = cfg;
    p->lim.mem_max = (size_t)cfg->lua_max_memory;
    p->lim.budget = (int64_t)cfg->lua_max_instructions;
    p->phase = HUB_PHASE_IDLE;
    for (int h = 0; h < HUB_HOOK__COUNT; h++)
        p->hook_ref[h] = LUA_NOREF;
    for (int h = 0; h < HUB_PHASE__STATS; h++)
        hub_hist_init(&p->st.hook[h].dur, hub_hist_bounds_call,
                      hub_countof(hub_hist_bounds_call));
    if (cfg->policy) {
        size_t n = strlen(cfg->policy);
        p->chunkname = hub_xmalloc(n + 2);
        p->chunkname[0] = '@';
        memcpy(p->chunkname + 1, cfg->policy, n + 1);
    } else {
        p->chunkname = hub_xstrdup("=default.lua");
    }
    p->source_name = p->chunkname + 1;

    if (hub_sandbox_open(p) < 0) {
        add_err(errs, "%s: cannot create a Lua state (out of memory)", p->source_name);
        goto fail;
    }
    lua_State *L = p->L;
    /* req.headers: lookups in any case */
    lua_newtable(L);
    lua_pushcfunction(L, headers_index);
    lua_setfield(L, -2, "__index");
    p->ref_headers_mt = luaL_ref(L, LUA_REGISTRYINDEX);

    if (read_source(p, &src, errs) < 0)
        goto fail;
    /* like luaL_loadfilex: skip a UTF-8 BOM and a first line "#..." */
    char *text = src.p;
    size_t len = src.len;
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) {
        text += 3;
        len -= 3;
    }
    if (len && text[0] == '#')
        for (size_t i = 0; i < len && text[i] != '\n'; i++)
            text[i] = ' ';

    p->lim.cap_on = 1;
    int st = luaL_loadbufferx(L, text, len, p->chunkname, "t");
    p->lim.cap_on = 0;
    if (st != LUA_OK) {
        if (st == LUA_ERRMEM)
            add_err(errs, "%s: not enough memory to compile the policy (lua_max_memory "
                          "is %llu bytes)", p->source_name,
                    (unsigned long long)p->lim.mem_max);
        else
            add_err(errs, "%s", lua_tostring(L, -1));
        goto fail;
    }
    lua_Debug ar;
    lua_pushvalue(L, -1);
    if (lua_getinfo(L, ">S", &ar))
        snprintf(p->short_src, sizeof(p->short_src), "%s", ar.short_src);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_env);
    lua_setupvalue(L, -2, 1); /* the main chunk's _ENV */

    st = call(p, HUB_PHASE_LOAD, 0, 0);
    if (st != LUA_OK) {
        struct hub_buf b = {0};
        describe_failure(p, st, p->source_name, &b);
        add_lua_err(p, errs, b.p);
        hub_buf_free(&b);
        goto fail;
    }

    /* hooks: functions, fetched once */
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_env);
    int env = lua_gettop(L);
    for (int h = 0; h < HUB_HOOK__COUNT; h++) {
        lua_pushstring(L, hook_names[h]);
        int t = lua_rawget(L, env);
        if (t == LUA_TNIL) {
            lua_pop(L, 1);
            continue;
        }
        if (t != LUA_TFUNCTION) {
            char line[32] = "";
            if (p->hook_line[h] > 0)
                snprintf(line, sizeof(line), ":%d", p->hook_line[h]);
            add_err(errs, "%s%s: %s must be a function (got a %s)", p->source_name, line,
                    hook_names[h], lua_typename(L, t));
            lua_pop(L, 1);
            continue;
        }
        lua_pushvalue(L, -1);
        if (lua_getinfo(L, ">S", &ar) && ar.linedefined > 0)
            snprintf(p->hook_where[h], sizeof(p->hook_where[h]), "%s:%d", ar.short_src,
                     ar.linedefined);
        else
            snprintf(p->hook_where[h], sizeof(p->hook_where[h]), "%s", p->short_src);
        p->hook_ref[h] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (errs->n > first)
        goto fail;

    /* from now on global assignments are plain; reads of unknown names
     * still raise */
    hub_sandbox_loaded(p);

    if (warn_unknown) {
        lua_pushnil(L);
        while (lua_next(L, env)) {
            if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TFUNCTION &&
                !strncmp(lua_tostring(L, -2), "on_", 3)) {
                int known = 0;
                for (int h = 0; h < HUB_HOOK__COUNT; h++)
                    known |= !strcmp(lua_tostring(L, -2), hook_names[h]);
                if (!known)
                    hub_log(HUB_LOG_WARN,
                            "%s: function '%s' is not a hook and will never be called "
                            "(hooks: on_connect, on_subscribe, on_unsubscribe, "
                            "on_publish, on_rpc, on_disconnect)",
                            p->source_name, lua_tostring(L, -2));
            }
            lua_pop(L, 1);
        }
    }
    lua_settop(L, HUB_LUA_BASE);
    lua_gc(L, LUA_GCCOLLECT);
    hub_buf_free(&src);
    return p;

fail:
    hub_buf_free(&src);
    destroy(p);
    return NULL;
}

int hub_policy_check(const struct hub_config *cfg, struct hub_config_errors *errs)
{
    struct hub_policy *p = build(NULL, cfg, errs, 0);
    if (!p)
        return -1;
    destroy(p);
    return 0;
}

struct hub_policy *hub_policy_new(const struct hub_policy_host *host,
                                  struct hub_config_errors *errs)
{
    struct hub_policy *p = build(host, host->cfg, errs, 1);
    if (!p)
        return NULL;
    hub_lua_timers_start(p);
    static const char *const names[HUB_HOOK__COUNT] = {
        "on_connect", "on_subscribe", "on_unsubscribe", "on_publish", "on_rpc",
        "on_disconnect",
    };
    char hooks[128] = "";
    size_t n = 0;
    for (int h = 0; h < HUB_HOOK__COUNT; h++)
        if (hub_policy_has(p, (enum hub_hook)h))
            n += (size_t)snprintf(hooks + n, sizeof(hooks) - n, "%s%s", n ? ", " : "",
                                  names[h]);
    hub_log(HUB_LOG_INFO, "policy %s loaded, hooks: %s", p->source_name,
            n ? hooks : "none (everything is allowed)");
    return p;
}

void hub_policy_free(struct hub_policy *p)
{
    if (!p)
        return;
    int had_timers = p->ntimers > 0;
    uv_loop_t *loop = p->host.loop;
    destroy(p);
    /* Called after the loop has drained: let the timers' close callbacks
     * run so that uv_loop_close() finds no handle. */
    if (had_timers && loop)
        uv_run(loop, UV_RUN_NOWAIT);
}

static void forget_lua_object(void *arg, struct hub_policy_conn *c)
{
    (void)arg;
    c->lua_ref = 0;
}

int hub_policy_reload(struct hub_policy **policy, struct hub_config_errors *errs)
{
    struct hub_config_errors local = {0};
    struct hub_config_errors *e = errs ? errs : &local;
    struct hub_policy *old = *policy;
    unsigned first = e->n;

    struct hub_policy *np = build(&old->host, old->cfg, e, 1);
    if (!np) {
        if (old)
            old->st.reloads_failed++;
        for (unsigned i = first; i < e->n; i++)
            hub_log(HUB_LOG_ERROR, "policy reload failed, keeping the current policy: %s",
                    e->v[i]);
        if (!errs)
            hub_config_errors_free(&local);
        return -1;
    }
    if (old) {
        np->st = old->st;
        /* the old state's conn objects die with it */
        old->host.ops->each_conn(old->host.ud, forget_lua_object, NULL);
        destroy(old);
    }
    np->st.reloads_ok++;
    *policy = np;
    hub_lua_timers_start(np);
    hub_log(HUB_LOG_INFO, "policy reloaded from %s", np->source_name);
    return 0;
}

/* ---- metrics ----------------------------------------------------------------- */

/* One sample of a per-hook family: `name`{hook="...",`more`}. */
static void hook_value(struct hub_buf *b, const char *name, int phase, const char *more,
                       uint64_t v)
{
    char labels[96];
    snprintf(labels, sizeof(labels), "hook=\"%s\"%s", hub_policy_phase_name(phase), more);
    hub_metric_value(b, name, labels, v);
}

void hub_policy_metrics(const struct hub_policy *p, struct hub_buf *b)
{
    static const struct {
        const char *name, *help;
        size_t off;
    } counters[] = {
        {"luahub_policy_calls_total", "Policy hook and timer calls.",
         offsetof(struct hub_hook_stats, dur.total)},
        {"luahub_policy_errors_total",
         "Failed calls: errors, unexpected return values and budget stops.",
         offsetof(struct hub_hook_stats, errors)},
    };
    if (!p)
        return;
    for (size_t i = 0; i < hub_countof(counters); i++) {
        hub_metric_family(b, counters[i].name, "counter", counters[i].help);
        for (int h = 0; h < HUB_PHASE__STATS; h++)
            hook_value(b, counters[i].name, h, "",
                       *(const uint64_t *)((const char *)&p->st.hook[h] + counters[i].off));
    }
    hub_metric_family(b, "luahub_policy_budget_kills_total", "counter",
                      "Calls stopped by a budget (lua_max_instructions, lua_max_memory).");
    for (int h = 0; h < HUB_PHASE__STATS; h++) {
        hook_value(b, "luahub_policy_budget_kills_total", h, ",budget=\"instructions\"",
                   p->st.hook[h].kills_instructions);
        hook_value(b, "luahub_policy_budget_kills_total", h, ",budget=\"memory\"",
                   p->st.hook[h].kills_memory);
    }
    hub_metric_family(b, "luahub_policy_duration_seconds", "histogram",
                      "Time spent in policy calls.");
    for (int h = 0; h < HUB_PHASE__STATS; h++) {
        char labels[64];
        snprintf(labels, sizeof(labels), "hook=\"%s\"", hub_policy_phase_name(h));
        hub_metric_hist(b, "luahub_policy_duration_seconds", labels, &p->st.hook[h].dur);
    }
    hub_metric_one(b, "luahub_policy_memory_bytes", "gauge",
                   "Memory of the policy's Lua state.", p->lim.mem_used);
    hub_metric_one(b, "luahub_policy_timers", "gauge", "Pending hub.after timers.",
                   p->ntimers);
    hub_metric_family(b, "luahub_policy_reloads_total", "counter",
                      "Policy reloads, by result.");
    hub_metric_value(b, "luahub_policy_reloads_total", "result=\"ok\"", p->st.reloads_ok);
    hub_metric_value(b, "luahub_policy_reloads_total", "result=\"failed\"",
                     p->st.reloads_failed);
}
