/* TLS termination in front of the HTTP side (docs/internals.md, "TLS").
 *
 * The hub reads HTTP itself (http.c) and writes WebSocket frames with
 * sendmsg() on the socket (writer.c), so TLS cannot live in lws or in
 * either of them: it is terminated here, before http.c. For each socket
 * accepted on a TLS listener the module runs the handshake (OpenSSL,
 * non-blocking, on the loop), then pumps bytes between the TCP socket
 * (encrypted) and one end of a socketpair (plaintext); the other end goes
 * to the HTTP side as if it were the accepted socket, with the client's
 * address. Everything after that works unchanged on the plaintext end.
 *
 * Loop thread only. Sockets are watched through one epoll instance of the
 * module's own (edge-triggered: no epoll_ctl after a socket is added),
 * which the libuv loop watches with one uv_poll_t, as http.c does.
 *
 * Ownership: hub_tls_accept() takes the TCP socket; the plaintext end
 * passes to the `plain` callback, which owns it from then on. The module
 * owns its SSL_CTX; a reload swaps it for new connections, and each
 * connection keeps a reference to the one it was accepted with. */
#ifndef LUAHUB_TLS_H
#define LUAHUB_TLS_H

#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "luahub/config.h"
#include "luahub/util.h"

struct hub_tls;

/* Takes the plaintext end `fd` of an established TLS connection (the
 * callee owns it); `peer` is the client's address (borrowed for the call). */
typedef void (*hub_tls_plain_fn)(void *ud, int fd, const struct sockaddr *peer,
                                 socklen_t peer_len);

/* `ns` of work spent encrypting and sending what the HTTP side wrote
 * (once per event batch): the writer's pacing counts it (hub_writer_charge). */
typedef void (*hub_tls_cost_fn)(void *ud, uint64_t ns);

/* Loads cfg->tls_cert, tls_key and tls_client_ca as a reload would, and
 * frees the result: for --check and start-up. Returns 0, or -1 with the
 * problem in `why` (the key, the file and the reason, e.g. OpenSSL's). */
int hub_tls_check(const struct hub_config *cfg, struct hub_buf *why);

/* Creates the module on `loop` with the files of `cfg` (which must have
 * tls_cert and tls_key). `cfg` is borrowed and must outlive it; `ud` is
 * passed to `plain` and `cost` (which may be NULL). A handshake must
 * complete within cfg->request_timeout. Returns NULL with the problem in
 * `why`. */
struct hub_tls *hub_tls_new(uv_loop_t *loop, const struct hub_config *cfg,
                            hub_tls_plain_fn plain, hub_tls_cost_fn cost, void *ud,
                            struct hub_buf *why);

/* A new connection: takes the accepted, non-blocking TCP socket `fd`. */
void hub_tls_accept(struct hub_tls *t, int fd);

/* Loads the files again (the paths of the conf the module was made with)
 * into a new context aside and checks it (the key matches the certificate,
 * which is valid now; the client CA file has a certificate). On success
 * new connections get it, established ones keep theirs. Returns 0, or -1
 * with the reason in `why`: the old context stays. */
int hub_tls_reload(struct hub_tls *t, struct hub_buf *why);

/* Closes every connection and the module's handles (asynchronously: the
 * loop drains them). */
void hub_tls_stop(struct hub_tls *t);

/* Frees it after hub_tls_stop(), once the loop has drained. NULL is fine. */
void hub_tls_free(struct hub_tls *t);

/* Appends the TLS metrics (connections, handshakes, failures by reason,
 * reloads, the certificate's expiry). */
void hub_tls_metrics(const struct hub_tls *t, struct hub_buf *b);

#endif
