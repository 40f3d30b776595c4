/* Integration suite: hooks that wait (issue 14; docs/lua.md, "Waiting:
 * Redis, history, presence"; docs/internals.md, "How a hook waits"). The
 * real binary with a real redis-server this suite starts (tests/support/
 * redistest), real policy files:
 *
 *   - hub.redis in every hook and in timers, Redis types in Lua, pipelines;
 *   - a connection's commands queue behind its waiting hook and are answered
 *     in order; the instruction budget counts across waits, the time limit
 *     only counts running time;
 *   - yields from pcall, a metamethod, an iterator: allowed; from
 *     tostring's __tostring, a gsub callback, a sort comparator, a
 *     coroutine of the policy, coroutine.yield itself: a clear error;
 *     resuming a waiting hook's thread from policy code: refused;
 *   - the bad inputs of issue 14: 10,000 hub.redis in a loop, a reply of
 *     100 MB, Redis SIGSTOPped or killed while hooks wait, a connection
 *     closed while its hook waits, a reload while 1,000 calls wait, the
 *     caps (lua_max_waiting, the per-connection queue);
 *   - on_connect that waits; the memory broker without policy_redis; a
 *     separate policy_redis; hub.history and hub.presence from Lua;
 *     hub.shared (TTL, incr, eviction, survives reload), hub.ratelimit and
 *     hub.ratelimit_redis (shared by two hubs, NOSCRIPT).
 *
 * Every test stops its hub with SIGTERM and asserts exit status 0 (the ASan
 * build exits non-zero on a leak). Waits are for events, bounded; time is
 * the subject only where a deadline is (lua_call_timeout, a SIGSTOP). */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hubtest.h"
#include "redistest.h"

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

static char *policy_path;

/* A hub whose broker is the Redis `r` (NULL: the memory broker) with the
 * URL options `opts` (NULL: none), running policy `lua`, with conf lines
 * `extra`. */
static struct hub *start_opts(const struct srv *r, const char *opts, const char *lua,
                              const char *extra)
{
    char conf[4096];
    policy_path = ht_tmpfile(lua);
    int n = snprintf(conf, sizeof conf,
                     "policy = \"%s\"\nshutdown_timeout = 2\ncommand_rate = 0\n"
                     "publish_rate = 0\n%s\n", policy_path, extra ? extra : "");
    if (r)
        snprintf(conf + n, sizeof conf - (size_t)n, "broker = \"redis://127.0.0.1:%d%s\"\n",
                 r->port, opts ? opts : "");
    struct hub *h = hub_start(conf);
    if (r)
        hub_log_wait(h, "broker up", HT_WAIT_MS);
    return h;
}

static struct hub *start(const struct srv *r, const char *lua, const char *extra)
{
    return start_opts(r, NULL, lua, extra);
}

/* A hub with the memory broker and `r` as its policy_redis. */
static struct hub *start_policy_redis(const struct srv *r, const char *lua)
{
    char extra[128];
    snprintf(extra, sizeof extra, "policy_redis = \"redis://127.0.0.1:%d\"\n", r->port);
    struct hub *h = start(NULL, lua, extra);
    hub_log_wait(h, "policy_redis up", HT_WAIT_MS);
    return h;
}

/* For tests that stop Redis and go on with the same connection afterwards:
 * the broker would drop a silent Redis after command_timeout_ms. */
#define PATIENT "?command_timeout_ms=60000"

static void stop(struct hub *h)
{
    ck_assert_int_eq(hub_stop(h), 0);
    if (policy_path) {
        unlink(policy_path);
        free(policy_path);
        policy_path = NULL;
    }
}

/* Sends an rpc; returns the reply text (new string). `data` may be NULL. */
static char *rpc(struct ws *c, const char *method, const char *data)
{
    long long id = c->next_id++;
    char *req = data ? ht_asprintf("{\"op\":\"rpc\",\"method\":\"%s\",\"data\":%s,\"id\":%lld}",
                                   method, data, id)
                     : ht_asprintf("{\"op\":\"rpc\",\"method\":\"%s\",\"id\":%lld}", method, id);
    ws_send_text(c, req);
    free(req);
    return ws_recv_text(c);
}

/* Same, with a reply that may take `ms` (100 MB through the ASan build). */
static char *rpc_slow(struct ws *c, const char *method, int ms)
{
    struct ws_frame f;
    char *req = ht_asprintf("{\"op\":\"rpc\",\"method\":\"%s\",\"id\":%lld}", method,
                            c->next_id++);
    ws_send_text(c, req);
    free(req);
    ck_assert_msg(ws_recv_msg(c, &f, ms) == 1 && f.opcode == WS_TEXT,
                  "rpc %s: no reply within %d ms", method, ms);
    char *t = f.data;
    f.data = NULL;
    ws_frame_free(&f);
    return t;
}

static void expect_contains(const char *text, const char *needle)
{
    ck_assert_msg(strstr(text, needle) != NULL, "expected '%s' in:\n%s", needle, text);
}

/* The rpc must answer data `want` (exact JSON). */
static void rpc_expect(struct ws *c, const char *method, const char *data, const char *want)
{
    char *t = rpc(c, method, data);
    char *w = ht_asprintf("\"data\":%s}", want);
    ck_assert_msg(strstr(t, "\"ok\":true") && strstr(t, w), "rpc %s: expected data %s, got %s",
                  method, want, t);
    free(w);
    free(t);
}

/* Repeats the rpc (bounded, every `pause_ms`) until its reply contains
 * `want`; fails the test with `what` otherwise. */
static void rpc_until(struct ws *c, const char *method, const char *data, const char *want,
                      int pause_ms, const char *what)
{
    int64_t dl = ht_now_ms() + HT_WAIT_MS;
    for (;;) {
        char *t = rpc(c, method, data);
        int ok = strstr(t, want) != NULL;
        free(t);
        if (ok)
            return;
        ck_assert_msg(ht_now_ms() < dl, "%s", what);
        if (pause_ms)
            sleep_ms(pause_ms);
    }
}

/* The rpc must fail with `code`. */
static void rpc_fails(struct ws *c, const char *method, const char *data, const char *code)
{
    char *t = rpc(c, method, data);
    char *w = ht_asprintf("\"code\":\"%s\"", code);
    ck_assert_msg(strstr(t, "\"ok\":false") && strstr(t, w), "rpc %s: expected error %s, got %s",
                  method, code, t);
    free(w);
    free(t);
}

/* One masked text frame of `text` appended to b (several go out in one
 * write: the hub then gets them in one read). */
static size_t frame(unsigned char *b, const char *text)
{
    size_t n = strlen(text), k = 0;
    const unsigned char mask[4] = {0x11, 0x22, 0x33, 0x44};
    b[k++] = 0x81;
    if (n < 126) {
        b[k++] = (unsigned char)(0x80 | n);
    } else {
        b[k++] = 0x80 | 126;
        b[k++] = (unsigned char)(n >> 8);
        b[k++] = (unsigned char)n;
    }
    memcpy(b + k, mask, 4);
    k += 4;
    for (size_t i = 0; i < n; i++)
        b[k + i] = (unsigned char)text[i] ^ mask[i & 3];
    return k + n;
}

/* A Redis string value (new string), or NULL when the key is absent. */
static char *rget(const struct srv *r, const char *key)
{
    redisReply *x = srv_cmd(r, "GET %s", key);
    char *v = x->type == REDIS_REPLY_STRING ? strdup(x->str) : NULL;
    freeReplyObject(x);
    return v;
}

/* Polls until Redis has `key` = `want` (bounded). */
static void rwait(const struct srv *r, const char *key, const char *want)
{
    int64_t dl = now_ms() + HT_WAIT_MS;
    char *v = NULL;
    for (;;) {
        v = rget(r, key);
        if (v && !strcmp(v, want))
            break;
        ck_assert_msg(now_ms() < dl, "redis %s: expected %s, have %s", key, want,
                      v ? v : "(nil)");
        free(v);
        sleep_ms(10);
    }
    free(v);
}

static long long metric(struct hub *h, const char *s)
{
    return hub_metric(h, s);
}

#define WAITING "luahub_policy_waiting"
#define TIMEOUTS "luahub_policy_waits_failed_total{reason=\"timeout\"}"
#define LIMITS "luahub_policy_waits_failed_total{reason=\"limit\"}"
#define CANCELLED "luahub_policy_waits_failed_total{reason=\"cancelled\"}"

/* The policy of most tests: hub.redis in every hook, and rpc methods. */
static const char POLICY[] =
    "function on_connect(conn, req)\n"
    "  if req.query.token then\n"
    "    local v, err = hub.redis('GET', 'session:' .. req.query.token)\n"
    "    if v == nil then return false, err, 503 end\n"
    "    if not v then return false, 'no session', 401 end\n"
    "    conn.user = v\n"
    "  end\n"
    "  return true\n"
    "end\n"
    "function on_subscribe(conn, channel)\n"
    "  if channel:sub(1, 4) == 'acl:' then\n"
    "    if hub.redis('SISMEMBER', 'acl', channel) ~= 1 then return false, 'not in acl' end\n"
    "  end\n"
    "  return true\n"
    "end\n"
    "function on_publish(conn, channel, msg)\n"
    "  if channel:sub(1, 4) == 'cnt:' then\n"
    "    local d = msg.data\n"
    "    d.n = hub.redis('INCR', 'count:' .. channel)\n"
    "    d.raw = msg.raw\n"
    "    return {channel = channel, data = d}\n"
    "  end\n"
    "  return true\n"
    "end\n"
    "function on_unsubscribe(conn, channel)\n"
    "  hub.redis('SET', 'unsub:' .. channel, conn.id)\n"
    "end\n"
    "function on_disconnect(conn, code, reason)\n"
    "  if conn.user then hub.redis('SET', 'gone:' .. conn.user, code) end\n"
    "end\n"
    "local M = {}\n"
    "function M.cmd(d) return {hub.redis(table.unpack(d))} end\n"
    "function M.get(d) return hub.redis('GET', d) end\n"
    "function M.incr(d) return hub.redis('INCR', d) end\n"
    "function M.pipe(d) return hub.redis_pipeline(d) end\n"
    "function M.timer(d)\n"
    "  hub.after(0, function() hub.redis('SET', d, hub.redis('INCR', d .. ':n')) end)\n"
    "  return true\n"
    "end\n"
    "function M.budget()\n"
    "  for i = 1, 40 do\n"
    "    hub.redis('PING')\n"
    "    local x = 0\n"
    "    for j = 1, 3000 do x = x + j end\n"
    "  end\n"
    "  return 'done'\n"
    "end\n"
    "function M.slow(d)\n"
    "  local v = hub.redis('EVAL', \"local t = redis.call('TIME') \"\n"
    "    .. \"local s = t[1] * 1000000 + t[2] repeat t = redis.call('TIME') \"\n"
    "    .. \"until t[1] * 1000000 + t[2] - s > tonumber(ARGV[1]) return 'slept'\", 0, d)\n"
    "  local x = 0 for i = 1, 5000 do x = x + i end -- the time limit is looked at here\n"
    "  return v\n"
    "end\n"
    "function M.loop()\n"
    "  for i = 1, 10000 do hub.redis('INCR', 'loop') hub.shared.set('progress', i) end\n"
    "  return 'done'\n"
    "end\n"
    "function M.progress() return hub.shared.get('progress') or 0 end\n"
    "function M.mark(d)\n"
    "  local v = hub.redis('GET', d)\n"
    "  hub.shared.set('resumed', true)\n"
    "  return v\n"
    "end\n"
    "function M.resumed() return hub.shared.get('resumed') or false end\n"
    "function M.pcall(d) return {pcall(hub.redis, 'GET', d)} end\n"
    "function M.pcall_err(d)\n"
    "  return {pcall(function() hub.redis('GET', d) error('after the wait', 0) end)}\n"
    "end\n"
    "function M.index(d)\n"
    "  local t = setmetatable({}, {__index = function(_, k) return hub.redis('GET', k) end})\n"
    "  return t[d]\n"
    "end\n"
    "function M.iter(d)\n"
    "  local function it(_, i) if i < 3 then return i + 1, hub.redis('INCR', d) end end\n"
    "  local out = {}\n"
    "  for _, v in it, nil, 0 do out[#out + 1] = v end\n"
    "  return out\n"
    "end\n"
    "function M.pairs_mt(d)\n"
    "  local t = setmetatable({}, {__pairs = function()\n"
    "    local v = hub.redis('GET', d)\n"
    "    return function(_, k) if not k then return 1, v end end, nil, nil\n"
    "  end})\n"
    "  for _, v in pairs(t) do return v end\n"
    "end\n"
    "function M.tostring(d)\n"
    "  return tostring(setmetatable({}, {__tostring = function() return hub.redis('GET', d) end}))\n"
    "end\n"
    "function M.gsub(d) return (string.gsub('a', 'a', function() return hub.redis('GET', d) end)) end\n"
    "function M.sort()\n"
    "  local t = {3, 1, 2}\n"
    "  table.sort(t, function(a, b) hub.redis('PING') return a < b end)\n"
    "  return t\n"
    "end\n"
    "function M.wrap(d) return coroutine.wrap(function() return hub.redis('GET', d) end)() end\n"
    "function M.yield() coroutine.yield(1) return 1 end\n"
    "saved = nil\n"
    "function M.grab(d) saved = coroutine.running() return hub.redis('GET', d) end\n"
    "function M.resume_saved() return {pcall(coroutine.resume, saved)} end\n"
    "function M.close_saved() return {pcall(coroutine.close, saved)} end\n"
    "function M.big() return hub.redis('GET', 'big') end\n"
    "function M.big_pcall() return {pcall(hub.redis, 'GET', 'big')} end\n"
    "function M.refused(d) return hub.redis(table.unpack(d)) end\n"
    "function M.after_wait(d)\n"
    "  for i = 1, d do hub.after(0, function() hub.redis('GET', 'x') end) end\n"
    "  return d\n"
    "end\n"
    "function M.version() return 'v1' end\n"
    "function on_rpc(conn, method, data)\n"
    "  local f = M[method]\n"
    "  if not f then return nil, 'no method ' .. method end\n"
    "  return f(data, conn)\n"
    "end\n";

/* ------------------------------------------------------------------ */
/* hub.redis in every hook                                              */
/* ------------------------------------------------------------------ */

START_TEST(redis_in_every_hook)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start(&r, POLICY, NULL);
    freeReplyObject(srv_cmd(&r, "SET session:tok alice"));
    freeReplyObject(srv_cmd(&r, "SADD acl acl:ok"));

    /* on_connect: the upgrade is answered when the hook is done */
    struct ws_opts o = {.path = "/ws?token=tok"};
    struct ws *c = ws_connect_opts(h->port, &o);
    struct http_resp resp;
    struct ws *none = NULL;
    struct ws_opts bad = {.path = "/ws?token=nope"};
    ck_assert_int_eq(ws_handshake(h->port, &bad, &none, &resp), 401);
    expect_contains(resp.body, "no session");
    http_resp_free(&resp);

    /* on_subscribe */
    ws_subscribe(c, "acl:ok");
    ws_send_text(c, "{\"op\":\"subscribe\",\"channel\":\"acl:no\",\"id\":\"s\"}");
    free(ws_expect_error(c, "\"s\"", "forbidden"));
    /* on_publish: the message is transformed after the wait, msg stays valid */
    struct ws *sub = ws_connect(h->port);
    ws_subscribe(sub, "cnt:a");
    ws_publish(c, "cnt:a", "{\"x\":1}");
    yajl_val v = ws_recv_json(sub);
    ck_assert_int_eq(YAJL_GET_INTEGER(json_get(v, "data", "n")), 1);
    ck_assert_str_eq(json_get_str(v, "data", "raw"), "{\"x\":1}");
    yajl_tree_free(v);
    /* on_unsubscribe */
    ws_unsubscribe(c, "acl:ok");
    yajl_val w = json_parse(c->welcome);
    rwait(&r, "unsub:acl:ok", json_get_str(w, "client"));
    yajl_tree_free(w);
    /* a timer */
    rpc_expect(c, "timer", "\"tm\"", "true");
    rwait(&r, "tm", "1");
    /* on_disconnect, after the connection is gone */
    ws_send_close(c, 1000, "bye");
    ws_expect_close(c, 1000);
    ws_free(c);
    rwait(&r, "gone:alice", "1000");
    ws_free(sub);
    ck_assert_int_eq(metric(h, WAITING), 0);
    ck_assert_int_gt(metric(h, "luahub_policy_waits_total"), 6);
    stop(h);
    srv_stop(&r);
}
END_TEST

START_TEST(redis_types_in_lua)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start(&r, POLICY, NULL);
    struct ws *c = ws_connect(h->port);
    freeReplyObject(srv_cmd(&r, "RPUSH list a b"));

    rpc_expect(c, "cmd", "[\"INCR\",\"n\"]", "[1]");                  /* integer */
    rpc_expect(c, "cmd", "[\"SET\",\"s\",42]", "[\"OK\"]");           /* status; a number arg */
    rpc_expect(c, "cmd", "[\"GET\",\"s\"]", "[\"42\"]");              /* bulk string */
    rpc_expect(c, "cmd", "[\"GET\",\"missing\"]", "[false]");         /* nil */
    rpc_expect(c, "cmd", "[\"LRANGE\",\"list\",0,-1]", "[[\"a\",\"b\"]]"); /* array */
    char *t = rpc(c, "cmd", "[\"GET\",\"list\"]");                    /* an error: nil, msg */
    expect_contains(t, "\"data\":[null,\"WRONGTYPE");
    free(t);
    rpc_expect(c, "cmd", "[\"EVAL\",\"return {1, {2, 'x'}, {err = 'boom'}}\",0]",
               "[[1,[2,\"x\"],{\"err\":\"boom\"}]]");
    /* a pipeline: one reply per command, an error as {err = ...} */
    rpc_expect(c, "pipe", "[[\"INCR\",\"p\"],[\"INCR\",\"p\"],[\"GET\",\"nokey\"],"
               "[\"LPUSH\",\"s\",\"x\"]]",
               "[1,2,false,{\"err\":\"WRONGTYPE Operation against a key holding the wrong "
               "kind of value\"}]");
    /* commands that would break the shared connection raise */
    const char *refused[] = {"[\"SUBSCRIBE\",\"x\"]", "[\"multi\"]", "[\"BLPOP\",\"l\",0]",
                             "[\"SELECT\",1]", "[\"XREAD\",\"BLOCK\",0,\"STREAMS\",\"s\",\"$\"]",
                             "[\"CLIENT\",\"REPLY\",\"OFF\"]"};
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
        rpc_fails(c, "refused", refused[i], "internal");
    hub_log_wait(h, "BLPOP is not allowed: it blocks the connection", HT_WAIT_MS);
    hub_log_wait(h, "multi is not allowed: the connection is shared", HT_WAIT_MS);
    rpc_fails(c, "refused", "[{}]", "internal");
    hub_log_wait(h, "argument 1 is a table: Redis takes strings and numbers", HT_WAIT_MS);
    rpc_fails(c, "pipe", "[]", "internal");
    hub_log_wait(h, "expected a list of 1 to 1000 commands", HT_WAIT_MS);
    ws_free(c);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Order, budgets                                                       */
/* ------------------------------------------------------------------ */

/* Five commands in one write: the first rpc waits for Redis, the others
 * come in the same read and queue behind it; the replies come in order, and
 * the second rpc ran after the first. */
START_TEST(commands_queue_behind_a_waiting_hook)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    /* the memory broker answers publish and subscribe at once, so every
     * reply's place is the command's (docs/protocol.md) */
    struct hub *h = start_policy_redis(&r, POLICY);
    struct ws *c = ws_connect(h->port), *s = ws_connect(h->port);
    ws_subscribe(s, "q");
    unsigned char buf[1024];
    size_t n = 0;
    n += frame(buf + n, "{\"op\":\"rpc\",\"method\":\"incr\",\"data\":\"order\",\"id\":1}");
    n += frame(buf + n, "{\"op\":\"ping\",\"id\":2}");
    n += frame(buf + n, "{\"op\":\"publish\",\"channel\":\"q\",\"data\":3,\"id\":3}");
    n += frame(buf + n, "{\"op\":\"rpc\",\"method\":\"incr\",\"data\":\"order\",\"id\":4}");
    n += frame(buf + n, "{\"op\":\"subscribe\",\"channel\":\"q2\",\"id\":5}");
    ck_assert_int_eq(ws_send_raw(c, buf, n), 0);
    ws_expect(c, "{\"id\":1,\"ok\":true,\"data\":1}");
    ws_expect(c, "{\"id\":2,\"ok\":true}");
    ws_expect(c, "{\"id\":3,\"ok\":true}");
    ws_expect(c, "{\"id\":4,\"ok\":true,\"data\":2}");
    ws_expect(c, "{\"id\":5,\"ok\":true,\"channel\":\"q2\"}");
    char *d = ws_delivery("q", "3");
    ws_expect(s, d);
    free(d);
    ck_assert_int_ge(metric(h, "luahub_policy_waits_total"), 2);
    ws_free(c);
    ws_free(s);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* Each run between two waits is far under the budget; together they are
 * not: the budget counts across waits. */
START_TEST(budget_counts_across_waits)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start(&r, POLICY, "lua_max_instructions = 100000\nlua_call_timeout = 30\n");
    struct ws *c = ws_connect(h->port);
    rpc_fails(c, "budget", NULL, "internal");
    hub_log_wait(h, "instruction limit exceeded (lua_max_instructions = 100000)", HT_WAIT_MS);
    ck_assert_int_eq(metric(h, "luahub_policy_budget_kills_total{hook=\"on_rpc\","
                               "budget=\"instructions\"}"), 1);
    rpc_expect(c, "incr", "\"still\"", "1");
    ws_free(c);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* The time limit of a call (100 ms for a budget of 100000) counts the time
 * it runs, not the time it waits: Redis takes 300 ms to answer. */
START_TEST(waiting_is_not_running_time)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start(&r, POLICY, "lua_max_instructions = 100000\nlua_call_timeout = 30\n");
    struct ws *c = ws_connect(h->port);
    rpc_expect(c, "slow", "300000", "\"slept\"");
    ck_assert_int_eq(hub_log_count(h, "time limit exceeded"), 0);
    ws_free(c);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Yields from pcall, metamethods, iterators                           */
/* ------------------------------------------------------------------ */

START_TEST(yield_from_pcall_metamethods_iterators)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start(&r, POLICY, NULL);
    struct ws *c = ws_connect(h->port);
    freeReplyObject(srv_cmd(&r, "SET pk pv"));

    /* allowed: the wait goes through them */
    rpc_expect(c, "pcall", "\"pk\"", "[true,\"pv\"]");
    rpc_expect(c, "pcall_err", "\"pk\"", "[false,\"after the wait\"]");
    rpc_expect(c, "index", "\"pk\"", "\"pv\"");
    rpc_expect(c, "iter", "\"it\"", "[1,2,3]");
    rpc_expect(c, "pairs_mt", "\"pk\"", "\"pv\"");
    /* a clear error: called from C that cannot be suspended */
    const char *c_boundary[] = {"tostring", "gsub", "sort"};
    for (size_t i = 0; i < 3; i++) {
        int before = hub_log_count(h, "hub.redis cannot wait here");
        rpc_fails(c, c_boundary[i], "\"pk\"", "internal");
        hub_log_wait(h, "hub.redis cannot wait here", HT_WAIT_MS);
        ck_assert_int_eq(hub_log_count(h, "hub.redis cannot wait here"), before + 1);
    }
    rpc_fails(c, "wrap", "\"pk\"", "internal");
    hub_log_wait(h, "hub.redis cannot be called inside a coroutine the policy created",
                 HT_WAIT_MS);
    rpc_fails(c, "yield", NULL, "internal");
    hub_log_wait(h, "attempt to yield from outside a coroutine", HT_WAIT_MS);
    /* still serving, calls still wait */
    rpc_expect(c, "pcall", "\"pk\"", "[true,\"pv\"]");
    ck_assert_int_eq(metric(h, WAITING), 0);
    ws_free(c);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* A hook's own thread (coroutine.running() in it) cannot be resumed or
 * closed by policy code while the hook waits: the hook then ends normally. */
START_TEST(a_waiting_hook_cannot_be_resumed_by_the_policy)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start_opts(&r, PATIENT, POLICY, "lua_call_timeout = 30\n");
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    freeReplyObject(srv_cmd(&r, "SET pk pv"));
    kill(r.pid, SIGSTOP);
    ws_send_text(a, "{\"op\":\"rpc\",\"method\":\"grab\",\"data\":\"pk\",\"id\":1}");
    hub_metric_wait(h, WAITING, 1, HT_WAIT_MS);
    char *t = rpc(b, "resume_saved", NULL);
    expect_contains(t, "[false,");
    expect_contains(t, "is a hook's own");
    free(t);
    t = rpc(b, "close_saved", NULL);
    expect_contains(t, "is a hook's own");
    free(t);
    kill(r.pid, SIGCONT);
    ws_expect(a, "{\"id\":1,\"ok\":true,\"data\":\"pv\"}");
    ws_free(a);
    ws_free(b);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Bad inputs                                                           */
/* ------------------------------------------------------------------ */

/* A hook calls hub.redis 10,000 times in a loop: each call waits, so the
 * hub serves others in between (another client sees the loop half way),
 * and the budget ends it (500 instructions a command). */
START_TEST(ten_thousand_redis_calls_in_a_loop)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start(&r, POLICY, "lua_call_timeout = 60\n");
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_send_text(a, "{\"op\":\"rpc\",\"method\":\"loop\",\"id\":1}");
    long long seen = 0;
    int64_t dl = ht_now_ms() + HT_WAIT_MS;
    while (seen == 0 && ht_now_ms() < dl) {
        char *t = rpc(b, "progress", NULL);
        yajl_val v = json_parse(t);
        seen = YAJL_GET_INTEGER(json_get(v, "data"));
        yajl_tree_free(v);
        free(t);
    }
    ck_assert_msg(seen > 0 && seen < 10000, "another client was not served during the loop "
                  "(progress %lld)", seen);
    free(ws_expect_error(a, "1", "internal"));
    hub_log_wait(h, "instruction limit exceeded (lua_max_instructions = 1000000)", HT_WAIT_MS);
    /* the loop went on after the other client was served */
    char *t = rpc(b, "progress", NULL);
    yajl_val v = json_parse(t);
    ck_assert_int_gt(YAJL_GET_INTEGER(json_get(v, "data")), seen);
    yajl_tree_free(v);
    free(t);
    char *n = rget(&r, "loop");
    ck_assert_msg(n && atoll(n) > 100 && atoll(n) < 10000, "loop ran %s commands", n);
    free(n);
    ck_assert_int_eq(metric(h, WAITING), 0);
    ws_free(a);
    ws_free(b);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* A reply of 100 MB is refused before it is made into Lua values beyond
 * lua_max_memory: a clear error (one pcall can catch), the state intact. */
START_TEST(reply_of_100_mb)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    char extra[128]; /* 100 MB through the ASan build: time for it */
    snprintf(extra, sizeof extra, "broker = \"redis://127.0.0.1:%d?command_timeout_ms=30000\"\n"
             "lua_call_timeout = 60\n", r.port);
    struct hub *h = start(NULL, POLICY, extra);
    hub_log_wait(h, "broker up", HT_WAIT_MS);
    struct ws *c = ws_connect(h->port);
    size_t len = 100u << 20;
    char *big = malloc(len);
    memset(big, 'x', len);
    redisContext *rc = srv_conn(&r, 20000);
    ck_assert_ptr_nonnull(rc);
    redisReply *x = redisCommand(rc, "SET big %b", big, len);
    ck_assert_msg(x && x->type == REDIS_REPLY_STATUS, "SET big failed");
    freeReplyObject(x);
    redisFree(rc);
    free(big);

    char *t = rpc_slow(c, "big", 60000);
    expect_contains(t, "\"code\":\"internal\"");
    free(t);
    hub_log_wait(h, "hub.redis: the reply (1 values, about 104857", HT_WAIT_MS);
    hub_log_wait(h, "does not fit in what lua_max_memory (67108864 bytes) leaves", HT_WAIT_MS);
    t = rpc_slow(c, "big_pcall", 60000);
    expect_contains(t, "[false,\"");
    expect_contains(t, "does not fit in what lua_max_memory");
    free(t);
    ck_assert_int_lt(metric(h, "luahub_policy_memory_bytes"), 16 << 20);
    rpc_expect(c, "incr", "\"after\"", "1");
    ws_free(c);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* Redis SIGSTOPped while hooks wait: lua_call_timeout ends them (the hook
 * fails: internal, the upgrade 500), other connections are served, and
 * once Redis is back hooks work again. */
START_TEST(redis_stopped_while_hooks_wait)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start(&r, POLICY, NULL);
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    freeReplyObject(srv_cmd(&r, "SET session:tok bob"));
    kill(r.pid, SIGSTOP);
    ws_send_text(a, "{\"op\":\"rpc\",\"method\":\"get\",\"data\":\"k\",\"id\":1}");
    ws_send_text(a, "{\"op\":\"ping\",\"id\":2}");
    hub_metric_wait(h, WAITING, 1, HT_WAIT_MS);
    ws_send_text(b, "{\"op\":\"ping\",\"id\":9}");
    ws_expect(b, "{\"id\":9,\"ok\":true}");
    /* on_connect too: the upgrade is answered 500 after the deadline */
    struct ws_opts o = {.path = "/ws?token=tok"};
    struct ws *none = NULL;
    struct http_resp resp;
    ck_assert_int_eq(ws_handshake(h->port, &o, &none, &resp), 500);
    http_resp_free(&resp);
    free(ws_expect_error(a, "1", "internal"));
    ws_expect(a, "{\"id\":2,\"ok\":true}");
    hub_log_wait(h, "no answer within 1000 ms (lua_call_timeout): hub.redis still waits",
                 HT_WAIT_MS);
    ck_assert_int_ge(metric(h, TIMEOUTS), 2);
    ck_assert_int_eq(metric(h, WAITING), 0);
    kill(r.pid, SIGCONT);
    /* back: the broker may have dropped the link meanwhile; it reconnects */
    rpc_until(b, "incr", "\"back\"", "\"ok\":true", 50,
              "hub.redis did not work again after SIGCONT");
    ws_free(a);
    ws_free(b);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* Redis killed while hooks wait: each gets nil, "unavailable: ..." at once
 * (not at the deadline), and handles it. */
START_TEST(redis_killed_while_hooks_wait)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start_opts(&r, PATIENT, POLICY, "lua_call_timeout = 60\n");
    struct ws *c[3];
    kill(r.pid, SIGSTOP);
    for (int i = 0; i < 3; i++) {
        c[i] = ws_connect(h->port);
        ws_send_text(c[i], "{\"op\":\"rpc\",\"method\":\"cmd\",\"data\":[\"GET\",\"k\"],\"id\":1}");
    }
    hub_metric_wait(h, WAITING, 3, HT_WAIT_MS);
    srv_kill(&r);
    for (int i = 0; i < 3; i++) {
        char *t = ws_recv_text(c[i]);
        expect_contains(t, "\"data\":[null,\"unavailable: hub.redis:");
        free(t);
    }
    ck_assert_int_eq(metric(h, WAITING), 0);
    ck_assert_int_eq(metric(h, TIMEOUTS), 0);
    /* while Redis is down, hub.redis answers at once */
    char *t = rpc(c[0], "cmd", "[\"GET\",\"k\"]");
    expect_contains(t, "unavailable");
    free(t);
    for (int i = 0; i < 3; i++)
        ws_free(c[i]);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* A connection closed while its hook waits: the hook is dropped at once
 * (not at its deadline) and never resumed, even when the reply comes. */
START_TEST(connection_closed_while_its_hook_waits)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start_opts(&r, PATIENT, POLICY, "lua_call_timeout = 60\n");
    freeReplyObject(srv_cmd(&r, "SET session:tok carol"));
    kill(r.pid, SIGSTOP);
    struct ws *a = ws_connect(h->port);
    ws_send_text(a, "{\"op\":\"rpc\",\"method\":\"mark\",\"data\":\"k\",\"id\":1}");
    ws_send_text(a, "{\"op\":\"ping\",\"id\":2}"); /* queued behind it */
    hub_metric_wait(h, WAITING, 1, HT_WAIT_MS);
    ws_abort(a);
    hub_metric_wait(h, WAITING, 0, HT_WAIT_MS);
    hub_metric_wait(h, "luahub_connections", 0, HT_WAIT_MS);
    /* an upgrade whose client goes while on_connect waits */
    int fd = tcp_connect(h->port);
    const char *req = "GET /ws?token=tok HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n";
    tcp_send(fd, req, strlen(req));
    hub_metric_wait(h, WAITING, 1, HT_WAIT_MS);
    tcp_abort(fd);
    kill(r.pid, SIGCONT);
    hub_metric_wait(h, WAITING, 0, HT_WAIT_MS);
    /* the dropped hook was never resumed (its reply came before this
     * INCR's, on the same Redis connection); the hub serves */
    struct ws *b = ws_connect(h->port);
    rpc_expect(b, "incr", "\"sync\"", "1");
    rpc_expect(b, "resumed", NULL, "false");
    ck_assert_int_eq(metric(h, TIMEOUTS), 0);
    ws_free(b);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* A reload while 1,000 calls wait (200 connections' rpcs, 800 timers):
 * they fail at once (the rpcs get internal, in order with what queued),
 * the new policy serves, and the late replies find nothing. */
START_TEST(reload_while_1000_calls_wait)
{
    enum { CONNS = 200, TIMERS = 800 };
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start_opts(&r, PATIENT, POLICY, "lua_call_timeout = 60\n");
    struct ws **c = calloc(CONNS, sizeof(*c));
    kill(r.pid, SIGSTOP);
    for (int i = 0; i < CONNS; i++) {
        c[i] = ws_connect(h->port);
        ws_send_text(c[i], "{\"op\":\"rpc\",\"method\":\"get\",\"data\":\"k\",\"id\":1}");
        ws_send_text(c[i], "{\"op\":\"rpc\",\"method\":\"version\",\"id\":2}");
    }
    struct ws *t = ws_connect(h->port);
    rpc_expect(t, "after_wait", "800", "800");
    hub_metric_wait(h, WAITING, CONNS + TIMERS, HT_WAIT_MS);

    /* the new policy answers "v2" */
    FILE *f = fopen(policy_path, "r+");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    fputs("function M.version() return 'v2' end\n", f);
    fclose(f);
    hub_signal(h, SIGHUP);
    hub_log_wait(h, "policy reload: 1000 calls of the old policy were waiting", HT_WAIT_MS);
    for (int i = 0; i < CONNS; i++) {
        free(ws_expect_error(c[i], "1", "internal"));
        ws_expect(c[i], "{\"id\":2,\"ok\":true,\"data\":\"v2\"}");
    }
    ck_assert_int_eq(metric(h, WAITING), 0);
    ck_assert_int_eq(metric(h, CANCELLED), CONNS + TIMERS);
    hub_log_wait(h, "the policy was reloaded while hub.redis waited", HT_WAIT_MS);
    kill(r.pid, SIGCONT);
    rpc_expect(t, "incr", "\"after\"", "1");
    rpc_expect(t, "version", NULL, "\"v2\"");
    for (int i = 0; i < CONNS; i++)
        ws_free(c[i]);
    free(c);
    ws_free(t);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* SIGTERM while calls wait (a connection's rpc and what queued behind it,
 * a timer, an upgrade): the hub ends cleanly (exit 0: no leak, nothing
 * resumed into freed memory). */
START_TEST(shutdown_while_calls_wait)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start_opts(&r, PATIENT, POLICY, "lua_call_timeout = 60\n");
    kill(r.pid, SIGSTOP);
    struct ws *a = ws_connect(h->port);
    ws_send_text(a, "{\"op\":\"rpc\",\"method\":\"get\",\"data\":\"k\",\"id\":1}");
    ws_send_text(a, "{\"op\":\"rpc\",\"method\":\"after_wait\",\"data\":1,\"id\":2}");
    struct ws *b = ws_connect(h->port);
    rpc_expect(b, "after_wait", "1", "1");
    int fd = tcp_connect(h->port);
    const char *req = "GET /ws?token=tok HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n";
    tcp_send(fd, req, strlen(req));
    hub_metric_wait(h, WAITING, 3, HT_WAIT_MS);
    stop(h);
    close(fd);
    ws_free(a);
    ws_free(b);
    kill(r.pid, SIGCONT);
    srv_stop(&r);
}
END_TEST

/* lua_max_waiting: past it a wait is refused (limit_exceeded to the
 * client, 503 for an upgrade); the queue of one connection: past 64
 * commands, limit_exceeded in their turn. */
START_TEST(caps_on_waiting_calls)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start_opts(&r, PATIENT, POLICY, "lua_max_waiting = 3\nlua_call_timeout = 60\n"
                                                    "max_protocol_errors = 100\n");
    struct ws *c[4];
    kill(r.pid, SIGSTOP);
    for (int i = 0; i < 3; i++) {
        c[i] = ws_connect(h->port);
        ws_send_text(c[i], "{\"op\":\"rpc\",\"method\":\"get\",\"data\":\"k\",\"id\":1}");
    }
    hub_metric_wait(h, WAITING, 3, HT_WAIT_MS);
    c[3] = ws_connect(h->port);
    rpc_fails(c[3], "get", "\"k\"", "limit_exceeded");
    struct ws_opts o = {.path = "/ws?token=tok"};
    struct ws *none = NULL;
    struct http_resp resp;
    ck_assert_int_eq(ws_handshake(h->port, &o, &none, &resp), 503);
    expect_contains(resp.body, "lua_max_waiting");
    http_resp_free(&resp);
    ck_assert_int_eq(metric(h, LIMITS), 2);

    /* 70 pings behind the waiting rpc of c[0]: 64 run, 6 are refused */
    unsigned char *buf = malloc(70 * 64);
    size_t n = 0;
    for (int i = 0; i < 70; i++) {
        char cmd[64];
        snprintf(cmd, sizeof cmd, "{\"op\":\"ping\",\"id\":%d}", 100 + i);
        n += frame(buf + n, cmd);
    }
    ck_assert_int_eq(ws_send_raw(c[0], buf, n), 0);
    free(buf);
    /* the 6 refused (and c[3]'s rpc) are counted when the hub reads them */
    hub_metric_wait(h, "luahub_protocol_errors_total{code=\"limit_exceeded\"}", 7, HT_WAIT_MS);
    kill(r.pid, SIGCONT);
    for (int i = 0; i < 3; i++) {
        char *t = ws_recv_text(c[i]);
        expect_contains(t, "{\"id\":1,\"ok\":true,\"data\":false}");
        free(t);
    }
    for (int i = 0; i < 70; i++) {
        char id[16];
        snprintf(id, sizeof id, "%d", 100 + i);
        if (i < 64) {
            char *want = ht_asprintf("{\"id\":%s,\"ok\":true}", id);
            ws_expect(c[0], want);
            free(want);
        } else {
            free(ws_expect_error(c[0], id, "limit_exceeded"));
        }
    }
    for (int i = 0; i < 4; i++)
        ws_free(c[i]);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Where Redis comes from                                               */
/* ------------------------------------------------------------------ */

/* The memory broker and no policy_redis: hub.redis raises, clearly. */
START_TEST(memory_broker_without_policy_redis)
{
    struct hub *h = start(NULL,
        "function on_rpc(conn, m, d)\n"
        "  if m == 'redis' then return hub.redis('GET', 'x') end\n"
        "  if m == 'pipe' then return hub.redis_pipeline({{'GET', 'x'}}) end\n"
        "  if m == 'rl' then return hub.ratelimit_redis('k', 1, 1) end\n"
        "end\n", NULL);
    struct ws *c = ws_connect(h->port);
    rpc_fails(c, "redis", NULL, "internal");
    hub_log_wait(h, "hub.redis: there is no Redis to talk to: the broker is \"memory\" and "
                    "policy_redis is not set", HT_WAIT_MS);
    rpc_fails(c, "pipe", NULL, "internal");
    hub_log_wait(h, "hub.redis_pipeline: there is no Redis to talk to", HT_WAIT_MS);
    rpc_fails(c, "rl", NULL, "internal");
    hub_log_wait(h, "hub.ratelimit_redis: there is no Redis to talk to", HT_WAIT_MS);
    ws_free(c);
    stop(h);
}
END_TEST

/* policy_redis: hub.redis on a Redis of its own (the broker is memory),
 * reconnected after a restart. */
START_TEST(policy_redis_of_its_own)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start_policy_redis(&r, POLICY);
    struct ws *c = ws_connect(h->port);
    rpc_expect(c, "incr", "\"own\"", "1");
    int port = r.port;
    srv_kill(&r);
    hub_log_wait(h, "policy_redis down", HT_WAIT_MS);
    char *t = rpc(c, "cmd", "[\"INCR\",\"own\"]");
    expect_contains(t, "unavailable");
    free(t);
    srv_start(&r, port, NULL);
    rpc_until(c, "incr", "\"own\"", "\"data\":1}", 50, "policy_redis did not reconnect");
    ws_free(c);
    stop(h);
    srv_stop(&r);
}
END_TEST

/* hub.history and hub.presence from Lua, through the broker's history and
 * presence: the memory broker answers at once (no wait, _i 0); the redis
 * broker's scripts answer later, so the hook waits (_i 1). */
START_TEST(history_and_presence_from_lua)
{
    struct srv r = {0};
    if (_i)
        srv_start(&r, 0, NULL);
    struct hub *h = start(_i ? &r : NULL,
        "function on_connect(conn, req) conn.user = req.query.u return true end\n"
        "function on_rpc(conn, m, d)\n"
        "  if m == 'hist' then local r, e = hub.history(d, {limit = 2, reverse = true})\n"
        "    if not r then return {false, e} end\n"
        "    return {r.offset, r.oldest, #r.messages, r.messages[1].data.i, r.messages[2].offset}\n"
        "  end\n"
        "  if m == 'since' then local r = hub.history(d, {since = 2})\n"
        "    return {#r.messages, r.messages[1].offset} end\n"
        "  if m == 'pres' then local r, e = hub.presence(d)\n"
        "    if not r then return {false, e} end\n"
        "    local users = {} for _, x in ipairs(r.list) do users[#users + 1] = x.user end\n"
        "    table.sort(users) return {r.clients, r.users, users, r.truncated} end\n"
        "  if m == 'local' then local r = hub.presence_local(d) return {r.clients, r.users} end\n"
        "  if m == 'badopt' then return hub.history(d, {limit = -1}) end\n"
        "  if m == 'nopres' then return {hub.presence(d)} end\n"
        "end\n",
        "channels = { [\"h:*\"] = { history_size = 10 }, [\"p:*\"] = { presence = true } }\n");
    struct ws_opts ou = {.path = "/ws?u=ann"}, ov = {.path = "/ws?u=ben"};
    struct ws *a = ws_connect_opts(h->port, &ou), *b = ws_connect_opts(h->port, &ov);
    for (int i = 1; i <= 4; i++) {
        char d[32];
        snprintf(d, sizeof d, "{\"i\":%d}", i);
        ws_publish(a, "h:1", d);
    }
    rpc_expect(a, "hist", "\"h:1\"", "[4,1,2,4,3]");
    rpc_expect(a, "since", "\"h:1\"", "[2,3]");
    char *t = rpc(a, "hist", "\"nohist\"");
    expect_contains(t, "[false,\"not_available: channel 'nohist' has no history");
    free(t);
    rpc_fails(a, "badopt", "\"h:1\"", "internal");
    hub_log_wait(h, "opts.limit must be an integer from 0 to 300", HT_WAIT_MS);
    ws_subscribe(a, "p:1");
    ws_subscribe(b, "p:1");
    rpc_expect(a, "pres", "\"p:1\"", "[2,2,[\"ann\",\"ben\"],false]");
    rpc_expect(a, "local", "\"p:1\"", "[2,2]");
    t = rpc(a, "nopres", "\"h:1\"");
    expect_contains(t, "[null,\"not_available: channel 'h:1' has no presence");
    free(t);
    long long waits = metric(h, "luahub_policy_waits_total");
    if (_i)
        ck_assert_msg(waits == 3, "%lld waits: hist, since and pres wait for Redis", waits);
    else
        ck_assert_int_eq(waits, 0); /* answered at once */
    ws_free(a);
    ws_free(b);
    stop(h);
    if (_i)
        srv_stop(&r);
}
END_TEST

/* ------------------------------------------------------------------ */
/* hub.shared, hub.ratelimit, hub.ratelimit_redis                      */
/* ------------------------------------------------------------------ */

static const char SHARED_POLICY[] =
    "function on_rpc(conn, m, d)\n"
    "  local s = hub.shared\n"
    "  if m == 'basics' then\n"
    "    return {s.set('a', 'x'), s.get('a'), s.add('a', 1), s.add('b', 1), s.incr('b', 2),\n"
    "            s.incr('b', 0.5), s.incr('c', 1), s.incr('c', 1, 10, 100), s.incr('a', 1),\n"
    "            s.set('t', true), s.get('t'), s.delete('t'), s.delete('t'), s.get('t'),\n"
    "            s.ttl('c') > 99 and s.ttl('c') <= 100, s.ttl('b'), s.set('b', nil), s.get('b')}\n"
    "  end\n"
    "  if m == 'set' then return s.set(d[1], d[2], d[3]) end\n"
    "  if m == 'get' then return s.get(d) end\n"
    "  if m == 'fill' then\n"
    "    for i = d[2], d[3] do s.set(d[1] .. i, string.rep('v', 200), d[4]) end return true\n"
    "  end\n"
    "  if m == 'count' then local n = 0\n"
    "    for i = d[2], d[3] do if s.get(d[1] .. i) then n = n + 1 end end return n end\n"
    "  if m == 'colon' then return s:get('a') end\n"
    "  if m == 'badval' then return s.set('a', {}) end\n"
    "  if m == 'rl' then return {hub.ratelimit(d, 1, 3)} end\n"
    "  if m == 'rlr' then return {hub.ratelimit_redis(d, 1, 3)} end\n"
    "  if m == 'rlbad' then return hub.ratelimit('k', 0, 1) end\n"
    "end\n";

START_TEST(shared_dictionary)
{
    struct hub *h = start(NULL, SHARED_POLICY, "lua_shared_memory = 65536\n");
    struct ws *c = ws_connect(h->port);
    rpc_expect(c, "basics", NULL,
               "[true,\"x\",false,true,3,3.5,null,11,null,true,true,true,false,null,true,0,"
               "true]");
    rpc_fails(c, "colon", NULL, "internal");
    hub_log_wait(h, "hub.shared.get: the key must be a string (call hub.shared.get(key, ...), "
                    "with a dot, not a colon)", HT_WAIT_MS);
    rpc_fails(c, "badval", NULL, "internal");
    hub_log_wait(h, "the value must be a string, a number or a boolean (got table)", HT_WAIT_MS);

    /* survives a reload */
    rpc_expect(c, "set", "[\"keep\",\"me\"]", "true");
    hub_signal(h, SIGHUP);
    hub_log_wait(h, "policy reloaded", HT_WAIT_MS);
    rpc_expect(c, "get", "\"keep\"", "\"me\"");

    /* bounded: expired keys go first, then the least recently used */
    rpc_expect(c, "fill", "[\"old\",1,60]", "true");
    rpc_expect(c, "fill", "[\"tmp\",1,60,0.001]", "true");
    rpc_expect(c, "set", "[\"probe\",1,0.001]", "true");
    /* the TTL is the subject: poll until it passed */
    rpc_until(c, "get", "\"probe\"", "\"data\":null", 0, "probe did not expire");
    /* ~340 bytes a key, ~190 fit: 60 old + 60 expired + 100 new needs room,
     * which the expired ones make */
    rpc_expect(c, "fill", "[\"new\",1,100]", "true");
    rpc_expect(c, "count", "[\"old\",1,60]", "60");
    ck_assert_int_eq(metric(h, "luahub_policy_shared_evictions_total"), 0);
    /* 100 more: the least recently used go (new ones: count read the old) */
    rpc_expect(c, "fill", "[\"more\",1,100]", "true");
    ck_assert_int_gt(metric(h, "luahub_policy_shared_evictions_total"), 0);
    rpc_expect(c, "get", "\"new1\"", "null");
    rpc_expect(c, "count", "[\"old\",1,60]", "60");
    rpc_expect(c, "count", "[\"more\",1,100]", "100");
    ck_assert_int_le(metric(h, "luahub_policy_shared_bytes"), 65536);
    ws_free(c);
    stop(h);
}
END_TEST

/* hub.ratelimit (this process) and hub.ratelimit_redis (every hub on the
 * Redis, one script; EVAL again after SCRIPT FLUSH). */
START_TEST(rate_limits)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h1 = start(&r, SHARED_POLICY, NULL);
    char *p1 = policy_path;
    policy_path = NULL;
    struct hub *h2 = start(&r, SHARED_POLICY, NULL);
    struct ws *a = ws_connect(h1->port), *b = ws_connect(h2->port);
    for (int i = 0; i < 3; i++)
        rpc_expect(a, "rl", "\"u\"", "[true,0]");
    char *t = rpc(a, "rl", "\"u\"");
    expect_contains(t, "\"data\":[false,0.");
    free(t);
    rpc_expect(b, "rl", "\"u\"", "[true,0]"); /* per process */
    rpc_fails(a, "rlbad", NULL, "internal");
    hub_log_wait(h1, "hub.ratelimit: rate (per second) must be", HT_WAIT_MS);

    /* shared: two from one hub, one from the other, then none */
    rpc_expect(a, "rlr", "\"v\"", "[true,0]");
    rpc_expect(a, "rlr", "\"v\"", "[true,0]");
    freeReplyObject(srv_cmd(&r, "SCRIPT FLUSH"));
    rpc_expect(b, "rlr", "\"v\"", "[true,0]");
    t = rpc(b, "rlr", "\"v\"");
    expect_contains(t, "\"data\":[false,");
    free(t);
    t = rpc(a, "rlr", "\"v\"");
    expect_contains(t, "\"data\":[false,");
    free(t);
    redisReply *x = srv_cmd(&r, "EXISTS luahub:rl:v");
    ck_assert_int_eq(x->integer, 1);
    freeReplyObject(x);
    ws_free(a);
    ws_free(b);
    stop(h2);
    policy_path = p1;
    stop(h1);
    srv_stop(&r);
}
END_TEST

Suite *lua_async_suite(void)
{
    Suite *s = suite_create("lua_async");
    TCase *tc = tcase_create("redis");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, redis_in_every_hook);
    tcase_add_test(tc, redis_types_in_lua);
    tcase_add_test(tc, commands_queue_behind_a_waiting_hook);
    tcase_add_test(tc, budget_counts_across_waits);
    tcase_add_test(tc, waiting_is_not_running_time);
    tcase_add_test(tc, yield_from_pcall_metamethods_iterators);
    tcase_add_test(tc, a_waiting_hook_cannot_be_resumed_by_the_policy);
    suite_add_tcase(s, tc);
    tc = tcase_create("bad_input");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, ten_thousand_redis_calls_in_a_loop);
    tcase_add_test(tc, reply_of_100_mb);
    tcase_add_test(tc, redis_stopped_while_hooks_wait);
    tcase_add_test(tc, redis_killed_while_hooks_wait);
    tcase_add_test(tc, connection_closed_while_its_hook_waits);
    tcase_add_test(tc, reload_while_1000_calls_wait);
    tcase_add_test(tc, caps_on_waiting_calls);
    tcase_add_test(tc, shutdown_while_calls_wait);
    suite_add_tcase(s, tc);
    tc = tcase_create("sources");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, memory_broker_without_policy_redis);
    tcase_add_test(tc, policy_redis_of_its_own);
    tcase_add_loop_test(tc, history_and_presence_from_lua, 0, 2);
    suite_add_tcase(s, tc);
    tc = tcase_create("shared");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, shared_dictionary);
    tcase_add_test(tc, rate_limits);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(lua_async_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
