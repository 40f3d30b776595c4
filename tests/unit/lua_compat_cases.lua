-- Cases for the compatibility test of tests/unit/test_policy_host.c: this
-- file runs both in a stock Lua 5.4 state (liblua5.4's own string, table,
-- utf8, os and base functions) and as a policy (the hub's bounded versions:
-- src/lua_pattern.c, src/lua_stdlib.c). run_range(i, j) serialises the
-- results (or error messages) of cases i..j; the test requires both to be
-- identical. The serialiser uses only string.byte, string.char, tostring
-- and table.concat, never a function under test's result shape.
--
-- Outputs avoid what legitimately differs between two states: iteration
-- order of string keys (a per-state hash seed), the order of equal elements
-- after table.sort (neither sort is stable), error positions "chunk:line:".

local cases = {}

local function esc(s)
  local out = {}
  for i = 1, #s do
    local b = s:byte(i)
    if (b >= 48 and b <= 57) or (b >= 65 and b <= 90) or (b >= 97 and b <= 122) or b == 32 then
      out[#out + 1] = string.char(b)
    else
      out[#out + 1] = '<' .. b .. '>'
    end
  end
  return table.concat(out)
end

-- a value without addresses (functions and tables print as their type)
local function plain(v)
  local t = type(v)
  if t == 'string' or t == 'number' or t == 'boolean' or t == 'nil' then
    return t .. ':' .. tostring(v)
  end
  return t
end

-- an error message without its "chunk:line: " prefix: the chunk names of
-- the two states differ
local function strip_pos(m)
  local n, i = #m, 1
  while i <= n do
    if m:byte(i) == 58 then -- ':'
      local j = i + 1
      while j <= n and m:byte(j) >= 48 and m:byte(j) <= 57 do j = j + 1 end
      if j > i + 1 and m:byte(j) == 58 and m:byte(j + 1) == 32 then
        return m:sub(j + 2)
      end
    end
    i = i + 1
  end
  return m
end

local function ser(ok, ...)
  if not ok then
    local m = ...
    return 'error:' .. esc(type(m) == 'string' and strip_pos(m) or plain(m))
  end
  local n = select('#', ...)
  local parts = {tostring(n)}
  for i = 1, n do
    local v = select(i, ...)
    local t = type(v)
    if t == 'string' then
      parts[#parts + 1] = 's:' .. esc(v)
    elseif t == 'number' then
      parts[#parts + 1] = math.type(v) .. ':' .. esc(tostring(v))
    elseif t == 'table' then
      -- integer keys 1..#v only (string keys iterate in a per-state order)
      local items = {}
      for k = 1, rawlen(v) do items[k] = plain(rawget(v, k)) end
      parts[#parts + 1] = 'table#' .. rawlen(v) .. ':' .. esc(table.concat(items, ','))
    else
      parts[#parts + 1] = plain(v)
    end
  end
  return table.concat(parts, '|')
end

local function add(f, ...)
  cases[#cases + 1] = table.pack(f, ...)
end

local function gmatch_all(s, p, init)
  local out, it = {}, string.gmatch(s, p, init)
  for _ = 1, 30 do
    local r = table.pack(it())
    if r[1] == nil then break end
    out[#out + 1] = ser(true, table.unpack(r, 1, r.n))
  end
  return table.concat(out, ';')
end

local function repl_fn(...)
  local n = select('#', ...)
  if n >= 1 and (...) == 'b' then return false end
  if n >= 1 and (...) == 'x' then return nil end
  local t = {}
  for i = 1, n do t[i] = tostring((select(i, ...))) end
  return '[' .. table.concat(t, ',') .. ']'
end

local repl_tab = setmetatable({a = 'A', b = false, ['1'] = 1}, {__index = function(_, k)
  if k == 'z' then return 'Z' end
end})

-- ---- patterns ------------------------------------------------------------

local pattern_cases = {
  {'hello world', 'o'}, {'hello world', 'l+'}, {'hello world', '(h)(e)(l+)'},
  {'hello', '()ll()'}, {'abc', '^(a)'}, {'abc', '^b'}, {'abc', 'c$'}, {'a$c', '$c'},
  {'a$c', 'a$'}, {'THE (quick) fox', '%((%a+)%)'}, {'key = value', '(%w+)%s*=%s*(%w+)'},
  {'[[x]] [y]', '%b[]'}, {'THE (quick) fox', '%f[%a]%a+'}, {'THE (quick) fox', '%f[%A]'},
  {'hello', ''}, {'', ''}, {'', 'a*'}, {'', '^$'}, {'aaa', 'a-'}, {'aaa', 'a-$'},
  {'aaab', 'a*b'}, {'aaab', 'a+b'}, {'ab', 'a?b'}, {'b', 'a?b'}, {'abab', '(ab)%1'},
  {'abcabc', '(a)(b)(c)%1%2%3'}, {'x', '%'}, {'x', 'a%'}, {'x', '[a'}, {'x', '[]'},
  {']', '[]]'}, {'x]', '[^]]'}, {'-', '[a-]'}, {'b', '[a-c]'}, {'%', '[%%]'},
  {'x', '[%'}, {'x', '(x'}, {'x', 'x)'}, {'x', '%1'}, {'x', '(x)%2'}, {'x', '%bx'},
  {'x', '%b'}, {'x', '%f'}, {'x', '%fx'}, {'ab', '(()a)'}, {'a.b', '%.'}, {'a.b', '.'},
  {'A1 b2', '%u%d'}, {'A1 b2', '%U%D'}, {'zz', '%z'}, {'a\0b', '\0'}, {'a\0b', '[\0]'},
  {'a\0b', '%c'}, {'a\0b', '.%z?b'}, {'\0', '%f[%z]'}, {'x\0', '%f[%c]'},
  {'[]', '%b[]'}, {'((a)', '%b()'}, {'a)', '%b)('}, {'aaa', '%baa'},
  {'f(a(b)c)d', '%b()'}, {'one two  three', '(%S+)'}, {'one two', '%s*()'},
  {'2024-01-02', '(%d+)-(%d+)-(%d+)'}, {'0x1F', '^0[xX](%x+)$'}, {'tab\there', '%c'},
  {'punct!?', '%p+'}, {'MiXeD', '%l+'}, {'MiXeD', '[%u%l]+'}, {'a-b', '[%w-]+'},
  {'a]b', '[]a]+'}, {'a^b', '[%^a]+'}, {'a^b', '[b^]+'}, {'bac', '[^%a]'},
  {'x=1, y=2', '(%w+)=(%w+)'}, {'aXb', '%f[%u]'}, {'   ', '^%s*$'},
  {'abc', '((a)(b))'}, {'abc', '(a(b(c)))'}, {'abc', ')'}, {'abc', '(()'},
  {'abc', '()'}, {'abc', '()()'}, {'ab', '(a)(b)%3'}, {'aa', '(a)%0'},
  {'aa', '(()a)%1'}, {'aa', '()a%1'}, {'x', '[a-'}, {'x', '[a-%'}, {'-x', '[-x]+'},
  {'x', '[x-]'}, {'ab', 'a-b'}, {'aab', 'a-b'}, {'a', 'a**'}, {'a+', 'a++'},
  {'a', '*a'}, {'a', '?'}, {'?', '%?'}, {'a', '(a?)?'}, {'aaa', '^a-$'},
  {string.rep('a', 12), string.rep('a?', 12) .. string.rep('a', 12)},
  {string.rep('a', 10), string.rep('(a)', 32)}, {string.rep('a', 40), string.rep('(a)', 33)},
  {'', string.rep('a?', 250)}, {'', string.rep('a*', 250)}, {'', string.rep('(', 50)},
  {'a', string.rep('a-', 300)}, {'x', string.rep('x?', 199) .. 'y'}, {'x', string.rep('x?', 201)},
}
for _, c in ipairs(pattern_cases) do
  local s, p = c[1], c[2]
  add(string.find, s, p)
  add(string.match, s, p)
  add(gmatch_all, s, p)
  add(string.gsub, s, p, '<%0>')
  add(string.gsub, s, p, '%1')
  add(string.gsub, s, p, repl_fn)
  add(string.gsub, s, p, repl_tab)
  add(string.gsub, s, p, '-', 1)
end

-- positions, plain find, gsub replacement strings and counts
for _, init in ipairs({-100, -3, -1, 0, 1, 2, 5, 11, 12, 13, 100, math.mininteger, math.maxinteger}) do
  add(string.find, 'hello world', 'o', init)
  add(string.find, 'hello world', 'o', init, true)
  add(string.find, 'hello world', '', init)
  add(string.find, 'hello world', '', init, true)
  add(string.match, 'hello world', '()o', init)
  add(gmatch_all, 'hello world', '()o', init)
  add(gmatch_all, 'hello world', '', init)
end
for _, c in ipairs({
  {'a.b', '.', nil, true}, {'a.b', '%.', 1, true}, {'a+b', '+', 1, true}, {'abc', 'c', 1, 1},
  {'a\0b\0c', '\0c', 1, true}, {'aaaaab', 'aab', 1, true}, {'x', 'xx', 1, true},
}) do
  add(string.find, c[1], c[2], c[3], c[4])
end
for _, r in ipairs({'%%', '%', '%a', '%0%0', '%1', '%2', 'x%', '%10', 12, 1.5, true, nil}) do
  add(string.gsub, 'hello world', '(o)', r)
  add(string.gsub, 'hello world', 'o', r)
  add(string.gsub, 'hello world', '()o', r)
end
for _, n in ipairs({-1, 0, 1, 2, 100, 2.5, '2'}) do
  add(string.gsub, 'a a a', 'a', 'b', n)
end
add(string.gsub, 'abc', '^a', 'x')
add(string.gsub, 'aaa', '^a', 'x')
add(string.gsub, 'abc', '', '-')
add(string.gsub, 'abc', 'b*', '-')
add(string.gsub, 'abc', '%w', function(c) return {} end)
add(string.gsub, 'abc', '%w', setmetatable({}, {__index = function() return 1 end}))
add(string.gsub, 'hello', '(l)(l)', function(a, b) return b .. a end)
add(string.gsub, 'hello', 'x*', function() return nil end)
add(string.gsub, 'abc', '.', {a = 1, b = true})
add(gmatch_all, '^a^a', '^a')
add(gmatch_all, 'abc', '.', -1)
add(gmatch_all, 'abc', '()', 10)
add(string.find, 123, 2)
add(string.gsub, 12345, 3, 9)
add(string.find, 'x', {})
add(string.gsub, 'x', 'x')
add(string.gsub, 'x', 'x', 'y', 'z')
add(string.match, 'x')

-- ---- the other bounded functions ----------------------------------------------

-- (string.rep('', math.maxinteger) is left out: Lua's own runs forever)
for _, a in ipairs({{'ab', 3}, {'ab', 0}, {'ab', -1}, {'', 5}, {'ab', 3, ','}, {'', 3, ','},
                    {'', 3, ''}, {'ab', 1, ','}, {'x', 2.0}, {'x', 2.5},
                    {'xx', math.maxinteger // 2 + 1}, {'xx', math.maxinteger // 2 + 1, 'y'},
                    {'x', 3, 5}, {'x', '3'}}) do
  add(string.rep, table.unpack(a))
end
for _, a in ipairs({{}, {1}, {-1}, {2, 4}, {0, 100}, {-3, -2}, {4, 2}, {'2'}, {1.5},
                    {math.mininteger, math.maxinteger}, {100}, {-100, 100}}) do
  add(string.byte, 'hello', table.unpack(a))
  add(string.sub, 'hello', table.unpack(a))
  add(utf8.codepoint, 'h\u{e9}llo', table.unpack(a))
  add(utf8.len, 'h\u{e9}llo', table.unpack(a))
  add(utf8.len, 'h\xffllo', table.unpack(a))
  add(utf8.offset, 'h\u{e9}llo', table.unpack(a))
end
add(string.char, 104, 105)
add(string.char)
add(string.char, 256)
add(string.format, '%d %s %q %5.2f %x %g %%', 42, 'str', 'a\n"b"\0', 3.14159, 255, 1e300)
add(string.format, '%099d', 1)
add(string.format, '%10s|%-10s|', 'a', 'b')
add(string.format, '%s')
add(string.format, '%c%c', 104, 105)
add(string.format, '%q', 1 / 0)
add(string.reverse, 'abc')
add(string.upper, 'aBc1')
add(string.lower, 'aBc1')
add(string.len, 'abc')
add(string.pack, 'i4', 100)
add(string.pack, 'z', 'abc')
add(string.pack, 's1', 'abc')
add(string.pack, 'c5', 'abc')
add(string.pack, 'i17', 1)
add(string.pack, '>I2 <I2 =I2 !4 i3 Xi4 b B h H l L j J T f d n', 1, 2, 3, 4, 5, 6, 7, 8,
    9, 10, 11, 12, 13, 14, 1.5, 2.5, 3.5)
add(string.packsize, 'i4i8')
add(string.packsize, 'z')
add(string.unpack, 'i4', string.pack('i4', 7))
add(string.unpack, 'z z', 'ab\0cd\0')
add(string.unpack, 'z', 'ab')
add(string.unpack, 'c2', 'abc', 2)
add(string.unpack, 'c2', 'abc', 5)
add(function() return '10' + 1, '0x10' * 2, ' 5 ' - 1, '3' / '2', '7' // 2, '7' % 3,
                      -'2', '2' ^ '3' end)
add(function() return 'abc' + 1 end)
add(function() return {} + '1' end)
add(tonumber, '  0x1p4  ')
add(tonumber, 'z', 36)
add(tonumber, '10', 99)
add(tonumber, '1e1')
add(tonumber, 'nan')
add(tonumber, 12)
add(tonumber)
add(rawequal, 'abc', 'abc')
add(rawequal, string.rep('x', 100), string.rep('x', 99) .. 'x')
add(rawequal, 1, 1.0)

local function tt(t) return t end
add(function() local t = {1, 2, 3} table.insert(t, 4) return tt(t) end)
add(function() local t = {1, 2, 3} table.insert(t, 1, 0) return tt(t) end)
add(function() local t = {1, 2, 3} table.insert(t, 4, 9) return tt(t) end)
add(function() local t = {1, 2, 3} table.insert(t, 5, 9) return tt(t) end)
add(function() local t = {1, 2, 3} table.insert(t, 0, 9) return tt(t) end)
add(function() local t = {} table.insert(t, 1, 'a') return tt(t) end)
add(function() table.insert({}, 1, 2, 3) end)
add(function() table.insert({}) end)
add(function() table.insert('x', 1) end)
add(function() table.insert({}, 'x', 1) end)
add(function() local t = {1, 2, 3} return table.remove(t), tt(t) end)
add(function() local t = {1, 2, 3} return table.remove(t, 1), tt(t) end)
add(function() local t = {1, 2, 3} return table.remove(t, 4), tt(t) end)
add(function() local t = {1, 2, 3} return table.remove(t, 5) end)
add(function() local t = {} return table.remove(t), table.remove(t, 0), table.remove(t, 1) end)
add(function() local t = {[0] = 'z'} return table.remove(t, 0), rawget(t, 0) end)
add(table.concat, {1, 2, 'x', 3.5})
add(table.concat, {1, 2, 3}, ', ')
add(table.concat, {1, 2, 3}, ', ', 2)
add(table.concat, {1, 2, 3}, ', ', 2, 3)
add(table.concat, {1, 2, 3}, ', ', 3, 2)
add(table.concat, {1, 2, 3}, ', ', 1, 4)
add(table.concat, {1, {}, 3})
add(table.concat, {}, 'x', math.maxinteger, math.maxinteger)
add(table.concat, 'abc')
add(function() return table.move({1, 2, 3}, 1, 3, 2) end)
add(function() return table.move({1, 2, 3}, 2, 3, 1) end)
add(function() return table.move({1, 2, 3}, 1, 3, 1, {}) end)
add(function() return table.move({1, 2, 3}, 3, 1, 1, {}) end)
add(function() return table.move({}, -1, math.maxinteger, 1) end)
add(function() return table.move({}, 1, 2, math.maxinteger) end)
add(function() return table.move({}, 1, 2) end)
add(table.unpack, {1, 2, 3})
add(table.unpack, {1, 2, 3}, 2)
add(table.unpack, {1, 2, 3}, 2, 5)
add(table.unpack, {1, 2, 3}, 3, 1)
add(table.unpack, {1, 2, 3}, nil, 2)
add(table.unpack, {}, 1, 1e7)
add(table.unpack, {}, math.mininteger, math.maxinteger)
add(table.unpack, 'abc')
add(table.pack, 1, nil, 3)
add(function() return table.pack(1, nil, 3).n end)
add(function() local t = {5, 2, 8, 1, 9, 3} table.sort(t) return tt(t) end)
add(function() local t = {5, 2, 8, 1, 9, 3} table.sort(t, function(a, b) return a > b end) return tt(t) end)
add(function() local t = {'b', 'a', 'c'} table.sort(t) return tt(t) end)
add(function() local t = {} table.sort(t) return tt(t) end)
add(function() local t = {1} table.sort(t) return tt(t) end)
add(function() local t = {1, 2} table.sort(t, 3) end)
add(function() local t = {3, 1, 2} table.sort(t, nil) return tt(t) end)
add(function() local t = {} for i = 1, 200 do t[i] = (i * 7919) % 1009 end table.sort(t) return tt(t) end)
add(function() local t = {} for i = 1, 100 do t[i] = {k = (i * 31) % 101} end
                table.sort(t, function(a, b) return a.k < b.k end)
                local o = {} for i = 1, #t do o[i] = t[i].k end return tt(o) end)

-- proxies: tables with __index/__newindex/__len
local function proxy(n)
  local store = {}
  for i = 1, n do store[i] = i * 10 end
  return setmetatable({}, {
    __index = function(_, k) return store[k] end,
    __newindex = function(_, k, v) store[k] = v end,
    __len = function() return n end,
  }), store
end
add(function() local p, s = proxy(3) table.insert(p, 1, 5) return tt(s) end)
add(function() local p, s = proxy(3) return table.remove(p, 1), tt(s) end)
add(function() local p = proxy(3) return table.concat(p, ',') end)
add(function() local p = proxy(3) return table.unpack(p) end)
add(function() local p, s = proxy(4) s[1], s[2], s[3], s[4] = 4, 3, 2, 1 table.sort(p) return tt(s) end)
add(function() local p = proxy(3) return table.move(p, 1, 3, 2, {}) end)
add(function() return table.insert(setmetatable({}, {__index = {}}), 1) end)
add(function() return table.concat(setmetatable({}, {__index = function(_, i) return 'v' .. i end, __len = function() return 3 end})) end)

add(utf8.char, 72, 0x10FFFF, 0x7FFFFFFF)
add(utf8.char, -1)
add(utf8.char)
add(function() local o = {} for p, c in utf8.codes('h\u{e9}\u{10000}!') do o[#o + 1] = p .. ':' .. c end return table.concat(o, ' ') end)
add(function() local o = {} for p, c in utf8.codes('ab\xff') do o[#o + 1] = p .. ':' .. c end return table.concat(o, ' ') end)
add(function() local o = {} for p, c in utf8.codes('\x80ab') do o[#o + 1] = p end return table.concat(o, ' ') end)
add(function() local o = {} for p, c in utf8.codes('a\u{D800}', true) do o[#o + 1] = p .. ':' .. c end return table.concat(o, ' ') end)
add(function() local o = {} for p, c in utf8.codes('a\u{D800}') do o[#o + 1] = p .. ':' .. c end return table.concat(o, ' ') end)
add(function() local f, s = utf8.codes('a\u{e9}b') return f(s, 0), f(s, 1), f(s, 2), f(s, 3), f(s, 4), f(s, 5), f(s, 100), f(s, -1) end)
add(function() local f, s = utf8.codes('a\x80\x80\x80b') return f(s, 1) end)
add(function() local f, s = utf8.codes('a\x80\x80\x80') return f(s, 1) end)
add(utf8.offset, 'a\u{e9}b', 3)
add(utf8.offset, 'a\u{e9}b', -1)
add(utf8.offset, 'a\u{e9}b', 1, 3)
add(utf8.offset, 'a\u{e9}b', 0, 3)
add(utf8.offset, 'a\u{e9}b', 10)
add(utf8.len, '\u{7FFFFFFF}', 1, -1, true)
add(utf8.codepoint, '\u{7FFFFFFF}', 1, 1, true)
add(function() local o = {} for k, v in pairs({10, 20, 30}) do o[#o + 1] = k .. '=' .. v end return table.concat(o, ' ') end)
add(function() local o = {} for k, v in next, {10, 20} do o[#o + 1] = k .. '=' .. v end return table.concat(o, ' ') end)
add(function() return next({}), next({5}), next({5}, 1) end)
add(function() return next({}, 'nope') end)
add(function() return pairs(setmetatable({}, {__pairs = function(t) return function() return nil end, t, 7 end})) end)
add(function() return select(3, pairs({})) end)
add(os.date, '!%Y-%m-%d %H:%M:%S', 86400 * 365)
add(os.date, '!*t', 0)
add(os.date, '%Ez', 0)
add(os.time, {year = 2000, month = 1, day = 1, hour = 12, isdst = false})
add(os.time, {year = 2000})

-- ---- random patterns ---------------------------------------------------------------

local ptoks = {'a', 'b', 'x', '.', '%a', '%d', '%s', '%W', '[ab]', '[^a]', '[a-c]', '*', '+', '-',
               '?', '(', ')', '()', '^', '$', '%1', '%2', '%b()', '%f[a]', '%f[%s]', ' ', '%'}
local stoks = {'a', 'b', 'x', '(', ')', '1', ' ', 'ab', 'aa'}
math.randomseed(20261128)
for _ = 1, 2500 do
  local p, s = {}, {}
  for i = 1, math.random(1, 7) do p[i] = ptoks[math.random(#ptoks)] end
  for i = 1, math.random(0, 8) do s[i] = stoks[math.random(#stoks)] end
  p, s = table.concat(p), table.concat(s)
  local init = math.random(-3, 6)
  add(string.find, s, p, init)
  add(string.match, s, p)
  add(gmatch_all, s, p)
  add(string.gsub, s, p, '<%0>')
  add(string.gsub, s, p, repl_fn, 3)
end

ncases = #cases

function run_range(i, j)
  local out = {}
  for k = i, math.min(j, #cases) do
    local c = cases[k]
    out[#out + 1] = k .. '=' .. ser(pcall(c[1], table.unpack(c, 2, c.n)))
  end
  return table.concat(out, '#')
end
