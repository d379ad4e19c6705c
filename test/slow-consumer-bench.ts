// Do readers that stop reading slow everyone else down? Two runs against fresh spawned servers,
// the same traffic in both: without, then with stalled readers that keep joining the room. Prints
// the others' delivery rate and latency for each run and the ratio. Loopback only; stops by itself.
//
//   bun test/slow-consumer-bench.ts [--messages 10000] [--readers 10] [--slow 8] [--text 2000] [--runs 3]
import { parseArgs } from "node:util";
import { newSession, rawInRoom, spawnServer, tempDir } from "./helpers.ts";
import { RawSocket } from "./raw.ts";
import { metric, rssMiB } from "./probes.ts";

const { values } = parseArgs({
  options: {
    messages: { type: "string", default: "10000" },
    readers: { type: "string", default: "10" },
    slow: { type: "string", default: "8" },
    text: { type: "string", default: "2000" },
    runs: { type: "string", default: "3" },
  },
});
const MESSAGES = Number(values.messages);
const READERS = Number(values.readers);
const SLOW = Number(values.slow);
const TEXT = Number(values.text);
const RUNS = Number(values.runs);
const WINDOW = 32; // unconfirmed messages per sender

type Result = { rate: number; p50: number; p99: number; closed: number; peakMiB: number; stalled: number };

/** One run: two senders at full speed (windowed by their echoes), READERS readers, `slow` stalled readers at a time. */
async function run(slow: number): Promise<Result> {
  using tmp = tempDir();
  await using child = await spawnServer({ DATABASE_URL: `sqlite://${tmp.dir}/chat.db`, RATE_LIMIT: "1000000/1s", MAX_TEXT: String(TEXT) });
  const wsUrl = `${child.url.replace("http", "ws")}/chat`;
  const latencies: number[] = [];
  let delivered = 0;
  let lastAt = 0;
  const open = async (onText: (m: any) => void) => {
    const ws = new WebSocket(wsUrl, { headers: { cookie: (await newSession(child.url)).cookie } } as never);
    const joined = Promise.withResolvers<void>();
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data as string);
      if (m.type === "welcome") ws.send(JSON.stringify({ type: "join", room: "bench" }));
      else if (m.type === "presence") joined.resolve();
      else onText(m);
    };
    await joined.promise;
    return ws;
  };
  const readers = await Promise.all(Array.from({ length: READERS }, () => open((m) => {
    if (m.type !== "message") return;
    const now = performance.now();
    latencies.push(now - Number(m.text.slice(0, m.text.indexOf(" "))));
    delivered++;
    lastAt = now;
  })));
  const echoes = [0, 0];
  const wake: (() => void)[] = [];
  const senders = await Promise.all([0, 1].map((s) => open((m) => {
    if (m.type === "message" && m.ref?.startsWith(`${s}-`)) {
      echoes[s]++;
      wake[s]?.();
    }
  })));
  // stalled readers: `slow` at the start, and a fresh one every 100 ms while the run lasts
  const stalled: RawSocket[] = [];
  const stall = async () => {
    const raw = await rawInRoom(child.url, (await newSession(child.url)).cookie, "bench");
    raw.pause();
    stalled.push(raw);
  };
  for (let i = 0; i < slow; i++) await stall();
  let running = true;
  const churn = slow > 0 ? setInterval(() => running && void stall().catch(() => {}), 100) : null;
  let peak = rssMiB(child.proc.pid);
  const sampler = setInterval(() => (peak = Math.max(peak, rssMiB(child.proc.pid))), 50);

  const padding = "x".repeat(TEXT - 24);
  const start = performance.now();
  await Promise.all(senders.map(async (ws, s) => {
    for (let i = 0; i < MESSAGES / 2; i++) {
      ws.send(JSON.stringify({ type: "say", room: "bench", text: `${performance.now()} ${padding}`, ref: `${s}-${i}` }));
      while (i >= WINDOW && echoes[s] < i - WINDOW + 1) {
        const { promise, resolve } = Promise.withResolvers<void>();
        wake[s] = resolve;
        await promise;
      }
    }
  }));
  const deadline = Date.now() + 60_000;
  while (delivered < MESSAGES * READERS && Date.now() < deadline) await Bun.sleep(10);
  running = false;
  if (churn) clearInterval(churn);
  clearInterval(sampler);
  if (delivered < MESSAGES * READERS) throw new Error(`only ${delivered} of ${MESSAGES * READERS} deliveries`);
  const seconds = (lastAt - start) / 1000;
  latencies.sort((a, b) => a - b);
  const closed = await metric(child.url, "chat_slow_consumers_closed_total");
  for (const ws of [...readers, ...senders]) ws.close();
  for (const raw of stalled) raw.destroy();
  return {
    rate: Math.round(MESSAGES / seconds),
    p50: latencies[Math.floor(latencies.length * 0.5)],
    p99: latencies[Math.floor(latencies.length * 0.99)],
    closed,
    peakMiB: Math.round(peak),
    stalled: stalled.length,
  };
}

if (import.meta.main) {
  const fmt = (r: Result) => `${String(r.rate).padStart(6)} msg/s  p50 ${r.p50.toFixed(1).padStart(6)} ms  p99 ${r.p99.toFixed(1).padStart(6)} ms  stalled readers ${String(r.stalled).padStart(3)}  closed ${String(r.closed).padStart(3)}  peak RSS ${r.peakMiB} MiB`;
  console.log(`${MESSAGES} messages of ${TEXT} characters, 2 senders, ${READERS} readers; with: ${SLOW} stalled readers plus one more every 100 ms`);
  const base: Result[] = [];
  const slow: Result[] = [];
  for (let i = 0; i < RUNS; i++) {
    base.push(await run(0));
    console.log(`without  ${fmt(base.at(-1)!)}`);
    slow.push(await run(SLOW));
    console.log(`with     ${fmt(slow.at(-1)!)}`);
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const ratio = (f: (r: Result) => number) => (median(slow.map(f)) / median(base.map(f))).toFixed(2);
  console.log(`median ratio with/without: rate ${ratio((r) => r.rate)}, p50 ${ratio((r) => r.p50)}, p99 ${ratio((r) => r.p99)}`);
}
