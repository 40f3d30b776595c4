/* JSON for the policy: hub.json.encode/decode/array and the encoder every
 * other API uses (hub.publish, conn:send, conn.info, hook results), over
 * lua-cjson (linked). Called from Lua inside the protected calls of
 * policy_call.c, so everything here may raise. */
#include "lua_api.h"

#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "luahub/proto.h"

#define JSON_DEPTH_MAX 1000         /* cjson's own encode limit */

/* cjson grows its output buffer with malloc, outside the Lua memory cap, and
 * aborts the process when that fails; a table that refers to the same big
 * string many times would make it do so. So walk the value first and refuse
 * when its encoding would not fit in the state anyway. The walk is charged
 * to the instruction budget (one instruction per value). */
struct guard {
    struct hub_policy *p;
    size_t limit, acc;
    unsigned visits;
    int deep;
    int fix;                /* stack index of the fix-up list (see array_fixups) */
    int nfix;
    int reserved;           /* a string equal to ARRAY_MARK was met */
};

/* cjson 2.1.0 writes every empty table as {}. An empty table marked by
 * hub.json.array is swapped, during the encode, for this string, whose
 * encoding ("\u0001...") then becomes [] in the text; the table goes
 * back in place right after. */
#define ARRAY_MARK "\001luahub.json.array\001"
#define ARRAY_MARK_JSON "\"\\u0001luahub.json.array\\u0001\""

/* 1 if the value at idx is an empty table marked by hub.json.array. */
static int empty_array(struct hub_policy *p, lua_State *L, int idx)
{
    if (lua_type(L, idx) != LUA_TTABLE || !lua_getmetatable(L, idx))
        return 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_array_mt);
    int marked = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (!marked)
        return 0;
    lua_pushnil(L);
    if (lua_next(L, idx)) {
        lua_pop(L, 2);
        return 0;
    }
    return 1;
}

static void guard_walk(lua_State *L, struct guard *g, int idx, int depth)
{
    if ((++g->visits & 1023) == 0)
        hub_sandbox_charge(g->p, L, 1024);
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        g->acc += lua_rawlen(L, idx) + 2;
        if (lua_rawlen(L, idx) == sizeof(ARRAY_MARK) - 1 &&
            !memcmp(lua_tostring(L, idx), ARRAY_MARK, sizeof(ARRAY_MARK) - 1))
            g->reserved = 1;
        break;
    case LUA_TTABLE:
        if (depth >= JSON_DEPTH_MAX || !lua_checkstack(L, 4)) {
            g->deep = 1; /* cjson raises its own "excessive nesting" */
            return;
        }
        g->acc += 2;
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            int top = lua_gettop(L);
            g->acc += 2;
            guard_walk(L, g, top - 1, depth + 1);
            guard_walk(L, g, top, depth + 1);
            if (empty_array(g->p, L, top)) {
                /* (table, key, value) to swap, appended to the list */
                lua_pushvalue(L, idx);
                lua_rawseti(L, g->fix, ++g->nfix);
                lua_pushvalue(L, top - 1);
                lua_rawseti(L, g->fix, ++g->nfix);
                lua_pushvalue(L, top);
                lua_rawseti(L, g->fix, ++g->nfix);
            }
            lua_pop(L, 1);
            if (g->deep || g->acc > g->limit) {
                lua_pop(L, 1);
                return;
            }
        }
        break;
    default:
        g->acc += 24;
        break;
    }
}

/* Puts the marked empty tables of the fix-up list at `fix` back (`back`)
 * or swaps them for ARRAY_MARK. */
static void array_fixups(lua_State *L, int fix, int n, int back)
{
    for (int i = 1; i + 2 <= n; i += 3) {
        lua_rawgeti(L, fix, i);
        lua_rawgeti(L, fix, i + 1);
        if (back)
            lua_rawgeti(L, fix, i + 2);
        else
            lua_pushliteral(L, ARRAY_MARK);
        lua_rawset(L, -3);
        lua_pop(L, 1);
    }
}

/* The encoded text on top with every ARRAY_MARK_JSON written as []. */
static void array_unmark(struct hub_policy *p, lua_State *L)
{
    size_t n, ml = sizeof(ARRAY_MARK_JSON) - 1;
    const char *s = lua_tolstring(L, -1, &n), *q;
    luaL_Buffer b;
    hub_sandbox_charge(p, L, (int64_t)(n / HUB_COST_JSON) + 1);
    luaL_buffinit(L, &b);
    while ((q = memmem(s, n, ARRAY_MARK_JSON, ml))) {
        luaL_addlstring(&b, s, (size_t)(q - s));
        luaL_addlstring(&b, "[]", 2);
        n -= (size_t)(q - s) + ml;
        s = q + ml;
    }
    luaL_addlstring(&b, s, n);
    luaL_pushresult(&b);
    lua_remove(L, -2);
}

void hub_lua_encode(struct hub_policy *p, lua_State *L, int idx, const char *what)
{
    struct guard g = {p, p->lim.mem_max / 2, 0, 0, 0, 0, 0, 0};
    size_t n;

    idx = lua_absindex(L, idx);
    if (empty_array(p, L, idx)) {
        lua_pushliteral(L, "[]");
        return;
    }
    lua_newtable(L);
    g.fix = lua_gettop(L);
    guard_walk(L, &g, idx, 0);
    if (!g.deep && g.acc > g.limit)
        luaL_error(L, "%s is too large to encode as JSON (about %I bytes; "
                      "lua_max_memory is %I)", what, (lua_Integer)g.acc,
                   (lua_Integer)p->lim.mem_max);
    if (g.reserved && g.nfix)
        luaL_error(L, "%s holds the string hub.json.array uses internally", what);
    hub_sandbox_charge(p, L, (int64_t)(g.acc / HUB_COST_JSON));
    array_fixups(L, g.fix, g.nfix, 0);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_encode);
    lua_pushvalue(L, idx);
    int st = lua_pcall(L, 1, 1, 0);
    array_fixups(L, g.fix, g.nfix, 1);
    lua_remove(L, g.fix);
    if (st != LUA_OK) {
        if (st == LUA_ERRMEM) {
            p->mem_failed = 1;
            lua_error(L);
        }
        luaL_error(L, "%s is not JSON-serialisable: %s", what,
                   lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "?");
    }
    if (g.nfix)
        array_unmark(p, L);
    const char *s = lua_tolstring(L, -1, &n);
    if (!hub_proto_json_valid(s, n))
        luaL_error(L, "%s: its JSON encoding is not valid (a string that is not "
                      "UTF-8?)", what);
}

int hub_lua_json_array(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    if (lua_getmetatable(L, 1)) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_array_mt);
        if (!lua_rawequal(L, -1, -2))
            return luaL_error(L, "hub.json.array: the table already has a metatable");
        lua_settop(L, 1);
        return 1;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_array_mt);
    lua_setmetatable(L, 1);
    return 1;
}

void hub_lua_decode(struct hub_policy *p, lua_State *L, int idx, const char *what)
{
    idx = lua_absindex(L, idx);
    hub_sandbox_charge(p, L, (int64_t)(lua_rawlen(L, idx) / HUB_COST_JSON) + 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_decode);
    lua_pushvalue(L, idx);
    lua_call(L, 1, 2);
    if (lua_isnil(L, -2) && lua_type(L, -1) == LUA_TSTRING)
        luaL_error(L, "%s: cannot decode JSON: %s", what, lua_tostring(L, -1));
    lua_pop(L, 1);
}

int hub_lua_json_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    hub_lua_encode(hub_lua_policy(L), L, 1, "hub.json.encode: the value");
    return 1;
}

int hub_lua_json_decode(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    size_t n;
    luaL_checklstring(L, 1, &n);
    lua_settop(L, 1);
    hub_sandbox_charge(p, L, (int64_t)(n / HUB_COST_JSON) + 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_decode);
    lua_pushvalue(L, 1);
    lua_call(L, 1, LUA_MULTRET);
    return lua_gettop(L) - 1;
}
