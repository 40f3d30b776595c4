/*
 * loadgen: luahub's load generator (see bench/README.md).
 *
 * A raw RFC 6455 client on epoll, level-triggered, non-blocking sockets, one
 * thread per process. Subscribers are spread over --procs forked worker
 * processes (each under the 20,000 fd limit); the parent process runs the
 * publishers and coordinates the phases over one socketpair per worker, and
 * the workers leave their counters and latency histograms in a shared
 * anonymous mapping. Every loop is bounded in count and time, and every
 * socket goes to a loopback address.
 *
 * Modes (one JSON object per run on stdout, progress on stderr):
 *   fanout    N subscribers on C channels (subscriber i on channel i % C),
 *             a WebSocket or HTTP publisher, --burst K per channel through a
 *             bounded in-flight window or --rate R publishes/s for --duration.
 *             Payloads carry publisher id, per-channel sequence number and a
 *             CLOCK_MONOTONIC send time; subscribers count deliveries, lost,
 *             duplicated and reordered messages and a latency histogram.
 *             --flow W instead bounds the publishes not yet delivered to
 *             every subscriber of their channel: workers count deliveries
 *             per publish in the shared mapping and wake the parent through
 *             an eventfd when they complete one. --probe-ms adds a probe
 *             connection (not subscribed) that sends a WebSocket PING and a
 *             protocol ping op on a fixed schedule during the run and
 *             records their round trips.
 *   idle      N subscribed connections held for --hold seconds; server RSS
 *             per connection from /proc/PID/status.
 *   connrate  connect, upgrade, subscribe, wait for the ack, close; --count
 *             connections, --inflight at a time.
 * Server CPU is utime+stime of the --server-pid processes over the measured
 * window (/proc/PID/stat), divided by deliveries or connections.
 * --aux-pid processes (a redis-server) are metered the same way and reported
 * apart; --sub-ports spreads the subscribers over several servers (luahub
 * processes meeting through Redis) while the publishers use --port.
 * --bind-src A binds worker i's sockets to A + i (127.0.0.x), so 100,000
 * connections from several workers do not run out of ephemeral ports.
 * Loadgen's own CPU (every process, CLOCK_PROCESS_CPUTIME_ID) is reported
 * as client_cpu_s: the client must not be what limits a run.
 *
 * --target luahub speaks protocol v1 (GET /ws, subscribe/publish ops, HTTP
 * POST /api/publish); --target nchan subscribes with a WebSocket to
 * /sub/<channel> and publishes with POST or a WebSocket to /pub/<channel>.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 32
#define MAX_PUB_CONNS 1024
#define MAX_MSG (4u << 20)        /* largest server message we accept */
#define MAX_HDR 16384             /* largest HTTP response head */
#define SCRATCH_SIZE (256u << 10) /* per-process read buffer */
#define READS_PER_EVENT 16        /* fairness bound per readable event */
#define ID_RING 65536u            /* publish id -> channel, > max window */
#define HIST_N 2624               /* log-linear: 64 sub-buckets per octave */
#define FD_RESERVE 64             /* fds kept free for pipes, /proc, ... */
#define FLOW_MAX_PUBS (16u << 20) /* --flow: one shared counter per publish */
#define FLOW_DONE 0x80000000u     /* flow counter: publish complete */
#define PROBE_RING 4096u          /* probe sequence -> send time */

enum mode { M_FANOUT, M_IDLE, M_CONNRATE };
enum target { T_LUAHUB, T_NCHAN };
enum pubkind { P_WS, P_HTTP };
enum role { R_SUB, R_WSPUB, R_HTTPPUB, R_CR, R_CTRL, R_PROBE, R_EVENT };
enum state { S_FREE, S_CONNECTING, S_HANDSHAKE, S_WELCOME, S_SUBACK, S_READY,
             S_CLOSING, S_DEAD };
/* Process-wide phase: what a delivery or a close means right now. */
enum phase { PH_SETUP, PH_RUN, PH_FINAL, PH_CLOSE };

/* ---- options ---------------------------------------------------------- */

static struct {
    int mode, target, pub;
    const char *host;
    int port;
    struct sockaddr_in addr;
    const char *ws_path, *api_path, *sub_prefix, *pub_prefix, *chan_prefix,
        *label;
    uint32_t subs, channels, pub_conns, window, size, procs, flow;
    uint64_t burst, count;
    double rate, duration, hold, timeout, drain, probe_ms;
    uint32_t inflight, connect_inflight;
    pid_t server_pids[16];
    int n_server_pids;
    pid_t aux_pids[16];      /* metered apart (e.g. redis-server) */
    int n_aux_pids;
    struct sockaddr_in sub_addr[8]; /* --sub-ports: subscribers' ports */
    int n_sub_ports;
    uint32_t bind_src; /* --bind-src, host order; 0: the kernel chooses */
    int verbose, quickack, server_core;
} O = {
    .mode = M_FANOUT, .target = T_LUAHUB, .pub = P_WS, .host = "127.0.0.1",
    .ws_path = "/ws", .api_path = "/api/publish", .sub_prefix = "/sub/",
    .pub_prefix = "/pub/", .chan_prefix = "bench:", .label = "",
    .subs = 1000, .channels = 10, .window = 64, .size = 100,
    .duration = 10, .hold = 5, .timeout = 60, .drain = 15, .count = 10000,
    .inflight = 50, .connect_inflight = 128, .quickack = 1, .server_core = -1,
};

/* Derived from the options. */
static uint64_t g_total_pubs;    /* publishes the publisher will attempt */
static uint32_t g_max_per_chan;  /* bound on the per-channel sequence */
static uint32_t g_npub;          /* publisher slots for ordering checks */

/* ---- counters shared with the parent ---------------------------------- */

struct wstats {
    uint64_t subs_ok, subs_failed, dropped, delivered, unique, dup, reordered,
        lost, bad, other, out_of_range;
    uint64_t first_rx, last_rx, lat_max;
    uint64_t cr_ok, cr_failed;
    uint64_t pings, complete_subs, expected, cr_close_errors;
    uint64_t cpu_run_ns; /* this process's CPU from ready to done */
    int last_close_code;
    uint64_t hist[HIST_N];
};

struct shared {
    struct wstats w[MAX_PROCS];
    uint64_t flow_done;  /* --flow: publishes delivered to every subscriber */
    uint32_t expected[]; /* per channel: publishes the server acknowledged */
};

/* Further arrays in the same mapping (set before the fork). */
static uint32_t *g_subs_chan; /* per channel: subscribed connections now */
static uint32_t *g_flow_cnt;  /* --flow, per publish: deliveries | FLOW_DONE */
static int g_flow_efd = -1;   /* --flow: workers wake the parent here */
static int g_flow_wake;       /* worker: completed a publish this round */

/* ---- small utilities -------------------------------------------------- */

static int g_proc = -1; /* worker index, -1 in the parent */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void vlog(const char *fmt, va_list ap)
{
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    if (g_proc < 0)
        fprintf(stderr, "loadgen: %s\n", line);
    else
        fprintf(stderr, "loadgen[%d]: %s\n", g_proc, line);
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
    if (!O.verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

static void warnx_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warnx_(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
    exit(2);
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        die("out of memory (%zu bytes)", n);
    return p;
}

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p)
        die("out of memory (%zu x %zu bytes)", n, sz);
    return p;
}

static uint64_t g_rng;

/* Payload timestamps count from here (set before the fork, so every process
 * shares it): small numbers survive a policy's JSON round trip (lua-cjson
 * keeps 14 significant digits; raw CLOCK_MONOTONIC ns pass 10^14 after
 * ~28 hours of uptime). */
static uint64_t g_t_base;

static uint32_t rnd32(void)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return (uint32_t)((g_rng * 0x2545F4914F6CDD1DULL) >> 32);
}

/* ---- SHA-1 and base64, for Sec-WebSocket-Accept ------------------------ */

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p)
{
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
        else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
        else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
        else { f = b ^ c ^ d; k = 0xCA62C1D6; }
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d; d = c; c = rol(b, 30); b = a; a = t;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
}

/* SHA-1 of a message shorter than 120 bytes (all we need). */
static void sha1_short(const void *msg, size_t n, uint8_t out[20])
{
    uint8_t blk[128] = {0};
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t nb = n + 9 <= 64 ? 64 : 128;
    memcpy(blk, msg, n);
    blk[n] = 0x80;
    uint64_t bits = (uint64_t)n * 8;
    for (int i = 0; i < 8; i++)
        blk[nb - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t o = 0; o < nb; o += 64)
        sha1_block(h, blk + o);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++)
            out[4 * i + j] = (uint8_t)(h[i] >> (24 - 8 * j));
}

static void base64(const uint8_t *in, size_t n, char *out)
{
    static const char t[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = t[v >> 18 & 63];
        out[o++] = t[v >> 12 & 63];
        out[o++] = i + 1 < n ? t[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? t[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---- latency histogram ------------------------------------------------ */

static unsigned hist_index(uint64_t v)
{
    if (v < 64)
        return (unsigned)v;
    if (v >= (1ULL << 46))
        v = (1ULL << 46) - 1;
    int e = 63 - __builtin_clzll(v);
    return (unsigned)(e - 5) * 64 + (unsigned)((v >> (e - 6)) & 63);
}

static uint64_t hist_value(unsigned idx)
{
    if (idx < 64)
        return idx;
    unsigned e = idx / 64 + 5, sub = idx % 64;
    uint64_t lo = (uint64_t)(64 + sub) << (e - 6);
    return lo + ((1ULL << (e - 6)) >> 1);
}

static void hist_add(struct wstats *st, uint64_t v)
{
    st->hist[hist_index(v)]++;
    if (v > st->lat_max)
        st->lat_max = v;
}

/* The value at quantile q of st's histogram (a bucket's middle, so never
 * above the largest value seen). */
static uint64_t hist_quantile(const struct wstats *st, uint64_t total, double q)
{
    const uint64_t *h = st->hist;
    if (!total)
        return 0;
    uint64_t rank = (uint64_t)ceil(q * (double)total), cum = 0;
    if (rank < 1)
        rank = 1;
    for (unsigned i = 0; i < HIST_N; i++) {
        cum += h[i];
        if (cum >= rank)
            return hist_value(i) < st->lat_max ? hist_value(i) : st->lat_max;
    }
    return st->lat_max;
}

/* ---- /proc readers ---------------------------------------------------- */

/* Sum of utime+stime (clock ticks) over some pids; -1 if unreadable. */
static int64_t pids_cpu_ticks(const pid_t *pids, int npids)
{
    int64_t sum = 0;
    if (!npids)
        return -1;
    for (int i = 0; i < npids; i++) {
        char path[64], buf[1024];
        snprintf(path, sizeof path, "/proc/%d/stat", (int)pids[i]);
        FILE *f = fopen(path, "r");
        if (!f)
            return -1;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        if (!p)
            return -1;
        unsigned long long ut = 0, stt = 0;
        /* fields after ")": state(3) ... utime(14) stime(15) */
        if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                   &ut, &stt) != 2)
            return -1;
        sum += (int64_t)(ut + stt);
    }
    return sum;
}

static int64_t server_cpu_ticks(void) { return pids_cpu_ticks(O.server_pids, O.n_server_pids); }
static int64_t aux_cpu_ticks(void) { return pids_cpu_ticks(O.aux_pids, O.n_aux_pids); }

/* Sum over the server pids of the kB value of line `key` (with colon) in
 * /proc/PID/<file>; -1 if unreadable. */
static int64_t server_proc_kb(const char *file, const char *key)
{
    int64_t sum = 0;
    size_t kl = strlen(key);
    if (!O.n_server_pids)
        return -1;
    for (int i = 0; i < O.n_server_pids; i++) {
        char path[64], line[256];
        long kb = -1;
        snprintf(path, sizeof path, "/proc/%d/%s", (int)O.server_pids[i], file);
        FILE *f = fopen(path, "r");
        if (!f)
            return -1;
        while (fgets(line, sizeof line, f))
            if (!strncmp(line, key, kl)) {
                kb = strtol(line + kl, NULL, 10);
                break;
            }
        fclose(f);
        if (kb < 0)
            return -1;
        sum += kb;
    }
    return sum;
}

/* VmRSS counts a page shared by several processes (Nchan's shared memory
 * zone, touched by every worker) once per process; Pss splits it. */
static int64_t server_rss_kb(void) { return server_proc_kb("status", "VmRSS:"); }
static int64_t server_pss_kb(void) { return server_proc_kb("smaps_rollup", "Pss:"); }

/* This process's CPU time, ns (exact, unlike the tick-based /proc). */
static uint64_t self_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Busy ticks (user, nice, system, irq, softirq, steal) of CPU --server-core
 * from /proc/stat; -1 if not asked for or unreadable. Unlike the per-process
 * times this includes softirq work (loopback TCP) done on the server's core. */
static int64_t core_busy_ticks(void)
{
    if (O.server_core < 0)
        return -1;
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return -1;
    char line[512], want[16];
    int64_t busy = -1;
    snprintf(want, sizeof want, "cpu%d ", O.server_core);
    while (fgets(line, sizeof line, f)) {
        unsigned long long v[8] = {0};
        if (strncmp(line, want, strlen(want)))
            continue;
        if (sscanf(line + strlen(want), "%llu %llu %llu %llu %llu %llu %llu %llu",
                   &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) == 8)
            busy = (int64_t)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]);
        break;
    }
    fclose(f);
    return busy;
}

static double ticks_to_s(int64_t t) { return (double)t / (double)sysconf(_SC_CLK_TCK); }

/* ---- connections ------------------------------------------------------ */

struct wbuf {
    char *p;
    size_t off, len, cap;
};

struct conn {
    int fd;
    uint8_t role, state, want_out, close_sent, complete, frag_op, http_busy,
        http_close, subscribed;
    uint32_t idx;  /* subscriber index, publisher index, or pool slot */
    uint32_t chan;
    char key[25];  /* Sec-WebSocket-Key we sent */
    char *rbuf;    /* unparsed input carried between reads */
    uint32_t rlen, rcap;
    char *frag;    /* a fragmented message being reassembled (rare) */
    uint32_t flen, fcap;
    struct wbuf w;
    uint64_t t_start, deadline;
    uint32_t unique;   /* subscriber: distinct messages seen */
    uint32_t inflight; /* ws publisher: publishes without their reply */
    uint8_t *seen;     /* subscriber: bitmap by sequence number */
    int32_t *last;     /* subscriber: last sequence per publisher slot */
};

static int g_ep = -1;
static char *g_scratch;
static char *g_tmp;        /* message assembly buffer */
static size_t g_tmp_cap;
static uint64_t g_now;     /* refreshed after every read and epoll_wait */
static int g_phase = PH_SETUP;
static struct wstats *g_st; /* this process's counters */
static struct shared *g_sh;
static uint32_t g_open;    /* sockets open in this process */
static uint32_t g_closing; /* sockets that sent a close and wait for EOF */

static void conn_dead(struct conn *c, const char *why);
static void on_message(struct conn *c, int op, char *p, size_t n);
static void on_http_response(struct conn *c, int status, bool close);
static void on_open(struct conn *c);
static void probe_pong(const char *p, size_t n);
static void probe_reply(const char *p, size_t n);

static void ep_set(struct conn *c, bool out)
{
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(g_ep, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_out = out;
}

static void wbuf_reserve(struct wbuf *b, size_t extra)
{
    if (b->off == b->len)
        b->off = b->len = 0;
    if (b->len + extra <= b->cap)
        return;
    if (b->off) {
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->len + extra > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 512;
        while (cap < b->len + extra)
            cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
}

static void wbuf_put(struct wbuf *b, const void *p, size_t n)
{
    wbuf_reserve(b, n);
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

/* Writes what is queued until the socket would block. */
static void conn_flush(struct conn *c)
{
    if (c->state == S_DEAD || c->state == S_CONNECTING)
        return;
    while (c->w.off < c->w.len) {
        ssize_t k = write(c->fd, c->w.p + c->w.off, c->w.len - c->w.off);
        if (k > 0) {
            c->w.off += (size_t)k;
            continue;
        }
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out)
                ep_set(c, true);
            return;
        }
        conn_dead(c, "write failed");
        return;
    }
    c->w.off = c->w.len = 0;
    if (c->w.cap > 65536) { /* a burst grew it: give the memory back */
        free(c->w.p);
        c->w.p = NULL;
        c->w.cap = 0;
    }
    if (c->want_out)
        ep_set(c, false);
}

/* Appends one masked client frame (RFC 6455 5.3) to c's write buffer. */
static void ws_put(struct conn *c, int op, const char *p, size_t n)
{
    uint8_t h[14];
    size_t hl = 2;
    h[0] = (uint8_t)(0x80 | op);
    if (n < 126) {
        h[1] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        h[1] = 0x80 | 126;
        h[2] = (uint8_t)(n >> 8);
        h[3] = (uint8_t)n;
        hl = 4;
    } else {
        h[1] = 0x80 | 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i));
        hl = 10;
    }
    uint32_t m = rnd32();
    memcpy(h + hl, &m, 4);
    const uint8_t *mk = h + hl;
    hl += 4;
    wbuf_reserve(&c->w, hl + n);
    char *dst = c->w.p + c->w.len;
    memcpy(dst, h, hl);
    dst += hl;
    for (size_t i = 0; i < n; i++)
        dst[i] = (char)(p[i] ^ mk[i & 3]);
    c->w.len += hl + n;
}

static void ws_close(struct conn *c, int code)
{
    if (c->close_sent || c->state == S_DEAD)
        return;
    char b[2] = {(char)(code >> 8), (char)code};
    ws_put(c, 0x8, b, 2);
    c->close_sent = 1;
    if (c->state != S_CLOSING) {
        c->state = S_CLOSING;
        g_closing++;
    }
    c->deadline = g_now + 2000000000ULL;
    conn_flush(c);
}

static void channel_name(uint32_t chan, char *out, size_t cap)
{
    snprintf(out, cap, "%s%u", O.chan_prefix, chan);
}

/* --bind-src: worker i's sockets leave from bind_src + i; the port is
 * chosen at connect (IP_BIND_ADDRESS_NO_PORT), so each source address has
 * the whole ephemeral range per destination. */
static bool bind_source(int fd)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(O.bind_src + (uint32_t)g_proc);
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(fd, (const struct sockaddr *)&a, sizeof a) == 0)
        return true;
    warnx_("bind to %s: %s", inet_ntoa(a.sin_addr), strerror(errno));
    return false;
}

/* Starts a non-blocking connect; the handshake follows on writable. */
static bool conn_start(struct conn *c, int role, uint32_t idx, uint32_t chan)
{
    c->role = (uint8_t)role;
    c->idx = idx;
    c->chan = chan;
    c->state = S_CONNECTING;
    c->close_sent = c->complete = c->frag_op = c->http_busy = c->http_close = 0;
    c->subscribed = 0;
    c->rlen = c->flen = 0;
    c->w.off = c->w.len = 0;
    c->inflight = 0;
    c->t_start = g_now;
    c->deadline = 0;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        warnx_("socket: %s", strerror(errno));
        c->state = S_HANDSHAKE; /* so conn_dead accounts it as a failed open */
        conn_dead(c, "socket failed");
        return false;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    g_open++;
    if (O.bind_src && g_proc >= 0 && !bind_source(c->fd)) {
        c->state = S_HANDSHAKE; /* so conn_dead accounts it as a failed open */
        conn_dead(c, "bind failed");
        return false;
    }
    /* --sub-ports: the subscribers of one channel (i / C counts them) are
     * spread round robin over the ports, so every channel has subscribers
     * on every server. Publishers and connrate use --port. */
    const struct sockaddr_in *to = &O.addr;
    if (role == R_SUB && O.n_sub_ports)
        to = &O.sub_addr[(idx / O.channels) % (uint32_t)O.n_sub_ports];
    if (connect(c->fd, (const struct sockaddr *)to, sizeof *to) < 0 &&
        errno != EINPROGRESS) {
        note("connect: %s", strerror(errno));
        c->state = S_HANDSHAKE; /* so conn_dead accounts it as a failed open */
        conn_dead(c, "connect failed");
        return false;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(g_ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    c->want_out = 1;
    return true;
}

static void send_handshake(struct conn *c)
{
    char path[512], chan[300], req[1024];
    uint8_t k[16];
    for (int i = 0; i < 16; i += 4) {
        uint32_t r = rnd32();
        memcpy(k + i, &r, 4);
    }
    base64(k, 16, c->key);
    if (c->role == R_PROBE) /* Nchan: a channel nobody publishes to */
        snprintf(chan, sizeof chan, "%sprobe", O.chan_prefix);
    else
        channel_name(c->chan, chan, sizeof chan);
    if (O.target == T_LUAHUB)
        snprintf(path, sizeof path, "%s", O.ws_path);
    else
        snprintf(path, sizeof path, "%s%s",
                 c->role == R_WSPUB ? O.pub_prefix : O.sub_prefix, chan);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     path, O.host, O.port, c->key);
    wbuf_put(&c->w, req, (size_t)n);
    c->state = S_HANDSHAKE;
    conn_flush(c);
}

static void on_connected(struct conn *c)
{
    int err = 0;
    socklen_t el = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) {
        note("connect: %s", strerror(err));
        c->state = S_HANDSHAKE;
        conn_dead(c, "connect failed");
        return;
    }
    if (c->role == R_HTTPPUB) {
        c->state = S_READY;
        ep_set(c, false);
        on_open(c);
        return;
    }
    send_handshake(c);
}

/* Case-insensitive search for header `name` (with colon) in an HTTP head;
 * returns the value start or NULL. */
static const char *http_header(const char *h, size_t n, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = h; p + nl < h + n;) {
        const char *eol = memmem(p, (size_t)(h + n - p), "\r\n", 2);
        if (!eol)
            break;
        if ((size_t)(eol - p) > nl && !strncasecmp(p, name, nl)) {
            p += nl;
            while (*p == ' ' || *p == '\t')
                p++;
            return p;
        }
        p = eol + 2;
    }
    return NULL;
}

/* Parses the 101 response; returns bytes consumed, 0 if incomplete, -1 on
 * error (c is dead). */
static ssize_t handshake_input(struct conn *c, const char *p, size_t n)
{
    const char *end = memmem(p, n, "\r\n\r\n", 4);
    if (!end) {
        if (n > MAX_HDR) {
            conn_dead(c, "handshake response too long");
            return -1;
        }
        return 0;
    }
    size_t hl = (size_t)(end + 4 - p);
    if (n < 12 || memcmp(p, "HTTP/1.1 101", 12)) {
        if (O.verbose) {
            const char *eol = memchr(p, '\r', hl);
            note("handshake refused: %.*s", (int)(eol ? eol - p : 40), p);
        }
        conn_dead(c, "handshake refused");
        return -1;
    }
    char cat[64], want[32];
    uint8_t dig[20];
    snprintf(cat, sizeof cat, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", c->key);
    sha1_short(cat, strlen(cat), dig);
    base64(dig, 20, want);
    const char *acc = http_header(p, hl, "Sec-WebSocket-Accept:");
    if (!acc || strncmp(acc, want, 28)) {
        conn_dead(c, "bad Sec-WebSocket-Accept");
        return -1;
    }
    /* luahub greets first; for Nchan the 101 itself means subscribed. */
    c->state = O.target == T_LUAHUB ? S_WELCOME : S_READY;
    if (c->state == S_READY)
        on_open(c);
    return (ssize_t)hl;
}

static void frag_append(struct conn *c, const char *p, size_t n)
{
    if ((size_t)c->flen + n > MAX_MSG) {
        conn_dead(c, "fragmented message too large");
        return;
    }
    if (c->flen + n > c->fcap) {
        c->fcap = (uint32_t)(c->flen + n) * 2;
        c->frag = xrealloc(c->frag, c->fcap);
    }
    memcpy(c->frag + c->flen, p, n);
    c->flen += (uint32_t)n;
}

static void ws_frame(struct conn *c, bool fin, int op, char *p, size_t n)
{
    switch (op) {
    case 0x0:
        if (!c->frag_op) {
            conn_dead(c, "continuation without a start frame");
            return;
        }
        frag_append(c, p, n);
        if (fin && c->state != S_DEAD) {
            int fop = c->frag_op;
            size_t fl = c->flen;
            c->frag_op = 0;
            c->flen = 0;
            on_message(c, fop, c->frag, fl);
        }
        return;
    case 0x1:
    case 0x2:
        if (!fin) {
            c->frag_op = (uint8_t)op;
            c->flen = 0;
            frag_append(c, p, n);
            return;
        }
        on_message(c, op, p, n);
        return;
    case 0x8: {
        int code = n >= 2 ? ((uint8_t)p[0] << 8 | (uint8_t)p[1]) : 1005;
        if (!c->close_sent) {
            g_st->last_close_code = code;
            note("server closed [conn %u] with %d %.*s", c->idx, code,
                 n > 2 ? (int)(n - 2) : 0, p + 2);
            ws_close(c, code == 1005 || code < 1000 ? 1000 : code);
        }
        return;
    }
    case 0x9:
        g_st->pings++;
        ws_put(c, 0xA, p, n > 125 ? 125 : n);
        conn_flush(c);
        return;
    case 0xA:
        if (c->role == R_PROBE)
            probe_pong(p, n);
        return;
    default:
        conn_dead(c, "unknown opcode");
    }
}

/* Parses complete frames from p[0..n); returns bytes consumed. */
static size_t ws_input(struct conn *c, char *p, size_t n)
{
    size_t off = 0;
    while (c->state != S_DEAD && n - off >= 2) {
        const uint8_t *h = (const uint8_t *)p + off;
        uint64_t len = h[1] & 0x7f;
        size_t hl = 2;
        if (len == 126) {
            if (n - off < 4)
                break;
            len = (uint64_t)h[2] << 8 | h[3];
            hl = 4;
        } else if (len == 127) {
            if (n - off < 10)
                break;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = len << 8 | h[2 + i];
            hl = 10;
        }
        bool masked = h[1] & 0x80;
        if (masked)
            hl += 4;
        if (len > MAX_MSG) {
            conn_dead(c, "frame too large");
            break;
        }
        if (n - off < hl + len)
            break;
        char *pl = p + off + hl;
        if (masked) { /* servers must not mask, but tolerate it */
            const uint8_t *mk = (const uint8_t *)pl - 4;
            for (uint64_t i = 0; i < len; i++)
                pl[i] ^= (char)mk[i & 3];
        }
        ws_frame(c, h[0] & 0x80, h[0] & 0x0f, pl, (size_t)len);
        off += hl + (size_t)len;
    }
    return off;
}

/* Parses one chunked body starting at p; returns its length or 0 if
 * incomplete, -1 if malformed. */
static ssize_t chunked_len(const char *p, size_t n)
{
    size_t o = 0;
    for (int guard = 0; guard < 100000; guard++) {
        const char *eol = memmem(p + o, n - o, "\r\n", 2);
        if (!eol)
            return 0;
        char *e;
        unsigned long sz = strtoul(p + o, &e, 16);
        if (e == p + o)
            return -1;
        o = (size_t)(eol - p) + 2;
        if (sz == 0) {
            const char *t = memmem(p + o - 2, n - o + 2, "\r\n\r\n", 4);
            return t ? (ssize_t)(t + 4 - p) : 0;
        }
        if (n - o < sz + 2)
            return 0;
        o += sz + 2;
    }
    return -1;
}

/* Parses complete HTTP responses from p[0..n); returns bytes consumed. */
static size_t http_input(struct conn *c, char *p, size_t n)
{
    size_t off = 0;
    while (off < n && c->state != S_DEAD) {
        const char *h = p + off;
        size_t avail = n - off;
        const char *end = memmem(h, avail, "\r\n\r\n", 4);
        if (!end) {
            if (avail > MAX_HDR)
                conn_dead(c, "response head too long");
            break;
        }
        size_t hl = (size_t)(end + 4 - h);
        if (avail < 12 || memcmp(h, "HTTP/1.", 7)) {
            conn_dead(c, "not an HTTP response");
            break;
        }
        int status = atoi(h + 9);
        const char *v;
        bool close = false;
        ssize_t bl;
        if ((v = http_header(h, hl, "Connection:")) && !strncasecmp(v, "close", 5))
            close = true;
        if ((v = http_header(h, hl, "Transfer-Encoding:")) && !strncasecmp(v, "chunked", 7)) {
            bl = chunked_len(h + hl, avail - hl);
            if (bl < 0) {
                conn_dead(c, "bad chunked body");
                break;
            }
            if (bl == 0)
                break;
        } else if ((v = http_header(h, hl, "Content-Length:"))) {
            bl = (ssize_t)strtoul(v, NULL, 10);
            if (bl > (ssize_t)MAX_MSG) {
                conn_dead(c, "response body too large");
                break;
            }
            if (avail - hl < (size_t)bl)
                break;
        } else if (status == 204 || status == 304 || status / 100 == 1) {
            bl = 0;
        } else {
            conn_dead(c, "response without a length");
            break;
        }
        if (status >= 300 && O.verbose)
            note("publish answered %d: %.*s", status, (int)(bl > 200 ? 200 : bl), h + hl);
        off += hl + (size_t)bl;
        on_http_response(c, status, close);
    }
    return off;
}

static size_t conn_input(struct conn *c, char *p, size_t n)
{
    size_t off = 0;
    if (c->state == S_HANDSHAKE) {
        ssize_t k = handshake_input(c, p, n);
        if (k <= 0)
            return 0;
        off = (size_t)k;
    }
    if (c->role == R_HTTPPUB)
        return off + http_input(c, p + off, n - off);
    return off + ws_input(c, p + off, n - off);
}

static void on_eof(struct conn *c);

static void on_readable(struct conn *c)
{
    for (int i = 0; i < READS_PER_EVENT && c->state != S_DEAD; i++) {
        char *dst;
        size_t room;
        if (c->rlen) {
            if (c->rcap - c->rlen < 65536) {
                c->rcap = c->rcap * 2 > c->rlen + 65536 ? c->rcap * 2 : c->rlen + 65536;
                c->rbuf = xrealloc(c->rbuf, c->rcap);
            }
            dst = c->rbuf + c->rlen;
            room = c->rcap - c->rlen;
        } else {
            dst = g_scratch;
            room = SCRATCH_SIZE;
        }
        ssize_t k = read(c->fd, dst, room);
        if (k == 0) {
            on_eof(c);
            return;
        }
        if (k < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (c->state == S_CLOSING)
                on_eof(c);
            else
                conn_dead(c, "read failed");
            return;
        }
        g_now = now_ns();
        if (O.quickack) {
            /* Linux re-enables delayed ACKs by itself: re-arm per read. */
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
        }
        if (c->rlen) {
            c->rlen += (uint32_t)k;
            size_t used = conn_input(c, c->rbuf, c->rlen);
            if (c->state == S_DEAD)
                return;
            memmove(c->rbuf, c->rbuf + used, c->rlen - used);
            c->rlen -= (uint32_t)used;
        } else {
            size_t used = conn_input(c, g_scratch, (size_t)k);
            if (c->state == S_DEAD)
                return;
            size_t rest = (size_t)k - used;
            if (rest) {
                if (c->rcap < rest + 4096) {
                    c->rcap = (uint32_t)(rest + 4096);
                    c->rbuf = xrealloc(c->rbuf, c->rcap);
                }
                memcpy(c->rbuf, g_scratch + used, rest);
                c->rlen = (uint32_t)rest;
            }
        }
        if ((size_t)k < room)
            return; /* drained; level-triggered epoll says if more arrives */
    }
}

static void on_event(struct conn *c, uint32_t ev)
{
    if (c->state == S_CONNECTING) {
        if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            on_connected(c);
        return;
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
        on_readable(c);
    if (c->state != S_DEAD && (ev & EPOLLOUT))
        conn_flush(c);
}

/* ---- subscribers (workers) -------------------------------------------- */

static struct conn *g_conns;
static uint32_t g_nconns, g_first; /* this worker's subscribers [first, first+n) */
static uint32_t g_next_open, g_opening, g_resolved, g_finished;
static uint64_t g_cr_started;      /* connrate: connections started */
static uint64_t g_cr_count;        /* connrate: this worker's share */

static void send_subscribe(struct conn *c)
{
    char chan[300];
    channel_name(c->chan, chan, sizeof chan);
    int n = snprintf(g_tmp, g_tmp_cap, "{\"op\":\"subscribe\",\"channel\":\"%s\",\"id\":1}", chan);
    ws_put(c, 0x1, g_tmp, (size_t)n);
    c->state = S_SUBACK;
    conn_flush(c);
}

static void sub_mark_finished(struct conn *c)
{
    if (!c->complete) {
        c->complete = 1;
        g_finished++;
    }
}

static void cr_next(void);

/* The subscription is active (luahub ack, or Nchan's 101). */
static void sub_ready(struct conn *c)
{
    c->state = S_READY;
    c->subscribed = 1;
    if (c->role == R_CR) {
        hist_add(g_st, g_now - c->t_start);
        ws_close(c, 1000);
        return;
    }
    g_st->subs_ok++;
    __atomic_add_fetch(&g_subs_chan[c->chan], 1, __ATOMIC_RELAXED);
    g_opening--;
    g_resolved++;
}

static uint32_t parse_u(const char **pp, const char *end)
{
    const char *p = *pp;
    uint64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9')
        v = v * 10 + (uint64_t)(*p++ - '0');
    *pp = p;
    return (uint32_t)v;
}

static uint64_t parse_u64(const char **pp, const char *end)
{
    const char *p = *pp;
    uint64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9')
        v = v * 10 + (uint64_t)(*p++ - '0');
    *pp = p;
    return v;
}

/* A delivery: find "lgp":P,"lgs":S,"lgt":T anywhere in the frame, so the
 * same code reads luahub's envelope and Nchan's raw body. */
/* The value of "key": in p..end, a non-negative integer, or false. */
static bool find_u64(const char *p, const char *end, const char *key, uint64_t *out)
{
    const char *m = memmem(p, (size_t)(end - p), key, strlen(key));
    if (!m)
        return false;
    m += strlen(key);
    if (m >= end || *m < '0' || *m > '9')
        return false;
    *out = parse_u64(&m, end);
    return true;
}

/* --flow: publish j (channel j % C, sequence j / C) is complete once its
 * deliveries reach its channel's subscriber count. Whoever sees that first
 * (a worker on the last delivery, or the parent's rescan after a dropped
 * subscriber) marks it done and counts it in flow_done. */
static bool flow_try_complete(uint64_t j)
{
    uint32_t need = __atomic_load_n(&g_subs_chan[j % O.channels], __ATOMIC_RELAXED);
    uint32_t v = __atomic_load_n(&g_flow_cnt[j], __ATOMIC_ACQUIRE);
    while (!(v & FLOW_DONE) && v >= need) {
        if (__atomic_compare_exchange_n(&g_flow_cnt[j], &v, v | FLOW_DONE, false,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_add_fetch(&g_sh->flow_done, 1, __ATOMIC_RELEASE);
            return true;
        }
    }
    return false;
}

/* A worker's first delivery of publish j to one subscriber. The workers
 * share CPU 1, so the counters do not bounce between cores. */
static void flow_count(uint64_t j)
{
    if (j >= g_total_pubs)
        return;
    uint32_t v = __atomic_add_fetch(&g_flow_cnt[j], 1, __ATOMIC_ACQ_REL);
    if (!(v & FLOW_DONE) &&
        v >= __atomic_load_n(&g_subs_chan[j % O.channels], __ATOMIC_RELAXED) &&
        flow_try_complete(j))
        g_flow_wake = 1; /* loop_once() wakes the parent once per round */
}

static void on_delivery(struct conn *c, const char *p, size_t n)
{
    const char *end = p + n, *m = memmem(p, n, "\"lgp\":", 6);
    if (!m) {
        g_st->other++;
        return;
    }
    m += 6;
    uint32_t pub = parse_u(&m, end), seq = 0;
    uint64_t ts = 0;
    bool ordered = false; /* our own key order: lgp, lgs, lgt */
    if (end - m >= 7 && !memcmp(m, ",\"lgs\":", 7)) {
        m += 7;
        seq = parse_u(&m, end);
        if (end - m >= 7 && !memcmp(m, ",\"lgt\":", 7)) {
            m += 7;
            ts = parse_u64(&m, end);
            ordered = true;
        }
    }
    if (!ordered) {
        /* Re-encoded by a policy (lua-cjson does not keep key order, and
         * Lua's table order changes from one state to the next): look the
         * keys up one by one. */
        uint64_t s64;
        if (!find_u64(p, end, "\"lgs\":", &s64) || !find_u64(p, end, "\"lgt\":", &ts) ||
            s64 > UINT32_MAX) {
            g_st->bad++;
            return;
        }
        seq = (uint32_t)s64;
    }
    g_st->delivered++;
    if (!g_st->first_rx)
        g_st->first_rx = g_now;
    g_st->last_rx = g_now;
    ts += g_t_base;
    hist_add(g_st, g_now > ts ? g_now - ts : 0);
    if (seq >= g_max_per_chan || pub >= g_npub) {
        g_st->out_of_range++;
        return;
    }
    uint8_t bit = (uint8_t)(1u << (seq & 7));
    if (c->seen[seq >> 3] & bit) {
        g_st->dup++;
        return;
    }
    c->seen[seq >> 3] |= bit;
    c->unique++;
    g_st->unique++;
    if (g_flow_cnt)
        flow_count((uint64_t)seq * O.channels + c->chan);
    if ((int32_t)seq < c->last[pub])
        g_st->reordered++;
    else
        c->last[pub] = (int32_t)seq;
    if (g_phase == PH_FINAL && c->unique >= g_sh->expected[c->chan])
        sub_mark_finished(c);
}

static void ack_reply(struct conn *c, const char *p, size_t n);

static void on_message(struct conn *c, int op, char *p, size_t n)
{
    (void)op;
    switch (c->role) {
    case R_SUB:
    case R_CR:
        if (c->state == S_READY && c->role == R_SUB) {
            on_delivery(c, p, n);
        } else if (c->state == S_WELCOME) {
            if (memmem(p, n, "\"welcome\"", 9))
                send_subscribe(c);
            else
                g_st->other++;
        } else if (c->state == S_SUBACK) {
            if (memmem(p, n, "\"ok\":true", 9)) {
                sub_ready(c);
            } else {
                if (O.verbose)
                    note("subscribe refused: %.*s", (int)(n > 200 ? 200 : n), p);
                ws_close(c, 1000);
                conn_dead(c, "subscribe refused");
            }
        } else {
            g_st->other++;
        }
        return;
    case R_WSPUB:
    case R_PROBE:
        if (c->state == S_WELCOME) {
            c->state = S_READY;
            on_open(c);
        } else if (c->state == S_READY) {
            if (c->role == R_PROBE)
                probe_reply(p, n);
            else
                ack_reply(c, p, n);
        }
        return;
    default:
        return;
    }
}

/* Opens subscribers up to the concurrency limit. */
static void subs_open_more(void)
{
    while (g_next_open < g_nconns && g_opening < O.connect_inflight) {
        struct conn *c = &g_conns[g_next_open];
        uint32_t i = g_first + g_next_open;
        g_next_open++;
        g_opening++;
        conn_start(c, R_SUB, i, i % O.channels);
    }
}

/* ---- connrate ---------------------------------------------------------- */

static uint32_t g_cr_active;

static void cr_next(void)
{
    for (uint32_t i = 0; i < g_nconns && g_cr_started < g_cr_count; i++) {
        struct conn *c = &g_conns[i];
        if (c->state != S_FREE && c->state != S_DEAD)
            continue;
        uint32_t gi = (uint32_t)(g_cr_started * O.procs + (uint64_t)g_proc);
        g_cr_started++;
        g_cr_active++;
        conn_start(c, R_CR, gi, gi % O.channels);
    }
}

/* ---- publishers (parent) ---------------------------------------------- */

static struct conn g_pubs[MAX_PUB_CONNS];
static uint32_t g_npubs, g_pubs_ready;
static uint64_t g_next_pub, g_acked, g_pub_failed, g_inflight, g_max_lag,
    g_http_reconnects;
static uint64_t g_pub_waited;             /* rate: due, every connection busy */
static uint64_t g_wait_mark = UINT64_MAX; /* the publish last counted there */
static uint64_t g_flow_oldest;            /* --flow: oldest publish not done */
static uint64_t g_t0;
static uint32_t *g_acked_chan;
static uint32_t *g_id_chan; /* ws luahub: id -> channel ring */
static int g_pub_fatal;

static void on_open(struct conn *c)
{
    if (c->role == R_SUB || c->role == R_CR) {
        sub_ready(c);
        return;
    }
    if (c->role == R_PROBE) {
        c->complete = 1;
        return;
    }
    if (c->role == R_WSPUB || c->role == R_HTTPPUB) {
        if (!c->complete) {
            c->complete = 1;
            g_pubs_ready++;
        }
    }
}

static void ack_one(uint32_t chan, bool ok)
{
    if (g_inflight)
        g_inflight--;
    if (ok) {
        g_acked++;
        g_acked_chan[chan]++;
    } else {
        g_pub_failed++;
    }
}

/* A reply on a WebSocket publisher: luahub {"id":N,"ok":true}; Nchan
 * answers every published frame with the channel's status. */
static void ack_reply(struct conn *c, const char *p, size_t n)
{
    if (c->inflight)
        c->inflight--;
    if (O.target == T_NCHAN) {
        ack_one(c->chan, true);
        return;
    }
    const char *m = memmem(p, n, "\"id\":", 5);
    bool ok = memmem(p, n, "\"ok\":true", 9) != NULL;
    if (!m) { /* not a reply */
        g_st->other++;
        c->inflight++;
        return;
    }
    m += 5;
    uint64_t id = parse_u64(&m, p + n);
    if (!ok && O.verbose)
        note("publish refused: %.*s", (int)(n > 200 ? 200 : n), p);
    ack_one(g_id_chan[(id - 1) % ID_RING], ok);
}

static void on_http_response(struct conn *c, int status, bool close)
{
    if (c->http_busy) {
        c->http_busy = 0;
        ack_one(c->chan, status / 100 == 2);
    }
    if (close)
        c->http_close = 1;
}

/* Builds the data value: exactly O.size bytes when O.size allows. */
static size_t build_data(char *out, size_t cap, uint32_t pub, uint32_t seq, uint64_t ts)
{
    int n = snprintf(out, cap, "{\"lgp\":%u,\"lgs\":%u,\"lgt\":%" PRIu64 ",\"pad\":\"", pub, seq, ts);
    size_t pad = O.size > (size_t)n + 2 ? O.size - (size_t)n - 2 : 0;
    if ((size_t)n + pad + 3 > cap)
        die("payload buffer too small");
    memset(out + n, 'x', pad);
    memcpy(out + n + pad, "\"}", 2);
    return (size_t)n + pad + 2;
}

/* Sends publish number j (channel j % C, sequence j / C) on c. */
static void publish_one(struct conn *c, uint64_t j, uint32_t slot)
{
    uint32_t chan = (uint32_t)(j % O.channels), seq = (uint32_t)(j / O.channels);
    char cname[300];
    channel_name(chan, cname, sizeof cname);
    uint64_t ts = now_ns() - g_t_base; /* see g_t_base */
    char *t = g_tmp;
    size_t cap = g_tmp_cap, n = 0;
    if (O.pub == P_WS) {
        if (O.target == T_LUAHUB) {
            n = (size_t)snprintf(t, cap, "{\"op\":\"publish\",\"channel\":\"%s\",\"data\":", cname);
            n += build_data(t + n, cap - n, slot, seq, ts);
            n += (size_t)snprintf(t + n, cap - n, ",\"id\":%" PRIu64 "}", j + 1);
            g_id_chan[j % ID_RING] = chan;
        } else {
            n = build_data(t, cap, slot, seq, ts);
        }
        ws_put(c, 0x1, t, n);
        c->inflight++;
    } else {
        char body_pre[400];
        const char *path = O.api_path;
        char npath[400];
        size_t bl, pl = 0;
        if (O.target == T_LUAHUB) {
            pl = (size_t)snprintf(body_pre, sizeof body_pre, "{\"channel\":\"%s\",\"data\":", cname);
        } else {
            snprintf(npath, sizeof npath, "%s%s", O.pub_prefix, cname);
            path = npath;
        }
        char *data = t + 1024;
        bl = build_data(data, cap - 1024, slot, seq, ts);
        size_t total = pl + bl + (O.target == T_LUAHUB ? 1 : 0);
        n = (size_t)snprintf(t, 1024,
                             "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                             "Content-Length: %zu\r\n\r\n",
                             path, O.host, O.port, total);
        wbuf_put(&c->w, t, n);
        if (pl)
            wbuf_put(&c->w, body_pre, pl);
        wbuf_put(&c->w, data, bl);
        if (O.target == T_LUAHUB)
            wbuf_put(&c->w, "}", 1);
        c->http_busy = 1;
        c->chan = chan;
    }
    g_inflight++;
    g_next_pub++;
}

/* --flow: publishes sent and neither delivered to every subscriber of their
 * channel nor refused. */
static uint64_t flow_inflight(void)
{
    uint64_t gone = __atomic_load_n(&g_sh->flow_done, __ATOMIC_ACQUIRE) + g_pub_failed;
    return g_next_pub > gone ? g_next_pub - gone : 0;
}

/* --flow: completes the publishes the workers could not see complete (a
 * subscriber dropped after they were sent), from the oldest not done. */
static void flow_rescan(void)
{
    for (uint64_t j = g_flow_oldest; j < g_next_pub; j++)
        flow_try_complete(j);
    while (g_flow_oldest < g_next_pub &&
           (__atomic_load_n(&g_flow_cnt[g_flow_oldest], __ATOMIC_ACQUIRE) & FLOW_DONE))
        g_flow_oldest++;
}

/* Sends what the schedule and the window allow; returns ms until the next
 * scheduled publish (rate mode) or -1. */
static int pub_pump(void)
{
    bool dirty[MAX_PUB_CONNS] = {0};
    int wait_ms = -1;
    uint64_t now = now_ns();
    for (uint64_t guard = 0; g_next_pub < g_total_pubs && guard < 1000000; guard++) {
        uint64_t sched = 0;
        if (O.rate > 0) {
            sched = g_t0 + (uint64_t)((double)g_next_pub * 1e9 / O.rate);
            if (sched > now) {
                wait_ms = (int)((sched - now + 999999) / 1000000);
                break;
            }
        }
        uint32_t chan = (uint32_t)(g_next_pub % O.channels), k;
        struct conn *c = NULL;
        if (O.flow && flow_inflight() >= O.flow)
            break;
        if (O.pub == P_WS) {
            /* With --flow, replies only bound the id ring. */
            if (g_inflight >= (O.flow ? ID_RING / 2 : O.window))
                break;
            k = O.target == T_NCHAN ? chan : (uint32_t)(g_next_pub % g_npubs);
            c = &g_pubs[k];
        } else {
            for (k = 0; k < g_npubs; k++)
                if (g_pubs[k].state == S_READY && !g_pubs[k].http_busy && !g_pubs[k].http_close)
                    break;
            if (k == g_npubs) {
                /* Open loop: this publish is due and waits for a connection
                 * (counted once; its lag shows in pub_lag_max_ms). */
                if (O.rate > 0 && g_wait_mark != g_next_pub) {
                    g_wait_mark = g_next_pub;
                    g_pub_waited++;
                }
                break;
            }
            c = &g_pubs[k];
        }
        if (c->state != S_READY)
            break;
        uint32_t slot = (O.pub == P_HTTP || O.target == T_LUAHUB) ? k : 0;
        if (O.rate > 0 && now - sched > g_max_lag)
            g_max_lag = now - sched;
        publish_one(c, g_next_pub, slot);
        if (g_flow_cnt) /* a channel without subscribers: done at once */
            flow_try_complete(g_next_pub - 1);
        dirty[k] = true;
        if (O.pub == P_HTTP) /* one request per connection: flush now */
            conn_flush(c);
    }
    for (uint32_t k = 0; k < g_npubs; k++)
        if (dirty[k] && O.pub == P_WS)
            conn_flush(&g_pubs[k]);
    return wait_ms;
}

static void pub_start(uint32_t k)
{
    struct conn *c = &g_pubs[k];
    uint32_t chan = O.target == T_NCHAN && O.pub == P_WS ? k : 0;
    conn_start(c, O.pub == P_WS ? R_WSPUB : R_HTTPPUB, k, chan);
}

/* ---- probe (parent) ---------------------------------------------------- */

/* --probe-ms: one more WebSocket connection, not subscribed, that sends a
 * WebSocket PING (payload: the probe's sequence number) and, to luahub,
 * {"op":"ping","id":seq+1} every probe-ms from the first publish to the
 * last delivery, and records each answer's round trip. */
static struct conn g_probe;
static int g_probe_on;
static uint64_t g_probe_next, g_probe_seq, g_probe_skipped, g_probe_ping_ok, g_probe_op_ok;
static uint64_t g_probe_pong_from;  /* oldest PING no PONG has answered yet */
static uint64_t g_probe_coalesced;  /* PINGs answered by a later PING's PONG */
static uint64_t g_probe_sent_at[PROBE_RING];
static uint8_t g_probe_got[PROBE_RING];       /* 1: PONG seen, 2: op reply seen */
static struct wstats g_probe_ping, g_probe_op; /* their histograms */

/* Sends the probe that is due, if any. Ticks missed while loadgen itself
 * was late are skipped and counted, not sent in a burst. */
static void probe_pump(void)
{
    if (!g_probe_on || g_probe.state != S_READY || g_now < g_probe_next)
        return;
    uint64_t per = (uint64_t)(O.probe_ms * 1e6), late = (g_now - g_probe_next) / per;
    g_probe_skipped += late;
    g_probe_next += (late + 1) * per;
    uint64_t seq = g_probe_seq++;
    char b[64];
    memcpy(b, &seq, sizeof seq);
    ws_put(&g_probe, 0x9, b, sizeof seq);
    if (O.target == T_LUAHUB) {
        int n = snprintf(b, sizeof b, "{\"op\":\"ping\",\"id\":%" PRIu64 "}", seq + 1);
        ws_put(&g_probe, 0x1, b, (size_t)n);
    }
    g_probe_got[seq % PROBE_RING] = 0;
    g_probe_sent_at[seq % PROBE_RING] = now_ns();
    conn_flush(&g_probe);
}

static void probe_answer(uint64_t seq, uint8_t bit, struct wstats *st, uint64_t *ok)
{
    if (seq >= g_probe_seq || g_probe_seq - seq > PROBE_RING)
        return; /* not ours, or older than the ring */
    uint8_t *got = &g_probe_got[seq % PROBE_RING];
    if (*got & bit)
        return;
    *got |= bit;
    (*ok)++;
    hist_add(st, g_now - g_probe_sent_at[seq % PROBE_RING]);
}

/* A PONG answers its PING and every earlier one still waiting: a server may
 * answer several PINGs received before it could reply with one PONG for the
 * latest (RFC 6455 5.5.3), and those waited as long. */
static void probe_pong(const char *p, size_t n)
{
    uint64_t seq;
    if (n != sizeof seq)
        return; /* not one of our PINGs */
    memcpy(&seq, p, sizeof seq);
    if (seq >= g_probe_seq)
        return;
    uint64_t q = g_probe_pong_from;
    if (q <= seq) {
        if (seq - q >= PROBE_RING)
            q = seq - PROBE_RING + 1;
        for (; q < seq; q++) {
            uint64_t before = g_probe_ping_ok;
            probe_answer(q, 1, &g_probe_ping, &g_probe_ping_ok);
            g_probe_coalesced += g_probe_ping_ok - before;
        }
        g_probe_pong_from = seq + 1;
    }
    probe_answer(seq, 1, &g_probe_ping, &g_probe_ping_ok);
}

static void probe_reply(const char *p, size_t n)
{
    const char *m = memmem(p, n, "\"id\":", 5);
    if (!m || !memmem(p, n, "\"ok\":true", 9))
        return;
    m += 5;
    uint64_t id = parse_u64(&m, p + n);
    if (id)
        probe_answer(id - 1, 2, &g_probe_op, &g_probe_op_ok);
}

/* ---- connection teardown ---------------------------------------------- */

static void conn_release(struct conn *c)
{
    if (c->fd >= 0) {
        close(c->fd); /* also removes it from the epoll set */
        c->fd = -1;
        g_open--;
    }
    if (c->state == S_CLOSING && g_closing)
        g_closing--;
    free(c->rbuf);
    c->rbuf = NULL;
    c->rlen = c->rcap = 0;
    free(c->frag);
    c->frag = NULL;
    c->flen = c->fcap = 0;
    free(c->w.p);
    memset(&c->w, 0, sizeof c->w);
    c->state = S_DEAD;
}

static void conn_dead(struct conn *c, const char *why)
{
    if (c->state == S_DEAD)
        return;
    int prev = c->state;
    bool orderly = prev == S_CLOSING;
    if (!orderly)
        note("[conn %u role %d] %s (state %d)", c->idx, c->role, why, prev);
    conn_release(c);
    switch (c->role) {
    case R_SUB:
        /* Subscribers only close on their own in PH_CLOSE: any earlier end
         * of a subscribed connection is the server dropping it. */
        if (!c->subscribed) {
            g_st->subs_failed++;
            g_opening--;
            g_resolved++;
        } else if (g_phase < PH_CLOSE) {
            g_st->dropped++;
            __atomic_sub_fetch(&g_subs_chan[c->chan], 1, __ATOMIC_RELAXED);
        }
        sub_mark_finished(c);
        break;
    case R_CR:
        /* The pool slot is reused by cr_next() from the main loop, never
         * here: the caller may still be inside this connection's input. */
        if (c->subscribed)
            g_st->cr_ok++;
        else
            g_st->cr_failed++;
        if (c->subscribed && !orderly)
            g_st->cr_close_errors++;
        g_cr_active--;
        break;
    case R_WSPUB:
        if (g_phase == PH_RUN || g_phase == PH_SETUP) {
            warnx_("WebSocket publisher %u lost: %s", c->idx, why);
            g_pub_fatal = 1;
        }
        break;
    case R_HTTPPUB:
        if (c->http_busy) {
            c->http_busy = 0;
            ack_one(c->chan, false);
        }
        if (c->complete) {
            c->complete = 0;
            g_pubs_ready--;
        }
        /* run_fanout() reconnects it (not here: see R_CR). */
        if (g_phase == PH_SETUP)
            g_pub_fatal = 1;
        break;
    case R_PROBE:
        if (g_phase < PH_CLOSE)
            warnx_("probe connection lost: %s", why);
        g_probe_on = 0;
        break;
    }
}

static void on_eof(struct conn *c)
{
    if (c->role == R_CR && c->state == S_CLOSING) {
        conn_dead(c, "closed");
        return;
    }
    if (c->role == R_HTTPPUB && c->http_close && !c->http_busy) {
        c->state = S_CLOSING;
        g_closing++;
    }
    conn_dead(c, c->state == S_CLOSING ? "closed" : "server closed the connection");
}

/* ---- event loop ------------------------------------------------------- */

static struct conn g_ctrl[MAX_PROCS]; /* role R_CTRL: .fd and .idx */
static void on_ctrl(struct conn *c);

static int ms_until(uint64_t deadline, int cap)
{
    if (deadline <= g_now)
        return 0;
    uint64_t ms = (deadline - g_now + 999999) / 1000000;
    return ms > (uint64_t)cap ? cap : (int)ms;
}

/* One epoll_wait round, at most timeout_ms; also sends a due probe (parent)
 * and wakes the parent when this round completed a --flow publish. */
static void loop_once(int timeout_ms)
{
    struct epoll_event ev[512];
    if (g_probe_on) {
        g_now = now_ns();
        timeout_ms = ms_until(g_probe_next, timeout_ms);
    }
    int n = epoll_wait(g_ep, ev, 512, timeout_ms);
    g_now = now_ns();
    if (n < 0) {
        if (errno == EINTR)
            return;
        die("epoll_wait: %s", strerror(errno));
    }
    for (int i = 0; i < n; i++) {
        struct conn *c = ev[i].data.ptr;
        if (c->role == R_CTRL) {
            on_ctrl(c);
        } else if (c->role == R_EVENT) {
            uint64_t v;
            if (read(c->fd, &v, sizeof v) < 0 && errno != EAGAIN)
                die("read eventfd: %s", strerror(errno));
        } else if (c->state != S_DEAD && c->state != S_FREE) {
            on_event(c, ev[i].events);
        }
    }
    probe_pump();
    if (g_flow_wake) {
        uint64_t one = 1;
        g_flow_wake = 0;
        if (write(g_flow_efd, &one, sizeof one) < 0 && errno != EAGAIN)
            _exit(7);
    }
}

static uint64_t secs(double s) { return (uint64_t)(s * 1e9); }

/* Sends close frames to every open connection in [cs, cs+n) and waits
 * (bounded) for the server to close; then closes whatever is left. */
static void close_all(struct conn *cs, uint32_t n, double wait_s)
{
    for (uint32_t i = 0; i < n; i++) {
        struct conn *c = &cs[i];
        if (c->state == S_DEAD || c->state == S_FREE)
            continue;
        if (c->state >= S_WELCOME && c->state <= S_READY && c->role != R_HTTPPUB)
            ws_close(c, 1000);
        else if (c->state != S_CLOSING)
            conn_release(c);
    }
    uint64_t dl = g_now + secs(wait_s);
    while (g_closing > 0 && g_now < dl)
        loop_once(ms_until(dl, 100));
    for (uint32_t i = 0; i < n; i++)
        if (cs[i].state != S_DEAD && cs[i].state != S_FREE)
            conn_release(&cs[i]);
}

/* ---- worker processes --------------------------------------------------- */

static int g_ctl_fd = -1; /* worker: its end of the socketpair */
static char g_cmd;        /* worker: last command from the parent */

static void ctrl_send(int fd, char b)
{
    for (int i = 0; i < 100; i++) {
        ssize_t k = write(fd, &b, 1);
        if (k == 1)
            return;
        if (k < 0 && errno != EINTR && errno != EAGAIN)
            break;
    }
    if (g_proc >= 0)
        _exit(3);
}

static void worker_wait_cmd(char want, double max_s)
{
    uint64_t dl = now_ns() + secs(max_s);
    g_now = now_ns();
    while (g_cmd != want && g_now < dl)
        loop_once(ms_until(dl, 200));
    if (g_cmd != want)
        _exit(4); /* the parent is gone or stuck: don't linger */
}

static void worker_main(int proc, int fd, uint32_t first, uint32_t n)
{
    g_proc = proc;
    g_ctl_fd = fd;
    g_st = &g_sh->w[proc];
    g_first = first;
    g_nconns = n;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1)
        _exit(5);
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    g_ctrl[0].role = R_CTRL;
    g_ctrl[0].fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &g_ctrl[0]};
    epoll_ctl(g_ep, EPOLL_CTL_ADD, fd, &ev);
    g_conns = xcalloc(n, sizeof *g_conns);
    for (uint32_t i = 0; i < n; i++)
        g_conns[i].fd = -1;
    g_now = now_ns();
    double parent_slack = O.timeout + O.duration + O.drain + O.hold + 120;

    if (O.mode == M_CONNRATE) {
        g_phase = PH_RUN;
        cr_next();
        uint64_t dl = g_now + secs(O.timeout);
        while ((g_cr_started < g_cr_count || g_cr_active) && g_now < dl) {
            loop_once(ms_until(dl, 50));
            cr_next();
            for (uint32_t i = 0; i < n; i++) { /* ≤ inflight: cheap */
                struct conn *c = &g_conns[i];
                if (c->state == S_CLOSING && c->deadline && g_now > c->deadline) {
                    g_st->cr_close_errors++;
                    conn_dead(c, "close timed out");
                }
            }
        }
        if (g_cr_active)
            warnx_("connrate: %u connections still active at the timeout", g_cr_active);
        ctrl_send(fd, 'D');
        worker_wait_cmd('X', parent_slack);
        close_all(g_conns, n, 1);
        _exit(0);
    }

    /* fanout and idle: open and subscribe everyone, then report ready. */
    size_t bm = (g_max_per_chan + 7) / 8;
    for (uint32_t i = 0; i < n; i++) {
        char *mem = xcalloc(1, g_npub * sizeof(int32_t) + bm);
        g_conns[i].last = (int32_t *)mem;
        for (uint32_t k = 0; k < g_npub; k++)
            g_conns[i].last[k] = -1;
        g_conns[i].seen = (uint8_t *)mem + g_npub * sizeof(int32_t);
    }
    subs_open_more();
    uint64_t dl = g_now + secs(O.timeout);
    while (g_resolved < n && g_now < dl && g_cmd != 'X') {
        loop_once(ms_until(dl, 200));
        subs_open_more();
    }
    if (g_resolved < n)
        warnx_("setup timed out: %" PRIu64 " of %u subscribed", g_st->subs_ok, n);
    /* Anything still opening counts as failed. */
    for (uint32_t i = 0; i < n; i++) {
        struct conn *c = &g_conns[i];
        if (c->state != S_DEAD && c->state != S_FREE && c->state < S_READY) {
            conn_release(c);
            g_st->subs_failed++;
            sub_mark_finished(c);
        }
    }
    g_phase = PH_RUN;
    uint64_t cpu_ready = self_cpu_ns();
    ctrl_send(fd, 'R');
    worker_wait_cmd('F', parent_slack);

    /* Publishing is over: wait until every live subscriber has everything
     * the server acknowledged, or the drain timeout. */
    g_phase = PH_FINAL;
    for (uint32_t i = 0; i < n; i++) {
        struct conn *c = &g_conns[i];
        if (c->state != S_READY || c->unique >= g_sh->expected[c->chan])
            sub_mark_finished(c);
    }
    dl = g_now + secs(O.mode == M_FANOUT ? O.drain : 1);
    while (g_finished < n && g_now < dl && g_cmd != 'X')
        loop_once(ms_until(dl, 100));
    for (uint32_t i = 0; i < n; i++) {
        struct conn *c = &g_conns[i];
        uint32_t exp = g_sh->expected[c->chan];
        if (!c->subscribed)
            continue;
        g_st->expected += exp;
        if (exp > c->unique)
            g_st->lost += exp - c->unique;
    }
    g_st->complete_subs = g_finished;
    g_st->cpu_run_ns = self_cpu_ns() - cpu_ready;
    ctrl_send(fd, 'D');
    worker_wait_cmd('X', parent_slack);
    g_phase = PH_CLOSE;
    close_all(g_conns, n, 3);
    _exit(0);
}

/* Worker side of the control socket. */
static void on_ctrl_worker(struct conn *c)
{
    char b[16];
    ssize_t k = read(c->fd, b, sizeof b);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR))
        _exit(6); /* parent gone */
    for (ssize_t i = 0; i < k; i++)
        g_cmd = b[i];
}

/* ---- parent ------------------------------------------------------------ */

static pid_t g_kids[MAX_PROCS];
static int g_nkids;
static uint32_t g_kid_ready, g_kid_done;

static void on_ctrl(struct conn *c)
{
    if (g_proc >= 0) {
        on_ctrl_worker(c);
        return;
    }
    char b[16];
    ssize_t k = read(c->fd, b, sizeof b);
    if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR)) {
        epoll_ctl(g_ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
        /* After 'X' (PH_CLOSE) workers exit by design: not a failure (the
         * fanout's closing loop used to see it and mark the run incomplete). */
        if (g_phase < PH_CLOSE) {
            warnx_("worker %u exited early", c->idx);
            g_pub_fatal = 2;
        }
        return;
    }
    for (ssize_t i = 0; i < k; i++) {
        if (b[i] == 'R')
            g_kid_ready++;
        else if (b[i] == 'D')
            g_kid_done++;
    }
}

static void kids_send(char b)
{
    for (int i = 0; i < g_nkids; i++)
        if (g_ctrl[i].fd >= 0)
            ctrl_send(g_ctrl[i].fd, b);
}

/* Waits for our own workers (by pid) to exit; kills stragglers. */
static void kids_reap(double max_s)
{
    uint64_t dl = now_ns() + secs(max_s);
    int left = g_nkids;
    while (left > 0) {
        for (int i = 0; i < g_nkids; i++) {
            if (!g_kids[i])
                continue;
            pid_t r = waitpid(g_kids[i], NULL, WNOHANG);
            if (r == g_kids[i] || (r < 0 && errno == ECHILD)) {
                g_kids[i] = 0;
                left--;
            }
        }
        if (left && now_ns() > dl) {
            for (int i = 0; i < g_nkids; i++)
                if (g_kids[i]) {
                    kill(g_kids[i], SIGKILL);
                    waitpid(g_kids[i], NULL, 0);
                    g_kids[i] = 0;
                }
            break;
        }
        if (left)
            usleep(10000);
    }
}

static void kids_spawn(uint32_t total)
{
    for (uint32_t p = 0; p < O.procs; p++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
            die("socketpair: %s", strerror(errno));
        uint32_t first = (uint32_t)((uint64_t)total * p / O.procs);
        uint32_t last = (uint32_t)((uint64_t)total * (p + 1) / O.procs);
        fflush(NULL);
        pid_t pid = fork();
        if (pid < 0)
            die("fork: %s", strerror(errno));
        if (pid == 0) {
            close(sv[0]);
            close(g_ep);
            for (int i = 0; i < g_nkids; i++)
                close(g_ctrl[i].fd);
            g_rng ^= (uint64_t)getpid() * 0x9E3779B97F4A7C15ULL;
            if (O.mode == M_CONNRATE) {
                g_cr_count = O.count / O.procs + (p < O.count % O.procs ? 1 : 0);
                uint32_t lim = O.inflight / O.procs + (p < O.inflight % O.procs ? 1 : 0);
                worker_main((int)p, sv[1], 0, lim ? lim : 1);
            }
            worker_main((int)p, sv[1], first, last - first);
        }
        close(sv[1]);
        g_kids[g_nkids] = pid;
        g_ctrl[g_nkids].role = R_CTRL;
        g_ctrl[g_nkids].fd = sv[0];
        g_ctrl[g_nkids].idx = (uint32_t)g_nkids;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &g_ctrl[g_nkids]};
        epoll_ctl(g_ep, EPOLL_CTL_ADD, sv[0], &ev);
        g_nkids++;
    }
}

static void wait_kids(uint32_t *counter, double max_s)
{
    uint64_t dl = now_ns() + secs(max_s);
    g_now = now_ns();
    while (*counter < (uint32_t)g_nkids && g_now < dl && g_pub_fatal != 2)
        loop_once(ms_until(dl, 100));
}

/* Aggregated worker counters. */
static struct wstats g_sum;

static void sum_stats(void)
{
    memset(&g_sum, 0, sizeof g_sum);
    for (int p = 0; p < g_nkids; p++) {
        struct wstats *w = &g_sh->w[p];
        g_sum.subs_ok += w->subs_ok;
        g_sum.subs_failed += w->subs_failed;
        g_sum.dropped += w->dropped;
        g_sum.delivered += w->delivered;
        g_sum.unique += w->unique;
        g_sum.dup += w->dup;
        g_sum.reordered += w->reordered;
        g_sum.lost += w->lost;
        g_sum.bad += w->bad;
        g_sum.other += w->other;
        g_sum.out_of_range += w->out_of_range;
        g_sum.cr_ok += w->cr_ok;
        g_sum.cr_failed += w->cr_failed;
        g_sum.pings += w->pings;
        g_sum.complete_subs += w->complete_subs;
        g_sum.expected += w->expected;
        g_sum.cr_close_errors += w->cr_close_errors;
        g_sum.cpu_run_ns += w->cpu_run_ns;
        if (w->last_close_code)
            g_sum.last_close_code = w->last_close_code;
        if (w->first_rx && (!g_sum.first_rx || w->first_rx < g_sum.first_rx))
            g_sum.first_rx = w->first_rx;
        if (w->last_rx > g_sum.last_rx)
            g_sum.last_rx = w->last_rx;
        if (w->lat_max > g_sum.lat_max)
            g_sum.lat_max = w->lat_max;
        for (int i = 0; i < HIST_N; i++)
            g_sum.hist[i] += w->hist[i];
    }
}

/* ---- JSON output ------------------------------------------------------- */

static void json_str(const char *k, const char *v)
{
    printf(",\"%s\":\"", k);
    for (const char *p = v; *p; p++) {
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if ((unsigned char)*p < 0x20)
            printf("\\u%04x", *p);
        else
            putchar(*p);
    }
    putchar('"');
}

static void json_num(const char *k, double v)
{
    if (isnan(v) || isinf(v))
        printf(",\"%s\":null", k);
    else if (v == floor(v) && fabs(v) < 1e15)
        printf(",\"%s\":%.0f", k, v);
    else
        printf(",\"%s\":%.3f", k, v);
}

static void json_u(const char *k, uint64_t v) { printf(",\"%s\":%" PRIu64, k, v); }

static void json_latency(const char *k)
{
    uint64_t count = 0;
    for (int i = 0; i < HIST_N; i++)
        count += g_sum.hist[i];
    printf(",\"%s\":{\"count\":%" PRIu64, k, count);
    static const struct { const char *n; double q; } qs[] = {
        {"p50", .50}, {"p90", .90}, {"p99", .99}, {"p999", .999}};
    for (size_t i = 0; i < sizeof qs / sizeof qs[0]; i++)
        printf(",\"%s\":%.1f", qs[i].n, (double)hist_quantile(&g_sum, count, qs[i].q) / 1e3);
    printf(",\"max\":%.1f}", (double)g_sum.lat_max / 1e3);
}

static void json_head(void)
{
    static const char *modes[] = {"fanout", "idle", "connrate"};
    printf("{\"mode\":\"%s\"", modes[O.mode]);
    json_str("target", O.target == T_LUAHUB ? "luahub" : "nchan");
    if (*O.label)
        json_str("label", O.label);
    json_u("procs", O.procs);
}

/* prefix_answered, prefix_p50_ms, _p99_ms, _max_ms (null when none). */
static void json_probe(const char *prefix, const struct wstats *st, uint64_t ok)
{
    char k[64];
    snprintf(k, sizeof k, "%s_answered", prefix);
    json_u(k, ok);
    static const struct { const char *n; double q; } qs[] = {{"p50", .50}, {"p99", .99}};
    for (size_t i = 0; i < sizeof qs / sizeof qs[0]; i++) {
        snprintf(k, sizeof k, "%s_%s_ms", prefix, qs[i].n);
        json_num(k, ok ? (double)hist_quantile(st, ok, qs[i].q) / 1e6 : NAN);
    }
    snprintf(k, sizeof k, "%s_max_ms", prefix);
    json_num(k, ok ? (double)st->lat_max / 1e6 : NAN);
}

/* <what>_before_kb, <what>_held_kb, <what>_per_conn_kb (null if unread). */
static void json_kb_per_conn(const char *what, int64_t before, int64_t held, uint64_t conns)
{
    char k[64];
    snprintf(k, sizeof k, "%s_before_kb", what);
    json_num(k, before < 0 ? NAN : (double)before);
    snprintf(k, sizeof k, "%s_held_kb", what);
    json_num(k, held < 0 ? NAN : (double)held);
    snprintf(k, sizeof k, "%s_per_conn_kb", what);
    json_num(k, before < 0 || held < 0 || !conns ? NAN : (double)(held - before) / (double)conns);
}

static double cpu_s_or_nan(int64_t t0, int64_t t1)
{
    return t0 < 0 || t1 < 0 ? NAN : ticks_to_s(t1 - t0);
}

/* ---- the three modes ---------------------------------------------------- */

static int run_fanout(void)
{
    g_acked_chan = xcalloc(O.channels, sizeof *g_acked_chan);
    g_id_chan = xcalloc(ID_RING, sizeof *g_id_chan);
    int64_t rss0 = server_rss_kb(), pss0 = server_pss_kb();
    kids_spawn(O.subs);
    uint64_t t_setup = now_ns();
    wait_kids(&g_kid_ready, O.timeout + 10);
    if (g_kid_ready < (uint32_t)g_nkids)
        g_pub_fatal = 3;
    int64_t rss1 = server_rss_kb(), pss1 = server_pss_kb();
    sum_stats();
    double setup_s = (double)(now_ns() - t_setup) / 1e9;
    note("subscribed %" PRIu64 " of %u in %.2fs", g_sum.subs_ok, O.subs, setup_s);

    /* Publishers, and the probe. */
    g_phase = PH_SETUP;
    static struct conn flow_ev = {.role = R_EVENT};
    if (O.flow) {
        flow_ev.fd = g_flow_efd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &flow_ev};
        if (epoll_ctl(g_ep, EPOLL_CTL_ADD, g_flow_efd, &ev) < 0)
            die("epoll_ctl: %s", strerror(errno));
    }
    for (uint32_t k = 0; k < g_npubs && !g_pub_fatal; k++)
        pub_start(k);
    if (O.probe_ms > 0 && !g_pub_fatal)
        conn_start(&g_probe, R_PROBE, 0, 0);
    uint64_t dl = now_ns() + secs(O.timeout);
    g_now = now_ns();
    while ((g_pubs_ready < g_npubs || (O.probe_ms > 0 && !g_probe.complete)) &&
           g_now < dl && !g_pub_fatal)
        loop_once(ms_until(dl, 100));
    if (g_pubs_ready < g_npubs) {
        warnx_("publishers not ready (%u of %u)", g_pubs_ready, g_npubs);
        g_pub_fatal = g_pub_fatal ? g_pub_fatal : 4;
    }
    if (O.probe_ms > 0 && !g_probe.complete)
        warnx_("the probe connection is not ready: no probes");

    int64_t cpu0 = server_cpu_ticks(), core0 = core_busy_ticks(), aux0 = aux_cpu_ticks();
    uint64_t self0 = self_cpu_ns();
    g_phase = PH_RUN;
    g_t0 = now_ns();
    g_now = g_t0;
    g_probe_next = g_t0;
    g_probe_on = g_probe.complete && g_probe.state == S_READY;
    dl = g_t0 + secs(O.timeout + (O.rate > 0 ? O.duration : 0));
    uint64_t flow_seen = 0, flow_progress = g_t0;
    if (!g_pub_fatal) {
        while (g_now < dl && !g_pub_fatal &&
               (g_next_pub < g_total_pubs || g_inflight > 0 || (O.flow && flow_inflight()))) {
            int w = pub_pump();
            if (g_next_pub >= g_total_pubs && !g_inflight && !(O.flow && flow_inflight()))
                break;
            loop_once(w >= 0 ? (w < ms_until(dl, 100) ? w : ms_until(dl, 100)) : ms_until(dl, 100));
            if (O.flow) { /* no completion for 100 ms: look for dropped subscribers' */
                uint64_t d = __atomic_load_n(&g_sh->flow_done, __ATOMIC_ACQUIRE);
                if (d != flow_seen) {
                    flow_seen = d;
                    flow_progress = g_now;
                } else if (g_now - flow_progress > 100000000u) {
                    flow_rescan();
                    flow_progress = g_now;
                }
            }
            /* Replace HTTP publishers the server closed after a response. */
            for (uint32_t k = 0; k < g_npubs && O.pub == P_HTTP; k++) {
                struct conn *c = &g_pubs[k];
                if (c->http_close && !c->http_busy && c->state == S_READY) {
                    c->state = S_CLOSING;
                    g_closing++;
                    conn_dead(c, "server asked to close");
                }
                if (c->state == S_DEAD) {
                    if (g_http_reconnects >= 10000) {
                        g_pub_fatal = 1;
                        break;
                    }
                    g_http_reconnects++;
                    pub_start(k);
                }
            }
        }
    }
    uint64_t t_pub_end = now_ns();
    if (g_inflight)
        warnx_("%" PRIu64 " publishes unanswered at the timeout", g_inflight);
    memcpy(g_sh->expected, g_acked_chan, O.channels * sizeof(uint32_t));
    g_phase = PH_FINAL;
    kids_send('F');
    wait_kids(&g_kid_done, O.drain + 10);
    int64_t cpu1 = server_cpu_ticks(), core1 = core_busy_ticks(), aux1 = aux_cpu_ticks();
    uint64_t t_end = now_ns(), self1 = self_cpu_ns();
    g_probe_on = 0;
    int64_t rss2 = server_rss_kb();
    sum_stats();
    g_phase = PH_CLOSE;
    kids_send('X');
    close_all(g_pubs, g_npubs, 2);
    close_all(&g_probe, 1, 1);
    kids_reap(15);

    /* Expected deliveries: acknowledged publishes of each channel times its
     * subscribers, summed by the workers. */
    uint64_t expected = g_sum.expected;
    double cpu_s = cpu_s_or_nan(cpu0, cpu1), wall_s = (double)(t_end - g_t0) / 1e9;
    double client_s = (double)(self1 - self0 + g_sum.cpu_run_ns) / 1e9;
    double deliver_s = g_sum.last_rx > g_t0 ? (double)(g_sum.last_rx - g_t0) / 1e9 : NAN;
    double pub_s = (double)(t_pub_end - g_t0) / 1e9;
    bool complete = !g_pub_fatal && g_sum.subs_failed == 0 && g_sum.lost == 0 &&
                    g_sum.unique == expected && g_acked == g_total_pubs;

    json_head();
    json_str("pub", O.pub == P_WS ? "ws" : "http");
    json_u("subs", O.subs);
    json_u("channels", O.channels);
    if (O.rate > 0) {
        json_num("rate", O.rate);
        json_num("duration_s", O.duration);
    } else {
        json_u("burst", O.burst);
    }
    json_u("size", O.size);
    json_u("pub_conns", g_npubs);
    if (O.flow)
        json_u("flow", O.flow);
    else if (O.pub == P_WS)
        json_u("window", O.window);
    json_u("subs_ok", g_sum.subs_ok);
    json_u("subs_failed", g_sum.subs_failed);
    json_num("setup_s", setup_s);
    json_u("published", g_next_pub);
    json_u("pub_acked", g_acked);
    json_u("pub_failed", g_pub_failed);
    json_u("expected", expected);
    json_u("delivered", g_sum.delivered);
    json_u("unique", g_sum.unique);
    json_u("lost", g_sum.lost);
    json_u("dup", g_sum.dup);
    json_u("reordered", g_sum.reordered);
    json_u("bad", g_sum.bad + g_sum.out_of_range);
    json_u("other_frames", g_sum.other);
    json_u("dropped_conns", g_sum.dropped);
    if (g_sum.last_close_code)
        json_u("last_close_code", (uint64_t)g_sum.last_close_code);
    json_u("http_reconnects", g_http_reconnects);
    printf(",\"complete\":%s", complete ? "true" : "false");
    printf(",\"clean\":%s", complete && !g_sum.dup && !g_sum.reordered && !g_sum.bad &&
           !g_sum.out_of_range && !g_sum.dropped && !g_pub_failed ? "true" : "false");
    json_num("publish_s", pub_s);
    json_num("deliver_s", deliver_s);
    json_num("window_s", wall_s);
    json_num("publishes_per_s", pub_s > 0 ? (double)g_acked / pub_s : NAN);
    json_num("deliveries_per_s", deliver_s > 0 ? (double)g_sum.delivered / deliver_s : NAN);
    if (O.rate > 0) {
        json_num("pub_lag_max_ms", (double)g_max_lag / 1e6);
        if (O.pub == P_HTTP)
            json_u("pub_waited_for_conn", g_pub_waited);
    }
    json_latency("latency_us");
    if (O.probe_ms > 0) {
        json_num("probe_ms", O.probe_ms);
        json_u("probe_sent", g_probe_seq);
        json_u("probe_skipped", g_probe_skipped);
        json_probe("probe_ping", &g_probe_ping, g_probe_ping_ok);
        json_u("probe_ping_coalesced", g_probe_coalesced);
        if (O.target == T_LUAHUB)
            json_probe("probe_op", &g_probe_op, g_probe_op_ok);
    }
    json_kb_per_conn("rss", rss0, rss1, g_sum.subs_ok);
    json_kb_per_conn("pss", pss0, pss1, g_sum.subs_ok);
    json_num("rss_end_kb", rss2 < 0 ? NAN : (double)rss2);
    json_num("client_cpu_s", client_s);
    json_num("client_cpu_util", client_s / wall_s);
    json_num("server_cpu_s", cpu_s);
    json_num("server_cpu_ns_per_delivery",
             g_sum.delivered ? cpu_s * 1e9 / (double)g_sum.delivered : NAN);
    json_num("server_cpu_util", cpu_s / wall_s);
    if (O.server_core >= 0) {
        double core_s = cpu_s_or_nan(core0, core1);
        json_num("server_core_busy_s", core_s);
        json_num("server_core_ns_per_delivery",
                 g_sum.delivered ? core_s * 1e9 / (double)g_sum.delivered : NAN);
    }
    if (O.n_aux_pids) {
        double aux_s = cpu_s_or_nan(aux0, aux1);
        json_num("aux_cpu_s", aux_s);
        json_num("aux_cpu_ns_per_delivery",
                 g_sum.delivered ? aux_s * 1e9 / (double)g_sum.delivered : NAN);
    }
    printf("}\n");
    fflush(stdout);
    return complete ? 0 : 1;
}

static int run_idle(void)
{
    g_acked_chan = xcalloc(O.channels, sizeof *g_acked_chan);
    int64_t rss0 = server_rss_kb(), pss0 = server_pss_kb(), cpu0 = server_cpu_ticks();
    uint64_t t0 = now_ns();
    kids_spawn(O.subs);
    wait_kids(&g_kid_ready, O.timeout + 10);
    uint64_t t1 = now_ns();
    int64_t cpu1 = server_cpu_ticks();
    sum_stats();
    note("holding %" PRIu64 " connections for %.1fs", g_sum.subs_ok, O.hold);
    uint64_t dl = now_ns() + secs(O.hold);
    g_now = now_ns();
    while (g_now < dl && g_pub_fatal != 2)
        loop_once(ms_until(dl, 200));
    int64_t rss1 = server_rss_kb(), pss1 = server_pss_kb();
    memset(g_sh->expected, 0, O.channels * sizeof(uint32_t));
    kids_send('F');
    wait_kids(&g_kid_done, 15);
    sum_stats();
    g_phase = PH_CLOSE;
    kids_send('X');
    kids_reap(15);
    int64_t rss2 = server_rss_kb();

    double setup_s = (double)(t1 - t0) / 1e9, cpu_s = cpu_s_or_nan(cpu0, cpu1);
    uint64_t held = g_sum.subs_ok - g_sum.dropped;
    bool complete = g_sum.subs_failed == 0 && g_sum.dropped == 0 && g_pub_fatal != 2;
    json_head();
    json_u("conns", O.subs);
    json_u("channels", O.channels);
    json_u("subs_ok", g_sum.subs_ok);
    json_u("subs_failed", g_sum.subs_failed);
    json_u("dropped_conns", g_sum.dropped);
    json_u("held", held);
    json_num("hold_s", O.hold);
    printf(",\"complete\":%s", complete ? "true" : "false");
    json_num("setup_s", setup_s);
    json_num("conns_per_s", setup_s > 0 ? (double)g_sum.subs_ok / setup_s : NAN);
    json_kb_per_conn("rss", rss0, rss1, held);
    json_kb_per_conn("pss", pss0, pss1, held);
    json_num("rss_after_close_kb", rss2 < 0 ? NAN : (double)rss2);
    json_num("server_cpu_s", cpu_s);
    json_num("server_cpu_us_per_conn",
             g_sum.subs_ok ? cpu_s * 1e6 / (double)g_sum.subs_ok : NAN);
    json_u("pings_answered", g_sum.pings);
    printf("}\n");
    fflush(stdout);
    return complete ? 0 : 1;
}

static int run_connrate(void)
{
    int64_t cpu0 = server_cpu_ticks(), core0 = core_busy_ticks(), aux0 = aux_cpu_ticks();
    uint64_t t0 = now_ns();
    kids_spawn(0);
    wait_kids(&g_kid_done, O.timeout + 10);
    uint64_t t1 = now_ns();
    int64_t cpu1 = server_cpu_ticks(), core1 = core_busy_ticks(), aux1 = aux_cpu_ticks();
    sum_stats();
    g_phase = PH_CLOSE;
    kids_send('X');
    kids_reap(15);
    double wall = (double)(t1 - t0) / 1e9, cpu_s = cpu_s_or_nan(cpu0, cpu1);
    bool complete = g_sum.cr_ok == O.count && g_pub_fatal != 2;
    json_head();
    json_u("count", O.count);
    json_u("inflight", O.inflight);
    json_u("channels", O.channels);
    json_u("ok", g_sum.cr_ok);
    json_u("failed", g_sum.cr_failed);
    printf(",\"complete\":%s", complete ? "true" : "false");
    json_num("wall_s", wall);
    json_num("conns_per_s", wall > 0 ? (double)g_sum.cr_ok / wall : NAN);
    json_latency("subscribed_latency_us");
    json_u("close_errors", g_sum.cr_close_errors);
    json_num("server_cpu_s", cpu_s);
    json_num("server_cpu_us_per_conn", g_sum.cr_ok ? cpu_s * 1e6 / (double)g_sum.cr_ok : NAN);
    json_num("server_cpu_util", cpu_s / wall);
    if (O.server_core >= 0) {
        double core_s = cpu_s_or_nan(core0, core1);
        json_num("server_core_busy_s", core_s);
        json_num("server_core_us_per_conn", g_sum.cr_ok ? core_s * 1e6 / (double)g_sum.cr_ok : NAN);
    }
    if (O.n_aux_pids) {
        double aux_s = cpu_s_or_nan(aux0, aux1);
        json_num("aux_cpu_s", aux_s);
        json_num("aux_cpu_us_per_conn", g_sum.cr_ok ? aux_s * 1e6 / (double)g_sum.cr_ok : NAN);
    }
    printf("}\n");
    fflush(stdout);
    return complete ? 0 : 1;
}

/* ---- command line -------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
        "usage: loadgen --mode fanout|idle|connrate --port PORT [options]\n"
        "  --target luahub|nchan   protocol to speak (luahub)\n"
        "  --host ADDR             loopback address only (127.0.0.1)\n"
        "  --server-pid P[,P...]   server processes to meter (CPU, RSS)\n"
        "  --aux-pid P[,P...]      other processes whose CPU is reported apart (aux_cpu_*)\n"
        "  --sub-ports P[,P...]    subscribers connect to these ports, round robin over\n"
        "                          each channel's subscribers (publishers use --port)\n"
        "  --subs N --channels C   subscribers and channels, sub i on channel i%%C (1000, 10)\n"
        "  --pub ws|http           publisher transport (ws)\n"
        "  --pub-conns K           publisher connections (ws: 1, http: 4; nchan ws: C)\n"
        "  --window W              ws publishes in flight without a reply (64)\n"
        "  --flow W                instead: publishes not yet delivered to every subscriber\n"
        "                          of their channel (with --burst)\n"
        "  --burst K               K publishes per channel, as fast as the window allows\n"
        "  --rate R --duration S   open loop: R publishes/s for S seconds\n"
        "  --size B                payload (data) bytes (100)\n"
        "  --hold S                idle: hold time before reading RSS (5)\n"
        "  --count N --inflight M  connrate: connections and concurrency (10000, 50)\n"
        "  --procs P               worker processes (auto: one per 9000 connections)\n"
        "  --bind-src A            worker i's sockets leave from address A+i (127.x.y.z)\n"
        "  --probe-ms MS           probe connection: a WebSocket PING and (luahub) a ping op\n"
        "                          every MS ms during the run; their round trips (probe_*)\n"
        "  --connect-inflight N    handshakes in progress per worker (128)\n"
        "  --timeout S --drain S   setup/publish timeout (60), delivery drain timeout (15)\n"
        "  --ws-path P --api-path P       luahub paths (/ws, /api/publish)\n"
        "  --sub-prefix P --pub-prefix P  nchan locations (/sub/, /pub/)\n"
        "  --channel-prefix S      channel names are S<n> (bench:)\n"
        "  --server-core N         also meter CPU N's busy time (/proc/stat, incl. softirq)\n"
        "  --quickack 0|1          re-arm TCP_QUICKACK after every read (1)\n"
        "  --label S               copied into the JSON\n"
        "  -v, --verbose           progress and errors on stderr\n");
}

static double num_arg(const char *name, const char *v, double lo, double hi)
{
    char *e;
    double d = strtod(v, &e);
    if (e == v || *e || isnan(d) || d < lo || d > hi)
        die("--%s: '%s' is not a number in [%g, %g]", name, v, lo, hi);
    return d;
}

static void parse_args(int argc, char **argv)
{
    enum { O_TARGET = 256, O_HOST, O_PORT, O_SPID, O_SUBS, O_CHANS, O_PUB,
           O_PUBC, O_WIN, O_BURST, O_RATE, O_DUR, O_SIZE, O_HOLD, O_COUNT,
           O_INFL, O_PROCS, O_CINFL, O_TMO, O_DRAIN, O_WSP, O_APIP, O_SUBP,
           O_PUBP, O_CHP, O_LABEL, O_MODE, O_QACK, O_SCORE, O_APID, O_SPORTS,
           O_FLOW, O_PROBE, O_BSRC };
    static const struct option lo[] = {
        {"mode", 1, 0, O_MODE}, {"target", 1, 0, O_TARGET}, {"host", 1, 0, O_HOST},
        {"port", 1, 0, O_PORT}, {"server-pid", 1, 0, O_SPID}, {"subs", 1, 0, O_SUBS},
        {"conns", 1, 0, O_SUBS}, {"channels", 1, 0, O_CHANS}, {"pub", 1, 0, O_PUB},
        {"pub-conns", 1, 0, O_PUBC}, {"window", 1, 0, O_WIN}, {"burst", 1, 0, O_BURST},
        {"rate", 1, 0, O_RATE}, {"duration", 1, 0, O_DUR}, {"size", 1, 0, O_SIZE},
        {"hold", 1, 0, O_HOLD}, {"count", 1, 0, O_COUNT}, {"inflight", 1, 0, O_INFL},
        {"procs", 1, 0, O_PROCS}, {"connect-inflight", 1, 0, O_CINFL},
        {"timeout", 1, 0, O_TMO}, {"drain", 1, 0, O_DRAIN}, {"ws-path", 1, 0, O_WSP},
        {"api-path", 1, 0, O_APIP}, {"sub-prefix", 1, 0, O_SUBP},
        {"pub-prefix", 1, 0, O_PUBP}, {"channel-prefix", 1, 0, O_CHP},
        {"label", 1, 0, O_LABEL}, {"quickack", 1, 0, O_QACK},
        {"server-core", 1, 0, O_SCORE}, {"aux-pid", 1, 0, O_APID},
        {"sub-ports", 1, 0, O_SPORTS}, {"flow", 1, 0, O_FLOW},
        {"probe-ms", 1, 0, O_PROBE}, {"bind-src", 1, 0, O_BSRC},
        {"verbose", 0, 0, 'v'}, {"help", 0, 0, 'h'},
        {0, 0, 0, 0}};
    int opt;
    bool have_port = false, have_pubc = false;
    while ((opt = getopt_long(argc, argv, "vh", lo, NULL)) != -1) {
        switch (opt) {
        case O_MODE:
            if (!strcmp(optarg, "fanout")) O.mode = M_FANOUT;
            else if (!strcmp(optarg, "idle")) O.mode = M_IDLE;
            else if (!strcmp(optarg, "connrate")) O.mode = M_CONNRATE;
            else die("--mode: fanout, idle or connrate, not '%s'", optarg);
            break;
        case O_TARGET:
            if (!strcmp(optarg, "luahub")) O.target = T_LUAHUB;
            else if (!strcmp(optarg, "nchan")) O.target = T_NCHAN;
            else die("--target: luahub or nchan, not '%s'", optarg);
            break;
        case O_HOST: O.host = optarg; break;
        case O_PORT: O.port = (int)num_arg("port", optarg, 1, 65535); have_port = true; break;
        case O_SPID: {
            char *s = strdup(optarg), *save = NULL;
            for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (O.n_server_pids == 16)
                    die("--server-pid: at most 16 pids");
                O.server_pids[O.n_server_pids++] = (pid_t)num_arg("server-pid", t, 1, 1e9);
            }
            free(s);
            break;
        }
        case O_APID: {
            char *s = strdup(optarg), *save = NULL;
            for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (O.n_aux_pids == 16)
                    die("--aux-pid: at most 16 pids");
                O.aux_pids[O.n_aux_pids++] = (pid_t)num_arg("aux-pid", t, 1, 1e9);
            }
            free(s);
            break;
        }
        case O_SPORTS: {
            char *s = strdup(optarg), *save = NULL;
            for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (O.n_sub_ports == 8)
                    die("--sub-ports: at most 8 ports");
                O.sub_addr[O.n_sub_ports++].sin_port =
                    htons((uint16_t)num_arg("sub-ports", t, 1, 65535));
            }
            free(s);
            break;
        }
        case O_SUBS: O.subs = (uint32_t)num_arg("subs", optarg, 1, 1e6); break;
        case O_CHANS: O.channels = (uint32_t)num_arg("channels", optarg, 1, 1e6); break;
        case O_PUB:
            if (!strcmp(optarg, "ws")) O.pub = P_WS;
            else if (!strcmp(optarg, "http")) O.pub = P_HTTP;
            else die("--pub: ws or http, not '%s'", optarg);
            break;
        case O_PUBC: O.pub_conns = (uint32_t)num_arg("pub-conns", optarg, 1, 64); have_pubc = true; break;
        case O_WIN: O.window = (uint32_t)num_arg("window", optarg, 1, ID_RING / 2); break;
        case O_FLOW: O.flow = (uint32_t)num_arg("flow", optarg, 1, ID_RING / 2); break;
        case O_PROBE: O.probe_ms = num_arg("probe-ms", optarg, 1, 60000); break;
        case O_BSRC: {
            struct in_addr a;
            if (inet_pton(AF_INET, optarg, &a) != 1 || (ntohl(a.s_addr) >> 24) != 127)
                die("--bind-src: '%s' is not a loopback IPv4 address (127.x.y.z)", optarg);
            O.bind_src = ntohl(a.s_addr);
            break;
        }
        case O_BURST: O.burst = (uint64_t)num_arg("burst", optarg, 1, 1e8); break;
        case O_RATE: O.rate = num_arg("rate", optarg, 0.001, 1e7); break;
        case O_DUR: O.duration = num_arg("duration", optarg, 0.001, 3600); break;
        case O_SIZE: O.size = (uint32_t)num_arg("size", optarg, 1, 1 << 20); break;
        case O_HOLD: O.hold = num_arg("hold", optarg, 0, 3600); break;
        case O_COUNT: O.count = (uint64_t)num_arg("count", optarg, 1, 1e8); break;
        case O_INFL: O.inflight = (uint32_t)num_arg("inflight", optarg, 1, 10000); break;
        case O_PROCS: O.procs = (uint32_t)num_arg("procs", optarg, 1, MAX_PROCS); break;
        case O_CINFL: O.connect_inflight = (uint32_t)num_arg("connect-inflight", optarg, 1, 10000); break;
        case O_TMO: O.timeout = num_arg("timeout", optarg, 0.1, 3600); break;
        case O_DRAIN: O.drain = num_arg("drain", optarg, 0.1, 3600); break;
        case O_WSP: O.ws_path = optarg; break;
        case O_APIP: O.api_path = optarg; break;
        case O_SUBP: O.sub_prefix = optarg; break;
        case O_PUBP: O.pub_prefix = optarg; break;
        case O_CHP: O.chan_prefix = optarg; break;
        case O_LABEL: O.label = optarg; break;
        case O_SCORE: O.server_core = (int)num_arg("server-core", optarg, 0, 4095); break;
        case O_QACK: O.quickack = (int)num_arg("quickack", optarg, 0, 1); break;
        case 'v': O.verbose = 1; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind < argc)
        die("unexpected argument '%s' (see --help)", argv[optind]);
    if (!have_port)
        die("--port is required");
    if (inet_pton(AF_INET, O.host, &O.addr.sin_addr) != 1)
        die("--host: '%s' is not an IPv4 address", O.host);
    if ((ntohl(O.addr.sin_addr.s_addr) >> 24) != 127)
        die("--host: '%s' is not a loopback address; loadgen only talks to 127.0.0.0/8", O.host);
    O.addr.sin_family = AF_INET;
    O.addr.sin_port = htons((uint16_t)O.port);
    for (int i = 0; i < O.n_sub_ports; i++) {
        O.sub_addr[i].sin_family = AF_INET;
        O.sub_addr[i].sin_addr = O.addr.sin_addr;
    }
    if (strlen(O.chan_prefix) > 200 || strlen(O.ws_path) > 200 || strlen(O.api_path) > 200 ||
        strlen(O.sub_prefix) > 100 || strlen(O.pub_prefix) > 100)
        die("paths and prefixes are limited to 200 bytes");

    if (O.mode == M_FANOUT) {
        if ((O.burst > 0) == (O.rate > 0))
            die("fanout needs exactly one of --burst K or --rate R");
        g_total_pubs = O.burst ? O.burst * O.channels : (uint64_t)(O.rate * O.duration);
        if (!g_total_pubs)
            die("nothing to publish");
        if (g_total_pubs > (1ULL << 32))
            die("too many publishes (%" PRIu64 ")", g_total_pubs);
        g_max_per_chan = (uint32_t)((g_total_pubs + O.channels - 1) / O.channels);
        if (O.flow && !O.burst)
            die("--flow bounds a burst: use it with --burst, not --rate");
        if (O.flow && g_total_pubs > FLOW_MAX_PUBS)
            die("--flow counts deliveries per publish: at most %u publishes", FLOW_MAX_PUBS);
        if (O.pub == P_WS && O.target == T_NCHAN) {
            if (O.channels > MAX_PUB_CONNS)
                die("--pub ws with nchan uses one publisher per channel: at most %d channels", MAX_PUB_CONNS);
            g_npubs = O.channels;
        } else {
            g_npubs = have_pubc ? O.pub_conns : (O.pub == P_HTTP ? 4 : 1);
        }
        g_npub = (O.pub == P_HTTP || O.target == T_LUAHUB) ? g_npubs : 1;
        double bm = (double)O.subs * ((double)g_max_per_chan / 8 + 4.0 * g_npub);
        if (bm > 2e9)
            die("bookkeeping for %u subscribers x %u messages would need %.0f MB", O.subs,
                g_max_per_chan, bm / 1e6);
    } else {
        g_max_per_chan = 1;
        g_npub = 1;
        if (O.flow || O.probe_ms > 0)
            die("--flow and --probe-ms are for --mode fanout");
    }
    if (O.size < 64)
        warnx_("--size %u is below the ~64-byte fixed part of the payload; payloads will be larger", O.size);
    g_tmp_cap = (size_t)O.size + 4096;

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    uint64_t per = rl.rlim_cur > FD_RESERVE ? rl.rlim_cur - FD_RESERVE : 1;
    uint64_t conns = O.mode == M_CONNRATE ? O.inflight : O.subs;
    if (!O.procs) {
        uint64_t p = (conns + 8999) / 9000;
        O.procs = (uint32_t)(p ? p : 1);
        if (O.procs > MAX_PROCS)
            die("%" PRIu64 " connections need more than %d workers", conns, MAX_PROCS);
    }
    if ((conns + O.procs - 1) / O.procs > per)
        die("%" PRIu64 " connections over %u workers exceed the fd limit (%llu per process); "
            "raise --procs", conns, O.procs, (unsigned long long)rl.rlim_cur);
    if (O.mode == M_CONNRATE && O.procs > O.inflight)
        O.procs = O.inflight;
    if (O.bind_src && (O.bind_src & 0xffffffu) + O.procs > 0xffffffu)
        die("--bind-src: %u workers from that address leave 127.0.0.0/8", O.procs);
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    g_t_base = now_ns() - 1;
    g_rng = now_ns() ^ ((uint64_t)getpid() << 32) ^ 0x853c49e6748fea9bULL;
    if (!g_rng)
        g_rng = 1;
    g_scratch = xrealloc(NULL, SCRATCH_SIZE);
    g_tmp = xrealloc(NULL, g_tmp_cap);
    /* expected[C], subs_chan[C], then with --flow one counter per publish. */
    size_t shsz = sizeof(struct shared) +
                  (2 * (size_t)O.channels + (O.flow ? g_total_pubs : 0)) * sizeof(uint32_t);
    g_sh = mmap(NULL, shsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (g_sh == MAP_FAILED)
        die("mmap: %s", strerror(errno));
    g_subs_chan = g_sh->expected + O.channels;
    if (O.flow) {
        g_flow_cnt = g_subs_chan + O.channels;
        g_flow_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (g_flow_efd < 0)
            die("eventfd: %s", strerror(errno));
    }
    static struct wstats parent_st;
    g_st = &parent_st;
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_ep < 0)
        die("epoll_create1: %s", strerror(errno));
    for (int i = 0; i < MAX_PUB_CONNS; i++)
        g_pubs[i].fd = -1;
    if (O.n_server_pids && server_cpu_ticks() < 0)
        warnx_("cannot read /proc/<pid>/stat of the --server-pid list: CPU will be null");
    if (O.n_aux_pids && aux_cpu_ticks() < 0)
        warnx_("cannot read /proc/<pid>/stat of the --aux-pid list: aux CPU will be null");
    g_now = now_ns();
    int rc;
    switch (O.mode) {
    case M_FANOUT: rc = run_fanout(); break;
    case M_IDLE: rc = run_idle(); break;
    default: rc = run_connrate(); break;
    }
    munmap(g_sh, shsz);
    return rc;
}
