/* One HTTP/1.x request as the hub sees it: the parsed head (method, path,
 * query, headers), the body, and the peer. Built by the HTTP layer (http.c)
 * from the bytes it read; read by the API routes and, for WebSocket
 * upgrades, by the policy's on_connect. The parser is pure (no I/O, no
 * logging), so it is unit-tested and fuzzed on its own.
 *
 * Ownership: every pointer in a struct hub_request points into memory the
 * HTTP layer owns (its read buffer and a per-request arena); it is valid
 * only during the call that hands the request over. Copy what you keep. */
#ifndef LUAHUB_REQUEST_H
#define LUAHUB_REQUEST_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/netaddr.h"
#include "luahub/util.h"

#define HUB_REQUEST_HEAD_MAX 16384  /* bytes of a request head (line + headers) */
#define HUB_REQUEST_HEADERS_MAX 100 /* header lines in one head */

struct hub_header {
    const char *name;           /* lower-case, NUL-terminated */
    const char *value;          /* trimmed of spaces and tabs, NUL-terminated */
    size_t name_len, value_len;
};

struct hub_request {
    const char *method;         /* "GET", "POST", ... (NUL-terminated) */
    const char *target;         /* the raw request target, "/api/x?a=b" */
    const char *path;           /* target before '?', percent-decoded */
    const char *query;          /* raw text after '?', not decoded; "" if none */
    size_t method_len, target_len, path_len, query_len;
    int http_minor;             /* HTTP/1.0 -> 0, HTTP/1.1 -> 1 */
    const struct hub_header *headers;
    size_t nheaders;
    uint64_t content_length;    /* 0 when absent */
    unsigned has_content_length : 1;
    unsigned chunked : 1;       /* Transfer-Encoding present (any coding) */
    unsigned keep_alive : 1;    /* the connection may serve another request */
    unsigned expect_continue : 1; /* Expect: 100-continue */
    unsigned upgrade_websocket : 1; /* Upgrade: websocket */
    const char *body;           /* content_length bytes, or NULL while unread */
    size_t body_len;
    /* The client: the TCP peer, or behind a trusted proxy (trusted_proxies)
     * the address X-Forwarded-For names (see hub_ip_client). */
    const char *peer;           /* numeric address ("127.0.0.1", "::1") */
    int peer_loopback;          /* 127.0.0.0/8, ::1, ::ffff:127.x */
    struct hub_ip peer_ip;
    unsigned secure : 1;        /* it came over TLS (the hub's own, tls_cert) */
};

/* Results of hub_request_parse_head. */
enum {
    HUB_REQ_INCOMPLETE = 0,     /* no end of head yet: read more */
    HUB_REQ_BAD = -1,           /* malformed: answer 400 and close */
    HUB_REQ_TOO_BIG = -2,       /* head over HUB_REQUEST_HEAD_MAX: 431 and close */
};

/* Looks for a complete request head at the start of buf[0..len) and parses
 * it. `scratch` (reset by the call) receives the NUL-terminated copies the
 * request points into (method, path, lower-cased names, values) and the
 * header array: the result is valid while `scratch` is unchanged; `buf`
 * may be discarded. On success returns the head's length in bytes (> 0)
 * and fills `r` (body NULL, peer unset); else a HUB_REQ_* value, with a
 * short reason in *why for HUB_REQ_BAD. Lines may end in CRLF or LF;
 * obsolete line folding, a bad request line, a header without a colon,
 * more than HUB_REQUEST_HEADERS_MAX headers, a bad or conflicting
 * Content-Length are all HUB_REQ_BAD. */
long hub_request_parse_head(const char *buf, size_t len, struct hub_request *r,
                            struct hub_buf *scratch, const char **why);

/* The value of header `name` (lower-case) and its length, or NULL. With
 * repeated headers, the first. */
const char *hub_request_header(const struct hub_request *r, const char *name,
                               size_t *len);

/* 1 if header `name` (lower-case) holds `token` in its comma-separated
 * list, case-insensitively ("Connection: keep-alive, Upgrade"). */
int hub_request_has_token(const struct hub_request *r, const char *name,
                          const char *token);

/* Calls fn(ud, element, len) for each element of the comma-separated
 * lists of every header `name` (lower-case), in order, with the
 * whitespace around each trimmed and empty elements skipped (RFC 9110
 * §5.6.1). Stops early when fn returns non-zero. Returns the number of
 * elements passed. */
size_t hub_request_list_each(const struct hub_request *r, const char *name,
                             int (*fn)(void *ud, const char *v, size_t len), void *ud);

/* 1 if the request's Origin names the host it was sent to: its host[:port]
 * (after http:// or https://) is the Host header, case-insensitively. 0
 * without an Origin, or for "null" or another scheme. */
int hub_request_origin_is_host(const struct hub_request *r);

/* Walks the query string: calls fn(ud, name, name_len, value, value_len)
 * for each `name=value` (or `name` alone, value "") with both
 * percent-decoded ('+' is a space in query strings). Stops early when fn
 * returns non-zero. The strings passed are valid during the call only. */
void hub_request_query_each(const struct hub_request *r,
                            int (*fn)(void *ud, const char *name, size_t nl,
                                      const char *value, size_t vl),
                            void *ud);

/* Percent-decodes src[0..n) into `out` (appended; `plus_space`: '+' means
 * ' '). A '%' not followed by two hex digits is kept as it is. Returns the
 * number of bytes appended. */
size_t hub_percent_decode(struct hub_buf *out, const char *src, size_t n, int plus_space);

#endif
