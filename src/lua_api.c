/* The API a policy sees: the `hub` module, the `conn` and `msg` objects,
 * timers, JSON (lua-cjson, linked) and HMAC/JWT (OpenSSL's libcrypto).
 *
 * Every function here is called from Lua, inside a protected call made by
 * policy.c, so it may raise. Each one checks its arguments before touching
 * a C resource and refuses clearly when the phase does not allow it:
 *
 *   hub.publish, hub.subscribers, hub.conn   hooks and timers (not at load)
 *   hub.after                                load, hooks, timers (load: starts
 *                                            once the policy is in service)
 *   hub.log, hub.now, hub.json.*, hub.hmac_sha256, hub.jwt_verify   anywhere
 *   conn.id, conn.remote_addr                always (also once closed)
 *   conn.user, conn.info (read/assign)       from on_connect on, until closed
 *   conn:send/close/subscribe/unsubscribe    open connections; not in
 *                                            on_connect (not open yet), not
 *                                            for the connection of on_disconnect
 *   conn:channels()                          open connections, on_disconnect too
 *
 * A conn object lives in the Lua state and points at the host's connection
 * (struct hub_policy_conn) while it is open; hub_lua_conn_gone() cuts that
 * link, after which only conn.id and conn.remote_addr can be read and
 * everything else raises "connection closed". What the methods do to the
 * connection goes through the host interface (policy.h). Objects are cached
 * through c->lua_ref, so a hook call costs a registry lookup, not an
 * allocation. */
#include "lua_api.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <uv.h>

#include "luahub/log.h"
#include "luahub/proto.h"

#define CONN_MT "conn"
#define MSG_MT "msg"
#define TIMER_MT "timer"

#define USER_MAX 1024               /* bytes of conn.user */
#define LOG_MAX 4000                /* bytes of one hub.log line */
#define TIMERS_MAX 65536            /* hub.after timers pending or being released */
#define TIMER_MAX_S (366.0 * 86400) /* longest hub.after delay */
#define TIMER_MIN_MS 1              /* shortest hub.after delay (see l_after) */
#define TIMER_MIN_COST 1000         /* instructions a timer callback counts at least */
#define JWT_MAX 16384               /* bytes of a token */
#define JWT_LEEWAY_MAX (366 * 86400) /* seconds */
#define JSON_DEPTH_MAX 1000         /* cjson's own encode limit */

static struct hub_policy *policy_of(lua_State *L)
{
    return *(struct hub_policy **)lua_getextraspace(L);
}

static const char *CHANNEL_RULE =
    "a channel name is 1 to 255 bytes of A-Z a-z 0-9 and _ : . @ / = # -";

static const char *check_channel(lua_State *L, int arg, const char *fn, size_t *len)
{
    const char *s = luaL_checklstring(L, arg, len);
    if (!hub_proto_channel_valid(s, *len))
        luaL_error(L, "%s: invalid channel name '%s': %s", fn, s, CHANNEL_RULE);
    return s;
}

/* hub.publish & co need the running hub: not while the policy loads (and
 * there is no hub at all in --check). */
static const struct hub_policy_host *need_host(lua_State *L, const char *fn)
{
    struct hub_policy *p = policy_of(L);
    if (!p->host.ops || p->phase == HUB_PHASE_LOAD)
        luaL_error(L, "%s is not available while the policy loads: call it from a "
                      "hook or a timer", fn);
    return &p->host;
}

/* ---- JSON ---------------------------------------------------------------- */

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

/* hub.json.array([t]): t (or a new table) marked to encode as a JSON
 * array even when empty. */
static int l_json_array(lua_State *L)
{
    struct hub_policy *p = policy_of(L);
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

/* Decodes the string at `idx` with cjson.safe; pushes the value, or raises
 * "<what>: <cjson's message>". */
static void decode(struct hub_policy *p, lua_State *L, int idx, const char *what)
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

static int l_json_encode(lua_State *L)
{
    luaL_checkany(L, 1);
    hub_lua_encode(policy_of(L), L, 1, "hub.json.encode: the value");
    return 1;
}

/* cjson.safe semantics: nil, message on bad input. */
static int l_json_decode(lua_State *L)
{
    struct hub_policy *p = policy_of(L);
    size_t n;
    luaL_checklstring(L, 1, &n);
    lua_settop(L, 1);
    hub_sandbox_charge(p, L, (int64_t)(n / HUB_COST_JSON) + 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_decode);
    lua_pushvalue(L, 1);
    lua_call(L, 1, LUA_MULTRET);
    return lua_gettop(L) - 1;
}

/* ---- hub.* --------------------------------------------------------------- */

static int l_publish(lua_State *L)
{
    const struct hub_policy_host *h = need_host(L, "hub.publish");
    size_t clen, dlen;
    const char *ch = check_channel(L, 1, "hub.publish", &clen);
    luaL_checkany(L, 2);
    hub_lua_encode(policy_of(L), L, 2, "hub.publish: data");
    /* a delivery per local subscriber */
    hub_sandbox_charge(policy_of(L), L, 16 + (int64_t)h->ops->subscribers(h->ud, ch, clen));
    const char *data = lua_tolstring(L, -1, &dlen);
    size_t n = h->ops->publish(h->ud, ch, clen, data, dlen);
    lua_pushinteger(L, (lua_Integer)n);
    return 1;
}

static int l_subscribers(lua_State *L)
{
    const struct hub_policy_host *h = need_host(L, "hub.subscribers");
    size_t len;
    const char *ch = check_channel(L, 1, "hub.subscribers", &len);
    lua_pushinteger(L, (lua_Integer)h->ops->subscribers(h->ud, ch, len));
    return 1;
}

/* hub.presence(channel): {clients = N, users = M} of this process. */
static int l_presence(lua_State *L)
{
    const struct hub_policy_host *h = need_host(L, "hub.presence");
    size_t clen;
    uint64_t clients, users;
    const char *ch = check_channel(L, 1, "hub.presence", &clen);
    hub_sandbox_charge(policy_of(L), L, 16 + (int64_t)h->ops->subscribers(h->ud, ch, clen));
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
        hub_lua_push_conn(policy_of(L), c);
    return 1;
}

static int l_log(lua_State *L)
{
    struct hub_policy *p = policy_of(L);
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

static int l_now(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec * 1000.0 + (lua_Number)ts.tv_nsec / 1e6);
    return 1;
}

/* ---- crypto -------------------------------------------------------------- */

static void hex(const unsigned char *p, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[p[i] >> 4];
        out[2 * i + 1] = digits[p[i] & 15];
    }
    out[2 * n] = '\0';
}

static int hmac256(const char *key, size_t klen, const char *text, size_t tlen,
                   unsigned char out[32])
{
    unsigned int olen = 0;
    if (klen > INT32_MAX)
        return -1;
    if (!HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)text, tlen, out,
              &olen) || olen != 32)
        return -1;
    return 0;
}

static int l_hmac_sha256(lua_State *L)
{
    size_t klen, tlen;
    const char *key = luaL_checklstring(L, 1, &klen);
    const char *text = luaL_checklstring(L, 2, &tlen);
    unsigned char md[32];
    char out[65];
    hub_sandbox_charge(policy_of(L), L, 64 + (int64_t)((klen + tlen) / HUB_COST_SCAN));
    if (hmac256(key, klen, text, tlen, md) < 0)
        luaL_error(L, "hub.hmac_sha256: HMAC failed");
    hex(md, sizeof(md), out);
    lua_pushlstring(L, out, 64);
    return 1;
}

static int b64url_val(unsigned char ch)
{
    if (ch >= 'A' && ch <= 'Z')
        return ch - 'A';
    if (ch >= 'a' && ch <= 'z')
        return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9')
        return ch - '0' + 52;
    if (ch == '-')
        return 62;
    if (ch == '_')
        return 63;
    return -1;
}

/* Decodes unpadded base64url (RFC 7515 §2; trailing '=' tolerated) into
 * `out` (at least len * 3 / 4 + 1 bytes). Returns the length or -1. */
static long b64url_decode(const char *s, size_t len, unsigned char *out)
{
    while (len && s[len - 1] == '=')
        len--;
    if (len % 4 == 1)
        return -1;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64url_val((unsigned char)s[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    /* the bits left over must be zero (canonical encoding) */
    if (bits && (acc & ((1u << bits) - 1)))
        return -1;
    return (long)o;
}

static int fail2(lua_State *L, const char *why)
{
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
}

/* Decodes the base64url JSON object s[0..len) and pushes it (as a table);
 * returns 0, or -1 with nothing pushed. An array, a string, a number or
 * null is not an object (cjson decodes [] to a table as well: the text
 * decides). */
static int jwt_part(struct hub_policy *p, lua_State *L, const char *s, size_t len)
{
    unsigned char *buf = lua_newuserdatauv(L, len + 1, 0);
    long n = b64url_decode(s, len, buf);
    long i = 0;
    while (i < n && (buf[i] == ' ' || buf[i] == '\t' || buf[i] == '\n' || buf[i] == '\r'))
        i++;
    if (n < 0 || i == n || buf[i] != '{') {
        lua_pop(L, 1);
        return -1;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_decode);
    lua_pushlstring(L, (const char *)buf, (size_t)n);
    lua_call(L, 1, 1);
    lua_remove(L, -2);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return -1;
    }
    return 0;
}

/* Claim `name` of the table at `t`: 0 if absent, 1 with a finite number in
 * *out, -1 if it is not a number, -2 if it is NaN or infinite (cjson
 * decodes NaN and Infinity). */
static int claim_number(lua_State *L, int t, const char *name, double *out)
{
    lua_getfield(L, t, name);
    int type = lua_type(L, -1), r = 0;
    if (type == LUA_TNUMBER) {
        *out = lua_tonumber(L, -1);
        r = isfinite(*out) ? 1 : -2;
    } else if (type != LUA_TNIL) {
        r = -1;
    }
    lua_pop(L, 1);
    return r;
}

/* Pushes "unsupported alg '<alg>' (only HS256)" with the bytes of alg that
 * are not printable ASCII shown as '?' (it may hold a NUL). */
static int unsupported_alg(lua_State *L, const char *alg, size_t len)
{
    char show[40];
    size_t n = len < sizeof(show) - 1 ? len : sizeof(show) - 1;
    for (size_t i = 0; i < n; i++)
        show[i] = alg[i] >= 0x20 && alg[i] < 0x7f ? alg[i] : '?';
    show[n] = '\0';
    lua_pushnil(L);
    lua_pushfstring(L, "unsupported alg '%s%s' (only HS256)", show, n < len ? "..." : "");
    return 2;
}

/* hub.jwt_verify(token, secret [, leeway]): HS256 only. Checks the
 * signature (constant time) before reading the claims, then exp and nbf
 * (seconds since the epoch, with `leeway` seconds of clock skew allowed). */
static int l_jwt_verify(lua_State *L)
{
    struct hub_policy *p = policy_of(L);
    size_t tlen, slen;
    const char *secret = luaL_checklstring(L, 2, &slen);
    double leeway = luaL_optnumber(L, 3, 0);
    if (slen == 0)
        luaL_error(L, "hub.jwt_verify: the secret is empty");
    /* NaN or infinity would make every exp and nbf comparison pass */
    if (!(leeway >= 0 && leeway <= JWT_LEEWAY_MAX))
        luaL_error(L, "hub.jwt_verify: leeway must be 0 to %d seconds (got %s)",
                   JWT_LEEWAY_MAX, lua_tostring(L, 3));
    if (lua_type(L, 1) != LUA_TSTRING)
        return fail2(L, "no token");
    const char *tok = lua_tolstring(L, 1, &tlen);
    if (tlen > JWT_MAX)
        return fail2(L, "token too long");
    /* base64, HMAC and JSON over the token */
    hub_sandbox_charge(p, L, 256 + (int64_t)(tlen / HUB_COST_JSON) + (int64_t)slen);

    const char *d1 = memchr(tok, '.', tlen);
    const char *d2 = d1 ? memchr(d1 + 1, '.', tlen - (size_t)(d1 + 1 - tok)) : NULL;
    if (!d1 || !d2 || memchr(d2 + 1, '.', tlen - (size_t)(d2 + 1 - tok)))
        return fail2(L, "malformed token: expected header.payload.signature");
    size_t hlen = (size_t)(d1 - tok), plen = (size_t)(d2 - d1 - 1);
    size_t siglen = tlen - (size_t)(d2 + 1 - tok);

    if (jwt_part(p, L, tok, hlen) < 0)
        return fail2(L, "malformed token: the header is not a base64url JSON object");
    lua_getfield(L, -1, "alg");
    if (lua_type(L, -1) != LUA_TSTRING)
        return fail2(L, "malformed token: the header has no alg");
    /* exactly these 5 bytes: a Lua string may hold a NUL ("HS256\u0000x") */
    size_t alen;
    const char *alg = lua_tolstring(L, -1, &alen);
    if (alen != 5 || memcmp(alg, "HS256", 5) != 0)
        return unsupported_alg(L, alg, alen);
    lua_pop(L, 2);

    unsigned char want[32], got[JWT_MAX];
    if (hmac256(secret, slen, tok, (size_t)(d2 - tok), want) < 0)
        luaL_error(L, "hub.jwt_verify: HMAC failed");
    long n = b64url_decode(d2 + 1, siglen, got);
    if (n != 32 || CRYPTO_memcmp(want, got, 32) != 0)
        return fail2(L, "bad signature");

    if (jwt_part(p, L, d1 + 1, plen) < 0)
        return fail2(L, "malformed token: the payload is not a base64url JSON object");
    int claims = lua_gettop(L);

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double now = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9, exp, nbf;
    int r = claim_number(L, claims, "exp", &exp);
    if (r == -1)
        return fail2(L, "claim exp is not a number");
    if (r == -2)
        return fail2(L, "claim exp is not a finite number");
    if (r > 0 && now >= exp + leeway)
        return fail2(L, "token expired");
    r = claim_number(L, claims, "nbf", &nbf);
    if (r == -1)
        return fail2(L, "claim nbf is not a number");
    if (r == -2)
        return fail2(L, "claim nbf is not a finite number");
    if (r > 0 && now + leeway < nbf)
        return fail2(L, "token not valid yet (nbf)");
    lua_settop(L, claims);
    return 1;
}

/* ---- timers -------------------------------------------------------------- */

struct hub_ptimer {
    uv_timer_t t;                   /* first: the handle is the allocation */
    struct hub_policy *p;
    struct hub_ptimer *prev, *next;
    int fn_ref, obj_ref;
    uint64_t ms;
    int started;
};

struct ltimer {
    struct hub_ptimer *t;           /* NULL once fired or cancelled */
};

/* Timer handles closed but not freed yet: their close callbacks run when
 * the loop next turns. Process-wide (one loop per process); counted in
 * TIMERS_MAX so that what is allocated outside the Lua state stays bounded
 * even before the loop turns. */
static unsigned timers_closing;

static void free_timer(uv_handle_t *h)
{
    timers_closing--;
    free(h); /* h is &t->t, the start of the allocation */
}

/* Unlinks `t` from its policy, drops its Lua refs and closes the handle
 * (freed in the close callback) or frees it if it never started. */
static void detach_timer(struct hub_ptimer *t)
{
    struct hub_policy *p = t->p;
    lua_State *L = p->L;

    if (t->prev)
        t->prev->next = t->next;
    else
        p->timers = t->next;
    if (t->next)
        t->next->prev = t->prev;
    p->ntimers--;
    p->lim.mem_used -= sizeof(*t); /* charged to lua_max_memory while pending */
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->obj_ref);
    struct ltimer *u = lua_touserdata(L, -1);
    if (u)
        u->t = NULL;
    lua_pop(L, 1);
    luaL_unref(L, LUA_REGISTRYINDEX, t->obj_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->fn_ref);
    t->p = NULL;
    if (t->started) {
        timers_closing++;
        uv_close((uv_handle_t *)&t->t, free_timer);
    } else {
        free(t);
    }
}

/* Timer callbacks due in one loop iteration share one budget: once they
 * have used lua_max_instructions together (each counts at least
 * TIMER_MIN_COST), the rest wait for a later iteration, so that a burst of
 * timers (a callback may arm thousands) cannot keep the loop from its I/O
 * for more than about one hook's budget. An iteration is told by the
 * loop's cached time, which only moves between iterations. */
static int timer_pass_full(struct hub_policy *p, uv_loop_t *loop)
{
    uint64_t now = uv_now(loop);
    if (now != p->timer_pass_ms) {
        p->timer_pass_ms = now;
        p->timer_pass_used = 0;
    }
    return p->timer_pass_used >= p->lim.budget;
}

static void on_timer(uv_timer_t *h)
{
    struct hub_ptimer *t = (struct hub_ptimer *)h;
    struct hub_policy *p = t->p;
    lua_State *L = p->L;

    if (timer_pass_full(p, h->loop)) {
        uv_timer_start(&t->t, on_timer, TIMER_MIN_MS, 0);
        return;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->fn_ref);
    detach_timer(t);
    if (hub_policy_pcall(p, HUB_PHASE_TIMER, NULL, 0, 0, 0) == 0)
        lua_settop(L, HUB_LUA_BASE);
    int64_t used = p->lim.budget - p->lim.budget_left;
    p->timer_pass_used += used > TIMER_MIN_COST ? used : TIMER_MIN_COST;
}

static void start_timer(struct hub_policy *p, struct hub_ptimer *t)
{
    uv_timer_init(p->host.loop, &t->t);
    uv_timer_start(&t->t, on_timer, t->ms, 0);
    /* Pending policy timers do not keep the loop (and a shutdown) waiting. */
    uv_unref((uv_handle_t *)&t->t);
    t->started = 1;
}

void hub_lua_timers_start(struct hub_policy *p)
{
    p->in_service = 1;
    for (struct hub_ptimer *t = p->timers; t; t = t->next)
        if (!t->started)
            start_timer(p, t);
}

void hub_lua_timers_close(struct hub_policy *p)
{
    while (p->timers)
        detach_timer(p->timers);
    p->in_service = 0;
}

static int l_after(lua_State *L)
{
    struct hub_policy *p = policy_of(L);
    lua_Number s = luaL_checknumber(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (!(s >= 0 && s <= TIMER_MAX_S))
        luaL_error(L, "hub.after: the delay must be 0 to %d seconds", (int)TIMER_MAX_S);
    if (p->host.ops && p->host.ops->shutting_down(p->host.ud))
        luaL_error(L, "hub.after: the hub is shutting down");
    if (p->ntimers + timers_closing >= TIMERS_MAX)
        luaL_error(L, "hub.after: too many timers (%d pending or being released)",
                   TIMERS_MAX);
    /* the C side of a timer counts against lua_max_memory */
    if (p->lim.cap_on && p->lim.mem_used + sizeof(struct hub_ptimer) > p->lim.mem_max)
        hub_sandbox_oom(p, L);

    struct ltimer *u = lua_newuserdatauv(L, sizeof(*u), 0);
    u->t = NULL;
    luaL_setmetatable(L, TIMER_MT);
    struct hub_ptimer *t = hub_xcalloc(1, sizeof(*t));
    p->lim.mem_used += sizeof(*t);
    t->t.data = t;
    t->p = p;
    /* At least 1 ms: libuv 1.44 runs a timer of timeout 0 armed from a timer
     * callback in the same pass over the timers (docs/internals.md), so a
     * callback re-arming itself with hub.after(0, f) would never let the
     * loop reach its I/O. 1 ms is due at the next iteration at the earliest. */
    t->ms = (uint64_t)llround(s * 1000.0);
    if (t->ms < TIMER_MIN_MS)
        t->ms = TIMER_MIN_MS;
    lua_pushvalue(L, 2);
    t->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -1);
    t->obj_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    u->t = t;
    t->next = p->timers;
    if (p->timers)
        p->timers->prev = t;
    p->timers = t;
    p->ntimers++;
    if (p->in_service)
        start_timer(p, t);
    return 1;
}

static int l_timer_cancel(lua_State *L)
{
    struct ltimer *u = luaL_checkudata(L, 1, TIMER_MT);
    if (!u->t) {
        lua_pushboolean(L, 0);
        return 1;
    }
    detach_timer(u->t);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_timer_tostring(lua_State *L)
{
    struct ltimer *u = luaL_checkudata(L, 1, TIMER_MT);
    lua_pushstring(L, u->t ? "timer (pending)" : "timer (done)");
    return 1;
}

/* ---- msg ----------------------------------------------------------------- */

static int msg_index(lua_State *L)
{
    struct hub_policy *p = policy_of(L);
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
        decode(p, L, -1, "msg.data");
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

/* ---- conn ---------------------------------------------------------------- */

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
    struct hub_policy *p = policy_of(L);

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
    struct hub_policy *p = policy_of(L);

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
    hub_lua_encode(policy_of(L), L, 2, "conn:send: data");
    const char *s = lua_tolstring(L, -1, &n);
    hub_sandbox_charge(policy_of(L), L, 16 + (int64_t)(n / HUB_COST_COPY));
    const struct hub_policy_host *h = &policy_of(L)->host;
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
    const struct hub_policy_host *h = &policy_of(L)->host;
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
    const char *ch = check_channel(L, 2, "conn:subscribe", &len);
    const struct hub_policy_host *h = &policy_of(L)->host;
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
    const char *ch = check_channel(L, 2, "conn:unsubscribe", &len);
    const struct hub_policy_host *h = &policy_of(L)->host;
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
    const struct hub_policy_host *h = &policy_of(L)->host;
    struct channels_arg a = {L, 0};
    lua_newtable(L);
    h->ops->conn_channels(h->ud, c, push_channel, &a);
    return 1;
}

static int conn_index(lua_State *L)
{
    struct lconn *u = luaL_checkudata(L, 1, CONN_MT);
    struct hub_policy *p = policy_of(L);
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
            decode(p, L, -1, "conn.info");
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
    struct hub_policy *p = policy_of(L);
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

/* ---- module -------------------------------------------------------------- */

static void new_metatable(lua_State *L, const char *name, const luaL_Reg *fns)
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
    static const luaL_Reg conn_mt[] = {
        {"__index", conn_index},
        {"__newindex", conn_newindex},
        {"__tostring", conn_tostring},
        {"__eq", conn_eq},
        {NULL, NULL},
    };
    static const luaL_Reg msg_mt[] = {
        {"__index", msg_index},
        {"__newindex", msg_newindex},
        {"__tostring", msg_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg timer_mt[] = {
        {"__tostring", l_timer_tostring},
        {NULL, NULL},
    };
    static const luaL_Reg timer_methods[] = {
        {"cancel", l_timer_cancel},
        {NULL, NULL},
    };
    static const luaL_Reg hub_fns[] = {
        {"publish", l_publish},
        {"log", l_log},
        {"now", l_now},
        {"after", l_after},
        {"subscribers", l_subscribers},
        {"presence", l_presence},
        {"conn", l_conn},
        {"hmac_sha256", l_hmac_sha256},
        {"jwt_verify", l_jwt_verify},
        {NULL, NULL},
    };
    static const luaL_Reg json_fns[] = {
        {"encode", l_json_encode},
        {"decode", l_json_decode},
        {"array", l_json_array},
        {NULL, NULL},
    };

    new_metatable(L, CONN_MT, conn_mt);
    new_metatable(L, MSG_MT, msg_mt);
    new_metatable(L, TIMER_MT, timer_mt);
    luaL_getmetatable(L, TIMER_MT);
    luaL_newlib(L, timer_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

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
    lua_pushcfunction(L, l_json_decode);
    lua_pushstring(L, p->cfg->policy_vars ? p->cfg->policy_vars : "{}");
    lua_call(L, 1, 1);
    lua_setfield(L, -2, "vars");
}
