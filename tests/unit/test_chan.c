/* Channel registry: subscribe/unsubscribe bookkeeping, last-subscriber events,
 * growth and shrinking of the table, and leaving everything at once. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/chan.h"

struct events {
    int last;
    char last_name[64];
};

static void on_last(void *ud, struct hub_chan *c)
{
    struct events *e = ud;
    e->last++;
    snprintf(e->last_name, sizeof(e->last_name), "-%.*s", (int)c->name_len, c->name);
}

static struct hub_chan_registry reg;
static struct events ev;

static void setup(void)
{
    memset(&ev, 0, sizeof(ev));
    hub_chan_registry_init(&reg);
    reg.on_last = on_last;
    reg.ud = &ev;
}

static void teardown(void)
{
    hub_chan_registry_free(&reg);
}

/* True if `owner` is among the channel's subscribers. */
static int has_owner(const struct hub_chan *c, void *owner)
{
    for (uint32_t i = 0; i < c->nsubs; i++)
        if (c->subs[i]->owner == owner)
            return 1;
    return 0;
}

START_TEST(t_subscribe_creates_channel)
{
    struct hub_sub *a = NULL;
    int owner;

    ck_assert_ptr_null(hub_chan_find(&reg, "room:1", 6));
    ck_assert_int_eq(hub_chan_subscribe(&reg, &a, &owner, "room:1", 6), 1);
    struct hub_chan *c = hub_chan_find(&reg, "room:1", 6);
    ck_assert_ptr_nonnull(c);
    ck_assert_str_eq(c->name, "room:1");
    ck_assert_uint_eq(c->nsubs, 1);
    ck_assert(has_owner(c, &owner));
    ck_assert_int_eq(ev.last, 0);
    ck_assert_uint_eq(hub_chan_count_channels(&reg), 1);
    ck_assert_uint_eq(reg.nsubs, 1);
    hub_chan_unsubscribe_all(&reg, &a);
}
END_TEST

START_TEST(t_subscribe_twice_is_idempotent)
{
    struct hub_sub *a = NULL;
    int owner;

    ck_assert_int_eq(hub_chan_subscribe(&reg, &a, &owner, "x", 1), 1);
    ck_assert_int_eq(hub_chan_subscribe(&reg, &a, &owner, "x", 1), 0);
    ck_assert_uint_eq(hub_chan_find(&reg, "x", 1)->nsubs, 1);
    ck_assert_uint_eq(hub_chan_count(a), 1);
    ck_assert_uint_eq(hub_chan_count_channels(&reg), 1);
    hub_chan_unsubscribe_all(&reg, &a);
}
END_TEST

START_TEST(t_unsubscribe_last_frees_channel)
{
    struct hub_sub *a = NULL, *b = NULL;
    int oa, ob;

    hub_chan_subscribe(&reg, &a, &oa, "c", 1);
    hub_chan_subscribe(&reg, &b, &ob, "c", 1);
    ck_assert_int_eq(hub_chan_unsubscribe(&reg, &a, "c", 1), 0);
    ck_assert_int_eq(ev.last, 0);
    struct hub_chan *c = hub_chan_find(&reg, "c", 1);
    ck_assert_uint_eq(c->nsubs, 1);
    ck_assert(has_owner(c, &ob));
    ck_assert(!has_owner(c, &oa));
    ck_assert_int_eq(hub_chan_unsubscribe(&reg, &b, "c", 1), 0);
    ck_assert_int_eq(ev.last, 1);
    ck_assert_str_eq(ev.last_name, "-c");
    ck_assert_ptr_null(hub_chan_find(&reg, "c", 1));
    ck_assert_uint_eq(hub_chan_count_channels(&reg), 0);
    ck_assert_uint_eq(reg.nsubs, 0);
    ck_assert_ptr_null(a);
    ck_assert_ptr_null(b);
}
END_TEST

START_TEST(t_unsubscribe_not_subscribed)
{
    struct hub_sub *a = NULL, *b = NULL;
    int oa, ob;

    ck_assert_int_eq(hub_chan_unsubscribe(&reg, &a, "nope", 4), HUB_ENOTFOUND);
    hub_chan_subscribe(&reg, &a, &oa, "c", 1);
    /* The channel exists but b is not in it. */
    ck_assert_int_eq(hub_chan_unsubscribe(&reg, &b, "c", 1), HUB_ENOTFOUND);
    ck_assert_uint_eq(hub_chan_find(&reg, "c", 1)->nsubs, 1);
    hub_chan_unsubscribe_all(&reg, &a);
    (void)ob;
}
END_TEST

START_TEST(t_names_are_exact)
{
    struct hub_sub *a = NULL;
    int o;

    hub_chan_subscribe(&reg, &a, &o, "ab", 2);
    ck_assert_ptr_null(hub_chan_find(&reg, "a", 1));
    ck_assert_ptr_null(hub_chan_find(&reg, "abc", 3));
    ck_assert_ptr_null(hub_chan_find(&reg, "AB", 2));
    ck_assert_ptr_nonnull(hub_chan_find(&reg, "ab", 2));
    hub_chan_unsubscribe_all(&reg, &a);
}
END_TEST

/* Many owners on many channels, then removal in a scattered order: the
 * swap-remove bookkeeping (idx) must stay consistent. */
START_TEST(t_many_owners_consistent)
{
    enum { OWNERS = 300, CHANS = 37 };
    static struct hub_sub *lists[OWNERS];
    static int owners[OWNERS];
    char name[32];

    memset(lists, 0, sizeof(lists));
    for (int i = 0; i < OWNERS; i++)
        for (int k = 0; k < 3; k++) {
            int n = snprintf(name, sizeof(name), "ch:%d", (i + k * 11) % CHANS);
            hub_chan_subscribe(&reg, &lists[i], &owners[i], name, (size_t)n);
        }
    ck_assert_uint_eq(hub_chan_count_channels(&reg), CHANS);
    ck_assert_uint_eq(reg.nsubs, OWNERS * 3);

    for (int i = 0; i < OWNERS; i += 2)
        hub_chan_unsubscribe_all(&reg, &lists[i]);
    ck_assert_uint_eq(reg.nsubs, (OWNERS / 2) * 3);

    for (int c = 0; c < CHANS; c++) {
        int n = snprintf(name, sizeof(name), "ch:%d", c);
        struct hub_chan *ch = hub_chan_find(&reg, name, (size_t)n);
        ck_assert_ptr_nonnull(ch);
        for (uint32_t j = 0; j < ch->nsubs; j++) {
            ck_assert_uint_eq(ch->subs[j]->idx, j);
            ck_assert_ptr_eq(ch->subs[j]->chan, ch);
            int idx = (int)((int *)ch->subs[j]->owner - owners);
            ck_assert_int_eq(idx % 2, 1);
        }
    }
    for (int i = 1; i < OWNERS; i += 2)
        hub_chan_unsubscribe_all(&reg, &lists[i]);
    ck_assert_uint_eq(hub_chan_count_channels(&reg), 0);
    ck_assert_int_eq(ev.last, CHANS);
}
END_TEST

/* Enough channels to grow the table several times, then all gone: it
 * shrinks back and lookups keep working throughout. */
START_TEST(t_table_grows_and_shrinks)
{
    enum { N = 5000 };
    struct hub_sub *a = NULL;
    int o;
    char name[32];

    for (int i = 0; i < N; i++) {
        int n = snprintf(name, sizeof(name), "c%d", i);
        ck_assert_int_eq(hub_chan_subscribe(&reg, &a, &o, name, (size_t)n), 1);
    }
    ck_assert_uint_eq(hub_chan_count_channels(&reg), N);
    ck_assert_uint_ge(reg.chans.nb, N);
    for (int i = 0; i < N; i++) {
        int n = snprintf(name, sizeof(name), "c%d", i);
        ck_assert_ptr_nonnull(hub_chan_find(&reg, name, (size_t)n));
    }
    for (int i = 0; i < N - 10; i++) {
        int n = snprintf(name, sizeof(name), "c%d", i);
        ck_assert_int_eq(hub_chan_unsubscribe(&reg, &a, name, (size_t)n), 0);
    }
    ck_assert_uint_eq(hub_chan_count_channels(&reg), 10);
    ck_assert_uint_le(reg.chans.nb, 128);
    for (int i = N - 10; i < N; i++) {
        int n = snprintf(name, sizeof(name), "c%d", i);
        ck_assert_ptr_nonnull(hub_chan_find(&reg, name, (size_t)n));
    }
    ck_assert_uint_eq(hub_chan_count(a), 10);
    hub_chan_unsubscribe_all(&reg, &a);
    ck_assert_uint_eq(hub_chan_count_channels(&reg), 0);
}
END_TEST

/* on_last fires before the channel is freed: a callback that looks the
 * channel up (as the broker will, to unsubscribe upstream) still finds it. */
static struct hub_chan_registry *reenter_reg;
static int reenter_seen;
static void reenter_last(void *ud, struct hub_chan *c)
{
    (void)ud;
    reenter_seen = hub_chan_find(reenter_reg, c->name, c->name_len) == c;
}

START_TEST(t_on_last_sees_channel)
{
    struct hub_sub *a = NULL;
    int o;

    reenter_reg = &reg;
    reg.on_last = reenter_last;
    hub_chan_subscribe(&reg, &a, &o, "z", 1);
    hub_chan_unsubscribe_all(&reg, &a);
    ck_assert_int_eq(reenter_seen, 1);
    ck_assert_ptr_null(hub_chan_find(&reg, "z", 1));
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("chan");
    TCase *tc = tcase_create("registry");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, t_subscribe_creates_channel);
    tcase_add_test(tc, t_subscribe_twice_is_idempotent);
    tcase_add_test(tc, t_unsubscribe_last_frees_channel);
    tcase_add_test(tc, t_unsubscribe_not_subscribed);
    tcase_add_test(tc, t_names_are_exact);
    tcase_add_test(tc, t_many_owners_consistent);
    tcase_add_test(tc, t_table_grows_and_shrinks);
    tcase_add_test(tc, t_on_last_sees_channel);
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
