/* The warnings of a policy that loaded (docs/lua.md, "Warnings"): mistakes
 * that would otherwise pass silently, found by reading the loaded state
 * once, after the main chunk ran. No Lua code runs here.
 *
 * - A global function named on_* that is not a hook (did you mean?).
 * - A hook that takes more parameters than the hub passes (the extra ones
 *   are always nil), or whose parameters are named as the hub's, shifted
 *   (`on_publish(channel, msg)`: conn is missing). lua_getinfo's nparams
 *   and lua_getlocal's parameter names.
 * - Globals the main chunk (or a module) assigned that no hook or timer
 *   uses, and globals hooks or timers read that nothing assigns.
 *
 * Which globals a function uses is in its bytecode, which the C API gives
 * only through lua_dump: the binary chunk of Lua 5.4 (its format is in
 * docs/internals.md, "Reading the bytecode") holds each
 * function's instructions, constants, upvalue names and nested functions.
 * A global read is GETTABUP on the upvalue named _ENV with a constant
 * string key; a write is SETTABUP. The functions looked at are those a
 * hook or a pending timer can reach: the hooks, the functions nested in
 * them, the values of their upvalues and of the globals they read, and
 * what tables among those hold (fields and metatables), transitively.
 *
 * Limits (said in docs/lua.md): a name computed at run time
 * (`_G["on_" .. x]`) is not seen. A function that reads _G or uses _ENV
 * as a value counts every string constant it has as a global it uses
 * (rawget(_G, "x") uses x). The bytecode format is checked on a known
 * chunk first; if this liblua's differs, the global checks are skipped. */
#include "lua_api.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#define VISIT_MAX 20000             /* functions and tables looked at */
#define STEPS_MAX 1000000           /* table entries and instructions read */
#define NEST_MAX 250                /* functions nested in functions */
#define WARN_SHOW 48                /* bytes of a name in a message */

/* Lua 5.4's opcodes and instruction fields: op 7 bits, A 8,
 * k 1, B 8, C 8. */
#define OP_GETUPVAL 9
#define OP_GETTABUP 11
#define OP_SETTABUP 15
#define I_OP(i) ((int)((i) & 0x7f))
#define I_A(i) ((int)(((i) >> 7) & 0xff))
#define I_B(i) ((int)(((i) >> 16) & 0xff))
#define I_C(i) ((int)(((i) >> 24) & 0xff))

static const int hook_nparams[HUB_HOOK__COUNT] = {2, 2, 2, 3, 3, 3};
static const char *const hook_params[HUB_HOOK__COUNT][3] = {
    {"conn", "req", NULL},        {"conn", "channel", NULL},   {"conn", "channel", NULL},
    {"conn", "channel", "msg"},   {"conn", "method", "data"},  {"conn", "code", "reason"},
};

/* ---- warnings, sorted by file and line ------------------------------------ */

struct warning {
    char *file;
    int line;
    char *msg;
};

struct warnings {
    struct warning *v;
    size_t n;
};

static void warn(struct warnings *w, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void warn(struct warnings *w, const char *file, int line, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    w->v = hub_xrealloc(w->v, (w->n + 1) * sizeof(*w->v));
    w->v[w->n++] = (struct warning){hub_xstrdup(file), line, hub_xstrdup(msg)};
}

/* A warning at "file:line" (as the load recorded it). */
static void warn_at(struct warnings *w, const char *where, const char *msg)
{
    const char *colon = strrchr(where, ':');
    char file[512];
    int line = colon ? atoi(colon + 1) : 0;
    snprintf(file, sizeof(file), "%.*s", colon ? (int)(colon - where) : (int)strlen(where),
             where);
    warn(w, file, line, "%s", msg);
}

static int by_place(const void *a, const void *b)
{
    const struct warning *x = a, *y = b;
    int c = strcmp(x->file, y->file);
    return c ? c : x->line - y->line;
}

/* Where function `idx` is defined: its file (full path) and line. */
static int defined_at(lua_State *L, int idx, char *file, size_t n)
{
    lua_Debug ar;
    lua_pushvalue(L, idx);
    if (!lua_getinfo(L, ">S", &ar)) {
        snprintf(file, n, "?");
        return 0;
    }
    snprintf(file, n, "%s", ar.source[0] == '@' || ar.source[0] == '=' ? ar.source + 1
                                                                        : ar.short_src);
    return ar.linedefined;
}

/* ---- hooks and on_* functions ----------------------------------------------- */

static void lint_on_names(struct hub_policy *p, int env, struct warnings *w)
{
    lua_State *L = p->L;
    const char *hooks[HUB_HOOK__COUNT];
    char file[512];
    for (int h = 0; h < HUB_HOOK__COUNT; h++)
        hooks[h] = hub_policy_phase_name(h);
    lua_pushnil(L);
    while (lua_next(L, env)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        int known = 0;
        for (int h = 0; k && h < HUB_HOOK__COUNT; h++)
            known |= !strcmp(k, hooks[h]);
        if (k && !known && !strncmp(k, "on_", 3) && lua_type(L, -1) == LUA_TFUNCTION) {
            int line = defined_at(L, -1, file, sizeof(file));
            const char *near = hub_conf_near(k, hooks, HUB_HOOK__COUNT, sizeof(hooks[0]));
            if (near)
                warn(w, file, line, "function '%.*s' is not a hook and will never be called "
                     "(did you mean '%s'?)", WARN_SHOW, k, near);
            else
                warn(w, file, line, "function '%.*s' is not a hook and will never be called "
                     "(hooks: on_connect, on_subscribe, on_unsubscribe, on_publish, on_rpc, "
                     "on_disconnect)", WARN_SHOW, k);
        }
        lua_pop(L, 1);
    }
}

/* The hook's parameters: more than the hub passes, or the hub's names at
 * other places. */
static void lint_params(struct hub_policy *p, int h, struct warnings *w)
{
    lua_State *L = p->L;
    const char *name = hub_policy_phase_name(h), *const *want = hook_params[h];
    char file[512], sig[96];
    lua_Debug ar;

    lua_rawgeti(L, LUA_REGISTRYINDEX, p->hook_ref[h]);
    int fn = lua_gettop(L), line = defined_at(L, fn, file, sizeof(file));
    lua_pushvalue(L, fn);
    lua_getinfo(L, ">u", &ar);
    snprintf(sig, sizeof(sig), "%s(%s, %s%s%s)", name, want[0], want[1], want[2] ? ", " : "",
             want[2] ? want[2] : "");
    if (ar.nparams > hook_nparams[h]) {
        const char *extra = lua_getlocal(L, NULL, hook_nparams[h] + 1);
        warn(w, file, line, "%s takes %d parameters but the hub passes %d, %s: '%.*s' is "
             "always nil", name, ar.nparams, hook_nparams[h], sig, WARN_SHOW,
             extra ? extra : "?");
    }
    for (int i = 1; i <= ar.nparams && i <= hook_nparams[h]; i++) {
        const char *got = lua_getlocal(L, NULL, i);
        if (!got || !strcmp(got, want[i - 1]))
            continue;
        for (int j = 0; j < hook_nparams[h]; j++) {
            if (j != i - 1 && !strcmp(got, want[j])) {
                warn(w, file, line, "parameter %d of %s is named '%s' but the hub passes %s "
                     "there, %s: a parameter missing?", i, name, got, want[i - 1], sig);
                i = hook_nparams[h]; /* one warning per hook */
                break;
            }
        }
    }
    lua_settop(L, fn - 1);
}

/* ---- bytecode ----------------------------------------------------------------- */

struct reader {
    const unsigned char *p, *end;
    int bad;
};

static unsigned byte(struct reader *r)
{
    if (r->p >= r->end) {
        r->bad = 1;
        return 0;
    }
    return *r->p++;
}

/* A size: 7 bits a byte, most significant first, the last byte marked
 * with 0x80. */
static size_t size(struct reader *r)
{
    size_t x = 0;
    unsigned b;
    do {
        if (x >> 50)
            r->bad = 1;
        b = byte(r);
        x = (x << 7) | (b & 0x7f);
    } while (!(b & 0x80) && !r->bad);
    return x;
}

static const unsigned char *bytes(struct reader *r, size_t n)
{
    if ((size_t)(r->end - r->p) < n) {
        r->bad = 1;
        return NULL;
    }
    const unsigned char *q = r->p;
    r->p += n;
    return q;
}

struct str {
    const char *p;
    size_t len;
};

/* A dumped string (NULL when absent). */
static struct str string(struct reader *r)
{
    size_t n = size(r);
    struct str s = {NULL, 0};
    if (n) {
        s.len = n - 1;
        s.p = (const char *)bytes(r, s.len);
    }
    return s;
}

/* What the analysis keeps of one function of the dump. */
struct fn {
    struct str source;
    int linedefined;
    const unsigned char *code;
    size_t ncode;
    struct str *k;                  /* constants: strings, or {NULL, 0} */
    size_t nk;
    size_t nup;
    int env_up;                     /* index of the upvalue named _ENV, or -1 */
    const signed char *lineinfo;
    size_t nlineinfo;
    size_t *abs;                    /* pairs (pc, line) */
    size_t nabs;
};

/* What the analysis reports: each global read (with where) or written. */
struct sink {
    void (*use)(void *ud, const char *name, size_t len, int write, const struct fn *f,
                size_t pc);
    void *ud;
    size_t steps;
};

/* The line of instruction `pc`: the last absolute line entry at or
 * before it, plus the relative deltas up to it (as Lua's own debug
 * library computes it). */
static int line_of(const struct fn *f, size_t pc)
{
    if (!f->nlineinfo || pc >= f->nlineinfo)
        return f->linedefined;
    long base = f->linedefined, basepc = -1;
    for (size_t i = 0; i < f->nabs && f->abs[2 * i] <= pc; i++) {
        basepc = (long)f->abs[2 * i];
        base = (long)f->abs[2 * i + 1];
    }
    while (basepc++ < (long)pc)
        base += f->lineinfo[basepc];
    return (int)base;
}

static int kstr(const struct fn *f, int idx, struct str *out)
{
    if ((size_t)idx >= f->nk || !f->k[idx].p)
        return 0;
    *out = f->k[idx];
    return 1;
}

/* The globals function `f` reads and writes. */
static void scan(const struct fn *f, struct sink *s)
{
    int dynamic = 0;
    struct str name;
    if (f->env_up < 0)
        return;
    s->steps += f->ncode;
    for (size_t pc = 0; pc < f->ncode; pc++) {
        uint32_t i;
        memcpy(&i, f->code + 4 * pc, 4);
        int op = I_OP(i);
        if (op == OP_GETTABUP && I_B(i) == f->env_up && kstr(f, I_C(i), &name)) {
            s->use(s->ud, name.p, name.len, 0, f, pc);
            dynamic |= name.len == 2 && !memcmp(name.p, "_G", 2);
        } else if (op == OP_SETTABUP && I_A(i) == f->env_up && kstr(f, I_B(i), &name)) {
            s->use(s->ud, name.p, name.len, 1, f, pc);
        } else if (op == OP_GETUPVAL && I_B(i) == f->env_up) {
            dynamic = 1; /* _ENV as a value: _ENV[x], local e = _ENV */
        }
    }
    /* _G.x, rawget(_G, "x"), _ENV[k]: every string it has may be a name */
    for (size_t k = 0; dynamic && k < f->nk; k++)
        if (f->k[k].p)
            s->use(s->ud, f->k[k].p, f->k[k].len, 1, f, 0);
}

/* One function of the dump and the functions nested in it, each scanned
 * once read whole. */
static void function(struct reader *r, struct str psource, struct sink *s, int depth)
{
    struct fn f = {.env_up = -1};
    if (depth > NEST_MAX) {
        r->bad = 1;
        return;
    }
    f.source = string(r);
    if (!f.source.p)
        f.source = psource;
    f.linedefined = (int)size(r);
    size(r);    /* lastlinedefined */
    bytes(r, 3); /* numparams, is_vararg, maxstacksize */
    f.ncode = size(r);
    f.code = bytes(r, f.ncode * 4);
    f.nk = r->bad ? 0 : size(r);
    if (f.nk > (size_t)(r->end - r->p))
        r->bad = 1;
    f.k = r->bad ? NULL : hub_xcalloc(f.nk ? f.nk : 1, sizeof(*f.k));
    for (size_t i = 0; i < f.nk && !r->bad; i++) {
        switch (byte(r)) {
        case 0x00: case 0x01: case 0x11: /* nil, false, true */
            break;
        case 0x03: case 0x13: /* integer, float */
            bytes(r, 8);
            break;
        case 0x04: case 0x14: /* short, long string */
            f.k[i] = string(r);
            break;
        default:
            r->bad = 1;
        }
    }
    f.nup = r->bad ? 0 : size(r);
    bytes(r, f.nup * 3); /* instack, idx, kind */
    size_t np = r->bad ? 0 : size(r);
    for (size_t i = 0; i < np && !r->bad; i++)
        function(r, f.source, s, depth + 1);
    /* debug information */
    f.nlineinfo = r->bad ? 0 : size(r);
    f.lineinfo = (const signed char *)bytes(r, f.nlineinfo);
    f.nabs = r->bad ? 0 : size(r);
    if (f.nabs > (size_t)(r->end - r->p))
        r->bad = 1;
    f.abs = r->bad ? NULL : hub_xmalloc((f.nabs ? f.nabs : 1) * 2 * sizeof(*f.abs));
    for (size_t i = 0; i < f.nabs && !r->bad; i++) {
        f.abs[2 * i] = size(r);
        f.abs[2 * i + 1] = size(r);
    }
    size_t nloc = r->bad ? 0 : size(r);
    for (size_t i = 0; i < nloc && !r->bad; i++) {
        string(r);
        size(r);
        size(r);
    }
    size_t nupn = r->bad ? 0 : size(r);
    for (size_t i = 0; i < nupn && !r->bad; i++) {
        struct str u = string(r);
        if (u.p && u.len == 4 && !memcmp(u.p, "_ENV", 4))
            f.env_up = (int)i;
    }
    if (!r->bad)
        scan(&f, s);
    free(f.k);
    free(f.abs);
}

static int writer(lua_State *L, const void *p, size_t n, void *ud)
{
    hub_buf_append(ud, p, n);
    return 0;
}

/* Scans the Lua function on top (popped) and every function nested in
 * it. Returns 0, or -1 if its dump is not the format this reader knows. */
static int scan_function(lua_State *L, struct sink *s)
{
    /* the header: signature, version 5.4, format 0, LUAC_DATA,
     * sizes of Instruction, lua_Integer, lua_Number, then LUAC_INT and
     * LUAC_NUM in the machine's own representation */
    static const unsigned char head[] = {0x1b, 'L', 'u', 'a', 0x54, 0, 0x19, 0x93, '\r', '\n',
                                         0x1a, '\n', 4, 8, 8};
    struct hub_buf b = {0};
    int rc = -1;
    if (lua_dump(L, writer, &b, 0) == 0 && b.len > sizeof(head) + 17 &&
        !memcmp(b.p, head, sizeof(head))) {
        lua_Integer li = 0x5678;
        lua_Number ln = 370.5;
        struct reader r = {(const unsigned char *)b.p + sizeof(head),
                           (const unsigned char *)b.p + b.len, 0};
        if (!memcmp(r.p, &li, 8) && !memcmp(r.p + 8, &ln, 8)) {
            r.p += 16;
            byte(&r); /* sizeupvalues */
            function(&r, (struct str){"=?", 2}, s, 0);
            rc = r.bad ? -1 : 0;
        }
    }
    hub_buf_free(&b);
    lua_pop(L, 1);
    return rc;
}

/* ---- globals --------------------------------------------------------------- */

/* Stack slots of the walk. */
struct walk {
    struct hub_policy *p;
    int env, used, wrote, read_at, seen, queue;
    lua_Integer queued, done;
    int failed;                     /* a dump that is not understood */
};

/* Queues the value on top (popped) if it is a function or a table not
 * seen yet. */
static void enqueue(struct walk *g)
{
    lua_State *L = g->p->L;
    int t = lua_type(L, -1);
    if (t != LUA_TFUNCTION && t != LUA_TTABLE) {
        lua_pop(L, 1);
        return;
    }
    lua_pushvalue(L, -1);
    if (lua_rawget(L, g->seen) != LUA_TNIL) {
        lua_pop(L, 2);
        return;
    }
    lua_pop(L, 1);
    if (g->queued >= VISIT_MAX) {
        g->failed = 1; /* the walk would be incomplete */
        lua_pop(L, 1);
        return;
    }
    lua_pushvalue(L, -1);
    lua_pushboolean(L, 1);
    lua_rawset(L, g->seen);
    lua_rawseti(L, g->queue, ++g->queued);
}

static void enqueue_timer_fn(struct hub_policy *p, void *ud)
{
    enqueue(ud);
}

/* A global `name` used by a function the walk reached: recorded, and its
 * value (when read) queued. */
static void use_global(void *ud, const char *name, size_t len, int write, const struct fn *f,
                       size_t pc)
{
    struct walk *g = ud;
    lua_State *L = g->p->L;
    lua_pushlstring(L, name, len);
    lua_pushboolean(L, 1);
    lua_rawset(L, write ? g->wrote : g->used);
    if (write)
        return;
    lua_pushlstring(L, name, len);
    if (lua_rawget(L, g->read_at) == LUA_TNIL) {
        /* the dump's source: "@file" or "=name", not NUL-terminated */
        char where[600];
        int at = f->source.len > 1 && (f->source.p[0] == '@' || f->source.p[0] == '=');
        snprintf(where, sizeof(where), "%.*s:%d", at ? (int)f->source.len - 1 : 1,
                 at ? f->source.p + 1 : "?", line_of(f, pc));
        lua_pushlstring(L, name, len);
        lua_pushstring(L, where);
        lua_rawset(L, g->read_at);
    }
    lua_pop(L, 1);
    lua_pushlstring(L, name, len);
    lua_rawget(L, g->env);
    enqueue(g);
}

/* Walks what hooks and timers can reach. Returns 0, or -1 when the walk
 * could not be completed (its results would be wrong). */
static int walk(struct walk *g)
{
    lua_State *L = g->p->L;
    struct sink s = {use_global, g, 0};
    while (g->done < g->queued && s.steps < STEPS_MAX) {
        lua_rawgeti(L, g->queue, ++g->done);
        int obj = lua_gettop(L);
        if (lua_type(L, obj) == LUA_TFUNCTION) {
            for (int i = 1; lua_getupvalue(L, obj, i); i++)
                enqueue(g);
            if (!lua_iscfunction(L, obj)) {
                lua_pushvalue(L, obj);
                if (scan_function(L, &s) < 0)
                    return -1;
            }
        } else {
            lua_pushnil(L);
            while (lua_next(L, obj) && s.steps++ < STEPS_MAX) {
                lua_pushvalue(L, -2);
                enqueue(g);
                enqueue(g);
            }
            if (lua_getmetatable(L, obj))
                enqueue(g);
        }
        lua_settop(L, obj - 1);
    }
    return g->done < g->queued || g->failed ? -1 : 0;
}

/* The sink of format_known: counts what it is told in r[0..2]. */
static void probe(void *ud, const char *name, size_t len, int write, const struct fn *f,
                  size_t pc)
{
    int *r = ud;
    if (!write && len == 1 && name[0] == 'x' && line_of(f, pc) == 1)
        r[0]++;
    else if (write && len == 1 && name[0] == 'y' && line_of(f, pc) == 2)
        r[1]++;
    else
        r[2]++;
}

/* 1 if this liblua's bytecode reads as expected: a chunk that reads x at
 * line 1 and writes y at line 2 must give exactly those. */
static int format_known(lua_State *L)
{
    static int known = -1;
    int r[3] = {0, 0, 0};
    struct sink s = {probe, r, 0};
    if (known >= 0)
        return known;
    known = 0;
    if (luaL_loadbufferx(L, "local a = x\ny = a", 17, "=lint", "t") != LUA_OK)
        lua_pop(L, 1);
    else if (scan_function(L, &s) == 0 && r[0] == 1 && r[1] == 1 && !r[2])
        known = 1;
    return known;
}

static void lint_globals(struct hub_policy *p, int env, struct warnings *w)
{
    lua_State *L = p->L;
    if (!format_known(L) || !lua_checkstack(L, 16))
        return;
    struct walk g = {.p = p, .env = env};
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_assigned);
    int assigned = lua_gettop(L);
    lua_newtable(L);
    g.used = lua_gettop(L);
    lua_newtable(L);
    g.wrote = lua_gettop(L);
    lua_newtable(L);
    g.read_at = lua_gettop(L);
    lua_newtable(L);
    g.seen = lua_gettop(L);
    lua_newtable(L);
    g.queue = lua_gettop(L);

    /* the environment itself is not walked: that would reach everything */
    lua_pushvalue(L, env);
    lua_pushboolean(L, 1);
    lua_rawset(L, g.seen);
    for (int h = 0; h < HUB_HOOK__COUNT; h++) {
        if (p->hook_ref[h] != LUA_NOREF) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, p->hook_ref[h]);
            enqueue(&g);
        }
    }
    hub_lua_timers_each_fn(p, enqueue_timer_fn, &g);
    if (walk(&g) < 0)
        return;

    /* assigned while loading, used by nothing that runs later */
    lua_pushnil(L);
    while (lua_next(L, assigned)) {
        const char *name = lua_tostring(L, -2);
        int skip = 0;
        for (int h = 0; h < HUB_HOOK__COUNT; h++)
            skip |= !strcmp(name, hub_policy_phase_name(h));
        lua_pushvalue(L, -2);
        int t = lua_rawget(L, env);
        lua_pop(L, 1);
        skip |= (t == LUA_TFUNCTION && !strncmp(name, "on_", 3)) || t == LUA_TNIL;
        lua_pushvalue(L, -2);
        skip |= lua_rawget(L, g.used) != LUA_TNIL;
        lua_pop(L, 1);
        lua_pushvalue(L, -2);
        skip |= lua_rawget(L, g.wrote) != LUA_TNIL;
        lua_pop(L, 1);
        if (!skip) {
            char msg[256];
            snprintf(msg, sizeof(msg), "global '%.*s' is assigned while the policy loads but "
                     "no hook or timer uses it (a typo? or make it local)", WARN_SHOW, name);
            warn_at(w, lua_tostring(L, -1), msg);
        }
        lua_pop(L, 1);
    }
    /* read by what runs later, assigned by nothing */
    lua_pushnil(L);
    while (lua_next(L, g.read_at)) {
        lua_pushvalue(L, -2);
        int t = lua_rawget(L, env);
        lua_pop(L, 1);
        lua_pushvalue(L, -2);
        int wrote = lua_rawget(L, g.wrote) != LUA_TNIL;
        lua_pop(L, 1);
        if (t == LUA_TNIL && !wrote) {
            char msg[256];
            snprintf(msg, sizeof(msg), "global '%.*s' is read here but nothing assigns it: "
                     "reading it raises \"undeclared global\" (a typo? a local declared "
                     "further down?)", WARN_SHOW, lua_tostring(L, -2));
            warn_at(w, lua_tostring(L, -1), msg);
        }
        lua_pop(L, 1);
    }
}

void hub_policy_lint(struct hub_policy *p, struct hub_config_errors *warns)
{
    lua_State *L = p->L;
    struct warnings w = {0};
    int top = lua_gettop(L);

    if (!warns)
        return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_env);
    int env = lua_gettop(L);
    lint_on_names(p, env, &w);
    for (int h = 0; h < HUB_HOOK__COUNT; h++)
        if (p->hook_ref[h] != LUA_NOREF)
            lint_params(p, h, &w);
    if (p->ref_assigned != LUA_NOREF)
        lint_globals(p, env, &w);
    lua_settop(L, top);

    if (w.n)
        qsort(w.v, w.n, sizeof(*w.v), by_place);
    for (size_t i = 0; i < w.n; i++) {
        if (w.v[i].line > 0)
            hub_policy_add_msg(warns, "%s:%d: warning: %s", w.v[i].file, w.v[i].line,
                               w.v[i].msg);
        else
            hub_policy_add_msg(warns, "%s: warning: %s", w.v[i].file, w.v[i].msg);
        free(w.v[i].file);
        free(w.v[i].msg);
    }
    free(w.v);
}
