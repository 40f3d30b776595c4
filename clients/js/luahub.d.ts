// Types of luahub.js, the JavaScript client of luahub protocol v1 (docs/protocol.md).

export type ClientState = 'disconnected' | 'connecting' | 'connected'
export type SubscriptionState = 'unsubscribed' | 'subscribing' | 'subscribed'

/** A failed command. `code`: the server's error code (bad_request, unknown_op, invalid_channel,
 * not_subscribed, forbidden, too_large, limit_exceeded, internal, rpc_error, unavailable,
 * not_available, rate_limited, ...), or the client's own: timeout, disconnected, buffer_full;
 * a number for the close code that ended a connection for good (ready() rejections). */
export class LuahubError extends Error {
  name: 'LuahubError'
  code: string | number
  /** e.g. rate_limited errors carry retry_in_ms */
  [extra: string]: unknown
}

/** Full-jitter backoff: a random delay in [0, min(max, min * 2^attempt)] ms. */
export function backoff(attempt: number, min?: number, max?: number): number

/** 1008, 4003 and 4400..4599 (4000 + the HTTP status of a refused upgrade). */
export function isRefusal(code: number): boolean

/** Anything with the WebSocket API of browsers (globalThis.WebSocket, npm ws). */
export interface WebSocketLike {
  readonly protocol: string
  send(data: string): void
  close(code?: number, reason?: string): void
  onmessage: ((e: { data: unknown }) => void) | null
  onclose: ((e: { code: number; reason: string }) => void) | null
  onerror: ((e: unknown) => void) | null
}
export type WebSocketClass = new (url: string, protocols?: string[]) => WebSocketLike

/** What sessionStorage offers (and any object with these two methods). */
export interface PositionStorage {
  getItem(key: string): string | null
  setItem(key: string, value: string): void
}

export interface ClientOptions {
  /** Token sent as the query parameter `tokenParam` (or as a subprotocol, see tokenProtocol). */
  token?: string
  /** Called for a token when there is none, and after a refusal (1008, 4003, 44xx/45xx); a
   * rejection or no answer within `timeout` is retried with backoff; a new token reconnects,
   * an empty or the refused token ends in 'disconnected'. */
  getToken?: () => string | Promise<string | null | undefined> | null | undefined
  /** Query parameter of the token. Default 'token'. */
  tokenParam?: string
  /** Send the token as the subprotocol tokenProtocol + token (e.g. 'token.') instead. */
  tokenProtocol?: string
  /** Subprotocols offered. Default ['luahub']. */
  protocols?: string[]
  /** ms to wait for a reply, for getToken and for the welcome. Default 10000. */
  timeout?: number
  /** Reconnect backoff bounds, ms. Defaults 500 and 20000. */
  minDelay?: number
  maxDelay?: number
  /** ms past the welcome's ping interval without a frame before the client pings, and as
   * long again before it reconnects. Default 10000. */
  pingMargin?: number
  /** Publishes kept while reconnecting (sent after the resubscriptions). Default 0: a
   * publish while not connected rejects with 'disconnected'. */
  buffer?: number
  /** Keep each channel's last offset and epoch here (e.g. sessionStorage): a new client
   * (a reloaded page) recovers from there. */
  storage?: PositionStorage
  /** Default globalThis.WebSocket; in Node < 22 pass npm ws. */
  WebSocket?: WebSocketClass
}

export interface CloseContext {
  code: number
  reason: string
}

export interface Welcome {
  op: 'welcome'
  client: string
  version: string
  ping: number
}

export interface Delivery<T = unknown> {
  op: 'message'
  channel: string
  data: T
  /** on channels with history */
  offset?: number
}

export interface PresenceEvent {
  op: 'join' | 'leave'
  channel: string
  client: string
  user?: string
  info?: unknown
}

export interface ResetEvent {
  op: 'reset'
  channel: string
  offset: number
  epoch: string
}

export interface SubscribedContext {
  /** the effective channel (the policy may rename it) */
  channel: string
  /** a position was known: the client asked to recover */
  recovering: boolean
  /** every missed message follows (false while recovering: reload your state) */
  recovered: boolean
  missed: number
  offset?: number
  epoch?: string
}

export interface ErrorEvent {
  /** protocol: a frame the client could not use; token: getToken failed; subscribe;
   * connect: the WebSocket could not be made */
  type: 'protocol' | 'token' | 'subscribe' | 'connect'
  error: Error
  data?: unknown
}

export interface HistoryOptions {
  limit?: number
  since?: { offset: number; epoch: string }
  reverse?: boolean
}

export interface HistoryResult {
  channel: string
  offset: number
  epoch: string
  messages: { offset: number; data: unknown }[]
}

export interface PresenceResult {
  channel: string
  clients: { client: string; user?: string; info?: unknown }[]
  truncated: boolean
}

export interface PresenceStats {
  channel: string
  clients: number
  users: number
}

interface ClientEvents {
  state: CloseContext & { state: ClientState; prev: ClientState }
  connecting: CloseContext & { delay: number }
  connected: Welcome
  disconnected: CloseContext
  error: ErrorEvent
  /** a delivery on a channel without a Subscription (one the policy subscribed us to) */
  message: Delivery
  /** conn:send from the policy */
  push: unknown
}

interface SubscriptionEvents {
  state: { state: SubscriptionState; prev: SubscriptionState; code?: number | string; reason?: string }
  subscribing: Partial<CloseContext>
  subscribed: SubscribedContext
  unsubscribed: { code: number | string; reason: string }
  message: Delivery
  join: PresenceEvent
  leave: PresenceEvent
  reset: ResetEvent
  error: ErrorEvent
}

export class Subscription {
  readonly client: Client
  /** the name asked for */
  readonly channel: string
  /** the name the hub uses (after the policy's renaming, e.g. inbox -> inbox:alice) */
  readonly effective: string
  readonly state: SubscriptionState
  /** last position seen (channels with history) */
  readonly offset?: number
  readonly epoch?: string
  on<E extends keyof SubscriptionEvents>(event: E, fn: (e: SubscriptionEvents[E]) => void): this
  off<E extends keyof SubscriptionEvents>(event: E, fn: (e: SubscriptionEvents[E]) => void): this
  subscribe(): this
  unsubscribe(): this
  /** resolves once subscribed; rejects if it ends unsubscribed (e.g. forbidden) */
  ready(): Promise<this>
  publish(data: unknown): Promise<void>
  history(opts?: HistoryOptions): Promise<HistoryResult>
  presence(): Promise<PresenceResult>
  presenceStats(): Promise<PresenceStats>
}

export interface SubscribeOptions {
  /** on the first subscription, replay up to this many past messages (channels with history) */
  rewind?: number
}

export class Client {
  constructor(url: string, opts?: ClientOptions)
  readonly url: string
  readonly state: ClientState
  /** the welcome's client id */
  readonly clientId?: string
  /** the current token (getToken replaces it) */
  token?: string
  on<E extends keyof ClientEvents>(event: E, fn: (e: ClientEvents[E]) => void): this
  off<E extends keyof ClientEvents>(event: E, fn: (e: ClientEvents[E]) => void): this
  connect(): this
  disconnect(): this
  /** resolves once connected; rejects when the client ends disconnected */
  ready(): Promise<this>
  /** the client's Subscription for `channel` (made on first use), asked to subscribe */
  subscribe(channel: string, opts?: SubscribeOptions): Subscription
  getSubscription(channel: string): Subscription | undefined
  removeSubscription(sub: Subscription): void
  publish(channel: string, data: unknown): Promise<void>
  rpc<T = unknown>(method: string, data?: unknown): Promise<T>
  /** history and presence read a channel this connection is subscribed to
   * (rejected with `not_subscribed` otherwise) */
  history(channel: string, opts?: HistoryOptions): Promise<HistoryResult>
  presence(channel: string): Promise<PresenceResult>
  presenceStats(channel: string): Promise<PresenceStats>
}
