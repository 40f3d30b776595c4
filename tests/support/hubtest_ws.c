/* hubtest's WebSocket client (RFC 6455, see hubtest.h): the handshake with
 * its Sec-WebSocket-Accept check, masked frames of any shape, reading and
 * reassembling server frames, and the protocol helpers built on them
 * (ws_expect, ws_sync, ws_subscribe...). SHA-1 and base64 are implemented
 * here, for the handshake check only, so the suites need nothing but Check
 * and yajl. Sockets and the HTTP response parser come from hubtest.c
 * through hubtest_int.h. */
#include "hubtest_int.h"    /* first: no location macros, internal calls keep the caller's */

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* SHA-1 (FIPS 180-4) and base64, for Sec-WebSocket-Accept only        */
/* ------------------------------------------------------------------ */

static uint32_t rol(uint32_t x, int n)
{
    return (x << n) | (x >> (32 - n));
}

static void sha1_block(uint32_t h[5], const unsigned char *p)
{
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1(const void *data, size_t len, unsigned char out[20])
{
    uint32_t h[5] = { 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0 };
    const unsigned char *p = data;
    size_t left = len;
    while (left >= 64) {
        sha1_block(h, p);
        p += 64;
        left -= 64;
    }
    unsigned char last[128] = { 0 };
    memcpy(last, p, left);
    last[left] = 0x80;
    size_t total = left + 1 + 8 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        last[total - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64)
        sha1_block(h, last + off);
    for (int i = 0; i < 5; i++) {
        out[4 * i] = (unsigned char)(h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(h[i] >> 8);
        out[4 * i + 3] = (unsigned char)h[i];
    }
}

/* Standard base64 of `n` bytes into `out` (4 * ceil(n / 3) + 1 bytes). */
static void base64(const unsigned char *in, size_t n, char *out)
{
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = tab[(v >> 18) & 63];
        out[o++] = tab[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? tab[v & 63] : '=';
    }
    out[o] = '\0';
}

void ws_accept_key(const char *key, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    char buf[256];
    int n = snprintf(buf, sizeof buf, "%s%s", key, guid);
    CHECK(n > 0 && (size_t)n < sizeof buf, "Sec-WebSocket-Key too long");
    unsigned char digest[20];
    sha1(buf, (size_t)n, digest);
    base64(digest, 20, out);
}

static void random_bytes(void *p, size_t n)
{
    ssize_t r = getrandom(p, n, 0);
    CHECK(r == (ssize_t)n, "getrandom: %s", strerror(errno));
}

/* ------------------------------------------------------------------ */
/* WebSocket client                                                     */
/* ------------------------------------------------------------------ */

void ws_frame_free(struct ws_frame *f)
{
    free(f->data);
    f->data = NULL;
}

static struct ws *ws_new(int fd)
{
    struct ws *c = calloc(1, sizeof *c);
    CHECK(c != NULL, "out of memory");
    c->fd = fd;
    c->auto_pong = 1;
    c->next_id = 1000000;
    return c;
}

void ws_free(struct ws *c)
{
    if (!c)
        return;
    close(c->fd);
    free(c->rbuf);
    free(c->welcome);
    free(c);
}

void ws_abort(struct ws *c)
{
    struct linger lg = { .l_onoff = 1, .l_linger = 0 };
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    ws_free(c);
}

int ws_handshake(int port, const struct ws_opts *o, struct ws **out,
                 struct http_resp *resp)
{
    struct ws_opts def = { 0 };
    if (!o)
        o = &def;
    *out = NULL;
    unsigned char nonce[16];
    random_bytes(nonce, sizeof nonce);
    char key[25], accept[29];
    base64(nonce, sizeof nonce, key);
    ws_accept_key(key, accept);

    int fd = tcp_connect_opts(port, o->rcvbuf);
    char *req = xasprintf("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                          "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                          o->path ? o->path : "/ws", port, key,
                          o->headers ? o->headers : "");
    int64_t deadline = ht_now_ms() + HT_WAIT_MS;
    int sent = ht_send_all(fd, req, strlen(req), deadline);
    free(req);
    CHECK(sent == 0 || sent == -ECONNRESET || sent == -EPIPE, "WebSocket handshake: send: %s",
          strerror(-sent));

    struct ht_rbuf b = { 0 };
    struct http_resp r;
    /* read the head only: what follows a 101 is WebSocket frames */
    char *end;
    while (!(b.p && (end = strstr(b.p, "\r\n\r\n")))) {
        int f = sent ? 0 : ht_rbuf_fill(fd, &b, deadline);
        if (f == 0 && b.len == 0) {
            /* closed without a word */
            close(fd);
            free(b.p);
            if (resp) {
                memset(resp, 0, sizeof *resp);
                resp->head = xstrndup("", 0);
                resp->body = xstrndup("", 0);
            }
            return 0;
        }
        if (f <= 0)
            FAIL("WebSocket handshake: %s before the end of the response head; got: %.*s",
                         f == 0 ? "connection closed" : "timed out",
                         (int)b.len, b.p ? b.p : "");
    }
    memset(&r, 0, sizeof r);
    size_t hlen = (size_t)(end - b.p) + 2;
    r.head = xstrndup(b.p, hlen);
    int minor;
    if (sscanf(r.head, "HTTP/1.%d %d", &minor, &r.status) != 2)
        FAIL("WebSocket handshake: bad status line: %s", r.head);
    if (r.status != 101) {
        /* not upgraded: read it as an ordinary response */
        free(r.head);
        ht_read_response(fd, &b, &r, deadline, 0);
        close(fd);
        free(b.p);
        int st = r.status;
        if (resp)
            *resp = r;
        else
            http_resp_free(&r);
        return st;
    }
    size_t vl;
    const char *v = ht_find_header(r.head, "Upgrade", &vl);
    CHECK(v && vl == 9 && strncasecmp(v, "websocket", 9) == 0,
                  "101 without Upgrade: websocket:\n%s", r.head);
    v = ht_find_header(r.head, "Connection", &vl);
    CHECK(v && memmem(v, vl, "pgrade", 6),
                  "101 without Connection: Upgrade:\n%s", r.head);
    v = ht_find_header(r.head, "Sec-WebSocket-Accept", &vl);
    CHECK(v && vl == 28 && memcmp(v, accept, 28) == 0,
                  "Sec-WebSocket-Accept is not %s:\n%s", accept, r.head);
    /* the bytes after the head are the first frames */
    size_t off = hlen + 2;
    struct ws *c = ws_new(fd);
    c->rcap = b.cap;
    c->rbuf = (unsigned char *)b.p;
    c->rlen = b.len - off;
    memmove(c->rbuf, c->rbuf + off, c->rlen);
    if (resp)
        *resp = r;
    else
        http_resp_free(&r);
    if (!o->no_welcome) {
        char *w = ws_recv_text(c);
        yajl_val v2 = json_parse(w);
        const char *op = json_get_str(v2, "op");
        CHECK(op && strcmp(op, "welcome") == 0,
                      "first frame is not a welcome: %s", w);
        yajl_tree_free(v2);
        c->welcome = w;
    }
    *out = c;
    return 101;
}

struct ws *ws_connect(int port)
{
    return ws_connect_opts(port, NULL);
}

struct ws *ws_connect_opts(int port, const struct ws_opts *o)
{
    struct ws *c;
    struct http_resp r;
    int st = ws_handshake(port, o, &c, &r);
    if (st != 101)
        FAIL("WebSocket upgrade refused: status %d\n%s%s", st, r.head, r.body);
    http_resp_free(&r);
    return c;
}

int ws_send_raw(struct ws *c, const void *p, size_t n)
{
    return ht_send_all(c->fd, p, n, ht_now_ms() + HT_WAIT_MS);
}

void ws_send_frame(struct ws *c, int fin, int opcode, const void *p, size_t len)
{
    unsigned char *f = xmalloc(len + 14);
    size_t h = 0;
    f[h++] = (unsigned char)((fin ? 0x80 : 0) | (opcode & 0x0f));
    if (len < 126) {
        f[h++] = (unsigned char)(0x80 | len);
    } else if (len <= 0xffff) {
        f[h++] = 0x80 | 126;
        f[h++] = (unsigned char)(len >> 8);
        f[h++] = (unsigned char)len;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            f[h++] = (unsigned char)((uint64_t)len >> (8 * i));
    }
    unsigned char mask[4];
    random_bytes(mask, 4);
    memcpy(f + h, mask, 4);
    h += 4;
    const unsigned char *s = p;
    for (size_t i = 0; i < len; i++)
        f[h + i] = s[i] ^ mask[i & 3];
    int r = ws_send_raw(c, f, h + len);
    free(f);
    CHECK(r == 0, "WebSocket send (opcode %d, %zu bytes): %s", opcode, len,
                  strerror(-r));
}

void ws_send_text(struct ws *c, const char *s)
{
    ws_send_frame(c, 1, WS_TEXT, s, strlen(s));
}

void ws_send_binary(struct ws *c, const void *p, size_t len)
{
    ws_send_frame(c, 1, WS_BINARY, p, len);
}

void ws_send_fragments(struct ws *c, int opcode, const void *p, size_t len,
                       const size_t *sizes, size_t nsizes)
{
    CHECK(nsizes > 0, "ws_send_fragments: no sizes");
    const char *s = p;
    size_t off = 0, i = 0;
    do {
        size_t n = sizes[i < nsizes ? i : nsizes - 1];
        if (n > len - off)
            n = len - off;
        int last = off + n == len;
        ws_send_frame(c, last, i == 0 ? opcode : WS_CONT, s + off, n);
        off += n;
        i++;
    } while (off < len);
}

void ws_send_close(struct ws *c, int code, const char *reason)
{
    unsigned char buf[125];
    size_t n = 0;
    if (code) {
        size_t rl = reason ? strlen(reason) : 0;
        CHECK(rl <= 123, "close reason too long");
        buf[0] = (unsigned char)(code >> 8);
        buf[1] = (unsigned char)code;
        memcpy(buf + 2, reason, rl);
        n = 2 + rl;
    }
    ws_send_frame(c, 1, WS_CLOSE, buf, n);
}

/* Makes sure `need` bytes are buffered. Returns 1, 0 on timeout, -1 when
 * the connection closed first. */
static int ws_fill(struct ws *c, size_t need, int64_t deadline)
{
    while (c->rlen < need) {
        if (c->rcap - c->rlen < 16384 || c->rcap < need + 1) {
            size_t cap = c->rcap ? c->rcap * 2 : 65536;
            while (cap < need + 16384)
                cap *= 2;
            c->rbuf = xrealloc(c->rbuf, cap);
            c->rcap = cap;
        }
        ssize_t n = tcp_recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, ht_remaining(deadline));
        if (n == HT_TIMEOUT)
            return 0;
        if (n == 0)
            return -1;
        c->rlen += (size_t)n;
    }
    return 1;
}

static int recv_frame_until(struct ws *c, struct ws_frame *f, int64_t deadline)
{
    memset(f, 0, sizeof *f);
    int r = ws_fill(c, 2, deadline);
    if (r <= 0)
        return r;
    unsigned char b0 = c->rbuf[0], b1 = c->rbuf[1];
    CHECK((b0 & 0x70) == 0, "server frame with RSV bits set: 0x%02x", b0);
    CHECK((b1 & 0x80) == 0, "server frame is masked (RFC 6455 5.1 forbids it)");
    size_t h = 2;
    uint64_t len = b1 & 0x7f;
    if (len == 126) {
        if ((r = ws_fill(c, 4, deadline)) <= 0)
            return r;
        len = (uint64_t)c->rbuf[2] << 8 | c->rbuf[3];
        h = 4;
    } else if (len == 127) {
        if ((r = ws_fill(c, 10, deadline)) <= 0)
            return r;
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | c->rbuf[2 + i];
        h = 10;
    }
    CHECK(len < (64u << 20), "server frame of %llu bytes", (unsigned long long)len);
    if ((r = ws_fill(c, h + len, deadline)) <= 0)
        return r;
    f->opcode = b0 & 0x0f;
    f->fin = (b0 & 0x80) != 0;
    f->len = (size_t)len;
    f->data = xstrndup((const char *)c->rbuf + h, f->len);
    c->rlen -= h + f->len;
    memmove(c->rbuf, c->rbuf + h + f->len, c->rlen);

    if (f->opcode >= 0x8) {
        CHECK(f->fin && f->len <= 125,
                      "bad server control frame: opcode %d fin %d len %zu",
                      f->opcode, f->fin, f->len);
    }
    if (f->opcode == WS_CLOSE) {
        CHECK(f->len != 1, "close frame with a 1-byte payload");
        if (f->len == 0) {
            f->close_code = 1005;
        } else {
            f->close_code = (unsigned char)f->data[0] << 8 | (unsigned char)f->data[1];
            snprintf(f->close_reason, sizeof f->close_reason, "%.*s",
                     (int)(f->len - 2), f->data + 2);
        }
    } else if (f->opcode == WS_PING) {
        c->pings++;
        if (c->auto_pong) {
            /* mask + send by hand: the peer may be gone, which is not an error here */
            unsigned char buf[6 + 125], mask[4];
            random_bytes(mask, 4);
            buf[0] = 0x80 | WS_PONG;
            buf[1] = (unsigned char)(0x80 | f->len);
            memcpy(buf + 2, mask, 4);
            for (size_t i = 0; i < f->len; i++)
                buf[6 + i] = (unsigned char)f->data[i] ^ mask[i & 3];
            (void)ws_send_raw(c, buf, 6 + f->len);
        }
    } else {
        CHECK(f->opcode == WS_CONT || f->opcode == WS_TEXT ||
                      f->opcode == WS_BINARY || f->opcode == WS_PONG,
                      "server frame with reserved opcode %d", f->opcode);
    }
    return 1;
}

int ws_recv_frame(struct ws *c, struct ws_frame *f, int timeout_ms)
{
    return recv_frame_until(c, f, ht_now_ms() + timeout_ms);
}

int ws_recv_msg(struct ws *c, struct ws_frame *f, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    struct ws_frame msg = { 0 };
    int have = 0;
    for (;;) {
        struct ws_frame fr;
        int r = recv_frame_until(c, &fr, deadline);
        if (r <= 0) {
            ws_frame_free(&msg);
            return r;
        }
        if (fr.opcode == WS_PING || fr.opcode == WS_PONG) {
            ws_frame_free(&fr);
            continue;
        }
        if (fr.opcode == WS_CLOSE) {
            ws_frame_free(&msg);
            *f = fr;
            return 1;
        }
        if (!have) {
            CHECK(fr.opcode != WS_CONT, "continuation frame without a first frame");
            msg = fr;
            have = 1;
        } else {
            CHECK(fr.opcode == WS_CONT,
                          "new data frame (opcode %d) inside a fragmented message", fr.opcode);
            msg.data = xrealloc(msg.data, msg.len + fr.len + 1);
            memcpy(msg.data + msg.len, fr.data, fr.len);
            msg.len += fr.len;
            msg.data[msg.len] = '\0';
            msg.fin = fr.fin;
            ws_frame_free(&fr);
        }
        if (msg.fin) {
            *f = msg;
            return 1;
        }
    }
}

/* Describes a ws_recv_msg outcome for failure messages (static buffer). */
static const char *describe(int r, const struct ws_frame *f)
{
    static __thread char buf[600];
    if (r == 0)
        return "nothing (timed out)";
    if (r < 0)
        return "TCP close (no close frame)";
    if (f->opcode == WS_CLOSE)
        snprintf(buf, sizeof buf, "close frame %d \"%s\"", f->close_code, f->close_reason);
    else
        snprintf(buf, sizeof buf, "%s message (%zu bytes) %.500s",
                 f->opcode == WS_TEXT ? "text" : "binary", f->len, f->data);
    return buf;
}

char *ws_recv_text(struct ws *c)
{
    struct ws_frame f;
    int r = ws_recv_msg(c, &f, HT_WAIT_MS);
    if (r != 1 || f.opcode != WS_TEXT)
        FAIL("expected a text message, got %s", describe(r, &f));
    return f.data;
}

yajl_val ws_recv_json(struct ws *c)
{
    char *t = ws_recv_text(c);
    yajl_val v = json_parse(t);
    free(t);
    return v;
}

void ws_expect(struct ws *c, const char *want)
{
    struct ws_frame f;
    int r = ws_recv_msg(c, &f, HT_WAIT_MS);
    if (r != 1 || f.opcode != WS_TEXT || f.len != strlen(want) ||
        memcmp(f.data, want, f.len) != 0)
        FAIL("expected text message\n  %s\ngot %s", want, describe(r, &f));
    ws_frame_free(&f);
}

void ws_expect_pair(struct ws *c, const char *a, const char *b)
{
    char *x = ws_recv_text(c);
    char *y = ws_recv_text(c);
    int ok = (strcmp(x, a) == 0 && strcmp(y, b) == 0) ||
             (strcmp(x, b) == 0 && strcmp(y, a) == 0);
    if (!ok)
        FAIL("expected the two messages\n  %s\n  %s\n(in any order), got\n  %s\n  %s",
                     a, b, x, y);
    free(x);
    free(y);
}

char *ws_expect_error(struct ws *c, const char *id_json, const char *code)
{
    char *t = ws_recv_text(c);
    char *prefix = id_json
        ? xasprintf("{\"id\":%s,\"ok\":false,\"error\":{\"code\":\"%s\",\"message\":\"", id_json, code)
        : xasprintf("{\"ok\":false,\"error\":{\"code\":\"%s\",\"message\":\"", code);
    size_t pl = strlen(prefix), tl = strlen(t);
    int ok = tl > pl + 3 && strncmp(t, prefix, pl) == 0 &&
             strcmp(t + tl - 3, "\"}}") == 0;
    if (ok) {
        /* the whole text must be valid JSON whose message is a non-empty string */
        char err[256];
        yajl_val v = yajl_tree_parse(t, err, sizeof err);
        const char *m = v ? json_get_str(v, "error", "message") : NULL;
        ok = m && *m;
        yajl_tree_free(v);
    }
    if (!ok)
        FAIL("expected error reply\n  %s<non-empty>\"}}\ngot\n  %s", prefix, t);
    free(prefix);
    return t;
}

void ws_expect_close(struct ws *c, int code)
{
    struct ws_frame f;
    int r = ws_recv_msg(c, &f, HT_WAIT_MS);
    if (r != 1 || f.opcode != WS_CLOSE || f.close_code != code)
        FAIL("expected close frame %d, got %s", code, describe(r, &f));
    ws_frame_free(&f);
    /* answer like a well-behaved client; the server may already be gone */
    unsigned char buf[8] = { 0x80 | WS_CLOSE, 0x80 | 2 };
    random_bytes(buf + 2, 4);
    buf[6] = (unsigned char)((code >> 8) ^ buf[2]);
    buf[7] = (unsigned char)((code & 0xff) ^ buf[3]);
    (void)ws_send_raw(c, buf, sizeof buf);
    CHECK(tcp_wait_closed(c->fd, HT_WAIT_MS),
                  "server did not close the TCP connection after the close handshake");
}

void ws_expect_dropped(struct ws *c, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    for (;;) {
        struct ws_frame f;
        int r = recv_frame_until(c, &f, deadline);
        if (r < 0)
            return;
        if (r == 1 && (f.opcode == WS_PING || f.opcode == WS_PONG)) {
            ws_frame_free(&f);
            continue;
        }
        FAIL("expected the connection to be dropped within %d ms, got %s",
                     timeout_ms, r == 0 ? "nothing (still open)" : describe(r, &f));
    }
}

void ws_sync(struct ws *c)
{
    long long id = c->next_id++;
    char req[96], want[96];
    snprintf(req, sizeof req, "{\"op\":\"ping\",\"id\":\"sync-%lld\"}", id);
    snprintf(want, sizeof want, "{\"id\":\"sync-%lld\",\"ok\":true}", id);
    ws_send_text(c, req);
    ws_expect(c, want);
}

static void command_ok(struct ws *c, const char *op, const char *channel,
                       const char *data, int echo_channel)
{
    long long id = c->next_id++;
    char *req = data
        ? xasprintf("{\"op\":\"%s\",\"channel\":\"%s\",\"data\":%s,\"id\":%lld}", op, channel, data, id)
        : xasprintf("{\"op\":\"%s\",\"channel\":\"%s\",\"id\":%lld}", op, channel, id);
    char *want = echo_channel
        ? xasprintf("{\"id\":%lld,\"ok\":true,\"channel\":\"%s\"}", id, channel)
        : xasprintf("{\"id\":%lld,\"ok\":true}", id);
    ws_send_text(c, req);
    ws_expect(c, want);
    free(req);
    free(want);
}

void ws_subscribe(struct ws *c, const char *channel)
{
    command_ok(c, "subscribe", channel, NULL, 1);
}

void ws_unsubscribe(struct ws *c, const char *channel)
{
    command_ok(c, "unsubscribe", channel, NULL, 0);
}

void ws_publish(struct ws *c, const char *channel, const char *data_json)
{
    command_ok(c, "publish", channel, data_json, 0);
}

char *ws_delivery(const char *channel, const char *data_json)
{
    return xasprintf("{\"op\":\"message\",\"channel\":\"%s\",\"data\":%s}", channel, data_json);
}
