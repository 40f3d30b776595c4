/* jwttest: test keys and tokens made at run time (see jwttest.h). */
#include "jwttest.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>

EVP_PKEY *jt_rsa(int bits)
{
    EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)bits);
    ck_assert_msg(k != NULL, "RSA key generation failed");
    return k;
}

EVP_PKEY *jt_ec(const char *curve)
{
    EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", curve);
    ck_assert_msg(k != NULL, "EC key generation failed (%s)", curve);
    return k;
}

char *jt_b64url(const void *p, size_t n)
{
    static const char digits[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const unsigned char *s = p;
    char *out = malloc(n * 4 / 3 + 4), *o = out;
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        unsigned v = (unsigned)s[i] << 16 | (unsigned)s[i + 1] << 8 | s[i + 2];
        *o++ = digits[v >> 18];
        *o++ = digits[(v >> 12) & 63];
        *o++ = digits[(v >> 6) & 63];
        *o++ = digits[v & 63];
    }
    if (i < n) {
        unsigned v = (unsigned)s[i] << 16 | (i + 1 < n ? (unsigned)s[i + 1] << 8 : 0);
        *o++ = digits[v >> 18];
        *o++ = digits[(v >> 12) & 63];
        if (i + 1 < n)
            *o++ = digits[(v >> 6) & 63];
    }
    *o = '\0';
    return out;
}

static char *b64_bn(EVP_PKEY *k, const char *param, int pad)
{
    BIGNUM *bn = NULL;
    ck_assert(EVP_PKEY_get_bn_param(k, param, &bn) == 1);
    int n = pad ? pad : BN_num_bytes(bn);
    unsigned char *buf = malloc((size_t)n);
    ck_assert(BN_bn2binpad(bn, buf, n) == n);
    char *s = jt_b64url(buf, (size_t)n);
    free(buf);
    BN_free(bn);
    return s;
}

char *jt_jwk(EVP_PKEY *k, const char *kid, const char *extra)
{
    char *out = NULL, kidf[300] = "";
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    if (kid)
        snprintf(kidf, sizeof kidf, ",\"kid\":\"%s\"", kid);
    if (EVP_PKEY_get_base_id(k) == EVP_PKEY_RSA) {
        char *n = b64_bn(k, OSSL_PKEY_PARAM_RSA_N, 0), *e = b64_bn(k, OSSL_PKEY_PARAM_RSA_E, 0);
        fprintf(f, "{\"kty\":\"RSA\",\"n\":\"%s\",\"e\":\"%s\"%s%s}", n, e, kidf,
                extra ? extra : "");
        free(n);
        free(e);
    } else {
        char group[32];
        size_t gl;
        ck_assert(EVP_PKEY_get_group_name(k, group, sizeof group, &gl) == 1);
        int coord = !strcmp(group, "prime256v1") ? 32 : 48;
        char *x = b64_bn(k, OSSL_PKEY_PARAM_EC_PUB_X, coord);
        char *y = b64_bn(k, OSSL_PKEY_PARAM_EC_PUB_Y, coord);
        fprintf(f, "{\"kty\":\"EC\",\"crv\":\"%s\",\"x\":\"%s\",\"y\":\"%s\"%s%s}",
                coord == 32 ? "P-256" : "P-384", x, y, kidf, extra ? extra : "");
        free(x);
        free(y);
    }
    fclose(f);
    return out;
}

static char *bio_text(BIO *b)
{
    char *p;
    long n = BIO_get_mem_data(b, &p);
    char *s = strndup(p, (size_t)n);
    BIO_free(b);
    return s;
}

char *jt_pem_public(EVP_PKEY *k)
{
    BIO *b = BIO_new(BIO_s_mem());
    ck_assert(PEM_write_bio_PUBKEY(b, k) == 1);
    return bio_text(b);
}

char *jt_pem_private(EVP_PKEY *k)
{
    BIO *b = BIO_new(BIO_s_mem());
    ck_assert(PEM_write_bio_PrivateKey(b, k, NULL, NULL, 0, NULL, NULL) == 1);
    return bio_text(b);
}

char *jt_pem_cert(EVP_PKEY *k)
{
    X509 *x = X509_new();
    ck_assert(x != NULL);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_set_pubkey(x, k);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"luahub test",
                               -1, -1, 0);
    X509_set_issuer_name(x, name);
    ck_assert(X509_sign(x, k, EVP_sha256()) > 0);
    BIO *b = BIO_new(BIO_s_mem());
    ck_assert(PEM_write_bio_X509(b, x) == 1);
    X509_free(x);
    return bio_text(b);
}

/* DER ECDSA-Sig-Value into JOSE r || s (32 bytes each). */
static size_t der_to_jose(const unsigned char *der, size_t len, unsigned char out[64])
{
    const unsigned char *q = der;
    ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &q, (long)len);
    ck_assert(sig != NULL);
    const BIGNUM *r, *s;
    ECDSA_SIG_get0(sig, &r, &s);
    ck_assert(BN_bn2binpad(r, out, 32) == 32 && BN_bn2binpad(s, out + 32, 32) == 32);
    ECDSA_SIG_free(sig);
    return 64;
}

char *jt_token(const char *header, const char *payload, const char *how, EVP_PKEY *k,
               const void *secret, size_t slen)
{
    char *h = jt_b64url(header, strlen(header)), *p = jt_b64url(payload, strlen(payload));
    size_t il = strlen(h) + strlen(p) + 1;
    char *input = malloc(il + 1);
    snprintf(input, il + 1, "%s.%s", h, p);
    unsigned char sig[1024], jose[64];
    size_t sl = sizeof sig;
    const unsigned char *use = sig;

    if (!strcmp(how, "HS256")) {
        unsigned int ml = 0;
        ck_assert(HMAC(EVP_sha256(), secret, (int)slen, (const unsigned char *)input, il, sig,
                       &ml) != NULL);
        sl = ml;
    } else if (!strcmp(how, "none")) {
        sl = 0;
    } else {
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        ck_assert(EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, k) == 1);
        ck_assert(EVP_DigestSign(ctx, sig, &sl, (const unsigned char *)input, il) == 1);
        EVP_MD_CTX_free(ctx);
        if (!strcmp(how, "ES256")) {
            sl = der_to_jose(sig, sl, jose);
            use = jose;
        }
    }
    char *s = jt_b64url(use, sl);
    size_t tl = il + strlen(s) + 2;
    char *tok = malloc(tl);
    snprintf(tok, tl, "%s.%s", input, s);
    free(h);
    free(p);
    free(input);
    free(s);
    return tok;
}

char *jt_secret(void)
{
    unsigned char r[16];
    char *out = malloc(33);
    ck_assert(RAND_bytes(r, sizeof r) == 1);
    for (int i = 0; i < 16; i++)
        snprintf(out + 2 * i, 3, "%02x", r[i]);
    return out;
}

void jt_write(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_msg(f != NULL, "cannot write %s", path);
    fputs(text, f);
    fclose(f);
}

void jt_mkdir(char *dir, size_t n, const char *prefix)
{
    snprintf(dir, n, "/tmp/%s.XXXXXX", prefix);
    ck_assert_msg(mkdtemp(dir) != NULL, "cannot make %s", dir);
}

void jt_rmdir(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

const char *jt_path(const char *dir, const char *name)
{
    static char buf[4][512];
    static int i;
    char *b = buf[i++ & 3];
    snprintf(b, sizeof buf[0], "%s/%s", dir, name);
    return b;
}
