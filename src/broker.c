/* The broker front: URL parsing, the choice of implementation and the shard
 * function. */
#include "luahub/broker.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_impl.h"
#include "luahub/hash.h"
#include "luahub/util.h"

/* ------------------------------------------------------------------ */
/* Hashing and sharding                                                */
/* ------------------------------------------------------------------ */

/* Jump consistent hash, Lamping & Veach 2014 ("A Fast, Minimal Memory,
 * Consistent Hash Algorithm"), on hub_hash64 of the name. */
uint32_t hub_broker_shard(const char *channel, size_t len, uint32_t n)
{
    if (n <= 1)
        return 0;
    uint64_t key = hub_hash64(channel, len);
    int64_t b = -1, j = 0;
    while (j < (int64_t)n) {
        b = j;
        key = key * 2862933555777941757ull + 1;
        j = (int64_t)((double)(b + 1) * ((double)(1ll << 31) / (double)((key >> 33) + 1)));
    }
    return (uint32_t)b;
}

/* ------------------------------------------------------------------ */
/* URL parsing                                                         */
/* ------------------------------------------------------------------ */

void hub_redis_url_free(struct hub_redis_url *u, size_t n)
{
    if (!u)
        return;
    for (size_t i = 0; i < n; i++) {
        free(u[i].host);
        free(u[i].user);
        free(u[i].password);
    }
    free(u);
}

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Parses the decimal number p[0..n) into [lo, hi]. Returns 0 or -1. */
static int parse_num(const char *p, size_t n, unsigned long long lo, unsigned long long hi,
                     unsigned long long *out)
{
    if (n == 0 || n > 19)
        return -1;
    unsigned long long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (unsigned)(p[i] - '0');
    }
    if (v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Percent-decodes p[0..n) into a new string. NULL on a bad escape or an
 * escaped NUL (AUTH arguments are binary-safe, but C strings here are not). */
static char *pct_decode(const char *p, size_t n)
{
    char *s = hub_xmalloc(n + 1);
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '%') {
            if (i + 2 >= n) {
                free(s);
                return NULL;
            }
            int a = hexval((unsigned char)p[i + 1]), b = hexval((unsigned char)p[i + 2]);
            if (a < 0 || b < 0 || (a == 0 && b == 0)) {
                free(s);
                return NULL;
            }
            s[j++] = (char)(a * 16 + b);
            i += 2;
        } else {
            s[j++] = p[i];
        }
    }
    s[j] = '\0';
    return s;
}

/* Copies the URL p[0..n) into `out`, cut to 200 bytes, with its
 * credentials hidden: error messages quote the URL, and they reach the log
 * (docs/operations.md, "Secrets and logs"). Everything before the last '@'
 * after the scheme is a credential, whatever the URL's other mistakes:
 * "redis://user:PW@host" shows as "redis://user:<stars>@host", and a URL
 * without "user:" loses all of its userinfo (docs/operations.md shows
 * examples). Returns the length written. */
static int redact_url(const char *p, size_t n, char *out, size_t cap)
{
    const char *end = p + n, *a = p, *at = NULL;
    for (const char *q = p; q + 3 <= end; q++)
        if (!memcmp(q, "://", 3)) {
            a = q + 3;
            break;
        }
    for (const char *q = a; q < end; q++)
        if (*q == '@')
            at = q;
    int w;
    if (at) {
        const char *colon = memchr(a, ':', (size_t)(at - a));
        const char *keep = colon ? colon + 1 : a;
        w = snprintf(out, cap, "%.*s***%.*s", (int)(keep - p), p, (int)(end - at), at);
    } else {
        w = snprintf(out, cap, "%.*s", (int)n, p);
    }
    if (w < 0)
        return 0;
    if ((size_t)w >= cap)
        w = (int)cap - 1;
    if (w > 200)
        w = 200, out[200] = '\0';
    return w;
}

/* Parses one "redis://..." item p[0..n) into `u` (zeroed by the caller).
 * Returns 0, or -1 with a message naming the problem. */
static int parse_redis(const char *p, size_t n, struct hub_redis_url *u, char *err,
                       size_t errlen)
{
    const char *end = p + n;
    char shown[256];
    const char *item = shown;
    int itemlen = redact_url(p, n, shown, sizeof(shown));
    unsigned long long v;

    u->port = HUB_REDIS_DEFAULT_PORT;
    u->connect_timeout_ms = HUB_REDIS_CONNECT_TIMEOUT_MS;
    u->command_timeout_ms = HUB_REDIS_COMMAND_TIMEOUT_MS;
    u->max_pending = HUB_REDIS_MAX_PENDING;
    u->max_pending_bytes = HUB_REDIS_MAX_PENDING_BYTES;

    if (n >= 9 && strncasecmp(p, "rediss://", 9) == 0) {
        seterr(err, errlen, "broker URL \"%.*s\": TLS (rediss://) is not supported", itemlen,
               item);
        return -1;
    }
    if (n < 8 || strncasecmp(p, "redis://", 8) != 0) {
        seterr(err, errlen,
               "broker URL \"%.*s\": expected \"memory\" or "
               "\"redis://[:password@]host:port[/db]\"",
               itemlen, item);
        return -1;
    }
    p += 8;

    /* The authority ends at the first '/' or '?'. userinfo is up to its
     * last '@' (a password may contain '@' only percent-encoded, but be
     * lenient about it). */
    const char *auth_end = p;
    while (auth_end < end && *auth_end != '/' && *auth_end != '?')
        auth_end++;
    const char *at = NULL;
    for (const char *q = p; q < auth_end; q++)
        if (*q == '@')
            at = q;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (!colon) {
            seterr(err, errlen,
                   "broker URL \"%.*s\": credentials must be \":password@\" or "
                   "\"user:password@\"",
                   itemlen, item);
            return -1;
        }
        if (colon > p && !(u->user = pct_decode(p, (size_t)(colon - p)))) {
            seterr(err, errlen, "broker URL \"%.*s\": bad %%-escape in the user name", itemlen,
                   item);
            return -1;
        }
        if (!(u->password = pct_decode(colon + 1, (size_t)(at - colon - 1)))) {
            seterr(err, errlen, "broker URL \"%.*s\": bad %%-escape in the password", itemlen,
                   item);
            return -1;
        }
        if (u->password[0] == '\0') {
            seterr(err, errlen, "broker URL \"%.*s\": empty password", itemlen, item);
            return -1;
        }
        p = at + 1;
    }

    /* host[:port] */
    const char *host, *host_end, *q;
    if (p < auth_end && *p == '[') {
        host = p + 1;
        host_end = memchr(host, ']', (size_t)(auth_end - host));
        if (!host_end) {
            seterr(err, errlen, "broker URL \"%.*s\": missing ']' after the IPv6 address",
                   itemlen, item);
            return -1;
        }
        q = host_end + 1;
    } else {
        host = p;
        host_end = p;
        while (host_end < auth_end && *host_end != ':')
            host_end++;
        q = host_end;
    }
    if (host_end == host) {
        seterr(err, errlen, "broker URL \"%.*s\": missing host", itemlen, item);
        return -1;
    }
    for (const char *c = host; c < host_end; c++) {
        if (!(isalnum((unsigned char)*c) || *c == '.' || *c == '-' || *c == '_' || *c == ':' ||
              *c == '%')) {
            seterr(err, errlen, "broker URL \"%.*s\": bad character '%c' in the host", itemlen,
                   item, *c);
            return -1;
        }
    }
    u->host = hub_xstrndup(host, (size_t)(host_end - host));
    if (q < auth_end) {
        if (*q != ':' ||
            parse_num(q + 1, (size_t)(auth_end - q - 1), 1, 65535, &v) < 0) {
            seterr(err, errlen, "broker URL \"%.*s\": bad port \"%.*s\" (expected 1-65535)",
                   itemlen, item, (int)(auth_end - q - (*q == ':')), q + (*q == ':'));
            return -1;
        }
        u->port = (int)v;
    }
    p = auth_end;

    /* [/db] */
    if (p < end && *p == '/') {
        const char *d = ++p;
        while (p < end && *p != '?')
            p++;
        if (p > d) {
            if (parse_num(d, (size_t)(p - d), 0, INT_MAX, &v) < 0) {
                seterr(err, errlen,
                       "broker URL \"%.*s\": bad database \"%.*s\" (expected a number)",
                       itemlen, item, (int)(p - d), d);
                return -1;
            }
            u->db = (int)v;
        }
    }

    /* [?key=value&...] */
    if (p < end && *p == '?') {
        p++;
        while (p < end) {
            const char *k = p;
            while (p < end && *p != '&')
                p++;
            const char *eq = memchr(k, '=', (size_t)(p - k));
            if (p == k) {
                p++;
                continue;
            }
            if (!eq) {
                seterr(err, errlen, "broker URL \"%.*s\": option \"%.*s\" has no value",
                       itemlen, item, (int)(p - k), k);
                return -1;
            }
            size_t kl = (size_t)(eq - k), vl = (size_t)(p - eq - 1);
            const char *val = eq + 1;
#define KEY(s) (kl == sizeof(s) - 1 && memcmp(k, s, kl) == 0)
            if (KEY("connect_timeout_ms") || KEY("command_timeout_ms")) {
                if (parse_num(val, vl, 10, 600000, &v) < 0) {
                    seterr(err, errlen,
                           "broker URL \"%.*s\": %.*s must be 10-600000 (milliseconds)",
                           itemlen, item, (int)kl, k);
                    return -1;
                }
                if (KEY("connect_timeout_ms"))
                    u->connect_timeout_ms = (unsigned)v;
                else
                    u->command_timeout_ms = (unsigned)v;
            } else if (KEY("max_pending")) {
                if (parse_num(val, vl, 1, 10000000, &v) < 0) {
                    seterr(err, errlen, "broker URL \"%.*s\": max_pending must be 1-10000000",
                           itemlen, item);
                    return -1;
                }
                u->max_pending = (unsigned)v;
            } else if (KEY("max_pending_bytes")) {
                if (parse_num(val, vl, 1024, (unsigned long long)1 << 40, &v) < 0) {
                    seterr(err, errlen,
                           "broker URL \"%.*s\": max_pending_bytes must be 1024-2^40", itemlen,
                           item);
                    return -1;
                }
                u->max_pending_bytes = (size_t)v;
            } else {
                seterr(err, errlen,
                       "broker URL \"%.*s\": unknown option \"%.*s\" (known: "
                       "connect_timeout_ms, command_timeout_ms, max_pending, "
                       "max_pending_bytes)",
                       itemlen, item, (int)kl, k);
                return -1;
            }
#undef KEY
            if (p < end)
                p++;
        }
    }
    return 0;
}

/* Parses a whole broker URL. Returns 0 for "memory", 1 for redis (with a new
 * array in *urls, *n entries), -1 with a message. */
static int parse_url(const char *url, struct hub_redis_url **urls, size_t *n, char *err,
                     size_t errlen)
{
    *urls = NULL;
    *n = 0;
    if (!url) {
        seterr(err, errlen, "broker URL is missing");
        return -1;
    }
    size_t cap = 0, cnt = 0;
    struct hub_redis_url *u = NULL;
    int memory = 0;
    const char *p = url;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ',')
            p++;
        if (!*p)
            break;
        const char *s = p;
        while (*p && !(*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ','))
            p++;
        size_t len = (size_t)(p - s);
        if (len == 6 && strncasecmp(s, "memory", 6) == 0) {
            memory++;
            continue;
        }
        if (cnt == cap) {
            cap = cap ? cap * 2 : 4;
            u = hub_xrealloc(u, cap * sizeof(*u));
        }
        memset(&u[cnt], 0, sizeof(u[cnt]));
        if (parse_redis(s, len, &u[cnt], err, errlen) < 0) {
            hub_redis_url_free(u, cnt + 1);
            return -1;
        }
        for (size_t i = 0; i < cnt; i++) {
            if (strcmp(u[i].host, u[cnt].host) == 0 && u[i].port == u[cnt].port) {
                seterr(err, errlen, "broker URL: redis server %s:%d is listed twice",
                       u[cnt].host, u[cnt].port);
                hub_redis_url_free(u, cnt + 1);
                return -1;
            }
        }
        cnt++;
    }
    if (memory && cnt) {
        seterr(err, errlen, "\"memory\" cannot be mixed with redis URLs");
        hub_redis_url_free(u, cnt);
        return -1;
    }
    if (memory > 1) {
        seterr(err, errlen, "\"memory\" given twice");
        return -1;
    }
    if (memory)
        return 0;
    if (cnt == 0) {
        seterr(err, errlen,
               "broker URL is empty: expected \"memory\" or "
               "\"redis://[:password@]host:port[/db]\"");
        return -1;
    }
    if (cnt > 1024) {
        seterr(err, errlen, "broker URL: %zu redis servers (at most 1024)", cnt);
        hub_redis_url_free(u, cnt);
        return -1;
    }
    *urls = u;
    *n = cnt;
    return 1;
}

int hub_broker_url_valid(const char *url, char *err, size_t errlen)
{
    struct hub_redis_url *u;
    size_t n;
    int kind = parse_url(url, &u, &n, err, errlen);
    hub_redis_url_free(u, n);
    return kind < 0 ? -1 : 0;
}

struct hub_broker *hub_broker_new(uv_loop_t *loop, const char *url, const char *prefix,
                                  hub_broker_deliver_fn deliver,
                                  hub_broker_health_fn health, void *ud,
                                  char *err, size_t errlen)
{
    struct hub_redis_url *u;
    size_t n;
    int kind = parse_url(url, &u, &n, err, errlen);
    if (kind < 0)
        return NULL;
    if (kind == 0)
        return hub_broker_memory_new(loop, deliver, health, ud);
    return hub_broker_redis_new(loop, u, n, prefix ? prefix : "luahub:", deliver, health, ud);
}

struct hub_registry *hub_broker_registry_new(struct hub_broker *b,
                                             const struct hub_registry_options *opt)
{
    return b->ops->registry_new(b, opt);
}
