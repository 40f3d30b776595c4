/* A connection's outbound queue: a ring of message references, bounded in
 * bytes by its owner. Pure.
 *
 * Ownership: the queue holds one reference per message it contains and
 * owns its ring; hub_queue_clear() drops them all. No callbacks. */
#ifndef LUAHUB_QUEUE_H
#define LUAHUB_QUEUE_H

#include <stddef.h>
#include <stdint.h>
#include "luahub/msg.h"

struct hub_queue {
    union {
        struct hub_msg **ring;  /* cap > 1: a malloc'ed ring */
        struct hub_msg *one;    /* cap == 1: the only slot, inline */
    } u;
    uint32_t head;          /* index of the oldest entry */
    uint32_t count;
    uint32_t cap;           /* 0 (empty, nothing allocated), 1 (inline) or a power of two */
    uint32_t bytes;         /* sum of frame_len (<= max_queue_bytes + one frame < 2 GiB) */
};

/* The slots: the ring, or the inline slot. */
static inline struct hub_msg **hub_queue_slots(struct hub_queue *q)
{
    return q->cap == 1 ? &q->u.one : q->u.ring;
}

/* The i-th oldest message (borrowed); i < count. */
static inline struct hub_msg *hub_queue_at(struct hub_queue *q, uint32_t i)
{
    return hub_queue_slots(q)[(q->head + i) & (q->cap - 1)];
}

/* Appends a reference to `m` (takes a new reference of its own). */
void hub_queue_push(struct hub_queue *q, struct hub_msg *m);

/* The oldest message (borrowed), or NULL when empty. */
static inline struct hub_msg *hub_queue_peek(struct hub_queue *q)
{
    return q->count ? hub_queue_slots(q)[q->head] : NULL;
}

/* Removes the oldest message and drops the queue's reference to it. */
void hub_queue_pop(struct hub_queue *q);

/* Drops every reference and releases the ring. The queue is empty and
 * reusable afterwards. */
void hub_queue_clear(struct hub_queue *q);

#endif
