/* Integration suite: what the real binary reads from files beside its conf
 * and when (docs/config.md, "Reload"; docs/lua.md): `--check` warnings and
 * `--check --strict`, keys of hub.jwt_verify refused at start, and
 * SIGHUP / POST /api/reload applying the keys a reload may change (log
 * level, limits, budgets, the policy with its modules and jwt_keys) while
 * naming those that need a restart, and applying nothing when the new
 * policy fails.
 *
 * Keys and tokens are made at test time (tests/support/jwttest.c). Every
 * test stops its hub with SIGTERM and asserts exit status 0 (the ASan
 * build exits non-zero on a leak). */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hubtest.h"
#include "jwttest.h"

/* A temp dir of the test's own for the policy, modules and key files (the
 * hub's conf names them by absolute path). */
static char dir[64];

static void make_dir(void)
{
    jt_mkdir(dir, sizeof dir, "test_reload");
}

static void drop_dir(void)
{
    jt_rmdir(dir);
}

static const char *at(const char *name)
{
    return jt_path(dir, name);
}

static void expect_contains(const char *text, const char *needle)
{
    ck_assert_msg(strstr(text, needle) != NULL, "expected \"%s\" in:\n%s", needle, text);
}

/* The conf text: the policy at dir/policy.lua, then `more`. */
static char *conf_of(const char *more)
{
    return ht_asprintf("policy = \"%s\"\nshutdown_timeout = 2\n%s", at("policy.lua"),
                       more ? more : "");
}

static struct hub *start(const char *lua, const char *more)
{
    jt_write(at("policy.lua"), lua);
    char *conf = conf_of(more);
    struct hub *h = hub_start(conf);
    free(conf);
    return h;
}

/* Rewrites the running hub's conf. */
static void rewrite_conf(struct hub *h, const char *more)
{
    char *conf = conf_of(more);
    jt_write(h->conf_path, conf);
    free(conf);
}

/* SIGHUP, then waits until the log has `line` `n` times. */
static void sighup(struct hub *h, const char *line, int n)
{
    hub_signal(h, SIGHUP);
    int64_t deadline = ht_now_ms() + HT_WAIT_MS;
    while (hub_log_count(h, line) < n && ht_now_ms() < deadline)
        usleep(10000);
    ck_assert_msg(hub_log_count(h, line) == n, "\"%s\": %d times, not %d", line,
                  hub_log_count(h, line), n);
}

/* Sends an rpc and returns the reply's data as JSON text (new string);
 * the reply must be ok. */
static char *rpc(struct ws *c, const char *method)
{
    char req[256];
    snprintf(req, sizeof req, "{\"op\":\"rpc\",\"method\":\"%s\",\"id\":%lld}", method,
             c->next_id++);
    ws_send_text(c, req);
    yajl_val v = ws_recv_json(c);
    ck_assert_msg(YAJL_IS_TRUE(json_get(v, "ok")), "rpc %s failed", method);
    const char *s = json_get_str(v, "data");
    char *out = strdup(s ? s : "(not a string)");
    yajl_tree_free(v);
    return out;
}

static void rpc_is(struct ws *c, const char *method, const char *want)
{
    char *got = rpc(c, method);
    ck_assert_msg(!strcmp(got, want), "rpc %s: expected \"%s\", got \"%s\"", method, want, got);
    free(got);
}

/* ---- --check ------------------------------------------------------------- */

/* Runs `luahub -c CONF --check [--strict]` for `lua`; returns the status. */
static int run_check(const char *lua, int strict, char **out)
{
    jt_write(at("policy.lua"), lua);
    char *conf = conf_of(NULL);
    jt_write(at("luahub.conf"), conf);
    free(conf);
    const char *args[] = {"-c", at("luahub.conf"), "--check", strict ? "--strict" : NULL, NULL};
    return hub_run(args, out, HT_WAIT_MS);
}

/* Issue 14: a misspelled hook passed --check with "ok" and the hub ran
 * without it. Now --check warns (exit 0), --check --strict fails. */
START_TEST(check_warns_and_strict_fails)
{
    static const char *lua = "function on_conect(conn, req) return false, 'no', 401 end\n";
    char *out, want[512];
    snprintf(want, sizeof want, "%s:1: warning: function 'on_conect' is not a hook and will "
             "never be called (did you mean 'on_connect'?)", at("policy.lua"));
    ck_assert_int_eq(run_check(lua, 0, &out), 0);
    expect_contains(out, want);
    expect_contains(out, "luahub.conf: ok, 1 warning");
    free(out);
    ck_assert_int_eq(run_check(lua, 1, &out), 2);
    expect_contains(out, want);
    expect_contains(out, "1 warning (--strict makes them errors)");
    ck_assert_msg(!strstr(out, ": ok"), "%s", out);
    free(out);
    /* a clean policy passes --strict */
    ck_assert_int_eq(run_check("function on_connect(conn, req) return true end\n", 1, &out), 0);
    expect_contains(out, "luahub.conf: ok\n");
    free(out);
    /* --strict alone is a usage error */
    const char *args[] = {"-c", at("luahub.conf"), "--strict", NULL};
    ck_assert_int_eq(hub_run(args, &out, HT_WAIT_MS), 2);
    expect_contains(out, "--strict goes with --check");
    free(out);
}
END_TEST

/* ---- keys at start --------------------------------------------------------- */

START_TEST(start_refuses_a_small_rsa_key)
{
    EVP_PKEY *small = jt_rsa(1024);
    char *jwk = jt_jwk(small, "small", NULL), *jwks = ht_asprintf("{\"keys\":[%s]}", jwk);
    jt_write(at("keys.jwks"), jwks);
    jt_write(at("policy.lua"), "-- no hook\n");
    char *conf = ht_asprintf("policy = \"%s\"\njwt_keys = \"%s\"\nlisten = \"127.0.0.1:0\"\n",
                             at("policy.lua"), at("keys.jwks"));
    jt_write(at("luahub.conf"), conf);
    const char *args[] = {"-c", at("luahub.conf"), NULL};
    char *out, want[512];
    ck_assert_int_eq(hub_run(args, &out, HT_WAIT_MS), 2);
    snprintf(want, sizeof want, "%s: key 1 (kid 'small'): an RSA key of 1024 bits: RS256 keys "
             "must have at least 2048 bits", at("keys.jwks"));
    expect_contains(out, want);
    ck_assert_msg(!strstr(out, "listening on"), "must not listen:\n%s", out);
    free(out);
    /* --check says the same */
    const char *cargs[] = {"-c", at("luahub.conf"), "--check", NULL};
    ck_assert_int_eq(hub_run(cargs, &out, HT_WAIT_MS), 2);
    expect_contains(out, want);
    free(out);
    free(conf);
    free(jwks);
    free(jwk);
    EVP_PKEY_free(small);
}
END_TEST

/* ---- reload: live keys -------------------------------------------------------- */

/* Before, a reload whose conf changed log_level crashed the hub: the key
 * comparison read the int log_level as a string pointer. */
START_TEST(reload_applies_log_level)
{
    struct hub *h = start("function on_rpc() return 'up' end\n", "log_level = \"info\"\n");
    struct ws *c = ws_connect(h->port);
    rewrite_conf(h, "log_level = \"warn\"\nping_interval = 7\n");
    sighup(h, "reload: the conf file changed (ping_interval): a reload does not apply these "
              "keys; restart to apply them", 1);
    ck_assert_int_eq(hub_log_count(h, "reload: applied log_level"), 1);
    rpc_is(c, "x", "up");
    /* info lines are gone now: the next reload logs its warning only */
    sighup(h, "reload: the conf file changed (ping_interval)", 2);
    ck_assert_int_eq(hub_log_count(h, "policy reloaded from"), 1);
    rpc_is(c, "x", "up");
    ws_free(c);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* Limits read at each use change at once, for new and open connections. */
START_TEST(reload_applies_limits)
{
    struct hub *h = start("function on_rpc() return 'up' end\n", NULL);
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_free(b);
    rewrite_conf(h, "max_connections = 1\ncommand_rate = 1\ncommand_burst = 2\n");
    struct http_resp r;
    ck_assert_int_eq(http_request(h->port, "POST", "/api/reload", NULL, "", &r), 200);
    http_resp_free(&r);
    hub_log_wait(h, "reload: applied max_connections, command_rate, command_burst", HT_WAIT_MS);
    struct ws *c = NULL;
    ck_assert_int_eq(ws_handshake(h->port, NULL, &c, &r), 503);
    http_resp_free(&r);
    /* the open connection: a burst of 2 commands, then rate_limited */
    rpc_is(a, "x", "up");
    rpc_is(a, "x", "up");
    ws_send_text(a, "{\"op\":\"ping\",\"id\":9}");
    yajl_val v = ws_recv_json(a);
    ck_assert_str_eq(json_get_str(v, "error", "code"), "rate_limited");
    expect_contains(json_get_str(v, "error", "message"), "over command_rate (1 per second, "
                    "bursts of 2)");
    yajl_tree_free(v);
    ws_free(a);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* A reload is build, verify, swap: when the new policy fails, none of the
 * conf's changes are applied either. */
START_TEST(reload_that_fails_applies_nothing)
{
    struct hub *h = start("function on_rpc() return 'v1' end\n", NULL);
    struct ws *a = ws_connect(h->port);
    jt_write(at("policy.lua"), "function on_rpc() return = end\n");
    rewrite_conf(h, "max_connections = 1\nlog_level = \"error\"\n");
    sighup(h, "policy reload failed, keeping the current policy", 1);
    ck_assert_int_eq(hub_log_count(h, "reload: applied"), 0);
    struct ws *b = ws_connect(h->port); /* max_connections is not 1 */
    rpc_is(b, "x", "v1");
    ws_free(b);
    /* log_level is still info */
    jt_write(at("policy.lua"), "function on_rpc() return 'v2' end\n");
    rewrite_conf(h, NULL);
    sighup(h, "policy reloaded from", 1);
    rpc_is(a, "x", "v2");
    ws_free(a);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* lua_max_instructions: lowered by a reload, but not raised past its value
 * at start (the watchdog was sized from it). */
START_TEST(reload_lua_budget)
{
    static const char *lua =
        "function on_rpc() local n = 0 for i = 1, 40000 do n = n + i end return 'done' end\n";
    struct hub *h = start(lua, "lua_max_instructions = 100000\n");
    struct ws *c = ws_connect(h->port);
    rpc_is(c, "x", "done");
    rewrite_conf(h, "lua_max_instructions = 200000\n");
    sighup(h, "the conf file changed (lua_max_instructions): a reload does not apply", 1);
    rewrite_conf(h, "lua_max_instructions = 50000\n");
    sighup(h, "reload: applied lua_max_instructions", 1);
    ws_send_text(c, "{\"op\":\"rpc\",\"method\":\"x\",\"id\":5}");
    free(ws_expect_error(c, "5", "internal"));
    hub_log_wait(h, "instruction limit exceeded (lua_max_instructions = 50000)", HT_WAIT_MS);
    ws_free(c);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* ---- reload: the policy's files ------------------------------------------------ */

static const char *JWT_POLICY =
    "function on_connect(conn, req)\n"
    "  local claims, why = hub.jwt_verify(req.query.token, {aud = 'hub'})\n"
    "  if not claims then return false, why, 401 end\n"
    "  conn.user = claims.sub\n"
    "  return true\n"
    "end\n"
    "function on_rpc(conn) return conn.user end\n";

static char *signed_token(EVP_PKEY *k, const char *kid, const char *sub)
{
    char *header = ht_asprintf("{\"alg\":\"RS256\",\"kid\":\"%s\"}", kid);
    char *pl = ht_asprintf("{\"sub\":\"%s\",\"aud\":\"hub\",\"exp\":%ld}", sub,
                           (long)time(NULL) + 3600);
    char *t = jt_token(header, pl, "RS256", k, NULL, 0);
    free(header);
    free(pl);
    return t;
}

static void put_keys(EVP_PKEY *k, const char *kid)
{
    char *jwk = jt_jwk(k, kid, ",\"use\":\"sig\"");
    char *jwks = ht_asprintf("{\"keys\":[%s]}", jwk);
    jt_write(at("keys.jwks"), jwks);
    free(jwks);
    free(jwk);
}

/* Upgrades with ?token=...: the HTTP status, and the body on refusal. */
static int connect_with(struct hub *h, const char *token, const char *want_body)
{
    char path[2048];
    snprintf(path, sizeof path, "/ws?token=%s", token);
    struct ws *c = NULL;
    struct http_resp r;
    memset(&r, 0, sizeof r);
    int st = ws_handshake(h->port, &(struct ws_opts){.path = path}, &c, &r);
    if (st == 101) {
        rpc_is(c, "whoami", want_body);
        ws_free(c);
    } else {
        expect_contains(r.body, want_body);
    }
    http_resp_free(&r);
    return st;
}

START_TEST(reload_rotates_jwt_keys)
{
    EVP_PKEY *k1 = jt_rsa(2048), *k2 = jt_rsa(2048), *small = jt_rsa(1024);
    char *t1 = signed_token(k1, "k1", "alice"), *t2 = signed_token(k2, "k2", "bob");
    put_keys(k1, "k1");
    char *keys = ht_asprintf("jwt_keys = \"%s\"\n", at("keys.jwks"));
    struct hub *h = start(JWT_POLICY, keys);
    ck_assert_int_eq(connect_with(h, t1, "alice"), 101);
    ck_assert_int_eq(connect_with(h, t2, "unknown kid 'k2'"), 401);

    /* the issuer rotates its key: the file changes, a SIGHUP reads it */
    put_keys(k2, "k2");
    sighup(h, "policy reloaded from", 1);
    ck_assert_int_eq(connect_with(h, t2, "bob"), 101);
    ck_assert_int_eq(connect_with(h, t1, "unknown kid 'k1'"), 401);

    /* a key file that no longer loads: the reload fails, the keys stay */
    put_keys(small, "k3");
    sighup(h, "policy reload failed, keeping the current policy", 1);
    char *log = hub_log(h);
    expect_contains(log, "key 1 (kid 'k3'): an RSA key of 1024 bits");
    free(log);
    ck_assert_int_eq(connect_with(h, t2, "bob"), 101);
    ck_assert_int_eq(hub_stop(h), 0);
    free(keys);
    free(t1);
    free(t2);
    EVP_PKEY_free(k1);
    EVP_PKEY_free(k2);
    EVP_PKEY_free(small);
}
END_TEST

START_TEST(reload_reads_modules_again)
{
    jt_write(at("greeting.lua"), "return {text = 'v1'}\n");
    struct hub *h = start("local g = require('greeting')\n"
                          "function on_rpc() return g.text end\n", NULL);
    struct ws *c = ws_connect(h->port);
    rpc_is(c, "x", "v1");
    jt_write(at("greeting.lua"), "return {text = 'v2'}\n");
    rpc_is(c, "x", "v1"); /* cached: read when the policy loaded */
    sighup(h, "policy reloaded from", 1);
    rpc_is(c, "x", "v2");
    /* a module that no longer compiles: the reload fails, v2 stays */
    jt_write(at("greeting.lua"), "return {text = }\n");
    sighup(h, "policy reload failed, keeping the current policy", 1);
    char want[300];
    snprintf(want, sizeof want, "%s:1: unexpected symbol near '}'", at("greeting.lua"));
    char *log = hub_log(h);
    expect_contains(log, want);
    free(log);
    rpc_is(c, "x", "v2");
    ws_free(c);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("reload");
    TCase *tc = tcase_create("reload");
    tcase_add_checked_fixture(tc, make_dir, drop_dir);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, check_warns_and_strict_fails);
    tcase_add_test(tc, start_refuses_a_small_rsa_key);
    tcase_add_test(tc, reload_applies_log_level);
    tcase_add_test(tc, reload_applies_limits);
    tcase_add_test(tc, reload_that_fails_applies_nothing);
    tcase_add_test(tc, reload_lua_budget);
    tcase_add_test(tc, reload_rotates_jwt_keys);
    tcase_add_test(tc, reload_reads_modules_again);
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
