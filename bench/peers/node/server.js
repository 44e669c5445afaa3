// socket.io + @socket.io/redis-adapter fan-out server for the pricefeed benchmark.
// Env: PORT, HOST (default 127.0.0.1), BROADCAST_URL (redis://127.0.0.1:6379/0).
// A client emits "subscribe" with a list of symbols (acknowledged) and joins one room per
// symbol; ticks arrive from @socket.io/redis-emitter (producer.js) through the adapter.
"use strict";
const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

async function main() {
  const url = process.env.BROADCAST_URL || "redis://127.0.0.1:6379/0";
  const pubClient = createClient({ url });
  const subClient = pubClient.duplicate();
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer((req, res) => {
    if (req.url === "/healthz") {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end("ok");
    } else if (!req.url.startsWith("/socket.io/")) {
      res.writeHead(404);
      res.end();
    }
  });
  const io = new Server(httpServer, {
    adapter: createAdapter(pubClient, subClient),
    transports: ["polling", "websocket"],
  });
  io.on("connection", (socket) => {
    socket.on("subscribe", (symbols, ack) => {
      const joined = (Array.isArray(symbols) ? symbols : [symbols]).map((s) => String(s).toUpperCase());
      socket.join(joined);
      if (typeof ack === "function") ack({ subscribed: joined });
    });
  });
  const port = Number(process.env.PORT || 8000);
  httpServer.listen(port, process.env.HOST || "127.0.0.1", 4096);
  const stop = () => {
    io.close();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
