/* Integration suite: the HTTP side of the hub (docs/protocol.md "HTTP API")
 * against the real binary over real sockets: the publish API and its
 * errors, authentication (non-loopback clients from a network namespace of
 * the test's own), /healthz, /metrics, keep-alive, and max_connections as
 * HTTP sees it. Static files (and the tests that need a static_dir) are in
 * test_static.c.
 *
 * Every test starts its own hub and ends with hub_stop() == 0: the ASan
 * build exits non-zero on a leak, so each test is also a leak check.
 * After every bad request the hub must still serve others: a WebSocket
 * subscriber gets nothing from the bad request (ws_sync proves it) and does
 * get a following good publish (still_serves()). */
#include <check.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hubtest.h"

/* Small limits so the size tests stay small; ping settings long enough that
 * no PING interferes; shutdown_timeout bounds hub_stop() if a client is
 * left open. */
#define MAX_MSG 1024
#define CONF_BASE                   \
    "max_message_size = 1024\n"     \
    "max_queue_bytes = 65536\n"     \
    "ping_interval = 30\n"          \
    "ping_timeout = 10\n"
#define CONF CONF_BASE "shutdown_timeout = 2\n"

#define KEY "s3cret-Key_42"
#define AUTH "Authorization: Bearer " KEY "\r\n"
#define JSON_CT "Content-Type: application/json\r\n"

/* ------------------------------------------------------------------ */
/* Helpers                                                              */
/* ------------------------------------------------------------------ */


/* A hub with one WebSocket client subscribed to "room". `auth`: the header
 * line API requests need on this hub ("" when api_key is unset). */
struct fx {
    struct hub *h;
    struct ws *sub;
    const char *auth;
};

static void fx_start_conf(struct fx *f, const char *conf, const char *auth)
{
    f->h = hub_start(conf);
    f->sub = ws_connect(f->h->port);
    ws_subscribe(f->sub, "room");
    f->auth = auth ? auth : "";
}

/* The fixture on CONF plus `extra_conf` (may be NULL). */
static void fx_start(struct fx *f, const char *extra_conf, const char *auth)
{
    char *conf = ht_asprintf("%s%s", CONF, extra_conf ? extra_conf : "");
    fx_start_conf(f, conf, auth);
    free(conf);
}

static void fx_stop(struct fx *f)
{
    ws_free(f->sub);
    ck_assert_int_eq(hub_stop(f->h), 0);
}

/* An API request: method + path + body (NULL: none) with the JSON content
 * type and the extra header lines `headers` (may be NULL). */
static int api(int port, const char *method, const char *path, const char *headers,
               const char *body, struct http_resp *r)
{
    char *hdr = ht_asprintf(JSON_CT "%s", headers ? headers : "");
    int st = http_request(port, method, path, hdr, body, r);
    free(hdr);
    return st;
}



/* The hub still serves: nothing was delivered to the subscriber so far
 * (beyond what the test already read), and a good API publish reaches it. */
static void still_serves(struct fx *f)
{
    static int seq;
    ws_sync(f->sub);
    char data[32];
    snprintf(data, sizeof data, "{\"after\":%d}", ++seq);
    char *body = ht_asprintf("{\"channel\":\"room\",\"data\":%s}", data);
    struct http_resp r;
    api(f->h->port, "POST", "/api/publish", f->auth, body, &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    free(body);
    char *want = ws_delivery("room", data);
    ws_expect(f->sub, want);
    free(want);
    ws_sync(f->sub);
}

/* Size on the wire of a server frame with `len` payload bytes (unmasked). */
static long long frame_size(size_t len)
{
    return (long long)len + (len < 126 ? 2 : len < 65536 ? 4 : 10);
}

/* Sends a command and requires the exact reply; adds the reply frame to
 * `*out` (bytes the hub wrote). */
static void cmd(struct ws *c, const char *req, const char *reply, long long *out)
{
    ws_send_text(c, req);
    ws_expect(c, reply);
    *out += frame_size(strlen(reply));
}

/* The next message must be `want`; adds it to `*out`. */
static void expect_counted(struct ws *c, const char *want, long long *out)
{
    ws_expect(c, want);
    *out += frame_size(strlen(want));
}

/* The body of {"channel":"room","data":"aaa...a"} padded to exactly `total`
 * bytes (new string); `*data` gets the data value as JSON (new string). */
static char *sized_body(size_t total, char **data)
{
    static const char pre[] = "{\"channel\":\"room\",\"data\":\"", post[] = "\"}";
    size_t pad = total - (sizeof pre - 1) - (sizeof post - 1);
    char *b = malloc(total + 1);
    ck_assert_ptr_nonnull(b);
    memcpy(b, pre, sizeof pre - 1);
    for (size_t i = 0; i < pad; i++)
        b[sizeof pre - 1 + i] = (char)('a' + i % 26);
    memcpy(b + sizeof pre - 1 + pad, post, sizeof post);
    ck_assert_uint_eq(strlen(b), total);
    *data = ht_asprintf("\"%.*s\"", (int)pad, b + sizeof pre - 1);
    return b;
}

/* ------------------------------------------------------------------ */
/* The API: publish and broadcast                                       */
/* ------------------------------------------------------------------ */

START_TEST(api_publish_delivers_exact_bytes)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    struct ws *other = ws_connect(f.h->port);
    ws_subscribe(other, "elsewhere");
    /* spacing, escapes and number forms must reach subscribers untouched */
    const char *data = "{ \"t\" : [1, 2.50, -0e+1, \"\\u00e9\\n\"] ,\"n\":null }";
    char *body = ht_asprintf("{\"channel\":\"room\",\"data\":%s}", data);
    struct http_resp r;
    ck_assert_int_eq(api(f.h->port, "POST", "/api/publish", NULL, body, &r), 200);
    http_expect_ok(&r);
    char *ct = http_resp_header(&r, "Content-Type");
    ck_assert_msg(ct && strncmp(ct, "application/json", 16) == 0, "Content-Type %s", ct);
    free(ct);
    http_resp_free(&r);
    char *want = ws_delivery("room", data);
    ws_expect(f.sub, want);
    ws_sync(f.sub);
    ws_sync(other);     /* another channel's subscriber gets nothing */
    free(want);
    free(body);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 1);
    ck_assert_int_eq(hub_metric(f.h, "luahub_deliveries_total"), 1);
    ws_free(other);
    fx_stop(&f);
}
END_TEST

START_TEST(api_broadcast_each_channel_once)
{
    struct fx f;
    fx_start(&f, NULL, NULL);       /* f.sub: "room" only */
    struct ws *b = ws_connect(f.h->port), *both = ws_connect(f.h->port);
    struct ws *none = ws_connect(f.h->port);
    ws_subscribe(b, "lobby");
    ws_subscribe(both, "room");
    ws_subscribe(both, "lobby");
    ws_subscribe(none, "other");
    struct http_resp r;
    ck_assert_int_eq(api(f.h->port, "POST", "/api/broadcast", NULL,
                         "{\"channels\":[\"room\",\"lobby\"],\"data\":{\"n\":1}}", &r), 200);
    http_expect_ok(&r);
    http_resp_free(&r);
    ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":{\"n\":1}}");
    ws_expect(b, "{\"op\":\"message\",\"channel\":\"lobby\",\"data\":{\"n\":1}}");
    /* a client in both channels gets it once per channel */
    ws_expect_pair(both, "{\"op\":\"message\",\"channel\":\"room\",\"data\":{\"n\":1}}",
                   "{\"op\":\"message\",\"channel\":\"lobby\",\"data\":{\"n\":1}}");
    ws_sync(f.sub);
    ws_sync(b);
    ws_sync(both);
    ws_sync(none);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 2);
    ck_assert_int_eq(hub_metric(f.h, "luahub_deliveries_total"), 4);
    ws_free(b);
    ws_free(both);
    ws_free(none);
    fx_stop(&f);
}
END_TEST

START_TEST(api_broadcast_duplicate_names_deliver_once)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    struct ws *both = ws_connect(f.h->port);
    ws_subscribe(both, "room");
    ws_subscribe(both, "lobby");
    struct http_resp r;
    ck_assert_int_eq(api(f.h->port, "POST", "/api/broadcast", NULL,
                         "{\"channels\":[\"room\",\"room\",\"lobby\",\"room\",\"lobby\"],"
                         "\"data\":\"dup\"}", &r), 200);
    http_expect_ok(&r);
    http_resp_free(&r);
    ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"dup\"}");
    ws_expect_pair(both, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"dup\"}",
                   "{\"op\":\"message\",\"channel\":\"lobby\",\"data\":\"dup\"}");
    ws_sync(f.sub);     /* and no second copy */
    ws_sync(both);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 2);
    ck_assert_int_eq(hub_metric(f.h, "luahub_deliveries_total"), 3);
    ws_free(both);
    fx_stop(&f);
}
END_TEST

/* One bad channel name fails the whole broadcast: no channel gets it. */
START_TEST(api_broadcast_invalid_channel_delivers_nothing)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    struct http_resp r;
    api(f.h->port, "POST", "/api/broadcast", NULL,
        "{\"channels\":[\"room\",\"bad name\"],\"data\":1}", &r);
    http_expect_error(&r, 400, "invalid_channel");
    http_resp_free(&r);
    api(f.h->port, "POST", "/api/broadcast", NULL, "{\"channels\":[],\"data\":1}", &r);
    http_expect_error(&r, 400, "bad_request");
    http_resp_free(&r);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 0);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

START_TEST(api_broadcast_1024_channels_at_most)
{
    struct fx f;
    fx_start_conf(&f, "max_message_size = 65536\nshutdown_timeout = 2\n", NULL);
    size_t cap = 1025 * 12 + 64, n = 0;
    char *body = malloc(cap);
    ck_assert_ptr_nonnull(body);
    n += (size_t)snprintf(body, cap, "{\"channels\":[\"room\"");
    for (int i = 1; i < 1025; i++)
        n += (size_t)snprintf(body + n, cap - n, ",\"c%d\"", i);
    snprintf(body + n, cap - n, "],\"data\":1}");
    struct http_resp r;
    api(f.h->port, "POST", "/api/broadcast", NULL, body, &r);
    http_expect_error(&r, 400, "limit_exceeded");
    http_resp_free(&r);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 0);
    ws_sync(f.sub);
    /* exactly 1024 is accepted: drop the last name */
    char *last = strstr(body, ",\"c1024\"]");
    ck_assert_ptr_nonnull(last);
    snprintf(last, cap - (size_t)(last - body), "],\"data\":1024}");
    api(f.h->port, "POST", "/api/broadcast", NULL, body, &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":1024}");
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 1024);
    still_serves(&f);
    free(body);
    fx_stop(&f);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Authentication                                                       */
/* ------------------------------------------------------------------ */

START_TEST(auth_missing_key_401)
{
    struct fx f;
    fx_start(&f, "api_key = \"" KEY "\"\n", AUTH);
    struct http_resp r;
    /* loopback does not excuse a missing key once api_key is set */
    api(f.h->port, "POST", "/api/publish", NULL, "{\"channel\":\"room\",\"data\":1}", &r);
    http_expect_error(&r, 401, "unauthorized");
    http_resp_free(&r);
    api(f.h->port, "POST", "/api/broadcast", NULL, "{\"channels\":[\"room\"],\"data\":1}", &r);
    http_expect_error(&r, 401, "unauthorized");
    http_resp_free(&r);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 0);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

START_TEST(auth_wrong_key_401)
{
    struct fx f;
    fx_start(&f, "api_key = \"" KEY "\"\n", AUTH);
    static const char *const wrong[] = {
        "Authorization: Bearer nope\r\n",
        "Authorization: Bearer s3cret-Key_4\r\n",       /* a prefix */
        "Authorization: Bearer s3cret-Key_421\r\n",     /* longer */
        "Authorization: Bearer S3CRET-KEY_42\r\n",      /* other case */
        "Authorization: Bearer \r\n",
        "Authorization: " KEY "\r\n",                   /* no scheme */
        "Authorization: Basic " KEY "\r\n",
        "X-Api-Key: " KEY "\r\n",
    };
    for (size_t i = 0; i < sizeof wrong / sizeof *wrong; i++) {
        struct http_resp r;
        api(f.h->port, "POST", "/api/publish", wrong[i], "{\"channel\":\"room\",\"data\":1}", &r);
        ck_assert_msg(r.status == 401, "with %s: status %d", wrong[i], r.status);
        http_expect_error(&r, 401, "unauthorized");
        http_resp_free(&r);
    }
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 0);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

START_TEST(auth_right_key_200)
{
    struct fx f;
    fx_start(&f, "api_key = \"" KEY "\"\n", AUTH);
    struct http_resp r;
    api(f.h->port, "POST", "/api/publish", AUTH, "{\"channel\":\"room\",\"data\":\"k\"}", &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"k\"}");
    api(f.h->port, "POST", "/api/broadcast", AUTH, "{\"channels\":[\"room\"],\"data\":\"b\"}", &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"b\"}");
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

/* No api_key: loopback peers may use the API (127.0.0.1 here, see
 * still_serves; ::1 below). */
START_TEST(auth_no_key_loopback_200)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    still_serves(&f);
    fx_stop(&f);

    struct hub_opts o = { .listen = "[::1]:0" };
    struct hub *h = hub_start_opts(CONF, &o);
    struct http_resp r;
    http_request_at("::1", h->port, "POST", "/api/publish", JSON_CT,
                    "{\"channel\":\"room\",\"data\":1}", &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* The non-loopback path without leaving loopback: test traffic goes only
 * to 127.0.0.0/8 or into a network namespace the test makes itself. The
 * test process (Check forked it for this test) moves into a new network
 * namespace, brings its lo up and gives it the TEST-NET-1 address
 * 192.0.2.1 (RFC 5737); the hub, its child, inherits the namespace and
 * listens there. A connection to 192.0.2.1 then comes from 192.0.2.1: for
 * the hub a peer outside 127.0.0.0/8 (checked with getsockname), while the
 * packets never leave the namespace. The host's network configuration is
 * never touched (`ip` runs only once we are in the new namespace), and the
 * namespace goes away with the test's processes.
 * Making a network namespace needs root (CAP_SYS_ADMIN); without it the
 * test fails and says so rather than pass without testing anything. */
#define NS_ADDR "192.0.2.1"

/* Runs `ip ARGS...` (NULL-terminated), which must succeed. */
static void ip_cmd(const char *a1, ...)
{
    static const char *const bins[] = { "/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip" };
    const char *argv[16] = { NULL };
    for (size_t i = 0; i < sizeof bins / sizeof *bins && !argv[0]; i++)
        if (access(bins[i], X_OK) == 0)
            argv[0] = bins[i];
    ck_assert_msg(argv[0], "no ip(8) in /usr/sbin, /sbin, /usr/bin or /bin (package iproute2): "
                  "needed to set up the test's network namespace");
    size_t n = 1;
    va_list ap;
    va_start(ap, a1);
    for (const char *a = a1; a; a = va_arg(ap, const char *)) {
        ck_assert(n < sizeof argv / sizeof *argv - 1);
        argv[n++] = a;
    }
    va_end(ap);
    char *out;
    int st = ht_run(argv, &out, HT_WAIT_MS);
    if (st != 0) {
        char cmd[256] = "";
        for (size_t i = 0; i < n; i++)
            snprintf(cmd + strlen(cmd), sizeof cmd - strlen(cmd), "%s%s", i ? " " : "", argv[i]);
        ck_abort_msg("%s: exit status %d in the test's network namespace:\n%s", cmd, st, out);
    }
    free(out);
}

/* Moves the test process into a new network namespace with lo up and
 * NS_ADDR on lo. Returns an fd of the namespace it left, for netns_leave. */
static int netns_enter(void)
{
    int orig = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    ck_assert_msg(orig >= 0, "open /proc/self/ns/net: %s", strerror(errno));
    struct stat before, after;
    ck_assert_int_eq(fstat(orig, &before), 0);
    if (unshare(CLONE_NEWNET) < 0)
        ck_abort_msg("unshare(CLONE_NEWNET): %s: this test needs its own network namespace "
                     "for a non-loopback client (run the suite as root, or with "
                     "CAP_SYS_ADMIN); it does not fall back to a host address",
                     strerror(errno));
    /* never run ip on the host's namespace */
    ck_assert_int_eq(stat("/proc/self/ns/net", &after), 0);
    ck_assert_msg(after.st_ino != before.st_ino, "unshare(CLONE_NEWNET) left the namespace "
                  "unchanged");
    ip_cmd("link", "set", "lo", "up", (const char *)NULL);
    ip_cmd("addr", "add", NS_ADDR "/32", "dev", "lo", (const char *)NULL);
    return orig;
}

/* Back to the namespace netns_enter left. Only matters under CK_FORK=no,
 * where the next tests run in this same process. */
static void netns_leave(int orig)
{
    ck_assert_msg(setns(orig, CLONE_NEWNET) == 0, "setns: %s", strerror(errno));
    close(orig);
}

/* netns_enter, then a hub on `conf` listening on every address of the
 * namespace: NS_ADDR for the non-loopback client, 127.0.0.1 for
 * hub_metric. */
static struct hub *start_nonloopback(const char *conf, int *orig_ns)
{
    *orig_ns = netns_enter();
    struct hub_opts o = { .listen = "0.0.0.0:0" };
    struct hub *h = hub_start_opts(conf, &o);
    /* the hub sees a client of NS_ADDR as a non-loopback peer */
    int fd = tcp_connect_at(NS_ADDR, h->port);
    struct sockaddr_in me;
    socklen_t ml = sizeof me;
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&me, &ml), 0);
    char a[INET_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET, &me.sin_addr, a, sizeof a);
    ck_assert_msg(me.sin_family == AF_INET && (ntohl(me.sin_addr.s_addr) >> 24) != 127,
                  "the client address %s is loopback", a);
    close(fd);
    return h;
}

/* /metrics follows the API's rule: from a non-loopback peer it needs the
 * key (`auth`, NULL when the hub has none: then it is refused with
 * `status`). */
static void metrics_from_outside(int port, const char *auth, int status)
{
    struct http_resp r;
    http_request_at(NS_ADDR, port, "GET", "/metrics", NULL, NULL, &r);
    http_expect_error(&r, status, status == 401 ? "unauthorized" : "forbidden");
    http_resp_free(&r);
    if (auth) {
        ck_assert_int_eq(http_request_at(NS_ADDR, port, "GET", "/metrics", auth, NULL, &r),
                         200);
        ck_assert_msg(strstr(r.body, "luahub_messages_published_total"), "%s", r.body);
        http_resp_free(&r);
    }
}

START_TEST(auth_no_key_non_loopback_403)
{
    int ns;
    struct hub *h = start_nonloopback(CONF, &ns);
    struct http_resp r;
    http_request_at(NS_ADDR, h->port, "POST", "/api/publish", JSON_CT,
                    "{\"channel\":\"room\",\"data\":1}", &r);
    http_expect_error(&r, 403, "forbidden");
    ck_assert_msg(strstr(r.body, "set api_key"), "the 403 does not say to set api_key: %s",
                  r.body);
    http_resp_free(&r);
    http_request_at(NS_ADDR, h->port, "POST", "/api/broadcast", JSON_CT,
                    "{\"channels\":[\"room\"],\"data\":1}", &r);
    http_expect_error(&r, 403, "forbidden");
    http_resp_free(&r);
    metrics_from_outside(h->port, NULL, 403);
    ck_assert_int_eq(hub_metric(h, "luahub_messages_published_total"), 0);
    ck_assert_int_eq(hub_stop(h), 0);
    netns_leave(ns);
}
END_TEST

/* With api_key set, a non-loopback client with the key is served, and one
 * without it gets 401 (not 403). */
START_TEST(auth_key_non_loopback_200)
{
    int ns;
    struct hub *h = start_nonloopback(CONF "api_key = \"" KEY "\"\n", &ns);
    struct http_resp r;
    http_request_at(NS_ADDR, h->port, "POST", "/api/publish", JSON_CT,
                    "{\"channel\":\"room\",\"data\":1}", &r);
    http_expect_error(&r, 401, "unauthorized");
    http_resp_free(&r);
    http_request_at(NS_ADDR, h->port, "POST", "/api/publish", JSON_CT AUTH,
                    "{\"channel\":\"room\",\"data\":1}", &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    metrics_from_outside(h->port, AUTH, 401);
    ck_assert_int_eq(hub_metric(h, "luahub_messages_published_total"), 1);
    ck_assert_int_eq(hub_stop(h), 0);
    netns_leave(ns);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Bad requests                                                         */
/* ------------------------------------------------------------------ */

/* Bad API bodies, all against one hub: each gets its status with the
 * protocol's error object, nothing is published, and the hub keeps
 * serving (a subscriber gets nothing from it, then a good publish). */
static const struct {
    const char *body;
    const char *code;
} bad_bodies[] = {
    {"channel=room&data=1", "bad_request"},                             /* not JSON */
    {"{\"channel\":\"room\",\"data\":", "bad_request"},                   /* truncated */
    {"[{\"channel\":\"room\",\"data\":1}]", "bad_request"},               /* an array */
    {"", "bad_request"},                                                /* empty */
    {"{\"channel\":\"room 1\",\"data\":1}", "invalid_channel"},
    {"{\"channel\":\"room\"}", "bad_request"},                            /* no data */
    {"{\"channels\":[\"room\"],\"data\":1}", "bad_request"},              /* broadcast's */
    {"{\"channel\":\"room\",\"data\":1,\"id\":1}", "bad_request"},          /* no op, no id */
    {"{\"channel\":\"room\",\"data\":1,\"channel\":\"admin\"}", "bad_request"}, /* crafted */
};

START_TEST(bad_bodies_publish_nothing)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    for (size_t i = 0; i < sizeof bad_bodies / sizeof *bad_bodies; i++) {
        struct http_resp r;
        api(f.h->port, "POST", "/api/publish", NULL, bad_bodies[i].body, &r);
        ck_assert_msg(r.status == 400, "body %zu (%s): status %d", i, bad_bodies[i].body,
                      r.status);
        http_expect_error(&r, 400, bad_bodies[i].code);
        http_resp_free(&r);
        ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), (long long)i);
        still_serves(&f); /* publishes one good message */
    }
    fx_stop(&f);
}
END_TEST

/* A request with neither Content-Length nor Transfer-Encoding has an empty
 * body (RFC 9112 §6.3): /api/reload needs none; /api/publish answers 400
 * for the empty body; what a client sends after the head without saying
 * so is its next request (here: not one, so 400 and the connection
 * closes). */
START_TEST(no_content_length_is_empty_body)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    static const char reload[] = "POST /api/reload HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    static const char publish[] =
        "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n" JSON_CT "\r\n"
        "{\"channel\":\"room\",\"data\":\"nolen\"}";
    int fd = tcp_connect(f.h->port);
    struct http_resp r;
    tcp_send(fd, reload, sizeof reload - 1);
    http_read_response(fd, &r, HT_WAIT_MS, 0);
    http_expect_ok(&r);
    http_resp_free(&r);
    tcp_send(fd, publish, sizeof publish - 1);
    /* Both answers may come in one read: read the stream to its end. */
    char all[4096];
    size_t len = 0;
    for (;;) {
        ssize_t got = tcp_recv(fd, all + len, sizeof all - 1 - len, HT_WAIT_MS);
        ck_assert_msg(got >= 0, "timed out; so far: %.*s", (int)len, all);
        if (got == 0)
            break; /* closed after the bad request line */
        len += (size_t)got;
    }
    all[len] = '\0';
    const char *second = strstr(all + 1, "HTTP/1.1 ");
    ck_assert_msg(!strncmp(all, "HTTP/1.1 400 ", 13) && second &&
                  !strncmp(second, "HTTP/1.1 400 ", 13) && !strstr(second + 1, "HTTP/1.1 ") &&
                  strstr(all, "\"bad_request\"") && strstr(second, "\"bad_request\""),
                  "expected two 400 bad_request answers, got:\n%s", all);
    close(fd);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 0);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

static char *chunked_request(void)
{
    static const char body[] = "{\"channel\":\"room\",\"data\":\"chunked\"}";
    return ht_asprintf("POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n" JSON_CT
                     "Transfer-Encoding: chunked\r\n\r\n%zx\r\n%s\r\n0\r\n\r\n",
                     sizeof body - 1, body);
}

START_TEST(chunked_body_411_and_closed)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    char *req = chunked_request();
    int fd = tcp_connect(f.h->port);
    tcp_send(fd, req, strlen(req));
    struct http_resp r;
    http_read_response(fd, &r, HT_WAIT_MS, 0);
    http_expect_error(&r, 411, "length_required");
    char *conn = http_resp_header(&r, "Connection");
    ck_assert_msg(conn && strcasecmp(conn, "close") == 0, "411 without Connection: close:\n%s",
                  r.head);
    free(conn);
    http_resp_free(&r);
    ck_assert_msg(tcp_wait_closed(fd, HT_WAIT_MS), "connection still open after 411");
    close(fd);
    free(req);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 0);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

/* The 411 comes from the headers alone: a client that waits before
 * sending its chunks is not left hanging. */
START_TEST(chunked_headers_only_answered_at_once)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    static const char req[] = "POST /api/broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n" JSON_CT
                              "Transfer-Encoding: chunked\r\n\r\n";
    int fd = tcp_connect(f.h->port);
    tcp_send(fd, req, sizeof req - 1);
    struct http_resp r;
    http_read_response(fd, &r, HT_WAIT_MS, 0);
    http_expect_error(&r, 411, "length_required");
    http_resp_free(&r);
    ck_assert_msg(tcp_wait_closed(fd, HT_WAIT_MS), "connection still open after 411");
    close(fd);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

START_TEST(invalid_content_length_400)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    static const char req[] = "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n" JSON_CT
                              "Content-Length: 12abc\r\n\r\n{\"channel\":";
    int fd = tcp_connect(f.h->port);
    tcp_send(fd, req, sizeof req - 1);
    struct http_resp r;
    http_read_response(fd, &r, HT_WAIT_MS, 0);
    http_expect_error(&r, 400, "bad_request");
    http_resp_free(&r);
    close(fd);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

START_TEST(body_over_max_size_413)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    char *data;
    char *body = sized_body(MAX_MSG + 1, &data);
    struct http_resp r;
    api(f.h->port, "POST", "/api/publish", NULL, body, &r);
    http_expect_error(&r, 413, "too_large");
    http_resp_free(&r);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 0);
    still_serves(&f);
    free(body);
    free(data);
    fx_stop(&f);
}
END_TEST

/* A huge Content-Length is refused from the headers: the hub neither waits
 * for nor buffers the announced body. */
START_TEST(huge_content_length_413_at_once)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    static const char req[] = "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n" JSON_CT
                              "Content-Length: 1099511627776\r\n\r\n{\"channel\"";
    int fd = tcp_connect(f.h->port);
    tcp_send(fd, req, sizeof req - 1);
    struct http_resp r;
    http_read_response(fd, &r, HT_WAIT_MS, 0);
    http_expect_error(&r, 413, "too_large");
    http_resp_free(&r);
    ck_assert_msg(tcp_wait_closed(fd, HT_WAIT_MS), "connection still open after 413");
    close(fd);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

START_TEST(body_exactly_max_size_accepted)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    char *data;
    char *body = sized_body(MAX_MSG, &data);
    struct http_resp r;
    api(f.h->port, "POST", "/api/publish", NULL, body, &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    char *want = ws_delivery("room", data);
    ws_expect(f.sub, want);
    free(want);
    still_serves(&f);
    free(body);
    free(data);
    fx_stop(&f);
}
END_TEST

/* A user name is echoed in JSON answers: one that is not UTF-8, has a
 * control character or is too long is refused with 400, before anything
 * is looked up. */
START_TEST(api_user_names_checked)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    static const char *const paths[] = {
        "/api/connections?user=%FF", "/api/connections?user=a%C3", "/api/connections?user=%C0%80",
        "/api/connections?user=%ED%A0%80", "/api/connections?user=a%0Ab", "/api/connections",
        "/api/connections?user=",
    };
    for (size_t i = 0; i < sizeof paths / sizeof *paths; i++) {
        struct http_resp r;
        http_request(f.h->port, "GET", paths[i], NULL, NULL, &r);
        http_expect_error(&r, 400, "bad_request");
        ck_assert_msg(strstr(r.body, "UTF-8"), "GET %s: %s", paths[i], r.body);
        http_resp_free(&r);
    }
    struct http_resp r;
    api(f.h->port, "POST", "/api/disconnect", NULL, "{\"user\":\"\\udc00\"}", &r);
    ck_assert_int_eq(r.status, 400);
    http_resp_free(&r);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

START_TEST(unknown_route_404)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    static const char *const paths[] = { "/nope", "/api/nope", "/api/publish/x", "/api",
                                         "/healthz/x" };
    for (size_t i = 0; i < sizeof paths / sizeof *paths; i++) {
        struct http_resp r;
        http_request(f.h->port, "GET", paths[i], NULL, NULL, &r);
        ck_assert_msg(r.status == 404, "GET %s: %d", paths[i], r.status);
        http_expect_error(&r, 404, "not_found");
        http_resp_free(&r);
    }
    struct http_resp r;
    api(f.h->port, "POST", "/api/nope", NULL, "{\"channel\":\"room\",\"data\":1}", &r);
    http_expect_error(&r, 404, "not_found");
    http_resp_free(&r);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

START_TEST(wrong_method_405)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    struct http_resp r;
    http_request(f.h->port, "GET", "/api/publish", NULL, NULL, &r);
    http_expect_error(&r, 405, "method_not_allowed");
    http_resp_free(&r);
    http_request(f.h->port, "GET", "/api/broadcast", NULL, NULL, &r);
    http_expect_error(&r, 405, "method_not_allowed");
    http_resp_free(&r);
    http_request(f.h->port, "POST", "/healthz", NULL, NULL, &r);
    http_expect_error(&r, 405, "method_not_allowed");
    http_resp_free(&r);
    api(f.h->port, "POST", "/healthz", NULL, "{}", &r);
    http_expect_error(&r, 405, "method_not_allowed");
    http_resp_free(&r);
    http_request(f.h->port, "POST", "/metrics", NULL, NULL, &r);
    http_expect_error(&r, 405, "method_not_allowed");
    http_resp_free(&r);
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 0);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

/* ------------------------------------------------------------------ */
/* /healthz and /metrics                                                */
/* ------------------------------------------------------------------ */

START_TEST(healthz_ok)
{
    struct fx f;
    fx_start(&f, "api_key = \"" KEY "\"\n", AUTH);   /* needs no key */
    struct http_resp r;
    ck_assert_int_eq(http_request(f.h->port, "GET", "/healthz", NULL, NULL, &r), 200);
    ck_assert_str_eq(r.body, "{\"status\":\"ok\"}");
    char *ct = http_resp_header(&r, "Content-Type");
    ck_assert_msg(ct && strncmp(ct, "application/json", 16) == 0, "Content-Type %s", ct);
    free(ct);
    http_resp_free(&r);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

/* Upper bound of the bytes the kernel can hold between the hub's queue and
 * a client that does not read (its SO_RCVBUF set small): the hub's send
 * buffer (autotuned up to tcp_wmem's maximum) and the client's receive
 * buffer. Twice tcp_wmem's maximum plus 1 MiB, within [8 MiB, 64 MiB]. */
static long kernel_bound_bytes(void)
{
    long lo = 0, def = 0, max = 4L << 20;
    FILE *fp = fopen("/proc/sys/net/ipv4/tcp_wmem", "r");
    if (fp) {
        if (fscanf(fp, "%ld %ld %ld", &lo, &def, &max) != 3)
            max = 4L << 20;
        fclose(fp);
    }
    long b = 2 * max + (1L << 20);
    return b < (8L << 20) ? (8L << 20) : b > (64L << 20) ? (64L << 20) : b;
}

#define STUCK_PAD 60000
#define STUCK_CONF                      \
    "max_message_size = 65536\n"        \
    "max_queue_bytes = \"256MiB\"\n"    \
    "ping_interval = 30\n"              \
    "ping_timeout = 10\n"

/* Data of stuck-burst message `seq` (new string). */
static char *stuck_data(int seq)
{
    char *d = malloc(STUCK_PAD + 32);
    ck_assert_ptr_nonnull(d);
    int n = snprintf(d, 32, "{\"s\":%d,\"p\":\"", seq);
    memset(d + n, 'a' + seq % 26, STUCK_PAD);
    strcpy(d + n + STUCK_PAD, "\"}");
    return d;
}

/* Connects a subscriber of "stuck" that does not read, and publishes more
 * than the kernel can buffer for it (max_queue_bytes is far above that, so
 * it is not culled): frames, and any close frame queued after them, wait
 * in the hub. Returns the client; `*nmsg` gets the number of messages. */
static struct ws *stuck_client(struct hub *h, int *nmsg)
{
    struct ws_opts so = { .rcvbuf = 4096 };
    struct ws *stuck = ws_connect_opts(h->port, &so), *pub = ws_connect(h->port);
    ws_subscribe(stuck, "stuck");
    long long frames = 0;
    int n = (int)(kernel_bound_bytes() / STUCK_PAD) + 1;
    for (int i = 0; i < n; i++) {
        char *d = stuck_data(i);
        ws_publish(pub, "stuck", d);
        char *m = ws_delivery("stuck", d);
        frames += frame_size(strlen(m));
        free(m);
        free(d);
    }
    ws_free(pub);
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    /* what the hub wrote is less than what it queued for `stuck` */
    long long out = hub_metric(h, "luahub_bytes_out_total");
    ck_assert_msg(out < frames, "the hub wrote %lld bytes of %lld: nothing is held back",
                  out, frames);
    ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 0);
    *nmsg = n;
    return stuck;
}

/* Reads the `n` burst messages in order, then requires close `code`. */
static void drain_stuck(struct ws *c, int n, int code)
{
    for (int i = 0; i < n; i++) {
        char *d = stuck_data(i);
        char *want = ws_delivery("stuck", d);
        ws_expect(c, want);
        free(want);
        free(d);
    }
    ws_expect_close(c, code);
}

/* While the hub waits for a client after SIGTERM (here one whose close
 * frame is held behind frames it has not read yet), /healthz says 503
 * shutting_down and new WebSocket upgrades are refused. Once the client
 * reads everything and the close 1001, the hub exits 0. */
START_TEST(healthz_503_while_shutting_down)
{
    struct hub *h = hub_start(STUCK_CONF "shutdown_timeout = 60\n");
    struct http_resp r;
    ck_assert_int_eq(http_request(h->port, "GET", "/healthz", NULL, NULL, &r), 200);
    http_resp_free(&r);
    int n;
    struct ws *stuck = stuck_client(h, &n);
    hub_signal(h, SIGTERM);
    hub_log_wait(h, "shutting down", HT_WAIT_MS);
    ck_assert_int_eq(http_request(h->port, "GET", "/healthz", NULL, NULL, &r), 503);
    ck_assert_str_eq(r.body, "{\"status\":\"shutting_down\"}");
    char *ct = http_resp_header(&r, "Content-Type");
    ck_assert_msg(ct && strncmp(ct, "application/json", 16) == 0, "Content-Type %s", ct);
    free(ct);
    http_resp_free(&r);
    struct ws *late;
    ck_assert_int_eq(ws_handshake(h->port, NULL, &late, &r), 503);
    ck_assert_ptr_null(late);
    http_resp_free(&r);
    drain_stuck(stuck, n, 1001);
    ck_assert_int_eq(hub_wait_exit(h, HT_WAIT_MS), 0);
    ws_free(stuck);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

START_TEST(metrics_values_follow_actions)
{
    struct hub *h = hub_start(CONF);
    int port = h->port;
    struct http_resp r;
    ck_assert_int_eq(http_request(port, "GET", "/metrics", NULL, NULL, &r), 200);
    char *ct = http_resp_header(&r, "Content-Type");
    ck_assert_msg(ct && strncmp(ct, "text/plain", 10) == 0 && strstr(ct, "version=0.0.4"),
                  "Content-Type %s", ct ? ct : "(none)");
    free(ct);
    ck_assert_msg(strstr(r.body, "# TYPE luahub_connections gauge\n") &&
                  strstr(r.body, "# TYPE luahub_deliveries_total counter\n") &&
                  strstr(r.body, "# TYPE luahub_protocol_errors_total counter\n"),
                  "TYPE lines missing:\n%s", r.body);
    http_resp_free(&r);

    static const char *const series[] = {
        "luahub_connections", "luahub_subscriptions", "luahub_channels",
        "luahub_messages_published_total", "luahub_deliveries_total",
        "luahub_bytes_out_total", "luahub_slow_consumer_closes_total",
        "luahub_protocol_errors_total{code=\"bad_request\"}",
        "luahub_protocol_errors_total{code=\"invalid_channel\"}",
    };
    for (size_t i = 0; i < sizeof series / sizeof *series; i++)
        ck_assert_msg(hub_metric(h, series[i]) == 0, "%s is not 0 at start", series[i]);

    long long out = 0;      /* bytes the hub wrote to WebSocket clients */
    struct ws *a = ws_connect(port), *b = ws_connect(port);
    out += frame_size(strlen(a->welcome)) + frame_size(strlen(b->welcome));
    ck_assert_int_eq(hub_metric(h, "luahub_connections"), 2);
    cmd(a, "{\"op\":\"subscribe\",\"channel\":\"m1\",\"id\":1}",
        "{\"id\":1,\"ok\":true,\"channel\":\"m1\"}", &out);
    cmd(a, "{\"op\":\"subscribe\",\"channel\":\"m2\",\"id\":2}",
        "{\"id\":2,\"ok\":true,\"channel\":\"m2\"}", &out);
    cmd(b, "{\"op\":\"subscribe\",\"channel\":\"m1\",\"id\":3}",
        "{\"id\":3,\"ok\":true,\"channel\":\"m1\"}", &out);
    cmd(b, "{\"op\":\"subscribe\",\"channel\":\"m1\",\"id\":4}",      /* idempotent */
        "{\"id\":4,\"ok\":true,\"channel\":\"m1\"}", &out);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 3);
    ck_assert_int_eq(hub_metric(h, "luahub_channels"), 2);

    /* API publish to m1: two deliveries */
    ck_assert_int_eq(http_publish(port, "m1", "[1,2]"), 200);
    expect_counted(a, "{\"op\":\"message\",\"channel\":\"m1\",\"data\":[1,2]}", &out);
    expect_counted(b, "{\"op\":\"message\",\"channel\":\"m1\",\"data\":[1,2]}", &out);
    ck_assert_int_eq(hub_metric(h, "luahub_messages_published_total"), 1);
    ck_assert_int_eq(hub_metric(h, "luahub_deliveries_total"), 2);
    /* to a channel nobody is in: published, no delivery */
    ck_assert_int_eq(http_publish(port, "nobody", "0"), 200);
    ck_assert_int_eq(hub_metric(h, "luahub_messages_published_total"), 2);
    ck_assert_int_eq(hub_metric(h, "luahub_deliveries_total"), 2);
    /* broadcast to m1 and m2: a gets two, b one */
    ck_assert_int_eq(api(port, "POST", "/api/broadcast", NULL,
                         "{\"channels\":[\"m1\",\"m2\"],\"data\":\"x\"}", &r), 200);
    http_resp_free(&r);
    ws_expect_pair(a, "{\"op\":\"message\",\"channel\":\"m1\",\"data\":\"x\"}",
                   "{\"op\":\"message\",\"channel\":\"m2\",\"data\":\"x\"}");
    out += frame_size(strlen("{\"op\":\"message\",\"channel\":\"m1\",\"data\":\"x\"}")) * 2;
    expect_counted(b, "{\"op\":\"message\",\"channel\":\"m1\",\"data\":\"x\"}", &out);
    ck_assert_int_eq(hub_metric(h, "luahub_messages_published_total"), 4);
    ck_assert_int_eq(hub_metric(h, "luahub_deliveries_total"), 5);
    /* WebSocket publish from b to m2 (b is not in it): a gets it */
    cmd(b, "{\"op\":\"publish\",\"channel\":\"m2\",\"data\":7,\"id\":5}", "{\"id\":5,\"ok\":true}",
        &out);
    expect_counted(a, "{\"op\":\"message\",\"channel\":\"m2\",\"data\":7}", &out);
    ck_assert_int_eq(hub_metric(h, "luahub_messages_published_total"), 5);
    ck_assert_int_eq(hub_metric(h, "luahub_deliveries_total"), 6);

    /* protocol errors, by code */
    ws_send_text(a, "not json");
    char *e = ws_expect_error(a, NULL, "bad_request");
    out += frame_size(strlen(e));
    free(e);
    ck_assert_int_eq(hub_metric(h, "luahub_protocol_errors_total{code=\"bad_request\"}"), 1);
    ck_assert_int_eq(hub_metric(h, "luahub_protocol_errors_total{code=\"invalid_channel\"}"), 0);
    ws_send_text(b, "{\"op\":\"subscribe\",\"channel\":\"bad name\",\"id\":6}");
    e = ws_expect_error(b, "6", "invalid_channel");
    out += frame_size(strlen(e));
    free(e);
    ck_assert_int_eq(hub_metric(h, "luahub_protocol_errors_total{code=\"invalid_channel\"}"), 1);
    ck_assert_int_eq(hub_metric(h, "luahub_protocol_errors_total{code=\"bad_request\"}"), 1);

    /* unsubscribes: a channel goes with its last subscriber */
    cmd(b, "{\"op\":\"unsubscribe\",\"channel\":\"m1\",\"id\":7}", "{\"id\":7,\"ok\":true}", &out);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 2);
    ck_assert_int_eq(hub_metric(h, "luahub_channels"), 2);
    cmd(a, "{\"op\":\"unsubscribe\",\"channel\":\"m2\",\"id\":8}", "{\"id\":8,\"ok\":true}", &out);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 1);
    ck_assert_int_eq(hub_metric(h, "luahub_channels"), 1);

    ck_assert_int_eq(hub_metric(h, "luahub_bytes_out_total"), out);
    ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 0);

    /* a client that leaves takes its subscriptions with it */
    ws_free(a);
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 0);
    ck_assert_int_eq(hub_metric(h, "luahub_channels"), 0);
    ws_free(b);
    hub_metric_wait(h, "luahub_connections", 0, HT_WAIT_MS);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Keep-alive                                                           */
/* ------------------------------------------------------------------ */

static void ka_send(int fd, const char *method, const char *path, const char *body)
{
    char *req = body
        ? ht_asprintf("%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n" JSON_CT "Content-Length: %zu\r\n\r\n%s",
                    method, path, strlen(body), body)
        : ht_asprintf("%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", method, path);
    tcp_send(fd, req, strlen(req));
    free(req);
}

/* A 400 from the API (bad JSON body) keeps the connection: the requests
 * after it on the same connection are served. */
START_TEST(keep_alive_after_api_error)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    int fd = tcp_connect(f.h->port);
    struct http_resp r;
    for (int round = 0; round < 3; round++) {
        ka_send(fd, "POST", "/api/publish", "{\"channel\":\"room\",\"data\":}");
        http_read_response(fd, &r, HT_WAIT_MS, 0);
        http_expect_error(&r, 400, "bad_request");
        http_resp_free(&r);

        ka_send(fd, "GET", "/healthz", NULL);
        ck_assert_int_eq(http_read_response(fd, &r, HT_WAIT_MS, 0), 200);
        ck_assert_str_eq(r.body, "{\"status\":\"ok\"}");
        http_resp_free(&r);

        ka_send(fd, "POST", "/api/publish", "{\"channel\":\"room\",\"data\":\"ka\"}");
        http_read_response(fd, &r, HT_WAIT_MS, 0);
        http_expect_ok(&r);
        http_resp_free(&r);
        ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"ka\"}");
    }
    close(fd);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

/* Empty lines before a request line are skipped (RFC 9112 §2.2) and are
 * not the head's end: a head that follows them, sent in small pieces, is
 * answered once whole, and so is the next one on the connection (the
 * search for the end starts again for each request). The search resumes
 * where it stopped, so this costs linear time: what it costs is measured,
 * not asserted (docs/internals.md, "HTTP"). */
START_TEST(head_after_empty_lines_in_pieces)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    int fd = tcp_connect(f.h->port), one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    char pad[8001], lead[201];
    memset(pad, 'a', sizeof(pad) - 1);
    pad[sizeof(pad) - 1] = '\0';
    for (int i = 0; i < 200; i += 2)
        memcpy(lead + i, "\r\n", 2);
    lead[200] = '\0';
    /* then a short head without empty lines: a search starting where the
     * first head started (200) would not find its end */
    char *head[2] = {
        ht_asprintf("%sGET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n", lead, pad),
        ht_asprintf("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    };
    struct http_resp r;
    for (int round = 0; round < 2; round++) {
        size_t len = strlen(head[round]);
        for (size_t off = 0; off < len; off += 7)
            tcp_send(fd, head[round] + off, len - off < 7 ? len - off : 7);
        ck_assert_int_eq(http_read_response(fd, &r, HT_WAIT_MS, 0), 200);
        ck_assert_str_eq(r.body, "{\"status\":\"ok\"}");
        http_resp_free(&r);
        free(head[round]);
    }
    close(fd);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The WebSocket upgrade, seen from HTTP                                */
/* ------------------------------------------------------------------ */

/* At max_connections the next upgrade gets 503 while plain HTTP (the API,
 * /healthz) is still served; once a client leaves, a new one gets in. */
START_TEST(max_connections_503_then_slot_reused)
{
    struct fx f;
    fx_start(&f, "max_connections = 2\n", NULL);
    struct ws *b = ws_connect(f.h->port), *c;
    struct http_resp r;
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(ws_handshake(f.h->port, NULL, &c, &r), 503);
        ck_assert_ptr_null(c);
        http_resp_free(&r);
    }
    ck_assert_int_eq(http_request(f.h->port, "GET", "/healthz", NULL, NULL, &r), 200);
    http_resp_free(&r);
    still_serves(&f);
    ck_assert_int_eq(hub_metric(f.h, "luahub_connections"), 2);
    ck_assert_int_eq(hub_metric(f.h, "luahub_connections_refused_total"), 3);
    ws_free(b);
    hub_metric_wait(f.h, "luahub_connections", 1, HT_WAIT_MS);
    c = ws_connect(f.h->port);
    ws_subscribe(c, "room");
    ck_assert_int_eq(http_publish(f.h->port, "room", "\"in\""), 200);
    ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"in\"}");
    ws_expect(c, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"in\"}");
    ws_sync(c);
    ws_free(c);
    fx_stop(&f);
}
END_TEST


/* ------------------------------------------------------------------ */
/* Pipelining (issue 9.1): several requests with bodies in one TCP write  */
/* ------------------------------------------------------------------ */

/* One request of a pipelined sequence and the status its answer must have.
 * A body of "P<n>" is a publish of data n to "room". */
struct preq {
    const char *method, *path, *body;
    int status;
};

#define PUB(n) {"POST", "/api/publish", "{\"channel\":\"room\",\"data\":" #n "}", 200}
static const struct {
    const char *name;
    struct preq r[6];
} pipelines[] = {
    {"healthz with a body, twice",
     {{"GET", "/healthz", "hello", 200}, {"GET", "/healthz", "hello", 200}}},
    {"publish, three times", {PUB(1), PUB(2), PUB(3)}},
    {"reload, twice", {{"POST", "/api/reload", "{}", 200}, {"POST", "/api/reload", "x", 200}}},
    {"unknown route with a body, four times",
     {{"POST", "/x", "hello", 404}, {"POST", "/x", "hello", 404}, {"POST", "/x", "", 404},
      {"GET", "/x", "abc", 404}}},
    {"broadcast then metrics with a body",
     {{"POST", "/api/broadcast", "{\"channels\":[\"room\"],\"data\":7}", 200},
      {"GET", "/metrics", "abc", 200}}},
    {"mixed: no body, bodies, errors, publish last",
     {{"GET", "/healthz", NULL, 200}, PUB(4), {"GET", "/healthz", "hello", 200},
      {"POST", "/api/publish", "{bad", 400}, {"PUT", "/api/publish", "{}", 405}, PUB(5)}},
};
#define NPIPELINES ((int)(sizeof pipelines / sizeof *pipelines))

/* Reads `n` responses from one connection (several may come in one read)
 * into their statuses. Fails the test on a timeout or a malformed answer. */
static void read_responses(int fd, int n, int *status)
{
    char *buf = NULL;
    size_t len = 0, cap = 0, off = 0;
    for (int k = 0; k < n;) {
        char *end = len > off ? strstr(buf + off, "\r\n\r\n") : NULL;
        if (end) {
            char *cl = strcasestr(buf + off, "Content-Length: ");
            size_t body = cl && cl < end ? strtoul(cl + 16, NULL, 10) : 0;
            size_t total = (size_t)(end + 4 - (buf + off)) + body;
            if (len - off >= total) {
                ck_assert_msg(sscanf(buf + off, "HTTP/1.1 %d", &status[k]) == 1,
                              "answer %d is not HTTP: %.40s", k + 1, buf + off);
                off += total;
                k++;
                continue;
            }
        }
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 8192;
            buf = realloc(buf, cap);
            ck_assert_ptr_nonnull(buf);
        }
        ssize_t got = tcp_recv(fd, buf + len, 4096, HT_WAIT_MS);
        ck_assert_msg(got > 0, "%d of %d answers came, then %s", k, n,
                      got == 0 ? "the connection closed" : "nothing");
        len += (size_t)got;
        buf[len] = '\0';
    }
    free(buf);
}

/* Loop index: pipeline i / 2, sent in one write (even) or in 7-byte writes
 * (odd). Every answer comes, in order, the publishes are delivered once,
 * and the hub keeps serving (lws 4.1.6 spun forever here). */
START_TEST(pipelined_requests_with_bodies)
{
    int idx = _i / 2, split = _i % 2;
    struct fx f;
    fx_start(&f, NULL, NULL);
    struct hub_buf_t { char *p; size_t len; } all = {NULL, 0};
    for (int k = 0; k < 6 && pipelines[idx].r[k].method; k++) {
        const struct preq *q = &pipelines[idx].r[k];
        char *one = q->body
            ? ht_asprintf("%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n%s", q->method,
                          q->path, strlen(q->body), q->body)
            : ht_asprintf("%s %s HTTP/1.1\r\nHost: x\r\n\r\n", q->method, q->path);
        char *cat = ht_asprintf("%s%s", all.p ? all.p : "", one);
        free(all.p);
        free(one);
        all.p = cat;
        all.len = strlen(cat);
    }
    int fd = tcp_connect(f.h->port);
    if (split)
        for (size_t off = 0; off < all.len; off += 7)
            tcp_send(fd, all.p + off, all.len - off < 7 ? all.len - off : 7);
    else
        tcp_send(fd, all.p, all.len);
    int nreq = 0, status[6];
    while (nreq < 6 && pipelines[idx].r[nreq].method)
        nreq++;
    read_responses(fd, nreq, status);
    for (int k = 0; k < nreq; k++) {
        int st = status[k];
        ck_assert_msg(st == pipelines[idx].r[k].status, "%s: answer %d is %d, expected %d",
                      pipelines[idx].name, k + 1, st, pipelines[idx].r[k].status);
        if (!strcmp(pipelines[idx].r[k].path, "/api/publish") && st == 200) {
            char *want = ws_delivery("room", strstr(pipelines[idx].r[k].body, "\"data\":") + 7);
            want[strlen(want) - 2] = '}'; /* the body's closing brace was copied too */
            want[strlen(want) - 1] = '\0';
            ws_expect(f.sub, want);
            free(want);
        } else if (!strcmp(pipelines[idx].r[k].path, "/api/broadcast")) {
            ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":7}");
        }
    }
    free(all.p);
    close(fd);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Deadlines (issue 9.2): slow and silent clients lock nobody out        */
/* ------------------------------------------------------------------ */

#define NSILENT 1000
#define NTRICKLE 64
#define NHALF 64

/* 1,000 silent sockets, 64 requests whose body trickles and 64 half-sent
 * heads: new WebSocket clients and API requests are served meanwhile, and
 * every slow socket is cut off by request_timeout (2 s here) with 408 (or,
 * silent, closed). A trickle that keeps sending does not keep its socket. */
#define NLORIS 500

/* Slowloris: 500 connections each sending one byte of a request head every
 * 5 s, with the default request_timeout (10 s). Others are served through
 * every round, and every slow connection is cut off by the deadline (408,
 * or closed): sending keeps none of them alive. Bounded: 3 rounds. */
START_TEST(slowloris_does_not_stop_others)
{
    struct fx f;
    fx_start(&f, "", NULL);
    static int fds[NLORIS];
    static const char head[] = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: abcdefgh";
    for (int i = 0; i < NLORIS; i++) {
        fds[i] = tcp_connect(f.h->port);
        tcp_send(fds[i], head, 1);
    }
    int cut = 0;
    for (int round = 1; round <= 3; round++) {
        still_serves(&f);
        struct ws *c = ws_connect(f.h->port);
        ws_subscribe(c, "other");
        ws_free(c);
        /* 5 s of waiting, in which each slow socket sends its next byte */
        for (int w = 0; w < 50; w++) {
            struct timespec ts = {0, 100 * 1000000L};
            nanosleep(&ts, NULL);
        }
        for (int i = 0; i < NLORIS; i++) {
            if (fds[i] < 0)
                continue;
            char buf[256];
            ssize_t got = tcp_recv(fds[i], buf, sizeof buf - 1, 0);
            if (got >= 0 || send(fds[i], head + round, 1, MSG_NOSIGNAL) < 0) {
                if (got > 0) {
                    buf[got] = '\0';
                    ck_assert_msg(strstr(buf, "408"), "slow socket got: %s", buf);
                }
                close(fds[i]);
                fds[i] = -1;
                cut++;
            }
        }
    }
    /* 15 s: past request_timeout (10 s) for every one of them */
    ck_assert_int_eq(cut, NLORIS);
    ck_assert_int_ge(hub_metric(f.h, "luahub_http_timeouts_total"), NLORIS);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

START_TEST(slow_clients_do_not_lock_out)
{
    struct fx f;
    fx_start(&f, "request_timeout = 2\n", NULL);
    static int fds[NSILENT + NTRICKLE + NHALF];
    int n = 0;
    static const char trickle[] = "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nA";
    static const char half[] = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    for (int i = 0; i < NSILENT; i++)
        fds[n++] = tcp_connect(f.h->port);
    for (int i = 0; i < NTRICKLE; i++) {
        fds[n] = tcp_connect(f.h->port);
        tcp_send(fds[n++], trickle, sizeof trickle - 1);
    }
    for (int i = 0; i < NHALF; i++) {
        fds[n] = tcp_connect(f.h->port);
        tcp_send(fds[n++], half, sizeof half - 1);
    }
    /* Everyone else is served at once. */
    for (int i = 0; i < 6; i++) {
        struct ws *c = ws_connect(f.h->port);
        ws_subscribe(c, "other");
        ws_free(c);
    }
    still_serves(&f);
    /* One trickle goes on sending a body byte at a time: it is cut off
     * anyway (bounded: a byte every 100 ms, at most 1000 bytes). */
    int cut = 0;
    for (int i = 0; i < 999 && !cut; i++) {
        if (ws_send_raw(&(struct ws){.fd = fds[NSILENT]}, "B", 1) < 0)
            cut = 1;
        char buf[512];
        ssize_t got = tcp_recv(fds[NSILENT], buf, sizeof buf - 1, 100);
        if (got >= 0) {
            if (got > 0) {
                buf[got] = '\0';
                ck_assert_msg(strstr(buf, "408"), "trickle got: %s", buf);
            }
            cut = 1;
        }
    }
    ck_assert_msg(cut, "a trickling request kept its socket past request_timeout");
    for (int i = 0; i < n; i++) {
        ck_assert_msg(tcp_wait_closed(fds[i], HT_WAIT_MS), "slow socket %d still open", i);
        close(fds[i]);
    }
    /* 1: the connection asking for /metrics */
    hub_metric_wait(f.h, "luahub_http_connections", 1, HT_WAIT_MS);
    ck_assert_int_eq(hub_metric(f.h, "luahub_http_timeouts_total"), n);
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Cross-site requests (issue 9.5)                                       */
/* ------------------------------------------------------------------ */

/* Without api_key, a loopback request that a page of another site sent
 * (its Origin is not the hub's own, or Sec-Fetch-Site says so) is refused;
 * a request of no page, or of the hub's own origin, is served. With
 * api_key, the key decides, whatever the Origin. */
START_TEST(cross_site_api_refused)
{
    struct fx f;
    fx_start(&f, NULL, NULL);
    char *own = ht_asprintf("Origin: http://127.0.0.1:%d\r\n", f.h->port);
    const char *const bad[] = {
        "Origin: http://evil.example\r\n",
        "Origin: https://evil.example\r\n",
        "Origin: null\r\n",
        "Origin: http://127.0.0.1\r\n",                 /* another port: another origin */
        "Origin: http://127.0.0.1:1\r\n",
        "Origin: file://\r\n",
        "Sec-Fetch-Site: cross-site\r\n",
        "Sec-Fetch-Site: same-site\r\n",
    };
    static const char *const routes[][2] = {
        {"POST", "/api/publish"}, {"POST", "/api/broadcast"}, {"POST", "/api/reload"},
        {"POST", "/api/disconnect"}, {"GET", "/api/connections?user=a"}, {"GET", "/metrics"},
    };
    static const char *const bodies[] = {
        "{\"channel\":\"room\",\"data\":1}", "{\"channels\":[\"room\"],\"data\":1}", "", 
        "{\"user\":\"a\"}", NULL, NULL,
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        for (size_t k = 0; k < sizeof routes / sizeof *routes; k++) {
            struct http_resp r;
            char *hdr = ht_asprintf("Content-Type: text/plain\r\n%s", bad[i]);
            http_request(f.h->port, routes[k][0], routes[k][1], hdr, bodies[k], &r);
            ck_assert_msg(r.status == 403, "%s %s with %s: status %d", routes[k][0],
                          routes[k][1], bad[i], r.status);
            http_expect_error(&r, 403, "forbidden");
            http_resp_free(&r);
            free(hdr);
        }
    ck_assert_int_eq(hub_metric(f.h, "luahub_messages_published_total"), 0);
    /* The hub's own origin, or a same-origin fetch, is served. */
    struct http_resp r;
    api(f.h->port, "POST", "/api/publish", own, "{\"channel\":\"room\",\"data\":\"own\"}", &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"own\"}");
    api(f.h->port, "POST", "/api/publish", "Sec-Fetch-Site: same-origin\r\n",
        "{\"channel\":\"room\",\"data\":\"same\"}", &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"same\"}");
    free(own);
    still_serves(&f);
    fx_stop(&f);

    /* With a key, a request that carries it is served from any origin. */
    fx_start(&f, "api_key = \"" KEY "\"\n", AUTH);
    api(f.h->port, "POST", "/api/publish", "Origin: http://evil.example\r\n",
        "{\"channel\":\"room\",\"data\":1}", &r);
    http_expect_error(&r, 401, "unauthorized");
    http_resp_free(&r);
    api(f.h->port, "POST", "/api/publish", AUTH "Origin: http://evil.example\r\n",
        "{\"channel\":\"room\",\"data\":\"key\"}", &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    ws_expect(f.sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"key\"}");
    still_serves(&f);
    fx_stop(&f);
}
END_TEST

static Suite *http_suite(void)
{
    Suite *s = suite_create("http");
    TCase *tc;

    tc = tcase_create("api");
    tcase_add_test(tc, api_publish_delivers_exact_bytes);
    tcase_add_test(tc, api_broadcast_each_channel_once);
    tcase_add_test(tc, api_broadcast_duplicate_names_deliver_once);
    tcase_add_test(tc, api_broadcast_invalid_channel_delivers_nothing);
    tcase_add_test(tc, api_broadcast_1024_channels_at_most);
    suite_add_tcase(s, tc);

    tc = tcase_create("auth");
    tcase_add_test(tc, auth_missing_key_401);
    tcase_add_test(tc, auth_wrong_key_401);
    tcase_add_test(tc, auth_right_key_200);
    tcase_add_test(tc, auth_no_key_loopback_200);
    tcase_add_test(tc, auth_no_key_non_loopback_403);
    tcase_add_test(tc, auth_key_non_loopback_200);
    suite_add_tcase(s, tc);

    tc = tcase_create("bad_request");
    tcase_add_test(tc, bad_bodies_publish_nothing);
    tcase_add_test(tc, no_content_length_is_empty_body);
    tcase_add_test(tc, chunked_body_411_and_closed);
    tcase_add_test(tc, chunked_headers_only_answered_at_once);
    tcase_add_test(tc, invalid_content_length_400);
    tcase_add_test(tc, body_over_max_size_413);
    tcase_add_test(tc, huge_content_length_413_at_once);
    tcase_add_test(tc, body_exactly_max_size_accepted);
    tcase_add_test(tc, api_user_names_checked);
    tcase_add_test(tc, unknown_route_404);
    tcase_add_test(tc, wrong_method_405);
    suite_add_tcase(s, tc);

    tc = tcase_create("health_metrics");
    tcase_add_test(tc, healthz_ok);
    tcase_add_test(tc, healthz_503_while_shutting_down);
    tcase_add_test(tc, metrics_values_follow_actions);
    suite_add_tcase(s, tc);

    tc = tcase_create("hardening");
    tcase_set_timeout(tc, 90);
    tcase_add_loop_test(tc, pipelined_requests_with_bodies, 0, 2 * NPIPELINES);
    tcase_add_test(tc, slow_clients_do_not_lock_out);
    tcase_add_test(tc, slowloris_does_not_stop_others);
    tcase_add_test(tc, cross_site_api_refused);
    suite_add_tcase(s, tc);

    tc = tcase_create("connection");
    tcase_add_test(tc, keep_alive_after_api_error);
    tcase_add_test(tc, head_after_empty_lines_in_pieces);
    tcase_add_test(tc, max_connections_503_then_slot_reused);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(http_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
