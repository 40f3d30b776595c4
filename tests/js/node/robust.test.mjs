// luahub.js against a WebSocket server of the test's own (npm ws, on a free loopback port)
// that says what a correct hub never says: malformed frames, unknown ops, replies to unknown
// ids, duplicate offsets, silence. The client must report them and carry on.
import { test as nodeTest, after } from 'node:test'
import assert from 'node:assert/strict'
import { WebSocketServer } from 'ws'
import { Client } from '../../../clients/js/luahub.js'
import { wsClass, next, record, until, sleep } from '../lib/hub.mjs'

const test = (name, fn) => nodeTest(name, { timeout: 30000 }, fn)
const servers = []
const clients = []
after(() => {
  for (const c of clients) c.disconnect()
  for (const s of servers) s.close()
})

const WELCOME = (ping = 25) => JSON.stringify({ op: 'welcome', client: 'c1', version: '0.1.0', ping })

// A server whose connection handler is `onConn(ws, index)`; each connection's received
// commands are in conns[index].got (parsed).
async function server(onConn, { welcome = true, ping } = {}) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 })
  servers.push(wss)
  await new Promise((r) => wss.on('listening', r))
  const conns = []
  wss.on('connection', (ws, req) => {
    ws.got = []
    ws.req = req
    conns.push(ws)
    ws.on('message', (d) => ws.got.push(JSON.parse(d)))
    if (welcome) ws.send(WELCOME(ping))
    onConn(ws, conns.length - 1)
  })
  return { url: `ws://127.0.0.1:${wss.address().port}/ws`, conns, wss }
}

function client(url, opts) {
  const c = new Client(url, { WebSocket: wsClass(), timeout: 5000, minDelay: 10, maxDelay: 50, ...opts })
  clients.push(c)
  return c
}

// Answers subscribe commands like a hub: ok, effective channel, and the given extra fields.
function answerSubscribe(ws, extra = {}) {
  ws.on('message', (d) => {
    const m = JSON.parse(d)
    if (m.op == 'subscribe') ws.send(JSON.stringify({ id: m.id, ok: true, channel: m.channel, ...extra }))
  })
}

test('malformed frames, unknown ops, replies to unknown ids: an error event each, no crash', async () => {
  const s = await server((ws) => answerSubscribe(ws))
  const c = client(s.url).connect()
  const errors = record(c, ['error'])
  const sub = c.subscribe('room:1')
  await sub.ready()
  const ws = s.conns[0]
  const bad = [
    '{"op":"message",', // not JSON
    '[1,2]', // not an object
    'null',
    '"text"',
    '{"op":"frobnicate","channel":"room:1"}', // unknown op
    '{"id":999,"ok":true}', // reply to an id never sent
    '{"id":"x","ok":false,"error":{"code":"internal","message":"?"}}',
    '{"ok":false,"error":{"code":"bad_request","message":"invalid JSON"}}', // id-less error
    '{"op":"message"}', // a delivery without a channel: nobody's
  ]
  for (const f of bad) ws.send(f)
  ws.send(Buffer.from([0xff, 0x00, 0x01])) // binary junk
  ws.send('{"op":"message","channel":"room:1","data":"fine"}')
  const m = await next(sub, 'message')
  assert.equal(m.data, 'fine')
  assert.deepEqual(
    errors.map(([, e]) => [e.type, e.error.message]),
    [
      ['protocol', 'malformed frame'],
      ['protocol', 'malformed frame'],
      ['protocol', 'malformed frame'],
      ['protocol', 'malformed frame'],
      ['protocol', 'unknown op frobnicate'],
      ['protocol', 'reply to unknown id 999'],
      ['protocol', 'reply to unknown id x'],
      ['protocol', 'error: invalid JSON'],
      ['protocol', 'malformed frame'],
    ],
  )
  assert.equal(c.state, 'connected')
  assert.equal(s.conns.length, 1, 'no reconnection')
  assert.equal(errors[0][1].data, '{"op":"message",')
})

test('a command the server never answers: timeout error; its late reply is reported, not a crash', async () => {
  const s = await server(() => {})
  const c = client(s.url, { timeout: 200 }).connect()
  await c.ready()
  await assert.rejects(c.rpc('slow'), { name: 'LuahubError', code: 'timeout' })
  await assert.rejects(c.publish('room:1', 1), { code: 'timeout' })
  await assert.rejects(c.history('room:1'), { code: 'timeout' })
  await assert.rejects(c.presence('room:1'), { code: 'timeout' })
  await assert.rejects(c.presenceStats('room:1'), { code: 'timeout' })
  const ws = s.conns[0]
  assert.deepEqual(ws.got.map((m) => m.op), ['rpc', 'publish', 'history', 'presence', 'presence_stats'])
  const late = next(c, 'error')
  ws.send(JSON.stringify({ id: ws.got[0].id, ok: true, data: 'late' }))
  assert.equal((await late).error.message, `reply to unknown id ${ws.got[0].id}`)
  assert.equal(c.state, 'connected')
})

test('a subscribe the server never answers: the client reconnects (a fresh start) and subscribes again', async () => {
  const s = await server((ws, i) => {
    if (i == 1) answerSubscribe(ws)
  })
  const c = client(s.url, { timeout: 200 }).connect()
  const sub = c.subscribe('room:1')
  const lost = await next(c, 'connecting', (e) => e.code == 0)
  assert.equal(lost.reason, 'subscribe timed out')
  await sub.ready()
  assert.equal(s.conns.length, 2)
})

test('deliveries deduplicated by offset; reset moves the position', async () => {
  const s = await server((ws) => answerSubscribe(ws, { offset: 0, epoch: 'E1' }))
  const c = client(s.url).connect()
  const sub = c.subscribe('room:d')
  await sub.ready()
  const got = []
  sub.on('message', (m) => got.push(m.offset))
  const resets = record(sub, ['reset'])
  const ws = s.conns[0]
  const d = (o) => ws.send(JSON.stringify({ op: 'message', channel: 'room:d', data: o, offset: o }))
  ;[1, 2, 2, 1, 3].forEach(d)
  ws.send(JSON.stringify({ op: 'reset', channel: 'room:d', offset: 10, epoch: 'E2' }))
  ;[4, 11, 11, 12].forEach(d)
  await until(() => got.length == 5, 'five deliveries')
  assert.deepEqual(got, [1, 2, 3, 11, 12])
  assert.deepEqual(resets.map(([, e]) => [e.offset, e.epoch]), [[10, 'E2']])
  assert.deepEqual([sub.offset, sub.epoch], [12, 'E2'])
})

test('resubscribe after a reconnection: recover with the last offset and epoch; missed replays, no duplicate', async () => {
  const s = await server((ws, i) => {
    ws.on('message', (d) => {
      const m = JSON.parse(d)
      if (m.op != 'subscribe') return
      if (i == 0) {
        ws.send(JSON.stringify({ id: m.id, ok: true, channel: 'room:r', offset: 2, epoch: 'E' }))
        return
      }
      const from = m.recover.offset
      ws.send(JSON.stringify({ id: m.id, ok: true, channel: 'room:r', recovered: true, offset: 5, epoch: 'E', missed: 5 - from }))
      // replays, then a live one, then a duplicate of a replay
      for (const o of [3, 4, 5, 6, 5]) ws.send(JSON.stringify({ op: 'message', channel: 'room:r', data: o, offset: o }))
    })
  })
  const c = client(s.url).connect()
  const sub = c.subscribe('room:r')
  await sub.ready()
  const got = []
  sub.on('message', (m) => got.push(m.offset))
  s.conns[0].send('{"op":"message","channel":"room:r","data":3,"offset":3}')
  await until(() => got.length == 1, 'offset 3')
  const again = next(sub, 'subscribed')
  s.conns[0].close(4001, 'slow consumer')
  const e = await again
  assert.deepEqual([e.recovering, e.recovered, e.missed], [true, true, 2])
  assert.deepEqual(s.conns[1].got[0].recover, { offset: 3, epoch: 'E' })
  await until(() => got.length == 4, 'offsets 4 to 6')
  assert.deepEqual(got, [3, 4, 5, 6])
})

test('a renamed subscription (inbox -> inbox:alice) gets the deliveries of its effective channel', async () => {
  const s = await server((ws) =>
    ws.on('message', (d) => {
      const m = JSON.parse(d)
      if (m.op == 'subscribe') ws.send(JSON.stringify({ id: m.id, ok: true, channel: 'inbox:alice' }))
      if (m.op == 'unsubscribe') ws.send(JSON.stringify({ id: m.id, ok: true }))
    }),
  )
  const c = client(s.url).connect()
  const sub = c.subscribe('inbox')
  const e = await next(sub, 'subscribed')
  assert.equal(e.channel, 'inbox:alice')
  const got = next(sub, 'message')
  s.conns[0].send('{"op":"message","channel":"inbox:alice","data":"dm"}')
  assert.equal((await got).data, 'dm')
  // deliveries of a channel the policy subscribed the client to (no Subscription) and pushes
  const other = next(c, 'message')
  const push = next(c, 'push')
  s.conns[0].send('{"op":"message","channel":"news","data":"n"}')
  s.conns[0].send('{"op":"push","data":{"notice":1}}')
  assert.equal((await other).channel, 'news')
  assert.deepEqual(await push, { notice: 1 })
  sub.unsubscribe()
  await until(() => s.conns[0].got.some((m) => m.op == 'unsubscribe'), 'the unsubscribe')
  assert.equal(s.conns[0].got.at(-1).channel, 'inbox:alice')
})

test('watchdog: a server silent past welcome.ping + pingMargin gets a ping, then the client reconnects', async () => {
  const s = await server(() => {}, { ping: 0.2 })
  const c = client(s.url, { pingMargin: 200 }).connect()
  await c.ready()
  const lost = await next(c, 'connecting', (e) => e.code == 0)
  assert.equal(lost.reason, 'the server went silent')
  assert.deepEqual(s.conns[0].got, [{ op: 'ping' }])
  await next(c, 'connected')
  assert.equal(s.conns.length, 2)
})

test('watchdog: a server that answers keeps the connection', async () => {
  const s = await server(
    (ws) =>
      ws.on('message', (d) => {
        const m = JSON.parse(d)
        if (m.op == 'ping') ws.send('{"ok":true}')
      }),
    { ping: 0.1 },
  )
  const c = client(s.url, { pingMargin: 300 }).connect()
  await c.ready()
  await until(() => s.conns[0].got.length >= 5, 'five pings answered')
  assert.equal(s.conns.length, 1)
  assert.equal(c.state, 'connected')
})

test('no welcome within the timeout: the client gives up on that connection and retries', async () => {
  const s = await server(() => {}, { welcome: false })
  const c = client(s.url, { timeout: 200 }).connect()
  const e = await next(c, 'connecting', (x) => x.code == 0 && x.reason != 'connect called')
  assert.equal(e.reason, 'no welcome within 200 ms')
  await until(() => s.conns.length == 2, 'a second attempt')
})

test('reconnect delays follow the backoff bounds while the server is unreachable', async () => {
  const s = await server(() => {})
  const url = s.url
  await new Promise((r) => s.wss.close(r))
  const c = client(url, { minDelay: 20, maxDelay: 100 })
  const seen = record(c, ['connecting'])
  c.connect()
  await until(() => seen.length >= 8, 'seven failed attempts')
  c.disconnect()
  const delays = seen.slice(1).map(([, e]) => e.delay)
  delays.forEach((d, i) => assert.ok(d >= 0 && d <= Math.min(100, 20 * 2 ** i), `attempt ${i}: ${d}`))
  for (const [, e] of seen.slice(1)) assert.equal(e.code, 1006)
})

test('sessionStorage junk is ignored; a position kept for a channel without history is dropped', async () => {
  const s = await server((ws) =>
    ws.on('message', (d) => {
      const m = JSON.parse(d)
      if (m.op != 'subscribe') return
      if (m.recover) ws.send(JSON.stringify({ id: m.id, ok: false, error: { code: 'not_available', message: 'no history' } }))
      else ws.send(JSON.stringify({ id: m.id, ok: true, channel: m.channel }))
    }),
  )
  const items = { 'luahub:a': '{not json', 'luahub:b': '{"offset":"x","epoch":1}', 'luahub:c': '{"offset":3,"epoch":"E"}' }
  const storage = { getItem: (k) => items[k] ?? null, setItem: (k, v) => (items[k] = v) }
  const c = client(s.url, { storage }).connect()
  const subs = ['a', 'b', 'c'].map((ch) => c.subscribe(ch))
  await Promise.all(subs.map((x) => x.ready()))
  const cmds = s.conns[0].got.map((m) => [m.channel, !!m.recover])
  assert.deepEqual(cmds, [['a', false], ['b', false], ['c', true], ['c', false]])
})

test('listeners may call connect() and disconnect() from any event', async () => {
  const s = await server((ws) => answerSubscribe(ws))
  const c = client(s.url)
  const once = (ev, fn) => c.on(ev, function f(e) {
    c.off(ev, f)
    fn(e)
  })
  once('connecting', () => c.disconnect())
  c.connect() // disconnected from its own 'connecting' event: no attempt is left behind
  assert.equal(c.state, 'disconnected')
  once('connected', () => c.disconnect())
  once('disconnected', () => c.connect()) // and connecting again from 'disconnected'
  c.connect()
  await until(() => s.conns.length == 2 && c.state == 'connected', 'connected on a second connection')
  await until(() => s.conns[0].readyState == 3, 'the first connection closed')
  assert.equal(s.conns.length, 2)
})

test('1,000 rapid subscribe/unsubscribe calls while subscribe replies come late: one command in flight, the last call wins', async () => {
  // Like the redis broker: a subscribe is answered once Redis confirms (here 30 ms later),
  // an unsubscribe at once; the server applies each command when it arrives.
  const on = new Set()
  const s = await server((ws) =>
    ws.on('message', (d) => {
      const m = JSON.parse(d)
      if (m.op == 'subscribe') {
        on.add(m.channel)
        setTimeout(() => ws.send(JSON.stringify({ id: m.id, ok: true, channel: m.channel })), 30)
      }
      if (m.op == 'unsubscribe') {
        on.delete(m.channel)
        ws.send(JSON.stringify({ id: m.id, ok: true }))
      }
    }),
  )
  const c = client(s.url).connect()
  await c.ready()
  const a = c.subscribe('a')
  const b = c.subscribe('b')
  for (let i = 0; i < 1000; i++) {
    a.unsubscribe().subscribe()
    b.subscribe().unsubscribe()
  }
  await a.ready()
  await until(() => !on.has('b') && on.has('a'), 'a subscribed, b not, on the server')
  await sleep(100) // replies still on their way would show up here
  assert.deepEqual([...on], ['a'])
  assert.deepEqual([a.state, b.state], ['subscribed', 'unsubscribed'])
  const sent = s.conns[0].got.filter((m) => m.op != 'ping')
  assert.ok(sent.length <= 4, `${sent.length} commands for 4000 calls`)
})
