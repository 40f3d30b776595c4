/* Unit suite: addresses, networks, X-Forwarded-For behind trusted proxies,
 * origins (src/netaddr.c), and the token bucket (src/ratelimit.c). */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "luahub/netaddr.h"
#include "luahub/ratelimit.h"

static struct hub_ip ip_of(const char *s)
{
    struct hub_ip ip;
    ck_assert_msg(hub_ip_parse(s, strlen(s), &ip) == 0, "%s does not parse", s);
    return ip;
}

START_TEST(parse_and_format)
{
    static const struct {
        const char *in, *out;
        int family;
    } ok[] = {
        {"10.0.0.1", "10.0.0.1", 4},     {"::1", "::1", 6},
        {"::ffff:1.2.3.4", "1.2.3.4", 4}, {"2001:db8::7", "2001:db8::7", 6},
    };
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        struct hub_ip ip = ip_of(ok[i].in);
        char out[64];
        hub_ip_format(&ip, out, sizeof out);
        ck_assert_str_eq(out, ok[i].out);
        ck_assert_int_eq(ip.family, ok[i].family);
    }
    static const char *const bad[] = {"", "1.2.3", "1.2.3.4.5", "256.0.0.1", "junk", " 1.2.3.4",
                                      "::g", "1.2.3.4/8"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        struct hub_ip ip;
        ck_assert_msg(hub_ip_parse(bad[i], strlen(bad[i]), &ip) < 0, "%s parsed", bad[i]);
    }
    ck_assert(hub_ip_loopback(&(struct hub_ip){.family = 4, .a = {127, 9, 9, 9}}));
    struct hub_ip one = ip_of("::1"), two = ip_of("::2"), v4 = ip_of("128.0.0.1");
    ck_assert(hub_ip_loopback(&one));
    ck_assert(!hub_ip_loopback(&two));
    ck_assert(!hub_ip_loopback(&v4));
}
END_TEST

START_TEST(cidrs)
{
    struct hub_ip nets[3];
    char err[128];
    ck_assert_int_eq(hub_cidr_parse("10.0.0.0/8", 10, &nets[0], err, sizeof err), 0);
    ck_assert_int_eq(hub_cidr_parse("192.168.1.128/25", 16, &nets[1], err, sizeof err), 0);
    ck_assert_int_eq(hub_cidr_parse("fd00::/8", 8, &nets[2], err, sizeof err), 0);
    static const struct {
        const char *ip;
        int in;
    } cases[] = {
        {"10.255.0.1", 1}, {"11.0.0.1", 0}, {"192.168.1.128", 1}, {"192.168.1.255", 1},
        {"192.168.1.127", 0}, {"fd12::1", 1}, {"fe00::1", 0}, {"::ffff:10.1.1.1", 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        struct hub_ip ip = ip_of(cases[i].ip);
        ck_assert_msg(hub_cidr_match(nets, 3, &ip) == cases[i].in, "%s", cases[i].ip);
    }
    struct hub_ip all;
    ck_assert_int_eq(hub_cidr_parse("0.0.0.0/0", 9, &all, err, sizeof err), 0);
    struct hub_ip any = ip_of("8.8.8.8");
    ck_assert(hub_cidr_match(&all, 1, &any));
    static const char *const bad[] = {"10.0.0.1/8", "10.0.0.0/33", "::/129", "10.0.0.0/",
                                      "10.0.0.0/1x", "x/8", "10.0.0.0/0008"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        struct hub_ip n;
        ck_assert_msg(hub_cidr_parse(bad[i], strlen(bad[i]), &n, err, sizeof err) < 0, "%s",
                      bad[i]);
        ck_assert(err[0]);
    }
}
END_TEST

START_TEST(forwarded_for)
{
    struct hub_ip trusted[2];
    char err[128], out[64];
    hub_cidr_parse("10.0.0.0/8", 10, &trusted[0], err, sizeof err);
    hub_cidr_parse("127.0.0.1", 9, &trusted[1], err, sizeof err);
    struct hub_ip proxy = ip_of("127.0.0.1"), stranger = ip_of("198.51.100.9"), c;
    static const struct {
        const char *xff, *want;
    } cases[] = {
        {"203.0.113.7", "203.0.113.7"},
        {"1.1.1.1, 203.0.113.7", "203.0.113.7"},
        {"1.1.1.1,203.0.113.7,10.0.0.5", "203.0.113.7"},
        {"10.0.0.9, 10.0.0.5", "10.0.0.9"},     /* all trusted: the first */
        {"1.1.1.1, junk, 10.0.0.5", "10.0.0.5"},
        {"junk", "127.0.0.1"},
        {"", "127.0.0.1"},
        {" , ", "127.0.0.1"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        hub_ip_client(&proxy, cases[i].xff, strlen(cases[i].xff), trusted, 2, &c);
        hub_ip_format(&c, out, sizeof out);
        ck_assert_msg(!strcmp(out, cases[i].want), "%s: %s, expected %s", cases[i].xff, out,
                      cases[i].want);
    }
    hub_ip_client(&stranger, "203.0.113.7", 11, trusted, 2, &c);
    hub_ip_format(&c, out, sizeof out);
    ck_assert_str_eq(out, "198.51.100.9");
    hub_ip_client(&proxy, "203.0.113.7", 11, trusted, 0, &c);
    hub_ip_format(&c, out, sizeof out);
    ck_assert_str_eq(out, "127.0.0.1");
    /* a long list of trusted hops: at most HUB_XFF_MAX are walked */
    size_t cap = 100 * 16 + 16, n = 0;
    char *xff = malloc(cap);
    n += (size_t)snprintf(xff, cap, "1.2.3.4");
    for (int i = 0; i < 100; i++)
        n += (size_t)snprintf(xff + n, cap - n, ",10.0.0.%d", i + 1);
    hub_ip_client(&proxy, xff, n, trusted, 2, &c);
    hub_ip_format(&c, out, sizeof out);
    ck_assert_msg(!strncmp(out, "10.0.0.", 7), "%s", out);
    free(xff);
}
END_TEST

START_TEST(origins)
{
    char err[256];
    static const char *const ok[] = {"*", "https://app.example.com", "http://localhost:8080",
                                     "http://[::1]:9000", "HTTPS://A.B"};
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++)
        ck_assert_msg(hub_origin_valid(ok[i], strlen(ok[i]), err, sizeof err) == 0, "%s: %s",
                      ok[i], err);
    static const char *const bad[] = {"example.com", "https://x/", "https://", "ftp://x",
                                      "https://x:0", "https://x:65536", "https://x:8a",
                                      "https://u@x", "https://[::1", "https://[::1]x", "**",
                                      "https://x/path"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        ck_assert_msg(hub_origin_valid(bad[i], strlen(bad[i]), err, sizeof err) < 0, "%s",
                      bad[i]);
}
END_TEST

START_TEST(bucket)
{
    struct hub_bucket b = {0};
    /* 2 per second, bursts of 3: three now, then one every 500 ms */
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(hub_bucket_take(&b, 2, 3, 1000), 0);
    ck_assert_int_eq(hub_bucket_take(&b, 2, 3, 1000), 500);
    ck_assert_int_eq(hub_bucket_take(&b, 2, 3, 1250), 250);
    ck_assert_int_eq(hub_bucket_take(&b, 2, 3, 1500), 0);
    ck_assert_int_eq(hub_bucket_take(&b, 2, 3, 1500), 500);
    ck_assert(!hub_bucket_full(&b, 2, 1500));
    ck_assert(hub_bucket_full(&b, 2, 3000));
    /* rate 0: no limit */
    struct hub_bucket z = {0};
    for (int i = 0; i < 100; i++)
        ck_assert_int_eq(hub_bucket_take(&z, 0, 1, 0), 0);
    /* the clock going back is not a refill */
    struct hub_bucket back = {0};
    ck_assert_int_eq(hub_bucket_take(&back, 1, 1, 5000), 0);
    ck_assert_int_gt(hub_bucket_take(&back, 1, 1, 4000), 0);
}
END_TEST

START_TEST(iplimit)
{
    struct hub_iplimit l = {.max_conns = 2};
    struct hub_ip a = ip_of("203.0.113.1"), b = ip_of("203.0.113.2");
    char why[160];
    ck_assert_int_eq(hub_iplimit_open(&l, &a, 0, why, sizeof why), 0);
    ck_assert_int_eq(hub_iplimit_open(&l, &a, 0, why, sizeof why), 0);
    ck_assert_int_eq(hub_iplimit_open(&l, &a, 0, why, sizeof why), -1);
    ck_assert_ptr_nonnull(strstr(why, "max_connections_per_ip 2"));
    ck_assert_int_eq(hub_iplimit_open(&l, &b, 0, why, sizeof why), 0);
    hub_iplimit_close(&l, &a, 0);
    ck_assert_int_eq(hub_iplimit_open(&l, &a, 0, why, sizeof why), 0);
    hub_iplimit_close(&l, &a, 0);
    hub_iplimit_close(&l, &a, 0);
    hub_iplimit_close(&l, &b, 0);
    ck_assert_uint_eq(hub_iplimit_size(&l), 0);    /* nothing left to remember */
    hub_iplimit_free(&l);

    struct hub_iplimit r = {.rate = 2};
    ck_assert_int_eq(hub_iplimit_open(&r, &a, 100, why, sizeof why), 0);
    ck_assert_int_eq(hub_iplimit_open(&r, &a, 100, why, sizeof why), 0);
    ck_assert_int_eq(hub_iplimit_open(&r, &a, 100, why, sizeof why), -1);
    hub_iplimit_close(&r, &a, 100);
    hub_iplimit_close(&r, &a, 100);
    ck_assert_uint_eq(hub_iplimit_size(&r), 1);    /* its bucket still remembers */
    hub_iplimit_sweep(&r, 5000);
    ck_assert_uint_eq(hub_iplimit_size(&r), 0);
    hub_iplimit_free(&r);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("netaddr");
    TCase *tc = tcase_create("netaddr");
    tcase_add_test(tc, parse_and_format);
    tcase_add_test(tc, cidrs);
    tcase_add_test(tc, forwarded_for);
    tcase_add_test(tc, origins);
    tcase_add_test(tc, bucket);
    tcase_add_test(tc, iplimit);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
