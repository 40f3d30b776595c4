-- The policy of the fuzz target fuzz_policy (fuzz_policy.c): every
-- decision hook returns values made from the fuzz input, which the target
-- puts in the global FUZZ before each call (FUZZ_JSON says how to read it).
--
-- FUZZ_JSON true: FUZZ is a JSON text, decoded with hub.json.decode; a
-- top-level array is returned as several values ([false, "no", 401] is
-- `return false, "no", 401`), anything else as one value.
--
-- FUZZ_JSON false: FUZZ is a small stack program, one byte per operation
-- (some take the next byte as their argument), that builds what JSON
-- cannot: nil among the values, integers and floats, NaN and infinities,
-- long strings, functions, coroutines, the conn and msg objects, shared
-- and cyclic tables, deep nesting, metatables whose metamethods raise or
-- loop, and hooks that raise, loop or set conn fields on their way out.
-- The stack is returned, bottom first. Unknown bytes do nothing.

local byte, sub, rep = string.byte, string.sub, string.rep

LAST = false -- the second value returned (the reason), for the target

local metas = {
    {__index = function() error("__index raised") end},
    {__index = function() while true do end end},
    {__len = function() return 1e9 end, __pairs = function() error("__pairs raised") end},
    {__newindex = function() error("__newindex raised") end,
     __tostring = function() error("__tostring raised") end},
}

local function build(s, conn, msg, name)
    local st, n, i = {}, 0, 1
    local function push(v) n = n + 1; st[n] = v end
    local function pop()
        if n == 0 then return nil end
        local v = st[n]
        st[n] = nil
        n = n - 1
        return v
    end
    local function arg()
        local b = byte(s, i) or 0
        i = i + 1
        return b
    end
    while i <= #s do
        local op = sub(s, i, i)
        i = i + 1
        if op == "n" then push(nil)
        elseif op == "t" then push(true)
        elseif op == "f" then push(false)
        elseif op == "i" then push(arg() - 128)
        elseif op == "I" then
            local k = arg() % 6
            push(({math.maxinteger, math.mininteger, 399, 400, 599, 600})[k + 1])
        elseif op == "d" then push((arg() - 128) / 8)
        elseif op == "D" then
            local k = arg() % 5
            push(({0/0, math.huge, -math.huge, -0.0, 1e308})[k + 1])
        elseif op == "s" then
            local len = arg()
            push(sub(s, i, i + len - 1))
            i = i + len
        elseif op == "S" then push(rep("\xc3\xa9", arg()) .. rep("x", arg()))
        elseif op == "c" then push(name)
        elseif op == "C" then push("room:" .. arg())
        elseif op == "u" then push(hub.json.null)
        elseif op == "{" then push({})
        elseif op == "[" then push(hub.json.array({}))
        elseif op == "=" then
            local v, k = pop(), pop()
            local t = st[n]
            if type(t) == "table" and k ~= nil and k == k then rawset(t, k, v) end
        elseif op == "," then
            local v = pop()
            local t = st[n]
            if type(t) == "table" then rawset(t, rawlen(t) + 1, v) end
        elseif op == "x" then push(st[n])
        elseif op == "y" then push(st[n - 1])
        elseif op == "w" then push({pop()})
        elseif op == "W" then
            local t = pop()
            for _ = 1, arg() * 8 do t = {t} end
            push(t)
        elseif op == "F" then push(function() return 1 end)
        elseif op == "R" then push(coroutine.create(function() end))
        elseif op == "K" then push(conn)
        elseif op == "M" then push(msg)
        elseif op == "Z" then push(msg and msg.data)
        elseif op == "m" then
            local t = st[n]
            local mt = metas[arg() % #metas + 1]
            if type(t) == "table" and getmetatable(t) == nil then setmetatable(t, mt) end
        elseif op == "U" then conn.user = pop()
        elseif op == "N" then conn.info = pop()
        elseif op == "P" then conn.protocol = pop()
        elseif op == "e" then
            local len = arg()
            error(sub(s, i, i + len - 1))
        elseif op == "E" then error({})
        elseif op == "L" then while true do end
        elseif op == "B" then
            local t = {}
            for k = 1, 1e8 do t[k] = k end
        end
    end
    LAST = st[2]
    return table.unpack(st, 1, n)
end

local function values(conn, msg, name)
    if not FUZZ_JSON then return build(FUZZ, conn, msg, name) end
    local v = hub.json.decode(FUZZ)
    if type(v) == "table" and sub(FUZZ, 1, 1) == "[" then
        LAST = v[2]
        return table.unpack(v, 1, rawlen(v))
    end
    LAST = false
    return v
end

function on_connect(conn, req) return values(conn, nil, req.path) end
function on_subscribe(conn, channel) return values(conn, nil, channel) end
function on_publish(conn, channel, msg) return values(conn, msg, channel) end
function on_rpc(conn, method, data) return values(conn, nil, method) end
