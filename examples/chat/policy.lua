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

function on_connect(conn, req)
    local claims, why = hub.jwt_verify(req.query.token, SECRET)
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
    if channel == "inbox" then
        return "inbox:" .. conn.user
    end
    if channel:match(ROOM) then
        return true
    end
    if channel:match("^inbox:") then
        return false, "subscribe to \"inbox\": it is your own inbox"
    end
    return false, "no such channel: use room:<name> or inbox"
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

function on_publish(conn, channel, msg)
    local room = channel:match(ROOM)
    local to = channel:match("^dm:(.+)$")
    if not room and not (to and #to <= 64 and to:match(USER)) then
        return false, "publish to room:<name> or dm:<user>"
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

function on_rpc(conn, method, data)
    local m = methods[method]
    if not m then
        return nil, "unknown method '" .. method .. "' (whoami, dm)"
    end
    return m(conn, data)
end
