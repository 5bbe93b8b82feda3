-- Wireshark dissectors for the wire of joinproxyd: GRASP (RFC 8990) and JPY messages.
--
--   GRASP  UDP 7017 (and TCP 7017): a CBOR array [message-type, session-id, ...]. Every
--          message type is shown; M_FLOOD in full: initiator, TTL, each [objective,
--          locator] pair (AN_Proxy, AN_join_registrar, ...), objective flags and loop
--          count, locator options (IPv6/IPv4/FQDN/URI: address, protocol, port).
--   JPY    the stateless join proxy's CBOR array [jpy_header: bstr, jpy_content: bstr]
--          (constrained join proxy draft §4.4-4.5) on the registrar's JPY UDP port. The
--          draft sets no default port: the preference "jpy.udp_port" (Edit > Preferences >
--          Protocols > JPY, or -o jpy.udp_port:N) defaults to the draft's example, 7634;
--          "Decode As... JPY" works on any port. The content is handed to the DTLS
--          dissector.
--
--   CoAP extended tokens (RFC 8974) on the CoJP JRC's UDP port (preference
--          "coap_ext_token.udp_port", default 5683): Wireshark 4.0's CoAP dissector reads the
--          TKL nibble 13/14 as the token length, so the cojp relay's sealed 38-46 byte
--          tokens (RFC 9031 §7.1) break the rest of the message. This dissector shows the
--          token, then hands the message with the token taken out (TKL 0) to the built-in
--          CoAP dissector, which decodes the options (OSCORE among them) and the payload as
--          usual; a message with TKL 0..12 goes to it untouched.
--
-- CBOR is decoded here (a small subset: definite and indefinite lengths, no float values
-- beyond their size), so every field points at its own bytes. A datagram that is not what it
-- claims shows as malformed (expert info grasp.malformed / jpy.malformed), never an error.
--
-- Load: copy to ~/.local/lib/wireshark/plugins/ (or the system plugin folder), or
--   tshark -X lua_script:joinproxyd.lua -r capture.pcap -O grasp,jpy,coap_ext_token,coap

local MAX_DEPTH = 16

-- RFC 8949 §3.1: a text string is UTF-8; a decoder must not take anything else for text.
local function valid_utf8(s)
    local i, n = 1, #s
    while i <= n do
        local c = s:byte(i)
        local extra, min
        if c < 0x80 then extra, min = 0, 0
        elseif c >= 0xc2 and c <= 0xdf then extra, min = 1, 0x80
        elseif c >= 0xe0 and c <= 0xef then extra, min = 2, 0x800
        elseif c >= 0xf0 and c <= 0xf4 then extra, min = 3, 0x10000
        else return false end
        if i + extra > n then return false end
        local cp = extra == 0 and c or c % (2 ^ (6 - extra))
        for k = 1, extra do
            local b = s:byte(i + k)
            if b < 0x80 or b > 0xbf then return false end
            cp = cp * 64 + (b - 0x80)
        end
        if cp < min or cp > 0x10ffff or (cp >= 0xd800 and cp <= 0xdfff) then return false end
        i = i + extra + 1
    end
    return true
end

---------------------------------------------------------------------------- CBOR subset

-- Decode one CBOR item at offset off of tvb (within limit). Returns a node
--   {major, off, len, value, items, data_off, data_len, uint64}
-- or nil and a reason.
local function cbor_item(tvb, off, limit, depth)
    if depth > MAX_DEPTH then return nil, "nested more than " .. MAX_DEPTH .. " deep" end
    if off >= limit then return nil, "truncated CBOR item" end
    local ib = tvb(off, 1):uint()
    local major, info = math.floor(ib / 32), ib % 32
    local node = { major = major, off = off, info = info }
    local pos = off + 1
    local arg
    if info < 24 then
        arg = info
    elseif info <= 27 then
        local size = ({ [24] = 1, [25] = 2, [26] = 4, [27] = 8 })[info]
        if pos + size > limit then return nil, "truncated CBOR length" end
        if size == 8 then
            local v = tvb(pos, 8):uint64()
            node.uint64 = v
            if v > UInt64(0x7fffffff) then arg = -1 else arg = v:tonumber() end
        else
            arg = tvb(pos, size):uint()
        end
        pos = pos + size
    elseif info == 31 then
        arg = nil -- indefinite length (or "break" in major 7)
    else
        return nil, string.format("reserved CBOR additional information %d", info)
    end

    if major == 0 or major == 1 then
        if arg == nil then return nil, "indefinite length on an integer" end
        if node.uint64 then
            node.value = major == 0 and tostring(node.uint64) or "-1-" .. tostring(node.uint64)
            node.big = true
        else
            node.value = major == 0 and arg or -1 - arg
        end
    elseif major == 2 or major == 3 then
        if arg == nil then -- chunks of the same major type, up to a break
            local chunks, total = {}, 0
            while true do
                if pos >= limit then return nil, "indefinite string without break" end
                if tvb(pos, 1):uint() == 0xff then pos = pos + 1; break end
                local chunk, why = cbor_item(tvb, pos, limit, depth + 1)
                if not chunk then return nil, why end
                if chunk.major ~= major or chunk.chunks then
                    return nil, "bad chunk in an indefinite-length string"
                end
                chunks[#chunks + 1] = chunk
                total = total + chunk.data_len
                pos = chunk.off + chunk.len
            end
            node.chunks = chunks
            node.data_off, node.data_len = chunks[1] and chunks[1].data_off or pos, total
            if major == 3 then
                local parts = {}
                for i, c in ipairs(chunks) do parts[i] = c.value end
                node.value = table.concat(parts)
            end
        else
            if arg < 0 or pos + arg > limit then return nil, "string longer than the datagram" end
            node.data_off, node.data_len = pos, arg
            if major == 3 then
                node.value = arg > 0 and tvb(pos, arg):raw() or ""
                if not valid_utf8(node.value) then return nil, "text string is not UTF-8" end
            end
            pos = pos + arg
        end
    elseif major == 4 or major == 5 then
        local items = {}
        local count = arg
        if count ~= nil and (count < 0 or count * (major == 5 and 2 or 1) > limit - pos) then
            return nil, "more elements than bytes left"
        end
        local i = 0
        while true do
            if count ~= nil and i >= count * (major == 5 and 2 or 1) then break end
            if count == nil then
                if pos >= limit then return nil, "indefinite array or map without break" end
                if tvb(pos, 1):uint() == 0xff then pos = pos + 1; break end
            end
            local item, why = cbor_item(tvb, pos, limit, depth + 1)
            if not item then return nil, why end
            if item.is_break then return nil, "unexpected break" end
            items[#items + 1] = item
            pos = item.off + item.len
            i = i + 1
        end
        if major == 5 and #items % 2 == 1 then return nil, "map with a key and no value" end
        node.items = items
    elseif major == 6 then
        if arg == nil or arg < 0 then return nil, "bad tag" end
        local item, why = cbor_item(tvb, pos, limit, depth + 1)
        if not item then return nil, why end
        node.tag, node.tagged = arg, item
        pos = item.off + item.len
    else -- major 7: simple values and floats
        if info == 31 then node.is_break = true end
        local simple = { [20] = false, [21] = true }
        if info == 20 or info == 21 then node.value = simple[info]
        elseif info == 22 then node.is_null = true
        elseif info == 23 then node.is_undefined = true
        end
    end
    node.len = pos - off
    return node
end

local function hex(tvb, off, len)
    if len == 0 then return "" end
    return tostring(tvb(off, len):bytes()):lower()
end

-- CBOR diagnostic notation (RFC 8949 §8), shortened, for values shown as text.
local function diag(tvb, node, budget)
    budget = budget or 200
    local m = node.major
    local s
    if m == 0 or m == 1 then s = tostring(node.value)
    elseif m == 2 then s = "h'" .. hex(tvb, node.data_off, math.min(node.data_len, 64)) ..
        (node.data_len > 64 and "..." or "") .. "'"
    elseif m == 3 then s = string.format("%q", node.value)
    elseif m == 4 or m == 5 then
        local parts = {}
        for i, item in ipairs(node.items) do
            local sep = (m == 5 and i % 2 == 1) and ": " or ", "
            parts[#parts + 1] = diag(tvb, item, budget)
            if i < #node.items then parts[#parts + 1] = sep end
        end
        s = (m == 4 and "[" or "{") .. table.concat(parts) .. (m == 4 and "]" or "}")
    elseif m == 6 then s = node.tag .. "(" .. diag(tvb, node.tagged, budget) .. ")"
    elseif node.is_null then s = "null"
    elseif node.is_undefined then s = "undefined"
    elseif node.value ~= nil then s = tostring(node.value)
    else s = "simple(" .. node.info .. ")"
    end
    if #s > budget then s = s:sub(1, budget) .. "..." end
    return s
end

local function is_uint(node, max)
    return node and node.major == 0 and not node.big and node.value <= max
end

local function range(tvb, node) return tvb(node.off, node.len) end

---------------------------------------------------------------------------- GRASP

local grasp = Proto("grasp", "GeneRic Autonomic Signaling Protocol (GRASP)")

local msg_types = {
    [0] = "M_NOOP", [1] = "M_DISCOVERY", [2] = "M_RESPONSE", [3] = "M_REQ_NEG",
    [4] = "M_REQ_SYN", [5] = "M_NEGOTIATE", [6] = "M_END", [7] = "M_WAIT", [8] = "M_SYNCH",
    [9] = "M_FLOOD", [99] = "M_INVALID",
}
local options = {
    [100] = "O_DIVERT", [101] = "O_ACCEPT", [102] = "O_DECLINE", [103] = "O_IPv6_LOCATOR",
    [104] = "O_IPv4_LOCATOR", [105] = "O_FQDN_LOCATOR", [106] = "O_URI_LOCATOR",
}
local protocols = { [6] = "TCP", [17] = "UDP", [41] = "IPv6 (IPIP)", [98] = "ENCAP" }

local gf = {
    msg_type = ProtoField.uint8("grasp.msg_type", "Message type", base.DEC, msg_types),
    session_id = ProtoField.uint32("grasp.session_id", "Session ID", base.DEC_HEX),
    initiator = ProtoField.ipv6("grasp.initiator", "Initiator"),
    initiator_v4 = ProtoField.ipv4("grasp.initiator_v4", "Initiator (IPv4)"),
    ttl = ProtoField.uint32("grasp.ttl", "TTL (ms)", base.DEC),
    waiting_time = ProtoField.uint32("grasp.waiting_time", "Waiting time (ms)", base.DEC),
    objective = ProtoField.string("grasp.objective", "Objective name"),
    flags = ProtoField.uint8("grasp.objective.flags", "Objective flags", base.HEX),
    f_disc = ProtoField.bool("grasp.objective.flags.disc", "F_DISC", 8, nil, 0x01),
    f_neg = ProtoField.bool("grasp.objective.flags.neg", "F_NEG", 8, nil, 0x02),
    f_synch = ProtoField.bool("grasp.objective.flags.synch", "F_SYNCH", 8, nil, 0x04),
    f_neg_dry = ProtoField.bool("grasp.objective.flags.neg_dry", "F_NEG_DRY", 8, nil, 0x08),
    loop_count = ProtoField.uint8("grasp.objective.loop_count", "Loop count", base.DEC),
    value = ProtoField.string("grasp.objective.value", "Objective value (CBOR diagnostic)"),
    option = ProtoField.uint32("grasp.option", "Option", base.DEC, options),
    loc_v6 = ProtoField.ipv6("grasp.locator.ipv6", "Locator IPv6 address"),
    loc_v4 = ProtoField.ipv4("grasp.locator.ipv4", "Locator IPv4 address"),
    loc_name = ProtoField.string("grasp.locator.name", "Locator FQDN or URI"),
    loc_proto = ProtoField.uint8("grasp.locator.protocol", "Transport protocol", base.DEC,
                                 protocols),
    loc_port = ProtoField.uint16("grasp.locator.port", "Port", base.DEC),
    option_body = ProtoField.string("grasp.option.body", "Option content (CBOR diagnostic)"),
    extra = ProtoField.string("grasp.extra", "Further element (CBOR diagnostic)"),
}
grasp.fields = gf
local g_malformed = ProtoExpert.new("grasp.malformed", "Malformed GRASP message",
                                    expert.group.MALFORMED, expert.severity.ERROR)
local g_trailing = ProtoExpert.new("grasp.trailing", "Bytes after the GRASP message",
                                   expert.group.MALFORMED, expert.severity.WARN)
grasp.experts = { g_malformed, g_trailing }

local Malformed = {}
local function fail(node, why) error(setmetatable({ node = node, why = why }, Malformed)) end

local function need_uint(node, max, what)
    if not is_uint(node, max) then fail(node, what .. " is not an unsigned integer <= " .. max) end
    return node.value
end

local function need_bstr(node, sizes, what)
    if not node or node.major ~= 2 or node.chunks or not sizes[node.data_len] then
        fail(node, what .. " is not a byte string of the right size")
    end
end

local function add_address(tree, tvb, node, f6, f4, what)
    need_bstr(node, { [16] = true, [4] = true }, what)
    if node.data_len == 16 then
        return tree:add(f6, tvb(node.data_off, 16))
    end
    return tree:add(f4, tvb(node.data_off, 4))
end

local function add_objective(tree, tvb, node)
    if not node or node.major ~= 4 or #node.items < 3 or #node.items > 4 then
        fail(node, "objective is not an array of 3 or 4 elements")
    end
    local name, flags, loops, value = node.items[1], node.items[2], node.items[3], node.items[4]
    if name.major ~= 3 or name.value == "" then fail(name, "objective name is not text") end
    local sub = tree:add(range(tvb, node), "Objective: " .. name.value)
    sub:add(gf.objective, range(tvb, name), name.value)
    need_uint(flags, 255, "objective flags")
    local ft = sub:add(gf.flags, range(tvb, flags), flags.value)
    for _, f in ipairs({ gf.f_disc, gf.f_neg, gf.f_synch, gf.f_neg_dry }) do
        ft:add(f, range(tvb, flags), flags.value)
    end
    sub:add(gf.loop_count, range(tvb, loops), need_uint(loops, 255, "loop count"))
    if value then sub:add(gf.value, range(tvb, value), diag(tvb, value)) end
    return sub, name.value
end

local function add_option(tree, tvb, node)
    if not node or node.major ~= 4 then fail(node, "option is not an array") end
    if #node.items == 0 then
        tree:add(gf.option_body, range(tvb, node), "[] (no locator)")
        return
    end
    local code = need_uint(node.items[1], 0xffffffff, "option number")
    local sub = tree:add(gf.option, range(tvb, node), code)
    local items = node.items
    if code == 103 or code == 104 or code == 105 or code == 106 then
        if #items ~= 4 then fail(node, (options[code]) .. " has not 4 elements") end
        if code == 103 then
            need_bstr(items[2], { [16] = true }, "IPv6 locator address")
            sub:add(gf.loc_v6, tvb(items[2].data_off, 16))
        elseif code == 104 then
            need_bstr(items[2], { [4] = true }, "IPv4 locator address")
            sub:add(gf.loc_v4, tvb(items[2].data_off, 4))
        else
            if items[2].major ~= 3 then fail(items[2], "locator name is not text") end
            sub:add(gf.loc_name, range(tvb, items[2]), items[2].value)
        end
        -- the protocol and the port may be null (RFC 8995 §4.3's [103, fe80::1234, 41, nil])
        if not items[3].is_null then
            sub:add(gf.loc_proto, range(tvb, items[3]), need_uint(items[3], 255, "protocol"))
        end
        if not items[4].is_null then
            sub:add(gf.loc_port, range(tvb, items[4]), need_uint(items[4], 65535, "port"))
        end
        sub:append_text(" " .. diag(tvb, node))
    else
        for i = 2, #items do sub:add(gf.option_body, range(tvb, items[i]), diag(tvb, items[i])) end
    end
end

-- The body of each message type after [type, session-id] (RFC 8990 §2.8).
local function dissect_grasp_body(tree, tvb, msg, pinfo)
    local items = msg.items
    local mtype = items[1].value
    local summary = {}
    local idx = 3
    local function next_item() local n = items[idx]; idx = idx + 1; return n end
    if mtype == 1 then -- M_DISCOVERY: initiator, objective
        add_address(tree, tvb, next_item(), gf.initiator, gf.initiator_v4, "initiator")
        local _, name = add_objective(tree, tvb, next_item()); summary[#summary + 1] = name
    elseif mtype == 2 then -- M_RESPONSE: initiator, ttl, +(locator / divert), ?objective
        add_address(tree, tvb, next_item(), gf.initiator, gf.initiator_v4, "initiator")
        tree:add(gf.ttl, range(tvb, items[idx]), need_uint(next_item(), 0xffffffff, "ttl"))
        while items[idx] do
            local n = next_item()
            if n.major == 4 and n.items[1] and n.items[1].major == 3 then
                local _, name = add_objective(tree, tvb, n); summary[#summary + 1] = name
            else
                add_option(tree, tvb, n)
            end
        end
    elseif mtype == 3 or mtype == 4 or mtype == 5 or mtype == 8 then -- objective
        local _, name = add_objective(tree, tvb, next_item()); summary[#summary + 1] = name
    elseif mtype == 6 then -- M_END: accept / decline option
        add_option(tree, tvb, next_item())
    elseif mtype == 7 then -- M_WAIT: waiting time
        tree:add(gf.waiting_time, range(tvb, items[idx]),
                 need_uint(next_item(), 0xffffffff, "waiting time"))
    elseif mtype == 9 then -- M_FLOOD: initiator, ttl, +[objective, locator / []]
        add_address(tree, tvb, next_item(), gf.initiator, gf.initiator_v4, "initiator")
        tree:add(gf.ttl, range(tvb, items[idx]), need_uint(next_item(), 0xffffffff, "ttl"))
        if not items[idx] then fail(msg, "M_FLOOD without an [objective, locator] pair") end
        while items[idx] do
            local pair = next_item()
            if pair.major ~= 4 or #pair.items ~= 2 then
                fail(pair, "M_FLOOD entry is not an [objective, locator] pair")
            end
            local sub, name = add_objective(tree, tvb, pair.items[1])
            add_option(sub, tvb, pair.items[2])
            summary[#summary + 1] = name
        end
    end
    while items[idx] do -- M_INVALID's payload, or elements a newer GRASP may add
        local n = next_item()
        tree:add(gf.extra, range(tvb, n), diag(tvb, n))
    end
    return table.concat(summary, ",")
end

function grasp.dissector(tvb, pinfo, tree)
    local length = tvb:len()
    if length == 0 then return 0 end
    pinfo.cols.protocol = "GRASP"
    local root = tree:add(grasp, tvb())
    local msg, why = cbor_item(tvb, 0, length, 0)
    if not msg then
        root:add_proto_expert_info(g_malformed, "Malformed GRASP message: " .. why)
        pinfo.cols.info = "GRASP [malformed: " .. why .. "]"
        return length
    end
    local ok, err = pcall(function()
        if msg.major ~= 4 or #msg.items == 0 then fail(msg, "not a non-empty CBOR array") end
        local mtype = need_uint(msg.items[1], 255, "message type")
        root:add(gf.msg_type, range(tvb, msg.items[1]), mtype)
        local name = msg_types[mtype] or ("type " .. mtype)
        local info = name
        if mtype ~= 0 then
            if not msg.items[2] then fail(msg, name .. " without a session id") end
            local sid = need_uint(msg.items[2], 0xffffffff, "session id")
            root:add(gf.session_id, range(tvb, msg.items[2]), sid)
            info = string.format("%s session %u", name, sid)
            local objectives = dissect_grasp_body(root, tvb, msg, pinfo)
            if objectives ~= "" then info = info .. " " .. objectives end
        end
        root:append_text(", " .. info)
        pinfo.cols.info = info
    end)
    if not ok then
        if getmetatable(err) ~= Malformed then error(err, 0) end
        local at = err.node and range(tvb, err.node) or tvb()
        root:add_proto_expert_info(g_malformed, "Malformed GRASP message: " .. err.why)
        root:add(at, "[Malformed: " .. err.why .. "]")
        pinfo.cols.info = "GRASP [malformed: " .. err.why .. "]"
    end
    if msg.len < length then
        root:add_tvb_expert_info(g_trailing, tvb(msg.len), "Bytes after the GRASP message")
    end
    return length
end

DissectorTable.get("udp.port"):add(7017, grasp)
DissectorTable.get("tcp.port"):add(7017, grasp)

---------------------------------------------------------------------------- JPY

local jpy = Proto("jpy", "Join Proxy stateless message (JPY)")
local jf = {
    header = ProtoField.bytes("jpy.header", "JPY header (opaque proxy state)"),
    header_length = ProtoField.uint32("jpy.header_length", "Header length", base.DEC),
    content = ProtoField.bytes("jpy.content", "JPY content (relayed UDP payload)"),
    content_length = ProtoField.uint32("jpy.content_length", "Content length", base.DEC),
    elements = ProtoField.uint32("jpy.elements", "Array elements", base.DEC),
    extra = ProtoField.string("jpy.extra", "Ignored element (CBOR diagnostic)"),
}
jpy.fields = jf
local j_malformed = ProtoExpert.new("jpy.malformed", "Malformed JPY message",
                                    expert.group.MALFORMED, expert.severity.ERROR)
local j_long_header = ProtoExpert.new("jpy.header_too_long",
                                      "JPY header longer than 32 bytes (draft §4.5.2 SHOULD)",
                                      expert.group.PROTOCOL, expert.severity.WARN)
jpy.experts = { j_malformed, j_long_header }
jpy.prefs.udp_port = Pref.uint("JPY UDP port", 7634,
                               "The registrar's JPY port (no default in the draft; 7634 is its example)")

local dtls = Dissector.get("dtls")
local current_port = 0

local function register_port(port)
    local udp = DissectorTable.get("udp.port")
    if current_port ~= 0 then udp:remove(current_port, jpy) end
    if port ~= 0 then udp:add(port, jpy) end
    current_port = port
end

function jpy.prefs_changed() register_port(jpy.prefs.udp_port) end

function jpy.dissector(tvb, pinfo, tree)
    local length = tvb:len()
    if length == 0 then return 0 end
    pinfo.cols.protocol = "JPY"
    local root = tree:add(jpy, tvb())
    local msg, why = cbor_item(tvb, 0, length, 0)
    local function bad(reason, node)
        root:add_proto_expert_info(j_malformed, "Malformed JPY message: " .. reason)
        if node then root:add(range(tvb, node), "[Malformed: " .. reason .. "]") end
        pinfo.cols.info = "JPY [malformed: " .. reason .. "]"
        return length
    end
    if not msg then return bad(why) end
    if msg.len ~= length then return bad("bytes after the CBOR array") end
    if msg.major ~= 4 then return bad("not a CBOR array", msg) end
    root:add(jf.elements, range(tvb, msg), #msg.items)
    if #msg.items < 2 then return bad("fewer than 2 elements", msg) end
    local header, content = msg.items[1], msg.items[2]
    if header.major ~= 2 or header.chunks then return bad("header is not a byte string", header) end
    if content.major ~= 2 or content.chunks then
        return bad("content is not a byte string", content)
    end
    local h = root:add(jf.header, tvb(header.data_off, header.data_len))
    root:add(jf.header_length, range(tvb, header), header.data_len)
    if header.data_len > 32 then h:add_proto_expert_info(j_long_header) end
    root:add(jf.content_length, range(tvb, content), content.data_len)
    for i = 3, #msg.items do -- §4.5.7: only the first two elements are used
        root:add(jf.extra, range(tvb, msg.items[i]), diag(tvb, msg.items[i]))
    end
    local info = string.format("JPY header %d bytes, content %d bytes", header.data_len,
                               content.data_len)
    root:append_text(", " .. info)
    if content.data_len > 0 then
        local body = tvb(content.data_off, content.data_len)
        root:add(jf.content, body)
        if dtls then
            -- the relayed DTLS records: let the DTLS dissector show them
            pcall(function() dtls:call(body:tvb("JPY content"), pinfo, tree) end)
        end
    end
    pinfo.cols.protocol = "JPY"
    pinfo.cols.info = info
    return length
end

register_port(jpy.prefs.udp_port)

---------------------------------------------------------------------------- CoAP extended tokens

local coapx = Proto("coap_ext_token", "CoAP extended token (RFC 8974)")
local xf = {
    tkl = ProtoField.uint8("coap_ext_token.tkl", "TKL nibble", base.DEC),
    length = ProtoField.uint32("coap_ext_token.length", "Token length", base.DEC),
    token = ProtoField.bytes("coap_ext_token.token", "Token"),
}
coapx.fields = xf
local x_malformed = ProtoExpert.new("coap_ext_token.malformed", "Malformed CoAP token",
                                    expert.group.MALFORMED, expert.severity.ERROR)
coapx.experts = { x_malformed }
coapx.prefs.udp_port = Pref.uint("CoAP UDP port", 5683,
                                 "The port of the JRC (CoJP) whose CoAP carries RFC 8974 tokens")

local coap = Dissector.get("coap")
local coapx_port = 0

local function register_coapx_port(port)
    local udp = DissectorTable.get("udp.port")
    if coapx_port ~= 0 then udp:remove(coapx_port, coapx) end
    if port ~= 0 then udp:add(port, coapx) end
    coapx_port = port
end

function coapx.prefs_changed() register_coapx_port(coapx.prefs.udp_port) end

function coapx.dissector(tvb, pinfo, tree)
    local length = tvb:len()
    local first = length >= 4 and tvb(0, 1):uint() or 0
    local tkl = first % 16
    -- Not CoAP version 1 with an extended TKL: the built-in dissector as if we were not here.
    if math.floor(first / 64) ~= 1 or tkl < 13 then return coap:call(tvb, pinfo, tree) end
    local root = tree:add(coapx, tvb())
    root:add(xf.tkl, tvb(0, 1), tkl)
    local function bad(reason)
        root:add_proto_expert_info(x_malformed, "Malformed CoAP token: " .. reason)
        pinfo.cols.protocol = "CoAP"
        pinfo.cols.info = "CoAP [malformed token: " .. reason .. "]"
        return length
    end
    if tkl == 15 then return bad("TKL 15 is a message format error (RFC 8974 §2.1)") end
    local ext = tkl == 13 and 1 or 2
    if length < 4 + ext then return bad("truncated token length") end
    local token_len = tkl == 13 and tvb(4, 1):uint() + 13 or tvb(4, 2):uint() + 269
    root:add(xf.length, tvb(4, ext), token_len)
    if length < 4 + ext + token_len then return bad("token longer than the datagram") end
    root:add(xf.token, tvb(4 + ext, token_len))
    root:append_text(string.format(", %d bytes", token_len))
    -- The message without its token (TKL 0) for the built-in CoAP dissector.
    local rest = ByteArray.new()
    rest:append(tvb(0, 4):bytes())
    rest:set_index(0, first - tkl)
    local after = 4 + ext + token_len
    if after < length then rest:append(tvb(after):bytes()) end
    coap:call(rest:tvb("CoAP without its extended token"), pinfo, tree)
    return length
end

register_coapx_port(coapx.prefs.udp_port)
