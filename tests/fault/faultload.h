/* faultload: a steady, counted publish for the fault suite (tests/fault/).
 *
 * Publishers (threads) number their messages {"p":P,"s":SEQ} and publish
 * them at a steady rate to one channel, over WebSocket (pipelined, a bounded
 * window of replies outstanding) or HTTP (POST /api/publish, one after the
 * other). Only a publish answered ok / 200 is "acknowledged". Subscribers
 * (threads, one WebSocket each) read everything and record where each
 * message landed in their stream. At the end every publisher publishes a
 * sentinel {"p":P,"s":-1} (retried until acknowledged) and each subscriber
 * reads until it has them all; then every acknowledged message is looked up
 * in every subscriber's stream and counted: delivered, lost (and why a loss
 * is allowed, see below), duplicated, reordered.
 *
 * What a loss may be excused by (anything else fails the test):
 * - plain channels (docs/internals.md, "Redis: what an acknowledged publish
 *   means"): a 200 binds the hub that answered it, for its own subscribers;
 *   another hub's subscribers may miss what was published while that hub's
 *   Redis subscription was down. The scenario brackets the fault with
 *   fl_fault_begin / fl_fault_end: a message sent inside that window and
 *   lost by a subscriber of another hub than the one that acknowledged it
 *   is excused ("window"). A subscriber whose connection died (a worker
 *   killed) loses what was queued to it and what was published until its
 *   new subscription was confirmed ("reconnect": sent before the new
 *   subscribe reply, later than the last message it had from that
 *   publisher).
 * - history channels (docs/protocol.md, "Deliveries"): nothing, except an
 *   explicit {"op":"reset"} (or a recovery answered recovered:false) that
 *   the subscriber received between the messages of that publisher around
 *   the lost one ("reset"). Deliveries must carry offsets without a gap or
 *   a repeat, a reset saying where they go on.
 *
 * Duplicates and reordering (per publisher) are never excused. Every wait is
 * bounded; the helpers fail the test (Check) on anything unexpected. */
#ifndef FAULTLOAD_H
#define FAULTLOAD_H

#include <pthread.h>
#include <stdint.h>

#include "hubtest.h"

#define FL_LONG_MS 30000

enum {
    FL_MAXPUB = 2,
    FL_MAXSUB = 8,
    FL_MAXHUB = 4,          /* hub instances a run may meet (workers: a restarted one) */
    FL_MAXN = 40000,        /* publishes per publisher, at most */
    FL_MAXCONN = 8,         /* connections per subscriber (reconnects + 1) */
    FL_MAXRESET = 64,
    FL_MAXWIN = 8,
};

enum fl_kind { FL_WS, FL_HTTP };

/* What a run does. Publisher p and subscriber i belong to hub p % nhubs and
 * i % nhubs; with `shared_port` (workers) they are connected until they land
 * on the instance of that index (instances are numbered in the order the
 * run first meets them). */
struct fl_spec {
    const char *what;           /* scenario, for the report line */
    int history;                /* 1: channel "h:load" (conf: h:* has history) */
    int rate;                   /* publishes per second, per publisher */
    int npub;
    enum fl_kind kind[FL_MAXPUB];
    int nsub;
    int nhubs;
    int port[FL_MAXHUB];        /* each hub's port */
    int shared_port;            /* workers: every hub index is on port[0] */
    int reconnect;              /* clients reconnect when their connection dies */
};

/* The counts of a finished run (all subscribers together). */
struct fl_totals {
    long long published, acked, refused, unanswered;
    long long expected;         /* acknowledged messages x subscribers */
    long long delivered;        /* of those, delivered */
    long long lost, lost_window, lost_reconnect, lost_reset, lost_unexplained;
    long long unacked_delivered;
    long long duplicated, reordered, offset_errors, offset_mismatch, other;
    long long resets, new_epoch_resets, recoveries, unrecovered, reconnects;
    int subs_with_new_epoch;    /* subscribers that got a reset naming another epoch */
};

struct fl_run;

/* Connects and subscribes the subscribers, starts publishers and readers.
 * Returns a new run (freed by fl_finish). */
struct fl_run *fl_start(const struct fl_spec *spec);

/* Waits (bounded) until every publisher has `more` more acknowledgements. */
void fl_more_ok(struct fl_run *r, int more);

/* Opens the fault window: waits (bounded) until every message
 * acknowledged so far has reached every subscriber, so that what is lost
 * later was sent inside the window. Call right before the fault. */
void fl_fault_begin(struct fl_run *r);
/* Closes it: call once every hub is healthy again. */
void fl_fault_end(struct fl_run *r);

/* Publishes answered not-ok so far (refused + unanswered), all publishers. */
long long fl_not_ok(struct fl_run *r);

/* Instance id (from the welcome) of hub index `k`, or "" if not met yet. */
const char *fl_instance(struct fl_run *r, int k);

/* Stops the publishers, publishes the sentinels (every hub must be
 * healthy: the caller waits for it), reads every subscriber to its end,
 * counts, prints one "[fault] ..." line, asserts the rules above, fills
 * `t` and frees the run. */
void fl_finish(struct fl_run *r, struct fl_totals *t);

/* ------------------------------------------------------------------ */
/* Small helpers of the suite                                           */
/* ------------------------------------------------------------------ */

/* GET /healthz status. */
int fl_healthz(int port);
/* Polls /healthz of `port` until it answers `want` `times` in a row. */
void fl_wait_healthz(int port, int want, int times, int timeout_ms);
/* Open descriptors of `pid` (/proc/PID/fd). */
int fl_fd_count(pid_t pid);

#endif
