/* Immutable, refcounted, pre-framed WebSocket messages.
 *
 * A message is one allocation: header, HUB_MSG_HEADROOM spare bytes, then the
 * payload. The server frame header (unmasked, FIN) is written once, right
 * before the payload, so the bytes [frame, frame + frame_len) can be handed
 * to the socket as they are, shared by every subscriber that queues a
 * reference. Nobody writes into a sealed message.
 *
 * Ownership: reference counted, single thread. Whoever holds a pointer
 * from hub_msg_new()/hub_msg_ref() or one of the constructors owns one
 * reference and drops it with hub_msg_unref(); the last one frees it. */
#ifndef LUAHUB_MSG_H
#define LUAHUB_MSG_H

#include <stddef.h>
#include <stdint.h>

/* Bytes reserved before the payload: 10 for the largest ws header plus at
 * least LWS_PRE (16) in front of it (checked in server.c). */
#define HUB_MSG_HEADROOM 32

enum hub_ws_opcode {
    HUB_WS_TEXT = 0x1,
    HUB_WS_BINARY = 0x2,
    HUB_WS_CLOSE = 0x8,
    HUB_WS_PING = 0x9,
    HUB_WS_PONG = 0xa,
};

struct hub_msg {
    uint32_t refs;
    uint32_t frame_off;     /* offset of the frame header in buf */
    uint32_t frame_len;     /* header + payload */
    uint32_t payload_len;
    uint64_t offset;        /* a delivery on a history channel: its offset; else 0 */
    unsigned char buf[];    /* HUB_MSG_HEADROOM + payload_len */
};

/* A new message with room for `payload_len` bytes and one reference owned by
 * the caller. The payload is uninitialised: fill it, then hub_msg_seal(). */
struct hub_msg *hub_msg_new(size_t payload_len);

static inline unsigned char *hub_msg_payload(struct hub_msg *m)
{
    return m->buf + HUB_MSG_HEADROOM;
}

/* Writes the frame header (FIN + opcode, unmasked) in front of the payload. */
void hub_msg_seal(struct hub_msg *m, int opcode);

static inline const unsigned char *hub_msg_frame(const struct hub_msg *m)
{
    return m->buf + m->frame_off;
}

static inline struct hub_msg *hub_msg_ref(struct hub_msg *m)
{
    m->refs++;
    return m;
}

/* Drops one reference; frees the message with the last one. */
void hub_msg_unref(struct hub_msg *m);

/* A sealed text frame holding a copy of `p[0..n)`. New reference. */
struct hub_msg *hub_msg_text(const void *p, size_t n);

/* A sealed close frame with `code` and a reason (truncated to 123 bytes). */
struct hub_msg *hub_msg_close(uint16_t code, const char *reason);

/* A keepalive PING frame. It carries 2 bytes ("ka"): lws 4.1.6 does not
 * report a PONG with an empty payload to the protocol callback. */
struct hub_msg *hub_msg_ping(void);

/* A sealed delivery frame {"op":"message","channel":C,"data":D}: one
 * allocation, no intermediate copy. `data` must be valid JSON. New reference. */
struct hub_msg *hub_msg_delivery(const char *channel, size_t channel_len,
                                 const char *data, size_t data_len);

/* Room a delivery keeps at its end for ,"offset":N} (N up to 20 digits). */
#define HUB_MSG_OFFSET_ROOM 32

/* An open delivery: {"op":"message","channel":C,"data":D without its
 * closing brace, and HUB_MSG_OFFSET_ROOM bytes to spare; not sealed. New
 * reference. */
struct hub_msg *hub_msg_delivery_open(const char *channel, size_t channel_len,
                                      const char *data, size_t data_len);

/* Closes an open delivery with ,"offset":N} and seals it; sets m->offset.
 * Call it once, before anyone else holds a reference. */
void hub_msg_delivery_close(struct hub_msg *m, uint64_t offset);

/* The "data" value of a delivery frame's payload `p[0..n)` (sealed, with or
 * without an offset): sets *data and *len and returns 0, or -1 when the
 * payload is not a delivery. */
int hub_msg_delivery_data(const char *p, size_t n, const char **data, size_t *len);

/* Appends "messages":[{"offset":N,"data":D},...],"truncated":B for the
 * delivery frames msgs[0..n), in that order, stopping before the buffer
 * would pass `max` bytes (truncated is then true). */
struct hub_buf;
void hub_msg_history_json(struct hub_buf *b, struct hub_msg *const *msgs, size_t n,
                          size_t max);

#endif
