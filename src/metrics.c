/* Process counters and their Prometheus text exposition. */
#include "luahub/metrics.h"

struct hub_metrics hub_metrics;

static void metric(struct hub_buf *b, const char *name, const char *type,
                   const char *help, uint64_t v)
{
    hub_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", name, help, name,
                   type, name, (unsigned long long)v);
}

void hub_metrics_render(struct hub_buf *b)
{
    const struct hub_metrics *m = &hub_metrics;

    metric(b, "luahub_connections", "gauge", "Open WebSocket connections.",
           m->connections);
    metric(b, "luahub_connections_total", "counter",
           "WebSocket connections accepted.", m->connections_total);
    metric(b, "luahub_connections_refused_total", "counter",
           "WebSocket upgrades refused (limit, path, shutdown).",
           m->connections_refused);
    metric(b, "luahub_accept_pauses_total", "counter",
           "Times accepting paused for 100 ms: out of file descriptors or memory.",
           m->accept_pauses);
    metric(b, "luahub_subscriptions", "gauge", "Subscriptions over all channels.",
           m->subscriptions);
    metric(b, "luahub_channels", "gauge", "Channels with at least one subscriber.",
           m->channels);
    metric(b, "luahub_messages_published_total", "counter",
           "Messages published (one per channel).", m->published);
    metric(b, "luahub_deliveries_total", "counter",
           "Frames queued to subscribers.", m->deliveries);
    metric(b, "luahub_bytes_out_total", "counter",
           "Bytes written to WebSocket connections.", m->bytes_out);
    metric(b, "luahub_writes_total", "counter",
           "Socket writes on WebSocket connections (frames are coalesced).",
           m->writes);
    metric(b, "luahub_flushes_total", "counter",
           "Passes writing the queued frames of every connection.", m->flushes);
    metric(b, "luahub_flushes_paused_total", "counter",
           "Flushes after a pause that let frames gather (under load).",
           m->flushes_paused);
    metric(b, "luahub_slow_consumer_closes_total", "counter",
           "Connections closed with 4001 for a queue over max_queue_bytes.",
           m->slow_consumer_closes);
    metric(b, "luahub_http_requests_total", "counter", "HTTP requests served.",
           m->http_requests);
    metric(b, "luahub_http_connections", "gauge",
           "Open plain HTTP connections (not yet or never upgraded).", m->http_connections);
    metric(b, "luahub_http_timeouts_total", "counter",
           "HTTP connections closed by a deadline (request_timeout, http_idle_timeout).",
           m->http_timeouts);

    hub_buf_appends(b, "# HELP luahub_protocol_errors_total Protocol errors answered, by code.\n"
                       "# TYPE luahub_protocol_errors_total counter\n");
    for (int i = 0; i < HUB_PERR__COUNT; i++)
        hub_buf_printf(b, "luahub_protocol_errors_total{code=\"%s\"} %llu\n",
                       hub_proto_code_name(i),
                       (unsigned long long)m->protocol_errors[i]);
}
