/* The functions of the world of `luahub test` that the spec state calls
 * (spec_impl.h: hub_spec_world_open; docs/testing-policies.md): the actions
 * (reset, connect, command, disconnect, advance, api_publish), each
 * answered as the hub would answer with what the policy did meanwhile, and
 * what a spec reads back (frames, conn_info, failures, logs), plus HMAC and
 * base64url for the tokens a spec makes. lua/spec.lua builds the spec
 * language on them. The host they drive (connections, recordings, the
 * broker, the fake clock, the host interface) is spec_host.c; what the two
 * share is spec_world.h. */
#include "spec_impl.h"
#include "spec_world.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "luahub/log.h"
#include "luahub/policy.h"
#include "luahub/proto.h"
#include "luahub/request.h"
#include "luahub/util.h"

#define REASON_MAX 256
#define TIMER_COST 100              /* spec instructions a timer callback costs */

/* ---- the functions the spec state sees ------------------------------------- */

static struct hub_spec_world *world(lua_State *L)
{
    struct hub_spec_world *w = lua_touserdata(L, lua_upvalueindex(1));
    if (!w->policy)
        luaL_error(L, "the policy did not load");
    return w;
}

/* Where an action begins: what it recorded is what came after. */
struct mark {
    size_t msgs, fails;
};

static struct mark begin(struct hub_spec_world *w, lua_State *L)
{
    hub_lua_limits_charge(w->lim, L, HUB_SPEC_ACTION_COST);
    return (struct mark){w->nmsgs, w->nfails};
}

static void set_str(lua_State *L, int t, const char *k, const char *v)
{
    if (!v)
        return;
    t = lua_absindex(L, t);
    lua_pushstring(L, v);
    lua_setfield(L, t, k);
}

static void set_int(lua_State *L, int t, const char *k, lua_Integer v)
{
    t = lua_absindex(L, t);
    lua_pushinteger(L, v);
    lua_setfield(L, t, k);
}

static void push_name(lua_State *L, uint64_t id)
{
    char name[48];
    hub_spec_conn_name(NULL, id, name, sizeof(name));
    lua_pushstring(L, name);
}

/* result.messages: what was published since `m`, each {channel, data
 * (JSON), to = {client ids}}; result.failures: the indexes of the failures
 * recorded since `m`. */
static void finish(lua_State *L, int t, struct hub_spec_world *w, struct mark m)
{
    lua_createtable(L, (int)(w->nmsgs - m.msgs), 0);
    for (size_t i = m.msgs; i < w->nmsgs; i++) {
        const struct message *msg = &w->msgs[i];
        lua_createtable(L, 0, 3);
        set_str(L, -1, "channel", msg->channel);
        set_str(L, -1, "data", msg->data);
        lua_createtable(L, (int)msg->nto, 0);
        for (size_t k = 0; k < msg->nto; k++) {
            push_name(L, msg->to[k]);
            lua_rawseti(L, -2, (lua_Integer)k + 1);
        }
        lua_setfield(L, -2, "to");
        lua_rawseti(L, -2, (lua_Integer)(i - m.msgs) + 1);
    }
    lua_setfield(L, t, "messages");
    lua_createtable(L, (int)(w->nfails - m.fails), 0);
    for (size_t i = m.fails; i < w->nfails; i++) {
        lua_pushinteger(L, (lua_Integer)i + 1);
        lua_rawseti(L, -2, (lua_Integer)(i - m.fails) + 1);
    }
    lua_setfield(L, t, "failures");
}

static void reply_error(lua_State *L, int t, const char *code, const char *msg)
{
    lua_pushboolean(L, 0);
    lua_setfield(L, t, "ok");
    set_str(L, t, "error", code);
    set_str(L, t, "message", msg);
}

static void reply_ok(lua_State *L, int t)
{
    lua_pushboolean(L, 1);
    lua_setfield(L, t, "ok");
}

/* A hook said no (DENY: `deny_code` with its reason) or failed (internal),
 * in the words of the sessions (session.c). */
static void reply_refused(lua_State *L, int t, enum hub_verdict v, const char *reason,
                          const char *deny_code)
{
    if (v == HUB_DENY)
        reply_error(L, t, deny_code, reason[0] ? reason : "refused by policy");
    else
        reply_error(L, t, "internal", "the policy failed; the action was refused");
}

/* The connection `id` (argument `arg`), open; raises otherwise. */
static struct sconn *open_conn(lua_State *L, struct hub_spec_world *w, int arg)
{
    lua_Integer id = luaL_checkinteger(L, arg);
    if (id < 1 || (uint64_t)id > w->nconns)
        luaL_error(L, "no connection %d in this test", (int)id);
    struct sconn *c = w->conns[id - 1];
    if (c->state == C_REFUSED)
        luaL_error(L, "the connection was refused: it never opened");
    if (c->state != C_OPEN)
        luaL_error(L, "the connection is closed (code %d%s%s%s)", (int)c->close_code,
                   c->close_reason && c->close_reason[0] ? ", \"" : "",
                   c->close_reason ? c->close_reason : "",
                   c->close_reason && c->close_reason[0] ? "\"" : "");
    return c;
}

/* reset([vars_json[, start_ms]]) -> true, or false and the problems of
 * the policy, one a line */
static int l_reset(lua_State *L)
{
    struct hub_spec_world *w = lua_touserdata(L, lua_upvalueindex(1));
    const char *vars = luaL_optstring(L, 1, NULL);
    double start = luaL_optnumber(L, 2, HUB_SPEC_EPOCH_MS);
    struct hub_config_errors errs = {0};

    if (!(start >= 0 && start < 1e15))
        luaL_error(L, "the clock must start at 0 to 1e15 ms (got %f)", start);
    if (hub_spec_world_reset(w, vars, start, &errs) == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    struct hub_buf b = {0};
    for (unsigned i = 0; i < errs.n; i++)
        hub_buf_printf(&b, "%s%s", i ? "\n" : "", errs.v[i]);
    hub_config_errors_free(&errs);
    lua_pushboolean(L, 0);
    lua_pushstring(L, b.p ? b.p : "");
    hub_buf_free(&b);
    return 2;
}

/* ---- connect ---- */

struct offer {
    size_t n;
    int luahub;
    struct hub_buf shown;
};

static int offer_add(void *ud, const char *v, size_t len)
{
    struct offer *o = ud;
    o->luahub |= len == 6 && !memcmp(v, "luahub", 6);
    hub_buf_printf(&o->shown, "%s\"%.*s\"", o->n++ ? ", " : "", (int)len, v);
    return 0;
}

static const char *opt_str(lua_State *L, int t, const char *k, const char *def)
{
    lua_getfield(L, t, k);
    const char *s = lua_isnil(L, -1) ? def : luaL_checkstring(L, -1);
    lua_pop(L, 1); /* anchored by the table */
    return s;
}

/* Decides the connect as the server does (server_ws.c, hub_server_upgrade): the
 * path, on_connect, then the subprotocol. `res` is filled on ALLOW. */
static unsigned decide(struct hub_spec_world *w, const struct hub_request *r, uint64_t id,
                       struct hub_connect_result *res, char *why, size_t why_len)
{
    struct offer o = {0};

    if (r->path_len != strlen(w->cfg.websocket_path) || strcmp(r->path, w->cfg.websocket_path)) {
        snprintf(why, why_len, "no websocket endpoint here");
        return 404;
    }
    hub_request_list_each(r, "sec-websocket-protocol", offer_add, &o);
    if (!o.n && hub_request_header(r, "sec-websocket-protocol", NULL)) {
        snprintf(why, why_len, "empty Sec-WebSocket-Protocol list: offer \"luahub\", or leave "
                 "the header out");
        return 400;
    }
    unsigned status = 0;
    enum hub_verdict v = HUB_ALLOW;
    if (hub_policy_has(w->policy, HUB_HOOK_CONNECT))
        v = hub_policy_on_connect(w->policy, r, id, res, NULL);
    if (v != HUB_ALLOW) {
        status = v == HUB_FAIL ? 500 : res->status ? res->status : 403;
        snprintf(why, why_len, "%s", v == HUB_FAIL ? "internal error: the connect policy failed"
                                     : res->reason[0] ? res->reason : "forbidden");
    } else if (o.n && !res->protocol && !o.luahub) {
        status = 400;
        snprintf(why, why_len, "unsupported WebSocket subprotocol (offered: %s): this hub "
                 "speaks \"luahub\"", o.shown.p);
    } else if (!res->protocol && o.luahub) {
        res->protocol = hub_xstrdup("luahub");
    }
    if (status) {
        free(res->user);
        free(res->info_json);
        free(res->protocol);
        memset(res, 0, sizeof(*res));
    }
    hub_buf_free(&o.shown);
    return status;
}

/* connect{path = s, query = raw query string, headers = {{name, value}...}
 * (names lower-case), remote_addr = s} -> {id, name, accepted, status,
 * reason, messages, failures} */
static int l_connect(lua_State *L)
{
    struct hub_spec_world *w = world(L);
    struct hub_header hs[HUB_REQUEST_HEADERS_MAX];
    struct hub_request r = {0};
    struct hub_connect_result res = {0};
    char why[REASON_MAX];

    luaL_checktype(L, 1, LUA_TTABLE);
    struct mark m = begin(w, L);
    r.method = "GET";
    r.method_len = 3;
    r.path = opt_str(L, 1, "path", w->cfg.websocket_path);
    r.path_len = strlen(r.path);
    r.query = opt_str(L, 1, "query", "");
    r.query_len = strlen(r.query);
    r.target = r.path;
    r.target_len = r.path_len;
    r.http_minor = 1;
    r.upgrade_websocket = 1;
    r.keep_alive = 1;
    r.peer = opt_str(L, 1, "remote_addr", "127.0.0.1");
    r.peer_loopback = !strncmp(r.peer, "127.", 4) || !strcmp(r.peer, "::1");
    lua_getfield(L, 1, "headers");
    luaL_checktype(L, -1, LUA_TTABLE);
    size_t nh = (size_t)lua_rawlen(L, -1);
    if (nh > HUB_REQUEST_HEADERS_MAX)
        luaL_error(L, "connect: %d headers: at most %d", (int)nh, HUB_REQUEST_HEADERS_MAX);
    for (size_t i = 0; i < nh; i++) {
        lua_rawgeti(L, -1, (lua_Integer)i + 1);
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, 2);
        hs[i].name = luaL_checklstring(L, -2, &hs[i].name_len);
        hs[i].value = luaL_checklstring(L, -1, &hs[i].value_len);
        lua_pop(L, 3); /* anchored by the headers table */
    }
    r.headers = hs;
    r.nheaders = nh;

    uint64_t id = w->nconns + 1;
    struct sconn *c = hub_xcalloc(1, sizeof(*c));
    c->pc.id = id;
    c->state = C_REFUSED;
    snprintf(c->addr, sizeof(c->addr), "%s", r.peer);
    w->conns = hub_spec_grow(w->conns, &w->capconns, w->nconns + 1, sizeof(*w->conns));
    w->conns[w->nconns++] = c;

    unsigned status = decide(w, &r, id, &res, why, sizeof(why));
    lua_pop(L, 1); /* headers */
    if (!status) {
        c->pc.user = res.user;
        c->pc.info_json = res.info_json;
        c->pc.protocol = res.protocol;
        c->state = C_OPEN;
    }
    hub_spec_settle(w);
    lua_createtable(L, 0, 8);
    set_int(L, -1, "id", (lua_Integer)id);
    push_name(L, id);
    lua_setfield(L, -2, "name");
    lua_pushboolean(L, status == 0);
    lua_setfield(L, -2, "accepted");
    if (status) {
        set_int(L, -1, "status", status);
        set_str(L, -1, "reason", why);
    }
    finish(L, lua_gettop(L), w, m);
    return 1;
}

/* ---- commands ---- */

static void emit(void *ud, const char *ch, size_t len, const char *data, size_t dlen)
{
    hub_spec_publish(ud, ch, len, data, dlen);
}

static void do_subscribe(struct hub_spec_world *w, lua_State *L, int t, struct sconn *c,
                         const struct hub_cmd *cmd)
{
    char eff[HUB_CHANNEL_MAX + 1], reason[REASON_MAX], msg[128];
    const char *name = cmd->channel;
    size_t len = cmd->channel_len;

    if (hub_policy_has(w->policy, HUB_HOOK_SUBSCRIBE)) {
        enum hub_verdict v = hub_policy_on_subscribe(w->policy, &c->pc, name, len, eff, &len,
                                                     reason, sizeof(reason), NULL);
        if (v != HUB_ALLOW) {
            reply_refused(L, t, v, reason, "forbidden");
            return;
        }
        name = eff;
    }
    if (hub_spec_subscribe(w, c, name, len) < 0) {
        snprintf(msg, sizeof(msg), "at most %u channels per connection (max_channels_per_conn)",
                 w->cfg.max_channels_per_conn);
        reply_error(L, t, "limit_exceeded", msg);
        return;
    }
    reply_ok(L, t);
    lua_pushlstring(L, name, len);
    lua_setfield(L, t, "channel");
}

static void do_unsubscribe(struct hub_spec_world *w, lua_State *L, int t, struct sconn *c,
                           const struct hub_cmd *cmd)
{
    char msg[HUB_CHANNEL_MAX + 32];

    if (hub_spec_unsubscribe(c, cmd->channel, cmd->channel_len) < 0) {
        snprintf(msg, sizeof(msg), "not subscribed to '%s'", cmd->channel);
        reply_error(L, t, "not_subscribed", msg);
        return;
    }
    reply_ok(L, t);
    if (hub_policy_has(w->policy, HUB_HOOK_UNSUBSCRIBE))
        hub_policy_on_unsubscribe(w->policy, &c->pc, cmd->channel, cmd->channel_len, NULL);
}

static void do_publish(struct hub_spec_world *w, lua_State *L, int t, struct sconn *c,
                       const struct hub_cmd *cmd)
{
    char reason[REASON_MAX];

    if (hub_policy_has(w->policy, HUB_HOOK_PUBLISH)) {
        enum hub_verdict v = hub_policy_on_publish(w->policy, &c->pc, cmd->channel,
                                                   cmd->channel_len, cmd->data.p,
                                                   cmd->data.len, emit, w, reason,
                                                   sizeof(reason), NULL);
        if (v != HUB_ALLOW) {
            reply_refused(L, t, v, reason, "forbidden");
            return;
        }
    } else {
        hub_spec_publish(w, cmd->channel, cmd->channel_len, cmd->data.p, cmd->data.len);
    }
    reply_ok(L, t);
}

static void do_rpc(struct hub_spec_world *w, lua_State *L, int t, struct sconn *c,
                   const struct hub_cmd *cmd)
{
    char reason[REASON_MAX];
    struct hub_buf result = {0};

    if (!hub_policy_has(w->policy, HUB_HOOK_RPC)) {
        reply_error(L, t, "unknown_op", "op 'rpc' needs an on_rpc hook in the policy");
        return;
    }
    enum hub_verdict v = hub_policy_on_rpc(w->policy, &c->pc, cmd->method, cmd->method_len,
                                           cmd->data.p, cmd->data.len, &result, reason,
                                           sizeof(reason), NULL);
    if (v == HUB_ALLOW) {
        reply_ok(L, t);
        lua_pushlstring(L, result.p, result.len);
        lua_setfield(L, t, "data");
    } else {
        reply_refused(L, t, v, reason, "rpc_error");
    }
    hub_buf_free(&result);
}

/* command(id, frame): the client's text frame `frame` on connection `id`,
 * answered as the hub would -> {ok, channel, data (JSON), error, message,
 * closed = {code, reason} (the hub closed the connection instead),
 * messages, failures}. */
static int l_command(lua_State *L)
{
    struct hub_spec_world *w = world(L);
    struct sconn *c = open_conn(L, w, 1);
    size_t len;
    const char *frame = luaL_checklstring(L, 2, &len);
    struct hub_cmd cmd;
    struct hub_proto_error err;

    struct mark m = begin(w, L);
    lua_createtable(L, 0, 8);
    int t = lua_gettop(L);
    if (len > w->cfg.max_message_size) {
        hub_spec_close_conn(w, c, 1009, "message too large");
    } else if (hub_proto_decode(frame, len, &cmd, &err) < 0) {
        if (err.invalid_utf8)
            hub_spec_close_conn(w, c, 1007, "invalid UTF-8");
        else
            reply_error(L, t, hub_proto_code_name(err.code), err.message);
    } else {
        switch (cmd.op) {
        case HUB_OP_SUBSCRIBE: do_subscribe(w, L, t, c, &cmd); break;
        case HUB_OP_UNSUBSCRIBE: do_unsubscribe(w, L, t, c, &cmd); break;
        case HUB_OP_PUBLISH: do_publish(w, L, t, c, &cmd); break;
        case HUB_OP_RPC: do_rpc(w, L, t, c, &cmd); break;
        case HUB_OP_PING: reply_ok(L, t); break;
        default:
            reply_error(L, t, "not_available", "luahub test does not run history or presence "
                        "(the broker's, not the policy's)");
            break;
        }
    }
    if (c->state == C_CLOSING) {
        lua_createtable(L, 0, 2);
        set_int(L, -1, "code", c->close_code);
        set_str(L, -1, "reason", c->close_reason);
        lua_setfield(L, t, "closed");
        if (lua_getfield(L, t, "ok") == LUA_TNIL) {
            lua_pushboolean(L, 0);
            lua_setfield(L, t, "ok");
        }
        lua_pop(L, 1);
    }
    hub_spec_settle(w);
    finish(L, t, w, m);
    return 1;
}

/* disconnect(id, code): the client closes with `code` -> {messages,
 * failures} (on_disconnect's publishes). */
static int l_disconnect(lua_State *L)
{
    struct hub_spec_world *w = world(L);
    struct sconn *c = open_conn(L, w, 1);
    lua_Integer code = luaL_checkinteger(L, 2);

    struct mark m = begin(w, L);
    c->close_code = (unsigned)code;
    c->state = C_CLOSING;
    hub_spec_settle(w);
    lua_createtable(L, 0, 2);
    finish(L, lua_gettop(L), w, m);
    return 1;
}

/* advance(ms): moves the clock, firing the timers due on the way in order
 * (each at its due time) -> {messages, failures}. */
static int l_advance(lua_State *L)
{
    struct hub_spec_world *w = world(L);
    lua_Integer ms = luaL_checkinteger(L, 1);
    if (ms < 0)
        luaL_error(L, "advance: the clock only moves forward");

    struct mark m = begin(w, L);
    uint64_t until = w->now + (uint64_t)ms;
    while (w->nheap && w->heap[0].due <= until) {
        struct stimer due = w->heap[0];
        hub_spec_heap_remove(w, 0);
        w->now = due.due;
        hub_policy_timer_fire(due.t);
        hub_spec_settle(w);
        hub_lua_limits_charge(w->lim, L, TIMER_COST);
    }
    w->now = until;
    lua_createtable(L, 0, 2);
    finish(L, lua_gettop(L), w, m);
    return 1;
}

static int l_now(lua_State *L)
{
    lua_pushnumber(L, hub_spec_now_ms(world(L)));
    return 1;
}

/* api_publish(channel, json): a publish through the HTTP API (no hook
 * runs) -> {messages, failures}. */
static int l_api_publish(lua_State *L)
{
    struct hub_spec_world *w = world(L);
    size_t clen, dlen;
    const char *ch = luaL_checklstring(L, 1, &clen);
    const char *data = luaL_checklstring(L, 2, &dlen);
    if (!hub_proto_channel_valid(ch, clen))
        luaL_error(L, "invalid channel name '%s': 1 to 255 bytes of A-Z a-z 0-9 and "
                      "_ : . @ / = # -", ch);

    struct mark m = begin(w, L);
    hub_spec_publish(w, ch, clen, data, dlen);
    lua_createtable(L, 0, 2);
    finish(L, lua_gettop(L), w, m);
    return 1;
}

static struct sconn *any_conn(lua_State *L, struct hub_spec_world *w, int arg)
{
    lua_Integer id = luaL_checkinteger(L, arg);
    if (id < 1 || (uint64_t)id > w->nconns)
        luaL_error(L, "no connection %d in this test", (int)id);
    return w->conns[id - 1];
}

/* frames(id) -> {{kind = "message"|"push"|"close", channel, data (JSON),
 * code, reason, seen, index}...} in the order received */
static int l_frames(lua_State *L)
{
    struct hub_spec_world *w = world(L);
    struct sconn *c = any_conn(L, w, 1);
    static const char *const kinds[] = {"message", "push", "close"};

    lua_createtable(L, (int)c->nframes, 0);
    for (size_t i = 0; i < c->nframes; i++) {
        const struct frame *f = &c->frames[i];
        int k = f->kind == 'm' ? 0 : f->kind == 'p' ? 1 : 2;
        lua_createtable(L, 0, 6);
        set_str(L, -1, "kind", kinds[k]);
        set_str(L, -1, "channel", f->channel);
        set_str(L, -1, k == 2 ? "reason" : "data", f->text);
        if (k == 2)
            set_int(L, -1, "code", f->code);
        lua_pushboolean(L, f->seen);
        lua_setfield(L, -2, "seen");
        set_int(L, -1, "index", (lua_Integer)i + 1);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* see_frame(id, index): an expectation matched it */
static int l_see_frame(lua_State *L)
{
    struct sconn *c = any_conn(L, world(L), 1);
    lua_Integer i = luaL_checkinteger(L, 2);
    if (i >= 1 && (size_t)i <= c->nframes)
        c->frames[i - 1].seen = 1;
    return 0;
}

/* conn_info(id) -> {state, user, info (JSON), protocol, channels = {...},
 * close_code, close_reason} */
static int l_conn_info(lua_State *L)
{
    struct hub_spec_world *w = world(L);
    struct sconn *c = any_conn(L, w, 1);
    static const char *const states[] = {"refused", "open", "closing", "closed"};

    lua_createtable(L, 0, 7);
    set_str(L, -1, "state", states[c->state]);
    set_str(L, -1, "user", c->pc.user);
    set_str(L, -1, "info", c->pc.info_json);
    set_str(L, -1, "protocol", c->pc.protocol);
    if (c->state == C_GONE) {
        set_int(L, -1, "close_code", c->close_code);
        set_str(L, -1, "close_reason", c->close_reason ? c->close_reason : "");
    }
    lua_createtable(L, (int)c->nchans, 0);
    for (size_t i = 0; i < c->nchans; i++) {
        lua_pushstring(L, c->chans[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -2, "channels");
    return 1;
}

/* failures() -> {{index, hook, conn (client id), conn_id, what, seen}...}, every
 * failure of the policy in this test; the count of dropped ones as
 * .dropped */
static int l_failures(lua_State *L)
{
    struct hub_spec_world *w = lua_touserdata(L, lua_upvalueindex(1));

    lua_createtable(L, (int)w->nfails, 1);
    for (size_t i = 0; i < w->nfails; i++) {
        const struct failure *f = &w->fails[i];
        lua_createtable(L, 0, 5);
        set_int(L, -1, "index", (lua_Integer)i + 1);
        set_str(L, -1, "hook", f->hook);
        set_str(L, -1, "what", f->what);
        if (f->conn) {
            push_name(L, f->conn);
            lua_setfield(L, -2, "conn");
            set_int(L, -1, "conn_id", (lua_Integer)f->conn);
        }
        lua_pushboolean(L, f->seen);
        lua_setfield(L, -2, "seen");
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    set_int(L, -1, "dropped", (lua_Integer)w->fails_dropped);
    return 1;
}

/* see_failure(index): an expectation looked at it */
static int l_see_failure(lua_State *L)
{
    struct hub_spec_world *w = lua_touserdata(L, lua_upvalueindex(1));
    lua_Integer i = luaL_checkinteger(L, 1);
    if (i >= 1 && (size_t)i <= w->nfails)
        w->fails[i - 1].seen = 1;
    return 0;
}

/* logs() -> the log lines of this test ("error hook=..."), oldest first */
static int l_logs(lua_State *L)
{
    struct hub_spec_world *w = lua_touserdata(L, lua_upvalueindex(1));
    size_t first = w->nlogs > LOG_LINES ? w->nlogs - LOG_LINES : 0;

    lua_createtable(L, (int)(w->nlogs - first), 0);
    for (size_t i = first; i < w->nlogs; i++) {
        lua_pushstring(L, w->logs[i % LOG_LINES]);
        lua_rawseti(L, -2, (lua_Integer)(i - first) + 1);
    }
    return 1;
}

/* hmac_sha256(key, text) -> the 32 raw bytes */
static int l_hmac_sha256(lua_State *L)
{
    size_t kl, tl;
    const char *k = luaL_checklstring(L, 1, &kl);
    const char *t = luaL_checklstring(L, 2, &tl);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!HMAC(EVP_sha256(), k, (int)kl, (const unsigned char *)t, tl, out, &n))
        luaL_error(L, "hmac_sha256 failed");
    lua_pushlstring(L, (const char *)out, n);
    return 1;
}

/* b64url(bytes) -> base64url without padding (RFC 7515) */
static int l_b64url(lua_State *L)
{
    static const char abc[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t n;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
    luaL_Buffer b;

    luaL_buffinit(L, &b);
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0) |
                     (i + 2 < n ? s[i + 2] : 0);
        size_t chars = n - i >= 3 ? 4 : n - i + 1;
        for (size_t k = 0; k < chars; k++)
            luaL_addchar(&b, abc[(v >> (18 - 6 * k)) & 63]);
    }
    luaL_pushresult(&b);
    return 1;
}

void hub_spec_world_open(lua_State *L, struct hub_spec_world *w)
{
    static const luaL_Reg fns[] = {
        {"reset", l_reset},
        {"connect", l_connect},
        {"command", l_command},
        {"disconnect", l_disconnect},
        {"advance", l_advance},
        {"now", l_now},
        {"api_publish", l_api_publish},
        {"frames", l_frames},
        {"see_frame", l_see_frame},
        {"conn_info", l_conn_info},
        {"failures", l_failures},
        {"see_failure", l_see_failure},
        {"logs", l_logs},
        {"hmac_sha256", l_hmac_sha256},
        {"b64url", l_b64url},
        {NULL, NULL},
    };
    lua_pushlightuserdata(L, w);
    luaL_setfuncs(L, fns, 1);
}
