/* Shared by the libFuzzer targets of tests/fuzz (see README.md there).
 *
 * A target calls the real library code on the fuzz input and checks what
 * the code promises (its header's contract, docs/protocol.md, docs/lua.md)
 * beyond "no crash": a broken promise aborts, and libFuzzer reports it
 * like a crash, with the input and the stack. */
#ifndef LUAHUB_FUZZ_H
#define LUAHUB_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Aborts with the failed condition and a message when `cond` is false. */
#define FUZZ_CHECK(cond, ...)                                                  \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "\nfuzz check failed at %s:%d: %s\n  ", __FILE__,  \
                    __LINE__, #cond);                                          \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* 1 if s[0..n) is valid UTF-8 (RFC 3629, table 3-7 of Unicode): written
 * apart from src/proto.c's scanner, to check it. */
int fuzz_utf8_valid(const void *s, size_t n);

/* 1 if `check` is named in the environment variable FUZZ_SKIP (a list
 * separated by commas): a check of a known bug, reported and not yet fixed,
 * that a long run may turn off so that the fuzzer can look past it. `make
 * test` never sets it. */
int fuzz_skip(const char *check);

/* A directory of this process's own (mkdtemp under $TMPDIR, else
 * /dev/shm, else /tmp), removed with everything in it at exit. Returns its
 * path (static). */
const char *fuzz_tmpdir(void);

/* Writes `n` bytes to `path` (created or truncated); aborts on failure. */
void fuzz_write_file(const char *path, const void *p, size_t n);

#endif
