#!/usr/bin/env bash
# Fuzzes the libFuzzer targets of tests/fuzz one after the other, each for
# SECONDS, and prints executions and coverage per target (tests/fuzz/README.md).
#
#   scripts/fuzz.sh BUILD_DIR SECONDS [TARGET...]     (make fuzz)
#
# A target starts from its seed corpus (tests/fuzz/corpus/TARGET, read only)
# and the corpus it grew in earlier runs (BUILD_DIR/fuzz/corpus/TARGET, where
# new inputs go); its log and any crash, leak or timeout input go to
# BUILD_DIR/fuzz/. FUZZ_RUNS=N also stops a target after N executions.
# Exit status: non-zero if a target found something (or did not run).
set -uo pipefail

dir=${1:?usage: fuzz.sh BUILD_DIR SECONDS [TARGET...]}
secs=${2:?usage: fuzz.sh BUILD_DIR SECONDS [TARGET...]}
shift 2
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(proto request url conf http policy)
src=$(cd "$(dirname "$0")/.." && pwd)/tests/fuzz
work=$dir/fuzz

# Longest input per target: above the largest seed, and the limits the
# code under test has (a request head is at most 16 KiB).
declare -A max_len=([proto]=8192 [request]=20000 [url]=4096 [conf]=16384 [http]=20000
                    [policy]=2048)

rc=0
rows=()
for t in "${targets[@]}"; do
    bin=$dir/tests/fuzz/fuzz_$t
    if [ ! -x "$bin" ] || [ -z "${max_len[$t]:-}" ]; then
        echo "fuzz: no target '$t' in $dir (targets: ${!max_len[*]})" >&2
        rc=1
        continue
    fi
    mkdir -p "$work/corpus/$t" "$work/found/$t"
    args=(-max_total_time="$secs" -max_len="${max_len[$t]}" -timeout=25
          -print_final_stats=1 -artifact_prefix="$work/found/$t/")
    [ -n "${FUZZ_RUNS:-}" ] && args+=(-runs="$FUZZ_RUNS")
    [ -f "$src/dict/$t.dict" ] && args+=(-dict="$src/dict/$t.dict")
    log=$work/$t.log
    echo "fuzz: $t for ${secs}s (log: $log)"
    "$bin" "${args[@]}" "$work/corpus/$t" "$src/corpus/$t" >"$log" 2>&1
    status=$?
    # "#1234567  DONE   cov: 812 ft: 3301 corp: 420/61Kb ..." (the last status line)
    last=$(grep -aE '^#[0-9]+' "$log" | tail -1)
    execs=$(grep -a 'stat::number_of_executed_units' "$log" | awk '{print $2}')
    [ -z "$execs" ] && execs=$(sed -E 's/^#([0-9]+).*/\1/' <<<"$last")
    speed=$(grep -a 'stat::average_exec_per_sec' "$log" | awk '{print $2}')
    cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | awk '{print $2}')
    ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | awk '{print $2}')
    corp=$(grep -oE 'corp: [0-9]+' <<<"$last" | awk '{print $2}')
    if [ $status -eq 0 ]; then
        result=ok
    else
        what=$(grep -aoE 'fuzz check failed at [^ ]+|ERROR: [A-Za-z]+: [a-z-]+' "$log" | head -1)
        result="FOUND: ${what:-stopped with status $status}; input in $work/found/$t/"
        rc=1
    fi
    rows+=("$(printf '%-8s %12s %8s %6s %7s %7s  %s' "$t" "${execs:-?}" "${speed:-?}" \
              "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result")")
done

echo
printf '%-8s %12s %8s %6s %7s %7s  %s\n' target executions exec/s cov ft corpus result
for r in "${rows[@]}"; do
    echo "$r"
done
exit $rc
