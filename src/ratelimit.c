/* Token buckets and the per-address connection table
 * (include/luahub/ratelimit.h). */
#include "luahub/ratelimit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/util.h"

/* Refills `b` up to now: rate tokens a second (thousandths per ms). */
static void refill(struct hub_bucket *b, uint32_t rate, uint64_t now_ms)
{
    uint32_t now = (uint32_t)now_ms, elapsed = now - b->last_ms;
    /* a difference over 2^31 is the clock going back: no refill */
    if (b->used && elapsed < UINT32_C(1) << 31) {
        uint64_t back = (uint64_t)elapsed * rate; /* thousandths */
        b->used = back >= b->used ? 0 : b->used - (uint32_t)back;
    }
    b->last_ms = now;
}

uint64_t hub_bucket_take(struct hub_bucket *b, uint32_t rate, uint32_t burst, uint64_t now_ms)
{
    if (!rate)
        return 0;
    refill(b, rate, now_ms);
    uint64_t cap = (uint64_t)burst * 1000u; /* burst <= 1,000,000: fits `used` */
    if ((uint64_t)b->used + 1000u <= cap) {
        b->used += 1000u;
        return 0;
    }
    /* thousandths missing, refilled at `rate` per ms */
    uint64_t missing = (uint64_t)b->used + 1000u - cap;
    return (missing + rate - 1) / rate;
}

int hub_bucket_full(struct hub_bucket *b, uint32_t rate, uint64_t now_ms)
{
    if (!rate)
        return 1;
    refill(b, rate, now_ms);
    return b->used == 0;
}

struct hub_ipentry {
    struct hub_hnode node;
    struct hub_ip ip;
    uint32_t conns;
    struct hub_bucket bucket;
};

static struct hub_ipentry *find(struct hub_iplimit *l, const struct hub_ip *ip, uint64_t h)
{
    for (struct hub_hnode *n = hub_htable_chain(&l->t, h); n; n = n->next) {
        struct hub_ipentry *e = hub_container_of(n, struct hub_ipentry, node);
        if (n->hash == h && e->ip.family == ip->family && !memcmp(e->ip.a, ip->a, 16))
            return e;
    }
    return NULL;
}

static uint64_t hash_ip(const struct hub_ip *ip)
{
    return hub_hash64(ip->a, 16) ^ (uint64_t)ip->family;
}

int hub_iplimit_open(struct hub_iplimit *l, const struct hub_ip *ip, uint64_t now_ms,
                     char *why, size_t n)
{
    if (!l->max_conns && !l->rate)
        return 0;
    uint64_t h = hash_ip(ip);
    struct hub_ipentry *e = find(l, ip, h);
    if (!e) {
        e = hub_xcalloc(1, sizeof(*e));
        e->ip = *ip;
        e->node.hash = h;
        hub_htable_insert(&l->t, &e->node);
    }
    if (l->max_conns && e->conns >= l->max_conns) {
        l->refused_conns++;
        snprintf(why, n, "too many connections from this address (max_connections_per_ip %u)",
                 l->max_conns);
        return -1;
    }
    uint64_t wait = hub_bucket_take(&e->bucket, l->rate, l->rate, now_ms);
    if (wait) {
        l->refused_rate++;
        snprintf(why, n, "connecting too fast from this address (connect_rate_per_ip %u per "
                 "second): retry in %llu ms", l->rate, (unsigned long long)wait);
        return -1;
    }
    e->conns++;
    return 0;
}

void hub_iplimit_close(struct hub_iplimit *l, const struct hub_ip *ip, uint64_t now_ms)
{
    if (!l->max_conns && !l->rate)
        return;
    struct hub_ipentry *e = find(l, ip, hash_ip(ip));
    if (!e)
        return;
    if (e->conns)
        e->conns--;
    if (!e->conns && hub_bucket_full(&e->bucket, l->rate, now_ms)) {
        hub_htable_remove(&l->t, &e->node);
        free(e);
    }
}

void hub_iplimit_sweep(struct hub_iplimit *l, uint64_t now_ms)
{
    /* Collected first: a removal may shrink the table under the walk. */
    struct hub_ipentry **gone = l->t.n ? hub_xmalloc(l->t.n * sizeof(*gone)) : NULL;
    size_t k = 0;
    for (size_t i = 0; i < l->t.nb; i++)
        for (struct hub_hnode *n = l->t.b[i]; n; n = n->next) {
            struct hub_ipentry *e = hub_container_of(n, struct hub_ipentry, node);
            if (!e->conns && hub_bucket_full(&e->bucket, l->rate, now_ms))
                gone[k++] = e;
        }
    for (size_t i = 0; i < k; i++) {
        hub_htable_remove(&l->t, &gone[i]->node);
        free(gone[i]);
    }
    free(gone);
}

void hub_iplimit_free(struct hub_iplimit *l)
{
    struct hub_hnode *n;
    while ((n = hub_htable_pop(&l->t)))
        free(hub_container_of(n, struct hub_ipentry, node));
    hub_htable_free(&l->t);
}
