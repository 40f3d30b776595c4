/* A WebSocket session: one connection's protocol state. It reassembles
 * messages (under max_message_size), decodes commands with proto, asks the
 * policy, hands subscribe/unsubscribe/publish to the hub core and answers
 * every command exactly once (replies that wait for the broker name the
 * connection by id, so an answer to a connection that is gone is dropped).
 * Its frames go out through the writer. It also implements the policy's
 * host interface (hub_session_policy_ops): what a Lua policy may do to
 * connections and channels.
 *
 * A session lives in lws's per-session data; server.c translates lws events
 * into the calls below. The session knows no lws types: frame flags come
 * as arguments, and what touches the socket is the writer's.
 *
 * Loop thread only.
 *
 * Ownership: a session's memory is lws's per-session data; what it
 * allocates (reassembly buffer, pending replies, user, info) it frees in
 * hub_session_closed(). struct hub_sessions borrows every module it points
 * to from the embedder. Re-entrancy: replies completed by the broker or the
 * policy find their session by id, never by pointer. */
#ifndef LUAHUB_SESSION_H
#define LUAHUB_SESSION_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/hub.h"
#include "luahub/policy.h"
#include "luahub/proto.h"
#include "luahub/writer.h"

struct hub_config;
struct hub_registry;

/* What on_connect decided for a connection, carried from the upgrade
 * request (server.c) to its session. Owned by whoever holds it: the
 * session takes it in hub_session_open. */
struct hub_conn_pending {
    uint64_t id;
    char *user;
    char *info_json;
    char *protocol;         /* the subprotocol echoed, or NULL */
    char *peer;             /* the client's address when the socket is not its own
                             * (TLS: a socketpair), else NULL */
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
    struct hub_buf scratch;         /* reply encoding, reused */
    int shutting_down;
    /* Called when the last session closed after hub_sessions_shutdown(). */
    void (*all_gone)(void *ud);
    void *ud;
    /* counters */
    uint64_t connections_total;
    uint64_t slow_consumer_closes;
    uint64_t protocol_errors[HUB_PERR__COUNT]; /* answered, by code (the HTTP API's too) */
};

enum {
    HUB_SESS_RX_BINARY = 1 << 0,    /* the message being reassembled is binary */
    HUB_SESS_RX_ACTIVE = 1 << 1,    /* a fragmented message is being reassembled */
    HUB_SESS_RX_INVALID = 1 << 2,   /* a text frame was not UTF-8: close 1007 */
    HUB_SESS_REGISTERED = 1 << 3,   /* in the connection registry (it has a user) */
    HUB_SESS_OPEN = 1 << 4,         /* between open and closed */
};

struct hub_session {
    struct hub_client client;       /* the hub's view: id, subscriptions */
    struct hub_wconn wc;            /* the writer's view: queue, keepalive */
    struct hub_policy_conn pc;      /* the policy's view: id, user, info */
    struct hub_sessions *ss;
    unsigned char *rx;              /* reassembly buffer, NULL between messages */
    uint32_t rx_len, rx_cap;
    uint64_t proto_window_ms;       /* when the protocol error bucket was last updated */
    uint32_t proto_errors;          /* protocol error bucket, in milli-errors */
    uint32_t flags;                 /* HUB_SESS_* */
    char *close_reason;             /* our close's reason (owned), or NULL */
    char *peer;                     /* the client's address if not the socket's (owned), or NULL */
    char *entry;                    /* presence: "client":..,"user":..,"info":.. (owned) */
    size_t entry_len;
    const char *entry_user, *entry_info; /* the pc.user and pc.info it was built from */
    uint16_t close_code;            /* close code sent or received (1006 if none) */
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
