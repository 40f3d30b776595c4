/* Unit tests of the protocol v1 codec (src/proto.c). */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_tree.h>

#include "luahub/proto.h"
#include "luahub/util.h"

/* A string literal that may hold NUL bytes, with its length. */
#define L(s) s, sizeof(s) - 1

#define ALLOWED "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_:.@/=#-"

static void span_is(struct hub_span s, const char *want)
{
    size_t n = strlen(want);
    ck_assert_msg(s.len == n && (n == 0 || memcmp(s.p, want, n) == 0),
                  "span is '%.*s' (%zu bytes), want '%s'", (int)s.len,
                  s.p ? s.p : "", s.len, want);
}

static void decode_ok(const char *buf, size_t len, struct hub_cmd *cmd)
{
    struct hub_proto_error err = {0};
    int rc = hub_proto_decode(buf, len, cmd, &err);
    ck_assert_msg(rc == 0, "decode of '%.*s' failed: %s: %s", (int)len, buf,
                  hub_proto_code_name(err.code), err.message);
}

static void decode_bad(const char *buf, size_t len, int code, const char *msg,
                       const char *id)
{
    struct hub_cmd cmd;
    struct hub_proto_error err = {0};
    memset(&cmd, 0x5a, sizeof(cmd));
    int rc = hub_proto_decode(buf, len, &cmd, &err);
    ck_assert_msg(rc == -1, "decode of '%.*s' succeeded", (int)len, buf);
    ck_assert_str_eq(hub_proto_code_name(err.code), hub_proto_code_name(code));
    ck_assert_str_eq(err.message, msg);
    span_is(cmd.id, id ? id : "");
}

/* A string of `n` copies of `c`, NUL-terminated; free it. */
static char *rep(char c, size_t n)
{
    char *s = hub_xmalloc(n + 1);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

/* ---- good commands ---- */

START_TEST(subscribe_basic)
{
    struct hub_cmd cmd;
    decode_ok(L("{\"op\":\"subscribe\",\"channel\":\"room:1\",\"id\":1}"), &cmd);
    ck_assert_int_eq(cmd.op, HUB_OP_SUBSCRIBE);
    ck_assert_str_eq(cmd.channel, "room:1");
    ck_assert_uint_eq(cmd.channel_len, 6);
    span_is(cmd.id, "1");
    ck_assert_uint_eq(cmd.data.len, 0);
    ck_assert_uint_eq(cmd.method_len, 0);
}
END_TEST

START_TEST(op_last_and_whitespace)
{
    struct hub_cmd cmd;
    decode_ok(L(" \r\n{ \"channel\"\t:\n\"room:1\" , \"id\" : \"abc\" ,"
                " \"op\" : \"unsubscribe\" }\n "), &cmd);
    ck_assert_int_eq(cmd.op, HUB_OP_UNSUBSCRIBE);
    ck_assert_str_eq(cmd.channel, "room:1");
    span_is(cmd.id, "\"abc\"");
}
END_TEST

START_TEST(publish_raw_span)
{
    struct hub_cmd cmd;
    decode_ok(L("{\"op\":\"publish\",\"channel\":\"a\",\"data\" :  {\"a\" : [1, 2]}  ,"
                "\"id\":7}"), &cmd);
    ck_assert_int_eq(cmd.op, HUB_OP_PUBLISH);
    span_is(cmd.data, "{\"a\" : [1, 2]}");
    span_is(cmd.id, "7");
}
END_TEST

/* Each kind of value, in the middle and at the end of the object. */
static const char *const data_values[] = {
    "0", "-1.5e+3", "123456789012345678901234567890", "1e999", "true", "false",
    "null", "\"\"", "\"plain\"", "\"x\\\"y\\\\z\\u00e9\\ud83d\\ude00\\n\"",
    "\"caf\xc3\xa9 \xf0\x9f\x98\x80\"", "[]", "{}", "[ 1 , [ ] , { } ]",
    "{ \"k\" : { \"k\" : [ null , \"}\" , \"]\" ] } }", "\"\\u0000\"",
};

START_TEST(publish_data_values)
{
    const char *d = data_values[_i];
    char buf[256];
    struct hub_cmd cmd;

    snprintf(buf, sizeof(buf), "{\"op\":\"publish\",\"data\":%s ,\"channel\":\"c\"}", d);
    decode_ok(buf, strlen(buf), &cmd);
    span_is(cmd.data, d);
    snprintf(buf, sizeof(buf), "{\"op\":\"publish\",\"channel\":\"c\",\"data\":\n\t%s\n\t}", d);
    decode_ok(buf, strlen(buf), &cmd);
    span_is(cmd.data, d);
    snprintf(buf, sizeof(buf), "{\"channel\":\"c\",\"data\":%s,\"op\":\"publish\"}", d);
    decode_ok(buf, strlen(buf), &cmd);
    span_is(cmd.data, d);
}
END_TEST

START_TEST(ping_and_rpc)
{
    struct hub_cmd cmd;
    decode_ok(L("{\"op\":\"ping\"}"), &cmd);
    ck_assert_int_eq(cmd.op, HUB_OP_PING);
    ck_assert_uint_eq(cmd.id.len, 0);
    decode_ok(L("{\"id\":\"p-1\",\"op\":\"ping\"}"), &cmd);
    ck_assert_int_eq(cmd.op, HUB_OP_PING);
    span_is(cmd.id, "\"p-1\"");

    decode_ok(L("{\"op\":\"rpc\",\"method\":\"chat.history\",\"data\":{\"n\":5},\"id\":9}"),
              &cmd);
    ck_assert_int_eq(cmd.op, HUB_OP_RPC);
    ck_assert_str_eq(cmd.method, "chat.history");
    ck_assert_uint_eq(cmd.method_len, 12);
    span_is(cmd.data, "{\"n\":5}");
    span_is(cmd.id, "9");

    decode_ok(L("{\"method\":\"caf\\u00e9\",\"op\":\"rpc\"}"), &cmd);
    ck_assert_str_eq(cmd.method, "caf\xc3\xa9");
    ck_assert_uint_eq(cmd.method_len, 5);
    ck_assert_uint_eq(cmd.data.len, 0);
}
END_TEST

START_TEST(escapes_decode)
{
    struct hub_cmd cmd;
    /* Escaped keys and channel characters mean what they decode to. */
    decode_ok(L("{\"\\u006fp\":\"sub\\u0073cribe\",\"ch\\u0061nnel\":\"room\\u003a1\\/x\"}"),
              &cmd);
    ck_assert_int_eq(cmd.op, HUB_OP_SUBSCRIBE);
    ck_assert_str_eq(cmd.channel, "room:1/x");
    ck_assert_uint_eq(cmd.channel_len, 8);
}
END_TEST

START_TEST(channel_limits_ok)
{
    char buf[400];
    struct hub_cmd cmd;
    char *c255 = rep('x', 255);

    snprintf(buf, sizeof(buf), "{\"op\":\"subscribe\",\"channel\":\"%s\"}", c255);
    decode_ok(buf, strlen(buf), &cmd);
    ck_assert_uint_eq(cmd.channel_len, 255);
    ck_assert_str_eq(cmd.channel, c255);
    decode_ok(L("{\"op\":\"subscribe\",\"channel\":\"" ALLOWED "\"}"), &cmd);
    ck_assert_str_eq(cmd.channel, ALLOWED);
    free(c255);
}
END_TEST

START_TEST(id_forms)
{
    struct hub_cmd cmd;
    char buf[300];
    char *s126 = rep('i', 126);

    decode_ok(L("{\"op\":\"ping\",\"id\":-12}"), &cmd);
    span_is(cmd.id, "-12");
    decode_ok(L("{\"op\":\"ping\",\"id\":-9223372036854775808}"), &cmd);
    span_is(cmd.id, "-9223372036854775808");
    decode_ok(L("{\"op\":\"ping\",\"id\":\"a\\\"b\"}"), &cmd);
    span_is(cmd.id, "\"a\\\"b\"");
    decode_ok(L("{\"op\":\"ping\",\"id\":\"\"}"), &cmd);
    span_is(cmd.id, "\"\"");
    /* 128 bytes as written, quotes included, is the limit */
    snprintf(buf, sizeof(buf), "{\"op\":\"ping\",\"id\":\"%s\"}", s126);
    decode_ok(buf, strlen(buf), &cmd);
    ck_assert_uint_eq(cmd.id.len, 128);
    free(s126);
}
END_TEST

/* A data string that looks like envelope members stays inside "data". */
START_TEST(envelope_trick_string)
{
    static const char in[] =
        "{\"op\":\"publish\",\"channel\":\"a\",\"data\":\"\\\",\\\"channel\\\":\\\"admin\"}";
    struct hub_cmd cmd;
    decode_ok(in, sizeof(in) - 1, &cmd);
    ck_assert_str_eq(cmd.channel, "a");
    span_is(cmd.data, "\"\\\",\\\"channel\\\":\\\"admin\"");

    /* The delivery other clients get has exactly op, channel "a" and the string. */
    size_t n = hub_proto_delivery_len(cmd.channel_len, cmd.data.len);
    char *d = hub_xmalloc(n + 1);
    ck_assert_uint_eq(hub_proto_write_delivery(d, cmd.channel, cmd.channel_len,
                                               cmd.data.p, cmd.data.len), n);
    d[n] = '\0';
    char eb[128];
    yajl_val v = yajl_tree_parse(d, eb, sizeof(eb));
    ck_assert_msg(v && YAJL_IS_OBJECT(v), "delivery does not parse: %s", eb);
    ck_assert_uint_eq(v->u.object.len, 3);
    ck_assert_str_eq(v->u.object.keys[1], "channel");
    ck_assert_str_eq(YAJL_GET_STRING(v->u.object.values[1]), "a");
    ck_assert_str_eq(v->u.object.keys[2], "data");
    ck_assert_str_eq(YAJL_GET_STRING(v->u.object.values[2]), "\",\"channel\":\"admin");
    yajl_tree_free(v);
    free(d);
}
END_TEST

/* `levels` nested arrays around a 1. */
static char *nested(int levels)
{
    char *s = hub_xmalloc(2 * (size_t)levels + 2);
    memset(s, '[', (size_t)levels);
    s[levels] = '1';
    memset(s + levels + 1, ']', (size_t)levels);
    s[2 * levels + 1] = '\0';
    return s;
}

START_TEST(deep_data)
{
    struct hub_cmd cmd;
    struct hub_buf b = {0};
    char *d128 = nested(128), *d129 = nested(129);

    hub_buf_printf(&b, "{\"op\":\"publish\",\"channel\":\"a\",\"data\":%s}", d128);
    decode_ok(b.p, b.len, &cmd);
    span_is(cmd.data, d128);
    hub_buf_reset(&b);
    hub_buf_printf(&b, "{\"op\":\"publish\",\"channel\":\"a\",\"data\":%s,\"id\":1}", d129);
    decode_bad(b.p, b.len, HUB_PERR_BAD_REQUEST, "JSON nested deeper than 128 levels",
               NULL);
    hub_buf_free(&b);
    free(d128);
    free(d129);
}
END_TEST

/* Big messages push yajl's allocations out of the stack arena. */
START_TEST(big_message)
{
    struct hub_buf b = {0}, d = {0};
    struct hub_cmd cmd;

    hub_buf_appends(&d, "[");
    for (int i = 0; i < 2000; i++)
        hub_buf_printf(&d, "%s\"\\u00e9\\n%d\",{\"k%d\":[[[%d]]]}", i ? "," : "", i, i, i);
    hub_buf_appends(&d, "]");
    hub_buf_printf(&b, "{\"data\":%s,\"channel\":\"big\",\"op\":\"publish\",\"id\":\"\\u0041\"}",
                   d.p);
    decode_ok(b.p, b.len, &cmd);
    span_is(cmd.data, d.p);
    span_is(cmd.id, "\"\\u0041\"");
    hub_buf_free(&b);
    hub_buf_free(&d);
}
END_TEST

/* ---- bad commands ---- */

struct bad_case {
    const char *in;
    size_t len;     /* 0: strlen(in) */
    int code;
    const char *msg;
    const char *id; /* echoed id, NULL: none */
};

#define BAD HUB_PERR_BAD_REQUEST
#define CHAN_RULE "is not allowed (only A-Z a-z 0-9 _ : . @ / = # -)"

static const struct bad_case bad_cmds[] = {
    /* not JSON, or not one JSON object */
    {L(""), BAD, "invalid JSON: unexpected end of input at byte 0", NULL},
    {L("   "), BAD, "invalid JSON: unexpected end of input at byte 3", NULL},
    {L("{\"op\":\"ping\",\"id\":1"), BAD,
     "invalid JSON: unexpected end of input at byte 19", NULL},
    {L("{\"op\":\"ping\",\"id\":1,}"), BAD,
     "invalid JSON: object key must be a string at byte 21", NULL},
    {L("{op:\"ping\"}"), BAD, "invalid JSON: unexpected character at byte 2", NULL},
    {L("{\"op\" \"ping\"}"), BAD,
     "invalid JSON: expected ':' after object key at byte 12", NULL},
    {L("{\"op\":\"ping\" \"id\":1}"), BAD, "invalid JSON: expected ',' or '}' at byte 15", NULL},
    {L("{\"op\":'ping'}"), BAD, "invalid JSON: unexpected character at byte 7", NULL},
    {L("{\"op\":\"ping\",\"id\":1} x"), BAD,
     "invalid JSON: text after the end of the value at byte 22", NULL},
    {L("{\"op\":\"ping\"}{\"op\":\"ping\"}"), BAD,
     "invalid JSON: text after the end of the value at byte 14", NULL},
    {L("{\"op\":\"ping\"} 1"), BAD,
     "invalid JSON: text after the end of the value at byte 15", NULL},
    {L("{\"op\":\"ping\"}/*c*/"), BAD,
     "invalid JSON: text after the end of the value at byte 13", NULL},
    {L("{\"op\":\"ping\",\"id\":tru}"), BAD, "invalid JSON: invalid literal at byte 21", NULL},
    {L("{\"op\":\"ping\",\"id\":01}"), BAD, "invalid JSON: expected ',' or '}' at byte 19", NULL},
    {L("{\"op\":\"ping\",\"id\":1.}"), BAD, "invalid JSON: malformed number at byte 20", NULL},
    {L("{\"op\":\"ping\",\"id\":NaN}"), BAD, "invalid JSON: unexpected character at byte 19", NULL},
    {L("{\"op\":\"pi\\qng\"}"), BAD, "invalid JSON: invalid escape in string at byte 10", NULL},
    {L("{\"op\":\"p\\u12g4\"}"), BAD, "invalid JSON: invalid \\u escape in string at byte 12",
     NULL},
    {L("{\"op\":\"pi\nng\"}"), BAD, "invalid JSON: control character in string at byte 9",
     NULL},
    {L("{\"op\":\"ping\"}\0"), BAD, "invalid JSON: text after the end of the value at byte 14",
     NULL},
    /* JSON whitespace is space, tab, CR, LF only (yajl also takes \v and \f) */
    {L("{\"op\":\"ping\"}\v"), BAD, "invalid JSON: unexpected character at byte 13", NULL},
    {L("{\"op\":\f\"ping\"}"), BAD, "invalid JSON: unexpected character at byte 6", NULL},
    /* UTF-8: overlong, surrogate, past U+10FFFF, truncated, stray continuation */
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":\"\xc0\x80\"}"), BAD,
     "invalid JSON: invalid UTF-8 at byte 38", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":\"\xed\xa0\x80\"}"), BAD,
     "invalid JSON: invalid UTF-8 at byte 38", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":\"\xf4\x90\x80\x80\"}"), BAD,
     "invalid JSON: invalid UTF-8 at byte 38", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":\"\xf5\x80\x80\x80\"}"), BAD,
     "invalid JSON: invalid UTF-8 at byte 38", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":\"\xe2\x82\"}"), BAD,
     "invalid JSON: invalid UTF-8 at byte 38", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":\"\x80\"}"), BAD,
     "invalid JSON: invalid UTF-8 at byte 38", NULL},
    {L("{\"op\":\"subscribe\",\"channel\":\"ro\xffm\"}"), BAD,
     "invalid JSON: invalid UTF-8 at byte 31", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":\"\xe2\x82\xac"), BAD,
     "invalid JSON: unexpected end of input at byte 41", NULL},
    /* valid JSON, not an object */
    {L("[{\"op\":\"ping\"}]"), BAD, "message must be a JSON object, not an array", NULL},
    {L("\"ping\""), BAD, "message must be a JSON object, not a string", NULL},
    {L("42"), BAD, "message must be a JSON object, not a number", NULL},
    {L("true"), BAD, "message must be a JSON object, not a boolean", NULL},
    {L("null"), BAD, "message must be a JSON object, not null", NULL},
    /* op */
    {L("{}"), BAD, "missing field 'op'", NULL},
    {L("{\"channel\":\"a\",\"id\":3}"), BAD, "missing field 'op'", "3"},
    {L("{\"op\":1,\"id\":3}"), BAD, "field 'op' must be a string", "3"},
    {L("{\"op\":null}"), BAD, "field 'op' must be a string", NULL},
    {L("{\"op\":[\"ping\"]}"), BAD, "field 'op' must be a string", NULL},
    {L("{\"op\":\"foo\",\"id\":\"x\"}"), HUB_PERR_UNKNOWN_OP, "unknown op 'foo'", "\"x\""},
    {L("{\"op\":\"\"}"), HUB_PERR_UNKNOWN_OP, "unknown op ''", NULL},
    {L("{\"op\":\"PING\"}"), HUB_PERR_UNKNOWN_OP, "unknown op 'PING'", NULL},
    {L("{\"op\":\"ping\\u0000\"}"), HUB_PERR_UNKNOWN_OP, "unknown op 'ping?'", NULL},
    {L("{\"op\":\"a\\nb\\u001bc\xc3\xa9\"}"), HUB_PERR_UNKNOWN_OP, "unknown op 'a?b?c?'", NULL},
    {L("{\"op\":\"0123456789abcdefghijklmnopqrstuvwxyz\"}"), HUB_PERR_UNKNOWN_OP,
     "unknown op '0123456789abcdefghijklmnopqrstuv...'", NULL},
    {L("{\"op\":\"subscribe0123456789012345678901234567890\"}"), HUB_PERR_UNKNOWN_OP,
     "unknown op 'subscribe01234567890123456789012...'", NULL},
    /* extra fields */
    {L("{\"op\":\"subscribe\",\"channel\":\"a\",\"x\":1,\"id\":2}"), BAD,
     "unknown field 'x' for op 'subscribe'", "2"},
    {L("{\"x\\n\":1,\"op\":\"ping\"}"), BAD, "unknown field 'x?' for op 'ping'", NULL},
    {L("{\"op\":\"subscribe\",\"channel\":\"a\",\"data\":1}"), BAD,
     "unknown field 'data' for op 'subscribe'", NULL},
    {L("{\"op\":\"unsubscribe\",\"channel\":\"a\",\"method\":\"m\"}"), BAD,
     "unknown field 'method' for op 'unsubscribe'", NULL},
    {L("{\"op\":\"ping\",\"channel\":\"a\"}"), BAD, "unknown field 'channel' for op 'ping'",
     NULL},
    {L("{\"op\":\"publish\",\"channels\":[\"a\"],\"data\":1}"), BAD,
     "unknown field 'channels' for op 'publish'", NULL},
    {L("{\"op\":\"rpc\",\"method\":\"m\",\"channel\":\"a\"}"), BAD,
     "unknown field 'channel' for op 'rpc'", NULL},
    {L("{\"op\":\"ping\",\"Op\":\"ping\"}"), BAD, "unknown field 'Op' for op 'ping'", NULL},
    /* missing fields */
    {L("{\"op\":\"subscribe\",\"id\":1}"), BAD, "missing field 'channel'", "1"},
    {L("{\"op\":\"unsubscribe\"}"), BAD, "missing field 'channel'", NULL},
    {L("{\"op\":\"publish\",\"data\":1}"), BAD, "missing field 'channel'", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"id\":\"q\"}"), BAD, "missing field 'data'",
     "\"q\""},
    {L("{\"op\":\"rpc\",\"data\":{}}"), BAD, "missing field 'method'", NULL},
    /* wrong types */
    {L("{\"op\":\"subscribe\",\"channel\":1}"), BAD, "field 'channel' must be a string",
     NULL},
    {L("{\"op\":\"subscribe\",\"channel\":null}"), BAD, "field 'channel' must be a string",
     NULL},
    {L("{\"op\":\"subscribe\",\"channel\":[\"a\"],\"id\":4}"), BAD,
     "field 'channel' must be a string", "4"},
    {L("{\"op\":\"publish\",\"channel\":{\"a\":1},\"data\":1}"), BAD,
     "field 'channel' must be a string", NULL},
    {L("{\"op\":\"rpc\",\"method\":true}"), BAD, "field 'method' must be a string", NULL},
    /* id */
    {L("{\"op\":\"ping\",\"id\":{\"a\":1}}"), BAD,
     "field 'id' must be an integer or a string", NULL},
    {L("{\"op\":\"ping\",\"id\":[1]}"), BAD, "field 'id' must be an integer or a string",
     NULL},
    {L("{\"op\":\"ping\",\"id\":1.5}"), BAD, "field 'id' must be an integer or a string",
     NULL},
    {L("{\"op\":\"ping\",\"id\":1e3}"), BAD, "field 'id' must be an integer or a string",
     NULL},
    {L("{\"op\":\"ping\",\"id\":true}"), BAD, "field 'id' must be an integer or a string",
     NULL},
    {L("{\"op\":\"ping\",\"id\":null}"), BAD, "field 'id' must be an integer or a string",
     NULL},
    {L("{\"op\":\"ping\",\"id\":123456789012345678901}"), BAD,
     "field 'id' is too long (at most 20 characters)", NULL},
    {L("{\"id\":{},\"op\":\"foo\"}"), BAD, "field 'id' must be an integer or a string", NULL},
    /* duplicates, including the envelope trick as raw text */
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":1,\"channel\":\"admin\"}"), BAD,
     "duplicate field 'channel'", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":1,\"data\":2,\"id\":5}"), BAD,
     "duplicate field 'data'", "5"},
    {L("{\"op\":\"ping\",\"op\":\"publish\"}"), BAD, "duplicate field 'op'", NULL},
    {L("{\"op\":\"subscribe\",\"channel\":\"a\",\"\\u0063hannel\":\"b\"}"), BAD,
     "duplicate field 'channel'", NULL},
    {L("{\"op\":\"ping\",\"id\":1,\"id\":2}"), BAD, "duplicate field 'id'", NULL},
    /* channel names */
    {L("{\"op\":\"subscribe\",\"channel\":\"\",\"id\":1}"), HUB_PERR_INVALID_CHANNEL,
     "invalid channel name: empty", "1"},
    {L("{\"op\":\"subscribe\",\"channel\":\"room 1\"}"), HUB_PERR_INVALID_CHANNEL,
     "invalid channel name: byte 0x20 (space) at offset 4 " CHAN_RULE, NULL},
    {L("{\"op\":\"subscribe\",\"channel\":\"room\\n1\"}"), HUB_PERR_INVALID_CHANNEL,
     "invalid channel name: byte 0x0a at offset 4 " CHAN_RULE, NULL},
    {L("{\"op\":\"subscribe\",\"channel\":\"room\\u0000\"}"), HUB_PERR_INVALID_CHANNEL,
     "invalid channel name: byte 0x00 at offset 4 " CHAN_RULE, NULL},
    {L("{\"op\":\"subscribe\",\"channel\":\"room\x01\"}"), BAD,
     "invalid JSON: control character in string at byte 33", NULL},
    {L("{\"op\":\"unsubscribe\",\"channel\":\"a*b\"}"), HUB_PERR_INVALID_CHANNEL,
     "invalid channel name: byte 0x2a ('*') at offset 1 " CHAN_RULE, NULL},
    {L("{\"op\":\"publish\",\"channel\":\"caf\xc3\xa9\",\"data\":1}"), HUB_PERR_INVALID_CHANNEL,
     "invalid channel name: byte 0xc3 at offset 3 " CHAN_RULE, NULL},
    {L("{\"op\":\"publish\",\"channel\":\"\\ud800\",\"data\":1}"), HUB_PERR_INVALID_CHANNEL,
     "invalid channel name: byte 0x3f ('?') at offset 0 " CHAN_RULE, NULL},
    /* method */
    {L("{\"op\":\"rpc\",\"method\":\"\",\"id\":1}"), BAD, "field 'method' must not be empty",
     "1"},
    {L("{\"op\":\"rpc\",\"method\":\"a\\tb\"}"), BAD,
     "field 'method' must not contain control characters", NULL},
    /* data */
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":{\"a\":}}"), BAD,
     "invalid JSON: unexpected token at byte 43", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":}"), BAD,
     "invalid JSON: unexpected token at byte 38", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":1 2}"), BAD,
     "invalid JSON: expected ',' or '}' at byte 39", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":1},{\"channel\":\"admin\"}"), BAD,
     "invalid JSON: text after the end of the value at byte 40", NULL},
    {L("{\"op\":\"publish\",\"channel\":\"a\",\"data\":[1,]}"), BAD,
     "invalid JSON: unexpected token at byte 41", NULL},
};

START_TEST(bad_command)
{
    const struct bad_case *c = &bad_cmds[_i];
    decode_bad(c->in, c->len ? c->len : strlen(c->in), c->code, c->msg, c->id);
}
END_TEST

START_TEST(bad_channel_length)
{
    char buf[400];
    char *c256 = rep('x', 256);
    snprintf(buf, sizeof(buf), "{\"op\":\"subscribe\",\"id\":8,\"channel\":\"%s\"}", c256);
    decode_bad(buf, strlen(buf), HUB_PERR_INVALID_CHANNEL,
               "invalid channel name: 256 bytes long, at most 255 allowed", "8");
    free(c256);
}
END_TEST

START_TEST(bad_method_length)
{
    char buf[400];
    char *m = rep('m', 255);
    struct hub_cmd cmd;
    snprintf(buf, sizeof(buf), "{\"op\":\"rpc\",\"method\":\"%s\"}", m);
    decode_ok(buf, strlen(buf), &cmd);
    ck_assert_uint_eq(cmd.method_len, 255);
    ck_assert_str_eq(cmd.method, m);
    free(m);
    m = rep('m', 256);
    snprintf(buf, sizeof(buf), "{\"op\":\"rpc\",\"method\":\"%s\"}", m);
    decode_bad(buf, strlen(buf), BAD, "field 'method' is too long (at most 255 bytes)",
               NULL);
    free(m);
}
END_TEST

START_TEST(bad_id_length)
{
    char buf[300];
    char *s127 = rep('i', 127);
    snprintf(buf, sizeof(buf), "{\"op\":\"ping\",\"id\":\"%s\"}", s127);
    decode_bad(buf, strlen(buf), BAD, "field 'id' is too long (at most 128 bytes)", NULL);
    free(s127);
}
END_TEST

/* The offset of a bad byte is exact also past the 8-byte fast path. */
START_TEST(bad_bytes_far)
{
    struct hub_buf b = {0};
    hub_buf_appends(&b, "{\"op\":\"publish\",\"channel\":\"a\",\"data\":\"");
    for (int i = 0; i < 100; i++)
        hub_buf_appends(&b, "abcdefg ");
    size_t at = b.len + 3;
    ck_assert_uint_eq(at, 841);
    hub_buf_appends(&b, "xyz\xc3\x28\"}");
    decode_bad(b.p, b.len, BAD, "invalid JSON: invalid UTF-8 at byte 841", NULL);
    b.p[at] = '\v';
    decode_bad(b.p, b.len, BAD, "invalid JSON: unexpected character at byte 841", NULL);
    /* the same bytes where only the byte-by-byte path sees them */
    decode_bad(L("{\"op\":\"ping\",\"id\":\"\xc3\x28\"}"), BAD,
               "invalid JSON: invalid UTF-8 at byte 19", NULL);
    hub_buf_free(&b);
}
END_TEST

/* ---- HTTP API bodies ---- */

static void api_ok(const char *body, int broadcast, struct hub_api_req *req)
{
    struct hub_proto_error err = {0};
    int rc = hub_proto_decode_api(body, strlen(body), broadcast, req, &err);
    ck_assert_msg(rc == 0, "api decode of '%s' failed: %s: %s", body,
                  hub_proto_code_name(err.code), err.message);
}

static void api_bad(const char *body, int broadcast, int code, const char *msg)
{
    struct hub_api_req req = {0};
    struct hub_proto_error err = {0};
    int rc = hub_proto_decode_api(body, strlen(body), broadcast, &req, &err);
    ck_assert_msg(rc == -1, "api decode of '%s' succeeded", body);
    ck_assert_str_eq(hub_proto_code_name(err.code), hub_proto_code_name(code));
    ck_assert_str_eq(err.message, msg);
    ck_assert_uint_eq(req.nchannels, 0);
    hub_buf_free(&req.names);
}

START_TEST(api_publish_ok)
{
    struct hub_api_req req = {0};
    api_ok("{\"channel\":\"room:1\",\"data\":{\"x\": 1}}", 0, &req);
    ck_assert_uint_eq(req.nchannels, 1);
    ck_assert_uint_eq(req.names.len, 7);
    ck_assert_mem_eq(req.names.p, "room:1", 7);
    span_is(req.data, "{\"x\": 1}");
    /* reused request: names start over */
    api_ok(" { \"data\" : \"hi\" , \"channel\" : \"b\" } ", 0, &req);
    ck_assert_uint_eq(req.nchannels, 1);
    ck_assert_uint_eq(req.names.len, 2);
    ck_assert_mem_eq(req.names.p, "b", 2);
    span_is(req.data, "\"hi\"");
    hub_buf_free(&req.names);
}
END_TEST

START_TEST(api_broadcast_ok)
{
    struct hub_api_req req = {0};
    api_ok("{\"data\":[1,2],\"channels\":[\"a\",\"b\",\"a\",\"c\",\"b\",\"\\u0061\"]}", 1,
           &req);
    ck_assert_uint_eq(req.nchannels, 3);
    ck_assert_uint_eq(req.names.len, 6);
    ck_assert_mem_eq(req.names.p, "a\0b\0c\0", 6);
    span_is(req.data, "[1,2]");
    hub_buf_free(&req.names);
}
END_TEST

static void broadcast_body(struct hub_buf *b, int n, int distinct)
{
    hub_buf_appends(b, "{\"channels\":[");
    for (int i = 0; i < n; i++)
        hub_buf_printf(b, "%s\"ch:%d\"", i ? "," : "", distinct ? i : i % 7);
    hub_buf_appends(b, "],\"data\":null}");
}

START_TEST(api_broadcast_limits)
{
    struct hub_api_req req = {0};
    struct hub_buf b = {0};

    broadcast_body(&b, HUB_API_MAX_CHANNELS, 1);
    api_ok(b.p, 1, &req);
    ck_assert_uint_eq(req.nchannels, HUB_API_MAX_CHANNELS);
    /* the names are back to back, in order */
    const char *p = req.names.p;
    for (int i = 0; i < HUB_API_MAX_CHANNELS; i++) {
        char want[16];
        snprintf(want, sizeof(want), "ch:%d", i);
        ck_assert_str_eq(p, want);
        p += strlen(p) + 1;
    }
    ck_assert_uint_eq((size_t)(p - req.names.p), req.names.len);

    hub_buf_reset(&b);
    broadcast_body(&b, HUB_API_MAX_CHANNELS, 0);
    api_ok(b.p, 1, &req);
    ck_assert_uint_eq(req.nchannels, 7);

    hub_buf_reset(&b);
    broadcast_body(&b, HUB_API_MAX_CHANNELS + 1, 0);
    api_bad(b.p, 1, HUB_PERR_LIMIT_EXCEEDED, "too many channels: 1025, at most 1024");
    hub_buf_free(&b);
    hub_buf_free(&req.names);
}
END_TEST

static const struct {
    const char *body;
    int broadcast;
    int code;
    const char *msg;
} bad_api[] = {
    {"", 0, BAD, "invalid JSON: unexpected end of input at byte 0"},
    {"channel=a&data=1", 0, BAD, "invalid JSON: unexpected character at byte 1"},
    {"{\"channel\":\"a\",\"data\":1", 0, BAD,
     "invalid JSON: unexpected end of input at byte 23"},
    {"[\"a\",1]", 0, BAD, "message must be a JSON object, not an array"},
    {"\"a\"", 1, BAD, "message must be a JSON object, not a string"},
    {"{\"data\":1}", 0, BAD, "missing field 'channel'"},
    {"{\"channel\":\"a\"}", 0, BAD, "missing field 'data'"},
    {"{\"channel\":\"a\",\"data\":1,\"op\":\"publish\"}", 0, BAD, "unknown field 'op'"},
    {"{\"channel\":\"a\",\"data\":1,\"id\":1}", 0, BAD, "unknown field 'id'"},
    {"{\"channels\":[\"a\"],\"data\":1}", 0, BAD, "unknown field 'channels'"},
    {"{\"channel\":\"a\",\"channels\":[\"a\"],\"data\":1}", 1, BAD, "unknown field 'channel'"},
    {"{\"channel\":7,\"data\":1}", 0, BAD, "field 'channel' must be a string"},
    {"{\"channel\":\"a b\",\"data\":1}", 0, HUB_PERR_INVALID_CHANNEL,
     "invalid channel name: byte 0x20 (space) at offset 1 " CHAN_RULE},
    {"{\"channel\":\"\",\"data\":1}", 0, HUB_PERR_INVALID_CHANNEL,
     "invalid channel name: empty"},
    {"{\"channel\":\"a\",\"data\":1,\"channel\":\"admin\"}", 0, BAD,
     "duplicate field 'channel'"},
    {"{\"channel\":\"a\",\"data\":{\"x\":}}", 0, BAD, "invalid JSON: unexpected token at byte 28"},
    {"{\"channel\":\"a\",\"data\":\"\xc0\xaf\"}", 0, BAD, "invalid JSON: invalid UTF-8 at byte 23"},
    {"{\"channels\":[],\"data\":1}", 1, BAD, "field 'channels' must not be empty"},
    {"{\"channels\":\"a\",\"data\":1}", 1, BAD, "field 'channels' must be an array of strings"},
    {"{\"channels\":{\"a\":1},\"data\":1}", 1, BAD,
     "field 'channels' must be an array of strings"},
    {"{\"channels\":[\"a\",1],\"data\":1}", 1, BAD,
     "field 'channels' must be an array of strings"},
    {"{\"channels\":[\"a\",[\"b\"]],\"data\":1}", 1, BAD,
     "field 'channels' must be an array of strings"},
    {"{\"channels\":[\"a\",\"\"],\"data\":1}", 1, HUB_PERR_INVALID_CHANNEL,
     "invalid channel name in channels[1]: empty"},
    {"{\"channels\":[\"a\",\"b\",\"c\\u0007\"],\"data\":1}", 1, HUB_PERR_INVALID_CHANNEL,
     "invalid channel name in channels[2]: byte 0x07 at offset 1 " CHAN_RULE},
    {"{\"channels\":[\"a\"]}", 1, BAD, "missing field 'data'"},
    {"{\"data\":1}", 1, BAD, "missing field 'channels'"},
    {"{\"channels\":[\"a\"],\"data\":1,\"channels\":[\"b\"]}", 1, BAD,
     "duplicate field 'channels'"},
};

START_TEST(api_bad_body)
{
    api_bad(bad_api[_i].body, bad_api[_i].broadcast, bad_api[_i].code, bad_api[_i].msg);
}
END_TEST

START_TEST(api_bad_channel_length)
{
    struct hub_buf b = {0};
    char *c256 = rep('c', 256);
    hub_buf_printf(&b, "{\"channels\":[\"ok\",\"%s\"],\"data\":0}", c256);
    api_bad(b.p, 1, HUB_PERR_INVALID_CHANNEL,
            "invalid channel name in channels[1]: 256 bytes long, at most 255 allowed");
    hub_buf_reset(&b);
    hub_buf_printf(&b, "{\"channel\":\"%s\",\"data\":0}", c256);
    api_bad(b.p, 0, HUB_PERR_INVALID_CHANNEL,
            "invalid channel name: 256 bytes long, at most 255 allowed");
    hub_buf_free(&b);
    free(c256);
}
END_TEST

/* ---- any JSON value ---- */

static const char *const json_good[] = {
    "1", " 1 ", "-0.5e+3", "1e999", "\"s\"", "null", "true", "[]", "{}", "\n[ 1 ]\t",
    "{\"a\":[1,{\"b\":null}],\"a\":2}", "\"\\ud83d\\ude00 \xf0\x9f\x98\x80\"",
};

static const char *const json_bad[] = {
    "", " ", "1 2", "[1,]", "{\"a\":1}x", "01", "NaN", "'a'", "[", "]", "{\"a\"}",
    "\"\xc0\x80\"", "\v1", "1\f", "/* */1", "\"a\nb\"", "tru", "-",
};

START_TEST(json_valid_good)
{
    ck_assert_msg(hub_proto_json_valid(json_good[_i], strlen(json_good[_i])),
                  "'%s' should be valid", json_good[_i]);
}
END_TEST

START_TEST(json_valid_bad)
{
    ck_assert_msg(!hub_proto_json_valid(json_bad[_i], strlen(json_bad[_i])),
                  "'%s' should be invalid", json_bad[_i]);
}
END_TEST

START_TEST(json_valid_edges)
{
    char *d128 = nested(128), *d129 = nested(129);
    ck_assert_int_eq(hub_proto_json_valid(d128, strlen(d128)), 1);
    ck_assert_int_eq(hub_proto_json_valid(d129, strlen(d129)), 0);
    /* the length is honoured: no reading past it, no NUL needed */
    ck_assert_int_eq(hub_proto_json_valid("12", 1), 1);
    ck_assert_int_eq(hub_proto_json_valid("[1]]", 3), 1);
    ck_assert_int_eq(hub_proto_json_valid(L("1\0")), 0);
    ck_assert_int_eq(hub_proto_json_valid(NULL, 0), 0);
    decode_bad(NULL, 0, BAD, "invalid JSON: unexpected end of input at byte 0", NULL);
    free(d128);
    free(d129);
}
END_TEST

/* ---- channel names ---- */

START_TEST(channel_valid)
{
    char *c255 = rep('a', 255);
    ck_assert_int_eq(hub_proto_channel_valid(ALLOWED, strlen(ALLOWED)), 1);
    ck_assert_int_eq(hub_proto_channel_valid(c255, 255), 1);
    ck_assert_int_eq(hub_proto_channel_valid("a", 1), 1);
    ck_assert_int_eq(hub_proto_channel_valid("", 0), 0);
    ck_assert_int_eq(hub_proto_channel_valid(c255, 0), 0);
    free(c255);
    c255 = rep('a', 256);
    ck_assert_int_eq(hub_proto_channel_valid(c255, 256), 0);
    free(c255);
    /* every byte outside the set, alone and in the middle of a name */
    for (int c = 0; c < 256; c++) {
        char one[3] = {'a', (char)c, 'b'};
        int want = strchr(ALLOWED, c) != NULL && c != 0;
        ck_assert_msg(hub_proto_channel_valid(one, 3) == want, "byte 0x%02x", c);
        ck_assert_msg(hub_proto_channel_valid(one + 1, 1) == want, "byte 0x%02x", c);
    }
}
END_TEST

/* ---- encoders ---- */

static struct hub_span sp(const char *s)
{
    struct hub_span r = {s, s ? strlen(s) : 0};
    return r;
}

START_TEST(encode_ok)
{
    struct hub_buf b = {0};
    hub_proto_encode_ok(&b, sp("1"), "room:1", 6);
    ck_assert_str_eq(b.p, "{\"id\":1,\"ok\":true,\"channel\":\"room:1\"}");
    hub_buf_reset(&b);
    hub_proto_encode_ok(&b, sp("\"a\\\"b\""), NULL, 0);
    ck_assert_str_eq(b.p, "{\"id\":\"a\\\"b\",\"ok\":true}");
    hub_buf_reset(&b);
    hub_proto_encode_ok(&b, sp(NULL), NULL, 0);
    ck_assert_str_eq(b.p, "{\"ok\":true}");
    hub_buf_reset(&b);
    hub_proto_encode_ok(&b, sp(NULL), "a", 1);
    ck_assert_str_eq(b.p, "{\"ok\":true,\"channel\":\"a\"}");
    /* appends: two replies back to back */
    hub_proto_encode_ok(&b, sp("2"), NULL, 0);
    ck_assert_str_eq(b.p, "{\"ok\":true,\"channel\":\"a\"}{\"id\":2,\"ok\":true}");
    ck_assert_uint_eq(b.len, strlen(b.p));
    hub_buf_free(&b);
}
END_TEST

START_TEST(encode_ok_data)
{
    struct hub_buf b = {0};
    hub_proto_encode_ok_data(&b, sp("7"), sp("{\"n\" : [1, 2]}"));
    ck_assert_str_eq(b.p, "{\"id\":7,\"ok\":true,\"data\":{\"n\" : [1, 2]}}");
    hub_buf_reset(&b);
    hub_proto_encode_ok_data(&b, sp(NULL), sp("\"x\""));
    ck_assert_str_eq(b.p, "{\"ok\":true,\"data\":\"x\"}");
    hub_buf_reset(&b);
    hub_proto_encode_ok_data(&b, sp(NULL), sp(NULL));
    ck_assert_str_eq(b.p, "{\"ok\":true,\"data\":null}");
    hub_buf_free(&b);
}
END_TEST

START_TEST(encode_error)
{
    struct hub_buf b = {0};
    hub_proto_encode_error(&b, sp("3"), HUB_PERR_INVALID_CHANNEL,
                           "invalid channel name: empty");
    ck_assert_str_eq(b.p, "{\"id\":3,\"ok\":false,\"error\":{\"code\":\"invalid_channel\","
                          "\"message\":\"invalid channel name: empty\"}}");
    hub_buf_reset(&b);
    hub_proto_encode_error(&b, sp(NULL), HUB_PERR_BAD_REQUEST, "say \"hi\"\\\n\x01");
    ck_assert_str_eq(b.p, "{\"ok\":false,\"error\":{\"code\":\"bad_request\","
                          "\"message\":\"say \\\"hi\\\"\\\\\\n\\u0001\"}}");
    ck_assert(hub_proto_json_valid(b.p, b.len));
    hub_buf_reset(&b);
    hub_proto_encode_error(&b, sp("\"q\""), 999, "x");
    ck_assert_str_eq(b.p, "{\"id\":\"q\",\"ok\":false,\"error\":{\"code\":\"internal\","
                          "\"message\":\"x\"}}");
    hub_buf_free(&b);
}
END_TEST

/* An error built from a decode failure echoes the id and is valid JSON. */
START_TEST(encode_error_roundtrip)
{
    struct hub_cmd cmd;
    struct hub_proto_error err;
    struct hub_buf b = {0};
    static const char in[] = "{\"id\":\"r\\u00e9\",\"op\":\"x\\\"\\u0001y\"}";
    ck_assert_int_eq(hub_proto_decode(in, sizeof(in) - 1, &cmd, &err), -1);
    hub_proto_encode_error(&b, cmd.id, err.code, err.message);
    ck_assert_str_eq(b.p, "{\"id\":\"r\\u00e9\",\"ok\":false,\"error\":{\"code\":"
                          "\"unknown_op\",\"message\":\"unknown op 'x\\\"?y'\"}}");
    ck_assert(hub_proto_json_valid(b.p, b.len));
    hub_buf_free(&b);
}
END_TEST

START_TEST(encode_welcome)
{
    struct hub_buf b = {0};
    hub_proto_encode_welcome(&b, "c42", "0.1.0", 25);
    ck_assert_str_eq(b.p, "{\"op\":\"welcome\",\"client\":\"c42\",\"version\":\"0.1.0\","
                          "\"ping\":25}");
    hub_buf_reset(&b);
    hub_proto_encode_welcome(&b, "a\"b", "", 0);
    ck_assert_str_eq(b.p, "{\"op\":\"welcome\",\"client\":\"a\\\"b\",\"version\":\"\","
                          "\"ping\":0}");
    hub_buf_free(&b);
}
END_TEST

START_TEST(delivery)
{
    static const char want[] = "{\"op\":\"message\",\"channel\":\"room:1\",\"data\":{\"a\" : 1}}";
    char buf[sizeof(want) + 8];
    memset(buf, '#', sizeof(buf));
    size_t n = hub_proto_delivery_len(6, 9);
    ck_assert_uint_eq(n, sizeof(want) - 1);
    ck_assert_uint_eq(hub_proto_write_delivery(buf, "room:1", 6, "{\"a\" : 1}", 9), n);
    ck_assert_mem_eq(buf, want, n);
    ck_assert_int_eq(buf[n], '#');  /* nothing written past the length */

    /* length == bytes written for many sizes */
    char *ch = rep('c', 255), *data = rep('7', 70000);
    for (size_t cl = 1; cl <= 255; cl += 127) {
        for (size_t dl = 1; dl <= 70000; dl = dl * 3 + 1) {
            size_t len = hub_proto_delivery_len(cl, dl);
            char *d = hub_xmalloc(len + 1);
            d[len] = '#';
            ck_assert_uint_eq(hub_proto_write_delivery(d, ch, cl, data, dl), len);
            ck_assert_int_eq(d[len], '#');
            ck_assert_int_eq(d[len - 1], '}');
            ck_assert(hub_proto_json_valid(d, len));
            free(d);
        }
    }
    free(ch);
    free(data);
}
END_TEST

/* hub_proto_array_cut: whole elements only, within the budget. */
START_TEST(array_cut)
{
    static const struct {
        const char *text;
        size_t max, want_len, want_n;
    } cases[] = {
        {"[{\"a\":1},{\"b\":\"}],{\"},{\"c\":[1,2]}]", 100, 33, 3},
        {"[{\"a\":1},{\"b\":\"}],{\"},{\"c\":[1,2]}]", 22, 21, 2},
        {"[{\"a\":1},{\"b\":\"}],{\"},{\"c\":[1,2]}]", 21, 8, 1},
        {"[{\"a\":1},{\"b\":2}]", 3, 1, 0},
        {"[]", 10, 1, 0},
        {"[1, \"x\\\"y\", true, null]", 100, 22, 4},
        {"[1, \"x\\\"y\", true, null]", 12, 10, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t n;
        size_t len = hub_proto_array_cut(cases[i].text, strlen(cases[i].text), cases[i].max, &n);
        ck_assert_msg(len == cases[i].want_len && n == cases[i].want_n,
                      "case %zu: %zu bytes, %zu elements; expected %zu, %zu", i, len, n,
                      cases[i].want_len, cases[i].want_n);
        ck_assert_msg(len + 1 <= cases[i].max || len == 1, "case %zu: over budget", i);
    }
}
END_TEST

START_TEST(code_names)
{
    static const char *const want[] = {
        "bad_request", "unknown_op", "invalid_channel", "not_subscribed", "forbidden",
        "too_large", "limit_exceeded", "internal", "rpc_error", "unavailable",
        "not_available", "rate_limited",
    };
    ck_assert_int_eq(HUB_PERR__COUNT, 12);
    for (int i = 0; i < HUB_PERR__COUNT; i++)
        ck_assert_str_eq(hub_proto_code_name(i), want[i]);
    ck_assert_str_eq(hub_proto_code_name(-1), "internal");
    ck_assert_str_eq(hub_proto_code_name(HUB_PERR__COUNT), "internal");
}
END_TEST

#define N(a) (int)(sizeof(a) / sizeof((a)[0]))

static Suite *proto_suite(void)
{
    Suite *s = suite_create("proto");
    TCase *t;

    t = tcase_create("decode");
    tcase_add_test(t, subscribe_basic);
    tcase_add_test(t, op_last_and_whitespace);
    tcase_add_test(t, publish_raw_span);
    tcase_add_loop_test(t, publish_data_values, 0, N(data_values));
    tcase_add_test(t, ping_and_rpc);
    tcase_add_test(t, escapes_decode);
    tcase_add_test(t, channel_limits_ok);
    tcase_add_test(t, id_forms);
    tcase_add_test(t, envelope_trick_string);
    tcase_add_test(t, deep_data);
    tcase_add_test(t, big_message);
    suite_add_tcase(s, t);

    t = tcase_create("bad_input");
    tcase_add_loop_test(t, bad_command, 0, N(bad_cmds));
    tcase_add_test(t, bad_channel_length);
    tcase_add_test(t, bad_method_length);
    tcase_add_test(t, bad_id_length);
    tcase_add_test(t, bad_bytes_far);
    suite_add_tcase(s, t);

    t = tcase_create("api");
    tcase_add_test(t, api_publish_ok);
    tcase_add_test(t, api_broadcast_ok);
    tcase_add_test(t, api_broadcast_limits);
    tcase_add_loop_test(t, api_bad_body, 0, N(bad_api));
    tcase_add_test(t, api_bad_channel_length);
    suite_add_tcase(s, t);

    t = tcase_create("json_valid");
    tcase_add_loop_test(t, json_valid_good, 0, N(json_good));
    tcase_add_loop_test(t, json_valid_bad, 0, N(json_bad));
    tcase_add_test(t, json_valid_edges);
    tcase_add_test(t, channel_valid);
    suite_add_tcase(s, t);

    t = tcase_create("encode");
    tcase_add_test(t, encode_ok);
    tcase_add_test(t, encode_ok_data);
    tcase_add_test(t, encode_error);
    tcase_add_test(t, encode_error_roundtrip);
    tcase_add_test(t, encode_welcome);
    tcase_add_test(t, delivery);
    tcase_add_test(t, code_names);
    tcase_add_test(t, array_cut);
    suite_add_tcase(s, t);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(proto_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
