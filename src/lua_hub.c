/* The `hub` module a policy sees: hub.publish, hub.subscribers,
 * hub.presence, hub.conn, hub.log, hub.now, and the module itself
 * (hub_lua_open), which gathers the other families: hub.after (lua_timer.c),
 * hub.json (lua_json.c), hub.hmac_sha256 and hub.jwt_verify
 * (lua_crypto.c), the conn and msg objects (lua_conn.c, lua_msg.c).
 *
 * Every function of these files is called from Lua, inside a protected
 * call made by policy_call.c, so it may raise. Each one checks its
 * arguments before touching a C resource and refuses clearly when the
 * phase does not allow it:
 *
 *   hub.publish, hub.subscribers, hub.presence, hub.conn
 *                                            hooks and timers (not at load)
 *   hub.after                                load, hooks, timers (load: starts
 *                                            once the policy is in service)
 *   hub.log, hub.now, hub.json.*, hub.hmac_sha256, hub.jwt_verify   anywhere
 *   conn.* and conn:*                        see lua_conn.c */
#include "lua_api.h"

#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>

#include "luahub/log.h"
#include "luahub/proto.h"

#define LOG_MAX 4000                /* bytes of one hub.log line */

const char *hub_lua_check_channel(lua_State *L, int arg, const char *fn, size_t *len)
{
    const char *s = luaL_checklstring(L, arg, len);
    if (!hub_proto_channel_valid(s, *len))
        luaL_error(L, "%s: invalid channel name '%s': %s", fn, s, HUB_LUA_CHANNEL_RULE);
    return s;
}

/* hub.publish & co need the running hub: not while the policy loads (and
 * there is no hub at all in --check). */
static const struct hub_policy_host *need_host(lua_State *L, const char *fn)
{
    struct hub_policy *p = hub_lua_policy(L);
    if (!p->host.ops || p->phase == HUB_PHASE_LOAD)
        luaL_error(L, "%s is not available while the policy loads: call it from a "
                      "hook or a timer", fn);
    return &p->host;
}

static int l_publish(lua_State *L)
{
    const struct hub_policy_host *h = need_host(L, "hub.publish");
    size_t clen, dlen;
    const char *ch = hub_lua_check_channel(L, 1, "hub.publish", &clen);
    luaL_checkany(L, 2);
    hub_lua_encode(hub_lua_policy(L), L, 2, "hub.publish: data");
    /* a delivery per local subscriber */
    hub_sandbox_charge(hub_lua_policy(L), L, 16 + (int64_t)h->ops->subscribers(h->ud, ch, clen));
    const char *data = lua_tolstring(L, -1, &dlen);
    size_t n = h->ops->publish(h->ud, ch, clen, data, dlen);
    lua_pushinteger(L, (lua_Integer)n);
    return 1;
}

static int l_subscribers(lua_State *L)
{
    const struct hub_policy_host *h = need_host(L, "hub.subscribers");
    size_t len;
    const char *ch = hub_lua_check_channel(L, 1, "hub.subscribers", &len);
    lua_pushinteger(L, (lua_Integer)h->ops->subscribers(h->ud, ch, len));
    return 1;
}

/* hub.presence(channel): {clients = N, users = M} of this process. */
static int l_presence(lua_State *L)
{
    const struct hub_policy_host *h = need_host(L, "hub.presence");
    size_t clen;
    uint64_t clients, users;
    const char *ch = hub_lua_check_channel(L, 1, "hub.presence", &clen);
    hub_sandbox_charge(hub_lua_policy(L), L, 16 + (int64_t)h->ops->subscribers(h->ud, ch, clen));
    h->ops->presence_local(h->ud, ch, clen, &clients, &users);
    lua_createtable(L, 0, 2);
    lua_pushinteger(L, (lua_Integer)clients);
    lua_setfield(L, -2, "clients");
    lua_pushinteger(L, (lua_Integer)users);
    lua_setfield(L, -2, "users");
    return 1;
}

static int l_conn(lua_State *L)
{
    const struct hub_policy_host *h = need_host(L, "hub.conn");
    const char *id = luaL_checkstring(L, 1);
    struct hub_policy_conn *c = h->ops->conn_named(h->ud, id);
    if (!c)
        lua_pushnil(L);
    else
        hub_lua_push_conn(hub_lua_policy(L), c);
    return 1;
}

static int l_log(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    const char *name = luaL_checkstring(L, 1);
    int level = hub_log_level_parse(name);
    if (level < 0 && !strcmp(name, "warning"))
        level = HUB_LOG_WARN;
    if (level < 0)
        luaL_error(L, "hub.log: unknown level '%s' (debug, info, warn, error)", name);
    if (!hub_log_enabled(level))
        return 0;

    /* tostring every argument first (may run __tostring), then join */
    int n = lua_gettop(L);
    for (int i = 2; i <= n; i++) {
        luaL_tolstring(L, i, NULL);
        lua_replace(L, i);
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 2; i <= n; i++) {
        if (i > 2)
            luaL_addchar(&b, ' ');
        lua_pushvalue(L, i);
        luaL_addvalue(&b);
    }
    luaL_pushresult(&b);
    size_t len;
    const char *msg = lua_tolstring(L, -1, &len);
    hub_sandbox_charge(p, L, HUB_COST_LOG + (int64_t)(len / HUB_COST_COPY));
    if (len > LOG_MAX)
        len = LOG_MAX;
    if (p->cur_conn_id)
        hub_log(level, "policy: %.*s [conn %llu]", (int)len, msg,
                (unsigned long long)p->cur_conn_id);
    else
        hub_log(level, "policy: %.*s", (int)len, msg);
    return 0;
}

double hub_lua_now_ms(const struct hub_policy *p)
{
    if (p->host.ops && p->host.ops->now_ms)
        return p->host.ops->now_ms(p->host.ud); /* luahub test's fake clock */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static int l_now(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)hub_lua_now_ms(hub_lua_policy(L)));
    return 1;
}

void hub_lua_new_metatable(lua_State *L, const char *name, const luaL_Reg *fns)
{
    luaL_newmetatable(L, name);
    luaL_setfuncs(L, fns, 0);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable"); /* getmetatable() gives false */
    lua_pop(L, 1);
}

void hub_lua_open(struct hub_policy *p)
{
    lua_State *L = p->L;
    static const luaL_Reg hub_fns[] = {
        {"publish", l_publish},
        {"log", l_log},
        {"now", l_now},
        {"after", hub_lua_after},
        {"subscribers", l_subscribers},
        {"presence", l_presence},
        {"conn", l_conn},
        {"hmac_sha256", hub_lua_hmac_sha256},
        {"jwt_verify", hub_lua_jwt_verify},
        {NULL, NULL},
    };
    static const luaL_Reg json_fns[] = {
        {"encode", hub_lua_json_encode},
        {"decode", hub_lua_json_decode},
        {"array", hub_lua_json_array},
        {NULL, NULL},
    };

    hub_lua_conn_open(L);
    hub_lua_msg_open(L);
    hub_lua_timer_open(L);

    lua_newtable(L); /* what hub.json.array marks its tables with */
    lua_pushliteral(L, "luahub.json.array");
    lua_setfield(L, -2, "__name");
    p->ref_array_mt = luaL_ref(L, LUA_REGISTRYINDEX);

    lua_newtable(L); /* weak table of on_connect's objects */
    lua_newtable(L);
    lua_pushliteral(L, "v");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    p->ref_pending = luaL_ref(L, LUA_REGISTRYINDEX);

    luaL_newlib(L, hub_fns);
    luaL_newlib(L, json_fns);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_null);
    lua_setfield(L, -2, "null");
    lua_setfield(L, -2, "json");
    lua_pushliteral(L, HUB_VERSION);
    lua_setfield(L, -2, "version");

    /* hub.vars: the conf's policy_vars (e.g. a token secret), a fresh
     * table per state, so it is there again after a reload. */
    lua_pushcfunction(L, hub_lua_json_decode);
    lua_pushstring(L, p->cfg->policy_vars ? p->cfg->policy_vars : "{}");
    lua_call(L, 1, 1);
    lua_setfield(L, -2, "vars");
}
