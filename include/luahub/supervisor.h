/* The supervisor of worker processes (conf `workers = N`): forks N workers
 * that share the listen port (SO_REUSEPORT), restarts one that dies (with
 * backoff if it keeps dying), forwards SIGHUP to all, and on SIGTERM/SIGINT
 * forwards it and waits for every worker to exit. It runs no loop, holds no
 * connection and loads no policy: each worker is a full hub.
 *
 * Ownership: the worker processes are the supervisor's; it reaps them and
 * exits with the status of the whole. Runs no callbacks of anyone else. */
#ifndef LUAHUB_SUPERVISOR_H
#define LUAHUB_SUPERVISOR_H

/* Runs worker number `number` (1..n, the "[worker N]" of its log lines):
 * returns its exit status. Called in the child process. */
typedef int (*hub_worker_fn)(void *ud, unsigned number);

/* Forks `n` workers running `fn` and supervises them until a SIGTERM or
 * SIGINT has shut them all down; a worker still running `stop_timeout_ms`
 * after the signal was forwarded (stuck, or ignoring it) is killed with
 * SIGKILL. Returns 0 then (1 if a worker could not be forked at start).
 * Call from the main thread before any loop exists. */
int hub_supervise(unsigned n, hub_worker_fn fn, void *ud, unsigned stop_timeout_ms);

#endif
