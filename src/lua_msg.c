/* The msg object of on_publish: one userdata, kept at HUB_LUA_MSG, pointed
 * at the published bytes for the duration of one call. msg.raw is those
 * bytes; msg.data decodes them on first use (cached in the user value, so
 * that a hook returning msg unchanged costs no decode and no encode). */
#include "lua_api.h"

#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#define MSG_MT "msg"

static int msg_index(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    const char *k = lua_tostring(L, 2);
    int is_data = k && !strcmp(k, "data"), is_raw = k && !strcmp(k, "raw");

    if (!is_data && !is_raw)
        return luaL_error(L, "msg has no field '%s' (msg.data, msg.raw)",
                          k ? k : luaL_typename(L, 2));
    if (!p->msg_live)
        return luaL_error(L, "msg.%s: msg is only valid during the on_publish call "
                             "that received it (copy what you need)", k);
    if (is_raw) {
        lua_pushlstring(L, p->msg_raw, p->msg_len);
        return 1;
    }
    if (!p->msg_decoded) {
        lua_pushlstring(L, p->msg_raw, p->msg_len);
        hub_lua_decode(p, L, -1, "msg.data");
        lua_setiuservalue(L, 1, 1);
        p->msg_decoded = 1;
    }
    lua_getiuservalue(L, 1, 1);
    return 1;
}

static int msg_newindex(lua_State *L)
{
    return luaL_error(L, "msg is read-only: change msg.data's contents and return "
                         "msg, or return {channel = ..., data = ...}");
}

static int msg_tostring(lua_State *L)
{
    lua_pushliteral(L, "msg");
    return 1;
}

void hub_lua_new_msg(struct hub_policy *p)
{
    lua_newuserdatauv(p->L, 1, 1);
    luaL_setmetatable(p->L, MSG_MT);
}

void hub_lua_msg_begin(struct hub_policy *p, const char *data, size_t len)
{
    p->msg_raw = data;
    p->msg_len = len;
    p->msg_live = 1;
    p->msg_decoded = 0;
}

void hub_lua_msg_end(struct hub_policy *p)
{
    p->msg_live = 0;
    p->msg_raw = NULL;
    if (p->msg_decoded) {
        lua_pushnil(p->L);
        lua_setiuservalue(p->L, HUB_LUA_MSG, 1);
        p->msg_decoded = 0;
    }
}

int hub_lua_is_msg(struct hub_policy *p, int idx)
{
    return lua_rawequal(p->L, idx, HUB_LUA_MSG);
}

int hub_lua_msg_push_decoded(struct hub_policy *p)
{
    if (!p->msg_decoded)
        return 0;
    lua_getiuservalue(p->L, HUB_LUA_MSG, 1);
    return 1;
}

void hub_lua_msg_open(lua_State *L)
{
    static const luaL_Reg msg_mt[] = {
        {"__index", msg_index},
        {"__newindex", msg_newindex},
        {"__tostring", msg_tostring},
        {NULL, NULL},
    };

    hub_lua_new_metatable(L, MSG_MT, msg_mt);
}
