/* One convention for fallible calls (libuv's UV_ERRNO_MAP): a function
 * returns 0 (or a count, where it says so) on success and a negative
 * HUB_E* code on failure; a status passed to a completion callback uses the
 * same codes. One X-macro table gives each code its value, its name (the
 * wire name where a client sees it) and its text. Codes that come from a
 * system call are not remapped: those functions return -errno and say so.
 *
 * A function that takes a callback and returns an error never calls the
 * callback; one that returns 0 calls it exactly once.
 *
 * No state, no ownership: names and texts are static strings. */
#ifndef LUAHUB_ERROR_H
#define LUAHUB_ERROR_H

#define HUB_ERRNO_MAP(X)                                                                    \
    X(UNAVAILABLE, -1, "unavailable",                                                       \
      "unavailable: not connected, too much pending, timed out or stopped")                 \
    X(CANCELED, -2, "canceled", "canceled before it completed")                             \
    X(LIMIT, -3, "limit_exceeded", "a configured limit was reached")                        \
    X(NOTFOUND, -4, "not_found", "no such object")                                          \
    X(INVAL, -5, "invalid", "invalid argument")                                             \
    X(NOTAVAIL, -6, "not_available", "not available here")                                  \
    X(FAIL, -7, "failed", "failed (the log says why)")

enum hub_errno {
    HUB_OK = 0,
#define HUB_X(name, value, str, text) HUB_E##name = value,
    HUB_ERRNO_MAP(HUB_X)
#undef HUB_X
};

/* "unavailable", ... for a HUB_E* code; "ok" for 0; "unknown" otherwise. */
const char *hub_err_name(int err);
/* A sentence for a HUB_E* code. */
const char *hub_strerror(int err);

#endif
