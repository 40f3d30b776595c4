/* hubtest: support library of the integration suites.
 *
 * It starts the real luahub binary ($LUAHUB_BIN) on an ephemeral loopback
 * port and drives it over real sockets: a small blocking WebSocket client
 * (RFC 6455, masked frames, fragmentation, control frames), raw TCP helpers
 * for broken clients, and an HTTP/1.1 client for the API, /healthz and
 * /metrics.
 *
 * Rules every helper follows:
 * - Every wait is bounded: reads and writes poll() with a deadline, process
 *   waits poll waitpid(). Nothing here can hang a test; the default bound is
 *   HT_WAIT_MS.
 * - Helpers fail the current Check test themselves with a message naming
 *   what was expected and what came, reported at the test's own file:line
 *   (see "Failure locations" at the end), unless their comment says they
 *   return an outcome (timeout, closed, status) instead. Call them from the
 *   test's own process: Check's failure path is _exit(1), so a failing
 *   helper in a forked grandchild would report from the wrong process.
 *   Different threads may use different clients at once (no shared state;
 *   a failure in any thread fails the test), but hub_start/hub_stop belong
 *   to the test's main thread.
 * - The hub is started with PR_SET_PDEATHSIG=SIGKILL: when a test fails (or
 *   Check kills it on timeout) the hub dies with it. Its temp dir (conf +
 *   log) is then left in $TMPDIR (or /tmp) as hubtest.XXXXXX for
 *   post-mortem; a normal hub_stop removes it.
 * - No sleeps as synchronisation: to prove that nothing was delivered, use
 *   ws_sync (a protocol round trip on the same connection); to wait for a
 *   metric or a log line, use the *_wait helpers (bounded polling).
 *
 * Ownership: functions returning `char *` or `yajl_val` return a new
 * allocation the caller frees (free / yajl_tree_free); all `const char *`
 * parameters are borrowed.
 */
#ifndef HUBTEST_H
#define HUBTEST_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <yajl/yajl_tree.h>

/* Default bound of every wait, in milliseconds (generous: the ASan build on
 * a loaded 2-core machine is slow; a healthy hub answers in milliseconds). */
#define HT_WAIT_MS 10000

/* Monotonic clock, milliseconds. */
int64_t ht_now_ms(void);

/* ------------------------------------------------------------------ */
/* The hub process                                                     */
/* ------------------------------------------------------------------ */

struct hub {
    pid_t pid;
    int port;               /* bound port, from the "listening on HOST:PORT" log line */
    char dir[256];          /* private temp dir */
    char conf_path[320];    /* dir/luahub.conf: the conf text given to hub_start */
    char log_path[320];     /* dir/hub.log: the hub's stdout + stderr */
    int exited;             /* 1 once reaped; `status` is then valid */
    int status;             /* exit code, or 128 + signal number */
    char api_key[128];      /* the conf's api_key (a line `api_key = "..."`), or "" */
};

struct hub_opts {
    /* Value of --listen. NULL: "127.0.0.1:0". "": no --listen at all (the
     * conf's `listen` key applies; it must bind 127.0.0.1, port 0). Any
     * other address: reach the hub with tcp_connect_at / http_request_at;
     * the other helpers (hub_metric, ws_*, http_request) use 127.0.0.1. */
    const char *listen;
    /* More arguments appended after -c FILE [--listen X], NULL-terminated;
     * may be NULL. */
    const char *const *args;
    /* Bound for the "listening on" line; 0: 15000 ms. */
    int start_timeout_ms;
};

/* Writes `conf_text` to a temp conf file, runs
 * `$LUAHUB_BIN -c FILE --listen 127.0.0.1:0` with stdout+stderr to a log
 * file, and waits (bounded) for the "listening on HOST:PORT" line. Returns a
 * new hub (free it with hub_stop). Fails the test, quoting the log, if the
 * hub exits or does not listen in time. */
struct hub *hub_start(const char *conf_text);
struct hub *hub_start_opts(const char *conf_text, const struct hub_opts *o);

/* Sends SIGTERM (if the hub still runs), waits up to 20 s for it to exit
 * (then SIGKILLs it and fails the test), removes the temp dir (kept, and
 * named on stderr, when the status is non-zero or HUBTEST_KEEP is set in
 * the environment) and frees `h`.
 * Returns the exit status: exit code, or 128 + signal. A non-zero status
 * also prints the log to stderr (that is where ASan reports leaks).
 * Typical use: ck_assert_int_eq(hub_stop(h), 0). */
int hub_stop(struct hub *h);

/* Sends signal `sig` to the running hub. */
void hub_signal(struct hub *h, int sig);

/* Waits up to `timeout_ms` for the hub to exit. Returns its status (as
 * hub_stop) or -1 if it still runs. Call hub_stop afterwards to clean up. */
int hub_wait_exit(struct hub *h, int timeout_ms);

/* The log so far (new string). */
char *hub_log(const struct hub *h);
/* Number of occurrences of `needle` in the log so far. */
int hub_log_count(const struct hub *h, const char *needle);
/* Waits up to `timeout_ms` until the log contains `needle`; fails the test
 * (quoting the log's tail) otherwise. */
void hub_log_wait(const struct hub *h, const char *needle, int timeout_ms);

/* Value of one series of GET /metrics (with the hub's api_key, if any).
 * `series` is the name with its labels
 * exactly as printed, e.g. "luahub_connections" or
 * "luahub_protocol_errors_total{code=\"bad_request\"}". Fails the test if
 * the series is absent or the request fails. */
long long hub_metric(struct hub *h, const char *series);
/* Polls hub_metric until it equals `want` (bounded by `timeout_ms`); fails
 * the test with the last value seen otherwise. */
void hub_metric_wait(struct hub *h, const char *series, long long want,
                     int timeout_ms);

/* Runs `$LUAHUB_BIN args...` (args NULL-terminated, without argv[0]) to
 * completion, bounded by `timeout_ms` (then SIGKILL and test failure).
 * If `output` is not NULL it receives stdout+stderr (new string). Returns
 * the exit status (exit code, or 128 + signal). For --check, --version,
 * startup failures. */
int hub_run(const char *const *args, char **output, int timeout_ms);

/* Same for any program: `argv` NULL-terminated, argv[0] its path (not
 * searched in $PATH). The child runs in the test's namespaces; it is
 * SIGKILLed if the test process dies. */
int ht_run(const char *const *argv, char **output, int timeout_ms);

/* Creates a temp file holding `content`. Returns its path (new string);
 * the caller unlinks and frees it. */
char *ht_tmpfile(const char *content);

/* VmRSS of process `pid` (e.g. h->pid) in KiB, from /proc/PID/status. */
long ht_rss_kib(pid_t pid);

/* For memory-growth tests: hubs started from now on (by this process) keep
 * no freed memory in ASan's quarantine (256 MB by default), so that the
 * ASan build reuses freed memory and growth means retained memory. Sets
 * ASAN_OPTIONS in the environment; harmless without ASan. */
void ht_asan_no_quarantine(void);

/* ------------------------------------------------------------------ */
/* Raw TCP                                                              */
/* ------------------------------------------------------------------ */

/* Connects to 127.0.0.1:port (bounded). `rcvbuf` > 0 sets SO_RCVBUF before
 * connecting (the kernel doubles it and the window follows it). Returns the
 * fd; fails the test on error. */
int tcp_connect(int port);
int tcp_connect_opts(int port, int rcvbuf);
/* Same, but returns -errno (e.g. -ECONNREFUSED) instead of failing. */
int tcp_try_connect(int port);
/* Connects to the numeric address `addr` ("192.0.2.1", "::1"), for a hub
 * started with another --listen than 127.0.0.1. Fails the test on error. */
int tcp_connect_at(const char *addr, int port);

/* Sends all `n` bytes (each wait for room bounded by HT_WAIT_MS); fails the
 * test on error. Never raises SIGPIPE. */
void tcp_send(int fd, const void *p, size_t n);

/* Reads what is available, waiting up to `timeout_ms` for something.
 * Returns the byte count (> 0), 0 when the peer closed (EOF or reset),
 * -1 on timeout. */
#define HT_TIMEOUT (-1)
ssize_t tcp_recv(int fd, void *buf, size_t cap, int timeout_ms);

/* Reads and discards until the peer closes (EOF or reset). Returns 1 when
 * closed, 0 if still open after `timeout_ms`. */
int tcp_wait_closed(int fd, int timeout_ms);

/* Closes with SO_LINGER 0: the peer sees a reset, not a FIN. */
void tcp_abort(int fd);

/* ------------------------------------------------------------------ */
/* HTTP/1.1 client                                                      */
/* ------------------------------------------------------------------ */

struct http_resp {
    int status;         /* e.g. 200 */
    char *head;         /* status line + header lines, NUL-terminated */
    char *body;         /* body (Content-Length, chunked, or up to EOF), NUL-terminated */
    size_t body_len;
};

/* One request on a new connection, with `Host` and `Connection: close`.
 * `headers`: extra header lines, each ending "\r\n", or NULL. `body`: NULL
 * for none, else sent with its Content-Length (strlen). Fills `r` (free with
 * http_resp_free) and returns the status. Fails the test if no complete
 * response arrives within HT_WAIT_MS. */
int http_request(int port, const char *method, const char *path,
                 const char *headers, const char *body, struct http_resp *r);
/* Same, to the numeric address `addr` (see tcp_connect_at); the Host header
 * names it. http_request is http_request_at("127.0.0.1", ...). */
int http_request_at(const char *addr, int port, const char *method, const char *path,
                    const char *headers, const char *body, struct http_resp *r);

/* Sends `req` as it is (e.g. a chunked body, no Content-Length) on a new
 * connection and reads one response into `r`. Returns the status. */
int http_raw(int port, const void *req, size_t len, struct http_resp *r);

/* Reads one response from an open connection (keep-alive tests). Returns
 * the status, or fails the test after `timeout_ms`. `head_only`: the
 * request was HEAD (no body follows). */
int http_read_response(int fd, struct http_resp *r, int timeout_ms, int head_only);

/* Value of header `name` (case-insensitive) in `r`, trimmed (new string),
 * or NULL if absent. */
char *http_resp_header(const struct http_resp *r, const char *name);

void http_resp_free(struct http_resp *r);

/* POST /api/publish {"channel":channel,"data":data_json} from loopback
 * without a key. Returns the status. */
int http_publish(int port, const char *channel, const char *data_json);

/* `r` must be `status` with the protocol's error object for `code`:
 * {"ok":false,"error":{"code":"CODE","message":"<non-empty>"}} and a JSON
 * Content-Type. */
void http_expect_error(const struct http_resp *r, int status, const char *code);

/* `r` must be 200 {"ok":true}. */
void http_expect_ok(const struct http_resp *r);

/* printf into a new string (free it). */
char *ht_asprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ------------------------------------------------------------------ */
/* WebSocket client                                                     */
/* ------------------------------------------------------------------ */

enum {
    WS_CONT = 0x0, WS_TEXT = 0x1, WS_BINARY = 0x2,
    WS_CLOSE = 0x8, WS_PING = 0x9, WS_PONG = 0xA,
};

struct ws_frame {
    int opcode;             /* WS_* */
    int fin;
    char *data;             /* payload, NUL-terminated (for printing); owned */
    size_t len;
    int close_code;         /* close frames: the code, 1005 if the payload is empty */
    char close_reason[124]; /* close frames: the reason, NUL-terminated */
};

void ws_frame_free(struct ws_frame *f);

struct ws_opts {
    const char *path;       /* request path; NULL: "/ws" */
    const char *headers;    /* extra request header lines, each ending "\r\n" */
    int rcvbuf;             /* SO_RCVBUF set before connect; 0: default */
    int no_welcome;         /* 1: leave the first server frame unread */
};

struct ws {
    int fd;
    int auto_pong;          /* 1 (default): each PING received is answered with a PONG */
    unsigned pings;         /* PINGs received so far */
    char *welcome;          /* the welcome frame's text (NULL with no_welcome) */
    /* private */
    unsigned char *rbuf;
    size_t rlen, rcap;
    long long next_id;
};

/* Connects and upgrades on `path` (default /ws), checking the 101 status,
 * Upgrade/Connection and Sec-WebSocket-Accept; then reads the welcome
 * frame (which must be a text frame with "op":"welcome") into c->welcome.
 * Returns a new client (free with ws_free); fails the test otherwise. */
struct ws *ws_connect(int port);
struct ws *ws_connect_opts(int port, const struct ws_opts *o);

/* Attempts the upgrade and returns the HTTP status, or 0 when the server
 * closed the connection without a response. On 101 the handshake is
 * verified and `*out` receives the client (the welcome is read unless
 * o->no_welcome); otherwise `*out` is NULL and, if `resp` is not NULL, the
 * response is stored there (free with http_resp_free; with status 0 it is
 * empty). A connection reset while the request is sent counts as closed
 * without a response (a worker killed after accepting it). `o` may be
 * NULL. */
int ws_handshake(int port, const struct ws_opts *o, struct ws **out,
                 struct http_resp *resp);

/* Closes the socket without a close frame (a vanishing client: FIN) and
 * frees. NULL is a no-op. */
void ws_free(struct ws *c);
/* Same, but the socket is reset (SO_LINGER 0: RST instead of FIN). */
void ws_abort(struct ws *c);

/* Sends one masked frame exactly as given: any opcode, FIN bit as `fin`
 * (control frames too, to build invalid sequences). */
void ws_send_frame(struct ws *c, int fin, int opcode, const void *p, size_t len);
/* A text message in one frame. */
void ws_send_text(struct ws *c, const char *s);
/* A binary message in one frame. */
void ws_send_binary(struct ws *c, const void *p, size_t len);
/* One message split into fragments: frame i carries sizes[i] bytes (the last
 * size repeats until `len` is used up); the first frame has `opcode`, the
 * others are continuations, the last has FIN. */
void ws_send_fragments(struct ws *c, int opcode, const void *p, size_t len,
                       const size_t *sizes, size_t nsizes);
/* A close frame with `code` and `reason` (code 0: empty payload). */
void ws_send_close(struct ws *c, int code, const char *reason);
/* Raw bytes on the socket. Returns 0 or -errno (never fails the test). */
int ws_send_raw(struct ws *c, const void *p, size_t n);

/* Reads one frame of any kind as it arrives (no reassembly), waiting up to
 * `timeout_ms`. A PING is answered first when c->auto_pong. Returns 1 with
 * `f` filled (free with ws_frame_free), 0 on timeout, -1 when the TCP
 * connection closed (EOF or reset). Fails the test on a malformed frame
 * (masked server frame, RSV bits, bad close payload). */
int ws_recv_frame(struct ws *c, struct ws_frame *f, int timeout_ms);

/* Reads the next message: a text or binary message (reassembled from its
 * continuation frames) or a close frame. PING/PONG frames are skipped (PINGs
 * answered when c->auto_pong). Returns as ws_recv_frame; on timeout the
 * frames of a partly received message are lost. */
int ws_recv_msg(struct ws *c, struct ws_frame *f, int timeout_ms);

/* The next message, which must be a text message arriving within
 * HT_WAIT_MS (new string). */
char *ws_recv_text(struct ws *c);
/* The next text message parsed as JSON (free with yajl_tree_free). */
yajl_val ws_recv_json(struct ws *c);

/* The next message must be exactly the text `want`. */
void ws_expect(struct ws *c, const char *want);
/* The next two messages must be `a` and `b`, in either order (a publisher
 * subscribed to its own channel gets its reply and its delivery, whose
 * relative order the protocol does not fix). */
void ws_expect_pair(struct ws *c, const char *a, const char *b);
/* The next message must be the error reply
 * {"id":ID,"ok":false,"error":{"code":"CODE","message":"<non-empty>"}}
 * where `id_json` is the id as raw JSON ("1", "\"a\""), or NULL when the
 * reply must have no "id" member. Returns the message text (new string). */
char *ws_expect_error(struct ws *c, const char *id_json, const char *code);
/* The next message must be a close frame with `code`; answers it with a
 * close frame (a well-behaved client) and waits for the TCP close. */
void ws_expect_close(struct ws *c, int code);
/* The server must drop the TCP connection within `timeout_ms` without
 * sending a data message or a close frame first (PINGs are skipped). */
void ws_expect_dropped(struct ws *c, int timeout_ms);

/* Round trip that proves nothing else is queued for this client: sends
 * {"op":"ping","id":"sync-N"} and requires its reply as the very next
 * message. The hub answers a connection's commands in order, and with the
 * in-process broker a publish is fanned out (queued to every subscriber)
 * within the same event as its reply; so once a publisher has its reply,
 * ws_sync on a subscriber fails if a delivery (or anything) is pending.
 * (An asynchronous broker, e.g. through Redis, would void this.) */
void ws_sync(struct ws *c);

/* Sends subscribe/unsubscribe/publish with a fresh integer id and requires
 * the exact ok reply as the next message. ws_publish must not be used by a
 * client subscribed to `channel` (its own delivery would come too). */
void ws_subscribe(struct ws *c, const char *channel);
void ws_unsubscribe(struct ws *c, const char *channel);
void ws_publish(struct ws *c, const char *channel, const char *data_json);

/* The delivery text {"op":"message","channel":C,"data":D} (new string). */
char *ws_delivery(const char *channel, const char *data_json);

/* Sec-WebSocket-Accept for `key` (RFC 6455 4.2.2): base64(SHA-1(key +
 * GUID)) into `out` (29 bytes with the NUL). Exposed to test the support. */
void ws_accept_key(const char *key, char out[29]);

/* ------------------------------------------------------------------ */
/* JSON                                                                 */
/* ------------------------------------------------------------------ */

/* Parses `text` (fails the test if it is not valid JSON). */
yajl_val json_parse(const char *text);
/* Member at a path of object keys: json_get(v, "error", "code"). NULL if a
 * step is missing or not an object. Borrowed from `v`. */
#define json_get(v, ...) json_path((v), __VA_ARGS__, (const char *)NULL)
/* String member at a path, or NULL if absent or not a string. Borrowed. */
#define json_get_str(v, ...) json_path_str((v), __VA_ARGS__, (const char *)NULL)
/* The functions behind them: keys NULL-terminated. */
yajl_val json_path(yajl_val v, ...);
const char *json_path_str(yajl_val v, ...);

/* ------------------------------------------------------------------ */
/* Failure locations                                                    */
/* ------------------------------------------------------------------ */

/* A failing helper reports the test's file:line (and its own file:line,
 * hubtest.c or hubtest_ws.c, inside the message): each helper that can fail is wrapped in a
 * macro of its own name that records the caller's __FILE__/__LINE__ first.
 * Write (ws_expect)(c, s) to call a function without its macro. */
void ht_at(const char *file, int line);

#ifndef HUBTEST_INTERNAL
#define HT_AT(call) (ht_at(__FILE__, __LINE__), call)
#define hub_start(...) HT_AT(hub_start(__VA_ARGS__))
#define hub_start_opts(...) HT_AT(hub_start_opts(__VA_ARGS__))
#define hub_stop(...) HT_AT(hub_stop(__VA_ARGS__))
#define hub_signal(...) HT_AT(hub_signal(__VA_ARGS__))
#define hub_wait_exit(...) HT_AT(hub_wait_exit(__VA_ARGS__))
#define hub_log(...) HT_AT(hub_log(__VA_ARGS__))
#define hub_log_count(...) HT_AT(hub_log_count(__VA_ARGS__))
#define hub_log_wait(...) HT_AT(hub_log_wait(__VA_ARGS__))
#define hub_metric(...) HT_AT(hub_metric(__VA_ARGS__))
#define hub_metric_wait(...) HT_AT(hub_metric_wait(__VA_ARGS__))
#define hub_run(...) HT_AT(hub_run(__VA_ARGS__))
#define ht_run(...) HT_AT(ht_run(__VA_ARGS__))
#define ht_tmpfile(...) HT_AT(ht_tmpfile(__VA_ARGS__))
#define ht_rss_kib(...) HT_AT(ht_rss_kib(__VA_ARGS__))
#define tcp_connect(...) HT_AT(tcp_connect(__VA_ARGS__))
#define tcp_connect_opts(...) HT_AT(tcp_connect_opts(__VA_ARGS__))
#define tcp_try_connect(...) HT_AT(tcp_try_connect(__VA_ARGS__))
#define tcp_connect_at(...) HT_AT(tcp_connect_at(__VA_ARGS__))
#define tcp_send(...) HT_AT(tcp_send(__VA_ARGS__))
#define tcp_recv(...) HT_AT(tcp_recv(__VA_ARGS__))
#define tcp_wait_closed(...) HT_AT(tcp_wait_closed(__VA_ARGS__))
#define http_request(...) HT_AT(http_request(__VA_ARGS__))
#define http_request_at(...) HT_AT(http_request_at(__VA_ARGS__))
#define http_raw(...) HT_AT(http_raw(__VA_ARGS__))
#define http_read_response(...) HT_AT(http_read_response(__VA_ARGS__))
#define http_resp_header(...) HT_AT(http_resp_header(__VA_ARGS__))
#define http_publish(...) HT_AT(http_publish(__VA_ARGS__))
#define http_expect_error(...) HT_AT(http_expect_error(__VA_ARGS__))
#define http_expect_ok(...) HT_AT(http_expect_ok(__VA_ARGS__))
#define ws_connect(...) HT_AT(ws_connect(__VA_ARGS__))
#define ws_connect_opts(...) HT_AT(ws_connect_opts(__VA_ARGS__))
#define ws_handshake(...) HT_AT(ws_handshake(__VA_ARGS__))
#define ws_send_frame(...) HT_AT(ws_send_frame(__VA_ARGS__))
#define ws_send_text(...) HT_AT(ws_send_text(__VA_ARGS__))
#define ws_send_binary(...) HT_AT(ws_send_binary(__VA_ARGS__))
#define ws_send_fragments(...) HT_AT(ws_send_fragments(__VA_ARGS__))
#define ws_send_close(...) HT_AT(ws_send_close(__VA_ARGS__))
#define ws_send_raw(...) HT_AT(ws_send_raw(__VA_ARGS__))
#define ws_recv_frame(...) HT_AT(ws_recv_frame(__VA_ARGS__))
#define ws_recv_msg(...) HT_AT(ws_recv_msg(__VA_ARGS__))
#define ws_recv_text(...) HT_AT(ws_recv_text(__VA_ARGS__))
#define ws_recv_json(...) HT_AT(ws_recv_json(__VA_ARGS__))
#define ws_expect(...) HT_AT(ws_expect(__VA_ARGS__))
#define ws_expect_pair(...) HT_AT(ws_expect_pair(__VA_ARGS__))
#define ws_expect_error(...) HT_AT(ws_expect_error(__VA_ARGS__))
#define ws_expect_close(...) HT_AT(ws_expect_close(__VA_ARGS__))
#define ws_expect_dropped(...) HT_AT(ws_expect_dropped(__VA_ARGS__))
#define ws_sync(...) HT_AT(ws_sync(__VA_ARGS__))
#define ws_subscribe(...) HT_AT(ws_subscribe(__VA_ARGS__))
#define ws_unsubscribe(...) HT_AT(ws_unsubscribe(__VA_ARGS__))
#define ws_publish(...) HT_AT(ws_publish(__VA_ARGS__))
#define ws_delivery(...) HT_AT(ws_delivery(__VA_ARGS__))
#define ws_accept_key(...) HT_AT(ws_accept_key(__VA_ARGS__))
#define json_parse(...) HT_AT(json_parse(__VA_ARGS__))
#endif

#endif
