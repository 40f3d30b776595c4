-- bench/run.sh hook_publish: on_publish with a per-process rate limit
-- (hub.ratelimit, a token bucket in hub.shared) per connection, with a rate
-- and burst no publisher reaches, then the original bytes (true).
function on_publish(conn, ch, msg)
    local ok = hub.ratelimit(conn.id, 1e9, 1e9)
    if not ok then return false, "slow down" end
    return true
end
