/* A ring of message references (see include/luahub/queue.h). */
#include "luahub/queue.h"

#include <stdlib.h>

#include "luahub/util.h"

static void grow(struct hub_queue *q)
{
    uint32_t cap = q->cap ? q->cap * 2 : 8;
    struct hub_msg **ring = hub_xmalloc(sizeof(*ring) * cap);
    for (uint32_t i = 0; i < q->count; i++)
        ring[i] = q->ring[(q->head + i) & (q->cap - 1)];
    free(q->ring);
    q->ring = ring;
    q->cap = cap;
    q->head = 0;
}

void hub_queue_push(struct hub_queue *q, struct hub_msg *m)
{
    if (q->count == q->cap)
        grow(q);
    q->ring[(q->head + q->count) & (q->cap - 1)] = hub_msg_ref(m);
    q->count++;
    q->bytes += m->frame_len;
}

void hub_queue_pop(struct hub_queue *q)
{
    struct hub_msg *m = q->ring[q->head];
    q->head = (q->head + 1) & (q->cap - 1);
    q->count--;
    q->bytes -= m->frame_len;
    hub_msg_unref(m);
    /* An idle connection should not keep a ring sized for its last burst. */
    if (q->count == 0 && q->cap > 64) {
        free(q->ring);
        q->ring = NULL;
        q->cap = 0;
        q->head = 0;
    }
}

void hub_queue_clear(struct hub_queue *q)
{
    while (q->count) {
        hub_msg_unref(q->ring[q->head]);
        q->head = (q->head + 1) & (q->cap - 1);
        q->count--;
    }
    free(q->ring);
    q->ring = NULL;
    q->cap = 0;
    q->head = 0;
    q->bytes = 0;
}
