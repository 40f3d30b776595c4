#!/usr/bin/env node
// luahub from a shell, on luahub.js: node clients/js/cli.js --help (clients/js/README.md).
import { createRequire } from 'node:module'
import { Client } from './luahub.js'

const USAGE = `usage: node clients/js/cli.js [--url URL] [--token TOKEN] COMMAND ARGS

  sub CHANNEL... [--rewind N]   print what arrives (one JSON frame a line) until Ctrl-C
  pub CHANNEL JSON              publish JSON (a string is '"text"')
  rpc METHOD [JSON]             call the policy's on_rpc; prints the result
  history CHANNEL [--limit N]   print the channel's history (the last N), oldest first
  presence CHANNEL              print who is in the channel

  --url URL        default $LUAHUB_URL or ws://127.0.0.1:8080/ws
  --token TOKEN    sent as the query parameter token (default $LUAHUB_TOKEN)
  --timeout MS     for connecting and for each reply (default 10000)

Deliveries, join/leave and pushes print as the frames the hub sent. Exit status: 0 done,
1 refused, failed or timed out, 2 bad usage.`

function usage(msg) {
  if (msg) console.error('cli.js: ' + msg)
  console.error(USAGE)
  process.exit(2)
}

// npm's ws: from wherever node finds it, else from the tests' install (npm ci --prefix tests/js).
function loadWebSocket() {
  const require = createRequire(import.meta.url)
  for (const name of ['ws', '../../tests/js/node_modules/ws'])
    try {
      return require(name)
    } catch {}
  if (globalThis.WebSocket) return globalThis.WebSocket
  console.error('cli.js: the ws package is missing: run `npm ci --prefix tests/js` (or `npm install ws`)')
  process.exit(1)
}

const opts = { url: process.env.LUAHUB_URL || 'ws://127.0.0.1:8080/ws', token: process.env.LUAHUB_TOKEN, timeout: '10000' }
const args = []
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i++) {
  const a = argv[i]
  if (a == '-h' || a == '--help') usage()
  const m = a.match(/^--(url|token|timeout|rewind|limit)(?:=(.*))?$/)
  if (!m) {
    if (a.startsWith('--')) usage('unknown option ' + a)
    args.push(a)
    continue
  }
  const v = m[2] ?? argv[++i]
  if (v === undefined) usage(`--${m[1]} needs a value`)
  opts[m[1]] = v
}
const [cmd, ...rest] = args
const json = (text, what) => {
  try {
    return JSON.parse(text)
  } catch (e) {
    usage(`${what} is not JSON (${e.message}): ${text}`)
  }
}
const int = (name) => {
  if (opts[name] === undefined) return undefined
  if (!/^\d+$/.test(opts[name])) usage(`--${name} takes a number`)
  return +opts[name]
}
const want = { sub: [1, Infinity], pub: [2, 2], rpc: [1, 2], history: [1, 1], presence: [1, 1] }[cmd]
if (!want) usage(cmd ? 'unknown command ' + cmd : 'no command')
if (rest.length < want[0] || rest.length > want[1]) usage(`wrong number of arguments for ${cmd}`)
const timeout = int('timeout')
const rewind = int('rewind')
const limit = int('limit')
const data = cmd == 'pub' ? json(rest[1], 'the message') : cmd == 'rpc' && rest[1] !== undefined ? json(rest[1], 'the data') : undefined

// Like a browser, send an Origin: a hub that refuses the connection then says why in the
// close frame (4000 + HTTP status) instead of an HTTP answer ws cannot show.
const Base = loadWebSocket()
const origin = opts.url.replace(/^ws/, 'http').replace(/^(https?:\/\/[^/]+).*$/, '$1')
class WebSocket extends Base {
  constructor(url, protocols) {
    super(url, protocols, { origin })
    this.on?.('error', (e) => console.error('cli.js: ' + e.message))
  }
}

const client = new Client(opts.url, { WebSocket, token: opts.token, timeout })
const out = (v) => process.stdout.write(JSON.stringify(v) + '\n')
const fail = (e) => {
  console.error(`cli.js: ${e.code ? e.code + ': ' : ''}${e.message ?? e.reason}`)
  process.exit(1)
}

client.on('disconnected', (e) => e.code && fail({ code: e.code, message: e.reason || 'closed' }))
client.on('error', (e) => console.error(`cli.js: ${e.type}: ${e.error.message}`))
client.connect()

if (cmd == 'sub') {
  client.on('connecting', (e) => e.code && console.error(`cli.js: connection lost (${e.code} ${e.reason}), reconnecting in ${Math.round(e.delay)} ms`))
  client.on('message', out)
  client.on('push', (d) => out({ op: 'push', data: d }))
  for (const ch of rest) {
    const s = client.subscribe(ch, { rewind })
    for (const ev of ['message', 'join', 'leave', 'reset']) s.on(ev, out)
    s.on('subscribed', (e) => console.error(`cli.js: subscribed to ${e.channel}` + (e.recovering ? ` (recovered: ${e.recovered}, missed ${e.missed})` : '')))
    s.on('error', (e) => fail(e.error))
  }
  process.on('SIGINT', () => {
    client.disconnect()
    process.exit(0)
  })
} else {
  const deadline = setTimeout(() => fail({ code: 'timeout', message: `not connected to ${opts.url} within ${timeout} ms` }), timeout)
  try {
    await client.ready()
    clearTimeout(deadline)
    const ch = rest[0]
    // history and presence read a channel the connection is subscribed to
    if (cmd == 'history' || cmd == 'presence') await client.subscribe(ch).ready()
    if (cmd == 'pub') out(await client.publish(ch, data).then(() => ({ ok: true })))
    if (cmd == 'rpc') out(await client.rpc(ch, data))
    if (cmd == 'presence') out(await client.presence(ch))
    // the last `limit` messages, oldest first
    if (cmd == 'history') for (const m of (await client.history(ch, { limit, reverse: true })).messages.sort((a, b) => a.offset - b.offset)) out(m)
    client.disconnect()
    process.exit(0)
  } catch (e) {
    fail(e)
  }
}
