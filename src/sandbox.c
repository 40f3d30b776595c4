/* The policy's Lua state: its limits (the counting allocator with the
 * memory cap and the instruction budget of lua_limits.c, set up for a
 * policy), the message handler, and the sandboxed environment the script
 * runs in. policy.c builds on it; the lua_*.c API files provide `hub`.
 *
 * Budgets (docs/lua.md "Budgets"; docs/internals.md "Lua: calls outside
 * the instruction budget"):
 * - A count hook fires every HUB_LUA_TICK instructions and takes them off
 *   the call's budget; when it runs out it raises a sentinel (a light
 *   userdata) and keeps raising it at every tick, so a loop that catches
 *   the error with pcall dies at its next tick. pcall, xpcall and
 *   coroutine.resume/wrap are replaced by versions that re-raise the
 *   sentinel and out-of-memory errors instead of returning them, and
 *   policy.c fails a call that ends "normally" after its budget ran out.
 * - Work in C is charged to the same budget: the library functions whose
 *   work grows with their arguments (lua_stdlib.c, lua_pattern.c) and the
 *   hub API (lua_*.c) call hub_sandbox_charge() before that work, and
 *   the allocator charges every byte allocated in a call.
 * - A call also has a time limit (HUB_LUA_NS_PER_INSTR per instruction of
 *   budget), checked at each tick and each charge: the backstop for work
 *   inside single VM instructions (comparing two long strings); a thread
 *   whose instructions are that slow is hooked at every instruction.
 * - The allocator counts every byte and refuses growth past lua_max_memory
 *   while Lua code runs (cap_on). Lua turns that into an out-of-memory
 *   error in the hook. Between calls the cap is off, so what C pushes as
 *   hook arguments (bounded: a channel name, a conn object) cannot fail.
 * - __gc metamethods are refused by setmetatable: Lua runs finalizers with
 *   hooks disabled, outside any budget.
 *
 * Sandbox (docs/lua.md "Sandbox"): base without load/loadfile/dofile/
 * collectgarbage/print, string without dump, table, math, utf8,
 * coroutine, os.time/clock/date, and `hub`; copies of the library tables;
 * the string metatable protected; reading an undeclared global raises.
 * require() is the hub's own (docs/lua.md "Modules"): Lua text files of
 * the module directory, run in the same _ENV under the budgets of the
 * call that requires them, while the policy loads; cached per state. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <lua-cjson.h>

#include "lua_api.h"
#include "luahub/log.h"

/* lua-cjson's shared library exports it; its header does not declare it. */
int luaopen_cjson_safe(lua_State *L);

#define WARN_MAX 4000 /* bytes of one warn() line */
#define MODULE_NAME_MAX 128         /* bytes of a module name */
#define MODULES_MAX 256             /* modules one policy may load */
#define MODULE_MAX_FILE (16 * 1024 * 1024)

/* ---- limits, message handler --------------------------------------------- */

/* Everything that can raise runs protected; this is only reached when the
 * C library itself runs out of memory outside a call. */
static int on_panic(lua_State *L)
{
    const char *msg = lua_tostring(L, -1);
    hub_log(HUB_LOG_ERROR, "policy: unprotected Lua error: %s", msg ? msg : "?");
    abort();
}

void hub_sandbox_oom(struct hub_policy *p, lua_State *L)
{
    p->mem_failed = 1;
    hub_lua_where(L, 0, p->lim.oom_where, sizeof(p->lim.oom_where));
    lua_pushliteral(L, "not enough memory");
    lua_error(L);
}

uint64_t hub_sandbox_time_limit_ms(int64_t budget)
{
    uint64_t ms = (uint64_t)budget / (1000000u / HUB_LUA_NS_PER_INSTR);
    return ms < HUB_LUA_TIME_MIN_MS ? HUB_LUA_TIME_MIN_MS : ms;
}

/* Message handler of every call: records where the error was raised (and a
 * traceback when debug logging is on) and returns the error unchanged. It
 * runs no Lua code (no __tostring), so it cannot loop. */
static int msgh(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);

    hub_lua_where(L, 1, p->err_where, sizeof(p->err_where));
    if (hub_log_enabled(HUB_LOG_DEBUG) && lua_type(L, 1) == LUA_TSTRING) {
        luaL_traceback(L, L, lua_tostring(L, 1), 1);
        hub_buf_reset(&p->tb);
        hub_buf_appends(&p->tb, lua_tostring(L, -1));
    }
    lua_settop(L, 1);
    return 1;
}

static void warnf(void *ud, const char *msg, int tocont)
{
    struct hub_policy *p = ud;

    if (!p->warn.len && !tocont && msg[0] == '@')
        return; /* control message ("@on", "@off") */
    /* one log line: the pieces past WARN_MAX bytes are dropped (the buffer
     * is outside the memory cap) */
    if (p->warn.len < WARN_MAX) {
        size_t n = strlen(msg);
        hub_buf_append(&p->warn, msg, n < WARN_MAX - p->warn.len ? n : WARN_MAX - p->warn.len);
    }
    if (tocont)
        return;
    hub_log(HUB_LOG_WARN, "policy: warning: %s", p->warn.p);
    hub_buf_reset(&p->warn);
}

/* ---- sandbox --------------------------------------------------------------- */

/* pcall/xpcall of the sandbox: Lua's own (lbaselib.c), except that the
 * budget stop and out-of-memory errors are raised again instead of being
 * returned, so a script cannot catch them. */
static int finish_pcall(lua_State *L, int status, lua_KContext extra)
{
    if (status != LUA_OK && status != LUA_YIELD) {
        struct hub_policy *p = hub_lua_policy(L);
        if (status == LUA_ERRMEM)
            p->mem_failed = 1;
        if (p->lim.killed || p->mem_failed)
            return lua_error(L);
        lua_pushboolean(L, 0);
        lua_pushvalue(L, -2);
        return 2;
    }
    return lua_gettop(L) - (int)extra;
}

static int sb_pcall(lua_State *L)
{
    luaL_checkany(L, 1);
    lua_pushboolean(L, 1);
    lua_insert(L, 1);
    int status = lua_pcallk(L, lua_gettop(L) - 2, LUA_MULTRET, 0, 0, finish_pcall);
    return finish_pcall(L, status, 0);
}

static int sb_xpcall(lua_State *L)
{
    int n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushboolean(L, 1);
    lua_pushvalue(L, 1);
    lua_rotate(L, 3, 2);
    int status = lua_pcallk(L, n - 2, LUA_MULTRET, 2, 2, finish_pcall);
    return finish_pcall(L, status, 2);
}

/* coroutine.resume/wrap (lcorolib.c) with the same rule: a coroutine that
 * died of the budget stop or of memory takes its resumer down too. */
static int auxresume(lua_State *L, lua_State *co, int narg)
{
    struct hub_policy *p = hub_lua_policy(L);
    int status, nres;

    if (!lua_checkstack(co, narg)) {
        lua_pushliteral(L, "too many arguments to resume");
        return -1;
    }
    lua_xmove(L, co, narg);
    status = lua_resume(co, L, narg, &nres);
    if (status == LUA_OK || status == LUA_YIELD) {
        if (!lua_checkstack(L, nres + 1)) {
            lua_pop(co, nres);
            lua_pushliteral(L, "too many results to resume");
            return -1;
        }
        lua_xmove(co, L, nres);
        return nres;
    }
    if (status == LUA_ERRMEM)
        p->mem_failed = 1;
    lua_xmove(co, L, 1);
    if (p->lim.killed || p->mem_failed)
        lua_error(L);
    return -1;
}

static int sb_coresume(lua_State *L)
{
    lua_State *co = lua_tothread(L, 1);
    luaL_argexpected(L, co, 1, "coroutine");
    int r = auxresume(L, co, lua_gettop(L) - 1);
    if (r < 0) {
        lua_pushboolean(L, 0);
        lua_insert(L, -2);
        return 2;
    }
    lua_pushboolean(L, 1);
    lua_insert(L, -(r + 1));
    return r + 1;
}

static int auxwrap(lua_State *L)
{
    lua_State *co = lua_tothread(L, lua_upvalueindex(1));
    int r = auxresume(L, co, lua_gettop(L));
    if (r < 0) {
        int stat = lua_status(co);
        if (stat != LUA_OK && stat != LUA_YIELD) {
            stat = lua_resetthread(co);
            lua_xmove(co, L, 1);
        }
        if (stat != LUA_ERRMEM && lua_type(L, -1) == LUA_TSTRING) {
            luaL_where(L, 1);
            lua_insert(L, -2);
            lua_concat(L, 2);
        }
        return lua_error(L);
    }
    return r;
}

static int sb_cowrap(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_State *co = lua_newthread(L);
    lua_pushvalue(L, 1);
    lua_xmove(L, co, 1);
    lua_pushcclosure(L, auxwrap, 1);
    return 1;
}

/* setmetatable without __gc: finalizers run outside every budget. */
static int sb_setmetatable(lua_State *L)
{
    int t = lua_type(L, 2);
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_argexpected(L, t == LUA_TNIL || t == LUA_TTABLE, 2, "nil or table");
    if (t == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        if (lua_rawget(L, 2) != LUA_TNIL)
            return luaL_error(L, "setmetatable: __gc metamethods are not allowed in a "
                                 "policy (finalizers would run outside the budgets)");
        lua_pop(L, 1);
    }
    if (luaL_getmetafield(L, 1, "__metatable") != LUA_TNIL)
        return luaL_error(L, "cannot change a protected metatable");
    lua_settop(L, 2);
    lua_setmetatable(L, 1);
    return 1;
}

/* _ENV.__index: reading a global that was never assigned. */
static int env_index(lua_State *L)
{
    if (lua_type(L, 2) == LUA_TSTRING)
        return luaL_error(L, "undeclared global '%s'", lua_tostring(L, 2));
    return luaL_error(L, "undeclared global (a %s key)", luaL_typename(L, 2));
}

/* _ENV.__newindex while the main chunk runs: records where each global is
 * first assigned (p->ref_assigned, for the lint) and the line of each hook,
 * for messages about them. Removed once loaded. */
static int env_newindex_load(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    lua_Debug ar;
    if (lua_type(L, 2) == LUA_TSTRING && lua_getstack(L, 1, &ar) &&
        lua_getinfo(L, "Sl", &ar)) {
        const char *k = lua_tostring(L, 2);
        for (int h = 0; h < HUB_HOOK__COUNT; h++)
            if (!strcmp(k, hub_policy_phase_name(h)) && !strcmp(ar.source, p->chunkname))
                p->hook_line[h] = ar.currentline;
        lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_assigned);
        lua_pushvalue(L, 2);
        if (lua_rawget(L, -2) == LUA_TNIL) {
            lua_pushvalue(L, 2);
            lua_pushfstring(L, "%s:%d", ar.source[0] == '@' ? ar.source + 1 : ar.short_src,
                            ar.currentline);
            lua_rawset(L, -4);
        }
    }
    lua_settop(L, 3);
    lua_rawset(L, 1);
    return 0;
}

/* ---- require ------------------------------------------------------------ */

/* A module name: parts of letters, digits, '_' and '-' separated by dots
 * ("lib.auth" is lib/auth.lua); nothing that could leave the directory. */
static int module_name_ok(const char *s, size_t n)
{
    if (n == 0 || n > MODULE_NAME_MAX || s[0] == '.' || s[n - 1] == '.')
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '_' || (c == '-' && i > 0 && s[i - 1] != '.') ||
                 (c == '.' && s[i - 1] != '.');
        if (!ok)
            return 0;
    }
    return 1;
}

/* Replaces Lua's (possibly shortened) name of the chunk at the start of
 * the error message on top by `path`. */
static void full_path_in_error(lua_State *L, const char *short_src, const char *path)
{
    size_t n = strlen(short_src);
    const char *msg = lua_tostring(L, -1);
    if (lua_type(L, -1) == LUA_TSTRING && n && !strncmp(msg, short_src, n) && msg[n] == ':') {
        lua_pushfstring(L, "%s%s", path, msg + n);
        lua_remove(L, -2);
    }
}

/* How Lua names the chunk `chunkname` in its messages (it shortens long
 * paths to "...tail"), learnt from an empty chunk of that name. */
static void short_src_of(lua_State *L, const char *chunkname, char *out, size_t n)
{
    lua_Debug ar;
    out[0] = '\0';
    if (luaL_loadbufferx(L, "", 0, chunkname, "t") != LUA_OK)
        lua_pop(L, 1);
    else if (lua_getinfo(L, ">S", &ar))
        snprintf(out, n, "%s", ar.short_src);
}

/* Raises "require('name'): a cycle: a -> b -> name". */
static int cycle(struct hub_policy *p, lua_State *L, const char *name)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (int i = 0; i < p->mod_depth; i++) {
        luaL_addstring(&b, p->mod_chain[i]);
        luaL_addstring(&b, " -> ");
    }
    luaL_addstring(&b, name);
    luaL_pushresult(&b);
    return luaL_error(L, "require('%s'): a cycle: %s%s", name, lua_tostring(L, -1),
                      p->own_module && !strcmp(name, p->own_module)
                          ? " (it is the policy file itself)" : "");
}

/* require(name): the value module `name` returned (true if nothing),
 * loaded once per state from <module_dir>/<name with dots as
 * slashes>.lua and run with the policy's _ENV. */
static int sb_require(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    size_t n;
    const char *name = luaL_checklstring(L, 1, &n);
    char shown[MODULE_NAME_MAX + 8];

    lua_settop(L, 1);
    if (!module_name_ok(name, n)) {
        hub_lua_show(name, n, shown, sizeof(shown));
        return luaL_error(L, "require('%s'): not a module name: letters, digits, '_' and "
                             "'-', in parts separated by dots (require('lib.auth') loads "
                             "lib/auth.lua from policy_path)", shown);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_modules); /* 2 */
    lua_pushvalue(L, 1);
    int t = lua_rawget(L, 2);
    if (t == LUA_TBOOLEAN && !lua_toboolean(L, -1))
        return cycle(p, L, name);
    if (t != LUA_TNIL)
        return 1;
    lua_pop(L, 1);
    if (p->phase != HUB_PHASE_LOAD)
        return luaL_error(L, "require('%s'): modules are loaded while the policy loads: "
                             "require it from the main chunk (a hook or a timer never "
                             "reads files)", name);
    if (!p->module_dir)
        return luaL_error(L, "require('%s'): the built-in policy has no module directory "
                             "(set policy or policy_path)", name);
    if (p->nmodules >= MODULES_MAX)
        return luaL_error(L, "require('%s'): more than %d modules", name, MODULES_MAX);
    if (p->mod_depth >= HUB_MODULE_DEPTH)
        return luaL_error(L, "require('%s'): modules nested more than %d deep", name,
                          HUB_MODULE_DEPTH);

    /* the file: dots are directories */
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    luaL_addstring(&b, p->module_dir);
    luaL_addchar(&b, '/');
    for (size_t i = 0; i < n; i++)
        luaL_addchar(&b, name[i] == '.' ? '/' : name[i]);
    luaL_addstring(&b, ".lua");
    luaL_pushresult(&b); /* 3: the path */
    const char *path = lua_tostring(L, 3);
    lua_pushfstring(L, "@%s", path); /* 4: the chunk name */

    struct hub_buf text = {0};
    char why[256];
    if (hub_policy_read_file(path, MODULE_MAX_FILE, &text, why, sizeof(why)) < 0) {
        hub_buf_free(&text);
        return luaL_error(L, "require('%s'): cannot read %s: %s", name, path, why);
    }
    /* reading and compiling it: C work of the call (lua_api.h) */
    hub_sandbox_charge(p, L, (int64_t)text.len);
    size_t skip = text.len >= 3 && !memcmp(text.p, "\xEF\xBB\xBF", 3) ? 3 : 0;
    if (text.len > skip && text.p[skip] == '#')
        for (size_t i = skip; i < text.len && text.p[i] != '\n'; i++)
            text.p[i] = ' ';
    int st = luaL_loadbufferx(L, text.p + skip, text.len - skip, lua_tostring(L, 4), "t");
    hub_buf_free(&text);
    char short_src[LUA_IDSIZE];
    short_src_of(L, lua_tostring(L, 4), short_src, sizeof(short_src));
    if (st != LUA_OK) {
        full_path_in_error(L, short_src, path);
        return lua_error(L);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_env);
    lua_setupvalue(L, -2, 1); /* the module's _ENV: the policy's */

    /* loading: a require of it from now on is a cycle */
    lua_pushvalue(L, 1);
    lua_pushboolean(L, 0);
    lua_rawset(L, 2);
    p->nmodules++;
    p->mod_chain[p->mod_depth++] = name;
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 3);
    st = lua_pcall(L, 2, 1, 0);
    p->mod_depth--;
    if (st != LUA_OK) {
        /* not loaded: a later require may try again (and fail again) */
        lua_pushvalue(L, 1);
        lua_pushnil(L);
        lua_rawset(L, 2);
        if (st == LUA_ERRMEM)
            p->mem_failed = 1;
        full_path_in_error(L, short_src, path);
        return lua_error(L);
    }
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushboolean(L, 1);
    }
    lua_pushvalue(L, 1);
    lua_pushvalue(L, -2);
    lua_rawset(L, 2);
    return 1;
}

/* Copies the fields `names` (NULL-terminated; NULL = all) of the table at
 * `from` into a new table, pushed. */
static void copy_table(lua_State *L, int from, const char *const *names)
{
    from = lua_absindex(L, from);
    lua_newtable(L);
    if (names) {
        for (; *names; names++) {
            lua_getfield(L, from, *names);
            lua_setfield(L, -2, *names);
        }
        return;
    }
    lua_pushnil(L);
    while (lua_next(L, from)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, -4);
    }
}

static void open_lib(lua_State *L, const char *name, lua_CFunction f)
{
    luaL_requiref(L, name, f, 1);
    lua_pop(L, 1);
}

/* Builds the state's environment; leaves the stack as HUB_LUA_MSGH (msgh)
 * and HUB_LUA_MSG (msg object). Memory is uncapped here (cap_on is 0), so
 * nothing raises but a real out-of-memory (then on_panic). */
static void setup(struct hub_policy *p)
{
    lua_State *L = p->L;
    static const char *const base[] = {
        "assert", "error", "ipairs", "next", "pairs", "select", "tonumber",
        "tostring", "type", "rawequal", "rawget", "rawlen", "rawset",
        "getmetatable", "warn", "_VERSION", NULL,
    };
    static const char *const os_fns[] = {"time", "clock", "date", NULL};

    lua_pushcfunction(L, msgh);

    open_lib(L, LUA_GNAME, luaopen_base);
    open_lib(L, LUA_STRLIBNAME, luaopen_string);
    open_lib(L, LUA_TABLIBNAME, luaopen_table);
    open_lib(L, LUA_MATHLIBNAME, luaopen_math);
    open_lib(L, LUA_UTF8LIBNAME, luaopen_utf8);
    open_lib(L, LUA_COLIBNAME, luaopen_coroutine);
    open_lib(L, LUA_OSLIBNAME, luaopen_os);

    /* cjson: linked, registered from C (no require, no package.cpath) */
    luaL_requiref(L, "cjson", luaopen_cjson, 0);
    lua_getfield(L, -1, "encode");
    p->ref_encode = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getfield(L, -1, "null");
    p->ref_null = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    luaL_requiref(L, "cjson.safe", luaopen_cjson_safe, 0);
    lua_getfield(L, -1, "decode");
    p->ref_decode = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);

    /* The string metatable's __index is the real string table: no dump in
     * it, and getmetatable("") gives false, so it cannot be patched. */
    lua_getglobal(L, LUA_STRLIBNAME);
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);
    /* C functions whose work grows with their arguments: charged (before
     * the copies below, and in the real string table methods use) */
    hub_lua_stdlib_bound(L);
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 2);

    /* the sandbox */
    lua_newtable(L);
    int env = lua_gettop(L);
    lua_pushglobaltable(L);
    for (const char *const *n = base; *n; n++) {
        lua_getfield(L, -1, *n);
        lua_setfield(L, env, *n);
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, sb_setmetatable);
    lua_setfield(L, env, "setmetatable");
    lua_pushcfunction(L, sb_pcall);
    lua_setfield(L, env, "pcall");
    lua_pushcfunction(L, sb_xpcall);
    lua_setfield(L, env, "xpcall");
    lua_pushcfunction(L, sb_require);
    lua_setfield(L, env, "require");

    /* require's cache; the policy file's own name is "loading" for good */
    lua_newtable(L);
    if (p->own_module) {
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, p->own_module);
        p->mod_chain[p->mod_depth++] = p->own_module;
    }
    p->ref_modules = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_newtable(L);
    p->ref_assigned = luaL_ref(L, LUA_REGISTRYINDEX);

    static const char *const libs[] = {LUA_STRLIBNAME, LUA_TABLIBNAME, LUA_MATHLIBNAME,
                                       LUA_UTF8LIBNAME, LUA_COLIBNAME, NULL};
    for (const char *const *n = libs; *n; n++) {
        lua_getglobal(L, *n);
        copy_table(L, -1, NULL);
        lua_setfield(L, env, *n);
        lua_pop(L, 1);
    }
    lua_getfield(L, env, LUA_COLIBNAME);
    lua_pushcfunction(L, sb_coresume);
    lua_setfield(L, -2, "resume");
    lua_pushcfunction(L, sb_cowrap);
    lua_setfield(L, -2, "wrap");
    lua_pop(L, 1);
    lua_getglobal(L, LUA_OSLIBNAME);
    copy_table(L, -1, os_fns);
    lua_setfield(L, env, LUA_OSLIBNAME);
    lua_pop(L, 1);

    hub_lua_open(p);
    lua_setfield(L, env, "hub");
    lua_pushvalue(L, env);
    lua_setfield(L, env, "_G");

    lua_newtable(L);
    lua_pushcfunction(L, env_index);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, env_newindex_load);
    lua_setfield(L, -2, "__newindex");
    lua_setmetatable(L, env);
    p->ref_env = luaL_ref(L, LUA_REGISTRYINDEX); /* pops env */

    hub_lua_new_msg(p);
}

void hub_sandbox_arm(struct hub_policy *p)
{
    hub_lua_limits_arm(&p->lim);
    p->mem_failed = 0;
    p->err_where[0] = '\0';
}

/* The count hook counts but never stops while no call runs. */
static int idle(lua_State *L)
{
    return hub_lua_policy(L)->phase == HUB_PHASE_IDLE;
}

int hub_sandbox_open(struct hub_policy *p)
{
    p->lim.tick = HUB_LUA_TICK;
    p->lim.time_limit_ns = hub_sandbox_time_limit_ms(p->lim.budget) * 1000000u;
    p->lim.alloc_cost = HUB_COST_ALLOC;
    p->lim.idle = idle;
    p->L = hub_lua_limits_newstate(&p->lim);
    if (!p->L)
        return -1;
    *(struct hub_policy **)lua_getextraspace(p->L) = p;
    lua_atpanic(p->L, on_panic);
    lua_setwarnf(p->L, warnf, p);
    setup(p);
    hub_lua_limits_hook(&p->lim);
    return 0;
}

void hub_sandbox_loaded(struct hub_policy *p)
{
    lua_State *L = p->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, p->ref_env);
    lua_getmetatable(L, -1);
    lua_pushnil(L);
    lua_setfield(L, -2, "__newindex");
    lua_pop(L, 2);
    luaL_unref(L, LUA_REGISTRYINDEX, p->ref_assigned);
    p->ref_assigned = LUA_NOREF;
    p->mod_depth = 0;
}
