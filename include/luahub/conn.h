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
    HUB_CONN_CLOSE_SENT = 1 << 5,/* our close frame is out; waiting for the peer's */
    HUB_CONN_DIRTY = 1 << 6,    /* on the server's flush list */
    HUB_CONN_URGENT = 1 << 7,   /* ... with a reply queued: flush this iteration */
    HUB_CONN_REGISTERED = 1 << 8,/* in the connection registry (it has a user) */
    HUB_CONN_PINGED = 1 << 9,   /* a keepalive PING is out, no frame since */
    HUB_CONN_RX_INVALID = 1 << 10,/* a text frame was not UTF-8: close 1007 */
};

struct hub_conn {
    struct hub_conn *prev, *next;   /* server's open connections, by seen_ms */
    struct hub_conn *cull_next;     /* server's pending-cull list */
    struct hub_conn *dirty_next;    /* server's flush list */
    struct lws *wsi;
    struct hub_server *srv;
    uint64_t id;                    /* process-unique, "[conn N]" in logs */
    struct hub_sub *subs;           /* subscriptions (chan registry nodes) */
    struct hub_queue q;             /* frames waiting to be written */
    unsigned char *rx;              /* reassembly buffer, NULL between messages */
    uint64_t proto_window_ms;       /* when the protocol error bucket was last updated */
    struct hub_conn *id_next;       /* server's id hash chain */
    char *user;                     /* conn.user set by the policy, or NULL */
    char *info_json;                /* conn.info as JSON, or NULL */
    const char *close_reason;       /* static text of our close, or "" */
    uint32_t nsubs;
    uint32_t flags;
    uint32_t rx_len, rx_cap;
    uint32_t proto_errors;          /* protocol error bucket, in milli-errors */
    int lua_ref;                    /* its Lua object in the current policy state; 0 = none */
    uint32_t seen_ms;               /* loop time (ms, mod 2^32) of the last frame received */
    uint16_t close_code;            /* close code sent or received (1006 if none) */
};

/* What on_connect left for the connection, carried from the upgrade
 * request to ESTABLISHED in lws's opaque user data. */
struct hub_conn_pending {
    uint64_t id;
    char *user;
    char *info_json;
};

/* Called from ESTABLISHED: links the connection into the server and queues
 * the welcome frame. Takes ownership of `pending` (may be NULL). */
void hub_conn_open(struct hub_conn *c, struct hub_server *srv, struct lws *wsi,
                   struct hub_conn_pending *pending);

/* The client id shown in the welcome frame: "<instance>-<n>". */
void hub_conn_client_id(const struct hub_conn *c, char *out, size_t outlen);

/* Server-side subscription (policy API). `name` must be valid. Returns 1 if
 * subscribed now, 0 if it already was, -1 if over max_channels_per_conn.
 * Runs no hook. */
int hub_conn_subscribe(struct hub_conn *c, const char *name, size_t len);

/* Server-side unsubscription. Returns 0, or -1 if not subscribed. Runs no
 * hook. */
int hub_conn_unsubscribe(struct hub_conn *c, const char *name, size_t len);

/* Sends {"op":"push","data":JSON} to this client; `json` must be valid. */
void hub_conn_push(struct hub_conn *c, const char *json, size_t len);

/* The client sent a frame (data or PONG): it is alive. Moves it to the
 * tail of the server's list, which stays ordered by seen_ms. */
void hub_conn_seen(struct hub_conn *c);

/* Keepalive, once a second: a client silent for ping_interval seconds gets
 * a PING; one still silent ping_timeout seconds later is dropped (TCP
 * close, code 1006 for on_disconnect). Walks only the connections due,
 * from the head of the list. */
void hub_conn_keepalive(struct hub_server *srv);

/* LWS_CALLBACK_WS_PEER_INITIATED_CLOSE with the close frame's payload.
 * Returns what the callback returns: -1 when it answers our own close or
 * has echoed the peer's (lws then hangs up), 0 to let lws echo it. */
int hub_conn_peer_closed(struct hub_conn *c, const void *payload, size_t len);

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
 * or -1 if the socket failed (lws then closes it). */
int hub_conn_writeable(struct hub_conn *c);

/* Writes what is queued now, from the server's once-per-loop-iteration
 * flush (hub_server_flush). Falls back to WRITEABLE when the socket is full
 * or lws holds buffered bytes; closes the connection on a socket error. */
void hub_conn_flush(struct hub_conn *c);

#endif
