// The benchmark: our server (server.ts) against raw Bun pub/sub and Node + ws, through the same load
// client (bench/load.ts on bench/ws-client.ts), on loopback, server and client pinned to different cores.
//
//   bun bench/run.ts [--quick] [--scenario NAME[,NAME…]] [--target chat,raw-bun,node-ws,floor] [--reps N]
//                    [--duration S] [--warmup S] [--window W] [--out FILE]
//
// Every scenario starts a fresh server per repetition (ours with a fresh temp SQLite file), and every
// repetition is appended as one JSON line to bench/results/results.jsonl; bench/table.ts prints the
// table of the latest run.
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { appendLine, attemptNote, attempts, cpuPreciseMs, cpuTimes, Histogram, median, pinned, rssKiB, shaOf, spawnReady, waitQuiet, watchOthers, type Child } from "./lib.ts";
import { restartStorm } from "./storm.ts";
import { BENCH_LIMITS_ENV, serverEnv, sessions, withWorkers as runWorkers, type Worker } from "./workers.ts";

const ROOT = join(import.meta.dir, "..");
const HOST = "127.0.0.1";
const TARGETS = ["chat", "raw-bun", "node-ws", "floor"] as const;
/** the old protocol's floor (bench/floor.ts) runs only where asked, and in the restart storm */
const DEFAULT_TARGETS: Target[] = ["chat", "raw-bun", "node-ws"];
type Target = (typeof TARGETS)[number];

// ── Configuration ──

const { values: flags } = parseArgs({
  args: Bun.argv.slice(2),
  options: {
    quick: { type: "boolean", default: false },
    scenario: { type: "string" },
    target: { type: "string" },
    reps: { type: "string" },
    duration: { type: "string" },
    warmup: { type: "string" },
    window: { type: "string" },
    out: { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
});

const QUICK = flags.quick!;
const CONFIG = {
  reps: Number(flags.reps ?? (QUICK ? 1 : 3)),
  /** seconds measured per flood repetition, after `warmup` seconds of the same traffic */
  duration: Number(flags.duration ?? (QUICK ? 1 : 5)),
  warmup: Number(flags.warmup ?? (QUICK ? 0.3 : 1)),
  /** own messages in flight per flooding client: by default 1024 in total (64 each for 16 clients, 4 for 256) */
  window: flags.window === undefined ? null : Number(flags.window),
  inFlight: 1024,
  floodClients: QUICK ? [8] : [16, 64, 256],
  /** fixed rate is measured longer after a longer warm-up: the JIT compiles the hot path during the first
   * ~8 s (on the server's one core) and again after the first WAL rewind (~8.5 s: its retry path
   * deoptimizes the store), until ~20 s; 10 s then hold one rewind; and 5 times, since one window's p99
   * swings between runs far more than a throughput does */
  rate: QUICK ? { clients: 8, perSecond: 400, warmup: 0.3, seconds: 1, reps: 1 } : { clients: 64, perSecond: 2500, warmup: 20, seconds: 10, reps: 5 },
  /** idle sockets (below `ulimit -n` of one server process, with headroom), split over client processes */
  idle: QUICK ? { sockets: 200, procs: 2, socketsPerUser: 20, groups: 10, broadcasts: 3 } : { sockets: 18_000, procs: 2, socketsPerUser: 100, groups: 100, broadcasts: 5 },
  storm: QUICK ? { joins: 200, users: 10, concurrency: 50, history: 60 } : { joins: 10_000, users: 100, concurrency: 100, history: 200 },
  /** restart storm: clients (one user each) in rooms of clients / rooms, `stored` messages per room, reconnecting
   * with since = stored − missed, at most `concurrency` handshakes in flight (over all client processes) */
  restartStorm: QUICK ? { clients: 400, rooms: 4, stored: 40, missed: 20, procs: 2, concurrency: 40 } : { clients: 10_000, rooms: 100, stored: 40, missed: 20, procs: 2, concurrency: 100 },
  /** mixed flood: an edit or reaction after every changeEvery-th say (1 frame in changeEvery + 1), a read every readMs
   * (Chat's read limit is 30 per 10 s per user) */
  mixed: { changeEvery: 9, readMs: 400 },
  /** a repetition during which other processes used more than this many cores is repeated */
  maxOtherCpu: 0.2,
  retries: QUICK ? 0 : 2,
  /** before each repetition, wait (at most this long, and this long over the whole run) for other processes to go quiet */
  quietWaitMs: QUICK ? 0 : 30_000,
  quietBudgetMs: QUICK ? 0 : 240_000,
  /** repetitions repeated over the whole run, at most */
  retryBudget: QUICK ? 0 : 12,
  recovery: QUICK ? { missed: 500, stored: 600, reps: 20 } : { missed: 500, stored: 1000, reps: 1000 },
};
const MIXED_CLIENTS = QUICK ? 8 : 64;
const SCENARIOS = [...CONFIG.floodClients.map((n) => `flood-${n}`), `mixed-${MIXED_CLIENTS}`, `rate-${CONFIG.rate.clients}`, "idle", "storm", "recovery", "restart-storm"];
const HELP = `Usage: bun bench/run.ts [--quick] [--scenario ${SCENARIOS.join("|")}[,…]] [--target ${TARGETS.join("|")}[,…]]
                        [--reps N] [--duration S] [--warmup S] [--window W] [--out FILE]`;
if (flags.help) {
  console.log(HELP);
  process.exit(0);
}
const selected = flags.scenario ? flags.scenario.split(",") : SCENARIOS;
for (const s of selected) {
  if (!SCENARIOS.includes(s)) {
    console.error(`Cannot parse --scenario ${s}: expected one of ${SCENARIOS.join(", ")}`);
    process.exit(2);
  }
}
const targets = (flags.target ? flags.target.split(",") : [...DEFAULT_TARGETS]) as Target[];
for (const t of targets) {
  if (!TARGETS.includes(t)) {
    console.error(`Cannot parse --target ${t}: expected one of ${TARGETS.join(", ")}`);
    process.exit(2);
  }
}
for (const [name, value] of [["reps", CONFIG.reps], ["duration", CONFIG.duration], ["window", CONFIG.window ?? 1]] as const) {
  if (!(value > 0)) {
    console.error(`Cannot parse --${name}: expected a positive number`);
    process.exit(2);
  }
}
if (!(CONFIG.warmup >= 0)) {
  console.error("Cannot parse --warmup: expected a number of seconds, 0 or more");
  process.exit(2);
}
const OUT = flags.out ?? join(ROOT, "bench", "results", "results.jsonl");

// Pinning: server on core 0, load client (and this coordinator) on core 1.
const CORES = os.availableParallelism();
const SERVER_CPU = CORES >= 2 ? 0 : null;
const CLIENT_CPU = CORES >= 2 ? 1 : null;
if (CLIENT_CPU !== null) Bun.spawnSync(["taskset", "-a", "-p", "-c", String(CLIENT_CPU), String(process.pid)], { stdout: "ignore" });

const NODE_VERSION = (() => {
  try {
    return Bun.spawnSync(["node", "--version"]).stdout.toString().trim();
  } catch {
    return null;
  }
})();
const MACHINE = {
  cores: CORES,
  cpu: os.cpus()[0]?.model ?? "unknown",
  memGiB: Math.round(os.totalmem() / 2 ** 30),
  kernel: os.release(),
  bun: Bun.version,
  node: NODE_VERSION,
  ulimitN: Number(Bun.spawnSync(["sh", "-c", "ulimit -n"]).stdout.toString().trim()),
  pinning: SERVER_CPU === null ? "none (1 core)" : `server cpu ${SERVER_CPU}, client cpu ${CLIENT_CPU}`,
};
const RUN_ID = new Date().toISOString();
/** Extra `bun` flags for profiling, e.g. BENCH_SERVER_FLAGS="--cpu-prof-md --cpu-prof-dir=/tmp/prof" */
const SERVER_FLAGS = (process.env.BENCH_SERVER_FLAGS ?? "").split(" ").filter(Boolean);
/** Our server's environment: RUNTIME_ENV, then BENCH_SERVER_ENV="K=V …" (ours alone, not the load client's) */
const SERVER_ENV = serverEnv();
const WORKER_FLAGS = (process.env.BENCH_WORKER_FLAGS ?? "").split(" ").filter(Boolean);
/** Where our server's SQLite file goes (a fresh folder per repetition); BENCH_DB_DIR=/dev/shm takes the disk out */
const DB_DIR = process.env.BENCH_DB_DIR ?? os.tmpdir();
/** Our server: server.ts here, or another version's (BENCH_SERVER=/tmp/old/server.ts, a `git worktree` of an old commit) */
const SERVER_TS = process.env.BENCH_SERVER ?? join(ROOT, "server.ts");

// ── Servers ──

/** A server under test; `restart` stops it and starts it again (ours: on the same SQLite file, `dbFile`), `between` run
 * while it is down. */
export type Server = Child & { target: Target; url: string; cleanup: () => void; dbFile?: string; restart: (between?: () => Promise<void>) => Promise<void> };

async function startTarget(target: Target): Promise<Server> {
  const env: Record<string, string> = { PORT: "0", HOST };
  let cmd: string[];
  let cleanup = () => {};
  let dbFile: string | undefined;
  if (target === "chat") {
    const dir = mkdtempSync(join(DB_DIR, "chat-bench-"));
    cleanup = () => rmSync(dir, { recursive: true, force: true });
    dbFile = join(dir, "chat.db");
    Object.assign(env, {
      DATABASE_URL: `sqlite://${dbFile}`,
      ...BENCH_LIMITS_ENV, // every bench client is one of many users on one loopback address
      ...SERVER_ENV,
    });
    cmd = [process.execPath, ...SERVER_FLAGS, SERVER_TS];
  } else if (target === "raw-bun" || target === "floor") {
    cmd = [process.execPath, ...SERVER_FLAGS, join(ROOT, "bench", `${target}.ts`)];
  } else {
    cmd = ["node", join(ROOT, "bench", "node-ws.mjs")];
  }
  const spawn = () => spawnReady(pinned(SERVER_CPU, cmd), { env, cwd: ROOT });
  let child = await spawn();
  const server: Server = {
    ...child, target, url: `http://${HOST}:${child.port}`, cleanup, dbFile,
    stop: async () => {
      await child.stop();
      cleanup();
    },
    restart: async (between) => {
      await child.stop();
      await between?.();
      child = await spawn();
      Object.assign(server, { proc: child.proc, port: child.port, lines: child.lines, url: `http://${HOST}:${child.port}` });
    },
  };
  return server;
}

// ── Load-client workers (bench/workers.ts) ──

export type { Worker } from "./workers.ts";

/** Runs `fn` with `count` fresh load workers on the client's core, always stopping them. */
function withWorkers<T>(count: number, fn: (workers: Worker[]) => Promise<T>): Promise<T> {
  return runWorkers(count, CLIENT_CPU, WORKER_FLAGS, fn);
}

type OpenResult = { opened: number; failed: number; ms: number; latency: { p50Us: number; p99Us: number; maxUs: number }; firstError: string | null };

function openArgs(server: Server, cookies: string[], extra: { firstId: number; count: number; rooms: string[]; groups?: number; concurrency?: number; since?: number }) {
  return { host: HOST, port: server.port, cookies, groups: 1, concurrency: 64, timeoutMs: 300_000, ...extra };
}

function assertOpened(r: OpenResult, what: string) {
  if (r.failed > 0) throw new Error(`${what}: ${r.failed} connections failed; first error: ${r.firstError}`);
}

// ── Scenarios: each runs once against a fresh server and returns its metrics ──

/** Flood or fixed rate: N clients in room "bench"; counts every copy per sender per receiver. */
async function traffic(server: Server, opts: { clients: number; mode: "flood" | "rate"; perSecond?: number; warmup: number; seconds: number; mixed?: boolean }) {
  const cookies = await sessions(server.url, opts.clients);
  const window = CONFIG.window ?? Math.max(1, Math.floor(CONFIG.inFlight / opts.clients));
  return withWorkers(1, async ([w]) => {
    assertOpened(await w.call<OpenResult>("open", openArgs(server, cookies, { firstId: 0, count: opts.clients, rooms: ["bench"] })), "open");
    await w.call("start", { mode: opts.mode, window, rate: opts.perSecond ?? 0, senders: opts.clients, mixed: opts.mixed ? CONFIG.mixed : undefined });
    await Bun.sleep(opts.warmup * 1000);
    const cpu0 = { server: cpuTimes(server.proc.pid), client: cpuTimes(w.pid) };
    const others = watchOthers([server.proc.pid, w.pid, process.pid]);
    await w.call("markStart");
    await Bun.sleep(opts.seconds * 1000);
    const mark = await w.call<{ copies: number; updates: number; ms: number; hist: any; timeline: number[]; p99PerSecondUs: number[] }>("markEnd");
    const cpu1 = { server: cpuTimes(server.proc.pid), client: cpuTimes(w.pid) };
    const otherCpu = others();
    const end = await w.call("stop", { expectAll: true, drainMs: 20_000 }, 60_000);
    const rssKiBEnd = rssKiB(server.proc.pid);
    const hist = new Histogram();
    hist.merge(mark.hist);
    const sent = new Map<number, number>(end.sent);
    let totalSent = 0;
    for (const n of sent.values()) totalSent += n;
    let lost = 0;
    for (const row of end.got as number[][]) for (let s = 0; s < row.length; s++) lost += Math.max(0, (sent.get(s) ?? 0) - row[s]);
    lost += end.gaps;
    const { p50Us, p99Us, maxUs, meanUs } = hist.summary();
    return {
      clients: opts.clients,
      ...(opts.mode === "flood" ? { window } : { offeredPerSecond: opts.perSecond, offeredCopiesPerSec: (opts.perSecond ?? 0) * opts.clients }),
      copiesPerSec: (mark.copies / mark.ms) * 1000,
      ...(opts.mixed ? { updatesPerSec: (mark.updates / mark.ms) * 1000, changesSent: end.changes, readsSent: end.readFrames } : {}),
      messagesPerSec: (mark.copies / opts.clients / mark.ms) * 1000,
      p50Us, p99Us, maxUs, meanUs,
      samples: hist.count,
      /** copies/s of the slowest and fastest 100 ms of the window: stalls show here */
      slowest100msPerSec: Math.min(...mark.timeline) * 10,
      fastest100msPerSec: Math.max(...mark.timeline) * 10,
      timeline: mark.timeline,
      p99PerSecondUs: mark.p99PerSecondUs,
      sent: totalSent,
      expectedCopies: totalSent * opts.clients,
      copies: end.copies,
      lost,
      dups: end.dups,
      errorFrames: end.errorFrames,
      unexpectedCloses: end.unexpectedCloses,
      firstError: end.firstError,
      framesPerRead: end.copies / end.reads,
      // fractions of one core during the measured window; sys = in the kernel (mostly TCP)
      serverCpu: (cpu1.server.user + cpu1.server.sys - cpu0.server.user - cpu0.server.sys) / mark.ms,
      serverSys: (cpu1.server.sys - cpu0.server.sys) / mark.ms,
      clientCpu: (cpu1.client.user + cpu1.client.sys - cpu0.client.user - cpu0.client.sys) / mark.ms,
      clientSys: (cpu1.client.sys - cpu0.client.sys) / mark.ms,
      serverRssMiB: rssKiBEnd / 1024,
      otherCpu,
    };
  });
}

/** Idle sockets, each in "bench" and one group room: server memory per connection, one broadcast to all. */
async function idle(server: Server) {
  const { sockets, procs, socketsPerUser, groups, broadcasts } = CONFIG.idle;
  const cookies = await sessions(server.url, Math.ceil(sockets / socketsPerUser));
  await Bun.sleep(500);
  const rssBefore = rssKiB(server.proc.pid);
  const per = Math.ceil(sockets / procs);
  return withWorkers(procs, async (workers) => {
    const others = watchOthers([server.proc.pid, process.pid, ...workers.map((w) => w.pid)]);
    // Two halves: memory per connection is the slope between them, so what the server allocates once
    // (JIT code, heap warm-up, room state) is not charged to connections.
    const halves = workers.map((_, k) => {
      const count = Math.max(0, Math.min(per, sockets - k * per));
      return [Math.ceil(count / 2), count - Math.ceil(count / 2)];
    });
    const openHalf = (h: number) =>
      Promise.all(
        workers.map((w, k) => {
          const firstId = k * per + (h === 0 ? 0 : halves[k][0]);
          return w.call<OpenResult>("open", openArgs(server, cookies, { firstId, count: halves[k][h], rooms: ["bench", "{g}"], groups, concurrency: 100 }), 320_000);
        }),
      );
    const t0 = performance.now();
    const first = await openHalf(0);
    await Bun.sleep(1500); // let the server settle (GC, buffers)
    const rssHalf = rssKiB(server.proc.pid);
    const second = await openHalf(1);
    const openMs = performance.now() - t0;
    const opened = workers.map((_, k) => ({ opened: first[k].opened + second[k].opened, firstError: first[k].firstError ?? second[k].firstError }));
    const ok = opened.reduce((n, r) => n + r.opened, 0);
    const okSecond = second.reduce((n, r) => n + r.opened, 0);
    await Bun.sleep(2000);
    const rssAfter = rssKiB(server.proc.pid);
    const times: number[] = [];
    const serverMs: number[] = [];
    let reached = Infinity;
    for (let k = 0; k < broadcasts; k++) {
      const cpu0 = cpuPreciseMs(server.proc.pid);
      const { sendUs } = await workers[0].call<{ sendUs: number }>("broadcast", { k });
      const got = await Promise.all(workers.map((w, i) => w.call("awaitBroadcast", { k, expected: opened[i].opened, timeoutMs: 30_000 })));
      serverMs.push(cpuPreciseMs(server.proc.pid) - cpu0);
      const count = got.reduce((n, g) => n + g.count, 0);
      reached = Math.min(reached, count);
      times.push((Math.max(...got.map((g) => g.lastUs)) - sendUs) / 1000);
      await Bun.sleep(200);
    }
    return {
      sockets,
      opened: ok,
      failed: sockets - ok,
      firstError: opened.find((r) => r.firstError)?.firstError ?? null,
      users: cookies.length,
      roomsPerSocket: 2,
      openMs,
      rssBeforeMiB: rssBefore / 1024,
      rssHalfMiB: rssHalf / 1024,
      rssAfterMiB: rssAfter / 1024,
      /** growth of server RSS from the first half of the sockets to all of them, per socket */
      kibPerConn: (rssAfter - rssHalf) / okSecond,
      /** growth from before the first socket, per socket (includes one-time costs) */
      kibPerConnFromEmpty: (rssAfter - rssBefore) / ok,
      broadcastMs: median(times),
      broadcastMsAll: times,
      /** server CPU from the send until the last socket had it (includes storing it, for ours) */
      broadcastServerMs: median(serverMs),
      broadcastReached: reached,
      broadcastLost: ok - reached,
      otherCpu: others(),
    };
  });
}

/** Many connects + joins with history at once: wall time, per-join latency, server CPU per join. */
async function storm(server: Server) {
  const { joins, users, concurrency, history } = CONFIG.storm;
  const cookies = await sessions(server.url, users);
  return withWorkers(1, async ([w]) => {
    // history to send on every join (the chat server sends the newest 50)
    assertOpened(await w.call<OpenResult>("open", openArgs(server, cookies, { firstId: 0, count: 1, rooms: ["bench"] })), "open writer");
    await w.call("populate", { count: history, window: 20, timeoutMs: 60_000 });
    const cpu0 = cpuPreciseMs(server.proc.pid);
    const others = watchOthers([server.proc.pid, w.pid, process.pid]);
    const r = await w.call<OpenResult>("open", openArgs(server, cookies, { firstId: 1, count: joins, rooms: ["bench"], concurrency }), 320_000);
    const cpu1 = cpuPreciseMs(server.proc.pid);
    const otherCpu = others();
    return {
      joins,
      ok: r.opened,
      failed: r.failed,
      firstError: r.firstError,
      concurrency,
      users,
      historyStored: history,
      ms: r.ms,
      joinsPerSec: (r.opened / r.ms) * 1000,
      serverCpuMs: cpu1 - cpu0,
      serverUsPerJoin: ((cpu1 - cpu0) * 1000) / r.opened,
      p50Us: r.latency.p50Us,
      p99Us: r.latency.p99Us,
      maxUs: r.latency.maxUs,
      otherCpu,
    };
  });
}

/** A warm connection rejoins with `since` 500 back, many times: round trip and server CPU per join. */
async function recovery(server: Server) {
  const { missed, stored, reps } = CONFIG.recovery;
  const cookies = await sessions(server.url, 2);
  return withWorkers(1, async ([w]) => {
    assertOpened(await w.call<OpenResult>("open", openArgs(server, cookies, { firstId: 0, count: 1, rooms: ["bench"] })), "open");
    await w.call("populate", { count: stored, window: 50, timeoutMs: 120_000 });
    const since = stored - missed;
    // warm-up, then measured rounds: join with since (recovery), then a plain join (history of the newest 50)
    await w.call("history", { room: "bench", since, reps: Math.min(50, reps), timeoutMs: 60_000 });
    const others = watchOthers([server.proc.pid, w.pid, process.pid]);
    let cpu0 = cpuPreciseMs(server.proc.pid);
    const rec = await w.call("history", { room: "bench", since, reps, timeoutMs: 120_000 }, 180_000);
    const recCpu = cpuPreciseMs(server.proc.pid) - cpu0;
    cpu0 = cpuPreciseMs(server.proc.pid);
    const plain = await w.call("history", { room: "bench", reps, timeoutMs: 120_000 }, 180_000);
    const plainCpu = cpuPreciseMs(server.proc.pid) - cpu0;
    const otherCpu = others();
    const valid = rec.first.messages === missed && rec.first.contiguous && rec.first.firstId === since + 1 && rec.first.lastId === stored && rec.first.complete === true;
    return {
      missed,
      reps: rec.reps,
      valid,
      historyBytes: rec.first.bytes,
      p50Us: rec.rtt.p50Us,
      p99Us: rec.rtt.p99Us,
      maxUs: rec.rtt.maxUs,
      serverUsPerJoin: (recCpu * 1000) / rec.reps,
      plainMessages: plain.first.messages,
      plainBytes: plain.first.bytes,
      plainP50Us: plain.rtt.p50Us,
      plainP99Us: plain.rtt.p99Us,
      plainServerUsPerJoin: (plainCpu * 1000) / plain.reps,
      otherCpu,
    };
  });
}

function runner(scenario: string): { targets: Target[]; run: (s: Server) => Promise<Record<string, unknown>> } {
  const flood = /^flood-(\d+)$/.exec(scenario);
  const times = { warmup: CONFIG.warmup, seconds: CONFIG.duration };
  if (flood) return { targets, run: (s) => traffic(s, { clients: Number(flood[1]), mode: "flood", ...times }) };
  // edits, reactions and reads: only our server has them; the plain flood of the same size is its baseline
  const mixed = /^mixed-(\d+)$/.exec(scenario);
  if (mixed) return { targets: targets.filter((t) => t === "chat"), run: (s) => traffic(s, { clients: Number(mixed[1]), mode: "flood", mixed: true, ...times }) };
  if (scenario === "restart-storm") {
    const stormTargets: Target[] = flags.target ? targets : ["chat", "floor", "raw-bun"];
    return { targets: stormTargets.filter((t) => t !== "node-ws"), run: (s) => restartStorm(s, CONFIG.restartStorm, { sessions, withWorkers, openArgs }) };
  }
  if (scenario.startsWith("rate-")) {
    // --warmup and --duration apply here too when given
    const { clients, perSecond, warmup, seconds } = CONFIG.rate;
    const rateTimes = { warmup: flags.warmup ? times.warmup : warmup, seconds: flags.duration ? times.seconds : seconds };
    return { targets, run: (s) => traffic(s, { clients, mode: "rate", perSecond, ...rateTimes }) };
  }
  if (scenario === "idle") return { targets, run: idle };
  if (scenario === "storm") return { targets, run: storm };
  // recovery needs stored history: only our server has it
  return { targets: targets.filter((t) => t === "chat"), run: recovery };
}

// ── Main ──

/** --reps N applies to every scenario when given */
function repsOf(scenario: string) {
  return scenario.startsWith("rate-") && !flags.reps ? CONFIG.rate.reps : CONFIG.reps;
}

function brief(m: Record<string, any>): string {
  const f = (x: number, d = 0) => (Number.isFinite(x) ? x.toFixed(d) : "–");
  if ("warm" in m) {
    const phase = (p: any) => `${f(p.ms)} ms, server ${f(p.serverUsPerClient)} µs/client (main thread ${f(p.mainThreadUsPerClient)}), p99 ${f(p.p99Us / 1000, 1)} ms, ${f(p.historyBytesPerClient)} B history`;
    return `${m.clients} clients in ${m.rooms} rooms: ${m.cold ? `cold ${phase(m.cold)}; ` : ""}warm ${phase(m.warm)}`;
  }
  if ("copiesPerSec" in m) return `${f(m.copiesPerSec)} copies/s${"updatesPerSec" in m ? ` + ${f(m.updatesPerSec)} updated/s (${m.changesSent} changes, ${m.readsSent} reads)` : ""}, p50 ${f(m.p50Us / 1000, 2)} ms, p99 ${f(m.p99Us / 1000, 2)} ms, max ${f(m.maxUs / 1000, 1)} ms, lost ${m.lost}, server cpu ${f(m.serverCpu * 100)}% (sys ${f(m.serverSys * 100)}%), client cpu ${f(m.clientCpu * 100)}% (sys ${f(m.clientSys * 100)}%)`;
  if ("kibPerConn" in m) return `${m.opened} sockets, ${f(m.kibPerConn, 2)} KiB/conn, broadcast to all ${f(m.broadcastMs, 1)} ms, lost ${m.broadcastLost}`;
  if ("joinsPerSec" in m) return `${m.ok}/${m.joins} joins in ${f(m.ms)} ms (${f(m.joinsPerSec)}/s), server ${f(m.serverUsPerJoin)} µs/join, p99 ${f(m.p99Us / 1000, 1)} ms`;
  if ("missed" in m) return `since-join ${m.missed} msgs: p50 ${f(m.p50Us)} µs, server ${f(m.serverUsPerJoin)} µs/join; plain join: p50 ${f(m.plainP50Us)} µs, server ${f(m.plainServerUsPerJoin)} µs/join; valid ${m.valid}`;
  return JSON.stringify(m);
}

console.log(`bench ${RUN_ID}: ${selected.map((s) => `${s} × ${runner(s).targets.join(", ")}`).join("; ")}, ${CONFIG.reps} rep(s) (fixed rate: ${repsOf("rate-")}); ${MACHINE.cores} cores, ${MACHINE.pinning}; results → ${OUT}`);
let failures = 0;
let quietBudget = CONFIG.quietBudgetMs;
const budget = { retries: CONFIG.retryBudget };
const started = performance.now();
for (const scenario of selected) {
  const { targets: scenarioTargets, run } = runner(scenario);
  for (let rep = 1; rep <= repsOf(scenario); rep++) {
    for (const target of scenarioTargets) {
      let server = null as Server | null; // the last attempt's, for its lines when it failed
      const failed = await attempts({
        maxOtherCpu: CONFIG.maxOtherCpu, retries: CONFIG.retries, budget,
        quiet: async () => {
          const waited = quietBudget > 0 ? await waitQuiet(CONFIG.maxOtherCpu, Math.min(CONFIG.quietWaitMs, quietBudget)) : 0;
          quietBudget -= waited;
          return waited;
        },
        measure: async () => {
          server = null;
          try {
            server = await startTarget(target);
            if (process.env.BENCH_VERBOSE) console.log(`${target} server pid ${server.proc.pid} port ${server.port}`); // e.g. to attach perf
            return await run(server);
          } finally {
            await server?.stop();
          }
        },
        done: (a) => {
          const { metrics, error, seconds } = a;
          appendLine(OUT, { runId: RUN_ID, date: new Date().toISOString(), scenario, target, rep, ...a, serverSha: target === "chat" ? shaOf(SERVER_TS) : undefined, serverEnv: target === "chat" ? SERVER_ENV : undefined, quick: QUICK, machine: MACHINE, config: CONFIG });
          const others = metrics ? `, others ${Number(metrics.otherCpu).toFixed(2)} cores` : "";
          console.log(`${scenario.padEnd(9)} ${target.padEnd(7)} rep ${rep}: ${error ? `FAILED: ${error}` : brief(metrics!)} (${seconds.toFixed(1)} s${others})${attemptNote(a)}`);
          const perSecond = metrics?.p99PerSecondUs as number[] | undefined;
          if (perSecond && process.env.BENCH_VERBOSE) console.log(`  p99 of each second: ${perSecond.map((us) => (us / 1000).toFixed(1)).join(" ")} ms`);
          if (error && server) console.log(server.lines.slice(-10).join("\n"));
        },
      });
      if (failed) failures++;
    }
  }
}
console.log(`done in ${((performance.now() - started) / 1000).toFixed(0)} s${failures ? `, ${failures} failed` : ""}; table: bun bench/table.ts${flags.out ? ` --in ${OUT}` : ""}`);
process.exit(failures ? 1 : 0);
