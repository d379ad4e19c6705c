// Prints the markdown table of the latest bench run (or --run <id>) from bench/results/results.jsonl:
// medians over repetitions with min–max, our server against raw Bun and Node + ws, and the targets.
// `--run all` pools every run in the file (e.g. bench/results/rate-runs.jsonl); `--sha` keeps only
// the runs that measured that version of server.ts (the first hex digits of `serverSha`).
//
//   bun bench/table.ts [--in FILE] [--run RUN_ID|all] [--sha HEX]
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { median } from "./lib.ts";

const { values: flags } = parseArgs({
  args: Bun.argv.slice(2),
  options: { in: { type: "string" }, run: { type: "string" }, sha: { type: "string" } },
});
const FILE = flags.in ?? join(import.meta.dir, "results", "results.jsonl");

type Line = {
  runId: string; scenario: string; target: string; rep: number; attempt?: number; retried?: boolean; contended?: boolean; serverSha?: string;
  quick: boolean; machine: Record<string, any>; config: Record<string, any>; metrics: Record<string, any> | null; error: string | null;
};

/** The final attempt of every repetition of one run. */
export function loadRun(file: string, runId?: string, sha?: string): Line[] {
  if (!existsSync(file)) throw new Error(`Cannot read ${file}: no results yet (run npm run bench)`);
  const lines = readFileSync(file, "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l) as Line);
  if (lines.length === 0) throw new Error(`Cannot read ${file}: it is empty`);
  const id = runId ?? lines.at(-1)!.runId;
  // a run measured one server.ts: its chat lines name it (raw Bun's and Node's do not)
  const ofSha = sha === undefined ? null : new Set(lines.filter((l) => l.serverSha?.startsWith(sha)).map((l) => l.runId));
  const run = lines.filter((l) => (id === "all" || l.runId === id) && (!ofSha || ofSha.has(l.runId)) && !l.retried);
  if (run.length === 0) throw new Error(`Cannot find run ${id}${sha === undefined ? "" : ` of server.ts ${sha}`} in ${file}`);
  return run;
}

const TARGET_NAMES: Record<string, string> = { chat: "ours (server.ts)", "raw-bun": "raw Bun", "node-ws": "Node + ws" };

type Cell = { med: number; min: number; max: number; n: number; contended: number };

export function makeTable(run: Line[]) {
  const cell = (scenario: string, target: string, pick: (m: Record<string, any>) => number): Cell | null => {
    const reps = run.filter((l) => l.scenario === scenario && l.target === target && l.metrics);
    const values = reps.map((l) => pick(l.metrics!)).filter(Number.isFinite);
    if (values.length === 0) return null;
    return { med: median(values), min: Math.min(...values), max: Math.max(...values), n: values.length, contended: reps.filter((l) => l.contended).length };
  };
  const scenarios = [...new Set(run.map((l) => l.scenario))];
  const targets = ["chat", "raw-bun", "node-ws"].filter((t) => run.some((l) => l.target === t));
  const out: string[] = [];
  const first = run[0];
  const m = first.machine;
  const runIds = [...new Set(run.map((l) => l.runId))];
  const runName = runIds.length > 1 ? `${runIds.length} runs pooled (${runIds[0]} to ${runIds.at(-1)})` : `Run ${first.runId}`;
  out.push(`${runName}${first.quick ? " (--quick)" : ""}: ${m.cores} cores (${m.cpu}), ${m.memGiB} GiB, Linux ${m.kernel}, Bun ${m.bun}, Node ${m.node}; ${m.pinning}; loopback.`);
  const rateReps = run.filter((l) => l.scenario.startsWith("rate-") && l.target === "chat").length;
  const repsNote = rateReps && rateReps !== first.config.reps ? ` (fixed rate: ${rateReps})` : "";
  out.push(`Cells: median of ${runIds.length > 1 ? "all" : first.config.reps} repetition(s)${runIds.length > 1 ? "" : repsNote} (min–max); a fresh server per repetition. \`*\` = some repetitions shared the CPU with other processes.`);
  out.push("");
  out.push(`| scenario | metric | ${targets.map((t) => TARGET_NAMES[t]).join(" | ")} | ours / raw Bun | ours / Node + ws |`);
  out.push(`| --- | --- | ${targets.map(() => "---:").join(" | ")} | ---: | ---: |`);

  const fmt = (c: Cell | null, unit: Unit) => {
    if (!c) return "–";
    const star = c.contended ? "*" : "";
    return c.min === c.max ? `${unit.f(c.med)}${star}` : `${unit.f(c.med)} (${unit.f(c.min)}–${unit.f(c.max)})${star}`;
  };
  const ratio = (a: Cell | null, b: Cell | null, higherIsBetter: boolean) => {
    if (!a || !b || !b.med) return "–";
    const r = a.med / b.med;
    if (higherIsBetter && r < 1) return `${(r * 100).toFixed(0)}%`;
    return `${r >= 10 ? r.toFixed(0) : r >= 0.1 ? r.toFixed(2) : r.toPrecision(2)}×`;
  };
  const row = (scenario: string, label: string, metric: string, pick: (m: Record<string, any>) => number, unit: Unit, higherIsBetter: boolean, only?: string[]) => {
    const cells = Object.fromEntries(targets.map((t) => [t, only && !only.includes(t) ? null : cell(scenario, t, pick)]));
    if (targets.every((t) => !cells[t])) return;
    out.push(`| ${label} | ${metric} | ${targets.map((t) => fmt(cells[t], unit)).join(" | ")} | ${ratio(cells.chat, cells["raw-bun"], higherIsBetter)} | ${ratio(cells.chat, cells["node-ws"], higherIsBetter)} |`);
  };

  for (const s of scenarios) {
    const sample = run.find((l) => l.scenario === s && l.metrics)?.metrics ?? {};
    if (s.startsWith("mixed-")) {
      const label = `mixed flood, ${sample.clients} clients: 1 frame in ${CHANGE_SHARE} an edit or reaction, reads`;
      row(s, label, "delivered message copies/s", (x) => x.copiesPerSec, MILLIONS, true);
      row(s, label, "delivered updated copies/s", (x) => x.updatesPerSec, MILLIONS, true);
      row(s, label, "latency p99 (ms)", (x) => x.p99Us, MS, false);
      row(s, label, "lost copies", (x) => x.lost, COUNT, false);
    } else if (s.startsWith("flood-")) {
      const label = `flood, ${sample.clients} clients × ${sample.window} in flight`;
      row(s, label, "delivered copies/s", (x) => x.copiesPerSec, MILLIONS, true);
      row(s, label, "latency p50 (ms)", (x) => x.p50Us, MS, false);
      row(s, label, "latency p99 (ms)", (x) => x.p99Us, MS, false);
      row(s, label, "lost copies", (x) => x.lost, COUNT, false);
    } else if (s.startsWith("rate-")) {
      const label = `fixed rate, ${sample.clients} clients, ${sample.offeredPerSecond} msg/s (${(sample.offeredCopiesPerSec / 1000).toFixed(0)}k copies/s offered)`;
      row(s, label, "delivered copies/s", (x) => x.copiesPerSec, THOUSANDS, true);
      row(s, label, "latency p50 (ms)", (x) => x.p50Us, MS, false);
      row(s, label, "latency p99 (ms)", (x) => x.p99Us, MS, false);
      row(s, label, "latency max (ms)", (x) => x.maxUs, MS, false);
      row(s, label, "lost copies", (x) => x.lost, COUNT, false);
    } else if (s === "idle") {
      const label = `idle, ${sample.sockets} sockets × 2 rooms`;
      row(s, label, "server RSS per connection (KiB)", (x) => x.kibPerConn, KIB, false);
      row(s, label, "… counted from the empty server (KiB)", (x) => x.kibPerConnFromEmpty, KIB, false);
      row(s, label, "one message to all sockets (ms)", (x) => x.broadcastMs, MS1, false);
      row(s, label, "server CPU for that message (ms)", (x) => x.broadcastServerMs, MS1, false);
      row(s, label, "sockets not reached", (x) => x.broadcastLost + x.failed, COUNT, false);
    } else if (s === "storm") {
      const label = `join storm, ${sample.joins} connects + joins (${sample.concurrency} at a time)`;
      row(s, label, "joins/s (wall)", (x) => x.joinsPerSec, COUNT, true);
      row(s, label, "server CPU per connect + join (µs)", (x) => x.serverUsPerJoin, US, false);
      row(s, label, "connect → presence p99 (ms)", (x) => x.p99Us, MS, false);
    } else if (s === "recovery") {
      const label = `recovery on a warm connection (${sample.reps} rounds)`;
      row(s, label, `join since: ${sample.missed} missed, server CPU (µs)`, (x) => x.serverUsPerJoin, US, false, ["chat"]);
      row(s, label, `join since: ${sample.missed} missed, round trip p50 (µs)`, (x) => x.p50Us, US, false, ["chat"]);
      row(s, label, `plain join (${sample.plainMessages} in history), server CPU (µs)`, (x) => x.plainServerUsPerJoin, US, false, ["chat"]);
      row(s, label, `plain join, round trip p50 (µs)`, (x) => x.plainP50Us, US, false, ["chat"]);
    }
  }

  if (out.at(-1)!.startsWith("| --- |")) out.splice(-3, 3); // no rows: the run held only the restart storm

  // Targets
  const med = (scenario: string, target: string, pick: (m: Record<string, any>) => number) => cell(scenario, target, pick)?.med ?? NaN;
  const checks: string[] = [];
  const verdict = (ok: boolean | null) => (ok === null ? "not measured" : ok ? "**met**" : "**not met**");
  const flood = scenarios.find((s) => s === "flood-64") ?? scenarios.find((s) => s.startsWith("flood-"));
  if (flood) {
    const ours = med(flood, "chat", (x) => x.copiesPerSec), raw = med(flood, "raw-bun", (x) => x.copiesPerSec), node = med(flood, "node-ws", (x) => x.copiesPerSec);
    checks.push(`- ${flood}: ours ≥ 85% of raw Bun — ${(100 * ours / raw).toFixed(0)}%: ${verdict(Number.isFinite(ours / raw) ? ours >= 0.85 * raw : null)}; ours ≥ 10× Node + ws — ${(ours / node).toFixed(1)}×: ${verdict(Number.isFinite(ours / node) ? ours >= 10 * node : null)}`);
  }
  for (const mixed of scenarios.filter((s) => s.startsWith("mixed-"))) {
    const plain = `flood-${mixed.slice("mixed-".length)}`;
    const ours = med(mixed, "chat", (x) => x.copiesPerSec), updates = med(mixed, "chat", (x) => x.updatesPerSec), base = med(plain, "chat", (x) => x.copiesPerSec);
    if (Number.isFinite(base)) checks.push(`- ${mixed} against ${plain} (no target): message copies/s ${(ours / base).toFixed(2)}×, all copies (messages and updates) ${((ours + updates) / base).toFixed(2)}×`);
  }
  const rate = scenarios.find((s) => s.startsWith("rate-"));
  if (rate) {
    const ours = med(rate, "chat", (x) => x.p99Us), raw = med(rate, "raw-bun", (x) => x.p99Us);
    const lost = run.filter((l) => l.scenario === rate && l.target === "chat" && l.metrics).reduce((n, l) => n + l.metrics!.lost, 0);
    checks.push(`- ${rate}: ours p99 ≤ 2× raw Bun's — ${(ours / raw).toFixed(1)}× (${(ours / 1000).toFixed(2)} vs ${(raw / 1000).toFixed(2)} ms): ${verdict(Number.isFinite(ours / raw) ? ours <= 2 * raw : null)}; nothing lost — ${lost} lost: ${verdict(lost === 0)}`);
    // each repetition of ours against the raw Bun one run right after it: steadier when the machine drifts
    const pairs = run
      .filter((l) => l.scenario === rate && l.target === "chat" && l.metrics)
      .map((l) => [l, run.find((r) => r.scenario === rate && r.target === "raw-bun" && r.runId === l.runId && r.rep === l.rep && r.metrics)] as const)
      .filter(([, r]) => r)
      .map(([l, r]) => l.metrics!.p99Us / r!.metrics!.p99Us);
    if (pairs.length > 1) checks.push(`  - p99 ratio of each repetition of ours to the raw Bun one right after it: median ${median(pairs).toFixed(2)}× (${Math.min(...pairs).toFixed(2)}–${Math.max(...pairs).toFixed(2)}×, ${pairs.length} pairs)`);
  }
  if (scenarios.includes("idle")) {
    const ours = med("idle", "chat", (x) => x.kibPerConn), raw = med("idle", "raw-bun", (x) => x.kibPerConn);
    checks.push(`- idle: ours memory per connection ≤ 1.5× raw Bun's — ${(ours / raw).toFixed(2)}× (${ours.toFixed(2)} vs ${raw.toFixed(2)} KiB): ${verdict(Number.isFinite(ours / raw) ? ours <= 1.5 * raw : null)}`);
  }
  if (scenarios.includes("recovery")) {
    const since = med("recovery", "chat", (x) => x.serverUsPerJoin), plain = med("recovery", "chat", (x) => x.plainServerUsPerJoin);
    checks.push(`- recovery of 500 missed messages < 1 ms server time — ${since.toFixed(0)} µs: ${verdict(Number.isFinite(since) ? since < 1000 : null)}; join with history < 1 ms — ${plain.toFixed(0)} µs: ${verdict(Number.isFinite(plain) ? plain < 1000 : null)}`);
  }
  if (scenarios.includes("restart-storm")) out.push("", ...stormTable(run, verdict));
  if (checks.length) out.push("", "Targets:", ...checks);
  const errors = run.filter((l) => l.error);
  if (errors.length) out.push("", "Failed repetitions:", ...errors.map((l) => `- ${l.scenario} ${l.target} rep ${l.rep}: ${l.error}`));
  return out.join("\n");
}

/** The restart storm has its own rows: ours cold and warm, the old protocol's floor, raw Bun; and its targets. */
function stormTable(run: Line[], verdict: (ok: boolean | null) => string): string[] {
  const reps = (target: string) => run.filter((l) => l.scenario === "restart-storm" && l.target === target && l.metrics);
  const sample = reps("chat")[0]?.metrics ?? reps("floor")[0]?.metrics ?? reps("raw-bun")[0]?.metrics;
  if (!sample) return [];
  const cell = (target: string, phase: "cold" | "warm", pick: (p: Record<string, any>) => number) => {
    const lines = reps(target).filter((l) => l.metrics![phase]);
    const values = lines.map((l) => pick(l.metrics![phase])).filter(Number.isFinite);
    if (!values.length) return null;
    return { med: median(values), min: Math.min(...values), max: Math.max(...values), contended: lines.some((l) => l.contended) };
  };
  const fmt = (c: ReturnType<typeof cell>, digits = 0) =>
    !c ? "–" : `${c.med.toFixed(digits)}${c.min === c.max ? "" : ` (${c.min.toFixed(digits)}–${c.max.toFixed(digits)})`}${c.contended ? "*" : ""}`;
  const rows: [string, string, "cold" | "warm"][] = [["ours, restarted (cold)", "chat", "cold"], ["ours, warm", "chat", "warm"], ["old protocol's floor", "floor", "warm"], ["raw Bun", "raw-bun", "warm"]];
  const out = [
    `Restart storm: ${sample.clients} clients in ${sample.rooms} rooms reconnect with since (${sample.missed} of ${sample.stored} messages missed), at most ${sample.concurrency} handshakes in flight:`,
    "",
    "| server | time to the last recovery (ms) | server CPU per client (µs) | of it, the main thread (µs) | history per client (bytes) |",
    "| --- | ---: | ---: | ---: | ---: |",
  ];
  for (const [name, target, phase] of rows) {
    if (!cell(target, phase, (p) => p.ms)) continue;
    out.push(`| ${name} | ${fmt(cell(target, phase, (p) => p.ms))} | ${fmt(cell(target, phase, (p) => p.serverUsPerClient))} | ${fmt(cell(target, phase, (p) => p.mainThreadUsPerClient))} | ${fmt(cell(target, phase, (p) => p.historyBytesPerClient))} |`);
  }
  const us = (target: string, phase: "cold" | "warm") => cell(target, phase, (p) => p.serverUsPerClient)?.med ?? NaN;
  const [cold, warm, floor] = [us("chat", "cold"), us("chat", "warm"), us("floor", "warm")];
  out.push("", `Restart storm targets: ours warm ≤ 0.6× the floor's CPU per client — ${(warm / floor).toFixed(2)}×: ${verdict(Number.isFinite(warm / floor) ? warm <= 0.6 * floor : null)}; cold ≤ 1.2× warm — ${(cold / warm).toFixed(2)}×: ${verdict(Number.isFinite(cold / warm) ? cold <= 1.2 * warm : null)}`);
  return out;
}

/** 1 frame in this many of the mixed flood is a change (bench/run.ts: a change after every 9th say) */
const CHANGE_SHARE = 10;

type Unit = { f: (v: number) => string };
const MILLIONS: Unit = { f: (v) => `${(v / 1e6).toFixed(2)}M` };
const THOUSANDS: Unit = { f: (v) => `${(v / 1e3).toFixed(1)}k` };
const MS: Unit = { f: (v) => (v / 1000 >= 100 ? (v / 1000).toFixed(0) : (v / 1000).toFixed(2)) };
const MS1: Unit = { f: (v) => v.toFixed(1) };
const US: Unit = { f: (v) => v.toFixed(0) };
const KIB: Unit = { f: (v) => v.toFixed(2) };
const COUNT: Unit = { f: (v) => v.toFixed(0) };

if (import.meta.main) {
  try {
    console.log(makeTable(loadRun(FILE, flags.run, flags.sha)));
  } catch (error) {
    console.error(error instanceof Error ? error.message : error);
    process.exit(1);
  }
}
