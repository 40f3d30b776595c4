/* Reload of the conf keys: which keys a reload applies live (the rest wait
 * for a restart), comparing each key of two confs by its type, and the
 * swap of the keys that changed (hub_config_reload, hub_config_swap in
 * include/luahub/config.h; docs/config.md, "Reload"). The key table and
 * the checks of each value are config_keys.c. Pure. */
#include "config_impl.h"

#include <stdint.h>
#include <string.h>

_Static_assert(HUB_CONF_MAX_KEYS <= 64, "hub_config_reload returns the keys as 64 bits");

/* The keys a reload applies (docs/config.md, "Reload", says why each one
 * is safe to change live); every other key takes effect at the next
 * start. The policy's keys (policy ... jwt_keys) are read by the new
 * policy a reload builds; the others are read by their modules at each
 * use (log_level and the per-address limits are set by the server). */
static const char *const live_keys[] = {
    "log_level", "policy", "policy_path", "lua_max_instructions", "lua_max_memory",
    "policy_vars", "jwt_keys", "api_key", "allowed_origins", "max_connections",
    "max_protocol_errors", "command_rate", "command_burst", "publish_rate",
    "publish_burst", "max_connections_per_ip", "connect_rate_per_ip", "recover_max",
    "presence_max", "lua_call_timeout", "lua_max_waiting",
};

static int str_eq(const char *a, const char *b)
{
    return a == b || (a && b && !strcmp(a, b));
}

static int channels_eq(const struct hub_config *a, const struct hub_config *b)
{
    if (a->nchannels != b->nchannels)
        return 0;
    for (size_t i = 0; i < a->nchannels; i++) {
        const struct hub_channel_opts *x = &a->channels[i], *y = &b->channels[i];
        if (strcmp(x->pattern, y->pattern) || x->history_size != y->history_size ||
            x->history_ttl != y->history_ttl || x->presence != y->presence ||
            x->join_leave != y->join_leave)
            return 0;
    }
    return 1;
}

/* 1 if the field of `k` is a string (char *). log_level is written as a
 * string but stored as a number: its field is an int. */
static int string_field(const struct key *k)
{
    return (k->kind == K_STRING || k->kind == K_STRINGS || k->kind == K_VARS) &&
           k->width == sizeof(char *);
}

static int same_value(const struct hub_config *a, const struct hub_config *b,
                      const struct key *k)
{
    const char *pa = (const char *)a + k->off, *pb = (const char *)b + k->off;
    if (k->kind == K_CHANNELS)
        return channels_eq(a, b);
    if (string_field(k))
        return str_eq(*(char *const *)(const void *)pa, *(char *const *)(const void *)pb);
    return !memcmp(pa, pb, k->width);
}

static int is_live(const struct key *k)
{
    for (size_t i = 0; i < hub_countof(live_keys); i++)
        if (!strcmp(k->name, live_keys[i]))
            return 1;
    return 0;
}

void hub_config_swap(struct hub_config *a, struct hub_config *b, uint64_t which)
{
    for (size_t i = 0; i < hub_conf_nkeys; i++) {
        const struct key *k = &hub_conf_keys[i];
        if (!(which & (UINT64_C(1) << i)) || k->kind == K_CHANNELS)
            continue;
        unsigned char tmp[sizeof(uint64_t)];
        char *pa = (char *)a + k->off, *pb = (char *)b + k->off;
        memcpy(tmp, pa, k->width);
        memcpy(pa, pb, k->width);
        memcpy(pb, tmp, k->width);
    }
}

uint64_t hub_config_reload(struct hub_config *live, struct hub_config *fresh,
                           int (*veto)(void *ud, const char *key), void *ud,
                           struct hub_buf *applied, struct hub_buf *restart)
{
    uint64_t moved = 0;
    for (size_t i = 0; i < hub_conf_nkeys; i++) {
        const struct key *k = &hub_conf_keys[i];
        if (same_value(live, fresh, k) || (live->listen_set && !strcmp(k->name, "listen")))
            continue;
        if (is_live(k) && !(veto && veto(ud, k->name))) {
            moved |= UINT64_C(1) << i;
            hub_buf_printf(applied, "%s%s", applied->len ? ", " : "", k->name);
        } else {
            hub_buf_printf(restart, "%s%s", restart->len ? ", " : "", k->name);
        }
    }
    hub_config_swap(live, fresh, moved);
    return moved;
}
