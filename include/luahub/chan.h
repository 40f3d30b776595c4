/* Channel registry: channel name -> subscribers, and subscriber -> channels.
 * A channel exists while it has at least one subscriber. Pure: subscribers
 * are opaque owner pointers; the registry never calls into them except
 * through the first/last callbacks (used to notify the broker). */
#ifndef LUAHUB_CHAN_H
#define LUAHUB_CHAN_H

#include <stddef.h>
#include <stdint.h>

struct hub_chan;

/* One subscription: an owner in one channel. Owned by the registry. */
struct hub_sub {
    struct hub_chan *chan;
    void *owner;
    struct hub_sub *next;   /* the owner's next subscription */
    uint32_t idx;           /* position in chan->subs */
};

struct hub_chan {
    struct hub_chan *next;  /* hash bucket chain */
    uint32_t hash;
    uint32_t nsubs;
    uint32_t cap;
    uint32_t name_len;
    struct hub_sub **subs;  /* nsubs entries, in no particular order */
    char name[];            /* NUL-terminated */
};

/* Called when a channel gets its first subscriber / loses its last one (the
 * channel is freed right after on_last returns). Either may be NULL. */
typedef void (*hub_chan_event_cb)(void *ud, const char *name, size_t len);

struct hub_chan_registry {
    struct hub_chan **buckets;
    uint32_t nbuckets;      /* a power of two */
    uint32_t nchans;
    uint64_t nsubs;         /* subscriptions over all channels */
    hub_chan_event_cb on_first;
    hub_chan_event_cb on_last;
    void *ud;
};

void hub_chan_registry_init(struct hub_chan_registry *r);
/* Frees every channel and subscription (owners' lists become dangling:
 * call only when the owners are gone too). */
void hub_chan_registry_free(struct hub_chan_registry *r);

/* The channel called `name`, or NULL. Borrowed. */
struct hub_chan *hub_chan_find(const struct hub_chan_registry *r,
                               const char *name, size_t len);

/* Subscribes `owner`, whose subscription list head is `*list`. Returns 1 if
 * it was subscribed now, 0 if it already was (nothing changes). */
int hub_chan_subscribe(struct hub_chan_registry *r, struct hub_sub **list,
                       void *owner, const char *name, size_t len);

/* Unsubscribes. Returns 0, or -1 if the owner was not subscribed. */
int hub_chan_unsubscribe(struct hub_chan_registry *r, struct hub_sub **list,
                         const char *name, size_t len);

/* Leaves every channel of the list in one step; `*list` becomes NULL. */
void hub_chan_unsubscribe_all(struct hub_chan_registry *r, struct hub_sub **list);

/* Number of subscriptions in a list. */
unsigned hub_chan_count(const struct hub_sub *list);

#endif
