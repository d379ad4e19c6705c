// The restart storm (bench/run.ts --scenario restart-storm): every client of a server comes back at once, with
// `since`, at most `concurrency` handshakes in flight. Clients are one user each (a real session, made before),
// in rooms of clients / rooms. Measured: the time until the last client has its recovery (history and presence),
// and the server's CPU per client (schedstat of all its threads; the last presence_diffs, PRESENCE_INTERVAL_MS
// later, included).
//   - ours, cold: the server restarted on the same SQLite file (sessions and rooms not in memory, JIT cold);
//   - ours, warm: the same process, every client dropped (so every room was let go) and back;
//   - the old protocol's floor (bench/floor.ts) and raw Bun (accept + subscribe): warm, like ours.
import { openStore } from "../server.ts";
import { readFileSync } from "node:fs";
import { cpuPreciseMs, watchOthers } from "./lib.ts";
import type { Server, Worker } from "./run.ts";

type Config = { clients: number; rooms: number; stored: number; missed: number; procs: number; concurrency: number };
type OpenResult = { opened: number; failed: number; ms: number; latency: { p50Us: number; p99Us: number; maxUs: number }; historyBytes: number; firstError: string | null };
type Helpers = {
  sessions: (url: string, count: number) => Promise<string[]>;
  withWorkers: <T>(count: number, fn: (workers: Worker[]) => Promise<T>) => Promise<T>;
  openArgs: (server: Server, cookies: string[], extra: { firstId: number; count: number; rooms: string[]; groups?: number; concurrency?: number; since?: number }) => object;
};

const TEXT = "the quick brown fox jumps over the lazy dog, again and again"; // bench/floor.ts's history says the same
const SETTLE_MS = 300; // the last presence_diffs go out PRESENCE_INTERVAL_MS (100) after the last arrival

export async function restartStorm(server: Server, config: Config, h: Helpers) {
  const { clients, rooms, procs } = config;
  const cookies = await h.sessions(server.url, clients);
  const per = Math.ceil(clients / procs);
  return h.withWorkers(procs, async (workers) => {
    const open = (since?: number) =>
      Promise.all(
        workers.map((w, k) => {
          const count = Math.max(0, Math.min(per, clients - k * per));
          const args = h.openArgs(server, cookies, { firstId: k * per, count, rooms: ["{g}"], groups: rooms, concurrency: Math.ceil(config.concurrency / procs), since });
          return w.call<OpenResult>("open", args, 320_000);
        }),
      );
    const closeAll = () => Promise.all(workers.map((w) => w.call("closeAll")));
    const phase = async (): Promise<Phase> => {
      await serverQuiet(server.proc.pid);
      return storm(server, workers, () => open(config.stored - config.missed), clients);
    };
    // everyone was here before: sessions used, rooms on each user's list
    assertAll(await open(), clients, "first connect");
    await closeAll();
    if (server.target !== "chat") {
      const warm = await phase();
      return { ...config, warm, otherCpu: warm.otherCpu };
    }
    await server.restart(() => seed(server.dbFile!, config));
    const cold = await phase();
    await closeAll();
    const warm = await phase();
    return { ...config, cold, warm, coldOverWarm: cold.serverUsPerClient / warm.serverUsPerClient, otherCpu: Math.max(cold.otherCpu, warm.otherCpu) };
  });
}

type Phase = Awaited<ReturnType<typeof storm>>;

/** Every client reconnects with since, at once (bounded handshakes): wall time to the last recovery, server CPU. */
async function storm(server: Server, workers: Worker[], reconnect: () => Promise<OpenResult[]>, clients: number) {
  const pid = server.proc.pid;
  const others = watchOthers([pid, process.pid, ...workers.map((w) => w.pid)]);
  const cpu0 = cpuPreciseMs(pid);
  const main0 = mainThreadMs(pid);
  const t0 = performance.now();
  const results = await reconnect();
  const ms = performance.now() - t0;
  const cpuAtLast = cpuPreciseMs(pid);
  await Bun.sleep(SETTLE_MS);
  const cpu1 = cpuPreciseMs(pid);
  const main1 = mainThreadMs(pid);
  assertAll(results, clients, "reconnect");
  const opened = results.reduce((n, r) => n + r.opened, 0);
  return {
    ms,
    opened,
    perSec: (opened / ms) * 1000,
    serverCpuMs: cpu1 - cpu0,
    /** server CPU per client, the last presence_diffs included */
    serverUsPerClient: ((cpu1 - cpu0) * 1000) / opened,
    /** the same, up to the last client's recovery */
    serverUsPerClientAtLast: ((cpuAtLast - cpu0) * 1000) / opened,
    /** of serverUsPerClient, the main thread's (the rest: JIT compiler threads, the collector's helpers, the checkpointer) */
    mainThreadUsPerClient: ((main1 - main0) * 1000) / opened,
    p50Us: Math.max(...results.map((r) => r.latency.p50Us)),
    p99Us: Math.max(...results.map((r) => r.latency.p99Us)),
    maxUs: Math.max(...results.map((r) => r.latency.maxUs)),
    historyBytesPerClient: results.reduce((n, r) => n + r.historyBytes, 0) / opened,
    otherCpu: others(),
  };
}

function assertAll(results: OpenResult[], clients: number, what: string) {
  const opened = results.reduce((n, r) => n + r.opened, 0);
  if (opened < clients) throw new Error(`${what}: ${clients - opened} of ${clients} clients failed; first error: ${results.find((r) => r.firstError)?.firstError}`);
}

/** On-CPU time of a process's main thread (the event loop) in ms (schedstat); NaN when unreadable. */
function mainThreadMs(pid: number): number {
  try {
    return Number(readFileSync(`/proc/${pid}/task/${pid}/schedstat`, "utf8").split(" ")[0]) / 1e6;
  } catch {
    return NaN;
  }
}

/** Waits (at most 10 s) until the server used under 2 ms of CPU in 100 ms: the closes of the last phase are done. */
async function serverQuiet(pid: number) {
  const deadline = performance.now() + 10_000;
  for (let last = cpuPreciseMs(pid); performance.now() < deadline;) {
    await Bun.sleep(100);
    const now = cpuPreciseMs(pid);
    if (now - last < 2) return;
    last = now;
  }
}

/** While the server is down: `stored` messages in each room, through server.ts's own store (what was said before). */
async function seed(file: string, { rooms, stored }: Config) {
  const store = await openStore(`sqlite://${file}`);
  try {
    const user = { id: "uwriter", name: "writer" };
    for (let g = 0; g < rooms; g++) {
      await store.append(Array.from({ length: stored }, (_, k) => ({ room: `g${g}`, user, text: `${k + 1} ${TEXT}`, ts: Date.now() })));
    }
  } finally {
    await store.close();
  }
}
