/* A WebSocket session: one connection's protocol state. It reassembles
 * messages (under max_message_size), decodes commands with proto, asks the
 * policy, hands subscribe/unsubscribe/publish to the hub core and answers
 * every command exactly once (replies that wait for the broker name the
 * connection by id, so an answer to a connection that is gone is dropped).
 * Its frames go out through the writer. It also implements the policy's
 * host interface (hub_session_policy_ops): what a Lua policy may do to
 * connections and channels.
 *
 * A session lives in lws's per-session data; server_ws.c translates lws events
 * into the calls below. The session knows no lws types: frame flags come
 * as arguments, and what touches the socket is the writer's.
 *
 * Loop thread only.
 *
 * A hook that waits (hub.redis & co) holds its connection's later
 * commands: they queue (at most 64, then limit_exceeded) and run in order
 * once it is done, so replies keep the command order.
 *
 * Ownership: a session's memory is lws's per-session data; what it
 * allocates (reassembly buffer, pending replies, user, info, the queue
 * behind a waiting hook) it frees in hub_session_closed(). struct hub_sessions borrows every module it points
 * to from the embedder. Re-entrancy: replies completed by the broker or the
 * policy find their session by id, never by pointer. */
#ifndef LUAHUB_SESSION_H
#define LUAHUB_SESSION_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/hub.h"
#include "luahub/policy.h"
#include "luahub/proto.h"
#include "luahub/ratelimit.h"
#include "luahub/writer.h"

struct hub_config;
struct hub_registry;
struct swait;

/* What on_connect decided for a connection, carried from the upgrade
 * request (server_ws.c) to its session. Owned by whoever holds it: the
 * session takes it in hub_session_open. */
struct hub_conn_pending {
    uint64_t id;
    char *user;
    char *info_json;
    char *protocol;         /* the subprotocol echoed, or NULL */
    struct hub_ip ip;       /* the client's address, counted in the per-address table */
};

/* Frees a pending record and what it owns. NULL is fine. */
void hub_conn_pending_free(struct hub_conn_pending *p);

/* What every session of the process shares. The embedder (server.c) fills
 * the pointers (borrowed) and owns the struct. */
struct hub_sessions {
    const struct hub_config *cfg;
    struct hub *hub;
    struct hub_writer *writer;
    struct hub_policy **policy;     /* the current policy (reloads swap it) */
    struct hub_registry *registry;  /* NULL until the server has started */
    struct hub_iplimit *iplimit;    /* connections per address (released at close) */
    struct hub_broker *redis;       /* policy_redis (hub.redis), or NULL: the broker's */
    struct hub_buf scratch;         /* reply encoding, reused */
    const char *cur_frame;          /* the message being dispatched (borrowed) */
    size_t cur_len;
    int shutting_down;
    /* Called when the last session closed after hub_sessions_shutdown(). */
    void (*all_gone)(void *ud);
    void *ud;
    /* counters */
    uint64_t connections_total;
    uint64_t slow_consumer_closes;
    uint64_t rate_limited[2];       /* refusals: [0] commands, [1] publishes */
    uint64_t rate_limit_closes;     /* connections closed with 4029 */
    uint64_t protocol_errors[HUB_PERR__COUNT]; /* answered, by code (the HTTP API's too) */
};

enum {
    HUB_SESS_RX_BINARY = 1 << 0,    /* the message being reassembled is binary */
    HUB_SESS_RX_ACTIVE = 1 << 1,    /* a fragmented message is being reassembled */
    HUB_SESS_RX_INVALID = 1 << 2,   /* a text frame was not UTF-8: close 1007 */
    HUB_SESS_REGISTERED = 1 << 3,   /* in the connection registry (it has a user) */
    HUB_SESS_OPEN = 1 << 4,         /* between open and closed */
};

struct hub_rxbuf;
struct hub_pentry;

struct hub_session {
    struct hub_client client;       /* the hub's view: id, subscriptions */
    struct hub_wconn wc;            /* the writer's view: queue, keepalive */
    struct hub_policy_conn pc;      /* the policy's view: id, user, info */
    /* Every byte here is in every connection (docs/internals.md, "Memory per
     * connection"): what only some need is allocated when they do (rx,
     * entry, sw), times are ms modulo 2^32. */
    struct hub_sessions *ss;
    struct hub_rxbuf *rx;           /* reassembly buffer, NULL between messages */
    struct hub_pentry *entry;       /* presence: what it shows of this client, or NULL */
    char *close_reason;             /* our close's reason (owned), or NULL */
    uint32_t proto_window_ms;       /* when the protocol error bucket was last updated */
    uint32_t proto_errors;          /* protocol error bucket, in milli-errors */
    uint32_t flags;                 /* HUB_SESS_* */
    uint32_t limited_window_ms;     /* when the count of rate-limited answers began */
    uint32_t limited;               /* rate-limited answers in that window */
    struct hub_bucket commands;     /* command_rate */
    struct hub_bucket publishes;    /* publish_rate */
    uint16_t close_code;            /* close code sent or received (1006 if none) */
    struct hub_ip ip;               /* the client's address (per-address limits) */
    struct hub_policy_wait pw;      /* a hook of this connection that waits */
    struct swait *sw;               /* ... and the commands queued behind it (session.c) */
};

/* ESTABLISHED: the session starts (`s` zeroed by lws), takes `pending`
 * (may be NULL: no on_connect) and queues the welcome frame. */
void hub_session_open(struct hub_session *s, struct hub_sessions *ss, struct lws *wsi,
                      struct hub_conn_pending *pending);

/* RECEIVE: `len` bytes of a message; `final` when they end it, `binary`
 * for a binary message. Returns 0, or -1 when the connection must close
 * (the close code is set: 1009 too large, 1007 not UTF-8; the transport
 * sends it). */
int hub_session_receive(struct hub_session *s, const void *in, size_t len, int final,
                        int binary, uint16_t *close_code, const char **close_reason);

/* The peer sent a close frame with `payload` (its code and reason).
 * Returns what the lws callback returns (see hub_writer_echo_close). */
int hub_session_peer_closed(struct hub_session *s, const void *payload, size_t len);

/* CLOSED: on_disconnect runs, the session leaves every channel and the
 * registry, and its memory is freed (not `s` itself: lws's). */
void hub_session_closed(struct hub_session *s);

/* Queues a close frame (code, reason copied) after what is queued. */
void hub_session_close(struct hub_session *s, uint16_t code, const char *reason);

/* Shutdown: close 1001 to every session; all_gone when the last is gone
 * (at once when there is none). */
void hub_sessions_shutdown(struct hub_sessions *ss);

/* Closes this process's sessions of `user` with 4003 (the registry's
 * disconnect order). */
void hub_sessions_disconnect_user(struct hub_sessions *ss, const char *user, size_t len);

/* The policy's host interface over the sessions (ud: struct hub_sessions). */
extern const struct hub_policy_host_ops hub_session_policy_ops;

#endif
