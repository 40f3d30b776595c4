/* Integration suite: the binary as an operator uses it. Command line,
 * conf loading and --check (docs/config.md), where the conf is found
 * without -c, --listen, startup failures (port in use), signals and the
 * graceful shutdown, log levels, and broken clients that must not hurt
 * anyone else.
 *
 * Hubs that run end with exit status 0 asserted: the ASan build exits
 * non-zero on a leak, so shutting down with clients, stalled requests and
 * half-received messages still around is also a leak check. Keepalive
 * (ping_interval/ping_timeout) is covered by test_ws.c (ping_keepalive). */
#include <check.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hubtest.h"

#define BASE_CONF "ping_interval = 30\nping_timeout = 10\n"

/* ------------------------------------------------------------------ */
/* Helpers                                                              */
/* ------------------------------------------------------------------ */

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    ck_assert_msg(n >= 0, "out of memory");
    return s;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static const char *tmpdir(void)
{
    const char *t = getenv("TMPDIR");
    return t && *t ? t : "/tmp";
}

static char *read_all(const char *path)
{
    FILE *f = fopen(path, "r");
    size_t len = 0, cap = 4096;
    char *s = malloc(cap);
    ck_assert_ptr_nonnull(s);
    if (f) {
        size_t n;
        while ((n = fread(s + len, 1, cap - len - 1, f)) > 0) {
            len += n;
            if (cap - len < 2048) {
                s = realloc(s, cap *= 2);
                ck_assert_ptr_nonnull(s);
            }
        }
        fclose(f);
    }
    s[len] = '\0';
    return s;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_msg(f != NULL, "fopen %s: %s", path, strerror(errno));
    fputs(text, f);
    fclose(f);
}

/* Number of lines of `s` that contain `needle`. */
static int count_lines_with(const char *s, const char *needle)
{
    int n = 0;
    for (const char *l = s; *l; ) {
        const char *e = strchr(l, '\n');
        size_t len = e ? (size_t)(e - l) : strlen(l);
        if (memmem(l, len, needle, strlen(needle)))
            n++;
        l += len + (e ? 1 : 0);
    }
    return n;
}

/* A startup failure says what failed in one ERROR line (`what` and `what2`
 * in it), with no other ERROR or WARN line around it (INFO lines about
 * startup progress may come before it). */
static void expect_one_error_line(const char *out, const char *what, const char *what2)
{
    int errors = count_lines_with(out, " ERROR "), warns = count_lines_with(out, " WARN ");
    ck_assert_msg(errors == 1 && warns == 0,
                  "expected one ERROR line and no WARN line, got %d and %d:\n%s", errors, warns,
                  out);
    const char *l = strstr(out, " ERROR ");
    size_t len = strcspn(l, "\n");
    ck_assert_msg(memmem(l, len, what, strlen(what)) && memmem(l, len, what2, strlen(what2)),
                  "the ERROR line does not mention \"%s\" and \"%s\":\n%s", what, what2, out);
}

/* `log` without the startup line "... listening on HOST:PORT" (new
 * string): that line names the bound port, so the hub may print it at any
 * log_level. */
static char *without_listening_line(const char *log)
{
    char *out = strdup(log);
    ck_assert_ptr_nonnull(out);
    char *l = strstr(out, " listening on ");
    if (l) {
        while (l > out && l[-1] != '\n')
            l--;
        char *e = strchr(l, '\n');
        memmove(l, e ? e + 1 : l + strlen(l), strlen(e ? e + 1 : l + strlen(l)) + 1);
    }
    return out;
}

/* Number of lines (non-empty) in `s`. */
static int count_lines(const char *s)
{
    int n = 0;
    for (const char *l = s; *l; ) {
        const char *e = strchr(l, '\n');
        size_t len = e ? (size_t)(e - l) : strlen(l);
        if (len)
            n++;
        l += len + (e ? 1 : 0);
    }
    return n;
}

/* Whether a line of `s` starts with `prefix`. */
static int has_line_starting(const char *s, const char *prefix)
{
    size_t pl = strlen(prefix);
    for (const char *l = s; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
        if (strncmp(l, prefix, pl) == 0)
            return 1;
    return 0;
}

/* A free TCP port on 127.0.0.1 (probed: bound to port 0, then released). */
static int probe_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET };
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    socklen_t sl = sizeof sa;
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

/* A socket listening on 127.0.0.1 (a port that is in use). `*port` gets
 * its port. */
static int hold_port(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET };
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    ck_assert_int_eq(listen(fd, 4), 0);
    socklen_t sl = sizeof sa;
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
    *port = ntohs(sa.sin_port);
    return fd;
}

/* A hub (or any run of the binary) started by this file: hubtest's
 * hub_start always passes -c and waits for the "listening on" line, and
 * the tests below need neither (no -c, another working directory, a log
 * level that hides the line). Same rules: bounded waits, the child dies
 * with the test (PR_SET_PDEATHSIG), stdout+stderr to a log file. */
struct proc {
    pid_t pid;
    char log[300];
    int exited;
    int status;     /* exit code, or 128 + signal */
};

static void proc_start(struct proc *p, const char *cwd, const char *const *args)
{
    const char *bin = getenv("LUAHUB_BIN");
    ck_assert_msg(bin && *bin, "LUAHUB_BIN is not set (run the suite through ctest)");
    memset(p, 0, sizeof *p);
    snprintf(p->log, sizeof p->log, "%s/hublife.XXXXXX", tmpdir());
    int fd = mkstemp(p->log);
    ck_assert_msg(fd >= 0, "mkstemp: %s", strerror(errno));
    size_t n = 0;
    while (args[n])
        n++;
    const char **argv = calloc(n + 2, sizeof *argv);
    ck_assert_ptr_nonnull(argv);
    argv[0] = bin;
    memcpy(argv + 1, args, n * sizeof *args);
    pid_t parent = getpid();
    p->pid = fork();
    ck_assert_msg(p->pid >= 0, "fork: %s", strerror(errno));
    if (p->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        if (cwd && chdir(cwd) < 0)
            _exit(126);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0)
            dup2(devnull, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        closefrom(3);
        signal(SIGPIPE, SIG_DFL);
        execv(bin, (char *const *)argv);
        dprintf(2, "exec %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    close(fd);
    free(argv);
}

static char *proc_output(const struct proc *p)
{
    return read_all(p->log);
}

/* Waits up to `timeout_ms` for the process to exit: its status, or -1. */
static int proc_wait(struct proc *p, int timeout_ms)
{
    int64_t deadline = ht_now_ms() + timeout_ms;
    while (!p->exited) {
        int st;
        pid_t r = waitpid(p->pid, &st, WNOHANG);
        ck_assert_msg(r >= 0, "waitpid: %s", strerror(errno));
        if (r == p->pid) {
            p->exited = 1;
            p->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            break;
        }
        if (ht_now_ms() >= deadline)
            return -1;
        sleep_ms(5);
    }
    return p->status;
}

/* SIGTERM (if running), a bounded wait (SIGKILL and failure past it), the
 * log removed (printed first when the status is not 0). Returns the status. */
static int proc_stop(struct proc *p)
{
    if (!p->exited)
        kill(p->pid, SIGTERM);
    int st = proc_wait(p, 20000);
    if (st < 0) {
        kill(p->pid, SIGKILL);
        proc_wait(p, 20000);
        char *out = proc_output(p);
        ck_abort_msg("luahub did not exit within 20 s of SIGTERM; output:\n%s", out);
    }
    if (st != 0) {
        char *out = proc_output(p);
        fprintf(stderr, "luahub exited with status %d; its output:\n%s\n", st, out);
        free(out);
    }
    unlink(p->log);
    return st;
}

/* Runs the binary in `cwd` (NULL: ours) to completion, bounded by
 * `timeout_ms` (killed and failed past it). Returns the status; `*out`
 * gets stdout+stderr (new string). */
static int run_in(const char *cwd, const char *const *args, char **out, int timeout_ms)
{
    struct proc p;
    proc_start(&p, cwd, args);
    int st = proc_wait(&p, timeout_ms);
    if (st < 0) {
        kill(p.pid, SIGKILL);
        proc_wait(&p, 20000);
        char *o = proc_output(&p);
        unlink(p.log);
        ck_abort_msg("luahub did not exit within %d ms (killed); output:\n%s", timeout_ms, o);
    }
    *out = proc_output(&p);
    unlink(p.log);
    return st;
}

/* Port of the "listening on HOST:PORT" line, waited for (bounded); fails
 * if the process exits first. */
static int proc_port(struct proc *p)
{
    int64_t deadline = ht_now_ms() + 15000;
    for (;;) {
        char *log = proc_output(p);
        const char *l = strstr(log, "listening on ");
        if (l) {
            l += strlen("listening on ");
            size_t n = strcspn(l, " \r\n");
            const char *colon = NULL;
            for (size_t i = 0; i < n; i++)
                if (l[i] == ':')
                    colon = l + i;
            if (colon && l[n] == '\n') {
                int port = atoi(colon + 1);
                free(log);
                return port;
            }
        }
        if (proc_wait(p, 0) >= 0)
            ck_abort_msg("luahub exited with status %d before listening:\n%s", p->status, log);
        ck_assert_msg(ht_now_ms() < deadline, "no \"listening on\" line in time:\n%s", log);
        free(log);
        sleep_ms(10);
    }
}

/* Waits (bounded) until something accepts connections on `port`: for a
 * hub whose log level hides the "listening on" line. */
static void proc_wait_accepting(struct proc *p, int port)
{
    int64_t deadline = ht_now_ms() + 15000;
    for (;;) {
        int fd = tcp_try_connect(port);
        if (fd >= 0) {
            close(fd);
            return;
        }
        if (proc_wait(p, 0) >= 0) {
            char *out = proc_output(p);
            ck_abort_msg("luahub exited with status %d before listening:\n%s", p->status, out);
        }
        ck_assert_msg(ht_now_ms() < deadline, "nothing accepts on port %d", port);
        sleep_ms(10);
    }
}

/* Upper bound of the bytes the kernel can hold between the hub's queue and
 * a client that does not read (its SO_RCVBUF set small): the hub's send
 * buffer (autotuned up to tcp_wmem's maximum) and the client's receive
 * buffer. Twice tcp_wmem's maximum plus 1 MiB, within [8 MiB, 64 MiB]. */
static long kernel_bound_bytes(void)
{
    long lo = 0, def = 0, max = 4L << 20;
    FILE *fp = fopen("/proc/sys/net/ipv4/tcp_wmem", "r");
    if (fp) {
        if (fscanf(fp, "%ld %ld %ld", &lo, &def, &max) != 3)
            max = 4L << 20;
        fclose(fp);
    }
    long b = 2 * max + (1L << 20);
    return b < (8L << 20) ? (8L << 20) : b > (64L << 20) ? (64L << 20) : b;
}

#define STUCK_PAD 60000
#define STUCK_CONF                      \
    "max_message_size = 65536\n"        \
    "max_queue_bytes = \"256MiB\"\n"    \
    "ping_interval = 30\n"              \
    "ping_timeout = 10\n"

static long long frame_size(size_t len)
{
    return (long long)len + (len < 126 ? 2 : len < 65536 ? 4 : 10);
}

static char *stuck_data(int seq)
{
    char *d = malloc(STUCK_PAD + 32);
    ck_assert_ptr_nonnull(d);
    int n = snprintf(d, 32, "{\"s\":%d,\"p\":\"", seq);
    memset(d + n, 'a' + seq % 26, STUCK_PAD);
    strcpy(d + n + STUCK_PAD, "\"}");
    return d;
}

/* Connects a subscriber of "stuck" that does not read, and publishes more
 * than the kernel can buffer for it (max_queue_bytes is far above that, so
 * it is not culled): frames, and a close frame queued after them, wait in
 * the hub. Returns the client (the hub's only connection). */
static struct ws *stuck_client(struct hub *h)
{
    struct ws_opts so = { .rcvbuf = 4096 };
    struct ws *stuck = ws_connect_opts(h->port, &so), *pub = ws_connect(h->port);
    ws_subscribe(stuck, "stuck");
    long long frames = 0;
    int n = (int)(kernel_bound_bytes() / STUCK_PAD) + 1;
    for (int i = 0; i < n; i++) {
        char *d = stuck_data(i);
        ws_publish(pub, "stuck", d);
        char *m = ws_delivery("stuck", d);
        frames += frame_size(strlen(m));
        free(m);
        free(d);
    }
    ws_free(pub);
    hub_metric_wait(h, "luahub_connections", 1, HT_WAIT_MS);
    long long out = hub_metric(h, "luahub_bytes_out_total");
    ck_assert_msg(out < frames, "the hub wrote %lld bytes of %lld: nothing is held back",
                  out, frames);
    ck_assert_int_eq(hub_metric(h, "luahub_slow_consumer_closes_total"), 0);
    return stuck;
}

/* a and b are subscribed to "room": a publishes, b gets it exactly. */
static void pubsub_works(struct ws *a, struct ws *b, const char *data)
{
    ws_publish(a, "room", data);
    char *want = ws_delivery("room", data);
    ws_expect(b, want);
    free(want);
    ws_sync(b);
}

/* ------------------------------------------------------------------ */
/* Command line                                                         */
/* ------------------------------------------------------------------ */

START_TEST(cli_version)
{
    char *out;
    const char *const args[] = { "--version", NULL };
    ck_assert_int_eq(hub_run(args, &out, HT_WAIT_MS), 0);
    int a, b, c, n = 0;
    ck_assert_msg(sscanf(out, "luahub %d.%d.%d\n%n", &a, &b, &c, &n) == 3 &&
                  n == (int)strlen(out), "--version printed: %s", out);
    /* the version the welcome frame announces */
    struct hub *h = hub_start(BASE_CONF);
    struct ws *w = ws_connect(h->port);
    yajl_val v = json_parse(w->welcome);
    const char *ver = json_get_str(v, "version");
    char want[64];
    snprintf(want, sizeof want, "luahub %s\n", ver ? ver : "(none)");
    ck_assert_str_eq(out, want);
    yajl_tree_free(v);
    ws_free(w);
    ck_assert_int_eq(hub_stop(h), 0);
    free(out);
    const char *const args2[] = { "-v", NULL };
    ck_assert_int_eq(hub_run(args2, &out, HT_WAIT_MS), 0);
    ck_assert_str_eq(out, want);
    free(out);
}
END_TEST

START_TEST(cli_help)
{
    static const char *const opts[] = { "-h", "--help" };
    for (int i = 0; i < 2; i++) {
        char *out;
        const char *const args[] = { opts[i], NULL };
        ck_assert_int_eq(hub_run(args, &out, HT_WAIT_MS), 0);
        ck_assert_msg(strncmp(out, "usage: luahub", 13) == 0 && strstr(out, "--check") &&
                      strstr(out, "--listen") && strstr(out, "--version"),
                      "%s printed: %s", opts[i], out);
        free(out);
    }
}
END_TEST

START_TEST(cli_unknown_option_exits_2)
{
    char *out;
    const char *const a1[] = { "--bogus", NULL };
    ck_assert_int_eq(hub_run(a1, &out, HT_WAIT_MS), 2);
    ck_assert_msg(strstr(out, "bogus") && strstr(out, "usage: luahub"), "output: %s", out);
    free(out);
    const char *const a2[] = { "-x", NULL };
    ck_assert_int_eq(hub_run(a2, &out, HT_WAIT_MS), 2);
    ck_assert_msg(strstr(out, "'x'") && strstr(out, "usage: luahub"), "output: %s", out);
    free(out);
    const char *const a4[] = { "-c", "x.conf", "stray", NULL };
    ck_assert_int_eq(hub_run(a4, &out, HT_WAIT_MS), 2);
    ck_assert_msg(strstr(out, "stray"), "output: %s", out);
    free(out);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The conf and --check                                                 */
/* ------------------------------------------------------------------ */

/* `luahub -c FILE --check` with FILE holding `conf` must exit 2 and print
 * exactly the problems `want` (NULL-terminated), each "LINE: message" after
 * "FILE:", in this order, one per line. */
static void check_fails(const char *conf, const char *const *want)
{
    char *path = ht_tmpfile(conf);
    char *out;
    const char *const args[] = { "-c", path, "--check", NULL };
    int st = hub_run(args, &out, HT_WAIT_MS);
    ck_assert_msg(st == 2, "--check exited %d, expected 2; output:\n%s", st, out);
    const char *at = out;
    int n = 0;
    for (; want[n]; n++) {
        char *line = xasprintf("%s:%s", path, want[n]);
        const char *p = strstr(at, line);
        ck_assert_msg(p && (p == out || p[-1] == '\n'),
                      "--check output lacks (in order) the line\n  %s\noutput:\n%s", line, out);
        at = p + strlen(line);
        free(line);
    }
    /* no other FILE:LINE: problem */
    char *prefix = xasprintf("%s:", path);
    int problems = 0;
    for (const char *l = out; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
        if (strncmp(l, prefix, strlen(prefix)) == 0 && l[strlen(prefix)] >= '0' &&
            l[strlen(prefix)] <= '9')
            problems++;
    ck_assert_msg(problems == n, "%d problems printed, expected %d:\n%s", problems, n, out);
    free(prefix);
    unlink(path);
    free(path);
    free(out);
}

START_TEST(check_valid_conf_exits_0)
{
    /* every key, with expressions; listen names a port that is in use:
     * --check validates without opening a socket */
    int port, held = hold_port(&port);
    char *conf = xasprintf(
        "local k = 1024\n"
        "listen = \"127.0.0.1:%d\"\n"
        "websocket_path = \"/\" .. \"live\"\n"
        "api_key = \"s3cret\"\n"
        "max_message_size = \"64KiB\"\n"
        "max_queue_bytes = 4 * k * k\n"
        "max_channels_per_conn = 256\n"
        "max_connections = 1000\n"
        "max_protocol_errors = 20\n"
        "ping_interval = 20\n"
        "ping_timeout = 60 // 6\n"
        "shutdown_timeout = 3\n"
        "static_dir = \"%s\"\n"
        "log_level = \"warn\"\n", port, tmpdir());
    char *path = ht_tmpfile(conf);
    char *out;
    const char *const args[] = { "-c", path, "--check", NULL };
    ck_assert_int_eq(hub_run(args, &out, HT_WAIT_MS), 0);
    char *want = xasprintf("%s: ok\n", path);
    ck_assert_str_eq(out, want);
    free(want);
    free(out);
    unlink(path);
    free(path);
    free(conf);
    close(held);
}
END_TEST

/* Confs --check refuses, with the FILE:LINE messages each must print
 * (a message ending in ": " is a prefix). */
static const struct {
    const char *conf;
    const char *want[6];
} bad_confs[] = {
    {"ping_interval = 20\n-- a comment\nmax_message_size = = 3\n",
     {"3: unexpected symbol near '='"}},
    {"ping_interval = 20\nlistn = \"127.0.0.1:0\"\n",
     {"2: unknown key 'listn' (did you mean 'listen'?)"}},
    {"ping_interval = \"20\"\nmax_message_size = true\nlisten = 8080\n",
     {"1: ping_interval: expected a whole number of seconds, got string",
      "2: max_message_size: expected a size (integer bytes or a string like \"64KiB\"), got boolean",
      "3: listen: "}},
    {"ping_interval = 0\nmax_message_size = \"128MiB\"\nmax_connections = -1\n",
     {"1: ping_interval: 0 is out of range (1..3600)",
      "2: max_message_size: 128MiB is out of range (64..64MiB)",
      "3: max_connections: -1 is out of range"}},
};

START_TEST(check_bad_conf)
{
    check_fails(bad_confs[_i].conf, bad_confs[_i].want);
}
END_TEST

START_TEST(check_bad_listen_address)
{
    static const char *const bad[][2] = {
        { "listen = \"127.0.0.1\"\n", "1: listen: " },                  /* no port */
        { "listen = \":8080\"\n", "1: listen: missing host in \":8080\"" },
        { "listen = \"127.0.0.1:99999\"\n", "1: listen: port 99999 is out of range (0..65535)" },
        { "listen = \"999.1.1.1:80\"\n", "1: listen: invalid host \"999.1.1.1\"" },
        { "listen = \"::1:80\"\n", "1: listen: " },                     /* IPv6 without [] */
        { "listen = \"127.0.0.1:http\"\n", "1: listen: " },
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        const char *const want[] = { bad[i][1], NULL };
        check_fails(bad[i][0], want);
    }
}
END_TEST

START_TEST(check_reports_every_problem)
{
    static const char *const want[] = {
        "1: unknown key 'listn' (did you mean 'listen'?)",
        "2: ping_interval: 0 is out of range (1..3600)",
        "4: log_level: unknown level \"loud\"",
        "5: shutdown_timeout: expected a whole number of seconds, got boolean",
        "6: listen: port 70000 is out of range (0..65535)",
        NULL,
    };
    check_fails("listn = 1\nping_interval = 0\nlocal ok = 1\nlog_level = \"loud\"\n"
                "shutdown_timeout = true\nlisten = \"127.0.0.1:70000\"\n", want);
}
END_TEST

START_TEST(missing_conf_file)
{
    char *path = xasprintf("%s/hublife-no-such-dir/luahub.conf", tmpdir());
    for (int check = 0; check < 2; check++) {
        char *out;
        const char *const args[] = { "-c", path, "--listen", "127.0.0.1:0",
                                     check ? "--check" : NULL, NULL };
        int st = hub_run(args, &out, HT_WAIT_MS);
        ck_assert_msg(st != 0, "exit status 0 with a missing conf file:\n%s", out);
        char *line = xasprintf("%s: cannot read conf file: No such file or directory\n", path);
        ck_assert_msg(strncmp(out, line, strlen(line)) == 0, "output:\n%s\nexpected first line: %s",
                      out, line);
        ck_assert_msg(!strstr(out, "listening on"), "output:\n%s", out);
        free(line);
        free(out);
    }
    free(path);
}
END_TEST

/* Without --check, a bad conf stops the hub before it listens: exit 2, the
 * problem as FILE:LINE, nothing on the port. */
START_TEST(bad_conf_without_check_exits_2)
{
    char *path = ht_tmpfile(BASE_CONF "max_queue_bytes = \"lots\"\n");
    int port = probe_port();
    char listen[32];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    char *out;
    const char *const args[] = { "-c", path, "--listen", listen, NULL };
    ck_assert_int_eq(hub_run(args, &out, HT_WAIT_MS), 2);
    char *line = xasprintf("%s:3: max_queue_bytes: ", path);
    ck_assert_msg(has_line_starting(out, line), "output lacks %s...:\n%s", line, out);
    ck_assert_msg(!strstr(out, "listening on"), "output:\n%s", out);
    ck_assert_int_eq(tcp_try_connect(port), -ECONNREFUSED);
    free(line);
    free(out);
    unlink(path);
    free(path);
}
END_TEST

START_TEST(bad_listen_option_exits_2)
{
    char *path = ht_tmpfile(BASE_CONF);
    static const char *const bad[] = { "nonsense", "127.0.0.1:99999", ":80", "127.0.0.1:" };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char *out;
        const char *const args[] = { "-c", path, "--listen", bad[i], NULL };
        int st = hub_run(args, &out, HT_WAIT_MS);
        ck_assert_msg(st == 2 && strstr(out, "--listen") && strstr(out, bad[i]) &&
                      count_lines(out) == 1,
                      "--listen %s: exit %d, output:\n%s", bad[i], st, out);
        free(out);
    }
    unlink(path);
    free(path);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Where the conf comes from, and --listen                              */
/* ------------------------------------------------------------------ */

struct cwd_dir {
    char base[256];
};

static void cwd_make(struct cwd_dir *d)
{
    snprintf(d->base, sizeof d->base, "%s/hublife.XXXXXX", tmpdir());
    ck_assert_ptr_nonnull(mkdtemp(d->base));
}

/* Without -c, the hub reads conf/luahub.conf in its working directory (and
 * resolves static_dir relative to that file): the custom websocket path,
 * the ping interval in the welcome and the static page prove it. */
START_TEST(default_conf_from_cwd)
{
    struct cwd_dir d;
    cwd_make(&d);
    char *confdir = xasprintf("%s/conf", d.base), *site = xasprintf("%s/site", d.base);
    char *conf = xasprintf("%s/luahub.conf", confdir), *page = xasprintf("%s/index.html", site);
    ck_assert_int_eq(mkdir(confdir, 0700), 0);
    ck_assert_int_eq(mkdir(site, 0700), 0);
    write_text(conf, "listen = \"127.0.0.1:0\"\n"
                     "websocket_path = \"/from-cwd\"\n"
                     "ping_interval = 17\n"
                     "static_dir = \"../site\"\n");
    write_text(page, "cwd page\n");

    char *out;
    const char *const check[] = { "--check", NULL };
    ck_assert_int_eq(run_in(d.base, check, &out, HT_WAIT_MS), 0);
    ck_assert_str_eq(out, "conf/luahub.conf: ok\n");
    free(out);

    struct proc p;
    const char *const none[] = { NULL };
    proc_start(&p, d.base, none);
    int port = proc_port(&p);
    struct ws_opts o = { .path = "/from-cwd" };
    struct ws *c = ws_connect_opts(port, &o);
    ck_assert_msg(strstr(c->welcome, "\"ping\":17}"), "welcome: %s", c->welcome);
    ws_sync(c);
    ws_free(c);
    struct http_resp r;
    ck_assert_int_eq(http_request(port, "GET", "/", NULL, NULL, &r), 200);
    ck_assert_str_eq(r.body, "cwd page\n");
    http_resp_free(&r);
    ck_assert_int_eq(proc_stop(&p), 0);

    unlink(page);
    unlink(conf);
    rmdir(site);
    rmdir(confdir);
    rmdir(d.base);
    free(confdir);
    free(site);
    free(conf);
    free(page);
}
END_TEST

/* Neither conf/luahub.conf nor /etc/luahub/luahub.conf: a clear error and a
 * non-zero exit. If this machine has /etc/luahub/luahub.conf, the hub must
 * use it instead: --check then reports on that file. (The test never
 * creates or touches /etc/luahub.) */
START_TEST(no_conf_anywhere)
{
    struct cwd_dir d;
    cwd_make(&d);
    char *out;
    if (access("/etc/luahub/luahub.conf", F_OK) == 0) {
        const char *const args[] = { "--check", NULL };
        int st = run_in(d.base, args, &out, HT_WAIT_MS);
        ck_assert_msg(strncmp(out, "/etc/luahub/luahub.conf", 23) == 0 && (st == 0 || st == 2),
                      "with /etc/luahub/luahub.conf present, --check without -c in an empty "
                      "directory exited %d:\n%s", st, out);
    } else {
        const char *const args[] = { NULL };
        int st = run_in(d.base, args, &out, HT_WAIT_MS);
        ck_assert_msg(st != 0, "exit status 0 without any conf:\n%s", out);
        ck_assert_msg(count_lines(out) == 1 && strstr(out, "conf/luahub.conf") &&
                      strstr(out, "/etc/luahub/luahub.conf") && strstr(out, "-c"),
                      "expected one line naming both places and -c, got:\n%s", out);
        ck_assert_msg(!strstr(out, "listening on"), "output:\n%s", out);
    }
    free(out);
    rmdir(d.base);
}
END_TEST

/* The conf's listen names a port that is in use: without --listen the hub
 * tries it (and fails); with --listen 127.0.0.1:0 it starts elsewhere. */
START_TEST(listen_option_overrides_conf)
{
    int port, held = hold_port(&port);
    char *conf = xasprintf(BASE_CONF "listen = \"127.0.0.1:%d\"\n", port);
    char *path = ht_tmpfile(conf);
    char *out;
    const char *const args[] = { "-c", path, NULL };
    int st = hub_run(args, &out, HT_WAIT_MS);
    char *addr = xasprintf("127.0.0.1:%d", port);
    ck_assert_msg(st != 0 && strstr(out, addr), "conf listen on a busy port: exit %d:\n%s", st,
                  out);
    free(out);

    struct hub *h = hub_start(conf);      /* --listen 127.0.0.1:0 */
    ck_assert_int_ne(h->port, port);
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");
    pubsub_works(a, b, "\"over\"");
    ws_free(a);
    ws_free(b);
    ck_assert_int_eq(hub_stop(h), 0);
    close(held);
    free(addr);
    unlink(path);
    free(path);
    free(conf);
}
END_TEST

/* A second hub on the port of the first exits at once, non-zero, with one
 * error line that names the address and says it is in use; the first keeps
 * serving. */
START_TEST(port_in_use_second_hub_exits)
{
    struct hub *h = hub_start(BASE_CONF);
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");
    char *path = ht_tmpfile(BASE_CONF);
    char listen[32];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", h->port);
    char *out;
    const char *const args[] = { "-c", path, "--listen", listen, NULL };
    int st = hub_run(args, &out, HT_WAIT_MS);
    ck_assert_msg(st != 0, "the second hub exited 0:\n%s", out);
    char *want = ht_asprintf("cannot listen on %s: Address already in use (another process has "
                             "the port: stop it, or choose another with listen or --listen)",
                             listen);
    expect_one_error_line(out, want, want);
    free(want);
    ck_assert_msg(!strstr(out, "listening on"), "output:\n%s", out);
    free(out);
    pubsub_works(a, b, "\"first\"");
    struct http_resp r;
    ck_assert_int_eq(http_request(h->port, "GET", "/healthz", NULL, NULL, &r), 200);
    http_resp_free(&r);
    ws_free(a);
    ws_free(b);
    ck_assert_int_eq(hub_stop(h), 0);
    unlink(path);
    free(path);
}
END_TEST

/* An address that is valid but not this machine's: the hub cannot listen
 * and exits non-zero with one error line naming it. */
START_TEST(listen_on_foreign_address_exits)
{
    char *path = ht_tmpfile(BASE_CONF);
    char *out;
    const char *const args[] = { "-c", path, "--listen", "198.51.100.77:0", NULL };
    int st = hub_run(args, &out, HT_WAIT_MS);
    ck_assert_msg(st != 0 && !strstr(out, "listening on"), "exit %d:\n%s", st, out);
    expect_one_error_line(out, "cannot listen on 198.51.100.77:0: Cannot assign requested "
                               "address (not an address or network interface of this machine)",
                          "198.51.100.77");
    free(out);
    unlink(path);
    free(path);
}
END_TEST

/* A network interface name works as the listen host, as it did when lws
 * listened: "lo" is 127.0.0.1. */
START_TEST(listen_on_interface_name)
{
    struct hub *h = hub_start_opts(BASE_CONF, &(struct hub_opts){ .listen = "lo:0" });
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");
    pubsub_works(a, b, "\"lo\"");
    ws_free(a);
    ws_free(b);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* Out of file descriptors (a hub started with an open-files limit of 48,
 * then 80 bare TCP connections): the hub stops watching its listener for
 * 100 ms at a time instead of spinning on it (at most ~20 pauses in 2 s;
 * a busy loop would make thousands), warns once, and serves again when
 * the connections go. */
START_TEST(out_of_fds_pauses_accepting)
{
    struct rlimit old, low;
    ck_assert_int_eq(getrlimit(RLIMIT_NOFILE, &old), 0);
    low = old;
    low.rlim_cur = 48;
    ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
    struct hub *h = hub_start(BASE_CONF); /* inherits the limit */
    ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &old), 0);

    enum { N = 80 };
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = tcp_connect(h->port); /* the kernel's backlog takes them all */
    struct timespec two = { 2, 0 };
    nanosleep(&two, NULL);
    for (int i = 0; i < N; i++)
        close(fds[i]);

    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");
    pubsub_works(a, b, "\"again\"");
    long long pauses = hub_metric(h, "luahub_accept_pauses_total");
    ck_assert_msg(pauses >= 1 && pauses <= 40, "%lld accept pauses", pauses);
    ck_assert_int_eq(hub_log_count(h, "cannot accept connections"), 1);
    ws_free(a);
    ws_free(b);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* The soft open-files limit of a running process, from /proc. */
static long long soft_nofile(pid_t pid)
{
    char path[64], line[256];
    long long soft = -1;
    snprintf(path, sizeof path, "/proc/%d/limits", (int)pid);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "Max open files", 14))
            sscanf(line + 14, "%lld", &soft);
    fclose(f);
    return soft;
}

/* max_connections sizes the open-files limit (and so libwebsockets' tables,
 * one of which it scans on every close): max_connections + a quarter +
 * 1,024, lowered or raised within the hard limit; beyond the hard limit,
 * a warning and the hard limit; without max_connections, the inherited
 * limit. The hub still serves in each case. */
START_TEST(max_connections_sizes_fd_limit)
{
    struct rlimit rl;
    ck_assert_int_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
    ck_assert_msg(rl.rlim_max == RLIM_INFINITY || rl.rlim_max > 2000,
                  "hard open-files limit %llu: too low for this test",
                  (unsigned long long)rl.rlim_max);
    static const struct {
        const char *conf;
        long long want; /* -1: the hard limit; -2: inherited */
    } cases[] = {
        {"max_connections = 100\n", 100 + 25 + 1024},
        {"max_connections = 800\n", 800 + 200 + 1024},
        {"max_connections = 10000000\n", -1},
        {"", -2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *conf = ht_asprintf(BASE_CONF "%s", cases[i].conf);
        struct hub *h = hub_start(conf);
        long long want = cases[i].want == -1   ? (long long)rl.rlim_max
                         : cases[i].want == -2 ? (long long)rl.rlim_cur
                                               : cases[i].want;
        ck_assert_msg(soft_nofile(h->pid) == want, "%s: soft limit %lld, expected %lld",
                      cases[i].conf, soft_nofile(h->pid), want);
        ck_assert_int_eq(hub_log_count(h, "hard open-files limit"), cases[i].want == -1);
        struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
        ws_subscribe(b, "room");
        pubsub_works(a, b, "\"fits\"");
        ws_free(a);
        ws_free(b);
        ck_assert_int_eq(hub_stop(h), 0);
        free(conf);
    }
}
END_TEST

/* ------------------------------------------------------------------ */
/* Signals and the graceful shutdown                                    */
/* ------------------------------------------------------------------ */

/* Every client gets close 1001; when all have answered, the hub exits 0
 * without waiting out shutdown_timeout (60 s, far above the bound). */
static void shutdown_with_clients(int sig, const char *received)
{
    struct hub *h = hub_start(BASE_CONF "shutdown_timeout = 60\n");
    enum { N = 5 };
    struct ws *c[N];
    for (int i = 0; i < N; i++) {
        c[i] = ws_connect(h->port);
        if (i % 2 == 0)
            ws_subscribe(c[i], "room");
    }
    ws_publish(c[1], "room", "\"last\"");
    /* plain HTTP connections do not hold the shutdown up */
    int idle = tcp_connect(h->port), half = tcp_connect(h->port);
    tcp_send(half, "GET /healthz HTTP/1.1\r\nHo", 25);
    hub_metric_wait(h, "luahub_connections", N, HT_WAIT_MS);
    hub_signal(h, sig);
    for (int i = 0; i < N; i++) {
        if (i % 2 == 0)
            ws_expect(c[i], "{\"op\":\"message\",\"channel\":\"room\",\"data\":\"last\"}");
        ws_expect_close(c[i], 1001);
    }
    ck_assert_int_eq(hub_wait_exit(h, HT_WAIT_MS), 0);
    ck_assert_msg(tcp_wait_closed(idle, HT_WAIT_MS), "idle HTTP connection still open");
    ck_assert_msg(tcp_wait_closed(half, HT_WAIT_MS), "half-sent HTTP request still open");
    ck_assert_int_eq(hub_log_count(h, received), 1);
    ck_assert_int_eq(hub_log_count(h, "shutdown_timeout"), 0);
    close(idle);
    close(half);
    for (int i = 0; i < N; i++)
        ws_free(c[i]);
    ck_assert_int_eq(hub_stop(h), 0);
}

/* Loop index 0: SIGTERM, 1: SIGINT. */
START_TEST(signal_clients_get_1001)
{
    if (_i == 0)
        shutdown_with_clients(SIGTERM, "SIGTERM received");
    else
        shutdown_with_clients(SIGINT, "SIGINT received");
}
END_TEST

/* A client that reads the close 1001 but does not answer it: the hub waits
 * for it (still up, /healthz 503) until it answers. */
START_TEST(shutdown_waits_for_close_reply)
{
    struct hub *h = hub_start(BASE_CONF "shutdown_timeout = 60\n");
    struct ws *c = ws_connect(h->port);
    hub_signal(h, SIGTERM);
    struct ws_frame f;
    int r = ws_recv_msg(c, &f, HT_WAIT_MS);
    ck_assert_msg(r == 1 && f.opcode == WS_CLOSE && f.close_code == 1001,
                  "expected close 1001 (r=%d)", r);
    ws_frame_free(&f);
    /* not answered yet: the hub is waiting for this client */
    int fd = tcp_try_connect(h->port);
    ck_assert_msg(fd >= 0, "the hub stopped listening (%s) before its client answered the "
                  "close; exit status %d", strerror(-fd), hub_wait_exit(h, 0));
    close(fd);
    struct http_resp resp;
    ck_assert_int_eq(http_request(h->port, "GET", "/healthz", NULL, NULL, &resp), 503);
    http_resp_free(&resp);
    ws_send_close(c, 1001, "");
    ck_assert_msg(tcp_wait_closed(c->fd, HT_WAIT_MS), "not closed after the answer");
    ck_assert_int_eq(hub_wait_exit(h, HT_WAIT_MS), 0);
    ck_assert_int_eq(hub_log_count(h, "shutdown_timeout"), 0);
    ws_free(c);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* A client that ignores the close 1001 (reads it, never answers): the hub
 * gives up after shutdown_timeout, says so, and exits 0. */
START_TEST(shutdown_timeout_client_ignores_close)
{
    struct hub *h = hub_start(BASE_CONF "shutdown_timeout = 1\n");
    struct ws *c = ws_connect(h->port), *ok = ws_connect(h->port);
    hub_metric_wait(h, "luahub_connections", 2, HT_WAIT_MS);
    hub_signal(h, SIGTERM);
    ws_expect_close(ok, 1001);
    struct ws_frame f;
    int r = ws_recv_msg(c, &f, HT_WAIT_MS);
    ck_assert_msg(r == 1 && f.opcode == WS_CLOSE && f.close_code == 1001,
                  "expected close 1001 (r=%d)", r);
    ws_frame_free(&f);
    ck_assert_int_eq(hub_wait_exit(h, HT_WAIT_MS), 0);
    ck_assert_msg(tcp_wait_closed(c->fd, HT_WAIT_MS), "socket open after the hub exited");
    ck_assert_int_eq(hub_log_count(h, "shutdown_timeout (1 s) reached with 1 clients still open"),
                     1);
    ws_free(c);
    ws_free(ok);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* A client that cannot even take the close frame (it does not read and
 * frames for it are still queued in the hub): after shutdown_timeout the
 * hub closes it and exits 0, the queued frames freed (ASan). */
START_TEST(shutdown_timeout_client_not_reading)
{
    struct hub *h = hub_start(STUCK_CONF "shutdown_timeout = 1\n");
    struct ws *stuck = stuck_client(h);
    hub_signal(h, SIGTERM);
    ck_assert_int_eq(hub_wait_exit(h, HT_WAIT_MS), 0);
    ck_assert_int_eq(hub_log_count(h, "shutdown_timeout (1 s) reached with 1 clients still open"),
                     1);
    ck_assert_msg(tcp_wait_closed(stuck->fd, HT_WAIT_MS), "socket open after the hub exited");
    ws_free(stuck);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* A second SIGTERM while the hub waits for a client ends the wait at once
 * (shutdown_timeout is an hour here). */
START_TEST(second_sigterm_exits_at_once)
{
    struct hub *h = hub_start(STUCK_CONF "shutdown_timeout = 3600\n");
    struct ws *stuck = stuck_client(h);
    hub_signal(h, SIGTERM);
    hub_log_wait(h, "shutting down: closing 1 connections", HT_WAIT_MS);
    struct http_resp r;     /* still waiting */
    ck_assert_int_eq(http_request(h->port, "GET", "/healthz", NULL, NULL, &r), 503);
    http_resp_free(&r);
    hub_signal(h, SIGTERM);
    ck_assert_int_eq(hub_wait_exit(h, HT_WAIT_MS), 0);
    ck_assert_int_eq(hub_log_count(h, "second signal"), 1);
    ck_assert_int_eq(hub_log_count(h, "shutdown_timeout (3600 s) reached"), 0);
    ck_assert_msg(tcp_wait_closed(stuck->fd, HT_WAIT_MS), "socket open after the hub exited");
    ws_free(stuck);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Log levels                                                           */
/* ------------------------------------------------------------------ */

/* Every line of `log` is "YYYY-MM-DDTHH:MM:SS.mmmZ LEVEL message". */
static void expect_log_format(const char *log)
{
    for (const char *l = log; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
        int y, mo, d, hh, mm, ss, ms, n = 0;
        char level[8];
        int ok = sscanf(l, "%4d-%2d-%2dT%2d:%2d:%2d.%3dZ %7s %n", &y, &mo, &d, &hh, &mm, &ss,
                        &ms, level, &n) == 8 && n > 0 &&
                 (!strcmp(level, "ERROR") || !strcmp(level, "WARN") || !strcmp(level, "INFO") ||
                  !strcmp(level, "DEBUG"));
        ck_assert_msg(ok, "log line not \"TIME LEVEL message\": %.*s",
                      (int)strcspn(l, "\n"), l);
    }
}

START_TEST(log_debug_has_conn_tags)
{
    struct hub *h = hub_start(BASE_CONF "log_level = \"debug\"\n");
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    hub_log_wait(h, " DEBUG [conn 1] connected from 127.0.0.1", HT_WAIT_MS);
    hub_log_wait(h, " DEBUG [conn 2] connected from 127.0.0.1", HT_WAIT_MS);
    ws_free(a);
    hub_log_wait(h, " DEBUG [conn 1] closed", HT_WAIT_MS);
    ck_assert_int_eq(hub_log_count(h, "[conn 2] closed"), 0);
    ws_free(b);
    hub_log_wait(h, " DEBUG [conn 2] closed", HT_WAIT_MS);
    char *log = hub_log(h);
    expect_log_format(log);
    free(log);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* At the default level (info) the same events leave no DEBUG line. */
START_TEST(log_info_hides_debug)
{
    struct hub *h = hub_start(BASE_CONF);
    struct ws *a = ws_connect(h->port);
    ws_subscribe(a, "room");
    ws_free(a);
    hub_metric_wait(h, "luahub_connections", 0, HT_WAIT_MS);
    /* the CLOSED path that would log "[conn 1] closed" has run */
    char *log = hub_log(h);
    ck_assert_msg(!strstr(log, " DEBUG ") && !strstr(log, "[conn 1]"), "log:\n%s", log);
    ck_assert_msg(strstr(log, " INFO ") && strstr(log, "listening on"), "log:\n%s", log);
    expect_log_format(log);
    free(log);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* A client that sends garbage past max_protocol_errors (1): a WARN event
 * "[conn 1] more than 1 protocol errors". */
static void garbage_client(int port)
{
    struct ws *c = ws_connect(port);
    ws_send_text(c, "nope");
    free(ws_expect_error(c, NULL, "bad_request"));
    ws_send_text(c, "nope");
    free(ws_expect_error(c, NULL, "bad_request"));
    ws_expect_close(c, 4008);
    ws_free(c);
}

/* log_level "warn": WARN events are logged, INFO and DEBUG are not. The
 * "listening on" line is exempt (it names the bound port) but need not be
 * printed at this level: the port is probed beforehand. */
START_TEST(log_warn_hides_info)
{
    char *path = ht_tmpfile(BASE_CONF "log_level = \"warn\"\nmax_protocol_errors = 1\n");
    int port = probe_port();
    char listen[32];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    struct proc p;
    const char *const args[] = { "-c", path, "--listen", listen, NULL };
    proc_start(&p, NULL, args);
    proc_wait_accepting(&p, port);
    garbage_client(port);
    struct ws *c = ws_connect(port);     /* [conn 2]: connected and closed, at DEBUG */
    ws_sync(c);
    ws_free(c);
    ck_assert_int_eq(proc_wait(&p, 0), -1);
    kill(p.pid, SIGTERM);                /* "SIGTERM received", "bye": INFO */
    ck_assert_int_eq(proc_wait(&p, HT_WAIT_MS), 0);
    char *all = proc_output(&p), *log = without_listening_line(all);
    ck_assert_msg(strstr(log, " WARN [conn 1] more than 1 protocol errors"), "log:\n%s", all);
    ck_assert_msg(!strstr(log, " INFO ") && !strstr(log, " DEBUG "), "log:\n%s", all);
    ck_assert_msg(count_lines(log) == 1, "log:\n%s", all);
    expect_log_format(all);
    free(log);
    free(all);
    ck_assert_int_eq(proc_stop(&p), 0);
    unlink(path);
    free(path);
}
END_TEST

/* log_level "error": the same WARN event is dropped, while an ERROR (the
 * port in use at startup) is still logged. */
START_TEST(log_error_hides_warn)
{
    char *path = ht_tmpfile(BASE_CONF "log_level = \"error\"\nmax_protocol_errors = 1\n");
    int port = probe_port();
    char listen[32];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", port);
    struct proc p;
    const char *const args[] = { "-c", path, "--listen", listen, NULL };
    proc_start(&p, NULL, args);
    proc_wait_accepting(&p, port);
    garbage_client(port);
    ck_assert_int_eq(proc_wait(&p, 0), -1);

    /* a second hub on the same port: its startup ERROR passes the filter */
    char *out;
    int st = hub_run(args, &out, HT_WAIT_MS);
    ck_assert_msg(st != 0 && strstr(out, " ERROR ") && strstr(out, listen), "exit %d:\n%s", st,
                  out);
    free(out);

    kill(p.pid, SIGTERM);
    ck_assert_int_eq(proc_wait(&p, HT_WAIT_MS), 0);
    char *all = proc_output(&p), *log = without_listening_line(all);
    ck_assert_msg(log[0] == '\0', "log at level error after a WARN event:\n%s", all);
    free(log);
    free(all);
    ck_assert_int_eq(proc_stop(&p), 0);
    unlink(path);
    free(path);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Broken clients                                                       */
/* ------------------------------------------------------------------ */

#define PARTIAL_LINE "POST /api/pub"
#define PARTIAL_HEAD "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"
#define NO_BLANK_LINE \
    "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 27\r\n"
#define PARTIAL_BODY \
    "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n" \
    "{\"channel\":\"room\",\"data\":\"half"
#define PARTIAL_GET "GET /healthz HTTP/1.1\r\nHost: 127.0"

static const char *const partials[] = { PARTIAL_LINE, PARTIAL_HEAD, NO_BLANK_LINE, PARTIAL_BODY,
                                        PARTIAL_GET };
#define NPARTIAL (sizeof partials / sizeof *partials)

/* The hub serves everyone: WebSocket pub/sub between a and b, an API
 * publish to b, /healthz. */
static void serves_all(struct hub *h, struct ws *a, struct ws *b, const char *tag)
{
    char data[64];
    snprintf(data, sizeof data, "\"ws-%s\"", tag);
    pubsub_works(a, b, data);
    snprintf(data, sizeof data, "\"api-%s\"", tag);
    ck_assert_int_eq(http_publish(h->port, "room", data), 200);
    char *want = ws_delivery("room", data);
    ws_expect(b, want);
    free(want);
    ws_sync(b);
    struct http_resp r;
    ck_assert_int_eq(http_request(h->port, "GET", "/healthz", NULL, NULL, &r), 200);
    http_resp_free(&r);
}

START_TEST(half_sent_http_request_then_close)
{
    struct hub *h = hub_start(BASE_CONF "shutdown_timeout = 2\n");
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");
    for (size_t i = 0; i < NPARTIAL; i++) {
        int fd = tcp_connect(h->port);
        tcp_send(fd, partials[i], strlen(partials[i]));
        close(fd);                      /* FIN */
        fd = tcp_connect(h->port);
        tcp_send(fd, partials[i], strlen(partials[i]));
        tcp_abort(fd);                  /* RST */
    }
    serves_all(h, a, b, "after");
    ck_assert_int_eq(hub_metric(h, "luahub_connections"), 2);
    ck_assert_int_eq(hub_metric(h, "luahub_messages_published_total"), 2);
    ws_free(a);
    ws_free(b);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

/* Half-sent requests that stall: the hub serves everyone meanwhile, and
 * shuts down cleanly with them still open. */
START_TEST(half_sent_http_request_stall)
{
    struct hub *h = hub_start(BASE_CONF "shutdown_timeout = 2\n");
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");
    int fds[NPARTIAL];
    for (size_t i = 0; i < NPARTIAL; i++) {
        fds[i] = tcp_connect(h->port);
        tcp_send(fds[i], partials[i], strlen(partials[i]));
    }
    serves_all(h, a, b, "stalled");
    /* a stalled keep-alive connection after a complete request */
    int ka = tcp_connect(h->port);
    static const char get[] = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /hea";
    tcp_send(ka, get, sizeof get - 1);
    struct http_resp r;
    ck_assert_int_eq(http_read_response(ka, &r, HT_WAIT_MS, 0), 200);
    http_resp_free(&r);
    serves_all(h, a, b, "stalled2");
    ck_assert_int_eq(hub_metric(h, "luahub_messages_published_total"), 4);
    ws_free(a);
    ws_free(b);
    ck_assert_int_eq(hub_stop(h), 0);      /* with the stalled ones still open */
    for (size_t i = 0; i < NPARTIAL; i++)
        close(fds[i]);
    close(ka);
}
END_TEST

/* Clients that vanish (FIN or RST, no close frame) in the middle of
 * things: with subscriptions, mid-frame, mid-fragmented-message. The
 * gauges come back down and the survivors are unaffected. */
START_TEST(client_vanishes_mid_message)
{
    struct hub *h = hub_start(BASE_CONF "shutdown_timeout = 2\n");
    struct ws *a = ws_connect(h->port), *b = ws_connect(h->port);
    ws_subscribe(b, "room");
    enum { N = 6 };
    struct ws *v[N];
    for (int i = 0; i < N; i++) {
        v[i] = ws_connect(h->port);
        ws_subscribe(v[i], "room");
        char name[32];
        snprintf(name, sizeof name, "only-%d", i);
        ws_subscribe(v[i], name);
    }
    hub_metric_wait(h, "luahub_connections", N + 2, HT_WAIT_MS);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 1 + 2 * N);
    ck_assert_int_eq(hub_metric(h, "luahub_channels"), 1 + N);
    static const char msg[] = "{\"op\":\"publish\",\"channel\":\"room\",\"data\":\"never\",\"id\":1}";
    for (int i = 0; i < N; i++) {
        switch (i / 2) {
        case 0: {   /* the first fragments of a message; the PONG to a PING
                     * sent after them proves the hub has read them */
            struct ws_frame f;
            ws_send_frame(v[i], 0, WS_TEXT, msg, 10);
            ws_send_frame(v[i], 0, WS_CONT, msg + 10, 10);
            ws_send_frame(v[i], 1, WS_PING, "p", 1);
            ck_assert_int_eq(ws_recv_frame(v[i], &f, HT_WAIT_MS), 1);
            ck_assert_int_eq(f.opcode, WS_PONG);
            ws_frame_free(&f);
            break;
        }
        case 1:     /* a frame header announcing more than is sent */
            ck_assert_int_eq(ws_send_raw(v[i], "\x81\xfe\x00\x80\x01\x02\x03\x04{\"op\"", 13), 0);
            break;
        default:    /* a subscribe it will not wait for */
            ws_send_text(v[i], "{\"op\":\"subscribe\",\"channel\":\"late\",\"id\":9}");
            break;
        }
        if (i % 2)
            ws_abort(v[i]);
        else
            ws_free(v[i]);
    }
    hub_metric_wait(h, "luahub_connections", 2, HT_WAIT_MS);
    ck_assert_int_eq(hub_metric(h, "luahub_subscriptions"), 1);
    ck_assert_int_eq(hub_metric(h, "luahub_channels"), 1);
    pubsub_works(a, b, "\"survivors\"");
    ck_assert_int_eq(hub_metric(h, "luahub_deliveries_total"), 1);
    ws_free(a);
    ws_free(b);
    ck_assert_int_eq(hub_stop(h), 0);
}
END_TEST

static Suite *lifecycle_suite(void)
{
    Suite *s = suite_create("lifecycle");
    TCase *tc;

    tc = tcase_create("cli");
    tcase_add_test(tc, cli_version);
    tcase_add_test(tc, cli_help);
    tcase_add_test(tc, cli_unknown_option_exits_2);
    suite_add_tcase(s, tc);

    tc = tcase_create("conf");
    tcase_add_test(tc, check_valid_conf_exits_0);
    tcase_add_loop_test(tc, check_bad_conf, 0, (int)(sizeof bad_confs / sizeof *bad_confs));
    tcase_add_test(tc, check_bad_listen_address);
    tcase_add_test(tc, check_reports_every_problem);
    tcase_add_test(tc, missing_conf_file);
    tcase_add_test(tc, bad_conf_without_check_exits_2);
    tcase_add_test(tc, bad_listen_option_exits_2);
    suite_add_tcase(s, tc);

    tc = tcase_create("startup");
    tcase_add_test(tc, default_conf_from_cwd);
    tcase_add_test(tc, no_conf_anywhere);
    tcase_add_test(tc, listen_option_overrides_conf);
    tcase_add_test(tc, port_in_use_second_hub_exits);
    tcase_add_test(tc, listen_on_foreign_address_exits);
    tcase_add_test(tc, listen_on_interface_name);
    tcase_add_test(tc, out_of_fds_pauses_accepting);
    tcase_add_test(tc, max_connections_sizes_fd_limit);
    suite_add_tcase(s, tc);

    tc = tcase_create("shutdown");
    tcase_add_loop_test(tc, signal_clients_get_1001, 0, 2);
    tcase_add_test(tc, shutdown_waits_for_close_reply);
    tcase_add_test(tc, shutdown_timeout_client_ignores_close);
    tcase_add_test(tc, shutdown_timeout_client_not_reading);
    tcase_add_test(tc, second_sigterm_exits_at_once);
    suite_add_tcase(s, tc);

    tc = tcase_create("logs");
    tcase_add_test(tc, log_debug_has_conn_tags);
    tcase_add_test(tc, log_info_hides_debug);
    tcase_add_test(tc, log_warn_hides_info);
    tcase_add_test(tc, log_error_hides_warn);
    suite_add_tcase(s, tc);

    tc = tcase_create("broken_clients");
    tcase_add_test(tc, half_sent_http_request_then_close);
    tcase_add_test(tc, half_sent_http_request_stall);
    tcase_add_test(tc, client_vanishes_mid_message);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(lifecycle_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
