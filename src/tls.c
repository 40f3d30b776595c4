/* TLS termination in front of http.c (include/luahub/tls.h; why and how:
 * docs/internals.md, "TLS").
 *
 * A connection goes through these states:
 *
 *   PEEK -> HANDSHAKE -> OPEN -> closed
 *     \-> REFUSE (plain HTTP: a 400 in plaintext, then a lingering close)
 *
 * PEEK looks at the first byte without taking it: a TLS handshake record
 * starts with 0x16, an HTTP request with a letter. HANDSHAKE runs
 * SSL_do_handshake() as the socket allows. OPEN pumps both ways between
 * the TCP socket and our end of a socketpair whose other end the HTTP side
 * owns:
 *
 *   up:   TCP -> SSL_read -> send(pair)      (the client's requests, frames)
 *   down: recv(pair) -> SSL_write -> TCP     (answers, deliveries)
 *
 * Each way holds at most one chunk (16 KiB, a TLS record's worth) that the
 * other side could not take yet, and reads nothing more until it is gone:
 * a client that does not read fills the pair, so the writer sees a full
 * socket as it would with plain TCP (and culls a slow consumer); a hub
 * side that does not read stops us reading the client.
 *
 * Closing: the client's close_notify (or EOF) shuts the pair's write side
 * once what it sent is delivered, and the HTTP side sees EOF; the HTTP side
 * closing its end makes us send close_notify and shut the TCP write side,
 * then drain what the client still sends until it closes (at most
 * LINGER_MS: closing a socket with unread input sends a reset, which can
 * destroy the answer before the client has read it). A reset or a TLS
 * error closes both at once. A connection on its way out, like a
 * handshake, has a deadline: request_timeout.
 *
 * Sockets are in the module's own epoll set, edge-triggered for input and
 * output: no epoll_ctl after a socket is added. Each event only records
 * that a side may be readable or writable; pump() then works until a side
 * says EAGAIN (or a short read drained the pair), which clears the mark.
 * What encrypting costs is reported to the writer's pacing (the `cost`
 * callback): see docs/internals.md, "TLS", for the measurements.
 *
 * Loading and checking the certificate, key and client CA files into a
 * context is tls_ctx.c (through tls_impl.h); the swap of the context on a
 * reload is here, with the connections that hold it. */
#include "luahub/tls.h"
#include "tls_impl.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "luahub/list.h"
#include "luahub/log.h"
#include "luahub/metrics.h"

#define CHUNK (16 * 1024)           /* plaintext of one TLS record at most */
#define EVENTS_MAX 64               /* events handled per wake-up of the loop */
#define SWEEP_MS 1000
#define LINGER_MS 2000              /* after our close_notify, the client's input is drained this long */
#define LINGER_BYTES (256 * 1024)   /* ... or up to this many bytes */
#define LOG_EVERY_MS 1000           /* one line a second at most about each kind of failure */
#define TLS_HANDSHAKE 0x16          /* the first byte of a TLS handshake record */

enum state { T_PEEK, T_HANDSHAKE, T_OPEN, T_REFUSE, T_CLOSED };

/* Why a connection never got to the HTTP side, for the metrics. */
#define FAILURES(X)                                                                    \
    X(TIMEOUT, "timeout")           /* no complete handshake within request_timeout */ \
    X(PLAIN_HTTP, "plain_http")     /* an HTTP request: answered 400 */                \
    X(NOT_TLS, "not_tls")           /* neither TLS nor HTTP */                         \
    X(CLIENT_CERT, "client_cert")   /* tls_client_ca: no certificate, or not trusted */\
    X(HANDSHAKE, "handshake")       /* another TLS error (version, cipher, alert) */   \
    X(CLOSED, "closed")             /* the client left during the handshake */         \
    X(RESOURCES, "resources")       /* no descriptor for the socketpair */
#define F_ENUM(name, label) F_##name,
enum failure { FAILURES(F_ENUM) F__COUNT };
#define F_LABEL(name, label) label,
static const char *const failure_label[] = {FAILURES(F_LABEL)};

/* What an epoll event said about a connection's sockets. */
#define R_TCP 0x01                  /* the TCP socket may have bytes (or EOF) to read */
#define W_TCP 0x02                  /* ... may take bytes */
#define R_PAIR 0x04                 /* the pair may have bytes (or EOF) to read */
#define W_PAIR 0x08                 /* ... may take bytes */
#define HUP_PAIR 0x10               /* the HTTP side shut its end: EOF follows the bytes */

/* How far the connection is in closing. */
#define UP_EOF 0x01                 /* the client sent close_notify or EOF */
#define UP_SHUT 0x02                /* ... and the pair's write side is shut */
#define DOWN_EOF 0x04               /* the HTTP side closed (EOF on the pair) */
#define DOWN_SHUT 0x08              /* ... close_notify is out and the TCP write side shut */
#define PAIR_GONE 0x10              /* the HTTP side is gone: what the client sends is dropped */
#define READ_WANTS_W 0x20           /* SSL_read must wait for the TCP socket to take bytes */
#define WRITE_WANTS_R 0x40          /* SSL_write must wait for bytes from the client */
#define TIMED 0x80                  /* on t->timed (has a deadline) */

struct tconn {
    struct hub_list node;           /* t->timed, t->open, or t->zombies once closed */
    struct hub_tls *t;
    SSL *ssl;                       /* from the handshake on */
    int fd;                         /* the TCP socket */
    int pfd;                        /* our end of the pair; -1 until the handshake is done */
    uint8_t state;                  /* enum state */
    uint8_t ready;                  /* R_TCP | W_TCP | R_PAIR | W_PAIR | HUP_PAIR */
    uint8_t flags;
    uint64_t deadline;              /* loop time (ms), when TIMED */
    unsigned char *up;              /* decrypted bytes the pair did not take yet */
    uint32_t up_off, up_len;
    unsigned char *down;            /* bytes SSL_write must be called again with */
    uint32_t down_len;
    uint32_t lingered;              /* bytes dropped after the HTTP side went */
};

struct hub_tls {
    uv_loop_t *loop;
    const struct hub_config *cfg;   /* borrowed: the file paths, request_timeout */
    hub_tls_plain_fn plain;
    hub_tls_cost_fn cost;
    void *ud;
    uint64_t cost_ns;               /* down-direction work of this event batch */
    SSL_CTX *ctx;                   /* for new connections */
    int64_t not_after;              /* its certificate's expiry, Unix time */
    int epfd;
    uv_poll_t poll;
    uv_timer_t sweep;
    struct hub_list timed;          /* handshakes, refusals, closings: have a deadline */
    struct hub_list open;           /* established, no deadline */
    struct hub_list zombies;        /* closed, freed after the event batch */
    unsigned char scratch[CHUNK];
    size_t nconns;
    uint64_t handshakes;
    uint64_t failures[F__COUNT];
    uint64_t reloads_ok, reloads_failed;
    uint64_t logged_ms[F__COUNT];   /* loop time of the last line about each failure */
    uint64_t unlogged[F__COUNT];    /* failures since, not logged */
    int stopped;
};

static void pump(struct tconn *c);

/* ---- the context swap (loading and checking: tls_ctx.c) ---------------- */

int hub_tls_reload(struct hub_tls *t, struct hub_buf *why)
{
    int64_t not_after;
    SSL_CTX *ctx = hub_tls_ctx_build(t->cfg, &not_after, why);

    if (!ctx) {
        t->reloads_failed++;
        return -1;
    }
    /* Connections keep a reference to the context they started with. */
    SSL_CTX_free(t->ctx);
    t->ctx = ctx;
    t->not_after = not_after;
    t->reloads_ok++;
    hub_tls_ctx_log(t->cfg, ctx, "reload: TLS certificate loaded");
    return 0;
}

/* ---- connections -------------------------------------------------------- */

static uint64_t now(const struct hub_tls *t)
{
    return uv_now(t->loop);
}

/* Gives the connection a deadline (the earlier one if it has one). */
static void set_deadline(struct tconn *c, uint64_t at)
{
    if (c->flags & TIMED) {
        if (at < c->deadline)
            c->deadline = at;
        return;
    }
    c->flags |= TIMED;
    c->deadline = at;
    hub_list_move_tail(&c->t->timed, &c->node);
}

static void conn_close(struct tconn *c)
{
    struct hub_tls *t = c->t;

    if (c->state == T_CLOSED)
        return;
    c->state = T_CLOSED;
    close(c->fd); /* also leaves the epoll set */
    if (c->pfd >= 0)
        close(c->pfd);
    SSL_free(c->ssl);
    c->ssl = NULL;
    free(c->up);
    free(c->down);
    c->up = c->down = NULL;
    hub_list_move_tail(&t->zombies, &c->node);
    t->nconns--;
}

static void reap(struct hub_tls *t)
{
    struct hub_list *it, *tmp;
    hub_list_foreach_safe(it, tmp, &t->zombies) {
        hub_list_remove(it);
        free(hub_container_of(it, struct tconn, node));
    }
}

/* Counts and logs a connection that failed before HTTP, and closes it
 * (not when refusing: that one lingers). One line a second at most for
 * each kind: a scanner must not flood the log. */
static void fail(struct tconn *c, enum failure f, const char *detail)
{
    struct hub_tls *t = c->t;
    uint64_t tnow = now(t);

    t->failures[f]++;
    if (t->logged_ms[f] && tnow - t->logged_ms[f] < LOG_EVERY_MS) {
        t->unlogged[f]++;
    } else {
        char host[NI_MAXHOST] = "?";
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        if (getpeername(c->fd, (struct sockaddr *)&ss, &sl) == 0)
            getnameinfo((struct sockaddr *)&ss, sl, host, sizeof(host), NULL, 0,
                        NI_NUMERICHOST);
        if (t->unlogged[f])
            hub_log(f == F_CLOSED ? HUB_LOG_DEBUG : HUB_LOG_INFO, "tls: connection from %s: %s (and %llu more like it since "
                    "the last line: luahub_tls_handshake_failures_total{reason=\"%s\"})",
                    host, detail, (unsigned long long)t->unlogged[f], failure_label[f]);
        else
            hub_log(f == F_CLOSED ? HUB_LOG_DEBUG : HUB_LOG_INFO, /* TCP health checks */
                    "tls: connection from %s: %s", host, detail);
        t->logged_ms[f] = tnow;
        t->unlogged[f] = 0;
    }
    if (c->state != T_REFUSE)
        conn_close(c);
}

/* Plain HTTP on the TLS port: an answer the client can read (as nginx
 * does), then a lingering close. The answer fits any socket buffer. */
static void refuse_plain_http(struct tconn *c)
{
    static const char body[] =
        "{\"ok\":false,\"error\":{\"code\":\"bad_request\",\"message\":\"plain HTTP request "
        "sent to a TLS port: use https:// or wss://\"}}";
    char answer[512];
    int n = snprintf(answer, sizeof(answer),
                     "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                     sizeof(body) - 1, body);

    c->state = T_REFUSE;
    fail(c, F_PLAIN_HTTP, "plain HTTP request on the TLS port: answered 400");
    if (send(c->fd, answer, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        conn_close(c);
        return;
    }
    shutdown(c->fd, SHUT_WR);
    c->deadline = now(c->t) + LINGER_MS;
}

/* REFUSE: drops what the client still sends until it closes. */
static void drain_refused(struct tconn *c)
{
    unsigned char *buf = c->t->scratch;

    for (;;) {
        ssize_t n = recv(c->fd, buf, CHUNK, MSG_DONTWAIT);
        if (n > 0) {
            c->lingered += (uint32_t)n;
            if (c->lingered < LINGER_BYTES)
                continue;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->ready &= ~R_TCP;
            return;
        }
        conn_close(c);
        return;
    }
}

/* PEEK: the first byte says what the client speaks. */
static void peek(struct tconn *c)
{
    unsigned char b;
    ssize_t n = recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);

    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        c->ready &= ~R_TCP;
        return;
    }
    if (n <= 0) {
        fail(c, F_CLOSED, "closed before a TLS handshake");
        return;
    }
    if ((b >= 'A' && b <= 'Z') || (b >= 'a' && b <= 'z')) {
        refuse_plain_http(c);
        return;
    }
    if (b != TLS_HANDSHAKE) {
        fail(c, F_NOT_TLS, "not a TLS handshake: closed");
        return;
    }
    c->ssl = SSL_new(c->t->ctx);
    if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) {
        ERR_clear_error();
        fail(c, F_RESOURCES, "out of memory for a TLS connection");
        return;
    }
    SSL_set_accept_state(c->ssl);
    c->state = T_HANDSHAKE;
}

/* The handshake is done: the plaintext end goes to the HTTP side. */
static void established(struct tconn *c)
{
    struct hub_tls *t = c->t;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int sv[2];

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) {
        char why[128];
        snprintf(why, sizeof(why), "socketpair: %s (raise the open-files limit: a TLS "
                 "connection takes three descriptors)", strerror(errno));
        fail(c, F_RESOURCES, why);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.ptr = (char *)c + 1};
    if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, sv[0], &ev) < 0) {
        close(sv[0]);
        close(sv[1]);
        fail(c, F_RESOURCES, "epoll_ctl failed: connection dropped");
        return;
    }
    if (getpeername(c->fd, (struct sockaddr *)&ss, &sl) < 0) {
        memset(&ss, 0, sizeof(ss));
        sl = sizeof(ss.ss_family);
    }
    c->pfd = sv[0];
    c->state = T_OPEN;
    c->flags &= ~TIMED;
    hub_list_move_tail(&t->open, &c->node);
    t->handshakes++;
    /* read_ahead may have taken the client's first request with the
     * handshake's last record: SSL_read once whatever epoll says. */
    c->ready |= R_TCP | W_PAIR;
    t->plain(t->ud, sv[1], (struct sockaddr *)&ss, sl);
}

/* Why a handshake failed, in words, into why[0..n). */
static enum failure handshake_error(struct tconn *c, int err, char *why, size_t n)
{
    long v = SSL_get_verify_result(c->ssl);
    unsigned long e = ERR_peek_last_error();
    int reason = ERR_GET_REASON(e);

    if (v != X509_V_OK) {
        snprintf(why, n, "TLS handshake failed: client certificate refused (%s)",
                 X509_verify_cert_error_string(v));
        return F_CLIENT_CERT;
    }
    if (reason == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) {
        snprintf(why, n, "TLS handshake failed: no client certificate (tls_client_ca "
                 "requires one)");
        return F_CLIENT_CERT;
    }
    if (!e && (err == SSL_ERROR_SYSCALL || err == SSL_ERROR_ZERO_RETURN)) {
        snprintf(why, n, "closed during the TLS handshake");
        return F_CLOSED;
    }
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    snprintf(why, n, "TLS handshake failed: %s", r ? r : "unknown error");
    return F_HANDSHAKE;
}

static void handshake(struct tconn *c)
{
    char why[256];

    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        established(c);
        return;
    }
    int err = SSL_get_error(c->ssl, r);
    if (err == SSL_ERROR_WANT_READ) {
        c->ready &= ~R_TCP;
        return;
    }
    if (err == SSL_ERROR_WANT_WRITE) {
        c->ready &= ~W_TCP;
        return;
    }
    enum failure f = handshake_error(c, err, why, sizeof(why));
    ERR_clear_error();
    fail(c, f, why);
}

/* A reset, a socket error or a TLS error: both ends close now. */
static void abort_conn(struct tconn *c)
{
    ERR_clear_error();
    conn_close(c);
}

/* Starts closing: the connection gets request_timeout to finish. */
static void closing(struct tconn *c)
{
    set_deadline(c, now(c->t) + c->t->cfg->request_timeout * 1000u);
}

/* The HTTP side's end is gone: what the client sends from now on is
 * dropped (still read, so that closing sends no reset). */
static void pair_gone(struct tconn *c)
{
    c->flags |= PAIR_GONE | UP_SHUT;
    free(c->up);
    c->up = NULL;
    c->up_len = c->up_off = 0;
    closing(c);
}

/* Sends decrypted bytes to the HTTP side; keeps what it does not take. */
static void to_pair(struct tconn *c, const unsigned char *p, size_t len)
{
    ssize_t n = send(c->pfd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);

    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        c->ready &= ~W_PAIR;
        n = 0;
    } else if (n < 0) {
        pair_gone(c);
        return;
    }
    if ((size_t)n < len) {
        if (!c->up)
            c->up = hub_xmalloc(CHUNK);
        memmove(c->up, p + n, len - (size_t)n);
        c->up_off = 0;
        c->up_len = (uint32_t)(len - (size_t)n);
    }
}

/* Client -> HTTP side. Returns 1 when something moved. */
static int up_step(struct tconn *c)
{
    struct hub_tls *t = c->t;

    if (c->up_len) {
        if (!(c->ready & W_PAIR))
            return 0;
        uint32_t off = c->up_off, len = c->up_len;
        c->up_len = 0;
        to_pair(c, c->up + off, len);
        if (!c->up_len) {
            free(c->up);
            c->up = NULL;
        }
        return c->up_len != len;
    }
    if ((c->flags & (UP_EOF | UP_SHUT)) == UP_EOF) {
        shutdown(c->pfd, SHUT_WR); /* the HTTP side reads EOF */
        c->flags |= UP_SHUT;
        closing(c);
        return 1;
    }
    if ((c->flags & UP_EOF) || !(c->ready & R_TCP) ||
        ((c->flags & READ_WANTS_W) && !(c->ready & W_TCP)))
        return 0;
    ERR_clear_error();
    int r = SSL_read(c->ssl, t->scratch, CHUNK);
    if (r > 0) {
        c->flags &= ~READ_WANTS_W;
        if (c->flags & PAIR_GONE) {
            c->lingered += (uint32_t)r;
            if (c->lingered >= LINGER_BYTES)
                abort_conn(c);
        } else {
            to_pair(c, t->scratch, (size_t)r);
        }
        return 1;
    }
    switch (SSL_get_error(c->ssl, r)) {
    case SSL_ERROR_WANT_READ:
        c->flags &= ~READ_WANTS_W;
        c->ready &= ~R_TCP;
        return 0;
    case SSL_ERROR_WANT_WRITE:
        c->flags |= READ_WANTS_W;
        c->ready &= ~W_TCP;
        return 0;
    case SSL_ERROR_ZERO_RETURN: /* close_notify, or EOF (SSL_OP_IGNORE_UNEXPECTED_EOF) */
        c->flags |= UP_EOF;
        if (c->flags & PAIR_GONE)
            c->flags |= UP_SHUT;
        return 1;
    default:
        abort_conn(c);
        return 0;
    }
}

/* Encrypts and sends `len` bytes. Returns 1 when sent; 0 when the socket
 * is full, with the bytes kept in c->down (SSL_write must be called again
 * with the same bytes); -1 when the connection was aborted. */
static int to_client(struct tconn *c, const unsigned char *p, uint32_t len)
{
    ERR_clear_error();
    uint64_t t0 = uv_hrtime();
    int r = SSL_write(c->ssl, p, (int)len);
    c->t->cost_ns += uv_hrtime() - t0;
    if (r > 0) {
        c->flags &= ~WRITE_WANTS_R;
        return 1;
    }
    switch (SSL_get_error(c->ssl, r)) {
    case SSL_ERROR_WANT_WRITE:
        c->flags &= ~WRITE_WANTS_R;
        c->ready &= ~W_TCP;
        break;
    case SSL_ERROR_WANT_READ:
        c->flags |= WRITE_WANTS_R;
        c->ready &= ~R_TCP;
        break;
    default:
        abort_conn(c);
        return -1;
    }
    if (p != c->down) {
        c->down = hub_xmalloc(len);
        memcpy(c->down, p, len);
        c->down_len = len;
    }
    return 0;
}

/* HTTP side -> client. Returns 1 when something moved. */
static int down_step(struct tconn *c)
{
    struct hub_tls *t = c->t;

    if (c->flags & DOWN_SHUT)
        return 0;
    if (c->down_len) {
        /* SSL_write wanting to read (a handshake message on the way) is
         * retried on any event: SSL_read may have taken what it waited for. */
        if (!(c->flags & WRITE_WANTS_R) && !(c->ready & W_TCP))
            return 0;
        if (to_client(c, c->down, c->down_len) <= 0)
            return 0;
        free(c->down);
        c->down = NULL;
        c->down_len = 0;
        return 1;
    }
    if (c->flags & DOWN_EOF) {
        /* close_notify, then the TCP write side; the client's EOF is
         * awaited LINGER_MS at most. */
        ERR_clear_error();
        int r = SSL_shutdown(c->ssl);
        if (r < 0 && SSL_get_error(c->ssl, r) == SSL_ERROR_WANT_WRITE) {
            c->ready &= ~W_TCP;
            return 0;
        }
        ERR_clear_error();
        shutdown(c->fd, SHUT_WR);
        c->flags |= DOWN_SHUT;
        set_deadline(c, now(t) + LINGER_MS);
        return 1;
    }
    if (!(c->ready & R_PAIR))
        return 0;
    ssize_t n = recv(c->pfd, t->scratch, CHUNK, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        c->ready &= ~R_PAIR;
        return 0;
    }
    if (n < 0 && errno == EINTR)
        return 1;
    if (n <= 0) { /* EOF, or a reset: the HTTP side is done */
        c->flags |= DOWN_EOF;
        closing(c);
        return 1;
    }
    /* A short read drained the pair: new bytes bring a new edge. Not an
     * EOF that came with them: it brings none, it must be read. */
    if (n < CHUNK && !(c->ready & HUP_PAIR))
        c->ready &= ~R_PAIR;
    return to_client(c, t->scratch, (uint32_t)n) >= 0;
}

static void pump(struct tconn *c)
{
    int moved;

    do {
        moved = up_step(c);
        if (c->state == T_CLOSED)
            return;
        moved |= down_step(c);
        if (c->state == T_CLOSED)
            return;
    } while (moved);
    if ((c->flags & (UP_EOF | UP_SHUT | DOWN_SHUT)) == (UP_EOF | UP_SHUT | DOWN_SHUT))
        conn_close(c);
}

static void drive(struct tconn *c)
{
    switch (c->state) {
    case T_PEEK:
        if (!(c->ready & R_TCP))
            return;
        peek(c);
        if (c->state == T_REFUSE)
            drain_refused(c); /* the request: read, so the close sends no reset */
        if (c->state != T_HANDSHAKE)
            return;
        /* fall through */
    case T_HANDSHAKE:
        handshake(c);
        if (c->state != T_OPEN)
            return;
        /* fall through */
    case T_OPEN:
        pump(c);
        return;
    case T_REFUSE:
        if (c->ready & R_TCP)
            drain_refused(c);
        return;
    default:
        return;
    }
}

/* One batch of EVENTS_MAX per wake-up, not until the set is empty: the
 * loop reads its other sockets (a publisher's frames) between batches, so
 * the writer's flushes gather more frames per connection. Draining every
 * event at once cost 5 times more CPU per delivery in a burst
 * (docs/internals.md, "TLS"). */
static void on_events(uv_poll_t *p, int status, int events)
{
    struct hub_tls *t = p->data;
    struct epoll_event ev[EVENTS_MAX];

    int n = epoll_wait(t->epfd, ev, EVENTS_MAX, 0);
    for (int i = 0; i < n; i++) {
        uintptr_t v = (uintptr_t)ev[i].data.ptr;
        struct tconn *c = (struct tconn *)(v & ~(uintptr_t)1);
        uint32_t e = ev[i].events;
        if (c->state == T_CLOSED)
            continue; /* closed by an earlier event of this batch */
        int in = (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
        int out = (e & (EPOLLOUT | EPOLLHUP | EPOLLERR)) != 0;
        if (v & 1) {
            c->ready |= (in ? R_PAIR : 0) | (out ? W_PAIR : 0);
            /* The HTTP side closed: whatever we still hold for the client
             * must go out within the deadline. */
            if (e & (EPOLLRDHUP | EPOLLHUP)) {
                c->ready |= HUP_PAIR;
                closing(c);
            }
        } else {
            c->ready |= (in ? R_TCP : 0) | (out ? W_TCP : 0);
        }
        drive(c);
    }
    reap(t);
    /* What encrypting the HTTP side's bytes cost counts in the writer's
     * pacing, as a plain TCP write's cost does. */
    if (t->cost_ns && t->cost)
        t->cost(t->ud, t->cost_ns);
    t->cost_ns = 0;
}

static void on_sweep(uv_timer_t *tm)
{
    struct hub_tls *t = tm->data;
    uint64_t tnow = now(t);
    struct hub_list *it, *tmp;
    char why[128];

    hub_list_foreach_safe(it, tmp, &t->timed) {
        struct tconn *c = hub_container_of(it, struct tconn, node);
        if (tnow < c->deadline)
            continue;
        if (c->state == T_PEEK || c->state == T_HANDSHAKE) {
            snprintf(why, sizeof(why), "no TLS handshake within request_timeout (%u s): "
                     "closed", t->cfg->request_timeout);
            fail(c, F_TIMEOUT, why);
        } else {
            conn_close(c);
        }
    }
    reap(t);
}

/* ---- the module --------------------------------------------------------- */

struct hub_tls *hub_tls_new(uv_loop_t *loop, const struct hub_config *cfg,
                            hub_tls_plain_fn plain, hub_tls_cost_fn cost, void *ud,
                            struct hub_buf *why)
{
    int64_t not_after;
    SSL_CTX *ctx = hub_tls_ctx_build(cfg, &not_after, why);
    if (!ctx)
        return NULL;
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) {
        hub_buf_printf(why, "epoll_create1: %s", strerror(errno));
        SSL_CTX_free(ctx);
        return NULL;
    }
    struct hub_tls *t = hub_xcalloc(1, sizeof(*t));
    t->loop = loop;
    t->cfg = cfg;
    t->plain = plain;
    t->cost = cost;
    t->ud = ud;
    t->ctx = ctx;
    t->not_after = not_after;
    t->epfd = epfd;
    hub_tls_ctx_log(cfg, ctx, "tls: certificate");
    hub_list_init(&t->timed);
    hub_list_init(&t->open);
    hub_list_init(&t->zombies);
    uv_poll_init(loop, &t->poll, epfd);
    t->poll.data = t;
    uv_poll_start(&t->poll, UV_READABLE, on_events);
    uv_unref((uv_handle_t *)&t->poll);
    uv_timer_init(loop, &t->sweep);
    t->sweep.data = t;
    uv_timer_start(&t->sweep, on_sweep, SWEEP_MS, SWEEP_MS);
    uv_unref((uv_handle_t *)&t->sweep);
    return t;
}

void hub_tls_accept(struct hub_tls *t, int fd)
{
    struct tconn *c = hub_xcalloc(1, sizeof(*c));
    c->t = t;
    c->fd = fd;
    c->pfd = -1;
    c->state = T_PEEK;
    hub_list_init(&c->node);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    if (t->stopped || epoll_ctl(t->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        if (!t->stopped)
            hub_log(HUB_LOG_WARN, "tls: epoll_ctl: %s: connection dropped", strerror(errno));
        close(fd);
        free(c);
        return;
    }
    t->nconns++;
    set_deadline(c, now(t) + t->cfg->request_timeout * 1000u);
}

void hub_tls_stop(struct hub_tls *t)
{
    struct hub_list *it, *tmp;

    if (!t || t->stopped)
        return;
    t->stopped = 1;
    hub_list_foreach_safe(it, tmp, &t->timed)
        conn_close(hub_container_of(it, struct tconn, node));
    hub_list_foreach_safe(it, tmp, &t->open)
        conn_close(hub_container_of(it, struct tconn, node));
    reap(t);
    uv_close((uv_handle_t *)&t->poll, NULL);
    uv_close((uv_handle_t *)&t->sweep, NULL);
}

void hub_tls_free(struct hub_tls *t)
{
    if (!t)
        return;
    reap(t);
    close(t->epfd);
    SSL_CTX_free(t->ctx);
    free(t);
}

void hub_tls_metrics(const struct hub_tls *t, struct hub_buf *b)
{
    hub_metric_one(b, "luahub_tls_connections", "gauge",
                   "Open TLS connections (handshakes included).", t->nconns);
    hub_metric_one(b, "luahub_tls_handshakes_total", "counter",
                   "TLS handshakes completed.", t->handshakes);
    hub_metric_family(b, "luahub_tls_handshake_failures_total", "counter",
                      "TLS connections that never reached HTTP, by reason.");
    for (int i = 0; i < F__COUNT; i++) {
        char label[48];
        snprintf(label, sizeof(label), "reason=\"%s\"", failure_label[i]);
        hub_metric_value(b, "luahub_tls_handshake_failures_total", label, t->failures[i]);
    }
    hub_metric_family(b, "luahub_tls_reloads_total", "counter",
                      "Certificate reloads (SIGHUP, POST /api/reload), by result.");
    hub_metric_value(b, "luahub_tls_reloads_total", "result=\"ok\"", t->reloads_ok);
    hub_metric_value(b, "luahub_tls_reloads_total", "result=\"failed\"", t->reloads_failed);
    hub_metric_one(b, "luahub_tls_certificate_expiry_seconds", "gauge",
                   "When the certificate served to new connections expires (Unix time).",
                   (uint64_t)(t->not_after > 0 ? t->not_after : 0));
}
