/* The connection registry and instance heartbeat (src/registry.c) against
 * a real redis-server this suite starts on a free loopback port.
 *
 * Two registries, each on its own redis broker, on one loop stand in for
 * two instances; the kill -9 test runs a third instance in a forked child
 * and SIGKILLs it. Registries are created with short TTLs (test-only
 * options) so expiry takes seconds, not 30 s. Every wait is bounded (WAIT),
 * no fixed ports, redis-server is stopped by PID (and dies with us via
 * PR_SET_PDEATHSIG). Numbers are printed as "[measure] ...", never
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
#include <yajl/yajl_tree.h>

#include "luahub/broker.h"
#include "luahub/registry.h"
#include "luahub/util.h"

#define WAIT_MS 15000
#define NINST 2

#include "redistest.h"


/* ------------------------------------------------------------------ */
/* Instances: a broker and a registry each, on one loop                */
/* ------------------------------------------------------------------ */

struct inst {
    struct hub_broker *b;
    struct hub_registry *reg;
    char id[16];
    char disc[8][64];           /* users disconnect_user was called with */
    int ndisc;
};

static struct {
    uv_loop_t loop;
    uv_timer_t tick;
    struct srv srv;
    struct inst in[NINST];
    char logpath[64];
    int saved_stderr;
} T;

/* Runs the loop until `cond` holds or `ms` pass; evaluates to cond. */
#define WAIT(cond, ms) LOOP_WAIT(&T.loop, &T.tick, cond, ms)

static void pump(int ms)
{
    (void)WAIT(0, ms);
}

static void on_deliver(void *ud, const char *channel, size_t len, struct hub_msg *m,
                       const char *epoch)
{
    (void)epoch;
    (void)ud, (void)channel, (void)len, (void)m;
}

static void on_disconnect_user(void *ud, const char *user, size_t len)
{
    struct inst *in = ud;
    if (in->ndisc < 8)
        snprintf(in->disc[in->ndisc++], 64, "%.*s", (int)len, user);
}

static const char *url_of(const struct srv *s)
{
    static char u[128];
    /* Short timeouts: a dead Redis is noticed quickly. */
    snprintf(u, sizeof(u), "redis://127.0.0.1:%d?command_timeout_ms=1000&connect_timeout_ms=500",
             s->port);
    return u;
}

/* Creates instance `i` ("inst0000000i") on `url` with `ttl_ms`/`refresh_ms`
 * (0: the defaults, 30 s / 10 s). */
static struct inst *mk(int i, const char *url, unsigned ttl_ms, unsigned refresh_ms,
                       unsigned max_unreg)
{
    struct inst *in = &T.in[i];
    char err[256] = "";
    in->b = hub_broker_new(&T.loop, url, NULL, on_deliver, NULL, NULL, err, sizeof(err));
    ck_assert_msg(in->b != NULL, "hub_broker_new: %s", err);
    snprintf(in->id, sizeof(in->id), "inst%08d", i);
    char addr[32];
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", 8000 + i);
    struct hub_registry_options o = {
        .instance = in->id,
        .address = addr,
        .ttl_ms = ttl_ms,
        .refresh_ms = refresh_ms,
        .max_unregisters = max_unreg,
        .disconnect_user = on_disconnect_user,
        .ud = in,
    };
    in->reg = hub_broker_registry_new(in->b, &o);
    return in;
}

static void env_init(void)
{
    memset(&T, 0, sizeof(T));
    T.saved_stderr = -1;
    ck_assert_int_eq(uv_loop_init(&T.loop), 0);
    uv_timer_init(&T.loop, &T.tick);
    signal(SIGPIPE, SIG_IGN);
}

static void log_release(void);

/* Stops registries then brokers, drains the loop (bounded), frees. */
static void env_finish(void)
{
    for (int i = 0; i < NINST; i++)
        if (T.in[i].reg)
            hub_registry_stop(T.in[i].reg);
    for (int i = 0; i < NINST; i++)
        if (T.in[i].b)
            T.in[i].b->ops->stop(T.in[i].b);
    uv_close((uv_handle_t *)&T.tick, NULL);
    int64_t dl = now_ms() + WAIT_MS;
    while (uv_loop_alive(&T.loop) && now_ms() < dl)
        uv_run(&T.loop, UV_RUN_NOWAIT);
    ck_assert_msg(!uv_loop_alive(&T.loop), "the loop did not drain after stop()");
    for (int i = 0; i < NINST; i++) {
        hub_registry_free(T.in[i].reg);
        if (T.in[i].b)
            T.in[i].b->ops->free(T.in[i].b);
        T.in[i].reg = NULL;
        T.in[i].b = NULL;
    }
    ck_assert_int_eq(uv_loop_close(&T.loop), 0);
    srv_stop(&T.srv);
    log_release();
}

/* Logs go to stderr; tests that check them capture it in a file. */
static void log_capture(void)
{
    snprintf(T.logpath, sizeof(T.logpath), "/tmp/regtest-log.XXXXXX");
    int fd = mkstemp(T.logpath);
    ck_assert(fd >= 0);
    fflush(stderr);
    T.saved_stderr = dup(2);
    dup2(fd, 2);
    close(fd);
}

static int log_count(const char *needle)
{
    fflush(stderr);
    FILE *f = fopen(T.logpath, "r");
    ck_assert(f != NULL);
    char line[2048];
    int n = 0;
    while (fgets(line, sizeof(line), f))
        if (strstr(line, needle))
            n++;
    fclose(f);
    return n;
}

static void log_release(void)
{
    if (T.saved_stderr < 0)
        return;
    fflush(stderr);
    dup2(T.saved_stderr, 2);
    close(T.saved_stderr);
    T.saved_stderr = -1;
    unlink(T.logpath);
}

/* ------------------------------------------------------------------ */
/* Redis inspection (blocking admin connection, bounded timeouts)      */
/* ------------------------------------------------------------------ */

static int key_exists(const char *fmt, ...)
{
    char key[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key, sizeof(key), fmt, ap);
    va_end(ap);
    redisReply *r = srv_cmd(&T.srv, "EXISTS %s", key);
    int n = (int)r->integer;
    freeReplyObject(r);
    return n;
}

static long long pttl(const char *key)
{
    redisReply *r = srv_cmd(&T.srv, "PTTL %s", key);
    long long n = r->integer;
    freeReplyObject(r);
    return n;
}

/* HGET as a static string ("" when absent). */
static const char *hget(const char *key, const char *field)
{
    static char out[4][128];
    static int k;
    char *o = out[k++ & 3];
    redisReply *r = srv_cmd(&T.srv, "HGET %s %s", key, field);
    snprintf(o, 128, "%s", r->type == REDIS_REPLY_STRING ? r->str : "");
    freeReplyObject(r);
    return o;
}

static int sismember(const char *key, const char *member)
{
    redisReply *r = srv_cmd(&T.srv, "SISMEMBER %s %s", key, member);
    int n = (int)r->integer;
    freeReplyObject(r);
    return n;
}

/* A number from the registry's metrics text (-1 when absent). */
static long long rmetric(struct inst *in, const char *series)
{
    struct hub_buf b = {0};
    hub_registry_metrics(in->reg, &b);
    long long v = -1;
    size_t sl = strlen(series);
    for (const char *p = b.p; p && *p;) {
        if (strncmp(p, series, sl) == 0 && p[sl] == ' ') {
            v = atoll(p + sl + 1);
            break;
        }
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    hub_buf_free(&b);
    return v;
}

static int hb_count(struct inst *in)
{
    return (int)rmetric(in, "luahub_registry_heartbeats_total");
}

/* ------------------------------------------------------------------ */
/* Query helpers                                                       */
/* ------------------------------------------------------------------ */

struct lres {
    int calls, status;
    char *json;
};

static void on_list(void *ud, int status, const char *json, size_t len)
{
    struct lres *r = ud;
    r->calls++;
    r->status = status;
    free(r->json);
    r->json = json ? strndup(json, len) : NULL;
}

struct dres {
    int calls, status;
    long long instances;
};

static void on_done(void *ud, int status, long long instances)
{
    struct dres *r = ud;
    r->calls++;
    r->status = status;
    r->instances = instances;
}

/* connections(user) on instance `i`: the parsed JSON (free it), asserted
 * OK. */
static yajl_val list_ok(int i, const char *user)
{
    struct lres r = {0};
    int rc = hub_registry_connections(T.in[i].reg, user, strlen(user), on_list, &r);
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(WAIT(r.calls > 0, WAIT_MS), "connections(%s) did not complete", user);
    ck_assert_int_eq(r.calls, 1);
    ck_assert_int_eq(r.status, HUB_OK);
    char err[128];
    yajl_val v = yajl_tree_parse(r.json, err, sizeof(err));
    ck_assert_msg(v != NULL, "not JSON (%s): %s", err, r.json);
    free(r.json);
    return v;
}

static size_t list_count(yajl_val v)
{
    const char *p[] = {"connections", NULL};
    yajl_val a = yajl_tree_get(v, p, yajl_t_array);
    ck_assert(a != NULL);
    const char *c[] = {"count", NULL};
    yajl_val n = yajl_tree_get(v, c, yajl_t_number);
    ck_assert(n != NULL);
    ck_assert_int_eq((size_t)YAJL_GET_INTEGER(n), a->u.array.len);
    return a->u.array.len;
}

/* The entry of `client` in a list (field `field` as a string / number). */
static yajl_val list_find(yajl_val v, const char *client)
{
    const char *p[] = {"connections", NULL};
    yajl_val a = yajl_tree_get(v, p, yajl_t_array);
    for (size_t i = 0; a && i < a->u.array.len; i++) {
        const char *cp[] = {"client", NULL};
        yajl_val c = yajl_tree_get(a->u.array.values[i], cp, yajl_t_string);
        if (c && strcmp(c->u.string, client) == 0)
            return a->u.array.values[i];
    }
    return NULL;
}

static const char *field_str(yajl_val e, const char *f)
{
    const char *p[] = {f, NULL};
    yajl_val s = yajl_tree_get(e, p, yajl_t_string);
    return s ? s->u.string : "";
}

static long long field_int(yajl_val e, const char *f)
{
    const char *p[] = {f, NULL};
    yajl_val s = yajl_tree_get(e, p, yajl_t_number);
    return s ? YAJL_GET_INTEGER(s) : -1;
}

static void start_two(unsigned ttl, unsigned refresh)
{
    env_init();
    srv_start(&T.srv, 0, NULL);
    mk(0, url_of(&T.srv), ttl, refresh, 0);
    mk(1, url_of(&T.srv), ttl, refresh, 0);
    ck_assert_msg(WAIT(hb_count(&T.in[0]) > 0 && hb_count(&T.in[1]) > 0, WAIT_MS),
                  "no heartbeat within %d ms", WAIT_MS);
}

/* ------------------------------------------------------------------ */
/* Tests                                                               */
/* ------------------------------------------------------------------ */

START_TEST(t_heartbeat_defaults)
{
    env_init();
    srv_start(&T.srv, 0, NULL);
    struct inst *a = mk(0, url_of(&T.srv), 0, 0, 0);      /* 30 s / 10 s */
    /* Opened before the first heartbeat (first loop iteration): counted. */
    ck_assert_int_eq(hub_registry_conn_open(a->reg, "inst00000000-1", "alice", 5), 1);
    /* Without a user: counted, not registered. */
    ck_assert_int_eq(hub_registry_conn_open(a->reg, "inst00000000-2", NULL, 0), 0);
    ck_assert_int_eq(hub_registry_conn_open(a->reg, "inst00000000-3", NULL, 0), 0);
    ck_assert_uint_eq(hub_registry_local_count(a->reg), 3);
    hub_registry_conn_close(a->reg, "inst00000000-3", 0);
    ck_assert_msg(WAIT(hb_count(a) >= 2, WAIT_MS), "no heartbeat");
    const char *k = "luahub:instance:inst00000000";
    ck_assert_int_eq(key_exists("%s", k), 1);
    long long t = pttl(k);
    ck_assert_msg(t > 0 && t <= 30000, "PTTL %lld", t);
    ck_assert_str_eq(hget(k, "connections"), "2");
    ck_assert_str_eq(hget(k, "address"), "127.0.0.1:8000");
    char pid[16];
    snprintf(pid, sizeof(pid), "%ld", (long)getpid());
    ck_assert_str_eq(hget(k, "pid"), pid);
    long long started = atoll(hget(k, "started"));
    long long now = (long long)time(NULL);
    ck_assert_msg(started > now - 60 && started <= now, "started %lld now %lld", started, now);
    /* The connection with a user is registered, with the same TTL bound. */
    ck_assert_msg(WAIT(key_exists("luahub:conn:inst00000000-1"), WAIT_MS), "conn not registered");
    t = pttl("luahub:conn:inst00000000-1");
    ck_assert_msg(t > 0 && t <= 30000, "conn PTTL %lld", t);
    t = pttl("luahub:user:alice");
    ck_assert_msg(t > 0 && t <= 30000, "user set PTTL %lld", t);
    ck_assert_int_eq(key_exists("luahub:conn:inst00000000-2"), 0);
    ck_assert_int_eq(rmetric(a, "luahub_registry_heartbeat_up"), 1);
    ck_assert_int_eq(rmetric(a, "luahub_registry_connections"), 1);
    ck_assert_uint_eq(hub_registry_local_count(a->reg), 2);
    env_finish();
}
END_TEST

START_TEST(t_heartbeat_refreshed)
{
    start_two(1500, 300);
    struct inst *a = &T.in[0];
    hub_registry_conn_open(a->reg, "inst00000000-1", "bob", 3);
    ck_assert(WAIT(key_exists("luahub:conn:inst00000000-1"), WAIT_MS));
    /* Past several TTLs the keys are still there: refreshed. */
    int64_t t0 = now_ms();
    while (now_ms() - t0 < 4000) {
        pump(250);
        ck_assert_int_eq(key_exists("luahub:instance:inst00000000"), 1);
        ck_assert_int_eq(key_exists("luahub:conn:inst00000000-1"), 1);
        ck_assert_int_eq(key_exists("luahub:user:bob"), 1);
    }
    /* The count follows. */
    hub_registry_conn_open(a->reg, "inst00000000-2", NULL, 0);
    ck_assert_msg(WAIT(strcmp(hget("luahub:instance:inst00000000", "connections"), "2") == 0,
                       WAIT_MS),
                  "connections not updated");
    env_finish();
}
END_TEST

START_TEST(t_conn_register_unregister)
{
    start_two(5000, 1000);
    struct inst *a = &T.in[0];
    hub_registry_conn_open(a->reg, "inst00000000-7", "carol", 5);
    ck_assert(WAIT(key_exists("luahub:conn:inst00000000-7"), WAIT_MS));
    ck_assert_str_eq(hget("luahub:conn:inst00000000-7", "user"), "carol");
    ck_assert_str_eq(hget("luahub:conn:inst00000000-7", "instance"), "inst00000000");
    long long c = atoll(hget("luahub:conn:inst00000000-7", "connected"));
    ck_assert_msg(c > (long long)time(NULL) - 60, "connected %lld", c);
    ck_assert_int_eq(sismember("luahub:user:carol", "inst00000000-7"), 1);

    hub_registry_conn_close(a->reg, "inst00000000-7", 1);
    ck_assert_msg(WAIT(!key_exists("luahub:conn:inst00000000-7"), WAIT_MS), "conn key stays");
    ck_assert(WAIT(!sismember("luahub:user:carol", "inst00000000-7"), WAIT_MS));
    ck_assert_int_eq(rmetric(a, "luahub_registry_connections"), 0);
    ck_assert_uint_eq(hub_registry_local_count(a->reg), 0);

    /* Opened and closed in the same iteration: nothing is left behind. */
    hub_registry_conn_open(a->reg, "inst00000000-8", "carol", 5);
    hub_registry_conn_close(a->reg, "inst00000000-8", 1);
    hub_registry_conn_close(a->reg, "inst00000000-unknown", 1);
    pump(300);
    ck_assert_int_eq(key_exists("luahub:conn:inst00000000-8"), 0);
    ck_assert_int_eq(sismember("luahub:user:carol", "inst00000000-8"), 0);

    /* 1,000 at once: batched, all registered, then all gone. */
    char id[64];
    for (int i = 0; i < 1000; i++) {
        snprintf(id, sizeof(id), "inst00000000-m%d", i);
        hub_registry_conn_open(a->reg, id, i % 2 ? "many" : "other", i % 2 ? 4 : 5);
    }
    ck_assert(WAIT(key_exists("luahub:conn:inst00000000-m999"), WAIT_MS));
    redisReply *r = srv_cmd(&T.srv, "SCARD luahub:user:many");
    ck_assert_int_eq(r->integer, 500);
    freeReplyObject(r);
    for (int i = 0; i < 1000; i++) {
        snprintf(id, sizeof(id), "inst00000000-m%d", i);
        hub_registry_conn_close(a->reg, id, 1);
    }
    ck_assert(WAIT(!key_exists("luahub:user:many") && !key_exists("luahub:user:other"),
                   WAIT_MS));
    ck_assert_int_eq(key_exists("luahub:conn:inst00000000-m0"), 0);
    env_finish();
}
END_TEST

START_TEST(t_connections_across_instances)
{
    start_two(5000, 1000);
    hub_registry_conn_open(T.in[0].reg, "inst00000000-1", "dave", 4);
    hub_registry_conn_open(T.in[0].reg, "inst00000000-2", "dave", 4);
    hub_registry_conn_open(T.in[1].reg, "inst00000001-1", "dave", 4);
    hub_registry_conn_open(T.in[1].reg, "inst00000001-2", "erin", 4);
    hub_registry_conn_open(T.in[1].reg, "inst00000001-3", NULL, 0);
    /* Each instance's registrations go out on the next loop iteration, on
     * its own connection: wait for the other instance's. (Its own are
     * flushed before a query, on the same connection, so they are listed.) */
    ck_assert(WAIT(key_exists("luahub:conn:inst00000001-2"), WAIT_MS));
    for (int i = 0; i < 2; i++) {
        yajl_val v = list_ok(i, "dave");
        ck_assert_int_eq(list_count(v), 3);
        yajl_val e = list_find(v, "inst00000001-1");
        ck_assert(e != NULL);
        ck_assert_str_eq(field_str(e, "user"), "dave");
        ck_assert_str_eq(field_str(e, "instance"), "inst00000001");
        ck_assert(field_int(e, "connected") > (long long)time(NULL) - 60);
        e = list_find(v, "inst00000000-2");
        ck_assert(e != NULL);
        ck_assert_str_eq(field_str(e, "instance"), "inst00000000");
        const char *up[] = {"user", NULL};
        ck_assert_str_eq(yajl_tree_get(v, up, yajl_t_string)->u.string, "dave");
        yajl_tree_free(v);
    }
    yajl_val v = list_ok(0, "erin");
    ck_assert_int_eq(list_count(v), 1);
    yajl_tree_free(v);
    v = list_ok(0, "nobody");
    ck_assert_int_eq(list_count(v), 0);
    yajl_tree_free(v);
    /* A user name that needs JSON escaping. */
    hub_registry_conn_open(T.in[1].reg, "inst00000001-4", "q\"x\\y", 5);
    v = list_ok(1, "q\"x\\y");
    ck_assert_int_eq(list_count(v), 1);
    ck_assert_str_eq(field_str(list_find(v, "inst00000001-4"), "user"), "q\"x\\y");
    yajl_tree_free(v);
    /* Closed on instance 1: gone from the list of instance 0. */
    hub_registry_conn_close(T.in[1].reg, "inst00000001-1", 1);
    pump(200);
    v = list_ok(0, "dave");
    ck_assert_int_eq(list_count(v), 2);
    ck_assert(list_find(v, "inst00000001-1") == NULL);
    yajl_tree_free(v);
    env_finish();
}
END_TEST

START_TEST(t_disconnect_reaches_every_instance)
{
    start_two(5000, 1000);
    /* The control channel is subscribed once the brokers are up. */
    ck_assert(WAIT(T.in[0].b->ops->up(T.in[0].b) && T.in[1].b->ops->up(T.in[1].b), WAIT_MS));
    struct dres d = {0};
    ck_assert_int_eq(hub_registry_disconnect(T.in[0].reg, "frank", 5, on_done, &d), 0);
    ck_assert_msg(WAIT(d.calls && T.in[0].ndisc && T.in[1].ndisc, WAIT_MS),
                  "calls %d, disc %d %d", d.calls, T.in[0].ndisc, T.in[1].ndisc);
    ck_assert_int_eq(d.status, HUB_OK);
    ck_assert_int_eq(d.instances, 2);
    pump(100);
    ck_assert_int_eq(d.calls, 1);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(T.in[i].ndisc, 1);
        ck_assert_str_eq(T.in[i].disc[0], "frank");
    }
    ck_assert_int_eq(rmetric(&T.in[1], "luahub_registry_user_disconnects_total"), 1);
    /* Garbage on the control channel is ignored. */
    redisReply *r = srv_cmd(&T.srv, "PUBLISH luahub:!control %s", "not json");
    freeReplyObject(r);
    r = srv_cmd(&T.srv, "PUBLISH luahub:!control %s", "{\"op\":\"other\"}");
    freeReplyObject(r);
    ck_assert(WAIT(rmetric(&T.in[1], "luahub_registry_control_messages_total") == 3, WAIT_MS));
    ck_assert_int_eq(T.in[1].ndisc, 1);
    env_finish();
}
END_TEST

/* A third instance in a child process, killed with -9. */
static pid_t spawn_instance(int port, unsigned ttl, unsigned refresh)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    ck_assert(pid >= 0);
    if (pid != 0)
        return pid;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(127);
    signal(SIGPIPE, SIG_IGN);
    uv_loop_t loop;
    uv_loop_init(&loop);
    char url[128], err[128];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", port);
    struct hub_broker *b = hub_broker_new(&loop, url, NULL, on_deliver, NULL, NULL, err,
                                          sizeof(err));
    if (!b)
        _exit(126);
    struct hub_registry_options o = {.instance = "child0000009", .address = "127.0.0.1:9",
                                     .ttl_ms = ttl, .refresh_ms = refresh};
    struct hub_registry *reg = hub_broker_registry_new(b, &o);
    hub_registry_conn_open(reg, "child0000009-1", "gina", 4);
    hub_registry_conn_open(reg, "child0000009-2", "shared", 6);
    uv_run(&loop, UV_RUN_DEFAULT);     /* until SIGKILL */
    _exit(0);
}

START_TEST(t_kill9_entries_expire)
{
    const unsigned ttl = 1500;
    start_two(ttl, 300);
    hub_registry_conn_open(T.in[0].reg, "inst00000000-1", "shared", 6);
    pid_t child = spawn_instance(T.srv.port, ttl, 300);
    ck_assert_msg(WAIT(key_exists("luahub:instance:child0000009") &&
                           key_exists("luahub:conn:child0000009-2"),
                       WAIT_MS),
                  "the child instance did not register");
    yajl_val v = list_ok(0, "shared");
    ck_assert_int_eq(list_count(v), 2);
    yajl_tree_free(v);
    /* Still there after a few TTLs while the child lives. */
    pump(2 * ttl);
    ck_assert_int_eq(key_exists("luahub:conn:child0000009-1"), 1);

    kill(child, SIGKILL);
    ck_assert(reap(child, 5000));
    int64_t t0 = now_ms();
    ck_assert_msg(WAIT(!key_exists("luahub:instance:child0000009") &&
                           !key_exists("luahub:conn:child0000009-1") &&
                           !key_exists("luahub:conn:child0000009-2") &&
                           !key_exists("luahub:user:gina"),
                       ttl + 5000),
                  "the dead instance's keys did not expire");
    printf("[measure] kill -9: keys gone %lld ms after the kill (TTL %u ms)\n",
           (long long)(now_ms() - t0), ttl);
    /* The shared user's set is kept alive by instance 0; the dead id is
     * filtered from the answer and removed from the set by the query. */
    ck_assert_int_eq(sismember("luahub:user:shared", "child0000009-2"), 1);
    v = list_ok(1, "shared");
    ck_assert_int_eq(list_count(v), 1);
    ck_assert(list_find(v, "inst00000000-1") != NULL);
    yajl_tree_free(v);
    ck_assert_int_eq(sismember("luahub:user:shared", "child0000009-2"), 0);
    ck_assert_int_eq(key_exists("luahub:instance:inst00000000"), 1);
    env_finish();
}
END_TEST

START_TEST(t_redis_down_fail_fast_and_resume)
{
    env_init();
    log_capture();
    srv_start(&T.srv, 0, NULL);
    struct inst *a = mk(0, url_of(&T.srv), 3000, 300, 100);
    char id[64];
    for (int i = 0; i < 10; i++) {
        snprintf(id, sizeof(id), "inst00000000-%d", i);
        hub_registry_conn_open(a->reg, id, "hank", 4);
    }
    ck_assert(WAIT(key_exists("luahub:conn:inst00000000-9") && hb_count(a) > 0, WAIT_MS));
    int port = T.srv.port;
    srv_kill(&T.srv);
    ck_assert(WAIT(!a->b->ops->up(a->b), WAIT_MS));

    /* Queries fail fast: an error at once, no callback. */
    struct lres lr = {0};
    struct dres dr = {0};
    int64_t t0 = now_ms();
    ck_assert_int_eq(hub_registry_connections(a->reg, "hank", 4, on_list, &lr),
                     HUB_EUNAVAILABLE);
    ck_assert_int_eq(hub_registry_disconnect(a->reg, "hank", 4, on_done, &dr),
                     HUB_EUNAVAILABLE);
    ck_assert_msg(now_ms() - t0 < 100, "not fast: %lld ms", (long long)(now_ms() - t0));
    /* Connections come and go while Redis is down: the unregistrations
     * waiting for Redis stay under the cap (100). */
    for (int i = 0; i < 2000; i++) {
        snprintf(id, sizeof(id), "inst00000000-x%d", i);
        hub_registry_conn_open(a->reg, id, "ivan", 4);
        hub_registry_conn_close(a->reg, id, 1);
        if (i % 200 == 0)
            uv_run(&T.loop, UV_RUN_NOWAIT);
    }
    /* The 10 registered before the outage go too. */
    for (int i = 5; i < 10; i++) {
        snprintf(id, sizeof(id), "inst00000000-%d", i);
        hub_registry_conn_close(a->reg, id, 1);
    }
    pump(1500);
    ck_assert_int_le(rmetric(a, "luahub_registry_unregisters_pending"), 100);
    ck_assert_int_gt(rmetric(a, "luahub_registry_unregisters_dropped_total"), 0);
    ck_assert_int_eq(rmetric(a, "luahub_registry_heartbeat_up"), 0);
    ck_assert_int_gt(rmetric(a, "luahub_registry_heartbeat_errors_total"), 0);
    ck_assert_int_eq(log_count("registry: heartbeat failed"), 1);
    ck_assert_uint_eq(hub_registry_local_count(a->reg), 5);

    /* Redis comes back empty (no persistence): the heartbeat resumes and
     * re-registers what is still open. */
    srv_start(&T.srv, port, NULL);
    int64_t t1 = now_ms();
    ck_assert_msg(WAIT(key_exists("luahub:instance:inst00000000") &&
                           key_exists("luahub:conn:inst00000000-4"),
                       WAIT_MS),
                  "heartbeat did not resume");
    printf("[measure] Redis back: heartbeat and registrations restored in %lld ms\n",
           (long long)(now_ms() - t1));
    ck_assert_str_eq(hget("luahub:instance:inst00000000", "connections"), "5");
    ck_assert_int_eq(key_exists("luahub:conn:inst00000000-5"), 0);
    ck_assert(WAIT(rmetric(a, "luahub_registry_heartbeat_up") == 1 &&
                       rmetric(a, "luahub_registry_unregisters_pending") == 0,
                   WAIT_MS));
    ck_assert_int_eq(log_count("registry: heartbeat resumed"), 1);
    yajl_val v = list_ok(0, "hank");
    ck_assert_int_eq(list_count(v), 5);
    yajl_tree_free(v);
    ck_assert_int_eq(lr.calls + dr.calls, 0);
    env_finish();
}
END_TEST

static int shut_calls;
static void on_shut(void *ud)
{
    (void)ud;
    shut_calls++;
}

START_TEST(t_clean_shutdown)
{
    start_two(5000, 1000);
    struct inst *a = &T.in[0];
    hub_registry_conn_open(a->reg, "inst00000000-1", "jane", 4);
    hub_registry_conn_open(a->reg, "inst00000000-2", "jane", 4);
    hub_registry_conn_open(T.in[1].reg, "inst00000001-1", "jane", 4);
    ck_assert(WAIT(key_exists("luahub:conn:inst00000000-2") &&
                       key_exists("luahub:conn:inst00000001-1"),
                   WAIT_MS));
    shut_calls = 0;
    hub_registry_conn_close(a->reg, "inst00000000-1", 1);
    hub_registry_shutdown(a->reg, on_shut, NULL);
    ck_assert(WAIT(shut_calls == 1, WAIT_MS));
    ck_assert_int_eq(key_exists("luahub:instance:inst00000000"), 0);
    ck_assert_int_eq(key_exists("luahub:conn:inst00000000-1"), 0);
    ck_assert_int_eq(key_exists("luahub:conn:inst00000000-2"), 0);
    ck_assert_int_eq(sismember("luahub:user:jane", "inst00000000-2"), 0);
    /* The other instance is untouched. */
    ck_assert_int_eq(sismember("luahub:user:jane", "inst00000001-1"), 1);
    ck_assert_int_eq(key_exists("luahub:instance:inst00000001"), 1);
    /* No heartbeat after the shutdown. */
    pump(1500);
    ck_assert_int_eq(key_exists("luahub:instance:inst00000000"), 0);
    hub_registry_shutdown(a->reg, on_shut, NULL);   /* again: at once */
    ck_assert_int_eq(shut_calls, 2);
    env_finish();
}
END_TEST

START_TEST(t_stop_with_query_in_flight)
{
    start_two(5000, 1000);
    struct lres lr = {0};
    struct dres dr = {0};
    ck_assert_int_eq(hub_registry_connections(T.in[0].reg, "kim", 3, on_list, &lr), 0);
    ck_assert_int_eq(hub_registry_disconnect(T.in[0].reg, "kim", 3, on_done, &dr), 0);
    /* Stopped before the answers: both fail, once. */
    hub_registry_stop(T.in[0].reg);
    T.in[0].b->ops->stop(T.in[0].b);
    ck_assert_int_eq(lr.calls, 1);
    ck_assert_int_eq(lr.status, HUB_EUNAVAILABLE);
    ck_assert_int_eq(dr.calls, 1);
    ck_assert_int_eq(dr.status, HUB_EUNAVAILABLE);
    ck_assert_int_eq(hub_registry_connections(T.in[0].reg, "kim", 3, on_list, &lr),
                     HUB_EUNAVAILABLE);
    env_finish();
}
END_TEST

START_TEST(t_memory_broker_local)
{
    env_init();
    struct inst *a = mk(0, "memory", 0, 0, 0);
    hub_registry_conn_open(a->reg, "inst00000000-1", "lee", 3);
    hub_registry_conn_open(a->reg, "inst00000000-2", "lee", 3);
    hub_registry_conn_open(a->reg, "inst00000000-3", "max", 3);
    hub_registry_conn_open(a->reg, "inst00000000-4", NULL, 0);
    /* Synchronous answers, local connections only. */
    struct lres lr = {0};
    ck_assert_int_eq(hub_registry_connections(a->reg, "lee", 3, on_list, &lr), 0);
    ck_assert_int_eq(lr.calls, 1);
    ck_assert_int_eq(lr.status, HUB_OK);
    char err[64];
    yajl_val v = yajl_tree_parse(lr.json, err, sizeof(err));
    ck_assert_msg(v != NULL, "%s", lr.json);
    ck_assert_int_eq(list_count(v), 2);
    ck_assert_str_eq(field_str(list_find(v, "inst00000000-2"), "instance"), "inst00000000");
    yajl_tree_free(v);
    free(lr.json);
    struct dres dr = {0};
    ck_assert_int_eq(hub_registry_disconnect(a->reg, "max", 3, on_done, &dr), 0);
    ck_assert_int_eq(dr.calls, 1);
    ck_assert_int_eq(dr.status, HUB_OK);
    ck_assert_int_eq(a->ndisc, 1);
    ck_assert_str_eq(a->disc[0], "max");
    hub_registry_conn_close(a->reg, "inst00000000-1", 1);
    ck_assert_uint_eq(hub_registry_local_count(a->reg), 3);
    ck_assert_int_eq(rmetric(a, "luahub_registry_heartbeat_up"), 1);
    shut_calls = 0;
    hub_registry_shutdown(a->reg, on_shut, NULL);
    ck_assert_int_eq(shut_calls, 1);
    env_finish();
}
END_TEST

static Suite *registry_suite(void)
{
    Suite *s = suite_create("registry");
    TCase *tc = tcase_create("redis");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, t_heartbeat_defaults);
    tcase_add_test(tc, t_heartbeat_refreshed);
    tcase_add_test(tc, t_conn_register_unregister);
    tcase_add_test(tc, t_connections_across_instances);
    tcase_add_test(tc, t_disconnect_reaches_every_instance);
    tcase_add_test(tc, t_kill9_entries_expire);
    tcase_add_test(tc, t_redis_down_fail_fast_and_resume);
    tcase_add_test(tc, t_clean_shutdown);
    tcase_add_test(tc, t_stop_with_query_in_flight);
    suite_add_tcase(s, tc);
    tc = tcase_create("memory");
    tcase_add_test(tc, t_memory_broker_local);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    SRunner *sr = srunner_create(registry_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
