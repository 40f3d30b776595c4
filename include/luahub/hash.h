/* One hash function and one intrusive hash table, used by every module
 * that looks things up by name or id: channels (chan.c), the broker's
 * channel sets, the connection-id table (hub.c) and duplicate channel
 * names in an API broadcast (proto.c). Nothing here allocates nodes; the
 * table allocates only its bucket array.
 *
 * Ownership: nodes are embedded in the caller's objects and belong to
 * it; removing a node never frees it. No callbacks. */
#ifndef LUAHUB_HASH_H
#define LUAHUB_HASH_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/util.h"

/* FNV-1a 64 followed by the MurmurHash3 fmix64 finaliser. Stable across
 * versions and processes: it decides the Redis shard of a channel, on which
 * every process must agree (docs/broker.md). */
uint64_t hub_hash64(const void *p, size_t len);

/* fmix64 of an integer (connection ids). */
uint64_t hub_hash_u64(uint64_t x);

/* Embed in the object; set `hash` before inserting. */
struct hub_hnode {
    struct hub_hnode *next;
    uint64_t hash;
};

/* Zero-initialise. Chained, power-of-two buckets, grown when the count
 * passes the bucket count. */
struct hub_htable {
    struct hub_hnode **b;
    size_t nb;
    size_t n;
};

void hub_htable_insert(struct hub_htable *t, struct hub_hnode *node);
/* `node` must be in the table. */
void hub_htable_remove(struct hub_htable *t, struct hub_hnode *node);
/* The chain where nodes of `hash` are (or NULL): walk it with ->next and
 * compare hash and key. */
static inline struct hub_hnode *hub_htable_chain(const struct hub_htable *t, uint64_t hash)
{
    return t->nb ? t->b[hash & (t->nb - 1)] : NULL;
}
/* Takes any node out (for freeing everything), or returns NULL when empty. */
struct hub_hnode *hub_htable_pop(struct hub_htable *t);
/* Frees the bucket array (not the nodes) and empties the table. */
void hub_htable_free(struct hub_htable *t);

#endif
