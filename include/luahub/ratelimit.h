/* Rate limits: token buckets (per connection: commands, publishes) and the
 * per-address table of connections (max_connections_per_ip,
 * connect_rate_per_ip). Pure bookkeeping on times the caller gives: no
 * clock, no I/O. Ownership: the table owns its entries; callers own the
 * buckets they embed. No callbacks. */
#ifndef LUAHUB_RATELIMIT_H
#define LUAHUB_RATELIMIT_H

#include <stddef.h>
#include <stdint.h>

#include "luahub/hash.h"
#include "luahub/netaddr.h"

/* A token bucket: `rate` tokens per second, at most `burst`. Zeroed: full. */
/* 8 bytes: two in every connection. Times are ms modulo 2^32: a bucket
 * left partly used and then untouched for 24 days or more refills nothing
 * that once (one more retry_in_ms, of at most burst/rate). */
struct hub_bucket {
    uint32_t used;          /* thousandths of a token spent and not yet refilled */
    uint32_t last_ms;       /* when `used` was last brought up to date (mod 2^32) */
};

/* Takes one token at `now_ms`. Returns 0 when there was one, else the
 * milliseconds until there will be (nothing is taken). rate 0: no limit. */
uint64_t hub_bucket_take(struct hub_bucket *b, uint32_t rate, uint32_t burst, uint64_t now_ms);

/* 1 when the bucket is full again at `now_ms` (nothing to remember). */
int hub_bucket_full(struct hub_bucket *b, uint32_t rate, uint64_t now_ms);

struct hub_iplimit {
    struct hub_htable t;    /* struct hub_ipentry by address */
    uint32_t max_conns;     /* per address; 0: no limit */
    uint32_t rate;          /* new connections per second per address; 0: no limit */
    uint64_t refused_conns, refused_rate;
};

/* A connection from `ip` is about to open at `now_ms`: 0 (counted: call
 * hub_iplimit_close for it later), or -1 with the reason in why[0..n). */
int hub_iplimit_open(struct hub_iplimit *l, const struct hub_ip *ip, uint64_t now_ms,
                     char *why, size_t n);

/* A connection counted by hub_iplimit_open closed. */
void hub_iplimit_close(struct hub_iplimit *l, const struct hub_ip *ip, uint64_t now_ms);

/* Drops the entries with no connection and a full bucket. */
void hub_iplimit_sweep(struct hub_iplimit *l, uint64_t now_ms);

/* Addresses remembered (a gauge). */
static inline size_t hub_iplimit_size(const struct hub_iplimit *l)
{
    return l->t.n;
}

void hub_iplimit_free(struct hub_iplimit *l);

#endif
