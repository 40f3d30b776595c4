/* Private to the WebSocket session (session.c: receive, dispatch, replies,
 * hooks that wait; session_host.c: open and close, the hub's client ops,
 * the policy's host interface). Not a public contract. Loop thread only. */
#ifndef LUAHUB_SESSION_IMPL_H
#define LUAHUB_SESSION_IMPL_H

#include <stdint.h>

#include "luahub/policy.h"
#include "luahub/session.h"

/* The session of a hub client; the current policy; whether it has hook `h`. */
static inline struct hub_session *of_client(struct hub_client *c)
{
    return hub_container_of(c, struct hub_session, client);
}

static inline struct hub_policy *policy(const struct hub_session *s)
{
    return *s->ss->policy;
}

static inline int has_hook(const struct hub_session *s, enum hub_hook h)
{
    return hub_policy_has(policy(s), h);
}

/* Queues the reply encoded in ss->scratch and resets it. A client whose
 * queue cannot take it is culled (with the slow consumers). */
void hub_session_send_scratch(struct hub_session *s);

/* Closes with `code` and `reason` (copied), unless closing already; `drop`
 * discards what is queued. */
void hub_session_close_with(struct hub_session *s, uint16_t code, const char *reason,
                            int drop);

/* The connection is gone: the waiting hook is dropped, the queue too. */
void hub_session_end_wait(struct hub_session *s);

/* The policy's wait callback (s->pw.done): a hook of the connection that
 * waited is done; the command it was for gets its reply, then what queued
 * runs. */
void hub_session_hook_done(struct hub_policy_wait *w, const struct hub_policy_outcome *o);

#endif
