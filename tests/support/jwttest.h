/* jwttest: keys and JSON Web Tokens made at test time with OpenSSL's
 * libcrypto, for the hub.jwt_verify suites. Nothing secret is checked in:
 * every key and secret is generated when the test runs.
 *
 * Ownership: functions returning `char *` return a new string the caller
 * frees; EVP_PKEY * are new keys (EVP_PKEY_free). Every function fails the
 * current Check test on an OpenSSL error. */
#ifndef JWTTEST_H
#define JWTTEST_H

#include <stddef.h>

#include <openssl/evp.h>

/* A new RSA key of `bits` bits. */
EVP_PKEY *jt_rsa(int bits);
/* A new EC key on `curve` ("P-256", "P-384"). */
EVP_PKEY *jt_ec(const char *curve);

/* The public key as a JWK: {"kty":...,"n"/"e" or "crv"/"x"/"y"[,"kid":kid]
 * EXTRA}; `kid` may be NULL, `extra` (e.g. ",\"alg\":\"RS256\"") NULL. */
char *jt_jwk(EVP_PKEY *k, const char *kid, const char *extra);
/* PEM: the public key (SubjectPublicKeyInfo), the private key (PKCS#8),
 * and a self-signed certificate of the key. */
char *jt_pem_public(EVP_PKEY *k);
char *jt_pem_private(EVP_PKEY *k);
char *jt_pem_cert(EVP_PKEY *k);

/* base64url without padding (RFC 7515 §2). */
char *jt_b64url(const void *p, size_t n);

/* A token b64url(header).b64url(payload).signature, signed as `how` says:
 * "RS256" and "ES256" (JOSE r || s) with `k`, "ES256-DER" (an ES256
 * signature left in OpenSSL's DER form), "HS256" with secret[0..slen),
 * "none" (an empty signature). */
char *jt_token(const char *header, const char *payload, const char *how, EVP_PKEY *k,
               const void *secret, size_t slen);

/* A random secret of 32 hex digits. */
char *jt_secret(void);

/* Writes `text` to `path`. */
void jt_write(const char *path, const char *text);

/* A temp dir for a test's files: creates /tmp/<prefix>.XXXXXX into
 * dir[0..n); jt_rmdir removes it and all it holds; jt_path gives
 * "dir/name" in one of 4 rotating static buffers. */
void jt_mkdir(char *dir, size_t n, const char *prefix);
void jt_rmdir(const char *dir);
const char *jt_path(const char *dir, const char *name);

#endif
