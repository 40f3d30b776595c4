/* libuv adapter for hiredis 0.14.1 async contexts (see redis_uv.h for why it
 * exists). One struct per context: the poll handle and the events hiredis
 * asked for. */
#include "redis_uv.h"

#include <stdlib.h>

#include <hiredis/hiredis.h>

#include "luahub/util.h"

struct redis_uv {
    redisAsyncContext *ac;      /* NULL once hiredis called cleanup */
    uv_poll_t poll;
    uv_prepare_t write_soon;    /* writes the commands of this iteration */
    int events;                 /* UV_READABLE | UV_WRITABLE polled for */
    int armed;                  /* the mask the poll handle was started with */
    int writing;                /* inside the write_soon callback */
    int open_handles;           /* freed when both are closed */
};

static void on_poll(uv_poll_t *h, int status, int events)
{
    struct redis_uv *p = h->data;

    /* On an error status libuv has stopped the handle and `events` is 0.
     * Let hiredis try what it was waiting for: its read()/write() or its
     * connect check then fails with the real errno, and hiredis reports it
     * and frees the context (which calls our cleanup). This is the fix
     * hiredis 1.0 made to its own adapter. */
    if (status < 0)
        events = p->events;

    /* Each call may free the context (cleanup sets p->ac to NULL; `p`
     * itself lives until the handle's close callback). */
    if (p->ac && (events & UV_READABLE))
        redisAsyncHandleRead(p->ac);
    if (p->ac && (events & UV_WRITABLE))
        redisAsyncHandleWrite(p->ac);
}

/* Re-arms the poll handle for p->events, or stops it when there are none,
 * only when the mask changes: libuv 1.44's uv_poll_start on an active
 * handle stops and restarts its watcher, which costs an epoll_ctl ADD that
 * fails with EEXIST and a MOD at the next poll, and hiredis asks for
 * reading again after every write (docs/internals.md, "Redis writes"). */
static void update(struct redis_uv *p)
{
    if (p->events == p->armed)
        return;
    p->armed = p->events;
    if (p->events)
        uv_poll_start(&p->poll, p->events, on_poll);
    else
        uv_poll_stop(&p->poll);
}

static void add_read(void *data)
{
    struct redis_uv *p = data;
    p->events |= UV_READABLE;
    update(p);
}

static void del_read(void *data)
{
    struct redis_uv *p = data;
    p->events &= ~UV_READABLE;
    update(p);
}

/* Writes what the loop iteration queued, before the loop polls again: all
 * the commands issued since (publishes, script calls) go in one write,
 * without polling for POLLOUT first (two epoll_ctl calls and an iteration
 * more per batch). */
static void on_write_soon(uv_prepare_t *h)
{
    struct redis_uv *p = h->data;

    uv_prepare_stop(h);
    if (!p->ac)
        return;
    p->writing = 1;
    redisAsyncHandleWrite(p->ac); /* may free the context (cleanup) */
    p->writing = 0;
}

/* hiredis has bytes to write. While it connects, or when a write from
 * on_write_soon could not take everything (the socket is full), that is
 * polled for (POLLOUT); otherwise it is written before the next poll. */
static void add_write(void *data)
{
    struct redis_uv *p = data;
    if (p->writing || !(p->ac->c.flags & REDIS_CONNECTED)) {
        p->events |= UV_WRITABLE;
        update(p);
        return;
    }
    if (!(p->events & UV_WRITABLE))
        uv_prepare_start(&p->write_soon, on_write_soon);
}

static void del_write(void *data)
{
    struct redis_uv *p = data;
    uv_prepare_stop(&p->write_soon);
    p->events &= ~UV_WRITABLE;
    update(p);
}

static void on_close(uv_handle_t *h)
{
    struct redis_uv *p = h->data;
    if (--p->open_handles == 0)
        free(p);
}

/* Called by hiredis when it frees the context, before it closes the fd:
 * uv_close stops polling now (removing the fd from epoll while it is still
 * open), the memory goes in the close callbacks. */
static void cleanup(void *data)
{
    struct redis_uv *p = data;
    p->ac = NULL;
    uv_close((uv_handle_t *)&p->poll, on_close);
    uv_close((uv_handle_t *)&p->write_soon, on_close);
}

int hub_redis_uv_attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    if (ac->ev.data != NULL)
        return UV_EBUSY;

    struct redis_uv *p = hub_xcalloc(1, sizeof(*p));
    int rc = uv_poll_init(loop, &p->poll, ac->c.fd);
    if (rc < 0) {
        /* Nothing was registered with the loop: plain free is right. */
        free(p);
        return rc;
    }
    uv_prepare_init(loop, &p->write_soon);
    p->write_soon.data = p;
    p->open_handles = 2;
    p->ac = ac;
    p->poll.data = p;

    /* Hooks only once there is data behind them, so a failed attach leaves
     * the context as it was and redisAsyncFree() does not call cleanup. */
    ac->ev.data = p;
    ac->ev.addRead = add_read;
    ac->ev.delRead = del_read;
    ac->ev.addWrite = add_write;
    ac->ev.delWrite = del_write;
    ac->ev.cleanup = cleanup;
    return 0;
}
