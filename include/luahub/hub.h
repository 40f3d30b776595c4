/* The hub core: publish (the delivery frame encoded once, handed to the
 * broker), fan-out of what the broker delivers to the local subscribers,
 * the channel registry, whose subscriptions drive the broker's (a
 * subscribe for each new subscription, an unsubscribe when a channel
 * loses its last subscriber: one path, here), and the client-id table.
 *
 * Transport-free: a client is anything that embeds struct hub_client and
 * can take a delivery (a WebSocket session; a test's fake sink). No lws,
 * no Lua, no sockets; the loop is the broker's business. Loop thread only.
 *
 * History and presence (channels the conf's `channels` names; see
 * broker.h): the hub gives each subscriber of a history channel its
 * messages in offset order, with no gap and no duplicate: a subscribe reads
 * the stream (the reply carries its position; with recover or rewind the
 * messages missed follow it) while the subscription's live deliveries wait;
 * a gap in what the broker delivers (a lost pub/sub message, a
 * reconnect) is repaired from the stream, and only when it cannot be, the
 * channel's subscribers get {"op":"reset",...}. Presence entries follow
 * the subscriptions.
 *
 * Ownership: the hub borrows its clients (the embedder frees them after
 * hub_client_remove), the broker (the embedder stops and frees it after
 * the hub) and the config. A delivery frame handed to a client is
 * borrowed: the client takes a reference to keep it. */
#ifndef LUAHUB_HUB_H
#define LUAHUB_HUB_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/broker.h"
#include "luahub/chan.h"
#include "luahub/config.h"
#include "luahub/hash.h"
#include "luahub/msg.h"

struct hub_client;

struct hub_client_ops {
    /* Queue `m` (borrowed) for the client. Returns 0, or -1 when the client
     * cannot take it (its queue is over its bound): the hub then culls the
     * client once the fan-out loop is over. Must not call into the hub. */
    int (*deliver)(struct hub_client *c, struct hub_msg *m);
    /* The hub culled the client: it has left every channel; the transport
     * closes it (4001). May call into the hub. */
    void (*culled)(struct hub_client *c);
    /* Presence: the client's user (NULL: anonymous) and its entry,
     * "client":"<name>"[,"user":U][,"info":I] (see broker.h); borrowed
     * until the client changes them or goes. Must not call into the hub. */
    void (*presence)(struct hub_client *c, const char **user, size_t *user_len,
                     const char **entry, size_t *entry_len);
};

/* Embed in the client. The fields are the hub's: read them through the
 * functions below. */
struct hub_client {
    const struct hub_client_ops *ops;
    struct hub_hnode node;          /* the id table; node.hash of the id */
    uint64_t id;
    struct hub_sub *subs;           /* its subscriptions */
    uint32_t nsubs;
    uint32_t culling;               /* on the cull list */
    struct hub_client *cull_next;
};

struct hub_recovery;

struct hub {
    struct hub_broker *broker;      /* borrowed */
    const struct hub_config *cfg;   /* borrowed: channel options, limits */
    struct hub_chan_registry chans;
    struct hub_htable clients;      /* id -> client */
    struct hub_client *culls;       /* clients to cull after a fan-out */
    uint32_t max_channels;          /* subscriptions per client */
    uint64_t next_id;
    char instance[17];              /* this process's id, in client names */
    struct hub_recovery **recov;    /* subscriptions reading their stream; */
    uint32_t nrecov, free_recov;    /* sub->hold is an index + 1 */
    struct hub_htable reads;        /* stream reads in flight, shared by equal asks */
    uint64_t reads_shared;          /* recoveries that rode on another's read */
    uint64_t read_seq;              /* orders hold starts and shared reads */
    uint64_t published;             /* messages handed to the broker (per channel) */
    uint64_t deliveries;            /* frames queued to subscribers */
    uint64_t culled;                /* clients culled */
    uint64_t recovered, unrecovered; /* subscribes with recover, by result */
    uint64_t repairs, resets;       /* gaps repaired from the stream; resets sent */
};

/* Sets up `h` over `broker` (borrowed; created with hub_deliver and `h` as
 * its deliver callback). `instance` (copied, at most 16 bytes) names this
 * process in client names; `cfg` (borrowed) gives the channel options,
 * max_channels_per_conn and recover_max. */
void hub_init(struct hub *h, struct hub_broker *broker, const char *instance,
              const struct hub_config *cfg);

/* Frees the channel registry and the id table. Clients must be gone. */
void hub_free(struct hub *h);

/* The broker's deliver callback (`ud` is the hub): fans `m` out to the
 * local subscribers of `channel`, then culls the clients that could not
 * take it. A channel without local subscribers costs a lookup. On a
 * history channel (`epoch` set) it keeps offset order: duplicates are
 * dropped, a gap is repaired first. */
void hub_deliver(void *ud, const char *channel, size_t len, struct hub_msg *m,
                 const char *epoch);

/* The broker's health changed: when it is back up, every history channel
 * with local subscribers is read from where its subscribers are, so what
 * was published while it was down reaches them (or they get a reset). */
void hub_broker_health(struct hub *h, int up);

/* A new id for a client (process-unique, from 1). */
uint64_t hub_next_id(struct hub *h);

/* Adds a client (borrowed until hub_client_remove) with its id. */
void hub_client_add(struct hub *h, struct hub_client *c, const struct hub_client_ops *ops,
                    uint64_t id);

/* Removes a client: it leaves every channel (a channel left empty is
 * unsubscribed from the broker), the id table and the cull list. */
void hub_client_remove(struct hub *h, struct hub_client *c);

/* The client with this id, or NULL. */
struct hub_client *hub_client_by_id(const struct hub *h, uint64_t id);

/* The client named `name` ("<instance>-<id>", as hub_client_name writes
 * it), or NULL: clients of other processes are not here. */
struct hub_client *hub_client_by_name(const struct hub *h, const char *name);

/* Writes "<instance>-<id>" into out[0..n). */
void hub_client_name(const struct hub *h, uint64_t id, char *out, size_t n);

/* What a subscribe asks of a history channel. */
enum hub_sub_mode { HUB_SUB_PLAIN, HUB_SUB_RECOVER, HUB_SUB_REWIND };
struct hub_sub_req {
    enum hub_sub_mode mode;
    uint64_t offset;                /* RECOVER: the last offset the client has */
    char epoch[HUB_EPOCH_MAX + 1];  /* RECOVER: its epoch ("" never matches) */
    uint32_t rewind;                /* REWIND: the last this many messages */
};

/* The outcome of a subscribe, for the reply. */
struct hub_sub_result {
    int status;                     /* HUB_OK; HUB_EUNAVAILABLE; HUB_ECANCELED
                                     * (unsubscribed before it completed) */
    int history;                    /* a history channel: `pos` is set */
    struct hub_stream_pos pos;      /* where the stream was when read */
    int recover;                    /* the request was RECOVER ... */
    int recovered;                  /* ... and every missed message follows */
    uint32_t missed;                /* messages delivered right after the reply */
};
typedef void (*hub_subscribe_cb)(void *ud, const struct hub_sub_result *r);

/* Subscribes `c` to `channel` (valid name, borrowed). `req` (may be NULL:
 * plain) is read on history channels only. Returns 1 when subscribed now:
 * `cb` (may be NULL) fires exactly once, possibly before this returns,
 * when delivery is guaranteed (and on a history channel the stream was
 * read); right after it returns the missed messages (recover, rewind) are
 * delivered, then the live ones held meanwhile. Returns 0 when it already
 * was (no callback); HUB_ELIMIT when it is at max_channels (no callback).
 * On a presence channel the client's entry is added once it is
 * subscribed. */
int hub_subscribe(struct hub *h, struct hub_client *c, const char *channel, size_t len,
                  const struct hub_sub_req *req, hub_subscribe_cb cb, void *ud);

/* Unsubscribes. Returns 0, or HUB_ENOTFOUND if `c` was not subscribed. */
int hub_unsubscribe(struct hub *h, struct hub_client *c, const char *channel, size_t len);

/* 1 if `c` is subscribed to `channel`. */
int hub_subscribed(const struct hub *h, const struct hub_client *c, const char *channel,
                   size_t len);

/* Local subscribers of `channel`. */
size_t hub_subscribers(const struct hub *h, const char *channel, size_t len);

/* Publishes `data` (valid JSON, borrowed) to `channel` (valid name): the
 * delivery frame is encoded once and handed to the broker (on a history
 * channel the broker gives it its offset; `cb` gets the position). Returns
 * 0 and calls `cb` (may be NULL) exactly once, or a negative broker status
 * without calling it (the broker is unavailable). */
int hub_publish(struct hub *h, const char *channel, size_t len, const char *data,
                size_t data_len, hub_broker_publish_cb cb, void *ud);

/* Reads the stream of history channel `channel`. Returns 0 and calls `cb`
 * exactly once (see hub_broker_history_cb), HUB_ENOTAVAIL when the channel
 * has no history (no callback), or HUB_EUNAVAILABLE (no callback). */
int hub_history(struct hub *h, const char *channel, size_t len,
                const struct hub_history_query *q, hub_broker_history_cb cb, void *ud);

/* Who is in presence channel `channel` (max 0: the counts only). Returns 0
 * and calls `cb` exactly once, HUB_ENOTAVAIL when the channel has no
 * presence, or HUB_EUNAVAILABLE. */
int hub_presence(struct hub *h, const char *channel, size_t len, uint32_t max,
                 hub_broker_presence_cb cb, void *ud);

/* This process's clients in `channel` and the distinct users among them
 * (anonymous clients are not users). */
void hub_presence_local(struct hub *h, const char *channel, size_t len, uint64_t *clients,
                        uint64_t *users);

/* Where this hub's subscribers of history channel `channel` are (the last
 * offset they were given, and its epoch): 1 with *pos set, 0 when the
 * channel has no history or no position is known yet. */
int hub_position(const struct hub *h, const char *channel, size_t len,
                 struct hub_stream_pos *pos);

/* The options of `channel` (NULL: a plain channel). */
const struct hub_channel_opts *hub_channel_opts(const struct hub *h, const char *channel,
                                                size_t len);

/* Puts `c` on the cull list (a reply it could not take); hub_cull_now()
 * culls it. Idempotent. */
void hub_cull(struct hub *h, struct hub_client *c);

/* Culls the clients on the cull list: each leaves every channel, then its
 * ops->culled runs. Called after every fan-out loop (hub_deliver does). */
void hub_cull_now(struct hub *h);

/* Gauges. */
static inline size_t hub_clients(const struct hub *h)
{
    return h->clients.n;
}
static inline size_t hub_channels(const struct hub *h)
{
    return hub_chan_count_channels(&h->chans);
}
static inline uint64_t hub_subscriptions(const struct hub *h)
{
    return h->chans.nsubs;
}

#endif
