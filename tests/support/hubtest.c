/* hubtest: the integration suites' support library. See hubtest.h for the
 * contract. This file: the hub process, raw TCP, the HTTP client, JSON and
 * the failure plumbing; hubtest_ws.c has the WebSocket client (and its
 * SHA-1 and base64); hubtest_int.h what the two share. Plain POSIX sockets
 * and processes, every wait bounded by poll(). */
#include "hubtest_int.h"    /* first: no location macros, internal calls keep the caller's */

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* Failures                                                             */
/* ------------------------------------------------------------------ */

/* The test's file:line of its latest call into hubtest (see HT_AT). */
static __thread const char *at_file;
static __thread int at_line;

void ht_at(const char *file, int line)
{
    at_file = file;
    at_line = line;
}

/* See hubtest_int.h. Not ck_assert_msg: on success that records a mark
 * point through Check's pipe, a syscall per check on the hot paths here. */
void ht_fail(const char *src, int line, const char *fmt, ...)
{
    char *msg = NULL;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&msg, fmt, ap) < 0)
        msg = NULL;
    va_end(ap);
    const char *base = strrchr(src, '/');
    base = base ? base + 1 : src;
    _ck_assert_failed(at_file ? at_file : src, at_file ? at_line : line, "Failed",
                      "%s [%s:%d]", msg ? msg : fmt, base, line);
}

/* ------------------------------------------------------------------ */
/* Small utilities                                                     */
/* ------------------------------------------------------------------ */

int64_t ht_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

int ht_remaining(int64_t deadline)
{
    int64_t r = deadline - ht_now_ms();
    return r < 0 ? 0 : (r > INT_MAX ? INT_MAX : (int)r);
}

/* Waits for `events` on fd until `deadline`. Returns the revents, or 0 on
 * timeout. */
static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        struct pollfd p = { .fd = fd, .events = events };
        int n = poll(&p, 1, ht_remaining(deadline));
        if (n > 0)
            return p.revents;
        if (n == 0)
            return 0;
        if (errno != EINTR)
            FAIL("poll: %s", strerror(errno));
    }
}

/* Whole file, NUL-terminated (new string); "" if unreadable. */
static char *read_file(const char *path, size_t *lenp)
{
    size_t len = 0, cap = 4096;
    char *s = xmalloc(cap);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        for (;;) {
            if (cap - len < 4096)
                s = xrealloc(s, cap *= 2);
            ssize_t n = read(fd, s + len, cap - len - 1);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            len += (size_t)n;
        }
        close(fd);
    }
    s[len] = '\0';
    if (lenp)
        *lenp = len;
    return s;
}

static void write_file(const char *path, const char *content)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    CHECK(fd >= 0, "open %s: %s", path, strerror(errno));
    size_t len = strlen(content), off = 0;
    while (off < len) {
        ssize_t n = write(fd, content + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        CHECK(n > 0, "write %s: %s", path, strerror(errno));
        off += (size_t)n;
    }
    close(fd);
}

static const char *tmpdir(void)
{
    const char *t = getenv("TMPDIR");
    return t && *t ? t : "/tmp";
}

char *ht_tmpfile(const char *content)
{
    char *path = xasprintf("%s/hubtest.XXXXXX", tmpdir());
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp: %s", strerror(errno));
    close(fd);
    write_file(path, content);
    return path;
}

long ht_rss_kib(pid_t pid)
{
    char path[64], line[256];
    long kib = -1;
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "cannot read %s: %s", path, strerror(errno));
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    fclose(f);
    CHECK(kib > 0, "no VmRSS in %s", path);
    return kib;
}

void ht_asan_no_quarantine(void)
{
    const char *asan = getenv("ASAN_OPTIONS");
    char *opts = xasprintf("%s%squarantine_size_mb=0", asan ? asan : "", asan ? ":" : "");
    setenv("ASAN_OPTIONS", opts, 1);
    free(opts);
}

/* The last `max` bytes of `s`, for failure messages. */
static const char *tail(const char *s, size_t max)
{
    size_t n = strlen(s);
    return n > max ? s + n - max : s;
}

static const char *hub_bin(void)
{
    const char *bin = getenv("LUAHUB_BIN");
    CHECK(bin && *bin, "LUAHUB_BIN is not set (run the suite through ctest)");
    return bin;
}

/* Exit status as one int: exit code, or 128 + signal. */
static int decode_status(int st)
{
    if (WIFEXITED(st))
        return WEXITSTATUS(st);
    if (WIFSIGNALED(st))
        return 128 + WTERMSIG(st);
    return 255;
}

/* argv for $LUAHUB_BIN `args...` (`args` NULL-terminated, without argv[0]):
 * a new array of borrowed strings, the caller frees the array. */
static const char **hub_argv(const char *const *args)
{
    size_t n = 0;
    while (args[n])
        n++;
    const char **argv = xmalloc((n + 2) * sizeof *argv);
    argv[0] = hub_bin();
    for (size_t i = 0; i < n; i++)
        argv[i + 1] = args[i];
    argv[n + 1] = NULL;
    return argv;
}

/* Forks and execs argv[0] (a path, not searched in $PATH) with `argv`,
 * stdout and stderr to `out_fd`, stdin from /dev/null. The child dies with
 * its parent (PR_SET_PDEATHSIG), so a failing test never leaks a hub.
 * Borrows `argv`. */
static pid_t spawn(const char *const *argv, int out_fd)
{
    const char *bin = argv[0];
    pid_t parent = getpid();
    pid_t pid = fork();
    CHECK(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0)
            dup2(devnull, 0);
        dup2(out_fd, 1);
        dup2(out_fd, 2);
        closefrom(3);
        signal(SIGPIPE, SIG_DFL);
        execv(bin, (char *const *)argv);
        dprintf(2, "hubtest: exec %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    return pid;
}

/* ------------------------------------------------------------------ */
/* The hub process                                                     */
/* ------------------------------------------------------------------ */

/* Port of the "listening on HOST:PORT" line in `log`, or 0. The address is
 * the token after "listening on "; the port follows its last ':'. */
static int parse_listening(const char *log)
{
    const char *p = strstr(log, "listening on ");
    if (!p)
        return 0;
    p += strlen("listening on ");
    size_t n = strcspn(p, " \t\r\n");
    if (p[n] == '\0')
        return 0;   /* line not complete yet */
    const char *colon = NULL;
    for (size_t i = 0; i < n; i++)
        if (p[i] == ':')
            colon = p + i;
    if (!colon)
        return 0;
    int port = atoi(colon + 1);
    return port > 0 && port < 65536 ? port : 0;
}

static void reap(struct hub *h, int st)
{
    h->exited = 1;
    h->status = decode_status(st);
}

struct hub *hub_start(const char *conf_text)
{
    return hub_start_opts(conf_text, NULL);
}

struct hub *hub_start_opts(const char *conf_text, const struct hub_opts *o)
{
    struct hub_opts def = { 0 };
    if (!o)
        o = &def;
    struct hub *h = calloc(1, sizeof *h);
    CHECK(h != NULL, "out of memory");

    snprintf(h->dir, sizeof h->dir, "%s/hubtest.XXXXXX", tmpdir());
    CHECK(mkdtemp(h->dir) != NULL, "mkdtemp: %s", strerror(errno));
    snprintf(h->conf_path, sizeof h->conf_path, "%s/luahub.conf", h->dir);
    snprintf(h->log_path, sizeof h->log_path, "%s/hub.log", h->dir);
    write_file(h->conf_path, conf_text);
    /* /metrics follows the API's rule: hub_metric sends the key if any. */
    const char *k = strstr(conf_text, "api_key = \"");
    if (k) {
        k += 11;
        size_t n = strcspn(k, "\"");
        if (n < sizeof(h->api_key))
            memcpy(h->api_key, k, n);
    }

    const char *args[64];
    size_t n = 0;
    args[n++] = "-c";
    args[n++] = h->conf_path;
    const char *listen = o->listen ? o->listen : "127.0.0.1:0";
    if (*listen) {
        args[n++] = "--listen";
        args[n++] = listen;
    }
    for (size_t i = 0; o->args && o->args[i]; i++) {
        CHECK(n < 63, "too many hub arguments");
        args[n++] = o->args[i];
    }
    args[n] = NULL;

    int logfd = open(h->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    CHECK(logfd >= 0, "open %s: %s", h->log_path, strerror(errno));
    const char **argv = hub_argv(args);
    h->pid = spawn(argv, logfd);
    free(argv);
    close(logfd);

    int64_t deadline = ht_now_ms() + (o->start_timeout_ms > 0 ? o->start_timeout_ms : 15000);
    for (;;) {
        char *log = read_file(h->log_path, NULL);
        h->port = parse_listening(log);
        if (h->port) {
            free(log);
            return h;
        }
        int st;
        if (waitpid(h->pid, &st, WNOHANG) == h->pid) {
            reap(h, st);
            FAIL("hub exited with status %d before listening; log %s:\n%s",
                         h->status, h->log_path, tail(log, 3000));
        }
        if (ht_now_ms() >= deadline) {
            kill(h->pid, SIGKILL);
            waitpid(h->pid, &st, 0);
            reap(h, st);
            FAIL("hub printed no \"listening on HOST:PORT\" line in time; log %s:\n%s",
                         h->log_path, tail(log, 3000));
        }
        free(log);
        sleep_ms(10);
    }
}

void hub_signal(struct hub *h, int sig)
{
    CHECK(!h->exited, "hub already exited (status %d)", h->status);
    CHECK(kill(h->pid, sig) == 0, "kill: %s", strerror(errno));
}

int hub_wait_exit(struct hub *h, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    while (!h->exited) {
        int st;
        pid_t r = waitpid(h->pid, &st, WNOHANG);
        if (r == h->pid) {
            reap(h, st);
            break;
        }
        CHECK(r == 0, "waitpid: %s", strerror(errno));
        if (ht_now_ms() >= deadline)
            return -1;
        sleep_ms(5);
    }
    return h->status;
}

static void remove_dir(const char *dir)
{
    char *cmd;
    /* The dir only ever holds the files this library put there. */
    cmd = xasprintf("%s/luahub.conf", dir);
    unlink(cmd);
    free(cmd);
    cmd = xasprintf("%s/hub.log", dir);
    unlink(cmd);
    free(cmd);
    rmdir(dir);
}

int hub_stop(struct hub *h)
{
    if (!h->exited)
        kill(h->pid, SIGTERM);
    int status = hub_wait_exit(h, 20000);
    if (status < 0) {
        int st;
        kill(h->pid, SIGKILL);
        waitpid(h->pid, &st, 0);
        reap(h, st);
        char *log = hub_log(h);
        FAIL("hub did not exit within 20 s of SIGTERM (killed); log %s:\n%s",
                     h->log_path, tail(log, 3000));
    }
    if (status != 0) {
        char *log = hub_log(h);
        fprintf(stderr, "hubtest: hub exited with status %d; its log (%s):\n%s\n",
                status, h->log_path, log);
        free(log);
    } else if (getenv("HUBTEST_KEEP")) {
        fprintf(stderr, "hubtest: kept %s\n", h->dir);
    } else {
        remove_dir(h->dir);
    }
    free(h);
    return status;
}

char *hub_log(const struct hub *h)
{
    return read_file(h->log_path, NULL);
}

int hub_log_count(const struct hub *h, const char *needle)
{
    char *log = hub_log(h);
    int n = 0;
    size_t nl = strlen(needle);
    for (const char *p = log; nl && (p = strstr(p, needle)) != NULL; p += nl)
        n++;
    free(log);
    return n;
}

void hub_log_wait(const struct hub *h, const char *needle, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    for (;;) {
        char *log = hub_log(h);
        if (strstr(log, needle)) {
            free(log);
            return;
        }
        if (ht_now_ms() >= deadline)
            FAIL("log line \"%s\" did not appear within %d ms; log tail:\n%s",
                         needle, timeout_ms, tail(log, 2000));
        free(log);
        sleep_ms(10);
    }
}

/* Value of `series` in a Prometheus text body; returns 0 if absent. */
static int metric_find(const char *body, const char *series, long long *val)
{
    size_t sl = strlen(series);
    for (const char *line = body; *line; ) {
        const char *eol = strchr(line, '\n');
        size_t ll = eol ? (size_t)(eol - line) : strlen(line);
        if (line[0] != '#' && ll > sl && strncmp(line, series, sl) == 0 &&
            line[sl] == ' ') {
            *val = (long long)strtod(line + sl + 1, NULL);
            return 1;
        }
        line += ll + (eol ? 1 : 0);
    }
    return 0;
}

long long hub_metric(struct hub *h, const char *series)
{
    struct http_resp r;
    char auth[192] = "";
    if (h->api_key[0])
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s\r\n", h->api_key);
    int st = http_request(h->port, "GET", "/metrics", auth[0] ? auth : NULL, NULL, &r);
    CHECK(st == 200, "GET /metrics: status %d:\n%s", st, r.body);
    long long v = 0;
    int found = metric_find(r.body, series, &v);
    if (!found)
        FAIL("no series \"%s\" in /metrics:\n%s", series, tail(r.body, 3000));
    http_resp_free(&r);
    return v;
}

void hub_metric_wait(struct hub *h, const char *series, long long want, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    for (;;) {
        long long v = hub_metric(h, series);
        if (v == want)
            return;
        if (ht_now_ms() >= deadline)
            FAIL("metric %s is %lld, expected %lld (waited %d ms)",
                         series, v, want, timeout_ms);
        sleep_ms(10);
    }
}

int hub_run(const char *const *args, char **output, int timeout_ms)
{
    const char **argv = hub_argv(args);
    int st = ht_run(argv, output, timeout_ms);
    free(argv);
    return st;
}

int ht_run(const char *const *argv, char **output, int timeout_ms)
{
    char *path = xasprintf("%s/hubtest.XXXXXX", tmpdir());
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp: %s", strerror(errno));
    pid_t pid = spawn(argv, fd);
    close(fd);

    int64_t deadline = ht_now_ms() + timeout_ms;
    int st = 0;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            break;
        if (ht_now_ms() >= deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            char *out = read_file(path, NULL);
            unlink(path);
            FAIL("%s did not exit within %d ms (killed); output:\n%s",
                         argv[0], timeout_ms, tail(out, 3000));
        }
        sleep_ms(5);
    }
    if (output)
        *output = read_file(path, NULL);
    unlink(path);
    free(path);
    return decode_status(st);
}

/* ------------------------------------------------------------------ */
/* Raw TCP                                                              */
/* ------------------------------------------------------------------ */

int tcp_connect(int port)
{
    return tcp_connect_opts(port, 0);
}

/* Connects to the numeric address `addr` (IPv4 or IPv6) and `port`.
 * Returns the fd (non-blocking) or -errno. */
static int connect_to(const char *addr, int port, int rcvbuf)
{
    struct sockaddr_storage ss = { 0 };
    socklen_t sl;
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, addr, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        sl = sizeof *s4;
    } else if (inet_pton(AF_INET6, addr, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        sl = sizeof *s6;
    } else {
        FAIL("\"%s\" is not a numeric IPv4 or IPv6 address", addr);
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    CHECK(fd >= 0, "socket: %s", strerror(errno));
    if (rcvbuf > 0)
        CHECK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) == 0,
                      "SO_RCVBUF: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&ss, sl) < 0) {
        int err = errno;
        if (err == EINPROGRESS) {
            err = wait_fd(fd, POLLOUT, ht_now_ms() + HT_WAIT_MS) ? 0 : ETIMEDOUT;
            if (!err) {
                socklen_t el = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
            }
        }
        if (err) {
            close(fd);
            return -err;
        }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

int tcp_try_connect(int port)
{
    return connect_to("127.0.0.1", port, 0);
}

int tcp_connect_opts(int port, int rcvbuf)
{
    int fd = connect_to("127.0.0.1", port, rcvbuf);
    CHECK(fd >= 0, "connect to port %d: %s", port, strerror(-fd));
    return fd;
}

int tcp_connect_at(const char *addr, int port)
{
    int fd = connect_to(addr, port, 0);
    CHECK(fd >= 0, "connect to %s port %d: %s", addr, port, strerror(-fd));
    return fd;
}

int ht_send_all(int fd, const void *p, size_t n, int64_t deadline)
{
    const char *s = p;
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        if (w > 0) {
            s += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno != EAGAIN)
            return -errno;
        if (!wait_fd(fd, POLLOUT, deadline))
            return -ETIMEDOUT;
    }
    return 0;
}

void tcp_send(int fd, const void *p, size_t n)
{
    int r = ht_send_all(fd, p, n, ht_now_ms() + HT_WAIT_MS);
    CHECK(r == 0, "send of %zu bytes: %s", n, strerror(-r));
}

ssize_t tcp_recv(int fd, void *buf, size_t cap, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    for (;;) {
        ssize_t n = recv(fd, buf, cap, 0);
        if (n > 0)
            return n;
        if (n == 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return 0;   /* reset: closed too */
        if (!wait_fd(fd, POLLIN, deadline))
            return HT_TIMEOUT;
    }
}

int tcp_wait_closed(int fd, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    char buf[65536];
    for (;;) {
        ssize_t n = tcp_recv(fd, buf, sizeof buf, ht_remaining(deadline));
        if (n == 0)
            return 1;
        if (n == HT_TIMEOUT)
            return 0;
    }
}

void tcp_abort(int fd)
{
    struct linger lg = { .l_onoff = 1, .l_linger = 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

/* ------------------------------------------------------------------ */
/* HTTP/1.1                                                             */
/* ------------------------------------------------------------------ */

int ht_rbuf_fill(int fd, struct ht_rbuf *b, int64_t deadline)
{
    if (b->eof)
        return 0;
    if (b->cap - b->len < 16384) {
        b->cap = b->cap ? b->cap * 2 : 65536;
        b->p = xrealloc(b->p, b->cap);
    }
    ssize_t n = tcp_recv(fd, b->p + b->len, b->cap - b->len - 1, ht_remaining(deadline));
    if (n == HT_TIMEOUT)
        return -1;
    if (n == 0) {
        b->eof = 1;
        return 0;
    }
    b->len += (size_t)n;
    b->p[b->len] = '\0';
    return 1;
}

const char *ht_find_header(const char *head, const char *name, size_t *vlen)
{
    size_t nl = strlen(name);
    const char *line = strstr(head, "\r\n");
    while (line) {
        line += 2;
        if (strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
            const char *v = line + nl + 1;
            while (*v == ' ' || *v == '\t')
                v++;
            const char *e = strstr(v, "\r\n");
            size_t n = e ? (size_t)(e - v) : strlen(v);
            while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t'))
                n--;
            *vlen = n;
            return v;
        }
        line = strstr(line, "\r\n");
    }
    return NULL;
}

char *http_resp_header(const struct http_resp *r, const char *name)
{
    size_t n;
    const char *v = ht_find_header(r->head, name, &n);
    return v ? xstrndup(v, n) : NULL;
}

void http_resp_free(struct http_resp *r)
{
    free(r->head);
    free(r->body);
    r->head = r->body = NULL;
}

int ht_read_response(int fd, struct ht_rbuf *b, struct http_resp *r,
                     int64_t deadline, int head_only)
{
    memset(r, 0, sizeof *r);
    char *end;
    while (!(b->p && (end = strstr(b->p, "\r\n\r\n")))) {
        int f = ht_rbuf_fill(fd, b, deadline);
        if (f <= 0)
            FAIL("HTTP: %s before the end of the response head; got %zu bytes: %.*s",
                         f == 0 ? "connection closed" : "timed out", b->len,
                         (int)b->len, b->p ? b->p : "");
    }
    size_t hlen = (size_t)(end - b->p) + 2;
    r->head = xstrndup(b->p, hlen);
    int minor = 0;
    if (sscanf(r->head, "HTTP/1.%d %d", &minor, &r->status) != 2)
        FAIL("HTTP: bad status line: %s", r->head);
    size_t off = hlen + 2;   /* start of the body */

    size_t vl;
    const char *cl = ht_find_header(r->head, "Content-Length", &vl);
    const char *te = ht_find_header(r->head, "Transfer-Encoding", &vl);
    int no_body = head_only || r->status == 204 || r->status == 304 ||
                  (r->status >= 100 && r->status < 200);
    size_t used;
    if (no_body) {
        r->body = xstrndup("", 0);
        used = off;
    } else if (te && strncasecmp(te, "chunked", 7) == 0) {
        size_t blen = 0, pos = off;
        char *body = xmalloc(1);
        for (;;) {
            char *crlf;
            while (!(crlf = strstr(b->p + pos, "\r\n")))
                if (ht_rbuf_fill(fd, b, deadline) <= 0)
                    FAIL("HTTP: chunked body truncated");
            size_t csz = strtoul(b->p + pos, NULL, 16);
            size_t data = (size_t)(crlf - b->p) + 2;
            if (csz == 0) {
                /* no trailers expected: the final CRLF */
                while (b->len < data + 2)
                    if (ht_rbuf_fill(fd, b, deadline) <= 0)
                        FAIL("HTTP: chunked body truncated");
                used = data + 2;
                break;
            }
            while (b->len < data + csz + 2)
                if (ht_rbuf_fill(fd, b, deadline) <= 0)
                    FAIL("HTTP: chunked body truncated");
            body = xrealloc(body, blen + csz + 1);
            memcpy(body + blen, b->p + data, csz);
            blen += csz;
            pos = data + csz + 2;
        }
        body[blen] = '\0';
        r->body = body;
        r->body_len = blen;
    } else if (cl) {
        size_t n = strtoul(cl, NULL, 10);
        while (b->len < off + n)
            if (ht_rbuf_fill(fd, b, deadline) <= 0)
                FAIL("HTTP: body shorter than Content-Length %zu (%zu bytes)",
                             n, b->len - off);
        r->body = xstrndup(b->p + off, n);
        r->body_len = n;
        used = off + n;
    } else {
        int f;
        while ((f = ht_rbuf_fill(fd, b, deadline)) > 0)
            ;
        if (f < 0)
            FAIL("HTTP: response without length did not end (no EOF)");
        r->body = xstrndup(b->p + off, b->len - off);
        r->body_len = b->len - off;
        used = b->len;
    }
    memmove(b->p, b->p + used, b->len - used);
    b->len -= used;
    b->p[b->len] = '\0';
    return r->status;
}

int http_read_response(int fd, struct http_resp *r, int timeout_ms, int head_only)
{
    struct ht_rbuf b = { 0 };
    int st = ht_read_response(fd, &b, r, ht_now_ms() + timeout_ms, head_only);
    free(b.p);
    return st;
}

int http_raw(int port, const void *req, size_t len, struct http_resp *r)
{
    int fd = tcp_connect(port);
    tcp_send(fd, req, len);
    int st = http_read_response(fd, r, HT_WAIT_MS, 0);
    close(fd);
    return st;
}

int http_request(int port, const char *method, const char *path,
                 const char *headers, const char *body, struct http_resp *r)
{
    return http_request_at("127.0.0.1", port, method, path, headers, body, r);
}

int http_request_at(const char *addr, int port, const char *method, const char *path,
                    const char *headers, const char *body, struct http_resp *r)
{
    /* Host: an IPv6 literal goes in brackets */
    const char *lb = strchr(addr, ':') ? "[" : "", *rb = *lb ? "]" : "";
    char *req;
    if (body)
        req = xasprintf("%s %s HTTP/1.1\r\nHost: %s%s%s:%d\r\nConnection: close\r\n"
                        "%sContent-Length: %zu\r\n\r\n%s",
                        method, path, lb, addr, rb, port, headers ? headers : "",
                        strlen(body), body);
    else
        req = xasprintf("%s %s HTTP/1.1\r\nHost: %s%s%s:%d\r\nConnection: close\r\n%s\r\n",
                        method, path, lb, addr, rb, port, headers ? headers : "");
    int fd = tcp_connect_at(addr, port);
    tcp_send(fd, req, strlen(req));
    free(req);
    int st = http_read_response(fd, r, HT_WAIT_MS, strcmp(method, "HEAD") == 0);
    close(fd);
    return st;
}

int http_publish(int port, const char *channel, const char *data_json)
{
    char *body = xasprintf("{\"channel\":\"%s\",\"data\":%s}", channel, data_json);
    struct http_resp r;
    int st = http_request(port, "POST", "/api/publish",
                          "Content-Type: application/json\r\n", body, &r);
    free(body);
    http_resp_free(&r);
    return st;
}

/* ------------------------------------------------------------------ */
/* JSON                                                                 */
/* ------------------------------------------------------------------ */

yajl_val json_parse(const char *text)
{
    char err[512];
    yajl_val v = yajl_tree_parse(text, err, sizeof err);
    if (!v)
        FAIL("not valid JSON (%s): %.1000s", err, text);
    return v;
}

static yajl_val json_vget(yajl_val v, va_list ap)
{
    const char *key;
    while (v && (key = va_arg(ap, const char *)) != NULL) {
        if (!YAJL_IS_OBJECT(v))
            return NULL;
        yajl_val next = NULL;
        for (size_t i = 0; i < v->u.object.len; i++)
            if (strcmp(v->u.object.keys[i], key) == 0) {
                next = v->u.object.values[i];
                break;
            }
        v = next;
    }
    return v;
}

yajl_val json_path(yajl_val v, ...)
{
    va_list ap;
    va_start(ap, v);
    v = json_vget(v, ap);
    va_end(ap);
    return v;
}

const char *json_path_str(yajl_val v, ...)
{
    va_list ap;
    va_start(ap, v);
    v = json_vget(v, ap);
    va_end(ap);
    return v && YAJL_IS_STRING(v) ? YAJL_GET_STRING(v) : NULL;
}

/* ------------------------------------------------------------------ */
/* Shared expectations of the HTTP suites                               */
/* ------------------------------------------------------------------ */

char *ht_asprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *p = xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(p, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return p;
}

void http_expect_error(const struct http_resp *r, int status, const char *code)
{
    CHECK(r->status == status, "expected HTTP %d (%s), got %d:\n%s%s", status, code,
          r->status, r->head, r->body);
    char *prefix = ht_asprintf("{\"ok\":false,\"error\":{\"code\":\"%s\",\"message\":\"", code);
    CHECK(strncmp(r->body, prefix, strlen(prefix)) == 0 &&
              r->body_len > strlen(prefix) + 3 &&
              strcmp(r->body + r->body_len - 3, "\"}}") == 0,
          "HTTP %d: expected body %s<message>\"}}, got: %s", status, prefix, r->body);
    free(prefix);
    yajl_val v = (json_parse)(r->body);
    const char *m = json_get_str(v, "error", "message");
    CHECK(m && *m, "error without a message: %s", r->body);
    yajl_tree_free(v);
    char *ct = http_resp_header(r, "Content-Type");
    CHECK(ct && strncmp(ct, "application/json", 16) == 0, "error with Content-Type %s",
          ct ? ct : "(none)");
    free(ct);
}

void http_expect_ok(const struct http_resp *r)
{
    CHECK(r->status == 200 && strcmp(r->body, "{\"ok\":true}") == 0,
          "expected 200 {\"ok\":true}, got %d:\n%s%s", r->status, r->head, r->body);
}
