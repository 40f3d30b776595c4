/* What a hook waits for: hub.redis and hub.redis_pipeline (one command, or
 * several sent together, on the policy's Redis through the host), hub.history
 * and hub.presence (the hub's, through the host), hub.ratelimit_redis (one
 * Redis script). Each starts its operation and suspends the calling hook
 * (policy_call.c: hub_pcall_check, hub_pcall_wait); the completion resumes
 * it, and a continuation function turns the answer into Lua values on the
 * hook's thread, where a memory or budget error fails the hook like any
 * other (docs/lua.md, "Waiting: Redis, history, presence"; docs/internals.md,
 * "How a hook waits").
 *
 * The operation belongs to this file: its completion can come after the
 * hook is gone (a deadline, a closed connection, a reload): `a.call` is then
 * NULL and the completion only frees it. Redis replies are borrowed during
 * their callback only: the hook is resumed inside it. History and presence
 * answers may come before the hook has suspended (the memory broker answers
 * at once): they are copied, and handed over without waiting. */
#include "lua_api.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>
#include <lua.h>
#include <openssl/sha.h>

#include "luahub/msg.h"

#define PIPELINE_MAX 1000           /* commands in one hub.redis_pipeline */
#define ARGS_MAX 100000             /* arguments of one command */
#define COMMAND_BYTES_MAX (16u << 20) /* bytes of one command's arguments */
#define REPLY_OVERHEAD 48           /* bytes of Lua memory a reply value costs beyond its text */
#define KEY_MAX 1024                /* bytes of a rate limit key */

/* ---- Redis commands ---------------------------------------------------- */

/* Commands that would break the shared connection for everyone on it (its
 * replies would no longer match its commands, or its state would change
 * under the broker) or block it. */
static const struct {
    const char *name;
    const char *why;
} refused[] = {
    {"subscribe", "it turns the connection into a subscriber"},
    {"psubscribe", "it turns the connection into a subscriber"},
    {"ssubscribe", "it turns the connection into a subscriber"},
    {"unsubscribe", "it is for subscribers"},
    {"punsubscribe", "it is for subscribers"},
    {"sunsubscribe", "it is for subscribers"},
    {"monitor", "it turns the connection into a monitor"},
    {"multi", "the connection is shared, a transaction would take in other calls' "
              "commands (use EVAL for atomic work)"},
    {"exec", "transactions are not available (use EVAL)"},
    {"discard", "transactions are not available (use EVAL)"},
    {"watch", "transactions are not available (use EVAL)"},
    {"unwatch", "transactions are not available (use EVAL)"},
    {"select", "it changes the database of a shared connection"},
    {"auth", "it changes the user of a shared connection"},
    {"hello", "it changes the protocol of a shared connection"},
    {"reset", "it resets a shared connection"},
    {"quit", "it closes a shared connection"},
    {"client", "it changes a shared connection"},
    {"sync", "it is for replicas"},
    {"psync", "it is for replicas"},
    {"replconf", "it is for replicas"},
    {"shutdown", "it stops Redis"},
    {"debug", "it can block Redis"},
    {"blpop", "it blocks the connection"},
    {"brpop", "it blocks the connection"},
    {"brpoplpush", "it blocks the connection"},
    {"blmove", "it blocks the connection"},
    {"blmpop", "it blocks the connection"},
    {"bzpopmin", "it blocks the connection"},
    {"bzpopmax", "it blocks the connection"},
    {"bzmpop", "it blocks the connection"},
    {"wait", "it blocks the connection"},
    {"waitaof", "it blocks the connection"},
};

/* NULL, or why the command (argv[0..argc)) may not be sent. */
static const char *refusal(int argc, const char **argv, const size_t *lens)
{
    for (size_t i = 0; i < hub_countof(refused); i++)
        if (lens[0] == strlen(refused[i].name) && !strncasecmp(argv[0], refused[i].name, lens[0]))
            return refused[i].why;
    if ((lens[0] == 5 && !strncasecmp(argv[0], "xread", 5)) ||
        (lens[0] == 10 && !strncasecmp(argv[0], "xreadgroup", 10)))
        for (int i = 1; i < argc; i++)
            if (lens[i] == 5 && !strncasecmp(argv[i], "block", 5))
                return "BLOCK blocks the connection";
    return NULL;
}

/* A hub.redis operation: one command, a pipeline, or a rate limit script. */
struct redis_op {
    struct hub_await a;
    unsigned n;                     /* commands */
    unsigned sent;                  /* ... sent (the others failed to send) */
    unsigned pending;               /* replies still to come */
    unsigned got;                   /* replies handed to the hook */
    int pipeline;                   /* answer with a list */
    int ratelimit;                  /* hub.ratelimit_redis: EVALSHA, maybe EVAL after */
    int status;                     /* of the reply being handed over */
    const struct hub_broker_reply *reply; /* ... borrowed, during the hand-over */
    char *retry;                    /* ratelimit: the key to EVAL after NOSCRIPT (owned) */
    size_t retry_len;
    char argv_buf[3][32];           /* ratelimit: rate, burst, cost */
};

static void op_free(struct redis_op *op)
{
    free(op->retry);
    free(op);
}

static void on_reply(void *ud, int status, const struct hub_broker_reply *reply)
{
    struct redis_op *op = ud;

    op->pending--;
    if (op->a.call) {
        op->status = status;
        op->reply = reply;
        hub_pcall_wake(&op->a);
        op->reply = NULL;
    }
    if (!op->pending && !op->a.call)
        op_free(op);
}

/* Lua memory a reply would take (its strings and its values). */
static size_t reply_size(const struct hub_broker_reply *r, size_t *values)
{
    size_t n = REPLY_OVERHEAD + (r->type == HUB_REPLY_ARRAY ? 0 : r->len);
    (*values)++;
    if (r->type == HUB_REPLY_ARRAY)
        for (size_t i = 0; i < r->n; i++)
            n += reply_size(&r->elem[i], values);
    return n;
}

/* Pushes a reply: integer, string (bulk and status), false (nil), a list
 * (array), or {err = "..."} (an error inside an array, or of a pipeline's
 * command). */
static void push_reply(lua_State *L, const struct hub_broker_reply *r)
{
    luaL_checkstack(L, 4, "hub.redis: reply nested too deep");
    switch (r->type) {
    case HUB_REPLY_INTEGER:
        lua_pushinteger(L, (lua_Integer)r->integer);
        break;
    case HUB_REPLY_STRING:
    case HUB_REPLY_STATUS:
        lua_pushlstring(L, r->str, r->len);
        break;
    case HUB_REPLY_ERROR:
        lua_createtable(L, 0, 1);
        lua_pushlstring(L, r->str, r->len);
        lua_setfield(L, -2, "err");
        break;
    case HUB_REPLY_ARRAY:
        lua_createtable(L, r->n > INT32_MAX ? 0 : (int)r->n, 0);
        for (size_t i = 0; i < r->n; i++) {
            push_reply(L, &r->elem[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    default:
        lua_pushboolean(L, 0);
        break;
    }
}

/* Raises unless the reply fits in what lua_max_memory leaves, then charges
 * its conversion. */
static void check_reply(struct hub_policy *p, lua_State *L, const char *fn,
                        const struct hub_broker_reply *r)
{
    size_t values = 0, size = reply_size(r, &values);
    size_t room = p->lim.mem_max > p->lim.mem_used ? p->lim.mem_max - p->lim.mem_used : 0;
    if (size > room)
        hub_lua_error(L, "%s: the reply (%zu values, about %zu bytes) does not fit in what "
                      "lua_max_memory (%zu bytes) leaves (%zu bytes): ask for less",
                   fn, values, size, p->lim.mem_max, room);
    hub_sandbox_charge(p, L, (int64_t)(size / HUB_COST_COPY) +
                                 (int64_t)values * HUB_COST_ELEM);
}

/* "unavailable: ..." for a failed send or a lost reply. */
static void push_unavailable(lua_State *L, const char *fn, int status)
{
    lua_pushnil(L);
    if (status == HUB_ENOTAVAIL)
        lua_pushfstring(L, "not_available: %s: no Redis", fn);
    else
        lua_pushfstring(L, "unavailable: %s: Redis is not connected, too busy, or did not "
                           "answer", fn);
}

/* Collects the arguments of one command from the values at [first, last]
 * of L (strings and numbers) into argv/lens (pointing into L's strings,
 * anchored there: numbers are replaced by their text). */
static int collect(lua_State *L, const char *fn, int first, int last, const char **argv,
                   size_t *lens, size_t *bytes)
{
    int argc = 0;
    for (int i = first; i <= last; i++) {
        int t = lua_type(L, i);
        if (t == LUA_TNUMBER) {
            char num[64];
            if (lua_isinteger(L, i))
                snprintf(num, sizeof(num), "%lld", (long long)lua_tointeger(L, i));
            else
                snprintf(num, sizeof(num), "%.17g", (double)lua_tonumber(L, i));
            lua_pushstring(L, num);
            lua_replace(L, i);
        } else if (t != LUA_TSTRING) {
            luaL_error(L, "%s: argument %d is a %s: Redis takes strings and numbers", fn,
                       i - first + 1, luaL_typename(L, i));
        }
        argv[argc] = lua_tolstring(L, i, &lens[argc]);
        *bytes += lens[argc];
        argc++;
    }
    if (!argc)
        luaL_error(L, "%s: no command", fn);
    if (*bytes > COMMAND_BYTES_MAX)
        hub_lua_error(L, "%s: the command is over %u bytes", fn, COMMAND_BYTES_MAX);
    const char *why = refusal(argc, argv, lens);
    if (why)
        luaL_error(L, "%s: %s is not allowed: %s", fn, argv[0], why);
    return argc;
}

/* Sends one command of op. Returns 0 or the host's error. */
static int send_one(struct hub_policy *p, struct redis_op *op, int argc, const char **argv,
                    const size_t *lens)
{
    const struct hub_policy_host *h = &p->host;
    int rc = h->ops->redis ? h->ops->redis(h->ud, argc, argv, lens, on_reply, op)
                           : HUB_ENOTAVAIL;
    if (rc == 0) {
        op->sent++;
        op->pending++;
    }
    return rc;
}

/* A send failed with HUB_ENOTAVAIL: there is no Redis at all. That is the
 * conf's doing, not a moment's: it raises. */
static void no_redis(lua_State *L, const char *fn)
{
    luaL_error(L, "%s: there is no Redis to talk to: the broker is \"memory\" and "
                  "policy_redis is not set (docs/config.md)", fn);
}

static int redis_k(lua_State *L, int status, lua_KContext ctx);
static int ratelimit_k(lua_State *L, struct redis_op *op, const struct hub_broker_reply *r);

/* hub.redis(cmd, ...): the reply, or nil and a message. */
static int l_redis(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    int top = lua_gettop(L);
    size_t bytes = 0;

    if (top > ARGS_MAX)
        return luaL_error(L, "hub.redis: more than %d arguments", ARGS_MAX);
    hub_pcall_check(L, "hub.redis");
    const char **argv = lua_newuserdatauv(L, (size_t)(top ? top : 1) * sizeof(*argv), 0);
    size_t *lens = lua_newuserdatauv(L, (size_t)(top ? top : 1) * sizeof(*lens), 0);
    int argc = collect(L, "hub.redis", 1, top, argv, lens, &bytes);
    hub_sandbox_charge(p, L, HUB_COST_REDIS + (int64_t)(bytes / HUB_COST_COPY));

    struct redis_op *op = hub_xcalloc(1, sizeof(*op));
    op->n = 1;
    int rc = send_one(p, op, argc, argv, lens);
    if (rc < 0) {
        op_free(op);
        if (rc == HUB_ENOTAVAIL)
            no_redis(L, "hub.redis");
        push_unavailable(L, "hub.redis", rc);
        return 2;
    }
    return hub_pcall_wait(L, &op->a, redis_k, (lua_KContext)op);
}

/* hub.redis_pipeline({{cmd, ...}, ...}): the commands sent together; a list
 * of their replies (an error as {err = "..."}), or nil and a message when
 * none could be sent. Every command is checked before any is sent. */
static int l_redis_pipeline(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);

    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    lua_Integer n = (lua_Integer)lua_rawlen(L, 1);
    if (n < 1 || n > PIPELINE_MAX)
        return hub_lua_error(L, "hub.redis_pipeline: expected a list of 1 to %d commands (got "
                             "%lld)", PIPELINE_MAX, (long long)n);
    hub_pcall_check(L, "hub.redis_pipeline");
    /* pass 0 checks and charges every command, pass 1 sends them */
    struct redis_op *op = NULL;
    int rc = 0;
    for (int pass = 0; pass < 2 && rc == 0; pass++) {
        for (lua_Integer i = 1; i <= n && rc == 0; i++) {
            int base = lua_gettop(L);
            size_t bytes = 0;
            if (lua_rawgeti(L, 1, i) != LUA_TTABLE)
                return hub_lua_error(L, "hub.redis_pipeline: command %lld is a %s: expected a "
                                     "list {cmd, arg, ...}", (long long)i,
                                  luaL_typename(L, -1));
            lua_Integer k = (lua_Integer)lua_rawlen(L, -1);
            if (k < 1 || k > ARGS_MAX || !lua_checkstack(L, (int)k + 8))
                return hub_lua_error(L, "hub.redis_pipeline: command %lld has %lld arguments "
                                     "(1 to %d)", (long long)i, (long long)k, ARGS_MAX);
            for (lua_Integer j = 1; j <= k; j++)
                lua_rawgeti(L, base + 1, j);
            const char **argv = lua_newuserdatauv(L, (size_t)k * sizeof(*argv), 0);
            size_t *lens = lua_newuserdatauv(L, (size_t)k * sizeof(*lens), 0);
            int argc = collect(L, "hub.redis_pipeline", base + 2, base + 1 + (int)k, argv,
                               lens, &bytes);
            if (pass == 0) {
                hub_sandbox_charge(p, L, HUB_COST_REDIS + (int64_t)(bytes / HUB_COST_COPY));
            } else {
                if (!op) { /* once sent, the replies free it whatever happens here */
                    op = hub_xcalloc(1, sizeof(*op));
                    op->n = (unsigned)n;
                    op->pipeline = 1;
                }
                rc = send_one(p, op, argc, argv, lens);
            }
            lua_settop(L, base);
        }
    }
    if (!op->sent) {
        op_free(op);
        if (rc == HUB_ENOTAVAIL)
            no_redis(L, "hub.redis_pipeline");
        push_unavailable(L, "hub.redis_pipeline", rc);
        return 2;
    }
    lua_createtable(L, (int)n, 0); /* the replies, at index 2 */
    return hub_pcall_wait(L, &op->a, redis_k, (lua_KContext)op);
}

/* ---- hub.ratelimit_redis ------------------------------------------------ */

/* GCRA (a token bucket kept as one time) on Redis's clock, so that every
 * process and node agrees: KEYS[1] holds the "theoretical arrival time" in
 * ms; a request of `cost` is allowed when it is at most `burst` intervals
 * ahead. Returns {1, 0} or {0, ms to wait}. */
static const char ratelimit_script[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000\n"
    "local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "local interval = 1000 / rate\n"
    "local tat = tonumber(redis.call('GET', KEYS[1])) or now\n"
    "if tat < now then tat = now end\n"
    "local new_tat = tat + cost * interval\n"
    "local allow_at = new_tat - burst * interval\n"
    "if allow_at > now then return {0, math.ceil(allow_at - now)} end\n"
    "redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX',\n"
    "           math.max(1, math.ceil(new_tat - now)))\n"
    "return {1, 0}\n";

static const char *script_sha(void)
{
    static char hex[2 * SHA_DIGEST_LENGTH + 1];
    if (!hex[0]) {
        unsigned char d[SHA_DIGEST_LENGTH];
        SHA1((const unsigned char *)ratelimit_script, sizeof(ratelimit_script) - 1, d);
        for (int i = 0; i < SHA_DIGEST_LENGTH; i++)
            snprintf(hex + 2 * i, 3, "%02x", d[i]);
    }
    return hex;
}

/* Sends EVALSHA (or, after NOSCRIPT, EVAL with the script) for op. */
static int send_ratelimit(struct hub_policy *p, struct redis_op *op, int eval)
{
    const char *argv[7] = {eval ? "EVAL" : "EVALSHA",
                           eval ? ratelimit_script : script_sha(), "1", op->retry,
                           op->argv_buf[0], op->argv_buf[1], op->argv_buf[2]};
    size_t lens[7];
    for (int i = 0; i < 7; i++)
        lens[i] = strlen(argv[i]);
    lens[3] = op->retry_len;
    return send_one(p, op, 7, argv, lens);
}

/* A number argument in [min, max]: raises naming it otherwise. */
static double check_number(lua_State *L, int arg, const char *fn, const char *what,
                           double min, double max)
{
    double v = (double)luaL_checknumber(L, arg);
    if (!(v >= min && v <= max))
        hub_lua_error(L, "%s: %s must be %g to %g (got %g)", fn, what, min, max, v);
    return v;
}

/* The arguments shared by hub.ratelimit and hub.ratelimit_redis: key
 * (1 to KEY_MAX bytes), rate (per second), burst, cost (default 1). */
const char *hub_lua_ratelimit_args(lua_State *L, const char *fn, size_t *klen, double *rate,
                                   double *burst, double *cost)
{
    const char *key = luaL_checklstring(L, 1, klen);
    if (*klen == 0 || *klen > KEY_MAX)
        luaL_error(L, "%s: the key must be 1 to %d bytes", fn, KEY_MAX);
    *rate = check_number(L, 2, fn, "rate (per second)", 1e-6, 1e9);
    *burst = check_number(L, 3, fn, "burst", 1, 1e9);
    *cost = lua_isnoneornil(L, 4) ? 1 : check_number(L, 4, fn, "cost", 0, 1e9);
    return key;
}

/* hub.ratelimit_redis(key, rate, burst[, cost]): allowed, retry_after (s);
 * or nil and a message when Redis cannot answer. */
static int l_ratelimit_redis(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    size_t klen;
    double rate, burst, cost;
    const char *key = hub_lua_ratelimit_args(L, "hub.ratelimit_redis", &klen, &rate, &burst,
                                             &cost);
    hub_pcall_check(L, "hub.ratelimit_redis");
    hub_sandbox_charge(p, L, HUB_COST_REDIS + (int64_t)(klen / HUB_COST_COPY));

    struct redis_op *op = hub_xcalloc(1, sizeof(*op));
    const char *prefix = p->cfg->redis_prefix ? p->cfg->redis_prefix : "";
    size_t plen = strlen(prefix);
    op->retry_len = plen + 3 + klen;
    op->retry = hub_xmalloc(op->retry_len + 1);
    memcpy(op->retry, prefix, plen);
    memcpy(op->retry + plen, "rl:", 3);
    memcpy(op->retry + plen + 3, key, klen);
    op->retry[op->retry_len] = '\0';
    snprintf(op->argv_buf[0], sizeof(op->argv_buf[0]), "%.17g", rate);
    snprintf(op->argv_buf[1], sizeof(op->argv_buf[1]), "%.17g", burst);
    snprintf(op->argv_buf[2], sizeof(op->argv_buf[2]), "%.17g", cost);
    op->n = 1;
    op->ratelimit = 1;
    int rc = send_ratelimit(p, op, 0);
    if (rc < 0) {
        op_free(op);
        if (rc == HUB_ENOTAVAIL)
            no_redis(L, "hub.ratelimit_redis");
        push_unavailable(L, "hub.ratelimit_redis", rc);
        return 2;
    }
    return hub_pcall_wait(L, &op->a, redis_k, (lua_KContext)op);
}

/* The rate limit script answered (or failed). */
static int ratelimit_k(lua_State *L, struct redis_op *op, const struct hub_broker_reply *r)
{
    struct hub_policy *p = hub_lua_policy(L);
    const char *fn = "hub.ratelimit_redis";

    if (r && r->type == HUB_REPLY_ERROR && r->len >= 8 && !memcmp(r->str, "NOSCRIPT", 8) &&
        op->sent == 1) {
        /* Redis does not have the script (a restart, SCRIPT FLUSH): EVAL
         * sends it, and Redis keeps it for the next EVALSHA */
        int rc = send_ratelimit(p, op, 1);
        if (rc == 0)
            return hub_pcall_wait(L, &op->a, redis_k, (lua_KContext)op);
        r = NULL;
    }
    if (!r) {
        push_unavailable(L, fn, HUB_EUNAVAILABLE);
        return 2;
    }
    if (r->type == HUB_REPLY_ERROR) {
        lua_pushnil(L);
        lua_pushlstring(L, r->str, r->len);
        return 2;
    }
    if (r->type != HUB_REPLY_ARRAY || r->n != 2 || r->elem[0].type != HUB_REPLY_INTEGER ||
        r->elem[1].type != HUB_REPLY_INTEGER) {
        lua_pushnil(L);
        lua_pushfstring(L, "%s: unexpected answer from the script", fn);
        return 2;
    }
    lua_pushboolean(L, r->elem[0].integer == 1);
    lua_pushnumber(L, (lua_Number)r->elem[1].integer / 1000.0);
    return 2;
}

/* ---- the continuation of hub.redis & co ----------------------------------- */

static int redis_k(lua_State *L, int status, lua_KContext ctx)
{
    struct redis_op *op = (struct redis_op *)ctx;
    struct hub_policy *p = hub_lua_policy(L);
    const char *fn = op->pipeline ? "hub.redis_pipeline" : "hub.redis";
    (void)status;

    if (!op->a.woken)
        return luaL_error(L, "%s: resumed without its reply", fn);
    op->a.woken = 0;
    const struct hub_broker_reply *r = op->status == HUB_OK ? op->reply : NULL;
    op->got++;
    if (op->ratelimit)
        return ratelimit_k(L, op, r);
    if (!op->pipeline) {
        if (!r) {
            push_unavailable(L, fn, HUB_EUNAVAILABLE);
            return 2;
        }
        check_reply(p, L, fn, r);
        if (r->type == HUB_REPLY_ERROR) {
            lua_pushnil(L);
            lua_pushlstring(L, r->str, r->len);
            return 2;
        }
        push_reply(L, r);
        return 1;
    }
    /* a pipeline: each reply into the list at index 2, in order */
    if (r) {
        check_reply(p, L, fn, r);
        push_reply(L, r);
    } else {
        lua_createtable(L, 0, 1);
        lua_pushliteral(L, "unavailable: Redis did not answer");
        lua_setfield(L, -2, "err");
    }
    lua_rawseti(L, 2, (lua_Integer)op->got);
    if (op->got < op->sent)
        return hub_pcall_wait(L, &op->a, redis_k, ctx);
    for (unsigned i = op->sent + 1; i <= op->n; i++) {
        lua_createtable(L, 0, 1);
        lua_pushliteral(L, "unavailable: not sent (Redis is not connected or too busy)");
        lua_setfield(L, -2, "err");
        lua_rawseti(L, 2, (lua_Integer)i);
    }
    lua_settop(L, 2);
    return 1;
}

/* ---- hub.history and hub.presence ------------------------------------------- */

/* A history or presence read. Its answer is copied (it may come before the
 * hook suspends: the memory broker answers at once). */
struct read_op {
    struct hub_await a;
    int in_api;                     /* the API function has not returned yet */
    int done;                       /* the answer is in */
    int status;
    /* history */
    struct hub_stream_pos top;
    uint64_t oldest;
    struct hub_msg **msgs;
    size_t n;
    /* presence */
    uint64_t clients, users;
    struct hub_buf list;
    int truncated;
};

static void read_free(struct read_op *op)
{
    for (size_t i = 0; i < op->n; i++)
        hub_msg_unref(op->msgs[i]);
    free(op->msgs);
    hub_buf_free(&op->list);
    free(op);
}

/* The answer is in: hand it over (the hook waits) or leave it for the API
 * function (it has not returned). */
static void read_done(struct read_op *op)
{
    op->done = 1;
    if (op->in_api)
        return;
    hub_pcall_wake(&op->a);
    read_free(op);
}

static void on_history(void *ud, int status, const struct hub_history_result *r)
{
    struct read_op *op = ud;
    op->status = status;
    if (status == HUB_OK) {
        op->top = r->top;
        op->oldest = r->oldest;
        op->n = r->n;
        op->msgs = hub_xmalloc((r->n ? r->n : 1) * sizeof(*op->msgs));
        for (size_t i = 0; i < r->n; i++)
            op->msgs[i] = hub_msg_ref(r->msgs[i]);
    }
    read_done(op);
}

static void on_presence(void *ud, int status, const struct hub_presence_result *r)
{
    struct read_op *op = ud;
    op->status = status;
    if (status == HUB_OK) {
        op->clients = r->clients;
        op->users = r->users;
        op->truncated = r->truncated;
        if (r->list)
            hub_buf_append(&op->list, r->list->p, r->list->len);
    }
    read_done(op);
}

/* nil and why a read failed (HUB_E* code). */
static int push_read_error(lua_State *L, const char *fn, const char *ch, int status,
                           const char *what)
{
    lua_pushnil(L);
    if (status == HUB_ENOTAVAIL)
        lua_pushfstring(L, "not_available: channel '%s' has no %s (see the conf's channels)",
                        ch, what);
    else
        lua_pushfstring(L, "unavailable: %s: the broker is unavailable, try again later", fn);
    return 2;
}

/* {offset =, epoch =, oldest =, messages = {{offset =, data =}, ...}}. */
static int push_history(lua_State *L, struct read_op *op, const char *ch)
{
    struct hub_policy *p = hub_lua_policy(L);
    if (op->status != HUB_OK)
        return push_read_error(L, "hub.history", ch, op->status, "history");
    size_t bytes = 0;
    for (size_t i = 0; i < op->n; i++)
        bytes += op->msgs[i]->payload_len + 2 * REPLY_OVERHEAD;
    size_t room = p->lim.mem_max > p->lim.mem_used ? p->lim.mem_max - p->lim.mem_used : 0;
    if (bytes > room)
        hub_lua_error(L, "hub.history: %zu messages (about %zu bytes) do not fit in what "
                      "lua_max_memory leaves (%zu bytes): ask for fewer (limit)", op->n,
                   bytes, room);
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, (lua_Integer)op->top.offset);
    lua_setfield(L, -2, "offset");
    lua_pushstring(L, op->top.epoch);
    lua_setfield(L, -2, "epoch");
    lua_pushinteger(L, (lua_Integer)op->oldest);
    lua_setfield(L, -2, "oldest");
    lua_createtable(L, op->n > INT32_MAX ? 0 : (int)op->n, 0);
    lua_Integer k = 0;
    for (size_t i = 0; i < op->n; i++) {
        struct hub_msg *m = op->msgs[i];
        const char *d;
        size_t dl;
        if (hub_msg_delivery_data((const char *)hub_msg_payload(m), m->payload_len, &d,
                                  &dl) < 0)
            continue;
        lua_createtable(L, 0, 2);
        lua_pushinteger(L, (lua_Integer)m->offset);
        lua_setfield(L, -2, "offset");
        lua_pushlstring(L, d, dl);
        hub_lua_decode(p, L, -1, "hub.history: data");
        lua_remove(L, -2);
        lua_setfield(L, -2, "data");
        lua_rawseti(L, -2, ++k);
    }
    lua_setfield(L, -2, "messages");
    return 1;
}

/* {clients =, users =, list = {{client =, user =, info =}, ...}, truncated =}. */
static int push_presence(lua_State *L, struct read_op *op, const char *ch)
{
    struct hub_policy *p = hub_lua_policy(L);
    if (op->status != HUB_OK)
        return push_read_error(L, "hub.presence", ch, op->status, "presence");
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, (lua_Integer)op->clients);
    lua_setfield(L, -2, "clients");
    lua_pushinteger(L, (lua_Integer)op->users);
    lua_setfield(L, -2, "users");
    lua_pushboolean(L, op->truncated);
    lua_setfield(L, -2, "truncated");
    if (op->list.len)
        lua_pushlstring(L, op->list.p, op->list.len);
    else
        lua_pushliteral(L, "[]");
    hub_lua_decode(p, L, -1, "hub.presence: list");
    lua_remove(L, -2);
    lua_setfield(L, -2, "list");
    return 1;
}

static int history_conv(lua_State *L)
{
    return push_history(L, lua_touserdata(L, 1), lua_tostring(L, 2));
}

static int presence_conv(lua_State *L)
{
    return push_presence(L, lua_touserdata(L, 1), lua_tostring(L, 2));
}

/* The answer came before the hook could wait: converted at once, under a
 * protected call so that `op` is freed whatever happens (then raised
 * again). Index 1 is the channel. */
static int push_now(lua_State *L, struct read_op *op, lua_CFunction conv)
{
    struct hub_policy *p = hub_lua_policy(L);
    int top = lua_gettop(L);
    lua_pushcfunction(L, conv);
    lua_pushlightuserdata(L, op);
    lua_pushvalue(L, 1);
    int st = lua_pcall(L, 2, LUA_MULTRET, 0);
    read_free(op);
    if (st != LUA_OK) {
        if (st == LUA_ERRMEM)
            p->mem_failed = 1; /* not catchable, like the allocator's */
        return lua_error(L);
    }
    return lua_gettop(L) - top;
}

/* Index 1 is the channel in both. */
static int history_k(lua_State *L, int status, lua_KContext ctx)
{
    struct read_op *op = (struct read_op *)ctx;
    (void)status;
    if (!op->a.woken)
        return luaL_error(L, "hub.history: resumed without its answer");
    return push_history(L, op, lua_tostring(L, 1));
}

static int presence_k(lua_State *L, int status, lua_KContext ctx)
{
    struct read_op *op = (struct read_op *)ctx;
    (void)status;
    if (!op->a.woken)
        return luaL_error(L, "hub.presence: resumed without its answer");
    return push_presence(L, op, lua_tostring(L, 1));
}

/* An integer field of the options table at 2, or `def`. */
static lua_Integer opt_int(lua_State *L, const char *field, lua_Integer def, lua_Integer min,
                           lua_Integer max)
{
    lua_getfield(L, 2, field);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < min || lua_tointeger(L, -1) > max)
        hub_lua_error(L, "hub.history: opts.%s must be an integer from %lld to %lld", field,
                   (long long)min, (long long)max);
    lua_Integer v = lua_tointeger(L, -1);
    lua_pop(L, 1);
    return v;
}

/* hub.history(channel[, {limit =, since =, reverse =}]). */
static int l_history(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    size_t len;
    const char *ch = hub_lua_check_channel(L, 1, "hub.history", &len);
    struct hub_history_query q = {.limit = p->cfg->recover_max};

    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        q.limit = (uint32_t)opt_int(L, "limit", p->cfg->recover_max, 0, p->cfg->recover_max);
        q.since = (uint64_t)opt_int(L, "since", 0, 0, INT64_MAX);
        lua_getfield(L, 2, "reverse");
        q.reverse = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lua_settop(L, 1);
    hub_pcall_check(L, "hub.history");
    hub_sandbox_charge(p, L, HUB_COST_REDIS);
    const struct hub_policy_host *h = &p->host;
    struct read_op *op = hub_xcalloc(1, sizeof(*op));
    op->in_api = 1;
    int rc = h->ops->history ? h->ops->history(h->ud, ch, len, &q, on_history, op)
                             : HUB_ENOTAVAIL;
    op->in_api = 0;
    if (rc < 0 || op->done) {
        if (rc < 0)
            op->status = rc;
        return push_now(L, op, history_conv);
    }
    return hub_pcall_wait(L, &op->a, history_k, (lua_KContext)op);
}

/* hub.presence(channel): who is in a presence channel, on every process. */
static int l_presence(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    size_t len;
    const char *ch = hub_lua_check_channel(L, 1, "hub.presence", &len);

    lua_settop(L, 1);
    hub_pcall_check(L, "hub.presence");
    hub_sandbox_charge(p, L, HUB_COST_REDIS);
    const struct hub_policy_host *h = &p->host;
    struct read_op *op = hub_xcalloc(1, sizeof(*op));
    op->in_api = 1;
    int rc = h->ops->presence
                 ? h->ops->presence(h->ud, ch, len, p->cfg->presence_max, on_presence, op)
                 : HUB_ENOTAVAIL;
    op->in_api = 0;
    if (rc < 0 || op->done) {
        if (rc < 0)
            op->status = rc;
        return push_now(L, op, presence_conv);
    }
    return hub_pcall_wait(L, &op->a, presence_k, (lua_KContext)op);
}

void hub_lua_redis_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"redis", l_redis},
        {"redis_pipeline", l_redis_pipeline},
        {"ratelimit_redis", l_ratelimit_redis},
        {"history", l_history},
        {"presence", l_presence},
        {NULL, NULL},
    };
    luaL_setfuncs(L, fns, 0);
}
