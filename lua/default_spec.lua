-- Spec of the built-in policy (default.lua, used when the conf has no `policy`):
-- `luahub test lua/default_spec.lua` (no luahub.conf next to it: the built-in
-- defaults). It defines no hook: everything is allowed as it is.

test("every connection is let in, anonymous", function()
    expect(connect{}).accepted().user(nil).info(nil)
    expect(connect{query = {token = "anything"}, origin = "https://example.com"}).accepted()
end)

test("the luahub subprotocol is echoed; one the hub does not speak is refused", function()
    expect(connect{protocols = {"luahub"}}).accepted().protocol("luahub")
    expect(connect{protocols = {"chat"}})
        .refused(400, 'unsupported WebSocket subprotocol (offered: "chat"): this hub speaks "luahub"')
end)

test("only the websocket path", function()
    expect(connect{path = "/other"}).refused(404, "no websocket endpoint here")
end)

test("subscribe to any valid channel, publish anything, as it is", function()
    local a, b = connect{}, connect{}
    expect(a:subscribe("room:1")).to_be("room:1")
    expect(b:subscribe("room:1")).to_be("room:1")
    expect(b:publish("room:1", {text = "hi", from = "whoever"}))
        .delivered_to("room:1", {text = "hi", from = "whoever"})
    expect(a).received("room:1", {text = "hi", from = "whoever"})
    expect(a:publish("elsewhere", {1, 2, 3})).delivered_to("elsewhere", {1, 2, 3})
    expect(a:unsubscribe("room:1")).ok()
    expect(a:unsubscribe("room:1")).error("not_subscribed", "not subscribed to 'room:1'")
end)

test("rpc needs an on_rpc hook", function()
    expect(connect{}:rpc("anything")).error("unknown_op", "op 'rpc' needs an on_rpc hook in the policy")
end)
