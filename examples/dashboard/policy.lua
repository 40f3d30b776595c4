-- Dashboard policy for luahub (README.md in this directory).
--
-- Browsers only watch: they may subscribe to dash:<name> channels and may
-- not publish. Data comes from a backend through the HTTP API
-- (POST /api/publish), which the policy does not see: the API is trusted
-- (it needs the api_key, or a loopback peer without one).

local CHANNEL = "^dash:[%w_.%-]+$"

function on_subscribe(conn, channel)
    if channel:match(CHANNEL) then
        return true
    end
    return false, "dashboards show dash:<name> channels only"
end

function on_publish(conn, channel, msg)
    return false, "read-only: dashboards are updated through the HTTP API"
end

-- {"op":"rpc","method":"channels"}: what this connection watches.
function on_rpc(conn, method, data)
    if method == "channels" then
        return conn:channels()
    end
    return nil, "unknown method '" .. method .. "' (channels)"
end
