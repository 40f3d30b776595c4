/* Fuzz target: the protocol codec (src/proto.c).
 *
 * The input is one WebSocket text message and, in turn, one HTTP API body:
 * hub_proto_decode (every op, with the history and presence members
 * recover, rewind, limit, since, reverse), hub_proto_decode_api (POST
 * /api/publish and /api/broadcast), hub_proto_json_valid,
 * hub_proto_utf8_valid and hub_proto_channel_valid. Beyond "no crash"
 * it checks the contract of include/luahub/proto.h: decoded channels are
 * valid names, "data" and "id" are exact spans of one JSON value, every
 * reply the session would encode from what was decoded (ok, data, error
 * with the decoder's message, the delivery frame) is valid JSON in valid
 * UTF-8, and the UTF-8 and channel checks agree with references written
 * apart from the codec. */
#include <string.h>

#include "fuzz.h"
#include "luahub/proto.h"
#include "luahub/util.h"

static int channel_ref(const char *p, size_t n)
{
    static const char ok[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                             "0123456789_:.@/=#-";
    if (n == 0 || n > HUB_CHANNEL_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!p[i] || !strchr(ok, p[i]))
            return 0;
    return 1;
}

static int inside(const char *buf, size_t len, struct hub_span s)
{
    return s.p >= buf && s.len <= len && (size_t)(s.p - buf) <= len - s.len;
}

/* A reply or frame the hub sends in a text frame. */
static void check_text_json(const struct hub_buf *b, const char *what)
{
    FUZZ_CHECK(hub_proto_json_valid(b->p, b->len), "%s is not valid JSON: %.*s", what,
               (int)b->len, b->p);
    FUZZ_CHECK(fuzz_utf8_valid(b->p, b->len), "%s is not valid UTF-8: %.*s", what,
               (int)b->len, b->p);
}

static void check_error(const char *buf, size_t len, struct hub_span id,
                        const struct hub_proto_error *err, int utf8)
{
    struct hub_buf out = {0};

    FUZZ_CHECK(err->code >= 0 && err->code < HUB_PERR__COUNT, "error code %d", err->code);
    FUZZ_CHECK(memchr(err->message, '\0', sizeof(err->message)) && err->message[0],
               "empty or unterminated error message");
    FUZZ_CHECK(!err->invalid_utf8 || !utf8, "invalid_utf8 set on valid UTF-8");
    if (id.len) {
        FUZZ_CHECK(inside(buf, len, id), "id span outside the input");
        FUZZ_CHECK(hub_proto_json_valid(id.p, id.len), "id is not one JSON value");
    }
    hub_proto_encode_error(&out, id, err->code, err->message);
    check_text_json(&out, "error reply");
    hub_buf_free(&out);
}

static void check_cmd(const char *buf, size_t len, const struct hub_cmd *cmd)
{
    struct hub_buf out = {0};

    FUZZ_CHECK(cmd->op > HUB_OP_NONE && cmd->op <= HUB_OP_PRESENCE_STATS, "op %d", cmd->op);
    if (cmd->id.len) {
        FUZZ_CHECK(inside(buf, len, cmd->id), "id span outside the input");
        FUZZ_CHECK(hub_proto_json_valid(cmd->id.p, cmd->id.len), "id is not one JSON value");
        FUZZ_CHECK(cmd->id.p[0] == '"' || cmd->id.p[0] == '-' ||
                   (cmd->id.p[0] >= '0' && cmd->id.p[0] <= '9'),
                   "id is neither a string nor an integer: %.*s", (int)cmd->id.len,
                   cmd->id.p);
    }
    int has_channel = cmd->op != HUB_OP_PING && cmd->op != HUB_OP_RPC;
    if (has_channel) {
        FUZZ_CHECK(hub_proto_channel_valid(cmd->channel, cmd->channel_len) &&
                   cmd->channel[cmd->channel_len] == '\0',
                   "decoded channel is not a valid name");
    } else {
        FUZZ_CHECK(cmd->channel_len == 0, "channel on an op without one");
    }
    if (cmd->op == HUB_OP_PUBLISH)
        FUZZ_CHECK(cmd->data.len > 0, "publish without data");
    if (cmd->data.len) {
        FUZZ_CHECK(inside(buf, len, cmd->data), "data span outside the input");
        FUZZ_CHECK(hub_proto_json_valid(cmd->data.p, cmd->data.len),
                   "data is not exactly one JSON value: %.*s", (int)cmd->data.len,
                   cmd->data.p);
        FUZZ_CHECK(fuzz_utf8_valid(cmd->data.p, cmd->data.len), "data is not UTF-8");
    }
    if (cmd->op == HUB_OP_RPC) {
        FUZZ_CHECK(cmd->method_len > 0 && cmd->method_len <= HUB_METHOD_MAX &&
                   cmd->method[cmd->method_len] == '\0', "method length %zu",
                   cmd->method_len);
        for (size_t i = 0; i < cmd->method_len; i++)
            FUZZ_CHECK((unsigned char)cmd->method[i] >= 0x20 && cmd->method[i] != 0x7f,
                       "control byte in the method");
        /* not checked: UTF-8. "\ud800" decodes to a surrogate's bytes, and
         * docs/protocol.md promises no more than 1..255 bytes without
         * control characters (the method goes to Lua, never to a frame). */
    }
    if (cmd->recover.set) {
        FUZZ_CHECK(cmd->op == HUB_OP_SUBSCRIBE && !cmd->rewind, "recover on op %d", cmd->op);
        FUZZ_CHECK(cmd->recover.offset <= (uint64_t)HUB_OFFSET_MAX, "recover offset");
    }
    if (cmd->since.set) {
        FUZZ_CHECK(cmd->op == HUB_OP_HISTORY && cmd->since.has_epoch, "since on op %d",
                   cmd->op);
        FUZZ_CHECK(strlen(cmd->since.epoch) <= HUB_EPOCH_MAX, "since epoch length");
    }
    if (cmd->rewind)
        FUZZ_CHECK(cmd->op == HUB_OP_SUBSCRIBE && cmd->rewind <= INT32_MAX, "rewind");
    if (cmd->limit)
        FUZZ_CHECK(cmd->op == HUB_OP_HISTORY && cmd->limit <= INT32_MAX, "limit");
    if (cmd->reverse)
        FUZZ_CHECK(cmd->op == HUB_OP_HISTORY, "reverse on op %d", cmd->op);

    /* the replies the session builds from it */
    hub_proto_encode_ok(&out, cmd->id, has_channel ? cmd->channel : NULL,
                        has_channel ? cmd->channel_len : 0);
    check_text_json(&out, "ok reply");
    hub_buf_reset(&out);
    if (has_channel) {
        hub_proto_encode_ok_pos(&out, cmd->id, cmd->channel, cmd->channel_len,
                                cmd->recover.offset, "e0", cmd->recover.set,
                                cmd->recover.set ? 3 : -1);
        check_text_json(&out, "ok reply with a position");
        hub_buf_reset(&out);
    }
    if (cmd->data.len) {
        hub_proto_encode_ok_data(&out, cmd->id, cmd->data);
        check_text_json(&out, "ok reply with data");
        hub_buf_reset(&out);
    }
    if (cmd->op == HUB_OP_PUBLISH) {
        size_t n = hub_proto_delivery_len(cmd->channel_len, cmd->data.len);
        char *frame = hub_xmalloc(n + 1);
        size_t w = hub_proto_write_delivery(frame, cmd->channel, cmd->channel_len,
                                            cmd->data.p, cmd->data.len);
        FUZZ_CHECK(w == n, "delivery frame: %zu bytes written, %zu announced", w, n);
        hub_buf_append(&out, frame, w);
        free(frame);
        check_text_json(&out, "delivery frame");
    }
    hub_buf_free(&out);
}

static void check_api(const char *buf, size_t len, int broadcast)
{
    struct hub_api_req req;
    struct hub_proto_error err;

    memset(&req, 0, sizeof(req));
    memset(&err, 0, sizeof(err));
    if (hub_proto_decode_api(buf, len, broadcast, &req, &err) < 0) {
        FUZZ_CHECK(req.nchannels == 0, "channels left after a failed decode");
        check_error(buf, len, (struct hub_span){NULL, 0}, &err, fuzz_utf8_valid(buf, len));
        hub_buf_free(&req.names);
        return;
    }
    FUZZ_CHECK(req.nchannels >= 1 && req.nchannels <= (broadcast ? HUB_API_MAX_CHANNELS : 1),
               "%u channels", req.nchannels);
    FUZZ_CHECK(req.data.len && inside(buf, len, req.data) &&
               hub_proto_json_valid(req.data.p, req.data.len),
               "API data is not exactly one JSON value");
    const char *name = req.names.p;
    size_t left = req.names.len;
    for (unsigned i = 0; i < req.nchannels; i++) {
        const char *end = memchr(name, '\0', left);
        FUZZ_CHECK(end, "channel %u not NUL-terminated", i);
        size_t n = (size_t)(end - name);
        FUZZ_CHECK(hub_proto_channel_valid(name, n), "API channel %u is not valid", i);
        /* duplicates are dropped: each name once */
        const char *prev = req.names.p;
        for (unsigned k = 0; k < i; k++) {
            FUZZ_CHECK(strcmp(prev, name) != 0, "channel '%s' kept twice", name);
            prev += strlen(prev) + 1;
        }
        left -= n + 1;
        name = end + 1;
    }
    FUZZ_CHECK(left == 0, "%zu bytes after the last channel name", left);
    hub_buf_free(&req.names);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    struct hub_cmd cmd;
    struct hub_proto_error err;

    int utf8 = hub_proto_utf8_valid(buf, size);
    FUZZ_CHECK(utf8 == fuzz_utf8_valid(buf, size), "utf8_valid says %d", utf8);
    FUZZ_CHECK(hub_proto_channel_valid(buf, size) == channel_ref(buf, size),
               "channel_valid disagrees");
    if (hub_proto_json_valid(buf, size))
        FUZZ_CHECK(utf8, "json_valid accepted text that is not UTF-8");

    memset(&err, 0, sizeof(err));
    if (hub_proto_decode(buf, size, &cmd, &err) == 0) {
        FUZZ_CHECK(utf8, "a command that is not UTF-8 was decoded");
        check_cmd(buf, size, &cmd);
    } else {
        check_error(buf, size, cmd.id, &err, utf8);
        FUZZ_CHECK(cmd.op == HUB_OP_NONE, "op set after a failed decode");
    }
    check_api(buf, size, 0);
    check_api(buf, size, 1);
    return 0;
}
