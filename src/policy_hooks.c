/* The hooks' entry points (policy.h): each pushes the conn object and the
 * hook's arguments, runs the hook as a call of policy_call.c (a coroutine
 * that may wait) and turns what it returned into a verdict in its `finish`
 * function, at once or when the call ends after its waits; anything
 * unexpected is logged and counted like an error, and the verdict is
 * HUB_FAIL (deny). A hook the script does not define costs nothing: the
 * action is allowed (on_rpc: refused, there is nothing to answer with).
 * Hooks do not nest: one runs at a time, though many may wait. */
#include "lua_api.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "luahub/log.h"
#include "luahub/proto.h"
#include "luahub/request.h"

#define ROUTES_MAX HUB_API_MAX_CHANNELS  /* messages one on_publish may produce */

struct hub_emit {
    const char *ch, *data;
    size_t ch_len, data_len;
};

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

/* The refusal's text (the hook's second result) into reason[0..reason_len):
 * it goes to the client in a text frame, so it stays UTF-8: cut at a
 * character boundary, and bytes that are not UTF-8 become '?'. */
static void set_reason(char *reason, size_t reason_len, lua_State *L, int idx)
{
    if (!reason_len)
        return;
    reason[0] = '\0';
    if (lua_type(L, idx) != LUA_TSTRING)
        return;
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    size_t all = strnlen(s, len);       /* a NUL ends it, as printing would */
    size_t n = all < reason_len - 1 ? all : reason_len - 1;
    /* cut inside a character: leave the whole character out */
    for (int k = 0; k < 3 && n < all && n && ((unsigned char)s[n] & 0xC0) == 0x80; k++)
        n--;
    memcpy(reason, s, n);
    reason[n] = '\0';
    if (!hub_proto_utf8_valid(reason, n))
        for (size_t i = 0; i < n; i++)
            if ((unsigned char)reason[i] >= 0x80)
                reason[i] = '?';
}

static void set_fail_reason(char *reason, size_t reason_len, int hook)
{
    if (reason_len)
        snprintf(reason, reason_len, "the policy's %s failed (see the hub log)",
                 hub_policy_phase_name(hook));
}

/* Pushes the hook's function; -1 if the script has none or a call is
 * already running (hooks do not nest: the API never runs one). */
static int push_hook(struct hub_policy *p, int h)
{
    if (!p || p->hook_ref[h] == LUA_NOREF)
        return -1;
    if (p->phase != HUB_PHASE_IDLE) {
        hub_log(HUB_LOG_ERROR, "policy: internal: %s called while %s runs",
                hub_policy_phase_name(h), hub_policy_phase_name(p->phase));
        return -1;
    }
    lua_rawgeti(p->L, LUA_REGISTRYINDEX, p->hook_ref[h]);
    return 0;
}

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

void hub_policy_req_open(struct hub_policy *p)
{
    lua_State *L = p->L;
    lua_newtable(L);
    lua_pushcfunction(L, headers_index);
    lua_setfield(L, -2, "__index");
    p->ref_headers_mt = luaL_ref(L, LUA_REGISTRYINDEX);
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

/* The protocol the hook chose must be one the client offered. */
static int offered(const struct hub_request *req, const char *protocol)
{
    struct find_protocol f = {protocol, 0};
    hub_request_list_each(req, "sec-websocket-protocol", find_protocol, &f);
    return f.found;
}

/* The conn object at base + 1, the results after it. */
static enum hub_verdict finish_connect(struct hub_policy *p, struct hub_pcall *call, int base,
                                       int ok)
{
    lua_State *L = p->L;
    struct hub_connect_result *res = call->res;
    uint64_t conn_id = call->conn_id;
    char what[160];
    enum hub_verdict v = HUB_FAIL;
    int obj = base + 1, r = base + 2;

    if (!ok)
        goto out;
    if (lua_type(L, r) == LUA_TBOOLEAN && lua_toboolean(L, r)) {
        v = HUB_ALLOW;
    } else if (lua_type(L, r) == LUA_TBOOLEAN) {
        if (!lua_isnil(L, r + 1) && lua_type(L, r + 1) != LUA_TSTRING) {
            describe_value(L, r + 1, what, sizeof(what));
            hub_policy_bad_return(p, HUB_HOOK_CONNECT, conn_id,
                                  "on_connect returned false with %s as the reason: "
                                  "expected a string", what);
            goto out;
        }
        if (!lua_isnil(L, r + 2)) {
            lua_Integer st = lua_isinteger(L, r + 2) ? lua_tointeger(L, r + 2) : 0;
            if (st < 400 || st > 599) {
                describe_value(L, r + 2, what, sizeof(what));
                hub_policy_bad_return(p, HUB_HOOK_CONNECT, conn_id,
                                      "on_connect returned %s as the HTTP status: expected an "
                                      "integer from 400 to 599", what);
                goto out;
            }
            res->status = (unsigned)st;
        }
        set_reason(res->reason, sizeof(res->reason), L, r + 1);
        set_reason(call->reason, sizeof(call->reason), L, r + 1);
        v = HUB_DENY;
    } else {
        describe_value(L, r, what, sizeof(what));
        hub_policy_bad_return(p, HUB_HOOK_CONNECT, conn_id,
                              "on_connect returned %s: expected true, or false, "
                              "\"reason\"[, status]", what);
    }
out:
    /* a cancelled call (no owner) fills nothing: only ok calls have `res` */
    hub_lua_pending_done(p, obj, v == HUB_ALLOW, res);
    if (v == HUB_ALLOW && res->protocol && !offered(call->req, res->protocol)) {
        hub_policy_bad_return(p, HUB_HOOK_CONNECT, conn_id,
                              "on_connect set conn.protocol to '%.64s', which the "
                              "client did not offer (it must be one of req.protocols)",
                              res->protocol);
        free(res->user);
        free(res->info_json);
        free(res->protocol);
        res->user = res->info_json = res->protocol = NULL;
        v = HUB_FAIL;
    }
    return v;
}

enum hub_verdict hub_policy_on_connect(struct hub_policy *p, const struct hub_request *req,
                                       uint64_t conn_id,
                                       struct hub_connect_result *res,
                                       struct hub_policy_wait *w)
{
    res->status = 0;
    res->reason[0] = '\0';
    if (!hub_policy_has(p, HUB_HOOK_CONNECT) || p->phase != HUB_PHASE_IDLE)
        return push_hook(p, HUB_HOOK_CONNECT) < 0 && p && p->phase == HUB_PHASE_IDLE
                   ? HUB_ALLOW : HUB_FAIL;
    lua_State *L = p->L;
    struct hub_pcall *call = hub_pcall_new(p, HUB_HOOK_CONNECT, NULL, conn_id, w);
    call->req = req;
    call->res = res;
    call->finish = finish_connect;
    call->nkeep = 1;
    call->nres = 3;
    hub_lua_push_pending_conn(p, conn_id, req->peer ? req->peer : "");
    push_hook(p, HUB_HOOK_CONNECT);
    lua_pushvalue(L, -2);
    push_req(p, req);
    enum hub_verdict v = hub_pcall_run(call, 2);
    if (v != HUB_WAIT)
        hub_pcall_free(call);
    return v;
}

/* At the first wait: the channel is the caller's until then. */
static void detach_channel(struct hub_policy *p, struct hub_pcall *call)
{
    memcpy(call->ch_copy, call->ch, call->ch_len);
    call->ch_copy[call->ch_len] = '\0';
    call->ch = call->ch_copy;
}

/* Copies the outputs of a call that ended at once to the caller's. */
static void copy_reason(const struct hub_pcall *call, char *reason, size_t reason_len)
{
    if (reason_len)
        snprintf(reason, reason_len, "%s", call->reason);
}

static enum hub_verdict finish_subscribe(struct hub_policy *p, struct hub_pcall *call,
                                         int base, int ok)
{
    lua_State *L = p->L;
    char what[160];
    int r = base + 1;

    if (!ok)
        return HUB_FAIL;
    int t = lua_type(L, r);
    if (t == LUA_TBOOLEAN && lua_toboolean(L, r)) {
        memcpy(call->out, call->ch, call->ch_len);
        call->out[call->ch_len] = '\0';
        call->out_len = call->ch_len;
        return HUB_ALLOW;
    }
    if (t == LUA_TBOOLEAN) {
        set_reason(call->reason, sizeof(call->reason), L, r + 1);
        return HUB_DENY;
    }
    if (t == LUA_TSTRING) {
        size_t n;
        const char *s = lua_tolstring(L, r, &n);
        if (!hub_proto_channel_valid(s, n)) {
            describe_value(L, r, what, sizeof(what));
            hub_policy_bad_return(p, HUB_HOOK_SUBSCRIBE, call->conn_id,
                                  "on_subscribe rewrote '%.*s' to %s, which is not a valid "
                                  "channel name (" HUB_LUA_CHANNEL_CHARS ")",
                                  (int)call->ch_len, call->ch, what);
            return HUB_FAIL;
        }
        memcpy(call->out, s, n);
        call->out[n] = '\0';
        call->out_len = n;
        return HUB_ALLOW;
    }
    describe_value(L, r, what, sizeof(what));
    hub_policy_bad_return(p, HUB_HOOK_SUBSCRIBE, call->conn_id,
                          "on_subscribe returned %s: expected true, false[, \"reason\"] or a "
                          "channel name", what);
    return HUB_FAIL;
}

enum hub_verdict hub_policy_on_subscribe(struct hub_policy *p, struct hub_policy_conn *c,
                                         const char *channel, size_t len,
                                         char *out, size_t *out_len,
                                         char *reason, size_t reason_len,
                                         struct hub_policy_wait *w)
{
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
    struct hub_pcall *call = hub_pcall_new(p, HUB_HOOK_SUBSCRIBE, c, c->id, w);
    call->ch = channel;
    call->ch_len = len;
    call->finish = finish_subscribe;
    call->detach = detach_channel;
    call->nres = 2;
    hub_lua_push_conn(p, p->L, c);
    lua_pushlstring(p->L, channel, len);
    enum hub_verdict v = hub_pcall_run(call, 2);
    if (v == HUB_WAIT)
        return v;
    if (v == HUB_ALLOW) {
        memcpy(out, call->out, call->out_len + 1);
        *out_len = call->out_len;
    }
    copy_reason(call, reason, reason_len);
    hub_pcall_free(call);
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

/* One message table {channel = ..., data = ...} at `t`: fills `e`. The
 * channel and data of the publish (call->ch, call->data) are the defaults;
 * `msg` is the msg object's index. Returns 0 or -1 (failure logged). */
static int route(struct hub_policy *p, struct hub_pcall *call, int t, int msg,
                 struct hub_emit *e)
{
    lua_State *L = p->L;
    char what[160];
    int has_data = 0;

    e->ch = call->ch;
    e->ch_len = call->ch_len;
    e->data = call->data;
    e->data_len = call->data_len;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        if (k && !strcmp(k, "channel")) {
            size_t n = 0;
            const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
            if (!s || !hub_proto_channel_valid(s, n)) {
                describe_value(L, -1, what, sizeof(what));
                lua_pop(L, 2);
                hub_policy_bad_return(p, HUB_HOOK_PUBLISH, call->conn_id,
                                      "on_publish routed '%.*s' to channel %s, which is not "
                                      "a valid channel name (" HUB_LUA_CHANNEL_CHARS ")",
                                      (int)call->ch_len, call->ch, what);
                return -1;
            }
            e->ch = lua_tolstring(L, -1, &e->ch_len); /* anchored by the table */
        } else if (k && !strcmp(k, "data")) {
            has_data = 1;
        } else {
            describe_value(L, -2, what, sizeof(what));
            lua_pop(L, 2);
            hub_policy_bad_return(p, HUB_HOOK_PUBLISH, call->conn_id,
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
    if (hub_lua_is_msg(p, msg, -1)) {
        lua_pop(L, 1);
        if (!hub_lua_msg_push_decoded(p, msg))
            return 0; /* the original bytes */
    }
    if (hub_policy_encode_result(p, HUB_HOOK_PUBLISH, call->conn_id, -1, "on_publish: data",
                                 &e->data, &e->data_len) < 0)
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

/* At the first wait: the channel and the bytes are the caller's until
 * then; the msg object keeps a copy of the bytes (and the calls that come
 * meanwhile get another msg object). */
static void detach_publish(struct hub_policy *p, struct hub_pcall *call)
{
    detach_channel(p, call);
    call->data = hub_lua_msg_keep(p, call->base + 1);
}

/* The msg object at base + 1, the results after it. */
static enum hub_verdict finish_publish(struct hub_policy *p, struct hub_pcall *call, int base,
                                       int ok)
{
    lua_State *L = p->L;
    uint64_t conn_id = call->conn_id;
    char what[160];
    enum hub_verdict v = HUB_FAIL;
    size_t n = 0;
    int msg = base + 1, r = base + 2;

    if (!ok)
        goto out;
    int t = lua_type(L, r);
    if (t == LUA_TBOOLEAN) {
        if (lua_toboolean(L, r)) {
            /* the fast path: the bytes as they came, no decode, no encode */
            add_emit(p, n++, call->ch, call->ch_len, call->data, call->data_len);
            v = HUB_ALLOW;
            goto out;
        }
        set_reason(call->reason, sizeof(call->reason), L, r + 1);
        v = HUB_DENY;
        goto out;
    }
    if (hub_lua_is_msg(p, msg, r)) {
        struct hub_emit e = {call->ch, call->data, call->ch_len, call->data_len};
        if (hub_lua_msg_push_decoded(p, msg) &&
            hub_policy_encode_result(p, HUB_HOOK_PUBLISH, conn_id, -1, "on_publish: msg.data",
                                     &e.data, &e.data_len) < 0)
            goto out;
        add_emit(p, n++, e.ch, e.ch_len, e.data, e.data_len);
        v = HUB_ALLOW;
        goto out;
    }
    if (t != LUA_TTABLE) {
        describe_value(L, r, what, sizeof(what));
        hub_policy_bad_return(p, HUB_HOOK_PUBLISH, conn_id,
                              "on_publish returned %s: expected true, false[, \"reason\"], msg, a "
                              "table {channel = ..., data = ...} or a list of such tables", what);
        goto out;
    }
    if (is_message_table(L, r)) {
        struct hub_emit e;
        if (route(p, call, r, msg, &e) < 0)
            goto out;
        add_emit(p, n++, e.ch, e.ch_len, e.data, e.data_len);
        v = HUB_ALLOW;
        goto out;
    }
    /* a list of message tables (empty: publish nothing) */
    lua_Integer len = (lua_Integer)lua_rawlen(L, r), keys = 0;
    if (len > ROUTES_MAX) {
        hub_policy_bad_return(p, HUB_HOOK_PUBLISH, conn_id,
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
            hub_policy_bad_return(p, HUB_HOOK_PUBLISH, conn_id,
                                  "on_publish returned a table that is neither a message "
                                  "{channel = ..., data = ...} nor a list of them (found %s)",
                                  what);
            goto out;
        }
        lua_pop(L, 1);
    }
    if (keys != len) {
        hub_policy_bad_return(p, HUB_HOOK_PUBLISH, conn_id,
                              "on_publish returned a list with holes: expected a list of message "
                              "tables");
        goto out;
    }
    for (lua_Integer i = 1; i <= len; i++) {
        struct hub_emit e;
        if (!lua_checkstack(L, 8)) {
            hub_policy_bad_return(p, HUB_HOOK_PUBLISH, conn_id,
                                  "on_publish returned too many messages");
            goto out;
        }
        lua_rawgeti(L, r, i); /* anchored by the list */
        int mt = lua_gettop(L);
        if (route(p, call, mt, msg, &e) < 0)
            goto out;
        /* leave the message table (and its JSON, if any) on the stack */
        add_emit(p, n++, e.ch, e.ch_len, e.data, e.data_len);
    }
    v = HUB_ALLOW;
out:
    if (v == HUB_ALLOW) {
        /* every string is anchored on the stack (or is the caller's, or
         * the kept copy's) until the call's stack is reset */
        for (size_t i = 0; i < n; i++)
            call->emit(call->emit_ud, p->emits[i].ch, p->emits[i].ch_len, p->emits[i].data,
                       p->emits[i].data_len);
    }
    hub_lua_msg_end(p, msg);
    return v;
}

enum hub_verdict hub_policy_on_publish(struct hub_policy *p, struct hub_policy_conn *c,
                                       const char *channel, size_t channel_len,
                                       const char *data, size_t data_len,
                                       hub_emit_fn emit, void *ud,
                                       char *reason, size_t reason_len,
                                       struct hub_policy_wait *w)
{
    if (reason_len)
        reason[0] = '\0';
    if (!hub_policy_has(p, HUB_HOOK_PUBLISH) || p->phase != HUB_PHASE_IDLE) {
        if (push_hook(p, HUB_HOOK_PUBLISH) < 0 && p && p->phase != HUB_PHASE_IDLE) {
            set_fail_reason(reason, reason_len, HUB_HOOK_PUBLISH);
            return HUB_FAIL;
        }
        emit(ud, channel, channel_len, data, data_len);
        return HUB_ALLOW;
    }
    lua_State *L = p->L;
    struct hub_pcall *call = hub_pcall_new(p, HUB_HOOK_PUBLISH, c, c->id, w);
    call->ch = channel;
    call->ch_len = channel_len;
    call->data = data;
    call->data_len = data_len;
    call->emit = emit;
    call->emit_ud = ud;
    call->finish = finish_publish;
    call->detach = detach_publish;
    call->nkeep = 1;
    call->nres = 2;
    lua_pushvalue(L, HUB_LUA_MSG);
    hub_lua_msg_begin(p, HUB_LUA_MSG, data, data_len);
    push_hook(p, HUB_HOOK_PUBLISH);
    hub_lua_push_conn(p, L, c);
    lua_pushlstring(L, channel, channel_len);
    lua_pushvalue(L, HUB_LUA_MSG);
    enum hub_verdict v = hub_pcall_run(call, 3);
    if (v == HUB_WAIT)
        return v;
    copy_reason(call, reason, reason_len);
    hub_pcall_free(call);
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

static enum hub_verdict finish_rpc(struct hub_policy *p, struct hub_pcall *call, int base,
                                   int ok)
{
    lua_State *L = p->L;
    char what[160];
    int r = base + 1;

    if (!ok)
        return HUB_FAIL;
    if (lua_isnil(L, r) && !lua_isnil(L, r + 1)) {
        if (lua_type(L, r + 1) != LUA_TSTRING) {
            describe_value(L, r + 1, what, sizeof(what));
            hub_policy_bad_return(p, HUB_HOOK_RPC, call->conn_id,
                                  "on_rpc returned nil and %s: expected a result, or nil, "
                                  "\"reason\"", what);
            return HUB_FAIL;
        }
        set_reason(call->reason, sizeof(call->reason), L, r + 1);
        return HUB_DENY;
    }
    const char *s;
    size_t n;
    if (hub_policy_encode_result(p, HUB_HOOK_RPC, call->conn_id, r, "on_rpc: the result", &s,
                                 &n) < 0)
        return HUB_FAIL;
    hub_buf_append(&call->result, s, n);
    return HUB_ALLOW;
}

enum hub_verdict hub_policy_on_rpc(struct hub_policy *p, struct hub_policy_conn *c,
                                   const char *method, size_t method_len,
                                   const char *data, size_t data_len,
                                   struct hub_buf *result,
                                   char *reason, size_t reason_len,
                                   struct hub_policy_wait *w)
{
    if (reason_len)
        reason[0] = '\0';
    if (push_hook(p, HUB_HOOK_RPC) < 0) {
        if (reason_len)
            snprintf(reason, reason_len, "the policy has no on_rpc hook");
        return p && p->phase == HUB_PHASE_IDLE ? HUB_DENY : HUB_FAIL;
    }
    lua_State *L = p->L;
    hub_lua_push_conn(p, L, c);
    lua_pushlstring(L, method, method_len);
    if (data && data_len) {
        lua_pushcfunction(L, decode_tramp);
        lua_pushlstring(L, data, data_len);
        hub_sandbox_arm(p);
        p->lim.cap_on = 1;
        int st = lua_pcall(L, 1, 1, HUB_LUA_MSGH);
        p->lim.cap_on = 0;
        if (st != LUA_OK) {
            hub_policy_fail(p, HUB_HOOK_RPC, c->id, st);
            lua_settop(L, HUB_LUA_BASE);
            set_fail_reason(reason, reason_len, HUB_HOOK_RPC);
            return HUB_FAIL;
        }
    } else {
        lua_pushnil(L);
    }
    struct hub_pcall *call = hub_pcall_new(p, HUB_HOOK_RPC, c, c->id, w);
    call->finish = finish_rpc;
    call->nres = 2;
    enum hub_verdict v = hub_pcall_run(call, 3);
    if (v == HUB_WAIT)
        return v;
    if (v == HUB_ALLOW)
        hub_buf_append(result, call->result.p, call->result.len);
    copy_reason(call, reason, reason_len);
    hub_pcall_free(call);
    return v;
}

enum hub_verdict hub_policy_on_unsubscribe(struct hub_policy *p, struct hub_policy_conn *c,
                                           const char *channel, size_t len,
                                           struct hub_policy_wait *w)
{
    if (push_hook(p, HUB_HOOK_UNSUBSCRIBE) < 0)
        return HUB_ALLOW;
    struct hub_pcall *call = hub_pcall_new(p, HUB_HOOK_UNSUBSCRIBE, c, c->id, w);
    call->can_wait = 1; /* with no owner, it waits on its own */
    hub_lua_push_conn(p, p->L, c);
    lua_pushlstring(p->L, channel, len);
    enum hub_verdict v = hub_pcall_run(call, 2);
    if (v == HUB_WAIT)
        return v;
    hub_pcall_free(call);
    return HUB_ALLOW;
}

void hub_policy_on_disconnect(struct hub_policy *p, struct hub_policy_conn *c,
                              unsigned code, const char *reason)
{
    if (push_hook(p, HUB_HOOK_DISCONNECT) < 0)
        return;
    /* The connection is going: a wait goes on without it (nobody waits for
     * the end of on_disconnect). */
    struct hub_pcall *call = hub_pcall_new(p, HUB_HOOK_DISCONNECT, c, c->id, NULL);
    call->can_wait = 1;
    hub_lua_push_conn(p, p->L, c);
    lua_pushinteger(p->L, (lua_Integer)code);
    lua_pushstring(p->L, reason ? reason : "");
    if (hub_pcall_run(call, 3) != HUB_WAIT)
        hub_pcall_free(call);
}

void hub_policy_conn_gone(struct hub_policy *p, struct hub_policy_conn *c)
{
    if (p)
        hub_lua_conn_gone(p, c);
    else
        c->lua_ref = 0;
}

