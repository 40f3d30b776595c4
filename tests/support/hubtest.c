/* hubtest: the integration suites' support library. See hubtest.h for the
 * contract; this file is plain POSIX sockets and processes, every wait
 * bounded by poll(). SHA-1 and base64 are implemented here (for the
 * handshake check only) so the suites need nothing but Check and yajl. */
#define HUBTEST_INTERNAL    /* no location macros: internal calls keep the caller's */
#include "hubtest.h"

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
#include <sys/random.h>
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

/* Fails the test at the caller's location, naming ours in the message.
 * Not ck_assert_msg: on success that records a mark point through Check's
 * pipe, a syscall per check on the hot paths here. */
static void fail_at(int line, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 2, 3)));
static void fail_at(int line, const char *fmt, ...)
{
    char *msg = NULL;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&msg, fmt, ap) < 0)
        msg = NULL;
    va_end(ap);
    _ck_assert_failed(at_file ? at_file : __FILE__, at_file ? at_line : line, "Failed",
                      "%s [hubtest.c:%d]", msg ? msg : fmt, line);
}

#define FAIL(...) fail_at(__LINE__, __VA_ARGS__)
#define CHECK(cond, ...)            \
    do {                            \
        if (!(cond))                \
            FAIL(__VA_ARGS__);      \
    } while (0)

/* ------------------------------------------------------------------ */
/* Small utilities                                                     */
/* ------------------------------------------------------------------ */

int64_t ht_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    CHECK(p != NULL, "out of memory");
    return p;
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    CHECK(p != NULL, "out of memory");
    return p;
}

static char *xstrndup(const char *s, size_t n)
{
    char *d = xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    CHECK(n >= 0, "out of memory");
    return s;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Remaining ms until `deadline` (>= 0). */
static int remaining(int64_t deadline)
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
        int n = poll(&p, 1, remaining(deadline));
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

/* Forks and execs $LUAHUB_BIN with `args` (argv[1..], NULL-terminated),
 * stdout and stderr to `out_fd`, stdin from /dev/null. The child dies with
 * its parent (PR_SET_PDEATHSIG), so a failing test never leaks a hub. */
static pid_t spawn(const char *const *args, int out_fd)
{
    const char *bin = hub_bin();
    size_t n = 0;
    while (args[n])
        n++;
    const char **argv = xmalloc((n + 2) * sizeof *argv);
    argv[0] = bin;
    for (size_t i = 0; i < n; i++)
        argv[i + 1] = args[i];
    argv[n + 1] = NULL;

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
    free(argv);
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
    h->pid = spawn(args, logfd);
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
    int st = http_request(h->port, "GET", "/metrics", NULL, NULL, &r);
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
    char *path = xasprintf("%s/hubtest.XXXXXX", tmpdir());
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp: %s", strerror(errno));
    pid_t pid = spawn(args, fd);
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
                         hub_bin(), timeout_ms, tail(out, 3000));
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

/* Returns the fd or -errno. */
static int connect_to(int port, int rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    CHECK(fd >= 0, "socket: %s", strerror(errno));
    if (rcvbuf > 0)
        CHECK(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) == 0,
                      "SO_RCVBUF: %s", strerror(errno));
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
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
    return connect_to(port, 0);
}

int tcp_connect_opts(int port, int rcvbuf)
{
    int fd = connect_to(port, rcvbuf);
    CHECK(fd >= 0, "connect to port %d: %s", port, strerror(-fd));
    return fd;
}

/* Sends all bytes before `deadline`. Returns 0 or -errno. */
static int send_all(int fd, const void *p, size_t n, int64_t deadline)
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
    int r = send_all(fd, p, n, ht_now_ms() + HT_WAIT_MS);
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
        ssize_t n = tcp_recv(fd, buf, sizeof buf, remaining(deadline));
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

/* A growable read buffer over a socket. */
struct rbuf {
    char *p;
    size_t len, cap;
    int eof;
};

/* Reads more into `b` (waiting until `deadline`). Returns 1 if bytes came,
 * 0 on EOF, -1 on timeout. */
static int rbuf_fill(int fd, struct rbuf *b, int64_t deadline)
{
    if (b->eof)
        return 0;
    if (b->cap - b->len < 16384) {
        b->cap = b->cap ? b->cap * 2 : 65536;
        b->p = xrealloc(b->p, b->cap);
    }
    ssize_t n = tcp_recv(fd, b->p + b->len, b->cap - b->len - 1, remaining(deadline));
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

static const char *find_header(const char *head, const char *name, size_t *vlen)
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
    const char *v = find_header(r->head, name, &n);
    return v ? xstrndup(v, n) : NULL;
}

void http_resp_free(struct http_resp *r)
{
    free(r->head);
    free(r->body);
    r->head = r->body = NULL;
}

/* Parses one response out of `b` (which may already hold bytes), reading
 * more as needed. */
static int read_response(int fd, struct rbuf *b, struct http_resp *r,
                         int64_t deadline, int head_only)
{
    memset(r, 0, sizeof *r);
    char *end;
    while (!(b->p && (end = strstr(b->p, "\r\n\r\n")))) {
        int f = rbuf_fill(fd, b, deadline);
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
    const char *cl = find_header(r->head, "Content-Length", &vl);
    const char *te = find_header(r->head, "Transfer-Encoding", &vl);
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
                if (rbuf_fill(fd, b, deadline) <= 0)
                    FAIL("HTTP: chunked body truncated");
            size_t csz = strtoul(b->p + pos, NULL, 16);
            size_t data = (size_t)(crlf - b->p) + 2;
            if (csz == 0) {
                /* no trailers expected: the final CRLF */
                while (b->len < data + 2)
                    if (rbuf_fill(fd, b, deadline) <= 0)
                        FAIL("HTTP: chunked body truncated");
                used = data + 2;
                break;
            }
            while (b->len < data + csz + 2)
                if (rbuf_fill(fd, b, deadline) <= 0)
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
            if (rbuf_fill(fd, b, deadline) <= 0)
                FAIL("HTTP: body shorter than Content-Length %zu (%zu bytes)",
                             n, b->len - off);
        r->body = xstrndup(b->p + off, n);
        r->body_len = n;
        used = off + n;
    } else {
        int f;
        while ((f = rbuf_fill(fd, b, deadline)) > 0)
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
    struct rbuf b = { 0 };
    int st = read_response(fd, &b, r, ht_now_ms() + timeout_ms, head_only);
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
    char *req;
    if (body)
        req = xasprintf("%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n"
                        "%sContent-Length: %zu\r\n\r\n%s",
                        method, path, port, headers ? headers : "", strlen(body), body);
    else
        req = xasprintf("%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n%s\r\n",
                        method, path, port, headers ? headers : "");
    int fd = tcp_connect(port);
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
/* SHA-1 (FIPS 180-4) and base64, for Sec-WebSocket-Accept only        */
/* ------------------------------------------------------------------ */

static uint32_t rol(uint32_t x, int n)
{
    return (x << n) | (x >> (32 - n));
}

static void sha1_block(uint32_t h[5], const unsigned char *p)
{
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1(const void *data, size_t len, unsigned char out[20])
{
    uint32_t h[5] = { 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0 };
    const unsigned char *p = data;
    size_t left = len;
    while (left >= 64) {
        sha1_block(h, p);
        p += 64;
        left -= 64;
    }
    unsigned char last[128] = { 0 };
    memcpy(last, p, left);
    last[left] = 0x80;
    size_t total = left + 1 + 8 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        last[total - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64)
        sha1_block(h, last + off);
    for (int i = 0; i < 5; i++) {
        out[4 * i] = (unsigned char)(h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(h[i] >> 8);
        out[4 * i + 3] = (unsigned char)h[i];
    }
}

/* Standard base64 of `n` bytes into `out` (4 * ceil(n / 3) + 1 bytes). */
static void base64(const unsigned char *in, size_t n, char *out)
{
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = tab[(v >> 18) & 63];
        out[o++] = tab[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? tab[v & 63] : '=';
    }
    out[o] = '\0';
}

void ws_accept_key(const char *key, char out[29])
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    char buf[256];
    int n = snprintf(buf, sizeof buf, "%s%s", key, guid);
    CHECK(n > 0 && (size_t)n < sizeof buf, "Sec-WebSocket-Key too long");
    unsigned char digest[20];
    sha1(buf, (size_t)n, digest);
    base64(digest, 20, out);
}

static void random_bytes(void *p, size_t n)
{
    ssize_t r = getrandom(p, n, 0);
    CHECK(r == (ssize_t)n, "getrandom: %s", strerror(errno));
}

/* ------------------------------------------------------------------ */
/* WebSocket client                                                     */
/* ------------------------------------------------------------------ */

void ws_frame_free(struct ws_frame *f)
{
    free(f->data);
    f->data = NULL;
}

static struct ws *ws_new(int fd)
{
    struct ws *c = calloc(1, sizeof *c);
    CHECK(c != NULL, "out of memory");
    c->fd = fd;
    c->auto_pong = 1;
    c->next_id = 1000000;
    return c;
}

void ws_free(struct ws *c)
{
    if (!c)
        return;
    close(c->fd);
    free(c->rbuf);
    free(c->welcome);
    free(c);
}

void ws_abort(struct ws *c)
{
    struct linger lg = { .l_onoff = 1, .l_linger = 0 };
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    ws_free(c);
}

int ws_handshake(int port, const struct ws_opts *o, struct ws **out,
                 struct http_resp *resp)
{
    struct ws_opts def = { 0 };
    if (!o)
        o = &def;
    *out = NULL;
    unsigned char nonce[16];
    random_bytes(nonce, sizeof nonce);
    char key[25], accept[29];
    base64(nonce, sizeof nonce, key);
    ws_accept_key(key, accept);

    int fd = tcp_connect_opts(port, o->rcvbuf);
    char *req = xasprintf("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                          "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                          o->path ? o->path : "/ws", port, key,
                          o->headers ? o->headers : "");
    tcp_send(fd, req, strlen(req));
    free(req);

    struct rbuf b = { 0 };
    struct http_resp r;
    int64_t deadline = ht_now_ms() + HT_WAIT_MS;
    /* read the head only: what follows a 101 is WebSocket frames */
    char *end;
    while (!(b.p && (end = strstr(b.p, "\r\n\r\n")))) {
        int f = rbuf_fill(fd, &b, deadline);
        if (f == 0 && b.len == 0) {
            /* closed without a word */
            close(fd);
            free(b.p);
            if (resp) {
                memset(resp, 0, sizeof *resp);
                resp->head = xstrndup("", 0);
                resp->body = xstrndup("", 0);
            }
            return 0;
        }
        if (f <= 0)
            FAIL("WebSocket handshake: %s before the end of the response head; got: %.*s",
                         f == 0 ? "connection closed" : "timed out",
                         (int)b.len, b.p ? b.p : "");
    }
    memset(&r, 0, sizeof r);
    size_t hlen = (size_t)(end - b.p) + 2;
    r.head = xstrndup(b.p, hlen);
    int minor;
    if (sscanf(r.head, "HTTP/1.%d %d", &minor, &r.status) != 2)
        FAIL("WebSocket handshake: bad status line: %s", r.head);
    if (r.status != 101) {
        /* not upgraded: read it as an ordinary response */
        free(r.head);
        read_response(fd, &b, &r, deadline, 0);
        close(fd);
        free(b.p);
        int st = r.status;
        if (resp)
            *resp = r;
        else
            http_resp_free(&r);
        return st;
    }
    size_t vl;
    const char *v = find_header(r.head, "Upgrade", &vl);
    CHECK(v && vl == 9 && strncasecmp(v, "websocket", 9) == 0,
                  "101 without Upgrade: websocket:\n%s", r.head);
    v = find_header(r.head, "Connection", &vl);
    CHECK(v && memmem(v, vl, "pgrade", 6),
                  "101 without Connection: Upgrade:\n%s", r.head);
    v = find_header(r.head, "Sec-WebSocket-Accept", &vl);
    CHECK(v && vl == 28 && memcmp(v, accept, 28) == 0,
                  "Sec-WebSocket-Accept is not %s:\n%s", accept, r.head);
    /* the bytes after the head are the first frames */
    size_t off = hlen + 2;
    struct ws *c = ws_new(fd);
    c->rcap = b.cap;
    c->rbuf = (unsigned char *)b.p;
    c->rlen = b.len - off;
    memmove(c->rbuf, c->rbuf + off, c->rlen);
    if (resp)
        *resp = r;
    else
        http_resp_free(&r);
    if (!o->no_welcome) {
        char *w = ws_recv_text(c);
        yajl_val v2 = json_parse(w);
        const char *op = json_get_str(v2, "op");
        CHECK(op && strcmp(op, "welcome") == 0,
                      "first frame is not a welcome: %s", w);
        yajl_tree_free(v2);
        c->welcome = w;
    }
    *out = c;
    return 101;
}

struct ws *ws_connect(int port)
{
    return ws_connect_opts(port, NULL);
}

struct ws *ws_connect_opts(int port, const struct ws_opts *o)
{
    struct ws *c;
    struct http_resp r;
    int st = ws_handshake(port, o, &c, &r);
    if (st != 101)
        FAIL("WebSocket upgrade refused: status %d\n%s%s", st, r.head, r.body);
    http_resp_free(&r);
    return c;
}

int ws_send_raw(struct ws *c, const void *p, size_t n)
{
    return send_all(c->fd, p, n, ht_now_ms() + HT_WAIT_MS);
}

void ws_send_frame(struct ws *c, int fin, int opcode, const void *p, size_t len)
{
    unsigned char *f = xmalloc(len + 14);
    size_t h = 0;
    f[h++] = (unsigned char)((fin ? 0x80 : 0) | (opcode & 0x0f));
    if (len < 126) {
        f[h++] = (unsigned char)(0x80 | len);
    } else if (len <= 0xffff) {
        f[h++] = 0x80 | 126;
        f[h++] = (unsigned char)(len >> 8);
        f[h++] = (unsigned char)len;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            f[h++] = (unsigned char)((uint64_t)len >> (8 * i));
    }
    unsigned char mask[4];
    random_bytes(mask, 4);
    memcpy(f + h, mask, 4);
    h += 4;
    const unsigned char *s = p;
    for (size_t i = 0; i < len; i++)
        f[h + i] = s[i] ^ mask[i & 3];
    int r = ws_send_raw(c, f, h + len);
    free(f);
    CHECK(r == 0, "WebSocket send (opcode %d, %zu bytes): %s", opcode, len,
                  strerror(-r));
}

void ws_send_text(struct ws *c, const char *s)
{
    ws_send_frame(c, 1, WS_TEXT, s, strlen(s));
}

void ws_send_binary(struct ws *c, const void *p, size_t len)
{
    ws_send_frame(c, 1, WS_BINARY, p, len);
}

void ws_send_fragments(struct ws *c, int opcode, const void *p, size_t len,
                       const size_t *sizes, size_t nsizes)
{
    CHECK(nsizes > 0, "ws_send_fragments: no sizes");
    const char *s = p;
    size_t off = 0, i = 0;
    do {
        size_t n = sizes[i < nsizes ? i : nsizes - 1];
        if (n > len - off)
            n = len - off;
        int last = off + n == len;
        ws_send_frame(c, last, i == 0 ? opcode : WS_CONT, s + off, n);
        off += n;
        i++;
    } while (off < len);
}

void ws_send_close(struct ws *c, int code, const char *reason)
{
    unsigned char buf[125];
    size_t n = 0;
    if (code) {
        size_t rl = reason ? strlen(reason) : 0;
        CHECK(rl <= 123, "close reason too long");
        buf[0] = (unsigned char)(code >> 8);
        buf[1] = (unsigned char)code;
        memcpy(buf + 2, reason, rl);
        n = 2 + rl;
    }
    ws_send_frame(c, 1, WS_CLOSE, buf, n);
}

/* Makes sure `need` bytes are buffered. Returns 1, 0 on timeout, -1 when
 * the connection closed first. */
static int ws_fill(struct ws *c, size_t need, int64_t deadline)
{
    while (c->rlen < need) {
        if (c->rcap - c->rlen < 16384 || c->rcap < need + 1) {
            size_t cap = c->rcap ? c->rcap * 2 : 65536;
            while (cap < need + 16384)
                cap *= 2;
            c->rbuf = xrealloc(c->rbuf, cap);
            c->rcap = cap;
        }
        ssize_t n = tcp_recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, remaining(deadline));
        if (n == HT_TIMEOUT)
            return 0;
        if (n == 0)
            return -1;
        c->rlen += (size_t)n;
    }
    return 1;
}

static int recv_frame_until(struct ws *c, struct ws_frame *f, int64_t deadline)
{
    memset(f, 0, sizeof *f);
    int r = ws_fill(c, 2, deadline);
    if (r <= 0)
        return r;
    unsigned char b0 = c->rbuf[0], b1 = c->rbuf[1];
    CHECK((b0 & 0x70) == 0, "server frame with RSV bits set: 0x%02x", b0);
    CHECK((b1 & 0x80) == 0, "server frame is masked (RFC 6455 5.1 forbids it)");
    size_t h = 2;
    uint64_t len = b1 & 0x7f;
    if (len == 126) {
        if ((r = ws_fill(c, 4, deadline)) <= 0)
            return r;
        len = (uint64_t)c->rbuf[2] << 8 | c->rbuf[3];
        h = 4;
    } else if (len == 127) {
        if ((r = ws_fill(c, 10, deadline)) <= 0)
            return r;
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | c->rbuf[2 + i];
        h = 10;
    }
    CHECK(len < (64u << 20), "server frame of %llu bytes", (unsigned long long)len);
    if ((r = ws_fill(c, h + len, deadline)) <= 0)
        return r;
    f->opcode = b0 & 0x0f;
    f->fin = (b0 & 0x80) != 0;
    f->len = (size_t)len;
    f->data = xstrndup((const char *)c->rbuf + h, f->len);
    c->rlen -= h + f->len;
    memmove(c->rbuf, c->rbuf + h + f->len, c->rlen);

    if (f->opcode >= 0x8) {
        CHECK(f->fin && f->len <= 125,
                      "bad server control frame: opcode %d fin %d len %zu",
                      f->opcode, f->fin, f->len);
    }
    if (f->opcode == WS_CLOSE) {
        CHECK(f->len != 1, "close frame with a 1-byte payload");
        if (f->len == 0) {
            f->close_code = 1005;
        } else {
            f->close_code = (unsigned char)f->data[0] << 8 | (unsigned char)f->data[1];
            snprintf(f->close_reason, sizeof f->close_reason, "%.*s",
                     (int)(f->len - 2), f->data + 2);
        }
    } else if (f->opcode == WS_PING) {
        c->pings++;
        if (c->auto_pong) {
            /* mask + send by hand: the peer may be gone, which is not an error here */
            unsigned char buf[6 + 125], mask[4];
            random_bytes(mask, 4);
            buf[0] = 0x80 | WS_PONG;
            buf[1] = (unsigned char)(0x80 | f->len);
            memcpy(buf + 2, mask, 4);
            for (size_t i = 0; i < f->len; i++)
                buf[6 + i] = (unsigned char)f->data[i] ^ mask[i & 3];
            (void)ws_send_raw(c, buf, 6 + f->len);
        }
    } else {
        CHECK(f->opcode == WS_CONT || f->opcode == WS_TEXT ||
                      f->opcode == WS_BINARY || f->opcode == WS_PONG,
                      "server frame with reserved opcode %d", f->opcode);
    }
    return 1;
}

int ws_recv_frame(struct ws *c, struct ws_frame *f, int timeout_ms)
{
    return recv_frame_until(c, f, ht_now_ms() + timeout_ms);
}

int ws_recv_msg(struct ws *c, struct ws_frame *f, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    struct ws_frame msg = { 0 };
    int have = 0;
    for (;;) {
        struct ws_frame fr;
        int r = recv_frame_until(c, &fr, deadline);
        if (r <= 0) {
            ws_frame_free(&msg);
            return r;
        }
        if (fr.opcode == WS_PING || fr.opcode == WS_PONG) {
            ws_frame_free(&fr);
            continue;
        }
        if (fr.opcode == WS_CLOSE) {
            ws_frame_free(&msg);
            *f = fr;
            return 1;
        }
        if (!have) {
            CHECK(fr.opcode != WS_CONT, "continuation frame without a first frame");
            msg = fr;
            have = 1;
        } else {
            CHECK(fr.opcode == WS_CONT,
                          "new data frame (opcode %d) inside a fragmented message", fr.opcode);
            msg.data = xrealloc(msg.data, msg.len + fr.len + 1);
            memcpy(msg.data + msg.len, fr.data, fr.len);
            msg.len += fr.len;
            msg.data[msg.len] = '\0';
            msg.fin = fr.fin;
            ws_frame_free(&fr);
        }
        if (msg.fin) {
            *f = msg;
            return 1;
        }
    }
}

/* Describes a ws_recv_msg outcome for failure messages (static buffer). */
static const char *describe(int r, const struct ws_frame *f)
{
    static __thread char buf[600];
    if (r == 0)
        return "nothing (timed out)";
    if (r < 0)
        return "TCP close (no close frame)";
    if (f->opcode == WS_CLOSE)
        snprintf(buf, sizeof buf, "close frame %d \"%s\"", f->close_code, f->close_reason);
    else
        snprintf(buf, sizeof buf, "%s message (%zu bytes) %.500s",
                 f->opcode == WS_TEXT ? "text" : "binary", f->len, f->data);
    return buf;
}

char *ws_recv_text(struct ws *c)
{
    struct ws_frame f;
    int r = ws_recv_msg(c, &f, HT_WAIT_MS);
    if (r != 1 || f.opcode != WS_TEXT)
        FAIL("expected a text message, got %s", describe(r, &f));
    return f.data;
}

yajl_val ws_recv_json(struct ws *c)
{
    char *t = ws_recv_text(c);
    yajl_val v = json_parse(t);
    free(t);
    return v;
}

void ws_expect(struct ws *c, const char *want)
{
    struct ws_frame f;
    int r = ws_recv_msg(c, &f, HT_WAIT_MS);
    if (r != 1 || f.opcode != WS_TEXT || f.len != strlen(want) ||
        memcmp(f.data, want, f.len) != 0)
        FAIL("expected text message\n  %s\ngot %s", want, describe(r, &f));
    ws_frame_free(&f);
}

void ws_expect_pair(struct ws *c, const char *a, const char *b)
{
    char *x = ws_recv_text(c);
    char *y = ws_recv_text(c);
    int ok = (strcmp(x, a) == 0 && strcmp(y, b) == 0) ||
             (strcmp(x, b) == 0 && strcmp(y, a) == 0);
    if (!ok)
        FAIL("expected the two messages\n  %s\n  %s\n(in any order), got\n  %s\n  %s",
                     a, b, x, y);
    free(x);
    free(y);
}

char *ws_expect_error(struct ws *c, const char *id_json, const char *code)
{
    char *t = ws_recv_text(c);
    char *prefix = id_json
        ? xasprintf("{\"id\":%s,\"ok\":false,\"error\":{\"code\":\"%s\",\"message\":\"", id_json, code)
        : xasprintf("{\"ok\":false,\"error\":{\"code\":\"%s\",\"message\":\"", code);
    size_t pl = strlen(prefix), tl = strlen(t);
    int ok = tl > pl + 3 && strncmp(t, prefix, pl) == 0 &&
             strcmp(t + tl - 3, "\"}}") == 0;
    if (ok) {
        /* the whole text must be valid JSON whose message is a non-empty string */
        char err[256];
        yajl_val v = yajl_tree_parse(t, err, sizeof err);
        const char *m = v ? json_get_str(v, "error", "message") : NULL;
        ok = m && *m;
        yajl_tree_free(v);
    }
    if (!ok)
        FAIL("expected error reply\n  %s<non-empty>\"}}\ngot\n  %s", prefix, t);
    free(prefix);
    return t;
}

void ws_expect_close(struct ws *c, int code)
{
    struct ws_frame f;
    int r = ws_recv_msg(c, &f, HT_WAIT_MS);
    if (r != 1 || f.opcode != WS_CLOSE || f.close_code != code)
        FAIL("expected close frame %d, got %s", code, describe(r, &f));
    ws_frame_free(&f);
    /* answer like a well-behaved client; the server may already be gone */
    unsigned char buf[8] = { 0x80 | WS_CLOSE, 0x80 | 2 };
    random_bytes(buf + 2, 4);
    buf[6] = (unsigned char)((code >> 8) ^ buf[2]);
    buf[7] = (unsigned char)((code & 0xff) ^ buf[3]);
    (void)ws_send_raw(c, buf, sizeof buf);
    CHECK(tcp_wait_closed(c->fd, HT_WAIT_MS),
                  "server did not close the TCP connection after the close handshake");
}

void ws_expect_dropped(struct ws *c, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    for (;;) {
        struct ws_frame f;
        int r = recv_frame_until(c, &f, deadline);
        if (r < 0)
            return;
        if (r == 1 && (f.opcode == WS_PING || f.opcode == WS_PONG)) {
            ws_frame_free(&f);
            continue;
        }
        FAIL("expected the connection to be dropped within %d ms, got %s",
                     timeout_ms, r == 0 ? "nothing (still open)" : describe(r, &f));
    }
}

void ws_sync(struct ws *c)
{
    long long id = c->next_id++;
    char req[96], want[96];
    snprintf(req, sizeof req, "{\"op\":\"ping\",\"id\":\"sync-%lld\"}", id);
    snprintf(want, sizeof want, "{\"id\":\"sync-%lld\",\"ok\":true}", id);
    ws_send_text(c, req);
    ws_expect(c, want);
}

static void command_ok(struct ws *c, const char *op, const char *channel,
                       const char *data, int echo_channel)
{
    long long id = c->next_id++;
    char *req = data
        ? xasprintf("{\"op\":\"%s\",\"channel\":\"%s\",\"data\":%s,\"id\":%lld}", op, channel, data, id)
        : xasprintf("{\"op\":\"%s\",\"channel\":\"%s\",\"id\":%lld}", op, channel, id);
    char *want = echo_channel
        ? xasprintf("{\"id\":%lld,\"ok\":true,\"channel\":\"%s\"}", id, channel)
        : xasprintf("{\"id\":%lld,\"ok\":true}", id);
    ws_send_text(c, req);
    ws_expect(c, want);
    free(req);
    free(want);
}

void ws_subscribe(struct ws *c, const char *channel)
{
    command_ok(c, "subscribe", channel, NULL, 1);
}

void ws_unsubscribe(struct ws *c, const char *channel)
{
    command_ok(c, "unsubscribe", channel, NULL, 0);
}

void ws_publish(struct ws *c, const char *channel, const char *data_json)
{
    command_ok(c, "publish", channel, data_json, 0);
}

char *ws_delivery(const char *channel, const char *data_json)
{
    return xasprintf("{\"op\":\"message\",\"channel\":\"%s\",\"data\":%s}", channel, data_json);
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
