/* Metrics in the Prometheus text format (version 0.0.4): one registry of
 * sources rendered in turn, one writer for every family's # HELP / # TYPE
 * lines and samples, one histogram type. Counters live in the modules that
 * count; gauges are read from their owners when /metrics is rendered,
 * never copied on each change. One loop, one thread: plain integers.
 *
 * Ownership: a source's `ud` is borrowed (remove the source before freeing
 * it). A render function appends to the caller's buffer and must not add
 * or remove sources. */
#ifndef LUAHUB_METRICS_H
#define LUAHUB_METRICS_H

#include <stdint.h>

#include "luahub/util.h"

/* Renders a source's families into `b`. */
typedef void (*hub_metrics_fn)(void *ud, struct hub_buf *b);

/* Adds / removes a source (rendered in the order added). `ud` is
 * borrowed: remove the source before freeing it. */
void hub_metrics_add(hub_metrics_fn fn, void *ud);
void hub_metrics_remove(hub_metrics_fn fn, void *ud);

/* Appends every source's families to `b`. */
void hub_metrics_render(struct hub_buf *b);

/* "# HELP name help" and "# TYPE name type" (type: "counter", "gauge",
 * "histogram"). */
void hub_metric_family(struct hub_buf *b, const char *name, const char *type,
                       const char *help);
/* One sample: "name{labels} v" (labels NULL: none), e.g. labels
 * "hook=\"on_publish\"". */
void hub_metric_value(struct hub_buf *b, const char *name, const char *labels, uint64_t v);
/* A family with one unlabelled sample. */
void hub_metric_one(struct hub_buf *b, const char *name, const char *type, const char *help,
                    uint64_t v);

#define HUB_HIST_MAX 16

/* A histogram of durations in nanoseconds over fixed bucket bounds. */
struct hub_hist {
    const uint64_t *bounds_ns;      /* ascending, n entries; static */
    unsigned n;
    uint64_t count[HUB_HIST_MAX + 1]; /* per bucket, not cumulative; last: +Inf */
    uint64_t sum_ns;
    uint64_t total;
};

/* Bounds: 1 us .. 1 s (in-process calls), 100 us .. 5 s (network round trips). */
extern const uint64_t hub_hist_bounds_call[15];
extern const uint64_t hub_hist_bounds_rtt[15];

void hub_hist_init(struct hub_hist *h, const uint64_t *bounds_ns, unsigned n);
void hub_hist_observe(struct hub_hist *h, uint64_t ns);
/* The samples of a histogram family `name` (in seconds): _bucket{le=...},
 * _sum and _count, each with `labels` (NULL: none) before le. */
void hub_metric_hist(struct hub_buf *b, const char *name, const char *labels,
                     const struct hub_hist *h);

#endif
