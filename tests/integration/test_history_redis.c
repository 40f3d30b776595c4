/* Integration suite: history, recovery and presence through the real
 * binary with the redis broker (issue 11), against redis-servers this suite
 * starts itself on free loopback ports (no persistence, stopped by PID,
 * killed with the test):
 *
 *   - Redis restarted EMPTY while clients are subscribed: the hub tells
 *     them (reset, with the new epoch) and the next recovery says
 *     recovered:false with the new epoch;
 *   - Redis SIGSTOPped for 5 s during a publishing run across two hubs:
 *     every subscriber ends with every acknowledged message in offset
 *     order, or an explicit reset that covers it (counted);
 *   - a hub killed with -9 while its clients are in a presence channel:
 *     the other hub's subscribers get their leave events and the presence
 *     list shrinks (presence_ttl 2 s);
 *   - a client that reconnects 1,000 times with recovery: Redis keys and
 *     memory and the hub's RSS stay within a bound;
 *   - Redis stopped during a history read and a presence call: unavailable.
 *
 * Time is the subject only where the fault is (the 5 s stop); every other
 * wait is for an event, bounded. Numbers are printed as "[measure] ..."
 * lines, never asserted. */
#include <check.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hubtest.h"
#include "redistest.h"

#define LONG_WAIT_MS 30000

/* on_connect takes the user from ?user=. */
static const char POLICY[] =
    "function on_connect(conn, req) conn.user = req.query.user return true end\n";

/* A hub on the Redis of `s`, presence_ttl `ttl`: room:* with history,
 * pres:* with presence (join and leave), both:* with both. */
static struct hub *start_hub(const struct srv *s, unsigned ttl)
{
    char *policy = ht_tmpfile(POLICY);
    char conf[1200];
    snprintf(conf, sizeof(conf),
             "broker = \"redis://127.0.0.1:%d\"\n"
             "shutdown_timeout = 2\n"
             "max_queue_bytes = 16777216\n"
             "policy = \"%s\"\n"
             "presence_ttl = %u\n"
             "recover_max = 1000\n"
             "channels = {\n"
             "  [\"room:*\"] = { history_size = 100000, history_ttl = 600 },\n"
             "  [\"pres:*\"] = { presence = true, join_leave = true },\n"
             "  [\"both:*\"] = { history_size = 100, presence = true, join_leave = true },\n"
             "}\n",
             s->port, policy, ttl);
    struct hub *h = hub_start(conf);
    unlink(policy);                     /* read at the start */
    free(policy);
    return h;
}

static int healthz(struct hub *h)
{
    struct http_resp r;
    int st = http_request(h->port, "GET", "/healthz", NULL, NULL, &r);
    http_resp_free(&r);
    return st;
}

static void wait_healthz(struct hub *h, int want)
{
    int64_t dl = ht_now_ms() + LONG_WAIT_MS;
    int st;
    while ((st = healthz(h)) != want) {
        ck_assert_msg(ht_now_ms() < dl, "/healthz still %d, expected %d", st, want);
        sleep_ms(10);
    }
}

/* POST /api/publish; the status. */
static int api_publish(struct hub *h, const char *channel, const char *data)
{
    char body[512];
    snprintf(body, sizeof(body), "{\"channel\":\"%s\",\"data\":%s}", channel, data);
    struct http_resp r;
    int st = http_request(h->port, "POST", "/api/publish",
                          "Content-Type: application/json\r\n", body, &r);
    http_resp_free(&r);
    return st;
}

/* Sends `cmd` (JSON with "id":ID) and returns the reply with that id;
 * other messages before it (deliveries, events) go to `skipped` (counted). */
static yajl_val request(struct ws *c, const char *cmd, long long id, int *skipped)
{
    ws_send_text(c, cmd);
    for (;;) {
        yajl_val v = ws_recv_json(c);
        yajl_val i = json_get(v, "id");
        if (i && YAJL_IS_INTEGER(i) && YAJL_GET_INTEGER(i) == id)
            return v;
        if (skipped)
            (*skipped)++;
        yajl_tree_free(v);
    }
}

/* The subscribe reply's offset and epoch (new string). */
static uint64_t reply_pos(yajl_val v, char **epoch)
{
    yajl_val ok = json_get(v, "ok");
    ck_assert_msg(ok && YAJL_IS_TRUE(ok), "not ok");
    yajl_val off = json_get(v, "offset");
    const char *e = json_get_str(v, "epoch");
    ck_assert_msg(off && YAJL_IS_INTEGER(off) && e && *e, "no position in the reply");
    if (epoch)
        *epoch = strdup(e);
    return (uint64_t)YAJL_GET_INTEGER(off);
}

/* ------------------------------------------------------------------ */
/* Redis restarted empty                                                */
/* ------------------------------------------------------------------ */

START_TEST(restarted_empty_recovers_false_with_new_epoch)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    int port = r.port;
    struct hub *h = start_hub(&r, 60);
    wait_healthz(h, 200);
    struct ws *c = ws_connect(h->port);
    yajl_val v = request(c, "{\"op\":\"subscribe\",\"channel\":\"room:e\",\"id\":1}", 1, NULL);
    char *e0;
    ck_assert_uint_eq(reply_pos(v, &e0), 0);
    yajl_tree_free(v);
    for (int i = 1; i <= 3; i++) {
        char d[16];
        snprintf(d, sizeof(d), "%d", i);
        ck_assert_int_eq(api_publish(h, "room:e", d), 200);
        char want[128];
        snprintf(want, sizeof(want),
                 "{\"op\":\"message\",\"channel\":\"room:e\",\"data\":%d,\"offset\":%d}", i, i);
        ws_expect(c, want);
    }

    srv_kill(&r);
    srv_start(&r, port, NULL);
    wait_healthz(h, 200);
    /* the subscriber is told: the stream began again */
    v = ws_recv_json(c);
    ck_assert_str_eq(json_get_str(v, "op"), "reset");
    ck_assert_str_eq(json_get_str(v, "channel"), "room:e");
    const char *e1 = json_get_str(v, "epoch");
    ck_assert_str_ne(e1, e0);
    char *epoch1 = strdup(e1);
    ck_assert_int_eq(YAJL_GET_INTEGER(json_get(v, "offset")), 0);
    yajl_tree_free(v);
    ck_assert_int_eq(api_publish(h, "room:e", "\"after\""), 200);
    ws_expect(c, "{\"op\":\"message\",\"channel\":\"room:e\",\"data\":\"after\",\"offset\":1}");

    /* the next recovery from the old epoch: recovered false, new epoch */
    struct ws *c2 = ws_connect(h->port);
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "{\"op\":\"subscribe\",\"channel\":\"room:e\",\"id\":2,"
             "\"recover\":{\"offset\":3,\"epoch\":\"%s\"}}", e0);
    v = request(c2, cmd, 2, NULL);
    char *e2;
    ck_assert_uint_eq(reply_pos(v, &e2), 1);
    ck_assert_str_eq(e2, epoch1);
    ck_assert(YAJL_IS_FALSE(json_get(v, "recovered")));
    ck_assert_int_eq(YAJL_GET_INTEGER(json_get(v, "missed")), 0);
    yajl_tree_free(v);
    /* and from the new one it recovers */
    struct ws *c3 = ws_connect(h->port);
    snprintf(cmd, sizeof(cmd), "{\"op\":\"subscribe\",\"channel\":\"room:e\",\"id\":3,"
             "\"recover\":{\"offset\":0,\"epoch\":\"%s\"}}", epoch1);
    v = request(c3, cmd, 3, NULL);
    ck_assert(YAJL_IS_TRUE(json_get(v, "recovered")));
    ck_assert_int_eq(YAJL_GET_INTEGER(json_get(v, "missed")), 1);
    yajl_tree_free(v);
    ws_expect(c3, "{\"op\":\"message\",\"channel\":\"room:e\",\"data\":\"after\",\"offset\":1}");
    free(e0);
    free(e2);
    free(epoch1);
    ws_free(c);
    ws_free(c2);
    ws_free(c3);
    ck_assert_int_eq(hub_stop(h), 0);
    srv_stop(&r);
}
END_TEST

/* ------------------------------------------------------------------ */
/* SIGSTOP during a publishing run across two hubs                      */
/* ------------------------------------------------------------------ */

enum { S_NSUB = 4, S_MAXN = 100000 };

static struct {
    pthread_mutex_t mu;
    int stop;
} S = {PTHREAD_MUTEX_INITIALIZER, 0};

struct spub {
    struct hub *hub;
    int p;
    signed char *st;            /* per seq: 1 answered 200, -1 not */
    int n, nok;                 /* under S.mu */
};

struct ssub {
    struct ws *c;
    int hub;
    uint64_t last;              /* offset of the last delivery (or reset) */
    uint64_t *got[2];           /* per publisher, per seq: its offset, 0 if not received */
    struct { uint64_t from, to; } skip[64]; /* offsets (from, to] given up by resets */
    int nskip;
    int ends;
};

static struct spub sp[2];
static struct ssub ss[S_NSUB];

static void *s_publisher(void *arg)
{
    struct spub *p = arg;
    for (;;) {
        pthread_mutex_lock(&S.mu);
        int stop = S.stop || p->n >= S_MAXN;
        pthread_mutex_unlock(&S.mu);
        if (stop)
            break;
        char data[64];
        snprintf(data, sizeof(data), "{\"p\":%d,\"s\":%d}", p->p, p->n);
        int st = api_publish(p->hub, "room:s", data);
        ck_assert_msg(st == 200 || st == 503, "hub %d: publish answered %d", p->p, st);
        pthread_mutex_lock(&S.mu);
        p->st[p->n++] = st == 200 ? 1 : -1;
        p->nok += st == 200;
        pthread_mutex_unlock(&S.mu);
        if (st != 200)
            sleep_ms(2);                /* refused at once: do not spin */
    }
    return NULL;
}

/* A subscriber's view: deliveries must come in offset order with no gap
 * and no duplicate, except where a reset says where they go on. */
static void *s_reader(void *arg)
{
    struct ssub *s = arg;
    while (s->ends < 2) {
        struct ws_frame f;
        int r = ws_recv_msg(s->c, &f, LONG_WAIT_MS);
        ck_assert_msg(r == 1 && f.opcode == WS_TEXT, "subscriber on hub %d: no message (%d)",
                      s->hub, r);
        int p, q, n = 0;
        unsigned long long off;
        if (sscanf(f.data, "{\"op\":\"reset\",\"channel\":\"room:s\",\"offset\":%llu,%n", &off,
                   &n) == 1 && n > 0) {
            ck_assert_int_lt(s->nskip, 64);
            s->skip[s->nskip].from = s->last;
            s->skip[s->nskip++].to = off;
            s->last = off;
        } else {
            ck_assert_msg(sscanf(f.data, "{\"op\":\"message\",\"channel\":\"room:s\",\"data\":"
                                         "{\"p\":%d,\"s\":%d},\"offset\":%llu}%n",
                                 &p, &q, &off, &n) == 3 && (size_t)n == f.len && p >= 0 &&
                              p < 2 && q >= -1 && q < S_MAXN,
                          "subscriber on hub %d: unexpected %s", s->hub, f.data);
            ck_assert_msg(off == s->last + 1, "subscriber on hub %d: offset %llu after %llu "
                          "without a reset (%s)", s->hub, off, (unsigned long long)s->last,
                          f.data);
            s->last = off;
            if (q == -1)
                s->ends++;
            else
                s->got[p][q] = off;
        }
        ws_frame_free(&f);
    }
    return NULL;
}

static int s_nok(int p)
{
    pthread_mutex_lock(&S.mu);
    int n = sp[p].nok;
    pthread_mutex_unlock(&S.mu);
    return n;
}

/* Waits (bounded) until both publishers have `more` more 200s. */
static void s_more_ok(int more)
{
    int want[2] = {s_nok(0) + more, s_nok(1) + more};
    int64_t dl = ht_now_ms() + LONG_WAIT_MS;
    while (s_nok(0) < want[0] || s_nok(1) < want[1]) {
        ck_assert_msg(ht_now_ms() < dl, "publishes not answered 200 (%d, %d of %d, %d)",
                      s_nok(0), s_nok(1), want[0], want[1]);
        sleep_ms(5);
    }
}

/* The offset of each message the stream keeps, by publisher and seq. */
static void stream_offsets(const struct srv *r, uint64_t *off[2])
{
    redisReply *x = srv_cmd(r, "XRANGE luahub:history:room:s - +");
    ck_assert_int_eq(x->type, REDIS_REPLY_ARRAY);
    for (size_t i = 0; i < x->elements; i++) {
        const redisReply *e = x->element[i];
        int p, q;
        unsigned long long o;
        ck_assert_int_eq(sscanf(e->element[1]->element[1]->str,
                                "{\"op\":\"message\",\"channel\":\"room:s\",\"data\":{\"p\":%d,"
                                "\"s\":%d},\"offset\":%llu}", &p, &q, &o), 3);
        ck_assert_uint_eq(o, strtoull(e->element[0]->str, NULL, 10));
        if (q >= 0)
            off[p][q] = o;
    }
    freeReplyObject(x);
}

START_TEST(sigstop_5s_acknowledged_in_order_or_reset)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *hub[2] = {start_hub(&r, 60), start_hub(&r, 60)};
    wait_healthz(hub[0], 200);
    wait_healthz(hub[1], 200);
    S.stop = 0;
    pthread_t tp[2], ts[S_NSUB];
    for (int i = 0; i < S_NSUB; i++) {
        memset(&ss[i], 0, sizeof(ss[i]));
        ss[i].hub = i % 2;
        ss[i].c = ws_connect(hub[i % 2]->port);
        yajl_val v = request(ss[i].c, "{\"op\":\"subscribe\",\"channel\":\"room:s\",\"id\":1}", 1,
                             NULL);
        ss[i].last = reply_pos(v, NULL);
        yajl_tree_free(v);
        for (int p = 0; p < 2; p++)
            ss[i].got[p] = calloc(S_MAXN, sizeof(uint64_t));
        ck_assert_int_eq(pthread_create(&ts[i], NULL, s_reader, &ss[i]), 0);
    }
    for (int p = 0; p < 2; p++) {
        memset(&sp[p], 0, sizeof(sp[p]));
        sp[p].hub = hub[p];
        sp[p].p = p;
        sp[p].st = calloc(S_MAXN, 1);
        ck_assert_int_eq(pthread_create(&tp[p], NULL, s_publisher, &sp[p]), 0);
    }
    s_more_ok(100);

    srv_sigstop(&r);
    sleep_ms(5000);                     /* the fault itself */
    kill(r.pid, SIGCONT);
    wait_healthz(hub[0], 200);
    wait_healthz(hub[1], 200);
    s_more_ok(100);
    pthread_mutex_lock(&S.mu);
    S.stop = 1;
    pthread_mutex_unlock(&S.mu);
    for (int p = 0; p < 2; p++)
        ck_assert_int_eq(pthread_join(tp[p], NULL), 0);
    for (int p = 0; p < 2; p++) {
        char data[32];
        snprintf(data, sizeof(data), "{\"p\":%d,\"s\":-1}", p);
        int st = 0;
        for (int k = 0; k < 500 && (st = api_publish(hub[p], "room:s", data)) != 200; k++)
            sleep_ms(10);
        ck_assert_msg(st == 200, "hub %d: sentinel answered %d", p, st);
    }
    for (int i = 0; i < S_NSUB; i++)
        ck_assert_int_eq(pthread_join(ts[i], NULL), 0);

    uint64_t *off[2] = {calloc(S_MAXN, sizeof(uint64_t)), calloc(S_MAXN, sizeof(uint64_t))};
    stream_offsets(&r, off);
    int acked = 0, failed = 0, delivered = 0, excused = 0, resets = 0;
    for (int p = 0; p < 2; p++)
        for (int q = 0; q < sp[p].n; q++) {
            if (sp[p].st[q] != 1) {
                failed++;
                continue;
            }
            acked++;
            ck_assert_msg(off[p][q], "publisher %d seq %d: answered 200 but not in the stream",
                          p, q);
            for (int i = 0; i < S_NSUB; i++) {
                if (ss[i].got[p][q]) {
                    ck_assert_uint_eq(ss[i].got[p][q], off[p][q]);
                    delivered++;
                    continue;
                }
                int covered = 0;
                for (int k = 0; k < ss[i].nskip && !covered; k++)
                    covered = off[p][q] > ss[i].skip[k].from && off[p][q] <= ss[i].skip[k].to;
                ck_assert_msg(covered, "subscriber %d (hub %d) never got acknowledged message "
                              "%d/%d (offset %llu) and no reset covers it", i, ss[i].hub, p, q,
                              (unsigned long long)off[p][q]);
                excused++;
            }
        }
    for (int i = 0; i < S_NSUB; i++)
        resets += ss[i].nskip;
    printf("[measure] SIGSTOP 5 s, two hubs: %d publishes answered 200, %d not; %d "
           "deliveries of them in offset order, %d given up by %d resets; history reads "
           "(2 subscribes, then catch-ups) %lld and %lld\n", acked, failed, delivered, excused,
           resets, hub_metric(hub[0], "luahub_history_reads_total"),
           hub_metric(hub[1], "luahub_history_reads_total"));
    ck_assert_int_gt(failed, 0);            /* the stop was felt */
    for (int i = 0; i < S_NSUB; i++) {
        ws_free(ss[i].c);
        free(ss[i].got[0]);
        free(ss[i].got[1]);
    }
    for (int p = 0; p < 2; p++) {
        free(sp[p].st);
        free(off[p]);
    }
    ck_assert_int_eq(hub_stop(hub[0]), 0);
    ck_assert_int_eq(hub_stop(hub[1]), 0);
    srv_stop(&r);
}
END_TEST

/* ------------------------------------------------------------------ */
/* kill -9 of a hub with clients in a presence channel                  */
/* ------------------------------------------------------------------ */

/* Reads messages of `c` until one contains every needle (or fails). */
static char *expect_containing(struct ws *c, const char *a, const char *b)
{
    for (;;) {
        char *t = ws_recv_text(c);
        if (strstr(t, a) && (!b || strstr(t, b)))
            return t;
        free(t);
    }
}

static char *client_of(const struct ws *c)
{
    yajl_val v = json_parse(c->welcome);
    char *id = strdup(json_get_str(v, "client"));
    yajl_tree_free(v);
    return id;
}

START_TEST(kill9_hub_clients_leave)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *a = start_hub(&r, 2), *b = start_hub(&r, 2);
    wait_healthz(a, 200);
    wait_healthz(b, 200);
    struct ws_opts oo = {.path = "/ws?user=olga"};
    struct ws *obs = ws_connect_opts(b->port, &oo);
    yajl_val v = request(obs, "{\"op\":\"subscribe\",\"channel\":\"pres:p\",\"id\":1}", 1, NULL);
    yajl_tree_free(v);
    free(expect_containing(obs, "\"op\":\"join\"", "\"user\":\"olga\""));

    struct ws_opts ao = {.path = "/ws?user=alice"};
    struct ws *a1 = ws_connect_opts(a->port, &ao), *a2 = ws_connect_opts(a->port, &ao);
    struct ws *anon = ws_connect(a->port);
    char *anon_id = client_of(anon);
    struct ws *on_a[3] = {a1, a2, anon};
    for (int i = 0; i < 3; i++) {
        v = request(on_a[i], "{\"op\":\"subscribe\",\"channel\":\"pres:p\",\"id\":1}", 1, NULL);
        yajl_tree_free(v);
    }
    free(expect_containing(obs, "\"op\":\"join\"", "\"user\":\"alice\""));
    free(expect_containing(obs, "\"op\":\"join\"", anon_id));
    v = request(obs, "{\"op\":\"presence_stats\",\"channel\":\"pres:p\",\"id\":2}", 2, NULL);
    ck_assert_int_eq(YAJL_GET_INTEGER(json_get(v, "clients")), 4);
    ck_assert_int_eq(YAJL_GET_INTEGER(json_get(v, "users")), 2);
    yajl_tree_free(v);

    hub_signal(a, SIGKILL);
    ck_assert_int_eq(hub_wait_exit(a, HT_WAIT_MS), 128 + SIGKILL);
    int64_t t0 = ht_now_ms();
    /* alice's leave once (her last connection), the anonymous one's */
    int leaves = 0, alice = 0, anon_left = 0;
    while (leaves < 2) {
        char *t = ws_recv_text(obs);
        ck_assert_msg(!strstr(t, "\"op\":\"join\""), "a join after the kill: %s", t);
        if (strstr(t, "\"op\":\"leave\"")) {
            leaves++;
            alice += strstr(t, "\"user\":\"alice\"") != NULL;
            anon_left += strstr(t, anon_id) != NULL;
        }
        free(t);
    }
    printf("[measure] kill -9 of a hub: its clients' leave events after %lld ms "
           "(presence_ttl 2 s)\n", (long long)(ht_now_ms() - t0));
    ck_assert_int_eq(alice, 1);
    ck_assert_int_eq(anon_left, 1);
    v = request(obs, "{\"op\":\"presence\",\"channel\":\"pres:p\",\"id\":3}", 3, NULL);
    yajl_val list = json_get(v, "clients");
    ck_assert(list && YAJL_IS_ARRAY(list));
    ck_assert_int_eq((int)YAJL_GET_ARRAY(list)->len, 1);
    ck_assert_str_eq(json_get_str(YAJL_GET_ARRAY(list)->values[0], "user"), "olga");
    yajl_tree_free(v);
    v = request(obs, "{\"op\":\"presence_stats\",\"channel\":\"pres:p\",\"id\":4}", 4, NULL);
    ck_assert_int_eq(YAJL_GET_INTEGER(json_get(v, "clients")), 1);
    ck_assert_int_eq(YAJL_GET_INTEGER(json_get(v, "users")), 1);
    yajl_tree_free(v);
    /* exactly once: nothing more comes */
    v = request(obs, "{\"op\":\"ping\",\"id\":5}", 5, &leaves);
    yajl_tree_free(v);
    ck_assert_int_eq(leaves, 2);
    free(anon_id);
    for (int i = 0; i < 3; i++)
        ws_free(on_a[i]);
    ws_free(obs);
    hub_stop(a);
    ck_assert_int_eq(hub_stop(b), 0);
    srv_stop(&r);
}
END_TEST

/* ------------------------------------------------------------------ */
/* 1,000 reconnects with recovery                                       */
/* ------------------------------------------------------------------ */

static long long rss_kb(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    long long kb = -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "VmRSS: %lld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

static long long dbsize(const struct srv *r)
{
    redisReply *x = srv_cmd(r, "DBSIZE");
    long long n = x->integer;
    freeReplyObject(x);
    return n;
}

START_TEST(thousand_reconnects_no_growth)
{
    /* Freed memory goes back at once under ASan (no quarantine), so RSS
     * measures what is kept. */
    setenv("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:quarantine_size_mb=0", 1);
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start_hub(&r, 60);
    wait_healthz(h, 200);
    /* the registry's instance key is there from the first heartbeat on */
    hub_metric_wait(h, "luahub_registry_heartbeat_up", 1, HT_WAIT_MS);
    struct ws *obs = ws_connect(h->port);
    yajl_val v = request(obs, "{\"op\":\"subscribe\",\"channel\":\"both:r\",\"id\":1}", 1, NULL);
    char *epoch;
    uint64_t top = reply_pos(v, &epoch);
    yajl_tree_free(v);
    long long keys0 = 0, mem0 = 0, rss0 = 0;
    int published = 0, recovered = 0;
    for (int i = 0; i < 1000; i++) {
        if (i % 10 == 5) {
            ck_assert_int_eq(api_publish(h, "both:r", "\"m\""), 200);
            published++;
        }
        struct ws *c = ws_connect(h->port);
        char cmd[256];
        snprintf(cmd, sizeof(cmd), "{\"op\":\"subscribe\",\"channel\":\"both:r\",\"id\":1,"
                 "\"recover\":{\"offset\":%llu,\"epoch\":\"%s\"}}", (unsigned long long)top,
                 epoch);
        v = request(c, cmd, 1, NULL);
        ck_assert_msg(YAJL_IS_TRUE(json_get(v, "recovered")), "round %d: not recovered", i);
        long long missed = YAJL_GET_INTEGER(json_get(v, "missed"));
        uint64_t now = reply_pos(v, NULL);
        ck_assert_uint_eq(now, top + (uint64_t)missed);
        yajl_tree_free(v);
        for (long long k = 0; k < missed; k++) {
            char want[128];
            snprintf(want, sizeof(want),
                     "{\"op\":\"message\",\"channel\":\"both:r\",\"data\":\"m\",\"offset\":%llu}",
                     (unsigned long long)(top + (uint64_t)k + 1));
            ws_expect(c, want);
        }
        recovered += missed > 0;
        top = now;
        ws_free(c);
        if (i == 199 || i == 999) {
            /* the observer's presence read comes after the last removal */
            v = request(obs, "{\"op\":\"presence_stats\",\"channel\":\"both:r\",\"id\":2}", 2,
                        NULL);
            ck_assert_int_eq(YAJL_GET_INTEGER(json_get(v, "clients")), 1);
            yajl_tree_free(v);
            long long keys = dbsize(&r), mem = srv_info(&r, "memory", "used_memory");
            long long rss = rss_kb(h->pid);
            if (i == 199) {
                keys0 = keys, mem0 = mem, rss0 = rss;
                continue;
            }
            printf("[measure] reconnects 200 -> 1000 with recovery: Redis keys %lld -> %lld, "
                   "used_memory %lld -> %lld B, hub RSS %lld -> %lld kB\n", keys0, keys, mem0,
                   mem, rss0, rss);
            if (keys != keys0) {
                redisReply *x = srv_cmd(&r, "KEYS *");
                for (size_t k = 0; k < x->elements; k++)
                    fprintf(stderr, "key %s\n", x->element[k]->str);
                freeReplyObject(x);
            }
            ck_assert_int_eq(keys, keys0);
            ck_assert_int_lt(mem - mem0, 1 << 20);
            ck_assert_int_lt(rss - rss0, 4096);
        }
    }
    ck_assert_int_eq(published, 100);
    ck_assert_int_ge(recovered, 90);
    free(epoch);
    ws_free(obs);
    ck_assert_int_eq(hub_stop(h), 0);
    srv_stop(&r);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Redis stopped during a history read and a presence call               */
/* ------------------------------------------------------------------ */

START_TEST(reads_unavailable_while_redis_stopped)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    char conf[512];
    snprintf(conf, sizeof(conf),
             "broker = \"redis://127.0.0.1:%d?command_timeout_ms=500\"\n"
             "shutdown_timeout = 2\n"
             "channels = { [\"room:*\"] = { history_size = 10, presence = true } }\n", r.port);
    struct hub *h = hub_start(conf);
    wait_healthz(h, 200);
    struct ws *c = ws_connect(h->port);
    yajl_val v = request(c, "{\"op\":\"subscribe\",\"channel\":\"room:u\",\"id\":1}", 1, NULL);
    yajl_tree_free(v);
    srv_sigstop(&r);
    /* in flight when Redis stops answering: unavailable, not a hang */
    ws_send_text(c, "{\"op\":\"history\",\"channel\":\"room:u\",\"id\":2}");
    ws_send_text(c, "{\"op\":\"presence\",\"channel\":\"room:u\",\"id\":3}");
    free(ws_expect_error(c, "2", "unavailable"));
    free(ws_expect_error(c, "3", "unavailable"));
    /* and while it is down, at once */
    wait_healthz(h, 503);
    ws_send_text(c, "{\"op\":\"presence_stats\",\"channel\":\"room:u\",\"id\":4}");
    free(ws_expect_error(c, "4", "unavailable"));
    kill(r.pid, SIGCONT);
    wait_healthz(h, 200);
    v = request(c, "{\"op\":\"history\",\"channel\":\"room:u\",\"id\":5}", 5, NULL);
    ck_assert(YAJL_IS_TRUE(json_get(v, "ok")));
    yajl_tree_free(v);
    ws_free(c);
    ck_assert_int_eq(hub_stop(h), 0);
    srv_stop(&r);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("history_redis");
    TCase *tc = tcase_create("history_redis");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, restarted_empty_recovers_false_with_new_epoch);
    tcase_add_test(tc, sigstop_5s_acknowledged_in_order_or_reset);
    tcase_add_test(tc, kill9_hub_clients_leave);
    tcase_add_test(tc, thousand_reconnects_no_growth);
    tcase_add_test(tc, reads_unavailable_while_redis_stopped);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
