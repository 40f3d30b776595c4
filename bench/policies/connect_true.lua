-- bench/run.sh hook_connect: a trivial on_connect. The hub builds `req`
-- (path, query, headers, remote address) and calls the hook for every
-- WebSocket upgrade.
function on_connect(conn, req)
    return true
end
