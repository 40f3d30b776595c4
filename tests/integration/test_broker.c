/* The broker contract suite.
 *
 * One set of tests runs against both implementations (loop index 0: memory,
 * 1: redis against a redis-server this suite starts on a free loopback
 * port). The redis-only tests break things on purpose: Redis absent at
 * start, killed and restarted, SIGSTOPped, the subscriber connection killed,
 * a wrong password, a server that never answers, 10,000 channels at once,
 * two shards, stop() with work in flight.
 *
 * Rules: every wait is bounded (WAIT), the tests drive the uv loop
 * themselves (UV_RUN_ONCE with a 5 ms tick), no fixed ports, every
 * redis-server is ours (started here, stopped by PID, killed with us via
 * PR_SET_PDEATHSIG). "Nothing was delivered" is proven with a sentinel:
 * a later PUBLISH on the same connection whose delivery is waited for
 * (Redis keeps the order of one connection's commands and of one
 * subscriber's messages). Numbers are printed as "[measure] ...", never
 * asserted. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <uv.h>

#include "luahub/broker.h"
#include "luahub/hash.h"
#include "luahub/msg.h"
#include "luahub/util.h"

#define WAIT_MS 15000
#define NBROKERS 4

#include "redistest.h"

static long long numsub(const struct srv *s, const char *channel)
{
    redisReply *r = srv_cmd(s, "PUBSUB NUMSUB %s", channel);
    ck_assert_int_eq(r->type, REDIS_REPLY_ARRAY);
    ck_assert_int_eq((int)r->elements, 2);
    long long v = r->element[1]->integer;
    freeReplyObject(r);
    return v;
}

/* Channels subscribed in Redis, not counting the brokers' own probe
 * channels (one per broker and server: "luahub:!probe:<random>"). */
static long long hub_channels(const struct srv *s)
{
    redisReply *r = srv_cmd(s, "PUBSUB CHANNELS luahub:!probe:*");
    ck_assert_int_eq(r->type, REDIS_REPLY_ARRAY);
    long long probes = (long long)r->elements;
    freeReplyObject(r);
    return srv_info(s, "stats", "pubsub_channels") - probes;
}

/* ------------------------------------------------------------------ */
/* The loop, the brokers, what they deliver                            */
/* ------------------------------------------------------------------ */

struct dlv {
    char *ch;
    size_t chlen;
    char *data;
    size_t len;
    const void *mptr;       /* identity only: the frame is gone by now */
};

/* Plays the hub: it keeps the deliveries of the channels it has subscribed
 * (sub() / unsub() below), like the hub's channel registry, and counts the
 * others, which a broker may hand over (memory: every publish; the redis
 * broker must not: env_finish checks). */
struct sink_sub {
    struct hub_hnode node;
    char name[];
};

struct sink {
    struct dlv *d;
    size_t n, cap;
    int ups, downs;
    int bad_frames;
    struct hub_htable subs;     /* struct sink_sub by name */
    unsigned unsubscribed;      /* deliveries of channels not subscribed */
};

static struct sink_sub *sink_find(const struct sink *s, const char *ch, size_t len)
{
    uint64_t h = hub_hash64(ch, len);
    for (struct hub_hnode *n = hub_htable_chain(&s->subs, h); n; n = n->next) {
        struct sink_sub *x = hub_container_of(n, struct sink_sub, node);
        if (n->hash == h && strlen(x->name) == len && !memcmp(x->name, ch, len))
            return x;
    }
    return NULL;
}

static struct {
    uv_loop_t loop;
    uv_timer_t tick;
    struct hub_broker *b[NBROKERS];
    struct sink sink[NBROKERS];
    struct srv srv[2];
    int impl;               /* contract tests: 0 memory, 1 redis */
    unsigned sync_seq;
    char logpath[64];
    int saved_stderr;
} T;

/* Runs the loop until `cond` holds or `ms` pass; evaluates to cond. */
#define WAIT(cond, ms) LOOP_WAIT(&T.loop, &T.tick, cond, ms)

/* Runs the loop for `ms` (only where time itself is the subject: "stays
 * down", "retries while absent"). */
static void pump(int ms)
{
    (void)WAIT(0, ms);
}

static void on_deliver(void *ud, const char *channel, size_t len, struct hub_msg *m,
                       const char *epoch)
{
    (void)epoch;
    struct sink *s = ud;
    if (!sink_find(s, channel, len)) {
        s->unsubscribed++;
        return;
    }
    /* A sealed text frame: FIN|TEXT, then the shortest length encoding. */
    const unsigned char *f = hub_msg_frame(m);
    size_t pl = m->payload_len, hl = pl < 126 ? 2 : pl <= 0xffff ? 4 : 10;
    if (f[0] != 0x81 || m->frame_len != hl + pl || f + hl != hub_msg_payload(m) || m->refs < 1)
        s->bad_frames++;
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->d = realloc(s->d, s->cap * sizeof(*s->d));
        ck_assert(s->d != NULL);
    }
    struct dlv *d = &s->d[s->n++];
    d->ch = malloc(len + 1);
    memcpy(d->ch, channel, len);
    d->ch[len] = '\0';
    d->chlen = len;
    d->data = malloc(pl + 1);
    memcpy(d->data, hub_msg_payload(m), pl);
    d->data[pl] = '\0';
    d->len = pl;
    d->mptr = m;
}

static void on_health(void *ud, int up)
{
    struct sink *s = ud;
    if (up)
        s->ups++;
    else
        s->downs++;
}

static void sink_clear(struct sink *s)
{
    for (size_t i = 0; i < s->n; i++) {
        free(s->d[i].ch);
        free(s->d[i].data);
    }
    s->n = 0;
}

/* Deliveries on `ch` with exactly `data` (NULL: any). */
static int count(int bi, const char *ch, const char *data)
{
    struct sink *s = &T.sink[bi];
    int n = 0;
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->d[i].ch, ch) == 0 && (!data || strcmp(s->d[i].data, data) == 0))
            n++;
    return n;
}

static void env_init(void)
{
    memset(&T, 0, sizeof(T));
    T.saved_stderr = -1;
    ck_assert_int_eq(uv_loop_init(&T.loop), 0);
    uv_timer_init(&T.loop, &T.tick);
    signal(SIGPIPE, SIG_IGN); /* hiredis writes with write() */
}

static struct hub_broker *mk(int bi, const char *url)
{
    char err[512] = "";
    T.b[bi] = hub_broker_new(&T.loop, url, NULL, on_deliver, on_health, &T.sink[bi], err,
                             sizeof(err));
    ck_assert_msg(T.b[bi] != NULL, "hub_broker_new(%s): %s", url, err);
    return T.b[bi];
}

static const char *url_of(const struct srv *s, const char *extra)
{
    static char buf[4][256];
    static int k;
    char *u = buf[k++ & 3];
    if (s->pass[0])
        snprintf(u, 256, "redis://:%s@127.0.0.1:%d%s", s->pass, s->port, extra ? extra : "");
    else
        snprintf(u, 256, "redis://127.0.0.1:%d%s", s->port, extra ? extra : "");
    return u;
}

static void wait_up(int bi)
{
    ck_assert_msg(WAIT(T.b[bi]->ops->up(T.b[bi]), WAIT_MS), "broker %d not up within %d ms",
                  bi, WAIT_MS);
}

/* Stops every broker, drains the loop (bounded), frees, closes the loop. */
static void env_finish(void)
{
    for (int i = 0; i < NBROKERS; i++)
        if (T.b[i])
            T.b[i]->ops->stop(T.b[i]);
    uv_close((uv_handle_t *)&T.tick, NULL);
    int64_t dl = now_ms() + WAIT_MS;
    while (uv_loop_alive(&T.loop) && now_ms() < dl)
        uv_run(&T.loop, UV_RUN_NOWAIT);
    ck_assert_msg(!uv_loop_alive(&T.loop), "the loop did not drain after stop()");
    for (int i = 0; i < NBROKERS; i++) {
        /* The redis broker delivers only what is subscribed upstream. */
        if (T.b[i] && T.b[i]->ops->local == 0)
            ck_assert_msg(T.sink[i].unsubscribed == 0, "broker %d delivered %u messages of "
                          "channels not subscribed", i, T.sink[i].unsubscribed);
        if (T.b[i])
            T.b[i]->ops->free(T.b[i]);
        T.b[i] = NULL;
        sink_clear(&T.sink[i]);
        free(T.sink[i].d);
        struct hub_hnode *n;
        while ((n = hub_htable_pop(&T.sink[i].subs)))
            free(hub_container_of(n, struct sink_sub, node));
        hub_htable_free(&T.sink[i].subs);
    }
    ck_assert_int_eq(uv_loop_close(&T.loop), 0);
    for (int i = 0; i < 2; i++)
        srv_stop(&T.srv[i]);
}

/* Broker logs go to stderr; tests that check them capture it in a file. */
static void log_capture(void)
{
    snprintf(T.logpath, sizeof(T.logpath), "/tmp/brokertest-log.XXXXXX");
    int fd = mkstemp(T.logpath);
    ck_assert(fd >= 0);
    fflush(stderr);
    T.saved_stderr = dup(2);
    dup2(fd, 2);
    close(fd);
}

static char *log_text(void)
{
    fflush(stderr);
    FILE *f = fopen(T.logpath, "r");
    ck_assert(f != NULL);
    size_t cap = 1 << 16, len = 0;
    char *s = malloc(cap);
    size_t n;
    while ((n = fread(s + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (cap - len < 4096)
            s = realloc(s, cap *= 2);
    }
    s[len] = '\0';
    fclose(f);
    return s;
}

static int log_count(const char *needle)
{
    char *s = log_text();
    int n = 0;
    for (const char *p = s; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    free(s);
    return n;
}

/* The captured log's tail, for failure messages (static buffer). */
static const char *log_tail(void)
{
    static char tail[1600];
    char *s = log_text();
    size_t n = strlen(s);
    snprintf(tail, sizeof(tail), "%s", n > 1500 ? s + n - 1500 : s);
    free(s);
    return tail;
}

static void log_release(void)
{
    if (T.saved_stderr < 0)
        return;
    fflush(stderr);
    dup2(T.saved_stderr, 2);
    close(T.saved_stderr);
    T.saved_stderr = -1;
    if (getenv("BROKER_TEST_LOG")) {
        char *s = log_text();
        fputs(s, stderr);
        free(s);
    }
    unlink(T.logpath);
}

/* ------------------------------------------------------------------ */
/* Publish / subscribe helpers                                         */
/* ------------------------------------------------------------------ */

struct pres {
    int calls;
    int status;
    int64_t t_pub, t_cb;
};

static void on_pub(void *ud, int status, const struct hub_stream_pos *pos)
{
    (void)pos;
    struct pres *r = ud;
    r->calls++;
    r->status = status;
    r->t_cb = now_ms();
}

static int pub_n(int bi, const char *ch, const void *data, size_t len, struct pres *r)
{
    struct hub_msg *m = hub_msg_text(data, len);
    if (r)
        r->t_pub = now_ms();
    int rc = T.b[bi]->ops->publish(T.b[bi], ch, strlen(ch), m, NULL, r ? on_pub : NULL, r);
    hub_msg_unref(m);
    return rc;
}

static int pub(int bi, const char *ch, const char *data, struct pres *r)
{
    return pub_n(bi, ch, data, strlen(data), r);
}

/* Publishes accepted (rcs[i] == 0) whose completion has not come yet. */
static int incomplete(const int *rcs, const struct pres *r, int n)
{
    int c = 0;
    for (int i = 0; i < n; i++)
        c += rcs[i] == 0 && r[i].calls == 0;
    return c;
}

/* Publishes and waits for the completion, which must be OK. */
static void pub_ok(int bi, const char *ch, const char *data)
{
    struct pres r = {0};
    ck_assert_int_eq(pub(bi, ch, data, &r), 0);
    ck_assert_msg(WAIT(r.calls > 0, WAIT_MS), "publish to %s not completed", ch);
    ck_assert_int_eq(r.calls, 1);
    ck_assert_int_eq(r.status, HUB_OK);
}

struct sres {
    int calls;
    int status;
};

static void on_sub(void *ud, int status)
{
    struct sres *r = ud;
    r->calls++;
    r->status = status;
}

static void sub(int bi, const char *ch, struct sres *r)
{
    struct sink *s = &T.sink[bi];
    size_t len = strlen(ch);
    if (!sink_find(s, ch, len)) {
        struct sink_sub *x = malloc(sizeof(*x) + len + 1);
        ck_assert_ptr_nonnull(x);
        memcpy(x->name, ch, len + 1);
        x->node.hash = hub_hash64(ch, len);
        hub_htable_insert(&s->subs, &x->node);
    }
    T.b[bi]->ops->subscribe(T.b[bi], ch, strlen(ch), r ? on_sub : NULL, r);
}

static void unsub(int bi, const char *ch)
{
    struct sink *s = &T.sink[bi];
    struct sink_sub *x = sink_find(s, ch, strlen(ch));
    if (x) {
        hub_htable_remove(&s->subs, &x->node);
        free(x);
    }
    T.b[bi]->ops->unsubscribe(T.b[bi], ch, strlen(ch));
}

static int calls_of(const struct sres *r, int n)
{
    int c = 0;
    for (int i = 0; i < n; i++)
        c += r[i].calls;
    return c;
}

static void sub_ok(int bi, const char *ch)
{
    struct sres r = {0};
    sub(bi, ch, &r);
    ck_assert_msg(WAIT(r.calls > 0, WAIT_MS), "subscribe %s not confirmed", ch);
    ck_assert_int_eq(r.calls, 1);
    ck_assert_int_eq(r.status, HUB_OK);
}

/* Proves that everything `from` published before has reached sink `to`:
 * a token on the subscribed "__sync" channel, waited for. */
static void sync_to(int from, int to)
{
    char tok[32];
    snprintf(tok, sizeof(tok), "\"sync-%u\"", ++T.sync_seq);
    pub_ok(from, "__sync", tok);
    ck_assert_msg(WAIT(count(to, "__sync", tok) == 1, WAIT_MS), "sync token %s not delivered",
                  tok);
}

static const char *impl_name(void)
{
    return T.impl ? "redis" : "memory";
}

/* Contract fixture: broker 0 of the implementation `_i`, up, subscribed to
 * "__sync". */
static void contract_setup(int impl)
{
    env_init();
    T.impl = impl;
    if (impl) {
        srv_start(&T.srv[0], 0, NULL);
        mk(0, url_of(&T.srv[0], NULL));
        wait_up(0);
    } else {
        mk(0, "memory");
        ck_assert_int_eq(T.b[0]->ops->up(T.b[0]), 1);
    }
    sub_ok(0, "__sync");
}

/* ------------------------------------------------------------------ */
/* Contract: both implementations                                      */
/* ------------------------------------------------------------------ */

START_TEST(t_publish_delivered_once_exact)
{
    contract_setup(_i);
    sub_ok(0, "room:1");
    /* Sizes around the frame header encodings (7-bit, 16-bit, 64-bit
     * lengths) and every byte value. */
    static const size_t sizes[] = {0, 1, 125, 126, 65535, 65536, 200000};
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        size_t n = sizes[k];
        unsigned char *p = malloc(n + 1);
        for (size_t i = 0; i < n; i++)
            p[i] = (unsigned char)(i * 7 + k);
        size_t before = T.sink[0].n;
        struct pres r = {0};
        ck_assert_int_eq(pub_n(0, "room:1", p, n, &r), 0);
        ck_assert_msg(WAIT(r.calls > 0 && T.sink[0].n > before, WAIT_MS),
                      "%s: %zu-byte message not delivered", impl_name(), n);
        sync_to(0, 0);
        ck_assert_int_eq(r.calls, 1);
        ck_assert_int_eq(r.status, HUB_OK);
        /* exactly one delivery (plus the sync token) */
        ck_assert_uint_eq(T.sink[0].n, before + 2);
        struct dlv *d = &T.sink[0].d[before];
        ck_assert_str_eq(d->ch, "room:1");
        ck_assert_uint_eq(d->len, n);
        ck_assert_msg(memcmp(d->data, p, n) == 0, "%s: payload of %zu bytes differs",
                      impl_name(), n);
        free(p);
    }
    ck_assert_int_eq(T.sink[0].bad_frames, 0);
    env_finish();
}
END_TEST

START_TEST(t_memory_delivers_same_frame)
{
    contract_setup(0);
    sub_ok(0, "a");
    struct hub_msg *m = hub_msg_text("{\"x\":1}", 7);
    struct pres r = {0};
    /* Memory: delivered inside publish(), the very frame, then completed. */
    ck_assert_int_eq(T.b[0]->ops->publish(T.b[0], "a", 1, m, NULL, on_pub, &r), 0);
    ck_assert_int_eq(r.calls, 1);
    ck_assert_int_eq(r.status, HUB_OK);
    ck_assert_uint_eq(T.sink[0].n, 1);
    ck_assert_ptr_eq(T.sink[0].d[0].mptr, m);
    ck_assert_int_eq(m->refs, 1); /* the broker kept no reference */
    hub_msg_unref(m);
    env_finish();
}
END_TEST

START_TEST(t_not_delivered_after_unsubscribe)
{
    contract_setup(_i);
    sub_ok(0, "a");
    pub_ok(0, "a", "1");
    sync_to(0, 0);
    ck_assert_int_eq(count(0, "a", "1"), 1);
    unsub(0, "a");
    pub_ok(0, "a", "2");
    sync_to(0, 0);
    ck_assert_int_eq(count(0, "a", NULL), 1);
    /* and it can come back */
    sub_ok(0, "a");
    pub_ok(0, "a", "3");
    sync_to(0, 0);
    ck_assert_int_eq(count(0, "a", "3"), 1);
    ck_assert_int_eq(count(0, "a", "2"), 0);
    env_finish();
}
END_TEST

START_TEST(t_ordering_per_channel)
{
    contract_setup(_i);
    enum { N = 4000 };
    sub_ok(0, "x");
    sub_ok(0, "y");
    static struct pres r[2 * N];
    memset(r, 0, sizeof(r));
    int64_t t0 = now_ms();
    for (int i = 0; i < N; i++) {
        char buf[32];
        snprintf(buf, sizeof(buf), "%d", i);
        ck_assert_int_eq(pub(0, "x", buf, &r[2 * i]), 0);
        ck_assert_int_eq(pub(0, "y", buf, &r[2 * i + 1]), 0);
    }
    ck_assert_msg(WAIT(count(0, "x", NULL) == N && count(0, "y", NULL) == N, WAIT_MS),
                  "%s: %d/%d delivered", impl_name(), count(0, "x", NULL), count(0, "y", NULL));
    int64_t t1 = now_ms();
    for (int i = 0; i < 2 * N; i++) {
        ck_assert_int_eq(r[i].calls, 1);
        ck_assert_int_eq(r[i].status, HUB_OK);
    }
    int nx = 0, ny = 0;
    for (size_t i = 0; i < T.sink[0].n; i++) {
        struct dlv *d = &T.sink[0].d[i];
        int *next = strcmp(d->ch, "x") == 0 ? &nx : strcmp(d->ch, "y") == 0 ? &ny : NULL;
        if (!next)
            continue;
        ck_assert_int_eq(atoi(d->data), *next);
        (*next)++;
    }
    ck_assert_int_eq(nx, N);
    ck_assert_int_eq(ny, N);
    printf("[measure] %s: %d publishes on 2 channels, all delivered in %lld ms\n", impl_name(),
           2 * N, (long long)(t1 - t0));
    env_finish();
}
END_TEST

START_TEST(t_many_channels)
{
    contract_setup(_i);
    enum { N = 1000 };
    static struct sres sr[N];
    memset(sr, 0, sizeof(sr));
    char name[32];
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "ch.%d", i);
        sub(0, name, &sr[i]);
    }
    ck_assert(WAIT(calls_of(sr, N) == N, WAIT_MS));
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "ch.%d", i);
        ck_assert_int_eq(sr[i].calls, 1);
        ck_assert_int_eq(sr[i].status, HUB_OK);
        char data[32];
        snprintf(data, sizeof(data), "\"m%d\"", i);
        ck_assert_int_eq(pub(0, name, data, NULL), 0);
    }
    ck_assert(WAIT(T.sink[0].n >= N, WAIT_MS));
    sync_to(0, 0);
    ck_assert_uint_eq(T.sink[0].n, N + 1);
    for (int i = 0; i < N; i++) {
        char data[32];
        snprintf(name, sizeof(name), "ch.%d", i);
        snprintf(data, sizeof(data), "\"m%d\"", i);
        ck_assert_int_eq(count(0, name, data), 1);
    }
    env_finish();
}
END_TEST

START_TEST(t_subscribe_callback_semantics)
{
    contract_setup(_i);
    /* Several calls for one channel before any confirmation: each fires
     * once, OK, and the channel is subscribed once upstream. */
    struct sres a = {0}, b = {0}, c = {0};
    sub(0, "multi", &a);
    sub(0, "multi", &b);
    sub(0, "multi", &c);
    ck_assert(WAIT(a.calls && b.calls && c.calls, WAIT_MS));
    ck_assert_int_eq(a.calls + b.calls + c.calls, 3);
    ck_assert_int_eq(a.status, HUB_OK);
    ck_assert_int_eq(b.status, HUB_OK);
    ck_assert_int_eq(c.status, HUB_OK);
    if (T.impl)
        ck_assert_int_eq(numsub(&T.srv[0], "luahub:multi"), 1);
    /* Already confirmed: the callback may come at once, still once. */
    struct sres d = {0};
    sub(0, "multi", &d);
    ck_assert(WAIT(d.calls, WAIT_MS));
    ck_assert_int_eq(d.calls, 1);
    ck_assert_int_eq(d.status, HUB_OK);
    /* NULL callback is allowed. */
    sub(0, "nocb", NULL);
    /* Once subscribed, a publish is delivered once (not once per call). */
    pub_ok(0, "multi", "1");
    sync_to(0, 0);
    ck_assert_int_eq(count(0, "multi", "1"), 1);
    /* One unsubscribe ends it, however many subscribes came before. */
    unsub(0, "multi");
    pub_ok(0, "multi", "2");
    sync_to(0, 0);
    ck_assert_int_eq(count(0, "multi", "2"), 0);

    /* subscribe then unsubscribe before the confirmation: the callback
     * fires once (memory: OK at once; redis: CANCELED) and the channel
     * ends unsubscribed. */
    struct sres e = {0};
    sub(0, "flap", &e);
    unsub(0, "flap");
    ck_assert_int_eq(e.calls, 1);
    ck_assert(e.status == (T.impl ? HUB_ECANCELED : HUB_OK));
    pub_ok(0, "flap", "x");
    sync_to(0, 0);
    ck_assert_int_eq(count(0, "flap", NULL), 0);
    if (T.impl)
        ck_assert_int_eq(numsub(&T.srv[0], "luahub:flap"), 0);

    /* The same after the SUBSCRIBE went out (redis: in flight). */
    struct sres f = {0};
    sub(0, "flap2", &f);
    uv_run(&T.loop, UV_RUN_NOWAIT); /* the batch is flushed, not confirmed */
    unsub(0, "flap2");
    ck_assert_int_eq(f.calls, 1);
    pub_ok(0, "flap2", "x");
    sync_to(0, 0);
    ck_assert_int_eq(count(0, "flap2", NULL), 0);
    if (T.impl)
        ck_assert(WAIT(numsub(&T.srv[0], "luahub:flap2") == 0, WAIT_MS));

    /* subscribe, unsubscribe, subscribe, all before confirmation: ends
     * subscribed; only the last callback reports OK. */
    struct sres g1 = {0}, g2 = {0};
    sub(0, "flap3", &g1);
    uv_run(&T.loop, UV_RUN_NOWAIT);
    unsub(0, "flap3");
    uv_run(&T.loop, UV_RUN_NOWAIT);
    sub(0, "flap3", &g2);
    ck_assert(WAIT(g2.calls, WAIT_MS));
    ck_assert_int_eq(g1.calls, 1);
    ck_assert_int_eq(g2.calls, 1);
    ck_assert_int_eq(g2.status, HUB_OK);
    pub_ok(0, "flap3", "y");
    sync_to(0, 0);
    ck_assert_int_eq(count(0, "flap3", "y"), 1);
    if (T.impl)
        ck_assert_int_eq(numsub(&T.srv[0], "luahub:flap3"), 1);
    env_finish();
}
END_TEST

START_TEST(t_publish_nobody_subscribed)
{
    contract_setup(_i);
    pub_ok(0, "nobody", "{\"a\":1}");
    sync_to(0, 0);
    ck_assert_int_eq(count(0, "nobody", NULL), 0);
    ck_assert_uint_eq(T.sink[0].n, 1); /* the sync token only */
    /* fire and forget is allowed */
    ck_assert_int_eq(pub(0, "nobody", "2", NULL), 0);
    sync_to(0, 0);
    ck_assert_uint_eq(T.sink[0].n, 2);
    env_finish();
}
END_TEST

START_TEST(t_after_stop)
{
    contract_setup(_i);
    T.b[0]->ops->stop(T.b[0]);
    T.b[0]->ops->stop(T.b[0]); /* idempotent */
    struct pres r = {0};
    ck_assert_int_eq(pub(0, "a", "1", &r), HUB_EUNAVAILABLE);
    struct sres s = {0};
    sub(0, "a", &s);
    ck_assert_int_eq(s.calls, 1);
    ck_assert_int_eq(s.status, HUB_EUNAVAILABLE);
    unsub(0, "a");
    pump(20);
    ck_assert_int_eq(r.calls, 0);
    env_finish();
}
END_TEST

START_TEST(t_metrics_text)
{
    contract_setup(_i);
    struct hub_buf out = {0};
    T.b[0]->ops->metrics(T.b[0], &out);
    ck_assert_msg(strstr(out.p, "\nluahub_broker_up 1\n") != NULL, "%s", out.p);
    if (T.impl)
        ck_assert_ptr_nonnull(strstr(out.p, "luahub_broker_channels 1\n"));
    if (T.impl) {
        pub_ok(0, "a", "1");
        hub_buf_reset(&out);
        T.b[0]->ops->metrics(T.b[0], &out);
        ck_assert_ptr_nonnull(strstr(out.p, "luahub_broker_reconnects_total 0\n"));
        ck_assert_ptr_nonnull(strstr(out.p, "luahub_broker_publish_errors_total 0\n"));
        ck_assert_ptr_nonnull(strstr(out.p, "luahub_broker_pending_publishes 0\n"));
        ck_assert_ptr_nonnull(strstr(out.p, "luahub_broker_redis_rtt_seconds_count 1\n"));
        ck_assert_ptr_nonnull(strstr(out.p, "luahub_broker_redis_rtt_seconds_bucket{le=\"+Inf\"} 1\n"));
    }
    hub_buf_free(&out);
    ck_assert_str_eq(T.b[0]->ops->name, T.impl ? "redis" : "memory");
    env_finish();
}
END_TEST

/* ------------------------------------------------------------------ */
/* Redis only                                                          */
/* ------------------------------------------------------------------ */

static long long metric(int bi, const char *series)
{
    struct hub_buf out = {0};
    T.b[bi]->ops->metrics(T.b[bi], &out);
    char needle[160];
    snprintf(needle, sizeof(needle), "\n%s ", series);
    const char *p = strstr(out.p, needle);
    ck_assert_msg(p != NULL, "metric %s missing:\n%s", series, out.p);
    long long v = strtoll(p + strlen(needle), NULL, 10);
    hub_buf_free(&out);
    return v;
}

START_TEST(t_redis_cross_broker)
{
    /* Two brokers on one Redis stand for two hub processes. */
    env_init();
    srv_start(&T.srv[0], 0, NULL);
    mk(0, url_of(&T.srv[0], NULL));
    mk(1, url_of(&T.srv[0], NULL));
    wait_up(0);
    wait_up(1);
    sub_ok(0, "x");
    enum { N = 2000 };
    static struct pres r[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++) {
        char buf[16];
        snprintf(buf, sizeof(buf), "%d", i);
        ck_assert_int_eq(pub(1, "x", buf, &r[i]), 0);
    }
    ck_assert(WAIT(count(0, "x", NULL) == N, WAIT_MS));
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(r[i].calls, 1);
        ck_assert_int_eq(r[i].status, HUB_OK);
        ck_assert_int_eq(atoi(T.sink[0].d[i].data), i);
    }
    ck_assert_uint_eq(T.sink[1].n, 0); /* the publisher is not subscribed */
    /* Now both subscribed: each gets every message once, the publisher's
     * own process too (it comes back through Redis, not twice). */
    sub_ok(1, "x");
    pub_ok(1, "x", "both");
    sub_ok(1, "__sync");
    sub_ok(0, "__sync");
    sync_to(1, 1);
    sync_to(1, 0);
    ck_assert_int_eq(count(0, "x", "both"), 1);
    ck_assert_int_eq(count(1, "x", "both"), 1);
    /* A subscriber that got OK receives what another process publishes
     * right after. */
    struct sres s = {0};
    sub(0, "fresh", &s);
    ck_assert(WAIT(s.calls, WAIT_MS));
    ck_assert_int_eq(s.status, HUB_OK);
    pub_ok(1, "fresh", "first");
    ck_assert(WAIT(count(0, "fresh", "first") == 1, WAIT_MS));

    long long n = metric(1, "luahub_broker_redis_rtt_seconds_count");
    struct hub_buf out = {0};
    T.b[1]->ops->metrics(T.b[1], &out);
    const char *p = strstr(out.p, "luahub_broker_redis_rtt_seconds_sum ");
    double sum = p ? strtod(p + 36, NULL) : 0;
    hub_buf_free(&out);
    printf("[measure] PUBLISH round trip (queued to reply, pipelined bursts included): "
           "mean %.1f us over %lld\n",
           n ? sum / (double)n * 1e6 : 0.0, n);
    env_finish();
}
END_TEST

START_TEST(t_redis_rtt_sequential)
{
    /* One PUBLISH at a time: the latency a lone publisher sees, to a
     * channel nobody here subscribed, then to one this broker subscribed
     * (OK waits for the probe behind it to come back: docs/internals.md). */
    env_init();
    srv_start(&T.srv[0], 0, NULL);
    mk(0, url_of(&T.srv[0], NULL));
    wait_up(0);
    sub_ok(0, "rtt-self");
    enum { N = 2000 };
    const char *chans[2] = {"rtt", "rtt-self"};
    for (int k = 0; k < 2; k++) {
        long long probes0 = metric(0, "luahub_broker_probes_total");
        int64_t t0 = now_ms();
        uint64_t ns0 = uv_hrtime();
        for (int i = 0; i < N; i++) {
            struct pres r = {0};
            ck_assert_int_eq(pub(0, chans[k], "{\"n\":1}", &r), 0);
            ck_assert(WAIT(r.calls, WAIT_MS));
            ck_assert_int_eq(r.status, HUB_OK);
        }
        uint64_t ns = uv_hrtime() - ns0;
        printf("[measure] sequential PUBLISH round trip, %s: %.1f us mean over %d (%lld ms "
               "total, %lld probes)\n",
               k ? "subscribed here (waits for the probe)" : "not subscribed here",
               (double)ns / N / 1e3, N, (long long)(now_ms() - t0),
               metric(0, "luahub_broker_probes_total") - probes0);
    }
    ck_assert(WAIT(count(0, "rtt-self", NULL) == N, WAIT_MS));
    env_finish();
}
END_TEST

START_TEST(t_redis_not_running_at_start)
{
    env_init();
    log_capture();
    int port = free_port();
    struct srv *s = &T.srv[0];
    s->port = port;
    mk(0, url_of(s, NULL));
    pump(700);
    ck_assert_int_eq(T.b[0]->ops->up(T.b[0]), 0);
    ck_assert_int_eq(T.sink[0].ups, 0);
    ck_assert_msg(log_count("connection refused, retrying in") >= 4, "log:\n%s", log_tail());
    /* fail fast while down */
    struct pres r = {0};
    ck_assert_int_eq(pub(0, "a", "1", &r), HUB_EUNAVAILABLE);
    /* a subscription made meanwhile: reported unavailable, but kept */
    struct sres sr = {0};
    sub(0, "a", &sr);
    ck_assert_int_eq(sr.calls, 1);
    ck_assert_int_eq(sr.status, HUB_EUNAVAILABLE);
    sub(0, "__sync", NULL);
    pump(100);
    ck_assert_int_eq(r.calls, 0);

    srv_start(s, port, NULL);
    ck_assert_msg(WAIT(T.sink[0].ups == 1, WAIT_MS), "not up after Redis appeared:\n%s",
                  log_tail());
    ck_assert_int_eq(T.b[0]->ops->up(T.b[0]), 1);
    pub_ok(0, "a", "hello");
    ck_assert(WAIT(count(0, "a", "hello") == 1, WAIT_MS));
    ck_assert_int_eq(numsub(s, "luahub:a"), 1);
    ck_assert_msg(log_count(": connected") >= 1, "log:\n%s", log_tail());
    log_release();
    env_finish();
}
END_TEST

START_TEST(t_redis_killed_and_restarted)
{
    env_init();
    log_capture();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, NULL);
    int port = s->port;
    mk(0, url_of(s, NULL));
    wait_up(0);
    enum { NCH = 20, MAXP = 40000 };
    char name[NCH][16];
    for (int c = 0; c < NCH; c++) {
        snprintf(name[c], sizeof(name[c]), "k%d", c);
        sub_ok(0, name[c]);
    }
    static struct pres r[MAXP];
    static int rc_sync[MAXP];
    static int after_kill[MAXP];
    memset(r, 0, sizeof(r));
    int np = 0, killed = 0;
    int64_t t0 = now_ms(), t_kill = 0;
    /* traffic: one message per channel per iteration, seq in the data */
    while (np + NCH <= MAXP) {
        int64_t t = now_ms();
        if (!killed && t - t0 >= 300) {
            srv_kill(s); /* reaped: from here on nothing can reach Redis */
            killed = 1;
            t_kill = now_ms();
        }
        if (killed && t - t_kill >= 600)
            break;
        for (int c = 0; c < NCH; c++) {
            char data[32];
            snprintf(data, sizeof(data), "%d", np);
            after_kill[np] = killed;
            rc_sync[np] = pub(0, name[c], data, &r[np]);
            np++;
        }
        uv_run(&T.loop, UV_RUN_NOWAIT);
        sleep_ms(2);
    }
    pump(200);
    ck_assert_int_eq(T.b[0]->ops->up(T.b[0]), 0);
    int ok_before = 0, failed_after = 0;
    for (int i = 0; i < np; i++) {
        if (rc_sync[i] == 0) {
            ck_assert_msg(r[i].calls == 1, "publish %d completed %d times", i, r[i].calls);
        } else {
            ck_assert_int_eq(rc_sync[i], HUB_EUNAVAILABLE);
            ck_assert_int_eq(r[i].calls, 0);
        }
        int ok = rc_sync[i] == 0 && r[i].status == HUB_OK;
        if (after_kill[i]) {
            ck_assert_msg(!ok, "publish %d, issued with Redis dead, reported OK", i);
            failed_after++;
        } else if (ok) {
            ok_before++;
        }
    }
    ck_assert_int_gt(ok_before, 0);
    ck_assert_int_gt(failed_after, 0);

    srv_start(s, port, NULL);
    ck_assert_msg(WAIT(T.b[0]->ops->up(T.b[0]), WAIT_MS), "not up after restart:\n%s",
                  log_tail());
    ck_assert_int_ge(metric(0, "luahub_broker_reconnects_total"), 2);
    /* delivery resumes on every channel without new subscribe calls */
    size_t before = T.sink[0].n;
    for (int c = 0; c < NCH; c++)
        pub_ok(0, name[c], "\"back\"");
    ck_assert(WAIT(T.sink[0].n - before == NCH, WAIT_MS));
    for (int c = 0; c < NCH; c++)
        ck_assert_int_eq(count(0, name[c], "\"back\""), 1);
    /* no duplicates, in order, per channel */
    for (int c = 0; c < NCH; c++) {
        int last = -1;
        for (size_t i = 0; i < T.sink[0].n; i++) {
            struct dlv *d = &T.sink[0].d[i];
            if (strcmp(d->ch, name[c]) != 0 || d->data[0] == '"')
                continue;
            int v = atoi(d->data);
            ck_assert_int_gt(v, last);
            ck_assert_int_eq(after_kill[v], 0);
            last = v;
        }
    }
    ck_assert_msg(log_count("connection lost") >= 2, "log:\n%s", log_tail());
    printf("[measure] kill -9 + restart: %d publishes, %d OK before the kill, %d failed after\n",
           np, ok_before, failed_after);
    log_release();
    env_finish();
}
END_TEST

START_TEST(t_redis_sigstop)
{
    env_init();
    log_capture();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, NULL);
    enum { CAP = 300 };
    char extra[160];
    snprintf(extra, sizeof(extra),
             "?command_timeout_ms=300&connect_timeout_ms=300&max_pending=%d"
             "&max_pending_bytes=1048576",
             CAP);
    mk(0, url_of(s, extra));
    wait_up(0);
    sub_ok(0, "s");
    pub_ok(0, "s", "before");

    kill(s->pid, SIGSTOP);
    int64_t dl = now_ms() + 2000;
    while (proc_state(s->pid) != 'T' && now_ms() < dl)
        sleep_ms(1);
    ck_assert_int_eq(proc_state(s->pid), 'T');
    int64_t t_stop = now_ms();

    enum { MAXP = 200000 };
    static struct pres r[MAXP];
    static int rcs[MAXP];
    memset(r, 0, sizeof(r));
    char payload[1024];
    memset(payload, 'p', sizeof(payload) - 1);
    payload[sizeof(payload) - 1] = '\0';
    int np = 0, sync_fail = 0;
    long long max_pending = 0;
    while (now_ms() - t_stop < 2000 && np + 50 <= MAXP) {
        for (int k = 0; k < 50; k++) {
            rcs[np] = pub(0, "s", payload, &r[np]);
            if (rcs[np] != 0)
                sync_fail++;
            np++;
        }
        long long p = metric(0, "luahub_broker_pending_publishes");
        if (p > max_pending)
            max_pending = p;
        uv_run(&T.loop, UV_RUN_NOWAIT);
        sleep_ms(5);
    }
    ck_assert_int_eq(T.b[0]->ops->up(T.b[0]), 0);
    kill(s->pid, SIGCONT);
    int64_t t_cont = now_ms();

    /* Nothing published while Redis was stopped was reported OK (the
     * command connection was dropped at the first timeout: 300 ms). */
    int timed_out = 0;
    ck_assert(WAIT(incomplete(rcs, r, np) == 0, WAIT_MS));
    for (int i = 0; i < np; i++) {
        if (rcs[i] != 0) {
            ck_assert_int_eq(r[i].calls, 0);
            continue;
        }
        ck_assert_int_eq(r[i].calls, 1);
        ck_assert_msg(r[i].status != HUB_OK, "publish %d during SIGSTOP reported OK", i);
        if (r[i].t_cb - r[i].t_pub >= 250)
            timed_out++;
    }
    ck_assert_int_le(max_pending, CAP);
    ck_assert_int_gt(sync_fail, 0);    /* the cap made publishes fail fast */
    ck_assert_int_gt(timed_out, 0);    /* and the command timeout fired */
    ck_assert_msg(log_count("not answered within 300 ms") >= 1, "log:\n%s", log_tail());

    ck_assert_msg(WAIT(T.b[0]->ops->up(T.b[0]), WAIT_MS), "not up after SIGCONT:\n%s",
                  log_tail());
    int64_t t_up = now_ms();
    pub_ok(0, "s", "after");
    ck_assert(WAIT(count(0, "s", "after") == 1, WAIT_MS));
    printf("[measure] SIGSTOP 2 s: %d publishes tried, %d refused at once (cap %d), %d timed "
           "out, max pending %lld; up again %lld ms after SIGCONT\n",
           np, sync_fail, CAP, timed_out, max_pending, (long long)(t_up - t_cont));
    log_release();
    env_finish();
}
END_TEST

/* The id of the subscriber connection with the most subscriptions
 * (CLIENT LIST TYPE pubsub); it must be the only one with that many. */
static long long busiest_sub_client(const struct srv *s)
{
    redisReply *r = srv_cmd(s, "CLIENT LIST TYPE pubsub");
    ck_assert_int_eq(r->type, REDIS_REPLY_STRING);
    long long id = -1;
    int best = -1, ties = 0;
    for (char *line = r->str; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        const char *sp = strstr(line, " sub=");
        if (sp && strncmp(line, "id=", 3) == 0) {
            int n = atoi(sp + 5);
            if (n > best) {
                best = n;
                ties = 0;
                id = strtoll(line + 3, NULL, 10);
            } else if (n == best) {
                ties++;
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    freeReplyObject(r);
    ck_assert_msg(id >= 0 && ties == 0, "no single busiest subscriber connection");
    return id;
}

START_TEST(t_redis_ok_means_own_copy_received)
{
    /* Two brokers on one Redis, both subscribed to "x". Twice Redis
     * answers broker 0's PUBLISH with a count >= 1 while broker 0's own
     * subscriber connection never gets the message: that publish must not
     * be OK (docs/internals.md). */
    env_init();
    log_capture();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, NULL);
    mk(0, url_of(s, NULL));
    mk(1, url_of(s, NULL));
    wait_up(0);
    wait_up(1);
    const char *mine[] = {"x", "a1", "a2", "a3"};
    for (int i = 0; i < 4; i++)
        sub_ok(0, mine[i]);
    sub_ok(1, "x");
    pub_ok(0, "x", "\"before\"");
    ck_assert(WAIT(count(0, "x", "\"before\"") == 1 && count(1, "x", "\"before\"") == 1,
                   WAIT_MS));

    /* 1. Broker 0's subscriber connection is killed (broker 1's stays) and
     * broker 0 publishes before its loop has seen the EOF: Redis answers 1
     * (broker 1). */
    long long id = busiest_sub_client(s);   /* broker 0's: x a1 a2 a3 */
    redisReply *k = srv_cmd(s, "CLIENT KILL ID %lld", id);
    ck_assert_int_eq(k->type, REDIS_REPLY_INTEGER);
    ck_assert_int_eq(k->integer, 1);
    freeReplyObject(k);
    struct pres r = {0};
    ck_assert_int_eq(pub(0, "x", "\"lost\"", &r), 0);
    ck_assert(WAIT(r.calls == 1 && count(1, "x", "\"lost\"") == 1, WAIT_MS));
    ck_assert_msg(r.status == HUB_EUNAVAILABLE,
                  "publish OK although this broker's subscription was gone (delivered here "
                  "%d times)", count(0, "x", "\"lost\""));
    ck_assert_int_eq(count(0, "x", "\"lost\""), 0);

    /* 2. Redis counts both subscribers, then closes them for their output
     * buffer limit without writing the message (a reply over the client's
     * 16 KB buffer goes to its list, which the limit counts). */
    wait_up(0);
    wait_up(1);
    freeReplyObject(srv_cmd(s, "CONFIG SET client-output-buffer-limit %s", "pubsub 1024 0 0"));
    static char big[65536];
    memset(big, 'b', sizeof(big) - 1);
    big[0] = big[sizeof(big) - 2] = '"';
    big[sizeof(big) - 1] = '\0';
    memset(&r, 0, sizeof(r));
    ck_assert_int_eq(pub(0, "x", big, &r), 0);
    ck_assert(WAIT(r.calls == 1, WAIT_MS));
    ck_assert_msg(r.status == HUB_EUNAVAILABLE,
                  "publish OK although Redis closed this broker's subscription before "
                  "writing the message (delivered here %d times)", count(0, "x", big));
    ck_assert_int_eq(count(0, "x", big), 0);
    freeReplyObject(srv_cmd(s, "CONFIG SET client-output-buffer-limit %s",
                            "pubsub 33554432 8388608 60"));

    /* both recover by themselves and deliver again */
    ck_assert(WAIT(T.b[0]->ops->up(T.b[0]) && T.b[1]->ops->up(T.b[1]), WAIT_MS));
    pub_ok(0, "x", "\"after\"");
    ck_assert(WAIT(count(0, "x", "\"after\"") == 1 && count(1, "x", "\"after\"") == 1,
                   WAIT_MS));
    ck_assert_int_ge(metric(0, "luahub_broker_publish_refused_total{reason=\"not_received\"}"),
                     2);
    log_release();
    env_finish();
}
END_TEST

START_TEST(t_redis_sigstop_noticed_without_traffic)
{
    /* Nothing published, nothing subscribed or unsubscribed: the liveness
     * probe still notices a Redis that stopped answering (TCP stays up). */
    env_init();
    log_capture();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, NULL);
    mk(0, url_of(s, "?command_timeout_ms=300&connect_timeout_ms=300"));
    wait_up(0);
    sub_ok(0, "idle");
    kill(s->pid, SIGSTOP);
    int64_t dl = now_ms() + 2000;
    while (proc_state(s->pid) != 'T' && now_ms() < dl)
        sleep_ms(1);
    ck_assert_int_eq(proc_state(s->pid), 'T');
    ck_assert_msg(WAIT(!T.b[0]->ops->up(T.b[0]), 5000),
                  "still up 5 s after Redis stopped answering:\n%s", log_tail());
    ck_assert_int_eq(T.sink[0].downs, 1);
    ck_assert_msg(log_count("within 300 ms") >= 1, "log:\n%s", log_tail());
    struct pres r = {0};
    ck_assert_int_eq(pub(0, "idle", "1", &r), HUB_EUNAVAILABLE);
    kill(s->pid, SIGCONT);
    ck_assert_msg(WAIT(T.b[0]->ops->up(T.b[0]), WAIT_MS), "not up after SIGCONT:\n%s",
                  log_tail());
    pub_ok(0, "idle", "2");
    ck_assert(WAIT(count(0, "idle", "2") == 1, WAIT_MS));
    log_release();
    env_finish();
}
END_TEST

START_TEST(t_redis_client_kill_pubsub)
{
    env_init();
    log_capture();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, NULL);
    mk(0, url_of(s, NULL));
    wait_up(0);
    ck_assert_int_eq(T.sink[0].ups, 1);
    enum { NCH = 50 };
    char name[NCH][16];
    for (int c = 0; c < NCH; c++) {
        snprintf(name[c], sizeof(name[c]), "p%d", c);
        sub(0, name[c], NULL);
    }
    sub_ok(0, "__sync");
    redisReply *rep = srv_cmd(s, "CLIENT KILL TYPE pubsub");
    ck_assert_int_eq(rep->type, REDIS_REPLY_INTEGER);
    ck_assert_int_eq(rep->integer, 1);
    freeReplyObject(rep);
    /* down, then up again with every channel re-subscribed */
    ck_assert_msg(WAIT(T.sink[0].downs == 1 && T.sink[0].ups == 2, WAIT_MS), "log:\n%s",
                  log_tail());
    ck_assert_int_eq(metric(0, "luahub_broker_reconnects_total"), 1);
    for (int c = 0; c < NCH; c++)
        pub_ok(0, name[c], "\"again\"");
    sync_to(0, 0);
    for (int c = 0; c < NCH; c++)
        ck_assert_int_eq(count(0, name[c], "\"again\""), 1);
    ck_assert_int_eq(hub_channels(s), NCH + 1);
    ck_assert_msg(log_count("(pubsub): connection lost") == 1, "log:\n%s", log_tail());
    log_release();
    env_finish();
}
END_TEST

START_TEST(t_redis_wrong_password)
{
    env_init();
    log_capture();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, "s3cret");
    char url[200];
    snprintf(url, sizeof(url), "redis://:wrong@127.0.0.1:%d", s->port);
    mk(0, url);
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", s->port);
    mk(1, url);
    pump(1000);
    ck_assert_int_eq(T.b[0]->ops->up(T.b[0]), 0);
    ck_assert_int_eq(T.b[1]->ops->up(T.b[1]), 0);
    ck_assert_int_eq(T.sink[0].ups + T.sink[1].ups, 0);
    /* clear errors, repeated (it keeps retrying with backoff) */
    ck_assert_msg(log_count("AUTH failed (wrong password in the broker URL?): WRONGPASS") >= 4,
                  "log:\n%s", log_tail());
    ck_assert_msg(log_count("needs a password") >= 2, "log:\n%s", log_tail());
    ck_assert_msg(log_count("ERROR") >= 4, "log:\n%s", log_tail());
    struct pres r = {0};
    ck_assert_int_eq(pub(0, "a", "1", &r), HUB_EUNAVAILABLE);
    /* the right password, both URL forms (Redis 6 ACL user, and a db) */
    snprintf(url, sizeof(url), "redis://:s3cret@127.0.0.1:%d", s->port);
    mk(2, url);
    snprintf(url, sizeof(url), "redis://default:s3%%63ret@127.0.0.1:%d/2", s->port);
    mk(3, url);
    wait_up(2);
    wait_up(3);
    sub_ok(2, "pw");
    pub_ok(3, "pw", "ok");
    ck_assert(WAIT(count(2, "pw", "ok") == 1, WAIT_MS));
    log_release();
    env_finish();
}
END_TEST

START_TEST(t_redis_10k_channels)
{
    env_init();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, NULL);
    mk(0, url_of(s, NULL));
    wait_up(0);
    redisReply *rep = srv_cmd(s, "CONFIG RESETSTAT");
    freeReplyObject(rep);
    enum { N = 10000 };
    static struct sres sr[N];
    memset(sr, 0, sizeof(sr));
    char name[32];
    uint64_t t0 = uv_hrtime();
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "room:%d", i);
        sub(0, name, &sr[i]);
    }
    ck_assert(WAIT(calls_of(sr, N) == N, 30000));
    uint64_t t1 = uv_hrtime();
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(sr[i].calls, 1);
        ck_assert_int_eq(sr[i].status, HUB_OK);
    }
    long long subs = srv_calls(s, "subscribe");
    ck_assert_int_eq(hub_channels(s), N);
    ck_assert_msg(subs > 0 && subs <= N / 500 + 2, "%lld SUBSCRIBE commands for %d channels",
                  subs, N);
    /* every one delivers */
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "room:%d", i);
        ck_assert_int_eq(pub(0, name, "1", NULL), 0);
        if (i % 2000 == 1999)
            ck_assert(WAIT(T.sink[0].n == (size_t)i + 1, WAIT_MS));
    }
    ck_assert(WAIT(T.sink[0].n == N, WAIT_MS));
    uint64_t t2 = uv_hrtime();
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "room:%d", i);
        unsub(0, name);
    }
    ck_assert(WAIT(hub_channels(s) == 0, WAIT_MS));
    uint64_t t3 = uv_hrtime();
    long long unsubs = srv_calls(s, "unsubscribe");
    ck_assert_msg(unsubs > 0 && unsubs <= N / 500 + 2, "%lld UNSUBSCRIBE commands", unsubs);
    printf("[measure] 10000 channels: subscribed+confirmed in %.1f ms (%lld SUBSCRIBE "
           "commands), unsubscribed in %.1f ms (%lld UNSUBSCRIBE)\n",
           (double)(t1 - t0) / 1e6, subs, (double)(t3 - t2) / 1e6, unsubs);
    env_finish();
}
END_TEST

START_TEST(t_redis_sharding)
{
    env_init();
    srv_start(&T.srv[0], 0, NULL);
    srv_start(&T.srv[1], 0, NULL);
    char url[200];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d, redis://127.0.0.1:%d", T.srv[0].port,
             T.srv[1].port);
    mk(0, url);
    wait_up(0);
    for (int k = 0; k < 2; k++)
        freeReplyObject(srv_cmd(&T.srv[k], "CONFIG RESETSTAT"));
    enum { N = 200 };
    char name[N][16];
    int per[2] = {0, 0};
    for (int i = 0; i < N; i++) {
        snprintf(name[i], sizeof(name[i]), "sh%d", i);
        per[hub_broker_shard(name[i], strlen(name[i]), 2)]++;
        sub(0, name[i], NULL);
    }
    ck_assert(WAIT(hub_channels(&T.srv[0]) + hub_channels(&T.srv[1]) == N, WAIT_MS));
    ck_assert_int_gt(per[0], N / 4);
    ck_assert_int_gt(per[1], N / 4);
    for (int k = 0; k < 2; k++)
        ck_assert_int_eq(hub_channels(&T.srv[k]), per[k]);
    for (int i = 0; i < N; i++) {
        char full[32];
        snprintf(full, sizeof(full), "luahub:%.15s", name[i]);
        int k = (int)hub_broker_shard(name[i], strlen(name[i]), 2);
        ck_assert_int_eq(numsub(&T.srv[k], full), 1);
        ck_assert_int_eq(numsub(&T.srv[1 - k], full), 0);
    }
    /* publish twice to each: both go to the channel's shard, delivered */
    for (int rep = 0; rep < 2; rep++)
        for (int i = 0; i < N; i++)
            ck_assert_int_eq(pub(0, name[i], "1", NULL), 0);
    ck_assert(WAIT(T.sink[0].n == 2 * N, WAIT_MS));
    for (int i = 0; i < N; i++)
        ck_assert_int_eq(count(0, name[i], "1"), 2);
    /* (plus the probes that acknowledge them, on both servers) */
    long long probes = metric(0, "luahub_broker_probes_total");
    for (int k = 0; k < 2; k++) {
        ck_assert_int_ge(srv_calls(&T.srv[k], "publish"), 2 * per[k]);
        ck_assert_int_le(srv_calls(&T.srv[k], "publish"), 2 * per[k] + probes);
    }
    /* one shard down: only its channels fail; health is down */
    srv_kill(&T.srv[1]);
    ck_assert(WAIT(T.sink[0].downs == 1, WAIT_MS));
    /* (a publish may still be accepted by the dying connection's socket and
     * fail in its callback: count final outcomes) */
    static struct pres r[N];
    static int rcs[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++)
        rcs[i] = pub(0, name[i], "2", &r[i]);
    ck_assert(WAIT(incomplete(rcs, r, N) == 0, WAIT_MS));
    int ok = 0, failed = 0;
    for (int i = 0; i < N; i++) {
        int k = (int)hub_broker_shard(name[i], strlen(name[i]), 2);
        int good = rcs[i] == 0 && r[i].status == HUB_OK;
        if (k == 1)
            failed += !good;
        else
            ok += good;
    }
    ck_assert_int_eq(ok, per[0]);
    ck_assert_int_eq(failed, per[1]);
    printf("[measure] sharding 200 channels over 2 servers: %d / %d\n", per[0], per[1]);
    env_finish();
}
END_TEST

static struct hub_broker *stop_me;
static int stop_calls[2];

static void on_pub_stop(void *ud, int status, const struct hub_stream_pos *pos)
{
    (void)pos;
    struct pres *r = ud;
    r->calls++;
    r->status = status;
    /* a user callback that stops the broker from inside a completion */
    if (stop_me) {
        stop_calls[0]++;
        stop_me->ops->stop(stop_me);
    }
}

START_TEST(t_redis_stop_with_pending)
{
    env_init();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, NULL);
    mk(0, url_of(s, NULL));
    mk(1, url_of(s, NULL));
    mk(2, "redis://localhost:1"); /* resolving / refused, never up */
    wait_up(0);
    wait_up(1);
    enum { NS = 10, NP = 500 };
    static struct sres sr[NS];
    static struct pres pr[NP];
    memset(sr, 0, sizeof(sr));
    memset(pr, 0, sizeof(pr));
    for (int i = 0; i < NS; i++) {
        char name[16];
        snprintf(name, sizeof(name), "w%d", i);
        sub(0, name, &sr[i]);
    }
    for (int i = 0; i < NP; i++)
        ck_assert_int_eq(pub(0, "w0", "{\"big\":true}", &pr[i]), 0);
    T.b[0]->ops->stop(T.b[0]);
    /* every callback fired once, UNAVAILABLE, before stop() returned */
    for (int i = 0; i < NS; i++) {
        ck_assert_int_eq(sr[i].calls, 1);
        ck_assert_int_eq(sr[i].status, HUB_EUNAVAILABLE);
    }
    for (int i = 0; i < NP; i++) {
        ck_assert_int_eq(pr[i].calls, 1);
        ck_assert_int_eq(pr[i].status, HUB_EUNAVAILABLE);
    }
    ck_assert_int_eq(T.b[0]->ops->up(T.b[0]), 0);

    /* stop() from inside a publish completion (a hiredis callback) */
    static struct pres q[3];
    memset(q, 0, sizeof(q));
    stop_me = T.b[1];
    struct hub_msg *m = hub_msg_text("1", 1);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(T.b[1]->ops->publish(T.b[1], "z", 1, m, NULL, on_pub_stop, &q[i]), 0);
    hub_msg_unref(m);
    ck_assert(WAIT(q[0].calls && q[1].calls && q[2].calls, WAIT_MS));
    ck_assert_int_eq(q[0].status, HUB_OK);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(q[i].calls, 1);
    ck_assert_int_eq(q[1].status, HUB_EUNAVAILABLE);
    stop_me = NULL;
    pump(50);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(q[i].calls, 1);
    /* the never-connected one stops mid-attempt; env_finish drains all
     * three and requires uv_loop_close() == 0 (ASan: no leak) */
    env_finish();
}
END_TEST

START_TEST(t_redis_connect_timeout)
{
    /* A server that never answers: a listener whose accept queue is full,
     * so the kernel drops further SYNs (a connect that never completes),
     * and a listener that accepts nothing but completes TCP handshakes
     * (PING never answered). Both must time out, be freed and retried. */
    env_init();
    log_capture();
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    ck_assert_int_eq(listen(lfd, 0), 0);
    socklen_t l = sizeof(a);
    getsockname(lfd, (struct sockaddr *)&a, &l);
    int port = ntohs(a.sin_port);
    int fill[4];
    for (int i = 0; i < 4; i++) {
        fill[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        connect(fill[i], (struct sockaddr *)&a, sizeof(a));
    }
    sleep_ms(50);
    char url[200];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d?connect_timeout_ms=200", port);
    mk(0, url);
    pump(1500);
    ck_assert_int_eq(T.b[0]->ops->up(T.b[0]), 0);
    int timeouts = log_count("connect timed out after 200 ms") +
                   log_count("handshake (AUTH/SELECT/PING) timed out after 200 ms");
    ck_assert_msg(timeouts >= 4, "log:\n%s", log_tail());
    printf("[measure] never-answering server: %d connect timeouts in 1.5 s (%d connect, %d "
           "handshake)\n",
           timeouts, log_count("connect timed out"), log_count("handshake (AUTH"));
    for (int i = 0; i < 4; i++)
        close(fill[i]);
    close(lfd);
    log_release();
    env_finish();
}
END_TEST

START_TEST(t_redis_select_db)
{
    env_init();
    log_capture();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, NULL);
    char url[200];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d/3", s->port);
    mk(0, url);
    wait_up(0);
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d/99999", s->port);
    mk(1, url);
    pump(600);
    ck_assert_int_eq(T.b[1]->ops->up(T.b[1]), 0);
    ck_assert_msg(log_count("SELECT failed: ERR DB index is out of range") >= 2, "log:\n%s",
                  log_tail());
    log_release();
    env_finish();
}
END_TEST

START_TEST(t_redis_publish_cap)
{
    env_init();
    struct srv *s = &T.srv[0];
    srv_start(s, 0, NULL);
    char url[200];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d?max_pending=5&max_pending_bytes=4096",
             s->port);
    mk(0, url);
    wait_up(0);
    struct pres r[8];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(pub(0, "c", "x", &r[i]), 0);
    ck_assert_int_eq(pub(0, "c", "x", &r[5]), HUB_EUNAVAILABLE); /* count cap */
    ck_assert(WAIT(r[4].calls, WAIT_MS));
    char big[5000];
    memset(big, 'b', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    ck_assert_int_eq(pub(0, "c", big, &r[6]), HUB_EUNAVAILABLE); /* byte cap */
    ck_assert_int_eq(pub(0, "c", "y", &r[7]), 0);
    ck_assert(WAIT(r[7].calls, WAIT_MS));
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(r[i].calls, (i == 5 || i == 6) ? 0 : 1);
    ck_assert_int_eq(metric(0, "luahub_broker_publish_errors_total"), 2);
    env_finish();
}
END_TEST

/* ------------------------------------------------------------------ */
/* URLs and the shard function (no I/O)                                */
/* ------------------------------------------------------------------ */

START_TEST(t_url_valid)
{
    static const char *good[] = {
        "memory",
        "  memory ",
        "redis://127.0.0.1:6379",
        "redis://localhost",
        "redis://:pw@127.0.0.1:6379/2",
        "redis://user:p%40ss@redis.example:6380/0",
        "redis://[::1]:6379",
        "redis://a:1 redis://b:2,redis://c:3",
        "redis://h:1?connect_timeout_ms=100&command_timeout_ms=250&max_pending=10"
        "&max_pending_bytes=65536",
    };
    static const struct {
        const char *url, *msg;
    } bad[] = {
        {"", "empty"},
        {"http://x", "expected \"memory\" or"},
        {"redis://", "missing host"},
        {"redis://h:0", "bad port \"0\""},
        {"redis://h:70000", "bad port \"70000\""},
        {"redis://h:abc", "bad port \"abc\""},
        {"redis://h:1/x", "bad database \"x\""},
        {"redis://pw@h:1", "credentials must be"},
        {"redis://:@h:1", "empty password"},
        {"redis://:p%zz@h:1", "bad %-escape in the password"},
        {"redis://[::1:6379", "missing ']'"},
        {"redis://h:1?bogus=1", "unknown option \"bogus\""},
        {"redis://h:1?max_pending=0", "max_pending must be"},
        {"redis://h:1?command_timeout_ms", "has no value"},
        {"rediss://h:1", "TLS (rediss://) is not supported"},
        {"memory redis://h:1", "cannot be mixed"},
        {"redis://h:1 redis://h:1", "listed twice"},
        {"redis://h/w:1", "bad database"},
    };
    char err[512];
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        err[0] = '\0';
        ck_assert_msg(hub_broker_url_valid(good[i], err, sizeof(err)) == 0, "%s: %s", good[i],
                      err);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        ck_assert_msg(hub_broker_url_valid(bad[i].url, err, sizeof(err)) < 0,
                      "\"%s\" was accepted", bad[i].url);
        ck_assert_msg(strstr(err, bad[i].msg) != NULL, "\"%s\": message \"%s\" lacks \"%s\"",
                      bad[i].url, err, bad[i].msg);
    }
    ck_assert_int_lt(hub_broker_url_valid(NULL, err, sizeof(err)), 0);
    /* hub_broker_new refuses the same, with the same message */
    uv_loop_t loop;
    uv_loop_init(&loop);
    ck_assert_ptr_null(hub_broker_new(&loop, "redis://h:0", NULL, on_deliver, on_health, NULL,
                                      err, sizeof(err)));
    ck_assert_ptr_nonnull(strstr(err, "bad port"));
    ck_assert_int_eq(uv_loop_close(&loop), 0);
}
END_TEST

START_TEST(t_shard_function)
{
    /* Pinned values: every hub process (and every version) must agree on
     * a channel's shard. Changing the hash is a breaking change. */
    ck_assert_uint_eq(hub_broker_shard("room:1", 6, 1), 0);
    ck_assert_uint_eq(hub_broker_shard("room:1", 6, 0), 0);
    static const struct {
        const char *name;
        uint32_t n, want;
    } pinned[] = {
        {"room:1", 2, 0},
        {"room:1", 3, 0},
        {"room:1", 5, 0},
        {"room:1", 16, 14},
        {"chat:general", 2, 0},
        {"chat:general", 3, 2},
        {"chat:general", 5, 4},
        {"chat:general", 16, 9},
        {"user:42", 2, 1},
        {"user:42", 3, 1},
        {"user:42", 5, 1},
        {"user:42", 16, 14},
        {"a", 2, 1},
        {"a", 3, 1},
        {"a", 5, 3},
        {"a", 16, 5},
        {"", 2, 1},
        {"", 3, 1},
        {"", 5, 1},
        {"", 16, 1},
        {"luahub", 2, 1},
        {"luahub", 3, 1},
        {"luahub", 5, 1},
        {"luahub", 16, 5},
        {"news/sports", 2, 1},
        {"news/sports", 3, 1},
        {"news/sports", 5, 1},
        {"news/sports", 16, 7},
        {"x:y:z", 2, 1},
        {"x:y:z", 3, 1},
        {"x:y:z", 5, 4},
        {"x:y:z", 16, 4},
    };
    for (size_t i = 0; i < sizeof(pinned) / sizeof(pinned[0]); i++)
        ck_assert_msg(hub_broker_shard(pinned[i].name, strlen(pinned[i].name), pinned[i].n) ==
                          pinned[i].want,
                      "shard(%s, %u) = %u, pinned %u", pinned[i].name, pinned[i].n,
                      hub_broker_shard(pinned[i].name, strlen(pinned[i].name), pinned[i].n),
                      pinned[i].want);

    enum { K = 100000 };
    char name[32];
    for (uint32_t n = 2; n <= 10; n++) {
        uint32_t cnt[10] = {0};
        for (int i = 0; i < K; i++) {
            int len = snprintf(name, sizeof(name), "chat:%d", i);
            uint32_t s = hub_broker_shard(name, (size_t)len, n);
            ck_assert_uint_lt(s, n);
            cnt[s]++;
        }
        for (uint32_t s = 0; s < n; s++) {
            double dev = ((double)cnt[s] - (double)K / n) / ((double)K / n);
            ck_assert_msg(dev > -0.05 && dev < 0.05, "n=%u shard %u has %u of %d", n, s, cnt[s],
                          K);
        }
    }
    /* consistent: n -> n+1 moves about 1/(n+1) of the names, all to the new
     * shard */
    for (uint32_t n = 1; n < 8; n++) {
        int moved = 0;
        for (int i = 0; i < K; i++) {
            int len = snprintf(name, sizeof(name), "u%d", i);
            uint32_t a = hub_broker_shard(name, (size_t)len, n);
            uint32_t b = hub_broker_shard(name, (size_t)len, n + 1);
            if (a != b) {
                ck_assert_uint_eq(b, n);
                moved++;
            }
        }
        double frac = (double)moved / K, want = 1.0 / (n + 1);
        ck_assert_msg(frac > want * 0.9 && frac < want * 1.1, "n=%u: %.3f moved", n, frac);
    }
}
END_TEST

static Suite *broker_suite(void)
{
    Suite *s = suite_create("broker");

    TCase *tc = tcase_create("contract");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, t_publish_delivered_once_exact, 0, 2);
    tcase_add_loop_test(tc, t_not_delivered_after_unsubscribe, 0, 2);
    tcase_add_loop_test(tc, t_ordering_per_channel, 0, 2);
    tcase_add_loop_test(tc, t_many_channels, 0, 2);
    tcase_add_loop_test(tc, t_subscribe_callback_semantics, 0, 2);
    tcase_add_loop_test(tc, t_publish_nobody_subscribed, 0, 2);
    tcase_add_loop_test(tc, t_after_stop, 0, 2);
    tcase_add_loop_test(tc, t_metrics_text, 0, 2);
    tcase_add_test(tc, t_memory_delivers_same_frame);
    suite_add_tcase(s, tc);

    tc = tcase_create("redis");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, t_redis_cross_broker);
    tcase_add_test(tc, t_redis_rtt_sequential);
    tcase_add_test(tc, t_redis_not_running_at_start);
    tcase_add_test(tc, t_redis_killed_and_restarted);
    tcase_add_test(tc, t_redis_sigstop);
    tcase_add_test(tc, t_redis_client_kill_pubsub);
    tcase_add_test(tc, t_redis_ok_means_own_copy_received);
    tcase_add_test(tc, t_redis_sigstop_noticed_without_traffic);
    tcase_add_test(tc, t_redis_wrong_password);
    tcase_add_test(tc, t_redis_10k_channels);
    tcase_add_test(tc, t_redis_sharding);
    tcase_add_test(tc, t_redis_stop_with_pending);
    tcase_add_test(tc, t_redis_connect_timeout);
    tcase_add_test(tc, t_redis_select_db);
    tcase_add_test(tc, t_redis_publish_cap);
    suite_add_tcase(s, tc);

    tc = tcase_create("pure");
    tcase_add_test(tc, t_url_valid);
    tcase_add_test(tc, t_shard_function);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    SRunner *sr = srunner_create(broker_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
