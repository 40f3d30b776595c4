-- Spec of the chat policy (policy.lua): `luahub test examples/chat/policy_spec.lua`
-- runs it against the policy and policy_vars of luahub.conf, next to it, without a
-- hub or a socket. docs/testing-policies.md explains every function used here.

local SECRET = vars.chat_secret

-- An HS256 token for `user`, as the chat's login service would issue it.
local function token_for(user, claims)
    claims = claims or {}
    claims.sub = user
    claims.exp = claims.exp or now() / 1000 + 3600
    claims.secret = claims.secret or SECRET
    return jwt(claims)
end

-- A user connected with a valid token.
local function login(user, name)
    local c = connect{query = {token = token_for(user, {name = name})}}
    expect(c).accepted().user(user)
    return c
end

-- Without dev mode, a connection needs a token.
local PROD = {vars = {dev_tokens = false}}

-- ---- tokens ------------------------------------------------------------------

test("a valid token lets the user in, named by its sub claim", PROD, function()
    local alice = connect{query = {token = token_for("alice", {name = "Alice"})}}
    expect(alice).accepted().user("alice").info({name = "Alice"}).protocol(nil)
    expect(alice:rpc("whoami")).to_be({user = "alice", info = {name = "Alice"}})
end)

test("the token may come as a subprotocol token.<JWT>", PROD, function()
    local alice = connect{protocols = {"luahub", "token." .. token_for("alice")}}
    expect(alice).accepted().user("alice").protocol("luahub")
end)

test("no token, a bad signature, an expired token: 401 with the reason", PROD, function()
    expect(connect{query = {}}).refused(401, "invalid token: no token")
    expect(connect{query = {token = token_for("alice", {secret = "another-secret"})}})
        .refused(401, "invalid token: bad signature")
    expect(connect{query = {token = token_for("alice", {exp = now() / 1000 - 1})}})
        .refused(401, "invalid token: token expired")
    expect(connect{query = {token = "not.a.token"}}).refused(401, match("^invalid token: malformed"))
    expect(connect{query = {token = token_for("alice", {header = {alg = "none"}})}})
        .refused(401, match("^invalid token: unsupported alg 'none'"))
end)

test("a token expires on the clock", PROD, function()
    local token = token_for("alice", {exp = now() / 1000 + 60})
    expect(connect{query = {token = token}}).accepted()
    advance(60)
    expect(connect{query = {token = token}}).refused(401, "invalid token: token expired")
end)

test("a sub claim that is not a user name is refused", PROD, function()
    for _, sub in ipairs({"bob smith", "../x", ("x"):rep(65)}) do
        expect(connect{query = {token = token_for(sub)}})
            .refused(401, "the token's sub claim is not a valid user name")
    end
end)

-- ---- dev mode (the shipped conf: dev_tokens = true) ---------------------------

test("dev mode: an anonymous connection may only mint itself a token", function()
    local anon = connect{}
    expect(anon).accepted().user(nil)
    expect(anon:subscribe("room:lobby")).refused("log in first")
    expect(anon:publish("room:lobby", {text = "hi"})).refused("log in first")
    expect(anon:rpc("whoami")).refused("log in first")

    local minted = anon:rpc("dev_token", {user = "alice", name = "Alice"})
    expect(minted).ok()
    local alice = connect{query = {token = minted.data}}
    expect(alice).accepted().user("alice").info({name = "Alice"})
    expect(anon:rpc("dev_token", {user = "no one"})).refused(containing("send {\"user\""))
end)

test("without dev mode dev_token is off", PROD, function()
    local alice = login("alice")
    expect(alice:rpc("dev_token", {user = "mallory"})).refused(match("^dev_token is off"))
end)

-- ---- rooms -------------------------------------------------------------------------

test("a room message is rebuilt by the hub: from, text, ts", function()
    local alice, bob = login("alice"), login("bob")
    expect(alice:subscribe("room:lobby")).to_be("room:lobby")
    expect(bob:subscribe("room:lobby")).to_be("room:lobby")
    local hi = {from = "alice", text = "hi", ts = now()}
    expect(alice:publish("room:lobby", {text = "hi", from = "mallory", admin = true}))
        .delivered_to("room:lobby", hi)
    expect(bob).received("room:lobby", hi).received_nothing()
    expect(alice).received("room:lobby", hi)
end)

test("only room:, typing:, inbox and dm: channels", function()
    local alice = login("alice")
    expect(alice:subscribe("news")).refused("no such channel: use room:<name>, typing:<room> or inbox")
    expect(alice:subscribe("room:a b")).error("invalid_channel") -- the hub's decoder, no hook
    expect(alice:publish("news", {text = "x"})).refused("publish to room:<name>, typing:<room> or dm:<user>")
    expect(alice:publish("dm:not a user", {text = "x"})).error("invalid_channel")
    expect(alice:publish("dm:", {text = "x"})).refused("publish to room:<name>, typing:<room> or dm:<user>")
end)

test("moderation: listed words are masked, whole words only, any case", function()
    local alice = login("alice")
    expect(alice:publish("room:lobby", {text = "darn it, HECK, darned frak"}))
        .delivered_to("room:lobby", like{text = "**** it, ****, darned ****"})
end)

test("moderation: text must be a string of at most 2000 characters", function()
    local alice = login("alice")
    expect(alice:publish("room:lobby", {text = ("é"):rep(2000)})).ok()
    expect(alice:publish("room:lobby", {text = ("é"):rep(2001)})).refused("text over 2000 characters")
    expect(alice:publish("room:lobby", "just a string")).refused('send {"text": "..."}')
    expect(alice:publish("room:lobby", {text = 42})).refused('send {"text": "..."}')
end)

test("text that is not UTF-8 never reaches the policy: the hub closes with 1007", function()
    local alice = login("alice")
    expect(alice:publish("room:lobby", {text = "\xff"})).closed(1007, "invalid UTF-8")
    expect(alice).closed(1007)
end)

test("leaving a room tells the room, by unsubscribe or disconnect", function()
    local alice, bob = login("alice"), login("bob")
    alice:subscribe("room:lobby")
    alice:subscribe("room:dev")
    bob:subscribe("room:lobby")
    expect(alice:unsubscribe("room:dev")).ok()
        .delivered_to("room:dev", {event = "left", user = "alice", ts = now()})
    advance(5)
    expect(alice:disconnect(1001)).delivered_to("room:lobby", {event = "left", user = "alice", ts = now()})
    expect(bob).received("room:lobby", {event = "left", user = "alice", ts = now()})
end)

-- ---- inboxes and DMs --------------------------------------------------------------

test("inbox is rewritten to the user's own inbox; others' are refused", function()
    local alice = login("alice")
    expect(alice:subscribe("inbox")).to_be("inbox:alice")
    expect(alice:channels()).to_be({"inbox:alice"})
    expect(alice:subscribe("inbox:bob")).refused('subscribe to "inbox": it is your own inbox')
end)

test("a DM goes to both inboxes", function()
    local alice, bob = login("alice"), login("bob")
    alice:subscribe("inbox")
    bob:subscribe("inbox")
    local dm = {from = "alice", to = "bob", text = "psst", ts = now()}
    expect(alice:publish("dm:bob", {text = "psst"}))
        .delivered_to("inbox:bob", dm)
        .delivered_to("inbox:alice", dm)
    expect(bob).received("inbox:bob", dm).received_nothing()
    -- to yourself: one copy
    local r = alice:publish("dm:alice", {text = "note"})
    expect(#r.messages).to_be(1)
end)

test("rpc dm does the same and answers how many got it", function()
    local alice, bob = login("alice"), login("bob")
    alice:subscribe("inbox")
    bob:subscribe("inbox")
    expect(alice:rpc("dm", {to = "bob", text = "hi"})).to_be({sent = 2})
        .delivered_to("inbox:bob", {from = "alice", to = "bob", text = "hi", ts = now()})
    expect(alice:rpc("dm", {to = "bob"})).refused('send {"text": "..."}')
    expect(alice:rpc("dm", {text = "hi"})).refused('send {"to": "<user>", "text": "..."}')
    expect(alice:rpc("nope")).refused("unknown method 'nope' (whoami, dm, dev_token)")
end)

-- ---- rate limit ------------------------------------------------------------------

test("at most 5 messages per user per 10 s, refilled over time", function()
    local alice = login("alice")
    for i = 1, 5 do
        expect(alice:publish("room:lobby", {text = "m" .. i})).ok()
    end
    expect(alice:publish("room:lobby", {text = "m6"})).refused("slow down: at most 5 messages per 10 s")
    -- the limit is the user's, not the connection's
    local again = login("alice")
    expect(again:publish("room:lobby", {text = "m6"})).refused(match("^slow down"))
    expect(login("bob"):publish("room:lobby", {text = "hi"})).ok()
    advance(2) -- one message's worth
    expect(alice:publish("room:lobby", {text = "m7"})).ok()
    expect(alice:rpc("dm", {to = "bob", text = "m8"})).refused(match("^slow down"))
    advance(10)
    for i = 1, 5 do
        expect(alice:publish("room:lobby", {text = "n" .. i})).ok()
    end
end)

test("the rate limit table is swept every minute without a failure", function()
    local alice = login("alice")
    alice:publish("typing:lobby", {})
    alice:publish("room:lobby", {text = "hi"})
    expect(advance(60)).delivered_nothing()
    expect(advance(60)).delivered_nothing()
    expect(failures()).to_be({})
    expect(alice:publish("room:lobby", {text = "still here"})).ok()
end)

-- ---- typing -------------------------------------------------------------------

test("typing: at most once a second, not counted as messages", function()
    local alice, bob = login("alice"), login("bob")
    bob:subscribe("typing:lobby")
    expect(alice:publish("typing:lobby", {})).delivered_to("typing:lobby", {from = "alice", ts = now()})
    expect(alice:publish("typing:lobby", {})).refused("typing: at most once a second")
    advance(1)
    expect(alice:publish("typing:lobby", {})).ok()
    expect(bob).received("typing:lobby").received("typing:lobby").received_nothing()
    for i = 1, 5 do
        expect(alice:publish("room:lobby", {text = "m" .. i})).ok()
    end
end)
