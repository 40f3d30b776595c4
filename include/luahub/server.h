/* The server: one hub process put together. It owns the modules and wires
 * them in data-path order (listener -> http -> lws -> session -> policy ->
 * hub -> broker -> hub -> writer), and is the lws glue: the lws context on
 * the process's libuv loop (lws as a foreign loop), the vhost, the adoption
 * of accepted upgrades, and the protocol callback that turns lws events
 * into session calls. Also graceful shutdown. One per process; loop thread
 * only. The lws 4.1.6 facts it depends on are in docs/internals.md, "lws
 * on a foreign loop".
 *
 * Ownership: the server creates and frees every module it holds (the
 * config is borrowed). Re-entrancy: `done` of hub_server_shutdown() is
 * called once, from the loop, and may call hub_server_stop(). */
#ifndef LUAHUB_SERVER_H
#define LUAHUB_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>
#include <libwebsockets.h>

#include "luahub/broker.h"
#include "luahub/config.h"
#include "luahub/http.h"
#include "luahub/http_api.h"
#include "luahub/hub.h"
#include "luahub/listener.h"
#include "luahub/policy.h"
#include "luahub/ratelimit.h"
#include "luahub/session.h"
#include "luahub/writer.h"

struct hub_registry;
struct hub_server;
typedef void (*hub_server_done_cb)(struct hub_server *srv);

struct hub_server {
    uv_loop_t *loop;
    const struct hub_config *cfg;   /* borrowed; outlives the server */
    char instance[17];              /* random hex id of this process */

    /* the data path, in order */
    struct hub_listener listener;
    struct hub_http *http;          /* plain HTTP and upgrade requests */
    struct hub_http_api api;        /* its plain requests: API, /healthz, /metrics, files */
    struct hub_ip *trusted;         /* trusted_proxies, parsed */
    size_t ntrusted;
    struct hub_iplimit iplimit;     /* max_connections_per_ip, connect_rate_per_ip */
    uint64_t origins_refused;       /* upgrades from an origin not allowed */
    struct lws_context *ctx;
    struct lws_vhost *vhost;
    lws_retry_bo_t retry;           /* the vhost keeps a pointer to it */
    struct lws_protocols protocols[2];
    struct hub_conn_pending *handoff; /* on_connect's result for the upgrade being adopted */
    struct hub_sessions sessions;
    struct hub_policy *policy;      /* NULL until hub_server_load_policy */
    uint64_t lua_budget_max;        /* lua_max_instructions at start: a reload may
                                     * not raise it (the watchdog is sized from it) */
    struct hub_policy_host policy_host;
    struct hub hub;
    struct hub_broker *broker;      /* memory or redis */
    struct hub_registry *registry;  /* instance heartbeat, who is connected where */
    struct hub_writer writer;

    uv_timer_t listen_timer;        /* workers: accept anyway if the broker stays down */
    uv_timer_t iplimit_timer;       /* forgets idle addresses */
    uint64_t connections_refused;   /* upgrades refused (limit, path, shutdown, policy) */
    int shutting_down;
    uv_timer_t shutdown_timer;
    hub_server_done_cb on_done;
};

/* Zeroes `srv` and sets up what needs no listener: the instance id, the
 * broker (which starts connecting), the hub core, the writer, the
 * sessions. `cfg` is borrowed and must outlive it. Returns 0, or -1 after
 * logging why. Either way the caller later calls hub_server_stop() and
 * hub_server_free(). */
int hub_server_init(struct hub_server *srv, uv_loop_t *loop,
                    const struct hub_config *cfg);

/* Builds the policy (before listening: a hub whose policy does not
 * compile never accepts a connection). Returns 0, or -1 with every problem
 * in `errs`. */
int hub_server_load_policy(struct hub_server *srv, struct hub_config_errors *errs);

/* Reload (SIGHUP, POST /api/reload): reads the conf file again, applies
 * the keys a reload may change (docs/config.md, "Reload") and rebuilds the
 * policy with them (hub_policy_reload); logs the keys that changed but
 * need a restart. On any failure (the conf, the policy) nothing changes:
 * returns -1 with the problems in `errs` (may be NULL; they are logged). */
int hub_server_reload_policy(struct hub_server *srv, struct hub_config_errors *errs);

/* Creates the lws context on the loop, the vhost and the listener. Returns
 * 0, or -1 after logging one line that says what failed and what to do. On
 * -1 the caller still calls hub_server_stop(), drains the loop and calls
 * hub_server_free(). */
int hub_server_start(struct hub_server *srv);

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

#endif
