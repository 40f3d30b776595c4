/* Integration suite: the limits an internet-facing hub needs (issue 13):
 * browser origins (allowed_origins), rate limits per connection
 * (command_rate, publish_rate, close 4029), per-address connection limits
 * (max_connections_per_ip, connect_rate_per_ip) and client addresses
 * behind trusted proxies (X-Forwarded-For). Real binary, real sockets.
 *
 * Every test stops its hub with SIGTERM and asserts exit status 0 (the
 * ASan build exits non-zero on a leak). No test asserts a duration: rate
 * limits are checked by counting answers, and the only wait is for the
 * retry_in_ms the hub itself announced. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hubtest.h"

#define CONF "shutdown_timeout = 2\n"

static void stop(struct hub *h)
{
    ck_assert_int_eq(hub_stop(h), 0);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Upgrades with the extra `headers`; returns the status (101, 4xx) and, on
 * 101, the close code the server sent at once (0 when it sent the welcome:
 * accepted). */
static int try_upgrade(int port, const char *headers, int *close_code, char *reason,
                       size_t rlen)
{
    struct ws *c;
    struct http_resp r;
    struct ws_opts o = {.headers = headers, .no_welcome = 1};
    int st = ws_handshake(port, &o, &c, &r);
    *close_code = 0;
    if (reason && rlen)
        reason[0] = '\0';
    if (st == 101) {
        struct ws_frame f;
        ck_assert_int_eq(ws_recv_frame(c, &f, HT_WAIT_MS), 1);
        if (f.opcode == WS_CLOSE) {
            *close_code = f.close_code;
            if (reason)
                snprintf(reason, rlen, "%s", f.close_reason);
        } else {
            ck_assert_msg(f.opcode == WS_TEXT && strstr(f.data, "welcome"),
                          "neither a welcome nor a close");
        }
        ws_frame_free(&f);
        ws_free(c);
    } else if (reason && rlen) {
        snprintf(reason, rlen, "%s", r.body ? r.body : "");
    }
    http_resp_free(&r);
    return st;
}

/* ---- origins ---------------------------------------------------------- */

/* Default: a browser may connect from the hub's own origin only; a client
 * without Origin is not a browser and is not concerned. */
START_TEST(origin_default_is_the_hub_itself)
{
    struct hub *h = hub_start(CONF);
    char own[128], reason[256];
    int code;
    snprintf(own, sizeof own, "Origin: http://127.0.0.1:%d\r\n", h->port);
    ck_assert_int_eq(try_upgrade(h->port, own, &code, reason, sizeof reason), 101);
    ck_assert_int_eq(code, 0);
    ck_assert_int_eq(try_upgrade(h->port, "", &code, reason, sizeof reason), 101);
    ck_assert_int_eq(code, 0);
    static const char *const others[] = {
        "Origin: http://evil.example\r\n",
        "Origin: http://127.0.0.1\r\n",             /* another port */
        "Origin: null\r\n",
        "Origin: file://\r\n",
    };
    for (size_t i = 0; i < sizeof others / sizeof *others; i++) {
        ck_assert_int_eq(try_upgrade(h->port, others[i], &code, reason, sizeof reason), 101);
        ck_assert_msg(code == 4403 && strstr(reason, "is not allowed (allowed_origins)"),
                      "%s: close %d \"%s\"", others[i], code, reason);
    }
    ck_assert_int_eq(hub_metric(h, "luahub_origins_refused_total"), 4);
    hub_log_wait(h, "not allowed (allowed_origins)", HT_WAIT_MS);
    stop(h);
}
END_TEST

START_TEST(origin_list_and_star)
{
    struct hub *h = hub_start(CONF "allowed_origins = {\"https://app.example\", "
                                   "\"http://localhost:8081\"}\n");
    int code;
    char reason[256];
    ck_assert_int_eq(try_upgrade(h->port, "Origin: https://app.example\r\n", &code, reason,
                                 sizeof reason), 101);
    ck_assert_int_eq(code, 0);
    ck_assert_int_eq(try_upgrade(h->port, "Origin: HTTPS://APP.EXAMPLE\r\n", &code, reason,
                                 sizeof reason), 101);
    ck_assert_int_eq(code, 0);
    ck_assert_int_eq(try_upgrade(h->port, "Origin: http://localhost:8081\r\n", &code, reason,
                                 sizeof reason), 101);
    ck_assert_int_eq(code, 0);
    static const char *const refused[] = {
        "Origin: http://app.example\r\n",           /* another scheme */
        "Origin: https://app.example:443\r\n",      /* written otherwise */
        "Origin: https://app.example.evil\r\n",
        "Origin: http://localhost:8082\r\n",
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        ck_assert_int_eq(try_upgrade(h->port, refused[i], &code, reason, sizeof reason), 101);
        ck_assert_msg(code == 4403, "%s: close %d", refused[i], code);
    }
    /* the hub's own origin is not implied once a list is given */
    char own[128];
    snprintf(own, sizeof own, "Origin: http://127.0.0.1:%d\r\n", h->port);
    ck_assert_int_eq(try_upgrade(h->port, own, &code, reason, sizeof reason), 101);
    ck_assert_int_eq(code, 4403);
    stop(h);

    h = hub_start(CONF "allowed_origins = {\"*\"}\n");
    ck_assert_int_eq(try_upgrade(h->port, "Origin: http://anything.example\r\n", &code, reason,
                                 sizeof reason), 101);
    ck_assert_int_eq(code, 0);
    stop(h);
}
END_TEST

/* ---- rate limits per connection ------------------------------------------ */

/* The first `burst` commands pass, the next are answered rate_limited with
 * retry_in_ms; after that wait they pass again. Publishes have their own
 * bucket. Other connections are not concerned. */
START_TEST(command_and_publish_rate)
{
    struct hub *h = hub_start(CONF "command_rate = 2\ncommand_burst = 5\n"
                                   "publish_rate = 1\npublish_burst = 2\n");
    struct ws *c = ws_connect(h->port), *other = ws_connect(h->port);
    int ok = 0, limited = 0;
    long long retry = 0;
    for (int i = 0; i < 8; i++) {
        char cmd[64];
        snprintf(cmd, sizeof cmd, "{\"op\":\"ping\",\"id\":%d}", i);
        ws_send_text(c, cmd);
    }
    for (int i = 0; i < 8; i++) {
        yajl_val v = ws_recv_json(c);
        if (YAJL_IS_TRUE(json_get(v, "ok"))) {
            ok++;
        } else {
            ck_assert_str_eq(json_get_str(v, "error", "code"), "rate_limited");
            ck_assert_ptr_nonnull(strstr(json_get_str(v, "error", "message"), "command_rate"));
            retry = (long long)YAJL_GET_INTEGER(json_get(v, "error", "retry_in_ms"));
            ck_assert_int_gt(retry, 0);
            ck_assert_int_le(retry, 1000);
            limited++;
        }
        yajl_tree_free(v);
    }
    /* the refill during the loop may give one more; never fewer than the burst */
    ck_assert_int_ge(ok, 5);
    ck_assert_int_le(ok, 6);
    ck_assert_int_eq(ok + limited, 8);
    /* another connection has its own bucket */
    ws_sync(other);
    /* after the wait it announced, a command passes */
    sleep_ms(retry + 50);
    ws_sync(c);
    ck_assert_int_ge(hub_metric(h, "luahub_rate_limited_total{limit=\"command\"}"), 2);
    ws_free(c);

    /* publishes: their own, smaller bucket */
    struct ws *p = ws_connect(h->port);
    for (int i = 0; i < 3; i++) {
        char cmd[96];
        snprintf(cmd, sizeof cmd, "{\"op\":\"publish\",\"channel\":\"x\",\"data\":%d,\"id\":%d}",
                 i, i);
        ws_send_text(p, cmd);
    }
    ws_expect(p, "{\"id\":0,\"ok\":true}");
    ws_expect(p, "{\"id\":1,\"ok\":true}");
    yajl_val v = ws_recv_json(p);
    ck_assert_str_eq(json_get_str(v, "error", "code"), "rate_limited");
    ck_assert_ptr_nonnull(strstr(json_get_str(v, "error", "message"), "publish_rate"));
    yajl_tree_free(v);
    ck_assert_int_eq(hub_metric(h, "luahub_rate_limited_total{limit=\"publish\"}"), 1);
    ws_free(p);
    ws_free(other);
    stop(h);
}
END_TEST

/* A client that keeps sending past the limit is closed with 4029. */
START_TEST(sustained_abuse_closes_4029)
{
    struct hub *h = hub_start(CONF "command_rate = 1\ncommand_burst = 1\n");
    struct ws *c = ws_connect(h->port), *other = ws_connect(h->port);
    for (int i = 0; i < 150; i++)
        ws_send_text(c, "{\"op\":\"ping\"}");
    int code = 0;
    for (int i = 0; i < 200 && !code; i++) {
        struct ws_frame f;
        int got = ws_recv_msg(c, &f, HT_WAIT_MS);
        ck_assert_int_eq(got, 1);
        if (f.opcode == WS_CLOSE)
            code = f.close_code;
        ws_frame_free(&f);
    }
    ck_assert_int_eq(code, 4029);
    ck_assert_int_eq(hub_metric(h, "luahub_rate_limit_closes_total"), 1);
    ws_sync(other);
    ws_free(c);
    ws_free(other);
    stop(h);
}
END_TEST

/* 0 switches a limit off. */
START_TEST(rate_zero_is_off)
{
    struct hub *h = hub_start(CONF "command_rate = 0\npublish_rate = 0\ncommand_burst = 1\n"
                                   "publish_burst = 1\n");
    struct ws *c = ws_connect(h->port);
    for (int i = 0; i < 6000; i++)
        ws_send_text(c, "{\"op\":\"publish\",\"channel\":\"x\",\"data\":1,\"id\":1}");
    for (int i = 0; i < 6000; i++)
        ws_expect(c, "{\"id\":1,\"ok\":true}");
    ws_free(c);
    stop(h);
}
END_TEST

/* ---- per address ------------------------------------------------------- */

START_TEST(max_connections_per_ip)
{
    struct hub *h = hub_start(CONF "max_connections_per_ip = 2\n");
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    int code;
    char reason[256];
    ck_assert_int_eq(try_upgrade(h->port, "", &code, reason, sizeof reason), 429);
    ck_assert_ptr_nonnull(strstr(reason, "max_connections_per_ip 2"));
    /* a browser sees the refusal as a close code */
    char own[128];
    snprintf(own, sizeof own, "Origin: http://127.0.0.1:%d\r\n", h->port);
    ck_assert_int_eq(try_upgrade(h->port, own, &code, reason, sizeof reason), 101);
    ck_assert_int_eq(code, 4429);
    /* one goes: a slot is free again (the close reaches the hub first) */
    ws_send_close(a, 1000, "");
    ws_expect_close(a, 1000);
    ws_free(a);
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    struct ws *c = ws_connect(h->port);
    ck_assert_int_eq(hub_metric(h, "luahub_connections_refused_per_address_total"
                                   "{limit=\"max_connections_per_ip\"}"), 2);
    /* refused upgrades did not take a slot */
    ws_free(b);
    ws_free(c);
    hub_metric_wait(h, "luahub_connections", 0, HT_WAIT_MS);
    for (int i = 0; i < 10; i++) {
        struct ws *x = ws_connect(h->port), *y = ws_connect(h->port);
        ws_free(x);
        ws_free(y);
        hub_metric_wait(h, "luahub_connections", 0, HT_WAIT_MS);
    }
    stop(h);
}
END_TEST

START_TEST(connect_rate_per_ip)
{
    struct hub *h = hub_start(CONF "connect_rate_per_ip = 3\n");
    int code, refused = 0;
    char reason[256] = "";
    for (int i = 0; i < 6; i++) {
        int st = try_upgrade(h->port, "", &code, reason, sizeof reason);
        if (st == 429) {
            refused++;
            ck_assert_ptr_nonnull(strstr(reason, "connect_rate_per_ip 3"));
        } else {
            ck_assert_int_eq(st, 101);
        }
    }
    ck_assert_int_ge(refused, 2);
    ck_assert_int_le(refused, 3);
    stop(h);
}
END_TEST

/* ---- client addresses behind proxies -------------------------------------- */

static const char addr_policy[] =
    "function on_connect(conn, req) conn.info = {addr = req.remote_addr} return true end\n"
    "function on_rpc(conn) return conn.info.addr end\n";

/* The address the policy sees for a connection with these headers. */
static char *seen_addr(struct hub *h, const char *headers)
{
    struct ws_opts o = {.headers = headers};
    struct ws *c = ws_connect_opts(h->port, &o);
    ws_send_text(c, "{\"op\":\"rpc\",\"method\":\"a\",\"id\":1}");
    yajl_val v = ws_recv_json(c);
    char *a = strdup(json_get_str(v, "data"));
    yajl_tree_free(v);
    ws_free(c);
    return a;
}

START_TEST(forwarded_for_from_trusted_proxies_only)
{
    char *path = ht_tmpfile(addr_policy);
    char *conf = ht_asprintf(CONF "policy = \"%s\"\ntrusted_proxies = {\"127.0.0.0/8\", "
                             "\"10.0.0.0/8\"}\n", path);
    struct hub *h = hub_start(conf);
    static const struct {
        const char *headers, *want;
    } cases[] = {
        {"", "127.0.0.1"},
        {"X-Forwarded-For: 203.0.113.7\r\n", "203.0.113.7"},
        /* the last untrusted hop: proxies of ours are skipped */
        {"X-Forwarded-For: 198.51.100.1, 203.0.113.7, 10.1.2.3\r\n", "203.0.113.7"},
        {"X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 10.0.0.1\r\n", "198.51.100.1"},
        {"X-Forwarded-For: 2001:db8::1\r\n", "2001:db8::1"},
        {"X-Forwarded-For: ::ffff:203.0.113.9\r\n", "203.0.113.9"},
        /* junk stops the walk: the last trusted hop is the client */
        {"X-Forwarded-For: 198.51.100.1, junk, 10.9.9.9\r\n", "10.9.9.9"},
        {"X-Forwarded-For: not an address\r\n", "127.0.0.1"},
        {"X-Forwarded-For: ,,,\r\n", "127.0.0.1"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *a = seen_addr(h, cases[i].headers);
        ck_assert_msg(!strcmp(a, cases[i].want), "case %zu: %s, expected %s", i, a,
                      cases[i].want);
        free(a);
    }
    /* 100 trusted hops: at most 64 are walked; the client is one of them */
    char xff[2048];
    size_t n = (size_t)snprintf(xff, sizeof xff, "X-Forwarded-For: 198.51.100.5");
    for (int i = 0; i < 100; i++)
        n += (size_t)snprintf(xff + n, sizeof xff - n, ", 10.0.%d.%d", i / 250, i % 250 + 1);
    snprintf(xff + n, sizeof xff - n, "\r\n");
    char *a = seen_addr(h, xff);
    ck_assert_msg(!strncmp(a, "10.0.", 5), "100 hops: %s", a);
    free(a);

    /* behind a trusted proxy the API sees the client: not loopback */
    struct http_resp r;
    http_request(h->port, "POST", "/api/publish", "X-Forwarded-For: 203.0.113.7\r\n",
                 "{\"channel\":\"x\",\"data\":1}", &r);
    http_expect_error(&r, 403, "forbidden");
    http_resp_free(&r);
    http_request(h->port, "POST", "/api/publish", NULL, "{\"channel\":\"x\",\"data\":1}", &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    stop(h);
    free(conf);

    /* the peer is not a trusted proxy: X-Forwarded-For is ignored */
    conf = ht_asprintf(CONF "policy = \"%s\"\ntrusted_proxies = {\"10.0.0.0/8\"}\n", path);
    h = hub_start(conf);
    a = seen_addr(h, "X-Forwarded-For: 203.0.113.7\r\n");
    ck_assert_str_eq(a, "127.0.0.1");
    free(a);
    http_request(h->port, "POST", "/api/publish", "X-Forwarded-For: 203.0.113.7\r\n",
                 "{\"channel\":\"x\",\"data\":1}", &r);
    http_expect_ok(&r);
    http_resp_free(&r);
    stop(h);
    free(conf);
    free(path);
}
END_TEST

/* Per-address limits count the client behind the proxy, not the proxy. */
START_TEST(per_address_limits_behind_a_proxy)
{
    struct hub *h = hub_start(CONF "trusted_proxies = {\"127.0.0.1\"}\n"
                                   "max_connections_per_ip = 1\n");
    struct ws_opts oa = {.headers = "X-Forwarded-For: 203.0.113.1\r\n"};
    struct ws_opts ob = {.headers = "X-Forwarded-For: 203.0.113.2\r\n"};
    struct ws *a = ws_connect_opts(h->port, &oa), *b = ws_connect_opts(h->port, &ob);
    int code;
    ck_assert_int_eq(try_upgrade(h->port, "X-Forwarded-For: 203.0.113.1\r\n", &code, NULL, 0),
                     429);
    ws_sync(a);
    ws_sync(b);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

static Suite *limits_suite(void)
{
    Suite *s = suite_create("limits");
    TCase *tc = tcase_create("origins");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, origin_default_is_the_hub_itself);
    tcase_add_test(tc, origin_list_and_star);
    suite_add_tcase(s, tc);
    tc = tcase_create("rates");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, command_and_publish_rate);
    tcase_add_test(tc, sustained_abuse_closes_4029);
    tcase_add_test(tc, rate_zero_is_off);
    suite_add_tcase(s, tc);
    tc = tcase_create("addresses");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, max_connections_per_ip);
    tcase_add_test(tc, connect_rate_per_ip);
    tcase_add_test(tc, forwarded_for_from_trusted_proxies_only);
    tcase_add_test(tc, per_address_limits_behind_a_proxy);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(limits_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
