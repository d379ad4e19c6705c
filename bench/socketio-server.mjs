// Baseline for the cluster scenario: a Socket.IO 4 node with @socket.io/redis-adapter, set up as the
// adapter's README does (`redis` clients, `pubClient.duplicate()` to subscribe), run on Node as its users
// run it. Its chat is the common one: `join` puts the socket in a room (answered `joined`), `say`
// broadcasts the payload to the room with `io.to(room).emit("message", …)` across every node; nothing
// is stored, checked or limited. REDIS_URL names the Redis shared by the nodes; PORT 0 picks a free port.
import { createServer } from "node:http";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";
import { Server } from "socket.io";

const pubClient = createClient({ url: process.env.REDIS_URL ?? "redis://127.0.0.1:6379" });
const subClient = pubClient.duplicate();
await Promise.all([pubClient.connect(), subClient.connect()]);

const http = createServer();
const io = new Server(http, { adapter: createAdapter(pubClient, subClient), serveClient: false });

io.on("connection", (socket) => {
  socket.on("join", (room) => {
    socket.join(room);
    socket.emit("joined", room);
  });
  socket.on("say", (msg) => {
    io.to(msg.room).emit("message", msg);
  });
});

http.listen(Number(process.env.PORT ?? 0), process.env.HOST ?? "127.0.0.1", () => {
  const { port } = http.address();
  console.log(JSON.stringify({ event: "ready", port, url: `http://127.0.0.1:${port}` }));
});
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    io.close();
    void Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
    setTimeout(() => process.exit(0), 1000).unref();
  });
}
