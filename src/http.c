/* HTTP on the WebSocket port: the publish API, /healthz, /metrics and
 * static files.
 *
 * lws 4.1.6 does not support chunked request bodies (the request hangs,
 * NOTES-stack.md §3.8), so a body needs a Content-Length: without one the
 * answer is 411 and the connection is closed. */
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <yajl/yajl_tree.h>

#include "luahub/log.h"
#include "luahub/metrics.h"
#include "luahub/policy.h"
#include "luahub/registry.h"
#include "luahub/proto.h"
#include "luahub/server.h"

enum route {
    ROUTE_NONE = 0,
    ROUTE_PUBLISH,
    ROUTE_BROADCAST,
    ROUTE_RELOAD,
    ROUTE_DISCONNECT,
};

enum method {
    M_OTHER = 0,
    M_GET,
    M_POST,
};

static enum method method_of(struct lws *wsi)
{
    if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI))
        return M_GET;
    if (lws_hdr_total_length(wsi, WSI_TOKEN_POST_URI))
        return M_POST;
    return M_OTHER;
}

/* Used with `close_after` for a request whose body we will not read. */
int hub_http_respond(struct lws *wsi, unsigned status, const char *ctype,
                     const char *body, size_t len, int close_after)
{
    unsigned char hdr[LWS_PRE + 512];
    unsigned char *start = hdr + LWS_PRE, *p = start, *end = hdr + sizeof(hdr) - 1;

    hub_metrics.http_requests++;
    if (lws_add_http_common_headers(wsi, status, ctype, len, &p, end))
        return -1;
    if (close_after &&
        lws_add_http_header_by_token(wsi, WSI_TOKEN_CONNECTION,
                                     (const unsigned char *)"close", 5, &p, end))
        return -1;
    if (lws_finalize_write_http_header(wsi, start, &p, end))
        return -1;
    if (len) {
        /* lws_write() wants LWS_PRE bytes of headroom before the data. */
        unsigned char *b = hub_xmalloc(LWS_PRE + len);
        memcpy(b + LWS_PRE, body, len);
        int n = lws_write(wsi, b + LWS_PRE, len, LWS_WRITE_HTTP_FINAL);
        free(b);
        if (n < 0)
            return -1;
    }
    if (close_after)
        return -1;
    return lws_http_transaction_completed(wsi) ? -1 : 0;
}

static int respond_json_error(struct hub_server *srv, struct lws *wsi,
                              unsigned status, const char *code,
                              const char *message, int close_after)
{
    struct hub_buf *b = &srv->scratch;
    hub_buf_reset(b);
    hub_buf_appends(b, "{\"ok\":false,\"error\":{\"code\":");
    hub_buf_append_json_string(b, code, strlen(code));
    hub_buf_appends(b, ",\"message\":");
    hub_buf_append_json_string(b, message, strlen(message));
    hub_buf_appends(b, "}}");
    int r = hub_http_respond(wsi, status, "application/json", b->p, b->len, close_after);
    hub_buf_reset(b);
    return r;
}

static int respond_text(struct lws *wsi, unsigned status, const char *ctype,
                        const char *s)
{
    return hub_http_respond(wsi, status, ctype, s, strlen(s), 0);
}

static int peer_is_loopback(struct lws *wsi)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = lws_get_socket_fd(wsi);

    if (fd < 0 || getpeername(fd, (struct sockaddr *)&ss, &sl) < 0)
        return 0;
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *s = (const struct sockaddr_in *)&ss;
        return (ntohl(s->sin_addr.s_addr) >> 24) == 127;
    }
    if (ss.ss_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)&ss)->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(a))
            return 1;
        return IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127;
    }
    return 0;
}

/* Compares in time independent of where the strings differ. */
static int key_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    unsigned char d = alen != blen;
    size_t n = alen < blen ? alen : blen;
    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return d == 0;
}

/* Returns 0 if the request may use the API, else the response is sent and
 * the callback's return value is stored in *ret. */
static int check_auth(struct hub_server *srv, struct lws *wsi, int *ret)
{
    const char *key = srv->cfg->api_key;
    char auth[512];

    if (!key) {
        if (peer_is_loopback(wsi))
            return 0;
        *ret = respond_json_error(srv, wsi, HTTP_STATUS_FORBIDDEN, "forbidden",
                                  "the HTTP API answers only loopback clients while "
                                  "api_key is not set: set api_key in the conf and send "
                                  "'Authorization: Bearer <api_key>'", 1);
        return -1;
    }
    int n = lws_hdr_copy(wsi, auth, sizeof(auth), WSI_TOKEN_HTTP_AUTHORIZATION);
    if (n > 7 && !strncasecmp(auth, "Bearer ", 7) &&
        key_equal(auth + 7, (size_t)n - 7, key, strlen(key)))
        return 0;
    *ret = respond_json_error(srv, wsi, HTTP_STATUS_UNAUTHORIZED, "unauthorized",
                              n > 0 ? "wrong API key" :
                                      "missing API key: send 'Authorization: Bearer <api_key>'",
                              1);
    return -1;
}

static int start_api(struct hub_server *srv, struct lws *wsi, struct hub_http *h,
                     enum route route)
{
    char cl[32];
    int ret;
    uint64_t max = srv->cfg->max_message_size;

    if (method_of(wsi) != M_POST)
        return respond_json_error(srv, wsi, HTTP_STATUS_METHOD_NOT_ALLOWED,
                                  "method_not_allowed", "use POST", 1);
    if (check_auth(srv, wsi, &ret))
        return ret;
    if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_TRANSFER_ENCODING) ||
        lws_hdr_copy(wsi, cl, sizeof(cl), WSI_TOKEN_HTTP_CONTENT_LENGTH) <= 0)
        return respond_json_error(srv, wsi, HTTP_STATUS_LENGTH_REQUIRED, "length_required",
                                  "send the body with a Content-Length header "
                                  "(chunked request bodies are not supported)", 1);
    char *e;
    errno = 0;
    unsigned long long n = strtoull(cl, &e, 10);
    if (*e || e == cl || errno || cl[0] == '-')
        return respond_json_error(srv, wsi, HTTP_STATUS_BAD_REQUEST, "bad_request",
                                  "invalid Content-Length", 1);
    if (n > max) {
        char msg[128];
        snprintf(msg, sizeof(msg), "body of %llu bytes is over max_message_size (%llu)",
                 n, (unsigned long long)max);
        return respond_json_error(srv, wsi, HTTP_STATUS_REQ_ENTITY_TOO_LARGE, "too_large",
                                  msg, 1);
    }
    h->route = route;
    h->content_length = n;
    hub_buf_reset(&h->body);
    return 0; /* the body comes in LWS_CALLBACK_HTTP_BODY */
}

/* POST /api/reload: build the policy aside, swap on success. The body is
 * ignored; the answer lists every problem when the reload fails. */
static int finish_reload(struct hub_server *srv, struct lws *wsi, struct hub_http *h)
{
    struct hub_config_errors errs = {0};
    struct hub_buf msg = {0};

    h->route = ROUTE_NONE;
    hub_buf_free(&h->body);
    if (hub_policy_reload(srv, &errs) == 0)
        return respond_text(wsi, HTTP_STATUS_OK, "application/json", "{\"ok\":true}");
    for (unsigned i = 0; i < errs.n; i++)
        hub_buf_printf(&msg, "%s%s", i ? "; " : "", errs.v[i]);
    int r = respond_json_error(srv, wsi, 422, "reload_failed",
                               msg.len ? msg.p : "reload failed; the old policy stays",
                               0);
    hub_buf_free(&msg);
    hub_config_errors_free(&errs);
    return r;
}

/* The publishes of one API request, awaiting the broker. The response goes
 * out when the last completes: at once within finish_api (memory broker),
 * or from HTTP_WRITEABLE later (redis). If the client goes away first, the
 * op is detached (wsi NULL) and just freed at the end. */
struct hub_http_op {
    struct lws *wsi;
    struct hub_http *h;
    int remaining;          /* completions to come, +1 while starting them */
    int failed;
    int done;               /* all completed: respond */
    const char *fail_msg;   /* the 503's message */
    struct hub_buf result;  /* a 200's JSON body; empty: {"ok":true} */
};

static struct hub_http_op *op_new(struct lws *wsi, struct hub_http *h, const char *fail_msg)
{
    struct hub_http_op *op = hub_xcalloc(1, sizeof(*op));
    op->wsi = wsi;
    op->h = h;
    op->remaining = 1;
    op->fail_msg = fail_msg;
    h->op = op;
    return op;
}

static void op_free(struct hub_http_op *op)
{
    hub_buf_free(&op->result);
    free(op);
}

static void op_detach(struct hub_http *h)
{
    if (h->op) {
        h->op->wsi = NULL;
        h->op->h = NULL;
        h->op = NULL;
    }
}

/* One completion of an op; the response goes out with the last. */
static void op_complete(struct hub_http_op *op, int ok)
{
    if (!ok)
        op->failed = 1;
    if (--op->remaining > 0)
        return;
    op->done = 1;
    if (!op->wsi) {
        op_free(op);   /* the client is gone */
        return;
    }
    lws_callback_on_writable(op->wsi); /* respond from HTTP_WRITEABLE */
}

static void on_api_published(void *ud, int status, uint64_t offset)
{
    (void)offset;
    op_complete(ud, status == HUB_BROKER_OK);
}

/* Sends the response of a finished op and frees it. */
static int respond_op(struct hub_server *srv, struct lws *wsi, struct hub_http *h)
{
    struct hub_http_op *op = h->op;
    int r;

    h->op = NULL;
    if (op->failed)
        r = respond_json_error(srv, wsi, HTTP_STATUS_SERVICE_UNAVAILABLE, "unavailable",
                               op->fail_msg, 0);
    else if (op->result.len)
        r = hub_http_respond(wsi, HTTP_STATUS_OK, "application/json", op->result.p,
                             op->result.len, 0);
    else
        r = respond_text(wsi, HTTP_STATUS_OK, "application/json", "{\"ok\":true}");
    op_free(op);
    return r;
}

/* Drops the guard of an op whose completions were started: responds now if
 * they all came synchronously, else later from HTTP_WRITEABLE. */
static int op_started(struct hub_server *srv, struct lws *wsi, struct hub_http *h)
{
    struct hub_http_op *op = h->op;
    if (--op->remaining == 0)
        return respond_op(srv, wsi, h);
    return 0;
}

static void on_connections(void *ud, int status, const char *json, size_t len)
{
    struct hub_http_op *op = ud;
    if (status == 0)
        hub_buf_append(&op->result, json, len);
    op_complete(op, status == 0);
}

static void on_disconnected(void *ud, int status, long long instances)
{
    struct hub_http_op *op = ud;
    if (status == 0)
        hub_buf_printf(&op->result, "{\"ok\":true,\"instances\":%lld}", instances);
    op_complete(op, status == 0);
}

/* A user name in the API: 1..255 bytes, no control characters. */
static int user_valid(const char *u, size_t n)
{
    if (n == 0 || n > 255)
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)u[i] < 0x20 || u[i] == 0x7f)
            return 0;
    return 1;
}

/* GET /api/connections?user=U: the user's connections on every instance. */
static int start_connections(struct hub_server *srv, struct lws *wsi, struct hub_http *h)
{
    char user[512];
    int ret;

    if (method_of(wsi) != M_GET)
        return respond_json_error(srv, wsi, HTTP_STATUS_METHOD_NOT_ALLOWED,
                                  "method_not_allowed", "use GET", 1);
    if (check_auth(srv, wsi, &ret))
        return ret;
    const char *u = lws_get_urlarg_by_name(wsi, "user=", user, sizeof(user));
    if (!u || !user_valid(u, strlen(u)))
        return respond_json_error(srv, wsi, HTTP_STATUS_BAD_REQUEST, "bad_request",
                                  "query parameter 'user' is required: 1 to 255 bytes "
                                  "without control characters", 0);
    struct hub_http_op *op = op_new(wsi, h, "the registry is unavailable: try again later");
    op->remaining++;
    if (hub_registry_connections(srv->registry, u, strlen(u), on_connections, op) < 0) {
        op->remaining--;
        op->failed = 1;
    }
    return op_started(srv, wsi, h);
}

/* POST /api/disconnect {"user":"U"}: close the user's connections on every
 * instance (a control message through the broker). */
static int finish_disconnect(struct hub_server *srv, struct lws *wsi, struct hub_http *h)
{
    char err[128];
    yajl_val v = NULL, u = NULL;
    const char *path[] = {"user", NULL};

    h->route = ROUTE_NONE;
    if (h->body.len)
        v = yajl_tree_parse(h->body.p, err, sizeof(err));
    hub_buf_free(&h->body); /* before responding: that may free the pss */
    if (v && YAJL_IS_OBJECT(v) && v->u.object.len == 1)
        u = yajl_tree_get(v, path, yajl_t_string);
    const char *user = u ? YAJL_GET_STRING(u) : NULL;
    if (!user || !user_valid(user, strlen(user))) {
        yajl_tree_free(v);
        return respond_json_error(srv, wsi, HTTP_STATUS_BAD_REQUEST, "bad_request",
                                  "the body must be {\"user\":\"<name>\"}", 0);
    }
    struct hub_http_op *op = op_new(wsi, h, "the broker is unavailable: nobody was "
                                            "disconnected, try again later");
    op->remaining++;
    if (hub_registry_disconnect(srv->registry, user, strlen(user), on_disconnected, op) < 0) {
        op->remaining--;
        op->failed = 1;
    }
    yajl_tree_free(v);
    return op_started(srv, wsi, h);
}

static int finish_api(struct hub_server *srv, struct lws *wsi, struct hub_http *h)
{
    struct hub_api_req req;
    struct hub_proto_error err;
    int broadcast = h->route == ROUTE_BROADCAST;

    memset(&req, 0, sizeof(req));
    h->route = ROUTE_NONE;
    if (hub_proto_decode_api(h->body.p ? h->body.p : "", h->body.len, broadcast, &req,
                             &err) < 0) {
        hub_buf_free(&req.names);
        hub_buf_free(&h->body); /* before responding: that may free the pss */
        hub_metrics.protocol_errors[err.code]++;
        return respond_json_error(srv, wsi, HTTP_STATUS_BAD_REQUEST,
                                  hub_proto_code_name(err.code), err.message, 0);
    }
    struct hub_http_op *op = op_new(wsi, h, "the broker is unavailable: the message was "
                                            "not published");
    const char *name = req.names.p;
    for (unsigned i = 0; i < req.nchannels; i++) {
        size_t len = strlen(name);
        op->remaining++;
        if (hub_server_publish_cb(srv, name, len, req.data.p, req.data.len,
                                  on_api_published, op) < 0) {
            op->remaining--;
            op->failed = 1;
        }
        name += len + 1;
    }
    hub_buf_free(&req.names);
    /* Responding completes the transaction, and lws then unbinds the
     * protocol and frees this pss (HTTP_DROP_PROTOCOL): the body goes now. */
    hub_buf_free(&h->body);
    return op_started(srv, wsi, h);
}

static int serve_static(struct hub_server *srv, struct lws *wsi, const char *path)
{
    const char *dir = srv->cfg->static_dir;
    char file[4096];
    struct stat st;

    if (!dir || method_of(wsi) != M_GET || path[0] != '/' || strstr(path, "..") ||
        strchr(path, '\\'))
        return respond_json_error(srv, wsi, HTTP_STATUS_NOT_FOUND, "not_found",
                                  "no such route", 0);
    int n = snprintf(file, sizeof(file), "%s%s%s", dir, path,
                     path[strlen(path) - 1] == '/' ? "index.html" : "");
    if (n < 0 || (size_t)n >= sizeof(file) - 16)
        return respond_json_error(srv, wsi, HTTP_STATUS_NOT_FOUND, "not_found",
                                  "no such file", 0);
    if (stat(file, &st) == 0 && S_ISDIR(st.st_mode)) {
        strcat(file, "/index.html");
        if (stat(file, &st) < 0)
            st.st_mode = 0;
    }
    if (stat(file, &st) < 0 || !S_ISREG(st.st_mode))
        return respond_json_error(srv, wsi, HTTP_STATUS_NOT_FOUND, "not_found",
                                  "no such file", 0);
    const char *mime = lws_get_mimetype(file, NULL);
    hub_metrics.http_requests++;
    n = lws_serve_http_file(wsi, file, mime ? mime : "application/octet-stream", NULL, 0);
    if (n < 0 || (n > 0 && lws_http_transaction_completed(wsi)))
        return -1;
    return 0;
}

static int on_request(struct hub_server *srv, struct lws *wsi, struct hub_http *h,
                      const char *path)
{
    h->route = ROUTE_NONE;

    if (!strcmp(path, "/api/publish"))
        return start_api(srv, wsi, h, ROUTE_PUBLISH);
    if (!strcmp(path, "/api/broadcast"))
        return start_api(srv, wsi, h, ROUTE_BROADCAST);
    if (!strcmp(path, "/api/reload"))
        return start_api(srv, wsi, h, ROUTE_RELOAD);
    if (!strcmp(path, "/api/disconnect"))
        return start_api(srv, wsi, h, ROUTE_DISCONNECT);
    if (!strcmp(path, "/api/connections"))
        return start_connections(srv, wsi, h);
    if (!strncmp(path, "/api/", 5))
        return respond_json_error(srv, wsi, HTTP_STATUS_NOT_FOUND, "not_found",
                                  "no such API route", 1);
    if (!strcmp(path, "/healthz")) {
        if (method_of(wsi) != M_GET)
            return respond_json_error(srv, wsi, HTTP_STATUS_METHOD_NOT_ALLOWED,
                                      "method_not_allowed", "use GET", 1);
        if (srv->shutting_down)
            return respond_text(wsi, HTTP_STATUS_SERVICE_UNAVAILABLE, "application/json",
                                "{\"status\":\"shutting_down\"}");
        if (!srv->broker->ops->up(srv->broker))
            return respond_text(wsi, HTTP_STATUS_SERVICE_UNAVAILABLE, "application/json",
                                "{\"status\":\"degraded\",\"broker\":\"down\"}");
        return respond_text(wsi, HTTP_STATUS_OK, "application/json", "{\"status\":\"ok\"}");
    }
    if (!strcmp(path, "/metrics")) {
        if (method_of(wsi) != M_GET)
            return respond_json_error(srv, wsi, HTTP_STATUS_METHOD_NOT_ALLOWED,
                                      "method_not_allowed", "use GET", 1);
        struct hub_buf b = {0};
        hub_metrics_render(&b);
        if (srv->policy)
            hub_policy_metrics(srv->policy, &b);
        srv->broker->ops->metrics(srv->broker, &b);
        if (srv->registry)
            hub_registry_metrics(srv->registry, &b);
        int r = hub_http_respond(wsi, HTTP_STATUS_OK, "text/plain; version=0.0.4", b.p, b.len, 0);
        hub_buf_free(&b);
        return r;
    }
    return serve_static(srv, wsi, path);
}

int hub_http_callback(struct hub_server *srv, struct lws *wsi,
                      enum lws_callback_reasons reason, struct hub_http *h,
                      void *in, size_t len, int *handled)
{
    *handled = 1;
    switch (reason) {
    case LWS_CALLBACK_HTTP:
        return on_request(srv, wsi, h, in ? (const char *)in : "/");

    case LWS_CALLBACK_HTTP_BODY:
        if (h->route == ROUTE_NONE)
            return 0;
        if (h->body.len + len > h->content_length)
            return -1; /* more than announced: a broken client */
        hub_buf_append(&h->body, in, len);
        return 0;

    case LWS_CALLBACK_HTTP_BODY_COMPLETION:
        if (h->route == ROUTE_NONE)
            return respond_json_error(srv, wsi, HTTP_STATUS_NOT_FOUND, "not_found",
                                      "no such route", 1);
        if (h->route == ROUTE_RELOAD)
            return finish_reload(srv, wsi, h);
        if (h->route == ROUTE_DISCONNECT)
            return finish_disconnect(srv, wsi, h);
        return finish_api(srv, wsi, h);

    case LWS_CALLBACK_HTTP_WRITEABLE:
        if (h && h->op && h->op->done)
            return respond_op(srv, wsi, h);
        *handled = 0; /* lws_serve_http_file's continuation: the dummy callback */
        return 0;

    case LWS_CALLBACK_HTTP_FILE_COMPLETION:
        return lws_http_transaction_completed(wsi) ? -1 : 0;

    case LWS_CALLBACK_HTTP_DROP_PROTOCOL:
    case LWS_CALLBACK_CLOSED_HTTP:
        /* lws frees the pss when a transaction completes and unbinds the
         * protocol, not only when the connection closes. */
        if (h) {
            hub_buf_free(&h->body);
            h->route = ROUTE_NONE;
            if (h->op && h->op->done) {
                op_free(h->op); /* its completion came; nobody will respond */
                h->op = NULL;
            }
            op_detach(h);
        }
        return 0;

    default:
        *handled = 0;
        return 0;
    }
}
