// Sessions and client addresses: who a request is, how identities are made, kept and expired, and the
// per-address limits that make an identity cost something. Real servers, real sockets.
import { Database } from "bun:sqlite";
import { describe, expect, test } from "bun:test";
import { createHmac } from "node:crypto";
import { clientAddress, defaultName, parseConfig } from "../server.ts";
import { Client, newSession, putName, serve, tempDir, until, UPGRADE, upgradeStatus, usersInRoom } from "./helpers.ts";
import { metric } from "./probes.ts";

const SECRET = "a-test-secret-of-32-characters!!";
/** A cookie for a sid the test chose, signed as the server signs (Hono's signed-cookie format). */
const signed = (sid: string, name = "sid") => `${name}=${encodeURIComponent(`${sid}.${createHmac("sha256", SECRET).update(sid).digest("base64")}`)}`;
const sidOf = (setCookie: string | null) => decodeURIComponent(/^(?:__Host-)?sid=([^;]+)/.exec(setCookie ?? "")?.[1] ?? "").replace(/\.[^.]*$/, "");

describe("sessions", () => {
  test("a sid the client chose never becomes a session: the server answers with a new one, and the chosen one opens nothing", async () => {
    await using chat = await serve({ sessionSecret: SECRET });
    const chosen = signed("attacker-chosen-session-id-0000000");
    const me = await fetch(`${chat.url}/api/me`, { headers: { cookie: chosen } });
    expect(me.status).toBe(200);
    const given = sidOf(me.headers.get("set-cookie"));
    expect(given).toMatch(/^[A-Za-z0-9_-]{32}$/);
    expect(given).not.toBe("attacker-chosen-session-id-0000000");
    // the victim who was handed the chosen cookie is nobody, and stays nobody
    expect(await upgradeStatus(chat.url, { cookie: chosen })).toBe(401);
    const again = await fetch(`${chat.url}/api/me`, { headers: { cookie: chosen } });
    expect(((await again.json()) as { id: string }).id).not.toBe(((await me.json()) as { id: string }).id);
    // and a cookie from the page alone does not exist
    expect((await fetch(`${chat.url}/`)).headers.get("set-cookie")).toBeNull();
  });

  test("two session cookies in one request are refused with 400, over HTTP and on the upgrade, instead of one replacing the other", async () => {
    await using chat = await serve();
    const [alice, bob] = [await newSession(chat.url), await newSession(chat.url)];
    for (const cookie of [`${alice.cookie}; ${bob.cookie}`, `sid=garbage; ${alice.cookie}`, `${alice.cookie}; sid=garbage`]) {
      const me = await fetch(`${chat.url}/api/me`, { headers: { cookie } });
      expect({ cookie, status: me.status, setCookie: me.headers.get("set-cookie") }).toEqual({ cookie, status: 400, setCookie: null });
      expect(((await me.json()) as { error: { code: string } }).error.code).toBe("bad_request");
      expect(await upgradeStatus(chat.url, { cookie })).toBe(400);
    }
    // another cookie beside ours is fine
    expect(((await (await fetch(`${chat.url}/api/me`, { headers: { cookie: `theme=dark; ${alice.cookie}` } })).json()) as { id: string }).id).toBe(alice.id);
  });

  test("over https the session is __Host-sid only: a plain sid cookie planted by a subdomain or an http page is ignored", async () => {
    await using chat = await serve({ sessionSecret: SECRET });
    const https = { "x-forwarded-proto": "https" };
    const res = await fetch(`${chat.url}/api/me`, { headers: https });
    const setCookie = res.headers.get("set-cookie")!;
    expect(setCookie).toMatch(/^__Host-sid=/);
    expect(setCookie).toContain("Secure");
    expect(setCookie).toContain("Path=/");
    expect(setCookie).not.toMatch(/Domain=/i);
    const host = setCookie.split(";")[0];
    const { id } = (await res.json()) as { id: string };
    expect(((await (await fetch(`${chat.url}/api/me`, { headers: { ...https, cookie: host } })).json()) as { id: string }).id).toBe(id);
    // a planted plain cookie for someone else changes nothing
    const victim = await newSession(chat.url);
    const mixed = await fetch(`${chat.url}/api/me`, { headers: { ...https, cookie: `${victim.cookie}; ${host}` } });
    expect(((await mixed.json()) as { id: string }).id).toBe(id);
    // and over https a plain sid alone is no session
    expect(await upgradeStatus(chat.url, { ...https, cookie: victim.cookie })).toBe(401);
  });

  test("a guest unused for GUEST_TTL expires server-side: its cookie names nobody, its rows go, its messages stay under its name", async () => {
    await using chat = await serve({ guestTtl: "1s" });
    const { sessions: [alice], clients: [a] } = await usersInRoom(chat.url, 1, "room");
    expect((await putName(chat.url, alice.cookie, "Alice")).status).toBe(200);
    const sent = await a.say("room", "remember me");
    await a.close();
    const bob = await newSession(chat.url); // keeps the server from being empty of users
    // expiry is server-side: the cookie itself is still well signed and unexpired for the browser
    const expired = await until(async () => {
      const me = (await (await fetch(`${chat.url}/api/me`, { headers: { cookie: alice.cookie } })).json()) as { id: string };
      return me.id !== alice.id;
    }, 10_000, "alice's session to expire");
    expect(expired).toBe(true);
    await chat.pruneSessions();
    const db = new Database(chat.config.databaseUrl.slice("sqlite://".length), { readonly: true });
    try {
      expect(db.query("SELECT count(*) AS n FROM users WHERE id = ?").get(alice.id)).toEqual({ n: 0 });
    } finally {
      db.close();
    }
    // the name is free again, and the message keeps the name it was sent with
    expect((await putName(chat.url, bob.cookie, "Alice")).status).toBe(200);
    const page = (await (await fetch(`${chat.url}/api/rooms/room/messages`)).json()) as { messages: { id: number; user: { id: string; name: string } }[] };
    expect(page.messages).toEqual([expect.objectContaining({ id: sent.id, user: { id: alice.id, name: "Alice" } })]);
  });

  test("session rows never outgrow MAX_SESSIONS: the least recently seen guests go first", async () => {
    await using chat = await serve({ maxSessions: 10 });
    for (let i = 0; i < 25; i++) {
      const s = await newSession(chat.url);
      await (await Client.connect(chat.url, s)).close(); // used: not pruned as unused
    }
    const { sessions: recent, clients } = await usersInRoom(chat.url, 3, "room");
    expect(await chat.store.countSessions()).toBe(28);
    await chat.pruneSessions();
    expect(await chat.store.countSessions()).toBeLessThanOrEqual(10);
    expect(await chat.store.countUsers()).toBeLessThanOrEqual(10);
    for (const [i, s] of recent.entries()) {
      expect((await clients[i].say("room", `still ${s.name}`)).user.id).toBe(s.id);
      expect(((await (await fetch(`${chat.url}/api/me`, { headers: { cookie: s.cookie } })).json()) as { id: string }).id).toBe(s.id);
    }
  });

  test("a database made by schema version 1 is migrated (to the current one): old cookies name the same users, with their names and messages", async () => {
    using tmp = tempDir();
    const file = `${tmp.dir}/chat.db`;
    const v1 = new Database(file, { create: true });
    v1.run("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)");
    v1.run("CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)");
    v1.run(`CREATE TABLE sessions (sid TEXT PRIMARY KEY, user_id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
      name_key TEXT NOT NULL UNIQUE, created BIGINT NOT NULL, used INTEGER NOT NULL DEFAULT 0)`);
    v1.run("CREATE INDEX sessions_unused ON sessions (used, created)");
    v1.run("CREATE TABLE rooms (name TEXT PRIMARY KEY, last_id BIGINT NOT NULL)");
    v1.run(`CREATE TABLE messages (room TEXT NOT NULL, id BIGINT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL,
      text TEXT NOT NULL, ts BIGINT NOT NULL, ref TEXT, PRIMARY KEY (room, id)) WITHOUT ROWID`);
    v1.query("INSERT INTO meta VALUES ('session_secret', ?)").run(SECRET);
    const now = Date.now();
    v1.query("INSERT INTO sessions VALUES ('old-sid-of-alice-0000000000000000', 'uAlice', 'Alice', 'alice', ?, 1)").run(now);
    v1.query("INSERT INTO sessions VALUES ('old-sid-of-user7-0000000000000000', 'uUser7', 'user7', 'user7', ?, 1)").run(now);
    v1.query("INSERT INTO rooms VALUES ('room', 0)").run();
    v1.query("INSERT INTO messages VALUES ('room', 1, 'uAlice', 'Alice', 'from v1', ?, NULL)").run(now);
    v1.close();

    await using chat = await serve({ databaseUrl: `sqlite://${file}` });
    const me = await fetch(`${chat.url}/api/me`, { headers: { cookie: signed("old-sid-of-alice-0000000000000000") } });
    expect(me.headers.get("set-cookie")).toBeNull();
    expect(await me.json()).toEqual({ id: "uAlice", name: "Alice", registered: false, admin: false });
    const a = await Client.connect(chat.url, { cookie: signed("old-sid-of-alice-0000000000000000"), id: "uAlice", name: "Alice", registered: false, admin: false });
    const { history } = await a.join("room");
    expect(history.messages.map((m) => [m.id, m.user.name, m.text])).toEqual([[1, "Alice", "from v1"]]);
    expect((await a.say("room", "from v2")).id).toBe(2);
    // the name stays unique across the migration
    const bob = await newSession(chat.url);
    expect((await putName(chat.url, bob.cookie, "ALICE")).status).toBe(409);
    const db = new Database(file, { readonly: true });
    try {
      expect(db.query("SELECT value FROM meta WHERE key = 'schema_version'").get()).toEqual({ value: "3" });
      // the sid itself is no longer stored anywhere
      expect(JSON.stringify(db.query("SELECT * FROM sessions").all())).not.toContain("old-sid-of-alice");
    } finally {
      db.close();
    }
  });
});

describe("client addresses", () => {
  test("the address is the peer; X-Forwarded-For counts only from TRUSTED_PROXIES, and only its last untrusted hop", () => {
    const trusted = parseConfig({ trustedProxies: "10.0.0.0/8, 127.0.0.1, fd00::/8" }).trustedProxies;
    expect(clientAddress("127.0.0.1", undefined, [])).toBe("127.0.0.1");
    expect(clientAddress("127.0.0.1", "9.9.9.9", [])).toBe("127.0.0.1"); // no trusted proxies: the header is ignored
    expect(clientAddress("127.0.0.1", "9.9.9.9", trusted)).toBe("9.9.9.9");
    expect(clientAddress("127.0.0.1", "1.2.3.4, 9.9.9.9", trusted)).toBe("9.9.9.9"); // the client wrote 1.2.3.4 itself
    expect(clientAddress("127.0.0.1", "1.2.3.4, 9.9.9.9, 10.1.2.3", trusted)).toBe("9.9.9.9"); // two proxies
    expect(clientAddress("8.8.8.8", "9.9.9.9", trusted)).toBe("8.8.8.8"); // an untrusted peer cannot claim another address
    expect(clientAddress("127.0.0.1", "not-an-ip", trusted)).toBe("127.0.0.1");
    expect(clientAddress("::ffff:127.0.0.1", undefined, [])).toBe("127.0.0.1");
    // one IPv6 host holds a /64: every address in it is one client
    expect(clientAddress("2001:db8:1:2::1", undefined, [])).toBe(clientAddress("2001:db8:1:2:ffff:1:2:3", undefined, []));
    expect(clientAddress("2001:db8:1:2::1", undefined, [])).not.toBe(clientAddress("2001:db8:1:3::1", undefined, []));
    expect(() => parseConfig({ trustedProxies: "10.0.0.0/33" })).toThrow(/TRUSTED_PROXIES/);
    expect(() => parseConfig({ trustedProxies: "proxy.local" })).toThrow(/TRUSTED_PROXIES/);
  });

  test("SESSIONS_PER_ADDRESS: past it /api/me answers 429 with Retry-After, counted by reason; other addresses are unaffected", async () => {
    await using chat = await serve({ sessionsPerAddress: "3/60s", trustedProxies: "127.0.0.1" });
    const from = (ip: string) => fetch(`${chat.url}/api/me`, { headers: { "x-forwarded-for": ip } });
    for (let i = 0; i < 3; i++) expect((await from("9.9.9.9")).status).toBe(200);
    const refused = await from("9.9.9.9");
    expect(refused.status).toBe(429);
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThan(0);
    expect(((await refused.json()) as { error: { code: string } }).error.code).toBe("rate_limited");
    // a forged left hop does not change the address
    expect((await from("1.1.1.1, 9.9.9.9")).status).toBe(429);
    expect((await from("8.8.8.8")).status).toBe(200);
    expect(await chat.store.countSessions()).toBe(4);
    expect(await metric(chat.url, 'chat_refused_total{reason="sessions_per_address"}')).toBe(2);
    // an existing session is never refused
    const first = (await from("8.8.8.8")).headers.get("set-cookie")!.split(";")[0];
    for (let i = 0; i < 5; i++) expect((await fetch(`${chat.url}/api/me`, { headers: { cookie: first, "x-forwarded-for": "8.8.8.8" } })).status).toBe(200);
  });

  test("UPGRADES_PER_ADDRESS and MAX_CONNECTIONS_PER_ADDRESS refuse with 429 across all of an address's users", async () => {
    await using chat = await serve({ upgradesPerAddress: "4/60s", maxConnectionsPerAddress: "2", trustedProxies: "127.0.0.1" });
    const [alice, bob] = [await newSession(chat.url), await newSession(chat.url)];
    const open = (cookie: string, ip: string) => Client.connect(chat.url, { cookie, id: "", name: "", registered: false, admin: false }, { "x-forwarded-for": ip });
    await open(alice.cookie, "9.9.9.9");
    await open(bob.cookie, "9.9.9.9");
    expect(await upgradeStatus(chat.url, { cookie: alice.cookie, "x-forwarded-for": "9.9.9.9" })).toBe(429); // third open socket
    expect(await metric(chat.url, 'chat_refused_total{reason="connections_per_address"}')).toBe(1);
    expect(await upgradeStatus(chat.url, { cookie: alice.cookie, "x-forwarded-for": "9.9.9.9" })).toBe(429); // fourth upgrade: still sockets
    expect(await upgradeStatus(chat.url, { cookie: alice.cookie, "x-forwarded-for": "9.9.9.9" })).toBe(429); // fifth: the upgrade rate
    expect(await metric(chat.url, 'chat_refused_total{reason="upgrades_per_address"}')).toBe(1);
    const res = await fetch(`${chat.url}/chat`, { headers: { ...UPGRADE, cookie: alice.cookie, "x-forwarded-for": "9.9.9.9" } });
    expect(res.status).toBe(429);
    expect(Number(res.headers.get("retry-after"))).toBeGreaterThan(0);
    // another address still gets in
    await open(alice.cookie, "8.8.8.8");
  });

  test("RATE_LIMIT_PER_ADDRESS: the users of one address share one say budget; another address keeps its own", async () => {
    await using chat = await serve({ rateLimitPerAddress: "3/60s", trustedProxies: "127.0.0.1" });
    const sessions = [await newSession(chat.url), await newSession(chat.url), await newSession(chat.url)];
    const [a, b] = await Promise.all(sessions.slice(0, 2).map((s) => Client.connect(chat.url, s, { "x-forwarded-for": "9.9.9.9" })));
    const c = await Client.connect(chat.url, sessions[2], { "x-forwarded-for": "8.8.8.8" });
    for (const x of [a, b, c]) await x.join("room");
    await a.say("room", "1");
    await a.say("room", "2");
    await b.say("room", "3");
    b.send({ type: "say", room: "room", text: "4", ref: "r4" });
    expect(await b.next((f) => f.type === "error")).toMatchObject({ code: "rate_limited", ref: "r4" });
    expect((await c.say("room", "elsewhere")).text).toBe("elsewhere");
    expect(await metric(chat.url, 'chat_refused_total{reason="say_per_address"}')).toBe(1);
  });

  test("RENAME_LIMIT_PER_ADDRESS: an address's users share one rename budget, over HTTP and by frame", async () => {
    await using chat = await serve({ renameLimitPerAddress: "3/60s", trustedProxies: "127.0.0.1" });
    const from = { "x-forwarded-for": "9.9.9.9" };
    const users = [await newSession(chat.url), await newSession(chat.url), await newSession(chat.url)];
    const put = (cookie: string, name: string, headers = from) =>
      fetch(`${chat.url}/api/me`, { method: "PUT", headers: { ...headers, cookie, "content-type": "application/json" }, body: JSON.stringify({ name }) });
    expect((await put(users[0].cookie, "Ann")).status).toBe(200);
    expect((await put(users[1].cookie, "Bob")).status).toBe(200);
    const socket = await Client.connect(chat.url, users[2], from);
    socket.send({ type: "nick", name: "Cy" });
    expect(await socket.next((f) => f.type === "renamed")).toMatchObject({ user: { name: "Cy" } });
    const refused = await put(users[0].cookie, "Anna");
    expect(refused.status).toBe(429);
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThan(0);
    socket.send({ type: "nick", name: "Cyd" });
    expect(await socket.next((f) => f.type === "error")).toMatchObject({ code: "rate_limited" });
    expect(await metric(chat.url, 'chat_refused_total{reason="renames_per_address"}')).toBe(2);
    expect((await put(users[0].cookie, "Anna", { "x-forwarded-for": "8.8.8.8" })).status).toBe(200);
  });

  test("REQUESTS_PER_ADDRESS: past it every /api request of that address gets 429 with Retry-After before anything is read; others are served", async () => {
    await using chat = await serve({ requestsPerAddress: "5/60s", trustedProxies: "127.0.0.1" });
    const from = (ip: string) => ({ "x-forwarded-for": ip });
    const alice = await sessionAt(chat.url, "9.9.9.9");
    const answers = [];
    for (let i = 0; i < 6; i++) answers.push((await fetch(`${chat.url}/api/rooms`, { headers: { ...from("9.9.9.9"), cookie: alice } })).status);
    expect(answers).toEqual([200, 200, 200, 200, 429, 429]); // the session's GET /api/me took the first
    const refused = await fetch(`${chat.url}/api/me`, { headers: { ...from("9.9.9.9"), cookie: alice } });
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThan(0);
    expect((await fetch(`${chat.url}/api/rooms`, { headers: from("8.8.8.8") })).status).toBe(200);
    expect((await fetch(`${chat.url}/healthz`, { headers: from("9.9.9.9") })).status).toBe(200); // not an /api route
    expect(await metric(chat.url, 'chat_refused_total{reason="requests_per_address"}')).toBe(3);
  });
});

async function sessionAt(baseUrl: string, ip: string): Promise<string> {
  return (await fetch(`${baseUrl}/api/me`, { headers: { "x-forwarded-for": ip } })).headers.get("set-cookie")!.split(";")[0];
}

describe("defaults", () => {
  test("default names cannot run out: a squatted pool still yields a name, and none are numbered in order", () => {
    const names = new Set(Array.from({ length: 2000 }, () => defaultName()));
    expect(names.size).toBeGreaterThan(1990);
    for (const name of names) expect(name).toMatch(/^[a-z]+-[a-z]+-\d{4}$/);
    expect(defaultName(50)).toMatch(/^[a-z]+-[a-z]+-[A-Za-z0-9]{8}$/);
  });
});

