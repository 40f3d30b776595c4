/* Our libuv adapter for hiredis 0.14.1 async contexts (private to the redis
 * broker).
 *
 * Why not <adapters/libuv.h>: in 0.14.1 its poll callback returns early when
 * libuv reports an error status, and libuv reports POLLERR (a refused
 * non-blocking connect, a reset socket) exactly that way, after stopping the
 * poll handle. hiredis then never reads or writes again, so it never learns
 * about the error: no connect callback, no disconnect callback, the context
 * hangs forever (docs/broker.md, "Our libuv adapter"). It also leaks its
 * struct when uv_poll_init fails and installs its hooks before it has any
 * data, so redisAsyncFree() after a failed attach calls cleanup(NULL).
 *
 * This adapter, like hiredis 1.0's, hands the events it was waiting for to
 * hiredis even when the status is an error: hiredis then reads or writes,
 * gets the errno (ECONNREFUSED, ECONNRESET) and reports it through the
 * connect or disconnect callback. Loop thread only. */
#ifndef LUAHUB_REDIS_UV_H
#define LUAHUB_REDIS_UV_H

#include <uv.h>

#include <hiredis/async.h>

/* Attaches `ac` (borrowed; hiredis owns it) to `loop`. On success the
 * adapter's state is owned by the context: redisAsyncFree() (or hiredis'
 * own free after a disconnect) stops polling, and the uv_poll_t is closed
 * and freed asynchronously, so the loop must run once more before it can be
 * closed. Returns 0, or a negative libuv error (nothing attached, nothing
 * leaked: the caller still frees `ac`). Call it before
 * redisAsyncSetConnectCallback(), which arms the first write watcher. */
int hub_redis_uv_attach(redisAsyncContext *ac, uv_loop_t *loop);

#endif
