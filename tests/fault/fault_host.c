/* The fault suite, host faults (tests/fault/README.md):
 *
 *   5. descriptors exhausted: a hub started with RLIMIT_NOFILE 256 and more
 *      connections than that: it keeps serving its clients, counts and logs
 *      its accept pauses, and serves new clients once descriptors free up;
 *   6. connect/subscribe/disconnect cycles (5,000 here, 50,000 in the soak)
 *      from several threads while messages flow: the hub's RSS and open
 *      descriptors before and after, within a stated bound;
 *   7. valgrind (builds without sanitizers only): the hub under
 *      `valgrind --leak-check=full` with live WebSocket clients (one with
 *      unread deliveries), a half-sent HTTP request and Redis connections
 *      when SIGTERM arrives: exit 0, no error, nothing definitely lost
 *      (the soak runs 2,000 connection cycles under valgrind first).
 *
 * Counts are printed as "[fault] ..." lines. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fault.h"
#include "faultload.h"
#include "hubtest.h"
#include "redistest.h"

/* ------------------------------------------------------------------ */
/* 5. Descriptors exhausted                                             */
/* ------------------------------------------------------------------ */

enum { FD_LIMIT = 256, FD_EXTRA = FD_LIMIT + 64 };

struct late {
    int port;
    struct ws *c;
};

/* A client that comes while the hub has no descriptor left: served once
 * descriptors free up (ws_connect waits HT_WAIT_MS for it). */
static void *late_client(void *arg)
{
    struct late *l = arg;
    l->c = ws_connect(l->port);
    ws_subscribe(l->c, "fd");
    return NULL;
}

START_TEST(descriptors_exhausted)
{
    /* the hub inherits the soft limit of the moment it is started */
    struct rlimit old, low;
    ck_assert_int_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
    ck_assert_msg(old.rlim_cur > FD_EXTRA + 64, "this test needs %d descriptors (ulimit -n)",
                  FD_EXTRA + 64);
    low = old;
    low.rlim_cur = FD_LIMIT;
    ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
    /* request_timeout: the idle connections below hold their descriptor
     * for the whole test */
    struct hub *h = hub_start("request_timeout = 300\nhttp_idle_timeout = 300\n"
                              "command_rate = 0\npublish_rate = 0\n");
    ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &old), 0);
    struct rlimit hl;
    ck_assert_int_eq(prlimit(h->pid, RLIMIT_NOFILE, NULL, &hl), 0);
    ck_assert_int_eq(hl.rlim_cur, FD_LIMIT);

    struct ws *sub = ws_connect(h->port), *pub = ws_connect(h->port);
    ws_subscribe(sub, "fd");
    int fd_base = fl_fd_count(h->pid);

    /* more connections than descriptors: the kernel completes them all
     * (listen backlog), the hub accepts until it has none left */
    static int extra[FD_EXTRA];
    for (int i = 0; i < FD_EXTRA; i++)
        extra[i] = tcp_connect(h->port);
    hub_log_wait(h, "cannot accept connections (Too many open files): pausing accepts",
                 FL_LONG_MS);
    int fd_full = fl_fd_count(h->pid);
    ck_assert_msg(fd_full >= FD_LIMIT - 4, "the hub paused accepting with %d of %d descriptors "
                  "open", fd_full, FD_LIMIT);

    /* its clients are served meanwhile */
    for (int k = 0; k < 20; k++) {
        char data[16];
        snprintf(data, sizeof data, "%d", k);
        ws_publish(pub, "fd", data);
        char *want = ws_delivery("fd", data);
        ws_expect(sub, want);
        free(want);
    }
    ws_sync(sub);
    ws_sync(pub);

    /* a new client arrives, then descriptors free up: it is served */
    struct late l = {h->port, NULL};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, late_client, &l), 0);
    for (int i = 0; i < FD_EXTRA; i++)
        close(extra[i]);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    ws_publish(pub, "fd", "\"late\"");
    ws_expect(sub, "{\"op\":\"message\",\"channel\":\"fd\",\"data\":\"late\"}");
    ws_expect(l.c, "{\"op\":\"message\",\"channel\":\"fd\",\"data\":\"late\"}");
    long long pauses = hub_metric(h, "luahub_accept_pauses_total");
    ck_assert_int_ge(pauses, 1);
    int warnings = hub_log_count(h, "cannot accept connections");

    /* and as many as before can come and go */
    static struct ws *more[100];
    for (int i = 0; i < 100; i++) {
        more[i] = ws_connect(h->port);
        ws_subscribe(more[i], "fd");
    }
    ws_publish(pub, "fd", "\"all\"");
    for (int i = 0; i < 100; i++) {
        ws_expect(more[i], "{\"op\":\"message\",\"channel\":\"fd\",\"data\":\"all\"}");
        ws_free(more[i]);
    }
    ws_free(l.c);
    hub_metric_wait(h, "luahub_connections", 2, FL_LONG_MS);
    int64_t dl = ht_now_ms() + FL_LONG_MS;
    while (fl_fd_count(h->pid) > fd_base && ht_now_ms() < dl)
        sleep_ms(10);
    int fd_after = fl_fd_count(h->pid);
    printf("[fault] descriptors exhausted (RLIMIT_NOFILE %d, %d extra connections): the hub "
           "held %d descriptors, paused accepting %lld times (%d warnings), served its 2 "
           "clients throughout and a new one after; descriptors %d before, %d after\n",
           FD_LIMIT, FD_EXTRA, fd_full, pauses, warnings, fd_base, fd_after);
    ck_assert_int_le(fd_after, fd_base);
    ws_expect(sub, "{\"op\":\"message\",\"channel\":\"fd\",\"data\":\"all\"}");
    ws_free(sub);
    ws_free(pub);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* ------------------------------------------------------------------ */
/* 6. Connection cycles                                                 */
/* ------------------------------------------------------------------ */

enum { CYC_THREADS = 4, CYC_CHANNELS = 64, CYC_WARMUP = 1000 };

/* Subscribes and publishes answered unavailable during the cycles (none
 * is expected: the broker is healthy throughout). */
static long cyc_refused_sub, cyc_refused_pub;

struct cycler {
    int port, id, n;
};

/* n cycles: connect, subscribe to one of CYC_CHANNELS channels (messages
 * flow on them), leave one of three ways: FIN, RST, or a close handshake
 * (with deliveries perhaps still in flight). */
static void *cycle(void *arg)
{
    struct cycler *cy = arg;
    for (int k = 0; k < cy->n; k++) {
        struct ws *c = ws_connect(cy->port);
        char cmd[128], ok[96];
        int chn = (k * CYC_THREADS + cy->id) % CYC_CHANNELS;
        snprintf(cmd, sizeof cmd, "{\"op\":\"subscribe\",\"channel\":\"cyc:%d\",\"id\":1}", chn);
        snprintf(ok, sizeof ok, "{\"id\":1,\"ok\":true,\"channel\":\"cyc:%d\"}", chn);
        ws_send_text(c, cmd);
        char *t = ws_recv_text(c);
        if (strcmp(t, ok)) {
            ck_assert_msg(strstr(t, "\"unavailable\"") != NULL, "subscribe answered %s", t);
            __atomic_fetch_add(&cyc_refused_sub, 1, __ATOMIC_RELAXED);
        }
        free(t);
        switch (k % 3) {
        case 0:
            ws_free(c);
            break;
        case 1:
            ws_abort(c);
            break;
        default:
            ws_send_close(c, 1000, "bye");
            for (;;) {
                struct ws_frame f;
                int r = ws_recv_msg(c, &f, HT_WAIT_MS);
                ck_assert_msg(r != 0, "no close answer within %d ms", HT_WAIT_MS);
                int done = r < 0 || f.opcode == WS_CLOSE;
                if (r > 0)
                    ws_frame_free(&f);
                if (done)
                    break;
            }
            ws_free(c);
        }
    }
    return NULL;
}

static volatile int cyc_stop;

/* Publishes to the cycle channels (one message a millisecond, about)
 * until cyc_stop; answers other than ok are counted in cyc_refused_pub. */
static void *cyc_publisher(void *arg)
{
    struct ws *c = arg;
    for (int k = 0; !cyc_stop; k++) {
        char cmd[160];
        snprintf(cmd, sizeof cmd, "{\"op\":\"publish\",\"channel\":\"cyc:%d\",\"data\":"
                 "\"some bytes queued to a leaving client\",\"id\":%d}", k % CYC_CHANNELS, k);
        ws_send_text(c, cmd);
        char *t = ws_recv_text(c), ok[64];
        snprintf(ok, sizeof ok, "{\"id\":%d,\"ok\":true}", k);
        if (strcmp(t, ok)) {
            ck_assert_msg(strstr(t, "\"unavailable\"") != NULL, "publish answered %s", t);
            __atomic_fetch_add(&cyc_refused_pub, 1, __ATOMIC_RELAXED);
        }
        free(t);
        sleep_ms(1);
    }
    return NULL;
}

static void run_cycles(int port, struct ws *pub, int n)
{
    pthread_t th[CYC_THREADS], tp;
    struct cycler cy[CYC_THREADS];
    cyc_stop = 0;
    ck_assert_int_eq(pthread_create(&tp, NULL, cyc_publisher, pub), 0);
    for (int t = 0; t < CYC_THREADS; t++) {
        cy[t] = (struct cycler){port, t, n / CYC_THREADS};
        ck_assert_int_eq(pthread_create(&th[t], NULL, cycle, &cy[t]), 0);
    }
    for (int t = 0; t < CYC_THREADS; t++)
        ck_assert_int_eq(pthread_join(th[t], NULL), 0);
    cyc_stop = 1;
    ck_assert_int_eq(pthread_join(tp, NULL), 0);
}

/* The hub idle again: only `pub` connected, and its descriptor count the
 * same in two readings 100 ms apart (the /metrics connection of the wait
 * closes just after its answer) and at most `fds` (bounded polls). Returns
 * the descriptor count. */
static int settle(struct hub *h, int fds)
{
    hub_metric_wait(h, "luahub_connections", 1, FL_LONG_MS);
    int64_t dl = ht_now_ms() + FL_LONG_MS;
    int n = fl_fd_count(h->pid), prev = -1;
    while ((n > fds || n != prev) && ht_now_ms() < dl) {
        prev = n;
        sleep_ms(100);
        n = fl_fd_count(h->pid);
    }
    return n;
}

/* `n` cycles on a hub with the memory broker, or (redis) the redis broker
 * on a Redis of the test's own: every channel's first subscriber makes the
 * hub SUBSCRIBE it in Redis and its last one UNSUBSCRIBE, while messages
 * are published to them. Descriptors must come back to what they were,
 * RSS may grow by `bound_kib` at most (512 KiB for 5,000 cycles, about 100
 * bytes a cycle; 1 MiB for 50,000, about 20 bytes a cycle: an idle
 * connection costs the hub about 2 KB, docs/internals.md, "Memory per
 * connection"), and, Redis being healthy throughout, no command may be
 * answered unavailable and the hub may not drop its subscriber connection. */
static void connect_cycles(int n, long bound_kib, int redis)
{
    ht_asan_no_quarantine();
    struct srv r = {0};
    char conf[256] = "command_rate = 0\npublish_rate = 0\n";
    if (redis) {
        srv_start(&r, 0, NULL);
        snprintf(conf, sizeof conf, "broker = \"redis://127.0.0.1:%d\"\n"
                 "command_rate = 0\npublish_rate = 0\n", r.port);
    }
    struct hub *h = hub_start(conf);
    if (redis)
        fl_wait_healthz(h->port, 200, 1, FL_LONG_MS);
    struct ws *pub = ws_connect(h->port);
    cyc_refused_sub = cyc_refused_pub = 0;
    run_cycles(h->port, pub, CYC_WARMUP);
    int fd0 = settle(h, 1 << 30);
    long rss0 = ht_rss_kib(h->pid);
    long long conns0 = hub_metric(h, "luahub_connections_total");
    int64_t t0 = ht_now_ms();
    run_cycles(h->port, pub, n);
    int64_t t1 = ht_now_ms();
    int fd1 = settle(h, fd0);
    long rss1 = ht_rss_kib(h->pid);
    long long conns = hub_metric(h, "luahub_connections_total") - conns0;
    long long dropped = redis ? hub_metric(h, "luahub_broker_link_lost_total{link=\"pubsub\","
                                              "cause=\"not_subscribed\"}") : 0;
    printf("[fault] %d connect/subscribe/disconnect cycles, %s broker (%d threads, after %d to "
           "warm up, messages flowing): %lld connections in %lld ms; descriptors %d before, %d "
           "after; RSS %ld KiB before, %ld KiB after (%+ld KiB, bound %ld); answered "
           "unavailable: %ld subscribes, %ld publishes; subscriber connection dropped %lld "
           "times\n",
           n, redis ? "redis" : "memory", CYC_THREADS, CYC_WARMUP, conns, (long long)(t1 - t0),
           fd0, fd1, rss0, rss1, rss1 - rss0, bound_kib, cyc_refused_sub, cyc_refused_pub,
           dropped);
    ck_assert_int_ge(conns, n);
    ck_assert_int_le(fd1, fd0);
    ck_assert_msg(rss1 - rss0 <= bound_kib, "RSS grew by %ld KiB over %d cycles (bound %ld KiB)",
                  rss1 - rss0, n, bound_kib);
    /* docs/internals.md, "How the hub keeps it", 2: a PUBLISH answered 0
     * receivers means our subscription is gone only if the channel was
     * still subscribed when Redis ran it; a channel whose last subscriber
     * left meanwhile has no one here to hand the message to. */
    ck_assert_msg(!dropped && !cyc_refused_sub && !cyc_refused_pub,
                  "Redis healthy, yet the hub dropped its subscriber connection %lld times (\"a "
                  "PUBLISH to a channel it has subscribed reached no subscriber\") and answered "
                  "%ld subscribes and %ld publishes unavailable", dropped, cyc_refused_sub,
                  cyc_refused_pub);
    ws_free(pub);
    ck_assert_int_eq(hub_stop(h), 0);
    if (redis)
        srv_stop(&r);
}

START_TEST(cycles_5000) { connect_cycles(5000, 512, 0); }
END_TEST
START_TEST(cycles_5000_redis) { connect_cycles(5000, 512, 1); }
END_TEST
START_TEST(cycles_50000) { connect_cycles(50000, 1024, 0); }
END_TEST
START_TEST(cycles_50000_redis) { connect_cycles(50000, 1024, 1); }
END_TEST

/* ------------------------------------------------------------------ */
/* 7. valgrind with live clients at SIGTERM                             */
/* ------------------------------------------------------------------ */

#ifndef FAULT_SANITIZED

/* The first line of `text` containing `needle`, without its "==PID== "
 * prefix, into `out`; "" if none. */
static void vg_line(const char *text, const char *needle, char *out, size_t cap)
{
    const char *p = strstr(text, needle);
    out[0] = '\0';
    if (!p)
        return;
    while (p > text && p[-1] != '\n' && p[-1] != ' ')
        p--;
    snprintf(out, cap, "%.*s", (int)strcspn(p, "\n"), p);
}

/* Under valgrind: `cycles` connection cycles first (the soak), then live
 * clients, SIGTERM. */
static void valgrind_sigterm(int cycles)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    const char *real = getenv("LUAHUB_BIN");
    ck_assert(real && *real);
    char *keep = strdup(real);
    const char *tmp = getenv("TMPDIR");
    char dir[256];
    snprintf(dir, sizeof dir, "%s/faultvg.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    ck_assert(mkdtemp(dir) != NULL);
    char *wrapper = ht_asprintf("%s/luahub-vg", dir), *vglog = ht_asprintf("%s/vg.log", dir);
    FILE *f = fopen(wrapper, "w");
    ck_assert(f != NULL);
    fprintf(f, "#!/bin/sh\nexec valgrind --leak-check=full --show-leak-kinds=definite "
               "--errors-for-leak-kinds=definite --error-exitcode=99 --log-file=%s %s \"$@\"\n",
            vglog, keep);
    ck_assert_int_eq(fclose(f), 0);
    ck_assert_int_eq(chmod(wrapper, 0700), 0);
    setenv("LUAHUB_BIN", wrapper, 1);
    char conf[512];
    snprintf(conf, sizeof conf, "broker = \"redis://127.0.0.1:%d?command_timeout_ms=20000\"\n"
             "shutdown_timeout = 5\ncommand_rate = 0\npublish_rate = 0\n", r.port);
    struct hub_opts o = {.start_timeout_ms = 120000};
    struct hub *h = hub_start_opts(conf, &o);
    setenv("LUAHUB_BIN", keep, 1);
    fl_wait_healthz(h->port, 200, 1, 120000);

    enum { NSUB = 4 };
    struct ws *sub[NSUB], *pub = ws_connect(h->port), *mute = ws_connect(h->port);
    for (int i = 0; i < NSUB; i++) {
        sub[i] = ws_connect(h->port);
        ws_subscribe(sub[i], i % 2 ? "vg:a" : "vg:b");
    }
    ws_subscribe(mute, "vg:a");        /* never reads: deliveries stay queued */
    for (int k = 0; k < 20; k++) {
        char data[16];
        snprintf(data, sizeof data, "%d", k);
        ws_publish(pub, k % 2 ? "vg:a" : "vg:b", data);
        char *want = ws_delivery(k % 2 ? "vg:a" : "vg:b", data);
        for (int i = 0; i < NSUB; i++)
            if (i % 2 == k % 2)
                ws_expect(sub[i], want);
        free(want);
    }
    if (cycles)
        run_cycles(h->port, pub, cycles);
    int half = tcp_connect(h->port);    /* an HTTP request cut in the middle */
    tcp_send(half, "POST /api/publish HTTP/1.1\r\nContent-Le", 39);
    fl_wait_healthz(h->port, 200, 1, 120000);

    hub_signal(h, SIGTERM);
    for (int i = 0; i < NSUB; i++)
        ws_expect_close(sub[i], 1001);
    int st = hub_wait_exit(h, 120000);
    char *log = NULL;
    {
        FILE *lf = fopen(vglog, "r");
        ck_assert_msg(lf != NULL, "no valgrind log %s", vglog);
        static char buf[1 << 20];
        size_t n = fread(buf, 1, sizeof buf - 1, lf);
        fclose(lf);
        buf[n] = '\0';
        log = strdup(buf);
    }
    char errors[200], definite[200], freed[200];
    vg_line(log, "ERROR SUMMARY:", errors, sizeof errors);
    vg_line(log, "definitely lost:", definite, sizeof definite);
    vg_line(log, "All heap blocks were freed", freed, sizeof freed);
    printf("[fault] valgrind, %d connection cycles, then SIGTERM with %d live subscribers, a "
           "non-reading one, a half-sent HTTP request and Redis connections: exit %d; %s; %s\n",
           cycles, NSUB, st, errors, freed[0] ? freed : definite);
    ck_assert_msg(st == 0, "the hub under valgrind exited %d; valgrind log:\n%s", st, log);
    ck_assert_msg(strstr(errors, "ERROR SUMMARY: 0 errors"), "valgrind log:\n%s", log);
    ck_assert_msg(freed[0] || strstr(definite, "definitely lost: 0 bytes"), "valgrind log:\n%s",
                  log);
    close(half);
    ws_free(mute);
    ws_free(pub);
    for (int i = 0; i < NSUB; i++)
        ws_free(sub[i]);
    ck_assert_int_eq(hub_stop(h), 0);
    srv_stop(&r);
    unlink(vglog);
    unlink(wrapper);
    rmdir(dir);
    free(log);
    free(vglog);
    free(wrapper);
    free(keep);
}

START_TEST(valgrind_sigterm_live_clients) { valgrind_sigterm(0); }
END_TEST
START_TEST(valgrind_after_cycles) { valgrind_sigterm(2000); }
END_TEST

#endif

TCase *fault_host_tcase(int soak)
{
    TCase *tc = tcase_create("host");
    tcase_set_timeout(tc, soak ? 900 : 180);
    if (soak) {
        tcase_add_test(tc, cycles_50000);
        tcase_add_test(tc, cycles_50000_redis);
#ifndef FAULT_SANITIZED
        tcase_add_test(tc, valgrind_after_cycles);
#endif
    } else {
        tcase_add_test(tc, descriptors_exhausted);
        tcase_add_test(tc, cycles_5000);
        tcase_add_test(tc, cycles_5000_redis);
#ifndef FAULT_SANITIZED
        tcase_add_test(tc, valgrind_sigterm_live_clients);
#endif
    }
    return tc;
}
