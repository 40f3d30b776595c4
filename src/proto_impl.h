/* Private to the protocol codec (proto.c, proto_text.c, proto_encode.c).
 * Not a public contract. */
#ifndef LUAHUB_PROTO_IMPL_H
#define LUAHUB_PROTO_IMPL_H

#include <stddef.h>

#include "luahub/proto.h"

/* Fills `err` (code and formatted message) and returns -1. */
int hub_proto_fail(struct hub_proto_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The offset of the first byte of s[0..n) that is not UTF-8 or is \v or \f
 * (JSON whitespace is narrower than yajl's), or n; *utf8 says which. */
size_t hub_proto_scan_text(const unsigned char *s, size_t n, int *utf8);

/* hub_proto_channel_valid() that says which rule failed, `where` naming
 * the place ("" or " in channels[3]"). Returns 0 or -1 with `err` filled. */
int hub_proto_chan_check(const char *p, size_t len, const char *where,
                         struct hub_proto_error *err);

#endif
