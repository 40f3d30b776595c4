/* luahub: command line, conf loading, signals, the loop. */
#include <arpa/inet.h>
#include <getopt.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "luahub/config.h"
#include "luahub/log.h"
#include "luahub/policy.h"
#include "luahub/registry.h"
#include "luahub/server.h"
#include "luahub/spec.h"
#include "luahub/supervisor.h"
#include "luahub/watchdog.h"

#define DEFAULT_CONF_LOCAL "conf/luahub.conf"
#define DEFAULT_CONF_SYSTEM "/etc/luahub/luahub.conf"
#define WATCHDOG_S 10   /* docs/internals.md: a loop stuck this long is aborted */

static struct hub_server server;
static sigset_t startup_signals;    /* blocked until the loop handles them */
static uv_signal_t sig_term, sig_int, sig_hup;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: luahub [-c FILE] [--listen HOST:PORT] [--check [--strict]] [--version] [-h]\n"
            "       luahub test [-c FILE] [--tap] [--junit FILE] SPEC.lua...  (luahub test -h)\n"
            "\n"
            "  -c, --conf FILE      conf file (default: " DEFAULT_CONF_LOCAL
            ", then " DEFAULT_CONF_SYSTEM ")\n"
            "  -l, --listen H:P     listen address, overrides the conf (port 0 = any free port)\n"
            "  -t, --check          validate the conf and exit: 0 if valid, else 2 with\n"
            "                       every problem as FILE:LINE: message; warnings\n"
            "                       (FILE:LINE: warning: ...) do not fail it\n"
            "      --strict         with --check: warnings fail it too (exit 2)\n"
            "  -v, --version        print the version and exit\n"
            "  -h, --help           this help\n"
            "\n"
            "Signals: SIGTERM/SIGINT shut down gracefully (a second one: at once).\n");
}

static void close_signals(void)
{
    uv_close((uv_handle_t *)&sig_term, NULL);
    uv_close((uv_handle_t *)&sig_int, NULL);
    uv_close((uv_handle_t *)&sig_hup, NULL);
}

static void on_registry_gone(void *ud)
{
    hub_server_stop(ud);
    close_signals();
}

/* Every client is gone (or shutdown_timeout passed): take this instance out
 * of the registry (bounded), then stop. */
static void on_shutdown_done(struct hub_server *srv)
{
    if (srv->registry)
        hub_registry_shutdown(srv->registry, on_registry_gone, srv);
    else
        on_registry_gone(srv);
}

static void on_signal(uv_signal_t *h, int signum)
{
    if (signum == SIGHUP) {
        hub_log(HUB_LOG_INFO, "SIGHUP: reloading the conf and the policy");
        hub_server_reload_policy(&server, NULL);
        return;
    }
    hub_log(HUB_LOG_INFO, "%s received", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    hub_server_shutdown(&server, on_shutdown_done);
}

static const char *find_conf(void)
{
    if (access(DEFAULT_CONF_LOCAL, F_OK) == 0)
        return DEFAULT_CONF_LOCAL;
    if (access(DEFAULT_CONF_SYSTEM, F_OK) == 0)
        return DEFAULT_CONF_SYSTEM;
    return NULL;
}

/* 1 when the listen host is reachable from this machine only: 127.0.0.0/8,
 * ::1 (or ::ffff:127.x.y.z), "localhost", or a loopback interface ("lo"). */
static int host_is_loopback(const char *host)
{
    struct in_addr a4;
    struct in6_addr a6;
    struct ifaddrs *ifs;
    int lo = 0;

    if (!strcmp(host, "localhost"))
        return 1;
    if (inet_pton(AF_INET, host, &a4) == 1)
        return ntohl(a4.s_addr) >> 24 == 127;
    if (inet_pton(AF_INET6, host, &a6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&a6) || (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
    if (getifaddrs(&ifs) < 0)
        return 0;
    for (struct ifaddrs *i = ifs; i; i = i->ifa_next)
        lo |= !strcmp(i->ifa_name, host) && (i->ifa_flags & IFF_LOOPBACK);
    freeifaddrs(ifs);
    return lo;
}

/* Root, the network and no api_key: say what that exposes, once the port
 * is bound, once per hub (docs/operations.md, "Running as root"). */
static void warn_if_exposed(const struct hub_config *cfg)
{
    if (geteuid() != 0 || cfg->api_key || host_is_loopback(cfg->listen_host))
        return;
    hub_log(HUB_LOG_WARN,
            "running as root on %s (not a loopback address) with no api_key: a root process "
            "parses what the network sends, and the HTTP API (/api/*, /metrics) obeys every "
            "local process and whatever a proxy on this host forwards, without a key; set "
            "api_key and run as an unprivileged user (docs/operations.md)",
            cfg->listen);
}

/* The watchdog's timeout: WATCHDOG_S, or twice the longest a policy call
 * may run if that is longer (a huge lua_max_instructions). */
static unsigned watchdog_s(const struct hub_config *cfg)
{
    uint64_t call_s = (hub_policy_time_limit_ms(cfg) + 999) / 1000;
    return call_s * 2 > WATCHDOG_S ? (unsigned)(call_s * 2) : WATCHDOG_S;
}

/* Runs one hub (the process itself, or a worker) until it has shut down.
 * Returns the exit status. */
static int run_hub(struct hub_config *cfg, int worker)
{
    struct hub_config_errors errs = {0};
    uv_loop_t loop;
    char tag[32] = "";
    int rc = 0;

    if (worker) {
        snprintf(tag, sizeof(tag), "worker %d", worker);
        hub_log_set_tag(tag);
    }
    uv_loop_init(&loop);
    uv_signal_init(&loop, &sig_term);
    uv_signal_init(&loop, &sig_int);
    uv_signal_init(&loop, &sig_hup);

    /* The policy is loaded before listening: a hub whose policy does not
     * compile never accepts a connection. */
    if (hub_server_init(&server, &loop, cfg) < 0) {
        rc = 1;
    } else if (hub_server_load_policy(&server, &errs) < 0) {
        for (unsigned i = 0; i < errs.n; i++)
            fprintf(stderr, "%s\n", errs.v[i]);
        fprintf(stderr, "luahub: the policy has %u problem%s, not starting\n", errs.n,
                errs.n == 1 ? "" : "s");
        hub_config_errors_free(&errs);
        rc = 2;
    } else if (hub_server_start(&server) < 0) {
        rc = 1;
    }
    if (rc) {
        hub_server_stop(&server);
        close_signals();
    } else {
        uv_signal_start(&sig_term, on_signal, SIGTERM);
        uv_signal_start(&sig_int, on_signal, SIGINT);
        uv_signal_start(&sig_hup, on_signal, SIGHUP);
        if (!worker)
            warn_if_exposed(cfg);
        int wr = hub_watchdog_start(&loop, watchdog_s(cfg), worker ? tag : NULL);
        if (wr < 0)
            hub_log(HUB_LOG_WARN, "cannot start the watchdog: %s", strerror(-wr));
    }
    /* Blocked since main() (or inherited blocked from the supervisor): a
     * signal that came during start-up is delivered now, to the loop. */
    sigprocmask(SIG_UNBLOCK, &startup_signals, NULL);

    uv_run(&loop, UV_RUN_DEFAULT);
    hub_watchdog_stop();
    uv_run(&loop, UV_RUN_NOWAIT); /* the watchdog timer's close */
    hub_server_free(&server);
    int lc = uv_loop_close(&loop);
    if (lc != 0) {
        hub_log(HUB_LOG_ERROR, "internal: loop still has open handles at exit (%s)",
                uv_strerror(lc));
        rc = 1;
    }
    if (rc == 0)
        hub_log(HUB_LOG_INFO, "bye");
    return rc;
}

static int run_worker(void *ud, unsigned number)
{
    return run_hub(ud, (int)number);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"conf", required_argument, NULL, 'c'},
        {"listen", required_argument, NULL, 'l'},
        {"check", no_argument, NULL, 't'},
        {"strict", no_argument, NULL, 's'},
        {"version", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *conf_path = NULL, *listen = NULL;
    int check = 0, strict = 0, c, rc = 0;
    struct hub_config cfg;
    struct hub_config_errors errs = {0}, warns = {0};

    /* `luahub test ...`: policy specs, a command of its own */
    if (argc >= 2 && !strcmp(argv[1], "test"))
        return hub_spec_main(argc - 1, argv + 1);

    while ((c = getopt_long(argc, argv, "c:l:tvh", opts, NULL)) != -1) {
        switch (c) {
        case 'c': conf_path = optarg; break;
        case 'l': listen = optarg; break;
        case 't': check = 1; break;
        case 's': strict = 1; break;
        case 'v': printf("luahub %s\n", HUB_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (strict && !check) {
        fprintf(stderr, "luahub: --strict goes with --check\n");
        usage(stderr);
        return 2;
    }
    if (optind < argc) {
        fprintf(stderr, "luahub: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    hub_config_defaults(&cfg);
    if (!conf_path)
        conf_path = find_conf();
    if (!conf_path) {
        fprintf(stderr, "luahub: no conf file: pass -c FILE (looked for %s and %s)\n",
                DEFAULT_CONF_LOCAL, DEFAULT_CONF_SYSTEM);
        hub_config_free(&cfg);
        return 2;
    }
    /* The policy is compiled here only for --check: at start hub_policy_new
     * reports the same FILE:LINE problems (and runs its main chunk once). */
    if (hub_config_load(&cfg, conf_path, &errs) < 0 ||
        (check && hub_policy_check(&cfg, &errs, &warns) < 0) || (strict && warns.n)) {
        for (unsigned i = 0; i < errs.n; i++)
            fprintf(stderr, "%s\n", errs.v[i]);
        for (unsigned i = 0; i < warns.n; i++)
            fprintf(stderr, "%s\n", warns.v[i]);
        if (errs.n)
            fprintf(stderr, "luahub: %s: %u problem%s, not starting\n", conf_path, errs.n,
                    errs.n == 1 ? "" : "s");
        else
            fprintf(stderr, "luahub: %s: %u warning%s (--strict makes them errors)\n",
                    conf_path, warns.n, warns.n == 1 ? "" : "s");
        hub_config_errors_free(&errs);
        hub_config_errors_free(&warns);
        hub_config_free(&cfg);
        return 2;
    }
    for (unsigned i = 0; i < warns.n; i++)
        fprintf(stderr, "%s\n", warns.v[i]);
    if (listen) {
        char err[256];
        cfg.listen_set = true;
        if (hub_config_set_listen(&cfg, listen, err, sizeof(err)) < 0) {
            fprintf(stderr, "luahub: --listen %s: %s\n", listen, err);
            hub_config_errors_free(&warns);
            hub_config_free(&cfg);
            return 2;
        }
    }
    if (check) {
        if (warns.n)
            printf("%s: ok, %u warning%s\n", conf_path, warns.n, warns.n == 1 ? "" : "s");
        else
            printf("%s: ok\n", conf_path);
        hub_config_errors_free(&warns);
        hub_config_free(&cfg);
        return 0;
    }

    hub_log_set_level(cfg.log_level);
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&startup_signals);
    sigaddset(&startup_signals, SIGTERM);
    sigaddset(&startup_signals, SIGINT);
    sigaddset(&startup_signals, SIGHUP);
    sigaddset(&startup_signals, SIGCHLD);
    sigprocmask(SIG_BLOCK, &startup_signals, NULL);
    unsigned workers = cfg.workers ? cfg.workers : (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
    if (workers <= 1) {
        rc = run_hub(&cfg, 0);
    } else {
        /* Workers share one port: with port 0, pick it here, once. */
        int held = hub_listener_reserve_port(&cfg);
        if (held < 0) {
            rc = 1;
        } else {
            warn_if_exposed(&cfg);
            /* Workers wait up to shutdown_timeout for their clients; a
             * few seconds more for their own teardown (Redis, registry). */
            rc = hub_supervise(workers, run_worker, &cfg,
                               (cfg.shutdown_timeout + 5u) * 1000u);
            close(held);
        }
    }
    hub_config_free(&cfg);
    return rc;
}
