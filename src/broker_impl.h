/* Private to the broker implementations (broker.c, broker_memory.c,
 * broker_redis.c): the parsed form of a broker URL, the channel-name hash and
 * a small intrusive hash set keyed by name. Not a public contract. */
#ifndef LUAHUB_BROKER_IMPL_H
#define LUAHUB_BROKER_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/broker.h"

/* Defaults of the per-server options (query parameters of a redis URL). */
#define HUB_REDIS_DEFAULT_PORT 6379
#define HUB_REDIS_CONNECT_TIMEOUT_MS 2000u
#define HUB_REDIS_COMMAND_TIMEOUT_MS 2000u
#define HUB_REDIS_MAX_PENDING 10000u
#define HUB_REDIS_MAX_PENDING_BYTES ((size_t)16 << 20)

/* One "redis://..." item of a broker URL. Strings are owned (hub_xstrdup). */
struct hub_redis_url {
    char *host;                 /* name, IPv4 or IPv6 literal (no brackets) */
    int port;
    char *user;                 /* NULL: AUTH password (Redis < 6 form) */
    char *password;             /* NULL: no AUTH */
    int db;                     /* SELECT when > 0 */
    unsigned connect_timeout_ms;
    unsigned command_timeout_ms;
    unsigned max_pending;       /* PUBLISHes awaiting a reply */
    size_t max_pending_bytes;   /* their bytes, and hiredis' output buffer */
};

void hub_redis_url_free(struct hub_redis_url *u, size_t n);

/* 64-bit hash of a channel name: FNV-1a 64 followed by the MurmurHash3
 * fmix64 finaliser. Stable across versions and processes (it decides the
 * shard of a channel, on which every process must agree). */
uint64_t hub_broker_hash64(const char *p, size_t len);

/* Intrusive hash set keyed by (name, len). Embed a hub_bnode in your
 * entry, fill hash/name/len, insert. The set never allocates nodes and
 * never frees them. */
struct hub_bnode {
    struct hub_bnode *next;
    uint64_t hash;
    const char *name;           /* borrowed from the entry */
    size_t len;
};

struct hub_bset {
    struct hub_bnode **b;       /* nb buckets, a power of two (0 before use) */
    size_t nb;
    size_t n;
};

struct hub_bnode *hub_bset_find(const struct hub_bset *s, const char *name, size_t len,
                                uint64_t hash);
void hub_bset_insert(struct hub_bset *s, struct hub_bnode *node);
void hub_bset_remove(struct hub_bset *s, struct hub_bnode *node);
/* Frees the bucket array (not the nodes) and empties the set. */
void hub_bset_free(struct hub_bset *s);

/* Constructors behind hub_broker_new(). hub_broker_redis_new takes ownership
 * of `urls` (n >= 1 entries). Both return a new broker (never NULL). */
struct hub_broker *hub_broker_memory_new(uv_loop_t *loop, hub_broker_deliver_fn deliver,
                                         hub_broker_health_fn health, void *ud);
struct hub_broker *hub_broker_redis_new(uv_loop_t *loop, struct hub_redis_url *urls, size_t n,
                                        const char *prefix, hub_broker_deliver_fn deliver,
                                        hub_broker_health_fn health, void *ud);

#endif
