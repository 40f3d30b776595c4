// Test support: the real luahub binary and a real redis-server, on loopback, on ports the
// kernel picks. Every process a test starts is ended by the test (and at exit, in case a
// test failed half-way).
import { spawn } from 'node:child_process'
import { mkdtempSync, writeFileSync, rmSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve, dirname } from 'node:path'
import { createServer, connect } from 'node:net'
import { fileURLToPath } from 'node:url'
import WebSocket from 'ws'

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..')
export const BIN = resolve(process.env.LUAHUB_BIN || join(ROOT, 'build/luahub'))

const children = new Set()
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL')
})

// A conf the repo ships (`file` relative to the repo), for a test to write elsewhere: its
// relative policy and static_dir made absolute, the keys of `set` replaced or added.
export function shippedConf(file, set = {}) {
  const dir = dirname(join(ROOT, file))
  let text = readFileSync(join(ROOT, file), 'utf8').replace(
    /^(policy|static_dir) = "([^"]+)"/gm,
    (_, k, v) => `${k} = ${JSON.stringify(resolve(dir, v))}`,
  )
  for (const [k, v] of Object.entries(set)) {
    const re = new RegExp(`^${k} = .*$`, 'm')
    text = re.test(text) ? text.replace(re, `${k} = ${v}`) : text + `\n${k} = ${v}\n`
  }
  return text
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

// Polls `fn` until it returns something truthy; throws after `ms` naming `what`.
export async function until(fn, what, ms = 10000) {
  const end = Date.now() + ms
  for (;;) {
    const v = await fn()
    if (v) return v
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`)
    await sleep(20)
  }
}

// The next `ev` event of `em` (a luahub.js Client or Subscription) that passes `pred`.
export function next(em, ev, pred = () => true, ms = 10000) {
  return new Promise((res, rej) => {
    const t = setTimeout(() => {
      em.off(ev, f)
      rej(new Error(`no '${ev}' event within ${ms} ms`))
    }, ms)
    const f = (e) => {
      if (!pred(e)) return
      clearTimeout(t)
      em.off(ev, f)
      res(e)
    }
    em.on(ev, f)
  })
}

// Records every event of the given names: rec.events is [[name, arg], ...].
export function record(em, names) {
  const events = []
  for (const n of names) em.on(n, (e) => events.push([n, e]))
  return events
}

// A WebSocket class for luahub.js in node that counts its instances and sends an Origin
// header like a browser does (the hub answers refusals of such requests with close codes).
// By default the origin is the page the hub itself would serve (http://host:port of the
// URL), which the default allowed_origins accepts; `origin` names another, or false for none.
export const pageOrigin = (url) => String(url).replace(/^ws/, 'http').replace(/^(https?:\/\/[^/]+).*$/, '$1')
export function wsClass({ origin } = {}) {
  class WS extends WebSocket {
    constructor(url, protocols) {
      const o = origin === undefined ? pageOrigin(url) : origin
      super(url, protocols, o ? { origin: o } : {})
      WS.made.push(this)
    }
  }
  WS.made = []
  return WS
}

export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer()
    s.on('error', rej)
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => res(port))
    })
  })
}

function run(cmd, args, opts) {
  const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts })
  children.add(p)
  p.exited = new Promise((r) => p.on('exit', (code, sig) => (children.delete(p), r(code ?? sig))))
  p.lines = []
  for (const s of [p.stdout, p.stderr]) {
    let rest = ''
    s.setEncoding('utf8')
    s.on('data', (d) => {
      const parts = (rest + d).split('\n')
      rest = parts.pop()
      for (const l of parts) {
        p.lines.push(l)
        if (process.env.LUAHUB_TEST_VERBOSE) console.error(`[${cmd} ${p.pid}] ${l}`)
        p.emit('line', l)
      }
    })
  }
  return p
}

// Starts the hub with `conf` (the text of a conf file; `files` are written beside it, e.g.
// {'policy.lua': '...'}), on 127.0.0.1:0 or `listen`. Resolves once it logs "listening on".
export async function startHub({ conf = '', files = {}, listen = '127.0.0.1:0', dir } = {}) {
  dir ||= mkdtempSync(join(tmpdir(), 'luahub-js-'))
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text)
  writeFileSync(join(dir, 'luahub.conf'), conf)
  const p = run(BIN, ['-c', join(dir, 'luahub.conf'), '--listen', listen])
  const port = await new Promise((res, rej) => {
    const t = setTimeout(() => rej(new Error('the hub did not log "listening on" within 10 s:\n' + p.lines.join('\n'))), 10000)
    p.on('line', (l) => {
      const m = l.match(/listening on (\S+):(\d+)$/)
      if (m) clearTimeout(t), res(+m[2])
    })
    p.exited.then((code) => (clearTimeout(t), rej(new Error(`the hub exited (${code}) before listening:\n${p.lines.join('\n')}`))))
  })
  const base = `http://127.0.0.1:${port}`
  const hub = {
    proc: p,
    dir,
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    http: base,
    lines: p.lines,
    // SIGTERM (close 1001 to every client); resolves to the exit status.
    async stop(sig = 'SIGTERM') {
      if (p.exitCode == null && p.signalCode == null) p.kill(sig)
      return p.exited
    },
    // The same conf on the same port, after stop().
    async restart() {
      for (let i = 0; ; i++) {
        try {
          return await startHub({ conf, files, dir, listen: `127.0.0.1:${port}` })
        } catch (e) {
          if (i == 50 || !/Address already in use/.test(e.message)) throw e
          await sleep(100)
        }
      }
    },
    async api(path, body, method = 'POST') {
      const r = await fetch(base + path, { method, body: body === undefined ? undefined : JSON.stringify(body) })
      const text = await r.text()
      return { status: r.status, body: text ? JSON.parse(text) : null }
    },
    async publish(channel, data) {
      const r = await hub.api('/api/publish', { channel, data })
      if (r.status != 200) throw new Error(`publish to ${channel}: ${r.status} ${JSON.stringify(r.body)}`)
      return r.body
    },
    async metric(name) {
      const r = await fetch(base + '/metrics')
      const m = (await r.text()).match(new RegExp('^' + name.replace(/[{}"]/g, '\\$&') + ' (\\S+)$', 'm'))
      return m ? +m[1] : 0
    },
    cleanup() {
      rmSync(dir, { recursive: true, force: true })
    },
  }
  return hub
}

// A redis-server of the test's own on a free port; stop() ends it.
export async function startRedis() {
  const dir = mkdtempSync(join(tmpdir(), 'luahub-js-redis-'))
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort()
    const p = run('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir])
    const up = await until(
      async () => p.exitCode != null || p.signalCode != null || (await redisPing(port)),
      'redis-server to answer PING',
    )
    if (up === true && p.exitCode == null)
      return {
        port,
        url: `redis://127.0.0.1:${port}`,
        async stop() {
          p.kill('SIGKILL')
          await p.exited
          rmSync(dir, { recursive: true, force: true })
        },
      }
    p.kill('SIGKILL')
    await p.exited
  }
  throw new Error('redis-server did not start')
}

function redisPing(port) {
  return new Promise((res) => {
    const s = connect(port, '127.0.0.1')
    s.on('error', () => res(false))
    s.on('connect', () => s.write('PING\r\n'))
    s.on('data', (d) => (s.destroy(), res(d.toString().startsWith('+PONG'))))
  })
}
