#!/usr/bin/env bash
# Runs the whole suite in each build dir given (release, then ASan+UBSan) and
# prints Check's summary lines and the fault suite's counts. Exit status is
# non-zero if any suite failed.
set -uo pipefail
rc=0
for dir in "$@"; do
  echo "== test suite: $dir"
  ctest --test-dir "$dir" --output-on-failure -j 2 || rc=1
  grep -h "Checks:" "$dir/Testing/Temporary/LastTest.log" || true
  # the fault suite's counts, one line per scenario (tests/fault/README.md)
  grep -h "^\[fault\]" "$dir/Testing/Temporary/LastTest.log" || true
done
exit $rc
