/* The standard library of the policy sandbox, bounded: every function
 * whose work in C grows with its arguments is charged to the instruction
 * budget for that work before it runs (docs/internals.md, "Lua: calls
 * outside the instruction budget").
 *
 * The count hook only sees VM instructions. Without this, one call such as
 * string.rep("", 2^62) or table.move({}, 1, 2^62, 1, {}) runs in C forever
 * with no allocation, so neither budget stops it, and a cheap-looking call
 * repeated in a loop (utf8.len of a big string, table.insert at the front
 * of a long list) costs one instruction per call for milliseconds of work.
 *
 * Three kinds of replacement, all installed in the library tables before
 * the sandbox copies them (and in the real string table, which string
 * methods reach through the string metatable):
 * - wrappers that compute the size of the work from the arguments, charge
 *   it, and call Lua's own function (string.rep, byte, format, pack, ...);
 * - our own table.insert, remove, concat and sort: Lua's read the length
 *   with luaL_len, which may call a __len metamethod, so a wrapper cannot
 *   know the size the function will use; ours read it once and charge
 *   before (insert, remove) or while (concat, sort) they work;
 * - string.find/match/gmatch/gsub: our own step-counted matcher
 *   (lua_pattern.c).
 * Costs are in instructions: HUB_COST_COPY bytes per instruction for
 * memcpy-like work, HUB_COST_SCAN for loops over each byte, HUB_COST_ELEM
 * per table element read or written through the API (lua_api.h). */
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "lua_api.h"

#define ORIG(L) lua_tocfunction((L), lua_upvalueindex(1))
#define STACK_MAX 1000000   /* LUAI_MAXSTACK: more results cannot exist */
#define SKIP_CHUNK 4096     /* bytes scanned between two charges */

static void charge(lua_State *L, int64_t n)
{
    hub_sandbox_charge(hub_lua_policy(L), L, n);
}

/* `n` units at `per` instructions each, saturated (n may be near 2^64). */
static int64_t times(uint64_t n, int64_t per)
{
    if (n > (uint64_t)(INT64_MAX / per))
        return INT64_MAX;
    return (int64_t)n * per;
}

static size_t str_len(lua_State *L, int i)
{
    size_t n = 0;
    if (lua_type(L, i) == LUA_TSTRING)
        lua_tolstring(L, i, &n);
    return n;
}

/* Bytes of the string arguments from `first` on. */
static uint64_t args_len(lua_State *L, int first)
{
    uint64_t n = 0;
    for (int i = first, top = lua_gettop(L); i <= top; i++)
        n += str_len(L, i);
    return n;
}

/* An optional integer argument, or `def` (also when it is not a number:
 * the wrapped function raises on it itself). */
static lua_Integer opt_int(lua_State *L, int arg, lua_Integer def)
{
    int ok;
    lua_Integer v = lua_tointegerx(L, arg, &ok);
    return ok ? v : def;
}

/* Number of bytes between the relative positions i and j (both included)
 * of a string of `len` bytes, as string.sub reads them. */
static uint64_t span(size_t len, lua_Integer i, lua_Integer j)
{
    lua_Integer l = (lua_Integer)len;
    if (i < 0)
        i = i < -l ? 1 : l + i + 1;
    else if (i == 0)
        i = 1;
    if (j > l)
        j = l;
    else if (j < 0)
        j = j < -l ? 0 : l + j + 1;
    return j >= i ? (uint64_t)(j - i + 1) : 0;
}

/* ---- string ------------------------------------------------------------- */

static int w_byte(lua_State *L)
{
    size_t len = str_len(L, 1);
    lua_Integer i = opt_int(L, 2, 1);
    charge(L, times(span(len, i, opt_int(L, 3, i)), 1) + 1);
    return ORIG(L)(L);
}

/* string.char, utf8.char, table.pack: a value per argument */
static int w_per_arg(lua_State *L)
{
    charge(L, lua_gettop(L) + 1);
    return ORIG(L)(L);
}

/* reverse, lower, upper, packsize, tonumber: a loop over the bytes of
 * argument 1 */
static int w_scan1(lua_State *L)
{
    charge(L, (int64_t)(str_len(L, 1) / HUB_COST_SCAN) + 1);
    return ORIG(L)(L);
}

static int w_format(lua_State *L)
{
    charge(L, (int64_t)((str_len(L, 1) + args_len(L, 2)) / HUB_COST_SCAN) + 1);
    return ORIG(L)(L);
}

/* string.rep(s, n [, sep]): a loop of n memcpy calls, even when they copy
 * nothing (string.rep("", 2^62) never ends), and the bytes. */
static int w_rep(lua_State *L)
{
    struct hub_policy *p = hub_lua_policy(L);
    size_t l, lsep = 0;
    luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_optlstring(L, 3, "", &lsep);

    if (n > 0 && l + lsep >= l && l + lsep <= (size_t)INT64_MAX / (uint64_t)n) {
        uint64_t total = (uint64_t)n * (l + lsep);
        if (p->lim.cap_on && total > p->lim.mem_max)
            return ORIG(L)(L); /* its first allocation fails: a memory error */
        charge(L, (int64_t)n / 2 + (int64_t)(total / HUB_COST_COPY) + 1);
    }
    return ORIG(L)(L); /* n <= 0, or raises "resulting string too large" */
}

/* string.pack: the format, the sizes it names (a "c1000000" pads a
 * million bytes one by one) and the strings it copies. */
static int w_pack(lua_State *L)
{
    size_t lf = 0;
    const char *f = lua_tolstring(L, 1, &lf);
    uint64_t sizes = 0, cur = 0;
    for (size_t i = 0; f && i < lf; i++) {
        if (f[i] >= '0' && f[i] <= '9') {
            if (cur < UINT32_MAX)
                cur = cur * 10 + (uint64_t)(f[i] - '0');
        } else {
            sizes += cur;
            cur = 0;
        }
    }
    sizes += cur;
    charge(L, (int64_t)lf + (int64_t)(sizes / HUB_COST_SCAN) +
              (int64_t)(args_len(L, 2) / HUB_COST_COPY) + 1);
    return ORIG(L)(L);
}

static int w_unpack(lua_State *L)
{
    charge(L, (int64_t)str_len(L, 1) + (int64_t)(str_len(L, 2) / HUB_COST_COPY) + 1);
    return ORIG(L)(L);
}

/* The string metatable's arithmetic (`"10" + 1`): converting a string to a
 * number reads all of it. */
static int w_arith(lua_State *L)
{
    charge(L, (int64_t)((str_len(L, 1) + str_len(L, 2)) / HUB_COST_SCAN) + 1);
    return ORIG(L)(L);
}

/* ---- table ---------------------------------------------------------------- */

enum { T_R = 1, T_W = 2, T_L = 4 };

/* Argument `arg` must be a table, or have the metamethods for `what`
 * (reading: __index, writing: __newindex, length: __len), like Lua's. */
static void need_table(lua_State *L, int arg, int what)
{
    static const char *const keys[] = {"__index", "__newindex", "__len"};
    int ok = 0;

    if (lua_type(L, arg) == LUA_TTABLE)
        return;
    if (lua_getmetatable(L, arg)) {
        ok = 1;
        for (int i = 0; i < 3; i++) {
            if (what & (1 << i)) {
                lua_pushstring(L, keys[i]);
                ok &= lua_rawget(L, -2) != LUA_TNIL;
                lua_pop(L, 1);
            }
        }
        lua_pop(L, 1);
    }
    if (!ok)
        luaL_checktype(L, arg, LUA_TTABLE);
}

/* table.insert(t, [pos,] v) */
static int t_insert(lua_State *L)
{
    need_table(L, 1, T_R | T_W | T_L);
    lua_Integer end = (lua_Integer)((lua_Unsigned)luaL_len(L, 1) + 1u), pos;

    switch (lua_gettop(L)) {
    case 2:
        pos = end;
        break;
    case 3:
        pos = luaL_checkinteger(L, 2);
        luaL_argcheck(L, (lua_Unsigned)pos - 1u < (lua_Unsigned)end, 2,
                      "position out of bounds");
        charge(L, times((lua_Unsigned)end - (lua_Unsigned)pos, HUB_COST_ELEM));
        for (lua_Integer i = end; i > pos; i--) {
            lua_geti(L, 1, i - 1);
            lua_seti(L, 1, i);
        }
        break;
    default:
        return luaL_error(L, "wrong number of arguments to 'insert'");
    }
    lua_seti(L, 1, pos);
    return 0;
}

/* table.remove(t [, pos]) */
static int t_remove(lua_State *L)
{
    need_table(L, 1, T_R | T_W | T_L);
    lua_Integer size = luaL_len(L, 1);
    lua_Integer pos = luaL_optinteger(L, 2, size);

    if (pos != size) /* argument #1 in the message, as Lua 5.4.4's says */
        luaL_argcheck(L, (lua_Unsigned)pos - 1u <= (lua_Unsigned)size, 1,
                      "position out of bounds");
    if (pos < size)
        charge(L, times((lua_Unsigned)size - (lua_Unsigned)pos, HUB_COST_ELEM));
    lua_geti(L, 1, pos);
    for (; pos < size; pos++) {
        lua_geti(L, 1, pos + 1);
        lua_seti(L, 1, pos);
    }
    lua_pushnil(L);
    lua_seti(L, 1, pos);
    return 1;
}

/* table.concat(t [, sep [, i [, j]]]): charged per element as it goes
 * (the bytes are charged by the allocator). */
static int t_concat(lua_State *L)
{
    size_t lsep;
    need_table(L, 1, T_R | T_L);
    lua_Integer last = luaL_len(L, 1);
    const char *sep = luaL_optlstring(L, 2, "", &lsep);
    lua_Integer i = luaL_optinteger(L, 3, 1);
    last = luaL_optinteger(L, 4, last);
    luaL_Buffer b;
    unsigned n = 0;

    luaL_buffinit(L, &b);
    for (; i <= last; i++) {
        if (++n == 256) {
            charge(L, 256 * HUB_COST_ELEM);
            n = 0;
        }
        lua_geti(L, 1, i);
        if (!lua_isstring(L, -1))
            return luaL_error(L, "invalid value (%s) at index %I in table for 'concat'",
                              luaL_typename(L, -1), i);
        luaL_addvalue(&b);
        if (i == last)
            break; /* i + 1 could overflow */
        luaL_addlstring(&b, sep, lsep);
    }
    luaL_pushresult(&b);
    return 1;
}

/* table.move(a1, f, e, t [, a2]): every argument is explicit, so Lua's own
 * runs after the charge. */
static int w_move(lua_State *L)
{
    lua_Integer f = luaL_checkinteger(L, 2);
    lua_Integer e = luaL_checkinteger(L, 3);
    luaL_checkinteger(L, 4);
    if (e >= f && (f > 0 || e < LUA_MAXINTEGER + f))
        charge(L, times((lua_Unsigned)e - (lua_Unsigned)f + 1u, HUB_COST_ELEM));
    return ORIG(L)(L); /* it raises on the arguments charged nothing for */
}

/* table.unpack(t [, i [, j]]): the length is read here, once, and passed on
 * explicitly. */
static int w_unpack_list(lua_State *L)
{
    lua_Integer i = luaL_optinteger(L, 2, 1);
    lua_Integer e;
    if (lua_isnoneornil(L, 3)) {
        e = luaL_len(L, 1);
        lua_settop(L, 2);
        lua_pushinteger(L, e);
    } else {
        e = luaL_checkinteger(L, 3);
        lua_settop(L, 3);
    }
    if (i <= e && (lua_Unsigned)e - (lua_Unsigned)i < STACK_MAX)
        charge(L, times((lua_Unsigned)e - (lua_Unsigned)i + 1u, HUB_COST_ELEM));
    return ORIG(L)(L); /* more than STACK_MAX: "too many results to unpack" */
}

/* table.sort(t [, comp]): a heapsort through the API, charged per
 * comparison as it goes; an order function is called with lua_call. Not
 * stable (neither is Lua's); an invalid order function gives some
 * permutation instead of an error. */
struct sorter {
    lua_State *L;
    int has_comp;
    unsigned n;
};

/* t[a] < t[b]? */
static int sort_less(struct sorter *s, lua_Integer a, lua_Integer b)
{
    lua_State *L = s->L;
    if (++s->n == 64) {
        charge(L, 64 * 3 * HUB_COST_ELEM);
        s->n = 0;
    }
    if (s->has_comp)
        lua_pushvalue(L, 2);
    lua_geti(L, 1, a);
    lua_geti(L, 1, b);
    if (!s->has_comp) {
        int r = lua_compare(L, -2, -1, LUA_OPLT);
        lua_pop(L, 2);
        return r;
    }
    lua_call(L, 2, 1);
    int r = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return r;
}

static void sort_swap(lua_State *L, lua_Integer a, lua_Integer b)
{
    lua_geti(L, 1, a);
    lua_geti(L, 1, b);
    lua_seti(L, 1, a);
    lua_seti(L, 1, b);
}

/* Moves t[lo + root] down the heap t[lo .. lo + n - 1] (0-based offsets). */
static void sift_down(struct sorter *s, lua_Integer lo, lua_Integer root, lua_Integer n)
{
    for (;;) {
        lua_Integer child = 2 * root + 1;
        if (child >= n)
            return;
        if (child + 1 < n && sort_less(s, lo + child, lo + child + 1))
            child++;
        if (!sort_less(s, lo + root, lo + child))
            return;
        sort_swap(s->L, lo + root, lo + child);
        root = child;
    }
}

static int t_sort(lua_State *L)
{
    need_table(L, 1, T_R | T_W | T_L);
    lua_Integer n = luaL_len(L, 1);
    struct sorter s = {L, 0, 0};

    if (n > 1) {
        luaL_argcheck(L, n < INT_MAX, 1, "array too big");
        if (!lua_isnoneornil(L, 2))
            luaL_checktype(L, 2, LUA_TFUNCTION);
        s.has_comp = !lua_isnoneornil(L, 2);
        lua_settop(L, 2);
        for (lua_Integer i = n / 2; i-- > 0;)
            sift_down(&s, 1, i, n);
        for (lua_Integer end = n - 1; end > 0; end--) {
            sort_swap(L, 1, 1 + end);
            sift_down(&s, 1, 0, end);
        }
    }
    return 0;
}

/* ---- utf8 ----------------------------------------------------------------- */

/* utf8.codepoint(s [, i [, j]]): a value per byte at most */
static int w_codepoint(lua_State *L)
{
    size_t len = str_len(L, 1);
    lua_Integer i = opt_int(L, 2, 1);
    charge(L, (int64_t)span(len, i, opt_int(L, 3, i)) + 1);
    return ORIG(L)(L);
}

/* utf8.len(s [, i [, j]]) */
static int w_utf8len(lua_State *L)
{
    size_t len = str_len(L, 1);
    charge(L, (int64_t)(span(len, opt_int(L, 2, 1), opt_int(L, 3, -1)) / HUB_COST_SCAN) + 1);
    return ORIG(L)(L);
}

static int is_cont(const char *s)
{
    return ((unsigned char)*s & 0xC0) == 0x80;
}

/* The iterator of utf8.codes: Lua's walks over any run of continuation
 * bytes before the next character, however long (one call can scan the
 * whole string, again and again). The run is skipped here in charged
 * slices, then Lua's iterator decodes from the character it reached.
 * Upvalue 1: Lua's iterator. */
static int codes_next(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_Unsigned n = (lua_Unsigned)opt_int(L, 2, 0);

    if (n < len && is_cont(s + n)) {
        while (n < len && is_cont(s + n)) {
            size_t stop = len - n > SKIP_CHUNK ? n + SKIP_CHUNK : len;
            while (n < stop && is_cont(s + n))
                n++;
            charge(L, SKIP_CHUNK / HUB_COST_SCAN);
        }
        lua_pushinteger(L, (lua_Integer)n);
        lua_replace(L, 2);
    }
    return ORIG(L)(L);
}

static int w_codes(lua_State *L)
{
    int r = ORIG(L)(L); /* iterator, s, 0 */
    lua_pushvalue(L, -r);
    lua_pushcclosure(L, codes_next, 1);
    lua_replace(L, -r - 1);
    return r;
}

/* ---- base, os --------------------------------------------------------------- */

/* next: Lua's next scans the table's slots up to the next non-empty one; a
 * table emptied after it grew makes that a long scan per call that no
 * count sees. The charge also checks the call's time limit. */
static int w_next(lua_State *L)
{
    charge(L, 1);
    return ORIG(L)(L);
}

/* pairs(t) hands out Lua's next: hand out ours. Upvalues: Lua's pairs,
 * Lua's next, our next. */
static int w_pairs(lua_State *L)
{
    int r = ORIG(L)(L);
    if (r == 3 && lua_tocfunction(L, -3) == lua_tocfunction(L, lua_upvalueindex(2))) {
        lua_pushvalue(L, lua_upvalueindex(3));
        lua_replace(L, -4);
    }
    return r;
}

/* rawequal on two long strings compares their bytes */
static int w_rawequal(lua_State *L)
{
    size_t a = str_len(L, 1), b = str_len(L, 2);
    charge(L, (int64_t)((a < b ? a : b) / HUB_COST_COPY) + 1);
    return ORIG(L)(L);
}

/* warn: the pieces are joined and logged */
static int w_warn(lua_State *L)
{
    charge(L, (int64_t)(args_len(L, 1) / HUB_COST_COPY) + HUB_COST_LOG);
    return ORIG(L)(L);
}

/* The policy's time in whole seconds (hub_lua_now_ms: the fake clock of
 * `luahub test`, else the wall clock, as time(NULL) would give). */
static lua_Integer now_s(lua_State *L)
{
    return (lua_Integer)(hub_lua_now_ms(hub_lua_policy(L)) / 1000.0);
}

/* os.date: strftime per conversion; without a time, the policy's */
static int w_date(lua_State *L)
{
    charge(L, 16 + times(str_len(L, 1), 8));
    if (lua_isnoneornil(L, 2)) {
        lua_settop(L, 1);
        lua_pushinteger(L, now_s(L));
    }
    return ORIG(L)(L);
}

/* os.time(t): mktime (with a time zone lookup); os.time(): the policy's */
static int w_time(lua_State *L)
{
    charge(L, lua_istable(L, 1) ? 256 : 1);
    if (lua_isnoneornil(L, 1)) {
        lua_pushinteger(L, now_s(L));
        return 1;
    }
    return ORIG(L)(L);
}

/* os.clock: a system call */
static int w_clock(lua_State *L)
{
    charge(L, 32);
    return ORIG(L)(L);
}

/* ---- installing ---------------------------------------------------------------- */

/* What replaces what: in library `lib` (NULL: the globals), `name` becomes
 * `fn`, a closure over Lua's own function (upvalue 1) when `wraps`. */
static const struct {
    const char *lib, *name;
    lua_CFunction fn;
    int wraps;
} bounded[] = {
    {LUA_STRLIBNAME, "byte", w_byte, 1},
    {LUA_STRLIBNAME, "char", w_per_arg, 1},
    {LUA_STRLIBNAME, "format", w_format, 1},
    {LUA_STRLIBNAME, "rep", w_rep, 1},
    {LUA_STRLIBNAME, "reverse", w_scan1, 1},
    {LUA_STRLIBNAME, "lower", w_scan1, 1},
    {LUA_STRLIBNAME, "upper", w_scan1, 1},
    {LUA_STRLIBNAME, "pack", w_pack, 1},
    {LUA_STRLIBNAME, "packsize", w_scan1, 1},
    {LUA_STRLIBNAME, "unpack", w_unpack, 1},
    {LUA_TABLIBNAME, "insert", t_insert, 0},
    {LUA_TABLIBNAME, "remove", t_remove, 0},
    {LUA_TABLIBNAME, "concat", t_concat, 0},
    {LUA_TABLIBNAME, "sort", t_sort, 0},
    {LUA_TABLIBNAME, "move", w_move, 1},
    {LUA_TABLIBNAME, "unpack", w_unpack_list, 1},
    {LUA_TABLIBNAME, "pack", w_per_arg, 1},
    {LUA_UTF8LIBNAME, "char", w_per_arg, 1},
    {LUA_UTF8LIBNAME, "codepoint", w_codepoint, 1},
    {LUA_UTF8LIBNAME, "len", w_utf8len, 1},
    {LUA_UTF8LIBNAME, "offset", w_scan1, 1},
    {LUA_UTF8LIBNAME, "codes", w_codes, 1},
    {LUA_OSLIBNAME, "date", w_date, 1},
    {LUA_OSLIBNAME, "time", w_time, 1},
    {LUA_OSLIBNAME, "clock", w_clock, 1},
    {NULL, "tonumber", w_scan1, 1},
    {NULL, "rawequal", w_rawequal, 1},
    {NULL, "warn", w_warn, 1},
};

/* Replaces t[name] (t at index `t`) by `fn`, with the original as upvalue
 * 1 when `wraps`. */
static void replace(lua_State *L, int t, const char *name, lua_CFunction fn, int wraps)
{
    if (wraps)
        lua_getfield(L, t, name);
    lua_pushcclosure(L, fn, wraps);
    lua_setfield(L, t, name);
}

void hub_lua_stdlib_bound(lua_State *L)
{
    static const char *const arith[] = {
        "__add", "__sub", "__mul", "__div", "__mod", "__pow", "__unm", "__idiv", NULL,
    };

    for (size_t i = 0; i < sizeof(bounded) / sizeof(bounded[0]); i++) {
        if (bounded[i].lib)
            lua_getglobal(L, bounded[i].lib);
        else
            lua_pushglobaltable(L);
        replace(L, lua_gettop(L), bounded[i].name, bounded[i].fn, bounded[i].wraps);
        lua_pop(L, 1);
    }
    lua_getglobal(L, LUA_STRLIBNAME);
    hub_lua_pattern_open(L, -1);
    lua_pop(L, 1);

    /* the string metatable's arithmetic */
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1);
    int t = lua_gettop(L);
    for (const char *const *n = arith; *n; n++) {
        int is_fn = lua_getfield(L, t, *n) == LUA_TFUNCTION;
        lua_pop(L, 1);
        if (is_fn)
            replace(L, t, *n, w_arith, 1);
    }
    lua_pop(L, 2);

    /* next, and pairs handing out our next: pairs' upvalues are Lua's
     * pairs, Lua's next and our next */
    lua_pushglobaltable(L);
    t = lua_gettop(L);
    lua_getfield(L, t, "pairs");
    lua_getfield(L, t, "next");
    lua_getfield(L, t, "next");
    lua_pushcclosure(L, w_next, 1);
    lua_pushvalue(L, -1);
    lua_setfield(L, t, "next");
    lua_pushcclosure(L, w_pairs, 3);
    lua_setfield(L, t, "pairs");
    lua_pop(L, 1);
}
