/* The broker contract suite for history and presence (issue 11).
 *
 * The "contract" tests run against both implementations (loop index 0:
 * memory, 1: redis against a redis-server this suite starts on a free
 * loopback port): offsets 1, 2, 3 ... with a stable epoch, the publish
 * position, trimming to history_size, reads (since, limit, reverse, oldest,
 * limit 0, a read creating the position), presence add / remove /
 * idempotent re-add, counts, the list with max and truncated, join and
 * leave per user. The redis-only tests break things: Redis stopped or
 * killed during reads and presence calls, restarted empty, its script
 * cache flushed; a broker that stops refreshing (its entries expire, the
 * other's sweep sends the leave events), refresh batching, key TTLs, bytes
 * on a channel that only look like a history frame, two shards.
 *
 * Rules: every wait is bounded (WAIT), the tests drive the uv loop
 * themselves, no fixed ports, the redis-servers are ours. With redis, "no
 * more events came" is proven by a sentinel: a plain publish on the same
 * channel after a presence read (which sends the queued changes first);
 * Redis keeps one connection's order, so whatever the changes published
 * came to the subscriber before the sentinel. Numbers are printed as
 * "[measure] ...", never asserted. */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <uv.h>

#include "luahub/broker.h"
#include "luahub/msg.h"
#include "luahub/util.h"

#include "redistest.h"

#define NB 2                    /* brokers per test */
#define MAXSUBS 8

/* What a broker handed to deliver, on the channels its "hub" subscribed. */
struct ev {
    char ch[64];
    char *text;
    uint64_t offset;            /* m->offset */
    char epoch[HUB_EPOCH_MAX + 1];
    int has_epoch;
};

struct sink {
    struct ev *e;
    size_t n, cap;
    char subs[MAXSUBS][64];
    int nsubs;
    int bad_frames;
};

static struct {
    uv_loop_t loop;
    uv_timer_t tick;
    struct hub_broker *b[NB];
    struct sink sink[NB];
    struct srv srv[2];
    int impl;                   /* contract tests: 0 memory, 1 redis */
    unsigned seq;
} T;

#define WAIT(cond, ms) LOOP_WAIT(&T.loop, &T.tick, cond, ms)

/* Options of the channels the tests use. */
static const struct hub_channel_opts O_HIST = {.pattern = "h:*", .len = 2, .prefix = true,
                                               .history_size = 100, .history_ttl = 600};
static const struct hub_channel_opts O_SMALL = {.pattern = "s:*", .len = 2, .prefix = true,
                                                .history_size = 3, .history_ttl = 600};
static const struct hub_channel_opts O_PRES = {.pattern = "p:*", .len = 2, .prefix = true,
                                               .presence = true, .join_leave = true};
static const struct hub_channel_opts O_QUIET = {.pattern = "q:*", .len = 2, .prefix = true,
                                                .presence = true};

static int subscribed(const struct sink *s, const char *ch, size_t len)
{
    for (int i = 0; i < s->nsubs; i++)
        if (strlen(s->subs[i]) == len && !memcmp(s->subs[i], ch, len))
            return 1;
    return 0;
}

static void on_deliver(void *ud, const char *channel, size_t len, struct hub_msg *m,
                       const char *epoch)
{
    struct sink *s = ud;
    /* memory hands over every publish: the hub would look it up */
    if (!subscribed(s, channel, len))
        return;
    const unsigned char *f = hub_msg_frame(m);
    size_t pl = m->payload_len, hl = pl < 126 ? 2 : pl <= 0xffff ? 4 : 10;
    if (f[0] != 0x81 || m->frame_len != hl + pl)
        s->bad_frames++;
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->e = realloc(s->e, s->cap * sizeof(*s->e));
        ck_assert_ptr_nonnull(s->e);
    }
    struct ev *e = &s->e[s->n++];
    memset(e, 0, sizeof(*e));
    snprintf(e->ch, sizeof(e->ch), "%.*s", (int)len, channel);
    e->text = strndup((const char *)hub_msg_payload(m), pl);
    e->offset = m->offset;
    if (epoch) {
        e->has_epoch = 1;
        snprintf(e->epoch, sizeof(e->epoch), "%s", epoch);
    }
}

static void on_health(void *ud, int up)
{
    (void)ud;
    (void)up;
}

static void env_init(void)
{
    memset(&T, 0, sizeof(T));
    ck_assert_int_eq(uv_loop_init(&T.loop), 0);
    uv_timer_init(&T.loop, &T.tick);
    signal(SIGPIPE, SIG_IGN);
}

static const char *url_of(const struct srv *s, const char *extra)
{
    static char buf[4][256];
    static int k;
    char *u = buf[k++ & 3];
    snprintf(u, 256, "redis://127.0.0.1:%d%s", s->port, extra ? extra : "");
    return u;
}

/* Broker `bi` on `url` with presence_ttl `ttl` (s), up. */
static struct hub_broker *mk(int bi, const char *url, unsigned ttl)
{
    char err[256] = "";
    T.b[bi] = hub_broker_new(&T.loop, url, NULL, on_deliver, on_health, &T.sink[bi], err,
                             sizeof(err));
    ck_assert_msg(T.b[bi] != NULL, "hub_broker_new(%s): %s", url, err);
    T.b[bi]->presence_ttl = ttl;
    ck_assert_msg(WAIT(T.b[bi]->ops->up(T.b[bi]), WAIT_MS), "broker %d not up", bi);
    return T.b[bi];
}

static void env_finish(void)
{
    for (int i = 0; i < NB; i++)
        if (T.b[i])
            T.b[i]->ops->stop(T.b[i]);
    uv_close((uv_handle_t *)&T.tick, NULL);
    int64_t dl = now_ms() + WAIT_MS;
    while (uv_loop_alive(&T.loop) && now_ms() < dl)
        uv_run(&T.loop, UV_RUN_NOWAIT);
    ck_assert_msg(!uv_loop_alive(&T.loop), "the loop did not drain after stop()");
    for (int i = 0; i < NB; i++) {
        if (T.b[i])
            T.b[i]->ops->free(T.b[i]);
        for (size_t k = 0; k < T.sink[i].n; k++)
            free(T.sink[i].e[k].text);
        free(T.sink[i].e);
        ck_assert_int_eq(T.sink[i].bad_frames, 0);
    }
    ck_assert_int_eq(uv_loop_close(&T.loop), 0);
    for (int i = 0; i < 2; i++)
        srv_stop(&T.srv[i]);
}

/* Redis-only fixture: a redis-server and broker 0 on it (URL options
 * `extra`, presence_ttl `ttl`). */
static struct srv *redis_setup(const char *extra, unsigned ttl)
{
    env_init();
    T.impl = 1;
    srv_start(&T.srv[0], 0, NULL);
    mk(0, url_of(&T.srv[0], extra), ttl);
    return &T.srv[0];
}

/* Contract fixture: broker 0 of implementation `impl`, presence_ttl 60. */
static void contract_setup(int impl)
{
    if (impl) {
        redis_setup(NULL, 60);
        return;
    }
    env_init();
    mk(0, "memory", 60);
}

static const char *impl_name(void)
{
    return T.impl ? "redis" : "memory";
}

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

/* ------------------------------------------------------------------ */
/* Subscribe, publish, read                                            */
/* ------------------------------------------------------------------ */

static void on_sub(void *ud, int status)
{
    *(int *)ud = status + 1000;
}

static void sub_ok(int bi, const char *ch)
{
    struct sink *s = &T.sink[bi];
    ck_assert_int_lt(s->nsubs, MAXSUBS);
    snprintf(s->subs[s->nsubs++], sizeof(s->subs[0]), "%s", ch);
    int st = 0;
    T.b[bi]->ops->subscribe(T.b[bi], ch, strlen(ch), on_sub, &st);
    ck_assert_msg(WAIT(st != 0, WAIT_MS), "subscribe %s not confirmed", ch);
    ck_assert_int_eq(st - 1000, HUB_OK);
}

struct pubres {
    int calls, status;
    int has_pos;
    struct hub_stream_pos pos;
};

static void on_pub(void *ud, int status, const struct hub_stream_pos *pos)
{
    struct pubres *r = ud;
    r->calls++;
    r->status = status;
    r->has_pos = pos != NULL;
    if (pos)
        r->pos = *pos;
}

/* Publishes data `data` (JSON) to `ch`: a history publish when `o` has a
 * history (an open delivery), else a plain one. Returns the call's rc. */
static int publish(int bi, const char *ch, const struct hub_channel_opts *o, const char *data,
                   struct pubres *r)
{
    int hist = o && o->history_size;
    struct hub_msg *m = hist ? hub_msg_delivery_open(ch, strlen(ch), data, strlen(data))
                             : hub_msg_delivery(ch, strlen(ch), data, strlen(data));
    int rc = T.b[bi]->ops->publish(T.b[bi], ch, strlen(ch), m, hist ? o : NULL,
                                   r ? on_pub : NULL, r);
    hub_msg_unref(m);
    return rc;
}

/* 1 once each of the n publishes has completed. */
static int all_completed(const struct pubres *r, int n)
{
    for (int i = 0; i < n; i++)
        if (!r[i].calls)
            return 0;
    return 1;
}

/* Publishes and waits for OK; returns the position (history) . */
static struct hub_stream_pos publish_ok(int bi, const char *ch, const struct hub_channel_opts *o,
                                        const char *data)
{
    struct pubres r = {0};
    ck_assert_int_eq(publish(bi, ch, o, data, &r), 0);
    ck_assert_msg(WAIT(r.calls > 0, WAIT_MS), "%s: publish to %s not completed", impl_name(),
                  ch);
    ck_assert_int_eq(r.calls, 1);
    ck_assert_int_eq(r.status, HUB_OK);
    ck_assert_int_eq(r.has_pos, o && o->history_size ? 1 : 0);
    return r.pos;
}

/* What a history read gave (copied: the result is borrowed). */
struct readres {
    int calls, status;
    struct hub_stream_pos top;
    uint64_t oldest;
    size_t n;
    uint64_t off[128];
    char *text[128];
};

static void on_read(void *ud, int status, const struct hub_history_result *r)
{
    struct readres *x = ud;
    x->calls++;
    x->status = status;
    if (status != HUB_OK) {
        ck_assert_ptr_null(r);
        return;
    }
    x->top = r->top;
    x->oldest = r->oldest;
    x->n = r->n;
    ck_assert_uint_le(r->n, 128);
    for (size_t i = 0; i < r->n; i++) {
        struct hub_msg *m = r->msgs[i];
        const unsigned char *f = hub_msg_frame(m);
        ck_assert_int_eq(f[0], 0x81); /* sealed text frames */
        x->off[i] = m->offset;
        x->text[i] = strndup((const char *)hub_msg_payload(m), m->payload_len);
    }
}

static void readres_free(struct readres *x)
{
    for (size_t i = 0; i < x->n; i++)
        free(x->text[i]);
    memset(x, 0, sizeof(*x));
}

static void read_ok(int bi, const char *ch, const struct hub_channel_opts *o, uint64_t since,
                    uint32_t limit, int reverse, struct readres *x)
{
    memset(x, 0, sizeof(*x));
    struct hub_history_query q = {.since = since, .limit = limit, .reverse = reverse};
    ck_assert_int_eq(T.b[bi]->ops->history(T.b[bi], ch, strlen(ch), o, &q, on_read, x), 0);
    ck_assert_msg(WAIT(x->calls > 0, WAIT_MS), "%s: read of %s not answered", impl_name(), ch);
    ck_assert_int_eq(x->calls, 1);
    ck_assert_int_eq(x->status, HUB_OK);
    ck_assert_uint_gt(strlen(x->top.epoch), 0);
}

/* The messages read must be exactly the offsets `want` (n of them), each
 * the delivery of data "<offset>" on `ch`. */
static void expect_msgs(const struct readres *x, const char *ch, const uint64_t *want, size_t n)
{
    ck_assert_msg(x->n == n, "%s: %zu messages read, %zu expected", impl_name(), x->n, n);
    for (size_t i = 0; i < n; i++) {
        char buf[160];
        snprintf(buf, sizeof(buf), "{\"op\":\"message\",\"channel\":\"%s\",\"data\":%llu,"
                 "\"offset\":%llu}", ch, (unsigned long long)want[i],
                 (unsigned long long)want[i]);
        ck_assert_uint_eq(x->off[i], want[i]);
        ck_assert_str_eq(x->text[i], buf);
    }
}

/* A read whose messages must be exactly the offsets `want` (n of them). */
static void expect_read(int bi, const char *ch, const struct hub_channel_opts *o, uint64_t since,
                        uint32_t limit, int reverse, const uint64_t *want, size_t n)
{
    struct readres x;
    read_ok(bi, ch, o, since, limit, reverse, &x);
    expect_msgs(&x, ch, want, n);
    readres_free(&x);
}

/* Publishes data 1..n (the data is the expected offset) to a new channel. */
static struct hub_stream_pos publish_numbers(int bi, const char *ch,
                                             const struct hub_channel_opts *o, int n)
{
    struct hub_stream_pos pos = {0};
    for (int i = 1; i <= n; i++) {
        char d[16];
        snprintf(d, sizeof(d), "%d", i);
        pos = publish_ok(bi, ch, o, d);
        ck_assert_uint_eq(pos.offset, (uint64_t)i);
    }
    return pos;
}

/* ------------------------------------------------------------------ */
/* Presence helpers                                                    */
/* ------------------------------------------------------------------ */

/* The entry the hub would build: "client":"<id>"[,"user":"<u>"],"info":{"n":<k>}. */
static char *entry_of(const char *id, const char *user, int info)
{
    char *e = malloc(256);
    ck_assert_ptr_nonnull(e);
    if (user)
        snprintf(e, 256, "\"client\":\"%s\",\"user\":\"%s\",\"info\":{\"n\":%d}", id, user, info);
    else
        snprintf(e, 256, "\"client\":\"%s\",\"info\":{\"n\":%d}", id, info);
    return e;
}

static void padd(int bi, const char *ch, const struct hub_channel_opts *o, const char *id,
                 const char *user, int info)
{
    char *e = entry_of(id, user, info);
    T.b[bi]->ops->presence_add(T.b[bi], ch, strlen(ch), o, id, user, user ? strlen(user) : 0, e,
                               strlen(e));
    free(e);
}

static void premove(int bi, const char *ch, const struct hub_channel_opts *o, const char *id)
{
    T.b[bi]->ops->presence_remove(T.b[bi], ch, strlen(ch), o, id);
}

struct presres {
    int calls, status;
    uint64_t clients, users;
    int truncated;
    char *list;
};

static void on_presence(void *ud, int status, const struct hub_presence_result *r)
{
    struct presres *x = ud;
    x->calls++;
    x->status = status;
    if (status != HUB_OK) {
        ck_assert_ptr_null(r);
        return;
    }
    x->clients = r->clients;
    x->users = r->users;
    x->truncated = r->truncated;
    x->list = r->list ? strndup(r->list->p, r->list->len) : NULL;
}

static void pread_ok(int bi, const char *ch, const struct hub_channel_opts *o, uint32_t max,
                     struct presres *x)
{
    memset(x, 0, sizeof(*x));
    ck_assert_int_eq(T.b[bi]->ops->presence(T.b[bi], ch, strlen(ch), o, max, on_presence, x), 0);
    ck_assert_msg(WAIT(x->calls > 0, WAIT_MS), "%s: presence of %s not answered", impl_name(),
                  ch);
    ck_assert_int_eq(x->calls, 1);
    ck_assert_int_eq(x->status, HUB_OK);
    ck_assert_int_eq(x->list != NULL, max > 0);
}

/* Waits until sink `bi` has everything presence changes made before this
 * call published on `ch` (which it has subscribed): a presence read (it
 * sends the queued changes first), then a sentinel on the channel. */
static void settle(int bi, const char *ch, const struct hub_channel_opts *o)
{
    struct presres x;
    pread_ok(bi, ch, o, 0, &x);
    char tok[32];
    snprintf(tok, sizeof(tok), "\"sentinel-%u\"", ++T.seq);
    publish_ok(bi, ch, NULL, tok);
    struct sink *s = &T.sink[bi];
    ck_assert_msg(WAIT(s->n > 0 && strstr(s->e[s->n - 1].text, tok), WAIT_MS),
                  "sentinel not delivered on %s", ch);
}

/* Events of sink `bi` on `ch` that contain `needle`. */
static int events(int bi, const char *ch, const char *needle)
{
    int n = 0;
    struct sink *s = &T.sink[bi];
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->e[i].ch, ch) && strstr(s->e[i].text, needle))
            n++;
    return n;
}

/* The join/leave frame of an entry. */
static char *event_text(const char *op, const char *ch, const char *id, const char *user,
                        int info)
{
    char *e = entry_of(id, user, info);
    char *f = malloc(512);
    snprintf(f, 512, "{\"op\":\"%s\",\"channel\":\"%s\",%s}", op, ch, e);
    free(e);
    return f;
}

static int has_event(int bi, const char *op, const char *ch, const char *id, const char *user,
                     int info)
{
    char *f = event_text(op, ch, id, user, info);
    int n = 0;
    struct sink *s = &T.sink[bi];
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->e[i].text, f)) {
            ck_assert_int_eq(s->e[i].has_epoch, 0); /* plain, not history */
            n++;
        }
    free(f);
    return n;
}

/* ------------------------------------------------------------------ */
/* Contract: history                                                   */
/* ------------------------------------------------------------------ */

START_TEST(t_stream_offsets_and_epoch)
{
    contract_setup(_i);
    sub_ok(0, "h:a");
    struct hub_stream_pos first = {0};
    for (int i = 1; i <= 5; i++) {
        char d[16];
        snprintf(d, sizeof(d), "%d", i);
        struct hub_stream_pos p = publish_ok(0, "h:a", &O_HIST, d);
        ck_assert_uint_eq(p.offset, (uint64_t)i);
        ck_assert_uint_gt(strlen(p.epoch), 0);
        ck_assert_uint_le(strlen(p.epoch), HUB_EPOCH_MAX);
        if (i == 1)
            first = p;
        ck_assert_str_eq(p.epoch, first.epoch);
    }
    /* the deliveries carry the offsets, the epoch and ,"offset":N} */
    ck_assert_msg(WAIT(T.sink[0].n == 5, WAIT_MS), "%s: %zu deliveries", impl_name(),
                  T.sink[0].n);
    for (int i = 0; i < 5; i++) {
        struct ev *e = &T.sink[0].e[i];
        char want[128];
        snprintf(want, sizeof(want),
                 "{\"op\":\"message\",\"channel\":\"h:a\",\"data\":%d,\"offset\":%d}", i + 1,
                 i + 1);
        ck_assert_str_eq(e->text, want);
        ck_assert_uint_eq(e->offset, (uint64_t)i + 1);
        ck_assert_int_eq(e->has_epoch, 1);
        ck_assert_str_eq(e->epoch, first.epoch);
    }
    /* another channel: its own offsets and its own epoch */
    struct hub_stream_pos b1 = publish_ok(0, "h:b", &O_HIST, "1");
    ck_assert_uint_eq(b1.offset, 1);
    ck_assert_str_ne(b1.epoch, first.epoch);
    /* plain publishes on a plain channel carry nothing */
    sub_ok(0, "plain");
    publish_ok(0, "plain", NULL, "\"x\"");
    ck_assert(WAIT(events(0, "plain", "\"x\"") == 1, WAIT_MS));
    ck_assert_int_eq(T.sink[0].e[T.sink[0].n - 1].offset, 0);
    ck_assert_int_eq(T.sink[0].e[T.sink[0].n - 1].has_epoch, 0);
    ck_assert_str_eq(T.sink[0].e[T.sink[0].n - 1].text,
                     "{\"op\":\"message\",\"channel\":\"plain\",\"data\":\"x\"}");
    env_finish();
}
END_TEST

START_TEST(t_stream_trimmed_to_size)
{
    contract_setup(_i);
    struct hub_stream_pos top = publish_numbers(0, "s:t", &O_SMALL, 10);
    struct readres x;
    read_ok(0, "s:t", &O_SMALL, 0, 100, 0, &x);
    ck_assert_uint_eq(x.top.offset, 10);
    ck_assert_str_eq(x.top.epoch, top.epoch);
    ck_assert_uint_eq(x.oldest, 8);
    expect_msgs(&x, "s:t", (uint64_t[]){8, 9, 10}, 3);
    readres_free(&x);
    /* since below the oldest: what is kept */
    expect_read(0, "s:t", &O_SMALL, 2, 100, 0, (uint64_t[]){8, 9, 10}, 3);
    expect_read(0, "s:t", &O_SMALL, 0, 2, 1, (uint64_t[]){10, 9}, 2);
    env_finish();
}
END_TEST

START_TEST(t_stream_reads)
{
    contract_setup(_i);
    struct hub_stream_pos top = publish_numbers(0, "h:r", &O_HIST, 10);
    struct readres x;
    read_ok(0, "h:r", &O_HIST, 0, 3, 0, &x);
    ck_assert_uint_eq(x.top.offset, 10);
    ck_assert_str_eq(x.top.epoch, top.epoch);
    ck_assert_uint_eq(x.oldest, 1);
    expect_msgs(&x, "h:r", (uint64_t[]){1, 2, 3}, 3);
    readres_free(&x);
    expect_read(0, "h:r", &O_HIST, 4, 100, 0, (uint64_t[]){5, 6, 7, 8, 9, 10}, 6);
    /* reverse: the newest `limit` of those after since, newest first */
    expect_read(0, "h:r", &O_HIST, 0, 3, 1, (uint64_t[]){10, 9, 8}, 3);
    expect_read(0, "h:r", &O_HIST, 8, 5, 1, (uint64_t[]){10, 9}, 2);
    /* limit 0: the position only */
    read_ok(0, "h:r", &O_HIST, 0, 0, 0, &x);
    ck_assert_uint_eq(x.top.offset, 10);
    ck_assert_uint_eq(x.oldest, 1);
    expect_msgs(&x, "h:r", NULL, 0);
    /* since at or beyond the top, even absurdly far */
    read_ok(0, "h:r", &O_HIST, 10, 100, 0, &x);
    expect_msgs(&x, "h:r", NULL, 0);
    read_ok(0, "h:r", &O_HIST, (uint64_t)INT64_MAX, 100, 1, &x);
    expect_msgs(&x, "h:r", NULL, 0);
    ck_assert_uint_eq(x.top.offset, 10);
    env_finish();
}
END_TEST

START_TEST(t_stream_read_creates_position)
{
    contract_setup(_i);
    struct readres x;
    read_ok(0, "h:new", &O_HIST, 0, 10, 0, &x);
    ck_assert_uint_eq(x.top.offset, 0);
    ck_assert_uint_eq(x.oldest, 1);
    expect_msgs(&x, "h:new", NULL, 0);
    struct hub_stream_pos e = x.top;
    /* the same epoch on the next read and for the first publish */
    read_ok(0, "h:new", &O_HIST, 0, 10, 0, &x);
    ck_assert_str_eq(x.top.epoch, e.epoch);
    struct hub_stream_pos p = publish_ok(0, "h:new", &O_HIST, "1");
    ck_assert_uint_eq(p.offset, 1);
    ck_assert_str_eq(p.epoch, e.epoch);
    expect_read(0, "h:new", &O_HIST, 0, 10, 0, (uint64_t[]){1}, 1);
    env_finish();
}
END_TEST

/* ------------------------------------------------------------------ */
/* Contract: presence                                                  */
/* ------------------------------------------------------------------ */

START_TEST(t_presence_join_leave_per_user)
{
    contract_setup(_i);
    sub_ok(0, "p:1");
    padd(0, "p:1", &O_PRES, "i-1", "alice", 1);
    padd(0, "p:1", &O_PRES, "i-2", "alice", 2);     /* alice's second tab */
    padd(0, "p:1", &O_PRES, "i-3", NULL, 3);        /* anonymous */
    padd(0, "p:1", &O_PRES, "i-4", "bob", 4);
    settle(0, "p:1", &O_PRES);
    ck_assert_int_eq(has_event(0, "join", "p:1", "i-1", "alice", 1), 1);
    ck_assert_int_eq(has_event(0, "join", "p:1", "i-2", "alice", 2), 0);
    ck_assert_int_eq(has_event(0, "join", "p:1", "i-3", NULL, 3), 1);
    ck_assert_int_eq(has_event(0, "join", "p:1", "i-4", "bob", 4), 1);
    ck_assert_int_eq(events(0, "p:1", "\"op\":\"join\""), 3);
    struct presres x;
    pread_ok(0, "p:1", &O_PRES, 0, &x);
    ck_assert_uint_eq(x.clients, 4);
    ck_assert_uint_eq(x.users, 2);

    /* alice's first tab goes: she is still there (no leave) */
    premove(0, "p:1", &O_PRES, "i-1");
    settle(0, "p:1", &O_PRES);
    ck_assert_int_eq(events(0, "p:1", "\"op\":\"leave\""), 0);
    pread_ok(0, "p:1", &O_PRES, 0, &x);
    ck_assert_uint_eq(x.clients, 3);
    ck_assert_uint_eq(x.users, 2);
    /* her last one: leave, with that client's entry */
    premove(0, "p:1", &O_PRES, "i-2");
    premove(0, "p:1", &O_PRES, "i-3");
    premove(0, "p:1", &O_PRES, "nobody");           /* unknown: ignored */
    settle(0, "p:1", &O_PRES);
    ck_assert_int_eq(has_event(0, "leave", "p:1", "i-2", "alice", 2), 1);
    ck_assert_int_eq(has_event(0, "leave", "p:1", "i-3", NULL, 3), 1);
    ck_assert_int_eq(events(0, "p:1", "\"op\":\"leave\""), 2);
    pread_ok(0, "p:1", &O_PRES, 0, &x);
    ck_assert_uint_eq(x.clients, 1);
    ck_assert_uint_eq(x.users, 1);
    premove(0, "p:1", &O_PRES, "i-4");
    settle(0, "p:1", &O_PRES);
    ck_assert_int_eq(has_event(0, "leave", "p:1", "i-4", "bob", 4), 1);
    pread_ok(0, "p:1", &O_PRES, 10, &x);
    ck_assert_uint_eq(x.clients, 0);
    ck_assert_uint_eq(x.users, 0);
    ck_assert_str_eq(x.list, "[]");
    ck_assert_int_eq(x.truncated, 0);
    free(x.list);
    env_finish();
}
END_TEST

START_TEST(t_presence_idempotent)
{
    contract_setup(_i);
    sub_ok(0, "p:2");
    padd(0, "p:2", &O_PRES, "i-1", "alice", 1);
    padd(0, "p:2", &O_PRES, "i-1", "alice", 1);
    padd(0, "p:2", &O_PRES, "i-1", "alice", 7);     /* again, with a new info */
    settle(0, "p:2", &O_PRES);
    ck_assert_int_eq(events(0, "p:2", "\"op\":\"join\""), 1);
    struct presres x;
    pread_ok(0, "p:2", &O_PRES, 10, &x);
    ck_assert_uint_eq(x.clients, 1);
    ck_assert_uint_eq(x.users, 1);
    char *e = entry_of("i-1", "alice", 7);
    char want[300];
    snprintf(want, sizeof(want), "[{%s}]", e);
    ck_assert_str_eq(x.list, want);
    free(e);
    free(x.list);
    /* one remove takes it out, once */
    premove(0, "p:2", &O_PRES, "i-1");
    premove(0, "p:2", &O_PRES, "i-1");
    settle(0, "p:2", &O_PRES);
    ck_assert_int_eq(events(0, "p:2", "\"op\":\"leave\""), 1);
    pread_ok(0, "p:2", &O_PRES, 0, &x);
    ck_assert_uint_eq(x.clients, 0);
    env_finish();
}
END_TEST

START_TEST(t_presence_list_max)
{
    contract_setup(_i);
    char id[16], user[16];
    for (int i = 0; i < 5; i++) {
        snprintf(id, sizeof(id), "i-%d", i);
        snprintf(user, sizeof(user), "u%d", i % 3);
        padd(0, "q:l", &O_QUIET, id, i == 4 ? NULL : user, i);
    }
    struct presres x;
    pread_ok(0, "q:l", &O_QUIET, 10, &x);
    ck_assert_uint_eq(x.clients, 5);
    ck_assert_uint_eq(x.users, 3);
    ck_assert_int_eq(x.truncated, 0);
    /* every entry once, in some order */
    for (int i = 0; i < 5; i++) {
        snprintf(id, sizeof(id), "i-%d", i);
        snprintf(user, sizeof(user), "u%d", i % 3);
        char *e = entry_of(id, i == 4 ? NULL : user, i);
        char want[300];
        snprintf(want, sizeof(want), "{%s}", e);
        const char *p = strstr(x.list, want);
        ck_assert_msg(p && !strstr(p + 1, want), "%s: %s not once in %s", impl_name(), want,
                      x.list);
        free(e);
    }
    ck_assert_int_eq(x.list[0], '[');
    ck_assert_int_eq(x.list[strlen(x.list) - 1], ']');
    free(x.list);
    /* at most max, and it says so */
    pread_ok(0, "q:l", &O_QUIET, 2, &x);
    ck_assert_uint_eq(x.clients, 5);
    ck_assert_int_eq(x.truncated, 1);
    int entries = 0;
    for (const char *p = x.list; (p = strstr(p, "{\"client\":")); p++)
        entries++;
    ck_assert_int_eq(entries, 2);
    free(x.list);
    pread_ok(0, "q:l", &O_QUIET, 5, &x);
    ck_assert_int_eq(x.truncated, 0);
    free(x.list);
    env_finish();
}
END_TEST

START_TEST(t_presence_without_join_leave)
{
    contract_setup(_i);
    sub_ok(0, "q:1");
    padd(0, "q:1", &O_QUIET, "i-1", "alice", 1);
    padd(0, "q:1", &O_QUIET, "i-2", NULL, 2);
    premove(0, "q:1", &O_QUIET, "i-2");
    settle(0, "q:1", &O_QUIET);
    ck_assert_int_eq(events(0, "q:1", "\"op\":\"join\""), 0);
    ck_assert_int_eq(events(0, "q:1", "\"op\":\"leave\""), 0);
    struct presres x;
    pread_ok(0, "q:1", &O_QUIET, 0, &x);
    ck_assert_uint_eq(x.clients, 1);
    env_finish();
}
END_TEST

/* ------------------------------------------------------------------ */
/* Redis only                                                          */
/* ------------------------------------------------------------------ */

/* Two brokers on one Redis stand for two hubs: the same offsets, epoch
 * and order on both, whoever publishes. */
START_TEST(t_redis_two_brokers)
{
    env_init();
    srv_start(&T.srv[0], 0, NULL);
    mk(0, url_of(&T.srv[0], NULL), 60);
    mk(1, url_of(&T.srv[0], NULL), 60);
    sub_ok(0, "h:x");
    sub_ok(1, "h:x");
    enum { N = 200 };
    static struct pubres r[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++) {
        char d[16];
        snprintf(d, sizeof(d), "%d", i);
        ck_assert_int_eq(publish(i % 2, "h:x", &O_HIST, d, &r[i]), 0);
    }
    ck_assert(WAIT(T.sink[0].n == N && T.sink[1].n == N, WAIT_MS));
    /* an ok comes once the broker's own copy is back, which may be after
     * the other broker delivered it: wait for every completion too */
    ck_assert(WAIT(all_completed(r, N), WAIT_MS));
    int seen[N] = {0};
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(r[i].calls, 1);
        ck_assert_int_eq(r[i].status, HUB_OK);
        ck_assert_uint_ge(r[i].pos.offset, 1);
        ck_assert_uint_le(r[i].pos.offset, N);
        ck_assert_int_eq(seen[r[i].pos.offset - 1]++, 0);
        struct ev *a = &T.sink[0].e[i], *b = &T.sink[1].e[i];
        ck_assert_uint_eq(a->offset, (uint64_t)i + 1);
        ck_assert_str_eq(a->text, b->text);
        ck_assert_uint_eq(b->offset, a->offset);
        ck_assert_str_eq(a->epoch, r[0].pos.epoch);
        ck_assert_str_eq(b->epoch, r[0].pos.epoch);
    }
    /* each publisher's own messages in its order */
    for (int k = 0; k < 2; k++)
        for (int i = k + 2; i < N; i += 2)
            ck_assert_uint_gt(r[i].pos.offset, r[i - 2].pos.offset);
    env_finish();
}
END_TEST

static int g_calls, g_status;

static void on_read_count(void *ud, int status, const struct hub_history_result *r)
{
    (void)ud;
    (void)r;
    g_calls++;
    g_status = status;
}

static void on_presence_count(void *ud, int status, const struct hub_presence_result *r)
{
    (void)ud;
    (void)r;
    g_calls++;
    g_status = status;
}

/* A read or a presence call that Redis does not answer calls back
 * unavailable within command_timeout_ms (plus the probe's second); while
 * Redis is down both fail at once; afterwards they work again. */
START_TEST(t_redis_unavailable_reads)
{
    struct srv *s = redis_setup("?command_timeout_ms=300&connect_timeout_ms=300", 60);
    int port = s->port;
    publish_numbers(0, "h:u", &O_HIST, 2);
    padd(0, "p:u", &O_PRES, "i-1", NULL, 1);
    struct presres px;
    pread_ok(0, "p:u", &O_PRES, 0, &px);

    srv_sigstop(s);
    struct hub_history_query q = {.limit = 10};
    struct hub_broker *b = T.b[0];
    int64_t t0 = now_ms();
    ck_assert_int_eq(b->ops->history(b, "h:u", 3, &O_HIST, &q, on_read_count, NULL), 0);
    ck_assert_int_eq(b->ops->presence(b, "p:u", 3, &O_PRES, 10, on_presence_count, NULL), 0);
    ck_assert_msg(WAIT(g_calls == 2, WAIT_MS), "reads hang with Redis stopped (%d answers)",
                  g_calls);
    ck_assert_int_eq(g_status, HUB_EUNAVAILABLE);
    printf("[measure] reads failed %lld ms after Redis stopped (command_timeout_ms 300)\n",
           (long long)(now_ms() - t0));
    /* the connection was given up: fail fast, no callback */
    ck_assert(WAIT(!b->ops->up(b), WAIT_MS));
    g_calls = 0;
    ck_assert_int_eq(b->ops->history(b, "h:u", 3, &O_HIST, &q, on_read_count, NULL),
                     HUB_EUNAVAILABLE);
    ck_assert_int_eq(b->ops->presence(b, "p:u", 3, &O_PRES, 0, on_presence_count, NULL),
                     HUB_EUNAVAILABLE);
    struct pubres pr = {0};
    ck_assert_int_eq(publish(0, "h:u", &O_HIST, "3", &pr), HUB_EUNAVAILABLE);
    kill(s->pid, SIGCONT);
    ck_assert(WAIT(b->ops->up(b), WAIT_MS));
    ck_assert_int_eq(g_calls, 0);
    expect_read(0, "h:u", &O_HIST, 0, 10, 0, (uint64_t[]){1, 2}, 2);

    /* killed: the same */
    srv_kill(s);
    ck_assert(WAIT(!b->ops->up(b), WAIT_MS));
    ck_assert_int_eq(b->ops->history(b, "h:u", 3, &O_HIST, &q, on_read_count, NULL),
                     HUB_EUNAVAILABLE);
    ck_assert_int_eq(b->ops->presence(b, "p:u", 3, &O_PRES, 0, on_presence_count, NULL),
                     HUB_EUNAVAILABLE);
    srv_start(s, port, NULL);
    ck_assert(WAIT(b->ops->up(b), WAIT_MS));
    ck_assert_int_eq(g_calls, 0);
    ck_assert_int_ge(metric(0, "luahub_history_read_errors_total"), 3);
    env_finish();
}
END_TEST

/* Redis restarted empty: the stream comes back with a new epoch, and the
 * presence entries of this broker come back by themselves (with joins). */
START_TEST(t_redis_restarted_empty)
{
    struct srv *s = redis_setup(NULL, 60);
    int port = s->port;
    sub_ok(0, "p:r");
    struct hub_stream_pos e1 = publish_numbers(0, "h:e", &O_HIST, 3);
    padd(0, "p:r", &O_PRES, "i-1", "alice", 1);
    settle(0, "p:r", &O_PRES);
    ck_assert_int_eq(has_event(0, "join", "p:r", "i-1", "alice", 1), 1);

    srv_kill(s);
    ck_assert(WAIT(!T.b[0]->ops->up(T.b[0]), WAIT_MS));
    srv_start(s, port, NULL);
    ck_assert(WAIT(T.b[0]->ops->up(T.b[0]), WAIT_MS));
    struct readres x;
    read_ok(0, "h:e", &O_HIST, 0, 10, 0, &x);
    ck_assert_uint_eq(x.top.offset, 0);
    ck_assert_str_ne(x.top.epoch, e1.epoch);
    expect_msgs(&x, "h:e", NULL, 0);
    struct hub_stream_pos p = publish_ok(0, "h:e", &O_HIST, "1");
    ck_assert_uint_eq(p.offset, 1);
    ck_assert_str_eq(p.epoch, x.top.epoch);
    /* re-added on reconnect, without waiting for the refresh timer */
    struct presres px = {0};
    int64_t dl = now_ms() + WAIT_MS;
    do {
        pread_ok(0, "p:r", &O_PRES, 0, &px);
    } while (px.clients == 0 && now_ms() < dl);
    ck_assert_uint_eq(px.clients, 1);
    ck_assert_uint_eq(px.users, 1);
    ck_assert(WAIT(has_event(0, "join", "p:r", "i-1", "alice", 1) == 2, WAIT_MS));
    ck_assert_int_ge(metric(0, "luahub_presence_readded_total"), 1);
    env_finish();
}
END_TEST

/* SCRIPT FLUSH under a live connection: calls answered NOSCRIPT go again
 * with EVAL; nothing fails. */
START_TEST(t_redis_script_flush)
{
    struct srv *s = redis_setup(NULL, 60);
    sub_ok(0, "h:f");
    sub_ok(0, "p:f");
    publish_numbers(0, "h:f", &O_HIST, 2);
    freeReplyObject(srv_cmd(s, "SCRIPT FLUSH"));
    /* several in flight at once */
    struct pubres r[3] = {{0}};
    for (int i = 0; i < 3; i++) {
        char d[8];
        snprintf(d, sizeof(d), "%d", i + 3);
        ck_assert_int_eq(publish(0, "h:f", &O_HIST, d, &r[i]), 0);
    }
    ck_assert(WAIT(r[0].calls && r[1].calls && r[2].calls, WAIT_MS));
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(r[i].status, HUB_OK);
        ck_assert_uint_ge(r[i].pos.offset, 3);
    }
    ck_assert(WAIT(T.sink[0].n == 5, WAIT_MS));
    ck_assert_int_ge(metric(0, "luahub_broker_script_reloads_total"), 1);
    freeReplyObject(srv_cmd(s, "SCRIPT FLUSH"));
    struct readres x;
    read_ok(0, "h:f", &O_HIST, 0, 10, 0, &x);
    ck_assert_uint_eq(x.n, 5);
    readres_free(&x);
    freeReplyObject(srv_cmd(s, "SCRIPT FLUSH"));
    padd(0, "p:f", &O_PRES, "i-1", NULL, 1);
    settle(0, "p:f", &O_PRES);
    ck_assert_int_eq(has_event(0, "join", "p:f", "i-1", NULL, 1), 1);
    ck_assert_int_ge(metric(0, "luahub_broker_script_reloads_total"), 3);
    ck_assert_int_eq(metric(0, "luahub_presence_errors_total"), 0);
    env_finish();
}
END_TEST

/* A broker that stops refreshing (it stands for a hub killed with -9: stop()
 * sends no removes): its entries expire and the other broker's sweep
 * removes them with their leave events, once. */
START_TEST(t_redis_dead_broker_swept)
{
    struct srv *s = redis_setup(NULL, 2);
    mk(1, url_of(s, NULL), 2);
    sub_ok(1, "p:d");
    padd(0, "p:d", &O_PRES, "a-1", "alice", 1);
    padd(0, "p:d", &O_PRES, "a-2", "alice", 2);
    padd(0, "p:d", &O_PRES, "a-3", NULL, 3);
    padd(1, "p:d", &O_PRES, "b-1", "bob", 1);
    struct presres x;
    pread_ok(0, "p:d", &O_PRES, 0, &x);             /* sends broker 0's adds */
    settle(1, "p:d", &O_PRES);
    ck_assert_int_eq(events(1, "p:d", "\"op\":\"join\""), 3);
    pread_ok(1, "p:d", &O_PRES, 0, &x);
    ck_assert_uint_eq(x.clients, 4);
    /* refreshes keep them: presence_ttl later (twice the entries' life)
     * they are all there */
    (void)WAIT(0, 2700);
    pread_ok(1, "p:d", &O_PRES, 0, &x);
    ck_assert_uint_eq(x.clients, 4);
    ck_assert_int_eq(events(1, "p:d", "\"op\":\"leave\""), 0);

    T.b[0]->ops->stop(T.b[0]);
    int64_t t = now_ms();
    ck_assert_msg(WAIT(events(1, "p:d", "\"op\":\"leave\"") == 2, WAIT_MS),
                  "%d leave events", events(1, "p:d", "\"op\":\"leave\""));
    printf("[measure] leave events of a dead broker after %lld ms (presence_ttl 2 s)\n",
           (long long)(now_ms() - t));
    ck_assert_int_eq(has_event(1, "leave", "p:d", "a-3", NULL, 3), 1);
    ck_assert_int_eq(events(1, "p:d", "\"client\":\"a-1\"") + events(1, "p:d", "\"client\":\"a-2\""),
                     1 + 1); /* alice's join (a-1) and her one leave */
    pread_ok(1, "p:d", &O_PRES, 10, &x);
    ck_assert_uint_eq(x.clients, 1);
    ck_assert_uint_eq(x.users, 1);
    ck_assert_ptr_nonnull(strstr(x.list, "\"client\":\"b-1\""));
    free(x.list);
    settle(1, "p:d", &O_PRES);
    ck_assert_int_eq(events(1, "p:d", "\"op\":\"leave\""), 2);   /* once */
    ck_assert_int_ge(metric(1, "luahub_presence_swept_total"), 2);
    env_finish();
}
END_TEST

/* Commands Redis ran, those inside scripts included (the sum of every
 * cmdstat's calls), without our INFO calls. */
static long long all_calls(const struct srv *s)
{
    redisReply *r = srv_cmd(s, "INFO commandstats");
    long long n = 0;
    for (const char *p = r->str; (p = strstr(p, "cmdstat_")); p++) {
        const char *c = strstr(p, ":calls=");
        if (c && strncmp(p, "cmdstat_info:", 13) != 0)
            n += strtoll(c + 7, NULL, 10);
    }
    freeReplyObject(r);
    return n;
}

/* The refresh goes in batches: a round for 1,000 clients is a few script
 * calls, not 1,000 round trips. */
START_TEST(t_redis_refresh_batched)
{
    struct srv *s = redis_setup(NULL, 3);           /* a round every second */
    enum { N = 1000 };
    for (int i = 0; i < N; i++) {
        char id[16], ch[16], user[16];
        snprintf(id, sizeof(id), "i-%d", i);
        snprintf(ch, sizeof(ch), "q:%d", i / (N / 4));
        snprintf(user, sizeof(user), "u%d", i % 50);
        padd(0, ch, &O_QUIET, id, user, i);
    }
    struct presres x;
    pread_ok(0, "q:0", &O_QUIET, 0, &x);
    ck_assert_uint_eq(x.clients, N / 4);
    ck_assert_uint_eq(x.users, 50);
    long long adds = srv_calls(s, "evalsha");
    ck_assert_msg(adds <= N / 90 + 4, "%lld calls to add %d clients", adds, N);
    /* two full rounds */
    long long r0 = metric(0, "luahub_presence_refreshed_total");
    ck_assert(WAIT(metric(0, "luahub_presence_refreshed_total") >= r0 + N, WAIT_MS));
    long long e0 = srv_calls(s, "evalsha"), z0 = srv_calls(s, "zadd");
    long long c0 = all_calls(s);
    long long r1 = metric(0, "luahub_presence_refreshed_total");
    int64_t t0 = now_ms();
    ck_assert(WAIT(metric(0, "luahub_presence_refreshed_total") >= r1 + 2 * N, WAIT_MS));
    int64_t dt = now_ms() - t0;
    long long calls = srv_calls(s, "evalsha") - e0, zadds = srv_calls(s, "zadd") - z0;
    long long cmds = all_calls(s) - c0;
    /* the rounds the window saw: a loaded machine may see part of a third */
    long long rounds = (metric(0, "luahub_presence_refreshed_total") - r1 + N - 1) / N;
    ck_assert_msg(calls <= rounds * (N / 90 + 4), "%lld script calls for %lld rounds of %d",
                  calls, rounds, N);
    ck_assert_int_ge(zadds, 2 * N);
    printf("[measure] presence refresh, %d clients in 4 channels, presence_ttl 3 s: "
           "%lld script calls and %lld ZADDs in 2 rounds, %lld commands in all (those inside "
           "the scripts included): %.0f script calls/s, %.0f commands/s\n",
           N, calls, zadds, cmds, calls * 1000.0 / (double)dt, cmds * 1000.0 / (double)dt);
    ck_assert_int_eq(metric(0, "luahub_presence_readded_total"), 0);
    ck_assert_int_eq(metric(0, "luahub_presence_errors_total"), 0);
    env_finish();
}
END_TEST

/* Every key the broker writes has a TTL; the names are documented. */
START_TEST(t_redis_keys_have_ttls)
{
    struct srv *s = redis_setup(NULL, 60);
    publish_numbers(0, "h:k", &O_HIST, 2);
    struct readres x;
    read_ok(0, "h:only-read", &O_HIST, 0, 1, 0, &x);
    padd(0, "p:k", &O_PRES, "i-1", "alice", 1);
    padd(0, "p:k", &O_PRES, "i-2", NULL, 2);
    struct presres px;
    pread_ok(0, "p:k", &O_PRES, 0, &px);
    static const struct {
        const char *key, *type;
        long long min_s, max_s;
    } want[] = {
        {"luahub:history:h:k", "stream", 590, 600},
        {"luahub:history_pos:h:k", "hash", 7 * 86400 - 10, 7 * 86400},
        {"luahub:history_pos:h:only-read", "hash", 590, 600},
        {"luahub:presence:p:k", "zset", 50, 60},
        {"luahub:presence_info:p:k", "hash", 50, 60},
        {"luahub:presence_users:p:k", "hash", 50, 60},
    };
    redisReply *r = srv_cmd(s, "DBSIZE");
    ck_assert_int_eq(r->integer, (long long)(sizeof(want) / sizeof(want[0])));
    freeReplyObject(r);
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        r = srv_cmd(s, "TYPE %s", want[i].key);
        ck_assert_msg(!strcmp(r->str, want[i].type), "%s is a %s", want[i].key, r->str);
        freeReplyObject(r);
        r = srv_cmd(s, "TTL %s", want[i].key);
        ck_assert_msg(r->integer >= want[i].min_s && r->integer <= want[i].max_s,
                      "TTL of %s: %lld", want[i].key, r->integer);
        freeReplyObject(r);
    }
    /* the stream entry: id <offset>-0, the closed frame */
    r = srv_cmd(s, "XRANGE luahub:history:h:k - +");
    ck_assert_int_eq((int)r->elements, 2);
    ck_assert_str_eq(r->element[1]->element[0]->str, "2-0");
    ck_assert_str_eq(r->element[1]->element[1]->element[1]->str,
                     "{\"op\":\"message\",\"channel\":\"h:k\",\"data\":2,\"offset\":2}");
    freeReplyObject(r);
    /* all presence keys go with the last client */
    premove(0, "p:k", &O_PRES, "i-1");
    premove(0, "p:k", &O_PRES, "i-2");
    pread_ok(0, "p:k", &O_PRES, 0, &px);
    r = srv_cmd(s, "DBSIZE");
    ck_assert_int_eq(r->integer, 3);
    freeReplyObject(r);
    env_finish();
}
END_TEST

/* Bytes published on a hub channel by someone else that start with the
 * history mark but are not a history frame: delivered as they are. */
START_TEST(t_redis_foreign_marker)
{
    struct srv *s = redis_setup(NULL, 60);
    sub_ok(0, "plain");
    static const char *const bad[] = {"\x01", "\x01x", "\x01" "e 0 {}", "\x01" "e 5",
                                      "\x01" "e 5 ", "\x01 5 x", "\x01" "e x5 y"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        redisReply *r = srv_cmd(s, "PUBLISH luahub:plain %b", bad[i], strlen(bad[i]));
        freeReplyObject(r);
    }
    /* a well-formed one is a history delivery */
    freeReplyObject(srv_cmd(s, "PUBLISH luahub:plain %b", "\x01" "ep 7 {\"a\":1}", (size_t)14));
    size_t nb = sizeof(bad) / sizeof(bad[0]);
    ck_assert(WAIT(T.sink[0].n == nb + 1, WAIT_MS));
    for (size_t i = 0; i < nb; i++) {
        ck_assert_str_eq(T.sink[0].e[i].text, bad[i]);
        ck_assert_int_eq(T.sink[0].e[i].has_epoch, 0);
        ck_assert_uint_eq(T.sink[0].e[i].offset, 0);
    }
    ck_assert_str_eq(T.sink[0].e[nb].text, "{\"a\":1}");
    ck_assert_str_eq(T.sink[0].e[nb].epoch, "ep");
    ck_assert_uint_eq(T.sink[0].e[nb].offset, 7);
    ck_assert_int_eq(metric(0, "luahub_broker_bad_frames_total"), (long long)nb);
    env_finish();
}
END_TEST

/* Two shards: a channel's stream, position and presence keys live on the
 * server that has its pub/sub. */
START_TEST(t_redis_sharded_keys)
{
    env_init();
    srv_start(&T.srv[0], 0, NULL);
    srv_start(&T.srv[1], 0, NULL);
    char url[300];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d,redis://127.0.0.1:%d", T.srv[0].port,
             T.srv[1].port);
    mk(0, url, 60);
    int on[2] = {0, 0};
    for (int i = 0; i < 8; i++) {
        char ch[16];
        snprintf(ch, sizeof(ch), "h:%d", i);
        publish_ok(0, ch, &O_HIST, "1");
        snprintf(ch, sizeof(ch), "p:%d", i);
        padd(0, ch, &O_PRES, "i-1", NULL, 1);
        struct presres px;
        pread_ok(0, ch, &O_PRES, 0, &px);
        ck_assert_uint_eq(px.clients, 1);
        int k = (int)hub_broker_shard(ch, strlen(ch), 2);
        snprintf(ch, sizeof(ch), "h:%d", i);
        int kh = (int)hub_broker_shard(ch, strlen(ch), 2);
        redisReply *r = srv_cmd(&T.srv[kh], "EXISTS luahub:history:h:%d luahub:history_pos:h:%d",
                                i, i);
        ck_assert_int_eq(r->integer, 2);
        freeReplyObject(r);
        r = srv_cmd(&T.srv[!kh], "EXISTS luahub:history:h:%d", i);
        ck_assert_int_eq(r->integer, 0);
        freeReplyObject(r);
        r = srv_cmd(&T.srv[k], "ZCARD luahub:presence:p:%d", i);
        ck_assert_int_eq(r->integer, 1);
        freeReplyObject(r);
        on[kh]++;
    }
    ck_assert(on[0] > 0 && on[1] > 0);
    env_finish();
}
END_TEST

/* What history costs: the same pipelined burst on a plain and on a
 * history channel, both subscribed here (printed, not asserted). */
START_TEST(t_redis_publish_cost)
{
    struct srv *s = redis_setup(NULL, 60);
    sub_ok(0, "plain");
    sub_ok(0, "h:c");
    enum { N = 5000 };
    static struct pubres r[N];
    double ms[2];
    for (int k = 0; k < 2; k++) {
        memset(r, 0, sizeof(r));
        size_t before = T.sink[0].n;
        int64_t t0 = now_ms();
        for (int i = 0; i < N; i++) {
            ck_assert_int_eq(publish(0, k ? "h:c" : "plain", k ? &O_HIST : NULL,
                                     "{\"text\":\"a message of some 40 bytes\"}", &r[i]), 0);
            if (i % 500 == 499)
                uv_run(&T.loop, UV_RUN_NOWAIT);
        }
        ck_assert(WAIT(r[N - 1].calls == 1 && T.sink[0].n == before + N, WAIT_MS));
        ms[k] = (double)(now_ms() - t0);
        for (int i = 0; i < N; i++)
            ck_assert_int_eq(r[i].status, HUB_OK);
    }
    redisReply *x = srv_cmd(s, "INFO commandstats");
    const char *ev = strstr(x->str, "cmdstat_evalsha:"), *pu = strstr(x->str, "cmdstat_publish:");
    double us_ev = ev ? strtod(strstr(ev, "usec_per_call=") + 14, NULL) : 0;
    double us_pu = pu ? strtod(strstr(pu, "usec_per_call=") + 14, NULL) : 0;
    freeReplyObject(x);
    printf("[measure] %d pipelined publishes, published -> all acknowledged and delivered: "
           "plain %.0f ms, history %.0f ms; Redis CPU per call: PUBLISH %.2f us, publish "
           "script %.2f us\n", N, ms[0], ms[1], us_pu, us_ev);
    env_finish();
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("broker_stream");
    TCase *tc = tcase_create("contract");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, t_stream_offsets_and_epoch, 0, 2);
    tcase_add_loop_test(tc, t_stream_trimmed_to_size, 0, 2);
    tcase_add_loop_test(tc, t_stream_reads, 0, 2);
    tcase_add_loop_test(tc, t_stream_read_creates_position, 0, 2);
    tcase_add_loop_test(tc, t_presence_join_leave_per_user, 0, 2);
    tcase_add_loop_test(tc, t_presence_idempotent, 0, 2);
    tcase_add_loop_test(tc, t_presence_list_max, 0, 2);
    tcase_add_loop_test(tc, t_presence_without_join_leave, 0, 2);
    suite_add_tcase(s, tc);
    tc = tcase_create("redis");
    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, t_redis_two_brokers);
    tcase_add_test(tc, t_redis_unavailable_reads);
    tcase_add_test(tc, t_redis_restarted_empty);
    tcase_add_test(tc, t_redis_script_flush);
    tcase_add_test(tc, t_redis_dead_broker_swept);
    tcase_add_test(tc, t_redis_refresh_batched);
    tcase_add_test(tc, t_redis_keys_have_ttls);
    tcase_add_test(tc, t_redis_foreign_marker);
    tcase_add_test(tc, t_redis_sharded_keys);
    tcase_add_test(tc, t_redis_publish_cost);
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
