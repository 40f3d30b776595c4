// luahub.js: the JavaScript client of luahub protocol v1 (docs/protocol.md), for browsers and
// Node >= 18. One ES module, no dependencies. API and examples: clients/js/README.md.

// A failed command: `code` is the server's error code (bad_request, forbidden, rpc_error, ...)
// or one of the client's own: timeout, disconnected, buffer_full.
export class LuahubError extends Error {
  constructor(code, message, extra) {
    super(message || code)
    Object.assign(this, extra, { name: 'LuahubError', code })
  }
}

const err = (code, message, extra) => new LuahubError(code, message, extra)
const noop = () => {}

// Full-jitter exponential backoff: a random delay in [0, min(max, min * 2^attempt)] ms.
export const backoff = (attempt, min = 500, max = 20000) =>
  Math.random() * Math.min(max, min * 2 ** attempt)

// Close codes after which reconnecting with the same token cannot help: 1008 (policy),
// 4003 (forbidden, disconnected by the API) and 4000 + HTTP status of a refused upgrade.
export const isRefusal = (code) => code == 1008 || code == 4003 || (code >= 4400 && code < 4600)

class Emitter {
  on(ev, fn) {
    ;((this._ev ||= {})[ev] ||= []).push(fn)
    return this
  }

  off(ev, fn) {
    const l = this._ev?.[ev]
    if (l) this._ev[ev] = l.filter((f) => f != fn)
    return this
  }

  // A listener that throws must not break the client: its error is rethrown on its own.
  _emit(ev, arg) {
    for (const fn of this._ev?.[ev] || [])
      try {
        fn.call(this, arg)
      } catch (e) {
        queueMicrotask(() => {
          throw e
        })
      }
  }

  // Moves to state `s`: a 'state' event if it changed, and the event named `s` every time.
  _set(s, ctx = {}) {
    const prev = this.state
    this.state = s
    this._ctx = ctx // why: what ready() rejects with after the fact
    if (prev != s) this._emit('state', { ...ctx, state: s, prev })
    this._emit(s, ctx)
  }

  // Resolves when the state is `ok`, rejects when it becomes `bad` (or is `bad` now).
  _wait(ok, bad) {
    return new Promise((res, rej) => {
      if (this.state == ok) return res(this)
      const fail = (e) => rej(err(e.code || bad, e.reason || bad, e))
      if (this.state == bad) return fail(this._ctx || {})
      const a = () => done() && res(this)
      const b = (e) => done() && fail(e)
      const done = () => this.off(ok, a).off(bad, b)
      this.on(ok, a).on(bad, b)
    })
  }
}

export class Subscription extends Emitter {
  constructor(client, channel, opts = {}) {
    super()
    this.client = client
    this.channel = channel // the name asked for; the policy may rename it (this.effective)
    this.effective = channel
    this.opts = opts
    this.state = 'unsubscribed'
    this._want = false // what the application asked for
    this._on = false // what the server has (as far as its replies told)
    this._busy = false // a subscribe or unsubscribe is in flight: at most one at a time
    this._n = 0
    try {
      const p = JSON.parse(client.opts.storage.getItem('luahub:' + channel))
      if (typeof p.epoch == 'string' && p.offset >= 0) this._pos(p.offset, p.epoch)
    } catch {} // no storage, nothing kept, or junk: start afresh
  }

  subscribe() {
    this._want = true
    if (this.state == 'unsubscribed') this._set('subscribing')
    this._sync()
    return this
  }

  unsubscribe() {
    this._want = false
    if (this.state != 'unsubscribed') this._set('unsubscribed', { code: 0, reason: 'unsubscribe called' })
    this._sync()
    return this
  }

  ready() {
    return this._wait('subscribed', 'unsubscribed')
  }

  publish(data) {
    return this.client.publish(this.effective, data)
  }

  history(opts) {
    return this.client.history(this.effective, opts)
  }

  presence() {
    return this.client.presence(this.effective)
  }

  presenceStats() {
    return this.client.presenceStats(this.effective)
  }

  // Last position seen: {offset, epoch}; sessionStorage (opts.storage) keeps it across reloads.
  _pos(offset, epoch = this.epoch) {
    this.offset = offset
    this.epoch = epoch
    this.client.opts.storage?.setItem('luahub:' + this.channel, JSON.stringify({ offset, epoch }))
  }

  // Sends what brings the server to what the application wants, one command at a time, so
  // any sequence of subscribe()/unsubscribe() calls ends in the state of the last call.
  _sync() {
    const c = this.client
    if (c.state != 'connected' || this._busy || this._want == this._on) return
    this._busy = true
    if (!this._want) return c._cmd({ op: 'unsubscribe', channel: this.effective }, (e) => this._done(e))
    const recovering = this.epoch != null
    const cmd = { op: 'subscribe', channel: this.channel }
    if (recovering) cmd.recover = { offset: this.offset, epoch: this.epoch }
    else if (this.opts.rewind) cmd.rewind = this.opts.rewind
    c._cmd(cmd, (e, m) => {
      if (this._done(e, 1)) return
      if (e && !this._want) return // refused, and no longer wanted anyway
      if (e) {
        if (recovering && e.code == 'not_available') {
          // a position kept for a channel that has no history (any more)
          this.epoch = null
          return this._sync()
        }
        if (e.code == 'unavailable') return setTimeout(() => this._sync(), backoff(this._n++, c.opts.minDelay, c.opts.maxDelay))
        this._want = false
        this._set('unsubscribed', { code: e.code, reason: e.message })
        return this._emit('error', { type: 'subscribe', error: e })
      }
      this._n = 0
      if (!this._want) return this._sync()
      this.effective = m.channel || this.channel
      // The reply's offset is the channel's top; `missed` deliveries below it follow.
      if (m.epoch != null) this._pos(m.offset - (m.missed || 0), m.epoch)
      this._set('subscribed', {
        channel: this.effective,
        recovering,
        recovered: !!m.recovered,
        missed: m.missed || 0,
        offset: m.offset,
        epoch: m.epoch,
      })
    })
  }

  // The reply to our subscribe (on = 1) or unsubscribe came (or the connection went): true
  // when there is nothing more to do with it.
  _done(e, on) {
    if (e?.code == 'disconnected') return true // the connection's reset handles it
    if (e?.code == 'timeout') return this.client._lost(0, (on ? '' : 'un') + 'subscribe timed out'), true
    this._busy = false
    this._on = !!on && !e
    if (on) return false
    this._sync()
    return true
  }

  _msg(m) {
    if (m.op == 'message' && m.offset != null) {
      if (m.offset <= this.offset) return // seen already (a replay after a recovery)
      this._pos(m.offset)
    }
    if (m.op == 'reset') this._pos(m.offset, m.epoch)
    this._emit(m.op, m)
  }
}

export class Client extends Emitter {
  constructor(url, opts = {}) {
    super()
    this.url = url
    this.opts = {
      timeout: 10000, // ms for a reply, for getToken and for the welcome
      minDelay: 500, // reconnect backoff, ms
      maxDelay: 20000,
      pingMargin: 10000, // ms past welcome.ping without a frame before reconnecting
      tokenParam: 'token',
      tokenProtocol: '', // e.g. 'token.': send the token as subprotocol token.<token>
      protocols: ['luahub'],
      buffer: 0, // publishes kept while reconnecting; 0: publish rejects when not connected
      WebSocket: globalThis.WebSocket,
      ...opts,
    }
    this.token = opts.token
    this.state = 'disconnected'
    this._subs = new Map()
    this._calls = new Map() // id -> {cb, t, sent}
    this._buf = [] // [id, frame] of publishes waiting for a connection
    this._id = 0
    this._n = 0 // reconnect attempts since the last welcome
    this._gen = 0 // bumped when a connection attempt is abandoned
    this._needToken = !this.token && !!opts.getToken
  }

  connect() {
    if (this.state == 'disconnected') {
      this._n = 0
      this._go(0, { code: 0, reason: 'connect called' })
    }
    return this
  }

  disconnect() {
    if (this.state != 'disconnected') {
      this._drop(0, 'disconnect called')
      this._final({ code: 0, reason: 'disconnect called' })
    }
    return this
  }

  ready() {
    return this._wait('connected', 'disconnected')
  }

  // A new subscription, or the one this client has for `channel`, asked to subscribe.
  subscribe(channel, opts) {
    let s = this._subs.get(channel)
    if (!s) this._subs.set(channel, (s = new Subscription(this, channel, opts)))
    return s.subscribe()
  }

  getSubscription(channel) {
    return this._subs.get(channel)
  }

  removeSubscription(s) {
    s?.unsubscribe()
    this._subs.delete(s?.channel)
  }

  publish(channel, data) {
    return this._req({ op: 'publish', channel, data }, 1).then(noop)
  }

  rpc(method, data) {
    return this._req({ op: 'rpc', method, data }).then((m) => m.data)
  }

  // opts: {limit, since: {offset, epoch}, reverse}
  history(channel, opts) {
    return this._req({ op: 'history', channel, ...opts })
  }

  presence(channel) {
    return this._req({ op: 'presence', channel })
  }

  presenceStats(channel) {
    return this._req({ op: 'presence_stats', channel })
  }

  _req(cmd, buffered) {
    return new Promise((res, rej) => this._cmd(cmd, (e, m) => (e ? rej(e) : res(m)), buffered))
  }

  // Sends `cmd` with a fresh id; cb(error) or cb(null, reply) is called once, synchronously
  // with the reply frame (so deliveries right behind a reply find the state it set).
  _cmd(cmd, cb, buffered) {
    const id = (cmd.id = ++this._id)
    const frame = JSON.stringify(cmd)
    const o = this.opts
    const c = { cb, sent: this.state == 'connected' }
    if (c.sent) this._ws.send(frame)
    else if (!buffered || !o.buffer || this.state != 'connecting')
      return cb(err('disconnected', `not connected: ${cmd.op} refused`))
    else if (this._buf.length >= o.buffer) return cb(err('buffer_full', `${o.buffer} publishes are waiting already`))
    else this._buf.push([id, frame])
    c.t = setTimeout(() => {
      this._calls.delete(id)
      this._buf = this._buf.filter((b) => b[0] != id)
      cb(err('timeout', `no reply to ${cmd.op} within ${o.timeout} ms`))
    }, o.timeout)
    this._calls.set(id, c)
  }

  // state connecting; a connection attempt after `delay` ms.
  _go(delay, ctx) {
    this._timer = setTimeout(() => this._open(), delay) // before the listeners: they may disconnect()
    this._set('connecting', { ...ctx, delay })
    this._reset(ctx)
  }

  // Subscriptions wait for the next connection (after the state changed: their listeners
  // may call us).
  _reset(ctx) {
    for (const s of this._subs.values()) {
      s._busy = s._on = false
      if (s.state == 'subscribed') s._set('subscribing', ctx)
    }
  }

  async _open() {
    const o = this.opts
    const gen = ++this._gen
    if (this.state != 'connecting') return
    if (this._needToken) {
      let t
      try {
        t = await Promise.race([
          o.getToken(),
          new Promise((_, rej) => setTimeout(() => rej(err('timeout', `getToken did not answer within ${o.timeout} ms`)), o.timeout)),
        ])
      } catch (e) {
        if (gen != this._gen) return
        this._emit('error', { type: 'token', error: e })
        return this._go(backoff(this._n++, o.minDelay, o.maxDelay), { code: 0, reason: 'getToken failed: ' + e.message })
      }
      if (gen != this._gen) return
      if (!t || t == this.token) return this._final(this._refused || { code: 0, reason: 'getToken gave no token' })
      this.token = t
      this._needToken = false
    }
    let url = this.url
    const protocols = [...o.protocols]
    if (this.token) {
      if (o.tokenProtocol) protocols.push(o.tokenProtocol + this.token)
      else url += (url.includes('?') ? '&' : '?') + o.tokenParam + '=' + encodeURIComponent(this.token)
    }
    let ws
    try {
      ws = this._ws = new o.WebSocket(url, protocols)
    } catch (e) {
      this._emit('error', { type: 'connect', error: e })
      return this._final({ code: 0, reason: e.message })
    }
    ws.onmessage = (e) => this._recv(e.data)
    ws.onclose = (e) => this._lost(e.code, e.reason)
    ws.onerror = noop // a close event follows
    this._wd = setTimeout(() => this._lost(0, `no welcome within ${o.timeout} ms`), o.timeout)
  }

  // The connection ended (close frame, network, watchdog, a timeout): reconnect, or stop
  // after a refusal unless getToken may give a new token.
  _lost(code, reason) {
    const o = this.opts
    this._drop(code, reason)
    const ctx = { code, reason }
    if (isRefusal(code)) {
      if (!o.getToken) return this._final(ctx)
      this._needToken = true
      this._refused = ctx
    }
    this._go(code == 1001 ? 0 : backoff(this._n++, o.minDelay, o.maxDelay), ctx)
  }

  // Forgets the socket and everything that lived on it.
  _drop(code, reason) {
    const ws = this._ws
    this._ws = null
    this._gen++
    clearTimeout(this._wd)
    clearTimeout(this._timer)
    if (ws) {
      // noop, not null: node's ws throws on an 'error' event nobody listens to
      ws.onmessage = ws.onclose = ws.onerror = noop
      try {
        ws.close(1000)
      } catch {}
    }
    for (const [id, c] of this._calls)
      if (c.sent) {
        this._calls.delete(id)
        clearTimeout(c.t)
        c.cb(err('disconnected', `connection closed (${code} ${reason})`))
      }
  }

  _final(ctx) {
    this._set('disconnected', ctx)
    for (const [id, c] of this._calls) {
      this._calls.delete(id)
      clearTimeout(c.t)
      c.cb(err('disconnected', 'client disconnected'))
    }
    this._buf = []
    this._reset(ctx)
  }

  // Every frame proves the server alive; after welcome.ping seconds of silence we ping it
  // ourselves (browsers hide WebSocket pings) and give it pingMargin ms to answer.
  _alive() {
    if (this.state != 'connected') return
    clearTimeout(this._wd)
    this._wd = setTimeout(() => {
      this._ws.send('{"op":"ping"}')
      this._wd = setTimeout(() => this._lost(0, 'the server went silent'), this.opts.pingMargin)
    }, this._ping)
  }

  _bad(message, data) {
    this._emit('error', { type: 'protocol', error: err('bad_frame', message), data })
  }

  _recv(text) {
    let m
    try {
      m = JSON.parse(text)
    } catch {}
    if (m?.constructor != Object) return this._alive(), this._bad('malformed frame', text)
    if (m.op == 'welcome') {
      this._n = 0
      this._refused = null
      this.clientId = m.client
      this._ping = (m.ping || 25) * 1000
      this._set('connected', m)
      for (const s of this._subs.values()) s._sync()
      for (const [id, frame] of this._buf.splice(0)) {
        this._calls.get(id).sent = true
        this._ws?.send(frame)
      }
    }
    this._alive()
    if ('id' in m) {
      const c = this._calls.get(m.id)
      if (!c) return this._bad('reply to unknown id ' + m.id, text)
      this._calls.delete(m.id)
      clearTimeout(c.t)
      const e = m.error || {}
      return m.ok ? c.cb(null, m) : c.cb(err(e.code || 'internal', e.message, e))
    }
    if ('ok' in m) return m.ok || this._bad('error: ' + m.error?.message, text) // an id-less reply
    if (m.op == 'welcome') return
    if (m.op == 'push') return this._emit('push', m.data)
    if (!['message', 'join', 'leave', 'reset'].includes(m.op)) return this._bad('unknown op ' + m.op, text)
    let hit
    for (const s of this._subs.values())
      if (s.effective == m.channel && s.state == 'subscribed') {
        hit = 1
        s._msg(m)
      }
    // deliveries of a subscription the policy made (conn:subscribe)
    if (!hit && m.op == 'message') this._emit('message', m)
  }
}
