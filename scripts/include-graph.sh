#!/usr/bin/env bash
# The project's include graph.
#   scripts/include-graph.sh          for each file of src/ and include/luahub/,
#                                     the project headers it includes (system
#                                     and library headers left out);
#                                     docs/internals.md shows this output
#   scripts/include-graph.sh --check  fails, naming the loop, when the modules
#                                     include each other in a circle (a test)
# A module is a file's stem; a module's private parts count as the module:
# X_impl.h, the broker implementations with their registries, the config key
# table and its reload, the TLS context loader (tls_ctx.c), the session's
# host side (session_host.c), the server's lws glue (server_ws.c), the world
# of `luahub test` (spec_host.c, spec_actions.c, spec_world.h), the policy's
# Lua API, sandbox and policy_*.c. lua_limits (the memory cap and
# instruction budget of a lua_State) is a module of its own: the conf loader
# and the policy both use it.
set -euo pipefail
cd "$(dirname "$0")/.."

module() {
    local m=${1##*/}
    m=${m%.*}
    case $m in
    *_impl) m=${m%_impl} ;;
    broker_memory | broker_redis | broker_redis_pub | redis_conn) m=broker ;;
    registry_local | registry_redis) m=broker ;; # the brokers' registries
    config_keys | config_reload | config_channels | config_lookup) m=config ;;
    proto_encode | proto_text) m=proto ;;
    server_ws) m=server ;;
    spec_host | spec_actions | spec_world) m=spec ;;
    session_host) m=session ;;
    tls_ctx) m=tls ;;
    lua_limits) ;;
    lua_* | policy_* | sandbox) m=policy ;;
    esac
    echo "$m"
}

graph() {
    local f deps
    for f in include/luahub/*.h src/*.h src/*.c; do
        deps=$({ grep -oE '^#include "[^"]+"' "$f" || true; } |
               sed -E 's/#include "(luahub\/)?([^"]+)\.h"/\2/' | sort -u | tr '\n' ' ')
        printf '%-28s %s\n' "${f#*/}" "${deps% }" | sed 's/ *$//'
    done
}

if [ "${1:-}" != --check ]; then
    graph
    exit 0
fi
pairs=$(graph | while read -r f deps; do
    from=$(module "$f")
    for d in $deps; do
        to=$(module "$d")
        [ "$from" = "$to" ] || echo "$to $from"
    done
done)
if ! out=$(echo "$pairs" | tsort 2>&1 >/dev/null) || [ -n "$out" ]; then
    echo "include graph: modules include each other in a circle:" >&2
    echo "$out" >&2
    exit 1
fi
echo "include graph: no circle between modules"
