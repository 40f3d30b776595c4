-- The spec language itself (docs/testing-policies.md), against tests/spec/policy.lua:
-- each function of the language, on what the real policy host does. Run by ctest
-- (spec_lang); tests/integration/test_spec.c checks the failures and bad inputs.

test("connect: query, headers, origin, protocols, path, remote_addr reach on_connect", function()
    local c = connect{query = {user = "ann"}, headers = {["User-Agent"] = "spec/1"},
                      remote_addr = "10.0.0.7"}
    expect(c).accepted().user("ann")
        .info({addr = "10.0.0.7", path = "/ws", agent = "spec/1"})
    expect(connect{headers = {["X-Api-Token"] = "wrong"}}).refused(403, "bad api token")
    expect(connect{origin = "https://evil.example"}).refused(451, "origin")
    local t = connect{protocols = {"luahub", "token.bob"}}
    expect(t).accepted().user("bob").protocol("token.bob")
    expect(connect{path = "/elsewhere"}).refused(404)
    expect(c.id).to_be(match("^spec%-%d+$"))
end)

test("a failing on_connect is a 500, and the failure is shown", function()
    expect(connect{query = {boom = true}})
        .refused(500, "internal error: the connect policy failed")
    expect(connect{query = {boom = true}}).failed("boom in on_connect")
end)

test("subscribe: the effective channel, refusals, failures, limits", function()
    local c = connect{query = {user = "ann"}}
    expect(c:subscribe("mine")).to_be("mine:ann")
    expect(c:subscribe("err")).failed("attempt to perform arithmetic on a nil value")
    expect(c:subscribe("a")).ok()
    expect(c:subscribe("b")).ok()
    expect(c:subscribe("c")).error("limit_exceeded", containing("max_channels_per_conn"))
    expect(c:channels()).to_be({"mine:ann", "a", "b"})
    expect(c:unsubscribe("a")).ok()
    expect(c:unsubscribe("a")).error("not_subscribed")
end)

test("publish: what was delivered, to whom; the hub's own checks first", function()
    local a, b = connect{query = {user = "a"}}, connect{query = {user = "b"}}
    b:subscribe("room")
    local r = a:publish("room", {x = 1})
    expect(r).ok().delivered_to("room", {got = {x = 1}, by = "a"})
    expect(r.messages[1].to).to_be({b.id})
    expect(b).received("room", like{by = "a"}).received_nothing()
    expect(a:publish("raw", "as is")).delivered_to("raw", "as is")
    expect(a:publish("bad name!", 1)).error("invalid_channel")
    expect(a:send('{"op":"publish","channel":"room"}')).error("bad_request")
    expect(a:publish("room", ("x"):rep(2000))).closed(1009, "message too large")
    expect(a).closed(1009, "message too large")
end)

test("the budget stops a runaway hook; the failure is the reply's", function()
    local c = connect{}
    expect(c:publish("loop", 1)).failed("instruction limit exceeded")
    expect(c:publish("room", 1)).ok() -- the state is still usable
end)

test("rpc: results, refusals, bad return values", function()
    local c = connect{}
    expect(c:rpc("loads")).to_be(1)
    expect(c:rpc("refuse")).refused("no way")
    expect(c:rpc("missing")).refused(match("^unknown method"))
    expect(c:rpc("bad_return")).failed("not JSON-serialisable")
end)

test("each test starts from a fresh policy state", function()
    expect(connect{}:rpc("loads")).to_be(1)
end)

test("policy_vars come from the conf", function()
    expect(vars.greeting).to_be("hello")
    expect(connect{}:rpc("vars")).to_be({greeting = "hello", level = 2})
end)

test("a test may change policy_vars", {vars = {greeting = "hi", extra = true}}, function()
    expect(vars.greeting).to_be("hi")
    expect(connect{}:rpc("vars")).to_be({greeting = "hi", level = 2, extra = true})
end)

test("the clock: hub.now and os.time follow it", {now = 1000000000000}, function()
    local c = connect{}
    expect(c:rpc("now")).to_be({now = 1000000000000, time = 1000000000})
    advance(1.5)
    expect(now()).to_be(1000000001500)
    expect(c:rpc("now")).to_be({now = 1000000001500, time = 1000000001})
end)

test("advance fires timers in order, each at its time; cancel works", function()
    local c = connect{}
    local t0 = now()
    c:subscribe("timers")
    c:rpc("timers")
    expect(advance(0.5)).delivered_nothing()
    expect(c:rpc("log")).to_be({"zero"})
    local r = advance(3)
    expect(r).delivered_to("timers", {step = "a", at = t0 + 1000})
        .delivered_to("timers", {step = "c", at = t0 + 3000})
    expect(c:rpc("log")).to_be({"zero", "a", "b", "c"})
    expect(c).received("timers", {step = "a", at = t0 + 1000})
        .received("timers", {step = "c", at = t0 + 3000})
end)

test("a timer that re-arms itself runs once per period", function()
    local c = connect{}
    c:subscribe("ticks")
    c:rpc("tick")
    local r = advance(60)
    expect(#r.messages).to_be(5)
    expect(r).delivered_to("ticks", {n = 5})
end)

test("a failing timer is reported by advance", function()
    local c = connect{}
    c:rpc("bad_timer")
    expect(advance(1)).failed("attempt to index a nil value")
end)

test("pushes: conn:send, also to another connection through hub.conn", function()
    local a, b = connect{}, connect{}
    expect(a:rpc("push", {hello = "you"})).to_be(true)
    expect(a).pushed({hello = "you"})
    expect(a:rpc("push_to", {id = b.id, msg = "psst"})).to_be(true)
    expect(b).pushed("psst").received_nothing()
    expect(a:rpc("push_to", {id = "spec-99", msg = 1})).refused("no such connection")
end)

test("closes: conn:close runs on_disconnect with the code and reason", function()
    local a, b = connect{query = {user = "a"}}, connect{}
    b:subscribe("gone")
    a:subscribe("x")
    local r = b:rpc("kick", a.id)
    expect(r).to_be(true).delivered_to("gone", {id = a.id, code = 4000, reason = "by ?",
                                                channels = {"x"}})
    expect(a).closed(4000, "by ?")
    expect(b:publish("kick", 1)).refused("bye")
    expect(b).closed(4003, "kicked")
end)

test("disconnect runs on_disconnect with the client's code", function()
    local a, b = connect{}, connect{}
    b:subscribe("gone")
    expect(a:disconnect(1001)).delivered_to("gone", like{id = a.id, code = 1001, reason = ""})
    expect(a).closed(1001)
    expect(b).received("gone")
end)

test("presence counts the world's subscribers", function()
    local a, b, c = connect{query = {user = "u"}}, connect{query = {user = "u"}}, connect{}
    a:subscribe("room")
    b:subscribe("room")
    c:subscribe("room")
    expect(c:rpc("presence", "room")).to_be({clients = 3, users = 1})
end)

test("logs and api_publish", function()
    local a = connect{}
    a:subscribe("news")
    a:rpc("say", "hi there")
    expect(logs()).to_contain(match("policy: say hi there"))
    expect(api_publish("news", {n = 1})).delivered_to("news", {n = 1})
    expect(a).received("news", {n = 1})
end)

test("failures() hands over the failures nobody checked", function()
    local c = connect{}
    c:subscribe("err")
    local f = failures()
    expect(#f).to_be(1)
    expect(f[1].hook).to_be("on_subscribe")
    expect(f[1].message).to_be(containing("arithmetic"))
    expect(failures()).to_be({})
end)

local kept
test("a connection belongs to its test", function()
    kept = connect{}
    expect(kept).accepted()
end)

test("... and cannot be used in another", function()
    local ok, err = pcall(function() kept:rpc("loads") end)
    expect(ok).to_be(false)
    expect(err).to_be(containing("belongs to an earlier test"))
end)

test("matchers and jwt", function()
    expect({a = 1, b = "x", c = {1, 2}}).to_be({a = any("number"), b = match("^x$"), c = any()})
    expect({a = 1, b = 2}).to_be(like{a = 1})
    expect("hello world").to_contain("o w")
    expect({1, 2, 3}).to_contain(2).not_to_be({1, 2})
    local token = jwt{sub = "x", secret = "k"}
    expect(token).to_be(match("^[%w_-]+%.[%w_-]+%.[%w_-]+$"))
    -- the same bytes as any HS256 implementation (here: Python's hmac and base64)
    expect(token).to_be("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ4In0." ..
                        "ZQBNfODvZbWEZlqkYu9Hjz8pREszIDnoFi82AvAUXvI")
end)
