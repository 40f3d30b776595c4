/* Integration suite: luahub as a service (docs/operations.md).
 *
 * - `make install` into a staging directory (DESTDIR) or a private PREFIX,
 *   run as an unprivileged user (nobody, when the suite runs as root): the
 *   tree, the modes (the conf holds secrets: 0640), the installed binary
 *   running --version, --check and serving with the installed conf; a
 *   second install keeps an edited conf; uninstall; a binary not built.
 * - The systemd unit: the directives docs/operations.md promises, checked
 *   against the installed conf (TimeoutStopSec, LimitNOFILE), and
 *   systemd-analyze verify / security on it.
 * - The warning at start when the hub runs as root on a non-loopback
 *   address without api_key, once the port is bound (once with workers),
 *   and its absence otherwise. As root the line must appear; run as
 *   another user it must not (the condition is root). A hub that cannot
 *   bind does not warn: test_lifecycle's listen_on_foreign_address_exits.
 */
#include <check.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hubtest.h"
#include "redistest.h"

#define NOBODY 65534
#define MAKE_MS 60000
#define WARN_NEEDLE "running as root on "

/* ------------------------------------------------------------------ */
/* Helpers                                                              */
/* ------------------------------------------------------------------ */

static const char *src_dir(void)
{
    const char *s = getenv("LUAHUB_SRC");
    ck_assert_msg(s && *s, "LUAHUB_SRC is not set (run the suite through ctest)");
    return s;
}

/* The file's contents (new string), or NULL if it cannot be read. */
static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0, r;
    char *s = malloc(cap + 1);
    ck_assert_ptr_nonnull(s);
    while ((r = fread(s + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            cap *= 2;
            s = realloc(s, cap + 1);
            ck_assert_ptr_nonnull(s);
        }
    }
    fclose(f);
    s[n] = '\0';
    return s;
}

static char *slurp_ok(const char *path)
{
    char *s = slurp(path);
    ck_assert_msg(s != NULL, "cannot read %s: %s", path, strerror(errno));
    return s;
}

/* `installed` must hold exactly what the source file `rel` (relative to
 * the source tree) holds. */
static void expect_same_file(const char *installed, const char *rel)
{
    char *srcp = ht_asprintf("%s/%s", src_dir(), rel);
    char *a = slurp_ok(installed), *b = slurp_ok(srcp);
    ck_assert_msg(strcmp(a, b) == 0, "%s differs from %s", installed, srcp);
    free(a);
    free(b);
    free(srcp);
}

/* `path` must be a regular file with permission bits `mode`. */
static void expect_file_mode(const char *path, mode_t mode)
{
    struct stat st;
    ck_assert_msg(stat(path, &st) == 0, "%s is missing: %s", path, strerror(errno));
    ck_assert_msg(S_ISREG(st.st_mode), "%s is not a regular file", path);
    ck_assert_msg((st.st_mode & 07777) == mode, "%s has mode %04o, expected %04o", path,
                  (unsigned)(st.st_mode & 07777), (unsigned)mode);
}

static void expect_absent(const char *path)
{
    struct stat st;
    ck_assert_msg(lstat(path, &st) < 0 && errno == ENOENT, "%s is still there", path);
}

/* 1 when `make` runs as nobody: the suite runs as root and nobody can read
 * the source tree and the binary (a checkout under a private home cannot
 * be read; then make runs as the suite's own user, which is root). */
static int as_nobody(void)
{
    if (geteuid() != 0)
        return 0;
    char *mk = ht_asprintf("%s/Makefile", src_dir());
    const char *argv[] = {"/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                          "--clear-groups", "/usr/bin/test", "-r", mk, "-a", "-r",
                          getenv("LUAHUB_BIN"), NULL};
    int rc = ht_run(argv, NULL, MAKE_MS);
    free(mk);
    if (rc != 0)
        fprintf(stderr, "test_service: nobody cannot read the source tree: make runs as root\n");
    return rc == 0;
}

/* A new empty directory the make user may write into (new string). */
static char *staging_dir(void)
{
    const char *t = getenv("TMPDIR");
    char *d = ht_asprintf("%s/luahub-install.XXXXXX", t && *t ? t : "/tmp");
    ck_assert_msg(mkdtemp(d) != NULL, "mkdtemp: %s", strerror(errno));
    if (as_nobody())
        ck_assert_msg(chown(d, NOBODY, NOBODY) == 0, "chown %s: %s", d, strerror(errno));
    return d;
}

static void remove_tree(char *d)
{
    const char *argv[] = {"/bin/rm", "-rf", d, NULL};
    ht_run(argv, NULL, MAKE_MS);
    free(d);
}

/* Runs `make -C SRC target VAR=VALUE...` (vars NULL-terminated), as nobody
 * when the suite is root. Returns the exit status; *out gets the output. */
static int run_make(const char *target, const char *const *vars, char **out)
{
    const char *argv[32];
    size_t n = 0;
    if (as_nobody()) {
        argv[n++] = "/usr/bin/setpriv";
        argv[n++] = "--reuid=65534";
        argv[n++] = "--regid=65534";
        argv[n++] = "--clear-groups";
    }
    argv[n++] = "/usr/bin/make";
    argv[n++] = "-C";
    argv[n++] = src_dir();
    argv[n++] = target;
    for (size_t i = 0; vars[i]; i++) {
        ck_assert(n < 31);
        argv[n++] = vars[i];
    }
    argv[n] = NULL;
    /* A make above ctest (make test) exports its jobserver and flags. */
    unsetenv("MAKEFLAGS");
    unsetenv("MFLAGS");
    unsetenv("MAKELEVEL");
    return ht_run(argv, out, MAKE_MS);
}

/* run_make that must succeed. Returns the output (new string). */
static char *make_ok(const char *target, const char *const *vars)
{
    char *out = NULL;
    int rc = run_make(target, vars, &out);
    ck_assert_msg(rc == 0, "make %s exited with %d:\n%s", target, rc, out);
    return out;
}

/* make install with DESTDIR=d (the default PREFIX and SYSCONFDIR). Returns
 * its output (new string). */
static char *install_into(const char *d)
{
    char *destdir = ht_asprintf("DESTDIR=%s", d);
    char *bin = ht_asprintf("LUAHUB=%s", getenv("LUAHUB_BIN"));
    const char *vars[] = {destdir, bin, "PREFIX=/usr/local", "SYSCONFDIR=/etc", NULL};
    char *out = make_ok("install", vars);
    free(destdir);
    free(bin);
    return out;
}

/* Value of the first `key=` line of a unit file (new string), or NULL. */
static char *unit_value(const char *unit, const char *key)
{
    size_t kl = strlen(key);
    for (const char *p = unit; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (!strncmp(p, key, kl) && p[kl] == '=') {
            size_t n = strcspn(p + kl + 1, "\n");
            char *v = ht_asprintf("%.*s", (int)n, p + kl + 1);
            return v;
        }
    }
    return NULL;
}

static void expect_unit(const char *unit, const char *key, const char *want)
{
    char *v = unit_value(unit, key);
    ck_assert_msg(v != NULL, "the unit has no %s=", key);
    ck_assert_msg(!strcmp(v, want), "the unit has %s=%s, expected %s", key, v, want);
    free(v);
}

/* The integer a conf line `key = N` sets; the line must be there. */
static long conf_int(const char *conf, const char *key)
{
    size_t kl = strlen(key);
    for (const char *p = conf; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        long v;
        if (!strncmp(p, key, kl) && sscanf(p + kl, " = %ld", &v) == 1)
            return v;
    }
    ck_abort_msg("the installed conf does not set %s", key);
    return -1;
}

/* ------------------------------------------------------------------ */
/* make install                                                         */
/* ------------------------------------------------------------------ */

START_TEST(install_tree)
{
    char *d = staging_dir();
    char *out = install_into(d);
    char *bin = ht_asprintf("%s/usr/local/bin/luahub", d);
    char *conf = ht_asprintf("%s/etc/luahub/luahub.conf", d);
    char *lua = ht_asprintf("%s/usr/local/share/luahub/lua/default.lua", d);
    char *doc = ht_asprintf("%s/usr/local/share/doc/luahub/operations.md", d);
    char *unitp = ht_asprintf("%s/usr/local/lib/systemd/system/luahub.service", d);
    char *users = ht_asprintf("%s/usr/local/lib/sysusers.d/luahub.conf", d);

    expect_file_mode(bin, 0755);
    expect_file_mode(lua, 0644);
    expect_same_file(lua, "lua/default.lua");
    expect_file_mode(doc, 0644);
    expect_same_file(doc, "docs/operations.md");
    expect_file_mode(users, 0644);
    expect_same_file(users, "packaging/luahub.sysusers");
    expect_file_mode(unitp, 0644);
    /* The conf holds the api_key, policy_vars and Redis passwords: not
     * world-readable. */
    expect_file_mode(conf, 0640);
    expect_same_file(conf, "packaging/luahub.conf");
    /* Installed by the make user: nobody, when the suite is root. */
    struct stat st;
    ck_assert_int_eq(stat(bin, &st), 0);
    ck_assert_int_eq(st.st_uid, as_nobody() ? NOBODY : geteuid());

    /* The unit names the installed paths, not the staging directory. */
    char *unit = slurp_ok(unitp);
    expect_unit(unit, "ExecStart", "/usr/local/bin/luahub -c /etc/luahub/luahub.conf");
    expect_unit(unit, "Documentation", "file:///usr/local/share/doc/luahub/operations.md");
    for (const char *a = strchr(unit, '@'); a; a = strchr(a + 1, '@')) {
        size_t n = strspn(a + 1, "ABCDEFGHIJKLMNOPQRSTUVWXYZ_");
        ck_assert_msg(n == 0 || a[1 + n] != '@', "a placeholder is left in the unit: %.*s",
                      (int)n + 2, a);
    }
    ck_assert_msg(!strstr(unit, d), "the unit names the staging directory:\n%s", unit);

    /* The installed binary runs, and the installed conf is valid. */
    char *o = NULL;
    const char *version[] = {bin, "--version", NULL};
    ck_assert_int_eq(ht_run(version, &o, HT_WAIT_MS), 0);
    ck_assert_msg(!strncmp(o, "luahub ", 7), "--version printed: %s", o);
    free(o);
    const char *check[] = {bin, "-c", conf, "--check", NULL};
    int rc = ht_run(check, &o, HT_WAIT_MS);
    ck_assert_msg(rc == 0, "--check on the installed conf exited with %d:\n%s", rc, o);
    ck_assert_ptr_nonnull(strstr(o, ": ok"));
    free(o);

    /* ... and serves with it (on a free port instead of its 8080). */
    char *text = slurp_ok(conf);
    setenv("LUAHUB_BIN", bin, 1);
    struct hub *h = hub_start(text);
    struct http_resp r;
    ck_assert_int_eq(http_request(h->port, "GET", "/healthz", NULL, NULL, &r), 200);
    http_resp_free(&r);
    ck_assert_int_eq(hub_stop(h), 0);

    free(text);
    free(unit);
    free(out);
    free(bin);
    free(conf);
    free(lua);
    free(doc);
    free(unitp);
    free(users);
    remove_tree(d);
}
END_TEST

START_TEST(install_keeps_edited_conf)
{
    char *d = staging_dir();
    free(install_into(d));
    char *conf = ht_asprintf("%s/etc/luahub/luahub.conf", d);
    char *dist = ht_asprintf("%s.dist", conf);
    expect_absent(dist);

    /* The operator edits the conf; a new install must not undo that. */
    char *edited = slurp_ok(conf);
    edited = realloc(edited, strlen(edited) + 64);
    strcat(edited, "api_key = \"edited-by-the-operator\"\n");
    FILE *f = fopen(conf, "w");
    ck_assert_ptr_nonnull(f);
    fputs(edited, f);
    fclose(f);

    char *out = install_into(d);
    char *now = slurp_ok(conf);
    ck_assert_msg(!strcmp(now, edited), "the second install changed the edited conf");
    ck_assert_msg(strstr(out, "kept") && strstr(out, "luahub.conf.dist"),
                  "make install did not say it kept the conf:\n%s", out);
    expect_file_mode(dist, 0640);
    expect_same_file(dist, "packaging/luahub.conf");

    free(out);
    free(now);
    free(edited);
    free(conf);
    free(dist);
    remove_tree(d);
}
END_TEST

START_TEST(uninstall_keeps_conf)
{
    char *d = staging_dir();
    free(install_into(d));
    char *destdir = ht_asprintf("DESTDIR=%s", d);
    const char *vars[] = {destdir, "PREFIX=/usr/local", "SYSCONFDIR=/etc", NULL};
    char *out = make_ok("uninstall", vars);

    const char *gone[] = {"usr/local/bin/luahub", "usr/local/share/luahub",
                          "usr/local/share/doc/luahub",
                          "usr/local/lib/systemd/system/luahub.service",
                          "usr/local/lib/sysusers.d/luahub.conf"};
    for (size_t i = 0; i < sizeof(gone) / sizeof(gone[0]); i++) {
        char *p = ht_asprintf("%s/%s", d, gone[i]);
        expect_absent(p);
        free(p);
    }
    char *conf = ht_asprintf("%s/etc/luahub/luahub.conf", d);
    expect_file_mode(conf, 0640);

    free(conf);
    free(out);
    free(destdir);
    remove_tree(d);
}
END_TEST

/* Bad input: no binary to install. A clear error, nothing installed. */
START_TEST(install_without_binary)
{
    char *d = staging_dir();
    char *destdir = ht_asprintf("DESTDIR=%s", d);
    char *bin = ht_asprintf("LUAHUB=%s/not-built/luahub", d);
    const char *vars[] = {destdir, bin, NULL};
    char *out = NULL;
    int rc = run_make("install", vars, &out);
    ck_assert_msg(rc != 0, "make install succeeded without a binary:\n%s", out);
    ck_assert_msg(strstr(out, "not-built/luahub is not built") && strstr(out, "make build"),
                  "the error does not name the binary and what to do:\n%s", out);
    char *usr = ht_asprintf("%s/usr", d);
    expect_absent(usr);

    free(usr);
    free(out);
    free(bin);
    free(destdir);
    remove_tree(d);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The systemd unit                                                     */
/* ------------------------------------------------------------------ */

/* Installed without DESTDIR into a private PREFIX and SYSCONFDIR, so that
 * the unit's ExecStart names a binary that exists (systemd-analyze verify
 * checks that). */
START_TEST(unit_sandbox_and_limits)
{
    char *d = staging_dir();
    char *prefix = ht_asprintf("PREFIX=%s/opt", d);
    char *etc = ht_asprintf("SYSCONFDIR=%s/etc", d);
    char *bin = ht_asprintf("LUAHUB=%s", getenv("LUAHUB_BIN"));
    const char *vars[] = {prefix, etc, bin, NULL};
    char *out = make_ok("install", vars);

    char *unitp = ht_asprintf("%s/opt/lib/systemd/system/luahub.service", d);
    char *confp = ht_asprintf("%s/etc/luahub/luahub.conf", d);
    char *unit = slurp_ok(unitp), *conf = slurp_ok(confp);
    char *exec = ht_asprintf("%s/opt/bin/luahub -c %s", d, confp);
    expect_unit(unit, "ExecStart", exec);

    expect_unit(unit, "User", "luahub");
    expect_unit(unit, "Group", "luahub");
    expect_unit(unit, "NoNewPrivileges", "yes");
    expect_unit(unit, "ProtectSystem", "strict");
    expect_unit(unit, "ProtectHome", "yes");
    expect_unit(unit, "PrivateTmp", "yes");
    expect_unit(unit, "Restart", "on-failure");
    expect_unit(unit, "ExecReload", "/bin/kill -HUP $MAINPID");
    expect_unit(unit, "KillSignal", "SIGTERM");
    /* The whole group getting SIGTERM would hand workers a second one
     * (forwarded by the supervisor): they would drop clients at once. */
    expect_unit(unit, "KillMode", "mixed");

    /* Stop: shutdown_timeout, then up to 5 s of teardown, before SIGKILL. */
    char *v = unit_value(unit, "TimeoutStopSec");
    ck_assert_ptr_nonnull(v);
    long stop = atol(v), shutdown = conf_int(conf, "shutdown_timeout");
    ck_assert_msg(stop > shutdown + 5, "TimeoutStopSec=%ld is not above shutdown_timeout "
                  "(%ld) + 5", stop, shutdown);
    free(v);
    /* Descriptors: one per connection, plus HTTP connections and the
     * hub's own. */
    v = unit_value(unit, "LimitNOFILE");
    ck_assert_ptr_nonnull(v);
    long nofile = atol(v), conns = conf_int(conf, "max_connections");
    ck_assert_msg(conns > 0 && nofile >= conns + 1024,
                  "LimitNOFILE=%ld leaves no room above max_connections = %ld", nofile, conns);
    /* Over 10,000,000 lws 4.1.6 falls back to 2560 descriptors. */
    ck_assert_msg(nofile <= 10000000, "LimitNOFILE=%ld: lws would use 2560", nofile);
    free(v);

    /* systemd's own checks, when systemd is on the machine. */
    if (access("/usr/bin/systemd-analyze", X_OK) == 0) {
        char *o = NULL;
        const char *verify[] = {"/usr/bin/systemd-analyze", "verify", unitp, NULL};
        int rc = ht_run(verify, &o, HT_WAIT_MS);
        ck_assert_msg(rc == 0, "systemd-analyze verify exited with %d:\n%s", rc, o);
        free(o);
        const char *sec[] = {"/usr/bin/systemd-analyze", "security", "--offline=yes",
                             "--no-pager", unitp, NULL};
        rc = ht_run(sec, &o, HT_WAIT_MS);
        const char *lvl = strstr(o, "Overall exposure level for luahub.service: ");
        ck_assert_msg(lvl, "systemd-analyze security printed no exposure level:\n%s", o);
        double exposure = atof(lvl + strlen("Overall exposure level for luahub.service: "));
        ck_assert_msg(exposure <= 2.0, "the unit's exposure level is %.1f (at most 2.0)",
                      exposure);
        free(o);
    } else {
        fprintf(stderr, "test_service: no systemd-analyze: the unit is not verified by "
                "systemd\n");
    }

    free(exec);
    free(unit);
    free(conf);
    free(unitp);
    free(confp);
    free(out);
    free(prefix);
    free(etc);
    free(bin);
    remove_tree(d);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The warning at start                                                 */
/* ------------------------------------------------------------------ */

/* Starts a hub with `conf` and --listen `listen` ("" = none: the conf's),
 * stops it, and returns how many times its log has the warning. The hub
 * warns before its loop runs, and handles SIGTERM only in the loop: once
 * it has exited the log holds every line it would write. With `line`, the
 * first such line is copied there. */
static int warnings(const char *conf, const char *listen, char *line, size_t cap)
{
    struct hub_opts o = {.listen = listen};
    struct hub *h = hub_start_opts(conf, &o);
    hub_signal(h, SIGTERM);
    ck_assert_int_eq(hub_wait_exit(h, HT_WAIT_MS), 0);
    int n = hub_log_count(h, WARN_NEEDLE);
    if (line) {
        char *log = hub_log(h);
        const char *p = strstr(log, WARN_NEEDLE);
        line[0] = '\0';
        if (p) {
            const char *b = p;
            while (b > log && b[-1] != '\n')
                b--;
            snprintf(line, cap, "%.*s", (int)strcspn(b, "\n"), b);
        }
        free(log);
    }
    ck_assert_int_eq(hub_stop(h), 0);
    return n;
}

/* Root on every address without a key: one WARN line naming the address,
 * api_key and what to do. */
static void expect_warning(const char *conf, const char *listen, const char *addr)
{
    char line[1024];
    int n = warnings(conf, listen, line, sizeof(line));
    if (geteuid() != 0) {
        ck_assert_msg(n == 0, "not root, yet the log warns: %s", line);
        return;
    }
    ck_assert_msg(n == 1, "expected one warning at start, got %d", n);
    ck_assert_msg(strstr(line, " WARN ") && strstr(line, addr) && strstr(line, "api_key") &&
                  strstr(line, "unprivileged user"),
                  "the warning does not say what is exposed and what to do: %s", line);
}

START_TEST(warn_root_wildcard_conf)
{
    expect_warning("listen = \"0.0.0.0:0\"\n", "", "0.0.0.0:0");
}
END_TEST

START_TEST(warn_root_wildcard_option)
{
    expect_warning("", "0.0.0.0:0", "0.0.0.0:0");
}
END_TEST

START_TEST(warn_root_wildcard_ipv6)
{
    expect_warning("listen = \"[::]:0\"\n", "", "[::]:0");
}
END_TEST

/* With workers the supervisor warns, once, not every worker. */
START_TEST(warn_root_once_with_workers)
{
    struct srv redis = {0};
    srv_start(&redis, 0, NULL);
    char *conf = ht_asprintf("listen = \"0.0.0.0:0\"\nworkers = 2\n"
                             "broker = \"redis://127.0.0.1:%d\"\n", redis.port);
    expect_warning(conf, "", "0.0.0.0:0");
    free(conf);
    srv_stop(&redis);
}
END_TEST

START_TEST(no_warning_with_api_key)
{
    ck_assert_int_eq(warnings("listen = \"0.0.0.0:0\"\napi_key = \"k\"\n", "", NULL, 0), 0);
}
END_TEST

static const char *const loopback[] = {"127.0.0.1:0", "127.0.0.2:0", "localhost:0",
                                       "[::1]:0", "lo:0"};

START_TEST(no_warning_on_loopback)
{
    char *conf = ht_asprintf("listen = \"%s\"\n", loopback[_i]);
    char line[1024];
    ck_assert_msg(warnings(conf, "", line, sizeof(line)) == 0, "listen %s: %s", loopback[_i],
                  line);
    free(conf);
}
END_TEST

static Suite *service_suite(void)
{
    Suite *s = suite_create("service");
    TCase *tc = tcase_create("install");
    tcase_add_test(tc, install_tree);
    tcase_add_test(tc, install_keeps_edited_conf);
    tcase_add_test(tc, uninstall_keeps_conf);
    tcase_add_test(tc, install_without_binary);
    tcase_add_test(tc, unit_sandbox_and_limits);
    suite_add_tcase(s, tc);

    tc = tcase_create("root_warning");
    tcase_add_test(tc, warn_root_wildcard_conf);
    tcase_add_test(tc, warn_root_wildcard_option);
    tcase_add_test(tc, warn_root_wildcard_ipv6);
    tcase_add_test(tc, warn_root_once_with_workers);
    tcase_add_test(tc, no_warning_with_api_key);
    tcase_add_loop_test(tc, no_warning_on_loopback, 0,
                        (int)(sizeof(loopback) / sizeof(loopback[0])));
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(service_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
