/* Process-wide counters and their Prometheus text form. One loop, one
 * thread: plain integers, no atomics. */
#ifndef LUAHUB_METRICS_H
#define LUAHUB_METRICS_H

#include <stdint.h>
#include "luahub/proto.h"
#include "luahub/util.h"

struct hub_metrics {
    uint64_t connections;           /* gauge: open WebSocket connections */
    uint64_t connections_total;     /* accepted upgrades */
    uint64_t connections_refused;   /* upgrades refused (limit, path, shutdown) */
    uint64_t accept_pauses;         /* accepting paused: out of fds or memory */
    uint64_t subscriptions;         /* gauge */
    uint64_t channels;              /* gauge */
    uint64_t published;             /* messages published (per channel) */
    uint64_t deliveries;            /* frames queued to subscribers */
    uint64_t bytes_out;             /* bytes handed to sockets */
    uint64_t writes;                /* socket writes on WebSocket connections */
    uint64_t flushes;               /* passes writing every connection with frames */
    uint64_t flushes_paused;        /* ... of them after a write pause */
    uint64_t slow_consumer_closes;
    uint64_t http_requests;
    uint64_t http_connections;      /* gauge: open plain HTTP connections */
    uint64_t http_timeouts;         /* HTTP connections closed by a deadline */
    uint64_t protocol_errors[HUB_PERR__COUNT];
};

extern struct hub_metrics hub_metrics;

/* Appends the Prometheus exposition of hub_metrics to `b`. */
void hub_metrics_render(struct hub_buf *b);

#endif
