/* Checked allocation, growable buffers, JSON string escaping, clocks. */
#include "luahub/util.h"

#include "luahub/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static void oom(size_t n)
{
    fprintf(stderr, "luahub: out of memory allocating %zu bytes\n", n);
    abort();
}

void *hub_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *hub_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        oom(n * size);
    return p;
}

void *hub_xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

char *hub_xstrndup(const char *s, size_t n)
{
    char *d = hub_xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char *hub_xstrdup(const char *s)
{
    return hub_xstrndup(s, strlen(s));
}

void hub_buf_reserve(struct hub_buf *b, size_t extra)
{
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    b->p = hub_xrealloc(b->p, cap);
    b->cap = cap;
}

void hub_buf_append(struct hub_buf *b, const void *p, size_t n)
{
    hub_buf_reserve(b, n);
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void hub_buf_appends(struct hub_buf *b, const char *s)
{
    hub_buf_append(b, s, strlen(s));
}

void hub_buf_printf(struct hub_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    hub_buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void hub_buf_append_json_string(struct hub_buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    hub_buf_reserve(b, n + 2);
    b->p[b->len++] = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc = 0;
        switch (c) {
        case '"': esc = '"'; break;
        case '\\': esc = '\\'; break;
        case '\n': esc = 'n'; break;
        case '\r': esc = 'r'; break;
        case '\t': esc = 't'; break;
        case '\b': esc = 'b'; break;
        case '\f': esc = 'f'; break;
        default: break;
        }
        if (esc) {
            char e[2] = {'\\', esc};
            hub_buf_append(b, e, 2);
        } else if (c < 0x20) {
            char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            hub_buf_append(b, e, 6);
        } else {
            hub_buf_reserve(b, 1);
            b->p[b->len++] = (char)c;
        }
    }
    hub_buf_reserve(b, 1);
    b->p[b->len++] = '"';
    b->p[b->len] = '\0';
}

void hub_buf_reset(struct hub_buf *b)
{
    b->len = 0;
    if (b->p)
        b->p[0] = '\0';
}

void hub_buf_free(struct hub_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

void hub_random_hex(char *out, size_t nbytes)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char r[64];
    if (nbytes > sizeof(r))
        nbytes = sizeof(r);
    if (getrandom(r, nbytes, 0) != (ssize_t)nbytes) {
        uint64_t t = hub_now_ns() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)out;
        for (size_t i = 0; i < nbytes; i++, t = t * 6364136223846793005u + 1442695040888963407u)
            r[i] = (unsigned char)(t >> 56);
    }
    for (size_t i = 0; i < nbytes; i++) {
        out[2 * i] = hex[r[i] >> 4];
        out[2 * i + 1] = hex[r[i] & 15];
    }
    out[2 * nbytes] = '\0';
}

uint64_t hub_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t hub_now_ms(void)
{
    return hub_now_ns() / 1000000u;
}

const char *hub_err_name(int err)
{
    switch (err) {
    case HUB_OK:
        return "ok";
#define HUB_X(name, value, str, text) \
    case HUB_E##name:                 \
        return str;
        HUB_ERRNO_MAP(HUB_X)
#undef HUB_X
    }
    return "unknown";
}

const char *hub_strerror(int err)
{
    switch (err) {
    case HUB_OK:
        return "success";
#define HUB_X(name, value, str, text) \
    case HUB_E##name:                 \
        return text;
        HUB_ERRNO_MAP(HUB_X)
#undef HUB_X
    }
    return "unknown error";
}
