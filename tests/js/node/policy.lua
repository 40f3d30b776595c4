-- The policy of the node tests of luahub.js (tests/js/node/*.test.mjs).
--   token "bad": refused with 401; "forbidden": 403; any other token (query parameter, or
--   subprotocol token.<t>) becomes conn.user. Without a token: anonymous.
local function token(req)
    for _, p in ipairs(req.protocols or {}) do
        local t = p:match("^token%.(.+)$")
        if t then
            return t, p
        end
    end
    return req.query.token
end

function on_connect(conn, req)
    local t, proto = token(req)
    if t == "bad" then
        return false, "bad token", 401
    end
    if t == "forbidden" then
        return false, "go away", 403
    end
    conn.user = t
    conn.info = {via = proto and "protocol" or "query"}
    return true
end

local methods = {}

function methods.echo(conn, data) return data end
function methods.whoami(conn) return {user = conn.user, info = conn.info} end
function methods.fail() return nil, "it failed" end
function methods.loop() while true do end end
-- {n = count, list = channels} (an empty list would be {} in JSON: see methods.empty)
function methods.channels(conn)
    local list = conn:channels()
    return {n = #list, list = list}
end
function methods.empty() return hub.json.array({}) end

-- Publishes n frames of `size` bytes to `channel` within this one hook call: with a small
-- max_queue_bytes the subscribers' queues overflow before any is written (close 4001).
function methods.flood(conn, data)
    local filler = ("x"):rep(data.size)
    for i = 1, data.n do
        hub.publish(data.channel, {i = i, filler = filler})
    end
    return true
end

function on_rpc(conn, method, data)
    local m = methods[method]
    if not m then
        return nil, "no method " .. method
    end
    return m(conn, data)
end
