/* A ring of message references (see include/luahub/queue.h). */
#include "luahub/queue.h"

#include <stdlib.h>

#include "luahub/util.h"

/* Most connections hold at most one frame between flushes: that one lives
 * in the queue itself (cap 1), and an idle connection allocates nothing. A
 * second frame moves them to a malloc'ed ring, freed again once drained. */
static void grow(struct hub_queue *q)
{
    if (q->cap == 0) {
        q->cap = 1;
        q->head = 0;
        return;
    }
    uint32_t cap = q->cap == 1 ? 8 : q->cap * 2;
    struct hub_msg **ring = hub_xmalloc(sizeof(*ring) * cap);
    for (uint32_t i = 0; i < q->count; i++)
        ring[i] = hub_queue_at(q, i);
    if (q->cap > 1)
        free(q->u.ring);
    q->u.ring = ring;
    q->cap = cap;
    q->head = 0;
}

static void release(struct hub_queue *q)
{
    if (q->cap > 1)
        free(q->u.ring);
    q->u.ring = NULL;
    q->cap = 0;
    q->head = 0;
}

void hub_queue_push(struct hub_queue *q, struct hub_msg *m)
{
    if (q->count == q->cap)
        grow(q);
    hub_queue_slots(q)[(q->head + q->count) & (q->cap - 1)] = hub_msg_ref(m);
    q->count++;
    q->bytes += m->frame_len;
}

void hub_queue_pop(struct hub_queue *q)
{
    struct hub_msg *m = hub_queue_slots(q)[q->head];
    q->head = (q->head + 1) & (q->cap - 1);
    q->count--;
    q->bytes -= m->frame_len;
    hub_msg_unref(m);
    if (q->count == 0)
        release(q);
}

void hub_queue_clear(struct hub_queue *q)
{
    while (q->count)
        hub_queue_pop(q);
    release(q);
    q->bytes = 0;
}
