// The abuse attacks of the "abuse resistance" issue, each against a fresh `bun server.ts` (temp SQLite file,
// every limit at its default) on loopback: a bystander measures its echo latency without and then during the
// attack, and the line per attack says what the attacker sent, what the server accepted or refused (its
// /metrics), how the database grew, and the server's CPU. One JSON line per attack to results/attacks.jsonl.
//
//   bun bench/attacks.ts [--attack identities,history] [--duration S] [--baseline S] [--half-open N] [--out FILE]
//   bun bench/attacks.ts --table     (the table of the latest line of each attack in --out)
//
// Addresses: attacker, bystander and crowd all connect from 127.0.0.1, so the server runs with
// TRUSTED_PROXIES=127.0.0.1 and each names its client address in X-Forwarded-For, as a proxy would: the
// attacker 198.51.100.1, the bystander 192.0.2.x, the crowd 198.18.x.y. The attacker is a child process
// (`--role attacker`) under `nice -n 10`, so on a small machine its own JS does not starve the bystander's
// measurement; the server runs at normal priority.
import { Database } from "bun:sqlite";
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { createHash } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { cpuMs, quantile, spawnReady, waitQuiet, watchOthers, type Child } from "./lib.ts";

const ROOT = join(import.meta.dir, "..");
const BUN = process.execPath;
const ATTACKER_IP = "198.51.100.1";
const BYSTANDER_USERS = 16; // taking turns, each says 1.25/s: under RATE_LIMIT's 20/10s per user and 100/10s per address
const SAY_EVERY_MS = 50;
const ECHO_GRACE_MS = 3000; // after a window, how long an unanswered say may still come back
const BIG_ROOM = { messages: 500, chars: 2000 };
const SEEDED_ROOMS = 200_000;

type Counts = Record<string, number>;
const bump = (counts: Counts, key: string, by = 1) => void (counts[key] = (counts[key] ?? 0) + by);

/** A frame's type (and an error's code) from its first bytes, without parsing a 3 MB history frame. */
function frameKind(data: string): string {
  const type = /^\{"type":"([a-z_]+)"/.exec(data)?.[1] ?? "?";
  if (type !== "error") return type;
  return `error ${/"code":"([a-z_]+)"/.exec(data.slice(0, 200))?.[1] ?? "?"}`;
}

const xff = (ip: string) => ({ "x-forwarded-for": ip });

// ── Clients: sessions and sockets as a browser makes them ─────────────────────

/** GET /api/me without a cookie: a new guest's cookie, or the refusal's status. */
async function mint(url: string, ip: string): Promise<{ status: number; cookie?: string }> {
  const res = await fetch(`${url}/api/me`, { headers: xff(ip) });
  await res.arrayBuffer();
  const cookie = res.headers.get("set-cookie")?.split(";")[0];
  return { status: res.status, cookie: res.status === 200 ? cookie : undefined };
}

/** Opens /chat and resolves on its welcome frame; rejects when the upgrade is refused or the socket closes first. */
function openSocket(url: string, cookie: string, ip: string, onFrame: (data: string) => void = () => {}): Promise<WebSocket> {
  const ws = new WebSocket(`${url.replace(/^http/, "ws")}/chat`, { headers: { cookie, ...xff(ip) } } as never);
  const opened = Promise.withResolvers<WebSocket>();
  ws.addEventListener("message", (e) => {
    const data = String(e.data);
    if (data.startsWith('{"type":"welcome"')) opened.resolve(ws);
    onFrame(data);
  });
  ws.addEventListener("error", () => opened.reject(new Error("refused")));
  ws.addEventListener("close", () => opened.reject(new Error("closed")));
  return opened.promise;
}

// ── The bystander: users on addresses of their own, saying in turn and timing their own echo ──

type Window = { latencies: number[]; noEcho: number; refused: number; sent: number };

class Bystander {
  private sockets: WebSocket[] = [];
  private pending = new Map<string, { at: number; window: Window }>();
  private window: Window | null = null;
  private seq = 0;
  private timer: ReturnType<typeof setInterval> | null = null;
  /** Frames the first bystander socket received, by type, in the current window. */
  frames: Counts = {};

  static async start(url: string, rooms: string[]) {
    const b = new Bystander();
    for (let i = 0; i < BYSTANDER_USERS; i++) {
      const ip = `192.0.2.${10 + i}`;
      const { cookie } = await mint(url, ip);
      if (!cookie) throw new Error(`the bystander got no session from ${url}`);
      const joined = new Map<string, PromiseWithResolvers<void>>(["lobby", ...rooms].map((room) => [room, Promise.withResolvers<void>()]));
      const ws = await openSocket(url, cookie, ip, (data) => {
        // each join answers presence, or an error naming the room
        const room = /^\{"type":"(?:presence|error)".*?"room":"([a-z0-9_-]+)"/.exec(data.slice(0, 400))?.[1];
        if (room) (data.startsWith('{"type":"error"') ? joined.get(room)?.reject(new Error(`the bystander cannot join ${room}: ${data}`)) : joined.get(room)?.resolve());
        b.onFrame(i, data);
      });
      for (const room of joined.keys()) ws.send(JSON.stringify({ type: "join", room }));
      await Promise.all([...joined.values()].map((j) => j.promise));
      b.sockets.push(ws);
    }
    return b;
  }

  private onFrame(socket: number, data: string) {
    if (socket === 0 && this.window) bump(this.frames, frameKind(data));
    if (!data.includes('"ref":"b')) return;
    const ref = /"ref":"(b\d+)"/.exec(data)?.[1];
    const sent = ref && this.pending.get(ref);
    if (!sent) return;
    this.pending.delete(ref);
    if (data.startsWith('{"type":"error"')) sent.window.refused++;
    else sent.window.latencies.push(performance.now() - sent.at);
  }

  /** Starts a measured window: a say every SAY_EVERY_MS from the next user in turn. */
  begin() {
    const window: Window = (this.window = { latencies: [], noEcho: 0, refused: 0, sent: 0 });
    this.frames = {};
    this.timer = setInterval(() => {
      const ref = `b${++this.seq}`;
      const ws = this.sockets[this.seq % this.sockets.length];
      this.pending.set(ref, { at: performance.now(), window });
      window.sent++;
      ws.send(JSON.stringify({ type: "say", room: "lobby", text: `bystander ${this.seq}`, ref }));
    }, SAY_EVERY_MS);
  }

  /** Ends the window; echoes still missing after ECHO_GRACE_MS count at the time waited. */
  async end() {
    clearInterval(this.timer!);
    const window = this.window!;
    const frames = this.frames;
    const deadline = performance.now() + ECHO_GRACE_MS;
    while ([...this.pending.values()].some((p) => p.window === window) && performance.now() < deadline) await Bun.sleep(20);
    for (const [ref, p] of this.pending) {
      if (p.window !== window) continue;
      this.pending.delete(ref);
      window.noEcho++;
      window.latencies.push(performance.now() - p.at);
    }
    this.window = null;
    const l = window.latencies;
    return { sent: window.sent, echoed: l.length - window.noEcho, refused: window.refused, noEcho: window.noEcho, p50Ms: round(quantile(l, 0.5)), p99Ms: round(quantile(l, 0.99)), maxMs: round(Math.max(...l)), frames };
  }

  close() {
    for (const ws of this.sockets) ws.close();
  }
}

const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

// ── Probes from the coordinator: fresh connections to /healthz and /api/me, and the server's open files ──

function startProbes(url: string, pid: number, cookie: string) {
  const stats = { healthz: [] as number[], me: [] as number[], failed: 0, maxFds: 0 };
  let stopped = false;
  const probe = async (path: string, headers: Record<string, string>, into: number[]) => {
    const t0 = performance.now();
    try {
      const res = await fetch(`${url}${path}`, { headers, keepalive: false, signal: AbortSignal.timeout(2000) } as RequestInit);
      await res.arrayBuffer();
      if (res.status === 200) into.push(performance.now() - t0);
      else stats.failed++;
    } catch {
      stats.failed++;
    }
  };
  const loop = (async () => {
    while (!stopped) {
      await Promise.all([probe("/healthz", {}, stats.healthz), probe("/api/me", { cookie, ...xff("192.0.2.99") }, stats.me), Bun.sleep(100)]);
      try {
        stats.maxFds = Math.max(stats.maxFds, readdirSync(`/proc/${pid}/fd`).length);
      } catch {}
    }
  })();
  return async () => {
    stopped = true;
    await loop;
    const q = (v: number[]) => ({ n: v.length, p50Ms: round(quantile(v, 0.5)), p99Ms: round(quantile(v, 0.99)) });
    return { healthz: q(stats.healthz), me: q(stats.me), failed: stats.failed, maxServerFds: stats.maxFds };
  };
}

// ── The database: sizes and rows, and rows seeded before the server starts ──

function dbBytes(file: string): number {
  return [file, `${file}-wal`].reduce((n, f) => n + (existsSync(f) ? statSync(f).size : 0), 0);
}

function dbRows(file: string): Counts {
  using db = new Database(file, { readonly: true });
  const rows: Counts = {};
  for (const table of ["users", "sessions", "rooms", "messages"]) {
    try {
      rows[table] = (db.query(`SELECT count(*) AS n FROM ${table}`).get() as { n: number }).n;
    } catch {} // a table this version does not have
  }
  return rows;
}

const CJK = Array.from({ length: 2000 }, (_, i) => String.fromCharCode(0x4e00 + ((i * 7919) % 20000))).join("");

/** Seeds rows as if users had written them: `rooms` one-message rooms, or the big room (500 × 2000 CJK characters). */
function seed(file: string, what: "rooms" | "big") {
  using db = new Database(file);
  const room = db.prepare("INSERT OR IGNORE INTO rooms (name, last_id) VALUES (?, ?)");
  const message = db.prepare("INSERT INTO messages (room, id, user_id, name, text, ts, ref) VALUES (?, ?, 'seed', 'seed', ?, ?, NULL)");
  const now = Date.now();
  db.transaction(() => {
    if (what === "rooms") {
      // lobby among them: past MAX_ROOMS (where a merged server may be) a new room is refused
      room.run("lobby", 1);
      message.run("lobby", 1, "the first message of lobby", now);
      for (let i = 0; i < SEEDED_ROOMS; i++) {
        room.run(`seeded-${i}`, 1);
        message.run(`seeded-${i}`, 1, `the one message of room ${i}`, now);
      }
    } else {
      room.run("big", BIG_ROOM.messages);
      for (let id = 1; id <= BIG_ROOM.messages; id++) message.run("big", id, CJK.slice(0, BIG_ROOM.chars), now);
    }
  })();
}

// ── The attacks, run in the attacker process: setup (before the baseline), then the attack until `stop` ──

type AttackContext = { url: string; counts: Counts; stopped: () => boolean; halfOpen: number };
type Attack = {
  /** What the attacker does, in a few words (for the table). */
  what: string;
  seed?: "rooms" | "big";
  /** Rooms the bystander joins besides lobby, to hear what the attack makes the server send there. */
  bystanderRooms?: string[];
  setup?: (ctx: AttackContext) => Promise<unknown>;
  run: (ctx: AttackContext, state: any) => Promise<void>;
};

/** `n` loops of `body` until the attack stops. */
async function loops(n: number, ctx: AttackContext, body: (i: number) => Promise<void>) {
  await Promise.all(Array.from({ length: n }, async (_, i) => {
    while (!ctx.stopped()) await body(i);
  }));
}

/** A socket of the attacker whose frames are counted by kind; undefined (and the refusal counted) if it did not open. */
async function attackerSocket(ctx: AttackContext, cookie: string, onFrame: (kind: string, data: string) => void = () => {}) {
  try {
    const ws = await openSocket(ctx.url, cookie, ATTACKER_IP, (data) => {
      const kind = frameKind(data);
      bump(ctx.counts, `recv ${kind}`);
      onFrame(kind, data);
    });
    bump(ctx.counts, "upgrade opened");
    return ws;
  } catch {
    bump(ctx.counts, "upgrade refused");
  }
}

/** Counts a frame sent. */
function sendFrame(ctx: AttackContext, ws: WebSocket, frame: object) {
  if (ws.readyState !== WebSocket.OPEN) return;
  ws.send(JSON.stringify(frame));
  bump(ctx.counts, `sent ${(frame as { type: string }).type}`);
}

/** Mints a session from the attacker's address, counting the answer. */
async function attackerSession(ctx: AttackContext) {
  const { status, cookie } = await mint(ctx.url, ATTACKER_IP);
  bump(ctx.counts, `GET /api/me ${status}`);
  return cookie;
}

/** Waits until `done()` or `ms` passed. */
async function waitFor(done: () => boolean, ms: number) {
  const deadline = performance.now() + ms;
  while (!done() && performance.now() < deadline) await Bun.sleep(10);
}

const ATTACKS: Record<string, Attack> = {
  identities: {
    what: "8 loops: cookie-less GET /api/me → 20 sockets per user → 20 says (one address)",
    async run(ctx) {
      const sockets: WebSocket[] = [];
      await loops(8, ctx, async () => {
        const cookie = await attackerSession(ctx);
        if (!cookie) return;
        const opened = await Promise.all(Array.from({ length: 20 }, () => attackerSocket(ctx, cookie)));
        const open = opened.filter((ws): ws is WebSocket => ws !== undefined);
        sockets.push(...open);
        if (!open.length) return;
        sendFrame(ctx, open[0], { type: "join", room: "lobby" });
        for (let i = 0; i < 20; i++) sendFrame(ctx, open[0], { type: "say", room: "lobby", text: `minted ${i}`, ref: `a${i}` });
      });
      for (const ws of sockets) ws.close();
    },
  },

  "rooms-list": {
    what: `8 loops of GET /api/rooms with ${SEEDED_ROOMS.toLocaleString("en")} one-message rooms seeded (more than MAX_ROOMS allows, to measure the read path)`,
    seed: "rooms",
    async run(ctx) {
      await loops(8, ctx, async () => {
        const res = await fetch(`${ctx.url}/api/rooms`, { headers: xff(ATTACKER_IP) });
        bump(ctx.counts, "bytes received", (await res.arrayBuffer()).byteLength);
        bump(ctx.counts, `GET /api/rooms ${res.status}`);
      });
    },
  },

  "join-loop": {
    what: "4 users in loops: open → 100 join/leave pairs of the bystander's room → close",
    async setup(ctx) {
      const cookies: string[] = [];
      for (let i = 0; i < 4; i++) cookies.push((await attackerSession(ctx))!);
      return cookies;
    },
    async run(ctx, cookies: string[]) {
      await loops(4, ctx, async (i) => {
        let answered = 0;
        const ws = await attackerSocket(ctx, cookies[i], (kind) => void ((kind === "history" || kind.startsWith("error")) && answered++));
        if (!ws) return void (await Bun.sleep(50));
        for (let j = 0; j < 100; j++) {
          sendFrame(ctx, ws, { type: "join", room: "lobby" });
          sendFrame(ctx, ws, { type: "leave", room: "lobby" });
        }
        await waitFor(() => answered >= 100 || ctx.stopped(), 2000);
        ws.close();
      });
    },
  },

  history: {
    what: `20 sockets × leave + join with since 0 of a room of ${BIG_ROOM.messages} × ${BIG_ROOM.chars} CJK characters, reconnecting when refused`,
    seed: "big",
    async setup(ctx) {
      return attackerSession(ctx);
    },
    async run(ctx, cookie: string) {
      await loops(20, ctx, async () => {
        let answer = Promise.withResolvers<string>();
        const ws = await attackerSocket(ctx, cookie, (kind, data) => {
          if (kind === "history") bump(ctx.counts, "history bytes", Buffer.byteLength(data));
          if (kind === "history" || kind.startsWith("error")) answer.resolve(kind);
        });
        if (!ws) return void (await Bun.sleep(50));
        for (let j = 0; j < 100 && !ctx.stopped(); j++) {
          answer = Promise.withResolvers<string>();
          if (j > 0) sendFrame(ctx, ws, { type: "leave", room: "big" }); // a server may send no history to a rejoin
          sendFrame(ctx, ws, { type: "join", room: "big", since: 0 });
          const kind = await Promise.race([answer.promise, Bun.sleep(5000).then(() => "timeout")]);
          if (kind !== "history") break; // refused: a new connection had a new budget on the old server
        }
        ws.close();
      });
    },
  },

  "half-open": {
    what: "raw TCP connections sending only `GET / HTTP/1.1\\r\\n`, kept at N (one dropped by the server is opened again)",
    async run(ctx) {
      const sockets = new Set<{ end(): void }>();
      const partial = Buffer.from("GET / HTTP/1.1\r\n");
      const { hostname, port } = new URL(ctx.url);
      let ending = false; // from here on a close is ours
      const connect = () => Bun.connect({
        hostname, port: Number(port),
        socket: {
          data() {},
          close(s) {
            sockets.delete(s);
            if (!ending) bump(ctx.counts, "closed by server");
          },
          error() {},
        },
      });
      while (!ctx.stopped()) {
        const batch = Math.min(2000, ctx.halfOpen - sockets.size);
        if (batch <= 0) {
          await Bun.sleep(20);
          continue;
        }
        for (const r of await Promise.allSettled(Array.from({ length: batch }, connect))) {
          if (r.status === "rejected") {
            bump(ctx.counts, "connect failed");
            continue;
          }
          r.value.write(partial);
          sockets.add(r.value);
          bump(ctx.counts, "connections opened");
        }
        ctx.counts["most held at once"] = Math.max(ctx.counts["most held at once"] ?? 0, sockets.size);
      }
      ending = true;
      for (const s of sockets) s.end();
    },
  },

  rename: {
    what: "one address mints ≤200 users, each in 50 rooms with a crowd of 2,000 sockets (200 other addresses); every user renames as fast as allowed",
    bystanderRooms: ["r0"],
    async setup(ctx) {
      const crowd = { sockets: [] as WebSocket[], frames: {} as Counts };
      for (let a = 0; a < 200; a++) {
        const ip = `198.18.${a >> 8}.${a & 255}`;
        await Promise.all(Array.from({ length: 10 }, async (_, k) => {
          const { cookie } = await mint(ctx.url, ip);
          if (!cookie) return bump(ctx.counts, "crowd session refused");
          const ws = await openSocket(ctx.url, cookie, ip, (data) => bump(crowd.frames, frameKind(data))).catch(() => undefined);
          if (!ws) return bump(ctx.counts, "crowd upgrade refused");
          ws.send(JSON.stringify({ type: "join", room: `r${(a * 10 + k) % 50}` }));
          crowd.sockets.push(ws);
        }));
      }
      const users: WebSocket[] = [];
      for (let i = 0; i < 200; i++) {
        const cookie = await attackerSession(ctx);
        if (!cookie) break;
        const ws = await attackerSocket(ctx, cookie);
        if (!ws) break;
        for (let r = 0; r < 50; r++) sendFrame(ctx, ws, { type: "join", room: `r${r}` });
        users.push(ws);
      }
      ctx.counts["attacker users"] = users.length;
      ctx.counts["crowd sockets"] = crowd.sockets.length;
      return { crowd, users };
    },
    async run(ctx, { crowd, users }: { crowd: { sockets: WebSocket[]; frames: Counts }; users: WebSocket[] }) {
      const before = { ...crowd.frames };
      await loops(users.length, ctx, async (i) => {
        sendFrame(ctx, users[i], { type: "nick", name: `x${i}-${crypto.randomUUID().slice(0, 8)}` });
        await Bun.sleep(20);
      });
      for (const [kind, n] of Object.entries(crowd.frames)) if (n - (before[kind] ?? 0) > 0) ctx.counts[`crowd recv ${kind}`] = n - (before[kind] ?? 0);
      for (const ws of [...users, ...crowd.sockets]) ws.close();
    },
  },

  "rest-paging": {
    what: `8 loops paging GET /api/rooms/big/messages?limit=100 through ${BIG_ROOM.messages} × ${BIG_ROOM.chars} CJK characters`,
    seed: "big",
    async run(ctx) {
      await loops(8, ctx, async (i) => {
        for (let before = BIG_ROOM.messages + 1 - (i % 5) * 100; before > 1 && !ctx.stopped(); before -= 100) {
          const res = await fetch(`${ctx.url}/api/rooms/big/messages?limit=100&before=${before}`, { headers: xff(ATTACKER_IP) });
          bump(ctx.counts, "bytes received", (await res.arrayBuffer()).byteLength);
          bump(ctx.counts, `GET messages ${res.status}`);
        }
      });
    },
  },
};

/** The attacker process: setup, a ready line, the attack from "go" on stdin until the duration is over, the counts. */
async function attacker(name: string, url: string, durationS: number, halfOpen: number) {
  const attack = ATTACKS[name];
  let stopped = false;
  const ctx: AttackContext = { url, counts: {}, stopped: () => stopped, halfOpen };
  const state = await attack.setup?.(ctx);
  const setup = { ...ctx.counts };
  for (const key of Object.keys(ctx.counts)) if (!/^(attacker users|crowd sockets)$/.test(key)) delete ctx.counts[key];
  console.log(JSON.stringify({ event: "ready", setup }));
  const reader = Bun.stdin.stream().getReader();
  await reader.read(); // "go"
  setTimeout(() => (stopped = true), durationS * 1000);
  await attack.run(ctx, state);
  console.log(JSON.stringify({ event: "done", counts: ctx.counts }));
  await reader.read(); // alive until the coordinator is done measuring (and kills it)
  process.exit(0);
}

// ── The coordinator ──────────────────────────────────────────────────────────

/** The counters of /metrics (read from this machine, so allowed), by name with labels. */
async function metrics(url: string): Promise<Counts> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const out: Counts = {};
  for (const line of text.split("\n")) {
    const m = /^(chat_[a-z_]+_total(?:\{[^}]*\})?) (\d+(?:\.\d+)?)$/.exec(line);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

function diff(after: Counts, before: Counts): Counts {
  const out: Counts = {};
  for (const [k, v] of Object.entries(after)) if (v - (before[k] ?? 0)) out[k.replace(/^chat_|_total/g, "")] = v - (before[k] ?? 0);
  return out;
}

async function startServer(file: string): Promise<Child> {
  return spawnReady([BUN, join(ROOT, "server.ts")], {
    cwd: ROOT,
    env: { PORT: "0", HOST: "127.0.0.1", DATABASE_URL: `sqlite://${file}`, TRUSTED_PROXIES: "127.0.0.1" },
  });
}

/** Waits for the attacker's next JSON line of an event. */
async function nextEvent(lines: string[], event: string, timeoutMs: number) {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    for (const line of lines) {
      try {
        const parsed = JSON.parse(line);
        if (parsed.event === event) return parsed;
      } catch {}
    }
    if (performance.now() > deadline) throw new Error(`the attacker sent no ${event} line in ${timeoutMs} ms:\n${lines.slice(-20).join("\n")}`);
    await Bun.sleep(50);
  }
}

/** Spawns the attacker under nice and collects its stdout lines. */
function spawnAttacker(name: string, url: string, durationS: number, halfOpen: number) {
  const proc = Bun.spawn(["nice", "-n", "10", BUN, import.meta.path, "--role", "attacker", "--attack", name, "--url", url, "--duration", String(durationS), "--half-open", String(halfOpen)], {
    cwd: ROOT, stdin: "pipe", stdout: "pipe", stderr: "inherit",
  });
  const lines: string[] = [];
  void (async () => {
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const chunk of proc.stdout as unknown as AsyncIterable<Uint8Array>) {
      buffer += decoder.decode(chunk, { stream: true });
      const parts = buffer.split("\n");
      buffer = parts.pop()!;
      lines.push(...parts);
    }
  })();
  return { proc, lines };
}

/** A newcomer from an address of its own, during the attack: can a real user still get in? */
async function newcomer(url: string): Promise<string> {
  const { status, cookie } = await mint(url, "192.0.2.200");
  if (!cookie) return `GET /api/me ${status}`;
  return openSocket(url, cookie, "192.0.2.200").then((ws) => (ws.close(), "opened"), () => "upgrade refused");
}

async function runAttack(name: string, options: { durationS: number; baselineS: number; halfOpen: number }) {
  const attack = ATTACKS[name];
  const dir = mkdtempSync(join(tmpdir(), "chat-attack-"));
  const file = join(dir, "chat.db");
  let server: Child | undefined;
  let attackerProc: ReturnType<typeof spawnAttacker> | undefined;
  try {
    if (attack.seed) {
      await (await startServer(file)).stop(); // the server makes its own tables
      seed(file, attack.seed);
    }
    server = await startServer(file);
    const url = `http://127.0.0.1:${server.port}`;
    const pid = server.proc.pid;
    const bystander = await Bystander.start(url, attack.bystanderRooms ?? []);
    attackerProc = spawnAttacker(name, url, options.durationS, options.halfOpen);
    const { setup } = await nextEvent(attackerProc.lines, "ready", 120_000);
    await Bun.sleep(500); // the setup's last frames
    const probeCookie = (await mint(url, "192.0.2.99")).cookie!;

    const measure = async (seconds: number, during?: () => Promise<void>) => {
      const rows = dbRows(file);
      const bytes = dbBytes(file);
      const m0 = await metrics(url);
      const cpu0 = cpuMs(pid);
      const others = watchOthers([pid, process.pid, attackerProc!.proc.pid]);
      const probes = startProbes(url, pid, probeCookie);
      bystander.begin();
      await Promise.all([Bun.sleep(seconds * 1000), during?.()]);
      const cpu = cpuMs(pid) - cpu0;
      const otherCores = round(others(), 2);
      const echo = await bystander.end();
      return {
        echo, probes: await probes(), serverCpuMs: Math.round(cpu), otherCores,
        refused: diff(await metrics(url), m0), dbBytesGrowth: dbBytes(file) - bytes, rowsGrowth: diff(dbRows(file), rows),
      };
    };

    const baseline = await measure(options.baselineS);
    let newcomerResult = "";
    // "go" once the window has begun: the first second of an attack can be its worst
    const during = await measure(options.durationS, async () => {
      attackerProc!.proc.stdin.write("go\n");
      attackerProc!.proc.stdin.flush();
      await Bun.sleep(options.durationS * 900);
      newcomerResult = await newcomer(url);
    });
    const { counts } = await nextEvent(attackerProc.lines, "done", 60_000);
    // the rows the attack added: less the bystander's own stored says and the newcomer's session
    const attackRows = { ...during.rowsGrowth };
    attackRows.messages = (attackRows.messages ?? 0) - during.echo.echoed;
    for (const table of ["users", "sessions"]) if (newcomerResult !== "GET /api/me 429") attackRows[table] = (attackRows[table] ?? 0) - 1;
    bystander.close();
    const result = {
      attack: name, what: attack.what, when: new Date().toISOString(), serverSha: createHash("sha1").update(await Bun.file(join(ROOT, "server.ts")).bytes()).digest("hex").slice(0, 12),
      addresses: { attacker: ATTACKER_IP, bystander: "192.0.2.10-25", crowd: "198.18.0.0/16", note: "TRUSTED_PROXIES=127.0.0.1, addresses in X-Forwarded-For" },
      attackerNice: 10, durationS: options.durationS, baselineS: options.baselineS,
      attackerSetup: setup, attacker: counts, newcomer: newcomerResult, attackRows,
      p99Ratio: round(during.echo.p99Ms / baseline.echo.p99Ms, 2),
      baseline, during, dbBytes: dbBytes(file), rows: dbRows(file),
    };
    return result;
  } finally {
    attackerProc?.proc.kill("SIGKILL");
    await attackerProc?.proc.exited;
    await server?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

type Result = Awaited<ReturnType<typeof runAttack>>;

const mb = (bytes: number) => `${round(bytes / 2 ** 20, 1)} MB`;
const list = (counts: Counts, top = 6) => Object.entries(counts).filter(([, v]) => v !== 0).sort((a, b) => b[1] - a[1]).slice(0, top).map(([k, v]) => `${k} ${v.toLocaleString("en")}`).join(", ");

function table(results: Result[]): string {
  const head = "| attack | attacker sent / got | refused (/metrics) | db growth (the attack's rows) | bystander heard (1 socket) | echo p50 / p99 ms, without → during | p99 × | server CPU ms | server fds max; probes p99 ms (failed) | newcomer | other load (cores) |";
  const rows = results.map((r) => {
    const p = r.during.probes;
    return `| ${r.attack} | ${list(r.attacker)} | ${list(r.during.refused)} | ${mb(r.during.dbBytesGrowth)}; ${list(r.attackRows ?? {}) || "none"} | ${list(r.during.echo.frames, 4)} | ${r.baseline.echo.p50Ms} / ${r.baseline.echo.p99Ms} → ${r.during.echo.p50Ms} / ${r.during.echo.p99Ms} (no echo ${r.during.echo.noEcho}) | ${r.p99Ratio} | ${r.baseline.serverCpuMs} → ${r.during.serverCpuMs} | ${p.maxServerFds}; healthz ${p.healthz.p99Ms}, me ${p.me.p99Ms} (${p.failed}) | ${r.newcomer} | ${r.baseline.otherCores} / ${r.during.otherCores} |`;
  });
  return [head, `|${"---|".repeat(11)}`, ...rows].join("\n");
}

function arg(argv: string[], flag: string): string | undefined {
  const i = argv.indexOf(flag);
  return i >= 0 ? argv[i + 1] : undefined;
}

/** How many files this process may open (`ulimit -n`), from /proc. */
function fdLimit(): number {
  const line = readFileSync("/proc/self/limits", "utf8").split("\n").find((l) => l.startsWith("Max open files"));
  return Number(line?.split(/\s+/)[3] ?? 1024);
}

async function main(argv: string[]) {
  const durationS = Number(arg(argv, "--duration") ?? 5);
  const halfOpen = Number(arg(argv, "--half-open") ?? Math.min(19_990, fdLimit() - 50));
  if (arg(argv, "--role") === "attacker") return attacker(arg(argv, "--attack")!, arg(argv, "--url")!, durationS, halfOpen);
  const names = (arg(argv, "--attack") ?? Object.keys(ATTACKS).join(",")).split(",");
  for (const name of names) if (!ATTACKS[name]) throw new Error(`unknown attack ${name}; known: ${Object.keys(ATTACKS).join(", ")}`);
  const out = arg(argv, "--out") ?? join(import.meta.dir, "results", "attacks.jsonl");
  if (argv.includes("--table")) {
    // the latest line of each attack in the file
    const latest = new Map<string, Result>();
    for (const line of readFileSync(out, "utf8").split("\n")) if (line) latest.set(JSON.parse(line).attack, JSON.parse(line));
    return console.log(table(names.flatMap((name) => latest.get(name) ?? [])));
  }
  mkdirSync(join(out, ".."), { recursive: true });
  console.log(`attacker ${ATTACKER_IP} and bystander 192.0.2.x told apart by X-Forwarded-For (TRUSTED_PROXIES=127.0.0.1); attacker under nice -n 10; half-open holds ${halfOpen} (ulimit -n ${fdLimit()})`);
  const results: Result[] = [];
  for (const name of names) {
    console.log(`${name}: ${ATTACKS[name].what}`);
    await waitQuiet(0.3, 20_000); // the machine may be shared: start when others are quiet (bounded)
    const result = await runAttack(name, { durationS, baselineS: Number(arg(argv, "--baseline") ?? 5), halfOpen });
    appendFileSync(out, `${JSON.stringify(result)}\n`);
    console.log(`  p99 ${result.baseline.echo.p99Ms} → ${result.during.echo.p99Ms} ms (×${result.p99Ratio}); attacker: ${list(result.attacker)}`);
    results.push(result);
  }
  console.log(`\n${table(results)}`);
}

if (import.meta.main) await main(process.argv.slice(2));
