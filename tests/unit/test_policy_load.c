/* Unit suite: what a policy reads when it is built (docs/lua.md), without
 * a server: require() of modules.
 *
 * A test writes its conf, policy and modules into the suite's temp dir,
 * loads the conf with the real loader and builds the policy; white-box, it
 * calls the policy's global function `check(arg)` through hub_policy_call
 * (src/lua_api.h). */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "jwttest.h"
#include "lua_api.h" /* white-box: hub_policy_call */
#include "luahub/log.h"
#include "luahub/policy.h"

/* ---- keys and files ------------------------------------------------------- */

static char dir[64];

static void make_dir(void)
{
    jt_mkdir(dir, sizeof dir, "test_policy_load");
}

static void drop_dir(void)
{
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

/* --check of the policy: returns 0 or -1; every error joined by newlines
 * in `out` (new string). */
static int check(const char *conf, const char *lua, char **out, unsigned *nwarn)
{
    struct hub_config_errors errs = {0};
    prepare(conf, lua);
    int rc = hub_policy_check(&cfg, &errs);
    size_t len = 0;
    FILE *f = open_memstream(out, &len);
    for (unsigned i = 0; i < errs.n; i++)
        fprintf(f, "%s\n", errs.v[i]);
    fclose(f);
    if (nwarn)
        *nwarn = 0;
    hub_config_errors_free(&errs);
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
    ck_assert_int_eq(hub_policy_check(&cfg, &errs), 0);
    hub_config_errors_free(&errs);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("policy_load");
    TCase *tc = tcase_create("load");
    tcase_add_unchecked_fixture(tc, make_dir, drop_dir);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, require_loads_once_and_caches);
    tcase_add_test(tc, require_missing_module);
    tcase_add_test(tc, require_refuses_names_that_are_not_module_names);
    tcase_add_test(tc, require_of_itself_is_a_cycle);
    tcase_add_test(tc, require_module_with_a_syntax_error);
    tcase_add_test(tc, require_only_while_the_policy_loads);
    tcase_add_test(tc, require_from_policy_path);
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
