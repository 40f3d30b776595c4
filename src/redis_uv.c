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
    int events;                 /* UV_READABLE | UV_WRITABLE wanted by hiredis */
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

/* Re-arms the poll handle for p->events, or stops it when there are none.
 * uv_poll_start on an active handle just changes its event mask. */
static void update(struct redis_uv *p)
{
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

static void add_write(void *data)
{
    struct redis_uv *p = data;
    p->events |= UV_WRITABLE;
    update(p);
}

static void del_write(void *data)
{
    struct redis_uv *p = data;
    p->events &= ~UV_WRITABLE;
    update(p);
}

static void on_close(uv_handle_t *h)
{
    free(h->data);
}

/* Called by hiredis when it frees the context, before it closes the fd:
 * uv_close stops polling now (removing the fd from epoll while it is still
 * open), the memory goes in the close callback. */
static void cleanup(void *data)
{
    struct redis_uv *p = data;
    p->ac = NULL;
    uv_close((uv_handle_t *)&p->poll, on_close);
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
