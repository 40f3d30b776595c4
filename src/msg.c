/* Refcounted, pre-framed WebSocket messages (see include/luahub/msg.h). */
#include "luahub/msg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/proto.h"
#include "luahub/util.h"

struct hub_msg *hub_msg_new(size_t payload_len)
{
    struct hub_msg *m = hub_xmalloc(sizeof(*m) + HUB_MSG_HEADROOM + payload_len);
    m->refs = 1;
    m->offset = 0;
    m->payload_len = (uint32_t)payload_len;
    m->frame_off = HUB_MSG_HEADROOM;
    m->frame_len = (uint32_t)payload_len;
    return m;
}

void hub_msg_seal(struct hub_msg *m, int opcode)
{
    uint64_t n = m->payload_len;
    unsigned char h[10];
    size_t hl;

    h[0] = (unsigned char)(0x80 | (opcode & 0x0f));
    if (n < 126) {
        h[1] = (unsigned char)n;
        hl = 2;
    } else if (n <= 0xffff) {
        h[1] = 126;
        h[2] = (unsigned char)(n >> 8);
        h[3] = (unsigned char)n;
        hl = 4;
    } else {
        h[1] = 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (unsigned char)(n >> (56 - 8 * i));
        hl = 10;
    }
    m->frame_off = (uint32_t)(HUB_MSG_HEADROOM - hl);
    memcpy(m->buf + m->frame_off, h, hl);
    m->frame_len = (uint32_t)(hl + n);
}

void hub_msg_unref(struct hub_msg *m)
{
    if (--m->refs == 0)
        free(m);
}

struct hub_msg *hub_msg_text(const void *p, size_t n)
{
    struct hub_msg *m = hub_msg_new(n);
    memcpy(hub_msg_payload(m), p, n);
    hub_msg_seal(m, HUB_WS_TEXT);
    return m;
}

struct hub_msg *hub_msg_close(uint16_t code, const char *reason)
{
    size_t rl = reason ? strlen(reason) : 0;
    if (rl > 123) /* control frame payloads are at most 125 bytes */
        rl = 123;
    struct hub_msg *m = hub_msg_new(2 + rl);
    unsigned char *p = hub_msg_payload(m);
    p[0] = (unsigned char)(code >> 8);
    p[1] = (unsigned char)code;
    if (rl)
        memcpy(p + 2, reason, rl);
    hub_msg_seal(m, HUB_WS_CLOSE);
    return m;
}

struct hub_msg *hub_msg_ping(void)
{
    struct hub_msg *m = hub_msg_new(2);
    memcpy(hub_msg_payload(m), "ka", 2);
    hub_msg_seal(m, HUB_WS_PING);
    return m;
}

struct hub_msg *hub_msg_delivery(const char *channel, size_t channel_len,
                                 const char *data, size_t data_len)
{
    size_t n = hub_proto_delivery_len(channel_len, data_len);
    struct hub_msg *m = hub_msg_new(n);
    hub_proto_write_delivery((char *)hub_msg_payload(m), channel, channel_len,
                             data, data_len);
    hub_msg_seal(m, HUB_WS_TEXT);
    return m;
}

struct hub_msg *hub_msg_delivery_open(const char *channel, size_t channel_len,
                                      const char *data, size_t data_len)
{
    size_t n = hub_proto_delivery_len(channel_len, data_len);
    struct hub_msg *m = hub_msg_new(n + HUB_MSG_OFFSET_ROOM);
    hub_proto_write_delivery((char *)hub_msg_payload(m), channel, channel_len,
                             data, data_len);
    m->payload_len = (uint32_t)(n - 1); /* without the closing brace */
    return m;
}

void hub_msg_delivery_close(struct hub_msg *m, uint64_t offset)
{
    char *end = (char *)hub_msg_payload(m) + m->payload_len;
    int k = snprintf(end, HUB_MSG_OFFSET_ROOM, ",\"offset\":%llu}", (unsigned long long)offset);
    m->payload_len += (uint32_t)k;
    m->offset = offset;
    hub_msg_seal(m, HUB_WS_TEXT);
}

int hub_msg_delivery_data(const char *p, size_t n, const char **data, size_t *len)
{
    static const char head[] = "{\"op\":\"message\",\"channel\":\"";
    static const char mid[] = "\",\"data\":";
    static const char off[] = ",\"offset\":";
    size_t hl = sizeof(head) - 1, ml = sizeof(mid) - 1, ol = sizeof(off) - 1;

    if (n < hl + ml + 2 || memcmp(p, head, hl) || p[n - 1] != '}')
        return -1;
    /* Channel names need no escaping: the name ends at the first quote. */
    const char *q = memchr(p + hl, '"', n - hl);
    if (!q || (size_t)(p + n - q) < ml + 2 || memcmp(q, mid, ml))
        return -1;
    const char *d = q + ml, *e = p + n - 1;
    /* With an offset the payload ends ,"offset":DIGITS} */
    const char *t = e;
    while (t > d && t[-1] >= '0' && t[-1] <= '9')
        t--;
    if (t < e && (size_t)(t - d) > ol && !memcmp(t - ol, off, ol))
        e = t - ol;
    *data = d;
    *len = (size_t)(e - d);
    return 0;
}

void hub_msg_history_json(struct hub_buf *b, struct hub_msg *const *msgs, size_t n,
                          size_t max)
{
    size_t k = 0, put = 0;
    hub_buf_appends(b, "\"messages\":[");
    for (; k < n; k++) {
        const char *d;
        size_t dl;
        struct hub_msg *m = msgs[k];
        if (hub_msg_delivery_data((const char *)hub_msg_payload(m), m->payload_len, &d, &dl) < 0)
            continue;
        if (b->len + dl + 48 > max)
            break;
        hub_buf_printf(b, "%s{\"offset\":%llu,\"data\":", put++ ? "," : "",
                       (unsigned long long)m->offset);
        hub_buf_append(b, d, dl);
        hub_buf_appends(b, "}");
    }
    hub_buf_printf(b, "],\"truncated\":%s", k < n ? "true" : "false");
}
