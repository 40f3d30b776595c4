/* Private to the Redis broker (broker_redis.c: connections and
 * subscriptions; redis_conn.c: one connection's state machine;
 * broker_redis_pub.c: publishing, what an OK means, probes, commands and
 * script calls, metrics; broker_redis_stream.c: history and its scripts;
 * broker_redis_presence.c: presence). The broker's state, shared by these
 * files; see the top of broker_redis.c for how it works. Loop thread only.
 * Not a contract. */
#ifndef LUAHUB_BROKER_REDIS_H
#define LUAHUB_BROKER_REDIS_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include <hiredis/async.h>

#include "broker_impl.h"
#include "luahub/broker.h"
#include "luahub/hash.h"
#include "luahub/list.h"
#include "luahub/metrics.h"
#include "luahub/util.h"

/* Receives each message published on the control channel (see
 * hub_rbroker_control()):
 * `msg` is borrowed, valid during the call. Called from the loop. */
typedef void (*hub_broker_control_fn)(void *ud, const char *msg, size_t len);

/* The control channel's Redis name is the broker prefix followed by this
 * ("luahub:!control" by default). '!' is not allowed in hub channel names,
 * so no hub channel can collide with it. */
#define HUB_BROKER_CONTROL_CHANNEL "!control"

#define HUB_REDIS_BATCH 500             /* names per SUBSCRIBE / UNSUBSCRIBE */
#define BACKOFF_MIN_MS 100u
#define BACKOFF_MAX_MS 5000u
#define PROBE_INTERVAL_MS 1000u         /* liveness probe when nothing is in flight */

/* A history delivery on a pub/sub channel starts with this byte, which no
 * JSON text can start with, then "<epoch> <offset> " and the frame
 * (docs/broker.md, "History"). Other messages are the frame alone. */
#define HUB_RFRAME_MARK '\x01'

/* The server-side scripts (broker_redis_stream.c), loaded with SCRIPT LOAD
 * in every command connection's handshake and called with EVALSHA. */
enum { SCRIPT_PUBLISH, SCRIPT_HISTORY, SCRIPT_PRESENCE, SCRIPT_PRESENCE_READ, SCRIPT_N };

/* One script call: its arguments after the SHA (numkeys, keys, args),
 * kept until the answer so that a NOSCRIPT (the script cache was flushed)
 * can be answered by sending it again with EVAL. */
struct hub_rcall {
    int script;                 /* SCRIPT_* */
    int argc;
    int retried;                /* sent again with EVAL once */
    struct hub_buf buf;         /* the arguments, one after the other */
    size_t *off, *len;          /* argc of them */
    size_t cap;
    struct hub_stream_pos pos;  /* a history publish: what the reply said */
};

/* Completion of hub_rbroker_call(): HUB_OK with Redis' reply (borrowed;
 * it may be an error reply), or HUB_EUNAVAILABLE with NULL (connection lost
 * or timed out, or stop()). Called exactly once. */
typedef void (*hub_rcall_cb)(void *ud, int status, const redisReply *r);

enum cstate {
    C_IDLE,         /* no context; the timer is the retry timer */
    C_RESOLVING,    /* uv_getaddrinfo in flight */
    C_CONNECTING,   /* context created, TCP connect in progress */
    C_HANDSHAKE,    /* connected; AUTH/SELECT/PING in flight */
    C_SYNCING,      /* sub: re-subscribing the wanted channels */
    C_UP,
    C_STOPPED,
};

enum role { ROLE_CMD, ROLE_SUB };

struct shard;
struct rbroker;

/* Something we wait an answer for on a connection, oldest first. On cmd:
 * P_PUBLISH, P_COMMAND, P_PROBE (the hiredis privdata of the command); on
 * sub: P_BATCH and P_ECHO (ours only: hiredis has no per-command callback
 * for (UN)SUBSCRIBE and messages; everything comes to on_sub_reply). */
enum { P_PUBLISH, P_BATCH, P_COMMAND, P_PROBE, P_ECHO };
struct pending {
    struct hub_list link;       /* rc->pending, or the shard's acks */
    struct rconn *rc;
    uint64_t deadline_ms;
    int kind;
    /* P_PUBLISH, P_COMMAND */
    hub_broker_publish_cb cb;
    hub_broker_reply_cb rcb;    /* P_COMMAND (hub_rbroker_command) */
    hub_rcall_cb ccb;           /* P_COMMAND (hub_rbroker_call) */
    struct hub_rcall *call;     /* a script call (P_COMMAND, or P_PUBLISH with history) */
    void *ud;
    uint64_t t0_ns;
    size_t bytes;
    /* P_PUBLISH: `self` when the channel was subscribed and confirmed here
     * at send time; `seq` the probe whose echo completes it (0: none, OK on
     * the reply). P_PROBE: `seq` its number (0: a PING); P_ECHO: the number
     * of the probe it waits for. `gen`: the shard's sub_gen at send time;
     * `unsubs` its unsubs_sent then. */
    int self;
    uint64_t seq;
    uint64_t gen;
    uint64_t unsubs;
    /* P_BATCH */
    unsigned left;      /* confirmations still expected */
    int sync;           /* part of the re-subscribe after a connect */
};

struct rconn {
    struct shard *sh;
    int role;
    int state;
    redisAsyncContext *ac;
    uv_timer_t timer;
    uv_getaddrinfo_t gai;
    int gai_active;             /* the request has not called back yet */
    int gai_stale;              /* ... and we no longer want its answer */
    unsigned backoff_ms;
    unsigned failures;          /* consecutive failed attempts */
    int ever_up;                /* reached UP once (for the reconnect count) */
    int hs_n, hs_i;             /* handshake replies expected / received */
    int hs_script0;             /* index of the first SCRIPT LOAD among them */
    const char *hs_cmd[3 + SCRIPT_N];
    struct hub_list pending;    /* struct pending, in send order */
    unsigned npending;          /* cmd: PUBLISHes and commands awaiting a reply */
    size_t pending_bytes;
    unsigned sync_left;         /* sub: sync batches not yet confirmed */
    uint64_t last_overload_log_ms;
};

struct waiter {
    struct waiter *next;
    hub_broker_subscribe_cb cb;
    void *ud;
    uint32_t target;            /* fires when subs_confirmed >= target */
};

struct rchan {
    struct hub_hnode node;      /* the shard's table, hash of the name */
    size_t len;                 /* of the name */
    struct rchan *dnext;        /* dirty list / scratch list */
    struct waiter *wh, *wt;
    uint32_t subs_sent;         /* SUBSCRIBEs sent on the current sub context */
    uint32_t subs_confirmed;
    uint32_t outstanding;       /* (un)subscribe confirmations to come */
    unsigned want : 1;
    unsigned sent : 1;          /* the last command sent was SUBSCRIBE */
    unsigned dirty : 1;
    unsigned control : 1;       /* the control channel: messages go to control_fn */
    unsigned probe : 1;         /* our probe channel: messages are probe echoes */
    char name[];
};

struct shard {
    struct rbroker *b;
    struct hub_redis_url url;
    char tag[300];              /* "redis HOST:PORT" for logs */
    char label[280];            /* "HOST:PORT" for metric labels */
    struct rconn cmd, sub;
    struct hub_htable chans;    /* struct rchan by name */
    struct rchan *dirty_head, *dirty_tail;
    int up;
    /* acknowledged publishes (see the top of this file) */
    uint64_t sub_gen;           /* +1 each time the sub connection is lost */
    uint64_t unsubs_sent;       /* channels UNSUBSCRIBEd, ever (voids a count check) */
    uint64_t probe_sent;        /* number of the last probe sent */
    uint64_t probe_seen;        /* highest probe number echoed on sub */
    int probe_due;              /* a publish of this iteration waits for a probe */
    struct hub_list acks;       /* publishes answered, waiting for their probe */
    unsigned echoes;            /* P_ECHO records on sub */
    /* presence (broker_redis_presence.c) */
    struct hub_list pops;       /* adds and removes to send, in order */
    unsigned pres_inflight;     /* refresh calls awaiting their answer */
    int pres_due;               /* refresh at the next flush (reconnected) */
};

/* Why a publish was refused or failed (luahub_broker_publish_refused_total). */
enum { REF_DOWN, REF_PUBSUB_DOWN, REF_OVER_CAP, REF_NOT_RECEIVED, REF_N };

/* Why an established connection was lost (luahub_broker_link_lost_total). */
enum { LOST_CLOSED, LOST_TIMEOUT, LOST_NOT_SUBSCRIBED, LOST_N };

struct rbroker {
    struct hub_broker base;     /* first: the ops receive &base */
    struct shard *shards;
    uint32_t n;
    char *prefix;
    size_t plen;
    uv_idle_t idle;
    int idle_active;
    uv_timer_t live;            /* liveness probes */
    char probe[32];             /* "!probe:<16 hex digits>", after the prefix */
    size_t probe_len;
    int stopped;
    int up;
    unsigned open_handles;      /* timers + idle not yet closed, resolves in flight */
    uint64_t rng;
    struct hub_buf key;         /* scratch: prefix + channel */
    /* scratch for one batch */
    struct hub_buf names;
    size_t name_off[HUB_REDIS_BATCH];
    struct rchan *batch[HUB_REDIS_BATCH];
    const char *argv[HUB_REDIS_BATCH + 1];
    size_t argl[HUB_REDIS_BATCH + 1];
    /* metrics */
    uint64_t wanted;            /* channels with local subscribers */
    uint64_t reconnects;
    uint64_t publishes;         /* accepted by Redis */
    uint64_t publish_errors;
    uint64_t received;          /* messages from the subscriber connections */
    uint64_t subscribe_cmds;    /* SUBSCRIBE / UNSUBSCRIBE commands sent */
    uint64_t commands;          /* command(): answered by Redis */
    uint64_t command_errors;    /* command(): refused, lost, timed out */
    uint64_t refused[REF_N];
    uint64_t lost[2][LOST_N];   /* [role] */
    uint64_t probes;            /* probe PUBLISHes sent */
    hub_broker_control_fn control_fn;
    void *control_ud;
    struct hub_hist rtt;        /* PUBLISH queued to reply */
    /* scripts: the SHA1 that SCRIPT LOAD answered (the same on every server) */
    char sha[SCRIPT_N][41];
    uint64_t script_reloads;    /* calls sent again with EVAL after NOSCRIPT */
    uint64_t bad_frames;        /* history messages from Redis that did not decode */
    uint64_t history_reads, history_read_errors;
    /* presence: this process's clients, refreshed in Redis (broker_redis_presence.c) */
    struct hub_htable pchans;   /* struct pchan by name */
    uint64_t pentries;          /* clients in them */
    uv_timer_t pres_timer;
    int pres_timer_on;
    uint64_t pres_refreshed, pres_readded, pres_swept, pres_errors;
};

/* The oldest record of `l` (rc->pending or a shard's acks), or NULL. */
static inline struct pending *hub_rbroker_pending_first(const struct hub_list *l)
{
    struct hub_list *n = hub_list_first(l);
    return n ? hub_container_of(n, struct pending, link) : NULL;
}

static inline struct shard *shard_of(struct rbroker *b, const char *channel, size_t len)
{
    return &b->shards[hub_broker_shard(channel, len, b->n)];
}

/* Both connections of the shard are up (sub: every wanted channel
 * subscribed): what publishing to it needs. */
static inline int links_up(const struct shard *sh)
{
    return sh->cmd.state == C_UP && sh->cmd.ac && sh->sub.state == C_UP && sh->sub.ac;
}

/* broker_redis.c */

/* Appends `p` (owned by the list from now on) to the connection's list of
 * what awaits an answer, oldest first; arms its deadline when it is the
 * head. */
void hub_rbroker_pending_push(struct rconn *rc, struct pending *p);
/* A new record of `kind` for shard `sh`: sent now (t0_ns), due within the
 * shard's command_timeout_ms, of the current sub generation. Take it off
 * its list with hub_list_remove(&p->link); the owner frees it. */
struct pending *hub_rbroker_pending_new(struct shard *sh, int kind, size_t bytes);
/* Gives up the connection (cause LOST_*): hiredis fails its pending
 * callbacks, synchronously or right after the hiredis callback we are in;
 * health and waiters are told; a retry is scheduled. May fire user
 * callbacks. */
void hub_rbroker_conn_drop(struct rconn *rc, const char *why, int level, int cause);
/* Runs the uv_idle flush (dirty channels, due probes) in this loop
 * iteration. */
void hub_rbroker_schedule_flush(struct rbroker *b);

/* The shard's entry of `name` (hash h = hub_hash64 of it), or NULL. */
struct rchan *hub_rbroker_chan_find(struct shard *sh, const char *name, size_t len, uint64_t h);

/* redis_conn.c: one connection's state machine */
void hub_rbroker_conn_start(struct rconn *rc);
void hub_rbroker_conn_fail(struct rconn *rc, const char *why, int level, int cause);
void hub_rbroker_timer_arm(struct rconn *rc, uint64_t delay_ms);
void hub_rbroker_sub_pending_clear(struct rconn *rc);

/* broker_redis.c: channels, subscriptions, health */
const char *hub_rbroker_role_name(const struct rconn *rc);
uint64_t hub_rbroker_rnd(struct rbroker *b);
void hub_rbroker_waiters_fire(struct waiter *w, int status);
void hub_rbroker_waiters_take(struct rchan *c, struct waiter **out);
void hub_rbroker_health_update(struct rbroker *b);
void hub_rbroker_chans_reset(struct shard *sh, struct waiter **out);
void hub_rbroker_chan_maybe_free(struct shard *sh, struct rchan *c);
void hub_rbroker_flush_shard(struct shard *sh);
void hub_rbroker_sync_start(struct rconn *rc);
void hub_rbroker_batch_ack(struct rconn *rc);
void hub_rbroker_on_sub_reply(redisAsyncContext *ac, void *reply, void *privdata);

/* broker_redis_pub.c */

/* The ops of that file (see struct hub_broker_ops). */
int hub_rbroker_publish(struct hub_broker *hb, const char *channel, size_t len,
                        struct hub_msg *m, const struct hub_channel_opts *o,
                        hub_broker_publish_cb cb, void *ud);

/* A P_PUBLISH or P_COMMAND record (from hub_rbroker_pending_new) is done:
 * frees it with its script call. */
void hub_rbroker_pending_free(struct pending *p);
/* Script calls. A new call of script `script` (SCRIPT_*), empty; append
 * numkeys, the keys and the arguments in order. */
struct hub_rcall *hub_rbroker_call_new(int script);
void hub_rbroker_call_arg(struct hub_rcall *c, const void *p, size_t len);
void hub_rbroker_call_argf(struct hub_rcall *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Appends the key prefix + `kind` + `name` as one argument. */
void hub_rbroker_call_key(struct hub_rcall *c, const struct rbroker *b, const char *kind,
                          const char *name, size_t len);
void hub_rbroker_call_free(struct hub_rcall *c);
/* Sends `c` (owned by the call from now on, whatever happens) on the
 * command connection of `sh` with EVALSHA; a NOSCRIPT answer sends it again
 * with EVAL, once. Same rules as hub_rbroker_command: returns 0 and calls
 * `cb` exactly once, never synchronously, or HUB_EUNAVAILABLE without
 * calling it (not up, over the pending cap, stopped). */
int hub_rbroker_call(struct shard *sh, struct hub_rcall *c, hub_rcall_cb cb, void *ud);
/* Publishes through the script call `c` (owned from now on) to `channel`,
 * with the rules and the acknowledgement of a PUBLISH (hub_rbroker_publish);
 * the reply is the publish script's {offset, epoch, receivers}. */
int hub_rbroker_publish_call(struct rbroker *b, const char *channel, size_t len,
                             struct hub_rcall *c, hub_broker_publish_cb cb, void *ud);

/* broker_redis_stream.c: history in Redis. */
const char *hub_rbroker_script_text(int script);
int hub_rbroker_stream_publish(struct rbroker *b, const char *channel, size_t len,
                               struct hub_msg *m, const struct hub_channel_opts *o,
                               hub_broker_publish_cb cb, void *ud);
int hub_rbroker_history(struct hub_broker *hb, const char *channel, size_t len,
                        const struct hub_channel_opts *o, const struct hub_history_query *q,
                        hub_broker_history_cb cb, void *ud);
/* A message of a hub channel on the sub connection of `sh` that starts
 * with HUB_RFRAME_MARK: decoded and handed to deliver with its offset and
 * epoch; returns 0. Returns -1 (counted) when it does not decode: the
 * caller delivers it as a plain message. `name` and `s` are borrowed. */
int hub_rbroker_stream_message(struct shard *sh, const char *name, size_t nlen,
                               const char *s, size_t n);
void hub_rbroker_stream_metrics(const struct rbroker *b, struct hub_buf *out);

/* broker_redis_presence.c: presence in Redis. */
void hub_rbroker_presence_add(struct hub_broker *hb, const char *channel, size_t len,
                              const struct hub_channel_opts *o, const char *client,
                              const char *user, size_t user_len, const char *entry,
                              size_t entry_len);
void hub_rbroker_presence_remove(struct hub_broker *hb, const char *channel, size_t len,
                                 const struct hub_channel_opts *o, const char *client);
int hub_rbroker_presence(struct hub_broker *hb, const char *channel, size_t len,
                         const struct hub_channel_opts *o, uint32_t max,
                         hub_broker_presence_cb cb, void *ud);
/* From the flush (uv_idle): sends the shard's queued adds and removes, and
 * its refresh when one is due. */
void hub_rbroker_presence_flush(struct shard *sh);
/* Both connections of `sh` are (again) up: refresh its entries at the
 * next flush (Redis may have lost them). */
void hub_rbroker_presence_resync(struct shard *sh);
/* Creation (its timer counts in open_handles; stop() closes it) and
 * free() of the presence state. */
void hub_rbroker_presence_init(struct rbroker *b);
void hub_rbroker_presence_free(struct rbroker *b);
void hub_rbroker_presence_metrics(const struct rbroker *b, struct hub_buf *out);
/* Sends one Redis command (argv[0..argc) with byte lengths `lens`, all
 * borrowed until it returns) on the command connection of the FIRST server
 * of the list (the registry's keys live there). Same rules as publish:
 * returns 0 and calls `cb` (may be NULL) exactly once, never synchronously;
 * or returns HUB_EUNAVAILABLE without calling it when that connection is
 * not up or the pending cap (max_pending, max_pending_bytes, shared with
 * PUBLISH) is reached. An answer not received within command_timeout_ms
 * drops the connection and fails every pending command. Never use
 * (P)SUBSCRIBE or blocking commands. `hb` must be a redis broker. */
int hub_rbroker_command(struct hub_broker *hb, int argc, const char **argv,
                        const size_t *lens, hub_broker_reply_cb cb, void *ud);
/* Subscribes the control channel (prefix + HUB_BROKER_CONTROL_CHANNEL, on
 * the first server) and hands its messages to `fn` instead of `deliver`;
 * the subscription is kept across reconnects (health counts it like any
 * channel). fn == NULL unsubscribes it. Messages published while the
 * subscriber connection is down are lost (pub/sub is at-most-once). */
void hub_rbroker_control(struct hub_broker *hb, hub_broker_control_fn fn, void *ud);
void hub_rbroker_metrics(const struct hub_broker *hb, struct hub_buf *out);
/* Sends the next probe (PUBLISH on cmd, echo awaited on sub), or with
 * `ping` a PING on cmd only. The connections it uses must be up. */
void hub_rbroker_probe_send(struct shard *sh, int ping);
/* The probe numbered by the decimal `s` came back on the current sub
 * connection: completes the publishes that waited for it. Inside a hiredis
 * callback of sub; fires user callbacks last. */
void hub_rbroker_probe_echo(struct shard *sh, const char *s, size_t len);
/* Detaches the publishes waiting for a probe numbered <= `seq` (all:
 * UINT64_MAX), oldest first, linked by `next`; completes them with
 * `status` (fires user callbacks; touches nothing of the broker after the
 * first). */
void hub_rbroker_acks_take(struct shard *sh, uint64_t seq, struct hub_list *out);
void hub_rbroker_acks_fire(struct rbroker *b, struct hub_list *list, int status);
/* The liveness timer's callback (data: the broker). */
void hub_rbroker_on_live(uv_timer_t *t);

#endif
