-- Spec of the dashboard policy (policy.lua): `luahub test examples/dashboard/policy_spec.lua`
-- (docs/testing-policies.md). Browsers watch dash:<name> channels; only the backend,
-- through the HTTP API, publishes.

test("anyone may watch dash:<name> channels", function()
    local page = connect{}
    expect(page).accepted()
    expect(page:subscribe("dash:cpu")).to_be("dash:cpu")
    expect(page:subscribe("dash:mem.used")).to_be("dash:mem.used")
    expect(page:rpc("channels")).to_be({"dash:cpu", "dash:mem.used"})
end)

test("other channels are refused", function()
    local page = connect{}
    for _, ch in ipairs({"cpu", "dash:", "room:1", "dash:a:b"}) do
        expect(page:subscribe(ch)).refused("dashboards show dash:<name> channels only")
    end
    expect(page:channels()).to_be({})
end)

test("browsers may not publish, even to a dashboard", function()
    local page = connect{}
    page:subscribe("dash:cpu")
    expect(page:publish("dash:cpu", {load = 99}))
        .refused("read-only: dashboards are updated through the HTTP API")
        .delivered_nothing()
    expect(page).received_nothing()
end)

test("the backend's publishes reach every watcher, as they were sent", function()
    local a, b, other = connect{}, connect{}, connect{}
    a:subscribe("dash:cpu")
    b:subscribe("dash:cpu")
    other:subscribe("dash:mem")
    expect(api_publish("dash:cpu", {load = 0.42})).delivered_to("dash:cpu", {load = 0.42})
    expect(a).received("dash:cpu", {load = 0.42}).received_nothing()
    expect(b).received("dash:cpu", {load = 0.42})
    expect(other).received_nothing()
end)

test("only the channels method", function()
    expect(connect{}:rpc("delete")).refused("unknown method 'delete' (channels)")
end)
