/* The msg object of on_publish: a userdata pointed at the published bytes
 * for the duration of one call. msg.raw is those bytes; msg.data decodes
 * them on first use (cached in user value 1, so that a hook returning msg
 * unchanged costs no decode and no encode).
 *
 * One object is kept at HUB_LUA_MSG and reused by every call, pointed at
 * the caller's bytes (no copy). A call that waits (hub.redis & co) keeps
 * its object: the object copies the bytes into a string of its own (user
 * value 2), and HUB_LUA_MSG gets a new object for the calls that run
 * meanwhile (hub_lua_msg_keep). */
#include "lua_api.h"

#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#define MSG_MT "msg"

enum { UV_DATA = 1, UV_COPY, UV__COUNT = UV_COPY };

struct lmsg {
    const char *raw;        /* the published bytes (the caller's, or the copy) */
    size_t len;
    int live;               /* during the call that received it */
    int decoded;            /* UV_DATA holds msg.data */
};

static int msg_index(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    struct lmsg *m = luaL_checkudata(L, 1, MSG_MT);
    const char *k = lua_tostring(L, 2);
    int is_data = k && !strcmp(k, "data"), is_raw = k && !strcmp(k, "raw");

    if (!is_data && !is_raw)
        return luaL_error(L, "msg has no field '%s' (msg.data, msg.raw)",
                          k ? k : luaL_typename(L, 2));
    if (!m->live)
        return luaL_error(L, "msg.%s: msg is only valid during the on_publish call "
                             "that received it (copy what you need)", k);
    if (is_raw) {
        lua_pushlstring(L, m->raw, m->len);
        return 1;
    }
    if (!m->decoded) {
        lua_pushlstring(L, m->raw, m->len);
        hub_lua_decode(p, L, -1, "msg.data");
        lua_setiuservalue(L, 1, UV_DATA);
        m->decoded = 1;
    }
    lua_getiuservalue(L, 1, UV_DATA);
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
    struct lmsg *m = lua_newuserdatauv(p->L, sizeof(*m), UV__COUNT);
    memset(m, 0, sizeof(*m));
    luaL_setmetatable(p->L, MSG_MT);
}

void hub_lua_msg_begin(struct hub_policy *p, int msg, const char *data, size_t len)
{
    struct lmsg *m = lua_touserdata(p->L, msg);
    m->raw = data;
    m->len = len;
    m->live = 1;
    m->decoded = 0;
}

void hub_lua_msg_end(struct hub_policy *p, int msg)
{
    lua_State *L = p->L;
    struct lmsg *m = lua_touserdata(L, msg);

    m->live = 0;
    m->raw = NULL;
    if (m->decoded) {
        lua_pushnil(L);
        lua_setiuservalue(L, msg, UV_DATA);
        m->decoded = 0;
    }
    if (lua_getiuservalue(L, msg, UV_COPY) != LUA_TNIL) {
        lua_pushnil(L);
        lua_setiuservalue(L, msg, UV_COPY);
    }
    lua_pop(L, 1);
}

const char *hub_lua_msg_keep(struct hub_policy *p, int msg)
{
    lua_State *L = p->L;
    struct lmsg *m = lua_touserdata(L, msg);

    msg = lua_absindex(L, msg);
    lua_pushlstring(L, m->raw, m->len);
    m->raw = lua_tostring(L, -1);
    lua_setiuservalue(L, msg, UV_COPY);
    if (lua_rawequal(L, msg, HUB_LUA_MSG)) {
        hub_lua_new_msg(p);
        lua_replace(L, HUB_LUA_MSG);
    }
    return m->raw;
}

int hub_lua_is_msg(struct hub_policy *p, int msg, int idx)
{
    return lua_rawequal(p->L, idx, msg);
}

int hub_lua_msg_push_decoded(struct hub_policy *p, int msg)
{
    struct lmsg *m = lua_touserdata(p->L, msg);
    if (!m->decoded)
        return 0;
    lua_getiuservalue(p->L, msg, UV_DATA);
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
