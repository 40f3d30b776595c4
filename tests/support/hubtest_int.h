/* hubtest internals shared by hubtest.c (process, TCP, HTTP, JSON, failure
 * plumbing) and hubtest_ws.c (SHA-1, base64, the WebSocket client). Not for
 * the suites: they include hubtest.h only.
 *
 * Include this instead of hubtest.h: it defines HUBTEST_INTERNAL first, so
 * the location macros of hubtest.h stay off and a helper calling another
 * keeps the test's file:line recorded by the outer call. */
#ifndef HUBTEST_INT_H
#define HUBTEST_INT_H

#define HUBTEST_INTERNAL
#include "hubtest.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Failures                                                             */
/* ------------------------------------------------------------------ */

/* Fails the current test at the test's file:line (the latest ht_at), with
 * the message followed by "[src:line]", our own location (`src`: __FILE__,
 * printed without its directory). Check's failure path: does not return. */
void ht_fail(const char *src, int line, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));

#define FAIL(...) ht_fail(__FILE__, __LINE__, __VA_ARGS__)
#define CHECK(cond, ...)            \
    do {                            \
        if (!(cond))                \
            FAIL(__VA_ARGS__);      \
    } while (0)

/* ------------------------------------------------------------------ */
/* Small utilities                                                     */
/* ------------------------------------------------------------------ */

/* Allocation failure fails the test. New allocations, the caller frees. */
static inline void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    CHECK(p != NULL, "out of memory");
    return p;
}

static inline void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    CHECK(p != NULL, "out of memory");
    return p;
}

static inline char *xstrndup(const char *s, size_t n)
{
    char *d = xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

static inline char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    CHECK(n >= 0, "out of memory");
    return s;
}

/* Remaining ms until `deadline` (>= 0). */
int ht_remaining(int64_t deadline);

/* ------------------------------------------------------------------ */
/* Sockets and HTTP (hubtest.c), for the WebSocket handshake            */
/* ------------------------------------------------------------------ */

/* Sends all `n` bytes before `deadline` (never SIGPIPE). Returns 0 or
 * -errno (-ETIMEDOUT). Borrows `p`. */
int ht_send_all(int fd, const void *p, size_t n, int64_t deadline);

/* A growable read buffer over a socket; `p` is NUL-terminated once
 * allocated, and owned by whoever holds the struct. */
struct ht_rbuf {
    char *p;
    size_t len, cap;
    int eof;
};

/* Reads more into `b` (waiting until `deadline`). Returns 1 if bytes came,
 * 0 on EOF (or reset), -1 on timeout. */
int ht_rbuf_fill(int fd, struct ht_rbuf *b, int64_t deadline);

/* Value of header `name` (case-insensitive) in the response head `head`,
 * trimmed: a pointer into `head` with its length in *vlen, or NULL. */
const char *ht_find_header(const char *head, const char *name, size_t *vlen);

/* Parses one response out of `b` (which may already hold bytes), reading
 * more as needed, into `r` (new allocations; free with http_resp_free).
 * The bytes after the response stay in `b`. Returns the status; fails the
 * test on a truncated or malformed response. */
int ht_read_response(int fd, struct ht_rbuf *b, struct http_resp *r,
                     int64_t deadline, int head_only);

#endif
