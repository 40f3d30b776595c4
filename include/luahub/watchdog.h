/* The watchdog: the last resort against a loop that stops turning
 * (docs/internals.md, "Lua: calls outside the instruction budget").
 *
 * Nothing the loop runs may block it, and the policy's calls are bounded;
 * but a bug or a blocking system call (a policy path that is a FIFO, a
 * stuck NFS mount) would hang the process for good, unnoticed. A timer on
 * the loop and every finished policy call feed the watchdog; a thread of
 * its own checks once a second, and when it has gone `timeout_s` seconds
 * unfed it writes one line to stderr and aborts: the supervisor restarts
 * the worker (workers = N), the service manager the process (workers = 1). */
#ifndef LUAHUB_WATCHDOG_H
#define LUAHUB_WATCHDOG_H

#include <uv.h>

/* Starts watching `loop` (its heartbeat timer is unref'd: it keeps nothing
 * alive). `tag` names the process in the line ("worker 1"), or NULL. Once
 * per process, from the loop thread. Returns 0 or a negative errno (then
 * nothing is watched). */
int hub_watchdog_start(uv_loop_t *loop, unsigned timeout_s, const char *tag);

/* Stops the thread and closes the timer; run the loop once more (e.g.
 * UV_RUN_NOWAIT) for its close callback. No-op if not started. */
void hub_watchdog_stop(void);

/* Feeds the watchdog: progress was made. Any thread; lock-free. */
void hub_watchdog_beat(void);

#endif
