// luahub.js against the real hub (LUAHUB_BIN, default build/luahub) on a free loopback port.
// Test names in [brackets] need a hub feature of protocol-additions (history, presence,
// refusal close codes, subprotocols, hub.json.array); the others need today's hub.
import { test as nodeTest, after } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { Client, LuahubError, backoff } from '../../../clients/js/luahub.js'
import { ROOT, startHub, startRedis, wsClass, next, record, until, sleep } from '../lib/hub.mjs'

const POLICY = join(ROOT, 'tests/js/node/policy.lua')
const BASE = `policy = ${JSON.stringify(POLICY)}\nlog_level = "warn"\n`
const HISTORY = `${BASE}channels = {
  ["room:*"] = { history_size = 100, history_ttl = 600, presence = true, join_leave = true },
}\n`

// Every test is bounded: a missing hub feature fails it, never hangs the suite.
const test = (name, fn) => nodeTest(name, { timeout: 30000 }, fn)

const hubs = []
const clients = []
const redises = []
after(async () => {
  for (const c of clients) c.disconnect()
  for (const h of hubs) {
    await h.stop()
    h.cleanup()
  }
  for (const r of redises) await r.stop()
})

async function hub(conf = BASE) {
  const h = await startHub({ conf })
  hubs.push(h)
  return h
}

function client(h, opts = {}) {
  const WS = wsClass()
  const c = new Client(h.url, { WebSocket: WS, timeout: 5000, ...opts })
  c.WS = WS
  clients.push(c)
  return c
}

// Resolves with the deliveries `sub` got once it has `n` of them.
function messages(sub, n, ms = 10000) {
  const got = []
  return new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error(`${got.length} of ${n} deliveries within ${ms} ms: ${JSON.stringify(got)}`)), ms)
    sub.on('message', (m) => {
      got.push(m)
      if (got.length == n) clearTimeout(t), res(got)
    })
  })
}

test('connect: connecting then connected, ready() resolves, the welcome is kept', async () => {
  const h = await hub()
  const c = client(h)
  const states = record(c, ['state'])
  c.connect()
  assert.equal(await c.ready(), c)
  assert.deepEqual(states.map(([, e]) => [e.prev, e.state]), [['disconnected', 'connecting'], ['connecting', 'connected']])
  assert.match(c.clientId, /./)
  c.disconnect()
  assert.equal(c.state, 'disconnected')
  await assert.rejects(c.ready(), (e) => e instanceof LuahubError && e.code == 'disconnected')
})

test('subscribe, publish, deliveries, rpc results and typed errors', async () => {
  const h = await hub()
  const a = client(h, { token: 'alice' }).connect()
  const b = client(h, { token: 'bob' }).connect()
  const sa = a.subscribe('room:1')
  const sb = b.subscribe('room:1')
  await Promise.all([sa.ready(), sb.ready()])
  const got = messages(sb, 2)
  await a.publish('room:1', { text: 'hi' })
  await sa.publish([1, 2])
  assert.deepEqual((await got).map((m) => m.data), [{ text: 'hi' }, [1, 2]])
  await h.publish('room:1', 'from the API')
  assert.equal((await next(sa, 'message', (m) => m.data == 'from the API')).channel, 'room:1')

  assert.deepEqual(await a.rpc('echo', { x: [1, 'y'] }), { x: [1, 'y'] })
  assert.deepEqual(await b.rpc('whoami'), { user: 'bob', info: { via: 'query' } })
  await assert.rejects(a.rpc('fail'), { name: 'LuahubError', code: 'rpc_error', message: 'it failed' })
  // a policy that loops is stopped by its instruction budget: internal
  await assert.rejects(a.rpc('loop'), { code: 'internal' })
  await assert.rejects(a.publish('bad channel', 1), { code: 'invalid_channel' })

  // a refused subscription ends unsubscribed, with an error event and ready() rejected
  const bad = a.subscribe('no spaces allowed')
  const errors = record(bad, ['error'])
  await assert.rejects(bad.ready(), { code: 'invalid_channel' })
  assert.equal(bad.state, 'unsubscribed')
  assert.equal(errors[0][1].error.code, 'invalid_channel')

  sb.unsubscribe()
  await until(async () => (await b.rpc('channels')).n == 0, 'bob unsubscribed')
})

test('publish while disconnected rejects; with buffer it waits for the reconnection, bounded', async () => {
  const h = await hub()
  const c = client(h)
  await assert.rejects(c.publish('room:1', 1), { code: 'disconnected' })
  await assert.rejects(c.rpc('echo', 1), { code: 'disconnected' })

  // buffer: 2 publishes may wait while the client reconnects (here: after the hub restart)
  const b = client(h, { buffer: 2, minDelay: 50, maxDelay: 200 }).connect()
  const s = b.subscribe('room:buf')
  await s.ready()
  const reconnecting = next(b, 'connecting')
  await h.stop()
  assert.equal((await reconnecting).code, 1001)
  const p1 = b.publish('room:buf', 'one')
  const p2 = s.publish('two')
  await assert.rejects(b.publish('room:buf', 'three'), { code: 'buffer_full' })
  const got = messages(s, 2)
  const h2 = await h.restart()
  hubs.push(h2)
  await Promise.all([p1, p2])
  assert.deepEqual((await got).map((m) => m.data), ['one', 'two'])
  // with buffering off the same situation rejects at once
  const nb = client(h2).connect()
  await nb.ready()
  nb.disconnect()
  await assert.rejects(nb.publish('room:buf', 'x'), { code: 'disconnected' })
})

test('close 1001 (hub shutting down): retried at once, then backoff until the hub is back; subscriptions come back', async () => {
  const h = await hub()
  const c = client(h, { minDelay: 100, maxDelay: 400 }).connect()
  const s = c.subscribe('room:2')
  await s.ready()
  const connecting = record(c, ['connecting'])
  const subscribing = next(s, 'subscribing')
  await h.stop()
  await until(() => connecting.length >= 1, 'the close')
  assert.equal(connecting[0][1].code, 1001)
  assert.equal(connecting[0][1].delay, 0, 'no delay after 1001')
  assert.equal((await subscribing).code, 1001)
  // the hub is down: the next attempts fail and back off within [0, min(max, min * 2^n)]
  await until(() => connecting.length >= 4, '3 failed attempts')
  connecting.slice(1).forEach(([, e], i) => {
    assert.ok(e.delay >= 0 && e.delay <= Math.min(400, 100 * 2 ** i), `attempt ${i}: ${e.delay} ms`)
  })
  const back = next(s, 'subscribed')
  const h2 = await h.restart()
  hubs.push(h2)
  await back
  assert.equal(c.state, 'connected')
  const got = messages(s, 1)
  await h2.publish('room:2', 'after the restart')
  assert.equal((await got)[0].data, 'after the restart')
})

test('getToken that throws, then hangs, then answers: bounded retries, then connected with its token', async () => {
  const h = await hub()
  let calls = 0
  const c = client(h, {
    timeout: 300,
    minDelay: 10,
    maxDelay: 50,
    getToken() {
      calls++
      if (calls == 1) throw new Error('token service down')
      if (calls == 2) return new Promise(() => {}) // never answers
      return Promise.resolve('carol')
    },
  })
  const errors = record(c, ['error'])
  c.connect()
  await c.ready()
  assert.equal(calls, 3)
  assert.deepEqual(errors.map(([, e]) => [e.type, e.error.code || e.error.message]), [
    ['token', 'token service down'],
    ['token', 'timeout'],
  ])
  assert.equal(c.WS.made.length, 1, 'no connection without a token')
  assert.equal((await c.rpc('whoami')).user, 'carol')
})

for (const broker of ['memory', 'redis'])
test(`1,000 rapid subscribe/unsubscribe calls end in the state of the last call (${broker} broker)`, async () => {
  let conf = BASE
  if (broker == 'redis') {
    const r = await startRedis()
    redises.push(r)
    conf += `broker = "${r.url}"\n`
  }
  const h = await hub(conf)
  const c = client(h).connect()
  await c.ready()
  const s = c.subscribe('room:flip')
  for (let i = 0; i < 1000; i++) {
    s.unsubscribe()
    s.subscribe()
  }
  await s.ready()
  await until(async () => (await c.rpc('channels')).n == 1, 'one subscription on the hub')
  assert.deepEqual((await c.rpc('channels')).list, ['room:flip'])
  const once = []
  s.on('message', (m) => once.push(m.data))
  await h.publish('room:flip', 'once')
  await until(() => once.length == 1, 'the delivery')
  await c.rpc('echo', 1) // a round trip: a duplicate would have come before its reply
  assert.deepEqual(once, ['once'])

  // and the other way round, with several channels at once
  const subs = ['room:f1', 'room:f2', 'room:f3'].map((ch) => c.subscribe(ch))
  for (let i = 0; i < 1000; i++) {
    const x = subs[i % 3]
    x.subscribe()
    x.unsubscribe()
  }
  s.unsubscribe()
  for (const x of subs) assert.equal(x.state, 'unsubscribed')
  await until(async () => (await c.rpc('channels')).n == 0, 'no subscription left on the hub')
  const stray = record(c, ['message'])
  await h.publish('room:flip', 'nobody')
  await h.publish('room:f1', 'nobody')
  await c.rpc('echo', 1)
  await c.rpc('echo', 2)
  assert.deepEqual(stray, [])
})

test('4001 slow consumer: reconnects and resubscribes by itself', async () => {
  const h = await hub(`${BASE}max_queue_bytes = "4KiB"\nmax_message_size = "4KiB"\n`)
  const c = client(h, { minDelay: 50, maxDelay: 200 }).connect()
  const s = c.subscribe('room:slow')
  await s.ready()
  const lost = next(c, 'connecting')
  c.rpc('flood', { channel: 'room:slow', n: 8, size: 1000 }).catch(() => {})
  assert.equal((await lost).code, 4001)
  await next(s, 'subscribed')
  const got = messages(s, 1)
  await h.publish('room:slow', 'still here')
  assert.equal((await got)[0].data, 'still here')
})

test('[refusal close codes] refused with 4403: disconnected with the reason, never retried', async () => {
  const h = await hub()
  const c = client(h, { token: 'forbidden', minDelay: 10, maxDelay: 20 }).connect()
  const e = await next(c, 'disconnected')
  assert.deepEqual([e.code, e.reason], [4403, 'go away'])
  await assert.rejects(c.ready(), { code: 4403 })
  await sleep(500) // 25 times the longest backoff: a retry would have happened
  assert.equal(c.WS.made.length, 1)
  assert.equal(c.state, 'disconnected')
})

test('[refusal close codes] refused with 4401, getToken gives a new token: connected', async () => {
  const h = await hub()
  const tokens = ['dave']
  const c = client(h, { token: 'bad', minDelay: 10, maxDelay: 20, getToken: async () => tokens.shift() })
  const seen = record(c, ['connecting'])
  c.connect()
  await c.ready()
  assert.equal(seen[1][1].code, 4401)
  assert.equal(seen[1][1].reason, 'bad token')
  assert.equal((await c.rpc('whoami')).user, 'dave')
  // refused again and getToken has nothing new: disconnected, not retried
  c.disconnect()
  c.token = 'bad'
  c.connect()
  const e = await next(c, 'disconnected')
  assert.equal(e.code, 4401)
})

test('[subprotocols] token in a subprotocol (token.<t>); the hub echoes luahub', async () => {
  const h = await hub()
  const c = client(h, { token: 'erin', tokenProtocol: 'token.' }).connect()
  await c.ready()
  assert.equal(c.WS.made[0].protocol, 'luahub')
  assert.doesNotMatch(c.WS.made[0].url, /token=/)
  assert.deepEqual(await c.rpc('whoami'), { user: 'erin', info: { via: 'protocol' } })
})

test('[hub.json.array] an rpc returning hub.json.array({}) gives []', async () => {
  const h = await hub()
  const c = client(h).connect()
  await c.ready()
  assert.deepEqual(await c.rpc('empty'), [])
})

test('[history] rewind, offsets, then recovery after a reconnection: every message once, recovered', async () => {
  const h = await hub(HISTORY)
  for (const i of [1, 2, 3]) await h.publish('room:h', { i })
  const c = client(h, { minDelay: 10, maxDelay: 50 }).connect()
  const s = c.subscribe('room:h', { rewind: 2 })
  const got = messages(s, 2)
  const sub = await next(s, 'subscribed')
  assert.deepEqual([sub.offset, sub.missed, sub.recovered, sub.recovering], [3, 2, false, false])
  assert.match(sub.epoch, /./)
  assert.deepEqual((await got).map((m) => [m.offset, m.data.i]), [[2, 2], [3, 3]])
  assert.equal(s.offset, 3)

  // away for a while: 3 messages are published meanwhile
  c.disconnect()
  for (const i of [4, 5, 6]) await h.publish('room:h', { i })
  const again = messages(s, 3)
  c.connect()
  const rec = await next(s, 'subscribed')
  assert.deepEqual([rec.recovering, rec.recovered, rec.missed, rec.offset], [true, true, 3, 6])
  assert.deepEqual((await again).map((m) => m.offset), [4, 5, 6])
  const live = messages(s, 1)
  await h.publish('room:h', { i: 7 })
  assert.equal((await live)[0].offset, 7)
})

test('[history] 4001 slow consumer: recovered without a gap or a duplicate', async () => {
  const h = await hub(`${HISTORY}max_queue_bytes = "4KiB"\nmax_message_size = "4KiB"\n`)
  const c = client(h, { minDelay: 10, maxDelay: 50 }).connect()
  const s = c.subscribe('room:r')
  await s.ready()
  const all = []
  s.on('message', (m) => all.push(m.offset))
  await h.publish('room:r', 'a')
  await until(() => all.length == 1, 'the first delivery')
  // the flood goes to another channel, without history; room:r gets 2 messages meanwhile
  c.subscribe('flood')
  await c.getSubscription('flood').ready()
  const lost = next(c, 'connecting')
  // listened for before the publishes: the client may be back (10-50 ms) before they are done
  const resubscribed = next(s, 'subscribed')
  c.rpc('flood', { channel: 'flood', n: 8, size: 1000 }).catch(() => {})
  assert.equal((await lost).code, 4001)
  await h.publish('room:r', 'b')
  await h.publish('room:r', 'c')
  const rec = await resubscribed
  assert.equal(rec.recovering, true)
  await until(() => all.length >= 3, 'b and c')
  await c.rpc('echo', 1)
  assert.deepEqual(all, [1, 2, 3])
})

test('[history] positions kept in a storage: a new client (a page reload) recovers', async () => {
  const h = await hub(HISTORY)
  const map = new Map()
  const storage = { getItem: (k) => map.get(k) ?? null, setItem: (k, v) => map.set(k, String(v)) }
  const a = client(h, { storage }).connect()
  const sa = a.subscribe('room:s')
  await sa.ready()
  const got = messages(sa, 2)
  await h.publish('room:s', 1)
  await h.publish('room:s', 2)
  await got
  a.disconnect()
  assert.equal(JSON.parse(map.get('luahub:room:s')).offset, 2)
  await h.publish('room:s', 3)
  const b = client(h, { storage }).connect()
  const sb = b.subscribe('room:s')
  const later = messages(sb, 1)
  const rec = await next(sb, 'subscribed')
  assert.deepEqual([rec.recovering, rec.recovered, rec.missed], [true, true, 1])
  assert.deepEqual((await later).map((m) => [m.offset, m.data]), [[3, 3]])
})

test('[history] history() with limit and since; not_available on a channel without history', async () => {
  const h = await hub(HISTORY)
  for (const i of [1, 2, 3, 4]) await h.publish('room:hh', i)
  const c = client(h).connect()
  await c.ready()
  // history reads a channel the connection is subscribed to
  await assert.rejects(c.history('room:hh', { limit: 2 }), { code: 'not_subscribed' })
  await c.subscribe('room:hh').ready()
  const r = await c.history('room:hh', { limit: 2 })
  assert.equal(r.offset, 4)
  assert.equal(r.messages.length, 2)
  const since = await c.history('room:hh', { since: { offset: 2, epoch: r.epoch } })
  assert.deepEqual(since.messages.map((m) => [m.offset, m.data]), [[3, 3], [4, 4]])
  await c.subscribe('plain').ready()
  await assert.rejects(c.history('plain', {}), { code: 'not_available' })
})

test('[presence] presence, presence_stats, join and leave', async () => {
  const h = await hub(HISTORY)
  const a = client(h, { token: 'alice' }).connect()
  const sa = a.subscribe('room:p')
  await sa.ready()
  const joined = next(sa, 'join', (e) => e.user == 'bob')
  const b = client(h, { token: 'bob' }).connect()
  const sb = b.subscribe('room:p')
  await sb.ready()
  assert.equal((await joined).channel, 'room:p')
  const p = await sa.presence()
  assert.deepEqual(p.clients.map((x) => x.user).sort(), ['alice', 'bob'])
  assert.deepEqual(await sb.presenceStats().then((x) => [x.clients, x.users]), [2, 2])
  const left = next(sa, 'leave', (e) => e.user == 'bob')
  b.disconnect()
  assert.equal((await left).user, 'bob')
})

test('backoff() stays within [0, min(max, min * 2^attempt)] and is random', () => {
  for (let attempt = 0; attempt < 40; attempt++) {
    const cap = Math.min(20000, 500 * 2 ** attempt)
    const seen = new Set()
    for (let i = 0; i < 200; i++) {
      const d = backoff(attempt)
      assert.ok(d >= 0 && d <= cap, `attempt ${attempt}: ${d}`)
      seen.add(d)
    }
    assert.ok(seen.size > 100, 'jitter')
  }
})
