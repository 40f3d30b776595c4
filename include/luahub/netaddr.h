/* IP addresses and networks: CIDR lists (trusted_proxies), the client
 * address behind trusted proxies (X-Forwarded-For), origins
 * (allowed_origins). Pure: no I/O, no state, no callbacks; every result
 * is written into memory the caller owns. */
#ifndef LUAHUB_NETADDR_H
#define LUAHUB_NETADDR_H

#include <stddef.h>
#include <stdint.h>

/* An address (family 4 or 6; IPv4-mapped IPv6 is taken as IPv4) or, with
 * `prefix`, a network. */
struct hub_ip {
    uint8_t family;             /* 4 or 6; 0: none */
    uint8_t prefix;             /* bits of a network (32/128 for one address) */
    unsigned char a[16];        /* 4 or 16 bytes, network order */
};

/* Parses a numeric address s[0..n) ("10.0.0.1", "::1", "::ffff:1.2.3.4").
 * Returns 0, or -1 when it is not one. */
int hub_ip_parse(const char *s, size_t n, struct hub_ip *ip);

/* Parses "ADDR" or "ADDR/BITS" (host bits must be zero). Returns 0, or -1
 * with the reason in err. */
int hub_cidr_parse(const char *s, size_t n, struct hub_ip *net, char *err, size_t errlen);

/* 1 if `ip` is in one of the n networks. */
int hub_cidr_match(const struct hub_ip *nets, size_t n, const struct hub_ip *ip);

/* 1 for 127.0.0.0/8 and ::1. */
int hub_ip_loopback(const struct hub_ip *ip);

/* Writes the numeric form of `ip` into out[0..n). */
void hub_ip_format(const struct hub_ip *ip, char *out, size_t n);

/* The client address of a request that came from `peer` with the
 * X-Forwarded-For list xff[0..len) (all its headers joined with ","), when
 * `peer` is one of the trusted networks: walking the list from its end,
 * every trusted hop is skipped and the first other address is the client.
 * An entry that is not an address stops the walk (the last trusted hop is
 * then the client); at most HUB_XFF_MAX entries are read. With an
 * untrusted peer, or no list, the client is `peer`. */
#define HUB_XFF_MAX 64
void hub_ip_client(const struct hub_ip *peer, const char *xff, size_t len,
                   const struct hub_ip *trusted, size_t ntrusted, struct hub_ip *client);

/* Checks an allowed_origins entry: "*", or "scheme://host[:port]" with
 * scheme http or https, a host, an optional port 1..65535, and nothing
 * else (no path, no trailing slash, no user). Returns 0, or -1 with the
 * reason. */
int hub_origin_valid(const char *s, size_t n, char *err, size_t errlen);

#endif
