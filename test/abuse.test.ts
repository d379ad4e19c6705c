// Hostile clients: forged identities, leaked session ids, markup and SQL in names and texts,
// every abuse limit, floods of sessions and bodies, and cross-site origins. Real servers and sockets.
import { describe, expect, test } from "bun:test";
import { Client, cookieAnswers, diffWith, newSession, putName, serve, spawnCluster, type Session, UPGRADE, upgradeStatus, usersInRoom } from "./helpers.ts";
import { RawSocket } from "./raw.ts";
import { describeWithServices } from "./services.ts";
import { metric, storedHistory } from "./probes.ts";

/** Opens `count` sockets at once with these cookies; how many got through. */
async function burst(baseUrl: string, cookies: string[]) {
  const results = await Promise.allSettled(cookies.map((cookie) => RawSocket.open(baseUrl, { cookie })));
  const open = results.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const statuses = results.flatMap((r) => (r.status === "rejected" ? [Number(/answered (\d+)/.exec(String(r.reason))?.[1])] : []));
  return { open, statuses };
}

/** Names (≤ 32 characters) and texts that break naive HTML or SQL handling. */
const HOSTILE_NAMES = ["'; DROP TABLE messages; --", "<script>alert(1)</script>", "Robert'); DROP TABLE sessions;", "%00", "a\\b\\\\c", `"quoted" 'single'`, "<img src=x onerror=alert(1)>", "${7*7}{{7*7}}", "\u05E9\u05DC\u05D5\u05DD 42", "NULL"];
const HOSTILE_TEXTS = [
  "'; DROP TABLE messages; --", "<script>alert(document.cookie)</script>", "%00%27%22", "C:\\path\\to\\file \\\\server\\share", `"double" 'single' \`back\``,
  "' OR '1'='1", "1; SELECT * FROM sessions --", "</textarea><svg onload=alert(1)>", "\\u0000 \\n not escapes", "&lt;b&gt; &amp; &#x3C;", "-- comment /* block */",
];

describe("identity", () => {
  test("forged cookies (swapped or truncated signatures, wrong names, encodings, oversized) are refused and never identify a user", async () => {
    // server.test.ts covers flipped characters, a missing signature and another server's secret
    await using chat = await serve();
    const alice = await newSession(chat.url);
    const bob = await newSession(chat.url);
    const split = (s: Session) => {
      const value = s.cookie.slice("sid=".length);
      const dot = value.lastIndexOf(".");
      return { sid: value.slice(0, dot), sig: value.slice(dot + 1) };
    };
    const [a, b] = [split(alice), split(bob)];
    const forged = [
      `sid=${a.sid}.${b.sig}`, // bob's signature on alice's id
      `sid=${b.sid}.${a.sig}`,
      `sid=${a.sid}.${a.sig.slice(0, -3)}`, // truncated signature (%3D padding gone)
      `sid=${a.sid}.${a.sig.slice(4)}`,
      `sid=${a.sid.slice(0, -1)}.${a.sig}`, // truncated id
      `sid=${a.sid}x.${a.sig}`,
      `sid=${a.sid}.${a.sig}.${a.sig}`,
      `sid=.${a.sig}`,
      `sid=${alice.id}.${a.sig}`, // the public id is not a session id
      `sid=${a.sid.toLowerCase()}.${a.sig}`,
      `SID=${a.sid}.${a.sig}`, // another cookie's name
      `xsid=${a.sid}.${a.sig}`,
      `sid=%00${a.sid}.${a.sig}`,
      `sid=${"A".repeat(4000)}.${a.sig}`,
      `sid=${a.sid}.${"A".repeat(43)}=`, // well-formed, wrong
      `sid="${a.sid}.${b.sig}"`,
    ];
    // each one is refused on the socket; over HTTP it gets a new cookie and a fresh user of its own
    const known = new Set([alice.id, bob.id]);
    for (const cookie of forged) {
      const { id, ...answer } = await cookieAnswers(chat.url, cookie);
      expect({ cookie, ...answer, known: known.has(id) }).toEqual({ cookie, upgrade: 401, newCookie: true, known: false });
      known.add(id);
    }
    // a forged cookie next to a real one is refused, never chosen between (test/sessions.test.ts has more)
    for (const cookie of [`sid=${a.sid}.${b.sig}; ${alice.cookie}`, `${alice.cookie}; sid=${b.sid}.${a.sig}`]) {
      expect({ cookie, status: (await fetch(`${chat.url}/api/me`, { headers: { cookie } })).status }).toEqual({ cookie, status: 400 });
    }
    expect(((await (await fetch(`${chat.url}/api/me`, { headers: { cookie: `other=1; ${alice.cookie}` } })).json()) as { id: string }).id).toBe(alice.id);
    // and the real cookies still work
    for (const s of [alice, bob]) expect(((await (await fetch(`${chat.url}/api/me`, { headers: { cookie: s.cookie } })).json()) as { id: string }).id).toBe(s.id);
  });

  test("a cookie identifies its own user and nobody else, over HTTP and on the socket", async () => {
    await using chat = await serve();
    const sessions = await Promise.all(Array.from({ length: 40 }, () => newSession(chat.url)));
    expect(new Set(sessions.map((s) => s.id)).size).toBe(40);
    expect(new Set(sessions.map((s) => s.cookie)).size).toBe(40);
    const sockets = await Promise.all(sessions.map((s) => Client.connect(chat.url, s)));
    for (const [i, s] of sessions.entries()) {
      const me = (await (await fetch(`${chat.url}/api/me`, { headers: { cookie: s.cookie } })).json()) as { id: string; name: string; registered: boolean; admin: boolean };
      expect(me).toEqual({ id: s.id, name: s.name, registered: false, admin: false });
      expect(sockets[i].frames[0]).toMatchObject({ type: "welcome", user: { id: s.id, name: s.name } });
    }
  });

  test("session ids never reach another client or any API response", async () => {
    await using chat = await serve();
    const { sessions, clients } = await usersInRoom(chat.url, 4, "open");
    const bodies: string[] = [];
    const get = async (path: string, init: RequestInit = {}) => {
      const res = await fetch(`${chat.url}${path}`, init);
      bodies.push(await res.text());
    };
    await clients[0].next(diffWith("joins", sessions[3].id)); // else the last one's arrival and departure may fall in one interval
    await clients[1].join("side");
    clients[0].send({ type: "typing", room: "open" });
    for (const [i, c] of clients.entries()) await c.say("open", `hello from ${i}`);
    await get("/api/me", { method: "PUT", headers: { cookie: sessions[0].cookie, "content-type": "application/json" }, body: '{"name":"Renamed"}' });
    clients[1].send({ type: "nick", name: "Nick" });
    clients[2].send({ type: "leave", room: "open" });
    clients[3].send({ type: "say", room: "nowhere", text: "x", ref: "r" });
    clients[3].send("not json");
    await clients[1].say("side", "last");
    await clients[0].next((f) => f.type === "renamed" && f.user.name === "Nick");
    await clients[3].close();
    await clients[0].next(diffWith("leaves", sessions[3].id));
    for (const s of sessions) {
      await get("/api/me", { headers: { cookie: s.cookie } });
      await get("/api/rooms", { headers: { cookie: s.cookie } });
      await get("/api/rooms/open/messages", { headers: { cookie: s.cookie } });
      await get("/api/me", { method: "PUT", headers: { cookie: s.cookie, "content-type": "application/json" }, body: "{" });
    }
    for (const path of ["/metrics", "/healthz", "/nope", "/chat", "/api/rooms/BAD/messages"]) await get(path, { headers: { cookie: sessions[0].cookie } });
    for (const headers of [UPGRADE, { ...UPGRADE, cookie: sessions[0].cookie, origin: "https://evil.example" }]) await get("/chat", { headers });
    const seen = [...clients.flatMap((c) => c.frames.map((f) => JSON.stringify(f))), ...bodies].join("\n");
    expect(seen.length).toBeGreaterThan(1000);
    for (const s of sessions) {
      const value = decodeURIComponent(s.cookie.slice("sid=".length));
      const sid = value.slice(0, value.lastIndexOf("."));
      expect(sid).toHaveLength(32);
      expect(seen.includes(sid)).toBe(false);
      expect(seen.includes(value.slice(value.lastIndexOf(".") + 1))).toBe(false);
    }
    // the frames carry the public ids instead
    expect(seen).toContain(sessions[1].id);
  });

  test("names and texts with HTML and SQL metacharacters are stored and echoed verbatim", async () => {
    await using chat = await serve({ renameLimit: "100/1s" });
    await checkVerbatim(chat.url, chat.url);
    expect(await chat.store.countSessions()).toBe(3);
  });
});

/** Renames and messages full of metacharacters: every copy (echo, other node, REST, history) equals the input. */
async function checkVerbatim(urlA: string, urlB: string) {
  const [alice, bob] = [await newSession(urlA), await newSession(urlA)];
  const reader = await newSession(urlB);
  const a = await Client.connect(urlA, alice);
  const b = await Client.connect(urlB, bob);
  await a.join("meta");
  await b.join("meta");
  for (const [i, name] of HOSTILE_NAMES.entries()) {
    if (i % 2 === 0) {
      const res = await putName(urlA, alice.cookie, name);
      expect(await res.json()).toEqual({ id: alice.id, name, registered: false, admin: false });
    } else a.send({ type: "nick", name });
    expect(await b.next((f) => f.type === "renamed" && f.user.id === alice.id)).toMatchObject({ user: { name } });
    const me = (await (await fetch(`${urlB}/api/me`, { headers: { cookie: alice.cookie } })).json()) as { name: string };
    expect(me.name).toBe(name);
    const sent = await a.say("meta", HOSTILE_TEXTS[i % HOSTILE_TEXTS.length], `ref ${name}`.slice(0, 64));
    expect(sent.user.name).toBe(name);
    expect(await b.next((f) => f.type === "message" && f.id === sent.id)).toEqual(sent);
  }
  for (const text of HOSTILE_TEXTS) {
    const sent = await b.say("meta", text, text.slice(0, 64));
    expect(sent.text).toBe(text);
    expect(await a.next((f) => f.type === "message" && f.id === sent.id)).toEqual(sent);
  }
  const echoed = a.frames.filter((f) => f.type === "message");
  expect(await storedHistory(urlB, "meta", reader.cookie)).toEqual(echoed as never);
  const late = await Client.connect(urlB, reader);
  expect((await late.join("meta")).history.messages).toEqual(echoed as never);
  // the tables are all still there
  expect((await b.say("meta", "after")).id).toBe(echoed.length + 1);
}

describe("limits", () => {
  test("MAX_CONNECTIONS_PER_USER: the next upgrade gets 429, also in a burst; closing one frees a slot", async () => {
    await using chat = await serve({ maxConnectionsPerUser: 3 });
    const alice = await newSession(chat.url);
    // a burst from a session that never connected before
    const first = await burst(chat.url, Array(20).fill(alice.cookie));
    expect(first.open).toHaveLength(3);
    expect(first.statuses).toEqual(Array(17).fill(429));
    const res = await fetch(`${chat.url}/chat`, { headers: { ...UPGRADE, cookie: alice.cookie } });
    expect(res.status).toBe(429);
    expect(((await res.json()) as any).error.code).toBe("limit_exceeded");
    // other users are not affected
    const bob = await Client.connect(chat.url, await newSession(chat.url));
    first.open[0].destroy();
    await first.open[0].closed;
    const again = await openWhenFree(chat.url, alice.cookie);
    expect(again).toBe(101);
    expect(await metric(chat.url, "chat_connections_refused_total")).toBe(18);
    await bob.close();
  });

  test("MAX_CONNECTIONS: past it the upgrade gets 503, also in a burst", async () => {
    await using chat = await serve({ maxConnections: 5 });
    const sessions = await Promise.all(Array.from({ length: 20 }, () => newSession(chat.url)));
    const { open, statuses } = await burst(chat.url, sessions.map((s) => s.cookie));
    expect(open).toHaveLength(5);
    expect(statuses).toEqual(Array(15).fill(503));
    expect(await metric(chat.url, "chat_connections")).toBe(5);
    expect(await upgradeStatus(chat.url, { cookie: sessions[0].cookie })).toBe(503);
    open[0].destroy();
    expect(await openWhenFree(chat.url, sessions[0].cookie)).toBe(101);
    // the sockets that did open work as usual
    open[1].sendJson({ type: "join", room: "room" });
    expect(await open[1].next((m) => m.type === "presence")).toMatchObject({ room: "room" });
  });

  test("MAX_ROOMS_PER_CONNECTION: one more room is limit_exceeded; rejoining is fine; a leave frees a slot", async () => {
    await using chat = await serve({ maxRoomsPerConnection: 3 });
    const session = await newSession(chat.url);
    const c = await Client.connect(chat.url, session);
    for (const room of ["r1", "r2", "r3"]) await c.join(room);
    c.send({ type: "join", room: "r4" });
    expect(await c.next((f) => f.type === "error")).toMatchObject({ code: "limit_exceeded", room: "r4", message: expect.stringContaining("3 rooms") });
    c.send({ type: "say", room: "r4", text: "x", ref: "nope" });
    expect(await c.next((f) => f.type === "error")).toMatchObject({ code: "not_joined", ref: "nope" });
    c.send({ type: "join", room: "r2", since: 0 }); // already joined: no new slot needed (and no history)
    await c.next((f) => f.type === "presence" && f.room === "r2");
    c.send({ type: "leave", room: "r1" });
    await c.join("r4");
    // another socket of the same user has its own allowance
    const tab = await Client.connect(chat.url, session);
    for (const room of ["r5", "r6", "r7"]) await tab.join(room);
    const rooms = (await (await fetch(`${chat.url}/api/rooms`, { headers: { cookie: session.cookie } })).json()) as unknown[];
    expect(rooms).toHaveLength(6);
  });

  test("RENAME_LIMIT: PUT /api/me gets 429 with Retry-After and the nick frame rate_limited, from one budget per user", async () => {
    await using chat = await serve({ renameLimit: "3/60s" });
    const alice = await newSession(chat.url);
    const bob = await newSession(chat.url);
    const a = await Client.connect(chat.url, alice);
    expect((await putName(chat.url, alice.cookie, "one")).status).toBe(200);
    a.send({ type: "nick", name: "two" });
    await a.next((f) => f.type === "renamed");
    expect((await putName(chat.url, alice.cookie, "three")).status).toBe(200);
    const refused = await putName(chat.url, alice.cookie, "four");
    expect(refused.status).toBe(429);
    // 3 per 60 s: the next rename is at most 20 s away
    const retryAfter = Number(refused.headers.get("retry-after"));
    expect(retryAfter).toBeGreaterThanOrEqual(1);
    expect(retryAfter).toBeLessThanOrEqual(20);
    expect(((await refused.json()) as any).error.code).toBe("rate_limited");
    a.send({ type: "nick", name: "five" });
    const error = await a.next((f) => f.type === "error");
    expect(error).toMatchObject({ code: "rate_limited" });
    expect(error.retryAfterMs).toBeGreaterThan(0);
    expect(error.retryAfterMs).toBeLessThanOrEqual(20_000);
    expect(((await (await fetch(`${chat.url}/api/me`, { headers: { cookie: alice.cookie } })).json()) as any).name).toBe("three");
    // bob has his own budget
    expect((await putName(chat.url, bob.cookie, "bob")).status).toBe(200);
    expect(await metric(chat.url, 'chat_rate_limited_total{reason="rename"}')).toBe(2);
    expect(await metric(chat.url, "chat_rate_limited_total")).toBe(2);
  });

  test("RATE_LIMIT is per user: a second tab does not double the budget", async () => {
    await using chat = await serve({ rateLimit: "4/60s" });
    const session = await newSession(chat.url);
    const [tab1, tab2] = [await Client.connect(chat.url, session), await Client.connect(chat.url, session)];
    await tab1.join("room");
    await tab2.join("room");
    await tab1.say("room", "1");
    await tab2.say("room", "2");
    await tab1.say("room", "3");
    await tab2.say("room", "4");
    tab2.send({ type: "say", room: "room", text: "5", ref: "five" });
    expect(await tab2.next((f) => f.type === "error")).toMatchObject({ code: "rate_limited", ref: "five" });
    tab1.send({ type: "say", room: "room", text: "6", ref: "six" });
    expect(await tab1.next((f) => f.type === "error")).toMatchObject({ code: "rate_limited", ref: "six" });
    // another user has a budget of their own
    const { clients: [other] } = await usersInRoom(chat.url, 1, "room");
    expect((await other.say("room", "mine")).id).toBe(5);
  });

  test("JOIN_LIMIT is per user: toggling a room gets rate_limited naming the room, a reconnect does not refill it, the room ends up right", async () => {
    await using chat = await serve({ joinLimit: "3/60s" });
    const [aliceSession, bobSession, carolSession] = [await newSession(chat.url), await newSession(chat.url), await newSession(chat.url)];
    const [alice, bob] = [await Client.connect(chat.url, aliceSession), await Client.connect(chat.url, bobSession)];
    await bob.join("room");
    for (let i = 0; i < 3; i++) {
      await alice.join("room");
      alice.send({ type: "leave", room: "room" });
    }
    alice.send({ type: "join", room: "room" });
    const refused = await alice.next((f) => f.type === "error");
    expect(refused).toMatchObject({ code: "rate_limited", room: "room", message: expect.stringContaining("Cannot join room") });
    // 3 per 60 s: the next join is at most 20 s away
    expect(refused.retryAfterMs).toBeGreaterThan(0);
    expect(refused.retryAfterMs).toBeLessThanOrEqual(20_000);
    // the refused socket stays open; a new connection of alice is refused too
    alice.send({ type: "say", room: "room", text: "not in it", ref: "r1" });
    expect(await alice.next((f) => f.type === "error")).toMatchObject({ code: "not_joined", ref: "r1" });
    await alice.close();
    const again = await Client.connect(chat.url, aliceSession);
    again.send({ type: "join", room: "room" });
    expect(await again.next((f) => f.type === "error")).toMatchObject({ code: "rate_limited", room: "room" });
    // carol arrives after all of it: the diff that names her carries alice's last state too
    const carol = await Client.connect(chat.url, carolSession);
    await carol.join("room");
    await bob.next(diffWith("joins", carolSession.id));
    expect(bob.people("room")).toEqual([bobSession.id, carolSession.id].sort());
    expect(bob.frames.filter((f) => f.type === "presence_diff").length).toBeLessThanOrEqual(7);
    expect(await metric(chat.url, 'chat_rate_limited_total{reason="join"}')).toBe(2);
  });

  test("a flood of cookie-less requests keeps unused session rows near MAX_UNUSED_SESSIONS; sessions in use survive", async () => {
    await checkSessionFlood();
  });

  test("a request body over 64 KiB is refused with 413 before it is read, and the server carries on", async () => {
    await using chat = await serve();
    const session = await newSession(chat.url);
    const res = await putName(chat.url, session.cookie, "x".repeat(1024 * 1024));
    expect(res.status).toBe(413);
    const chunked = new ReadableStream({
      start(controller) {
        for (let i = 0; i < 64; i++) controller.enqueue(new TextEncoder().encode("y".repeat(16 * 1024)));
        controller.close();
      },
    });
    const streamed = await fetch(`${chat.url}/api/me`, { method: "PUT", headers: { cookie: session.cookie, "content-type": "application/json" }, body: chunked, duplex: "half" } as RequestInit);
    expect(streamed.status).toBe(413);
    expect((await putName(chat.url, session.cookie, "fine")).status).toBe(200);
  });
});

/** Retries an upgrade until it opens (a closed socket leaves the count a moment after the TCP close). */
async function openWhenFree(baseUrl: string, cookie: string): Promise<number> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const status = await upgradeStatus(baseUrl, { cookie });
    if (status === 101 || Date.now() > deadline) return status;
    await Bun.sleep(20);
  }
}

/** Floods cookie-less /api/me (50 at a time) and checks the session table stays bounded (SQLite unless `databaseUrl`). */
async function checkSessionFlood(databaseUrl?: string) {
  const cap = 100;
  await using chat = await serve({ databaseUrl, maxUnusedSessions: cap });
  // connected: in use, never pruned
  const { sessions: [alice], clients: [a] } = await usersInRoom(chat.url, 1, "room");
  // the page alone hands out a cookie without a row
  await Promise.all(Array.from({ length: 200 }, () => fetch(`${chat.url}/`).then((r) => r.arrayBuffer())));
  expect(await chat.store.countSessions()).toBe(1);
  const idle = await newSession(chat.url); // never connected: the oldest unused row, pruned first
  let most = 0;
  for (let round = 0; round < 40; round++) {
    const answers = await Promise.all(Array.from({ length: 50 }, () => fetch(`${chat.url}/api/me`)));
    expect(answers.every((r) => r.status === 200)).toBe(true);
    most = Math.max(most, await chat.store.countSessions());
  }
  // 2,000 requests: without an eager prune all 2,000 rows would still be there (the timer runs once a minute)
  const bound = cap + cap / 10 + 50 + 1;
  expect(most).toBeLessThanOrEqual(bound);
  await chat.pruneSessions();
  expect(await chat.store.countSessions()).toBeLessThanOrEqual(cap + 1);
  // a pruned session's cookie still verifies, but it names nobody: it gets a fresh user, never someone else's
  const again = (await (await fetch(`${chat.url}/api/me`, { headers: { cookie: idle.cookie } })).json()) as { id: string };
  expect([idle.id, alice.id]).not.toContain(again.id);
  const me = (await (await fetch(`${chat.url}/api/me`, { headers: { cookie: alice.cookie } })).json()) as { id: string };
  expect(me.id).toBe(alice.id);
  expect((await a.say("room", "still me")).user.id).toBe(alice.id);
}

describe("origin", () => {
  test("the default same-host rule refuses null, other ports, other hosts, lookalikes, and an http page talking to https", async () => {
    await using chat = await serve();
    const session = await newSession(chat.url);
    const host = new URL(chat.url).host;
    const port = new URL(chat.url).port;
    const refused = ["null", "", `http://127.0.0.1:${Number(port) + 1}`, `http://localhost:${port}`, `http://${host}.evil.example`, "https://evil.example", `http://evil.example:${port}`, "file://", `ws://evil.example`];
    for (const origin of refused) {
      expect({ origin, status: await upgradeStatus(chat.url, { cookie: session.cookie, origin }) }).toEqual({ origin, status: 403 });
    }
    // behind a TLS proxy that says so (its session cookie is __Host-sid), a page served over plain http may not connect
    const https = { "x-forwarded-proto": "https" };
    const secure = (await fetch(`${chat.url}/api/me`, { headers: https })).headers.get("set-cookie")!.split(";")[0];
    expect(await upgradeStatus(chat.url, { cookie: secure, origin: `http://${host}`, ...https })).toBe(403);
    expect(await upgradeStatus(chat.url, { cookie: secure, origin: `https://${host}`, ...https })).toBe(101);
    // same host and port; https too, since a TLS proxy that sets no header looks like http here
    for (const origin of [`http://${host}`, `https://${host}`]) expect(await upgradeStatus(chat.url, { cookie: session.cookie, origin })).toBe(101);
    expect(await upgradeStatus(chat.url, { cookie: session.cookie })).toBe(101);
    expect(await metric(chat.url, "chat_connections_refused_total")).toBe(0);
  });

  test("ALLOWED_ORIGINS pins scheme, host and port exactly, and replaces the same-host rule", async () => {
    await using chat = await serve({ allowedOrigins: "https://chat.example.com/, http://localhost:8080" });
    const session = await newSession(chat.url);
    for (const origin of ["https://chat.example.com", "http://localhost:8080"]) {
      expect({ origin, status: await upgradeStatus(chat.url, { cookie: session.cookie, origin }) }).toEqual({ origin, status: 101 });
    }
    const refused = ["null", "http://chat.example.com", "https://chat.example.com:8443", "https://sub.chat.example.com", "https://chat.example.com.evil.example",
      "http://localhost:8081", "https://localhost:8080", `http://${new URL(chat.url).host}`];
    for (const origin of refused) {
      expect({ origin, status: await upgradeStatus(chat.url, { cookie: session.cookie, origin }) }).toEqual({ origin, status: 403 });
    }
  });
});

describeWithServices("abuse, cluster", (services) => {

  test("connection limits hold on a Postgres node when upgrades arrive all at once", async () => {
    await using cluster = await spawnCluster(services, ["limits"], { MAX_CONNECTIONS_PER_USER: "3", MAX_CONNECTIONS: "5" });
    const [node] = cluster.nodes;
    const alice = await newSession(node.url);
    const perUser = await burst(node.url, Array(20).fill(alice.cookie));
    expect(perUser.open).toHaveLength(3);
    expect(perUser.statuses).toEqual(Array(17).fill(429));
    const others = await Promise.all(Array.from({ length: 20 }, () => newSession(node.url)));
    const total = await burst(node.url, others.map((s) => s.cookie));
    expect(total.open).toHaveLength(2);
    expect(total.statuses).toEqual(Array(18).fill(503));
    expect(await metric(node.url, "chat_connections")).toBe(5);
  });

  test("every node applies ALLOWED_ORIGINS to a session issued by another", async () => {
    await using cluster = await spawnCluster(services, ["origin-a", "origin-b"], { ALLOWED_ORIGINS: "https://chat.example.com" });
    const [a, b] = cluster.nodes;
    const session = await newSession(a.url);
    for (const node of [a, b]) {
      expect(await upgradeStatus(node.url, { cookie: session.cookie, origin: "https://chat.example.com" })).toBe(101);
      for (const origin of ["null", `http://${new URL(node.url).host}`, "https://chat.example.com:444", "http://chat.example.com"]) {
        expect({ origin, status: await upgradeStatus(node.url, { cookie: session.cookie, origin }) }).toEqual({ origin, status: 403 });
      }
    }
  });

  test("names and texts with metacharacters cross nodes and come back from Postgres verbatim", async () => {
    await using cluster = await spawnCluster(services, ["meta-a", "meta-b"], { RENAME_LIMIT: "100/1s" });
    const [a, b] = cluster.nodes;
    await checkVerbatim(a.url, b.url);
  });

  test("a flood of cookie-less requests keeps unused session rows bounded on Postgres too", async () => {
    await checkSessionFlood(await services.pg.createDatabase());
  });
});
