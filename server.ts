// A real-time chat server: Bun's native WebSocket pub/sub, Hono for HTTP and sessions, zod for the
// wire format, SQLite (bun:sqlite) or Postgres (Bun.SQL) for history, Redis between the processes of
// a cluster. It reads top to bottom in the order data flows; README's "Development" maps the units.
import { RedisClient, type Server, type ServerWebSocket, SQL, type WebSocketHandler } from "bun";
import { Database } from "bun:sqlite";
import { Hono, type Context } from "hono";
import { deleteCookie, getCookie, setSignedCookie } from "hono/cookie";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { accessSync, constants, existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import * as z from "zod";
import adminPage from "./admin.html" with { type: "text" };
import page from "./client.html" with { type: "text" };
import confusables from "./confusables.json";
import pkg from "./package.json" with { type: "json" };

// ── Constants: every fixed number, named ─────────────────────────────────────

const CLIENT_HTML = page as unknown as string; // bun-types types *.html as HTMLBundle
const ADMIN_HTML = adminPage as unknown as string;
export const VERSION = pkg.version; // embedded by bun build --compile, like the page
const CONFUSABLES: Record<string, string> = confusables; // UTS #39 prototypes; scripts/confusables.ts regenerates the file
const TOPIC_PREFIX = "room:"; // Bun pub/sub topic of a room
const MAX_FRAME = 64 * 1024; // a larger frame closes the socket with 1009 (Bun does it); also the largest HTTP body
const BACKPRESSURE_LIMIT = 1024 * 1024; // unsent bytes per socket; past it Bun closes the socket
const BUFFER_SAMPLE_MS = 200; // every socket's unsent bytes are sampled this often, so a close can tell a slow reader
const BACKPRESSURE_SAMPLE_MS = 20; // and a room's at most this often right after a publish met backpressure
const JANITOR_MS = 60_000; // how often stale throttle entries, idle rate buckets and unused sessions are dropped
const STALE_MS = 60_000; // a typing entry or an idle rate bucket older than this is forgotten
const BUCKETS_KEPT = 10_000; // rate-limit buckets are pruned only past this many
const TYPING_EVERY_MS = 1_000; // at most one typing frame per user and room is passed on in this time
const SHUTDOWN_TIMEOUT_MS = 8_000; // a graceful stop that takes longer exits with 1
const FD_LIMIT_FALLBACK = 10_000; // open files assumed where /proc/self/limits cannot be read
const FD_RESERVE_MIN = 256; // descriptors kept from sockets for HTTP requests, the database and Redis (or a quarter, if more)
const UNUSED_SESSION_TTL_MS = 60 * 60_000; // a session row that never connected goes after an hour
const SEEN_EVERY_MS = 60 * 60_000; // a connected session's last-seen time is written at most this often
const PRUNE_BATCH = 1_000; // rows one janitor statement deletes, so it never holds the writer long
const COOKIE_MAX_AGE_S = 400 * 24 * 3600; // browsers cap cookie lifetimes at 400 days
const SID_BYTES = 24; // 192-bit session ids
const HANDLE_BYTES = 9; // a session's public name (GET /api/me/sessions)
const USER_ID_BYTES = 9;
const SECRET_BYTES = 32;
const NODE_SUFFIX_BYTES = 4;
const DEFAULT_NAME_ATTEMPTS = 8; // random default names tried before one with a longer random tail
const HEALTH_PROBE_MS = 1_000; // /healthz writes to the store at most this often
const LOGIN_WINDOW_MS = 15 * 60_000; // failed logins are counted over this window…
const LOGIN_FAILURES = 10; // …and past this many, per name or per address, logins are refused
const PASSWORD_HASH = { algorithm: "argon2id" } as const; // Bun's defaults: 64 MiB, 2 passes
const ROOM_LIST_LIMIT = 100; // rooms in GET /api/rooms
const SEARCH_INDEX_MS = 100; // SQLite indexes new messages for search this often…
const SEARCH_INDEX_BATCH = 500; // …this many at most (a few ms): under a flood search lags rather than delivery
const SEARCH_CATCH_UP = 10_000; // a search first indexes up to this many messages still waiting
const SCROLLBACK_CHUNK = 20; // messages a REST page reads at a time (see newestThatFit)
const FANOUT_CHUNK = 256; // sockets a paced fan-out (renames) writes to per event-loop turn
const AUDIT_LIMIT = 200; // entries in GET /api/rooms/:room/audit
const MY_ROOMS_LIMIT = 200; // rooms in GET /api/me/rooms, busiest first
const USER_ROOMS_KEPT = 1_000; // rooms kept on a user's list; joining more drops the longest joined
const UNREAD_LIMIT = 1_000; // unread messages counted per room (a bounded index range; the page shows "1000+")
const MENTION_LIMIT = 20; // users one text can mention; also the `@`s of a text that are looked up
const READ_RATE = { count: 30, perMs: 10_000 }; // `read` frames per user: each is a write and a fan-out event
const SEARCH_WORDS = 8; // words one search may ask for (each must match)
const SEARCH_WORD_CHARS = 64; // longest search word, in UTF-16 code units
const SEARCH_QUERY_CHARS = 1_024; // longest q of a search, before it is split into words
const DAY_MS = 24 * 3600_000;
const RETENTION_BATCH = 1_000; // messages one expiring transaction deletes
const EMPTIED_KEPT = 100_000; // rooms left empty by retention, remembered until they can be dropped
const GAP_READ_LIMIT = 10_000; // messages one read of the store returns when filling a gap
const GAP_ATTEMPTS = 5; // empty reads of a gap before it is skipped
const GAP_RETRY_MS = 50; // the wait after the n-th empty read is n times this
// SQLite
const WAL_REWIND_BYTES = 64 * 1024 * 1024; // past this the checkpointer rewinds the WAL to its start
const CHECKPOINT_MS = 100; // the checkpointer's interval (see startCheckpointer)
const LAST_ID_FLUSH_MS = 1_000; // how often rooms' new last ids are written to their rows
const LAST_ID_FLUSH_ROOMS = 1_000; // rows written by one flush
const OPEN_BUSY_TIMEOUT_MS = 5_000; // while opening (before serving), a statement may wait this long for a lock
const SQLITE_BUSY_ATTEMPTS = 2_000; // 1 ms apart: a statement that meets a lock retries for about 2 s
// Postgres
const PG_POOL = 8;
const PG_ROWS_PER_INSERT = 1_000; // 7 parameters a row stays under Postgres's 65,535 per statement
const PG_SCHEMA_LOCK = 727_274; // advisory lock key: nodes starting together create the tables one at a time
// Redis
const HEARTBEAT_MS = 5_000;
const BACKUP_BUSY_MS = 10_000; // a backup waits this long for a writer's lock
const PG_CONNECT_TIMEOUT_S = 10; // a Postgres host that does not answer fails a connection after this many seconds
const DB_RETRY_MS = 500; // the first retry of an unreachable database at start; each next one waits twice as long…
const DB_RETRY_MAX_MS = 5_000; // …up to this
const REDIS_RETRY_MAX_MS = 30_000; // retries of a Redis unreachable at start back off up to this
const LOG_SUMMARY_MS = 60_000; // refusals and rate limits are logged as one line per reason this often
const TALLY_ADDRESSES = 1_000; // distinct addresses a refusal tally counts (more are in its count, not its list)
const TALLY_TOP = 5; // busiest addresses named in a tally's line
const NODE_TTL_MS = 15_000; // a node silent this long is dead: its members leave presence
const REDIS_CONNECT_TIMEOUT_MS = 2_000;
const ROOM_CHANNEL = "chat:room:"; // + room: messages, typing and presence of one room
const USERS_CHANNEL = "chat:users"; // renames
// Metrics
const LATENCY_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]; // s: sub-ms commits to stalls
const LAG_TICK_MS = 100; // the event-loop lag is how late a timer of this period fires
// Admin console
const STATS_EVERY_MS = 1_000; // each node samples itself this often…
const STATS_KEPT = 600; // …and keeps this many samples of each node: 10 minutes
const STATS_STALE_MS = 5_000; // a node without a newer sample is shown down
const ADMIN_LIST_LIMIT = 100; // rows in each table of the console

/** A page may run and style itself only with its own inline <script> and <style>, named by hash:
 * an injected tag or handler would not run even if some text slipped past textContent. */
function pageCsp(html: string): string {
  const hashes = (tag: string) =>
    [...html.matchAll(new RegExp(`<${tag}[^>]*>([\\s\\S]*?)</${tag}>`, "g"))]
      .map(([, body]) => `'sha256-${createHash("sha256").update(body).digest("base64")}'`)
      .join(" ");
  return `default-src 'none'; script-src ${hashes("script")}; style-src ${hashes("style")}; connect-src 'self'; ` +
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
}
const CLIENT_CSP = pageCsp(CLIENT_HTML);
const ADMIN_CSP = pageCsp(ADMIN_HTML);

/** What GET /favicon.ico answers (a chat bubble), so a browser's own request is not a 404; the page draws
 * its icon with the unread count itself. */
const FAVICON_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" fill="#3454d1"/>' +
  '<path d="M8 8h16a2 2 0 0 1 2 2v9a2 2 0 0 1-2 2h-9l-5 4v-4H8a2 2 0 0 1-2-2v-9a2 2 0 0 1 2-2z" fill="#fff"/></svg>';

// ── Config: env and flags, parsed once; HELP is written from the same table ─

const RatePattern = /^(\d+)\/(\d+(?:\.\d+)?)s$/;
const Rate = z
  .string()
  .regex(RatePattern, "expected <count>/<seconds>s, e.g. 20/10s")
  .transform((s) => {
    const [, count, seconds] = RatePattern.exec(s)!;
    return { count: Number(count), perMs: Number(seconds) * 1000 };
  })
  .refine((r) => r.count > 0 && r.perMs > 0, "count and seconds must be positive");
export type Rate = z.output<typeof Rate>;

const Int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);
const DatabaseUrl = z
  .string()
  .regex(/^(sqlite:\/\/.+|:memory:|postgres(ql)?:\/\/.+)$/, "expected sqlite://<file>, :memory: or postgres://user@host/db");
/** An IP address or a DNS name: 999.1.1.1 is neither, and is refused here rather than by listen's EINVAL. */
const Host = z
  .string()
  .refine((h) => parseIp(h) !== undefined || (/^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$/.test(h) && !/^[\d.]+$/.test(h)), "expected an IP address (0.0.0.0, ::) or a host name");
/** A duration like 30d, 12h, 15m or 90s, in ms. */
const Duration = z
  .string()
  .regex(/^\d+(s|m|h|d)$/, "expected a number and a unit (s, m, h or d), e.g. 30d")
  .transform((s) => Number(s.slice(0, -1)) * { s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 }[s.at(-1) as "s"]);
const Cidrs = z
  .string()
  .transform((s) => s.split(",").map((c) => c.trim()).filter(Boolean))
  .pipe(z.array(z.string().refine((c) => parseCidr(c) !== undefined, "expected CIDRs like 10.0.0.0/8 or ::1/128, separated by commas")))
  .transform((list) => list.map((c) => parseCidr(c)!));
const Origins = z
  .string()
  .transform((s) => s.split(",").map((o) => o.trim()).filter(Boolean))
  .pipe(z.array(z.url()));

/** A setting with a default, written as it would be in the environment. */
function setting<S extends z.ZodType>(env: string, schema: S, fallback: string, help: string, flag?: string) {
  return { env, flag, fallback, help, schema: schema.prefault(fallback as z.input<S>) };
}
/** A setting that may stay unset. */
function optional<S extends z.ZodType>(env: string, schema: S, help: string, flag?: string) {
  return { env, flag, fallback: "", help, schema: schema.optional() };
}

export const SETTINGS = {
  port: setting("PORT", Int(0, 65535), "3000", "TCP port (0 picks a free one)", "--port"),
  host: setting("HOST", Host, "0.0.0.0", "address to listen on (an IP address or a host name)", "--host"),
  databaseUrl: setting("DATABASE_URL", DatabaseUrl, "sqlite://chat.db", "sqlite://<file>, :memory: or postgres://user@host/db", "--db"),
  redisUrl: optional("REDIS_URL", z.string().regex(/^rediss?:\/\/[^/\s]+/, "expected redis://host:port (or rediss:// for TLS)"), "redis://host:port turns on the cluster fan-out", "--redis"),
  nodeId: optional("NODE_ID", z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/), "this process's name in a cluster (default: random)"),
  sessionSecret: optional("SESSION_SECRET", z.string().min(16, "must be at least 16 characters"), "cookie signing key (default: generated, kept in the database)"),
  allowedOrigins: optional("ALLOWED_ORIGINS", Origins, "comma list of origins allowed to open /chat (default: same host)"),
  historyOnJoin: setting("HISTORY_ON_JOIN", Int(0, 1000), "50", "messages sent on a plain join"),
  recoveryLimit: setting("RECOVERY_LIMIT", Int(1, 10_000), "500", "most messages sent on a join with since"),
  maxText: setting("MAX_TEXT", Int(1, 32_000), "2000", "longest message, in UTF-16 code units"),
  rateLimit: setting("RATE_LIMIT", Rate, "20/10s", "say frames per user (all tabs together)"),
  renameLimit: setting("RENAME_LIMIT", Rate, "5/60s", "renames per user"),
  joinLimit: setting("JOIN_LIMIT", Rate, "100/60s", "join frames per user (all sockets, surviving reconnects)"),
  presenceIntervalMs: setting("PRESENCE_INTERVAL_MS", Int(1, 60_000), "100", "at most one presence_diff per room this often"),
  historyPageBytes: setting("HISTORY_PAGE_BYTES", Int(1024, 16 * 1024 * 1024), "131072", "largest history frame (one message always fits)"),
  historyBytes: setting("HISTORY_BYTES", Rate, "4194304/4s", "history bytes per connection, in <bytes>/<seconds>s"),
  historyBytesPerAddress: setting("HISTORY_BYTES_PER_ADDRESS", Rate, "16777216/8s", "history, REST paging and search bytes per client address"),
  maxConnections: setting("MAX_CONNECTIONS", Int(0, 1_000_000), "0", "open sockets per process (0: 3/4 of the open-file limit)"),
  maxConnectionsPerUser: setting("MAX_CONNECTIONS_PER_USER", Int(1, 10_000), "20", "open sockets per user"),
  maxRoomsPerConnection: setting("MAX_ROOMS_PER_CONNECTION", Int(1, 10_000), "50", "rooms one socket may join"),
  maxUnusedSessions: setting("MAX_UNUSED_SESSIONS", Int(1, 100_000_000), "100000", "session rows that never connected"),
  maxSessions: setting("MAX_SESSIONS", Int(1, 100_000_000), "1000000", "session rows in all; past it the least recently seen guests go"),
  guestTtl: setting("GUEST_TTL", Duration, "30d", "a guest session unused this long is removed (with its user, if it has no other)"),
  trustedProxies: setting("TRUSTED_PROXIES", Cidrs, "", "CIDRs of proxies whose X-Forwarded-For names the client"),
  sessionsPerAddress: setting("SESSIONS_PER_ADDRESS", Rate, "30/60s", "new guest sessions per client address"),
  upgradesPerAddress: setting("UPGRADES_PER_ADDRESS", Rate, "120/60s", "WebSocket upgrades per client address"),
  maxConnectionsPerAddress: setting("MAX_CONNECTIONS_PER_ADDRESS", Int(1, 1_000_000), "200", "open sockets per client address"),
  rateLimitPerAddress: setting("RATE_LIMIT_PER_ADDRESS", Rate, "100/10s", "say frames per client address (all its users together)"),
  requestsPerAddress: setting("REQUESTS_PER_ADDRESS", Rate, "600/60s", "/api requests per client address"),
  renameLimitPerAddress: setting("RENAME_LIMIT_PER_ADDRESS", Rate, "10/60s", "renames per client address (all its users together)"),
  metricsPort: optional("METRICS_PORT", Int(0, 65535), "serve /metrics on this port only (on METRICS_HOST)"),
  metricsHost: setting("METRICS_HOST", Host, "127.0.0.1", "address of METRICS_PORT"),
  metricsToken: optional("METRICS_TOKEN", z.string().min(16, "must be at least 16 characters"), "/metrics needs Authorization: Bearer <token>"),
  retentionDays: setting("RETENTION_DAYS", Int(0, 100_000), "0", "messages older than this many days are deleted (0 keeps them)"),
  maxRooms: setting("MAX_ROOMS", Int(1, 100_000_000), "100000", "stored rooms; past it empty ones are dropped, then new ones refused"),
  guests: setting("GUESTS", z.enum(["write", "read", "off"]), "write", "what guests may do: write (chat), read (join public rooms and read), off (sign in first)"),
  maxSessionsPerUser: setting("MAX_SESSIONS_PER_USER", Int(1, 10_000), "50", "sessions (signed-in devices) per account; a new login drops the least recently seen"),
  logLevel: setting("LOG_LEVEL", z.enum(["debug", "info", "warn", "error"]), "info", "least severe log lines written: debug, info, warn or error"),
  logFormat: setting("LOG_FORMAT", z.enum(["auto", "json", "pretty"]), "auto", "json (one object a line), pretty (for people), or auto: pretty on a terminal, else json"),
  databaseWait: setting("DATABASE_WAIT", Duration, "30s", "how long an unreachable database is retried at start before exiting with code 1"),
  idleTimeout: setting("IDLE_TIMEOUT", Int(1, 960), "60", "seconds without a frame or pong before a socket is dropped"),
};
type Settings = typeof SETTINGS;

export const Config = z.object(
  Object.fromEntries(Object.entries(SETTINGS).map(([key, s]) => [key, s.schema])) as { [K in keyof Settings]: Settings[K]["schema"] },
);
export type Config = z.output<typeof Config>;
type ConfigInput = z.input<typeof Config>;

const FLAGS = new Map(Object.entries(SETTINGS).flatMap(([key, s]) => (s.flag ? [[s.flag, key] as const] : [])));

/** --help, naming the program as it was run (`bun run server.ts` or the binary's path). */
export const help = (program: string) => [
  `Usage: ${program} [--port N] [--host ADDR] [--db URL] [--redis URL]     serve (until SIGTERM or SIGINT)`,
  `       ${program} grant-admin <name> [--db URL]   make an account an admin of the instance`,
  `       ${program} backup <file> [--db URL]        copy a live SQLite database (VACUUM INTO); Postgres: pg_dump`,
  `       ${program} check [--db URL] [--redis URL]  check the settings and reach the database and Redis; exit 0 or 1`,
  `       ${program} --version                       the version and the Bun it runs on`,
  "",
  "Settings, from the environment (a flag wins over its variable):",
  ...Object.values(SETTINGS).map((s) => `  ${`${s.env}=${s.fallback}`.padEnd(36)}${(s.flag ?? "").padEnd(9)}${s.help}`),
].join("\n");

/** Settings as the environment names them (what readSettings reads back): for starting a process with them. */
export function settingsEnv(settings: Partial<Record<keyof Settings, string>>): Record<string, string> {
  return Object.fromEntries(Object.entries(settings).map(([key, value]) => [SETTINGS[key as keyof Settings].env, value!]));
}

export class ConfigError extends Error {}

/** Collects raw settings from env and argv (flags win); throws ConfigError on an unknown flag. */
export function readSettings(env: Record<string, string | undefined>, argv: string[] = []): Record<string, string> {
  const raw: Record<string, string> = {};
  for (const [key, { env: name }] of Object.entries(SETTINGS)) {
    if (env[name] !== undefined && env[name] !== "") raw[key] = env[name];
  }
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const key = FLAGS.get(flag);
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
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  const key = issue.path[0] as keyof Settings;
  throw new ConfigError(`Cannot parse ${SETTINGS[key]?.env ?? key}=${JSON.stringify(raw[key])}: ${issue.message}`);
}

// ── Protocol: the only definition of the wire format ────────────────────────

// One rule for text, refs and names (README "Text and names" says it in words; a test compares them).
// Text and refs: no C0 control but tab and newline (so no CR), no DEL, no C1, no U+2028/2029: invisible, and unsafe to store or split lines
const TEXT_CONTROL = /[\u0000-\u0008\u000B-\u001F\u007F-\u009F\u2028\u2029]/;
// what shows as nothing: spaces, controls, format and default-ignorable characters (zero-width, bidi, variation
// selectors, tags, Hangul fillers, U+180E), and the braille blank
const INVISIBLE = /[\p{White_Space}\p{Default_Ignorable_Code_Point}\p{Cc}\p{Cf}\u2800]/u;
const ONLY_INVISIBLE = /^[\p{White_Space}\p{Default_Ignorable_Code_Point}\p{Cc}\p{Cf}\u2800]*$/u;
// in names: every control, and bidi marks, embeddings, overrides and isolates (U+202E shows "nimdA" as "Admin")
const NAME_CONTROL = /[\p{Cc}\u2028\u2029]/u;
const BIDI = /[\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069]/;
const MARK_STACK = /\p{M}{4}/u; // Tibetan stacks three marks; longer runs are zalgo
const UNASSIGNED = /[\p{Cn}\p{Co}]/u; // nothing to show, or a private font's glyph

/** Why a message text is refused, or undefined; the say schema and quickSay both ask it. */
export function textProblem(text: string): string | undefined {
  if (TEXT_CONTROL.test(text)) return "text has control characters (only tab and newline are allowed)";
  if (!text.isWellFormed()) return "text has a lone surrogate";
  if (ONLY_INVISIBLE.test(text)) return "text is only invisible characters";
}

/** Why a ref is refused, or undefined: it is stored with the message, so the text's control rule holds. */
function refProblem(ref: string): string | undefined {
  if (ref.length > 64) return "ref is longer than 64 characters";
  // Postgres refuses NUL (failing the whole batch), and a lone surrogate would come back as U+FFFD
  if (TEXT_CONTROL.test(ref) || !ref.isWellFormed()) return "ref has control characters or a lone surrogate";
}

/** Why a (trimmed) name is refused, or undefined. */
export function nameProblem(name: string): string | undefined {
  if (NAME_CONTROL.test(name)) return "name has control characters";
  if (!name.isWellFormed()) return "name has a lone surrogate";
  if (ONLY_INVISIBLE.test(name)) return "name is only invisible characters";
  if (BIDI.test(name)) return "name has bidi control characters (they reorder what is shown)";
  if (INVISIBLE.test(name.replaceAll(" ", ""))) return "name has invisible characters (zero-width, format or unusual spaces)";
  if (UNASSIGNED.test(name)) return "name has unassigned or private-use characters";
  if (MARK_STACK.test(name)) return "name has more than 3 combining marks in a row";
  const scripts = mixedScripts(name);
  if (scripts) return `name mixes scripts (${scripts.join(" and ")}); use letters of one script`;
}

// Scripts by ISO 15924 code (Unicode 16); Common and Inherited go with any script
const SCRIPTS = ("Adlm Aghb Ahom Arab Armi Armn Avst Bali Bamu Bass Batk Beng Bhks Bopo Brah Brai Bugi Buhd Cakm Cans Cari " +
  "Cham Cher Chrs Copt Cpmn Cprt Cyrl Deva Diak Dogr Dsrt Dupl Egyp Elba Elym Ethi Gara Geor Glag Gong Gonm Goth Gran Grek " +
  "Gujr Gukh Guru Hang Hani Hano Hatr Hebr Hira Hluw Hmng Hmnp Hung Ital Java Kali Kana Kawi Khar Khmr Khoj Kits Knda Krai " +
  "Kthi Lana Laoo Latn Lepc Limb Lina Linb Lisu Lyci Lydi Mahj Maka Mand Mani Marc Medf Mend Merc Mero Mlym Modi Mong Mroo " +
  "Mtei Mult Mymr Nagm Nand Narb Nbat Newa Nkoo Nshu Ogam Olck Onao Orkh Orya Osge Osma Ougr Palm Pauc Perm Phag Phli Phlp " +
  "Phnx Plrd Prti Rjng Rohg Runr Samr Sarb Saur Sgnw Shaw Shrd Sidd Sind Sinh Sogd Sogo Sora Soyo Sund Sunu Sylo Syrc Tagb " +
  "Takr Tale Talu Taml Tang Tavt Telu Tfng Tglg Thaa Thai Tibt Tirh Tnsa Todr Toto Tutg Ugar Vaii Vith Wara Wcho Xpeo Xsux " +
  "Yezi Yiii Zanb").split(" ").map((code) => ({ code, test: new RegExp(`\\p{Script_Extensions=${code}}`, "u") }));
const ANY_SCRIPT = /[\p{Script_Extensions=Zyyy}\p{Script_Extensions=Zinh}]/u;
// UTS #39 "Highly Restrictive": one script, or one of these sets (Han is written with kana, Bopomofo or Hangul)
const SCRIPT_SETS = [["Latn", "Hani", "Hira", "Kana"], ["Latn", "Hani", "Bopo"], ["Latn", "Hani", "Hang"]];
const scriptName = new Intl.DisplayNames(["en"], { type: "script" });

/** The scripts a name mixes when it is not "Highly Restrictive" (UTS #39 §5.2), else undefined. */
function mixedScripts(name: string): string[] | undefined {
  // each letter's Script_Extensions; a name is single-script when one script is in all of them
  const sets = [...name].filter((ch) => !ANY_SCRIPT.test(ch)).map((ch) => SCRIPTS.filter((s) => s.test.test(ch)).map((s) => s.code));
  if (sets.length === 0) return;
  const common = sets.reduce((all, set) => all.filter((code) => set.includes(code)));
  if (common.length > 0) return;
  if (SCRIPT_SETS.some((allowed) => sets.every((set) => set.some((code) => allowed.includes(code))))) return;
  return [...new Set(sets.map((set) => set[0]))].map((code) => scriptName.of(code) ?? code);
}

/** UTS #39 skeleton: NFD, each character replaced by its prototype in confusables.txt, NFD again. */
export function skeleton(s: string): string {
  let out = "";
  for (const ch of s.normalize("NFD")) out += CONFUSABLES[ch] ?? ch;
  return out.normalize("NFD");
}

/** What makes two names the same: case (NFKC, lower case), then look-alikes ("Admin", "admin", "Аdmin" in Cyrillic, "adrnin"). */
export function nameKey(name: string): string {
  // lower case again after the skeleton, whose prototypes are sometimes capitals ("0" → "O")
  return skeleton(name.normalize("NFKC").toLowerCase()).toLowerCase();
}

const ROOM = /^[a-z0-9][a-z0-9_-]{0,31}$/;
export const RoomName = z.string().regex(ROOM, "room must match ^[a-z0-9][a-z0-9_-]{0,31}$");
/** A zod refinement from a "why is it refused" function, so the schema words the problem the same way. */
const refuse = (problem: (s: string) => string | undefined) => (s: string, ctx: z.RefinementCtx) => {
  const message = problem(s);
  if (message) ctx.addIssue({ code: "custom", message });
};
export const Name = z.string().trim().min(1, "name is empty").max(32, "name is longer than 32 characters").superRefine(refuse(nameProblem));
export const Text = z.string().min(1, "text is empty").superRefine(refuse(textProblem));
export const Ref = z.string().superRefine(refuse(refProblem));
export const MessageId = z.number().int().nonnegative();
/** One emoji: a single grapheme cluster that is a pictograph (with its modifiers and joiners), at most 32 UTF-16 units. */
export const Emoji = z.string().max(32, "emoji is longer than 32 characters").refine(isEmoji, "emoji must be one emoji");
const GRAPHEMES = new Intl.Segmenter(undefined, { granularity: "grapheme" });
function isEmoji(s: string): boolean {
  const [first, second] = GRAPHEMES.segment(s);
  return !!first && !second && /\p{Extended_Pictographic}|\p{Regional_Indicator}|\u20E3/u.test(s) && !/[\p{L}\p{N}\s]/u.test(s.replace(/[\u{1F1E6}-\u{1F1FF}#*0-9\u20E3\uFE0F]/gu, ""));
}
export const Visibility = z.enum(["public", "private", "dm"]);
export type Visibility = z.infer<typeof Visibility>;
const DM_PREFIX = "dm-"; // dm rooms' names: made by the server, never by a user
// delete, close, reopen: an admin in the console; revoke, ban_user, unban_user: the instance's, recorded with room ""
export const AuditAction = z.enum(["kick", "ban", "unban", "mute", "unmute", "promote", "demote", "invite", "remove", "delete", "close", "reopen", "revoke", "ban_user", "unban_user"]);
export type AuditAction = z.infer<typeof AuditAction>;
export const User = z.strictObject({ id: z.string(), name: z.string() });
export type User = z.infer<typeof User>;

export const ClientMessage = z.discriminatedUnion("type", [
  z.strictObject({ type: z.literal("join"), room: RoomName, since: MessageId.optional() }),
  z.strictObject({ type: z.literal("history"), room: RoomName, after: MessageId }),
  z.strictObject({ type: z.literal("leave"), room: RoomName }),
  z.strictObject({ type: z.literal("say"), room: RoomName, text: Text, ref: Ref.optional(), replyTo: MessageId.optional() }),
  z.strictObject({ type: z.literal("edit"), room: RoomName, id: MessageId, text: Text, ref: Ref.optional() }),
  z.strictObject({ type: z.literal("delete"), room: RoomName, id: MessageId, ref: Ref.optional() }),
  z.strictObject({ type: z.literal("react"), room: RoomName, id: MessageId, emoji: Emoji, on: z.boolean(), ref: Ref.optional() }),
  z.strictObject({ type: z.literal("typing"), room: RoomName }),
  z.strictObject({ type: z.literal("nick"), name: Name }),
  z.strictObject({ type: z.literal("read"), room: RoomName, seq: MessageId }),
]);
export type ClientMessage = z.infer<typeof ClientMessage>;
type Frame<T extends ClientMessage["type"]> = Extract<ClientMessage, { type: T }>;

/** A message in its current state. `seq` is the room sequence number of its latest change (at creation: its id). */
export const Message = z.strictObject({
  type: z.literal("message"),
  room: RoomName,
  id: MessageId,
  seq: MessageId,
  user: User,
  text: z.string(), // "" for a deleted message
  ts: z.number(),
  ref: Ref.optional(),
  replyTo: MessageId.optional(),
  mentions: z.array(z.string()).optional(), // user ids
  editedAt: z.number().optional(),
  deleted: z.literal(true).optional(), // a tombstone: id, author and ts stay
  reactions: z.record(z.string(), z.array(z.string())).optional(), // emoji → user ids, in the order added
});
export type Message = z.infer<typeof Message>;

export const ErrorCode = z.enum(["bad_request", "not_joined", "rate_limited", "name_taken", "limit_exceeded", "unavailable", "forbidden", "not_found"]);
export type ErrorCode = z.infer<typeof ErrorCode>;

export const ServerMessage = z.discriminatedUnion("type", [
  z.strictObject({ type: z.literal("welcome"), user: User, maxText: z.number().int() }),
  // messages: new since `since` (or the newest), in their current state; updates: older ones that changed since `since`
  z.strictObject({
    type: z.literal("history"), room: RoomName, seq: MessageId, messages: z.array(Message), updates: z.array(Message), complete: z.boolean(), more: z.boolean(),
  }),
  z.strictObject({ type: z.literal("presence"), room: RoomName, users: z.array(User) }),
  Message,
  // an edit, a deletion or a reaction: the message's whole new state; `ref` only on the requesting socket's copy
  z.strictObject({ type: z.literal("updated"), room: RoomName, seq: MessageId, message: Message, ref: Ref.optional() }),
  z.strictObject({ type: z.literal("presence_diff"), room: RoomName, joins: z.array(User), leaves: z.array(User) }),
  z.strictObject({ type: z.literal("renamed"), user: User, previous: z.string() }),
  z.strictObject({ type: z.literal("typing"), room: RoomName, user: User }),
  z.strictObject({ type: z.literal("invited"), room: RoomName, by: User }),
  // another socket of this user read the room up to seq (apply the highest seen)
  z.strictObject({ type: z.literal("read"), room: RoomName, seq: MessageId }),
  // the socket is out of the room: kicked or banned by `by`, closed by an admin, or it removed itself from a private room
  z.strictObject({ type: z.literal("removed"), room: RoomName, by: User, reason: z.enum(["kicked", "banned", "closed", "left"]) }),
  z.strictObject({
    type: z.literal("moderation"),
    room: RoomName,
    action: z.enum(["kick", "ban", "unban", "mute", "unmute", "promote", "demote"]),
    user: User,
    by: User,
    until: z.number().int().optional(), // ms since the epoch, for a ban or mute that ends
  }),
  z.strictObject({
    type: z.literal("error"),
    code: ErrorCode,
    message: z.string(),
    ref: Ref.optional(),
    retryAfterMs: z.number().int().nonnegative().optional(),
    room: RoomName.optional(), // the room of a refused join
  }),
]);
export type ServerMessage = z.infer<typeof ServerMessage>;
type ErrorExtra = { ref?: string; retryAfterMs?: number; room?: string };

export const RenameBody = z.strictObject({ name: Name });
export const CreateRoomBody = z.strictObject({
  name: RoomName.refine((name) => !name.startsWith(DM_PREFIX), `names starting with ${DM_PREFIX} are reserved for direct messages`),
  visibility: z.enum(["public", "private"]),
});
export const DmBody = z.strictObject({ user: z.string().min(1).max(64) });
const Minutes = z.number().int().min(1).max(10 * 365 * 24 * 60);
export const BanBody = z.strictObject({ minutes: Minutes.optional() });
export const MuteBody = z.strictObject({ minutes: Minutes });
const Password = z.string().min(8, "password is shorter than 8 characters").max(256, "password is longer than 256 characters");
export const PasswordBody = z.strictObject({ password: Password, currentPassword: z.string().max(256).optional() });
export const LoginBody = z.strictObject({ name: z.string().min(1).max(256), password: z.string().min(1).max(256) });
const UserId = z.string().min(1).max(64);
/** What an admin may do from the console (POST /api/admin/actions). */
export const AdminAction = z.discriminatedUnion("action", [
  z.strictObject({ action: z.literal("revoke"), user: UserId, session: z.string().min(1).max(64) }),
  z.strictObject({ action: z.literal("ban"), user: UserId, banned: z.boolean() }),
  z.strictObject({ action: z.literal("delete"), room: RoomName, id: MessageId }),
  z.strictObject({ action: z.literal("close"), room: RoomName, closed: z.boolean() }),
]);
export type AdminAction = z.infer<typeof AdminAction>;
export const AdminStatsQuery = z.strictObject({ since: z.coerce.number().int().nonnegative().default(0) });
export const AdminUsersQuery = z.strictObject({ name: z.string().min(1).max(256).optional() });
/** One node's second, as the console draws it and nodes share it through the fan-out. */
export const StatsSample = z.strictObject({
  at: z.number(), // ms since the epoch
  connections: z.number(),
  rooms: z.number(),
  messages: z.number(), // accepted from clients in that second
  p50: z.number().nullable(), // chat_delivery_seconds in that second, in ms (null: nothing delivered)
  p99: z.number().nullable(),
  refused: z.record(z.string(), z.number()), // refusals and rate limits in that second, by reason (none: left out)
  rss: z.number(),
  heap: z.number(),
  lagMs: z.number(),
});
export type StatsSample = z.infer<typeof StatsSample>;
export const MessagesQuery = z.strictObject({
  before: z.coerce.number().int().positive().optional(),
  limit: z.coerce.number().int().min(1).max(100).default(50),
});
/** Search words: runs of letters, digits and marks, as the engines' tokenizers cut text; anything else (quotes,
 * operators, `*`, `-`) only separates words, so no query syntax of the user's ever reaches FTS5 or to_tsquery. */
export const searchWords = (q: string): string[] => q.match(/[\p{L}\p{N}\p{M}]+/gu) ?? [];
export const SearchQuery = z.strictObject({
  q: z.string().max(SEARCH_QUERY_CHARS).transform(searchWords).pipe(
    z.array(z.string().max(SEARCH_WORD_CHARS, `a word is longer than ${SEARCH_WORD_CHARS} characters`))
      .min(1, "q has no letters or digits to search for").max(SEARCH_WORDS, `q has more than ${SEARCH_WORDS} words`),
  ),
  before: z.coerce.number().int().positive().optional(),
  limit: z.coerce.number().int().min(1).max(50).default(20),
});

type MessageFields = {
  room: string; id: number; seq?: number; user: User; text: string; ts: number; ref?: string | null; replyTo?: number | null;
  mentions?: string[] | null; editedAt?: number | null; deleted?: boolean; reactions?: Record<string, string[]> | null;
};
/** A message as stored and sent: the one place a Message is put together (a tombstone keeps only id, author and ts). */
export function messageOf(m: MessageFields): Message {
  const message: Message = { type: "message", room: m.room, id: m.id, seq: m.seq ?? m.id, user: m.user, text: m.deleted ? "" : m.text, ts: m.ts };
  if (m.ref != null) message.ref = m.ref;
  if (m.deleted) {
    message.deleted = true;
    if (m.editedAt != null) message.editedAt = m.editedAt;
    return message;
  }
  if (m.replyTo != null) message.replyTo = m.replyTo;
  if (m.mentions?.length) message.mentions = m.mentions;
  if (m.editedAt != null) message.editedAt = m.editedAt;
  if (m.reactions && Object.keys(m.reactions).length) message.reactions = m.reactions;
  return message;
}

/**
 * A change of a room as it goes on the wire: its seq, its frame serialized once for every recipient (a new message,
 * or an `updated` frame), the message's state after it, and (once asked) the sizes. `own`: the requester's copy, with
 * its ref, sent instead of the broadcast to that socket. `committedAt`: when this node's store committed it (chat_delivery_seconds).
 */
export type Entry = { seq: number; frame: string; state: Message; stateFrame?: string; bytes?: number; own?: { ws: ChatSocket; frame: string }; committedAt?: number };
const entryOf = (m: Message): Entry => {
  const frame = JSON.stringify(m);
  return { seq: m.seq, frame, state: m, stateFrame: frame };
};
const updatedEntry = (m: Message): Entry => ({ seq: m.seq, frame: JSON.stringify({ type: "updated", room: m.room, seq: m.seq, message: m } satisfies ServerMessage), state: m });
/** An entry from a frame another node published (a message or an updated frame). */
function entryOfFrame(frame: string): Entry | undefined {
  const parsed = JSON.parse(frame) as ServerMessage;
  if (parsed.type === "message") return { seq: parsed.seq, frame, state: parsed, stateFrame: frame };
  if (parsed.type === "updated") return { seq: parsed.seq, frame, state: parsed.message };
}
/** A stored message as a change: a message never changed is the message frame itself, a changed one an updated frame. */
const entryOfStored = (m: Message): Entry => (m.seq === m.id ? entryOf(m) : updatedEntry(m));
const stateFrameOf = (e: Entry) => (e.stateFrame ??= JSON.stringify(e.state));
const bytesOf = (e: Entry) => (e.bytes ??= Buffer.byteLength(stateFrameOf(e)));

/** A history frame and its size in bytes, what the history budget is charged. */
type Page = { frame: string; bytes: number };

/** The history frame from message states already serialized (Room.history and Room.page choose which). */
function historyFrame(room: string, seq: number, messages: Entry[], updates: Entry[], flags: { complete: boolean; more: boolean }): Page {
  const list = (entries: Entry[]) => entries.map(stateFrameOf).join(",");
  const frame = `{"type":"history","room":${JSON.stringify(room)},"seq":${seq},"messages":[${list(messages)}],"updates":[${list(updates)}],"complete":${flags.complete},"more":${flags.more}}`;
  return { frame, bytes: Buffer.byteLength(frame) };
}
const HISTORY_OVERHEAD = 128; // the history frame's bytes around its messages (a 32-character room name included)

/** Sends a frame to one socket; a send that met backpressure marks the socket (see the close handler). */
function sendFrame(ws: ChatSocket, frame: string) {
  if (ws.send(frame) <= 0) ws.data.pressured = true;
}

function send(ws: ChatSocket, msg: ServerMessage) {
  sendFrame(ws, JSON.stringify(msg));
}

function sendError(ws: ChatSocket, code: ErrorCode, message: string, extra: ErrorExtra = {}) {
  send(ws, { type: "error", code, message, ...extra });
}

/** Describes the first zod issue as `path: message`; `what` names the whole input when it is not even an object. */
function firstIssue(error: z.ZodError, what = "frame must be a JSON object with a type"): string {
  const issue = error.issues[0];
  if (issue.path.length === 0 && issue.code === "invalid_type") return what;
  const path = issue.path.join(".");
  return path ? `${path}: ${issue.message}` : issue.message;
}

type Parsed<T> = { ok: true; value: T } | { ok: false; error: string; ref?: string };

/**
 * The hot frame checked by hand with exactly ClientMessage's rules (a test compares the two on
 * generated frames); anything it does not accept goes to zod, which also words the error.
 */
function quickSay(v: any): Frame<"say"> | undefined {
  if (typeof v !== "object" || v === null || v.type !== "say") return;
  for (const key in v) if (key !== "type" && key !== "room" && key !== "text" && key !== "ref" && key !== "replyTo") return;
  const { room, text, ref, replyTo } = v;
  if (typeof room !== "string" || !ROOM.test(room)) return;
  if (typeof text !== "string" || text.length === 0 || textProblem(text)) return;
  if (replyTo !== undefined && !(Number.isSafeInteger(replyTo) && replyTo >= 0)) return;
  if (ref !== undefined && (typeof ref !== "string" || refProblem(ref))) return;
  const say: Frame<"say"> = { type: "say", room, text };
  if (ref !== undefined) say.ref = ref;
  if (replyTo !== undefined) say.replyTo = replyTo;
  return say;
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
  return { ok: false, error: firstIssue(result.error), ref: safeRef };
}

/** A change to who may do what: the node that makes it applies it, and tells every other node. */
export const AccessEvent = z.discriminatedUnion("what", [
  // sessions revoked (handles) or every session of the user (null): their sockets close with `code`
  z.strictObject({ what: z.literal("close"), user: z.string(), handles: z.array(z.string()).nullable(), code: z.union([z.literal(4001), z.literal(4003)]) }),
  z.strictObject({ what: z.literal("account"), user: z.string(), registered: z.boolean(), admin: z.boolean() }),
  // the user read a room up to seq on another node: every socket of the user on this node is told
  z.strictObject({ what: z.literal("read"), user: z.string(), room: RoomName, seq: MessageId }),
  // a room's rules changed: every node re-reads them; then a user is out of it, or invited, and the room is told
  z.strictObject({
    what: z.literal("room"),
    room: RoomName,
    by: User,
    removed: z.strictObject({ user: z.string(), reason: z.enum(["kicked", "banned", "left"]) }).optional(),
    invited: z.string().optional(),
    closed: z.literal(true).optional(), // an admin closed it: every socket in it is removed
    moderation: z.strictObject({
      action: z.enum(["kick", "ban", "unban", "mute", "unmute", "promote", "demote"]),
      user: User,
      until: z.number().int().optional(),
    }).optional(),
  }),
]);
export type AccessEvent = z.infer<typeof AccessEvent>;

/** What nodes tell each other on Redis: a JSON header, and for message and typing the client frame after a newline. */
export const FanoutHeader = z.discriminatedUnion("kind", [
  z.strictObject({ kind: z.literal("message"), id: MessageId, sentAt: z.number() }),
  z.strictObject({ kind: z.literal("typing"), node: z.string() }),
  // published by PRESENCE_LUA, with cjson
  z.strictObject({ kind: z.literal("presence"), change: z.enum(["joined", "left"]), user: User }),
  z.strictObject({ kind: z.literal("renamed"), node: z.string(), user: User, previous: z.string() }),
  z.strictObject({ kind: z.literal("access"), node: z.string(), event: AccessEvent }),
]);
export type FanoutHeader = z.infer<typeof FanoutHeader>;
export type FanoutPayload = FanoutHeader & { frame: string };

/** The one encoder and decoder of fan-out payloads (JSON never holds a raw newline, so the first one ends the header). */
export const FanoutCodec = {
  encode(header: FanoutHeader, frame = ""): string {
    return `${JSON.stringify(header)}\n${frame}`;
  },
  /** The payload, or undefined when it is not one of ours. */
  decode(payload: string): FanoutPayload | undefined {
    const nl = payload.indexOf("\n");
    let json: unknown;
    try {
      json = JSON.parse(nl < 0 ? payload : payload.slice(0, nl));
    } catch {
      return;
    }
    const header = FanoutHeader.safeParse(json);
    return header.success ? { ...header.data, frame: nl < 0 ? "" : payload.slice(nl + 1) } : undefined;
  },
};

// ── Rate limits: one token bucket for every limit ────────────────────────────

/** `rate.count` tokens refilled evenly over `rate.perMs`. A cost above `rate.count` costs a full bucket, so anything passes one. */
export class TokenBucket {
  private tokens: number;
  constructor(private readonly rate: Rate, public lastUsed = performance.now()) {
    this.tokens = rate.count;
  }
  /** The ms until `cost` tokens are there: 0 when they are now. Takes nothing. */
  wait(cost = 1, now = performance.now()): number {
    const { count, perMs } = this.rate;
    this.tokens = Math.min(count, this.tokens + ((now - this.lastUsed) * count) / perMs);
    this.lastUsed = now;
    const need = Math.min(cost, count);
    return this.tokens >= need ? 0 : Math.ceil(((need - this.tokens) * perMs) / count);
  }
  /** Takes `cost` tokens: 0, or the ms until they are there (and nothing is taken). */
  take(now = performance.now(), cost = 1): number {
    const wait = this.wait(cost, now);
    if (!wait) this.tokens -= Math.min(cost, this.rate.count);
    return wait;
  }
}

/** Takes `cost` from every bucket, or from none: 0, or the ms until all of them can pay. */
function takeAll(buckets: TokenBucket[], cost: number): number {
  const now = performance.now();
  const wait = Math.max(...buckets.map((b) => b.wait(cost, now)));
  if (!wait) for (const bucket of buckets) bucket.take(now, cost);
  return wait;
}

/** A token bucket per key (a user id), made full on first use and forgotten when idle. */
export class RateLimiter {
  private readonly buckets = new Map<string, TokenBucket>();
  constructor(private readonly rate: Rate) {}
  take(key: string, cost = 1): number {
    return this.bucket(key).take(performance.now(), cost);
  }
  bucket(key: string): TokenBucket {
    let bucket = this.buckets.get(key);
    if (!bucket) this.buckets.set(key, (bucket = new TokenBucket(this.rate)));
    return bucket;
  }
  /** Past `kept` buckets, forgets those unused since `before` whose key `keep` does not hold on to. */
  prune(before: number, keep: (key: string) => boolean, kept = BUCKETS_KEPT) {
    if (this.buckets.size <= kept) return;
    for (const [key, bucket] of this.buckets) if (bucket.lastUsed < before && !keep(key)) this.buckets.delete(key);
  }
  get size() {
    return this.buckets.size;
  }
}

/** Typing frames pass at most once per TYPING_EVERY_MS per user and room; the others are dropped quietly. */
export class TypingThrottle {
  private readonly seen = new Map<string, number>();
  allow(userId: string, room: string, now = performance.now()): boolean {
    const key = `${userId}\n${room}`;
    if (now - (this.seen.get(key) ?? -Infinity) < TYPING_EVERY_MS) return false;
    this.seen.set(key, now);
    return true;
  }
  prune(before: number) {
    for (const [key, at] of this.seen) if (at < before) this.seen.delete(key);
  }
  get size() {
    return this.seen.size;
  }
}

// ── Client addresses: who is asking, as the per-address limits count them ───

type Ip = { v6: boolean; n: bigint };
export type Cidr = Ip & { bits: number };

function parseIpv4(text: string): bigint | undefined {
  const parts = text.split(".");
  if (parts.length !== 4 || parts.some((p) => !/^\d{1,3}$/.test(p) || Number(p) > 255)) return;
  return parts.reduce((n, p) => (n << 8n) | BigInt(p), 0n);
}

/** An IPv4 or IPv6 address; an IPv4-mapped IPv6 address is its IPv4 address. */
function parseIp(text: string): Ip | undefined {
  const s = text.trim().replace(/^\[(.*)\]$/, "$1").replace(/%.*$/, "");
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(s);
  if (!s.includes(":") || mapped) {
    const n = parseIpv4(mapped ? mapped[1] : s);
    return n === undefined ? undefined : { v6: false, n };
  }
  const halves = s.split("::");
  if (halves.length > 2) return;
  const head = halves[0] ? halves[0].split(":") : [];
  const tail = halves.length === 2 && halves[1] ? halves[1].split(":") : [];
  const zeros = 8 - head.length - tail.length;
  if (halves.length === 1 ? zeros !== 0 : zeros < 1) return;
  const groups = [...head, ...Array<string>(halves.length === 2 ? zeros : 0).fill("0"), ...tail];
  if (groups.some((g) => !/^[0-9a-f]{1,4}$/i.test(g))) return;
  return { v6: true, n: groups.reduce((n, g) => (n << 16n) | BigInt(parseInt(g, 16)), 0n) };
}

/** `10.0.0.0/8`, `fd00::/8`, or one address. */
function parseCidr(text: string): Cidr | undefined {
  const [address, bits, extra] = text.split("/");
  const ip = parseIp(address);
  if (!ip || extra !== undefined || (bits !== undefined && !/^\d{1,3}$/.test(bits))) return;
  const size = bits === undefined ? (ip.v6 ? 128 : 32) : Number(bits);
  return size <= (ip.v6 ? 128 : 32) ? { ...ip, bits: size } : undefined;
}

function inCidr(ip: Ip, cidr: Cidr): boolean {
  if (ip.v6 !== cidr.v6) return false;
  const shift = BigInt((ip.v6 ? 128 : 32) - cidr.bits);
  return ip.n >> shift === cidr.n >> shift;
}

/** The key limits count by: an IPv4 address, or an IPv6 /64 (one host commonly holds a whole /64). */
function addressKey(ip: Ip): string {
  if (ip.v6) return `${(ip.n >> 64n).toString(16).padStart(16, "0").replace(/(.{4})(?!$)/g, "$1:")}::/64`;
  return [24n, 16n, 8n, 0n].map((shift) => (ip.n >> shift) & 255n).join(".");
}

/**
 * The client of a request: its peer, or, only when the peer is a trusted proxy, the last hop of
 * X-Forwarded-For that is not one (hops further left are whatever the client chose to send).
 */
export function clientAddress(peer: string, forwardedFor: string | undefined, trusted: Cidr[]): string {
  let ip = parseIp(peer);
  if (!ip) return peer;
  const hops = trusted.length && forwardedFor ? forwardedFor.split(",") : [];
  while (hops.length && trusted.some((cidr) => inCidr(ip!, cidr))) {
    const hop = parseIp(hops.pop()!);
    if (!hop) break;
    ip = hop;
  }
  return addressKey(ip);
}

// ── Store: every SQL statement, behind one interface with two engines ───────

/** A browser's session and its user. Accounts (users with a password) and admins are kept apart from guests. */
export type Session = { sid: string; handle: string; id: string; name: string; registered: boolean; admin: boolean; used: boolean; seen: number };
/** What the janitor may delete: see Store.pruneSessions. */
export type PruneRules = { unusedBefore: number; keepUnused: number; guestsSeenBefore: number; keep: number };
export type NewMessage = { room: string; user: User; text: string; ts: number; ref?: string; replyTo?: number; mentions?: string[] };
/** A change of a stored message (an edit, a deletion, a reaction), by `user`; it takes the room's next seq. */
export type Change =
  | { kind: "edit"; room: string; id: number; user: string; text: string; mentions: string[] }
  | { kind: "delete"; room: string; id: number; user: string; moderator: boolean }
  | { kind: "react"; room: string; id: number; user: string; emoji: string; on: boolean };
/** A write of the say queue, and what became of it: the new message's id, the change's outcome, or the error that
 * kept it from being stored. */
export type Write = (NewMessage & { kind: "say" }) | Change;
export type Written = number | Changed | Error;
const asError = (error: unknown): Error => (error instanceof Error ? error : new Error(String(error)));
/** The message's state after a change (`changed: false`: the change changed nothing and took no seq), or a refusal. */
export type Changed = { ok: true; message: Message; changed: boolean } | { ok: false; code: "not_found" | "forbidden" | "limit_exceeded"; message: string };
const MAX_REACTIONS = 20; // distinct emoji on one message

/** What a change makes of a message: its new state, or why not. The same rules on both engines. */
function applyChange(m: Message, c: Change, seq: number, now: number): Changed {
  if (m.deleted) return c.kind === "delete" ? { ok: true, message: m, changed: false } : { ok: false, code: "not_found", message: `Message ${c.id} was deleted` };
  if (c.kind === "edit") {
    if (m.user.id !== c.user) return { ok: false, code: "forbidden", message: "Only its author may edit a message" };
    if (m.text === c.text) return { ok: true, message: m, changed: false };
    return { ok: true, changed: true, message: { ...m, seq, text: c.text, editedAt: now, ...(c.mentions.length ? { mentions: c.mentions } : { mentions: undefined }) } };
  }
  if (c.kind === "delete") {
    if (m.user.id !== c.user && !c.moderator) return { ok: false, code: "forbidden", message: "Only its author or the room's moderators may delete a message" };
    return { ok: true, changed: true, message: messageOf({ room: m.room, id: m.id, seq, user: m.user, text: "", ts: m.ts, ref: m.ref, deleted: true }) };
  }
  const reactions = Object.fromEntries(Object.entries(m.reactions ?? {}).map(([e, users]) => [e, [...users]]));
  const users = reactions[c.emoji] ?? [];
  if (c.on === users.includes(c.user)) return { ok: true, message: m, changed: false }; // idempotent
  if (c.on && !users.length && Object.keys(reactions).length >= MAX_REACTIONS) {
    return { ok: false, code: "limit_exceeded", message: `At most ${MAX_REACTIONS} different emoji on a message` };
  }
  if (c.on) reactions[c.emoji] = [...users, c.user];
  else if (users.length > 1) reactions[c.emoji] = users.filter((u) => u !== c.user);
  else delete reactions[c.emoji];
  return { ok: true, changed: true, message: messageOf({ ...m, seq, reactions }) };
}

export interface Store {
  /** Accounts, sessions by handle and login failures: the same SQL on both engines. */
  readonly accounts: Accounts;
  /** Rooms' rules: members, roles, bans, mutes and the audit log; the same SQL on both engines. */
  readonly access: RoomAccess;
  /** Each user's rooms, read positions and mentions; the same SQL on both engines. */
  readonly reading: Reading;
  /** Makes a room with an owner (and, for a dm, its two members): false when the name exists. */
  createRoom(room: string, visibility: Visibility, owner: string | null, members: string[]): Promise<boolean>;
  /** The cookie-signing secret shared by every process: `fresh`, unless one is stored already. */
  secret(fresh: string): Promise<string>;
  findSession(sid: string): Promise<Session | undefined>;
  /** A new guest and its first session; `name(attempt)` proposes default names until one is free. */
  createGuest(sid: string, name: (attempt: number) => string): Promise<Session>;
  /** These sessions connected at `now`: they are kept, and their users seen. */
  touchSessions(sids: string[], now: number): Promise<void>;
  /** Renames a user: the previous name, or undefined when another user holds the name (see nameKey). */
  rename(userId: string, name: string): Promise<string | undefined>;
  /** Deletes, in bounded batches: sessions that never connected created before `unusedBefore`, then the oldest
   * past `keepUnused`; guest sessions not seen since `guestsSeenBefore`; the least recently seen guest sessions
   * past `keep` in all; and guests left without a session. Returns the sessions deleted. */
  pruneSessions(rules: PruneRules): Promise<number>;
  countSessions(): Promise<number>;
  countUsers(): Promise<number>;
  /** A small write, for /healthz: throws when the store cannot write. */
  probe(): Promise<void>;
  /** One message in its current state. */
  message(room: string, id: number): Promise<Message | undefined>;
  /** Applies a change to a stored message, taking the room's next seq when it changes anything. */
  change(c: Change): Promise<Changed>;
  /** Stores a batch atomically and returns the ids: gap-free per room, committed in id order. */
  append(batch: NewMessage[]): Promise<number[]>;
  /** New messages and changes in arrival order, each taking its room's next seq. SQLite: all in one transaction (or
   * none); Postgres: each run of new messages, and each change, on its own. */
  write(items: Write[]): Promise<Written[]>;
  /** The newest `limit` messages of a room, oldest first. */
  tail(room: string, limit: number): Promise<Message[]>;
  /** Messages with after < id < before, oldest first (at most GAP_READ_LIMIT). */
  between(room: string, after: number, before: number): Promise<Message[]>;
  /** Scrollback: up to `limit` messages before an id, oldest first. */
  before(room: string, before: number, limit: number): Promise<Message[]>;
  /** The newest `limit` messages with id < before whose current text has every word (the last one as a prefix),
   * newest first. The index follows every insert, update of text and delete of messages by itself (see searchSchema). */
  search(room: string, words: string[], before: number, limit: number): Promise<Message[]>;
  /** The last id a room handed out (0 for a new room: its first id is then past the ids of any room dropped before). */
  lastId(room: string): Promise<number>;
  /** The rooms with the highest last ids (at most ROOM_LIST_LIMIT), without scanning the others. */
  rooms(limit: number): Promise<{ name: string; lastId: number }[]>;
  /** Rows in `rooms`: each room that has stored a message and was not dropped. */
  countRooms(): Promise<number>;
  hasRoom(room: string): Promise<boolean>;
  /** Deletes up to `limit` of the oldest messages older than `before`: how many, and the rooms left without any. */
  expire(before: number, limit: number): Promise<{ deleted: number; emptied: string[] }>;
  /** Drops a room's row if it holds no messages; its last id raises the floor that new rooms' ids start above. */
  dropRoom(room: string): Promise<boolean>;
  close(): Promise<void>;
}

/** Opens the database a URL names: sqlite://<file>, :memory:, or postgres://… */
export async function openStore(url: string, options: StoreOptions = {}): Promise<Store> {
  if (/^postgres(ql)?:\/\//.test(url)) return PostgresStore.open(url, options);
  if (url === ":memory:") return new SqliteStore(":memory:", options);
  if (url.startsWith("sqlite://") && url.length > "sqlite://".length) return new SqliteStore(url.slice("sqlite://".length), options);
  throw new Error(`Cannot open DATABASE_URL=${url}: expected sqlite://<file>, :memory: or postgres://…`);
}

/** The schema's version, in meta: a database made by an older version is migrated when opened (see migrateSessions). */
const SCHEMA_VERSION = 3;
/** retention: messages get an index on ts, so expiring them is bounded (it costs every insert a second b-tree write) */
export type StoreOptions = { retention?: boolean };

/** The tables, the same on both engines but for SQLite's WITHOUT ROWID messages (one b-tree write a message). */
function schema(engine: "sqlite" | "postgres", { retention = false }: StoreOptions): string[] {
  return [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    // password: an argon2id hash for accounts, NULL for guests
    `CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, name TEXT NOT NULL, name_key TEXT NOT NULL UNIQUE, password TEXT,
      admin INTEGER NOT NULL DEFAULT 0, banned INTEGER NOT NULL DEFAULT 0, created BIGINT NOT NULL, seen BIGINT NOT NULL)`,
    // sid_hash: SHA-256 of the sid, so the table cannot be used to sign in; handle: the session's public name
    `CREATE TABLE IF NOT EXISTS sessions (sid_hash TEXT PRIMARY KEY, handle TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
      created BIGINT NOT NULL, seen BIGINT NOT NULL, used INTEGER NOT NULL DEFAULT 0)`,
    "CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id)",
    "CREATE INDEX IF NOT EXISTS sessions_by_use ON sessions (used, created)",
    "CREATE INDEX IF NOT EXISTS sessions_by_seen ON sessions (seen)",
    // key: name:<nameKey> or addr:<client address>; rows older than LOGIN_WINDOW_MS are pruned
    "CREATE TABLE IF NOT EXISTS login_failures (key TEXT NOT NULL, at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS login_failures_by_key ON login_failures (key, at)",
    // the room's last id, written with each append (on Postgres it is the id counter); it outlives expired messages
    // visibility: public, private or dm; owner: who made it with POST /api/rooms (NULL for rooms made by a join)
    // closed: 1 when an admin closed it (nobody but admins may join)
    `CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, last_id BIGINT NOT NULL, visibility TEXT NOT NULL DEFAULT 'public',
      owner TEXT, closed INTEGER NOT NULL DEFAULT 0)`,
    "CREATE INDEX IF NOT EXISTS rooms_active ON rooms (last_id DESC)",
    // role: moderator or member (the owner is rooms.owner); a private or dm room's members are its rows
    "CREATE TABLE IF NOT EXISTS members (room TEXT NOT NULL, user_id TEXT NOT NULL, role TEXT NOT NULL, PRIMARY KEY (room, user_id))",
    "CREATE INDEX IF NOT EXISTS members_by_user ON members (user_id)",
    // until: ms since the epoch; a ban without one lasts until lifted
    "CREATE TABLE IF NOT EXISTS bans (room TEXT NOT NULL, user_id TEXT NOT NULL, until BIGINT, PRIMARY KEY (room, user_id))",
    "CREATE TABLE IF NOT EXISTS mutes (room TEXT NOT NULL, user_id TEXT NOT NULL, until BIGINT NOT NULL, PRIMARY KEY (room, user_id))",
    // append-only: nothing updates or deletes a row (names as they were then)
    `CREATE TABLE IF NOT EXISTS audit (room TEXT NOT NULL, at BIGINT NOT NULL, action TEXT NOT NULL, user_id TEXT NOT NULL,
      user_name TEXT NOT NULL, by_id TEXT NOT NULL, by_name TEXT NOT NULL, until BIGINT)`,
    "CREATE INDEX IF NOT EXISTS audit_by_room ON audit (room, at)",
    // seq: the room's sequence number of the message's latest change (a new message's is its id)
    `CREATE TABLE IF NOT EXISTS messages (room TEXT NOT NULL, id BIGINT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL,
      text TEXT NOT NULL, ts BIGINT NOT NULL, ref TEXT, ${MESSAGE_COLUMNS_V3.join(", ")},
      PRIMARY KEY (room, id))${engine === "sqlite" ? " WITHOUT ROWID" : ""}`,
    // only changed messages (seq <> id) need an index by seq: a new one is found by its id, and inserting it writes
    // one b-tree, not two (a full (room, seq) index cost the flood bench a quarter of its throughput)
    "DROP INDEX IF EXISTS messages_by_seq",
    "CREATE INDEX IF NOT EXISTS messages_changed ON messages (room, seq) WHERE seq <> id",
    ...(retention ? ["CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts)"] : []),
    // seq: the room's sequence number the user has read up to (kept at its highest)
    "CREATE TABLE IF NOT EXISTS read_state (user_id TEXT NOT NULL, room TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (user_id, room))",
    // a user's rooms: joined and not left with a leave frame, so every device lists the same rooms
    "CREATE TABLE IF NOT EXISTS user_rooms (user_id TEXT NOT NULL, room TEXT NOT NULL, joined BIGINT NOT NULL, PRIMARY KEY (user_id, room))",
    ...searchSchema(engine),
  ];
}

/**
 * The search index. Postgres: a GIN index of to_tsvector('simple', text). SQLite: messages is WITHOUT ROWID, so an
 * FTS5 table cannot point at its rows: message_docs numbers each message (doc), and a contentless FTS5 table holds
 * each doc's words (text; scope, one token naming the room, so a search reads only its room's matches). Triggers
 * keep both in step with every insert, change of text (an edit; a deletion's '' matches nothing) and delete
 * (retention), so no other code has to remember them. Docs are numbered in id order within a room.
 */
function searchSchema(engine: "sqlite" | "postgres"): string[] {
  if (engine === "postgres") return ["CREATE INDEX IF NOT EXISTS messages_fts ON messages USING gin (to_tsvector('simple', text))"];
  const doc = "(SELECT doc FROM message_docs WHERE room = old.room AND id = old.id)";
  return [
    "CREATE TABLE IF NOT EXISTS message_docs (doc INTEGER PRIMARY KEY, room TEXT NOT NULL, id BIGINT NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS message_docs_key ON message_docs (room, id)",
    // unicode61: case folded, diacritics removed; a run of CJK characters is one word
    `CREATE VIRTUAL TABLE IF NOT EXISTS message_words USING fts5(text, scope, content = '', contentless_delete = 1,
      tokenize = 'unicode61 remove_diacritics 2')`,
    // new messages are indexed in batches (SqliteStore.indexNew): an FTS5 write per commit would cost 2.5× the insert
    "DROP TRIGGER IF EXISTS messages_search_insert",
    // a contentless-delete table updates whole rows only; only a new text (UPDATE OF fires on every change, as every
    // change sets text: a reaction rewrote the message's words). Dropped first: older databases have it without WHEN.
    "DROP TRIGGER IF EXISTS messages_search_update",
    `CREATE TRIGGER messages_search_update AFTER UPDATE OF text ON messages WHEN old.text IS NOT new.text BEGIN
      UPDATE message_words SET text = new.text, scope = ${SEARCH_SCOPE_SQL("new.room")} WHERE rowid = ${doc};
    END`,
    `CREATE TRIGGER IF NOT EXISTS messages_search_delete AFTER DELETE ON messages BEGIN
      DELETE FROM message_words WHERE rowid = ${doc};
      DELETE FROM message_docs WHERE room = old.room AND id = old.id;
    END`,
  ];
}
/** A room's scope token: 'r' and the hex of its name's UTF-8, one unicode61 token whatever the name (searchScope in JS). */
const SEARCH_SCOPE_SQL = (room: string) => `'r' || lower(hex(${room}))`;
const searchScope = (room: string) => `r${Buffer.from(room).toString("hex")}`;
/** The FTS5 query: the room's scope and every word as a quoted string (never FTS5 syntax), the last one a prefix. */
const ftsQuery = (room: string, words: string[]) =>
  `scope : "${searchScope(room)}" AND text : (${words.map((w) => `"${w.replaceAll('"', '""')}"`).join(" ")}*)`;
/** The to_tsquery text: the words (only letters, digits and marks: see searchWords) joined by &, the last a prefix. */
const tsQuery = (words: string[]) => words.map((w) => `'${w.replaceAll("'", "''")}'`).join(" & ") + ":*";
/** Newest doc first, below the doc of the room's first message at or after `before` (docs are in id order in a room). */
const SQLITE_SEARCH = `SELECT m.* FROM message_words w JOIN message_docs d ON d.doc = w.rowid JOIN messages m ON m.room = d.room AND m.id = d.id
  WHERE message_words MATCH ?1 AND w.rowid < coalesce((SELECT doc FROM message_docs WHERE room = ?2 AND id >= ?3 ORDER BY id LIMIT 1), 9223372036854775807)
  ORDER BY w.rowid DESC LIMIT ?4`;

/** The oldest messages before a time (1st parameter), at most the 2nd parameter of them, deleted; the rooms they were in. */
const expireSql = (p: "?" | "$") => `DELETE FROM messages WHERE (room, id) IN (SELECT room, id FROM messages WHERE ts < ${p}1 ORDER BY ts LIMIT ${p}2) RETURNING room, id`;

/** The `size` keys with the highest scores, kept as scores change, in O(1) but when the lowest changes (O(size)).
 * Exact while scores only grow (last ids); when one falls, a key outside may outrank it until that key is offered. */
export class Leaders {
  private readonly scores = new Map<string, number>();
  private lowest: string | undefined;
  constructor(private readonly size: number) {}

  offer(key: string, score: number) {
    if (!this.scores.has(key) && this.scores.size >= this.size) {
      if (score <= this.scores.get(this.lowest!)!) return;
      this.scores.delete(this.lowest!);
      this.lowest = undefined;
    }
    this.scores.set(key, score);
    if (this.lowest === undefined || key === this.lowest || score < this.scores.get(this.lowest)!) this.findLowest();
  }

  remove(key: string) {
    if (this.scores.delete(key) && key === this.lowest) this.findLowest();
  }

  private findLowest() {
    this.lowest = undefined;
    for (const [key, score] of this.scores) if (this.lowest === undefined || score < this.scores.get(this.lowest)!) this.lowest = key;
  }

  /** Highest first. */
  top(): [key: string, score: number][] {
    return [...this.scores].sort((a, b) => b[1] - a[1]);
  }
}

/** A new messages row as stored (its seq is its id; the other columns of schema 3 start empty). */
type Row = { room: string; id: number; seq: number; user_id: string; name: string; text: string; ts: number; ref: string | null; reply_to: number | null; mentions: string | null };
const rowOf = (m: NewMessage, id: number): Row => ({
  room: m.room, id, seq: id, user_id: m.user.id, name: m.user.name, text: m.text, ts: m.ts, ref: m.ref ?? null,
  reply_to: m.replyTo ?? null, mentions: m.mentions?.length ? JSON.stringify(m.mentions) : null,
});
// Postgres returns BIGINT and count(*) as strings: Number() on every such column
const messageOfRow = (r: any): Message =>
  messageOf({
    room: r.room, id: Number(r.id), seq: Number(r.seq ?? r.id), user: { id: r.user_id, name: r.name }, text: r.text, ts: Number(r.ts), ref: r.ref,
    replyTo: r.reply_to == null ? null : Number(r.reply_to), mentions: r.mentions ? JSON.parse(r.mentions) : null,
    editedAt: r.edited_at == null ? null : Number(r.edited_at), deleted: Number(r.deleted) === 1, reactions: r.reactions ? JSON.parse(r.reactions) : null,
  });
/** The newest `limit` changes of a room, oldest first, from its newest messages and its newest changed ones. */
function newestChanges(lists: any[][], limit: number): Message[] {
  const byId = new Map(lists.flat().map((r) => [Number(r.id), messageOfRow(r)]));
  return [...byId.values()].sort((a, b) => a.seq - b.seq).slice(-limit);
}
/** Changes in a seq range, from new messages (seq = id) and changed ones (seq <> id), in seq order. */
function changesBetween(lists: any[][]): Message[] {
  return lists.flat().map(messageOfRow).sort((a, b) => a.seq - b.seq).slice(0, GAP_READ_LIMIT);
}

/** The columns a change writes, from the message's new state. */
const changedColumns = (m: Message) => [
  m.text, m.mentions ? JSON.stringify(m.mentions) : null, m.editedAt ?? null, m.deleted ? 1 : 0,
  m.reactions ? JSON.stringify(m.reactions) : null, m.replyTo ?? null, m.seq,
] as const;
/** A statement written for both engines ($1…) as SQLite numbers its parameters (?1…); each text rewritten once. */
const sqliteTexts = new Map<string, string>();
function sqliteParams(sql: string): string {
  let text = sqliteTexts.get(sql);
  if (text === undefined) sqliteTexts.set(sql, (text = sql.replace(/\$(\d+)/g, "?$1")));
  return text;
}
const CHANGE_SQL = "UPDATE messages SET text = $1, mentions = $2, edited_at = $3, deleted = $4, reactions = $5, reply_to = $6, seq = $7 WHERE room = $8 AND id = $9";
/** Schema 2 → 3: messages take changes (each with the room's next seq) and remember their state. */
const MESSAGE_COLUMNS_V3 = ["seq BIGINT", "reply_to BIGINT", "mentions TEXT", "edited_at BIGINT", "deleted INTEGER NOT NULL DEFAULT 0", "reactions TEXT"];
const sessionOfRow = (sid: string, r: any): Session => ({
  sid, handle: r.handle, id: r.user_id, name: r.name, registered: r.password != null, admin: Number(r.admin) === 1, used: Number(r.used) === 1, seen: Number(r.seen),
});
const SESSION_COLUMNS = "s.handle, s.user_id, s.used, s.seen, u.name, u.password, u.admin";
const sidHash = (sid: string) => createHash("sha256").update(sid).digest("base64url");
const PROBE_SQL = "INSERT INTO meta (key, value) VALUES ('probe', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value";
const isUniqueViolation = (error: unknown) => /unique|duplicate/i.test(String((error as Error)?.message));

/** A version-1 session row: user and session were one row, keyed by the sid itself. */
type SessionRowV1 = { sid: string; user_id: string; name: string; created: number; used: number };
/**
 * Schema 1 → 2: each v1 row becomes a guest user and its session (sid hashed). Names are keyed again by today's
 * nameKey (look-alikes collide now); a name that collides with an earlier one gets a suffix: `-2`, `-3`…
 */
function migrateSessions(rows: SessionRowV1[]) {
  const keys = new Set<string>();
  const users = [];
  const sessions = [];
  const renamed: string[] = [];
  for (const r of rows) {
    let name = r.name;
    for (let n = 2; keys.has(nameKey(name)); n++) name = `${r.name.slice(0, 28)}-${n}`;
    if (name !== r.name) renamed.push(r.user_id);
    keys.add(nameKey(name));
    const created = Number(r.created);
    users.push({ id: r.user_id, name, name_key: nameKey(name), created, seen: created });
    sessions.push({ sid_hash: sidHash(r.sid), handle: randomId(HANDLE_BYTES), user_id: r.user_id, created, seen: created, used: Number(r.used) });
  }
  return { users, sessions, renamed };
}

/** Messages stored but not yet indexed for search, as a range of ids per room (a room's new ids are consecutive):
 * a flood's backlog costs a few numbers per room, not an array per message for the collector to trace. */
class Unindexed {
  private readonly ranges = new Map<string, [first: number, last: number]>();
  size = 0;

  add(room: string, id: number) {
    const range = this.ranges.get(room);
    if (!range) {
      this.ranges.set(room, [id, id]);
      this.size++;
    } else if (id > range[1]) {
      this.size += id - range[1]; // a gap (never, from the one writer) is taken too, and skipped: no such message
      range[1] = id;
    }
  }

  /** Up to `count` of them, each room's in id order (search relies on docs in id order within a room). */
  take(count: number): [room: string, id: number][] {
    const rows: [string, number][] = [];
    for (const [room, range] of this.ranges) {
      while (rows.length < count && range[0] <= range[1]) rows.push([room, range[0]++]);
      if (range[0] > range[1]) this.ranges.delete(room);
      if (rows.length === count) break;
    }
    this.size -= rows.length;
    return rows;
  }

  /** Rows taken but not indexed (the transaction failed): waiting again, before what came since. */
  putBack(rows: [string, number][]) {
    for (const [room, id] of rows) {
      const range = this.ranges.get(room);
      if (!range) this.ranges.set(room, [id, id]);
      else [range[0], range[1]] = [Math.min(range[0], id), Math.max(range[1], id)];
    }
    this.size += rows.length;
  }
}

/**
 * SQLite through bun:sqlite on one connection, every statement prepared once. This process is the only
 * writer of the file, so it hands out message ids itself; a worker thread checkpoints the WAL.
 */
class SqliteStore implements Store {
  private readonly unindexed = new Unindexed(); // stored, not yet searchable (see indexNew)
  private readonly indexRows: (rows: [string, number][]) => void;
  private readonly indexer: Timer;
  private readonly query: Query = (sql, params = []) => this.retrying(() => this.db.query(sqliteParams(sql)).all(...(params as never[])));
  readonly accounts = new Accounts(this.query);
  readonly access = new RoomAccess(this.query);
  readonly reading = new Reading(this.query);
  private readonly db: Database;
  private readonly checkpointer: Worker | null;
  private readonly insertRow: (row: Row) => void;
  private readonly writeAll: (items: Write[], last: Map<string, number>) => Written[];
  private readonly lastIds = new Map<string, number>(); // the last id handed out per room, of rooms written since start
  private readonly leaders = new Leaders(ROOM_LIST_LIMIT); // this process is the only writer: it sees every new last id
  private roomCount: number;
  // rooms.last_id is written in batches, off the insert (it cost an insert 60%): it only seeds `leaders` at start,
  // ids come from max(last_id, max(id)), and expire() writes it before deleting
  private readonly dirty = new Map<string, number>();
  private readonly writeLastIds: (rooms: [string, number][]) => void;
  private readonly flusher: Timer;

  constructor(file: string, options: StoreOptions) {
    this.db = new Database(file, { create: true });
    this.db.run("PRAGMA journal_mode = WAL");
    // NORMAL in WAL mode survives a process crash (kill -9); only an OS crash or power loss can drop the last commits
    this.db.run("PRAGMA synchronous = NORMAL");
    // never sleep on a lock inside the event loop: a busy statement is retried asynchronously (see retrying)
    this.db.run(`PRAGMA busy_timeout = ${OPEN_BUSY_TIMEOUT_MS}`); // opening may wait: a process still closing the file, or grant-admin
    this.db.run("PRAGMA wal_autocheckpoint = 0"); // the checkpointer thread does it, off the event loop
    this.db.transaction(() => {
      this.migrate(options);
      this.fillLastIds();
      this.fillSearch();
    }).immediate();
    this.db.run("PRAGMA busy_timeout = 0");
    const insert = this.db.prepare("INSERT INTO messages (room, id, seq, user_id, name, text, ts, ref, reply_to, mentions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
    this.insertRow = (r: Row) => void insert.run(r.room, r.id, r.seq, r.user_id, r.name, r.text, r.ts, r.ref, r.reply_to, r.mentions);
    const writeMany = this.db.transaction((items: Write[], last: Map<string, number>) => items.map((w) => this.writeOne(w, last)));
    this.writeAll = (items, last) => (items.length === 1 ? [this.writeOne(items[0], last)] : writeMany(items, last));
    const setLast = this.db.prepare("UPDATE rooms SET last_id = max(last_id, ?) WHERE name = ?");
    this.writeLastIds = this.db.transaction((rooms: [string, number][]) => rooms.forEach(([room, id]) => setLast.run(id, room)));
    this.flusher = setInterval(() => void this.flushLastIds().catch(() => {}), LAST_ID_FLUSH_MS);
    this.flusher.unref();
    // three plain statements: RETURNING, and INSERT INTO an FTS5 table from a SELECT, each go through a temporary
    // table, and cost 2.8× as much per message (10 µs against 3.5 on this machine)
    const currentText = this.db.prepare("SELECT text FROM messages WHERE room = ? AND id = ?");
    const indexDoc = this.db.prepare("INSERT INTO message_docs (room, id) VALUES (?, ?) ON CONFLICT DO NOTHING");
    const indexWords = this.db.prepare("INSERT INTO message_words (rowid, text, scope) VALUES (?, ?, ?)");
    this.indexRows = this.db.transaction((rows: [string, number][]) => {
      for (const [room, id] of rows) {
        const message = currentText.get(room, id) as { text: string } | null;
        if (!message) continue; // expired meanwhile
        const made = indexDoc.run(room, id);
        if (made.changes) indexWords.run(made.lastInsertRowid, message.text, searchScope(room));
      }
    });
    this.indexer = setInterval(() => void this.indexNew().catch(() => {}), SEARCH_INDEX_MS);
    this.indexer.unref();
    const active = this.db.query("SELECT name, last_id FROM rooms ORDER BY last_id DESC LIMIT ?").all(ROOM_LIST_LIMIT) as { name: string; last_id: number }[];
    for (const r of active) this.leaders.offer(r.name, r.last_id);
    this.roomCount = (this.db.query("SELECT count(*) AS n FROM rooms").get() as { n: number }).n; // once, at start
    this.checkpointer = file === ":memory:" ? null : startCheckpointer(file);
  }

  /** Once per database: rooms.last_id was not written by earlier versions on SQLite. */
  private fillLastIds() {
    if (this.db.query("SELECT 1 FROM meta WHERE key = 'rooms_last_id'").get()) return;
    this.db.run("UPDATE rooms SET last_id = coalesce((SELECT max(id) FROM messages WHERE room = rooms.name), 0)");
    this.db.run("INSERT INTO meta (key, value) VALUES ('rooms_last_id', '1')");
  }

  /** Once per database: messages stored before the search index existed are indexed, in (room, id) order. */
  private fillSearch() {
    // messages stored but not indexed when the last process stopped without closing: index them now
    if (this.db.query("SELECT 1 FROM meta WHERE key = 'search_clean' AND value = '0'").get()) {
      const before = (this.db.query("SELECT coalesce(max(doc), 0) AS doc FROM message_docs").get() as { doc: number }).doc;
      this.db.run(`INSERT INTO message_docs (room, id) SELECT room, id FROM messages m
        WHERE NOT EXISTS (SELECT 1 FROM message_docs d WHERE d.room = m.room AND d.id = m.id)`);
      this.db.query(`INSERT INTO message_words (rowid, text, scope) SELECT d.doc, m.text, ${SEARCH_SCOPE_SQL("m.room")}
        FROM message_docs d JOIN messages m ON m.room = d.room AND m.id = d.id WHERE d.doc > ?`).run(before);
    }
    this.db.run("INSERT INTO meta (key, value) VALUES ('search_clean', '0') ON CONFLICT (key) DO UPDATE SET value = '0'");
    if (this.db.query("SELECT 1 FROM meta WHERE key = 'search_filled'").get()) return;
    this.db.run("DELETE FROM message_words");
    this.db.run("DELETE FROM message_docs");
    this.db.run("INSERT INTO message_docs (room, id) SELECT room, id FROM messages ORDER BY room, id");
    this.db.run(`INSERT INTO message_words (rowid, text, scope) SELECT d.doc, m.text, ${SEARCH_SCOPE_SQL("m.room")}
      FROM message_docs d JOIN messages m ON m.room = d.room AND m.id = d.id`);
    this.db.run("INSERT INTO meta (key, value) VALUES ('search_filled', '1')");
  }

  /** Runs a statement, retrying while another connection holds the lock (the checkpointer's WAL rewind, a backup). */
  private async retrying<T>(run: () => T): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      try {
        return run();
      } catch (error) {
        const busy = /SQLITE_BUSY/.test(String((error as { code?: string }).code));
        if (!busy || attempt >= SQLITE_BUSY_ATTEMPTS) throw error;
        await Bun.sleep(1);
      }
    }
  }

  secret(fresh: string) {
    return this.retrying(() => {
      this.db.query("INSERT INTO meta (key, value) VALUES ('session_secret', ?) ON CONFLICT (key) DO NOTHING").run(fresh);
      return (this.db.query("SELECT value FROM meta WHERE key = 'session_secret'").get() as { value: string }).value;
    });
  }

  /** Creates the tables, or brings an older database up to SCHEMA_VERSION. */
  private migrate(options: StoreOptions) {
    this.db.run("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)");
    const version = this.db.query("SELECT value FROM meta WHERE key = 'schema_version'").get() as { value: string } | null;
    const columns = (this.db.query("PRAGMA table_info(sessions)").all() as { name: string }[]).map((c) => c.name);
    let v1: SessionRowV1[] = [];
    if (!version && columns.includes("sid")) {
      v1 = this.db.query("SELECT sid, user_id, name, created, used FROM sessions").all() as SessionRowV1[];
      this.db.run("DROP TABLE sessions");
    }
    const roomColumns = (this.db.query("PRAGMA table_info(rooms)").all() as { name: string }[]).map((c) => c.name);
    if (roomColumns.length && !roomColumns.includes("visibility")) {
      this.db.run("ALTER TABLE rooms ADD COLUMN visibility TEXT NOT NULL DEFAULT 'public'");
      this.db.run("ALTER TABLE rooms ADD COLUMN owner TEXT");
    }
    if (roomColumns.length && !roomColumns.includes("closed")) this.db.run("ALTER TABLE rooms ADD COLUMN closed INTEGER NOT NULL DEFAULT 0");
    const messageColumns = (this.db.query("PRAGMA table_info(messages)").all() as { name: string }[]).map((c) => c.name);
    if (messageColumns.length && !messageColumns.includes("seq")) {
      for (const column of MESSAGE_COLUMNS_V3) this.db.run(`ALTER TABLE messages ADD COLUMN ${column}`);
      this.db.run("UPDATE messages SET seq = id");
    }
    schema("sqlite", options).forEach((ddl) => this.db.run(ddl));
    const { users, sessions } = migrateSessions(v1);
    const user = this.db.prepare("INSERT INTO users (id, name, name_key, created, seen) VALUES (?, ?, ?, ?, ?)");
    for (const u of users) user.run(u.id, u.name, u.name_key, u.created, u.seen);
    const session = this.db.prepare("INSERT INTO sessions (sid_hash, handle, user_id, created, seen, used) VALUES (?, ?, ?, ?, ?, ?)");
    for (const x of sessions) session.run(x.sid_hash, x.handle, x.user_id, x.created, x.seen, x.used);
    this.db.query("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value").run(String(SCHEMA_VERSION));
  }

  /** Two lookups by primary key: as one JOIN, SQLite took 3–4× as long (every upgrade asks). */
  private sessionBySid(sid: string): Session | undefined {
    const session = this.db.query("SELECT handle, user_id, used, seen FROM sessions WHERE sid_hash = ?").get(sidHash(sid)) as Record<string, unknown> | null;
    const user = session && this.db.query("SELECT name, password, admin FROM users WHERE id = ?").get(session.user_id as string);
    return user ? sessionOfRow(sid, { ...session, ...user }) : undefined;
  }

  findSession(sid: string) {
    return this.retrying(() => this.sessionBySid(sid));
  }

  createGuest(sid: string, name: (attempt: number) => string) {
    const create = this.db.transaction((): Session => {
      const id = `u${randomId(USER_ID_BYTES)}`;
      const now = Date.now();
      for (let attempt = 0; ; attempt++) {
        const candidate = name(attempt);
        const made = this.db.query(`INSERT INTO users (id, name, name_key, created, seen) VALUES (?, ?, ?, ?, ?)
          ON CONFLICT DO NOTHING RETURNING id`).get(id, candidate, nameKey(candidate), now, now);
        if (!made) continue;
        const handle = randomId(HANDLE_BYTES);
        this.db.query("INSERT INTO sessions (sid_hash, handle, user_id, created, seen) VALUES (?, ?, ?, ?, ?)").run(sidHash(sid), handle, id, now, now);
        return { sid, handle, id, name: candidate, registered: false, admin: false, used: false, seen: now };
      }
    });
    return this.retrying(create);
  }

  async touchSessions(sids: string[], now: number) {
    const touch = this.db.transaction(() => {
      for (const sid of sids) {
        const row = this.db.query("UPDATE sessions SET used = 1, seen = ? WHERE sid_hash = ? RETURNING user_id").get(now, sidHash(sid)) as { user_id: string } | null;
        if (row) this.db.query("UPDATE users SET seen = ? WHERE id = ?").run(now, row.user_id);
      }
    });
    await this.retrying(touch);
  }

  rename(userId: string, name: string) {
    return this.retrying(() => {
      const old = this.db.query("SELECT name FROM users WHERE id = ?").get(userId) as { name: string } | null;
      if (!old) throw new Error(`Cannot rename: no user ${userId}`);
      try {
        const renamed = this.db.query(`UPDATE users SET name = ?1, name_key = ?2 WHERE id = ?3
          AND NOT EXISTS (SELECT 1 FROM users u2 WHERE u2.name_key = ?2 AND u2.id <> ?3) RETURNING name`).get(name, nameKey(name), userId);
        return renamed ? old.name : undefined;
      } catch (error) {
        if (isUniqueViolation(error)) return undefined;
        throw error;
      }
    });
  }

  async pruneSessions({ unusedBefore, keepUnused, guestsSeenBefore, keep }: PruneRules) {
    const count = (where: string) => (this.db.query(`SELECT count(*) AS n FROM sessions s WHERE ${where}`).get() as { n: number }).n;
    const guest = "s.user_id IN (SELECT id FROM users WHERE password IS NULL)";
    // each pick names at most PRUNE_BATCH rows; between batches other statements run
    const picks: [where: string, order: string, limit: () => number][] = [
      [`s.used = 0 AND s.created < ${Number(unusedBefore)}`, "s.created", () => PRUNE_BATCH],
      ["s.used = 0", "s.created", () => count("s.used = 0") - keepUnused],
      [`s.seen < ${Number(guestsSeenBefore)} AND ${guest}`, "s.seen", () => PRUNE_BATCH],
      [guest, "s.seen", () => count("1 = 1") - keep],
    ];
    let deleted = 0;
    for (const [where, order, limit] of picks) {
      for (;;) {
        const n = await this.retrying(() => Math.min(PRUNE_BATCH, limit()));
        if (n <= 0) break;
        const users = await this.retrying(() => this.db.query(`DELETE FROM sessions WHERE sid_hash IN
          (SELECT s.sid_hash FROM sessions s WHERE ${where} ORDER BY ${order} LIMIT ?) RETURNING user_id`).all(n) as { user_id: string }[]);
        deleted += users.length;
        await this.retrying(() => {
          for (const { user_id } of users) {
            this.db.query("DELETE FROM users WHERE id = ?1 AND password IS NULL AND NOT EXISTS (SELECT 1 FROM sessions WHERE user_id = ?1)").run(user_id);
          }
        });
        if (users.length < n) break;
      }
    }
    return deleted;
  }

  countSessions() {
    return this.retrying(() => (this.db.query("SELECT count(*) AS n FROM sessions").get() as { n: number }).n);
  }

  countUsers() {
    return this.retrying(() => (this.db.query("SELECT count(*) AS n FROM users").get() as { n: number }).n);
  }

  async probe() {
    await this.retrying(() => this.db.query(PROBE_SQL).run(String(Date.now())));
  }

  /** The say queue's write, for new messages alone (one transaction: all stored, or the error). */
  async append(batch: NewMessage[]) {
    const results = await this.write(batch.map((m) => ({ ...m, kind: "say" as const })));
    const failed = results.find((r) => r instanceof Error);
    if (failed) throw failed;
    return results as number[];
  }

  message(room: string, id: number) {
    return this.retrying(() => {
      const row = this.db.query("SELECT * FROM messages WHERE room = ? AND id = ?").get(room, id);
      return row ? messageOfRow(row) : undefined;
    });
  }

  async change(c: Change): Promise<Changed> {
    const [result] = await this.write([c]);
    if (result instanceof Error) throw result;
    return result as Changed;
  }

  /** In one transaction, so a flood with changes among its messages still commits once per flush; the rooms' last
   * ids move only once it committed. */
  async write(items: Write[]): Promise<Written[]> {
    const last = new Map<string, number>(); // the rooms' seqs as the transaction hands them out
    let results: Written[];
    try {
      for (const w of items) if (!this.lastIds.has(w.room)) await this.retrying(() => this.openRoom(w.room));
      results = await this.retrying(() => {
        last.clear();
        return this.writeAll(items, last);
      });
    } catch (error) {
      return items.map(() => asError(error));
    }
    for (const [room, seq] of last) {
      this.lastIds.set(room, seq);
      this.leaders.offer(room, seq);
      this.dirty.set(room, seq);
    }
    items.forEach((w, i) => w.kind === "say" && this.unindexed.add(w.room, results[i] as number));
    return results;
  }

  /** One write: a new row, or a change read and written (synchronous: nothing else on this connection runs between). */
  private writeOne(w: Write, last: Map<string, number>): Written {
    const seq = (last.get(w.room) ?? this.lastIds.get(w.room)!) + 1;
    if (w.kind === "say") {
      this.insertRow(rowOf(w, seq));
      last.set(w.room, seq);
      return seq;
    }
    const row = this.db.query("SELECT * FROM messages WHERE room = ? AND id = ?").get(w.room, w.id);
    if (!row) return { ok: false, code: "not_found", message: `No message ${w.id} in ${w.room}` };
    const changed = applyChange(messageOfRow(row), w, seq, Date.now());
    if (!changed.ok || !changed.changed) return changed;
    this.db.query(sqliteParams(CHANGE_SQL)).run(...changedColumns(changed.message), w.room, w.id);
    last.set(w.room, seq);
    return changed;
  }

  /** Writes up to LAST_ID_FLUSH_ROOMS rooms' last ids, so one flush never holds the writer long. */
  private async flushLastIds() {
    const rooms = this.dirty.entries().take(LAST_ID_FLUSH_ROOMS).toArray();
    if (!rooms.length) return;
    await this.retrying(() => this.writeLastIds(rooms));
    for (const [room, id] of rooms) if (this.dirty.get(room) === id) this.dirty.delete(room);
  }

  /** Learns a room's last id, and lists the room. */
  private openRoom(room: string) {
    const last = this.readLastId(room);
    const listed = this.db.query("INSERT INTO rooms (name, last_id) VALUES (?, ?) ON CONFLICT (name) DO NOTHING").run(room, last);
    this.roomCount += listed.changes;
    this.lastIds.set(room, last);
  }

  /** The room's last committed id; for a room without a row, the floor (the highest id of any dropped room). */
  private readLastId(room: string): number {
    const row = this.db.query(`SELECT max(last_id, coalesce((SELECT max(id) FROM messages WHERE room = ?1), 0),
      coalesce((SELECT max(seq) FROM messages WHERE room = ?1 AND seq <> id), 0)) AS last
      FROM rooms WHERE name = ?1`).get(room) as { last: number } | null;
    if (row) return row.last;
    return (this.db.query("SELECT value FROM counters WHERE name = 'room_floor'").get() as { value: number } | null)?.value ?? 0;
  }

  createRoom(room: string, visibility: Visibility, owner: string | null, members: string[]) {
    return this.retrying(() =>
      this.db.transaction(() => {
        if (this.lastIds.has(room) || this.db.query("SELECT 1 FROM rooms WHERE name = ?").get(room)) return false;
        const last = this.readLastId(room); // the floor: ids of a dropped room are never handed out again
        this.db.query("INSERT INTO rooms (name, last_id, visibility, owner) VALUES (?, ?, ?, ?)").run(room, last, visibility, owner);
        for (const user of members) this.db.query("INSERT INTO members (room, user_id, role) VALUES (?, ?, 'member')").run(room, user);
        this.roomCount++;
        this.lastIds.set(room, last);
        return true;
      })(),
    );
  }

  /** Committed ids only (lastIds may be ahead, for a batch being written). */
  lastId(room: string) {
    return this.retrying(() => this.readLastId(room));
  }

  tail(room: string, limit: number) {
    return this.retrying(() =>
      newestChanges([
        this.db.query("SELECT * FROM messages WHERE room = ? ORDER BY id DESC LIMIT ?").all(room, limit),
        this.db.query("SELECT * FROM messages WHERE room = ? AND seq <> id ORDER BY seq DESC LIMIT ?").all(room, limit),
      ], limit),
    );
  }

  between(room: string, after: number, before: number) {
    return this.retrying(() =>
      changesBetween([
        this.db.query("SELECT * FROM messages WHERE room = ?1 AND id > ?2 AND id < ?3 AND seq = id ORDER BY id LIMIT ?4").all(room, after, before, GAP_READ_LIMIT),
        this.db.query("SELECT * FROM messages WHERE room = ?1 AND seq <> id AND seq > ?2 AND seq < ?3 ORDER BY seq LIMIT ?4").all(room, after, before, GAP_READ_LIMIT),
      ]),
    );
  }

  before(room: string, before: number, limit: number) {
    return this.retrying(() =>
      this.db.query("SELECT * FROM messages WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?").all(room, before, limit).reverse().map(messageOfRow),
    );
  }

  async search(room: string, words: string[], before: number, limit: number) {
    // what is stored is searchable: a search first indexes what the batches have not (up to SEARCH_CATCH_UP)
    for (let i = 0; i < SEARCH_CATCH_UP / SEARCH_INDEX_BATCH && this.unindexed.size; i++) await this.indexNew();
    return this.retrying(() => this.db.query(SQLITE_SEARCH).all(ftsQuery(room, words), room, before, limit).map(messageOfRow));
  }

  async rooms(limit: number) {
    return this.leaders.top().slice(0, limit).map(([name, lastId]) => ({ name, lastId }));
  }

  async countRooms() {
    return this.roomCount;
  }

  hasRoom(room: string) {
    return this.retrying(() => this.lastIds.has(room) || !!this.db.query("SELECT 1 FROM rooms WHERE name = ?").get(room));
  }

  expire(before: number, limit: number) {
    return this.retrying(() =>
      this.db.transaction(() => {
        const rows = this.db.query(expireSql("?")).all(before, limit) as { room: string; id: number }[];
        this.writeLastIds(rows.map((r) => [r.room, r.id])); // the rows' last ids outlive their messages
        const any = this.db.query("SELECT 1 FROM messages WHERE room = ? LIMIT 1");
        return { deleted: rows.length, emptied: [...new Set(rows.map((r) => r.room))].filter((room) => !any.get(room)) };
      })(),
    );
  }

  dropRoom(room: string) {
    return this.retrying(() =>
      this.db.transaction(() => {
        // a room someone made (an owner, private, dm) stays: only rooms a join made are dropped when empty
        const dropped = this.db.query(`DELETE FROM rooms WHERE name = ?1 AND NOT EXISTS (SELECT 1 FROM messages WHERE room = ?1)
          AND visibility = 'public' AND owner IS NULL AND closed = 0 RETURNING last_id`).get(room) as { last_id: number } | null;
        if (!dropped) return false;
        this.db.query(`INSERT INTO counters (name, value) VALUES ('room_floor', ?)
          ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)`).run(dropped.last_id);
        this.lastIds.delete(room);
        this.leaders.remove(room);
        this.roomCount--;
        return true;
      })(),
    );
  }

  private flushLastIdsNow() {
    this.writeLastIds([...this.dirty]);
    this.dirty.clear();
  }

  /** Indexes the messages stored since the last run, in one transaction (their current text: an edit meanwhile counts). */
  private async indexNew() {
    if (!this.unindexed.size) return;
    const rows = this.unindexed.take(SEARCH_INDEX_BATCH);
    try {
      await this.retrying(() => this.indexRows(rows));
    } catch (error) {
      this.unindexed.putBack(rows);
      throw error;
    }
  }

  async close() {
    clearInterval(this.flusher);
    clearInterval(this.indexer);
    try {
      this.flushLastIdsNow();
      // a long backlog (after a flood) is left to the next open, so a graceful stop stays short
      this.indexRows(this.unindexed.take(SEARCH_CATCH_UP));
      if (!this.unindexed.size) this.db.run("UPDATE meta SET value = '1' WHERE key = 'search_clean'");
    } catch {} // a crash, too, leaves the room list's start a little stale (and the index is caught up at the next open)
    this.checkpointer?.terminate();
    this.db.close();
  }
}

/**
 * Starts a worker thread with its own connection that checkpoints the WAL every CHECKPOINT_MS, off the event loop.
 * A PASSIVE checkpoint never waits for the writer, so under nonstop writes the WAL is never all copied and never
 * rewinds: past `rewindBytes` a RESTART holds new commits (they retry) for one more copy. The WAL keeps its size
 * (cutting it would cost more than reusing it from the start). README ("Configuration") has the measurements.
 * - nice 19 (this thread only, on Linux): on a one-core machine a checkpoint takes only idle CPU.
 * - A PASSIVE checkpoint that never catches up never syncs the database file, and RESTART's own sync, under the
 *   write lock, would flush seconds of copied pages at once: the worker syncs them first, outside the lock.
 * - Its descriptor of the file is never closed: closing any descriptor of the file would drop this process's
 *   SQLite locks on it.
 * The worker's code is a string (a worker needs a module of its own, and the binary embeds this one);
 * server.test.ts runs it directly.
 */
export function startCheckpointer(file: string, { intervalMs = CHECKPOINT_MS, rewindBytes = WAL_REWIND_BYTES } = {}): Worker {
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
        if (log * frameBytes <= ${rewindBytes}) return;
        fdatasyncSync(fd);
        db.run("PRAGMA wal_checkpoint(RESTART)");
      } catch {}
    }, ${intervalMs});`;
  const worker = new Worker(URL.createObjectURL(new Blob([code], { type: "text/javascript" })));
  (worker as unknown as { unref(): void }).unref(); // bun-types lacks Worker.unref
  return worker;
}

/** Postgres through Bun.SQL's pool. Many nodes write at once: a message's id comes from its room's counter row. */
class PostgresStore implements Store {
  private listing: Promise<{ name: string; lastId: number }[]> | null = null; // concurrent room lists share one query
  readonly accounts: Accounts;
  readonly access: RoomAccess;
  readonly reading: Reading;
  private constructor(private readonly sql: SQL) {
    const query: Query = (text, params = []) => sql.unsafe(text, params as never[]);
    this.accounts = new Accounts(query);
    this.access = new RoomAccess(query);
    this.reading = new Reading(query);
  }

  createRoom(room: string, visibility: Visibility, owner: string | null, members: string[]) {
    return this.sql.begin(async (tx) => {
      const [made] = await tx`INSERT INTO rooms (name, last_id, visibility, owner)
        VALUES (${room}, coalesce((SELECT value FROM counters WHERE name = 'room_floor'), 0), ${visibility}, ${owner})
        ON CONFLICT (name) DO NOTHING RETURNING name`;
      if (!made) return false;
      await tx`UPDATE counters SET value = value + 1 WHERE name = 'rooms'`;
      for (const user of members) await tx`INSERT INTO members (room, user_id, role) VALUES (${room}, ${user}, 'member')`;
      return true;
    });
  }

  static async open(url: string, options: StoreOptions): Promise<PostgresStore> {
    const sql = new SQL(url, { max: PG_POOL, connectionTimeout: PG_CONNECT_TIMEOUT_S });
    await sql.begin(async (tx) => {
      await tx`SELECT pg_advisory_xact_lock(${PG_SCHEMA_LOCK})`;
      await PostgresStore.migrate(tx, options);
      // the room count is kept in a counter row from now on (count(*) scans)
      await tx`INSERT INTO counters (name, value) SELECT 'rooms', count(*) FROM rooms ON CONFLICT (name) DO NOTHING`;
    });
    return new PostgresStore(sql);
  }

  async secret(fresh: string) {
    await this.sql`INSERT INTO meta (key, value) VALUES ('session_secret', ${fresh}) ON CONFLICT (key) DO NOTHING`;
    const [row] = await this.sql`SELECT value FROM meta WHERE key = 'session_secret'`;
    return row.value as string;
  }

  /** Creates the tables, or brings an older database up to SCHEMA_VERSION (under the schema lock). */
  private static async migrate(tx: SQL, options: StoreOptions) {
    await tx.unsafe("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)");
    const [version] = await tx`SELECT value FROM meta WHERE key = 'schema_version'`;
    const [old] = await tx`SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'sessions' AND column_name = 'sid'`;
    let v1: SessionRowV1[] = [];
    if (!version && old) {
      v1 = await tx`SELECT sid, user_id, name, created, used FROM sessions`;
      await tx.unsafe("DROP TABLE sessions");
    }
    await tx.unsafe("ALTER TABLE IF EXISTS rooms ADD COLUMN IF NOT EXISTS visibility TEXT NOT NULL DEFAULT 'public'");
    await tx.unsafe("ALTER TABLE IF EXISTS rooms ADD COLUMN IF NOT EXISTS owner TEXT");
    await tx.unsafe("ALTER TABLE IF EXISTS rooms ADD COLUMN IF NOT EXISTS closed INTEGER NOT NULL DEFAULT 0");
    for (const column of MESSAGE_COLUMNS_V3) await tx.unsafe(`ALTER TABLE IF EXISTS messages ADD COLUMN IF NOT EXISTS ${column}`);
    for (const ddl of schema("postgres", options)) await tx.unsafe(ddl);
    await tx.unsafe("UPDATE messages SET seq = id WHERE seq IS NULL"); // schema 2's messages
    const { users, sessions } = migrateSessions(v1);
    for (let i = 0; i < users.length; i += PG_ROWS_PER_INSERT) await tx`INSERT INTO users ${tx(users.slice(i, i + PG_ROWS_PER_INSERT))}`;
    for (let i = 0; i < sessions.length; i += PG_ROWS_PER_INSERT) await tx`INSERT INTO sessions ${tx(sessions.slice(i, i + PG_ROWS_PER_INSERT))}`;
    await tx`INSERT INTO meta (key, value) VALUES ('schema_version', ${String(SCHEMA_VERSION)}) ON CONFLICT (key) DO UPDATE SET value = excluded.value`;
  }

  async findSession(sid: string) {
    const [row] = await this.sql.unsafe(`SELECT ${SESSION_COLUMNS} FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.sid_hash = $1`, [sidHash(sid)]);
    return row ? sessionOfRow(sid, row) : undefined;
  }

  async createGuest(sid: string, name: (attempt: number) => string): Promise<Session> {
    const id = `u${randomId(USER_ID_BYTES)}`;
    const now = Date.now();
    for (let attempt = 0; ; attempt++) {
      const candidate = name(attempt);
      const made = await this.sql`INSERT INTO users (id, name, name_key, created, seen)
        VALUES (${id}, ${candidate}, ${nameKey(candidate)}, ${now}, ${now}) ON CONFLICT DO NOTHING RETURNING id`;
      if (!made.length) continue;
      const handle = randomId(HANDLE_BYTES);
      await this.sql`INSERT INTO sessions (sid_hash, handle, user_id, created, seen) VALUES (${sidHash(sid)}, ${handle}, ${id}, ${now}, ${now})`;
      return { sid, handle, id, name: candidate, registered: false, admin: false, used: false, seen: now };
    }
  }

  async touchSessions(sids: string[], now: number) {
    for (const sid of sids) {
      const [row] = await this.sql`UPDATE sessions SET used = 1, seen = ${now} WHERE sid_hash = ${sidHash(sid)} RETURNING user_id`;
      if (row) await this.sql`UPDATE users SET seen = ${now} WHERE id = ${row.user_id}`;
    }
  }

  async rename(userId: string, name: string) {
    const [old] = await this.sql`SELECT name FROM users WHERE id = ${userId}`;
    if (!old) throw new Error(`Cannot rename: no user ${userId}`);
    try {
      const renamed = await this.sql`UPDATE users SET name = ${name}, name_key = ${nameKey(name)}
        WHERE id = ${userId} AND NOT EXISTS (
          SELECT 1 FROM users u2 WHERE u2.name_key = ${nameKey(name)} AND u2.id <> ${userId}) RETURNING name`;
      return renamed.length > 0 ? (old.name as string) : undefined;
    } catch (error) {
      if (isUniqueViolation(error)) return undefined;
      throw error;
    }
  }

  async pruneSessions({ unusedBefore, keepUnused, guestsSeenBefore, keep }: PruneRules) {
    const count = async (where: string) => Number((await this.sql.unsafe(`SELECT count(*) AS n FROM sessions s WHERE ${where}`))[0].n);
    const guest = "s.user_id IN (SELECT id FROM users WHERE password IS NULL)";
    const picks: [where: string, order: string, limit: () => Promise<number>][] = [
      [`s.used = 0 AND s.created < ${Number(unusedBefore)}`, "s.created", async () => PRUNE_BATCH],
      ["s.used = 0", "s.created", async () => (await count("s.used = 0")) - keepUnused],
      [`s.seen < ${Number(guestsSeenBefore)} AND ${guest}`, "s.seen", async () => PRUNE_BATCH],
      [guest, "s.seen", async () => (await count("1 = 1")) - keep],
    ];
    let deleted = 0;
    for (const [where, order, limit] of picks) {
      for (;;) {
        const n = Math.min(PRUNE_BATCH, await limit());
        if (n <= 0) break;
        const users = await this.sql.unsafe(`DELETE FROM sessions WHERE sid_hash IN
          (SELECT s.sid_hash FROM sessions s WHERE ${where} ORDER BY ${order} LIMIT ${n}) RETURNING user_id`);
        deleted += users.length;
        for (const { user_id } of users) {
          await this.sql`DELETE FROM users WHERE id = ${user_id} AND password IS NULL AND NOT EXISTS (SELECT 1 FROM sessions WHERE user_id = ${user_id})`;
        }
        if (users.length < n) break;
      }
    }
    return deleted;
  }

  async countSessions() {
    const [{ n }] = await this.sql`SELECT count(*) AS n FROM sessions`;
    return Number(n);
  }

  async countUsers() {
    const [{ n }] = await this.sql`SELECT count(*) AS n FROM users`;
    return Number(n);
  }

  async probe() {
    await this.sql.unsafe(PROBE_SQL.replace("?", "$1"), [String(Date.now())]);
  }

  /** Runs of new messages and single changes, in order, each stored on its own: a failure fails only its run. */
  async write(items: Write[]): Promise<Written[]> {
    const results: Written[] = [];
    for (let i = 0; i < items.length;) {
      let j = i;
      while (j < items.length && items[j].kind === "say") j++;
      const says = j > i;
      const run = says ? items.slice(i, j) : [items[i]];
      i = says ? j : i + 1;
      try {
        results.push(...(says ? await this.append(run as NewMessage[]) : [await this.change(run[0] as Change)]));
      } catch (error) {
        results.push(...run.map(() => asError(error)));
      }
    }
    return results;
  }

  /** The room's counter row stays locked until commit, so ids are gap-free and commit in order on every node. */
  append(batch: NewMessage[]): Promise<number[]> {
    return this.sql.begin(async (tx) => {
      const byRoom = Map.groupBy(batch.keys(), (i) => batch[i].room);
      const ids = new Array<number>(batch.length);
      // rooms in name order, so two nodes' batches never wait on each other's locks in a cycle
      for (const [room, indexes] of [...byRoom].sort(([a], [b]) => (a < b ? -1 : 1))) {
        // a new room starts above the floor; xmax = 0 marks a row this statement inserted
        const [{ last_id, created }] = await tx`INSERT INTO rooms (name, last_id)
          VALUES (${room}, coalesce((SELECT value FROM counters WHERE name = 'room_floor'), 0) + ${indexes.length})
          ON CONFLICT (name) DO UPDATE SET last_id = rooms.last_id + ${indexes.length} RETURNING last_id, (xmax = 0) AS created`;
        if (created) await tx`UPDATE counters SET value = value + 1 WHERE name = 'rooms'`;
        let id = Number(last_id) - indexes.length;
        for (const i of indexes) ids[i] = ++id;
      }
      const rows = batch.map((m, i) => rowOf(m, ids[i]));
      for (let i = 0; i < rows.length; i += PG_ROWS_PER_INSERT) await tx`INSERT INTO messages ${tx(rows.slice(i, i + PG_ROWS_PER_INSERT))}`;
      return ids;
    });
  }

  async message(room: string, id: number) {
    const [row] = await this.sql`SELECT * FROM messages WHERE room = ${room} AND id = ${id}`;
    return row ? messageOfRow(row) : undefined;
  }

  /** The room's counter row is locked first (as append does), so changes and new messages take seqs in commit order. */
  change(c: Change): Promise<Changed> {
    return this.sql.begin(async (tx) => {
      const [room] = await tx`SELECT last_id FROM rooms WHERE name = ${c.room} FOR UPDATE`;
      const [row] = room ? await tx`SELECT * FROM messages WHERE room = ${c.room} AND id = ${c.id}` : [];
      if (!row) return { ok: false, code: "not_found", message: `No message ${c.id} in ${c.room}` } satisfies Changed;
      const seq = Number(room.last_id) + 1;
      const changed = applyChange(messageOfRow(row), c, seq, Date.now());
      if (!changed.ok || !changed.changed) return changed;
      await tx`UPDATE rooms SET last_id = ${seq} WHERE name = ${c.room}`;
      await tx.unsafe(CHANGE_SQL, [...changedColumns(changed.message), c.room, c.id]);
      return changed;
    });
  }

  async tail(room: string, limit: number) {
    const rows = newestChanges(await Promise.all([
      this.sql`SELECT * FROM messages WHERE room = ${room} ORDER BY id DESC LIMIT ${limit}`,
      this.sql`SELECT * FROM messages WHERE room = ${room} AND seq <> id ORDER BY seq DESC LIMIT ${limit}`,
    ]), limit);
    return rows;
  }

  async between(room: string, after: number, before: number) {
    const rows = changesBetween(await Promise.all([
      this.sql`SELECT * FROM messages WHERE room = ${room} AND id > ${after} AND id < ${before} AND seq = id ORDER BY id LIMIT ${GAP_READ_LIMIT}`,
      this.sql`SELECT * FROM messages WHERE room = ${room} AND seq <> id AND seq > ${after} AND seq < ${before} ORDER BY seq LIMIT ${GAP_READ_LIMIT}`,
    ]));
    return rows;
  }

  async before(room: string, before: number, limit: number) {
    const rows = await this.sql`SELECT * FROM messages WHERE room = ${room} AND id < ${before} ORDER BY id DESC LIMIT ${limit}`;
    return rows.reverse().map(messageOfRow) as Message[];
  }

  /** The planner picks the GIN index (rare words) or the room's newest ids, each row checked (common words). */
  async search(room: string, words: string[], before: number, limit: number) {
    const rows = await this.sql`SELECT * FROM messages WHERE room = ${room} AND id < ${before}
      AND to_tsvector('simple', text) @@ to_tsquery('simple', ${tsQuery(words)}) ORDER BY id DESC LIMIT ${limit}`;
    return rows.map(messageOfRow) as Message[];
  }

  async lastId(room: string) {
    const [row] = await this.sql`SELECT coalesce((SELECT last_id FROM rooms WHERE name = ${room}),
      (SELECT value FROM counters WHERE name = 'room_floor'), 0) AS last_id`;
    return Number(row.last_id);
  }

  /** Through the index rooms_active: O(limit). */
  rooms(limit: number) {
    return (this.listing ??= (async () => {
      const rows = await this.sql`SELECT name, last_id FROM rooms ORDER BY last_id DESC LIMIT ${limit}`;
      return rows.map((r: any) => ({ name: r.name as string, lastId: Number(r.last_id) }));
    })().finally(() => (this.listing = null)));
  }

  async countRooms() {
    const [row] = await this.sql`SELECT value FROM counters WHERE name = 'rooms'`;
    return Number(row?.value ?? 0);
  }

  async hasRoom(room: string) {
    return (await this.sql`SELECT 1 FROM rooms WHERE name = ${room}`).length > 0;
  }

  expire(before: number, limit: number) {
    return this.sql.begin(async (tx) => {
      const rows = await tx.unsafe(expireSql("$"), [before, limit]);
      const rooms = [...new Set(rows.map((r: { room: string }) => r.room))] as string[];
      const left = rooms.length
        ? await tx`SELECT name FROM rooms WHERE name IN ${tx(rooms)} AND EXISTS (SELECT 1 FROM messages WHERE room = rooms.name)`
        : [];
      const kept = new Set(left.map((r: { name: string }) => r.name));
      return { deleted: rows.length as number, emptied: rooms.filter((room) => !kept.has(room)) };
    });
  }

  dropRoom(room: string) {
    return this.sql.begin(async (tx) => {
      const [dropped] = await tx`DELETE FROM rooms WHERE name = ${room} AND NOT EXISTS (SELECT 1 FROM messages WHERE room = ${room})
        AND visibility = 'public' AND owner IS NULL AND closed = 0 RETURNING last_id`;
      if (!dropped) return false;
      await tx`INSERT INTO counters (name, value) VALUES ('room_floor', ${dropped.last_id})
        ON CONFLICT (name) DO UPDATE SET value = greatest(counters.value, excluded.value)`;
      await tx`UPDATE counters SET value = value - 1 WHERE name = 'rooms'`;
      return true;
    });
  }

  async close() {
    await this.sql.close();
  }
}

/** One statement with `$1…` parameters, on either engine; the rows it returns. */
type Query = (sql: string, params?: unknown[]) => Promise<any[]>;
export type Account = { id: string; name: string; password: string | null; admin: boolean; banned: boolean };
export type SessionInfo = { handle: string; created: number; seen: number };
const accountOfRow = (r: any): Account => ({ id: r.id, name: r.name, password: r.password ?? null, admin: Number(r.admin) === 1, banned: Number(r.banned) === 1 });

/** What accounts need of the store: few and simple statements, written once for both engines. */
export class Accounts {
  constructor(private readonly q: Query) {}

  async user(id: string): Promise<Account | undefined> {
    const [row] = await this.q("SELECT id, name, password, admin, banned FROM users WHERE id = $1", [id]);
    return row ? accountOfRow(row) : undefined;
  }

  async byName(name: string): Promise<Account | undefined> {
    const [row] = await this.q("SELECT id, name, password, admin, banned FROM users WHERE name_key = $1", [nameKey(name)]);
    return row ? accountOfRow(row) : undefined;
  }

  /** Sets a password hash; the first account of the instance becomes its admin (decided once, in meta). */
  async setPassword(id: string, hash: string): Promise<Account> {
    await this.q("UPDATE users SET password = $1 WHERE id = $2", [hash, id]);
    const first = await this.q("INSERT INTO meta (key, value) VALUES ('first_account', $1) ON CONFLICT (key) DO NOTHING RETURNING value", [id]);
    if (first.length) await this.q("UPDATE users SET admin = 1 WHERE id = $1", [id]);
    return (await this.user(id))!;
  }

  async setAdmin(id: string, admin: boolean) {
    await this.q("UPDATE users SET admin = $1 WHERE id = $2", [admin ? 1 : 0, id]);
  }

  async setBanned(id: string, banned: boolean) {
    await this.q("UPDATE users SET banned = $1 WHERE id = $2", [banned ? 1 : 0, id]);
  }

  /** A new session of an existing user; the user's oldest sessions past `keep` are deleted: their handles. */
  async createSession(sid: string, userId: string, keep: number): Promise<{ handle: string; dropped: string[] }> {
    const handle = randomId(HANDLE_BYTES);
    const now = Date.now();
    await this.q("INSERT INTO sessions (sid_hash, handle, user_id, created, seen, used) VALUES ($1, $2, $3, $4, $4, 1)", [sidHash(sid), handle, userId, now]);
    const old = await this.q("SELECT handle FROM sessions WHERE user_id = $1 ORDER BY seen DESC, created DESC LIMIT 1000000 OFFSET $2", [userId, keep]);
    const dropped = old.map((r) => r.handle as string);
    for (const h of dropped) await this.q("DELETE FROM sessions WHERE handle = $1", [h]);
    return { handle, dropped };
  }

  async sessions(userId: string): Promise<SessionInfo[]> {
    const rows = await this.q("SELECT handle, created, seen FROM sessions WHERE user_id = $1 ORDER BY seen DESC", [userId]);
    return rows.map((r) => ({ handle: r.handle, created: Number(r.created), seen: Number(r.seen) }));
  }

  /** The most recently seen sessions with their users (for the console): handles and times, never a sid or its hash. */
  async recentSessions(limit: number) {
    const rows = await this.q(`SELECT s.handle, s.created, s.seen, u.id, u.name, u.admin, u.banned, CASE WHEN u.password IS NULL THEN 0 ELSE 1 END AS registered
      FROM sessions s JOIN users u ON u.id = s.user_id ORDER BY s.seen DESC LIMIT $1`, [limit]);
    return rows.map((r) => ({
      user: { id: r.id as string, name: r.name as string, registered: Number(r.registered) === 1, admin: Number(r.admin) === 1, banned: Number(r.banned) === 1 },
      session: { handle: r.handle as string, created: Number(r.created), seen: Number(r.seen) },
    }));
  }

  /** Deletes one session of a user: whether it was there. */
  async deleteSession(userId: string, handle: string): Promise<boolean> {
    return (await this.q("DELETE FROM sessions WHERE user_id = $1 AND handle = $2 RETURNING handle", [userId, handle])).length > 0;
  }

  /** Deletes every session of a user but `except`: their handles. */
  async deleteSessions(userId: string, except = ""): Promise<string[]> {
    return (await this.q("DELETE FROM sessions WHERE user_id = $1 AND handle <> $2 RETURNING handle", [userId, except])).map((r) => r.handle);
  }

  /** Deletes a guest left without a session (its messages keep its name). */
  async dropOrphanGuest(userId: string) {
    await this.q("DELETE FROM users WHERE id = $1 AND password IS NULL AND NOT EXISTS (SELECT 1 FROM sessions WHERE user_id = $1)", [userId]);
  }

  /** Gives a session a new sid (after a privilege change); its handle stays. */
  async rotate(oldSid: string, newSid: string) {
    await this.q("UPDATE sessions SET sid_hash = $1 WHERE sid_hash = $2", [sidHash(newSid), sidHash(oldSid)]);
  }

  /** Failed logins per key since `since`, and the oldest of them. */
  async failures(keys: string[], since: number): Promise<{ count: number; oldest: number }[]> {
    return Promise.all(keys.map(async (key) => {
      const [row] = await this.q("SELECT count(*) AS n, min(at) AS oldest FROM login_failures WHERE key = $1 AND at >= $2", [key, since]);
      return { count: Number(row?.n ?? 0), oldest: Number(row?.oldest ?? 0) };
    }));
  }

  async fail(keys: string[], at: number) {
    for (const key of keys) await this.q("INSERT INTO login_failures (key, at) VALUES ($1, $2)", [key, at]);
  }

  async pruneFailures(before: number) {
    await this.q("DELETE FROM login_failures WHERE at < $1", [before]);
  }
}

export type Role = "owner" | "moderator" | "member";
const RANK = { member: 0, moderator: 1, owner: 2, admin: 3 } as const;

/** A room's rules: who is in it, who moderates it, who is banned or muted. Nodes cache them per loaded room. */
export class RoomRules {
  constructor(
    readonly name: string,
    readonly exists: boolean,
    readonly visibility: Visibility,
    readonly owner: string | null,
    readonly roles: Map<string, "moderator" | "member">, // the rows of `members`; the owner has one too
    readonly bans: Map<string, number | null>,
    readonly mutes: Map<string, number>,
    readonly closed = false,
  ) {}

  role(userId: string): Role | undefined {
    return userId === this.owner ? "owner" : this.roles.get(userId);
  }

  /** admin > owner > moderator > member (anyone, in a public room). */
  rank(userId: string, admin: boolean): number {
    return admin ? RANK.admin : RANK[this.role(userId) ?? "member"];
  }

  /** Whether the user may know the room: join it, read it, list its members. A dm: its two users only. */
  mayRead(userId: string, admin: boolean): boolean {
    if (this.visibility === "public") return true;
    if (this.visibility === "dm") return this.roles.has(userId);
    return this.role(userId) !== undefined || admin;
  }

  /** The end of the user's ban here (null: until lifted), or undefined when not banned. */
  bannedUntil(userId: string, now = Date.now()): number | null | undefined {
    const until = this.bans.get(userId);
    return until === undefined || (until !== null && until <= now) ? undefined : until;
  }

  mutedUntil(userId: string, now = Date.now()): number | undefined {
    const until = this.mutes.get(userId);
    return until !== undefined && until > now ? until : undefined;
  }

  /** Why the user may not join, or undefined. */
  refuseJoin(userId: string, admin: boolean): string | undefined {
    if (!this.mayRead(userId, admin)) return "you are not a member";
    if (this.closed && !admin) return "an admin closed it";
    if (this.bannedUntil(userId) !== undefined && !admin) return "you are banned from it";
  }
}

/** What rooms' rules need of the store: plain statements, written once for both engines. */
export class RoomAccess {
  constructor(private readonly q: Query) {}

  async rules(room: string): Promise<RoomRules> {
    const now = Date.now();
    const [[row], members, bans, mutes] = await Promise.all([
      this.q("SELECT visibility, owner, closed FROM rooms WHERE name = $1", [room]),
      this.q("SELECT user_id, role FROM members WHERE room = $1", [room]),
      this.q("SELECT user_id, until FROM bans WHERE room = $1 AND (until IS NULL OR until > $2)", [room, now]),
      this.q("SELECT user_id, until FROM mutes WHERE room = $1 AND until > $2", [room, now]),
    ]);
    // a name nobody made yet is a public room (made by its first message), but dm names are only made by POST /api/dms
    const visibility = (row?.visibility ?? (room.startsWith(DM_PREFIX) ? "dm" : "public")) as Visibility;
    return new RoomRules(
      room, !!row, visibility, row?.owner ?? null,
      new Map(members.map((r) => [r.user_id, r.role])),
      new Map(bans.map((r) => [r.user_id, r.until === null ? null : Number(r.until)])),
      new Map(mutes.map((r) => [r.user_id, Number(r.until)])),
      Number(row?.closed ?? 0) === 1,
    );
  }

  async setClosed(room: string, closed: boolean) {
    await this.q("UPDATE rooms SET closed = $1 WHERE name = $2", [closed ? 1 : 0, room]);
  }

  /** The stored rooms with the highest last ids: messages, the time of the newest, whether closed (for the console). */
  async overview(limit: number) {
    const rows = await this.q(`SELECT r.name, r.visibility, r.last_id, r.closed, (SELECT count(*) FROM messages m WHERE m.room = r.name) AS messages,
        (SELECT m.ts FROM messages m WHERE m.room = r.name ORDER BY m.id DESC LIMIT 1) AS last_ts
      FROM rooms r ORDER BY r.last_id DESC LIMIT $1`, [limit]);
    return rows.map((r) => ({
      name: r.name as string, visibility: r.visibility as Visibility, lastId: Number(r.last_id), closed: Number(r.closed) === 1,
      messages: Number(r.messages), lastActivity: r.last_ts == null ? null : Number(r.last_ts),
    }));
  }

  async setRole(room: string, userId: string, role: "moderator" | "member" | null) {
    if (role === null) await this.q("DELETE FROM members WHERE room = $1 AND user_id = $2", [room, userId]);
    else await this.q("INSERT INTO members (room, user_id, role) VALUES ($1, $2, $3) ON CONFLICT (room, user_id) DO UPDATE SET role = excluded.role", [room, userId, role]);
  }

  async ban(room: string, userId: string, until: number | null | undefined) {
    if (until === undefined) await this.q("DELETE FROM bans WHERE room = $1 AND user_id = $2", [room, userId]);
    else await this.q("INSERT INTO bans (room, user_id, until) VALUES ($1, $2, $3) ON CONFLICT (room, user_id) DO UPDATE SET until = excluded.until", [room, userId, until]);
  }

  async mute(room: string, userId: string, until: number | undefined) {
    if (until === undefined) await this.q("DELETE FROM mutes WHERE room = $1 AND user_id = $2", [room, userId]);
    else await this.q("INSERT INTO mutes (room, user_id, until) VALUES ($1, $2, $3) ON CONFLICT (room, user_id) DO UPDATE SET until = excluded.until", [room, userId, until]);
  }

  private lastAudit = 0;

  async record(room: string, action: AuditAction, user: User, by: User, until?: number | null) {
    // the log reads newest first by `at`: two actions of one millisecond (a ban and its lift) keep their order
    const at = (this.lastAudit = Math.max(Date.now(), this.lastAudit + 1));
    await this.q("INSERT INTO audit (room, at, action, user_id, user_name, by_id, by_name, until) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
      [room, at, action, user.id, user.name, by.id, by.name, until ?? null]);
  }

  /** Every room's moderation actions and the instance's (room ""), newest first. */
  async auditAll(limit: number) {
    const rows = await this.q("SELECT room, at, action, user_id, user_name, by_id, by_name, until FROM audit ORDER BY at DESC LIMIT $1", [limit]);
    return rows.map((r) => ({
      room: r.room as string, action: r.action as AuditAction, user: { id: r.user_id, name: r.user_name }, by: { id: r.by_id, name: r.by_name }, at: Number(r.at),
      ...(r.until != null ? { until: Number(r.until) } : {}),
    }));
  }

  /** The room's moderation actions, newest first. */
  async audit(room: string, limit: number) {
    const rows = await this.q("SELECT at, action, user_id, user_name, by_id, by_name, until FROM audit WHERE room = $1 ORDER BY at DESC LIMIT $2", [room, limit]);
    return rows.map((r) => ({
      action: r.action as AuditAction, user: { id: r.user_id, name: r.user_name }, by: { id: r.by_id, name: r.by_name }, at: Number(r.at),
      ...(r.until != null ? { until: Number(r.until) } : {}),
    }));
  }

  /** Members with their current names and roles (the owner first). */
  async members(room: string, owner: string | null): Promise<(User & { role: Role })[]> {
    const rows = await this.q("SELECT m.user_id, m.role, u.name FROM members m JOIN users u ON u.id = m.user_id WHERE m.room = $1 ORDER BY u.name LIMIT 1000", [room]);
    const list = rows.map((r) => ({ id: r.user_id as string, name: r.name as string, role: (r.user_id === owner ? "owner" : r.role) as Role }));
    return list.sort((a, b) => RANK[b.role] - RANK[a.role]);
  }

  /** The private and dm rooms a user is in, busiest first (with the other user of a dm). */
  async roomsOf(userId: string, limit: number) {
    const rows = await this.q(`SELECT r.name, r.visibility, r.last_id,
        (SELECT u.id || ' ' || u.name FROM members o JOIN users u ON u.id = o.user_id WHERE o.room = r.name AND o.user_id <> $1 LIMIT 1) AS other
      FROM members m JOIN rooms r ON r.name = m.room WHERE m.user_id = $1 AND r.visibility <> 'public' ORDER BY r.last_id DESC LIMIT $2`, [userId, limit]);
    return rows.map((r) => {
      const space = r.other ? String(r.other).indexOf(" ") : -1;
      const other = space < 0 ? undefined : { id: String(r.other).slice(0, space), name: String(r.other).slice(space + 1) };
      return { name: r.name as string, visibility: r.visibility as Visibility, lastId: Number(r.last_id), ...(r.visibility === "dm" && other ? { with: other } : {}) };
    });
  }

  /** The visibility of each named room that has a row. */
  async visibilities(rooms: string[]): Promise<Map<string, Visibility>> {
    if (!rooms.length) return new Map();
    const rows = await this.q(`SELECT name, visibility FROM rooms WHERE name IN (${rooms.map((_, i) => `$${i + 1}`).join(", ")})`, rooms);
    return new Map(rows.map((r) => [r.name, r.visibility]));
  }
}

/** A room in GET /api/me/rooms: its head, how far the user read, and what came after (capped at UNREAD_LIMIT). */
export type MyRoom = { name: string; visibility: Visibility; seq: number; readSeq: number; unread: number; mentions: number };

const WORD = /^[\p{L}\p{N}\p{M}_]$/u; // what a mention may not be glued to, before its `@` or after its name
const isHighSurrogate = (code: number) => code >= 0xd800 && code <= 0xdbff;
/** The code point that ends just before index `i` (a whole surrogate pair, not half). */
const pointBefore = (s: string, i: number) => (i >= 2 && isHighSurrogate(s.charCodeAt(i - 2)) ? s.slice(i - 2, i) : s.slice(i - 1, i));
const pointAt = (s: string, i: number) => String.fromCodePoint(s.codePointAt(i)!);

/**
 * The names each `@` of a text may start, longest first: for an `@` not glued to a word, every prefix of the next
 * 32 characters (a name's longest) that is not followed by a word character. At most MENTION_LIMIT `@`s.
 */
export function mentionCandidates(text: string): string[][] {
  const out: string[][] = [];
  for (let at = text.indexOf("@"); at >= 0 && out.length < MENTION_LIMIT; at = text.indexOf("@", at + 1)) {
    if (at > 0 && WORD.test(pointBefore(text, at))) continue; // mail@example.com
    const start = at + 1;
    if (start >= text.length || /\s/.test(text[start])) continue;
    const names: string[] = [];
    for (let end = Math.min(text.length, start + 32); end > start; end--) {
      if (isHighSurrogate(text.charCodeAt(end - 1)) || /\s/.test(text[end - 1])) continue; // half a character, or a trailing space
      if (end < text.length && WORD.test(pointAt(text, end))) continue; // "@Bob" is not in "@Bobby"
      names.push(text.slice(start, end));
    }
    if (names.length) out.push(names);
  }
  return out;
}

const escapeLike = (s: string) => s.replace(/[\\%_]/g, "\\$&");

/** Each user's rooms, how far the user read each, and who a text mentions: plain statements, written once for both engines. */
export class Reading {
  constructor(private readonly q: Query) {}

  /** Stores that the user read a room up to `seq`, unless it had read further: whether the position moved. */
  async markRead(userId: string, room: string, seq: number): Promise<boolean> {
    const moved = await this.q(`INSERT INTO read_state (user_id, room, seq) VALUES ($1, $2, $3)
      ON CONFLICT (user_id, room) DO UPDATE SET seq = excluded.seq WHERE excluded.seq > read_state.seq RETURNING seq`, [userId, room, seq]);
    return moved.length > 0;
  }

  /** Adds a room to the user's rooms; one new to the list starts read up to `head` (what its join's history showed).
   * Past USER_ROOMS_KEPT the longest joined go, so the list costs a bounded read. */
  async join(userId: string, room: string, head: number) {
    // a rejoin (every reconnect) only reads: a write, even one that changes nothing, takes the database's write lock
    if ((await this.q("SELECT 1 AS one FROM user_rooms WHERE user_id = $1 AND room = $2", [userId, room])).length) return;
    const added = await this.q("INSERT INTO user_rooms (user_id, room, joined) VALUES ($1, $2, $3) ON CONFLICT (user_id, room) DO NOTHING RETURNING room", [userId, room, Date.now()]);
    if (!added.length) return;
    await this.markRead(userId, room, head);
    const dropped = await this.q(`DELETE FROM user_rooms WHERE user_id = $1 AND room IN
      (SELECT room FROM user_rooms WHERE user_id = $1 ORDER BY joined DESC, room LIMIT 1000000 OFFSET $2) RETURNING room`, [userId, USER_ROOMS_KEPT]);
    for (const r of dropped) await this.q("DELETE FROM read_state WHERE user_id = $1 AND room = $2", [userId, r.room]);
  }

  /** Takes a room off the user's rooms, with its read position. */
  async leave(userId: string, room: string) {
    await this.q("DELETE FROM user_rooms WHERE user_id = $1 AND room = $2", [userId, room]);
    await this.q("DELETE FROM read_state WHERE user_id = $1 AND room = $2", [userId, room]);
  }

  /**
   * The user's rooms it may still read (a private room it was removed from is left out), busiest first, at most
   * `limit`; unread: the newest UNREAD_LIMIT messages after the read position that are not the user's nor deleted
   * (one range of the messages' primary key per room), and mentions: those of them that name the user.
   */
  async rooms(userId: string, admin: boolean, limit: number): Promise<MyRoom[]> {
    const after = `FROM messages m WHERE m.room = ur.room AND m.id > coalesce(rs.seq, 0) AND m.user_id <> $1 AND m.deleted = 0 ORDER BY m.id DESC LIMIT $3`;
    const rows = await this.q(`SELECT ur.room, ur.visibility, ur.last_id, coalesce(rs.seq, 0) AS read_seq,
        (SELECT max(id) FROM messages WHERE room = ur.room) AS head,
        (SELECT count(*) FROM (SELECT 1 AS one ${after}) u) AS unread,
        (SELECT count(*) FROM (SELECT m.mentions ${after}) u WHERE u.mentions LIKE $4 ESCAPE '\\') AS mentions
      FROM (SELECT u.room, r.visibility, r.last_id FROM user_rooms u LEFT JOIN rooms r ON r.name = u.room
        WHERE u.user_id = $1 AND (r.visibility IS NULL OR r.visibility = 'public' OR ($2 = 1 AND r.visibility = 'private')
          OR EXISTS (SELECT 1 FROM members mb WHERE mb.room = u.room AND mb.user_id = $1))
        ORDER BY coalesce(r.last_id, 0) DESC, u.room LIMIT $5) ur
      LEFT JOIN read_state rs ON rs.user_id = $1 AND rs.room = ur.room`,
      [userId, admin ? 1 : 0, UNREAD_LIMIT, `%${escapeLike(JSON.stringify(userId))}%`, limit]);
    const list = rows.map((r): MyRoom => ({
      name: r.room, visibility: (r.visibility ?? "public") as Visibility, seq: Math.max(Number(r.last_id ?? 0), Number(r.head ?? 0)),
      readSeq: Number(r.read_seq), unread: Number(r.unread), mentions: Number(r.mentions),
    }));
    return list.sort((a, b) => b.seq - a.seq || (a.name < b.name ? -1 : 1));
  }

  /** The users a text mentions with `@name` (by nameKey; the longest name wins), in order, at most MENTION_LIMIT. */
  async resolveMentions(text: string): Promise<string[]> {
    const candidates = mentionCandidates(text);
    if (!candidates.length) return [];
    const keys = [...new Set(candidates.flat().map(nameKey))];
    const rows = await this.q(`SELECT id, name_key FROM users WHERE name_key IN (${keys.map((_, i) => `$${i + 1}`).join(", ")})`, keys);
    const byKey = new Map(rows.map((r) => [r.name_key as string, r.id as string]));
    const ids = new Set<string>();
    for (const names of candidates) {
      const found = names.map((name) => byKey.get(nameKey(name))).find((id) => id !== undefined);
      if (found) ids.add(found);
    }
    return [...ids].slice(0, MENTION_LIMIT);
  }
}

function randomId(bytes: number): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(bytes))).toString("base64url");
}

// ── Fan-out: how a node hears of the others (alone: nobody; in a cluster: Redis) ──

/** What the fan-out brings a node. A node's own events come back too: handling them twice changes nothing. */
export type FanoutEvents = {
  message(room: string, entry: Entry): void;
  typing(room: string, frame: string): void;
  presence(room: string, change: "joined" | "left", user: User): void;
  renamed(user: User, previous: string): void;
  /** Another node changed who may do what. */
  access(event: AccessEvent): void;
  /** The fan-out was down and is back: events may have been missed. */
  reconnected(): void;
};

/** A Prometheus sample: its family's name, type and help, value, and labels; a histogram's samples add a suffix to the name. */
type MetricLine = { name: string; type: "counter" | "gauge" | "histogram"; help: string; value: number; labels?: Record<string, string>; suffix?: string };

export interface Fanout {
  /** false while a cluster node cannot reach Redis; it keeps serving its own clients meanwhile */
  readonly connected: boolean;
  listen(events: FanoutEvents): void;
  subscribe(room: string): Promise<void>;
  unsubscribe(room: string): void;
  /** A user's first socket in a room on this node joined, or its last one left: the fan-out decides, for the whole
   * cluster, whether the user arrived or went, and answers with a presence event. */
  join(room: string, user: User): void;
  leave(room: string, user: User): void;
  /** Everyone in a room, on every node (what a node that loads the room starts from). */
  members(room: string): Promise<User[]>;
  /** How many are in each of these rooms on other nodes. */
  online(rooms: string[]): Promise<number[]>;
  /** Makes this node's presence registrations exactly these (after Redis came back). */
  register(members: [room: string, user: User][]): Promise<void>;
  publishMessage(room: string, entry: Entry): void;
  publishTyping(room: string, frame: string): void;
  publishRename(user: User, previous: string, rooms: string[]): void;
  publishAccess(event: AccessEvent): void;
  /** Shares this node's latest second with the others (for the admin console)… */
  shareStats(sample: StatsSample): void;
  /** …and reads every node's latest, this one's included. */
  nodeStats(): Promise<[node: string, sample: StatsSample][]>;
  metrics(): MetricLine[];
  close(): Promise<void>;
}

/** One process: presence is decided at once, and there is nobody else to tell. */
class LocalFanout implements Fanout {
  readonly connected = true;
  private events: FanoutEvents | null = null;
  constructor(private readonly node: string) {}
  listen(events: FanoutEvents) {
    this.events = events;
  }
  async subscribe() {}
  unsubscribe() {}
  join(room: string, user: User) {
    this.events?.presence(room, "joined", user);
  }
  leave(room: string, user: User) {
    this.events?.presence(room, "left", user);
  }
  async members() {
    return [];
  }
  async online(rooms: string[]) {
    return rooms.map(() => 0);
  }
  async register() {}
  publishMessage() {}
  publishTyping() {}
  publishRename() {}
  publishAccess() {}
  private latest: StatsSample | undefined;
  shareStats(sample: StatsSample) {
    this.latest = sample;
  }
  async nodeStats(): Promise<[string, StatsSample][]> {
    return this.latest ? [[this.node, this.latest]] : [];
  }
  metrics(): MetricLine[] {
    return [{ name: "chat_node_info", type: "gauge", help: "This process", value: 1, labels: { node: this.node, cluster: "0" } }];
  }
  async close() {}
}

// Presence in Redis: chat:node:<node> holds what each node registered ("room\nuser" → name);
// chat:count:<room> counts the nodes holding each user; chat:presence:<room> names them.
// joined/left are published from inside the script (FanoutHeader "presence"), so they fire once cluster-wide.
// A string, as Redis runs it; test/cluster.test.ts runs it directly.
export const PRESENCE_LUA = String.raw`
local function announce(room, change, user, name)
  redis.call('PUBLISH', 'chat:room:' .. room, cjson.encode({kind = 'presence', change = change, user = {id = user, name = name}}))
end
local function joinRoom(node, room, user, name)
  if redis.call('HSETNX', 'chat:node:' .. node, room .. '\n' .. user, name) == 0 then return end
  redis.call('HSET', 'chat:presence:' .. room, user, name)
  if redis.call('HINCRBY', 'chat:count:' .. room, user, 1) == 1 then announce(room, 'joined', user, name) end
end
local function leaveRoom(node, room, user)
  if redis.call('HDEL', 'chat:node:' .. node, room .. '\n' .. user) == 0 then return end
  if redis.call('HINCRBY', 'chat:count:' .. room, user, -1) <= 0 then
    local name = redis.call('HGET', 'chat:presence:' .. room, user) or ''
    redis.call('HDEL', 'chat:count:' .. room, user)
    redis.call('HDEL', 'chat:presence:' .. room, user)
    announce(room, 'left', user, name)
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

/** Redis pub/sub between nodes, and presence in Redis: one publishing and one subscribed connection per process. */
class RedisFanout implements Fanout {
  private readonly channels = new Set<string>([USERS_CHANNEL]);
  private events: FanoutEvents | null = null;
  private subscribed = false;
  private epoch = 0; // listeners of older subscriptions fall silent (see subscribeAll)
  private received = 0;
  private lagMs = 0;
  private beat: Timer | undefined;
  private retry: Timer | undefined;
  private closed = false;

  private constructor(private readonly pub: RedisClient, private readonly sub: RedisClient, private readonly node: string, private readonly logger: Logger) {}

  /**
   * Connects, or when Redis cannot be reached starts degraded (this node serves its own clients; /healthz says so)
   * and retries with backoff, one log line a try naming REDIS_URL and its host.
   */
  static async open(url: string, node: string, logger: Logger): Promise<RedisFanout> {
    const options = { autoReconnect: true, maxRetries: 1_000_000, enableOfflineQueue: false, connectionTimeout: REDIS_CONNECT_TIMEOUT_MS };
    const fanout = new RedisFanout(new RedisClient(url, options), new RedisClient(url, options), node, logger);
    await fanout.start(url, 1);
    return fanout;
  }

  private async start(url: string, attempt: number) {
    // a client without retries answers at once; Bun's retrying client would wait silently for ever
    const probe = new RedisClient(url, { autoReconnect: false, maxRetries: 0, connectionTimeout: REDIS_CONNECT_TIMEOUT_MS });
    try {
      await probe.connect();
      await Promise.all([this.pub.connect(), this.sub.connect()]);
    } catch (error) {
      const retryInMs = Math.min(REDIS_RETRY_MAX_MS, 1_000 * 2 ** (attempt - 1));
      this.logger.warn("redis_unreachable", { setting: "REDIS_URL", host: hostOf(url), attempt, retryInMs, degraded: true, error: describeError(error) });
      if (!this.closed) this.retry = setTimeout(() => void this.start(url, attempt + 1), retryInMs);
      return;
    } finally {
      probe.close();
    }
    await this.subscribeAll();
    this.sub.onconnect = () => void this.resubscribe();
    this.sub.onclose = (error) => {
      if (this.subscribed) this.logger.warn("redis", { state: "down", host: hostOf(url), error: describeError(error) });
      this.subscribed = false;
    };
    this.beat = setInterval(() => void this.heartbeat().catch((e) => this.logger.error("redis_heartbeat", e)), HEARTBEAT_MS);
    this.beat.unref();
    await this.heartbeat();
    this.logger.info("redis", { state: "up", host: hostOf(url) });
    if (attempt > 1) this.events?.reconnected();
  }

  get connected() {
    return this.pub.connected && this.sub.connected && this.subscribed;
  }

  listen(events: FanoutEvents) {
    this.events = events;
  }

  private receive(payload: string, channel: string) {
    const event = FanoutCodec.decode(payload);
    const on = this.events;
    if (!event || !on) return;
    const room = channel.slice(ROOM_CHANNEL.length);
    switch (event.kind) {
      case "message":
        this.received++;
        this.lagMs = Math.max(0, Date.now() - event.sentAt);
        // the frame is ours: a message or an updated frame, whose state the room keeps
        const entry = entryOfFrame(event.frame);
        return entry && on.message(room, entry);
      case "typing":
        return event.node === this.node ? undefined : on.typing(room, event.frame);
      case "presence":
        return on.presence(room, event.change, event.user);
      case "renamed":
        return event.node === this.node ? undefined : on.renamed(event.user, event.previous);
      case "access":
        return event.node === this.node ? undefined : on.access(event.event);
      default:
        event satisfies never;
    }
  }

  // A reconnect loses the server-side subscriptions but Bun keeps the old listeners: each (re)subscription
  // gets listeners of a new epoch, and older ones fall silent.
  private listener() {
    const mine = this.epoch;
    return (payload: string, channel: string) => void (mine === this.epoch && this.receive(payload, channel));
  }

  private unsubscribeChannel(channel: string) {
    try {
      this.sub.unsubscribe(channel)?.catch?.(() => {});
    } catch {} // throws when the client is not in subscriber mode
  }

  private async subscribeAll() {
    this.epoch++;
    for (const channel of this.channels) {
      this.unsubscribeChannel(channel);
      await this.sub.subscribe(channel, this.listener());
    }
    this.subscribed = true;
  }

  /** After Redis came back: subscribe again and tell the node, which re-registers and catches up. */
  private async resubscribe() {
    this.subscribed = false;
    try {
      await this.subscribeAll();
      this.logger.info("redis", { state: "up", resubscribed: this.channels.size });
      this.events?.reconnected();
    } catch (error) {
      this.logger.error("redis_resubscribe", error);
    }
  }

  private presence(...args: string[]) {
    return this.pub.send("EVAL", [PRESENCE_LUA, "0", ...args]);
  }

  /** Announces this node, and clears the registrations of nodes that stopped announcing. */
  private async heartbeat() {
    if (!this.pub.connected) return;
    await this.pub.send("SET", [`chat:alive:${this.node}`, String(Date.now()), "PX", String(NODE_TTL_MS)]);
    await this.pub.send("SADD", ["chat:nodes", this.node]);
    for (const other of (await this.pub.send("SMEMBERS", ["chat:nodes"])) as string[]) {
      if (other === this.node || (await this.pub.send("EXISTS", [`chat:alive:${other}`])) !== 0) continue;
      this.logger.warn("redis", { state: "node_expired", node: other });
      await this.presence("drop", other);
    }
  }

  async subscribe(room: string) {
    const channel = ROOM_CHANNEL + room;
    if (this.channels.has(channel)) return;
    this.channels.add(channel);
    // while Redis is down this fails; the reconnect subscribes every channel again
    if (this.sub.connected) await this.sub.subscribe(channel, this.listener()).catch((e) => this.logger.error("redis_subscribe", e));
  }

  unsubscribe(room: string) {
    const channel = ROOM_CHANNEL + room;
    this.channels.delete(channel);
    if (this.sub.connected) this.unsubscribeChannel(channel);
  }

  join(room: string, user: User) {
    if (this.pub.connected) this.presence("join", this.node, room, user.id, user.name).catch((e) => this.logger.error("redis_join", e));
  }

  leave(room: string, user: User) {
    if (this.pub.connected) this.presence("leave", this.node, room, user.id).catch((e) => this.logger.error("redis_leave", e));
  }

  // while Redis is away the other nodes' members are unknown: a room shows its own, and the reconnect resyncs
  async members(room: string) {
    if (!this.pub.connected) return [];
    const hash = (await this.pub.send("HGETALL", [`chat:presence:${room}`])) as Record<string, string> | null;
    return Object.entries(hash ?? {}).map(([id, name]) => ({ id, name }));
  }

  online(rooms: string[]) {
    if (!this.pub.connected) return Promise.resolve(rooms.map(() => 0));
    return Promise.all(rooms.map(async (r) => Number(await this.pub.send("HLEN", [`chat:presence:${r}`]))));
  }

  async register(members: [room: string, user: User][]) {
    await this.presence("sync", this.node, JSON.stringify(members.map(([room, user]) => [room, user.id, user.name])));
  }

  private publish(channel: string, payload: string) {
    if (this.pub.connected) this.pub.publish(channel, payload).catch((e) => this.logger.error("redis_publish", e));
  }

  publishMessage(room: string, entry: Entry) {
    this.publish(ROOM_CHANNEL + room, FanoutCodec.encode({ kind: "message", id: entry.seq, sentAt: Date.now() }, entry.frame));
  }

  publishTyping(room: string, frame: string) {
    this.publish(ROOM_CHANNEL + room, FanoutCodec.encode({ kind: "typing", node: this.node }, frame));
  }

  publishRename(user: User, previous: string, rooms: string[]) {
    this.publish(USERS_CHANNEL, FanoutCodec.encode({ kind: "renamed", node: this.node, user, previous }));
    if (rooms.length && this.pub.connected) this.presence("rename", this.node, user.id, ...rooms, user.name).catch((e) => this.logger.error("redis_rename", e));
  }

  publishAccess(event: AccessEvent) {
    this.publish(USERS_CHANNEL, FanoutCodec.encode({ kind: "access", node: this.node, event }));
  }

  // chat:stats holds each node's latest second (node → JSON); a node gone for STATS_KEPT seconds is dropped from it
  shareStats(sample: StatsSample) {
    if (this.pub.connected) this.pub.send("HSET", ["chat:stats", this.node, JSON.stringify(sample)]).catch((e) => this.logger.error("redis stats", e));
  }

  async nodeStats(): Promise<[string, StatsSample][]> {
    const hash = (await this.pub.send("HGETALL", ["chat:stats"])) as Record<string, string> | null;
    const forgotten = Date.now() - STATS_KEPT * STATS_EVERY_MS;
    const nodes: [string, StatsSample][] = [];
    for (const [node, json] of Object.entries(hash ?? {})) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(json);
      } catch {} // not ours: dropped below
      const sample = StatsSample.safeParse(parsed);
      if (!sample.success || sample.data.at < forgotten) await this.pub.send("HDEL", ["chat:stats", node]);
      else nodes.push([node, sample.data]);
    }
    return nodes;
  }

  metrics(): MetricLine[] {
    return [
      { name: "chat_node_info", type: "gauge", help: "This process", value: 1, labels: { node: this.node, cluster: "1" } },
      { name: "chat_redis_connected", type: "gauge", help: "1 while the Redis fan-out is connected and subscribed", value: this.connected ? 1 : 0 },
      { name: "chat_fanout_received_total", type: "counter", help: "Messages received from other nodes through Redis", value: this.received },
      { name: "chat_fanout_lag_ms", type: "gauge", help: "Publish-to-receive delay of the last message from Redis", value: this.lagMs },
    ];
  }

  async close() {
    this.closed = true;
    clearInterval(this.beat);
    clearTimeout(this.retry);
    this.sub.onclose = () => {};
    // removes this node's members from presence at once
    if (this.pub.connected) await this.presence("drop", this.node).catch((e) => this.logger.error("redis_drop", e));
    this.sub.close();
    this.pub.close();
  }
}

// ── Logs: one line per event, levels, and refusals counted into one line per reason a minute ──

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40 } as const;
export type Level = keyof typeof LEVELS;
export type LogLine = { time: string; level: Level; event: string } & Record<string, unknown>;
/** Receives one object per event; startServer's caller decides where it goes (stdout in main, an array in tests). */
export type Log = (line: LogLine) => void;

/** An error as one line: its message, code and causes (Bun nests the useful part, like ECONNREFUSED, in them). */
export function describeError(error: unknown): string {
  const parts: string[] = [];
  for (let e = error, depth = 0; e !== undefined && depth < 4; e = (e as Error)?.cause, depth++) {
    const code = (e as { code?: unknown })?.code;
    parts.push(`${e instanceof Error ? e.message : String(e)}${typeof code === "string" && !String(e).includes(code) ? ` (${code})` : ""}`);
  }
  return parts.join(": caused by ");
}

export class Logger {
  private readonly tallies = new Map<string, { event: string; reason: string; count: number; addresses: Map<string, number> }>();
  constructor(private readonly write: Log, private readonly level: Level = "info") {}
  enabled(level: Level) {
    return LEVELS[level] >= LEVELS[this.level];
  }
  private emit(level: Level, event: string, fields: Record<string, unknown>) {
    if (this.enabled(level)) this.write({ time: new Date().toISOString(), level, event, ...fields });
  }
  debug(event: string, fields: Record<string, unknown> = {}) { this.emit("debug", event, fields); }
  info(event: string, fields: Record<string, unknown> = {}) { this.emit("info", event, fields); }
  warn(event: string, fields: Record<string, unknown> = {}) { this.emit("warn", event, fields); }
  error(event: string, error: unknown, fields: Record<string, unknown> = {}) {
    this.emit("error", event, { ...fields, error: describeError(error) });
  }
  /** A refusal or rate limit: counted, and written by flush() as one line per reason (an attack cannot flood the log). */
  tally(event: "refused" | "rate_limited" | "slow_consumers", reason: string, address?: string) {
    const key = `${event} ${reason}`;
    const t = this.tallies.get(key) ?? { event, reason, count: 0, addresses: new Map() };
    this.tallies.set(key, t);
    t.count++;
    if (address && (t.addresses.has(address) || t.addresses.size < TALLY_ADDRESSES)) t.addresses.set(address, (t.addresses.get(address) ?? 0) + 1);
  }
  /** Every LOG_SUMMARY_MS and at stop: the counts since the last flush, busiest addresses first. */
  flush(periodMs: number) {
    for (const { event, reason, count, addresses } of this.tallies.values()) {
      const top = [...addresses].sort((a, b) => b[1] - a[1]).slice(0, TALLY_TOP).map(([address, n]) => ({ address, count: n }));
      this.emit("warn", event, { reason, count, periodMs: Math.round(periodMs), addresses: addresses.size, top });
    }
    this.tallies.clear();
  }
}

/** A log line for people: `15:04:05.123 WARN  refused reason=origin count=3`. */
export function prettyLine({ time, level, event, ...fields }: LogLine): string {
  const rest = Object.entries(fields).map(([k, v]) => `${k}=${typeof v === "string" && !/\s/.test(v) ? v : JSON.stringify(v)}`);
  return [time.slice(11, 23), level.toUpperCase().padEnd(5), event, ...rest].join(" ");
}

// ── Metrics: this process's counters, exposed at /metrics ─────────────────────

/** Why a request, upgrade or frame was refused, as /metrics labels them. */
const REFUSALS = ["sessions_per_address", "upgrades_per_address", "connections_per_address", "connections_per_user", "connections_total", "say_per_address", "renames_per_address", "requests_per_address", "login_failures"] as const;
export type Refusal = (typeof REFUSALS)[number];
/** Which rate limit refused a frame or request, as chat_rate_limited_total labels it (README "Metrics" names each one's setting). */
const RATE_LIMITS = ["say", "say_per_address", "rename", "renames_per_address", "join", "read", "history", "scrollback", "typing"] as const;
export type RateLimited = (typeof RATE_LIMITS)[number];

/** A histogram with fixed buckets, as Prometheus reads one: counts per bucket, their sum and count. */
export class Histogram {
  readonly counts: number[]; // per bucket (not cumulative); the last one is +Inf
  sum = 0;
  count = 0;
  constructor(readonly bounds: number[] = LATENCY_BUCKETS) {
    this.counts = new Array(bounds.length + 1).fill(0);
  }

  observe(value: number) {
    let i = 0;
    while (i < this.bounds.length && value > this.bounds[i]) i++;
    this.counts[i]++;
    this.sum += value;
    this.count++;
  }

  /** The q-quantile of what `counts` holds (a difference of two copies gives one second's), interpolated within its
   * bucket as PromQL's histogram_quantile does; undefined without observations. */
  quantile(q: number, counts = this.counts): number | undefined {
    const total = counts.reduce((a, b) => a + b, 0);
    if (!total) return;
    const rank = q * total;
    for (let i = 0, below = 0; i < counts.length; below += counts[i++]) {
      if (below + counts[i] < rank) continue;
      if (i === this.bounds.length) return this.bounds.at(-1); // in +Inf: the highest bound is all that is known
      const low = i === 0 ? 0 : this.bounds[i - 1];
      return low + (this.bounds[i] - low) * ((rank - below) / counts[i]);
    }
  }

  lines(name: string, help: string): MetricLine[] {
    let cumulative = 0;
    const buckets = this.counts.map((n, i): MetricLine => {
      cumulative += n;
      return { name, type: "histogram", help, suffix: "_bucket", value: cumulative, labels: { le: i < this.bounds.length ? String(this.bounds[i]) : "+Inf" } };
    });
    return [...buckets, { name, type: "histogram", help, suffix: "_sum", value: this.sum }, { name, type: "histogram", help, suffix: "_count", value: this.count }];
  }
}

/** The process as Prometheus's client libraries name it: CPU, memory, descriptors, start time (open fds on Linux only). */
function processLines(startTime: number, maxFds: number): MetricLine[] {
  const { user, system } = process.cpuUsage();
  const lines: MetricLine[] = [
    { name: "process_cpu_seconds_total", type: "counter", help: "User and system CPU time spent, in seconds", value: (user + system) / 1e6 },
    { name: "process_resident_memory_bytes", type: "gauge", help: "Resident memory size in bytes", value: process.memoryUsage.rss() },
    { name: "process_heap_bytes", type: "gauge", help: "JavaScript heap in use, in bytes", value: process.memoryUsage().heapUsed },
    { name: "process_start_time_seconds", type: "gauge", help: "Start time of the process since the Unix epoch, in seconds", value: startTime },
    { name: "process_max_fds", type: "gauge", help: "Maximum number of open file descriptors", value: maxFds },
  ];
  try {
    lines.push({ name: "process_open_fds", type: "gauge", help: "Number of open file descriptors", value: readdirSync("/proc/self/fd").length });
  } catch {} // not Linux
  return lines;
}

/** This process's counters and histograms, exposed at /metrics. */
export class Metrics {
  readonly refused = Object.fromEntries(REFUSALS.map((r) => [r, 0])) as Record<Refusal, number>;
  readonly rateLimited = Object.fromEntries(RATE_LIMITS.map((r) => [r, 0])) as Record<RateLimited, number>;
  /** from a batch's commit in the store to the publish of its frames on this node */
  readonly delivery = new Histogram();
  /** a client frame's parse, checks and dispatch (what runs before the socket's next frame) */
  readonly frames = new Histogram();
  readonly startTime = Math.round(Date.now() / 1000 - process.uptime());
  messagesReceived = 0;
  messagesPublished = 0;
  framesRejected = 0;
  slowConsumersClosed = 0;
  connectionsRefused = 0;
  storeErrors = 0;
  gapsFilled = 0;
  loginFailures = 0;
  loopLagMs = 0; // the worst timer delay of the last second (see StatsSampler)

  /** A rate limit refused something. */
  limited(reason: RateLimited) {
    this.rateLimited[reason]++;
  }

  lines(gauges: { connections: number; rooms: number; maxFds: number }): MetricLine[] {
    const counter = (name: string, help: string, value: number): MetricLine => ({ name, type: "counter", help, value });
    return [
      { name: "chat_build_info", type: "gauge", help: "The version running, and the Bun it runs on", value: 1, labels: { version: VERSION, bun: Bun.version } },
      ...processLines(this.startTime, gauges.maxFds),
      { name: "chat_event_loop_lag_seconds", type: "gauge", help: `The worst delay of a ${LAG_TICK_MS} ms timer over the last second`, value: this.loopLagMs / 1000 },
      { name: "chat_connections", type: "gauge", help: "Open WebSocket connections", value: gauges.connections },
      { name: "chat_rooms", type: "gauge", help: "Rooms with members on this process", value: gauges.rooms },
      counter("chat_messages_received_total", "Chat messages accepted from clients", this.messagesReceived),
      counter("chat_messages_published_total", "Chat messages broadcast to rooms", this.messagesPublished),
      counter("chat_frames_rejected_total", "Client frames answered with bad_request", this.framesRejected),
      counter("chat_slow_consumers_closed_total", "Sockets closed with unsent data buffered (slow or dead readers)", this.slowConsumersClosed),
      counter("chat_connections_refused_total", "Connections refused by a connection limit", this.connectionsRefused),
      counter("chat_store_errors_total", "Failed writes of chat messages", this.storeErrors),
      counter("chat_gaps_filled_total", "Out-of-order arrivals filled from the store", this.gapsFilled),
      counter("chat_login_failures_total", "Logins refused for a wrong name or password", this.loginFailures),
      ...RATE_LIMITS.map((reason): MetricLine => ({
        name: "chat_rate_limited_total", type: "counter", help: "Frames and requests refused by a rate limit, by the limit", value: this.rateLimited[reason], labels: { reason },
      })),
      ...REFUSALS.map((reason): MetricLine => ({
        name: "chat_refused_total", type: "counter", help: "Requests, upgrades and frames refused by a limit, by reason", value: this.refused[reason], labels: { reason },
      })),
      ...this.delivery.lines("chat_delivery_seconds", "From the store's commit of a change to the publish of its frame on this node, in seconds"),
      ...this.frames.lines("chat_frame_handling_seconds", "Handling of one client frame (parse, checks, dispatch), in seconds"),
    ];
  }
}

/** Event-loop lag: how late a LAG_TICK_MS timer fires; the worst of each second goes to metrics.loopLagMs. */
function watchLoopLag(metrics: Metrics): Timer {
  let expected = performance.now() + LAG_TICK_MS;
  let worst = 0;
  let ticks = 0;
  const timer = setInterval(() => {
    const now = performance.now();
    worst = Math.max(worst, now - expected);
    expected = now + LAG_TICK_MS;
    if (++ticks < 1000 / LAG_TICK_MS) return;
    metrics.loopLagMs = worst;
    worst = ticks = 0;
  }, LAG_TICK_MS);
  timer.unref();
  return timer;
}

/** The newest STATS_KEPT samples of one node, oldest first. */
class StatsRing {
  private readonly samples: StatsSample[] = [];
  push(sample: StatsSample) {
    if (sample.at <= (this.samples.at(-1)?.at ?? -Infinity)) return; // the same second read again
    this.samples.push(sample);
    if (this.samples.length > STATS_KEPT) this.samples.shift();
  }
  since(at: number): StatsSample[] {
    let i = this.samples.length;
    while (i > 0 && this.samples[i - 1].at > at) i--;
    return this.samples.slice(i);
  }
  get latest(): StatsSample | undefined {
    return this.samples.at(-1);
  }
}

type StatsUnits = { metrics: Metrics; connections: Connections; rooms: Rooms; fanout: Fanout; logger: Logger };

/** The admin console's data: every STATS_EVERY_MS this node samples itself, shares the sample through the fan-out and
 * keeps the other nodes' latest ones, so each node holds the last ten minutes of every node it has heard of. */
export class StatsSampler {
  private readonly rings = new Map<string, StatsRing>();
  private before: { messages: number; refused: Record<string, number>; delivery: number[] } | undefined;

  constructor(private readonly node: string, private readonly units: StatsUnits) {}

  start(): Timer {
    const timer = setInterval(() => void this.tick().catch((e) => this.units.logger.error("stats", e)), STATS_EVERY_MS);
    timer.unref();
    return timer;
  }

  async tick(now = Date.now()) {
    const sample = this.sample(now);
    this.ring(this.node).push(sample);
    this.units.fanout.shareStats(sample);
    for (const [node, other] of await this.units.fanout.nodeStats()) if (node !== this.node) this.ring(node).push(other);
  }

  private ring(node: string): StatsRing {
    let ring = this.rings.get(node);
    if (!ring) this.rings.set(node, (ring = new StatsRing()));
    return ring;
  }

  /** This node's last second: gauges now, counters as the difference from the previous sample. */
  private sample(at: number): StatsSample {
    const { metrics, connections, rooms } = this.units;
    const refusedTotals: Record<string, number> = { ...metrics.rateLimited, ...metrics.refused };
    const now = { messages: metrics.messagesReceived, refused: refusedTotals, delivery: [...metrics.delivery.counts] };
    const was = this.before ?? { messages: 0, refused: {}, delivery: now.delivery.map(() => 0) }; // counters start at 0 with the process
    this.before = now;
    const refused = Object.fromEntries(Object.entries(refusedTotals).map(([k, n]): [string, number] => [k, n - (was.refused[k] ?? 0)]).filter(([, n]) => n > 0));
    const delivered = now.delivery.map((n, i) => n - was.delivery[i]);
    const ms = (q: number) => {
      const s = metrics.delivery.quantile(q, delivered);
      return s === undefined ? null : Math.round(s * 1e6) / 1e3;
    };
    return {
      at, connections: connections.count, rooms: rooms.size, messages: now.messages - was.messages, p50: ms(0.5), p99: ms(0.99), refused,
      rss: process.memoryUsage.rss(), heap: process.memoryUsage().heapUsed, lagMs: Math.round(metrics.loopLagMs * 10) / 10,
    };
  }

  /** Every node's samples after `since`; a node without one for STATS_STALE_MS is down. */
  view(since: number, now = Date.now()) {
    return [...this.rings].map(([node, ring]) => ({
      node, self: node === this.node, up: node === this.node || now - (ring.latest?.at ?? 0) <= STATS_STALE_MS, samples: ring.since(since),
    }));
  }
}

/** Prometheus text format 0.0.4. */
function renderMetrics(lines: MetricLine[]): string {
  return lines
    .map(({ name, type, help, value, labels, suffix = "" }, i) => {
      const tags = labels ? `{${Object.entries(labels).map(([k, v]) => `${k}="${v.replace(/[\\"\n]/g, (c) => (c === "\n" ? "\\n" : `\\${c}`))}"`).join(",")}}` : "";
      const head = lines[i - 1]?.name === name ? "" : `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n`;
      return `${head}${name}${suffix}${tags} ${value}\n`;
    })
    .join("");
}

// ── Connections: users with open sockets on this node, and the limits on them ─

type LocalUser = { id: string; name: string; registered: boolean; admin: boolean; sockets: ChatSocket[] }; // a user has a few tabs
/** Per socket. Plain arrays: a socket holds a few rooms, and per-socket memory is what idle servers are made of. */
type SocketData = {
  user: LocalUser;
  sid: string; // the session it was opened with
  handle: string; // that session's public name (revocations name it)
  address: string; // the client address (clientAddress), for the per-address limits
  rooms: string[]; // joined: history sent, subscribed
  joining: string[] | null; // waiting for the room to load (usually null)
  historyBytes: TokenBucket | null; // HISTORY_BYTES, made on the first history sent
  buffered: number; // unsent bytes when last sampled
  pressured: boolean; // a direct send met backpressure since the last drain
  closed: boolean;
  opened: number; // performance.now() at the upgrade, for the close line's duration
};
type ChatSocket = ServerWebSocket<SocketData>;
type Refused = { status: 429 | 503; code: ErrorCode; message: string; retryAfterMs?: number; reason?: Refusal };

const userOf = (ws: ChatSocket): User => ({ id: ws.data.user.id, name: ws.data.user.name });

/** Removes a room from one of a socket's lists; true if it was there. */
function removeFrom(data: SocketData, list: "rooms" | "joining", room: string): boolean {
  const names = data[list];
  const i = names ? names.indexOf(room) : -1;
  if (i < 0) return false;
  names!.splice(i, 1);
  if (list === "joining" && names!.length === 0) data.joining = null;
  return true;
}

export class Connections {
  count = 0; // open sockets; each is in its user's `sockets`
  private readonly users = new Map<string, LocalUser>();
  private readonly perAddress = new Map<string, number>(); // open or opening sockets per client address
  constructor(private readonly limits: Pick<Config, "maxConnections" | "maxConnectionsPerUser" | "maxConnectionsPerAddress">, private readonly metrics: Metrics) {}

  /** The new socket's data, or why it may not open. Nothing may await between this and the upgrade, or a burst gets past it. */
  admit(session: Session, address: string): SocketData | Refused {
    const refused = this.refuse(session, address);
    if (refused) {
      this.metrics.connectionsRefused++;
      this.metrics.refused[refused[0]]++;
      return { ...refused[1], reason: refused[0] };
    }
    let user = this.users.get(session.id);
    if (!user) this.users.set(session.id, (user = { id: session.id, name: session.name, registered: session.registered, admin: session.admin, sockets: [] }));
    this.perAddress.set(address, (this.perAddress.get(address) ?? 0) + 1);
    return { user, sid: session.sid, handle: session.handle, address, rooms: [], joining: null, historyBytes: null, buffered: 0, pressured: false, closed: false, opened: performance.now() };
  }

  private refuse(session: Session, address: string): [Refusal, Refused] | undefined {
    const { maxConnections, maxConnectionsPerUser, maxConnectionsPerAddress } = this.limits;
    if (this.count >= maxConnections) return ["connections_total", { status: 503, code: "unavailable", message: "Too many connections, try again later" }];
    if ((this.perAddress.get(address) ?? 0) >= maxConnectionsPerAddress) {
      return ["connections_per_address", { status: 429, code: "limit_exceeded", message: `At most ${maxConnectionsPerAddress} connections per address` }];
    }
    if ((this.users.get(session.id)?.sockets.length ?? 0) >= maxConnectionsPerUser) {
      return ["connections_per_user", { status: 429, code: "limit_exceeded", message: `At most ${maxConnectionsPerUser} connections per user` }];
    }
  }

  /** The upgrade did not happen after all. */
  abandon(data: SocketData) {
    if (data.user.sockets.length === 0) this.users.delete(data.user.id);
    this.release(data.address);
  }

  opened(ws: ChatSocket) {
    this.count++;
    ws.data.user.sockets.push(ws);
  }

  closed(ws: ChatSocket) {
    const { user } = ws.data;
    this.count--;
    user.sockets.splice(user.sockets.indexOf(ws), 1);
    if (user.sockets.length === 0) this.users.delete(user.id);
    this.release(ws.data.address);
  }

  private release(address: string) {
    const open = (this.perAddress.get(address) ?? 1) - 1;
    if (open > 0) this.perAddress.set(address, open);
    else this.perAddress.delete(address);
  }

  user(id: string): LocalUser | undefined {
    return this.users.get(id);
  }

  /** Applies a change of access to this node's sockets of the user. */
  apply(event: Exclude<AccessEvent, { what: "room" | "read" }>) {
    const user = this.users.get(event.user);
    if (!user) return;
    if (event.what === "account") {
      user.registered = event.registered;
      user.admin = event.admin;
      return;
    }
    const reason = event.code === 4003 ? "banned" : "signed out";
    for (const ws of [...user.sockets]) if (!event.handles || event.handles.includes(ws.data.handle)) ws.close(event.code, reason);
  }

  *all(): Generator<ChatSocket> {
    for (const user of this.users.values()) yield* user.sockets;
  }

  /** This node's sockets joined to a room. */
  *socketsIn(room: Room): Generator<ChatSocket> {
    for (const userId of room.localUsers.keys()) {
      for (const ws of this.users.get(userId)?.sockets ?? []) if (ws.data.rooms.includes(room.name)) yield ws;
    }
  }

  /** Samples each socket's unsent bytes, so a close can tell a slow reader from a clean exit. */
  sampleBuffered() {
    for (const ws of this.all()) ws.data.buffered = ws.getBufferedAmount();
  }
}

// ── Rooms: each room's state, recent messages, presence and broadcast on this node ──

/** Bun's pub/sub topics. Publishing needs the server, which Bun.serve makes from handlers that use the rooms:
 * startServer binds it right after, and before that no socket exists to publish to. */
class Topics {
  private server: Server<SocketData> | null = null;
  bind(server: Server<SocketData>) {
    this.server = server;
  }
  /** To every subscriber, or every one but `except`; Bun's status: ≤ 0 when some reader has unsent bytes. */
  publish(topic: string, frame: string, except?: ChatSocket): number {
    return except ? except.publish(topic, frame) : (this.server?.publish(topic, frame) ?? 1);
  }
}

/**
 * - loading: its recent messages are being read from the store;
 * - live: each arrival is delivered at once, in id order;
 * - catching-up: missing ids are being read from the store (a gap, or messages another node stored);
 * - failed: it could not load; it is gone from the registry, and its joiners get unavailable.
 * Arrivals while loading or catching up are held, and delivered in order after.
 */
type RoomState = "loading" | "live" | "catching-up" | "failed";

export class Room {
  readonly topic: string;
  state: RoomState = "loading";
  /** local sockets joined or joining: the room stays loaded while there is one */
  sockets = 0;
  /** user id → that user's joined sockets on this node */
  readonly localUsers = new Map<string, number>();
  /** presence: everyone in the room, on every node, as this node knows it now */
  readonly members = new Map<string, User>();
  /** presence as this node's sockets were last told it; presence_diff frames carry members − published and back */
  private published = new Map<string, User>();
  private publishedJson: string | null = null; // `published` as JSON array elements, until it changes: each joiner's list
  private changed = new Set<string>(); // user ids whose presence changed since the last presence_diff
  private presenceTimer: Timer | null = null;
  /** the room's head: the last seq delivered here. Every change (a message, an edit, a deletion, a reaction) takes
   * the next one, cluster-wide, without gaps; a new message's id is its seq. */
  lastId = 0;
  /** who may join, who moderates, who is banned or muted: read with the room, re-read when a node changes them */
  rules!: RoomRules;
  private recent: Entry[] = []; // the newest changes in seq order, enough for any join or recovery
  private refs = new Map<string, Map<string, number>>(); // user id → ref → message id, for the messages in recent: say's dedupe
  private coveredFrom = 0; // recent holds the latest state of every message changed after this seq
  private held: Entry[] = [];
  private settled: Promise<void>; // the load or catch-up under way
  private plainHistory: Page | null = null; // the history frame of a join without since, until the next message
  private lastPage: { after: number; page: Page } | null = null; // the last page asked for, until the next message: after a restart, a room's clients all ask for the same
  private sampledAt = 0; // when unsent bytes were last sampled after a publish met backpressure

  constructor(readonly name: string, private readonly registry: Rooms) {
    this.topic = TOPIC_PREFIX + name;
    this.settled = this.load();
  }

  /** Subscribes first, then reads, so no message falls between the two. */
  private async load() {
    const { store, fanout, logger } = this.registry.units;
    try {
      await fanout.subscribe(this.name);
      for (const user of await fanout.members(this.name)) this.setMember(user);
      this.published = new Map(this.members); // nobody here has been told anything yet: a joiner gets the list
      this.publishedJson = null;
      this.rules = await store.access.rules(this.name);
      // before the tail: a message stored between the two reads is in the tail; the tail is empty once all expired
      const stored = await store.lastId(this.name);
      const tail = await store.tail(this.name, this.registry.keep);
      this.recent = tail.map(entryOfStored);
      for (const entry of this.recent) this.noteRef(entry);
      this.coveredFrom = tail.length === this.registry.keep ? tail[0].seq - 1 : 0;
      this.lastId = Math.max(this.recent.at(-1)?.seq ?? 0, stored);
    } catch (error) {
      logger.error("load_room", error, { room: this.name });
      this.state = "failed";
      this.registry.forget(this);
      return;
    }
    await this.deliverHeld();
    this.state = "live";
    this.registry.release(this); // its joiners may have gone meanwhile
  }

  /** Resolves once the room is live (true), or failed to load (false). */
  /** Reads the rules again (another node, or an HTTP request here, changed them). */
  async reloadRules() {
    if (!(await this.ready())) return;
    try {
      this.rules = await this.registry.units.store.access.rules(this.name);
    } catch (error) {
      this.registry.units.logger.error("load_rules", error, { room: this.name });
    }
  }

  async ready(): Promise<boolean> {
    while (this.state === "loading" || this.state === "catching-up") await this.settled;
    return this.state === "live";
  }

  /** A stored change, from this node or another: delivered in seq order, exactly once. */
  receive(entry: Entry) {
    if (this.state !== "live") return void this.held.push(entry);
    if (entry.seq <= this.lastId) return;
    if (entry.seq === this.lastId + 1) return this.deliver(entry);
    // a gap: seqs commit in order, so what is missing is in the store
    this.held.push(entry);
    this.catchUp();
  }

  /** Delivers whatever the store has past lastId: another node may have stored messages this one has not heard of. */
  refresh(): Promise<void> {
    return this.state === "live" ? this.catchUp(true) : this.settled;
  }

  private catchUp(toNewest = false): Promise<void> {
    this.state = "catching-up";
    this.settled = (async () => {
      if (toNewest) this.held.push(...((await this.read(this.lastId, Number.MAX_SAFE_INTEGER)) ?? []));
      await this.deliverHeld();
      this.state = "live";
    })();
    return this.settled;
  }

  /**
   * Delivers held arrivals in seq order, reading what is missing from the store: the current state of each message
   * whose latest change falls in the gap (a change superseded by a later one is covered by it). A gap the store has
   * nothing for in GAP_ATTEMPTS reads is skipped: its clients see the jump and ask for the page after it.
   */
  private async deliverHeld() {
    let failures = 0;
    while (this.held.length) {
      const queue = this.held.sort((a, b) => a.seq - b.seq);
      this.held = [];
      let i = 0;
      for (; i < queue.length && queue[i].seq <= this.lastId + 1; i++) if (queue[i].seq === this.lastId + 1) this.deliver(queue[i]);
      if (i === queue.length) continue;
      const rest = queue.slice(i);
      const missing = await this.read(this.lastId, rest[0].seq);
      if (missing?.length) {
        this.registry.units.metrics.gapsFilled++;
        for (const entry of missing) this.deliver(entry);
        this.lastId = rest[0].seq - 1; // the rest of the gap was superseded: its messages' states come later
      } else if (++failures >= GAP_ATTEMPTS) {
        this.registry.units.logger.info("gap_skipped", { room: this.name, from: this.lastId + 1, to: rest[0].seq - 1 });
        this.lastId = rest[0].seq - 1;
      } else await Bun.sleep(GAP_RETRY_MS * failures);
      this.held.push(...rest);
    }
  }

  /** Stored changes with after < seq < before, as their messages' current states; undefined when the store fails (logged). */
  private async read(after: number, before: number): Promise<Entry[] | undefined> {
    try {
      return (await this.registry.units.store.between(this.name, after, before)).map(entryOfStored);
    } catch (error) {
      this.registry.units.logger.error("read_room", error, { room: this.name });
      return undefined;
    }
  }

  private deliver(entry: Entry) {
    const { keep } = this.registry;
    this.lastId = entry.seq;
    this.recent.push(entry);
    this.noteRef(entry);
    if (this.recent.length >= keep * 2) {
      this.coveredFrom = this.recent[this.recent.length - keep - 1].seq;
      for (const old of this.recent.slice(0, -keep)) this.forgetRef(old.state);
      this.recent = this.recent.slice(-keep);
    }
    this.plainHistory = null;
    this.lastPage = null;
    const own = entry.own && !entry.own.ws.data.closed && entry.own.ws.data.rooms.includes(this.name) ? entry.own : undefined;
    this.broadcast(entry.frame, own?.ws);
    if (own) sendFrame(own.ws, own.frame); // the requester's copy, with its ref
    const { metrics } = this.registry.units;
    metrics.messagesPublished++;
    if (entry.committedAt !== undefined) metrics.delivery.observe((performance.now() - entry.committedAt) / 1000);
  }

  // nested maps rather than one keyed by user and ref: no key string is built per message
  private noteRef(entry: Entry) {
    const { ref, user, id } = entry.state;
    if (!ref || entry.seq !== id) return;
    let mine = this.refs.get(user.id);
    if (!mine) this.refs.set(user.id, (mine = new Map()));
    mine.set(ref, id);
  }

  private forgetRef({ ref, user, id }: Message) {
    const mine = ref ? this.refs.get(user.id) : undefined;
    if (!mine || mine.get(ref!) !== id) return;
    mine.delete(ref!);
    if (!mine.size) this.refs.delete(user.id);
  }

  /** The message this user already sent here with this ref, in its current state, if it is among the recent ones. */
  sentWithRef(userId: string, ref: string): Entry | undefined {
    const id = this.refs.get(userId)?.get(ref);
    if (id === undefined) return;
    for (let i = this.recent.length - 1; i >= 0; i--) if (this.recent[i].state.id === id) return this.recent[i];
  }

  /** Publishes a frame to the room's sockets on this node (all, or all but `except`). */
  broadcast(frame: string, except?: ChatSocket) {
    // ≤ 0: some reader has unsent bytes. Bun closes a reader that passes the limit during a later publish, and the
    // BUFFER_SAMPLE_MS sampler can miss one that fills up faster, so note them now
    const { topics, connections } = this.registry.units;
    if (topics.publish(this.topic, frame, except) > 0) return;
    const now = performance.now();
    if (now - this.sampledAt < BACKPRESSURE_SAMPLE_MS) return;
    this.sampledAt = now;
    for (const ws of connections.socketsIn(this)) ws.data.buffered = ws.getBufferedAmount();
  }

  /** The history frame for a join, from the recent changes: exact and synchronous. With `since`, what changed after
   * it (see page); without, the newest HISTORY_ON_JOIN messages, in their current state, that fit HISTORY_PAGE_BYTES. */
  history(since: number | undefined): Page {
    if (since !== undefined && since <= this.lastId) return this.page(since);
    if (since === undefined && this.plainHistory) return this.plainHistory;
    // a fresh join, or a client ahead of the server (its database was reset): the newest messages
    const { historyOnJoin, historyPageBytes } = this.registry.limits;
    const latest = new Map<number, Entry>(); // message id → its latest change here
    for (let i = this.recent.length - 1; i >= 0; i--) if (!latest.has(this.recent[i].state.id)) latest.set(this.recent[i].state.id, this.recent[i]);
    const newest = [...latest.values()].sort((a, b) => b.state.id - a.state.id);
    const shown: Entry[] = [];
    for (let bytes = HISTORY_OVERHEAD, i = 0; i < Math.min(historyOnJoin, newest.length); i++) {
      bytes += bytesOf(newest[i]) + 1;
      if (bytes > historyPageBytes && shown.length) break; // one message always fits
      shown.push(newest[i]);
    }
    const complete = since === undefined && this.coveredFrom === 0 && shown.length === newest.length;
    const page = historyFrame(this.name, this.lastId, shown.reverse(), [], { complete, more: false });
    if (since === undefined) this.plainHistory = page;
    return page;
  }

  /**
   * What changed after `after`, among the last RECOVERY_LIMIT changes, as many as fit HISTORY_PAGE_BYTES: each changed
   * message once, in its latest state within the page — `messages` for those made after `after`, `updates` for older
   * ones. The frame's seq is the last change it covers; complete when nothing between `after` and its first is
   * missing; more when later changes remain.
   */
  page(after: number): Page {
    if (this.lastPage?.after === after) return this.lastPage.page;
    const page = this.buildPage(after);
    this.lastPage = { after, page };
    return page;
  }

  private buildPage(after: number): Page {
    const { recent, lastId } = this;
    const { recoveryLimit, historyPageBytes } = this.registry.limits;
    const from = Math.max(after, lastId - recoveryLimit, this.coveredFrom);
    let start = recent.length;
    while (start > 0 && recent[start - 1].seq > from) start--;
    const inPage = new Map<number, Entry>(); // message id → its latest change in the page
    let bytes = HISTORY_OVERHEAD;
    let end = start;
    for (; end < recent.length; end++) {
      const entry = recent[end];
      const replaced = inPage.get(entry.state.id);
      const grown = bytes + bytesOf(entry) + 1 - (replaced ? bytesOf(replaced) + 1 : 0);
      if (grown > historyPageBytes && inPage.size) break; // one message always fits
      inPage.set(entry.state.id, entry);
      bytes = grown;
    }
    const seq = end > start ? recent[end - 1].seq : Math.max(from, after);
    const changed = [...inPage.values()].sort((a, b) => a.state.id - b.state.id);
    const made = changed.filter((e) => e.state.id > after);
    const updates = changed.filter((e) => e.state.id <= after);
    return historyFrame(this.name, seq, made, updates, { complete: from === after, more: seq < lastId });
  }

  /** Counts a joined socket of a user: true for the user's first here. */
  addLocal(userId: string): boolean {
    const sockets = (this.localUsers.get(userId) ?? 0) + 1;
    this.localUsers.set(userId, sockets);
    return sockets === 1;
  }

  /** Uncounts a socket that left: true for the user's last here. */
  removeLocal(userId: string): boolean {
    const sockets = (this.localUsers.get(userId) ?? 1) - 1;
    if (sockets > 0) this.localUsers.set(userId, sockets);
    else this.localUsers.delete(userId);
    return sockets === 0;
  }

  /** A user arrived (cluster-wide): told to this node's sockets in the next presence_diff. */
  addMember(user: User) {
    if (this.members.has(user.id)) return;
    this.setMember(user);
    this.presenceChanged(user.id);
  }

  /** A user went (cluster-wide): told in the next presence_diff. */
  removeMember(user: User) {
    if (!this.members.delete(user.id)) return;
    this.registry.memberRemoved(this, user.id);
    this.presenceChanged(user.id);
  }

  /** A member's new name, everywhere it is kept (a rename is its own frame, never a leave and a join); false if not here. */
  rename(user: User): boolean {
    const here = this.members.has(user.id) || this.published.has(user.id);
    if (this.members.has(user.id)) this.members.set(user.id, user);
    if (this.published.has(user.id)) {
      this.published.set(user.id, user);
      this.publishedJson = null;
    }
    return here;
  }

  /** The presence frame a joiner gets: what the others here were told, and the joiner (whom the next diff may name
   * again). The list is serialized once per presence_diff, not per joiner: in a storm, M joiners of a room each got
   * a list of up to M users. */
  presenceFrame(joiner: User): string {
    const users = (this.publishedJson ??= Array.from(this.published.values(), userJson).join(","));
    const added = this.published.has(joiner.id) ? "" : `${users ? "," : ""}${userJson(joiner)}`;
    return `{"type":"presence","room":${JSON.stringify(this.name)},"users":[${users}${added}]}`;
  }

  /** At most one presence_diff per PRESENCE_INTERVAL_MS, and no timer while nothing changes. */
  private presenceChanged(userId: string) {
    this.changed.add(userId);
    if (this.presenceTimer) return;
    this.presenceTimer = setTimeout(() => this.publishPresence(), this.registry.limits.presenceIntervalMs);
    this.presenceTimer.unref();
  }

  /** Tells this node's sockets every first arrival and last departure since the previous diff (both in one interval: neither). */
  private publishPresence() {
    this.presenceTimer = null;
    const joins: User[] = [];
    const leaves: User[] = [];
    for (const id of this.changed) {
      const now = this.members.get(id);
      const told = this.published.get(id);
      if (now && !told) {
        joins.push(now);
        this.published.set(id, now);
      } else if (!now && told) {
        leaves.push(told);
        this.published.delete(id);
      }
    }
    this.changed.clear();
    if (!joins.length && !leaves.length) return;
    this.publishedJson = null;
    this.broadcast(JSON.stringify({ type: "presence_diff", room: this.name, joins, leaves } satisfies ServerMessage));
  }

  /** The room is dropped from this node, or the server stops: no more diffs. */
  stopPresence() {
    if (this.presenceTimer) clearTimeout(this.presenceTimer);
    this.presenceTimer = null;
  }

  /** Adds or renames a member; the registry indexes who is where. */
  setMember(user: User) {
    this.members.set(user.id, user);
    this.registry.memberAdded(this, user.id);
  }
}

const NO_ROOMS: ReadonlySet<Room> = new Set();

/** A member's JSON, made once per User object (a rename makes a new one): a room's list is rebuilt after every
 * presence_diff, of mostly the same users. */
const userJsons = new WeakMap<User, string>();
function userJson(user: User): string {
  let json = userJsons.get(user);
  if (json === undefined) userJsons.set(user, (json = JSON.stringify(user)));
  return json;
}

type RoomUnits = { store: Store; fanout: Fanout; topics: Topics; connections: Connections; metrics: Metrics; logger: Logger };

/** The rooms loaded on this node: loaded on the first local join, dropped when the last local socket leaves. */
export class Rooms {
  private readonly rooms = new Map<string, Room>();
  private readonly byUser = new Map<string, Set<Room>>(); // user id → loaded rooms whose members hold the user
  private readonly busy = new Leaders(ROOM_LIST_LIMIT); // the loaded rooms with the most members, for the room list
  /** recent messages kept per room */
  readonly keep: number;

  constructor(readonly units: RoomUnits, readonly limits: Pick<Config, "historyOnJoin" | "recoveryLimit" | "historyPageBytes" | "presenceIntervalMs">) {
    this.keep = Math.max(limits.historyOnJoin, limits.recoveryLimit);
  }

  get(name: string): Room | undefined {
    return this.rooms.get(name);
  }

  /** The room, loading it on first use. */
  open(name: string): Room {
    let room = this.rooms.get(name);
    if (!room) this.rooms.set(name, (room = new Room(name, this)));
    return room;
  }

  /** Drops a live room that no local socket uses any more. */
  release(room: Room) {
    if (room.state === "live" && room.sockets === 0) this.forget(room);
  }

  /** Drops a room from this node: released, or failed to load. */
  forget(room: Room) {
    room.stopPresence();
    this.rooms.delete(room.name);
    this.units.fanout.unsubscribe(room.name);
    for (const userId of room.members.keys()) this.memberRemoved(room, userId);
    this.busy.remove(room.name);
  }

  memberAdded(room: Room, userId: string) {
    if (this.rooms.get(room.name) !== room) return; // a room that failed to load is no longer listed
    let rooms = this.byUser.get(userId);
    if (!rooms) this.byUser.set(userId, (rooms = new Set()));
    rooms.add(room);
    this.busy.offer(room.name, room.members.size);
  }

  memberRemoved(room: Room, userId: string) {
    const rooms = this.byUser.get(userId);
    if (rooms?.delete(room) && rooms.size === 0) this.byUser.delete(userId);
    if (this.rooms.get(room.name) === room) this.busy.offer(room.name, room.members.size);
  }

  /** Up to ROOM_LIST_LIMIT loaded rooms, those with the most members. */
  busiest(): Room[] {
    return this.busy.top().map(([name]) => this.rooms.get(name)!);
  }

  /** The rooms loaded here whose members hold the user: what a rename touches. */
  roomsOf(userId: string): ReadonlySet<Room> {
    return this.byUser.get(userId) ?? NO_ROOMS;
  }

  /** The server stops: no room timer may outlive it. */
  close() {
    for (const room of this.rooms.values()) room.stopPresence();
  }

  values() {
    return this.rooms.values();
  }

  get size() {
    return this.rooms.size;
  }
}

// ── The say queue: accepted messages are stored together, then delivered; nothing unstored is broadcast ──

/** A new message, or a change of one, with the socket that asked. */
/** A change from the admin console has no socket: `done` hears how it went (undefined: the store failed). */
type Pending = (NewMessage & { kind: "say"; ws: ChatSocket }) | (Change & { ws?: ChatSocket; ref?: string; done?: (changed: Changed | undefined) => void });

/** Who a text mentions (user ids); a resolver the store answers. */
export type Mentions = (text: string) => Promise<string[]>;

export class SayQueue {
  private pending: Pending[] = [];
  private flushing: Promise<void> | null = null;
  private scheduled = false;

  constructor(
    private readonly store: Store,
    private readonly rooms: Rooms,
    private readonly fanout: Fanout,
    private readonly metrics: Metrics,
    private readonly logger: Logger,
    private readonly mentions: Mentions = async () => [],
  ) {}

  push(message: Pending) {
    this.pending.push(message);
    this.schedule();
  }

  /** Flushes after one more I/O poll: frames a client wrote on several sockets at once arrive microseconds
   * apart, and share one commit and one round of sends (README, "Where the time went"). */
  private schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() =>
      setImmediate(() => {
        this.scheduled = false;
        void this.flush();
      }),
    );
  }

  /** Runs the flush loop unless it runs already. (Clearing `flushing` inside the loop would run before the
   * assignment when the queue is already empty, and leave a settled promise that blocks all later flushes.) */
  flush(): Promise<void> {
    return (this.flushing ??= this.run().finally(() => (this.flushing = null)));
  }

  /** Stores and delivers everything accepted so far (at shutdown). */
  async drain() {
    while (this.flushing || this.pending.length) await this.flush();
  }

  /** In arrival order, in one write (one transaction on SQLite): with changes among them, new messages still share a
   * commit (stored apart, a change every tenth frame made commits of nine messages). */
  private async run() {
    while (this.pending.length) {
      const taken = this.pending;
      this.pending = [];
      const batch = await this.resolve(taken);
      const results = batch.length ? await this.store.write(batch).catch((error) => batch.map(() => asError(error))) : [];
      const committedAt = performance.now(); // chat_delivery_seconds runs from here to the publish
      const failed = batch.filter((_, i) => results[i] instanceof Error);
      if (failed.length) this.refuse(failed, results.find((r) => r instanceof Error));
      batch.forEach((p, i) => {
        const result = results[i];
        if (result instanceof Error) return;
        if (p.kind === "say") this.deliverMessage(p, result as number, committedAt);
        else this.deliverChange(p, result as Changed, committedAt);
      });
    }
  }

  /** Mentions and replies are read before the write; one whose read fails is refused, the others go on. */
  private async resolve(batch: Pending[]): Promise<Pending[]> {
    const ready: Pending[] = [];
    for (const p of batch) {
      try {
        if (p.kind === "say") {
          if (p.text.includes("@")) p.mentions = await this.mentions(p.text);
          // a reply names a message of the room; one that is not there is dropped, not the reply
          if (p.replyTo !== undefined && !(await this.store.message(p.room, p.replyTo))) p.replyTo = undefined;
        } else if (p.kind === "edit") p.mentions = p.text.includes("@") ? await this.mentions(p.text) : [];
        ready.push(p);
      } catch (error) {
        this.refuse([p], error);
      }
    }
    return ready;
  }

  private deliverMessage(say: Extract<Pending, { kind: "say" }>, id: number, committedAt: number) {
    const { room, user, text, ts, ref, replyTo, mentions } = say;
    const entry = entryOf(messageOf({ room, id, user, text, ts, ref, replyTo, mentions }));
    entry.committedAt = committedAt;
    this.rooms.get(room)?.receive(entry);
    this.fanout.publishMessage(room, entry);
  }

  /** An edit, deletion or reaction, stored with the room's next seq: delivered as an updated frame (the requester's
   * copy carries its ref); a refusal goes to the requester only. */
  private deliverChange(c: Exclude<Pending, { kind: "say" }>, result: Changed, committedAt: number) {
    const { ws, ref } = c;
    c.done?.(result);
    const open = ws && !ws.data.closed ? ws : undefined;
    if (!result.ok) return void (open && sendError(open, result.code, result.message, { ref, room: c.room }));
    const own = JSON.stringify({ type: "updated", room: c.room, seq: result.message.seq, message: result.message, ref } satisfies ServerMessage);
    if (!result.changed) return void (open && sendFrame(open, own)); // nothing changed: the state, to the requester
    const entry: Entry = { ...updatedEntry(result.message), own: ws && { ws, frame: own }, committedAt };
    this.rooms.get(c.room)?.receive(entry);
    this.fanout.publishMessage(c.room, entry);
  }

  /** Nothing of the batch was stored: each sender still here hears so, for its ref. */
  private refuse(batch: Pending[], error: unknown) {
    this.metrics.storeErrors++;
    this.logger.error("store_messages", error, { messages: batch.length });
    for (const p of batch) {
      if (p.kind !== "say") p.done?.(undefined);
      if (p.ws && !p.ws.data.closed) sendError(p.ws, "unavailable", "Cannot store it: the database is unavailable, try again", { ref: p.ref });
    }
  }
}

// ── Retention: old messages expire, empty rooms are dropped, the number of rooms is capped ──

export class Retention {
  private readonly emptied = new Set<string>(); // rooms left without messages: dropped once nobody is in them
  private running: Promise<void> | null = null;

  constructor(private readonly config: Pick<Config, "retentionDays" | "maxRooms">, private readonly units: { store: Store; rooms: Rooms; fanout: Fanout }) {}

  /** The janitor's pass (one at a time): expired messages go in short batches, then empty rooms nobody is in. */
  run(now = Date.now()): Promise<void> {
    return (this.running ??= this.expire(now).then(() => this.dropEmpty()).finally(() => (this.running = null)));
  }

  private async expire(now: number) {
    if (this.config.retentionDays === 0) return;
    const before = now - this.config.retentionDays * DAY_MS;
    for (;;) {
      const { deleted, emptied } = await this.units.store.expire(before, RETENTION_BATCH);
      for (const room of emptied) if (this.emptied.size < EMPTIED_KEPT) this.emptied.add(room);
      if (deleted < RETENTION_BATCH) return;
      await Bun.sleep(1); // the say queue and requests run between batches
    }
  }

  /** Drops the remembered empty rooms that are not loaded here and have nobody on other nodes. */
  private async dropEmpty() {
    const { store, rooms, fanout } = this.units;
    const idle = [...this.emptied].filter((name) => !rooms.get(name)).slice(0, RETENTION_BATCH);
    const online = await fanout.online(idle);
    for (const [i, name] of idle.entries()) {
      if (online[i] > 0) continue;
      await store.dropRoom(name); // false if it has messages again: it is no longer empty either way
      this.emptied.delete(name);
    }
  }

  /** Whether a join may make this room: a known one always, a new one while fewer than MAX_ROOMS are stored
   * (after dropping empty ones). Rows are made by the first message, so joins racing for the last place may pass it. */
  async admit(name: string): Promise<boolean> {
    const { store, rooms } = this.units;
    if (rooms.get(name) || (await store.countRooms()) < this.config.maxRooms || (await store.hasRoom(name))) return true;
    await this.dropEmpty();
    return (await store.countRooms()) < this.config.maxRooms;
  }
}

// ── Chat operations: what frames and requests ask of rooms and users ─────────

export type Outcome = { ok: true } | { ok: false; code: ErrorCode; message: string; retryAfterMs?: number };

type ChatUnits = { store: Store; fanout: Fanout; rooms: Rooms; connections: Connections; queue: SayQueue; retention: Retention; metrics: Metrics; logger: Logger };

export class Chat {
  private readonly sayLimits: RateLimiter;
  private readonly addressSayLimits: RateLimiter; // all users of one address together
  private readonly renameLimits: RateLimiter;
  private readonly addressRenameLimits: RateLimiter; // each rename goes to every socket sharing a room: costly in bulk
  private readonly joinLimits: RateLimiter; // per user, so a reconnect does not refill it
  private readonly addressBytes: RateLimiter; // history bytes per client address
  private readonly readLimits = new RateLimiter(READ_RATE);
  private readonly typingThrottle = new TypingThrottle();
  private readonly listWrites = new Map<string, Promise<void>>(); // per user and room: a pool may reorder joins and leaves
  private readonly paced: { frame: string; sockets: ChatSocket[]; next: number }[] = []; // see pace

  constructor(private readonly config: Config, private readonly units: ChatUnits) {
    this.sayLimits = new RateLimiter(config.rateLimit);
    this.addressSayLimits = new RateLimiter(config.rateLimitPerAddress);
    this.renameLimits = new RateLimiter(config.renameLimit);
    this.addressRenameLimits = new RateLimiter(config.renameLimitPerAddress);
    this.joinLimits = new RateLimiter(config.joinLimit);
    this.addressBytes = new RateLimiter(config.historyBytesPerAddress);
  }

  /** A join: history and presence; of a room already joined (or being joined), presence only (pages fill gaps). */
  async join(ws: ChatSocket, name: string, since: number | undefined) {
    const data = ws.data;
    const isKnown = () => data.rooms.includes(name) || !!data.joining?.includes(name);
    let known = isKnown();
    const refused = this.refuseJoin(ws, name, known);
    if (refused) return sendError(ws, refused.code, refused.message, { room: name, retryAfterMs: refused.retryAfterMs });
    if (!known && !this.units.rooms.get(name)) {
      // a store that cannot count fails the load next, which answers unavailable
      const admitted = await this.units.retention.admit(name).catch(() => true);
      if (data.closed) return;
      if (!admitted) return sendError(ws, "limit_exceeded", `Cannot join ${name}: the server holds its most rooms (MAX_ROOMS=${this.config.maxRooms})`, { room: name });
      known = isKnown(); // the same join may have raced this one
    }
    const room = this.units.rooms.open(name);
    if (!known) {
      (data.joining ??= []).push(room.name); // room.name is shared, not a copy per socket
      room.sockets++;
      // another node may have stored messages this one has not delivered yet: ask the store before saying "you are ahead"
      if (since !== undefined && since > room.lastId) await room.refresh();
    }
    const live = await room.ready();
    const joined = data.rooms.includes(name);
    if (data.closed || (!joined && !data.joining?.includes(name))) return; // closed or left meanwhile
    if (!live) return this.abandonJoin(ws, room, "unavailable", `Cannot join ${name}: history is unavailable, try again`);
    // nothing of a room someone may not join is sent: no history, no presence, no member names
    const refusal = joined ? undefined : room.rules.refuseJoin(data.user.id, data.user.admin);
    if (refusal) return this.abandonJoin(ws, room, "forbidden", `Cannot join ${name}: ${refusal}`);
    // from here on nothing awaits: history up to lastId, then live messages after it, exactly
    if (!joined) {
      const page = room.history(since);
      const wait = this.chargeHistory(ws, page.bytes);
      if (wait) return this.abandonJoin(ws, room, "rate_limited", `Cannot join ${name}: too much history sent, try again in ${wait} ms`, wait);
      sendFrame(ws, page.frame);
      this.enter(ws, room);
      const { id } = data.user;
      this.writeList(id, name, () => this.units.store.reading.join(id, name, room.lastId));
    }
    sendFrame(ws, room.presenceFrame(userOf(ws)));
  }

  /** A join that cannot finish: the socket is not in the room, and hears why. */
  private abandonJoin(ws: ChatSocket, room: Room, code: ErrorCode, message: string, retryAfterMs?: number) {
    removeFrom(ws.data, "joining", room.name);
    room.sockets--;
    this.units.rooms.release(room);
    sendError(ws, code, message, { room: room.name, retryAfterMs });
  }

  /** The next page of a joined room's history: after a history frame with more, or to fill a gap. */
  page(ws: ChatSocket, name: string, after: number) {
    const room = ws.data.rooms.includes(name) ? this.units.rooms.get(name) : undefined;
    if (!room) return sendError(ws, "not_joined", `Cannot read the history of ${name}: join it first`, { room: name });
    const page = room.page(after);
    const wait = this.chargeHistory(ws, page.bytes);
    if (wait) return sendError(ws, "rate_limited", `Too much history sent: try again in ${wait} ms`, { room: name, retryAfterMs: wait });
    sendFrame(ws, page.frame);
  }

  /** A frame or request refused by a rate limit: counted for /metrics and for the minute's log line of its kind. */
  private limited(kind: RateLimited, address: string) {
    this.units.metrics.limited(kind);
    this.units.logger.tally("rate_limited", kind, address);
  }

  /** Charges history bytes to the socket's and its address's budgets, both or neither: 0, or the ms until both can pay. */
  private chargeHistory(ws: ChatSocket, bytes: number): number {
    const own = (ws.data.historyBytes ??= new TokenBucket(this.config.historyBytes));
    const wait = takeAll([own, this.addressBytes.bucket(ws.data.address)], bytes);
    if (wait) this.limited("history", ws.data.address);
    return wait;
  }

  private refuseJoin(ws: ChatSocket, name: string, known: boolean): Extract<Outcome, { ok: false }> | undefined {
    const { maxRoomsPerConnection } = this.config;
    const data = ws.data;
    if (!known && data.rooms.length + (data.joining?.length ?? 0) >= maxRoomsPerConnection) {
      return { ok: false, code: "limit_exceeded", message: `Cannot join ${name}: at most ${maxRoomsPerConnection} rooms per connection` };
    }
    // each join can announce the user to the room, and sends history: a user toggling a room would flood both
    const wait = this.joinLimits.take(data.user.id);
    if (!wait) return;
    this.limited("join", data.address);
    return { ok: false, code: "rate_limited", message: `Cannot join ${name}: too many joins, try again in ${wait} ms`, retryAfterMs: wait };
  }

  /** The socket is in: subscribed, and counted in presence (a user's first socket here announces the user). */
  private enter(ws: ChatSocket, room: Room) {
    removeFrom(ws.data, "joining", room.name);
    ws.data.rooms.push(room.name);
    ws.subscribe(room.topic);
    const user = userOf(ws);
    if (room.addLocal(user.id)) {
      room.addMember(user);
      this.units.fanout.join(room.name, user);
    }
  }

  leave(ws: ChatSocket, name: string) {
    const data = ws.data;
    const joined = removeFrom(data, "rooms", name);
    if (!joined && !removeFrom(data, "joining", name)) return;
    const room = this.units.rooms.get(name);
    if (!room) return;
    room.sockets--;
    if (joined) {
      if (!data.closed) ws.unsubscribe(room.topic);
      // the user's last socket here: the fan-out decides whether the user left the room (it may be on another node)
      if (room.removeLocal(data.user.id)) this.units.fanout.leave(name, userOf(ws));
    }
    this.units.rooms.release(room);
  }

  /** A leave frame: out of the room, and off the user's rooms on every device (a socket that closes leaves only). */
  part(ws: ChatSocket, name: string) {
    this.leave(ws, name);
    const { id } = ws.data.user;
    this.writeList(id, name, () => this.units.store.reading.leave(id, name));
  }

  /** Writes to the user's rooms one after another per room, in the order the frames came; a failure is logged. */
  private writeList(userId: string, room: string, write: () => Promise<void>) {
    const key = `${userId}\n${room}`;
    const next = (this.listWrites.get(key) ?? Promise.resolve()).then(write).catch((error) => this.units.logger.error("user_rooms", error, { room }));
    this.listWrites.set(key, next);
    void next.then(() => this.listWrites.get(key) === next && this.listWrites.delete(key));
  }

  /** A read frame: the user read a joined room up to `seq` (at most the room's head); its other sockets, on every node, hear it. */
  read(ws: ChatSocket, name: string, seq: number) {
    const room = ws.data.rooms.includes(name) ? this.units.rooms.get(name) : undefined;
    if (!room) return sendError(ws, "not_joined", `Cannot mark ${name} read: join it first`, { room: name });
    const user = ws.data.user.id;
    const wait = this.readLimits.take(user);
    if (wait) {
      this.limited("read", ws.data.address);
      return sendError(ws, "rate_limited", `Too many read frames: try again in ${wait} ms`, { room: name, retryAfterMs: wait });
    }
    const event = { what: "read", user, room: name, seq: Math.min(seq, room.lastId) } as const;
    this.units.store.reading.markRead(user, name, event.seq).then(
      (moved) => {
        if (!moved) return;
        this.tellSockets(event, ws);
        this.units.fanout.publishAccess(event);
      },
      (error) => {
        this.units.logger.error("read_state", error, { room: name });
        if (!ws.data.closed) sendError(ws, "unavailable", `Cannot store the read position in ${name} now`, { room: name });
      },
    );
  }

  /** Sends a read position to the user's sockets on this node, but `except` (the one that read). */
  private tellSockets(event: Extract<AccessEvent, { what: "read" }>, except?: ChatSocket) {
    const frame = JSON.stringify({ type: "read", room: event.room, seq: event.seq } satisfies ServerMessage);
    for (const ws of this.units.connections.user(event.user)?.sockets ?? []) if (ws !== except && !ws.data.closed) sendFrame(ws, frame);
  }

  say(ws: ChatSocket, msg: Frame<"say">) {
    const { ref } = msg;
    const refused = this.refuseWrite(ws, msg.room, msg.text);
    if (refused) return sendError(ws, refused.code, refused.message, { room: refused.room, retryAfterMs: refused.retryAfterMs, ref });
    // a resend of a message that was stored (its echo lost with a connection, or a server restart): the stored one
    const sent = ref ? this.units.rooms.get(msg.room)?.sentWithRef(ws.data.user.id, ref) : undefined;
    if (sent) return void sendFrame(ws, sent.stateFrame ?? JSON.stringify(sent.state));
    this.units.metrics.messagesReceived++;
    this.units.queue.push({ kind: "say", ws, room: msg.room, user: userOf(ws), text: msg.text, ts: Date.now(), ref, replyTo: msg.replyTo });
  }

  /** Edit (the author), delete (the author, the room's moderators, admins) or react: stored with the room's next seq. */
  change(ws: ChatSocket, msg: Frame<"edit"> | Frame<"delete"> | Frame<"react">) {
    const { room, id, ref } = msg;
    const refused = this.refuseWrite(ws, room, msg.type === "edit" ? msg.text : undefined);
    if (refused) return sendError(ws, refused.code, refused.message, { room: refused.room, retryAfterMs: refused.retryAfterMs, ref });
    const user = ws.data.user.id;
    if (msg.type === "edit") this.units.queue.push({ kind: "edit", ws, ref, room, id, user, text: msg.text, mentions: [] });
    else if (msg.type === "react") this.units.queue.push({ kind: "react", ws, ref, room, id, user, emoji: msg.emoji, on: msg.on });
    else {
      // the role as this node's copy of the rules has it now (a demotion elsewhere arrives with the fan-out)
      const moderator = (this.units.rooms.get(room)?.rules.rank(user, ws.data.user.admin) ?? 0) >= RANK.moderator;
      this.units.queue.push({ kind: "delete", ws, ref, room, id, user, moderator });
    }
  }

  /** An admin's deletion from the console: queued like a delete frame, answered when stored. */
  deleteAsAdmin(by: string, room: string, id: number): Promise<Changed | undefined> {
    const { promise, resolve } = Promise.withResolvers<Changed | undefined>();
    this.units.queue.push({ kind: "delete", room, id, user: by, moderator: true, done: resolve });
    return promise;
  }

  /** Why a write to a room is refused, or nothing: length, membership, guests, mutes, rate limits (a token taken). */
  private refuseWrite(ws: ChatSocket, room: string, text: string | undefined): (ErrorExtra & { code: ErrorCode; message: string }) | undefined {
    if (text !== undefined && text.length > this.config.maxText) {
      this.units.metrics.framesRejected++;
      return { code: "bad_request", message: `text: longer than ${this.config.maxText} characters` };
    }
    if (!ws.data.rooms.includes(room)) return { code: "not_joined", message: `Cannot write in ${room}: join it first` };
    if (this.readOnly(ws)) return { code: "forbidden", message: "Guests may read but not write here: sign up or log in" };
    const muted = this.muted(ws, room);
    if (muted) return { code: "forbidden", message: muted.message, room, retryAfterMs: muted.retryAfterMs };
    const wait = this.sayLimits.take(ws.data.user.id);
    if (wait) {
      this.limited("say", ws.data.address);
      return { code: "rate_limited", message: `Slow down: try again in ${wait} ms`, retryAfterMs: wait };
    }
    const addressWait = this.addressSayLimits.take(ws.data.address);
    if (addressWait) {
      this.limited("say_per_address", ws.data.address);
      this.units.metrics.refused.say_per_address++;
      return { code: "rate_limited", message: `Too many messages from your address: try again in ${addressWait} ms`, retryAfterMs: addressWait };
    }
  }

  typing(ws: ChatSocket, name: string) {
    if (!ws.data.rooms.includes(name)) return sendError(ws, "not_joined", `Cannot type in ${name}: join it first`);
    if (this.readOnly(ws)) return sendError(ws, "forbidden", "Guests may read but not write here: sign up or log in");
    const muted = this.muted(ws, name);
    if (muted) return sendError(ws, "forbidden", muted.message, { room: name, retryAfterMs: muted.retryAfterMs });
    if (!this.typingThrottle.allow(ws.data.user.id, name)) return this.units.metrics.limited("typing");
    const frame = JSON.stringify({ type: "typing", room: name, user: userOf(ws) } satisfies ServerMessage);
    this.units.rooms.get(name)!.broadcast(frame, ws);
    this.units.fanout.publishTyping(name, frame);
  }

  /** Applies a change of access to this node's sockets. */
  async access(event: AccessEvent) {
    if (event.what === "read") return this.tellSockets(event);
    if (event.what !== "room") return this.units.connections.apply(event);
    await this.roomChanged(event).catch((error) => this.units.logger.error("room_change", error));
  }

  /** Tells the other nodes of a change made here, and applies it here before the request is answered. */
  tell(event: AccessEvent): Promise<void> {
    this.units.fanout.publishAccess(event);
    return this.access(event);
  }

  /** A mute in the room's rules as this node has them (a mute made elsewhere arrives within the fan-out's delay). */
  private muted(ws: ChatSocket, name: string) {
    const until = this.units.rooms.get(name)?.rules.mutedUntil(ws.data.user.id);
    if (until === undefined) return;
    const retryAfterMs = Math.max(1, until - Date.now());
    return { message: `You are muted in ${name} for ${Math.ceil(retryAfterMs / 60_000)} more min`, retryAfterMs };
  }

  /** A room's rules changed (here or on another node): re-read them, then act on the change for this node's sockets. */
  async roomChanged(event: Extract<AccessEvent, { what: "room" }>) {
    const room = this.units.rooms.get(event.room);
    await room?.reloadRules();
    const { removed, invited, moderation, by, closed } = event;
    if (closed) this.removeAll(event.room, by);
    if (removed) {
      const frame = JSON.stringify({ type: "removed", room: event.room, by, reason: removed.reason } satisfies ServerMessage);
      for (const ws of this.units.connections.user(removed.user)?.sockets ?? []) {
        const inRoom = ws.data.rooms.includes(event.room) || !!ws.data.joining?.includes(event.room);
        if (!inRoom || ws.data.closed) continue;
        this.leave(ws, event.room);
        sendFrame(ws, frame);
      }
    }
    if (invited) {
      const frame = JSON.stringify({ type: "invited", room: event.room, by } satisfies ServerMessage);
      for (const ws of this.units.connections.user(invited)?.sockets ?? []) if (!ws.data.closed) sendFrame(ws, frame);
    }
    if (moderation && room) room.broadcast(JSON.stringify({ type: "moderation", room: event.room, ...moderation, by } satisfies ServerMessage));
  }

  /** An admin closed the room: every socket on this node in it (or joining it) is out, and hears so. */
  private removeAll(name: string, by: User) {
    const frame = JSON.stringify({ type: "removed", room: name, by, reason: "closed" } satisfies ServerMessage);
    for (const ws of [...this.units.connections.all()]) {
      if (ws.data.closed || !(ws.data.rooms.includes(name) || ws.data.joining?.includes(name))) continue;
      this.leave(ws, name);
      sendFrame(ws, frame);
    }
  }

  /** GUESTS=read: a guest's socket reads and writes nothing. */
  private readOnly(ws: ChatSocket): boolean {
    return this.config.guests !== "write" && !ws.data.user.registered;
  }

  /** Renames a user everywhere; for PUT /api/me and the nick frame. */
  async rename(userId: string, name: string, address: string): Promise<Outcome> {
    const wait = this.renameLimits.take(userId);
    if (wait) {
      this.limited("rename", address);
      return { ok: false, code: "rate_limited", message: `Too many renames: try again in ${wait} ms`, retryAfterMs: wait };
    }
    const addressWait = this.addressRenameLimits.take(address);
    if (addressWait) {
      this.limited("renames_per_address", address);
      this.units.metrics.refused.renames_per_address++;
      return { ok: false, code: "rate_limited", message: `Too many renames from your address: try again in ${addressWait} ms`, retryAfterMs: addressWait };
    }
    const previous = await this.units.store.rename(userId, name);
    if (previous === undefined) return { ok: false, code: "name_taken", message: `Cannot rename: ${name} is taken` };
    if (previous !== name) {
      const user = { id: userId, name };
      this.renamed(user, previous);
      const here = [...this.units.rooms.roomsOf(userId)].filter((r) => r.localUsers.has(userId)).map((r) => r.name);
      this.units.fanout.publishRename(user, previous, here);
    }
    return { ok: true };
  }

  /** Tells the user's own sockets and everyone here sharing a room with the user, once each. */
  renamed(user: User, previous: string) {
    const local = this.units.connections.user(user.id);
    if (local) local.name = user.name;
    const recipients = new Set<ChatSocket>(local?.sockets);
    const everyone = this.units.connections.count;
    for (const room of this.units.rooms.roomsOf(user.id)) {
      if (!room.rename(user) || recipients.size === everyone) continue; // once every socket is in, the rest only rename
      for (const ws of this.units.connections.socketsIn(room)) recipients.add(ws);
    }
    this.pace(JSON.stringify({ type: "renamed", user, previous } satisfies ServerMessage), [...recipients]);
  }

  /** Sends a frame to many sockets, FANOUT_CHUNK per event-loop turn: a burst of renames to thousands of sockets
   * would otherwise hold every other frame and request back until all are written. */
  private pace(frame: string, sockets: ChatSocket[]) {
    this.paced.push({ frame, sockets, next: 0 });
    if (this.paced.length === 1) setImmediate(() => this.sendPaced());
  }

  private sendPaced() {
    let budget = FANOUT_CHUNK;
    while (budget > 0 && this.paced.length) {
      const job = this.paced[0];
      for (; job.next < job.sockets.length && budget > 0; job.next++, budget--) {
        const ws = job.sockets[job.next];
        if (!ws.data.closed) sendFrame(ws, job.frame);
      }
      if (job.next === job.sockets.length) this.paced.shift();
    }
    if (this.paced.length) setImmediate(() => this.sendPaced());
  }

  /** Scrollback for GET /api/rooms/:room/messages as its JSON body, charged to the address's history budget. */
  scrollback(address: string, room: string, page: { before: number; limit: number }) {
    return this.charged(address, async () => `{"messages":[${(await this.newestThatFit(room, page)).join(",")}]}`);
  }

  /** Search for GET /api/rooms/:room/search as its JSON body, newest first, as many as fit in HISTORY_PAGE_BYTES
   * (one always does), charged to the address's history budget like scrollback. */
  search(address: string, room: string, query: { words: string[]; before: number; limit: number }) {
    return this.charged(address, async () => {
      const found = await this.units.store.search(room, query.words, query.before, query.limit);
      const frames: string[] = [];
      let size = 0;
      for (const m of found) {
        const frame = JSON.stringify(m);
        size += Buffer.byteLength(frame) + 1;
        if (frames.length && size > this.config.historyPageBytes) break;
        frames.push(frame);
      }
      return `{"messages":[${frames.join(",")}]}`;
    });
  }

  /** A body read only when the address's history budget is not empty, then charged its size. */
  private async charged(address: string, read: () => Promise<string>): Promise<{ ok: true; body: string } | Extract<Outcome, { ok: false }>> {
    const budget = this.addressBytes.bucket(address);
    // an empty budget costs no read; a full one pays any page (the size is known only after the read)
    let wait = budget.wait(1);
    if (!wait) {
      const body = await read();
      wait = budget.take(performance.now(), Buffer.byteLength(body));
      if (!wait) return { ok: true, body };
    }
    this.limited("scrollback", address);
    return { ok: false, code: "rate_limited", message: `Too much history sent to this address: try again in ${wait} ms`, retryAfterMs: wait };
  }

  /** The frames of the newest messages before `page.before` that fit in HISTORY_PAGE_BYTES (one always does), oldest
   * first; read SCROLLBACK_CHUNK at a time, so long texts are not read past what fits. */
  private async newestThatFit(room: string, page: { before: number; limit: number }): Promise<string[]> {
    const frames: string[] = [];
    let size = 0;
    for (let before = page.before; frames.length < page.limit;) {
      const want = Math.min(SCROLLBACK_CHUNK, page.limit - frames.length);
      const chunk = await this.units.store.before(room, before, want);
      for (let i = chunk.length - 1; i >= 0; i--) {
        const frame = JSON.stringify(chunk[i]);
        size += Buffer.byteLength(frame) + 1;
        if (frames.length && size > this.config.historyPageBytes) return frames.reverse();
        frames.push(frame);
      }
      if (chunk.length < want) break;
      before = chunk[0].id;
    }
    return frames.reverse();
  }

  /** GET /api/rooms: the public rooms, busiest first, at most ROOM_LIST_LIMIT, from the stored rooms with the highest
   * last ids and the loaded rooms with the most members (each list kept at that size): O(ROOM_LIST_LIMIT); then the
   * caller's own private and dm rooms (at most ROOM_LIST_LIMIT more). */
  async listRooms(caller: string | undefined) {
    const { store, rooms } = this.units;
    type Listed = { name: string; online: number; lastId: number; visibility: Visibility; with?: User };
    const list = new Map<string, Listed>((await store.rooms(ROOM_LIST_LIMIT)).map((r) => [r.name, { name: r.name, online: 0, lastId: r.lastId, visibility: "public" }]));
    for (const room of rooms.busiest()) if (!list.has(room.name)) list.set(room.name, { name: room.name, online: 0, lastId: 0, visibility: "public" });
    for (const [name, visibility] of await store.access.visibilities([...list.keys()])) if (visibility !== "public") list.delete(name);
    const own = caller ? await store.access.roomsOf(caller, ROOM_LIST_LIMIT) : [];
    for (const r of own) list.set(r.name, { online: 0, ...r });
    for (const entry of list.values()) {
      const room = rooms.get(entry.name);
      if (!room) continue;
      entry.lastId = Math.max(entry.lastId, room.lastId);
      entry.online = room.members.size; // kept current by the fan-out
    }
    const elsewhere = [...list.keys()].filter((name) => !this.units.rooms.get(name));
    const online = await this.units.fanout.online(elsewhere);
    elsewhere.forEach((name, i) => (list.get(name)!.online = online[i]));
    const byActivity = (a: Listed, b: Listed) => b.online - a.online || b.lastId - a.lastId;
    const open = [...list.values()].filter((r) => r.visibility === "public").sort(byActivity).slice(0, ROOM_LIST_LIMIT);
    return [...open, ...[...list.values()].filter((r) => r.visibility !== "public").sort(byActivity)];
  }

  /** GET /api/me/rooms: the user's rooms, read positions and unread counts; a room loaded here has the freshest head. */
  async myRooms(user: { id: string; admin: boolean }): Promise<MyRoom[]> {
    const list = await this.units.store.reading.rooms(user.id, user.admin, MY_ROOMS_LIMIT);
    for (const r of list) r.seq = Math.max(r.seq, this.units.rooms.get(r.name)?.lastId ?? 0);
    return list;
  }

  /** Whether a new room of this name may be stored (MAX_ROOMS). */
  mayStore(name: string): Promise<boolean> {
    return this.units.retention.admit(name);
  }

  /** Whether anyone is in a room, on any node (a room nobody has written to yet has no row, but exists). */
  async occupied(name: string): Promise<boolean> {
    return (this.units.rooms.get(name)?.members.size ?? 0) > 0 || (await this.units.fanout.online([name]))[0] > 0;
  }

  /** What this node does with news from the fan-out. */
  fanoutEvents(): FanoutEvents {
    return {
      message: (room, entry) => this.units.rooms.get(room)?.receive(entry),
      typing: (room, frame) => this.units.rooms.get(room)?.broadcast(frame),
      presence: (name, change, user) => {
        const room = this.units.rooms.get(name);
        if (change === "joined") room?.addMember(user);
        else room?.removeMember(user);
      },
      renamed: (user, previous) => this.renamed(user, previous),
      access: (event) => void this.access(event),
      reconnected: () => void this.resync().catch((error) => this.units.logger.error("resync", error)),
    };
  }

  /** After the fan-out came back: register this node's members again, re-read presence, deliver what was missed. */
  private async resync() {
    const here: [string, User][] = [];
    for (const room of this.units.rooms.values()) {
      for (const id of room.localUsers.keys()) here.push([room.name, { id, name: this.units.connections.user(id)?.name ?? "" }]);
    }
    await this.units.fanout.register(here);
    for (const room of [...this.units.rooms.values()]) {
      const now = new Map((await this.units.fanout.members(room.name)).map((u) => [u.id, u]));
      for (const user of now.values()) room.addMember(user);
      for (const user of [...room.members.values()]) if (!now.has(user.id)) room.removeMember(user);
      await room.refresh();
      await room.reloadRules();
    }
  }

  /** Forgets typing entries and idle rate buckets older than STALE_MS (of users gone from this node). */
  forgetStale(now = performance.now()) {
    const before = now - STALE_MS;
    const here = (userId: string) => this.units.connections.user(userId) !== undefined;
    this.typingThrottle.prune(before);
    this.sayLimits.prune(before, here);
    this.addressSayLimits.prune(before, () => false); // a bucket idle for STALE_MS is full again anyway
    this.renameLimits.prune(before, here);
    this.addressRenameLimits.prune(before, () => false);
    this.joinLimits.prune(before, here);
    this.readLimits.prune(before, here);
    this.addressBytes.prune(before, () => false);
  }
}

// ── HTTP: Hono routes; a session is a random id in a signed cookie ───────────

type Env = { Bindings: Server<SocketData>; Variables: { session: Session | undefined; address: string } };

/** The one JSON error answer: {error: {code, message}}, with Retry-After when there is a wait. */
function httpError(c: Context, status: ContentfulStatusCode, code: string, message: string, retryAfterMs?: number) {
  if (retryAfterMs) c.header("retry-after", String(Math.ceil(retryAfterMs / 1000)));
  return c.json({ error: { code, message } }, status);
}

/** A JSON body checked by `schema`: the value, or the answer to send (415 unless the body says it is JSON, 400 unless it parses). */
async function readJson<S extends z.ZodType>(c: Context, schema: S, what: string): Promise<{ ok: true; value: z.output<S> } | { ok: false; answer: Response }> {
  if (!/^application\/json\s*(;|$)/i.test(c.req.header("content-type") ?? "")) {
    return { ok: false, answer: httpError(c, 415, "unsupported_media_type", "Content-Type must be application/json") };
  }
  const body = schema.safeParse(await c.req.json().catch(() => undefined));
  return body.success ? { ok: true, value: body.data } : { ok: false, answer: httpError(c, 400, "bad_request", firstIssue(body.error, what)) };
}

const isSecure = (c: Context) => new URL(c.req.url).protocol === "https:" || c.req.header("x-forwarded-proto") === "https";

/**
 * Cookies `sid=<random id>.<base64 HMAC-SHA256>` as Hono's setSignedCookie writes them, checked like its
 * getSignedCookie but with one HMAC key for the process instead of a WebCrypto import per request.
 * Over https the cookie is `__Host-sid`: only this origin, over TLS, can set it (no subdomain, no plain-http page).
 */
class Cookies {
  constructor(private readonly secret: string) {}

  name(c: Context): string {
    return isSecure(c) ? "__Host-sid" : "sid";
  }

  /** How many cookies of our name the request carries: a second one is someone else's, planted beside ours. */
  count(c: Context): number {
    const name = this.name(c);
    return (c.req.header("cookie") ?? "").split(";").filter((pair) => pair.split("=", 1)[0].trim() === name).length;
  }

  sid(c: Context): string | undefined {
    const value = getCookie(c, this.name(c));
    const dot = value?.lastIndexOf(".") ?? -1;
    if (dot < 0) return;
    const sid = value!.slice(0, dot);
    const expected = Buffer.from(createHmac("sha256", this.secret).update(sid).digest("base64"));
    const given = Buffer.from(value!.slice(dot + 1));
    return given.length === expected.length && timingSafeEqual(given, expected) ? sid : undefined;
  }

  issue(c: Context, sid: string) {
    return setSignedCookie(c, this.name(c), sid, this.secret, { httpOnly: true, sameSite: "Lax", path: "/", secure: isSecure(c), maxAge: COOKIE_MAX_AGE_S });
  }

  clear(c: Context) {
    deleteCookie(c, this.name(c), { path: "/", secure: isSecure(c) });
  }
}

// a default name says nothing about how many came before it, and there are too many to squat (48 × 48 × 9000)
const NAME_WORDS = [
  "amber brave calm clever cosmic crisp dandy eager fancy fuzzy gentle glad golden happy humble jolly kind lively lucky mellow merry misty noble plucky proud quick quiet rapid rosy rusty shiny silent silver sleepy snowy sunny swift tidy tiny vivid warm wild windy wise witty young zesty bold".split(" "),
  "otter badger beaver bison camel crane dingo eagle falcon ferret finch gecko heron ibis koala lemur llama lynx magpie marten moose newt ocelot okapi orca osprey panda puffin quail raven robin salmon seal shrew sloth stoat swan tapir tern tiger toucan trout turtle viper walrus wombat yak zebra".split(" "),
];
/** A random default name like `quiet-otter-4821`; later attempts add a longer random tail, so one is always free. */
export function defaultName(attempt = 0): string {
  const [a, b, n] = crypto.getRandomValues(new Uint32Array(3));
  const tail = attempt < DEFAULT_NAME_ATTEMPTS ? String(1000 + (n % 9000)) : randomId(6).replace(/[^A-Za-z0-9]/g, "x");
  return `${NAME_WORDS[0][a % NAME_WORDS[0].length]}-${NAME_WORDS[1][b % NAME_WORDS[1].length]}-${tail}`;
}

type SessionLimits = Pick<Config, "guestTtl" | "maxUnusedSessions" | "maxSessions" | "sessionsPerAddress" | "upgradesPerAddress" | "requestsPerAddress">;

/**
 * Sessions: a guest is made on the first GET or PUT /api/me without a session, with a sid the server picks (never
 * one a request brings, so nobody can fix another's session); a guest unused for GUEST_TTL is gone.
 */
class Sessions {
  private createdSincePrune = 0;
  private readonly perAddress: RateLimiter;
  private readonly upgrades: RateLimiter;
  private readonly requests: RateLimiter;
  private readonly touched = new Map<string, number>(); // sid → when its row was last marked seen
  constructor(private readonly store: Store, readonly cookies: Cookies, private readonly limits: SessionLimits, private readonly metrics: Metrics, private readonly logger: Logger) {
    this.perAddress = new RateLimiter(limits.sessionsPerAddress);
    this.upgrades = new RateLimiter(limits.upgradesPerAddress);
    this.requests = new RateLimiter(limits.requestsPerAddress);
  }

  /** Takes an /api request of this address: 0, or the ms until one is allowed. */
  request(address: string): number {
    const wait = this.requests.take(address);
    if (wait) {
      this.metrics.refused.requests_per_address++;
      this.logger.tally("rate_limited", "requests_per_address", address);
    }
    return wait;
  }

  /** Takes an upgrade of this address: 0, or the ms until one is allowed. */
  upgrade(address: string): number {
    const wait = this.upgrades.take(address);
    if (wait) this.metrics.refused.upgrades_per_address++;
    return wait;
  }

  /** The session a request's cookie names, if it exists and has not expired. */
  async read(c: Context): Promise<Session | undefined> {
    const sid = this.cookies.sid(c);
    const session = sid ? await this.store.findSession(sid) : undefined;
    return session && (session.registered || session.seen >= Date.now() - this.limits.guestTtl) ? session : undefined;
  }

  /** A new guest with a new cookie, unless this address made too many lately. */
  async create(c: Context, address: string): Promise<Session | Refused> {
    const wait = this.perAddress.take(address);
    if (wait) {
      this.metrics.refused.sessions_per_address++;
      this.logger.tally("rate_limited", "sessions_per_address", address);
      return { status: 429, code: "rate_limited", message: `Too many new sessions from your address: try again in ${wait} ms`, retryAfterMs: wait };
    }
    const session = await this.store.createGuest(randomId(SID_BYTES), defaultName);
    await this.cookies.issue(c, session.sid);
    // every tenth of the cap the cap is enforced at once, so a flood cannot outgrow it between janitor runs
    if (++this.createdSincePrune >= Math.ceil(this.limits.maxUnusedSessions / 10)) {
      this.createdSincePrune = 0;
      await this.prune();
    }
    return session;
  }

  /** The session opened a socket: it is kept from now on, and seen now. */
  async opened(session: Session) {
    const now = Date.now();
    // the row is fresh: said so, or after a restart the janitor's first pass would write every open session at once
    if (session.used && now - session.seen < SEEN_EVERY_MS) return void this.touched.set(session.sid, session.seen);
    await this.store.touchSessions([session.sid], now);
    this.touched.set(session.sid, now);
  }

  /** Marks sessions with open sockets as seen (at most every SEEN_EVERY_MS), so a long-open tab never expires. */
  async stillOpen(sids: Iterable<string>) {
    const now = Date.now();
    const open = new Set(sids);
    for (const sid of this.touched.keys()) if (!open.has(sid)) this.touched.delete(sid);
    const due = [...open].filter((sid) => now - (this.touched.get(sid) ?? 0) >= SEEN_EVERY_MS);
    if (!due.length) return;
    await this.store.touchSessions(due, now);
    for (const sid of due) this.touched.set(sid, now);
  }

  /** Drops sessions that never connected, expired guests, and the least recently seen guests past MAX_SESSIONS. */
  async prune(): Promise<void> {
    const now = Date.now();
    const { guestTtl, maxUnusedSessions, maxSessions } = this.limits;
    const rules = { unusedBefore: now - UNUSED_SESSION_TTL_MS, keepUnused: maxUnusedSessions, guestsSeenBefore: now - guestTtl, keep: maxSessions };
    await this.store.pruneSessions(rules).catch((error) => this.logger.error("prune_sessions", error));
  }

  /** Forgets rate buckets idle since `before` (a bucket idle that long is full again). */
  forgetStale(before: number) {
    this.perAddress.prune(before, () => false);
    this.upgrades.prune(before, () => false);
    this.requests.prune(before, () => false);
  }
}

/** An answer of Auth: the value, or the HTTP error to send. */
type Answer<T> = { ok: true; value: T } | { ok: false; status: ContentfulStatusCode; code: string; message: string; retryAfterMs?: number };
const deny = (status: ContentfulStatusCode, code: string, message: string, retryAfterMs?: number): Answer<never> => ({ ok: false, status, code, message, retryAfterMs });

/**
 * Accounts: passwords, logins and logouts, a user's sessions, instance bans. Every revocation closes the
 * sessions' sockets, on this node at once and on the others through the fan-out.
 */
class Auth {
  private dummyHash: Promise<string> | null = null; // checked against for unknown names, so they take as long as known ones
  constructor(
    private readonly store: Store,
    private readonly sessions: Sessions,
    private readonly connections: Connections,
    private readonly chat: Chat,
    private readonly metrics: Metrics,
    private readonly maxSessionsPerUser: number,
    private readonly logger: Logger,
  ) {}

  private closeSessions(user: string, handles: string[] | null, code: 4001 | 4003 = 4001) {
    if (!handles || handles.length) void this.chat.tell({ what: "close", user, handles, code });
  }

  /** Makes the guest an account, or changes the password (then the current one is needed, and other sessions end). */
  async setPassword(c: Context, session: Session, password: string, current: string | undefined): Promise<Answer<Account>> {
    const { accounts } = this.store;
    const user = await accounts.user(session.id);
    if (!user) return deny(401, "unauthorized", "No such user");
    if (user.password && !(current && (await Bun.password.verify(current, user.password)))) {
      return deny(403, "forbidden", "The current password is missing or wrong");
    }
    const account = await accounts.setPassword(user.id, await Bun.password.hash(password, PASSWORD_HASH));
    // a change of privilege: this browser's session gets a new sid (its sockets stay open)
    const sid = randomId(SID_BYTES);
    await accounts.rotate(session.sid, sid);
    await this.sessions.cookies.issue(c, sid);
    for (const ws of this.connections.user(user.id)?.sockets ?? []) if (ws.data.handle === session.handle) ws.data.sid = sid;
    if (user.password) this.closeSessions(user.id, await accounts.deleteSessions(user.id, session.handle));
    void this.chat.tell({ what: "account", user: user.id, registered: true, admin: account.admin });
    return { ok: true, value: account };
  }

  /**
   * Signs this browser in as the named account, with a new session; the session it had is ended. Wrong name and
   * wrong password are one answer in about one time; past LOGIN_FAILURES per name or address, 429.
   */
  async login(c: Context, name: string, password: string, current: Session | undefined, address: string): Promise<Answer<Account>> {
    const { accounts } = this.store;
    const now = Date.now();
    const keys = [`name:${nameKey(name)}`, `addr:${address}`];
    const blocked = (await accounts.failures(keys, now - LOGIN_WINDOW_MS)).filter((f) => f.count >= LOGIN_FAILURES);
    if (blocked.length) {
      this.metrics.refused.login_failures++;
      this.logger.tally("refused", "login_failures", address);
      const wait = Math.max(1_000, ...blocked.map((f) => f.oldest + LOGIN_WINDOW_MS - now));
      return deny(429, "rate_limited", `Too many failed logins: try again in ${Math.ceil(wait / 60_000)} min`, wait);
    }
    const user = await accounts.byName(name).catch(() => undefined);
    const hash = user?.password ?? (await (this.dummyHash ??= Bun.password.hash(randomId(SID_BYTES), PASSWORD_HASH)));
    if (!(await Bun.password.verify(password, hash)) || !user?.password) {
      this.metrics.loginFailures++;
      await accounts.fail(keys, now);
      return deny(401, "unauthorized", "Wrong name or password");
    }
    if (user.banned) return deny(403, "forbidden", "This account is banned");
    const sid = randomId(SID_BYTES);
    const { dropped } = await accounts.createSession(sid, user.id, this.maxSessionsPerUser);
    this.closeSessions(user.id, dropped);
    if (current) await this.end(current);
    await this.sessions.cookies.issue(c, sid);
    return { ok: true, value: user };
  }

  /** Ends a session: its row goes and its sockets close with 4001 (a guest without other sessions is gone). */
  async end(session: Session) {
    await this.store.accounts.deleteSession(session.id, session.handle);
    this.closeSessions(session.id, [session.handle]);
    if (!session.registered) await this.store.accounts.dropOrphanGuest(session.id);
  }

  async sessionsOf(session: Session) {
    return (await this.store.accounts.sessions(session.id)).map((s) => ({ id: s.handle, createdAt: s.created, lastSeenAt: s.seen, current: s.handle === session.handle }));
  }

  /** Ends one of the user's own sessions, by handle: whether there was one. */
  revoke(session: Session, handle: string): Promise<boolean> {
    return this.revokeOf(session.id, handle);
  }

  /** Ends a session of a user, by handle (the user's own request, or an admin's): whether there was one. */
  async revokeOf(userId: string, handle: string): Promise<boolean> {
    if (!(await this.store.accounts.deleteSession(userId, handle))) return false;
    this.closeSessions(userId, [handle]);
    return true;
  }

  /** Instance ban (admins): every session ends, sockets close with 4003, logins answer 403 until lifted. */
  async ban(actor: Session, userId: string, banned: boolean): Promise<Answer<null>> {
    const { accounts } = this.store;
    const [me, target] = await Promise.all([accounts.user(actor.id), accounts.user(userId)]);
    if (!me?.admin) return deny(403, "forbidden", "Only an admin may ban users from the instance");
    if (!target) return deny(404, "not_found", "No such user");
    if (target.admin || target.id === me.id) return deny(403, "forbidden", "Admins cannot be banned (remove the admin role first)");
    await accounts.setBanned(userId, banned);
    this.logger.info("moderation", { action: banned ? "instance_ban" : "instance_unban", user: userId, by: me.id });
    if (banned) {
      await accounts.deleteSessions(userId);
      this.closeSessions(userId, null, 4003);
    }
    return { ok: true, value: null };
  }
}

const mayModerate = (actor: number, target: number) => actor >= RANK.moderator && actor > target;

/** A room as a request sees it: its rules (read fresh from the store), the caller and the caller's rank there. */
type RoomContext = { rules: RoomRules; by: User; admin: boolean; rank: number };

/**
 * Rooms people make and run: private rooms, dms, members, moderators, bans, mutes and the audit log. Every rule is
 * checked against the store, not a node's cache; every change reaches every node's sockets through Chat.tell.
 */
class Moderation {
  constructor(private readonly store: Store, private readonly chat: Chat, private readonly config: Config, private readonly logger: Logger) {}

  /** An action in the room's audit log, and a log line (ids only: names are in the audit log). */
  private async record(room: string, action: AuditAction, target: User, by: User, until?: number | null) {
    await this.store.access.record(room, action, target, by, until);
    this.logger.info("moderation", { action, room, user: target.id, by: by.id, ...(until != null && { until: new Date(until).toISOString() }) });
  }

  /** The room as the caller may see it: a private room or dm the caller is not in is 404, as if it did not exist. */
  private async room(session: Session, name: string): Promise<Answer<RoomContext>> {
    const [rules, me] = await Promise.all([this.store.access.rules(name), this.store.accounts.user(session.id)]);
    const admin = !!me?.admin;
    if (!rules.exists || !rules.mayRead(session.id, admin)) return deny(404, "not_found", "No such room");
    return { ok: true, value: { rules, by: { id: session.id, name: me?.name ?? session.name }, admin, rank: rules.rank(session.id, admin) } };
  }

  private async user(id: string): Promise<User | undefined> {
    const user = await this.store.accounts.user(id);
    return user && { id: user.id, name: user.name };
  }

  async create(session: Session, name: string, visibility: "public" | "private"): Promise<Answer<{ name: string; visibility: Visibility; owner: User }>> {
    if (visibility === "private" && !session.registered) return deny(403, "forbidden", "Guests cannot make private rooms: sign up first");
    if (await this.chat.occupied(name)) return deny(409, "conflict", "A room of that name exists");
    if (!(await this.chat.mayStore(name))) return deny(429, "limit_exceeded", `The server holds its most rooms (MAX_ROOMS=${this.config.maxRooms})`);
    if (!(await this.store.createRoom(name, visibility, session.id, [session.id]))) return deny(409, "conflict", "A room of that name exists");
    const owner = { id: session.id, name: session.name };
    await this.chat.tell({ what: "room", room: name, by: owner });
    return { ok: true, value: { name, visibility, owner } };
  }

  /** The one dm room of two users, made on first use; its name is the same whoever asks. */
  async dm(session: Session, userId: string): Promise<Answer<{ room: string }>> {
    if (userId === session.id) return deny(400, "bad_request", "A direct message needs another user");
    if (!session.registered && this.config.guests !== "write") return deny(403, "forbidden", "Guests cannot start direct messages here");
    if (!(await this.user(userId))) return deny(404, "not_found", "No such user");
    const pair = [session.id, userId].sort().join("\n");
    const room = DM_PREFIX + createHash("sha256").update(pair).digest("hex").slice(0, 20);
    // the other user hears of a new dm as of an invitation
    if (await this.store.createRoom(room, "dm", null, [session.id, userId])) await this.chat.tell({ what: "room", room, by: { id: session.id, name: session.name }, invited: userId });
    return { ok: true, value: { room } };
  }

  async members(session: Session, name: string): Promise<Answer<(User & { role: Role })[]>> {
    const ctx = await this.room(session, name);
    if (!ctx.ok) return ctx;
    return { ok: true, value: await this.store.access.members(name, ctx.value.rules.owner) };
  }

  async audit(session: Session, name: string): Promise<Answer<Awaited<ReturnType<RoomAccess["audit"]>>>> {
    const ctx = await this.room(session, name);
    if (!ctx.ok) return ctx;
    if (ctx.value.rank < RANK.moderator) return deny(403, "forbidden", "Only the room's owner, its moderators and admins may read its audit log");
    return { ok: true, value: await this.store.access.audit(name, AUDIT_LIMIT) };
  }

  /** Resolves room, caller and target, and checks the caller outranks the target (and, with `min`, has that rank). */
  private async against(session: Session, name: string, userId: string, min: number = RANK.moderator): Promise<Answer<RoomContext & { target: User }>> {
    const ctx = await this.room(session, name);
    if (!ctx.ok) return ctx;
    const { rules, rank, admin } = ctx.value;
    if (rules.visibility === "dm") return deny(403, "forbidden", "Direct messages have no moderation");
    if (rank < min) return deny(403, "forbidden", "You may not do that in this room");
    const account = await this.store.accounts.user(userId);
    if (!account) return deny(404, "not_found", "No such user");
    if (!mayModerate(rank, rules.rank(userId, account.admin)) || (userId === session.id && !admin)) return deny(403, "forbidden", "Nobody may moderate someone of their own or a higher rank");
    return { ok: true, value: { ...ctx.value, target: { id: account.id, name: account.name } } };
  }

  async invite(session: Session, name: string, userId: string): Promise<Answer<null>> {
    const ctx = await this.room(session, name);
    if (!ctx.ok) return ctx;
    const { rules, rank, by } = ctx.value;
    if (rules.visibility !== "private") return deny(rules.visibility === "dm" ? 403 : 400, rules.visibility === "dm" ? "forbidden" : "bad_request", "Only private rooms have invitations");
    if (rank < RANK.moderator) return deny(403, "forbidden", "Only the room's owner, its moderators and admins may invite");
    const target = await this.user(userId);
    if (!target) return deny(404, "not_found", "No such user");
    if (!rules.roles.has(userId)) await this.store.access.setRole(name, userId, "member");
    await this.record(name, "invite", target, by);
    await this.chat.tell({ what: "room", room: name, by, invited: userId });
    return { ok: true, value: null };
  }

  /** Kick (public) or remove (private) someone; or leave a private room yourself. */
  async remove(session: Session, name: string, userId: string): Promise<Answer<null>> {
    if (userId === session.id) {
      const ctx = await this.room(session, name);
      if (!ctx.ok) return ctx;
      const { rules, by } = ctx.value;
      if (rules.owner === session.id || rules.visibility === "dm") return deny(403, "forbidden", "The owner cannot leave their room, nor anyone a direct message");
      await this.store.access.setRole(name, userId, null);
      await this.chat.tell({ what: "room", room: name, by, removed: { user: userId, reason: "left" } });
      return { ok: true, value: null };
    }
    const ctx = await this.against(session, name, userId);
    if (!ctx.ok) return ctx;
    const { rules, by, target } = ctx.value;
    if (rules.visibility === "private") await this.store.access.setRole(name, userId, null);
    await this.record(name, "kick", target, by);
    await this.chat.tell({ what: "room", room: name, by, removed: { user: userId, reason: "kicked" }, moderation: { action: "kick", user: target } });
    return { ok: true, value: null };
  }

  async moderator(session: Session, name: string, userId: string, promote: boolean): Promise<Answer<null>> {
    const ctx = await this.against(session, name, userId, RANK.owner);
    if (!ctx.ok) return ctx;
    const { rules, by, target } = ctx.value;
    if (rules.visibility === "private" && !rules.roles.has(userId)) return deny(404, "not_found", "That user is not a member of this room");
    await this.store.access.setRole(name, userId, promote ? "moderator" : "member");
    const action = promote ? "promote" : "demote";
    await this.record(name, action, target, by);
    await this.chat.tell({ what: "room", room: name, by, moderation: { action, user: target } });
    return { ok: true, value: null };
  }

  async ban(session: Session, name: string, userId: string, minutes: number | undefined): Promise<Answer<null>> {
    const ctx = await this.against(session, name, userId);
    if (!ctx.ok) return ctx;
    const { rules, by, target } = ctx.value;
    const until = minutes === undefined ? null : Date.now() + minutes * 60_000;
    await this.store.access.ban(name, userId, until);
    if (rules.visibility === "private") await this.store.access.setRole(name, userId, null);
    await this.record(name, "ban", target, by, until);
    const moderation = { action: "ban" as const, user: target, ...(until ? { until } : {}) };
    await this.chat.tell({ what: "room", room: name, by, removed: { user: userId, reason: "banned" }, moderation });
    return { ok: true, value: null };
  }

  async mute(session: Session, name: string, userId: string, minutes: number): Promise<Answer<null>> {
    const ctx = await this.against(session, name, userId);
    if (!ctx.ok) return ctx;
    const { by, target } = ctx.value;
    const until = Date.now() + minutes * 60_000;
    await this.store.access.mute(name, userId, until);
    await this.record(name, "mute", target, by, until);
    await this.chat.tell({ what: "room", room: name, by, moderation: { action: "mute", user: target, until } });
    return { ok: true, value: null };
  }

  /** Lifts a ban or a mute. */
  async lift(session: Session, name: string, userId: string, what: "ban" | "mute"): Promise<Answer<null>> {
    const ctx = await this.against(session, name, userId);
    if (!ctx.ok) return ctx;
    const { by, target } = ctx.value;
    if (what === "ban") await this.store.access.ban(name, userId, undefined);
    else await this.store.access.mute(name, userId, undefined);
    const action = what === "ban" ? "unban" : "unmute";
    await this.record(name, action, target, by);
    await this.chat.tell({ what: "room", room: name, by, moderation: { action, user: target } });
    return { ok: true, value: null };
  }
}

type AdminUnits = { store: Store; auth: Auth; chat: Chat; rooms: Rooms; fanout: Fanout; logger: Logger };
const NOTHING: Answer<null> = { ok: true, value: null };

/**
 * The admin console's tables and actions. Each action goes through the unit that owns it (Auth, Chat), and is
 * logged as a moderation event and written to the audit log (room "" for the instance's own actions).
 */
class Admin {
  constructor(private readonly units: AdminUnits) {}

  /** Stored rooms with the highest last ids, and the loaded rooms with the most members: who is in each, on every node. */
  async rooms() {
    const { store, rooms, fanout } = this.units;
    type Row = Awaited<ReturnType<RoomAccess["overview"]>>[number] & { online: number };
    const list = new Map<string, Row>((await store.access.overview(ADMIN_LIST_LIMIT)).map((r) => [r.name, { ...r, online: 0 }]));
    for (const room of rooms.busiest()) {
      if (!list.has(room.name)) list.set(room.name, { name: room.name, visibility: room.rules?.visibility ?? "public", lastId: room.lastId, closed: false, messages: 0, lastActivity: null, online: 0 });
    }
    const elsewhere = [...list.keys()].filter((name) => !rooms.get(name));
    const online = await fanout.online(elsewhere);
    elsewhere.forEach((name, i) => (list.get(name)!.online = online[i]));
    for (const row of list.values()) row.online = rooms.get(row.name)?.members.size ?? row.online;
    return [...list.values()].sort((a, b) => b.online - a.online || (b.lastActivity ?? 0) - (a.lastActivity ?? 0));
  }

  /** The users of the most recently seen sessions (or the one named), each with its sessions: handles, never sids. */
  async users(name?: string) {
    const { accounts } = this.units.store;
    type Row = { id: string; name: string; registered: boolean; admin: boolean; banned: boolean; sessions: { id: string; createdAt: number; lastSeenAt: number }[] };
    const session = (s: SessionInfo) => ({ id: s.handle, createdAt: s.created, lastSeenAt: s.seen });
    if (name !== undefined) {
      const user = await accounts.byName(name);
      if (!user) return [];
      return [{ id: user.id, name: user.name, registered: !!user.password, admin: user.admin, banned: user.banned, sessions: (await accounts.sessions(user.id)).map(session) }];
    }
    const users = new Map<string, Row>();
    for (const { user, session: s } of await accounts.recentSessions(ADMIN_LIST_LIMIT)) {
      let row = users.get(user.id);
      if (!row) users.set(user.id, (row = { ...user, sessions: [] }));
      row.sessions.push(session(s));
    }
    return [...users.values()];
  }

  audit() {
    return this.units.store.access.auditAll(ADMIN_LIST_LIMIT);
  }

  async act(admin: Session, action: AdminAction): Promise<Answer<null>> {
    const by = { id: admin.id, name: admin.name };
    let result: Answer<null>;
    switch (action.action) {
      case "revoke": result = await this.revoke(by, action.user, action.session); break;
      case "ban": result = await this.ban(admin, action.user, action.banned); break;
      case "delete": result = await this.delete(by, action.room, action.id); break;
      case "close": result = await this.close(by, action.room, action.closed); break;
      default: action satisfies never; throw new Error("unknown action");
    }
    // Auth.ban logs an instance ban itself, however it is asked for
    if (result.ok && action.action !== "ban") this.units.logger.info("moderation", { ...action, by: admin.id });
    return result;
  }

  private async revoke(by: User, userId: string, handle: string): Promise<Answer<null>> {
    const target = await this.units.store.accounts.user(userId);
    if (!target || !(await this.units.auth.revokeOf(userId, handle))) return deny(404, "not_found", "No such session");
    await this.units.store.access.record("", "revoke", target, by);
    return NOTHING;
  }

  private async ban(admin: Session, userId: string, banned: boolean): Promise<Answer<null>> {
    const result = await this.units.auth.ban(admin, userId, banned);
    const target = result.ok && (await this.units.store.accounts.user(userId));
    if (target) await this.units.store.access.record("", banned ? "ban_user" : "unban_user", target, { id: admin.id, name: admin.name });
    return result;
  }

  private async delete(by: User, room: string, id: number): Promise<Answer<null>> {
    const changed = await this.units.chat.deleteAsAdmin(by.id, room, id);
    if (!changed) return deny(503, "unavailable", "Cannot delete it: the database is unavailable, try again");
    if (!changed.ok) return deny(changed.code === "not_found" ? 404 : 403, changed.code, changed.message);
    if (changed.changed) await this.units.store.access.record(room, "delete", changed.message.user, by);
    return NOTHING;
  }

  /** Closing: nobody but admins may join, and everyone in it is removed (frame `removed`, reason `closed`); reopening lifts it. */
  private async close(by: User, room: string, closed: boolean): Promise<Answer<null>> {
    const { store, chat } = this.units;
    if (!(await store.hasRoom(room))) {
      if (!closed || !(await chat.occupied(room))) return deny(404, "not_found", "No such room");
      await store.createRoom(room, "public", null, []); // someone is in it, nothing was written yet: it gets its row
    }
    await store.access.setClosed(room, closed);
    await store.access.record(room, closed ? "close" : "reopen", by, by);
    await chat.tell({ what: "room", room, by, ...(closed ? { closed: true as const } : {}) });
    return NOTHING;
  }
}

type AppUnits = {
  config: Config; store: Store; sessions: Sessions; auth: Auth; moderation: Moderation; admin: Admin; stats: StatsSampler; chat: Chat; connections: Connections;
  fanout: Fanout; rooms: Rooms; metrics: Metrics; logger: Logger; lifecycle: { shuttingDown: boolean };
};

function createApp(units: AppUnits): Hono<Env> {
  const app = new Hono<Env>();
  app.onError((error, c) => {
    units.logger.error("http", error, { path: c.req.path });
    return httpError(c, 500, "internal", "Something went wrong on the server");
  });
  // the path is not echoed: an error body holds nothing a request put there
  app.notFound((c) => httpError(c, 404, "not_found", "No such route"));
  app.use(async (c, next) => {
    const peer = c.env.requestIP(c.req.raw)?.address ?? "";
    c.set("address", clientAddress(peer, c.req.header("x-forwarded-for"), units.config.trustedProxies));
    await next();
    c.header("x-content-type-options", "nosniff");
  });
  mountOperations(app, units);
  mountPage(app);
  mountApi(app, units);
  mountAdmin(app, units);
  mountSocket(app, units);
  return app;
}

/** Whether the store takes a write, probed at most every HEALTH_PROBE_MS (a full disk fails every write). */
function storeProbe(store: Store) {
  let last = { at: -Infinity, ok: true };
  let running: Promise<boolean> | null = null;
  return async (): Promise<boolean> => {
    if (performance.now() - last.at < HEALTH_PROBE_MS) return last.ok;
    running ??= store.probe().then(() => true, () => false).then((ok) => {
      last = { at: performance.now(), ok };
      running = null;
      return ok;
    });
    return running;
  };
}

/** /healthz for load balancers; /metrics for Prometheus, here unless METRICS_PORT serves it on its own. */
function mountOperations(app: Hono<Env>, units: AppUnits) {
  const { config, store, fanout, lifecycle } = units;
  const writable = storeProbe(store);
  app.get("/healthz", async (c) => {
    if (lifecycle.shuttingDown) return c.json({ status: "shutting_down" }, 503);
    if (!(await writable())) return c.json({ status: "degraded", store: "failing" }, 503);
    // without Redis this node still serves its own clients, and the store fills the gaps later
    if (!fanout.connected) return c.json({ status: "degraded", redis: "disconnected" });
    return c.json({ status: "ok" });
  });
  if (config.metricsPort === undefined) app.get("/metrics", (c) => metricsAnswer(c, units));
}

/**
 * The metrics, for a request with METRICS_TOKEN as its bearer token, or when no token is set for one from
 * this machine that no proxy forwarded (a proxy on the same machine would make every visitor local).
 */
function metricsAnswer(c: Context, { config, fanout, connections, rooms, metrics }: AppUnits) {
  const { metricsToken } = config;
  const peer = c.env.requestIP(c.req.raw)?.address ?? "";
  const local = /^(127\.|::1$|::ffff:127\.)/.test(peer) && !c.req.header("x-forwarded-for") && !c.req.header("forwarded");
  const allowed = metricsToken
    ? safeEqual(c.req.header("authorization") ?? "", `Bearer ${metricsToken}`)
    : local || config.metricsPort !== undefined;
  if (!allowed) return httpError(c, 403, "forbidden", metricsToken ? "Send Authorization: Bearer <METRICS_TOKEN>" : "Metrics are served to this machine only (or set METRICS_TOKEN)");
  const lines = [...fanout.metrics(), ...metrics.lines({ connections: connections.count, rooms: rooms.size, maxFds: openFileLimit() })];
  return c.text(renderMetrics(lines), 200, { "content-type": "text/plain; version=0.0.4; charset=utf-8" });
}

function safeEqual(a: string, b: string): boolean {
  const x = createHash("sha256").update(a).digest();
  return timingSafeEqual(x, createHash("sha256").update(b).digest());
}

/** `/`: the page (and its default icon). It sets no cookie: a session is made when the page asks /api/me. */
function mountPage(app: Hono<Env>) {
  app.get("/", (c) => {
    c.header("cache-control", "no-store");
    c.header("content-security-policy", CLIENT_CSP);
    c.header("referrer-policy", "same-origin"); // not no-referrer: that sends Origin: null on our own PUT
    return c.body(CLIENT_HTML, 200, { "content-type": "text/html; charset=utf-8" });
  });
  app.get("/favicon.ico", (c) => {
    c.header("cache-control", "public, max-age=86400");
    return c.body(FAVICON_SVG, 200, { "content-type": "image/svg+xml" });
  });
}

/** A request's session, making a guest when it has none. */
async function sessionOrGuest(c: Context<Env>, sessions: Sessions): Promise<Session | Response> {
  const found = c.get("session");
  if (found) return found;
  const made = await sessions.create(c, c.get("address"));
  return "status" in made ? httpError(c, made.status, made.code, made.message, made.retryAfterMs) : made;
}

const me = ({ id, name, registered, admin }: Pick<Session, "id" | "name" | "registered" | "admin">) => ({ id, name, registered, admin });
const answer = <T,>(c: Context, result: Answer<T>, ok: (value: T) => Response) =>
  result.ok ? ok(result.value) : httpError(c, result.status, result.code, result.message, result.retryAfterMs);
/** The request's session, or the 401 to send. */
const signedIn = (c: Context<Env>) => c.get("session") ?? httpError(c, 401, "unauthorized", "No session: GET /api/me first, or log in");

function mountApi(app: Hono<Env>, units: AppUnits) {
  const { sessions, chat } = units;
  app.use("/api/*", async (c, next) => {
    // before anything reads the store: a flood of requests from one address costs a token each
    const wait = sessions.request(c.get("address"));
    if (wait) return httpError(c, 429, "rate_limited", `Too many requests from your address: try again in ${wait} ms`, wait);
    if (sessions.cookies.count(c) > 1) return httpError(c, 400, "bad_request", "The request has more than one session cookie: clear this site's cookies");
    c.set("session", await sessions.read(c));
    await next();
  });
  app.get("/api/me", async (c) => {
    const session = await sessionOrGuest(c, sessions);
    return session instanceof Response ? session : c.json(me(session));
  });
  app.put("/api/me", async (c) => {
    const body = await readJson(c, RenameBody, "body must be a JSON object {name}");
    if (!body.ok) return body.answer;
    const session = await sessionOrGuest(c, sessions);
    if (session instanceof Response) return session;
    const result = await chat.rename(session.id, body.value.name, c.get("address"));
    if (!result.ok) return httpError(c, result.code === "rate_limited" ? 429 : 409, result.code, result.message, result.retryAfterMs);
    return c.json(me({ ...session, name: body.value.name }));
  });
  mountAccounts(app, units);
  mountRooms(app, units);
  mountHistory(app, units);
}

/** Passwords, logins and logouts, a user's sessions and devices, instance bans (see Auth). */
function mountAccounts(app: Hono<Env>, { sessions, auth, chat }: AppUnits) {
  app.post("/api/me/password", async (c) => {
    const body = await readJson(c, PasswordBody, "body must be a JSON object {password, currentPassword?}");
    if (!body.ok) return body.answer;
    const session = signedIn(c);
    if (session instanceof Response) return session;
    return answer(c, await auth.setPassword(c, session, body.value.password, body.value.currentPassword), (a) => c.json(me({ ...a, registered: true })));
  });
  app.post("/api/login", async (c) => {
    const body = await readJson(c, LoginBody, "body must be a JSON object {name, password}");
    if (!body.ok) return body.answer;
    const result = await auth.login(c, body.value.name, body.value.password, c.get("session"), c.get("address"));
    return answer(c, result, (a) => c.json(me({ ...a, registered: true })));
  });
  app.post("/api/logout", async (c) => {
    const session = c.get("session");
    if (session) await auth.end(session);
    sessions.cookies.clear(c);
    return c.body(null, 204);
  });
  app.get("/api/me/sessions", async (c) => {
    const session = signedIn(c);
    return session instanceof Response ? session : c.json(await auth.sessionsOf(session));
  });
  app.get("/api/me/rooms", async (c) => {
    const session = signedIn(c);
    return session instanceof Response ? session : c.json(await chat.myRooms(session));
  });
  app.delete("/api/me/sessions/:id", async (c) => {
    const session = signedIn(c);
    if (session instanceof Response) return session;
    return (await auth.revoke(session, c.req.param("id"))) ? c.body(null, 204) : httpError(c, 404, "not_found", "No such session of yours");
  });
  for (const [method, banned] of [["put", true], ["delete", false]] as const) {
    app[method]("/api/users/:userId/ban", async (c) => {
      const session = signedIn(c);
      if (session instanceof Response) return session;
      return answer(c, await auth.ban(session, c.req.param("userId"), banned), () => c.body(null, 204));
    });
  }
}

/** The room list, and what rooms hold: scrollback and search, for those who may read the room. */
function mountHistory(app: Hono<Env>, { chat, store }: AppUnits) {
  app.get("/api/rooms", async (c) => c.json(await chat.listRooms(c.get("session")?.id)));
  /** The room of a request, or its refusal: a private room or dm the caller is not in does not exist, as far as the caller can tell. */
  const readable = async (c: Context): Promise<string | Response> => {
    const room = RoomName.safeParse(c.req.param("room"));
    if (!room.success) return httpError(c, 400, "bad_request", firstIssue(room.error));
    const session = c.get("session");
    if (!(await store.access.rules(room.data)).mayRead(session?.id ?? "", !!session?.admin)) return httpError(c, 404, "not_found", "No such room");
    return room.data;
  };
  app.get("/api/rooms/:room/messages", async (c) => {
    const room = await readable(c);
    if (room instanceof Response) return room;
    const query = MessagesQuery.safeParse(c.req.query());
    if (!query.success) return httpError(c, 400, "bad_request", firstIssue(query.error));
    const { before = Number.MAX_SAFE_INTEGER, limit } = query.data;
    const result = await chat.scrollback(c.get("address"), room, { before, limit });
    if (!result.ok) return httpError(c, 429, result.code, result.message, result.retryAfterMs);
    return c.body(result.body, 200, { "content-type": "application/json" });
  });
  app.get("/api/rooms/:room/search", async (c) => {
    const room = await readable(c);
    if (room instanceof Response) return room;
    const query = SearchQuery.safeParse(c.req.query());
    if (!query.success) return httpError(c, 400, "bad_request", firstIssue(query.error));
    const { q: words, before = Number.MAX_SAFE_INTEGER, limit } = query.data;
    const result = await chat.search(c.get("address"), room, { words, before, limit });
    if (!result.ok) return httpError(c, 429, result.code, result.message, result.retryAfterMs);
    return c.body(result.body, 200, { "content-type": "application/json" });
  });
}

/** /api/rooms and /api/dms: making rooms, their members, moderators, bans, mutes and audit log (see Moderation). */
function mountRooms(app: Hono<Env>, { moderation }: AppUnits) {
  /** Runs `act` for a signed-in caller and a valid room name; 204 on success unless `ok` answers otherwise. */
  const route = <T,>(act: (session: Session, room: string, c: Context<Env>) => Promise<Answer<T> | Response>, ok?: (c: Context, value: T) => Response) =>
    async (c: Context<Env>) => {
      const session = signedIn(c);
      if (session instanceof Response) return session;
      const room = RoomName.safeParse(c.req.param("room"));
      if (!room.success) return httpError(c, 404, "not_found", "No such room");
      const result = await act(session, room.data, c);
      if (result instanceof Response) return result;
      return answer(c, result, (value) => (ok ? ok(c, value) : c.body(null, 204)));
    };
  const user = (c: Context) => c.req.param("userId") ?? "";
  app.post("/api/rooms", async (c) => {
    const body = await readJson(c, CreateRoomBody, "body must be a JSON object {name, visibility}");
    if (!body.ok) return body.answer;
    const session = signedIn(c);
    if (session instanceof Response) return session;
    return answer(c, await moderation.create(session, body.value.name, body.value.visibility), (room) => c.json(room, 201));
  });
  app.post("/api/dms", async (c) => {
    const body = await readJson(c, DmBody, "body must be a JSON object {user}");
    if (!body.ok) return body.answer;
    const session = signedIn(c);
    if (session instanceof Response) return session;
    return answer(c, await moderation.dm(session, body.value.user), (dm) => c.json(dm));
  });
  app.get("/api/rooms/:room/members", route((s, room) => moderation.members(s, room), (c, list) => c.json(list)));
  app.get("/api/rooms/:room/audit", route((s, room) => moderation.audit(s, room), (c, list) => c.json(list)));
  app.put("/api/rooms/:room/members/:userId", route((s, room, c) => moderation.invite(s, room, user(c))));
  app.delete("/api/rooms/:room/members/:userId", route((s, room, c) => moderation.remove(s, room, user(c))));
  app.put("/api/rooms/:room/moderators/:userId", route((s, room, c) => moderation.moderator(s, room, user(c), true)));
  app.delete("/api/rooms/:room/moderators/:userId", route((s, room, c) => moderation.moderator(s, room, user(c), false)));
  app.put("/api/rooms/:room/bans/:userId", route(async (s, room, c) => {
    // the body is optional: no body (or {}) bans until lifted
    const empty = !(await c.req.text()).trim(); // Hono keeps the body for readJson
    const body = empty ? { ok: true as const, value: {} } : await readJson(c, BanBody, "body must be a JSON object {minutes?}");
    return body.ok ? moderation.ban(s, room, user(c), body.value.minutes) : body.answer;
  }));
  app.delete("/api/rooms/:room/bans/:userId", route((s, room, c) => moderation.lift(s, room, user(c), "ban")));
  app.put("/api/rooms/:room/mutes/:userId", route(async (s, room, c) => {
    const body = await readJson(c, MuteBody, "body must be a JSON object {minutes}");
    return body.ok ? moderation.mute(s, room, user(c), body.value.minutes) : body.answer;
  }));
  app.delete("/api/rooms/:room/mutes/:userId", route((s, room, c) => moderation.lift(s, room, user(c), "mute")));
}

/**
 * /admin, the console, and /api/admin, its data and actions: instance admins only (401 without a session, 403 for a
 * guest or an account that is not an admin; /admin itself answers 403 with the page, which then says so). POSTs are
 * JSON only (a cross-site form cannot send that without a CORS preflight, which fails) and from an allowed Origin.
 */
function mountAdmin(app: Hono<Env>, { config, sessions, admin, stats }: AppUnits) {
  app.get("/admin", async (c) => {
    c.header("cache-control", "no-store");
    c.header("content-security-policy", ADMIN_CSP);
    c.header("referrer-policy", "same-origin");
    const session = await sessions.read(c);
    return c.body(ADMIN_HTML, session?.admin ? 200 : 403, { "content-type": "text/html; charset=utf-8" });
  });
  app.use("/api/admin/*", async (c, next) => {
    const session = signedIn(c);
    if (session instanceof Response) return session;
    if (!session.admin) return httpError(c, 403, "forbidden", "Only the instance's admins may use the admin console");
    const origin = c.req.header("origin");
    if (c.req.method !== "GET" && origin !== undefined && !originAllowed(config.allowedOrigins, origin, c.req.header("host"), isSecure(c))) {
      return httpError(c, 403, "forbidden", "This origin may not act as an admin");
    }
    await next();
  });
  app.get("/api/admin/stats", (c) => {
    const query = AdminStatsQuery.safeParse(c.req.query());
    if (!query.success) return httpError(c, 400, "bad_request", firstIssue(query.error));
    return c.json({ now: Date.now(), nodes: stats.view(query.data.since) });
  });
  app.get("/api/admin/rooms", async (c) => c.json(await admin.rooms()));
  app.get("/api/admin/users", async (c) => {
    const query = AdminUsersQuery.safeParse(c.req.query());
    if (!query.success) return httpError(c, 400, "bad_request", firstIssue(query.error));
    return c.json(await admin.users(query.data.name));
  });
  app.get("/api/admin/audit", async (c) => c.json(await admin.audit()));
  app.post("/api/admin/actions", async (c) => {
    const body = await readJson(c, AdminAction, "body must be a JSON object {action, …}");
    if (!body.ok) return body.answer;
    return answer(c, await admin.act(c.get("session")!, body.value), () => c.body(null, 204));
  });
}

/** GET /chat: the upgrade, after the origin, session and connection limits are checked. */
function mountSocket(app: Hono<Env>, { config, sessions, connections, lifecycle, logger }: AppUnits) {
  /** A refused upgrade: counted into the minute's log line for its reason, then answered. */
  const refuse = (c: Context<Env>, reason: string, status: ContentfulStatusCode, code: string, message: string, retryAfterMs?: number) => {
    logger.tally("refused", reason, c.get("address"));
    return httpError(c, status, code, message, retryAfterMs);
  };
  app.get("/chat", async (c) => {
    if (c.req.header("upgrade")?.toLowerCase() !== "websocket") return httpError(c, 426, "upgrade_required", "GET /chat is a WebSocket endpoint");
    const origin = c.req.header("origin");
    if (origin !== undefined && !originAllowed(config.allowedOrigins, origin, c.req.header("host"), isSecure(c))) {
      return refuse(c, "origin", 403, "forbidden", "This origin may not open /chat");
    }
    if (sessions.cookies.count(c) > 1) return httpError(c, 400, "bad_request", "The request has more than one session cookie: clear this site's cookies");
    const address = c.get("address");
    const wait = sessions.upgrade(address);
    if (wait) {
      return refuse(c, "upgrades_per_address", 429, "rate_limited", `Too many connections opened from your address: try again in ${wait} ms`, wait);
    }
    const session = await sessions.read(c);
    if (!session) return refuse(c, "no_session", 401, "unauthorized", "No valid session: load / first (the page asks /api/me for one)");
    if (config.guests === "off" && !session.registered) return refuse(c, "guests_off", 401, "unauthorized", "Guests may not chat here: sign up or log in");
    if (lifecycle.shuttingDown) return httpError(c, 503, "unavailable", "Server is shutting down");
    // before the limits: nothing may await between them and the upgrade, or a burst gets past them
    await sessions.opened(session);
    const data = connections.admit(session, address);
    if ("status" in data) return refuse(c, data.reason ?? data.code, data.status, data.code, data.message);
    if (c.env.upgrade(c.req.raw, { data })) return new Response(null);
    connections.abandon(data);
    return httpError(c, 400, "bad_request", "WebSocket upgrade failed");
  });
}

/** By default the same host and port; an http page may not reach a server known to be https (an https page may
 * reach plain http: a TLS proxy that sets no X-Forwarded-Proto looks like that). */
function originAllowed(allowed: string[] | undefined, origin: string, host: string | undefined, secure: boolean): boolean {
  if (allowed) return allowed.some((o) => new URL(o).origin === origin);
  try {
    const url = new URL(origin);
    return url.host === host && !(secure && url.protocol === "http:");
  } catch {
    return false;
  }
}

// ── WebSocket: one handler per frame type ───────────────────────────────────

type FrameHandlers = { [T in ClientMessage["type"]]: (ws: ChatSocket, msg: Frame<T>) => void };

function socketHandlers({ config, chat, connections, metrics, logger }: { config: Config; chat: Chat; connections: Connections; metrics: Metrics; logger: Logger }): WebSocketHandler<SocketData> {
  const handlers: FrameHandlers = {
    join: (ws, msg) => void chat.join(ws, msg.room, msg.since).catch((error) => logger.error("join", error, { room: msg.room })),
    history: (ws, msg) => chat.page(ws, msg.room, msg.after),
    leave: (ws, msg) => chat.part(ws, msg.room), // the close handler leaves with chat.leave: the user's rooms stay
    say: (ws, msg) => chat.say(ws, msg),
    edit: (ws, msg) => chat.change(ws, msg),
    delete: (ws, msg) => chat.change(ws, msg),
    react: (ws, msg) => chat.change(ws, msg),
    typing: (ws, msg) => chat.typing(ws, msg.room),
    read: (ws, msg) => chat.read(ws, msg.room, msg.seq),
    nick: (ws, msg) => void chat.rename(ws.data.user.id, msg.name, ws.data.address).then(
      (result) => {
        if (!result.ok && !ws.data.closed) sendError(ws, result.code, result.message, { retryAfterMs: result.retryAfterMs });
      },
      (error) => {
        logger.error("nick", error);
        if (!ws.data.closed) sendError(ws, "unavailable", "Cannot rename now: the database is unavailable");
      },
    ),
  };
  return {
    maxPayloadLength: MAX_FRAME,
    backpressureLimit: BACKPRESSURE_LIMIT,
    closeOnBackpressureLimit: true,
    idleTimeout: config.idleTimeout,
    sendPings: true,
    open(ws) {
      connections.opened(ws);
      logger.debug("connection_opened", { user: ws.data.user.id, address: ws.data.address, connections: connections.count });
      send(ws, { type: "welcome", user: userOf(ws), maxText: config.maxText });
    },
    message(ws, raw) {
      const start = performance.now();
      const parsed = parseClientMessage(raw);
      if (!parsed.ok) {
        metrics.framesRejected++;
        sendError(ws, "bad_request", parsed.error, { ref: parsed.ref });
      } else (handlers[parsed.value.type] as (ws: ChatSocket, msg: ClientMessage) => void)(ws, parsed.value);
      metrics.frames.observe((performance.now() - start) / 1000);
    },
    drain(ws) {
      ws.data.pressured = false;
    },
    close(ws, code, reason) {
      const data = ws.data;
      data.closed = true;
      // Bun closes slow readers itself (1006); unsent bytes at close, or a send that met backpressure, tell them from clean exits
      if (code === 1006 && reason === "" && (data.buffered > 0 || data.pressured)) {
        metrics.slowConsumersClosed++;
        logger.tally("slow_consumers", "backpressure", data.address);
      }
      logger.debug("connection_closed", { user: data.user.id, address: data.address, code, durationMs: Math.round(performance.now() - data.opened) });
      for (const room of [...data.rooms, ...(data.joining ?? [])]) chat.leave(ws, room);
      connections.closed(ws);
    },
  };
}

// ── startServer: the units, wired in the order data flows ────────────────────

/** The soft limit on open files (Linux), else FD_LIMIT_FALLBACK. */
export function openFileLimit(limits = "/proc/self/limits"): number {
  try {
    const soft = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync(limits, "utf8"))?.[1];
    if (soft) return soft === "unlimited" ? Number.MAX_SAFE_INTEGER : Number(soft);
  } catch {}
  return FD_LIMIT_FALLBACK;
}

/** MAX_CONNECTIONS: unset (0) or above what the descriptors allow, the open-file limit less a reserve for HTTP
 * requests, the database and Redis, so a full server still answers /healthz. */
export function connectionLimit(wanted: number, fdLimit: number, logger: Logger): number {
  const allowed = Math.max(1, fdLimit - Math.max(FD_RESERVE_MIN, Math.ceil(fdLimit / 4)));
  if (wanted === 0) return allowed;
  if (wanted > allowed) logger.warn("config", { setting: "MAX_CONNECTIONS", warning: `MAX_CONNECTIONS=${wanted} lowered to ${allowed}: the open-file limit is ${fdLimit}` });
  return Math.min(wanted, allowed);
}

/** A URL without its password, for logs: postgres://chat:***@db:5432/chat. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = "***";
    return u.toString();
  } catch {
    return url.replace(/\/\/[^@/]*@/, "//***@");
  }
}

/** The database a start line names: its kind and where it is (never a password). */
function describeDatabase(url: string): { kind: string; where: string } {
  if (url === ":memory:") return { kind: "sqlite", where: ":memory:" };
  if (url.startsWith("sqlite://")) return { kind: "sqlite", where: resolve(url.slice("sqlite://".length)) };
  return { kind: "postgres", where: redactUrl(url) };
}

/**
 * openStore, retried while the database cannot be reached, one log line a try naming the setting and host; after
 * DATABASE_WAIT the error names them too. A SQLite file that cannot be opened fails at once: waiting will not help.
 */
async function openStoreRetrying(config: Config, logger: Logger): Promise<Store> {
  const { databaseUrl: url, databaseWait, retentionDays } = config;
  const deadline = performance.now() + databaseWait;
  for (let attempt = 1; ; attempt++) {
    try {
      return await openStore(url, { retention: retentionDays > 0 });
    } catch (error) {
      const where = describeDatabase(url).where;
      if (!/^postgres/.test(url)) throw new Error(`Cannot open DATABASE_URL=${where}: ${describeError(error)}`);
      const retryInMs = Math.min(DB_RETRY_MAX_MS, DB_RETRY_MS * 2 ** (attempt - 1), deadline - performance.now());
      if (retryInMs <= 0) throw new Error(`Cannot reach DATABASE_URL=${where} after ${attempt} tries in ${databaseWait / 1000} s: ${describeError(error)}`);
      logger.warn("database_unreachable", { setting: "DATABASE_URL", host: hostOf(url), attempt, retryInMs: Math.round(retryInMs), error: describeError(error) });
      await Bun.sleep(retryInMs);
    }
  }
}

/** host:port of a URL, for a log line. */
function hostOf(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return "(unparsable URL)";
  }
}

/** Bun.serve, with a failure to listen named by the settings behind it (EADDRINUSE, EADDRNOTAVAIL, EACCES). */
function listen<T>(config: Config, serve: () => T): T {
  try {
    return serve();
  } catch (error) {
    const code = (error as { code?: string }).code ?? "";
    const why = { EADDRINUSE: "the port is in use", EADDRNOTAVAIL: "the address is not one of this machine's", EACCES: "ports below 1024 need privileges" }[code] ?? describeError(error);
    throw new Error(`Cannot listen on HOST=${config.host} PORT=${config.port}: ${why}`);
  }
}

export type ServerOptions = Partial<ConfigInput> & {
  /** Receives one object per event; off in tests. */
  log?: Log;
};

type JanitorUnits = { chat: Chat; sessions: Sessions; connections: Connections; store: Store; retention: Retention; logger: Logger };

/** Every JANITOR_MS: forget idle state, keep open sessions seen, prune sessions and failed logins, expire messages. */
function janitor({ chat, sessions, connections, store, retention, logger }: JanitorUnits) {
  chat.forgetStale();
  sessions.forgetStale(performance.now() - STALE_MS);
  void sessions.stillOpen([...connections.all()].map((ws) => ws.data.sid)).then(() => sessions.prune())
    .then(() => store.accounts.pruneFailures(Date.now() - LOGIN_WINDOW_MS))
    .catch((error) => logger.error("touch_sessions", error));
  retention.run().catch((error) => logger.error("retention", error));
}

const hostPort = (host: string | undefined, port: number | undefined) => `${host?.includes(":") ? `[${host}]` : host}:${port}`;

/** The start line: the address really listened on and what this process runs with. Returns a URL to open here. */
function announceStart(logger: Logger, config: Config, nodeId: string, server: Server<unknown>, metricsServer: Server<unknown> | null): string {
  const url = `http://${hostPort(/^(0\.0\.0\.0|::)$/.test(config.host) ? "127.0.0.1" : config.host, server.port)}`;
  logger.info("start", {
    listen: hostPort(server.hostname, server.port), port: server.port, url, version: VERSION, bun: Bun.version, pid: process.pid,
    database: describeDatabase(config.databaseUrl), node: nodeId, cluster: config.redisUrl ? redactUrl(config.redisUrl) : null,
    ...(metricsServer && { metrics: hostPort(metricsServer.hostname, metricsServer.port) }),
  });
  return url;
}

/** The units, made in the order data flows, each given the ones it uses. */
function wire(config: Config, { nodeId, store, fanout, secret, logger }: { nodeId: string; store: Store; fanout: Fanout; secret: string; logger: Logger }) {
  const metrics = new Metrics();
  const topics = new Topics();
  const connections = new Connections(config, metrics);
  const rooms = new Rooms({ store, fanout, topics, connections, metrics, logger }, config);
  const queue = new SayQueue(store, rooms, fanout, metrics, logger, (text) => store.reading.resolveMentions(text));
  const retention = new Retention(config, { store, rooms, fanout });
  const chat = new Chat(config, { store, fanout, rooms, connections, queue, retention, metrics, logger });
  fanout.listen(chat.fanoutEvents());
  const sessions = new Sessions(store, new Cookies(secret), config, metrics, logger);
  const auth = new Auth(store, sessions, connections, chat, metrics, config.maxSessionsPerUser, logger);
  const moderation = new Moderation(store, chat, config, logger);
  const admin = new Admin({ store, auth, chat, rooms, fanout, logger });
  const stats = new StatsSampler(nodeId, { metrics, connections, rooms, fanout, logger });
  const lifecycle = { shuttingDown: false };
  return { config, store, sessions, auth, moderation, admin, stats, chat, connections, fanout, rooms, metrics, logger, lifecycle, topics, queue, retention };
}

/** The periodic work of a running server (none of it keeps the process alive): cleared by stop(). */
function startTimers({ chat, sessions, connections, store, retention, logger, metrics, stats }: ReturnType<typeof wire>) {
  const timers = [
    setInterval(() => connections.sampleBuffered(), BUFFER_SAMPLE_MS),
    setInterval(() => janitor({ chat, sessions, connections, store, retention, logger }), JANITOR_MS),
    setInterval(() => logger.flush(LOG_SUMMARY_MS), LOG_SUMMARY_MS),
    watchLoopLag(metrics),
    stats.start(),
  ];
  for (const timer of timers) timer.unref();
  return timers;
}

/** Starts a chat server; resolves once it listens. */
export async function startServer(options: ServerOptions = {}) {
  const { log = () => {}, ...input } = options;
  const config = Config.parse(input);
  const logger = new Logger(log, config.logLevel);
  config.maxConnections = connectionLimit(config.maxConnections, openFileLimit(), logger);
  const nodeId = config.nodeId ?? randomId(NODE_SUFFIX_BYTES);
  const store = await openStoreRetrying(config, logger);
  const secret = config.sessionSecret ?? (await store.secret(randomId(SECRET_BYTES)));
  const fanout = config.redisUrl ? await RedisFanout.open(config.redisUrl, nodeId, logger) : new LocalFanout(nodeId);
  const units = wire(config, { nodeId, store, fanout, secret, logger });
  const { metrics, topics, connections, rooms, queue, retention, chat, sessions, lifecycle } = units;
  const app = createApp(units);
  const server = listen(config, () => Bun.serve<SocketData>({
    port: config.port,
    hostname: config.host,
    fetch: (req, srv) => app.fetch(req, srv),
    maxRequestBodySize: MAX_FRAME, // bodies are small JSON objects; Bun's default would buffer 128 MB per request
    websocket: socketHandlers({ config, chat, connections, metrics, logger }),
  }));
  topics.bind(server);
  // METRICS_PORT: /metrics alone, on its own (loopback by default) listener
  const metricsServer = config.metricsPort === undefined ? null : Bun.serve({
    port: config.metricsPort,
    hostname: config.metricsHost,
    fetch: new Hono<Env>().get("/metrics", (c) => metricsAnswer(c, units)).fetch,
  });
  const timers = startTimers(units);

  let stopped = false;
  const started = performance.now();
  /** Graceful stop: health 503, accepted messages stored and broadcast, then sockets close with 1001. */
  async function stop() {
    if (stopped) return;
    stopped = lifecycle.shuttingDown = true;
    const stopping = performance.now();
    timers.forEach(clearInterval);
    rooms.close();
    await queue.drain();
    for (const ws of [...connections.all()]) ws.close(1001, "server shutting down");
    await server.stop();
    await metricsServer?.stop();
    await fanout.close();
    await store.close();
    logger.flush(performance.now() - started);
    logger.info("stop", { durationMs: Math.round(performance.now() - stopping), uptimeS: Math.round((performance.now() - started) / 1000) });
  }

  const url = announceStart(logger, config, nodeId, server, metricsServer);
  return {
    server, port: server.port!, url, config, store, metrics, stop,
    metricsPort: metricsServer?.port,
    /** Starts shutting down: health answers 503 and new sockets are refused; the rest keeps working. */
    drain: () => void (lifecycle.shuttingDown = true),
    pruneSessions: () => sessions.prune(),
    /** The janitor's retention pass (RETENTION_DAYS, empty rooms), as if at `now` (ms since the epoch). */
    prune: (now?: number) => retention.run(now),
    /** What the janitor does every JANITOR_MS, as if at `now`. */
    forgetStale: (now?: number) => chat.forgetStale(now),
  };
}
export type ChatServer = Awaited<ReturnType<typeof startServer>>;

// ── main: the command line ───────────────────────────────────────────────────

/** How this program is run: `bun run server.ts`, or the compiled binary's own path. */
function programName(): string {
  return Bun.main.startsWith("/$bunfs/") ? process.execPath : "bun run server.ts";
}

/** Where log lines go: stdout, as JSON unless LOG_FORMAT=pretty (or auto on a terminal). */
function stdoutLog(format: Config["logFormat"]): Log {
  const pretty = format === "pretty" || (format === "auto" && process.stdout.isTTY);
  return (line) => console.log(pretty ? prettyLine(line) : JSON.stringify(line));
}

const COMMANDS = ["serve", "grant-admin", "backup", "check"] as const;

/** --help, --version, the commands, else serve until SIGTERM or SIGINT (a graceful stop, forced after SHUTDOWN_TIMEOUT_MS). */
async function main(argv: string[], env: Record<string, string | undefined>) {
  if (argv.includes("--help") || argv.includes("-h")) return exit(0, help(programName()));
  if (argv.includes("--version")) return exit(0, `chat ${VERSION} (Bun ${Bun.version})`);
  const command = COMMANDS.find((c) => c === argv[0]) ?? "serve";
  if (command === argv[0]) argv.shift();
  const operand = command === "grant-admin" || command === "backup" ? argv.shift() : undefined;
  let config: Config;
  let settings: Record<string, string>;
  try {
    settings = readSettings(env, argv);
    config = parseConfig(settings);
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    return exit(command === "check" ? 1 : 2, undefined, error.message);
  }
  const log = stdoutLog(config.logFormat);
  if (command === "grant-admin") return exit(await grantAdmin(config.databaseUrl, operand));
  if (command === "backup") return exit(await backup(config.databaseUrl, operand));
  if (command === "check") return exit(await check(config));
  const logger = new Logger(log, config.logLevel);
  const chat = await startServer({ ...settings, log }).catch((error) => {
    logger.error("start_failed", error);
    return exit(1);
  });
  let stopping = false;
  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    process.on(signal, () => {
      if (stopping) return;
      stopping = true;
      logger.info("stopping", { signal });
      setTimeout(() => {
        logger.error("stop_failed", `still stopping after ${SHUTDOWN_TIMEOUT_MS} ms: exiting`);
        process.exit(1);
      }, SHUTDOWN_TIMEOUT_MS).unref();
      chat.stop().then(
        () => process.exit(0),
        (error) => {
          logger.error("stop_failed", error);
          process.exit(1);
        },
      );
    });
  }
}

/** Prints to stdout or stderr and exits; typed as never so callers can return it. */
function exit(code: number, out?: string, err?: string): never {
  if (out !== undefined) console.log(out);
  if (err !== undefined) console.error(err);
  process.exit(code);
}

/** `backup <file>`: a consistent copy of a SQLite database, made with VACUUM INTO while the server may be writing it. */
async function backup(databaseUrl: string, file: string | undefined): Promise<number> {
  if (!file) return usage("backup <file>");
  if (!databaseUrl.startsWith("sqlite://")) {
    console.error(`Cannot back up DATABASE_URL=${redactUrl(databaseUrl)} here: ${databaseUrl === ":memory:" ? "an in-memory database is gone with its process" : "for Postgres use pg_dump (see README, Deploying)"}`);
    return 1;
  }
  if (existsSync(file)) {
    console.error(`Cannot back up to ${file}: it exists (VACUUM INTO writes a new file; remove it or pick another name)`);
    return 1;
  }
  const source = databaseUrl.slice("sqlite://".length);
  if (!existsSync(source)) {
    console.error(`Cannot back up DATABASE_URL=${databaseUrl}: no such file`);
    return 1;
  }
  const db = new Database(source, { readonly: true });
  try {
    db.run(`PRAGMA busy_timeout = ${BACKUP_BUSY_MS}`);
    const started = performance.now();
    db.run("VACUUM INTO ?", [file]);
    const copy = new Database(file, { readonly: true });
    const [{ integrity_check }] = copy.query("PRAGMA integrity_check").all() as { integrity_check: string }[];
    const { n } = copy.query("SELECT count(*) AS n FROM messages").get() as { n: number };
    copy.close();
    if (integrity_check !== "ok") throw new Error(`the copy fails its integrity check: ${integrity_check}`);
    console.log(`Backed up ${source} to ${file}: ${n} messages, ${Math.round(performance.now() - started)} ms`);
    return 0;
  } catch (error) {
    console.error(`Cannot back up ${source} to ${file}: ${describeError(error)}`);
    return 1;
  } finally {
    db.close();
  }
}

/** `check`: the settings parse (main did that), the database answers, and Redis if REDIS_URL is set. Exit 0 or 1. */
async function check(config: Config): Promise<number> {
  let ok = true;
  try {
    console.log(`ok: DATABASE_URL (${await probeDatabase(config.databaseUrl)})`);
  } catch (error) {
    ok = false;
    console.error(`failed: Cannot use DATABASE_URL=${describeDatabase(config.databaseUrl).where}: ${describeError(error)}`);
  }
  if (config.redisUrl) {
    const redis = new RedisClient(config.redisUrl, { autoReconnect: false, maxRetries: 0, connectionTimeout: REDIS_CONNECT_TIMEOUT_MS });
    try {
      await redis.connect();
      await redis.send("PING", []);
      console.log(`ok: REDIS_URL (${redactUrl(config.redisUrl)})`);
    } catch (error) {
      ok = false;
      console.error(`failed: Cannot reach REDIS_URL=${redactUrl(config.redisUrl)}: ${describeError(error)}`);
    } finally {
      redis.close();
    }
  }
  return ok ? 0 : 1;
}

/** What `check` says of the database, read without changing it (no file made, no migration run); throws if unusable. */
async function probeDatabase(url: string): Promise<string> {
  const { kind, where } = describeDatabase(url);
  if (kind === "sqlite") {
    if (where === ":memory:") return "sqlite in memory: gone when the process stops";
    if (!existsSync(where)) {
      accessSync(dirname(where), constants.W_OK);
      return `sqlite at ${where}: not made yet; it will be, its directory is writable`;
    }
    const db = new Database(where, { readonly: true });
    try {
      return `sqlite at ${where}: ${schemaState(db.query("SELECT value FROM meta WHERE key = 'schema_version'").get() as { value: string } | null)}`;
    } finally {
      db.close();
    }
  }
  const sql = new SQL(url, { max: 1, connectionTimeout: PG_CONNECT_TIMEOUT_S });
  try {
    const [{ meta }] = await sql`SELECT to_regclass('meta') IS NOT NULL AS meta`;
    const [row] = meta ? await sql`SELECT value FROM meta WHERE key = 'schema_version'` : [null];
    return `postgres at ${where}: ${schemaState(row ?? null)}`;
  } finally {
    await sql.close();
  }
}

function schemaState(row: { value: string } | null): string {
  if (!row) return "no chat tables yet; the server makes them";
  const v = Number(row.value);
  if (v > SCHEMA_VERSION) throw new Error(`schema version ${v} is newer than this server's ${SCHEMA_VERSION}: run a newer release`);
  return v === SCHEMA_VERSION ? `schema version ${v}` : `schema version ${v}; the server migrates it to ${SCHEMA_VERSION} when it starts`;
}

function usage(what: string): number {
  console.error(`Usage: ${programName()} ${what}`);
  return 2;
}

/** `grant-admin <name>`: for an instance whose first account (its admin) is gone. The exit code. */
async function grantAdmin(databaseUrl: string, name: string | undefined): Promise<number> {
  if (!name) return usage("grant-admin <name>");
  const store = await openStore(databaseUrl);
  try {
    const user = await store.accounts.byName(name);
    if (!user?.password) {
      console.error(`Cannot grant admin: no account named ${JSON.stringify(name)} (a guest must sign up first)`);
      return 1;
    }
    await store.accounts.setAdmin(user.id, true);
    console.log(`${user.name} (${user.id}) is now an admin`);
    return 0;
  } finally {
    await store.close();
  }
}

if (import.meta.main) await main(process.argv.slice(2), process.env);
