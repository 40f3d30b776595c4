/* History and presence in the hub core (include/luahub/hub.h).
 *
 * Subscribe on a channel with options: the broker SUBSCRIBE first, then
 * (history) the read of the stream, while the new subscription's live
 * deliveries wait in its recovery record (sub->hold). When the read is
 * back the reply goes out (the callback), then the messages it found
 * (recover, rewind), then the held live ones with a higher offset: no gap
 * and no duplicate at the seam. The missed messages are the very frames the
 * stream keeps: nothing is encoded again.
 *
 * Live order: per history channel the hub remembers the last offset its
 * subscribers were given. A delivery at or below it is a duplicate and is
 * dropped; one beyond the next is a gap (a pub/sub message lost, a
 * reconnect): the hub holds it and reads the stream from its offset on
 * (a catch-up), delivers what was missing, then what it held. When the
 * stream cannot give it all (trimmed, another epoch, more than
 * recover_max), the subscribers get {"op":"reset",...} naming where the
 * deliveries go on, and reload their state. No one is disconnected. */
#include "hub_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Deliveries a channel holds during a catch-up before it gives up and
 * resets: they are in memory with nowhere to go. */
#define CATCH_UP_HOLD_MAX 10000

static void held_push(struct hub_msg ***v, uint32_t *n, uint32_t *cap, struct hub_msg *m)
{
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 8;
        *v = hub_xrealloc(*v, *cap * sizeof(**v));
    }
    (*v)[(*n)++] = hub_msg_ref(m);
}

static void held_drop(struct hub_msg **v, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        hub_msg_unref(v[i]);
    free(v);
}

/* ---- recovery records ------------------------------------------------ */

static uint32_t slot_take(struct hub *h, struct hub_recovery *r)
{
    if (h->free_recov) {                /* a free slot: its index + 1 */
        uint32_t i = h->free_recov - 1;
        h->free_recov = (uint32_t)(uintptr_t)h->recov[i];
        h->recov[i] = r;
        return i + 1;
    }
    if ((h->nrecov & (h->nrecov - 1)) == 0)
        h->recov = hub_xrealloc(h->recov, (h->nrecov ? h->nrecov * 2 : 4) * sizeof(*h->recov));
    h->recov[h->nrecov++] = r;
    return h->nrecov;
}

/* Free slots hold the next free one (+ 1) in place of a pointer. */
static void slot_give(struct hub *h, uint32_t slot)
{
    h->recov[slot - 1] = (struct hub_recovery *)(uintptr_t)h->free_recov;
    h->free_recov = slot;
}

/* Stops holding: the sub's deliveries go straight to the client again. */
static void unhold(struct hub_recovery *r)
{
    if (!r->slot)
        return;
    if (r->sub)
        r->sub->hold = 0;
    slot_give(r->h, r->slot);
    r->slot = 0;
}

static void recovery_free(struct hub_recovery *r)
{
    unhold(r);
    held_drop(r->held, r->nheld);
    free(r);
}

static void finish_cb(struct hub_recovery *r, const struct hub_sub_result *res)
{
    hub_subscribe_cb cb = r->cb;
    r->cb = NULL;
    if (cb)
        cb(r->ud, res);
}

void hub_stream_hold(struct hub *h, struct hub_sub *s, struct hub_msg *m)
{
    struct hub_recovery *r = h->recov[s->hold - 1];
    r->held_bytes += m->frame_len;
    if (r->held_bytes > h->cfg->max_queue_bytes) {
        /* As with a full queue: the client is too far behind. */
        hub_cull(h, r->c);
        return;
    }
    held_push(&r->held, &r->nheld, &r->capheld, m);
}

/* ---- presence ---------------------------------------------------------- */

static void presence_add(struct hub *h, struct hub_client *c, struct hub_chan *ch,
                         const struct hub_channel_opts *o)
{
    char name[64];
    const char *user, *entry;
    size_t ul, el;
    hub_client_name(h, c->id, name, sizeof(name));
    c->ops->presence(c, &user, &ul, &entry, &el);
    h->broker->ops->presence_add(h->broker, ch->name, ch->name_len, o, name, user, ul, entry,
                                 el);
}

void hub_stream_cancel(struct hub *h, struct hub_sub *s)
{
    if (s->hold) {
        struct hub_recovery *r = h->recov[s->hold - 1];
        unhold(r);
        r->sub = NULL;
        r->c = NULL;
        held_drop(r->held, r->nheld);
        r->held = NULL;
        r->nheld = r->capheld = 0;
        /* Freed when the broker's answer comes; the caller hears now. */
        struct hub_sub_result res = {.status = HUB_ECANCELED};
        finish_cb(r, &res);
    }
}

void hub_stream_presence_remove(struct hub *h, struct hub_client *c,
                                const struct hub_channel_opts *o, const char *channel,
                                size_t len)
{
    char name[64];
    hub_client_name(h, c->id, name, sizeof(name));
    h->broker->ops->presence_remove(h->broker, channel, len, o, name);
}

/* ---- subscribe --------------------------------------------------------------- */

/* The record is complete: reply, deliver what it found and what it held,
 * add the presence entry. `msgs` ascending. */
static void recovery_done(struct hub_recovery *r, const struct hub_sub_result *res,
                          struct hub_msg *const *msgs, size_t n)
{
    struct hub *h = r->h;
    struct hub_client *c = r->c;
    struct hub_sub *s = r->sub;
    struct hub_msg **held = r->held;
    uint32_t nheld = r->nheld;

    r->held = NULL;
    r->nheld = r->capheld = 0;
    unhold(r);
    finish_cb(r, res);
    /* The callback may have unsubscribed (a failed subscribe). */
    if (res->status == HUB_OK && c && hub_client_by_id(h, r->client_id) == c &&
        hub_chan_in_list(&h->chans, c->subs, r->channel, r->len)) {
        uint64_t last = res->pos.offset;
        for (size_t i = 0; i < n; i++)
            if (c->culling || c->ops->deliver(c, msgs[i]) < 0)
                hub_cull(h, c);
        h->deliveries += n;
        for (uint32_t i = 0; i < nheld; i++) {
            /* Live ones already in what was read (or, unrecovered, in the
             * state the client reloads) are not given twice. */
            if (res->history && held[i]->offset && held[i]->offset <= last)
                continue;
            if (c->culling || c->ops->deliver(c, held[i]) < 0)
                hub_cull(h, c);
            h->deliveries++;
        }
        struct hub_chan *ch = s->chan;
        struct hub_chan_ext *x = ch->ext;
        if (x->o->history_size && !x->epoch[0]) {
            /* The channel's first subscriber: the position to keep order from. */
            x->top = res->pos.offset;
            memcpy(x->epoch, res->pos.epoch, sizeof(x->epoch));
        }
        if (x->o->presence)
            presence_add(h, c, ch, x->o);
    }
    held_drop(held, nheld);
    hub_cull_now(h);
}

static void on_read(void *ud, int status, const struct hub_history_result *hr)
{
    struct hub_recovery *r = ud;
    struct hub_sub_result res = {.status = status, .history = 1};

    if (!r->c) {                        /* cancelled meanwhile */
        recovery_free(r);
        return;
    }
    if (status != HUB_OK) {
        res.history = 0;
        recovery_done(r, &res, NULL, 0);
        recovery_free(r);
        return;
    }
    res.pos = hr->top;
    struct hub_msg *const *msgs = hr->msgs;
    size_t n = hr->n;
    struct hub_msg **rev = NULL;
    /* What is replayed must fit the client's queue with room to spare:
     * more would cull it (4001), and it would come back for the same. */
    size_t room = r->h->cfg->max_queue_bytes / 2, bytes = 0, fit = 0;
    while (fit < n && (bytes += msgs[fit]->frame_len) <= room)
        fit++;
    if (r->req.mode == HUB_SUB_RECOVER) {
        uint64_t since = r->req.offset, top = hr->top.offset;
        res.recover = 1;
        res.recovered = r->req.epoch[0] && !strcmp(r->req.epoch, hr->top.epoch) &&
                        since <= top && top - since <= r->h->cfg->recover_max &&
                        hr->oldest <= since + 1 && n == top - since && fit == n;
        if (res.recovered)
            r->h->recovered++;
        else
            r->h->unrecovered++, n = 0;
    } else if (r->req.mode == HUB_SUB_REWIND && n) {
        n = fit;                        /* the newest that fit */
        rev = hub_xmalloc(n * sizeof(*rev));   /* read newest first */
        for (size_t i = 0; i < n; i++)
            rev[i] = msgs[n - 1 - i];
        msgs = rev;
    }
    res.missed = (uint32_t)n;
    recovery_done(r, &res, msgs, n);
    free(rev);
    recovery_free(r);
}

static void on_subscribed(void *ud, int status)
{
    struct hub_recovery *r = ud;
    if (!r->c) {
        recovery_free(r);
        return;
    }
    struct hub_chan_ext *x = r->sub->chan->ext;
    if (status != HUB_OK || !x->o->history_size) {
        struct hub_sub_result res = {.status = status};
        recovery_done(r, &res, NULL, 0);
        recovery_free(r);
        return;
    }
    struct hub_history_query q = {0};
    uint32_t max = r->h->cfg->recover_max;
    if (r->req.mode == HUB_SUB_RECOVER) {
        q.since = r->req.offset;
        q.limit = max;
    } else if (r->req.mode == HUB_SUB_REWIND) {
        q.limit = r->req.rewind < max ? r->req.rewind : max;
        q.reverse = 1;
    }
    struct hub_broker *b = r->h->broker;
    if (b->ops->history(b, r->channel, r->len, x->o, &q, on_read, r) < 0) {
        struct hub_sub_result res = {.status = HUB_EUNAVAILABLE};
        recovery_done(r, &res, NULL, 0);
        recovery_free(r);
    }
}

int hub_stream_subscribe(struct hub *h, struct hub_client *c, struct hub_sub *s,
                         struct hub_chan_ext *x, const struct hub_sub_req *req,
                         hub_subscribe_cb cb, void *ud)
{
    struct hub_recovery *r = hub_xcalloc(1, sizeof(*r));
    r->h = h;
    r->c = c;
    r->sub = s;
    r->client_id = c->id;
    if (req)
        r->req = *req;
    r->cb = cb;
    r->ud = ud;
    r->len = s->chan->name_len;
    memcpy(r->channel, s->chan->name, r->len + 1);
    if (x->o->history_size) {
        r->slot = slot_take(h, r);
        s->hold = r->slot;
    }
    h->broker->ops->subscribe(h->broker, r->channel, r->len, on_subscribed, r);
    return 1;
}

/* ---- live order ------------------------------------------------------------ */

/* Tells the subscribers of `ch` that deliveries go on after `offset` of
 * `epoch` and that what came before cannot be given. */
static void send_reset(struct hub *h, struct hub_chan *ch, uint64_t offset, const char *epoch)
{
    struct hub_buf f = {0};
    hub_buf_appends(&f, "{\"op\":\"reset\",\"channel\":\"");
    hub_buf_append(&f, ch->name, ch->name_len);
    hub_buf_printf(&f, "\",\"offset\":%llu,\"epoch\":", (unsigned long long)offset);
    hub_buf_append_json_string(&f, epoch, strlen(epoch));
    hub_buf_appends(&f, "}");
    struct hub_msg *m = hub_msg_text(f.p, f.len);
    hub_buf_free(&f);
    hub_fan_out(h, ch, m);
    hub_msg_unref(m);
    h->resets++;
}

/* Takes the deliveries the channel held (the caller drops them). */
static struct hub_msg **take_held(struct hub_chan_ext *x, uint32_t *n)
{
    struct hub_msg **held = x->held;
    *n = x->nheld;
    x->held = NULL;
    x->nheld = x->capheld = 0;
    return held;
}

/* Stops waiting for a catch-up (its answer will be ignored): the
 * subscribers go on from the first held delivery (a reset says so) and get
 * the held ones in order. */
static void release_held(struct hub *h, struct hub_chan *ch, struct hub_chan_ext *x)
{
    uint32_t n;
    struct hub_msg **held = take_held(x, &n);
    x->reading = 0;
    if (n) {
        send_reset(h, ch, held[0]->offset - 1, x->epoch);
        x->top = held[0]->offset - 1;
    }
    for (uint32_t i = 0; i < n; i++)
        hub_stream_deliver(h, ch, x, held[i], x->epoch);
    held_drop(held, n);
}

void hub_stream_deliver(struct hub *h, struct hub_chan *ch, struct hub_chan_ext *x,
                        struct hub_msg *m, const char *epoch)
{
    if (x->reading) {
        if (x->nheld < CATCH_UP_HOLD_MAX) {
            held_push(&x->held, &x->nheld, &x->capheld, m);
            return;
        }
        release_held(h, ch, x);         /* too much is waiting: go on from here */
        hub_stream_deliver(h, ch, x, m, epoch);   /* may be held again */
        return;
    }
    if (!x->epoch[0]) {                 /* nothing known yet: start here */
        snprintf(x->epoch, sizeof(x->epoch), "%s", epoch);
        x->top = m->offset;
        hub_fan_out(h, ch, m);
        return;
    }
    if (strcmp(epoch, x->epoch)) {      /* the stream was lost and began again */
        snprintf(x->epoch, sizeof(x->epoch), "%s", epoch);
        send_reset(h, ch, m->offset - 1, x->epoch);
        x->top = m->offset;
        hub_fan_out(h, ch, m);
        return;
    }
    if (m->offset <= x->top)            /* had it (a catch-up read it first) */
        return;
    if (m->offset == x->top + 1) {
        x->top = m->offset;
        hub_fan_out(h, ch, m);
        return;
    }
    held_push(&x->held, &x->nheld, &x->capheld, m);  /* a gap: read it first */
    hub_stream_catch_up(h, ch, x);
}

struct catch_up {
    struct hub *h;
    uint32_t n;                         /* x->reading when it was sent */
    size_t len;
    char channel[HUB_CHANNEL_MAX + 1];
};

static void on_catch_up(void *ud, int status, const struct hub_history_result *hr)
{
    struct catch_up *op = ud;
    struct hub *h = op->h;
    struct hub_chan *ch = hub_chan_find(&h->chans, op->channel, op->len);
    struct hub_chan_ext *x = ch ? ch->ext : NULL;

    if (!x || x == &hub_plain_ext || x->reading != op->n) {
        free(op);                       /* the channel went, or gave up on it */
        return;
    }
    x->reading = 0;
    uint32_t nheld;
    struct hub_msg **held = take_held(x, &nheld);

    if (status == HUB_OK) {
        /* Deliver what is contiguous from top on, in this epoch. */
        size_t i = 0;
        if (!strcmp(hr->top.epoch, x->epoch))
            for (; i < hr->n && hr->msgs[i]->offset == x->top + 1; i++) {
                x->top++;
                hub_fan_out(h, ch, hr->msgs[i]);
            }
        if (i > 0)
            h->repairs++;
        if (strcmp(hr->top.epoch, x->epoch) || x->top < hr->top.offset) {
            /* Not all of it: the subscribers go on from the stream's top
             * (or from the first held delivery, if it is further). */
            uint64_t on = hr->top.offset;
            snprintf(x->epoch, sizeof(x->epoch), "%s", hr->top.epoch);
            send_reset(h, ch, on, x->epoch);
            x->top = on;
        }
    } else if (nheld) {
        /* The stream cannot be read: go on from the first held one. */
        send_reset(h, ch, held[0]->offset - 1, x->epoch);
        x->top = held[0]->offset - 1;
    }
    for (uint32_t i = 0; i < nheld; i++) {
        /* The held ones carry their stream's epoch in the ext's terms: a
         * catch-up never crosses epochs, so they continue `x->epoch`. */
        if (!x->reading)
            hub_stream_deliver(h, ch, x, held[i], x->epoch);
        else
            held_push(&x->held, &x->nheld, &x->capheld, held[i]);
    }
    held_drop(held, nheld);
    free(op);
    hub_cull_now(h);
}

void hub_stream_catch_up(struct hub *h, struct hub_chan *ch, struct hub_chan_ext *x)
{
    static uint32_t reads;
    struct catch_up *op = hub_xmalloc(sizeof(*op));
    op->h = h;
    op->n = ++reads ? reads : ++reads;
    op->len = ch->name_len;
    memcpy(op->channel, ch->name, op->len + 1);
    x->reading = op->n;
    struct hub_history_query q = {.since = x->top, .limit = h->cfg->recover_max};
    if (h->broker->ops->history(h->broker, op->channel, op->len, x->o, &q, on_catch_up,
                                op) < 0) {
        free(op);
        release_held(h, ch, x);         /* unavailable: go on from the first held one */
    }
}
