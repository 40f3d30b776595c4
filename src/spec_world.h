/* The world of `luahub test` from inside: private to spec_host.c (the
 * host the policy runs on) and spec_actions.c (the functions the spec
 * state calls); spec_impl.h is the contract with spec.c. Not a public
 * contract. Loop-free and single-threaded. */
#ifndef LUAHUB_SPEC_WORLD_H
#define LUAHUB_SPEC_WORLD_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/config.h"
#include "luahub/policy.h"
#include "spec_impl.h"

#define LOG_LINES 200               /* log lines kept per test (the last ones) */

enum { C_REFUSED, C_OPEN, C_CLOSING, C_GONE };

struct frame {                      /* what a connection received */
    char kind;                      /* 'm' message, 'p' push, 'c' close */
    int seen;                       /* matched by an expectation */
    unsigned code;                  /* close */
    char *channel;                  /* message */
    char *text;                     /* message, push: the data's JSON; close: the reason */
};

struct sconn {
    struct hub_policy_conn pc;      /* pc.id: its index in conns + 1 */
    int state;                      /* C_* */
    char addr[64];
    unsigned close_code;
    char *close_reason;
    char **chans;                   /* subscriptions, in order */
    size_t nchans, capchans;
    struct frame *frames;
    size_t nframes, capframes;
};

struct message {                    /* one publish */
    char *channel, *data;
    uint64_t *to;                   /* the connections it was delivered to */
    size_t nto;
};

struct stimer {
    struct hub_ptimer *t;
    uint64_t due, seq;
};

struct failure {
    char *hook, *what;
    uint64_t conn;
    int seen;
};

struct hub_spec_world {
    struct hub_config cfg;          /* a shallow copy of *base: policy_vars may differ */
    const struct hub_config *base;
    struct hub_lua_limits *lim;     /* the spec state's */
    struct hub_policy_host host;
    struct hub_policy *policy;
    char *vars;                     /* cfg.policy_vars when owned (a test's vars) */

    struct sconn **conns;
    size_t nconns, capconns;
    struct message *msgs;
    size_t nmsgs, capmsgs;
    size_t recorded;                /* bytes of frames and messages */

    uint64_t now;                   /* the fake clock, ms */
    struct stimer *heap;            /* pending timers, a min-heap by (due, seq) */
    size_t nheap, capheap;
    uint64_t seq;

    struct failure *fails;
    size_t nfails, capfails;
    uint64_t fails_dropped;

    int building;                   /* a reset builds the policy */
    char **warnings;                /* its warnings */
    size_t nwarnings;
    char *logs[LOG_LINES];          /* the test's log, a ring */
    size_t nlogs;                   /* lines ever added */
};

/* `p` (an array of `*cap` items of `size` bytes) grown to hold `need`
 * items, doubling; returns it (it may move). */
void *hub_spec_grow(void *p, size_t *cap, size_t need, size_t size);

/* Subscribes `c` to ch[0..len): 1 now, 0 already, HUB_ELIMIT at
 * max_channels_per_conn. */
int hub_spec_subscribe(struct hub_spec_world *w, struct sconn *c, const char *ch, size_t len);

/* Unsubscribes: 0, or HUB_ENOTFOUND when not subscribed. */
int hub_spec_unsubscribe(struct sconn *c, const char *ch, size_t len);

/* The broker: records the publish and delivers it to every open
 * subscriber. Returns the local subscribers (closing ones included, as the
 * hub counts them). */
size_t hub_spec_publish(struct hub_spec_world *w, const char *ch, size_t len, const char *data,
                        size_t dlen);

/* The hub closes `c` (a close frame with code and reason, copied); the
 * rest (on_disconnect) happens in hub_spec_settle(). */
void hub_spec_close_conn(struct hub_spec_world *w, struct sconn *c, unsigned code,
                         const char *reason);

/* Connections closing since the action began have now closed: each one's
 * on_disconnect runs, then it leaves its channels. */
void hub_spec_settle(struct hub_spec_world *w);

/* Removes the timer at index `i` of the fake clock's heap. */
void hub_spec_heap_remove(struct hub_spec_world *w, size_t i);

/* The client id of connection `id` ("spec-1"); `ud` is unused. */
void hub_spec_conn_name(void *ud, uint64_t id, char *out, size_t n);

/* The fake clock, in ms; `ud` is the world. */
double hub_spec_now_ms(void *ud);

#endif
