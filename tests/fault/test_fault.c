/* The fault suite (issue 13; tests/fault/README.md): faults under a steady,
 * counted publish. Two hubs (or one with two workers) on one redis-server
 * that the test starts on a free loopback port; publishers on both hubs
 * (one over WebSocket, one over HTTP), three subscribers on each; every
 * subscriber's stream is counted by tests/fault/faultload (delivered, lost,
 * duplicated, reordered; the rules are in faultload.h) and printed as one
 * "[fault] ..." line per scenario. Each scenario runs on a plain channel
 * and on a history channel (conf `channels = { ["h:*"] = {...} }`).
 *
 *   1. Redis SIGSTOPped for 5 s, then SIGCONT;
 *   2. Redis killed -9 and restarted empty on its port;
 *   3. CLIENT KILL TYPE pubsub, then one hub's subscriber connection
 *      alone, then CLIENT KILL TYPE normal;
 *   4. a worker (workers = 2) killed -9: its clients reconnect (with
 *      recovery on the history channel, as a client would);
 *   5-7 (descriptors, connection cycles, valgrind): fault_host.c.
 *
 * `test_fault` runs the fast suite (make test); `test_fault soak` the long
 * one (make soak): the Redis faults three times in one run, 50,000
 * connection cycles, valgrind after 2,000 cycles. Only processes the test
 * started are signalled, by PID; every wait is bounded; nothing asserts on
 * time. */
#include <check.h>
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fault.h"
#include "faultload.h"
#include "hubtest.h"
#include "redistest.h"

enum { RATE = 150, NSUB = 6, MORE = 100 };

/* A hub on the Redis of `port`: no rate limits (the publishers are the
 * load), room for the queues, a history namespace h:* with room for every
 * message of a run and a recovery that may reach back that far. */
static struct hub *start_hub(int port, const char *extra)
{
    char conf[1024];
    snprintf(conf, sizeof conf,
             "broker = \"redis://127.0.0.1:%d\"\n"
             "shutdown_timeout = 2\n"
             "max_queue_bytes = 16777216\n"
             "command_rate = 0\npublish_rate = 0\n"
             "recover_max = 10000\n"
             "channels = { [\"h:*\"] = { history_size = 10000, history_ttl = 600 } }\n%s",
             port, extra ? extra : "");
    return hub_start(conf);
}

/* Two hubs on one Redis, the load running. */
struct rig {
    struct srv r;
    struct hub *hub[2];
    struct fl_run *run;
};

static void rig_start(struct rig *g, int history, const char *what)
{
    memset(g, 0, sizeof *g);
    srv_start(&g->r, 0, NULL);
    for (int k = 0; k < 2; k++)
        g->hub[k] = start_hub(g->r.port, NULL);
    for (int k = 0; k < 2; k++)
        fl_wait_healthz(g->hub[k]->port, 200, 1, FL_LONG_MS);
    struct fl_spec sp = {
        .what = what, .history = history, .rate = RATE,
        .npub = 2, .kind = {FL_WS, FL_HTTP},
        .nsub = NSUB, .nhubs = 2, .port = {g->hub[0]->port, g->hub[1]->port},
    };
    g->run = fl_start(&sp);
    fl_more_ok(g->run, MORE);
}

static void rig_healthy(struct rig *g)
{
    for (int k = 0; k < 2; k++)
        fl_wait_healthz(g->hub[k]->port, 200, 3, FL_LONG_MS);
}

static void rig_finish(struct rig *g, struct fl_totals *t)
{
    rig_healthy(g);
    fl_finish(g->run, t);
    for (int k = 0; k < 2; k++)
        ck_assert_int_eq(hub_stop(g->hub[k]), 0);
    srv_stop(&g->r);
}

/* A counter of both hubs: each must reach its value in `base` (filled by
 * the caller before the fault) plus one. */
static void both_metric_next(struct rig *g, const char *series, const long long base[2])
{
    for (int k = 0; k < 2; k++)
        hub_metric_wait(g->hub[k], series, base[k] + 1, FL_LONG_MS);
}

static void both_metric(struct rig *g, const char *series, long long out[2])
{
    for (int k = 0; k < 2; k++)
        out[k] = hub_metric(g->hub[k], series);
}

/* ------------------------------------------------------------------ */
/* 1. SIGSTOP 5 s                                                       */
/* ------------------------------------------------------------------ */

/* docs/internals.md, "How the hub keeps it", 5: a stopped Redis is noticed
 * by the probe within 1 s + command_timeout_ms, connections are dropped,
 * publishes refused. Plain channel: each hub resubscribes after SIGCONT;
 * what the other hub published meanwhile may be lost for a hub whose
 * subscription was down (excused in the window). History channel: the
 * catch-up after reconnecting reads the stream, which Redis kept: no
 * loss and no reset. */
static void sigstop_5s(int history, int rounds)
{
    struct rig g;
    rig_start(&g, history, rounds > 1 ? "soak: Redis SIGSTOP 5 s, 3 times" : "Redis SIGSTOP 5 s");
    for (int k = 0; k < rounds; k++) {
        long long refused = fl_not_ok(g.run);
        fl_fault_begin(g.run);
        srv_sigstop(&g.r);
        sleep_ms(5000);              /* the fault itself */
        ck_assert_int_eq(kill(g.r.pid, SIGCONT), 0);
        rig_healthy(&g);
        fl_fault_end(g.run);
        ck_assert_msg(fl_not_ok(g.run) > refused, "Redis stopped 5 s and no publish refused");
        fl_more_ok(g.run, MORE);
    }
    struct fl_totals t;
    rig_finish(&g, &t);
    if (history)
        ck_assert_msg(!t.resets, "%lld resets although Redis kept the stream (the gaps can be "
                      "read back)", t.resets);
}

START_TEST(sigstop_plain) { sigstop_5s(0, 1); }
END_TEST
START_TEST(sigstop_history) { sigstop_5s(1, 1); }
END_TEST

/* ------------------------------------------------------------------ */
/* 2. kill -9 and restart, empty                                        */
/* ------------------------------------------------------------------ */

/* docs/broker.md: "a message Redis accepted just before a crash may be lost
 * for other processes' subscribers" (plain: the window). History: Redis
 * comes back empty, so the stream starts again with a new epoch; what was
 * not delivered cannot be read back, and every subscriber must be told by
 * a reset naming the new epoch (docs/protocol.md, Deliveries). */
static void kill9_restart(int history, int rounds)
{
    struct rig g;
    rig_start(&g, history, rounds > 1 ? "soak: Redis kill -9 and restart, 3 times"
                                      : "Redis kill -9 and restart");
    int port = g.r.port;
    for (int k = 0; k < rounds; k++) {
        fl_fault_begin(g.run);
        srv_kill(&g.r);
        for (int h = 0; h < 2; h++)
            fl_wait_healthz(g.hub[h]->port, 503, 1, FL_LONG_MS);
        /* publishing goes on into the outage: refused */
        long long refused = fl_not_ok(g.run);
        int64_t dl = ht_now_ms() + FL_LONG_MS;
        while (fl_not_ok(g.run) < refused + 20) {
            ck_assert_msg(ht_now_ms() < dl, "no publish refused while Redis was down");
            sleep_ms(10);
        }
        srv_start(&g.r, port, NULL);
        rig_healthy(&g);
        fl_fault_end(g.run);
        fl_more_ok(g.run, MORE);
    }
    struct fl_totals t;
    rig_finish(&g, &t);
    if (history) {
        ck_assert_msg(t.subs_with_new_epoch == NSUB && t.new_epoch_resets >= rounds * NSUB,
                      "Redis restarted empty %d times: %d of %d subscribers were told the new "
                      "epoch (%lld resets naming one)", rounds, t.subs_with_new_epoch, NSUB,
                      t.new_epoch_resets);
    }
}

START_TEST(kill9_plain) { kill9_restart(0, 1); }
END_TEST
START_TEST(kill9_history) { kill9_restart(1, 1); }
END_TEST

/* ------------------------------------------------------------------ */
/* 3. CLIENT KILL TYPE pubsub, one hub's pubsub, TYPE normal             */
/* ------------------------------------------------------------------ */

/* Local ports of the TCP connections of process `pid` to 127.0.0.1:`port`
 * (its socket inodes in /proc/PID/fd, looked up in /proc/net/tcp). */
static int ports_to(pid_t pid, int port, int *out, int max)
{
    char path[64], link[64];
    unsigned long inodes[256];
    int ni = 0, n = 0;
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    ck_assert(d != NULL);
    struct dirent *e;
    while ((e = readdir(d)) != NULL && ni < 256) {
        char fd[330];
        snprintf(fd, sizeof fd, "%s/%s", path, e->d_name);
        ssize_t l = readlink(fd, link, sizeof link - 1);
        if (l > 0) {
            link[l] = '\0';
            if (sscanf(link, "socket:[%lu]", &inodes[ni]) == 1)
                ni++;
        }
    }
    closedir(d);
    FILE *f = fopen("/proc/net/tcp", "r");
    ck_assert(f != NULL);
    char line[512];
    while (fgets(line, sizeof line, f) && n < max) {
        unsigned lport, rport;
        unsigned long inode;
        if (sscanf(line, " %*d: %*x:%x %*x:%x %*x %*x:%*x %*x:%*x %*x %*d %*d %lu", &lport,
                   &rport, &inode) != 3 || (int)rport != port)
            continue;
        for (int i = 0; i < ni; i++)
            if (inodes[i] == inode)
                out[n++] = (int)lport;
    }
    fclose(f);
    return n;
}

#define LOST_PUBSUB "luahub_broker_link_lost_total{link=\"pubsub\",cause=\"closed\"}"
#define LOST_CMD "luahub_broker_link_lost_total{link=\"cmd\",cause=\"closed\"}"

/* CLIENT KILL of hub k's subscriber connection alone. */
static void kill_pubsub_of(struct rig *g, int k)
{
    int ports[16];
    int n = ports_to(g->hub[k]->pid, g->r.port, ports, 16);
    ck_assert_msg(n >= 2, "hub %d has %d connections to Redis", k, n);
    redisReply *cl = srv_cmd(&g->r, "CLIENT LIST TYPE pubsub");
    ck_assert_int_eq(cl->type, REDIS_REPLY_STRING);
    int victim = 0;
    for (const char *p = cl->str; (p = strstr(p, "addr=127.0.0.1:")) != NULL; p++) {
        int cport = atoi(p + strlen("addr=127.0.0.1:"));
        for (int i = 0; i < n; i++)
            if (ports[i] == cport)
                victim = cport;
    }
    freeReplyObject(cl);
    ck_assert_msg(victim, "no pubsub client of hub %d in CLIENT LIST", k);
    redisReply *kr = srv_cmd(&g->r, "CLIENT KILL ADDR 127.0.0.1:%d", victim);
    ck_assert_msg(kr->type == REDIS_REPLY_INTEGER && kr->integer == 1,
                  "CLIENT KILL ADDR 127.0.0.1:%d did not kill one client", victim);
    freeReplyObject(kr);
}

/* TYPE pubsub: both hubs lose their subscriber connection
 * (docs/internals.md: other hubs' subscribers may miss what is published
 * meanwhile: the window; hubs dropped together refuse their publishes
 * together, so little is published then). One hub's alone: the other hub
 * publishes on while it resubscribes, so its subscribers miss messages
 * (plain: the window) or the hub must read them back from the stream
 * (history). TYPE normal: only command connections go; every subscription
 * stays live, so no subscriber may lose an acknowledged message (no
 * window). History: gaps are repaired from the stream: no reset. */
static void client_kill(int history, int rounds)
{
    struct rig g;
    rig_start(&g, history, rounds > 1 ? "soak: CLIENT KILL pubsub (all, one hub's), normal, 3 times"
                                      : "CLIENT KILL pubsub (all, one hub's), normal");
    for (int k = 0; k < rounds; k++) {
        long long lost[2];
        both_metric(&g, LOST_PUBSUB, lost);
        fl_fault_begin(g.run);
        redisReply *kr = srv_cmd(&g.r, "CLIENT KILL TYPE pubsub");
        ck_assert_int_eq(kr->type, REDIS_REPLY_INTEGER);
        ck_assert_int_eq(kr->integer, 2);       /* one subscriber connection per hub */
        freeReplyObject(kr);
        both_metric_next(&g, LOST_PUBSUB, lost);
        rig_healthy(&g);
        fl_fault_end(g.run);
        fl_more_ok(g.run, MORE);

        int one = k % 2;
        long long one_lost = hub_metric(g.hub[one], LOST_PUBSUB);
        fl_fault_begin(g.run);
        kill_pubsub_of(&g, one);
        hub_metric_wait(g.hub[one], LOST_PUBSUB, one_lost + 1, FL_LONG_MS);
        rig_healthy(&g);
        fl_fault_end(g.run);
        fl_more_ok(g.run, MORE);

        both_metric(&g, LOST_CMD, lost);
        kr = srv_cmd(&g.r, "CLIENT KILL TYPE normal");
        ck_assert_int_eq(kr->type, REDIS_REPLY_INTEGER);
        ck_assert_int_ge(kr->integer, 2);       /* each hub's command connection */
        freeReplyObject(kr);
        both_metric_next(&g, LOST_CMD, lost);
        rig_healthy(&g);
        fl_more_ok(g.run, MORE);
    }
    struct fl_totals t;
    rig_finish(&g, &t);
    if (history)
        ck_assert_msg(!t.resets, "%lld resets although Redis kept the stream", t.resets);
}

START_TEST(client_kill_plain) { client_kill(0, 1); }
END_TEST
START_TEST(client_kill_history) { client_kill(1, 1); }
END_TEST

/* ------------------------------------------------------------------ */
/* 4. A worker killed -9                                                */
/* ------------------------------------------------------------------ */

/* PID of the worker whose start-up line names `instance`. */
static pid_t worker_pid(struct hub *h, const char *instance)
{
    char *log = hub_log(h), *tag = ht_asprintf(", instance %s,", instance);
    const char *at = strstr(log, tag);
    ck_assert_msg(at, "no start-up line of instance %s in the log", instance);
    while (at > log && strncmp(at, "(pid ", 5))
        at--;
    int pid = 0;
    ck_assert_msg(sscanf(at, "(pid %d,", &pid) == 1 && pid > 0, "no pid before %s", tag);
    free(tag);
    free(log);
    return (pid_t)pid;
}

static void wait_log_count(struct hub *h, const char *needle, int n)
{
    int64_t dl = ht_now_ms() + FL_LONG_MS;
    while (hub_log_count(h, needle) < n) {
        ck_assert_msg(ht_now_ms() < dl, "%d \"%s\" lines in the log, expected %d",
                      hub_log_count(h, needle), needle, n);
        sleep_ms(10);
    }
}

/* workers = 2; three subscribers and a WebSocket publisher on each. One
 * worker is killed -9 mid-run: its clients see their connection drop and
 * reconnect (to the other worker, or to the one the supervisor starts in
 * its place) and subscribe again, with recovery from their last offset on
 * the history channel. Plain: they may lose what was queued to them or
 * published until their new subscribe reply ("reconnect"); the other
 * worker's subscribers lose nothing. History: nothing is lost, every
 * recovery says recovered:true, no reset. */
static void worker_kill(int history)
{
    struct srv r = {0};
    srv_start(&r, 0, NULL);
    struct hub *h = start_hub(r.port, "workers = 2\n");
    wait_log_count(h, "listening on", 2);
    fl_wait_healthz(h->port, 200, 5, FL_LONG_MS);
    struct fl_spec sp = {
        .what = "worker kill -9 (workers = 2)", .history = history, .rate = RATE,
        .npub = 2, .kind = {FL_WS, FL_WS},
        .nsub = NSUB, .nhubs = 2, .port = {h->port}, .shared_port = 1, .reconnect = 1,
    };
    struct fl_run *run = fl_start(&sp);
    fl_more_ok(run, MORE);
    pid_t victim = worker_pid(h, fl_instance(run, 0));
    ck_assert_int_ne(victim, h->pid);
    ck_assert_int_eq(kill(victim, SIGKILL), 0);
    char *line = ht_asprintf("(pid %d) killed by signal 9; restarting", (int)victim);
    hub_log_wait(h, line, FL_LONG_MS);
    free(line);
    wait_log_count(h, "listening on", 3);
    fl_more_ok(run, MORE);
    fl_more_ok(run, MORE);
    fl_wait_healthz(h->port, 200, 5, FL_LONG_MS);
    struct fl_totals t;
    fl_finish(run, &t);
    ck_assert_msg(t.reconnects >= NSUB / 2, "%lld subscribers reconnected, expected the %d of "
                  "the killed worker", t.reconnects, NSUB / 2);
    ck_assert_int_eq(t.lost_window, 0);
    if (history)
        ck_assert_msg(t.recoveries >= NSUB / 2 && !t.unrecovered && !t.resets,
                      "%lld recoveries, %lld not recovered, %lld resets: Redis kept the stream",
                      t.recoveries, t.unrecovered, t.resets);
    ck_assert_int_eq(hub_stop(h), 0);
    srv_stop(&r);
}

START_TEST(worker_kill_plain) { worker_kill(0); }
END_TEST
START_TEST(worker_kill_history) { worker_kill(1); }
END_TEST

/* ------------------------------------------------------------------ */
/* Soak: the Redis faults three times in one run                        */
/* ------------------------------------------------------------------ */

START_TEST(soak_sigstop) { sigstop_5s(_i, 3); }
END_TEST
START_TEST(soak_kill9) { kill9_restart(_i, 3); }
END_TEST
START_TEST(soak_client_kill) { client_kill(_i, 3); }
END_TEST

/* ------------------------------------------------------------------ */

static Suite *fast_suite(void)
{
    Suite *s = suite_create("fault");
    TCase *tc = tcase_create("redis");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, sigstop_plain);
    tcase_add_test(tc, sigstop_history);
    tcase_add_test(tc, kill9_plain);
    tcase_add_test(tc, kill9_history);
    tcase_add_test(tc, client_kill_plain);
    tcase_add_test(tc, client_kill_history);
    suite_add_tcase(s, tc);
    tc = tcase_create("workers");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, worker_kill_plain);
    tcase_add_test(tc, worker_kill_history);
    suite_add_tcase(s, tc);
    suite_add_tcase(s, fault_host_tcase(0));
    return s;
}

static Suite *soak_suite(void)
{
    Suite *s = suite_create("soak");
    TCase *tc = tcase_create("redis_rounds");
    tcase_set_timeout(tc, 600);
    /* _i: 0 plain channel, 1 history channel */
    tcase_add_loop_test(tc, soak_sigstop, 0, 2);
    tcase_add_loop_test(tc, soak_kill9, 0, 2);
    tcase_add_loop_test(tc, soak_client_kill, 0, 2);
    suite_add_tcase(s, tc);
    suite_add_tcase(s, fault_host_tcase(1));
    return s;
}

int main(int argc, char **argv)
{
    int soak = argc > 1 && !strcmp(argv[1], "soak");
    if (argc > 2 || (argc == 2 && !soak)) {
        fprintf(stderr, "usage: %s [soak]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    SRunner *sr = srunner_create(soak ? soak_suite() : fast_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
