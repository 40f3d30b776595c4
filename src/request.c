/* The HTTP/1.x request head parser (RFC 9112 §2-3 and §6, the parts a
 * server needs): request line, header fields, Content-Length,
 * Transfer-Encoding, Connection, Expect, Upgrade. Strict where laxness lets
 * a request mean two things to two parsers (obsolete line folding, a
 * conflicting Content-Length, control bytes in values); lenient where
 * clients differ harmlessly (bare LF line ends, empty lines before the
 * request line). */
#include "luahub/request.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define METHOD_MAX 16

static int is_tchar(unsigned char c)
{
    /* token = 1*tchar (RFC 9110 §5.6.2) */
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

size_t hub_percent_decode(struct hub_buf *out, const char *src, size_t n, int plus_space)
{
    size_t start = out->len;

    hub_buf_reserve(out, n + 1);
    for (size_t i = 0; i < n; i++) {
        char c = src[i];
        int h, l;
        if (c == '%' && i + 2 < n && (h = hexval((unsigned char)src[i + 1])) >= 0 &&
            (l = hexval((unsigned char)src[i + 2])) >= 0) {
            c = (char)(h << 4 | l);
            i += 2;
        } else if (c == '+' && plus_space) {
            c = ' ';
        }
        out->p[out->len++] = c;
    }
    out->p[out->len] = '\0';
    return out->len - start;
}

/* The end of line that starts at p (CRLF or LF): returns the length of the
 * line without its terminator and sets *next past it, or returns -1 when
 * there is no LF before end. A CR elsewhere than before the LF is left in
 * the line (and refused by the caller as a control byte). */
static long line_end(const char *p, const char *end, const char **next)
{
    const char *lf = memchr(p, '\n', (size_t)(end - p));
    if (!lf)
        return -1;
    *next = lf + 1;
    if (lf > p && lf[-1] == '\r')
        lf--;
    return lf - p;
}

/* Offsets into the scratch buffer (it may move while it grows). */
struct hoff {
    size_t name, name_len, value, value_len;
};

static size_t put(struct hub_buf *b, const char *p, size_t n)
{
    size_t off = b->len;
    hub_buf_append(b, p, n);
    hub_buf_append(b, "", 1); /* the NUL, counted in len */
    return off;
}

static int parse_content_length(const char *v, size_t n, uint64_t *out)
{
    uint64_t x = 0;
    if (n == 0 || n > 18)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return -1;
        x = x * 10 + (uint64_t)(v[i] - '0');
    }
    *out = x;
    return 0;
}

static int token_in_list(const char *v, size_t n, const char *token)
{
    size_t tl = strlen(token), i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t s = i;
        while (i < n && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - s == tl && !strncasecmp(v + s, token, tl))
            return 1;
    }
    return 0;
}

long hub_request_parse_head(const char *buf, size_t len, struct hub_request *r,
                            struct hub_buf *scratch, const char **why)
{
    const char *p = buf, *end, *next = NULL;
    struct hoff hdr[HUB_REQUEST_HEADERS_MAX];
    size_t nh = 0, moff, toff, poff, qoff, head_len;
    const char *lim = buf + (len < HUB_REQUEST_HEAD_MAX ? len : HUB_REQUEST_HEAD_MAX);
    long n;

    *why = NULL;
    memset(r, 0, sizeof(*r));
    hub_buf_reset(scratch);

    /* Empty lines before the request line are ignored (RFC 9112 §2.2). */
    while (p < lim && (*p == '\r' || *p == '\n'))
        p++;
    /* A method starts with a letter: refuse garbage without waiting for
     * an end of line that may never come. */
    if (p < lim && !((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z')))
        goto bad_line;
    /* The end of the head: an empty line. */
    for (end = p; end < lim; end++) {
        if (*end != '\n')
            continue;
        if (end + 1 < lim && end[1] == '\n')
            break;
        if (end + 2 < lim && end[1] == '\r' && end[2] == '\n')
            break;
    }
    if (end >= lim)
        return len >= HUB_REQUEST_HEAD_MAX ? HUB_REQ_TOO_BIG : HUB_REQ_INCOMPLETE;
    head_len = (size_t)(end - buf) + (end[1] == '\n' ? 2 : 3);
    end++; /* the empty line starts here */

    /* Request line: method SP target SP HTTP/1.x */
    n = line_end(p, end, &next);
    const char *sp1 = memchr(p, ' ', (size_t)n);
    if (!sp1 || sp1 == p || sp1 - p > METHOD_MAX)
        goto bad_line;
    for (const char *q = p; q < sp1; q++)
        if (!is_tchar((unsigned char)*q))
            goto bad_line;
    const char *t = sp1 + 1, *sp2 = memchr(t, ' ', (size_t)(p + n - t));
    if (!sp2 || sp2 == t || p + n - sp2 != 9 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0 ||
        (sp2[8] != '0' && sp2[8] != '1'))
        goto bad_line;
    for (const char *q = t; q < sp2; q++)
        if ((unsigned char)*q <= 0x20 || *q == 0x7f)
            goto bad_line;
    if (*t != '/') {
        *why = "the request target must be a path starting with '/'";
        return HUB_REQ_BAD;
    }
    r->http_minor = sp2[8] - '0';
    moff = put(scratch, p, (size_t)(sp1 - p));
    r->method_len = (size_t)(sp1 - p);
    toff = put(scratch, t, (size_t)(sp2 - t));
    r->target_len = (size_t)(sp2 - t);
    const char *qm = memchr(t, '?', (size_t)(sp2 - t));
    const char *pe = qm ? qm : sp2;
    poff = scratch->len;
    r->path_len = hub_percent_decode(scratch, t, (size_t)(pe - t), 0);
    hub_buf_append(scratch, "", 1);
    qoff = put(scratch, qm ? qm + 1 : "", qm ? (size_t)(sp2 - qm - 1) : 0);
    r->query_len = qm ? (size_t)(sp2 - qm - 1) : 0;

    /* Header fields. */
    int conn_close = 0, conn_keep = 0;
    for (p = next; p < end; p = next) {
        n = line_end(p, end, &next);
        if (n < 0)
            break;
        if (n == 0)
            break; /* the empty line */
        if (*p == ' ' || *p == '\t') {
            *why = "obsolete line folding in the header fields";
            return HUB_REQ_BAD;
        }
        const char *colon = memchr(p, ':', (size_t)n);
        if (!colon || colon == p) {
            *why = "a header line without a name and a colon";
            return HUB_REQ_BAD;
        }
        for (const char *q = p; q < colon; q++)
            if (!is_tchar((unsigned char)*q)) {
                *why = "a header name with a character that is not allowed";
                return HUB_REQ_BAD;
            }
        const char *v = colon + 1, *ve = p + n;
        while (v < ve && (*v == ' ' || *v == '\t'))
            v++;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
            ve--;
        for (const char *q = v; q < ve; q++)
            if (((unsigned char)*q < 0x20 && *q != '\t') || *q == 0x7f) {
                *why = "a control character in a header value";
                return HUB_REQ_BAD;
            }
        if (nh == HUB_REQUEST_HEADERS_MAX) {
            *why = "too many header fields";
            return HUB_REQ_BAD;
        }
        struct hoff *h = &hdr[nh++];
        h->name_len = (size_t)(colon - p);
        h->name = put(scratch, p, h->name_len);
        for (size_t i = 0; i < h->name_len; i++) {
            char *c = scratch->p + h->name + i;
            if (*c >= 'A' && *c <= 'Z')
                *c = (char)(*c + 32);
        }
        h->value_len = (size_t)(ve - v);
        h->value = put(scratch, v, h->value_len);

        const char *name = scratch->p + h->name;
        if (!strcmp(name, "content-length")) {
            uint64_t cl;
            if (parse_content_length(v, h->value_len, &cl) < 0 ||
                (r->has_content_length && cl != r->content_length)) {
                *why = "invalid Content-Length";
                return HUB_REQ_BAD;
            }
            r->content_length = cl;
            r->has_content_length = 1;
        } else if (!strcmp(name, "transfer-encoding")) {
            r->chunked = 1;
        } else if (!strcmp(name, "connection")) {
            conn_close |= token_in_list(v, h->value_len, "close");
            conn_keep |= token_in_list(v, h->value_len, "keep-alive");
        } else if (!strcmp(name, "expect")) {
            r->expect_continue |= h->value_len == 12 && !strncasecmp(v, "100-continue", 12);
        } else if (!strcmp(name, "upgrade")) {
            r->upgrade_websocket |= token_in_list(v, h->value_len, "websocket");
        }
    }
    r->keep_alive = !conn_close && (r->http_minor == 1 || conn_keep);

    /* Pointers last: the scratch buffer has stopped moving. The header
     * array goes after the strings, aligned. */
    size_t pad = (sizeof(void *) - scratch->len % sizeof(void *)) % sizeof(void *);
    hub_buf_append(scratch, "\0\0\0\0\0\0\0\0", pad);
    size_t aoff = scratch->len;
    hub_buf_reserve(scratch, nh * sizeof(struct hub_header) + 1);
    scratch->len += nh * sizeof(struct hub_header);
    scratch->p[scratch->len] = '\0';
    struct hub_header *ha = (struct hub_header *)(void *)(scratch->p + aoff);
    for (size_t i = 0; i < nh; i++) {
        ha[i].name = scratch->p + hdr[i].name;
        ha[i].name_len = hdr[i].name_len;
        ha[i].value = scratch->p + hdr[i].value;
        ha[i].value_len = hdr[i].value_len;
    }
    r->headers = ha;
    r->nheaders = nh;
    r->method = scratch->p + moff;
    r->target = scratch->p + toff;
    r->path = scratch->p + poff;
    r->query = scratch->p + qoff;
    return (long)head_len;

bad_line:
    *why = "malformed request line (expected: METHOD /path HTTP/1.1)";
    return HUB_REQ_BAD;
}

const char *hub_request_header(const struct hub_request *r, const char *name, size_t *len)
{
    for (size_t i = 0; i < r->nheaders; i++)
        if (!strcmp(r->headers[i].name, name)) {
            if (len)
                *len = r->headers[i].value_len;
            return r->headers[i].value;
        }
    return NULL;
}

int hub_request_has_token(const struct hub_request *r, const char *name, const char *token)
{
    for (size_t i = 0; i < r->nheaders; i++)
        if (!strcmp(r->headers[i].name, name) &&
            token_in_list(r->headers[i].value, r->headers[i].value_len, token))
            return 1;
    return 0;
}

int hub_request_origin_is_host(const struct hub_request *r)
{
    size_t ol = 0, hl = 0;
    const char *origin = hub_request_header(r, "origin", &ol);
    const char *host = hub_request_header(r, "host", &hl);
    if (!origin || !host)
        return 0;
    if (ol > 7 && !strncasecmp(origin, "http://", 7)) {
        origin += 7;
        ol -= 7;
    } else if (ol > 8 && !strncasecmp(origin, "https://", 8)) {
        origin += 8;
        ol -= 8;
    } else {
        return 0;
    }
    return ol == hl && !strncasecmp(origin, host, hl);
}

size_t hub_request_list_each(const struct hub_request *r, const char *name,
                             int (*fn)(void *ud, const char *v, size_t len), void *ud)
{
    size_t n = 0;
    for (size_t i = 0; i < r->nheaders; i++) {
        const struct hub_header *h = &r->headers[i];
        if (strcmp(h->name, name) != 0)
            continue;
        const char *p = h->value, *end = h->value + h->value_len;
        while (p < end) {
            const char *comma = memchr(p, ',', (size_t)(end - p));
            const char *e = comma ? comma : end, *b = p;
            while (b < e && (*b == ' ' || *b == '\t'))
                b++;
            while (e > b && (e[-1] == ' ' || e[-1] == '\t'))
                e--;
            if (e > b) {
                n++;
                if (fn(ud, b, (size_t)(e - b)))
                    return n;
            }
            p = comma ? comma + 1 : end;
        }
    }
    return n;
}

void hub_request_query_each(const struct hub_request *r,
                            int (*fn)(void *ud, const char *name, size_t nl,
                                      const char *value, size_t vl),
                            void *ud)
{
    struct hub_buf name = {0}, value = {0};
    const char *q = r->query, *end = r->query + r->query_len;

    while (q < end) {
        const char *amp = memchr(q, '&', (size_t)(end - q));
        const char *e = amp ? amp : end;
        if (e > q) {
            const char *eq = memchr(q, '=', (size_t)(e - q));
            hub_buf_reset(&name);
            hub_buf_reset(&value);
            hub_percent_decode(&name, q, (size_t)((eq ? eq : e) - q), 1);
            if (eq)
                hub_percent_decode(&value, eq + 1, (size_t)(e - eq - 1), 1);
            else
                hub_buf_append(&value, "", 0);
            if (fn(ud, name.p, name.len, value.p ? value.p : "", value.len))
                break;
        }
        q = e + 1;
    }
    hub_buf_free(&name);
    hub_buf_free(&value);
}
