/* The metrics registry, the family writer and the histogram
 * (include/luahub/metrics.h). */
#include "luahub/metrics.h"

#include <string.h>

#define SOURCES_MAX 16

static struct {
    hub_metrics_fn fn;
    void *ud;
} sources[SOURCES_MAX];
static unsigned nsources;

void hub_metrics_add(hub_metrics_fn fn, void *ud)
{
    if (nsources < SOURCES_MAX) {
        sources[nsources].fn = fn;
        sources[nsources].ud = ud;
        nsources++;
    }
}

void hub_metrics_remove(hub_metrics_fn fn, void *ud)
{
    for (unsigned i = 0; i < nsources; i++)
        if (sources[i].fn == fn && sources[i].ud == ud) {
            memmove(&sources[i], &sources[i + 1], (nsources - i - 1) * sizeof(sources[0]));
            nsources--;
            return;
        }
}

void hub_metrics_render(struct hub_buf *b)
{
    for (unsigned i = 0; i < nsources; i++)
        sources[i].fn(sources[i].ud, b);
}

void hub_metric_family(struct hub_buf *b, const char *name, const char *type,
                       const char *help)
{
    hub_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void hub_metric_value(struct hub_buf *b, const char *name, const char *labels, uint64_t v)
{
    if (labels)
        hub_buf_printf(b, "%s{%s} %llu\n", name, labels, (unsigned long long)v);
    else
        hub_buf_printf(b, "%s %llu\n", name, (unsigned long long)v);
}

void hub_metric_one(struct hub_buf *b, const char *name, const char *type, const char *help,
                    uint64_t v)
{
    hub_metric_family(b, name, type, help);
    hub_metric_value(b, name, NULL, v);
}

const uint64_t hub_hist_bounds_call[15] = {
    1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
    1000000, 2500000, 5000000, 10000000, 100000000, 1000000000,
};

const uint64_t hub_hist_bounds_rtt[15] = {
    100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 25000000,
    50000000, 100000000, 250000000, 500000000, 1000000000, 2500000000u, 5000000000u,
};

void hub_hist_init(struct hub_hist *h, const uint64_t *bounds_ns, unsigned n)
{
    memset(h, 0, sizeof(*h));
    h->bounds_ns = bounds_ns;
    h->n = n < HUB_HIST_MAX ? n : HUB_HIST_MAX;
}

void hub_hist_observe(struct hub_hist *h, uint64_t ns)
{
    unsigned i = 0;
    while (i < h->n && ns > h->bounds_ns[i])
        i++;
    h->count[i]++;
    h->sum_ns += ns;
    h->total++;
}

void hub_metric_hist(struct hub_buf *b, const char *name, const char *labels,
                     const struct hub_hist *h)
{
    const char *sep = labels ? "," : "";
    uint64_t cum = 0;

    if (!labels)
        labels = "";
    for (unsigned i = 0; i < h->n; i++) {
        cum += h->count[i];
        hub_buf_printf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep,
                       (double)h->bounds_ns[i] / 1e9, (unsigned long long)cum);
    }
    cum += h->count[h->n];
    hub_buf_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
                   (unsigned long long)cum);
    if (labels[0]) {
        hub_buf_printf(b, "%s_sum{%s} %.9f\n", name, labels, (double)h->sum_ns / 1e9);
        hub_buf_printf(b, "%s_count{%s} %llu\n", name, labels, (unsigned long long)h->total);
    } else {
        hub_buf_printf(b, "%s_sum %.9f\n", name, (double)h->sum_ns / 1e9);
        hub_buf_printf(b, "%s_count %llu\n", name, (unsigned long long)h->total);
    }
}
