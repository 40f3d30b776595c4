/* Integration suite: `luahub test` (docs/testing-policies.md), the real
 * binary on spec files, policies and confs written to temp files. The bad
 * inputs of issue 14 (a spec with a syntax error, a missing spec, a failed
 * expectation, a spec or a policy that loops, a policy that does not load)
 * and what a CI reads (exit status, TAP, JUnit). The spec language itself
 * is exercised by tests/spec/lang_spec.lua and the examples' specs, which
 * ctest runs too (spec_*). */
#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hubtest.h"

#define RUN_MS 60000

/* Files of one run, removed by cleanup(). */
struct files {
    char *policy, *conf, *spec;
};

static void cleanup(struct files *f)
{
    char *all[] = {f->policy, f->conf, f->spec};
    for (size_t i = 0; i < 3; i++) {
        if (all[i])
            unlink(all[i]);
        free(all[i]);
    }
}

/* Writes the policy (NULL: none, the built-in one), a conf naming it (with
 * `conf` appended, may be NULL) and the spec; runs `luahub test -c CONF
 * [extra...] SPEC`. Returns the exit status; *out gets the output. */
static int run_spec(struct files *f, const char *policy, const char *conf, const char *spec,
                    const char *extra, char **out)
{
    memset(f, 0, sizeof(*f));
    if (policy)
        f->policy = ht_tmpfile(policy);
    char *conf_text = policy ? ht_asprintf("policy = \"%s\"\n%s\n", f->policy, conf ? conf : "")
                             : ht_asprintf("%s\n", conf ? conf : "");
    f->conf = ht_tmpfile(conf_text);
    free(conf_text);
    f->spec = ht_tmpfile(spec);
    const char *args[] = {"test", "-c", f->conf, extra, f->spec, NULL};
    if (!extra) {
        args[3] = f->spec;
        args[4] = NULL;
    }
    return hub_run(args, out, RUN_MS);
}

static void has(const char *out, const char *needle)
{
    ck_assert_msg(strstr(out, needle) != NULL, "expected \"%s\" in the output:\n%s", needle, out);
}

/* has() with a printf format (the temp files' names in it). */
static void hasf(const char *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void hasf(const char *out, const char *fmt, ...)
{
    char needle[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(needle, sizeof(needle), fmt, ap);
    va_end(ap);
    has(out, needle);
}

static void has_not(const char *out, const char *needle)
{
    ck_assert_msg(strstr(out, needle) == NULL, "did not expect \"%s\" in the output:\n%s", needle,
                  out);
}

static const char *const INBOX_POLICY =
    "function on_connect(conn, req)\n"
    "  if not req.query.user then return false, 'no user', 401 end\n"
    "  conn.user = req.query.user\n"
    "  return true\n"
    "end\n"
    "function on_subscribe(conn, ch)\n"
    "  if ch == 'inbox' then return 'inbox:' .. conn.user end\n"
    "  return true\n"
    "end\n";

/* ---- exit status and the difference shown ----------------------------------- */

START_TEST(passing_spec_exits_0)
{
    struct files f;
    char *out;
    int rc = run_spec(&f, INBOX_POLICY, NULL,
                      "local alice = connect{query = {user = 'alice'}}\n"
                      "expect(alice).accepted()\n"
                      "expect(alice:subscribe('inbox')).to_be('inbox:alice')\n"
                      "expect(connect{query = {}}).refused(401, 'no user')\n",
                      NULL, &out);
    ck_assert_msg(rc == 0, "rc %d:\n%s", rc, out);
    has(out, "ok    hubtest.");
    has(out, "1 test: 1 passed, 0 failed");
    free(out);
    cleanup(&f);
}
END_TEST

START_TEST(failed_expectation_shows_the_first_difference_and_the_line)
{
    struct files f;
    char *out;
    int rc = run_spec(&f, INBOX_POLICY, NULL,
                      "test('the inbox', function()\n"
                      "  local alice = connect{query = {user = 'alice'}}\n"
                      "  expect(alice).accepted()\n"
                      "  expect(alice:subscribe('inbox')).to_be('inbox:bob')\n"
                      "  expect(1).to_be(2) -- not reached: the first difference ends the test\n"
                      "end)\n"
                      "test('a table', function()\n"
                      "  expect({a = 1, b = {c = 'x'}}).to_be({a = 1, b = {c = 'y'}})\n"
                      "end)\n"
                      "test('still runs', function() expect(connect{}).refused(401) end)\n",
                      NULL, &out);
    ck_assert_msg(rc == 1, "rc %d:\n%s", rc, out);
    hasf(out, "FAIL  the inbox\n        %s:4: channel: expected \"inbox:bob\", "
              "got \"inbox:alice\"\n", f.spec);
    has(out, "expected: subscribed to \"inbox:bob\"");
    has(out, "got:      subscribed to \"inbox:alice\"");
    has_not(out, "expected 2");
    hasf(out, "%s:8: b.c: expected \"y\", got \"x\"", f.spec);
    has(out, "ok    still runs");
    has(out, "3 tests: 1 passed, 2 failed");
    free(out);
    cleanup(&f);
}
END_TEST

/* A failure of the policy that no expectation was about fails the test:
 * here a timer's, which no client would ever see. */
START_TEST(unexpected_policy_failure_fails_the_test)
{
    struct files f;
    char *out;
    int rc = run_spec(&f,
                      "function on_rpc(conn, m)\n"
                      "  hub.after(5, function() return undefined_name end)\n"
                      "  return true\n"
                      "end\n",
                      NULL,
                      "test('unexpected', function()\n"
                      "  connect{}:rpc('arm')\n"
                      "  advance(5)\n"
                      "end)\n"
                      "test('expected', function()\n"
                      "  connect{}:rpc('arm')\n"
                      "  expect(advance(5)).failed(\"undeclared global 'undefined_name'\")\n"
                      "end)\n",
                      NULL, &out);
    ck_assert_msg(rc == 1, "rc %d:\n%s", rc, out);
    hasf(out, "%s:1: the policy failed 1 time and no expectation was about it", f.spec);
    hasf(out, "hook=timer %s:2: undeclared global 'undefined_name'", f.policy);
    has(out, "ok    expected");
    free(out);
    cleanup(&f);
}
END_TEST

/* ---- bad inputs: usage errors (exit 2, nothing runs) ------------------------------- */

START_TEST(spec_with_a_syntax_error)
{
    struct files f;
    char *out;
    int rc = run_spec(&f, INBOX_POLICY, NULL,
                      "test('x', function()\n"
                      "  local a = = 1\n"
                      "end)\n",
                      NULL, &out);
    ck_assert_msg(rc == 2, "rc %d:\n%s", rc, out);
    hasf(out, "%s:2: unexpected symbol near '='", f.spec);
    has(out, "nothing was run");
    has_not(out, "passed");
    free(out);
    cleanup(&f);
}
END_TEST

START_TEST(missing_spec_file)
{
    char *out;
    const char *args[] = {"test", "/nonexistent/dir/policy_spec.lua", NULL};
    int rc = hub_run(args, &out, RUN_MS);
    ck_assert_msg(rc == 2, "rc %d:\n%s", rc, out);
    has(out, "/nonexistent/dir/policy_spec.lua: cannot read the spec: No such file or directory");
    free(out);

    const char *none[] = {"test", NULL};
    rc = hub_run(none, &out, RUN_MS);
    ck_assert_msg(rc == 2, "rc %d:\n%s", rc, out);
    has(out, "no spec file given");
    free(out);
}
END_TEST

START_TEST(policy_that_fails_to_load)
{
    struct files f;
    char *out;
    /* a syntax error */
    int rc = run_spec(&f, "function on_rpc(conn,\n  return 1\nend\n", NULL,
                      "expect(1).to_be(1)\n", NULL, &out);
    ck_assert_msg(rc == 2, "rc %d:\n%s", rc, out);
    hasf(out, "%s:2: ", f.policy);
    has(out, "does not load");
    free(out);
    cleanup(&f);

    /* a main chunk that raises, with the conf's vars */
    rc = run_spec(&f, "assert(#hub.vars.secret >= 8, 'secret too short')\n",
                  "policy_vars = { secret = 'short' }", "expect(1).to_be(1)\n", NULL, &out);
    ck_assert_msg(rc == 2, "rc %d:\n%s", rc, out);
    hasf(out, "%s:1: secret too short", f.policy);
    free(out);
    cleanup(&f);

    /* loads with the conf's vars, not with a test's: that test fails */
    rc = run_spec(&f, "assert(#hub.vars.secret >= 8, 'secret too short')\n",
                  "policy_vars = { secret = 'long enough' }",
                  "test('short', {vars = {secret = 'x'}}, function() end)\n"
                  "test('long', function() expect(connect{}).accepted() end)\n",
                  NULL, &out);
    ck_assert_msg(rc == 1, "rc %d:\n%s", rc, out);
    has(out, "FAIL  short");
    has(out, "the policy did not load:");
    has(out, "secret too short");
    has(out, "ok    long");
    free(out);
    cleanup(&f);

    /* a conf with an error */
    rc = run_spec(&f, NULL, "max_channels_per_conn = 'many'", "expect(1).to_be(1)\n", NULL, &out);
    ck_assert_msg(rc == 2, "rc %d:\n%s", rc, out);
    hasf(out, "%s:1: max_channels_per_conn", f.conf);
    free(out);
    cleanup(&f);
}
END_TEST

/* ---- loops: the policy's budget, and the spec's own -------------------------------- */

START_TEST(policy_that_loops_is_stopped_by_its_budget)
{
    struct files f;
    char *out;
    int rc = run_spec(&f, "function on_rpc(conn, m) while true do end end\n", NULL,
                      "test('not expected', function()\n"
                      "  expect(connect{}:rpc('spin')).to_be(1)\n"
                      "end)\n"
                      "test('expected', function()\n"
                      "  local c = connect{}\n"
                      "  expect(c:rpc('spin')).failed('instruction limit exceeded')\n"
                      "  expect(c:rpc('again')).failed('instruction limit exceeded')\n"
                      "end)\n",
                      NULL, &out);
    ck_assert_msg(rc == 1, "rc %d:\n%s", rc, out);
    hasf(out, "%s:2: the rpc failed", f.spec);
    hasf(out, "(hook=on_rpc %s:1: instruction limit exceeded (lua_max_instructions = "
              "1000000): runaway loop? [conn 1])", f.policy);
    has(out, "ok    expected (2 checks)");
    free(out);
    cleanup(&f);
}
END_TEST

START_TEST(spec_that_loops_is_stopped_by_its_own_limit)
{
    struct files f;
    char *out;
    /* a plain loop, a loop that catches the stop, and the next test still runs */
    int rc = run_spec(&f, INBOX_POLICY, NULL,
                      "test('plain', function()\n"
                      "  local n = 0 while true do n = n + 1 end\n"
                      "end)\n"
                      "test('caught', function()\n"
                      "  while true do pcall(function() while true do end end) end\n"
                      "end)\n"
                      "test('actions', function()\n"
                      "  local c = connect{query = {user = 'u'}}\n"
                      "  while true do c:subscribe('room') end\n"
                      "end)\n"
                      "test('next', function() expect(1).to_be(1) end)\n",
                      NULL, &out);
    ck_assert_msg(rc == 1, "rc %d:\n%s", rc, out);
    hasf(out, "FAIL  plain\n        %s:2: instruction limit exceeded "
              "(100000000 instructions per test", f.spec);
    hasf(out, "FAIL  caught\n        %s:5: instruction limit exceeded", f.spec);
    hasf(out, "FAIL  actions\n        %s:9: instruction limit exceeded", f.spec);
    has(out, "ok    next");
    has(out, "4 tests: 1 passed, 3 failed");
    free(out);
    cleanup(&f);

    /* --max-instructions, and a loop outside the tests */
    rc = run_spec(&f, INBOX_POLICY, NULL, "local n = 0\nwhile true do n = n + 1 end\n",
                  "--max-instructions=100000", &out);
    ck_assert_msg(rc == 1, "rc %d:\n%s", rc, out);
    has(out, "instruction limit exceeded (100000 instructions per test");
    free(out);
    cleanup(&f);
}
END_TEST

/* ---- what CI reads: TAP and JUnit ------------------------------------------------- */

START_TEST(tap_and_junit)
{
    struct files f;
    char *out;
    char *junit = ht_tmpfile("");
    char *opt = ht_asprintf("--junit=%s", junit);
    const char *spec = "test('good', function() expect(1).to_be(1) end)\n"
                       "test('bad <one>', function() expect('a').to_be('b') end)\n";
    int rc = run_spec(&f, INBOX_POLICY, NULL, spec, "--tap", &out);
    ck_assert_msg(rc == 1, "rc %d:\n%s", rc, out);
    ck_assert_msg(!strncmp(out, "TAP version 13\n", 15), "%s", out);
    hasf(out, "\nok 1 - %s: good\nnot ok 2 - %s: bad <one>\n  ---\n"
              "  message: \"expected \\\"b\\\", got \\\"a\\\"\"\n"
              "  at: \"%s:2\"\n", f.spec, f.spec, f.spec);
    has(out, "\n1..2\n");
    free(out);
    cleanup(&f);

    rc = run_spec(&f, INBOX_POLICY, NULL, spec, opt, &out);
    ck_assert_msg(rc == 1, "rc %d:\n%s", rc, out);
    free(out);
    const char *cat[] = {"/bin/cat", junit, NULL};
    ck_assert_int_eq(ht_run(cat, &out, RUN_MS), 0);
    has(out, "<testsuites name=\"luahub test\" tests=\"2\" failures=\"1\">");
    hasf(out, "<testsuite name=\"%s\" tests=\"2\" failures=\"1\"", f.spec);
    has(out, "name=\"good\"");
    has(out, "name=\"bad &lt;one&gt;\" time=\"");
    hasf(out, "<failure message=\"%s:2: expected &quot;b&quot;, got &quot;a&quot;\">",
              f.spec);
    free(out);
    cleanup(&f);
    unlink(junit);
    free(junit);
    free(opt);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("spec");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, passing_spec_exits_0);
    tcase_add_test(tc, failed_expectation_shows_the_first_difference_and_the_line);
    tcase_add_test(tc, unexpected_policy_failure_fails_the_test);
    tcase_add_test(tc, spec_with_a_syntax_error);
    tcase_add_test(tc, missing_spec_file);
    tcase_add_test(tc, policy_that_fails_to_load);
    tcase_add_test(tc, policy_that_loops_is_stopped_by_its_budget);
    tcase_add_test(tc, spec_that_loops_is_stopped_by_its_own_limit);
    tcase_add_test(tc, tap_and_junit);
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
