// The ceiling: a minimal Bun pub/sub server that speaks just enough of the chat protocol for the bench
// client. GET /api/me hands out a cookie, /chat upgrades, every socket subscribes to "bench" on open,
// a join is answered with an empty history and presence (and subscribes to the room), and every other
// text frame is published unchanged to "bench".
const BENCH_TOPIC = "bench";
const WELCOME = JSON.stringify({ type: "welcome", user: { id: "u0", name: "raw" }, maxText: 2000 });

let sessions = 0;

const server = Bun.serve<{ n: number }>({
  port: Number(process.env.PORT ?? 0),
  hostname: process.env.HOST ?? "127.0.0.1",
  fetch(req, srv) {
    const { pathname } = new URL(req.url);
    if (pathname === "/chat") {
      if (srv.upgrade(req, { data: { n: 0 } })) return undefined;
      return new Response("upgrade required", { status: 426 });
    }
    if (pathname === "/api/me") {
      const n = ++sessions;
      return Response.json({ id: `u${n}`, name: `user${n}` }, { headers: { "set-cookie": `sid=raw${n}; Path=/; HttpOnly` } });
    }
    return new Response("not found", { status: 404 });
  },
  websocket: {
    maxPayloadLength: 64 * 1024,
    open(ws) {
      ws.subscribe(BENCH_TOPIC);
      ws.sendText(WELCOME);
    },
    message(ws, message) {
      if (typeof message === "string" && message.startsWith('{"type":"join"')) {
        const { room } = JSON.parse(message) as { room: string };
        if (room !== BENCH_TOPIC) ws.subscribe(room);
        ws.sendText(`{"type":"history","room":${JSON.stringify(room)},"messages":[],"complete":true}`);
        ws.sendText(`{"type":"presence","room":${JSON.stringify(room)},"users":[]}`);
        return;
      }
      server.publish(BENCH_TOPIC, message);
    },
  },
});

console.log(JSON.stringify({ event: "ready", port: server.port, url: `http://127.0.0.1:${server.port}` }));
for (const signal of ["SIGTERM", "SIGINT"] as const) process.on(signal, () => process.exit(0));
