/* The conf's `channels` key: options per channel-name pattern.
 *
 *   channels = {
 *     ["room:*"] = { history_size = 100, history_ttl = 600, presence = true },
 *     ["lobby"]  = { presence = true, join_leave = true },
 *   }
 *
 * A pattern is a channel name, or a prefix followed by one '*' (a lone "*"
 * matches every channel). A channel takes the options of the exact pattern
 * of its name, else of the longest prefix pattern it starts with, else none
 * (no history, no presence: today's behaviour).
 *
 * The value is checked through the Lua API like every other key. A Lua table
 * constructor keeps only the last of two equal keys and has no line per
 * field, so the source text of the assignment is scanned too (a small Lua
 * lexer: comments, all string forms, brackets): it finds the line of each
 * pattern and option for the messages, and patterns written twice. */
#include "config_impl.h"
#include "luahub/proto.h"

#include <lauxlib.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PATTERNS 1000
#define PATTERN_MAX 255                 /* bytes, like a channel name */

/* ---- the source scan --------------------------------------------------- */

enum tok { T_EOF, T_NAME, T_STRING, T_OTHER, T_EQ, T_SEP, T_DOT, T_LBRACE, T_RBRACE,
           T_LBRACKET, T_RBRACKET, T_OPEN, T_CLOSE };

struct lexer {
    const char *p, *end;
    int line;
    enum tok t;
    int tline;                          /* line of the current token */
    struct hub_buf s;                   /* T_NAME, T_STRING: its text (decoded) */
    bool bad;                           /* a string we could not decode */
};

/* Lua counts "\n", "\r", "\r\n" and "\n\r" as one line break. */
static void newline(struct lexer *x)
{
    char c = *x->p++;
    if (x->p < x->end && (*x->p == '\n' || *x->p == '\r') && *x->p != c)
        x->p++;
    x->line++;
}

/* At "[" followed by "=*[": the level (number of '='), else -1. */
static int long_bracket(const struct lexer *x)
{
    const char *q = x->p + 1;
    int level = 0;
    while (q < x->end && *q == '=')
        q++, level++;
    return q < x->end && *q == '[' ? level : -1;
}

/* Skips a long string or comment "[==[ ... ]==]" starting at x->p. */
static void skip_long(struct lexer *x, int level, struct hub_buf *out)
{
    x->p += level + 2;
    if (x->p < x->end && (*x->p == '\n' || *x->p == '\r'))
        newline(x);                     /* the first line break is not content */
    while (x->p < x->end) {
        if (*x->p == ']') {
            const char *q = x->p + 1;
            int l = 0;
            while (q < x->end && *q == '=')
                q++, l++;
            if (l == level && q < x->end && *q == ']') {
                x->p = q + 1;
                return;
            }
        }
        if (*x->p == '\n' || *x->p == '\r') {
            newline(x);
            if (out)
                hub_buf_appends(out, "\n");
            continue;
        }
        if (out)
            hub_buf_append(out, x->p, 1);
        x->p++;
    }
}

static bool is_alpha(char c)
{
    return c == '_' || ((c | 32) >= 'a' && (c | 32) <= 'z');
}

static bool is_alnum(char c)
{
    return is_alpha(c) || (c >= '0' && c <= '9');
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* A quoted string, decoded into x->s the way Lua does. */
static void quoted(struct lexer *x)
{
    char q = *x->p++;
    while (x->p < x->end && *x->p != q) {
        char c = *x->p;
        if (c == '\n' || c == '\r') {
            x->bad = true;              /* unfinished string: Lua reports it */
            return;
        }
        if (c != '\\') {
            hub_buf_append(&x->s, x->p++, 1);
            continue;
        }
        if (++x->p >= x->end)
            break;
        c = *x->p;
        const char *simple = strchr("abfnrtv\\\"'", c);
        if (simple && c) {
            static const char out[] = "\a\b\f\n\r\t\v\\\"'";
            hub_buf_append(&x->s, &out[simple - "abfnrtv\\\"'"], 1);
            x->p++;
        } else if (c == '\n' || c == '\r') {
            newline(x);
            hub_buf_appends(&x->s, "\n");
        } else if (c == 'z') {
            x->p++;
            while (x->p < x->end && (*x->p == ' ' || *x->p == '\t' || *x->p == '\n' ||
                                     *x->p == '\r' || *x->p == '\f' || *x->p == '\v')) {
                if (*x->p == '\n' || *x->p == '\r')
                    newline(x);
                else
                    x->p++;
            }
        } else if (c == 'x' && x->end - x->p >= 3 && hexval(x->p[1]) >= 0 &&
                   hexval(x->p[2]) >= 0) {
            char b = (char)(hexval(x->p[1]) * 16 + hexval(x->p[2]));
            hub_buf_append(&x->s, &b, 1);
            x->p += 3;
        } else if (c >= '0' && c <= '9') {
            int v = 0, i = 0;
            while (i < 3 && x->p < x->end && *x->p >= '0' && *x->p <= '9')
                v = v * 10 + (*x->p++ - '0'), i++;
            if (v > 255)
                x->bad = true;
            char b = (char)v;
            hub_buf_append(&x->s, &b, 1);
        } else if (c == 'u' && x->end - x->p >= 2 && x->p[1] == '{') {
            unsigned long cp = 0;
            x->p += 2;
            while (x->p < x->end && hexval(*x->p) >= 0 && cp <= 0x7FFFFFFFul)
                cp = cp * 16 + (unsigned)hexval(*x->p++);
            if (x->p >= x->end || *x->p != '}' || cp > 0x7FFFFFFFul) {
                x->bad = true;
                return;
            }
            x->p++;
            char u[8];
            int n;                      /* Lua's extended UTF-8, up to 6 bytes */
            if (cp < 0x80) {
                u[0] = (char)cp, n = 1;
            } else {
                unsigned mfb = 0x3f;
                n = 0;
                char tmp[8];
                do {
                    tmp[7 - n++] = (char)(0x80 | (cp & 0x3f));
                    cp >>= 6;
                    mfb >>= 1;
                } while (cp > mfb);
                tmp[7 - n] = (char)((~mfb << 1) | cp);
                n++;
                memcpy(u, tmp + 8 - n, (size_t)n);
            }
            hub_buf_append(&x->s, u, (size_t)n);
        } else {
            x->bad = true;              /* Lua refuses it: its error is reported */
            x->p++;
        }
    }
    if (x->p < x->end)
        x->p++;
}

/* Reads the next token into x->t (and x->s, x->tline). */
static void next(struct lexer *x)
{
    hub_buf_reset(&x->s);
    for (;;) {
        if (x->p >= x->end) {
            x->t = T_EOF;
            return;
        }
        char c = *x->p;
        if (c == '\n' || c == '\r') {
            newline(x);
        } else if (c == ' ' || c == '\t' || c == '\f' || c == '\v') {
            x->p++;
        } else if (c == '-' && x->end - x->p >= 2 && x->p[1] == '-') {
            x->p += 2;
            int level = x->p < x->end && *x->p == '[' ? long_bracket(x) : -1;
            if (level >= 0) {
                skip_long(x, level, NULL);
            } else {
                while (x->p < x->end && *x->p != '\n' && *x->p != '\r')
                    x->p++;
            }
        } else {
            break;
        }
    }
    char c = *x->p;
    x->tline = x->line;
    if (is_alpha(c)) {
        const char *b = x->p;
        while (x->p < x->end && is_alnum(*x->p))
            x->p++;
        hub_buf_append(&x->s, b, (size_t)(x->p - b));
        x->t = T_NAME;
    } else if (c >= '0' && c <= '9') {
        while (x->p < x->end && (*x->p == '.' || is_alnum(*x->p))) {
            char e = (char)(*x->p | 32);
            x->p++;
            if ((e == 'e' || e == 'p') && x->p < x->end && (*x->p == '+' || *x->p == '-'))
                x->p++;
        }
        x->t = T_OTHER;
    } else if (c == '"' || c == '\'') {
        quoted(x);
        x->t = T_STRING;
    } else if (c == '[' && long_bracket(x) >= 0) {
        skip_long(x, long_bracket(x), &x->s);
        x->t = T_STRING;
    } else {
        x->p++;
        switch (c) {
        case '=':
            if (x->p < x->end && *x->p == '=') {
                x->p++;
                x->t = T_OTHER;
            } else {
                x->t = T_EQ;
            }
            break;
        case ',':
        case ';': x->t = T_SEP; break;
        case '.':
        case ':': x->t = T_DOT; break;
        case '{': x->t = T_LBRACE; break;
        case '}': x->t = T_RBRACE; break;
        case '[': x->t = T_LBRACKET; break;
        case ']': x->t = T_RBRACKET; break;
        case '(': x->t = T_OPEN; break;
        case ')': x->t = T_CLOSE; break;
        default: x->t = T_OTHER; break;
        }
    }
}

static bool opens(enum tok t)
{
    return t == T_LBRACE || t == T_LBRACKET || t == T_OPEN;
}

static bool closes(enum tok t)
{
    return t == T_RBRACE || t == T_RBRACKET || t == T_CLOSE;
}

/* What the scan found in the constructor of the `channels` assignment. */
struct seen {
    char *key;                          /* pattern or option name; NULL: undecodable */
    size_t klen;
    int line;
    int parent;                         /* options: index of their pattern; patterns: -1 */
};

struct scan {
    struct seen *v;
    size_t n, cap;
    int line;                           /* of the `channels` name; 0: not found */
};

static void seen_add(struct scan *sc, const struct hub_buf *key, bool bad, int line, int parent)
{
    if (sc->n == sc->cap) {
        sc->cap = sc->cap ? sc->cap * 2 : 16;
        sc->v = hub_xrealloc(sc->v, sc->cap * sizeof(*sc->v));
    }
    struct seen *e = &sc->v[sc->n++];
    e->key = bad ? NULL : hub_xstrndup(key->p ? key->p : "", key->len);
    e->klen = key->len;
    e->line = line;
    e->parent = parent;
}

static void scan_free(struct scan *sc)
{
    for (size_t i = 0; i < sc->n; i++)
        free(sc->v[i].key);
    free(sc->v);
}

/* A key of a table constructor at the lexer: `[ "str" ] =` or `name =`.
 * Returns 1 with the key read (the lexer after the '='), 0 if the field is
 * not one (the lexer where it stopped). */
static int field_key(struct lexer *x, struct hub_buf *key, bool *bad, int *line)
{
    *line = x->tline;
    *bad = false;
    if (x->t == T_NAME) {
        hub_buf_reset(key);
        hub_buf_append(key, x->s.p, x->s.len);
        next(x);
        if (x->t != T_EQ)
            return 0;
        next(x);
        return 1;
    }
    if (x->t != T_LBRACKET)
        return 0;
    next(x);
    if (x->t != T_STRING)
        return 0;
    hub_buf_reset(key);
    hub_buf_append(key, x->s.p ? x->s.p : "", x->s.len);
    *bad = x->bad;
    x->bad = false;
    next(x);
    if (x->t != T_RBRACKET)
        return 0;
    next(x);
    if (x->t != T_EQ)
        return 0;
    next(x);
    return 1;
}

/* Skips one value: up to the ',' / ';' / closing bracket at its own depth. */
static void skip_value(struct lexer *x)
{
    int depth = 0;
    while (x->t != T_EOF) {
        if (opens(x->t)) {
            depth++;
        } else if (closes(x->t)) {
            if (depth == 0)
                return;
            depth--;
        } else if (depth == 0 && x->t == T_SEP) {
            return;
        }
        next(x);
    }
}

/* The fields of a constructor, lexer at its '{'; records `name =` and
 * `["s"] =` keys with their lines; with `parent` < 0 the values' own
 * fields are recorded as options of each key. */
static void scan_table(struct lexer *x, struct scan *sc, int parent)
{
    struct hub_buf key = {0};
    next(x);                            /* past '{' */
    while (x->t != T_EOF && x->t != T_RBRACE) {
        bool bad;
        int line;
        if (field_key(x, &key, &bad, &line)) {
            seen_add(sc, &key, bad, line, parent);
            if (parent < 0 && x->t == T_LBRACE) {
                scan_table(x, sc, (int)sc->n - 1);
                if (x->t == T_RBRACE)
                    next(x);
                continue;
            }
        }
        if (x->t == T_SEP) {
            next(x);
            continue;
        }
        skip_value(x);
        if (x->t == T_SEP || (closes(x->t) && x->t != T_RBRACE))
            next(x);                    /* the separator; or unbalanced: Lua reports it */
    }
    hub_buf_free(&key);
}

/* Finds `channels = {` outside any bracket and scans its constructor. */
static void scan_source(const char *src, size_t n, struct scan *sc)
{
    struct lexer x = {.p = src, .end = src + n, .line = 1};
    int depth = 0;
    bool after_dot = false;

    next(&x);
    while (x.t != T_EOF) {
        if (depth == 0 && x.t == T_NAME && !after_dot && !strcmp(x.s.p, "channels")) {
            sc->line = x.tline;
            next(&x);
            if (x.t == T_EQ) {
                next(&x);
                if (x.t == T_LBRACE) {
                    scan_table(&x, sc, -1);
                    break;              /* a second assignment is an error already */
                }
            }
            continue;
        }
        if (opens(x.t))
            depth++;
        else if (closes(x.t) && depth > 0)
            depth--;
        after_dot = x.t == T_DOT;
        next(&x);
    }
    hub_buf_free(&x.s);
}

/* ---- checks ------------------------------------------------------------ */

struct problem {
    int line;
    char *msg;
};

struct ctx {
    struct hub_config *c;
    struct scan sc;
    int line;                           /* the assignment's */
    struct problem *v;                  /* reported in line order at the end */
    size_t errors;
};

static void report(struct ctx *cx, int line, const char *pattern, size_t plen,
                   const char *fmt, const char *detail)
{
    struct hub_buf m = {0};
    hub_buf_appends(&m, "channels");
    if (pattern) {
        hub_buf_appends(&m, "[");
        hub_conf_append_q(&m, pattern, plen, '"');
        hub_buf_appends(&m, "]");
    }
    hub_buf_appends(&m, ": ");
    hub_buf_printf(&m, fmt, detail ? detail : "");
    cx->v = hub_xrealloc(cx->v, (cx->errors + 1) * sizeof(*cx->v));
    cx->v[cx->errors++] = (struct problem){line ? line : cx->line, m.p};
}

static int by_line(const void *a, const void *b)
{
    const struct problem *x = a, *y = b;
    return (x->line > y->line) - (x->line < y->line);
}

/* The scanned line of pattern `p` (or of its option `opt`), else 0. */
static int line_of(const struct ctx *cx, const char *p, size_t plen, const char *opt)
{
    for (size_t i = 0; i < cx->sc.n; i++) {
        const struct seen *e = &cx->sc.v[i];
        if (e->parent >= 0 || !e->key || e->klen != plen || memcmp(e->key, p, plen))
            continue;
        if (!opt)
            return e->line;
        for (size_t j = i + 1; j < cx->sc.n && cx->sc.v[j].parent == (int)i; j++)
            if (cx->sc.v[j].key && !strcmp(cx->sc.v[j].key, opt))
                return cx->sc.v[j].line;
        return e->line;
    }
    return 0;
}

/* Why `p` is not a pattern, or NULL. */
static const char *pattern_problem(const char *p, size_t n)
{
    if (n == 0)
        return "an empty pattern matches no channel";
    if (n > PATTERN_MAX)
        return "longer than 255 bytes";
    const char *star = memchr(p, '*', n);
    if (star && star != p + n - 1)
        return "'*' may only end a pattern (\"room:*\")";
    if (star == p)
        return NULL;                    /* "*": every channel */
    if (!hub_proto_channel_valid(p, star ? n - 1 : n))
        return "a channel name has only the characters A-Z a-z 0-9 _ : . @ / = # -";
    return NULL;
}

/* An integer option in [min, max]. Returns 0, or reports and returns -1. */
static int opt_int(struct ctx *cx, lua_State *L, const char *p, size_t plen, const char *opt,
                   int64_t min, int64_t max, uint32_t *out)
{
    int line = line_of(cx, p, plen, opt);
    char detail[160];
    if (lua_type(L, -1) == LUA_TNUMBER) {
        int ok;
        lua_Integer v = lua_tointegerx(L, -1, &ok);
        if (!ok) {
            lua_Number d = lua_tonumber(L, -1);
            if (isinf(d) || (!isnan(d) && d == floor(d)))
                v = d < 0 ? INT64_MIN : INT64_MAX, ok = 1; /* beyond int64: out of range */
        }
        if (ok && v >= min && v <= max) {
            *out = (uint32_t)v;
            return 0;
        }
        if (ok) {
            if (lua_isinteger(L, -1))
                snprintf(detail, sizeof(detail), "%s: %lld is out of range (%lld..%lld)", opt,
                         (long long)v, (long long)min, (long long)max);
            else
                snprintf(detail, sizeof(detail), "%s: %.14g is out of range (%lld..%lld)", opt,
                         (double)lua_tonumber(L, -1), (long long)min, (long long)max);
            report(cx, line, p, plen, "%s", detail);
            return -1;
        }
        snprintf(detail, sizeof(detail), "%s: expected an integer, got %.14g", opt,
                 (double)lua_tonumber(L, -1));
    } else {
        snprintf(detail, sizeof(detail), "%s: expected an integer, got %s", opt,
                 luaL_typename(L, -1));
    }
    report(cx, line, p, plen, "%s", detail);
    return -1;
}

static int opt_bool(struct ctx *cx, lua_State *L, const char *p, size_t plen, const char *opt,
                    bool *out)
{
    if (lua_type(L, -1) == LUA_TBOOLEAN) {
        *out = lua_toboolean(L, -1);
        return 0;
    }
    char detail[96];
    snprintf(detail, sizeof(detail), "%s: expected true or false, got %s", opt,
             luaL_typename(L, -1));
    report(cx, line_of(cx, p, plen, opt), p, plen, "%s", detail);
    return -1;
}

static const char *const options[] = {"history_size", "history_ttl", "presence", "join_leave"};

/* The options table of pattern `p` at the top of the stack. */
static int check_options(struct ctx *cx, lua_State *L, const char *p, size_t plen,
                         struct hub_channel_opts *o)
{
    int bad = 0;
    bool ttl_set = false;
    if (lua_type(L, -1) != LUA_TTABLE) {
        report(cx, line_of(cx, p, plen, NULL), p, plen,
               "expected a table of options, got %s", luaL_typename(L, -1));
        return -1;
    }
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        size_t i = 0;
        while (name && i < hub_countof(options) && strcmp(name, options[i]))
            i++;
        if (!name || i == hub_countof(options)) {
            struct hub_buf d = {0};
            hub_buf_appends(&d, "unknown option ");
            const char *near = name ? hub_conf_near(name, options, hub_countof(options),
                                                    sizeof(options[0])) : NULL;
            if (name)
                hub_conf_append_q(&d, name, lua_rawlen(L, -2), '\'');
            else
                hub_buf_printf(&d, "(a %s key)", luaL_typename(L, -2));
            if (near)
                hub_buf_printf(&d, " (did you mean '%s'?)", near);
            else
                hub_buf_appends(&d, ": the options are history_size, history_ttl, presence, "
                                    "join_leave");
            report(cx, line_of(cx, p, plen, name), p, plen, "%s", d.p);
            hub_buf_free(&d);
            bad = -1;
        } else if (i == 0) {
            bad |= opt_int(cx, L, p, plen, name, 1, 100000, &o->history_size);
        } else if (i == 1) {
            bad |= opt_int(cx, L, p, plen, name, 1, 30 * 86400, &o->history_ttl);
            ttl_set = true;
        } else if (i == 2) {
            bad |= opt_bool(cx, L, p, plen, name, &o->presence);
        } else {
            bad |= opt_bool(cx, L, p, plen, name, &o->join_leave);
        }
        lua_pop(L, 1);
    }
    if (bad)
        return -1;
    if (ttl_set && !o->history_size) {
        report(cx, line_of(cx, p, plen, "history_ttl"), p, plen,
               "history_ttl needs history_size (how many messages to keep)%s", NULL);
        return -1;
    }
    if (o->join_leave && !o->presence) {
        report(cx, line_of(cx, p, plen, "join_leave"), p, plen,
               "join_leave needs presence = true%s", NULL);
        return -1;
    }
    if (o->history_size && !ttl_set)
        o->history_ttl = HUB_HISTORY_TTL_DEFAULT;
    return 0;
}

int hub_conf_channels_apply(struct hub_config *c, lua_State *L, int idx, const char *src,
                            size_t srclen, int line, hub_conf_report_fn fn, void *ud)
{
    struct ctx cx = {.c = c, .line = line};
    struct hub_channel_opts *v = NULL;
    size_t n = 0;

    idx = lua_absindex(L, idx);
    scan_source(src, srclen, &cx.sc);
    if (cx.sc.line)
        cx.line = cx.sc.line;           /* where `channels =` is written */
    if (lua_type(L, idx) != LUA_TTABLE) {
        report(&cx, 0, NULL, 0, "expected a table of pattern = { options }, got %s",
               luaL_typename(L, idx));
        goto out;
    }

    /* The same pattern twice: Lua kept the last one silently. */
    for (size_t i = 0; i < cx.sc.n; i++) {
        const struct seen *e = &cx.sc.v[i];
        if (e->parent >= 0 || !e->key)
            continue;
        for (size_t j = 0; j < i; j++) {
            const struct seen *f = &cx.sc.v[j];
            if (f->parent < 0 && f->key && f->klen == e->klen && !memcmp(f->key, e->key, e->klen)) {
                char d[64];
                snprintf(d, sizeof(d), "this pattern is already set at line %d", f->line);
                report(&cx, e->line, e->key, e->klen, "%s", d);
                break;
            }
        }
    }

    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING) {
            report(&cx, 0, NULL, 0, "patterns must be strings, got a %s key",
                   luaL_typename(L, -2));
            lua_pop(L, 1);
            continue;
        }
        size_t plen;
        const char *p = lua_tolstring(L, -2, &plen);
        const char *why = pattern_problem(p, plen);
        if (why) {
            report(&cx, line_of(&cx, p, plen, NULL), p, plen, "%s", why);
            lua_pop(L, 1);
            continue;
        }
        if (n == MAX_PATTERNS) {
            report(&cx, 0, NULL, 0, "more than 1000 patterns%s", NULL);
            lua_pop(L, 2);
            break;
        }
        struct hub_channel_opts o = {0};
        if (check_options(&cx, L, p, plen, &o) == 0) {
            o.prefix = p[plen - 1] == '*';
            o.len = plen - (size_t)o.prefix;
            o.pattern = hub_xstrndup(p, plen);
            v = hub_xrealloc(v, (n + 1) * sizeof(*v));
            v[n++] = o;
        }
        lua_pop(L, 1);
    }
out:
    scan_free(&cx.sc);
    if (cx.errors)
        qsort(cx.v, cx.errors, sizeof(*cx.v), by_line);
    for (size_t i = 0; i < cx.errors; i++) {
        fn(ud, cx.v[i].line, cx.v[i].msg);
        free(cx.v[i].msg);
    }
    free(cx.v);
    if (cx.errors) {
        for (size_t i = 0; i < n; i++)
            free(v[i].pattern);
        free(v);
        return -1;
    }
    hub_config_channels_free(c);
    c->channels = v;
    c->nchannels = n;
    return 0;
}

void hub_config_channels_free(struct hub_config *c)
{
    for (size_t i = 0; i < c->nchannels; i++)
        free(c->channels[i].pattern);
    free(c->channels);
    c->channels = NULL;
    c->nchannels = 0;
}
