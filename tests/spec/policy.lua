-- A policy for tests/spec/lang_spec.lua: small hooks that use every part of the
-- policy API a spec can observe (docs/testing-policies.md).

local loads = 0            -- per policy state: a fresh state for each test
loads = loads + 1
local log = {}             -- what the timers did, in order

function on_connect(conn, req)
    if req.query.boom then error("boom in on_connect") end
    if req.headers["x-api-token"] == "wrong" then return false, "bad api token", 403 end
    if req.origin == "https://evil.example" then return false, "origin", 451 end
    for _, p in ipairs(req.protocols) do
        local t = p:match("^token%.(.+)$")
        if t then
            conn.user = t
            conn.protocol = p
        end
    end
    conn.user = conn.user or req.query.user
    conn.info = {addr = req.remote_addr, path = req.path, agent = req.headers["user-agent"]}
    return true
end

function on_subscribe(conn, channel)
    if channel == "err" then return nil + 1 end
    if channel == "mine" then return "mine:" .. (conn.user or conn.id) end
    return true
end

function on_publish(conn, channel, msg)
    if channel == "loop" then while true do end end
    if channel == "kick" then
        conn:close(4003, "kicked")
        return false, "bye"
    end
    if channel == "raw" then return true end
    return {channel = channel, data = {got = msg.data, by = conn.user}}
end

local methods = {}

function methods.loads() return loads end
function methods.vars() return hub.vars end
function methods.now() return {now = hub.now(), time = os.time()} end
function methods.push(conn, data)
    conn:send(data)
    return true
end
function methods.push_to(conn, data)
    local other = hub.conn(data.id)
    if not other then return nil, "no such connection" end
    return other:send(data.msg)
end
function methods.timers(conn)
    log = {}
    hub.after(3, function() log[#log + 1] = "c" hub.publish("timers", {step = "c", at = hub.now()}) end)
    hub.after(1, function() log[#log + 1] = "a" hub.publish("timers", {step = "a", at = hub.now()}) end)
    hub.after(2, function() log[#log + 1] = "b" end)
    local t = hub.after(2.5, function() log[#log + 1] = "cancelled" end)
    t:cancel()
    hub.after(0, function() log[#log + 1] = "zero" end)
    return true
end
function methods.log() return log end
function methods.tick(conn)
    -- every second, until told to stop
    local n = 0
    local function tick()
        n = n + 1
        hub.publish("ticks", {n = n})
        if n < 5 then hub.after(1, tick) end
    end
    hub.after(1, tick)
    return true
end
function methods.bad_timer()
    hub.after(1, function() local x = nil; return x.y end)
    return true
end
function methods.presence(conn, data) return hub.presence(data) end
function methods.kick(conn, data)
    local other = hub.conn(data)
    return other and other:close(4000, "by " .. (conn.user or "?"))
end
function methods.say(conn, data)
    hub.log("info", "say", data)
    return true
end
function methods.bad_return() return function() end end
function methods.refuse() return nil, "no way" end

function on_rpc(conn, method, data)
    local m = methods[method]
    if not m then return nil, "unknown method " .. method end
    return m(conn, data)
end

function on_disconnect(conn, code, reason)
    hub.publish("gone", {id = conn.id, code = code, reason = reason, channels = conn:channels()})
end
