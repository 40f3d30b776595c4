// clients/js/cli.js as a person runs it, against the real hub.
import { test as nodeTest, after, before } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { join } from 'node:path'
import { ROOT, startHub, until } from '../lib/hub.mjs'

const test = (name, fn) => nodeTest(name, { timeout: 30000 }, fn)
const CLI = join(ROOT, 'clients/js/cli.js')
const POLICY = join(ROOT, 'tests/js/node/policy.lua')
const BASE = `policy = ${JSON.stringify(POLICY)}\nlog_level = "warn"\n`
let hub
const procs = []
before(async () => {
  hub = await startHub({ conf: BASE })
})
after(async () => {
  for (const p of procs) p.kill()
  await hub?.stop()
  hub?.cleanup()
})

function cli(...args) {
  const url = args[0] == '--hub' ? args.splice(0, 2)[1].url : hub.url
  const p = spawn(process.execPath, [CLI, '--url', url, '--timeout', '3000', ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
  procs.push(p)
  p.out = ''
  p.err = ''
  p.stdout.on('data', (d) => (p.out += d))
  p.stderr.on('data', (d) => (p.err += d))
  p.done = new Promise((r) => p.on('exit', (code) => r(code)))
  return p
}

async function run(...args) {
  const p = cli(...args)
  return { code: await p.done, out: p.out, err: p.err }
}

test('sub prints deliveries that pub sends; rpc prints results and fails with the error code', async () => {
  const sub = cli('sub', 'room:cli', 'room:other')
  await until(() => (sub.err.match(/subscribed to/g) || []).length == 2, 'sub to subscribe: ' + sub.err)
  const pub = await run('pub', 'room:cli', '{"text":"hi"}')
  assert.deepEqual([pub.code, pub.out], [0, '{"ok":true}\n'])
  await run('pub', 'room:other', '"plain"')
  await until(() => sub.out.split('\n').length == 3, 'two deliveries')
  const lines = sub.out.trim().split('\n').map((l) => JSON.parse(l))
  assert.deepEqual(
    lines.map((m) => [m.op, m.channel, m.data]),
    [
      ['message', 'room:cli', { text: 'hi' }],
      ['message', 'room:other', 'plain'],
    ],
  )
  sub.kill('SIGINT')
  assert.equal(await sub.done, 0)

  assert.deepEqual(await run('rpc', 'echo', '[1,{"a":null}]').then((r) => [r.code, r.out]), [0, '[1,{"a":null}]\n'])
  const who = await run('--token', 'alice', 'rpc', 'whoami')
  assert.equal(JSON.parse(who.out).user, 'alice')
  const bad = await run('rpc', 'fail')
  assert.deepEqual([bad.code, bad.err.trim()], [1, 'cli.js: rpc_error: it failed'])
  const refused = await run('pub', 'bad channel', '1')
  assert.equal(refused.code, 1)
  assert.match(refused.err, /^cli\.js: invalid_channel: /)
})

test('bad usage exits 2 with the reason and the usage', async () => {
  for (const [args, why] of [
    [[], 'no command'],
    [['frob'], 'unknown command frob'],
    [['pub', 'room:1'], 'wrong number of arguments for pub'],
    [['pub', 'room:1', '{text:1}'], 'the message is not JSON'],
    [['history', 'room:1', '--limit', 'x'], '--limit takes a number'],
    [['--bogus', 'rpc', 'x'], 'unknown option --bogus'],
    [['rpc', 'x', '--token'], '--token needs a value'],
  ]) {
    const r = await run(...args)
    assert.equal(r.code, 2, args.join(' '))
    assert.ok(r.err.startsWith('cli.js: ' + why), r.err)
    assert.match(r.err, /usage: node clients\/js\/cli\.js/)
  }
})

test('no hub at the URL: exits 1 after the timeout', async () => {
  const p = spawn(process.execPath, [CLI, '--url', 'ws://127.0.0.1:1/ws', '--timeout', '500', 'rpc', 'x'], { stdio: ['ignore', 'pipe', 'pipe'] })
  let err = ''
  p.stderr.on('data', (d) => (err += d))
  const code = await new Promise((r) => p.on('exit', r))
  assert.equal(code, 1)
  assert.match(err, /timeout: not connected to ws:\/\/127\.0\.0\.1:1\/ws within 500 ms/)
})

test('[history] history prints the channel history, one message a line', async () => {
  const h = await startHub({ conf: BASE + 'channels = { ["room:*"] = { history_size = 10 } }\n' })
  try {
    for (const i of [1, 2, 3]) await h.publish('room:hist', { i })
    const r = await run('--hub', h, 'history', 'room:hist', '--limit', '2')
    assert.equal(r.code, 0, r.err)
    const lines = r.out.trim().split('\n').map((l) => JSON.parse(l))
    assert.deepEqual(lines.map((m) => [m.offset, m.data.i]), [[2, 2], [3, 3]])
  } finally {
    await h.stop()
    h.cleanup()
  }
})

test('[refusal close codes] a refused token: exits 1 with the close code and the reason', async () => {
  const r = await run('--token', 'forbidden', 'rpc', 'whoami')
  assert.equal(r.code, 1)
  assert.match(r.err, /cli\.js: 4403: go away/)
})
