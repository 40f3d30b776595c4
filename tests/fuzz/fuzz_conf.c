/* Fuzz target: the conf loader (src/config.c, config_keys.c and the
 * `channels` key's source scanner in config_channels.c) and the reload
 * (config_reload.c).
 *
 * The input is a conf file: it is written to a file in a directory of the
 * target's own (which also holds policy.lua, static/ and www/, so that relative
 * paths can resolve) and loaded with hub_config_load, exactly as the hub
 * loads its conf. Checks: -1 comes with at least one message and 0 with
 * none; every message starts with the file's path; a conf that loads is
 * one the hub can run with (a valid broker URL, policy_vars that are JSON,
 * listen parsed, `channels` patterns that are valid, unique and found by
 * hub_config_channel). */
#include <limits.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"
#include "luahub/broker.h"
#include "luahub/config.h"
#include "luahub/log.h"
#include "luahub/proto.h"

static char path[PATH_MAX];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char p[PATH_MAX];
    const char *dir = fuzz_tmpdir();

    (void)argc;
    (void)argv;
    hub_log_set_level(HUB_LOG_ERROR);
    snprintf(path, sizeof(path), "%s/luahub.conf", dir);
    snprintf(p, sizeof(p), "%s/policy.lua", dir);
    fuzz_write_file(p, "function on_subscribe(conn, channel) return true end\n", 53);
    snprintf(p, sizeof(p), "%s/static", dir);
    FUZZ_CHECK(mkdir(p, 0700) == 0, "mkdir %s", p);
    snprintf(p, sizeof(p), "%s/www", dir);
    FUZZ_CHECK(mkdir(p, 0700) == 0, "mkdir %s", p);
    return 0;
}

/* The channel a pattern stands for: the prefix, plus a byte if it has '*'. */
static void check_channels(const struct hub_config *c)
{
    char name[HUB_CHANNEL_MAX + 1];

    FUZZ_CHECK(c->nchannels <= 1000, "%zu patterns", c->nchannels);
    for (size_t i = 0; i < c->nchannels; i++) {
        const struct hub_channel_opts *o = &c->channels[i];
        size_t plen = strlen(o->pattern);
        FUZZ_CHECK(plen == o->len + o->prefix, "pattern '%s': len %zu", o->pattern, o->len);
        FUZZ_CHECK(!o->prefix || o->pattern[o->len] == '*', "prefix pattern without '*'");
        FUZZ_CHECK(o->len == 0 || hub_proto_channel_valid(o->pattern, o->len),
                   "pattern '%s' is not a channel name", o->pattern);
        FUZZ_CHECK(o->len > 0 || o->prefix, "empty exact pattern");
        FUZZ_CHECK(!o->join_leave || o->presence, "join_leave without presence");
        FUZZ_CHECK(o->history_size <= 100000 && o->history_ttl <= 2592000,
                   "history_size %u, history_ttl %u", o->history_size, o->history_ttl);
        for (size_t k = 0; k < i; k++)
            FUZZ_CHECK(strcmp(c->channels[k].pattern, o->pattern) != 0,
                       "pattern '%s' kept twice", o->pattern);

        size_t n = o->len;
        memcpy(name, o->pattern, n);
        if (o->prefix && n < HUB_CHANNEL_MAX)
            name[n++] = 'z';
        if (n == 0)
            continue;
        const struct hub_channel_opts *r = hub_config_channel(c, name, n);
        FUZZ_CHECK(r != NULL, "no options for '%.*s', which '%s' matches", (int)n, name,
                   o->pattern);
        FUZZ_CHECK(r->prefix ? n >= r->len && !memcmp(r->pattern, name, r->len)
                             : n == r->len && !memcmp(r->pattern, name, n),
                   "'%.*s' got the options of '%s'", (int)n, name, r->pattern);
        /* the exact pattern wins, else the longest prefix */
        FUZZ_CHECK(o->prefix || r == o, "'%s' got the options of '%s'", o->pattern,
                   r->pattern);
        FUZZ_CHECK(!r->prefix || r->len >= o->len, "'%.*s' got '%s', shorter than '%s'",
                   (int)n, name, r->pattern, o->pattern);
    }
}

static void check_loaded(struct hub_config *c)
{
    char err[256];
    struct hub_config d;
    struct hub_buf applied = {0}, restart = {0};

    FUZZ_CHECK(c->listen && c->listen_host && c->listen_port >= 0 &&
               c->listen_port <= 65535, "listen");
    FUZZ_CHECK(c->websocket_path && c->websocket_path[0] == '/', "websocket_path");
    FUZZ_CHECK(c->broker && hub_broker_url_valid(c->broker, err, sizeof(err)) == 0,
               "the conf loaded with a broker URL that does not parse: %s", err);
    if (c->policy_vars)
        FUZZ_CHECK(hub_proto_json_valid(c->policy_vars, strlen(c->policy_vars)) &&
                   c->policy_vars[0] == '{', "policy_vars is not a JSON object: %s",
                   c->policy_vars);
    FUZZ_CHECK(c->max_queue_bytes >= c->max_message_size, "queue smaller than a message");
    check_channels(c);
    /* a reload from the defaults to this conf, then undone: each key's
     * value changes hands twice and is freed once */
    hub_config_defaults(&d);
    uint64_t keys = hub_config_reload(&d, c, NULL, NULL, &applied, &restart);
    FUZZ_CHECK(!keys == !applied.len, "keys exchanged %llx, applied '%.*s'",
               (unsigned long long)keys, (int)applied.len, applied.p ? applied.p : "");
    hub_config_swap(&d, c, keys);
    hub_config_free(&d);
    hub_buf_free(&applied);
    hub_buf_free(&restart);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct hub_config c;
    struct hub_config_errors errs = {0};

    fuzz_write_file(path, data, size);
    hub_config_defaults(&c);
    int rc = hub_config_load(&c, path, &errs);
    FUZZ_CHECK(rc == 0 || rc == -1, "hub_config_load returned %d", rc);
    FUZZ_CHECK(rc == 0 ? errs.n == 0 : errs.n > 0, "rc %d with %u messages", rc, errs.n);
    for (unsigned i = 0; i < errs.n; i++)
        FUZZ_CHECK(!strncmp(errs.v[i], path, strlen(path)) && errs.v[i][strlen(path)] == ':',
                   "message without the file name: %s", errs.v[i]);
    if (rc == 0)
        check_loaded(&c);
    hub_config_errors_free(&errs);
    hub_config_free(&c);
    return 0;
}
