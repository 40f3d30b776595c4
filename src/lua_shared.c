/* hub.shared: a dictionary of the process (string keys; string, number or
 * boolean values; a time to live per key; atomic incr), and hub.ratelimit
 * on top of it. It lives in C, outside every Lua state, so it survives
 * policy reloads; its bytes are capped by lua_shared_memory: a write that
 * would pass the cap first drops expired keys (earliest first), then the
 * least recently used ones (counted as evictions).
 *
 * One table per process (one loop): every policy holds it
 * (hub_lua_shared_hold) and lets it go when it is destroyed
 * (hub_lua_shared_release); a reload builds the new policy before the old
 * one goes, so the table stays; the last release frees it. Time is the
 * monotonic clock. Every function here
 * is called from Lua and may raise on bad arguments. */
#include "lua_api.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "luahub/hash.h"
#include "luahub/list.h"

#define KEY_MAX 1024                /* bytes of a key */
#define TTL_MAX_S (366.0 * 86400)   /* longest time to live */
#define ENTRY_OVERHEAD 32           /* bytes counted beyond the struct (allocator, heap slot) */

/* Namespaces: hub.shared's keys and hub.ratelimit's buckets never meet. */
enum { NS_DICT = 'd', NS_RATE = 'r' };

enum { V_STRING, V_INTEGER, V_FLOAT, V_BOOLEAN };

struct sentry {
    struct hub_hnode node;          /* sh.t, hash of the key with its namespace */
    struct hub_list lru;            /* sh.lru: least recently used first */
    uint64_t expires_ms;            /* monotonic ms; 0: never */
    size_t heap_at;                 /* index + 1 in sh.heap; 0: not there */
    size_t size;                    /* bytes counted for it */
    int type;                       /* V_* */
    lua_Integer i;
    lua_Number n;                   /* V_FLOAT; V_BOOLEAN: 0 or 1 */
    size_t klen, vlen;              /* key (with the namespace byte), string value */
    char data[];                    /* key, then the string value */
};

static struct {
    unsigned holders;
    struct hub_htable t;
    struct hub_list lru;
    struct sentry **heap;           /* entries with a TTL, earliest expiry first */
    size_t nheap, heap_cap;
    size_t bytes, max;
    uint64_t evictions;
} sh;

void hub_lua_shared_hold(uint64_t max_bytes)
{
    if (!sh.holders++)
        hub_list_init(&sh.lru);
    sh.max = (size_t)max_bytes;
}

/* ---- the expiry heap ------------------------------------------------------- */

static void heap_set(size_t i, struct sentry *e)
{
    sh.heap[i] = e;
    e->heap_at = i + 1;
}

static void heap_up(size_t i)
{
    struct sentry *e = sh.heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (sh.heap[parent]->expires_ms <= e->expires_ms)
            break;
        heap_set(i, sh.heap[parent]);
        i = parent;
    }
    heap_set(i, e);
}

static void heap_down(size_t i)
{
    struct sentry *e = sh.heap[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= sh.nheap)
            break;
        if (c + 1 < sh.nheap && sh.heap[c + 1]->expires_ms < sh.heap[c]->expires_ms)
            c++;
        if (e->expires_ms <= sh.heap[c]->expires_ms)
            break;
        heap_set(i, sh.heap[c]);
        i = c;
    }
    heap_set(i, e);
}

static void heap_remove(struct sentry *e)
{
    if (!e->heap_at)
        return;
    size_t i = e->heap_at - 1;
    e->heap_at = 0;
    struct sentry *last = sh.heap[--sh.nheap];
    if (i == sh.nheap)
        return;
    heap_set(i, last);
    heap_up(i);
    heap_down(last->heap_at - 1);
}

/* Sets when `e` expires (0: never) and its place in the heap. */
static void set_expiry(struct sentry *e, uint64_t expires_ms)
{
    e->expires_ms = expires_ms;
    if (!expires_ms) {
        heap_remove(e);
        return;
    }
    if (e->heap_at) {
        heap_up(e->heap_at - 1);
        heap_down(e->heap_at - 1);
        return;
    }
    if (sh.nheap == sh.heap_cap) {
        sh.heap_cap = sh.heap_cap ? sh.heap_cap * 2 : 64;
        sh.heap = hub_xrealloc(sh.heap, sh.heap_cap * sizeof(*sh.heap));
    }
    heap_set(sh.nheap, e);
    heap_up(sh.nheap++);
}

/* ---- entries ---------------------------------------------------------------- */

static void entry_free(struct sentry *e)
{
    hub_htable_remove(&sh.t, &e->node);
    hub_list_remove(&e->lru);
    heap_remove(e);
    sh.bytes -= e->size;
    free(e);
}

static int expired(const struct sentry *e, uint64_t now)
{
    return e->expires_ms && e->expires_ms <= now;
}

/* The live entry of key k[0..n) (namespace byte first), or NULL; an
 * expired one is dropped on the way. */
static struct sentry *find(const char *k, size_t n, uint64_t h, uint64_t now)
{
    for (struct hub_hnode *x = hub_htable_chain(&sh.t, h); x; x = x->next) {
        struct sentry *e = hub_container_of(x, struct sentry, node);
        if (x->hash != h || e->klen != n || memcmp(e->data, k, n))
            continue;
        if (expired(e, now)) {
            entry_free(e);
            return NULL;
        }
        hub_list_move_tail(&sh.lru, &e->lru);
        return e;
    }
    return NULL;
}

/* Makes room for `need` bytes: expired entries first, then the least
 * recently used. Returns how many entries went (for the charge). */
static size_t make_room(size_t need, uint64_t now)
{
    size_t gone = 0;
    while (sh.bytes + need > sh.max && sh.nheap && sh.heap[0]->expires_ms <= now) {
        entry_free(sh.heap[0]);
        gone++;
    }
    struct hub_list *first;
    while (sh.bytes + need > sh.max && (first = hub_list_first(&sh.lru))) {
        entry_free(hub_container_of(first, struct sentry, lru));
        sh.evictions++;
        gone++;
    }
    return gone;
}

/* A new entry for key k[0..n) with room for a string of vlen bytes, in the
 * table (after make_room), or NULL when it could never fit. */
static struct sentry *entry_new(const char *k, size_t n, uint64_t h, size_t vlen,
                                uint64_t now, size_t *gone)
{
    size_t size = sizeof(struct sentry) + n + vlen + ENTRY_OVERHEAD;
    if (size > sh.max)
        return NULL;
    *gone = make_room(size, now);
    struct sentry *e = hub_xcalloc(1, sizeof(*e) + n + vlen + 1);
    e->node.hash = h;
    e->size = size;
    e->klen = n;
    e->vlen = vlen;
    memcpy(e->data, k, n);
    hub_htable_insert(&sh.t, &e->node);
    hub_list_init(&e->lru);
    hub_list_push_tail(&sh.lru, &e->lru);
    sh.bytes += size;
    return e;
}

/* ---- arguments ---------------------------------------------------------- */

/* The key at `arg` with namespace `ns` in front, in buf (KEY_MAX + 1). */
static size_t check_key(lua_State *L, int arg, const char *fn, int ns, char *buf)
{
    size_t n;
    if (lua_type(L, arg) == LUA_TTABLE && arg == 1)
        luaL_error(L, "%s: the key must be a string (call hub.shared.%s(key, ...), with a "
                      "dot, not a colon)", fn, fn + sizeof("hub.shared.") - 1);
    const char *k = luaL_checklstring(L, arg, &n);
    if (n == 0 || n > KEY_MAX)
        luaL_error(L, "%s: the key must be 1 to %d bytes", fn, KEY_MAX);
    buf[0] = (char)ns;
    memcpy(buf + 1, k, n);
    return n + 1;
}

/* The time to live at `arg` in ms (0: none; nil or 0 means none). */
static uint64_t check_ttl(lua_State *L, int arg, const char *fn)
{
    if (lua_isnoneornil(L, arg))
        return 0;
    lua_Number s = luaL_checknumber(L, arg);
    if (!(s >= 0 && s <= TTL_MAX_S))
        luaL_error(L, "%s: the ttl must be 0 (none) to %d seconds", fn, (int)TTL_MAX_S);
    uint64_t ms = (uint64_t)ceil(s * 1000.0);
    return s > 0 && ms == 0 ? 1 : ms;
}

static void check_value(lua_State *L, int arg, const char *fn)
{
    int t = lua_type(L, arg);
    if (t != LUA_TSTRING && t != LUA_TNUMBER && t != LUA_TBOOLEAN)
        luaL_error(L, "%s: the value must be a string, a number or a boolean (got %s)", fn,
                   luaL_typename(L, arg));
}

static void push_value(lua_State *L, const struct sentry *e)
{
    switch (e->type) {
    case V_STRING:
        lua_pushlstring(L, e->data + e->klen, e->vlen);
        break;
    case V_INTEGER:
        lua_pushinteger(L, e->i);
        break;
    case V_FLOAT:
        lua_pushnumber(L, e->n);
        break;
    default:
        lua_pushboolean(L, e->n != 0);
        break;
    }
}

static void charge(lua_State *L, size_t bytes, size_t gone)
{
    hub_sandbox_charge(hub_lua_policy(L), L,
                       HUB_COST_SHARED + (int64_t)(bytes / HUB_COST_COPY) + (int64_t)gone * 4);
}

/* Stores the value at `arg` under key k (replacing any). Pushes true, or
 * false and why. */
static int store(lua_State *L, const char *fn, const char *k, size_t n, uint64_t h, int arg,
                 uint64_t ttl_ms, uint64_t now)
{
    size_t vlen = 0, gone = 0;
    const char *v = lua_type(L, arg) == LUA_TSTRING ? lua_tolstring(L, arg, &vlen) : NULL;
    charge(L, n + vlen, 0);
    struct sentry *old = find(k, n, h, now);
    if (old)
        entry_free(old);
    struct sentry *e = entry_new(k, n, h, vlen, now, &gone);
    if (!e) {
        lua_pushboolean(L, 0);
        lua_pushfstring(L, "%s: the entry (%d bytes) is larger than lua_shared_memory", fn,
                        (int)(sizeof(struct sentry) + n + vlen + ENTRY_OVERHEAD));
        return 2;
    }
    if (v) {
        e->type = V_STRING;
        memcpy(e->data + n, v, vlen);
    } else if (lua_isinteger(L, arg)) {
        e->type = V_INTEGER;
        e->i = lua_tointeger(L, arg);
    } else if (lua_type(L, arg) == LUA_TNUMBER) {
        e->type = V_FLOAT;
        e->n = lua_tonumber(L, arg);
    } else {
        e->type = V_BOOLEAN;
        e->n = lua_toboolean(L, arg);
    }
    if (ttl_ms)
        set_expiry(e, now + ttl_ms);
    if (gone) /* what making room took (after it: the entry is in) */
        hub_sandbox_charge(hub_lua_policy(L), L, (int64_t)gone * 4);
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- hub.shared ---------------------------------------------------------- */

static int l_get(lua_State *L)
{
    char k[KEY_MAX + 1];
    size_t n = check_key(L, 1, "hub.shared.get", NS_DICT, k);
    struct sentry *e = find(k, n, hub_hash64(k, n), hub_now_ms());
    charge(L, n + (e ? e->vlen : 0), 0);
    if (!e)
        return 0;
    push_value(L, e);
    return 1;
}

/* set(key, value[, ttl]); a nil value deletes. */
static int l_set(lua_State *L)
{
    char k[KEY_MAX + 1];
    size_t n = check_key(L, 1, "hub.shared.set", NS_DICT, k);
    uint64_t now = hub_now_ms(), h = hub_hash64(k, n);
    if (lua_isnoneornil(L, 2)) {
        struct sentry *e = find(k, n, h, now);
        if (e)
            entry_free(e);
        charge(L, n, 0);
        lua_pushboolean(L, 1);
        return 1;
    }
    check_value(L, 2, "hub.shared.set");
    uint64_t ttl = check_ttl(L, 3, "hub.shared.set");
    return store(L, "hub.shared.set", k, n, h, 2, ttl, now);
}

/* add(key, value[, ttl]): only when the key is absent. */
static int l_add(lua_State *L)
{
    char k[KEY_MAX + 1];
    size_t n = check_key(L, 1, "hub.shared.add", NS_DICT, k);
    check_value(L, 2, "hub.shared.add");
    uint64_t ttl = check_ttl(L, 3, "hub.shared.add");
    uint64_t now = hub_now_ms(), h = hub_hash64(k, n);
    if (find(k, n, h, now)) {
        charge(L, n, 0);
        lua_pushboolean(L, 0);
        lua_pushliteral(L, "exists");
        return 2;
    }
    return store(L, "hub.shared.add", k, n, h, 2, ttl, now);
}

/* incr(key, by[, init[, ttl]]): the new value. An absent key starts at
 * `init` (nil: not found) and gets `ttl`; an existing one keeps its own. */
static int l_incr(lua_State *L)
{
    char k[KEY_MAX + 1];
    size_t n = check_key(L, 1, "hub.shared.incr", NS_DICT, k);
    luaL_checknumber(L, 2);
    if (!lua_isnoneornil(L, 3))
        luaL_checknumber(L, 3);
    uint64_t ttl = check_ttl(L, 4, "hub.shared.incr");
    uint64_t now = hub_now_ms(), h = hub_hash64(k, n);
    struct sentry *e = find(k, n, h, now);
    if (!e) {
        if (lua_isnoneornil(L, 3)) {
            charge(L, n, 0);
            lua_pushnil(L);
            lua_pushliteral(L, "not found");
            return 2;
        }
        lua_pushvalue(L, 3);
        lua_pushvalue(L, 2);
        lua_arith(L, LUA_OPADD); /* init + by: numbers only (checked) */
        lua_replace(L, 3);
        if (store(L, "hub.shared.incr", k, n, h, 3, ttl, now) == 2)
            return 2;
        lua_pop(L, 1);
        lua_pushvalue(L, 3);
        return 1;
    }
    charge(L, n, 0);
    if (e->type != V_INTEGER && e->type != V_FLOAT) {
        lua_pushnil(L);
        lua_pushliteral(L, "not a number");
        return 2;
    }
    push_value(L, e);
    lua_pushvalue(L, 2);
    lua_arith(L, LUA_OPADD);
    if (lua_isinteger(L, -1)) {
        e->type = V_INTEGER;
        e->i = lua_tointeger(L, -1);
    } else {
        e->type = V_FLOAT;
        e->n = lua_tonumber(L, -1);
    }
    return 1;
}

static int l_delete(lua_State *L)
{
    char k[KEY_MAX + 1];
    size_t n = check_key(L, 1, "hub.shared.delete", NS_DICT, k);
    struct sentry *e = find(k, n, hub_hash64(k, n), hub_now_ms());
    charge(L, n, 0);
    if (e)
        entry_free(e);
    lua_pushboolean(L, e != NULL);
    return 1;
}

/* ttl(key): seconds left, 0 for a key that does not expire, nil if absent. */
static int l_ttl(lua_State *L)
{
    char k[KEY_MAX + 1];
    size_t n = check_key(L, 1, "hub.shared.ttl", NS_DICT, k);
    uint64_t now = hub_now_ms();
    struct sentry *e = find(k, n, hub_hash64(k, n), now);
    charge(L, n, 0);
    if (!e)
        return 0;
    lua_pushnumber(L, e->expires_ms ? (lua_Number)(e->expires_ms - now) / 1000.0 : 0);
    return 1;
}

/* ---- hub.ratelimit ---------------------------------------------------------- */

/* GCRA, like hub.ratelimit_redis's script (lua_redis.c): the bucket is one
 * number, the "theoretical arrival time" in ms; a request of `cost` is
 * allowed when it is at most `burst` intervals ahead of now. The entry
 * expires when the bucket is full again. */
static int l_ratelimit(lua_State *L)
{
    char k[KEY_MAX + 1];
    size_t klen, gone = 0;
    double rate, burst, cost;
    const char *key = hub_lua_ratelimit_args(L, "hub.ratelimit", &klen, &rate, &burst, &cost);
    k[0] = NS_RATE;
    memcpy(k + 1, key, klen);
    size_t n = klen + 1;
    uint64_t h = hub_hash64(k, n);
    uint64_t now_ms = hub_now_ms();
    double now = (double)hub_now_ns() / 1e6, interval = 1000.0 / rate;

    struct sentry *e = find(k, n, h, now_ms);
    double tat = e ? e->n : now;
    if (tat < now)
        tat = now;
    double new_tat = tat + cost * interval, allow_at = new_tat - burst * interval;
    if (allow_at > now) {
        charge(L, n, 0);
        lua_pushboolean(L, 0);
        lua_pushnumber(L, (allow_at - now) / 1000.0);
        return 2;
    }
    if (!e) {
        e = entry_new(k, n, h, 0, now_ms, &gone);
        if (!e)
            return luaL_error(L, "hub.ratelimit: lua_shared_memory is too small for one key");
        e->type = V_FLOAT;
    }
    charge(L, n, gone);
    e->n = new_tat;
    set_expiry(e, (uint64_t)ceil(new_tat) + 1);
    lua_pushboolean(L, 1);
    lua_pushnumber(L, 0);
    return 2;
}

void hub_lua_shared_open(lua_State *L)
{
    static const luaL_Reg shared_fns[] = {
        {"get", l_get},
        {"set", l_set},
        {"add", l_add},
        {"incr", l_incr},
        {"delete", l_delete},
        {"ttl", l_ttl},
        {NULL, NULL},
    };
    luaL_newlib(L, shared_fns);
    lua_setfield(L, -2, "shared");
    lua_pushcfunction(L, l_ratelimit);
    lua_setfield(L, -2, "ratelimit");
}

void hub_lua_shared_metrics(struct hub_buf *b)
{
    hub_metric_one(b, "luahub_policy_shared_bytes", "gauge",
                   "Bytes of hub.shared and hub.ratelimit (capped by lua_shared_memory).",
                   sh.bytes);
    hub_metric_one(b, "luahub_policy_shared_keys", "gauge", "Keys of hub.shared and "
                   "hub.ratelimit.", sh.t.n);
    hub_metric_one(b, "luahub_policy_shared_evictions_total", "counter",
                   "Keys dropped before they expired to stay under lua_shared_memory.",
                   sh.evictions);
}

void hub_lua_shared_release(void)
{
    struct hub_hnode *x;
    if (!sh.holders || --sh.holders)
        return;
    while ((x = hub_htable_pop(&sh.t))) {
        struct sentry *e = hub_container_of(x, struct sentry, node);
        free(e);
    }
    hub_htable_free(&sh.t);
    free(sh.heap);
    memset(&sh, 0, sizeof(sh));
}
