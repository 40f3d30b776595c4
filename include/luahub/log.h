/* Levelled logging to stderr: one line per event, "TIME LEVEL message".
 * Objects are named by stable tags such as "[conn 42]", never by pointer.
 *
 * No ownership: messages are formatted and written at once. Safe from
 * any code on the loop thread, not from signal handlers. */
#ifndef LUAHUB_LOG_H
#define LUAHUB_LOG_H

#include <stddef.h>

enum hub_log_level {
    HUB_LOG_ERROR = 0,
    HUB_LOG_WARN,
    HUB_LOG_INFO,
    HUB_LOG_DEBUG,
};

/* OR'ed into a level: printed whatever log_level says (the startup line
 * that names the bound address, which scripts and tests parse). */
#define HUB_LOG_ALWAYS 0x100

/* Lines above this level are dropped. Default HUB_LOG_INFO. */
void hub_log_set_level(int level);
int hub_log_get_level(void);

/* Parses "error", "warn", "info" or "debug". Returns the level or -1. */
int hub_log_level_parse(const char *name);
const char *hub_log_level_name(int level);

/* A tag put in front of every message, e.g. "worker 2" (NULL: none). */
void hub_log_set_tag(const char *tag);

/* Sends the lines to `fn` instead of stderr (NULL: stderr again): `msg` is
 * the message without time, level and tag, valid during the call. For
 * `luahub test`, which shows the log of a failing test. */
typedef void (*hub_log_sink_fn)(void *ud, int level, const char *msg, size_t len);
void hub_log_set_sink(hub_log_sink_fn fn, void *ud);

/* Writes one line (a trailing newline is added). Safe from any callback. */
void hub_log(int level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define hub_log_enabled(level) ((level) <= hub_log_get_level())

#endif
