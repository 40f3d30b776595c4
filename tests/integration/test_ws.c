/* Integration suite: protocol v1 over real WebSocket connections to the real
 * binary (docs/protocol.md). Every test starts its own hub on an ephemeral
 * port and stops it with SIGTERM, asserting exit status 0: the ASan build
 * exits non-zero on a leak, so every test is also a leak check.
 *
 * Synchronisation is by protocol round trips, never by sleeping: a
 * publisher's ok reply means the deliveries are queued, and ws_sync on a
 * subscriber proves nothing else was queued for it (see hubtest.h). Time
 * itself is the subject of only two tests (keepalive, the protocol-error
 * window), which wait on the clock with wide margins. */
#include <check.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hubtest.h"

/* Short ping settings would drop clients the tests leave unread for a while,
 * so only the keepalive test uses them. ping_interval 30 is not the default
 * (25): the welcome test sees that the conf is applied. */
#define COMMON_CONF                 \
    "max_message_size = 1024\n"     \
    "max_channels_per_conn = 4\n"   \
    "max_protocol_errors = 3\n"     \
    "shutdown_timeout = 2\n"
#define BASE_CONF COMMON_CONF "ping_interval = 30\nping_timeout = 10\n"

#define MAX_MSG 1024

static struct hub *start(void)
{
    return hub_start(BASE_CONF);
}

static void stop(struct hub *h)
{
    ck_assert_int_eq(hub_stop(h), 0);
}

/* `a` and `b` are both subscribed to "room": each publishes once and both
 * get each delivery exactly once. Proves both connections still work. */
static void still_works(struct ws *a, struct ws *b)
{
    ws_send_text(a, "{\"op\":\"publish\",\"channel\":\"room\",\"data\":{\"from\":\"a\"},\"id\":901}");
    ws_expect_pair(a, "{\"id\":901,\"ok\":true}",
                   "{\"op\":\"message\",\"channel\":\"room\",\"data\":{\"from\":\"a\"}}");
    ws_expect(b, "{\"op\":\"message\",\"channel\":\"room\",\"data\":{\"from\":\"a\"}}");
    ws_send_text(b, "{\"op\":\"publish\",\"channel\":\"room\",\"data\":{\"from\":\"b\"},\"id\":902}");
    ws_expect_pair(b, "{\"id\":902,\"ok\":true}",
                   "{\"op\":\"message\",\"channel\":\"room\",\"data\":{\"from\":\"b\"}}");
    ws_expect(a, "{\"op\":\"message\",\"channel\":\"room\",\"data\":{\"from\":\"b\"}}");
    ws_sync(a);
    ws_sync(b);
}

/* Sends one bad message (frame `opcode`, bytes msg[0..len)) from a client
 * and requires the error reply with `id_json` (NULL: no id) and `code`; then
 * that client and another one still work, and nothing was delivered. */
static void bad_input_op(int opcode, const char *msg, size_t len,
                         const char *id_json, const char *code)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(a, "room");
    ws_subscribe(b, "room");
    ws_send_frame(a, 1, opcode, msg, len);
    free(ws_expect_error(a, id_json, code));
    char series[96];
    snprintf(series, sizeof series, "luahub_protocol_errors_total{code=\"%s\"}", code);
    ck_assert_int_eq(hub_metric(h, series), 1);
    ws_sync(b);
    still_works(a, b);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 2);
    ws_free(a);
    ws_free(b);
    stop(h);
}

static void bad_input(const char *msg, const char *id_json, const char *code)
{
    bad_input_op(WS_TEXT, msg, strlen(msg), id_json, code);
}

/* ------------------------------------------------------------------ */
/* The support library itself                                          */
/* ------------------------------------------------------------------ */

START_TEST(support_accept_key)
{
    /* RFC 6455 section 1.3's example and another known pair; key + GUID is
     * 60 bytes, so SHA-1's padding takes a second block */
    char out[29];
    ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", out);
    ck_assert_str_eq(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    ws_accept_key("x3JJHMbDL1EzLkh9GBhXDw==", out);
    ck_assert_str_eq(out, "HSmrc0sMlYUkAGmm5OPpG2HaGWk=");
}
END_TEST

/* ------------------------------------------------------------------ */
/* Welcome and replies                                                 */
/* ------------------------------------------------------------------ */

START_TEST(welcome_frame)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    yajl_val v = json_parse(a->welcome);
    const char *client = json_get_str(v, "client");
    ck_assert_msg(client && *client, "welcome without a client id: %s", a->welcome);
    char want[512];
    snprintf(want, sizeof want,
             "{\"op\":\"welcome\",\"client\":\"%s\",\"version\":\"%s\",\"ping\":30}",
             client, HUB_VERSION);
    ck_assert_str_eq(a->welcome, want);

    yajl_val w = json_parse(b->welcome);
    const char *client_b = json_get_str(w, "client");
    ck_assert_msg(client_b && strcmp(client, client_b) != 0,
                  "two connections share a client id: %s / %s", a->welcome, b->welcome);
    yajl_tree_free(v);
    yajl_tree_free(w);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

START_TEST(replies_integer_ids)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port);
    ws_send_text(a, "{\"op\":\"subscribe\",\"channel\":\"room:1\",\"id\":1}");
    ws_expect(a, "{\"id\":1,\"ok\":true,\"channel\":\"room:1\"}");
    ws_send_text(a, "{\"op\":\"unsubscribe\",\"channel\":\"room:1\",\"id\":2}");
    ws_expect(a, "{\"id\":2,\"ok\":true}");
    ws_send_text(a, "{\"op\":\"publish\",\"channel\":\"room:1\",\"data\":1,\"id\":3}");
    ws_expect(a, "{\"id\":3,\"ok\":true}");
    ws_send_text(a, "{\"op\":\"ping\",\"id\":4}");
    ws_expect(a, "{\"id\":4,\"ok\":true}");
    /* fields in any order; zero, negative and beyond-32-bit ids */
    ws_send_text(a, "{\"id\":0,\"op\":\"ping\"}");
    ws_expect(a, "{\"id\":0,\"ok\":true}");
    ws_send_text(a, "{\"id\":-7,\"channel\":\"x\",\"op\":\"subscribe\"}");
    ws_expect(a, "{\"id\":-7,\"ok\":true,\"channel\":\"x\"}");
    ws_send_text(a, "{\"op\":\"ping\",\"id\":9007199254740993}");
    ws_expect(a, "{\"id\":9007199254740993,\"ok\":true}");
    ws_free(a);
    stop(h);
}
END_TEST

START_TEST(replies_string_ids)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port);
    ws_send_text(a, "{\"op\":\"subscribe\",\"channel\":\"room:1\",\"id\":\"s1\"}");
    ws_expect(a, "{\"id\":\"s1\",\"ok\":true,\"channel\":\"room:1\"}");
    ws_send_text(a, "{\"op\":\"unsubscribe\",\"channel\":\"room:1\",\"id\":\"s2\"}");
    ws_expect(a, "{\"id\":\"s2\",\"ok\":true}");
    ws_send_text(a, "{\"op\":\"publish\",\"channel\":\"room:1\",\"data\":\"x\",\"id\":\"s3\"}");
    ws_expect(a, "{\"id\":\"s3\",\"ok\":true}");
    ws_send_text(a, "{\"op\":\"ping\",\"id\":\"\"}");
    ws_expect(a, "{\"id\":\"\",\"ok\":true}");
    ws_send_text(a, "{\"op\":\"ping\",\"id\":\"q\\\"uote\"}");
    ws_expect(a, "{\"id\":\"q\\\"uote\",\"ok\":true}");
    ws_free(a);
    stop(h);
}
END_TEST

START_TEST(replies_without_id)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port);
    ws_send_text(a, "{\"op\":\"subscribe\",\"channel\":\"room:1\"}");
    ws_expect(a, "{\"ok\":true,\"channel\":\"room:1\"}");
    ws_send_text(a, "{\"op\":\"unsubscribe\",\"channel\":\"room:1\"}");
    ws_expect(a, "{\"ok\":true}");
    ws_send_text(a, "{\"op\":\"publish\",\"channel\":\"room:1\",\"data\":null}");
    ws_expect(a, "{\"ok\":true}");
    ws_send_text(a, "{\"op\":\"ping\"}");
    ws_expect(a, "{\"ok\":true}");
    ws_free(a);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Delivery                                                             */
/* ------------------------------------------------------------------ */

START_TEST(publisher_gets_own_message_only_when_subscribed)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(a, "room:1");
    /* a subscribed publishes: a gets reply + delivery, b nothing */
    ws_send_text(a, "{\"op\":\"publish\",\"channel\":\"room:1\",\"data\":{\"n\":1},\"id\":1}");
    ws_expect_pair(a, "{\"id\":1,\"ok\":true}",
                   "{\"op\":\"message\",\"channel\":\"room:1\",\"data\":{\"n\":1}}");
    ws_sync(a);
    ws_sync(b);
    /* b not subscribed publishes: b gets only the reply, a the delivery */
    ws_send_text(b, "{\"op\":\"publish\",\"channel\":\"room:1\",\"data\":{\"n\":2},\"id\":2}");
    ws_expect(b, "{\"id\":2,\"ok\":true}");
    ws_expect(a, "{\"op\":\"message\",\"channel\":\"room:1\",\"data\":{\"n\":2}}");
    ws_sync(b);
    /* after unsubscribing a gets nothing, even from itself */
    ws_unsubscribe(a, "room:1");
    ws_publish(a, "room:1", "{\"n\":3}");
    ws_publish(b, "room:1", "{\"n\":4}");
    ws_sync(a);
    ws_sync(b);
    /* a channel nobody is subscribed to accepts publishes */
    ws_publish(b, "empty", "1");
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* Each value is published by b and must reach a byte for byte. */
static const char *const exact_data[] = {
    "{\"a\" :[ 1 ,2.5e+3,-0,  {\"b\" :null}] ,\t\"c\":\"\\u00e9\\ud83d\\ude00 \xc3\xa9\xf0\x9f\x98\x80\"}",
    "\"esc \\\" \\\\ \\/ \\b\\f\\n\\r\\t \\u0000 \\u001F\"",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[{\"deep\":[]}]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "{ }", "[ ]", "\"\"", "0", "-12.5E-3", "1E+2", "true", "false", "null",
    "{\"k\":{\"k\":{\"k\":[true,false,null,\"\",{}]}},\"k2\" : \"v\"}",
    "\"x\\\",\\\"channel\\\":\\\"admin\"",    /* a string that looks like an envelope field */
    "\"}}]]\"",
};

START_TEST(delivery_is_byte_exact)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port), *adm = ws_connect(h->port);
    ws_subscribe(a, "room:1");
    ws_subscribe(adm, "admin");
    for (size_t i = 0; i < sizeof exact_data / sizeof *exact_data; i++) {
        ws_publish(b, "room:1", exact_data[i]);
        char *want = ws_delivery("room:1", exact_data[i]);
        ws_expect(a, want);
        free(want);
    }
    ws_sync(a);
    ws_sync(adm);
    ws_free(a);
    ws_free(b);
    ws_free(adm);
    stop(h);
}
END_TEST

/* RFC 8259 puts no limit on a number's digits: a valid JSON value. */
START_TEST(delivery_big_number)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(a, "n");
    const char *nums[] = { "123456789012345678901234567890", "-9223372036854775809",
                           "1e400", "[18446744073709551616]" };
    for (size_t i = 0; i < sizeof nums / sizeof *nums; i++) {
        ws_publish(b, "n", nums[i]);
        char *want = ws_delivery("n", nums[i]);
        ws_expect(a, want);
        free(want);
    }
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

START_TEST(channel_charset_and_255_bytes)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    char name[256];
    const char *set = "ABCXYZabcxyz0189_:.@/=#-";
    for (int i = 0; i < 255; i++)
        name[i] = set[i % 24];
    name[255] = '\0';
    ws_subscribe(a, name);
    ws_subscribe(a, set);
    ws_publish(b, name, "1");
    char *want = ws_delivery(name, "1");
    ws_expect(a, want);
    free(want);
    ws_publish(b, set, "2");
    want = ws_delivery(set, "2");
    ws_expect(a, want);
    free(want);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Bad input: each gets a clear error and changes nothing else          */
/* ------------------------------------------------------------------ */

/* Bad commands: each gets a clear error and changes nothing else. */
static const struct {
    const char *msg;
    const char *id_json;    /* the reply's id as raw JSON, or NULL for none */
    const char *code;
} bad_inputs[] = {
    {"{\"op\":\"ping\",\"id\":1", NULL, "bad_request"}, /* invalid_json */
    {"", NULL, "bad_request"}, /* empty_message */
    {"{\"op\":\"ping\",\"id\":1} x", NULL, "bad_request"}, /* trailing_garbage */
    {"{\"op\":\"ping\",\"id\":1}{\"op\":\"ping\",\"id\":2}", NULL, "bad_request"}, /* two_objects */
    {"[{\"op\":\"ping\",\"id\":1}]", NULL, "bad_request"}, /* array_instead_of_object */
    {"\"ping\"", NULL, "bad_request"}, /* string_instead_of_object */
    {"42", NULL, "bad_request"}, /* number_instead_of_object */
    {"{\"op\":\"dance\",\"id\":5}", "5", "unknown_op"}, /* unknown_op */
    {"{\"channel\":\"room\",\"id\":6}", "6", "bad_request"}, /* missing_op */
    {"{\"op\":1,\"id\":7}", "7", "bad_request"}, /* op_wrong_type */
    {"{\"op\":\"subscribe\",\"id\":8}", "8", "bad_request"}, /* missing_channel */
    {"{\"op\":\"ping\",\"id\":9,\"x\":1}", "9", "bad_request"}, /* extra_field */
    {"{\"op\":\"subscribe\",\"channel\":\"room\",\"data\":1,\"id\":10}", "10", "bad_request"}, /* extra_field_data_on_subscribe */
    {"{\"op\":\"subscribe\",\"channel\":[\"room\"],\"id\":11}", "11", "bad_request"}, /* channel_wrong_type */
    {"{\"op\":\"ping\",\"op\":\"ping\",\"id\":12}", "12", "bad_request"}, /* duplicate_field */
    {"{\"op\":\"ping\",\"id\":{\"a\":1}}", NULL, "bad_request"}, /* id_object */
    {"{\"op\":\"ping\",\"id\":[1]}", NULL, "bad_request"}, /* id_array */
    {"{\"op\":\"ping\",\"id\":1.5}", NULL, "bad_request"}, /* id_float */
    {"{\"op\":\"ping\",\"id\":true}", NULL, "bad_request"}, /* id_bool */
    {"{\"op\":\"subscribe\",\"channel\":\"\",\"id\":13}", "13", "invalid_channel"}, /* channel_empty */
    {"{\"op\":\"subscribe\",\"channel\":\"room 1\",\"id\":15}", "15", "invalid_channel"}, /* channel_space */
    {"{\"op\":\"subscribe\",\"channel\":\"room\\u0001\",\"id\":16}", "16", "invalid_channel"}, /* channel_control_byte_escaped */
    {"{\"op\":\"subscribe\",\"channel\":\"room\\u0000x\",\"id\":17}", "17", "invalid_channel"}, /* channel_nul_escaped */
    {"{\"op\":\"subscribe\",\"channel\":\"caf\xc3\xa9\",\"id\":18}", "18", "invalid_channel"}, /* channel_non_ascii */
    {"{\"op\":\"subscribe\",\"channel\":\"room\x01\",\"id\":19}", NULL, "bad_request"}, /* channel_raw_control_byte */
    {"{\"op\":\"publish\",\"channel\":\"room\",\"id\":21}", "21", "bad_request"}, /* data_missing */
    {"{\"op\":\"publish\",\"channel\":\"room\",\"data\":{\"x\":},\"id\":22}", NULL, "bad_request"}, /* data_malformed */
    {"{\"op\":\"publish\",\"channel\":\"room\",\"data\":1 2,\"id\":23}", NULL, "bad_request"}, /* data_two_values */
    {"{\"op\":\"publish\",\"channel\":\"room\",\"data\":{\"x\":1", NULL, "bad_request"}, /* data_unterminated */
    {"{\"op\":\"ping\",\"data\":1,\"id\":24}", "24", "bad_request"}, /* data_on_ping */
    /* \v is not JSON whitespace but is UTF-8: an error reply, not 1007 */
    {"{\"op\":\"ping\",\x0b\"id\":1}", NULL, "bad_request"},
};
#define NBAD_INPUTS ((int)(sizeof bad_inputs / sizeof *bad_inputs))

START_TEST(bad_command)
{
    bad_input(bad_inputs[_i].msg, bad_inputs[_i].id_json, bad_inputs[_i].code);
}
END_TEST

START_TEST(bad_channel_256_bytes)
{
    char msg[400], name[257];
    memset(name, 'c', 256);
    name[256] = '\0';
    snprintf(msg, sizeof msg, "{\"op\":\"subscribe\",\"channel\":\"%s\",\"id\":14}", name);
    bad_input(msg, "14", "invalid_channel");
}
END_TEST

START_TEST(bad_binary_frame)
{
    const char *msg = "{\"op\":\"ping\",\"id\":25}";
    bad_input_op(WS_BINARY, msg, strlen(msg), NULL, "bad_request");
}
END_TEST

/* `"data":1,"channel":"admin"` must not redirect or reshape the delivery;
 * the subscribers of both channels get nothing, and an honest publish after
 * it is delivered normally. */
START_TEST(bad_data_crafted_envelope)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *room = ws_connect(h->port), *adm = ws_connect(h->port);
    ws_subscribe(room, "room");
    ws_subscribe(adm, "admin");
    ws_send_text(a, "{\"op\":\"publish\",\"channel\":\"room\",\"data\":1,\"channel\":\"admin\",\"id\":26}");
    free(ws_expect_error(a, "26", "bad_request"));
    ws_send_text(a, "{\"op\":\"publish\",\"channel\":\"room\",\"data\":1,\"data\":{\"op\":\"x\"},\"id\":27}");
    free(ws_expect_error(a, "27", "bad_request"));
    /* unbalanced data that would close the envelope early */
    ws_send_text(a, "{\"op\":\"publish\",\"channel\":\"room\",\"data\":1},\"channel\":\"admin\",\"id\":28}");
    free(ws_expect_error(a, NULL, "bad_request"));
    ws_sync(room);
    ws_sync(adm);
    ws_publish(a, "admin", "\"honest\"");
    ws_expect(adm, "{\"op\":\"message\",\"channel\":\"admin\",\"data\":\"honest\"}");
    ws_sync(room);
    ws_sync(adm);
    ws_free(a);
    ws_free(room);
    ws_free(adm);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Sizes and framing                                                    */
/* ------------------------------------------------------------------ */

/* A publish message of exactly `total` bytes on channel "big" with id 7;
 * returns it (new) and its data value in *data (new). */
static char *sized_publish(size_t total, char **data)
{
    const char *pre = "{\"op\":\"publish\",\"channel\":\"big\",\"data\":\"";
    const char *post = "\",\"id\":7}";
    size_t pad = total - strlen(pre) - strlen(post);
    char *m = malloc(total + 1);
    ck_assert_ptr_nonnull(m);
    size_t o = 0;
    memcpy(m + o, pre, strlen(pre));
    o += strlen(pre);
    for (size_t i = 0; i < pad; i++)
        m[o++] = (char)('a' + i % 26);
    memcpy(m + o, post, strlen(post));
    o += strlen(post);
    m[o] = '\0';
    ck_assert_uint_eq(o, total);
    *data = malloc(pad + 3);
    ck_assert_ptr_nonnull(*data);
    (*data)[0] = '"';
    memcpy(*data + 1, m + strlen(pre), pad);
    (*data)[pad + 1] = '"';
    (*data)[pad + 2] = '\0';
    return m;
}

/* rx_buffer_size = 128, the smallest: lws reads at most that much at a
 * time, so a message bigger than it arrives in pieces and must still be
 * delivered whole and exact, and the largest control frame (125 bytes of
 * payload) must still be answered with one PONG. */
START_TEST(small_rx_buffer)
{
    struct hub *h = hub_start(BASE_CONF "rx_buffer_size = 128\n");
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "big");
    char *data;
    char *m = sized_publish(MAX_MSG, &data);
    ws_send_text(a, m);
    ws_expect(a, "{\"id\":7,\"ok\":true}");
    char *want = ws_delivery("big", data);
    ws_expect(b, want);

    char ping[125];
    memset(ping, 'p', sizeof ping);
    ws_send_frame(a, 1, WS_PING, ping, sizeof ping);
    struct ws_frame f;
    ck_assert_int_eq(ws_recv_frame(a, &f, HT_WAIT_MS), 1);
    ck_assert_int_eq(f.opcode, WS_PONG);
    ck_assert_uint_eq(f.len, sizeof ping);
    ck_assert(memcmp(f.data, ping, sizeof ping) == 0);
    ws_frame_free(&f);
    ws_sync(a); /* and no second PONG */
    free(want);
    free(m);
    free(data);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

START_TEST(message_exactly_max_size_accepted)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "big");
    char *data;
    char *m = sized_publish(MAX_MSG, &data);
    ws_send_text(a, m);
    ws_expect(a, "{\"id\":7,\"ok\":true}");
    char *want = ws_delivery("big", data);
    ws_expect(b, want);
    /* the same size in fragments */
    size_t sizes[] = { 100 };
    ws_send_fragments(a, WS_TEXT, m, MAX_MSG, sizes, 1);
    ws_expect(a, "{\"id\":7,\"ok\":true}");
    ws_expect(b, want);
    free(want);
    free(m);
    free(data);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

START_TEST(frame_over_max_size_closes_1009)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(a, "room");
    ws_subscribe(b, "room");
    ws_subscribe(b, "big");
    char *data;
    char *m = sized_publish(MAX_MSG + 1, &data);
    ws_send_text(a, m);
    ws_expect_close(a, 1009);
    ws_sync(b);     /* nothing was delivered */
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    struct ws *c = ws_connect(h->port);
    ws_subscribe(c, "room");
    still_works(b, c);
    free(m);
    free(data);
    ws_free(a);
    ws_free(b);
    ws_free(c);
    stop(h);
}
END_TEST

/* A frame header announcing 2^40 bytes: the hub must not wait for (or
 * allocate) the announced size; once more than max_message_size bytes have
 * come it closes with 1009. */
START_TEST(frame_claiming_huge_length_closes_1009)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");
    unsigned char frame[14 + MAX_MSG + 1] = { 0x81, 0x80 | 127, 0, 0, 1, 0, 0, 0, 0, 0,
                                              1, 2, 3, 4 };
    memset(frame + 14, ' ', MAX_MSG + 1);
    ck_assert_int_eq(ws_send_raw(a, frame, sizeof frame), 0);
    /* not ws_expect_close: a close reply from us would only be more bytes
     * of the announced frame, so the hub cannot see it */
    struct ws_frame f;
    int r = ws_recv_msg(a, &f, HT_WAIT_MS);
    ck_assert_msg(r == 1 && f.opcode == WS_CLOSE && f.close_code == 1009,
                  "expected close 1009 (r=%d, opcode %d, code %d)", r,
                  r == 1 ? f.opcode : -1, r == 1 ? f.close_code : -1);
    ws_frame_free(&f);
    struct ws *c = ws_connect(h->port);
    ws_subscribe(c, "room");
    still_works(b, c);
    ws_free(a);
    ws_free(b);
    ws_free(c);
    stop(h);
}
END_TEST

START_TEST(fragmented_message_over_max_size_closes_1009)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "big");
    char *data;
    char *m = sized_publish(MAX_MSG + 1, &data);
    size_t sizes[] = { 64 };    /* every frame is small, the message is not */
    ws_send_fragments(a, WS_TEXT, m, MAX_MSG + 1, sizes, 1);
    ws_expect_close(a, 1009);
    ws_sync(b);
    ws_publish(b, "x", "1");
    free(m);
    free(data);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

START_TEST(fragmented_message_reassembled)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "frag");
    char data[700];
    int n = snprintf(data, sizeof data, "{\"text\":\"");
    for (int i = 0; i < 500; i++)
        data[n++] = (char)('A' + i % 26);
    snprintf(data + n, sizeof data - (size_t)n, "\",\"n\":[1,2,3]}");
    char msg[900];
    snprintf(msg, sizeof msg, "{\"op\":\"publish\",\"channel\":\"frag\",\"data\":%s,\"id\":3}", data);
    char *want = ws_delivery("frag", data);

    /* one byte per frame: ~570 frames */
    size_t one[] = { 1 };
    ws_send_fragments(a, WS_TEXT, msg, strlen(msg), one, 1);
    ws_expect(a, "{\"id\":3,\"ok\":true}");
    ws_expect(b, want);

    /* irregular sizes, including empty continuation frames */
    size_t odd[] = { 5, 0, 1, 17, 0, 3, 64, 2, 100 };
    ws_send_fragments(a, WS_TEXT, msg, strlen(msg), odd, sizeof odd / sizeof *odd);
    ws_expect(a, "{\"id\":3,\"ok\":true}");
    ws_expect(b, want);

    /* a PING between fragments (RFC 6455 5.4): answered, message intact */
    size_t half = strlen(msg) / 2;
    ws_send_frame(a, 0, WS_TEXT, msg, half);
    ws_send_frame(a, 1, WS_PING, "mid", 3);
    ws_send_frame(a, 1, WS_CONT, msg + half, strlen(msg) - half);
    /* lws answers the PING itself while the hub writes the reply: RFC 6455
     * orders neither against the other, so take them in either order. */
    int got_pong = 0, got_reply = 0;
    for (int i = 0; i < 2; i++) {
        struct ws_frame f;
        ck_assert_int_eq(ws_recv_frame(a, &f, HT_WAIT_MS), 1);
        if (f.opcode == WS_PONG) {
            ck_assert_str_eq(f.data, "mid");
            got_pong++;
        } else {
            ck_assert_msg(f.opcode == WS_TEXT && strcmp(f.data, "{\"id\":3,\"ok\":true}") == 0,
                          "expected PONG \"mid\" or the reply, got opcode %d \"%s\"",
                          f.opcode, f.data);
            got_reply++;
        }
        ws_frame_free(&f);
    }
    ck_assert_int_eq(got_pong, 1);
    ck_assert_int_eq(got_reply, 1);
    ws_expect(b, want);
    ws_sync(b);
    free(want);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

START_TEST(ws_ping_answered_with_pong)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port);
    ws_send_frame(a, 1, WS_PING, "hello", 5);
    struct ws_frame f;
    ck_assert_int_eq(ws_recv_frame(a, &f, HT_WAIT_MS), 1);
    ck_assert_int_eq(f.opcode, WS_PONG);
    ck_assert_str_eq(f.data, "hello");
    ws_frame_free(&f);
    ws_sync(a);
    ws_free(a);
    stop(h);
}
END_TEST

START_TEST(client_close_handshake)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(a, "room");
    hub_metric_wait(h, "luahub_connections", 2, HT_WAIT_MS);
    ws_send_close(a, 1000, "bye");
    struct ws_frame f;
    int r = ws_recv_msg(a, &f, HT_WAIT_MS);
    ck_assert_msg(r == 1 && f.opcode == WS_CLOSE && f.close_code == 1000,
                  "expected the server's close 1000 (r=%d opcode %d code %d)",
                  r, r == 1 ? f.opcode : -1, r == 1 ? f.close_code : -1);
    ws_frame_free(&f);
    ck_assert_msg(tcp_wait_closed(a->fd, HT_WAIT_MS), "TCP not closed after the close handshake");
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    ws_publish(b, "room", "1");
    ws_sync(b);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Subscriptions                                                        */
/* ------------------------------------------------------------------ */

START_TEST(subscribe_twice_is_idempotent)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_send_text(a, "{\"op\":\"subscribe\",\"channel\":\"room\",\"id\":1}");
    ws_expect(a, "{\"id\":1,\"ok\":true,\"channel\":\"room\"}");
    ws_send_text(a, "{\"op\":\"subscribe\",\"channel\":\"room\",\"id\":2}");
    ws_expect(a, "{\"id\":2,\"ok\":true,\"channel\":\"room\"}");
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 1);
    ws_publish(b, "room", "\"once\"");
    ws_expect(a, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"once\"}");
    ws_sync(a);     /* not twice */
    /* one unsubscribe undoes it */
    ws_unsubscribe(a, "room");
    ws_publish(b, "room", "\"none\"");
    ws_sync(a);
    ws_send_text(a, "{\"op\":\"unsubscribe\",\"channel\":\"room\",\"id\":3}");
    free(ws_expect_error(a, "3", "not_subscribed"));
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

START_TEST(unsubscribe_not_joined)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");    /* the channel exists, a is not in it */
    ws_send_text(a, "{\"op\":\"unsubscribe\",\"channel\":\"room\",\"id\":1}");
    free(ws_expect_error(a, "1", "not_subscribed"));
    ws_send_text(a, "{\"op\":\"unsubscribe\",\"channel\":\"nowhere\"}");
    free(ws_expect_error(a, NULL, "not_subscribed"));
    ws_subscribe(a, "room");
    still_works(a, b);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

START_TEST(channels_per_conn_limit)
{
    struct hub *h = start();   /* max_channels_per_conn = 4 */
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(a, "c1");
    ws_subscribe(a, "c2");
    ws_subscribe(a, "c3");
    ws_subscribe(a, "c4");
    ws_send_text(a, "{\"op\":\"subscribe\",\"channel\":\"c5\",\"id\":5}");
    free(ws_expect_error(a, "5", "limit_exceeded"));
    ws_subscribe(a, "c4");      /* already joined: still fine at the limit */
    ws_publish(b, "c5", "5");   /* a is not in c5 */
    ws_sync(a);
    ws_publish(b, "c4", "4");
    ws_expect(a, "{\"op\":\"message\",\"channel\":\"c4\",\"data\":4}");
    ws_unsubscribe(a, "c1");
    ws_subscribe(a, "c5");
    ws_publish(b, "c5", "5");
    ws_expect(a, "{\"op\":\"message\",\"channel\":\"c5\",\"data\":5}");
    /* the limit is per connection */
    ws_subscribe(b, "c1");
    ws_subscribe(b, "c2");
    ws_subscribe(b, "c3");
    ws_subscribe(b, "c4");
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Misbehaving clients                                                  */
/* ------------------------------------------------------------------ */

START_TEST(repeated_garbage_closes_4008)
{
    struct hub *h = start();   /* max_protocol_errors = 3 */
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port), *c = ws_connect(h->port);
    ws_subscribe(b, "room");
    ws_subscribe(c, "room");
    for (int i = 0; i < 3; i++) {
        ws_send_text(a, "garbage");
        free(ws_expect_error(a, NULL, "bad_request"));
    }
    ws_sync(a);     /* still open after max_protocol_errors errors */
    ws_send_text(a, "{\"op\":\"nope\",\"id\":4}");
    free(ws_expect_error(a, "4", "unknown_op"));
    ws_expect_close(a, 4008);
    still_works(b, c);
    ws_free(a);
    ws_free(b);
    ws_free(c);
    stop(h);
}
END_TEST

/* Slow-consumer test: big messages, so that the burst needed to fill every
 * buffer on the way stays short. */
/* "More than max_protocol_errors errors within 10 s": any 10 s, not a fixed
 * window that restarts 10 s after its first error (which would let up to
 * twice the threshold through around the restart). Errors at 0 s, 9 s, 9 s,
 * 11 s, 11 s: the last four fall within 2 s, more than 3, so the fourth of
 * them closes the connection. The 1 s margins make it robust to scheduling;
 * the sleeps are the subject of the test, not synchronisation. */
static void sleep_until(int64_t t_ms)
{
    int64_t now;
    while ((now = ht_now_ms()) < t_ms)
        usleep((useconds_t)(t_ms - now) * 1000);
}

START_TEST(protocol_error_window_is_sliding)
{
    struct hub *h = start();   /* max_protocol_errors = 3 */
    struct ws *a = ws_connect(h->port);
    int64_t t0 = ht_now_ms();
    ws_send_text(a, "garbage");
    free(ws_expect_error(a, NULL, "bad_request"));
    sleep_until(t0 + 9000);
    for (int i = 0; i < 2; i++) {
        ws_send_text(a, "garbage");
        free(ws_expect_error(a, NULL, "bad_request"));
    }
    sleep_until(t0 + 11000);
    ws_send_text(a, "garbage");
    free(ws_expect_error(a, NULL, "bad_request"));
    ws_sync(a);     /* three errors within 10 s: still open */
    ws_send_text(a, "garbage");
    free(ws_expect_error(a, NULL, "bad_request"));
    struct ws_frame f;
    int r = ws_recv_msg(a, &f, HT_WAIT_MS);
    ck_assert_msg(r == 1 && f.opcode == WS_CLOSE && f.close_code == 4008,
                  "4 protocol errors within 2 s (max_protocol_errors = 3) did not close "
                  "with 4008 (r=%d, opcode %d, code %d): the error window restarts "
                  "instead of sliding", r, r == 1 ? f.opcode : -1, r == 1 ? f.close_code : -1);
    ws_frame_free(&f);
    ws_free(a);
    stop(h);
}
END_TEST

#define SLOW_PAD 60000
#define SLOW_CONF                   \
    "max_message_size = 65536\n"    \
    "max_queue_bytes = 65536\n"     \
    "ping_interval = 30\n"          \
    "ping_timeout = 10\n"           \
    "shutdown_timeout = 2\n"

/* The data of burst message `seq` (new string). */
static char *slow_data(int seq)
{
    char *d = malloc(SLOW_PAD + 64);
    ck_assert_ptr_nonnull(d);
    int n = snprintf(d, 64, "{\"seq\":%d,\"pad\":\"", seq);
    memset(d + n, 'a' + seq % 26, SLOW_PAD);
    strcpy(d + n + SLOW_PAD, "\"}");
    return d;
}

/* Upper bound of the bytes that can sit between the hub's queue and a
 * client that does not read: the hub's socket send buffer (Linux grows it up
 * to tcp_wmem's maximum) and the client's receive buffer. Twice tcp_wmem's
 * maximum plus 1 MiB, within [8 MiB, 64 MiB]. */
static long slow_bound_bytes(void)
{
    long lo = 0, def = 0, max = 4L << 20;
    FILE *f = fopen("/proc/sys/net/ipv4/tcp_wmem", "r");
    if (f) {
        if (fscanf(f, "%ld %ld %ld", &lo, &def, &max) != 3)
            max = 4L << 20;
        fclose(f);
    }
    long b = 2 * max + (1L << 20);
    return b < (8L << 20) ? (8L << 20) : b > (64L << 20) ? (64L << 20) : b;
}

/* A subscriber that stops reading while a burst is published is culled: its
 * subscriptions go at once (the slow-consumer counter becomes 1 while the
 * others keep getting every message in order), and when it reads again it
 * finds an in-order prefix of the burst followed by close 4001.
 *
 * The publisher and the two healthy subscribers move in lockstep (publish,
 * reply, one delivery each), so only the slow client's backlog grows. The
 * burst is bounded by slow_bound_bytes(): past that, not being culled is a
 * failure (in practice the cull comes after ~2 MB, the kernel's autotuned
 * send buffer on loopback).
 * Close 4001 is asserted strictly when the slow client starts reading within
 * 4 s of the cull being observed (always, in practice: it starts within
 * milliseconds); only past that may the hub's 5 s backstop (a TCP close)
 * legitimately win, and then a TCP close is accepted. */
START_TEST(slow_consumer_culled_4001)
{
    struct hub *h = hub_start(SLOW_CONF);
    struct ws *pub = ws_connect(h->port);
    struct ws *f1 = ws_connect(h->port), *f2 = ws_connect(h->port);
    struct ws_opts so = { .rcvbuf = 4096 };
    struct ws *slow = ws_connect_opts(h->port, &so);
    ws_subscribe(f1, "burst");
    ws_subscribe(f2, "burst");
    ws_subscribe(slow, "burst");
    ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 0);

    int limit = (int)(slow_bound_bytes() / SLOW_PAD);
    int seq = 0, culled_at = -1;
    int64_t culled_ms = 0;
    for (; seq < limit && (culled_at < 0 || seq < culled_at + 5); seq++) {
        char *data = slow_data(seq);
        ws_publish(pub, "burst", data);
        char *want = ws_delivery("burst", data);
        ws_expect(f1, want);
        ws_expect(f2, want);
        free(want);
        free(data);
        if (culled_at < 0 && hub_metric(h, "luahub_slow_consumer_closes_total") == 1) {
            culled_at = seq;
            culled_ms = ht_now_ms();
            /* unsubscribed at once, long before its socket is closed */
            ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 2);
        }
    }
    ck_assert_msg(culled_at >= 0, "not culled after %d messages of %d bytes", seq, SLOW_PAD);
    ws_sync(f1);
    ws_sync(f2);

    /* the slow client reads now: an in-order prefix, then close 4001 */
    int64_t late = ht_now_ms() - culled_ms;
    int got = 0;
    for (;;) {
        struct ws_frame f;
        int r = ws_recv_msg(slow, &f, HT_WAIT_MS);
        ck_assert_msg(r != 0, "slow client: nothing after %d messages", got);
        if (r < 0) {
            ck_assert_msg(late > 4000, "slow client: TCP close without close 4001 after %d "
                          "messages (reading started %lld ms after the cull)", got, (long long)late);
            break;
        }
        if (f.opcode == WS_CLOSE) {
            ck_assert_msg(f.close_code == 4001, "slow client: close %d \"%s\", expected 4001",
                          f.close_code, f.close_reason);
            ws_frame_free(&f);
            break;
        }
        char *data = slow_data(got);
        char *want = ws_delivery("burst", data);
        ck_assert_msg(f.opcode == WS_TEXT && strcmp(f.data, want) == 0,
                      "slow client: message %d is not seq %d: %.80s", got, got, f.data);
        free(want);
        free(data);
        ws_frame_free(&f);
        got++;
    }
    /* the cull happened at or before message culled_at: the slow client
     * cannot have it */
    ck_assert_msg(got >= 1 && got <= culled_at, "slow client got %d messages, culled at %d",
                  got, culled_at);
    ck_assert_msg(tcp_wait_closed(slow->fd, HT_WAIT_MS), "slow client: TCP still open");
    hub_metric_wait(h, "luahub_connections", 3, HT_WAIT_MS);
    ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 1);
    ws_free(slow);
    ws_free(pub);
    ws_free(f1);
    ws_free(f2);
    stop(h);
}
END_TEST

START_TEST(client_vanishes_without_close)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    struct ws *fin = ws_connect(h->port), *rst = ws_connect(h->port), *busy = ws_connect(h->port);
    ws_subscribe(b, "room");
    ws_subscribe(fin, "room");
    ws_subscribe(rst, "room");
    ws_subscribe(busy, "room");
    ws_subscribe(fin, "fin-only");
    hub_metric_wait(h, "luahub_connections", 5, HT_WAIT_MS);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 5);
    ck_assert_int_eq(hub_metric(h, "luahub_channels"), 2);

    ws_free(fin);       /* FIN, no close frame */
    hub_metric_wait(h, "luahub_connections", 4, HT_WAIT_MS);
    ws_abort(rst);      /* RST */
    hub_metric_wait(h, "luahub_connections", 3, HT_WAIT_MS);
    /* one that vanishes with deliveries queued for it */
    for (int i = 0; i < 20; i++) {
        ws_publish(a, "room", "\"queued\"");
        ws_expect(b, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"queued\"}");
    }
    ws_abort(busy);
    hub_metric_wait(h, "luahub_connections", 2, HT_WAIT_MS);
    /* each one left all its channels; "fin-only" is gone with its only member */
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 1);
    ck_assert_int_eq(hub_metric(h, "luahub_channels"), 1);

    ws_publish(a, "room", "\"after\"");
    ws_expect(b, "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"after\"}");
    ws_sync(b);
    struct ws *c = ws_connect(h->port);
    ws_subscribe(c, "room");
    ws_subscribe(a, "room");
    still_works(a, c);
    ws_expect(b, "{\"op\":\"message\",\"channel\":\"room\",\"data\":{\"from\":\"a\"}}");
    ws_expect(b, "{\"op\":\"message\",\"channel\":\"room\",\"data\":{\"from\":\"b\"}}");
    ws_sync(b);
    ws_free(a);
    ws_free(b);
    ws_free(c);
    stop(h);
}
END_TEST

START_TEST(half_sent_handshakes)
{
    struct hub *h = start();
    static const char partial[] = "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webs";
    static const char no_end[] =
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

    /* partial request, then gone */
    for (int i = 0; i < 5; i++) {
        int fd = tcp_connect(h->port);
        tcp_send(fd, partial, sizeof partial - 1);
        close(fd);
    }
    int fd = tcp_connect(h->port);
    tcp_send(fd, partial, sizeof partial - 1);
    tcp_abort(fd);

    /* partial requests that stall, and a connection that says nothing */
    int stalled[8];
    for (int i = 0; i < 8; i++) {
        stalled[i] = tcp_connect(h->port);
        if (i % 3 == 0)
            tcp_send(stalled[i], partial, sizeof partial - 1);
        else if (i % 3 == 1)
            tcp_send(stalled[i], no_end, sizeof no_end - 1);
    }
    /* a client mid-frame: header sent, payload never comes */
    struct ws *mid = ws_connect(h->port);
    ws_send_raw(mid, "\x81\xfe\x00\x80\x01\x02\x03\x04{\"op\"", 13);

    /* meanwhile the hub serves everyone else */
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(a, "room");
    ws_subscribe(b, "room");
    still_works(a, b);
    struct http_resp r;
    ck_assert_int_eq(http_request(h->port, "GET", "/healthz", NULL, NULL, &r), 200);
    http_resp_free(&r);

    for (int i = 0; i < 8; i++)
        close(stalled[i]);
    ws_free(mid);
    still_works(a, b);
    hub_metric_wait(h, "luahub_connections", 2, HT_WAIT_MS);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* Past max_connections an upgrade is refused with 503; a freed slot can be
 * taken again. */
START_TEST(max_connections_refuses_upgrade)
{
    struct hub *h = hub_start(BASE_CONF "max_connections = 2\n");
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port), *c;
    struct http_resp r;
    ck_assert_int_eq(ws_handshake(h->port, NULL, &c, &r), 503);
    ck_assert_ptr_null(c);
    http_resp_free(&r);
    ck_assert_int_eq(hub_metric(h, "luahub_connections_refused_total"), 1);
    ws_subscribe(a, "room");
    ws_subscribe(b, "room");
    still_works(a, b);
    ws_free(b);
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    c = ws_connect(h->port);
    ws_subscribe(c, "room");
    still_works(a, c);
    ws_free(a);
    ws_free(c);
    stop(h);
}
END_TEST

START_TEST(upgrade_on_other_path_refused)
{
    struct hub *h = hub_start(BASE_CONF "websocket_path = \"/live\"\n");
    struct ws *c;
    struct http_resp r;
    struct ws_opts o = { .path = "/ws" };
    int st = ws_handshake(h->port, &o, &c, &r);
    ck_assert_msg(st != 101 && c == NULL, "upgraded on /ws with websocket_path /live");
    http_resp_free(&r);
    o.path = "/live";
    c = ws_connect_opts(h->port, &o);
    ws_sync(c);
    ws_free(c);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Fan-out: ordering, no duplicates, completeness                       */
/* ------------------------------------------------------------------ */

#define NSUB 150
#define NPUB 4
#define NCHAN 3
#define NMSG 60     /* per publisher per channel */

struct pub_arg {
    int port, p;
};

/* A publisher pipelines NMSG x NCHAN publishes, then checks that the
 * replies came in order. Runs in its own thread, so the hub sees several
 * publishers at once. */
static void *publisher(void *arg)
{
    struct pub_arg *pa = arg;
    struct ws *c = ws_connect(pa->port);
    char msg[200], want[64];
    for (int s = 0; s < NMSG; s++)
        for (int ch = 0; ch < NCHAN; ch++) {
            snprintf(msg, sizeof msg,
                     "{\"op\":\"publish\",\"channel\":\"order:%d\",\"data\":{\"p\":%d,\"s\":%d},\"id\":%d}",
                     ch, pa->p, s, s * NCHAN + ch);
            ws_send_text(c, msg);
        }
    for (int k = 0; k < NMSG * NCHAN; k++) {
        snprintf(want, sizeof want, "{\"id\":%d,\"ok\":true}", k);
        ws_expect(c, want);
    }
    ws_free(c);
    return NULL;
}

static int sub_in(int i, int ch)
{
    return ch == i % NCHAN || (i % 2 == 0 && ch == (i + 1) % NCHAN);
}

START_TEST(ordering_many_subscribers_and_publishers)
{
    struct hub *h = start();
    static struct ws *subs[NSUB];
    long long expected = 0;
    for (int i = 0; i < NSUB; i++) {
        subs[i] = ws_connect(h->port);
        for (int ch = 0; ch < NCHAN; ch++)
            if (sub_in(i, ch)) {
                char name[32];
                snprintf(name, sizeof name, "order:%d", ch);
                ws_subscribe(subs[i], name);
                expected += NPUB * NMSG;
            }
    }
    long long base = hub_metric(h, "luahub_deliveries_total");
    long long base_pub = hub_metric(h, "luahub_messages_published_total");

    pthread_t th[NPUB];
    struct pub_arg pa[NPUB];
    for (int p = 0; p < NPUB; p++) {
        pa[p] = (struct pub_arg){ h->port, p };
        ck_assert_int_eq(pthread_create(&th[p], NULL, publisher, &pa[p]), 0);
    }
    for (int p = 0; p < NPUB; p++)
        ck_assert_int_eq(pthread_join(th[p], NULL), 0);

    for (int i = 0; i < NSUB; i++) {
        int next[NPUB][NCHAN] = { { 0 } };
        int count = 0, want_count = 0;
        for (int ch = 0; ch < NCHAN; ch++)
            want_count += sub_in(i, ch) ? NPUB * NMSG : 0;
        while (count < want_count) {
            char *t = ws_recv_text(subs[i]);
            int ch, p, s, n = 0;
            char again[200];
            ck_assert_msg(sscanf(t, "{\"op\":\"message\",\"channel\":\"order:%d\",\"data\":{\"p\":%d,\"s\":%d}}%n",
                                 &ch, &p, &s, &n) == 3 && n > 0,
                          "subscriber %d: unexpected message %s", i, t);
            snprintf(again, sizeof again,
                     "{\"op\":\"message\",\"channel\":\"order:%d\",\"data\":{\"p\":%d,\"s\":%d}}", ch, p, s);
            ck_assert_msg(strcmp(t, again) == 0, "subscriber %d: not exact: %s", i, t);
            ck_assert_msg(ch >= 0 && ch < NCHAN && sub_in(i, ch) && p >= 0 && p < NPUB,
                          "subscriber %d: message for a channel it is not in: %s", i, t);
            ck_assert_msg(s == next[p][ch],
                          "subscriber %d, publisher %d, channel %d: got seq %d, expected %d "
                          "(out of order, duplicate or lost)", i, p, ch, s, next[p][ch]);
            next[p][ch]++;
            count++;
            free(t);
        }
        ws_sync(subs[i]);   /* and nothing more: no duplicates */
    }
    ck_assert_int_eq(hub_metric(h, "luahub_deliveries_total") - base, expected);
    ck_assert_int_eq(hub_metric(h, "luahub_messages_published_total") - base_pub,
                     NPUB * NMSG * NCHAN);
    for (int i = 0; i < NSUB; i++)
        ws_free(subs[i]);
    hub_metric_wait(h, "luahub_connections", 0, HT_WAIT_MS);
    stop(h);
}
END_TEST

/* A large fan-out is written in slices (docs/internals.md "Write path"):
 * one pass over 2,000 subscribers takes several loop iterations, and in
 * between the hub reads and answers other clients. Meanwhile 200 of the
 * subscribers vanish (their closes are handled between slices, while they
 * wait in the flush FIFO): every other subscriber still gets every message,
 * in order, once; a command from a client outside the fan-out is answered. */
#define BIG_SUBS 2000
#define BIG_GONE 200
#define BIG_MSGS 20
START_TEST(large_fanout_written_in_slices)
{
    struct hub *h = start();
    static struct ws *subs[BIG_SUBS];
    for (int i = 0; i < BIG_SUBS; i++) {
        subs[i] = ws_connect(h->port);
        ws_subscribe(subs[i], "big");
    }
    struct ws *pub = ws_connect(h->port), *probe = ws_connect(h->port);
    long long passes = hub_metric(h, "luahub_flushes_total");
    long long slices = hub_metric(h, "luahub_flush_slices_total");
    char msg[256], want[256], pad[101];
    memset(pad, 'x', 100);
    pad[100] = '\0';

    for (int k = 0; k < BIG_MSGS; k++) {
        snprintf(msg, sizeof msg,
                 "{\"op\":\"publish\",\"channel\":\"big\",\"data\":{\"k\":%d,\"pad\":\"%s\"},\"id\":%d}",
                 k, pad, k);
        ws_send_text(pub, msg);
    }
    for (int i = 0; i < BIG_GONE; i++)
        ws_abort(subs[i * (BIG_SUBS / BIG_GONE)]);
    ws_send_text(probe, "{\"op\":\"subscribe\",\"channel\":\"aside\",\"id\":\"p\"}");
    ws_expect(probe, "{\"id\":\"p\",\"ok\":true,\"channel\":\"aside\"}");
    for (int k = 0; k < BIG_MSGS; k++) {
        snprintf(want, sizeof want, "{\"id\":%d,\"ok\":true}", k);
        ws_expect(pub, want);
    }
    for (int i = 0; i < BIG_SUBS; i++) {
        if (i % (BIG_SUBS / BIG_GONE) == 0)
            continue;
        for (int k = 0; k < BIG_MSGS; k++) {
            snprintf(want, sizeof want,
                     "{\"op\":\"message\",\"channel\":\"big\",\"data\":{\"k\":%d,\"pad\":\"%s\"}}",
                     k, pad);
            ws_expect(subs[i], want);
        }
    }
    ws_sync(subs[1]); /* and nothing more */
    /* more slices than passes: passes were cut, and the loop turned between */
    long long dp = hub_metric(h, "luahub_flushes_total") - passes;
    long long ds = hub_metric(h, "luahub_flush_slices_total") - slices;
    ck_assert_msg(dp >= 1 && ds > dp, "%lld passes in %lld slices", dp, ds);
    hub_metric_wait(h, "luahub_connections", BIG_SUBS - BIG_GONE + 2, HT_WAIT_MS);
    for (int i = 0; i < BIG_SUBS; i++)
        if (i % (BIG_SUBS / BIG_GONE))
            ws_free(subs[i]);
    ws_free(pub);
    ws_free(probe);
    hub_metric_wait(h, "luahub_connections", 0, HT_WAIT_MS);
    stop(h);
}
END_TEST

/* Sparse traffic: a publish whose delivery arrives before the next one is
 * written alone: one socket write per delivery, counted. (That it is also
 * written at once, without a pause, is a latency property: bench/ measures
 * it, in the pacing and flow-controlled scenarios.) */
START_TEST(sparse_traffic_one_write_per_delivery)
{
    struct hub *h = start();
    struct ws *sub = ws_connect(h->port);
    ws_subscribe(sub, "pace");
    long long writes = hub_metric(h, "luahub_writes_total");
    for (int i = 0; i < 20; i++) {
        char data[32], *want;
        snprintf(data, sizeof data, "{\"n\":%d}", i);
        ck_assert_int_eq(http_publish(h->port, "pace", data), 200);
        want = ws_delivery("pace", data);
        ws_expect(sub, want);
        free(want);
    }
    ck_assert_int_eq(hub_metric(h, "luahub_writes_total") - writes, 20);
    ws_free(sub);
    stop(h);
}
END_TEST

/* write_delay = N: after a flush, the next waits until N ms have passed,
 * and what gathered meanwhile leaves together, in order: three deliveries
 * published within the delay go out in one socket write (counted), after
 * a paused flush. The first delivery after a quiet spell is written at
 * once, alone. */
START_TEST(write_delay_gathers_deliveries)
{
    struct hub *h = hub_start(BASE_CONF "write_delay = 1000\n");
    struct ws *sub = ws_connect(h->port);
    char *want;

    ws_subscribe(sub, "pace");
    long long writes = hub_metric(h, "luahub_writes_total");
    ck_assert_int_eq(http_publish(h->port, "pace", "1"), 200);
    want = ws_delivery("pace", "1");
    ws_expect(sub, want);
    free(want);
    ck_assert_int_eq(hub_metric(h, "luahub_writes_total") - writes, 1);

    long long paused = hub_metric(h, "luahub_flushes_paused_total");
    for (int i = 2; i <= 4; i++) {
        char data[8];
        snprintf(data, sizeof data, "%d", i);
        ck_assert_int_eq(http_publish(h->port, "pace", data), 200);
    }
    for (int i = 2; i <= 4; i++) {
        char data[8];
        snprintf(data, sizeof data, "%d", i);
        want = ws_delivery("pace", data);
        ws_expect(sub, want);
        free(want);
    }
    ck_assert_int_eq(hub_metric(h, "luahub_writes_total") - writes, 2);
    ck_assert_int_eq(hub_metric(h, "luahub_flushes_paused_total") - paused, 1);
    ws_free(sub);
    stop(h);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Keepalive and shutdown                                               */
/* ------------------------------------------------------------------ */

/* A mute client alone on the hub: nothing else wakes lws, and the drop
 * must still happen on time (lws services its timers only after one of
 * its own events; the hub wakes it). */
START_TEST(mute_client_alone_dropped)
{
    struct hub *h = hub_start(COMMON_CONF "ping_interval = 1\nping_timeout = 1\n");
    struct ws *mute = ws_connect(h->port);
    mute->auto_pong = 0;
    ws_subscribe(mute, "k");
    ws_expect_dropped(mute, 10000);
    ck_assert_msg(mute->pings >= 1, "the mute client was never pinged");
    hub_metric_wait(h, "luahub_connections", 0, HT_WAIT_MS);
    ws_free(mute);
    stop(h);
}
END_TEST

START_TEST(ping_keepalive)
{
    struct hub *h = hub_start(COMMON_CONF "ping_interval = 1\nping_timeout = 1\n");
    struct ws *alive = ws_connect(h->port), *mute = ws_connect(h->port);
    struct ws *chatty = ws_connect(h->port);
    int64_t t0 = ht_now_ms(), chatted = t0;
    mute->auto_pong = 0;
    chatty->auto_pong = 0; /* never answers a PING, but keeps talking */
    ws_subscribe(alive, "k");
    ws_subscribe(mute, "k");

    /* `alive` answers every PING and stays for 5 s; only PINGs arrive.
     * `chatty` sends a command every 300 ms: any frame shows it is there. */
    while (ht_now_ms() - t0 < 5000) {
        if (ht_now_ms() - chatted >= 300) {
            ws_sync(chatty);
            chatted = ht_now_ms();
        }
        struct ws_frame f;
        int left = (int)(5000 - (ht_now_ms() - t0));
        int r = ws_recv_frame(alive, &f, left < 300 ? left + 1 : 300);
        if (r == 0)
            continue;
        ck_assert_msg(r == 1, "the answering client was dropped after %lld ms",
                      (long long)(ht_now_ms() - t0));
        ck_assert_msg(f.opcode == WS_PING, "unexpected frame opcode %d: %s", f.opcode, f.data);
        ws_frame_free(&f);
    }
    ck_assert_msg(alive->pings >= 2, "only %u PINGs in 5 s with ping_interval 1", alive->pings);
    ws_sync(alive);
    ws_sync(chatty);

    /* `mute` never answers: dropped (TCP close) within 10 s of connecting */
    ws_expect_dropped(mute, (int)(10000 - (ht_now_ms() - t0)) + 1);
    ck_assert_msg(mute->pings >= 1, "the mute client was never pinged");
    hub_metric_wait(h, "luahub_connections", 2, HT_WAIT_MS);
    ws_sync(chatty);
    /* its subscription went with it */
    ws_send_text(alive, "{\"op\":\"publish\",\"channel\":\"k\",\"data\":1,\"id\":1}");
    ws_expect_pair(alive, "{\"id\":1,\"ok\":true}", "{\"op\":\"message\",\"channel\":\"k\",\"data\":1}");
    ws_free(alive);
    ws_free(mute);
    ws_free(chatty);
    stop(h);
}
END_TEST

START_TEST(graceful_shutdown_close_1001)
{
    struct hub *h = start();   /* shutdown_timeout = 2 */
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port), *mute = ws_connect(h->port);
    ws_subscribe(a, "room");
    ws_subscribe(mute, "room");
    ws_publish(b, "room", "1");
    ws_expect(a, "{\"op\":\"message\",\"channel\":\"room\",\"data\":1}");
    hub_metric_wait(h, "luahub_connections", 3, HT_WAIT_MS);
    hub_signal(h, SIGTERM);
    ws_expect_close(a, 1001);
    ws_expect_close(b, 1001);
    /* mute reads its delivery and the close frame but never answers: the
     * hub gives up after shutdown_timeout and still exits 0 */
    ws_expect(mute, "{\"op\":\"message\",\"channel\":\"room\",\"data\":1}");
    struct ws_frame f;
    int r = ws_recv_msg(mute, &f, HT_WAIT_MS);
    ck_assert_msg(r == 1 && f.opcode == WS_CLOSE && f.close_code == 1001,
                  "mute client: expected close 1001");
    ws_frame_free(&f);
    ck_assert_int_eq(hub_wait_exit(h, HT_WAIT_MS), 0);
    ck_assert_msg(tcp_wait_closed(mute->fd, HT_WAIT_MS), "socket open after the hub exited");
    ws_free(a);
    ws_free(b);
    ws_free(mute);
    stop(h);
}
END_TEST


/* ------------------------------------------------------------------ */
/* RFC 6455 answers (issue 9.8, 9.9)                                    */
/* ------------------------------------------------------------------ */

/* Text that is not UTF-8 fails the connection with 1007 (RFC 6455 §8.1),
 * whatever else is wrong with it and wherever the bad bytes are. */
static const char *const bad_utf8[] = {
    "{\"op\":\"subscribe\",\"channel\":\"room\xc3\x28\",\"id\":20}", /* bad 2nd byte */
    "{\"op\":\"publish\",\"channel\":\"room\",\"data\":\"\xff\",\"id\":1}",
    "{\"op\":\"ping\",\"id\":\"\xc0\xaf\"}",                        /* overlong */
    "{\"op\":\"ping\",\"id\":1}\xed\xa0\x80",                       /* a surrogate */
    "\xf4\x90\x80\x80",                                             /* past U+10FFFF */
    "{\"op\":\"ping\",\"id\":\"\x0b\xe2\x82\"}",                    /* \v, then truncated */
    "\x80",
};
#define NBAD_UTF8 ((int)(sizeof bad_utf8 / sizeof *bad_utf8))

/* Loop index: text i / 2, in one frame (even) or in 3-byte fragments. */
START_TEST(invalid_utf8_closes_1007)
{
    const char *t = bad_utf8[_i / 2];
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(a, "room");
    ws_subscribe(b, "room");
    if (_i % 2) {
        static const size_t sizes[] = {3};
        ws_send_fragments(a, WS_TEXT, t, strlen(t), sizes, 1);
    } else {
        ws_send_text(a, t);
    }
    ws_expect_close(a, 1007);
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    ws_publish(b, "other", "1");
    ws_sync(b);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 1);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* Close frames: a valid one is echoed with its code; a 1-byte payload, a
 * code nobody may send, or a reason that is not UTF-8 get 1002. */
static const struct {
    const char *payload;
    size_t len;
    int answer;
} closes[] = {
    {"\x03", 1, 1002},
    {"\x00\x00", 2, 1002},              /* 0 */
    {"\x03\xe7", 2, 1002},              /* 999 */
    {"\x03\xec", 2, 1002},              /* 1004 */
    {"\x03\xed", 2, 1002},              /* 1005 */
    {"\x03\xee", 2, 1002},              /* 1006 */
    {"\x03\xf7", 2, 1002},              /* 1015 */
    {"\x03\xf8", 2, 1002},              /* 1016 */
    {"\x0b\xb7", 2, 1002},              /* 2999 */
    {"\x13\x88", 2, 1002},              /* 5000 */
    {"\xff\xff", 2, 1002},              /* 65535 */
    {"\x03\xe8\xff", 3, 1002},          /* 1000, reason not UTF-8 */
    {"\x03\xe8\xc0\xaf", 4, 1002},      /* ... overlong */
    {"\x03\xe8\xed\xa0\x80", 5, 1002},  /* ... a surrogate */
    {"\x03\xe8ok\xe2\x82", 6, 1002},    /* ... truncated */
    {"", 0, 1005},                      /* valid: empty, answered empty */
    {"\x03\xe8", 2, 1000},
    {"\x03\xe9" "bye", 5, 1001},
    {"\x03\xf4", 2, 1002},              /* 1012: not in RFC 6455 (lws refuses it too) */
    {"\x03\xf3", 2, 1011},
    {"\x0b\xb8", 2, 3000},
    {"\x13\x87", 2, 4999},
    {"\x03\xe8\xc3\xa9t\xc3\xa9", 7, 1000},
};

START_TEST(close_frames_checked)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");
    ws_send_frame(a, 1, WS_CLOSE, closes[_i].payload, closes[_i].len);
    struct ws_frame f;
    int r = ws_recv_msg(a, &f, HT_WAIT_MS);
    ck_assert_msg(r == 1 && f.opcode == WS_CLOSE && f.close_code == closes[_i].answer,
                  "close case %d: expected close %d (r=%d opcode %d code %d)", _i,
                  closes[_i].answer, r, r == 1 ? f.opcode : -1, r == 1 ? f.close_code : -1);
    ws_frame_free(&f);
    ck_assert_msg(tcp_wait_closed(a->fd, HT_WAIT_MS), "TCP not closed after the close");
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    ws_publish(b, "other", "1");
    ws_sync(b);
    ws_free(a);
    ws_free(b);
    stop(h);
}
END_TEST

/* Zero-length fragments, first, in the middle, or all of a message (the
 * sanitizer build aborted on the first). */
START_TEST(zero_length_fragments)
{
    struct hub *h = start();
    struct ws *a = ws_connect(h->port);
    static const char ping1[] = "{\"op\":\"ping\",\"id\":1}";
    ws_send_frame(a, 0, WS_TEXT, "", 0);
    ws_send_frame(a, 1, WS_CONT, ping1, sizeof ping1 - 1);
    ws_expect(a, "{\"id\":1,\"ok\":true}");
    ws_send_frame(a, 0, WS_TEXT, "{\"op\":\"pi", 9);
    ws_send_frame(a, 0, WS_CONT, "", 0);
    ws_send_frame(a, 0, WS_CONT, "", 0);
    ws_send_frame(a, 1, WS_CONT, "ng\",\"id\":2}", 11);
    ws_expect(a, "{\"id\":2,\"ok\":true}");
    ws_send_frame(a, 0, WS_TEXT, "", 0);
    ws_send_frame(a, 1, WS_CONT, "", 0);
    free(ws_expect_error(a, NULL, "bad_request"));
    ws_send_frame(a, 0, WS_BINARY, "", 0);
    ws_send_frame(a, 1, WS_CONT, "", 0);
    free(ws_expect_error(a, NULL, "bad_request"));
    ws_sync(a);
    ws_free(a);
    stop(h);
}
END_TEST

static Suite *ws_suite(void)
{
    Suite *s = suite_create("ws");
    TCase *tc;

    tc = tcase_create("support");
    tcase_add_test(tc, support_accept_key);
    suite_add_tcase(s, tc);

    tc = tcase_create("replies");
    tcase_add_test(tc, welcome_frame);
    tcase_add_test(tc, replies_integer_ids);
    tcase_add_test(tc, replies_string_ids);
    tcase_add_test(tc, replies_without_id);
    tcase_add_test(tc, publisher_gets_own_message_only_when_subscribed);
    tcase_add_test(tc, delivery_is_byte_exact);
    tcase_add_test(tc, delivery_big_number);
    tcase_add_test(tc, channel_charset_and_255_bytes);
    suite_add_tcase(s, tc);

    tc = tcase_create("bad_input");
    tcase_add_loop_test(tc, bad_command, 0, NBAD_INPUTS);
    tcase_add_test(tc, bad_channel_256_bytes);
    tcase_add_test(tc, bad_binary_frame);
    tcase_add_test(tc, bad_data_crafted_envelope);
    suite_add_tcase(s, tc);

    tc = tcase_create("rfc6455");
    tcase_add_loop_test(tc, invalid_utf8_closes_1007, 0, 2 * NBAD_UTF8);
    tcase_add_loop_test(tc, close_frames_checked, 0, (int)(sizeof closes / sizeof *closes));
    tcase_add_test(tc, zero_length_fragments);
    suite_add_tcase(s, tc);

    tc = tcase_create("framing");
    tcase_add_test(tc, message_exactly_max_size_accepted);
    tcase_add_test(tc, small_rx_buffer);
    tcase_add_test(tc, frame_over_max_size_closes_1009);
    tcase_add_test(tc, frame_claiming_huge_length_closes_1009);
    tcase_add_test(tc, fragmented_message_over_max_size_closes_1009);
    tcase_add_test(tc, fragmented_message_reassembled);
    tcase_add_test(tc, ws_ping_answered_with_pong);
    tcase_add_test(tc, client_close_handshake);
    suite_add_tcase(s, tc);

    tc = tcase_create("subscriptions");
    tcase_add_test(tc, subscribe_twice_is_idempotent);
    tcase_add_test(tc, unsubscribe_not_joined);
    tcase_add_test(tc, channels_per_conn_limit);
    suite_add_tcase(s, tc);

    tc = tcase_create("misbehaving");
    tcase_add_test(tc, repeated_garbage_closes_4008);
    tcase_add_test(tc, protocol_error_window_is_sliding);
    tcase_add_test(tc, slow_consumer_culled_4001);
    tcase_add_test(tc, client_vanishes_without_close);
    tcase_add_test(tc, half_sent_handshakes);
    tcase_add_test(tc, max_connections_refuses_upgrade);
    tcase_add_test(tc, upgrade_on_other_path_refused);
    suite_add_tcase(s, tc);

    tc = tcase_create("fanout");
    tcase_add_test(tc, ordering_many_subscribers_and_publishers);
    tcase_add_test(tc, large_fanout_written_in_slices);
    tcase_add_test(tc, sparse_traffic_one_write_per_delivery);
    tcase_add_test(tc, write_delay_gathers_deliveries);
    suite_add_tcase(s, tc);

    tc = tcase_create("lifecycle");
    tcase_add_test(tc, ping_keepalive);
    tcase_add_test(tc, mute_client_alone_dropped);
    tcase_add_test(tc, graceful_shutdown_close_1001);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(ws_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
