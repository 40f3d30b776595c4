/* A redis-server of the test's own, on a free loopback port, for the suites
 * that test the brokers and the registry without the hub (test_broker,
 * test_registry). Every wait is bounded; servers die with the test. */
#ifndef REDISTEST_H
#define REDISTEST_H

#include <stdint.h>
#include <sys/types.h>
#include <hiredis/hiredis.h>
#include <uv.h>

#ifndef WAIT_MS
#define WAIT_MS 15000
#endif

struct srv {
    pid_t pid;
    int port;
    char dir[128];
    char pass[64];
};

int64_t now_ms(void);               /* monotonic */
void sleep_ms(int ms);
int free_port(void);                /* a free loopback TCP port */
int reap(pid_t pid, int ms);        /* waitpid, bounded: 1 reaped, 0 not */
void srv_spawn(struct srv *s);      /* runs redis-server on s->port (s->pass if set) */
redisContext *srv_conn(const struct srv *s, int ms);
int srv_ping(const struct srv *s);
void srv_start(struct srv *s, int port, const char *pass); /* port 0: a free one; waits for PONG */
void srv_kill(struct srv *s);       /* SIGKILL + reap */
void srv_stop(struct srv *s);       /* SHUTDOWN, or kill; removes its dir */
redisReply *srv_cmd(const struct srv *s, const char *fmt, ...);
/* An integer field of INFO `section`, e.g. ("stats", "pubsub_channels");
 * for "commandstats" and cmdstat_NAME, its calls. -1 if absent. */
long long srv_info(const struct srv *s, const char *section, const char *key);
long long srv_calls(const struct srv *s, const char *cmd); /* cmdstat_<cmd> calls, 0 if none */
char proc_state(pid_t pid);         /* /proc state letter ('T' stopped), '?' if gone */
void srv_sigstop(const struct srv *s); /* SIGSTOP, and waits until it is stopped */

/* For the suites that drive a libuv loop themselves: runs `loop` until
 * `cond` holds or `ms` pass (the timer `tick` wakes it every 5 ms to look);
 * evaluates to cond. */
void loop_tick(uv_timer_t *t);
#define LOOP_WAIT(loop, tick, cond, ms)                                                       \
    ({                                                                                        \
        int64_t dl_ = now_ms() + (ms);                                                        \
        uv_timer_start((tick), loop_tick, 5, 5);                                              \
        while (!(cond) && now_ms() < dl_)                                                     \
            uv_run((loop), UV_RUN_ONCE);                                                      \
        uv_timer_stop(tick);                                                                  \
        (cond) ? 1 : 0;                                                                       \
    })

#endif
