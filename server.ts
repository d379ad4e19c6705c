// A real-time chat server: Bun's native WebSocket pub/sub, Hono for HTTP and
// sessions, zod for the wire format, Bun.SQL (SQLite or Postgres) for history,
// Redis between the processes of a cluster. Read top to bottom: config →
// protocol → store → cluster → server state → HTTP → WebSocket → startup.
import { RedisClient, type Server, type ServerWebSocket, SQL } from "bun";
import { Database } from "bun:sqlite";
import { Hono, type Context } from "hono";
import { getCookie, setSignedCookie } from "hono/cookie";
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import * as z from "zod";
import page from "./client.html" with { type: "text" };

const CLIENT_HTML = page as unknown as string; // bun-types types *.html as HTMLBundle
/** The page may run and style itself only with its own inline <script> and <style>, named by hash:
 * an injected tag or handler would not run even if some text slipped past textContent. */
const CLIENT_CSP = (() => {
  const hashes = (tag: string) =>
    [...CLIENT_HTML.matchAll(new RegExp(`<${tag}[^>]*>([\\s\\S]*?)</${tag}>`, "g"))]
      .map(([, body]) => `'sha256-${createHash("sha256").update(body).digest("base64")}'`)
      .join(" ");
  return `default-src 'none'; script-src ${hashes("script")}; style-src ${hashes("style")}; connect-src 'self'; ` +
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
})();
const TOPIC_PREFIX = "room:";
const MAX_FRAME = 64 * 1024; // larger frames close the socket with 1009 (Bun does it)
const BACKPRESSURE_LIMIT = 1024 * 1024; // per socket; past it the socket is closed
const SLOW_SWEEP_MS = 200; // how often buffered amounts are sampled for metrics
const BACKPRESSURE_SAMPLE_MS = 20; // and at most this often per room right after a publish meets backpressure
const SHUTDOWN_TIMEOUT_MS = 8_000;
const WAL_REWIND_BYTES = 64 * 1024 * 1024; // past this the checkpointer rewinds the WAL to its start
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
  rateLimit: Rate.prefault("20/10s"),
  renameLimit: Rate.prefault("5/60s"),
  joinLimit: Rate.prefault("100/60s"),
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
  joinLimit: "JOIN_LIMIT",
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
  RATE_LIMIT=20/10s  RENAME_LIMIT=5/60s  JOIN_LIMIT=100/60s (per connection)
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
const ROOM = /^[a-z0-9][a-z0-9_-]{0,31}$/;
export const Room = z.string().regex(ROOM, "room must match ^[a-z0-9][a-z0-9_-]{0,31}$");
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
export const Ref = z
  .string()
  .max(64, "ref is longer than 64 characters")
  // stored with the message: Postgres refuses NUL (failing the whole batch), and a lone surrogate would come back as U+FFFD
  .refine((s) => !CONTROL.test(s) && s.isWellFormed(), "ref has control characters or a lone surrogate");
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
    room: Room.optional(), // the room of a refused join
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

type Say = Extract<ClientMessage, { type: "say" }>;

/**
 * The hot frame checked by hand with exactly ClientMessage's rules (a test compares the two on
 * generated frames); anything it does not accept goes to zod, which also words the error.
 */
function quickSay(v: any): Say | undefined {
  if (typeof v !== "object" || v === null || v.type !== "say") return;
  for (const key in v) if (key !== "type" && key !== "room" && key !== "text" && key !== "ref") return;
  const { room, text, ref } = v;
  if (typeof room !== "string" || !ROOM.test(room)) return;
  if (typeof text !== "string" || text.length === 0 || CONTROL.test(text) || !text.isWellFormed()) return;
  if (ref === undefined) return { type: "say", room, text };
  if (typeof ref !== "string" || ref.length > 64 || CONTROL.test(ref) || !ref.isWellFormed()) return;
  return { type: "say", room, text, ref };
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
  const say = quickSay(json);
  if (say) return { ok: true, value: say };
  const result = ClientMessage.safeParse(json);
  if (result.success) return { ok: true, value: result.data };
  // echo a well-formed ref so the client can pin the error on its message
  const ref = (json as { ref?: unknown })?.ref;
  const safeRef = Ref.safeParse(ref).success ? (ref as string) : undefined;
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
  const toSession = (r: any): Session => ({ sid: r.sid, id: r.user_id, name: r.name, used: num(r.used) === 1 });
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
    // a checkpoint fsyncs the database file: done by a worker thread, never on the event loop
    await sql`PRAGMA wal_autocheckpoint = 0`;
  }
  // the same DDL on both; on Postgres several nodes may start at once, so take a lock
  await sql.begin(async (tx) => {
    if (postgres) await tx`SELECT pg_advisory_xact_lock(727274)`;
    await tx`CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`;
    await tx`CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)`;
    await tx`CREATE TABLE IF NOT EXISTS sessions (
      sid TEXT PRIMARY KEY, user_id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, name_key TEXT NOT NULL UNIQUE,
      created BIGINT NOT NULL, used INTEGER NOT NULL DEFAULT 0)`;
    await tx`CREATE INDEX IF NOT EXISTS sessions_unused ON sessions (used, created)`;
    await tx`CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, last_id BIGINT NOT NULL)`;
    // SQLite stores a message in one b-tree page write without a rowid table and its index beside it
    await tx.unsafe(`CREATE TABLE IF NOT EXISTS messages (
      room TEXT NOT NULL, id BIGINT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL,
      text TEXT NOT NULL, ts BIGINT NOT NULL, ref TEXT, PRIMARY KEY (room, id))${postgres ? "" : " WITHOUT ROWID"}`);
  });
  const file = postgres ? null : (sql.options as { filename?: string }).filename;
  const onDisk = !!file && file !== ":memory:";
  const checkpointer = onDisk ? startCheckpointer(file) : null;
  // The one hot statement gets a prepared bun:sqlite statement on a second connection: Bun.SQL's
  // SQLite adapter prepares every query anew, which was most of the server's CPU at a fixed rate.
  const writer = onDisk ? openWriter(file) : null;

  const nameKey = (name: string) => name.normalize("NFKC").toLowerCase();
  const toRow = (m: NewMessage, id: number): Row => ({
    room: m.room, id, user_id: m.user.id, name: m.user.name, text: m.text, ts: m.ts, ref: m.ref ?? null,
  });

  async function appendLocked(batch: NewMessage[]): Promise<number[]> {
    return sql.begin(async (tx) => {
      const byRoom = new Map<string, number[]>();
      batch.forEach((m, i) => {
        const list = byRoom.get(m.room);
        list ? list.push(i) : byRoom.set(m.room, [i]);
      });
      const ids = new Array<number>(batch.length);
      // rooms in name order, so two nodes' batches never wait on each other's locks in a cycle
      for (const [room, indexes] of [...byRoom].sort(([a], [b]) => (a < b ? -1 : 1))) {
        const [{ last_id }] = await tx`INSERT INTO rooms (name, last_id) VALUES (${room}, ${indexes.length})
          ON CONFLICT (name) DO UPDATE SET last_id = rooms.last_id + ${indexes.length} RETURNING last_id`;
        let id = num(last_id) - indexes.length;
        for (const i of indexes) ids[i] = ++id;
      }
      const rows = batch.map((m, i) => toRow(m, ids[i]));
      for (let i = 0; i < rows.length; i += 1000) await tx`INSERT INTO messages ${tx(rows.slice(i, i + 1000))}`;
      return ids;
    });
  }

  const lastIds = new Map<string, number>(); // SQLite only: the last id allocated per room
  async function appendSingleWriter(batch: NewMessage[]): Promise<number[]> {
    for (const m of batch) {
      if (lastIds.has(m.room)) continue;
      const [r] = await sql`SELECT max(id) AS last_id FROM messages WHERE room = ${m.room}`;
      await sql`INSERT INTO rooms (name, last_id) VALUES (${m.room}, 0) ON CONFLICT (name) DO NOTHING`;
      lastIds.set(m.room, num(r?.last_id ?? 0));
    }
    const ids = batch.map((m) => {
      const id = lastIds.get(m.room)! + 1;
      lastIds.set(m.room, id);
      return id;
    });
    const rows = batch.map((m, i) => toRow(m, ids[i]));
    try {
      // one statement is one transaction; a batch too big for one statement gets a real one
      if (writer) await writer.store(rows);
      else if (rows.length <= 4000) await sql`INSERT INTO messages ${sql(rows)}`;
      else await sql.begin(async (tx) => {
        for (let i = 0; i < rows.length; i += 4000) await tx`INSERT INTO messages ${tx(rows.slice(i, i + 4000))}`;
      });
    } catch (error) {
      // nothing was stored: hand the ids out again (backwards, so each room ends at its first id - 1)
      for (let i = batch.length - 1; i >= 0; i--) lastIds.set(batch[i].room, ids[i] - 1);
      throw error;
    }
    return ids;
  }

  return {
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
        return r && toSession(r);
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
          const [existing] = await sql`SELECT sid, user_id, name, used FROM sessions WHERE sid = ${sid}`;
          if (existing) return toSession(existing); // another request created it first
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
     * Stores a batch atomically and returns the ids. Ids are gap-free per room and commit in order:
     * on Postgres the room's counter row (rooms.last_id) stays locked until commit; SQLite has one
     * writer, this process, which allocates them in memory and stores the batch in one statement.
     */
    append: (batch: NewMessage[]) => serial(() => (postgres ? appendLocked(batch) : appendSingleWriter(batch))),

    /** The newest `limit` messages of a room (limit ≥ 1), oldest first; the last one's id is the room's last id. */
    tail: (room: string, limit: number) =>
      serial(async () => {
        const rows = await sql`SELECT * FROM messages WHERE room = ${room} ORDER BY id DESC LIMIT ${limit}`;
        return rows.reverse().map(toMessage) as Message[];
      }),

    /** Messages with after < id < before, oldest first (at most 10,000). */
    between: (room: string, after: number, before: number) =>
      serial(async () => {
        const rows = await sql`SELECT * FROM messages WHERE room = ${room} AND id > ${after} AND id < ${before} ORDER BY id LIMIT 10000`;
        return rows.map(toMessage) as Message[];
      }),

    /** Scrollback: up to `limit` messages before an id, oldest first. */
    before: (room: string, before: number, limit: number) =>
      serial(async () => {
        const rows = await sql`SELECT * FROM messages WHERE room = ${room} AND id < ${before} ORDER BY id DESC LIMIT ${limit}`;
        return rows.reverse().map(toMessage) as Message[];
      }),

    rooms: (limit: number) =>
      serial(async (): Promise<{ name: string; lastId: number }[]> => {
        // rooms.last_id is only the Postgres id counter; the messages' own index answers for both
        const rows = await sql`SELECT name, (SELECT max(id) FROM messages WHERE room = rooms.name) AS last_id
          FROM rooms ORDER BY last_id DESC LIMIT ${limit}`;
        return rows.map((r: any) => ({ name: r.name as string, lastId: num(r.last_id ?? 0) }));
      }),

    close: () =>
      serial(async () => {
        checkpointer?.terminate();
        writer?.close();
        await sql.close();
      }),
  };
}
export type Store = Awaited<ReturnType<typeof openStore>>;

type Row = { room: string; id: number; user_id: string; name: string; text: string; ts: number; ref: string | null };

/** Stores rows in one transaction through a prepared statement (synchronous, on its own connection). */
function openWriter(file: string) {
  const db = new Database(file);
  // never sleep on a lock inside the event loop: a busy database is retried asynchronously
  db.run("PRAGMA busy_timeout = 0");
  db.run("PRAGMA synchronous = NORMAL");
  db.run("PRAGMA wal_autocheckpoint = 0"); // the checkpointer thread does it
  const insert = db.prepare("INSERT INTO messages (room, id, user_id, name, text, ts, ref) VALUES (?, ?, ?, ?, ?, ?, ?)");
  const one = (r: Row) => insert.run(r.room, r.id, r.user_id, r.name, r.text, r.ts, r.ref);
  const many = db.transaction((rows: Row[]) => rows.forEach(one));
  return {
    async store(rows: Row[]) {
      for (let attempt = 0; ; attempt++) {
        try {
          return void (rows.length === 1 ? one(rows[0]) : many(rows));
        } catch (error) {
          const busy = /SQLITE_BUSY/.test(String((error as { code?: string }).code));
          if (!busy || attempt >= 2000) throw error;
          await Bun.sleep(1);
        }
      }
    },
    close: () => db.close(),
  };
}

/**
 * A worker thread with its own connection that checkpoints the WAL ten times a second, off the event loop.
 * A PASSIVE checkpoint never waits for the writer, so under nonstop writes the WAL is never all copied
 * and never rewinds: past WAL_REWIND_BYTES a RESTART holds new commits (they retry) for one more copy.
 * The file keeps its size (cutting a 64 MB file took 60 ms); it is reused from the start.
 */
function startCheckpointer(file: string): Worker {
  // - nice 19 (this thread only, on Linux): on a one-core machine a checkpoint takes only idle CPU.
  // - Every 100 ms: each checkpoint fsyncs the WAL, and a commit writing the page being written back
  //   waits in pwrite (ext4). Per 30 s of the bench's fixed rate, every 500 ms gave a dozen commits
  //   of 3-7 ms, every 2 s fewer of 9-17 ms, every 100 ms 1-5 of 3-5 ms.
  // - A PASSIVE checkpoint that never catches up never syncs the database file, so RESTART's own
  //   sync, under the write lock, flushed seconds of copied pages (10-14 ms): sync them before.
  // - The descriptor is never closed (one per store): closing any descriptor of the file would drop
  //   this process's SQLite locks on it.
  const code = `import { Database } from "bun:sqlite";
    import { fdatasyncSync, openSync } from "node:fs";
    import { setPriority } from "node:os";
    try { setPriority(19); } catch {}
    const db = new Database(${JSON.stringify(file)});
    const fd = openSync(${JSON.stringify(file)}, "r");
    db.run("PRAGMA busy_timeout = 1000");
    const frameBytes = db.query("PRAGMA page_size").get().page_size + 24;
    setInterval(() => {
      try {
        const { log } = db.query("PRAGMA wal_checkpoint(PASSIVE)").get();
        if (log * frameBytes <= ${WAL_REWIND_BYTES}) return;
        fdatasyncSync(fd);
        db.run("PRAGMA wal_checkpoint(RESTART)");
      } catch {}
    }, 100);`;
  const worker = new Worker(URL.createObjectURL(new Blob([code], { type: "text/javascript" })));
  (worker as unknown as { unref(): void }).unref(); // bun-types lacks Worker.unref
  return worker;
}

function randomId(bytes: number): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(bytes))).toString("base64url");
}

// ── Cluster: Redis fan-out and presence (only with REDIS_URL) ────────────────

// Presence in Redis: chat:node:<node> holds what each node registered ("room\nuser" → name);
// chat:count:<room> counts the nodes holding each user; chat:presence:<room> names them.
// joined/left are published from inside the scripts, so they fire once cluster-wide.
const PRESENCE_LUA = String.raw`
local function joinRoom(node, room, user, name)
  if redis.call('HSETNX', 'chat:node:' .. node, room .. '\n' .. user, name) == 0 then return end
  redis.call('HSET', 'chat:presence:' .. room, user, name)
  if redis.call('HINCRBY', 'chat:count:' .. room, user, 1) == 1 then
    redis.call('PUBLISH', 'chat:room:' .. room, 'p\t' .. cjson.encode({k = 'joined', user = {id = user, name = name}}))
  end
end
local function leaveRoom(node, room, user)
  if redis.call('HDEL', 'chat:node:' .. node, room .. '\n' .. user) == 0 then return end
  if redis.call('HINCRBY', 'chat:count:' .. room, user, -1) <= 0 then
    local name = redis.call('HGET', 'chat:presence:' .. room, user) or ''
    redis.call('HDEL', 'chat:count:' .. room, user)
    redis.call('HDEL', 'chat:presence:' .. room, user)
    redis.call('PUBLISH', 'chat:room:' .. room, 'p\t' .. cjson.encode({k = 'left', user = {id = user, name = name}}))
  end
end
local function split(field)
  local at = string.find(field, '\n', 1, true)
  return string.sub(field, 1, at - 1), string.sub(field, at + 1)
end
local op, node = ARGV[1], ARGV[2]
if op == 'join' then joinRoom(node, ARGV[3], ARGV[4], ARGV[5])
elseif op == 'leave' then leaveRoom(node, ARGV[3], ARGV[4])
elseif op == 'rename' then
  -- ARGV: op, node, user, room..., name
  local name = ARGV[#ARGV]
  for i = 4, #ARGV - 1 do
    if redis.call('HEXISTS', 'chat:node:' .. node, ARGV[i] .. '\n' .. ARGV[3]) == 1 then
      redis.call('HSET', 'chat:node:' .. node, ARGV[i] .. '\n' .. ARGV[3], name)
      redis.call('HSET', 'chat:presence:' .. ARGV[i], ARGV[3], name)
    end
  end
elseif op == 'sync' or op == 'drop' then
  -- sync: make the node's registrations exactly ARGV[3] (a JSON list of [room, user, name]); drop: remove them all
  local want = {}
  if op == 'sync' then for _, e in ipairs(cjson.decode(ARGV[3])) do want[e[1] .. '\n' .. e[2]] = e end end
  local have = redis.call('HGETALL', 'chat:node:' .. node)
  for i = 1, #have, 2 do
    if not want[have[i]] then local room, user = split(have[i]); leaveRoom(node, room, user) end
  end
  for _, e in pairs(want) do joinRoom(node, e[1], e[2], e[3]) end
  if op == 'sync' then redis.call('SADD', 'chat:nodes', node) else redis.call('SREM', 'chat:nodes', node) end
end
return 1
`;
const HEARTBEAT_MS = 5_000;
const NODE_TTL_MS = 15_000; // a node silent this long is dead: its members leave presence

type FanoutEvents = {
  message(room: string, id: number, frame: string, sentAt: number): void;
  typing(room: string, frame: string): void;
  presence(room: string, kind: "joined" | "left", user: User): void;
  renamed(user: User, previous: string): void;
  /** After a reconnect: resubscribed; the state may have missed events. */
  reconnected(): void;
};

/** Redis pub/sub between nodes: one publisher and one subscriber connection per process. */
export async function openFanout(url: string, node: string, on: FanoutEvents, log: (e: Record<string, unknown>) => void) {
  const options = { autoReconnect: true, maxRetries: 1_000_000, enableOfflineQueue: false, connectionTimeout: 2_000 };
  const pub = new RedisClient(url, options);
  const sub = new RedisClient(url, options);
  const channels = new Set<string>(["chat:users"]);
  let subscribed = false;

  function listener(payload: string, channel: string) {
    const tab = payload.indexOf("\t");
    const kind = payload.slice(0, tab);
    if (channel === "chat:users") {
      const [origin, json] = [payload.slice(tab + 1, payload.indexOf("\t", tab + 1)), payload.slice(payload.indexOf("\t", tab + 1) + 1)];
      if (kind === "r" && origin !== node) {
        const { user, previous } = JSON.parse(json);
        on.renamed(user, previous);
      }
      return;
    }
    const room = channel.slice("chat:room:".length);
    if (kind === "m") {
      // m \t sentAt \t id \t frame
      const t2 = payload.indexOf("\t", tab + 1);
      const t3 = payload.indexOf("\t", t2 + 1);
      on.message(room, Number(payload.slice(t2 + 1, t3)), payload.slice(t3 + 1), Number(payload.slice(tab + 1, t2)));
    } else if (kind === "t") {
      const t2 = payload.indexOf("\t", tab + 1);
      if (payload.slice(tab + 1, t2) !== node) on.typing(room, payload.slice(t2 + 1));
    } else if (kind === "p") {
      const { k, user } = JSON.parse(payload.slice(tab + 1));
      on.presence(room, k, { id: String(user.id), name: String(user.name) });
    }
  }

  // A reconnect loses the server-side subscriptions but Bun keeps the old listeners:
  // each (re)subscription gets listeners of a new epoch, and older ones fall silent.
  let epoch = 0;
  const current = () => {
    const mine = epoch;
    return (payload: string, channel: string) => void (mine === epoch && listener(payload, channel));
  };
  function unsubscribe(channel: string) {
    try {
      sub.unsubscribe(channel)?.catch?.(() => {});
    } catch {} // throws when the client is not in subscriber mode
  }
  async function subscribeAll() {
    epoch++;
    for (const channel of channels) {
      unsubscribe(channel);
      await sub.subscribe(channel, current());
    }
  }

  let first = true;
  sub.onconnect = () => {
    if (first) return;
    subscribed = false;
    subscribeAll().then(
      () => {
        subscribed = true;
        log({ event: "redis", state: "resubscribed", channels: channels.size });
        on.reconnected();
      },
      (error) => log({ event: "error", where: "redis resubscribe", error: String(error) }),
    );
  };
  sub.onclose = () => {
    subscribed = false;
  };
  await Promise.all([pub.connect(), sub.connect()]);
  await subscribeAll();
  subscribed = true;
  first = false;

  const eval_ = (...args: string[]) => pub.send("EVAL", [PRESENCE_LUA, "0", ...args]);
  const quiet = (what: string) => (error: unknown) => log({ event: "error", where: `redis ${what}`, error: String(error) });

  // Heartbeat: announce this node, and clear the registrations of nodes that stopped announcing.
  async function heartbeat() {
    if (!pub.connected) return;
    await pub.send("SET", [`chat:alive:${node}`, String(Date.now()), "PX", String(NODE_TTL_MS)]);
    await pub.send("SADD", ["chat:nodes", node]);
    const nodes = (await pub.send("SMEMBERS", ["chat:nodes"])) as string[];
    for (const other of nodes) {
      if (other === node) continue;
      if ((await pub.send("EXISTS", [`chat:alive:${other}`])) === 0) {
        log({ event: "redis", state: "node expired", node: other });
        await eval_("drop", other);
      }
    }
  }
  const beat = setInterval(() => void heartbeat().catch(quiet("heartbeat")), HEARTBEAT_MS);
  beat.unref();
  await heartbeat();

  return {
    get connected() {
      return pub.connected && sub.connected && subscribed;
    },
    async subscribeRoom(room: string) {
      const channel = `chat:room:${room}`;
      if (channels.has(channel)) return;
      channels.add(channel);
      // while Redis is down this fails; the reconnect subscribes every channel again
      if (sub.connected) await sub.subscribe(channel, current()).catch(quiet("subscribe"));
    },
    unsubscribeRoom(room: string) {
      const channel = `chat:room:${room}`;
      channels.delete(channel);
      if (sub.connected) unsubscribe(channel);
    },
    publishMessage(room: string, id: number, frame: string) {
      if (pub.connected) pub.publish(`chat:room:${room}`, `m\t${Date.now()}\t${id}\t${frame}`).catch(quiet("publish"));
    },
    publishTyping(room: string, frame: string) {
      if (pub.connected) pub.publish(`chat:room:${room}`, `t\t${node}\t${frame}`).catch(quiet("publish"));
    },
    publishRename(user: User, previous: string, rooms: string[]) {
      if (!pub.connected) return;
      pub.publish("chat:users", `r\t${node}\t${JSON.stringify({ user, previous })}`).catch(quiet("publish"));
      if (rooms.length) eval_("rename", node, user.id, ...rooms, user.name).catch(quiet("rename"));
    },
    join(room: string, user: User) {
      if (pub.connected) eval_("join", node, room, user.id, user.name).catch(quiet("join"));
    },
    leave(room: string, userId: string) {
      if (pub.connected) eval_("leave", node, room, userId).catch(quiet("leave"));
    },
    /** Makes this node's registrations exactly `entries` (after a reconnect). */
    sync: (entries: [room: string, user: string, name: string][]) => eval_("sync", node, JSON.stringify(entries)),
    async members(room: string): Promise<User[]> {
      const hash = (await pub.send("HGETALL", [`chat:presence:${room}`])) as Record<string, string>;
      return Object.entries(hash ?? {}).map(([id, name]) => ({ id, name }));
    },
    async online(rooms: string[]): Promise<number[]> {
      return Promise.all(rooms.map(async (r) => Number(await pub.send("HLEN", [`chat:presence:${r}`]))));
    },
    async close() {
      clearInterval(beat);
      if (pub.connected) await eval_("drop", node).catch(quiet("drop"));
      sub.close();
      pub.close();
    },
  };
}
export type Fanout = Awaited<ReturnType<typeof openFanout>>;

// ── Server state: everything lives inside startServer, so each call starts empty ──

type Bucket = { tokens: number; at: number };
const fullBucket = (rate: Config["rateLimit"]): Bucket => ({ tokens: rate.count, at: performance.now() });
type LocalUser = { id: string; name: string; sid: string; sockets: ChatSocket[] }; // a user has a few tabs
/**
 * rooms: joined (history sent, subscribed); joining: waiting for the room to load (usually null).
 * Plain arrays: a socket holds a few rooms, and per-socket memory is what idle servers are made of.
 */
type SocketData = { user: LocalUser; rooms: string[]; joining: string[] | null; joins: Bucket | null; buffered: number; closed: boolean };
type ChatSocket = ServerWebSocket<SocketData>;
type Entry = { id: number; frame: string }; // a message as sent on the wire
const toEntry = (m: Message): Entry => ({ id: m.id, frame: JSON.stringify(m) });
/** A room as this process sees it: local sockets, presence and the recent tail. */
type RoomState = {
  name: string;
  topic: string;
  count: number; // local sockets, joined or joining (a Set of them would cost memory on every socket)
  sampledAt: number; // when unsent bytes were last sampled after a publish met backpressure
  local: Map<string, number>; // user id → local joined sockets
  members: Map<string, User>; // everyone in the room (on every node, in cluster mode)
  lastId: number; // the last id delivered here; ids are 1, 2, 3… without gaps
  ring: Entry[]; // the newest messages, enough for any join or recovery
  waiting: Entry[] | null; // held while the room loads or a gap is filled from the store
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
  const nodeId = config.nodeId ?? `${process.pid}-${randomId(4)}`;
  const store = await openStore(config.databaseUrl);
  const secret = config.sessionSecret ?? (await store.secret(randomId(32)));
  const ringSize = Math.max(config.recoveryLimit, config.historyOnJoin);

  const rooms = new Map<string, RoomState>();
  const users = new Map<string, LocalUser>();
  const sayBuckets = new Map<string, Bucket>();
  const renameBuckets = new Map<string, Bucket>();
  const typingSeen = new Map<string, number>();
  let connections = 0; // open sockets; each is in its user's `sockets`
  function* allSockets() {
    for (const user of users.values()) yield* user.sockets;
  }
  const metrics = {
    messagesReceived: 0,
    messagesPublished: 0,
    framesRejected: 0,
    rateLimited: 0,
    slowConsumersClosed: 0,
    connectionsRefused: 0,
    storeErrors: 0,
    fanoutReceived: 0,
    fanoutLagMs: 0,
    gapsFilled: 0,
  };
  let shuttingDown = false;
  let stopped = false;
  let server!: Server<SocketData>;

  const fanout = config.redisUrl
    ? await openFanout(config.redisUrl, nodeId, {
        message(name, id, frame, sentAt) {
          metrics.fanoutReceived++;
          metrics.fanoutLagMs = Math.max(0, Date.now() - sentAt);
          const room = rooms.get(name);
          if (room) deliver(room, { id, frame });
        },
        typing(name, frame) {
          const room = rooms.get(name);
          if (room) publish(room, frame);
        },
        presence(name, kind, user) {
          const room = rooms.get(name);
          if (room) (kind === "joined" ? addMember : removeMember)(room, user);
        },
        renamed: (user, previous) => applyRename(user, previous),
        reconnected: () => void reconcile().catch((error) => log({ event: "error", where: "reconcile", error: String(error) })),
      }, log)
    : null;

  /** Takes one token from the bucket of `key`; returns 0 or the ms until one is free. */
  function take(buckets: Map<string, Bucket>, key: string, rate: Config["rateLimit"]): number {
    let b = buckets.get(key);
    if (!b) buckets.set(key, (b = fullBucket(rate)));
    return spend(b, rate);
  }

  /** Takes one token from a bucket; returns 0 or the ms until one is free. */
  function spend(b: Bucket, rate: Config["rateLimit"]): number {
    const now = performance.now();
    b.tokens = Math.min(rate.count, b.tokens + ((now - b.at) * rate.count) / rate.perMs);
    b.at = now;
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return 0;
    }
    return Math.ceil(((1 - b.tokens) * rate.perMs) / rate.count);
  }

  function send(ws: ChatSocket, msg: ServerMessage) {
    ws.send(JSON.stringify(msg));
  }

  function sendError(ws: ChatSocket, code: ErrorCode, message: string, extra: { ref?: string; retryAfterMs?: number; room?: string } = {}) {
    send(ws, { type: "error", code, message, ...extra });
  }

  function userOf(ws: ChatSocket): User {
    return { id: ws.data.user.id, name: ws.data.user.name };
  }

  // Rooms: loaded on the first local join, dropped when the last local socket leaves.

  function getRoom(name: string): RoomState {
    let room = rooms.get(name);
    if (room) return room;
    room = {
      name, topic: TOPIC_PREFIX + name, count: 0, sampledAt: 0, local: new Map(), members: new Map(), lastId: 0,
      ring: [], waiting: [], ready: Promise.resolve(), historyFrame: null,
    };
    rooms.set(name, room);
    room.ready = load(room);
    return room;
  }

  /** Fills a new room from the store (and, in a cluster, Redis): subscribe first, then read, so nothing falls between. */
  async function load(room: RoomState) {
    try {
      if (fanout) {
        await fanout.subscribeRoom(room.name);
        for (const user of await fanout.members(room.name)) room.members.set(user.id, user);
      }
      room.ring = (await store.tail(room.name, ringSize)).map(toEntry);
      room.lastId = room.ring.at(-1)?.id ?? 0;
      await catchUp(room);
    } catch (error) {
      log({ event: "error", where: "load room", room: room.name, error: String(error) });
      room.waiting = null;
      unload(room, true);
      return;
    }
    if (room.count === 0) unload(room);
  }

  function unload(room: RoomState, force = false) {
    if (rooms.get(room.name) !== room || (!force && (room.count > 0 || room.waiting))) return;
    rooms.delete(room.name);
    fanout?.unsubscribeRoom(room.name);
  }

  /** Delivers messages in id order, exactly once; ids at or below lastId were delivered already. */
  function deliver(room: RoomState, entry: Entry) {
    if (room.waiting) return void room.waiting.push(entry);
    if (entry.id <= room.lastId) return;
    if (entry.id === room.lastId + 1) return apply(room, entry);
    // a gap: ids commit in order, so the missing ones are in the store; fetch them first
    room.waiting = [entry];
    room.ready = catchUp(room);
  }

  function apply(room: RoomState, entry: Entry) {
    room.lastId = entry.id;
    room.ring.push(entry);
    if (room.ring.length >= ringSize * 2) room.ring = room.ring.slice(-ringSize);
    room.historyFrame = null;
    publish(room, entry.frame);
    metrics.messagesPublished++;
  }

  /** Publishes to a room's sockets (all, or all but `from`). */
  function publish(room: RoomState, frame: string, from?: ChatSocket) {
    // -1 or 0: some reader has unsent bytes (0: past the limit). Bun closes a reader that passes the limit
    // during a later publish, and the 200 ms sweep can miss one that fills up faster, so note them now
    if ((from ?? server).publish(room.topic, frame) > 0) return;
    const now = performance.now();
    if (now - room.sampledAt < BACKPRESSURE_SAMPLE_MS) return;
    room.sampledAt = now;
    for (const ws of allSockets()) if (ws.data.rooms.includes(room.name)) ws.data.buffered = ws.getBufferedAmount();
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
      metrics.gapsFilled += missing.length ? 1 : 0;
      if (missing.length === 0 && ++failures >= 5) {
        room.lastId = rest[0].id - 1; // the store cannot fill it: move on; clients see the gap and rejoin with since
      } else if (missing.length === 0) {
        await Bun.sleep(50 * failures);
      }
      room.waiting!.push(...missing.map(toEntry), ...rest);
    }
    room.waiting = null;
  }

  /** Delivers whatever the store has past lastId (a cluster node may lag its peers, or have missed fan-out). */
  function refresh(room: RoomState): Promise<void> {
    if (room.waiting) return room.ready;
    room.waiting = [];
    room.ready = (async () => {
      try {
        const newer = await store.between(room.name, room.lastId, Number.MAX_SAFE_INTEGER);
        room.waiting!.push(...newer.map(toEntry));
      } catch (error) {
        log({ event: "error", where: "refresh room", room: room.name, error: String(error) });
      }
      await catchUp(room);
    })();
    return room.ready;
  }

  /** After Redis comes back: re-register local members, refresh presence, deliver what fan-out missed. */
  async function reconcile() {
    if (!fanout) return;
    const entries: [string, string, string][] = [];
    for (const room of rooms.values()) {
      for (const userId of room.local.keys()) entries.push([room.name, userId, users.get(userId)?.name ?? ""]);
    }
    await fanout.sync(entries);
    for (const room of [...rooms.values()]) {
      const now = new Map((await fanout.members(room.name)).map((u) => [u.id, u]));
      for (const user of now.values()) addMember(room, user);
      for (const user of [...room.members.values()]) if (!now.has(user.id)) removeMember(room, user);
      await refresh(room);
    }
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

  // Presence: `members` is who is in the room; joined/left go out when it changes.

  function addMember(room: RoomState, user: User, joiner?: ChatSocket) {
    const known = room.members.get(user.id);
    room.members.set(user.id, user);
    if (known) return;
    const frame = JSON.stringify({ type: "joined", room: room.name, user } satisfies ServerMessage);
    publish(room, frame, joiner); // with a joiner: everyone but the joiner, who gets presence
  }

  function removeMember(room: RoomState, user: User) {
    const known = room.members.get(user.id);
    if (!known) return;
    room.members.delete(user.id);
    publish(room, JSON.stringify({ type: "left", room: room.name, user: known } satisfies ServerMessage));
  }

  // Joining and leaving

  async function join(ws: ChatSocket, roomName: string, since: number | undefined) {
    const data = ws.data;
    const known = data.rooms.includes(roomName) || !!data.joining?.includes(roomName);
    if (!known && data.rooms.length + (data.joining?.length ?? 0) >= config.maxRoomsPerConnection) {
      return sendError(ws, "limit_exceeded", `Cannot join ${roomName}: at most ${config.maxRoomsPerConnection} rooms per connection`, { room: roomName });
    }
    // each join can announce the user to the room, and sends history: a socket toggling a room would flood both
    const wait = spend((data.joins ??= fullBucket(config.joinLimit)), config.joinLimit);
    if (wait) {
      metrics.rateLimited++;
      return sendError(ws, "rate_limited", `Cannot join ${roomName}: too many joins, try again in ${wait} ms`, { room: roomName, retryAfterMs: wait });
    }
    const room = getRoom(roomName);
    if (!known) {
      (data.joining ??= []).push(room.name); // reserved: a leave or close meanwhile cleans up; room.name is shared, not a copy per socket
      room.count++;
    }
    // a cluster node may not have received the newest messages yet: ask the store before saying "you are ahead"
    if (fanout && since !== undefined && since > room.lastId) await refresh(room);
    while (room.waiting) await room.ready;
    const joined = data.rooms.includes(roomName);
    if (data.closed || (!joined && !data.joining?.includes(roomName))) return;
    if (rooms.get(roomName) !== room) {
      leave(ws, roomName);
      return sendError(ws, "unavailable", `Cannot join ${roomName}: history is unavailable, try again`, { room: roomName });
    }
    // from here on nothing awaits: history up to lastId, then live messages after it, exactly
    ws.sendText(historyFrame(room, since));
    if (!joined) {
      dropFrom(data, "joining", roomName);
      data.rooms.push(room.name);
      ws.subscribe(room.topic);
      const user = userOf(ws);
      const conns = (room.local.get(user.id) ?? 0) + 1;
      room.local.set(user.id, conns);
      if (conns === 1) {
        addMember(room, user, ws);
        fanout?.join(roomName, user);
      }
    }
    send(ws, { type: "presence", room: roomName, users: [...room.members.values()] });
  }

  /** Removes a room from a socket's list; true if it was there. */
  function dropFrom(data: SocketData, list: "rooms" | "joining", roomName: string): boolean {
    const names = data[list];
    const i = names ? names.indexOf(roomName) : -1;
    if (i < 0) return false;
    names!.splice(i, 1);
    if (list === "joining" && names!.length === 0) data.joining = null;
    return true;
  }

  function leave(ws: ChatSocket, roomName: string) {
    const data = ws.data;
    const joined = dropFrom(data, "rooms", roomName);
    if (!joined && !dropFrom(data, "joining", roomName)) return;
    const room = rooms.get(roomName);
    if (!room) return;
    room.count--;
    if (joined) {
      if (!data.closed) ws.unsubscribe(room.topic);
      const userId = data.user.id;
      const conns = (room.local.get(userId) ?? 1) - 1;
      if (conns > 0) room.local.set(userId, conns);
      else {
        room.local.delete(userId);
        // in a cluster the user may still be here through another node: Redis decides and announces
        if (fanout) fanout.leave(roomName, userId);
        else removeMember(room, room.members.get(userId) ?? userOf(ws));
      }
    }
    unload(room);
  }

  // Saying: validated frames queue up and are stored together in one transaction,
  // then broadcast after the commit, so nothing is broadcast that is not stored.

  type Pending = NewMessage & { ws: ChatSocket };
  let pending: Pending[] = [];
  let flushing: Promise<void> | null = null;
  let flushScheduled = false;

  /** Flushes after one more I/O poll: frames a client wrote on several sockets at once arrive microseconds
   * apart, and share one commit and one round of sends (2.7 messages per commit instead of 2.3 at the fixed rate). */
  function scheduleFlush() {
    if (flushScheduled) return;
    flushScheduled = true;
    setImmediate(() =>
      setImmediate(() => {
        flushScheduled = false;
        flush();
      }),
    );
  }

  /** Runs the flush loop unless it runs already. (Clearing `flushing` inside flushLoop would run before
   * the assignment when the queue is already empty, and leave a settled promise that blocks all later flushes.) */
  function flush() {
    flushing ??= flushLoop().finally(() => (flushing = null));
    return flushing;
  }

  async function flushLoop() {
    while (pending.length) {
      const batch = pending;
      pending = [];
      try {
        const ids = await store.append(batch);
        for (let i = 0; i < batch.length; i++) {
          const m = batch[i];
          const msg: Message = { type: "message", room: m.room, id: ids[i], user: m.user, text: m.text, ts: m.ts };
          if (m.ref !== undefined) msg.ref = m.ref;
          const frame = JSON.stringify(msg);
          const room = rooms.get(m.room);
          if (room) deliver(room, { id: ids[i], frame });
          fanout?.publishMessage(m.room, ids[i], frame);
        }
      } catch (error) {
        metrics.storeErrors++;
        log({ event: "error", where: "store messages", error: String(error) });
        for (const { ws, ref } of batch) {
          if (!ws.data.closed) sendError(ws, "unavailable", "Cannot store the message: the database is unavailable, try again", { ref });
        }
      }
    }
  }

  function say(ws: ChatSocket, msg: Extract<ClientMessage, { type: "say" }>) {
    if (msg.text.length > config.maxText) {
      metrics.framesRejected++;
      return sendError(ws, "bad_request", `text: longer than ${config.maxText} characters`, { ref: msg.ref });
    }
    if (!ws.data.rooms.includes(msg.room)) {
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
    if (!ws.data.rooms.includes(roomName)) return sendError(ws, "not_joined", `Cannot type in ${roomName}: join it first`);
    // at most one typing event per user and room a second; extra ones are dropped quietly
    const key = `${ws.data.user.id}\n${roomName}`;
    const now = performance.now();
    if (now - (typingSeen.get(key) ?? -Infinity) < 1000) return;
    typingSeen.set(key, now);
    const frame = JSON.stringify({ type: "typing", room: roomName, user: userOf(ws) } satisfies ServerMessage);
    publish(rooms.get(roomName)!, frame, ws);
    fanout?.publishTyping(roomName, frame);
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
    if (previous !== name) {
      const user = { id: userId, name };
      applyRename(user, previous);
      const localRooms = [...rooms.values()].filter((r) => r.local.has(userId)).map((r) => r.name);
      fanout?.publishRename(user, previous, localRooms);
    }
    return { ok: true };
  }

  /** Tells the user's own sockets and everyone sharing a room with them, once each. */
  function applyRename(user: User, previous: string) {
    const local = users.get(user.id);
    if (local) local.name = user.name;
    const recipients = new Set<ChatSocket>(local?.sockets);
    for (const room of rooms.values()) {
      if (!room.members.has(user.id)) continue;
      room.members.set(user.id, user);
    }
    // renames are rare (RENAME_LIMIT): walking every socket is cheaper than a socket set per room
    for (const ws of allSockets()) {
      if (ws.data.rooms.some((name) => rooms.get(name)?.members.has(user.id))) recipients.add(ws);
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

  /**
   * The sid from a cookie Hono signed (`<sid>.<base64 HMAC-SHA256>`), checked like Hono's
   * getSignedCookie but with one HMAC key for the process instead of a WebCrypto import per request.
   */
  function signedSid(c: Context<Env>): string | undefined {
    const value = getCookie(c, "sid");
    const dot = value?.lastIndexOf(".") ?? -1;
    if (dot < 0) return;
    const sid = value!.slice(0, dot);
    const expected = Buffer.from(createHmac("sha256", secret).update(sid).digest("base64"));
    const given = Buffer.from(value!.slice(dot + 1));
    return given.length === expected.length && timingSafeEqual(given, expected) ? sid : undefined;
  }

  async function readSession(c: Context<Env>): Promise<Session | undefined> {
    const sid = signedSid(c);
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
    // without Redis this node still serves its own clients, and history fills the gaps later
    if (fanout && !fanout.connected) return c.json({ status: "degraded", redis: "disconnected" });
    return c.json({ status: "ok" });
  });

  app.get("/metrics", (c) => {
    const lines: [string, string, string, number][] = [
      ["chat_connections", "gauge", "Open WebSocket connections", connections],
      ["chat_rooms", "gauge", "Rooms with members on this process", rooms.size],
      ["chat_messages_received_total", "counter", "Chat messages accepted from clients", metrics.messagesReceived],
      ["chat_messages_published_total", "counter", "Chat messages broadcast to rooms", metrics.messagesPublished],
      ["chat_frames_rejected_total", "counter", "Client frames answered with bad_request", metrics.framesRejected],
      ["chat_rate_limited_total", "counter", "Frames refused by a rate limit", metrics.rateLimited],
      ["chat_slow_consumers_closed_total", "counter", "Sockets closed with unsent data buffered (slow or dead readers)", metrics.slowConsumersClosed],
      ["chat_connections_refused_total", "counter", "Connections refused by a connection limit", metrics.connectionsRefused],
      ["chat_store_errors_total", "counter", "Failed writes of chat messages", metrics.storeErrors],
      ["chat_gaps_filled_total", "counter", "Out-of-order arrivals filled from the store", metrics.gapsFilled],
    ];
    if (fanout) {
      lines.push(
        ["chat_redis_connected", "gauge", "1 while the Redis fan-out is connected and subscribed", fanout.connected ? 1 : 0],
        ["chat_fanout_received_total", "counter", "Messages received from other nodes through Redis", metrics.fanoutReceived],
        ["chat_fanout_lag_ms", "gauge", "Publish-to-receive delay of the last message from Redis", metrics.fanoutLagMs],
      );
    }
    const text =
      `# HELP chat_node_info This process\n# TYPE chat_node_info gauge\nchat_node_info{node="${nodeId}",cluster="${fanout ? 1 : 0}"} 1\n` +
      lines.map(([name, type, help, value]) => `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n${name} ${value}\n`).join("");
    return c.text(text, 200, { "content-type": "text/plain; version=0.0.4; charset=utf-8" });
  });

  // `/` hands out a cookie only; the session row is created when /api/* first needs it
  app.get("/", async (c) => {
    if (!signedSid(c)) await issueCookie(c, randomId(24));
    c.header("cache-control", "no-store");
    c.header("content-security-policy", CLIENT_CSP);
    c.header("x-content-type-options", "nosniff");
    c.header("referrer-policy", "same-origin"); // not no-referrer: that sends Origin: null on our own PUT
    return c.body(CLIENT_HTML, 200, { "content-type": "text/html; charset=utf-8" });
  });

  /** Drops sessions that never connected: older than an hour, or the oldest past MAX_UNUSED_SESSIONS. */
  function pruneSessions() {
    return store.pruneSessions(Date.now() - UNUSED_SESSION_TTL_MS, config.maxUnusedSessions).catch((error) =>
      log({ event: "error", where: "prune sessions", error: String(error) }),
    );
  }

  // every MAX_UNUSED_SESSIONS/10 new rows the cap is enforced at once, so a flood of
  // cookie-less requests cannot outgrow it between the minutely prunes
  let createdSincePrune = 0;
  app.use("/api/*", async (c, next) => {
    const sid = signedSid(c);
    let session = sid ? await store.findSession(sid) : undefined;
    if (!session) {
      session = await store.createSession(sid || randomId(24));
      if (!sid) await issueCookie(c, session.sid);
      if (++createdSincePrune >= Math.ceil(config.maxUnusedSessions / 10)) {
        createdSincePrune = 0;
        await pruneSessions();
      }
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
      entry.lastId = Math.max(entry.lastId, room.lastId);
      list.set(room.name, entry);
    }
    const names = [...list.keys()];
    const online = fanout ? await fanout.online(names) : names.map((n) => rooms.get(n)?.members.size ?? 0);
    names.forEach((n, i) => (list.get(n)!.online = online[i]));
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
    if (origin !== undefined && !originAllowed(origin, c.req.header("host"), isSecure(c))) {
      return c.json({ error: { code: "forbidden", message: `Origin ${origin} may not open /chat` } }, 403);
    }
    const session = await readSession(c);
    if (!session) return c.json({ error: { code: "unauthorized", message: "No valid session: load / or /api/me first" } }, 401);
    if (shuttingDown) return c.json({ error: { code: "unavailable", message: "Server is shutting down" } }, 503);
    // before the limit checks: nothing may await between them and the upgrade, or a burst gets past them
    if (!session.used) await store.markUsed(session.sid);
    if (connections >= config.maxConnections) {
      metrics.connectionsRefused++;
      return c.json({ error: { code: "unavailable", message: "Too many connections, try again later" } }, 503);
    }
    if ((users.get(session.id)?.sockets.length ?? 0) >= config.maxConnectionsPerUser) {
      metrics.connectionsRefused++;
      return c.json({ error: { code: "limit_exceeded", message: `At most ${config.maxConnectionsPerUser} connections per user` } }, 429);
    }
    let user = users.get(session.id);
    if (!user) {
      user = { id: session.id, name: session.name, sid: session.sid, sockets: [] };
      users.set(user.id, user);
    }
    const data: SocketData = { user, rooms: [], joining: null, joins: null, buffered: 0, closed: false };
    if (c.env.upgrade(c.req.raw, { data })) return new Response(null);
    return c.json({ error: { code: "bad_request", message: "WebSocket upgrade failed" } }, 400);
  });

  function originAllowed(origin: string, host: string | undefined, secure: boolean): boolean {
    if (config.allowedOrigins) return config.allowedOrigins.some((o) => new URL(o).origin === origin);
    try {
      // same host and port; an http page may not reach a server known to be https (an https page may
      // reach plain http: a TLS proxy that sets no X-Forwarded-Proto looks like that)
      const url = new URL(origin);
      return url.host === host && !(secure && url.protocol === "http:");
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
    maxRequestBodySize: MAX_FRAME, // the only body is PUT /api/me {name}; Bun's default would buffer 128 MB per request
    websocket: {
      maxPayloadLength: MAX_FRAME,
      backpressureLimit: BACKPRESSURE_LIMIT,
      closeOnBackpressureLimit: true,
      idleTimeout: config.idleTimeout,
      sendPings: true,
      open(ws) {
        connections++;
        ws.data.user.sockets.push(ws);
        send(ws, { type: "welcome", user: userOf(ws), maxText: config.maxText });
      },
      message: onMessage,
      close(ws, code, reason) {
        const data = ws.data;
        data.closed = true;
        // Bun closes slow readers itself (1006); unsent bytes at close tell them from clean exits
        if (code === 1006 && reason === "" && data.buffered > 0) metrics.slowConsumersClosed++;
        for (const room of [...data.rooms, ...(data.joining ?? [])]) leave(ws, room);
        connections--;
        data.user.sockets.splice(data.user.sockets.indexOf(ws), 1);
        if (data.user.sockets.length === 0) users.delete(data.user.id);
      },
    },
  });

  // Samples each socket's unsent bytes, so close() can tell a slow reader.
  const sweep = setInterval(() => {
    for (const ws of allSockets()) ws.data.buffered = ws.getBufferedAmount();
    const old = performance.now() - 60_000;
    for (const [key, at] of typingSeen) if (at < old) typingSeen.delete(key);
    for (const buckets of [sayBuckets, renameBuckets]) {
      if (buckets.size > 10_000) for (const [key, b] of buckets) if (b.at < old && !users.has(key)) buckets.delete(key);
    }
  }, SLOW_SWEEP_MS);
  sweep.unref();
  const prune = setInterval(pruneSessions, 60_000);
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
      await flush();
    }
    for (const ws of [...allSockets()]) ws.close(1001, "server shutting down");
    await server.stop();
    await fanout?.close(); // removes this node's members from presence at once
    await store.close();
  }

  const url = `http://${config.host === "0.0.0.0" ? "127.0.0.1" : config.host}:${server.port}`;
  log({ event: "ready", port: server.port, url });
  return { server, port: server.port!, url, config, store, metrics, drain, stop, pruneSessions };
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
