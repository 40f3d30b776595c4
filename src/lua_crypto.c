/* hub.hmac_sha256 and hub.jwt_verify (HS256 with a secret; RS256 and ES256
 * with the conf's jwt_keys, lua_jwt_keys.c), over OpenSSL's libcrypto;
 * base64url as RFC 7515 writes it. Callable anywhere (at load, in hooks and
 * timers); they may raise. docs/lua.md, "hub.jwt_verify", has the rules. */
#include "lua_api.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#define JWT_MAX 16384               /* bytes of a token */
#define JWT_LEEWAY_MAX (366 * 86400) /* seconds */
#define JWT_KID_MAX 256             /* bytes of a kid */
#define JWT_ACCEPT_MAX 64           /* values of the aud and iss options */

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

int hub_lua_hmac_sha256(lua_State *L)
{
    size_t klen, tlen;
    const char *key = luaL_checklstring(L, 1, &klen);
    const char *text = luaL_checklstring(L, 2, &tlen);
    unsigned char md[32];
    char out[65];
    hub_sandbox_charge(hub_lua_policy(L), L, 64 + (int64_t)((klen + tlen) / HUB_COST_SCAN));
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

long hub_lua_b64url_decode(const char *s, size_t len, unsigned char *out)
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

void hub_lua_show(const char *s, size_t len, char *out, size_t n)
{
    size_t m = n > 4 ? n - 4 : 0, i;
    for (i = 0; i < len && i < m; i++)
        out[i] = s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?';
    if (i < len && n >= 4)
        memcpy(out + i, "...", 3), i += 3;
    if (n)
        out[i < n ? i : n - 1] = '\0';
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
    long n = hub_lua_b64url_decode(s, len, buf);
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

/* What the caller of hub.jwt_verify asked for. */
struct jwt_opts {
    const char *secret;             /* HS256; NULL: the keys of jwt_keys */
    size_t slen;
    double leeway;
    int aud, iss;                   /* stack index of the option (a string or a
                                     * list of strings), 0: not asked */
};

/* Checks option `name` at `idx`: a string, or a list of 1 to JWT_ACCEPT_MAX
 * strings; raises otherwise. */
static void check_accept(lua_State *L, int idx, const char *name)
{
    if (lua_type(L, idx) == LUA_TSTRING)
        return;
    lua_Integer n = lua_istable(L, idx) ? (lua_Integer)lua_rawlen(L, idx) : 0;
    for (lua_Integer i = 1; i <= n && n <= JWT_ACCEPT_MAX; i++) {
        int t = lua_rawgeti(L, idx, i);
        lua_pop(L, 1);
        if (t != LUA_TSTRING)
            n = 0;
    }
    if (n < 1 || n > JWT_ACCEPT_MAX)
        luaL_error(L, "hub.jwt_verify: option %s must be a string or a list of 1 to %d "
                      "strings", name, JWT_ACCEPT_MAX);
}

static void check_leeway(lua_State *L, int idx, double leeway)
{
    /* NaN or infinity would make every exp and nbf comparison pass */
    if (!(leeway >= 0 && leeway <= JWT_LEEWAY_MAX))
        luaL_error(L, "hub.jwt_verify: leeway must be 0 to %d seconds (got %s)",
                   JWT_LEEWAY_MAX, lua_tostring(L, idx));
}

/* The arguments after the token: (secret [, leeway]), (options) or none.
 * Raises for a mistake of the caller. */
static void get_opts(struct hub_policy *p, lua_State *L, struct jwt_opts *o)
{
    static const char *const names[] = {"secret", "leeway", "aud", "iss"};
    memset(o, 0, sizeof(*o));
    if (lua_type(L, 2) == LUA_TSTRING) {
        o->secret = lua_tolstring(L, 2, &o->slen);
        o->leeway = luaL_optnumber(L, 3, 0);
        check_leeway(L, 3, o->leeway);
    } else if (lua_istable(L, 2)) {
        lua_settop(L, 2);
        lua_pushnil(L);
        while (lua_next(L, 2)) {
            const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
            size_t i = 0;
            while (k && i < hub_countof(names) && strcmp(k, names[i]) != 0)
                i++;
            if (!k || i == hub_countof(names)) {
                const char *near = k ? hub_conf_near(k, names, hub_countof(names),
                                                     sizeof(names[0])) : NULL;
                luaL_error(L, "hub.jwt_verify: unknown option %s%s%s%s (options: secret, "
                              "leeway, aud, iss)", k ? k : luaL_typename(L, -2),
                           near ? " (did you mean " : "", near ? near : "", near ? "?)" : "");
            }
            lua_pop(L, 1);
        }
        lua_getfield(L, 2, "secret");   /* 3 */
        lua_getfield(L, 2, "leeway");   /* 4 */
        lua_getfield(L, 2, "aud");      /* 5 */
        lua_getfield(L, 2, "iss");      /* 6 */
        if (!lua_isnil(L, 3)) {
            if (lua_type(L, 3) != LUA_TSTRING)
                luaL_error(L, "hub.jwt_verify: option secret must be a string");
            o->secret = lua_tolstring(L, 3, &o->slen);
        }
        if (!lua_isnil(L, 4)) {
            if (lua_type(L, 4) != LUA_TNUMBER)
                luaL_error(L, "hub.jwt_verify: option leeway must be a number");
            o->leeway = lua_tonumber(L, 4);
            check_leeway(L, 4, o->leeway);
        }
        if (!lua_isnil(L, 5))
            check_accept(L, o->aud = 5, "aud");
        if (!lua_isnil(L, 6))
            check_accept(L, o->iss = 6, "iss");
    } else if (!lua_isnoneornil(L, 2)) {
        luaL_error(L, "hub.jwt_verify: argument 2 must be the secret (a string) or a table of "
                      "options (got %s)", luaL_typename(L, 2));
    }
    if (o->secret && o->slen == 0)
        luaL_error(L, "hub.jwt_verify: the secret is empty");
    if (!o->secret && !p->jwt_keys)
        luaL_error(L, "hub.jwt_verify: no key to verify with: pass the secret (HS256), or "
                      "name the issuer's public keys in the conf (jwt_keys)");
}

/* 1 if the string s[0..n) is the option at `idx` or one of its list. */
static int accepted(lua_State *L, int idx, const char *s, size_t n)
{
    if (lua_type(L, idx) == LUA_TSTRING) {
        size_t l;
        const char *a = lua_tolstring(L, idx, &l);
        return l == n && !memcmp(a, s, n);
    }
    lua_Integer len = (lua_Integer)lua_rawlen(L, idx);
    for (lua_Integer i = 1; i <= len; i++) {
        lua_rawgeti(L, idx, i);
        size_t l;
        const char *a = lua_tolstring(L, -1, &l);
        int same = l == n && !memcmp(a, s, n);
        lua_pop(L, 1);
        if (same)
            return 1;
    }
    return 0;
}

/* iss (a string) and aud (a string or a list of strings, RFC 7519 §4.1.3)
 * of the claims at `claims`, when the caller asked. Returns NULL, or why
 * the token is refused (in why[0..n)). */
static const char *check_iss_aud(lua_State *L, int claims, const struct jwt_opts *o,
                                 char *why, size_t n)
{
    char shown[64];
    size_t l;
    if (o->iss) {
        lua_getfield(L, claims, "iss");
        if (lua_type(L, -1) != LUA_TSTRING)
            return lua_isnil(L, -1) ? "claim iss is missing" : "claim iss is not a string";
        const char *iss = lua_tolstring(L, -1, &l);
        if (!accepted(L, o->iss, iss, l)) {
            hub_lua_show(iss, l, shown, sizeof(shown));
            snprintf(why, n, "issuer '%s' is not accepted", shown);
            return why;
        }
        lua_pop(L, 1);
    }
    if (o->aud) {
        int t = lua_getfield(L, claims, "aud");
        if (t == LUA_TNIL)
            return "claim aud is missing";
        if (t == LUA_TSTRING) {
            const char *aud = lua_tolstring(L, -1, &l);
            if (accepted(L, o->aud, aud, l))
                return NULL;
            hub_lua_show(aud, l, shown, sizeof(shown));
            snprintf(why, n, "audience '%s' is not accepted", shown);
            return why;
        }
        lua_Integer len = t == LUA_TTABLE ? (lua_Integer)lua_rawlen(L, -1) : 0;
        int found = 0;
        for (lua_Integer i = 1; i <= len; i++) {
            if (lua_rawgeti(L, -1, i) != LUA_TSTRING)
                return "claim aud is not a string or a list of strings";
            const char *aud = lua_tolstring(L, -1, &l);
            found |= accepted(L, o->aud, aud, l);
            lua_pop(L, 1);
        }
        if (!len)
            return "claim aud is not a string or a list of strings";
        if (!found)
            return "no audience of the token is accepted";
    }
    return NULL;
}

/* exp, nbf and iat of the claims at `claims` (RFC 7519 §4.1.4-6), each
 * optional; when present, a finite number of seconds since the epoch.
 * Returns NULL or why the token is refused. */
static const char *check_times(lua_State *L, int claims, double now, double leeway)
{
    static const char *const bad[3][2] = {
        {"claim exp is not a number", "claim exp is not a finite number"},
        {"claim nbf is not a number", "claim nbf is not a finite number"},
        {"claim iat is not a number", "claim iat is not a finite number"},
    };
    static const char *const names[3] = {"exp", "nbf", "iat"};
    double v;
    for (int i = 0; i < 3; i++) {
        int r = claim_number(L, claims, names[i], &v);
        if (r < 0)
            return bad[i][-r - 1];
        if (r == 0)
            continue;
        if (i == 0 && now >= v + leeway)
            return "token expired";
        if (i == 1 && now + leeway < v)
            return "token not valid yet (nbf)";
        if (i == 2 && now + leeway < v)
            return "token issued in the future (iat)";
    }
    return NULL;
}

/* Pushes "unsupported alg '<alg>' (...)" with the bytes of alg that are
 * not printable ASCII shown as '?' (it may hold a NUL). */
static int unsupported_alg(lua_State *L, const char *alg, size_t len, const char *which)
{
    char show[40];
    hub_lua_show(alg, len, show, sizeof(show));
    lua_pushnil(L);
    if (len == 4 && !memcmp(alg, "none", 4))
        lua_pushliteral(L, "unsupported alg 'none': unsigned tokens are refused");
    else
        lua_pushfstring(L, "unsupported alg '%s' (%s)", show, which);
    return 2;
}

int hub_lua_jwt_verify(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    struct jwt_opts o;
    size_t tlen;
    char why[160];

    get_opts(p, L, &o);
    if (lua_type(L, 1) != LUA_TSTRING)
        return fail2(L, "no token");
    const char *tok = lua_tolstring(L, 1, &tlen);
    if (tlen > JWT_MAX)
        return fail2(L, "token too long");
    /* base64, HMAC and JSON over the token (public key checks are charged
     * by lua_jwt_keys.c) */
    hub_sandbox_charge(p, L, 256 + (int64_t)(tlen / HUB_COST_JSON) + (int64_t)o.slen);

    const char *d1 = memchr(tok, '.', tlen);
    const char *d2 = d1 ? memchr(d1 + 1, '.', tlen - (size_t)(d1 + 1 - tok)) : NULL;
    if (!d1 || !d2 || memchr(d2 + 1, '.', tlen - (size_t)(d2 + 1 - tok)))
        return fail2(L, "malformed token: expected header.payload.signature");
    size_t hlen = (size_t)(d1 - tok), plen = (size_t)(d2 - d1 - 1);
    size_t siglen = tlen - (size_t)(d2 + 1 - tok);

    if (jwt_part(p, L, tok, hlen) < 0)
        return fail2(L, "malformed token: the header is not a base64url JSON object");
    int header = lua_gettop(L);
    lua_getfield(L, header, "alg");
    if (lua_type(L, -1) != LUA_TSTRING)
        return fail2(L, "malformed token: the header has no alg");
    /* exactly these 5 bytes: a Lua string may hold a NUL ("HS256\u0000x") */
    size_t alen;
    const char *alg_s = lua_tolstring(L, -1, &alen);
    int alg = alen != 5 ? 0 : !memcmp(alg_s, "HS256", 5) ? HUB_JWT_HS256
            : !memcmp(alg_s, "RS256", 5) ? HUB_JWT_RS256
            : !memcmp(alg_s, "ES256", 5) ? HUB_JWT_ES256 : 0;
    /* The secret verifies HS256 only, the keys RS256 and ES256 only: a
     * public key is never used as an HMAC secret (algorithm confusion). */
    if (o.secret && alg != HUB_JWT_HS256)
        return unsupported_alg(L, alg_s, alen, alg ? "a secret verifies HS256 only: "
                               "RS256 and ES256 tokens are verified with jwt_keys"
                               : "only HS256");
    if (!o.secret && (alg == 0 || alg == HUB_JWT_HS256))
        return unsupported_alg(L, alg_s, alen, alg ? "jwt_keys verify RS256 and ES256 only; "
                               "an HS256 token needs the secret"
                               : "RS256 or ES256 with jwt_keys");
    const char *kid = NULL;
    size_t kidlen = 0;
    int t = lua_getfield(L, header, "kid");
    if (t == LUA_TSTRING)
        kid = lua_tolstring(L, -1, &kidlen);
    if ((t != LUA_TSTRING && t != LUA_TNIL) || kidlen > JWT_KID_MAX)
        return fail2(L, "malformed token: kid is not a string of at most 256 bytes");

    unsigned char *sig = lua_newuserdatauv(L, siglen + 1, 0);
    long n = hub_lua_b64url_decode(d2 + 1, siglen, sig);
    if (n < 0)
        return fail2(L, "malformed token: the signature is not base64url");
    if (alg == HUB_JWT_HS256) {
        unsigned char want[32];
        if (hmac256(o.secret, o.slen, tok, (size_t)(d2 - tok), want) < 0)
            luaL_error(L, "hub.jwt_verify: HMAC failed");
        if (n != 32 || CRYPTO_memcmp(want, sig, 32) != 0)
            return fail2(L, "bad signature");
    } else if (hub_lua_jwt_keys_verify(p, L, alg, kid, kidlen, tok, (size_t)(d2 - tok), sig,
                                       (size_t)n, why, sizeof(why)) < 0) {
        return fail2(L, why);
    }

    if (jwt_part(p, L, d1 + 1, plen) < 0)
        return fail2(L, "malformed token: the payload is not a base64url JSON object");
    int claims = lua_gettop(L);
    /* the policy's clock: a spec's (docs/testing-policies.md) or the wall's */
    const char *bad = check_times(L, claims, hub_lua_now_ms(p) / 1000.0, o.leeway);
    if (!bad)
        bad = check_iss_aud(L, claims, &o, why, sizeof(why));
    if (bad)
        return fail2(L, bad);
    lua_settop(L, claims);
    return 1;
}
