/* WebSocket sessions, the side other modules call (include/luahub/
 * session.h): a session's open and close, the walks over every session
 * (shutdown, an API disconnect), the hub's client ops (deliver, culled, the
 * presence entry) and the policy's host interface (hub_session_policy_ops).
 * Receiving, dispatching and answering commands are session.c; what the two
 * share is session_impl.h. Loop thread only. */
#include "luahub/session.h"
#include "session_impl.h"

#include <stdlib.h>
#include <string.h>

#include "luahub/config.h"
#include "luahub/log.h"
#include "luahub/proto.h"
#include "luahub/registry.h"

/* What presence shows of a client, and the pc.user and pc.info it was built
 * from (built again when the policy changes them). */
struct hub_pentry {
    const char *user, *info;
    size_t len;
    char text[];                    /* "client":..,"user":..,"info":.. */
};

static struct hub_session *of_pc(const struct hub_policy_conn *c)
{
    return hub_container_of(c, struct hub_session, pc);
}

/* ---- the hub's client ops ----------------------------------------------- */

static int on_deliver(struct hub_client *c, struct hub_msg *m)
{
    return hub_writer_send(&of_client(c)->wc, m);
}

static void on_culled(struct hub_client *c)
{
    struct hub_session *s = of_client(c);
    s->ss->slow_consumer_closes++;
    hub_log(HUB_LOG_WARN,
            "[conn %llu] slow consumer: queue over max_queue_bytes (%llu), closing with 4001",
            (unsigned long long)c->id, (unsigned long long)s->ss->cfg->max_queue_bytes);
    hub_session_close_with(s, 4001, "slow consumer", 1);
}

/* What presence shows of this client: its name, user and info, built
 * again when the policy has changed conn.user or conn.info since. */
static void client_presence(struct hub_client *c, const char **user, size_t *user_len,
                            const char **entry, size_t *entry_len)
{
    struct hub_session *s = of_client(c);
    struct hub_pentry *pe = s->entry;
    if (!pe || pe->user != s->pc.user || pe->info != s->pc.info_json) {
        struct hub_buf e = {0};
        char client[64];
        hub_client_name(s->ss->hub, c->id, client, sizeof(client));
        hub_buf_appends(&e, "\"client\":");
        hub_buf_append_json_string(&e, client, strlen(client));
        if (s->pc.user) {
            hub_buf_appends(&e, ",\"user\":");
            hub_buf_append_json_string(&e, s->pc.user, strlen(s->pc.user));
        }
        if (s->pc.info_json) {
            hub_buf_appends(&e, ",\"info\":");
            hub_buf_appends(&e, s->pc.info_json);
        }
        free(pe);
        pe = s->entry = hub_xmalloc(sizeof(*pe) + e.len + 1);
        memcpy(pe->text, e.p, e.len + 1);
        pe->len = e.len;
        pe->user = s->pc.user;
        pe->info = s->pc.info_json;
        hub_buf_free(&e);
    }
    *user = s->pc.user;
    *user_len = s->pc.user ? strlen(s->pc.user) : 0;
    *entry = pe->text;
    *entry_len = pe->len;
}

static const struct hub_client_ops client_ops = {
    .deliver = on_deliver,
    .culled = on_culled,
    .presence = client_presence,
};

/* ---- lifetime ------------------------------------------------------------ */

void hub_conn_pending_free(struct hub_conn_pending *p)
{
    if (!p)
        return;
    free(p->user);
    free(p->info_json);
    free(p->protocol);
    free(p);
}

/* The client's address: what the HTTP side saw (the TCP peer, or the TLS
 * client behind our socketpair, or behind trusted_proxies the client that
 * X-Forwarded-For names; docs/protocol.md, "Client addresses"), else the
 * socket's peer. */
static void peer_addr(const struct hub_session *s, char *out, size_t n)
{
    if (s->ip.family)
        hub_ip_format(&s->ip, out, n);
    else
        hub_writer_peer(&s->wc, out, n);
}

void hub_session_open(struct hub_session *s, struct hub_sessions *ss, struct lws *wsi,
                      struct hub_conn_pending *pending)
{
    char client[64];
    uint64_t id = pending ? pending->id : hub_next_id(ss->hub);

    s->ss = ss;
    s->close_code = 1006; /* until a close frame says otherwise */
    s->pw.done = hub_session_hook_done;
    hub_client_add(ss->hub, &s->client, &client_ops, id);
    hub_writer_open(ss->writer, &s->wc, wsi, id);
    s->pc.id = id;
    if (pending) {
        s->pc.user = pending->user;
        s->pc.info_json = pending->info_json;
        s->pc.protocol = pending->protocol;
        s->ip = pending->ip;
        free(pending);
    }
    s->flags = HUB_SESS_OPEN;
    ss->connections_total++;

    if (hub_log_enabled(HUB_LOG_DEBUG)) {
        char peer[64];
        peer_addr(s, peer, sizeof(peer));
        hub_log(HUB_LOG_DEBUG, "[conn %llu] connected from %s%s%s", (unsigned long long)id,
                peer, s->pc.user ? " as " : "", s->pc.user ? s->pc.user : "");
    }
    hub_client_name(ss->hub, id, client, sizeof(client));
    if (ss->registry && hub_registry_conn_open(ss->registry, client, s->pc.user,
                                               s->pc.user ? strlen(s->pc.user) : 0))
        s->flags |= HUB_SESS_REGISTERED;
    hub_proto_encode_welcome(&ss->scratch, client, HUB_VERSION, ss->cfg->ping_interval);
    hub_session_send_scratch(s);
}

void hub_session_closed(struct hub_session *s)
{
    struct hub_sessions *ss = s->ss;

    if (!ss || !(s->flags & HUB_SESS_OPEN)) /* never reached ESTABLISHED */
        return;
    /* Nothing may be queued from here on: leaving the channels below can
     * complete pending subscribes, whose replies must not queue anything. */
    hub_writer_closed(&s->wc);
    if (ss->registry) {
        char client[64];
        hub_client_name(ss->hub, s->client.id, client, sizeof(client));
        hub_registry_conn_close(ss->registry, client, s->flags & HUB_SESS_REGISTERED);
    }
    /* a hook that waits is dropped, and what queued behind it */
    hub_session_end_wait(s);
    if (has_hook(s, HUB_HOOK_DISCONNECT))
        hub_policy_on_disconnect(policy(s), &s->pc, s->close_code,
                                 s->close_reason ? s->close_reason : "");
    if (policy(s))
        hub_policy_conn_gone(policy(s), &s->pc);
    hub_client_remove(ss->hub, &s->client);
    if (ss->iplimit && s->ip.family)
        hub_iplimit_close(ss->iplimit, &s->ip, hub_now_ms());
    free(s->rx);
    free(s->pc.user);
    free(s->pc.info_json);
    free(s->close_reason);
    free(s->entry);
    free(s->pc.protocol);
    s->rx = NULL;
    s->entry = NULL;
    s->pc.user = s->pc.info_json = s->pc.protocol = s->close_reason = NULL;
    s->flags = 0;
    hub_log(HUB_LOG_DEBUG, "[conn %llu] closed", (unsigned long long)s->client.id);
    if (ss->shutting_down && !hub_clients(ss->hub) && ss->all_gone)
        ss->all_gone(ss->ud);
}

/* A close code a peer may send (RFC 6455 §7.4.1-2, the rule lws 4.1.6
 * applies too). 1005, 1006 and 1015 are never sent on the wire. */
static int close_code_valid(unsigned code)
{
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) ||
           (code >= 3000 && code <= 4999);
}

int hub_session_peer_closed(struct hub_session *s, const void *payload, size_t len)
{
    const unsigned char *p = payload;
    static const unsigned char protocol_error[2] = {1002 >> 8, 1002 & 0xff};

    if (hub_writer_closing(&s->wc))
        return -1; /* the answer to our close: the handshake is complete */
    s->close_code = len >= 2 ? (uint16_t)(p[0] << 8 | p[1]) : 1005;
    /* A 1-byte payload, a code nobody may send, or a reason that is not
     * UTF-8 (RFC 6455 §5.5.1, §7.4, §8.1): answered with 1002, not echoed. */
    if (len == 1 || (len >= 2 && (!close_code_valid(s->close_code) ||
                                  !hub_proto_utf8_valid((const char *)p + 2, len - 2)))) {
        hub_log(HUB_LOG_DEBUG, "[conn %llu] invalid close frame (%zu bytes, code %u): "
                "closing with 1002", (unsigned long long)s->client.id, len,
                len >= 2 ? (unsigned)s->close_code : 0u);
        s->close_code = 1002;
        free(s->close_reason);
        s->close_reason = hub_xstrdup("invalid close frame");
        return hub_writer_echo_close(&s->wc, protocol_error);
    }
    return hub_writer_echo_close(&s->wc, len >= 2 ? p : NULL);
}

void hub_session_close(struct hub_session *s, uint16_t code, const char *reason)
{
    hub_session_close_with(s, code, reason, 0);
}

/* Every open session, for the rare walks (shutdown, an API disconnect, a
 * reload): the hub's id table holds them all. */
static void each_session(struct hub_sessions *ss, void (*fn)(struct hub_session *, void *),
                         void *arg)
{
    const struct hub_htable *t = &ss->hub->clients;
    for (size_t b = 0; b < t->nb; b++)
        for (struct hub_hnode *n = t->b[b]; n; n = n->next)
            fn(of_client(hub_container_of(n, struct hub_client, node)), arg);
}

static void close_1001(struct hub_session *s, void *arg)
{
    (void)arg;
    hub_session_close(s, 1001, "server shutting down");
}

void hub_sessions_shutdown(struct hub_sessions *ss)
{
    ss->shutting_down = 1;
    hub_writer_no_pause(ss->writer);
    each_session(ss, close_1001, NULL);
    if (!hub_clients(ss->hub) && ss->all_gone)
        ss->all_gone(ss->ud);
}

struct user_arg {
    const char *user;
    size_t len;
};

static void close_user(struct hub_session *s, void *arg)
{
    const struct user_arg *u = arg;
    if (s->pc.user && strlen(s->pc.user) == u->len && !memcmp(s->pc.user, u->user, u->len))
        hub_session_close(s, 4003, "disconnected by the API");
}

void hub_sessions_disconnect_user(struct hub_sessions *ss, const char *user, size_t len)
{
    struct user_arg u = {user, len};
    each_session(ss, close_user, &u); /* closing is asynchronous: the table stays */
}

/* ---- the policy's host interface ------------------------------------------ */

static struct hub_policy_conn *h_conn(void *ud, uint64_t id)
{
    struct hub_sessions *ss = ud;
    struct hub_client *c = hub_client_by_id(ss->hub, id);
    return c ? &of_client(c)->pc : NULL;
}

static struct hub_policy_conn *h_conn_named(void *ud, const char *client)
{
    struct hub_sessions *ss = ud;
    struct hub_client *c = hub_client_by_name(ss->hub, client);
    return c ? &of_client(c)->pc : NULL;
}

static void h_conn_name(void *ud, uint64_t id, char *out, size_t n)
{
    struct hub_sessions *ss = ud;
    hub_client_name(ss->hub, id, out, n);
}

static void h_conn_addr(void *ud, const struct hub_policy_conn *c, char *out, size_t n)
{
    (void)ud;
    peer_addr(of_pc(c), out, n);
}

static int h_conn_closing(void *ud, const struct hub_policy_conn *c)
{
    (void)ud;
    return hub_writer_closing(&of_pc(c)->wc);
}

static void h_conn_send(void *ud, struct hub_policy_conn *c, const char *json, size_t len)
{
    struct hub_sessions *ss = ud;
    struct hub_session *s = of_pc(c);
    hub_buf_appends(&ss->scratch, "{\"op\":\"push\",\"data\":");
    hub_buf_append(&ss->scratch, json, len);
    hub_buf_appends(&ss->scratch, "}");
    hub_session_send_scratch(s);
}

static void h_conn_close(void *ud, struct hub_policy_conn *c, unsigned code, const char *reason)
{
    (void)ud;
    hub_session_close(of_pc(c), (uint16_t)code, reason);
}

static int h_conn_subscribe(void *ud, struct hub_policy_conn *c, const char *ch, size_t len)
{
    struct hub_sessions *ss = ud;
    return hub_subscribe(ss->hub, &of_pc(c)->client, ch, len, NULL, NULL, NULL);
}

static int h_conn_unsubscribe(void *ud, struct hub_policy_conn *c, const char *ch, size_t len)
{
    struct hub_sessions *ss = ud;
    return hub_unsubscribe(ss->hub, &of_pc(c)->client, ch, len);
}

static void h_conn_channels(void *ud, const struct hub_policy_conn *c,
                            void (*fn)(void *arg, const char *ch, size_t len), void *arg)
{
    (void)ud;
    for (const struct hub_sub *sub = of_pc(c)->client.subs; sub; sub = sub->next)
        fn(arg, sub->chan->name, sub->chan->name_len);
}

struct each_arg {
    void (*fn)(void *arg, struct hub_policy_conn *c);
    void *arg;
};

static void each_pc(struct hub_session *s, void *arg)
{
    struct each_arg *a = arg;
    a->fn(a->arg, &s->pc);
}

static void h_each_conn(void *ud, void (*fn)(void *arg, struct hub_policy_conn *c), void *arg)
{
    struct each_arg a = {fn, arg};
    each_session(ud, each_pc, &a);
}

static size_t h_publish(void *ud, const char *ch, size_t len, const char *data, size_t dlen)
{
    struct hub_sessions *ss = ud;
    size_t n = hub_subscribers(ss->hub, ch, len);
    if (hub_publish(ss->hub, ch, len, data, dlen, NULL, NULL) < 0)
        return 0;
    return n;
}

static size_t h_subscribers(void *ud, const char *ch, size_t len)
{
    struct hub_sessions *ss = ud;
    return hub_subscribers(ss->hub, ch, len);
}

static void h_presence_local(void *ud, const char *ch, size_t len, uint64_t *clients,
                             uint64_t *users)
{
    struct hub_sessions *ss = ud;
    hub_presence_local(ss->hub, ch, len, clients, users);
}

static int h_shutting_down(void *ud)
{
    struct hub_sessions *ss = ud;
    return ss->shutting_down;
}

/* hub.redis: policy_redis's connection, else the broker's. */
static int h_redis(void *ud, int argc, const char **argv, const size_t *lens,
                   hub_broker_reply_cb cb, void *cbud)
{
    struct hub_sessions *ss = ud;
    struct hub_broker *b = ss->redis ? ss->redis : ss->hub->broker;
    return b->ops->command(b, argc, argv, lens, cb, cbud);
}

static int h_history(void *ud, const char *ch, size_t len, const struct hub_history_query *q,
                     hub_broker_history_cb cb, void *cbud)
{
    struct hub_sessions *ss = ud;
    return hub_history(ss->hub, ch, len, q, cb, cbud);
}

static int h_presence(void *ud, const char *ch, size_t len, uint32_t max,
                      hub_broker_presence_cb cb, void *cbud)
{
    struct hub_sessions *ss = ud;
    return hub_presence(ss->hub, ch, len, max, cb, cbud);
}

const struct hub_policy_host_ops hub_session_policy_ops = {
    .conn = h_conn,
    .conn_named = h_conn_named,
    .conn_name = h_conn_name,
    .conn_addr = h_conn_addr,
    .conn_closing = h_conn_closing,
    .conn_send = h_conn_send,
    .conn_close = h_conn_close,
    .conn_subscribe = h_conn_subscribe,
    .conn_unsubscribe = h_conn_unsubscribe,
    .conn_channels = h_conn_channels,
    .each_conn = h_each_conn,
    .publish = h_publish,
    .subscribers = h_subscribers,
    .presence_local = h_presence_local,
    .shutting_down = h_shutting_down,
    .redis = h_redis,
    .history = h_history,
    .presence = h_presence,
};
