/* Private to the broker implementations (broker.c, broker_memory.c,
 * broker_redis*.c): the parsed form of a broker URL and the constructors.
 * Not a public contract. */
#ifndef LUAHUB_BROKER_IMPL_H
#define LUAHUB_BROKER_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/broker.h"

/* Defaults of the per-server options (query parameters of a redis URL). */
#define HUB_REDIS_DEFAULT_PORT 6379
#define HUB_REDIS_CONNECT_TIMEOUT_MS 2000u
#define HUB_REDIS_COMMAND_TIMEOUT_MS 2000u
#define HUB_REDIS_MAX_PENDING 10000u
#define HUB_REDIS_MAX_PENDING_BYTES ((size_t)16 << 20)

/* One "redis://..." item of a broker URL. Strings are owned (hub_xstrdup). */
struct hub_redis_url {
    char *host;                 /* name, IPv4 or IPv6 literal (no brackets) */
    int port;
    char *user;                 /* NULL: AUTH password (Redis < 6 form) */
    char *password;             /* NULL: no AUTH */
    int db;                     /* SELECT when > 0 */
    unsigned connect_timeout_ms;
    unsigned command_timeout_ms;
    unsigned max_pending;       /* PUBLISHes awaiting a reply */
    size_t max_pending_bytes;   /* their bytes, and hiredis' output buffer */
};

void hub_redis_url_free(struct hub_redis_url *u, size_t n);

/* Constructors behind hub_broker_new(). hub_broker_redis_new takes ownership
 * of `urls` (n >= 1 entries). Both return a new broker (never NULL). */
struct hub_broker *hub_broker_memory_new(uv_loop_t *loop, hub_broker_deliver_fn deliver,
                                         hub_broker_health_fn health, void *ud);
struct hub_broker *hub_broker_redis_new(uv_loop_t *loop, struct hub_redis_url *urls, size_t n,
                                        const char *prefix, hub_broker_deliver_fn deliver,
                                        hub_broker_health_fn health, void *ud);

#endif
