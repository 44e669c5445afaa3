// Types for pricefeed.js: a client for pricefeed's multiplexed WebSocket (`/v1/ws`).

export declare const VERSION: string;

/** A price update. `price`, `bid`, `ask` and `volume` are decimal strings, never floats. */
export interface Tick {
  type: 'tick' | 'snapshot';
  symbol: string;
  /** Decimal string, e.g. "189.2300": parse it with a decimal library, not Number, for money. */
  price: string;
  /** Epoch milliseconds (UTC) at the producer. */
  ts: number;
  /** Per symbol, +1 for every tick the producer publishes. */
  seq: number;
  bid?: string;
  ask?: string;
  volume?: string;
  /** A trade's size and side, and the source's own time, when the source has them. */
  size?: string;
  side?: 'buy' | 'sell';
  source_ts?: number;
  /** On a snapshot: the symbol's seq restarted and what came before cannot be filled. */
  reset?: boolean;
  [field: string]: unknown;
}

export type ConnectionState = 'connecting' | 'live' | 'reconnecting' | 'offline';

export interface StateDetail {
  /** Why the client is reconnecting or went offline, e.g. "closed 1001 (going away)". */
  reason?: string;
  /** Reconnect attempts since the last connection that delivered data. */
  attempt?: number;
  /** How long until the next attempt. */
  delayMs?: number;
  /** The close code that took the client offline. */
  closeCode?: number;
}

/** Ticks that were skipped: seq `from` to `to`, both included (retention exceeded, or conflation). */
export interface Gap {
  symbol: string;
  from: number;
  to: number;
}

/** The symbol's seq went back (the service lost its history): `seq` follows `previous`. */
export interface Reset {
  symbol: string;
  seq: number;
  previous: number;
}

export type ErrorCode =
  | 'unauthenticated'        // close 4401: the token was refused; the client is offline
  | 'not_entitled'           // the token does not list these symbols (or close 4403)
  | 'unknown_symbol'         // the service does not serve these symbols (now)
  | 'token_expired'          // expired, and no getToken to renew it; the client is offline
  | 'token_renewal_failed'   // getToken() threw; retried
  | 'connect_failed'
  | 'too_many_subscriptions'
  | 'subject_mismatch'
  | 'unavailable'
  | (string & {});

export declare class PricefeedError extends Error {
  readonly name: 'PricefeedError';
  code: ErrorCode;
  /** The WebSocket close code, when a close caused it. */
  closeCode?: number;
  /** The symbols it is about (dropped from the subscription). */
  symbols: string[];
  /** The client went offline for good because of it. */
  fatal: boolean;
}

export interface PricefeedClientOptions {
  /** The service's http(s) base, e.g. "https://prices.example.com". Default: the page's origin. */
  url?: string;
  /** An access token (JWT) from POST /v1/auth/token. */
  token?: string;
  /**
   * Returns a fresh token: called when there is none, before the current one expires (then
   * sent in-band with `{"op": "auth"}`), and after a 4408 close.
   */
  getToken?: () => Promise<string> | string;
  /** A WebSocket implementation; default `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocket;
  /** Reconnect delays: doubling from initialMs up to maxMs; equal (default) or full jitter. */
  backoff?: { initialMs?: number; maxMs?: number; jitter?: 'equal' | 'full' };
  /** No frame for this long (the server sends a heartbeat every 15 s): reconnect. Default 40000. */
  staleMs?: number;
  /** A handshake that takes longer: reconnect. Default 10000. */
  connectTimeoutMs?: number;
}

export interface PricefeedEvents {
  snapshot: (tick: Tick) => void;
  tick: (tick: Tick) => void;
  state: (state: ConnectionState, detail: StateDetail) => void;
  error: (error: PricefeedError) => void;
  gap: (gap: Gap) => void;
  reset: (reset: Reset) => void;
}

export declare class PricefeedClient {
  constructor(options: PricefeedClientOptions);
  readonly state: ConnectionState;
  /** The symbols asked for and not refused. */
  readonly symbols: string[];
  /** The newest seq handed out per symbol: what a reconnect resumes from. */
  readonly lastSeq: Record<string, number>;
  /** Listen to an event; returns a function that removes the listener. */
  on<E extends keyof PricefeedEvents>(event: E, listener: PricefeedEvents[E]): () => void;
  off<E extends keyof PricefeedEvents>(event: E, listener: PricefeedEvents[E]): void;
  /** Add symbols (upper-cased); the first call connects. */
  subscribe(symbols: string | Iterable<string>): void;
  /** Remove symbols: no tick of theirs follows. */
  unsubscribe(symbols: string | Iterable<string>): void;
  /** Close the connection and stop for good. */
  close(): void;
}

/** A JWT's claims, decoded without verifying it; null if it is not a JWT. */
export declare function decodeTokenClaims(token: string): Record<string, unknown> | null;
