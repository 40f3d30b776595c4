/* Protocol v1 codec: decodes client commands and HTTP API bodies, encodes
 * replies, errors and deliveries. Pure: no I/O, no logging, no loop.
 * The wire format is documented in docs/protocol.md.
 *
 * Ownership: decoded spans point into the caller's input and are valid as
 * long as it is; encoders append to a struct hub_buf the caller owns.
 * No callbacks. */
#ifndef LUAHUB_PROTO_H
#define LUAHUB_PROTO_H

#include <stddef.h>
#include <stdint.h>
#include "luahub/util.h"

#define HUB_CHANNEL_MAX 255     /* bytes in a channel name */
#define HUB_METHOD_MAX 255      /* bytes in an rpc method name */
#define HUB_API_MAX_CHANNELS 1024 /* channels in one /api/broadcast */
#define HUB_EPOCH_MAX 32        /* bytes of a history stream's epoch */
#define HUB_OFFSET_MAX INT64_MAX /* the largest offset a client may name */

/* Error codes of the protocol: enum name, wire name. */
#define HUB_PROTO_ERRORS(X)                  \
    X(BAD_REQUEST, "bad_request")            \
    X(UNKNOWN_OP, "unknown_op")              \
    X(INVALID_CHANNEL, "invalid_channel")    \
    X(NOT_SUBSCRIBED, "not_subscribed")      \
    X(FORBIDDEN, "forbidden")                \
    X(TOO_LARGE, "too_large")                \
    X(LIMIT_EXCEEDED, "limit_exceeded")      \
    X(INTERNAL, "internal")                  \
    X(RPC_ERROR, "rpc_error")                \
    X(UNAVAILABLE, "unavailable")            \
    X(NOT_AVAILABLE, "not_available")        \
    X(RATE_LIMITED, "rate_limited")

enum hub_proto_code {
#define HUB_X(name, str) HUB_PERR_##name,
    HUB_PROTO_ERRORS(HUB_X)
#undef HUB_X
    HUB_PERR__COUNT
};

/* Wire name of a code ("bad_request"...), or "internal" for an unknown one. */
const char *hub_proto_code_name(int code);

enum hub_op {
    HUB_OP_NONE = 0,
    HUB_OP_SUBSCRIBE,
    HUB_OP_UNSUBSCRIBE,
    HUB_OP_PUBLISH,
    HUB_OP_PING,
    HUB_OP_RPC,
    HUB_OP_HISTORY,
    HUB_OP_PRESENCE,
    HUB_OP_PRESENCE_STATS,
};

/* A position in a history stream, as a client names it. */
struct hub_cmd_pos {
    int set;                            /* the member was there */
    uint64_t offset;
    int has_epoch;                      /* recover: epoch may be left out */
    char epoch[HUB_EPOCH_MAX + 1];
};

/* A borrowed slice of someone else's bytes. */
struct hub_span {
    const char *p;
    size_t len;
};

/* One decoded client command. Spans point into the decoded input. */
struct hub_cmd {
    int op;                             /* HUB_OP_* */
    struct hub_span id;                 /* raw JSON of "id" (integer, or string with quotes); len 0 if absent */
    char channel[HUB_CHANNEL_MAX + 1];  /* decoded, validated, NUL-terminated; subscribe/unsubscribe/publish */
    size_t channel_len;
    struct hub_span data;               /* raw JSON text of "data": exactly one value; publish (required), rpc (optional) */
    char method[HUB_METHOD_MAX + 1];    /* rpc only, NUL-terminated */
    size_t method_len;
    struct hub_cmd_pos recover;         /* subscribe: "recover":{"offset":N,"epoch":E} */
    uint32_t rewind;                    /* subscribe: "rewind":N (0: none) */
    uint32_t limit;                     /* history: "limit":N (0: none) */
    struct hub_cmd_pos since;           /* history: "since":{"offset":N,"epoch":E} */
    int reverse;                        /* history: "reverse":true */
};

struct hub_proto_error {
    int code;           /* HUB_PERR_* */
    int invalid_utf8;   /* the text is not valid UTF-8 (a WebSocket closes with 1007) */
    char message[192];  /* human text naming the problem, e.g. "field 'channel' must be a string" */
};

/* Decodes one client text message `buf[0..len)`.
 * Returns 0 and fills `cmd`, or -1 and fills `err`. On error, `cmd->id` is
 * still set when an id was read from a syntactically valid message, so the
 * reply can echo it. Borrows `buf`: spans in `cmd` point into it.
 * Rules: the message is one JSON object (RFC 8259, UTF-8 validated); "op" is a
 * string naming a known op (else unknown_op); each op takes exactly its fields
 * (missing, extra, duplicate or wrong-typed fields: bad_request); "id" is an
 * integer or a string; channel names follow hub_proto_channel_valid (else
 * invalid_channel). */
int hub_proto_decode(const char *buf, size_t len, struct hub_cmd *cmd,
                     struct hub_proto_error *err);

/* 1 if `p[0..len)` is valid UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing past U+10FFFF). */
int hub_proto_utf8_valid(const char *p, size_t len);

/* 1 if `p[0..len)` is a valid channel name: 1..255 bytes of [A-Za-z0-9_:.@/=#-]. */
int hub_proto_channel_valid(const char *p, size_t len);

/* 1 if `p[0..len)` is exactly one well-formed JSON value (any type,
 * surrounding whitespace allowed), else 0. */
int hub_proto_json_valid(const char *p, size_t len);

/* The longest prefix of the JSON array text p[0..n) ("[e1,e2,...]", valid
 * JSON) that holds whole elements and, closed with "]", takes at most `max`
 * bytes: returns its length without the "]" (1 when not even the first
 * element fits) and sets *elements to how many it holds. */
size_t hub_proto_array_cut(const char *p, size_t n, size_t max, size_t *elements);

/* A decoded HTTP API publish/broadcast body. */
struct hub_api_req {
    struct hub_span data;   /* raw JSON of "data", points into the body */
    unsigned nchannels;
    struct hub_buf names;   /* nchannels NUL-terminated valid names, back to back; owned, free with hub_buf_free */
};

/* Decodes the body of POST /api/publish (`broadcast` 0: {"channel":C,"data":D})
 * or POST /api/broadcast (`broadcast` 1: {"channels":[C,...],"data":D}, 1 to
 * HUB_API_MAX_CHANNELS names). Same rules and error codes as hub_proto_decode.
 * Returns 0 or -1 with `err` filled; `req->names` is owned by the caller either
 * way (zero-initialise `req` first). */
int hub_proto_decode_api(const char *buf, size_t len, int broadcast,
                         struct hub_api_req *req, struct hub_proto_error *err);

/* Encoders: each appends one complete JSON object to `b`. `id` may be empty
 * (len 0): the "id" member is then left out. */

/* {"id":ID,"ok":true} or, with a channel, {"id":ID,"ok":true,"channel":"C"} */
void hub_proto_encode_ok(struct hub_buf *b, struct hub_span id,
                         const char *channel, size_t channel_len);
/* {"id":ID,"ok":true,"channel":"C"[,"recovered":B],"offset":N,"epoch":"E"
 * [,"missed":M]}: a history channel's position; `recovered` < 0 and
 * `missed` < 0 leave those out. */
void hub_proto_encode_ok_pos(struct hub_buf *b, struct hub_span id, const char *channel,
                             size_t channel_len, uint64_t offset, const char *epoch,
                             int recovered, int64_t missed);
/* {"id":ID,"ok":true,"data":DATA}; `data` is trusted valid JSON. */
void hub_proto_encode_ok_data(struct hub_buf *b, struct hub_span id,
                              struct hub_span data);
/* {"id":ID,"ok":false,"error":{"code":"CODE","message":"MSG"}}; MSG is escaped. */
void hub_proto_encode_error(struct hub_buf *b, struct hub_span id, int code,
                            const char *message);
/* {"id":ID,"ok":false,"error":{"code":"rate_limited","message":"MSG","retry_in_ms":N}} */
void hub_proto_encode_rate_limited(struct hub_buf *b, struct hub_span id, const char *message,
                                   uint64_t retry_ms);
/* {"op":"welcome","client":"ID","version":"V","ping":N} */
void hub_proto_encode_welcome(struct hub_buf *b, const char *client_id,
                              const char *version, unsigned ping);

/* Delivery envelope {"op":"message","channel":"C","data":DATA}: its exact
 * length, and a writer that fills `dst` (which has that many bytes) and
 * returns the length. The channel must be valid (no escaping needed) and
 * `data` valid JSON. */
size_t hub_proto_delivery_len(size_t channel_len, size_t data_len);
size_t hub_proto_write_delivery(char *dst, const char *channel, size_t channel_len,
                                const char *data, size_t data_len);

#endif
