/* A connection's outbound queue: a ring of message references, bounded in
 * bytes by its owner. Pure. */
#ifndef LUAHUB_QUEUE_H
#define LUAHUB_QUEUE_H

#include <stddef.h>
#include <stdint.h>
#include "luahub/msg.h"

struct hub_queue {
    struct hub_msg **ring;  /* NULL until the first push */
    uint32_t head;          /* index of the oldest entry */
    uint32_t count;
    uint32_t cap;           /* a power of two, or 0 */
    size_t bytes;           /* sum of frame_len of queued messages */
};

/* Appends a reference to `m` (takes a new reference of its own). */
void hub_queue_push(struct hub_queue *q, struct hub_msg *m);

/* The oldest message (borrowed), or NULL when empty. */
static inline struct hub_msg *hub_queue_peek(const struct hub_queue *q)
{
    return q->count ? q->ring[q->head] : NULL;
}

/* Removes the oldest message and drops the queue's reference to it. */
void hub_queue_pop(struct hub_queue *q);

/* Drops every reference and releases the ring. The queue is empty and
 * reusable afterwards. */
void hub_queue_clear(struct hub_queue *q);

#endif
