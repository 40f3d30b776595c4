/* The routes of plain HTTP requests: the API (/api/...), /healthz,
 * /metrics and static files. Requests arrive whole from http.c.
 *
 * Who may use the API and /metrics: with api_key set, a request carrying
 * "Authorization: Bearer <api_key>"; without it, a loopback peer whose
 * request is not cross-site (no Origin, or the hub's own origin): a page of
 * another site open in a local browser must not publish or reload. */
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <yajl/yajl_tree.h>

#include "luahub/http_api.h"
#include "luahub/log.h"
#include "luahub/metrics.h"
#include "luahub/policy.h"
#include "luahub/proto.h"
#include "luahub/registry.h"
#include "luahub/session.h"

#define JSON "application/json"

static void respond_json(struct hub_http_conn *c, unsigned status, const char *json)
{
    hub_http_respond(c, status, JSON, NULL, json, strlen(json), 0);
}

/* Compares in time independent of the keys' contents and lengths: the
 * SHA-256 digests of both, with CRYPTO_memcmp (a loop over the shorter
 * key's bytes would tell the real key's length). */
static int key_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    unsigned char da[SHA256_DIGEST_LENGTH], db[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)a, alen, da);
    SHA256((const unsigned char *)b, blen, db);
    return CRYPTO_memcmp(da, db, sizeof(da)) == 0;
}

/* 1 when the request comes from the hub's own origin or from no browser
 * page at all: no Origin header, or an Origin whose host[:port] is the
 * Host header; and no Sec-Fetch-Site saying another site sent it. */
static int same_origin(const struct hub_request *r)
{
    size_t sl;
    const char *site = hub_request_header(r, "sec-fetch-site", &sl);

    if (site && !(sl == 11 && !strncasecmp(site, "same-origin", 11)) &&
        !(sl == 4 && !strncasecmp(site, "none", 4)))
        return 0;
    return !hub_request_header(r, "origin", NULL) || hub_request_origin_is_host(r);
}

/* Returns 1 if the request may use the API; else answers and returns 0. */
static int authorized(struct hub_http_api *api, struct hub_http_conn *c,
                      const struct hub_request *r)
{
    const char *key = api->cfg->api_key;
    size_t n;
    const char *auth = hub_request_header(r, "authorization", &n);

    if (key) {
        if (auth && n > 7 && !strncasecmp(auth, "Bearer ", 7) &&
            key_equal(auth + 7, n - 7, key, strlen(key)))
            return 1;
        hub_http_respond_error(c, 401, "unauthorized",
                               auth ? "wrong API key"
                                    : "missing API key: send 'Authorization: Bearer <api_key>'",
                               HUB_HTTP_CLOSE);
        return 0;
    }
    if (!r->peer_loopback) {
        hub_http_respond_error(c, 403, "forbidden",
                               "the HTTP API answers only loopback clients while api_key is "
                               "not set: set api_key in the conf and send "
                               "'Authorization: Bearer <api_key>'",
                               HUB_HTTP_CLOSE);
        return 0;
    }
    if (!same_origin(r)) {
        hub_http_respond_error(c, 403, "forbidden",
                               "cross-site request refused: without api_key the API answers "
                               "only requests from no browser page or from this hub's own "
                               "origin; set api_key to call it from other sites",
                               HUB_HTTP_CLOSE);
        return 0;
    }
    return 1;
}

static int method_is(const struct hub_request *r, const char *m)
{
    return !strcmp(r->method, m);
}

static int is_get(const struct hub_request *r)
{
    return method_is(r, "GET") || method_is(r, "HEAD");
}

/* The publishes (or registry call) of one API request, awaiting the broker.
 * It holds the connection; the answer goes out when the last completes. */
struct api_op {
    struct hub_http_conn *c;
    int remaining;          /* completions to come, +1 while starting them */
    int failed;
    const char *fail_msg;   /* the 503's message */
    struct hub_buf result;  /* a 200's JSON body; empty: {"ok":true} */
    int single;             /* POST /api/publish: one channel */
    char *since_epoch;      /* GET /api/history: the epoch `since` is of */
    unsigned err_status;    /* an answer other than 503: its status ... */
    const char *err_code;   /* ... code ... */
    struct hub_buf err_msg; /* ... and message */
};

/* Bytes of messages one GET /api/history answer carries at most. */
#define HISTORY_ANSWER_MAX ((size_t)32 << 20)

static struct api_op *op_new(struct hub_http_conn *c, const char *fail_msg)
{
    struct api_op *op = hub_xcalloc(1, sizeof(*op));
    op->c = c;
    op->remaining = 1;
    op->fail_msg = fail_msg;
    hub_http_hold(c);
    return op;
}

/* One completion; the answer goes out with the last. */
static void op_complete(struct api_op *op, int ok)
{
    if (!ok)
        op->failed = 1;
    if (--op->remaining > 0)
        return;
    if (op->err_status)
        hub_http_respond_error(op->c, op->err_status, op->err_code, op->err_msg.p, 0);
    else if (op->failed)
        hub_http_respond_error(op->c, 503, "unavailable", op->fail_msg, 0);
    else if (op->result.len)
        hub_http_respond(op->c, 200, JSON, NULL, op->result.p, op->result.len, 0);
    else
        respond_json(op->c, 200, "{\"ok\":true}");
    hub_http_release(op->c);
    hub_buf_free(&op->result);
    hub_buf_free(&op->err_msg);
    free(op->since_epoch);
    free(op);
}

static void on_api_published(void *ud, int status, const struct hub_stream_pos *pos)
{
    struct api_op *op = ud;
    /* POST /api/publish on a history channel: where the message is */
    if (status == HUB_OK && pos && op->single) {
        hub_buf_printf(&op->result, "{\"ok\":true,\"offset\":%llu,\"epoch\":",
                       (unsigned long long)pos->offset);
        hub_buf_append_json_string(&op->result, pos->epoch, strlen(pos->epoch));
        hub_buf_appends(&op->result, "}");
    }
    op_complete(op, status == HUB_OK);
}

static void on_connections(void *ud, int status, const char *json, size_t len)
{
    struct api_op *op = ud;
    if (status == 0)
        hub_buf_append(&op->result, json, len);
    op_complete(op, status == 0);
}

static void on_disconnected(void *ud, int status, long long instances)
{
    struct api_op *op = ud;
    if (status == 0)
        hub_buf_printf(&op->result, "{\"ok\":true,\"instances\":%lld}", instances);
    op_complete(op, status == 0);
}

/* A user name in the API: 1..255 bytes, no control characters. */
static int user_valid(const char *u, size_t n)
{
    if (n == 0 || n > 255 || !hub_proto_utf8_valid(u, n)) /* echoed in JSON answers */
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)u[i] < 0x20 || u[i] == 0x7f)
            return 0;
    return 1;
}

/* POST /api/publish, POST /api/broadcast */
static void api_publish(struct hub_http_api *api, struct hub_http_conn *c,
                        const struct hub_request *r, int broadcast)
{
    struct hub_api_req req;
    struct hub_proto_error err;

    memset(&req, 0, sizeof(req));
    if (hub_proto_decode_api(r->body ? r->body : "", r->body_len, broadcast, &req, &err) < 0) {
        hub_buf_free(&req.names);
        api->sessions->protocol_errors[err.code]++;
        hub_http_respond_error(c, 400, hub_proto_code_name(err.code), err.message, 0);
        return;
    }
    struct api_op *op = op_new(c, "the broker is unavailable: the message was not published");
    op->single = !broadcast;
    const char *name = req.names.p;
    for (unsigned i = 0; i < req.nchannels; i++) {
        size_t len = strlen(name);
        op->remaining++;
        if (hub_publish(api->hub, name, len, req.data.p, req.data.len, on_api_published,
                        op) < 0) {
            op->remaining--;
            op->failed = 1;
        }
        name += len + 1;
    }
    hub_buf_free(&req.names);
    op_complete(op, 1); /* drops the guard: answers now if all completed */
}

/* POST /api/reload: build the policy aside, swap on success. The body is
 * ignored; the answer lists every problem when the reload fails. */
static void api_reload(struct hub_http_api *api, struct hub_http_conn *c)
{
    struct hub_config_errors errs = {0};
    struct hub_buf msg = {0};

    if (api->reload(api->ud, &errs) == 0) {
        respond_json(c, 200, "{\"ok\":true}");
        return;
    }
    for (unsigned i = 0; i < errs.n; i++)
        hub_buf_printf(&msg, "%s%s", i ? "; " : "", errs.v[i]);
    hub_http_respond_error(c, 422, "reload_failed",
                           msg.len ? msg.p : "reload failed; the old policy stays", 0);
    hub_buf_free(&msg);
    hub_config_errors_free(&errs);
}

/* POST /api/disconnect {"user":"U"}: close the user's connections on every
 * instance (a control message through the broker). */
static void api_disconnect(struct hub_http_api *api, struct hub_http_conn *c,
                           const struct hub_request *r)
{
    char err[128];
    yajl_val v = NULL, u = NULL;
    const char *path[] = {"user", NULL};
    struct hub_buf body = {0};

    if (r->body_len) { /* yajl_tree_parse wants a NUL-terminated text */
        hub_buf_append(&body, r->body, r->body_len);
        v = yajl_tree_parse(body.p, err, sizeof(err));
    }
    hub_buf_free(&body);
    if (v && YAJL_IS_OBJECT(v) && v->u.object.len == 1)
        u = yajl_tree_get(v, path, yajl_t_string);
    const char *user = u ? YAJL_GET_STRING(u) : NULL;
    if (!user || !user_valid(user, strlen(user))) {
        yajl_tree_free(v);
        hub_http_respond_error(c, 400, "bad_request", "the body must be {\"user\":\"<name>\"}",
                               0);
        return;
    }
    struct api_op *op = op_new(c, "the broker is unavailable: nobody was disconnected, try "
                                  "again later");
    op->remaining++;
    if (hub_registry_disconnect(api->sessions->registry, user, strlen(user), on_disconnected, op) < 0) {
        op->remaining--;
        op->failed = 1;
    }
    yajl_tree_free(v);
    op_complete(op, 1);
}

/* Query parameters a route reads: an array ended by a NULL name. The last
 * occurrence of a name wins. */
struct qarg {
    const char *name;
    struct hub_buf v;
    int found;
};

static int collect_arg(void *ud, const char *name, size_t nl, const char *value, size_t vl)
{
    for (struct qarg *a = ud; a->name; a++)
        if (strlen(a->name) == nl && !memcmp(a->name, name, nl)) {
            hub_buf_reset(&a->v);
            hub_buf_append(&a->v, value, vl);
            a->found = 1;
        }
    return 0;
}

static void args_free(struct qarg *a)
{
    for (; a->name; a++)
        hub_buf_free(&a->v);
}

/* GET /api/connections?user=U: the user's connections on every instance. */
static void api_connections(struct hub_http_api *api, struct hub_http_conn *c,
                            const struct hub_request *r)
{
    struct qarg args[] = {{.name = "user"}, {.name = NULL}};
    struct hub_buf *user = &args[0].v;

    hub_request_query_each(r, collect_arg, args);
    if (!args[0].found || !user_valid(user->p, user->len) || memchr(user->p, '\0', user->len)) {
        args_free(args);
        hub_http_respond_error(c, 400, "bad_request",
                               "query parameter 'user' is required: 1 to 255 bytes of UTF-8 "
                               "without control characters", 0);
        return;
    }
    struct api_op *op = op_new(c, "the registry is unavailable: try again later");
    op->remaining++;
    if (hub_registry_connections(api->sessions->registry, user->p, user->len, on_connections,
                                 op) < 0) {
        op->remaining--;
        op->failed = 1;
    }
    args_free(args);
    op_complete(op, 1);
}

/* The channel of a history or presence query: valid, or answered 400. */
static int channel_arg(struct hub_http_conn *c, const struct qarg *a)
{
    if (a->found && hub_proto_channel_valid(a->v.p, a->v.len))
        return 1;
    hub_http_respond_error(c, 400, a->found ? "invalid_channel" : "bad_request",
                           a->found ? "query parameter 'channel' is not a valid channel name: "
                                      "1 to 255 bytes of A-Z a-z 0-9 _ : . @ / = # -"
                                    : "query parameter 'channel' is required", 0);
    return 0;
}

/* A count or offset argument: digits only, 0..max. */
static int number_arg(const struct qarg *a, uint64_t max, uint64_t *out)
{
    uint64_t v = 0;
    if (!a->v.len || a->v.len > 19)
        return -1;
    for (size_t i = 0; i < a->v.len; i++) {
        if (a->v.p[i] < '0' || a->v.p[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(a->v.p[i] - '0');
    }
    if (v > max)
        return -1;
    *out = v;
    return 0;
}

static void on_api_history(void *ud, int status, const struct hub_history_result *hr)
{
    struct api_op *op = ud;
    if (status == HUB_OK && op->since_epoch && strcmp(op->since_epoch, hr->top.epoch)) {
        op->err_status = 400;
        op->err_code = "bad_request";
        hub_buf_printf(&op->err_msg, "'epoch' names another stream: the history was reset "
                       "(now epoch \"%s\"); read it without 'since'", hr->top.epoch);
    } else if (status == HUB_OK) {
        struct hub_buf *b = &op->result;
        hub_buf_printf(b, "{\"ok\":true,\"offset\":%llu,\"epoch\":",
                       (unsigned long long)hr->top.offset);
        hub_buf_append_json_string(b, hr->top.epoch, strlen(hr->top.epoch));
        hub_buf_appends(b, ",");
        hub_msg_history_json(b, hr->msgs, hr->n, HISTORY_ANSWER_MAX);
        hub_buf_appends(b, "}");
    }
    op_complete(op, status == HUB_OK);
}

/* A history or presence read was started (rc 0: its callback completes
 * `op`) or refused; then drops the guard. */
static void op_started(struct api_op *op, int rc, const char *channel, const char *what)
{
    if (rc == HUB_ENOTAVAIL) {
        op->remaining--;
        op->err_status = 404;
        op->err_code = "not_available";
        hub_buf_printf(&op->err_msg, "channel '%s' has no %s (see the conf's channels)",
                       channel, what);
    } else if (rc < 0) {
        op->remaining--;
        op->failed = 1;
    }
    op_complete(op, 1);
}

/* GET /api/history?channel=C[&limit=N][&since=O&epoch=E][&reverse=true] */
static void api_history(struct hub_http_api *api, struct hub_http_conn *c,
                        const struct hub_request *r)
{
    struct qarg args[] = {{.name = "channel"}, {.name = "limit"}, {.name = "since"},
                          {.name = "epoch"}, {.name = "reverse"}, {.name = NULL}};
    struct hub_history_query q = {.limit = api->cfg->recover_max};
    uint64_t v;
    const char *bad = NULL;

    hub_request_query_each(r, collect_arg, args);
    if (!channel_arg(c, &args[0]))
        goto out;
    if (args[1].found) {
        if (number_arg(&args[1], api->cfg->recover_max, &v) < 0 || v == 0)
            bad = "query parameter 'limit' must be an integer from 1 to recover_max";
        else
            q.limit = (uint32_t)v;
    }
    if (!bad && args[2].found != args[3].found)
        bad = "'since' and 'epoch' go together: an offset names a message only with its epoch";
    if (!bad && args[2].found && number_arg(&args[2], (uint64_t)HUB_OFFSET_MAX, &q.since) < 0)
        bad = "query parameter 'since' must be an offset (an integer from 0)";
    if (!bad && args[4].found) {
        if (!strcmp(args[4].v.p, "true") || !strcmp(args[4].v.p, "1"))
            q.reverse = 1;
        else if (strcmp(args[4].v.p, "false") && strcmp(args[4].v.p, "0"))
            bad = "query parameter 'reverse' must be true or false";
    }
    if (bad) {
        hub_http_respond_error(c, 400, "bad_request", bad, 0);
        goto out;
    }
    struct api_op *op = op_new(c, "the broker is unavailable: history not read, try again "
                                  "later");
    if (args[3].found)
        op->since_epoch = hub_xstrdup(args[3].v.p);
    op->remaining++;
    op_started(op, hub_history(api->hub, args[0].v.p, args[0].v.len, &q, on_api_history, op),
               args[0].v.p, "history");
out:
    args_free(args);
}

static void on_api_presence(void *ud, int status, const struct hub_presence_result *pr)
{
    struct api_op *op = ud;
    if (status == HUB_OK) {
        hub_buf_printf(&op->result, "{\"ok\":true,\"count\":%llu,\"users\":%llu",
                       (unsigned long long)pr->clients, (unsigned long long)pr->users);
        if (pr->list)
            hub_buf_printf(&op->result, ",\"clients\":%s,\"truncated\":%s", pr->list->p,
                           pr->truncated ? "true" : "false");
        hub_buf_appends(&op->result, "}");
    }
    op_complete(op, status == HUB_OK);
}

/* GET /api/presence?channel=C[&stats=true] */
static void api_presence(struct hub_http_api *api, struct hub_http_conn *c,
                         const struct hub_request *r)
{
    struct qarg args[] = {{.name = "channel"}, {.name = "stats"}, {.name = NULL}};
    hub_request_query_each(r, collect_arg, args);
    if (!channel_arg(c, &args[0]))
        goto out;
    int stats = args[1].found && (!strcmp(args[1].v.p, "true") || !strcmp(args[1].v.p, "1"));
    if (args[1].found && !stats && strcmp(args[1].v.p, "false") && strcmp(args[1].v.p, "0")) {
        hub_http_respond_error(c, 400, "bad_request",
                               "query parameter 'stats' must be true or false", 0);
        goto out;
    }
    struct api_op *op = op_new(c, "the broker is unavailable: presence not read, try again "
                                  "later");
    op->remaining++;
    op_started(op, hub_presence(api->hub, args[0].v.p, args[0].v.len,
                                stats ? 0 : api->cfg->presence_max, on_api_presence, op),
               args[0].v.p, "presence");
out:
    args_free(args);
}

static void healthz(struct hub_http_api *api, struct hub_http_conn *c)
{
    if (api->sessions->shutting_down)
        respond_json(c, 503, "{\"status\":\"shutting_down\"}");
    else if (!api->hub->broker->ops->up(api->hub->broker))
        respond_json(c, 503, "{\"status\":\"degraded\",\"broker\":\"down\"}");
    else
        respond_json(c, 200, "{\"status\":\"ok\"}");
}

static void metrics(struct hub_http_api *api, struct hub_http_conn *c)
{
    struct hub_buf b = {0};
    (void)api;
    hub_metrics_render(&b);
    hub_http_respond(c, 200, "text/plain; version=0.0.4", NULL, b.p, b.len, 0);
    hub_buf_free(&b);
}

/* ---- static files -------------------------------------------------------- */

static const char *mime_of(const char *path, size_t len)
{
    static const struct {
        const char *ext, *type;
    } types[] = {
        {".html", "text/html; charset=utf-8"},
        {".htm", "text/html; charset=utf-8"},
        {".js", "text/javascript; charset=utf-8"},
        {".mjs", "text/javascript; charset=utf-8"},
        {".css", "text/css; charset=utf-8"},
        {".json", "application/json"},
        {".map", "application/json"},
        {".txt", "text/plain; charset=utf-8"},
        {".svg", "image/svg+xml"},
        {".png", "image/png"},
        {".jpg", "image/jpeg"},
        {".jpeg", "image/jpeg"},
        {".gif", "image/gif"},
        {".ico", "image/x-icon"},
        {".webp", "image/webp"},
        {".wasm", "application/wasm"},
        {".woff", "font/woff"},
        {".woff2", "font/woff2"},
        {".xml", "application/xml"},
        {".pdf", "application/pdf"},
    };
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        size_t el = strlen(types[i].ext);
        if (len > el && !strcasecmp(path + len - el, types[i].ext))
            return types[i].type;
    }
    return "application/octet-stream";
}

/* A path the static handler may look up: no NUL, no backslash, and no
 * segment that starts with a dot ("..", ".", dotfiles such as .env or
 * .git), except a leading /.well-known/. */
static int static_path_ok(const char *p, size_t n)
{
    if (!n || p[0] != '/' || memchr(p, '\0', n) || memchr(p, '\\', n))
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '/' || i + 1 >= n || p[i + 1] != '.')
            continue;
        if (i == 0 && n >= 12 && !memcmp(p, "/.well-known", 12) && (n == 12 || p[12] == '/') &&
            !(n > 13 && p[13] == '.'))
            continue;
        return 0;
    }
    return 1;
}

/* Opens `rel` (relative, no leading '/') below the static root without
 * leaving it: openat2(RESOLVE_BENEATH) refuses "..", absolute paths and
 * symlinks that lead out of the root (docs/internals.md, "Static files").
 * Returns the fd or -1. */
static int open_beneath(int root, const char *rel)
{
    struct open_how how = {
        .flags = O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, /* a FIFO must not block */
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    return (int)syscall(SYS_openat2, root, rel, &how, sizeof(how));
}

static void serve_static(struct hub_http_api *api, struct hub_http_conn *c,
                         const struct hub_request *r)
{
    struct hub_buf rel = {0};
    struct stat st;
    int fd = -1;

    if (api->static_fd < 0 || !is_get(r) || !static_path_ok(r->path, r->path_len)) {
        hub_http_respond_error(c, 404, "not_found", "no such route", 0);
        return;
    }
    hub_buf_append(&rel, r->path + 1, r->path_len - 1);
    if (!rel.len || rel.p[rel.len - 1] == '/')
        hub_buf_appends(&rel, "index.html");
    fd = open_beneath(api->static_fd, rel.p);
    if (fd >= 0 && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        close(fd);
        hub_buf_appends(&rel, "/index.html");
        fd = open_beneath(api->static_fd, rel.p);
    }
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        if (fd >= 0)
            close(fd);
        hub_buf_free(&rel);
        hub_http_respond_error(c, 404, "not_found", "no such file", 0);
        return;
    }
    hub_http_respond_file(c, 200, mime_of(rel.p, rel.len), "Cache-Control: no-cache\r\n", fd,
                          (uint64_t)st.st_size, 0);
    hub_buf_free(&rel);
}

void hub_http_api_init(struct hub_http_api *api, const struct hub_config *cfg,
                       struct hub *hub, struct hub_sessions *sessions,
                       int (*reload)(void *ud, struct hub_config_errors *errs), void *ud)
{
    *api = (struct hub_http_api){
        .cfg = cfg, .hub = hub, .sessions = sessions,
        .static_fd = -1, .reload = reload, .ud = ud,
    };
    if (!cfg->static_dir)
        return;
    api->static_fd = open(cfg->static_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (api->static_fd < 0)
        hub_log(HUB_LOG_WARN, "static_dir %s: %s: static files are not served",
                cfg->static_dir, strerror(errno));
}

void hub_http_api_free(struct hub_http_api *api)
{
    if (api->static_fd >= 0)
        close(api->static_fd);
    api->static_fd = -1;
}

/* The browser client, clients/js/luahub.js, built into the binary. */
extern const char hub_client_js[];
extern const size_t hub_client_js_len;

static void client_js(struct hub_http_conn *c)
{
    hub_http_respond(c, 200, "text/javascript; charset=utf-8", "Cache-Control: no-cache\r\n",
                     hub_client_js, hub_client_js_len, 0);
}

/* ---- routing --------------------------------------------------------------- */

static void method_not_allowed(struct hub_http_conn *c, const char *allow)
{
    char extra[64], msg[32];
    snprintf(extra, sizeof(extra), "Allow: %s\r\n", allow);
    snprintf(msg, sizeof(msg), "use %s", allow);
    struct hub_buf b = {0};
    hub_buf_appends(&b, "{\"ok\":false,\"error\":{\"code\":\"method_not_allowed\",\"message\":");
    hub_buf_append_json_string(&b, msg, strlen(msg));
    hub_buf_appends(&b, "}}");
    hub_http_respond(c, 405, JSON, extra, b.p, b.len, 0);
    hub_buf_free(&b);
}

void hub_http_api_request(void *ud, struct hub_http_conn *c, const struct hub_request *r)
{
    struct hub_http_api *api = ud;
    const char *path = r->path;

    if (!strncmp(path, "/api/", 5) && r->path_len == strlen(path)) {
        int post = method_is(r, "POST");
        if (!strcmp(path, "/api/connections") || !strcmp(path, "/api/history") ||
            !strcmp(path, "/api/presence")) {
            if (!is_get(r))
                method_not_allowed(c, "GET");
            else if (!authorized(api, c, r))
                ;
            else if (path[5] == 'c')
                api_connections(api, c, r);
            else if (path[5] == 'h')
                api_history(api, c, r);
            else
                api_presence(api, c, r);
            return;
        }
        if (!strcmp(path, "/api/publish") || !strcmp(path, "/api/broadcast") ||
            !strcmp(path, "/api/reload") || !strcmp(path, "/api/disconnect")) {
            if (!post)
                method_not_allowed(c, "POST");
            else if (!authorized(api, c, r))
                ;
            else if (!strcmp(path, "/api/publish"))
                api_publish(api, c, r, 0);
            else if (!strcmp(path, "/api/broadcast"))
                api_publish(api, c, r, 1);
            else if (!strcmp(path, "/api/reload"))
                api_reload(api, c);
            else
                api_disconnect(api, c, r);
            return;
        }
        hub_http_respond_error(c, 404, "not_found", "no such API route", 0);
        return;
    }
    if (!strcmp(path, "/healthz")) {
        if (!is_get(r))
            method_not_allowed(c, "GET");
        else
            healthz(api, c);
        return;
    }
    if (!strcmp(path, "/metrics")) {
        if (!is_get(r))
            method_not_allowed(c, "GET");
        else if (authorized(api, c, r))
            metrics(api, c);
        return;
    }
    if (!strcmp(path, "/luahub.js")) {
        if (!is_get(r))
            method_not_allowed(c, "GET");
        else
            client_js(c);
        return;
    }
    if (!strcmp(path, api->cfg->websocket_path)) {
        hub_http_respond_error(c, 426, "upgrade_required",
                               "this is the WebSocket endpoint: connect with a WebSocket "
                               "client (Upgrade: websocket)",
                               0);
        return;
    }
    serve_static(api, c, r);
}
