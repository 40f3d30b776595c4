/* Unit suite: what a policy reads when it is built (docs/lua.md), without
 * a server: the keys of hub.jwt_verify (the conf's jwt_keys: PEM and JWKS
 * files) and tokens verified with them (RS256, ES256) or with a secret
 * (HS256); require() of modules; the warnings of --check.
 *
 * Keys, certificates, secrets and tokens are made when the suite starts
 * (tests/support/jwttest.c): nothing secret is checked in. A test writes
 * its conf, policy, modules and key files into the suite's temp dir, loads
 * the conf with the real loader and builds the policy; white-box, it calls
 * the policy's global function `check(token)` through hub_policy_call
 * (src/lua_api.h), which answers "ok:<sub>" or "no:<why>". */
#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "jwttest.h"
#include "lua_api.h" /* white-box: hub_policy_call */
#include "luahub/log.h"
#include "luahub/policy.h"

/* ---- keys and files ------------------------------------------------------- */

static EVP_PKEY *rsa_a, *rsa_b, *rsa_small, *ec_a, *ec_b, *ec_384;
static char dir[64];

/* Made once, before the tests fork: RSA keys take a while. */
static void make_keys(void)
{
    jt_mkdir(dir, sizeof dir, "test_policy_load");
    rsa_a = jt_rsa(2048);
    rsa_b = jt_rsa(2048);
    rsa_small = jt_rsa(1024);
    ec_a = jt_ec("P-256");
    ec_b = jt_ec("P-256");
    ec_384 = jt_ec("P-384");
}

static void drop_keys(void)
{
    EVP_PKEY_free(rsa_a);
    EVP_PKEY_free(rsa_b);
    EVP_PKEY_free(rsa_small);
    EVP_PKEY_free(ec_a);
    EVP_PKEY_free(ec_b);
    EVP_PKEY_free(ec_384);
    jt_rmdir(dir);
}

static const char *in_dir(const char *name)
{
    return jt_path(dir, name);
}

static void put(const char *name, const char *text)
{
    jt_write(in_dir(name), text);
}

/* The strings of `ap` (NULL-terminated; freed) joined by `sep` between
 * `open` and `close`, written to dir/name. */
static void put_list(const char *name, const char *open, const char *sep, const char *close,
                     va_list ap)
{
    char *all = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&all, &len);
    fputs(open, f);
    int n = 0;
    for (char *s; (s = va_arg(ap, char *)); n++) {
        fprintf(f, "%s%s", n ? sep : "", s);
        free(s);
    }
    fputs(close, f);
    fclose(f);
    put(name, all);
    free(all);
}

/* A file of the strings given (NULL-terminated; freed). */
static void put_joined(const char *name, ...)
{
    va_list ap;
    va_start(ap, name);
    put_list(name, "", "", "", ap);
    va_end(ap);
}

/* A JWKS of the JWKs given (NULL-terminated; freed). */
static void put_jwks(const char *name, ...)
{
    va_list ap;
    va_start(ap, name);
    put_list(name, "{\"keys\": [\n", ",\n", "]}\n", ap);
    va_end(ap);
}

/* ---- policies ---------------------------------------------------------------- */

static struct hub_config cfg;
static struct hub_policy_host host;

static void setup(void)
{
    hub_log_set_level(HUB_LOG_ERROR);
    hub_config_defaults(&cfg);
    host = (struct hub_policy_host){.cfg = &cfg};
}

static void teardown(void)
{
    hub_config_free(&cfg);
}

/* Writes dir/policy.lua and dir/luahub.conf (the policy plus `conf`
 * lines) and loads the conf, which must be valid. */
static void prepare(const char *conf, const char *lua)
{
    struct hub_config_errors errs = {0};
    char text[2048];
    put("policy.lua", lua);
    snprintf(text, sizeof text, "policy = \"policy.lua\"\n%s", conf ? conf : "");
    put("luahub.conf", text);
    hub_config_free(&cfg);
    hub_config_defaults(&cfg);
    int rc = hub_config_load(&cfg, in_dir("luahub.conf"), &errs);
    ck_assert_msg(rc == 0, "conf: %s", errs.n ? errs.v[0] : "?");
}

/* The policy, which must build. */
static struct hub_policy *build(const char *conf, const char *lua)
{
    struct hub_config_errors errs = {0};
    prepare(conf, lua);
    struct hub_policy *p = hub_policy_new(&host, &errs);
    ck_assert_msg(p != NULL, "policy: %s", errs.n ? errs.v[0] : "?");
    return p;
}

/* --check of the policy: returns 0 or -1; every error and warning joined
 * by newlines in `out` (new string). */
static int check(const char *conf, const char *lua, char **out, unsigned *nwarn)
{
    struct hub_config_errors errs = {0}, warns = {0};
    prepare(conf, lua);
    int rc = hub_policy_check(&cfg, &errs, &warns);
    size_t len = 0;
    FILE *f = open_memstream(out, &len);
    for (unsigned i = 0; i < errs.n; i++)
        fprintf(f, "%s\n", errs.v[i]);
    for (unsigned i = 0; i < warns.n; i++)
        fprintf(f, "%s\n", warns.v[i]);
    fclose(f);
    if (nwarn)
        *nwarn = warns.n;
    hub_config_errors_free(&errs);
    hub_config_errors_free(&warns);
    return rc;
}

static void expect_in(const char *text, const char *want)
{
    ck_assert_msg(strstr(text, want) != NULL, "expected \"%s\" in:\n%s", want, text);
}

/* Calls the policy's global function `fn` with the string `arg`; returns
 * its string result, or "raise:<message>" (a static buffer). */
static const char *call(struct hub_policy *p, const char *fn, const char *arg)
{
    static char out[1024];
    lua_State *L = p->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_env);
    lua_pushstring(L, fn);
    lua_rawget(L, -2);
    lua_remove(L, -2);
    lua_pushstring(L, arg);
    int st = hub_policy_call(p, HUB_PHASE_TIMER, 1, 1);
    if (st != LUA_OK) {
        struct hub_buf b = {0};
        hub_policy_describe_failure(p, st, "?", &b);
        snprintf(out, sizeof out, "raise:%s", b.p);
        hub_buf_free(&b);
    } else {
        snprintf(out, sizeof out, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "(nil)");
    }
    lua_settop(L, HUB_LUA_BASE);
    return out;
}

/* A policy whose check(token) is hub.jwt_verify(token, OPTS). */
static struct hub_policy *verifier(const char *conf, const char *opts)
{
    char lua[1024];
    snprintf(lua, sizeof lua,
             "function check(t)\n"
             "  local c, why = hub.jwt_verify(t%s%s)\n"
             "  if c then return 'ok:' .. tostring(c.sub) end\n"
             "  return 'no:' .. why\n"
             "end\n", opts ? ", " : "", opts ? opts : "");
    return build(conf, lua);
}

static char *payload(const char *sub, long exp_in, const char *more)
{
    char *s = malloc(512);
    snprintf(s, 512, "{\"sub\":\"%s\",\"exp\":%ld%s}", sub, (long)time(NULL) + exp_in,
             more ? more : "");
    return s;
}

/* A token of `sub` (valid an hour) signed as `how` with `k`, header
 * {"alg": alg[, "kid": kid]}. */
static char *token(const char *alg, const char *kid, const char *how, EVP_PKEY *k,
                   const char *sub)
{
    char header[256];
    if (kid)
        snprintf(header, sizeof header, "{\"alg\":\"%s\",\"typ\":\"JWT\",\"kid\":\"%s\"}", alg,
                 kid);
    else
        snprintf(header, sizeof header, "{\"alg\":\"%s\",\"typ\":\"JWT\"}", alg);
    char *pl = payload(sub, 3600, NULL);
    char *t = jt_token(header, pl, how, k, NULL, 0);
    free(pl);
    return t;
}

/* check(token) must answer `want`; frees the token. */
static void expect_verify(struct hub_policy *p, char *tok, const char *want)
{
    const char *got = call(p, "check", tok);
    ck_assert_msg(!strcmp(got, want), "expected \"%s\", got \"%s\"", want, got);
    free(tok);
}

static const char *JWKS_CONF = "jwt_keys = \"keys.jwks\"\n";

/* The usual key file: RSA key rsa-a and EC key ec-a. */
static void put_ab(void)
{
    put_jwks("keys.jwks", jt_jwk(rsa_a, "rsa-a", ",\"alg\":\"RS256\",\"use\":\"sig\""),
             jt_jwk(ec_a, "ec-a", NULL), NULL);
}

/* ---- hub.jwt_verify with keys ---------------------------------------------- */

START_TEST(jwt_rs256_and_es256_from_jwks)
{
    put_ab();
    struct hub_policy *p = verifier(JWKS_CONF, NULL);
    expect_verify(p, token("RS256", "rsa-a", "RS256", rsa_a, "alice"), "ok:alice");
    expect_verify(p, token("ES256", "ec-a", "ES256", ec_a, "bob"), "ok:bob");
    /* without a kid: the keys of the token's alg are tried */
    expect_verify(p, token("RS256", NULL, "RS256", rsa_a, "carol"), "ok:carol");
    expect_verify(p, token("ES256", NULL, "ES256", ec_a, "dave"), "ok:dave");
    hub_policy_free(p);
}
END_TEST

START_TEST(jwt_pem_public_key_and_certificate)
{
    put_joined("keys.pem", jt_pem_public(rsa_a), jt_pem_cert(ec_a), NULL);
    struct hub_policy *p = verifier("jwt_keys = { \"keys.pem\" }\n", "{leeway = 5}");
    expect_verify(p, token("RS256", NULL, "RS256", rsa_a, "alice"), "ok:alice");
    expect_verify(p, token("ES256", NULL, "ES256", ec_a, "bob"), "ok:bob");
    /* PEM keys have no kid: a token's kid that no key has falls back on them */
    expect_verify(p, token("RS256", "some-kid", "RS256", rsa_a, "carol"), "ok:carol");
    expect_verify(p, token("RS256", NULL, "RS256", rsa_b, "mallory"), "no:bad signature");
    hub_policy_free(p);
}
END_TEST

START_TEST(jwt_unknown_kid)
{
    put_ab();
    struct hub_policy *p = verifier(JWKS_CONF, NULL);
    expect_verify(p, token("RS256", "rsa-z", "RS256", rsa_a, "alice"), "no:unknown kid 'rsa-z'");
    /* a kid that is not a string */
    char *pl = payload("alice", 3600, NULL);
    expect_verify(p, jt_token("{\"alg\":\"RS256\",\"kid\":7}", pl, "RS256", rsa_a, NULL, 0),
                  "no:malformed token: kid is not a string of at most 256 bytes");
    free(pl);
    hub_policy_free(p);
}
END_TEST

START_TEST(jwt_signed_with_another_key)
{
    put_ab();
    struct hub_policy *p = verifier(JWKS_CONF, NULL);
    /* the right kid, the wrong key */
    expect_verify(p, token("RS256", "rsa-a", "RS256", rsa_b, "mallory"), "no:bad signature");
    expect_verify(p, token("ES256", "ec-a", "ES256", ec_b, "mallory"), "no:bad signature");
    expect_verify(p, token("RS256", NULL, "RS256", rsa_b, "mallory"), "no:bad signature");
    /* alice's signature on mallory's claims */
    char *good = token("RS256", "rsa-a", "RS256", rsa_a, "alice");
    char *evil = token("RS256", "rsa-a", "RS256", rsa_a, "mallory");
    char *forged = malloc(strlen(good) + strlen(evil));
    sprintf(forged, "%.*s%s", (int)(strrchr(evil, '.') - evil), evil, strrchr(good, '.'));
    expect_verify(p, forged, "no:bad signature");
    free(good);
    free(evil);
    hub_policy_free(p);
}
END_TEST

START_TEST(jwt_malformed_signature)
{
    put_ab();
    struct hub_policy *p = verifier(JWKS_CONF, NULL);
    char *good = token("RS256", "rsa-a", "RS256", rsa_a, "alice");
    char *dot = strrchr(good, '.');
    char *t = malloc(strlen(good) + 8);
    /* not base64url */
    sprintf(t, "%.*s.!!!!", (int)(dot - good), good);
    expect_verify(p, strdup(t), "no:malformed token: the signature is not base64url");
    /* 3 bytes where the modulus is 256 */
    sprintf(t, "%.*s.YWJj", (int)(dot - good), good);
    expect_verify(p, strdup(t), "no:bad signature");
    /* empty */
    sprintf(t, "%.*s.", (int)(dot - good), good);
    expect_verify(p, strdup(t), "no:bad signature");
    /* a non-canonical last character (bits left over) */
    strcpy(t, good);
    t[strlen(t) - 1] = t[strlen(t) - 1] == 'B' ? 'C' : 'B';
    const char *got = call(p, "check", t);
    ck_assert_msg(!strncmp(got, "no:", 3), "got %s", got);
    expect_verify(p, token("ES256", "ec-a", "ES256", ec_a, "bob"), "ok:bob");
    free(t);
    free(good);
    hub_policy_free(p);
}
END_TEST

START_TEST(jwt_es256_der_signature_refused)
{
    put_ab();
    struct hub_policy *p = verifier(JWKS_CONF, NULL);
    /* the same key and claims: DER form refused, JOSE r || s accepted */
    char *der = token("ES256", "ec-a", "ES256-DER", ec_a, "bob");
    const char *got = call(p, "check", der);
    ck_assert_msg(strstr(got, "no:bad signature: an ES256 signature is 64 bytes, r || s") &&
                  strstr(got, "(DER?)"), "got %s", got);
    free(der);
    expect_verify(p, token("ES256", "ec-a", "ES256", ec_a, "bob"), "ok:bob");
    hub_policy_free(p);
}
END_TEST

START_TEST(jwt_alg_none_refused)
{
    put_ab();
    struct hub_policy *p = verifier(JWKS_CONF, NULL);
    expect_verify(p, token("none", NULL, "none", NULL, "alice"),
                  "no:unsupported alg 'none': unsigned tokens are refused");
    expect_verify(p, token("none", "rsa-a", "none", NULL, "alice"),
                  "no:unsupported alg 'none': unsigned tokens are refused");
    /* with a secret too */
    char *secret = jt_secret();
    char opts[128];
    snprintf(opts, sizeof opts, "'%s'", secret);
    struct hub_policy *q = verifier(NULL, opts);
    expect_verify(q, token("none", NULL, "none", NULL, "alice"),
                  "no:unsupported alg 'none': unsigned tokens are refused");
    hub_policy_free(q);
    free(secret);
    hub_policy_free(p);
}
END_TEST

START_TEST(jwt_algorithm_confusion_refused)
{
    put_ab();
    struct hub_policy *p = verifier(JWKS_CONF, NULL);
    /* HS256 with the RSA public key (its PEM text, its JWK) as the HMAC
     * secret: the classic confusion. The keys never verify HS256. */
    char *pem = jt_pem_public(rsa_a), *jwk = jt_jwk(rsa_a, "rsa-a", NULL);
    const char *secrets[] = {pem, jwk};
    for (int i = 0; i < 2; i++) {
        char *pl = payload("mallory", 3600, NULL);
        expect_verify(p, jt_token("{\"alg\":\"HS256\",\"kid\":\"rsa-a\"}", pl, "HS256", NULL,
                                  secrets[i], strlen(secrets[i])),
                      "no:unsupported alg 'HS256' (jwt_keys verify RS256 and ES256 only; an "
                      "HS256 token needs the secret)");
        free(pl);
    }
    /* an alg that does not match the key of its kid */
    expect_verify(p, token("ES256", "rsa-a", "ES256", ec_a, "mallory"),
                  "no:alg ES256 does not match the key of kid 'rsa-a' (RS256)");
    expect_verify(p, token("RS256", "ec-a", "RS256", rsa_a, "mallory"),
                  "no:alg RS256 does not match the key of kid 'ec-a' (ES256)");
    /* a secret verifies HS256 only: an RS256 token given a secret */
    char opts[128];
    char *secret = jt_secret();
    snprintf(opts, sizeof opts, "{secret = '%s'}", secret);
    struct hub_policy *q = verifier(JWKS_CONF, opts);
    expect_verify(q, token("RS256", "rsa-a", "RS256", rsa_a, "alice"),
                  "no:unsupported alg 'RS256' (a secret verifies HS256 only: RS256 and ES256 "
                  "tokens are verified with jwt_keys)");
    hub_policy_free(q);
    free(secret);
    free(pem);
    free(jwk);
    hub_policy_free(p);
}
END_TEST

START_TEST(jwt_claims_with_leeway_aud_and_iss)
{
    put_ab();
    struct hub_policy *p = build(JWKS_CONF,
        "function check(t)\n"
        "  local opts = hub.json.decode(t:match('^([^ ]*) '))\n"
        "  local c, why = hub.jwt_verify(t:match(' (.*)$'), opts)\n"
        "  return c and ('ok:' .. c.sub) or ('no:' .. why)\n"
        "end\n");
    long now = (long)time(NULL);
    static const struct {
        const char *opts, *claims, *want;
        long exp, nbf, iat; /* relative to now; 0: absent */
    } cases[] = {
        {"{}", "", "ok:x", 3600, 0, 0},
        {"{}", "", "no:token expired", -10, 0, 0},
        {"{\"leeway\":30}", "", "ok:x", -10, 0, 0},
        {"{}", "", "no:token not valid yet (nbf)", 3600, 100, 0},
        {"{\"leeway\":200}", "", "ok:x", 3600, 100, 0},
        {"{}", "", "no:token issued in the future (iat)", 3600, 0, 100},
        {"{\"leeway\":200}", "", "ok:x", 3600, 0, 100},
        {"{}", "", "ok:x", 3600, 0, -100},
        {"{}", ",\"iat\":\"yesterday\"", "no:claim iat is not a number", 3600, 0, 0},
        {"{\"aud\":\"hub\"}", ",\"aud\":\"hub\"", "ok:x", 3600, 0, 0},
        {"{\"aud\":\"hub\"}", ",\"aud\":[\"web\",\"hub\"]", "ok:x", 3600, 0, 0},
        {"{\"aud\":[\"a\",\"hub\"]}", ",\"aud\":\"hub\"", "ok:x", 3600, 0, 0},
        {"{\"aud\":\"hub\"}", ",\"aud\":\"web\"", "no:audience 'web' is not accepted", 3600, 0, 0},
        {"{\"aud\":\"hub\"}", ",\"aud\":[\"web\"]", "no:no audience of the token is accepted", 3600, 0, 0},
        {"{\"aud\":\"hub\"}", "", "no:claim aud is missing", 3600, 0, 0},
        {"{\"aud\":\"hub\"}", ",\"aud\":[1]", "no:claim aud is not a string or a list of strings", 3600, 0, 0},
        {"{\"aud\":\"hub\"}", ",\"aud\":{}", "no:claim aud is not a string or a list of strings", 3600, 0, 0},
        {"{}", ",\"aud\":\"web\"", "ok:x", 3600, 0, 0},
        {"{\"iss\":\"idp\"}", ",\"iss\":\"idp\"", "ok:x", 3600, 0, 0},
        {"{\"iss\":[\"a\",\"idp\"]}", ",\"iss\":\"idp\"", "ok:x", 3600, 0, 0},
        {"{\"iss\":\"idp\"}", ",\"iss\":\"evil\"", "no:issuer 'evil' is not accepted", 3600, 0, 0},
        {"{\"iss\":\"idp\"}", "", "no:claim iss is missing", 3600, 0, 0},
        {"{\"iss\":\"idp\"}", ",\"iss\":[\"idp\"]", "no:claim iss is not a string", 3600, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char pl[512], more[256] = "";
        size_t m = 0;
        if (cases[i].nbf)
            m += (size_t)snprintf(more + m, sizeof more - m, ",\"nbf\":%ld", now + cases[i].nbf);
        if (cases[i].iat)
            m += (size_t)snprintf(more + m, sizeof more - m, ",\"iat\":%ld", now + cases[i].iat);
        snprintf(pl, sizeof pl, "{\"sub\":\"x\",\"exp\":%ld%s%s}", now + cases[i].exp, more,
                 cases[i].claims);
        char *t = jt_token("{\"alg\":\"ES256\",\"kid\":\"ec-a\"}", pl, "ES256", ec_a, NULL, 0);
        char *arg = malloc(strlen(t) + strlen(cases[i].opts) + 2);
        sprintf(arg, "%s %s", cases[i].opts, t);
        const char *got = call(p, "check", arg);
        ck_assert_msg(!strcmp(got, cases[i].want), "case %zu (%s %s): expected \"%s\", got \"%s\"",
                      i, cases[i].opts, pl, cases[i].want, got);
        free(arg);
        free(t);
    }
    hub_policy_free(p);
}
END_TEST

/* Mistakes of the caller raise (the hook fails), not the token's. */
START_TEST(jwt_options_are_checked)
{
    put_ab();
    struct hub_policy *p = build(JWKS_CONF,
        "function check(what)\n"
        "  local t = 'a.b.c'\n"
        "  if what == 'typo' then hub.jwt_verify(t, {leway = 5}) end\n"
        "  if what == 'unknown' then hub.jwt_verify(t, {audience = 'x'}) end\n"
        "  if what == 'key' then hub.jwt_verify(t, {[1] = 'x'}) end\n"
        "  if what == 'leeway' then hub.jwt_verify(t, {leeway = 0/0}) end\n"
        "  if what == 'leeway2' then hub.jwt_verify(t, {leeway = '5'}) end\n"
        "  if what == 'aud' then hub.jwt_verify(t, {aud = 5}) end\n"
        "  if what == 'aud2' then hub.jwt_verify(t, {aud = {}}) end\n"
        "  if what == 'iss' then hub.jwt_verify(t, {iss = {'a', 3}}) end\n"
        "  if what == 'secret' then hub.jwt_verify(t, {secret = ''}) end\n"
        "  if what == 'arg' then hub.jwt_verify(t, 42) end\n"
        "  return 'no error'\n"
        "end\n");
    static const struct {
        const char *what, *want;
    } cases[] = {
        {"typo", "unknown option leway (did you mean leeway?) (options: secret, leeway, aud, "
                 "iss)"},
        {"unknown", "unknown option audience (options: secret, leeway, aud, iss)"},
        {"key", "unknown option number"},
        {"leeway", "leeway must be 0 to 31622400 seconds"},
        {"leeway2", "option leeway must be a number"},
        {"aud", "option aud must be a string or a list of 1 to 64 strings"},
        {"aud2", "option aud must be a string or a list of 1 to 64 strings"},
        {"iss", "option iss must be a string or a list of 1 to 64 strings"},
        {"secret", "the secret is empty"},
        {"arg", "argument 2 must be the secret (a string) or a table of options (got number)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *got = call(p, "check", cases[i].what);
        ck_assert_msg(!strncmp(got, "raise:", 6) && strstr(got, cases[i].want),
                      "%s: expected a raise with \"%s\", got \"%s\"", cases[i].what,
                      cases[i].want, got);
    }
    hub_policy_free(p);

    /* no jwt_keys and no secret: nothing to verify with */
    p = verifier(NULL, "{aud = 'x'}");
    const char *got = call(p, "check", "a.b.c");
    expect_in(got, "raise:");
    expect_in(got, "hub.jwt_verify: no key to verify with: pass the secret (HS256), or name "
                   "the issuer's public keys in the conf (jwt_keys)");
    hub_policy_free(p);
}
END_TEST

/* The HS256 forms: (token, secret[, leeway]) as before, and {secret = }. */
START_TEST(jwt_secret_forms)
{
    char *secret = jt_secret(), lua[512];
    char *pl = payload("alice", -10, NULL);
    char *tok = jt_token("{\"alg\":\"HS256\"}", pl, "HS256", NULL, secret, strlen(secret));
    put_ab();
    snprintf(lua, sizeof lua,
             "function check(t)\n"
             "  local a = hub.jwt_verify(t, '%s', 30)\n"
             "  local b, why = hub.jwt_verify(t, '%s')\n"
             "  local c = hub.jwt_verify(t, {secret = '%s', leeway = 30})\n"
             "  return a.sub .. ' ' .. why .. ' ' .. c.sub\n"
             "end\n", secret, secret, secret);
    struct hub_policy *p = build(JWKS_CONF, lua);
    ck_assert_str_eq(call(p, "check", tok), "alice token expired alice");
    hub_policy_free(p);
    free(tok);
    free(pl);
    free(secret);
}
END_TEST

/* ---- jwt_keys files ---------------------------------------------------------- */

/* Builds with `conf` and must fail with an error containing `want`. */
static void expect_keys_error(const char *conf, const char *want)
{
    char *out;
    ck_assert_int_eq(check(conf, "-- no hook\n", &out, NULL), -1);
    expect_in(out, want);
    free(out);
}

START_TEST(jwt_keys_rsa_under_2048_bits)
{
    put_jwks("keys.jwks", jt_jwk(ec_a, "ec-a", NULL), jt_jwk(rsa_small, "small", NULL), NULL);
    char want[512];
    snprintf(want, sizeof want, "%s: key 2 (kid 'small'): an RSA key of 1024 bits: RS256 keys "
             "must have at least 2048 bits", in_dir("keys.jwks"));
    expect_keys_error(JWKS_CONF, want);
    put_joined("small.pem", jt_pem_public(rsa_small), NULL);
    snprintf(want, sizeof want, "%s: PEM block 1 (PUBLIC KEY): an RSA key of 1024 bits",
             in_dir("small.pem"));
    expect_keys_error("jwt_keys = \"small.pem\"\n", want);
}
END_TEST

START_TEST(jwt_keys_bad_key_in_jwks)
{
    char want[512];
    /* n that is not base64url */
    put("keys.jwks", "{\"keys\": [{\"kty\":\"RSA\",\"kid\":\"k1\",\"n\":\"ab+/\",\"e\":\"AQAB\"}]}");
    snprintf(want, sizeof want, "%s: key 1 (kid 'k1'): 'n' is not base64url", in_dir("keys.jwks"));
    expect_keys_error(JWKS_CONF, want);
    /* an EC point off the curve: the key of ec-a with y changed */
    char *jwk = jt_jwk(ec_a, "k2", NULL), *y = strstr(jwk, "\"y\":\"") + 5;
    y[3] = y[3] == 'A' ? 'B' : 'A';
    put_jwks("keys.jwks", jwk, NULL);
    snprintf(want, sizeof want, "%s: key 1 (kid 'k2'): not a valid P-256 public key",
             in_dir("keys.jwks"));
    expect_keys_error(JWKS_CONF, want);
    /* no kty; private material; a kid twice; not JSON */
    put("keys.jwks", "{\"keys\": [{\"n\":\"AQAB\"}]}");
    expect_keys_error(JWKS_CONF, "key 1: 'kty' is missing or not a string");
    put("keys.jwks", "{\"keys\": [{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AA\",\"y\":\"AA\","
                     "\"d\":\"AA\"}]}");
    expect_keys_error(JWKS_CONF, "key 1: holds private or secret key material");
    put_jwks("keys.jwks", jt_jwk(rsa_a, "same", NULL), jt_jwk(rsa_b, "same", NULL), NULL);
    snprintf(want, sizeof want, "%s: key 2 (kid 'same'): its kid is also the kid of %s: key 1 "
             "(kid 'same')", in_dir("keys.jwks"), in_dir("keys.jwks"));
    expect_keys_error(JWKS_CONF, want);
    put("keys.jwks", "{\"keys\": [");
    expect_keys_error(JWKS_CONF, "keys.jwks: not valid JSON");
    put("keys.jwks", "{\"keys\": []}");
    expect_keys_error(JWKS_CONF, "keys.jwks: the JWKS has no key");
    put("keys.jwks", "hello\n");
    expect_keys_error(JWKS_CONF, "keys.jwks: neither a JWKS (a JSON object) nor PEM");
    /* a private key in PEM */
    put_joined("keys.jwks", jt_pem_private(rsa_a), NULL);
    expect_keys_error(JWKS_CONF, "keys.jwks: PEM block 1 (PRIVATE KEY): a private key");
    /* a P-384 key in PEM: not ES256 */
    put_joined("keys.jwks", jt_pem_public(ec_384), NULL);
    expect_keys_error(JWKS_CONF, "an EC key on curve secp384r1: ES256 needs P-256");
    /* a broken PEM block after a good one */
    put_joined("keys.jwks", jt_pem_public(rsa_a),
               strdup("-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n"), NULL);
    expect_keys_error(JWKS_CONF, "keys.jwks: PEM block 2: cannot be read");
}
END_TEST

/* Keys of a kind hub.jwt_verify does not use are skipped with a warning:
 * an identity provider's JWKS is used as it is. */
START_TEST(jwt_keys_other_kinds_skipped)
{
    put_jwks("keys.jwks", strdup("{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"AA\",\"kid\":\"ed\"}"),
             jt_jwk(rsa_b, "enc", ",\"use\":\"enc\",\"alg\":\"RSA-OAEP\""),
             jt_jwk(ec_384, "p384", NULL), jt_jwk(rsa_b, "ps", ",\"alg\":\"PS256\""),
             jt_jwk(rsa_a, "rsa-a", NULL), NULL);
    char *out;
    unsigned nwarn;
    ck_assert_int_eq(check(JWKS_CONF, "-- no hook\n", &out, &nwarn), 0);
    ck_assert_int_eq(nwarn, 4);
    expect_in(out, "key 1 (kid 'ed'): skipped: \"kty\": \"OKP\"");
    expect_in(out, "key 2 (kid 'enc'): skipped: \"use\": \"enc\"");
    expect_in(out, "key 3 (kid 'p384'): skipped: \"crv\": \"P-384\"");
    expect_in(out, "key 4 (kid 'ps'): skipped: \"alg\": \"PS256\"");
    free(out);
    struct hub_policy *p = verifier(JWKS_CONF, NULL);
    expect_verify(p, token("RS256", "rsa-a", "RS256", rsa_a, "alice"), "ok:alice");
    expect_verify(p, token("RS256", "enc", "RS256", rsa_b, "mallory"), "no:unknown kid 'enc'");
    hub_policy_free(p);
    /* nothing usable at all is an error */
    put_jwks("keys.jwks", jt_jwk(ec_384, "p384", NULL), NULL);
    expect_keys_error(JWKS_CONF, "jwt_keys: no key that hub.jwt_verify can use in the files");
}
END_TEST

/* The keys are read when the policy is built, never per call. */
START_TEST(jwt_keys_read_at_load_only)
{
    put_ab();
    struct hub_policy *p = verifier(JWKS_CONF, NULL);
    ck_assert_int_eq(unlink(in_dir("keys.jwks")), 0);
    expect_verify(p, token("RS256", "rsa-a", "RS256", rsa_a, "alice"), "ok:alice");
    hub_policy_free(p);
}
END_TEST

/* ---- require ------------------------------------------------------------------- */

static int dir_made;

static void put_module(const char *name, const char *text)
{
    if (!dir_made++) {
        char sub[600];
        snprintf(sub, sizeof sub, "mkdir -p '%s/lib' '%s/mods/lib'", dir, dir);
        ck_assert_int_eq(system(sub), 0);
    }
    put(name, text);
}

START_TEST(require_loads_once_and_caches)
{
    put_module("counter.lua", "loads = (rawget(_G, 'loads') or 0) + 1\n"
                              "local M = {n = loads}\nfunction M.twice(x) return 2 * x end\n"
                              "return M\n");
    put_module("lib/util.lua", "return {name = ...}\n");
    put_module("nothing.lua", "local x = 1\n");
    struct hub_policy *p = build(NULL,
        "local c = require('counter')\n"
        "assert(require('counter') == c)\n"
        "local u = require('lib.util')\n"
        "function check(what)\n"
        "  if what == 'again' then return tostring(require('counter') == c) end\n"
        "  if what == 'nothing' then return tostring(require('nothing')) end\n"
        "  return c.n .. ' ' .. c.twice(21) .. ' ' .. u.name .. ' ' .. loads\n"
        "end\n"
        "require('nothing')\n");
    ck_assert_str_eq(call(p, "check", "x"), "1 42 lib.util 1");
    ck_assert_str_eq(call(p, "check", "again"), "true");
    ck_assert_str_eq(call(p, "check", "nothing"), "true");
    hub_policy_free(p);
}
END_TEST

START_TEST(require_missing_module)
{
    char *out, want[600];
    ck_assert_int_eq(check(NULL, "local x = 1\nrequire('absent')\n", &out, NULL), -1);
    snprintf(want, sizeof want, "%s:2: require('absent'): cannot read %s: No such file or "
             "directory", in_dir("policy.lua"), in_dir("absent.lua"));
    expect_in(out, want);
    free(out);
}
END_TEST

START_TEST(require_refuses_names_that_are_not_module_names)
{
    static const char *const names[] = {
        "../x", "/etc/passwd", "a/b", ".x", "x.", "a..b", "", "x.lua/..", "-x", "a b",
        "x\\0y",
    };
    put_module("x.lua", "return 1\n");
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char lua[256], *out;
        snprintf(lua, sizeof lua, "require('%s')\n", names[i]);
        ck_assert_int_eq(check(NULL, lua, &out, NULL), -1);
        ck_assert_msg(strstr(out, "not a module name") != NULL, "%s: %s", names[i], out);
        free(out);
    }
}
END_TEST

START_TEST(require_of_itself_is_a_cycle)
{
    char *out, want[600];
    ck_assert_int_eq(check(NULL, "local x = 1\nrequire('policy')\n", &out, NULL), -1);
    snprintf(want, sizeof want, "%s:2: require('policy'): a cycle: policy -> policy (it is the "
             "policy file itself)", in_dir("policy.lua"));
    expect_in(out, want);
    free(out);
    /* a -> b -> a, and a module requiring itself */
    put_module("a.lua", "return require('b')\n");
    put_module("b.lua", "local x = 1\nreturn require('a')\n");
    put_module("selfish.lua", "return require('selfish')\n");
    ck_assert_int_eq(check(NULL, "require('a')\n", &out, NULL), -1);
    snprintf(want, sizeof want, "%s:2: require('a'): a cycle: policy -> a -> b -> a",
             in_dir("b.lua"));
    expect_in(out, want);
    free(out);
    ck_assert_int_eq(check(NULL, "require('selfish')\n", &out, NULL), -1);
    expect_in(out, "require('selfish'): a cycle: policy -> selfish -> selfish");
    free(out);
}
END_TEST

START_TEST(require_module_with_a_syntax_error)
{
    char *out, want[600];
    put_module("broken.lua", "local t = {}\n\nlocal x = = 1\n");
    ck_assert_int_eq(check(NULL, "require('broken')\n", &out, NULL), -1);
    snprintf(want, sizeof want, "%s:3: unexpected symbol near '='", in_dir("broken.lua"));
    expect_in(out, want);
    free(out);
    /* a path longer than Lua's chunk names (60 bytes): the full path still */
    static const char *const longname = "a_module_with_a_name_long_enough_to_be_shortened_by_lua";
    char lua[200], file[200];
    snprintf(file, sizeof file, "%s.lua", longname);
    put_module(file, "local t = {}\n\nlocal x = = 1\n");
    snprintf(lua, sizeof lua, "require('%s')\n", longname);
    ck_assert_int_eq(check(NULL, lua, &out, NULL), -1);
    snprintf(want, sizeof want, "%s:3: unexpected symbol near '='", in_dir(file));
    ck_assert_int_gt(strlen(in_dir(file)), 60);
    expect_in(out, want);
    free(out);
    /* an error when it runs, and a runaway loop: its file and line too */
    put_module("raises.lua", "local x = 1\nerror('not today')\n");
    ck_assert_int_eq(check(NULL, "require('raises')\n", &out, NULL), -1);
    snprintf(want, sizeof want, "%s:2: not today", in_dir("raises.lua"));
    expect_in(out, want);
    free(out);
    put_module("spins.lua", "local x = 1\n\nwhile true do end\n");
    ck_assert_int_eq(check("lua_max_instructions = 100000\n", "require('spins')\n", &out, NULL),
                     -1);
    snprintf(want, sizeof want, "%s:3: instruction limit exceeded", in_dir("spins.lua"));
    expect_in(out, want);
    free(out);
    /* a failed require caught by pcall is not cached: it fails again */
    struct hub_policy *p = build(NULL,
        "local ok1, e1 = pcall(require, 'raises')\n"
        "local ok2, e2 = pcall(require, 'raises')\n"
        "function check() return tostring(ok1) .. tostring(ok2) .. tostring(e2 == e1) end\n");
    ck_assert_str_eq(call(p, "check", ""), "falsefalsetrue");
    hub_policy_free(p);
}
END_TEST

START_TEST(require_only_while_the_policy_loads)
{
    put_module("early.lua", "return {v = 'early'}\n");
    put_module("late.lua", "return {v = 'late'}\n");
    struct hub_policy *p = build(NULL,
        "require('early')\n"
        "function check(name) return require(name).v end\n");
    ck_assert_str_eq(call(p, "check", "early"), "early");
    const char *got = call(p, "check", "late");
    expect_in(got, "raise:");
    expect_in(got, "require('late'): modules are loaded while the policy loads");
    hub_policy_free(p);
}
END_TEST

START_TEST(require_from_policy_path)
{
    put_module("mods/lib/m.lua", "return 'from mods'\n");
    put_module("lib/m.lua", "return 'next to the policy'\n");
    struct hub_policy *p = build("policy_path = \"mods\"\n",
        "local m = require('lib.m')\nfunction check() return m end\n");
    ck_assert_str_eq(call(p, "check", ""), "from mods");
    hub_policy_free(p);
    p = build(NULL, "local m = require('lib.m')\nfunction check() return m end\n");
    ck_assert_str_eq(call(p, "check", ""), "next to the policy");
    hub_policy_free(p);
    /* the built-in policy has no module directory */
    hub_config_free(&cfg);
    hub_config_defaults(&cfg);
    struct hub_config_errors errs = {0};
    ck_assert_int_eq(hub_policy_check(&cfg, &errs, NULL), 0);
    hub_config_errors_free(&errs);
}
END_TEST

/* ---- warnings ------------------------------------------------------------------- */

/* --check of `lua` must pass with exactly these warnings (NULL-terminated,
 * "LINE: text" each, in order). */
static void expect_warnings(const char *conf, const char *lua, ...)
{
    char *out;
    unsigned n, want_n = 0;
    va_list ap;
    ck_assert_msg(check(conf, lua, &out, &n) == 0, "%s", out);
    va_start(ap, lua);
    const char *at = out;
    for (const char *w; (w = va_arg(ap, const char *)); want_n++) {
        char want[600];
        snprintf(want, sizeof want, "%s:%s", in_dir("policy.lua"), w);
        const char *found = strstr(at, want);
        ck_assert_msg(found != NULL, "expected \"%s\" (in order) in:\n%s", want, out);
        at = found + strlen(want);
    }
    va_end(ap);
    ck_assert_msg(n == want_n, "expected %u warnings, got %u:\n%s", want_n, n, out);
    free(out);
}

START_TEST(warn_misspelled_hook)
{
    expect_warnings(NULL,
        "function on_conect(conn, req) return false end\n"
        "function on_publsh(conn, ch, msg) return true end\n"
        "function on_helper() end\n"
        "on_data = 5\n"
        "function on_rpc(conn, method, data) return on_data end\n",
        "1: warning: function 'on_conect' is not a hook and will never be called (did you "
        "mean 'on_connect'?)",
        "2: warning: function 'on_publsh' is not a hook and will never be called (did you "
        "mean 'on_publish'?)",
        "3: warning: function 'on_helper' is not a hook and will never be called (hooks: "
        "on_connect, on_subscribe, on_unsubscribe, on_publish, on_rpc, on_disconnect)",
        NULL);
}
END_TEST

START_TEST(warn_hook_parameters)
{
    expect_warnings(NULL,
        "function on_publish(conn, channel, msg, extra) return true end\n"
        "function on_subscribe(channel) return true end\n"
        "function on_rpc(conn, data, method) return 1 end\n"
        "function on_connect(c, r) return true end\n"
        "function on_disconnect() end\n"
        "function on_unsubscribe(conn, ...) end\n",
        "1: warning: on_publish takes 4 parameters but the hub passes 3, on_publish(conn, "
        "channel, msg): 'extra' is always nil",
        "2: warning: parameter 1 of on_subscribe is named 'channel' but the hub passes conn "
        "there, on_subscribe(conn, channel): a parameter missing?",
        "3: warning: parameter 2 of on_rpc is named 'data' but the hub passes method there",
        NULL);
}
END_TEST

START_TEST(warn_globals)
{
    put_module("helpers.lua", "function shout(s) return s:upper() .. suffix end\n"
                              "local M = {}\nfunction M.limit() return limit end\nreturn M\n");
    expect_warnings(NULL,
        "local helpers = require('helpers')\n"
        "secert = 'x'\n"                                   /* 2: a typo, unused */
        "suffix = '!'\n"                                   /* used by shout, via a hook */
        "limit = 5\n"                                      /* used by M.limit, an upvalue */
        "ticks = 0\n"                                      /* used by a timer */
        "counter = 0\n"                                    /* written by a hook */
        "dyn = 1\n"                                        /* read through _G */
        "setup_only = 1\n"                                 /* 8: read at load only */
        "local x = setup_only\n"
        "local handlers = {}\n"
        "function handlers.go() return secret end\n"       /* 11: never assigned */
        "function on_rpc(conn, method, data)\n"
        "  counter = counter + 1\n"
        "  if method == 'x' then return rawget(_G, 'dyn') end\n"
        "  return shout(handlers[method]()) .. helpers.limit()\n"
        "end\n"
        "hub.after(10, function() ticks = ticks + 1 end)\n"
        "function on_publish(conn, channel, msg) return late end\n" /* 18: declared below */
        "local late = true\n",
        "2: warning: global 'secert' is assigned while the policy loads but no hook or timer "
        "uses it (a typo? or make it local)",
        "8: warning: global 'setup_only' is assigned while the policy loads but no hook or "
        "timer uses it",
        "11: warning: global 'secret' is read here but nothing assigns it: reading it raises "
        "\"undeclared global\"",
        "18: warning: global 'late' is read here but nothing assigns it",
        NULL);
}
END_TEST

/* What the hub ships passes without a warning. */
START_TEST(warn_nothing_on_a_clean_policy)
{
    char *src = getenv("LUAHUB_SRC"), path[600], conf[700];
    ck_assert_ptr_nonnull(src);
    snprintf(path, sizeof path, "%s/examples/dashboard/policy.lua", src);
    snprintf(conf, sizeof conf, "policy = \"%s\"\n", path);
    put("luahub.conf", conf);
    struct hub_config_errors errs = {0}, warns = {0};
    hub_config_free(&cfg);
    hub_config_defaults(&cfg);
    ck_assert_int_eq(hub_config_load(&cfg, in_dir("luahub.conf"), &errs), 0);
    ck_assert_int_eq(hub_policy_check(&cfg, &errs, &warns), 0);
    ck_assert_msg(warns.n == 0, "%s", warns.v[0]);
    hub_config_free(&cfg);
    hub_config_defaults(&cfg);
    ck_assert_int_eq(hub_policy_check(&cfg, &errs, &warns), 0); /* the built-in policy */
    ck_assert_msg(warns.n == 0, "%s", warns.v[0]);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("policy_load");
    TCase *tc = tcase_create("load");
    tcase_add_unchecked_fixture(tc, make_keys, drop_keys);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, jwt_rs256_and_es256_from_jwks);
    tcase_add_test(tc, jwt_pem_public_key_and_certificate);
    tcase_add_test(tc, jwt_unknown_kid);
    tcase_add_test(tc, jwt_signed_with_another_key);
    tcase_add_test(tc, jwt_malformed_signature);
    tcase_add_test(tc, jwt_es256_der_signature_refused);
    tcase_add_test(tc, jwt_alg_none_refused);
    tcase_add_test(tc, jwt_algorithm_confusion_refused);
    tcase_add_test(tc, jwt_claims_with_leeway_aud_and_iss);
    tcase_add_test(tc, jwt_options_are_checked);
    tcase_add_test(tc, jwt_secret_forms);
    tcase_add_test(tc, jwt_keys_rsa_under_2048_bits);
    tcase_add_test(tc, jwt_keys_bad_key_in_jwks);
    tcase_add_test(tc, jwt_keys_other_kinds_skipped);
    tcase_add_test(tc, jwt_keys_read_at_load_only);
    tcase_add_test(tc, require_loads_once_and_caches);
    tcase_add_test(tc, require_missing_module);
    tcase_add_test(tc, require_refuses_names_that_are_not_module_names);
    tcase_add_test(tc, require_of_itself_is_a_cycle);
    tcase_add_test(tc, require_module_with_a_syntax_error);
    tcase_add_test(tc, require_only_while_the_policy_loads);
    tcase_add_test(tc, require_from_policy_path);
    tcase_add_test(tc, warn_misspelled_hook);
    tcase_add_test(tc, warn_hook_parameters);
    tcase_add_test(tc, warn_globals);
    tcase_add_test(tc, warn_nothing_on_a_clean_policy);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
