// What the hardening tests and the soak measure: a process's memory and open files, /metrics,
// the whole stored history of a room, and a seeded random generator for replayable fuzzing.
import { Database } from "bun:sqlite";
import { copyFileSync, readdirSync, readFileSync } from "node:fs";
import parsePrometheusTextFormat, { type Family } from "parse-prometheus-text-format";
import type { ServerMessage } from "../server.ts";
import type { Client } from "./helpers.ts";

export type Message = Extract<ServerMessage, { type: "message" }>;

/** Resident memory of a process in MiB, from /proc/<pid>/status. */
export function rssMiB(pid: number): number {
  const kb = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  if (!kb) throw new Error(`no VmRSS for ${pid}`);
  return Number(kb[1]) / 1024;
}

/** How many files (sockets included) a process has open, from /proc/<pid>/fd. */
export function openFds(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/**
 * How many rows of a table the database file alone holds, without its -wal: what checkpoints copied so far
 * (undefined when the copy caught a checkpoint halfway through its writes).
 */
export function rowsCheckpointed(file: string, table: string): number | undefined {
  const copy = `${file}.copy-${performance.now()}`;
  copyFileSync(file, copy);
  try {
    using db = new Database(copy, { readonly: true });
    return (db.query(`SELECT count(*) AS n FROM ${table}`).get() as { n: number }).n;
  } catch {
    return undefined;
  }
}

/** /metrics as a real Prometheus parser reads it: family name → family (a malformed line throws). */
export async function scrape(baseUrl: string): Promise<Map<string, Family>> {
  const res = await fetch(`${baseUrl}/metrics`);
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
  return new Map(parsePrometheusTextFormat(await res.text()).map((f) => [f.name, f]));
}

/** One value from /metrics: `name` alone sums every label set of the family; `name{k="v",…}` sums the samples with those labels. */
export async function metric(baseUrl: string, name: string): Promise<number> {
  const [, family, selector = ""] = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?$/.exec(name) ?? [];
  const wanted = Object.fromEntries([...selector.matchAll(/(\w+)="([^"]*)"/g)].map(([, k, v]) => [k, v]));
  const found = (await scrape(baseUrl)).get(family);
  if (!found) throw new Error(`/metrics has no ${family}`);
  const samples = found.metrics.filter((m) => Object.entries(wanted).every(([k, v]) => m.labels?.[k] === v));
  if (!samples.length) throw new Error(`/metrics has no ${name}`);
  return samples.reduce((sum, m) => sum + Number(m.value ?? m.count), 0);
}

/** Every stored message of a room, oldest first, paged through the REST API with one session. */
export async function storedHistory(baseUrl: string, room: string, cookie: string): Promise<Message[]> {
  const out: Message[] = [];
  let before: number | undefined;
  for (;;) {
    const query = before === undefined ? "limit=100" : `before=${before}&limit=100`;
    const res = await fetch(`${baseUrl}/api/rooms/${room}/messages?${query}`, { headers: { cookie } });
    if (res.status !== 200) throw new Error(`GET messages answered ${res.status}`);
    const { messages } = (await res.json()) as { messages: Message[] };
    out.unshift(...messages);
    if (!messages.length) return out; // a page may hold fewer than asked (HISTORY_PAGE_BYTES)
    before = messages[0].id;
  }
}

/** sfc32: a small, fast, seedable generator; the same seed gives the same sequence. */
export function prng(seed: number) {
  let a = 0x9e3779b9, b = 0x243f6a88, c = 0xb7e15162, d = seed >>> 0;
  const next = () => {
    a >>>= 0; b >>>= 0; c >>>= 0; d >>>= 0;
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return (t >>> 0) / 4294967296;
  };
  for (let i = 0; i < 20; i++) next();
  const int = (n: number) => Math.floor(next() * n);
  return {
    next,
    /** an integer in [0, n) */
    int,
    /** true with probability p */
    chance: (p: number) => next() < p,
    pick: <T>(items: readonly T[]): T => items[int(items.length)],
  };
}
export type Random = ReturnType<typeof prng>;

/** Counts a client's own messages coming back, without scanning its frames (Client.next is O(frames)). */
export function countEchoes(client: Client) {
  const me = (client.frames[0] as { user: { id: string } }).user.id;
  let count = 0;
  let wake: (() => void) | null = null;
  client.ws.addEventListener("message", (e) => {
    const m = JSON.parse(e.data as string);
    if (m.type === "message" && m.user.id === me) count++;
    wake?.();
  });
  client.ws.addEventListener("close", () => wake?.());
  return {
    get count() {
      return count;
    },
    /** Resolves once `n` echoes came back; throws if the socket closes first or 30 s pass. */
    async atLeast(n: number) {
      const deadline = Date.now() + 30_000;
      while (count < n) {
        if (Date.now() > deadline || client.ws.readyState !== WebSocket.OPEN) throw new Error(`only ${count} of ${n} echoes came back`);
        const { promise, resolve } = Promise.withResolvers<void>();
        wake = resolve;
        const timer = setTimeout(resolve, 1000);
        await promise;
        clearTimeout(timer);
      }
    },
  };
}
