/* The conf file: Lua syntax evaluated in an empty sandbox (no libraries, an
 * instruction budget and a memory cap), made only of assignments of known
 * keys. Every problem is reported as "FILE:LINE: message". Loading does
 * file I/O and nothing else; no loop, no logging.
 *
 * Ownership: a struct hub_config owns its strings (hub_config_free); a
 * struct hub_config_errors owns its messages (hub_config_errors_free). No
 * callbacks. */
#ifndef LUAHUB_CONFIG_H
#define LUAHUB_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "luahub/chanopt.h"
#include "luahub/util.h"

struct hub_config {
    char *path;                     /* the conf file read, or NULL (built-in defaults) */
    char *dir;                      /* its directory: relative paths resolve against it */

    char *listen;                   /* "0.0.0.0:8080" */
    bool listen_set;                /* given on the command line (--listen) */
    char *listen_host;              /* host part: "0.0.0.0", "127.0.0.1", "::", "localhost" ... */
    int listen_port;                /* 0..65535; 0 = any free port */
    char *websocket_path;           /* "/ws" */
    char *api_key;                  /* NULL: API answers loopback peers only */

    uint64_t max_message_size;      /* 65536 */
    uint64_t max_queue_bytes;       /* 1 MiB */
    uint32_t max_channels_per_conn; /* 128 */
    uint32_t max_connections;       /* 0 = unlimited */
    uint32_t max_protocol_errors;   /* 10: errors within 10 s that close with 4008 */
    uint32_t ping_interval;         /* 25 s */
    uint32_t ping_timeout;          /* 10 s */
    uint32_t shutdown_timeout;      /* 5 s */
    uint32_t request_timeout;       /* 10 s: an HTTP request head (and body) must arrive within it */
    uint32_t http_idle_timeout;     /* 60 s: a keep-alive HTTP connection may idle this long */
    uint32_t write_delay;           /* ms between flushes under load; 0 = adaptive */
    uint32_t write_pause_max;       /* ms an adaptive pause lasts at most; 0: no pauses */
    uint64_t rx_buffer_size;        /* lws read buffer per connection; 512 */
    char *static_dir;               /* absolute or resolved against dir; NULL = none */
    int log_level;                  /* HUB_LOG_* ; "info" */

    char *policy;                   /* Lua policy file, resolved against dir; NULL = built-in */
    char *policy_path;              /* directory require() loads modules from, resolved;
                                     * NULL: the policy file's directory */
    uint64_t lua_max_instructions;  /* per hook call; 1,000,000 */
    uint64_t lua_max_memory;        /* whole state; 64 MiB */

    char *broker;                   /* "memory", or redis URLs separated by spaces */
    char *redis_prefix;             /* "luahub:" */
    uint32_t workers;               /* worker processes; 0 = one per core ("auto") */
    char *policy_vars;              /* JSON object the policy sees as hub.vars, or NULL */
    char *jwt_keys;                 /* key files of hub.jwt_verify (PEM or JWKS), resolved,
                                     * one per line; NULL: none */

    char *allowed_origins;          /* origins browsers may connect from, space-separated;
                                     * NULL: the request's own host only */
    char *trusted_proxies;          /* CIDRs whose X-Forwarded-For is believed, space-separated */
    uint32_t command_rate;          /* commands per second per connection; 0 = no limit */
    uint32_t command_burst;
    uint32_t publish_rate;          /* publishes per second per connection; 0 = no limit */
    uint32_t publish_burst;
    uint32_t max_connections_per_ip; /* 0 = no limit */
    uint32_t connect_rate_per_ip;   /* new connections per second per address; 0 = no limit */

    struct hub_channel_opts *channels; /* the `channels` patterns; NULL: none */
    size_t nchannels;
    uint32_t recover_max;           /* messages one recovery, rewind or history call
                                     * may return; 300 */
    uint32_t presence_max;          /* clients one presence answer lists; 1000 */
    uint32_t presence_ttl;          /* s: a presence entry not refreshed is gone; 60 */
};

/* Every problem found, as "FILE:LINE: message" strings. */
struct hub_config_errors {
    char **v;
    unsigned n;
};

/* Fills `c` with the defaults. `c` owns its strings afterwards. */
void hub_config_defaults(struct hub_config *c);

/* Reads and validates the conf file at `path` on top of the defaults in `c`.
 * Returns 0, or -1 with every problem appended to `errs` (unknown key, wrong
 * type, out-of-range value, bad listen address, syntax error, runaway loop,
 * memory bomb, unreadable file). On -1, `c` holds defaults plus whatever
 * valid keys were read; the caller must not run with it. */
int hub_config_load(struct hub_config *c, const char *path,
                    struct hub_config_errors *errs);

/* Parses "HOST:PORT" ("[::1]:8080" for IPv6) into c->listen*. Returns 0, or
 * -1 with a message in `err`. Used for the conf key and for --listen. */
int hub_config_set_listen(struct hub_config *c, const char *s,
                          char *err, size_t errlen);

/* The options of channel `name` (name[0..len)): its exact pattern, else
 * the longest prefix pattern it starts with; NULL when none matches (no
 * history, no presence). Borrowed from `c`. */
const struct hub_channel_opts *hub_config_channel(const struct hub_config *c,
                                                  const char *name, size_t len);

/* A reload (SIGHUP, POST /api/reload) of the conf file: for each key
 * whose value differs between `live` (the running conf) and `fresh` (the
 * same file loaded again), a key a reload applies (docs/config.md,
 * "Reload") has its value exchanged between the two, so that `live` holds
 * the new one and `fresh` the old, and its name is appended to `applied`;
 * `veto(ud, key)` (may be NULL) may refuse that for a key (returns 1).
 * The names of the other keys that differ are appended to `restart`
 * (", "-separated; listen not when live->listen_set). Returns the set of
 * keys exchanged, for hub_config_swap to undo. */
uint64_t hub_config_reload(struct hub_config *live, struct hub_config *fresh,
                           int (*veto)(void *ud, const char *key), void *ud,
                           struct hub_buf *applied, struct hub_buf *restart);

/* Exchanges the values of the keys in `keys` (as returned by
 * hub_config_reload) between `a` and `b`. */
void hub_config_swap(struct hub_config *a, struct hub_config *b, uint64_t keys);

/* The name among n[0], n[stride], ... (n entries; each a const char *
 * at that byte offset, e.g. the name field of a table of structs) within
 * two edits of `name` and not most of it, or NULL: "did you mean". */
const char *hub_conf_near(const char *name, const char *const *names, size_t n,
                          size_t stride);

void hub_config_free(struct hub_config *c);
void hub_config_errors_free(struct hub_config_errors *e);

#endif
