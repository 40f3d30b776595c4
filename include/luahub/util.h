/* Small helpers shared by every module: checked allocation, growable byte
 * buffers and JSON string escaping.
 *
 * Ownership: a struct hub_buf owns its bytes until hub_buf_free(); the
 * allocation helpers return memory the caller frees. No callbacks. */
#ifndef LUAHUB_UTIL_H
#define LUAHUB_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* The struct of type `type` whose field `member` is at `ptr`. */
#define hub_container_of(ptr, type, member) \
    ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

/* The number of elements of array `a` (an array, not a pointer). */
#define hub_countof(a) (sizeof(a) / sizeof((a)[0]))

/* Writes `nbytes` random bytes (getrandom; the clock and pid if that
 * fails) as 2 * nbytes hex digits and a NUL into out. */
void hub_random_hex(char *out, size_t nbytes);

/* Out of memory at allocation is fatal: these never return NULL. */
void *hub_xmalloc(size_t n);
void *hub_xcalloc(size_t n, size_t size);
void *hub_xrealloc(void *p, size_t n);
char *hub_xstrdup(const char *s);
char *hub_xstrndup(const char *s, size_t n);

/* A growable byte buffer. Zero-initialise, then append. Always NUL-terminated
 * after the first append, so `p` can be used as a C string when the content
 * has no NUL. */
struct hub_buf {
    char *p;
    size_t len;
    size_t cap;
};

void hub_buf_reserve(struct hub_buf *b, size_t extra);
void hub_buf_append(struct hub_buf *b, const void *p, size_t n);
void hub_buf_appends(struct hub_buf *b, const char *s);
void hub_buf_printf(struct hub_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Appends `s` as a quoted JSON string, escaping what RFC 8259 requires.
 * Bytes >= 0x80 are copied as they are (the caller gives UTF-8). */
void hub_buf_append_json_string(struct hub_buf *b, const char *s, size_t n);
void hub_buf_reset(struct hub_buf *b);  /* len = 0, keeps the memory */
void hub_buf_free(struct hub_buf *b);

/* Monotonic clock in nanoseconds / milliseconds. */
uint64_t hub_now_ns(void);
uint64_t hub_now_ms(void);

#endif
