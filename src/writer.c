/* The write path and keepalive of WebSocket connections; the rule and why
 * are in include/luahub/writer.h and docs/internals.md, "Write path". */
#include "luahub/writer.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <libwebsockets.h>

#include "luahub/log.h"

#define WRITE_IOV_MAX 128           /* frames per sendmsg() */
#define WRITE_BYTES_MAX (256 * 1024) /* bytes per sendmsg() */
#define WRITE_ROUNDS_MAX 4          /* sendmsg() calls per WRITEABLE */
#define CLOSE_BACKSTOP_S 5          /* a peer that never reads is hung up */
#define KEEPALIVE_MS 1000

/* ---- queueing ------------------------------------------------------------- */

/* Puts `c` at the tail of the deliveries' FIFO, unless it waits already
 * (then what was queued now goes with it, in its turn). */
static void mark_dirty(struct hub_wconn *c)
{
    if (!(c->flags & HUB_WC_DIRTY)) {
        c->flags |= HUB_WC_DIRTY;
        hub_list_push_tail(&c->w->dirty, &c->flush);
        c->w->ndirty++;
    }
}

/* Replies (and PINGs, close frames) do not wait for a paused flush: a
 * publisher waiting for its acks would stall, and publish less per flush.
 * `c` moves to the urgent FIFO, written first in every iteration. */
static void mark_urgent(struct hub_wconn *c)
{
    if ((c->flags & (HUB_WC_DIRTY | HUB_WC_URGENT)) == HUB_WC_DIRTY) {
        c->flags |= HUB_WC_URGENT;
        c->w->ndirty--;
        hub_list_move_tail(&c->w->urgent, &c->flush);
    }
}

/* Takes `c` off its FIFO. */
static void unmark(struct hub_wconn *c)
{
    if (c->flags & HUB_WC_DIRTY) {
        if (!(c->flags & HUB_WC_URGENT))
            c->w->ndirty--;
        hub_list_remove(&c->flush);
        c->flags &= ~(HUB_WC_DIRTY | HUB_WC_URGENT);
    }
}

int hub_writer_send(struct hub_wconn *c, struct hub_msg *m)
{
    if (c->flags & HUB_WC_CLOSING)
        return 0;
    if (c->q.count && c->q.bytes + m->frame_len > c->w->opt.max_queue_bytes)
        return -1;
    hub_queue_push(&c->q, m);
    mark_dirty(c);
    return 0;
}

int hub_writer_reply(struct hub_wconn *c, struct hub_msg *m)
{
    int r = hub_writer_send(c, m);
    if (r == 0)
        mark_urgent(c);
    return r;
}

void hub_writer_close(struct hub_wconn *c, uint16_t code, const char *reason,
                      int drop_queue)
{
    if (c->flags & HUB_WC_CLOSING)
        return;
    if (drop_queue)
        hub_queue_clear(&c->q);
    struct hub_msg *m = hub_msg_close(code, reason);
    hub_queue_push(&c->q, m);
    hub_msg_unref(m);
    c->flags |= HUB_WC_CLOSING;
    mark_dirty(c);
    mark_urgent(c);
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_OK, CLOSE_BACKSTOP_S);
}

/* lws services its timers only after one of its own events (with its
 * validity timers off, the next may be its 30 s housekeeping), and drops
 * happen from our timers and flushes too: lws_cancel_service() wakes it
 * now, once for all the drops until lws has seen it
 * (LWS_CALLBACK_EVENT_WAIT_CANCELLED, hub_writer_woken). */
void hub_writer_drop(struct hub_wconn *c)
{
    hub_queue_clear(&c->q);
    c->flags |= HUB_WC_CLOSING;
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
    if (!c->w->lws_woken && c->w->ctx) {
        c->w->lws_woken = 1;
        lws_cancel_service(c->w->ctx);
    }
}

void hub_writer_abandon(struct hub_wconn *c)
{
    hub_queue_clear(&c->q);
    c->flags |= HUB_WC_CLOSING;
}

void hub_writer_peer(const struct hub_wconn *c, char *out, size_t n)
{
    out[0] = '\0';
    lws_get_peer_simple(c->wsi, out, n);
}

void hub_writer_woken(struct hub_writer *w)
{
    w->lws_woken = 0;
}

int hub_writer_echo_close(struct hub_wconn *c, const unsigned char *code2)
{
    c->flags |= HUB_WC_CLOSING;
    hub_queue_clear(&c->q); /* nothing may follow the echo of the close */

    /* Echo the close (its status code, RFC 6455 5.5.1) at once and hang
     * up. lws would echo it from a WRITEABLE callback: two epoll_ctl calls
     * and a loop iteration more per connection. lws holds no bytes here
     * (it hangs up itself before this callback when it does); if the
     * socket takes less than the 4 bytes, lws echoes instead. */
    unsigned char frame[4] = {0x88, 0};
    size_t n = 2;
    if (code2) {
        frame[1] = 2;
        frame[2] = code2[0];
        frame[3] = code2[1];
        n = 4;
    }
    ssize_t w = send(lws_get_socket_fd(c->wsi), frame, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w == (ssize_t)n)
        return -1;
    if (w > 0) {
        /* Part of it: lws sends the rest before it hangs up (it flushes
         * what it holds before closing), so the frame stays whole. */
        lws_write(c->wsi, frame + w, n - (size_t)w, LWS_WRITE_RAW);
        return -1;
    }
    return 0; /* nothing written: lws echoes the close and hangs up */
}

/* ---- the socket writer ---------------------------------------------------- */

static void arm(struct hub_wconn *c)
{
    if (!(c->flags & HUB_WC_ARMED)) {
        c->flags |= HUB_WC_ARMED;
        lws_callback_on_writable(c->wsi);
    }
}

/* Writes queued frames until the queue is empty, the socket is full or lws
 * holds buffered bytes. Returns 0, or -1 on a socket error. */
static int write_queued(struct hub_wconn *c)
{
    struct hub_writer *wr = c->w;
    struct lws *wsi = c->wsi;
    struct iovec iov[WRITE_IOV_MAX];
    int fd = lws_get_socket_fd(wsi);

    for (int round = 0; round < WRITE_ROUNDS_MAX && c->q.count; round++) {
        if (lws_partial_buffered(wsi))
            break;

        size_t total = 0;
        int n = 0;
        for (uint32_t i = 0; i < c->q.count && n < WRITE_IOV_MAX; i++) {
            struct hub_msg *m = hub_queue_at(&c->q, i);
            if (n && total + m->frame_len > WRITE_BYTES_MAX)
                break;
            iov[n].iov_base = (void *)hub_msg_frame(m);
            iov[n].iov_len = m->frame_len;
            total += m->frame_len;
            n++;
        }

        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                break;
            hub_log(HUB_LOG_DEBUG, "[conn %llu] write failed: %s",
                    (unsigned long long)c->id, strerror(errno));
            return -1;
        }
        wr->writes++;
        wr->bytes_out += (uint64_t)w;

        size_t left = (size_t)w;
        while (left) {
            struct hub_msg *m = hub_queue_peek(&c->q);
            if (left >= m->frame_len) {
                left -= m->frame_len;
                hub_queue_pop(&c->q);
                continue;
            }
            /* Short write inside a frame: lws takes the rest (copied into
             * its buflist) and sends it before anything else. */
            if (lws_write(wsi, (unsigned char *)hub_msg_frame(m) + left,
                          m->frame_len - left, LWS_WRITE_RAW) < 0)
                return -1;
            hub_queue_pop(&c->q);
            left = 0;
        }
        if ((size_t)w < total)
            break; /* the socket is full */
    }

    if (c->q.count || lws_partial_buffered(wsi))
        arm(c); /* the rest when lws says the socket is writable again */
    else if (c->flags & HUB_WC_CLOSING)
        c->flags |= HUB_WC_CLOSE_SENT; /* now wait for the peer's close */
    return 0;
}

/* The socket takes bytes again (lws wrote what it held first). The write
 * itself waits for the flusher, first in its next slice: when thousands of
 * full sockets drain at once, libuv hands over all their POLLOUT events in
 * one poll phase, and writing them there would be one long pass again
 * (docs/internals.md, "Write path", Slices). */
int hub_writer_writeable(struct hub_wconn *c)
{
    c->flags &= ~HUB_WC_ARMED;
    if (!c->q.count)
        return write_queued(c); /* nothing of ours: only the closing state */
    mark_dirty(c);
    mark_urgent(c);
    return 0;
}

/* Writes what is queued now, from a flush. While WRITEABLE is requested,
 * lws holds bytes or the socket was full: that callback writes, in order. */
static void flush_conn(struct hub_wconn *c)
{
    unmark(c);
    if (c->flags & HUB_WC_ARMED)
        return;
    if (write_queued(c) < 0)
        hub_writer_drop(c); /* the peer is gone */
}

/* ---- flushing and pacing -------------------------------------------------- */

/* Slices. A flush writes connections from the head of a FIFO for at most
 * FLUSH_SLICE_NS, then lets the loop turn (spin keeps its poll from
 * sleeping) and goes on from where it stopped in the next iteration. At
 * ~5 us a write, a 15,000-subscriber delivery is a 75 ms pass: in slices,
 * a PING or a command from another client is read and answered within a
 * slice or two, and connections that became dirty meanwhile join the tail
 * (round-robin: each is written once per pass, with all it gathered). A
 * pass is one round, the connections that waited when it started: one
 * that ran until the FIFO was empty never ended under load, and its
 * frames per connection (the pacing's judge) fell to one or two
 * (docs/internals.md, "Write path"). */
#define FLUSH_SLICE_NS 1000000u
#define FLUSH_CLOCK_EVERY 16        /* connections between two clock reads */

struct pass_count {
    uint64_t frames, conns;
};

/* Writes connections off `list` until it is empty or, with `left`, that
 * many have been written (returns 1), or the deadline has passed (0);
 * counts them into `n` when not NULL. */
static int flush_some(struct hub_list *list, uint64_t deadline, struct pass_count *n,
                      size_t *left)
{
    for (unsigned k = 1;; k++) {
        struct hub_list *it = hub_list_first(list);
        if (!it || (left && !*left))
            return 1;
        struct hub_wconn *c = hub_container_of(it, struct hub_wconn, flush);
        if (n) {
            n->frames += c->q.count;
            n->conns++;
        }
        if (left)
            (*left)--;
        flush_conn(c);
        if (k % FLUSH_CLOCK_EVERY == 0 && uv_hrtime() >= deadline)
            return hub_list_empty(list) || (left && !*left);
    }
}

/* Write pacing. Deliveries are written at the end of the loop iteration
 * that queued them, all of a connection's frames in one write. A write
 * costs ~5 us on loopback and a frame in it ~0.1 us, so under load a short
 * pause before the next flush, while publishes keep arriving, makes each
 * write carry several frames. Hence:
 *  - a pass (one round over the connections that waited when it started,
 *    in slices: see above) whose
 *    writing took FLUSH_BUSY_NS or more starts pausing;
 *  - a paused pass that wrote FLUSH_GATHER_MIN frames or more per
 *    connection paid: the next pause is as long as this pass took (half
 *    the time writing, half gathering), half that if it wrote more than
 *    FLUSH_GATHER_MAX per connection;
 *  - otherwise pausing stops, until the hub is busy again after a back-off
 *    (FLUSH_TRIAL_MIN_MS, doubling up to _MAX_MS; a pause that paid resets
 *    it): a trial costs one pause;
 *  - after an idle spell (no flush for two pauses) the flush is immediate
 *    and judges nothing.
 * A pause lasts FLUSH_PAUSE_MIN_MS at least and write_pause_max ms at most
 * (conf; 0 turns pausing off): no frame waits in a pause longer. An idle
 * or lightly loaded hub adds no latency. The conf key write_delay sets a
 * floor (flushes at most every write_delay ms, whatever they gather) for
 * those who trade latency for CPU at moderate rates. Replies are never
 * paused (mark_urgent). bench/README.md, "Write pacing", has the
 * measurements. */
#define FLUSH_PAUSE_MIN_MS 1
#define FLUSH_BUSY_NS 1000000u
#define FLUSH_GATHER_MIN 1.5
#define FLUSH_GATHER_MAX 32
#define FLUSH_TRIAL_MIN_MS 50
#define FLUSH_TRIAL_MAX_MS 2000

static void on_flush_timer(uv_timer_t *t);

static uint32_t clamp_pause(const struct hub_writer *w, uint64_t ms)
{
    uint32_t max = w->opt.write_pause_max_ms;
    return ms > max ? max : ms < FLUSH_PAUSE_MIN_MS ? FLUSH_PAUSE_MIN_MS : (uint32_t)ms;
}

void hub_writer_charge(struct hub_writer *w, uint64_t ns)
{
    w->charged_ns += ns;
}

static void on_spin(uv_idle_t *h)
{
    (void)h; /* being active is its job: the loop polls without sleeping */
}

static void keep_turning(struct hub_writer *w, int on)
{
    int active = uv_is_active((uv_handle_t *)&w->spin);
    if (on && !active)
        uv_idle_start(&w->spin, on_spin);
    else if (!on && active)
        uv_idle_stop(&w->spin);
}

static void start_pass(struct hub_writer *w, int paused, uint64_t now)
{
    w->pass = (struct hub_writer_pass){
        .active = 1, .paused = paused, .start_ns = now, .left = w->ndirty,
    };
}

static void stop_pausing(struct hub_writer *w, uint64_t now)
{
    w->flush_pause_ms = 0;
    w->flush_backoff_ms = w->flush_backoff_ms * 2 > FLUSH_TRIAL_MAX_MS ? FLUSH_TRIAL_MAX_MS
                          : w->flush_backoff_ms ? w->flush_backoff_ms * 2
                                                : FLUSH_TRIAL_MIN_MS;
    w->flush_trial_ns = now + w->flush_backoff_ms * (uint64_t)1000000u;
}

/* The pass has written its round: judges it (the rule above). */
static void end_pass(struct hub_writer *w, uint64_t now)
{
    struct hub_writer_pass p = w->pass;
    /* The cost of a pass: its writes, and what the previous pass's writes
     * cost elsewhere (hub_writer_charge: the TLS pump), an approximation
     * that lags by one pass. */
    p.busy_ns += w->charged_ns;
    w->charged_ns = 0;
    uint64_t cost_ms = p.busy_ns / 1000000u;

    w->pass.active = 0;
    w->last_flush_ns = now;
    if (!p.conns)
        return; /* replies flushed everything meanwhile: nothing to judge */
    w->flushes++;
    if (!p.paused) {
        uint32_t pause = clamp_pause(w, cost_ms);
        if (p.busy_ns >= FLUSH_BUSY_NS && now >= w->flush_trial_ns && pause)
            w->flush_pause_ms = pause;
        return;
    }
    w->flushes_paused++;
    if ((double)p.frames >= FLUSH_GATHER_MIN * (double)p.conns) {
        w->flush_backoff_ms = 0;
        w->flush_pause_ms = p.frames > FLUSH_GATHER_MAX * p.conns
                                ? clamp_pause(w, w->flush_pause_ms / 2)
                                : clamp_pause(w, cost_ms);
        return;
    }
    stop_pausing(w, now);
}

/* Writes one slice of the pass; ends the pass when it has written the
 * connections that waited when it started. */
static void run_pass(struct hub_writer *w, uint64_t t0, uint64_t deadline)
{
    struct pass_count n = {0, 0};
    int done = flush_some(&w->dirty, deadline, &n, &w->pass.left);
    uint64_t now = uv_hrtime();

    w->flush_slices++;
    w->pass.frames += n.frames;
    w->pass.conns += n.conns;
    w->pass.busy_ns += now - t0;
    if (done)
        end_pass(w, now);
}

/* Starts a pass now, or a pause before it (the rule above). */
static void plan_pass(struct hub_writer *w, uint64_t now)
{
    uint64_t pause = w->flush_pause_ms;
    if (pause < w->opt.write_delay_ms)
        pause = w->opt.write_delay_ms;
    if (!pause || w->no_pause) {
        start_pass(w, 0, now);
        return;
    }
    uint64_t since = (now - w->last_flush_ns) / 1000000u;
    if (since >= 2 * pause) { /* idle in between: nothing gathered */
        start_pass(w, 0, now);
        return;
    }
    if (since >= pause) { /* it waited a pause already, gathering this */
        start_pass(w, 1, now);
        return;
    }
    uv_timer_start(&w->flush_timer, on_flush_timer, pause - since, 0);
}

/* Once per loop iteration, after its I/O: replies first, then a slice of
 * the deliveries' pass, or the plan of the next. */
static void on_flush(uv_check_t *h)
{
    struct hub_writer *w = h->data;
    uint64_t t0 = uv_hrtime(), deadline = t0 + FLUSH_SLICE_NS;

    if (!flush_some(&w->urgent, deadline, NULL, NULL)) {
        keep_turning(w, 1);
        return;
    }
    if (uv_is_active((uv_handle_t *)&w->flush_timer)) { /* pausing */
        keep_turning(w, 0);
        return;
    }
    if (!w->pass.active && w->ndirty)
        plan_pass(w, t0);
    if (w->pass.active)
        run_pass(w, t0, deadline);
    /* a round that ended with connections still waiting plans the next
     * in the next iteration: the loop must not sleep in its poll first */
    keep_turning(w, w->pass.active ||
                        (w->ndirty && !uv_is_active((uv_handle_t *)&w->flush_timer)));
}

static void on_flush_timer(uv_timer_t *t)
{
    struct hub_writer *w = t->data;
    uint64_t t0 = uv_hrtime();

    start_pass(w, 1, t0);
    run_pass(w, t0, t0 + FLUSH_SLICE_NS);
    keep_turning(w, w->pass.active ||
                        (w->ndirty && !uv_is_active((uv_handle_t *)&w->flush_timer)));
}

/* ---- keepalive ------------------------------------------------------------ */

/* Loop time in ms, modulo 2^32: differences stay right for 49 days of
 * silence, and nobody is silent that long. */
static uint32_t now_ms32(const struct hub_writer *w)
{
    return (uint32_t)uv_now(w->loop);
}

void hub_writer_seen(struct hub_wconn *c)
{
    struct hub_writer *w = c->w;

    c->flags &= ~HUB_WC_PINGED;
    c->seen_ms = now_ms32(w);
    if (w->conns.prev != &c->ka)
        hub_list_move_tail(&w->conns, &c->ka);
}

/* Once a second: a client silent for ping_interval gets a PING; one still
 * silent ping_timeout later is dropped. Walks only the connections due,
 * from the head of the list. The PINGs go out now: the flusher runs after
 * the loop's poll, which would otherwise sleep until the next timer. */
static void on_keepalive(uv_timer_t *t)
{
    struct hub_writer *w = t->data;
    uint32_t now = now_ms32(w), interval = w->opt.ping_interval_ms;
    uint32_t hangup = interval + w->opt.ping_timeout_ms;
    struct hub_list *it, *tmp;

    hub_list_foreach_safe(it, tmp, &w->conns) {
        struct hub_wconn *c = hub_container_of(it, struct hub_wconn, ka);
        if (now - c->seen_ms < interval)
            break;
        if (c->flags & HUB_WC_CLOSING)
            continue;
        if (!(c->flags & HUB_WC_PINGED)) {
            c->flags |= HUB_WC_PINGED;
            hub_queue_push(&c->q, w->ping);
            mark_dirty(c);
            mark_urgent(c);
        } else if (now - c->seen_ms >= hangup) {
            hub_log(HUB_LOG_DEBUG, "[conn %llu] silent for %u ms: dropped",
                    (unsigned long long)c->id, now - c->seen_ms);
            hub_writer_drop(c);
        }
    }
    if (!flush_some(&w->urgent, uv_hrtime() + FLUSH_SLICE_NS, NULL, NULL))
        keep_turning(w, 1); /* the check handle writes the rest */
}

/* ---- lifetime ------------------------------------------------------------- */

void hub_writer_open(struct hub_writer *w, struct hub_wconn *c, struct lws *wsi, uint64_t id)
{
    memset(c, 0, sizeof(*c));
    c->w = w;
    c->wsi = wsi;
    c->id = id;
    c->seen_ms = now_ms32(w);
    hub_list_init(&c->flush);
    hub_list_push_tail(&w->conns, &c->ka);
    w->nconns++;
}

void hub_writer_closed(struct hub_wconn *c)
{
    struct hub_writer *w = c->w;

    unmark(c);
    c->flags = HUB_WC_CLOSING;
    hub_queue_clear(&c->q);
    hub_list_remove(&c->ka);
    w->nconns--;
}

void hub_writer_init(struct hub_writer *w, uv_loop_t *loop,
                     const struct hub_writer_options *o)
{
    memset(w, 0, sizeof(*w));
    w->loop = loop;
    w->opt = *o;
    hub_list_init(&w->conns);
    hub_list_init(&w->urgent);
    hub_list_init(&w->dirty);
    w->ping = hub_msg_ping();
    uv_check_init(loop, &w->flusher);
    w->flusher.data = w;
    uv_timer_init(loop, &w->flush_timer);
    w->flush_timer.data = w;
    uv_idle_init(loop, &w->spin);
    uv_unref((uv_handle_t *)&w->spin); /* it never keeps the loop alive */
    w->spin.data = w;
    uv_timer_init(loop, &w->keepalive);
    w->keepalive.data = w;
}

void hub_writer_start(struct hub_writer *w, struct lws_context *ctx)
{
    w->ctx = ctx;
    uv_check_start(&w->flusher, on_flush);
    uv_unref((uv_handle_t *)&w->flusher); /* it never keeps the loop alive */
    uv_timer_start(&w->keepalive, on_keepalive, KEEPALIVE_MS, KEEPALIVE_MS);
    uv_unref((uv_handle_t *)&w->keepalive);
}

void hub_writer_no_pause(struct hub_writer *w)
{
    w->no_pause = 1;
}

void hub_writer_stop(struct hub_writer *w)
{
    uv_handle_t *hs[] = {(uv_handle_t *)&w->flusher, (uv_handle_t *)&w->flush_timer,
                         (uv_handle_t *)&w->spin, (uv_handle_t *)&w->keepalive};
    for (size_t i = 0; i < sizeof(hs) / sizeof(hs[0]); i++)
        if (!uv_is_closing(hs[i]))
            uv_close(hs[i], NULL);
}

void hub_writer_free(struct hub_writer *w)
{
    if (w->ping)
        hub_msg_unref(w->ping);
    w->ping = NULL;
}
