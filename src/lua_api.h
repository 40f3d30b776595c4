/* Private contract of the policy layer: policy.c (build, reload, metrics),
 * policy_hooks.c (the hooks' entry points), policy_call.c (calls as
 * coroutines that may wait), sandbox.c (the Lua state, its budgets and its
 * sandbox) and the Lua API, one file per family: lua_hub.c (the `hub`
 * module), lua_conn.c and lua_msg.c (the `conn` and `msg` objects),
 * lua_json.c, lua_crypto.c (HMAC, JWT) and lua_jwt_keys.c (its keys),
 * lua_timer.c (hub.after), lua_redis.c (what hooks wait for), lua_shared.c
 * (hub.shared, hub.ratelimit); lua_stdlib.c and lua_pattern.c (the
 * standard library, charged); policy_lint.c (the warnings of a loaded
 * policy). Nothing else includes it (but the white-box unit suite). Loop
 * thread only.
 *
 * Stack discipline: index 1 of the main state is the message handler given
 * to every lua_pcall, index 2 the reusable `msg` object of on_publish; every
 * dispatch returns the stack to HUB_LUA_BASE. Hooks and timer callbacks
 * run on threads of their own (struct hub_pcall): an API function works on
 * the thread it is called on (its `L`), never on p->L. */
#ifndef LUAHUB_LUA_API_H
#define LUAHUB_LUA_API_H

#include <stddef.h>
#include <stdint.h>

#include <lauxlib.h>
#include <lua.h>

#include "lua_limits.h"
#include "luahub/config.h"
#include "luahub/metrics.h"
#include "luahub/policy.h"
#include "luahub/util.h"


/* The built-in policy (lua/default.lua), embedded at build time. */
extern const char hub_lua_default[];
extern const size_t hub_lua_default_len;

#define HUB_LUA_MSGH 1          /* stack index of the message handler */
#define HUB_LUA_MSG 2           /* stack index of the on_publish msg object */
#define HUB_LUA_BASE 2          /* stack top between calls */

/* What runs right now (p->phase): a hook (enum hub_hook), a timer callback,
 * the main chunk, or nothing. Also the index of the statistics slot. */
enum {
    HUB_PHASE_TIMER = HUB_HOOK__COUNT,
    HUB_PHASE__STATS,                    /* hooks + timer have statistics */
    HUB_PHASE_LOAD = HUB_PHASE__STATS,   /* the main chunk */
    HUB_PHASE_IDLE,
};

struct hub_hook_stats {
    struct hub_hist dur;        /* latency of every call; dur.total is the calls */
    uint64_t errors;            /* every failure: error, bad return, budget */
    uint64_t kills_instructions;
    uint64_t kills_memory;
    /* log rate limit */
    uint64_t log_window_ms;
    unsigned log_count;
    uint64_t log_suppressed;
};

/* Counters that survive a reload (copied into the new policy). */
struct hub_policy_stats {
    struct hub_hook_stats hook[HUB_PHASE__STATS];
    uint64_t reloads_ok;
    uint64_t reloads_failed;
    uint64_t waits;                 /* calls suspended (each wait) */
    uint64_t wait_timeouts;         /* calls ended by lua_call_timeout */
    uint64_t wait_refused;          /* waits refused at lua_max_waiting */
    uint64_t wait_cancelled;        /* waiting calls dropped by a reload or the end */
};

struct hub_ptimer;
struct hub_emit;
struct hub_jwt_keys;

#define HUB_MODULE_DEPTH 32         /* require()s nested in each other */
struct hub_await;

/* One hook or timer call, run as a coroutine on a thread of its own
 * (policy_call.c; docs/internals.md, "How a hook waits"). The entry point
 * (policy_hooks.c, lua_timer.c) fills the inputs and `finish`, pushes the
 * values to keep (nkeep: the conn object of on_connect, the msg of
 * on_publish), then the function and its arguments, on p->L, and runs it
 * with hub_pcall_run(). A call that waits keeps running later from the
 * loop; one that ends calls `finish` with the kept values at base + 1 and
 * the results after them. */
struct hub_pcall {
    struct hub_policy *p;
    lua_State *co;                  /* its thread */
    int co_ref;                     /* ... anchored in the registry */
    int phase;                      /* a hook or HUB_PHASE_TIMER */
    uint64_t conn_id;               /* the hook's connection, 0 if none */
    struct hub_policy_conn *c0;     /* ... valid until the first wait, or NULL */
    struct hub_policy_wait *w;      /* the caller's, or NULL */
    int can_wait;                   /* hub.redis & co may suspend it */
    int nkeep;                      /* values kept on p->L above `base` */
    int keep_ref;                   /* while waiting: a registry table of them */
    int nres;                       /* results the finish reads */
    int base;                       /* p->L's top below the kept values */
    /* Turns the results into the verdict (ok: the call returned; else it
     * failed and only the kept values are there, to release). Fills the
     * outputs below; on_publish emits from here. */
    enum hub_verdict (*finish)(struct hub_policy *p, struct hub_pcall *call, int base, int ok);
    /* Called at the first wait: copy the borrowed inputs (NULL: none). */
    void (*detach)(struct hub_policy *p, struct hub_pcall *call);

    /* inputs (borrowed from the caller until the first wait) */
    const char *ch, *data;
    size_t ch_len, data_len;
    const struct hub_request *req;
    struct hub_connect_result *res;
    hub_emit_fn emit;
    void *emit_ud;
    char ch_copy[HUB_CHANNEL_MAX + 1];

    /* outputs */
    char reason[256];
    char out[HUB_CHANNEL_MAX + 1];  /* on_subscribe: the effective channel */
    size_t out_len;
    struct hub_buf result;          /* on_rpc: the JSON of the result */

    /* budgets across waits */
    int64_t budget_left;
    uint64_t time_left_ns;          /* of running time */
    uint64_t run_ns;                /* running time so far */
    int limit_hit;                  /* refused a wait at lua_max_waiting */

    /* waiting */
    struct hub_await *await;        /* what it waits for; NULL while running */
    const char *what;               /* the function that waits ("hub.redis") */
    int waited;                     /* it has waited at least once */
    uint32_t timeout_ms;            /* from its start to its end, waits included */
    uint64_t deadline_ms;           /* loop time it must end by */
    struct hub_pcall *prev, *next;  /* p->waiting, by deadline */
};

/* Something a call waits for, owned by the API function that started it
 * (lua_redis.c): `call` is the waiting call, set by hub_pcall_wait() and
 * cleared when the call is resumed or dropped (a completion that finds it
 * NULL only frees what it owns). */
struct hub_await {
    struct hub_pcall *call;
    int woken;                      /* hub_pcall_wake() resumed the call for it */
};

struct hub_policy {
    lua_State *L;
    struct hub_policy_host host;    /* ops NULL in --check */
    const struct hub_config *cfg;   /* borrowed */
    char *chunkname;                /* "@/path/policy.lua" or "=default.lua" */
    const char *source_name;        /* the path as printed (chunkname + 1) */

    /* the memory cap and the instruction budget (lua_limits.h): every
     * byte of the state is counted; the cap applies while Lua code runs
     * (lim.cap_on), so pushes from C between calls cannot fail; the count
     * hook takes HUB_LUA_TICK instructions off a call's budget at a time */
    struct hub_lua_limits lim;
    int mem_failed;                 /* an out-of-memory error was raised in this call */

    /* the call in progress */
    int phase;                      /* HUB_PHASE_* or a hook */
    struct hub_policy_conn *cur_conn; /* the hook's connection, or NULL */
    uint64_t cur_conn_id;           /* its id (also during on_connect), 0 if none */
    char err_where[128];            /* set by the message handler */

    /* hooks: registry refs (LUA_NOREF if absent) and "chunk:line" of each */
    int hook_ref[HUB_HOOK__COUNT];
    char hook_where[HUB_HOOK__COUNT][128];

    /* registry refs */
    int ref_env;                    /* the sandbox's _ENV */
    int ref_headers_mt;             /* metatable of req.headers (custom headers) */
    int ref_encode;                 /* cjson.encode */
    int ref_decode;                 /* cjson.safe.decode */
    int ref_null;                   /* cjson.null */
    int ref_array_mt;               /* the metatable hub.json.array gives */
    int ref_pending;                /* weak table: conn id -> conn object made in on_connect */
    unsigned npending;              /* entries put in it (upper bound) */

    /* calls (policy_call.c) */
    struct hub_pcall *running;      /* the call whose coroutine runs, or NULL */
    struct hub_pcall *waiting;      /* calls that wait, earliest deadline first */
    struct hub_pcall *waiting_tail;
    unsigned nwaiting;
    uv_timer_t *wait_timer;         /* the earliest deadline (NULL until needed) */
    int ref_threads;                /* weak-keyed table: the calls' threads (0: none yet) */
    lua_State *idle_co[8];          /* threads of calls that ended, for reuse */
    int idle_ref[8];
    int nidle;
    struct hub_pcall *spare;        /* a call struct to reuse */

    /* timers */
    struct hub_ptimer *timers;
    unsigned ntimers;
    uint64_t timer_pass_ms;         /* loop time of the timer callbacks being run */
    int64_t timer_pass_used;        /* instructions they have used */
    int in_service;                 /* timers may run (not --check, not being built) */

    /* load: lines where hooks were assigned, for messages about them */
    int hook_line[HUB_HOOK__COUNT];
    /* load: registry ref of a table global name -> "file:line" of its
     * first assignment (the lint reads it); LUA_NOREF once loaded */
    int ref_assigned;

    /* hub.jwt_verify's keys (cfg->jwt_keys), read when the policy is built;
     * NULL: none */
    struct hub_jwt_keys *jwt_keys;

    /* require(): the directory of the modules (NULL: none), the registry
     * ref of the table of loaded modules (name -> value, or false while
     * one loads) and how many were loaded */
    char *module_dir;
    int ref_modules;
    unsigned nmodules;
    char *own_module;               /* the policy file's module name when it is in
                                     * module_dir (requiring it is a cycle), or NULL */
    const char *mod_chain[HUB_MODULE_DEPTH]; /* the modules being loaded, outermost first */
    int mod_depth;

    char short_src[LUA_IDSIZE];     /* how Lua names the chunk in messages */

    struct hub_policy_stats st;
    struct hub_buf tb;              /* traceback of the last error (debug log) */
    struct hub_buf warn;            /* warn() pieces being assembled */
    struct hub_emit *emits;         /* on_publish routes of the call in progress */
    size_t emits_cap;
};

#define HUB_LUA_TICK 1000           /* instructions between count hook calls */

/* Work done in C is charged to the instruction budget
 * (docs/internals.md, "Lua: calls outside the instruction budget").
 * Calibrated on the 2-core test machine, where a VM instruction takes
 * about 7 ns: */
#define HUB_COST_COPY 64            /* bytes per instruction: memcpy, memchr, memmem */
#define HUB_COST_SCAN 4             /* bytes per instruction: a C loop over each byte */
#define HUB_COST_JSON 1             /* bytes per instruction: JSON in or out */
#define HUB_COST_ELEM 2             /* instructions per table element read or written from C */
#define HUB_COST_LOG 500            /* instructions per line written to the log */
#define HUB_COST_REDIS 500          /* instructions per Redis command, history or presence
                                     * read (formatting, parsing, the resume) */
#define HUB_COST_SHARED 32          /* instructions per hub.shared / hub.ratelimit call */
/* The time limit of a call: this many ns per instruction of its budget (a
 * VM instruction takes 100 times less), at least HUB_LUA_TIME_MIN_MS. It
 * stops what no count sees: VM instructions that work on long strings
 * (comparisons, numeric coercion) repeated in a loop. */
#define HUB_LUA_NS_PER_INSTR 1000
#define HUB_LUA_TIME_MIN_MS 100

/* The policy of a state (its extra space holds it). */
static inline struct hub_policy *hub_lua_policy(lua_State *L)
{
    return *(struct hub_policy **)lua_getextraspace(L);
}

/* What a valid channel name is, for messages. */
#define HUB_LUA_CHANNEL_CHARS "1 to 255 bytes of A-Z a-z 0-9 and _ : . @ / = # -"
#define HUB_LUA_CHANNEL_RULE "a channel name is " HUB_LUA_CHANNEL_CHARS

/* ---- lua_hub.c: the `hub` module ------------------------------------------ */

/* Creates the `hub` table (with hub.json) and the metatables of conn, msg
 * and timer objects; leaves the hub table on the stack. Needs the refs to
 * cjson (ref_encode/ref_decode/ref_null) set. Raises on memory errors: call
 * protected. */
void hub_lua_open(struct hub_policy *p);

/* Registers the metatable `name` with the metamethods `fns`, protected
 * (getmetatable() on its objects gives false). */
void hub_lua_new_metatable(lua_State *L, const char *name, const luaL_Reg *fns);

/* The policy's time in ms since the Unix epoch: the wall clock, or the
 * host's own clock (policy.h: now_ms) in `luahub test`. What hub.now(),
 * os.time(), os.date() and hub.jwt_verify read. */
double hub_lua_now_ms(const struct hub_policy *p);
/* luaL_error with printf's formats (lua_pushfstring knows only a few, not
 * %u, %zu, %g or %lld): raises the message with the position. */
int hub_lua_error(lua_State *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Argument `arg` of the API function `fn` as a channel name (its length in
 * *len); raises naming `fn` unless it is a valid one. */
const char *hub_lua_check_channel(lua_State *L, int arg, const char *fn, size_t *len);

/* ---- lua_msg.c: the msg object of on_publish ------------------------------ */

/* Registers the msg metatable. */
void hub_lua_msg_open(lua_State *L);
/* Pushes a new msg object on p->L (one is kept at HUB_LUA_MSG and reused
 * by every on_publish call that does not wait). */
void hub_lua_new_msg(struct hub_policy *p);
/* Points the msg object at p->L index `msg` at `data` (borrowed) for one
 * on_publish call / ends that (msg.* raise from then on). */
void hub_lua_msg_begin(struct hub_policy *p, int msg, const char *data, size_t len);
void hub_lua_msg_end(struct hub_policy *p, int msg);
/* The on_publish call of the msg object at p->L index `msg` waits: the
 * object keeps a copy of its bytes (returned, anchored by the object) and
 * HUB_LUA_MSG gets a fresh object for the calls that come meanwhile. */
const char *hub_lua_msg_keep(struct hub_policy *p, int msg);
/* 1 if the value at `idx` is the msg object at `msg` (p->L indices). */
int hub_lua_is_msg(struct hub_policy *p, int msg, int idx);
/* Pushes msg.data of the object at `msg` if it was decoded (returns 1),
 * else pushes nothing and returns 0. */
int hub_lua_msg_push_decoded(struct hub_policy *p, int msg);

/* ---- lua_conn.c: the conn object ------------------------------------------- */

/* Registers the conn metatable. */
void hub_lua_conn_open(lua_State *L);
/* Pushes onto `L` (a thread of the policy's state) the Lua object of an
 * open connection (cached through c->lua_ref, or adopted from on_connect's
 * object). */
void hub_lua_push_conn(struct hub_policy *p, lua_State *L, struct hub_policy_conn *c);
/* Pushes a new conn object for a connection being upgraded (on_connect):
 * id and remote address readable, user and info settable, methods raise. */
void hub_lua_push_pending_conn(struct hub_policy *p, uint64_t id, const char *remote_addr);
/* After on_connect: on `allowed`, moves conn.user / conn.info (JSON) of the
 * pending object at `idx` into `res` and keeps the object for the
 * connection; otherwise the object is marked closed. */
void hub_lua_pending_done(struct hub_policy *p, int idx, int allowed,
                          struct hub_connect_result *res);
/* The connection is gone: its object raises "connection closed" from now. */
void hub_lua_conn_gone(struct hub_policy *p, struct hub_policy_conn *c);

/* ---- lua_json.c: JSON ------------------------------------------------------ */

/* Encodes the value at `idx` as JSON (guarded against output blow-up,
 * checked to be valid UTF-8 JSON) and pushes the string. Raises with
 * `what` ("hub.publish: data") in the message. */
void hub_lua_encode(struct hub_policy *p, lua_State *L, int idx, const char *what);
/* Decodes the string at `idx` with cjson.safe (charged to the budget);
 * pushes the value, or raises "<what>: cannot decode JSON: <cjson's
 * message>". */
void hub_lua_decode(struct hub_policy *p, lua_State *L, int idx, const char *what);
/* hub.json.encode(v); hub.json.decode(s), with cjson.safe's semantics (nil,
 * message on bad input); hub.json.array([t]): t (or a new table) marked to
 * encode as a JSON array even when empty. */
int hub_lua_json_encode(lua_State *L);
int hub_lua_json_decode(lua_State *L);
int hub_lua_json_array(lua_State *L);

/* ---- lua_crypto.c: HMAC and JWT -------------------------------------------- */

/* hub.hmac_sha256(key, text): the hex digest. */
int hub_lua_hmac_sha256(lua_State *L);
/* hub.jwt_verify(token, secret [, leeway]) (HS256) or
 * hub.jwt_verify(token [, {secret, leeway, aud, iss}]) (HS256 with a
 * secret; RS256 and ES256 with the keys of jwt_keys). Checks the signature
 * before reading the claims, then exp, nbf and iat (with `leeway` seconds
 * of clock skew allowed), iss and aud when asked. Returns the claims, or
 * nil and why; raises for a mistake of the caller (docs/lua.md). */
int hub_lua_jwt_verify(lua_State *L);

/* JWT algorithms. */
enum { HUB_JWT_HS256 = 1, HUB_JWT_RS256, HUB_JWT_ES256 };

/* Decodes unpadded base64url (RFC 7515 §2; trailing '=' tolerated) into
 * `out` (at least len * 3 / 4 + 1 bytes). Returns the length or -1. */
long hub_lua_b64url_decode(const char *s, size_t len, unsigned char *out);

/* Writes untrusted bytes s[0..len) for a message into out[0..n): at most
 * n - 4 of them, bytes that are not printable ASCII as '?', "..." when
 * cut. */
void hub_lua_show(const char *s, size_t len, char *out, size_t n);

/* ---- lua_jwt_keys.c: the keys of hub.jwt_verify ---------------------------- */

/* Reads the files of cfg->jwt_keys (PEM or JWKS) into p->jwt_keys (NULL
 * when the conf names none). Keys that cannot be used (a private key, RSA
 * under 2048 bits, bad encoding...) are errors appended to `errs` as
 * "FILE: key N (kid 'x'): why"; keys of another kind are skipped with a
 * warning in `warns`. Returns 0, or -1 (p->jwt_keys then NULL). */
int hub_lua_jwt_keys_load(struct hub_policy *p, struct hub_config_errors *errs,
                          struct hub_config_errors *warns);
void hub_lua_jwt_keys_free(struct hub_jwt_keys *keys);

/* Checks the signature `sig` of data[0..dlen) (the token's
 * "header.payload") for a token of `alg` (RS256 or ES256) and `kid` (NULL:
 * none) against p->jwt_keys (not NULL): the key of that kid, or else the
 * keys of that alg without a kid. Charges each check to the call's
 * budget (may raise the budget stop). Returns 0, or -1 with the reason
 * (for the caller of hub.jwt_verify) in why[0..n). */
int hub_lua_jwt_keys_verify(struct hub_policy *p, lua_State *L, int alg, const char *kid,
                            size_t kidlen, const char *data, size_t dlen,
                            const unsigned char *sig, size_t slen, char *why, size_t n);

/* ---- lua_timer.c: hub.after ------------------------------------------------ */

/* Registers the timer metatable (with its cancel method). */
void hub_lua_timer_open(lua_State *L);
/* hub.after(seconds, fn): a timer object. */
int hub_lua_after(lua_State *L);
/* Starts the timers created while the policy was being built (once it is
 * in service). */
void hub_lua_timers_start(struct hub_policy *p);
/* Cancels every timer: closes the uv handles (freed in their close
 * callbacks; those only touch the handle) and drops the Lua refs. */
void hub_lua_timers_close(struct hub_policy *p);
/* For each pending timer, pushes its function and calls fn(p, ud), which
 * pops it (the lint's roots). */
void hub_lua_timers_each_fn(struct hub_policy *p, void (*fn)(struct hub_policy *p, void *ud),
                            void *ud);

/* ---- lua_redis.c: what hooks wait for ----------------------------------------- */

/* Adds hub.redis, hub.redis_pipeline, hub.ratelimit_redis, hub.history and
 * hub.presence to the table on top of L. */
void hub_lua_redis_open(lua_State *L);
/* The arguments of hub.ratelimit and hub.ratelimit_redis (key, rate,
 * burst[, cost]), checked; raises naming `fn`. Returns the key. */
const char *hub_lua_ratelimit_args(lua_State *L, const char *fn, size_t *klen, double *rate,
                                   double *burst, double *cost);

/* ---- lua_shared.c: hub.shared, hub.ratelimit ----------------------------------- */

/* The process's dictionary outlives a policy: each policy holds it while
 * it exists (hold sets its cap; the first creates it, the last release
 * frees it). */
void hub_lua_shared_hold(uint64_t max_bytes);
void hub_lua_shared_release(void);
/* Adds hub.shared and hub.ratelimit to the table on top of L. */
void hub_lua_shared_open(lua_State *L);
void hub_lua_shared_metrics(struct hub_buf *b);

/* ---- sandbox.c ---------------------------------------------------------- */

/* Creates p->L (p->lim.mem_max, p->lim.budget set): the limits of
 * lua_limits.c set for a policy (the counting allocator, the count hook
 * every HUB_LUA_TICK instructions, the time limit, allocations charged at
 * HUB_COST_ALLOC), the panic and warn handlers, the sandboxed _ENV (registry ref
 * p->ref_env; while the main chunk runs, its __newindex records the lines of
 * hook assignments in p->hook_line) with `hub` in it, and the stack layout
 * HUB_LUA_MSGH / HUB_LUA_MSG. Returns 0, or -1 if no state could be made. */
int hub_sandbox_open(struct hub_policy *p);

/* The main chunk has run: global assignments become plain. */
void hub_sandbox_loaded(struct hub_policy *p);

/* Arms a fresh budget (and clears the failure flags) for a new call. */
void hub_sandbox_arm(struct hub_policy *p);

/* Charges `n` instructions of C work (e.g. walking a value to encode) to
 * the budget of the call in progress; raises the budget stop when it runs
 * out or the call is past its time limit. No-op outside calls. Call it
 * before the work it pays for, or every few thousand instructions' worth
 * of it, so that no C loop runs long between two checks. */
static inline void hub_sandbox_charge(struct hub_policy *p, lua_State *L, int64_t n)
{
    hub_lua_limits_charge(&p->lim, L, n);
}

/* Fails the call in progress with an out-of-memory error (that pcall
 * cannot catch, like the allocator's) for memory counted outside the
 * allocator (a timer's C side). Does not return. */
void hub_sandbox_oom(struct hub_policy *p, lua_State *L);

/* The time limit of a call with an instruction budget of `budget`, in ms. */
uint64_t hub_sandbox_time_limit_ms(int64_t budget);

/* ---- lua_stdlib.c, lua_pattern.c ------------------------------------------ */

/* Replaces, in the standard library tables of L (string, table, utf8, os,
 * the globals and the string metatable), every function whose C work grows
 * with its arguments by one that charges that work to the budget first
 * (see lua_stdlib.c). Call before the sandbox copies the tables. */
void hub_lua_stdlib_bound(lua_State *L);

/* Sets find, match, gmatch and gsub of the string table at `strlib` to the
 * step-counted matcher of lua_pattern.c. */
void hub_lua_pattern_open(lua_State *L, int strlib);

/* ---- policy_call.c: running one call ------------------------------------- */

/* A call for `phase` (c: the hook's connection, valid until the first wait,
 * or NULL; conn_id its id); its base is p->L's top now. Fill the inputs,
 * finish and nkeep/nres, push the kept values, the function and its
 * arguments, then hub_pcall_run(). */
struct hub_pcall *hub_pcall_new(struct hub_policy *p, int phase, struct hub_policy_conn *c,
                                uint64_t conn_id, struct hub_policy_wait *w);

/* Runs a call up to its end or its first wait. Ended: returns the verdict
 * (the outputs are in the call; free it with hub_pcall_free). Waits:
 * returns HUB_WAIT; the call goes on from the loop and, when it ends,
 * w->done() gets the outcome and the call is freed. */
enum hub_verdict hub_pcall_run(struct hub_pcall *call, int nargs);
void hub_pcall_free(struct hub_pcall *call);

/* For API functions that wait (hub.redis & co), on the thread `L` that
 * called them: raises unless the call may wait here. `fn` (a static
 * string) names the function in messages, also in the timeout's. Call it
 * before starting the operation. */
void hub_pcall_check(lua_State *L, const char *fn);
/* Suspends the running call until hub_pcall_wake(a); then `k` runs (on the
 * call's thread, protected) and returns the function's results. Use as
 * `return hub_pcall_wait(...)`, after hub_pcall_check(). */
int hub_pcall_wait(lua_State *L, struct hub_await *a, lua_KFunction k, lua_KContext ctx);
/* A completion for `a`: resumes its call (no-op when the call is gone).
 * From the loop only (a Redis reply, a broker callback), never while a call
 * runs. */
void hub_pcall_wake(struct hub_await *a);
/* 1 if the thread at `idx` of L is one of the calls' own (policy code may
 * not resume or close those). */
int hub_pcall_is_thread(struct hub_policy *p, lua_State *L, int idx);
/* Ends every waiting call with a failure saying `why` (a reload, the end):
 * logged and counted in `stats` (the policy that goes on), done() called.
 */
void hub_pcall_cancel_all(struct hub_policy *p, const char *why,
                          struct hub_policy_stats *stats);
/* The deadline timer and the spare threads go (the policy is destroyed). */
void hub_pcall_close(struct hub_policy *p);

/* Runs the function under `nargs` arguments with the budgets on, as
 * `phase`; nothing is counted or logged. Returns the lua_pcall status,
 * LUA_ERRRUN also when the call ended normally after its budget ran out
 * (the results are then popped and a nil error object pushed). */
int hub_policy_call(struct hub_policy *p, int phase, int nargs, int nres);

/* Writes what went wrong in the last call into `out`: the budget stop, an
 * out-of-memory error, or the error object (with a position; `where` if it
 * has none). Pops the error object when `status` is an error. */
void hub_policy_describe_failure(struct hub_policy *p, int status, const char *where,
                                 struct hub_buf *out);

/* Counts and logs the failure of the last call (`status`, error on top). */
void hub_policy_fail(struct hub_policy *p, int phase, uint64_t conn_id, int status);

/* A hook returned something it may not: logged and counted like an error. */
void hub_policy_bad_return(struct hub_policy *p, int phase, uint64_t conn_id,
                           const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* Logs one failure line "hook=<phase> <text> [conn N]" (rate-limited per
 * phase), without counting it. */
void hub_policy_log_failure(struct hub_policy *p, int phase, uint64_t conn_id,
                            const char *text);

/* Encodes the value at `idx` as JSON under the budgets of the call that
 * produced it; the string stays on the stack (*s, *n point into it).
 * Returns 0, or -1 after counting and logging the failure. */
int hub_policy_encode_result(struct hub_policy *p, int phase, uint64_t conn_id, int idx,
                             const char *what, const char **s, size_t *n);

/* Name of a phase: "on_publish", "timer", "load". */
const char *hub_policy_phase_name(int phase);

/* ---- policy.c: building ------------------------------------------------------ */

/* Appends a message to `e` (a list of errors or of warnings; NULL: the
 * message is dropped). */
void hub_policy_add_msg(struct hub_config_errors *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Reads the regular file `path`, at most `max` bytes, into `out` (NUL-
 * terminated). Returns 0, or -1 with the reason in why[0..n) ("No such
 * file or directory", "not a regular file", "larger than 1 MiB"). A
 * blocking read of a local file: at load and reload only. */
int hub_policy_read_file(const char *path, size_t max, struct hub_buf *out, char *why,
                         size_t n);

/* ---- policy_lint.c: warnings ---------------------------------------------- */

/* Appends to `warns` ("FILE:LINE: message") what is likely a mistake in
 * the policy just loaded (its main chunk has run; p->ref_assigned is set):
 * global functions named on_* that are not hooks, hooks that take more
 * parameters than the hub passes or whose parameters look shifted,
 * globals assigned while loading that no hook or timer uses, and globals
 * that hooks or timers read but nothing assigns (docs/lua.md, "Warnings").
 * Reads the state only (no Lua code runs, memory uncapped). */
void hub_policy_lint(struct hub_policy *p, struct hub_config_errors *warns);

/* ---- policy_hooks.c: the hooks' entry points --------------------------------- */

/* Creates the metatable of on_connect's req.headers (lookups in any case)
 * as p->ref_headers_mt. */
void hub_policy_req_open(struct hub_policy *p);

#endif
