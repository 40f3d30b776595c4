#!/usr/bin/env bash
# The JavaScript suites: luahub.js size, node tests (luahub.js and cli.js against the real
# hub, and against a misbehaving ws server), browser tests (Debian's chromium driven by
# playwright-core: the example pages served by the real hub).
#
#   tests/js/run.sh [LUAHUB_BINARY]      (default build/luahub; run from anywhere)
#
# Needs node >= 20 and npm (npm ci installs the locked devDependencies into tests/js,
# downloading no browser), /usr/bin/chromium (or $CHROMIUM) and redis-server.
# Exits non-zero if anything fails.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${1:-build/luahub}
case $bin in /*) ;; *) bin=$PWD/$bin ;; esac
if [ ! -x "$bin" ]; then
    echo "tests/js/run.sh: no luahub binary at $bin (build it first, or pass its path)" >&2
    exit 2
fi
export LUAHUB_BIN=$bin
chromium=${CHROMIUM:-/usr/bin/chromium}
for tool in node npm redis-server "$chromium"; do
    if ! command -v "$tool" >/dev/null; then
        echo "tests/js/run.sh: $tool is missing (scripts/install-deps.sh installs it)" >&2
        exit 2
    fi
done

cd "$here"
# Install (again) only when the lockfile changed since the last install.
if ! cmp -s package-lock.json node_modules/.luahub-installed 2>/dev/null; then
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.luahub-installed
fi

status=0
node size.mjs || status=1
# One file at a time: the hubs and browsers of two files would share two cores.
node --test --test-concurrency=1 --test-reporter=spec node/*.test.mjs || status=1
node --test --test-concurrency=1 --test-reporter=spec browser/*.test.mjs || status=1
exit $status
