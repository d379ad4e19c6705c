// The old protocol's floor: a minimal Bun server doing only what the protocol's join asks, as it was before
// presence_diff: welcome, the room's history from memory (FLOOR_HISTORY messages per room, serialized per join),
// the presence list, and a `joined` frame published to the room for every arrival (`left` for every departure).
// No checks, no store, no rate limits: what any server of that protocol must at least do for a reconnect storm.
// GET /api/me hands out a cookie naming a user; every other text frame is published unchanged to "bench".
export {}; // a module, not a script: its names are its own

const BENCH_TOPIC = "bench";
const FLOOR_HISTORY = 20;
const TEXT = "the quick brown fox jumps over the lazy dog, again and again";

type User = { id: string; name: string };
type Message = { type: "message"; room: string; id: number; seq: number; user: User; text: string; ts: number };
type Room = { name: string; messages: Message[]; members: Map<string, User> };
type Data = { user: User; rooms: string[] };

const rooms = new Map<string, Room>();
let sessions = 0;

function roomOf(name: string): Room {
  let room = rooms.get(name);
  if (!room) {
    const user = { id: "uwriter", name: "writer" };
    const messages = Array.from({ length: FLOOR_HISTORY }, (_, k): Message => ({ type: "message", room: name, id: k + 1, seq: k + 1, user, text: `${k + 1} ${TEXT}`, ts: Date.now() }));
    rooms.set(name, (room = { name, messages, members: new Map() }));
  }
  return room;
}

const server = Bun.serve<Data>({
  port: Number(process.env.PORT ?? 0),
  hostname: process.env.HOST ?? "127.0.0.1",
  fetch(req, srv) {
    const { pathname } = new URL(req.url);
    if (pathname === "/chat") {
      const n = /sid=floor(\d+)/.exec(req.headers.get("cookie") ?? "")?.[1] ?? "0";
      if (srv.upgrade(req, { data: { user: { id: `u${n}`, name: `user${n}` }, rooms: [] } })) return undefined;
      return new Response("upgrade required", { status: 426 });
    }
    if (pathname === "/api/me") {
      const n = ++sessions;
      return Response.json({ id: `u${n}`, name: `user${n}` }, { headers: { "set-cookie": `sid=floor${n}; Path=/; HttpOnly` } });
    }
    return new Response("not found", { status: 404 });
  },
  websocket: {
    maxPayloadLength: 64 * 1024,
    open(ws) {
      ws.subscribe(BENCH_TOPIC);
      ws.sendText(JSON.stringify({ type: "welcome", user: ws.data.user, maxText: 2000 }));
    },
    message(ws, message) {
      if (typeof message === "string" && message.startsWith('{"type":"join"')) {
        const room = roomOf((JSON.parse(message) as { room: string }).room);
        const { user } = ws.data;
        ws.sendText(JSON.stringify({ type: "history", room: room.name, messages: room.messages, complete: true }));
        room.members.set(user.id, user);
        ws.data.rooms.push(room.name);
        ws.subscribe(room.name);
        ws.sendText(JSON.stringify({ type: "presence", room: room.name, users: [...room.members.values()] }));
        ws.publish(room.name, JSON.stringify({ type: "joined", room: room.name, user }));
        return;
      }
      server.publish(BENCH_TOPIC, message);
    },
    close(ws) {
      const { user } = ws.data;
      for (const name of ws.data.rooms) {
        const room = rooms.get(name)!;
        room.members.delete(user.id);
        server.publish(name, JSON.stringify({ type: "left", room: name, user }));
      }
    },
  },
});

console.log(JSON.stringify({ event: "ready", port: server.port, url: `http://127.0.0.1:${server.port}` }));
for (const signal of ["SIGTERM", "SIGINT"] as const) process.on(signal, () => process.exit(0));
