/* Channel registry (see include/luahub/chan.h).
 *
 * Channels live in the shared hash table keyed by name. Each channel keeps
 * an array of subscription pointers (swap-remove on unsubscribe, so order
 * is not preserved; ordering of *messages* is the fan-out loop's business)
 * and each owner keeps a singly linked list of its subscriptions. Owners
 * have at most max_channels_per_conn subscriptions, so list walks are
 * short. */
#include "luahub/chan.h"

#include <stdlib.h>
#include <string.h>

#include "luahub/util.h"

void hub_chan_registry_init(struct hub_chan_registry *r)
{
    memset(r, 0, sizeof(*r));
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
    struct hub_hnode *n;
    while ((n = hub_htable_pop(&r->chans)))
        free_chan(hub_container_of(n, struct hub_chan, node));
    hub_htable_free(&r->chans);
    r->nsubs = 0;
}

static struct hub_chan *lookup(const struct hub_chan_registry *r, const char *name,
                               size_t len, uint64_t h)
{
    for (struct hub_hnode *n = hub_htable_chain(&r->chans, h); n; n = n->next) {
        struct hub_chan *c = hub_container_of(n, struct hub_chan, node);
        if (n->hash == h && c->name_len == len && memcmp(c->name, name, len) == 0)
            return c;
    }
    return NULL;
}

struct hub_chan *hub_chan_find(const struct hub_chan_registry *r, const char *name,
                               size_t len)
{
    return lookup(r, name, len, hub_hash64(name, len));
}

int hub_chan_in_list(const struct hub_chan_registry *r, const struct hub_sub *list,
                     const char *name, size_t len)
{
    const struct hub_chan *c = hub_chan_find(r, name, len);
    if (!c)
        return 0;
    for (; list; list = list->next)
        if (list->chan == c)
            return 1;
    return 0;
}

int hub_chan_subscribe(struct hub_chan_registry *r, struct hub_sub **list,
                       void *owner, const char *name, size_t len)
{
    uint64_t h = hub_hash64(name, len);
    struct hub_chan *c = lookup(r, name, len, h);

    if (c) {
        for (struct hub_sub *s = *list; s; s = s->next)
            if (s->chan == c)
                return 0;
    } else {
        c = hub_xmalloc(sizeof(*c) + len + 1);
        memset(c, 0, sizeof(*c));
        c->node.hash = h;
        c->name_len = (uint32_t)len;
        memcpy(c->name, name, len);
        c->name[len] = '\0';
        hub_htable_insert(&r->chans, &c->node);
    }

    if (c->nsubs == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 4;
        c->subs = hub_xrealloc(c->subs, sizeof(*c->subs) * c->cap);
    }
    struct hub_sub *s = hub_xmalloc(sizeof(*s));
    s->chan = c;
    s->owner = owner;
    s->idx = c->nsubs;
    s->hold = 0;
    s->next = *list;
    *list = s;
    c->subs[c->nsubs++] = s;
    r->nsubs++;
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
        r->on_last(r->ud, c);
    hub_htable_remove(&r->chans, &c->node);
    free_chan(c);
}

int hub_chan_unsubscribe(struct hub_chan_registry *r, struct hub_sub **list,
                         const char *name, size_t len)
{
    struct hub_chan *c = hub_chan_find(r, name, len);
    if (!c)
        return HUB_ENOTFOUND;
    for (struct hub_sub **pp = list; *pp; pp = &(*pp)->next) {
        if ((*pp)->chan == c) {
            struct hub_sub *s = *pp;
            *pp = s->next;
            drop_sub(r, s);
            return 0;
        }
    }
    return HUB_ENOTFOUND;
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
