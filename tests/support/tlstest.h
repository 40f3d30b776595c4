/* tlstest: TLS for the integration suites, on top of hubtest.
 *
 * - Certificates made at run time with the `openssl` command (a CA, server
 *   certificates for 127.0.0.1 and localhost, an expired one, one not yet
 *   valid, a key of no certificate, an encrypted key, client certificates
 *   signed by the CA and by themselves).
 * - A blocking TLS client (OpenSSL) with a deadline on every wait: it
 *   connects, says why a handshake failed (OpenSSL's reason and the
 *   certificate check), shows the server's certificate and sends one HTTP
 *   request.
 * - A TLS proxy: a loopback port of the test's own where each plain TCP
 *   connection is carried over a new TLS connection to the hub, so every
 *   hubtest helper (ws_*, http_request) works over TLS unchanged.
 *
 * Every wait is bounded by HT_WAIT_MS, as in hubtest. Functions returning
 * pointers return new allocations the caller frees with the matching
 * *_free / *_close / *_stop. */
#ifndef TLSTEST_H
#define TLSTEST_H

#include <stddef.h>

#include "hubtest.h"

/* Paths of the files tls_certs_make() wrote (PEM). */
struct tls_certs {
    char dir[256];
    char ca[320], ca_key[320];                  /* the CA the server and clients trust */
    char server[320], server_key[320];          /* CN "localhost", for 127.0.0.1 and localhost */
    char rotated[320], rotated_key[320];        /* the same names, CN "rotated.localhost" */
    char expired[320], expired_key[320];        /* valid in 2020 only */
    char future[320], future_key[320];          /* valid from 2099 */
    char other_key[320];                        /* the key of no certificate here */
    char encrypted_key[320];                    /* server_key, encrypted with a passphrase */
    char client[320], client_key[320];          /* CN "client", signed by the CA */
    char selfsigned[320], selfsigned_key[320];  /* CN "client", signed by itself */
};

/* Makes every certificate above in a new temp dir with the openssl
 * command. Returns 0, or -1 with the reason (and openssl's output) in
 * err[0..n). Runs outside a test (from main, before the suite): it does
 * not use Check. */
int tls_certs_make(struct tls_certs *c, char *err, size_t n);
/* Removes the dir. */
void tls_certs_remove(struct tls_certs *c);

/* The content of a file (new string); fails the test if unreadable. */
char *tls_read_file(const char *path);
/* Replaces the content of `path` with that of `from` (rename of a temp
 * file: a reader sees the old or the new file, never half of one). */
void tls_copy_file(const char *from, const char *path);

struct tls_client_opts {
    const char *ca;             /* verify the server's certificate and 127.0.0.1; NULL: no check */
    const char *cert, *key;     /* a client certificate and its key; NULL: none */
    int rcvbuf;                 /* SO_RCVBUF set before connecting; 0: the default */
};

struct tls_conn;

/* Connects to 127.0.0.1:port and completes the TLS handshake. Returns the
 * connection, or NULL with why in err[0..n) (OpenSSL's reason; with `ca`,
 * the certificate check's verdict). Never fails the test itself. */
struct tls_conn *tls_connect(int port, const struct tls_client_opts *o, char *err, size_t n);
/* Sends close_notify (best effort), closes and frees. NULL is a no-op. */
void tls_close(struct tls_conn *c);
/* The common name of the server's certificate ("" if none). */
void tls_peer_cn(const struct tls_conn *c, char *out, size_t n);
/* Sends all of p[0..len). Returns 0, or -1 with why in err[0..n). */
int tls_send(struct tls_conn *c, const void *p, size_t len, char *err, size_t n);
/* Reads what comes, waiting up to `timeout_ms`. Returns the byte count
 * (> 0), 0 when the server closed (close_notify, EOF, a reset, an alert),
 * -1 on timeout. */
int tls_recv(struct tls_conn *c, void *buf, size_t cap, int timeout_ms);

/* Sends `req` (a whole HTTP/1.1 request with "Connection: close") and
 * reads the answer until the server closes. Returns the status and fills
 * `r` (free with http_resp_free), or -1 with why in err[0..n) (a TLS
 * alert, a reset, no answer). Never fails the test itself. */
int tls_http(struct tls_conn *c, const char *req, struct http_resp *r, char *err, size_t n);

/* The proxy: plain TCP on 127.0.0.1:p->port, each connection carried over
 * TLS to 127.0.0.1:hub_port with `o` (copied). A handshake that fails
 * closes the plain connection at once (the client sees EOF). */
struct tls_proxy {
    int port;
    /* private */
    struct tls_proxy_impl *impl;
};
struct tls_proxy *tls_proxy_start(int hub_port, const struct tls_client_opts *o);
/* Closes every connection and frees. */
void tls_proxy_stop(struct tls_proxy *p);

#ifndef HUBTEST_INTERNAL
#define tls_read_file(...) HT_AT(tls_read_file(__VA_ARGS__))
#define tls_copy_file(...) HT_AT(tls_copy_file(__VA_ARGS__))
#define tls_proxy_start(...) HT_AT(tls_proxy_start(__VA_ARGS__))
#endif

#endif
