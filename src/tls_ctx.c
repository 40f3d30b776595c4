/* TLS contexts: loading and checking the conf's certificate, key and
 * client CA files into an SSL_CTX (include/luahub/tls.h; docs/internals.md,
 * "TLS"). The connections, their pump and the swap of the context on a
 * reload are tls.c; what the two share is tls_impl.h. Loop thread only. */
#include "luahub/tls.h"
#include "tls_impl.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "luahub/log.h"

#define PEM_MAX (1024 * 1024)       /* bytes of a certificate or key file */

/* OpenSSL must never ask a terminal for a passphrase. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    return 0;
}

/* Appends OpenSSL's reason for the last error and clears its queue. */
static void append_ssl_reason(struct hub_buf *why)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    char buf[256];

    if (!r && e) {
        ERR_error_string_n(e, buf, sizeof(buf));
        r = buf;
    }
    hub_buf_appends(why, r ? r : "unknown error");
    ERR_clear_error();
}

/* Reads the PEM file of conf key `key` at `path` (a regular file, opened
 * non-blocking so a FIFO cannot hang the loop). Returns 0, or -1 with the
 * problem in `why`. */
static int read_pem(const char *key, const char *path, struct hub_buf *out, struct hub_buf *why)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC), rc = -1;

    if (fd < 0) {
        hub_buf_printf(why, "%s \"%s\": %s", key, path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) < 0) {
        hub_buf_printf(why, "%s \"%s\": %s", key, path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode) || st.st_size > PEM_MAX) {
        hub_buf_printf(why, "%s \"%s\": %s", key, path,
                       !S_ISREG(st.st_mode) ? "not a regular file" : "larger than 1 MiB");
        goto out;
    }
    hub_buf_reserve(out, (size_t)st.st_size + 1);
    for (;;) {
        ssize_t n = read(fd, out->p + out->len, out->cap - out->len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            hub_buf_printf(why, "%s \"%s\": %s", key, path, strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        out->len += (size_t)n;
        if (out->len + 1 >= out->cap)
            hub_buf_reserve(out, 4096);
        if (out->len > PEM_MAX) {
            hub_buf_printf(why, "%s \"%s\": larger than 1 MiB", key, path);
            goto out;
        }
    }
    out->p[out->len] = '\0';
    rc = 0;
out:
    close(fd);
    return rc;
}

/* "2026-01-31 12:00:00 UTC" and the Unix time of an ASN.1 time. */
static int64_t asn1_time(const ASN1_TIME *a, char *out, size_t n)
{
    struct tm tm;
    if (!ASN1_TIME_to_tm(a, &tm)) {
        snprintf(out, n, "(unreadable date)");
        return 0;
    }
    strftime(out, n, "%Y-%m-%d %H:%M:%S UTC", &tm);
    return (int64_t)timegm(&tm);
}

/* The certificate chain: the leaf first, then its intermediates. */
static int load_cert(SSL_CTX *ctx, const char *path, int64_t *not_after, struct hub_buf *why)
{
    struct hub_buf pem = {0};
    BIO *b = NULL;
    X509 *leaf = NULL, *x;
    char date[64];
    int rc = -1;

    if (read_pem("tls_cert", path, &pem, why) < 0)
        goto out;
    b = BIO_new_mem_buf(pem.p, (int)pem.len);
    leaf = PEM_read_bio_X509_AUX(b, NULL, no_passphrase, NULL);
    if (!leaf) {
        hub_buf_printf(why, "tls_cert \"%s\": no PEM certificate in it (", path);
        append_ssl_reason(why);
        hub_buf_appends(why, ")");
        goto out;
    }
    if (X509_cmp_current_time(X509_get0_notBefore(leaf)) > 0) {
        asn1_time(X509_get0_notBefore(leaf), date, sizeof(date));
        hub_buf_printf(why, "tls_cert \"%s\": the certificate is not valid yet (not before %s)",
                       path, date);
        goto out;
    }
    *not_after = asn1_time(X509_get0_notAfter(leaf), date, sizeof(date));
    if (X509_cmp_current_time(X509_get0_notAfter(leaf)) < 0) {
        hub_buf_printf(why, "tls_cert \"%s\": the certificate has expired (not after %s)",
                       path, date);
        goto out;
    }
    if (SSL_CTX_use_certificate(ctx, leaf) != 1) {
        hub_buf_printf(why, "tls_cert \"%s\": ", path);
        append_ssl_reason(why);
        goto out;
    }
    while ((x = PEM_read_bio_X509(b, NULL, no_passphrase, NULL)))
        if (SSL_CTX_add0_chain_cert(ctx, x) != 1)
            X509_free(x);
    ERR_clear_error(); /* the end of the file reads as "no start line" */
    rc = 0;
out:
    X509_free(leaf);
    BIO_free(b);
    hub_buf_free(&pem);
    return rc;
}

static int load_key(SSL_CTX *ctx, const char *path, const char *cert, struct hub_buf *why)
{
    struct hub_buf pem = {0};
    BIO *b = NULL;
    EVP_PKEY *k = NULL;
    int rc = -1;

    if (read_pem("tls_key", path, &pem, why) < 0)
        goto out;
    /* "BEGIN ENCRYPTED PRIVATE KEY" (PKCS #8), "Proc-Type: 4,ENCRYPTED" (older) */
    if (strstr(pem.p, "ENCRYPTED")) {
        hub_buf_printf(why, "tls_key \"%s\": the key is encrypted with a passphrase; the hub "
                       "reads unencrypted keys (openssl pkey -in KEY -out PLAIN)", path);
        goto out;
    }
    b = BIO_new_mem_buf(pem.p, (int)pem.len);
    k = PEM_read_bio_PrivateKey(b, NULL, no_passphrase, NULL);
    if (!k) {
        hub_buf_printf(why, "tls_key \"%s\": no PEM private key in it (", path);
        append_ssl_reason(why);
        hub_buf_appends(why, ")");
        goto out;
    }
    if (SSL_CTX_use_PrivateKey(ctx, k) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
        hub_buf_printf(why, "tls_key \"%s\" is not the key of the certificate in tls_cert "
                       "\"%s\" (", path, cert);
        append_ssl_reason(why);
        hub_buf_appends(why, ")");
        goto out;
    }
    rc = 0;
out:
    EVP_PKEY_free(k);
    BIO_free(b);
    hub_buf_free(&pem);
    return rc;
}

/* Mutual TLS: every certificate of the file is trusted to sign client
 * certificates, and named to clients as an acceptable issuer. */
static int load_client_ca(SSL_CTX *ctx, const char *path, struct hub_buf *why)
{
    struct hub_buf pem = {0};
    X509 *x;
    int n = 0;

    if (read_pem("tls_client_ca", path, &pem, why) < 0)
        return -1;
    BIO *b = BIO_new_mem_buf(pem.p, (int)pem.len);
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    while ((x = PEM_read_bio_X509(b, NULL, no_passphrase, NULL))) {
        if (X509_STORE_add_cert(store, x) == 1 && SSL_CTX_add_client_CA(ctx, x) == 1)
            n++;
        X509_free(x);
    }
    BIO_free(b);
    hub_buf_free(&pem);
    if (!n) {
        hub_buf_printf(why, "tls_client_ca \"%s\": no PEM certificate in it (", path);
        append_ssl_reason(why);
        hub_buf_appends(why, ")");
        return -1;
    }
    ERR_clear_error();
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    return 0;
}

/* Browsers offer h2 first: the hub speaks HTTP/1.1 only. */
static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg)
{
    static const unsigned char h11[] = "\x08http/1.1";
    unsigned char *sel;
    if (SSL_select_next_proto(&sel, outlen, h11, sizeof(h11) - 1, in, inlen) !=
        OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

/* A new context with the conf's files, checked. Returns it, or NULL with
 * the problem in `why`. */
SSL_CTX *hub_tls_ctx_build(const struct hub_config *cfg, int64_t *not_after,
                           struct hub_buf *why)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

    if (!ctx) {
        hub_buf_appends(why, "cannot create a TLS context: ");
        append_ssl_reason(why);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* Idle connections give their 34 KB of record buffers back. */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* One read takes every record there is, not a header then a body. */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"luahub", 6);
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    if (load_cert(ctx, cfg->tls_cert, not_after, why) < 0 ||
        load_key(ctx, cfg->tls_key, cfg->tls_cert, why) < 0 ||
        (cfg->tls_client_ca && load_client_ca(ctx, cfg->tls_client_ca, why) < 0)) {
        SSL_CTX_free(ctx);
        ERR_clear_error();
        return NULL;
    }
    return ctx;
}

/* Logs what new connections get: `what` (e.g. "reload: TLS certificate
 * loaded"), the file, the subject's name and the expiry. */
void hub_tls_ctx_log(const struct hub_config *cfg, SSL_CTX *ctx, const char *what)
{
    X509 *x = SSL_CTX_get0_certificate(ctx);
    char cn[256] = "?", date[64];

    X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn));
    asn1_time(X509_get0_notAfter(x), date, sizeof(date));
    hub_log(HUB_LOG_INFO, "%s from %s (CN \"%s\", valid until %s)", what, cfg->tls_cert, cn,
            date);
}

int hub_tls_check(const struct hub_config *cfg, struct hub_buf *why)
{
    int64_t not_after;
    SSL_CTX *ctx = hub_tls_ctx_build(cfg, &not_after, why);
    SSL_CTX_free(ctx);
    return ctx ? 0 : -1;
}
