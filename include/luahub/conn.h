/* Per-connection state of a WebSocket client: identity, subscriptions, the
 * bounded outbound queue, fragment reassembly and the protocol error budget.
 * Lives in lws's per-session data; freed only on lws's CLOSED path. */
#ifndef LUAHUB_CONN_H
#define LUAHUB_CONN_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/chan.h"
#include "luahub/queue.h"

struct lws;
struct hub_server;

enum {
    HUB_CONN_ARMED = 1 << 0,    /* lws_callback_on_writable() requested */
    HUB_CONN_CLOSING = 1 << 1,  /* close frame queued; no more sends */
    HUB_CONN_RX_BINARY = 1 << 2,/* the message being reassembled is binary */
    HUB_CONN_RX_ACTIVE = 1 << 3,/* a fragmented message is being reassembled */
    HUB_CONN_CULL = 1 << 4,     /* on the server's cull list */
};

struct hub_conn {
    struct hub_conn *prev, *next;   /* server's list of open connections */
    struct hub_conn *cull_next;     /* server's pending-cull list */
    struct lws *wsi;
    struct hub_server *srv;
    uint64_t id;                    /* process-unique, "[conn N]" in logs */
    struct hub_sub *subs;           /* subscriptions (chan registry nodes) */
    uint32_t nsubs;
    uint32_t flags;
    struct hub_queue q;             /* frames waiting for WRITEABLE */
    unsigned char *rx;              /* reassembly buffer, NULL between messages */
    uint32_t rx_len, rx_cap;
    uint32_t proto_errors;          /* errors in the current window */
    uint64_t proto_window_ms;       /* start of the error window */
};

/* Called from ESTABLISHED: links the connection into the server and queues
 * the welcome frame. */
void hub_conn_open(struct hub_conn *c, struct hub_server *srv, struct lws *wsi);

/* Called from CLOSED: leaves every channel, drops the queue and the
 * reassembly buffer, unlinks from the server. */
void hub_conn_closed(struct hub_conn *c);

/* Queues a reference to `m` for this connection (borrows `m`). When the
 * queue would exceed max_queue_bytes the connection is marked for culling
 * (see hub_server_flush_culls) and the message is dropped for it alone.
 * No-op on a closing connection. */
void hub_conn_send(struct hub_conn *c, struct hub_msg *m);

/* Culls a connection marked during a fan-out: leaves its channels at once,
 * counts it and queues close 4001. Called by hub_server_flush_culls(). */
void hub_conn_cull(struct hub_conn *c);

/* Sends a close frame with `code` after what is already queued (or, with
 * `drop_queue`, instead of it), then closes. Idempotent. Safe from any
 * callback: the frame goes out from WRITEABLE. */
void hub_conn_close(struct hub_conn *c, uint16_t code, const char *reason,
                    int drop_queue);

/* LWS_CALLBACK_RECEIVE: reassembles and handles client messages. Returns 0,
 * or -1 to make lws close the connection (close reason already set). */
int hub_conn_receive(struct hub_conn *c, const void *in, size_t len);

/* LWS_CALLBACK_SERVER_WRITEABLE: writes queued frames, coalesced. Returns 0,
 * or -1 once the close frame is out (lws then closes the socket). */
int hub_conn_writeable(struct hub_conn *c);

#endif
