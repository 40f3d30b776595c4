/* A redis-server of the test's own, on a free loopback port, for the suites
 * that test the brokers and the registry without the hub (test_broker,
 * test_registry). Every wait is bounded; servers die with the test. */
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

#include "redistest.h"

/* ------------------------------------------------------------------ */
/* Clock, sleeping                                                     */
/* ------------------------------------------------------------------ */

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* ------------------------------------------------------------------ */
/* redis-server processes                                              */
/* ------------------------------------------------------------------ */


int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_msg(fd >= 0, "socket: %s", strerror(errno));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_msg(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0, "bind: %s", strerror(errno));
    socklen_t l = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &l);
    close(fd);
    return ntohs(a.sin_port);
}

/* Waits up to `ms` for `pid` to exit. Returns 1 when reaped. */
int reap(pid_t pid, int ms)
{
    int64_t dl = now_ms() + ms;
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid || (r < 0 && errno == ECHILD))
            return 1;
        if (now_ms() >= dl)
            return 0;
        sleep_ms(5);
    }
}

void srv_spawn(struct srv *s)
{
    char port[16], logfile[200];
    snprintf(port, sizeof(port), "%d", s->port);
    snprintf(logfile, sizeof(logfile), "%s/redis.log", s->dir);
    const char *argv[20];
    int n = 0;
    argv[n++] = "redis-server";
    argv[n++] = "--port";
    argv[n++] = port;
    argv[n++] = "--bind";
    argv[n++] = "127.0.0.1";
    argv[n++] = "--save";
    argv[n++] = "";
    argv[n++] = "--appendonly";
    argv[n++] = "no";
    argv[n++] = "--dir";
    argv[n++] = s->dir;
    argv[n++] = "--logfile";
    argv[n++] = logfile;
    if (s->pass[0]) {
        argv[n++] = "--requirepass";
        argv[n++] = s->pass;
    }
    argv[n] = NULL;
    pid_t parent = getpid();
    pid_t pid = fork();
    ck_assert_msg(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int dn = open("/dev/null", O_RDWR);
        dup2(dn, 0);
        dup2(dn, 1);
        dup2(dn, 2);
        execvp("redis-server", (char *const *)argv);
        _exit(127);
    }
    s->pid = pid;
}

/* A blocking admin connection (bounded by timeouts), authenticated. NULL if
 * the server does not answer. */
redisContext *srv_conn(const struct srv *s, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", s->port, tv);
    if (!c || c->err) {
        if (c)
            redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    if (s->pass[0]) {
        redisReply *r = redisCommand(c, "AUTH %s", s->pass);
        int ok = r && r->type != REDIS_REPLY_ERROR;
        if (r)
            freeReplyObject(r);
        if (!ok) {
            redisFree(c);
            return NULL;
        }
    }
    return c;
}

int srv_ping(const struct srv *s)
{
    redisContext *c = srv_conn(s, 200);
    if (!c)
        return 0;
    redisReply *r = redisCommand(c, "PING");
    int ok = r && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
    if (r)
        freeReplyObject(r);
    redisFree(c);
    return ok;
}

/* Starts a redis-server on `port` (0: a free one, retried on a clash). */
void srv_start(struct srv *s, int port, const char *pass)
{
    if (!s->dir[0]) {
        snprintf(s->dir, sizeof(s->dir), "/tmp/redistest.XXXXXX");
        ck_assert_msg(mkdtemp(s->dir) != NULL, "mkdtemp: %s", strerror(errno));
    }
    snprintf(s->pass, sizeof(s->pass), "%s", pass ? pass : "");
    for (int attempt = 0; attempt < 5; attempt++) {
        s->port = port ? port : free_port();
        srv_spawn(s);
        int64_t dl = now_ms() + 10000;
        while (now_ms() < dl) {
            if (srv_ping(s))
                return;
            int st;
            if (waitpid(s->pid, &st, WNOHANG) == s->pid) {
                s->pid = 0;
                break;
            }
            sleep_ms(10);
        }
        if (s->pid > 0) {
            kill(s->pid, SIGKILL);
            reap(s->pid, 2000);
            s->pid = 0;
        }
        if (port)
            break;
    }
    ck_abort_msg("redis-server did not start on port %d (see %s/redis.log)", s->port, s->dir);
}

void srv_kill(struct srv *s)
{
    if (s->pid <= 0)
        return;
    kill(s->pid, SIGKILL);
    ck_assert_msg(reap(s->pid, 5000), "redis-server %d did not die", (int)s->pid);
    s->pid = 0;
}

void srv_stop(struct srv *s)
{
    if (s->pid > 0) {
        kill(s->pid, SIGCONT);
        kill(s->pid, SIGTERM);
        if (!reap(s->pid, 5000)) {
            kill(s->pid, SIGKILL);
            reap(s->pid, 5000);
        }
        s->pid = 0;
    }
    if (s->dir[0]) {
        char p[256];
        snprintf(p, sizeof(p), "%s/redis.log", s->dir);
        unlink(p);
        snprintf(p, sizeof(p), "%s/dump.rdb", s->dir);
        unlink(p);
        rmdir(s->dir);
        s->dir[0] = '\0';
    }
}

/* One admin command; the reply (free it) or a test failure. */
redisReply *srv_cmd(const struct srv *s, const char *fmt, ...)
{
    redisContext *c = srv_conn(s, 2000);
    ck_assert_msg(c != NULL, "admin connection to redis port %d failed", s->port);
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    ck_assert_msg(r != NULL, "admin command '%s' failed: %s", fmt, c->errstr);
    redisFree(c);
    return r;
}

void loop_tick(uv_timer_t *t)
{
    (void)t;
}

long long srv_info(const struct srv *s, const char *section, const char *key)
{
    redisReply *r = srv_cmd(s, "INFO %s", section);
    ck_assert_int_eq(r->type, REDIS_REPLY_STRING);
    long long v = -1;
    char needle[128];
    snprintf(needle, sizeof(needle), "\n%s:", key);
    const char *p = strstr(r->str, needle);
    if (!p && strncmp(r->str, needle + 1, strlen(needle + 1)) == 0)
        p = r->str - 1;
    if (p) {
        p += strlen(needle);
        if (strncmp(p, "calls=", 6) == 0)
            p += 6;
        v = strtoll(p, NULL, 10);
    }
    freeReplyObject(r);
    return v;
}

long long srv_calls(const struct srv *s, const char *cmd)
{
    char key[64];
    snprintf(key, sizeof(key), "cmdstat_%s", cmd);
    long long v = srv_info(s, "commandstats", key);
    return v < 0 ? 0 : v;
}

char proc_state(pid_t pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return '?';
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');
    return p && p[1] == ' ' ? p[2] : '?';
}

void srv_sigstop(const struct srv *s)
{
    kill(s->pid, SIGSTOP);
    int64_t dl = now_ms() + 2000;
    while (proc_state(s->pid) != 'T' && now_ms() < dl)
        sleep_ms(1);
    ck_assert_msg(proc_state(s->pid) == 'T', "redis-server %d did not stop", (int)s->pid);
}
