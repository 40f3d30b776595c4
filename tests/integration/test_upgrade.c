/* Integration suite: the WebSocket upgrade as browsers and other clients
 * see it (docs/protocol.md "Connecting"): refusals a page can read (close
 * 4000 + status with the reason), subprotocols, and what answers a request
 * that is not an upgrade on the WebSocket path. Real binary, real sockets.
 *
 * Every test stops its hub with SIGTERM and asserts exit status 0: the
 * ASan build exits non-zero on a leak. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hubtest.h"

#define ORIGIN "Origin: http://app.example\r\n"

/* on_connect refuses with the status and reason given in the query:
 * ?status=429&reason=... ; ?fail=1 raises (an internal failure). */
static const char refusing_policy[] =
    "function on_connect(conn, req)\n"
    "  if req.query.fail then error('boom') end\n"
    "  if req.query.status then\n"
    "    return false, req.query.reason or 'no', tonumber(req.query.status)\n"
    "  end\n"
    "  return true\n"
    "end\n";

static struct hub *start_refusing(void)
{
    char *path = ht_tmpfile(refusing_policy);
    char *conf = ht_asprintf("policy = \"%s\"\nshutdown_timeout = 2\n"
                             "allowed_origins = {\"http://app.example\"}\n", path);
    struct hub *h = hub_start(conf);
    free(conf);
    free(path);
    return h;
}

/* Sends an upgrade to `path` with `headers`; requires 101 and, at once, a
 * close frame with `code` and `reason`, then the TCP close. */
static void expect_refusal_close(int port, const char *path, const char *headers, int code,
                                 const char *reason)
{
    struct ws *c;
    struct http_resp r;
    struct ws_opts o = {.path = path, .headers = headers, .no_welcome = 1};
    int st = ws_handshake(port, &o, &c, &r);
    ck_assert_msg(st == 101, "%s: status %d, expected 101 then a close", path, st);
    http_resp_free(&r);
    struct ws_frame f;
    int got = ws_recv_frame(c, &f, HT_WAIT_MS);
    ck_assert_msg(got == 1 && f.opcode == WS_CLOSE, "%s: no close frame (got %d, opcode %d)",
                  path, got, got == 1 ? f.opcode : -1);
    ck_assert_msg(f.close_code == code && !strcmp(f.close_reason, reason),
                  "%s: close %d \"%s\", expected %d \"%s\"", path, f.close_code, f.close_reason,
                  code, reason);
    ws_frame_free(&f);
    ck_assert_msg(tcp_wait_closed(c->fd, HT_WAIT_MS), "%s: still open after the close", path);
    ws_free(c);
}

/* A page (its request has an Origin) learns why it was refused: 101 and a
 * close 4000 + status with the reason; a non-browser client keeps the HTTP
 * status. Nothing is counted as a connection. */
START_TEST(refusal_visible_to_pages)
{
    struct hub *h = start_refusing();
    expect_refusal_close(h->port, "/ws?status=401&reason=log%20in%20again", ORIGIN, 4401,
                         "log in again");
    expect_refusal_close(h->port, "/ws?status=403", ORIGIN, 4403, "no");
    expect_refusal_close(h->port, "/ws?status=429&reason=slow%20down", ORIGIN, 4429,
                         "slow down");
    expect_refusal_close(h->port, "/ws?fail=1", ORIGIN, 4500,
                         "internal error: the connect policy failed");
    /* without Origin: the HTTP status */
    struct ws *c;
    struct http_resp r;
    struct ws_opts o = {.path = "/ws?status=401&reason=log%20in%20again"};
    ck_assert_int_eq(ws_handshake(h->port, &o, &c, &r), 401);
    ck_assert_ptr_null(c);
    ck_assert_str_eq(r.body, "log in again");
    http_resp_free(&r);
    ck_assert_int_eq(hub_metric(h, "luahub_connections_refused_total"), 5);
    ck_assert_int_eq(hub_metric(h, "luahub_connections_total"), 0);
    /* an accepted page connects as usual */
    struct ws_opts ok = {.headers = ORIGIN};
    ck_assert_int_eq(ws_handshake(h->port, &ok, &c, &r), 101);
    http_resp_free(&r);
    ws_subscribe(c, "room");
    ws_free(c);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* Reasons are cut to the 123 bytes a close frame holds, on a UTF-8
 * boundary, and bytes that are not UTF-8 become '?'. */
START_TEST(refusal_reason_cut_and_cleaned)
{
    struct hub *h = start_refusing();
    char path[1024], want[200];
    /* 150 x "é" (2 bytes each): 61 fit in 123 bytes */
    size_t n = (size_t)snprintf(path, sizeof path, "/ws?status=403&reason=");
    for (int i = 0; i < 150; i++)
        n += (size_t)snprintf(path + n, sizeof path - n, "%%C3%%A9");
    size_t w = 0;
    for (int i = 0; i < 61; i++) {
        want[w++] = (char)0xc3;
        want[w++] = (char)0xa9;
    }
    want[w] = '\0';
    expect_refusal_close(h->port, path, ORIGIN, 4403, want);
    /* "a", 0xff, "b", a lone continuation byte, a truncated 3-byte sequence */
    expect_refusal_close(h->port, "/ws?status=403&reason=a%FFb%80c%E2%82", ORIGIN, 4403,
                         "a?b?c??");
    /* 124 ASCII bytes: one too many */
    snprintf(path, sizeof path, "/ws?status=403&reason=%0124d", 0);
    char cut[124];
    memset(cut, '0', 123);
    cut[123] = '\0';
    expect_refusal_close(h->port, path, ORIGIN, 4403, cut);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

#define TEN ",x,x,x,x,x,x,x,x,x,x"

/* Subprotocols: "luahub" is echoed when offered, alone or in a list (a
 * token riding along as a second subprotocol is a common browser pattern);
 * an offer of others only is refused with 400 naming them, in the body and
 * the log; no offer at all is fine. */
static const struct {
    const char *headers;
    int status;
    const char *echo;           /* expected Sec-WebSocket-Protocol, NULL: none */
    const char *body_has;       /* 400: text the body must contain */
} subprotocols[] = {
    {"", 101, NULL, NULL},
    {"Sec-WebSocket-Protocol: luahub\r\n", 101, "luahub", NULL},
    {"Sec-WebSocket-Protocol: token.abc, luahub\r\n", 101, "luahub", NULL},
    {"Sec-WebSocket-Protocol: token.abc\r\nSec-WebSocket-Protocol: luahub\r\n", 101, "luahub",
     NULL},
    {"Sec-WebSocket-Protocol: foo\r\n", 400, NULL, "\"foo\""},
    {"Sec-WebSocket-Protocol: foo, bar\r\n", 400, NULL, "\"foo\", \"bar\""},
    {"Sec-WebSocket-Protocol: \r\n", 400, NULL, "empty Sec-WebSocket-Protocol list"},
    {"Sec-WebSocket-Protocol: , ,\t,\r\n", 400, NULL, "empty Sec-WebSocket-Protocol list"},
    {"Sec-WebSocket-Protocol: ,,, ;;; ===\r\n", 400, NULL, "\";;; ===\""},
    {"Sec-WebSocket-Protocol: LUAHUB\r\n", 400, NULL, "\"LUAHUB\""},
    /* 50 junk names, then luahub: the list is read to its end */
    {"Sec-WebSocket-Protocol: a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, "
     "b5, b6, b7, b8, b9, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, d0, d1, d2, d3, d4, d5, d6, "
     "d7, d8, d9, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, luahub\r\n", 101, "luahub", NULL},
    /* 129 names: over the limit */
    {"Sec-WebSocket-Protocol: luahub" TEN TEN TEN TEN TEN TEN TEN TEN TEN TEN TEN TEN
     ",x,x,x,x,x,x,x,x\r\n", 400, NULL, "too many WebSocket subprotocols offered (129"},
};

START_TEST(subprotocol_offers)
{
    struct hub *h = hub_start("shutdown_timeout = 2\n");
    struct ws *c;
    struct http_resp r;
    struct ws_opts o = {.headers = subprotocols[_i].headers};
    int st = ws_handshake(h->port, &o, &c, &r);
    ck_assert_msg(st == subprotocols[_i].status, "offer %d: status %d, expected %d", _i, st,
                  subprotocols[_i].status);
    char *echo = http_resp_header(&r, "Sec-WebSocket-Protocol");
    if (subprotocols[_i].echo)
        ck_assert_msg(echo && !strcmp(echo, subprotocols[_i].echo), "offer %d: echo %s", _i,
                      echo ? echo : "(none)");
    else
        ck_assert_msg(!echo, "offer %d: unexpected echo %s", _i, echo);
    free(echo);
    if (st == 101) {
        ws_subscribe(c, "room");
        ws_free(c);
    } else {
        ck_assert_msg(strstr(r.body, subprotocols[_i].body_has) && strstr(r.body, "luahub"),
                      "offer %d: body: %s", _i, r.body);
        hub_log_wait(h, "subprotocols offered", HT_WAIT_MS);
    }
    http_resp_free(&r);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* A refused offer names what was offered, in the log and the body, but a
 * token riding as a subprotocol ("token.<jwt>") shows as "token.***": the
 * log is no place for credentials (docs/operations.md "Secrets and logs"). */
START_TEST(refused_offer_hides_tokens)
{
    static const char *offers[] = {
        "Sec-WebSocket-Protocol: token.s3cretpart.s3cretsig, foo\r\n",
        "Sec-WebSocket-Protocol: foo\r\nSec-WebSocket-Protocol: token.s3cret\r\n",
    };
    struct hub *h = hub_start("shutdown_timeout = 2\n");
    for (int i = 0; i < 2; i++) {
        struct ws *c;
        struct http_resp r;
        struct ws_opts o = {.headers = offers[i]};
        ck_assert_int_eq(ws_handshake(h->port, &o, &c, &r), 400);
        ck_assert_msg(strstr(r.body, "\"token.***\"") && strstr(r.body, "\"foo\"") &&
                      !strstr(r.body, "s3cret"), "offer %d: body: %s", i, r.body);
        http_resp_free(&r);
    }
    hub_log_wait(h, "\"foo\", \"token.***\"", HT_WAIT_MS);
    ck_assert_int_eq(hub_log_count(h, "\"token.***\""), 2);
    ck_assert_int_eq(hub_log_count(h, "s3cret"), 0);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* 50 subprotocols with "luahub" last: accepted; 50 without: refused. */
START_TEST(subprotocol_long_lists)
{
    struct hub *h = hub_start("shutdown_timeout = 2\n");
    struct hub_buf_s { char p[2048]; size_t n; } b = {{0}, 0};
    b.n = (size_t)snprintf(b.p, sizeof b.p, "Sec-WebSocket-Protocol: ");
    for (int i = 0; i < 49; i++)
        b.n += (size_t)snprintf(b.p + b.n, sizeof b.p - b.n, "p%d, ", i);
    char *with = ht_asprintf("%sluahub\r\n", b.p), *without = ht_asprintf("%sp49\r\n", b.p);
    struct ws *c;
    struct http_resp r;
    struct ws_opts o = {.headers = with};
    ck_assert_int_eq(ws_handshake(h->port, &o, &c, &r), 101);
    http_resp_free(&r);
    ws_free(c);
    o.headers = without;
    ck_assert_int_eq(ws_handshake(h->port, &o, &c, &r), 400);
    http_resp_free(&r);
    free(with);
    free(without);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* The policy reads req.protocols and picks the subprotocol to echo with
 * conn.protocol: a token riding as "token.<t>" is the common browser way. */
static const char picking_policy[] =
    "function on_connect(conn, req)\n"
    "  for _, p in ipairs(req.protocols) do\n"
    "    if p:sub(1, 6) == 'token.' then\n"
    "      if p ~= 'token.good' then return false, 'bad token', 401 end\n"
    "      conn.protocol = p\n"
    "    end\n"
    "  end\n"
    "  if req.query.pick then conn.protocol = req.query.pick end\n"
    "  conn.info = {protocols = hub.json.array(req.protocols)}\n"
    "  return true\n"
    "end\n"
    "function on_rpc(conn, method)\n"
    "  if method == 'set' then conn.protocol = 'x' end\n"
    "  -- an empty array read back is a plain empty table: mark it again\n"
    "  return {conn.protocol or false, hub.json.array(conn.info.protocols)}\n"
    "end\n";

static const struct {
    const char *path, *headers;
    int status;
    const char *echo;           /* expected Sec-WebSocket-Protocol, NULL: none */
    const char *rpc;            /* 101: the rpc's data */
} picks[] = {
    {"/ws", "Sec-WebSocket-Protocol: token.good\r\n", 101, "token.good",
     "[\"token.good\",[\"token.good\"]]"},
    {"/ws", "Sec-WebSocket-Protocol: luahub, token.good\r\n", 101, "token.good",
     "[\"token.good\",[\"luahub\",\"token.good\"]]"},
    {"/ws", "Sec-WebSocket-Protocol: luahub\r\n", 101, "luahub", "[\"luahub\",[\"luahub\"]]"},
    {"/ws", "", 101, NULL, "[false,[]]"},
    {"/ws", "Sec-WebSocket-Protocol: token.bad\r\n", 401, NULL, NULL},
    /* a name the client did not offer: the policy failed */
    {"/ws?pick=nope", "Sec-WebSocket-Protocol: luahub\r\n", 500, NULL, NULL},
};

START_TEST(policy_picks_subprotocol)
{
    char *path = ht_tmpfile(picking_policy);
    char *conf = ht_asprintf("policy = \"%s\"\nshutdown_timeout = 2\n"
                             "allowed_origins = {\"http://app.example\"}\n", path);
    struct hub *h = hub_start(conf);
    struct ws *c;
    struct http_resp r;
    struct ws_opts o = {.path = picks[_i].path, .headers = picks[_i].headers};
    int st = ws_handshake(h->port, &o, &c, &r);
    ck_assert_msg(st == picks[_i].status, "pick %d: status %d, expected %d", _i, st,
                  picks[_i].status);
    char *echo = http_resp_header(&r, "Sec-WebSocket-Protocol");
    if (picks[_i].echo)
        ck_assert_msg(echo && !strcmp(echo, picks[_i].echo), "pick %d: echo %s", _i,
                      echo ? echo : "(none)");
    else
        ck_assert_msg(!echo, "pick %d: unexpected echo %s", _i, echo);
    free(echo);
    http_resp_free(&r);
    if (st == 101) {
        ws_send_text(c, "{\"op\":\"rpc\",\"method\":\"get\",\"id\":1}");
        char *want = ht_asprintf("{\"id\":1,\"ok\":true,\"data\":%s}", picks[_i].rpc);
        ws_expect(c, want);
        free(want);
        /* conn.protocol is set in on_connect only */
        ws_send_text(c, "{\"op\":\"rpc\",\"method\":\"set\",\"id\":2}");
        free(ws_expect_error(c, "2", "internal"));
        ws_free(c);
    }
    if (st == 500)
        hub_log_wait(h, "which the client did not offer", HT_WAIT_MS);
    ck_assert_int_eq(hub_stop(h), 0);
    free(conf);
    free(path);
}
END_TEST

/* A refusal of an upgrade that offered only a token subprotocol: the
 * answer echoes it, or a browser would fail the handshake before the page
 * could read the close. */
START_TEST(refusal_echoes_an_offered_subprotocol)
{
    char *path = ht_tmpfile(picking_policy);
    char *conf = ht_asprintf("policy = \"%s\"\nshutdown_timeout = 2\n"
                             "allowed_origins = {\"http://app.example\"}\n", path);
    struct hub *h = hub_start(conf);
    struct ws *c;
    struct http_resp r;
    struct ws_opts o = {.headers = ORIGIN "Sec-WebSocket-Protocol: token.bad\r\n",
                        .no_welcome = 1};
    ck_assert_int_eq(ws_handshake(h->port, &o, &c, &r), 101);
    char *echo = http_resp_header(&r, "Sec-WebSocket-Protocol");
    ck_assert_msg(echo && !strcmp(echo, "token.bad"), "echo %s", echo ? echo : "(none)");
    free(echo);
    http_resp_free(&r);
    struct ws_frame f;
    ck_assert_int_eq(ws_recv_frame(c, &f, HT_WAIT_MS), 1);
    ck_assert_int_eq(f.opcode, WS_CLOSE);
    ck_assert_int_eq(f.close_code, 4401);
    ck_assert_str_eq(f.close_reason, "bad token");
    ws_frame_free(&f);
    ws_free(c);
    ck_assert_int_eq(hub_stop(h), 0);
    free(conf);
    free(path);
}
END_TEST

/* A GET on the WebSocket path without an upgrade says what is wrong. */
START_TEST(plain_get_on_ws_path_426)
{
    struct hub *h = hub_start("shutdown_timeout = 2\n");
    struct http_resp r;
    http_request(h->port, "GET", "/ws", NULL, NULL, &r);
    http_expect_error(&r, 426, "upgrade_required");
    http_resp_free(&r);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

static Suite *upgrade_suite(void)
{
    Suite *s = suite_create("upgrade");
    TCase *tc = tcase_create("upgrade");
    tcase_add_test(tc, refusal_visible_to_pages);
    tcase_add_test(tc, refusal_reason_cut_and_cleaned);
    tcase_add_loop_test(tc, subprotocol_offers, 0,
                        (int)(sizeof subprotocols / sizeof *subprotocols));
    tcase_add_test(tc, subprotocol_long_lists);
    tcase_add_test(tc, refused_offer_hides_tokens);
    tcase_add_loop_test(tc, policy_picks_subprotocol, 0, (int)(sizeof picks / sizeof *picks));
    tcase_add_test(tc, refusal_echoes_an_offered_subprotocol);
    tcase_add_test(tc, plain_get_on_ws_path_426);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(upgrade_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
