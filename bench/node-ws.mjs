// Baseline: Node + ws, broadcasting each text frame to every client the way ws's README does
// (`client.send(data, { binary: isBinary })` for each open client). Speaks the same minimal protocol as raw-bun.ts:
// GET /api/me hands out a cookie, joins get an empty history and presence, other frames go to "bench".
import { createServer } from "node:http";
import { WebSocket, WebSocketServer } from "ws";

const WELCOME = JSON.stringify({ type: "welcome", user: { id: "u0", name: "raw" }, maxText: 2000 });
/** room name → its sockets; everyone is in "bench" from the start */
const rooms = new Map([["bench", new Set()]]);
let sessions = 0;

const http = createServer((req, res) => {
  if (req.url.startsWith("/api/me")) {
    const n = ++sessions;
    res.writeHead(200, { "content-type": "application/json", "set-cookie": `sid=raw${n}; Path=/; HttpOnly` });
    return res.end(JSON.stringify({ id: `u${n}`, name: `user${n}` }));
  }
  res.writeHead(404).end("not found");
});

const wss = new WebSocketServer({ server: http, path: "/chat", perMessageDeflate: false, maxPayload: 64 * 1024 });

wss.on("connection", (ws) => {
  const joined = new Set(["bench"]);
  rooms.get("bench").add(ws);
  ws.send(WELCOME);
  ws.on("message", (data, isBinary) => {
    // a join starts with `{"type":"j`; only those are decoded
    if (!isBinary && data[9] === 0x6a && data.toString().startsWith('{"type":"join"')) {
      const { room } = JSON.parse(data.toString());
      if (!rooms.has(room)) rooms.set(room, new Set());
      rooms.get(room).add(ws);
      joined.add(room);
      ws.send(`{"type":"history","room":${JSON.stringify(room)},"messages":[],"complete":true}`);
      ws.send(`{"type":"presence","room":${JSON.stringify(room)},"users":[]}`);
      return;
    }
    for (const client of rooms.get("bench")) if (client.readyState === WebSocket.OPEN) client.send(data, { binary: false });
  });
  ws.on("close", () => {
    for (const room of joined) rooms.get(room)?.delete(ws);
  });
});

http.listen(Number(process.env.PORT ?? 0), process.env.HOST ?? "127.0.0.1", () => {
  const { port } = http.address();
  console.log(JSON.stringify({ event: "ready", port, url: `http://127.0.0.1:${port}` }));
});
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
