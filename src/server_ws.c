/* The lws glue (include/luahub/server.h; docs/internals.md, "HTTP"): a
 * WebSocket upgrade that http.c read is checked (path, method, key,
 * version, subprotocols, origin, limits), the policy's on_connect decides
 * it, and the socket is adopted into lws with a request head of our own
 * making; the protocol callback then turns lws events into session and
 * writer calls. The wiring of the process (init, start, reload, metrics,
 * shutdown) is server.c; what the two share is server_impl.h. Loop thread
 * only. */
#include "luahub/server.h"
#include "server_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/evp.h>
#include <openssl/sha.h>

#include "luahub/log.h"

/* Subprotocols one upgrade may offer. */
#define SUBPROTOCOLS_MAX 128

/* Refuses an upgrade with an HTTP status and `why` as a plain-text body. */
static void refuse(struct hub_server *srv, struct hub_http_conn *c, unsigned status,
                   const char *why, const char *extra)
{
    srv->connections_refused++;
    hub_http_respond(c, status, "text/plain; charset=utf-8", extra, why, strlen(why),
                     HUB_HTTP_CLOSE);
}

/* `reason` cut to at most `max` bytes of valid UTF-8: a byte that does not
 * start a valid sequence becomes '?', and a character that would not fit
 * whole is left out. Returns the length written to out (>= max + 1 bytes). */
static size_t utf8_cut(const char *reason, size_t max, char *out)
{
    size_t n = 0, len = strlen(reason);
    for (size_t i = 0; i < len;) {
        size_t k = 1;
        while (k <= 4 && i + k <= len && !hub_proto_utf8_valid(reason + i, k))
            k++;
        if (k > 4 || i + k > len) { /* not UTF-8 here */
            if (n + 1 > max)
                break;
            out[n++] = '?';
            i++;
            continue;
        }
        if (n + k > max)
            break;
        memcpy(out + n, reason + i, k);
        n += k;
        i += k;
    }
    out[n] = '\0';
    return n;
}

/* The subprotocols a client offered (every Sec-WebSocket-Protocol header,
 * comma-separated; names are case-sensitive, RFC 6455 §4.1). */
struct offer {
    size_t n;                       /* names offered */
    int luahub;                     /* "luahub" among them */
    char first[65];                 /* the first one (cut to 64 bytes) */
    struct hub_buf shown;           /* the list, for messages (cut) */
};

static int offer_add(void *ud, const char *v, size_t len)
{
    struct offer *o = ud;
    if (len == 6 && !memcmp(v, "luahub", 6))
        o->luahub = 1;
    if (o->n == 0)
        snprintf(o->first, sizeof(o->first), "%.*s", (int)(len > 64 ? 64 : len), v);
    /* The list is logged: a "token.<jwt>" (docs/protocol.md) shows as
     * "token.***" (docs/operations.md, "Secrets and logs"). */
    int secret = len > 6 && !memcmp(v, "token.", 6);
    if (o->shown.len < 200)
        hub_buf_printf(&o->shown, "%s\"%.*s%s\"", o->n ? ", " : "",
                       secret ? 6 : (int)(len > 64 ? 64 : len), v, secret ? "***" : "");
    o->n++;
    return 0;
}

static void offer_read(struct offer *o, const struct hub_request *r)
{
    memset(o, 0, sizeof(*o));
    hub_request_list_each(r, "sec-websocket-protocol", offer_add, o);
    if (!o->shown.p)
        hub_buf_appends(&o->shown, "");
}

/* The subprotocol to echo: the policy's choice, else "luahub" when offered
 * (NULL: none to echo). */
static const char *offer_choice(const struct offer *o, const char *chosen)
{
    return chosen ? chosen : o->luahub ? "luahub" : NULL;
}

/* A refusal a browser page can read: browsers never expose the HTTP
 * status of a failed upgrade (the page sees 1006), so for a request from a
 * page (it has an Origin) the upgrade completes and a close frame with
 * 4000 + status and the reason follows at once (docs/protocol.md,
 * "Refusals"). */
static void refuse_ws(struct hub_server *srv, struct hub_http_conn *c,
                      const struct hub_request *r, unsigned status, const char *why)
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    size_t kl;
    const char *key = hub_request_header(r, "sec-websocket-key", &kl);
    unsigned char digest[SHA_DIGEST_LENGTH], accept[32];
    char reason[124];
    struct hub_buf b = {0};

    srv->connections_refused++;
    hub_buf_append(&b, key, kl);
    hub_buf_append(&b, guid, sizeof(guid) - 1);
    SHA1((const unsigned char *)b.p, b.len, digest);
    EVP_EncodeBlock(accept, digest, sizeof(digest));
    hub_buf_reset(&b);
    /* A browser fails a handshake that does not echo one of the
     * subprotocols it offered, before the page could read the close. */
    struct offer o;
    offer_read(&o, r);
    const char *echo = offer_choice(&o, NULL);
    if (!echo && o.n)
        echo = o.first;
    hub_buf_printf(&b, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n",
                   (const char *)accept);
    if (echo)
        hub_buf_printf(&b, "Sec-WebSocket-Protocol: %s\r\n", echo);
    hub_buf_appends(&b, "\r\n");
    hub_buf_free(&o.shown);
    size_t n = utf8_cut(why, sizeof(reason) - 1, reason);
    unsigned code = 4000 + status;
    unsigned char frame[4] = {0x88, (unsigned char)(2 + n), (unsigned char)(code >> 8),
                              (unsigned char)(code & 0xff)};
    hub_buf_append(&b, frame, sizeof(frame));
    hub_buf_append(&b, reason, n);
    hub_http_respond_raw(c, b.p, b.len);
    hub_buf_free(&b);
}

/* A Sec-WebSocket-Key is 16 random bytes in base64: 24 characters, the
 * last two "==" (RFC 6455 §4.1). */
static int ws_key_valid(const char *k, size_t n)
{
    if (!k || n != 24 || k[22] != '=' || k[23] != '=')
        return 0;
    for (size_t i = 0; i < 22; i++)
        if (!((k[i] >= 'A' && k[i] <= 'Z') || (k[i] >= 'a' && k[i] <= 'z') ||
              (k[i] >= '0' && k[i] <= '9') || k[i] == '+' || k[i] == '/'))
            return 0;
    return 1;
}

/* Browsers (requests with an Origin) may connect from the origins of
 * allowed_origins, or by default from the hub's own: the Origin names the
 * Host the request was sent to. Any page a user opens could otherwise open
 * a socket to the hub with the user's cookies. Clients that send no Origin
 * are not browsers and not concerned. */
static int origin_allowed(const struct hub_server *srv, const struct hub_request *r)
{
    size_t ol;
    const char *origin = hub_request_header(r, "origin", &ol);
    const char *list = srv->cfg->allowed_origins;
    if (!origin)
        return 1;
    if (!list)
        return hub_request_origin_is_host(r);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ' ');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if ((n == 1 && *p == '*') || (n == ol && !strncasecmp(p, origin, n)))
            return 1;
        p += n;
        while (*p == ' ')
            p++;
    }
    return 0;
}

static void pending_free(struct hub_server *srv, struct hub_conn_pending *p);

/* An upgrade whose on_connect waits. */
struct upgrade {
    struct hub_policy_wait w;
    struct hub_server *srv;
    struct hub_http_conn *c;        /* held (hub_http_hold) */
    const struct hub_request *r;    /* c's request: valid while held */
    uint64_t id;
    struct hub_connect_result res;
};

static void upgrade_decided(struct hub_server *srv, struct hub_http_conn *c,
                            const struct hub_request *r, uint64_t id, enum hub_verdict v,
                            struct hub_connect_result *res);
static void on_connect_done(struct hub_policy_wait *w, const struct hub_policy_outcome *o);

/* A complete WebSocket upgrade request (http.c): the checks and on_connect
 * run here, on the parsed request; an accepted one is handed to lws with a
 * request head of our own making (docs/internals.md, "HTTP"). */
void hub_server_upgrade(void *ud, struct hub_http_conn *c, const struct hub_request *r)
{
    struct hub_server *srv = ud;
    const struct hub_config *cfg = srv->cfg;
    size_t kl, vl, hl;
    const char *key = hub_request_header(r, "sec-websocket-key", &kl);
    const char *ver = hub_request_header(r, "sec-websocket-version", &vl);
    const char *host = hub_request_header(r, "host", &hl);
    struct offer o;

    if (r->path_len != strlen(cfg->websocket_path) || strcmp(r->path, cfg->websocket_path)) {
        refuse(srv, c, 404, "no websocket endpoint here", NULL);
        return;
    }
    if (strcmp(r->method, "GET") != 0 || r->http_minor != 1 || !host ||
        !hub_request_has_token(r, "connection", "upgrade") || !ws_key_valid(key, kl)) {
        refuse(srv, c, 400, "not a valid WebSocket upgrade request (RFC 6455 4.1: GET, HTTP/1.1, "
                       "Host, Connection: Upgrade, Sec-WebSocket-Key)", NULL);
        return;
    }
    if (!ver || vl != 2 || memcmp(ver, "13", 2) != 0) {
        refuse(srv, c, 426, "unsupported WebSocket version: this hub speaks version 13",
               "Sec-WebSocket-Version: 13\r\n");
        return;
    }
    offer_read(&o, r);
    if (!o.n && hub_request_header(r, "sec-websocket-protocol", NULL)) {
        hub_log(HUB_LOG_INFO, "upgrade from %s refused: subprotocols offered: none (an empty "
                "Sec-WebSocket-Protocol list)", r->peer);
        refuse(srv, c, 400, "empty Sec-WebSocket-Protocol list: offer \"luahub\", or leave "
               "the header out", NULL);
        goto out;
    }
    if (o.n > SUBPROTOCOLS_MAX) {
        char why[128];
        snprintf(why, sizeof(why), "too many WebSocket subprotocols offered (%zu; at most %d): "
                 "offer \"luahub\" and what your policy reads", o.n, SUBPROTOCOLS_MAX);
        hub_log(HUB_LOG_INFO, "upgrade from %s refused: subprotocols offered: %zu (at most %d)",
                r->peer, o.n, SUBPROTOCOLS_MAX);
        refuse(srv, c, 400, why, NULL);
        goto out;
    }
    if (srv->shutting_down) {
        refuse(srv, c, 503, "server shutting down", NULL);
        goto out;
    }
    if (cfg->max_connections && hub_clients(&srv->hub) >= cfg->max_connections) {
        refuse(srv, c, 503, "too many connections (max_connections)", NULL);
        goto out;
    }
    if (!origin_allowed(srv, r)) {
        size_t ol;
        const char *origin = hub_request_header(r, "origin", &ol);
        char why[200];
        snprintf(why, sizeof(why), "origin %.*s is not allowed (allowed_origins)",
                 (int)(ol > 100 ? 100 : ol), origin);
        hub_log(HUB_LOG_INFO, "upgrade from %s refused: %s", r->peer, why);
        srv->origins_refused++;
        refuse_ws(srv, c, r, 403, why);
        goto out;
    }
    char limit[200];
    if (hub_iplimit_open(&srv->iplimit, &r->peer_ip, hub_now_ms(), limit, sizeof(limit)) < 0) {
        hub_log(HUB_LOG_INFO, "upgrade from %s refused: %s", r->peer, limit);
        if (hub_request_header(r, "origin", NULL))
            refuse_ws(srv, c, r, 429, limit);
        else
            refuse(srv, c, 429, limit, NULL);
        goto out;
    }
    /* counted in the per-address table: released by upgrade_decided, or by
     * the pending record it makes */
    uint64_t id = hub_next_id(&srv->hub);
    if (srv->policy && hub_policy_has(srv->policy, HUB_HOOK_CONNECT)) {
        /* on_connect may wait (hub.redis): the HTTP layer holds the request
         * (r stays valid while held) until the hook is done, and
         * request_timeout still bounds it */
        struct upgrade *u = hub_xcalloc(1, sizeof(*u));
        u->srv = srv;
        u->c = c;
        u->r = r;
        u->id = id;
        u->w.done = on_connect_done;
        u->w.timeout_ms = (cfg->lua_call_timeout < cfg->request_timeout
                               ? cfg->lua_call_timeout : cfg->request_timeout) * 1000u;
        enum hub_verdict v = hub_policy_on_connect(srv->policy, r, id, &u->res, &u->w);
        if (v == HUB_WAIT) {
            hub_http_hold(c);
            goto out;
        }
        upgrade_decided(srv, c, r, id, v, &u->res);
        free(u);
        goto out;
    }
    struct hub_connect_result res;
    memset(&res, 0, sizeof(res));
    upgrade_decided(srv, c, r, id, HUB_ALLOW, &res);
out:
    hub_buf_free(&o.shown);
}

/* The policy decided an upgrade (or there is no on_connect: ALLOW). The
 * address is counted in the per-address table: the pending record takes
 * that over, or it is released here. `res` is emptied. */
static void upgrade_decided(struct hub_server *srv, struct hub_http_conn *c,
                            const struct hub_request *r, uint64_t id, enum hub_verdict v,
                            struct hub_connect_result *res)
{
    const struct hub_config *cfg = srv->cfg;
    size_t kl, hl;
    const char *key = hub_request_header(r, "sec-websocket-key", &kl);
    const char *host = hub_request_header(r, "host", &hl);
    struct offer o;

    if (v != HUB_ALLOW) {
        free(res->user);
        free(res->info_json);
        free(res->protocol);
        unsigned status = v == HUB_LIMIT ? 503 : v == HUB_FAIL ? 500
                          : res->status ? res->status : 403;
        const char *why = v == HUB_LIMIT ? "too many policy calls are waiting "
                                           "(lua_max_waiting): try again later"
                          : v == HUB_FAIL ? "internal error: the connect policy failed"
                          : res->reason[0] ? res->reason : "forbidden";
        if (hub_request_header(r, "origin", NULL))
            refuse_ws(srv, c, r, status, why);
        else
            refuse(srv, c, status, why, NULL);
        hub_iplimit_close(&srv->iplimit, &r->peer_ip, hub_now_ms());
        return;
    }
    offer_read(&o, r);
    struct hub_conn_pending *pending = hub_xmalloc(sizeof(*pending));
    pending->ip = r->peer_ip;           /* the pending record has it now */
    pending->id = id;
    pending->user = res->user;
    pending->info_json = res->info_json;
    const char *echo = offer_choice(&o, res->protocol);
    pending->protocol = echo == res->protocol ? res->protocol
                        : echo ? hub_xstrdup(echo) : NULL;
    if (echo != res->protocol)
        free(res->protocol);
    res->user = res->info_json = res->protocol = NULL;
    if (o.n && !echo) {
        hub_log(HUB_LOG_INFO, "upgrade from %s refused: subprotocols offered: %s (this hub "
                "speaks \"luahub\"; a policy may accept another with conn.protocol)", r->peer,
                o.shown.p);
        char why[400];
        snprintf(why, sizeof(why), "unsupported WebSocket subprotocol (offered: %s): this hub "
                 "speaks \"luahub\"", o.shown.p);
        pending_free(srv, pending);
        refuse(srv, c, 400, why, NULL);
        hub_buf_free(&o.shown);
        return;
    }
    hub_buf_free(&o.shown);

    /* lws parses a head of ours: the fields it needs and nothing the
     * client may have made too large for its 4 KB header table. It gets
     * no subprotocol (it would echo only names it knows): the one chosen
     * is added to its answer at LWS_CALLBACK_ADD_HEADERS. */
    struct hub_buf head = {0};
    hub_buf_printf(&head, "GET %s HTTP/1.1\r\nHost: %.*s\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: %.*s\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n",
                   cfg->websocket_path, (int)(hl > 255 ? 255 : hl), host, (int)kl, key);
    int fd = hub_http_take(c, &head);
    srv->handoff = pending;
    struct lws *wsi = lws_adopt_socket_vhost_readbuf(srv->vhost, fd, head.p, head.len);
    hub_buf_free(&head);
    if (srv->handoff) {
        /* Not established within the call (lws had no free header table,
         * or refused the handshake): it goes with the wsi, if any. */
        if (wsi)
            lws_set_opaque_user_data(wsi, srv->handoff);
        else
            pending_free(srv, pending);
        srv->handoff = NULL;
    }
}

/* on_connect waited and is done (or failed, or the policy went). */
static void on_connect_done(struct hub_policy_wait *w, const struct hub_policy_outcome *o)
{
    struct upgrade *u = hub_container_of(w, struct upgrade, w);
    struct hub_server *srv = u->srv;
    enum hub_verdict v = o->verdict;

    if (hub_http_closed(u->c)) {
        /* the HTTP side stopped meanwhile (shutdown): nobody to answer */
        free(u->res.user);
        free(u->res.info_json);
        free(u->res.protocol);
        hub_iplimit_close(&srv->iplimit, &u->r->peer_ip, hub_now_ms());
    } else {
        if (srv->shutting_down && v == HUB_ALLOW) {
            v = HUB_DENY;
            u->res.status = 503;
            snprintf(u->res.reason, sizeof(u->res.reason), "server shutting down");
        }
        upgrade_decided(srv, u->c, u->r, u->id, v, &u->res);
    }
    hub_http_release(u->c);
    free(u);
}

/* A pending record that never became a session: its address is no longer
 * counted either. */
static void pending_free(struct hub_server *srv, struct hub_conn_pending *p)
{
    if (p && p->ip.family)
        hub_iplimit_close(&srv->iplimit, &p->ip, hub_now_ms());
    hub_conn_pending_free(p);
}

/* What on_connect left for the wsi being upgraded, if anything (not
 * taken). */
static struct hub_conn_pending *peek_pending(struct hub_server *srv, struct lws *wsi)
{
    struct hub_conn_pending *p = lws_get_opaque_user_data(wsi);
    return p ? p : srv->handoff;
}

/* Takes what on_connect left for the wsi, if anything. */
static struct hub_conn_pending *take_pending(struct hub_server *srv, struct lws *wsi)
{
    struct hub_conn_pending *p = lws_get_opaque_user_data(wsi);
    if (p) {
        lws_set_opaque_user_data(wsi, NULL);
        return p;
    }
    p = srv->handoff;
    srv->handoff = NULL;
    return p;
}

int hub_server_lws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
                            void *in, size_t len)
{
    struct hub_server *srv = lws_context_user(lws_get_context(wsi));
    union pss *pss = user;
    uint16_t code;
    const char *why;

    switch (reason) {
    case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
        hub_writer_woken(&srv->writer); /* the wake-up of a drop arrived */
        return 0;
    case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
        return 0; /* checked by hub_server_upgrade before lws saw the request */
    case LWS_CALLBACK_ADD_HEADERS: {
        /* The handshake answer: the subprotocol chosen at the upgrade. */
        struct hub_conn_pending *p = peek_pending(srv, wsi);
        struct lws_process_html_args *a = in;
        if (p && p->protocol) {
            int n = snprintf(a->p, (size_t)a->max_len, "Sec-WebSocket-Protocol: %s\r\n",
                             p->protocol);
            if (n < 0 || n >= a->max_len)
                return -1;
            a->p += n;
            a->max_len -= n;
        }
        return 0;
    }
    case LWS_CALLBACK_ESTABLISHED:
        hub_session_open(&pss->s, &srv->sessions, wsi, take_pending(srv, wsi));
        return 0;
    case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
        return hub_session_peer_closed(&pss->s, in, len);
    case LWS_CALLBACK_WSI_DESTROY: {
        /* An upgrade that on_connect allowed but that never completed. */
        struct hub_conn_pending *p = lws_get_opaque_user_data(wsi);
        lws_set_opaque_user_data(wsi, NULL);
        pending_free(srv, p);
        break;
    }
    case LWS_CALLBACK_RECEIVE:
        if (hub_session_receive(&pss->s, in, len,
                                lws_is_final_fragment(wsi) && !lws_remaining_packet_payload(wsi),
                                lws_frame_is_binary(wsi), &code, &why) == 0)
            return 0;
        /* From RECEIVE, lws sends this close frame (docs/internals.md,
         * "WebSocket"). */
        lws_close_reason(wsi, (enum lws_close_status)code, (unsigned char *)why, strlen(why));
        return -1;
    case LWS_CALLBACK_RECEIVE_PONG:
        if (pss->s.flags & HUB_SESS_OPEN)
            hub_writer_seen(&pss->s.wc);
        return 0;
    case LWS_CALLBACK_SERVER_WRITEABLE:
        return hub_writer_writeable(&pss->s.wc);
    case LWS_CALLBACK_CLOSED:
        hub_session_closed(&pss->s);
        return 0;
    default:
        break;
    }
    return lws_callback_http_dummy(wsi, reason, user, in, len);
}
