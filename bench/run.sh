#!/usr/bin/env bash
# bench/run.sh: luahub's standard benchmark (issue 5), optionally side by side
# with Nchan, plus luahub's own feature scenarios (Lua hooks, redis broker,
# workers, scaling, scale-out, channels, history, recovery, presence). Builds luahub and loadgen, starts each server
# fresh for every run (pinned to CPU 0, loadgen on CPU 1), runs every
# scenario N times (3), takes medians and writes a markdown table to
# bench/results/<date>.md (raw JSON next to it) and prints it. See
# bench/README.md for what the numbers mean.
#
#   bench/run.sh [--compare] [--quick] [--only NAME[,NAME]] [--runs N]
#                [--targets luahub,nchan] [--build DIR] [--no-build]
#
# --compare   also run Nchan (nginx-light + libnginx-mod-nchan from Debian;
#             installed with apt-get if missing) and print luahub/Nchan ratios
#             (standard scenarios), and the Nchan variants of the feature
#             scenarios that have them (broker_ws broker_http scaleout:
#             Nchan with its Redis storage)
# --quick     small sizes, one run: a smoke test, not a measurement
# --only      scenarios to run. Standard: burst_ws burst_http burst_http_5000
#             rate rate_http flow_ws ping_fanout idle connrate. Features:
#             hook_publish hook_connect broker_ws broker_http workers pacing
#             scale scaleout channels history_ws history_http recovery_storm
#             presence
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${BUILD:-$ROOT/build}
COMPARE=0 QUICK=0 ONLY="" RUNS="" TARGETS="" NO_BUILD=0
ARGV_TEXT="bench/run.sh $*"
NCHAN_MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so
POLICIES=$ROOT/bench/policies

die() { echo "run.sh: $*" >&2; exit 2; }
log() { echo "run.sh: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --compare) COMPARE=1 ;;
        --quick) QUICK=1 ;;
        --only) [ $# -ge 2 ] || die "--only needs a scenario name"; ONLY="$ONLY,$2"; shift ;;
        --runs) [ $# -ge 2 ] || die "--runs needs a number"; RUNS=$2; shift ;;
        --targets) [ $# -ge 2 ] || die "--targets needs a list"; TARGETS=$2; shift ;;
        --build) [ $# -ge 2 ] || die "--build needs a directory"; BUILD=$2; shift ;;
        --no-build) NO_BUILD=1 ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

# ---- scenarios --------------------------------------------------------------
# name|kind|title|loadgen arguments|--quick arguments|--quick title.
# Payloads: 100 B. kind "std": run against each target (luahub, Nchan);
# kind "var": luahub only, once per variant (VARIANTS below), side by side.
# Burst sizes: at least ~1 M deliveries, so that luahub's CPU (10 ms ticks,
# ~0.4 µs per delivery) is measured to a few per cent; 5 M for the on_publish
# cost, whose target is 5 %.
SCENARIOS=(
"burst_ws|std|burst, 1000 subs on 10 channels, WebSocket publisher|--mode fanout --subs 1000 --channels 10 --burst 2000 --pub ws --window 64|--mode fanout --subs 200 --channels 10 --burst 20 --pub ws --window 64|burst, 200 subs on 10 channels, WebSocket publisher"
"burst_http|std|burst, 1000 subs on 10 channels, HTTP publisher (4 keep-alive)|--mode fanout --subs 1000 --channels 10 --burst 1000 --pub http --pub-conns 4|--mode fanout --subs 200 --channels 10 --burst 20 --pub http --pub-conns 4|burst, 200 subs on 10 channels, HTTP publisher (4 keep-alive)"
"burst_http_5000|std|burst, 5000 subs on 1 channel, HTTP publisher (4 keep-alive)|--mode fanout --subs 5000 --channels 1 --burst 300 --pub http --pub-conns 4|--mode fanout --subs 500 --channels 1 --burst 20 --pub http --pub-conns 4|burst, 500 subs on 1 channel, HTTP publisher (4 keep-alive)"
"rate|std|open loop, 1000 publishes/s over 10 channels, 1000 subs (100k deliveries/s)|--mode fanout --subs 1000 --channels 10 --rate 1000 --duration 10 --pub ws --window 1000|--mode fanout --subs 200 --channels 10 --rate 200 --duration 2 --pub ws --window 1000|open loop, 200 publishes/s over 10 channels, 200 subs"
"rate_http|std|open loop over the HTTP API: 1000 publishes/s (64 keep-alive publishers) over 10 channels, 1000 subs|--mode fanout --subs 1000 --channels 10 --rate 1000 --duration 10 --pub http --pub-conns 64|--mode fanout --subs 200 --channels 10 --rate 200 --duration 2 --pub http --pub-conns 16|open loop over the HTTP API: 200 publishes/s (16 publishers), 200 subs"
"flow_ws|std|flow-controlled burst: 1000 subs on 10 channels, 200 publishes per channel, at most 64 not yet delivered to every subscriber|--mode fanout --subs 1000 --channels 10 --burst 200 --pub ws --flow 64|--mode fanout --subs 200 --channels 10 --burst 20 --pub ws --flow 64|flow-controlled burst: 200 subs on 10 channels, 20 per channel, flow 64"
"ping_fanout|std|responsiveness: 15,000 subs on 1 channel, burst of 100 (WebSocket publisher, window 64), a probe every 5 ms|--mode fanout --subs 15000 --channels 1 --burst 100 --pub ws --window 64 --procs 2 --probe-ms 5|--mode fanout --subs 1500 --channels 1 --burst 50 --pub ws --window 64 --procs 2 --probe-ms 5|responsiveness: 1,500 subs on 1 channel, burst of 50, a probe every 5 ms"
"idle|std|idle, 15,000 subscribed connections|--mode idle --conns 15000 --channels 10 --hold 10|--mode idle --conns 1000 --channels 10 --hold 1|idle, 1,000 subscribed connections"
"connrate|std|connect + upgrade + subscribe + close, 50 in flight|--mode connrate --count 10000 --inflight 50 --channels 10|--mode connrate --count 1000 --inflight 50 --channels 10|connect + upgrade + subscribe + close, 50 in flight (1,000)"
"hook_publish|var|Lua on_publish cost: burst, 1000 subs on 10 channels, WebSocket publisher|--mode fanout --subs 1000 --channels 10 --burst 5000 --pub ws --window 64|--mode fanout --subs 200 --channels 10 --burst 20 --pub ws --window 64|Lua on_publish cost: burst, 200 subs on 10 channels"
"hook_connect|var|Lua on_connect cost: connect + upgrade + subscribe + close, 50 in flight|--mode connrate --count 10000 --inflight 50 --channels 10|--mode connrate --count 1000 --inflight 50 --channels 10|Lua on_connect cost: connrate (1,000)"
"broker_ws|var|redis broker: burst, 1000 subs on 10 channels, WebSocket publisher|--mode fanout --subs 1000 --channels 10 --burst 2000 --pub ws --window 64|--mode fanout --subs 200 --channels 10 --burst 20 --pub ws --window 64|redis broker: burst, 200 subs on 10 channels, WebSocket publisher"
"broker_http|var|redis broker: burst, 1000 subs on 10 channels, HTTP publisher (4 keep-alive)|--mode fanout --subs 1000 --channels 10 --burst 1000 --pub http --pub-conns 4|--mode fanout --subs 200 --channels 10 --burst 20 --pub http --pub-conns 4|redis broker: burst, 200 subs on 10 channels, HTTP publisher"
"workers|var|workers: burst, 1000 subs on 10 channels, WebSocket publisher, nothing pinned|--mode fanout --subs 1000 --channels 10 --burst 2000 --pub ws --window 64|--mode fanout --subs 200 --channels 10 --burst 20 --pub ws --window 64|workers: burst, 200 subs on 10 channels, nothing pinned"
"pacing|var|write pacing: open loop, 1000 publishes/s over 10 channels, 1000 subs|--mode fanout --subs 1000 --channels 10 --rate 1000 --duration 10 --pub ws --window 1000|--mode fanout --subs 200 --channels 10 --rate 200 --duration 2 --pub ws --window 1000|write pacing: open loop, 200 publishes/s"
"scale|var|scaling: N subscribers on 1 channel, HTTP publisher (4 keep-alive), ~1.5 M deliveries|--mode fanout --channels 1 --pub http --pub-conns 4 --procs 2|--mode fanout --channels 1 --pub http --pub-conns 4 --procs 2|scaling: N subscribers on 1 channel, HTTP publisher (small)"
"scaleout|var|scale on one box: 36,000 or 100,000 subs on 1000 channels, 2,000 HTTP publishes/s (64 keep-alive) for 10 s, redis, nothing pinned|--mode fanout --channels 1000 --rate 2000 --duration 10 --pub http --pub-conns 64 --bind-src 127.0.0.2 --timeout 180 --drain 30|--mode fanout --channels 100 --rate 200 --duration 2 --pub http --pub-conns 16 --bind-src 127.0.0.2|scale on one box (small: 600 or 1,200 subs, see the subscribed column): 100 channels, 200 HTTP publishes/s for 2 s, redis, nothing pinned"
"channels|var|memory with many channels: 10,000 idle subscribed connections|--mode idle --conns 10000 --hold 5|--mode idle --conns 1000 --hold 1|memory with many channels: 1,000 idle subscribed connections"
"history_ws|var|history on / off: burst, 1000 subs on 10 channels, WebSocket publisher|--mode fanout --subs 1000 --channels 10 --burst 2000 --pub ws --window 64|--mode fanout --subs 200 --channels 10 --burst 20 --pub ws --window 64|history on / off: burst, 200 subs on 10 channels, WebSocket publisher"
"history_http|var|history on / off: burst, 1000 subs on 10 channels, HTTP publisher (4 keep-alive)|--mode fanout --subs 1000 --channels 10 --burst 1000 --pub http --pub-conns 4|--mode fanout --subs 200 --channels 10 --burst 20 --pub http --pub-conns 4|history on / off: burst, 200 subs on 10 channels, HTTP publisher"
"recovery_storm|var|recovery storm: 5,000 subs on 10 history channels leave, 100 HTTP publishes per channel, all reconnect with recover (500 connects in flight)|--mode recover --subs 5000 --channels 10 --burst 100 --pub http --pub-conns 4 --connect-inflight 500|--mode recover --subs 500 --channels 10 --burst 100 --pub http --pub-conns 4 --connect-inflight 500|recovery storm (small): 500 subs on 10 history channels, 100 publishes per channel"
"presence|var|presence: 15,000 subscribed connections on 10 channels, held 10 s (redis: 20 s, one refresh period)|--mode idle --conns 15000 --channels 10 --hold 10|--mode idle --conns 500 --channels 10 --hold 2|presence (small): 500 subscribed connections on 10 channels, held 2 s, presence_ttl = 3"
)

# Variants of the "var" scenarios, one per line:
# name|label|server spec|extra loadgen arguments|extra --quick arguments
# Server spec (space-separated): policy=FILE (in bench/policies),
# broker=redis (a redis-server started for the run; for Nchan its Redis
# storage), policy_redis (a redis-server started for the run, as the conf's
# policy_redis: hub.redis with the memory broker), hubs=N (N luahub
# processes on the same redis; subscribers spread over them, publisher on
# the first), workers=N (Nchan: worker_processes), delay=MS (the conf key
# write_delay), pin=none (nothing pinned: server, redis, loadgen),
# target=nchan (the variant runs Nchan, only with --compare or --targets
# nchan), history=N / presence=on / join_leave=on (the conf's channels:
# ["bench:*"] gets history_size = N, presence, join_leave with presence),
# presence_ttl=S.
# The first variant is the baseline the others are compared with. Loadgen's
# later arguments override earlier ones.
variants_of() {
    case $1 in
        hook_publish) cat <<'EOF'
none|no policy||
true|on_publish returns true|policy=publish_true.lua|
transform|on_publish reads msg.data, adds a field, returns {channel, data}|policy=publish_transform.lua|
ratelimit|on_publish: hub.ratelimit (per process), returns true|policy=publish_ratelimit.lua|
ratelimit_redis|on_publish: hub.ratelimit_redis (a Redis script per publish, policy_redis), returns true|policy=publish_ratelimit_redis.lua policy_redis|
EOF
        ;;
        hook_connect) cat <<'EOF'
none|no policy||
true|on_connect returns true|policy=connect_true.lua|
redis_get|on_connect checks a session with one hub.redis GET (policy_redis)|policy=connect_redis_get.lua policy_redis|
EOF
        ;;
        broker_ws|broker_http) cat <<'EOF'
memory|memory broker, 1 process||
redis|redis broker, 1 process|broker=redis|
EOF
        [ "$1" = broker_ws ] && cat <<'EOF'
redis2|redis broker, 2 processes: publisher on A, subscribers half on A, half on B|broker=redis hubs=2|
EOF
        cat <<'EOF'
nchan|Nchan, memory store, 1 worker|target=nchan|
nchan_redis|Nchan, Redis storage, 1 worker|target=nchan broker=redis|
EOF
        ;;
        workers) cat <<'EOF'
memory1|memory broker, workers = 1|pin=none|
redis1|redis broker, workers = 1|broker=redis pin=none|
redis2|redis broker, workers = 2|broker=redis workers=2 pin=none|
EOF
        ;;
        pacing) cat <<'EOF'
adaptive|write_delay = 0 (adaptive, the default)||
d5|write_delay = 5|delay=5|
d10|write_delay = 10|delay=10|
EOF
        ;;
        scale) cat <<'EOF'
1000|1,000 subscribers||--subs 1000 --burst 1500|--subs 100 --burst 50
5000|5,000 subscribers||--subs 5000 --burst 300|--subs 500 --burst 10
15000|15,000 subscribers||--subs 15000 --burst 100|--subs 1500 --burst 4
EOF
        ;;
        scaleout) cat <<'EOF'
hub100k|luahub, workers = 6 (100,000 subscribers; 8 loadgen processes)|broker=redis workers=6 pin=none|--subs 100000 --procs 8|--subs 1200 --procs 2
hub36k|luahub, workers = 2 (36,000 subscribers; 4 loadgen processes)|broker=redis workers=2 pin=none|--subs 36000 --procs 4|--subs 600 --procs 2
nchan36k|Nchan, 2 workers, Redis storage (36,000 subscribers; 4 loadgen processes)|target=nchan broker=redis workers=2 pin=none|--subs 36000 --procs 4|--subs 600 --procs 2
EOF
        ;;
        channels) cat <<'EOF'
ch10|on 10 channels (1,000 subscribers each)||--channels 10|--channels 10
ch10000|on 10,000 channels (1 subscriber each)||--channels 10000|--channels 1000
EOF
        ;;
        history_ws|history_http) cat <<'EOF'
memory|memory broker, history off||
memory_hist|memory broker, history on (history_size = 100)|history=100|
redis|redis broker, history off|broker=redis|
redis_hist|redis broker, history on (history_size = 100)|broker=redis history=100|
EOF
        ;;
        recovery_storm) cat <<'EOF'
memory|memory broker, history_size = 100|history=100|
redis|redis broker, history_size = 100|broker=redis history=100|
EOF
        ;;
        presence)
        # The redis variants hold one presence refresh period (presence_ttl
        # / 3: 20 s at the default 60); --quick refreshes every second.
        local ttl="" hold="--hold 20"
        [ $QUICK = 1 ] && ttl=" presence_ttl=3" hold=""
        cat <<EOF
none|memory broker, no presence||
presence|memory broker, presence = true|presence=on|
join_leave|memory broker, presence = true, join_leave = true|join_leave=on|--expect-joins|--expect-joins
redis|redis broker, no presence|broker=redis$ttl|$hold|
redis_presence|redis broker, presence = true|broker=redis presence=on$ttl|$hold|
redis_join_leave|redis broker, presence = true, join_leave = true|broker=redis join_leave=on$ttl|$hold --expect-joins|--expect-joins
EOF
        ;;
    esac
}

ALL_NAMES=$(for s in "${SCENARIOS[@]}"; do printf '%s ' "${s%%|*}"; done)
# First on loadgen's command line: a scenario's own arguments override them.
COMMON_ARGS="--size 100 --timeout 60 --drain 15"

[ -n "$RUNS" ] || { [ $QUICK = 1 ] && RUNS=1 || RUNS=3; }
case "$RUNS" in ''|*[!0-9]*) die "--runs: not a number: $RUNS" ;; esac
[ "$RUNS" -ge 1 ] && [ "$RUNS" -le 20 ] || die "--runs: 1..20"
[ -n "$TARGETS" ] || { [ $COMPARE = 1 ] && TARGETS=luahub,nchan || TARGETS=luahub; }
for t in ${TARGETS//,/ }; do
    case "$t" in luahub|nchan) ;; *) die "--targets: luahub and/or nchan, not '$t'" ;; esac
done
has_target() { [[ ",$TARGETS," == *",$1,"* ]]; }
spec_target() { [[ " $1 " == *" target=nchan "* ]] && echo nchan || echo luahub; }
# The variants of scenario $1 whose server is one of --targets.
variants_to_run() {
    local line spec
    while IFS= read -r line; do
        IFS='|' read -r _ _ spec _ <<<"$line"
        if has_target "$(spec_target "$spec")"; then printf '%s\n' "$line"; fi
    done < <(variants_of "$1")
}

if [ -n "$ONLY" ]; then
    for n in ${ONLY//,/ }; do
        [[ " $ALL_NAMES" == *" $n "* ]] || die "--only: unknown scenario '$n' ($ALL_NAMES)"
    done
fi
SELECTED=()
for s in "${SCENARIOS[@]}"; do
    IFS='|' read -r name kind _ <<<"$s"
    if [ -n "$ONLY" ] && [[ "$ONLY," != *",$name,"* ]]; then continue; fi
    if [ "$kind" = var ] && [ -z "$(variants_to_run "$name")" ]; then
        [ -n "$ONLY" ] && log "$name: no variant for --targets $TARGETS, skipped"
        continue
    fi
    SELECTED+=("$s")
done
[ ${#SELECTED[@]} -gt 0 ] || die "no scenario selected"
needs_redis=0
for s in "${SELECTED[@]}"; do
    IFS='|' read -r name kind _ <<<"$s"
    # Not grep -q: with pipefail, its early exit would fail the pipeline (SIGPIPE).
    [ "$kind" = var ] && variants_to_run "$name" | grep 'broker=redis' >/dev/null && needs_redis=1
done

# ---- preconditions -----------------------------------------------------------
command -v taskset >/dev/null || die "taskset (util-linux) is required"
if [ $needs_redis = 1 ]; then
    command -v redis-server >/dev/null ||
        die "redis-server is required for the broker scenarios (apt-get install redis-server, or make test's set-up)"
fi
NCPU=$(nproc)
if [ "$NCPU" -ge 2 ]; then
    PIN_SERVER="taskset -c 0" PIN_CLIENT="taskset -c 1" CORE_ARGS="--server-core 0"
else
    log "warning: one CPU only: server and client are not pinned apart; numbers are not comparable"
    PIN_SERVER="" PIN_CLIENT="" CORE_ARGS=""
fi

# One benchmark at a time on this machine: they would measure each other.
exec 9>"${TMPDIR:-/tmp}/luahub-bench.lock"
flock -n 9 || die "another bench/run.sh is running"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/luahub-bench.XXXXXX")
SERVER_PID="" SERVER_KIND="" NGINX_WORKERS="" HUB_PIDS=() REDIS_PID=""
cleanup() {
    if declare -F stop_server >/dev/null; then stop_server || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The machine's state before we add to it (our own build included).
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# user+nice+system+irq+softirq of every CPU (a process's stime includes the
# softirq work done in its context, which /proc/stat books apart), and steal.
cpu_ticks_all() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $9 }' /proc/stat; }
children_cpu_s() { # VAR: user+system of this shell's reaped children, seconds
    # `times` must run in this shell, not in a pipeline or $(...) subshell.
    times >"$WORK/times"
    printf -v "$1" '%s' "$(sed -n 2p "$WORK/times" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); s += a[1] * 60 + a[2] } print s }')"
}

# ---- build ---------------------------------------------------------------------
LOADGEN=$BUILD/bench/loadgen
LUAHUB=$BUILD/luahub
if [ $NO_BUILD = 0 ]; then
    targets=(loadgen)
    has_target luahub && targets+=(luahub)
    if [ ! -f "$BUILD/CMakeCache.txt" ]; then
        cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null || die "cmake configure failed"
    fi
    cmake --build "$BUILD" --target "${targets[@]}" -j "$NCPU" >"$WORK/build.log" 2>&1 ||
        { tail -20 "$WORK/build.log" >&2; die "build failed (log above)"; }
fi
[ -x "$LOADGEN" ] || die "no loadgen at $LOADGEN (build it, or pass --build DIR)"
if has_target luahub; then
    [ -x "$LUAHUB" ] || die "no luahub at $LUAHUB"
fi
# Run private copies: the build directory may be shared with someone who
# rebuilds it mid-run, and every run of the set must measure the same binary.
cp "$LOADGEN" "$WORK/loadgen" && LOADGEN=$WORK/loadgen
if has_target luahub; then
    LUAHUB_BUILT=$(date -u -r "$LUAHUB" '+%Y-%m-%d %H:%M UTC')
    cp "$LUAHUB" "$WORK/luahub" && LUAHUB=$WORK/luahub
    # A binary from before the per-connection rate limits (an A/B against an
    # old commit, --build) does not know their keys: leave them out for it.
    printf 'command_rate = 0\npublish_rate = 0\n' >"$WORK/ratekeys.conf"
    RATE_KEYS=1
    "$LUAHUB" -c "$WORK/ratekeys.conf" --check >/dev/null 2>&1 || RATE_KEYS=0
    DIRTY=$(git -C "$ROOT" status --porcelain --untracked-files=no -- src include lua CMakeLists.txt 2>/dev/null | awk '{print $2}' | paste -sd' ' - || true)
fi

# ---- Nchan install -----------------------------------------------------------
ensure_nchan() {
    if command -v nginx >/dev/null && [ -f "$NCHAN_MODULE" ]; then return 0; fi
    log "installing nginx-light and libnginx-mod-nchan with apt-get"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    # Keep the package's own nginx service from starting (Debian's
    # policy-rc.d mechanism), and disable it afterwards: only our own
    # nginx, on our own conf and port, may run.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light libnginx-mod-nchan >"$WORK/apt.log" 2>&1 || rc=$?
    if [ $rc != 0 ]; then
        $sudo apt-get update -q >/dev/null 2>&1 || true
        rc=0
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light libnginx-mod-nchan >"$WORK/apt.log" 2>&1 || rc=$?
    fi
    [ $made_policy = 1 ] && $sudo rm -f /usr/sbin/policy-rc.d
    [ $rc = 0 ] || { tail -5 "$WORK/apt.log" >&2; die "apt-get install failed"; }
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
    [ -f "$NCHAN_MODULE" ] || die "no Nchan module at $NCHAN_MODULE after install"
}
has_target nchan && ensure_nchan

# ---- servers ---------------------------------------------------------------------
wait_gone() { # pid seconds
    local i
    for ((i = 0; i < $2 * 20; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done
    return 1
}

free_port() { # a free TCP port below the ephemeral range
    local p i
    for ((i = 0; i < 50; i++)); do
        p=$((20000 + RANDOM % 12000))
        if command -v ss >/dev/null; then
            ss -Htan "sport = :$p" 2>/dev/null | grep . >/dev/null && continue
        fi
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
        echo "$p"; return 0
    done
    die "no free port found"
}

# A redis-server of our own for one run: loopback, a probed free port, no
# persistence, Debian's defaults otherwise; stopped by PID.
start_redis() { # pin-command
    local pin=$1 dir=$WORK/redis attempt i
    for ((attempt = 0; attempt < 5; attempt++)); do
        rm -rf "$dir"; mkdir -p "$dir"
        local port; port=$(free_port)
        (cd "$dir" && exec $pin redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
            --dir "$dir" --logfile "$dir/redis.log") >/dev/null 2>&1 &
        REDIS_PID=$!
        for ((i = 0; i < 100; i++)); do
            kill -0 "$REDIS_PID" 2>/dev/null || break
            if grep -q "Ready to accept connections" "$dir/redis.log" 2>/dev/null; then
                REDIS_PORT=$port
                return 0
            fi
            sleep 0.05
        done
        stop_redis
        grep -q "Address already in use" "$dir/redis.log" 2>/dev/null ||
            { tail -5 "$dir/redis.log" >&2 2>/dev/null; die "redis-server did not start (log above)"; }
    done
    die "redis-server: no free port after 5 attempts"
}

stop_redis() {
    [ -n "$REDIS_PID" ] || return 0
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    wait_gone "$REDIS_PID" 10 || kill -KILL "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=""
}

# server_prepare SPEC: see variants_of for SPEC. Sets SP_POLICY, SP_BROKER,
# SP_PREDIS, SP_HUBS, SP_WORKERS, SP_DELAY, SP_CHANNELS (", option = value"
# for the bench channels), SP_PTTL, the pinning of this run (SP_PIN for the
# server and redis, RUN_PIN_CLIENT, RUN_CORE_ARGS) and starts the run's
# redis-server when the spec has one (AUX_PIDS).
server_prepare() {
    local tok
    SP_POLICY="" SP_BROKER="" SP_PREDIS=0 SP_HUBS=1 SP_WORKERS=1 SP_DELAY=0 SP_CHANNELS=""
    SP_PTTL=""
    SP_PIN=$PIN_SERVER RUN_PIN_CLIENT=$PIN_CLIENT RUN_CORE_ARGS=$CORE_ARGS
    for tok in ${1:-}; do
        case $tok in
            policy=*) SP_POLICY=$POLICIES/${tok#policy=} ;;
            broker=redis) SP_BROKER=redis ;;
            policy_redis) SP_PREDIS=1 ;;
            hubs=*) SP_HUBS=${tok#hubs=} ;;
            workers=*) SP_WORKERS=${tok#workers=} ;;
            delay=*) SP_DELAY=${tok#delay=} ;;
            history=*) SP_CHANNELS="$SP_CHANNELS, history_size = ${tok#history=}" ;;
            presence=on) SP_CHANNELS="$SP_CHANNELS, presence = true" ;;
            join_leave=on) SP_CHANNELS="$SP_CHANNELS, presence = true, join_leave = true" ;;
            presence_ttl=*) SP_PTTL=${tok#presence_ttl=} ;;
            pin=none) SP_PIN="" RUN_PIN_CLIENT="" RUN_CORE_ARGS="" ;;
            target=*) ;;
            *) die "bad server spec '$tok'" ;;
        esac
    done
    [ -z "$SP_POLICY" ] || [ -f "$SP_POLICY" ] || die "no policy $SP_POLICY"
    SUB_PORTS="" AUX_PIDS=""
    if [ "$SP_BROKER" = redis ] || [ "$SP_PREDIS" = 1 ]; then
        start_redis "$SP_PIN"
        AUX_PIDS=$REDIS_PID
    fi
}

# start_luahub [SPEC]: sets SERVER_PORT (the publishers' hub), SUB_PORTS
# (every hub's port, when several), SERVER_PIDS (what to meter: every hub
# process, a supervisor and its workers), AUX_PIDS (redis-server) and the
# pinning for this run.
start_luahub() {
    server_prepare "${1:-}"
    local policy=$SP_POLICY broker=$SP_BROKER predis=$SP_PREDIS hubs=$SP_HUBS workers=$SP_WORKERS
    local delay=$SP_DELAY
    local pin_srv=$SP_PIN
    SERVER_KIND=luahub HUB_PIDS=()
    rm -rf "$WORK"/luahub[0-9]* # the previous run's confs and logs
    local h ports=() pids=()
    for ((h = 1; h <= hubs; h++)); do
        local dir=$WORK/luahub$h i port="" ups=0 pups=0 lines=0
        mkdir -p "$dir"
        {
            echo '-- bench/run.sh: defaults, loopback only; the port comes from --listen.'
            echo 'listen = "127.0.0.1:0"'
            echo 'log_level = "info"'
            if [ "$RATE_KEYS" = 1 ]; then
                echo '-- One publisher connection sends tens of thousands of publishes:'
                echo '-- the per-connection limits (1,000/s) would close it with 4029.'
                echo 'command_rate = 0'
                echo 'publish_rate = 0'
            fi
            [ -n "$policy" ] && echo "policy = \"$policy\""
            [ "$broker" = redis ] && echo "broker = \"redis://127.0.0.1:$REDIS_PORT\""
            [ "$predis" = 1 ] && echo "policy_redis = \"redis://127.0.0.1:$REDIS_PORT\""
            [ "$workers" != 1 ] && echo "workers = $workers"
            [ "$delay" != 0 ] && echo "write_delay = $delay"
            [ -n "$SP_CHANNELS" ] && echo "channels = { [\"bench:*\"] = { ${SP_CHANNELS#, } } }"
            [ -n "$SP_PTTL" ] && echo "presence_ttl = $SP_PTTL"
        } >"$dir/luahub.conf"
        : >"$dir/stderr.log"
        $pin_srv "$LUAHUB" -c "$dir/luahub.conf" --listen 127.0.0.1:0 2>>"$dir/stderr.log" >/dev/null &
        local pid=$!
        HUB_PIDS+=("$pid")
        # Ready: every worker listens and, with redis, reports "broker up".
        for ((i = 0; i < 200; i++)); do
            lines=$(grep -c 'listening on 127\.0\.0\.1:' "$dir/stderr.log" || true)
            ups=$(grep -c 'broker up' "$dir/stderr.log" || true)
            pups=$(grep -c 'policy_redis up' "$dir/stderr.log" || true)
            if [ "$lines" -ge "$workers" ] && { [ "$broker" != redis ] || [ "$ups" -ge "$workers" ]; } &&
                { [ "$predis" = 0 ] || [ "$pups" -ge "$workers" ]; }; then
                port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$dir/stderr.log" | head -1)
                break
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        if [ -z "$port" ]; then
            tail -5 "$dir/stderr.log" >&2
            stop_server
            die "luahub did not start (log above)"
        fi
        ports+=("$port")
        pids+=("$pid")
        if [ "$workers" != 1 ]; then
            local kids
            kids=$(pgrep -P "$pid" | paste -sd, -)
            [ "$(tr ',' '\n' <<<"$kids" | grep -c .)" = "$workers" ] ||
                { stop_server; die "expected $workers workers under $pid, found '$kids'"; }
            pids+=("$kids")
        fi
    done
    SERVER_PID=${HUB_PIDS[0]}
    SERVER_PORT=${ports[0]}
    SERVER_PIDS=$(IFS=,; echo "${pids[*]}")
    [ "$hubs" -gt 1 ] && SUB_PORTS=$(IFS=,; echo "${ports[*]}")
    return 0
}

# A publish Nchan accepts (2xx): with Redis storage, once it is connected.
nchan_publishes() { # port
    local reply
    reply=$(exec 3<>"/dev/tcp/127.0.0.1/$1" &&
        printf 'POST /pub/bench:ready HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx' >&3 &&
        timeout 2 head -c 12 <&3) 2>/dev/null || return 1
    [[ "$reply" == "HTTP/1.1 20"* ]]
}

# start_nchan [SPEC]: nginx on bench/nchan.conf.in; SPEC's workers=N (one
# by default) and broker=redis (Nchan's Redis storage, distributed mode, on
# the run's redis-server). Sets SERVER_PORT, SERVER_PIDS (the master and
# its workers), AUX_PIDS.
start_nchan() {
    local dir=$WORK/nchan attempt i
    server_prepare "${1:-}"
    local workers=$SP_WORKERS upstream="" pass="" reuseport=""
    if [ "$SP_BROKER" = redis ]; then
        upstream="upstream bench_redis { nchan_redis_server redis://127.0.0.1:$REDIS_PORT; }"
        pass="nchan_redis_pass bench_redis;"
    fi
    # Several workers: the kernel spreads the connections (SO_REUSEPORT), as
    # it does over luahub's workers; nginx's accept would not balance them.
    [ "$workers" = 1 ] || reuseport=" reuseport"
    for ((attempt = 0; attempt < 5; attempt++)); do
        rm -rf "$dir"; mkdir -p "$dir"
        local port; port=$(free_port)
        sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@MODULE@#$NCHAN_MODULE#g" \
            -e "s#@WORKERS@#$workers#g" -e "s#@REUSEPORT@#$reuseport#g" \
            -e "s|@REDIS_UPSTREAM@|$upstream|g" -e "s|@REDIS_PASS@|$pass|g" \
            "$ROOT/bench/nchan.conf.in" >"$dir/nginx.conf"
        $SP_PIN nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
        SERVER_PID=$! SERVER_KIND=nchan NGINX_WORKERS=""
        for ((i = 0; i < 100; i++)); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            NGINX_WORKERS=$(pgrep -P "$SERVER_PID" | paste -sd, - || true)
            if [ "$(tr ',' '\n' <<<"$NGINX_WORKERS" | grep -c .)" = "$workers" ] &&
                (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null &&
                { [ "$SP_BROKER" != redis ] || nchan_publishes "$port"; }; then
                SERVER_PORT=$port SERVER_PIDS="$SERVER_PID,$NGINX_WORKERS"
                return 0
            fi
            sleep 0.05
        done
        stop_server
        grep -q "Address already in use" "$dir/error.log" "$dir/stdout.log" 2>/dev/null || {
            cat "$dir/error.log" "$dir/stdout.log" >&2 2>/dev/null
            die "nginx did not start (log above)"
        }
    done
    die "nginx: no free port after 5 attempts"
}

stop_server() {
    if [ "$SERVER_KIND" = nchan ] && [ -n "$SERVER_PID" ]; then
        kill -QUIT "$SERVER_PID" 2>/dev/null || true
        wait_gone "$SERVER_PID" 10 || kill -KILL "$SERVER_PID" 2>/dev/null || true
        # Our own workers (children of our master), should they outlive it.
        local w
        for w in ${NGINX_WORKERS//,/ }; do
            if kill -0 "$w" 2>/dev/null; then
                wait_gone "$w" 3 || kill -KILL "$w" 2>/dev/null || true
            fi
        done
        wait "$SERVER_PID" 2>/dev/null || true
    else
        local pid
        # A supervisor forwards SIGTERM to its workers and waits for them.
        for pid in "${HUB_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for pid in "${HUB_PIDS[@]}"; do
            wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        done
    fi
    stop_redis
    SERVER_PID="" NGINX_WORKERS="" HUB_PIDS=()
}

# ---- JSON helpers (flat keys; no jq needed) ------------------------------------
jget() { # json key -> value or null; key "a+b": the sum (a missing b counts 0)
    local v k sum="" x
    if [[ "$2" == *+* ]]; then
        for k in ${2//+/ }; do
            x=$(jget "$1" "$k")
            if [ "$x" = null ]; then [ -z "$sum" ] && [ "$k" = "${2%%+*}" ] && { echo null; return; }; continue; fi
            sum=$(awk -v a="${sum:-0}" -v b="$x" 'BEGIN { print a + b }')
        done
        echo "${sum:-null}"
        return
    fi
    v=$(grep -o "\"$2\":[^,}]*" <<<"$1" | head -1 | cut -d: -f2- | tr -d '"') || true
    echo "${v:-null}"
}

median() { # values... -> median of the numeric ones, or null
    { printf '%s\n' "$@" | grep -E '^-?[0-9.e+-]+$' || true; } | sort -g |
        awk '{a[NR] = $1} END { if (NR == 0) print "null";
             else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

total() { { printf '%s\n' "$@" | grep -E '^[0-9]+$' || true; } | awk '{s += $1} END {print s + 0}'; }

fmt() { # number [decimals] -> with thousands separators
    [ "$1" = null ] && { echo "n/a"; return; }
    awk -v x="$1" -v d="${2:-0}" 'BEGIN {
        s = sprintf("%." d "f", x); neg = (s ~ /^-/); if (neg) s = substr(s, 2)
        i = index(s, "."); ip = i ? substr(s, 1, i - 1) : s; fp = i ? substr(s, i) : ""
        out = ""; while (length(ip) > 3) { out = "," substr(ip, length(ip) - 2) out; ip = substr(ip, 1, length(ip) - 3) }
        print (neg ? "-" : "") ip out fp }'
}

ratio() { # a b -> a/b with 2 decimals, or n/a
    if [ "$1" = null ] || [ "$2" = null ]; then echo "n/a"; return; fi
    awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }'
}

# ---- run ---------------------------------------------------------------------------
STAMP=$(date -u +%Y-%m-%d)
RESDIR=$ROOT/bench/results
mkdir -p "$RESDIR"
BASE=$RESDIR/$STAMP
[ $QUICK = 1 ] && BASE=$BASE-quick
[ -n "$ONLY" ] && [ $QUICK = 0 ] && BASE=$BASE-partial
if [ $QUICK = 0 ] && [ -e "$BASE.md" ]; then # keep earlier runs of the day
    n=2
    while [ -e "$BASE-$n.md" ]; do n=$((n + 1)); done
    BASE=$BASE-$n
fi
RAW=$BASE.jsonl
: >"$RAW"
declare -A R # R[scenario/target-or-variant/run] = JSON line

run_one() { # scenario-args target run name [variant server-spec extra-args]
    local args=$1 target=$2 run=$3 name=$4 variant=${5:-} spec=${6:-} extra=${7:-} out key
    key=$name/${variant:-$target}/$run
    case $target in luahub) start_luahub "$spec" ;; nchan) start_nchan "$spec" ;; esac
    sleep 0.3 # let the fresh server settle before metering it
    local lg_log=$WORK/loadgen.${key//\//.}.log more=""
    [ -n "$SUB_PORTS" ] && more="$more --sub-ports $SUB_PORTS"
    [ -n "$AUX_PIDS" ] && more="$more --aux-pid $AUX_PIDS"
    [ -n "$REDIS_PID" ] && more="$more --redis-port $REDIS_PORT"
    out=$(timeout 900 $RUN_PIN_CLIENT "$LOADGEN" $COMMON_ARGS $args $extra --target "$target" \
          --port "$SERVER_PORT" --server-pid "$SERVER_PIDS" $more $RUN_CORE_ARGS --label "$key" \
          2>"$lg_log" | tail -1) || true
    stop_server
    if [ -z "$out" ] || [[ "$out" != "{"* ]]; then
        log "$key: no result"; tail -3 "$lg_log" >&2 || true
        out='{"error":"no result"}'
    fi
    # Anything the hubs logged at WARN or above (culls, broker trouble).
    if [ "$target" = luahub ] && grep -hE ' (WARN|ERROR) ' "$WORK"/luahub*/stderr.log >"$WORK/warn.log" 2>/dev/null; then
        log "$key: the hub logged $(wc -l <"$WORK/warn.log") warning(s), e.g.: $(head -1 "$WORK/warn.log")"
        out="${out%\}},\"hub_warnings\":$(wc -l <"$WORK/warn.log")}"
    fi
    if [ "$(jget "$out" complete)" != true ]; then
        log "$key: incomplete run; loadgen said:"; tail -5 "$lg_log" >&2 || true
    fi
    echo "$out" >>"$RAW"
    R[$key]=$out
    log "  cpu/delivery=$(jget "$out" server_cpu_ns_per_delivery) ns  aux=$(jget "$out" aux_cpu_ns_per_delivery) ns  cpu/conn=$(jget "$out" server_cpu_us_per_conn) us  rss/conn=$(jget "$out" rss_per_conn_kb) KB  deliveries/s=$(jget "$out" deliveries_per_s)  p99=$(jget "$out" p99) us  probe p99=$(jget "$out" probe_ping_p99_ms)/$(jget "$out" probe_op_p99_ms) ms  loadgen cpu/wall=$(jget "$out" client_cpu_util)  lost=$(jget "$out" lost) dup=$(jget "$out" dup) reordered=$(jget "$out" reordered) complete=$(jget "$out" complete)"
    log "  offset gaps/dups=$(jget "$out" off_gaps)/$(jget "$out" off_dups)  resets=$(jget "$out" resets)  joins=$(jget "$out" joins)  recover=$(jget "$out" recover_s) s  recovered:false=$(jget "$out" recovered_false)  redis cmds/s=$(jget "$out" redis_cmds_per_s)"
}

T_START=$(date +%s)
ALL_START=$(cpu_ticks_all)
children_cpu_s OURS_START
awk -v l="${LOAD_START%% *}" 'BEGIN { exit !(l > 0.5) }' &&
    log "warning: load average $LOAD_START: the machine is not quiet; numbers will be noisy"
for s in "${SELECTED[@]}"; do
    IFS='|' read -r name kind title args qargs qtitle <<<"$s"
    [ $QUICK = 1 ] && args=$qargs
    for ((run = 1; run <= RUNS; run++)); do
        if [ "$kind" = std ]; then
            for target in ${TARGETS//,/ }; do
                log "$name ($target) run $run/$RUNS"
                run_one "$args" "$target" "$run" "$name"
            done
        else
            while IFS='|' read -r v vlabel spec extra qextra; do
                [ -n "$v" ] || continue
                [ $QUICK = 1 ] && extra=$qextra
                log "$name ($v: $vlabel) run $run/$RUNS"
                run_one "$args" "$(spec_target "$spec")" "$run" "$name" "$v" "$spec" "$extra"
            done < <(variants_to_run "$name")
        fi
    done
done
T_END=$(date +%s)
ALL_END=$(cpu_ticks_all)
# CPU used by other processes meanwhile: busy time of every CPU minus what
# our own children (servers, redis, loadgen and theirs, all reaped) used;
# softirq work no process is charged for counts as "others" (an
# overestimate of a few per cent). Steal: time the hypervisor gave away.
children_cpu_s OURS_END
OURS_S=$(awk -v a="$OURS_START" -v b="$OURS_END" 'BEGIN { print b - a }')
FOREIGN=$(awk -v a="${ALL_START% *}" -v b="${ALL_END% *}" -v sa="${ALL_START#* }" -v sb="${ALL_END#* }" \
    -v o="$OURS_S" -v hz="$(getconf CLK_TCK)" -v w="$((T_END - T_START))" \
    'BEGIN { f = (b - a) / hz - o; if (f < 0) f = 0; st = (sb - sa) / hz
             printf "%.1f CPU-seconds (%.0f %% of one core over the %d s; steal %.1f s)", f, w ? 100 * f / w : 0, w, st }')

# ---- tables ---------------------------------------------------------------------------
vals() { # name target-or-variant key -> one value per run
    local r
    for ((r = 1; r <= RUNS; r++)); do
        local o=${R[$1/$2/$r]:-}
        jget "${o:-\{\}}" "$3"
    done
}
in_ms() { # key value -> the value; p50/p99 (µs in the JSON) in ms
    if [ "$2" != null ] && [[ "$1" == p50 || "$1" == p99 ]]; then awk -v x="$2" 'BEGIN {print x / 1000}'; else echo "$2"; fi
}
med() { in_ms "$3" "$(median $(vals "$1" "$2" "$3"))"; }
# Each run's value, "a / b / c" in run order: where a median would hide a
# bimodal spread.
run_vals() { # name target-or-variant key -> one value per run
    local v
    for v in $(vals "$1" "$2" "$3"); do in_ms "$3" "$v"; done
}
per_run() { # name target-or-variant key decimals -> one cell
    local v out=""
    for v in $(run_vals "$1" "$2" "$3"); do out="${out:+$out / }$(fmt "$v" "$4")"; done
    echo "$out"
}
per_run_ratio() { # name key -> luahub/Nchan run by run (runs alternate, so pairs are neighbours)
    local a b out="" r
    mapfile -t a < <(run_vals "$1" luahub "$2")
    mapfile -t b < <(run_vals "$1" nchan "$2")
    for ((r = 0; r < RUNS; r++)); do out="${out:+$out / }$(ratio "${a[r]:-null}" "${b[r]:-null}")"; done
    echo "$out"
}

vratio() { # name variant-a key-a variant-b key-b -> a/b of their medians
    ratio "$(med "$1" "$2" "$3")" "$(med "$1" "$4" "$5")"
}

totals() { # name target-or-variant key... -> "a / b / ...", each summed over the runs
    local n=$1 t=$2 k out=""
    shift 2
    for k in "$@"; do out="${out:+$out / }$(total $(vals "$n" "$t" "$k"))"; done
    echo "$out"
}

# Scenarios whose subscribers check history offsets (an extra column).
OFFSET_SCENARIOS="history_ws history_http recovery_storm"

correctness() { # name target-or-variant kind -> one cell
    local f
    case $3 in
        idle|connrate)
            f=$([ "$3" = idle ] && echo subs_failed || echo failed)
            echo "$(total $(vals "$1" "$2" "$f")) failed, $(total $(vals "$1" "$2" dropped_conns)) dropped" ;;
        offsets) echo "$(totals "$1" "$2" off_gaps off_dups off_missing resets)" ;;
        recover) echo "$(totals "$1" "$2" lost dup reordered dropped_conns reconnect_failed)" ;;
        *) echo "$(totals "$1" "$2" lost dup reordered dropped_conns)" ;;
    esac
}

# Columns of the variant tables: label|key|decimals|1 = add "× first" after
# it. Decimals "sum": the total over the runs instead of the median.
var_columns() {
    case $1 in
        hook_publish) printf '%s\n' "server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|1" \
            "CPU 0 busy per delivery (ns)|server_core_ns_per_delivery|0|0" \
            "deliveries/s|deliveries_per_s|0|1" "p99 latency (ms)|p99|2|0" ;;
        hook_connect) printf '%s\n' "server CPU per connection (µs)|server_cpu_us_per_conn|1|1" \
            "CPU 0 busy per connection (µs)|server_core_us_per_conn|1|0" "connections/s|conns_per_s|0|1" ;;
        broker_ws|broker_http) printf '%s\n' "server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|1" \
            "redis CPU per delivery (ns)|aux_cpu_ns_per_delivery|0|0" \
            "server + redis (ns)|server_cpu_ns_per_delivery+aux_cpu_ns_per_delivery|0|1" \
            "CPU 0 busy per delivery (ns)|server_core_ns_per_delivery|0|0" \
            "deliveries/s|deliveries_per_s|0|1" "p99 latency (ms)|p99|2|0" ;;
        workers) printf '%s\n' "deliveries/s|deliveries_per_s|0|1" \
            "luahub CPU per delivery (ns)|server_cpu_ns_per_delivery|0|0" \
            "redis CPU per delivery (ns)|aux_cpu_ns_per_delivery|0|0" \
            "luahub + redis (ns)|server_cpu_ns_per_delivery+aux_cpu_ns_per_delivery|0|1" \
            "p99 latency (ms)|p99|2|0" ;;
        pacing) printf '%s\n' "server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|1" \
            "CPU 0 busy per delivery (ns)|server_core_ns_per_delivery|0|0" \
            "p50 latency (ms)|p50|2|0" "p99 latency (ms)|p99|2|1" "publishes/s achieved|publishes_per_s|0|0" ;;
        scale) printf '%s\n' "server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|1" \
            "CPU 0 busy per delivery (ns)|server_core_ns_per_delivery|0|1" \
            "deliveries/s|deliveries_per_s|0|0" "p99 latency (ms)|p99|2|0" ;;
        scaleout) printf '%s\n' "subscribed|subs_ok|0|0" "server RSS per connection (KB)|rss_per_conn_kb|2|0" \
            "server PSS per connection (KB)|pss_per_conn_kb|2|0" \
            "server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|0" \
            "redis CPU per delivery (ns)|aux_cpu_ns_per_delivery|0|0" \
            "server + redis (ns)|server_cpu_ns_per_delivery+aux_cpu_ns_per_delivery|0|1" \
            "p50 latency (ms)|p50|2|0" "p99 latency (ms)|p99|2|0" "deliveries/s|deliveries_per_s|0|0" \
            "publishes/s achieved|publishes_per_s|0|0" "schedule lag max (ms)|pub_lag_max_ms|1|0" \
            "publishes due while every connection was busy|pub_waited_for_conn|0|0" \
            "loadgen CPU / wall (2 = both cores)|client_cpu_util|2|0" ;;
        channels) printf '%s\n' "server RSS per connection (KB)|rss_per_conn_kb|2|1" \
            "server RSS held (KB)|rss_held_kb|0|0" "server CPU per connection setup (µs)|server_cpu_us_per_conn|1|0" ;;
        history_ws|history_http) printf '%s\n' "server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|1" \
            "redis CPU per delivery (ns)|aux_cpu_ns_per_delivery|0|0" \
            "server + redis (ns)|server_cpu_ns_per_delivery+aux_cpu_ns_per_delivery|0|1" \
            "CPU 0 busy per delivery (ns)|server_core_ns_per_delivery|0|0" \
            "deliveries/s|deliveries_per_s|0|1" "p99 latency (ms)|p99|2|0" \
            "redis commands per publish|redis_cmds_per_publish|1|0" \
            "offsets checked (all runs)|off_checked|sum|0" ;;
        recovery_storm) printf '%s\n' "time until all caught up (s)|recover_s|2|1" \
            "catch-up p50 (ms)|p50|0|0" "catch-up p99 (ms)|p99|0|0" \
            "server CPU (s)|server_cpu_s|2|1" "server CPU per subscriber (µs)|server_cpu_us_per_sub|0|0" \
            "redis CPU per subscriber (µs)|aux_cpu_us_per_sub|0|0" \
            "server + redis per subscriber (µs)|server_cpu_us_per_sub+aux_cpu_us_per_sub|0|1" \
            "server busy: CPU / wall|server_cpu_util|2|0" "redis commands per subscriber|redis_cmds_per_sub|1|0" \
            "messages recovered (all runs)|unique|sum|0" "recovered:false (all runs)|recovered_false|sum|0" \
            "loadgen CPU / wall (1 = its core full)|client_cpu_util|2|0" ;;
        presence) printf '%s\n' "server RSS per connection (KB)|rss_per_conn_kb|2|1" \
            "server CPU per connection set-up (µs)|server_cpu_us_per_conn|1|1" \
            "redis CPU per connection set-up (µs)|aux_cpu_us_per_conn|1|0" \
            "redis commands per connection set-up|redis_setup_cmds_per_conn|1|0" \
            "redis memory per connection (KB)|redis_mem_per_conn_kb|2|0" \
            "redis commands/s, held|redis_cmds_per_s|0|0" "redis script calls/s, held|redis_scripts_per_s|1|0" \
            "join events received|joins|0|0" "set-up (s)|setup_s|2|0" ;;
    esac
}
var_note() {
    case $1 in
        hook_publish) echo "Target (issue 5): a trivial on_publish costs under 5 % of burst throughput. The hook runs once per publish, not per delivery (100 subscribers per channel here)." ;;
        hook_connect) echo "Target (issue 5): connect + upgrade + subscribe with a Lua on_connect ≤ 0.85× Nchan's server CPU (Nchan: the connrate row above)." ;;
        broker_ws|broker_http) echo "Server CPU: all hub processes (Nchan: nginx's master and worker); redis CPU: the redis-server started for the run, pinned with the server to CPU 0; CPU 0 busy adds softirq. With 2 processes each publish crosses Redis once and is fanned out by both hubs. × first: against luahub with the memory broker." ;;
        workers) echo "Server, redis-server and loadgen unpinned on both cores (the same for every variant). luahub CPU: the supervisor and every worker." ;;
        pacing) echo "The trade write pacing makes at 100 messages/s per subscriber: write_delay = N holds deliveries up to N ms so that writes carry more frames. The default writes at once at this load (a pause would gather under 1.5 frames per connection)." ;;
        scale) echo "Target (issue 5): cost per delivery grows by less than 1.3× from 1,000 to 15,000 subscribers on one channel. Bursts of 1,500 / 300 / 100 publishes; loadgen --procs 2 for all three." ;;
        scaleout) echo "Nothing pinned: servers, redis-server and loadgen share both cores. Every loadgen process stays under the 20,000-descriptor limit and binds its sockets to its own source address (127.0.0.2, .3, ...). A process may hold about 19,900 connections (20,000 descriptors), so luahub needs workers = 6 for 100,000 (~16,700 each) and workers = 2 holds 36,000; Nchan's two workers likewise (worker_connections 19,000 each). Server CPU: supervisor and workers (Nchan: master and workers); redis CPU apart; RSS and PSS: (held − before) / subscribed, all server processes (PSS splits pages the processes share). Target (issue 15): zero loss." ;;
        channels) echo "RSS per connection = (VmRSS held − VmRSS before) / connections; the difference between the two rows is the cost of 9,990 more channels." ;;
        history_ws|history_http) echo "History on: the conf's channels gives bench:* history_size = 100 (every delivery carries its offset; loadgen checks each subscriber's offsets are the last + 1). Server CPU: the hub; redis CPU: the run's redis-server, pinned with the hub to CPU 0; redis commands (INFO, scripts' own commands included) over the measured window per acknowledged publish. × first: against the memory broker with history off." ;;
        recovery_storm) echo "From the moment all reconnect (at most 500 connects in flight) until every subscriber had its channel's 100 missed messages (recovered:true, offsets the last + 1). Server CPU and redis CPU over that window; catch-up: each subscriber's time from the reconnect's start until it had them all. Target (issue 11): zero loss or duplicates, no recovered:false and no reset." ;;
        presence) echo "RSS per connection = (VmRSS held − VmRSS before) / connections; set-up CPU from the first connect until every subscriber is in (join_leave: and every join event has come: a channel of n subscribers sends n (n + 1) / 2). Redis: commands (those inside scripts included) and script calls per second over the hold, INFO of the run's redis-server before and after; the redis variants hold one presence refresh period (presence_ttl / 3: 20 s at the default 60; --quick: presence_ttl = 3, two periods); redis memory = used_memory growth / connections." ;;
    esac
}

TABLE=$WORK/table.md
{
    echo "# luahub benchmark, $STAMP"
    echo
    echo "Command: \`$ARGV_TEXT\`; $RUNS run(s) per scenario, medians; server on CPU 0 (\`taskset -c 0\`), loadgen on CPU 1 (unless a table says otherwise); fresh server per run; 100-byte payloads; $((T_END - T_START)) s in all."
    echo
    echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r); load average before the build $LOAD_START, at the end $(cut -d' ' -f1-3 /proc/loadavg) (ours included); other processes used $FOREIGN: anything above a few per cent means the numbers are noisy."
    if has_target luahub; then
        echo "luahub: $("$LUAHUB" --version 2>/dev/null | head -1)$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null | sed 's/^/, commit /')${DIRTY:+ with uncommitted changes in $DIRTY}; binary built $LUAHUB_BUILT."
    fi
    [ $needs_redis = 1 ] && echo "Redis: $(redis-server --version | sed 's/ sha=.*//')."
    has_target nchan && echo "Nchan: $(dpkg-query -W -f='libnginx-mod-nchan ${Version}' libnginx-mod-nchan 2>/dev/null), $(nginx -v 2>&1 | sed 's/.*: //'), one worker, memory store (bench/nchan.conf.in), unless a variant says otherwise (Redis storage: Nchan's distributed mode on the run's redis-server)."
    [ $QUICK = 1 ] && echo && echo "**--quick: smoke-test sizes, one run. Not a measurement.**"
    std_header=0
    for s in "${SELECTED[@]}"; do
        IFS='|' read -r name kind title args qargs qtitle <<<"$s"
        [ "$kind" = std ] || continue
        [ $QUICK = 1 ] && title=$qtitle
        if [ $std_header = 0 ]; then
            std_header=1
            echo
            echo "## Standard scenarios"
            echo
            if has_target luahub && has_target nchan; then
                echo "| scenario | metric | luahub | Nchan | luahub/Nchan | target |"
                echo "|---|---|---|---|---|---|"
            else
                echo "| scenario | metric | ${TARGETS//,/ | } |"
                echo "|---|---|$(for t in ${TARGETS//,/ }; do printf -- '---|'; done)"
            fi
        fi
        rows=()
        case $name in
            burst_ws) rows=("server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|≤ 0.25" "CPU 0 busy per delivery, incl. softirq (ns)|server_core_ns_per_delivery|0|" "deliveries/s|deliveries_per_s|0|" "p99 latency (ms)|p99|2|") ;;
            burst_http|burst_http_5000) rows=("server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|≤ 0.5" "CPU 0 busy per delivery, incl. softirq (ns)|server_core_ns_per_delivery|0|" "deliveries/s|deliveries_per_s|0|" "p99 latency (ms)|p99|2|") ;;
            rate|rate_http) rows=("server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|≤ 0.7" "CPU 0 busy per delivery, incl. softirq (ns)|server_core_ns_per_delivery|0|" "p99 latency (ms)|p99|2|≤ 0.5" "p99 per run (ms)|runs:p99|1|≤ 0.5 in every run" "p50 latency (ms)|p50|2|" "publishes/s achieved|publishes_per_s|0|" "schedule lag max (ms)|pub_lag_max_ms|1|" "loadgen CPU / wall (1 = its core full)|client_cpu_util|2|")
                [ "$name" = rate_http ] && rows+=("publishes due while every connection was busy|pub_waited_for_conn|0|") ;;
            flow_ws) rows=("server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|≤ 0.2" "CPU 0 busy per delivery, incl. softirq (ns)|server_core_ns_per_delivery|0|" "deliveries/s|deliveries_per_s|0|" "p50 latency (ms)|p50|2|≤ 0.2" "p99 latency (ms)|p99|2|" "server busy: server CPU / wall|server_cpu_util|2|" "loadgen CPU / wall (1 = its core full)|client_cpu_util|2|") ;;
            ping_fanout) rows=("probe WebSocket PING round trip p50 (ms)|probe_ping_p50_ms|2|" "probe PING p99 (ms)|probe_ping_p99_ms|2|≤ 10 ms" "probe PING max (ms)|probe_ping_max_ms|1|" "probe PINGs answered|probe_ping_answered|0|" "of them by a later PING's PONG|probe_ping_coalesced|0|" "probe ping op round trip p50 (ms)|probe_op_p50_ms|2|" "probe ping op p99 (ms)|probe_op_p99_ms|2|≤ 10 ms" "probe ping op max (ms)|probe_op_max_ms|1|" "probes sent|probe_sent|0|" "server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|" "deliveries/s|deliveries_per_s|0|" "p99 delivery latency (ms)|p99|2|") ;;
            idle) rows=("server RSS per connection (KB)|rss_per_conn_kb|2|≤ 1.5 KB" "server CPU per connection setup (µs)|server_cpu_us_per_conn|1|") ;;
            connrate) rows=("server CPU per connection (µs)|server_cpu_us_per_conn|1|≤ 0.85" "CPU 0 busy per connection, incl. softirq (µs)|server_core_us_per_conn|1|" "connections/s|conns_per_s|0|") ;;
        esac
        first=1
        for row in "${rows[@]}"; do
            IFS='|' read -r label key dec tgt <<<"$row"
            cells=() meds=()
            for t in ${TARGETS//,/ }; do
                if [[ "$key" == runs:* ]]; then
                    cells+=("$(per_run "$name" "$t" "${key#runs:}" "$dec")")
                else
                    m=$(med "$name" "$t" "$key")
                    meds+=("$m")
                    cells+=("$(fmt "$m" "$dec")")
                fi
            done
            sc=""; [ $first = 1 ] && sc=$title
            first=0
            if has_target luahub && has_target nchan; then
                if [[ "$key" == runs:* ]]; then
                    rat=$(per_run_ratio "$name" "${key#runs:}")
                else
                    rat=$(ratio "${meds[0]}" "${meds[1]}")
                fi
                echo "| $sc | $label | ${cells[0]} | ${cells[1]} | $rat | $tgt |"
            else
                line="| $sc | $label |"
                for c in "${cells[@]}"; do line="$line $c |"; done
                echo "$line"
            fi
        done
        # Correctness, summed over runs: anything but zeros is a finding.
        line="| | lost / dup / reordered / dropped (all runs) |"
        for t in ${TARGETS//,/ }; do line="$line $(correctness "$name" "$t" "$name") |"; done
        has_target luahub && has_target nchan && line="$line | zero |"
        echo "$line"
    done
    for s in "${SELECTED[@]}"; do
        IFS='|' read -r name kind title args qargs qtitle <<<"$s"
        [ "$kind" = var ] || continue
        [ $QUICK = 1 ] && title=$qtitle
        ckind=fanout
        [[ "$args" == *"--mode connrate"* ]] && ckind=connrate
        [[ "$args" == *"--mode idle"* ]] && ckind=idle
        [[ "$args" == *"--mode recover"* ]] && ckind=recover
        mapfile -t cols < <(var_columns "$name")
        mapfile -t vars < <(variants_to_run "$name")
        echo
        echo "## $name: $title"
        echo
        head="| variant |" sep="|---|"
        for c in "${cols[@]}"; do
            IFS='|' read -r label key dec rat <<<"$c"
            head="$head $label |"; sep="$sep---|"
            [ "$rat" = 1 ] && head="$head × first |" && sep="$sep---|"
        done
        case $ckind in
            fanout) head="$head lost / dup / reordered / dropped |" ;;
            recover) head="$head lost / dup / reordered / dropped / reconnects failed |" ;;
            *) head="$head failed / dropped |" ;;
        esac
        [[ " $OFFSET_SCENARIOS " == *" $name "* ]] && head="$head offset gaps / dups / missing / resets |" && sep="$sep---|"
        echo "$head"; echo "$sep---|"
        declare -A base=()
        for vl in "${vars[@]}"; do
            IFS='|' read -r v vlabel spec extra qextra <<<"$vl"
            [ -n "$v" ] || continue
            line="| $vlabel |"
            for c in "${cols[@]}"; do
                IFS='|' read -r label key dec rat <<<"$c"
                if [ "$dec" = sum ]; then
                    line="$line $(fmt "$(total $(vals "$name" "$v" "$key"))") |"
                    continue
                fi
                m=$(med "$name" "$v" "$key")
                [ -n "${base[$key]:-}" ] || base[$key]=$m
                line="$line $(fmt "$m" "$dec") |"
                [ "$rat" = 1 ] && line="$line $(ratio "$m" "${base[$key]}") |"
            done
            line="$line $(correctness "$name" "$v" "$ckind") |"
            [[ " $OFFSET_SCENARIOS " == *" $name "* ]] && line="$line $(correctness "$name" "$v" offsets) |"
            echo "$line"
        done
        unset base
        echo
        var_note "$name"
        if [ "$name" = channels ]; then
            a=$(med channels ch10 rss_held_kb); b=$(med channels ch10000 rss_held_kb)
            a0=$(med channels ch10 rss_before_kb); b0=$(med channels ch10000 rss_before_kb)
            if [ "$a" != null ] && [ "$b" != null ] && [ $QUICK = 0 ]; then
                echo "Median RSS growth with 10,000 channels minus with 10: $(awk -v a="$a" -v b="$b" -v a0="$a0" -v b0="$b0" 'BEGIN { printf "%.0f KB, %.0f bytes per extra channel", (b - b0) - (a - a0), ((b - b0) - (a - a0)) * 1024 / 9990 }')."
            fi
        fi
        cpu=server_cpu_ns_per_delivery both=server_cpu_ns_per_delivery+aux_cpu_ns_per_delivery
        if [[ "$name" == broker_* ]] && has_target luahub; then
            echo "Redis broker / memory broker, luahub CPU per delivery, 1 process (medians): $(vratio "$name" redis $cpu memory $cpu) counting the hub alone, $(vratio "$name" redis $both memory $cpu) counting the hub and redis-server$([ "$name" = broker_http ] && echo " (target, issue 15: ≤ 1.3)")."
        fi
        if [[ "$name" == history_* ]]; then
            echo "History on / off, CPU per delivery (medians): memory broker $(vratio "$name" memory_hist $cpu memory $cpu) (target, issue 11: ≤ 1.15); redis broker $(vratio "$name" redis_hist $cpu redis $cpu) counting the hub alone, $(vratio "$name" redis_hist $both redis $both) counting the hub and redis-server (target: ≤ 1.3). Deliveries/s on / off: memory $(vratio "$name" memory_hist deliveries_per_s memory deliveries_per_s), redis $(vratio "$name" redis_hist deliveries_per_s redis deliveries_per_s)."
        fi
        if [ "$name" = presence ]; then
            rss=rss_per_conn_kb setup=server_cpu_us_per_conn
            echo "Against no presence on the same broker (medians), RSS per connection: presence memory $(vratio presence presence $rss none $rss), redis $(vratio presence redis_presence $rss redis $rss); join_leave memory $(vratio presence join_leave $rss none $rss), redis $(vratio presence redis_join_leave $rss redis $rss). Set-up CPU per connection: presence memory $(vratio presence presence $setup none $setup), redis $(vratio presence redis_presence $setup redis $setup); join_leave memory $(vratio presence join_leave $setup none $setup), redis $(vratio presence redis_join_leave $setup redis $setup)."
            echo "Redis commands/s held, presence − none: $(awk -v a="$(med presence redis_presence redis_cmds_per_s)" -v b="$(med presence redis redis_cmds_per_s)" 'BEGIN { if (a == "null" || b == "null") print "n/a"; else printf "%.0f", a - b }') (the presence refresh; none: the registry's own refresh)."
        fi
        hw=$(for vl in "${vars[@]}"; do v=${vl%%|*}; total $(vals "$name" "$v" hub_warnings); done | awk '{s += $1} END {print s + 0}')
        [ "$hw" != 0 ] && echo "**The hub logged $hw WARN/ERROR line(s) during these runs** (see the run's stderr)."
    done
    incomplete=$(for k in "${!R[@]}"; do [ "$(jget "${R[$k]}" complete)" = true ] || echo "$k"; done | sort | paste -sd' ' -)
    if [ -n "$incomplete" ]; then
        echo
        echo "**Incomplete runs** (a subscriber missed an acknowledged publish, a connection failed, or loadgen gave up; raw JSON has the details): $incomplete"
    fi
    echo
    echo "Server CPU = utime+stime of the server's processes (/proc/PID/stat) over the measured window, divided by deliveries (or connections); the issue's metric. CPU 0 busy = all non-idle time of the server's core (/proc/stat), which adds the softirq (loopback TCP) work no process is charged for. Raw results: \`bench/results/$(basename "$RAW")\`. See bench/README.md."
} >"$TABLE"

cp "$TABLE" "$BASE.md"
cat "$TABLE"
log "wrote $BASE.md and $RAW"
