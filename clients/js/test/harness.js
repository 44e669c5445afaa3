// A real pricefeed server process for the client's tests, and tokens for it.
//
// tests/test_js_client.py prepares what a server needs (a migrated database, a redis-server)
// and runs these tests with PRICEFEED_TEST_* set; run alone, they skip and say so.
import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { openSync, closeSync, readFileSync, mkdtempSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const env = process.env;
export const CONFIGURED = Boolean(env.PRICEFEED_TEST_PYTHON && env.PRICEFEED_TEST_SERVER_ENV);
export const SKIP = CONFIGURED ? false
  : 'needs a pricefeed server: run through pytest tests/test_js_client.py (make test does)';

const base64url = (data) => Buffer.from(data).toString('base64url');

/** An HS256 token for the test server, as POST /v1/auth/token would issue. */
export function mintToken({ subject = 'js-client-test', symbols = ['*'], ttlSeconds = 300 } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const claims = base64url(JSON.stringify({
    sub: subject, aud: env.PRICEFEED_TEST_JWT_AUDIENCE || 'pricefeed', symbols,
    iat: now, exp: now + ttlSeconds, jti: randomBytes(16).toString('hex'),
  }));
  const signature = createHmac('sha256', env.PRICEFEED_TEST_JWT_SECRET)
    .update(`${header}.${claims}`).digest('base64url');
  return `${header}.${claims}.${signature}`;
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** `python -m app` on a free port; `restart()` stops it and starts it again on that port. */
export class ServerProcess {
  constructor(port, logPath, settings) {
    this.port = port;
    this.settings = settings;
    this.url = `http://127.0.0.1:${port}`;
    this.logPath = logPath;
    this.child = null;
  }

  /** `settings`: more environment for the server, e.g. `{WS_REPLAY_TICKS_PER_SUBSCRIBE: '0'}`. */
  static async start(settings = {}) {
    const directory = mkdtempSync(join(tmpdir(), 'pricefeed-js-'));
    const server = new ServerProcess(await freePort(), join(directory, 'server.log'), settings);
    await server.start();
    return server;
  }

  async start() {
    const log = openSync(this.logPath, 'a');
    this.child = spawn(env.PRICEFEED_TEST_PYTHON, ['-m', 'app'], {
      cwd: env.PRICEFEED_TEST_ROOT,
      env: {
        ...JSON.parse(env.PRICEFEED_TEST_SERVER_ENV),
        ...this.settings,
        HOST: '127.0.0.1', PORT: String(this.port), INSTANCE_ID: `js-${this.port}`,
      },
      stdio: ['ignore', log, log],
    });
    closeSync(log);
    await this.waitReady();
  }

  async waitReady(timeoutMs = 30000) {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (this.child.exitCode !== null) throw new Error(`server exited:\n${this.log().slice(-3000)}`);
      try {
        const response = await fetch(`${this.url}/readyz`);
        if (response.status === 200) return;
      } catch { /* not listening yet */ }
      await sleep(100);
    }
    throw new Error(`server not ready:\n${this.log().slice(-3000)}`);
  }

  log() {
    return readFileSync(this.logPath, 'utf8');
  }

  /** SIGTERM: the server closes every stream with 1001, as in a deploy. */
  async stop(signal = 'SIGTERM') {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), 15000);
    await exited;
    clearTimeout(timer);
  }

  async restart(signal = 'SIGTERM') {
    await this.stop(signal);
    await this.start();
  }
}

/** Resolves with the first value `take(event)` accepts; rejects after timeoutMs. */
export function waitFor(client, event, take = () => true, timeoutMs = 20000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`no matching "${event}" within ${timeoutMs} ms`));
    }, timeoutMs);
    const stop = client.on(event, (...args) => {
      if (!take(...args)) return;
      clearTimeout(timer);
      stop();
      resolve(args.length > 1 ? args : args[0]);
    });
  });
}

/** Every "snapshot" and "tick" the client hands out, in order, per symbol. */
export function recordPrices(client) {
  const seen = new Map();
  const keep = (tick) => {
    if (!seen.has(tick.symbol)) seen.set(tick.symbol, []);
    seen.get(tick.symbol).push(tick);
  };
  client.on('snapshot', keep);
  client.on('tick', keep);
  return seen;
}
