// The hello page (conf/luahub.conf, what `make run` serves) and the dashboard example, in
// Debian's chromium against the real hub. Both need the hub to serve /luahub.js.
import { test as nodeTest, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import { startHub, shippedConf, until } from '../lib/hub.mjs'
import { launch } from '../lib/browser.mjs'

const test = (name, fn) => nodeTest(name, { timeout: 60000 }, fn)
const SHOTS = process.env.LUAHUB_SCREENSHOTS

let browser
const hubs = []
before(async () => {
  browser = await launch()
})
after(async () => {
  await browser?.close()
  for (const h of hubs) {
    await h.stop()
    h.cleanup()
  }
})

async function hub(file) {
  const h = await startHub({ conf: shippedConf(file) })
  hubs.push(h)
  return h
}

const log = (p) => p.$$eval('#log li', (els) => els.map((e) => e.textContent))

test('hello page (make run): subscribe, publish from the page and from the API', async () => {
  const h = await hub('conf/luahub.conf')
  const p = await browser.page(h.http + '/')
  await until(async () => (await p.textContent('#status')) == `connected to ws://127.0.0.1:${h.port}/ws`, 'connected')
  await p.click('#sub button')
  await until(async () => (await log(p)).includes('subscribed room:lobby'), 'subscribed')
  await p.fill('#text', 'from the page')
  await p.click('#pub button')
  await until(async () => (await log(p)).includes('[room:lobby] "from the page"'), 'its own message')
  await h.publish('room:lobby', { text: 'hi' })
  await until(async () => (await log(p)).includes('[room:lobby] {"text":"hi"}'), 'the API message')
  await p.fill('#channel', 'bad channel')
  await p.click('#sub button')
  await until(async () => (await log(p)).some((l) => l.startsWith('error invalid_channel: ')), 'the error shown')
  if (SHOTS) await p.screenshot({ path: join(SHOTS, 'hello.png') })
  assert.deepEqual(browser.errors, [])
})

test('a listener that throws in a page: the error surfaces, the client carries on', async () => {
  const h = await hub('conf/luahub.conf')
  const p = await browser.page(h.http + '/')
  const before = browser.errors.length
  const got = await p.evaluate(async () => {
    const { Client } = await import('/luahub.js')
    const c = new Client('ws://' + location.host + '/ws').connect()
    const s = c.subscribe('room:t')
    const seen = []
    s.on('message', () => {
      throw new Error('app bug')
    })
    s.on('message', (m) => seen.push(m.data))
    await s.ready()
    await c.publish('room:t', 1)
    await c.publish('room:t', 2)
    await c.publish('room:other', 'a round trip: both deliveries are in')
    return seen
  })
  assert.deepEqual(got, [1, 2])
  await until(() => browser.errors.length - before == 2, 'two page errors')
  assert.match(browser.errors.at(-1), /app bug/)
  browser.errors.length = before
})

test('dashboard: the chart follows what the API publishes; the page may not publish', async () => {
  const h = await hub('examples/dashboard/luahub.conf')
  const p = await browser.page(h.http + '/?ch=dash:cpu,dash:mem')
  await until(async () => (await p.textContent('#status')) == 'live', 'live')
  // subscribed once the API publish reaches it: retry until the first value shows
  await until(async () => {
    await h.publish('dash:cpu', { load: 0.5 })
    return (await p.textContent('[data-channel="dash:cpu"] .value')) == 'load 0.5'
  }, 'the first value')
  for (const load of [0.7, 1.25]) await h.publish('dash:cpu', { load })
  await h.publish('dash:mem', { used: 512, free: 1536 })
  await until(async () => (await p.textContent('[data-channel="dash:cpu"] .value')) == 'load 1.25', 'the last value')
  await until(async () => (await p.textContent('[data-channel="dash:mem"] .value')) == 'used 512  free 1536', 'mem')
  assert.equal(await p.$$eval('[data-channel="dash:mem"] polyline', (l) => l.length), 2)
  const refused = await p.evaluate(async () => {
    const { Client } = await import('/luahub.js')
    const c = new Client('ws://' + location.host + '/ws').connect()
    await c.ready()
    return c.publish('dash:cpu', { load: 99 }).then(() => 'published', (e) => `${e.code}: ${e.message}`)
  })
  assert.equal(refused, 'forbidden: read-only: dashboards are updated through the HTTP API')
  if (SHOTS) await p.screenshot({ path: join(SHOTS, 'dashboard.png') })
})
