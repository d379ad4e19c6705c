// Half-sent requests against the descriptor limit: a server process with `ulimit -n LIMIT`, then N raw TCP
// connections from this process that each send only "GET / HTTP/1.1\r\n", while a second client times /healthz.
// Loopback only; every socket opened here is closed at the end.
//   bun bench/half-open.ts [--limit 2000] [--connections 1990] [--seconds 8]
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  args: Bun.argv.slice(2),
  options: { limit: { type: "string", default: "2000" }, connections: { type: "string", default: "1990" }, seconds: { type: "string", default: "8" } },
});
const [LIMIT, CONNECTIONS, SECONDS] = [Number(values.limit), Number(values.connections), Number(values.seconds)];
const dir = mkdtempSync(join(os.tmpdir(), "half-open-"));
const server = Bun.spawn(["sh", "-c", `ulimit -n ${LIMIT} && exec "${process.execPath}" server.ts --port 0 --host 127.0.0.1 --db sqlite://${dir}/chat.db`], {
  cwd: join(import.meta.dir, ".."),
  stdout: "pipe",
  stderr: "inherit",
});

/** The port from the server's ready line. */
async function readyPort(): Promise<number> {
  const reader = server.stdout.getReader();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("Cannot start the server: it exited");
    text += new TextDecoder().decode(value);
    const ready = text.split("\n").map((l) => l.trim() && JSON.parse(l)).find((e) => e?.event === "start");
    if (ready) return ready.port;
  }
}

/** ms for /healthz, or null when no answer came within a second. */
async function health(port: number): Promise<number | null> {
  const t0 = performance.now();
  try {
    const res = await fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(1_000) });
    await res.text();
    return res.ok ? Math.round(performance.now() - t0) : null;
  } catch {
    return null;
  }
}

const port = await readyPort();
const sockets: { end(): void }[] = [];
let refused = 0;
const opening = Array.from({ length: CONNECTIONS }, () =>
  Bun.connect({ hostname: "127.0.0.1", port, socket: { data() {}, error() {}, close() {} } }).then(
    (s) => {
      s.write("GET / HTTP/1.1\r\n");
      sockets.push(s);
    },
    () => refused++,
  ),
);
const started = performance.now();
await Promise.all(opening);
console.log(`ulimit -n ${LIMIT}: ${sockets.length} half-sent connections open, ${refused} refused, in ${Math.round(performance.now() - started)} ms`);
const samples: string[] = [];
while (performance.now() - started < SECONDS * 1000) {
  const at = ((performance.now() - started) / 1000).toFixed(1);
  const ms = await health(port);
  samples.push(`${at}s: ${ms === null ? "no answer" : `${ms} ms`}`);
  await Bun.sleep(500);
}
console.log(`/healthz from a second client:\n  ${samples.join("\n  ")}`);
for (const s of sockets) s.end();
server.kill();
await server.exited;
rmSync(dir, { recursive: true, force: true });
