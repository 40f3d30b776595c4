/* The watchdog (include/luahub/watchdog.h): a heartbeat timer on the loop
 * and a thread that aborts the process when nothing fed it for timeout_s
 * seconds.
 *
 * The thread counts its own one-second waits rather than comparing clock
 * readings, so a process that was stopped (SIGSTOP, a debugger) is not
 * taken for stuck when it resumes: after SIGCONT the loop's timer is due at
 * once and feeds it. The line is written with write(2), not hub_log: the
 * stuck loop thread may hold stdio's lock (a write to a full pipe), and a
 * SIGALRM bounds that write too. */
#include "luahub/watchdog.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BEAT_MS 1000

static atomic_uint_fast64_t beats;

static struct {
    int running;
    unsigned timeout_s;
    char tag[40];
    uv_timer_t timer;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;
} wd = {.mu = PTHREAD_MUTEX_INITIALIZER};

void hub_watchdog_beat(void)
{
    atomic_fetch_add_explicit(&beats, 1, memory_order_relaxed);
}

static void on_beat(uv_timer_t *t)
{
    (void)t;
    hub_watchdog_beat();
}

/* One log line, the format of hub_log's, straight to stderr; then abort
 * (a core dump shows where the loop is stuck). */
static void fire(void)
{
    char line[256];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(line + n, sizeof(line) - n,
             ".%03dZ ERROR %s%s%swatchdog: the event loop has not turned for %u s (stuck in "
             "a call that does not return); aborting so that the hub is restarted\n",
             (int)(tv.tv_usec / 1000), wd.tag[0] ? "[" : "", wd.tag, wd.tag[0] ? "] " : "",
             wd.timeout_s);
    alarm(5); /* if stderr blocks, SIGALRM ends the process instead */
    ssize_t w = write(STDERR_FILENO, line, strlen(line));
    (void)w;
    abort();
}

static void *watch(void *arg)
{
    (void)arg;
    uint_fast64_t last = atomic_load(&beats);
    unsigned still = 0;

    pthread_mutex_lock(&wd.mu);
    while (!wd.stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += BEAT_MS / 1000;
        int r = 0;
        while (!wd.stop && r != ETIMEDOUT)
            r = pthread_cond_timedwait(&wd.cv, &wd.mu, &until);
        if (wd.stop)
            break;
        uint_fast64_t now = atomic_load(&beats);
        if (now != last) {
            last = now;
            still = 0;
        } else if (++still >= wd.timeout_s) {
            fire();
        }
    }
    pthread_mutex_unlock(&wd.mu);
    return NULL;
}

int hub_watchdog_start(uv_loop_t *loop, unsigned timeout_s, const char *tag)
{
    pthread_condattr_t ca;
    sigset_t all, old;
    int r;

    if (wd.running)
        return -EALREADY;
    wd.timeout_s = timeout_s ? timeout_s : 1;
    snprintf(wd.tag, sizeof(wd.tag), "%s", tag ? tag : "");
    wd.stop = 0;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&wd.cv, &ca);
    pthread_condattr_destroy(&ca);

    /* the thread takes no signal: they are the loop's */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    r = pthread_create(&wd.thread, NULL, watch, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r != 0) {
        pthread_cond_destroy(&wd.cv);
        return -r;
    }
    uv_timer_init(loop, &wd.timer);
    uv_timer_start(&wd.timer, on_beat, BEAT_MS, BEAT_MS);
    uv_unref((uv_handle_t *)&wd.timer);
    wd.running = 1;
    return 0;
}

void hub_watchdog_stop(void)
{
    if (!wd.running)
        return;
    pthread_mutex_lock(&wd.mu);
    wd.stop = 1;
    pthread_cond_signal(&wd.cv);
    pthread_mutex_unlock(&wd.mu);
    pthread_join(wd.thread, NULL);
    pthread_cond_destroy(&wd.cv);
    uv_timer_stop(&wd.timer);
    uv_close((uv_handle_t *)&wd.timer, NULL);
    wd.running = 0;
}
