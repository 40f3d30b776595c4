/* The hub core without a transport: clients are fake sinks that record
 * what they were given (and can refuse, like a full queue), the broker is
 * a recording one that delivers at once (what the memory broker does) and
 * counts subscribe/unsubscribe calls. Links no lws: the core is
 * transport-free. Covers fan-out, the first/last transitions that drive
 * the broker, culling, the subscription limit and the id table. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/hub.h"

/* ---- a recording broker ------------------------------------------------- */

struct rec_broker {
    struct hub_broker base;
    int subscribes, unsubscribes, publishes;
    char last_unsubscribed[64];
    int local;
};

static int rb_publish(struct hub_broker *b, const char *ch, size_t len, struct hub_msg *m,
                      const struct hub_channel_opts *o, hub_broker_publish_cb cb, void *ud)
{
    struct rec_broker *r = (struct rec_broker *)b;
    (void)o;
    r->publishes++;
    b->deliver(b->ud, ch, len, m, NULL);
    if (cb)
        cb(ud, HUB_OK, NULL);
    return 0;
}

static void rb_subscribe(struct hub_broker *b, const char *ch, size_t len,
                         hub_broker_subscribe_cb cb, void *ud)
{
    (void)ch;
    (void)len;
    ((struct rec_broker *)b)->subscribes++;
    if (cb)
        cb(ud, HUB_OK);
}

static void rb_unsubscribe(struct hub_broker *b, const char *ch, size_t len)
{
    struct rec_broker *r = (struct rec_broker *)b;
    r->unsubscribes++;
    snprintf(r->last_unsubscribed, sizeof r->last_unsubscribed, "%.*s", (int)len, ch);
}

static int rb_up(const struct hub_broker *b)
{
    (void)b;
    return 1;
}

static void rb_metrics(const struct hub_broker *b, struct hub_buf *out)
{
    (void)b;
    (void)out;
}

static void rb_nop(struct hub_broker *b)
{
    (void)b;
}

static struct hub_broker_ops rb_ops = {
    .name = "recording",
    .publish = rb_publish,
    .subscribe = rb_subscribe,
    .unsubscribe = rb_unsubscribe,
    .up = rb_up,
    .metrics = rb_metrics,
    .stop = rb_nop,
    .free = rb_nop,
};

/* ---- fake session sinks ------------------------------------------------- */

struct sink {
    struct hub_client client;
    int got;                /* deliveries taken */
    int refuse_after;       /* refuse deliveries past this many (-1: never) */
    int culled;
    struct hub_msg *last;   /* a reference to the last delivery */
};

static int sink_deliver(struct hub_client *c, struct hub_msg *m)
{
    struct sink *s = hub_container_of(c, struct sink, client);
    if (s->refuse_after >= 0 && s->got >= s->refuse_after)
        return -1;
    s->got++;
    if (s->last)
        hub_msg_unref(s->last);
    s->last = hub_msg_ref(m);
    return 0;
}

static void sink_culled(struct hub_client *c)
{
    hub_container_of(c, struct sink, client)->culled++;
}

/* Every sink is the anonymous client "x" for presence. */
static void sink_presence(struct hub_client *c, const char **user, size_t *user_len,
                          const char **entry, size_t *entry_len)
{
    (void)c;
    *user = NULL;
    *user_len = 0;
    *entry = "\"client\":\"x\"";
    *entry_len = strlen(*entry);
}

static const struct hub_client_ops sink_ops = {sink_deliver, sink_culled, sink_presence};

static struct hub hub;
static struct hub_config cfg;
static struct rec_broker broker;
static struct sink sinks[4];

static void setup(void)
{
    memset(&broker, 0, sizeof broker);
    rb_ops.local = 0;
    broker.base.ops = &rb_ops;
    broker.base.deliver = hub_deliver;
    broker.base.ud = &hub;
    hub_config_defaults(&cfg);
    cfg.max_channels_per_conn = 3;
    hub_init(&hub, &broker.base, "abc123", &cfg);
    memset(sinks, 0, sizeof sinks);
    for (int i = 0; i < 4; i++) {
        sinks[i].refuse_after = -1;
        hub_client_add(&hub, &sinks[i].client, &sink_ops, hub_next_id(&hub));
    }
}

static void teardown(void)
{
    for (int i = 0; i < 4; i++) {
        hub_client_remove(&hub, &sinks[i].client);
        if (sinks[i].last)
            hub_msg_unref(sinks[i].last);
    }
    hub_free(&hub);
    hub_config_free(&cfg);
}

static void publish(const char *ch, const char *data)
{
    ck_assert_int_eq(hub_publish(&hub, ch, strlen(ch), data, strlen(data), NULL, NULL), 0);
}

START_TEST(fan_out_shares_one_frame)
{
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(hub_subscribe(&hub, &sinks[i].client, "a", 1, NULL, NULL, NULL), 1);
    ck_assert_int_eq(hub_subscribe(&hub, &sinks[3].client, "b", 1, NULL, NULL, NULL), 1);
    publish("a", "1");
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(sinks[i].got, 1);
    ck_assert_int_eq(sinks[3].got, 0);
    /* one encode: every subscriber holds the same frame */
    ck_assert_ptr_eq(sinks[0].last, sinks[1].last);
    ck_assert_ptr_eq(sinks[1].last, sinks[2].last);
    const char *want = "{\"op\":\"message\",\"channel\":\"a\",\"data\":1}";
    ck_assert_uint_eq(sinks[0].last->payload_len, strlen(want));
    ck_assert_mem_eq(hub_msg_payload(sinks[0].last), want, strlen(want));
    ck_assert_uint_eq(hub.deliveries, 3);
    ck_assert_uint_eq(hub.published, 1);
    publish("nobody", "2");
    ck_assert_uint_eq(hub.deliveries, 3);
}
END_TEST

/* Each new subscription asks the broker; only the last one to leave a
 * channel unsubscribes it, whichever way it leaves. */
START_TEST(first_and_last_drive_the_broker)
{
    for (int i = 0; i < 3; i++)
        hub_subscribe(&hub, &sinks[i].client, "a", 1, NULL, NULL, NULL);
    ck_assert_int_eq(hub_subscribe(&hub, &sinks[0].client, "a", 1, NULL, NULL, NULL), 0);
    ck_assert_int_eq(broker.subscribes, 3);
    ck_assert_uint_eq(hub_subscribers(&hub, "a", 1), 3);
    ck_assert_int_eq(hub_unsubscribe(&hub, &sinks[0].client, "a", 1), 0);
    ck_assert_int_eq(hub_unsubscribe(&hub, &sinks[0].client, "a", 1), HUB_ENOTFOUND);
    ck_assert_int_eq(hub_unsubscribe(&hub, &sinks[1].client, "a", 1), 0);
    ck_assert_int_eq(broker.unsubscribes, 0);
    /* the last one leaves by going away */
    hub_client_remove(&hub, &sinks[2].client);
    ck_assert_int_eq(broker.unsubscribes, 1);
    ck_assert_str_eq(broker.last_unsubscribed, "a");
    ck_assert_uint_eq(hub_channels(&hub), 0);
    hub_client_add(&hub, &sinks[2].client, &sink_ops, hub_next_id(&hub));
}
END_TEST

/* A client that cannot take a delivery is culled after the loop: every
 * other subscriber still gets it, the culled one leaves all its channels
 * (the broker hears of the ones it was the last on) and gets nothing more. */
START_TEST(culling_after_the_loop)
{
    for (int i = 0; i < 3; i++)
        hub_subscribe(&hub, &sinks[i].client, "a", 1, NULL, NULL, NULL);
    hub_subscribe(&hub, &sinks[1].client, "only1", 5, NULL, NULL, NULL);
    sinks[1].refuse_after = 1;
    publish("a", "1");
    ck_assert_int_eq(sinks[1].culled, 0);
    publish("a", "2");
    ck_assert_int_eq(sinks[0].got, 2);
    ck_assert_int_eq(sinks[2].got, 2);
    ck_assert_int_eq(sinks[1].got, 1);
    ck_assert_int_eq(sinks[1].culled, 1);
    ck_assert_uint_eq(sinks[1].client.nsubs, 0);
    ck_assert_uint_eq(hub_subscribers(&hub, "a", 1), 2);
    ck_assert_int_eq(broker.unsubscribes, 1);
    ck_assert_str_eq(broker.last_unsubscribed, "only1");
    publish("a", "3");
    ck_assert_int_eq(sinks[1].got, 1);
    ck_assert_int_eq(sinks[1].culled, 1);
    ck_assert_uint_eq(hub.culled, 1);
    /* a cull asked for outside a fan-out (a reply that did not fit) */
    hub_cull(&hub, &sinks[0].client);
    hub_cull(&hub, &sinks[0].client);
    hub_cull_now(&hub);
    ck_assert_int_eq(sinks[0].culled, 1);
    ck_assert_uint_eq(hub_subscribers(&hub, "a", 1), 1);
}
END_TEST

/* A client removed while on the cull list is not culled afterwards. */
START_TEST(removed_before_cull)
{
    hub_subscribe(&hub, &sinks[0].client, "a", 1, NULL, NULL, NULL);
    hub_cull(&hub, &sinks[0].client);
    hub_client_remove(&hub, &sinks[0].client);
    hub_cull_now(&hub);
    ck_assert_int_eq(sinks[0].culled, 0);
    hub_client_add(&hub, &sinks[0].client, &sink_ops, hub_next_id(&hub));
}
END_TEST

START_TEST(subscription_limit)
{
    ck_assert_int_eq(hub_subscribe(&hub, &sinks[0].client, "a", 1, NULL, NULL, NULL), 1);
    ck_assert_int_eq(hub_subscribe(&hub, &sinks[0].client, "b", 1, NULL, NULL, NULL), 1);
    ck_assert_int_eq(hub_subscribe(&hub, &sinks[0].client, "c", 1, NULL, NULL, NULL), 1);
    ck_assert_int_eq(hub_subscribe(&hub, &sinks[0].client, "d", 1, NULL, NULL, NULL), HUB_ELIMIT);
    ck_assert_int_eq(hub_subscribe(&hub, &sinks[0].client, "b", 1, NULL, NULL, NULL), 0);
    ck_assert(hub_subscribed(&hub, &sinks[0].client, "c", 1));
    ck_assert(!hub_subscribed(&hub, &sinks[0].client, "d", 1));
    ck_assert_int_eq(broker.subscribes, 3);
}
END_TEST

START_TEST(id_table_and_names)
{
    char name[64];
    for (int i = 0; i < 4; i++)
        ck_assert_ptr_eq(hub_client_by_id(&hub, (uint64_t)i + 1), &sinks[i].client);
    ck_assert_ptr_null(hub_client_by_id(&hub, 99));
    hub_client_name(&hub, 3, name, sizeof name);
    ck_assert_str_eq(name, "abc123-3");
    ck_assert_ptr_eq(hub_client_by_name(&hub, "abc123-3"), &sinks[2].client);
    static const char *const bad[] = {"abc123-", "abc123-x", "abc123-3x", "zzz-3", "abc1233",
                                      "abc123--3", "abc123-99999999999999999999", ""};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        ck_assert_msg(!hub_client_by_name(&hub, bad[i]), "%s found", bad[i]);
    /* many clients: the table grows and every one is found */
    enum { N = 3000 };
    struct sink *more = calloc(N, sizeof *more);
    for (int i = 0; i < N; i++)
        hub_client_add(&hub, &more[i].client, &sink_ops, hub_next_id(&hub));
    ck_assert_uint_eq(hub_clients(&hub), N + 4);
    for (int i = 0; i < N; i++)
        ck_assert_ptr_eq(hub_client_by_id(&hub, more[i].client.id), &more[i].client);
    for (int i = 0; i < N; i++)
        hub_client_remove(&hub, &more[i].client);
    ck_assert_uint_eq(hub_clients(&hub), 4);
    free(more);
}
END_TEST

/* With a broker local to the process, a channel nobody listens to is not
 * handed to the broker at all. */
START_TEST(local_broker_skips_empty_channels)
{
    rb_ops.local = 1;
    publish("nobody", "1");
    ck_assert_int_eq(broker.publishes, 0);
    hub_subscribe(&hub, &sinks[0].client, "a", 1, NULL, NULL, NULL);
    publish("a", "1");
    ck_assert_int_eq(broker.publishes, 1);
    ck_assert_int_eq(sinks[0].got, 1);
}
END_TEST

static Suite *hub_suite(void)
{
    Suite *s = suite_create("hub");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, fan_out_shares_one_frame);
    tcase_add_test(tc, first_and_last_drive_the_broker);
    tcase_add_test(tc, culling_after_the_loop);
    tcase_add_test(tc, removed_before_cull);
    tcase_add_test(tc, subscription_limit);
    tcase_add_test(tc, id_table_and_names);
    tcase_add_test(tc, local_broker_skips_empty_channels);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(hub_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
