// The cluster benchmark: 3 nodes of ours (server.ts over one Redis and one Postgres) against 3 nodes of
// Socket.IO 4 with @socket.io/redis-adapter over the same Redis (bench/socketio-server.mjs, on Node),
// through the same load client (bench/load.ts speaks both protocols over bench/ws-client.ts), clients
// spread evenly over the nodes (connection i on node i % 3).
//
//   bun bench/cluster.ts [--quick] [--scenario flood,rate,rate-single] [--target chat,socket.io] [--reps N]
//                        [--duration S] [--warmup S] [--clients N] [--rate N] [--window W] [--out FILE] [--table]
//
// The system under test (every node, Redis, Postgres) is pinned to core 0, the load client and this
// coordinator to core 1. Each repetition is one JSON line in bench/results/cluster.jsonl, with the CPU of
// each component from /proc/<pid>/task/*/schedstat; --table prints the table of the latest run.
import { readdirSync, readFileSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { RedisClient, SQL } from "bun";
import { PG_BIN, startPostgres, startRedis } from "../test/services.ts";
import { appendLine, attemptNote, attempts, cpuPreciseMs, Histogram, machineBusyMs, median, pinned, shaOf, spawnReady, waitQuiet, type Child } from "./lib.ts";
import { BENCH_LIMITS_ENV, serverEnv, sessions, withWorkers } from "./workers.ts";

const ROOT = join(import.meta.dir, "..");
const HOST = "127.0.0.1";
const TARGETS = ["chat", "socket.io"] as const;
type Target = (typeof TARGETS)[number];
const SCENARIOS = ["flood", "rate", "rate-single"] as const;
type Scenario = (typeof SCENARIOS)[number];

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
    clients: { type: "string" },
    rate: { type: "string" },
    window: { type: "string" },
    nodes: { type: "string" },
    out: { type: "string" },
    table: { type: "boolean", default: false },
    run: { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
});
const HELP = `Usage: bun bench/cluster.ts [--quick] [--scenario ${SCENARIOS.join("|")}[,…]] [--target ${TARGETS.join("|")}[,…]] [--reps N]
                            [--duration S] [--warmup S] [--clients N] [--rate N] [--window W] [--nodes N] [--out FILE] [--table [--run ID]]`;
if (flags.help) {
  console.log(HELP);
  process.exit(0);
}
const OUT = flags.out ?? join(ROOT, "bench", "results", "cluster.jsonl");
if (flags.table) {
  printTable(OUT, flags.run);
  process.exit(0);
}

const QUICK = flags.quick!;
const CONFIG = {
  nodes: Number(flags.nodes ?? 3),
  clients: Number(flags.clients ?? (QUICK ? 12 : 64)),
  reps: Number(flags.reps ?? (QUICK ? 1 : 3)),
  /** flood: seconds measured after seconds of the same traffic */
  flood: { warmup: Number(flags.warmup ?? (QUICK ? 0.5 : 2)), seconds: Number(flags.duration ?? (QUICK ? 1 : 5)) },
  /** fixed rate: longer, for the JIT (see bench/README.md, rate-64) */
  rate: { warmup: Number(flags.warmup ?? (QUICK ? 0.5 : 15)), seconds: Number(flags.duration ?? (QUICK ? 1 : 10)) },
  /** messages per second in total, sent from the clients on node 0 (every `nodes`-th connection) */
  perSecond: Number(flags.rate ?? (QUICK ? 200 : 1000)),
  /** own messages in flight per flooding client: 1024 in total by default */
  window: flags.window === undefined ? null : Number(flags.window),
  inFlight: 1024,
  maxOtherCpu: 0.2,
  retries: QUICK ? 0 : 2,
  quietWaitMs: QUICK ? 0 : 30_000,
  /** Postgres as SQLite runs in the single-process bench: WAL fsynced by its writer, a commit not waiting for it */
  postgres: { fsync: "on", synchronous_commit: "off" },
};
const selected = (flags.scenario ? flags.scenario.split(",") : [...SCENARIOS]) as Scenario[];
const targets = (flags.target ? flags.target.split(",") : [...TARGETS]) as Target[];
for (const s of selected) if (!SCENARIOS.includes(s)) fail(`Cannot parse --scenario ${s}: expected one of ${SCENARIOS.join(", ")}`);
for (const t of targets) if (!TARGETS.includes(t)) fail(`Cannot parse --target ${t}: expected one of ${TARGETS.join(", ")}`);
for (const [name, v] of [["nodes", CONFIG.nodes], ["clients", CONFIG.clients], ["reps", CONFIG.reps], ["rate", CONFIG.perSecond], ["window", CONFIG.window ?? 1]] as const) {
  if (!(v > 0)) fail(`Cannot parse --${name}: expected a positive number`);
}

function fail(message: string): never {
  console.error(message);
  process.exit(2);
}

const CORES = os.availableParallelism();
const SUT_CPU = CORES >= 2 ? 0 : null;
const CLIENT_CPU = CORES >= 2 ? 1 : null;
const RUN_ID = new Date().toISOString();
const SERVER_FLAGS = (process.env.BENCH_SERVER_FLAGS ?? "").split(" ").filter(Boolean);
/** Our nodes' environment: RUNTIME_ENV, then BENCH_SERVER_ENV (bench/workers.ts) */
const SERVER_ENV = serverEnv();
const WORKER_FLAGS = (process.env.BENCH_WORKER_FLAGS ?? "").split(" ").filter(Boolean);

function pinSelf(cpu: number | null) {
  if (cpu !== null) Bun.spawnSync(["taskset", "-a", "-p", "-c", String(cpu), String(process.pid)], { stdout: "ignore" });
}

function version(cmd: string[]): string | null {
  try {
    return Bun.spawnSync(cmd).stdout.toString().trim().split("\n")[0];
  } catch {
    return null;
  }
}

function packageVersion(name: string): string {
  return JSON.parse(readFileSync(join(ROOT, "node_modules", name, "package.json"), "utf8")).version;
}

// ── The shared services: one Redis and one Postgres, pinned with the nodes (children inherit the affinity) ──

pinSelf(SUT_CPU);
const [redis, pg] = await Promise.all([startRedis(), startPostgres(CONFIG.postgres)]);
pinSelf(CLIENT_CPU);
const cleanup = async () => {
  await redis[Symbol.asyncDispose]();
  await pg[Symbol.asyncDispose]();
};
process.on("SIGINT", () => void cleanup().then(() => process.exit(130)));

const MACHINE = {
  cores: CORES,
  cpu: os.cpus()[0]?.model ?? "unknown",
  memGiB: Math.round(os.totalmem() / 2 ** 30),
  kernel: os.release(),
  bun: Bun.version,
  node: version(["node", "--version"]),
  redis: version(["redis-server", "--version"]),
  postgres: version([join(PG_BIN!, "postgres"), "--version"]),
  socketIo: packageVersion("socket.io"),
  redisAdapter: packageVersion("@socket.io/redis-adapter"),
  pinning: SUT_CPU === null ? "none (1 core)" : `nodes, redis and postgres cpu ${SUT_CPU}; load client cpu ${CLIENT_CPU}`,
};

// ── Nodes ──

type Node = Child & { url: string };
type Cluster = { target: Target; nodes: Node[]; databaseUrl?: string; stop: () => Promise<void> };

/** `count` nodes of a target over the shared Redis (ours: and a fresh Postgres database; alone: no Redis). */
async function startCluster(target: Target, count: number): Promise<Cluster> {
  const client = new RedisClient(redis.url);
  await client.send("FLUSHALL", []);
  client.close();
  const env: Record<string, string> = { PORT: "0", HOST };
  let databaseUrl: string | undefined;
  let cmd: string[];
  if (target === "chat") {
    databaseUrl = await pg.createDatabase();
    Object.assign(env, BENCH_LIMITS_ENV, SERVER_ENV, { DATABASE_URL: databaseUrl });
    if (count > 1) env.REDIS_URL = redis.url;
    cmd = [process.execPath, ...SERVER_FLAGS, join(ROOT, "server.ts")];
  } else {
    env.REDIS_URL = redis.url;
    cmd = ["node", join(ROOT, "bench", "socketio-server.mjs")];
  }
  const nodes: Node[] = [];
  const stop = async () => void (await Promise.all(nodes.map((n) => n.stop())));
  try {
    // one after the other: the first creates the schema
    for (let i = 1; i <= count; i++) {
      const child = await spawnReady(pinned(SUT_CPU, cmd), { env: { ...env, NODE_ID: `node${i}` }, cwd: ROOT });
      nodes.push({ ...child, url: `http://${HOST}:${child.port}` });
    }
  } catch (error) {
    await stop();
    throw error;
  }
  return { target, nodes, databaseUrl, stop };
}

/** Transactions committed so far in our nodes' database (NaN for Socket.IO, which stores nothing). */
async function pgCommits(cluster: Cluster): Promise<number> {
  if (cluster.target !== "chat") return NaN;
  const sql = new SQL(cluster.databaseUrl!);
  try {
    const [row] = await sql`SELECT pg_stat_force_next_flush(), xact_commit FROM pg_stat_database WHERE datname = current_database()`;
    return Number(row.xact_commit);
  } finally {
    await sql.close();
  }
}

/** Per node of ours, from /metrics: messages heard from other nodes, and gaps filled from Postgres (out-of-order arrivals). */
async function nodeCounters(cluster: Cluster) {
  const wanted = ["chat_messages_published_total", "chat_fanout_received_total", "chat_gaps_filled_total"];
  return Promise.all(cluster.nodes.map(async (n) => {
    const text = await (await fetch(`${n.url}/metrics`)).text();
    return Object.fromEntries(wanted.map((name) => [name, Number(new RegExp(`^${name}(?:{[^}]*})? (\\S+)$`, "m").exec(text)?.[1] ?? NaN)]));
  }));
}

// ── CPU per component, from /proc/<pid>/stat ──

/** A process and all its descendants (Postgres's backends are its postmaster's children). */
function tree(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)]);
    } catch {} // gone meanwhile
  }
  const all: number[] = [];
  const walk = (pid: number) => {
    all.push(pid);
    for (const child of children.get(pid) ?? []) walk(child);
  };
  walk(root);
  return all;
}

type Components = Record<string, number[]>;

function components(cluster: Cluster, clientPid: number): Components {
  const parts: Components = {};
  cluster.nodes.forEach((n, i) => (parts[`node${i + 1}`] = [n.proc.pid]));
  if (cluster.target !== "chat" || cluster.nodes.length > 1) parts.redis = [redis.pid];
  if (cluster.target === "chat") parts.postgres = tree(pg.pid);
  parts.client = [clientPid];
  return parts;
}

/** ms on CPU of each process of each component (all threads, ns resolution; NaN when gone). */
function cpuOf(parts: Components): Record<string, number[]> {
  return Object.fromEntries(Object.entries(parts).map(([name, pids]) => [name, pids.map(cpuPreciseMs)]));
}

/** ms each component used between two readings; a process that ended meanwhile (an autovacuum worker) counts 0. */
function cpuBetween(before: Record<string, number[]>, after: Record<string, number[]>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const name of Object.keys(before)) out[name] = before[name].reduce((ms, t0, i) => ms + (Number.isFinite(t0 + after[name][i]) ? after[name][i] - t0 : 0), 0);
  return out;
}

// ── One measurement: flood or fixed rate through the cluster ──

type Traffic = { mode: "flood" | "rate"; warmup: number; seconds: number };

async function traffic(cluster: Cluster, t: Traffic) {
  const clients = CONFIG.clients;
  const cookies = cluster.target === "chat" ? await sessions(cluster.nodes[0].url, clients) : [""];
  const window = CONFIG.window ?? Math.max(1, Math.floor(CONFIG.inFlight / clients));
  const nodes = cluster.nodes.length;
  return withWorkers(1, CLIENT_CPU, WORKER_FLAGS, async ([w]) => {
    const ports = cluster.nodes.map((n) => n.port);
    const protocol = cluster.target === "chat" ? "chat" : "socket.io";
    const opened = await w.call("open", { host: HOST, port: ports[0], ports, protocol, cookies, firstId: 0, count: clients, rooms: ["bench"], groups: 1, concurrency: 16, timeoutMs: 60_000 });
    if (opened.failed > 0) throw new Error(`open: ${opened.failed} connections failed; first error: ${opened.firstError}`);
    // at a fixed rate only node 0's clients send (every `nodes`-th connection), also when the cluster is one node
    await w.call("start", { mode: t.mode, window, rate: CONFIG.perSecond, senders: clients, sendEvery: CONFIG.nodes });
    await Bun.sleep(t.warmup * 1000);
    const parts = components(cluster, w.pid);
    const commits0 = await pgCommits(cluster);
    const cpu0 = cpuOf(parts);
    const busy0 = machineBusyMs() - cpuPreciseMs(process.pid);
    await w.call("markStart");
    await Bun.sleep(t.seconds * 1000);
    const mark = await w.call("markEnd");
    const used = cpuBetween(cpu0, cpuOf(parts));
    // the machine's busy time less ours: what other processes took (clock ticks, so ±10 ms)
    const otherCpu = Math.max(0, machineBusyMs() - cpuPreciseMs(process.pid) - busy0 - Object.values(used).reduce((a, b) => a + b, 0)) / mark.ms;
    const commits = (await pgCommits(cluster)) - commits0;
    const end = await w.call("stop", { expectAll: true, drainMs: 20_000 }, 60_000);
    const hist = new Histogram();
    hist.merge(mark.hist);
    const cross = new Histogram();
    cross.merge(mark.crossHist);
    const sent = new Map<number, number>(end.sent);
    let totalSent = 0;
    for (const n of sent.values()) totalSent += n;
    let lost = 0;
    for (const row of end.got as number[][]) for (let s = 0; s < row.length; s++) lost += Math.max(0, (sent.get(s) ?? 0) - row[s]);
    lost += end.gaps;
    const cpu: Record<string, number> = {};
    for (const name of Object.keys(used)) cpu[name] = used[name] / mark.ms; // cores
    const { p50Us, p99Us, maxUs, meanUs } = hist.summary();
    const c = cross.summary();
    return {
      nodes, clients, ...(t.mode === "flood" ? { window } : { offeredPerSecond: CONFIG.perSecond, offeredCopiesPerSec: CONFIG.perSecond * clients, senders: Math.ceil(clients / CONFIG.nodes) }),
      copiesPerSec: (mark.copies / mark.ms) * 1000,
      p50Us, p99Us, maxUs, meanUs,
      crossP50Us: c.p50Us, crossP99Us: c.p99Us, crossMaxUs: c.maxUs, crossSamples: c.count,
      samples: hist.count,
      slowest100msPerSec: Math.min(...mark.timeline) * 10,
      p99PerSecondUs: mark.p99PerSecondUs,
      sent: totalSent, expectedCopies: totalSent * clients, copies: end.copies, lost, dups: end.dups,
      errorFrames: end.errorFrames, unexpectedCloses: end.unexpectedCloses, firstError: end.firstError,
      /** Postgres transactions committed in our database during the window (its statistics lag by up to 1 s), per message sent */
      pgCommitsPerSec: (commits / mark.ms) * 1000,
      messagesPerCommit: mark.copies / clients / commits,
      /** cores used by each component during the measured window */
      cpu,
      sutCpu: Object.entries(cpu).reduce((n, [k, v]) => n + (k === "client" ? 0 : v), 0),
      otherCpu,
    };
  });
}

// ── Main ──

function brief(m: Record<string, any>): string {
  const f = (x: number, d = 0) => (Number.isFinite(x) ? x.toFixed(d) : "–");
  const cpu = Object.entries(m.cpu as Record<string, number>).map(([k, v]) => `${k} ${f(v * 100)}%`).join(", ");
  return `${f(m.copiesPerSec)} copies/s, p50 ${f(m.p50Us / 1000, 2)} ms, p99 ${f(m.p99Us / 1000, 2)} ms (cross-node ${f(m.crossP50Us / 1000, 2)} / ${f(m.crossP99Us / 1000, 2)} ms), lost ${m.lost}, dups ${m.dups}${m.nodesDown ? `, ${m.nodesDown} node(s) died: ${m.nodeErrors[0]}` : ""}; cpu: ${cpu}`;
}

const plan: { scenario: Scenario; target: Target }[] = [];
for (const scenario of selected) for (const target of targets) if (!(scenario === "rate-single" && target !== "chat")) plan.push({ scenario, target });

console.log(`cluster bench ${RUN_ID}: ${plan.map((p) => `${p.scenario}×${p.target}`).join(", ")}, ${CONFIG.reps} rep(s), ${CONFIG.clients} clients; ${MACHINE.pinning}; results → ${OUT}`);
let failures = 0;
const budget = { retries: QUICK ? 0 : 8 };
try {
  for (let rep = 1; rep <= CONFIG.reps; rep++) {
    // alternating within a repetition, so a slow spell of the machine hits both
    for (const { scenario, target } of plan) {
      let cluster = null as Cluster | null; // the last attempt's, for its nodes' lines when it failed
      const failed = await attempts({
        maxOtherCpu: CONFIG.maxOtherCpu, retries: CONFIG.retries, budget,
        quiet: async () => (CONFIG.quietWaitMs ? await waitQuiet(CONFIG.maxOtherCpu, CONFIG.quietWaitMs) : 0),
        measure: async () => {
          cluster = null;
          try {
            cluster = await startCluster(target, scenario === "rate-single" ? 1 : CONFIG.nodes);
            if (process.env.BENCH_VERBOSE) console.log(`${target} node pids ${cluster.nodes.map((n) => n.proc.pid).join(" ")}, redis ${redis.pid}, postgres ${pg.pid}`);
            const metrics: Record<string, any> = await traffic(cluster, { mode: scenario === "flood" ? "flood" : "rate", ...(scenario === "flood" ? CONFIG.flood : CONFIG.rate) });
            // a node that died under the load is part of the result, not a failure of the bench
            const down = cluster.nodes.filter((n) => n.proc.exitCode !== null || n.proc.signalCode !== null);
            metrics.nodesDown = down.length;
            if (target === "chat") metrics.nodeCounters = await nodeCounters(cluster);
            metrics.nodeErrors = down.map((n) => n.lines.filter((l) => l.startsWith("stderr:")).slice(0, 8).join("\n"));
            return metrics;
          } finally {
            await cluster?.stop();
          }
        },
        done: (a) => {
          const { metrics, error, seconds } = a;
          appendLine(OUT, { runId: RUN_ID, date: new Date().toISOString(), scenario, target, rep, ...a, serverSha: target === "chat" ? shaOf(join(ROOT, "server.ts")) : undefined, serverEnv: target === "chat" ? SERVER_ENV : undefined, quick: QUICK, machine: MACHINE, config: CONFIG });
          console.log(`${scenario.padEnd(11)} ${target.padEnd(9)} rep ${rep}: ${error ? `FAILED: ${error}` : brief(metrics!)} (${seconds.toFixed(1)} s, others ${metrics ? Number(metrics.otherCpu).toFixed(2) : "–"} cores)${attemptNote(a)}`);
          if (error && cluster) for (const n of cluster.nodes) console.log(n.lines.slice(-10).join("\n"));
          if (process.env.BENCH_VERBOSE && metrics) console.log(`  p99 of each second: ${(metrics.p99PerSecondUs as number[]).map((us) => (us / 1000).toFixed(1)).join(" ")} ms`);
        },
      });
      if (failed) failures++;
    }
  }
} finally {
  await cleanup();
}
console.log(`done${failures ? `, ${failures} failed` : ""}; table: bun bench/cluster.ts --table${flags.out ? ` --out ${OUT}` : ""}`);
process.exit(failures ? 1 : 0);

// ── The table of the latest run ──

function printTable(file: string, wanted?: string) {
  const lines = readFileSync(file, "utf8").trim().split("\n").map((l) => JSON.parse(l));
  const runId = wanted ?? lines.at(-1).runId;
  const run = lines.filter((l) => l.runId === runId && l.metrics && !l.retried);
  const of = (scenario: string, target: string) => run.filter((l) => l.scenario === scenario && l.target === target).map((l) => l.metrics);
  const med = (ms: any[], key: string) => median(ms.map((m) => m[key]));
  const star = (scenario: string, target: string) => (run.some((l) => l.scenario === scenario && l.target === target && l.contended) ? "*" : "");
  const fm = (x: number) => (Number.isFinite(x) ? `${(x / 1e6).toFixed(2)}M` : "–");
  const ms = (us: number) => (Number.isFinite(us) ? `${(us / 1000).toFixed(2)} ms` : "–");
  const cfg = run[0]?.config;
  console.log(`| cluster, ${cfg?.clients} clients in one room over ${cfg?.nodes} nodes (run ${runId}) | ours | Socket.IO | ours / Socket.IO |`);
  console.log("| --- | ---: | ---: | ---: |");
  const [fo, fs] = [of("flood", "chat"), of("flood", "socket.io")];
  console.log(`| flood: copies/s | ${fm(med(fo, "copiesPerSec"))}${star("flood", "chat")} | ${fm(med(fs, "copiesPerSec"))}${star("flood", "socket.io")} | ${(med(fo, "copiesPerSec") / med(fs, "copiesPerSec")).toFixed(2)}× |`);
  console.log(`| flood: p50 / p99 | ${ms(med(fo, "p50Us"))} / ${ms(med(fo, "p99Us"))} | ${ms(med(fs, "p50Us"))} / ${ms(med(fs, "p99Us"))} | |`);
  const [ro, rs, single] = [of("rate", "chat"), of("rate", "socket.io"), of("rate-single", "chat")];
  const rate = ro[0] ?? rs[0] ?? single[0];
  if (rate) {
    const label = `fixed rate, ${rate.offeredPerSecond} msg/s from node 1's ${rate.senders} clients`;
    console.log(`| ${label}: cross-node p50 / p99 | ${ms(med(ro, "crossP50Us"))} / ${ms(med(ro, "crossP99Us"))}${star("rate", "chat")} | ${ms(med(rs, "crossP50Us"))} / ${ms(med(rs, "crossP99Us"))}${star("rate", "socket.io")} | |`);
    console.log(`| ${label}: single node p50 / p99 | ${ms(med(single, "p50Us"))} / ${ms(med(single, "p99Us"))}${star("rate-single", "chat")} | | cross / single p99: ${(med(ro, "crossP99Us") / med(single, "p99Us")).toFixed(2)}× |`);
  }
  const lost = run.reduce((n, l) => n + l.metrics.lost, 0);
  console.log(`\nlost copies over the run: ${lost}; repetitions: ${run.length}`);
  console.log("\nCPU per component (% of one core, median over repetitions):");
  for (const [scenario, target] of [["flood", "chat"], ["flood", "socket.io"], ["rate", "chat"], ["rate", "socket.io"], ["rate-single", "chat"]]) {
    const ms2 = of(scenario, target);
    if (!ms2.length) continue;
    const names = Object.keys(ms2[0].cpu);
    console.log(`- ${scenario} ${target}: ${names.map((n) => `${n} ${(median(ms2.map((m) => m.cpu[n])) * 100).toFixed(1)}%`).join(", ")}`);
  }
}
