// Shared bench helpers: a mergeable latency histogram, medians, /proc readers, child processes, and the repeated,
// recorded attempts of a measurement.
import { appendFileSync, mkdirSync, readdirSync, readFileSync } from "node:fs";
import { dirname } from "node:path";

// ── Latency histogram: integer microseconds, exact below 256 µs, then 128 buckets per power of two (<1% error) ──

const EXACT = 256;
const SUB_BITS = 7;
const SUB = 1 << SUB_BITS;
export const HIST_SIZE = EXACT + (31 - 8) * SUB;

export class Histogram {
  counts = new Float64Array(HIST_SIZE);
  count = 0;
  max = 0;
  sum = 0;

  record(us: number) {
    const v = us < 0 ? 0 : us >= 2 ** 31 - 1 ? 2 ** 31 - 1 : Math.round(us);
    this.counts[bucketOf(v)]++;
    this.count++;
    this.sum += v;
    if (v > this.max) this.max = v;
  }

  merge(other: SerializedHistogram) {
    for (let i = 0; i < other.counts.length; i++) this.counts[i] += other.counts[i];
    this.count += other.count;
    this.sum += other.sum;
    this.max = Math.max(this.max, other.max);
  }

  /** The value at quantile q (0..1), in µs: the bucket's lower bound (the exact max for q = 1). */
  quantile(q: number): number {
    if (this.count === 0) return NaN;
    if (q >= 1) return this.max;
    const rank = Math.ceil(q * this.count);
    let seen = 0;
    for (let i = 0; i < HIST_SIZE; i++) {
      seen += this.counts[i];
      if (seen >= rank) return Math.min(lowerBound(i), this.max);
    }
    return this.max;
  }

  summary() {
    return { count: this.count, p50Us: this.quantile(0.5), p99Us: this.quantile(0.99), maxUs: this.max, meanUs: this.count ? this.sum / this.count : NaN };
  }

  toJSON(): SerializedHistogram {
    return { counts: Array.from(this.counts), count: this.count, max: this.max, sum: this.sum };
  }
}
export type SerializedHistogram = { counts: number[]; count: number; max: number; sum: number };

function bucketOf(v: number): number {
  if (v < EXACT) return v;
  const e = 31 - Math.clz32(v); // 8..30
  return EXACT + (e - 8) * SUB + ((v >>> (e - SUB_BITS)) - SUB);
}

function lowerBound(i: number): number {
  if (i < EXACT) return i;
  const e = Math.floor((i - EXACT) / SUB) + 8;
  const sub = (i - EXACT) % SUB;
  return (SUB + sub) * 2 ** (e - SUB_BITS);
}

// ── Small statistics ──

export function median(values: number[]): number {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  const mid = v.length >> 1;
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

export function quantile(values: number[], q: number): number {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return NaN;
  return v[Math.min(v.length - 1, Math.max(0, Math.ceil(q * v.length) - 1))];
}

// ── /proc: CPU time and memory of a process (Linux) ──

const CLK_TCK = 100; // sysconf(_SC_CLK_TCK) on Linux

/** User and system CPU time of a process (all threads), in ms; NaN when unreadable. */
export function cpuTimes(pid: number): { user: number; sys: number } {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return { user: (Number(fields[11]) * 1000) / CLK_TCK, sys: (Number(fields[12]) * 1000) / CLK_TCK }; // utime, stime
  } catch {
    return { user: NaN, sys: NaN };
  }
}

/** User+system CPU time of a process (all threads), in ms; NaN when unreadable. */
export function cpuMs(pid: number): number {
  const { user, sys } = cpuTimes(pid);
  return user + sys;
}

/** On-CPU time of all live threads of a process in ms, with ns resolution (schedstat); NaN when unreadable. */
export function cpuPreciseMs(pid: number): number {
  try {
    let ns = 0;
    for (const task of readdirSync(`/proc/${pid}/task`)) {
      try {
        ns += Number(readFileSync(`/proc/${pid}/task/${task}/schedstat`, "utf8").split(" ")[0]);
      } catch {} // the thread ended meanwhile
    }
    return ns / 1e6;
  } catch {
    return NaN;
  }
}

/** CPU time (user + nice + system, all cores) spent by every process on the machine, in ms. */
export function machineBusyMs(): number {
  const f = readFileSync("/proc/stat", "utf8").slice(0, 200).split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
  return ((f[0] + f[1] + f[2]) * 1000) / CLK_TCK;
}

/**
 * Measures how much CPU other processes took (in cores) between start and end: the bench's own
 * processes (`pids`, alive at both ends) are subtracted from the machine's total. The machine may be
 * shared; a repetition that had to share its cores is flagged and repeated.
 */
export function watchOthers(pids: number[]) {
  const t0 = performance.now();
  const busy0 = machineBusyMs();
  const ours0 = pids.reduce((n, pid) => n + cpuMs(pid), 0);
  return () => {
    const ms = performance.now() - t0;
    const others = machineBusyMs() - busy0 - (pids.reduce((n, pid) => n + cpuMs(pid), 0) - ours0);
    return Math.max(0, others / ms);
  };
}

/** Waits (bounded) until other processes use less than `cores` for a 500 ms sample; returns the ms waited. */
export async function waitQuiet(cores: number, maxMs: number): Promise<number> {
  const t0 = performance.now();
  for (;;) {
    const done = watchOthers([process.pid]);
    await Bun.sleep(500);
    if (done() < cores || performance.now() - t0 > maxMs) return performance.now() - t0;
  }
}

/** Resident memory of a process in KiB (VmRSS), NaN when unreadable. */
export function rssKiB(pid: number): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? NaN);
  } catch {
    return NaN;
  }
}

// ── Child processes with a JSON ready line ──

export type Child = {
  proc: ReturnType<typeof Bun.spawn>;
  port: number;
  lines: string[];
  stop: () => Promise<void>;
};

/** The chunks of a byte stream, until it ends. */
async function* chunks(stream: ReadableStream<Uint8Array>) {
  const reader = stream.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    yield value;
  }
}

/** Spawns a server that prints `{"event":"start","port":N}` (a raw baseline: "ready") and waits for it (bounded). */
export async function spawnReady(cmd: string[], options: { env?: Record<string, string>; cwd?: string; timeoutMs?: number } = {}): Promise<Child> {
  const { env = {}, cwd, timeoutMs = 20_000 } = options;
  const proc = Bun.spawn(cmd, { cwd, env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe" });
  const lines: string[] = [];
  const remember = (line: string) => {
    lines.push(line);
    if (lines.length > 200) lines.splice(0, lines.length - 100);
  };
  const ready = Promise.withResolvers<number>();
  void (async () => {
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const chunk of chunks(proc.stdout)) {
      buffer += decoder.decode(chunk, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        remember(line);
        if (line.includes('"ready"') || line.includes('"start"')) {
          try {
            const event = JSON.parse(line);
            if (event.event === "ready" || event.event === "start") ready.resolve(event.port);
          } catch {}
        }
      }
    }
    ready.reject(new Error(`${cmd.join(" ")} exited before ready (code ${await proc.exited}):\n${lines.slice(-20).join("\n")}`));
  })();
  void (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of chunks(proc.stderr)) for (const line of decoder.decode(chunk).split("\n")) if (line) remember(`stderr: ${line}`);
  })();
  const timer = setTimeout(() => ready.reject(new Error(`${cmd.join(" ")} not ready after ${timeoutMs} ms`)), timeoutMs);
  const stop = async () => {
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGTERM");
    const exited = await Promise.race([proc.exited.then(() => true), Bun.sleep(3000).then(() => false)]);
    if (!exited) {
      proc.kill("SIGKILL");
      await proc.exited;
    }
  };
  try {
    const port = await ready.promise;
    return { proc, port, lines, stop };
  } catch (error) {
    proc.kill("SIGKILL");
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

/** `taskset -c <cpu>` in front of a command when the machine has more than one core. */
export function pinned(cpu: number | null, cmd: string[]): string[] {
  return cpu === null ? cmd : ["taskset", "-c", String(cpu), ...cmd];
}

// ── Results: one JSON line per attempt ──

/** The first 12 hex digits of a file's sha1: which version of server.ts a line measured (it may change between runs). */
export function shaOf(file: string): string {
  return new Bun.CryptoHasher("sha1").update(readFileSync(file)).digest("hex").slice(0, 12);
}

export function appendLine(file: string, line: object) {
  mkdirSync(dirname(file), { recursive: true });
  appendFileSync(file, JSON.stringify(line) + "\n");
}

/** What one attempt of a measurement gave; `retried`: it is run again. */
export type Attempt = { attempt: number; metrics: Record<string, any> | null; error: string | null; contended: boolean; retried: boolean; waitedMs: number; seconds: number };

/** What a printed attempt ends with: that other processes shared the machine, that it is repeated. */
export function attemptNote({ metrics, error, contended, retried }: Attempt): string {
  return contended ? ` [other processes used ${metrics!.otherCpu.toFixed(2)} cores${retried ? ": repeating" : ""}]` : error && retried ? " [repeating]" : "";
}

/**
 * Runs a measurement until it neither failed nor shared the machine (other processes above `maxOtherCpu` cores), at
 * most `retries` times more and while `budget.retries` lasts; `quiet` waits for a quiet machine first (ms waited).
 * `measure` must clean up after itself; `done` hears every attempt. Resolves whether the last attempt failed.
 */
export async function attempts(o: {
  maxOtherCpu: number; retries: number; budget: { retries: number };
  quiet: () => Promise<number>; measure: () => Promise<Record<string, any>>; done: (a: Attempt) => void;
}): Promise<boolean> {
  for (let attempt = 1; ; attempt++) {
    const waitedMs = await o.quiet();
    const t0 = performance.now();
    let metrics: Record<string, any> | null = null;
    let error: string | null = null;
    try {
      metrics = await o.measure();
    } catch (e) {
      error = String(e instanceof Error ? e.message : e);
    }
    const contended = metrics !== null && metrics.otherCpu > o.maxOtherCpu;
    const retried = (contended || error !== null) && attempt <= o.retries && o.budget.retries > 0;
    if (retried) o.budget.retries--;
    o.done({ attempt, metrics, error, contended, retried, waitedMs, seconds: (performance.now() - t0) / 1000 });
    if (!retried) return error !== null;
  }
}
