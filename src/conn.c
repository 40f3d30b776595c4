/* WebSocket connections: receive, dispatch, bounded queue, coalesced writes.
 *
 * Write path: every outbound frame (deliveries, replies, the close frame) is
 * a reference in the connection's queue, and the connection goes on the
 * server's flush list. Once per loop iteration, after all I/O callbacks have
 * run (a uv_check handle, hub_server_flush), each listed connection writes
 * everything queued in one sendmsg() with one iovec per frame: no copy, one
 * syscall for all the publishes of that iteration. Only when the socket is
 * full do we ask lws for WRITEABLE (lws_callback_on_writable): asking for
 * every write flips the poll mask with epoll_ctl() twice per delivery, which
 * cost more than the write itself.
 *
 * We write to the socket ourselves instead of through lws_write() so that
 * several frames need neither a copy into one buffer nor one syscall each.
 * That is safe only at frame boundaries and while lws has nothing buffered:
 * a short write hands the rest of the frame to lws_write(LWS_WRITE_RAW),
 * which buffers it and sends it before anything else on this socket (its
 * own PINGs included), then calls WRITEABLE again. */
#include "luahub/conn.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "luahub/broker.h"
#include "luahub/log.h"
#include "luahub/metrics.h"
#include "luahub/policy.h"
#include "luahub/proto.h"
#include "luahub/registry.h"
#include "luahub/server.h"

#define WRITE_IOV_MAX 128           /* frames per sendmsg() */
#define WRITE_BYTES_MAX (256 * 1024) /* bytes per sendmsg() */
#define WRITE_ROUNDS_MAX 4          /* sendmsg() calls per WRITEABLE */
#define PROTO_ERROR_WINDOW_MS 10000
#define CLOSE_BACKSTOP_S 5          /* a peer that never reads is hung up */

static uint64_t now_ms(void)
{
    return hub_now_ns() / 1000000u;
}

static void arm(struct hub_conn *c)
{
    if (!(c->flags & HUB_CONN_ARMED)) {
        c->flags |= HUB_CONN_ARMED;
        lws_callback_on_writable(c->wsi);
    }
}

/* Puts the connection on the server's flush list. */
static void mark_dirty(struct hub_conn *c)
{
    if (!(c->flags & HUB_CONN_DIRTY)) {
        c->flags |= HUB_CONN_DIRTY;
        c->dirty_next = c->srv->dirty;
        c->srv->dirty = c;
    }
}

/* Replies (and welcome, push, close) do not wait for a deferred flush: a
 * publisher waiting for its acks would stall, and publish less per flush. */
static void mark_urgent(struct hub_conn *c)
{
    if ((c->flags & (HUB_CONN_DIRTY | HUB_CONN_URGENT)) == HUB_CONN_DIRTY) {
        c->flags |= HUB_CONN_URGENT;
        c->srv->nurgent++;
    }
}

/* Queues the reply encoded in srv->scratch and resets it. */
static void send_scratch(struct hub_conn *c)
{
    struct hub_server *srv = c->srv;
    struct hub_msg *m = hub_msg_text(srv->scratch.p, srv->scratch.len);
    hub_conn_send(c, m);
    hub_msg_unref(m);
    hub_buf_reset(&srv->scratch);
    mark_urgent(c);
}

void hub_conn_client_id(const struct hub_conn *c, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s-%llu", c->srv->instance, (unsigned long long)c->id);
}

/* The server's list of open connections is kept in the order they were
 * last heard from (oldest first), so keepalive looks at its head only.
 * A connection moves to the tail when it sends a frame: O(1). */
/* Loop time in ms, modulo 2^32: differences stay right for 49 days of
 * silence, and nobody is silent that long. */
static uint32_t now_ms32(const struct hub_server *srv)
{
    return (uint32_t)uv_now(srv->loop);
}

static void conns_append(struct hub_server *srv, struct hub_conn *c)
{
    c->next = NULL;
    c->prev = srv->conns_tail;
    if (srv->conns_tail)
        srv->conns_tail->next = c;
    else
        srv->conns = c;
    srv->conns_tail = c;
}

static void conns_unlink(struct hub_server *srv, struct hub_conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        srv->conns_tail = c->prev;
    c->prev = c->next = NULL;
}

/* Drops the connection without a close handshake (its peer is gone or
 * mute): lws closes the socket from its own timeout callback. lws services
 * its timers only after one of its own events (with validity timers off,
 * the next may be its 30 s housekeeping), and drops happen from our timers
 * and flushes too: lws_cancel_service wakes it now, once for all the drops
 * until lws has seen it (LWS_CALLBACK_EVENT_WAIT_CANCELLED, server.c). */
static void drop(struct hub_conn *c)
{
    hub_queue_clear(&c->q);
    c->flags |= HUB_CONN_CLOSING;
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
    if (!c->srv->lws_woken) {
        c->srv->lws_woken = 1;
        lws_cancel_service(lws_get_context(c->wsi));
    }
}

void hub_conn_seen(struct hub_conn *c)
{
    struct hub_server *srv = c->srv;

    c->flags &= ~HUB_CONN_PINGED;
    c->seen_ms = now_ms32(srv);
    if (srv->conns_tail != c) {
        conns_unlink(srv, c);
        conns_append(srv, c);
    }
}

void hub_conn_keepalive(struct hub_server *srv)
{
    uint32_t now = now_ms32(srv), interval = srv->cfg->ping_interval * 1000u;
    uint32_t hangup = interval + srv->cfg->ping_timeout * 1000u;
    struct hub_conn *c, *next;

    for (c = srv->conns; c && now - c->seen_ms >= interval; c = next) {
        next = c->next;
        if (c->flags & HUB_CONN_CLOSING)
            continue;
        if (!(c->flags & HUB_CONN_PINGED)) {
            c->flags |= HUB_CONN_PINGED;
            hub_queue_push(&c->q, srv->ping);
            mark_dirty(c);
            mark_urgent(c);
        } else if (now - c->seen_ms >= hangup) {
            hub_log(HUB_LOG_DEBUG, "[conn %llu] silent for %u ms: dropped",
                    (unsigned long long)c->id, now - c->seen_ms);
            drop(c);
        }
    }
}

void hub_conn_open(struct hub_conn *c, struct hub_server *srv, struct lws *wsi,
                   struct hub_conn_pending *pending)
{
    char client[64], peer[64] = "";

    c->wsi = wsi;
    c->srv = srv;
    c->close_code = 1006; /* until a close frame says otherwise */
    c->close_reason = "";
    if (pending) {
        c->id = pending->id;
        c->user = pending->user;
        c->info_json = pending->info_json;
        free(pending);
    } else {
        c->id = ++srv->next_conn_id;
    }
    c->seen_ms = now_ms32(srv);
    conns_append(srv, c);
    hub_server_add_conn(srv, c);
    hub_metrics.connections++;
    hub_metrics.connections_total++;

    if (hub_log_enabled(HUB_LOG_DEBUG)) {
        lws_get_peer_simple(wsi, peer, sizeof(peer));
        hub_log(HUB_LOG_DEBUG, "[conn %llu] connected from %s%s%s",
                (unsigned long long)c->id, peer, c->user ? " as " : "",
                c->user ? c->user : "");
    }
    hub_conn_client_id(c, client, sizeof(client));
    if (srv->registry && hub_registry_conn_open(srv->registry, client, c->user,
                                                c->user ? strlen(c->user) : 0))
        c->flags |= HUB_CONN_REGISTERED;
    hub_proto_encode_welcome(&srv->scratch, client, HUB_VERSION,
                             srv->cfg->ping_interval);
    send_scratch(c);
}

static void leave_all(struct hub_conn *c)
{
    struct hub_server *srv = c->srv;
    hub_metrics.subscriptions -= c->nsubs;
    hub_chan_unsubscribe_all(&srv->chans, &c->subs);
    c->nsubs = 0;
    hub_metrics.channels = srv->chans.nchans;
}

void hub_conn_closed(struct hub_conn *c)
{
    struct hub_server *srv = c->srv;

    if (!srv) /* never reached ESTABLISHED */
        return;
    /* Nothing may be queued from here on: leaving the channels below can
     * complete pending subscribes, whose replies must not put this
     * connection back on the flush list. */
    c->flags |= HUB_CONN_CLOSING;
    if (srv->registry) {
        char client[64];
        hub_conn_client_id(c, client, sizeof(client));
        hub_registry_conn_close(srv->registry, client, c->flags & HUB_CONN_REGISTERED);
    }
    if (srv->policy && hub_policy_has(srv->policy, HUB_HOOK_DISCONNECT))
        hub_policy_on_disconnect(srv->policy, c, c->close_code, c->close_reason);
    if (srv->policy)
        hub_policy_conn_gone(srv->policy, c);
    if (c->flags & HUB_CONN_DIRTY) {
        struct hub_conn **pp = &srv->dirty;
        while (*pp && *pp != c)
            pp = &(*pp)->dirty_next;
        if (*pp)
            *pp = c->dirty_next;
        if (c->flags & HUB_CONN_URGENT)
            srv->nurgent--;
        c->flags &= ~(HUB_CONN_DIRTY | HUB_CONN_URGENT);
    }
    if (c->flags & HUB_CONN_CULL) {
        struct hub_conn **pp = &srv->culls;
        while (*pp && *pp != c)
            pp = &(*pp)->cull_next;
        if (*pp)
            *pp = c->cull_next;
    }
    leave_all(c);
    hub_queue_clear(&c->q);
    free(c->rx);
    c->rx = NULL;
    free(c->user);
    free(c->info_json);
    c->user = c->info_json = NULL;
    hub_server_remove_conn(srv, c);
    conns_unlink(srv, c);
    hub_metrics.connections--;
    hub_log(HUB_LOG_DEBUG, "[conn %llu] closed", (unsigned long long)c->id);
    c->srv = NULL;
    hub_server_conn_gone(srv);
}

static void queue_close(struct hub_conn *c, uint16_t code, const char *reason)
{
    c->close_code = code;
    c->close_reason = reason;
    struct hub_msg *m = hub_msg_close(code, reason);
    hub_queue_push(&c->q, m);
    hub_msg_unref(m);
    c->flags |= HUB_CONN_CLOSING;
    mark_dirty(c);
    mark_urgent(c);
    lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_OK, CLOSE_BACKSTOP_S);
}

void hub_conn_send(struct hub_conn *c, struct hub_msg *m)
{
    if (c->flags & HUB_CONN_CLOSING)
        return;
    if (c->q.count && c->q.bytes + m->frame_len > c->srv->cfg->max_queue_bytes) {
        /* Slow consumer: stop queueing now, unlink after the fan-out loop
         * (unlinking here would reorder the channel array being walked). */
        c->flags |= HUB_CONN_CLOSING | HUB_CONN_CULL;
        hub_queue_clear(&c->q);
        c->cull_next = c->srv->culls;
        c->srv->culls = c;
        return;
    }
    hub_queue_push(&c->q, m);
    mark_dirty(c);
}

void hub_conn_cull(struct hub_conn *c)
{
    c->flags &= ~HUB_CONN_CULL;
    leave_all(c);
    hub_metrics.slow_consumer_closes++;
    hub_log(HUB_LOG_WARN,
            "[conn %llu] slow consumer: queue over max_queue_bytes (%llu), closing with 4001",
            (unsigned long long)c->id,
            (unsigned long long)c->srv->cfg->max_queue_bytes);
    queue_close(c, 4001, "slow consumer");
}

void hub_conn_close(struct hub_conn *c, uint16_t code, const char *reason,
                    int drop_queue)
{
    if (c->flags & HUB_CONN_CLOSING)
        return;
    if (drop_queue)
        hub_queue_clear(&c->q);
    queue_close(c, code, reason);
}

/* Answers a command with an error. Garbage (malformed or unknown commands)
 * counts against max_protocol_errors per window; past it the connection is
 * closed with 4008. */
static void proto_error(struct hub_conn *c, struct hub_span id, int code,
                        const char *message)
{
    struct hub_server *srv = c->srv;

    hub_metrics.protocol_errors[code]++;
    hub_proto_encode_error(&srv->scratch, id, code, message);
    send_scratch(c);

    if (code != HUB_PERR_BAD_REQUEST && code != HUB_PERR_UNKNOWN_OP &&
        code != HUB_PERR_INVALID_CHANNEL)
        return;
    /* A leaky bucket: each garbage error adds 1000 milli-errors, the bucket
     * drains max_protocol_errors per PROTO_ERROR_WINDOW_MS, and going over
     * max_protocol_errors closes. A burst of more than max errors closes at
     * once; a client that errs now and then never does. O(1) state. */
    uint64_t now = now_ms(), max = srv->cfg->max_protocol_errors;
    uint64_t leak = (now - c->proto_window_ms) * max * 1000 / PROTO_ERROR_WINDOW_MS;
    c->proto_errors = leak >= c->proto_errors ? 0 : c->proto_errors - (uint32_t)leak;
    c->proto_window_ms = now;
    c->proto_errors += 1000;
    if (c->proto_errors > max * 1000) {
        hub_log(HUB_LOG_WARN,
                "[conn %llu] more than %u protocol errors in %d s, closing with 4008",
                (unsigned long long)c->id, srv->cfg->max_protocol_errors,
                PROTO_ERROR_WINDOW_MS / 1000);
        hub_conn_close(c, 4008, "too many protocol errors", 0);
    }
}

static int is_subscribed(const struct hub_conn *c, const char *name, size_t len)
{
    const struct hub_chan *ch = hub_chan_find(&c->srv->chans, name, len);
    if (!ch)
        return 0;
    for (const struct hub_sub *s = c->subs; s; s = s->next)
        if (s->chan == ch)
            return 1;
    return 0;
}

/* Subscribes locally; a new subscription is also announced to the broker,
 * whose `cb` (may be NULL) says when delivery is guaranteed. Returns 1 if
 * subscribed now (cb will fire), 0 if it already was (cb will not), -1 if
 * over max_channels_per_conn. */
static int subscribe_cb(struct hub_conn *c, const char *name, size_t len,
                        hub_broker_subscribe_cb cb, void *ud)
{
    struct hub_server *srv = c->srv;

    if (c->nsubs >= srv->cfg->max_channels_per_conn)
        return is_subscribed(c, name, len) ? 0 : -1;
    if (!hub_chan_subscribe(&srv->chans, &c->subs, c, name, len))
        return 0;
    c->nsubs++;
    hub_metrics.subscriptions++;
    hub_metrics.channels = srv->chans.nchans;
    srv->broker->ops->subscribe(srv->broker, name, len, cb, ud);
    return 1;
}

int hub_conn_subscribe(struct hub_conn *c, const char *name, size_t len)
{
    return subscribe_cb(c, name, len, NULL, NULL);
}

int hub_conn_unsubscribe(struct hub_conn *c, const char *name, size_t len)
{
    struct hub_server *srv = c->srv;

    if (hub_chan_unsubscribe(&srv->chans, &c->subs, name, len) < 0)
        return -1;
    c->nsubs--;
    hub_metrics.subscriptions--;
    hub_metrics.channels = srv->chans.nchans;
    return 0;
}

void hub_conn_push(struct hub_conn *c, const char *json, size_t len)
{
    struct hub_server *srv = c->srv;
    hub_buf_appends(&srv->scratch, "{\"op\":\"push\",\"data\":");
    hub_buf_append(&srv->scratch, json, len);
    hub_buf_appends(&srv->scratch, "}");
    send_scratch(c);
}

/* A close code a peer may send (RFC 6455 §7.4.1-2, the rule lws 4.1.6
 * applies too). 1005, 1006 and 1015 are never sent on the wire. */
static int close_code_valid(unsigned code)
{
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) ||
           (code >= 3000 && code <= 4999);
}

int hub_conn_peer_closed(struct hub_conn *c, const void *payload, size_t len)
{
    const unsigned char *p = payload;
    static const unsigned char protocol_error[2] = {1002 >> 8, 1002 & 0xff};

    if (c->flags & HUB_CONN_CLOSING)
        return -1; /* the answer to our close: the handshake is complete */
    c->close_code = len >= 2 ? (uint16_t)(p[0] << 8 | p[1]) : 1005;
    c->close_reason = "";
    /* A 1-byte payload, a code nobody may send, or a reason that is not
     * UTF-8 (RFC 6455 §5.5.1, §7.4, §8.1): answered with 1002, not echoed. */
    if (len == 1 || (len >= 2 && (!close_code_valid(c->close_code) ||
                                  !hub_proto_utf8_valid((const char *)p + 2, len - 2)))) {
        hub_log(HUB_LOG_DEBUG, "[conn %llu] invalid close frame (%zu bytes, code %u): "
                "closing with 1002", (unsigned long long)c->id, len,
                len >= 2 ? (unsigned)c->close_code : 0u);
        c->close_code = 1002;
        c->close_reason = "invalid close frame";
        p = protocol_error;
        len = 2;
    }
    c->flags |= HUB_CONN_CLOSING;
    hub_queue_clear(&c->q); /* nothing may follow the echo of the close */

    /* Echo the close (its status code, RFC 6455 5.5.1) at once and hang
     * up. lws would echo it from a WRITEABLE callback: two epoll_ctl calls
     * and a loop iteration more per connection. lws holds no bytes here
     * (it hangs up itself before this callback when it does); if the
     * socket takes less than the 4 bytes, lws echoes instead. */
    unsigned char frame[4] = {0x88, 0};
    size_t n = 2;
    if (len >= 2) {
        frame[1] = 2;
        frame[2] = p[0];
        frame[3] = p[1];
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

/* Maps a policy verdict that is not ALLOW to the error reply. */
static void policy_refused(struct hub_conn *c, struct hub_span id, enum hub_verdict v,
                           const char *reason, int deny_code)
{
    if (v == HUB_DENY)
        proto_error(c, id, deny_code, reason[0] ? reason : "refused by policy");
    else
        proto_error(c, id, HUB_PERR_INTERNAL, "the policy failed; the action was refused");
}

/* A command whose reply waits for the broker (subscribe: the SUBSCRIBE is
 * confirmed; publish: every message was accepted). It names the connection
 * by id, never by pointer: the connection may be gone when it completes. */
struct pending {
    struct hub_server *srv;
    uint64_t conn_id;
    int remaining;          /* completions still to come (+1 while emitting) */
    int failed;
    uint32_t id_len;
    uint32_t channel_len;
    char id[160];           /* raw JSON id: at most 128 bytes (proto.c) */
    char channel[HUB_CHANNEL_MAX + 1];
};

static struct pending *pending_new(struct hub_conn *c, struct hub_span id,
                                   const char *channel, size_t channel_len)
{
    struct pending *op = hub_xmalloc(sizeof(*op));
    op->srv = c->srv;
    op->conn_id = c->id;
    op->remaining = 1;
    op->failed = 0;
    op->id_len = id.len < sizeof(op->id) ? (uint32_t)id.len : 0;
    if (op->id_len) /* an absent id has p == NULL */
        memcpy(op->id, id.p, op->id_len);
    op->channel_len = (uint32_t)channel_len;
    memcpy(op->channel, channel, channel_len);
    op->channel[channel_len] = '\0';
    return op;
}

/* The connection a pending reply is for, if it is still open. */
static struct hub_conn *pending_conn(const struct pending *op)
{
    struct hub_conn *c = hub_server_conn_by_id(op->srv, op->conn_id);
    return c && !(c->flags & HUB_CONN_CLOSING) ? c : NULL;
}

static void on_subscribed(void *ud, int status)
{
    struct pending *op = ud;
    struct hub_conn *c = pending_conn(op);
    struct hub_span id = {op->id, op->id_len};

    if (status == HUB_BROKER_CANCELED) {
        /* The client unsubscribed before Redis confirmed: the subscribe did
         * happen (and was undone), so it is answered ok, before the
         * unsubscribe's own reply. On a closing connection this is a no-op. */
        if (c) {
            hub_proto_encode_ok(&op->srv->scratch, id, op->channel, op->channel_len);
            send_scratch(c);
        }
        free(op);
        return;
    }
    if (c && status == HUB_BROKER_OK) {
        hub_proto_encode_ok(&op->srv->scratch, id, op->channel, op->channel_len);
        send_scratch(c);
    } else if (c) {
        hub_conn_unsubscribe(c, op->channel, op->channel_len);
        proto_error(c, id, HUB_PERR_UNAVAILABLE,
                    "the broker is unavailable: not subscribed, try again later");
    }
    free(op);
}

static void do_subscribe(struct hub_conn *c, const struct hub_cmd *cmd)
{
    struct hub_server *srv = c->srv;
    const char *name = cmd->channel;
    size_t len = cmd->channel_len;
    char eff[HUB_CHANNEL_MAX + 1], reason[256];

    if (srv->policy && hub_policy_has(srv->policy, HUB_HOOK_SUBSCRIBE)) {
        enum hub_verdict v = hub_policy_on_subscribe(srv->policy, c, name, len, eff, &len,
                                                     reason, sizeof(reason));
        if (v != HUB_ALLOW) {
            policy_refused(c, cmd->id, v, reason, HUB_PERR_FORBIDDEN);
            return;
        }
        name = eff;
    }
    struct pending *op = pending_new(c, cmd->id, name, len);
    int r = subscribe_cb(c, name, len, on_subscribed, op);
    if (r == 1)
        return; /* on_subscribed replies */
    free(op);
    if (r < 0) {
        char msg[128];
        snprintf(msg, sizeof(msg),
                 "at most %u channels per connection (max_channels_per_conn)",
                 srv->cfg->max_channels_per_conn);
        proto_error(c, cmd->id, HUB_PERR_LIMIT_EXCEEDED, msg);
        return;
    }
    hub_proto_encode_ok(&srv->scratch, cmd->id, name, len);
    send_scratch(c);
}

static void do_unsubscribe(struct hub_conn *c, const struct hub_cmd *cmd)
{
    struct hub_server *srv = c->srv;

    if (hub_conn_unsubscribe(c, cmd->channel, cmd->channel_len) < 0) {
        char msg[HUB_CHANNEL_MAX + 32];
        snprintf(msg, sizeof(msg), "not subscribed to '%s'", cmd->channel);
        proto_error(c, cmd->id, HUB_PERR_NOT_SUBSCRIBED, msg);
        return;
    }
    hub_proto_encode_ok(&srv->scratch, cmd->id, NULL, 0);
    send_scratch(c);
    if (srv->policy && hub_policy_has(srv->policy, HUB_HOOK_UNSUBSCRIBE))
        hub_policy_on_unsubscribe(srv->policy, c, cmd->channel, cmd->channel_len);
}

/* One message of a publish was accepted or refused by the broker; the
 * reply goes out with the last one. */
static void on_published(void *ud, int status, uint64_t offset)
{
    struct pending *op = ud;
    (void)offset;

    if (status != HUB_BROKER_OK)
        op->failed = 1;
    if (--op->remaining > 0)
        return;
    struct hub_conn *c = pending_conn(op);
    struct hub_span id = {op->id, op->id_len};
    if (c && !op->failed) {
        hub_proto_encode_ok(&op->srv->scratch, id, NULL, 0);
        send_scratch(c);
    } else if (c) {
        proto_error(c, id, HUB_PERR_UNAVAILABLE,
                    "the broker is unavailable: the message was not published");
    }
    free(op);
}

static void emit_publish(void *ud, const char *channel, size_t channel_len,
                         const char *data, size_t data_len)
{
    struct pending *op = ud;
    op->remaining++;
    if (hub_server_publish_cb(op->srv, channel, channel_len, data, data_len,
                              on_published, op) < 0) {
        op->remaining--;
        op->failed = 1;
    }
}

static void do_publish(struct hub_conn *c, const struct hub_cmd *cmd)
{
    struct hub_server *srv = c->srv;
    struct pending *op = pending_new(c, cmd->id, cmd->channel, cmd->channel_len);
    char reason[256];

    if (srv->policy && hub_policy_has(srv->policy, HUB_HOOK_PUBLISH)) {
        enum hub_verdict v = hub_policy_on_publish(srv->policy, c, cmd->channel,
                                                   cmd->channel_len, cmd->data.p,
                                                   cmd->data.len, emit_publish, op,
                                                   reason, sizeof(reason));
        if (v != HUB_ALLOW) {
            /* Emits happen only on ALLOW, so nothing is in flight. */
            free(op);
            policy_refused(c, cmd->id, v, reason, HUB_PERR_FORBIDDEN);
            return;
        }
    } else {
        emit_publish(op, cmd->channel, cmd->channel_len, cmd->data.p, cmd->data.len);
    }
    on_published(op, HUB_BROKER_OK, 0); /* drops the guard: replies if all are done */
}

static void do_rpc(struct hub_conn *c, const struct hub_cmd *cmd)
{
    struct hub_server *srv = c->srv;
    struct hub_buf result = {0};
    char reason[256];

    if (!srv->policy || !hub_policy_has(srv->policy, HUB_HOOK_RPC)) {
        proto_error(c, cmd->id, HUB_PERR_UNKNOWN_OP,
                    "op 'rpc' needs an on_rpc hook in the policy");
        return;
    }
    enum hub_verdict v = hub_policy_on_rpc(srv->policy, c, cmd->method, cmd->method_len,
                                           cmd->data.p, cmd->data.len, &result, reason,
                                           sizeof(reason));
    if (v == HUB_ALLOW) {
        struct hub_span data = {result.p, result.len};
        hub_proto_encode_ok_data(&srv->scratch, cmd->id, data);
        send_scratch(c);
    } else {
        policy_refused(c, cmd->id, v, reason, HUB_PERR_RPC_ERROR);
    }
    hub_buf_free(&result);
}

static void handle(struct hub_conn *c, const char *p, size_t n, int binary)
{
    struct hub_server *srv = c->srv;
    struct hub_cmd cmd;
    struct hub_proto_error err;
    static const struct hub_span no_id;

    if (binary) {
        proto_error(c, no_id, HUB_PERR_BAD_REQUEST,
                    "binary frames are not supported: send each command as a JSON text frame");
        return;
    }
    if (hub_proto_decode(p, n, &cmd, &err) < 0) {
        if (err.invalid_utf8) {
            /* Not a protocol error of ours: the frame itself is invalid
             * (RFC 6455 §8.1): the connection fails with 1007. */
            hub_log(HUB_LOG_INFO, "[conn %llu] text frame with invalid UTF-8: closing with 1007",
                    (unsigned long long)c->id);
            hub_metrics.protocol_errors[HUB_PERR_BAD_REQUEST]++;
            c->flags |= HUB_CONN_RX_INVALID;
            return;
        }
        proto_error(c, cmd.id, err.code, err.message);
        return;
    }
    switch (cmd.op) {
    case HUB_OP_SUBSCRIBE:
        do_subscribe(c, &cmd);
        break;
    case HUB_OP_UNSUBSCRIBE:
        do_unsubscribe(c, &cmd);
        break;
    case HUB_OP_PUBLISH:
        do_publish(c, &cmd);
        break;
    case HUB_OP_PING:
        hub_proto_encode_ok(&srv->scratch, cmd.id, NULL, 0);
        send_scratch(c);
        break;
    case HUB_OP_RPC:
        do_rpc(c, &cmd);
        break;
    default:
        proto_error(c, cmd.id, HUB_PERR_INTERNAL, "unhandled op");
        break;
    }
}

/* What RECEIVE returns after a message was handled: -1 with close 1007
 * set when its text was not UTF-8 (lws sends the close frame from this
 * path, docs/internals.md "WebSocket closes"), else 0. */
static int rx_verdict(struct hub_conn *c)
{
    if (!(c->flags & HUB_CONN_RX_INVALID))
        return 0;
    c->close_code = 1007;
    c->close_reason = "invalid UTF-8";
    c->flags |= HUB_CONN_CLOSING;
    hub_queue_clear(&c->q);
    lws_close_reason(c->wsi, LWS_CLOSE_STATUS_INVALID_PAYLOAD,
                     (unsigned char *)"invalid UTF-8", 13);
    return -1;
}

int hub_conn_receive(struct hub_conn *c, const void *in, size_t len)
{
    struct lws *wsi = c->wsi;
    uint64_t max = c->srv->cfg->max_message_size;
    int final = lws_is_final_fragment(wsi) && !lws_remaining_packet_payload(wsi);

    if (c->flags & HUB_CONN_CLOSING)
        return 0;
    hub_conn_seen(c);

    if (!(c->flags & HUB_CONN_RX_ACTIVE)) {
        if (lws_frame_is_binary(wsi))
            c->flags |= HUB_CONN_RX_BINARY;
        else
            c->flags &= ~HUB_CONN_RX_BINARY;
        if (final && len <= max) {
            /* Fast path: the whole message in one callback, no copy. */
            handle(c, in, len, c->flags & HUB_CONN_RX_BINARY);
            hub_server_flush_culls(c->srv);
            return rx_verdict(c);
        }
        c->flags |= HUB_CONN_RX_ACTIVE;
        c->rx_len = 0;
    }

    if ((uint64_t)c->rx_len + len > max) {
        hub_log(HUB_LOG_INFO, "[conn %llu] message over max_message_size (%llu), closing with 1009",
                (unsigned long long)c->id, (unsigned long long)max);
        free(c->rx);
        c->rx = NULL;
        c->rx_len = c->rx_cap = 0;
        c->flags &= ~HUB_CONN_RX_ACTIVE;
        lws_close_reason(wsi, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE,
                         (unsigned char *)"message too large", 17);
        return -1;
    }
    if (c->rx_len + len > c->rx_cap) {
        size_t cap = c->rx_cap ? c->rx_cap : 1024;
        while (cap < c->rx_len + len)
            cap *= 2;
        if (cap > max)
            cap = max;
        c->rx = hub_xrealloc(c->rx, cap);
        c->rx_cap = (uint32_t)cap;
    }
    if (len) /* a zero-length fragment: c->rx may still be NULL */
        memcpy(c->rx + c->rx_len, in, len);
    c->rx_len += (uint32_t)len;
    if (!final)
        return 0;

    c->flags &= ~HUB_CONN_RX_ACTIVE;
    handle(c, (const char *)c->rx, c->rx_len, c->flags & HUB_CONN_RX_BINARY);
    /* Reassembly is the rare path: give the buffer back between messages. */
    free(c->rx);
    c->rx = NULL;
    c->rx_len = c->rx_cap = 0;
    hub_server_flush_culls(c->srv);
    return rx_verdict(c);
}

/* Writes queued frames until the queue is empty, the socket is full or lws
 * holds buffered bytes. Returns 0, or -1 on a socket error. */
static int write_queued(struct hub_conn *c)
{
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
        hub_metrics.writes++;
        hub_metrics.bytes_out += (uint64_t)w;

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
    else if (c->flags & HUB_CONN_CLOSING)
        c->flags |= HUB_CONN_CLOSE_SENT; /* now wait for the peer's close */
    return 0;
}

int hub_conn_writeable(struct hub_conn *c)
{
    c->flags &= ~HUB_CONN_ARMED;
    return write_queued(c);
}

void hub_conn_flush(struct hub_conn *c)
{
    c->flags &= ~(HUB_CONN_DIRTY | HUB_CONN_URGENT);
    /* While WRITEABLE is requested, lws holds bytes or the socket was full:
     * that callback writes, in order. */
    if (c->flags & HUB_CONN_ARMED)
        return;
    if (write_queued(c) < 0)
        drop(c); /* the peer is gone */
}
