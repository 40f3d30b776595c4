-- bench/run.sh hook_publish: a transforming on_publish. Reading msg.data
-- decodes the published JSON (lua-cjson), the hook adds a field, and the
-- returned table is encoded again: a decode and an encode per publish.
-- loadgen finds its own fields in the re-encoded payload (lua-cjson does not
-- keep key order).
function on_publish(conn, ch, msg)
    local d = msg.data
    d.via = "lua"
    return { channel = ch, data = d }
end
