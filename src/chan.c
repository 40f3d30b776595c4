/* Channel registry (see include/luahub/chan.h).
 *
 * Channels live in a chained hash table keyed by name. Each channel keeps an
 * array of subscription pointers (swap-remove on unsubscribe, so order is
 * not preserved; ordering of *messages* is the fan-out loop's business) and
 * each owner keeps a singly linked list of its subscriptions. Owners have at
 * most max_channels_per_conn subscriptions, so list walks are short. */
#include "luahub/chan.h"

#include <stdlib.h>
#include <string.h>

#include "luahub/util.h"

#define MIN_BUCKETS 64

static uint32_t hash_name(const char *p, size_t len)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)p[i];
        h *= 16777619u;
    }
    return h;
}

void hub_chan_registry_init(struct hub_chan_registry *r)
{
    memset(r, 0, sizeof(*r));
    r->nbuckets = MIN_BUCKETS;
    r->buckets = hub_xcalloc(r->nbuckets, sizeof(*r->buckets));
}

static void free_chan(struct hub_chan *c)
{
    for (uint32_t i = 0; i < c->nsubs; i++)
        free(c->subs[i]);
    free(c->subs);
    free(c);
}

void hub_chan_registry_free(struct hub_chan_registry *r)
{
    for (uint32_t b = 0; b < r->nbuckets; b++) {
        struct hub_chan *c = r->buckets[b], *next;
        for (; c; c = next) {
            next = c->next;
            free_chan(c);
        }
    }
    free(r->buckets);
    r->buckets = NULL;
    r->nbuckets = r->nchans = 0;
    r->nsubs = 0;
}

static void rehash(struct hub_chan_registry *r, uint32_t nbuckets)
{
    struct hub_chan **nb = hub_xcalloc(nbuckets, sizeof(*nb));
    for (uint32_t b = 0; b < r->nbuckets; b++) {
        struct hub_chan *c = r->buckets[b], *next;
        for (; c; c = next) {
            next = c->next;
            uint32_t i = c->hash & (nbuckets - 1);
            c->next = nb[i];
            nb[i] = c;
        }
    }
    free(r->buckets);
    r->buckets = nb;
    r->nbuckets = nbuckets;
}

static struct hub_chan *lookup(const struct hub_chan_registry *r, const char *name,
                               size_t len, uint32_t h)
{
    for (struct hub_chan *c = r->buckets[h & (r->nbuckets - 1)]; c; c = c->next)
        if (c->hash == h && c->name_len == len && memcmp(c->name, name, len) == 0)
            return c;
    return NULL;
}

struct hub_chan *hub_chan_find(const struct hub_chan_registry *r, const char *name,
                               size_t len)
{
    return lookup(r, name, len, hash_name(name, len));
}

int hub_chan_subscribe(struct hub_chan_registry *r, struct hub_sub **list,
                       void *owner, const char *name, size_t len)
{
    uint32_t h = hash_name(name, len);
    struct hub_chan *c = lookup(r, name, len, h);
    int created = 0;

    if (c) {
        for (struct hub_sub *s = *list; s; s = s->next)
            if (s->chan == c)
                return 0;
    } else {
        c = hub_xmalloc(sizeof(*c) + len + 1);
        memset(c, 0, sizeof(*c));
        c->hash = h;
        c->name_len = (uint32_t)len;
        memcpy(c->name, name, len);
        c->name[len] = '\0';
        uint32_t b = h & (r->nbuckets - 1);
        c->next = r->buckets[b];
        r->buckets[b] = c;
        r->nchans++;
        created = 1;
        if (r->nchans > r->nbuckets)
            rehash(r, r->nbuckets * 2);
    }

    if (c->nsubs == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 4;
        c->subs = hub_xrealloc(c->subs, sizeof(*c->subs) * c->cap);
    }
    struct hub_sub *s = hub_xmalloc(sizeof(*s));
    s->chan = c;
    s->owner = owner;
    s->idx = c->nsubs;
    s->next = *list;
    *list = s;
    c->subs[c->nsubs++] = s;
    r->nsubs++;

    if (created && r->on_first)
        r->on_first(r->ud, c->name, c->name_len);
    return 1;
}

/* Removes `s` from its channel and frees it; frees the channel when it was
 * the last subscriber. The caller has already unlinked `s` from the owner. */
static void drop_sub(struct hub_chan_registry *r, struct hub_sub *s)
{
    struct hub_chan *c = s->chan;
    struct hub_sub *last = c->subs[--c->nsubs];
    c->subs[s->idx] = last;
    last->idx = s->idx;
    free(s);
    r->nsubs--;
    if (c->nsubs)
        return;

    if (r->on_last)
        r->on_last(r->ud, c->name, c->name_len);
    struct hub_chan **pp = &r->buckets[c->hash & (r->nbuckets - 1)];
    while (*pp != c)
        pp = &(*pp)->next;
    *pp = c->next;
    r->nchans--;
    free_chan(c);
    if (r->nbuckets > MIN_BUCKETS && r->nchans < r->nbuckets / 8)
        rehash(r, r->nbuckets / 2);
}

int hub_chan_unsubscribe(struct hub_chan_registry *r, struct hub_sub **list,
                         const char *name, size_t len)
{
    struct hub_chan *c = hub_chan_find(r, name, len);
    if (!c)
        return -1;
    for (struct hub_sub **pp = list; *pp; pp = &(*pp)->next) {
        if ((*pp)->chan == c) {
            struct hub_sub *s = *pp;
            *pp = s->next;
            drop_sub(r, s);
            return 0;
        }
    }
    return -1;
}

void hub_chan_unsubscribe_all(struct hub_chan_registry *r, struct hub_sub **list)
{
    struct hub_sub *s = *list, *next;
    *list = NULL;
    for (; s; s = next) {
        next = s->next;
        drop_sub(r, s);
    }
}

unsigned hub_chan_count(const struct hub_sub *list)
{
    unsigned n = 0;
    for (; list; list = list->next)
        n++;
    return n;
}
