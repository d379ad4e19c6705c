// The coordinator's side of the load client: load.ts worker processes driven over IPC, new sessions the way
// a browser gets them, and the limits our server runs with under the bench's load.
import { join } from "node:path";
import { nowUs } from "./ws-client.ts";
import { pinned } from "./lib.ts";

const ROOT = join(import.meta.dir, "..");

/** Our server's limits, raised: every bench client is one of many users on one loopback address. */
export const BENCH_LIMITS_ENV: Record<string, string> = {
  RATE_LIMIT: "1000000/1s",
  JOIN_LIMIT: "1000000/1s", // the recovery scenario joins 2,000 times on one socket
  HISTORY_BYTES: "100000000000/1s", // and receives ~100 KB of history each time
  HISTORY_BYTES_PER_ADDRESS: "100000000000/1s",
  MAX_CONNECTIONS: "100000",
  MAX_CONNECTIONS_PER_USER: "10000",
  SESSIONS_PER_ADDRESS: "1000000/1s",
  UPGRADES_PER_ADDRESS: "1000000/1s",
  MAX_CONNECTIONS_PER_ADDRESS: "1000000",
  RATE_LIMIT_PER_ADDRESS: "1000000/1s",
  RENAME_LIMIT_PER_ADDRESS: "1000000/1s",
  REQUESTS_PER_ADDRESS: "1000000/1s",
};

/** The runtime's environment as `npm start` and deploy/chat.service set it (README, "Deploying"): our server runs with it
 * in every bench; BENCH_SERVER_ENV="BUN_JSC_useFTLJIT=1" measures Bun's default instead. */
export const RUNTIME_ENV: Record<string, string> = { BUN_JSC_useFTLJIT: "0" };

/** RUNTIME_ENV, then BENCH_SERVER_ENV="K=V …" on top: the environment of our server alone, not of the load client. */
export function serverEnv(): Record<string, string> {
  const extra = (process.env.BENCH_SERVER_ENV ?? "").split(" ").filter(Boolean).map((kv) => {
    const eq = kv.indexOf("=");
    if (eq < 1) throw new Error(`Cannot parse BENCH_SERVER_ENV: "${kv}" is not NAME=value`);
    return [kv.slice(0, eq), kv.slice(eq + 1)];
  });
  return { ...RUNTIME_ENV, ...Object.fromEntries(extra) };
}

/** New sessions the way a browser gets them: GET /api/me, keep the `sid` cookie. */
export async function sessions(url: string, count: number): Promise<string[]> {
  const cookies: string[] = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(16, count) }, async () => {
      while (next < count) {
        next++;
        const res = await fetch(`${url}/api/me`);
        const cookie = res.headers.get("set-cookie")?.split(";")[0];
        await res.arrayBuffer();
        if (res.status !== 200 || !cookie) throw new Error(`GET /api/me answered ${res.status} without a cookie`);
        cookies.push(cookie);
      }
    }),
  );
  return cookies;
}

/** One load.ts process, pinned to `cpu`, answering commands over IPC. */
export class Worker {
  private pending = new Map<number, PromiseWithResolvers<any>>();
  private nextId = 0;
  private ready = Promise.withResolvers<void>();
  readonly proc: ReturnType<typeof Bun.spawn>;
  constructor(baseUs: number, cpu: number | null, flags: string[] = []) {
    this.proc = Bun.spawn(pinned(cpu, [process.execPath, ...flags, join(ROOT, "bench", "load.ts")]), {
      cwd: ROOT,
      env: { ...process.env, BENCH_BASE_US: String(Math.floor(baseUs)) },
      stdout: "inherit",
      stderr: "inherit",
      serialization: "json",
      ipc: (msg: any) => {
        if (msg.ready) return this.ready.resolve();
        const p = this.pending.get(msg.id);
        if (!p) return;
        this.pending.delete(msg.id);
        msg.error ? p.reject(new Error(`worker: ${msg.error}`)) : p.resolve(msg.result);
      },
    });
    void this.proc.exited.then((code) => {
      const error = new Error(`load worker exited with ${code}`);
      this.ready.reject(error);
      for (const p of this.pending.values()) p.reject(error);
      this.pending.clear();
    });
  }
  get pid() {
    return this.proc.pid;
  }
  async call<T = any>(cmd: string, args: object = {}, timeoutMs = 120_000): Promise<T> {
    await this.ready.promise;
    const id = this.nextId++;
    const p = Promise.withResolvers<T>();
    this.pending.set(id, p);
    this.proc.send({ id, cmd, args });
    const timer = setTimeout(() => p.reject(new Error(`worker ${cmd}: no answer after ${timeoutMs} ms`)), timeoutMs);
    try {
      return await p.promise;
    } finally {
      clearTimeout(timer);
      this.pending.delete(id);
    }
  }
  async stop() {
    if (this.proc.exitCode !== null) return;
    this.proc.send({ id: -1, cmd: "exit" }); // a clean exit lets `--cpu-prof` write its profile
    const exited = await Promise.race([this.proc.exited.then(() => true), Bun.sleep(5000).then(() => false)]);
    if (!exited) this.proc.kill("SIGKILL");
    await this.proc.exited;
  }
}

/** Runs `fn` with `count` fresh load workers on `cpu`, always stopping them. */
export async function withWorkers<T>(count: number, cpu: number | null, flags: string[], fn: (workers: Worker[]) => Promise<T>): Promise<T> {
  const baseUs = nowUs(); // send times are counted from here, the same in every worker
  const workers = Array.from({ length: count }, () => new Worker(baseUs, cpu, flags));
  try {
    return await fn(workers);
  } finally {
    await Promise.all(workers.map((w) => w.stop()));
  }
}
