/* Fuzz target: the HTTP side of the hub (src/http.c reading requests over
 * a real loopback TCP connection, src/request.c parsing them,
 * src/http_api.c answering them) on a real hub core with the memory
 * broker, its connection registry and a static directory. The input is
 * what a client sends, then it closes its sending side and reads until
 * the hub closes.
 *
 * The first byte chooses how:
 *   0x01 BODY   POST /api/publish with BODY (the target writes the head,
 *               with the right Content-Length)
 *   0x02 BODY   POST /api/broadcast with BODY
 *   0x03 BODY   POST /api/disconnect with BODY
 *   0x04 BYTES  BYTES as they are, to a hub that has an api_key ("k")
 *   0x05 BYTES  BYTES in small pieces, the loop running in between
 *   anything else: the whole input as it is (seeds are plain requests).
 *
 * Checks, beyond no crash and no leak: every response is a well-formed
 * HTTP/1.1 response with a Content-Length, a JSON body is valid JSON in
 * valid UTF-8, no answer is a 500 (a route that did not answer, see
 * http.c's dispatch), a file outside the static directory is never
 * served (symbolic links in it point outside), the hub closes the
 * connection after the client closed its side (no request is left
 * unanswered: a hang is reported), no connection is left open; for the
 * framed bodies, the status agrees with hub_proto_decode_api on the same
 * body (200 exactly when it decodes, else 400 with its error code). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz.h"
#include "luahub/broker.h"
#include "luahub/config.h"
#include "luahub/http.h"
#include "luahub/http_api.h"
#include "luahub/hub.h"
#include "luahub/log.h"
#include "luahub/proto.h"
#include "luahub/registry.h"
#include "luahub/session.h"

/* The content of a file outside static_dir. Its control bytes keep it from
 * being echoed: the answers that quote a request escape them (JSON). */
#define SECRET "\x01FUZZ-SECRET\x02"
#define TURNS_MAX 20000         /* loop turns one input may take */

enum { M_PUBLISH = 1, M_BROADCAST, M_DISCONNECT, M_KEYED, M_SLOW };

/* GET /luahub.js serves the browser client, which the binary embeds at
 * build time (CMakeLists.txt); a constant is as good here. */
const char hub_client_js[] = "/* luahub.js */\n";
const size_t hub_client_js_len = sizeof(hub_client_js) - 1;

static uv_loop_t loop;
static uv_timer_t keep;         /* keeps the loop alive for UV_RUN_NOWAIT */
static struct hub_config cfg, cfg_keyed;
static struct hub_broker *broker;
static struct hub hub;
static struct hub_registry *registry;
static struct hub_sessions sessions;
static struct hub_http_api api, api_keyed;
static struct hub_http_api *cur_api;
static struct hub_http *http;
static int listen_fd;
static int reload_ok;

static int on_reload(void *ud, struct hub_config_errors *errs)
{
    (void)ud;
    if (reload_ok)
        return 0;
    errs->v = hub_xrealloc(errs->v, (errs->n + 1) * sizeof(char *));
    errs->v[errs->n++] = hub_xstrdup("policy.lua:1: the fuzz target's reload fails");
    return -1;
}

static void on_request(void *ud, struct hub_http_conn *c, const struct hub_request *r)
{
    (void)ud;
    hub_http_api_request(cur_api, c, r);
}

/* WebSocket upgrades belong to libwebsockets (server_ws.c): the socket is
 * taken and closed, as a handshake the hub gave up on would be. */
static void on_upgrade(void *ud, struct hub_http_conn *c, const struct hub_request *r)
{
    struct hub_buf rest = {0};
    (void)ud;
    (void)r;
    close(hub_http_take(c, &rest));
    hub_buf_free(&rest);
}

static const struct hub_http_routes routes = {on_request, on_upgrade};

static void on_disconnect_user(void *ud, const char *user, size_t len)
{
    (void)ud;
    (void)user;
    (void)len;
}

static void on_health(void *ud, int up)
{
    hub_broker_health(ud, up);
}

static void on_keep(uv_timer_t *t)
{
    (void)t;
}

static void put_file(const char *dir, const char *name, const char *text)
{
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    fuzz_write_file(p, text, strlen(text));
}

static void put_link(const char *dir, const char *name, const char *to)
{
    char p[PATH_MAX];
    snprintf(p, sizeof(p), "%s/%s", dir, name);
    FUZZ_CHECK(symlink(to, p) == 0, "symlink %s", p);
}

static void load_conf(struct hub_config *c, const char *dir, const char *text)
{
    char p[PATH_MAX];
    struct hub_config_errors errs = {0};

    snprintf(p, sizeof(p), "%s/luahub.conf", dir);
    fuzz_write_file(p, text, strlen(text));
    hub_config_defaults(c);
    FUZZ_CHECK(hub_config_load(c, p, &errs) == 0, "the target's conf: %s",
               errs.n ? errs.v[0] : "?");
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *dir = fuzz_tmpdir();
    char www[PATH_MAX], p[PATH_MAX], err[256];
    static const char conf[] =
        "static_dir = \"www\"\n"
        "max_message_size = \"16KiB\"\n"
        "max_queue_bytes = \"64KiB\"\n"
        "recover_max = 5\n"
        "presence_max = 3\n"
        "channels = {\n"
        "  h = { history_size = 5, history_ttl = 1 },\n"
        "  [\"hist:1\"] = { history_size = 1, history_ttl = 1 },\n"
        "  p = { presence = true, join_leave = true },\n"
        "  [\"pres:1\"] = { presence = true },\n"
        "}\n";

    (void)argc;
    (void)argv;
    hub_log_set_level(HUB_LOG_ERROR);

    /* www/, and a secret beside it that no request may reach */
    snprintf(www, sizeof(www), "%s/www", dir);
    FUZZ_CHECK(mkdir(www, 0700) == 0, "mkdir %s", www);
    put_file(dir, "secret.txt", SECRET "\n");
    put_file(www, "index.html", "<h1>hello</h1>\n");
    put_file(www, "a.json", "{\"a\":1}\n");
    put_file(www, "style.css", "h1 { color: red }\n");
    snprintf(p, sizeof(p), "%s/sub", www);
    FUZZ_CHECK(mkdir(p, 0700) == 0, "mkdir %s", p);
    put_file(p, "index.html", "<p>sub</p>\n");
    put_link(www, "link", "../secret.txt");
    snprintf(p, sizeof(p), "%s/secret.txt", dir);
    put_link(www, "abs", p);
    put_link(www, "up", "..");
    snprintf(p, sizeof(p), "%s/fifo", www);
    FUZZ_CHECK(mkfifo(p, 0600) == 0, "mkfifo %s", p);

    load_conf(&cfg, dir, conf);
    load_conf(&cfg_keyed, dir, "static_dir = \"www\"\napi_key = \"k\"\n");

    FUZZ_CHECK(uv_loop_init(&loop) == 0, "uv_loop_init");
    uv_timer_init(&loop, &keep);
    uv_timer_start(&keep, on_keep, 3600 * 1000, 3600 * 1000);
    broker = hub_broker_new(&loop, "memory", NULL, hub_deliver, on_health, &hub, err,
                            sizeof(err));
    FUZZ_CHECK(broker, "broker: %s", err);
    hub_init(&hub, broker, "fuzz", &cfg);
    registry = hub_broker_registry_new(broker, &(struct hub_registry_options){
        .instance = "fuzz",
        .address = "127.0.0.1:1",
        .disconnect_user = on_disconnect_user,
    });
    sessions = (struct hub_sessions){.cfg = &cfg, .hub = &hub, .registry = registry};
    hub_http_api_init(&api, &cfg, &hub, &sessions, on_reload, NULL);
    hub_http_api_init(&api_keyed, &cfg_keyed, &hub, &sessions, on_reload, NULL);
    http = hub_http_new(&loop, &(struct hub_http_options){
        .max_body = cfg.max_message_size,
        .request_timeout_ms = 10000,
        .idle_timeout_ms = 60000,
    }, &routes, NULL);
    FUZZ_CHECK(http, "hub_http_new");

    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    FUZZ_CHECK(listen_fd >= 0 && bind(listen_fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
               listen(listen_fd, 64) == 0, "listen: %s", strerror(errno));
    return 0;
}

/* ---- the client side ----------------------------------------------------- */

struct client {
    int fd;
    struct hub_buf in;      /* what the hub sent */
    int eof;
};

static void client_read(struct client *cl)
{
    char buf[16384];
    for (;;) {
        ssize_t n = recv(cl->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) {
            hub_buf_append(&cl->in, buf, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
            cl->eof = 1; /* closed, or reset by a close with unread input */
        return;
    }
}

/* A real TCP connection over loopback, accepted by the HTTP side. The
 * calls block (loopback answers at once); libFuzzer's timers interrupt
 * them now and then (EINTR). */
static int client_connect(void)
{
    struct sockaddr_in a;
    socklen_t al = sizeof(a);
    int fd, s, rc;

    FUZZ_CHECK(getsockname(listen_fd, (struct sockaddr *)&a, &al) == 0, "getsockname");
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    FUZZ_CHECK(fd >= 0, "socket: %s", strerror(errno));
    rc = connect(fd, (struct sockaddr *)&a, al);
    while (rc < 0 && (errno == EINTR || errno == EALREADY)) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        poll(&p, 1, 1000);
        rc = connect(fd, (struct sockaddr *)&a, al);
        if (rc < 0 && errno == EISCONN)
            rc = 0;
    }
    FUZZ_CHECK(rc == 0, "connect: %s", strerror(errno));
    do
        s = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    while (s < 0 && errno == EINTR);
    FUZZ_CHECK(s >= 0, "accept: %s", strerror(errno));
    hub_http_accept(http, s);
    return fd;
}

static int turns;

static void turn(struct client *cl)
{
    FUZZ_CHECK(++turns <= TURNS_MAX,
               "the hub neither answered nor closed the connection within %d loop turns "
               "after the client sent its request and closed its side", TURNS_MAX);
    uv_run(&loop, UV_RUN_NOWAIT);
    if (cl)
        client_read(cl);
}

static void client_send(struct client *cl, const char *p, size_t n)
{
    while (n && !cl->eof) {
        ssize_t w = send(cl->fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            turn(cl);
        } else {
            return; /* the hub closed: what is left is not read */
        }
    }
}

/* Open connections of the HTTP side (its metrics gauge). */
static long open_connections(void)
{
    struct hub_buf m = {0};
    hub_http_metrics(http, &m);
    const char *g = strstr(m.p, "\nluahub_http_connections ");
    long n = g ? strtol(g + 25, NULL, 10) : -1;
    hub_buf_free(&m);
    return n;
}

/* ---- the answers ------------------------------------------------------------ */

struct answer {
    int status;
    const char *body;
    size_t body_len;
    int json;
};

/* Parses the responses in `in`; fills the first into `first`. Returns
 * their number. A HEAD response has a Content-Length and no body: a
 * response that is followed at once by another is taken as one. */
static int check_responses(const struct hub_buf *in, struct answer *first)
{
    int n = 0;

    if (!in->len)
        return 0;
    const char *p = in->p, *end = in->p + in->len;

    while (p < end) {
        size_t left = (size_t)(end - p);
        const char *eoh = memmem(p, left, "\r\n\r\n", 4);
        FUZZ_CHECK(eoh, "a response head without its end: %.*s", (int)(left > 200 ? 200 : left),
                   p);
        FUZZ_CHECK(left > 12 && !memcmp(p, "HTTP/1.1 ", 9) && p[12] == ' ',
                   "not an HTTP/1.1 status line: %.*s", (int)(eoh - p), p);
        int status = atoi(p + 9);
        FUZZ_CHECK(status >= 100 && status <= 599, "status %d", status);
        FUZZ_CHECK(status != 500, "a 500: a route did not answer, or failed: %.*s",
                   (int)(end - p), p);
        const char *cl = memmem(p, (size_t)(eoh - p), "\r\nContent-Length: ", 18);
        const char *body = eoh + 4;
        size_t blen = 0;
        if (status == 100) {
            FUZZ_CHECK(eoh - p == 21, "100 Continue with headers");
        } else {
            FUZZ_CHECK(cl, "a response without Content-Length: %.*s", (int)(eoh - p), p);
            blen = strtoul(cl + 18, NULL, 10);
            size_t avail = (size_t)(end - body);
            if (avail == 0 || (avail >= 9 && !memcmp(body, "HTTP/1.1 ", 9)))
                blen = 0; /* HEAD */
            FUZZ_CHECK(blen <= avail, "Content-Length %zu, %zu bytes follow", blen, avail);
        }
        int json = memmem(p, (size_t)(eoh - p), "Content-Type: application/json", 30) != NULL;
        if (json && blen) {
            FUZZ_CHECK(hub_proto_json_valid(body, blen),
                       "a JSON body that is not valid JSON in UTF-8: %.*s", (int)blen, body);
        }
        if (n == 0 && status != 100) {
            first->status = status;
            first->body = body;
            first->body_len = blen;
            first->json = json;
        }
        n += status != 100;
        p = body + blen;
    }
    FUZZ_CHECK(!memmem(in->p, in->len, SECRET, strlen(SECRET)),
               "a file outside static_dir was served");
    return n;
}

/* The framed API bodies: the answer must agree with the decoder. */
static void check_api_answer(int mode, const char *body, size_t len, const struct answer *a,
                             int nresp)
{
    struct hub_api_req req;
    struct hub_proto_error err;

    FUZZ_CHECK(nresp == 1, "%d answers to one request", nresp);
    if (len > cfg.max_message_size) { /* every route: http.c refuses the body */
        FUZZ_CHECK(a->status == 413, "a body over max_message_size got %d", a->status);
        return;
    }
    if (mode == M_DISCONNECT) {
        FUZZ_CHECK(a->status == 200 || a->status == 400, "disconnect answered %d", a->status);
        static const char ok[] = "{\"ok\":true,\"instances\":1}";
        if (a->status == 200)
            FUZZ_CHECK(a->body_len == strlen(ok) && !memcmp(a->body, ok, strlen(ok)),
                       "disconnect body %.*s", (int)a->body_len, a->body);
        return;
    }
    memset(&req, 0, sizeof(req));
    int rc = hub_proto_decode_api(body, len, mode == M_BROADCAST, &req, &err);
    hub_buf_free(&req.names);
    if (rc == 0) {
        FUZZ_CHECK(a->status == 200, "a body that decodes got %d: %.*s", a->status,
                   (int)a->body_len, a->body);
        return;
    }
    char code[64];
    snprintf(code, sizeof(code), "\"code\":\"%s\"", hub_proto_code_name(err.code));
    FUZZ_CHECK(a->status == 400 && memmem(a->body, a->body_len, code, strlen(code)),
               "a body the decoder refuses (%s) got %d: %.*s", code, a->status,
               (int)a->body_len, a->body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct client cl = {.fd = -1};
    struct hub_buf req = {0};
    const char *body = (const char *)data + 1;
    size_t blen = size ? size - 1 : 0;
    int mode = size ? data[0] : 0;
    struct answer first = {0};

    turns = 0;
    reload_ok = size & 1;
    cur_api = mode == M_KEYED ? &api_keyed : &api;
    if (mode == M_PUBLISH || mode == M_BROADCAST || mode == M_DISCONNECT) {
        static const char *const path[] = {"", "publish", "broadcast", "disconnect"};
        hub_buf_printf(&req, "POST /api/%s HTTP/1.1\r\nHost: fuzz\r\nContent-Length: %zu\r\n"
                       "\r\n", path[mode], blen);
        hub_buf_append(&req, body, blen);
    } else if (mode == M_KEYED || mode == M_SLOW) {
        hub_buf_append(&req, body, blen);
    } else {
        hub_buf_append(&req, data, size);
    }

    cl.fd = client_connect();

    if (mode == M_SLOW) {
        for (size_t off = 0; off < req.len && !cl.eof;) {
            size_t piece = 1 + ((unsigned char)req.p[off] & 15);
            if (piece > req.len - off)
                piece = req.len - off;
            client_send(&cl, req.p + off, piece);
            off += piece;
            turn(&cl);
        }
    } else if (req.len) {
        client_send(&cl, req.p, req.len);
    }
    shutdown(cl.fd, SHUT_WR);
    turns = 0;
    while (!cl.eof)
        turn(&cl);
    close(cl.fd);
    while (open_connections() > 0)
        turn(NULL);

    if (getenv("FUZZ_HTTP_SHOW")) /* what the hub answered (README.md) */
        fprintf(stderr, "---- %zu bytes answered:\n%.*s\n----\n", cl.in.len, (int)cl.in.len,
                cl.in.p ? cl.in.p : "");
    int nresp = check_responses(&cl.in, &first);
    if (mode == M_PUBLISH || mode == M_BROADCAST || mode == M_DISCONNECT)
        check_api_answer(mode, body, blen, &first, nresp);
    hub_buf_free(&cl.in);
    hub_buf_free(&req);
    return 0;
}
