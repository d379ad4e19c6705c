// Test helpers: real servers, real sessions over HTTP, real WebSocket clients.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Rate, ServerMessage, settingsEnv, startServer, type ServerOptions } from "../server.ts";
import { RawSocket } from "./raw.ts";
import type { Services } from "./services.ts";

export const ROOT = join(import.meta.dir, "..");
export const BUN = process.execPath;

/** A fresh temp folder, removed by the returned cleanup. */
export function tempDir(prefix = "chat-test-") {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, [Symbol.dispose]: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Every test client comes from 127.0.0.1: the per-address limits are lifted unless a test sets them. */
export const ADDRESS_LIMITS_OFF = {
  sessionsPerAddress: "1000000/1s", upgradesPerAddress: "1000000/1s", maxConnectionsPerAddress: "1000000", rateLimitPerAddress: "1000000/1s", renameLimitPerAddress: "1000000/1s", requestsPerAddress: "1000000/1s",
} as const;
export const ADDRESS_LIMITS_OFF_ENV = settingsEnv(ADDRESS_LIMITS_OFF);

/**
 * Starts an in-process server on a free port. Unless `databaseUrl` names another, its database is a
 * SQLite file in a temp folder of its own (the production write path), removed after `stop()` on dispose.
 */
export async function serve(options: ServerOptions = {}) {
  const tmp = options.databaseUrl === undefined ? tempDir("chat-db-") : null;
  const databaseUrl = options.databaseUrl ?? `sqlite://${tmp!.dir}/chat.db`;
  const chat = await startServer({ port: 0, host: "127.0.0.1", ...ADDRESS_LIMITS_OFF, ...options, databaseUrl }).catch((error) => {
    tmp?.[Symbol.dispose]();
    throw error;
  });
  return Object.assign(chat, {
    async [Symbol.asyncDispose]() {
      try {
        await chat.stop();
      } finally {
        tmp?.[Symbol.dispose]();
      }
    },
  });
}

export type Session = { cookie: string; id: string; name: string; registered: boolean; admin: boolean };

/** Gets a new session the way a browser does: GET /api/me without a cookie. */
export async function newSession(baseUrl: string): Promise<Session> {
  const res = await fetch(`${baseUrl}/api/me`);
  if (res.status !== 200) throw new Error(`GET /api/me answered ${res.status}`);
  const setCookie = res.headers.get("set-cookie");
  if (!setCookie) throw new Error("GET /api/me set no cookie");
  const me = (await res.json()) as { id: string; name: string; registered: boolean; admin: boolean };
  return { cookie: setCookie.split(";")[0], ...me };
}

/** Renames a session's user with PUT /api/me, as the page does. */
export function putName(baseUrl: string, cookie: string, name: string) {
  return fetch(`${baseUrl}/api/me`, { method: "PUT", headers: { cookie, "content-type": "application/json" }, body: JSON.stringify({ name }) });
}

/** A room with `n` users: n new sessions (named in order), each connected, then each joined in turn. */
export async function usersInRoom(baseUrl: string, n: number, room: string) {
  const sessions: Session[] = [];
  for (let i = 0; i < n; i++) sessions.push(await newSession(baseUrl));
  const clients = await Promise.all(sessions.map((s) => Client.connect(baseUrl, s)));
  for (const client of clients) await client.join(room);
  return { sessions, clients };
}

/** A raw TCP WebSocket client (test/raw.ts) with this cookie, welcomed and joined to a room. */
export async function rawInRoom(baseUrl: string, cookie: string, room: string) {
  const raw = await RawSocket.open(baseUrl, { cookie });
  await raw.next((m) => m.type === "welcome");
  raw.sendJson({ type: "join", room });
  await raw.next((m) => m.type === "presence" && m.room === room);
  return raw;
}

/** Headers that make a `fetch` of /chat an upgrade request, for reading a refusal's status and body. */
export const UPGRADE = { connection: "Upgrade", upgrade: "websocket", "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==" };

/** The status a complete WebSocket handshake of /chat gets with these extra headers: 101 when it opened, 0 when no status came. */
export async function upgradeStatus(baseUrl: string, headers: Record<string, string> = {}): Promise<number> {
  return RawSocket.open(baseUrl, { headers }).then(
    (raw) => (raw.destroy(), 101),
    (error: Error) => Number(/answered (\d+)/.exec(error.message)?.[1] ?? 0),
  );
}

/** What the server makes of a cookie: the status of an upgrade with it, the user GET /api/me names, and whether that set a new session cookie. */
export async function cookieAnswers(baseUrl: string, cookie: string) {
  const upgrade = await upgradeStatus(baseUrl, { cookie });
  const me = await fetch(`${baseUrl}/api/me`, { headers: { cookie } });
  const { id } = (await me.json()) as { id: string };
  return { upgrade, id, newCookie: me.headers.get("set-cookie")?.startsWith("sid=") ?? false };
}

type Frame = ServerMessage;
type Pred<T extends Frame> = (f: Frame) => f is T;
type Diff = Extract<Frame, { type: "presence_diff" }>;

/** A presence_diff that names this user among its joins or its leaves. */
export const diffWith = (change: "joins" | "leaves", userId: string) => (f: Frame): f is Diff =>
  f.type === "presence_diff" && f[change].some((u) => u.id === userId);

/** A WebSocket client that validates every frame with the server's own schema. */
export class Client {
  readonly frames: Frame[] = [];
  readonly closed: Promise<{ code: number; reason: string }>;
  private taken = new Set<number>();
  private wake: (() => void) | null = null;
  private problem: Error | null = null;
  private constructor(readonly ws: WebSocket) {
    const { promise, resolve } = Promise.withResolvers<{ code: number; reason: string }>();
    this.closed = promise;
    ws.addEventListener("message", (e) => {
      if (typeof e.data !== "string") this.problem ??= new Error("server sent a binary frame");
      else {
        const parsed = ServerMessage.safeParse(JSON.parse(e.data));
        if (!parsed.success) this.problem ??= new Error(`frame breaks the schema: ${e.data}\n${parsed.error.message}`);
        else this.frames.push(parsed.data);
      }
      this.wake?.();
    });
    ws.addEventListener("close", (e) => {
      resolve({ code: e.code, reason: e.reason });
      this.wake?.();
    });
  }

  /** Opens /chat with a session cookie and waits for the welcome frame. */
  static async connect(baseUrl: string, session: Session | null, headers: Record<string, string> = {}) {
    const url = `${baseUrl.replace(/^http/, "ws")}/chat`;
    const ws = new WebSocket(url, { headers: { ...(session ? { cookie: session.cookie } : {}), ...headers } } as never);
    const client = new Client(ws);
    const opened = Promise.withResolvers<void>();
    ws.addEventListener("open", () => opened.resolve());
    ws.addEventListener("error", (e) => opened.reject(new Error(`cannot open ${url}: ${(e as ErrorEvent).message}`)));
    await opened.promise;
    await client.next((f) => f.type === "welcome");
    return client;
  }

  send(msg: object | string | Uint8Array) {
    this.ws.send(typeof msg === "object" && !(msg instanceof Uint8Array) ? JSON.stringify(msg) : msg);
  }

  /** Waits for the first frame not yet taken that matches, and takes it. */
  next<T extends Frame>(pred: Pred<T>, timeoutMs?: number): Promise<T>;
  next(pred: (f: Frame) => boolean, timeoutMs?: number): Promise<Frame & Record<string, any>>;
  async next<T extends Frame>(pred: Pred<T> | ((f: Frame) => boolean), timeoutMs = 5000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.problem) throw this.problem;
      const i = this.frames.findIndex((f, i) => !this.taken.has(i) && pred(f));
      if (i >= 0) {
        this.taken.add(i);
        return this.frames[i] as T;
      }
      if (this.ws.readyState === WebSocket.CLOSED) throw new Error(`socket closed while waiting; frames: ${JSON.stringify(this.untaken())}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for a frame; untaken: ${JSON.stringify(this.untaken()).slice(0, 2000)}`);
      const { promise, resolve } = Promise.withResolvers<void>();
      this.wake = resolve;
      const timer = setTimeout(resolve, left);
      await promise;
      clearTimeout(timer);
      this.wake = null;
    }
  }

  /** Takes frames of one type (and room) until `count` have arrived. */
  async collect<K extends Frame["type"]>(type: K, count: number, timeoutMs = 10_000) {
    const out: Extract<Frame, { type: K }>[] = [];
    const deadline = Date.now() + timeoutMs;
    const isType = (f: Frame): f is Extract<Frame, { type: K }> => f.type === type;
    while (out.length < count) out.push(await this.next(isType, Math.max(1, deadline - Date.now())));
    return out;
  }

  /** Who this client believes is in a room: its last presence list, with every later presence_diff applied (leaves, then joins). */
  people(room: string): string[] {
    const at = this.frames.findLastIndex((f) => f.type === "presence" && f.room === room);
    const ids = new Set(at < 0 ? [] : (this.frames[at] as Extract<Frame, { type: "presence" }>).users.map((u) => u.id));
    for (const f of this.frames.slice(at + 1)) {
      if (f.type !== "presence_diff" || f.room !== room) continue;
      for (const u of f.leaves) ids.delete(u.id);
      for (const u of f.joins) ids.add(u.id);
    }
    return [...ids].sort();
  }

  untaken(): Frame[] {
    return this.frames.filter((_, i) => !this.taken.has(i));
  }

  /** Joins a room and returns its history (presence follows and is taken too). */
  async join(room: string, since?: number) {
    this.send(since === undefined ? { type: "join", room } : { type: "join", room, since });
    const history = await this.next((f): f is Extract<Frame, { type: "history" }> => f.type === "history" && f.room === room);
    const presence = await this.next((f): f is Extract<Frame, { type: "presence" }> => f.type === "presence" && f.room === room);
    return { history, presence };
  }

  /** Joins with `since` and asks for every further page: the messages of all pages, and whether the first was complete. */
  async recover(room: string, since: number) {
    const isHistory = (f: Frame): f is Extract<Frame, { type: "history" }> => f.type === "history" && f.room === room;
    const { history, presence } = await this.join(room, since);
    const pages = [history];
    while (pages.at(-1)!.more) {
      this.send({ type: "history", room, after: pages.at(-1)!.seq });
      pages.push(await this.next(isHistory, 10_000));
    }
    return { pages, messages: pages.flatMap((p) => p.messages), complete: history.complete, presence };
  }

  /** Says something and waits for its own copy to come back. */
  async say(room: string, text: string, ref: string = crypto.randomUUID()) {
    this.send({ type: "say", room, text, ref });
    return this.next((f): f is Extract<Frame, { type: "message" }> => f.type === "message" && f.ref === ref);
  }

  close() {
    this.ws.close();
    return this.closed;
  }
}

/** Spawns `bun server.ts` (or another command) and waits for its JSON start line (a raw baseline says "ready"). */
export async function spawnServer(env: Record<string, string>, cmd: string[] = [BUN, join(ROOT, "server.ts")], cwd = ROOT) {
  const proc = Bun.spawn(cmd, { cwd, env: { ...process.env, PORT: "0", HOST: "127.0.0.1", ...ADDRESS_LIMITS_OFF_ENV, ...env }, stdout: "pipe", stderr: "pipe" });
  const lines: string[] = [];
  const reader = proc.stdout.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const ready = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`server exited before ready: ${lines.join("\n")}\n${await new Response(proc.stderr).text()}`);
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        lines.push(line);
        try {
          const event = JSON.parse(line);
          if (event.event === "start" || event.event === "ready") return event as { port: number; url: string };
        } catch {}
      }
    }
  })();
  const timeout = setTimeout(() => proc.kill(9), 30_000);
  const { port } = await ready.finally(() => clearTimeout(timeout));
  // keep draining stdout so the child never blocks on a full pipe
  void (async () => {
    for (;;) {
      const { value, done } = await reader.read().catch(() => ({ value: undefined, done: true }));
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      lines.push(...buffer.split("\n").slice(0, -1));
      buffer = buffer.slice(buffer.lastIndexOf("\n") + 1);
    }
  })();
  return {
    proc,
    port,
    url: `http://127.0.0.1:${port}`,
    lines,
    async [Symbol.asyncDispose]() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(9);
      await proc.exited;
    },
  };
}

export type Spawned = Awaited<ReturnType<typeof spawnServer>>;

/**
 * One `bun server.ts` per node id on the shared Redis and a fresh Postgres database (`env` may name
 * others), started one at a time: the first creates the tables and the session secret. Disposing stops them all.
 */
export async function spawnCluster(services: Services, nodeIds: string[], env: Record<string, string> = {}) {
  const shared = { REDIS_URL: services.redis.url, DATABASE_URL: env.DATABASE_URL ?? (await services.pg.createDatabase()), ...env };
  const nodes: Spawned[] = [];
  const stopAll = async () => {
    for (const node of [...nodes].reverse()) await node[Symbol.asyncDispose]();
  };
  try {
    for (const id of nodeIds) nodes.push(await spawnServer({ ...shared, NODE_ID: id }));
  } catch (error) {
    await stopAll();
    throw error;
  }
  return { nodes, env: shared, [Symbol.asyncDispose]: stopAll };
}

/**
 * Sends a frame until it is answered with something other than `unavailable` (a database pool reconnects on its
 * own after an outage), and returns that answer.
 */
export async function retryUntilServed(client: Client, frame: Record<string, unknown>, answered: (f: Frame) => boolean, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    client.send(frame);
    const f = await client.next((f) => answered(f) || (f.type === "error" && f.code === "unavailable"), 10_000);
    if (f.type !== "error" || f.code !== "unavailable") return f;
    if (Date.now() > deadline) throw new Error(`still unavailable: ${JSON.stringify(frame)}`);
    await Bun.sleep(100);
  }
}

/** Polls `check` until it returns a truthy value or the time is up. */
export async function until<T>(check: () => T | Promise<T>, timeoutMs = 5000, what = "condition"): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(20);
  }
}

/** The per-address limits at their defaults (serve() above lifts them), and X-Forwarded-For trusted from loopback. */
export const DEFAULT_LIMITS = {
  sessionsPerAddress: undefined, upgradesPerAddress: undefined, maxConnectionsPerAddress: undefined, rateLimitPerAddress: undefined, renameLimitPerAddress: undefined, requestsPerAddress: undefined, trustedProxies: "127.0.0.1",
};

/** What a token bucket of `rate` lets through in `ms`: the full bucket, and what refilled meanwhile. */
export const allowed = (rate: Rate, ms: number) => rate.count + Math.ceil((ms * rate.count) / rate.perMs);

/** A guest session minted from `ip`, or the status of the refusal. */
export async function mintFrom(baseUrl: string, ip: string): Promise<Session | number> {
  const res = await fetch(`${baseUrl}/api/me`, { headers: { "x-forwarded-for": ip } });
  if (res.status !== 200) return (await res.arrayBuffer(), res.status);
  const me = (await res.json()) as Omit<Session, "cookie">;
  return { cookie: res.headers.get("set-cookie")!.split(";")[0], ...me };
}

/** A session from `ip` that must be granted. */
export async function sessionFrom(baseUrl: string, ip: string): Promise<Session> {
  const session = await mintFrom(baseUrl, ip);
  if (typeof session === "number") throw new Error(`GET /api/me from ${ip} answered ${session}`);
  return session;
}
