/* `luahub test [-c CONF] SPEC.lua...` (docs/testing-policies.md): runs
 * policy specs without sockets.
 *
 * Each spec file gets a Lua state of its own (not the policy's), with the
 * base, string, table, math, utf8 and coroutine libraries, lua-cjson, the
 * world's functions (spec_actions.c) and the spec language built on them
 * (lua/spec.lua, embedded). The spec state has budgets of its own, with the
 * limits of lua_limits.h: a memory cap, and an instruction budget per test
 * (and for the code outside tests) that a loop in the spec runs out of,
 * raised again at every tick so that a pcall in the spec cannot swallow it.
 *
 * Before anything runs, every file is read and compiled, every conf loaded
 * and every policy built once: a missing file, a syntax error, a conf or a
 * policy that does not load is a usage error (exit 2, "FILE:LINE:
 * message"). Then the files run one after the other; each test reports as
 * it ends (text or TAP on stdout; a JUnit-like file at the end). Exit 0 if
 * every test passed, else 1. */
#include "luahub/spec.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua-cjson.h>
#include <lua.h>
#include <lualib.h>

#include "lua_limits.h"
#include "luahub/config.h"
#include "luahub/log.h"
#include "luahub/util.h"
#include "spec_impl.h"

/* lua/spec.lua, embedded at build time. */
extern const char hub_lua_spec[];
extern const size_t hub_lua_spec_len;

#define SPEC_MEMORY (256u << 20)        /* bytes of a spec state */
#define SPEC_INSTRUCTIONS 100000000     /* default budget of a test */
#define CONF_NAME "luahub.conf"         /* looked for next to a spec without -c */

struct result {
    char *file, *name;
    int ok;
    char *detail;                       /* a failure's lines, "" when ok */
    double seconds;
};

struct run {
    int tap;
    const char *junit;
    long long max_instructions;
    struct result *v;
    size_t n, cap;
    size_t tap_n;
    const char *file;                   /* the spec file running */
    uint64_t t0;                        /* when the test began */
    struct hub_lua_limits lim;
};

/* One spec file and its conf (NULL: the built-in defaults). */
struct spec {
    const char *path;
    char *conf_path;
    struct hub_config *cfg;             /* shared by the files of one conf */
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: luahub test [-c FILE] [--tap] [--junit FILE] [--max-instructions N] "
            "SPEC.lua...\n"
            "\n"
            "Runs policy specs (docs/testing-policies.md): the conf's policy with fake\n"
            "connections, a recording broker and a fake clock; no sockets.\n"
            "\n"
            "  -c, --conf FILE          the conf (policy, policy_vars, limits) of every spec;\n"
            "                           default: " CONF_NAME " next to each spec, else the\n"
            "                           built-in defaults (the built-in policy)\n"
            "      --tap                print TAP (version 13) instead of text\n"
            "      --junit FILE         also write the results as JUnit XML to FILE\n"
            "      --max-instructions N instructions of the spec's own Lua code per test\n"
            "                           (default %d; an action on the policy counts %d)\n"
            "  -h, --help               this help\n"
            "\n"
            "Exit status: 0 every test passed, 1 a test failed, 2 a usage error (a file\n"
            "that cannot be read, a syntax error, a conf or a policy that does not load).\n",
            SPEC_INSTRUCTIONS, HUB_SPEC_ACTION_COST);
}

/* ---- reports ------------------------------------------------------------------ */

/* Field `k` of the table at `t` as a string, or NULL. */
static const char *field(lua_State *L, int t, const char *k)
{
    lua_getfield(L, t, k);
    const char *s = lua_isstring(L, -1) ? lua_tostring(L, -1) : NULL;
    lua_pop(L, 1); /* anchored by the table */
    return s;
}

/* Appends each string of the list t[k], as "<indent><prefix><line>\n". */
static void add_lines(struct hub_buf *b, lua_State *L, int t, const char *k, const char *title,
                      const char *prefix)
{
    lua_getfield(L, t, k);
    if (lua_istable(L, -1) && lua_rawlen(L, -1) > 0) {
        if (title)
            hub_buf_printf(b, "%s\n", title);
        for (lua_Integer i = 1; i <= (lua_Integer)lua_rawlen(L, -1); i++) {
            lua_rawgeti(L, -1, i);
            if (lua_isstring(L, -1))
                hub_buf_printf(b, "%s%s\n", prefix, lua_tostring(L, -1));
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
}

/* Writes the lines of `text` with `indent` in front of each. */
static void print_indented(const char *text, const char *indent)
{
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p) : strlen(p);
        printf("%s%.*s\n", indent, (int)n, p);
        p += n + (nl != NULL);
    }
}

/* A YAML (JSON) string of s[0..n). */
static void yaml_str(struct hub_buf *b, const char *s)
{
    hub_buf_append_json_string(b, s, strlen(s));
}

/* report{name, ok, checks, where, message, expected, got, notes = {},
 * logs = {}}: one test's outcome, printed at once and kept for JUnit. */
static int l_report(lua_State *L)
{
    struct run *r = lua_touserdata(L, lua_upvalueindex(1));
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *name = field(L, 1, "name");
    lua_getfield(L, 1, "ok");
    int ok = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, 1, "checks");
    lua_Integer checks = lua_tointeger(L, -1);
    lua_pop(L, 1);
    const char *where = field(L, 1, "where"), *msg = field(L, 1, "message");
    const char *expected = field(L, 1, "expected"), *got = field(L, 1, "got");

    struct hub_buf d = {0}, more = {0};
    if (!ok) {
        hub_buf_printf(&d, "%s%s%s\n", where ? where : "", where ? ": " : "",
                       msg ? msg : "failed");
        if (expected)
            hub_buf_printf(&d, "  expected: %s\n", expected);
        if (got)
            hub_buf_printf(&d, "  got:      %s\n", got);
        add_lines(&more, L, 1, "notes", NULL, "");
        add_lines(&more, L, 1, "logs", "the log of the test:", "  ");
        if (more.len)
            hub_buf_append(&d, more.p, more.len);
    }
    if (d.len && d.p[d.len - 1] == '\n')
        d.p[--d.len] = '\0';
    if (more.len && more.p[more.len - 1] == '\n')
        more.p[--more.len] = '\0';

    struct result res = {hub_xstrdup(r->file), hub_xstrdup(name ? name : "?"), ok,
                         hub_xstrdup(d.p ? d.p : ""),
                         (double)(hub_now_ns() - r->t0) / 1e9};
    hub_buf_free(&d);
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 32;
        r->v = hub_xrealloc(r->v, r->cap * sizeof(*r->v));
    }
    r->v[r->n++] = res;

    if (r->tap) {
        printf("%s %zu - %s: %s\n", ok ? "ok" : "not ok", ++r->tap_n, res.file, res.name);
        if (!ok) {
            struct hub_buf y = {0};
            hub_buf_appends(&y, "  ---\n  message: ");
            yaml_str(&y, msg ? msg : "failed");
            if (where) {
                hub_buf_appends(&y, "\n  at: ");
                yaml_str(&y, where);
            }
            if (expected) {
                hub_buf_appends(&y, "\n  expected: ");
                yaml_str(&y, expected);
            }
            if (got) {
                hub_buf_appends(&y, "\n  got: ");
                yaml_str(&y, got);
            }
            if (more.len) {
                hub_buf_appends(&y, "\n  notes: ");
                yaml_str(&y, more.p);
            }
            hub_buf_appends(&y, "\n  ...");
            printf("%s\n", y.p);
            hub_buf_free(&y);
        }
    } else if (ok) {
        printf("  ok    %s (%lld check%s)\n", res.name, (long long)checks, checks == 1 ? "" : "s");
    } else {
        printf("  FAIL  %s\n", res.name);
        print_indented(res.detail, "        ");
    }
    fflush(stdout);
    hub_buf_free(&more);
    r->t0 = hub_now_ns();
    return 0;
}

static void xml_text(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        case '"': fputs("&quot;", f); break;
        case '\n': fputs("&#10;", f); break;
        default:
            if ((unsigned char)*s >= 0x20 || *s == '\t')
                fputc(*s, f);
            break;
        }
    }
}

/* The results as JUnit XML: one testsuite per spec file. */
static int write_junit(const struct run *r, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "luahub test: --junit %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t failed = 0;
    for (size_t i = 0; i < r->n; i++)
        failed += !r->v[i].ok;
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               "<testsuites name=\"luahub test\" tests=\"%zu\" failures=\"%zu\">\n", r->n, failed);
    for (size_t i = 0; i < r->n;) {
        size_t j = i, nf = 0;
        double t = 0;
        for (; j < r->n && !strcmp(r->v[j].file, r->v[i].file); j++) {
            nf += !r->v[j].ok;
            t += r->v[j].seconds;
        }
        fputs("  <testsuite name=\"", f);
        xml_text(f, r->v[i].file);
        fprintf(f, "\" tests=\"%zu\" failures=\"%zu\" time=\"%.3f\">\n", j - i, nf, t);
        for (; i < j; i++) {
            fputs("    <testcase classname=\"", f);
            xml_text(f, r->v[i].file);
            fputs("\" name=\"", f);
            xml_text(f, r->v[i].name);
            fprintf(f, "\" time=\"%.3f\"", r->v[i].seconds);
            if (r->v[i].ok) {
                fputs("/>\n", f);
                continue;
            }
            const char *nl = strchr(r->v[i].detail, '\n');
            struct hub_buf first = {0};
            hub_buf_append(&first, r->v[i].detail,
                           nl ? (size_t)(nl - r->v[i].detail) : strlen(r->v[i].detail));
            fputs(">\n      <failure message=\"", f);
            xml_text(f, first.p ? first.p : "");
            fputs("\">", f);
            for (const char *s = r->v[i].detail; *s; s++) /* newlines kept in the body */
                if (*s == '\n')
                    fputc('\n', f);
                else
                    xml_text(f, (char[]){*s, 0});
            fputs("</failure>\n    </testcase>\n", f);
            hub_buf_free(&first);
        }
        fputs("  </testsuite>\n", f);
    }
    fputs("</testsuites>\n", f);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) {
        fprintf(stderr, "luahub test: --junit %s: write error\n", path);
        return -1;
    }
    return 0;
}

/* ---- the spec state ------------------------------------------------------------ */

/* "chunk:line" of the innermost function of a file (a spec, not
 * spec.lua or C) on L's stack, or "" */
static void spec_where(lua_State *L, char *out, size_t n)
{
    lua_Debug ar;
    out[0] = '\0';
    for (int level = 0; lua_getstack(L, level, &ar); level++) {
        if (lua_getinfo(L, "Sl", &ar) && ar.source[0] == '@' && ar.currentline > 0) {
            snprintf(out, n, "%s:%d", ar.short_src, ar.currentline);
            return;
        }
    }
}

static int l_where(lua_State *L)
{
    char w[HUB_LUA_WHERE_MAX];
    spec_where(L, w, sizeof(w));
    if (w[0])
        lua_pushstring(L, w);
    else
        lua_pushnil(L);
    return 1;
}

/* The spec ran out of its budget: yields the test's coroutine (a yield
 * passes through the spec's own pcalls; the hook yields again at every
 * tick), or raises where no yield can go (the code outside coroutines,
 * a C call boundary), again at every tick. */
static void spec_stop(lua_State *L, struct hub_lua_limits *lim)
{
    if (lua_isyieldable(L)) {
        lua_yield(L, 0); /* from the hook: returns, and the hook does */
        return;
    }
    lua_pushfstring(L, "%s%sinstruction limit exceeded (%I instructions per test)",
                    lim->kill_where, lim->kill_where[0] ? ": " : "", (lua_Integer)lim->budget);
    lua_error(L);
}

/* run(fn) -> true, or false and {message, where[, killed]}: fn as a
 * coroutine under a fresh budget of its own (a test, or the file's code
 * outside tests); the caller's budget goes on afterwards, one action
 * less. */
static int l_run(lua_State *L)
{
    struct run *r = lua_touserdata(L, lua_upvalueindex(1));
    struct hub_lua_limits *lim = &r->lim;
    luaL_checktype(L, 1, LUA_TFUNCTION);
    int64_t outer = lim->budget_left;
    char where[HUB_LUA_WHERE_MAX], at[HUB_LUA_WHERE_MAX];
    int nres;

    lua_settop(L, 1);
    lua_State *co = lua_newthread(L);
    lua_pushvalue(L, 1);
    lua_xmove(L, co, 1);
    hub_lua_limits_arm(lim);
    int st = lua_resume(co, L, 0, &nres);
    int killed = lim->killed;
    snprintf(where, sizeof(where), "%s", lim->kill_where);
    spec_where(co, at, sizeof(at)); /* the stack of a dead or suspended coroutine stays */
    lim->killed = 0;
    lim->kill_where[0] = '\0';
    lim->budget_left = outer - HUB_SPEC_ACTION_COST;

    if (st == LUA_OK && !killed) {
        lua_resetthread(co);
        lua_pushboolean(L, 1);
        return 1;
    }
    if (st != LUA_OK && st != LUA_YIELD)
        lua_xmove(co, L, 1); /* the error object: 3 */
    else
        lua_pushnil(L);
    lua_resetthread(co);
    lua_pushboolean(L, 0);
    if (lua_istable(L, 3)) {
        lua_pushvalue(L, 3); /* raised by the spec language: its fields stay */
    } else {
        lua_createtable(L, 0, 3);
        if (killed)
            lua_pushfstring(L, "instruction limit exceeded (%I instructions per test, an "
                               "action on the policy counting %d): a runaway loop in the spec?",
                            (lua_Integer)lim->budget, HUB_SPEC_ACTION_COST);
        else if (st == LUA_ERRMEM)
            lua_pushfstring(L, "not enough memory: the spec's Lua state would exceed %d MiB",
                            (int)(SPEC_MEMORY >> 20));
        else if (st == LUA_YIELD)
            lua_pushliteral(L, "coroutine.yield outside a coroutine of the spec's own");
        else if (lua_isstring(L, 3))
            lua_pushvalue(L, 3);
        else
            lua_pushfstring(L, "error object is a %s value", luaL_typename(L, 3));
        lua_setfield(L, -2, "message");
        if (killed) {
            lua_pushboolean(L, 1);
            lua_setfield(L, -2, "killed");
        }
    }
    if (lua_getfield(L, -1, "where") == LUA_TNIL) {
        lua_pushstring(L, at[0] ? at : where);
        lua_setfield(L, -3, "where");
    }
    lua_pop(L, 1);
    return 2;
}

/* print(...): to stdout ("# " in front with --tap) */
static int l_print(lua_State *L)
{
    struct run *r = lua_touserdata(L, lua_upvalueindex(1));
    int n = lua_gettop(L);
    struct hub_buf b = {0};
    for (int i = 1; i <= n; i++) {
        size_t len;
        const char *s = luaL_tolstring(L, i, &len);
        if (i > 1)
            hub_buf_append(&b, "\t", 1);
        hub_buf_append(&b, s, len);
        lua_pop(L, 1);
    }
    print_indented(b.p ? b.p : "", r->tap ? "# " : "        | ");
    fflush(stdout);
    hub_buf_free(&b);
    return 0;
}

static void open_lib(lua_State *L, const char *name, lua_CFunction f)
{
    luaL_requiref(L, name, f, 1);
    lua_pop(L, 1);
}

/* Runs one spec file (compiled already: no syntax error). Its results
 * are in r. Returns 0, or -1 if the file could not run at all. */
static int run_file(struct run *r, const struct spec *sp)
{
    r->lim = (struct hub_lua_limits){
        .mem_max = SPEC_MEMORY, .cap_on = 1, .budget = r->max_instructions, .tick = 1000,
        .stop = spec_stop, .oom_line = -1,
    };
    lua_State *L = hub_lua_limits_newstate(&r->lim);
    if (!L) {
        fprintf(stderr, "luahub test: %s: cannot create a Lua state\n", sp->path);
        return -1;
    }
    hub_lua_limits_hook(&r->lim);
    hub_lua_limits_arm(&r->lim);
    r->lim.cap_on = 0; /* setting up: nothing to stop yet */
    struct hub_spec_world *w = hub_spec_world_new(sp->cfg, &r->lim);
    hub_log_set_level(sp->cfg->log_level);
    r->file = sp->path;

    open_lib(L, LUA_GNAME, luaopen_base);
    open_lib(L, LUA_STRLIBNAME, luaopen_string);
    open_lib(L, LUA_TABLIBNAME, luaopen_table);
    open_lib(L, LUA_MATHLIBNAME, luaopen_math);
    open_lib(L, LUA_UTF8LIBNAME, luaopen_utf8);
    open_lib(L, LUA_COLIBNAME, luaopen_coroutine);
    lua_pushnil(L);
    lua_setglobal(L, "dofile");     /* a spec is self-contained */
    lua_pushnil(L);
    lua_setglobal(L, "loadfile");
    lua_pushlightuserdata(L, r);
    lua_pushcclosure(L, l_print, 1);
    lua_setglobal(L, "print");

    int st = luaL_loadbufferx(L, hub_lua_spec, hub_lua_spec_len, "=spec.lua", "t");
    if (st == LUA_OK) {
        lua_newtable(L); /* host */
        hub_spec_world_open(L, w);
        static const luaL_Reg fns[] = {
            {"run", l_run}, {"report", l_report}, {NULL, NULL},
        };
        lua_pushlightuserdata(L, r);
        luaL_setfuncs(L, fns, 1);
        lua_pushcfunction(L, l_where);
        lua_setfield(L, -2, "where");
        luaL_requiref(L, "cjson", luaopen_cjson, 0);
        lua_setfield(L, -2, "json");
        lua_pushstring(L, sp->cfg->policy_vars ? sp->cfg->policy_vars : "{}");
        lua_setfield(L, -2, "vars");
        lua_pushstring(L, sp->path);
        st = lua_pcall(L, 2, 1, 0); /* spec.lua(host, file) -> api */
    }
    if (st == LUA_OK) {
        r->lim.cap_on = 1;
        lua_getfield(L, -1, "run_file");
        st = luaL_loadfilex(L, sp->path, "t");
        if (st == LUA_OK) {
            lua_getfield(L, -3, "env");
            lua_setupvalue(L, -2, 1); /* the spec's _ENV */
            r->t0 = hub_now_ns();
            st = lua_pcall(L, 1, 0, 0);
        }
    }
    int rc = 0;
    if (st != LUA_OK) {
        fprintf(stderr, "luahub test: %s: %s\n", sp->path,
                lua_isstring(L, -1) ? lua_tostring(L, -1) : "the spec stopped");
        rc = -1;
    }
    hub_spec_world_free(w);
    r->lim.L = NULL;
    lua_close(L);
    return rc;
}

/* ---- before running: files, confs and policies ------------------------------ */

static void print_warning(void *ud, const char *line)
{
    fprintf(stderr, "luahub test: %s: %s\n", (const char *)ud, line);
}

/* The conf of a spec file: -c, or CONF_NAME in its directory, or NULL. */
static char *conf_of(const char *spec, const char *given)
{
    if (given)
        return hub_xstrdup(given);
    const char *slash = strrchr(spec, '/');
    struct hub_buf b = {0};
    if (slash)
        hub_buf_append(&b, spec, (size_t)(slash - spec) + 1);
    hub_buf_appends(&b, CONF_NAME);
    if (access(b.p, F_OK) == 0)
        return b.p;
    hub_buf_free(&b);
    return NULL;
}

/* Checks what must be right before anything runs; prints every problem.
 * Returns 0 or -1. */
static int prepare(struct spec *specs, size_t n, const char *conf_given)
{
    int bad = 0;

    for (size_t i = 0; i < n; i++) {
        struct spec *sp = &specs[i];
        FILE *f = fopen(sp->path, "rb");
        if (!f) {
            fprintf(stderr, "luahub test: %s: cannot read the spec: %s\n", sp->path,
                    strerror(errno));
            bad = 1;
            continue;
        }
        fclose(f);
        lua_State *L = luaL_newstate();
        if (!L || luaL_loadfilex(L, sp->path, "t") != LUA_OK) {
            fprintf(stderr, "%s\n", L ? lua_tostring(L, -1) : "luahub test: out of memory");
            bad = 1;
        }
        if (L)
            lua_close(L);

        sp->conf_path = conf_of(sp->path, conf_given);
        for (size_t k = 0; k < i; k++) /* one conf, one load */
            if (specs[k].cfg && ((!sp->conf_path && !specs[k].conf_path) ||
                                 (sp->conf_path && specs[k].conf_path &&
                                  !strcmp(sp->conf_path, specs[k].conf_path)))) {
                sp->cfg = specs[k].cfg;
                break;
            }
        if (sp->cfg)
            continue;
        struct hub_config_errors errs = {0};
        struct hub_config *cfg = hub_xcalloc(1, sizeof(*cfg));
        hub_config_defaults(cfg);
        if (sp->conf_path && hub_config_load(cfg, sp->conf_path, &errs) < 0) {
            for (unsigned e = 0; e < errs.n; e++)
                fprintf(stderr, "%s\n", errs.v[e]);
            fprintf(stderr, "luahub test: %s: the conf does not load\n", sp->conf_path);
            hub_config_errors_free(&errs);
            hub_config_free(cfg);
            free(cfg);
            bad = 1;
            continue;
        }
        sp->cfg = cfg;
        /* the policy, built once: the same FILE:LINE problems as the hub's */
        struct hub_lua_limits none = {0};
        struct hub_spec_world *w = hub_spec_world_new(cfg, &none);
        hub_log_set_level(cfg->log_level);
        if (hub_spec_world_reset(w, NULL, HUB_SPEC_EPOCH_MS, &errs) < 0) {
            for (unsigned e = 0; e < errs.n; e++)
                fprintf(stderr, "%s\n", errs.v[e]);
            fprintf(stderr, "luahub test: the policy of %s (conf %s) does not load\n",
                    sp->path, sp->conf_path ? sp->conf_path : "built-in defaults");
            hub_config_errors_free(&errs);
            bad = 1;
        }
        hub_spec_world_warnings(w, print_warning,
                                (void *)(sp->conf_path ? sp->conf_path : "built-in policy"));
        hub_spec_world_free(w);
    }
    return bad ? -1 : 0;
}

/* ---- the command ------------------------------------------------------------------ */

int hub_spec_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"conf", required_argument, NULL, 'c'},
        {"tap", no_argument, NULL, 'T'},
        {"junit", required_argument, NULL, 'J'},
        {"max-instructions", required_argument, NULL, 'I'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct run r = {.max_instructions = SPEC_INSTRUCTIONS};
    const char *conf = NULL;
    char *end;
    int c, rc = 0;

    optind = 1;
    while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': conf = optarg; break;
        case 'T': r.tap = 1; break;
        case 'J': r.junit = optarg; break;
        case 'I':
            errno = 0;
            r.max_instructions = strtoll(optarg, &end, 10);
            if (errno || *end || r.max_instructions < 1000) {
                fprintf(stderr, "luahub test: --max-instructions %s: expected an integer of "
                                "at least 1000\n", optarg);
                return 2;
            }
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "luahub test: no spec file given\n");
        usage(stderr);
        return 2;
    }

    size_t n = (size_t)(argc - optind);
    struct spec *specs = hub_xcalloc(n, sizeof(*specs));
    for (size_t i = 0; i < n; i++)
        specs[i].path = argv[optind + (int)i];
    if (prepare(specs, n, conf) < 0) {
        fprintf(stderr, "luahub test: nothing was run: fix the problems above\n");
        rc = 2;
        goto out;
    }

    if (r.tap)
        printf("TAP version 13\n");
    for (size_t i = 0; i < n; i++) {
        size_t first = r.n;
        if (r.tap)
            printf("# %s (conf %s)\n", specs[i].path,
                   specs[i].conf_path ? specs[i].conf_path : "built-in defaults");
        else
            printf("%s (conf %s)\n", specs[i].path,
                   specs[i].conf_path ? specs[i].conf_path : "built-in defaults");
        fflush(stdout);
        if (run_file(&r, &specs[i]) < 0)
            rc = 2;
        size_t failed = 0;
        for (size_t k = first; k < r.n; k++)
            failed += !r.v[k].ok;
        if (!r.tap)
            printf("  %zu test%s: %zu passed, %zu failed\n\n", r.n - first,
                   r.n - first == 1 ? "" : "s", r.n - first - failed, failed);
        if (r.n == first && rc == 0) {
            fprintf(stderr, "luahub test: %s: no test and no expectation\n", specs[i].path);
            rc = 1;
        }
    }
    size_t failed = 0;
    for (size_t k = 0; k < r.n; k++)
        failed += !r.v[k].ok;
    if (r.tap)
        printf("1..%zu\n", r.n);
    else
        printf("luahub test: %zu file%s, %zu test%s: %zu passed, %zu failed\n", n,
               n == 1 ? "" : "s", r.n, r.n == 1 ? "" : "s", r.n - failed, failed);
    if (r.junit && write_junit(&r, r.junit) < 0 && rc == 0)
        rc = 2;
    if (rc == 0 && failed)
        rc = 1;

out:
    for (size_t i = 0; i < n; i++) {
        int shared = 0;
        for (size_t k = 0; k < i; k++)
            shared |= specs[k].cfg == specs[i].cfg;
        if (specs[i].cfg && !shared) {
            hub_config_free(specs[i].cfg);
            free(specs[i].cfg);
        }
        free(specs[i].conf_path);
    }
    free(specs);
    for (size_t i = 0; i < r.n; i++) {
        free(r.v[i].file);
        free(r.v[i].name);
        free(r.v[i].detail);
    }
    free(r.v);
    return rc;
}
