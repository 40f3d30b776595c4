/* One intrusive circular doubly linked list, used by every module that
 * keeps objects in a list (connections, HTTP connections, timers, Redis
 * commands awaiting replies). Embed a struct hub_list in the object; the
 * list head is a struct hub_list of its own. Nothing here allocates.
 *
 * Ownership: the objects are the caller's; unlinking never frees. No
 * callbacks. */
#ifndef LUAHUB_LIST_H
#define LUAHUB_LIST_H

#include <stddef.h>

#include "luahub/util.h"

struct hub_list {
    struct hub_list *prev, *next;
};

/* An empty list head, or a node that is in no list. */
static inline void hub_list_init(struct hub_list *l)
{
    l->prev = l->next = l;
}

static inline int hub_list_empty(const struct hub_list *l)
{
    return l->next == l;
}

/* Inserts `n` (in no list) before `at`: at the tail when `at` is the head. */
static inline void hub_list_insert_before(struct hub_list *at, struct hub_list *n)
{
    n->next = at;
    n->prev = at->prev;
    at->prev->next = n;
    at->prev = n;
}

static inline void hub_list_push_tail(struct hub_list *head, struct hub_list *n)
{
    hub_list_insert_before(head, n);
}

/* Unlinks `n` and leaves it as an empty list (so a second remove is a no-op). */
static inline void hub_list_remove(struct hub_list *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->prev = n->next = n;
}

/* Moves `n` (in some list) to the tail of `head`. */
static inline void hub_list_move_tail(struct hub_list *head, struct hub_list *n)
{
    hub_list_remove(n);
    hub_list_insert_before(head, n);
}

/* The first node, or NULL when empty. */
static inline struct hub_list *hub_list_first(const struct hub_list *head)
{
    return head->next == head ? NULL : head->next;
}

/* Walks `head`; the body may remove the current node `it`. */
#define hub_list_foreach_safe(it, tmp, head) \
    for ((it) = (head)->next, (tmp) = (it)->next; (it) != (head); (it) = (tmp), (tmp) = (it)->next)

#endif
