/* HTTP/1.1 connections: reading request heads and bodies with deadlines,
 * answering in order (pipelining and keep-alive), lingering close, and
 * handing WebSocket upgrades over. The routes live in http_api.c; the
 * reasons this is not left to libwebsockets are in docs/internals.md,
 * "HTTP".
 *
 * A connection is one small state machine, driven by drive():
 *
 *   HEAD -> BODY -> BUSY -> WRITE -> IDLE -> HEAD ...     (keep-alive)
 *                            |  \-> LINGER -> closed       (Connection: close)
 *                            \-> BODY (after "100 Continue")
 *
 * A request is read whole (head, then exactly Content-Length body bytes)
 * before its route runs; bytes of a pipelined next request wait in the
 * buffer until the answer to this one is written. Deadlines, checked by a
 * sweep every second: the head within request_timeout of its first byte
 * (of the accept, for the first request), the body within request_timeout
 * plus one second per BODY_RATE bytes, the next request of a keep-alive
 * connection within idle_timeout, and a response must make progress
 * within request_timeout. None of this holds a shared slot, so slow
 * clients cost their own memory and descriptor only.
 *
 * Sockets are registered EPOLLONESHOT in the module's epoll instance:
 * after each event the socket is disarmed until drive() asks for the next
 * one, so a socket handed to libwebsockets (hub_http_take) never wakes this
 * module again, and the kernel drops it from the set when it is closed. */
#include "luahub/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#include "luahub/list.h"
#include "luahub/log.h"
#include "luahub/metrics.h"

#define READ_CHUNK 4096
#define EVENTS_MAX 64
#define EVENT_ROUNDS 4              /* epoll_wait rounds per wake-up */
#define SWEEP_MS 1000
#define LINGER_MS 2000              /* after Connection: close, unread input is drained this long */
#define LINGER_BYTES (256 * 1024)   /* ... or up to this many bytes */
#define BODY_RATE (64 * 1024)       /* body bytes a client may take a second past request_timeout */
#define SENDFILE_CHUNK (1 << 20)

enum state { S_HEAD, S_BODY, S_BUSY, S_WRITE, S_IDLE, S_LINGER, S_CLOSED };

struct hub_http_conn {
    struct hub_list node;           /* hs->conns, or hs->zombies once closed */
    struct hub_http *hs;
    int fd;                         /* -1 once closed or taken */
    uint8_t state;                  /* enum state */
    uint8_t armed;                  /* events armed in epoll (one-shot), 0 if none */
    uint8_t registered;             /* in the module's epoll set (armed or not) */
    uint8_t close_after;            /* close once the response is written */
    uint8_t interim;                /* the write under way is "100 Continue" */
    uint8_t in_drive;               /* drive() is on the stack */
    uint32_t refs;                  /* holds by handlers answering later */
    uint64_t deadline;              /* loop time (ms) */
    uint64_t started;               /* loop time the current request began */
    struct hub_buf in;              /* bytes read, from the current request on */
    size_t head_len;                /* > 0: the current request's head is parsed */
    struct hub_request req;         /* the parsed head (points into scratch) */
    struct hub_buf scratch;
    struct hub_buf out;             /* response bytes */
    size_t out_off;                 /* ... already written */
    int file_fd;                    /* static file being sent, or -1 */
    uint64_t file_off, file_size;
    size_t lingered;                /* bytes drained while lingering */
    size_t scanned;                 /* bytes of c->in searched for the end of the head */
    size_t head_at;                 /* 1 + where the request line starts, 0: not seen yet */
    struct hub_ip peer;             /* the TCP peer */
    char client[INET6_ADDRSTRLEN];  /* the client, as the current request has it */
    uint8_t secure;                 /* the plaintext end of a TLS connection (tls.c) */
};

struct hub_http {
    uv_loop_t *loop;
    struct hub_http_options opt;
    const struct hub_http_routes *routes;
    void *ud;
    int epfd;
    uv_poll_t poll;
    uv_timer_t sweep;
    struct hub_list conns;          /* open connections */
    struct hub_list zombies;        /* closed, freed when unreferenced */
    size_t nconns;
    int shutting_down;
    int stopped;
    uint64_t requests;              /* answers written */
    uint64_t timeouts;              /* connections closed by a deadline */
};

static void drive(struct hub_http_conn *c, int readable);
static void client_of(struct hub_http_conn *c);
static void conn_close(struct hub_http_conn *c);

static uint64_t now(const struct hub_http *hs)
{
    return uv_now(hs->loop);
}

/* Watches the socket for `events`, once. A new connection joins the epoll
 * set only when it first has to wait (hub_http_accept_peer reads first). */
static void arm(struct hub_http_conn *c, uint32_t events)
{
    if (c->fd < 0 || c->armed == events)
        return;
    struct epoll_event ev = {.events = events | EPOLLONESHOT, .data.ptr = c};
    if (epoll_ctl(c->hs->epfd, c->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) == 0) {
        c->armed = (uint8_t)events;
        c->registered = 1;
    } else if (!c->registered) {
        hub_log(HUB_LOG_WARN, "epoll_ctl: %s: connection dropped", strerror(errno));
        conn_close(c);
    }
}

static void conn_close(struct hub_http_conn *c)
{
    struct hub_http *hs = c->hs;

    if (c->state == S_CLOSED)
        return;
    c->state = S_CLOSED;
    if (c->fd >= 0)
        close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    if (c->file_fd >= 0)
        close(c->file_fd);
    c->file_fd = -1;
    hub_list_move_tail(&hs->zombies, &c->node);
    hs->nconns--;
}

static void conn_free(struct hub_http_conn *c)
{
    hub_list_remove(&c->node);
    hub_buf_free(&c->in);
    hub_buf_free(&c->scratch);
    hub_buf_free(&c->out);
    free(c);
}

/* Frees the closed connections nobody holds. Called where no pointer to
 * a connection can be live on the stack: after a batch of events, from
 * the sweep. */
static void reap(struct hub_http *hs)
{
    struct hub_list *it, *tmp;
    hub_list_foreach_safe(it, tmp, &hs->zombies) {
        struct hub_http_conn *c = hub_container_of(it, struct hub_http_conn, node);
        if (!c->refs)
            conn_free(c);
    }
}

static const char *reason_phrase(unsigned s)
{
    switch (s) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 422: return "Unprocessable Content";
    case 426: return "Upgrade Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return s < 400 ? "OK" : s < 500 ? "Client Error" : "Server Error";
    }
}

/* Starts the response: the head into c->out. */
static void begin_response(struct hub_http_conn *c, unsigned status, const char *ctype,
                           const char *extra, uint64_t len, unsigned flags)
{
    if (c->hs->shutting_down || !c->head_len || !c->req.keep_alive)
        flags |= HUB_HTTP_CLOSE;
    c->close_after = (flags & HUB_HTTP_CLOSE) != 0;
    hub_buf_reset(&c->out);
    c->out_off = 0;
    hub_buf_printf(&c->out, "HTTP/1.1 %u %s\r\n", status, reason_phrase(status));
    if (ctype)
        hub_buf_printf(&c->out, "Content-Type: %s\r\n", ctype);
    hub_buf_printf(&c->out, "Content-Length: %llu\r\n", (unsigned long long)len);
    if (c->close_after)
        hub_buf_appends(&c->out, "Connection: close\r\n");
    if (extra)
        hub_buf_appends(&c->out, extra);
    hub_buf_appends(&c->out, "\r\n");
    c->hs->requests++;
}

static int head_only(const struct hub_http_conn *c)
{
    return c->head_len && !strcmp(c->req.method, "HEAD");
}

static void start_write(struct hub_http_conn *c)
{
    c->state = S_WRITE;
    c->deadline = now(c->hs) + c->hs->opt.request_timeout_ms;
    if (!c->in_drive)
        drive(c, 0);
}

void hub_http_respond(struct hub_http_conn *c, unsigned status, const char *ctype,
                      const char *extra, const char *body, size_t len, unsigned flags)
{
    if (c->state == S_CLOSED)
        return;
    begin_response(c, status, ctype, extra, len, flags);
    if (len && !head_only(c))
        hub_buf_append(&c->out, body, len);
    start_write(c);
}

void hub_http_respond_file(struct hub_http_conn *c, unsigned status, const char *ctype,
                           const char *extra, int file_fd, uint64_t size, unsigned flags)
{
    if (c->state == S_CLOSED) {
        close(file_fd);
        return;
    }
    begin_response(c, status, ctype, extra, size, flags);
    if (head_only(c) || !size) {
        close(file_fd);
    } else {
        c->file_fd = file_fd;
        c->file_off = 0;
        c->file_size = size;
    }
    start_write(c);
}

void hub_http_respond_raw(struct hub_http_conn *c, const void *bytes, size_t len)
{
    if (c->state == S_CLOSED)
        return;
    hub_buf_reset(&c->out);
    c->out_off = 0;
    hub_buf_append(&c->out, bytes, len);
    c->close_after = 1;
    c->hs->requests++;
    start_write(c);
}

void hub_http_respond_error(struct hub_http_conn *c, unsigned status, const char *code,
                            const char *message, unsigned flags)
{
    struct hub_buf b = {0};
    hub_buf_appends(&b, "{\"ok\":false,\"error\":{\"code\":");
    hub_buf_append_json_string(&b, code, strlen(code));
    hub_buf_appends(&b, ",\"message\":");
    hub_buf_append_json_string(&b, message, strlen(message));
    hub_buf_appends(&b, "}}");
    hub_http_respond(c, status, "application/json", NULL, b.p, b.len, flags);
    hub_buf_free(&b);
}

void hub_http_hold(struct hub_http_conn *c)
{
    c->refs++;
}

void hub_http_release(struct hub_http_conn *c)
{
    if (--c->refs == 0 && c->state == S_CLOSED && c->hs->stopped)
        conn_free(c); /* the module is gone: nobody else reaps */
}

int hub_http_closed(const struct hub_http_conn *c)
{
    return c->state == S_CLOSED;
}

int hub_http_take(struct hub_http_conn *c, struct hub_buf *rest)
{
    int fd = c->fd;
    size_t used = c->head_len + c->req.content_length;

    if (c->in.len > used)
        hub_buf_append(rest, c->in.p + used, c->in.len - used);
    /* Disarmed (one-shot) already; a socket still armed is taken out so
     * that its events cannot reach this module again. */
    if (c->armed)
        epoll_ctl(c->hs->epfd, EPOLL_CTL_DEL, fd, NULL);
    c->fd = -1;
    conn_close(c);
    return fd;
}

/* Fails the request being read: `status` with the error object, and the
 * connection closes (the rest of what the client sends is not a request). */
static void fail(struct hub_http_conn *c, unsigned status, const char *code, const char *msg)
{
    hub_http_respond_error(c, status, code, msg, HUB_HTTP_CLOSE);
}

/* 1 once c->in holds an empty line after the request line's start (or
 * more than a head may hold, or garbage). Both searches resume where the
 * last one stopped: a client sending its head a byte at a time costs
 * linear time, not quadratic, also when the head follows empty lines (RFC
 * 9112 §2.2 lets a server skip them; an empty line among them is not the
 * head's end, and counting it so made every read parse the whole buffer
 * again). */
static int head_complete(struct hub_http_conn *c)
{
    const char *p = c->in.p;
    size_t len = c->in.len;

    if (len >= HUB_REQUEST_HEAD_MAX)
        return 1;
    if (!c->head_at) {
        size_t j = c->scanned;
        while (j < len && (p[j] == '\r' || p[j] == '\n'))
            j++;
        c->scanned = j;
        if (j == len)
            return 0;
        /* A head cannot start with anything but a method: no need to wait
         * for a line end to refuse garbage. */
        if (!((p[j] >= 'A' && p[j] <= 'Z') || (p[j] >= 'a' && p[j] <= 'z')))
            return 1;
        c->head_at = j + 1;
    }
    size_t from = c->head_at - 1;
    size_t i = c->scanned > from + 2 ? c->scanned - 2 : from;
    for (; i + 1 < len; i++) {
        if (p[i] != '\n')
            continue;
        if (p[i + 1] == '\n' || (i + 2 < len && p[i + 1] == '\r' && p[i + 2] == '\n'))
            return 1;
    }
    c->scanned = len;
    return 0;
}

/* Parses the head at the start of c->in. Returns 0 when more bytes are
 * needed, 1 when the state moved on. */
static int try_head(struct hub_http_conn *c)
{
    struct hub_http *hs = c->hs;
    const char *why;
    char msg[160];

    if (!head_complete(c))
        return 0;
    long n = hub_request_parse_head(c->in.p, c->in.len, &c->req, &c->scratch, &why);
    if (n == HUB_REQ_INCOMPLETE)
        return 0;
    if (n == HUB_REQ_BAD) {
        fail(c, 400, "bad_request", why);
        return 1;
    }
    if (n == HUB_REQ_TOO_BIG) {
        snprintf(msg, sizeof(msg), "the request head is over %d bytes", HUB_REQUEST_HEAD_MAX);
        fail(c, 431, "too_large", msg);
        return 1;
    }
    c->head_len = (size_t)n;
    client_of(c);
    c->req.secure = c->secure;
    if (c->req.chunked) {
        c->req.keep_alive = 0;
        fail(c, 411, "length_required",
             "send the body with a Content-Length header (chunked request bodies are not "
             "supported)");
        return 1;
    }
    if (c->req.content_length > hs->opt.max_body) {
        c->req.keep_alive = 0;
        snprintf(msg, sizeof(msg), "body of %llu bytes is over max_message_size (%llu)",
                 (unsigned long long)c->req.content_length,
                 (unsigned long long)hs->opt.max_body);
        fail(c, 413, "too_large", msg);
        return 1;
    }
    if (c->req.upgrade_websocket) {
        if (c->req.content_length) {
            c->req.keep_alive = 0;
            fail(c, 400, "bad_request", "a WebSocket upgrade request carries no body");
            return 1;
        }
        c->state = S_BUSY;
        hs->routes->upgrade(hs->ud, c, &c->req);
        if (c->state == S_BUSY && !c->refs) {
            hub_log(HUB_LOG_ERROR, "internal: an upgrade was neither answered nor taken");
            fail(c, 500, "internal", "internal error");
        }
        return 1;
    }
    c->deadline = c->started + hs->opt.request_timeout_ms +
                  c->req.content_length * 1000 / BODY_RATE;
    c->state = S_BODY;
    if (c->req.expect_continue && c->in.len < c->head_len + c->req.content_length) {
        /* curl and others wait for this before a body (RFC 9110 §10.1.1). */
        hub_buf_reset(&c->out);
        c->out_off = 0;
        hub_buf_appends(&c->out, "HTTP/1.1 100 Continue\r\n\r\n");
        c->interim = 1;
        c->state = S_WRITE;
    }
    return 1;
}

static void dispatch(struct hub_http_conn *c)
{
    struct hub_http *hs = c->hs;

    c->req.body = c->in.p + c->head_len;
    c->req.body_len = (size_t)c->req.content_length;
    c->state = S_BUSY;
    hs->routes->request(hs->ud, c, &c->req);
    if (c->state == S_BUSY && !c->refs) {
        hub_log(HUB_LOG_ERROR, "internal: HTTP %s %s got no answer", c->req.method,
                c->req.path);
        hub_http_respond_error(c, 500, "internal", "internal error", HUB_HTTP_CLOSE);
    }
}

/* Writes what is pending. Returns 0 when all is out, 1 when the socket is
 * full, -1 on a socket error. */
static int flush_out(struct hub_http_conn *c)
{
    int progress = 0, rc = 0;

    while (c->out_off < c->out.len) {
        ssize_t n = send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = errno == EAGAIN || errno == EWOULDBLOCK ? 1 : -1;
            goto out;
        }
        c->out_off += (size_t)n;
        progress = 1;
    }
    while (c->file_fd >= 0 && c->file_off < c->file_size) {
        off_t off = (off_t)c->file_off;
        uint64_t left = c->file_size - c->file_off;
        ssize_t n = sendfile(c->fd, c->file_fd, &off, left < SENDFILE_CHUNK ? left : SENDFILE_CHUNK);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = errno == EAGAIN || errno == EWOULDBLOCK ? 1 : -1;
            goto out;
        }
        if (n == 0) { /* the file shrank under us: the length is a lie now */
            rc = -1;
            goto out;
        }
        c->file_off += (uint64_t)n;
        progress = 1;
    }
out:
    if (progress)
        c->deadline = now(c->hs) + c->hs->opt.request_timeout_ms;
    return rc;
}

/* The response is out: next request, idle, or lingering close. */
static void finish_response(struct hub_http_conn *c)
{
    struct hub_http *hs = c->hs;

    if (c->file_fd >= 0)
        close(c->file_fd);
    c->file_fd = -1;
    hub_buf_reset(&c->out);
    c->out_off = 0;
    if (c->interim) {
        c->interim = 0;
        c->state = S_BODY;
        return;
    }
    if (c->close_after) {
        shutdown(c->fd, SHUT_WR);
        c->state = S_LINGER;
        c->lingered = 0;
        c->deadline = now(hs) + LINGER_MS;
        return;
    }
    size_t used = c->head_len + (size_t)c->req.content_length;
    memmove(c->in.p, c->in.p + used, c->in.len - used);
    c->in.len -= used;
    c->head_len = 0;
    c->scanned = 0;
    c->head_at = 0;
    c->started = now(hs);
    if (c->in.len) {
        c->state = S_HEAD;
        c->deadline = c->started + hs->opt.request_timeout_ms;
    } else {
        /* Idle keep-alive connections hold no buffers. */
        hub_buf_free(&c->in);
        hub_buf_free(&c->scratch);
        hub_buf_free(&c->out);
        c->state = S_IDLE;
        c->deadline = c->started + hs->opt.idle_timeout_ms;
    }
}

/* Reads once. Returns > 0 bytes read, 0 on EOF or error, -1 when nothing
 * is there (EAGAIN). */
static ssize_t read_some(struct hub_http_conn *c)
{
    size_t want = READ_CHUNK;

    if (c->state == S_BODY) {
        /* Read the rest of the body at once; a pipelined request may follow. */
        size_t need = c->head_len + (size_t)c->req.content_length - c->in.len;
        if (need > want)
            want = need;
    }
    hub_buf_reserve(&c->in, want);
    for (;;) {
        ssize_t n = recv(c->fd, c->in.p + c->in.len, want, MSG_DONTWAIT);
        if (n > 0) {
            c->in.len += (size_t)n;
            c->in.p[c->in.len] = '\0';
            return n;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return -1;
        return 0;
    }
}

/* Discards what a closing peer still sends, until EOF or the limits. */
static void linger(struct hub_http_conn *c)
{
    char buf[4096];

    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) {
            c->lingered += (size_t)n;
            if (c->lingered < LINGER_BYTES)
                continue;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            arm(c, EPOLLIN);
            return;
        }
        conn_close(c);
        return;
    }
}

/* Runs the connection's state machine as far as it goes without waiting.
 * `readable`: an event said the socket has something to read. */
static void drive(struct hub_http_conn *c, int readable)
{
    struct hub_http *hs = c->hs;
    int r;

    if (c->in_drive)
        return; /* a response from inside a route: the loop below goes on */
    c->in_drive = 1;
    for (;;) {
        switch (c->state) {
        case S_IDLE:
            if (!c->in.len)
                goto need_input;
            c->state = S_HEAD;
            c->started = now(hs);
            c->deadline = c->started + hs->opt.request_timeout_ms;
            continue;
        case S_HEAD:
            if (try_head(c))
                continue;
            goto need_input;
        case S_BODY:
            if (c->in.len < c->head_len + c->req.content_length)
                goto need_input;
            dispatch(c);
            continue;
        case S_WRITE:
            r = flush_out(c);
            if (r < 0) {
                conn_close(c);
                goto out;
            }
            if (r > 0) {
                arm(c, EPOLLOUT);
                goto out;
            }
            finish_response(c);
            continue;
        case S_LINGER:
            linger(c);
            goto out;
        case S_BUSY:
        case S_CLOSED:
        default:
            goto out;
        }
need_input:
        if (!readable) {
            arm(c, EPOLLIN);
            goto out;
        }
        readable = 0; /* one read per event; more data re-arms at once */
        ssize_t n = read_some(c);
        if (n == 0) {
            conn_close(c); /* the peer went away, or a socket error */
            goto out;
        }
        if (n < 0) {
            arm(c, EPOLLIN);
            goto out;
        }
    }
out:
    c->in_drive = 0;
}

static void on_events(uv_poll_t *p, int status, int events)
{
    struct hub_http *hs = p->data;
    struct epoll_event ev[EVENTS_MAX];

    for (int round = 0; round < EVENT_ROUNDS; round++) {
        int n = epoll_wait(hs->epfd, ev, EVENTS_MAX, 0);
        for (int i = 0; i < n; i++) {
            struct hub_http_conn *c = ev[i].data.ptr;
            if (c->state == S_CLOSED)
                continue; /* closed by an earlier event of this batch */
            c->armed = 0;
            drive(c, 1);
        }
        if (n < EVENTS_MAX)
            break;
    }
    reap(hs);
}

static void on_sweep(uv_timer_t *t)
{
    struct hub_http *hs = t->data;
    uint64_t tnow = now(hs);
    struct hub_list *it, *tmp;
    char msg[160];

    hub_list_foreach_safe(it, tmp, &hs->conns) {
        struct hub_http_conn *c = hub_container_of(it, struct hub_http_conn, node);
        if (tnow < c->deadline || c->state == S_BUSY)
            continue;
        hs->timeouts++;
        if ((c->state == S_HEAD && c->in.len) || c->state == S_BODY) {
            snprintf(msg, sizeof(msg),
                     "the request did not arrive in time (request_timeout %u s)",
                     hs->opt.request_timeout_ms / 1000);
            c->req.keep_alive = 0;
            fail(c, 408, "timeout", msg);
            if (c->state == S_WRITE) /* the socket is full: give up */
                conn_close(c);
        } else {
            conn_close(c);
        }
    }
    reap(hs);
}

struct hub_http *hub_http_new(uv_loop_t *loop, const struct hub_http_options *o,
                              const struct hub_http_routes *routes, void *ud)
{
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) {
        hub_log(HUB_LOG_ERROR, "epoll_create1: %s", strerror(errno));
        return NULL;
    }
    struct hub_http *hs = hub_xcalloc(1, sizeof(*hs));
    hs->loop = loop;
    hs->opt = *o;
    hs->routes = routes;
    hs->ud = ud;
    hs->epfd = epfd;
    hub_list_init(&hs->conns);
    hub_list_init(&hs->zombies);
    uv_poll_init(loop, &hs->poll, epfd);
    hs->poll.data = hs;
    uv_poll_start(&hs->poll, UV_READABLE, on_events);
    uv_unref((uv_handle_t *)&hs->poll);
    uv_timer_init(loop, &hs->sweep);
    hs->sweep.data = hs;
    uv_timer_start(&hs->sweep, on_sweep, SWEEP_MS, SWEEP_MS);
    uv_unref((uv_handle_t *)&hs->sweep);
    return hs;
}

/* The peer's numeric address and whether it is on loopback. */
static void peer_from(struct hub_http_conn *c, const struct sockaddr *sa, socklen_t sl)
{
    memset(&c->peer, 0, sizeof(c->peer));
    if (sa->sa_family == AF_INET && sl >= sizeof(struct sockaddr_in)) {
        c->peer.family = 4;
        c->peer.prefix = 32;
        memcpy(c->peer.a, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6 && sl >= sizeof(struct sockaddr_in6)) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (IN6_IS_ADDR_V4MAPPED(a)) {
            c->peer.family = 4;
            c->peer.prefix = 32;
            memcpy(c->peer.a, a->s6_addr + 12, 4);
        } else {
            c->peer.family = 6;
            c->peer.prefix = 128;
            memcpy(c->peer.a, a->s6_addr, 16);
        }
    }
}

static int join_xff(void *ud, const char *v, size_t len)
{
    struct hub_buf *b = ud;
    if (b->len)
        hub_buf_appends(b, ",");
    hub_buf_append(b, v, len);
    return 0;
}

/* Who the current request is from: the peer, or behind a trusted proxy the
 * client its X-Forwarded-For names (docs/protocol.md, "Client addresses"). */
static void client_of(struct hub_http_conn *c)
{
    const struct hub_http *hs = c->hs;
    struct hub_ip ip = c->peer;
    if (hs->opt.ntrusted && c->peer.family) {
        struct hub_buf xff = {0};
        hub_request_list_each(&c->req, "x-forwarded-for", join_xff, &xff);
        hub_ip_client(&c->peer, xff.p, xff.len, hs->opt.trusted, hs->opt.ntrusted, &ip);
        hub_buf_free(&xff);
    }
    c->client[0] = '\0';
    if (ip.family)
        hub_ip_format(&ip, c->client, sizeof(c->client));
    c->req.peer = c->client;
    c->req.peer_ip = ip;
    c->req.peer_loopback = ip.family && hub_ip_loopback(&ip);
}

void hub_http_accept_peer(struct hub_http *hs, int fd, const struct sockaddr *peer,
                          socklen_t len, int secure)
{
    struct hub_http_conn *c = hub_xcalloc(1, sizeof(*c));
    c->hs = hs;
    c->fd = fd;
    c->file_fd = -1;
    c->state = S_HEAD;
    c->started = now(hs);
    c->deadline = c->started + hs->opt.request_timeout_ms;
    c->secure = (uint8_t)secure;
    peer_from(c, peer, len);
    hub_list_init(&c->node);
    hub_list_push_tail(&hs->conns, &c->node);
    hs->nconns++;
    /* Read at once: a client sends its request right after connecting, so
     * it is usually there by the time the connection is accepted, and then
     * joining the epoll set and waiting an iteration for it would be two
     * system calls and a turn of the loop for nothing (docs/internals.md,
     * "Connection cost"). When it is not there, drive() arms EPOLLIN. */
    drive(c, 1);
    reap(hs); /* an upgrade taken at once is done with here, as after an event */
}

void hub_http_accept(struct hub_http *hs, int fd)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);

    if (getpeername(fd, (struct sockaddr *)&ss, &sl) < 0) {
        ss.ss_family = AF_UNSPEC;
        sl = sizeof(ss.ss_family);
    }
    hub_http_accept_peer(hs, fd, (struct sockaddr *)&ss, sl, 0);
}

void hub_http_shutdown(struct hub_http *hs)
{
    struct hub_list *it, *tmp;

    hs->shutting_down = 1;
    hub_list_foreach_safe(it, tmp, &hs->conns) {
        struct hub_http_conn *c = hub_container_of(it, struct hub_http_conn, node);
        if (c->state == S_IDLE)
            conn_close(c);
    }
}

void hub_http_metrics(const struct hub_http *hs, struct hub_buf *b)
{
    hub_metric_one(b, "luahub_http_requests_total", "counter", "HTTP requests served.",
                   hs ? hs->requests : 0);
    hub_metric_one(b, "luahub_http_connections", "gauge",
                   "Open plain HTTP connections (not yet or never upgraded).",
                   hs ? hs->nconns : 0);
    hub_metric_one(b, "luahub_http_timeouts_total", "counter",
                   "HTTP connections closed by a deadline (request_timeout, http_idle_timeout).",
                   hs ? hs->timeouts : 0);
}

void hub_http_stop(struct hub_http *hs)
{
    struct hub_list *it, *tmp;

    if (!hs || hs->stopped)
        return;
    hs->stopped = 1;
    hs->shutting_down = 1;
    hub_list_foreach_safe(it, tmp, &hs->conns)
        conn_close(hub_container_of(it, struct hub_http_conn, node));
    reap(hs);
    uv_close((uv_handle_t *)&hs->poll, NULL);
    uv_close((uv_handle_t *)&hs->sweep, NULL);
}

void hub_http_free(struct hub_http *hs)
{
    struct hub_list *it, *tmp;

    if (!hs)
        return;
    /* Every hold is released by now (the broker's stop fails what is
     * pending); what is left is freed regardless. */
    hub_list_foreach_safe(it, tmp, &hs->zombies)
        conn_free(hub_container_of(it, struct hub_http_conn, node));
    close(hs->epfd);
    free(hs);
}
