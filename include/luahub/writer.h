/* The write path of WebSocket connections, and their keepalive.
 *
 * The rule: every frame a connection sends (deliveries, replies, PINGs,
 * close frames) is a reference in its bounded queue, and once per loop
 * iteration, after the iteration's I/O callbacks, the writer writes each
 * connection's queued frames with one sendmsg(), one iovec per frame: no
 * copy, one system call for everything the iteration queued for it.
 *
 * Why sendmsg() outside lws's WRITEABLE callback (the one exception to
 * libwebsockets' rule, docs/internals.md "Write path"): a socket write costs
 * ~5 us on loopback, lws_write() makes one per frame, and asking lws for
 * WRITEABLE before each write flips the poll mask with two epoll_ctl calls;
 * measured, lws's way cost 2-6x more per delivery. The writer therefore
 * writes at frame boundaries while lws holds nothing for the socket; only
 * a full socket (EAGAIN) falls back to lws_callback_on_writable(), and a
 * short write hands the rest of its frame to lws_write(LWS_WRITE_RAW),
 * which sends it before anything else. Nothing else writes to these
 * sockets (the close echo is the writer's too).
 *
 * Pacing: under load a short pause before a flush lets frames gather, so
 * each write carries several, for as long as pauses do gather; a pause is
 * at most write_pause_max ms. See writer.c for the rule and bench/README.md
 * for the evidence. Replies (and PINGs, close frames) are flushed in the
 * iteration that queued them, before deliveries.
 *
 * Slices: a flush writes for at most ~1 ms, then lets the loop turn (read
 * sockets, answer PINGs, queue replies) and goes on where it stopped in the
 * next iteration; connections wait in one FIFO, so a large fan-out is
 * written round-robin and nobody waits for a whole 15,000-socket pass.
 *
 * Keepalive: connections sit in one list in the order they were last heard
 * from; a frame moves one to the tail (O(1)), and a sweep every second pings
 * those silent for ping_interval and drops those silent ping_timeout longer.
 *
 * Loop thread only. A struct hub_wconn lives inside the connection's
 * session (lws's per-session data); the writer links it into its lists
 * between hub_writer_open() and hub_writer_closed(). */
#ifndef LUAHUB_WRITER_H
#define LUAHUB_WRITER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "luahub/list.h"
#include "luahub/msg.h"
#include "luahub/queue.h"

struct lws;
struct lws_context;
struct hub_writer;

enum {
    HUB_WC_ARMED = 1 << 0,      /* lws_callback_on_writable() requested */
    HUB_WC_DIRTY = 1 << 1,      /* on the flush list */
    HUB_WC_URGENT = 1 << 2,     /* ... with a reply queued: flushed this iteration */
    HUB_WC_CLOSING = 1 << 3,    /* a close frame is queued (or the peer closed): nothing more */
    HUB_WC_CLOSE_SENT = 1 << 4, /* our close frame is out; waiting for the peer's */
    HUB_WC_PINGED = 1 << 5,     /* a keepalive PING is out, no frame since */
};

/* One connection, as the writer sees it. Fields are the writer's. */
struct hub_wconn {
    struct hub_writer *w;
    struct lws *wsi;
    struct hub_queue q;             /* frames waiting to be written */
    struct hub_list ka;             /* the writer's connections, last heard last */
    struct hub_list flush;          /* in the writer's urgent or dirty FIFO */
    uint64_t id;                    /* "[conn N]" in logs */
    uint32_t seen_ms;               /* loop time (mod 2^32) of the last frame received */
    uint32_t flags;
};

struct hub_writer_options {
    uint64_t max_queue_bytes;       /* a connection's queue bound */
    uint32_t write_delay_ms;        /* conf write_delay: least time between flushes */
    uint32_t write_pause_max_ms;    /* conf write_pause_max: longest adaptive pause, 0: none */
    uint32_t ping_interval_ms;
    uint32_t ping_timeout_ms;
};

struct hub_writer {
    uv_loop_t *loop;
    struct hub_writer_options opt;
    struct lws_context *ctx;        /* to wake lws after a drop */
    int lws_woken;                  /* lws_cancel_service() sent, not yet seen */
    int no_pause;                   /* shutting down: flush at once */
    struct hub_list urgent;         /* connections with a reply queued, FIFO */
    struct hub_list dirty;          /* ... with deliveries only, FIFO */
    uv_check_t flusher;             /* writes them once per loop iteration */
    uv_timer_t flush_timer;         /* ... or a moment later under load */
    uv_idle_t spin;                 /* a sliced flush goes on: poll without sleeping */
    size_t ndirty;                  /* connections in `dirty` */
    /* the pass: one flush of `dirty` until it is empty, in one or more slices */
    struct hub_writer_pass {
        int active, paused;
        uint64_t frames, conns, busy_ns, start_ns;
        size_t left;                /* connections of its round not yet written */
    } pass;
    uint64_t last_flush_ns;         /* when the last pass ended */
    uint32_t flush_pause_ms;        /* pause before a flush, 0: none */
    uint32_t flush_backoff_ms;      /* after a pause that did not pay */
    uint64_t flush_trial_ns;        /* no pausing before this */
    uint64_t charged_ns;            /* work flushes caused elsewhere, since the last flush */
    struct hub_list conns;          /* keepalive order: least recently heard first */
    size_t nconns;
    uv_timer_t keepalive;
    struct hub_msg *ping;           /* the PING frame, shared */
    /* counters */
    uint64_t writes, bytes_out, flushes, flushes_paused, flush_slices;
};

/* Sets up the writer's handles on `loop` (not started). */
void hub_writer_init(struct hub_writer *w, uv_loop_t *loop,
                     const struct hub_writer_options *o);
/* Starts flushing and keepalive; `ctx` is the lws context (borrowed). */
void hub_writer_start(struct hub_writer *w, struct lws_context *ctx);
/* Shutting down: no more pauses (close frames go out at once). */
void hub_writer_no_pause(struct hub_writer *w);
/* Closes the handles (the loop drains them). */
void hub_writer_stop(struct hub_writer *w);
/* After the loop has drained. */
void hub_writer_free(struct hub_writer *w);

/* `ns` of work that frames written by a flush caused elsewhere (the TLS
 * pump encrypting and sending them): it counts in the cost of the flushes
 * for pacing, as the write itself does with plain TCP. */
void hub_writer_charge(struct hub_writer *w, uint64_t ns);

/* LWS_CALLBACK_EVENT_WAIT_CANCELLED: the wake-up of a drop arrived. */
void hub_writer_woken(struct hub_writer *w);

/* A connection opened (ESTABLISHED): zeroes `c` and links it; heard now. */
void hub_writer_open(struct hub_writer *w, struct hub_wconn *c, struct lws *wsi, uint64_t id);
/* It closed (CLOSED): unlinks it and drops its queue. */
void hub_writer_closed(struct hub_wconn *c);

/* Queues a reference to `m` (borrowed). Returns 0; or -1, queueing
 * nothing, when that would put the queue over max_queue_bytes (a slow
 * consumer: the caller culls it). A closing connection takes nothing (0). */
int hub_writer_send(struct hub_wconn *c, struct hub_msg *m);
/* Same for a reply: it goes out in this loop iteration. */
int hub_writer_reply(struct hub_wconn *c, struct hub_msg *m);

/* Queues a close frame (`code`, `reason`: static text) after what is queued
 * (or instead of it, with `drop_queue`), then the connection closes; a peer
 * that never reads is hung up after 5 s. Idempotent. */
void hub_writer_close(struct hub_wconn *c, uint16_t code, const char *reason,
                      int drop_queue);
/* Drops the connection without a close handshake (its peer is gone or
 * mute): lws closes the socket from its timer, woken now. */
void hub_writer_drop(struct hub_wconn *c);
/* The transport closes the connection itself (from RECEIVE, where lws
 * sends a close frame): the queue is dropped and nothing more is taken. */
void hub_writer_abandon(struct hub_wconn *c);
/* The peer's address ("127.0.0.1"), or "" when unknown. */
void hub_writer_peer(const struct hub_wconn *c, char *out, size_t n);
/* 1 once a close frame is queued, the peer closed, or it was dropped. */
static inline int hub_writer_closing(const struct hub_wconn *c)
{
    return (c->flags & HUB_WC_CLOSING) != 0;
}

/* The peer sent a close frame whose 2-byte code (network order) is
 * `code2`, or none (NULL): answers it at once with the same code, or with
 * an empty close. Returns what the lws callback returns (-1: lws hangs up;
 * 0: lws echoes it itself). */
int hub_writer_echo_close(struct hub_wconn *c, const unsigned char *code2);

/* The peer sent a frame (any): it is alive. */
void hub_writer_seen(struct hub_wconn *c);

/* LWS_CALLBACK_SERVER_WRITEABLE. Returns 0, or -1 on a socket error. */
int hub_writer_writeable(struct hub_wconn *c);

/* Open connections the writer knows. */
static inline size_t hub_writer_connections(const struct hub_writer *w)
{
    return w->nconns;
}

#endif
