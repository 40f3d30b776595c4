/* The options of a channel, from the conf's `channels` patterns: what
 * the conf loader fills (config.h), the hub applies and the brokers keep
 * (history, presence). Plain data: no functions, no ownership beyond the
 * conf that holds them. */
#ifndef LUAHUB_CHANOPT_H
#define LUAHUB_CHANOPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Options of the channels matching one pattern of the conf's `channels`. */
struct hub_channel_opts {
    char *pattern;                  /* as written: "room:*", "lobby", "*" */
    size_t len;                     /* bytes that must match (without the '*') */
    bool prefix;                    /* ends with '*': a prefix of the name */
    uint32_t history_size;          /* messages kept; 0 = no history (no offsets) */
    uint32_t history_ttl;           /* s the messages are kept after the
                                     * channel's last publish */
    bool presence;                  /* who is subscribed can be asked */
    bool join_leave;                /* subscribers get join and leave events */
};

#define HUB_HISTORY_TTL_DEFAULT 3600

#endif
