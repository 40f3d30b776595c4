/* tlstest (see tlstest.h): certificates made with the openssl command, a
 * TLS client with deadlines, and a TLS proxy for the hubtest helpers. */
#include "hubtest_int.h"    /* first: no location macros, internal calls keep the caller's */
#include "tlstest.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

extern char **environ;

/* ------------------------------------------------------------------ */
/* Certificates                                                         */
/* ------------------------------------------------------------------ */

/* The openssl command's conf: our own, so the system's cannot change
 * what is made. `@` stands for the directory. */
static const char openssl_cnf[] =
    "[ req ]\n"
    "distinguished_name = dn\n"
    "prompt = no\n"
    "[ dn ]\n"
    "CN = unused\n"
    "[ v3_ca ]\n"
    "basicConstraints = critical,CA:TRUE\n"
    "keyUsage = critical,keyCertSign,cRLSign\n"
    "subjectKeyIdentifier = hash\n"
    "[ server ]\n"
    "basicConstraints = CA:FALSE\n"
    "keyUsage = critical,digitalSignature\n"
    "extendedKeyUsage = serverAuth\n"
    "subjectAltName = IP:127.0.0.1,DNS:localhost\n"
    "[ client ]\n"
    "basicConstraints = CA:FALSE\n"
    "keyUsage = critical,digitalSignature\n"
    "extendedKeyUsage = clientAuth\n"
    "[ ca ]\n"
    "default_ca = test_ca\n"
    "[ test_ca ]\n"
    "database = @/index.txt\n"
    "new_certs_dir = @\n"
    "serial = @/serial\n"
    "default_md = sha256\n"
    "policy = any\n"
    "unique_subject = no\n"
    "copy_extensions = none\n"
    "[ any ]\n"
    "commonName = supplied\n";

static int write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    int ok = fputs(text, f) >= 0;
    return fclose(f) == 0 && ok ? 0 : -1;
}

/* Runs `openssl` with `args` (NULL-terminated), output to dir/openssl.log.
 * Returns 0, or -1 with the command and its output in err. */
static int openssl_run(const struct tls_certs *c, const char *const *args, char *err, size_t n)
{
    const char *argv[40] = {"openssl"};
    size_t i = 1;
    for (; args[i - 1] && i < 39; i++)
        argv[i] = args[i - 1];
    argv[i] = NULL;

    char log[400];
    snprintf(log, sizeof log, "%s/openssl.log", c->dir);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    pid_t pid;
    int rc = posix_spawnp(&pid, "openssl", &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        snprintf(err, n, "cannot run openssl: %s (install the openssl package: "
                 "scripts/install-deps.sh)", strerror(rc));
        return -1;
    }
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        return 0;
    size_t k = (size_t)snprintf(err, n, "openssl");
    for (size_t j = 1; argv[j] && k < n; j++)
        k += (size_t)snprintf(err + k, n - k, " %s", argv[j]);
    FILE *f = fopen(log, "r");
    if (f && k < n) {
        k += (size_t)snprintf(err + k, n - k, " failed:\n");
        if (k < n)
            k += fread(err + k, 1, n - k - 1, f);
        err[k < n ? k : n - 1] = '\0';
    }
    if (f)
        fclose(f);
    return -1;
}

#define EC_KEY_ARGS "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"

/* A key and a certificate signed by the CA, for `ext` (server, client),
 * valid from `start` to `end` (openssl ca dates, NULL: now, for 10 years). */
static int signed_cert(const struct tls_certs *c, const char *cnf, const char *cn,
                       const char *ext, const char *start, const char *end, const char *pem,
                       const char *key, char *err, size_t n)
{
    char csr[400], subj[128];
    snprintf(csr, sizeof csr, "%s.csr", pem);
    snprintf(subj, sizeof subj, "/CN=%s", cn);
    const char *req[] = {"req", "-config", cnf, "-new", EC_KEY_ARGS, "-keyout", key,
                         "-out", csr, "-subj", subj, NULL};
    if (openssl_run(c, req, err, n) < 0)
        return -1;
    const char *dated[] = {"ca", "-config", cnf, "-batch", "-notext", "-in", csr, "-out", pem,
                           "-cert", c->ca, "-keyfile", c->ca_key, "-extensions", ext,
                           "-startdate", start, "-enddate", end, NULL};
    const char *now[] = {"ca", "-config", cnf, "-batch", "-notext", "-in", csr, "-out", pem,
                         "-cert", c->ca, "-keyfile", c->ca_key, "-extensions", ext,
                         "-days", "3650", NULL};
    int rc = openssl_run(c, start ? dated : now, err, n);
    unlink(csr);
    return rc;
}

int tls_certs_make(struct tls_certs *c, char *err, size_t n)
{
    const char *tmp = getenv("TMPDIR");
    char cnf[400], path[400];

    memset(c, 0, sizeof *c);
    snprintf(c->dir, sizeof c->dir, "%s/tlstest.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(c->dir)) {
        snprintf(err, n, "mkdtemp %s: %s", c->dir, strerror(errno));
        return -1;
    }
#define FILE_IN(field, name) snprintf(c->field, sizeof c->field, "%s/" name, c->dir)
    FILE_IN(ca, "ca.pem");
    FILE_IN(ca_key, "ca.key");
    FILE_IN(server, "server.pem");
    FILE_IN(server_key, "server.key");
    FILE_IN(rotated, "rotated.pem");
    FILE_IN(rotated_key, "rotated.key");
    FILE_IN(expired, "expired.pem");
    FILE_IN(expired_key, "expired.key");
    FILE_IN(future, "future.pem");
    FILE_IN(future_key, "future.key");
    FILE_IN(other_key, "other.key");
    FILE_IN(encrypted_key, "encrypted.key");
    FILE_IN(client, "client.pem");
    FILE_IN(client_key, "client.key");
    FILE_IN(selfsigned, "selfsigned.pem");
    FILE_IN(selfsigned_key, "selfsigned.key");
#undef FILE_IN

    /* the conf, with the directory for '@' */
    char text[sizeof openssl_cnf + 16 * 256];
    size_t k = 0;
    for (const char *s = openssl_cnf; *s && k + 260 < sizeof text; s++) {
        if (*s == '@')
            k += (size_t)snprintf(text + k, sizeof text - k, "%s", c->dir);
        else
            text[k++] = *s;
    }
    text[k] = '\0';
    snprintf(cnf, sizeof cnf, "%s/openssl.cnf", c->dir);
    if (write_text(cnf, text) < 0)
        goto io;
    snprintf(path, sizeof path, "%s/index.txt", c->dir);
    if (write_text(path, "") < 0)
        goto io;
    snprintf(path, sizeof path, "%s/serial", c->dir);
    if (write_text(path, "1000\n") < 0)
        goto io;

    const char *ca[] = {"req", "-config", cnf, "-x509", EC_KEY_ARGS, "-keyout", c->ca_key,
                        "-out", c->ca, "-days", "3650", "-subj", "/CN=luahub test CA",
                        "-extensions", "v3_ca", NULL};
    const char *other[] = {"genpkey", "-algorithm", "EC", "-pkeyopt",
                           "ec_paramgen_curve:prime256v1", "-out", c->other_key, NULL};
    const char *self[] = {"req", "-config", cnf, "-x509", EC_KEY_ARGS, "-keyout",
                          c->selfsigned_key, "-out", c->selfsigned, "-days", "3650", "-subj",
                          "/CN=client", "-extensions", "client", NULL};
    const char *encrypt[] = {"pkey", "-in", c->server_key, "-aes128", "-passout", "pass:secret",
                             "-out", c->encrypted_key, NULL};
    if (openssl_run(c, ca, err, n) < 0 ||
        signed_cert(c, cnf, "localhost", "server", NULL, NULL, c->server, c->server_key, err,
                    n) < 0 ||
        signed_cert(c, cnf, "rotated.localhost", "server", NULL, NULL, c->rotated,
                    c->rotated_key, err, n) < 0 ||
        signed_cert(c, cnf, "localhost", "server", "20200101000000Z", "20200102000000Z",
                    c->expired, c->expired_key, err, n) < 0 ||
        signed_cert(c, cnf, "localhost", "server", "20990101000000Z", "20991231000000Z",
                    c->future, c->future_key, err, n) < 0 ||
        signed_cert(c, cnf, "client", "client", NULL, NULL, c->client, c->client_key, err,
                    n) < 0 ||
        openssl_run(c, other, err, n) < 0 || openssl_run(c, self, err, n) < 0 ||
        openssl_run(c, encrypt, err, n) < 0)
        return -1;
    return 0;
io:
    snprintf(err, n, "cannot write in %s: %s", c->dir, strerror(errno));
    return -1;
}

void tls_certs_remove(struct tls_certs *c)
{
    if (!c->dir[0])
        return;
    const char *argv[] = {"/bin/rm", "-rf", c->dir, NULL};
    pid_t pid;
    if (posix_spawn(&pid, argv[0], NULL, NULL, (char *const *)argv, environ) == 0)
        waitpid(pid, NULL, 0);
    c->dir[0] = '\0';
}

char *tls_read_file(const char *path)
{
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "cannot read %s: %s", path, strerror(errno));
    char *s = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap)
            s = xrealloc(s, cap = cap * 2 + 4096 + 1);
        size_t got = fread(s + len, 1, 4096, f);
        len += got;
        if (got < 4096)
            break;
    }
    fclose(f);
    s[len] = '\0';
    return s;
}

void tls_copy_file(const char *from, const char *path)
{
    char *text = tls_read_file(from);
    char *tmp = xasprintf("%s.new", path);
    CHECK(write_text(tmp, text) == 0, "cannot write %s: %s", tmp, strerror(errno));
    CHECK(rename(tmp, path) == 0, "rename %s: %s", tmp, strerror(errno));
    free(tmp);
    free(text);
}

/* ------------------------------------------------------------------ */
/* The client                                                           */
/* ------------------------------------------------------------------ */

struct tls_conn {
    int fd;
    SSL_CTX *ctx;
    SSL *ssl;
};

/* Waits for `fd` to be readable (want_write 0) or writable before
 * `deadline`. Returns 1 when it is, 0 on timeout. */
static int wait_io(int fd, int want_write, int64_t deadline)
{
    struct pollfd p = {.fd = fd, .events = want_write ? POLLOUT : POLLIN};
    for (;;) {
        int left = ht_remaining(deadline);
        int r = poll(&p, 1, left);
        if (r > 0)
            return 1;
        if (r == 0)
            return 0;
        if (errno != EINTR)
            return 1; /* let the caller's next call see the error */
    }
}

/* OpenSSL's reason for the last error (and what the socket said). */
static void ssl_reason(const struct tls_conn *c, int r, const char *what, char *err, size_t n)
{
    unsigned long e = ERR_peek_last_error();
    char reason[256] = "";
    if (e)
        ERR_error_string_n(e, reason, sizeof reason);
    else if (SSL_get_error(c->ssl, r) == SSL_ERROR_SYSCALL)
        snprintf(reason, sizeof reason, "%s", errno ? strerror(errno) : "the server closed");
    else if (SSL_get_error(c->ssl, r) == SSL_ERROR_ZERO_RETURN)
        snprintf(reason, sizeof reason, "the server closed (close_notify)");
    long v = SSL_get_verify_result(c->ssl);
    if (v != X509_V_OK)
        snprintf(err, n, "%s: %s (certificate check: %s)", what, reason,
                 X509_verify_cert_error_string(v));
    else
        snprintf(err, n, "%s: %s", what, reason[0] ? reason : "unknown error");
    ERR_clear_error();
}

/* Runs an SSL call until it is done or fails, waiting as it asks.
 * Returns its result (> 0 done); <= 0 failed, or -2 on timeout. */
#define SSL_LOOP(c, call, deadline, result)                                     \
    do {                                                                        \
        for (;;) {                                                              \
            ERR_clear_error();                                                  \
            errno = 0;                                                          \
            (result) = (call);                                                  \
            if ((result) > 0)                                                   \
                break;                                                          \
            int e_ = SSL_get_error((c)->ssl, (result));                         \
            if (e_ != SSL_ERROR_WANT_READ && e_ != SSL_ERROR_WANT_WRITE)        \
                break;                                                          \
            if (!wait_io((c)->fd, e_ == SSL_ERROR_WANT_WRITE, (deadline))) {   \
                (result) = -2;                                                  \
                break;                                                          \
            }                                                                   \
        }                                                                       \
    } while (0)

struct tls_conn *tls_connect(int port, const struct tls_client_opts *o, char *err, size_t n)
{
    static const struct tls_client_opts none = {0};
    int64_t deadline = ht_now_ms() + HT_WAIT_MS;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    struct tls_conn *c = xmalloc(sizeof *c);
    int r;

    if (!o)
        o = &none;
    memset(c, 0, sizeof *c);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd >= 0 && o->rcvbuf)
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &o->rcvbuf, sizeof o->rcvbuf);
    if (c->fd < 0 || (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 &&
                      errno != EINPROGRESS)) {
        snprintf(err, n, "connect to port %d: %s", port, strerror(errno));
        goto fail;
    }
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (!wait_io(c->fd, 1, deadline) ||
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0 || soerr) {
        snprintf(err, n, "connect to port %d: %s", port, soerr ? strerror(soerr) : "timeout");
        goto fail;
    }
    c->ctx = SSL_CTX_new(TLS_client_method());
    if (o->ca) {
        if (SSL_CTX_load_verify_locations(c->ctx, o->ca, NULL) != 1) {
            snprintf(err, n, "cannot load the CA %s", o->ca);
            goto fail;
        }
        SSL_CTX_set_verify(c->ctx, SSL_VERIFY_PEER, NULL);
        X509_VERIFY_PARAM_set1_ip_asc(SSL_CTX_get0_param(c->ctx), "127.0.0.1");
    }
    if (o->cert && (SSL_CTX_use_certificate_file(c->ctx, o->cert, SSL_FILETYPE_PEM) != 1 ||
                    SSL_CTX_use_PrivateKey_file(c->ctx, o->key, SSL_FILETYPE_PEM) != 1)) {
        snprintf(err, n, "cannot load the client certificate %s", o->cert);
        goto fail;
    }
    c->ssl = SSL_new(c->ctx);
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_tlsext_host_name(c->ssl, "localhost");
    SSL_LOOP(c, SSL_connect(c->ssl), deadline, r);
    if (r == -2) {
        snprintf(err, n, "TLS handshake: no answer within %d ms", HT_WAIT_MS);
        goto fail;
    }
    if (r != 1) {
        ssl_reason(c, r, "TLS handshake", err, n);
        goto fail;
    }
    return c;
fail:
    ERR_clear_error();
    SSL_free(c->ssl);
    SSL_CTX_free(c->ctx);
    if (c->fd >= 0)
        close(c->fd);
    free(c);
    return NULL;
}

void tls_close(struct tls_conn *c)
{
    if (!c)
        return;
    SSL_shutdown(c->ssl); /* close_notify, without waiting for the server's */
    ERR_clear_error();
    SSL_free(c->ssl);
    SSL_CTX_free(c->ctx);
    close(c->fd);
    free(c);
}

void tls_peer_cn(const struct tls_conn *c, char *out, size_t n)
{
    out[0] = '\0';
    X509 *x = SSL_get1_peer_certificate(c->ssl);
    if (!x)
        return;
    X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, out, (int)n);
    X509_free(x);
}

/* Sends all of p[0..len). Returns 0, or -1 with why in err. */
static int ssl_send_all(struct tls_conn *c, const void *p, size_t len, int64_t deadline,
                        char *err, size_t n)
{
    const char *s = p;
    while (len) {
        int r;
        SSL_LOOP(c, SSL_write(c->ssl, s, (int)len), deadline, r);
        if (r <= 0) {
            if (r == -2)
                snprintf(err, n, "TLS write: timeout");
            else
                ssl_reason(c, r, "TLS write", err, n);
            return -1;
        }
        s += r;
        len -= (size_t)r;
    }
    return 0;
}

int tls_send(struct tls_conn *c, const void *p, size_t len, char *err, size_t n)
{
    return ssl_send_all(c, p, len, ht_now_ms() + HT_WAIT_MS, err, n);
}

int tls_recv(struct tls_conn *c, void *buf, size_t cap, int timeout_ms)
{
    int r;
    SSL_LOOP(c, SSL_read(c->ssl, buf, (int)cap), ht_now_ms() + timeout_ms, r);
    ERR_clear_error();
    return r > 0 ? r : r == -2 ? -1 : 0;
}

int tls_http(struct tls_conn *c, const char *req, struct http_resp *resp, char *err, size_t n)
{
    int64_t deadline = ht_now_ms() + HT_WAIT_MS;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int r;

    memset(resp, 0, sizeof *resp);
    if (ssl_send_all(c, req, strlen(req), deadline, err, n) < 0)
        return -1;
    for (;;) {
        if (len + 4096 + 1 > cap)
            buf = xrealloc(buf, cap = cap * 2 + 4096 + 1);
        SSL_LOOP(c, SSL_read(c->ssl, buf + len, 4096), deadline, r);
        if (r > 0) {
            len += (size_t)r;
            continue;
        }
        if (r == -2) {
            snprintf(err, n, "TLS read: no answer within %d ms", HT_WAIT_MS);
            free(buf);
            return -1;
        }
        if (SSL_get_error(c->ssl, r) == SSL_ERROR_ZERO_RETURN || (len && !ERR_peek_error()))
            break; /* the server closed after its answer */
        ssl_reason(c, r, "TLS read", err, n);
        free(buf);
        return -1;
    }
    buf[len] = '\0';
    char *end = strstr(buf, "\r\n\r\n");
    if (strncmp(buf, "HTTP/1.", 7) != 0 || !end || len < 12) {
        snprintf(err, n, "not an HTTP response: %.*s", (int)(len > 80 ? 80 : len), buf);
        free(buf);
        return -1;
    }
    resp->status = atoi(buf + 9);
    resp->head = xstrndup(buf, (size_t)(end - buf));
    resp->body_len = len - (size_t)(end + 4 - buf);
    resp->body = xstrndup(end + 4, resp->body_len);
    free(buf);
    return resp->status;
}

/* ------------------------------------------------------------------ */
/* The proxy                                                            */
/* ------------------------------------------------------------------ */

#define PROXY_MAX 64

struct pconn {
    int plain;
    struct tls_conn *tls;
};

struct tls_proxy_impl {
    int lfd, stop[2], hub_port;
    pthread_t thread;
    char *ca, *cert, *key;
    struct pconn conns[PROXY_MAX];
    int n;
};

static char *dup_or_null(const char *s)
{
    return s ? xstrndup(s, strlen(s)) : NULL;
}

static void pconn_drop(struct tls_proxy_impl *p, int i)
{
    close(p->conns[i].plain);
    tls_close(p->conns[i].tls);
    p->conns[i] = p->conns[--p->n];
}

/* Plain bytes to the TLS side, or back; -1 when the connection is over. */
static int pconn_up(struct pconn *pc)
{
    char buf[16384], err[256];
    ssize_t r = recv(pc->plain, buf, sizeof buf, MSG_DONTWAIT);
    if (r < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    if (r <= 0)
        return -1;
    return ssl_send_all(pc->tls, buf, (size_t)r, ht_now_ms() + HT_WAIT_MS, err, sizeof err);
}

static int pconn_down(struct pconn *pc)
{
    char buf[16384];
    ERR_clear_error();
    int r = SSL_read(pc->tls->ssl, buf, sizeof buf);
    if (r <= 0) {
        int e = SSL_get_error(pc->tls->ssl, r);
        ERR_clear_error();
        return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE ? 0 : -1;
    }
    return ht_send_all(pc->plain, buf, (size_t)r, ht_now_ms() + HT_WAIT_MS) < 0 ? -1 : 0;
}

static void *proxy_main(void *arg)
{
    struct tls_proxy_impl *p = arg;
    const struct tls_client_opts o = {.ca = p->ca, .cert = p->cert, .key = p->key};
    struct pollfd pf[2 + 2 * PROXY_MAX];

    for (;;) {
        int pending = 0;
        pf[0] = (struct pollfd){.fd = p->stop[0], .events = POLLIN};
        pf[1] = (struct pollfd){.fd = p->lfd, .events = p->n < PROXY_MAX ? POLLIN : 0};
        for (int i = 0; i < p->n; i++) {
            pf[2 + 2 * i] = (struct pollfd){.fd = p->conns[i].plain, .events = POLLIN};
            pf[3 + 2 * i] = (struct pollfd){.fd = p->conns[i].tls->fd, .events = POLLIN};
            pending |= SSL_pending(p->conns[i].tls->ssl) > 0;
        }
        if (poll(pf, (nfds_t)(2 + 2 * p->n), pending ? 0 : 200) < 0 && errno != EINTR)
            break;
        if (pf[0].revents)
            break;
        /* back to front: a drop moves the last connection into slot i */
        for (int i = p->n - 1; i >= 0; i--) {
            struct pconn *pc = &p->conns[i];
            int down = (pf[3 + 2 * i].revents || SSL_pending(pc->tls->ssl) > 0)
                           ? pconn_down(pc) : 0;
            int up = down < 0 ? -1 : pf[2 + 2 * i].revents ? pconn_up(pc) : 0;
            if (down < 0 || up < 0)
                pconn_drop(p, i);
        }
        if (pf[1].revents & POLLIN) {
            int fd = accept4(p->lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
            if (fd >= 0) {
                char err[512];
                struct tls_conn *t = tls_connect(p->hub_port, &o, err, sizeof err);
                if (!t) {
                    fprintf(stderr, "tlstest proxy: %s\n", err);
                    close(fd);
                } else {
                    p->conns[p->n++] = (struct pconn){.plain = fd, .tls = t};
                }
            }
        }
    }
    while (p->n)
        pconn_drop(p, p->n - 1);
    return NULL;
}

struct tls_proxy *tls_proxy_start(int hub_port, const struct tls_client_opts *o)
{
    struct tls_proxy *px = xmalloc(sizeof *px);
    struct tls_proxy_impl *p = xmalloc(sizeof *p);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    socklen_t sl = sizeof sa;

    memset(p, 0, sizeof *p);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    p->hub_port = hub_port;
    p->ca = dup_or_null(o ? o->ca : NULL);
    p->cert = dup_or_null(o ? o->cert : NULL);
    p->key = dup_or_null(o ? o->key : NULL);
    p->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(p->lfd >= 0 && bind(p->lfd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
              listen(p->lfd, 64) == 0 && getsockname(p->lfd, (struct sockaddr *)&sa, &sl) == 0,
          "tls proxy: cannot listen: %s", strerror(errno));
    CHECK(pipe2(p->stop, O_CLOEXEC) == 0, "pipe: %s", strerror(errno));
    CHECK(pthread_create(&p->thread, NULL, proxy_main, p) == 0, "pthread_create failed");
    px->port = ntohs(sa.sin_port);
    px->impl = p;
    return px;
}

void tls_proxy_stop(struct tls_proxy *px)
{
    if (!px)
        return;
    struct tls_proxy_impl *p = px->impl;
    (void)!write(p->stop[1], "x", 1);
    pthread_join(p->thread, NULL);
    close(p->stop[0]);
    close(p->stop[1]);
    close(p->lfd);
    free(p->ca);
    free(p->cert);
    free(p->key);
    free(p);
    free(px);
}
