// The chat example (examples/chat: its conf, policy and page, luahub.js served by the hub)
// in Debian's chromium, against the real hub. Test names in [brackets] need hub features
// beyond /luahub.js and the channels conf key, which every test here needs.
import { test as nodeTest, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { startHub, startRedis, shippedConf, until } from '../lib/hub.mjs'
import { launch } from '../lib/browser.mjs'

const test = (name, fn) => nodeTest(name, { timeout: 60000 }, fn)
const SHOTS = process.env.LUAHUB_SCREENSHOTS // a directory: screenshots of the pages go there

const chatConf = (file = 'luahub.conf', set) => shippedConf('examples/chat/' + file, set)

let browser
const cleanup = []
before(async () => {
  browser = await launch()
})
after(async () => {
  await browser?.close()
  for (const f of cleanup.reverse()) await f()
})

async function hub(opts) {
  const h = await startHub(opts)
  cleanup.push(async () => {
    await h.stop()
    h.cleanup()
  })
  return h
}

// A page logged in as `name` (a token minted by the dev conf, or `token`), in room:lobby.
async function user(h, name, { token, port = h.port } = {}) {
  const p = await browser.page(`http://127.0.0.1:${port}/`)
  await p.fill('#name', name)
  if (token) {
    await p.click('summary')
    await p.fill('#token', token)
  }
  await p.click('#login button')
  if (token == 'garbage') return p
  await p.waitForSelector('#rooms li[data-key="room:lobby"][data-state="subscribed"]', { timeout: 10000 })
  return p
}

// "from: text" of each message shown, texts cut at 40 characters
const texts = (p) =>
  p.$$eval('#messages li.msg', (els) => els.map((e) => e.querySelector('.from').textContent + ': ' + e.querySelector('.text').textContent.slice(0, 40)))
const notices = (p) => p.$$eval('#messages li.sys', (els) => els.map((e) => e.textContent))
const online = (p) => p.$$eval('#online li', (els) => els.map((e) => e.textContent).sort())

async function send(p, text) {
  await p.fill('#text', text)
  await p.press('#text', 'Enter')
}

async function shot(p, name) {
  if (SHOTS) await p.screenshot({ path: join(SHOTS, name + '.png') })
}

async function waitTexts(p, want, what) {
  await until(async () => JSON.stringify(await texts(p)) == JSON.stringify(want), `${what}: ${JSON.stringify(want)}`)
}

test('two users chat in a room; moderation and the rate limit are shown to the sender', async () => {
  const h = await hub({ conf: chatConf() })
  const alice = await user(h, 'alice')
  const bob = await user(h, 'bob')
  await send(alice, 'hello bob, darn it')
  await waitTexts(bob, ['alice: hello bob, **** it'], 'bob sees alice')
  await send(bob, 'hi alice')
  await waitTexts(alice, ['alice: hello bob, **** it', 'bob: hi alice'], 'alice sees both')
  assert.equal(await alice.textContent('#status'), 'connected as alice')
  await shot(alice, 'chat-room')

  await send(alice, 'x'.repeat(2001))
  await until(async () => (await alice.textContent('#notice')) == 'text over 2000 characters', 'the length refusal')
  for (let i = 0; i < 8; i++) await send(alice, 'spam ' + i)
  await until(async () => /^slow down: at most 5 messages per 10 s$/.test(await alice.textContent('#notice')), 'the rate limit notice')
  assert.ok((await notices(alice)).includes('slow down: at most 5 messages per 10 s'))
  await shot(alice, 'chat-rate-limit')
  assert.deepEqual(browser.errors, [])
})

test('a DM reaches only its two inboxes', async () => {
  const h = await hub({ conf: chatConf() })
  const [alice, bob, carol] = [await user(h, 'alice'), await user(h, 'bob'), await user(h, 'carol')]
  await alice.fill('#dm-to', 'bob')
  await alice.press('#dm-to', 'Enter')
  assert.equal(await alice.textContent('#title'), '@bob')
  await send(alice, 'psst, bob')
  await waitTexts(alice, ['alice: psst, bob'], "alice's copy")
  await bob.waitForSelector('#dms li[data-key="dm:alice"] .unread')
  await bob.click('#dms li[data-key="dm:alice"]')
  await waitTexts(bob, ['alice: psst, bob'], "bob's copy")
  await send(bob, 'hi alice')
  await waitTexts(alice, ['alice: psst, bob', 'bob: hi alice'], 'the answer')
  // carol: no DM, nothing in the lobby; a round trip through the hub first
  await send(carol, 'anyone?')
  await waitTexts(carol, ['carol: anyone?'], "carol's own message")
  assert.deepEqual(await carol.$$eval('#dms li', (els) => els.length), 0)
  await waitTexts(bob, ['alice: psst, bob', 'bob: hi alice'], "bob's copy of his answer")
  await shot(bob, 'chat-dm')
})

test('[presence] the presence list and join/leave across two pages', async () => {
  const h = await hub({ conf: chatConf() })
  const alice = await user(h, 'alice')
  await until(async () => JSON.stringify(await online(alice)) == '["alice"]', 'alice alone')
  const bob = await user(h, 'bob')
  await until(async () => JSON.stringify(await online(alice)) == '["alice","bob"]', 'bob joins (alice sees)')
  await until(async () => JSON.stringify(await online(bob)) == '["alice","bob"]', 'bob sees both')
  await shot(alice, 'chat-presence')
  await bob.close()
  await until(async () => JSON.stringify(await online(alice)) == '["alice"]', 'bob leaves')
  await until(async () => (await notices(alice)).includes('bob left'), 'the policy\'s "left" message')
})

test('[history] backlog on join: a page that comes later shows the last messages', async () => {
  const h = await hub({ conf: chatConf() })
  for (const i of [1, 2, 3]) await h.publish('room:lobby', { from: 'api', text: 'before ' + i, ts: Date.now() })
  const alice = await user(h, 'alice')
  await waitTexts(alice, ['api: before 1', 'api: before 2', 'api: before 3'], 'the backlog')
})

test('[history, redis] the hub restarted under the page: every message published meanwhile, exactly once', async () => {
  const redis = await startRedis()
  cleanup.push(() => redis.stop())
  const conf = chatConf('luahub-redis.conf', { broker: JSON.stringify(redis.url) })
  const h1 = await hub({ conf })
  const h2 = await hub({ conf }) // publishes while h1 is down, through the same Redis
  const alice = await user(h1, 'alice')
  const m = (text) => ({ from: 'api', text, ts: Date.now() })
  await h1.publish('room:lobby', m('m1'))
  await waitTexts(alice, ['api: m1'], 'm1')
  await h1.stop()
  await until(async () => /reconnecting/.test(await alice.textContent('#status')), 'the page to notice')
  for (const t of ['m2', 'm3', 'm4']) await h2.publish('room:lobby', m(t))
  const back = await h1.restart()
  cleanup.push(async () => {
    await back.stop()
    back.cleanup()
  })
  await until(async () => (await alice.textContent('#status')) == 'connected as alice', 'the page reconnected', 30000)
  await back.publish('room:lobby', m('m5'))
  await waitTexts(alice, ['api: m1', 'api: m2', 'api: m3', 'api: m4', 'api: m5'], 'each message once')
  assert.deepEqual(await notices(alice), [])
  await shot(alice, 'chat-recovered')
})

test('[refusal close codes] a refused token: the page shows the reason', async () => {
  const h = await hub({ conf: chatConf() })
  const p = await user(h, 'mallory', { token: 'garbage' })
  await until(async () => /invalid token: malformed/.test(await p.textContent('#login-error')), 'the reason on the page')
  assert.match(await p.textContent('#login-error'), /^refused \(4401\): invalid token: malformed/)
  assert.equal(await p.isVisible('#login'), true)
  await shot(p, 'chat-refused')
})

test('[history] 4001 slow consumer: the page reconnects and recovers, every message once', async () => {
  const h = await hub({ conf: chatConf('luahub.conf', { max_queue_bytes: '"16KiB"' }) })
  const alice = await user(h, 'alice')
  await h.publish('room:lobby', { from: 'api', text: 'first', ts: Date.now() })
  await waitTexts(alice, ['api: first'], 'first')
  // One broadcast to the page's three channels: 3 x 6 KB queued at once, over 16 KiB: the
  // hub drops the page (4001) with those frames unsent. The room's copy must come back.
  const big = 'big ' + 'x'.repeat(6000)
  const r = await h.api('/api/broadcast', { channels: ['room:lobby', 'typing:lobby', 'inbox:alice'], data: { from: 'api', text: big, ts: 1 } })
  assert.equal(r.status, 200)
  await until(async () => (await h.metric('luahub_slow_consumer_closes_total')) == 1, 'the 4001 close')
  await h.publish('room:lobby', { from: 'api', text: 'second', ts: Date.now() })
  await waitTexts(alice, ['api: first', 'api: ' + big.slice(0, 40), 'api: second'], 'recovered')
  await until(async () => (await alice.textContent('#status')) == 'connected as alice', 'connected again')
  assert.equal(await h.metric('luahub_slow_consumer_closes_total'), 1)
})

test('[subprotocols] a token sent as a subprotocol (token.<jwt>) logs in', async () => {
  const h = await hub({ conf: chatConf() })
  const p = await browser.page(h.http + '/')
  const who = await p.evaluate(async () => {
    const { Client } = await import('/luahub.js')
    const url = 'ws://' + location.host + '/ws'
    const anon = new Client(url).connect()
    await anon.ready()
    const token = await anon.rpc('dev_token', { user: 'sam' })
    anon.disconnect()
    const c = new Client(url, { token, tokenProtocol: 'token.' }).connect()
    await c.ready()
    const r = { user: (await c.rpc('whoami')).user, protocol: c._ws.protocol, url: c._ws.url }
    c.disconnect()
    return r
  })
  assert.equal(who.user, 'sam')
  assert.equal(who.protocol, 'luahub')
  assert.doesNotMatch(who.url, /token=/)
})
