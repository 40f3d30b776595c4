-- bench/run.sh hook_publish: on_publish with a rate limit shared by every hub
-- (hub.ratelimit_redis: one EVALSHA per publish, on the conf's policy_redis);
-- the hook waits for Redis, the publish goes on after it. A rate and burst no
-- publisher reaches; a Redis that cannot answer refuses the publish.
function on_publish(conn, ch, msg)
    local ok, err = hub.ratelimit_redis(conn.id, 1e9, 1e9)
    if ok == nil then return false, err end
    if not ok then return false, "slow down" end
    return true
end
