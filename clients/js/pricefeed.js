// pricefeed.js — a client for pricefeed's multiplexed WebSocket (`/v1/ws`).
//
// One dependency-free ES module for browsers and for Node with a global WebSocket (Node 22,
// or Node 20 with --experimental-websocket). It connects, subscribes, renews the token in-band
// before it expires, reconnects with backoff and jitter, and resumes every symbol with `since`,
// so the ticks you get have no gap and no duplicate (a jump the server could not fill is
// reported as a "gap"; a seq that restarts as a "reset").
//
//   import { PricefeedClient } from '/static/pricefeed.js';
//   const feed = new PricefeedClient({ url: 'https://prices.example', getToken });
//   feed.on('tick', (t) => console.log(t.symbol, t.price, t.seq));
//   feed.subscribe(['AAPL', 'BTC-USD']);
//
// The protocol is app/prices/protocol.md (served at /docs); close codes as in the contract.

export const VERSION = '0.1.0';

const WS_PATH = '/v1/ws';
const MAX_PER_SUBSCRIBE = 100;            // symbols per subscribe frame (WS_MAX_MESSAGE_BYTES)
const RENEW_AT = 0.8;                     // of a token's remaining lifetime
const RENEW_RETRY_MS = 5000;              // after a failed renewal (the server closes 4408 if it never works)
const MIN_TOKEN_LIFE_MS = 5000;           // a token closer than this to its exp is not used to connect

// Close codes (the contract's table).
const BAD_TOKEN = 4401;
const NOT_ENTITLED = 4403;
const UNKNOWN_SYMBOL = 4404;
const TOKEN_EXPIRED = 4408;

const SYMBOL = /^[A-Z0-9][A-Z0-9.\-]{0,15}$/;

/** An error the client reports through its "error" event. */
export class PricefeedError extends Error {
  /**
   * @param {string} code  what went wrong: a server error code (`unknown_symbol`, …), or
   *   `unauthenticated`, `not_entitled`, `token_expired`, `token_renewal_failed`, `connect_failed`
   * @param {string} message
   * @param {{closeCode?: number, symbols?: string[], fatal?: boolean, cause?: unknown}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'PricefeedError';
    this.code = code;
    this.closeCode = extra.closeCode;
    this.symbols = extra.symbols ?? [];
    this.fatal = Boolean(extra.fatal);  // the client went offline for good because of it
  }
}

/** The claims of a JWT, read without verifying it (the server verifies); null if unreadable. */
export function decodeTokenClaims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = part + '='.repeat((4 - (part.length % 4)) % 4);
    const text = new TextDecoder().decode(Uint8Array.from(atob(padded), (c) => c.charCodeAt(0)));
    const claims = JSON.parse(text);
    return claims && typeof claims === 'object' ? claims : null;
  } catch {
    return null;
  }
}

function normalise(symbols) {
  const list = typeof symbols === 'string' ? [symbols] : Array.from(symbols ?? []);
  const out = [];
  for (const raw of list) {
    const symbol = String(raw).trim().toUpperCase();
    if (!SYMBOL.test(symbol)) throw new TypeError(`not a symbol: ${JSON.stringify(raw)}`);
    if (!out.includes(symbol)) out.push(symbol);
  }
  return out;
}

function streamUrl(base) {
  const url = new URL(base ?? globalThis.location?.origin ?? '');
  if (url.protocol === 'http:') url.protocol = 'ws:';
  else if (url.protocol === 'https:') url.protocol = 'wss:';
  else if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
    throw new TypeError(`url must be the service's http(s) base, not ${url.protocol}`);
  }
  url.pathname = url.pathname.replace(/\/+$/, '') + WS_PATH;
  url.search = '';
  url.hash = '';
  return url;
}

export class PricefeedClient {
  /**
   * @param {object} options  see pricefeed.d.ts
   */
  constructor({
    url,
    token,
    getToken,
    WebSocket: WebSocketImpl = globalThis.WebSocket,
    backoff = {},
    staleMs = 40000,
    connectTimeoutMs = 10000,
  } = {}) {
    if (typeof WebSocketImpl !== 'function') {
      throw new TypeError('no WebSocket here: use Node 22, `node --experimental-websocket` on '
        + 'Node 20, or pass the `WebSocket` option');
    }
    if (!token && typeof getToken !== 'function') throw new TypeError('give a token or getToken');
    this._url = streamUrl(url);
    this._token = token || null;
    this._getToken = typeof getToken === 'function' ? getToken : null;
    this._WebSocket = WebSocketImpl;
    this._backoff = { initialMs: 500, maxMs: 15000, jitter: 'equal', ...backoff };
    this._staleMs = staleMs;
    this._connectTimeoutMs = connectTimeoutMs;

    this._listeners = new Map();
    this._symbols = new Set();      // what the caller wants
    this._lastSeq = new Map();      // symbol -> the newest seq handed out
    this._pending = new Set();      // asked for on this connection, not yet `subscribed`
    this._state = 'offline';
    this._running = false;          // connecting or connected until close() or a fatal close
    this._closed = false;
    this._ws = null;
    this._generation = 0;           // bumped per socket: events of an old one are ignored
    this._attempt = 0;              // failed attempts since the last one that delivered data
    this._retryTimer = null;
    this._renewTimer = null;
    this._watchdog = null;
    this._lastFrameAt = 0;
    this._openedAt = 0;
    this._onOnline = () => { if (this._retryTimer !== null) this._connectNow(); };
  }

  /** `offline`, `connecting`, `live` or `reconnecting`. */
  get state() { return this._state; }

  /** The symbols asked for (and not dropped by the server). */
  get symbols() { return [...this._symbols]; }

  /** The newest seq handed out per symbol: what a reconnect resumes from. */
  get lastSeq() { return Object.fromEntries(this._lastSeq); }

  /** Listen to "snapshot", "tick", "state", "error", "gap" or "reset"; returns a function that stops it. */
  on(event, fn) {
    if (typeof fn !== 'function') throw new TypeError('a listener must be a function');
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  /** Add symbols; connects on the first call. */
  subscribe(symbols) {
    if (this._closed) throw new Error('this client is closed');
    const wanted = normalise(symbols).filter((s) => !this._symbols.has(s));
    for (const symbol of wanted) this._symbols.add(symbol);
    this._dropUnentitled();
    const allowed = wanted.filter((s) => this._symbols.has(s));
    if (!allowed.length) return;
    if (this._isOpen()) this._sendSubscribe(allowed);
    else if (!this._running) this._start();
  }

  /** Remove symbols: no tick of theirs follows. */
  unsubscribe(symbols) {
    const gone = normalise(symbols).filter((s) => this._symbols.delete(s));
    for (const symbol of gone) this._lastSeq.delete(symbol);
    if (gone.length && this._isOpen()) this._send({ op: 'unsubscribe', symbols: gone });
  }

  /** Close the connection and stop for good. */
  close() {
    this._closed = true;
    this._stop('offline', { reason: 'closed by the client' });
  }

  // ---- lifecycle ------------------------------------------------------------------------

  _start() {
    this._running = true;
    this._attempt = 0;
    globalThis.addEventListener?.('online', this._onOnline);
    this._connect();
  }

  _stop(state, detail) {
    this._running = false;
    this._generation++;
    clearTimeout(this._retryTimer); this._retryTimer = null;
    clearTimeout(this._renewTimer); this._renewTimer = null;
    clearInterval(this._watchdog); this._watchdog = null;
    globalThis.removeEventListener?.('online', this._onOnline);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try { ws.close(1000); } catch { /* already closing */ }
    }
    this._setState(state, detail);
  }

  async _connect() {
    this._retryTimer = null;
    const generation = ++this._generation;
    if (this._state !== 'reconnecting') this._setState('connecting', {});
    let token;
    try {
      token = await this._usableToken();
    } catch (error) {
      if (generation !== this._generation) return;
      if (error instanceof PricefeedError && error.fatal) return this._fail(error);
      this._emitError(new PricefeedError('token_renewal_failed',
        `could not get a token: ${error?.message ?? error}`, { cause: error }));
      return this._retry('no token');
    }
    if (generation !== this._generation) return;  // closed meanwhile
    const url = new URL(this._url);
    url.searchParams.set('token', token);
    let ws;
    try {
      ws = new this._WebSocket(url.href);
    } catch (error) {
      this._emitError(new PricefeedError('connect_failed', String(error?.message ?? error),
        { cause: error }));
      return this._retry('connect failed');
    }
    this._ws = ws;
    this._openedAt = 0;
    this._lastFrameAt = Date.now();
    this._scheduleRenewal();
    clearInterval(this._watchdog);
    this._watchdog = setInterval(() => this._checkStale(generation), 1000);
    this._pending.clear();
    ws.onopen = () => {
      if (generation !== this._generation) return;
      this._openedAt = Date.now();
      this._lastFrameAt = this._openedAt;
      this._dropUnentitled();  // a fresh token from getToken may list fewer
      if (this._symbols.size) this._sendSubscribe([...this._symbols]);
      else this._stop('offline', { reason: 'no symbol left to subscribe to' });
    };
    ws.onmessage = (event) => {
      if (generation === this._generation) this._onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (generation === this._generation) this._onClose(event.code, event.reason ?? '');
    };
    ws.onerror = () => { /* a close event follows */ };
  }

  // A dead TCP connection can take minutes to report, and a connect to a server that is going
  // away can hang: trust the server's heartbeats (one per 15 s when idle) and a connect deadline.
  _checkStale(generation) {
    const ws = this._ws;
    if (generation !== this._generation || !ws) return;
    const now = Date.now();
    if (!this._openedAt && now - this._lastFrameAt > this._connectTimeoutMs) {
      this._drop('connect timed out');
    } else if (this._openedAt && now - this._lastFrameAt > this._staleMs) {
      this._drop('no data from the server');
    }
  }

  _drop(reason) {
    const ws = this._ws;
    this._ws = null;
    this._generation++;  // whatever the old socket still reports is ignored
    if (ws) {
      try { ws.close(); } catch { /* ignore */ }
    }
    this._retry(reason);
  }

  _onClose(code, reason) {
    this._ws = null;
    clearInterval(this._watchdog); this._watchdog = null;
    if (!this._running) return;
    const why = `closed ${code}${reason ? ` (${reason})` : ''}`;
    if (code === TOKEN_EXPIRED) {
      if (!this._getToken) {
        return this._fail(new PricefeedError('token_expired',
          'the token expired and there is no getToken to renew it', { closeCode: code, fatal: true }));
      }
      this._token = null;  // the next attempt asks getToken for a fresh one
      return this._retry(why, this._attempt ? undefined : 0);  // the first time: at once
    }
    if (code === BAD_TOKEN) {
      return this._fail(new PricefeedError('unauthenticated',
        reason || 'the server refused the token', { closeCode: code, fatal: true }));
    }
    if (code === NOT_ENTITLED || code === UNKNOWN_SYMBOL) {
      // Never retried for the symbols it names; the others were not at fault.
      const named = (reason.match(/(?:entitled to|unknown symbol:?)\s+(.+)$/i)?.[1] ?? '')
        .split(/[\s,]+/).filter((s) => this._symbols.has(s));
      this._forget(named);
      const error = new PricefeedError(code === NOT_ENTITLED ? 'not_entitled' : 'unknown_symbol',
        reason || `refused (${code})`, { closeCode: code, symbols: named });
      if (!named.length || !this._symbols.size) {
        error.fatal = true;
        return this._fail(error);
      }
      this._emitError(error);
      return this._retry(why, 0);
    }
    // 1001 going away, 1006 network, 1008 policy, 1011, 1012, 1013 try later: back off, resume.
    this._retry(why);
  }

  _retry(reason, delayMs) {
    if (!this._running) return;
    clearTimeout(this._retryTimer);
    this._attempt++;
    if (delayMs === undefined) delayMs = this._backoffDelay(this._attempt);
    this._setState('reconnecting', { attempt: this._attempt, delayMs, reason });
    this._retryTimer = setTimeout(() => this._connect(), delayMs);
  }

  _connectNow() {
    clearTimeout(this._retryTimer);
    this._connect();
  }

  _backoffDelay(attempt) {
    const { initialMs, maxMs, jitter } = this._backoff;
    const ceiling = Math.min(maxMs, initialMs * 2 ** (attempt - 1));
    // Full jitter spreads a crowd of clients the most; equal jitter never retries at once.
    return Math.round(jitter === 'full' ? Math.random() * ceiling
      : ceiling / 2 + (Math.random() * ceiling) / 2);
  }

  _fail(error) {
    this._emitError(error);
    this._stop('offline', { reason: error.message, closeCode: error.closeCode });
  }

  _setState(state, detail = {}) {
    // Each reconnect attempt is told (with its delay); other states once.
    if (state === this._state && state !== 'reconnecting') return;
    this._state = state;
    this._emit('state', state, detail);
  }

  // ---- tokens ---------------------------------------------------------------------------

  _expiresAt(token) {
    const exp = decodeTokenClaims(token)?.exp;
    return typeof exp === 'number' ? exp * 1000 : Infinity;
  }

  async _usableToken() {
    if (this._token && this._expiresAt(this._token) - Date.now() > MIN_TOKEN_LIFE_MS) {
      return this._token;
    }
    if (!this._getToken) {
      throw new PricefeedError('token_expired', 'the token has expired and there is no getToken',
        { fatal: true });
    }
    const token = await this._getToken();
    if (typeof token !== 'string' || !token) throw new Error('getToken() gave no token');
    this._token = token;
    return token;
  }

  _scheduleRenewal() {
    clearTimeout(this._renewTimer);
    this._renewTimer = null;
    if (!this._getToken) return;
    const left = this._expiresAt(this._token) - Date.now();
    if (!Number.isFinite(left)) return;
    this._renewTimer = setTimeout(() => this._renew(), Math.max(1000, left * RENEW_AT));
  }

  async _renew() {
    this._renewTimer = null;
    const generation = this._generation;
    let token;
    try {
      token = await this._getToken();
      if (typeof token !== 'string' || !token) throw new Error('getToken() gave no token');
    } catch (error) {
      if (!this._running) return;
      this._emitError(new PricefeedError('token_renewal_failed',
        `could not renew the token: ${error?.message ?? error}`, { cause: error }));
      this._renewTimer = setTimeout(() => this._renew(), RENEW_RETRY_MS);
      return;
    }
    if (!this._running) return;
    this._token = token;
    // Unsubscribed first: the server closes with 4403 a connection whose new token does not
    // cover every symbol it streams.
    const denied = this._dropUnentitled();
    if (generation === this._generation && this._isOpen()) {
      if (denied.length) this._send({ op: 'unsubscribe', symbols: denied });
      this._send({ op: 'auth', token });
    }
    this._scheduleRenewal();
  }

  // Symbols the current token does not list (its `symbols` claim) are dropped here, with an
  // error event: the server would close the whole connection with 4403 for one of them.
  _dropUnentitled() {
    const granted = this._token ? decodeTokenClaims(this._token)?.symbols : undefined;
    if (!Array.isArray(granted) || granted.includes('*')) return [];
    const denied = [...this._symbols].filter((s) => !granted.includes(s));
    if (denied.length) {
      this._forget(denied);
      this._emitError(new PricefeedError('not_entitled',
        `the token is not entitled to ${denied.join(', ')}`, { symbols: denied }));
    }
    return denied;
  }

  // ---- frames ---------------------------------------------------------------------------

  _isOpen() {
    return this._ws !== null && this._openedAt !== 0 && this._ws.readyState === 1;
  }

  _send(message) {
    try {
      this._ws.send(JSON.stringify(message));
    } catch { /* closing: the close event reconnects and resubscribes */ }
  }

  _sendSubscribe(symbols) {
    for (const s of symbols) this._pending.add(s);
    for (let i = 0; i < symbols.length; i += MAX_PER_SUBSCRIBE) {
      const chunk = symbols.slice(i, i + MAX_PER_SUBSCRIBE);
      const since = {};  // resume: the server sends what we missed first
      for (const s of chunk) if (this._lastSeq.has(s)) since[s] = this._lastSeq.get(s);
      this._send({ op: 'subscribe', symbols: chunk, since, batch: true });
    }
  }

  _onFrame(data) {
    this._lastFrameAt = Date.now();
    let body;
    try { body = JSON.parse(data); } catch { return; }
    for (const message of Array.isArray(body) ? body : [body]) {  // a batch frame is an array
      if (!message || typeof message !== 'object') continue;
      switch (message.type) {
        case 'tick': case 'snapshot': this._onPrice(message); break;
        case 'subscribed':
          for (const s of message.symbols ?? []) this._pending.delete(s);
          this._live();
          break;
        case 'error': this._onServerError(message); break;
        default: break;  // heartbeat, pong, authenticated, unsubscribed
      }
    }
  }

  _onPrice(tick) {
    const { symbol, seq } = tick;
    if (!this._symbols.has(symbol) || typeof seq !== 'number' || typeof tick.price !== 'string') {
      return;  // unsubscribed meanwhile, or not a tick
    }
    const last = this._lastSeq.get(symbol);
    if (last !== undefined) {
      // A snapshot behind what we saw: the service's seq restarted (`reset: true` says so
      // outright). Follow it; the ticks in between cannot be had.
      const reset = tick.type === 'snapshot' && (tick.reset === true || seq < last);
      if (reset) {
        this._emit('reset', { symbol, seq, previous: last });
      } else if (seq <= last) {
        return;  // a duplicate
      } else if (seq > last + 1) {
        this._emit('gap', { symbol, from: last + 1, to: seq - 1 });
      }
    }
    this._lastSeq.set(symbol, seq);
    this._attempt = 0;  // this connection works: the next reconnect starts the backoff over
    this._live();
    this._emit(tick.type, tick);
  }

  _live() {
    if (this._state !== 'live' && this._isOpen()) this._setState('live', {});
  }

  _onServerError(message) {
    const text = String(message.message ?? message.code ?? 'error');
    let symbols = Array.isArray(message.symbols) ? message.symbols : [];
    if (message.code === 'unknown_symbol' && !symbols.length) {
      // A subscribe naming an unknown symbol is refused whole, and the message names the
      // first one: drop it and ask again for the rest of what is still unanswered.
      const named = text.match(/unknown symbol:?\s*'?([A-Za-z0-9.\-]+)'?/)?.[1]?.toUpperCase();
      if (named && this._symbols.has(named)) {
        symbols = [named];
        this._forget(symbols);
        const retry = [...this._pending].filter((s) => this._symbols.has(s));
        if (retry.length) this._sendSubscribe(retry);
      }
    } else if (message.code === 'unknown_symbol') {
      this._forget(symbols);  // an instrument disabled while subscribed
    }
    this._emitError(new PricefeedError(String(message.code ?? 'error'), text, { symbols }));
    if (message.code === 'unavailable') this._drop('server unavailable');
  }

  _forget(symbols) {
    for (const symbol of symbols) {
      this._symbols.delete(symbol);
      this._lastSeq.delete(symbol);
      this._pending.delete(symbol);
    }
  }

  // ---- events ---------------------------------------------------------------------------

  _emitError(error) {
    this._emit('error', error);
  }

  _emit(event, ...args) {
    for (const fn of [...(this._listeners.get(event) ?? [])]) {
      try {
        fn(...args);
      } catch (error) {
        // A listener's bug must not stop the stream; it still surfaces, uncaught.
        setTimeout(() => { throw error; });
      }
    }
  }
}
