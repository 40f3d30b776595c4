/* Private to the TLS module (tls.c: the connections and the swap of the
 * context on a reload; tls_ctx.c: loading and checking a context). Not a
 * public contract. Loop thread only. */
#ifndef LUAHUB_TLS_IMPL_H
#define LUAHUB_TLS_IMPL_H

#include <stdint.h>

#include <openssl/ssl.h>

#include "luahub/config.h"
#include "luahub/util.h"

/* A new context with the files of `cfg` (tls_cert, tls_key, and
 * tls_client_ca if set), checked: the key matches the certificate, which
 * is valid now. Returns it (the caller owns it) with the certificate's
 * expiry (Unix time) in *not_after, or NULL with the problem in `why`. */
SSL_CTX *hub_tls_ctx_build(const struct hub_config *cfg, int64_t *not_after,
                           struct hub_buf *why);

/* Logs what new connections get: `what` (e.g. "reload: TLS certificate
 * loaded"), cfg->tls_cert, the subject's name and the expiry. `ctx` is
 * borrowed. */
void hub_tls_ctx_log(const struct hub_config *cfg, SSL_CTX *ctx, const char *what);

#endif
