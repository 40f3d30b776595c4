/* Worker processes: fork, restart with backoff, forward signals.
 *
 * The supervisor blocks the signals it handles and takes them with
 * sigtimedwait(), so there is no async-signal-safety to worry about and the
 * restart backoff is just the wait's timeout. Workers unblock them before
 * running the hub, and die with the supervisor (PR_SET_PDEATHSIG). */
#include "luahub/supervisor.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "luahub/log.h"
#include "luahub/util.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define STABLE_MS 10000     /* a worker up this long resets its backoff */

struct worker {
    pid_t pid;              /* 0: not running */
    uint64_t started_ms;
    uint64_t restart_at_ms; /* when to fork it again (0: not scheduled) */
    unsigned backoff_ms;
};

static pid_t spawn(unsigned i, hub_worker_fn fn, void *ud, const sigset_t *handled)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid; /* the supervisor, or -1 */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    /* The signals stay blocked until the worker's loop has its handlers
     * (run_hub unblocks them): a SIGHUP forwarded while it starts would
     * otherwise kill it. */
    (void)handled;
    _exit(fn(ud, i + 1));
}

static void forward(struct worker *w, unsigned n, int sig)
{
    for (unsigned i = 0; i < n; i++)
        if (w[i].pid > 0)
            kill(w[i].pid, sig);
}

int hub_supervise(unsigned n, hub_worker_fn fn, void *ud, unsigned stop_timeout_ms)
{
    sigset_t handled;
    struct worker *w = hub_xcalloc(n, sizeof(*w));
    int stopping = 0, rc = 0, killed = 0;
    uint64_t stop_by = 0;
    unsigned running = 0;

    sigemptyset(&handled);
    sigaddset(&handled, SIGCHLD);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigaddset(&handled, SIGHUP);
    sigprocmask(SIG_BLOCK, &handled, NULL);

    hub_log(HUB_LOG_INFO, "supervisor: starting %u workers", n);
    for (unsigned i = 0; i < n; i++) {
        w[i].pid = spawn(i, fn, ud, &handled);
        if (w[i].pid < 0) {
            hub_log(HUB_LOG_ERROR, "supervisor: cannot fork worker %u: %s", i + 1,
                    strerror(errno));
            forward(w, n, SIGTERM);
            stopping = 1;
            stop_by = hub_now_ms() + stop_timeout_ms;
            rc = 1;
            w[i].pid = 0;
            continue;
        }
        w[i].started_ms = hub_now_ms();
        w[i].backoff_ms = BACKOFF_MIN_MS;
        running++;
    }

    while (running || (!stopping)) {
        /* Sleep until a signal or the next scheduled restart. */
        uint64_t now = hub_now_ms(), next = 0;
        for (unsigned i = 0; i < n; i++)
            if (!w[i].pid && w[i].restart_at_ms && (!next || w[i].restart_at_ms < next))
                next = w[i].restart_at_ms;
        struct timespec ts = {1, 0};
        if (stopping && !killed)
            next = stop_by;
        if (next) {
            uint64_t d = next > now ? next - now : 0;
            ts.tv_sec = (time_t)(d / 1000);
            ts.tv_nsec = (long)(d % 1000) * 1000000L;
        }
        siginfo_t si;
        int sig = sigtimedwait(&handled, &si, &ts);

        if (sig == SIGTERM || sig == SIGINT) {
            if (!stopping) {
                hub_log(HUB_LOG_INFO, "supervisor: %s, stopping %u workers",
                        sig == SIGTERM ? "SIGTERM" : "SIGINT", running);
                stop_by = hub_now_ms() + stop_timeout_ms;
            }
            stopping = 1;
            forward(w, n, sig); /* a second one makes workers stop at once */
        } else if (sig == SIGHUP) {
            hub_log(HUB_LOG_INFO, "supervisor: SIGHUP, reloading every worker");
            forward(w, n, SIGHUP);
        }

        /* Reap whatever exited (SIGCHLD may stand for several children). */
        int st;
        pid_t pid;
        while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
            for (unsigned i = 0; i < n; i++) {
                if (w[i].pid != pid)
                    continue;
                w[i].pid = 0;
                running--;
                if (stopping)
                    break;
                uint64_t t = hub_now_ms();
                if (t - w[i].started_ms >= STABLE_MS)
                    w[i].backoff_ms = BACKOFF_MIN_MS;
                w[i].restart_at_ms = t + w[i].backoff_ms;
                if (WIFSIGNALED(st))
                    hub_log(HUB_LOG_WARN, "supervisor: worker %u (pid %d) killed by signal "
                            "%d; restarting in %u ms", i + 1, (int)pid, WTERMSIG(st),
                            w[i].backoff_ms);
                else
                    hub_log(HUB_LOG_WARN, "supervisor: worker %u (pid %d) exited with %d; "
                            "restarting in %u ms", i + 1, (int)pid, WEXITSTATUS(st),
                            w[i].backoff_ms);
                w[i].backoff_ms = w[i].backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS
                                                                       : w[i].backoff_ms * 2;
                break;
            }
        }

        if (stopping) {
            /* A worker that has not exited by now will not: its loop is
             * stuck, or it ignores the signal. */
            if (running && !killed && hub_now_ms() >= stop_by) {
                for (unsigned i = 0; i < n; i++)
                    if (w[i].pid > 0)
                        hub_log(HUB_LOG_ERROR, "supervisor: worker %u (pid %d) still "
                                "running %u ms after the stop signal: killing it",
                                i + 1, (int)w[i].pid, stop_timeout_ms);
                forward(w, n, SIGKILL);
                killed = 1;
                rc = 1;
            }
            continue;
        }
        now = hub_now_ms();
        for (unsigned i = 0; i < n; i++) {
            if (w[i].pid || !w[i].restart_at_ms || w[i].restart_at_ms > now)
                continue;
            w[i].restart_at_ms = 0;
            w[i].pid = spawn(i, fn, ud, &handled);
            if (w[i].pid < 0) {
                w[i].pid = 0;
                w[i].restart_at_ms = now + w[i].backoff_ms;
                continue;
            }
            w[i].started_ms = now;
            running++;
        }
    }
    hub_log(HUB_LOG_INFO, "supervisor: every worker has exited");
    free(w);
    return rc;
}
