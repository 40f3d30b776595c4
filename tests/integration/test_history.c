/* Integration suite: history, recovery and presence (issue 11) with the
 * memory broker, over real WebSocket and HTTP connections to the real
 * binary (docs/protocol.md). Every test starts its own hub on an ephemeral
 * port and stops it with SIGTERM, asserting exit status 0: the ASan build
 * exits non-zero on a leak, so every test is also a leak check.
 *
 * Synchronisation is by protocol round trips, never by sleeping: with the
 * memory broker a publish is fanned out (and a subscribe's history read,
 * replay included) within the event that answers it, so once a publisher
 * has its reply, ws_sync on a subscriber proves nothing else is queued for
 * it (hubtest.h). Only the expiry tests wait on the clock, for a metric,
 * bounded, with no assertion on how long it took.
 *
 * Data published by the tests is {"n":K} at offset K, so a delivery's data
 * and offset check each other. */
#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hubtest.h"

/* recover_max 10: the bound is reached with a few publishes. room:* keeps 5
 * messages (trimming), feed:* 50; pres:* and quiet:* have presence (with
 * and without join/leave), both:* history and presence; anything else
 * (lobby, x:1) matches no pattern. */
#define CHANNELS                                                                    \
    "channels = {\n"                                                                \
    "  [\"room:*\"]  = { history_size = 5, history_ttl = 600 },\n"                  \
    "  [\"feed:*\"]  = { history_size = 50 },\n"                                    \
    "  [\"pres:*\"]  = { presence = true, join_leave = true },\n"                   \
    "  [\"quiet:*\"] = { presence = true },\n"                                      \
    "  [\"both:*\"]  = { history_size = 20, presence = true, join_leave = true },\n" \
    "  [\"ttl:*\"]   = { history_size = 10, history_ttl = 1 },\n"                   \
    "}\n"
#define BASE_CONF "shutdown_timeout = 2\nrecover_max = 10\n" CHANNELS
/* A client queue of 4 KiB: what one reply or replay may carry is 2 KiB. */
#define SMALL_QUEUE "max_message_size = 1024\nmax_queue_bytes = 4096\n"
#define RECOVER_MAX 10

/* Sets conn.user and conn.info from the query string (?user=U&name=N), and
 * on rpc "become" (data {"user":U,"name":N}) changes them. */
#define PRESENCE_POLICY                                                          \
    "function on_connect(conn, req)\n"                                           \
    "  if req.query.user then conn.user = req.query.user end\n"                  \
    "  if req.query.name then conn.info = {name = req.query.name} end\n"         \
    "  return true\n"                                                            \
    "end\n"                                                                      \
    "function on_rpc(conn, method, data)\n"                                      \
    "  if method == 'become' then\n"                                             \
    "    conn.user = data.user\n"                                                \
    "    conn.info = {name = data.name}\n"                                       \
    "    return true\n"                                                          \
    "  end\n"                                                                    \
    "  return nil, 'no such method'\n"                                           \
    "end\n"

static char *policy_path;

/* A hub with BASE_CONF, `extra` conf lines (may be NULL) and, if `lua` is
 * not NULL, that policy. */
static struct hub *start_with(const char *extra, const char *lua)
{
    char *pol = NULL;
    if (lua) {
        policy_path = ht_tmpfile(lua);
        pol = ht_asprintf("policy = \"%s\"\n", policy_path);
    }
    char *conf = ht_asprintf("%s%s%s", BASE_CONF, extra ? extra : "", pol ? pol : "");
    struct hub *h = hub_start(conf);
    free(conf);
    free(pol);
    return h;
}

static struct hub *start(void)
{
    return start_with(NULL, NULL);
}

static void stop(struct hub *h)
{
    ck_assert_int_eq(hub_stop(h), 0);
    if (policy_path) {
        unlink(policy_path);
        free(policy_path);
        policy_path = NULL;
    }
}

/* A position in a stream, as a reply gives it. */
struct pos {
    long long offset;
    char epoch[64];
};

/* ------------------------------------------------------------------ */
/* Helpers. Each takes the caller's line (the macros below) and names   */
/* it in its failure messages.                                          */
/* ------------------------------------------------------------------ */

#define FAILAT(line, ...) ck_abort_msg("test_history.c:%d: %s", line, ht_asprintf(__VA_ARGS__))

/* The epoch string of reply `v`: present, 1 to 32 bytes. */
static const char *epoch_in(int line, yajl_val v, const char *text)
{
    const char *e = json_get_str(v, "epoch");
    if (!e || !*e || strlen(e) > 32)
        FAILAT(line, "no epoch of 1..32 bytes in %s", text);
    return e;
}

/* The next message must be the subscribe reply on a history channel:
 * {"id":ID,"ok":true,"channel":C[,"recovered":R],"offset":N,"epoch":E[,"missed":M]}
 * exactly. `recovered` -1 and `missed` -1: those members must be absent.
 * `want_offset` -1: any offset; `want_epoch` NULL: any epoch. Fills `out`
 * (may be NULL). */
static void reply_pos_at(int line, struct ws *c, int id, const char *channel, int recovered,
                         long long missed, long long want_offset, const char *want_epoch,
                         struct pos *out)
{
    char *t = ws_recv_text(c);
    yajl_val v = json_parse(t);
    const char *e = epoch_in(line, v, t);
    yajl_val o = json_get(v, "offset");
    if (!o || !YAJL_IS_INTEGER(o) || YAJL_GET_INTEGER(o) < 0)
        FAILAT(line, "no offset in %s", t);
    long long off = want_offset >= 0 ? want_offset : YAJL_GET_INTEGER(o);
    char rec[32] = "", mis[32] = "";
    if (recovered >= 0)
        snprintf(rec, sizeof rec, ",\"recovered\":%s", recovered ? "true" : "false");
    if (missed >= 0)
        snprintf(mis, sizeof mis, ",\"missed\":%lld", missed);
    char *want = ht_asprintf("{\"id\":%d,\"ok\":true,\"channel\":\"%s\"%s,\"offset\":%lld,"
                             "\"epoch\":\"%s\"%s}",
                             id, channel, rec, off, want_epoch ? want_epoch : e, mis);
    if (strcmp(t, want))
        FAILAT(line, "expected the subscribe reply\n  %s\ngot\n  %s", want, t);
    if (out) {
        out->offset = off;
        snprintf(out->epoch, sizeof out->epoch, "%s", e);
    }
    free(want);
    yajl_tree_free(v);
    free(t);
}
#define reply_pos(...) reply_pos_at(__LINE__, __VA_ARGS__)

/* The next message must be the delivery of {"n":offset} on `channel` with
 * its offset. */
static void expect_msg_at(int line, struct ws *c, const char *channel, long long offset)
{
    char *want = ht_asprintf("{\"op\":\"message\",\"channel\":\"%s\",\"data\":{\"n\":%lld},"
                             "\"offset\":%lld}", channel, offset, offset);
    char *t = ws_recv_text(c);
    if (strcmp(t, want))
        FAILAT(line, "expected the delivery\n  %s\ngot\n  %s", want, t);
    free(want);
    free(t);
}
#define expect_msg(...) expect_msg_at(__LINE__, __VA_ARGS__)

/* The deliveries of offsets from..to, in order. */
static void expect_msgs_at(int line, struct ws *c, const char *channel, long long from,
                           long long to)
{
    for (long long k = from; k <= to; k++)
        expect_msg_at(line, c, channel, k);
}
#define expect_msgs(...) expect_msgs_at(__LINE__, __VA_ARGS__)

/* POST /api/publish {"channel":C,"data":{"n":N}} on a history channel:
 * the answer must be exactly {"ok":true,"offset":N,"epoch":E} (N the data's
 * n; E `want_epoch` unless NULL). Fills `out` (may be NULL). */
static void http_pub_at(int line, struct hub *h, const char *channel, long long n,
                        const char *want_epoch, struct pos *out)
{
    struct http_resp r;
    char *body = ht_asprintf("{\"channel\":\"%s\",\"data\":{\"n\":%lld}}", channel, n);
    int st = http_request(h->port, "POST", "/api/publish", NULL, body, &r);
    if (st != 200)
        FAILAT(line, "POST /api/publish %s: status %d: %s", body, st, r.body);
    yajl_val v = json_parse(r.body);
    const char *e = epoch_in(line, v, r.body);
    char *want = ht_asprintf("{\"ok\":true,\"offset\":%lld,\"epoch\":\"%s\"}", n,
                             want_epoch ? want_epoch : e);
    if (strcmp(r.body, want))
        FAILAT(line, "POST /api/publish %s: expected\n  %s\ngot\n  %s", body, want, r.body);
    if (out) {
        out->offset = n;
        snprintf(out->epoch, sizeof out->epoch, "%s", e);
    }
    free(want);
    yajl_tree_free(v);
    http_resp_free(&r);
    free(body);
}
#define http_pub(...) http_pub_at(__LINE__, __VA_ARGS__)

/* Publishes {"n":K} for K = from..to over HTTP (offset K each). */
static void http_pubs_at(int line, struct hub *h, const char *channel, long long from,
                         long long to, struct pos *out)
{
    for (long long k = from; k <= to; k++)
        http_pub_at(line, h, channel, k, out && out->epoch[0] ? out->epoch : NULL, out);
}
#define http_pubs(...) http_pubs_at(__LINE__, __VA_ARGS__)

/* The stream's position, from GET /api/history?channel=C&limit=1. */
static struct pos http_top_at(int line, struct hub *h, const char *channel)
{
    struct http_resp r;
    struct pos p;
    char *path = ht_asprintf("/api/history?channel=%s&limit=1", channel);
    int st = http_request(h->port, "GET", path, NULL, NULL, &r);
    if (st != 200)
        FAILAT(line, "GET %s: status %d: %s", path, st, r.body);
    yajl_val v = json_parse(r.body);
    yajl_val o = json_get(v, "offset");
    if (!o || !YAJL_IS_INTEGER(o))
        FAILAT(line, "GET %s: no offset in %s", path, r.body);
    p.offset = YAJL_GET_INTEGER(o);
    snprintf(p.epoch, sizeof p.epoch, "%s", epoch_in(line, v, r.body));
    yajl_tree_free(v);
    http_resp_free(&r);
    free(path);
    return p;
}
#define http_top(...) http_top_at(__LINE__, __VA_ARGS__)

/* ws publish of {"n":n} (the publisher is not subscribed to `channel`). */
static void ws_pub(struct ws *c, const char *channel, long long n)
{
    char data[32];
    snprintf(data, sizeof data, "{\"n\":%lld}", n);
    ws_publish(c, channel, data);
}

/* Sends a command (printf format) as one text frame. */
static void sendf(struct ws *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sendf(struct ws *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    ck_assert(vasprintf(&s, fmt, ap) >= 0);
    va_end(ap);
    ws_send_text(c, s);
    free(s);
}

/* `src` with each "$E" replaced by `epoch` and each "$P" by `epoch`
 * without its last byte (new string). */
static char *with_epoch(const char *src, const char *epoch)
{
    char *out = strdup("");
    for (const char *q = src; *q;) {
        const char *m = strchr(q, '$');
        if (!m || (m[1] != 'E' && m[1] != 'P'))
            m = q + strlen(q);
        int el = m[0] && m[1] == 'P' ? (int)strlen(epoch) - 1 : (int)strlen(epoch);
        char *n = ht_asprintf("%s%.*s%.*s", out, (int)(m - q), q, *m ? el : 0, epoch);
        free(out);
        out = n;
        q = *m ? m + 2 : m;
    }
    return out;
}

/* The messages of a history answer: {"offset":K,"data":{"n":K}} for each K
 * of `offsets` (ended by -1), comma-separated (new string). */
static char *messages_of(const int *offsets)
{
    char *out = strdup("");
    for (int i = 0; offsets[i] >= 0; i++) {
        char *n = ht_asprintf("%s%s{\"offset\":%d,\"data\":{\"n\":%d}}", out, i ? "," : "",
                              offsets[i], offsets[i]);
        free(out);
        out = n;
    }
    return out;
}

/* A plain subscribe (integer id, no recover, no rewind) to a history
 * channel; its reply is checked as reply_pos does. */
static void sub_hist_at(int line, struct ws *c, int id, const char *channel,
                        long long want_offset, const char *want_epoch, struct pos *out)
{
    sendf(c, "{\"op\":\"subscribe\",\"channel\":\"%s\",\"id\":%d}", channel, id);
    reply_pos_at(line, c, id, channel, -1, -1, want_offset, want_epoch, out);
}
#define sub_hist(...) sub_hist_at(__LINE__, __VA_ARGS__)

static int starts_with(const char *s, const char *prefix)
{
    return !strncmp(s, prefix, strlen(prefix));
}

/* The client name of `c` (from its welcome; new string). */
static char *client_of(struct ws *c)
{
    yajl_val v = json_parse(c->welcome);
    const char *s = json_get_str(v, "client");
    ck_assert_msg(s && *s, "no client in %s", c->welcome);
    char *r = strdup(s);
    yajl_tree_free(v);
    return r;
}

/* ------------------------------------------------------------------ */
/* Offsets on deliveries                                                */
/* ------------------------------------------------------------------ */

START_TEST(offsets_from_one_per_channel_ws_and_http)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *p = ws_connect(h->port);
    struct pos e1, e2;
    sub_hist(a, 1, "feed:1", 0, NULL, &e1);
    sub_hist(a, 2, "feed:2", 0, NULL, &e2);
    ck_assert_str_ne(e1.epoch, e2.epoch);   /* a stream each */

    ws_pub(p, "feed:1", 1);
    expect_msg(a, "feed:1", 1);
    ws_pub(p, "feed:1", 2);
    expect_msg(a, "feed:1", 2);
    http_pub(h, "feed:1", 3, e1.epoch, NULL);       /* HTTP: the next offset */
    expect_msg(a, "feed:1", 3);
    ws_pub(p, "feed:2", 1);                          /* each channel from 1 */
    expect_msg(a, "feed:2", 1);
    http_pub(h, "feed:2", 2, e2.epoch, NULL);
    expect_msg(a, "feed:2", 2);
    ws_pub(p, "feed:1", 4);
    expect_msg(a, "feed:1", 4);

    /* a subscribed publisher gets its own message with its offset */
    sub_hist(p, 3, "feed:1", 4, e1.epoch, NULL);
    sendf(p, "{\"op\":\"publish\",\"channel\":\"feed:1\",\"data\":{\"n\":5},\"id\":4}");
    ws_expect_pair(p, "{\"id\":4,\"ok\":true}",
                   "{\"op\":\"message\",\"channel\":\"feed:1\",\"data\":{\"n\":5},\"offset\":5}");
    expect_msg(a, "feed:1", 5);
    /* the channel nobody listens to still counts */
    http_pub(h, "feed:3", 1, NULL, NULL);
    http_pub(h, "feed:3", 2, NULL, NULL);
    ws_sync(a);
    ws_sync(p);
    ws_free(a);
    ws_free(p);
    stop(h);
}
END_TEST

/* POST /api/broadcast: each history channel its own next offset; the
 * answer stays {"ok":true} (several channels, several positions). */
START_TEST(broadcast_gives_offsets)
{
    struct hub *h = start();
    struct pos p1 = {0}, p2 = {0};
    http_pubs(h, "feed:1", 1, 2, &p1);
    http_pubs(h, "feed:2", 1, 4, &p2);
    struct ws *a = ws_connect(h->port);
    sub_hist(a, 1, "feed:1", 2, p1.epoch, NULL);
    sub_hist(a, 2, "feed:2", 4, p2.epoch, NULL);
    ws_subscribe(a, "lobby");
    struct http_resp r;
    ck_assert_int_eq(http_request(h->port, "POST", "/api/broadcast", NULL,
                                  "{\"channels\":[\"feed:1\",\"lobby\",\"feed:2\"],"
                                  "\"data\":{\"b\":1}}", &r), 200);
    http_expect_ok(&r);
    http_resp_free(&r);
    ws_expect(a, "{\"op\":\"message\",\"channel\":\"feed:1\",\"data\":{\"b\":1},\"offset\":3}");
    ws_expect(a, "{\"op\":\"message\",\"channel\":\"lobby\",\"data\":{\"b\":1}}");
    ws_expect(a, "{\"op\":\"message\",\"channel\":\"feed:2\",\"data\":{\"b\":1},\"offset\":5}");
    ws_sync(a);
    ws_free(a);
    stop(h);
}
END_TEST

/* What is stored is the message after on_publish, on the channel it chose;
 * rewind and recovery use the channel name after on_subscribe's rewrite. */
START_TEST(policy_runs_before_history)
{
    struct hub *h = start_with(NULL,
                               "function on_subscribe(conn, channel)\n"
                               "  if channel == 'mine' then return 'feed:7' end\n"
                               "  return true\n"
                               "end\n"
                               "function on_publish(conn, channel, msg)\n"
                               "  if channel == 'draft' then\n"
                               "    return {channel = 'feed:7', data = {n = msg.data.k + 1}}\n"
                               "  end\n"
                               "  return true\n"
                               "end\n");
    struct ws *p = ws_connect(h->port);
    ws_publish(p, "draft", "{\"k\":0}");
    ws_publish(p, "draft", "{\"k\":1}");
    struct pos t = http_top(h, "feed:7");
    ck_assert_int_eq(t.offset, 2);
    struct ws *a = ws_connect(h->port);
    sendf(a, "{\"op\":\"subscribe\",\"channel\":\"mine\",\"rewind\":5,\"id\":1}");
    reply_pos(a, 1, "feed:7", -1, 2, 2, t.epoch, NULL);
    expect_msgs(a, "feed:7", 1, 2);
    sendf(a, "{\"op\":\"history\",\"channel\":\"feed:7\",\"limit\":1,\"id\":2}");
    char *want = ht_asprintf("{\"id\":2,\"ok\":true,\"channel\":\"feed:7\",\"offset\":2,"
                             "\"epoch\":\"%s\",\"messages\":[{\"offset\":1,\"data\":{\"n\":1}}],"
                             "\"truncated\":false}", t.epoch);
    ws_expect(a, want);
    free(want);
    sendf(a, "{\"op\":\"history\",\"channel\":\"mine\",\"id\":3}");
    free(ws_expect_error(a, "3", "not_subscribed"));
    struct ws *b = ws_connect(h->port);
    sendf(b, "{\"op\":\"subscribe\",\"channel\":\"mine\",\"id\":1,"
             "\"recover\":{\"offset\":1,\"epoch\":\"%s\"}}", t.epoch);
    reply_pos(b, 1, "feed:7", 1, 1, 2, t.epoch, NULL);
    expect_msg(b, "feed:7", 2);
    ws_publish(p, "draft", "{\"k\":2}");
    expect_msg(a, "feed:7", 3);
    expect_msg(b, "feed:7", 3);
    ws_sync(a);
    ws_sync(b);
    ws_free(a);
    ws_free(b);
    ws_free(p);
    stop(h);
}
END_TEST

/* Presence-only channels and channels matching no pattern: no offset
 * anywhere, replies and answers as before issue 11. */
static const char *const plain_channels[] = {"pres:1", "quiet:1", "lobby", "x:1", "roomy"};

START_TEST(no_offset_without_history)
{
    const char *ch = plain_channels[_i];
    int presence = !strncmp(ch, "pres:", 5);
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *p = ws_connect(h->port);
    char *want = ht_asprintf("{\"id\":1,\"ok\":true,\"channel\":\"%s\"}", ch);
    sendf(a, "{\"op\":\"subscribe\",\"channel\":\"%s\",\"id\":1}", ch);
    ws_expect(a, want);
    free(want);
    if (presence) {         /* join_leave: its own join (anonymous) */
        char *me = client_of(a);
        want = ht_asprintf("{\"op\":\"join\",\"channel\":\"%s\",\"client\":\"%s\"}", ch, me);
        ws_expect(a, want);
        free(want);
        free(me);
    }
    ws_publish(p, ch, "{\"n\":1}");
    char *d = ws_delivery(ch, "{\"n\":1}");
    ws_expect(a, d);
    ck_assert_int_eq(http_publish(h->port, ch, "{\"n\":1}"), 200);
    ws_expect(a, d);
    free(d);
    /* the HTTP answer is {"ok":true}, nothing more */
    struct http_resp r;
    char *body = ht_asprintf("{\"channel\":\"%s\",\"data\":[1,2]}", ch);
    ck_assert_int_eq(http_request(h->port, "POST", "/api/publish", NULL, body, &r), 200);
    http_expect_ok(&r);
    http_resp_free(&r);
    free(body);
    d = ws_delivery(ch, "[1,2]");
    ws_expect(a, d);
    free(d);
    /* recover and rewind are ignored there (docs/protocol.md): a plain ok,
     * nothing replayed */
    static const char *const past[] = {",\"rewind\":3",
                                       ",\"recover\":{\"offset\":0,\"epoch\":\"e\"}"};
    for (int i = 0; i < 2; i++) {
        struct ws *q = ws_connect(h->port);
        sendf(q, "{\"op\":\"subscribe\",\"channel\":\"%s\",\"id\":1%s}", ch, past[i]);
        want = ht_asprintf("{\"id\":1,\"ok\":true,\"channel\":\"%s\"}", ch);
        ws_expect(q, want);
        free(want);
        char *me = client_of(q);
        if (presence) {     /* its join, to itself and to a */
            want = ht_asprintf("{\"op\":\"join\",\"channel\":\"%s\",\"client\":\"%s\"}", ch,
                               me);
            ws_expect(q, want);
            ws_expect(a, want);
            free(want);
        }
        ws_sync(q);
        ws_free(q);
        if (presence) {     /* and its leave */
            want = ht_asprintf("{\"op\":\"leave\",\"channel\":\"%s\",\"client\":\"%s\"}",
                               ch, me);
            ws_expect(a, want);
            free(want);
        }
        free(me);
    }
    ws_sync(a);
    ws_sync(p);
    ws_free(a);
    ws_free(p);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Subscribe replies and rewind                                         */
/* ------------------------------------------------------------------ */

START_TEST(subscribe_reply_has_top_and_stable_epoch)
{
    struct hub *h = start();
    struct pos p0, p1;
    struct ws *a = ws_connect(h->port);
    sendf(a, "{\"op\":\"subscribe\",\"channel\":\"feed:1\",\"id\":\"s\"}");
    char *t = ws_recv_text(a);        /* a string id: the reply repeats it */
    yajl_val v = json_parse(t);
    snprintf(p0.epoch, sizeof p0.epoch, "%s", json_get_str(v, "epoch"));
    char *want = ht_asprintf("{\"id\":\"s\",\"ok\":true,\"channel\":\"feed:1\",\"offset\":0,"
                             "\"epoch\":\"%s\"}", p0.epoch);
    ck_assert_str_eq(t, want);
    free(want);
    free(t);
    yajl_tree_free(v);

    http_pubs(h, "feed:1", 1, 3, &p0);               /* the same epoch each time */
    expect_msgs(a, "feed:1", 1, 3);
    struct ws *b = ws_connect(h->port);
    sub_hist(b, 1, "feed:1", 3, p0.epoch, NULL);    /* no replay without asking */
    ws_sync(b);
    http_pubs(h, "feed:1", 4, 12, &p0);
    expect_msgs(a, "feed:1", 4, 12);
    expect_msgs(b, "feed:1", 4, 12);
    p1 = http_top(h, "feed:1");
    ck_assert_int_eq(p1.offset, 12);
    ck_assert_str_eq(p1.epoch, p0.epoch);
    ws_sync(a);
    ws_sync(b);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* Subscribing again to a history channel "gets the same ok reply and
 * changes nothing" (docs/protocol.md): the same reply is the one with the
 * channel's position; nothing is replayed. */
START_TEST(subscribe_again_reply_has_position)
{
    struct hub *h = start();
    struct pos p = {0};
    http_pubs(h, "feed:1", 1, 3, &p);
    struct ws *a = ws_connect(h->port);
    sub_hist(a, 1, "feed:1", 3, p.epoch, NULL);
    http_pub(h, "feed:1", 4, p.epoch, NULL);
    expect_msg(a, "feed:1", 4);
    sub_hist(a, 2, "feed:1", 4, p.epoch, NULL);
    ws_sync(a);
    http_pub(h, "feed:1", 5, p.epoch, NULL);
    expect_msg(a, "feed:1", 5);                     /* once */
    ws_sync(a);
    ws_free(a);
    stop(h);
}
END_TEST

/* rewind N: missed = what is kept of the last N, then those, oldest first,
 * then live ones. */
static const struct {
    const char *channel;
    int published, rewind, missed;
} rewinds[] = {
    {"feed:1", 7, 3, 3},
    {"feed:1", 7, 1, 1},
    {"feed:1", 7, 7, 7},
    {"feed:1", 3, 10, 3},           /* more than published */
    {"room:1", 8, 8, 5},            /* more than kept: what is kept */
    {"room:1", 8, 5, 5},
    {"feed:1", 15, 10, 10},         /* recover_max */
    {"feed:1", 0, 4, 0},            /* an empty stream */
};

START_TEST(rewind_gives_the_last_n)
{
    const char *ch = rewinds[_i].channel;
    int n = rewinds[_i].published, k = rewinds[_i].missed;
    struct hub *h = start();
    struct pos p = {0};
    if (n)
        http_pubs(h, ch, 1, n, &p);
    struct ws *a = ws_connect(h->port);
    sendf(a, "{\"op\":\"subscribe\",\"channel\":\"%s\",\"rewind\":%d,\"id\":1}", ch,
          rewinds[_i].rewind);
    reply_pos(a, 1, ch, -1, k, n, n ? p.epoch : NULL, &p);
    expect_msgs(a, ch, n - k + 1, n);
    ws_sync(a);
    http_pub(h, ch, n + 1, p.epoch, NULL);
    expect_msg(a, ch, n + 1);
    ws_sync(a);
    ws_free(a);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Recovery                                                             */
/* ------------------------------------------------------------------ */

START_TEST(recover_after_disconnect)
{
    struct hub *h = start();
    struct pos p;
    struct ws *a = ws_connect(h->port), *pub = ws_connect(h->port);
    sub_hist(a, 1, "feed:1", 0, NULL, &p);
    ws_pub(pub, "feed:1", 1);
    ws_pub(pub, "feed:1", 2);
    expect_msgs(a, "feed:1", 1, 2);
    ws_free(a);                                     /* gone: last seen 2 */
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    ws_pub(pub, "feed:1", 3);
    http_pub(h, "feed:1", 4, p.epoch, NULL);
    ws_pub(pub, "feed:1", 5);

    struct ws *b = ws_connect(h->port);
    sendf(b, "{\"op\":\"subscribe\",\"channel\":\"feed:1\",\"id\":1,"
             "\"recover\":{\"offset\":2,\"epoch\":\"%s\"}}", p.epoch);
    reply_pos(b, 1, "feed:1", 1, 3, 5, p.epoch, NULL);
    expect_msgs(b, "feed:1", 3, 5);
    ws_sync(b);
    ws_pub(pub, "feed:1", 6);                        /* then live ones */
    expect_msg(b, "feed:1", 6);
    ws_sync(b);
    /* members in the other order, epoch first */
    struct ws *c = ws_connect(h->port);
    sendf(c, "{\"recover\":{\"epoch\":\"%s\",\"offset\":4},\"channel\":\"feed:1\","
             "\"op\":\"subscribe\",\"id\":7}", p.epoch);
    reply_pos(c, 7, "feed:1", 1, 2, 6, p.epoch, NULL);
    expect_msgs(c, "feed:1", 5, 6);
    ws_sync(c);
    ws_free(b);
    ws_free(c);
    ws_free(pub);
    stop(h);
}
END_TEST

/* Publishes race the recovering subscribe (sent right after it, without
 * waiting): whatever the order in which the hub reads them, the client gets
 * each offset once, in order, from its recover point on - the reply's
 * `missed` of them before the live ones. */
START_TEST(recover_seam_no_gap_no_duplicate)
{
    struct hub *h = start();
    struct pos p = {0};
    http_pubs(h, "feed:1", 1, 4, &p);
    struct ws *pub = ws_connect(h->port);
    for (int round = 0; round < 20; round++) {
        long long from = p.offset;              /* the client saw up to here */
        http_pubs(h, "feed:1", from + 1, from + 3, &p);       /* 3 missed */
        struct ws *b = ws_connect(h->port);
        sendf(b, "{\"op\":\"subscribe\",\"channel\":\"feed:1\",\"id\":1,"
                 "\"recover\":{\"offset\":%lld,\"epoch\":\"%s\"}}", from, p.epoch);
        for (int i = 1; i <= 5; i++)
            sendf(pub, "{\"op\":\"publish\",\"channel\":\"feed:1\",\"data\":{\"n\":%lld},"
                       "\"id\":%d}", from + 3 + i, i);
        char *t = ws_recv_text(b);
        yajl_val v = json_parse(t);
        yajl_val top = json_get(v, "offset");
        ck_assert_msg(top && YAJL_IS_INTEGER(top), "no offset in %s", t);
        long long n = YAJL_GET_INTEGER(top);
        ck_assert_msg(n >= from + 3 && n <= from + 8, "reply offset %lld: %s", n, t);
        char *want = ht_asprintf("{\"id\":1,\"ok\":true,\"channel\":\"feed:1\",\"recovered\":true,"
                                 "\"offset\":%lld,\"epoch\":\"%s\",\"missed\":%lld}",
                                 n, p.epoch, n - from);
        ck_assert_str_eq(t, want);
        free(want);
        free(t);
        yajl_tree_free(v);
        expect_msgs(b, "feed:1", from + 1, from + 8);   /* replay, then live: each once */
        for (int i = 1; i <= 5; i++) {
            char *ok = ht_asprintf("{\"id\":%d,\"ok\":true}", i);
            ws_expect(pub, ok);
            free(ok);
        }
        ws_sync(b);
        ws_free(b);
        p.offset = from + 8;
    }
    ws_free(pub);
    stop(h);
}
END_TEST

/* recover {offset, epoch} after `published` messages: recovered with
 * `missed` replayed, or not recovered (missed 0, nothing replayed); live
 * deliveries follow either way. In `rec`, $E stands for the stream's
 * epoch, $P for it without its last byte. */
static const struct {
    const char *what, *channel;
    int published;
    const char *rec;
    int recovered, missed;
} recovers[] = {
    {"3 missed", "feed:1", 5, "{\"offset\":2,\"epoch\":\"$E\"}", 1, 3},
    {"from the top", "feed:1", 5, "{\"offset\":5,\"epoch\":\"$E\"}", 1, 0},
    {"a fresh stream", "feed:1", 0, "{\"offset\":0,\"epoch\":\"$E\"}", 1, 0},
    {"exactly recover_max", "feed:1", 15, "{\"offset\":5,\"epoch\":\"$E\"}", 1, 10},
    {"one over recover_max", "feed:1", 15, "{\"offset\":4,\"epoch\":\"$E\"}", 0, 0},
    {"far over recover_max", "feed:1", 15, "{\"offset\":0,\"epoch\":\"$E\"}", 0, 0},
    {"exactly what is kept", "room:1", 8, "{\"offset\":3,\"epoch\":\"$E\"}", 1, 5},
    {"trimmed", "room:1", 8, "{\"offset\":2,\"epoch\":\"$E\"}", 0, 0},
    {"trimmed from 0", "room:1", 8, "{\"offset\":0,\"epoch\":\"$E\"}", 0, 0},
    {"unknown epoch", "feed:1", 5, "{\"offset\":2,\"epoch\":\"nope\"}", 0, 0},
    {"unknown 32-byte epoch", "feed:1", 5,
     "{\"offset\":2,\"epoch\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}", 0, 0},
    {"empty epoch", "feed:1", 5, "{\"offset\":2,\"epoch\":\"\"}", 0, 0},
    {"empty epoch, fresh stream", "feed:1", 0, "{\"offset\":0,\"epoch\":\"\"}", 0, 0},
    {"missing epoch", "feed:1", 5, "{\"offset\":2}", 0, 0},
    {"missing epoch, at the top", "feed:1", 5, "{\"offset\":5}", 0, 0},
    {"offset above the top", "feed:1", 5, "{\"offset\":6,\"epoch\":\"$E\"}", 0, 0},
    {"offset 2^63-1", "feed:1", 5, "{\"offset\":9223372036854775807,\"epoch\":\"$E\"}", 0, 0},
    {"epoch prefix", "feed:1", 5, "{\"offset\":2,\"epoch\":\"$P\"}", 0, 0},
};

START_TEST(recover_outcomes)
{
    const char *ch = recovers[_i].channel;
    int n = recovers[_i].published, k = recovers[_i].missed;
    struct hub *h = start();
    struct pos p = {0};
    if (n)
        http_pubs(h, ch, 1, n, &p);
    p = http_top(h, ch);
    ck_assert_int_eq(p.offset, n);
    char *rec = with_epoch(recovers[_i].rec, p.epoch);
    struct ws *a = ws_connect(h->port);
    sendf(a, "{\"op\":\"subscribe\",\"channel\":\"%s\",\"recover\":%s,\"id\":1}", ch, rec);
    free(rec);
    reply_pos(a, 1, ch, recovers[_i].recovered, k, n, p.epoch, NULL);
    expect_msgs(a, ch, n - k + 1, n);
    ws_sync(a);                                     /* nothing else replayed */
    http_pub(h, ch, n + 1, p.epoch, NULL);
    expect_msg(a, ch, n + 1);
    ws_sync(a);
    ws_free(a);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Bad input                                                            */
/* ------------------------------------------------------------------ */

/* One command from client a (subscribed to feed:1, lobby, quiet:1; b to
 * feed:1): the error `code` whose message contains `says`, nothing else;
 * then both work and nothing changed (subscriptions, offsets). */
#define E33 "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\""
#define SUB2(x) "{\"op\":\"subscribe\",\"channel\":\"feed:2\",\"id\":7," x "}"
#define HIST1(x) "{\"op\":\"history\",\"channel\":\"feed:1\",\"id\":7" x "}"
static const struct {
    const char *cmd, *code, *says;
} bads[] = {
    /* recover */
    {SUB2("\"recover\":{\"offset\":-1,\"epoch\":\"e\"}"), "bad_request", "recover.offset"},
    {SUB2("\"recover\":{\"offset\":1.5,\"epoch\":\"e\"}"), "bad_request", "recover.offset"},
    {SUB2("\"recover\":{\"offset\":1.0,\"epoch\":\"e\"}"), "bad_request", "recover.offset"},
    {SUB2("\"recover\":{\"offset\":1e3,\"epoch\":\"e\"}"), "bad_request", "recover.offset"},
    {SUB2("\"recover\":{\"offset\":9223372036854775808,\"epoch\":\"e\"}"), "bad_request",
     "recover.offset"},
    {SUB2("\"recover\":{\"offset\":18446744073709551617,\"epoch\":\"e\"}"), "bad_request",
     "recover.offset"},
    {SUB2("\"recover\":{\"offset\":123456789012345678901234567890,\"epoch\":\"e\"}"),
     "bad_request", "recover.offset"},
    {SUB2("\"recover\":{\"offset\":\"3\",\"epoch\":\"e\"}"), "bad_request", "recover.offset"},
    {SUB2("\"recover\":{\"offset\":null,\"epoch\":\"e\"}"), "bad_request", "recover.offset"},
    {SUB2("\"recover\":{\"offset\":true,\"epoch\":\"e\"}"), "bad_request", "recover.offset"},
    {SUB2("\"recover\":{\"offset\":[1],\"epoch\":\"e\"}"), "bad_request", "recover.offset"},
    {SUB2("\"recover\":{\"offset\":{\"offset\":1},\"epoch\":\"e\"}"), "bad_request",
     "recover.offset"},
    {SUB2("\"recover\":{\"epoch\":\"e\"}"), "bad_request", "offset"},
    {SUB2("\"recover\":{\"offset\":1,\"epoch\":5}"), "bad_request", "recover.epoch"},
    {SUB2("\"recover\":{\"offset\":1,\"epoch\":null}"), "bad_request", "recover.epoch"},
    {SUB2("\"recover\":{\"offset\":1,\"epoch\":[\"e\"]}"), "bad_request", "recover.epoch"},
    {SUB2("\"recover\":{\"offset\":1,\"epoch\":" E33 "}"), "bad_request", "recover.epoch"},
    {SUB2("\"recover\":{\"offset\":1,\"epoch\":\"e\",\"x\":1}"), "bad_request", "'x'"},
    {SUB2("\"recover\":{\"offset\":1,\"offset\":2,\"epoch\":\"e\"}"), "bad_request",
     "duplicate"},
    {SUB2("\"recover\":[1,\"e\"]"), "bad_request", "recover"},
    {SUB2("\"recover\":\"1:e\""), "bad_request", "recover"},
    {SUB2("\"recover\":1"), "bad_request", "recover"},
    {SUB2("\"recover\":null"), "bad_request", "recover"},
    {SUB2("\"recover\":{\"offset\":1,\"epoch\":\"e\"},\"rewind\":2"), "bad_request", "rewind"},
    {SUB2("\"rewind\":2,\"recover\":{\"offset\":1,\"epoch\":\"e\"}"), "bad_request", "rewind"},
    {SUB2("\"recover\":{\"offset\":1,\"epoch\":\"e\"},\"recover\":{\"offset\":1,\"epoch\":\"e\"}"),
     "bad_request", "duplicate"},
    /* rewind */
    {SUB2("\"rewind\":0"), "bad_request", "rewind"},
    {SUB2("\"rewind\":-1"), "bad_request", "rewind"},
    {SUB2("\"rewind\":2.5"), "bad_request", "rewind"},
    {SUB2("\"rewind\":\"2\""), "bad_request", "rewind"},
    {SUB2("\"rewind\":true"), "bad_request", "rewind"},
    {SUB2("\"rewind\":11"), "bad_request", "recover_max"},
    {SUB2("\"rewind\":4294967297"), "bad_request", "rewind"},
    /* members of other ops */
    {SUB2("\"limit\":2"), "bad_request", "limit"},
    {SUB2("\"since\":{\"offset\":1,\"epoch\":\"e\"}"), "bad_request", "since"},
    {HIST1(",\"recover\":{\"offset\":1,\"epoch\":\"e\"}"), "bad_request", "recover"},
    {HIST1(",\"rewind\":2"), "bad_request", "rewind"},
    /* limit */
    {HIST1(",\"limit\":0"), "bad_request", "limit"},
    {HIST1(",\"limit\":-3"), "bad_request", "limit"},
    {HIST1(",\"limit\":1.5"), "bad_request", "limit"},
    {HIST1(",\"limit\":\"2\""), "bad_request", "limit"},
    {HIST1(",\"limit\":11"), "bad_request", "recover_max"},
    {HIST1(",\"limit\":99999999999999999999"), "bad_request", "limit"},
    /* since, reverse */
    {HIST1(",\"since\":{\"offset\":1}"), "bad_request", "epoch"},
    {HIST1(",\"since\":{\"offset\":0,\"epoch\":\"wrong\"}"), "bad_request", "epoch"},
    {HIST1(",\"since\":{\"offset\":0,\"epoch\":\"\"}"), "bad_request", "epoch"},
    {HIST1(",\"since\":{\"offset\":-1,\"epoch\":\"e\"}"), "bad_request", "since.offset"},
    {HIST1(",\"since\":{\"offset\":1,\"epoch\":" E33 "}"), "bad_request", "since.epoch"},
    {HIST1(",\"since\":{\"offset\":1,\"epoch\":\"e\",\"y\":2}"), "bad_request", "'y'"},
    {HIST1(",\"since\":5"), "bad_request", "since"},
    {HIST1(",\"reverse\":\"true\""), "bad_request", "reverse"},
    {HIST1(",\"reverse\":1"), "bad_request", "reverse"},
    {HIST1(",\"reverse\":null"), "bad_request", "reverse"},
    /* not_available: subscribed, but the channel has none */
    {"{\"op\":\"history\",\"channel\":\"quiet:1\",\"id\":7}", "not_available", "history"},
    {"{\"op\":\"history\",\"channel\":\"lobby\",\"id\":7}", "not_available", "history"},
    {"{\"op\":\"presence\",\"channel\":\"feed:1\",\"id\":7}", "not_available", "presence"},
    {"{\"op\":\"presence\",\"channel\":\"lobby\",\"id\":7}", "not_available", "presence"},
    {"{\"op\":\"presence_stats\",\"channel\":\"feed:1\",\"id\":7}", "not_available",
     "presence"},
    {"{\"op\":\"presence_stats\",\"channel\":\"lobby\",\"id\":7}", "not_available",
     "presence"},
    /* not_subscribed */
    {"{\"op\":\"history\",\"channel\":\"feed:9\",\"id\":7}", "not_subscribed", "feed:9"},
    {"{\"op\":\"presence\",\"channel\":\"quiet:9\",\"id\":7}", "not_subscribed", "quiet:9"},
    {"{\"op\":\"presence_stats\",\"channel\":\"quiet:9\",\"id\":7}", "not_subscribed",
     "quiet:9"},
    /* malformed members of the new ops */
    {"{\"op\":\"history\",\"id\":7}", "bad_request", "channel"},
    {"{\"op\":\"presence\",\"channel\":\"quiet:1\",\"limit\":1,\"id\":7}", "bad_request",
     "limit"},
    {"{\"op\":\"presence_stats\",\"channel\":\"bad name\",\"id\":7}", "invalid_channel",
     "channel"},
};

START_TEST(bad_input)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    struct pos p;
    sub_hist(a, 1, "feed:1", 0, NULL, &p);
    ws_subscribe(a, "lobby");
    ws_subscribe(a, "quiet:1");
    sub_hist(b, 1, "feed:1", 0, p.epoch, NULL);
    http_pub(h, "feed:1", 1, p.epoch, NULL);
    expect_msg(a, "feed:1", 1);
    expect_msg(b, "feed:1", 1);

    ws_send_text(a, bads[_i].cmd);
    char *t = ws_expect_error(a, "7", bads[_i].code);
    yajl_val v = json_parse(t);
    const char *m = json_get_str(v, "error", "message");
    ck_assert_msg(strstr(m, bads[_i].says), "case %d: the message of %s does not say '%s'",
                  _i, t, bads[_i].says);
    yajl_tree_free(v);
    free(t);
    char *series = ht_asprintf("luahub_protocol_errors_total{code=\"%s\"}", bads[_i].code);
    ck_assert_int_eq(hub_metric(h, series), 1);
    free(series);

    /* nothing else came, nothing changed: no new subscription, no publish */
    ws_sync(a);
    ws_sync(b);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 4);
    sendf(a, "{\"op\":\"publish\",\"channel\":\"feed:1\",\"data\":{\"n\":2},\"id\":8}");
    ws_expect_pair(a, "{\"id\":8,\"ok\":true}",
                   "{\"op\":\"message\",\"channel\":\"feed:1\",\"data\":{\"n\":2},\"offset\":2}");
    expect_msg(b, "feed:1", 2);
    sendf(a, "{\"op\":\"history\",\"channel\":\"feed:1\",\"id\":9}");
    char *want = ht_asprintf("{\"id\":9,\"ok\":true,\"channel\":\"feed:1\",\"offset\":2,"
                             "\"epoch\":\"%s\",\"messages\":[{\"offset\":1,\"data\":{\"n\":1}},"
                             "{\"offset\":2,\"data\":{\"n\":2}}],\"truncated\":false}", p.epoch);
    ws_expect(a, want);
    free(want);
    ws_sync(a);
    ws_sync(b);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The history op                                                       */
/* ------------------------------------------------------------------ */

/* history with `args` on feed:1 holding offsets 1..6: the offsets of the
 * answer, in order (-1 ends the list). In `args`, $E is the epoch. */
static const struct {
    const char *args;
    int offsets[8];
} histories[] = {
    {"", {1, 2, 3, 4, 5, 6, -1}},
    {",\"limit\":2", {1, 2, -1}},
    {",\"limit\":10", {1, 2, 3, 4, 5, 6, -1}},
    {",\"reverse\":false", {1, 2, 3, 4, 5, 6, -1}},
    {",\"reverse\":true", {6, 5, 4, 3, 2, 1, -1}},
    {",\"reverse\":true,\"limit\":2", {6, 5, -1}},
    {",\"since\":{\"offset\":3,\"epoch\":\"$E\"}", {4, 5, 6, -1}},
    {",\"since\":{\"epoch\":\"$E\",\"offset\":3},\"limit\":2", {4, 5, -1}},
    {",\"since\":{\"offset\":0,\"epoch\":\"$E\"}", {1, 2, 3, 4, 5, 6, -1}},
    {",\"since\":{\"offset\":6,\"epoch\":\"$E\"}", {-1}},
    {",\"since\":{\"offset\":3,\"epoch\":\"$E\"},\"reverse\":true", {6, 5, 4, -1}},
    {",\"limit\":1,\"since\":{\"offset\":5,\"epoch\":\"$E\"}", {6, -1}},
};

START_TEST(history_op)
{
    struct hub *h = start();
    struct pos p = {0};
    http_pubs(h, "feed:1", 1, 6, &p);
    struct ws *a = ws_connect(h->port);
    sub_hist(a, 1, "feed:1", 6, p.epoch, NULL);

    char *args = with_epoch(histories[_i].args, p.epoch);
    sendf(a, "{\"op\":\"history\",\"channel\":\"feed:1\",\"id\":5%s}", args);
    char *msgs = messages_of(histories[_i].offsets);
    char *want = ht_asprintf("{\"id\":5,\"ok\":true,\"channel\":\"feed:1\",\"offset\":6,"
                             "\"epoch\":\"%s\",\"messages\":[%s],\"truncated\":false}",
                             p.epoch, msgs);
    ws_expect(a, want);
    free(want);
    free(msgs);
    free(args);
    ws_sync(a);
    ws_free(a);
    stop(h);
}
END_TEST

/* data comes back byte for byte, as the publisher wrote it */
START_TEST(history_data_byte_exact)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *p = ws_connect(h->port);
    static const char *const datas[] = {
        "{ \"a\" : [1, 2.50, -0e0] }", "\"offset\"", "\"x\\u0041\\\"\"", "null",
        "{\"offset\":99}", "12345678901234567890123",
    };
    for (unsigned i = 0; i < sizeof datas / sizeof *datas; i++)
        ws_publish(p, "feed:1", datas[i]);
    sendf(a, "{\"op\":\"subscribe\",\"channel\":\"feed:1\",\"rewind\":6,\"id\":1}");
    struct pos ps;
    reply_pos(a, 1, "feed:1", -1, 6, 6, NULL, &ps);
    for (unsigned i = 0; i < sizeof datas / sizeof *datas; i++) {
        char *want = ht_asprintf("{\"op\":\"message\",\"channel\":\"feed:1\",\"data\":%s,"
                                 "\"offset\":%u}", datas[i], i + 1);
        ws_expect(a, want);
        free(want);
    }
    sendf(a, "{\"op\":\"history\",\"channel\":\"feed:1\",\"id\":2}");
    char *want = ht_asprintf("{\"id\":2,\"ok\":true,\"channel\":\"feed:1\",\"offset\":6,"
                             "\"epoch\":\"%s\",\"messages\":[", ps.epoch);
    for (unsigned i = 0; i < sizeof datas / sizeof *datas; i++) {
        char *w = ht_asprintf("%s%s{\"offset\":%u,\"data\":%s}", want, i ? "," : "", i + 1,
                              datas[i]);
        free(want);
        want = w;
    }
    char *w = ht_asprintf("%s],\"truncated\":false}", want);
    ws_expect(a, w);
    free(w);
    free(want);
    ws_free(a);
    ws_free(p);
    stop(h);
}
END_TEST

/* {"n":K,"pad":"0...0"}: 300 bytes of pad, ten of them do not fit half of
 * a 4 KiB queue (new string). */
static char *big_data(int k)
{
    return ht_asprintf("{\"n\":%d,\"pad\":\"%0300d\"}", k, 0);
}

static void publish_big(struct hub *h, const char *channel, int from, int to)
{
    for (int k = from; k <= to; k++) {
        char *d = big_data(k);
        char *body = ht_asprintf("{\"channel\":\"%s\",\"data\":%s}", channel, d);
        struct http_resp r;
        ck_assert_int_eq(http_request(h->port, "POST", "/api/publish", NULL, body, &r), 200);
        http_resp_free(&r);
        free(body);
        free(d);
    }
}

/* The next message must be the delivery of big_data(k) at offset k on
 * feed:1. Returns its length. */
static size_t expect_big_at(int line, struct ws *c, int k)
{
    char *d = big_data(k);
    char *want = ht_asprintf("{\"op\":\"message\",\"channel\":\"feed:1\",\"data\":%s,"
                             "\"offset\":%d}", d, k);
    char *t = ws_recv_text(c);
    if (strcmp(t, want))
        FAILAT(line, "expected the delivery\n  %s\ngot\n  %s", want, t);
    size_t n = strlen(t);
    free(t);
    free(want);
    free(d);
    return n;
}
#define expect_big(...) expect_big_at(__LINE__, __VA_ARGS__)

START_TEST(history_truncated_to_half_the_queue)
{
    struct hub *h = start_with(SMALL_QUEUE, NULL);
    publish_big(h, "feed:1", 1, 10);
    struct pos p = http_top(h, "feed:1");
    struct ws *a = ws_connect(h->port);
    sub_hist(a, 1, "feed:1", 10, p.epoch, NULL);
    /* read it all in pieces: each answer within 2 KiB, truncated until
     * the end, the offsets going on from where the last one stopped */
    long long next = 1;
    int answers = 0;
    while (next <= 10) {
        sendf(a, "{\"op\":\"history\",\"channel\":\"feed:1\",\"id\":%d,"
                 "\"since\":{\"offset\":%lld,\"epoch\":\"%s\"}}", 10 + answers, next - 1, p.epoch);
        char *t = ws_recv_text(a);
        ck_assert_msg(strlen(t) <= 2048, "a history answer of %zu bytes", strlen(t));
        yajl_val v = json_parse(t);
        yajl_val msgs = json_get(v, "messages"), tr = json_get(v, "truncated");
        ck_assert_msg(msgs && YAJL_IS_ARRAY(msgs) && tr, "not a history answer: %s", t);
        size_t n = msgs->u.array.len;
        ck_assert_msg(n > 0, "an empty answer before the end: %s", t);
        for (size_t i = 0; i < n; i++) {
            yajl_val o = json_get(msgs->u.array.values[i], "offset");
            yajl_val d = json_get(msgs->u.array.values[i], "data", "n");
            ck_assert_msg(o && d && YAJL_GET_INTEGER(o) == next && YAJL_GET_INTEGER(d) == next,
                          "expected offset %lld in %s", next, t);
            next++;
        }
        ck_assert_msg(YAJL_IS_TRUE(tr) == (next <= 10), "truncated is wrong in %s", t);
        yajl_tree_free(v);
        free(t);
        answers++;
    }
    ck_assert_msg(answers > 1, "all 10 messages (over 3 KiB) in one answer");
    /* the connection is fine */
    ws_sync(a);
    ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 0);
    ws_free(a);
    stop(h);
}
END_TEST

/* A recovery whose replay would not fit half of the queue: recovered:false,
 * not a 4001 close (and the client would come back for the same). A rewind
 * gets the newest that fit. */
START_TEST(replay_over_half_the_queue_not_recovered)
{
    struct hub *h = start_with(SMALL_QUEUE, NULL);
    publish_big(h, "feed:1", 1, 10);
    struct pos p = http_top(h, "feed:1");
    struct ws *a = ws_connect(h->port);
    sendf(a, "{\"op\":\"subscribe\",\"channel\":\"feed:1\",\"id\":1,"
             "\"recover\":{\"offset\":0,\"epoch\":\"%s\"}}", p.epoch);
    reply_pos(a, 1, "feed:1", 0, 0, 10, p.epoch, NULL);
    ws_sync(a);
    ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 0);
    publish_big(h, "feed:1", 11, 11);            /* still subscribed, live */
    expect_big(a, 11);
    /* a small recovery on the same conf is fine */
    struct ws *b = ws_connect(h->port);
    sendf(b, "{\"op\":\"subscribe\",\"channel\":\"feed:1\",\"id\":1,"
             "\"recover\":{\"offset\":9,\"epoch\":\"%s\"}}", p.epoch);
    reply_pos(b, 1, "feed:1", 1, 2, 11, p.epoch, NULL);
    expect_big(b, 10);
    expect_big(b, 11);
    ws_sync(b);
    /* rewind 10: the newest that fit, oldest first, all under 2 KiB */
    struct ws *c = ws_connect(h->port);
    sendf(c, "{\"op\":\"subscribe\",\"channel\":\"feed:1\",\"id\":1,\"rewind\":10}");
    char *t = ws_recv_text(c);
    yajl_val v = json_parse(t);
    yajl_val m = json_get(v, "missed");
    ck_assert_msg(m && YAJL_IS_INTEGER(m), "no missed in %s", t);
    long long k = YAJL_GET_INTEGER(m);
    ck_assert_msg(k >= 1 && k < 10, "rewind 10 of 3 KiB gave missed %lld: %s", k, t);
    yajl_tree_free(v);
    free(t);
    size_t bytes = 0;
    for (int o = 11 - (int)k + 1; o <= 11; o++)
        bytes += expect_big(c, o);
    ck_assert_msg(bytes <= 2048, "rewind replayed %zu bytes", bytes);
    ws_sync(c);
    ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 0);
    ck_assert_int_eq(hub_metric(h, "luahub_connections"), 3);
    ws_free(a);
    ws_free(b);
    ws_free(c);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Presence                                                             */
/* ------------------------------------------------------------------ */

/* A client with ?user=U&name=N (either may be NULL: not set). */
static struct ws *connect_as(struct hub *h, const char *user, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "/ws?%s%s%s%s%s", user ? "user=" : "", user ? user : "",
             user && name ? "&" : "", name ? "name=" : "", name ? name : "");
    struct ws_opts o = {.path = path};
    return ws_connect_opts(h->port, &o);
}

/* A client as user `user` whose socket buffer is `rcvbuf` (0: default). */
static struct ws *connect_as_rcvbuf(struct hub *h, const char *user, int rcvbuf)
{
    char path[256];
    snprintf(path, sizeof path, "/ws?user=%s", user);
    struct ws_opts o = {.path = path, .rcvbuf = rcvbuf};
    return ws_connect_opts(h->port, &o);
}

/* The presence entry of `c`: "client":..[,"user":..][,"info":{"name":..}]
 * (new string). */
static char *entry_of(struct ws *c, const char *user, const char *name)
{
    char *me = client_of(c);
    char *e = ht_asprintf("\"client\":\"%s\"%s%s%s%s%s%s", me, user ? ",\"user\":\"" : "",
                          user ? user : "", user ? "\"" : "",
                          name ? ",\"info\":{\"name\":\"" : "", name ? name : "",
                          name ? "\"}" : "");
    free(me);
    return e;
}

static void expect_event_at(int line, struct ws *c, const char *op, const char *channel,
                            const char *entry)
{
    char *want = ht_asprintf("{\"op\":\"%s\",\"channel\":\"%s\",%s}", op, channel, entry);
    char *t = ws_recv_text(c);
    if (strcmp(t, want))
        FAILAT(line, "expected\n  %s\ngot\n  %s", want, t);
    free(t);
    free(want);
}
#define expect_event(...) expect_event_at(__LINE__, __VA_ARGS__)

/* The presence answer's "clients" must hold exactly `entries` (any order). */
static void expect_presence_at(int line, struct ws *c, int id, const char *channel,
                               const char *const *entries, int n, int truncated)
{
    sendf(c, "{\"op\":\"presence\",\"channel\":\"%s\",\"id\":%d}", channel, id);
    char *t = ws_recv_text(c);
    char *head = ht_asprintf("{\"id\":%d,\"ok\":true,\"channel\":\"%s\",\"clients\":[", id,
                             channel);
    char *tail = ht_asprintf("],\"truncated\":%s}", truncated ? "true" : "false");
    size_t tl = strlen(t), hl = strlen(head), ll = strlen(tail);
    if (tl < hl + ll || strncmp(t, head, hl) || strcmp(t + tl - ll, tail))
        FAILAT(line, "expected %s...%s, got %s", head, tail, t);
    /* every listed entry once, nothing else */
    size_t total = hl + ll + (n > 0 ? (size_t)n - 1 : 0);
    for (int i = 0; i < n; i++) {
        char *obj = ht_asprintf("{%s}", entries[i]);
        char *at = strstr(t, obj);
        if (!at || strstr(at + 1, obj))
            FAILAT(line, "presence %s: not exactly once: %s", t, obj);
        total += strlen(obj);
        free(obj);
    }
    if (tl != total)
        FAILAT(line, "presence %s: more than the %d entries expected", t, n);
    free(head);
    free(tail);
    free(t);
}
#define expect_presence(...) expect_presence_at(__LINE__, __VA_ARGS__)

static void expect_stats_at(int line, struct ws *c, int id, const char *channel, int clients,
                            int users)
{
    sendf(c, "{\"op\":\"presence_stats\",\"channel\":\"%s\",\"id\":%d}", channel, id);
    char *want = ht_asprintf("{\"id\":%d,\"ok\":true,\"channel\":\"%s\",\"clients\":%d,"
                             "\"users\":%d}", id, channel, clients, users);
    char *t = ws_recv_text(c);
    if (strcmp(t, want))
        FAILAT(line, "expected\n  %s\ngot\n  %s", want, t);
    free(t);
    free(want);
}
#define expect_stats(...) expect_stats_at(__LINE__, __VA_ARGS__)

START_TEST(presence_lists_client_user_info)
{
    struct hub *h = start_with(NULL, PRESENCE_POLICY);
    struct ws *al = connect_as(h, "alice", "Al"), *bo = connect_as(h, "bob", NULL),
              *an = connect_as(h, NULL, NULL), *other = connect_as(h, "carol", "C");
    char *e[3] = {entry_of(al, "alice", "Al"), entry_of(bo, "bob", NULL),
                  entry_of(an, NULL, NULL)};
    ws_subscribe(al, "quiet:1");
    expect_presence(al, 1, "quiet:1", (const char *const *)e, 1, 0);
    ws_subscribe(bo, "quiet:1");
    ws_subscribe(an, "quiet:1");
    ws_subscribe(other, "quiet:2");             /* another channel */
    expect_presence(al, 2, "quiet:1", (const char *const *)e, 3, 0);
    expect_presence(an, 3, "quiet:1", (const char *const *)e, 3, 0);
    expect_stats(bo, 4, "quiet:1", 3, 2);
    /* leaving: by unsubscribe, and by closing */
    ws_unsubscribe(bo, "quiet:1");
    const char *const left[] = {e[0], e[2]};
    expect_presence(al, 5, "quiet:1", left, 2, 0);
    ws_free(an);
    hub_metric_wait(h, "luahub_connections", 3, HT_WAIT_MS);
    expect_presence(al, 6, "quiet:1", (const char *const *)e, 1, 0);
    expect_stats(al, 7, "quiet:1", 1, 1);
    ws_sync(al);
    ws_sync(bo);
    for (int i = 0; i < 3; i++)
        free(e[i]);
    ws_free(al);
    ws_free(bo);
    ws_free(other);
    stop(h);
}
END_TEST

START_TEST(presence_stats_counts_clients_and_users)
{
    struct hub *h = start_with(NULL, PRESENCE_POLICY);
    struct ws *c[6] = {
        connect_as(h, "alice", "tab1"), connect_as(h, "alice", "tab2"),
        connect_as(h, "bob", NULL), connect_as(h, NULL, NULL), connect_as(h, NULL, "x"),
        connect_as(h, "alice", "tab3"),
    };
    ws_subscribe(c[0], "quiet:1");
    expect_stats(c[0], 1, "quiet:1", 1, 1);
    for (int i = 1; i < 6; i++)
        ws_subscribe(c[i], "quiet:1");
    expect_stats(c[0], 2, "quiet:1", 6, 2);     /* alice (3 tabs), bob; 2 anonymous */
    ws_unsubscribe(c[0], "quiet:1");
    ws_unsubscribe(c[5], "quiet:1");
    expect_stats(c[2], 3, "quiet:1", 4, 2);     /* alice still there */
    ws_free(c[1]);
    hub_metric_wait(h, "luahub_subscriptions", 3, HT_WAIT_MS);
    expect_stats(c[2], 4, "quiet:1", 3, 1);
    ws_free(c[3]);
    hub_metric_wait(h, "luahub_subscriptions", 2, HT_WAIT_MS);
    expect_stats(c[2], 5, "quiet:1", 2, 1);
    for (int i = 0; i < 6; i++)
        if (i != 1 && i != 3)
            ws_free(c[i]);
    hub_metric_wait(h, "luahub_presence_channels", 0, HT_WAIT_MS);
    stop(h);
}
END_TEST

START_TEST(presence_max_truncates_the_list)
{
    struct hub *h = start_with("presence_max = 2\n", PRESENCE_POLICY);
    struct ws *c[3] = {connect_as(h, "a", NULL), connect_as(h, "b", NULL),
                       connect_as(h, "c", NULL)};
    char *e[3] = {entry_of(c[0], "a", NULL), entry_of(c[1], "b", NULL),
                  entry_of(c[2], "c", NULL)};
    for (int i = 0; i < 2; i++)
        ws_subscribe(c[i], "quiet:1");
    expect_presence(c[0], 1, "quiet:1", (const char *const *)e, 2, 0);   /* exactly the max */
    ws_subscribe(c[2], "quiet:1");
    /* 2 of the 3, whichever, and truncated */
    sendf(c[0], "{\"op\":\"presence\",\"channel\":\"quiet:1\",\"id\":2}");
    char *t = ws_recv_text(c[0]);
    int found = 0;
    for (int i = 0; i < 3; i++) {
        char *obj = ht_asprintf("{%s}", e[i]);
        found += strstr(t, obj) != NULL;
        free(obj);
    }
    ck_assert_msg(found == 2 && strstr(t, "],\"truncated\":true}"), "presence_max 2: %s", t);
    free(t);
    expect_stats(c[0], 3, "quiet:1", 3, 3);      /* the counts are not cut */
    ws_sync(c[0]);
    for (int i = 0; i < 3; i++) {
        free(e[i]);
        ws_free(c[i]);
    }
    stop(h);
}
END_TEST

/* Join on a user's first connection in the channel, leave on its last;
 * anonymous clients one each; no one gets its own leave. */
START_TEST(join_leave_per_user_and_per_anonymous_connection)
{
    struct hub *h = start_with(NULL, PRESENCE_POLICY);
    struct ws *w = connect_as(h, NULL, NULL);
    char *ew = entry_of(w, NULL, NULL);
    ws_subscribe(w, "pres:1");
    expect_event(w, "join", "pres:1", ew);           /* its own, after its reply */

    struct ws *a1 = connect_as(h, "alice", "one"), *a2 = connect_as(h, "alice", "two");
    char *ea1 = entry_of(a1, "alice", "one");
    ws_subscribe(a1, "pres:1");
    expect_event(a1, "join", "pres:1", ea1);
    expect_event(w, "join", "pres:1", ea1);
    ws_subscribe(a2, "pres:1");                      /* alice's second tab: no join */
    ws_sync(a2);
    ws_sync(a1);
    ws_sync(w);

    struct ws *b = connect_as(h, "bob", NULL), *n1 = connect_as(h, NULL, "anon");
    char *eb = entry_of(b, "bob", NULL), *en1 = entry_of(n1, NULL, "anon");
    ws_subscribe(b, "pres:1");
    struct ws *all[] = {w, a1, a2, b};
    for (int i = 0; i < 4; i++)
        expect_event(all[i], "join", "pres:1", eb);
    ws_subscribe(n1, "pres:1");
    struct ws *all2[] = {w, a1, a2, b, n1};
    for (int i = 0; i < 5; i++)
        expect_event(all2[i], "join", "pres:1", en1);

    /* alice's first tab goes: she is still there, no leave */
    ws_unsubscribe(a1, "pres:1");
    ws_sync(a1);
    for (int i = 0; i < 5; i++)
        if (all2[i] != a1)
            ws_sync(all2[i]);
    /* her last one closes: leave, with that connection's entry */
    char *ea2 = entry_of(a2, "alice", "two");
    ws_free(a2);
    expect_event(w, "leave", "pres:1", ea2);
    expect_event(b, "leave", "pres:1", ea2);
    expect_event(n1, "leave", "pres:1", ea2);
    ws_sync(a1);                                     /* unsubscribed: nothing */
    /* an anonymous client unsubscribes: the others hear, not itself */
    ws_unsubscribe(n1, "pres:1");
    ws_sync(n1);
    expect_event(w, "leave", "pres:1", en1);
    expect_event(b, "leave", "pres:1", en1);
    ws_sync(w);
    ws_sync(b);
    /* alice comes back in a1: join again */
    ws_subscribe(a1, "pres:1");
    expect_event(a1, "join", "pres:1", ea1);
    expect_event(w, "join", "pres:1", ea1);
    expect_event(b, "join", "pres:1", ea1);
    ws_sync(w);
    ws_sync(b);
    free(ew);
    free(ea1);
    free(ea2);
    free(eb);
    free(en1);
    ws_free(w);
    ws_free(a1);
    ws_free(b);
    ws_free(n1);
    stop(h);
}
END_TEST

/* Disconnects, not only unsubscribes, send leave: a close frame, a FIN, a
 * reset, and a client the hub closes (4001, slow consumer). */
#define CULL_CONF "max_message_size = 65536\nmax_queue_bytes = 65536\n"
#define CULL_PAD 60000

START_TEST(leave_on_every_kind_of_disconnect)
{
    struct hub *h = start_with(CULL_CONF, PRESENCE_POLICY);
    struct ws *w = connect_as(h, "watcher", NULL), *pub = ws_connect(h->port);
    char *ew = entry_of(w, "watcher", NULL);
    ws_subscribe(w, "pres:1");
    expect_event(w, "join", "pres:1", ew);
    char *pad = malloc(CULL_PAD + 3);
    ck_assert_ptr_nonnull(pad);
    pad[0] = '"';
    memset(pad + 1, 'p', CULL_PAD);
    strcpy(pad + 1 + CULL_PAD, "\"");
    for (int kind = 0; kind < 4; kind++) {
        char user[16];
        snprintf(user, sizeof user, "u%d", kind);
        struct ws *c = connect_as_rcvbuf(h, user, kind == 3 ? 4096 : 0);
        char *e = entry_of(c, user, NULL);
        ws_subscribe(c, "pres:1");
        expect_event(c, "join", "pres:1", e);
        expect_event(w, "join", "pres:1", e);
        if (kind == 0) {
            ws_send_close(c, 1000, "bye");
            ws_expect_close(c, 1000);
            ws_free(c);
        } else if (kind == 1) {
            ws_free(c);
        } else if (kind == 2) {
            ws_abort(c);
        } else {
            /* c reads nothing while megabytes are published: culled */
            ws_subscribe(c, "lobby");
            for (int i = 0; i < 400 && !hub_metric(h, "luahub_slow_consumer_closes_total"); i++)
                ws_publish(pub, "lobby", pad);
            ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 1);
        }
        expect_event(w, "leave", "pres:1", e);
        ws_sync(w);
        if (kind == 3)
            ws_free(c);
        free(e);
    }
    expect_stats(w, 1, "pres:1", 1, 1);
    free(pad);
    free(ew);
    ws_free(w);
    ws_free(pub);
    stop(h);
}
END_TEST

/* A user and info changed after connecting (conn.user, conn.info from an
 * rpc): presence shows them as they are when the client subscribes. The
 * hub kept a pointer to the first conn.user, which the assignment freed. */
START_TEST(presence_after_user_changes)
{
    struct hub *h = start_with(NULL, PRESENCE_POLICY);
    struct ws *a = connect_as(h, "alice", "Al"), *w = connect_as(h, NULL, NULL);
    ws_subscribe(w, "quiet:1");
    sendf(a, "{\"op\":\"rpc\",\"method\":\"become\",\"data\":{\"user\":\"bob\",\"name\":\"Bo\"},"
             "\"id\":1}");
    ws_expect(a, "{\"id\":1,\"ok\":true,\"data\":true}");
    ws_subscribe(a, "quiet:1");
    char *e[2] = {entry_of(a, "bob", "Bo"), entry_of(w, NULL, NULL)};
    expect_presence(w, 2, "quiet:1", (const char *const *)e, 2, 0);
    expect_stats(w, 3, "quiet:1", 2, 1);
    free(e[0]);
    free(e[1]);
    ws_free(a);
    ws_free(w);
    stop(h);
}
END_TEST

/* Two text messages in one write (one TCP segment on loopback), masked
 * with a zero key: the hub reads them in one go, so the reply to the first
 * is still queued when the second is answered. */
static void send_two(struct ws *c, const char *m1, const char *m2)
{
    unsigned char buf[1024];
    size_t n = 0;
    const char *m[2] = {m1, m2};
    for (int i = 0; i < 2; i++) {
        size_t len = strlen(m[i]);
        ck_assert(len < 126 && n + len + 6 <= sizeof buf);
        buf[n++] = 0x80 | WS_TEXT;
        buf[n++] = 0x80 | (unsigned char)len;
        memset(buf + n, 0, 4);          /* the mask key: 0, the payload as it is */
        n += 4;
        memcpy(buf + n, m[i], len);
        n += len;
    }
    ck_assert_int_eq(ws_send_raw(c, buf, n), 0);
}

/* The presence answer is one frame too: like history's, it must fit half
 * of the client's queue and say truncated when it does not - else a client
 * with anything queued is closed with 4001 for asking (and asks again when
 * it comes back). 20 clients with 150-byte infos: over 4 KiB of entries. */
START_TEST(presence_answer_fits_the_queue)
{
    struct hub *h = start_with(SMALL_QUEUE, PRESENCE_POLICY);
    char name[151];
    memset(name, 'n', 150);
    name[150] = '\0';
    struct ws *c[20];
    for (int i = 0; i < 20; i++) {
        char user[16];
        snprintf(user, sizeof user, "user%02d", i);
        c[i] = connect_as(h, user, name);
        ws_subscribe(c[i], "quiet:1");
    }
    expect_stats(c[0], 1, "quiet:1", 20, 20);
    sendf(c[0], "{\"op\":\"presence\",\"channel\":\"quiet:1\",\"id\":2}");
    char *t = ws_recv_text(c[0]);
    ck_assert_msg(strlen(t) <= 2048, "a presence answer of %zu bytes (max_queue_bytes 4096)",
                  strlen(t));
    ck_assert_msg(strstr(t, "],\"truncated\":true}"), "not truncated: %.200s", t);
    free(t);
    /* with a reply and a delivery queued before it */
    send_two(c[0], "{\"op\":\"publish\",\"channel\":\"quiet:1\",\"data\":1,\"id\":3}",
             "{\"op\":\"presence\",\"channel\":\"quiet:1\",\"id\":4}");
    ws_expect_pair(c[0], "{\"id\":3,\"ok\":true}",
                   "{\"op\":\"message\",\"channel\":\"quiet:1\",\"data\":1}");
    t = ws_recv_text(c[0]);
    ck_assert_msg(!strncmp(t, "{\"id\":4,\"ok\":true,", 18) && strlen(t) <= 2048,
                  "presence answer: %.200s (%zu bytes)", t, strlen(t));
    free(t);
    ws_sync(c[0]);
    ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 0);
    for (int i = 1; i < 20; i++) {
        ws_expect(c[i], "{\"op\":\"message\",\"channel\":\"quiet:1\",\"data\":1}");
        ws_free(c[i]);
    }
    ws_free(c[0]);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* HTTP API                                                             */
/* ------------------------------------------------------------------ */

static char *http_get_at(int line, struct hub *h, const char *path, int want_status)
{
    struct http_resp r;
    int st = http_request(h->port, "GET", path, NULL, NULL, &r);
    if (st != want_status)
        FAILAT(line, "GET %s: status %d, expected %d: %s", path, st, want_status, r.body);
    char *ct = http_resp_header(&r, "content-type");
    if (!ct || strncmp(ct, "application/json", 16))
        FAILAT(line, "GET %s: Content-Type %s", path, ct ? ct : "(none)");
    free(ct);
    char *body = strdup(r.body);
    http_resp_free(&r);
    return body;
}
#define http_get(...) http_get_at(__LINE__, __VA_ARGS__)

static const struct {
    const char *query;
    int offsets[8];
} http_histories[] = {
    {"", {1, 2, 3, 4, 5, 6, -1}},
    {"&limit=2", {1, 2, -1}},
    {"&limit=10", {1, 2, 3, 4, 5, 6, -1}},
    {"&reverse=true", {6, 5, 4, 3, 2, 1, -1}},
    {"&reverse=1&limit=3", {6, 5, 4, -1}},
    {"&reverse=false", {1, 2, 3, 4, 5, 6, -1}},
    {"&reverse=0", {1, 2, 3, 4, 5, 6, -1}},
    {"&since=3&epoch=$E", {4, 5, 6, -1}},
    {"&epoch=$E&since=3&limit=1", {4, -1}},
    {"&since=0&epoch=$E", {1, 2, 3, 4, 5, 6, -1}},
    {"&since=6&epoch=$E", {-1}},
    {"&since=2&epoch=$E&reverse=true&limit=2", {6, 5, -1}},
};

START_TEST(http_history)
{
    struct hub *h = start();
    struct pos p = {0};
    http_pubs(h, "feed:1", 1, 6, &p);
    char *q = with_epoch(http_histories[_i].query, p.epoch);
    char *path = ht_asprintf("/api/history?channel=feed:1%s", q);
    char *body = http_get(h, path, 200);
    char *msgs = messages_of(http_histories[_i].offsets);
    char *want = ht_asprintf("{\"ok\":true,\"offset\":6,\"epoch\":\"%s\",\"messages\":[%s],"
                             "\"truncated\":false}", p.epoch, msgs);
    ck_assert_str_eq(body, want);
    free(want);
    free(msgs);
    free(q);
    free(body);
    free(path);
    stop(h);
}
END_TEST

static const struct {
    const char *query;
    int status;
    const char *code;
} http_bads[] = {
    {"/api/history", 400, "bad_request"},
    {"/api/history?limit=2", 400, "bad_request"},
    {"/api/history?channel=", 400, "invalid_channel"},
    {"/api/history?channel=a%20b", 400, "invalid_channel"},
    {"/api/history?channel=feed:1&limit=0", 400, "bad_request"},
    {"/api/history?channel=feed:1&limit=-1", 400, "bad_request"},
    {"/api/history?channel=feed:1&limit=1.5", 400, "bad_request"},
    {"/api/history?channel=feed:1&limit=x", 400, "bad_request"},
    {"/api/history?channel=feed:1&limit=", 400, "bad_request"},
    {"/api/history?channel=feed:1&limit=11", 400, "bad_request"},
    {"/api/history?channel=feed:1&limit=99999999999999999999", 400, "bad_request"},
    {"/api/history?channel=feed:1&since=1", 400, "bad_request"},
    {"/api/history?channel=feed:1&epoch=abc", 400, "bad_request"},
    {"/api/history?channel=feed:1&since=-1&epoch=abc", 400, "bad_request"},
    {"/api/history?channel=feed:1&since=x&epoch=abc", 400, "bad_request"},
    {"/api/history?channel=feed:1&since=9223372036854775808&epoch=abc", 400, "bad_request"},
    {"/api/history?channel=feed:1&since=1&epoch=wrong", 400, "bad_request"},
    {"/api/history?channel=feed:1&since=1&epoch=", 400, "bad_request"},
    {"/api/history?channel=feed:1&reverse=yes", 400, "bad_request"},
    {"/api/history?channel=feed:1&reverse=", 400, "bad_request"},
    {"/api/history?channel=quiet:1", 404, "not_available"},
    {"/api/history?channel=lobby", 404, "not_available"},
    {"/api/presence", 400, "bad_request"},
    {"/api/presence?channel=a%20b", 400, "invalid_channel"},
    {"/api/presence?channel=quiet:1&stats=maybe", 400, "bad_request"},
    {"/api/presence?channel=feed:1", 404, "not_available"},
    {"/api/presence?channel=lobby&stats=true", 404, "not_available"},
};

START_TEST(http_bad_params)
{
    struct hub *h = start();
    struct pos p = {0};
    http_pubs(h, "feed:1", 1, 2, &p);
    struct http_resp r;
    int st = http_request(h->port, "GET", http_bads[_i].query, NULL, NULL, &r);
    ck_assert_msg(st == http_bads[_i].status, "GET %s: %d %s", http_bads[_i].query, st, r.body);
    http_expect_error(&r, http_bads[_i].status, http_bads[_i].code);
    http_resp_free(&r);
    /* nothing changed */
    struct pos t = http_top(h, "feed:1");
    ck_assert_int_eq(t.offset, 2);
    ck_assert_str_eq(t.epoch, p.epoch);
    stop(h);
}
END_TEST

START_TEST(http_presence)
{
    struct hub *h = start_with(NULL, PRESENCE_POLICY);
    char *body = http_get(h, "/api/presence?channel=quiet:1", 200);
    ck_assert_str_eq(body, "{\"ok\":true,\"count\":0,\"users\":0,\"clients\":[],"
                           "\"truncated\":false}");
    free(body);
    struct ws *a = connect_as(h, "alice", "Al"), *b = connect_as(h, NULL, NULL);
    ws_subscribe(a, "quiet:1");
    ws_subscribe(b, "quiet:1");
    char *ea = entry_of(a, "alice", "Al"), *eb = entry_of(b, NULL, NULL);
    char *w1 = ht_asprintf("{\"ok\":true,\"count\":2,\"users\":1,\"clients\":[{%s},{%s}],"
                           "\"truncated\":false}", ea, eb);
    char *w2 = ht_asprintf("{\"ok\":true,\"count\":2,\"users\":1,\"clients\":[{%s},{%s}],"
                           "\"truncated\":false}", eb, ea);
    body = http_get(h, "/api/presence?channel=quiet:1", 200);
    ck_assert_msg(!strcmp(body, w1) || !strcmp(body, w2), "GET /api/presence: %s", body);
    free(body);
    body = http_get(h, "/api/presence?channel=quiet:1&stats=true", 200);
    ck_assert_str_eq(body, "{\"ok\":true,\"count\":2,\"users\":1}");
    free(body);
    body = http_get(h, "/api/presence?channel=quiet:1&stats=false", 200);
    ck_assert_msg(!strcmp(body, w1) || !strcmp(body, w2), "stats=false: %s", body);
    free(body);
    free(w1);
    free(w2);
    free(ea);
    free(eb);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* The routes follow the API's authentication: the key when one is set,
 * else loopback and not cross-site. */
START_TEST(http_routes_authenticated)
{
    static const char *const paths[] = {"/api/history?channel=feed:1",
                                        "/api/presence?channel=quiet:1"};
    struct http_resp r;
    struct hub *h = start_with("api_key = \"k3y\"\n", NULL);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(http_request(h->port, "GET", paths[i], NULL, NULL, &r), 401);
        http_expect_error(&r, 401, "unauthorized");
        http_resp_free(&r);
        ck_assert_int_eq(http_request(h->port, "GET", paths[i], "Authorization: Bearer nope\r\n",
                                      NULL, &r), 401);
        http_expect_error(&r, 401, "unauthorized");
        http_resp_free(&r);
        ck_assert_int_eq(http_request(h->port, "GET", paths[i], "Authorization: Bearer k3y\r\n",
                                      NULL, &r), 200);
        http_resp_free(&r);
        ck_assert_int_eq(http_request(h->port, "POST", paths[i], "Authorization: Bearer k3y\r\n",
                                      "", &r), 405);
        http_expect_error(&r, 405, "method_not_allowed");
        char *allow = http_resp_header(&r, "allow");
        ck_assert_str_eq(allow, "GET");
        free(allow);
        http_resp_free(&r);
    }
    /* and so is POST /api/publish's answer on a history channel */
    ck_assert_int_eq(http_request(h->port, "POST", "/api/publish", NULL,
                                  "{\"channel\":\"feed:1\",\"data\":1}", &r), 401);
    http_resp_free(&r);
    ck_assert_int_eq(hub_stop(h), 0);

    h = start();
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(http_request(h->port, "GET", paths[i], "Origin: http://evil.example\r\n",
                                      NULL, &r), 403);
        http_expect_error(&r, 403, "forbidden");
        http_resp_free(&r);
        ck_assert_int_eq(http_request(h->port, "GET", paths[i], "Sec-Fetch-Site: cross-site\r\n",
                                      NULL, &r), 403);
        http_expect_error(&r, 403, "forbidden");
        http_resp_free(&r);
        ck_assert_int_eq(http_request(h->port, "GET", paths[i], NULL, NULL, &r), 200);
        http_resp_free(&r);
    }
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* No growth                                                            */
/* ------------------------------------------------------------------ */

#define RECONNECTS 1000
#define WARMUP 100

static const char *const gauges[] = {
    "luahub_history_streams", "luahub_history_messages", "luahub_presence_channels",
    "luahub_channels", "luahub_subscriptions", "luahub_connections",
};
#define NGAUGES (sizeof gauges / sizeof *gauges)

/* A client reconnects 1,000 times with recovery on a channel with history,
 * presence and join/leave, one message missed each time: each recovery
 * gives exactly that message, the watcher sees every message, join and
 * leave, and nothing grows: the broker's streams and presence channels, the
 * hub's channels and subscriptions, and the hub's memory. */
START_TEST(reconnect_loop_no_growth)
{
    ht_asan_no_quarantine();                /* quarantine would look like growth */
    struct hub *h = start();
    struct ws *w = ws_connect(h->port), *pub = ws_connect(h->port);
    struct pos p;
    sub_hist(w, 1, "both:1", 0, NULL, &p);
    char *me = entry_of(w, NULL, NULL);
    expect_event(w, "join", "both:1", me);     /* its own */
    free(me);
    ws_pub(pub, "both:1", 1);
    long long seen = 0, next = 1;
    long rss0 = 0;
    long long g0[NGAUGES];
    for (int i = 0; i < RECONNECTS; i++) {
        struct ws *c = ws_connect(h->port);
        sendf(c, "{\"op\":\"subscribe\",\"channel\":\"both:1\",\"id\":1,"
                 "\"recover\":{\"offset\":%lld,\"epoch\":\"%s\"}}", seen, p.epoch);
        reply_pos(c, 1, "both:1", 1, 1, seen + 1, p.epoch, NULL);
        expect_msg(c, "both:1", seen + 1);
        seen++;
        ws_free(c);
        ws_pub(pub, "both:1", seen + 1);          /* missed by the next one */
        if (i != WARMUP - 1 && i != RECONNECTS - 1)
            continue;
        /* the watcher reads all of it: each message once, in order, and a
         * join and a leave per connection */
        int joins = 0, leaves = 0, want = i == WARMUP - 1 ? WARMUP : RECONNECTS - WARMUP;
        while (joins < want || leaves < want || next <= seen + 1) {
            char *t = ws_recv_text(w);
            if (starts_with(t, "{\"op\":\"join\",\"channel\":\"both:1\",\"client\":")) {
                joins++;
            } else if (starts_with(t, "{\"op\":\"leave\",\"channel\":\"both:1\",\"client\":")) {
                leaves++;
            } else {
                char *d = ht_asprintf("{\"op\":\"message\",\"channel\":\"both:1\",\"data\":"
                                      "{\"n\":%lld},\"offset\":%lld}", next, next);
                ck_assert_msg(!strcmp(t, d), "watcher: expected\n  %s\ngot\n  %s", d, t);
                free(d);
                next++;
            }
            free(t);
        }
        ck_assert_msg(joins == want && leaves == want, "%d joins, %d leaves for %d connections",
                      joins, leaves, want);
        ws_sync(w);
        hub_metric_wait(h, "luahub_connections", 2, HT_WAIT_MS);
        if (i == WARMUP - 1) {
            rss0 = ht_rss_kib(h->pid);
            for (size_t k = 0; k < NGAUGES; k++)
                g0[k] = hub_metric(h, gauges[k]);
        }
    }
    long rss1 = ht_rss_kib(h->pid);
    for (size_t k = 0; k < NGAUGES; k++)
        ck_assert_msg(hub_metric(h, gauges[k]) == g0[k], "%s went from %lld to %lld", gauges[k],
                      g0[k], hub_metric(h, gauges[k]));
    expect_stats(w, 2, "both:1", 1, 0);        /* the watcher alone */
    ck_assert_int_eq(g0[0], 1);                 /* one stream */
    ck_assert_int_eq(g0[2], 1);                 /* one presence channel: the watcher's */
    ck_assert_msg(rss1 - rss0 < 1024, "VmRSS grew from %ld to %ld KiB over %d reconnects",
                  rss0, rss1, RECONNECTS - WARMUP);
    ws_free(w);
    ws_free(pub);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Memory broker expiry                                                 */
/* ------------------------------------------------------------------ */

/* After history_ttl the messages are gone, the position stays (for
 * max(history_ttl, 7 days)): recovery from before the top is not possible,
 * from the top it is, and offsets go on in the same epoch. */
START_TEST(expiry_drops_messages_keeps_position)
{
    struct hub *h = start();
    struct pos p = {0};
    http_pubs(h, "ttl:1", 1, 3, &p);
    ck_assert_int_eq(hub_metric(h, "luahub_history_messages"), 3);
    hub_metric_wait(h, "luahub_history_messages", 0, 10000);
    ck_assert_int_eq(hub_metric(h, "luahub_history_streams"), 1);

    struct ws *a = ws_connect(h->port);
    sendf(a, "{\"op\":\"subscribe\",\"channel\":\"ttl:1\",\"id\":1,"
             "\"recover\":{\"offset\":1,\"epoch\":\"%s\"}}", p.epoch);
    reply_pos(a, 1, "ttl:1", 0, 0, 3, p.epoch, NULL);
    ws_sync(a);
    struct ws *b = ws_connect(h->port);
    sendf(b, "{\"op\":\"subscribe\",\"channel\":\"ttl:1\",\"id\":1,"
             "\"recover\":{\"offset\":3,\"epoch\":\"%s\"}}", p.epoch);
    reply_pos(b, 1, "ttl:1", 1, 0, 3, p.epoch, NULL);
    ws_sync(b);
    sendf(b, "{\"op\":\"history\",\"channel\":\"ttl:1\",\"id\":2}");
    char *want = ht_asprintf("{\"id\":2,\"ok\":true,\"channel\":\"ttl:1\",\"offset\":3,"
                             "\"epoch\":\"%s\",\"messages\":[],\"truncated\":false}", p.epoch);
    ws_expect(b, want);
    free(want);
    http_pub(h, "ttl:1", 4, p.epoch, NULL);
    expect_msg(a, "ttl:1", 4);
    expect_msg(b, "ttl:1", 4);
    ws_sync(a);
    ws_sync(b);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* A stream that was only read (nothing published) goes after history_ttl
 * entirely: the next one has a new epoch. Its subscriber is told with a
 * reset before the first delivery of the new stream; recovery with the old
 * epoch fails. */
START_TEST(expiry_of_unpublished_stream_new_epoch)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port);
    struct pos p1, p2;
    sub_hist(a, 1, "ttl:1", 0, NULL, &p1);
    ck_assert_int_eq(hub_metric(h, "luahub_history_streams"), 1);
    hub_metric_wait(h, "luahub_history_streams", 0, 10000);
    ck_assert_int_eq(hub_metric(h, "luahub_history_streams_expired_total"), 1);

    http_pub(h, "ttl:1", 1, NULL, &p2);
    ck_assert_str_ne(p1.epoch, p2.epoch);
    char *reset = ht_asprintf("{\"op\":\"reset\",\"channel\":\"ttl:1\",\"offset\":0,"
                              "\"epoch\":\"%s\"}", p2.epoch);
    ws_expect(a, reset);
    free(reset);
    expect_msg(a, "ttl:1", 1);
    ws_sync(a);

    struct ws *b = ws_connect(h->port);
    sendf(b, "{\"op\":\"subscribe\",\"channel\":\"ttl:1\",\"id\":1,"
             "\"recover\":{\"offset\":0,\"epoch\":\"%s\"}}", p1.epoch);
    reply_pos(b, 1, "ttl:1", 0, 0, 1, p2.epoch, NULL);
    ws_sync(b);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

static Suite *history_suite(void)
{
    Suite *s = suite_create("history");
    TCase *tc;
#define N(a) ((int)(sizeof(a) / sizeof *(a)))

    tc = tcase_create("offsets");
    tcase_add_test(tc, offsets_from_one_per_channel_ws_and_http);
    tcase_add_loop_test(tc, no_offset_without_history, 0, N(plain_channels));
    tcase_add_test(tc, subscribe_reply_has_top_and_stable_epoch);
    tcase_add_test(tc, subscribe_again_reply_has_position);
    tcase_add_test(tc, broadcast_gives_offsets);
    tcase_add_test(tc, policy_runs_before_history);
    tcase_add_loop_test(tc, rewind_gives_the_last_n, 0, N(rewinds));
    suite_add_tcase(s, tc);

    tc = tcase_create("recovery");
    tcase_add_test(tc, recover_after_disconnect);
    tcase_add_test(tc, recover_seam_no_gap_no_duplicate);
    tcase_add_loop_test(tc, recover_outcomes, 0, N(recovers));
    tcase_add_test(tc, replay_over_half_the_queue_not_recovered);
    suite_add_tcase(s, tc);

    tc = tcase_create("bad_input");
    tcase_add_loop_test(tc, bad_input, 0, N(bads));
    suite_add_tcase(s, tc);

    tc = tcase_create("history_op");
    tcase_add_loop_test(tc, history_op, 0, N(histories));
    tcase_add_test(tc, history_data_byte_exact);
    tcase_add_test(tc, history_truncated_to_half_the_queue);
    suite_add_tcase(s, tc);

    tc = tcase_create("presence");
    tcase_add_test(tc, presence_lists_client_user_info);
    tcase_add_test(tc, presence_stats_counts_clients_and_users);
    tcase_add_test(tc, presence_max_truncates_the_list);
    tcase_add_test(tc, join_leave_per_user_and_per_anonymous_connection);
    tcase_add_test(tc, leave_on_every_kind_of_disconnect);
    tcase_add_test(tc, presence_after_user_changes);
    tcase_add_test(tc, presence_answer_fits_the_queue);
    suite_add_tcase(s, tc);

    tc = tcase_create("http");
    tcase_add_loop_test(tc, http_history, 0, N(http_histories));
    tcase_add_loop_test(tc, http_bad_params, 0, N(http_bads));
    tcase_add_test(tc, http_presence);
    tcase_add_test(tc, http_routes_authenticated);
    suite_add_tcase(s, tc);

    tc = tcase_create("growth");
    tcase_add_test(tc, reconnect_loop_no_growth);
    suite_add_tcase(s, tc);

    tc = tcase_create("expiry");
    tcase_add_test(tc, expiry_drops_messages_keeps_position);
    tcase_add_test(tc, expiry_of_unpublished_stream_new_epoch);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(history_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
