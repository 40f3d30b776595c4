/* Message buffers (framing, refcounts) and the per-connection queue. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/msg.h"
#include "luahub/queue.h"

START_TEST(t_small_frame_header)
{
    struct hub_msg *m = hub_msg_text("hello", 5);
    const unsigned char *f = hub_msg_frame(m);
    ck_assert_uint_eq(m->frame_len, 7);
    ck_assert_uint_eq(f[0], 0x81);
    ck_assert_uint_eq(f[1], 5);
    ck_assert_mem_eq(f + 2, "hello", 5);
    hub_msg_unref(m);
}
END_TEST

/* Header sizes switch at 126 and 65536 bytes (RFC 6455 5.2). */
START_TEST(t_frame_length_encodings)
{
    static const struct { size_t len; size_t hdr; } cases[] = {
        {0, 2}, {125, 2}, {126, 4}, {65535, 4}, {65536, 10}, {70000, 10},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t n = cases[i].len;
        char *p = malloc(n ? n : 1);
        memset(p, 'x', n);
        struct hub_msg *m = hub_msg_text(p, n);
        const unsigned char *f = hub_msg_frame(m);
        ck_assert_uint_eq(m->frame_len, n + cases[i].hdr);
        ck_assert_uint_eq(f[0], 0x81);
        if (cases[i].hdr == 2) {
            ck_assert_uint_eq(f[1], n);
        } else if (cases[i].hdr == 4) {
            ck_assert_uint_eq(f[1], 126);
            ck_assert_uint_eq(((size_t)f[2] << 8) | f[3], n);
        } else {
            ck_assert_uint_eq(f[1], 127);
            size_t v = 0;
            for (int k = 0; k < 8; k++)
                v = (v << 8) | f[2 + k];
            ck_assert_uint_eq(v, n);
        }
        ck_assert_mem_eq(f + cases[i].hdr, p, n);
        /* The header sits inside the headroom, with room for LWS_PRE (16). */
        ck_assert_uint_ge(m->frame_off, 16);
        hub_msg_unref(m);
        free(p);
    }
}
END_TEST

START_TEST(t_close_frame)
{
    struct hub_msg *m = hub_msg_close(4001, "slow consumer");
    const unsigned char *f = hub_msg_frame(m);
    ck_assert_uint_eq(f[0], 0x88);
    ck_assert_uint_eq(f[1], 2 + 13);
    ck_assert_uint_eq((f[2] << 8) | f[3], 4001);
    ck_assert_mem_eq(f + 4, "slow consumer", 13);
    hub_msg_unref(m);

    /* A reason too long for a control frame is cut to 123 bytes. */
    char big[300];
    memset(big, 'r', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    m = hub_msg_close(1000, big);
    ck_assert_uint_eq(hub_msg_frame(m)[1], 125);
    hub_msg_unref(m);
}
END_TEST

START_TEST(t_delivery_frame)
{
    static const char want[] = "{\"op\":\"message\",\"channel\":\"room:1\",\"data\":{\"a\" : [1, 2]}}";
    struct hub_msg *m = hub_msg_delivery("room:1", 6, "{\"a\" : [1, 2]}", 14);
    const unsigned char *f = hub_msg_frame(m);
    ck_assert_uint_eq(m->payload_len, strlen(want));
    ck_assert_uint_eq(f[1], strlen(want));
    ck_assert_mem_eq(f + 2, want, strlen(want));
    hub_msg_unref(m);
}
END_TEST

START_TEST(t_queue_fifo_and_bytes)
{
    struct hub_queue q = {0};
    struct hub_msg *a = hub_msg_text("a", 1), *b = hub_msg_text("bb", 2);

    ck_assert_ptr_null(hub_queue_peek(&q));
    hub_queue_push(&q, a);
    hub_queue_push(&q, b);
    hub_queue_push(&q, a);
    ck_assert_uint_eq(q.count, 3);
    ck_assert_uint_eq(q.bytes, 3 + 4 + 3);
    ck_assert_uint_eq(a->refs, 3);
    ck_assert_ptr_eq(hub_queue_peek(&q), a);
    hub_queue_pop(&q);
    ck_assert_ptr_eq(hub_queue_peek(&q), b);
    hub_queue_pop(&q);
    ck_assert_ptr_eq(hub_queue_peek(&q), a);
    ck_assert_uint_eq(q.bytes, 3);
    hub_queue_pop(&q);
    ck_assert_uint_eq(q.count, 0);
    ck_assert_uint_eq(q.bytes, 0);
    ck_assert_uint_eq(a->refs, 1);
    ck_assert_uint_eq(b->refs, 1);
    hub_msg_unref(a);
    hub_msg_unref(b);
    hub_queue_clear(&q);
}
END_TEST

/* Pushes and pops interleaved across ring growth keep FIFO order; clear
 * drops every reference. */
/* One frame lives inline (nothing allocated); a second moves the queue to
 * a ring in order; once drained, the ring is freed and the next frame is
 * inline again. Under ASan a leaked or doubly freed ring fails here. */
START_TEST(t_queue_inline_slot)
{
    struct hub_queue q = {0};
    struct hub_msg *a = hub_msg_text("a", 1), *b = hub_msg_text("bb", 2);

    hub_queue_push(&q, a);
    ck_assert_uint_eq(q.cap, 1);
    ck_assert_ptr_eq(q.u.one, a);
    ck_assert_ptr_eq(hub_queue_peek(&q), a);
    hub_queue_pop(&q);
    ck_assert_uint_eq(q.cap, 0);
    ck_assert_ptr_null(hub_queue_peek(&q));

    hub_queue_push(&q, a);
    hub_queue_push(&q, b);
    ck_assert_uint_eq(q.cap, 8);
    ck_assert_uint_eq(q.count, 2);
    ck_assert_uint_eq(q.bytes, a->frame_len + b->frame_len);
    ck_assert_ptr_eq(hub_queue_at(&q, 0), a);
    ck_assert_ptr_eq(hub_queue_at(&q, 1), b);
    hub_queue_pop(&q);
    ck_assert_ptr_eq(hub_queue_peek(&q), b);
    ck_assert_uint_eq(q.cap, 8);
    hub_queue_pop(&q);
    ck_assert_uint_eq(q.cap, 0);
    ck_assert_uint_eq(q.bytes, 0);

    hub_queue_push(&q, b);
    ck_assert_uint_eq(q.cap, 1);
    ck_assert_uint_eq(b->refs, 2);
    hub_queue_clear(&q);
    ck_assert_uint_eq(q.cap, 0);
    ck_assert_uint_eq(a->refs, 1);
    ck_assert_uint_eq(b->refs, 1);
    hub_msg_unref(a);
    hub_msg_unref(b);
}
END_TEST

START_TEST(t_queue_wraps_and_grows)
{
    enum { N = 1000 };
    struct hub_queue q = {0};
    struct hub_msg *msgs[N];
    int next_pop = 0;

    for (int i = 0; i < N; i++)
        msgs[i] = hub_msg_text(&i, sizeof(i));
    for (int i = 0; i < N; i++) {
        hub_queue_push(&q, msgs[i]);
        if (i % 3 == 2) {
            ck_assert_ptr_eq(hub_queue_peek(&q), msgs[next_pop]);
            hub_queue_pop(&q);
            next_pop++;
        }
    }
    ck_assert_uint_eq(q.count, N - next_pop);
    for (int i = next_pop; i < next_pop + 10; i++) {
        ck_assert_ptr_eq(hub_queue_peek(&q), msgs[i]);
        hub_queue_pop(&q);
    }
    hub_queue_clear(&q);
    ck_assert_uint_eq(q.count, 0);
    ck_assert_uint_eq(q.bytes, 0);
    ck_assert_ptr_null(q.u.ring);
    ck_assert_uint_eq(q.cap, 0);
    for (int i = 0; i < N; i++) {
        ck_assert_uint_eq(msgs[i]->refs, 1);
        hub_msg_unref(msgs[i]);
    }
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("msg");
    TCase *tc = tcase_create("msg");
    tcase_add_test(tc, t_small_frame_header);
    tcase_add_test(tc, t_frame_length_encodings);
    tcase_add_test(tc, t_close_frame);
    tcase_add_test(tc, t_delivery_frame);
    suite_add_tcase(s, tc);
    tc = tcase_create("queue");
    tcase_add_test(tc, t_queue_fifo_and_bytes);
    tcase_add_test(tc, t_queue_wraps_and_grows);
    tcase_add_test(tc, t_queue_inline_slot);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
