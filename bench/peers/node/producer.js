// Tick publisher for the node-socketio peer: @socket.io/redis-emitter emits "tick" to the
// symbol's room. Same control protocol as bench/producer.py: it starts publishing at once;
// a line "mark" on stdin answers one JSON line {"ticks": n, "elapsed": s} (since the last
// mark), "quit" (or EOF) stops it.
// Args: --redis-url URL --symbols A,B --rate TICKS_PER_S [--publish burst|even]
// burst (default): every 5 ms, whatever is due then; even: each tick at its own time slot
// (start + k / rate), one emit per event-loop turn so that each goes in a write of its own.
"use strict";
const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");
const readline = require("readline");

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}

async function main() {
  const url = arg("--redis-url", "redis://127.0.0.1:6379/0");
  const symbols = arg("--symbols", "AAPL").split(",");
  const rate = Number(arg("--rate", "100"));
  const publish = arg("--publish", "burst");
  if (publish !== "burst" && publish !== "even") {
    console.error(`--publish must be burst or even, not ${publish}`);
    process.exit(2);
  }
  const client = createClient({ url });
  await client.connect();
  const emitter = new Emitter(client);

  const seq = new Map(symbols.map((s) => [s, 0]));
  const price = new Map(symbols.map((s, i) => [s, 100 + 10 * i]));
  const start = process.hrtime.bigint();
  let sent = 0;
  let markTicks = 0;
  let markAt = start;
  let next = 0;
  const burstCap = Math.max(1, Math.floor(rate * 0.05));
  const elapsed = (a, b) => Number(b - a) / 1e9;

  const emitOne = () => {
    const sym = symbols[next];
    next = (next + 1) % symbols.length;
    const s = seq.get(sym) + 1;
    seq.set(sym, s);
    const p = price.get(sym) + (Math.random() - 0.5) * 0.1;
    price.set(sym, p);
    emitter.to(sym).emit("tick", {
      type: "tick", symbol: sym, price: p.toFixed(4), ts: Date.now(), seq: s, volume: "10",
    });
    sent += 1;
  };

  let timer = null;
  let stopped = false;
  if (publish === "burst") {
    timer = setInterval(() => {
      const now = process.hrtime.bigint();
      let due = Math.floor(rate * elapsed(start, now)) - sent;
      if (due > burstCap) due = burstCap; // a stalled producer shows as ticks/s below asked
      for (let i = 0; i < due; i++) emitOne();
    }, 5);
  } else {
    // One tick per turn: node-redis writes the commands of one turn together.
    const step = () => {
      if (stopped) return;
      const now = process.hrtime.bigint();
      if (Math.floor(rate * elapsed(start, now)) - sent > 0) {
        emitOne();
        setImmediate(step); // a late tick goes at once, still alone
      } else {
        const wait = ((sent + 1) / rate - elapsed(start, now)) * 1000;
        setTimeout(step, Math.max(0, wait));
      }
    };
    step();
  }

  const rl = readline.createInterface({ input: process.stdin });
  const stop = async () => {
    stopped = true;
    if (timer !== null) clearInterval(timer);
    try { await client.quit(); } catch (e) { /* closing anyway */ }
    process.exit(0);
  };
  rl.on("line", (line) => {
    const cmd = line.trim();
    if (cmd === "mark") {
      const now = process.hrtime.bigint();
      process.stdout.write(JSON.stringify({ ticks: sent - markTicks, elapsed: elapsed(markAt, now) }) + "\n");
      markTicks = sent;
      markAt = now;
    } else if (cmd === "quit") {
      stop();
    }
  });
  rl.on("close", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
