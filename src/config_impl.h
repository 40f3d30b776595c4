/* Private to the conf loader (config.c: the Lua sandbox that evaluates the
 * file), the key table (config_keys.c: every key, its type, range, default
 * and check) and the reload (config_reload.c: which keys apply live, the
 * swap). Not a public contract. */
#ifndef LUAHUB_CONFIG_IMPL_H
#define LUAHUB_CONFIG_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "luahub/config.h"
#include "luahub/util.h"

#define KiB ((int64_t)1024)
#define MiB (1024 * KiB)
#define GiB (1024 * MiB)
#define SHOW_MAX 64                      /* bytes of a user string quoted in a message */

enum kind { K_STRING, K_STRINGS, K_INT, K_SIZE, K_SECONDS, K_WORKERS, K_VARS, K_CHANNELS };

struct key;

/* Validates the string value `s` of key `k` and stores it in `c` (which owns
 * the copy). Returns 0, or -1 with the reason in `why` (without the key name).
 * Pure except for the path checks, which stat/open the file system. */
typedef int (*set_fn)(struct hub_config *c, const struct key *k, const char *s,
                      struct hub_buf *why);

struct key {
    const char *name;
    enum kind kind;
    size_t off, width;  /* the field in struct hub_config (numeric kinds and plain strings) */
    int64_t min, max;   /* numeric kinds: inclusive range */
    int64_t def;        /* numeric kinds: default */
    const char *def_s;  /* K_STRING: default, or NULL (unset) */
    set_fn set;         /* K_STRING: validate and store */
};

#define HUB_CONF_MAX_KEYS 64            /* room in the loader's per-key arrays */

/* The key table, in the order keys are documented. */
extern const struct key hub_conf_keys[];
extern const size_t hub_conf_nkeys;

/* The key called `name`, or NULL. */
const struct key *hub_conf_find_key(const char *name);

/* Validates the Lua value at `idx` for key `k` and stores it in `c`.
 * Returns 0, or -1 with the reason in `why`. */
int hub_conf_apply(struct hub_config *c, lua_State *L, int idx, const struct key *k,
                   struct hub_buf *why);

/* Where the checks of a table-valued key report each problem: `line` 0 =
 * the file, else the line the problem is on. */
typedef void (*hub_conf_report_fn)(void *ud, int line, const char *msg);

/* Validates the `channels` table at `idx` and stores it in `c` (config_channels.c).
 * `src` is the conf's text (scanned for the lines of patterns and options,
 * and for patterns written twice); `line` is the assignment's. Returns 0,
 * or -1 after reporting every problem through `fn`. Never raises. */
int hub_conf_channels_apply(struct hub_config *c, lua_State *L, int idx, const char *src,
                            size_t srclen, int line, hub_conf_report_fn fn, void *ud);
void hub_config_channels_free(struct hub_config *c);

/* Appends a size in bytes the way the conf writes it ("64MiB", "1000"). */
void hub_conf_append_size(struct hub_buf *b, int64_t v);

/* Appends s[0..n) between quotes `q`, shortened to SHOW_MAX bytes and with
 * control bytes escaped: a user string shown in a message. */
void hub_conf_append_q(struct hub_buf *b, const char *s, size_t n, char q);

#endif
