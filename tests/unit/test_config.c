/* The conf loader: defaults, every key, every kind of mistake with its exact
 * "FILE:LINE: message", the sandbox budgets and path resolution. Each test
 * writes its conf into a fresh temporary directory. */
#include "luahub/config.h"
#include "luahub/log.h"

#include <check.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define KiB 1024ull
#define MiB (1024 * KiB)
#define GiB (1024 * MiB)

static char tmp[1024];  /* this test's directory (canonical) */
static char path[2048]; /* the conf file written by load() */
static struct hub_config c;
static struct hub_config_errors e;

static void setup(void)
{
    char t[] = "/tmp/luahub-conf-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(t));
    char *canon = realpath(t, NULL);
    ck_assert_ptr_nonnull(canon);
    ck_assert_uint_lt(strlen(canon), sizeof(tmp));
    strcpy(tmp, canon);
    free(canon);
    hub_config_defaults(&c);
    memset(&e, 0, sizeof(e));
}

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(p);
}

static void teardown(void)
{
    hub_config_free(&c);
    hub_config_errors_free(&e);
    nftw(tmp, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* Writes `text` to tmp/`rel` (creating nothing else) and returns its path. */
static const char *put(const char *rel, const char *text)
{
    static char p[2048];
    snprintf(p, sizeof(p), "%s/%.512s", tmp, rel);
    FILE *f = fopen(p, "w");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(text, 1, strlen(text), f), strlen(text));
    fclose(f);
    return p;
}

static void mkdir_in_tmp(const char *rel)
{
    char p[2048];
    snprintf(p, sizeof(p), "%s/%.512s", tmp, rel);
    ck_assert_int_eq(mkdir(p, 0755), 0);
}

/* Writes `text` to a new mkstemp file in tmp and loads it into `c`. */
static int load(const char *text)
{
    snprintf(path, sizeof(path), "%s/confXXXXXX", tmp);
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, strlen(text)), (int)strlen(text));
    close(fd);
    return hub_config_load(&c, path, &e);
}

static void dump_errors(void)
{
    for (unsigned i = 0; i < e.n; i++)
        fprintf(stderr, "  conf error %u: %s\n", i, e.v[i]);
}

static void load_ok(const char *text)
{
    int rc = load(text);
    if (rc != 0 || e.n != 0)
        dump_errors();
    ck_assert_int_eq(rc, 0);
    ck_assert_uint_eq(e.n, 0);
}

/* Asserts error `i` is exactly `path` followed by the formatted suffix
 * (":LINE: message" or ": message"). */
static void err_is(unsigned i, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void err_is(unsigned i, const char *fmt, ...)
{
    char want[8192], suffix[3072];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(suffix, sizeof(suffix), fmt, ap);
    va_end(ap);
    snprintf(want, sizeof(want), "%s%s", path, suffix);
    if (i >= e.n)
        dump_errors();
    ck_assert_uint_gt(e.n, i);
    ck_assert_str_eq(e.v[i], want);
}

/* Loads `text`, expects failure with exactly one error, `path` + suffix. */
static void load_one_error(const char *text, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void load_one_error(const char *text, const char *fmt, ...)
{
    char suffix[3072];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(suffix, sizeof(suffix), fmt, ap);
    va_end(ap);
    ck_assert_int_eq(load(text), -1);
    if (e.n != 1)
        dump_errors();
    ck_assert_uint_eq(e.n, 1);
    err_is(0, "%s", suffix);
}

static void assert_defaults_except_path(void)
{
    ck_assert_str_eq(c.listen, "0.0.0.0:8080");
    ck_assert_str_eq(c.listen_host, "0.0.0.0");
    ck_assert_int_eq(c.listen_port, 8080);
    ck_assert_str_eq(c.websocket_path, "/ws");
    ck_assert_ptr_null(c.api_key);
    ck_assert_uint_eq(c.max_message_size, 65536);
    ck_assert_uint_eq(c.max_queue_bytes, 1048576);
    ck_assert_uint_eq(c.max_channels_per_conn, 128);
    ck_assert_uint_eq(c.max_connections, 0);
    ck_assert_uint_eq(c.max_protocol_errors, 10);
    ck_assert_uint_eq(c.ping_interval, 25);
    ck_assert_uint_eq(c.ping_timeout, 10);
    ck_assert_uint_eq(c.shutdown_timeout, 5);
    ck_assert_uint_eq(c.write_delay, 0);
    ck_assert_uint_eq(c.write_pause_max, 2);
    ck_assert_uint_eq(c.rx_buffer_size, 512);
    ck_assert_ptr_null(c.static_dir);
    ck_assert_int_eq(c.log_level, HUB_LOG_INFO);
    ck_assert_ptr_null(c.policy);
    ck_assert_uint_eq(c.lua_max_instructions, 1000000);
    ck_assert_uint_eq(c.lua_max_memory, 64 * MiB);
}

/* ---- defaults and values ----------------------------------------------- */

START_TEST(t_defaults)
{
    assert_defaults_except_path();
    ck_assert_ptr_null(c.path);
    ck_assert_ptr_null(c.dir);
}
END_TEST

START_TEST(t_empty_file)
{
    load_ok("-- nothing but a comment\n");
    assert_defaults_except_path();
    ck_assert_str_eq(c.path, path);
    ck_assert_str_eq(c.dir, tmp);
}
END_TEST

START_TEST(t_every_key)
{
    mkdir_in_tmp("www");
    put("policy.lua", "-- a policy\n");
    load_ok("listen = \"127.0.0.1:9000\"\n"
            "websocket_path = \"/hub\"\n"
            "api_key = \"s3cret-key\"\n"
            "max_message_size = 1000\n"
            "max_queue_bytes = 8192\n"
            "max_channels_per_conn = 7\n"
            "max_connections = 5000\n"
            "max_protocol_errors = 3\n"
            "ping_interval = 30\n"
            "ping_timeout = 20\n"
            "shutdown_timeout = 0\n"
            "write_delay = 5\n"
            "rx_buffer_size = \"1KiB\"\n"
            "static_dir = \"www\"\n"
            "log_level = \"debug\"\n"
            "policy = \"policy.lua\"\n"
            "lua_max_instructions = 5000\n"
            "lua_max_memory = \"8MiB\"\n");
    ck_assert_str_eq(c.listen, "127.0.0.1:9000");
    ck_assert_str_eq(c.listen_host, "127.0.0.1");
    ck_assert_int_eq(c.listen_port, 9000);
    ck_assert_str_eq(c.websocket_path, "/hub");
    ck_assert_str_eq(c.api_key, "s3cret-key");
    ck_assert_uint_eq(c.max_message_size, 1000);
    ck_assert_uint_eq(c.max_queue_bytes, 8192);
    ck_assert_uint_eq(c.max_channels_per_conn, 7);
    ck_assert_uint_eq(c.max_connections, 5000);
    ck_assert_uint_eq(c.max_protocol_errors, 3);
    ck_assert_uint_eq(c.ping_interval, 30);
    ck_assert_uint_eq(c.ping_timeout, 20);
    ck_assert_uint_eq(c.shutdown_timeout, 0);
    ck_assert_uint_eq(c.write_delay, 5);
    ck_assert_uint_eq(c.rx_buffer_size, 1024);
    char want[PATH_MAX + 16];
    snprintf(want, sizeof(want), "%s/www", tmp);
    ck_assert_str_eq(c.static_dir, want);
    ck_assert_int_eq(c.log_level, HUB_LOG_DEBUG);
    snprintf(want, sizeof(want), "%s/policy.lua", tmp);
    ck_assert_str_eq(c.policy, want);
    ck_assert_uint_eq(c.lua_max_instructions, 5000);
    ck_assert_uint_eq(c.lua_max_memory, 8 * MiB);
}
END_TEST

START_TEST(t_range_edges)
{
    load_ok("max_message_size = 64\n"
            "max_queue_bytes = \"1GiB\"\n"
            "max_channels_per_conn = 65536\n"
            "max_connections = 10000000\n"
            "max_protocol_errors = 10000\n"
            "ping_interval = 3600\n"
            "ping_timeout = 1\n"
            "shutdown_timeout = 3600\n"
            "write_delay = 1000\n"
            "write_pause_max = 100\n"
            "rx_buffer_size = 128\n"
            "lua_max_instructions = 1e10\n"
            "lua_max_memory = \"16GiB\"\n");
    ck_assert_uint_eq(c.max_message_size, 64);
    ck_assert_uint_eq(c.max_queue_bytes, GiB);
    ck_assert_uint_eq(c.max_channels_per_conn, 65536);
    ck_assert_uint_eq(c.max_connections, 10000000);
    ck_assert_uint_eq(c.max_protocol_errors, 10000);
    ck_assert_uint_eq(c.ping_interval, 3600);
    ck_assert_uint_eq(c.ping_timeout, 1);
    ck_assert_uint_eq(c.shutdown_timeout, 3600);
    ck_assert_uint_eq(c.write_delay, 1000);
    ck_assert_uint_eq(c.write_pause_max, 100);
    ck_assert_uint_eq(c.rx_buffer_size, 128);
    ck_assert_uint_eq(c.lua_max_instructions, 10000000000ull);
    ck_assert_uint_eq(c.lua_max_memory, 16 * GiB);
}
END_TEST

static const struct {
    const char *v;
    unsigned long long want;
} sizes[] = {
    {"\"64KiB\"", 64 * KiB}, {"\"1MiB\"", MiB}, {"\"512k\"", 512 * KiB},
    {"\"2M\"", 2 * MiB}, {"\"1GiB\"", GiB}, {"\"4096\"", 4096},
    {"\"8 KiB\"", 8 * KiB}, {"\"3mib\"", 3 * MiB}, {"\"16KB\"", 16 * KiB},
    {"\"5000b\"", 5000}, {"\"1g\"", GiB}, {"131072", 128 * KiB},
    {"131072.0", 128 * KiB}, {"2^20", MiB}, {"\"1\" .. \"MiB\"", MiB},
};

START_TEST(t_sizes)
{
    char text[256];
    snprintf(text, sizeof(text), "max_message_size = 64\nmax_queue_bytes = %s\n", sizes[_i].v);
    load_ok(text);
    ck_assert_uint_eq(c.max_queue_bytes, sizes[_i].want);
}
END_TEST

static const char *const bad_sizes[] = {
    "\"64XB\"", "\"1.5MiB\"", "\"\"", "\"-1\"", "\"KiB\"", "\" 64\"", "\"64KiB \"", "\"0x100\"",
};

START_TEST(t_bad_size_strings)
{
    char text[256];
    snprintf(text, sizeof(text), "\nmax_queue_bytes = %s\n", bad_sizes[_i]);
    load_one_error(text, ":2: max_queue_bytes: expected a size (integer bytes or a string"
                         " like \"64KiB\"), got %s", bad_sizes[_i]);
    ck_assert_uint_eq(c.max_queue_bytes, MiB);
}
END_TEST

/* ---- the file ---------------------------------------------------------- */

START_TEST(t_missing_file)
{
    snprintf(path, sizeof(path), "%s/nope.conf", tmp);
    ck_assert_int_eq(hub_config_load(&c, path, &e), -1);
    ck_assert_uint_eq(e.n, 1);
    err_is(0, ": cannot read conf file: No such file or directory");
    assert_defaults_except_path();
}
END_TEST

START_TEST(t_directory_as_file)
{
    snprintf(path, sizeof(path), "%s", tmp);
    ck_assert_int_eq(hub_config_load(&c, path, &e), -1);
    ck_assert_uint_eq(e.n, 1);
    err_is(0, ": cannot read conf file: Is a directory");
}
END_TEST

START_TEST(t_syntax_error)
{
    load_one_error("listen = \"127.0.0.1:1\"\n\nping_interval = = 3\n",
                   ":3: unexpected symbol near '='");
    /* Nothing ran: the valid line before the error is not applied either. */
    ck_assert_str_eq(c.listen, "0.0.0.0:8080");
}
END_TEST

START_TEST(t_syntax_error_long_path)
{
    /* Lua shortens chunk names over 60 bytes to "...tail"; the message must
     * still carry the whole path. */
    char d[] = "a-directory-name-long-enough-to-push-the-path-past-lua-idsize";
    mkdir_in_tmp(d);
    snprintf(path, sizeof(path), "%s/%s/luahub.conf", tmp, d);
    ck_assert_uint_gt(strlen(path), 60);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs("ping_interval = 5\nlisten = \"unterminated\n", f);
    fclose(f);
    ck_assert_int_eq(hub_config_load(&c, path, &e), -1);
    ck_assert_uint_eq(e.n, 1);
    err_is(0, ":2: unfinished string (near a string, not shown)");
}
END_TEST

START_TEST(t_utf8_bom)
{
    load_ok("\xEF\xBB\xBFping_interval = 7\n");
    ck_assert_uint_eq(c.ping_interval, 7);
}
END_TEST

/* ---- mistakes ---------------------------------------------------------- */

START_TEST(t_unknown_key)
{
    ck_assert_int_eq(load("\n\n\n\nlistn = \"0.0.0.0:1\"\n"
                          "frobnicate = 1\n"
                          "ping_intervall = 3\n"),
                     -1);
    ck_assert_uint_eq(e.n, 3);
    err_is(0, ":5: unknown key 'listn' (did you mean 'listen'?)");
    err_is(1, ":6: unknown key 'frobnicate'");
    err_is(2, ":7: unknown key 'ping_intervall' (did you mean 'ping_interval'?)");
}
END_TEST

START_TEST(t_wrong_types)
{
    ck_assert_int_eq(load("max_message_size = true\n"
                          "websocket_path = 5\n"
                          "max_channels_per_conn = \"12\"\n"
                          "max_connections = 2.5\n"
                          "ping_interval = \"30\"\n"
                          "shutdown_timeout = {}\n"
                          "api_key = nil\n"
                          "log_level = 3\n"
                          "max_queue_bytes = false\n"),
                     -1);
    ck_assert_uint_eq(e.n, 9);
    err_is(0, ":1: max_message_size: expected a size (integer bytes or a string like"
              " \"64KiB\"), got boolean");
    err_is(1, ":2: websocket_path: expected a string, got number");
    err_is(2, ":3: max_channels_per_conn: expected an integer, got string");
    err_is(3, ":4: max_connections: expected an integer, got 2.5");
    err_is(4, ":5: ping_interval: expected a whole number of seconds, got string");
    err_is(5, ":6: shutdown_timeout: expected a whole number of seconds, got table");
    err_is(6, ":7: api_key: expected a string, got nil");
    err_is(7, ":8: log_level: expected a string, got number");
    err_is(8, ":9: max_queue_bytes: expected a size (integer bytes or a string like"
              " \"64KiB\"), got boolean");
    /* Refused values leave the defaults. */
    assert_defaults_except_path();
}
END_TEST

START_TEST(t_out_of_range)
{
    ck_assert_int_eq(load("-- ranges\n"
                          "\n"
                          "ping_interval = 0\n"
                          "max_message_size = \"128MiB\"\n"
                          "max_connections = -1\n"
                          "lua_max_instructions = 1e11\n"
                          "max_queue_bytes = 100\n"
                          "lua_max_memory = 1e300\n"
                          "max_channels_per_conn = 65537\n"
                          "ping_timeout = 3601\n"
                          "max_protocol_errors = 0\n"
                          "shutdown_timeout = -5\n"
                          "max_message_size = 1\n"
                          "write_delay = 1001\n"
                          "rx_buffer_size = 127\n"),
                     -1);
    ck_assert_uint_eq(e.n, 13);
    err_is(0, ":3: ping_interval: 0 is out of range (1..3600)");
    err_is(1, ":4: max_message_size: 128MiB is out of range (64..64MiB)");
    err_is(2, ":5: max_connections: -1 is out of range (0..10000000)");
    err_is(3, ":6: lua_max_instructions: 100000000000 is out of range (1000..10000000000)");
    err_is(4, ":7: max_queue_bytes: 100 is out of range (4KiB..1GiB)");
    err_is(5, ":8: lua_max_memory: 1e+300 is out of range (1MiB..16GiB)");
    err_is(6, ":9: max_channels_per_conn: 65537 is out of range (1..65536)");
    err_is(7, ":10: ping_timeout: 3601 is out of range (1..3600)");
    err_is(8, ":11: max_protocol_errors: 0 is out of range (1..10000)");
    err_is(9, ":12: shutdown_timeout: -5 is out of range (0..3600)");
    err_is(10, ":13: max_message_size: already set at line 4");
    err_is(11, ":14: write_delay: 1001 is out of range (0..1000)");
    err_is(12, ":15: rx_buffer_size: 127 is out of range (128..64KiB)");
    assert_defaults_except_path();
}
END_TEST

START_TEST(t_size_overflow)
{
    load_one_error("max_message_size = \"99999999999999999999GiB\"\n",
                   ":1: max_message_size: \"99999999999999999999GiB\" is out of range"
                   " (64..64MiB)");
}
END_TEST

START_TEST(t_string_checks)
{
    char long_path[300] = "websocket_path = \"/";
    size_t n = strlen(long_path);
    memset(long_path + n, 'a', 255);
    strcpy(long_path + n + 255, "\"\n");
    char text[1024];
    snprintf(text, sizeof(text),
             "websocket_path = \"ws\"\n"
             "websocket_path = \"/a b\"\n"
             "websocket_path = \"/a?b\"\n"
             "%s"
             "api_key = \"\"\n"
             "api_key = \"has space\"\n"
             "log_level = \"verbose\"\n"
             "websocket_path = \"/x\\0y\"\n",
             long_path);
    ck_assert_int_eq(load(text), -1);
    /* Each key's second and later assignments are duplicates: only the first
     * of each is validated. */
    ck_assert_uint_eq(e.n, 8);
    err_is(0, ":1: websocket_path: must start with '/', got \"ws\"");
    err_is(1, ":2: websocket_path: already set at line 1");
    err_is(3, ":4: websocket_path: already set at line 1");
    err_is(4, ":5: api_key: must not be empty (leave it unset to allow loopback peers only)");
    err_is(5, ":6: api_key: already set at line 5");
    err_is(6, ":7: log_level: unknown level \"verbose\" (expected \"error\", \"warn\","
              " \"info\" or \"debug\")");
}
END_TEST

/* One bad string per load, so none is hidden behind a duplicate. */
static const struct {
    const char *line, *err;
} bad_strings[] = {
    {"websocket_path = \"/a b\"",
     "websocket_path: must not contain spaces or control characters, got \"/a b\""},
    {"websocket_path = \"/a\\tb\"",
     "websocket_path: must not contain spaces or control characters, got \"/a\\x09b\""},
    {"websocket_path = \"/a?b\"",
     "websocket_path: must be a path without '?' or '#', got \"/a?b\""},
    {"websocket_path = \"/x\\0y\"", "websocket_path: must not contain a NUL byte"},
    {"websocket_path = \"/\" .. (\"a\"):rep(255)", NULL}, /* no string library */
    {"api_key = \"has space\"", "api_key: must not contain spaces or control characters"},
    {"api_key = \"tab\\there\"", "api_key: must not contain spaces or control characters"},
    {"log_level = \"INFO\"",
     "log_level: unknown level \"INFO\" (expected \"error\", \"warn\", \"info\" or \"debug\")"},
    {"static_dir = \"\"", "static_dir: must not be empty (leave it unset to serve no files)"},
    {"policy = \"\"", "policy: must not be empty (leave it unset for the built-in policy)"},
};

START_TEST(t_bad_strings)
{
    char text[256];
    snprintf(text, sizeof(text), "\n%s\n", bad_strings[_i].line);
    ck_assert_int_eq(load(text), -1);
    ck_assert_uint_eq(e.n, 1);
    if (bad_strings[_i].err)
        err_is(0, ":2: %s", bad_strings[_i].err);
    else
        err_is(0, ":2: attempt to index a string value (constant 'a')");
    ck_assert_str_eq(c.websocket_path, "/ws");
    ck_assert_ptr_null(c.api_key);
}
END_TEST

START_TEST(t_websocket_path_too_long)
{
    char text[512] = "websocket_path = \"/";
    size_t n = strlen(text);
    memset(text + n, 'a', 255);
    strcpy(text + n + 255, "\"\n");
    load_one_error(text, ":1: websocket_path: is 256 bytes long; the limit is 255");
    text[n + 254] = '"';
    text[n + 255] = '\n';
    text[n + 256] = '\0';
    hub_config_errors_free(&e);
    load_ok(text);
    ck_assert_uint_eq(strlen(c.websocket_path), 255);
}
END_TEST

START_TEST(t_log_levels)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    char text[64];
    snprintf(text, sizeof(text), "log_level = \"%s\"\n", names[_i]);
    load_ok(text);
    ck_assert_int_eq(c.log_level, _i);
}
END_TEST

START_TEST(t_duplicate_key)
{
    ck_assert_int_eq(load("listen = \"127.0.0.1:1000\"\n"
                          "\n"
                          "listen = \"127.0.0.1:2000\"\n"),
                     -1);
    ck_assert_uint_eq(e.n, 1);
    err_is(0, ":3: listen: already set at line 1");
    ck_assert_int_eq(c.listen_port, 1000);
}
END_TEST

START_TEST(t_duplicate_after_bad_value)
{
    ck_assert_int_eq(load("ping_interval = 0\nping_interval = 5\n"), -1);
    ck_assert_uint_eq(e.n, 2);
    err_is(0, ":1: ping_interval: 0 is out of range (1..3600)");
    err_is(1, ":2: ping_interval: already set at line 1");
}
END_TEST

START_TEST(t_read_undefined_name)
{
    load_one_error("ping_interval = 5\nlocal x = y\nping_timeout = 3\n",
                   ":2: unknown name 'y'");
    /* The chunk stopped at line 2: line 1 applied, line 3 never ran. */
    ck_assert_uint_eq(c.ping_interval, 5);
    ck_assert_uint_eq(c.ping_timeout, 10);
}
END_TEST

START_TEST(t_no_libraries)
{
    load_one_error("\n\nlocal f = io.open(\"/etc/passwd\")\n", ":3: unknown name 'io'");
    hub_config_errors_free(&e);
    load_one_error("print(1)\n", ":1: unknown name 'print'");
    hub_config_errors_free(&e);
    load_one_error("local s = require\n", ":1: unknown name 'require'");
}
END_TEST

START_TEST(t_read_key)
{
    load_one_error("ping_interval = 30\nping_timeout = ping_interval\n",
                   ":2: cannot read 'ping_interval': conf keys can only be assigned"
                   " (keep a shared value in a local variable)");
}
END_TEST

START_TEST(t_locals_and_arithmetic)
{
    load_ok("local k = 1024\n"
            "local mib = k * k\n"
            "max_queue_bytes = 4 * mib\n"
            "max_message_size = 64 * k\n"
            "local base = 60\n"
            "ping_interval = base // 2\n"
            "ping_timeout = base / 4\n"
            "max_connections = 1e6\n"
            "local prefix <const> = \"/\"\n"
            "websocket_path = prefix .. \"hub\" .. 2\n"
            "local function port(n) return \"127.0.0.1:\" .. (8000 + n) end\n"
            "listen = port(80)\n"
            "local t = {ms = 3}\n"
            "shutdown_timeout = t.ms\n"
            "for i = 1, 3 do local _ = i end\n");
    ck_assert_uint_eq(c.max_queue_bytes, 4 * MiB);
    ck_assert_uint_eq(c.max_message_size, 64 * KiB);
    ck_assert_uint_eq(c.ping_interval, 30);
    ck_assert_uint_eq(c.ping_timeout, 15);
    ck_assert_uint_eq(c.max_connections, 1000000);
    ck_assert_str_eq(c.websocket_path, "/hub2");
    ck_assert_str_eq(c.listen, "127.0.0.1:8080");
    ck_assert_int_eq(c.listen_port, 8080);
    ck_assert_uint_eq(c.shutdown_timeout, 3);
}
END_TEST

START_TEST(t_assignment_in_function_line)
{
    ck_assert_int_eq(load("local function set(v)\n"
                          "  ping_interval = v\n"
                          "end\n"
                          "set(0)\n"),
                     -1);
    ck_assert_uint_eq(e.n, 1);
    err_is(0, ":2: ping_interval: 0 is out of range (1..3600)");
}
END_TEST

START_TEST(t_runtime_error)
{
    ck_assert_int_eq(load("ping_interval = 0\n"
                          "local n = nil\n"
                          "max_connections = n + 1\n"
                          "frob = 1\n"),
                     -1);
    ck_assert_uint_eq(e.n, 2);
    err_is(0, ":1: ping_interval: 0 is out of range (1..3600)");
    err_is(1, ":3: attempt to perform arithmetic on a nil value (local 'n')");
}
END_TEST

/* ---- budgets ----------------------------------------------------------- */

START_TEST(t_runaway_loop)
{
    load_one_error("ping_interval = 5\n\nwhile true do end\n",
                   ":3: instruction limit exceeded after 10000000 instructions"
                   " (runaway loop?)");
    ck_assert_uint_eq(c.ping_interval, 5);
}
END_TEST

START_TEST(t_runaway_loop_in_function)
{
    load_one_error("local function spin()\n"
                   "  local i = 0\n"
                   "  repeat i = i + 1 until false\n"
                   "end\n"
                   "spin()\n",
                   ":3: instruction limit exceeded after 10000000 instructions"
                   " (runaway loop?)");
}
END_TEST

START_TEST(t_runaway_tail_calls)
{
    load_one_error("local function f() return f() end\nf()\n",
                   ":1: instruction limit exceeded after 10000000 instructions"
                   " (runaway loop?)");
}
END_TEST

START_TEST(t_recursion_bomb)
{
    /* Stack growth ends in Lua's "stack overflow" or the memory cap: either
     * way one error at line 1, no crash. */
    ck_assert_int_eq(load("local function f(n) return 1 + f(n + 1) end\nf(1)\n"), -1);
    ck_assert_uint_eq(e.n, 1);
    char want[PATH_MAX + 8];
    snprintf(want, sizeof(want), "%s:1: ", path);
    ck_assert_msg(strncmp(e.v[0], want, strlen(want)) == 0, "got: %s", e.v[0]);
    ck_assert_msg(strstr(e.v[0], "stack overflow") || strstr(e.v[0], "memory limit"),
                  "got: %s", e.v[0]);
}
END_TEST

START_TEST(t_memory_bomb_string)
{
    load_one_error("local s = \"x\"\n"
                   "for i = 1, 40 do\n"
                   "  s = s .. s\n"
                   "end\n",
                   ":3: memory limit exceeded: the conf may use 16MiB (memory bomb?)");
}
END_TEST

START_TEST(t_too_many_errors)
{
    ck_assert_int_eq(load("ping_interval = 7\nfor i = 1, 1e6 do\n  foo = i\nend\n"), -1);
    ck_assert_uint_eq(e.n, 101);
    err_is(0, ":3: unknown key 'foo'");
    err_is(99, ":3: unknown key 'foo'");
    err_is(100, ": too many errors, stopped reading");
    ck_assert_uint_eq(c.ping_interval, 7);
}
END_TEST

START_TEST(t_file_too_large)
{
    snprintf(path, sizeof(path), "%s/big.conf", tmp);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    for (int i = 0; i < 100000; i++)
        fputs("-- padding\n", f); /* 1,100,000 bytes in all */
    fclose(f);
    ck_assert_int_eq(hub_config_load(&c, path, &e), -1);
    ck_assert_uint_eq(e.n, 1);
    err_is(0, ": cannot read conf file: larger than 1048576 bytes");
}
END_TEST

/* ---- listen ------------------------------------------------------------ */

static const struct {
    const char *in, *err;
} bad_listens[] = {
    {"nohost", "expected HOST:PORT (e.g. \"0.0.0.0:8080\" or \"[::1]:8080\"), got \"nohost\""},
    {":80", "missing host in \":80\" (use \"0.0.0.0:80\" for every interface)"},
    {"1.2.3.4:", "missing port in \"1.2.3.4:\": expected HOST:PORT (e.g. \"0.0.0.0:8080\""
                 " or \"[::1]:8080\")"},
    {"1.2.3.4:99999", "port 99999 is out of range (0..65535)"},
    {"1.2.3.4:65536", "port 65536 is out of range (0..65535)"},
    {"1.2.3.4:8x", "invalid port \"8x\" in \"1.2.3.4:8x\" (expected 0..65535)"},
    {"1.2.3.4:-1", "invalid port \"-1\" in \"1.2.3.4:-1\" (expected 0..65535)"},
    {"1.2.3.999:80", "invalid host \"1.2.3.999\" in \"1.2.3.999:80\""},
    {"bad_host:80", "invalid host \"bad_host\" in \"bad_host:80\""},
    {"::1:8080", "an IPv6 address needs brackets: \"[::1]:8080\", got \"::1:8080\""},
    {"[::1]", "missing port in \"[::1]\": expected HOST:PORT (e.g. \"0.0.0.0:8080\""
              " or \"[::1]:8080\")"},
    {"[::1]:", "missing port in \"[::1]:\": expected HOST:PORT (e.g. \"0.0.0.0:8080\""
               " or \"[::1]:8080\")"},
    {"[::1:80", "missing ']' in \"[::1:80\" (e.g. \"0.0.0.0:8080\" or \"[::1]:8080\")"},
    {"[zz]:80", "invalid IPv6 address \"zz\" in \"[zz]:80\""},
    {"[]:80", "invalid IPv6 address \"\" in \"[]:80\""},
    {"", "expected HOST:PORT (e.g. \"0.0.0.0:8080\" or \"[::1]:8080\"), got \"\""},
    {"host :80", "invalid address: expected HOST:PORT (e.g. \"0.0.0.0:8080\" or"
                 " \"[::1]:8080\")"},
};

START_TEST(t_bad_listen)
{
    char err[256] = "";
    ck_assert_int_eq(hub_config_set_listen(&c, bad_listens[_i].in, err, sizeof(err)), -1);
    ck_assert_str_eq(err, bad_listens[_i].err);
    /* A refused address changes nothing. */
    ck_assert_str_eq(c.listen, "0.0.0.0:8080");
    ck_assert_str_eq(c.listen_host, "0.0.0.0");
    ck_assert_int_eq(c.listen_port, 8080);
}
END_TEST

static const struct {
    const char *in, *host;
    int port;
} good_listens[] = {
    {"[::1]:8080", "::1", 8080},     {"127.0.0.1:0", "127.0.0.1", 0},
    {"[::]:443", "::", 443},         {"localhost:65535", "localhost", 65535},
    {"0.0.0.0:1", "0.0.0.0", 1},     {"hub.example.com:80", "hub.example.com", 80},
};

START_TEST(t_good_listen)
{
    char err[256] = "";
    ck_assert_int_eq(hub_config_set_listen(&c, good_listens[_i].in, err, sizeof(err)), 0);
    ck_assert_str_eq(c.listen, good_listens[_i].in);
    ck_assert_str_eq(c.listen_host, good_listens[_i].host);
    ck_assert_int_eq(c.listen_port, good_listens[_i].port);
}
END_TEST

START_TEST(t_bad_listen_in_conf)
{
    load_one_error("\nlisten = \":80\"\n",
                   ":2: listen: missing host in \":80\" (use \"0.0.0.0:80\" for every"
                   " interface)");
    hub_config_errors_free(&e);
    load_one_error("listen = \"1.2.3.4:99999\"\n",
                   ":1: listen: port 99999 is out of range (0..65535)");
    hub_config_errors_free(&e);
    load_ok("listen = \"[::1]:8080\"\n");
    ck_assert_str_eq(c.listen_host, "::1");
    ck_assert_int_eq(c.listen_port, 8080);
}
END_TEST

/* ---- paths ------------------------------------------------------------- */

START_TEST(t_static_dir_missing)
{
    ck_assert_int_eq(load("ping_interval = 9\nstatic_dir = \"nope\"\n"), -1);
    ck_assert_uint_eq(e.n, 1);
    err_is(0, ":2: static_dir: \"nope\" (resolved to %s/nope): No such file or directory", tmp);
    ck_assert_ptr_null(c.static_dir);
}
END_TEST

START_TEST(t_static_dir_not_a_dir)
{
    put("file.txt", "x");
    char text[PATH_MAX + 64];
    snprintf(text, sizeof(text), "static_dir = \"%s/file.txt\"\n", tmp);
    load_one_error(text, ":1: static_dir: \"%s/file.txt\": not a directory", tmp);
}
END_TEST

START_TEST(t_policy_checks)
{
    mkdir_in_tmp("adir");
    ck_assert_int_eq(load("policy = \"missing.lua\"\n"), -1);
    ck_assert_uint_eq(e.n, 1);
    err_is(0, ":1: policy: \"missing.lua\" (resolved to %s/missing.lua): No such file or"
              " directory", tmp);
    hub_config_errors_free(&e);
    ck_assert_int_eq(load("policy = \"adir\"\n"), -1);
    ck_assert_uint_eq(e.n, 1);
    err_is(0, ":1: policy: \"adir\" (resolved to %s/adir): not a regular file", tmp);
    ck_assert_ptr_null(c.policy);
}
END_TEST

START_TEST(t_relative_paths)
{
    /* tmp/conf/hub.conf names ../www and policy.lua (next to it); loaded by a
     * relative path from tmp, the way `make run` does from the repo root. */
    mkdir_in_tmp("conf");
    mkdir_in_tmp("www");
    put("conf/policy.lua", "-- allow all\n");
    put("conf/hub.conf", "static_dir = \"../www\"\npolicy = \"policy.lua\"\n");
    ck_assert_int_eq(chdir(tmp), 0);
    ck_assert_int_eq(hub_config_load(&c, "conf/hub.conf", &e), 0);
    ck_assert_uint_eq(e.n, 0);
    char want[PATH_MAX + 32];
    ck_assert_str_eq(c.path, "conf/hub.conf");
    snprintf(want, sizeof(want), "%s/conf", tmp);
    ck_assert_str_eq(c.dir, want);
    snprintf(want, sizeof(want), "%s/www", tmp);
    ck_assert_str_eq(c.static_dir, want);
    snprintf(want, sizeof(want), "%s/conf/policy.lua", tmp);
    ck_assert_str_eq(c.policy, want);
}
END_TEST

START_TEST(t_relative_path_errors_name_the_given_path)
{
    mkdir_in_tmp("conf");
    put("conf/hub.conf", "\nstatic_dir = \"../www\"\n");
    ck_assert_int_eq(chdir(tmp), 0);
    ck_assert_int_eq(hub_config_load(&c, "conf/hub.conf", &e), -1);
    ck_assert_uint_eq(e.n, 1);
    char want[PATH_MAX + 128];
    snprintf(want, sizeof(want), "conf/hub.conf:2: static_dir: \"../www\" (resolved to"
             " %s/conf/../www): No such file or directory", tmp);
    ck_assert_str_eq(e.v[0], want);
}
END_TEST

START_TEST(t_file_in_cwd)
{
    put("hub.conf", "ping_interval = 4\n");
    ck_assert_int_eq(chdir(tmp), 0);
    ck_assert_int_eq(hub_config_load(&c, "hub.conf", &e), 0);
    ck_assert_str_eq(c.dir, tmp);
    ck_assert_uint_eq(c.ping_interval, 4);
}
END_TEST

START_TEST(t_absolute_static_dir)
{
    mkdir_in_tmp("abs");
    char text[PATH_MAX + 64];
    snprintf(text, sizeof(text), "static_dir = \"%s/abs\"\n", tmp);
    load_ok(text);
    snprintf(text, sizeof(text), "%s/abs", tmp);
    ck_assert_str_eq(c.static_dir, text);
}
END_TEST

/* ---- several problems -------------------------------------------------- */

START_TEST(t_multiple_errors)
{
    ck_assert_int_eq(load("listen = \"nohost\"\n"
                          "ping_interval = 0\n"
                          "websocket_path = \"/live\"\n"
                          "max_message_size = \"big\"\n"
                          "listn = 1\n"
                          "static_dir = \"missing\"\n"
                          "ping_timeout = 12\n"),
                     -1);
    ck_assert_uint_eq(e.n, 5);
    err_is(0, ":1: listen: expected HOST:PORT (e.g. \"0.0.0.0:8080\" or \"[::1]:8080\"),"
              " got \"nohost\"");
    err_is(1, ":2: ping_interval: 0 is out of range (1..3600)");
    err_is(2, ":4: max_message_size: expected a size (integer bytes or a string like"
              " \"64KiB\"), got \"big\"");
    err_is(3, ":5: unknown key 'listn' (did you mean 'listen'?)");
    err_is(4, ":6: static_dir: \"missing\" (resolved to %s/missing): No such file or"
              " directory", tmp);
    /* The valid keys around them were applied. */
    ck_assert_str_eq(c.websocket_path, "/live");
    ck_assert_uint_eq(c.ping_timeout, 12);
}
END_TEST

START_TEST(t_cross_key_message_size_set)
{
    load_one_error("\nmax_message_size = \"2MiB\"\n",
                   ":2: max_queue_bytes (1MiB) must be at least max_message_size (2MiB):"
                   " a connection must be able to queue one full message");
}
END_TEST

START_TEST(t_cross_key_queue_set)
{
    load_one_error("\n\nmax_queue_bytes = 8192\n",
                   ":3: max_queue_bytes (8KiB) must be at least max_message_size (64KiB):"
                   " a connection must be able to queue one full message");
}
END_TEST

START_TEST(t_cross_key_both_set)
{
    load_one_error("max_queue_bytes = 10000\nmax_message_size = 10001\n",
                   ":1: max_queue_bytes (10000) must be at least max_message_size (10001):"
                   " a connection must be able to queue one full message");
    hub_config_errors_free(&e);
    hub_config_free(&c);
    hub_config_defaults(&c);
    load_ok("max_message_size = 10000\nmax_queue_bytes = 10000\n");
}
END_TEST

START_TEST(t_cross_key_skipped_when_value_refused)
{
    /* max_queue_bytes was refused: comparing with its default would only
     * add a confusing second error. */
    load_one_error("max_message_size = \"4MiB\"\nmax_queue_bytes = \"lots\"\n",
                   ":2: max_queue_bytes: expected a size (integer bytes or a string like"
                   " \"64KiB\"), got \"lots\"");
}
END_TEST

/* ---- the shipped conf -------------------------------------------------- */

static const char *src_dir(void)
{
    static char d[PATH_MAX];
    const char *env = getenv("LUAHUB_SRC");
    if (env)
        return env;
    snprintf(d, sizeof(d), "%s", __FILE__); /* SRC/tests/unit/test_config.c */
    for (int i = 0; i < 3; i++) {
        char *slash = strrchr(d, '/');
        ck_assert_ptr_nonnull(slash);
        *slash = '\0';
    }
    return d;
}

static char *slurp(const char *p)
{
    FILE *f = fopen(p, "r");
    ck_assert_msg(f != NULL, "%s: %s", p, strerror(errno));
    static char buf[64 * 1024];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

/* conf/luahub.conf, copied into tmp/conf next to a tmp/examples/hello, loads
 * cleanly; with every commented "-- key = value" line uncommented it still
 * loads and gives the defaults: the reference in the comments is true. */
START_TEST(t_shipped_conf)
{
    char p[PATH_MAX + 64];
    snprintf(p, sizeof(p), "%s/conf/luahub.conf", src_dir());
    const char *text = slurp(p);
    mkdir_in_tmp("conf");
    mkdir_in_tmp("examples");
    mkdir_in_tmp("examples/hello");
    put("conf/luahub.conf", text);
    ck_assert_int_eq(chdir(tmp), 0);
    ck_assert_int_eq(hub_config_load(&c, "conf/luahub.conf", &e), 0);
    ck_assert_str_eq(c.listen, "0.0.0.0:8080");
    ck_assert_str_eq(c.websocket_path, "/ws");
    snprintf(p, sizeof(p), "%s/examples/hello", tmp);
    ck_assert_str_eq(c.static_dir, p);

    /* Uncomment "-- key = value" lines (not prose comments). */
    static char all[64 * 1024];
    size_t n = 0;
    unsigned uncommented = 0;
    for (const char *l = text; *l;) {
        const char *end = strchr(l, '\n');
        size_t len = end ? (size_t)(end - l + 1) : strlen(l);
        const char *s = l;
        if (strncmp(l, "-- ", 3) == 0 && l[3] >= 'a' && l[3] <= 'z' &&
            strspn(l + 3, "abcdefghijklmnopqrstuvwxyz_") < len - 3 &&
            strncmp(l + 3 + strspn(l + 3, "abcdefghijklmnopqrstuvwxyz_"), " = ", 3) == 0) {
            s += 3, len -= 3;
            uncommented++;
        }
        ck_assert_uint_lt(n + len, sizeof(all));
        memcpy(all + n, s, len);
        n += len;
        l = s + len;
    }
    all[n] = '\0';
    ck_assert_uint_eq(uncommented, 17); /* all but listen, websocket_path, static_dir */
    put("conf/policy.lua", "-- allow all\n");
    put("conf/all.conf", all);
    hub_config_free(&c);
    hub_config_defaults(&c);
    int rc = hub_config_load(&c, "conf/all.conf", &e);
    if (rc)
        dump_errors();
    ck_assert_int_eq(rc, 0);
    ck_assert_uint_eq(c.max_message_size, 65536);
    ck_assert_uint_eq(c.max_queue_bytes, 1048576);
    ck_assert_uint_eq(c.max_channels_per_conn, 128);
    ck_assert_uint_eq(c.max_connections, 0);
    ck_assert_uint_eq(c.max_protocol_errors, 10);
    ck_assert_uint_eq(c.ping_interval, 25);
    ck_assert_uint_eq(c.ping_timeout, 10);
    ck_assert_uint_eq(c.shutdown_timeout, 5);
    ck_assert_int_eq(c.log_level, HUB_LOG_INFO);
    ck_assert_uint_eq(c.lua_max_instructions, 1000000);
    ck_assert_uint_eq(c.lua_max_memory, 64 * MiB);
    ck_assert_ptr_nonnull(c.api_key);
    ck_assert_ptr_nonnull(c.policy);
}
END_TEST

/* A second load into the same struct replaces path, dir and strings without
 * leaking (the ASan build checks the leak part). */
START_TEST(t_reload_same_struct)
{
    load_ok("listen = \"127.0.0.1:1\"\napi_key = \"a\"\n");
    load_ok("listen = \"127.0.0.1:2\"\napi_key = \"b\"\n");
    ck_assert_str_eq(c.path, path);
    ck_assert_int_eq(c.listen_port, 2);
    ck_assert_str_eq(c.api_key, "b");
    /* Reloading by the struct's own path (what a SIGHUP reload does). */
    hub_config_free(&c);
    hub_config_defaults(&c);
    ck_assert_int_eq(hub_config_load(&c, path, &e), 0);
    ck_assert_int_eq(hub_config_load(&c, c.path, &e), 0);
    ck_assert_str_eq(c.path, path);
    ck_assert_str_eq(c.dir, tmp);
    ck_assert_str_eq(c.api_key, "b");
}
END_TEST

/* ---- scale-out and policy keys ---------------------------------------- */

START_TEST(t_broker_and_workers)
{
    load_ok("broker = \"redis://:pw@127.0.0.1:6380/2\"\nworkers = 4\nredis_prefix = \"app:\"\n");
    ck_assert_str_eq(c.broker, "redis://:pw@127.0.0.1:6380/2");
    ck_assert_uint_eq(c.workers, 4);
    ck_assert_str_eq(c.redis_prefix, "app:");
    hub_config_free(&c);
    hub_config_defaults(&c);
    /* A list shards channels: stored as one space-separated string. */
    load_ok("broker = { \"redis://a:1\", \"redis://b:2\" }\nworkers = \"auto\"\n");
    ck_assert_str_eq(c.broker, "redis://a:1 redis://b:2");
    ck_assert_uint_eq(c.workers, 0);
}
END_TEST

START_TEST(t_broker_defaults)
{
    load_ok("");
    ck_assert_str_eq(c.broker, "memory");
    ck_assert_str_eq(c.redis_prefix, "luahub:");
    ck_assert_uint_eq(c.workers, 1);
    ck_assert_ptr_null(c.policy_vars);
}
END_TEST

START_TEST(t_broker_bad_list)
{
    load_one_error("broker = { \"redis://a:1\", 7 }\n",
                   ":1: broker: item 2: expected a string, got number");
    hub_config_free(&c);
    hub_config_errors_free(&e);
    hub_config_defaults(&c);
    load_one_error("broker = {}\n", ":1: broker: the list is empty");
}
END_TEST

START_TEST(t_workers_need_redis)
{
    load_one_error("workers = 2\n",
                   ":1: workers = N > 1 needs the redis broker (set broker = "
                   "\"redis://host:port\"): with the memory broker each process only sees "
                   "its own subscribers");
}
END_TEST

/* NaN prints as "nan" or "-nan" depending on its sign bit: only the
 * refusal and its reason are checked. */
START_TEST(t_policy_vars_nan)
{
    ck_assert_int_eq(load("policy_vars = { x = 0/0 }\n"), -1);
    ck_assert_uint_eq(e.n, 1);
    ck_assert_msg(strstr(e.v[0], "'x': ") && strstr(e.v[0], "nan is not a finite number"),
                  "%s", e.v[0]);
}
END_TEST

START_TEST(t_policy_vars)
{
    load_ok("policy_vars = { secret = \"s\\\"q\", n = 5, f = 1.5, on = true }\n");
    ck_assert_ptr_nonnull(c.policy_vars);
    /* Key order is Lua's: check each member, and that it is one object. */
    ck_assert(c.policy_vars[0] == '{');
    ck_assert_ptr_nonnull(strstr(c.policy_vars, "\"secret\":\"s\\\"q\""));
    ck_assert_ptr_nonnull(strstr(c.policy_vars, "\"n\":5"));
    ck_assert_ptr_nonnull(strstr(c.policy_vars, "\"f\":1.5"));
    ck_assert_ptr_nonnull(strstr(c.policy_vars, "\"on\":true"));
}
END_TEST

START_TEST(t_policy_vars_bad)
{
    load_one_error("policy_vars = { t = {} }\n",
                   ":1: policy_vars: 't': expected a string, number or boolean, got table");
    hub_config_free(&c);
    hub_config_errors_free(&e);
    hub_config_defaults(&c);
    load_one_error("policy_vars = \"x\"\n",
                   ":1: policy_vars: expected a table of name = string, number or boolean, "
                   "got string");
}
END_TEST

START_TEST(t_channels)
{
    load_ok("-- channels = { [\"x\"] = {} } in a comment is not the key\n"
            "local note = \"channels = { ['y'] = {} }\"\n"
            "--[==[ channels = { ]==]\n"
            "channels = {\n"
            "  [\"room:*\"] = { history_size = 100, history_ttl = 600, presence = true,\n"
            "                 join_leave = true },\n"
            "  [\"room:vip:*\"] = { presence = true },\n"
            "  [\"room:vip:lounge\"] = { history_size = 5 },\n"
            "  feed = { history_size = 1000 },\n"
            "  [\"*\"] = { presence = true },\n"
            "}\n"
            "recover_max = 50\npresence_max = 10\npresence_ttl = 5\n");
    ck_assert_uint_eq(c.nchannels, 5);
    ck_assert_uint_eq(c.recover_max, 50);
    ck_assert_uint_eq(c.presence_max, 10);
    ck_assert_uint_eq(c.presence_ttl, 5);

    const struct hub_channel_opts *o = hub_config_channel(&c, "room:1", 6);
    ck_assert_ptr_nonnull(o);
    ck_assert_str_eq(o->pattern, "room:*");
    ck_assert_uint_eq(o->history_size, 100);
    ck_assert_uint_eq(o->history_ttl, 600);
    ck_assert(o->presence && o->join_leave);
    /* the longest prefix wins; an exact name beats every prefix */
    o = hub_config_channel(&c, "room:vip:7", 10);
    ck_assert_str_eq(o->pattern, "room:vip:*");
    ck_assert_uint_eq(o->history_size, 0);
    o = hub_config_channel(&c, "room:vip:lounge", 15);
    ck_assert_str_eq(o->pattern, "room:vip:lounge");
    ck_assert_uint_eq(o->history_ttl, HUB_HISTORY_TTL_DEFAULT);
    ck_assert(!o->presence);
    o = hub_config_channel(&c, "feed", 4);
    ck_assert_str_eq(o->pattern, "feed");
    /* "feed:1" is not "feed"; "room:" itself matches "room:*" */
    ck_assert_str_eq(hub_config_channel(&c, "feed:1", 6)->pattern, "*");
    ck_assert_str_eq(hub_config_channel(&c, "room:", 5)->pattern, "room:*");
    ck_assert_str_eq(hub_config_channel(&c, "other", 5)->pattern, "*");
}
END_TEST

/* The keys of hooks that wait, and their defaults. */
START_TEST(t_wait_keys)
{
    load_ok("listen = \"127.0.0.1:1\"\n");
    ck_assert_ptr_null(c.policy_redis);
    ck_assert_uint_eq(c.lua_call_timeout, 1);
    ck_assert_uint_eq(c.lua_max_waiting, 10000);
    ck_assert_uint_eq(c.lua_shared_memory, 16 * MiB);
    hub_config_free(&c);
    hub_config_defaults(&c);
    load_ok("policy_redis = \"redis://:pw@127.0.0.1:6380/3\"\nlua_call_timeout = 5\n"
            "lua_max_waiting = 7\nlua_shared_memory = \"1MiB\"\n");
    ck_assert_str_eq(c.policy_redis, "redis://:pw@127.0.0.1:6380/3");
    ck_assert_uint_eq(c.lua_call_timeout, 5);
    ck_assert_uint_eq(c.lua_max_waiting, 7);
    ck_assert_uint_eq(c.lua_shared_memory, 1 * MiB);
}
END_TEST

START_TEST(t_channels_defaults)
{
    load_ok("listen = \"127.0.0.1:1\"\n");
    ck_assert_uint_eq(c.nchannels, 0);
    ck_assert_ptr_null(hub_config_channel(&c, "room:1", 6));
    ck_assert_uint_eq(c.recover_max, 300);
    ck_assert_uint_eq(c.presence_max, 1000);
    ck_assert_uint_eq(c.presence_ttl, 60);
}
END_TEST

/* Every problem of a bad channels table at once, in line order, and
 * nothing of it kept. */
START_TEST(t_channels_all_problems)
{
    ck_assert_int_eq(load("channels = {\n"
                          "  [\"a:*\"] = { history_size = 0 },\n"
                          "  [\"b:*\"] = { presence = \"yes\" },\n"
                          "  [\"ok:*\"] = { presence = true },\n"
                          "  [\"ok:*\"] = {},\n"
                          "}\n"), -1);
    if (e.n != 3)
        dump_errors();
    ck_assert_uint_eq(e.n, 3);
    err_is(0, ":2: channels[\"a:*\"]: history_size: 0 is out of range (1..100000)");
    err_is(1, ":3: channels[\"b:*\"]: presence: expected true or false, got string");
    err_is(2, ":5: channels[\"ok:*\"]: this pattern is already set at line 4");
    ck_assert_uint_eq(c.nchannels, 0);
}
END_TEST

/* Confs that fail with exactly one error, and its text. */
static const struct {
    const char *conf, *error;
} one_error[] = {
    {"\x1bLua",
     ": attempt to load a binary chunk (mode is 't')"}, /* binary_chunk_refused */
    {"_ENV[1] = 2\n",
     ":1: cannot assign to a number key: only conf keys can be assigned"}, /* non_string_key */
    {"local t = {}\nfor i = 1, 1e9 do t[i] = i end\n",
     ":2: memory limit exceeded: the conf may use 16MiB (memory bomb?)"}, /* memory_bomb_table */
    {"broker = \"redis://x:99999\"\n",
     ":1: broker: broker URL \"redis://x:99999\": bad port \"99999\" (expected 1-65535)"}, /* broker_bad_url */
    /* secrets never reach an error: a broker URL's credentials, a string Lua stopped at */
    {"broker = \"redis://u:s3cret@x:99999\"\n",
     ":1: broker: broker URL \"redis://u:***@x:99999\": bad port \"99999\" (expected 1-65535)"},
    {"broker = \"redis://s3cret@x:1\"\n",
     ":1: broker: broker URL \"redis://***@x:1\": credentials must be \":password@\" or "
     "\"user:password@\""},
    {"broker = \"redis:/:s3cret@x:1\"\n",
     ":1: broker: broker URL \"redis:***@x:1\": expected \"memory\" or "
     "\"redis://[:password@]host:port[/db]\""},
    {"broker = \"redis://:s3%zzcret@x\"\n",
     ":1: broker: broker URL \"redis://:***@x\": bad %%-escape in the password"},
    {"broker = \"redis://:p@ss@h:0\"\n",
     ":1: broker: broker URL \"redis://:***@h:0\": bad port \"0\" (expected 1-65535)"},
    {"broker = { \"memory\", \"redis://:s3cret@x:1\" }\n",
     ":1: broker: \"memory\" cannot be mixed with redis URLs"},
    {"api_key = \"s3cret\n",
     ":1: unfinished string (near a string, not shown)"},
    {"api_key = 's3cret\\q'\n",
     ":1: invalid escape sequence (near a string, not shown)"},
    {"write_pause_max = 101\n", ":1: write_pause_max: 101 is out of range (0..100)"},
    {"write_pause_max = -1\n", ":1: write_pause_max: -1 is out of range (0..100)"},
    {"write_pause_max = 1.5\n", ":1: write_pause_max: expected an integer, got 1.5"},
    /* policy_vars are stored as JSON: finite numbers, UTF-8 strings */
    {"policy_vars = { x = 1/0 }\n",
     ":1: policy_vars: 'x': inf is not a finite number (JSON has no NaN or infinity)"},
    {"policy_vars = { x = -1/0 }\n",
     ":1: policy_vars: 'x': -inf is not a finite number (JSON has no NaN or infinity)"},
    {"policy_vars = { x = \"ok \\xff\" }\n", ":1: policy_vars: 'x': not valid UTF-8"},
    {"policy_vars = { [\"\\xc3\"] = 1 }\n", ":1: policy_vars: a name is not valid UTF-8"},
    /* copying is work: a string rebuilt by `..` in a loop (minutes before) */
    {"local s = \"x\"\nwhile true do s = #s .. s end\n",
     ":2: instruction limit exceeded after 10000000 instructions (runaway loop?)"},
    {"workers = \"many\"\n",
     ":1: workers: expected a number of processes or \"auto\", got \"many\""}, /* workers_bad */
    /* channels: every bad pattern, option and value names its line */
    {"channels = 5\n",
     ":1: channels: expected a table of pattern = { options }, got number"},
    {"channels = {\n  [\"a*b\"] = {},\n}\n",
     ":2: channels[\"a*b\"]: '*' may only end a pattern (\"room:*\")"},
    {"channels = {\n  [\"**\"] = {},\n}\n",
     ":2: channels[\"**\"]: '*' may only end a pattern (\"room:*\")"},
    {"channels = { [\"\"] = {} }\n",
     ":1: channels[\"\"]: an empty pattern matches no channel"},
    {"channels = {\n\n  [\"room 1:*\"] = {},\n}\n",
     ":3: channels[\"room 1:*\"]: a channel name has only the characters A-Z a-z 0-9 _ : . @ / "
     "= # -"},
    {"channels = { [string.rep(\"a\", 256)] = {} }\n",
     ":1: unknown name 'string'"},
    {"local long = \"\"\nfor i = 1, 32 do long = long .. \"abcdefgh\" end\n"
     "channels = { [long] = {} }\n",
     ":3: channels[\"abcdefghabcdefghabcdefghabcdefghabcdefghabcdefghabcdefghabcdefgh...\"]: "
     "longer than 255 bytes"},
    {"channels = { [1] = {} }\n",
     ":1: channels: patterns must be strings, got a number key"},
    {"channels = { \"room:*\" }\n",
     ":1: channels: patterns must be strings, got a number key"},
    {"channels = {\n  [\"room:*\"] = 100,\n}\n",
     ":2: channels[\"room:*\"]: expected a table of options, got number"},
    {"channels = {\n  [\"room:*\"] = {\n    history_sise = 5 },\n}\n",
     ":3: channels[\"room:*\"]: unknown option 'history_sise' (did you mean 'history_size'?)"},
    {"channels = {\n  [\"room:*\"] = { color = \"red\" },\n}\n",
     ":2: channels[\"room:*\"]: unknown option 'color': the options are history_size, "
     "history_ttl, presence, join_leave"},
    {"channels = { [\"room:*\"] = { history_size = 0 } }\n",
     ":1: channels[\"room:*\"]: history_size: 0 is out of range (1..100000)"},
    {"channels = { [\"room:*\"] = { history_size = 100001 } }\n",
     ":1: channels[\"room:*\"]: history_size: 100001 is out of range (1..100000)"},
    {"channels = { [\"room:*\"] = { history_size = -1 } }\n",
     ":1: channels[\"room:*\"]: history_size: -1 is out of range (1..100000)"},
    {"channels = { [\"room:*\"] = { history_size = 1e300 } }\n",
     ":1: channels[\"room:*\"]: history_size: 1e+300 is out of range (1..100000)"},
    {"channels = { [\"room:*\"] = { history_size = 2.5 } }\n",
     ":1: channels[\"room:*\"]: history_size: expected an integer, got 2.5"},
    {"channels = { [\"room:*\"] = { history_size = \"100\" } }\n",
     ":1: channels[\"room:*\"]: history_size: expected an integer, got string"},
    {"channels = { [\"room:*\"] = { history_size = 10, history_ttl = 0 } }\n",
     ":1: channels[\"room:*\"]: history_ttl: 0 is out of range (1..2592000)"},
    {"channels = { [\"room:*\"] = { history_size = 10, history_ttl = 2592001 } }\n",
     ":1: channels[\"room:*\"]: history_ttl: 2592001 is out of range (1..2592000)"},
    {"channels = { [\"room:*\"] = { history_ttl = 60 } }\n",
     ":1: channels[\"room:*\"]: history_ttl needs history_size (how many messages to keep)"},
    {"channels = { [\"room:*\"] = { presence = 1 } }\n",
     ":1: channels[\"room:*\"]: presence: expected true or false, got number"},
    {"channels = { [\"room:*\"] = { join_leave = true } }\n",
     ":1: channels[\"room:*\"]: join_leave needs presence = true"},
    {"channels = {\n  [\"room:*\"] = {},\n  [\"room:*\"] = { presence = true },\n}\n",
     ":3: channels[\"room:*\"]: this pattern is already set at line 2"},
    {"channels = {\n  ['room:*'] = {},\n  [\"room:\\x2a\"] = {},\n}\n",
     ":3: channels[\"room:*\"]: this pattern is already set at line 2"},
    {"channels = {\n  lobby = {},\n  [ [[lobby]] ] = {},\n}\n",
     ":3: channels[\"lobby\"]: this pattern is already set at line 2"},
    {"channels = {}\nchannels = {}\n",
     ":2: channels: already set at line 1"},
    {"recover_max = 0\n", ":1: recover_max: 0 is out of range (1..100000)"},
    {"presence_max = 100001\n", ":1: presence_max: 100001 is out of range (1..100000)"},
    {"presence_ttl = 0\n", ":1: presence_ttl: 0 is out of range (1..3600)"},
    /* origins, proxies, rate limits */
    {"allowed_origins = {\"example.com\"}\n",
     ":1: allowed_origins: \"example.com\" is not an origin: write scheme://host[:port], e.g. "
     "\"https://app.example.com\""},
    {"allowed_origins = {\"https://x/\"}\n",
     ":1: allowed_origins: \"https://x/\" has '/' in its host: an origin is "
     "scheme://host[:port], with no path, user or trailing slash"},
    {"allowed_origins = {\"https://x:0\"}\n",
     ":1: allowed_origins: \"https://x:0\": port out of range (1..65535)"},
    {"allowed_origins = {\"https://\"}\n", ":1: allowed_origins: \"https://\" has no host"},
    {"allowed_origins = {\"ftp://x\"}\n",
     ":1: allowed_origins: \"ftp://x\" is not an origin: write scheme://host[:port], e.g. "
     "\"https://app.example.com\""},
    {"local t = {} for i = 1, 300 do t[i] = \"https://h\" .. i end\nallowed_origins = t\n",
     ":2: allowed_origins: more than 256 entries"},
    {"allowed_origins = {}\n", ":1: allowed_origins: the list is empty"},
    {"trusted_proxies = {\"junk\"}\n",
     ":1: trusted_proxies: \"junk\" is not an IP address"},
    {"trusted_proxies = {\"10.0.0.1/8\"}\n",
     ":1: trusted_proxies: \"10.0.0.1/8\" has host bits set (the network is written with them "
     "zero)"},
    {"trusted_proxies = {\"10.0.0.0/33\"}\n",
     ":1: trusted_proxies: prefix /33 is longer than 32 bits"},
    {"trusted_proxies = {\"::/x\"}\n", ":1: trusted_proxies: bad prefix length in \"::/x\""},
    {"command_rate = -1\n", ":1: command_rate: -1 is out of range (0..1000000)"},
    {"command_rate = 1e12\n", ":1: command_rate: 1000000000000 is out of range (0..1000000)"},
    {"publish_burst = 0\n", ":1: publish_burst: 0 is out of range (1..1000000)"},
    {"publish_rate = 1.5\n", ":1: publish_rate: expected an integer, got 1.5"},
    {"max_connections_per_ip = -5\n",
     ":1: max_connections_per_ip: -5 is out of range (0..10000000)"},
    {"connect_rate_per_ip = \"fast\"\n",
     ":1: connect_rate_per_ip: expected an integer, got string"},
    /* hooks that wait (docs/lua.md, "Waiting: Redis, history, presence") */
    {"policy_redis = \"memory\"\n",
     ":1: policy_redis: must be one redis://[[user]:password@]host[:port][/db] URL"},
    {"policy_redis = \"redis://a:1 redis://b:2\"\n",
     ":1: policy_redis: must be one redis://[[user]:password@]host[:port][/db] URL"},
    {"policy_redis = \"redis://x:0\"\n",
     ":1: policy_redis: broker URL \"redis://x:0\": bad port \"0\" (expected 1-65535)"},
    {"lua_call_timeout = 0\n", ":1: lua_call_timeout: 0 is out of range (1..300)"},
    {"lua_call_timeout = 0.5\n", ":1: lua_call_timeout: expected a whole number of seconds, got 0.5"},
    {"lua_max_waiting = 0\n", ":1: lua_max_waiting: 0 is out of range (1..1000000)"},
    {"lua_shared_memory = \"1KiB\"\n",
     ":1: lua_shared_memory: 1KiB is out of range (64KiB..16GiB)"},
};

START_TEST(t_one_error)
{
    load_one_error(one_error[_i].conf, one_error[_i].error);
}
END_TEST

static Suite *config_suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc;

#define TC(name) \
    tc = tcase_create(name); \
    tcase_add_checked_fixture(tc, setup, teardown); \
    tcase_set_timeout(tc, 60); \
    suite_add_tcase(s, tc)

    TC("values");
    tcase_add_loop_test(tc, t_one_error, 0, (int)(sizeof one_error / sizeof *one_error));
    tcase_add_test(tc, t_defaults);
    tcase_add_test(tc, t_empty_file);
    tcase_add_test(tc, t_every_key);
    tcase_add_test(tc, t_range_edges);
    tcase_add_loop_test(tc, t_sizes, 0, sizeof(sizes) / sizeof(sizes[0]));
    tcase_add_loop_test(tc, t_log_levels, 0, 4);
    tcase_add_test(tc, t_locals_and_arithmetic);
    tcase_add_test(tc, t_reload_same_struct);
    tcase_add_test(tc, t_channels);
    tcase_add_test(tc, t_channels_defaults);
    tcase_add_test(tc, t_wait_keys);
    tcase_add_test(tc, t_channels_all_problems);

    TC("file");
    tcase_add_test(tc, t_missing_file);
    tcase_add_test(tc, t_directory_as_file);
    tcase_add_test(tc, t_syntax_error);
    tcase_add_test(tc, t_syntax_error_long_path);
    tcase_add_test(tc, t_utf8_bom);
    tcase_add_test(tc, t_file_too_large);

    TC("mistakes");
    tcase_add_test(tc, t_unknown_key);
    tcase_add_test(tc, t_wrong_types);
    tcase_add_test(tc, t_out_of_range);
    tcase_add_test(tc, t_size_overflow);
    tcase_add_loop_test(tc, t_bad_size_strings, 0, sizeof(bad_sizes) / sizeof(bad_sizes[0]));
    tcase_add_test(tc, t_string_checks);
    tcase_add_loop_test(tc, t_bad_strings, 0, sizeof(bad_strings) / sizeof(bad_strings[0]));
    tcase_add_test(tc, t_websocket_path_too_long);
    tcase_add_test(tc, t_duplicate_key);
    tcase_add_test(tc, t_duplicate_after_bad_value);
    tcase_add_test(tc, t_read_undefined_name);
    tcase_add_test(tc, t_no_libraries);
    tcase_add_test(tc, t_read_key);
    tcase_add_test(tc, t_assignment_in_function_line);
    tcase_add_test(tc, t_runtime_error);
    tcase_add_test(tc, t_multiple_errors);

    TC("budgets");
    tcase_add_test(tc, t_runaway_loop);
    tcase_add_test(tc, t_runaway_loop_in_function);
    tcase_add_test(tc, t_runaway_tail_calls);
    tcase_add_test(tc, t_recursion_bomb);
    tcase_add_test(tc, t_memory_bomb_string);
    tcase_add_test(tc, t_too_many_errors);

    TC("listen");
    tcase_add_loop_test(tc, t_bad_listen, 0, sizeof(bad_listens) / sizeof(bad_listens[0]));
    tcase_add_loop_test(tc, t_good_listen, 0, sizeof(good_listens) / sizeof(good_listens[0]));
    tcase_add_test(tc, t_bad_listen_in_conf);

    TC("paths");
    tcase_add_test(tc, t_static_dir_missing);
    tcase_add_test(tc, t_static_dir_not_a_dir);
    tcase_add_test(tc, t_policy_checks);
    tcase_add_test(tc, t_relative_paths);
    tcase_add_test(tc, t_relative_path_errors_name_the_given_path);
    tcase_add_test(tc, t_file_in_cwd);
    tcase_add_test(tc, t_absolute_static_dir);

    TC("cross-key");
    tcase_add_test(tc, t_cross_key_message_size_set);
    tcase_add_test(tc, t_cross_key_queue_set);
    tcase_add_test(tc, t_cross_key_both_set);
    tcase_add_test(tc, t_cross_key_skipped_when_value_refused);

    TC("shipped");
    tcase_add_test(tc, t_shipped_conf);

    TC("scale-out and policy keys");
    tcase_add_test(tc, t_broker_and_workers);
    tcase_add_test(tc, t_broker_defaults);
    tcase_add_test(tc, t_broker_bad_list);
    tcase_add_test(tc, t_workers_need_redis);
    tcase_add_test(tc, t_policy_vars);
    tcase_add_test(tc, t_policy_vars_nan);
    tcase_add_test(tc, t_policy_vars_bad);
#undef TC
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(config_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
