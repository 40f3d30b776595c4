/* The keys of hub.jwt_verify: the conf's jwt_keys files (PEM public keys
 * or certificates, or JWKS), read when a policy is built (at start and at
 * each reload, never per call) into OpenSSL keys, and the RS256 / ES256
 * signature checks against them (docs/lua.md, "hub.jwt_verify").
 *
 * What is refused, with a message naming the file and the key: a file that
 * is neither PEM nor JSON, a private key, an RSA key under 2048 bits (or
 * over 16384: each verification would cost too much), an EC key off the
 * P-256 curve, bad base64url, a kid used twice. What is skipped with a
 * warning: JWKS keys of a kind hub.jwt_verify does not verify with ("use":
 * "enc", other key types, curves and algorithms), so that an identity
 * provider's whole JWKS can be used as it is. Loop thread only. */
#include "lua_api.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <yajl/yajl_tree.h>

#define KEYS_FILE_MAX (1024 * 1024) /* bytes of one key file */
#define KEYS_MAX 256                /* keys in all the files */
#define RSA_BITS_MIN 2048
#define RSA_BITS_MAX 16384
#define KID_MAX 256                 /* bytes of a kid */
#define EC_COORD 32                 /* bytes of a P-256 coordinate */
/* Instructions charged per signature check, before it runs (lua_api.h,
 * "Work done in C", about 7 ns an instruction): on the test machine
 * (`openssl speed`) an ES256 check takes about 60 µs and an RS256 one 16
 * µs with a 2048-bit key, growing with the square of the key's size. */
#define COST_ES256 8000
#define COST_RS2048 2000

struct jwk {
    EVP_PKEY *pkey;
    int alg;                        /* HUB_JWT_RS256 or HUB_JWT_ES256 */
    char *kid;                      /* NULL: none (PEM keys) */
    char *name;                     /* "FILE: key N (kid 'x')", for messages */
};

struct hub_jwt_keys {
    struct jwk *v;
    size_t n;
};

/* Loading one file: where the messages go. */
struct load {
    struct hub_jwt_keys *keys;
    const char *file;
    struct hub_config_errors *errs, *warns;
    unsigned nerr;
};

static void problem(struct load *ld, int warning, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* "FILE: NAME: message" as an error (or a warning). */
static void problem(struct load *ld, int warning, const char *name, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (warning) {
        hub_policy_add_msg(ld->warns, "%s%s%s: %s", ld->file, name ? ": " : "",
                           name ? name : "", msg);
    } else {
        hub_policy_add_msg(ld->errs, "%s%s%s: %s", ld->file, name ? ": " : "",
                           name ? name : "", msg);
        ld->nerr++;
    }
}

/* Names a key for messages: "key 2 (kid 'abc')" or "key 2". */
static void key_name(char *out, size_t n, size_t index, const char *kid)
{
    char shown[64];
    if (kid) {
        hub_lua_show(kid, strlen(kid), shown, sizeof(shown));
        snprintf(out, n, "key %zu (kid '%s')", index, shown);
    } else {
        snprintf(out, n, "key %zu", index);
    }
}

/* Adds `pkey` (taken) as key `name` of the set, or reports why it cannot
 * verify tokens. */
static void add_key(struct load *ld, EVP_PKEY *pkey, const char *kid, const char *name)
{
    int alg = 0, bits = EVP_PKEY_get_bits(pkey);
    char group[64] = "";

    if (EVP_PKEY_get_base_id(pkey) == EVP_PKEY_RSA) {
        if (bits < RSA_BITS_MIN) {
            problem(ld, 0, name, "an RSA key of %d bits: RS256 keys must have at least %d "
                    "bits", bits, RSA_BITS_MIN);
            goto fail;
        }
        if (bits > RSA_BITS_MAX) {
            problem(ld, 0, name, "an RSA key of %d bits: at most %d are accepted", bits,
                    RSA_BITS_MAX);
            goto fail;
        }
        alg = HUB_JWT_RS256;
    } else if (EVP_PKEY_get_base_id(pkey) == EVP_PKEY_EC) {
        size_t gl;
        if (!EVP_PKEY_get_group_name(pkey, group, sizeof(group), &gl) ||
            strcmp(group, "prime256v1") != 0) {
            problem(ld, 0, name, "an EC key on curve %s: ES256 needs P-256 (prime256v1)",
                    group[0] ? group : "?");
            goto fail;
        }
        alg = HUB_JWT_ES256;
    } else {
        problem(ld, 0, name, "a %s key: hub.jwt_verify takes RSA keys (RS256) and EC P-256 "
                "keys (ES256)", OBJ_nid2sn(EVP_PKEY_get_base_id(pkey)));
        goto fail;
    }
    if (kid) {
        for (size_t i = 0; i < ld->keys->n; i++) {
            if (ld->keys->v[i].kid && !strcmp(ld->keys->v[i].kid, kid)) {
                problem(ld, 0, name, "its kid is also the kid of %s: each kid must name "
                        "one key", ld->keys->v[i].name);
                goto fail;
            }
        }
    }
    if (ld->keys->n >= KEYS_MAX) {
        problem(ld, 0, name, "more than %d keys in jwt_keys", KEYS_MAX);
        goto fail;
    }
    ld->keys->v = hub_xrealloc(ld->keys->v, (ld->keys->n + 1) * sizeof(*ld->keys->v));
    struct jwk *k = &ld->keys->v[ld->keys->n++];
    struct hub_buf b = {0};
    hub_buf_printf(&b, "%s: %s", ld->file, name);
    *k = (struct jwk){.pkey = pkey, .alg = alg, .kid = kid ? hub_xstrdup(kid) : NULL,
                      .name = b.p};
    return;
fail:
    EVP_PKEY_free(pkey);
}

/* ---- PEM ---------------------------------------------------------------- */

/* Public keys and certificates, one key per block. */
static void load_pem(struct load *ld, const char *text, size_t len)
{
    BIO *bio = BIO_new_mem_buf(text, (int)len);
    char *bname = NULL, *header = NULL;
    unsigned char *data = NULL;
    long dlen;
    size_t blocks = 0;

    while (bio && PEM_read_bio(bio, &bname, &header, &data, &dlen) == 1) {
        char name[96];
        const unsigned char *q = data;
        EVP_PKEY *pkey = NULL;
        snprintf(name, sizeof(name), "PEM block %zu (%s)", ++blocks, bname);
        if (strstr(bname, "PRIVATE KEY")) {
            problem(ld, 0, name, "a private key: jwt_keys takes public keys or certificates "
                    "(keep the private key with the issuer)");
        } else if (!strcmp(bname, "PUBLIC KEY")) {
            if (!(pkey = d2i_PUBKEY(NULL, &q, dlen)))
                problem(ld, 0, name, "not a valid public key");
        } else if (!strcmp(bname, "RSA PUBLIC KEY")) {
            if (!(pkey = d2i_PublicKey(EVP_PKEY_RSA, NULL, &q, dlen)))
                problem(ld, 0, name, "not a valid RSA public key");
        } else if (!strcmp(bname, "CERTIFICATE")) {
            X509 *x = d2i_X509(NULL, &q, dlen);
            if (!x || !(pkey = X509_get_pubkey(x)))
                problem(ld, 0, name, "not a valid certificate");
            X509_free(x);
        } else {
            problem(ld, 0, name, "not a public key or a certificate");
        }
        if (pkey)
            add_key(ld, pkey, NULL, name);
        OPENSSL_free(bname);
        OPENSSL_free(header);
        OPENSSL_free(data);
        bname = header = NULL;
        data = NULL;
    }
    /* The end of the file is an error to PEM_read_bio: "no start line". */
    unsigned long e = ERR_peek_last_error();
    int at_end = !e || (ERR_GET_LIB(e) == ERR_LIB_PEM &&
                        ERR_GET_REASON(e) == PEM_R_NO_START_LINE);
    ERR_clear_error();
    BIO_free(bio);
    if (!at_end) {
        char name[32];
        snprintf(name, sizeof(name), "PEM block %zu", blocks + 1);
        problem(ld, 0, name, "cannot be read (bad base64, or no END line?)");
    } else if (!blocks) {
        problem(ld, 0, NULL, "neither a JWKS (a JSON object) nor PEM (no \"-----BEGIN\" "
                "block found)");
    }
}

/* ---- JWKS --------------------------------------------------------------- */

static yajl_val member(yajl_val obj, const char *name)
{
    for (size_t i = 0; i < obj->u.object.len; i++)
        if (!strcmp(obj->u.object.keys[i], name))
            return obj->u.object.values[i];
    return NULL;
}

/* Member `field` of the JWK as base64url bytes into a new buffer (*len).
 * NULL after reporting when it is absent or not base64url. */
static unsigned char *b64_member(struct load *ld, const char *name, yajl_val jwk,
                                 const char *field, size_t *len)
{
    const char *s = YAJL_GET_STRING(member(jwk, field));
    if (!s) {
        problem(ld, 0, name, "'%s' is missing or not a string", field);
        return NULL;
    }
    size_t sl = strlen(s);
    unsigned char *out = hub_xmalloc(sl * 3 / 4 + 1);
    long n = hub_lua_b64url_decode(s, sl, out);
    if (n <= 0) {
        problem(ld, 0, name, "'%s' is not base64url", field);
        free(out);
        return NULL;
    }
    *len = (size_t)n;
    return out;
}

/* The public key of `type` made of the parameters pushed into `bld` (if
 * `pushed`; bld is freed), when OpenSSL takes them and its checks pass (an
 * EC point on its curve; an RSA modulus and exponent that make sense).
 * NULL after reporting `invalid` otherwise. */
static EVP_PKEY *from_params(struct load *ld, const char *name, const char *type,
                             OSSL_PARAM_BLD *bld, int pushed, const char *invalid)
{
    OSSL_PARAM *params = pushed ? OSSL_PARAM_BLD_to_param(bld) : NULL;
    EVP_PKEY_CTX *ctx = params ? EVP_PKEY_CTX_new_from_name(NULL, type, NULL) : NULL;
    EVP_PKEY *pkey = NULL;
    if (!ctx || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0)
        pkey = NULL;
    EVP_PKEY_CTX_free(ctx);
    ctx = pkey ? EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL) : NULL;
    if (!ctx || EVP_PKEY_public_check(ctx) != 1) {
        problem(ld, 0, name, "%s", invalid);
        EVP_PKEY_free(pkey);
        pkey = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    return pkey;
}

static EVP_PKEY *rsa_jwk(struct load *ld, const char *name, yajl_val jwk)
{
    size_t nl = 0, el = 0;
    unsigned char *n = b64_member(ld, name, jwk, "n", &nl);
    unsigned char *e = n ? b64_member(ld, name, jwk, "e", &el) : NULL;
    EVP_PKEY *pkey = NULL;
    if (e) {
        BIGNUM *bn = BN_bin2bn(n, (int)nl, NULL), *be = BN_bin2bn(e, (int)el, NULL);
        OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
        int pushed = bn && be && bld && OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn) &&
                     OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, be);
        pkey = from_params(ld, name, "RSA", bld, pushed, "not a valid RSA public key (n, e)");
        BN_free(bn);
        BN_free(be);
    }
    free(n);
    free(e);
    return pkey;
}

static EVP_PKEY *ec_jwk(struct load *ld, const char *name, yajl_val jwk)
{
    size_t xl = 0, yl = 0;
    unsigned char *x = b64_member(ld, name, jwk, "x", &xl);
    unsigned char *y = x ? b64_member(ld, name, jwk, "y", &yl) : NULL;
    EVP_PKEY *pkey = NULL;
    if (y && (xl != EC_COORD || yl != EC_COORD)) {
        problem(ld, 0, name, "'x' and 'y' of a P-256 key are %d bytes each (got %zu and %zu)",
                EC_COORD, xl, yl);
    } else if (y) {
        unsigned char point[1 + 2 * EC_COORD];
        point[0] = 0x04; /* uncompressed: 04 || x || y (SEC 1, 2.3.3) */
        memcpy(point + 1, x, EC_COORD);
        memcpy(point + 1 + EC_COORD, y, EC_COORD);
        OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
        int pushed = bld && OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME,
                                                            "prime256v1", 0) &&
                     OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point,
                                                      sizeof(point));
        pkey = from_params(ld, name, "EC", bld, pushed, "not a valid P-256 public key: (x, y) "
                           "is not a point of the curve");
    }
    free(x);
    free(y);
    return pkey;
}

/* One JWK (RFC 7517 §4, RFC 7518 §6). */
static void load_jwk(struct load *ld, yajl_val jwk, size_t index)
{
    char name[160];
    if (!YAJL_IS_OBJECT(jwk)) {
        key_name(name, sizeof(name), index, NULL);
        problem(ld, 0, name, "not a JSON object");
        return;
    }
    yajl_val kidv = member(jwk, "kid");
    const char *kid = YAJL_GET_STRING(kidv);
    key_name(name, sizeof(name), index, kid);
    if (kidv && !kid) {
        problem(ld, 0, name, "'kid' is not a string");
        return;
    }
    if (kid && strlen(kid) > KID_MAX) {
        problem(ld, 0, name, "'kid' is longer than %d bytes", KID_MAX);
        return;
    }
    const char *kty = YAJL_GET_STRING(member(jwk, "kty"));
    const char *use = YAJL_GET_STRING(member(jwk, "use"));
    const char *alg = YAJL_GET_STRING(member(jwk, "alg"));
    const char *crv = YAJL_GET_STRING(member(jwk, "crv"));
    if (!kty) {
        problem(ld, 0, name, "'kty' is missing or not a string");
        return;
    }
    if (member(jwk, "d") || member(jwk, "p") || member(jwk, "k")) {
        problem(ld, 0, name, "holds private or secret key material ('d', 'p' or 'k'): "
                "jwt_keys takes public keys (keep the private key with the issuer)");
        return;
    }
    int rsa = !strcmp(kty, "RSA"), ec = !strcmp(kty, "EC");
    /* Kinds that are not for verifying RS256 / ES256 signatures: skipped */
    if (use && strcmp(use, "sig") != 0) {
        problem(ld, 1, name, "skipped: \"use\": \"%.32s\" (not a signature key)", use);
        return;
    }
    if (!rsa && !ec) {
        problem(ld, 1, name, "skipped: \"kty\": \"%.32s\" (hub.jwt_verify verifies with RSA "
                "and EC P-256 keys)", kty);
        return;
    }
    if (ec && (!crv || strcmp(crv, "P-256") != 0)) {
        problem(ld, 1, name, "skipped: \"crv\": \"%.32s\" (ES256 is on P-256)",
                crv ? crv : "(none)");
        return;
    }
    if (alg && strcmp(alg, rsa ? "RS256" : "ES256") != 0) {
        problem(ld, 1, name, "skipped: \"alg\": \"%.32s\" (%s keys verify %s)", alg, kty,
                rsa ? "RS256" : "ES256");
        return;
    }
    EVP_PKEY *pkey = rsa ? rsa_jwk(ld, name, jwk) : ec_jwk(ld, name, jwk);
    if (pkey)
        add_key(ld, pkey, kid, name);
}

/* A JWKS ({"keys": [...]}) or a single JWK. */
static void load_jwks(struct load *ld, const char *text)
{
    char err[256];
    yajl_val v = yajl_tree_parse(text, err, sizeof(err));
    if (!v) {
        char *nl = strchr(err, '\n');
        if (nl)
            *nl = '\0';
        problem(ld, 0, NULL, "not valid JSON: %s", err);
        return;
    }
    yajl_val keys = YAJL_IS_OBJECT(v) ? member(v, "keys") : NULL;
    if (keys && YAJL_IS_ARRAY(keys)) {
        if (!keys->u.array.len)
            problem(ld, 0, NULL, "the JWKS has no key");
        for (size_t i = 0; i < keys->u.array.len; i++)
            load_jwk(ld, keys->u.array.values[i], i + 1);
    } else if (YAJL_IS_OBJECT(v) && member(v, "kty")) {
        load_jwk(ld, v, 1);
    } else {
        problem(ld, 0, NULL, "a JSON file of keys is a JWKS, {\"keys\": [...]}, or one JWK");
    }
    yajl_tree_free(v);
}

/* ---- the set ------------------------------------------------------------ */

int hub_lua_jwt_keys_load(struct hub_policy *p, struct hub_config_errors *errs,
                          struct hub_config_errors *warns)
{
    const char *files = p->cfg->jwt_keys;
    struct hub_jwt_keys *keys = hub_xcalloc(1, sizeof(*keys));
    struct load ld = {.keys = keys, .errs = errs, .warns = warns};

    while (files && *files) {
        const char *end = strchr(files, '\n');
        size_t n = end ? (size_t)(end - files) : strlen(files);
        char *file = hub_xstrndup(files, n);
        struct hub_buf text = {0};
        char why[256];
        ld.file = file;
        if (hub_policy_read_file(file, KEYS_FILE_MAX, &text, why, sizeof(why)) < 0) {
            problem(&ld, 0, NULL, "cannot read the keys: %s", why);
        } else {
            size_t i = 0;
            while (i < text.len && strchr(" \t\r\n", text.p[i]))
                i++;
            if (i < text.len && text.p[i] == '{')
                load_jwks(&ld, text.p);
            else
                load_pem(&ld, text.p, text.len);
        }
        hub_buf_free(&text);
        free(file);
        files += n;
        if (*files == '\n')
            files++;
    }
    ERR_clear_error(); /* what OpenSSL refused is reported: leave its queue empty */
    if (ld.nerr || !keys->n) {
        if (!ld.nerr && p->cfg->jwt_keys) {
            ld.file = "jwt_keys";
            problem(&ld, 0, NULL, "no key that hub.jwt_verify can use in the files");
        }
        hub_lua_jwt_keys_free(keys);
        return ld.nerr ? -1 : 0;
    }
    p->jwt_keys = keys;
    return 0;
}

void hub_lua_jwt_keys_free(struct hub_jwt_keys *keys)
{
    if (!keys)
        return;
    for (size_t i = 0; i < keys->n; i++) {
        EVP_PKEY_free(keys->v[i].pkey);
        free(keys->v[i].kid);
        free(keys->v[i].name);
    }
    free(keys->v);
    free(keys);
}

/* ---- verification ------------------------------------------------------- */

static const char *alg_name(int alg)
{
    return alg == HUB_JWT_RS256 ? "RS256" : alg == HUB_JWT_ES256 ? "ES256" : "HS256";
}

/* ES256's JOSE signature r || s (RFC 7518 §3.4) as the DER ECDSA-Sig-Value
 * OpenSSL verifies; NULL if it cannot be built. */
static unsigned char *jose_to_der(const unsigned char *sig, int *len)
{
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, EC_COORD, NULL), *s = BN_bin2bn(sig + EC_COORD, EC_COORD, NULL);
    unsigned char *der = NULL;
    if (es && r && s && ECDSA_SIG_set0(es, r, s)) {
        r = s = NULL; /* owned by es now */
        *len = i2d_ECDSA_SIG(es, &der);
        if (*len <= 0)
            der = NULL;
    }
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(es);
    return der;
}

/* 1 if `sig` is k's signature of data[0..dlen). */
static int check_sig(struct hub_policy *p, lua_State *L, const struct jwk *k,
                     const char *data, size_t dlen, const unsigned char *sig, size_t slen)
{
    unsigned char *der = NULL;
    int derlen = 0, ok = 0;

    if (k->alg == HUB_JWT_ES256) {
        hub_sandbox_charge(p, L, COST_ES256);
        if (!(der = jose_to_der(sig, &derlen)))
            return 0;
        sig = der;
        slen = (size_t)derlen;
    } else {
        int64_t b = EVP_PKEY_get_bits(k->pkey) / 1024;
        hub_sandbox_charge(p, L, COST_RS2048 * b * b / 4);
        if (slen != (size_t)EVP_PKEY_get_size(k->pkey))
            return 0;
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx && EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, k->pkey) == 1)
        ok = EVP_DigestVerify(ctx, sig, slen, (const unsigned char *)data, dlen) == 1;
    EVP_MD_CTX_free(ctx);
    OPENSSL_free(der);
    ERR_clear_error();
    return ok;
}

int hub_lua_jwt_keys_verify(struct hub_policy *p, lua_State *L, int alg, const char *kid,
                            size_t kidlen, const char *data, size_t dlen,
                            const unsigned char *sig, size_t slen, char *why, size_t n)
{
    const struct hub_jwt_keys *ks = p->jwt_keys;
    char shown[64];
    int tried = 0;

    if (alg == HUB_JWT_ES256 && slen != 2 * EC_COORD) {
        snprintf(why, n, "bad signature: an ES256 signature is %d bytes, r || s (RFC 7518 "
                 "3.4), got %zu (DER?)", 2 * EC_COORD, slen);
        return -1;
    }
    /* A kid names one key; its algorithm must be the token's. */
    if (kid) {
        for (size_t i = 0; i < ks->n; i++) {
            const struct jwk *k = &ks->v[i];
            if (!k->kid || strlen(k->kid) != kidlen || memcmp(k->kid, kid, kidlen) != 0)
                continue;
            if (k->alg != alg) {
                hub_lua_show(kid, kidlen, shown, sizeof(shown));
                snprintf(why, n, "alg %s does not match the key of kid '%s' (%s)",
                         alg_name(alg), shown, alg_name(k->alg));
                return -1;
            }
            if (check_sig(p, L, k, data, dlen, sig, slen))
                return 0;
            snprintf(why, n, "bad signature");
            return -1;
        }
    }
    /* No kid, or one no key has: the keys without a kid (PEM), or every
     * key of the token's algorithm when the token has no kid. */
    for (size_t i = 0; i < ks->n; i++) {
        const struct jwk *k = &ks->v[i];
        if (k->alg != alg || (kid && k->kid))
            continue;
        tried++;
        if (check_sig(p, L, k, data, dlen, sig, slen))
            return 0;
    }
    if (tried) {
        snprintf(why, n, "bad signature");
    } else if (kid) {
        hub_lua_show(kid, kidlen, shown, sizeof(shown));
        snprintf(why, n, "unknown kid '%s'", shown);
    } else {
        snprintf(why, n, "no key for alg %s in jwt_keys", alg_name(alg));
    }
    return -1;
}
