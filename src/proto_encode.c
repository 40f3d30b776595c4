/* Protocol v1 encoders (include/luahub/proto.h): replies, errors, the
 * welcome, deliveries, and cutting a JSON array to a size. The decoder is
 * proto.c. Pure: no I/O, no state. */
#include "luahub/proto.h"

#include <stdio.h>
#include <string.h>

/* ---- encoders ---- */

#define PUT(b, lit) hub_buf_append((b), lit, sizeof(lit) - 1)

static void open_reply(struct hub_buf *b, struct hub_span id)
{
    PUT(b, "{");
    if (id.len) {
        PUT(b, "\"id\":");
        hub_buf_append(b, id.p, id.len);
        PUT(b, ",");
    }
}

void hub_proto_encode_ok(struct hub_buf *b, struct hub_span id,
                         const char *channel, size_t channel_len)
{
    open_reply(b, id);
    PUT(b, "\"ok\":true");
    if (channel && channel_len) {
        PUT(b, ",\"channel\":");
        hub_buf_append_json_string(b, channel, channel_len);
    }
    PUT(b, "}");
}

void hub_proto_encode_ok_pos(struct hub_buf *b, struct hub_span id, const char *channel,
                             size_t channel_len, uint64_t offset, const char *epoch,
                             int recovered, int64_t missed)
{
    hub_proto_encode_ok(b, id, channel, channel_len);
    b->len--;                           /* reopen the object */
    if (recovered >= 0)
        hub_buf_printf(b, ",\"recovered\":%s", recovered ? "true" : "false");
    hub_buf_printf(b, ",\"offset\":%llu,\"epoch\":", (unsigned long long)offset);
    hub_buf_append_json_string(b, epoch, strlen(epoch));
    if (missed >= 0)
        hub_buf_printf(b, ",\"missed\":%lld", (long long)missed);
    PUT(b, "}");
}

void hub_proto_encode_ok_data(struct hub_buf *b, struct hub_span id,
                              struct hub_span data)
{
    open_reply(b, id);
    PUT(b, "\"ok\":true,\"data\":");
    if (data.len)
        hub_buf_append(b, data.p, data.len);
    else
        PUT(b, "null");   /* an empty span would leave the reply unparseable */
    PUT(b, "}");
}

void hub_proto_encode_error(struct hub_buf *b, struct hub_span id, int code,
                            const char *message)
{
    open_reply(b, id);
    PUT(b, "\"ok\":false,\"error\":{\"code\":\"");
    hub_buf_appends(b, hub_proto_code_name(code));
    PUT(b, "\",\"message\":");
    message = message ? message : "";
    hub_buf_append_json_string(b, message, strlen(message));
    PUT(b, "}}");
}

void hub_proto_encode_rate_limited(struct hub_buf *b, struct hub_span id, const char *message,
                                   uint64_t retry_ms)
{
    hub_proto_encode_error(b, id, HUB_PERR_RATE_LIMITED, message);
    b->len -= 2;                        /* reopen the error object */
    hub_buf_printf(b, ",\"retry_in_ms\":%llu}}", (unsigned long long)retry_ms);
}

void hub_proto_encode_welcome(struct hub_buf *b, const char *client_id,
                              const char *version, unsigned ping)
{
    PUT(b, "{\"op\":\"welcome\",\"client\":");
    hub_buf_append_json_string(b, client_id, strlen(client_id));
    PUT(b, ",\"version\":");
    hub_buf_append_json_string(b, version, strlen(version));
    hub_buf_printf(b, ",\"ping\":%u}", ping);
}

static const char deliv_head[] = "{\"op\":\"message\",\"channel\":\"";
static const char deliv_mid[] = "\",\"data\":";

size_t hub_proto_delivery_len(size_t channel_len, size_t data_len)
{
    return sizeof(deliv_head) - 1 + channel_len + sizeof(deliv_mid) - 1 + data_len + 1;
}

size_t hub_proto_write_delivery(char *dst, const char *channel, size_t channel_len,
                                const char *data, size_t data_len)
{
    char *o = dst;
    memcpy(o, deliv_head, sizeof(deliv_head) - 1);
    o += sizeof(deliv_head) - 1;
    memcpy(o, channel, channel_len);
    o += channel_len;
    memcpy(o, deliv_mid, sizeof(deliv_mid) - 1);
    o += sizeof(deliv_mid) - 1;
    memcpy(o, data, data_len);
    o += data_len;
    *o++ = '}';
    return (size_t)(o - dst);
}

size_t hub_proto_array_cut(const char *p, size_t n, size_t max, size_t *elements)
{
    size_t keep = 1, count = 0;
    int depth = 0, in_str = 0;
    *elements = 0;
    if (n < 2 || p[0] != '[')
        return 1;
    for (size_t i = 1; i < n; i++) {
        char c = p[i];
        int ended = 0;
        if (in_str) {
            if (c == '\\') {
                i++;
            } else if (c == '"') {
                in_str = 0;
                ended = depth == 0;
            }
        } else if (c == '"') {
            in_str = 1;
        } else if (c == '[' || c == '{') {
            depth++;
        } else if (c == ']' || c == '}') {
            if (depth == 0)
                break;                  /* the array's own end */
            ended = --depth == 0;
        } else if (depth == 0 && c != ',' && c != ' ' && c != '\t' && c != '\r' &&
                   c != '\n') {
            /* a number or literal: it ends before , ] or blank */
            char d = i + 1 < n ? p[i + 1] : ']';
            ended = d == ',' || d == ']' || d == ' ' || d == '\t' || d == '\r' || d == '\n';
        }
        if (ended) {
            if (i + 2 > max)
                break;
            keep = i + 1;
            count++;
        }
    }
    *elements = count;
    return keep;
}
