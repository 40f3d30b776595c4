-- Chat policy for luahub (README.md in this directory explains how to run it).
--
--   * Token auth in on_connect: ws://HOST/ws?token=<HS256 JWT>, whose `sub`
--     claim becomes conn.user (and `name`, if any, conn.info.name).
--   * Rooms: room:<name>, anyone may join and talk.
--   * Inboxes: a client subscribes to "inbox" and gets inbox:<its user>;
--     nobody can subscribe to someone else's inbox.
--   * DMs: publish to dm:<user> (or rpc "dm") and the message goes to both
--     users' inboxes, so each side sees the whole conversation.
--   * Every message is rebuilt by the hub: {from, text, ts[, to]}; text over
--     2000 characters is refused, words of a list are masked.
--   * A per-user publish rate limit (token bucket), kept in Lua.
--   * Typing indicators on typing:<room> (a channel without history).
--   * Dev mode (policy_vars.dev_tokens = true): a connection without a token
--     is let in anonymously, and may only mint itself a token with the rpc
--     dev_token. Never turn it on where strangers can connect.

-- The HS256 secret shared with whatever issues the tokens. Keep it out of
-- version control in production (see README.md).
-- The token secret comes from the conf: policy_vars = { chat_secret = "..." }.
local SECRET = hub.vars.chat_secret
assert(type(SECRET) == "string" and #SECRET >= 8,
       "set policy_vars = { chat_secret = \"<at least 8 characters>\" } in the conf")

local MAX_TEXT = 2000         -- characters (UTF-8 code points)
local RATE = 5                -- messages per user ...
local PER = 10                -- ... per this many seconds (burst RATE)
local MASKED = {"darn", "heck", "frak"}

local USER = "^[%w_.%-]+$"    -- user names: also valid in channel names
local ROOM = "^room:[%w_%-]+$"
local TYPING = "^typing:[%w_%-]+$"
local DEV = hub.vars.dev_tokens == true

-- "darn" -> "%f[%w][dD][aA][rR][nN]%f[%W]": whole words, any case.
local patterns = {}
for i, word in ipairs(MASKED) do
    patterns[i] = "%f[%w]" .. word:gsub("%a", function(c)
        return "[" .. c:lower() .. c:upper() .. "]"
    end) .. "%f[%W]"
end

local function mask(text)
    for _, pat in ipairs(patterns) do
        text = text:gsub(pat, function(w) return ("*"):rep(#w) end)
    end
    return text
end

-- ---- auth -------------------------------------------------------------

-- The token: ?token=<JWT>, or a subprotocol token.<JWT> (browsers:
-- new WebSocket(url, ["luahub", "token." + jwt]) keeps it out of URLs and logs).
local function token_of(req)
    for _, p in ipairs(req.protocols or {}) do
        local t = p:match("^token%.(.+)$")
        if t then
            return t
        end
    end
    return req.query.token
end

function on_connect(conn, req)
    local token = token_of(req)
    if DEV and token == nil then
        return true -- anonymous: may only call the rpc dev_token
    end
    local claims, why = hub.jwt_verify(token, SECRET)
    if not claims then
        return false, "invalid token: " .. why, 401
    end
    local user = claims.sub
    if type(user) ~= "string" or #user > 64 or not user:match(USER) then
        return false, "the token's sub claim is not a valid user name", 401
    end
    conn.user = user
    conn.info = {name = type(claims.name) == "string" and claims.name or user}
    return true
end

-- ---- channels ---------------------------------------------------------

function on_subscribe(conn, channel)
    if not conn.user then
        return false, "log in first"
    end
    if channel == "inbox" then
        return "inbox:" .. conn.user
    end
    if channel:match(ROOM) or channel:match(TYPING) then
        return true
    end
    if channel:match("^inbox:") then
        return false, "subscribe to \"inbox\": it is your own inbox"
    end
    return false, "no such channel: use room:<name>, typing:<room> or inbox"
end

-- Tell a room who left: on unsubscribe, and for every room on disconnect.
local function left(conn, room)
    hub.publish(room, {event = "left", user = conn.user, ts = math.floor(hub.now())})
end

function on_unsubscribe(conn, channel)
    if channel:match(ROOM) then
        left(conn, channel)
    end
end

function on_disconnect(conn, code, reason)
    for _, channel in ipairs(conn:channels()) do
        if channel:match(ROOM) then
            left(conn, channel)
        end
    end
end

-- ---- rate limit -------------------------------------------------------

-- user -> {tokens, t}: lost on reload (the limit just starts afresh).
local buckets = {}
-- user -> when they last said they were typing (ms), for typing() below; declared
-- here so that sweep() sees this local, not an (undeclared) global.
local typing_at = {}

local function take_token(user)
    local now = hub.now() / 1000
    local b = buckets[user]
    if not b then
        b = {tokens = RATE, t = now}
        buckets[user] = b
    end
    b.tokens = math.min(RATE, b.tokens + (now - b.t) * RATE / PER)
    b.t = now
    if b.tokens < 1 then
        return false
    end
    b.tokens = b.tokens - 1
    return true
end

-- Forget full buckets once a minute so that the table stays small.
local function sweep()
    local now = hub.now() / 1000
    for user, b in pairs(buckets) do
        if b.tokens + (now - b.t) * RATE / PER >= RATE then
            buckets[user] = nil
        end
    end
    for user, t in pairs(typing_at) do
        if t < now * 1000 - 1000 then
            typing_at[user] = nil
        end
    end
    hub.after(60, sweep)
end
hub.after(60, sweep)

-- ---- messages ---------------------------------------------------------

-- The message the hub publishes for `text` from `conn`, or nil, reason.
local function message(conn, text)
    if type(text) ~= "string" then
        return nil, "send {\"text\": \"...\"}"
    end
    local n = utf8.len(text)
    if not n then
        return nil, "text is not valid UTF-8"
    end
    if n > MAX_TEXT then
        return nil, "text over " .. MAX_TEXT .. " characters"
    end
    return {from = conn.user, text = mask(text), ts = math.floor(hub.now())}
end

-- Both inboxes of a DM (one if you write to yourself).
local function dm_routes(conn, to, msg)
    msg.to = to
    local routes = {{channel = "inbox:" .. to, data = msg}}
    if to ~= conn.user then
        routes[2] = {channel = "inbox:" .. conn.user, data = msg}
    end
    return routes
end

-- "bob is typing" at most once a second per user; not stored (typing:<room>
-- has no history in the conf) and not counted against the message rate.
local function typing(conn, channel)
    local now = hub.now()
    if (typing_at[conn.user] or 0) > now - 1000 then
        return false, "typing: at most once a second"
    end
    typing_at[conn.user] = now
    return {channel = channel, data = {from = conn.user, ts = math.floor(now)}}
end

function on_publish(conn, channel, msg)
    if not conn.user then
        return false, "log in first"
    end
    if channel:match(TYPING) then
        return typing(conn, channel)
    end
    local room = channel:match(ROOM)
    local to = channel:match("^dm:(.+)$")
    if not room and not (to and #to <= 64 and to:match(USER)) then
        return false, "publish to room:<name>, typing:<room> or dm:<user>"
    end
    if not take_token(conn.user) then
        return false, "slow down: at most " .. RATE .. " messages per " .. PER .. " s"
    end
    local data = msg.data
    local out, why = message(conn, type(data) == "table" and data.text or nil)
    if not out then
        return false, why
    end
    if room then
        return {channel = channel, data = out}
    end
    return dm_routes(conn, to, out)
end

-- ---- rpc --------------------------------------------------------------

local methods = {}

-- {"op":"rpc","method":"whoami"} -> {"user": ..., "info": {...}}
function methods.whoami(conn)
    return {user = conn.user, info = conn.info}
end

-- {"op":"rpc","method":"dm","data":{"to":"bob","text":"hi"}} -> {"sent": N}
function methods.dm(conn, data)
    if type(data) ~= "table" or type(data.to) ~= "string" or not data.to:match(USER)
        or #data.to > 64 then
        return nil, "send {\"to\": \"<user>\", \"text\": \"...\"}"
    end
    if not take_token(conn.user) then
        return nil, "slow down: at most " .. RATE .. " messages per " .. PER .. " s"
    end
    local out, why = message(conn, data.text)
    if not out then
        return nil, why
    end
    local sent = 0
    for _, r in ipairs(dm_routes(conn, data.to, out)) do
        sent = sent + hub.publish(r.channel, r.data)
    end
    return {sent = sent}
end

-- ---- dev tokens -----------------------------------------------------------

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

local function b64url(s)
    local out = {}
    for i = 1, #s, 3 do
        local a, b, c = s:byte(i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local chars = #s - i + 2 -- 2, 3 or 4 (and more): output characters of this group
        for k = 1, math.min(4, chars) do
            local v = (n >> (6 * (4 - k))) & 63
            out[#out + 1] = B64:sub(v + 1, v + 1)
        end
    end
    return table.concat(out)
end

local function unhex(h)
    return (h:gsub("..", function(x) return string.char(tonumber(x, 16)) end))
end

-- An HS256 JWT for `user`, valid 12 hours: what a login service would issue.
local function mint(user, name)
    local head = b64url(hub.json.encode({alg = "HS256", typ = "JWT"}))
    local body = b64url(hub.json.encode({sub = user, name = name,
                                         exp = math.floor(hub.now() / 1000) + 12 * 3600}))
    local sig = b64url(unhex(hub.hmac_sha256(SECRET, head .. "." .. body)))
    return head .. "." .. body .. "." .. sig
end

-- {"op":"rpc","method":"dev_token","data":{"user":"alice"}} -> "<JWT>" (dev mode only)
function methods.dev_token(conn, data)
    if not DEV then
        return nil, "dev_token is off: set policy_vars.dev_tokens = true (never in production)"
    end
    local user = type(data) == "table" and data.user
    if type(user) ~= "string" or #user > 64 or not user:match(USER) then
        return nil, "send {\"user\": \"<name of letters, digits, _ . ->\"}"
    end
    return mint(user, type(data.name) == "string" and data.name:sub(1, 64) or user)
end

function on_rpc(conn, method, data)
    local m = methods[method]
    if not m then
        return nil, "unknown method '" .. method .. "' (whoami, dm, dev_token)"
    end
    if not conn.user and method ~= "dev_token" then
        return nil, "log in first"
    end
    return m(conn, data)
end
