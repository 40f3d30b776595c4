/* The conf file: Lua text evaluated in a sandbox made for it.
 *
 * The chunk runs in a fresh lua_State with no library opened, a capped
 * allocator and an instruction budget, so `while true do end` or a string
 * doubling loop ends with an error instead of a hung or swapped-out hub. Its
 * _ENV is an empty table whose metatable routes every global assignment to
 * on_assign() (__newindex: the table itself stays empty, so every assignment
 * goes through it) and every global read to on_read() (__index: an error).
 * on_assign() validates the value at once and stores it in the struct
 * hub_config, recording problems as "FILE:LINE: message" with the line of the
 * assignment, and lets the chunk go on so that one run reports every problem.
 * A Lua error (syntax, runtime, budget) stops the chunk and is reported too.
 *
 * The keys, their types, ranges and checks are the table of config_keys.c. */
#include "config_impl.h"
#include "lua_limits.h"

#include "luahub/log.h"
#include "luahub/util.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


#include <lauxlib.h>
#include <lua.h>

/* Budgets of the conf sandbox: far beyond any real conf file, far below what
 * would hurt the machine. */
#define CONF_MAX_FILE (1 * MiB)          /* bytes read from the file */
#define CONF_MAX_MEMORY (16 * MiB)       /* lua_State heap */
#define CONF_MAX_INSTRUCTIONS 10000000   /* VM instructions */
#define CONF_MAX_ERRORS 100              /* then evaluation stops */
#define keys hub_conf_keys
#define NKEYS hub_conf_nkeys

/* ---- the sandbox ------------------------------------------------------- */

struct load {
    struct hub_config *c;
    const char *path;
    struct hub_config_errors *errs;
    unsigned nerr;                 /* errors of this load */
    bool too_many;
    int line[HUB_CONF_MAX_KEYS];               /* line of each key's assignment; 0 = not assigned */
    bool bad[HUB_CONF_MAX_KEYS];               /* its value was refused */
    char short_src[LUA_IDSIZE];    /* how Lua names the chunk in its messages */
    const char *text;              /* the conf's source, for keys that scan it */
    size_t text_len;

    struct hub_lua_limits lim;     /* memory cap and instruction budget; lim.L is
                                    * set once the state exists */
};

/* Sentinel error value: "stop, the errors are already recorded". */
static char stop_sentinel;

static void push_error(struct load *ld, int line, const char *msg)
{
    struct hub_buf b = {0};
    if (line > 0)
        hub_buf_printf(&b, "%s:%d: %s", ld->path, line, msg);
    else
        hub_buf_printf(&b, "%s: %s", ld->path, msg);
    ld->errs->v = hub_xrealloc(ld->errs->v, (ld->errs->n + 1) * sizeof(char *));
    ld->errs->v[ld->errs->n++] = b.p;
    ld->nerr++;
}

/* Records one problem; past CONF_MAX_ERRORS, only notes that there are more. */
static void add_error_s(struct load *ld, int line, const char *msg)
{
    if (ld->nerr >= CONF_MAX_ERRORS)
        ld->too_many = true;
    else
        push_error(ld, line, msg);
}

static void add_error(struct load *ld, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void add_error(struct load *ld, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *msg = hub_xmalloc((size_t)(n < 0 ? 0 : n) + 1);
    va_start(ap, fmt);
    vsnprintf(msg, (size_t)(n < 0 ? 0 : n) + 1, fmt, ap);
    va_end(ap);
    add_error_s(ld, line, msg);
    free(msg);
}

/* Adds a message from Lua ("SRC:LINE: msg", SRC being Lua's possibly
 * shortened chunk name) with the full path in front. */
static void add_lua_error(struct load *ld, const char *msg)
{
    size_t sl = strlen(ld->short_src), pl = strlen(ld->path);
    const char *rest;
    if (strncmp(msg, ld->short_src, sl) == 0 && msg[sl] == ':')
        rest = msg + sl + 1;
    else if (strncmp(msg, ld->path, pl) == 0 && msg[pl] == ':')
        rest = msg + pl + 1;
    else
        rest = NULL;
    if (rest) {
        char *end;
        long line = strtol(rest, &end, 10);
        if (end != rest && *end == ':' && line > 0 && line < INT_MAX) {
            add_error_s(ld, (int)line, end[1] == ' ' ? end + 2 : end + 1);
            return;
        }
    }
    add_error_s(ld, 0, msg);
}

/* The conf's instruction budget is spent (the count hook fires once, after
 * CONF_MAX_INSTRUCTIONS). The conf has no pcall to catch the error with, so
 * raising once is enough. */
static void on_budget(lua_State *L, struct hub_lua_limits *lim)
{
    lua_pushfstring(L, "%s: instruction limit exceeded after %d instructions (runaway loop?)",
                    lim->kill_where, CONF_MAX_INSTRUCTIONS);
    lua_error(L);
}

/* The line of the Lua code that called the running C function. */
static int caller_line(lua_State *L)
{
    lua_Debug ar;
    if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "l", &ar))
        return ar.currentline;
    return -1;
}

static void report(void *ud, int line, const char *msg)
{
    add_error_s(ud, line, msg);
}

/* _ENV.__newindex(env, name, value): every global assignment of the conf.
 * Records problems and returns; raises only to stop after too many errors,
 * and only once no C memory is held. */
static int on_assign(lua_State *L)
{
    struct load *ld = lua_touserdata(L, lua_upvalueindex(1));
    int line = caller_line(L);
    struct hub_buf why = {0};

    if (lua_type(L, 2) != LUA_TSTRING) {
        add_error(ld, line, "cannot assign to a %s key: only conf keys can be assigned",
                  lua_typename(L, lua_type(L, 2)));
        goto out;
    }
    size_t n;
    const char *name = lua_tolstring(L, 2, &n);
    const struct key *k = strlen(name) == n ? hub_conf_find_key(name) : NULL;
    if (!k) {
        hub_buf_appends(&why, "unknown key ");
        hub_conf_append_q(&why, name, n, '\'');
        const char *near = strlen(name) == n ? hub_conf_near(name, &keys[0].name, NKEYS,
                                                             sizeof(keys[0])) : NULL;
        if (near)
            hub_buf_printf(&why, " (did you mean '%s'?)", near);
        add_error_s(ld, line, why.p);
        goto out;
    }
    size_t i = (size_t)(k - hub_conf_keys);
    if (ld->line[i]) {
        add_error(ld, line, "%s: already set at line %d", k->name, ld->line[i]);
        goto out;
    }
    ld->line[i] = line;
    if (k->kind == K_CHANNELS) {
        if (hub_conf_channels_apply(ld->c, L, 3, ld->text, ld->text_len, line, report,
                                    ld) < 0)
            ld->bad[i] = true;
    } else if (hub_conf_apply(ld->c, L, 3, k, &why) < 0) {
        ld->bad[i] = true;
        add_error(ld, line, "%s: %s", k->name, why.p);
    }
out:
    hub_buf_free(&why);
    if (ld->too_many) {
        lua_pushlightuserdata(L, &stop_sentinel);
        lua_error(L);
    }
    return 0;
}

/* _ENV.__index(env, name): reading a global is an error naming it. */
static int on_read(lua_State *L)
{
    char msg[160];
    if (lua_type(L, 2) == LUA_TSTRING) {
        size_t n;
        const char *name = lua_tolstring(L, 2, &n);
        const struct key *k = strlen(name) == n ? hub_conf_find_key(name) : NULL;
        if (k)
            snprintf(msg, sizeof(msg), "cannot read '%s': conf keys can only be assigned"
                     " (keep a shared value in a local variable)", k->name);
        else
            snprintf(msg, sizeof(msg), "unknown name '%.*s'",
                     (int)(n > SHOW_MAX ? SHOW_MAX : n), name);
    } else {
        snprintf(msg, sizeof(msg), "unknown name (a %s key)", lua_typename(L, lua_type(L, 2)));
    }
    luaL_where(L, 1);
    lua_pushstring(L, msg);
    lua_concat(L, 2);
    return lua_error(L);
}

/* Reads at most CONF_MAX_FILE bytes of `path`. Returns 0, or -errno. */
static int read_file(const char *path, struct hub_buf *b)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -errno;
    int rc = 0;
    errno = 0;
    char chunk[8192];
    for (;;) {
        size_t got = fread(chunk, 1, sizeof(chunk), f);
        if (got)
            hub_buf_append(b, chunk, got);
        if (b->len > CONF_MAX_FILE) {
            rc = -EFBIG;
            break;
        }
        if (got < sizeof(chunk)) {
            if (ferror(f))
                rc = errno ? -errno : -EIO;
            break;
        }
    }
    fclose(f);
    if (rc == 0 && !b->p)
        hub_buf_append(b, "", 0);
    return rc;
}

/* c->dir: the directory of `path`, absolute. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *d = slash == path ? hub_xstrdup("/")
            : slash ? hub_xstrndup(path, (size_t)(slash - path)) : hub_xstrdup(".");
    char *abs = realpath(d, NULL);
    if (!abs && d[0] != '/') {
        char *cwd = getcwd(NULL, 0);
        if (cwd) {
            struct hub_buf b = {0};
            hub_buf_printf(&b, "%s/%s", cwd, d);
            abs = b.p;
            free(cwd);
        }
    }
    if (abs) {
        free(d);
        return abs;
    }
    return d;
}

static size_t key_index(const char *name)
{
    return (size_t)(hub_conf_find_key(name) - keys);
}

/* The TLS keys go together (docs/config.md, "TLS"). A key whose value was
 * refused already has its error: it is not blamed again here. */
static void check_tls(struct load *ld)
{
    const struct hub_config *c = ld->c;
    size_t cert = key_index("tls_cert"), key = key_index("tls_key");
    size_t ca = key_index("tls_client_ca"), plain = key_index("listen_plain");
    bool tls = c->tls_cert && c->tls_key;

    if (ld->bad[cert] || ld->bad[key])
        return;
    if (!!c->tls_cert != !!c->tls_key)
        add_error(ld, ld->line[c->tls_cert ? cert : key],
                  "%s needs %s: TLS takes a certificate (tls_cert, a PEM chain) and its "
                  "private key (tls_key)", c->tls_cert ? "tls_cert" : "tls_key",
                  c->tls_cert ? "tls_key" : "tls_cert");
    if (c->tls_client_ca && !tls && !ld->bad[ca])
        add_error(ld, ld->line[ca], "tls_client_ca needs tls_cert and tls_key: clients "
                  "present their certificate in a TLS handshake");
    if (!c->listen_plain || ld->bad[plain])
        return;
    if (!tls)
        add_error(ld, ld->line[plain], "listen_plain is a plain listener beside the TLS one: "
                  "it needs tls_cert and tls_key (without them `listen` is plain already)");
    else if (c->listen_plain_port && c->listen_plain_port == c->listen_port &&
             !strcmp(c->listen_plain_host, c->listen_host))
        add_error(ld, ld->line[plain], "listen_plain must differ from listen (%s)", c->listen);
    else if (!c->listen_plain_port && c->workers != 1)
        add_error(ld, ld->line[plain], "listen_plain with port 0 needs workers = 1: workers "
                  "share a port, so it must be a fixed one");
}

/* Checks that need every key: done after the chunk ran. */
static void check_cross(struct load *ld)
{
    size_t mw = (size_t)(hub_conf_find_key("workers") - keys);
    if (!ld->bad[mw] && ld->c->workers != 1 && !strcmp(ld->c->broker, "memory"))
        add_error(ld, ld->line[mw],
                  "workers = %s needs the redis broker (set broker = \"redis://host:port\"):"
                  " with the memory broker each process only sees its own subscribers",
                  ld->c->workers ? "N > 1" : "\"auto\"");

    check_tls(ld);

    size_t mm = (size_t)(hub_conf_find_key("max_message_size") - keys);
    size_t mq = (size_t)(hub_conf_find_key("max_queue_bytes") - keys);
    if (ld->bad[mm] || ld->bad[mq])
        return;
    if (ld->c->max_queue_bytes < ld->c->max_message_size) {
        struct hub_buf q = {0}, m = {0};
        hub_conf_append_size(&q, (int64_t)ld->c->max_queue_bytes);
        hub_conf_append_size(&m, (int64_t)ld->c->max_message_size);
        add_error(ld, ld->line[mq] ? ld->line[mq] : ld->line[mm],
                  "max_queue_bytes (%s) must be at least max_message_size (%s):"
                  " a connection must be able to queue one full message", q.p, m.p);
        hub_buf_free(&q);
        hub_buf_free(&m);
    }
}

static void run(struct load *ld, const char *text, size_t len)
{
    struct hub_buf chunkname = {0};
    hub_buf_printf(&chunkname, "@%s", ld->path);

    /* Lua's allocator with a cap: growth past CONF_MAX_MEMORY is refused
     * (Lua then collects and raises "not enough memory") and the line
     * running is kept for the message; shrinking never is. */
    lua_State *L = hub_lua_limits_newstate(&ld->lim);
    if (!L) {
        add_error(ld, 0, "cannot create the Lua state for the conf");
        goto out;
    }

    /* How Lua will write the chunk name in its messages (it shortens long
     * paths to "...tail"): learnt from an empty chunk of the same name. */
    lua_Debug ar;
    if (luaL_loadbufferx(L, "", 0, chunkname.p, "t") == LUA_OK && lua_getinfo(L, ">S", &ar))
        snprintf(ld->short_src, sizeof(ld->short_src), "%s", ar.short_src);
    lua_settop(L, 0);

    /* A UTF-8 BOM is not Lua; editors add one. */
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0)
        text += 3, len -= 3;

    ld->text = text;
    ld->text_len = len;
    int st = luaL_loadbufferx(L, text, len, chunkname.p, "t");
    if (st == LUA_OK) {
        /* _ENV = setmetatable({}, {__newindex = on_assign, __index = on_read}) */
        lua_newtable(L);
        lua_createtable(L, 0, 3);
        lua_pushlightuserdata(L, ld);
        lua_pushcclosure(L, on_assign, 1);
        lua_setfield(L, -2, "__newindex");
        lua_pushcfunction(L, on_read);
        lua_setfield(L, -2, "__index");
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
        lua_setmetatable(L, -2);
        if (!lua_setupvalue(L, -2, 1)) /* a main chunk's only upvalue is _ENV */
            lua_pop(L, 1);

        hub_lua_limits_arm(&ld->lim);
        st = lua_pcall(L, 0, 0, 0);
    }

    if (st == LUA_ERRMEM) {
        struct hub_buf size = {0};
        hub_conf_append_size(&size, (int64_t)ld->lim.mem_max);
        add_error(ld, ld->lim.oom_line, "memory limit exceeded: the conf may use %s (memory bomb?)",
                  size.p);
        hub_buf_free(&size);
    } else if (st != LUA_OK && lua_touserdata(L, -1) == &stop_sentinel) {
        /* on_assign stopped the chunk; its errors are recorded. */
    } else if (st != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        /* Lua quotes the token it stopped at ("unfinished string near
         * '\"s3cret"); a string of the conf may be a secret (api_key, a
         * password): name it without its text. */
        const char *near = msg && st == LUA_ERRSYNTAX ? strstr(msg, " near '") : NULL;
        if (near && (near[7] == '"' || near[7] == '\'' || near[7] == '[')) {
            lua_pushfstring(L, "%s (near a string, not shown)",
                            lua_pushlstring(L, msg, (size_t)(near - msg)));
            msg = lua_tostring(L, -1);
        }
        add_lua_error(ld, msg ? msg : "error with a non-string value");
    }
    if (st == LUA_OK)
        check_cross(ld); /* only when every assignment was seen */
    if (ld->too_many)
        push_error(ld, 0, "too many errors, stopped reading");
    ld->lim.L = NULL;
    lua_close(L);
out:
    hub_buf_free(&chunkname);
}

int hub_config_load(struct hub_config *c, const char *path, struct hub_config_errors *errs)
{
    /* Copy first: `path` may be c->path itself (reloading the same file). */
    char *copy = hub_xstrdup(path);
    free(c->path);
    free(c->dir);
    c->path = copy;
    c->dir = dir_of(copy);
    path = copy;

    /* The budgets of the conf sandbox (lua_limits.h): the cap always on,
     * one run, stopped with a message. Allocating is charged as in the
     * policy (a string built by `..` is copied whole each time: `s = #s .. s`
     * in a loop copied terabytes within 10 million instructions, for
     * minutes, found by the fuzzer), so the hook must look often. */
    struct load ld = {
        .c = c, .path = path, .errs = errs,
        .lim = {
            .mem_max = CONF_MAX_MEMORY, .cap_on = 1, .oom_line = -1,
            .budget = CONF_MAX_INSTRUCTIONS, .tick = 1000, .alloc_cost = HUB_COST_ALLOC,
            .stop = on_budget,
        },
    };
    snprintf(ld.short_src, sizeof(ld.short_src), "%s", path);

    struct hub_buf text = {0};
    int rc = read_file(path, &text);
    if (rc == -EFBIG)
        add_error(&ld, 0, "cannot read conf file: larger than %lld bytes",
                  (long long)CONF_MAX_FILE);
    else if (rc < 0)
        add_error(&ld, 0, "cannot read conf file: %s", strerror(-rc));
    else
        run(&ld, text.p, text.len);
    hub_buf_free(&text);

    return ld.nerr ? -1 : 0;
}
