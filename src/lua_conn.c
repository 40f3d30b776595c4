/* The conn object: a connection as the policy sees it.
 *
 * A conn object lives in the Lua state and points at the host's connection
 * (struct hub_policy_conn) while it is open; hub_lua_conn_gone() cuts that
 * link, after which only conn.id and conn.remote_addr can be read and
 * everything else raises "connection closed". What the methods do to the
 * connection goes through the host interface (policy.h). Objects are cached
 * through c->lua_ref, so a hook call costs a registry lookup, not an
 * allocation. An object made in on_connect (pending) is kept in a weak
 * table by connection id until the connection opens and a hook adopts it.
 *
 *   conn.id, conn.remote_addr                always (also once closed)
 *   conn.user, conn.info (read/assign)       from on_connect on, until closed
 *   conn.protocol (assign)                   in on_connect only
 *   conn:send/close/subscribe/unsubscribe    open connections; not in
 *                                            on_connect (not open yet), not
 *                                            for the connection of on_disconnect
 *   conn:channels()                          open connections, on_disconnect too */
#include "lua_api.h"

#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#define CONN_MT "conn"
#define USER_MAX 1024               /* bytes of conn.user */

enum { CONN_PENDING, CONN_OPEN, CONN_GONE };
enum { UV_ID = 1, UV_USER, UV_INFO, UV_ADDR, UV_PROTOCOL, UV__COUNT = UV_PROTOCOL };

struct lconn {
    struct hub_policy_conn *c;     /* CONN_OPEN only */
    uint64_t id;
    int state;
};

static struct lconn *new_conn_object(lua_State *L, uint64_t id, int state,
                                     const char *client_id, const char *addr)
{
    struct lconn *u = lua_newuserdatauv(L, sizeof(*u), UV__COUNT);
    u->c = NULL;
    u->id = id;
    u->state = state;
    luaL_setmetatable(L, CONN_MT);
    lua_pushstring(L, client_id);
    lua_setiuservalue(L, -2, UV_ID);
    lua_pushstring(L, addr);
    lua_setiuservalue(L, -2, UV_ADDR);
    return u;
}

void hub_lua_push_conn(struct hub_policy *p, struct hub_policy_conn *c)
{
    lua_State *L = p->L;
    struct lconn *u = NULL;

    if (c->lua_ref > 0) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, c->lua_ref);
        return;
    }
    if (p->npending) {
        /* the object on_connect saw, if the script kept it */
        lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_pending);
        lua_rawgeti(L, -1, (lua_Integer)c->id);
        u = lua_touserdata(L, -1);
        if (u) {
            lua_pushnil(L);
            lua_rawseti(L, -3, (lua_Integer)c->id);
            p->npending--;
        }
        lua_remove(L, -2);
        if (!u)
            lua_pop(L, 1);
    }
    if (!u) {
        char id[64], addr[64] = "";
        p->host.ops->conn_name(p->host.ud, c->id, id, sizeof(id));
        p->host.ops->conn_addr(p->host.ud, c, addr, sizeof(addr));
        u = new_conn_object(L, c->id, CONN_OPEN, id, addr);
    }
    u->c = c;
    u->state = CONN_OPEN;
    lua_pushvalue(L, -1);
    c->lua_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

void hub_lua_push_pending_conn(struct hub_policy *p, uint64_t id, const char *remote_addr)
{
    char client[64] = "";
    if (p->host.ops)
        p->host.ops->conn_name(p->host.ud, id, client, sizeof(client));
    new_conn_object(p->L, id, CONN_PENDING, client, remote_addr);
}

static char *dup_uservalue(lua_State *L, int idx, int n)
{
    char *s = NULL;
    if (lua_getiuservalue(L, idx, n) == LUA_TSTRING)
        s = hub_xstrdup(lua_tostring(L, -1));
    lua_pop(L, 1);
    return s;
}

void hub_lua_pending_done(struct hub_policy *p, int idx, int allowed,
                          struct hub_connect_result *res)
{
    lua_State *L = p->L;
    struct lconn *u = lua_touserdata(L, idx);

    idx = lua_absindex(L, idx);
    if (!allowed) {
        u->state = CONN_GONE;
        return;
    }
    res->user = dup_uservalue(L, idx, UV_USER);
    res->info_json = dup_uservalue(L, idx, UV_INFO);
    res->protocol = dup_uservalue(L, idx, UV_PROTOCOL);
    lua_pushnil(L);
    lua_setiuservalue(L, idx, UV_USER);
    lua_pushnil(L);
    lua_setiuservalue(L, idx, UV_INFO);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_pending);
    lua_pushvalue(L, idx);
    lua_rawseti(L, -2, (lua_Integer)u->id);
    lua_pop(L, 1);
    p->npending++;
}

void hub_lua_conn_gone(struct hub_policy *p, struct hub_policy_conn *c)
{
    lua_State *L = p->L;

    if (c->lua_ref > 0) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, c->lua_ref);
        struct lconn *u = lua_touserdata(L, -1);
        if (u) {
            u->c = NULL;
            u->state = CONN_GONE;
        }
        lua_pop(L, 1);
        luaL_unref(L, LUA_REGISTRYINDEX, c->lua_ref);
        c->lua_ref = 0;
        return;
    }
    if (p->npending) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_pending);
        lua_rawgeti(L, -1, (lua_Integer)c->id);
        struct lconn *u = lua_touserdata(L, -1);
        if (u) {
            u->state = CONN_GONE;
            lua_pushnil(L);
            lua_rawseti(L, -3, (lua_Integer)c->id);
            p->npending--;
        }
        lua_pop(L, 2);
    }
}

/* An object made in on_connect whose connection has opened since, but ran
 * no hook yet (that would have adopted it): bind it now. */
static void resolve_pending(lua_State *L, struct lconn *u, int idx)
{
    struct hub_policy *p = hub_lua_policy(L);

    if (u->state != CONN_PENDING || !p->host.ops ||
        (p->phase == HUB_HOOK_CONNECT && p->cur_conn_id == u->id))
        return;
    struct hub_policy_conn *c = p->host.ops->conn(p->host.ud, u->id);
    if (!c || c->lua_ref > 0)
        return;
    u->c = c;
    u->state = CONN_OPEN;
    lua_pushvalue(L, idx);
    c->lua_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_pending);
    lua_pushnil(L);
    lua_rawseti(L, -2, (lua_Integer)u->id);
    lua_pop(L, 1);
    if (p->npending)
        p->npending--;
}

/* The connection behind method `name` called on arg 1; raises unless it may
 * be used now. `acts`: the method acts on the connection (send, close,
 * subscribe, unsubscribe), which on_disconnect's own connection cannot. */
static struct hub_policy_conn *open_conn(lua_State *L, const char *name, int acts)
{
    struct lconn *u = luaL_checkudata(L, 1, CONN_MT);
    struct hub_policy *p = hub_lua_policy(L);

    resolve_pending(L, u, 1);
    if (u->state == CONN_GONE)
        luaL_error(L, "conn:%s: connection closed", name);
    if (u->state == CONN_PENDING)
        luaL_error(L, "conn:%s is not available in on_connect: the connection is not "
                      "open yet", name);
    if (acts && p->phase == HUB_HOOK_DISCONNECT && u->c == p->cur_conn)
        luaL_error(L, "conn:%s is not available in on_disconnect: the connection is "
                      "closed", name);
    return u->c;
}

static int conn_send(lua_State *L)
{
    struct hub_policy_conn *c = open_conn(L, "send", 1);
    size_t n;
    luaL_checkany(L, 2);
    hub_lua_encode(hub_lua_policy(L), L, 2, "conn:send: data");
    const char *s = lua_tolstring(L, -1, &n);
    hub_sandbox_charge(hub_lua_policy(L), L, 16 + (int64_t)(n / HUB_COST_COPY));
    const struct hub_policy_host *h = &hub_lua_policy(L)->host;
    if (h->ops->conn_closing(h->ud, c)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    h->ops->conn_send(h->ud, c, s, n);
    lua_pushboolean(L, 1);
    return 1;
}

static int conn_close(lua_State *L)
{
    struct hub_policy_conn *c = open_conn(L, "close", 1);
    lua_Integer code = luaL_optinteger(L, 2, 1000);
    size_t n = 0;
    const char *reason = luaL_optlstring(L, 3, "", &n);
    if (code != 1000 && (code < 3000 || code > 4999))
        luaL_error(L, "conn:close: code %d is not allowed (1000, or 3000 to 4999)",
                   (int)code);
    if (n > 123)
        luaL_error(L, "conn:close: the reason is %d bytes (at most 123)", (int)n);
    if (memchr(reason, '\0', n))
        luaL_error(L, "conn:close: the reason contains a NUL byte");
    const struct hub_policy_host *h = &hub_lua_policy(L)->host;
    if (h->ops->conn_closing(h->ud, c)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    h->ops->conn_close(h->ud, c, (unsigned)code, reason);
    lua_pushboolean(L, 1);
    return 1;
}

static int conn_subscribe(lua_State *L)
{
    struct hub_policy_conn *c = open_conn(L, "subscribe", 1);
    size_t len;
    const char *ch = hub_lua_check_channel(L, 2, "conn:subscribe", &len);
    const struct hub_policy_host *h = &hub_lua_policy(L)->host;
    int r = h->ops->conn_subscribe(h->ud, c, ch, len);
    if (r < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "at most %d channels per connection (max_channels_per_conn)",
                        (int)h->cfg->max_channels_per_conn);
        return 2;
    }
    lua_pushboolean(L, r == 1);
    return 1;
}

static int conn_unsubscribe(lua_State *L)
{
    struct hub_policy_conn *c = open_conn(L, "unsubscribe", 1);
    size_t len;
    const char *ch = hub_lua_check_channel(L, 2, "conn:unsubscribe", &len);
    const struct hub_policy_host *h = &hub_lua_policy(L)->host;
    lua_pushboolean(L, h->ops->conn_unsubscribe(h->ud, c, ch, len) == 0);
    return 1;
}

struct channels_arg {
    lua_State *L;
    lua_Integer i;
};

static void push_channel(void *arg, const char *ch, size_t len)
{
    struct channels_arg *a = arg;
    lua_pushlstring(a->L, ch, len);
    lua_rawseti(a->L, -2, ++a->i);
}

static int conn_channels(lua_State *L)
{
    struct hub_policy_conn *c = open_conn(L, "channels", 0);
    const struct hub_policy_host *h = &hub_lua_policy(L)->host;
    struct channels_arg a = {L, 0};
    lua_newtable(L);
    h->ops->conn_channels(h->ud, c, push_channel, &a);
    return 1;
}

static int conn_index(lua_State *L)
{
    struct lconn *u = luaL_checkudata(L, 1, CONN_MT);
    struct hub_policy *p = hub_lua_policy(L);
    const char *k = lua_tostring(L, 2);

    if (!k)
        return luaL_error(L, "conn has no field of type %s", luaL_typename(L, 2));
    resolve_pending(L, u, 1);
    switch (k[0]) {
    case 'i':
        if (!strcmp(k, "id")) {
            lua_getiuservalue(L, 1, UV_ID);
            return 1;
        }
        if (!strcmp(k, "info")) {
            if (u->state == CONN_GONE)
                return luaL_error(L, "conn.info: connection closed");
            if (u->state == CONN_PENDING) {
                if (lua_getiuservalue(L, 1, UV_INFO) != LUA_TSTRING)
                    return 1;
            } else if (u->c->info_json) {
                lua_pushstring(L, u->c->info_json);
            } else {
                lua_pushnil(L);
                return 1;
            }
            hub_lua_decode(p, L, -1, "conn.info");
            return 1;
        }
        break;
    case 'u':
        if (!strcmp(k, "user")) {
            if (u->state == CONN_GONE)
                return luaL_error(L, "conn.user: connection closed");
            if (u->state == CONN_PENDING)
                lua_getiuservalue(L, 1, UV_USER);
            else if (u->c->user)
                lua_pushstring(L, u->c->user);
            else
                lua_pushnil(L);
            return 1;
        }
        if (!strcmp(k, "unsubscribe")) {
            lua_pushcfunction(L, conn_unsubscribe);
            return 1;
        }
        break;
    case 'r':
        if (!strcmp(k, "remote_addr")) {
            lua_getiuservalue(L, 1, UV_ADDR);
            return 1;
        }
        break;
    case 'p':
        if (!strcmp(k, "protocol")) {
            if (u->state == CONN_PENDING)
                lua_getiuservalue(L, 1, UV_PROTOCOL);
            else if (u->state == CONN_OPEN && u->c->protocol)
                lua_pushstring(L, u->c->protocol);
            else
                lua_pushnil(L);
            return 1;
        }
        break;
    case 's':
        if (!strcmp(k, "send")) {
            lua_pushcfunction(L, conn_send);
            return 1;
        }
        if (!strcmp(k, "subscribe")) {
            lua_pushcfunction(L, conn_subscribe);
            return 1;
        }
        break;
    case 'c':
        if (!strcmp(k, "close")) {
            lua_pushcfunction(L, conn_close);
            return 1;
        }
        if (!strcmp(k, "channels")) {
            lua_pushcfunction(L, conn_channels);
            return 1;
        }
        break;
    }
    return luaL_error(L, "conn has no field '%s' (fields: id, user, info, remote_addr, "
                         "protocol; methods: send, close, subscribe, unsubscribe, channels)", k);
}

static int conn_newindex(lua_State *L)
{
    struct lconn *u = luaL_checkudata(L, 1, CONN_MT);
    struct hub_policy *p = hub_lua_policy(L);
    const char *k = lua_tostring(L, 2);
    int is_user = k && !strcmp(k, "user"), is_info = k && !strcmp(k, "info");
    char *val = NULL;

    if (k && !strcmp(k, "protocol")) {
        /* The subprotocol to echo: only in on_connect, one of req.protocols
         * (checked when the hook returns). */
        resolve_pending(L, u, 1);
        if (u->state != CONN_PENDING || p->phase != HUB_HOOK_CONNECT || p->cur_conn_id != u->id)
            return luaL_error(L, "conn.protocol can be set in on_connect only");
        if (!lua_isnil(L, 3) && lua_type(L, 3) != LUA_TSTRING)
            return luaL_error(L, "conn.protocol must be a string (one of req.protocols) or "
                                 "nil (got %s)", luaL_typename(L, 3));
        lua_settop(L, 3);
        lua_setiuservalue(L, 1, UV_PROTOCOL);
        return 0;
    }
    if (!is_user && !is_info)
        return luaL_error(L, "conn.%s cannot be set (only conn.user, conn.info and, in "
                             "on_connect, conn.protocol can)", k ? k : luaL_typename(L, 2));
    resolve_pending(L, u, 1);
    if (u->state == CONN_GONE)
        return luaL_error(L, "conn.%s: connection closed", k);
    if (u->state == CONN_PENDING &&
        !(p->phase == HUB_HOOK_CONNECT && p->cur_conn_id == u->id))
        return luaL_error(L, "conn.%s cannot be set: the connection is not open yet", k);

    if (is_user) {
        if (!lua_isnil(L, 3)) {
            size_t n;
            if (lua_type(L, 3) != LUA_TSTRING)
                return luaL_error(L, "conn.user must be a string or nil (got %s)",
                                  luaL_typename(L, 3));
            const char *s = lua_tolstring(L, 3, &n);
            if (n == 0 || n > USER_MAX || memchr(s, '\0', n))
                return luaL_error(L, "conn.user must be 1 to %d bytes with no NUL",
                                  USER_MAX);
        }
        lua_settop(L, 3);
    } else {
        if (!lua_isnil(L, 3)) {
            if (!lua_istable(L, 3))
                return luaL_error(L, "conn.info must be a table or nil (got %s)",
                                  luaL_typename(L, 3));
            hub_lua_encode(p, L, 3, "conn.info");
        } else {
            lua_settop(L, 3);
        }
    }
    /* the value to store is on top: a string, or nil */
    if (u->state == CONN_PENDING) {
        lua_setiuservalue(L, 1, is_user ? UV_USER : UV_INFO);
        return 0;
    }
    if (!lua_isnil(L, -1))
        val = hub_xstrdup(lua_tostring(L, -1));
    if (is_user) {
        free(u->c->user);
        u->c->user = val;
    } else {
        free(u->c->info_json);
        u->c->info_json = val;
    }
    return 0;
}

static int conn_tostring(lua_State *L)
{
    struct lconn *u = luaL_checkudata(L, 1, CONN_MT);
    lua_getiuservalue(L, 1, UV_ID);
    lua_pushfstring(L, "conn %s%s", lua_tostring(L, -1),
                    u->state == CONN_GONE ? " (closed)" : "");
    return 1;
}

static int conn_eq(lua_State *L)
{
    struct lconn *a = luaL_testudata(L, 1, CONN_MT), *b = luaL_testudata(L, 2, CONN_MT);
    lua_pushboolean(L, a && b && a->id == b->id);
    return 1;
}

void hub_lua_conn_open(lua_State *L)
{
    static const luaL_Reg conn_mt[] = {
        {"__index", conn_index},
        {"__newindex", conn_newindex},
        {"__tostring", conn_tostring},
        {"__eq", conn_eq},
        {NULL, NULL},
    };

    hub_lua_new_metatable(L, CONN_MT, conn_mt);
}
