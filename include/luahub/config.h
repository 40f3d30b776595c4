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
    char *listen_plain;             /* a second, plain listener beside a TLS one; NULL: none */
    char *listen_plain_host;
    int listen_plain_port;
    char *tls_cert;                 /* PEM chain (leaf first), resolved; NULL: no TLS */
    char *tls_key;                  /* PEM private key of tls_cert, resolved */
    char *tls_client_ca;            /* PEM CA certificates: clients must present a
                                     * certificate they signed (mutual TLS); NULL: none */

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
    uint64_t rx_buffer_size;        /* lws read buffer per connection; 512 */
    char *static_dir;               /* absolute or resolved against dir; NULL = none */
    int log_level;                  /* HUB_LOG_* ; "info" */

    char *policy;                   /* Lua policy file, resolved against dir; NULL = built-in */
    uint64_t lua_max_instructions;  /* per hook call; 1,000,000 */
    uint64_t lua_max_memory;        /* whole state; 64 MiB */

    char *broker;                   /* "memory", or redis URLs separated by spaces */
    char *redis_prefix;             /* "luahub:" */
    uint32_t workers;               /* worker processes; 0 = one per core ("auto") */
    char *policy_vars;              /* JSON object the policy sees as hub.vars, or NULL */

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

/* Appends to `names` (", "-separated) the keys whose values differ between
 * `a` and `b`, but `except` (may be NULL), and listen when a->listen_set. */
void hub_config_changed(const struct hub_config *a, const struct hub_config *b,
                        const char *except, struct hub_buf *names);

void hub_config_free(struct hub_config *c);
void hub_config_errors_free(struct hub_config_errors *e);

#endif
