// The chat page: luahub.js (served by the hub at /luahub.js) against examples/chat/policy.lua.
import { Client } from '/luahub.js'

const $ = (id) => document.getElementById(id)
const WS_URL = (location.protocol == 'https:' ? 'wss://' : 'ws://') + location.host + '/ws'
const BACKLOG = 50 // messages of a room shown on join (rewind) or after a reset

let client = null
let me = null
let current = null
const convs = new Map() // 'room:lobby' or 'dm:bob' (also the channel a message is published to)

// ---- login ---------------------------------------------------------------

// A token from the hub itself: an anonymous connection calls the policy's rpc dev_token,
// which only the dev conf enables (policy_vars.dev_tokens).
async function mint(user) {
  const anon = new Client(WS_URL, { timeout: 5000 })
  anon.connect()
  const gaveUp = new Promise((_, rej) => setTimeout(() => rej(new Error(`cannot reach the hub at ${WS_URL}`)), 5000))
  try {
    await Promise.race([anon.ready(), gaveUp])
    return await anon.rpc('dev_token', { user })
  } catch (e) {
    if (e.code >= 4000 || e.code == 'rpc_error')
      throw new Error(`this hub does not mint tokens (${e.message}): paste a token (README.md says how to make one)`)
    throw e
  } finally {
    anon.disconnect()
  }
}

async function login(name, pasted) {
  $('login-error').textContent = ''
  const token = pasted || (await mint(name))
  client = new Client(WS_URL, {
    token,
    getToken: pasted ? undefined : () => mint(name), // refused (expired): mint a new one
    maxDelay: 5000,
  })
  client.on('connecting', (e) => status('wait', e.code ? `reconnecting (${e.code}${e.reason ? ': ' + e.reason : ''})` : 'connecting'))
  client.on('connected', () => status('on', `connected as ${me || name}`))
  client.on('disconnected', (e) => {
    status('off', 'disconnected' + (e.reason ? ': ' + e.reason : ''))
    if (e.code) logout(`refused (${e.code}): ${e.reason}`)
  })
  client.on('push', (data) => notice(JSON.stringify(data)))
  client.connect()
  try {
    await client.ready()
  } catch (e) {
    throw new Error(`refused (${e.code}): ${e.message}`)
  }
  me = (await client.rpc('whoami')).user
  status('on', `connected as ${me}`)
  sessionStorage.setItem('chat.login', JSON.stringify({ name, token: pasted }))
  $('login').hidden = true
  $('app').hidden = false
  $('logout').hidden = false
  const inbox = client.subscribe('inbox', { rewind: BACKLOG })
  inbox.on('message', (m) => {
    const d = m.data
    const other = d.from == me ? d.to : d.from
    add(conv('dm:' + other), { from: d.from, text: d.text, ts: d.ts, offset: m.offset })
  })
  inbox.on('error', (e) => notice(e.error.message))
  joinRoom('lobby')
}

function logout(why = '') {
  client?.disconnect()
  client = null
  me = current = null
  convs.clear()
  sessionStorage.removeItem('chat.login')
  for (const id of ['rooms', 'dms', 'messages', 'online']) $(id).replaceChildren()
  $('app').hidden = $('logout').hidden = true
  $('login').hidden = false
  $('login-error').textContent = why
}

$('login').onsubmit = (e) => {
  e.preventDefault()
  login($('name').value.trim(), $('token').value.trim()).catch((err) => logout(err.message))
}
$('logout').onclick = () => logout()

// ---- conversations -----------------------------------------------------

function conv(key) {
  let c = convs.get(key)
  if (!c) {
    c = { key, title: key.replace(/^room:/, '#').replace(/^dm:/, '@'), items: [], unread: 0, online: new Map(), typing: new Map() }
    convs.set(key, c)
    nav()
  }
  return c
}

function joinRoom(name) {
  const key = 'room:' + name
  if (!convs.has(key)) {
    const c = conv(key)
    const sub = (c.sub = client.subscribe(key, { rewind: BACKLOG }))
    sub.on('state', nav) // subscribing rooms are dimmed
    sub.on('subscribed', async (e) => {
      // A gap the hub could not fill (history gone, another epoch): start over from history.
      if (e.recovering && !e.recovered) await reload(c)
      presence(c)
    })
    sub.on('reset', () => reload(c))
    sub.on('message', (m) => {
      // A hub that shuts down tells the rooms its users left; a page that reconnected
      // recovers that notice about its own user, which it knows better than to show.
      if (m.data?.event == 'left') return m.data.user == me || add(c, { sys: `${m.data.user} left` })
      c.typing.delete(m.data?.from)
      if (c == convs.get(current)) typing()
      add(c, { ...m.data, offset: m.offset })
    })
    sub.on('join', (e) => {
      c.online.set(e.user, e.info?.name || e.user)
      if (c == convs.get(current)) people()
    })
    sub.on('leave', (e) => {
      c.online.delete(e.user)
      if (c == convs.get(current)) people()
    })
    sub.on('error', (e) => add(c, { sys: `cannot join: ${e.error.message}`, err: 1 }))
    client.subscribe('typing:' + name).on('message', (m) => {
      if (m.data.from == me) return
      c.typing.set(m.data.from, Date.now())
      if (c == convs.get(current)) typing()
      setTimeout(typing, 3100)
    })
  }
  select(key)
}

async function reload(c) {
  try {
    const h = await c.sub.history({ limit: BACKLOG, reverse: true })
    c.items = []
    for (const m of h.messages.sort((a, b) => a.offset - b.offset)) add(c, { ...m.data, offset: m.offset }, true)
    add(c, { sys: 'reloaded the room: some messages could not be recovered' })
  } catch (e) {
    add(c, { sys: `could not reload the room: ${e.message}`, err: 1 })
  }
}

async function presence(c) {
  try {
    const p = await c.sub.presence()
    c.online = new Map(p.clients.map((x) => [x.user, x.info?.name || x.user]))
    if (c == convs.get(current)) people()
  } catch {} // a room without presence: nobody is listed
}

function select(key) {
  current = key
  const c = conv(key)
  c.unread = 0
  $('title').textContent = c.title
  $('messages').replaceChildren(...c.items.map(li))
  $('messages').scrollTop = 1e9
  $('notice').textContent = ''
  nav()
  people()
  typing()
  $('text').focus()
}

function add(c, item, quiet) {
  c.items.push(item)
  if (c.items.length > 500) c.items.shift()
  if (quiet) return
  if (c.key == current) {
    $('messages').append(li(item))
    $('messages').scrollTop = 1e9
  } else if (!item.sys) {
    c.unread++
    nav()
  }
}

function li(item) {
  const el = document.createElement('li')
  if (item.sys) {
    el.className = item.err ? 'sys err' : 'sys'
    el.textContent = item.sys
    return el
  }
  el.className = 'msg'
  if (item.offset != null) el.dataset.offset = item.offset
  const from = Object.assign(document.createElement('span'), { className: 'from', textContent: item.from })
  const text = Object.assign(document.createElement('span'), { className: 'text', textContent: item.text })
  const ts = Object.assign(document.createElement('span'), { className: 'ts', textContent: item.ts ? new Date(item.ts).toLocaleTimeString() : '' })
  el.append(from, text, ts)
  return el
}

function nav() {
  for (const [list, prefix] of [['rooms', 'room:'], ['dms', 'dm:']])
    $(list).replaceChildren(
      ...[...convs.values()]
        .filter((c) => c.key.startsWith(prefix))
        .map((c) => {
          const el = document.createElement('li')
          el.dataset.key = c.key
          if (c.sub) el.dataset.state = c.sub.state
          el.className = c.key == current ? 'current' : ''
          el.textContent = c.title
          if (c.unread) el.append(Object.assign(document.createElement('span'), { className: 'unread', textContent: c.unread }))
          el.onclick = () => select(c.key)
          return el
        }),
    )
}

function people() {
  const c = convs.get(current)
  const names = c?.key.startsWith('dm:') ? [me, c.key.slice(3)] : [...(c?.online.values() || [])].sort()
  $('online').replaceChildren(...names.map((n) => Object.assign(document.createElement('li'), { textContent: n })))
}

function typing() {
  const c = convs.get(current)
  const now = Date.now()
  const who = c ? [...c.typing].filter(([, t]) => now - t < 3000).map(([u]) => u) : []
  $('typing').textContent = who.length ? `${who.join(', ')} ${who.length > 1 ? 'are' : 'is'} typing…` : ''
}

function status(cls, text) {
  $('status').className = 'status ' + cls
  $('status').textContent = text
}

function notice(text) {
  $('notice').textContent = text
}

// ---- sending -----------------------------------------------------------

$('send').onsubmit = async (e) => {
  e.preventDefault()
  const text = $('text').value
  if (!text.trim() || !current) return
  const key = current
  try {
    await client.publish(key, { text }) // room:<name>, or dm:<user>: the policy routes it
    $('text').value = ''
    notice('')
  } catch (err) {
    // the policy's refusals: "slow down: ...", "text over 2000 characters", ...
    const why = err.code == 'forbidden' ? err.message : `not sent (${err.code}): ${err.message}`
    notice(why)
    add(conv(key), { sys: why, err: 1 })
  }
}

let typedAt = 0
$('text').oninput = () => {
  if (!current?.startsWith('room:') || Date.now() - typedAt < 2000) return
  typedAt = Date.now()
  client.publish('typing:' + current.slice(5), {}).catch(() => {})
}

$('join').onsubmit = (e) => {
  e.preventDefault()
  const name = $('room').value.trim()
  if (name) joinRoom(name)
  $('room').value = ''
}

$('dm').onsubmit = (e) => {
  e.preventDefault()
  const user = $('dm-to').value.trim()
  if (user) select(conv('dm:' + user).key)
  $('dm-to').value = ''
}

// a reload keeps you logged in (this tab only)
const saved = JSON.parse(sessionStorage.getItem('chat.login') || 'null')
if (saved) {
  $('name').value = saved.name
  login(saved.name, saved.token).catch((err) => logout(err.message))
}
