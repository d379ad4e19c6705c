// A real-time chat server: Bun's native WebSocket pub/sub, Hono for HTTP and
// sessions, zod for the wire format, Bun.SQL (SQLite or Postgres) for history.
// Read top to bottom: config → protocol → store → server state → HTTP →
// WebSocket → startup.
import { type Server, type ServerWebSocket, SQL } from "bun";
import { Hono, type Context } from "hono";
import { getSignedCookie, setSignedCookie } from "hono/cookie";
import * as z from "zod";
import page from "./client.html" with { type: "text" };

const CLIENT_HTML = page as unknown as string; // bun-types types *.html as HTMLBundle
const TOPIC_PREFIX = "room:";
const MAX_FRAME = 64 * 1024; // larger frames close the socket with 1009 (Bun does it)
const BACKPRESSURE_LIMIT = 1024 * 1024; // per socket; past it the socket is closed
const SLOW_SWEEP_MS = 200; // how often buffered amounts are sampled for metrics
const SHUTDOWN_TIMEOUT_MS = 8_000;
const UNUSED_SESSION_TTL_MS = 60 * 60 * 1000;

// ── Config: env and flags, parsed once ──────────────────────────────────────

const RatePattern = /^(\d+)\/(\d+(?:\.\d+)?)s$/;
const Rate = z
  .string()
  .regex(RatePattern, "expected <count>/<seconds>s, e.g. 20/10s")
  .transform((s) => {
    const [, count, seconds] = RatePattern.exec(s)!;
    return { count: Number(count), perMs: Number(seconds) * 1000 };
  })
  .refine((r) => r.count > 0 && r.perMs > 0, "count and seconds must be positive");

const Int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

export const Config = z.object({
  port: Int(0, 65535).default(3000),
  host: z.string().min(1).default("0.0.0.0"),
  databaseUrl: z.string().min(1).default("sqlite://chat.db"),
  sessionSecret: z.string().min(16, "must be at least 16 characters").optional(),
  allowedOrigins: z
    .string()
    .transform((s) => s.split(",").map((o) => o.trim()).filter(Boolean))
    .pipe(z.array(z.url()))
    .optional(),
  historyOnJoin: Int(0, 1000).default(50),
  recoveryLimit: Int(1, 10_000).default(500),
  maxText: Int(1, 32_000).default(2000),
  rateLimit: Rate.default("20/10s"),
  renameLimit: Rate.default("5/60s"),
  maxConnections: Int(1, 1_000_000).default(10_000),
  maxConnectionsPerUser: Int(1, 10_000).default(20),
  maxRoomsPerConnection: Int(1, 10_000).default(50),
  maxUnusedSessions: Int(1, 100_000_000).default(100_000),
  idleTimeout: Int(1, 960).default(60),
  redisUrl: z.string().optional(),
  nodeId: z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/).optional(),
});
export type Config = z.output<typeof Config>;
type ConfigInput = z.input<typeof Config>;

const ENV_KEYS: Record<keyof Config, string> = {
  port: "PORT",
  host: "HOST",
  databaseUrl: "DATABASE_URL",
  sessionSecret: "SESSION_SECRET",
  allowedOrigins: "ALLOWED_ORIGINS",
  historyOnJoin: "HISTORY_ON_JOIN",
  recoveryLimit: "RECOVERY_LIMIT",
  maxText: "MAX_TEXT",
  rateLimit: "RATE_LIMIT",
  renameLimit: "RENAME_LIMIT",
  maxConnections: "MAX_CONNECTIONS",
  maxConnectionsPerUser: "MAX_CONNECTIONS_PER_USER",
  maxRoomsPerConnection: "MAX_ROOMS_PER_CONNECTION",
  maxUnusedSessions: "MAX_UNUSED_SESSIONS",
  idleTimeout: "IDLE_TIMEOUT",
  redisUrl: "REDIS_URL",
  nodeId: "NODE_ID",
};
const FLAGS: Record<string, keyof Config> = {
  "--port": "port",
  "--host": "host",
  "--db": "databaseUrl",
  "--redis": "redisUrl",
};

export const HELP = `Usage: bun run server.ts [--port N] [--host ADDR] [--db URL] [--redis URL]

Environment (flags win over env):
  PORT=3000                    --port   TCP port (0 picks a free one)
  HOST=0.0.0.0                 --host   address to listen on
  DATABASE_URL=sqlite://chat.db  --db   sqlite://file, :memory: or postgres://user@host/db
  REDIS_URL=                   --redis  redis://host:port turns on cluster fan-out
  SESSION_SECRET=              cookie signing key (default: generated, kept in the database)
  ALLOWED_ORIGINS=             comma list of origins allowed to open /chat (default: same host)
  HISTORY_ON_JOIN=50  RECOVERY_LIMIT=500  MAX_TEXT=2000
  RATE_LIMIT=20/10s  RENAME_LIMIT=5/60s
  MAX_CONNECTIONS=10000  MAX_CONNECTIONS_PER_USER=20  MAX_ROOMS_PER_CONNECTION=50
  MAX_UNUSED_SESSIONS=100000  IDLE_TIMEOUT=60  NODE_ID=`;

export class ConfigError extends Error {}

/** Collects raw settings from env and argv (flags win); throws ConfigError on an unknown flag. */
export function readSettings(env: Record<string, string | undefined>, argv: string[] = []): Record<string, string> {
  const raw: Record<string, string> = {};
  for (const [key, name] of Object.entries(ENV_KEYS)) {
    if (env[name] !== undefined && env[name] !== "") raw[key] = env[name];
  }
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const key = FLAGS[flag];
    if (!key) throw new ConfigError(`Cannot parse flags: unknown flag ${flag} (see --help)`);
    const value = inline ?? argv[++i];
    if (value === undefined) throw new ConfigError(`Cannot parse flags: ${flag} needs a value`);
    raw[key] = value;
  }
  return raw;
}

/** Validates settings; throws ConfigError with one line naming the bad one. */
export function parseConfig(raw: Record<string, unknown>): Config {
  const result = Config.safeParse(raw);
  if (!result.success) {
    const issue = result.error.issues[0];
    const key = issue.path[0] as keyof Config;
    throw new ConfigError(`Cannot parse ${ENV_KEYS[key] ?? key}=${JSON.stringify(raw[key])}: ${issue.message}`);
  }
  return result.data;
}

// ── Protocol: the only definition of the wire format ────────────────────────

// C0 controls other than tab/newline/CR, and DEL: invisible and unsafe to store
const CONTROL = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F]/;
export const Room = z.string().regex(/^[a-z0-9][a-z0-9_-]{0,31}$/, "room must match ^[a-z0-9][a-z0-9_-]{0,31}$");
export const Name = z
  .string()
  .trim()
  .min(1, "name is empty")
  .max(32, "name is longer than 32 characters")
  .refine((s) => !CONTROL.test(s) && !/[\u0080-\u009F\u2028\u2029]/.test(s), "name has control characters")
  .refine((s) => s.isWellFormed(), "name has a lone surrogate");
export const Text = z
  .string()
  .min(1, "text is empty")
  .refine((s) => !CONTROL.test(s), "text has control characters")
  .refine((s) => s.isWellFormed(), "text has a lone surrogate");
export const Ref = z.string().max(64, "ref is longer than 64 characters");
export const MessageId = z.number().int().nonnegative();
export const User = z.strictObject({ id: z.string(), name: z.string() });
export type User = z.infer<typeof User>;

export const ClientMessage = z.discriminatedUnion("type", [
  z.strictObject({ type: z.literal("join"), room: Room, since: MessageId.optional() }),
  z.strictObject({ type: z.literal("leave"), room: Room }),
  z.strictObject({ type: z.literal("say"), room: Room, text: Text, ref: Ref.optional() }),
  z.strictObject({ type: z.literal("typing"), room: Room }),
  z.strictObject({ type: z.literal("nick"), name: Name }),
]);
export type ClientMessage = z.infer<typeof ClientMessage>;

export const Message = z.strictObject({
  type: z.literal("message"),
  room: Room,
  id: MessageId,
  user: User,
  text: z.string(),
  ts: z.number(),
  ref: Ref.optional(),
});
export type Message = z.infer<typeof Message>;

export const ErrorCode = z.enum([
  "bad_request",
  "not_joined",
  "rate_limited",
  "name_taken",
  "limit_exceeded",
  "unavailable",
]);
export type ErrorCode = z.infer<typeof ErrorCode>;

export const ServerMessage = z.discriminatedUnion("type", [
  z.strictObject({ type: z.literal("welcome"), user: User, maxText: z.number().int() }),
  z.strictObject({ type: z.literal("history"), room: Room, messages: z.array(Message), complete: z.boolean() }),
  z.strictObject({ type: z.literal("presence"), room: Room, users: z.array(User) }),
  Message,
  z.strictObject({ type: z.literal("joined"), room: Room, user: User }),
  z.strictObject({ type: z.literal("left"), room: Room, user: User }),
  z.strictObject({ type: z.literal("renamed"), user: User, previous: z.string() }),
  z.strictObject({ type: z.literal("typing"), room: Room, user: User }),
  z.strictObject({
    type: z.literal("error"),
    code: ErrorCode,
    message: z.string(),
    ref: Ref.optional(),
    retryAfterMs: z.number().int().nonnegative().optional(),
  }),
]);
export type ServerMessage = z.infer<typeof ServerMessage>;

export const RenameBody = z.strictObject({ name: Name });
export const MessagesQuery = z.strictObject({
  before: z.coerce.number().int().positive().optional(),
  limit: z.coerce.number().int().min(1).max(100).default(50),
});

type Parsed<T> = { ok: true; value: T } | { ok: false; error: string; ref?: string };

/** Describes the first zod issue as `path: message`. */
function describe(error: z.ZodError): string {
  const issue = error.issues[0];
  if (issue.path.length === 0 && issue.code === "invalid_type") return "frame must be a JSON object with a type";
  const path = issue.path.join(".");
  return path ? `${path}: ${issue.message}` : issue.message;
}

/** Parses one client frame; never throws. */
export function parseClientMessage(raw: string | Buffer): Parsed<ClientMessage> {
  if (typeof raw !== "string") return { ok: false, error: "binary frames are not accepted; send JSON text" };
  let json: unknown;
  try {
    json = JSON.parse(raw);
  } catch {
    return { ok: false, error: "invalid JSON" };
  }
  const result = ClientMessage.safeParse(json);
  if (result.success) return { ok: true, value: result.data };
  // echo a well-formed ref so the client can pin the error on its message
  const ref = (json as { ref?: unknown })?.ref;
  const safeRef = typeof ref === "string" && ref.length <= 64 ? ref : undefined;
  return { ok: false, error: describe(result.error), ref: safeRef };
}

// ── Store: all SQL lives here (SQLite or Postgres through Bun.SQL) ───────────

type Session = { sid: string; id: string; name: string; used: boolean };
type NewMessage = { room: string; user: User; text: string; ts: number; ref?: string };

/** Opens the database named by a URL (sqlite://file, :memory:, postgres://…). */
export async function openStore(url: string) {
  const postgres = /^postgres(ql)?:\/\//.test(url);
  const sql = postgres ? new SQL(url, { max: 8 }) : new SQL(url === ":memory:" ? "sqlite://:memory:" : url);
  // SQLite has one connection: a query during a transaction would see its
  // uncommitted rows, so every SQLite call is serialized.
  let tail: Promise<unknown> = Promise.resolve();
  function serial<T>(fn: () => Promise<T>): Promise<T> {
    if (postgres) return fn();
    const run = tail.then(fn, fn);
    tail = run.catch(() => {});
    return run;
  }
  /** count(*), ids and BIGINTs come back as strings on Postgres: convert here. */
  const num = (v: unknown) => Number(v);
  const toMessage = (r: any): Message => {
    const m: Message = { type: "message", room: r.room, id: num(r.id), user: { id: r.user_id, name: r.name }, text: r.text, ts: num(r.ts) };
    if (r.ref != null) m.ref = r.ref;
    return m;
  };

  if (!postgres) {
    await sql`PRAGMA journal_mode = WAL`;
    // NORMAL in WAL mode survives a process crash (kill -9); only an OS crash or power loss can drop the last commits
    await sql`PRAGMA synchronous = NORMAL`;
    await sql`PRAGMA busy_timeout = 5000`;
  }
  await sql`CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`;
  await sql`CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)`;
  await sql`CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY, user_id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, name_key TEXT NOT NULL UNIQUE,
    created BIGINT NOT NULL, used INTEGER NOT NULL DEFAULT 0)`;
  await sql`CREATE INDEX IF NOT EXISTS sessions_unused ON sessions (used, created)`;
  await sql`CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, last_id BIGINT NOT NULL)`;
  await sql`CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL, id BIGINT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL,
    text TEXT NOT NULL, ts BIGINT NOT NULL, ref TEXT, PRIMARY KEY (room, id))`;

  const nameKey = (name: string) => name.normalize("NFKC").toLowerCase();

  return {
    kind: postgres ? ("postgres" as const) : ("sqlite" as const),
    sql,

    /** The shared signing secret: generated once, first writer wins. */
    secret: (fresh: string) =>
      serial(async () => {
        await sql`INSERT INTO meta (key, value) VALUES ('session_secret', ${fresh}) ON CONFLICT (key) DO NOTHING`;
        const [row] = await sql`SELECT value FROM meta WHERE key = 'session_secret'`;
        return row.value as string;
      }),

    findSession: (sid: string) =>
      serial(async (): Promise<Session | undefined> => {
        const [r] = await sql`SELECT sid, user_id, name, used FROM sessions WHERE sid = ${sid}`;
        return r && { sid: r.sid, id: r.user_id, name: r.name, used: num(r.used) === 1 };
      }),

    /** Creates the session row with a fresh default name `user<N>`. */
    createSession: (sid: string) =>
      serial(async (): Promise<Session> => {
        const id = `u${randomId(9)}`;
        for (let attempt = 0; attempt < 20; attempt++) {
          const [{ value }] = await sql`INSERT INTO counters (name, value) VALUES ('user', 1)
            ON CONFLICT (name) DO UPDATE SET value = counters.value + 1 RETURNING value`;
          const name = `user${num(value)}`;
          const rows = await sql`INSERT INTO sessions (sid, user_id, name, name_key, created)
            VALUES (${sid}, ${id}, ${name}, ${nameKey(name)}, ${Date.now()}) ON CONFLICT DO NOTHING RETURNING user_id`;
          if (rows.length) return { sid, id, name, used: false };
          const existing = await sql`SELECT sid, user_id, name, used FROM sessions WHERE sid = ${sid}`;
          if (existing.length) return { sid, id: existing[0].user_id, name: existing[0].name, used: num(existing[0].used) === 1 };
        }
        throw new Error("Cannot create session: no free default name");
      }),

    markUsed: (sid: string) => serial(() => sql`UPDATE sessions SET used = 1 WHERE sid = ${sid} AND used = 0`),

    /** Renames a user and returns the previous name; undefined when another user holds the name (case-insensitive). */
    rename: (userId: string, name: string) =>
      serial(async (): Promise<string | undefined> => {
        const [old] = await sql`SELECT name FROM sessions WHERE user_id = ${userId}`;
        if (!old) throw new Error(`Cannot rename: no user ${userId}`);
        try {
          const rows = await sql`UPDATE sessions SET name = ${name}, name_key = ${nameKey(name)}, used = 1
            WHERE user_id = ${userId} AND NOT EXISTS (
              SELECT 1 FROM sessions s2 WHERE s2.name_key = ${nameKey(name)} AND s2.user_id <> ${userId})
            RETURNING name`;
          return rows.length > 0 ? (old.name as string) : undefined;
        } catch (e) {
          if (/unique|duplicate/i.test(String((e as Error).message))) return undefined;
          throw e;
        }
      }),

    /** Deletes sessions that never connected or renamed: old ones, then the oldest past the cap. */
    pruneSessions: (olderThan: number, keep: number) =>
      serial(async () => {
        await sql`DELETE FROM sessions WHERE used = 0 AND created < ${olderThan}`;
        const [{ n }] = await sql`SELECT count(*) AS n FROM sessions WHERE used = 0`;
        const excess = num(n) - keep;
        if (excess > 0) {
          await sql`DELETE FROM sessions WHERE sid IN (
            SELECT sid FROM sessions WHERE used = 0 ORDER BY created LIMIT ${excess})`;
        }
      }),

    countSessions: () =>
      serial(async () => {
        const [{ n }] = await sql`SELECT count(*) AS n FROM sessions`;
        return num(n);
      }),

    /**
     * Stores messages in one transaction. Ids come from the room's counter row,
     * which the transaction holds locked, so ids are gap-free and commit in order.
     */
    append: (batch: NewMessage[]) =>
      serial(() =>
        sql.begin(async (tx) => {
          const byRoom = new Map<string, number[]>();
          batch.forEach((m, i) => {
            const list = byRoom.get(m.room);
            list ? list.push(i) : byRoom.set(m.room, [i]);
          });
          const ids = new Array<number>(batch.length);
          for (const [room, indexes] of byRoom) {
            const [{ last_id }] = await tx`INSERT INTO rooms (name, last_id) VALUES (${room}, ${indexes.length})
              ON CONFLICT (name) DO UPDATE SET last_id = rooms.last_id + ${indexes.length} RETURNING last_id`;
            let id = num(last_id) - indexes.length;
            for (const i of indexes) ids[i] = ++id;
          }
          const rows = batch.map((m, i) => ({
            room: m.room, id: ids[i], user_id: m.user.id, name: m.user.name, text: m.text, ts: m.ts, ref: m.ref ?? null,
          }));
          for (let i = 0; i < rows.length; i += 1000) await tx`INSERT INTO messages ${tx(rows.slice(i, i + 1000))}`;
          return ids;
        }),
      ),

    /** The newest `limit` messages of a room (oldest first) and its last id. */
    tail: (room: string, limit: number) =>
      serial(async () => {
        const [r] = await sql`SELECT last_id FROM rooms WHERE name = ${room}`;
        const rows = await sql`SELECT * FROM messages WHERE room = ${room} ORDER BY id DESC LIMIT ${limit}`;
        return { lastId: r ? num(r.last_id) : 0, messages: rows.reverse().map(toMessage) as Message[] };
      }),

    /** Messages with after < id < before, oldest first. */
    between: (room: string, after: number, before: number) =>
      serial(async () => {
        const rows = await sql`SELECT * FROM messages WHERE room = ${room} AND id > ${after} AND id < ${before} ORDER BY id`;
        return rows.map(toMessage) as Message[];
      }),

    /** Scrollback: up to `limit` messages before an id, oldest first. */
    before: (room: string, before: number, limit: number) =>
      serial(async () => {
        const rows = await sql`SELECT * FROM messages WHERE room = ${room} AND id < ${before} ORDER BY id DESC LIMIT ${limit}`;
        return rows.reverse().map(toMessage) as Message[];
      }),

    rooms: (limit: number) =>
      serial(async () => {
        const rows = await sql`SELECT name, last_id FROM rooms ORDER BY last_id DESC LIMIT ${limit}`;
        return rows.map((r: any) => ({ name: r.name as string, lastId: num(r.last_id) }));
      }),

    close: () => serial(() => sql.close()),
  };
}
export type Store = Awaited<ReturnType<typeof openStore>>;

function randomId(bytes: number): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(bytes))).toString("base64url");
}

// ── Server state: everything lives inside startServer, so each call starts empty ──

type Bucket = { tokens: number; at: number };
type LocalUser = { id: string; name: string; sid: string; sockets: Set<ChatSocket> };
/** rooms: true once joined (history sent, subscribed); false while the join waits for the room to load. */
type SocketData = { user: LocalUser; rooms: Map<string, boolean>; buffered: number; closed: boolean };
type ChatSocket = ServerWebSocket<SocketData>;
/** A room as this process sees it: local sockets, presence and the recent tail. */
type RoomState = {
  name: string;
  topic: string;
  sockets: Set<ChatSocket>;
  members: Map<string, { user: User; conns: number }>;
  lastId: number;
  ring: { id: number; frame: string }[]; // the newest messages, as sent
  waiting: Message[] | null; // messages held while the room loads or a gap fills
  ready: Promise<void>;
  historyFrame: string | null; // cached reply to a join without `since`
};

export type ServerOptions = Partial<ConfigInput> & {
  /** Logs one JSON line per event; off in tests. */
  log?: (event: Record<string, unknown>) => void;
};

/** Starts a chat server; resolves once it listens. */
export async function startServer(options: ServerOptions = {}) {
  const { log = () => {}, ...input } = options;
  const config = Config.parse(input);
  const store = await openStore(config.databaseUrl);
  const secret = config.sessionSecret ?? (await store.secret(randomId(32)));
  const ringSize = Math.max(config.recoveryLimit, config.historyOnJoin);

  const rooms = new Map<string, RoomState>();
  const users = new Map<string, LocalUser>();
  const sayBuckets = new Map<string, Bucket>();
  const renameBuckets = new Map<string, Bucket>();
  const typingSeen = new Map<string, number>();
  const sockets = new Set<ChatSocket>();
  const metrics = {
    messagesReceived: 0,
    messagesPublished: 0,
    framesRejected: 0,
    rateLimited: 0,
    slowConsumersClosed: 0,
    connectionsRefused: 0,
    storeErrors: 0,
  };
  let shuttingDown = false;
  let stopped = false;
  let server!: Server<SocketData>;

  /** Takes one token from a bucket; returns 0 or the ms until one is free. */
  function take(buckets: Map<string, Bucket>, key: string, rate: { count: number; perMs: number }): number {
    const now = performance.now();
    const b = buckets.get(key) ?? { tokens: rate.count, at: now };
    b.tokens = Math.min(rate.count, b.tokens + ((now - b.at) * rate.count) / rate.perMs);
    b.at = now;
    buckets.set(key, b);
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return 0;
    }
    return Math.ceil(((1 - b.tokens) * rate.perMs) / rate.count);
  }

  function send(ws: ChatSocket, msg: ServerMessage) {
    ws.send(JSON.stringify(msg));
  }

  function sendError(ws: ChatSocket, code: ErrorCode, message: string, extra: { ref?: string; retryAfterMs?: number } = {}) {
    send(ws, { type: "error", code, message, ...extra });
  }

  // Rooms: loaded on the first local join, dropped when the last local socket leaves.

  function getRoom(name: string): RoomState {
    let room = rooms.get(name);
    if (room) return room;
    room = {
      name, topic: TOPIC_PREFIX + name, sockets: new Set(), members: new Map(), lastId: 0, ring: [],
      waiting: [], ready: Promise.resolve(), historyFrame: null,
    };
    rooms.set(name, room);
    room.ready = load(room);
    return room;
  }

  async function load(room: RoomState) {
    try {
      const { lastId, messages } = await store.tail(room.name, ringSize);
      room.ring = messages.map((m) => ({ id: m.id, frame: JSON.stringify(m) }));
      room.lastId = Math.max(lastId, messages.at(-1)?.id ?? 0);
      await catchUp(room);
    } catch (error) {
      log({ event: "error", where: "load room", room: room.name, error: String(error) });
      rooms.delete(room.name);
      room.waiting = null;
    }
    if (room.sockets.size === 0) rooms.delete(room.name);
  }

  /** Delivers messages in id order, exactly once; ids at or below lastId were delivered already. */
  function deliver(room: RoomState, msg: Message) {
    if (room.waiting) return void room.waiting.push(msg);
    if (msg.id <= room.lastId) return;
    if (msg.id === room.lastId + 1) return apply(room, msg);
    // a gap: ids commit in order, so the missing ones are in the store; fetch them first
    room.waiting = [msg];
    room.ready = catchUp(room);
  }

  function apply(room: RoomState, msg: Message) {
    const frame = JSON.stringify(msg);
    room.lastId = msg.id;
    room.ring.push({ id: msg.id, frame });
    if (room.ring.length >= ringSize * 2) room.ring = room.ring.slice(-ringSize);
    room.historyFrame = null;
    server.publish(room.topic, frame);
    metrics.messagesPublished++;
  }

  /** Applies held messages in order, fetching missing ids from the store; ends with waiting = null. */
  async function catchUp(room: RoomState) {
    let failures = 0;
    while (room.waiting!.length) {
      const queue = room.waiting!.sort((a, b) => a.id - b.id);
      room.waiting = [];
      let i = 0;
      for (; i < queue.length && queue[i].id <= room.lastId + 1; i++) {
        if (queue[i].id === room.lastId + 1) apply(room, queue[i]);
      }
      if (i === queue.length) continue;
      const rest = queue.slice(i);
      const missing = await store.between(room.name, room.lastId, rest[0].id).catch((error) => {
        log({ event: "error", where: "fill gap", room: room.name, error: String(error) });
        return [] as Message[];
      });
      if (missing.length === 0 && ++failures >= 5) {
        room.lastId = rest[0].id - 1; // the store cannot fill it: move on; clients see the gap and rejoin with since
      } else if (missing.length === 0) {
        await Bun.sleep(50 * failures);
      }
      room.waiting!.push(...missing, ...rest);
    }
    room.waiting = null;
  }

  /** The history frame for a join, from the in-memory tail: exact and synchronous. */
  function historyFrame(room: RoomState, since: number | undefined): string {
    const { ring, lastId } = room;
    if (since === undefined && room.historyFrame) return room.historyFrame;
    let count: number;
    let complete: boolean;
    if (since === undefined || since > lastId) {
      // a fresh join, or a client ahead of the server (its database was reset): the newest messages
      count = Math.min(config.historyOnJoin, ring.length);
      const firstId = count ? ring[ring.length - count].id : lastId + 1;
      complete = since === undefined && firstId === 1;
    } else {
      count = Math.min(lastId - since, config.recoveryLimit);
      complete = lastId - since <= config.recoveryLimit;
    }
    const items = ring.slice(ring.length - count).map((e) => e.frame);
    const frame = `{"type":"history","room":"${room.name}","messages":[${items.join(",")}],"complete":${complete}}`;
    if (since === undefined) room.historyFrame = frame;
    return frame;
  }

  function presenceOf(room: RoomState): User[] {
    return [...room.members.values()].map((m) => ({ id: m.user.id, name: m.user.name }));
  }

  function userOf(ws: ChatSocket): User {
    return { id: ws.data.user.id, name: ws.data.user.name };
  }

  // Joining and leaving

  async function join(ws: ChatSocket, roomName: string, since: number | undefined) {
    const data = ws.data;
    if (!data.rooms.has(roomName) && data.rooms.size >= config.maxRoomsPerConnection) {
      return sendError(ws, "limit_exceeded", `Cannot join ${roomName}: at most ${config.maxRoomsPerConnection} rooms per connection`);
    }
    const room = getRoom(roomName);
    const rejoin = data.rooms.get(roomName) === true;
    if (!rejoin) data.rooms.set(roomName, false); // reserved: a leave or close meanwhile cleans up
    room.sockets.add(ws);
    while (room.waiting) await room.ready;
    if (data.closed || !data.rooms.has(roomName)) return;
    if (rooms.get(roomName) !== room) {
      leave(ws, roomName);
      return sendError(ws, "unavailable", `Cannot join ${roomName}: history is unavailable, try again`);
    }
    // from here on nothing awaits: history up to lastId, then live messages after it, exactly
    ws.sendText(historyFrame(room, since));
    if (!rejoin) {
      data.rooms.set(roomName, true);
      ws.subscribe(room.topic);
      const user = userOf(ws);
      const member = room.members.get(user.id);
      if (member) member.conns++;
      else {
        room.members.set(user.id, { user, conns: 1 });
        ws.publish(room.topic, JSON.stringify({ type: "joined", room: roomName, user } satisfies ServerMessage));
      }
    }
    send(ws, { type: "presence", room: roomName, users: presenceOf(room) });
  }

  function leave(ws: ChatSocket, roomName: string) {
    const data = ws.data;
    const joined = data.rooms.get(roomName);
    if (joined === undefined) return;
    data.rooms.delete(roomName);
    const room = rooms.get(roomName);
    if (!room) return;
    room.sockets.delete(ws);
    if (joined) {
      if (!data.closed) ws.unsubscribe(room.topic);
      const member = room.members.get(data.user.id);
      if (member && --member.conns === 0) {
        room.members.delete(data.user.id);
        server.publish(room.topic, JSON.stringify({ type: "left", room: roomName, user: member.user } satisfies ServerMessage));
      }
    }
    if (room.sockets.size === 0 && !room.waiting) rooms.delete(roomName);
  }

  // Saying: validated frames queue up and are stored in one transaction per event-loop turn,
  // then broadcast after the commit, so nothing is broadcast that is not stored.

  type Pending = NewMessage & { ws: ChatSocket };
  let pending: Pending[] = [];
  let flushing: Promise<void> | null = null;
  let flushScheduled = false;

  function scheduleFlush() {
    if (flushScheduled) return;
    flushScheduled = true;
    setImmediate(() => {
      flushScheduled = false;
      if (!flushing) flushing = flushLoop();
    });
  }

  async function flushLoop() {
    while (pending.length) {
      const batch = pending;
      pending = [];
      try {
        const ids = await store.append(batch);
        for (let i = 0; i < batch.length; i++) {
          const { ws, ...m } = batch[i];
          const msg: Message = { type: "message", room: m.room, id: ids[i], user: m.user, text: m.text, ts: m.ts };
          if (m.ref !== undefined) msg.ref = m.ref;
          const room = rooms.get(m.room);
          if (room) deliver(room, msg);
        }
      } catch (error) {
        metrics.storeErrors++;
        log({ event: "error", where: "store messages", error: String(error) });
        for (const { ws, ref } of batch) {
          if (!ws.data.closed) sendError(ws, "unavailable", "Cannot store the message: the database is unavailable, try again", { ref });
        }
      }
    }
    flushing = null;
  }

  function say(ws: ChatSocket, msg: Extract<ClientMessage, { type: "say" }>) {
    if (msg.text.length > config.maxText) {
      metrics.framesRejected++;
      return sendError(ws, "bad_request", `text: longer than ${config.maxText} characters`, { ref: msg.ref });
    }
    if (ws.data.rooms.get(msg.room) !== true) {
      return sendError(ws, "not_joined", `Cannot say in ${msg.room}: join it first`, { ref: msg.ref });
    }
    const wait = take(sayBuckets, ws.data.user.id, config.rateLimit);
    if (wait) {
      metrics.rateLimited++;
      return sendError(ws, "rate_limited", `Slow down: try again in ${wait} ms`, { ref: msg.ref, retryAfterMs: wait });
    }
    metrics.messagesReceived++;
    pending.push({ ws, room: msg.room, user: userOf(ws), text: msg.text, ts: Date.now(), ref: msg.ref });
    scheduleFlush();
  }

  function typing(ws: ChatSocket, roomName: string) {
    if (ws.data.rooms.get(roomName) !== true) return sendError(ws, "not_joined", `Cannot type in ${roomName}: join it first`);
    // at most one typing event per user and room a second; extra ones are dropped quietly
    const key = `${ws.data.user.id}\n${roomName}`;
    const now = performance.now();
    if (now - (typingSeen.get(key) ?? -Infinity) < 1000) return;
    typingSeen.set(key, now);
    ws.publish(TOPIC_PREFIX + roomName, JSON.stringify({ type: "typing", room: roomName, user: userOf(ws) } satisfies ServerMessage));
  }

  type Refusal = { ok: false; code: ErrorCode; message: string; retryAfterMs?: number };

  /** Renames a user everywhere; used by PUT /api/me and the nick frame. */
  async function rename(userId: string, name: string): Promise<{ ok: true } | Refusal> {
    const wait = take(renameBuckets, userId, config.renameLimit);
    if (wait) {
      metrics.rateLimited++;
      return { ok: false, code: "rate_limited", message: `Too many renames: try again in ${wait} ms`, retryAfterMs: wait };
    }
    const previous = await store.rename(userId, name);
    if (previous === undefined) return { ok: false, code: "name_taken", message: `Cannot rename: ${name} is taken` };
    if (previous !== name) applyRename({ id: userId, name }, previous);
    return { ok: true };
  }

  /** Tells the user's own sockets and everyone sharing a room with them, once each. */
  function applyRename(user: User, previous: string) {
    const local = users.get(user.id);
    if (local) local.name = user.name;
    const recipients = new Set<ChatSocket>(local?.sockets);
    for (const room of rooms.values()) {
      const member = room.members.get(user.id);
      if (!member) continue;
      member.user = { ...user };
      for (const ws of room.sockets) if (ws.data.rooms.get(room.name)) recipients.add(ws);
    }
    const frame = JSON.stringify({ type: "renamed", user, previous } satisfies ServerMessage);
    for (const ws of recipients) if (!ws.data.closed) ws.sendText(frame);
  }

  // ── HTTP: Hono routes, sessions in a signed cookie ────────────────────────

  type Env = { Bindings: Server<SocketData>; Variables: { session: Session } };
  const app = new Hono<Env>();

  function isSecure(c: Context) {
    return new URL(c.req.url).protocol === "https:" || c.req.header("x-forwarded-proto") === "https";
  }

  async function readSession(c: Context<Env>): Promise<Session | undefined> {
    const sid = await getSignedCookie(c, secret, "sid");
    return sid ? await store.findSession(sid) : undefined;
  }

  async function issueCookie(c: Context<Env>, sid: string) {
    await setSignedCookie(c, "sid", sid, secret, {
      httpOnly: true, sameSite: "Lax", path: "/", secure: isSecure(c), maxAge: 400 * 24 * 3600,
    });
  }

  app.onError((error, c) => {
    log({ event: "error", where: "http", path: c.req.path, error: String(error) });
    return c.json({ error: { code: "internal", message: "Something went wrong on the server" } }, 500);
  });
  app.notFound((c) => c.json({ error: { code: "not_found", message: `No route for ${c.req.method} ${c.req.path}` } }, 404));

  app.get("/healthz", (c) => {
    if (shuttingDown) return c.json({ status: "shutting_down" }, 503);
    return c.json({ status: "ok" });
  });

  app.get("/metrics", (c) => {
    const lines = [
      ["chat_connections", "gauge", "Open WebSocket connections", sockets.size],
      ["chat_rooms", "gauge", "Rooms with members on this process", rooms.size],
      ["chat_messages_received_total", "counter", "Chat messages accepted from clients", metrics.messagesReceived],
      ["chat_messages_published_total", "counter", "Chat messages broadcast to rooms", metrics.messagesPublished],
      ["chat_frames_rejected_total", "counter", "Client frames answered with bad_request", metrics.framesRejected],
      ["chat_rate_limited_total", "counter", "Frames refused by a rate limit", metrics.rateLimited],
      ["chat_slow_consumers_closed_total", "counter", "Sockets closed with unsent data buffered (slow or dead readers)", metrics.slowConsumersClosed],
      ["chat_connections_refused_total", "counter", "Connections refused by a connection limit", metrics.connectionsRefused],
      ["chat_store_errors_total", "counter", "Failed writes of chat messages", metrics.storeErrors],
    ] as const;
    const text = lines.map(([name, type, help, value]) => `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n${name} ${value}\n`).join("");
    return c.text(text, 200, { "content-type": "text/plain; version=0.0.4; charset=utf-8" });
  });

  // `/` hands out a cookie only; the session row is created when /api/* first needs it
  app.get("/", async (c) => {
    const sid = await getSignedCookie(c, secret, "sid");
    if (!sid) await issueCookie(c, randomId(24));
    c.header("cache-control", "no-store");
    return c.body(CLIENT_HTML, 200, { "content-type": "text/html; charset=utf-8" });
  });

  app.use("/api/*", async (c, next) => {
    const sid = await getSignedCookie(c, secret, "sid");
    let session = sid ? await store.findSession(sid) : undefined;
    if (!session) {
      session = await store.createSession(sid || randomId(24));
      if (!sid) await issueCookie(c, session.sid);
    }
    c.set("session", session);
    await next();
  });

  app.get("/api/me", (c) => {
    const { id, name } = c.get("session");
    return c.json({ id, name });
  });

  app.put("/api/me", async (c) => {
    const body = RenameBody.safeParse(await c.req.json().catch(() => undefined));
    if (!body.success) return c.json({ error: { code: "bad_request", message: describe(body.error) } }, 400);
    const { id } = c.get("session");
    const result = await rename(id, body.data.name);
    if (!result.ok) {
      const status = result.code === "rate_limited" ? 429 : 409;
      if (result.retryAfterMs) c.header("retry-after", String(Math.ceil(result.retryAfterMs / 1000)));
      return c.json({ error: { code: result.code, message: result.message } }, status);
    }
    return c.json({ id, name: body.data.name });
  });

  app.get("/api/rooms", async (c) => {
    const stored = await store.rooms(100);
    const list = new Map(stored.map((r) => [r.name, { name: r.name, online: 0, lastId: r.lastId }]));
    for (const room of rooms.values()) {
      const entry = list.get(room.name) ?? { name: room.name, online: 0, lastId: room.lastId };
      entry.online = room.members.size;
      entry.lastId = Math.max(entry.lastId, room.lastId);
      list.set(room.name, entry);
    }
    return c.json([...list.values()].sort((a, b) => b.online - a.online || b.lastId - a.lastId));
  });

  app.get("/api/rooms/:room/messages", async (c) => {
    const room = Room.safeParse(c.req.param("room"));
    if (!room.success) return c.json({ error: { code: "bad_request", message: describe(room.error) } }, 400);
    const query = MessagesQuery.safeParse(c.req.query());
    if (!query.success) return c.json({ error: { code: "bad_request", message: describe(query.error) } }, 400);
    const { before = Number.MAX_SAFE_INTEGER, limit } = query.data;
    return c.json({ messages: await store.before(room.data, before, limit) });
  });

  app.get("/chat", async (c) => {
    if (c.req.header("upgrade")?.toLowerCase() !== "websocket") {
      return c.json({ error: { code: "upgrade_required", message: "GET /chat is a WebSocket endpoint" } }, 426);
    }
    const origin = c.req.header("origin");
    if (origin !== undefined && !originAllowed(origin, c.req.header("host"))) {
      return c.json({ error: { code: "forbidden", message: `Origin ${origin} may not open /chat` } }, 403);
    }
    const session = await readSession(c);
    if (!session) return c.json({ error: { code: "unauthorized", message: "No valid session: load / or /api/me first" } }, 401);
    if (shuttingDown) return c.json({ error: { code: "unavailable", message: "Server is shutting down" } }, 503);
    if (sockets.size >= config.maxConnections) {
      metrics.connectionsRefused++;
      return c.json({ error: { code: "unavailable", message: "Too many connections, try again later" } }, 503);
    }
    if ((users.get(session.id)?.sockets.size ?? 0) >= config.maxConnectionsPerUser) {
      metrics.connectionsRefused++;
      return c.json({ error: { code: "limit_exceeded", message: `At most ${config.maxConnectionsPerUser} connections per user` } }, 429);
    }
    if (!session.used) await store.markUsed(session.sid);
    let user = users.get(session.id);
    if (!user) {
      user = { id: session.id, name: session.name, sid: session.sid, sockets: new Set() };
      users.set(user.id, user);
    }
    const data: SocketData = { user, rooms: new Map(), buffered: 0, closed: false };
    if (c.env.upgrade(c.req.raw, { data })) return new Response(null);
    return c.json({ error: { code: "bad_request", message: "WebSocket upgrade failed" } }, 400);
  });

  function originAllowed(origin: string, host: string | undefined): boolean {
    if (config.allowedOrigins) return config.allowedOrigins.some((o) => new URL(o).origin === origin);
    try {
      return new URL(origin).host === host;
    } catch {
      return false;
    }
  }

  // ── WebSocket: open, message, close ──────────────────────────────────────

  function onMessage(ws: ChatSocket, raw: string | Buffer) {
    const parsed = parseClientMessage(raw);
    if (!parsed.ok) {
      metrics.framesRejected++;
      return sendError(ws, "bad_request", parsed.error, { ref: parsed.ref });
    }
    const msg = parsed.value;
    switch (msg.type) {
      case "say":
        return say(ws, msg);
      case "join":
        return void join(ws, msg.room, msg.since).catch((error) => log({ event: "error", where: "join", error: String(error) }));
      case "leave":
        return leave(ws, msg.room);
      case "typing":
        return typing(ws, msg.room);
      case "nick":
        return void rename(ws.data.user.id, msg.name).then(
          (result) => {
            if (!result.ok && !ws.data.closed) sendError(ws, result.code, result.message, { retryAfterMs: result.retryAfterMs });
          },
          (error) => {
            log({ event: "error", where: "nick", error: String(error) });
            if (!ws.data.closed) sendError(ws, "unavailable", "Cannot rename now: the database is unavailable");
          },
        );
      default:
        msg satisfies never;
    }
  }

  server = Bun.serve<SocketData>({
    port: config.port,
    hostname: config.host,
    fetch: (req, srv) => app.fetch(req, srv),
    websocket: {
      maxPayloadLength: MAX_FRAME,
      backpressureLimit: BACKPRESSURE_LIMIT,
      closeOnBackpressureLimit: true,
      idleTimeout: config.idleTimeout,
      sendPings: true,
      open(ws) {
        sockets.add(ws);
        ws.data.user.sockets.add(ws);
        send(ws, { type: "welcome", user: userOf(ws), maxText: config.maxText });
      },
      message: onMessage,
      close(ws, code, reason) {
        const data = ws.data;
        data.closed = true;
        // Bun closes slow readers itself (1006); unsent bytes at close tell them from clean exits
        if (code === 1006 && reason === "" && data.buffered > 0) metrics.slowConsumersClosed++;
        for (const room of [...data.rooms.keys()]) leave(ws, room);
        sockets.delete(ws);
        data.user.sockets.delete(ws);
        if (data.user.sockets.size === 0) users.delete(data.user.id);
      },
    },
  });

  // Samples each socket's unsent bytes, so close() can tell a slow reader.
  const sweep = setInterval(() => {
    for (const ws of sockets) ws.data.buffered = ws.getBufferedAmount();
    const old = performance.now() - 60_000;
    for (const [key, at] of typingSeen) if (at < old) typingSeen.delete(key);
    for (const buckets of [sayBuckets, renameBuckets]) {
      if (buckets.size > 10_000) for (const [key, b] of buckets) if (b.at < old && !users.has(key)) buckets.delete(key);
    }
  }, SLOW_SWEEP_MS);
  sweep.unref();
  const prune = setInterval(() => {
    store.pruneSessions(Date.now() - UNUSED_SESSION_TTL_MS, config.maxUnusedSessions).catch((error) =>
      log({ event: "error", where: "prune sessions", error: String(error) }),
    );
  }, 60_000);
  prune.unref();

  /** Starts shutting down: health answers 503 and new sockets are refused; the rest keeps working. */
  function drain() {
    shuttingDown = true;
  }

  /** Graceful stop: health 503, accepted messages stored and broadcast, then sockets close with 1001. */
  async function stop() {
    if (stopped) return;
    stopped = true;
    shuttingDown = true;
    clearInterval(sweep);
    clearInterval(prune);
    while (flushing || pending.length) {
      if (!flushing) flushing = flushLoop();
      await flushing;
    }
    for (const ws of sockets) ws.close(1001, "server shutting down");
    await server.stop();
    await store.close();
  }

  const url = `http://${config.host === "0.0.0.0" ? "127.0.0.1" : config.host}:${server.port}`;
  log({ event: "ready", port: server.port, url });
  return { server, port: server.port!, url, config, store, metrics, drain, stop, pruneSessions: () => store.pruneSessions(Date.now() - UNUSED_SESSION_TTL_MS, config.maxUnusedSessions) };
}
export type ChatServer = Awaited<ReturnType<typeof startServer>>;

// ── Startup ──────────────────────────────────────────────────────────────────

if (import.meta.main) {
  const argv = process.argv.slice(2);
  if (argv.includes("--help") || argv.includes("-h")) {
    console.log(HELP);
    process.exit(0);
  }
  let settings: Record<string, string>;
  try {
    settings = readSettings(process.env, argv);
    parseConfig(settings);
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    console.error(error.message);
    process.exit(2);
  }
  const log = (event: Record<string, unknown>) => console.log(JSON.stringify({ time: new Date().toISOString(), ...event }));
  const chat = await startServer({ ...settings!, log }).catch((error) => {
    console.error(`Cannot start: ${error instanceof Error ? error.message : error}`);
    process.exit(1);
  });
  // Graceful shutdown: healthz turns 503, accepted messages are stored, sockets close with 1001
  let stopping = false;
  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    process.on(signal, () => {
      if (stopping) return;
      stopping = true;
      log({ event: "stopping", signal });
      setTimeout(() => {
        log({ event: "error", where: "shutdown", error: "timed out" });
        process.exit(1);
      }, SHUTDOWN_TIMEOUT_MS).unref();
      chat.stop().then(
        () => {
          log({ event: "stopped" });
          process.exit(0);
        },
        (error) => {
          log({ event: "error", where: "shutdown", error: String(error) });
          process.exit(1);
        },
      );
    });
  }
}
