/* The hub's own listener (include/luahub/listener.h). */
#include "luahub/listener.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "luahub/log.h"

/* Why our own listener (docs/internals.md, "Listener"):
 *  - workers: lws 4.1.6 sets SO_REUSEPORT only with several service threads
 *    and Debian builds it with one, so a second worker could not bind; ours
 *    sets it and the kernel spreads connections over the workers;
 *  - cost: lws's own listener costs ~6 system calls per connection more. */
#define ACCEPT_BATCH 64
#define ACCEPT_PAUSE_MS 100
#define ACCEPT_WARN_EVERY_MS 10000

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

/* The socket address of `host` and `port`. Returns 0, or -1 when the host
 * is neither an IP address nor a network interface ("localhost" counts as
 * 127.0.0.1; "0.0.0.0" and "::" are the wildcards). */
static int listen_addr(const char *host, int port, struct sockaddr_storage *ss, socklen_t *sl)
{
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

/* Binds a socket (SO_REUSEADDR, plus SO_REUSEPORT when the port is shared
 * by workers). Returns the fd, or -errno. */
static int try_bind(const char *host, int port, int reuseport)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    int one = 1;

    if (listen_addr(host, port, &ss, &sl) < 0)
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

static void explain_bind_failure(const char *text, const char *key, int err)
{
    hub_log(HUB_LOG_ERROR, "cannot listen on %s: %s%s%s%s", text, strerror(err),
            err == EADDRINUSE ? " (another process has the port: stop it, or "
                                "choose another with " : "",
            err == EADDRINUSE ? key : "",
            err == EADDRINUSE ? ")"
            : err == EADDRNOTAVAIL ? " (not an address or network interface of this machine)"
                                   : "");
}

static int bound_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    return ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
                                         : ((struct sockaddr_in6 *)&ss)->sin6_port);
}

static void on_accept(uv_poll_t *p, int status, int events);

static void on_retry(uv_timer_t *t)
{
    struct hub_listener *l = t->data;
    if (l->fd >= 0 && !l->paused && !uv_is_closing((uv_handle_t *)&l->poll))
        uv_poll_start(&l->poll, UV_READABLE, on_accept);
}

/* Out of descriptors or memory: the pending connection stays in the
 * backlog and the listener would be readable again at once, a busy loop.
 * Stop watching it for ACCEPT_PAUSE_MS, and say so at most every
 * ACCEPT_WARN_EVERY_MS. */
static void accept_pause(struct hub_listener *l, const char *why)
{
    uint64_t now = uv_now(l->loop);
    l->pauses++;
    if (!l->warned_ms || now - l->warned_ms >= ACCEPT_WARN_EVERY_MS) {
        hub_log(HUB_LOG_WARN,
                "cannot accept connections (%s): pausing accepts for %d ms "
                "(%llu pauses so far; raise the open-files limit, ulimit -n)",
                why, ACCEPT_PAUSE_MS, (unsigned long long)l->pauses);
        l->warned_ms = now;
    }
    uv_poll_stop(&l->poll);
    uv_timer_start(&l->retry, on_retry, ACCEPT_PAUSE_MS, 0);
}

static void on_accept(uv_poll_t *p, int status, int events)
{
    struct hub_listener *l = p->data;

    if (status < 0 || !(events & UV_READABLE))
        return;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                accept_pause(l, strerror(errno));
            else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                     errno != ECONNABORTED)
                hub_log(HUB_LOG_WARN, "accept: %s", strerror(errno));
            return;
        }
        l->accept(l->ud, fd, (struct sockaddr *)&ss, sl);
    }
}

int hub_listener_open(struct hub_listener *l, uv_loop_t *loop, const struct hub_config *cfg,
                      const struct hub_listen_addr *at, hub_listener_accept_fn accept, void *ud)
{
    memset(l, 0, sizeof(*l));
    l->loop = loop;
    l->cfg = cfg;
    l->accept = accept;
    l->ud = ud;
    l->fd = -1;
    uv_timer_init(loop, &l->retry);
    l->retry.data = l;
    int fd = try_bind(at->host, at->port, cfg->workers != 1);
    if (fd < 0 || listen(fd, 1024) < 0) {
        int e = fd < 0 ? -fd : errno;
        if (fd >= 0)
            close(fd);
        explain_bind_failure(at->text, at->key, e);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    /* Frames go out as the writer hands them over: no Nagle delay. Linux
     * copies TCP_NODELAY to every socket accept4 returns (checked with
     * getsockopt on an accepted socket), so one call here spares one per
     * connection (docs/internals.md, "Connection cost"). */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    l->fd = fd;
    l->port = bound_port(fd);
    uv_poll_init(loop, &l->poll, fd);
    l->poll.data = l;
    uv_poll_start(&l->poll, UV_READABLE, on_accept);
    return 0;
}

void hub_listener_pause(struct hub_listener *l)
{
    l->paused = 1;
    if (l->loop && l->fd >= 0 && !uv_is_closing((uv_handle_t *)&l->poll)) {
        uv_poll_stop(&l->poll);
        uv_timer_stop(&l->retry);
    }
}

void hub_listener_resume(struct hub_listener *l)
{
    l->paused = 0;
    if (l->loop && l->fd >= 0 && !uv_is_closing((uv_handle_t *)&l->poll))
        uv_poll_start(&l->poll, UV_READABLE, on_accept);
}

static void on_closed(uv_handle_t *h)
{
    struct hub_listener *l = h->data;
    close(l->fd);
    l->fd = -1;
}

void hub_listener_close(struct hub_listener *l)
{
    if (!l->loop)
        return; /* never opened */
    if (l->fd >= 0 && !uv_is_closing((uv_handle_t *)&l->poll))
        uv_close((uv_handle_t *)&l->poll, on_closed);
    if (!uv_is_closing((uv_handle_t *)&l->retry))
        uv_close((uv_handle_t *)&l->retry, NULL);
}

int hub_listener_reserve_port(struct hub_config *cfg)
{
    int fd = try_bind(cfg->listen_host, cfg->listen_port, 1);
    if (fd < 0) {
        explain_bind_failure(cfg->listen, "listen or --listen", -fd);
        return -1;
    }
    if (cfg->listen_port == 0)
        cfg->listen_port = bound_port(fd);
    return fd;
}
