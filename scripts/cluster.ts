// npm run cluster: a local 3-node cluster behind a round-robin proxy on http://localhost:3000.
// Uses REDIS_URL and DATABASE_URL when set; otherwise starts a throwaway redis-server and
// Postgres (Debian's redis-server and postgresql packages) in temp folders, on loopback.
import { join } from "node:path";
import { spawnServer } from "../test/helpers.ts";
import { startPostgres, startRedis } from "../test/services.ts";

const NODES = Number(process.env.NODES ?? 3);
const PORT = Number(process.env.PORT ?? 3000);

const nodes: Awaited<ReturnType<typeof spawnServer>>[] = [];
let proxy: ReturnType<typeof Bun.serve> | undefined;
let redis: Awaited<ReturnType<typeof startRedis>> | null = null;
let pg: Awaited<ReturnType<typeof startPostgres>> | null = null;

/** Stops everything this script started, by pid, then exits. */
async function shutdown() {
  proxy?.stop(true);
  for (const node of nodes) {
    node.proc.kill("SIGTERM");
    await node.proc.exited;
  }
  await pg?.[Symbol.asyncDispose]();
  await redis?.[Symbol.asyncDispose]();
  process.exit(0);
}
process.on("SIGINT", shutdown);
process.on("SIGTERM", shutdown);

redis = process.env.REDIS_URL ? null : await startRedis();
pg = process.env.DATABASE_URL ? null : await startPostgres();
const env = {
  REDIS_URL: process.env.REDIS_URL ?? redis!.url,
  DATABASE_URL: process.env.DATABASE_URL ?? (await pg!.createDatabase()),
};
for (let i = 1; i <= NODES; i++) {
  nodes.push(await spawnServer({ ...env, NODE_ID: `node${i}` }, [process.execPath, join(import.meta.dir, "..", "server.ts")]));
}
console.log(`nodes: ${nodes.map((n) => n.url).join(" ")}`);

// The proxy: plain HTTP is forwarded with fetch; /chat is bridged socket to socket.
type Bridge = { upstream: WebSocket; queue: string[] };
let next = 0;
proxy = Bun.serve<{ target: string; headers: Record<string, string>; bridge?: Bridge }>({
  port: PORT,
  hostname: "0.0.0.0",
  async fetch(req, server) {
    const target = nodes[next++ % nodes.length];
    const url = new URL(req.url);
    if (url.pathname === "/chat" && req.headers.get("upgrade")?.toLowerCase() === "websocket") {
      const headers: Record<string, string> = {};
      for (const name of ["cookie", "origin"]) if (req.headers.has(name)) headers[name] = req.headers.get(name)!;
      headers.host = req.headers.get("host") ?? "";
      if (server.upgrade(req, { data: { target: target.url.replace("http", "ws") + "/chat", headers } })) return;
    }
    const headers = new Headers(req.headers);
    return fetch(target.url + url.pathname + url.search, { method: req.method, headers, body: req.body, redirect: "manual" });
  },
  websocket: {
    open(ws) {
      const upstream = new WebSocket(ws.data.target, { headers: ws.data.headers } as never);
      const bridge: Bridge = { upstream, queue: [] };
      ws.data.bridge = bridge;
      upstream.onopen = () => bridge.queue.splice(0).forEach((m) => upstream.send(m));
      upstream.onmessage = (e) => ws.send(e.data as string);
      upstream.onclose = (e) => ws.close(e.code === 1005 || e.code === 1006 ? 1011 : e.code, e.reason);
    },
    message(ws, msg) {
      const { upstream, queue } = ws.data.bridge!;
      if (upstream.readyState === WebSocket.OPEN) upstream.send(msg);
      else queue.push(String(msg));
    },
    close(ws) {
      ws.data.bridge?.upstream.close();
    },
  },
});
console.log(`proxy: http://localhost:${proxy.port} (round robin over ${nodes.length} nodes)`);

