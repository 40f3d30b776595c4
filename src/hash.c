/* The hash function and the intrusive hash table (include/luahub/hash.h). */
#include "luahub/hash.h"

#include <stdlib.h>

#include "luahub/util.h"

#define MIN_BUCKETS 64

uint64_t hub_hash_u64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

uint64_t hub_hash64(const void *p, size_t len)
{
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ull;            /* FNV-1a 64 */
    for (size_t i = 0; i < len; i++) {
        h ^= s[i];
        h *= 0x100000001b3ull;
    }
    /* FNV's low bits mix poorly: the finaliser spreads short names over
     * the buckets (and over jump hash's LCG, for shards). */
    return hub_hash_u64(h);
}

static void resize(struct hub_htable *t, size_t nb)
{
    struct hub_hnode **b = hub_xcalloc(nb, sizeof(*b));
    for (size_t i = 0; i < t->nb; i++) {
        struct hub_hnode *n = t->b[i], *next;
        for (; n; n = next) {
            next = n->next;
            size_t k = n->hash & (nb - 1);
            n->next = b[k];
            b[k] = n;
        }
    }
    free(t->b);
    t->b = b;
    t->nb = nb;
}

void hub_htable_insert(struct hub_htable *t, struct hub_hnode *node)
{
    if (t->n + 1 > t->nb)
        resize(t, t->nb ? t->nb * 2 : MIN_BUCKETS);
    size_t k = node->hash & (t->nb - 1);
    node->next = t->b[k];
    t->b[k] = node;
    t->n++;
}

void hub_htable_remove(struct hub_htable *t, struct hub_hnode *node)
{
    struct hub_hnode **pp = &t->b[node->hash & (t->nb - 1)];
    while (*pp && *pp != node)
        pp = &(*pp)->next;
    if (*pp) {
        *pp = node->next;
        t->n--;
    }
    if (t->nb > MIN_BUCKETS && t->n < t->nb / 8)
        resize(t, t->nb / 2);
}

struct hub_hnode *hub_htable_pop(struct hub_htable *t)
{
    for (size_t i = 0; i < t->nb; i++) {
        struct hub_hnode *n = t->b[i];
        if (n) {
            t->b[i] = n->next;
            t->n--;
            return n;
        }
    }
    return NULL;
}

void hub_htable_free(struct hub_htable *t)
{
    free(t->b);
    t->b = NULL;
    t->nb = t->n = 0;
}
