/* Fuzz target: the HTTP/1.x request head parser and its helpers
 * (src/request.c): hub_request_parse_head, hub_request_header,
 * hub_request_has_token, hub_request_list_each, hub_request_query_each and
 * hub_percent_decode. The input is what a client sent on a connection.
 *
 * Checks the contract of include/luahub/request.h: a parsed head ends at
 * its first empty line (one byte less is incomplete, the head alone parses
 * to the same length); names are lower-case tokens, values trimmed and free
 * of control bytes; Content-Length and keep-alive agree with the headers;
 * list elements are trimmed and non-empty; the query walk and the
 * percent-decoder give what a plain reading of their comments gives. */
#include <string.h>

#include "fuzz.h"
#include "luahub/request.h"
#include "luahub/util.h"

static int hexval(int c)
{
    static const char digits[] = "0123456789abcdef0123456789ABCDEF";
    const char *d = c ? strchr(digits, c) : NULL;
    return d ? (int)(d - digits) % 16 : -1;
}

/* hub_percent_decode as its comment says it: %XX decoded, a '%' without two
 * hex digits kept, '+' a space when asked. */
static size_t ref_decode(char *out, const char *s, size_t n, int plus)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%' && n - i >= 3 && hexval((unsigned char)s[i + 1]) >= 0 &&
            hexval((unsigned char)s[i + 2]) >= 0) {
            out[o++] = (char)(hexval((unsigned char)s[i + 1]) * 16 +
                              hexval((unsigned char)s[i + 2]));
            i += 2;
        } else {
            out[o++] = s[i] == '+' && plus ? ' ' : s[i];
        }
    }
    return o;
}

static void check_decode(const char *s, size_t n, int plus)
{
    struct hub_buf b = {0};
    char *ref = hub_xmalloc(n + 1);

    hub_buf_append(&b, "x", 1); /* it appends */
    size_t got = hub_percent_decode(&b, s, n, plus);
    size_t want = ref_decode(ref, s, n, plus);
    FUZZ_CHECK(got == want && b.len == 1 + got && !memcmp(b.p + 1, ref, got) &&
               b.p[b.len] == '\0', "percent-decode (plus %d): %zu bytes, expected %zu",
               plus, got, want);
    free(ref);
    hub_buf_free(&b);
}

/* ---- the query walk, against a plain reading of the query -------------- */

struct qwalk {
    const char *q;          /* the raw query */
    size_t len, pos;        /* where the next non-empty pair starts */
    int stop_at, count;
};

static int on_query(void *ud, const char *name, size_t nl, const char *value, size_t vl)
{
    struct qwalk *w = ud;
    char *rn, *rv;

    while (w->pos < w->len && w->q[w->pos] == '&')
        w->pos++;
    FUZZ_CHECK(w->pos < w->len, "query walk passed a pair that is not there");
    const char *s = w->q + w->pos, *amp = memchr(s, '&', w->len - w->pos);
    size_t seg = amp ? (size_t)(amp - s) : w->len - w->pos;
    const char *eq = memchr(s, '=', seg);
    size_t kl = eq ? (size_t)(eq - s) : seg;
    rn = hub_xmalloc(seg + 1);
    rv = hub_xmalloc(seg + 1);
    size_t rnl = ref_decode(rn, s, kl, 1);
    size_t rvl = eq ? ref_decode(rv, eq + 1, seg - kl - 1, 1) : 0;
    FUZZ_CHECK(nl == rnl && !memcmp(name, rn, nl), "query pair %d: name", w->count);
    FUZZ_CHECK(vl == rvl && !memcmp(value, rv, vl) && value[vl] == '\0',
               "query pair %d: value", w->count);
    free(rn);
    free(rv);
    w->pos += seg;
    return ++w->count == w->stop_at;
}

/* ---- comma-separated lists --------------------------------------------- */

struct lwalk {
    int stop_at, count;
};

static int on_elem(void *ud, const char *v, size_t len)
{
    struct lwalk *w = ud;
    FUZZ_CHECK(len > 0 && v[0] != ' ' && v[0] != '\t' && v[len - 1] != ' ' &&
               v[len - 1] != '\t' && !memchr(v, ',', len),
               "list element '%.*s' is empty, untrimmed or holds a comma", (int)len, v);
    return ++w->count == w->stop_at;
}

static int is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static void check_head(const char *buf, size_t len, long n, const struct hub_request *r,
                       uint8_t knob)
{
    struct hub_request r2;
    struct hub_buf scratch2 = {0};
    const char *why;

    FUZZ_CHECK((size_t)n <= len, "head of %ld bytes in %zu", n, len);
    /* the head ends at its first empty line */
    FUZZ_CHECK(hub_request_parse_head(buf, (size_t)n - 1, &r2, &scratch2, &why) ==
               HUB_REQ_INCOMPLETE, "one byte less than the head is not incomplete");
    FUZZ_CHECK(hub_request_parse_head(buf, (size_t)n, &r2, &scratch2, &why) == n,
               "the head alone parses differently");
    hub_buf_free(&scratch2);

    FUZZ_CHECK(r->method_len > 0 && strlen(r->method) == r->method_len, "method");
    for (size_t i = 0; i < r->method_len; i++)
        FUZZ_CHECK(is_tchar((unsigned char)r->method[i]) ||
                   (r->method[i] >= 'A' && r->method[i] <= 'Z'), "method byte");
    FUZZ_CHECK(r->target_len > 0 && r->target[0] == '/' &&
               strlen(r->target) == r->target_len, "target");
    FUZZ_CHECK(r->path[r->path_len] == '\0' && r->path_len <= r->target_len, "path");
    FUZZ_CHECK(r->query[r->query_len] == '\0', "query");
    FUZZ_CHECK(r->http_minor == 0 || r->http_minor == 1, "HTTP/1.%d", r->http_minor);
    FUZZ_CHECK(r->nheaders <= HUB_REQUEST_HEADERS_MAX, "%zu headers", r->nheaders);
    FUZZ_CHECK(r->body == NULL && r->peer == NULL, "body or peer set by the parser");

    int cl_seen = 0;
    for (size_t i = 0; i < r->nheaders; i++) {
        const struct hub_header *h = &r->headers[i];
        FUZZ_CHECK(h->name_len > 0 && strlen(h->name) == h->name_len, "header name");
        for (size_t k = 0; k < h->name_len; k++)
            FUZZ_CHECK(is_tchar((unsigned char)h->name[k]), "header name byte 0x%02x",
                       (unsigned char)h->name[k]);
        FUZZ_CHECK(h->value[h->value_len] == '\0', "header value not terminated");
        for (size_t k = 0; k < h->value_len; k++)
            FUZZ_CHECK(((unsigned char)h->value[k] >= 0x20 || h->value[k] == '\t') &&
                       h->value[k] != 0x7f, "control byte in a header value");
        if (h->value_len)
            FUZZ_CHECK(h->value[0] != ' ' && h->value[0] != '\t' &&
                       h->value[h->value_len - 1] != ' ' &&
                       h->value[h->value_len - 1] != '\t', "header value not trimmed");
        size_t vl;
        const char *first = hub_request_header(r, h->name, &vl);
        FUZZ_CHECK(first && first <= h->value, "hub_request_header missed '%s'", h->name);
        if (!strcmp(h->name, "content-length")) {
            uint64_t v = 0;
            for (size_t k = 0; k < h->value_len; k++)
                v = v * 10 + (uint64_t)(h->value[k] - '0');
            FUZZ_CHECK(r->has_content_length && v == r->content_length,
                       "Content-Length %s vs %llu", h->value,
                       (unsigned long long)r->content_length);
            cl_seen = 1;
        }
        if (!strcmp(h->name, "transfer-encoding"))
            FUZZ_CHECK(r->chunked, "Transfer-Encoding without chunked");
    }
    FUZZ_CHECK(cl_seen == r->has_content_length && (cl_seen || r->content_length == 0),
               "Content-Length flag");
    int close = hub_request_has_token(r, "connection", "close");
    int keep = hub_request_has_token(r, "connection", "keep-alive");
    FUZZ_CHECK(r->keep_alive == (!close && (r->http_minor == 1 || keep)), "keep_alive");
    FUZZ_CHECK(r->upgrade_websocket == hub_request_has_token(r, "upgrade", "websocket"),
               "upgrade_websocket");

    /* the lists the hub reads, and the first header's, stopping early */
    static const char *const lists[] = {"sec-websocket-protocol", "connection", "upgrade"};
    for (size_t i = 0; i < 3 + (r->nheaders > 0); i++) {
        struct lwalk w = {.stop_at = knob & 7};
        const char *name = i < 3 ? lists[i] : r->headers[0].name;
        size_t got = hub_request_list_each(r, name, on_elem, &w);
        FUZZ_CHECK(got == (size_t)w.count, "list_each counted %zu, passed %d", got, w.count);
    }

    struct qwalk q = {.q = r->query, .len = r->query_len, .stop_at = (knob >> 3) & 15};
    hub_request_query_each(r, on_query, &q);
    if (!q.stop_at || q.count < q.stop_at) {
        while (q.pos < q.len && q.q[q.pos] == '&')
            q.pos++;
        FUZZ_CHECK(q.pos == q.len, "query walk stopped at %zu of %zu", q.pos, q.len);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    struct hub_request r;
    struct hub_buf scratch = {0};
    const char *why = "unset";

    long n = hub_request_parse_head(buf, size, &r, &scratch, &why);
    if (n > 0)
        check_head(buf, size, n, &r, size ? data[size - 1] : 0);
    else if (n == HUB_REQ_BAD)
        FUZZ_CHECK(why && *why, "refused without a reason");
    else
        FUZZ_CHECK(n == HUB_REQ_INCOMPLETE || (n == HUB_REQ_TOO_BIG &&
                                               size >= HUB_REQUEST_HEAD_MAX),
                   "parse_head returned %ld for %zu bytes", n, size);
    hub_buf_free(&scratch);

    check_decode(buf, size, 0);
    check_decode(buf, size, 1);
    return 0;
}
