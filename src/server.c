/* The wiring of one hub process (include/luahub/server.h): its modules
 * created and connected, the lws context and vhost, the listeners, reload,
 * metrics and graceful shutdown. The lws glue (an upgrade checked, the
 * policy's on_connect, the socket adopted into lws, the protocol callback)
 * is server_ws.c; what the two share is server_impl.h.
 *
 * lws 4.1.6 facts this file depends on (docs/internals.md, "lws on a
 * foreign loop"):
 * - the context is created with explicit vhosts, so a failure returns NULL
 *   instead of a context that runs without a vhost;
 * - with a foreign loop lws installs no signal handlers (main.c owns them);
 * - lws_context_destroy() must be called twice: once to start closing its
 *   handles, again after uv_run() has returned, to free the context. */
#include "luahub/server.h"
#include "server_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <unistd.h>

#include "luahub/http_api.h"
#include "luahub/log.h"
#include "luahub/metrics.h"
#include "luahub/msg.h"
#include "luahub/registry.h"

_Static_assert(HUB_MSG_HEADROOM >= LWS_PRE + 10, "message headroom below LWS_PRE");

/* lws splits one write into sends of at most this (after a short write). */
#define TX_PACKET_SIZE 65536
/* lws parses only complete upgrade heads (http.c read them), within the
 * adopt call: a small pool is plenty. */
#define HEADER_POOL 16
#define WORKER_LISTEN_WAIT_MS 3000
#define IPLIMIT_SWEEP_MS 10000

static void log_emit(int level, const char *line)
{
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        n--;
    /* lws 4.1.6 logs every lws_adopt_socket_vhost_readbuf() at error level
     * ("adopt_socket_readbuf: calling service"): that is our normal path
     * for every upgrade (docs/internals.md, "HTTP"), not an error. */
    if (strstr(line, "adopt_socket_readbuf"))
        return;
    hub_log(level == LLL_ERR ? HUB_LOG_ERROR : HUB_LOG_WARN, "lws: %.*s",
            (int)n, line);
}

static void on_request(void *ud, struct hub_http_conn *c, const struct hub_request *r)
{
    struct hub_server *srv = ud;
    hub_http_api_request(&srv->api, c, r);
}

static int reload_policy(void *ud, struct hub_config_errors *errs)
{
    return hub_server_reload_policy(ud, errs);
}

static const struct hub_http_routes routes = {
    .request = on_request,
    .upgrade = hub_server_upgrade,
};

static void on_accept(void *ud, int fd, const struct sockaddr *peer, socklen_t len)
{
    struct hub_server *srv = ud;
    hub_http_accept_peer(srv->http, fd, peer, len, 0);
}

static void on_iplimit_timer(uv_timer_t *t)
{
    struct hub_server *srv = t->data;
    hub_iplimit_sweep(&srv->iplimit, hub_now_ms());
}

/* max_connections_per_ip and connect_rate_per_ip, at start and after a
 * reload changed them. Limits switched off forget their counts (they
 * would go stale: closes are not counted while off); switched on, they
 * count the connections opened from then on. */
static void set_iplimit(struct hub_server *srv)
{
    const struct hub_config *cfg = srv->cfg;
    int was = srv->iplimit.max_conns || srv->iplimit.rate;
    srv->iplimit.max_conns = cfg->max_connections_per_ip;
    srv->iplimit.rate = cfg->connect_rate_per_ip;
    int on = srv->iplimit.max_conns || srv->iplimit.rate;
    if (uv_is_closing((uv_handle_t *)&srv->iplimit_timer))
        return;
    if (was && !on) {
        hub_iplimit_free(&srv->iplimit);
        uv_timer_stop(&srv->iplimit_timer);
    } else if (on && !uv_is_active((uv_handle_t *)&srv->iplimit_timer)) {
        uv_timer_start(&srv->iplimit_timer, on_iplimit_timer, IPLIMIT_SWEEP_MS,
                       IPLIMIT_SWEEP_MS);
        uv_unref((uv_handle_t *)&srv->iplimit_timer);
    }
}

/* trusted_proxies (checked by the conf loader) into networks. */
static void parse_trusted(struct hub_server *srv)
{
    const char *p = srv->cfg->trusted_proxies;
    char err[128];
    while (p && *p) {
        const char *e = strchr(p, ' ');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        struct hub_ip net;
        if (hub_cidr_parse(p, n, &net, err, sizeof(err)) == 0) {
            srv->trusted = hub_xrealloc(srv->trusted, (srv->ntrusted + 1) * sizeof(net));
            srv->trusted[srv->ntrusted++] = net;
        }
        p += n;
        while (*p == ' ')
            p++;
    }
}

static void on_accept_tls(void *ud, int fd, const struct sockaddr *peer, socklen_t len)
{
    (void)peer, (void)len; /* the pump asks when it needs it (rarely: failures) */
    struct hub_server *srv = ud;
    hub_tls_accept(srv->tls, fd);
}

/* A TLS handshake is done: its plaintext end is an HTTP connection. */
static void on_tls_plain(void *ud, int fd, const struct sockaddr *peer, socklen_t len)
{
    struct hub_server *srv = ud;
    hub_http_accept_peer(srv->http, fd, peer, len, 1);
}

/* What encrypting deliveries cost counts in the writer's pacing. */
static void on_tls_cost(void *ud, uint64_t ns)
{
    struct hub_server *srv = ud;
    hub_writer_charge(&srv->writer, ns);
}

static void listeners_resume(struct hub_server *srv)
{
    hub_listener_resume(&srv->listener);
    hub_listener_resume(&srv->listener_plain);
}

static void listeners_pause(struct hub_server *srv)
{
    hub_listener_pause(&srv->listener);
    hub_listener_pause(&srv->listener_plain);
}

static void on_listen_timer(uv_timer_t *t)
{
    struct hub_server *srv = t->data;
    hub_log(HUB_LOG_WARN, "broker still down after %d ms: accepting clients anyway",
            WORKER_LISTEN_WAIT_MS);
    if (!srv->shutting_down)
        listeners_resume(srv);
}

/* `ud` is the hub: the broker's deliver and health share it. */
static void on_broker_health(void *ud, int up)
{
    struct hub_server *srv = hub_container_of(ud, struct hub_server, hub);
    hub_log(up ? HUB_LOG_INFO : HUB_LOG_WARN, "broker %s", up ? "up" : "down");
    hub_broker_health(&srv->hub, up);
    if (up && uv_is_active((uv_handle_t *)&srv->listen_timer)) {
        uv_timer_stop(&srv->listen_timer);
        if (!srv->shutting_down)
            listeners_resume(srv);
    }
}

/* policy_redis carries commands only: nothing is subscribed on it. */
static void policy_redis_deliver(void *ud, const char *channel, size_t len, struct hub_msg *m,
                                 const char *epoch)
{
}

static void policy_redis_health(void *ud, int up)
{
    hub_log(up ? HUB_LOG_INFO : HUB_LOG_WARN, "policy_redis %s", up ? "up" : "down");
}

/* POST /api/disconnect reached this instance (from any instance). */
static void on_disconnect_user(void *ud, const char *user, size_t len)
{
    struct hub_server *srv = ud;
    hub_sessions_disconnect_user(&srv->sessions, user, len);
}

/* The process's metrics, in data-path order; gauges read now. */
static void render_metrics(void *ud, struct hub_buf *b)
{
    struct hub_server *srv = ud;
    const struct hub_sessions *ss = &srv->sessions;
    const struct hub_writer *w = &srv->writer;

    hub_metric_one(b, "luahub_connections", "gauge", "Open WebSocket connections.",
                   hub_clients(&srv->hub));
    hub_metric_one(b, "luahub_connections_total", "counter", "WebSocket connections accepted.",
                   ss->connections_total);
    hub_metric_one(b, "luahub_connections_refused_total", "counter",
                   "WebSocket upgrades refused (limit, path, shutdown, policy).",
                   srv->connections_refused);
    hub_metric_one(b, "luahub_accept_pauses_total", "counter",
                   "Times accepting paused for 100 ms: out of file descriptors or memory.",
                   srv->listener.pauses + srv->listener_plain.pauses);
    hub_metric_one(b, "luahub_subscriptions", "gauge", "Subscriptions over all channels.",
                   hub_subscriptions(&srv->hub));
    hub_metric_one(b, "luahub_channels", "gauge", "Channels with at least one subscriber.",
                   hub_channels(&srv->hub));
    hub_metric_one(b, "luahub_recoveries_total", "counter",
                   "Subscribes with recover that got every missed message (recovered:true).",
                   srv->hub.recovered);
    hub_metric_one(b, "luahub_recoveries_failed_total", "counter",
                   "Subscribes with recover answered recovered:false.", srv->hub.unrecovered);
    hub_metric_one(b, "luahub_stream_reads_shared_total", "counter",
                   "Subscribes with recover or rewind served by a read another had asked.",
                   srv->hub.reads_shared);
    hub_metric_one(b, "luahub_history_repairs_total", "counter",
                   "Gaps in a history channel's deliveries filled from its history.",
                   srv->hub.repairs);
    hub_metric_one(b, "luahub_history_resets_total", "counter",
                   "Reset events sent: gaps that could not be filled.", srv->hub.resets);
    hub_metric_one(b, "luahub_messages_published_total", "counter",
                   "Messages published (one per channel).", srv->hub.published);
    hub_metric_one(b, "luahub_deliveries_total", "counter", "Frames queued to subscribers.",
                   srv->hub.deliveries);
    hub_metric_one(b, "luahub_bytes_out_total", "counter",
                   "Bytes written to WebSocket connections.", w->bytes_out);
    hub_metric_one(b, "luahub_writes_total", "counter",
                   "Socket writes on WebSocket connections (frames are coalesced).", w->writes);
    hub_metric_one(b, "luahub_flushes_total", "counter",
                   "Passes writing the queued frames of every connection.", w->flushes);
    hub_metric_one(b, "luahub_flush_slices_total", "counter",
                   "Slices of those passes (a slice writes for about 1 ms, then the loop turns).",
                   w->flush_slices);
    hub_metric_one(b, "luahub_flushes_paused_total", "counter",
                   "Flushes after a pause that let frames gather (under load).",
                   w->flushes_paused);
    hub_metric_one(b, "luahub_slow_consumer_closes_total", "counter",
                   "Connections closed with 4001 for a queue over max_queue_bytes.",
                   ss->slow_consumer_closes);
    hub_metric_family(b, "luahub_rate_limited_total", "counter",
                      "Commands answered rate_limited, by limit (command_rate, publish_rate).");
    hub_metric_value(b, "luahub_rate_limited_total", "limit=\"command\"", ss->rate_limited[0]);
    hub_metric_value(b, "luahub_rate_limited_total", "limit=\"publish\"", ss->rate_limited[1]);
    hub_metric_one(b, "luahub_rate_limit_closes_total", "counter",
                   "Connections closed with 4029 for ignoring rate limits.",
                   ss->rate_limit_closes);
    hub_metric_family(b, "luahub_connections_refused_per_address_total", "counter",
                      "Upgrades refused by max_connections_per_ip or connect_rate_per_ip.");
    hub_metric_value(b, "luahub_connections_refused_per_address_total",
                     "limit=\"max_connections_per_ip\"", srv->iplimit.refused_conns);
    hub_metric_value(b, "luahub_connections_refused_per_address_total",
                     "limit=\"connect_rate_per_ip\"", srv->iplimit.refused_rate);
    hub_metric_one(b, "luahub_origins_refused_total", "counter",
                   "Upgrades from a browser origin not allowed (allowed_origins).",
                   srv->origins_refused);
    hub_http_metrics(srv->http, b);
    if (srv->tls)
        hub_tls_metrics(srv->tls, b);
    hub_metric_family(b, "luahub_protocol_errors_total", "counter",
                      "Protocol errors answered, by code.");
    for (int i = 0; i < HUB_PERR__COUNT; i++) {
        char label[48];
        snprintf(label, sizeof(label), "code=\"%s\"", hub_proto_code_name(i));
        hub_metric_value(b, "luahub_protocol_errors_total", label, ss->protocol_errors[i]);
    }
    if (srv->policy)
        hub_policy_metrics(srv->policy, b);
    if (srv->broker)
        srv->broker->ops->metrics(srv->broker, b);
    if (srv->registry)
        hub_registry_metrics(srv->registry, b);
}

static void finish_shutdown(struct hub_server *srv)
{
    hub_server_done_cb done = srv->on_done;
    if (!done)
        return;
    srv->on_done = NULL;
    uv_timer_stop(&srv->shutdown_timer);
    done(srv);
}

static void on_all_gone(void *ud)
{
    finish_shutdown(ud);
}

int hub_server_init(struct hub_server *srv, uv_loop_t *loop,
                    const struct hub_config *cfg)
{
    char err[256];

    memset(srv, 0, sizeof(*srv));
    srv->loop = loop;
    srv->cfg = cfg;
    hub_random_hex(srv->instance, 6);
    hub_http_api_init(&srv->api, cfg, &srv->hub, &srv->sessions, reload_policy, srv);
    uv_timer_init(loop, &srv->shutdown_timer);
    srv->shutdown_timer.data = srv;
    uv_timer_init(loop, &srv->listen_timer);
    srv->listen_timer.data = srv;
    uv_timer_init(loop, &srv->iplimit_timer);
    srv->iplimit_timer.data = srv;
    set_iplimit(srv);
    srv->lua_budget_max = cfg->lua_max_instructions;
    parse_trusted(srv);
    hub_writer_init(&srv->writer, loop, &(struct hub_writer_options){
        .max_queue_bytes = cfg->max_queue_bytes,
        .write_delay_ms = cfg->write_delay,
        .write_pause_max_ms = cfg->write_pause_max,
        .ping_interval_ms = cfg->ping_interval * 1000u,
        .ping_timeout_ms = cfg->ping_timeout * 1000u,
    });
    srv->sessions = (struct hub_sessions){
        .cfg = cfg,
        .hub = &srv->hub,
        .writer = &srv->writer,
        .policy = &srv->policy,
        .all_gone = on_all_gone,
        .ud = srv,
        .iplimit = &srv->iplimit,
    };
    srv->policy_host = (struct hub_policy_host){
        .ops = &hub_session_policy_ops,
        .ud = &srv->sessions,
        .loop = loop,
        .cfg = cfg,
    };
    srv->broker = hub_broker_new(loop, cfg->broker, cfg->redis_prefix, hub_deliver,
                                 on_broker_health, &srv->hub, err, sizeof(err));
    if (!srv->broker) {
        hub_log(HUB_LOG_ERROR, "broker: %s", err);
        return -1;
    }
    srv->broker->presence_ttl = cfg->presence_ttl;
    if (cfg->policy_redis) {
        /* hub.redis's own connection: a broker we publish nothing on, used
         * for its commands (reconnects, timeouts, caps) */
        srv->policy_redis = hub_broker_new(loop, cfg->policy_redis, cfg->redis_prefix,
                                           policy_redis_deliver, policy_redis_health, srv,
                                           err, sizeof(err));
        if (!srv->policy_redis) {
            hub_log(HUB_LOG_ERROR, "policy_redis: %s", err);
            return -1;
        }
        srv->sessions.redis = srv->policy_redis;
    }
    hub_init(&srv->hub, srv->broker, srv->instance, cfg);
    hub_metrics_add(render_metrics, srv);
    return 0;
}

int hub_server_load_policy(struct hub_server *srv, struct hub_config_errors *errs)
{
    srv->policy = hub_policy_new(&srv->policy_host, errs);
    return srv->policy ? 0 : -1;
}

/* A reload may lower lua_max_instructions but not raise it past its value
 * at start: the watchdog's timeout is sized from it (main.c). */
struct reload_veto {
    struct hub_server *srv;
    const struct hub_config *fresh;
};

static int veto_key(void *ud, const char *key)
{
    struct reload_veto *v = ud;
    return !strcmp(key, "lua_max_instructions") &&
           v->fresh->lua_max_instructions > v->srv->lua_budget_max;
}

/* Loads the certificate files again, from the paths the hub started with
 * (a changed tls_* key takes a restart, as other keys do). Build aside,
 * check, swap: a bad pair keeps the current one. */
static int reload_tls(struct hub_server *srv, struct hub_config_errors *errs)
{
    struct hub_buf why = {0};

    if (!srv->tls)
        return 0;
    int rc = hub_tls_reload(srv->tls, &why);
    if (rc < 0) {
        hub_log(HUB_LOG_ERROR, "reload: %s: keeping the current certificate", why.p);
        if (errs) {
            errs->v = hub_xrealloc(errs->v, (errs->n + 1) * sizeof(char *));
            errs->v[errs->n++] = hub_xstrdup(why.p);
        }
    }
    hub_buf_free(&why);
    return rc;
}

int hub_server_reload_policy(struct hub_server *srv, struct hub_config_errors *errs)
{
    /* The conf file is read again; the keys a reload applies
     * (docs/config.md, "Reload") move into the running conf, where their
     * modules read them, and the new policy is built with them. If the
     * policy fails, they move back: the old policy goes on with the old
     * conf, and nothing of the reload is applied. */
    struct hub_config *live = (struct hub_config *)srv->cfg;
    struct hub_config_errors local = {0};
    struct hub_config_errors *e = errs ? errs : &local;
    struct hub_config fresh;
    struct hub_buf applied = {0}, restart = {0};
    uint64_t moved = 0;

    if (live->path) {
        hub_config_defaults(&fresh);
        if (hub_config_load(&fresh, live->path, e) < 0) {
            for (unsigned i = 0; i < e->n; i++)
                hub_log(HUB_LOG_ERROR, "reload: %s", e->v[i]);
            hub_log(HUB_LOG_ERROR, "reload: the conf file has problems: keeping the current "
                    "conf and policy");
            hub_config_free(&fresh);
            hub_config_errors_free(&local);
            return -1;
        }
        fresh.listen_set = live->listen_set;
        moved = hub_config_reload(live, &fresh, veto_key,
                                  &(struct reload_veto){srv, &fresh}, &applied, &restart);
    }
    int tls_rc = reload_tls(srv, errs);
    int rc = hub_policy_reload(&srv->policy, errs);
    if (rc < 0 && live->path) {
        hub_config_swap(live, &fresh, moved);
    } else if (rc == 0) {
        if (applied.len)
            hub_log(HUB_LOG_INFO, "reload: applied %s", applied.p);
        if (restart.len)
            hub_log(HUB_LOG_WARN, "reload: the conf file changed (%s): a reload does not "
                    "apply these keys; restart to apply them", restart.p);
        hub_log_set_level(live->log_level);
        set_iplimit(srv);
    }
    if (live->path)
        hub_config_free(&fresh);
    hub_buf_free(&applied);
    hub_buf_free(&restart);
    return rc < 0 || tls_rc < 0 ? -1 : 0;
}

/* With max_connections set, the open-files limit becomes what the process
 * can use: max_connections WebSocket connections, a quarter more for plain
 * HTTP connections, and FD_RESERVE for the hub's own (Redis, files, the
 * loop). libwebsockets sizes its descriptor tables by the limit when the
 * context is created, and Debian's build scans one of them on every close
 * (docs/internals.md, "Connection cost"): a limit far above the need costs
 * every connection. Raised when the need is above the soft limit (up to the
 * hard limit, with a warning when that is short), lowered when below. */
#define FD_RESERVE 1024
static void fit_fd_limit(const struct hub_config *cfg)
{
    struct rlimit rl;
    if (!cfg->max_connections || getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return;
    rlim_t want = (rlim_t)cfg->max_connections + cfg->max_connections / 4 + FD_RESERVE;
    if (rl.rlim_max != RLIM_INFINITY && want > rl.rlim_max) {
        hub_log(HUB_LOG_WARN,
                "max_connections %u needs about %llu descriptors, but the hard open-files "
                "limit is %llu: raise it (ulimit -n, LimitNOFILE)",
                cfg->max_connections, (unsigned long long)want,
                (unsigned long long)rl.rlim_max);
        want = rl.rlim_max;
    }
    if (want == rl.rlim_cur)
        return;
    rlim_t was = rl.rlim_cur;
    rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
        hub_log(HUB_LOG_WARN, "cannot set the open-files limit to %llu: %s",
                (unsigned long long)want, strerror(errno));
        return;
    }
    hub_log(HUB_LOG_INFO, "open-files limit %llu (was %llu): max_connections %u, a quarter "
            "more for HTTP, %d for the hub's own", (unsigned long long)want,
            (unsigned long long)was, cfg->max_connections, FD_RESERVE);
}

int hub_server_start(struct hub_server *srv)
{
    struct lws_context_creation_info info;
    const struct hub_config *cfg = srv->cfg;
    void *foreign[1] = {srv->loop};

    /* lws prints through us, errors and warnings only, but not while the
     * context and the vhost are created: a failure there gets one clear
     * line of ours instead of lws's internal ones. */
    lws_set_log_level(0, log_emit);
    fit_fd_limit(cfg);

    memset(&info, 0, sizeof(info));
    info.options = LWS_SERVER_OPTION_LIBUV | LWS_SERVER_OPTION_EXPLICIT_VHOSTS;
    info.foreign_loops = foreign;
    info.user = srv;
    info.pcontext = &srv->ctx;
    info.port = CONTEXT_PORT_NO_LISTEN;
    info.max_http_header_pool = HEADER_POOL;
    info.gid = -1;
    info.uid = -1;
    srv->ctx = lws_create_context(&info);
    if (!srv->ctx) {
        hub_log(HUB_LOG_ERROR,
                "cannot start libwebsockets on libuv: is the package "
                "libwebsockets-evlib-uv installed? (lws loads its libuv backend "
                "from %s/libwebsockets-evlib_uv.so)", LWS_INSTALL_LIBDIR);
        return -1;
    }

    srv->protocols[0] = (struct lws_protocols){
        .name = "luahub",
        .callback = hub_server_lws_callback,
        .per_session_data_size = sizeof(union pss),
        /* Bytes lws reads per readable event and per RECEIVE callback,
         * malloc'ed per connection (conf rx_buffer_size, >= 128 so that a
         * 125-byte control frame fits); larger messages are reassembled. */
        .rx_buffer_size = (size_t)cfg->rx_buffer_size,
        .tx_packet_size = TX_PACKET_SIZE,
    };
    /* No lws validity timers (all zero): keepalive is the writer's. lws
     * 4.1.6 keeps a timer per connection in one sorted list and inserts by
     * walking it, O(connections) for every connect and every PONG
     * (docs/internals.md, "Keepalive"). A NULL policy would get lws's
     * default (300 s), hence an explicit one. */
    srv->retry = (lws_retry_bo_t){0};

    memset(&info, 0, sizeof(info));
    info.vhost_name = "default";
    info.port = CONTEXT_PORT_NO_LISTEN_SERVER; /* the listener is ours */
    info.protocols = srv->protocols;
    info.options = LWS_SERVER_OPTION_LIBUV;
    info.retry_and_idle_policy = &srv->retry;
    srv->vhost = lws_create_vhost(srv->ctx, &info);
    if (!srv->vhost) {
        hub_log(HUB_LOG_ERROR, "cannot create the libwebsockets vhost");
        return -1;
    }
    lws_set_log_level(LLL_ERR | LLL_WARN, log_emit);
    srv->http = hub_http_new(srv->loop, &(struct hub_http_options){
        .max_body = cfg->max_message_size,
        .request_timeout_ms = cfg->request_timeout * 1000u,
        .idle_timeout_ms = cfg->http_idle_timeout * 1000u,
        .trusted = srv->trusted,
        .ntrusted = srv->ntrusted,
    }, &routes, srv);
    if (!srv->http)
        return -1;
    if (cfg->tls_cert) {
        struct hub_buf why = {0};
        srv->tls = hub_tls_new(srv->loop, cfg, on_tls_plain, on_tls_cost, srv, &why);
        if (!srv->tls)
            hub_log(HUB_LOG_ERROR, "%s", why.p);
        hub_buf_free(&why);
        if (!srv->tls)
            return -1;
    }
    const struct hub_listen_addr main_at = {cfg->listen, cfg->listen_host, cfg->listen_port,
                                            "listen or --listen"};
    const struct hub_listen_addr plain_at = {cfg->listen_plain, cfg->listen_plain_host,
                                             cfg->listen_plain_port, "listen_plain"};
    if (hub_listener_open(&srv->listener, srv->loop, cfg, &main_at,
                          srv->tls ? on_accept_tls : on_accept, srv) < 0 ||
        (cfg->listen_plain &&
         hub_listener_open(&srv->listener_plain, srv->loop, cfg, &plain_at, on_accept, srv) < 0))
        return -1;
    hub_writer_start(&srv->writer, srv->ctx);
    if (cfg->workers != 1 && !srv->broker->ops->up(srv->broker)) {
        /* A worker takes connections once its broker is up (or after
         * WORKER_LISTEN_WAIT_MS, degraded): a restarted worker would
         * otherwise get its share of new clients while it cannot yet
         * subscribe or publish for them. The port is bound now, so a
         * failure is still reported at start. */
        listeners_pause(srv);
        uv_timer_start(&srv->listen_timer, on_listen_timer, WORKER_LISTEN_WAIT_MS, 0);
    }
    /* The registry advertises the bound address, so it starts now. */
    char address[320];
    snprintf(address, sizeof(address), "%s:%d", cfg->listen_host, srv->listener.port);
    srv->registry = hub_broker_registry_new(srv->broker, &(struct hub_registry_options){
        .instance = srv->instance,
        .address = address,
        .prefix = cfg->redis_prefix,
        .disconnect_user = on_disconnect_user,
        .ud = srv,
    });
    srv->sessions.registry = srv->registry;

    /* Tests and scripts parse this line: keep "listening on HOST:PORT" last
     * (and "plain HTTP on HOST:PORT" before it, with listen_plain). */
    char plain[320] = "";
    if (srv->tls && cfg->listen_plain)
        snprintf(plain, sizeof(plain), ", plain HTTP on %s%s%s:%d",
                 strchr(cfg->listen_plain_host, ':') ? "[" : "", cfg->listen_plain_host,
                 strchr(cfg->listen_plain_host, ':') ? "]" : "", srv->listener_plain.port);
    hub_log(HUB_LOG_INFO | HUB_LOG_ALWAYS,
            "luahub %s (pid %d, instance %s, websocket path %s%s%s) listening on %s%s%s:%d",
            HUB_VERSION, (int)getpid(), srv->instance, cfg->websocket_path,
            srv->tls ? ", TLS" : "", plain,
            strchr(cfg->listen_host, ':') ? "[" : "", cfg->listen_host,
            strchr(cfg->listen_host, ':') ? "]" : "", srv->listener.port);
    return 0;
}

static void on_shutdown_timeout(uv_timer_t *t)
{
    struct hub_server *srv = t->data;
    hub_log(HUB_LOG_WARN, "shutdown_timeout (%u s) reached with %zu clients still open; "
            "closing them", srv->cfg->shutdown_timeout, hub_clients(&srv->hub));
    finish_shutdown(srv);
}

void hub_server_shutdown(struct hub_server *srv, hub_server_done_cb done)
{
    if (srv->shutting_down) {
        hub_log(HUB_LOG_INFO, "second signal: not waiting for clients");
        finish_shutdown(srv);
        return;
    }
    srv->shutting_down = 1;
    srv->on_done = done;
    if (srv->http)
        hub_http_shutdown(srv->http);
    /* Workers stop accepting now: the other workers take new clients. A
     * single process keeps accepting until it exits, to answer /healthz
     * with 503 and refuse upgrades. */
    if (srv->cfg->workers != 1) {
        listeners_pause(srv);
        uv_timer_stop(&srv->listen_timer);
    }
    hub_log(HUB_LOG_INFO, "shutting down: closing %zu connections (waiting up to %u s)",
            hub_clients(&srv->hub), srv->cfg->shutdown_timeout);
    if (hub_clients(&srv->hub))
        uv_timer_start(&srv->shutdown_timer, on_shutdown_timeout,
                       (uint64_t)srv->cfg->shutdown_timeout * 1000u, 0);
    hub_sessions_shutdown(&srv->sessions); /* all_gone may finish at once */
}

void hub_server_stop(struct hub_server *srv)
{
    srv->shutting_down = 1;
    srv->sessions.shutting_down = 1;
    hub_listener_close(&srv->listener);
    hub_listener_close(&srv->listener_plain);
    hub_tls_stop(srv->tls);
    hub_http_stop(srv->http);
    hub_registry_stop(srv->registry); /* before the broker it talks through */
    if (srv->broker)
        srv->broker->ops->stop(srv->broker);
    if (srv->policy_redis)
        srv->policy_redis->ops->stop(srv->policy_redis);
    if (srv->ctx)
        lws_context_destroy(srv->ctx);
    hub_writer_stop(&srv->writer);
    if (!uv_is_closing((uv_handle_t *)&srv->shutdown_timer))
        uv_close((uv_handle_t *)&srv->shutdown_timer, NULL);
    if (!uv_is_closing((uv_handle_t *)&srv->listen_timer))
        uv_close((uv_handle_t *)&srv->listen_timer, NULL);
    if (!uv_is_closing((uv_handle_t *)&srv->iplimit_timer))
        uv_close((uv_handle_t *)&srv->iplimit_timer, NULL);
}

void hub_server_free(struct hub_server *srv)
{
    hub_metrics_remove(render_metrics, srv);
    if (srv->ctx)
        lws_context_destroy(srv->ctx);
    if (srv->policy)
        hub_policy_free(srv->policy);
    srv->policy = NULL;
    hub_registry_free(srv->registry);
    srv->registry = NULL;
    hub_tls_free(srv->tls);
    srv->tls = NULL;
    hub_http_free(srv->http);
    srv->http = NULL;
    hub_http_api_free(&srv->api);
    hub_free(&srv->hub);
    if (srv->broker)
        srv->broker->ops->free(srv->broker);
    srv->broker = NULL;
    if (srv->policy_redis)
        srv->policy_redis->ops->free(srv->policy_redis);
    srv->policy_redis = NULL;
    hub_writer_free(&srv->writer);
    hub_iplimit_free(&srv->iplimit);
    free(srv->trusted);
    srv->trusted = NULL;
    hub_buf_free(&srv->sessions.scratch);
}
