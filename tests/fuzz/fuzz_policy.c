/* Fuzz target: the policy host's translation of what a hook returns
 * (src/policy.c, and the conn, msg and JSON code of src/lua_api.c it
 * calls), through the real host: hub_policy_new on tests/fuzz/policy.lua,
 * then hub_policy_on_connect / on_subscribe / on_publish / on_rpc as the
 * server calls them. The hooks of policy.lua return values made from the
 * fuzz input (JSON, or a small program that builds any Lua value: see the
 * top of policy.lua); the host around the policy is a fake that records
 * nothing (what the policy may ask of the sessions is not under test).
 *
 * The first byte chooses the hook and how the rest is read: 'c' 's' 'p'
 * 'r' (on_connect, on_subscribe, on_publish, on_rpc) with a program, 'C'
 * 'S' 'P' 'R' with JSON; any other byte: its low two bits the hook, the
 * next bit JSON.
 *
 * Checks, beyond no crash and no leak: a verdict always comes back, and
 * the state is left ready for the next call (no hook running, the stack
 * at its base); what an ALLOW carries is what docs/lua.md promises: a
 * valid channel name, messages with valid names and JSON data (at most
 * 1024), a JSON result, conn.user of 1 to 1024 bytes, conn.info as JSON,
 * conn.protocol one of those offered; a DENY of on_connect has no status
 * or one from 400 to 599; nothing is published unless the hook allowed
 * it; and the error reply the session sends with a refusal's reason is
 * valid UTF-8 when the reason the hook returned was. */
#include <string.h>

#include <lua.h>

#include "fuzz.h"
#include "lua_api.h" /* white-box: the policy's state after each call */
#include "luahub/log.h"
#include "luahub/policy.h"
#include "luahub/proto.h"

/* ---- a fake host: the sessions are not under test here ------------------
 * No connection is open besides the one of the call, and what the policy
 * asks of the host changes nothing. */

static struct hub_policy_conn *fake_find(void *ud, uint64_t id)
{
    return NULL;
}

static struct hub_policy_conn *fake_find_named(void *ud, const char *client)
{
    return NULL;
}

static void fake_name(void *ud, uint64_t id, char *out, size_t n)
{
    snprintf(out, n, "fuzz-%llu", (unsigned long long)id);
}

static void fake_addr(void *ud, const struct hub_policy_conn *c, char *out, size_t n)
{
    snprintf(out, n, "127.0.0.1");
}

static int fake_false(void *ud)
{
    return 0;
}

static int fake_closing(void *ud, const struct hub_policy_conn *c)
{
    return 0;
}

static void fake_send(void *ud, struct hub_policy_conn *c, const char *json, size_t len)
{
}

static void fake_close(void *ud, struct hub_policy_conn *c, unsigned code, const char *r)
{
}

static int fake_sub(void *ud, struct hub_policy_conn *c, const char *ch, size_t len)
{
    return 0;
}

static void fake_channels(void *ud, const struct hub_policy_conn *c,
                          void (*fn)(void *arg, const char *ch, size_t len), void *arg)
{
}

static void fake_each(void *ud, void (*fn)(void *arg, struct hub_policy_conn *c), void *arg)
{
}

static size_t fake_publish(void *ud, const char *ch, size_t len, const char *d, size_t dl)
{
    return 0;
}

static size_t fake_count(void *ud, const char *ch, size_t len)
{
    return 0;
}

static void fake_presence(void *ud, const char *ch, size_t len, uint64_t *clients,
                          uint64_t *users)
{
    *clients = *users = 0;
}

static const struct hub_policy_host_ops fake_ops = {
    .conn = fake_find, .conn_named = fake_find_named, .conn_name = fake_name,
    .conn_addr = fake_addr, .conn_closing = fake_closing, .conn_send = fake_send,
    .conn_close = fake_close, .conn_subscribe = fake_sub, .conn_unsubscribe = fake_sub,
    .conn_channels = fake_channels, .each_conn = fake_each, .publish = fake_publish,
    .subscribers = fake_count, .presence_local = fake_presence, .shutting_down = fake_false,
};

static struct hub_config cfg;
static struct hub_policy_host host;
static struct hub_policy *policy;
static uint64_t next_id;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    struct hub_config_errors errs = {0};

    (void)argc;
    (void)argv;
    hub_log_set_level(-1); /* every failure of the hooks is logged: not here */
    hub_config_defaults(&cfg);
    cfg.policy = hub_xstrdup(FUZZ_POLICY_LUA);
    /* The budgets are met sooner than with the defaults (runaway loops,
     * memory bombs, walks of shared tables all end in them): the same
     * paths, at a fraction of the time per input. */
    cfg.lua_max_memory = 8u << 20;
    cfg.lua_max_instructions = 50000;
    host = (struct hub_policy_host){.ops = &fake_ops, .cfg = &cfg};
    policy = hub_policy_new(&host, &errs);
    FUZZ_CHECK(policy, "%s does not load: %s", FUZZ_POLICY_LUA, errs.n ? errs.v[0] : "?");
    return 0;
}

/* The globals FUZZ and FUZZ_JSON of the policy's environment. */
static void set_input(const char *p, size_t n, int json)
{
    lua_State *L = policy->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, policy->ref_env);
    lua_pushliteral(L, "FUZZ");
    lua_pushlstring(L, p, n);
    lua_rawset(L, -3);
    lua_pushliteral(L, "FUZZ_JSON");
    lua_pushboolean(L, json);
    lua_rawset(L, -3);
    lua_pop(L, 1);
}

/* LAST: the second value the hook returned, when it was a string. */
static int last_reason_utf8(void)
{
    lua_State *L = policy->L;
    size_t n;
    lua_rawgeti(L, LUA_REGISTRYINDEX, policy->ref_env);
    lua_pushliteral(L, "LAST");
    lua_rawget(L, -2); /* raw: reading a global that is nil raises */
    const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
    int ok = s && fuzz_utf8_valid(s, n);
    lua_pop(L, 2);
    return ok;
}

/* FUZZ_POLICY_SHOW=1: what each call decided (README.md). */
static void show(const char *hook, enum hub_verdict v, const char *what, size_t n)
{
    static const char *const names[] = {"ALLOW", "DENY", "FAIL"};
    if (getenv("FUZZ_POLICY_SHOW"))
        fprintf(stderr, "%s: %s %.*s\n", hook, v <= HUB_FAIL ? names[v] : "?", (int)n,
                what ? what : "");
}

static void check_idle(enum hub_verdict v)
{
    FUZZ_CHECK(v == HUB_ALLOW || v == HUB_DENY || v == HUB_FAIL, "verdict %d", (int)v);
    FUZZ_CHECK(policy->phase == HUB_PHASE_IDLE, "a hook is still running (phase %d)",
               policy->phase);
    FUZZ_CHECK(lua_gettop(policy->L) == HUB_LUA_BASE, "Lua stack at %d after the call",
               lua_gettop(policy->L));
    FUZZ_CHECK(!policy->lim.cap_on && !policy->running && !policy->nwaiting,
               "the call left the memory cap on or a call behind");
}

/* The error reply the session sends with a refusal's reason. */
static void check_reason(enum hub_verdict v, const char *reason, size_t cap)
{
    FUZZ_CHECK(memchr(reason, '\0', cap), "reason not terminated");
    if (v != HUB_DENY || !last_reason_utf8())
        return;
    struct hub_buf b = {0};
    hub_proto_encode_error(&b, (struct hub_span){"1", 1}, HUB_PERR_FORBIDDEN, reason);
    FUZZ_CHECK(hub_proto_json_valid(b.p, b.len),
               "the hook's reason was UTF-8, the error reply is not: %s", b.p);
    hub_buf_free(&b);
}

static int offered(const char *p)
{
    return !strcmp(p, "luahub") || !strcmp(p, "token.x");
}

static void run_connect(struct hub_policy_conn *c)
{
    static const struct hub_header headers[] = {
        {"host", "fuzz", 4, 4},
        {"sec-websocket-protocol", "luahub, token.x", 22, 15},
        {"origin", "http://fuzz", 6, 11},
        {"x-token", "t\xc3\xa9", 7, 3},
    };
    struct hub_request r = {
        .method = "GET", .method_len = 3,
        .target = "/ws?a=1&b=%FF", .target_len = 13,
        .path = "/ws", .path_len = 3,
        .query = "a=1&b=%FF", .query_len = 9,
        .http_minor = 1,
        .headers = headers, .nheaders = 4,
        .upgrade_websocket = 1, .keep_alive = 1,
        .peer = "127.0.0.1", .peer_loopback = 1,
    };
    struct hub_connect_result res;

    memset(&res, 0, sizeof(res));
    enum hub_verdict v = hub_policy_on_connect(policy, &r, c->id, &res, NULL);
    show("on_connect", v, v == HUB_ALLOW ? res.user : res.reason, 300);
    check_idle(v);
    FUZZ_CHECK(memchr(res.reason, '\0', sizeof(res.reason)), "reason not terminated");
    if (v == HUB_DENY)
        FUZZ_CHECK(res.status == 0 || (res.status >= 400 && res.status <= 599),
                   "refused with HTTP status %u", res.status);
    if (v == HUB_ALLOW) {
        if (res.user)
            FUZZ_CHECK(strlen(res.user) >= 1 && strlen(res.user) <= 1024, "conn.user of %zu bytes",
                       strlen(res.user));
        if (res.info_json)
            FUZZ_CHECK(hub_proto_json_valid(res.info_json, strlen(res.info_json)),
                       "conn.info is not valid JSON: %s", res.info_json);
        if (res.protocol)
            FUZZ_CHECK(offered(res.protocol), "conn.protocol '%s' was not offered",
                       res.protocol);
    } else {
        FUZZ_CHECK(!res.user && !res.info_json && !res.protocol,
                   "a refused connection came back with conn fields");
    }
    /* the session takes them (session_host.c), and frees them when it closes */
    c->user = res.user;
    c->info_json = res.info_json;
    c->protocol = res.protocol;
}

static void run_subscribe(struct hub_policy_conn *c)
{
    char out[HUB_CHANNEL_MAX + 1], reason[256];
    size_t out_len = 0;

    enum hub_verdict v = hub_policy_on_subscribe(policy, c, "room:1", 6, out, &out_len,
                                                 reason, sizeof(reason), NULL);
    show("on_subscribe", v, v == HUB_ALLOW ? out : reason, 300);
    check_idle(v);
    if (v == HUB_ALLOW)
        FUZZ_CHECK(hub_proto_channel_valid(out, out_len) && out[out_len] == '\0',
                   "subscribed to an invalid channel name");
    check_reason(v, reason, sizeof(reason));
}

static int emits;

static void on_emit(void *ud, const char *ch, size_t chl, const char *data, size_t dl)
{
    (void)ud;
    emits++;
    FUZZ_CHECK(hub_proto_channel_valid(ch, chl), "published to an invalid channel name");
    FUZZ_CHECK(hub_proto_json_valid(data, dl), "published data that is not JSON: %.*s",
               (int)dl, data);
}

static void run_publish(struct hub_policy_conn *c, const char *data, size_t len)
{
    char reason[256];

    emits = 0;
    enum hub_verdict v = hub_policy_on_publish(policy, c, "room:1", 6, data, len, on_emit,
                                               NULL, reason, sizeof(reason), NULL);
    show("on_publish", v, reason, 300);
    check_idle(v);
    FUZZ_CHECK(v == HUB_ALLOW || emits == 0, "published %d messages, then refused", emits);
    FUZZ_CHECK(emits <= 1024, "%d messages from one publish", emits);
    check_reason(v, reason, sizeof(reason));
}

static void run_rpc(struct hub_policy_conn *c, const char *data, size_t len)
{
    char reason[256];
    struct hub_buf result = {0};

    enum hub_verdict v = hub_policy_on_rpc(policy, c, "m", 1, data, len, &result, reason,
                                           sizeof(reason), NULL);
    show("on_rpc", v, v == HUB_ALLOW ? result.p : reason, v == HUB_ALLOW ? result.len : 300);
    check_idle(v);
    if (v == HUB_ALLOW)
        FUZZ_CHECK(result.len && hub_proto_json_valid(result.p, result.len),
                   "rpc result that is not JSON: %.*s", (int)result.len, result.p);
    else
        FUZZ_CHECK(result.len == 0, "a refused rpc has a result");
    check_reason(v, reason, sizeof(reason));
    hub_buf_free(&result);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct hub_policy_conn conn = {.id = ++next_id};
    static const char letters[] = "csprCSPR";
    int hook, json;

    if (!size)
        return 0;
    const char *l = data[0] ? strchr(letters, data[0]) : NULL;
    if (l) {
        hook = (int)(l - letters) % 4;
        json = l - letters >= 4;
    } else {
        hook = data[0] & 3;
        json = (data[0] >> 2) & 1;
    }
    const char *p = (const char *)data + 1;
    size_t n = size - 1;
    set_input(p, n, json);

    /* what a client publishes, or the data of its rpc: valid JSON, as
     * the protocol decoder guarantees */
    const char *d = json && hub_proto_json_valid(p, n) ? p : "{\"a\":[1,\"x\"]}";
    size_t dl = d == p ? n : strlen(d);
    switch (hook) {
    case 0: run_connect(&conn); break;
    case 1: run_subscribe(&conn); break;
    case 2: run_publish(&conn, d, dl); break;
    default: run_rpc(&conn, d, dl); break;
    }
    /* the connection closes */
    hub_policy_conn_gone(policy, &conn);
    free(conn.user);
    free(conn.info_json);
    free(conn.protocol);
    /* What the call made is garbage now: collecting it here keeps the
     * input's mallocs and frees even, which spares libFuzzer a full leak
     * scan of the process after every input (-detect_leaks). */
    lua_gc(policy->L, LUA_GCCOLLECT);
    return 0;
}
