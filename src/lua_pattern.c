/* Lua patterns for the policy sandbox: string.find, string.match,
 * string.gmatch and string.gsub with the semantics of Lua 5.4's, written
 * for the hub so that every step of the matcher is charged to the
 * instruction budget of the call in progress (docs/internals.md, "Lua:
 * calls outside the instruction budget").
 *
 * Lua's own matcher backtracks without any bound: ("a*"):rep(30) .. "b" on
 * 30 bytes, or "(.-)x(.-)y" on a 64 KB message, runs in C for minutes while
 * the count hook, which only sees VM instructions, never fires. Here one
 * step (an attempt at a pattern item, one character tried by a repetition,
 * one character walked by %b) costs one instruction, so a pathological
 * pattern is stopped by the budget like a `while true do end`, and an
 * ordinary one costs about what Lua's own would take in VM instructions.
 *
 * What is matched is exactly Lua 5.4's pattern language: character classes
 * (%a %c %d %g %l %p %s %u %w %x %z, upper case for the complement, %x for a
 * literal non-alphanumeric x), sets [...] with ranges and classes, ".", the
 * repetitions * + - ?, captures ( ) and position captures (), back
 * references %1-%9, %bxy, %f[set], the anchors ^ (not in gmatch) and $,
 * at most 32 captures and a recursion depth of 200 ("pattern too complex").
 * Error messages are Lua's. A pattern without special characters is
 * searched for with memmem (linear). tests/unit/test_policy_host.c checks
 * the results against the stock functions of liblua5.4. */
#include <ctype.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "lua_api.h"

#define MAX_CAPTURES 32     /* LUA_MAXCAPTURES */
#define MAX_DEPTH 200       /* Lua's MAXCCALLS for patterns */
#define CAP_OPEN (-1)       /* a capture whose ')' has not been reached */
#define CAP_POS (-2)        /* a position capture "()" */
#define STEP_BATCH 256      /* steps counted before they are charged */
#define SPECIALS "^$*+?.([%-"

struct capture {
    const char *start;
    ptrdiff_t len;          /* or CAP_OPEN / CAP_POS */
};

struct matcher {
    lua_State *L;
    struct hub_policy *p;
    const char *src, *src_end;  /* the subject */
    const char *pat_end;        /* the pattern ends here (it may hold NULs) */
    int depth;                  /* recursion left */
    int ncap;
    unsigned steps;             /* not charged yet */
    struct capture cap[MAX_CAPTURES];
};

/* Takes `n` steps; every STEP_BATCH of them are charged (and may raise the
 * budget stop, which unwinds the matcher: it owns no C resource). */
static void step(struct matcher *m, unsigned n)
{
    m->steps += n;
    if (m->steps >= STEP_BATCH) {
        unsigned s = m->steps;
        m->steps = 0;
        hub_sandbox_charge(m->p, m->L, s);
    }
}

static void flush_steps(struct matcher *m)
{
    unsigned s = m->steps;
    m->steps = 0;
    if (s)
        hub_sandbox_charge(m->p, m->L, s);
}

static void reset(struct matcher *m)
{
    m->ncap = 0;
    m->depth = MAX_DEPTH;
}

static void begin(struct matcher *m, lua_State *L, const char *s, size_t ls,
                  const char *pat, size_t lp)
{
    m->L = L;
    m->p = hub_lua_policy(L);
    m->src = s;
    m->src_end = s + ls;
    m->pat_end = pat + lp;
    m->steps = 0;
    reset(m);
}

/* ---- single characters -------------------------------------------------- */

/* Does `c` belong to class letter `cl` (%a, %D, ...)? A letter that names
 * no class (or a non-letter) stands for itself. */
static int in_class(int c, int cl)
{
    int r;
    switch (tolower(cl)) {
    case 'a': r = isalpha(c); break;
    case 'c': r = iscntrl(c); break;
    case 'd': r = isdigit(c); break;
    case 'g': r = isgraph(c); break;
    case 'l': r = islower(c); break;
    case 'p': r = ispunct(c); break;
    case 's': r = isspace(c); break;
    case 'u': r = isupper(c); break;
    case 'w': r = isalnum(c); break;
    case 'x': r = isxdigit(c); break;
    case 'z': r = c == 0; break; /* deprecated in Lua 5.2, still there */
    default: return cl == c;
    }
    if (isupper(cl))
        r = !r;
    return r != 0;
}

/* The end of the single-character class starting at `p`: after ".", "x",
 * "%x" or "[...]". Raises on a malformed pattern. */
static const char *item_end(struct matcher *m, const char *p)
{
    char c = *p++;
    if (c == '%') {
        if (p >= m->pat_end)
            luaL_error(m->L, "malformed pattern (ends with '%%')");
        return p + 1;
    }
    if (c != '[')
        return p;
    if (p < m->pat_end && *p == '^')
        p++;
    /* the first character of a set is a member even when it is ']' */
    for (;;) {
        if (p >= m->pat_end)
            luaL_error(m->L, "malformed pattern (missing ']')");
        char d = *p++;
        if (d == '%' && p < m->pat_end)
            p++;
        if (p < m->pat_end && *p == ']')
            return p + 1;
    }
}

/* Is `c` in the set [..] that spans set[0] ('[') to close (its ']')? */
static int in_set(int c, const char *set, const char *close)
{
    const char *q = set + 1;
    int neg = 0;

    if (*q == '^') {
        neg = 1;
        q++;
    }
    for (; q < close; q++) {
        if (*q == '%') {
            q++;
            if (in_class(c, (unsigned char)*q))
                return !neg;
        } else if (q + 2 < close && q[1] == '-') {
            if ((unsigned char)q[0] <= c && c <= (unsigned char)q[2])
                return !neg;
            q += 2;
        } else if ((unsigned char)*q == c) {
            return !neg;
        }
    }
    return neg;
}

/* Does the subject character at `s` match the class [p, ep)? A set costs a
 * step per 16 bytes of its text on top of the step of the attempt. */
static int one(struct matcher *m, const char *s, const char *p, const char *ep)
{
    if (s >= m->src_end)
        return 0;
    int c = (unsigned char)*s;
    switch (*p) {
    case '.':
        return 1;
    case '%':
        return in_class(c, (unsigned char)p[1]);
    case '[':
        step(m, (unsigned)((ep - p) >> 4));
        return in_set(c, p, ep - 1);
    default:
        return (unsigned char)*p == c;
    }
}

/* ---- the matcher ---------------------------------------------------------- */

static const char *match(struct matcher *m, const char *s, const char *p);

/* "x*" and "x+" (after its first character): the longest run first, then
 * shorter ones. */
static const char *greedy(struct matcher *m, const char *s, const char *p, const char *ep)
{
    ptrdiff_t n = 0;
    while (one(m, s + n, p, ep)) {
        n++;
        step(m, 1);
    }
    for (; n >= 0; n--) {
        const char *r = match(m, s + n, ep + 1);
        if (r)
            return r;
    }
    return NULL;
}

/* "x-": the shortest run first. */
static const char *lazy(struct matcher *m, const char *s, const char *p, const char *ep)
{
    for (;;) {
        const char *r = match(m, s, ep + 1);
        if (r)
            return r;
        if (!one(m, s, p, ep))
            return NULL;
        s++;
        step(m, 1);
    }
}

static const char *open_capture(struct matcher *m, const char *s, const char *p,
                                ptrdiff_t what)
{
    if (m->ncap >= MAX_CAPTURES)
        luaL_error(m->L, "too many captures");
    m->cap[m->ncap].start = s;
    m->cap[m->ncap].len = what;
    m->ncap++;
    const char *r = match(m, s, p);
    if (!r)
        m->ncap--;
    return r;
}

static const char *close_capture(struct matcher *m, const char *s, const char *p)
{
    int l = m->ncap - 1;
    while (l >= 0 && m->cap[l].len != CAP_OPEN)
        l--;
    if (l < 0)
        luaL_error(m->L, "invalid pattern capture");
    m->cap[l].len = s - m->cap[l].start;
    const char *r = match(m, s, p);
    if (!r)
        m->cap[l].len = CAP_OPEN;
    return r;
}

/* %bxy at `s`; `p` points at x. */
static const char *balance(struct matcher *m, const char *s, const char *p)
{
    if (p + 1 >= m->pat_end)
        luaL_error(m->L, "malformed pattern (missing arguments to '%%b')");
    if (s >= m->src_end || *s != p[0])
        return NULL;
    char open = p[0], close = p[1];
    int depth = 1;
    while (++s < m->src_end) {
        step(m, 1);
        if (*s == close) {
            if (--depth == 0)
                return s + 1;
        } else if (*s == open) {
            depth++;
        }
    }
    return NULL;
}

/* %1-%9 at `s`: the text of that (closed) capture again. */
static const char *backref(struct matcher *m, const char *s, int digit)
{
    int l = digit - '1';
    if (l < 0 || l >= m->ncap || m->cap[l].len == CAP_OPEN)
        luaL_error(m->L, "invalid capture index %%%d", l + 1);
    ptrdiff_t len = m->cap[l].len;
    if (len < 0) /* a position capture matches no text */
        return NULL;
    step(m, (unsigned)(len / 64));
    if (m->src_end - s >= len && memcmp(m->cap[l].start, s, (size_t)len) == 0)
        return s + len;
    return NULL;
}

/* Matches the pattern from `p` against the subject from `s`. Returns the
 * end of the match, or NULL. */
static const char *match(struct matcher *m, const char *s, const char *p)
{
    if (m->depth-- == 0)
        luaL_error(m->L, "pattern too complex");
    while (p < m->pat_end) {
        step(m, 1);
        const char *ep;
        switch (*p) {
        case '(':
            if (p + 1 < m->pat_end && p[1] == ')')
                s = open_capture(m, s, p + 2, CAP_POS);
            else
                s = open_capture(m, s, p + 1, CAP_OPEN);
            goto done;
        case ')':
            s = close_capture(m, s, p + 1);
            goto done;
        case '$':
            if (p + 1 == m->pat_end) {
                if (s != m->src_end)
                    s = NULL;
                goto done;
            }
            break;
        case '%':
            if (p + 1 >= m->pat_end)
                break; /* item_end raises */
            if (p[1] == 'b') {
                s = balance(m, s, p + 2);
                if (!s)
                    goto done;
                p += 4;
                continue;
            }
            if (p[1] == 'f') {
                p += 2;
                if (p >= m->pat_end || *p != '[')
                    luaL_error(m->L, "missing '[' after '%%f' in pattern");
                ep = item_end(m, p);
                int prev = s == m->src ? 0 : (unsigned char)s[-1];
                int cur = s < m->src_end ? (unsigned char)*s : 0;
                step(m, (unsigned)((ep - p) >> 4));
                if (in_set(prev, p, ep - 1) || !in_set(cur, p, ep - 1)) {
                    s = NULL;
                    goto done;
                }
                p = ep;
                continue;
            }
            if (isdigit((unsigned char)p[1])) {
                s = backref(m, s, (unsigned char)p[1]);
                if (!s)
                    goto done;
                p += 2;
                continue;
            }
            break;
        default:
            break;
        }
        /* a single-character class, maybe repeated */
        ep = item_end(m, p);
        int here = one(m, s, p, ep);
        char rep = ep < m->pat_end ? *ep : '\0';
        if (!here && (rep == '*' || rep == '?' || rep == '-')) {
            p = ep + 1; /* zero repetitions: no backtracking point */
            continue;
        }
        if (rep == '?') {
            const char *r = match(m, s + 1, ep + 1);
            if (r) {
                s = r;
                goto done;
            }
            p = ep + 1;
            continue;
        }
        if (rep == '+') {
            s = here ? greedy(m, s + 1, p, ep) : NULL;
            goto done;
        }
        if (rep == '*') {
            s = greedy(m, s, p, ep);
            goto done;
        }
        if (rep == '-') {
            s = lazy(m, s, p, ep);
            goto done;
        }
        if (!here) {
            s = NULL;
            goto done;
        }
        s++;
        p = ep;
    }
done:
    m->depth++;
    return s;
}

/* ---- results ---------------------------------------------------------------- */

/* Pushes capture `i`, or the whole match [s, e) when there are no captures
 * and i is 0. */
static void push_capture(struct matcher *m, int i, const char *s, const char *e)
{
    if (i >= m->ncap) {
        if (i != 0)
            luaL_error(m->L, "invalid capture index %%%d", i + 1);
        lua_pushlstring(m->L, s, (size_t)(e - s));
        return;
    }
    ptrdiff_t len = m->cap[i].len;
    if (len == CAP_OPEN)
        luaL_error(m->L, "unfinished capture");
    if (len == CAP_POS)
        lua_pushinteger(m->L, (lua_Integer)(m->cap[i].start - m->src) + 1);
    else
        lua_pushlstring(m->L, m->cap[i].start, (size_t)len);
}

/* Pushes every capture (the whole match when there is none and `s` is
 * given); returns how many. */
static int push_captures(struct matcher *m, const char *s, const char *e)
{
    int n = (m->ncap == 0 && s) ? 1 : m->ncap;
    luaL_checkstack(m->L, n, "too many captures");
    for (int i = 0; i < n; i++)
        push_capture(m, i, s, e);
    return n;
}

/* ---- the library functions ---------------------------------------------------- */

/* A relative start position (1-based, negative from the end) as an offset
 * from the start of a subject of `len` bytes; may be len + 1 or more. */
static size_t start_offset(lua_Integer pos, size_t len)
{
    if (pos > 0)
        return (size_t)pos - 1;
    lua_Unsigned back = 0u - (lua_Unsigned)pos; /* -pos, also for mininteger */
    if (pos == 0 || back > len)
        return 0;
    return len - (size_t)back;
}

static int has_specials(const char *p, size_t lp)
{
    for (const char *s = SPECIALS; *s; s++)
        if (memchr(p, *s, lp))
            return 1;
    return 0;
}

static int find_or_match(lua_State *L, int find)
{
    size_t ls, lp;
    const char *s = luaL_checklstring(L, 1, &ls);
    const char *pat = luaL_checklstring(L, 2, &lp);
    size_t init = start_offset(luaL_optinteger(L, 3, 1), ls);
    struct hub_policy *p = hub_lua_policy(L);

    if (init > ls) {
        luaL_pushfail(L);
        return 1;
    }
    hub_sandbox_charge(p, L, (int64_t)(lp / 8)); /* has_specials: 10 scans */
    if (find && (lua_toboolean(L, 4) || !has_specials(pat, lp))) {
        /* glibc's memmem is linear (two-way): charged as a scan */
        hub_sandbox_charge(p, L, (int64_t)((ls - init + lp) / HUB_COST_COPY) + 1);
        const char *hit = lp == 0 ? s + init : memmem(s + init, ls - init, pat, lp);
        if (!hit) {
            luaL_pushfail(L);
            return 1;
        }
        lua_pushinteger(L, (lua_Integer)(hit - s) + 1);
        lua_pushinteger(L, (lua_Integer)(hit - s) + (lua_Integer)lp);
        return 2;
    }
    struct matcher m;
    int anchored = lp > 0 && pat[0] == '^';
    if (anchored) {
        pat++;
        lp--;
    }
    begin(&m, L, s, ls, pat, lp);
    for (const char *from = s + init;; from++) {
        reset(&m);
        step(&m, 1);
        const char *e = match(&m, from, pat);
        if (e) {
            flush_steps(&m);
            if (!find)
                return push_captures(&m, from, e);
            lua_pushinteger(L, (lua_Integer)(from - s) + 1);
            lua_pushinteger(L, (lua_Integer)(e - s));
            return push_captures(&m, NULL, NULL) + 2;
        }
        if (anchored || from >= m.src_end)
            break;
    }
    flush_steps(&m);
    luaL_pushfail(L);
    return 1;
}

static int l_find(lua_State *L)
{
    return find_or_match(L, 1);
}

static int l_match(lua_State *L)
{
    return find_or_match(L, 0);
}

/* gmatch's iterator state; upvalues 1 and 2 are the subject and the
 * pattern. */
struct gmatch_state {
    size_t pos;             /* where the next search starts */
    size_t last;            /* end of the last match, or SIZE_MAX */
};

static int gmatch_next(lua_State *L)
{
    size_t ls, lp;
    const char *s = lua_tolstring(L, lua_upvalueindex(1), &ls);
    const char *pat = lua_tolstring(L, lua_upvalueindex(2), &lp);
    struct gmatch_state *g = lua_touserdata(L, lua_upvalueindex(3));
    struct matcher m;

    begin(&m, L, s, ls, pat, lp);
    for (size_t from = g->pos; from <= ls; from++) {
        reset(&m);
        step(&m, 1);
        const char *e = match(&m, s + from, pat);
        if (e && (size_t)(e - s) != g->last) {
            g->pos = g->last = (size_t)(e - s);
            flush_steps(&m);
            return push_captures(&m, s + from, e);
        }
    }
    g->pos = ls + 1;
    flush_steps(&m);
    return 0;
}

/* string.gmatch(s, pattern [, init]); '^' is not an anchor here (Lua 5.4). */
static int l_gmatch(lua_State *L)
{
    size_t ls;
    luaL_checklstring(L, 1, &ls);
    luaL_checkstring(L, 2);
    size_t init = start_offset(luaL_optinteger(L, 3, 1), ls);
    lua_settop(L, 2);
    struct gmatch_state *g = lua_newuserdatauv(L, sizeof(*g), 0);
    g->pos = init > ls ? ls + 1 : init;
    g->last = SIZE_MAX;
    lua_pushcclosure(L, gmatch_next, 3);
    return 1;
}

/* Appends the replacement string (argument 3) for the match [s, e), with
 * %0-%9 and %% expanded. */
static void add_string(struct matcher *m, luaL_Buffer *b, const char *s, const char *e)
{
    lua_State *L = m->L;
    size_t l;
    const char *r = lua_tolstring(L, 3, &l), *end = r + l, *q;

    step(m, (unsigned)(l / HUB_COST_COPY));
    while ((q = memchr(r, '%', (size_t)(end - r))) != NULL) {
        step(m, 1); /* an escape: a capture pushed or copied */
        luaL_addlstring(b, r, (size_t)(q - r));
        q++;
        if (q < end && *q == '%') {
            luaL_addchar(b, '%');
        } else if (q < end && *q == '0') {
            luaL_addlstring(b, s, (size_t)(e - s));
        } else if (q < end && isdigit((unsigned char)*q)) {
            push_capture(m, *q - '1', s, e);
            luaL_tolstring(L, -1, NULL);
            lua_remove(L, -2);
            luaL_addvalue(b);
        } else {
            luaL_error(L, "invalid use of '%c' in replacement string", '%');
        }
        r = q + 1;
    }
    luaL_addlstring(b, r, (size_t)(end - r));
}

/* Appends the replacement of the match [s, e); returns 0 when it kept the
 * match (a function or table gave false or nil), else 1. */
static int add_value(struct matcher *m, luaL_Buffer *b, const char *s, const char *e,
                     int tr)
{
    lua_State *L = m->L;

    if (tr == LUA_TFUNCTION) {
        lua_pushvalue(L, 3);
        int n = push_captures(m, s, e);
        lua_call(L, n, 1);
    } else if (tr == LUA_TTABLE) {
        push_capture(m, 0, s, e);
        lua_gettable(L, 3);
    } else {
        add_string(m, b, s, e);
        return 1;
    }
    if (!lua_toboolean(L, -1)) {
        lua_pop(L, 1);
        luaL_addlstring(b, s, (size_t)(e - s));
        return 0;
    }
    if (!lua_isstring(L, -1))
        return luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
    luaL_addvalue(b);
    return 1;
}

static int l_gsub(lua_State *L)
{
    size_t ls, lp;
    const char *src = luaL_checklstring(L, 1, &ls);
    const char *pat = luaL_checklstring(L, 2, &lp);
    int tr = lua_type(L, 3);
    lua_Integer max = luaL_optinteger(L, 4, (lua_Integer)ls + 1), n = 0;
    const char *s = src, *last = NULL;
    int anchored = lp > 0 && pat[0] == '^', changed = 0;
    struct matcher m;
    luaL_Buffer b;

    luaL_argexpected(L, tr == LUA_TNUMBER || tr == LUA_TSTRING || tr == LUA_TFUNCTION ||
                     tr == LUA_TTABLE, 3, "string/function/table");
    luaL_buffinit(L, &b);
    if (anchored) {
        pat++;
        lp--;
    }
    begin(&m, L, src, ls, pat, lp);
    while (n < max) {
        reset(&m);
        step(&m, 1);
        const char *e = match(&m, s, pat);
        if (e && e != last) {
            n++;
            changed |= add_value(&m, &b, s, e, tr);
            s = last = e;
        } else if (s < m.src_end) {
            luaL_addchar(&b, *s++);
        } else {
            break;
        }
        if (anchored)
            break;
    }
    flush_steps(&m);
    if (!changed) {
        lua_pushvalue(L, 1);
    } else {
        luaL_addlstring(&b, s, (size_t)(m.src_end - s));
        luaL_pushresult(&b);
    }
    lua_pushinteger(L, n);
    return 2;
}

void hub_lua_pattern_open(lua_State *L, int strlib)
{
    static const luaL_Reg fns[] = {
        {"find", l_find},
        {"match", l_match},
        {"gmatch", l_gmatch},
        {"gsub", l_gsub},
        {NULL, NULL},
    };
    strlib = lua_absindex(L, strlib);
    for (const luaL_Reg *f = fns; f->name; f++) {
        lua_pushcfunction(L, f->func);
        lua_setfield(L, strlib, f->name);
    }
}
