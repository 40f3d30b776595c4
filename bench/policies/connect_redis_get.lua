-- bench/run.sh hook_connect: on_connect checks a session with one Redis GET
-- (hub.redis, on the conf's policy_redis): the hook waits for the reply, the
-- upgrade is answered when it is done. loadgen sends no token, so the key is
-- missing (GET answers nil: false in Lua) and the connection is allowed; a
-- Redis that does not answer refuses it.
function on_connect(conn, req)
    local v, err = hub.redis("GET", "bench:session:" .. (req.query.token or "none"))
    if v == nil then return false, err, 503 end
    return true
end
