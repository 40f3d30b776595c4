/* The lws context on our libuv loop, the vhost, the protocol callback,
 * fan-out and graceful shutdown.
 *
 * lws 4.1.6 facts this file depends on (see NOTES-stack.md §2-3):
 * - the vhost is created explicitly, so a failed bind returns NULL instead
 *   of a context that runs without a listener;
 * - with a foreign loop lws installs no signal handlers (main.c owns them);
 * - lws_context_destroy() must be called twice: once to start closing its
 *   handles, again after uv_run() has returned, to free the context;
 * - close frames queued from WRITEABLE through lws_close_reason() are lost
 *   with Debian's _DEBUG build, so we write close frames ourselves. */
#include "luahub/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "luahub/http.h"
#include "luahub/http_api.h"
#include "luahub/log.h"
#include "luahub/metrics.h"
#include "luahub/msg.h"
#include "luahub/policy.h"
#include "luahub/registry.h"

_Static_assert(HUB_MSG_HEADROOM >= LWS_PRE + 10, "message headroom below LWS_PRE");

/* Per-session data: lws allocates one per connection. lws sees WebSocket
 * connections only: plain HTTP is served by http.c. */
union pss {
    struct hub_conn ws;
};

/* lws splits one write into sends of at most this (after a short write). */
#define TX_PACKET_SIZE 65536
#define HEADER_POOL 64

static void log_emit(int level, const char *line)
{
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        n--;
    /* lws 4.1.6 logs every lws_adopt_socket_vhost_readbuf() at error level
     * ("adopt_socket_readbuf: calling service"): that is our normal path
     * for every upgrade (docs/internals.md, "HTTP"), not an error. */
    if (strstr(line, "adopt_socket_readbuf"))
        return;
    hub_log(level == LLL_ERR ? HUB_LOG_ERROR : HUB_LOG_WARN, "lws: %.*s",
            (int)n, line);
}

/* Refuses an upgrade with an HTTP status and `why` as a plain-text body. */
static void refuse(struct hub_http_conn *c, unsigned status, const char *why,
                   const char *extra)
{
    hub_metrics.connections_refused++;
    hub_http_respond(c, status, "text/plain; charset=utf-8", extra, why, strlen(why),
                     HUB_HTTP_CLOSE);
}

/* A Sec-WebSocket-Key is 16 random bytes in base64: 24 characters, the
 * last two "==" (RFC 6455 §4.1). */
static int ws_key_valid(const char *k, size_t n)
{
    if (!k || n != 24 || k[22] != '=' || k[23] != '=')
        return 0;
    for (size_t i = 0; i < 22; i++)
        if (!((k[i] >= 'A' && k[i] <= 'Z') || (k[i] >= 'a' && k[i] <= 'z') ||
              (k[i] >= '0' && k[i] <= '9') || k[i] == '+' || k[i] == '/'))
            return 0;
    return 1;
}

/* The subprotocols the client offered (all Sec-WebSocket-Protocol
 * headers, comma-separated): 1 when "luahub" is among them or none was
 * offered; else 0, with the offer (shortened) in `offer`. */
static int subprotocol_ok(const struct hub_request *r, int *offered, char *offer, size_t olen)
{
    size_t used = 0;

    *offered = 0;
    offer[0] = '\0';
    for (size_t i = 0; i < r->nheaders; i++) {
        const struct hub_header *h = &r->headers[i];
        if (strcmp(h->name, "sec-websocket-protocol") != 0)
            continue;
        *offered = 1;
        if (hub_request_has_token(r, "sec-websocket-protocol", "luahub"))
            return 1;
        int w = snprintf(offer + used, olen - used, "%s%.*s", used ? ", " : "",
                         (int)(h->value_len > 64 ? 64 : h->value_len), h->value);
        if (w > 0 && (size_t)w < olen - used)
            used += (size_t)w;
    }
    return !*offered;
}

/* A complete WebSocket upgrade request (http.c): the checks and on_connect
 * run here, on the parsed request; an accepted one is handed to lws with a
 * request head of our own making (docs/internals.md, "HTTP"). */
static void on_upgrade(void *ud, struct hub_http_conn *c, const struct hub_request *r)
{
    struct hub_server *srv = ud;
    const struct hub_config *cfg = srv->cfg;
    size_t kl, vl, hl;
    const char *key = hub_request_header(r, "sec-websocket-key", &kl);
    const char *ver = hub_request_header(r, "sec-websocket-version", &vl);
    const char *host = hub_request_header(r, "host", &hl);
    char offer[256];
    int offered;

    if (r->path_len != strlen(cfg->websocket_path) || strcmp(r->path, cfg->websocket_path)) {
        refuse(c, 404, "no websocket endpoint here", NULL);
        return;
    }
    if (strcmp(r->method, "GET") != 0 || r->http_minor != 1 || !host ||
        !hub_request_has_token(r, "connection", "upgrade") || !ws_key_valid(key, kl)) {
        refuse(c, 400, "not a valid WebSocket upgrade request (RFC 6455 4.1: GET, HTTP/1.1, "
                       "Host, Connection: Upgrade, Sec-WebSocket-Key)", NULL);
        return;
    }
    if (!ver || vl != 2 || memcmp(ver, "13", 2) != 0) {
        refuse(c, 426, "unsupported WebSocket version: this hub speaks version 13",
               "Sec-WebSocket-Version: 13\r\n");
        return;
    }
    if (!subprotocol_ok(r, &offered, offer, sizeof(offer))) {
        hub_log(HUB_LOG_INFO, "upgrade from %s refused: subprotocols offered: %s "
                "(this hub speaks \"luahub\")", r->peer, offer);
        char why[400];
        snprintf(why, sizeof(why), "unsupported WebSocket subprotocol (offered: %s): this hub "
                 "speaks \"luahub\"", offer);
        refuse(c, 400, why, NULL);
        return;
    }
    if (srv->shutting_down) {
        refuse(c, 503, "server shutting down", NULL);
        return;
    }
    if (cfg->max_connections && hub_metrics.connections >= cfg->max_connections) {
        refuse(c, 503, "too many connections (max_connections)", NULL);
        return;
    }

    struct hub_connect_result res;
    memset(&res, 0, sizeof(res));
    uint64_t id = ++srv->next_conn_id;
    if (srv->policy && hub_policy_has(srv->policy, HUB_HOOK_CONNECT)) {
        enum hub_verdict v = hub_policy_on_connect(srv->policy, r, id, &res);
        if (v != HUB_ALLOW) {
            free(res.user);
            free(res.info_json);
            if (v == HUB_FAIL)
                refuse(c, 500, "internal error: the connect policy failed", NULL);
            else
                refuse(c, res.status ? res.status : 403,
                       res.reason[0] ? res.reason : "forbidden", NULL);
            return;
        }
    }
    struct hub_conn_pending *pending = hub_xmalloc(sizeof(*pending));
    pending->id = id;
    pending->user = res.user;
    pending->info_json = res.info_json;

    /* lws parses a head of ours: the fields it needs and nothing the
     * client may have made too large for its 4 KB header table. */
    struct hub_buf head = {0};
    hub_buf_printf(&head, "GET %s HTTP/1.1\r\nHost: %.*s\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: %.*s\r\n"
                   "Sec-WebSocket-Version: 13\r\n%s\r\n",
                   cfg->websocket_path, (int)(hl > 255 ? 255 : hl), host, (int)kl, key,
                   offered ? "Sec-WebSocket-Protocol: luahub\r\n" : "");
    int fd = hub_http_take(c, &head);
    srv->handoff = pending;
    struct lws *wsi = lws_adopt_socket_vhost_readbuf(srv->vhost, fd, head.p, head.len);
    hub_buf_free(&head);
    if (srv->handoff) {
        /* Not established within the call (lws had no free header table,
         * or refused the handshake): it goes with the wsi, if any. */
        if (wsi) {
            lws_set_opaque_user_data(wsi, srv->handoff);
        } else {
            free(pending->user);
            free(pending->info_json);
            free(pending);
        }
        srv->handoff = NULL;
    }
}

/* Takes what on_connect left for the wsi, if anything. */
static struct hub_conn_pending *take_pending(struct hub_server *srv, struct lws *wsi)
{
    struct hub_conn_pending *p = lws_get_opaque_user_data(wsi);
    if (p) {
        lws_set_opaque_user_data(wsi, NULL);
        return p;
    }
    p = srv->handoff;
    srv->handoff = NULL;
    return p;
}

static const struct hub_http_routes routes = {
    .request = hub_http_api_request,
    .upgrade = on_upgrade,
};

static int callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
                    void *in, size_t len)
{
    struct hub_server *srv = lws_context_user(lws_get_context(wsi));
    union pss *pss = user;

    switch (reason) {
    case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
        srv->lws_woken = 0; /* the wake-up of drop() (conn.c) arrived */
        return 0;
    case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
        return 0; /* checked by on_upgrade before lws saw the request */
    case LWS_CALLBACK_ESTABLISHED:
        hub_conn_open(&pss->ws, srv, wsi, take_pending(srv, wsi));
        return 0;
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        return hub_conn_peer_closed(&pss->ws, in, len);
    case LWS_CALLBACK_WSI_DESTROY: {
        /* An upgrade that on_connect allowed but that never completed. */
        struct hub_conn_pending *p = lws_get_opaque_user_data(wsi);
        lws_set_opaque_user_data(wsi, NULL);
        if (p) {
            free(p->user);
            free(p->info_json);
            free(p);
        }
        break;
    }
    case LWS_CALLBACK_RECEIVE:
        return hub_conn_receive(&pss->ws, in, len);
    case LWS_CALLBACK_RECEIVE_PONG:
        if (pss->ws.srv)
            hub_conn_seen(&pss->ws);
        return 0;
    case LWS_CALLBACK_SERVER_WRITEABLE:
        return hub_conn_writeable(&pss->ws);
    case LWS_CALLBACK_CLOSED:
        hub_conn_closed(&pss->ws);
        return 0;
    default:
        break;
    }
    return lws_callback_http_dummy(wsi, reason, user, in, len);
}

/* The first address of network interface `name` (IPv4 before IPv6), as lws
 * resolves its `iface`. Returns 0, or -1 when there is no such interface. */
static int iface_addr(const char *name, int port, struct sockaddr_storage *ss, socklen_t *sl)
{
    static const int fams[] = {AF_INET, AF_INET6};
    struct ifaddrs *ifs, *i = NULL;

    if (getifaddrs(&ifs) < 0)
        return -1;
    for (size_t f = 0; f < 2 && !i; f++)
        for (i = ifs; i; i = i->ifa_next)
            if (i->ifa_addr && i->ifa_addr->sa_family == fams[f] && !strcmp(i->ifa_name, name))
                break;
    if (i) {
        *sl = i->ifa_addr->sa_family == AF_INET ? sizeof(struct sockaddr_in)
                                                : sizeof(struct sockaddr_in6);
        memcpy(ss, i->ifa_addr, *sl);
        if (i->ifa_addr->sa_family == AF_INET)
            ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
        else
            ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
    }
    freeifaddrs(ifs);
    return i ? 0 : -1;
}

/* The socket address of the conf's listen host and `port`. Returns 0, or
 * -1 when the host is neither an IP address nor a network interface
 * ("localhost" counts as 127.0.0.1; "0.0.0.0" and "::" are the
 * wildcards). */
static int listen_addr(const struct hub_config *cfg, int port,
                       struct sockaddr_storage *ss, socklen_t *sl)
{
    const char *host = cfg->listen_host;
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;

    memset(ss, 0, sizeof(*ss));
    if (!strcmp(host, "localhost"))
        host = "127.0.0.1";
    if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        *sl = sizeof(*s4);
        return 0;
    }
    if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        *sl = sizeof(*s6);
        return 0;
    }
    return iface_addr(host, port, ss, sl);
}

/* Binds a socket like lws will (SO_REUSEADDR, plus SO_REUSEPORT when the
 * port is shared by workers). Returns the fd, or -errno. */
static int try_bind(const struct hub_config *cfg, int port, int reuseport)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    int one = 1;

    if (listen_addr(cfg, port, &ss, &sl) < 0)
        return -EADDRNOTAVAIL;
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&ss, sl) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

/* Says why a bind failed: lws does not tell us, so try it ourselves. */
static void explain_bind_failure(const struct hub_config *cfg)
{
    int fd = try_bind(cfg, cfg->listen_port, cfg->workers != 1);
    if (fd >= 0) {
        close(fd);
        hub_log(HUB_LOG_ERROR, "cannot listen on %s", cfg->listen);
        return;
    }
    hub_log(HUB_LOG_ERROR, "cannot listen on %s: %s%s", cfg->listen, strerror(-fd),
            fd == -EADDRINUSE ? " (another process has the port: stop it, or "
                                "choose another with listen or --listen)"
            : fd == -EADDRNOTAVAIL ? " (not an address or network interface of this machine)" : "");
}

/* The hub listens itself and hands every accepted socket to lws
 * (lws_adopt_socket_vhost). Two reasons:
 *  - workers: lws 4.1.6 sets SO_REUSEPORT only with several service threads
 *    (server.c, `count_threads > 1`) and Debian builds it with one, so a
 *    second worker could not bind; ours sets it and the kernel spreads
 *    connections over the workers;
 *  - cost: lws's own listener costs ~6 system calls per connection more:
 *    accept without accept4 flags (then fcntl), a poll() of the listener
 *    after every accept, and on every close it re-enables the listener
 *    (lws_accept_modulation), which libuv's uv_poll_start turns into two
 *    epoll_ctl calls plus a failing one. Here: accept4 until EAGAIN. */
#define ACCEPT_BATCH 64
#define WORKER_LISTEN_WAIT_MS 3000

#define ACCEPT_PAUSE_MS 100
#define ACCEPT_WARN_EVERY_MS 10000

static void on_accept(uv_poll_t *p, int status, int events);

static void on_accept_timer(uv_timer_t *t)
{
    struct hub_server *srv = t->data;
    /* Workers stop accepting for good at shutdown; a single process
     * accepts until it exits (see hub_server_shutdown). */
    if (srv->listen_fd >= 0 && !uv_is_closing((uv_handle_t *)&srv->listener) &&
        !(srv->shutting_down && srv->cfg->workers != 1))
        uv_poll_start(&srv->listener, UV_READABLE, on_accept);
}

/* Out of descriptors or memory: the pending connection stays in the
 * backlog and the listener would be readable again at once, a busy loop.
 * Stop watching it for ACCEPT_PAUSE_MS, and say so at most every
 * ACCEPT_WARN_EVERY_MS. */
static void accept_pause(struct hub_server *srv, const char *why)
{
    uint64_t now = uv_now(srv->loop);
    hub_metrics.accept_pauses++;
    if (!srv->accept_warned_ms || now - srv->accept_warned_ms >= ACCEPT_WARN_EVERY_MS) {
        hub_log(HUB_LOG_WARN,
                "cannot accept connections (%s): pausing accepts for %d ms "
                "(%llu pauses so far; raise the open-files limit, ulimit -n)",
                why, ACCEPT_PAUSE_MS, (unsigned long long)hub_metrics.accept_pauses);
        srv->accept_warned_ms = now;
    }
    uv_poll_stop(&srv->listener);
    uv_timer_start(&srv->accept_timer, on_accept_timer, ACCEPT_PAUSE_MS, 0);
}

static void on_accept(uv_poll_t *p, int status, int events)
{
    struct hub_server *srv = p->data;
    int one = 1;

    if (status < 0 || !(events & UV_READABLE))
        return;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        int fd = accept4(srv->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                accept_pause(srv, strerror(errno));
            else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                     errno != ECONNABORTED)
                hub_log(HUB_LOG_WARN, "accept: %s", strerror(errno));
            return;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        hub_http_accept(srv->http, fd);
    }
}

static void on_listener_closed(uv_handle_t *h)
{
    struct hub_server *srv = h->data;
    close(srv->listen_fd);
    srv->listen_fd = -1;
}

static int listen_own(struct hub_server *srv)
{
    int fd = try_bind(srv->cfg, srv->cfg->listen_port, srv->cfg->workers != 1);
    if (fd < 0 || listen(fd, 1024) < 0) {
        if (fd >= 0)
            close(fd);
        explain_bind_failure(srv->cfg);
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    srv->listen_fd = fd;
    uv_poll_init(srv->loop, &srv->listener, fd);
    srv->listener.data = srv;
    uv_poll_start(&srv->listener, UV_READABLE, on_accept);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    srv->port = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
                                              : ((struct sockaddr_in6 *)&ss)->sin6_port);
    return 0;
}

static void start_accepting(struct hub_server *srv)
{
    if (!srv->shutting_down && srv->listen_fd >= 0)
        uv_poll_start(&srv->listener, UV_READABLE, on_accept);
}

static void on_listen_timer(uv_timer_t *t)
{
    struct hub_server *srv = t->data;
    hub_log(HUB_LOG_WARN, "broker still down after %d ms: accepting clients anyway",
            WORKER_LISTEN_WAIT_MS);
    start_accepting(srv);
}

int hub_server_reserve_port(struct hub_config *cfg)
{
    int fd = try_bind(cfg, cfg->listen_port, 1);
    if (fd < 0) {
        explain_bind_failure(cfg);
        return -1;
    }
    if (cfg->listen_port == 0) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        getsockname(fd, (struct sockaddr *)&ss, &sl);
        cfg->listen_port = ntohs(ss.ss_family == AF_INET
                                     ? ((struct sockaddr_in *)&ss)->sin_port
                                     : ((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    return fd;
}

static void make_instance_id(char *out, size_t outlen)
{
    unsigned char r[6];
    if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
        uint64_t t = hub_now_ns() ^ ((uint64_t)getpid() << 32);
        memcpy(r, &t, sizeof(r));
    }
    for (size_t i = 0; i < sizeof(r) && 2 * i + 2 < outlen; i++)
        snprintf(out + 2 * i, 3, "%02x", r[i]);
}

/* Writes the listed connections (only those with a reply queued when
 * `urgent_only`); adds the frames they held and their number to *frames
 * and *conns when not NULL. */
static void flush_list(struct hub_server *srv, int urgent_only, uint64_t *frames,
                       uint64_t *conns)
{
    struct hub_conn **pp = &srv->dirty;

    while (*pp) {
        struct hub_conn *c = *pp;
        if (urgent_only && !(c->flags & HUB_CONN_URGENT)) {
            pp = &c->dirty_next;
            continue;
        }
        *pp = c->dirty_next;
        if (c->flags & HUB_CONN_URGENT)
            srv->nurgent--;
        if (frames) {
            *frames += c->q.count;
            (*conns)++;
        }
        hub_conn_flush(c);
    }
}

void hub_server_flush(struct hub_server *srv, int urgent_only)
{
    flush_list(srv, urgent_only, NULL, NULL);
}

/* Write pacing. Deliveries are written at the end of the loop iteration
 * that queued them, all of a connection's frames in one write. A write
 * costs ~5 us on loopback and a frame in it ~0.1 us, so under load a short
 * pause before the next flush, while publishes keep arriving, makes each
 * write carry several frames. The pause pays only if connections receive
 * several frames within it; otherwise it is latency for nothing (at 100
 * messages/s per connection, a 10 ms pause saves a third of the writes and
 * adds 10 ms). And past a few dozen frames per write a longer pause saves
 * little more. Hence:
 *  - a flush that took FLUSH_BUSY_NS or more (the hub is busy) starts
 *    pausing: the next flush waits as long as that one took;
 *  - after a paused flush that wrote FLUSH_GATHER_MIN..FLUSH_GATHER_MAX
 *    frames per connection, the next pause is again as long as that flush
 *    took (half the time writing, half gathering: the pause grows with the
 *    number of connections, so their writes carry as many frames);
 *  - more frames than that: the next pause is half as long;
 *  - fewer: pausing did not pay and stops, until the hub is busy again
 *    after a back-off (FLUSH_TRIAL_MIN_MS, doubling up to _MAX_MS; a flush
 *    that paid resets it);
 *  - after an idle spell (no flush for two pauses) the flush is immediate
 *    and judges nothing.
 * Pauses stay within [FLUSH_PAUSE_MIN_MS, FLUSH_PAUSE_MAX_MS]. An idle or
 * lightly loaded hub adds no latency. The conf key write_delay sets a floor
 * (flushes at most every write_delay ms, whatever they gather) for those
 * who trade latency for CPU at moderate rates. Replies are never paused
 * (mark_urgent in conn.c). */
#define FLUSH_PAUSE_MIN_MS 1
#define FLUSH_PAUSE_MAX_MS 100
#define FLUSH_BUSY_NS 1000000u
#define FLUSH_GATHER_MIN 1.5
#define FLUSH_GATHER_MAX 32
#define FLUSH_TRIAL_MIN_MS 50
#define FLUSH_TRIAL_MAX_MS 2000

static uint32_t clamp_pause(uint64_t ms)
{
    return ms < FLUSH_PAUSE_MIN_MS ? FLUSH_PAUSE_MIN_MS
           : ms > FLUSH_PAUSE_MAX_MS ? FLUSH_PAUSE_MAX_MS : (uint32_t)ms;
}

static void flush_all(struct hub_server *srv, int paused)
{
    uint64_t t0 = uv_hrtime(), frames = 0, conns = 0;

    flush_list(srv, 0, &frames, &conns);
    uint64_t now = uv_hrtime(), cost_ms = (now - t0) / 1000000u;
    srv->last_flush_ns = now;
    if (!conns)
        return; /* replies flushed everything meanwhile: nothing to judge */
    hub_metrics.flushes++;
    if (!paused) {
        if (now - t0 >= FLUSH_BUSY_NS && now >= srv->flush_trial_ns)
            srv->flush_pause_ms = clamp_pause(cost_ms);
        return;
    }
    hub_metrics.flushes_paused++;
    if ((double)frames >= FLUSH_GATHER_MIN * (double)conns) {
        srv->flush_backoff_ms = 0;
        srv->flush_pause_ms = frames > FLUSH_GATHER_MAX * conns
                                  ? clamp_pause(srv->flush_pause_ms / 2)
                                  : clamp_pause(cost_ms);
        return;
    }
    srv->flush_pause_ms = 0;
    srv->flush_backoff_ms = srv->flush_backoff_ms * 2 > FLUSH_TRIAL_MAX_MS ? FLUSH_TRIAL_MAX_MS
                            : srv->flush_backoff_ms ? srv->flush_backoff_ms * 2
                                                    : FLUSH_TRIAL_MIN_MS;
    srv->flush_trial_ns = now + srv->flush_backoff_ms * (uint64_t)1000000u;
}

static void on_flush_timer(uv_timer_t *t)
{
    flush_all(t->data, 1);
}

static void on_flush(uv_check_t *h)
{
    struct hub_server *srv = h->data;

    if (!srv->dirty)
        return;
    if (srv->nurgent)
        hub_server_flush(srv, 1);
    if (!srv->dirty || uv_is_active((uv_handle_t *)&srv->flush_timer))
        return;
    uint64_t pause = srv->flush_pause_ms;
    if (pause < srv->cfg->write_delay)
        pause = srv->cfg->write_delay;
    if (!pause || srv->shutting_down) {
        flush_all(srv, 0);
        return;
    }
    uint64_t since = (uv_hrtime() - srv->last_flush_ns) / 1000000u;
    if (since >= 2 * pause) { /* idle in between: nothing gathered */
        flush_all(srv, 0);
        return;
    }
    if (since >= pause) {
        flush_all(srv, 1);
        return;
    }
    uv_timer_start(&srv->flush_timer, on_flush_timer, pause - since, 0);
}

/* The PINGs go out now: the flusher runs after the loop's poll, which
 * would otherwise sleep until the next timer. */
static void on_keepalive(uv_timer_t *t)
{
    hub_conn_keepalive(t->data);
    hub_server_flush(t->data, 1);
}

static void on_deliver(void *ud, const char *channel, size_t len, struct hub_msg *m);

/* POST /api/disconnect reached this instance (from any instance): close
 * that user's connections here. hub_conn_close is asynchronous, so the list
 * does not change under the walk. */
static void on_disconnect_user(void *ud, const char *user, size_t len)
{
    struct hub_server *srv = ud;
    for (struct hub_conn *c = srv->conns; c; c = c->next)
        if (c->user && strlen(c->user) == len && !memcmp(c->user, user, len))
            hub_conn_close(c, 4003, "disconnected by the API", 0);
}
static void on_broker_health(void *ud, int up);
static void on_channel_empty(void *ud, const char *name, size_t len);

int hub_server_init(struct hub_server *srv, uv_loop_t *loop,
                    const struct hub_config *cfg)
{
    char err[256];

    memset(srv, 0, sizeof(*srv));
    srv->listen_fd = -1;
    srv->static_fd = hub_http_api_static_open(cfg->static_dir);
    srv->loop = loop;
    srv->cfg = cfg;
    hub_chan_registry_init(&srv->chans);
    srv->chans.on_last = on_channel_empty;
    srv->chans.ud = srv;
    make_instance_id(srv->instance, sizeof(srv->instance));
    uv_timer_init(loop, &srv->shutdown_timer);
    srv->shutdown_timer.data = srv;
    uv_timer_init(loop, &srv->flush_timer);
    srv->flush_timer.data = srv;
    uv_timer_init(loop, &srv->listen_timer);
    srv->listen_timer.data = srv;
    uv_timer_init(loop, &srv->keepalive);
    srv->keepalive.data = srv;
    uv_timer_init(loop, &srv->accept_timer);
    srv->accept_timer.data = srv;
    srv->ping = hub_msg_ping();
    uv_check_init(loop, &srv->flusher);
    srv->flusher.data = srv;
    uv_check_start(&srv->flusher, on_flush);
    uv_unref((uv_handle_t *)&srv->flusher); /* it never keeps the loop alive */

    srv->broker = hub_broker_new(loop, cfg->broker, cfg->redis_prefix, on_deliver,
                                 on_broker_health, srv, err, sizeof(err));
    if (!srv->broker) {
        hub_log(HUB_LOG_ERROR, "broker: %s", err);
        return -1;
    }
    srv->broker_local = !strcmp(srv->broker->ops->name, "memory");
    return 0;
}

int hub_server_start(struct hub_server *srv)
{
    struct lws_context_creation_info info;
    const struct hub_config *cfg = srv->cfg;
    void *foreign[1] = {srv->loop};
    const char *iface = cfg->listen_host;
    uint64_t vopts = LWS_SERVER_OPTION_LIBUV | LWS_SERVER_OPTION_FAIL_UPON_UNABLE_TO_BIND;

    /* lws prints through us, errors and warnings only, but not while the
     * context and the vhost are created: a failure there gets one clear
     * line of ours instead of lws's internal ones. */
    lws_set_log_level(0, log_emit);

    memset(&info, 0, sizeof(info));
    info.options = LWS_SERVER_OPTION_LIBUV | LWS_SERVER_OPTION_EXPLICIT_VHOSTS;
    info.foreign_loops = foreign;
    info.user = srv;
    info.pcontext = &srv->ctx;
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.max_http_header_pool = HEADER_POOL;
    info.gid = -1;
    info.uid = -1;
    srv->ctx = lws_create_context(&info);
    if (!srv->ctx) {
        hub_log(HUB_LOG_ERROR,
                "cannot start libwebsockets on libuv: is the package "
                "libwebsockets-evlib-uv installed? (lws loads its libuv backend "
                "from %s/libwebsockets-evlib_uv.so)", LWS_INSTALL_LIBDIR);
        return -1;
    }

    srv->protocols[0] = (struct lws_protocols){
        .name = "luahub",
        .callback = callback,
        .per_session_data_size = sizeof(union pss),
        /* Bytes lws reads per readable event and per RECEIVE callback,
         * malloc'ed per connection (conf rx_buffer_size, >= 128 so that a
         * 125-byte control frame fits); larger messages are reassembled. */
        .rx_buffer_size = (size_t)cfg->rx_buffer_size,
        .tx_packet_size = TX_PACKET_SIZE,
    };
    /* No lws validity timers (all zero): keepalive is ours, see
     * hub_conn_keepalive. lws 4.1.6 keeps a timer per connection in one
     * sorted list and inserts by walking it, O(connections) for every
     * connect and every PONG: at 15,000 connections that was 44 % of the
     * CPU spent accepting them. A NULL policy would get lws's default (300
     * s), hence an explicit one. */
    srv->retry = (lws_retry_bo_t){0};

    if (!strcmp(iface, "0.0.0.0")) {
        iface = NULL;
        vopts |= LWS_SERVER_OPTION_DISABLE_IPV6;
    } else if (!strcmp(iface, "::")) {
        iface = NULL;
    } else if (!strcmp(iface, "localhost")) {
        iface = "127.0.0.1";
        vopts |= LWS_SERVER_OPTION_DISABLE_IPV6;
    } else if (!strchr(iface, ':')) {
        vopts |= LWS_SERVER_OPTION_DISABLE_IPV6;
    }

    memset(&info, 0, sizeof(info));
    info.vhost_name = "default";
    /* We listen ourselves (see listen_own). */
    info.port = CONTEXT_PORT_NO_LISTEN_SERVER;
    info.iface = iface;
    info.protocols = srv->protocols;
    info.options = vopts;
    info.retry_and_idle_policy = &srv->retry;
    srv->vhost = lws_create_vhost(srv->ctx, &info);
    if (!srv->vhost) {
        explain_bind_failure(cfg);
        return -1;
    }
    lws_set_log_level(LLL_ERR | LLL_WARN, log_emit);
    srv->http = hub_http_new(srv->loop, &(struct hub_http_options){
        .max_body = cfg->max_message_size,
        .request_timeout_ms = cfg->request_timeout * 1000u,
        .idle_timeout_ms = cfg->http_idle_timeout * 1000u,
    }, &routes, srv);
    if (!srv->http || listen_own(srv) < 0)
        return -1;
    uv_timer_start(&srv->keepalive, on_keepalive, 1000, 1000);
    uv_unref((uv_handle_t *)&srv->keepalive);
    if (cfg->workers != 1) {
        /* A worker takes connections once its broker is up (or after
         * WORKER_LISTEN_WAIT_MS, degraded): a restarted worker would
         * otherwise get its share of new clients while it cannot yet
         * subscribe or publish for them. The port is bound now, so a
         * failure is still reported at start. */
        if (!srv->broker->ops->up(srv->broker)) {
            uv_poll_stop(&srv->listener);
            uv_timer_start(&srv->listen_timer, on_listen_timer, WORKER_LISTEN_WAIT_MS, 0);
        }
    }
    /* The registry advertises the bound address, so it starts now. */
    char address[320];
    snprintf(address, sizeof(address), "%s:%d", cfg->listen_host, srv->port);
    srv->registry = hub_registry_new(srv->loop, srv->broker, &(struct hub_registry_options){
        .instance = srv->instance,
        .address = address,
        .prefix = cfg->redis_prefix,
        .disconnect_user = on_disconnect_user,
        .ud = srv,
    });

    /* Tests and scripts parse this line: keep "listening on HOST:PORT" last. */
    hub_log(HUB_LOG_INFO | HUB_LOG_ALWAYS,
            "luahub %s (pid %d, instance %s, websocket path %s) listening on %s%s%s:%d",
            HUB_VERSION, (int)getpid(), srv->instance, cfg->websocket_path,
            strchr(cfg->listen_host, ':') ? "[" : "", cfg->listen_host,
            strchr(cfg->listen_host, ':') ? "]" : "", srv->port);
    return 0;
}

static uint32_t id_bucket(const struct hub_server *srv, uint64_t id)
{
    return (uint32_t)((id * 0x9e3779b97f4a7c15ull) >> 32) & (srv->nids_buckets - 1);
}

static void id_rehash(struct hub_server *srv, uint32_t n)
{
    struct hub_conn **t = hub_xcalloc(n, sizeof(*t));
    uint32_t old = srv->nids_buckets;
    struct hub_conn **ot = srv->ids;
    srv->ids = t;
    srv->nids_buckets = n;
    for (uint32_t b = 0; b < old; b++) {
        struct hub_conn *c = ot[b], *next;
        for (; c; c = next) {
            next = c->id_next;
            uint32_t i = id_bucket(srv, c->id);
            c->id_next = t[i];
            t[i] = c;
        }
    }
    free(ot);
}

void hub_server_add_conn(struct hub_server *srv, struct hub_conn *c)
{
    if (hub_metrics.connections + 1 > srv->nids_buckets)
        id_rehash(srv, srv->nids_buckets ? srv->nids_buckets * 2 : 256);
    uint32_t i = id_bucket(srv, c->id);
    c->id_next = srv->ids[i];
    srv->ids[i] = c;
}

void hub_server_remove_conn(struct hub_server *srv, struct hub_conn *c)
{
    struct hub_conn **pp = &srv->ids[id_bucket(srv, c->id)];
    while (*pp && *pp != c)
        pp = &(*pp)->id_next;
    if (*pp)
        *pp = c->id_next;
}

struct hub_conn *hub_server_find_conn(struct hub_server *srv, const char *client_id)
{
    size_t il = strlen(srv->instance);
    char *end;

    if (!srv->nids_buckets || strncmp(client_id, srv->instance, il) != 0 ||
        client_id[il] != '-' || client_id[il + 1] < '0' || client_id[il + 1] > '9')
        return NULL;
    errno = 0;
    unsigned long long id = strtoull(client_id + il + 1, &end, 10);
    if (*end || errno)
        return NULL;
    return hub_server_conn_by_id(srv, id);
}

/* The broker hands a sealed delivery frame for local fan-out. */
static void on_deliver(void *ud, const char *channel, size_t len, struct hub_msg *m)
{
    struct hub_server *srv = ud;
    struct hub_chan *ch = hub_chan_find(&srv->chans, channel, len);

    if (!ch)
        return;
    uint32_t n = ch->nsubs;
    /* Culls are deferred, so the array does not change under this loop. */
    for (uint32_t i = 0; i < n; i++)
        hub_conn_send(ch->subs[i]->owner, m);
    hub_metrics.deliveries += n;
    hub_server_flush_culls(srv);
}

static void on_broker_health(void *ud, int up)
{
    struct hub_server *srv = ud;
    hub_log(up ? HUB_LOG_INFO : HUB_LOG_WARN, "broker %s", up ? "up" : "down");
    if (up && uv_is_active((uv_handle_t *)&srv->listen_timer)) {
        uv_timer_stop(&srv->listen_timer);
        start_accepting(srv);
    }
}

/* The registry's last subscriber of a channel left: so does the broker. */
static void on_channel_empty(void *ud, const char *name, size_t len)
{
    struct hub_server *srv = ud;
    if (srv->broker)
        srv->broker->ops->unsubscribe(srv->broker, name, len);
}

int hub_server_publish_cb(struct hub_server *srv, const char *channel,
                          size_t channel_len, const char *data, size_t data_len,
                          hub_broker_publish_cb cb, void *ud)
{
    hub_metrics.published++;
    /* In one process, a channel nobody here listens to costs nothing. */
    if (srv->broker_local && !hub_chan_find(&srv->chans, channel, channel_len)) {
        if (cb)
            cb(ud, HUB_BROKER_OK, 0);
        return 0;
    }
    struct hub_msg *m = hub_msg_delivery(channel, channel_len, data, data_len);
    int r = srv->broker->ops->publish(srv->broker, channel, channel_len, m, cb, ud);
    hub_msg_unref(m);
    return r;
}

size_t hub_server_publish(struct hub_server *srv, const char *channel,
                          size_t channel_len, const char *data, size_t data_len)
{
    struct hub_chan *ch = hub_chan_find(&srv->chans, channel, channel_len);
    size_t n = ch ? ch->nsubs : 0;
    if (hub_server_publish_cb(srv, channel, channel_len, data, data_len, NULL, NULL) < 0)
        return 0;
    return n;
}

struct hub_conn *hub_server_conn_by_id(struct hub_server *srv, uint64_t id)
{
    if (!srv->nids_buckets)
        return NULL;
    for (struct hub_conn *c = srv->ids[id_bucket(srv, id)]; c; c = c->id_next)
        if (c->id == id)
            return c;
    return NULL;
}

void hub_server_flush_culls(struct hub_server *srv)
{
    while (srv->culls) {
        struct hub_conn *c = srv->culls;
        srv->culls = c->cull_next;
        hub_conn_cull(c);
    }
}

static void finish_shutdown(struct hub_server *srv)
{
    hub_server_done_cb done = srv->on_done;
    if (!done)
        return;
    srv->on_done = NULL;
    uv_timer_stop(&srv->shutdown_timer);
    done(srv);
}

static void on_shutdown_timeout(uv_timer_t *t)
{
    struct hub_server *srv = t->data;
    unsigned n = 0;
    for (struct hub_conn *c = srv->conns; c; c = c->next)
        n++;
    hub_log(HUB_LOG_WARN, "shutdown_timeout (%u s) reached with %u clients still open; "
            "closing them", srv->cfg->shutdown_timeout, n);
    finish_shutdown(srv);
}

void hub_server_conn_gone(struct hub_server *srv)
{
    if (srv->shutting_down && !srv->conns)
        finish_shutdown(srv);
}

void hub_server_shutdown(struct hub_server *srv, hub_server_done_cb done)
{
    if (srv->shutting_down) {
        hub_log(HUB_LOG_INFO, "second signal: not waiting for clients");
        finish_shutdown(srv);
        return;
    }
    srv->shutting_down = 1;
    srv->on_done = done;
    if (srv->http)
        hub_http_shutdown(srv->http);
    /* Workers stop accepting now: the other workers take new clients. A
     * single process keeps accepting until it exits, to answer /healthz
     * with 503 and refuse upgrades. */
    if (srv->listen_fd >= 0 && srv->cfg->workers != 1) {
        uv_poll_stop(&srv->listener);
        uv_timer_stop(&srv->listen_timer);
        uv_timer_stop(&srv->accept_timer);
    }

    unsigned n = 0;
    for (struct hub_conn *c = srv->conns; c; c = c->next) {
        hub_conn_close(c, 1001, "server shutting down", 0);
        n++;
    }
    hub_log(HUB_LOG_INFO, "shutting down: closing %u connections (waiting up to %u s)",
            n, srv->cfg->shutdown_timeout);
    if (!srv->conns) {
        finish_shutdown(srv);
        return;
    }
    uv_timer_start(&srv->shutdown_timer, on_shutdown_timeout,
                   (uint64_t)srv->cfg->shutdown_timeout * 1000u, 0);
}

void hub_server_stop(struct hub_server *srv)
{
    srv->shutting_down = 1;
    if (srv->listen_fd >= 0 && !uv_is_closing((uv_handle_t *)&srv->listener))
        uv_close((uv_handle_t *)&srv->listener, on_listener_closed);
    hub_http_stop(srv->http);
    hub_registry_stop(srv->registry); /* before the broker it talks through */
    if (srv->broker)
        srv->broker->ops->stop(srv->broker);
    if (srv->ctx)
        lws_context_destroy(srv->ctx);
    if (!uv_is_closing((uv_handle_t *)&srv->shutdown_timer))
        uv_close((uv_handle_t *)&srv->shutdown_timer, NULL);
    if (!uv_is_closing((uv_handle_t *)&srv->flusher))
        uv_close((uv_handle_t *)&srv->flusher, NULL);
    if (!uv_is_closing((uv_handle_t *)&srv->flush_timer))
        uv_close((uv_handle_t *)&srv->flush_timer, NULL);
    if (!uv_is_closing((uv_handle_t *)&srv->listen_timer))
        uv_close((uv_handle_t *)&srv->listen_timer, NULL);
    if (!uv_is_closing((uv_handle_t *)&srv->keepalive))
        uv_close((uv_handle_t *)&srv->keepalive, NULL);
    if (!uv_is_closing((uv_handle_t *)&srv->accept_timer))
        uv_close((uv_handle_t *)&srv->accept_timer, NULL);
}

void hub_server_free(struct hub_server *srv)
{
    if (srv->ctx)
        lws_context_destroy(srv->ctx);
    if (srv->policy)
        hub_policy_free(srv->policy);
    srv->policy = NULL;
    hub_registry_free(srv->registry);
    srv->registry = NULL;
    hub_http_free(srv->http);
    srv->http = NULL;
    if (srv->static_fd >= 0)
        close(srv->static_fd);
    srv->static_fd = -1;
    if (srv->broker)
        srv->broker->ops->free(srv->broker);
    srv->broker = NULL;
    free(srv->ids);
    srv->ids = NULL;
    hub_chan_registry_free(&srv->chans);
    hub_buf_free(&srv->scratch);
    if (srv->ping)
        hub_msg_unref(srv->ping);
    srv->ping = NULL;
}
