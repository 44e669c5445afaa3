// pricefeed.js against a real server process (python -m app, with Redis): what a user of the
// client notices. Run by tests/test_js_client.py:
//   node --experimental-websocket --test clients/js/test/*.test.js
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { PricefeedClient } from '../pricefeed.js';
import { SKIP, ServerProcess, mintToken, recordPrices, waitFor } from './harness.js';

const DECIMAL = /^\d+(\.\d+)?$/;

/** A WebSocket that counts how many connections the client opened. */
function countingWebSocket() {
  const counter = { opened: 0 };
  counter.WebSocket = class extends WebSocket {
    constructor(...args) {
      super(...args);
      counter.opened++;
    }
  };
  return counter;
}

function assertContiguous(ticks) {
  const seqs = ticks.map((t) => t.seq);
  const expected = seqs.map((_, i) => seqs[0] + i);
  assert.deepEqual(seqs, expected, 'a gap or a duplicate');
}

/** Resolves once `symbol` has `count` more prices recorded than it has now. */
async function morePrices(client, seen, symbol, count) {
  const target = (seen.get(symbol)?.length ?? 0) + count;
  if ((seen.get(symbol)?.length ?? 0) >= target) return;
  await waitFor(client, 'tick', () => (seen.get(symbol)?.length ?? 0) >= target);
}

describe('PricefeedClient against a live server', { skip: SKIP }, () => {
  let server;
  const clients = [];
  const open = (options) => {
    const client = new PricefeedClient({ url: server.url, ...options });
    clients.push(client);
    return client;
  };

  before(async () => { server = await ServerProcess.start(); });
  after(async () => {
    for (const client of clients) client.close();
    await server?.stop();
  });

  it('streams a snapshot, then ticks with numeric seqs and decimal-string prices', async () => {
    const client = open({ token: mintToken() });
    const states = [];
    client.on('state', (state) => states.push(state));
    const seen = recordPrices(client);
    const snapshot = waitFor(client, 'snapshot');
    client.subscribe(['aapl']);  // lower case is normalised, as by the server
    const first = await snapshot;
    await morePrices(client, seen, 'AAPL', 3);

    assert.equal(first.type, 'snapshot');
    assert.equal(first.symbol, 'AAPL');
    const ticks = seen.get('AAPL');
    for (const tick of ticks) {
      assert.equal(typeof tick.seq, 'number');
      assert.match(tick.price, DECIMAL);
      assert.equal(typeof tick.ts, 'number');
    }
    assert.equal(ticks[1].type, 'tick');
    assertContiguous(ticks);
    assert.deepEqual(states, ['connecting', 'live']);
    assert.equal(client.state, 'live');
  });

  it('reconnects after the server restarts and resumes without a gap or a duplicate', async () => {
    const client = open({ token: mintToken(), backoff: { initialMs: 200, maxMs: 1000 } });
    const seen = recordPrices(client);
    const states = [];
    const gaps = [];
    client.on('state', (state, detail) => states.push([state, detail.reason]));
    client.on('gap', (gap) => gaps.push(gap));
    client.subscribe(['AAPL', 'MSFT']);
    await morePrices(client, seen, 'AAPL', 3);
    await morePrices(client, seen, 'MSFT', 3);

    await server.restart('SIGTERM');  // closes every stream with 1001
    await waitFor(client, 'state', (state) => state === 'live');
    await morePrices(client, seen, 'AAPL', 5);
    await morePrices(client, seen, 'MSFT', 5);

    assert.ok(states.some(([state, reason]) => state === 'reconnecting' && /1001/.test(reason)),
      `no reconnect after 1001: ${JSON.stringify(states)}`);
    assertContiguous(seen.get('AAPL'));
    assertContiguous(seen.get('MSFT'));
    assert.deepEqual(gaps, []);
  });

  it('stops for good when the server refuses the token (4401)', async () => {
    const counter = countingWebSocket();
    const forged = mintToken().replace(/\.[^.]+$/, '.' + 'A'.repeat(43));  // a bad signature
    const client = open({ token: forged, WebSocket: counter.WebSocket,
      backoff: { initialMs: 50, maxMs: 100 } });
    const errors = [];
    client.on('error', (error) => errors.push(error));
    const offline = waitFor(client, 'state', (state) => state === 'offline');
    client.subscribe(['AAPL']);
    await offline;
    await sleep(1000);  // ten times the longest backoff this client would wait

    assert.equal(counter.opened, 1, 'it retried a refused token');
    assert.equal(client.state, 'offline');
    assert.equal(errors.length, 1);
    assert.equal(errors[0].code, 'unauthenticated');
    assert.equal(errors[0].closeCode, 4401);
    assert.equal(errors[0].fatal, true);
  });

  it('renews the token in-band before it expires, on the same connection', async () => {
    const counter = countingWebSocket();
    let issued = 0;
    const getToken = async () => { issued++; return mintToken({ ttlSeconds: 6 }); };
    const client = open({ getToken, WebSocket: counter.WebSocket });
    const seen = recordPrices(client);
    const errors = [];
    client.on('error', (error) => errors.push(error));
    client.subscribe(['AAPL']);
    await morePrices(client, seen, 'AAPL', 1);
    const firstExpiry = Date.now() + 6000;
    // Ticks stamped well after the first token's exp, still on the first connection.
    await waitFor(client, 'tick', (tick) => tick.ts > firstExpiry + 2000, 30000);

    assert.ok(issued >= 2, `getToken was called ${issued} time(s)`);
    assert.equal(counter.opened, 1, 'it reconnected instead of renewing in-band');
    assert.deepEqual(errors, []);
    assertContiguous(seen.get('AAPL'));
  });

  it('after a 4408 it asks getToken for a fresh token and resumes without a gap', async () => {
    let calls = 0;
    const getToken = async () => {
      calls++;
      if (calls === 1) throw new Error('the identity provider is down');  // the renewal fails
      return mintToken();
    };
    const client = open({ token: mintToken({ ttlSeconds: 7 }), getToken });
    const seen = recordPrices(client);
    const reasons = [];
    client.on('state', (state, detail) => { if (state === 'reconnecting') reasons.push(detail.reason); });
    const errors = [];
    client.on('error', (error) => errors.push(error.code));
    client.subscribe(['AAPL']);
    await morePrices(client, seen, 'AAPL', 1);
    await waitFor(client, 'state', (state) => state === 'reconnecting', 30000);
    await waitFor(client, 'state', (state) => state === 'live');
    await morePrices(client, seen, 'AAPL', 3);

    assert.match(reasons[0], /4408/);
    assert.ok(errors.includes('token_renewal_failed'), JSON.stringify(errors));
    assert.equal(calls, 2);
    assertContiguous(seen.get('AAPL'));
  });

  it('refuses a symbol the token does not list, and streams the others', async () => {
    const client = open({ token: mintToken({ symbols: ['AAPL'] }) });
    const seen = recordPrices(client);
    const refused = waitFor(client, 'error');
    client.subscribe(['AAPL', 'MSFT']);
    const error = await refused;
    await morePrices(client, seen, 'AAPL', 3);

    assert.equal(error.code, 'not_entitled');
    assert.deepEqual(error.symbols, ['MSFT']);
    assert.deepEqual(client.symbols, ['AAPL']);
    assert.deepEqual([...seen.keys()], ['AAPL']);
    assert.equal(client.state, 'live');
  });

  it('drops what a renewed token no longer lists, and streams the rest on', async () => {
    const counter = countingWebSocket();
    let issued = 0;
    const getToken = async () => {
      issued++;
      return mintToken({ ttlSeconds: 6, symbols: issued === 1 ? ['*'] : ['AAPL'] });
    };
    const client = open({ getToken, WebSocket: counter.WebSocket });
    const seen = recordPrices(client);
    const states = [];
    client.on('state', (state) => states.push(state));
    client.subscribe(['AAPL', 'MSFT']);
    await morePrices(client, seen, 'MSFT', 1);
    const error = await waitFor(client, 'error', () => true, 30000);
    const msftBefore = seen.get('MSFT').length;
    await morePrices(client, seen, 'AAPL', 5);

    assert.equal(error.code, 'not_entitled');
    assert.deepEqual(error.symbols, ['MSFT']);
    assert.equal(error.fatal, false);
    assert.deepEqual(client.symbols, ['AAPL']);
    assert.equal(seen.get('MSFT').length, msftBefore);
    assert.equal(counter.opened, 1, 'the server closed the connection (4403)');
    assert.deepEqual(states, ['connecting', 'live']);
    assertContiguous(seen.get('AAPL'));
  });

  it('drops an unknown symbol the server names, and streams the others', async () => {
    const client = open({ token: mintToken() });
    const seen = recordPrices(client);
    const refused = waitFor(client, 'error');
    client.subscribe(['AAPL', 'NOPE']);
    const error = await refused;
    await morePrices(client, seen, 'AAPL', 3);

    assert.equal(error.code, 'unknown_symbol');
    assert.deepEqual(error.symbols, ['NOPE']);
    assert.deepEqual(client.symbols, ['AAPL']);
  });

  it('unsubscribe stops a symbol and close() goes offline', async () => {
    const client = open({ token: mintToken() });
    const seen = recordPrices(client);
    client.subscribe(['AAPL', 'MSFT']);
    await morePrices(client, seen, 'MSFT', 1);
    client.unsubscribe('MSFT');
    const msftBefore = seen.get('MSFT').length;
    await morePrices(client, seen, 'AAPL', 5);
    const offline = waitFor(client, 'state', (state) => state === 'offline');
    client.close();
    await offline;

    assert.equal(seen.get('MSFT').length, msftBefore);
    assert.deepEqual(client.symbols, ['AAPL']);
    assert.throws(() => client.subscribe(['AAPL']), /closed/);
  });
});

describe('PricefeedClient when a resume cannot be replayed', { skip: SKIP }, () => {
  let server;
  // No replay at all: a resume that missed ticks gets the latest as a snapshot, a seq jump.
  before(async () => { server = await ServerProcess.start({ WS_REPLAY_TICKS_PER_SUBSCRIBE: '0' }); });
  after(async () => { await server?.stop(); });

  it('reports the ticks it cannot have as a gap, and hands out none twice', async () => {
    const sockets = [];
    class DroppableWebSocket extends WebSocket {
      constructor(...args) { super(...args); sockets.push(this); }
    }
    const client = new PricefeedClient({ url: server.url, token: mintToken(),
      WebSocket: DroppableWebSocket, backoff: { initialMs: 2000, maxMs: 2000 } });
    try {
      const seen = recordPrices(client);
      const gaps = [];
      client.on('gap', (gap) => gaps.push(gap));
      client.subscribe(['AAPL']);
      await morePrices(client, seen, 'AAPL', 3);
      const last = client.lastSeq.AAPL;
      sockets[0].close();  // the network drops it; ticks go on for the 1 to 2 s until the retry
      const gap = await waitFor(client, 'gap');
      await morePrices(client, seen, 'AAPL', 3);

      const ticks = seen.get('AAPL');
      const resumed = ticks.find((t) => t.seq > last);
      assert.equal(resumed.type, 'snapshot');
      assert.deepEqual(gap, { symbol: 'AAPL', from: last + 1, to: resumed.seq - 1 });
      assert.deepEqual(gaps, [gap]);
      const seqs = ticks.map((t) => t.seq);
      assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
      assert.equal(new Set(seqs).size, seqs.length, 'a tick handed out twice');
    } finally {
      client.close();
    }
  });
});
