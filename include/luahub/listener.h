/* The listening socket: the hub listens itself (accept4 until EAGAIN,
 * SO_REUSEPORT for workers) and hands each accepted socket on; see
 * docs/internals.md, "Listener", for why not lws's listener. Loop thread
 * only.
 *
 * Ownership: the listener owns the listen socket and its handles; each
 * accepted socket passes to the accept callback, which owns it from then
 * on. The accept callback may pause or resume the listener, not close it. */
#ifndef LUAHUB_LISTENER_H
#define LUAHUB_LISTENER_H

#include <stdint.h>
#include <uv.h>

#include "luahub/config.h"

/* Takes an accepted, non-blocking socket (the callee owns it) and its
 * peer's address (borrowed for the call). */
typedef void (*hub_listener_accept_fn)(void *ud, int fd, const struct sockaddr *peer,
                                       socklen_t len);

struct hub_listener {
    uv_loop_t *loop;
    const struct hub_config *cfg;   /* borrowed */
    hub_listener_accept_fn accept;
    void *ud;
    int fd;                         /* -1: none */
    int port;                       /* bound port */
    int paused;                     /* not accepting (by hub_listener_pause) */
    uv_poll_t poll;
    uv_timer_t retry;               /* resumes accepting after running out of fds */
    uint64_t warned_ms;             /* loop time of the last such warning */
    uint64_t pauses;                /* times accepting paused: out of fds or memory */
};

/* An address to listen on: the conf's `listen` or `listen_plain`. The
 * strings are borrowed for the call. */
struct hub_listen_addr {
    const char *text;               /* as the conf writes it, for messages */
    const char *host;               /* IP address, "localhost" or an interface name */
    int port;                       /* 0: any free port */
    const char *key;                /* the conf key (or option) that sets it, for messages */
};

/* Binds and listens on `at` (SO_REUSEPORT when workers > 1) and starts
 * accepting. Returns 0, or -1 after logging one line that says what failed
 * and what to do. Either way call hub_listener_close later. */
int hub_listener_open(struct hub_listener *l, uv_loop_t *loop, const struct hub_config *cfg,
                      const struct hub_listen_addr *at, hub_listener_accept_fn accept,
                      void *ud);

/* Stops / resumes accepting (connections wait in the kernel's backlog). */
void hub_listener_pause(struct hub_listener *l);
void hub_listener_resume(struct hub_listener *l);

/* Closes the socket and the handles (the loop drains them). */
void hub_listener_close(struct hub_listener *l);

/* For workers sharing a port: binds (without listening) a SO_REUSEPORT
 * socket on the conf's address, so that every worker binds the same port;
 * with port 0 it picks the port and writes it into `cfg`. Returns the fd to
 * keep open while workers start, or -1 after logging why. */
int hub_listener_reserve_port(struct hub_config *cfg);

#endif
