/* The text rules of protocol v1 that yajl does not check: channel names,
 * UTF-8 (include/luahub/proto.h); and the error filler the decoder shares.
 * Pure. */
#include "luahub/proto.h"
#include "proto_impl.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

__attribute__((format(printf, 3, 4)))
int hub_proto_fail(struct hub_proto_error *err, int code, const char *fmt, ...)
{
    va_list ap;
    err->code = code;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    return -1;
}

/* ---- channel names ---- */

static const unsigned char chan_ok[256] = {
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1,
    ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1,
    ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1,
    ['V'] = 1, ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1,
    ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1,
    ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1,
    ['v'] = 1, ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1,
    ['7'] = 1, ['8'] = 1, ['9'] = 1,
    ['_'] = 1, [':'] = 1, ['.'] = 1, ['@'] = 1, ['/'] = 1, ['='] = 1, ['#'] = 1,
    ['-'] = 1,
};

int hub_proto_channel_valid(const char *p, size_t len)
{
    if (len == 0 || len > HUB_CHANNEL_MAX)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!chan_ok[(unsigned char)p[i]])
            return 0;
    return 1;
}

/* hub_proto_channel_valid() that says which rule failed. `where` prefixes
 * the message ("" or " in 'channels' entry 3"). Never echoes the raw byte
 * unless it is printable ASCII. */
int hub_proto_chan_check(const char *p, size_t len, const char *where,
                      struct hub_proto_error *err)
{
    if (len == 0)
        return hub_proto_fail(err, HUB_PERR_INVALID_CHANNEL, "invalid channel name%s: empty",
                    where);
    if (len > HUB_CHANNEL_MAX)
        return hub_proto_fail(err, HUB_PERR_INVALID_CHANNEL,
                    "invalid channel name%s: %zu bytes long, at most %d allowed",
                    where, len, HUB_CHANNEL_MAX);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)p[i];
        if (chan_ok[c])
            continue;
        char shown[12] = "";
        if (c > 0x20 && c < 0x7f)
            snprintf(shown, sizeof(shown), " ('%c')", c);
        else if (c == 0x20)
            snprintf(shown, sizeof(shown), " (space)");
        return hub_proto_fail(err, HUB_PERR_INVALID_CHANNEL,
                    "invalid channel name%s: byte 0x%02x%s at offset %zu is not "
                    "allowed (only A-Z a-z 0-9 _ : . @ / = # -)",
                    where, c, shown, i);
    }
    return 0;
}

/* ---- text checks yajl does not make ---- */

/* yajl's lexer checks only the shape of UTF-8 sequences (it takes overlong
 * forms, UTF-16 surrogates and code points past U+10FFFF) and treats vertical
 * tab and form feed as whitespace. Data is relayed verbatim in text frames, so
 * either would let one publisher send frames that browsers refuse (close
 * 1007) or JSON.parse() rejects. Returns the offset of the first bad byte, or
 * `n`; `*utf8` tells which rule failed. */
size_t hub_proto_scan_text(const unsigned char *s, size_t n, int *utf8)
{
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    size_t i = 0, first_ctl = n;

    *utf8 = 0;
    while (i < n) {
        /* Fast path: 8 ASCII bytes, none of them \v or \f. */
        if (n - i >= 8) {
            uint64_t w, v, f;
            memcpy(&w, s + i, 8);
            v = w ^ (ones * 0x0b);
            f = w ^ (ones * 0x0c);
            if (!((w | ((v - ones) & ~v) | ((f - ones) & ~f)) & highs)) {
                i += 8;
                continue;
            }
        }
        unsigned c = s[i];
        if (c < 0x80) {
            /* \v and \f: not JSON whitespace; the scan goes on, for an
             * invalid UTF-8 sequence after it decides how the frame fails. */
            if ((c == 0x0b || c == 0x0c) && first_ctl == n)
                first_ctl = i;
            i++;
            continue;
        }
        /* RFC 3629 table 3.7: the second byte's range depends on the first. */
        unsigned lo = 0x80, hi = 0xbf;
        size_t need;
        if (c >= 0xc2 && c <= 0xdf)
            need = 1;
        else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0)
                lo = 0xa0;
            else if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0)
                lo = 0x90;
            else if (c == 0xf4)
                hi = 0x8f;
        } else {
            *utf8 = 1;
            return i;
        }
        if (n - i <= need || s[i + 1] < lo || s[i + 1] > hi) {
            *utf8 = 1;
            return i;
        }
        for (size_t k = 2; k <= need; k++) {
            if ((s[i + k] & 0xc0) != 0x80) {
                *utf8 = 1;
                return i;
            }
        }
        i += need + 1;
    }
    return first_ctl;
}

int hub_proto_utf8_valid(const char *p, size_t len)
{
    int utf8;
    hub_proto_scan_text((const unsigned char *)p, len, &utf8);
    return !utf8;
}

