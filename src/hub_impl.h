/* Private to the hub core (hub.c: clients, channels, publish, fan-out;
 * hub_stream.c: history order, recovery and repair, presence). Not a
 * public contract. */
#ifndef LUAHUB_HUB_IMPL_H
#define LUAHUB_HUB_IMPL_H

#include "luahub/hub.h"
#include "luahub/proto.h"

/* What the hub knows of a channel with options (chan->ext). Channels
 * without options point at hub_plain_ext, so options are looked up once per
 * channel, not per publish. */
struct hub_chan_ext {
    const struct hub_channel_opts *o;   /* NULL: a plain channel */
    /* history: the last offset the subscribers were given, of `epoch` */
    uint64_t top;
    char epoch[HUB_EPOCH_MAX + 1];      /* "": not known yet */
    uint32_t reading;                   /* a catch-up read is in flight: its number */
    uint64_t gen;                       /* h->read_seq when it was made */
    uint64_t arrival;                   /* h->read_seq at the last delivery that came */
    struct hub_msg **held;              /* deliveries that arrived meanwhile */
    uint32_t nheld, capheld;
};

extern struct hub_chan_ext hub_plain_ext;

/* A subscription whose subscribe is in flight on a channel with options:
 * broker SUBSCRIBE, then (history) the read of the stream. Its sub->hold
 * is its slot + 1 while the sub's deliveries wait in `held`. */
struct hub_recovery {
    struct hub *h;
    struct hub_client *c;               /* NULL once cancelled */
    struct hub_sub *sub;
    uint32_t slot;                      /* in h->recov, + 1; 0: none */
    uint64_t client_id;
    struct hub_sub_req req;
    hub_subscribe_cb cb;                /* NULL once called */
    void *ud;
    struct hub_msg **held;
    uint32_t nheld, capheld;
    size_t held_bytes;
    struct hub_recovery *read_next;     /* the other waiters of its shared read */
    uint64_t seq;                       /* h->read_seq when its hold began */
    uint64_t arrival;                   /* the channel's `arrival` then */
    size_t len;
    char channel[HUB_CHANNEL_MAX + 1];
};

/* The extension of channel `ch`, computed on first use. */
struct hub_chan_ext *hub_chan_ext_of(struct hub *h, struct hub_chan *ch);
void hub_chan_ext_free(struct hub_chan_ext *x);

/* Queues `m` to every subscriber of `ch` (held ones keep it for later);
 * culls wait for hub_cull_now(). */
void hub_fan_out(struct hub *h, struct hub_chan *ch, struct hub_msg *m);

/* hub_stream.c */
int hub_stream_subscribe(struct hub *h, struct hub_client *c, struct hub_sub *s,
                         struct hub_chan_ext *x, const struct hub_sub_req *req,
                         hub_subscribe_cb cb, void *ud);
/* The subscription is going away: its recovery (if any) is cancelled (its
 * callback gets HUB_ECANCELED now). */
void hub_stream_cancel(struct hub *h, struct hub_sub *s);
/* After the client has left `channel` (a presence channel with options
 * `o`): its entry goes (and a leave event may be delivered, so the client
 * must no longer be subscribed). */
void hub_stream_presence_remove(struct hub *h, struct hub_client *c,
                                const struct hub_channel_opts *o, const char *channel,
                                size_t len);
void hub_stream_hold(struct hub *h, struct hub_sub *s, struct hub_msg *m);
void hub_stream_deliver(struct hub *h, struct hub_chan *ch, struct hub_chan_ext *x,
                        struct hub_msg *m, const char *epoch);
void hub_stream_catch_up(struct hub *h, struct hub_chan *ch, struct hub_chan_ext *x);

#endif
