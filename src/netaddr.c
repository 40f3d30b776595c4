/* Addresses, networks and origins (include/luahub/netaddr.h). */
#include "luahub/netaddr.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

int hub_ip_parse(const char *s, size_t n, struct hub_ip *ip)
{
    char buf[INET6_ADDRSTRLEN + 1];
    if (n == 0 || n >= sizeof(buf))
        return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    memset(ip, 0, sizeof(*ip));
    if (inet_pton(AF_INET, buf, ip->a) == 1) {
        ip->family = 4;
        ip->prefix = 32;
        return 0;
    }
    if (inet_pton(AF_INET6, buf, ip->a) == 1) {
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (!memcmp(ip->a, mapped, 12)) {
            memmove(ip->a, ip->a + 12, 4);
            memset(ip->a + 4, 0, 12);
            ip->family = 4;
            ip->prefix = 32;
        } else {
            ip->family = 6;
            ip->prefix = 128;
        }
        return 0;
    }
    return -1;
}

int hub_cidr_parse(const char *s, size_t n, struct hub_ip *net, char *err, size_t errlen)
{
    const char *slash = memchr(s, '/', n);
    size_t al = slash ? (size_t)(slash - s) : n;
    if (hub_ip_parse(s, al, net) < 0) {
        snprintf(err, errlen, "\"%.*s\" is not an IP address", (int)(al > 64 ? 64 : al), s);
        return -1;
    }
    unsigned max = net->family == 4 ? 32 : 128;
    if (slash) {
        unsigned bits = 0;
        size_t i = al + 1;
        if (i == n || n - i > 3) {
            snprintf(err, errlen, "bad prefix length in \"%.*s\"", (int)(n > 64 ? 64 : n), s);
            return -1;
        }
        for (; i < n; i++) {
            if (s[i] < '0' || s[i] > '9') {
                snprintf(err, errlen, "bad prefix length in \"%.*s\"", (int)(n > 64 ? 64 : n),
                         s);
                return -1;
            }
            bits = bits * 10 + (unsigned)(s[i] - '0');
        }
        if (bits > max) {
            snprintf(err, errlen, "prefix /%u is longer than %u bits", bits, max);
            return -1;
        }
        net->prefix = bits;
    }
    /* host bits must be zero: 10.0.0.1/8 is a mistake for 10.0.0.0/8 */
    for (unsigned b = net->prefix; b < max; b++)
        if (net->a[b / 8] & (0x80 >> (b % 8))) {
            snprintf(err, errlen, "\"%.*s\" has host bits set (the network is written with "
                     "them zero)", (int)(n > 64 ? 64 : n), s);
            return -1;
        }
    return 0;
}

int hub_cidr_match(const struct hub_ip *nets, size_t n, const struct hub_ip *ip)
{
    for (size_t i = 0; i < n; i++) {
        const struct hub_ip *net = &nets[i];
        if (net->family != ip->family)
            continue;
        unsigned full = net->prefix / 8, rest = net->prefix % 8;
        if (memcmp(net->a, ip->a, full))
            continue;
        if (rest && ((net->a[full] ^ ip->a[full]) & (0xff00 >> rest)))
            continue;
        return 1;
    }
    return 0;
}

int hub_ip_loopback(const struct hub_ip *ip)
{
    static const unsigned char one[16] = {[15] = 1};
    return ip->family == 4 ? ip->a[0] == 127 : !memcmp(ip->a, one, 16);
}

void hub_ip_format(const struct hub_ip *ip, char *out, size_t n)
{
    if (!inet_ntop(ip->family == 4 ? AF_INET : AF_INET6, ip->a, out, (socklen_t)n) && n)
        out[0] = '\0';
}

void hub_ip_client(const struct hub_ip *peer, const char *xff, size_t len,
                   const struct hub_ip *trusted, size_t ntrusted, struct hub_ip *client)
{
    *client = *peer;
    if (!xff || !ntrusted || !hub_cidr_match(trusted, ntrusted, peer))
        return;
    const char *end = xff + len;
    for (int k = 0; k < HUB_XFF_MAX && end > xff; k++) {
        const char *comma = end;
        while (comma > xff && comma[-1] != ',')
            comma--;
        const char *b = comma, *e = end;
        while (b < e && (*b == ' ' || *b == '\t'))
            b++;
        while (e > b && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        struct hub_ip hop;
        if (hub_ip_parse(b, (size_t)(e - b), &hop) < 0)
            return;                     /* junk: trust goes no further */
        *client = hop;
        if (!hub_cidr_match(trusted, ntrusted, &hop))
            return;                     /* the first untrusted hop: the client */
        end = comma > xff ? comma - 1 : xff;
    }
}

int hub_origin_valid(const char *s, size_t n, char *err, size_t errlen)
{
    if (n == 1 && s[0] == '*')
        return 0;
    size_t sl = n >= 8 && !strncasecmp(s, "https://", 8) ? 8
                : n >= 7 && !strncasecmp(s, "http://", 7) ? 7 : 0;
    if (!sl) {
        snprintf(err, errlen, "\"%.*s\" is not an origin: write scheme://host[:port], e.g. "
                 "\"https://app.example.com\"", (int)(n > 64 ? 64 : n), s);
        return -1;
    }
    const char *h = s + sl, *end = s + n, *colon = NULL;
    if (h == end) {
        snprintf(err, errlen, "\"%.*s\" has no host", (int)(n > 64 ? 64 : n), s);
        return -1;
    }
    if (*h == '[') {                    /* an IPv6 literal */
        const char *close = memchr(h, ']', (size_t)(end - h));
        if (!close) {
            snprintf(err, errlen, "\"%.*s\": unclosed [", (int)(n > 64 ? 64 : n), s);
            return -1;
        }
        colon = close + 1 < end ? close + 1 : NULL;
        if (colon && *colon != ':') {
            snprintf(err, errlen, "\"%.*s\" has something after the host: an origin has no "
                     "path", (int)(n > 64 ? 64 : n), s);
            return -1;
        }
    } else {
        for (const char *p = h; p < end; p++) {
            unsigned char c = (unsigned char)*p;
            if (c == ':') {
                colon = p;
                break;
            }
            if (!((c | 32) >= 'a' && (c | 32) <= 'z') && !(c >= '0' && c <= '9') && c != '-' &&
                c != '.') {
                snprintf(err, errlen, "\"%.*s\" has '%c' in its host: an origin is "
                         "scheme://host[:port], with no path, user or trailing slash",
                         (int)(n > 64 ? 64 : n), s, c >= 0x20 && c < 0x7f ? c : '?');
                return -1;
            }
        }
    }
    if (colon) {
        unsigned port = 0;
        const char *p = colon + 1;
        if (p == end || end - p > 5) {
            snprintf(err, errlen, "\"%.*s\": bad port", (int)(n > 64 ? 64 : n), s);
            return -1;
        }
        for (; p < end; p++) {
            if (*p < '0' || *p > '9') {
                snprintf(err, errlen, "\"%.*s\": bad port (an origin has no path)",
                         (int)(n > 64 ? 64 : n), s);
                return -1;
            }
            port = port * 10 + (unsigned)(*p - '0');
        }
        if (port == 0 || port > 65535) {
            snprintf(err, errlen, "\"%.*s\": port out of range (1..65535)",
                     (int)(n > 64 ? 64 : n), s);
            return -1;
        }
    }
    return 0;
}
