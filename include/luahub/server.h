/* The server: the lws context on the process's libuv loop, the vhost with
 * its WebSocket protocol and HTTP routes, the channel registry, the list of
 * connections, and graceful shutdown. One per process; loop thread only. */
#ifndef LUAHUB_SERVER_H
#define LUAHUB_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>
#include <libwebsockets.h>

#include "luahub/broker.h"
#include "luahub/chan.h"
#include "luahub/config.h"
#include "luahub/conn.h"
#include "luahub/util.h"

struct hub_server;
typedef void (*hub_server_done_cb)(struct hub_server *srv);

struct hub_server {
    uv_loop_t *loop;
    const struct hub_config *cfg;   /* borrowed; outlives the server */
    struct lws_context *ctx;
    struct lws_vhost *vhost;
    lws_retry_bo_t retry;           /* the vhost keeps a pointer to it */
    struct lws_protocols protocols[2];
    int port;                       /* bound port */
    int listen_fd;                  /* workers: our SO_REUSEPORT listener, else -1 */
    uv_poll_t listener;             /* ... watched here, accepted sockets go to lws */
    uv_timer_t listen_timer;        /* workers: accept anyway if the broker stays down */
    uv_timer_t accept_timer;        /* resumes accepting after running out of fds */
    int lws_woken;                  /* lws_cancel_service() sent, not yet seen */
    uint64_t accept_warned_ms;      /* loop time of the last such warning */

    struct hub_http *http;          /* plain HTTP and upgrade requests (http.c) */
    int static_fd;                  /* static_dir, opened O_PATH; -1: none */
    struct hub_conn_pending *handoff; /* on_connect's result for the upgrade being adopted */
    struct hub_policy *policy;      /* the Lua policy; NULL before start */
    struct hub_broker *broker;      /* where publishes go (memory or redis) */
    int broker_local;               /* the memory broker: no other process */
    struct hub_registry *registry;  /* instance heartbeat, who is connected where */
    struct hub_chan_registry chans;
    struct hub_conn **ids;          /* id -> connection hash, chained by id_next */
    uint32_t nids_buckets;          /* a power of two */
    struct hub_conn *conns;         /* open WebSocket connections, least recently heard first */
    struct hub_conn *conns_tail;    /* ... most recently heard */
    uv_timer_t keepalive;           /* pings the silent, drops the mute (1 s) */
    struct hub_msg *ping;           /* the PING frame, shared */
    struct hub_conn *culls;         /* connections to cull after a fan-out */
    struct hub_conn *dirty;         /* connections with frames to write */
    uv_check_t flusher;             /* writes them once per loop iteration */
    uv_timer_t flush_timer;         /* ... or a moment later under load */
    uint64_t last_flush_ns;         /* when the last full flush ended */
    uint32_t flush_pause_ms;        /* pause before a flush, 0: none (server.c) */
    uint32_t flush_backoff_ms;      /* after a pause that did not pay */
    uint64_t flush_trial_ns;        /* no pausing before this */
    uint32_t nurgent;               /* listed connections with a reply queued */
    uint64_t next_conn_id;
    char instance[17];              /* random hex id of this process */

    struct hub_buf scratch;         /* reply encoding, reused */
    int shutting_down;
    uv_timer_t shutdown_timer;
    hub_server_done_cb on_done;
};

/* Zeroes `srv` and sets up what needs no listener: the registry, the
 * instance id, the timers, the broker (which starts connecting). `cfg` is
 * borrowed and must outlive it. Returns 0, or -1 after logging why. Either
 * way the caller later calls hub_server_stop() and hub_server_free(). */
int hub_server_init(struct hub_server *srv, uv_loop_t *loop,
                    const struct hub_config *cfg);

/* Creates the lws context on the loop and the listening vhost. Returns 0,
 * or -1 after logging one line that says what failed and what to do. On -1
 * the caller still calls hub_server_stop(), drains the loop and calls
 * hub_server_free(). */
int hub_server_start(struct hub_server *srv);

/* For workers sharing a port: binds (without listening) a SO_REUSEPORT
 * socket on the conf's address, so that every worker binds the same port;
 * with port 0 it picks the port and writes it into `cfg`. Returns the fd to
 * keep open while workers start, or -1 after logging why. */
int hub_server_reserve_port(struct hub_config *cfg);

/* Starts a graceful shutdown: refuses new work, queues close 1001 to every
 * client and calls `done` (once) when all are gone or shutdown_timeout has
 * passed. A second call finishes at once. */
void hub_server_shutdown(struct hub_server *srv, hub_server_done_cb done);

/* Starts lws's asynchronous teardown and closes the server's handles. The
 * loop then drains; call hub_server_free() after uv_run() returns. */
void hub_server_stop(struct hub_server *srv);

/* Final teardown after the loop has drained (the second
 * lws_context_destroy() that lws 4.1.6 needs for foreign loops). */
void hub_server_free(struct hub_server *srv);

/* Publishes `data` (valid JSON, borrowed) to `channel` (valid name): the
 * delivery frame is encoded once and handed to the broker, which fans it
 * out (memory: at once; redis: when it comes back from Redis). Returns 0 and
 * calls `cb` (may be NULL) exactly once, or returns HUB_BROKER_UNAVAILABLE
 * without calling it. */
int hub_server_publish_cb(struct hub_server *srv, const char *channel,
                          size_t channel_len, const char *data, size_t data_len,
                          hub_broker_publish_cb cb, void *ud);

/* Fire and forget (Lua's hub.publish, policy routing): returns the number
 * of local subscribers of the channel, 0 if the broker refused. */
size_t hub_server_publish(struct hub_server *srv, const char *channel,
                          size_t channel_len, const char *data, size_t data_len);

/* The open connection with this numeric id, or NULL. */
struct hub_conn *hub_server_conn_by_id(struct hub_server *srv, uint64_t id);

/* Writes the frames queued for the connections on the flush list (only
 * those with a reply queued when `urgent_only`). Runs from a uv_check
 * handle after the I/O callbacks of a loop iteration, or from a timer. */
void hub_server_flush(struct hub_server *srv, int urgent_only);

/* Culls the connections marked during a fan-out: unlinks them from their
 * channels and queues close 4001. Called after every fan-out loop. */
void hub_server_flush_culls(struct hub_server *srv);

/* The open connection with this client id ("<instance>-<n>"), or NULL. */
struct hub_conn *hub_server_find_conn(struct hub_server *srv, const char *client_id);

/* Links / unlinks a connection in the id hash. */
void hub_server_add_conn(struct hub_server *srv, struct hub_conn *c);
void hub_server_remove_conn(struct hub_server *srv, struct hub_conn *c);

/* Called by a connection's CLOSED path once it has unlinked itself:
 * completes a graceful shutdown when the last client is gone. */
void hub_server_conn_gone(struct hub_server *srv);

#endif
