/* Refcounted, pre-framed WebSocket messages (see include/luahub/msg.h). */
#include "luahub/msg.h"

#include <stdlib.h>
#include <string.h>

#include "luahub/proto.h"
#include "luahub/util.h"

struct hub_msg *hub_msg_new(size_t payload_len)
{
    struct hub_msg *m = hub_xmalloc(sizeof(*m) + HUB_MSG_HEADROOM + payload_len);
    m->refs = 1;
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
