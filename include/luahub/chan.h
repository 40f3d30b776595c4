/* Channel registry: channel name -> subscribers, and subscriber -> channels.
 * A channel exists while it has at least one subscriber. Pure: subscribers
 * are opaque owner pointers that the registry never calls into; the owner
 * of the registry (hub.c) hears of a channel losing its last subscriber
 * through `on_last`. Loop thread only; nothing here does I/O.
 *
 * Ownership: the registry allocates and frees the channels and the
 * subscription nodes (struct hub_sub); a subscriber's list head belongs to
 * the subscriber, which must unsubscribe_all before it goes away. Names
 * are copied. */
#ifndef LUAHUB_CHAN_H
#define LUAHUB_CHAN_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/error.h"
#include "luahub/hash.h"

struct hub_chan;

/* One subscription: an owner in one channel. Owned by the registry. */
struct hub_sub {
    struct hub_chan *chan;
    void *owner;
    struct hub_sub *next;   /* the owner's next subscription */
    uint32_t idx;           /* position in chan->subs */
    uint32_t hold;          /* the owner's: hub.c marks a subscription whose
                             * deliveries wait (0: none) */
};

struct hub_chan {
    struct hub_hnode node;  /* in the registry, hash of the name */
    uint32_t nsubs;
    uint32_t cap;
    uint32_t name_len;
    struct hub_sub **subs;  /* nsubs entries, in no particular order */
    void *ext;              /* the owner's data about the channel (NULL: none);
                             * the registry never touches it */
    char name[];            /* NUL-terminated */
};

/* Called when a channel loses its last subscriber; the channel is freed
 * right after it returns (free c->ext here). It must not call back into
 * the registry. */
typedef void (*hub_chan_event_cb)(void *ud, struct hub_chan *c);

struct hub_chan_registry {
    struct hub_htable chans;
    uint64_t nsubs;         /* subscriptions over all channels */
    hub_chan_event_cb on_last;  /* may be NULL */
    void *ud;
};

/* Zeroes `r`; set on_last and ud afterwards if needed. */
void hub_chan_registry_init(struct hub_chan_registry *r);
/* Frees every channel and subscription (owners' lists become dangling:
 * call only when the owners are gone too). on_last is not called. */
void hub_chan_registry_free(struct hub_chan_registry *r);

/* The channel called `name`, or NULL. Borrowed. */
struct hub_chan *hub_chan_find(const struct hub_chan_registry *r,
                               const char *name, size_t len);

/* Channels with at least one subscriber. */
static inline size_t hub_chan_count_channels(const struct hub_chan_registry *r)
{
    return r->chans.n;
}

/* Subscribes `owner`, whose subscription list head is `*list`. Returns 1 if
 * it was subscribed now, 0 if it already was (nothing changes). */
int hub_chan_subscribe(struct hub_chan_registry *r, struct hub_sub **list,
                       void *owner, const char *name, size_t len);

/* Unsubscribes. Returns 0, or HUB_ENOTFOUND if the owner was not subscribed. */
int hub_chan_unsubscribe(struct hub_chan_registry *r, struct hub_sub **list,
                         const char *name, size_t len);

/* Leaves every channel of the list in one step; `*list` becomes NULL. */
void hub_chan_unsubscribe_all(struct hub_chan_registry *r, struct hub_sub **list);

/* 1 if the list holds a subscription to `name`. */
int hub_chan_in_list(const struct hub_chan_registry *r, const struct hub_sub *list,
                     const char *name, size_t len);

/* Number of subscriptions in a list. */
unsigned hub_chan_count(const struct hub_sub *list);

#endif
