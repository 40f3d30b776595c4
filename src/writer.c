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

static void mark_dirty(struct hub_wconn *c)
{
    if (!(c->flags & HUB_WC_DIRTY)) {
        c->flags |= HUB_WC_DIRTY;
        c->dirty_next = c->w->dirty;
        c->w->dirty = c;
    }
}

/* Replies (and PINGs, close frames) do not wait for a paused flush: a
 * publisher waiting for its acks would stall, and publish less per flush. */
static void mark_urgent(struct hub_wconn *c)
{
    if ((c->flags & (HUB_WC_DIRTY | HUB_WC_URGENT)) == HUB_WC_DIRTY) {
        c->flags |= HUB_WC_URGENT;
        c->w->nurgent++;
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

int hub_writer_writeable(struct hub_wconn *c)
{
    c->flags &= ~HUB_WC_ARMED;
    return write_queued(c);
}

/* Writes what is queued now, from a flush. While WRITEABLE is requested,
 * lws holds bytes or the socket was full: that callback writes, in order. */
static void flush_conn(struct hub_wconn *c)
{
    c->flags &= ~(HUB_WC_DIRTY | HUB_WC_URGENT);
    if (c->flags & HUB_WC_ARMED)
        return;
    if (write_queued(c) < 0)
        hub_writer_drop(c); /* the peer is gone */
}

/* ---- flushing and pacing -------------------------------------------------- */

/* Writes the listed connections (only those with a reply queued when
 * `urgent_only`); adds the frames they held and their number to *frames
 * and *conns when not NULL. */
static void flush_list(struct hub_writer *w, int urgent_only, uint64_t *frames,
                       uint64_t *conns)
{
    struct hub_wconn **pp = &w->dirty;

    while (*pp) {
        struct hub_wconn *c = *pp;
        if (urgent_only && !(c->flags & HUB_WC_URGENT)) {
            pp = &c->dirty_next;
            continue;
        }
        *pp = c->dirty_next;
        if (c->flags & HUB_WC_URGENT)
            w->nurgent--;
        if (frames) {
            *frames += c->q.count;
            (*conns)++;
        }
        flush_conn(c);
    }
}

void hub_writer_flush(struct hub_writer *w, int urgent_only)
{
    flush_list(w, urgent_only, NULL, NULL);
}

/* Write pacing. Deliveries are written at the end of the loop iteration
 * that queued them, all of a connection's frames in one write. A write
 * costs ~5 us on loopback and a frame in it ~0.1 us, so under load a short
 * pause before the next flush, while publishes keep arriving, makes each
 * write carry several frames. The pause pays only if connections receive
 * several frames within it; otherwise it is latency for nothing (at 100
 * messages/s per connection, a 10 ms pause saves a third of the writes and
 * adds 10 ms). And past a few dozen frames per write a longer pause saves
 * little more. Hence:
 *  - a flush that took FLUSH_BUSY_NS or more (the hub is busy) starts
 *    pausing: the next flush waits as long as that one took;
 *  - after a paused flush that wrote FLUSH_GATHER_MIN..FLUSH_GATHER_MAX
 *    frames per connection, the next pause is again as long as that flush
 *    took (half the time writing, half gathering: the pause grows with the
 *    number of connections, so their writes carry as many frames);
 *  - more frames than that: the next pause is half as long;
 *  - fewer: pausing did not pay and stops, until the hub is busy again
 *    after a back-off (FLUSH_TRIAL_MIN_MS, doubling up to _MAX_MS; a flush
 *    that paid resets it);
 *  - after an idle spell (no flush for two pauses) the flush is immediate
 *    and judges nothing.
 * Pauses stay within [FLUSH_PAUSE_MIN_MS, FLUSH_PAUSE_MAX_MS]. An idle or
 * lightly loaded hub adds no latency. The conf key write_delay sets a floor
 * (flushes at most every write_delay ms, whatever they gather) for those
 * who trade latency for CPU at moderate rates. Replies are never paused
 * (mark_urgent). */
#define FLUSH_PAUSE_MIN_MS 1
#define FLUSH_PAUSE_MAX_MS 100
#define FLUSH_BUSY_NS 1000000u
#define FLUSH_GATHER_MIN 1.5
#define FLUSH_GATHER_MAX 32
#define FLUSH_TRIAL_MIN_MS 50
#define FLUSH_TRIAL_MAX_MS 2000

static uint32_t clamp_pause(uint64_t ms)
{
    return ms < FLUSH_PAUSE_MIN_MS ? FLUSH_PAUSE_MIN_MS
           : ms > FLUSH_PAUSE_MAX_MS ? FLUSH_PAUSE_MAX_MS : (uint32_t)ms;
}

void hub_writer_charge(struct hub_writer *w, uint64_t ns)
{
    w->charged_ns += ns;
}

static void flush_all(struct hub_writer *w, int paused)
{
    uint64_t t0 = uv_hrtime(), frames = 0, conns = 0;

    flush_list(w, 0, &frames, &conns);
    /* The cost of a flush: its writes, and what the previous flush's
     * writes cost elsewhere (hub_writer_charge): an approximation that
     * lags by one flush. */
    uint64_t now = uv_hrtime(), cost_ns = now - t0 + w->charged_ns;
    uint64_t cost_ms = cost_ns / 1000000u;
    w->charged_ns = 0;
    w->last_flush_ns = now;
    if (!conns)
        return; /* replies flushed everything meanwhile: nothing to judge */
    w->flushes++;
    if (!paused) {
        if (cost_ns >= FLUSH_BUSY_NS && now >= w->flush_trial_ns)
            w->flush_pause_ms = clamp_pause(cost_ms);
        return;
    }
    w->flushes_paused++;
    if ((double)frames >= FLUSH_GATHER_MIN * (double)conns) {
        w->flush_backoff_ms = 0;
        w->flush_pause_ms = frames > FLUSH_GATHER_MAX * conns
                                ? clamp_pause(w->flush_pause_ms / 2)
                                : clamp_pause(cost_ms);
        return;
    }
    w->flush_pause_ms = 0;
    w->flush_backoff_ms = w->flush_backoff_ms * 2 > FLUSH_TRIAL_MAX_MS ? FLUSH_TRIAL_MAX_MS
                          : w->flush_backoff_ms ? w->flush_backoff_ms * 2
                                                : FLUSH_TRIAL_MIN_MS;
    w->flush_trial_ns = now + w->flush_backoff_ms * (uint64_t)1000000u;
}

static void on_flush_timer(uv_timer_t *t)
{
    flush_all(t->data, 1);
}

static void on_flush(uv_check_t *h)
{
    struct hub_writer *w = h->data;

    if (!w->dirty)
        return;
    if (w->nurgent)
        hub_writer_flush(w, 1);
    if (!w->dirty || uv_is_active((uv_handle_t *)&w->flush_timer))
        return;
    uint64_t pause = w->flush_pause_ms;
    if (pause < w->opt.write_delay_ms)
        pause = w->opt.write_delay_ms;
    if (!pause || w->no_pause) {
        flush_all(w, 0);
        return;
    }
    uint64_t since = (uv_hrtime() - w->last_flush_ns) / 1000000u;
    if (since >= 2 * pause) { /* idle in between: nothing gathered */
        flush_all(w, 0);
        return;
    }
    if (since >= pause) {
        flush_all(w, 1);
        return;
    }
    uv_timer_start(&w->flush_timer, on_flush_timer, pause - since, 0);
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
    hub_writer_flush(w, 1);
}

/* ---- lifetime ------------------------------------------------------------- */

void hub_writer_open(struct hub_writer *w, struct hub_wconn *c, struct lws *wsi, uint64_t id)
{
    memset(c, 0, sizeof(*c));
    c->w = w;
    c->wsi = wsi;
    c->id = id;
    c->seen_ms = now_ms32(w);
    hub_list_push_tail(&w->conns, &c->ka);
    w->nconns++;
}

void hub_writer_closed(struct hub_wconn *c)
{
    struct hub_writer *w = c->w;

    if (c->flags & HUB_WC_DIRTY) {
        struct hub_wconn **pp = &w->dirty;
        while (*pp && *pp != c)
            pp = &(*pp)->dirty_next;
        if (*pp)
            *pp = c->dirty_next;
        if (c->flags & HUB_WC_URGENT)
            w->nurgent--;
    }
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
    w->ping = hub_msg_ping();
    uv_check_init(loop, &w->flusher);
    w->flusher.data = w;
    uv_timer_init(loop, &w->flush_timer);
    w->flush_timer.data = w;
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
                         (uv_handle_t *)&w->keepalive};
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
