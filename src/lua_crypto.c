/* hub.hmac_sha256 and hub.jwt_verify (HS256 only), over OpenSSL's
 * libcrypto; base64url as RFC 7515 writes it. Callable anywhere (at load,
 * in hooks and timers); they may raise. */
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

int hub_lua_jwt_verify(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
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

    double now = hub_lua_now_ms(p) / 1000.0, exp, nbf;
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
