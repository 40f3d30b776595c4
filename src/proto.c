/* Protocol v1 codec (see include/luahub/proto.h and docs/protocol.md).
 *
 * Decoding runs yajl's event parser once over the whole message. Callbacks
 * collect the top-level members (the order of members is free, so "op" may
 * come last) and the exact byte span of the "data" and "id" values; the rules
 * of the op are checked after the parse. Inside a callback,
 * yajl_get_bytes_consumed() is the offset just past the token that triggered
 * it, because the whole message is given to one yajl_parse() call: that is
 * what makes the spans exact. */
#include "luahub/proto.h"
#include "proto_impl.h"
#include "luahub/hash.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_parse.h>

/* Nesting allowed inside one value (arrays and objects). Common decoders of
 * our subscribers stop somewhere (serde_json at 128, lua-cjson at 1000):
 * refusing deeper data here keeps a publisher from sending frames that other
 * clients cannot parse. The message object itself adds one level. */
#define MAX_DEPTH 128
/* A string "id" is echoed verbatim in every reply: bound it. */
#define ID_STRING_MAX 128   /* bytes as written, quotes included */
#define ID_INT_MAX 20       /* characters: -9223372036854775808 */
/* What yajl 2.1 allocates in one parse: 0.5 KiB of handle and stacks, the
 * lexer's 2 KiB buffer (allocated at the end of every input) and, once a
 * string with an escape is met, a 2 KiB decode buffer. Deeper nesting or
 * longer escaped strings spill to the heap. */
#define ARENA_SIZE 5120

/* ---- error codes ---- */

static const char *const code_names[] = {
#define HUB_X(name, str) str,
    HUB_PROTO_ERRORS(HUB_X)
#undef HUB_X
};

const char *hub_proto_code_name(int code)
{
    if (code < 0 || code >= HUB_PERR__COUNT)
        return "internal";
    return code_names[code];
}


/* Writes a printable, bounded rendering of a client-supplied name (op, key)
 * for an error message: the message must stay short, valid UTF-8 and free of
 * control bytes. Non-ASCII characters and control bytes become '?'. */
#define SHOW_MAX 32
static const char *show(char *dst, const char *s, size_t n)
{
    size_t o = 0, i;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x80 && c < 0xc0)
            continue;   /* UTF-8 continuation: one '?' per character */
        if (o == SHOW_MAX)
            break;
        dst[o++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (i < n) {
        memcpy(dst + o, "...", 3);
        o += 3;
    }
    dst[o] = '\0';
    return dst;
}

/* ---- allocation arena for yajl ----
 * A parse makes a handful of small allocations that all die with the
 * handle: serve them from a buffer on the caller's stack. Blocks carry their
 * size in a 16-byte header (for realloc); freeing only reclaims the last
 * block; whatever does not fit goes to the heap. */

struct arena {
    size_t used;
    _Alignas(16) unsigned char mem[ARENA_SIZE];
};

static int in_arena(const struct arena *a, const void *p)
{
    uintptr_t u = (uintptr_t)p, b = (uintptr_t)a->mem;
    return u >= b && u < b + sizeof(a->mem);
}

static void *a_malloc(void *ctx, size_t sz)
{
    struct arena *a = ctx;
    size_t need = 16 + ((sz + 15) & ~(size_t)15);
    if (sz <= sizeof(a->mem) && need <= sizeof(a->mem) - a->used) {
        unsigned char *h = a->mem + a->used;
        memcpy(h, &sz, sizeof(sz));
        a->used += need;
        return h + 16;
    }
    return hub_xmalloc(sz);
}

static void a_free(void *ctx, void *p)
{
    struct arena *a = ctx;
    if (!in_arena(a, p)) {
        free(p);
        return;
    }
    size_t sz;
    unsigned char *h = (unsigned char *)p - 16;
    memcpy(&sz, h, sizeof(sz));
    if (h + 16 + ((sz + 15) & ~(size_t)15) == a->mem + a->used)
        a->used = (size_t)(h - a->mem);
}

static void *a_realloc(void *ctx, void *p, size_t sz)
{
    struct arena *a = ctx;
    if (!p)
        return a_malloc(ctx, sz);
    if (!in_arena(a, p))
        return hub_xrealloc(p, sz);
    size_t old;
    unsigned char *h = (unsigned char *)p - 16;
    memcpy(&old, h, sizeof(old));
    size_t off = (size_t)(h - a->mem);
    if (h + 16 + ((old + 15) & ~(size_t)15) == a->mem + a->used) {
        /* Last block: grow or shrink in place when it fits. */
        size_t need = 16 + ((sz + 15) & ~(size_t)15);
        if (sz <= sizeof(a->mem) && need <= sizeof(a->mem) - off) {
            memcpy(h, &sz, sizeof(sz));
            a->used = off + need;
            return p;
        }
    }
    void *n = a_malloc(ctx, sz);
    memcpy(n, p, old < sz ? old : sz);
    a_free(ctx, p);
    return n;
}

/* ---- the parse ---- */

enum field { F_OP, F_ID, F_CHANNEL, F_CHANNELS, F_DATA, F_METHOD, F_RECOVER, F_REWIND,
             F_LIMIT, F_SINCE, F_REVERSE, F__COUNT };
#define BIT(f) (1u << (f))

static const char *const field_names[F__COUNT] = {
    "op", "id", "channel", "channels", "data", "method", "recover", "rewind",
    "limit", "since", "reverse",
};

enum vtype { T_NONE, T_STRING, T_INT, T_NUMBER, T_BOOL, T_NULL, T_OBJECT, T_ARRAY };

static const char *const type_names[] = {
    "nothing", "a string", "a number", "a number", "a boolean", "null",
    "an object", "an array",
};

struct val {
    int type;       /* T_* */
    size_t start;   /* raw span of the value in the message */
    size_t end;
};

/* Dedup table for /api/broadcast: the names kept so far, by the offset of
 * each in req->names. */
struct dedup {
    struct dnode {
        struct hub_hnode node;
        uint32_t off;
    } n[HUB_API_MAX_CHANNELS];
    struct hub_htable t;
};

struct parse {
    yajl_handle h;
    const char *buf;
    size_t len;
    unsigned allowed;   /* BIT(F_*) of members this kind of message may have */
    int max_depth;
    int depth;          /* open arrays and objects, the message object included */
    int cur;            /* F_* of the member being read at depth 1, or -1 */

    unsigned seen;      /* first occurrence of each member */
    struct val v[F__COUNT];
    int dup;            /* first duplicated member, or -1 */
    char other[SHOW_MAX + 4];   /* first unknown key, shown */
    int have_other;

    char op[SHOW_MAX + 1];  /* start of the "op" string: enough to name it */
    size_t op_len;
    char *chan;         /* "channel" decoded: HUB_CHANNEL_MAX + 1 bytes */
    size_t chan_len;
    char *method;       /* "method" decoded: HUB_METHOD_MAX + 1 bytes */
    size_t method_len;
    int id_ok;          /* "id" is within its length limit */

    /* "recover" or "since" (an op has one of them): its members */
    struct {
        int key;        /* member being read: 0 offset, 1 epoch, -1 other */
        unsigned seen;  /* bit 0 offset, bit 1 epoch */
        int dup, other; /* a member twice; an unknown member */
        char other_name[SHOW_MAX + 4];
        int otype, etype;
        size_t ostart, oend;
        char epoch[HUB_EPOCH_MAX + 1];
        size_t elen;
    } pos;

    /* /api/broadcast */
    struct hub_api_req *req;
    struct dedup *dd;
    unsigned entries;   /* entries of "channels", duplicates included */
    unsigned kept;
    int entry_type_bad; /* an entry is not a string */
    int entry_bad;      /* entry_err holds the first invalid name */
    struct hub_proto_error entry_err;

    int stopped;        /* a callback filled *err and canceled the parse */
    struct hub_proto_error *err;
};

/* Where the value of the member whose key just ended starts: after the
 * optional whitespace, the ':' and more whitespace. If the text is not shaped
 * so, the parse fails later and the span is never used. */
static size_t value_start(const struct parse *p)
{
    size_t i = yajl_get_bytes_consumed(p->h);
    int colon = 0;
    while (i < p->len) {
        char c = p->buf[i];
        if (c == ':' && !colon)
            colon = 1;
        else if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        i++;
    }
    return i;
}

static int field_of(const unsigned char *k, size_t n)
{
    for (int f = 0; f < F__COUNT; f++)
        if (strlen(field_names[f]) == n && memcmp(field_names[f], k, n) == 0)
            return f;
    return -1;
}

/* Cancels the parse from a callback, once p->err is filled. */
static int stop(struct parse *p)
{
    p->stopped = 1;
    return 0;
}

/* One entry of "channels": validate, drop duplicates, keep. */
static void entry(struct parse *p, int type, const char *s, size_t n)
{
    unsigned idx = p->entries++;
    if (type != T_STRING) {
        p->entry_type_bad = 1;
        return;
    }
    if (p->entry_bad || p->entries > HUB_API_MAX_CHANNELS)
        return; /* fails anyway: stop collecting */
    char where[32];
    snprintf(where, sizeof(where), " in channels[%u]", idx);
    if (hub_proto_chan_check(s, n, where, &p->entry_err) < 0) {
        p->entry_bad = 1;
        return;
    }
    struct hub_buf *names = &p->req->names;
    uint64_t h = hub_hash64(s, n);
    for (struct hub_hnode *e = hub_htable_chain(&p->dd->t, h); e; e = e->next) {
        const char *q = names->p + hub_container_of(e, struct dnode, node)->off;
        if (e->hash == h && strncmp(q, s, n) == 0 && q[n] == '\0') /* q may be shorter */
            return; /* the same name again: deliver once */
    }
    struct dnode *d = &p->dd->n[p->kept++];
    d->node.hash = h;
    d->off = (uint32_t)names->len;
    hub_htable_insert(&p->dd->t, &d->node);
    hub_buf_append(names, s, n);
    hub_buf_append(names, "", 1);   /* NUL-terminated, back to back */
}

/* A scalar value, or the start of an array or object (`type`). */
static int value(struct parse *p, int type, const char *s, size_t n)
{
    if (p->depth == 0) {
        /* The first event of a command must open the message object. */
        hub_proto_fail(p->err, HUB_PERR_BAD_REQUEST, "message must be a JSON object, not %s",
             type_names[type]);
        return stop(p);
    }
    if (p->depth == 2 && p->cur == F_CHANNELS && p->v[F_CHANNELS].type == T_ARRAY) {
        entry(p, type, s, n);
        return 1;
    }
    if (p->depth == 2 && (p->cur == F_RECOVER || p->cur == F_SINCE) &&
        p->v[p->cur].type == T_OBJECT) {
        if (p->pos.key == 0) {
            p->pos.otype = type;
            p->pos.oend = yajl_get_bytes_consumed(p->h);
        } else if (p->pos.key == 1) {
            p->pos.etype = type;
            p->pos.elen = n;
            if (type == T_STRING && n <= HUB_EPOCH_MAX) {
                memcpy(p->pos.epoch, s, n);
                p->pos.epoch[n] = '\0';
            }
        }
        p->pos.key = -1;
        return 1;
    }
    if (p->depth != 1 || p->cur < 0)
        return 1;

    struct val *v = &p->v[p->cur];
    v->type = type;
    if (type == T_OBJECT || type == T_ARRAY)
        return 1;   /* ends in on_end() */
    v->end = yajl_get_bytes_consumed(p->h);
    if (type != T_STRING && !(type == T_INT && p->cur == F_ID))
        return 1;
    switch (p->cur) {
    case F_OP:
        p->op_len = n;
        memcpy(p->op, s, n < sizeof(p->op) ? n : sizeof(p->op));
        break;
    case F_ID:
        p->id_ok = type == T_STRING ? v->end - v->start <= ID_STRING_MAX
                                    : n <= ID_INT_MAX;
        break;
    case F_CHANNEL:
        p->chan_len = n;
        if (n <= HUB_CHANNEL_MAX) {
            memcpy(p->chan, s, n);
            p->chan[n] = '\0';
        }
        break;
    case F_METHOD:
        p->method_len = n;
        if (n <= HUB_METHOD_MAX) {
            memcpy(p->method, s, n);
            p->method[n] = '\0';
        }
        break;
    }
    return 1;
}

static int on_null(void *c)
{
    return value(c, T_NULL, NULL, 0);
}

static int on_bool(void *c, int b)
{
    (void)b;
    return value(c, T_BOOL, NULL, 0);
}

static int on_number(void *c, const char *s, size_t n)
{
    /* yajl has checked the number's syntax: an integer has no '.', 'e', 'E'. */
    int integer = 1;
    for (size_t i = 0; i < n && integer; i++)
        if (s[i] == '.' || s[i] == 'e' || s[i] == 'E')
            integer = 0;
    return value(c, integer ? T_INT : T_NUMBER, s, n);
}

static int on_string(void *c, const unsigned char *s, size_t n)
{
    return value(c, T_STRING, (const char *)s, n);
}

/* The start of an array or object. */
static int enter(struct parse *p, int type)
{
    if ((p->depth > 0 || type != T_OBJECT) && !value(p, type, NULL, 0))
        return 0;
    if (p->depth == p->max_depth) {
        hub_proto_fail(p->err, HUB_PERR_BAD_REQUEST, "JSON nested deeper than %d levels",
             MAX_DEPTH);
        return stop(p);
    }
    p->depth++;
    return 1;
}

static int on_start_map(void *c)
{
    return enter(c, T_OBJECT);
}

static int on_start_array(void *c)
{
    return enter(c, T_ARRAY);
}

static int on_end(void *c)
{
    struct parse *p = c;
    if (--p->depth == 1 && p->cur >= 0)
        p->v[p->cur].end = yajl_get_bytes_consumed(p->h);
    return 1;
}

static int on_key(void *c, const unsigned char *k, size_t n)
{
    struct parse *p = c;
    if (p->depth == 2 && (p->cur == F_RECOVER || p->cur == F_SINCE) &&
        p->v[p->cur].type == T_OBJECT) {
        int key = n == 6 && !memcmp(k, "offset", 6) ? 0 : n == 5 && !memcmp(k, "epoch", 5) ? 1 : -1;
        if (key < 0) {
            if (!p->pos.other)
                show(p->pos.other_name, (const char *)k, n);
            p->pos.other = 1;
        } else if (p->pos.seen & (1u << key)) {
            p->pos.dup = 1;
            key = -1;
        } else {
            p->pos.seen |= 1u << key;
            if (key == 0)
                p->pos.ostart = value_start(p);
        }
        p->pos.key = key;
        return 1;
    }
    if (p->depth != 1)
        return 1;   /* a key inside a value */
    int f = field_of(k, n);
    p->cur = -1;
    if (f < 0 || !(p->allowed & BIT(f))) {
        if (!p->have_other) {
            show(p->other, (const char *)k, n);
            p->have_other = 1;
        }
    } else if (p->seen & BIT(f)) {
        if (p->dup < 0)
            p->dup = f;
    } else {
        p->seen |= BIT(f);
        p->cur = f;
        p->v[f].start = value_start(p);
    }
    return 1;
}

static const yajl_callbacks msg_callbacks = {
    .yajl_null = on_null,
    .yajl_boolean = on_bool,
    .yajl_number = on_number,
    .yajl_string = on_string,
    .yajl_start_map = on_start_map,
    .yajl_map_key = on_key,
    .yajl_end_map = on_end,
    .yajl_start_array = on_start_array,
    .yajl_end_array = on_end,
};

/* Shortens yajl's error texts, which are written for a terminal. */
static const char *short_reason(const char *yerr)
{
    static const char *const map[][2] = {
        {"premature EOF", "unexpected end of input"},
        {"trailing garbage", "text after the end of the value"},
        {"invalid char in json", "unexpected character"},
        {"invalid string in json", "invalid literal"},
        {"before a character which it may not", "invalid escape in string"},
        {"invalid character inside string", "control character in string"},
        {"non-hex", "invalid \\u escape in string"},
        {"malformed number", "malformed number"},
        {"comment", "comments are not allowed"},
        {"invalid bytes in UTF8", "invalid UTF-8"},
        {"invalid object key", "object key must be a string"},
        {"separated by a colon", "expected ':' after object key"},
        {"inside map, I expect", "expected ',' or '}'"},
        {"after array element", "expected ',' or ']'"},
        {"unallowed token", "unexpected token"},
    };
    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if (strstr(yerr, map[i][0]))
            return map[i][1];
    return "syntax error";
}

/* Runs yajl over p->buf with the given callbacks. Returns 0 if the text is
 * exactly one well-formed value and no callback stopped the parse; else -1,
 * with p->err filled by us or by the callback that stopped. */
static int run(struct parse *p, const yajl_callbacks *cbs)
{
    struct arena a;
    yajl_alloc_funcs af = {a_malloc, a_realloc, a_free, &a};
    const unsigned char *t = (const unsigned char *)p->buf;
    int utf8 = 0, rc = -1;
    size_t at = hub_proto_scan_text(t, p->len, &utf8);

    if (at != p->len) {
        p->err->invalid_utf8 = utf8;
        return hub_proto_fail(p->err, HUB_PERR_BAD_REQUEST, "invalid JSON: %s at byte %zu",
                    utf8 ? "invalid UTF-8" : "unexpected character", at);
    }
    a.used = 0;
    p->h = yajl_alloc(cbs, &af, p);
    /* hub_proto_scan_text() is the stricter check; yajl's would repeat part of it. */
    yajl_config(p->h, yajl_dont_validate_strings, 1);
    yajl_status st = yajl_parse(p->h, t, p->len);
    at = yajl_get_bytes_consumed(p->h);
    if (st == yajl_status_ok) {
        /* Offsets now count in the one-space chunk yajl feeds itself. */
        at = p->len;
        st = yajl_complete_parse(p->h);
    }
    if (st == yajl_status_ok) {
        rc = 0;
    } else if (p->stopped) {
        rc = -1;
    } else {
        unsigned char *e = yajl_get_error(p->h, 0, NULL, 0);
        hub_proto_fail(p->err, HUB_PERR_BAD_REQUEST, "invalid JSON: %s at byte %zu",
             short_reason(e ? (const char *)e : ""), at < p->len ? at : p->len);
        if (e)
            yajl_free_error(p->h, e);
    }
    yajl_free(p->h);
    p->h = NULL;
    return rc;
}

static void parse_init(struct parse *p, const char *buf, size_t len,
                       unsigned allowed, struct hub_proto_error *err)
{
    memset(p, 0, sizeof(*p));
    p->buf = buf ? buf : "";    /* (NULL, 0) is an empty message */
    p->len = len;
    p->allowed = allowed;
    p->max_depth = MAX_DEPTH + 1;
    p->cur = -1;
    p->dup = -1;
    p->pos.key = -1;
    p->err = err;
    err->invalid_utf8 = 0;
}

static struct hub_span span_of(const struct parse *p, int f)
{
    struct hub_span s = {p->buf + p->v[f].start, p->v[f].end - p->v[f].start};
    return s;
}

/* Checks shared by commands and API bodies, in the order they are reported. */
static int check_members(const struct parse *p, unsigned required,
                         const char *for_op, struct hub_proto_error *err)
{
    char sop[SHOW_MAX + 4];
    const char *suffix = "", *opname = "";
    if (for_op) {
        suffix = "' for op '";
        opname = show(sop, for_op, strlen(for_op));
    }
    if (p->have_other)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "unknown field '%s%s%s'", p->other,
                    suffix, opname);
    for (int f = 0; f < F__COUNT; f++)
        if ((required & BIT(f)) && !(p->seen & BIT(f)))
            return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "missing field '%s'",
                        field_names[f]);
    if ((p->seen & BIT(F_CHANNEL)) && p->v[F_CHANNEL].type != T_STRING)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "field 'channel' must be a string");
    if ((p->seen & BIT(F_METHOD)) && p->v[F_METHOD].type != T_STRING)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "field 'method' must be a string");
    if ((p->seen & BIT(F_CHANNELS)) &&
        (p->v[F_CHANNELS].type != T_ARRAY || p->entry_type_bad))
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                    "field 'channels' must be an array of strings");
    if ((p->seen & BIT(F_CHANNEL)) && hub_proto_chan_check(p->chan, p->chan_len, "", err) < 0)
        return -1;
    return 0;
}

/* ---- client commands ---- */

static const struct {
    const char *name;
    unsigned allowed, required;
} ops[] = {
    [HUB_OP_SUBSCRIBE] = {"subscribe",
                          BIT(F_OP) | BIT(F_ID) | BIT(F_CHANNEL) | BIT(F_RECOVER) | BIT(F_REWIND),
                          BIT(F_CHANNEL)},
    [HUB_OP_UNSUBSCRIBE] = {"unsubscribe", BIT(F_OP) | BIT(F_ID) | BIT(F_CHANNEL),
                            BIT(F_CHANNEL)},
    [HUB_OP_PUBLISH] = {"publish",
                        BIT(F_OP) | BIT(F_ID) | BIT(F_CHANNEL) | BIT(F_DATA),
                        BIT(F_CHANNEL) | BIT(F_DATA)},
    [HUB_OP_PING] = {"ping", BIT(F_OP) | BIT(F_ID), 0},
    [HUB_OP_RPC] = {"rpc", BIT(F_OP) | BIT(F_ID) | BIT(F_METHOD) | BIT(F_DATA),
                    BIT(F_METHOD)},
    [HUB_OP_HISTORY] = {"history",
                        BIT(F_OP) | BIT(F_ID) | BIT(F_CHANNEL) | BIT(F_LIMIT) | BIT(F_SINCE) |
                            BIT(F_REVERSE),
                        BIT(F_CHANNEL)},
    [HUB_OP_PRESENCE] = {"presence", BIT(F_OP) | BIT(F_ID) | BIT(F_CHANNEL), BIT(F_CHANNEL)},
    [HUB_OP_PRESENCE_STATS] = {"presence_stats", BIT(F_OP) | BIT(F_ID) | BIT(F_CHANNEL),
                               BIT(F_CHANNEL)},
};

#define CMD_MEMBERS                                                                   \
    (BIT(F_OP) | BIT(F_ID) | BIT(F_CHANNEL) | BIT(F_DATA) | BIT(F_METHOD) | BIT(F_RECOVER) | \
     BIT(F_REWIND) | BIT(F_LIMIT) | BIT(F_SINCE) | BIT(F_REVERSE))

static int op_of(const char *s, size_t n)
{
    for (int op = HUB_OP_SUBSCRIBE; op <= HUB_OP_PRESENCE_STATS; op++)
        if (strlen(ops[op].name) == n && memcmp(ops[op].name, s, n) == 0)
            return op;
    return HUB_OP_NONE;
}

/* An offset as a client writes it: an integer 0..HUB_OFFSET_MAX. */
static int parse_offset(const char *s, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    if (!n || n > 19)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if (v > (uint64_t)HUB_OFFSET_MAX)
        return -1;
    *out = v;
    return 0;
}

/* "recover" / "since": {"offset":N,"epoch":"E"}. */
static int decode_pos(const struct parse *p, int f, struct hub_cmd_pos *pos,
                      struct hub_proto_error *err)
{
    const char *name = field_names[f];
    if (p->v[f].type != T_OBJECT)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                    "field '%s' must be an object {\"offset\":N,\"epoch\":\"E\"}", name);
    if (p->pos.other)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "unknown field '%s' in '%s'",
                    p->pos.other_name, name);
    if (p->pos.dup)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "duplicate field in '%s'", name);
    if (!(p->pos.seen & 1))
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "missing field 'offset' in '%s'", name);
    if (p->pos.otype != T_INT ||
        parse_offset(p->buf + p->pos.ostart, p->pos.oend - p->pos.ostart, &pos->offset) < 0)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                    "'%s.offset' must be an integer from 0 to %lld", name,
                    (long long)HUB_OFFSET_MAX);
    if (p->pos.seen & 2) {
        if (p->pos.etype != T_STRING)
            return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "'%s.epoch' must be a string", name);
        if (p->pos.elen > HUB_EPOCH_MAX)
            return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                        "'%s.epoch' is too long (at most %d bytes)", name, HUB_EPOCH_MAX);
        memcpy(pos->epoch, p->pos.epoch, p->pos.elen + 1);
        pos->has_epoch = 1;
    } else if (f == F_SINCE) {
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                    "missing field 'epoch' in 'since': an offset names a message only "
                    "with its epoch");
    }
    pos->set = 1;
    return 0;
}

/* "rewind" / "limit": a count 1..2^31 (the session checks recover_max). */
static int decode_count(const struct parse *p, int f, uint32_t *out,
                        struct hub_proto_error *err)
{
    uint64_t v;
    const struct val *x = &p->v[f];
    if (x->type != T_INT || parse_offset(p->buf + x->start, x->end - x->start, &v) < 0 ||
        v < 1 || v > INT32_MAX)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "field '%s' must be a positive integer",
                    field_names[f]);
    *out = (uint32_t)v;
    return 0;
}

int hub_proto_decode(const char *buf, size_t len, struct hub_cmd *cmd,
                     struct hub_proto_error *err)
{
    struct parse p;
    char shown[SHOW_MAX + 4];

    cmd->op = HUB_OP_NONE;
    cmd->id.p = NULL;
    cmd->id.len = 0;
    cmd->channel[0] = '\0';
    cmd->channel_len = 0;
    cmd->data.p = NULL;
    cmd->data.len = 0;
    cmd->method[0] = '\0';
    cmd->method_len = 0;
    memset(&cmd->recover, 0, sizeof(cmd->recover));
    memset(&cmd->since, 0, sizeof(cmd->since));
    cmd->rewind = cmd->limit = 0;
    cmd->reverse = 0;

    parse_init(&p, buf, len, CMD_MEMBERS, err);
    p.chan = cmd->channel;
    p.method = cmd->method;
    if (run(&p, &msg_callbacks) < 0)
        return -1;

    /* The text is valid JSON from here on: echo a valid id in any error. */
    int id_seen = (p.seen & BIT(F_ID)) != 0;
    int id_valid = (p.v[F_ID].type == T_INT || p.v[F_ID].type == T_STRING) && p.id_ok;
    if (id_seen && id_valid && p.dup != F_ID)
        cmd->id = span_of(&p, F_ID);

    if (p.dup >= 0)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "duplicate field '%s'",
                    field_names[p.dup]);
    if (id_seen && !id_valid) {
        if (p.v[F_ID].type == T_STRING)
            return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                        "field 'id' is too long (at most %d bytes)", ID_STRING_MAX);
        if (p.v[F_ID].type == T_INT)
            return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                        "field 'id' is too long (at most %d characters)", ID_INT_MAX);
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                    "field 'id' must be an integer or a string");
    }
    if (!(p.seen & BIT(F_OP)))
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "missing field 'op'");
    if (p.v[F_OP].type != T_STRING)
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "field 'op' must be a string");
    int op = p.op_len <= SHOW_MAX ? op_of(p.op, p.op_len) : HUB_OP_NONE;
    if (op == HUB_OP_NONE)
        return hub_proto_fail(err, HUB_PERR_UNKNOWN_OP, "unknown op '%s'",
                    show(shown, p.op, p.op_len < sizeof(p.op) ? p.op_len : sizeof(p.op)));

    /* A member of another op is as unknown to this one as any other key. */
    unsigned extra = p.seen & ~ops[op].allowed;
    if (extra && !p.have_other) {
        int f = __builtin_ctz(extra);
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "unknown field '%s' for op '%s'",
                    field_names[f], ops[op].name);
    }
    if (check_members(&p, ops[op].required, ops[op].name, err) < 0)
        return -1;
    if (p.seen & BIT(F_METHOD)) {
        if (p.method_len == 0)
            return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "field 'method' must not be empty");
        if (p.method_len > HUB_METHOD_MAX)
            return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                        "field 'method' is too long (at most %d bytes)", HUB_METHOD_MAX);
        for (size_t i = 0; i < p.method_len; i++)
            if ((unsigned char)p.method[i] < 0x20 || p.method[i] == 0x7f)
                return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                            "field 'method' must not contain control characters");
        cmd->method_len = p.method_len;
    }
    if (p.seen & BIT(F_CHANNEL))
        cmd->channel_len = p.chan_len;
    if (p.seen & BIT(F_DATA))
        cmd->data = span_of(&p, F_DATA);
    if ((p.seen & BIT(F_RECOVER)) && decode_pos(&p, F_RECOVER, &cmd->recover, err) < 0)
        return -1;
    if ((p.seen & BIT(F_SINCE)) && decode_pos(&p, F_SINCE, &cmd->since, err) < 0)
        return -1;
    if ((p.seen & BIT(F_REWIND)) && decode_count(&p, F_REWIND, &cmd->rewind, err) < 0)
        return -1;
    if ((p.seen & BIT(F_LIMIT)) && decode_count(&p, F_LIMIT, &cmd->limit, err) < 0)
        return -1;
    if ((p.seen & BIT(F_RECOVER)) && (p.seen & BIT(F_REWIND)))
        return hub_proto_fail(err, HUB_PERR_BAD_REQUEST,
                    "'recover' and 'rewind' do not go together: recover continues from "
                    "an offset, rewind starts from the last N messages");
    if (p.seen & BIT(F_REVERSE)) {
        if (p.v[F_REVERSE].type != T_BOOL)
            return hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "field 'reverse' must be true or false");
        cmd->reverse = p.buf[p.v[F_REVERSE].start] == 't';
    }
    cmd->op = op;
    return 0;
}

/* ---- HTTP API bodies ---- */

int hub_proto_decode_api(const char *buf, size_t len, int broadcast,
                         struct hub_api_req *req, struct hub_proto_error *err)
{
    struct parse p;
    char chan[HUB_CHANNEL_MAX + 1];
    struct dedup *dd = NULL;
    unsigned members = BIT(F_DATA) | BIT(broadcast ? F_CHANNELS : F_CHANNEL);
    int rc = -1;

    req->data.p = NULL;
    req->data.len = 0;
    req->nchannels = 0;
    hub_buf_reset(&req->names);

    parse_init(&p, buf, len, members, err);
    p.chan = chan;
    p.req = req;
    if (broadcast) {
        /* 8 KiB, once per API request: the heap is the better place. */
        dd = hub_xcalloc(1, sizeof(*dd));
        p.dd = dd;
    }
    if (run(&p, &msg_callbacks) < 0)
        goto out;
    if (p.dup >= 0) {
        hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "duplicate field '%s'", field_names[p.dup]);
        goto out;
    }
    if (check_members(&p, members, NULL, err) < 0)
        goto out;
    if (broadcast) {
        if (p.entries == 0) {
            hub_proto_fail(err, HUB_PERR_BAD_REQUEST, "field 'channels' must not be empty");
            goto out;
        }
        if (p.entries > HUB_API_MAX_CHANNELS) {
            hub_proto_fail(err, HUB_PERR_LIMIT_EXCEEDED, "too many channels: %u, at most %d",
                 p.entries, HUB_API_MAX_CHANNELS);
            goto out;
        }
        if (p.entry_bad) {
            *err = p.entry_err;
            goto out;
        }
        req->nchannels = p.kept;
    } else {
        hub_buf_append(&req->names, chan, p.chan_len + 1);
        req->nchannels = 1;
    }
    req->data = span_of(&p, F_DATA);
    rc = 0;
out:
    if (rc < 0) {
        req->nchannels = 0;
        hub_buf_reset(&req->names);
    }
    if (dd)
        hub_htable_free(&dd->t);
    free(dd);
    return rc;
}

/* ---- any JSON value ---- */

static int on_open_any(void *c)
{
    struct parse *p = c;
    if (p->depth == p->max_depth) {
        p->stopped = 1;
        return 0;
    }
    p->depth++;
    return 1;
}

static int on_close_any(void *c)
{
    struct parse *p = c;
    p->depth--;
    return 1;
}

static const yajl_callbacks any_callbacks = {
    .yajl_start_map = on_open_any,
    .yajl_end_map = on_close_any,
    .yajl_start_array = on_open_any,
    .yajl_end_array = on_close_any,
};

int hub_proto_json_valid(const char *p, size_t len)
{
    struct parse ps;
    struct hub_proto_error err;
    parse_init(&ps, p, len, 0, &err);
    ps.max_depth = MAX_DEPTH;   /* on_open_any() stops without filling err */
    return run(&ps, &any_callbacks) == 0;
}
