/* Integration suite: TLS (wss:// and https://, docs/protocol.md "TLS";
 * conf keys in docs/config.md "TLS"). The certificates are made at run
 * time with the openssl command (tests/support/tlstest.h); TLS clients go
 * through a proxy of the test's own, so the hubtest helpers speak TLS.
 * Real binary, real sockets.
 *
 * Every test stops its hub with SIGTERM and asserts exit status 0: the
 * ASan build exits non-zero on a leak. */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hubtest.h"
#include "tlstest.h"

static struct tls_certs certs;      /* made once by main(), before the tests fork */

/* A copy of `from` in a temp file of the test's own (new path). */
static char *tmp_copy(const char *from)
{
    char *path = ht_tmpfile("");
    tls_copy_file(from, path);
    return path;
}

/* A hub whose `listen` speaks TLS with `cert` and `key`, plus `extra`
 * conf lines. h->port is set to its plain listener (listen_plain), so that
 * the hubtest helpers (hub_metric...) work; the TLS port goes to
 * *tls_port. */
static struct hub *start_tls(const char *cert, const char *key, const char *extra,
                             int *tls_port)
{
    char *conf = ht_asprintf("listen_plain = \"127.0.0.1:0\"\ntls_cert = \"%s\"\n"
                             "tls_key = \"%s\"\nshutdown_timeout = 2\n%s",
                             cert, key, extra ? extra : "");
    struct hub *h = hub_start(conf);
    free(conf);
    char *log = hub_log(h);
    const char *p = strstr(log, "plain HTTP on 127.0.0.1:");
    ck_assert_msg(p != NULL, "no plain listener in the log:\n%s", log);
    *tls_port = h->port;
    h->port = atoi(p + strlen("plain HTTP on 127.0.0.1:"));
    ck_assert_int_gt(h->port, 0);
    free(log);
    return h;
}

/* The common name of the certificate the hub serves a new connection. */
static void expect_served_cn(int tls_port, const char *want)
{
    char err[512], cn[128];
    const struct tls_client_opts o = {.ca = certs.ca};
    struct tls_conn *t = tls_connect(tls_port, &o, err, sizeof err);
    ck_assert_msg(t != NULL, "TLS connect: %s", err);
    tls_peer_cn(t, cn, sizeof cn);
    ck_assert_msg(!strcmp(cn, want), "served certificate CN \"%s\", expected \"%s\"", cn, want);
    tls_close(t);
}

static const char healthz[] = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/* ------------------------------------------------------------------ */
/* wss:// and https://                                                  */
/* ------------------------------------------------------------------ */

/* The policy answers an rpc with the address it sees for the connection. */
static const char addr_policy[] = "function on_rpc(conn, method, data)\n"
                                  "  return conn.remote_addr\n"
                                  "end\n";

/* A TLS WebSocket client connects, subscribes, publishes and receives; the
 * API answers over https (its loopback check sees the client's address,
 * not the socketpair's); the policy sees the client's address too. */
START_TEST(wss_and_https)
{
    int tls_port;
    char *policy = ht_tmpfile(addr_policy);
    char *extra = ht_asprintf("policy = \"%s\"\n", policy);
    struct hub *h = start_tls(certs.server, certs.server_key, extra, &tls_port);
    const struct tls_client_opts o = {.ca = certs.ca};
    struct tls_proxy *px = tls_proxy_start(tls_port, &o);

    struct ws *sub = ws_connect(px->port), *pub = ws_connect(px->port);
    ws_subscribe(sub, "room");
    ws_publish(pub, "room", "{\"over\":\"tls\"}");
    ws_expect(sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":{\"over\":\"tls\"}}");
    /* a message larger than a TLS record (16 KiB), both ways */
    size_t big = 40000;
    char *data = malloc(big + 3);
    data[0] = '"';
    memset(data + 1, 'x', big);
    strcpy(data + 1 + big, "\"");
    ws_publish(pub, "room", data);
    char *want = ws_delivery("room", data);
    ws_expect(sub, want);
    free(want);
    free(data);

    struct http_resp r;
    ck_assert_int_eq(http_request(px->port, "POST", "/api/publish", NULL,
                                  "{\"channel\":\"room\",\"data\":\"via https\"}", &r), 200);
    http_resp_free(&r);
    ws_expect(sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"via https\"}");

    ws_send_text(pub, "{\"op\":\"rpc\",\"method\":\"addr\",\"id\":7}");
    ws_expect(pub, "{\"id\":7,\"ok\":true,\"data\":\"127.0.0.1\"}");
    ck_assert_int_eq(hub_metric(h, "luahub_tls_handshakes_total"), 3);
    ck_assert_int_eq(hub_metric(h, "luahub_connections"), 2);

    ws_free(pub);
    ws_free(sub);
    tls_proxy_stop(px);
    ck_assert_int_eq(hub_stop(h), 0);
    unlink(policy);
    free(policy);
    free(extra);
}
END_TEST

/* SIGTERM with TLS clients connected (and a handshake under way): they
 * get close 1001 through TLS, the hub exits 0 (and, in the ASan build,
 * frees everything). */
START_TEST(sigterm_with_tls_clients)
{
    int tls_port;
    struct hub *h = start_tls(certs.server, certs.server_key, NULL, &tls_port);
    const struct tls_client_opts o = {.ca = certs.ca};
    struct tls_proxy *px = tls_proxy_start(tls_port, &o);
    enum { N = 4 };
    struct ws *c[N];
    for (int i = 0; i < N; i++) {
        c[i] = ws_connect(px->port);
        ws_subscribe(c[i], "room");
    }
    int stalled = tcp_connect(tls_port);
    tcp_send(stalled, "\x16\x03\x01", 3);
    char err[256];
    struct tls_conn *idle = tls_connect(tls_port, &o, err, sizeof err);
    ck_assert_msg(idle != NULL, "%s", err);
    hub_metric_wait(h, "luahub_connections", N, HT_WAIT_MS);
    hub_signal(h, SIGTERM);
    for (int i = 0; i < N; i++)
        ws_expect_close(c[i], 1001);
    ck_assert_int_eq(hub_wait_exit(h, HT_WAIT_MS), 0);
    ck_assert_msg(tcp_wait_closed(stalled, HT_WAIT_MS), "stalled handshake still open");
    for (int i = 0; i < N; i++)
        ws_free(c[i]);
    close(stalled);
    tls_close(idle);
    tls_proxy_stop(px);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* A TLS subscriber that stops reading is culled like a plain one: the
 * pump holds at most a record's worth, so the writer meets a full socket
 * (the socketpair) and the queue bound. The hub then closes it (its close
 * frame cannot go out: the backstop, then the pump's deadline), and the
 * other subscribers are served throughout. */
START_TEST(slow_tls_consumer_culled)
{
    enum { PAD = 8000 };
    int tls_port;
    struct hub *h = start_tls(certs.server, certs.server_key,
                              "max_queue_bytes = \"64KiB\"\nrequest_timeout = 2\n", &tls_port);
    char err[512];
    const struct tls_client_opts so = {.ca = certs.ca, .rcvbuf = 4096};
    struct tls_conn *slow = tls_connect(tls_port, &so, err, sizeof err);
    ck_assert_msg(slow != NULL, "%s", err);
    /* the upgrade and a subscribe (a masked frame, mask 0), then no reading */
    const char head[] = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n";
    const char sub[] = "{\"op\":\"subscribe\",\"channel\":\"burst\"}";
    unsigned char req[sizeof head + 6 + sizeof sub];
    size_t len = sizeof head - 1;
    memcpy(req, head, len);
    req[len++] = 0x81;
    req[len++] = (unsigned char)(0x80 | (sizeof sub - 1));
    memset(req + len, 0, 4);
    len += 4;
    memcpy(req + len, sub, sizeof sub - 1);
    len += sizeof sub - 1;
    ck_assert_msg(tls_send(slow, req, len, err, sizeof err) == 0, "%s", err);
    struct ws *pub = ws_connect(h->port), *fast = ws_connect(h->port);
    ws_subscribe(fast, "burst");
    hub_metric_wait(h, "luahub_subscriptions", 2, HT_WAIT_MS);

    char *data = malloc(PAD + 32);
    int seq, limit = (32 << 20) / PAD;
    for (seq = 0; seq < limit; seq++) {
        int n = snprintf(data, 32, "{\"seq\":%d,\"pad\":\"", seq);
        memset(data + n, 'a' + seq % 26, PAD);
        strcpy(data + n + PAD, "\"}");
        ws_publish(pub, "burst", data);
        char *want = ws_delivery("burst", data);
        ws_expect(fast, want);
        free(want);
        if (seq % 16 == 0 && hub_metric(h, "luahub_slow_consumer_closes_total") == 1)
            break;
    }
    free(data);
    ck_assert_msg(seq < limit, "not culled after %d messages of %d bytes", seq, PAD);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 1);
    hub_metric_wait(h, "luahub_tls_connections", 0, HT_WAIT_MS);
    ws_publish(pub, "burst", "\"after\"");
    ws_expect(fast, "{\"op\":\"message\",\"channel\":\"burst\",\"data\":\"after\"}");
    tls_close(slow);
    ws_free(pub);
    ws_free(fast);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Certificate reload                                                   */
/* ------------------------------------------------------------------ */

/* A TLS hub on copies of the server's pair (which a test may replace), a
 * proxy to it, and an old connection subscribed to "room". */
struct rotating {
    char *cert, *key;
    struct hub *h;
    int tls_port;
    struct tls_proxy *px;
    struct ws *old;
};

static void rotating_start(struct rotating *t)
{
    const struct tls_client_opts o = {.ca = certs.ca};
    t->cert = tmp_copy(certs.server);
    t->key = tmp_copy(certs.server_key);
    t->h = start_tls(t->cert, t->key, NULL, &t->tls_port);
    t->px = tls_proxy_start(t->tls_port, &o);
    t->old = ws_connect(t->px->port);
    ws_subscribe(t->old, "room");
}

/* A publish from a new connection reaches the old one. */
static void rotating_expect_old_receives(struct rotating *t, const char *data_json)
{
    struct ws *fresh = ws_connect(t->px->port);
    ws_publish(fresh, "room", data_json);
    char *want = ws_delivery("room", data_json);
    ws_expect(t->old, want);
    free(want);
    ws_free(fresh);
}

static void rotating_stop(struct rotating *t)
{
    ws_free(t->old);
    tls_proxy_stop(t->px);
    ck_assert_int_eq(hub_stop(t->h), 0);
    unlink(t->cert);
    unlink(t->key);
    free(t->cert);
    free(t->key);
}

/* A certificate rotated by SIGHUP (then by POST /api/reload) is served to
 * new connections while an old connection stays up and keeps receiving. */
START_TEST(rotation_keeps_old_connections)
{
    struct rotating t;
    rotating_start(&t);
    struct hub *h = t.h;
    expect_served_cn(t.tls_port, "localhost");

    tls_copy_file(certs.rotated, t.cert);
    tls_copy_file(certs.rotated_key, t.key);
    hub_signal(h, SIGHUP);
    hub_log_wait(h, "reload: TLS certificate loaded from", HT_WAIT_MS);
    expect_served_cn(t.tls_port, "rotated.localhost");
    rotating_expect_old_receives(&t, "\"after the rotation\"");

    /* back again, through the API (over https) */
    tls_copy_file(certs.server, t.cert);
    tls_copy_file(certs.server_key, t.key);
    struct http_resp r;
    ck_assert_int_eq(http_request(t.px->port, "POST", "/api/reload", NULL, "", &r), 200);
    http_expect_ok(&r);
    http_resp_free(&r);
    expect_served_cn(t.tls_port, "localhost");
    rotating_expect_old_receives(&t, "\"and back\"");
    ck_assert_int_eq(hub_metric(h, "luahub_tls_reloads_total{result=\"ok\"}"), 2);
    rotating_stop(&t);
}
END_TEST

/* Bad pairs, at start and at reload. */
struct bad_pair {
    const char *name;
    size_t cert_off, key_off;       /* fields of struct tls_certs; 0: a file that is not PEM */
    const char *says;               /* in the error */
};

#define CERT(f) offsetof(struct tls_certs, f)
static const struct bad_pair bad_pairs[] = {
    {"expired", CERT(expired), CERT(expired_key), "the certificate has expired (not after 2020-01-02"},
    {"not yet valid", CERT(future), CERT(future_key), "the certificate is not valid yet (not before 2099-01-01"},
    {"mismatched key", CERT(server), CERT(other_key), "is not the key of the certificate in tls_cert"},
    {"not PEM", 0, CERT(server_key), "no PEM certificate in it"},
    {"key not PEM", CERT(server), 0, "no PEM private key in it"},
    {"encrypted key", CERT(server), CERT(encrypted_key), "the key is encrypted with a passphrase"},
};

static const char *cert_field(size_t off)
{
    return (const char *)&certs + off;
}

/* The files of bad pair `b` into `cert` and `key`. */
static void write_pair(const struct bad_pair *b, const char *cert, const char *key)
{
    char *junk = ht_tmpfile("this is not PEM\n");
    tls_copy_file(b->cert_off ? cert_field(b->cert_off) : junk, cert);
    tls_copy_file(b->key_off ? cert_field(b->key_off) : junk, key);
    unlink(junk);
    free(junk);
}

/* A bad pair on reload (POST /api/reload, then SIGHUP) is refused with
 * the reason, and the old certificate is still served, to old and new
 * connections. */
START_TEST(bad_pair_on_reload_keeps_old)
{
    const struct bad_pair *b = &bad_pairs[_i];
    struct rotating t;
    rotating_start(&t);
    struct hub *h = t.h;

    write_pair(b, t.cert, t.key);
    struct http_resp r;
    ck_assert_int_eq(http_request(h->port, "POST", "/api/reload", NULL, "", &r), 422);
    http_expect_error(&r, 422, "reload_failed");
    ck_assert_msg(strstr(r.body, b->says) != NULL, "%s: the answer %s does not say \"%s\"",
                  b->name, r.body, b->says);
    http_resp_free(&r);
    hub_signal(h, SIGHUP);
    hub_metric_wait(h, "luahub_tls_reloads_total{result=\"failed\"}", 2, HT_WAIT_MS);
    ck_assert_int_eq(hub_log_count(h, "keeping the current certificate"), 2);

    expect_served_cn(t.tls_port, "localhost");
    rotating_expect_old_receives(&t, "\"still served\"");
    rotating_stop(&t);
}
END_TEST

/* A bad pair at start is a conf problem: --check and a start both exit 2
 * naming the conf file, the key, the file and the reason. */
START_TEST(bad_pair_at_start)
{
    const struct bad_pair *b = &bad_pairs[_i];
    char *cert = ht_tmpfile(""), *key = ht_tmpfile("");
    write_pair(b, cert, key);
    char *conf_text = ht_asprintf("listen = \"127.0.0.1:0\"\ntls_cert = \"%s\"\n"
                                  "tls_key = \"%s\"\n", cert, key);
    char *conf = ht_tmpfile(conf_text);
    for (int check = 1; check >= 0; check--) {
        const char *args[] = {"-c", conf, check ? "--check" : NULL, NULL};
        char *out = NULL;
        int st = hub_run(args, &out, HT_WAIT_MS);
        ck_assert_msg(st == 2, "%s%s: exit %d, expected 2; output:\n%s", b->name,
                      check ? " (--check)" : "", st, out);
        char *line = ht_asprintf("%s: tls_", conf);
        ck_assert_msg(strstr(out, line) && strstr(out, b->says),
                      "%s: the output does not say \"%s\" after \"%s\":\n%s", b->name, b->says,
                      line, out);
        ck_assert_msg(!strstr(out, "listening on"), "%s: the hub started", b->name);
        free(line);
        free(out);
    }
    unlink(cert);
    unlink(key);
    unlink(conf);
    free(cert);
    free(key);
    free(conf);
    free(conf_text);
}
END_TEST

/* The TLS keys' own checks, with the line of the assignment. */
START_TEST(tls_keys_checked_with_line)
{
    static const struct {
        const char *conf;
        const char *says;
    } cases[] = {
        {"x = 1\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/k\"\n",
         ":2: tls_cert: \"/nonexistent/cert.pem\": No such file or directory"},
        {"tls_cert = \"%s\"\n", ":1: tls_cert needs tls_key"},
        {"tls_key = \"%s\"\n", ":1: tls_key needs tls_cert"},
        {"listen_plain = \"127.0.0.1:0\"\n", ":1: listen_plain is a plain listener beside the "
                                             "TLS one: it needs tls_cert and tls_key"},
        {"tls_client_ca = \"%s\"\n", ":1: tls_client_ca needs tls_cert and tls_key"},
        {"tls_cert = \"\"\n", ":1: tls_cert: must not be empty"},
        {"listen_plain = \"nowhere\"\n", ":1: listen_plain: expected HOST:PORT"},
        {"listen = \"127.0.0.1:8443\"\nlisten_plain = \"127.0.0.1:8443\"\ntls_cert = \"%s\"\n"
         "tls_key = \"%s\"\n", ":2: listen_plain must differ from listen"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *text = ht_asprintf(cases[i].conf, certs.server, certs.server_key);
        char *conf = ht_tmpfile(text);
        const char *args[] = {"-c", conf, "--check", NULL};
        char *out = NULL;
        int st = hub_run(args, &out, HT_WAIT_MS);
        char *want = ht_asprintf("%s%s", conf, cases[i].says);
        ck_assert_msg(st == 2 && strstr(out, want), "case %zu: exit %d, expected 2 and \"%s\":\n%s",
                      i, st, want, out);
        free(want);
        free(out);
        unlink(conf);
        free(conf);
        free(text);
    }
}
END_TEST

/* ------------------------------------------------------------------ */
/* Mutual TLS                                                           */
/* ------------------------------------------------------------------ */

/* One https request with `o`; returns the status, or -1 with why in err. */
static int https_get(int tls_port, const struct tls_client_opts *o, char *err, size_t n)
{
    struct tls_conn *t = tls_connect(tls_port, o, err, n);
    if (!t)
        return -1;
    struct http_resp r;
    int st = tls_http(t, healthz, &r, err, n);
    if (st > 0)
        http_resp_free(&r);
    tls_close(t);
    return st;
}

/* With tls_client_ca, a client certificate the CA signed is let in; none,
 * or a self-signed one, is refused in the handshake, with a clear reason
 * in the log and a count in the metrics. */
START_TEST(mutual_tls)
{
    int tls_port;
    char *extra = ht_asprintf("tls_client_ca = \"%s\"\n", certs.ca);
    struct hub *h = start_tls(certs.server, certs.server_key, extra, &tls_port);
    char err[512];
    const struct tls_client_opts good = {.ca = certs.ca, .cert = certs.client,
                                         .key = certs.client_key};
    const struct tls_client_opts none = {.ca = certs.ca};
    const struct tls_client_opts self = {.ca = certs.ca, .cert = certs.selfsigned,
                                         .key = certs.selfsigned_key};

    ck_assert_msg(https_get(tls_port, &good, err, sizeof err) == 200, "signed client: %s", err);
    ck_assert_int_eq(https_get(tls_port, &self, err, sizeof err), -1);
    ck_assert_msg(strstr(err, "alert"), "self-signed: the client saw \"%s\"", err);
    hub_log_wait(h, "client certificate refused (self-signed certificate)", HT_WAIT_MS);
    /* the same kind of failure is logged once a second at most: retry
     * until the line comes (bounded) */
    int64_t deadline = ht_now_ms() + HT_WAIT_MS;
    int tries = 0;
    do {
        ck_assert_int_eq(https_get(tls_port, &none, err, sizeof err), -1);
        ck_assert_msg(strstr(err, "alert"), "no certificate: the client saw \"%s\"", err);
        tries++;
    } while (!hub_log_count(h, "no client certificate (tls_client_ca requires one)") &&
             ht_now_ms() < deadline);
    hub_log_wait(h, "no client certificate (tls_client_ca requires one)", 0);
    hub_metric_wait(h, "luahub_tls_handshake_failures_total{reason=\"client_cert\"}",
                    1 + tries, HT_WAIT_MS);
    ck_assert_msg(https_get(tls_port, &good, err, sizeof err) == 200, "signed client: %s", err);
    ck_assert_int_eq(hub_metric(h, "luahub_tls_handshakes_total"), 2);
    ck_assert_int_eq(hub_stop(h), 0);
    free(extra);
}
END_TEST

/* ------------------------------------------------------------------ */
/* What is not TLS, and TLS where it is not spoken                      */
/* ------------------------------------------------------------------ */

/* 200 clients that stall in the middle of their handshake do not stop
 * another from being served, and are dropped after request_timeout. */
START_TEST(stalled_handshakes_dropped)
{
    int tls_port;
    struct hub *h = start_tls(certs.server, certs.server_key, "request_timeout = 2\n",
                              &tls_port);
    enum { N = 200 };
    int fd[N];
    /* the first bytes of a ClientHello record, and nothing more */
    for (int i = 0; i < N; i++) {
        fd[i] = tcp_connect(tls_port);
        tcp_send(fd[i], "\x16\x03\x01\x02\x00\x01", 6);
    }
    const struct tls_client_opts o = {.ca = certs.ca};
    struct tls_proxy *px = tls_proxy_start(tls_port, &o);
    struct ws *sub = ws_connect(px->port), *pub = ws_connect(px->port);
    ws_subscribe(sub, "room");
    ws_publish(pub, "room", "1");
    ws_expect(sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":1}");
    char err[512];
    ck_assert_msg(https_get(tls_port, &o, err, sizeof err) == 200, "https: %s", err);

    int64_t deadline = ht_now_ms() + HT_WAIT_MS;
    for (int i = 0; i < N; i++) {
        int left = (int)(deadline - ht_now_ms());
        ck_assert_msg(tcp_wait_closed(fd[i], left > 0 ? left : 0),
                      "stalled handshake %d still open", i);
        close(fd[i]);
    }
    ck_assert_int_eq(hub_metric(h, "luahub_tls_handshake_failures_total{reason=\"timeout\"}"),
                     N);
    hub_log_wait(h, "no TLS handshake within request_timeout (2 s)", HT_WAIT_MS);
    /* the ones that work are still there */
    ws_publish(pub, "room", "2");
    ws_expect(sub, "{\"op\":\"message\",\"channel\":\"room\",\"data\":2}");
    ws_free(sub);
    ws_free(pub);
    tls_proxy_stop(px);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* Plain HTTP sent to the TLS port is answered 400 in plain text (what
 * nginx does), then the connection closes; bytes that are neither TLS nor
 * HTTP are closed on. */
START_TEST(plain_http_to_tls_port)
{
    int tls_port;
    struct hub *h = start_tls(certs.server, certs.server_key, NULL, &tls_port);
    struct http_resp r;
    ck_assert_int_eq(http_raw(tls_port, healthz, strlen(healthz), &r), 400);
    http_expect_error(&r, 400, "bad_request");
    ck_assert_msg(strstr(r.body, "plain HTTP request sent to a TLS port"), "%s", r.body);
    http_resp_free(&r);
    /* and with a body (drained before the close, not reset) */
    const char post[] = "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 34\r\n\r\n"
                        "{\"channel\":\"room\",\"data\":\"plain\"}";
    ck_assert_int_eq(http_raw(tls_port, post, strlen(post), &r), 400);
    http_resp_free(&r);
    int fd = tcp_connect(tls_port);
    tcp_send(fd, "\x00\x01\x02\x03", 4);
    ck_assert_msg(tcp_wait_closed(fd, HT_WAIT_MS), "junk: still open");
    close(fd);
    ck_assert_int_eq(hub_metric(h, "luahub_tls_handshake_failures_total{reason=\"plain_http\"}"),
                     2);
    ck_assert_int_eq(hub_metric(h, "luahub_tls_handshake_failures_total{reason=\"not_tls\"}"), 1);
    hub_log_wait(h, "plain HTTP request on the TLS port: answered 400", HT_WAIT_MS);
    /* TLS still works */
    char err[512];
    const struct tls_client_opts o = {.ca = certs.ca};
    ck_assert_msg(https_get(tls_port, &o, err, sizeof err) == 200, "https: %s", err);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* A TLS client on a plain port (a hub without TLS, and listen_plain of
 * one with it): http.c answers 400 to the ClientHello, which the client
 * reports as a failed handshake. */
START_TEST(tls_to_plain_port)
{
    int tls_port;
    struct hub *plain = hub_start("shutdown_timeout = 2\n");
    struct hub *both = start_tls(certs.server, certs.server_key, NULL, &tls_port);
    const struct tls_client_opts o = {.ca = certs.ca};
    const int ports[] = {plain->port, both->port};
    for (int i = 0; i < 2; i++) {
        char err[512];
        struct tls_conn *t = tls_connect(ports[i], &o, err, sizeof err);
        ck_assert_msg(t == NULL, "port %d: a TLS handshake on a plain port succeeded", i);
        ck_assert_msg(strstr(err, "TLS handshake: "), "port %d: %s", i, err);
        /* what the hub answered: the start of a ClientHello is refused */
        const char hello[] = "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03";
        struct http_resp r;
        ck_assert_int_eq(http_raw(ports[i], hello, sizeof hello - 1, &r), 400);
        http_expect_error(&r, 400, "bad_request");
        http_resp_free(&r);
    }
    ck_assert_int_eq(hub_metric(plain, "luahub_connections_total"), 0);
    struct http_resp r;
    ck_assert_int_eq(http_request(both->port, "GET", "/healthz", NULL, NULL, &r), 200);
    http_resp_free(&r);
    ck_assert_int_eq(hub_stop(plain), 0);
    ck_assert_int_eq(hub_stop(both), 0);
}
END_TEST

static Suite *tls_suite(void)
{
    Suite *s = suite_create("tls");
    TCase *tc = tcase_create("tls");
    tcase_add_test(tc, wss_and_https);
    tcase_add_test(tc, sigterm_with_tls_clients);
    tcase_add_test(tc, slow_tls_consumer_culled);
    tcase_add_test(tc, rotation_keeps_old_connections);
    tcase_add_loop_test(tc, bad_pair_on_reload_keeps_old, 0,
                        (int)(sizeof bad_pairs / sizeof *bad_pairs));
    tcase_add_loop_test(tc, bad_pair_at_start, 0, (int)(sizeof bad_pairs / sizeof *bad_pairs));
    tcase_add_test(tc, tls_keys_checked_with_line);
    tcase_add_test(tc, mutual_tls);
    tcase_add_test(tc, stalled_handshakes_dropped);
    tcase_add_test(tc, plain_http_to_tls_port);
    tcase_add_test(tc, tls_to_plain_port);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    char err[4096];
    if (tls_certs_make(&certs, err, sizeof err) < 0) {
        fprintf(stderr, "test_tls: cannot make the test certificates: %s\n", err);
        tls_certs_remove(&certs);
        return EXIT_FAILURE;
    }
    SRunner *sr = srunner_create(tls_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    tls_certs_remove(&certs);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
