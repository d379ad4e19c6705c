// Running it for real: npm start under a supervisor's signal, unreachable Redis and Postgres at start, bad
// settings, the backup and check commands, and the log lines of a session of chatting. Real processes throughout.
import { describe, expect, test } from "bun:test";
import { Database } from "bun:sqlite";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { SETTINGS } from "../server.ts";
import { BUN, Client, newSession, putName, ROOT, spawnServer, tempDir, until, usersInRoom, type Session, type Spawned } from "./helpers.ts";
import { freePort, missingServices, startPostgres, startRedis } from "./services.ts";

const skip = missingServices();
const json = { "content-type": "application/json" };

type Line = { time: string; level: string; event: string } & Record<string, unknown>;
const parsed = (child: Spawned): Line[] => child.lines.filter((l) => l.trim()).map((l) => JSON.parse(l));
const seen = (child: Spawned, event: string, fields: Record<string, unknown> = {}) =>
  parsed(child).find((l) => l.event === event && Object.entries(fields).every(([k, v]) => l[k] === v));

/** Runs `bun server.ts <args>` to its end: exit code, stdout and stderr. */
async function run(args: string[], env: Record<string, string> = {}) {
  const proc = Bun.spawn([BUN, join(ROOT, "server.ts"), ...args], { cwd: ROOT, env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe" });
  const timer = setTimeout(() => proc.kill(9), 30_000);
  const [code, out, err] = await Promise.all([proc.exited, new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  clearTimeout(timer);
  return { code, out, err };
}

/** True while a process with this pid exists. */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe("starts and stops", () => {
  test("npm start runs the server with the FTL JIT off, and stops when npm is sent SIGTERM: the server it started exits too and frees its port", async () => {
    using tmp = tempDir();
    const npm = Bun.which("npm");
    expect(npm).toBeTruthy();
    await using child = await spawnServer({ DATABASE_URL: `sqlite://${tmp.dir}/chat.db` }, [npm!, "start", "--silent"]);
    const start = seen(child, "start")!;
    expect(start.pid).not.toBe(child.proc.pid); // the server is npm's child, not npm itself
    // JavaScriptCore reads its options from the environment it starts with (README, "Deploying")
    expect(readFileSync(`/proc/${start.pid}/environ`, "utf8").split("\0")).toContain("BUN_JSC_useFTLJIT=0");
    expect((await fetch(`${child.url}/healthz`)).status).toBe(200);
    child.proc.kill("SIGTERM");
    await child.proc.exited;
    await until(() => !alive(start.pid as number), 10_000, "the server to exit after npm");
    expect(await fetch(`${child.url}/healthz`).then(() => "answered", () => "refused")).toBe("refused");
  });

  test("an unreachable Redis at start: one line a retry naming REDIS_URL and its host, the node serves degraded, and joins the cluster once Redis is up", async () => {
    if (skip) throw new Error(skip);
    await using redis = await startRedis();
    await redis.stop();
    await using child = await spawnServer({ DATABASE_URL: ":memory:", REDIS_URL: redis.url });
    const first = seen(child, "redis_unreachable")!;
    expect(first).toMatchObject({ level: "warn", setting: "REDIS_URL", host: `127.0.0.1:${redis.port}`, attempt: 1, degraded: true });
    expect(await (await fetch(`${child.url}/healthz`)).json()).toEqual({ status: "degraded", redis: "disconnected" });
    const { clients: [a] } = await usersInRoom(child.url, 1, "room");
    expect((await a.say("room", "served while Redis is down")).id).toBe(1);
    await until(() => seen(child, "redis_unreachable", { attempt: 2 }), 10_000, "a second try");
    await redis.restart();
    await until(() => seen(child, "redis", { state: "up" }), 15_000, "the redis up line");
    await until(async () => ((await (await fetch(`${child.url}/healthz`)).json()) as { status: string }).status === "ok", 5_000, "healthz ok");
  }, 30_000);

  test("an unreachable Postgres at start: one line a retry naming DATABASE_URL and its host, then exit 1 after DATABASE_WAIT", async () => {
    const port = freePort();
    const { code, out } = await run([], { PORT: "0", DATABASE_URL: `postgres://chat:secret@127.0.0.1:${port}/chat`, DATABASE_WAIT: "2s" });
    expect(code).toBe(1);
    const lines = out.trim().split("\n").map((l) => JSON.parse(l) as Line);
    const retries = lines.filter((l) => l.event === "database_unreachable");
    expect(retries.length).toBeGreaterThanOrEqual(2);
    for (const [i, l] of retries.entries()) expect(l).toMatchObject({ level: "warn", setting: "DATABASE_URL", host: `127.0.0.1:${port}`, attempt: i + 1 });
    expect(lines.at(-1)).toMatchObject({ level: "error", event: "start_failed", error: expect.stringContaining(`DATABASE_URL=postgres://chat:***@127.0.0.1:${port}/chat`) });
    expect(out).not.toContain("secret");
  });

  test("every setting with a bad value stops the start with one line naming it, exit 2", async () => {
    const bad: Record<string, string> = {
      PORT: "70000", HOST: "999.1.1.1", DATABASE_URL: "mysql://db/chat", REDIS_URL: "garbage", NODE_ID: "no spaces", SESSION_SECRET: "short",
      ALLOWED_ORIGINS: "not a url", HISTORY_ON_JOIN: "-1", RECOVERY_LIMIT: "0", MAX_TEXT: "x", RATE_LIMIT: "20 per 10s", RENAME_LIMIT: "5/0s",
      JOIN_LIMIT: "many", PRESENCE_INTERVAL_MS: "0", HISTORY_PAGE_BYTES: "10", HISTORY_BYTES: "4MB", HISTORY_BYTES_PER_ADDRESS: "1/0s",
      MAX_CONNECTIONS: "-5", MAX_CONNECTIONS_PER_USER: "0", MAX_ROOMS_PER_CONNECTION: "0", MAX_UNUSED_SESSIONS: "0", MAX_SESSIONS: "0",
      GUEST_TTL: "30 days", TRUSTED_PROXIES: "10.0.0.0/99", SESSIONS_PER_ADDRESS: "x", UPGRADES_PER_ADDRESS: "x", MAX_CONNECTIONS_PER_ADDRESS: "0",
      RATE_LIMIT_PER_ADDRESS: "x", REQUESTS_PER_ADDRESS: "x", RENAME_LIMIT_PER_ADDRESS: "x", METRICS_PORT: "x", METRICS_HOST: "999.0.0.1",
      METRICS_TOKEN: "short", RETENTION_DAYS: "-1", MAX_ROOMS: "0", GUESTS: "maybe", MAX_SESSIONS_PER_USER: "0", LOG_LEVEL: "loud",
      LOG_FORMAT: "xml", DATABASE_WAIT: "forever", IDLE_TIMEOUT: "0",
    };
    const envs = Object.values(SETTINGS).map((s) => s.env);
    expect(Object.keys(bad).sort()).toEqual([...envs].sort()); // a new setting needs a bad value here
    for (let i = 0; i < envs.length; i += 8) {
      await Promise.all(envs.slice(i, i + 8).map(async (name) => {
        const { code, out, err } = await run([], { [name]: bad[name] });
        expect({ name, code, out, lines: err.trim().split("\n").length }).toEqual({ name, code: 2, out: "", lines: 1 });
        expect(err).toStartWith(`Cannot parse ${name}=${JSON.stringify(bad[name])}: `);
      }));
    }
  }, 60_000);

  test("an address that is not this machine's, or a port in use, is named with its setting; exit 1", async () => {
    const notMine = await run([], { HOST: "192.0.2.1", PORT: "0", DATABASE_URL: ":memory:" });
    expect(notMine.code).toBe(1);
    expect(notMine.out).toContain("Cannot listen on HOST=192.0.2.1 PORT=0: the address is not one of this machine's");
    await using first = await spawnServer({ DATABASE_URL: ":memory:" });
    const busy = await run([], { HOST: "127.0.0.1", PORT: String(first.port), DATABASE_URL: ":memory:" });
    expect(busy.code).toBe(1);
    expect(busy.out).toContain(`Cannot listen on HOST=127.0.0.1 PORT=${first.port}: the port is in use`);
  });

  test("--version names the version and its Bun; --help names the program and every command", async () => {
    const { version } = await Bun.file(join(ROOT, "package.json")).json();
    expect((await run(["--version"])).out.trim()).toBe(`chat ${version} (Bun ${Bun.version})`);
    const help = await run(["--help"]);
    for (const word of ["bun run server.ts", "grant-admin <name>", "backup <file>", "check", "--version", "LOG_LEVEL", "LOG_FORMAT", "DATABASE_WAIT"]) expect(help.out).toContain(word);
  });
});

describe("operations commands", () => {
  test("backup <file> copies a SQLite database while the server writes to it; the copy opens, checks and serves", async () => {
    using tmp = tempDir();
    const databaseUrl = `sqlite://${tmp.dir}/chat.db`;
    await using child = await spawnServer({ DATABASE_URL: databaseUrl, RATE_LIMIT: "100000/1s" });
    const { clients: [a] } = await usersInRoom(child.url, 1, "room");
    let writing = true;
    let sent = 0;
    const writer = (async () => {
      while (writing && sent < 20_000) {
        for (let i = 0; i < 50; i++) a.send({ type: "say", room: "room", text: `m${sent++}` });
        await a.next((f) => f.type === "message" && f.text === `m${sent - 1}`, 10_000);
      }
    })();
    await until(() => sent >= 500, 10_000, "some messages stored");
    const copy = join(tmp.dir, "backup.db");
    const backup = await run(["backup", copy], { DATABASE_URL: databaseUrl });
    writing = false;
    await writer;
    expect(backup).toMatchObject({ code: 0, out: expect.stringContaining(`to ${copy}`) });
    const db = new Database(copy, { readonly: true });
    expect(db.query("PRAGMA integrity_check").get()).toEqual({ integrity_check: "ok" });
    const { n, top } = db.query("SELECT count(*) AS n, max(id) AS top FROM messages").get() as { n: number; top: number };
    db.close();
    expect(n).toBeGreaterThanOrEqual(500);
    expect(top).toBe(n); // a consistent copy: no message missing below the newest one in it
    expect(n).toBeLessThanOrEqual(sent);
    // restored as the README says: the copy is the database of a new server
    await using restored = await spawnServer({ DATABASE_URL: `sqlite://${copy}` });
    const b = await Client.connect(restored.url, await newSession(restored.url));
    expect((await b.join("room", 0)).history.messages.at(-1)?.id).toBe(n);
    // a second backup to the same file is refused rather than overwriting it
    expect((await run(["backup", copy], { DATABASE_URL: databaseUrl })).code).toBe(1);
  }, 60_000);

  test("backup names what it cannot do: no file, Postgres (use pg_dump), an in-memory database", async () => {
    expect((await run(["backup"], { DATABASE_URL: ":memory:" })).code).toBe(2);
    const pg = await run(["backup", "/tmp/x.db"], { DATABASE_URL: "postgres://chat@127.0.0.1:1/chat" });
    expect(pg).toMatchObject({ code: 1, err: expect.stringContaining("pg_dump") });
    expect((await run(["backup", "/tmp/x.db"], { DATABASE_URL: ":memory:" })).code).toBe(1);
  });

  test("check: exit 0 when the settings parse and the database and Redis answer; 1 naming what failed, without making a database", async () => {
    using tmp = tempDir();
    const file = join(tmp.dir, "new.db");
    const fresh = await run(["check"], { DATABASE_URL: `sqlite://${file}` });
    expect(fresh).toMatchObject({ code: 0, out: expect.stringContaining("not made yet") });
    expect(existsSync(file)).toBe(false);
    expect((await run(["check"], { DATABASE_URL: `sqlite://${tmp.dir}/missing/dir/chat.db` })).code).toBe(1);
    expect(await run(["check"], { DATABASE_URL: "postgres://chat@127.0.0.1:1/chat" })).toMatchObject({ code: 1, err: expect.stringContaining("DATABASE_URL=postgres://chat@127.0.0.1:1/chat") });
    expect(await run(["check"], { DATABASE_URL: ":memory:", REDIS_URL: "redis://127.0.0.1:1" })).toMatchObject({ code: 1, err: expect.stringContaining("REDIS_URL=redis://127.0.0.1:1") });
    expect(await run(["check"], { RATE_LIMIT: "fast" })).toMatchObject({ code: 1, err: expect.stringContaining("RATE_LIMIT") });
  });

  test("check reaches a real Postgres and Redis", async () => {
    if (skip) throw new Error(skip);
    await using pg = await startPostgres();
    await using redis = await startRedis();
    const ok = await run(["check"], { DATABASE_URL: await pg.createDatabase(), REDIS_URL: redis.url });
    expect(ok.code).toBe(0);
    expect(ok.out).toContain("ok: REDIS_URL");
    expect(ok.out).toContain("ok: DATABASE_URL (postgres");
  }, 60_000);
});

/** A registered user (the first one on a server is its admin). */
async function member(baseUrl: string, name: string): Promise<Session> {
  const guest = await newSession(baseUrl);
  expect((await putName(baseUrl, guest.cookie, name)).status).toBe(200);
  const res = await fetch(`${baseUrl}/api/me/password`, { method: "POST", headers: { ...json, cookie: guest.cookie }, body: JSON.stringify({ password: "a long password" }) });
  expect(res.status).toBe(200);
  return { ...guest, name, registered: true, admin: false, cookie: res.headers.get("set-cookie")!.split(";")[0] };
}

describe("logs", () => {
  test("a session of chatting logs JSON lines with time, level, event and their fields, and never a sid or a message's text", async () => {
    using tmp = tempDir();
    const child = await spawnServer({ DATABASE_URL: `sqlite://${tmp.dir}/chat.db`, LOG_LEVEL: "debug", UPGRADES_PER_ADDRESS: "1000/60s", RATE_LIMIT: "3/60s" });
    const admin = await member(child.url, "Ada");
    const bob = await member(child.url, "Bob");
    const secret = "the launch code is 0000";
    const [a, b] = [await Client.connect(child.url, admin), await Client.connect(child.url, bob)];
    await a.join("ops");
    await b.join("ops");
    for (let i = 0; i < 4; i++) a.send({ type: "say", room: "ops", text: `${secret} #${i}` });
    await a.next((f) => f.type === "error" && f.code === "rate_limited");
    const refused = await fetch(`${child.url}/chat`, { headers: { cookie: bob.cookie, origin: "https://evil.example", upgrade: "websocket", connection: "Upgrade", "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==" } });
    expect(refused.status).toBe(403);
    const ban = await fetch(`${child.url}/api/rooms/ops/bans/${bob.id}`, { method: "PUT", headers: { cookie: admin.cookie } });
    expect(ban.status).toBe(204);
    await b.next((f) => f.type === "removed");
    b.close();
    a.close();
    await until(() => seen(child, "connection_closed", { user: admin.id }), 5_000, "the close line");
    child.proc.kill("SIGTERM");
    expect(await child.proc.exited).toBe(0);
    await until(() => seen(child, "stop"), 5_000, "the stop line");

    const lines = parsed(child);
    for (const line of lines) {
      expect(line).toMatchObject({ time: expect.stringMatching(/^\d{4}-\d\d-\d\dT/), level: expect.stringMatching(/^(debug|info|warn|error)$/), event: expect.any(String) });
    }
    const text = child.lines.join("\n");
    for (const sid of [admin, bob].map((s) => decodeURIComponent(s.cookie.split("=")[1]).split(".")[0])) expect(text).not.toContain(sid);
    expect(text).not.toContain("launch code");
    expect(seen(child, "start")).toMatchObject({ level: "info", listen: `127.0.0.1:${child.port}`, version: expect.any(String), bun: Bun.version, database: { kind: "sqlite", where: join(tmp.dir, "chat.db") }, node: expect.any(String) });
    expect(seen(child, "connection_opened", { user: bob.id })).toMatchObject({ level: "debug", address: "127.0.0.1" });
    expect(seen(child, "connection_closed", { user: admin.id })).toMatchObject({ level: "debug", code: expect.any(Number), durationMs: expect.any(Number) });
    expect(seen(child, "refused", { reason: "origin" })).toMatchObject({ level: "warn", count: 1, top: [{ address: "127.0.0.1", count: 1 }] });
    expect(seen(child, "rate_limited", { reason: "say" })).toMatchObject({ level: "warn", count: 1 });
    expect(seen(child, "moderation", { action: "ban" })).toMatchObject({ level: "info", room: "ops", user: bob.id, by: admin.id });
    expect(seen(child, "stop")).toMatchObject({ level: "info", durationMs: expect.any(Number) });
  }, 30_000);

  test("on a terminal's format (LOG_FORMAT=pretty) a line reads as time, level, event and fields; LOG_LEVEL=warn drops info", async () => {
    const pretty = await run(["check"], { LOG_FORMAT: "pretty", DATABASE_URL: ":memory:" });
    expect(pretty.code).toBe(0);
    const port = freePort();
    const quiet = await run([], { LOG_FORMAT: "pretty", LOG_LEVEL: "warn", DATABASE_URL: `postgres://chat@127.0.0.1:${port}/chat`, DATABASE_WAIT: "1s" });
    const lines = quiet.out.trim().split("\n");
    expect(lines[0]).toMatch(new RegExp(`^\\d\\d:\\d\\d:\\d\\d\\.\\d{3} WARN  database_unreachable setting=DATABASE_URL host=127\\.0\\.0\\.1:${port} attempt=1 `));
    expect(lines.at(-1)).toMatch(/^\S+ ERROR start_failed error="Cannot reach DATABASE_URL=/);
    expect(quiet.out).not.toContain(" INFO ");
  });
});
