/* Unit suite: the Lua policy host (src/policy*.c, src/lua_*.c) without a
 * server: the policy's host interface is a fake that records what it was
 * asked; the connection is a plain struct hub_policy_conn. Covers the
 * sandbox, both budgets, return forms, the zero-copy path of on_publish,
 * failures that leave the state usable, --check messages and the crypto
 * helpers. The integration suite (tests/integration/test_policy.c) runs the
 * same things through the real binary. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "lua_api.h" /* white-box: the policy's private state */
#include "luahub/log.h"
#include "luahub/policy.h"

/* ---- a fake host: records what the policy asked of it ------------------- */

static char pushed[1024];
static int publishes;
static struct hub_policy_conn conn;

static struct hub_policy_conn *h_conn(void *ud, uint64_t id)
{
    (void)ud;
    return id == conn.id ? &conn : NULL;
}
static struct hub_policy_conn *h_conn_named(void *ud, const char *client)
{
    (void)ud;
    return !strcmp(client, "test-7") ? &conn : NULL;
}
static void h_conn_name(void *ud, uint64_t id, char *out, size_t n)
{
    (void)ud;
    snprintf(out, n, "test-%llu", (unsigned long long)id);
}
static void h_conn_addr(void *ud, const struct hub_policy_conn *c, char *out, size_t n)
{
    (void)ud;
    (void)c;
    snprintf(out, n, "127.0.0.1");
}
static int h_conn_closing(void *ud, const struct hub_policy_conn *c)
{
    (void)ud;
    (void)c;
    return 0;
}
static void h_conn_send(void *ud, struct hub_policy_conn *c, const char *json, size_t len)
{
    (void)ud;
    (void)c;
    snprintf(pushed, sizeof pushed, "%.*s", (int)len, json);
}
static void h_conn_close(void *ud, struct hub_policy_conn *c, unsigned code, const char *r)
{
    (void)ud;
    (void)c;
    (void)code;
    (void)r;
}
static int h_conn_subscribe(void *ud, struct hub_policy_conn *c, const char *ch, size_t len)
{
    (void)ud;
    (void)c;
    (void)ch;
    (void)len;
    return 1;
}
static int h_conn_unsubscribe(void *ud, struct hub_policy_conn *c, const char *ch, size_t len)
{
    (void)ud;
    (void)c;
    (void)ch;
    (void)len;
    return 0;
}
static void h_conn_channels(void *ud, const struct hub_policy_conn *c,
                            void (*fn)(void *arg, const char *ch, size_t len), void *arg)
{
    (void)ud;
    (void)c;
    fn(arg, "room", 4);
}
static void h_each_conn(void *ud, void (*fn)(void *arg, struct hub_policy_conn *c), void *arg)
{
    (void)ud;
    fn(arg, &conn);
}
static size_t h_publish(void *ud, const char *ch, size_t len, const char *data, size_t dlen)
{
    (void)ud;
    (void)ch;
    (void)len;
    (void)data;
    (void)dlen;
    publishes++;
    return 0;
}
static size_t h_subscribers(void *ud, const char *ch, size_t len)
{
    (void)ud;
    (void)ch;
    (void)len;
    return 0;
}
static void h_presence_local(void *ud, const char *ch, size_t len, uint64_t *clients,
                             uint64_t *users)
{
    (void)ud;
    (void)ch;
    *clients = len;                     /* something the test can recognise */
    *users = 1;
}
static int h_shutting_down(void *ud)
{
    (void)ud;
    return 0;
}

static const struct hub_policy_host_ops host_ops = {
    .conn = h_conn,
    .conn_named = h_conn_named,
    .conn_name = h_conn_name,
    .conn_addr = h_conn_addr,
    .conn_closing = h_conn_closing,
    .conn_send = h_conn_send,
    .conn_close = h_conn_close,
    .conn_subscribe = h_conn_subscribe,
    .conn_unsubscribe = h_conn_unsubscribe,
    .conn_channels = h_conn_channels,
    .each_conn = h_each_conn,
    .publish = h_publish,
    .subscribers = h_subscribers,
    .presence_local = h_presence_local,
    .shutting_down = h_shutting_down,
};

/* ---- fixture ----------------------------------------------------------- */

static struct hub_config cfg;
static struct hub_policy_host host;
static char *path;

static void write_policy(const char *lua)
{
    char tmpl[] = "/tmp/test_policy_host.XXXXXX";
    int fd = mkstemp(tmpl);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, lua, strlen(lua)), (ssize_t)strlen(lua));
    close(fd);
    free(path);
    path = strdup(tmpl);
    free(cfg.policy);
    cfg.policy = strdup(path);
}

static void setup(void)
{
    hub_log_set_level(HUB_LOG_ERROR);
    hub_config_defaults(&cfg);
    host = (struct hub_policy_host){.ops = &host_ops, .cfg = &cfg};
    memset(&conn, 0, sizeof conn);
    conn.id = 7;
    pushed[0] = '\0';
    publishes = 0;
}

static void teardown(void)
{
    if (path)
        unlink(path);
    free(path);
    path = NULL;
    hub_config_free(&cfg);
}

/* A policy from `lua`, which must load. */
static struct hub_policy *load(const char *lua)
{
    struct hub_config_errors errs = {0};
    write_policy(lua);
    struct hub_policy *p = hub_policy_new(&host, &errs);
    ck_assert_msg(p != NULL, "policy did not load: %s", errs.n ? errs.v[0] : "?");
    return p;
}

static void unload(struct hub_policy *p)
{
    hub_policy_conn_gone(p, &conn);
    hub_policy_free(p);
}

/* --check on `lua`: returns 0/-1 and the first error in `msg`. */
static int check(const char *lua, char *msg, size_t n)
{
    struct hub_config_errors errs = {0};
    write_policy(lua);
    int r = hub_policy_check(&cfg, &errs, NULL);
    snprintf(msg, n, "%s", errs.n ? errs.v[0] : "");
    hub_config_errors_free(&errs);
    return r;
}

struct emitted {
    int n;
    const char *data[4];
    char ch[4][64];
    char text[4][256];
};

static void emit(void *ud, const char *ch, size_t cl, const char *d, size_t dl)
{
    struct emitted *e = ud;
    if (e->n < 4) {
        e->data[e->n] = d;
        snprintf(e->ch[e->n], sizeof e->ch[0], "%.*s", (int)cl, ch);
        snprintf(e->text[e->n], sizeof e->text[0], "%.*s", (int)dl, d);
    }
    e->n++;
}

static enum hub_verdict publish(struct hub_policy *p, const char *ch, const char *data,
                                struct emitted *e, char *reason)
{
    memset(e, 0, sizeof *e);
    return hub_policy_on_publish(p, &conn, ch, strlen(ch), data, strlen(data), emit, e,
                                 reason, 256);
}

/* on_rpc with `method`; returns the verdict, the JSON result in `out`. */
static enum hub_verdict rpc(struct hub_policy *p, const char *method, const char *data,
                            char *out, size_t n)
{
    struct hub_buf res = {0};
    char reason[256];
    enum hub_verdict v = hub_policy_on_rpc(p, &conn, method, strlen(method), data,
                                           data ? strlen(data) : 0, &res, reason,
                                           sizeof reason);
    snprintf(out, n, "%s", v == HUB_ALLOW ? (res.p ? res.p : "") : reason);
    hub_buf_free(&res);
    return v;
}

/* ---- sandbox ------------------------------------------------------------ */

START_TEST(sandbox_has_only_the_safe_libraries)
{
    char msg[512];
    ck_assert_int_eq(check(
        "for _, n in ipairs({'io', 'load', 'loadfile', 'dofile', 'collectgarbage',\n"
        "                    'print', 'debug', 'package', 'loadstring', 'cjson'}) do\n"
        "  assert(rawget(_G, n) == nil, n)\n"
        "end\n"
        "assert(string.dump == nil and os.execute == nil and os.getenv == nil)\n"
        "assert(type(require) == 'function') -- the hub's own: modules of policy_path\n"
        "assert(os.time and os.clock and os.date and utf8.char and coroutine.wrap)\n"
        "assert(getmetatable('') == false)\n"
        "assert(not pcall(setmetatable, {}, {__gc = function() end}))\n"
        "assert(select(2, pcall(function() return undefined_name end)):find(\"undeclared global 'undefined_name'\"))\n"
        "string.upper = nil\n"
        "assert(('abc'):upper() == 'ABC')\n",
        msg, sizeof msg), 0);
}
END_TEST

START_TEST(check_messages_have_file_and_line)
{
    char msg[512], want[600];
    ck_assert_int_eq(check("\nlocal x = = 1\n", msg, sizeof msg), -1);
    snprintf(want, sizeof want, "%s:2:", path);
    ck_assert_msg(strncmp(msg, want, strlen(want)) == 0, "got %s", msg);

    ck_assert_int_eq(check("local t = {}\non_connect = t\n", msg, sizeof msg), -1);
    snprintf(want, sizeof want, "%s:2: on_connect must be a function (got a table)", path);
    ck_assert_str_eq(msg, want);

    ck_assert_int_eq(check("\n\nlocal s = 'x' while true do s = s .. s end\n", msg, sizeof msg), -1);
    ck_assert_msg(strstr(msg, "not enough memory") != NULL, "got %s", msg);

    ck_assert_int_eq(check("while true do pcall(function() while true do end end) end\n", msg,
                           sizeof msg), -1);
    snprintf(want, sizeof want, "%s:1: instruction limit exceeded", path);
    ck_assert_msg(strncmp(msg, want, strlen(want)) == 0, "got %s", msg);
}
END_TEST

/* ---- on_publish ------------------------------------------------------------ */

START_TEST(publish_true_emits_the_original_bytes)
{
    struct hub_policy *p = load("function on_publish(conn, ch, msg) return true end\n");
    struct emitted e;
    char reason[256];
    const char *data = "{ \"a\" : 1 }";
    struct hub_buf b = {0};
    hub_buf_appends(&b, data);
    memset(&e, 0, sizeof e);
    ck_assert_int_eq(hub_policy_on_publish(p, &conn, "c", 1, b.p, b.len, emit, &e, reason,
                                           sizeof reason), HUB_ALLOW);
    ck_assert_int_eq(e.n, 1);
    ck_assert_ptr_eq(e.data[0], b.p); /* the same bytes: no decode, no copy */
    hub_buf_free(&b);
    unload(p);
}
END_TEST

START_TEST(publish_return_forms)
{
    struct hub_policy *p = load(
        "function on_publish(conn, ch, msg)\n"
        "  if ch == 'no' then return false, 'nope' end\n"
        "  if ch == 'msg' then msg.data.x = 2 return msg end\n"
        "  if ch == 'list' then return {{channel = 'a'}, {channel = 'b', data = {1}}} end\n"
        "  if ch == 'none' then return {} end\n"
        "  if ch == 'num' then return 5 end\n"
        "  if ch == 'badch' then return {channel = 'no good'} end\n"
        "  if ch == 'badkey' then return {chanel = 'x'} end\n"
        "  if ch == 'hole' then return {{channel = 'a'}, nil, {channel = 'b'}} end\n"
        "  return true\n"
        "end\n");
    struct emitted e;
    char reason[256];
    ck_assert_int_eq(publish(p, "no", "1", &e, reason), HUB_DENY);
    ck_assert_str_eq(reason, "nope");
    ck_assert_int_eq(e.n, 0);
    ck_assert_int_eq(publish(p, "msg", "{\"x\":1}", &e, reason), HUB_ALLOW);
    ck_assert_str_eq(e.text[0], "{\"x\":2}");
    ck_assert_int_eq(publish(p, "list", "\"d\"", &e, reason), HUB_ALLOW);
    ck_assert_int_eq(e.n, 2);
    ck_assert_str_eq(e.ch[0], "a");
    ck_assert_str_eq(e.text[0], "\"d\"");
    ck_assert_str_eq(e.ch[1], "b");
    ck_assert_str_eq(e.text[1], "[1]");
    ck_assert_int_eq(publish(p, "none", "1", &e, reason), HUB_ALLOW);
    ck_assert_int_eq(e.n, 0);
    const char *bad[] = {"num", "badch", "badkey", "hole"};
    for (size_t i = 0; i < 4; i++) {
        ck_assert_int_eq(publish(p, bad[i], "1", &e, reason), HUB_FAIL);
        ck_assert_int_eq(e.n, 0);
    }
    /* still fine afterwards */
    ck_assert_int_eq(publish(p, "ok", "1", &e, reason), HUB_ALLOW);
    unload(p);
}
END_TEST

START_TEST(msg_is_only_valid_during_the_call)
{
    struct hub_policy *p = load(
        "local kept\n"
        "function on_publish(conn, ch, msg) kept = msg return true end\n"
        "function on_rpc(conn, m) return kept.raw end\n");
    struct emitted e;
    char reason[256], out[256];
    ck_assert_int_eq(publish(p, "keep", "1", &e, reason), HUB_ALLOW);
    ck_assert_int_eq(rpc(p, "read", NULL, out, sizeof out), HUB_FAIL);
    unload(p);
}
END_TEST

/* ---- budgets --------------------------------------------------------------- */

START_TEST(budget_stops_loops_even_in_pcall)
{
    cfg.lua_max_instructions = 100000;
    struct hub_policy *p = load(
        "function on_rpc(conn, m)\n"
        "  if m == 'loop' then while true do end end\n"
        "  if m == 'pcall' then while true do pcall(function() while true do end end) end end\n"
        "  if m == 'once' then pcall(function() while true do end end) return 'escaped' end\n"
        "  if m == 'co' then coroutine.resume(coroutine.create(function() while true do end end)) return 'escaped' end\n"
        "  if m == 'xp' then xpcall(function() while true do end end, function() return 1 end) return 'escaped' end\n"
        "  if m == 'work' then local n = 0 for i = 1, 10000 do n = n + i end return n end\n"
        "  return 'pong'\n"
        "end\n");
    char out[256];
    const char *bad[] = {"loop", "pcall", "once", "co", "xp"};
    for (size_t i = 0; i < 5; i++) {
        ck_assert_int_eq(rpc(p, bad[i], NULL, out, sizeof out), HUB_FAIL);
        ck_assert_int_eq(rpc(p, "ping", NULL, out, sizeof out), HUB_ALLOW);
        ck_assert_str_eq(out, "\"pong\"");
    }
    /* work under the budget is not affected by earlier stops */
    ck_assert_int_eq(rpc(p, "work", NULL, out, sizeof out), HUB_ALLOW);
    ck_assert_str_eq(out, "50005000");
    struct hub_buf m = {0};
    hub_policy_metrics(p, &m);
    ck_assert_msg(strstr(m.p, "luahub_policy_budget_kills_total{hook=\"on_rpc\",budget=\"instructions\"} 5\n"),
                  "%s", m.p);
    ck_assert_msg(strstr(m.p, "luahub_policy_errors_total{hook=\"on_rpc\"} 5\n"), "%s", m.p);
    hub_buf_free(&m);
    unload(p);
}
END_TEST

START_TEST(memory_cap_fails_the_call_not_the_process)
{
    cfg.lua_max_memory = 2 * 1024 * 1024;
    cfg.lua_max_instructions = 100000000;
    struct hub_policy *p = load(
        "function on_rpc(conn, m)\n"
        "  if m == 'str' then local s = 'x' while true do s = s .. s end end\n"
        "  if m == 'tab' then local t = {} for i = 1, 1e9 do t[i] = {i} end end\n"
        "  if m == 'rep' then return #('x'):rep(1e9) end\n"
        "  if m == 'caught' then pcall(function() local s = 'x' while true do s = s .. s end end) return 'escaped' end\n"
        "  if m == 'enc' then local s = ('x'):rep(100000) local t = {} for i = 1, 100 do t[i] = s end return #hub.json.encode(t) end\n"
        "  return 'pong'\n"
        "end\n");
    char out[256];
    const char *bad[] = {"str", "tab", "rep", "caught", "enc"};
    for (size_t i = 0; i < 5; i++) {
        ck_assert_msg(rpc(p, bad[i], NULL, out, sizeof out) == HUB_FAIL, "%s: %s", bad[i], out);
        ck_assert_int_eq(rpc(p, "ping", NULL, out, sizeof out), HUB_ALLOW);
    }
    struct hub_buf m = {0};
    hub_policy_metrics(p, &m);
    ck_assert_msg(strstr(m.p, "luahub_policy_budget_kills_total{hook=\"on_rpc\",budget=\"memory\"} 4\n"),
                  "%s", m.p);
    hub_buf_free(&m);
    unload(p);
}
END_TEST

/* ---- hooks and the API ------------------------------------------------------- */

START_TEST(subscribe_forms)
{
    struct hub_policy *p = load(
        "function on_subscribe(conn, ch)\n"
        "  if ch == 'inbox' then return 'inbox:' .. conn.id end\n"
        "  if ch == 'no' then return false, 'closed' end\n"
        "  if ch == 'bad' then return 'not valid!' end\n"
        "  if ch == 'nil' then return end\n"
        "  return true\n"
        "end\n");
    char out[HUB_CHANNEL_MAX + 1], reason[256];
    size_t n;
    ck_assert_int_eq(hub_policy_on_subscribe(p, &conn, "inbox", 5, out, &n, reason, 256), HUB_ALLOW);
    ck_assert_str_eq(out, "inbox:test-7");
    ck_assert_int_eq(n, 12);
    ck_assert_int_eq(hub_policy_on_subscribe(p, &conn, "room", 4, out, &n, reason, 256), HUB_ALLOW);
    ck_assert_str_eq(out, "room");
    ck_assert_int_eq(hub_policy_on_subscribe(p, &conn, "no", 2, out, &n, reason, 256), HUB_DENY);
    ck_assert_str_eq(reason, "closed");
    ck_assert_int_eq(hub_policy_on_subscribe(p, &conn, "bad", 3, out, &n, reason, 256), HUB_FAIL);
    ck_assert_int_eq(hub_policy_on_subscribe(p, &conn, "nil", 3, out, &n, reason, 256), HUB_FAIL);
    unload(p);
}
END_TEST

START_TEST(conn_object_is_cached_and_dies_with_the_connection)
{
    struct hub_policy *p = load(
        "local seen\n"
        "function on_rpc(conn, m, data)\n"
        "  if m == 'keep' then seen = conn return true end\n"
        "  if m == 'same' then return seen == conn end\n"
        "  if m == 'send' then return seen:send(data) end\n"
        "  if m == 'id' then return seen.id end\n"
        "  if m == 'user' then conn.user = data return conn.user end\n"
        "end\n");
    char out[256];
    ck_assert_int_eq(rpc(p, "keep", NULL, out, sizeof out), HUB_ALLOW);
    ck_assert_int_eq(rpc(p, "same", NULL, out, sizeof out), HUB_ALLOW);
    ck_assert_str_eq(out, "true");
    ck_assert_int_eq(rpc(p, "send", "{\"a\":1}", out, sizeof out), HUB_ALLOW);
    ck_assert_str_eq(pushed, "{\"a\":1}");
    ck_assert_int_eq(rpc(p, "user", "\"bob\"", out, sizeof out), HUB_ALLOW);
    ck_assert_str_eq(conn.user, "bob");

    hub_policy_conn_gone(p, &conn);
    ck_assert_int_eq(conn.lua_ref, 0);
    free(conn.user);
    conn.user = NULL;
    struct hub_policy_conn other = {.id = 8};
    struct hub_policy_conn saved = conn;
    conn = other;
    ck_assert_int_eq(rpc(p, "send", "1", out, sizeof out), HUB_FAIL); /* connection closed */
    ck_assert_int_eq(rpc(p, "id", NULL, out, sizeof out), HUB_ALLOW);
    ck_assert_str_eq(out, "\"test-7\"");
    hub_policy_conn_gone(p, &conn);
    conn = saved;
    hub_policy_free(p);
}
END_TEST

START_TEST(crypto_helpers)
{
    struct hub_policy *p = load(
        "function on_rpc(conn, m, data)\n"
        "  if m == 'hmac' then return hub.hmac_sha256('key', 'The quick brown fox jumps over the lazy dog') end\n"
        "  local claims, why = hub.jwt_verify(data, 'test-secret-123')\n"
        "  if claims then return claims.sub end\n"
        "  return nil, why\n"
        "end\n");
    char out[256];
    ck_assert_int_eq(rpc(p, "hmac", NULL, out, sizeof out), HUB_ALLOW);
    ck_assert_str_eq(out, "\"f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8\"");
    ck_assert_int_eq(rpc(p, "jwt",
        "\"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.pWZLE10uh8mqJa0ZZuTbNekqpeG_D16V4xrlF9swams\"",
        out, sizeof out), HUB_ALLOW);
    ck_assert_str_eq(out, "\"alice\"");
    ck_assert_int_eq(rpc(p, "jwt",
        "\"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTAwMDAwMDAwMH0.tuJ7VTkEtdIklQy8R5eAdlIrvPVS7ZIXFzIFduM4oC8\"",
        out, sizeof out), HUB_DENY);
    ck_assert_str_eq(out, "token expired");
    /* the signature of alice's token on another payload */
    ck_assert_int_eq(rpc(p, "jwt",
        "\"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwfQ.pWZLE10uh8mqJa0ZZuTbNekqpeG_D16V4xrlF9swams\"",
        out, sizeof out), HUB_DENY);
    ck_assert_str_eq(out, "bad signature");
    ck_assert_int_eq(rpc(p, "jwt", "\"a.b\"", out, sizeof out), HUB_DENY);
    ck_assert_int_eq(rpc(p, "jwt", "\"!!.!!.!!\"", out, sizeof out), HUB_DENY);
    ck_assert_int_eq(rpc(p, "jwt", "42", out, sizeof out), HUB_DENY);
    ck_assert_str_eq(out, "no token");
    unload(p);
}
END_TEST

START_TEST(absent_hooks_allow)
{
    struct hub_policy *p = load("x = 1\n");
    struct emitted e;
    char reason[256], out[HUB_CHANNEL_MAX + 1];
    size_t n;
    ck_assert_int_eq(hub_policy_has(p, HUB_HOOK_PUBLISH), 0);
    /* absent hooks allow, untouched */
    ck_assert_int_eq(publish(p, "c", "1", &e, reason), HUB_ALLOW);
    ck_assert_int_eq(e.n, 1);
    ck_assert_int_eq(hub_policy_on_subscribe(p, &conn, "c", 1, out, &n, reason, 256), HUB_ALLOW);
    ck_assert_str_eq(out, "c");
    unload(p);
}
END_TEST

/* ---- compatibility of the bounded library with Lua's own ----------------------- */

static char *read_file(const char *rel, size_t *len)
{
    const char *src = getenv("LUAHUB_SRC");
    char full[1024];
    ck_assert_msg(src != NULL, "LUAHUB_SRC is not set");
    snprintf(full, sizeof full, "%s/%s", src, rel);
    FILE *f = fopen(full, "rb");
    ck_assert_msg(f != NULL, "cannot read %s", full);
    struct hub_buf b = {0};
    char tmp[65536];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0)
        hub_buf_append(&b, tmp, n);
    fclose(f);
    *len = b.len;
    return b.p;
}

/* Splits "k=result#k=result#..." at '#' into lines[]; returns the count. */
static int split(char *text, char **lines, int max)
{
    int n = 0;
    for (char *s = strtok(text, "#"); s && n < max; s = strtok(NULL, "#"))
        lines[n++] = s;
    return n;
}

/* tests/unit/lua_compat_cases.lua runs in a stock Lua state and as the
 * policy's main chunk; each case's result (values or error message) must be
 * the same: string.find/match/gmatch/gsub (our matcher, against Lua's on a
 * table of patterns and on random ones), and every function lua_stdlib.c
 * wraps or replaces. */
START_TEST(bounded_library_matches_lua)
{
    size_t len;
    char *cases = read_file("tests/unit/lua_compat_cases.lua", &len);

    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    ck_assert_msg(luaL_loadbuffer(L, cases, len, "=cases") == LUA_OK && lua_pcall(L, 0, 0, 0) == LUA_OK,
                  "stock: %s", lua_tostring(L, -1));
    lua_getglobal(L, "ncases");
    int ncases = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    ck_assert_int_gt(ncases, 10000);

    /* the random patterns may backtrack a lot: a budget for them */
    cfg.lua_max_instructions = INT64_C(10000000000);
    struct hub_buf src = {0};
    hub_buf_append(&src, cases, len);
    hub_buf_appends(&src, "\nfunction on_rpc(conn, method, data)\n"
                          "  return run_range(math.tointeger(data[1]), math.tointeger(data[2]))\n"
                          "end\n");
    struct hub_policy *p = load(src.p);
    hub_buf_free(&src);

    enum { BATCH = 200 };
    int mismatches = 0;
    for (int i = 1; i <= ncases; i += BATCH) {
        char range[64], reason[256];
        struct hub_buf res = {0};
        snprintf(range, sizeof range, "[%d,%d]", i, i + BATCH - 1);
        enum hub_verdict v = hub_policy_on_rpc(p, &conn, "range", 5, range, strlen(range), &res,
                                               reason, sizeof reason);
        ck_assert_msg(v == HUB_ALLOW, "cases %s failed in the sandbox: %s", range, reason);
        /* the result is a JSON string; the serialiser emits no character
         * that JSON escapes */
        ck_assert_msg(res.len >= 2 && res.p[0] == '"' && res.p[res.len - 1] == '"', "%s", res.p);
        res.p[res.len - 1] = '\0';
        char *ours = res.p + 1;

        lua_getglobal(L, "run_range");
        lua_pushinteger(L, i);
        lua_pushinteger(L, i + BATCH - 1);
        ck_assert_msg(lua_pcall(L, 2, 1, 0) == LUA_OK, "stock: %s", lua_tostring(L, -1));
        char *theirs = strdup(lua_tostring(L, -1));
        lua_pop(L, 1);

        static char *a[BATCH], *b[BATCH];
        int na = split(ours, a, BATCH), nb = split(theirs, b, BATCH);
        ck_assert_int_eq(na, nb);
        for (int k = 0; k < na; k++) {
            if (strcmp(a[k], b[k]) != 0 && mismatches++ < 20)
                fprintf(stderr, "case %s\n   lua: %s\n   hub: %s\n", b[k], b[k], a[k]);
        }
        free(theirs);
        hub_buf_free(&res);
    }
    ck_assert_msg(mismatches == 0, "%d of %d cases differ from Lua's own (see above)",
                  mismatches, ncases);
    unload(p);
    lua_close(L);
    free(cases);
}
END_TEST

/* Calls whose work is in C (issue 9, item 6) are stopped by the budget
 * like a loop, and the state stays usable: each entry of BAD must fail the
 * call with an instruction stop. Before the fix each of them ran for
 * minutes or for ever in the hub's loop. */
static const char *const BAD =
    "local bad = {\n"
    "  function() return string.rep('', 2^62) end,\n"
    "  function() return ('x'):rep(1e9, '') end,\n"            /* too big: memory */
    "  function() return table.move({}, 1, 2^62, 1, {}) end,\n"
    "  function() return table.move({}, -2^61, 2^61, 1) end,\n"
    "  function() local t = setmetatable({}, {__len = function() return 2^62 end})\n"
    "             table.insert(t, 1, 'x') end,\n"
    "  function() local t = setmetatable({}, {__len = function() return 2^62 end})\n"
    "             return table.remove(t, 1) end,\n"
    "  function() return string.find(('a'):rep(30), ('a*'):rep(30) .. 'b') end,\n"
    "  function() return string.match(('a'):rep(25), ('a?'):rep(25) .. ('a'):rep(25) .. 'b') end,\n"
    "  function() for _ in ('a'):rep(30):gmatch(('a-'):rep(30) .. 'b') do end end,\n"
    "  function() return ('a'):rep(30):gsub(('.-'):rep(30) .. 'b', 'x') end,\n"
    "  function() return ('a'):rep(65536):find('(.-)x(.-)y') end,\n"
    "  function() return ('ab'):rep(32768):match('(.*)(.*)(.*)c') end,\n"
    "  function() return ('('):rep(65536):gsub('%b()', '') end,\n"
    "  function() return ('a'):rep(65536):find('%f[%w]%w-%w-z') end,\n"
    "  function() local s, n = ('a'):rep(65536), ('a'):rep(60000) .. 'b'\n"
    "             for i = 1, 1e9 do s:find(n, 1, true) end end,\n"
    "  function() local s = ('x'):rep(2^19) for i = 1, 1e9 do s:upper() end end,\n"
    "  function() for i = 1, 1e9 do table.unpack({}, 1, 999999) end end,\n"
    "  function() local s = ('x'):rep(2^19) for i = 1, 1e9 do s:byte(1, -1) end end,\n"
    "  function() local s = ('\\u{20AC}'):rep(2^17) for i = 1, 1e9 do utf8.len(s) end end,\n"
    "  function() local s = ('0'):rep(2^19) for i = 1, 1e9 do local _ = s + 1 end end,\n"
    "  function() local t = {} for i = 1, 2^15 do t[i] = i end\n"
    "             for i = 1, 1e9 do table.insert(t, 1, i) end end,\n"
    "  function() local t = {} for i = 1, 2^14 do t[i] = -i end\n"
    "             for i = 1, 1e9 do table.sort(t) end end,\n"
    "  function() local t = {} for i = 1, 2^16 do t[i] = 'x' end\n"
    "             for i = 1, 1e9 do table.concat(t, ',') end end,\n"
    "}\n"
    "nbad = #bad\n"
    "function on_rpc(conn, method, data)\n"
    "  if method == 'bad' then return bad[math.tointeger(data)]() end\n"
    "  return ('abc'):gsub('b', 'B')\n"
    "end\n";

START_TEST(c_work_is_charged)
{
    struct hub_policy *p = load(BAD);
    struct hub_hook_stats *st = &p->st.hook[HUB_HOOK_RPC];
    char out[256], arg[16];

    lua_rawgeti(p->L, LUA_REGISTRYINDEX, p->ref_env);
    lua_getfield(p->L, -1, "nbad");
    int n = (int)lua_tointeger(p->L, -1);
    lua_settop(p->L, HUB_LUA_BASE);
    ck_assert_int_gt(n, 20);
    for (int i = 1; i <= n; i++) {
        uint64_t kills = st->kills_instructions + st->kills_memory;
        snprintf(arg, sizeof arg, "%d", i);
        ck_assert_msg(rpc(p, "bad", arg, out, sizeof out) == HUB_FAIL, "bad[%d] was not stopped", i);
        ck_assert_msg(st->kills_instructions + st->kills_memory == kills + 1,
                      "bad[%d] failed but was not stopped by a budget", i);
        ck_assert_msg(i == 2 ? st->kills_memory == 1 : 1, "bad[2] is a memory stop");
        /* and the state still works */
        ck_assert_int_eq(rpc(p, "ok", NULL, out, sizeof out), HUB_ALLOW);
        ck_assert_str_eq(out, "\"aBc\"");
    }
    unload(p);
}
END_TEST

/* Single VM instructions that work on long strings (~= on two 8 MB
 * strings) are past the count's reach: the time limit (1 s for the
 * default budget) stops them long before the budget is used up. */
START_TEST(time_limit_stops_slow_instructions)
{
    struct hub_policy *p = load(
        "local a = 'x' for i = 1, 23 do a = a .. a end\n"
        "local b = a:sub(1, -2) .. 'y'\n"
        "function on_rpc(conn, method) while a ~= b do end end\n");
    char out[256];
    ck_assert_int_eq(rpc(p, "x", NULL, out, sizeof out), HUB_FAIL);
    ck_assert_int_eq(p->lim.killed, HUB_KILL_TIME);
    ck_assert_int_eq(p->st.hook[HUB_HOOK_RPC].kills_instructions, 1);
    unload(p);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("policy_host");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, sandbox_has_only_the_safe_libraries);
    tcase_add_test(tc, check_messages_have_file_and_line);
    tcase_add_test(tc, publish_true_emits_the_original_bytes);
    tcase_add_test(tc, publish_return_forms);
    tcase_add_test(tc, msg_is_only_valid_during_the_call);
    tcase_add_test(tc, budget_stops_loops_even_in_pcall);
    tcase_add_test(tc, memory_cap_fails_the_call_not_the_process);
    tcase_add_test(tc, subscribe_forms);
    tcase_add_test(tc, conn_object_is_cached_and_dies_with_the_connection);
    tcase_add_test(tc, crypto_helpers);
    tcase_add_test(tc, absent_hooks_allow);
    tcase_add_test(tc, bounded_library_matches_lua);
    tcase_add_test(tc, c_work_is_charged);
    tcase_add_test(tc, time_limit_stops_slow_instructions);
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
