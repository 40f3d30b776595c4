/* The HTTP/1.1 side of the port: every accepted socket starts here. The
 * module reads request heads and bodies itself, with deadlines, and hands
 * complete requests to the routes (http_api.c) and complete WebSocket
 * upgrade heads to the upgrade handler (server_ws.c), which passes the socket
 * on to libwebsockets. Why plain HTTP does not go through libwebsockets
 * (a pipelined request with a body makes lws 4.1.6 spin forever; a header
 * pool of 64 that slow clients can fill): docs/internals.md, "HTTP".
 *
 * Loop thread only. Sockets are watched through one epoll instance of the
 * module's own, which the libuv loop watches (one uv_poll_t): one epoll_ctl
 * per connection instead of libuv's three.
 *
 * Ownership: hub_http_accept() and hub_http_accept_peer() take the
 * socket; hub_http_take() gives it back to the caller. A connection is
 * freed by the module; a handler that answers later holds a reference
 * (hub_http_hold / hub_http_release). */
#ifndef LUAHUB_HTTP_H
#define LUAHUB_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <uv.h>

#include "luahub/request.h"
#include "luahub/util.h"

struct hub_http;
struct hub_http_conn;

struct hub_http_routes {
    /* A complete request (head and body, r->body set). The handler answers
     * with hub_http_respond*() before it returns, or calls hub_http_hold()
     * and answers later. `r` is valid during the call only. */
    void (*request)(void *ud, struct hub_http_conn *c, const struct hub_request *r);
    /* A complete request with "Upgrade: websocket" (and no body). The
     * handler answers (a refusal) or takes the socket with hub_http_take()
     * before it returns, or holds `c` (hub_http_hold) and does either
     * later: `r` then stays valid until the answer or the take (nothing
     * more is read from a connection whose request is being handled). */
    void (*upgrade)(void *ud, struct hub_http_conn *c, const struct hub_request *r);
};

struct hub_http_options {
    uint64_t max_body;              /* bytes: larger bodies get 413 */
    uint32_t request_timeout_ms;    /* a request head (and body, see docs) must arrive within it */
    uint32_t idle_timeout_ms;       /* a keep-alive connection may wait this long for its next request */
    const struct hub_ip *trusted;   /* proxies whose X-Forwarded-For is believed (borrowed) */
    size_t ntrusted;
};

/* Creates the HTTP side on `loop`. `routes` and `ud` are borrowed and must
 * outlive it. Returns NULL (after logging why) if epoll is unavailable. */
struct hub_http *hub_http_new(uv_loop_t *loop, const struct hub_http_options *o,
                              const struct hub_http_routes *routes, void *ud);

/* A new connection: takes ownership of the non-blocking socket `fd`,
 * whose client address `peer` (borrowed) is for r->peer, the API's loopback
 * check and the logs (what accept4 gave, or for the plaintext end of a TLS
 * connection, tls.c, whose socket is not the client's own, the TLS
 * client's); `secure`: it came over TLS (r->secure). Reads the request at
 * once if it is there, so a route may run before this returns. */
void hub_http_accept_peer(struct hub_http *hs, int fd, const struct sockaddr *peer,
                          socklen_t len, int secure);
/* Same, with the address from getpeername() (not secure). */
void hub_http_accept(struct hub_http *hs, int fd);

/* Shutdown has begun: idle keep-alive connections are closed now, and every
 * later response closes its connection. */
void hub_http_shutdown(struct hub_http *hs);

/* Closes every connection and the module's handles (asynchronously: the
 * loop drains them). Responses held by handlers become no-ops. */
void hub_http_stop(struct hub_http *hs);

/* Frees it after hub_http_stop(), once the loop has drained. */
void hub_http_free(struct hub_http *hs);

/* Appends the HTTP metrics (requests, open connections, timeouts). `hs`
 * may be NULL (zeros). */
void hub_http_metrics(const struct hub_http *hs, struct hub_buf *b);

#define HUB_HTTP_CLOSE 0x1  /* close the connection after this response */

/* Answers the current request of `c`: status line, Content-Type `ctype`
 * (NULL: none), `extra` header lines (each ending "\r\n"; NULL: none),
 * Content-Length and `body` (copied; omitted for HEAD). No-op if the
 * connection has closed meanwhile. */
void hub_http_respond(struct hub_http_conn *c, unsigned status, const char *ctype,
                      const char *extra, const char *body, size_t len, unsigned flags);

/* Same with the body read from the open regular file `file_fd` (taken:
 * closed by the module), `size` bytes from offset 0, sent with sendfile(). */
void hub_http_respond_file(struct hub_http_conn *c, unsigned status, const char *ctype,
                           const char *extra, int file_fd, uint64_t size, unsigned flags);

/* Writes `bytes` (copied) as they are, then closes the connection: for an
 * answer that is not a plain HTTP response (a WebSocket handshake that
 * ends in a close frame at once). */
void hub_http_respond_raw(struct hub_http_conn *c, const void *bytes, size_t len);

/* {"ok":false,"error":{"code":CODE,"message":MESSAGE}} with status. */
void hub_http_respond_error(struct hub_http_conn *c, unsigned status, const char *code,
                            const char *message, unsigned flags);

/* The handler will answer later: takes a reference to `c`, which stays
 * valid (but may be closed) until hub_http_release(). */
void hub_http_hold(struct hub_http_conn *c);
void hub_http_release(struct hub_http_conn *c);

/* 1 when the connection is gone (peer, deadline or shutdown). */
int hub_http_closed(const struct hub_http_conn *c);

/* Takes the socket of an upgrade request away from the HTTP side: returns
 * the fd (the caller owns it now) and appends to `rest` the bytes the peer
 * sent after the request head. The connection is then finished. */
int hub_http_take(struct hub_http_conn *c, struct hub_buf *rest);

#endif
