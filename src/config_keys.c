/* The conf keys: one table (hub_conf_keys) of every key with its type,
 * range and default, and the checks of each value. Adding a key is a field
 * in struct hub_config plus one line in the table (plus docs/config.md).
 * The loader that evaluates the file is config.c; which keys a reload
 * applies, and the swap, are config_reload.c. */
#include "config_impl.h"
#include "luahub/broker.h"

#include "luahub/log.h"
#include "luahub/netaddr.h"
#include "luahub/proto.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <lauxlib.h>
#include <lua.h>

static int set_listen(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_ws_path(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_api_key(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_dir(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_file(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_files(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_pem(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_listen_plain(struct hub_config *, const struct key *, const char *,
                            struct hub_buf *);
static int set_log_level(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_broker(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_prefix(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_policy_redis(struct hub_config *, const struct key *, const char *,
                            struct hub_buf *);
static int set_origins(struct hub_config *, const struct key *, const char *, struct hub_buf *);
static int set_cidrs(struct hub_config *, const struct key *, const char *, struct hub_buf *);

#define FIELD(f) offsetof(struct hub_config, f), sizeof(((struct hub_config *)0)->f)
#define STR(name, f, def, set) {#name, K_STRING, FIELD(f), 0, 0, 0, def, set}
#define STRS(name, f, def, set) {#name, K_STRINGS, FIELD(f), 0, 0, 0, def, set}
#define NUM(name, kind, min, max, def) {#name, kind, FIELD(name), min, max, def, NULL, NULL}

const struct key hub_conf_keys[] = {
    STR(listen, listen, "0.0.0.0:8080", set_listen),
    STR(listen_plain, listen_plain, NULL, set_listen_plain),
    STR(tls_cert, tls_cert, NULL, set_pem),
    STR(tls_key, tls_key, NULL, set_pem),
    STR(tls_client_ca, tls_client_ca, NULL, set_pem),
    STR(websocket_path, websocket_path, "/ws", set_ws_path),
    STR(api_key, api_key, NULL, set_api_key),
    NUM(max_message_size, K_SIZE, 64, 64 * MiB, 64 * KiB),
    NUM(max_queue_bytes, K_SIZE, 4 * KiB, 1 * GiB, 1 * MiB),
    NUM(max_channels_per_conn, K_INT, 1, 65536, 128),
    NUM(max_connections, K_INT, 0, 10000000, 0),
    NUM(max_protocol_errors, K_INT, 1, 10000, 10),
    NUM(ping_interval, K_SECONDS, 1, 3600, 25),
    NUM(ping_timeout, K_SECONDS, 1, 3600, 10),
    NUM(shutdown_timeout, K_SECONDS, 0, 3600, 5),
    NUM(request_timeout, K_SECONDS, 1, 3600, 10),
    NUM(http_idle_timeout, K_SECONDS, 1, 3600, 60),
    NUM(write_delay, K_INT, 0, 1000, 0),
    NUM(write_pause_max, K_INT, 0, 100, 2),
    NUM(rx_buffer_size, K_SIZE, 128, 64 * KiB, 512),
    STR(static_dir, static_dir, NULL, set_dir),
    STR(log_level, log_level, "info", set_log_level),
    STR(policy, policy, NULL, set_file),
    STR(policy_path, policy_path, NULL, set_dir),
    NUM(lua_max_instructions, K_INT, 1000, INT64_C(10000000000), 1000000),
    NUM(lua_max_memory, K_SIZE, 1 * MiB, 16 * GiB, 64 * MiB),
    STRS(broker, broker, "memory", set_broker),
    STR(redis_prefix, redis_prefix, "luahub:", set_prefix),
    {"workers", K_WORKERS, FIELD(workers), 1, 1024, 1, NULL, NULL},
    {"policy_vars", K_VARS, FIELD(policy_vars), 0, 0, 0, NULL, NULL},
    STRS(jwt_keys, jwt_keys, NULL, set_files),
    STRS(allowed_origins, allowed_origins, NULL, set_origins),
    STRS(trusted_proxies, trusted_proxies, NULL, set_cidrs),
    NUM(command_rate, K_INT, 0, 1000000, 1000),
    NUM(command_burst, K_INT, 1, 1000000, 5000),
    NUM(publish_rate, K_INT, 0, 1000000, 1000),
    NUM(publish_burst, K_INT, 1, 1000000, 5000),
    NUM(max_connections_per_ip, K_INT, 0, 10000000, 0),
    NUM(connect_rate_per_ip, K_INT, 0, 1000000, 0),
    {"channels", K_CHANNELS, 0, 0, 0, 0, 0, NULL, NULL},
    NUM(recover_max, K_INT, 1, 100000, 300),
    NUM(presence_max, K_INT, 1, 100000, 1000),
    NUM(presence_ttl, K_SECONDS, 1, 3600, 60),
    STR(policy_redis, policy_redis, NULL, set_policy_redis),
    NUM(lua_call_timeout, K_SECONDS, 1, 300, 1),
    NUM(lua_max_waiting, K_INT, 1, 1000000, 10000),
    NUM(lua_shared_memory, K_SIZE, 64 * KiB, 16 * GiB, 16 * MiB),
};

const size_t hub_conf_nkeys = sizeof(hub_conf_keys) / sizeof(hub_conf_keys[0]);
_Static_assert(sizeof(hub_conf_keys) / sizeof(hub_conf_keys[0]) <= HUB_CONF_MAX_KEYS,
               "raise HUB_CONF_MAX_KEYS");

#define keys hub_conf_keys
#define NKEYS hub_conf_nkeys

const struct key *hub_conf_find_key(const char *name)
{
    for (size_t i = 0; i < NKEYS; i++)
        if (strcmp(keys[i].name, name) == 0)
            return &keys[i];
    return NULL;
}

static void *field(struct hub_config *c, const struct key *k)
{
    return (char *)c + k->off;
}

static void store_num(struct hub_config *c, const struct key *k, int64_t v)
{
    if (k->width == sizeof(uint32_t))
        *(uint32_t *)field(c, k) = (uint32_t)v;
    else
        *(uint64_t *)field(c, k) = (uint64_t)v;
}

/* Replaces the string field of `k` with a copy of `s` (NULL: unset). */
static void store_str(struct hub_config *c, const struct key *k, const char *s)
{
    char **p = field(c, k);
    free(*p);
    *p = s ? hub_xstrdup(s) : NULL;
}

/* ---- messages ---------------------------------------------------------- */

/* Appends `s` between `q` quotes, with control bytes escaped, cut after
 * SHOW_MAX bytes: user text in a message stays one readable, bounded line. */
void hub_conf_append_q(struct hub_buf *b, const char *s, size_t n, char q)
{
    hub_buf_append(b, &q, 1);
    for (size_t i = 0; i < n && i < SHOW_MAX; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == (unsigned char)q || ch == '\\')
            hub_buf_printf(b, "\\%c", ch);
        else if (ch < 0x20 || ch == 0x7f)
            hub_buf_printf(b, "\\x%02x", ch);
        else
            hub_buf_append(b, &s[i], 1);
    }
    if (n > SHOW_MAX)
        hub_buf_appends(b, "...");
    hub_buf_append(b, &q, 1);
}

static void append_quoted(struct hub_buf *b, const char *s, size_t n)
{
    hub_conf_append_q(b, s, n, '"');
}

/* "64", "4KiB", "64MiB", "1GiB": a size the way a user would write it. */
void hub_conf_append_size(struct hub_buf *b, int64_t v)
{
    if (v != 0 && v % GiB == 0)
        hub_buf_printf(b, "%lldGiB", (long long)(v / GiB));
    else if (v != 0 && v % MiB == 0)
        hub_buf_printf(b, "%lldMiB", (long long)(v / MiB));
    else if (v != 0 && v % KiB == 0)
        hub_buf_printf(b, "%lldKiB", (long long)(v / KiB));
    else
        hub_buf_printf(b, "%lld", (long long)v);
}

static void append_range(struct hub_buf *b, const struct key *k)
{
    hub_buf_appends(b, "(");
    if (k->kind == K_SIZE) {
        hub_conf_append_size(b, k->min);
        hub_buf_appends(b, "..");
        hub_conf_append_size(b, k->max);
    } else {
        hub_buf_printf(b, "%lld..%lld", (long long)k->min, (long long)k->max);
    }
    hub_buf_appends(b, ")");
}

static const char *expected(enum kind kind)
{
    switch (kind) {
    case K_STRING: return "expected a string";
    case K_STRINGS: return "expected a string or a list of strings";
    case K_WORKERS: return "expected a number of processes or \"auto\"";
    case K_VARS: return "expected a table of name = string, number or boolean";
    case K_CHANNELS: return "expected a table of pattern = { options }";
    case K_INT: return "expected an integer";
    case K_SECONDS: return "expected a whole number of seconds";
    case K_SIZE: return "expected a size (integer bytes or a string like \"64KiB\")";
    }
    return "?";
}

/* ---- value checks ------------------------------------------------------ */

static bool has_space_or_control(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s <= 0x20 || *s == 0x7f)
            return true;
    return false;
}

/* "123", "64KiB", "512k", "2 M", "1GiB": binary units, case-insensitive,
 * whole numbers only. Returns 0, -1 if `s` is not a size, -2 if it is one
 * too large for int64. */
static int parse_size(const char *s, size_t n, int64_t *out)
{
    static const struct { const char *unit; int64_t mul; } units[] = {
        {"", 1}, {"b", 1},
        {"k", KiB}, {"kb", KiB}, {"kib", KiB},
        {"m", MiB}, {"mb", MiB}, {"mib", MiB},
        {"g", GiB}, {"gb", GiB}, {"gib", GiB},
    };
    size_t i = 0;
    uint64_t v = 0;
    bool big = false;
    if (i == n || s[i] < '0' || s[i] > '9')
        return -1;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) {
        v = v * 10 + (uint64_t)(s[i] - '0');
        if (v > (uint64_t)INT64_MAX)
            big = true, v = (uint64_t)INT64_MAX;
    }
    if (i < n && s[i] == ' ')
        i++;
    for (size_t u = 0; u < sizeof(units) / sizeof(units[0]); u++) {
        if (strlen(units[u].unit) != n - i || strncasecmp(s + i, units[u].unit, n - i) != 0)
            continue;
        if (big || v > (uint64_t)(INT64_MAX / units[u].mul))
            return -2;
        *out = (int64_t)v * units[u].mul;
        return 0;
    }
    return -1;
}

/* The value at `idx` as an integer for a numeric key: a Lua integer, a float
 * with an integral value, or (K_SIZE) a size string. Returns 0, or -1 with
 * the reason in `why`. Never raises: no Lua allocation happens here. */
static int get_number(lua_State *L, int idx, const struct key *k, int64_t *out,
                      struct hub_buf *why)
{
    int t = lua_type(L, idx);
    if (t == LUA_TNUMBER) {
        int ok;
        *out = (int64_t)lua_tointegerx(L, idx, &ok);
        if (ok)
            return 0;
        lua_Number d = lua_tonumber(L, idx);
        if (isinf(d) || (!isnan(d) && d == floor(d))) {
            hub_buf_printf(why, "%.14g is out of range ", (double)d);
            append_range(why, k);
        } else {
            hub_buf_printf(why, "%s, got %.14g", expected(k->kind), (double)d);
        }
        return -1;
    }
    if (t == LUA_TSTRING && k->kind == K_SIZE) {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        int rc = parse_size(s, n, out);
        if (rc == 0)
            return 0;
        if (rc == -2) {
            append_quoted(why, s, n);
            hub_buf_appends(why, " is out of range ");
            append_range(why, k);
        } else {
            hub_buf_printf(why, "%s, got ", expected(k->kind));
            append_quoted(why, s, n);
        }
        return -1;
    }
    hub_buf_printf(why, "%s, got %s", expected(k->kind), lua_typename(L, t));
    return -1;
}

/* Validates and stores the value at `idx` for key `k`. Returns 0, or -1 with
 * the reason in `why`. Never raises. */
int hub_conf_apply(struct hub_config *c, lua_State *L, int idx, const struct key *k,
                 struct hub_buf *why)
{
    if (k->kind == K_VARS) {
        /* Values the policy reads as hub.vars (secrets, feature switches):
         * stored as a JSON object, so they survive policy reloads. */
        if (lua_type(L, idx) != LUA_TTABLE) {
            hub_buf_printf(why, "%s, got %s", expected(k->kind), luaL_typename(L, idx));
            return -1;
        }
        struct hub_buf json = {0};
        int r = 0, n = 0;
        hub_buf_appends(&json, "{");
        lua_pushnil(L);
        while (r == 0 && lua_next(L, idx < 0 ? idx - 1 : idx)) {
            size_t kl, vl;
            const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &kl) : NULL;
            if (!name) {
                hub_buf_appends(why, "names must be strings");
                r = -1;
            } else if (!hub_proto_utf8_valid(name, kl)) {
                hub_buf_appends(why, "a name is not valid UTF-8");
                r = -1;
            } else {
                hub_buf_appends(&json, n++ ? "," : "");
                hub_buf_append_json_string(&json, name, kl);
                hub_buf_appends(&json, ":");
                switch (lua_type(L, -1)) {
                case LUA_TSTRING: {
                    /* stored as JSON, which is UTF-8 */
                    const char *v = lua_tolstring(L, -1, &vl);
                    if (!hub_proto_utf8_valid(v, vl)) {
                        hub_buf_printf(why, "'%s': not valid UTF-8", name);
                        r = -1;
                        break;
                    }
                    hub_buf_append_json_string(&json, v, vl);
                    break;
                }
                case LUA_TBOOLEAN:
                    hub_buf_appends(&json, lua_toboolean(L, -1) ? "true" : "false");
                    break;
                case LUA_TNUMBER:
                    if (lua_isinteger(L, -1)) {
                        hub_buf_printf(&json, "%lld", (long long)lua_tointeger(L, -1));
                    } else if (!isfinite(lua_tonumber(L, -1))) {
                        hub_buf_printf(why, "'%s': %g is not a finite number (JSON has no NaN "
                                       "or infinity)", name, lua_tonumber(L, -1));
                        r = -1;
                    } else {
                        hub_buf_printf(&json, "%.17g", lua_tonumber(L, -1));
                    }
                    break;
                default:
                    hub_buf_printf(why, "'%s': expected a string, number or boolean, got %s",
                                   name, luaL_typename(L, -1));
                    r = -1;
                }
            }
            lua_pop(L, 1);
        }
        if (r < 0) {
            lua_pop(L, 1); /* the key lua_next left */
        } else {
            hub_buf_appends(&json, "}");
            store_str(c, k, json.p);
        }
        hub_buf_free(&json);
        return r;
    }
    if (k->kind == K_WORKERS && lua_type(L, idx) == LUA_TSTRING) {
        if (strcmp(lua_tostring(L, idx), "auto") != 0) {
            hub_buf_printf(why, "%s, got ", expected(k->kind));
            append_quoted(why, lua_tostring(L, idx), lua_rawlen(L, idx));
            return -1;
        }
        store_num(c, k, 0); /* 0: one per core */
        return 0;
    }
    if (k->kind == K_STRINGS && lua_type(L, idx) == LUA_TTABLE) {
        /* A list: {"a", "b"} is stored as "a b". */
        struct hub_buf joined = {0};
        lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
        int r = 0;
        if (n == 0) {
            hub_buf_appends(why, "the list is empty");
            r = -1;
        }
        for (lua_Integer i = 1; i <= n && r == 0; i++) {
            size_t len;
            if (lua_rawgeti(L, idx, i) != LUA_TSTRING) {
                hub_buf_printf(why, "item %lld: expected a string, got %s", (long long)i,
                               luaL_typename(L, -1));
                r = -1;
            } else {
                const char *item = lua_tolstring(L, -1, &len);
                if (strlen(item) != len || strpbrk(item, " ,")) {
                    hub_buf_printf(why, "item %lld must not contain spaces, commas or NUL",
                                   (long long)i);
                    r = -1;
                } else {
                    hub_buf_printf(&joined, "%s%s", i > 1 ? " " : "", item);
                }
            }
            lua_pop(L, 1);
        }
        if (r == 0)
            r = k->set(c, k, joined.p, why);
        hub_buf_free(&joined);
        return r;
    }
    if (k->kind == K_STRING || k->kind == K_STRINGS) {
        if (lua_type(L, idx) != LUA_TSTRING) {
            hub_buf_printf(why, "%s, got %s", expected(k->kind),
                           lua_typename(L, lua_type(L, idx)));
            return -1;
        }
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        if (strlen(s) != n) {
            hub_buf_appends(why, "must not contain a NUL byte");
            return -1;
        }
        return k->set(c, k, s, why);
    }

    int64_t v;
    if (get_number(L, idx, k, &v, why) < 0)
        return -1;
    if (v < k->min || v > k->max) {
        if (lua_type(L, idx) == LUA_TSTRING)
            hub_conf_append_size(why, v);
        else
            hub_buf_printf(why, "%lld", (long long)v);
        hub_buf_appends(why, " is out of range ");
        append_range(why, k);
        return -1;
    }
    store_num(c, k, v);
    return 0;
}

static int set_listen(struct hub_config *c, const struct key *k, const char *s,
                      struct hub_buf *why)
{
    char err[256];
    if (hub_config_set_listen(c, s, err, sizeof(err)) == 0)
        return 0;
    hub_buf_appends(why, err);
    return -1;
}

static int set_ws_path(struct hub_config *c, const struct key *k, const char *s,
                       struct hub_buf *why)
{
    size_t n = strlen(s);
    if (s[0] != '/')
        hub_buf_appends(why, "must start with '/', got ");
    else if (has_space_or_control(s))
        hub_buf_appends(why, "must not contain spaces or control characters, got ");
    else if (strpbrk(s, "?#"))
        hub_buf_appends(why, "must be a path without '?' or '#', got ");
    else if (n > 255)
        hub_buf_printf(why, "is %zu bytes long; the limit is 255", n);
    else {
        store_str(c, k, s);
        return 0;
    }
    if (n <= 255)
        append_quoted(why, s, n);
    return -1;
}

static int set_api_key(struct hub_config *c, const struct key *k, const char *s,
                       struct hub_buf *why)
{
    if (!*s) {
        hub_buf_appends(why, "must not be empty (leave it unset to allow loopback peers only)");
        return -1;
    }
    if (has_space_or_control(s)) {
        hub_buf_appends(why, "must not contain spaces or control characters");
        return -1;
    }
    store_str(c, k, s);
    return 0;
}

static int set_log_level(struct hub_config *c, const struct key *k, const char *s,
                         struct hub_buf *why)
{
    int level = hub_log_level_parse(s);
    if (level < 0) {
        hub_buf_appends(why, "unknown level ");
        append_quoted(why, s, strlen(s));
        hub_buf_appends(why, " (expected \"error\", \"warn\", \"info\" or \"debug\")");
        return -1;
    }
    c->log_level = level;
    return 0;
}

/* Calls check(ud, item, len, why) for each space-separated item of s; at
 * most `max`. Returns 0, or -1 with the reason in `why`. */
static int each_item(const char *s, size_t max, struct hub_buf *why, void *ud,
                     int (*check)(void *ud, const char *item, size_t len, struct hub_buf *why))
{
    size_t n = 0;
    for (const char *p = s; *p;) {
        while (*p == ' ')
            p++;
        const char *e = p;
        while (*e && *e != ' ')
            e++;
        if (e == p)
            break;
        if (++n > max) {
            hub_buf_printf(why, "more than %zu entries", max);
            return -1;
        }
        if (check(ud, p, (size_t)(e - p), why) < 0)
            return -1;
        p = e;
    }
    if (!n) {
        hub_buf_appends(why, "the list is empty");
        return -1;
    }
    return 0;
}

static int check_cidr(void *ud, const char *s, size_t n, struct hub_buf *why)
{
    struct hub_ip net;
    char err[256];
    if (hub_cidr_parse(s, n, &net, err, sizeof(err)) == 0)
        return 0;
    hub_buf_appends(why, err);
    return -1;
}

static int check_origin(void *ud, const char *s, size_t n, struct hub_buf *why)
{
    char err[256];
    if (hub_origin_valid(s, n, err, sizeof(err)) == 0)
        return 0;
    hub_buf_appends(why, err);
    return -1;
}

static int set_origins(struct hub_config *c, const struct key *k, const char *s,
                       struct hub_buf *why)
{
    if (each_item(s, 256, why, NULL, check_origin) < 0)
        return -1;
    store_str(c, k, s);
    return 0;
}

static int set_cidrs(struct hub_config *c, const struct key *k, const char *s,
                     struct hub_buf *why)
{
    if (each_item(s, 256, why, NULL, check_cidr) < 0)
        return -1;
    store_str(c, k, s);
    return 0;
}

static int set_broker(struct hub_config *c, const struct key *k, const char *s,
                      struct hub_buf *why)
{
    char err[256];
    if (hub_broker_url_valid(s, err, sizeof(err)) < 0) {
        hub_buf_appends(why, err);
        return -1;
    }
    store_str(c, k, s);
    return 0;
}

/* One redis:// URL (the policy's own Redis: commands go to one server),
 * checked like a broker's. */
static int set_policy_redis(struct hub_config *c, const struct key *k, const char *s,
                            struct hub_buf *why)
{
    if (strncmp(s, "redis://", 8) != 0 || strpbrk(s, " ,\t")) {
        hub_buf_appends(why, "must be one redis://[[user]:password@]host[:port][/db] URL");
        return -1;
    }
    return set_broker(c, k, s, why);
}

static int set_prefix(struct hub_config *c, const struct key *k, const char *s,
                      struct hub_buf *why)
{
    if (strlen(s) > 64 || has_space_or_control(s)) {
        hub_buf_appends(why, "must be at most 64 bytes without spaces or control characters");
        return -1;
    }
    store_str(c, k, s);
    return 0;
}

/* `s` made absolute against the conf file's directory. Returns a new string. */
static char *resolve(const struct hub_config *c, const char *s)
{
    if (s[0] == '/' || !c->dir)
        return hub_xstrdup(s);
    struct hub_buf b = {0};
    hub_buf_printf(&b, "%s/%s", c->dir, s);
    return b.p;
}

/* Stores the resolved path (canonical when realpath can make it so). */
static void store_path(struct hub_config *c, const struct key *k, const char *full)
{
    char *canon = realpath(full, NULL);
    store_str(c, k, canon ? canon : full);
    free(canon);
}

static void path_problem(struct hub_buf *why, const char *s, const char *full,
                         const char *problem)
{
    append_quoted(why, s, strlen(s));
    if (strcmp(s, full) != 0)
        hub_buf_printf(why, " (resolved to %s)", full);
    hub_buf_printf(why, ": %s", problem);
}

static int set_dir(struct hub_config *c, const struct key *k, const char *s,
                   struct hub_buf *why)
{
    if (!*s) {
        hub_buf_appends(why, !strcmp(k->name, "static_dir")
                                 ? "must not be empty (leave it unset to serve no files)"
                                 : "must not be empty (leave it unset for the policy "
                                   "file's directory)");
        return -1;
    }
    char *full = resolve(c, s);
    struct stat st;
    int rc = -1;
    if (stat(full, &st) < 0)
        path_problem(why, s, full, strerror(errno));
    else if (!S_ISDIR(st.st_mode))
        path_problem(why, s, full, "not a directory");
    else {
        store_path(c, k, full);
        rc = 0;
    }
    free(full);
    return rc;
}

/* `s` resolved against the conf's directory, when it names a readable
 * regular file: its canonical path (a new string); NULL with the problem
 * in `why` otherwise. */
static char *regular_file(const struct hub_config *c, const char *s, struct hub_buf *why)
{
    char *full = resolve(c, s), *out = NULL;
    /* O_NONBLOCK: opening a FIFO must not hang the loader. */
    int fd = open(full, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    struct stat st;
    if (fd < 0)
        path_problem(why, s, full, strerror(errno));
    else if (fstat(fd, &st) < 0)
        path_problem(why, s, full, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        path_problem(why, s, full, "not a regular file");
    else if (!(out = realpath(full, NULL)))
        out = hub_xstrdup(full); /* canonical when realpath can make it so */
    if (fd >= 0)
        close(fd);
    free(full);
    return out;
}

/* A readable regular file; `empty` says what leaving the key unset does. */
static int store_file(struct hub_config *c, const struct key *k, const char *s,
                      struct hub_buf *why, const char *empty)
{
    if (!*s) {
        hub_buf_printf(why, "must not be empty (leave it unset %s)", empty);
        return -1;
    }
    char *path = regular_file(c, s, why);
    if (!path)
        return -1;
    store_str(c, k, path);
    free(path);
    return 0;
}

#define KEY_FILES_MAX 16 /* files in jwt_keys */

/* The files of jwt_keys being checked. */
struct key_files {
    const struct hub_config *c;
    struct hub_buf paths;           /* resolved, one per line */
};

/* each_item's check of one file of jwt_keys. */
static int add_file(void *ud, const char *s, size_t n, struct hub_buf *why)
{
    struct key_files *f = ud;
    char *item = hub_xstrndup(s, n), *path = regular_file(f->c, item, why);
    int rc = path ? 0 : -1;
    if (path)
        hub_buf_printf(&f->paths, "%s%s", f->paths.len ? "\n" : "", path);
    free(item);
    free(path);
    return rc;
}

/* jwt_keys: a file or a list of files (space-separated here: a list's
 * items have no spaces), each a readable regular file; stored resolved,
 * one per line (a resolved path may hold spaces). What is in them is
 * checked when the policy reads them (lua_jwt_keys.c). */
static int set_files(struct hub_config *c, const struct key *k, const char *s,
                     struct hub_buf *why)
{
    struct key_files f = {.c = c};
    int rc = each_item(s, KEY_FILES_MAX, why, &f, add_file);
    if (rc == 0)
        store_str(c, k, f.paths.p);
    hub_buf_free(&f.paths);
    return rc;
}

static int set_file(struct hub_config *c, const struct key *k, const char *s,
                    struct hub_buf *why)
{
    return store_file(c, k, s, why, "for the built-in policy");
}

/* tls_cert, tls_key, tls_client_ca: the file is checked here; its content
 * (PEM, the pair, the dates) by the TLS module (src/tls.c) at start, at
 * --check and at each reload. */
static int set_pem(struct hub_config *c, const struct key *k, const char *s,
                   struct hub_buf *why)
{
    return store_file(c, k, s, why, strcmp(k->name, "tls_client_ca")
                                        ? "to serve plain ws:// and http://"
                                        : "when clients need no certificate");
}

/* ---- listen ------------------------------------------------------------ */

static bool valid_hostname(const char *h, size_t n)
{
    if (n == 0 || n > 253)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = h[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              (ch >= '0' && ch <= '9') || ch == '-' || ch == '.'))
            return false;
    }
    return true;
}

static bool all_digits_and_dots(const char *h, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((h[i] >= '0' && h[i] <= '9') || h[i] == '.'))
            return false;
    return true;
}

#define LISTEN_HOST_MAX 256

/* Parses "HOST:PORT" into hbuf[0..*hlen) (NUL-terminated) and *portp.
 * Returns 0, or -1 with a message in `err`. */
static int parse_listen(const char *s, char hbuf[LISTEN_HOST_MAX], size_t *hlenp, int *portp,
                        char *err, size_t errlen)
{
    const char *host, *port, *colon;
    size_t hlen;
    const char *eg = "(e.g. \"0.0.0.0:8080\" or \"[::1]:8080\")";

    if (strlen(s) > 300 || has_space_or_control(s)) {
        snprintf(err, errlen, "invalid address: expected HOST:PORT %s", eg);
        return -1;
    }
    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        if (!end) {
            snprintf(err, errlen, "missing ']' in \"%s\" %s", s, eg);
            return -1;
        }
        host = s + 1;
        hlen = (size_t)(end - host);
        if (hlen >= LISTEN_HOST_MAX) {
            snprintf(err, errlen, "invalid IPv6 address in \"%s\"", s);
            return -1;
        }
        if (end[1] != ':') {
            snprintf(err, errlen, "missing port in \"%s\": expected HOST:PORT %s", s, eg);
            return -1;
        }
        port = end + 2;
        memcpy(hbuf, host, hlen);
        hbuf[hlen] = '\0';
        struct in6_addr a6;
        if (hlen == 0 || inet_pton(AF_INET6, hbuf, &a6) != 1) {
            snprintf(err, errlen, "invalid IPv6 address \"%s\" in \"%s\"", hbuf, s);
            return -1;
        }
    } else {
        colon = strrchr(s, ':');
        if (!colon) {
            snprintf(err, errlen, "expected HOST:PORT %s, got \"%s\"", eg, s);
            return -1;
        }
        if (memchr(s, ':', (size_t)(colon - s))) {
            snprintf(err, errlen, "an IPv6 address needs brackets: \"[::1]:8080\", got \"%s\"", s);
            return -1;
        }
        host = s;
        hlen = (size_t)(colon - s);
        port = colon + 1;
        if (hlen == 0) {
            snprintf(err, errlen, "missing host in \"%s\" (use \"0.0.0.0%s\" for every interface)",
                     s, colon);
            return -1;
        }
        if (hlen >= LISTEN_HOST_MAX) {
            snprintf(err, errlen, "invalid host in \"%s\"", s);
            return -1;
        }
        memcpy(hbuf, host, hlen);
        hbuf[hlen] = '\0';
        struct in_addr a4;
        if (all_digits_and_dots(hbuf, hlen) ? inet_pton(AF_INET, hbuf, &a4) != 1
                                            : !valid_hostname(hbuf, hlen)) {
            snprintf(err, errlen, "invalid host \"%s\" in \"%s\"", hbuf, s);
            return -1;
        }
    }

    if (!*port) {
        snprintf(err, errlen, "missing port in \"%s\": expected HOST:PORT %s", s, eg);
        return -1;
    }
    long p = 0;
    for (const char *q = port; *q; q++) {
        if (*q < '0' || *q > '9') {
            snprintf(err, errlen, "invalid port \"%s\" in \"%s\" (expected 0..65535)", port, s);
            return -1;
        }
        if (p <= 65535)
            p = p * 10 + (*q - '0');
    }
    if (p > 65535) {
        snprintf(err, errlen, "port %s is out of range (0..65535)", port);
        return -1;
    }
    *hlenp = hlen;
    *portp = (int)p;
    return 0;
}

int hub_config_set_listen(struct hub_config *c, const char *s, char *err, size_t errlen)
{
    char hbuf[LISTEN_HOST_MAX];
    size_t hlen;
    int port;

    if (parse_listen(s, hbuf, &hlen, &port, err, errlen) < 0)
        return -1;
    free(c->listen);
    free(c->listen_host);
    c->listen = hub_xstrdup(s);
    c->listen_host = hub_xstrndup(hbuf, hlen);
    c->listen_port = port;
    return 0;
}

static int set_listen_plain(struct hub_config *c, const struct key *k, const char *s,
                            struct hub_buf *why)
{
    char hbuf[LISTEN_HOST_MAX], err[256];
    size_t hlen;
    int port;

    if (parse_listen(s, hbuf, &hlen, &port, err, sizeof(err)) < 0) {
        hub_buf_appends(why, err);
        return -1;
    }
    store_str(c, k, s);
    free(c->listen_plain_host);
    c->listen_plain_host = hub_xstrndup(hbuf, hlen);
    c->listen_plain_port = port;
    return 0;
}

/* ---- "did you mean" ---------------------------------------------------- */

/* Edit distance, for "did you mean". Names longer than 63 bytes never match. */
static unsigned distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned row[64];
    if (la > 63 || lb > 63)
        return 99;
    for (size_t j = 0; j <= lb; j++)
        row[j] = (unsigned)j;
    for (size_t i = 1; i <= la; i++) {
        unsigned diag = row[0];
        row[0] = (unsigned)i;
        for (size_t j = 1; j <= lb; j++) {
            unsigned up = row[j];
            unsigned best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

const char *hub_conf_near(const char *name, const char *const *names, size_t n,
                          size_t stride)
{
    const char *best = NULL;
    unsigned bestd = 3; /* at most 2 edits ... */
    for (size_t i = 0; i < n; i++) {
        const char *cand = *(const char *const *)(const void *)((const char *)names + i * stride);
        unsigned d = distance(name, cand);
        if (d < bestd && d * 3 <= strlen(cand)) { /* ... and not most of the name */
            best = cand;
            bestd = d;
        }
    }
    return best;
}

/* ---- defaults, free ---------------------------------------------------- */

void hub_config_defaults(struct hub_config *c)
{
    memset(c, 0, sizeof(*c));
    for (size_t i = 0; i < NKEYS; i++) {
        const struct key *k = &keys[i];
        if (k->kind == K_VARS || k->kind == K_CHANNELS) {
            continue;
        } else if (k->kind != K_STRING && k->kind != K_STRINGS) {
            store_num(c, k, k->def);
        } else if (k->def_s) {
            struct hub_buf why = {0};
            if (k->set(c, k, k->def_s, &why) < 0)
                abort(); /* a default that fails its own check is a bug */
            hub_buf_free(&why);
        }
    }
}

void hub_config_free(struct hub_config *c)
{
    free(c->path);
    free(c->dir);
    free(c->listen);
    free(c->listen_host);
    free(c->websocket_path);
    free(c->api_key);
    free(c->listen_plain);
    free(c->listen_plain_host);
    free(c->tls_cert);
    free(c->tls_key);
    free(c->tls_client_ca);
    free(c->static_dir);
    free(c->policy);
    free(c->policy_path);
    free(c->broker);
    free(c->redis_prefix);
    free(c->policy_vars);
    free(c->jwt_keys);
    free(c->allowed_origins);
    free(c->trusted_proxies);
    free(c->policy_redis);
    hub_config_channels_free(c);
    memset(c, 0, sizeof(*c));
}

void hub_config_errors_free(struct hub_config_errors *e)
{
    for (unsigned i = 0; i < e->n; i++)
        free(e->v[i]);
    free(e->v);
    e->v = NULL;
    e->n = 0;
}
