#!/usr/bin/env bash
# bench/run.sh: luahub's standard benchmark (issue 5), optionally side by side
# with Nchan. Builds luahub and loadgen, starts each server fresh for every
# run (pinned to CPU 0, loadgen on CPU 1), runs every scenario N times (3),
# takes medians and writes a markdown table to bench/results/<date>.md (raw
# JSON next to it) and prints it. See bench/README.md for what the numbers
# mean.
#
#   bench/run.sh [--compare] [--quick] [--only NAME[,NAME]] [--runs N]
#                [--targets luahub,nchan] [--build DIR] [--no-build]
#
# --compare   also run Nchan (nginx-light + libnginx-mod-nchan from Debian;
#             installed with apt-get if missing) and print luahub/Nchan ratios
# --quick     small sizes, one run: a smoke test, not a measurement
# --only      scenarios to run: burst_ws burst_http burst_http_5000 rate idle
#             connrate
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${BUILD:-$ROOT/build}
COMPARE=0 QUICK=0 ONLY="" RUNS="" TARGETS="" NO_BUILD=0
ARGV_TEXT="bench/run.sh $*"
NCHAN_MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so

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
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

# ---- scenarios --------------------------------------------------------------
# name|title|loadgen arguments|--quick arguments|--quick title. Payloads: 100 B.
SCENARIOS=(
"burst_ws|burst, 1000 subs on 10 channels, WebSocket publisher|--mode fanout --subs 1000 --channels 10 --burst 200 --pub ws --window 64|--mode fanout --subs 200 --channels 10 --burst 20 --pub ws --window 64|burst, 200 subs on 10 channels, WebSocket publisher"
"burst_http|burst, 1000 subs on 10 channels, HTTP publisher (4 keep-alive)|--mode fanout --subs 1000 --channels 10 --burst 200 --pub http --pub-conns 4|--mode fanout --subs 200 --channels 10 --burst 20 --pub http --pub-conns 4|burst, 200 subs on 10 channels, HTTP publisher (4 keep-alive)"
"burst_http_5000|burst, 5000 subs on 1 channel, HTTP publisher (4 keep-alive)|--mode fanout --subs 5000 --channels 1 --burst 100 --pub http --pub-conns 4|--mode fanout --subs 500 --channels 1 --burst 20 --pub http --pub-conns 4|burst, 500 subs on 1 channel, HTTP publisher (4 keep-alive)"
"rate|open loop, 1000 publishes/s over 10 channels, 1000 subs (100k deliveries/s)|--mode fanout --subs 1000 --channels 10 --rate 1000 --duration 10 --pub ws --window 1000|--mode fanout --subs 200 --channels 10 --rate 200 --duration 2 --pub ws --window 1000|open loop, 200 publishes/s over 10 channels, 200 subs"
"idle|idle, 15,000 subscribed connections|--mode idle --conns 15000 --channels 10 --hold 10|--mode idle --conns 1000 --channels 10 --hold 1|idle, 1,000 subscribed connections"
"connrate|connect + upgrade + subscribe + close, 50 in flight|--mode connrate --count 10000 --inflight 50 --channels 10|--mode connrate --count 1000 --inflight 50 --channels 10|connect + upgrade + subscribe + close, 50 in flight (1,000)"
)
COMMON_ARGS="--size 100 --timeout 60 --drain 15"

[ -n "$RUNS" ] || { [ $QUICK = 1 ] && RUNS=1 || RUNS=3; }
case "$RUNS" in ''|*[!0-9]*) die "--runs: not a number: $RUNS" ;; esac
[ "$RUNS" -ge 1 ] && [ "$RUNS" -le 20 ] || die "--runs: 1..20"
[ -n "$TARGETS" ] || { [ $COMPARE = 1 ] && TARGETS=luahub,nchan || TARGETS=luahub; }
for t in ${TARGETS//,/ }; do
    case "$t" in luahub|nchan) ;; *) die "--targets: luahub and/or nchan, not '$t'" ;; esac
done
has_target() { [[ ",$TARGETS," == *",$1,"* ]]; }

SELECTED=()
for s in "${SCENARIOS[@]}"; do
    name=${s%%|*}
    if [ -z "$ONLY" ] || [[ "$ONLY," == *",$name,"* ]]; then SELECTED+=("$s"); fi
done
if [ -n "$ONLY" ]; then
    for n in ${ONLY//,/ }; do
        found=0
        for s in "${SCENARIOS[@]}"; do [ "${s%%|*}" = "$n" ] && found=1; done
        [ $found = 1 ] || die "--only: unknown scenario '$n' (burst_ws burst_http burst_http_5000 rate idle connrate)"
    done
fi
[ ${#SELECTED[@]} -gt 0 ] || die "no scenario selected"

# ---- preconditions -----------------------------------------------------------
command -v taskset >/dev/null || die "taskset (util-linux) is required"
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
SERVER_PID="" SERVER_KIND="" NGINX_WORKER=""
cleanup() {
    if declare -F stop_server >/dev/null; then stop_server || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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

start_luahub() {
    local dir=$WORK/luahub i port=""
    mkdir -p "$dir"
    cat >"$dir/luahub.conf" <<'EOF'
-- bench/run.sh: defaults, loopback only; the port comes from --listen.
listen = "127.0.0.1:0"
log_level = "info"
EOF
    : >"$dir/stderr.log"
    $PIN_SERVER "$LUAHUB" -c "$dir/luahub.conf" --listen 127.0.0.1:0 2>>"$dir/stderr.log" >/dev/null &
    SERVER_PID=$! SERVER_KIND=luahub
    for ((i = 0; i < 200; i++)); do
        port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$dir/stderr.log" | head -1)
        [ -n "$port" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    if [ -z "$port" ]; then
        tail -5 "$dir/stderr.log" >&2
        stop_server
        die "luahub did not start (log above)"
    fi
    SERVER_PORT=$port SERVER_PIDS=$SERVER_PID
}

free_port() { # a free TCP port below the ephemeral range
    local p i
    for ((i = 0; i < 50; i++)); do
        p=$((20000 + RANDOM % 12000))
        if command -v ss >/dev/null; then
            ss -Htan "sport = :$p" 2>/dev/null | grep -q . && continue
        fi
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
        echo "$p"; return 0
    done
    die "no free port found"
}

start_nchan() {
    local dir=$WORK/nchan attempt i
    for ((attempt = 0; attempt < 5; attempt++)); do
        rm -rf "$dir"; mkdir -p "$dir"
        local port; port=$(free_port)
        sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@MODULE@#$NCHAN_MODULE#g" \
            "$ROOT/bench/nchan.conf.in" >"$dir/nginx.conf"
        $PIN_SERVER nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/stdout.log" 2>&1 &
        SERVER_PID=$! SERVER_KIND=nchan NGINX_WORKER=""
        for ((i = 0; i < 100; i++)); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            NGINX_WORKER=$(pgrep -P "$SERVER_PID" | head -1 || true)
            if [ -n "$NGINX_WORKER" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                SERVER_PORT=$port SERVER_PIDS="$SERVER_PID,$NGINX_WORKER"
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
    [ -n "$SERVER_PID" ] || return 0
    if [ "$SERVER_KIND" = nchan ]; then
        kill -QUIT "$SERVER_PID" 2>/dev/null || true
        wait_gone "$SERVER_PID" 10 || kill -KILL "$SERVER_PID" 2>/dev/null || true
        # Our own worker (child of our master), should it outlive it.
        if [ -n "$NGINX_WORKER" ] && kill -0 "$NGINX_WORKER" 2>/dev/null; then
            wait_gone "$NGINX_WORKER" 3 || kill -KILL "$NGINX_WORKER" 2>/dev/null || true
        fi
    else
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait_gone "$SERVER_PID" 10 || kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID="" NGINX_WORKER=""
}

# ---- JSON helpers (flat keys; no jq needed) ------------------------------------
jget() { # json key -> value or null
    local v
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
declare -A R # R[scenario/target/run] = JSON line

run_one() { # scenario-args target run name
    local args=$1 target=$2 run=$3 name=$4 out
    case $target in luahub) start_luahub ;; nchan) start_nchan ;; esac
    sleep 0.3 # let the fresh server settle before metering it
    local lg_log=$WORK/loadgen.$name.$target.$run.log
    out=$(timeout 600 $PIN_CLIENT "$LOADGEN" $args $COMMON_ARGS --target "$target" \
          --port "$SERVER_PORT" --server-pid "$SERVER_PIDS" $CORE_ARGS --label "$name/$target/$run" \
          2>"$lg_log" | tail -1) || true
    stop_server
    if [ -z "$out" ] || [[ "$out" != "{"* ]]; then
        log "$name/$target/$run: no result"; tail -3 "$lg_log" >&2 || true
        out='{"error":"no result"}'
    fi
    echo "$out" >>"$RAW"
    R[$name/$target/$run]=$out
}

T_START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
awk -v l="${LOAD_START%% *}" 'BEGIN { exit !(l > 0.5) }' &&
    log "warning: load average $LOAD_START: the machine is not quiet; numbers will be noisy"
for s in "${SELECTED[@]}"; do
    IFS='|' read -r name title args qargs qtitle <<<"$s"
    [ $QUICK = 1 ] && args=$qargs
    for ((run = 1; run <= RUNS; run++)); do
        for target in ${TARGETS//,/ }; do
            log "$name ($target) run $run/$RUNS"
            run_one "$args" "$target" "$run" "$name"
            o=${R[$name/$target/$run]}
            log "  cpu/delivery=$(jget "$o" server_cpu_ns_per_delivery) ns  cpu/conn=$(jget "$o" server_cpu_us_per_conn) us  rss/conn=$(jget "$o" rss_per_conn_kb) KB  p99=$(jget "$o" p99) us  lost=$(jget "$o" lost) dup=$(jget "$o" dup) reordered=$(jget "$o" reordered) complete=$(jget "$o" complete)"
        done
    done
done
T_END=$(date +%s)

# ---- table ---------------------------------------------------------------------------
vals() { # name target key -> one value per run
    local r
    for ((r = 1; r <= RUNS; r++)); do
        local o=${R[$1/$2/$r]:-}
        jget "${o:-\{\}}" "$3"
    done
}
med() { median $(vals "$1" "$2" "$3"); }

TABLE=$WORK/table.md
{
    echo "# luahub benchmark, $STAMP"
    echo
    echo "Command: \`$ARGV_TEXT\`; $RUNS run(s) per scenario, medians; server on CPU 0 (\`taskset -c 0\`), loadgen on CPU 1; fresh server per run; 100-byte payloads; $((T_END - T_START)) s in all."
    echo
    echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r); load average at start $LOAD_START."
    has_target luahub && echo "luahub: $("$LUAHUB" --version 2>/dev/null | head -1)$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null | sed 's/^/, commit /')."
    has_target nchan && echo "Nchan: $(dpkg-query -W -f='libnginx-mod-nchan ${Version}' libnginx-mod-nchan 2>/dev/null), $(nginx -v 2>&1 | sed 's/.*: //'), one worker, memory store (bench/nchan.conf.in)."
    [ $QUICK = 1 ] && echo && echo "**--quick: smoke-test sizes, one run. Not a measurement.**"
    echo
    if has_target luahub && has_target nchan; then
        echo "| scenario | metric | luahub | Nchan | luahub/Nchan | target |"
        echo "|---|---|---|---|---|---|"
    else
        echo "| scenario | metric | ${TARGETS//,/ | } |"
        echo "|---|---|$(for t in ${TARGETS//,/ }; do printf -- '---|'; done)"
    fi
    for s in "${SELECTED[@]}"; do
        IFS='|' read -r name title args qargs qtitle <<<"$s"
        [ $QUICK = 1 ] && title=$qtitle
        rows=()
        case $name in
            burst_ws) rows=("server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|≤ 0.25" "CPU 0 busy per delivery, incl. softirq (ns)|server_core_ns_per_delivery|0|" "deliveries/s|deliveries_per_s|0|" "p99 latency (ms)|p99|ms|") ;;
            burst_http|burst_http_5000) rows=("server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|≤ 0.5" "CPU 0 busy per delivery, incl. softirq (ns)|server_core_ns_per_delivery|0|" "deliveries/s|deliveries_per_s|0|" "p99 latency (ms)|p99|ms|") ;;
            rate) rows=("server CPU per delivery (ns)|server_cpu_ns_per_delivery|0|≤ 0.7" "CPU 0 busy per delivery, incl. softirq (ns)|server_core_ns_per_delivery|0|" "p99 latency (ms)|p99|ms|≤ 0.5" "p50 latency (ms)|p50|ms|" "publishes/s achieved|publishes_per_s|0|") ;;
            idle) rows=("server RSS per connection (KB)|rss_per_conn_kb|2|≤ 1.5 KB" "server CPU per connection setup (µs)|server_cpu_us_per_conn|1|") ;;
            connrate) rows=("server CPU per connection (µs)|server_cpu_us_per_conn|1|≤ 0.85" "CPU 0 busy per connection, incl. softirq (µs)|server_core_us_per_conn|1|" "connections/s|conns_per_s|0|") ;;
        esac
        first=1
        for row in "${rows[@]}"; do
            IFS='|' read -r label key dec tgt <<<"$row"
            cells=() meds=()
            for t in ${TARGETS//,/ }; do
                m=$(med "$name" "$t" "$key")
                if [ "$dec" = ms ] && [ "$m" != null ]; then m=$(awk -v x="$m" 'BEGIN {print x / 1000}'); fi
                meds+=("$m")
                [ "$dec" = ms ] && cells+=("$(fmt "$m" 2)") || cells+=("$(fmt "$m" "$dec")")
            done
            sc=""; [ $first = 1 ] && sc=$title
            first=0
            if has_target luahub && has_target nchan; then
                echo "| $sc | $label | ${cells[0]} | ${cells[1]} | $(ratio "${meds[0]}" "${meds[1]}") | $tgt |"
            else
                line="| $sc | $label |"
                for c in "${cells[@]}"; do line="$line $c |"; done
                echo "$line"
            fi
        done
        # Correctness, summed over runs: anything but zeros is a finding.
        line="| | lost / dup / reordered / dropped (all runs) |"
        for t in ${TARGETS//,/ }; do
            if [ "$name" = idle ] || [ "$name" = connrate ]; then
                f=$([ "$name" = idle ] && echo subs_failed || echo failed)
                line="$line $(total $(vals "$name" "$t" "$f")) failed, $(total $(vals "$name" "$t" dropped_conns)) dropped |"
            else
                line="$line $(total $(vals "$name" "$t" lost)) / $(total $(vals "$name" "$t" dup)) / $(total $(vals "$name" "$t" reordered)) / $(total $(vals "$name" "$t" dropped_conns)) |"
            fi
        done
        has_target luahub && has_target nchan && line="$line | zero |"
        echo "$line"
    done
    echo
    echo "Server CPU = utime+stime of the server's processes (/proc/PID/stat) over the measured window, divided by deliveries (or connections); the issue's metric. CPU 0 busy = all non-idle time of the server's core (/proc/stat), which adds the softirq (loopback TCP) work no process is charged for. Raw results: \`bench/results/$(basename "$RAW")\`. See bench/README.md."
} >"$TABLE"

cp "$TABLE" "$BASE.md"
cat "$TABLE"
log "wrote $BASE.md and $RAW"
