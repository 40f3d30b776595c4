/* The Lua policy host: builds a policy (the sandboxed state of sandbox.c,
 * the keys of jwt_keys, the script's main chunk run under the budgets, its
 * hooks verified, its warnings from policy_lint.c), checks one for
 * --check, reloads by build, verify, swap, and renders the metrics. The hooks' entry points are in policy_hooks.c; running one call
 * (budgets, failure lines, statistics) is policy_call.c. */
#include "luahub/policy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#include "lua_api.h"
#include "luahub/log.h"
#include "luahub/metrics.h"

#define POLICY_MAX_FILE (16 * 1024 * 1024)

void hub_policy_add_msg(struct hub_config_errors *e, const char *fmt, ...)
{
    struct hub_buf b = {0};
    va_list ap;
    char tmp[1024];

    if (!e)
        return;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    hub_buf_appends(&b, tmp);
    e->v = hub_xrealloc(e->v, (e->n + 1) * sizeof(*e->v));
    e->v[e->n++] = b.p;
}

#define add_err hub_policy_add_msg

int hub_policy_read_file(const char *path, size_t max, struct hub_buf *out, char *why,
                         size_t n)
{
    /* O_NONBLOCK: a FIFO must not hang the loop (docs/lua.md, "The
     * watchdog"); a regular file ignores it */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC), rc = -1;
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        snprintf(why, n, "%s", strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(why, n, "not a regular file");
        goto out;
    }
    char buf[65536];
    ssize_t got;
    while ((got = read(fd, buf, sizeof(buf))) > 0) {
        if (out->len + (size_t)got > max) {
            if (max % (1024 * 1024) == 0)
                snprintf(why, n, "larger than %zu MiB", max >> 20);
            else
                snprintf(why, n, "larger than %zu bytes", max);
            goto out;
        }
        hub_buf_append(out, buf, (size_t)got);
    }
    if (got < 0) {
        snprintf(why, n, "%s", strerror(errno));
        goto out;
    }
    if (!out->p)
        hub_buf_append(out, "", 0);
    rc = 0;
out:
    if (fd >= 0)
        close(fd);
    return rc;
}

/* Reads the policy file (or takes the built-in one) into `*src`. */
static int read_source(struct hub_policy *p, struct hub_buf *src,
                       struct hub_config_errors *errs)
{
    char why[256];
    if (!p->cfg->policy) {
        hub_buf_append(src, hub_lua_default, hub_lua_default_len);
        return 0;
    }
    if (hub_policy_read_file(p->cfg->policy, POLICY_MAX_FILE, src, why, sizeof(why)) < 0) {
        add_err(errs, "%s: cannot read the policy: %s", p->cfg->policy, why);
        return -1;
    }
    return 0;
}

/* Appends a message that may start with Lua's (possibly shortened) chunk
 * name, with the full file name instead. */
static void add_lua_err(struct hub_policy *p, struct hub_config_errors *errs,
                        const char *msg)
{
    size_t n = strlen(p->short_src);
    if (p->short_src[0] && strncmp(msg, p->short_src, n) == 0 && msg[n] == ':')
        add_err(errs, "%s%s", p->source_name, msg + n);
    else
        add_err(errs, "%s", msg);
}

static void destroy(struct hub_policy *p)
{
    if (p->L) {
        hub_lua_timers_close(p);
        lua_close(p->L);
    }
    hub_lua_jwt_keys_free(p->jwt_keys);
    free(p->module_dir);
    free(p->own_module);
    free(p->chunkname);
    free(p->emits);
    hub_buf_free(&p->tb);
    hub_buf_free(&p->warn);
    free(p);
}

/* Where require() finds modules: policy_path, else the policy file's
 * directory; none for the built-in policy. */
static char *module_dir(const struct hub_config *cfg)
{
    if (cfg->policy_path)
        return hub_xstrdup(cfg->policy_path);
    const char *slash = cfg->policy ? strrchr(cfg->policy, '/') : NULL;
    if (!slash)
        return NULL;
    return slash == cfg->policy ? hub_xstrdup("/")
                                : hub_xstrndup(cfg->policy, (size_t)(slash - cfg->policy));
}

/* Builds a policy: state, sandbox, keys, the script's main chunk under the
 * budgets, hooks verified, warnings. `host` is NULL for --check. Returns
 * NULL with every problem in `errs`; appends the warnings to `warns`.
 * Timers the chunk set are not started yet. */
static struct hub_policy *build(const struct hub_policy_host *host,
                                const struct hub_config *cfg,
                                struct hub_config_errors *errs,
                                struct hub_config_errors *warns)
{
    struct hub_policy *p = hub_xcalloc(1, sizeof(*p));
    struct hub_buf src = {0};
    unsigned first = errs->n;

    if (host)
        p->host = *host;
    p->cfg = cfg;
    p->lim.mem_max = (size_t)cfg->lua_max_memory;
    p->lim.budget = (int64_t)cfg->lua_max_instructions;
    p->phase = HUB_PHASE_IDLE;
    for (int h = 0; h < HUB_HOOK__COUNT; h++)
        p->hook_ref[h] = LUA_NOREF;
    for (int h = 0; h < HUB_PHASE__STATS; h++)
        hub_hist_init(&p->st.hook[h].dur, hub_hist_bounds_call,
                      hub_countof(hub_hist_bounds_call));
    if (cfg->policy) {
        size_t n = strlen(cfg->policy);
        p->chunkname = hub_xmalloc(n + 2);
        p->chunkname[0] = '@';
        memcpy(p->chunkname + 1, cfg->policy, n + 1);
    } else {
        p->chunkname = hub_xstrdup("=default.lua");
    }
    p->source_name = p->chunkname + 1;
    p->module_dir = module_dir(cfg);
    if (p->module_dir && cfg->policy) {
        /* the policy file as a module of its own directory: requiring it
         * is a cycle */
        const char *base = strrchr(cfg->policy, '/') + 1;
        size_t bl = strlen(base);
        if (bl > 4 && !strcmp(base + bl - 4, ".lua") && !memchr(base, '.', bl - 4) &&
            (size_t)(base - 1 - cfg->policy) == strlen(p->module_dir) &&
            !strncmp(cfg->policy, p->module_dir, (size_t)(base - 1 - cfg->policy)))
            p->own_module = hub_xstrndup(base, bl - 4);
    }
    p->ref_assigned = LUA_NOREF;

    if (hub_sandbox_open(p) < 0) {
        add_err(errs, "%s: cannot create a Lua state (out of memory)", p->source_name);
        goto fail;
    }
    lua_State *L = p->L;
    hub_policy_req_open(p);
    /* before the main chunk: it may verify tokens */
    if (hub_lua_jwt_keys_load(p, errs, warns) < 0)
        goto fail;

    if (read_source(p, &src, errs) < 0)
        goto fail;
    /* like luaL_loadfilex: skip a UTF-8 BOM and a first line "#..." */
    char *text = src.p;
    size_t len = src.len;
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) {
        text += 3;
        len -= 3;
    }
    if (len && text[0] == '#')
        for (size_t i = 0; i < len && text[i] != '\n'; i++)
            text[i] = ' ';

    p->lim.cap_on = 1;
    int st = luaL_loadbufferx(L, text, len, p->chunkname, "t");
    p->lim.cap_on = 0;
    if (st != LUA_OK) {
        if (st == LUA_ERRMEM)
            add_err(errs, "%s: not enough memory to compile the policy (lua_max_memory "
                          "is %llu bytes)", p->source_name,
                    (unsigned long long)p->lim.mem_max);
        else
            add_err(errs, "%s", lua_tostring(L, -1));
        goto fail;
    }
    lua_Debug ar;
    lua_pushvalue(L, -1);
    if (lua_getinfo(L, ">S", &ar))
        snprintf(p->short_src, sizeof(p->short_src), "%s", ar.short_src);
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_env);
    lua_setupvalue(L, -2, 1); /* the main chunk's _ENV */

    st = hub_policy_call(p, HUB_PHASE_LOAD, 0, 0);
    if (st != LUA_OK) {
        struct hub_buf b = {0};
        hub_policy_describe_failure(p, st, p->source_name, &b);
        add_lua_err(p, errs, b.p);
        hub_buf_free(&b);
        goto fail;
    }

    /* hooks: functions, fetched once */
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_env);
    int env = lua_gettop(L);
    for (int h = 0; h < HUB_HOOK__COUNT; h++) {
        lua_pushstring(L, hub_policy_phase_name(h));
        int t = lua_rawget(L, env);
        if (t == LUA_TNIL) {
            lua_pop(L, 1);
            continue;
        }
        if (t != LUA_TFUNCTION) {
            char line[32] = "";
            if (p->hook_line[h] > 0)
                snprintf(line, sizeof(line), ":%d", p->hook_line[h]);
            add_err(errs, "%s%s: %s must be a function (got a %s)", p->source_name, line,
                    hub_policy_phase_name(h), lua_typename(L, t));
            lua_pop(L, 1);
            continue;
        }
        lua_pushvalue(L, -1);
        if (lua_getinfo(L, ">S", &ar) && ar.linedefined > 0)
            snprintf(p->hook_where[h], sizeof(p->hook_where[h]), "%s:%d", ar.short_src,
                     ar.linedefined);
        else
            snprintf(p->hook_where[h], sizeof(p->hook_where[h]), "%s", p->short_src);
        p->hook_ref[h] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (errs->n > first)
        goto fail;

    hub_policy_lint(p, warns);
    /* from now on global assignments are plain; reads of unknown names
     * still raise */
    hub_sandbox_loaded(p);
    lua_settop(L, HUB_LUA_BASE);
    lua_gc(L, LUA_GCCOLLECT);
    hub_buf_free(&src);
    return p;

fail:
    hub_buf_free(&src);
    destroy(p);
    return NULL;
}

int hub_policy_check(const struct hub_config *cfg, struct hub_config_errors *errs,
                     struct hub_config_errors *warns)
{
    struct hub_policy *p = build(NULL, cfg, errs, warns);
    if (!p)
        return -1;
    destroy(p);
    return 0;
}

/* Logs the warnings of a policy being built, then frees them. */
static void log_warnings(struct hub_config_errors *warns)
{
    for (unsigned i = 0; i < warns->n; i++)
        hub_log(HUB_LOG_WARN, "policy: %s", warns->v[i]);
    hub_config_errors_free(warns);
}

struct hub_policy *hub_policy_new(const struct hub_policy_host *host,
                                  struct hub_config_errors *errs)
{
    struct hub_config_errors warns = {0};
    struct hub_policy *p = build(host, host->cfg, errs, &warns);
    log_warnings(&warns);
    if (!p)
        return NULL;
    hub_lua_timers_start(p);
    char hooks[128] = "";
    size_t n = 0;
    for (int h = 0; h < HUB_HOOK__COUNT; h++)
        if (hub_policy_has(p, (enum hub_hook)h))
            n += (size_t)snprintf(hooks + n, sizeof(hooks) - n, "%s%s", n ? ", " : "",
                                  hub_policy_phase_name(h));
    hub_log(HUB_LOG_INFO, "policy %s loaded, hooks: %s", p->source_name,
            n ? hooks : "none (everything is allowed)");
    return p;
}

void hub_policy_free(struct hub_policy *p)
{
    if (!p)
        return;
    int had_timers = p->ntimers > 0;
    uv_loop_t *loop = p->host.loop;
    destroy(p);
    /* Called after the loop has drained: let the timers' close callbacks
     * run so that uv_loop_close() finds no handle. */
    if (had_timers && loop)
        uv_run(loop, UV_RUN_NOWAIT);
}

static void forget_lua_object(void *arg, struct hub_policy_conn *c)
{
    (void)arg;
    c->lua_ref = 0;
}

int hub_policy_reload(struct hub_policy **policy, struct hub_config_errors *errs)
{
    struct hub_config_errors local = {0};
    struct hub_config_errors *e = errs ? errs : &local;
    struct hub_policy *old = *policy;
    unsigned first = e->n;

    struct hub_config_errors warns = {0};
    struct hub_policy *np = build(&old->host, old->cfg, e, &warns);
    log_warnings(&warns);
    if (!np) {
        if (old)
            old->st.reloads_failed++;
        for (unsigned i = first; i < e->n; i++)
            hub_log(HUB_LOG_ERROR, "policy reload failed, keeping the current policy: %s",
                    e->v[i]);
        if (!errs)
            hub_config_errors_free(&local);
        return -1;
    }
    if (old) {
        np->st = old->st;
        /* the old state's conn objects die with it */
        old->host.ops->each_conn(old->host.ud, forget_lua_object, NULL);
        destroy(old);
    }
    np->st.reloads_ok++;
    *policy = np;
    hub_lua_timers_start(np);
    hub_log(HUB_LOG_INFO, "policy reloaded from %s", np->source_name);
    return 0;
}

/* ---- metrics ----------------------------------------------------------------- */

/* One sample of a per-hook family: `name`{hook="...",`more`}. */
static void hook_value(struct hub_buf *b, const char *name, int phase, const char *more,
                       uint64_t v)
{
    char labels[96];
    snprintf(labels, sizeof(labels), "hook=\"%s\"%s", hub_policy_phase_name(phase), more);
    hub_metric_value(b, name, labels, v);
}

void hub_policy_metrics(const struct hub_policy *p, struct hub_buf *b)
{
    static const struct {
        const char *name, *help;
        size_t off;
    } counters[] = {
        {"luahub_policy_calls_total", "Policy hook and timer calls.",
         offsetof(struct hub_hook_stats, dur.total)},
        {"luahub_policy_errors_total",
         "Failed calls: errors, unexpected return values and budget stops.",
         offsetof(struct hub_hook_stats, errors)},
    };
    if (!p)
        return;
    for (size_t i = 0; i < hub_countof(counters); i++) {
        hub_metric_family(b, counters[i].name, "counter", counters[i].help);
        for (int h = 0; h < HUB_PHASE__STATS; h++)
            hook_value(b, counters[i].name, h, "",
                       *(const uint64_t *)((const char *)&p->st.hook[h] + counters[i].off));
    }
    hub_metric_family(b, "luahub_policy_budget_kills_total", "counter",
                      "Calls stopped by a budget (lua_max_instructions, lua_max_memory).");
    for (int h = 0; h < HUB_PHASE__STATS; h++) {
        hook_value(b, "luahub_policy_budget_kills_total", h, ",budget=\"instructions\"",
                   p->st.hook[h].kills_instructions);
        hook_value(b, "luahub_policy_budget_kills_total", h, ",budget=\"memory\"",
                   p->st.hook[h].kills_memory);
    }
    hub_metric_family(b, "luahub_policy_duration_seconds", "histogram",
                      "Time spent in policy calls.");
    for (int h = 0; h < HUB_PHASE__STATS; h++) {
        char labels[64];
        snprintf(labels, sizeof(labels), "hook=\"%s\"", hub_policy_phase_name(h));
        hub_metric_hist(b, "luahub_policy_duration_seconds", labels, &p->st.hook[h].dur);
    }
    hub_metric_one(b, "luahub_policy_memory_bytes", "gauge",
                   "Memory of the policy's Lua state.", p->lim.mem_used);
    hub_metric_one(b, "luahub_policy_timers", "gauge", "Pending hub.after timers.",
                   p->ntimers);
    hub_metric_family(b, "luahub_policy_reloads_total", "counter",
                      "Policy reloads, by result.");
    hub_metric_value(b, "luahub_policy_reloads_total", "result=\"ok\"", p->st.reloads_ok);
    hub_metric_value(b, "luahub_policy_reloads_total", "result=\"failed\"",
                     p->st.reloads_failed);
}

