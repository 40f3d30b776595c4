-- The spec language of `luahub test` (docs/testing-policies.md documents
-- every function here). Embedded in the binary and run in the spec's own
-- Lua state, never in the policy's: `host` holds the world's functions
-- (src/spec_actions.c: connect, command, advance, ...) and the runner's
-- (src/spec.c: run, report, where). Returns {env, run_file}: the globals a
-- spec file sees, and the function that runs one.

local host, file = ...
local json = host.json
local null = json.null

local env = setmetatable({}, {__index = _G})
local api = {env = env}

-- ---- showing values ---------------------------------------------------------

local Matcher = {}              -- metatable of any(), match(), like() ...
local Conn, Reply, Result = {}, {}, {}
local show

local function quote(s)
    return '"' .. s:gsub('[%c"\\]', function(c)
        local esc = {['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\t'] = '\\t', ['\r'] = '\\r'}
        return esc[c] or ("\\%03d"):format(c:byte())
    end) .. '"'
end

local function show_number(n)
    if math.type(n) == "float" and n == math.floor(n) and math.abs(n) < 2^53 then
        return ("%.0f"):format(n)
    end
    return tostring(n)
end

local function sorted_keys(t)
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b)
        local ta, tb = type(a), type(b)
        if ta ~= tb then return ta == "number" end
        if ta == "number" or ta == "string" then return a < b end
        return tostring(a) < tostring(b)
    end)
    return keys
end

local function is_list(t)
    local n = 0
    for _ in pairs(t) do n = n + 1 end
    return n == #t
end

local function show_table(t, depth)
    if depth > 6 then return "{...}" end
    local parts = {}
    if is_list(t) then
        for _, v in ipairs(t) do parts[#parts + 1] = show(v, depth + 1) end
    else
        for _, k in ipairs(sorted_keys(t)) do
            local key = type(k) == "string" and k:match("^[%a_][%w_]*$") and k
                        or "[" .. show(k, depth + 1) .. "]"
            parts[#parts + 1] = key .. " = " .. show(t[k], depth + 1)
        end
    end
    return "{" .. table.concat(parts, ", ") .. "}"
end

function show(v, depth)
    depth = depth or 0
    local mt = getmetatable(v)
    if mt == Matcher then return v.desc end
    if mt == Conn then return "connection " .. v.id end
    if v == null then return "null" end
    local t = type(v)
    if t == "string" then return quote(v) end
    if t == "number" then return show_number(v) end
    if t == "table" then return show_table(v, depth) end
    return tostring(v)
end

-- Shortened for a report line.
local function shown(v)
    local s = show(v)
    if #s > 600 then s = s:sub(1, 600) .. " ..." end
    return s
end

-- ---- comparing ----------------------------------------------------------------

local function matcher(desc, test)
    return setmetatable({desc = desc, test = test}, Matcher)
end

local function path_key(path, k)
    if type(k) == "string" and k:match("^[%a_][%w_]*$") then
        return path == "" and k or path .. "." .. k
    end
    return path .. "[" .. show(k) .. "]"
end

-- The first difference between what was expected and what came, or nil:
-- {path = "text" (where in the value), why = "..."}.
local diff

local function diff_table(exp, got, path, partial)
    if type(got) ~= "table" or got == null or getmetatable(got) then
        return {path = path, why = "expected " .. shown(exp) .. ", got " .. shown(got)}
    end
    for _, k in ipairs(sorted_keys(exp)) do
        local d = diff(exp[k], got[k], path_key(path, k))
        if d then return d end
    end
    if not partial then
        for _, k in ipairs(sorted_keys(got)) do
            if exp[k] == nil then
                return {path = path_key(path, k), why = "not expected, got " .. shown(got[k])}
            end
        end
    end
end

function diff(exp, got, path)
    path = path or ""
    if getmetatable(exp) == Matcher then
        local ok, why = exp.test(got, path)
        if ok then return nil end
        if type(why) == "table" then return why end
        return {path = path, why = why or ("expected " .. exp.desc .. ", got " .. shown(got))}
    end
    if type(exp) == "table" and exp ~= null and not getmetatable(exp) then
        return diff_table(exp, got, path, false)
    end
    if exp == got then return nil end
    if got == nil then
        return {path = path, why = "expected " .. shown(exp) .. ", got nothing (nil)"}
    end
    return {path = path, why = "expected " .. shown(exp) .. ", got " .. shown(got)}
end

-- "what.path: why" ("conn.info.name: ..."), or "what: path: why" when
-- `what` is a phrase ("the message to room:1: ts: ...").
local function describe(d, what)
    local where = d.path ~= "" and d.path or nil
    if what and where then
        where = what .. (what:find(" ") and ": " or ".") .. where
    end
    return (where or what) and (where or what) .. ": " .. d.why or d.why
end

-- ---- failures of expectations ---------------------------------------------------

local Failure = {}

local function fail(message, expected, got, notes)
    error(setmetatable({message = message, expected = expected, got = got, notes = notes},
                       Failure), 0)
end

-- A mistake in how the spec calls a function: reported at the spec's line.
local function usage(msg)
    error(msg, 0)
end

local function check_arg(v, want, fn, what)
    if type(v) ~= want then
        usage(("%s: %s must be a %s (got %s)"):format(fn, what, want, type(v)))
    end
end

-- ---- the tests ------------------------------------------------------------------------

local top = {name = file:match("[^/]*$"), checks = 0, used = false}
local had_tests = false
local current = top
local gen = 0                   -- the world's generation: handles of older ones are stale
local base_vars = json.decode(host.vars)

-- The test's vars over the conf's (name = string, number or boolean, as
-- the conf's policy_vars).
local function merge(into, from)
    for k, v in pairs(from) do
        local t = type(v)
        if type(k) ~= "string" or (t ~= "string" and t ~= "number" and t ~= "boolean") then
            usage(("test: vars.%s must be a string, a number or a boolean (got %s)")
                  :format(tostring(k), t))
        end
        into[k] = v
    end
    return into
end

local function copy(t)
    return json.decode(json.encode(t))
end

local function used()
    current.used = true
end

local function checked()
    current.checks = current.checks + 1
end

-- A fresh world: a new policy (with the test's vars), no connection, the
-- clock at its start.
local function reset(opts)
    local vars = copy(base_vars)
    if opts and opts.vars then merge(vars, opts.vars) end
    gen = gen + 1
    env.vars = vars
    local vars_json = opts and opts.vars and json.encode(vars) or nil
    return host.reset(vars_json, opts and opts.now)
end

local function decode(s)
    if s == nil then return nil end
    return json.decode(s)
end

-- The failures of the policy nobody looked at.
local function unseen_failures()
    local out = {}
    for _, f in ipairs(host.failures()) do
        if not f.seen then out[#out + 1] = f end
    end
    return out
end

local function failure_text(f)
    return "hook=" .. f.hook .. " " .. f.what .. (f.conn_id and " [conn " .. f.conn_id .. "]" or "")
end

local function finish(t, passed, e)
    local r = {name = t.name, checks = t.checks, ok = passed}
    if passed then
        local unseen = unseen_failures()
        if #unseen > 0 then
            r.ok = false
            r.where = t.where
            r.message = ("the policy failed %d time%s and no expectation was about it " ..
                         "(check it with .failed(...) or failures())")
                        :format(#unseen, #unseen == 1 and "" or "s")
            r.notes = {}
            for i, f in ipairs(unseen) do
                if i > 5 then r.notes[#r.notes + 1] = "  ..." break end
                r.notes[#r.notes + 1] = "  " .. failure_text(f)
            end
        end
    else
        e = type(e) == "table" and e or {message = tostring(e)}
        r.where = e.where or t.where
        local msg = e.message or "failed"
        -- "file:12: attempt to ..." at file:12: the position once
        if r.where and msg:sub(1, #r.where + 2) == r.where .. ": " then
            msg = msg:sub(#r.where + 3)
        end
        r.message, r.expected, r.got, r.notes = msg, e.expected, e.got, e.notes
    end
    if not r.ok then r.logs = host.logs() end
    host.report(r)
end

-- Runs fn as the test `name` (or `t`, the code outside tests).
local function run_test(t, opts, fn)
    current = t
    local ok, errs = reset(opts)
    local passed, e
    if ok then
        passed, e = host.run(fn)
    else
        passed, e = false, {message = "the policy did not load:", notes = {errs}}
    end
    finish(t, passed, e)
    current = top
end

-- test(name[, opts], fn): opts.vars (merged over the conf's policy_vars),
-- opts.now (the clock's start, ms since the epoch).
function env.test(name, opts, fn)
    if fn == nil then opts, fn = nil, opts end
    check_arg(name, "string", "test", "the name")
    check_arg(fn, "function", "test", "the body")
    if opts ~= nil then
        check_arg(opts, "table", "test", "the options")
        for k in pairs(opts) do
            if k ~= "vars" and k ~= "now" then
                usage(("test: unknown option '%s' (vars, now)"):format(tostring(k)))
            end
        end
        if opts.vars ~= nil then
            check_arg(opts.vars, "table", "test", "opts.vars")
            merge({}, opts.vars) -- the names and types, before anything runs
        end
        if opts.now ~= nil then check_arg(opts.now, "number", "test", "opts.now") end
    end
    if current ~= top then usage("test() inside a test: tests do not nest") end
    had_tests = true
    run_test({name = name, checks = 0, used = false, where = host.where()}, opts, fn)
    reset(nil) -- the rest of the file starts afresh too
end

function api.run_file(chunk)
    current = top
    local ok, errs = reset(nil)
    if not ok then
        finish(top, false, {message = "the policy did not load:", notes = {errs}})
        return
    end
    local passed, e = host.run(chunk)
    if not passed or top.used or top.checks > 0 then
        current = top
        if had_tests then top.name = "(code outside the tests of " .. top.name .. ")" end
        finish(top, passed, e)
    end
end

-- ---- connections ------------------------------------------------------------------

local function stale(c)
    if c._gen ~= gen then
        usage(("connection %s belongs to an earlier test (each test starts from a fresh " ..
               "policy): connect it in this one"):format(c.id))
    end
end

-- The failures recorded during an action: seen once an expectation looks.
local function see(failures)
    for _, i in ipairs(failures or {}) do host.see_failure(i) end
end

local function last_failure(failures)
    local i = failures and failures[#failures]
    if not i then return nil end
    local f = host.failures()[i]
    return f and failure_text(f)
end

local function new_result(r, mt, fields)
    r._gen = gen
    for _, m in ipairs(r.messages or {}) do m.data = decode(m.data) end
    for k, v in pairs(fields or {}) do r[k] = v end
    return setmetatable(r, mt)
end

local function encode_query(q)
    local function enc(s)
        return (tostring(s):gsub("[^%w%-%._~]", function(c) return ("%%%02X"):format(c:byte()) end))
    end
    local parts = {}
    for _, k in ipairs(sorted_keys(q)) do
        local v = q[k]
        if v == true then
            parts[#parts + 1] = enc(k)
        elseif type(v) == "string" or type(v) == "number" then
            parts[#parts + 1] = enc(k) .. "=" .. enc(v)
        else
            usage(("connect: query.%s must be a string, a number or true (got %s)")
                  :format(tostring(k), type(v)))
        end
    end
    return table.concat(parts, "&")
end

local CONNECT_OPTS = {query = 1, headers = 1, origin = 1, protocols = 1, path = 1, remote_addr = 1}

-- connect{query =, headers =, origin =, protocols =, path =, remote_addr =}
function env.connect(opts)
    opts = opts or {}
    check_arg(opts, "table", "connect", "the argument")
    for k in pairs(opts) do
        if not CONNECT_OPTS[k] then
            usage(("connect: unknown field '%s' (query, headers, origin, protocols, path, " ..
                   "remote_addr)"):format(tostring(k)))
        end
    end
    used()
    local query = opts.query or ""
    if type(query) == "table" then query = encode_query(query) end
    check_arg(query, "string", "connect", "query")
    local given = {}
    for k, v in pairs(opts.headers or {}) do
        check_arg(k, "string", "connect", "a header name")
        if type(v) ~= "string" then
            usage(("connect: header %s must be a string (got %s)"):format(k, type(v)))
        end
        given[k:lower()] = v
    end
    if opts.origin ~= nil then
        check_arg(opts.origin, "string", "connect", "origin")
        given.origin = opts.origin
    end
    if opts.protocols ~= nil then
        check_arg(opts.protocols, "table", "connect", "protocols")
        if #opts.protocols > 0 then
            given["sec-websocket-protocol"] = table.concat(opts.protocols, ", ")
        end
    end
    local headers = {}
    for _, h in ipairs({{"host", "localhost"}, {"upgrade", "websocket"},
                        {"connection", "Upgrade"},
                        {"sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="},
                        {"sec-websocket-version", "13"}}) do
        if given[h[1]] == nil then headers[#headers + 1] = h end
    end
    for _, k in ipairs(sorted_keys(given)) do headers[#headers + 1] = {k, given[k]} end
    if opts.path ~= nil then check_arg(opts.path, "string", "connect", "path") end
    if opts.remote_addr ~= nil then check_arg(opts.remote_addr, "string", "connect", "remote_addr") end
    local r = host.connect{query = query, headers = headers, path = opts.path,
                           remote_addr = opts.remote_addr}
    local c = new_result(r, Conn, {_id = r.id, id = r.name})
    c.name, c.messages = nil, nil
    return c
end

local conn_methods = {}

local function cmd_id(c)
    c._n = (c._n or 0) + 1
    return c._n
end

local function frame(fields)
    local parts = {}
    for _, f in ipairs(fields) do parts[#parts + 1] = json.encode(f[1]) .. ":" .. f[2] end
    return "{" .. table.concat(parts, ",") .. "}"
end

local function encode(v, fn)
    local ok, s = pcall(json.encode, v)
    if not ok then usage(("%s: the data cannot be encoded as JSON: %s"):format(fn, s)) end
    return s
end

local function command(c, kind, text)
    stale(c)
    used()
    if not c.accepted then
        usage(("%s: connection %s was refused (%s %s): it never opened")
              :format(kind, c.id, show(c.status), quote(c.reason or "")))
    end
    local info = host.conn_info(c._id)
    if info.state ~= "open" then
        usage(("%s: connection %s is closed (%s%s)"):format(kind, c.id,
              show(info.close_code), info.close_reason ~= "" and ", " .. quote(info.close_reason) or ""))
    end
    local r = host.command(c._id, text)
    return new_result(r, Reply, {kind = kind, conn = c, data = decode(r.data)})
end

function conn_methods.subscribe(c, channel)
    check_arg(channel, "string", "subscribe", "the channel")
    return command(c, "subscribe", frame{{"op", '"subscribe"'}, {"channel", json.encode(channel)},
                                         {"id", cmd_id(c)}})
end

function conn_methods.unsubscribe(c, channel)
    check_arg(channel, "string", "unsubscribe", "the channel")
    return command(c, "unsubscribe", frame{{"op", '"unsubscribe"'},
                                           {"channel", json.encode(channel)}, {"id", cmd_id(c)}})
end

function conn_methods.publish(c, channel, data)
    check_arg(channel, "string", "publish", "the channel")
    if data == nil then usage("publish: the data is missing (json.null is JSON's null)") end
    return command(c, "publish", frame{{"op", '"publish"'}, {"channel", json.encode(channel)},
                                       {"data", encode(data, "publish")}, {"id", cmd_id(c)}})
end

function conn_methods.rpc(c, method, data)
    check_arg(method, "string", "rpc", "the method")
    local f = {{"op", '"rpc"'}, {"method", json.encode(method)}}
    if data ~= nil then f[#f + 1] = {"data", encode(data, "rpc")} end
    f[#f + 1] = {"id", cmd_id(c)}
    return command(c, "rpc", frame(f))
end

function conn_methods.send(c, text)
    check_arg(text, "string", "send", "the frame")
    return command(c, "send", text)
end

function conn_methods.disconnect(c, code)
    stale(c)
    used()
    code = code or 1000
    check_arg(code, "number", "disconnect", "the code")
    if not c.accepted then usage("disconnect: connection " .. c.id .. " was refused") end
    if host.conn_info(c._id).state ~= "open" then
        usage("disconnect: connection " .. c.id .. " is closed already")
    end
    local n = math.tointeger(code)
    if not n then usage("disconnect: the code must be an integer") end
    return new_result(host.disconnect(c._id, n), Result)
end

function conn_methods.frames(c)
    stale(c)
    local out = {}
    for _, f in ipairs(host.frames(c._id)) do
        out[#out + 1] = {kind = f.kind, channel = f.channel, data = decode(f.data),
                         code = f.code, reason = f.reason}
    end
    return out
end

function conn_methods.channels(c)
    stale(c)
    return host.conn_info(c._id).channels
end

local conn_fields = {
    user = function(info) return info.user end,
    info = function(info) return decode(info.info) end,
    protocol = function(info) return info.protocol end,
    state = function(info) return info.state end,
}

Conn.__index = function(c, k)
    if conn_methods[k] then return conn_methods[k] end
    if conn_fields[k] then
        stale(c)
        return conn_fields[k](host.conn_info(c._id))
    end
    return nil
end
Conn.__tostring = function(c) return "connection " .. c.id end
Reply.__tostring = function(r) return r.kind .. " reply" end

-- ---- the clock, the HTTP API, helpers ---------------------------------------------

function env.advance(seconds)
    check_arg(seconds, "number", "advance", "the time (seconds)")
    if not (seconds >= 0 and seconds < 1e9) then
        usage("advance: the time must be 0 to 1e9 seconds (the clock only moves forward)")
    end
    used()
    return new_result(host.advance(math.floor(seconds * 1000 + 0.5)), Result)
end

function env.now()
    return host.now()
end

function env.api_publish(channel, data)
    check_arg(channel, "string", "api_publish", "the channel")
    if data == nil then usage("api_publish: the data is missing (json.null is JSON's null)") end
    used()
    return new_result(host.api_publish(channel, encode(data, "api_publish")), Result)
end

-- A JSON object with its keys in a stable order (`first`, then sorted), so
-- that the same claims make the same token.
local function encode_object(t, first)
    local parts, done = {}, {}
    local function add(k)
        if t[k] ~= nil and not done[k] then
            done[k] = true
            parts[#parts + 1] = json.encode(tostring(k)) .. ":" .. encode(t[k], "jwt")
        end
    end
    for _, k in ipairs(first) do add(k) end
    for _, k in ipairs(sorted_keys(t)) do add(k) end
    return "{" .. table.concat(parts, ",") .. "}"
end

-- jwt{claims..., secret = "...", header = {...}}: an HS256 token.
function env.jwt(claims)
    check_arg(claims, "table", "jwt", "the claims")
    check_arg(claims.secret, "string", "jwt", "secret")
    local header = {alg = "HS256", typ = "JWT"}
    if claims.header ~= nil then
        check_arg(claims.header, "table", "jwt", "header")
        for k, v in pairs(claims.header) do header[k] = v end
    end
    local body = {}
    for k, v in pairs(claims) do
        if k ~= "secret" and k ~= "header" then body[k] = v end
    end
    local h = host.b64url(encode_object(header, {"alg", "typ"}))
    local b = host.b64url(encode_object(body, {}))
    return h .. "." .. b .. "." .. host.b64url(host.hmac_sha256(claims.secret, h .. "." .. b))
end

-- failures(): the policy's failures no expectation has looked at yet, each
-- {hook, message, conn}; they count as looked at from now.
function env.failures()
    local out = {}
    for _, f in ipairs(unseen_failures()) do
        host.see_failure(f.index)
        out[#out + 1] = {hook = f.hook, message = f.what, conn = f.conn}
    end
    return out
end

function env.logs()
    return host.logs()
end

env.json = {encode = json.encode, decode = json.decode, null = null}

-- ---- matchers -----------------------------------------------------------------------

function env.any(kind)
    if kind ~= nil then check_arg(kind, "string", "any", "the type") end
    return matcher(kind and "any " .. kind or "anything", function(v)
        if kind == nil then return v ~= nil end
        return type(v) == kind
    end)
end

function env.match(pattern)
    check_arg(pattern, "string", "match", "the pattern")
    return matcher("a string matching " .. quote(pattern), function(v)
        return type(v) == "string" and v:find(pattern) ~= nil
    end)
end

function env.containing(text)
    check_arg(text, "string", "containing", "the text")
    return matcher("a string containing " .. quote(text), function(v)
        return type(v) == "string" and v:find(text, 1, true) ~= nil
    end)
end

function env.like(t)
    check_arg(t, "table", "like", "the argument")
    return matcher("like " .. show(t), function(v, path)
        local d = diff_table(t, v, path, true)
        return d == nil, d
    end)
end

-- ---- expect ----------------------------------------------------------------------------

-- Compares and fails with the first difference.
local function same(exp, got, what)
    local d = diff(exp, got)
    if d then fail(describe(d, what), shown(exp), shown(got)) end
end

local function text_matches(want, text)
    if want == nil then return true end
    if getmetatable(want) == Matcher then return want.test(text) end
    return type(text) == "string" and text:find(want, 1, true) ~= nil
end

-- A reply or result as a line: `error forbidden "log in first"`.
local function reply_desc(r)
    if r.closed then
        return ("the connection was closed (%s %s)"):format(show(r.closed.code), quote(r.closed.reason))
    end
    if r.ok == nil then return "a result" end
    if r.ok then
        if r.kind == "subscribe" then return "subscribed to " .. quote(r.channel) end
        if r.kind == "rpc" then return "ok, data " .. shown(r.data) end
        return "ok"
    end
    local s = ("error %s %s"):format(r.error, quote(r.message))
    local f = r.error == "internal" and last_failure(r.failures)
    if f then s = s .. " (" .. f .. ")" end
    return s
end

local function conn_desc(c)
    if c.accepted then
        local info = host.conn_info(c._id)
        return "accepted" .. (info.user and " (user " .. quote(info.user) .. ")" or "")
    end
    local s = ("refused %s %s"):format(show(c.status), quote(c.reason))
    local f = c.status == 500 and last_failure(c.failures)
    if f then s = s .. " (" .. f .. ")" end
    return s
end

local function messages_desc(msgs)
    if #msgs == 0 then return "nothing was published" end
    local parts = {}
    for _, m in ipairs(msgs) do parts[#parts + 1] = m.channel .. " " .. shown(m.data) end
    return table.concat(parts, "; ")
end

local function check_delivered(r, channel, data)
    check_arg(channel, "string", "delivered_to", "the channel")
    local near
    for _, m in ipairs(r.messages or {}) do
        if m.channel == channel then
            if data == nil or diff(data, m.data) == nil then return end
            near = near or m
        end
    end
    local exp = channel .. (data ~= nil and " " .. shown(data) or "")
    if near then
        fail(describe(diff(data, near.data), "the message to " .. channel), exp,
             messages_desc(r.messages))
    end
    fail("no message was published to " .. channel .. (data ~= nil and " with that data" or ""),
         exp, messages_desc(r.messages))
end

local function check_failed(failures, text, what)
    for i = #(failures or {}), 1, -1 do
        local f = host.failures()[failures[i]]
        if text_matches(text, f.what) then
            host.see_failure(f.index)
            return
        end
    end
    local last = last_failure(failures)
    fail(what .. ": no failure of the policy" .. (text and " like that" or ""),
         "a failure" .. (text and " containing " .. show(text) or ""),
         last or "no failure")
end

-- Frames of `c` of `kind` nobody has matched yet.
local function unseen_frames(c, kind)
    local out = {}
    for _, f in ipairs(host.frames(c._id)) do
        if not f.seen and (kind == nil or f.kind == kind) then out[#out + 1] = f end
    end
    return out
end

local function frames_desc(frames)
    if #frames == 0 then return "nothing" end
    local parts = {}
    for _, f in ipairs(frames) do
        if f.kind == "message" then
            parts[#parts + 1] = "message " .. f.channel .. " " .. shown(decode(f.data))
        elseif f.kind == "push" then
            parts[#parts + 1] = "push " .. shown(decode(f.data))
        end
    end
    return table.concat(parts, "; ")
end

local checks = {}

checks.conn = {
    accepted = function(c)
        if not c.accepted then fail("the connection was refused", "accepted", conn_desc(c)) end
    end,
    refused = function(c, status, reason)
        if status ~= nil and math.type(status) ~= "integer" and getmetatable(status) ~= Matcher then
            usage("refused: the status must be an integer HTTP status (401), or nil")
        end
        local exp = "refused" .. (status and " " .. show(status) or "") ..
                    (reason ~= nil and " " .. show(reason) or "")
        if c.accepted then fail("the connection was accepted", exp, conn_desc(c)) end
        if status ~= nil and diff(status, c.status) then
            fail(describe(diff(status, c.status), "status"), exp, conn_desc(c))
        end
        if reason ~= nil and diff(reason, c.reason) then
            fail(describe(diff(reason, c.reason), "reason"), exp, conn_desc(c))
        end
        if c.status == 500 then see(c.failures) end -- expected: on_connect failed
    end,
    failed = function(c, text)
        if c.accepted or c.status ~= 500 then
            fail("on_connect did not fail", "refused 500 (on_connect failed)", conn_desc(c))
        end
        check_failed(c.failures, text, "on_connect")
    end,
    user = function(c, v) same(v, host.conn_info(c._id).user, "conn.user") end,
    info = function(c, v) same(v, decode(host.conn_info(c._id).info), "conn.info") end,
    protocol = function(c, v) same(v, host.conn_info(c._id).protocol, "conn.protocol") end,
    pushed = function(c, data)
        local pushes = unseen_frames(c, "push")
        for _, f in ipairs(pushes) do
            if data == nil or diff(data, decode(f.data)) == nil then
                host.see_frame(c._id, f.index)
                return
            end
        end
        fail(#pushes == 0 and "no push" or "no push like that",
             "a push" .. (data ~= nil and " " .. shown(data) or ""),
             "pushes: " .. frames_desc(pushes))
    end,
    received = function(c, channel, data)
        check_arg(channel, "string", "received", "the channel")
        local msgs = unseen_frames(c, "message")
        for _, f in ipairs(msgs) do
            if f.channel == channel and (data == nil or diff(data, decode(f.data)) == nil) then
                host.see_frame(c._id, f.index)
                return
            end
        end
        fail("no message on " .. channel .. (data ~= nil and " like that" or ""),
             "message " .. channel .. (data ~= nil and " " .. shown(data) or ""),
             "messages: " .. frames_desc(msgs))
    end,
    received_nothing = function(c)
        local left = {}
        for _, f in ipairs(unseen_frames(c)) do
            if f.kind ~= "close" then left[#left + 1] = f end
        end
        if #left > 0 then
            fail(("%d message%s or push%s not expected"):format(#left, #left == 1 and "" or "s",
                 #left == 1 and "" or "es"), "nothing", frames_desc(left))
        end
    end,
    closed = function(c, code, reason)
        local info = host.conn_info(c._id)
        local exp = "closed" .. (code and " " .. show(code) or "") ..
                    (reason ~= nil and " " .. show(reason) or "")
        if info.state ~= "closed" then
            fail("the connection is " .. info.state, exp, info.state)
        end
        local got = ("closed %s %s"):format(show(info.close_code), quote(info.close_reason))
        if code ~= nil and diff(code, info.close_code) then
            fail(describe(diff(code, info.close_code), "code"), exp, got)
        end
        if reason ~= nil and diff(reason, info.close_reason) then
            fail(describe(diff(reason, info.close_reason), "reason"), exp, got)
        end
    end,
    open = function(c)
        local state = host.conn_info(c._id).state
        if state ~= "open" then fail("the connection is " .. state, "open", state) end
    end,
}

checks.reply = {
    ok = function(r)
        if not r.ok then fail("the " .. r.kind .. " failed", "ok", reply_desc(r)) end
    end,
    to_be = function(r, v)
        if r.kind ~= "subscribe" and r.kind ~= "rpc" then
            usage("to_be on a " .. r.kind .. " reply: it has no value (use ok() or delivered_to())")
        end
        local exp = r.kind == "subscribe" and "subscribed to " .. shown(v) or "ok, data " .. shown(v)
        if not r.ok then fail("the " .. r.kind .. " failed", exp, reply_desc(r)) end
        local got = r.kind == "subscribe" and r.channel or r.data
        local d = diff(v, got)
        if d then fail(describe(d, r.kind == "subscribe" and "channel" or "data"), exp, reply_desc(r)) end
    end,
    refused = function(r, reason)
        local exp = "refused" .. (reason ~= nil and " " .. show(reason) or "")
        if r.error ~= "forbidden" and r.error ~= "rpc_error" then
            fail("the policy did not refuse the " .. r.kind, exp, reply_desc(r))
        end
        if reason ~= nil and diff(reason, r.message) then
            fail(describe(diff(reason, r.message), "reason"), exp, reply_desc(r))
        end
    end,
    failed = function(r, text)
        if r.error ~= "internal" then
            fail("the policy did not fail", "error internal (the policy failed)", reply_desc(r))
        end
        check_failed(r.failures, text, r.kind)
    end,
    error = function(r, code, message)
        check_arg(code, "string", "error", "the code")
        local exp = "error " .. code .. (message ~= nil and " " .. show(message) or "")
        if r.error ~= code then fail("not the error expected", exp, reply_desc(r)) end
        if message ~= nil and diff(message, r.message) then
            fail(describe(diff(message, r.message), "message"), exp, reply_desc(r))
        end
        if code == "internal" then see(r.failures) end -- expected: the policy failed
    end,
    closed = function(r, code, reason)
        local exp = "closed" .. (code and " " .. show(code) or "")
        if not r.closed then fail("the connection was not closed", exp, reply_desc(r)) end
        if code ~= nil and diff(code, r.closed.code) then
            fail(describe(diff(code, r.closed.code), "code"), exp, reply_desc(r))
        end
        if reason ~= nil and diff(reason, r.closed.reason) then
            fail(describe(diff(reason, r.closed.reason), "reason"), exp, reply_desc(r))
        end
    end,
}

checks.result = {
    delivered_to = check_delivered,
    delivered_nothing = function(r)
        if #(r.messages or {}) > 0 then
            fail("something was published", "nothing published", messages_desc(r.messages))
        end
    end,
    failed = function(r, text)
        check_failed(r.failures, text, "the policy")
    end,
}
checks.reply.delivered_to = checks.result.delivered_to
checks.reply.delivered_nothing = checks.result.delivered_nothing

checks.value = {
    to_be = function(v, exp) same(exp, v) end,
    not_to_be = function(v, exp)
        if diff(exp, v) == nil then fail("the value is " .. shown(v), "not " .. shown(exp), shown(v)) end
    end,
    to_contain = function(v, x)
        if type(v) == "string" then
            check_arg(x, "string", "to_contain", "the text")
            if not v:find(x, 1, true) then fail("the text does not contain " .. quote(x), "containing " .. quote(x), shown(v)) end
            return
        end
        if type(v) ~= "table" then fail("not a string or a list", "containing " .. shown(x), shown(v)) end
        for _, e in ipairs(v) do
            if diff(x, e) == nil then return end
        end
        fail("the list does not contain " .. shown(x), "a list containing " .. shown(x), shown(v))
    end,
}

local function names(t)
    local out = {}
    for k in pairs(t) do out[#out + 1] = k end
    table.sort(out)
    return table.concat(out, ", ")
end

-- expect(v).check(...): fails the test at the first difference. Checks
-- chain: expect(alice).accepted().user("alice").
function env.expect(v)
    local mt = getmetatable(v)
    local kind = mt == Conn and "conn" or mt == Reply and "reply" or mt == Result and "result"
                 or "value"
    if kind == "conn" then stale(v) end
    if (kind == "reply" or kind == "result") and v._gen ~= gen then
        usage("this " .. kind .. " belongs to an earlier test: each test starts from a fresh policy")
    end
    local e = {}
    return setmetatable(e, {
        __index = function(_, name)
            local f = checks[kind][name] or checks.value[name]
            if not f then
                usage(("expect(%s).%s: no such check (checks: %s)"):format(
                    kind == "value" and "a value" or "a " .. kind, tostring(name),
                    names(checks[kind]) .. (kind == "value" and "" or "; " .. names(checks.value))))
            end
            return function(...)
                checked()
                f(v, ...)
                return e
            end
        end,
    })
end

return api
