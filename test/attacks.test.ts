// The attacks at a small scale, against a real server with every limit at its default: the attacker and
// the bystander are different clients as on the internet (TRUSTED_PROXIES=127.0.0.1, X-Forwarded-For names
// each), and each test asserts the defended outcome as counts. bench/attacks.ts measures the same attacks' cost.
// Session fixation and duplicate cookies: test/sessions.test.ts. Attacks whose defenses are on other branches:
// test/attacks-pending.test.ts.
import { describe, expect, test } from "bun:test";
import { allowed, Client, DEFAULT_LIMITS, mintFrom, serve, sessionFrom, type Session } from "./helpers.ts";
import { storedHistory } from "./probes.ts";
import { RawSocket } from "./raw.ts";

const ATTACKER = "198.51.100.1";

/** Polls until `check` holds (bounded). */
async function until(check: () => boolean, what: string, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(20);
  }
}

describe("attacks, defended", () => {
  test("free identities: one address bursting GET /api/me, sockets and says gets only what the per-address limits allow; a bystander still gets in and is stored", async () => {
    await using chat = await serve(DEFAULT_LIMITS);
    const { sessionsPerAddress, upgradesPerAddress, maxConnectionsPerAddress, rateLimitPerAddress } = chat.config;
    const started = Date.now();

    // 100 cookie-less /api/me at once: the bucket's sessions, then 429
    const minted = await Promise.all(Array.from({ length: 100 }, () => mintFrom(chat.url, ATTACKER)));
    const sessions = minted.filter((m): m is Session => typeof m !== "number");
    expect(sessions.length).toBeGreaterThanOrEqual(sessionsPerAddress.count);
    expect(sessions.length).toBeLessThanOrEqual(allowed(sessionsPerAddress, Date.now() - started));
    expect(new Set(minted.filter((m) => typeof m === "number"))).toEqual(new Set([429]));
    expect(await chat.store.countSessions()).toBe(sessions.length);

    // 20 sockets for every minted user at once: at most the address's upgrades, never more than its open sockets
    const tries = await Promise.allSettled(sessions.flatMap((s) => Array.from({ length: 20 }, () => RawSocket.open(chat.url, { cookie: s.cookie, headers: { "x-forwarded-for": ATTACKER } }))));
    const open = tries.flatMap((t) => (t.status === "fulfilled" ? [t.value] : []));
    const refusedStatuses = new Set(tries.flatMap((t) => (t.status === "rejected" ? [Number(/answered (\d+)/.exec(String(t.reason))?.[1])] : [])));
    expect(open.length).toBeGreaterThan(0);
    expect(open.length).toBeLessThanOrEqual(Math.min(maxConnectionsPerAddress, allowed(upgradesPerAddress, Date.now() - started)));
    expect(refusedStatuses).toEqual(new Set([429]));

    // each open socket joins and says 20: the address's say budget, then rate_limited; every accepted one is stored
    for (const raw of open) raw.sendJson({ type: "join", room: "lobby" });
    await Promise.all(open.map((raw) => raw.next((m) => m.type === "presence")));
    const saidFrom = Date.now();
    open.forEach((raw, i) => {
      for (let k = 0; k < 20; k++) raw.sendJson({ type: "say", room: "lobby", text: `minted ${i}.${k}`, ref: `s${i}.${k}` });
    });
    const answers = (raw: RawSocket, i: number) => raw.texts().filter((m) => typeof m.ref === "string" && m.ref.startsWith(`s${i}.`) && (m.type === "error" || m.type === "message"));
    await until(() => open.every((raw, i) => answers(raw, i).length === 20), "every say answered");
    const all = open.flatMap((raw, i) => answers(raw, i));
    const accepted = all.filter((m) => m.type === "message");
    expect(accepted.length).toBeGreaterThan(0);
    expect(accepted.length).toBeLessThanOrEqual(allowed(rateLimitPerAddress, Date.now() - saidFrom));
    expect(new Set(all.filter((m) => m.type === "error").map((m) => m.code))).toEqual(new Set(["rate_limited"]));

    // a bystander on another address: a session, a socket, a stored message
    const bystander = await sessionFrom(chat.url, "192.0.2.1");
    const b = await Client.connect(chat.url, bystander, { "x-forwarded-for": "192.0.2.1" });
    await b.join("lobby");
    const mine = await b.say("lobby", "still here");
    const stored = await storedHistory(chat.url, "lobby", bystander.cookie);
    expect(stored.map((m) => m.id).sort((x, y) => x - y)).toEqual([...accepted.map((m) => m.id), mine.id].sort((x, y) => x - y));
    for (const raw of open) raw.destroy();
  });

  test("default-name squatting: with 20 users renamed to the names a counter would hand out next, new guests still get a name", async () => {
    await using chat = await serve(DEFAULT_LIMITS);
    // from 20 addresses, so neither SESSIONS_PER_ADDRESS nor RENAME_LIMIT_PER_ADDRESS stands in the way
    const ips = Array.from({ length: 20 }, (_, i) => `198.51.100.${1 + i}`);
    const squatters = await Promise.all(ips.map((ip) => sessionFrom(chat.url, ip)));
    const n = await chat.store.countUsers();
    for (const [i, s] of squatters.entries()) {
      const res = await fetch(`${chat.url}/api/me`, {
        method: "PUT", headers: { cookie: s.cookie, "content-type": "application/json", "x-forwarded-for": ips[i] }, body: JSON.stringify({ name: `user${n + 1 + i}` }),
      });
      expect(res.status).toBe(200);
    }
    const names = new Set(squatters.map((_, i) => `user${n + 1 + i}`));
    const fresh = await Promise.all(Array.from({ length: 20 }, (_, i) => sessionFrom(chat.url, `192.0.2.${1 + i}`)));
    for (const s of fresh) expect(names.has(s.name)).toBe(false);
    expect(new Set(fresh.map((s) => s.name)).size).toBe(20);
  });

  test("a rename reaches each socket sharing a room once, however many rooms it shares, and nobody else; RENAME_LIMIT bounds how many", async () => {
    await using chat = await serve(DEFAULT_LIMITS);
    const rooms = Array.from({ length: 50 }, (_, i) => `r${i}`);
    const attacker = await sessionFrom(chat.url, ATTACKER);
    const a = await Client.connect(chat.url, attacker, { "x-forwarded-for": ATTACKER });
    for (const room of rooms) await a.join(room);
    // a crowd member in each room (one of them in two), from addresses of their own, and one outsider
    const crowd = await Promise.all(rooms.map(async (room, i) => {
      const ip = `198.18.0.${i + 1}`;
      const c = await Client.connect(chat.url, await sessionFrom(chat.url, ip), { "x-forwarded-for": ip });
      await c.join(room);
      if (i === 0) await c.join("r1");
      return c;
    }));
    const outsiderSession = await sessionFrom(chat.url, "192.0.2.1");
    const outsider = await Client.connect(chat.url, outsiderSession, { "x-forwarded-for": "192.0.2.1" });
    await outsider.join("elsewhere");

    for (let i = 0; i < 12; i++) a.send({ type: "nick", name: `squat-${i}` });
    const answers = [];
    for (let i = 0; i < 12; i++) answers.push(await a.next((f) => (f.type === "renamed" && f.user.id === attacker.id) || f.type === "error"));
    const accepted = answers.filter((f) => f.type === "renamed").length;
    expect(accepted).toBe(chat.config.renameLimit.count);
    expect(answers.filter((f) => f.type === "error").every((f) => f.code === "rate_limited")).toBe(true);
    const heard = (c: Client) => c.frames.filter((f) => f.type === "renamed" && f.user.id === attacker.id).length;
    await until(() => crowd.every((c) => heard(c) >= accepted), "the crowd to hear every rename");
    // the outsider's own echo comes after anything the server sent it before
    await outsider.say("elsewhere", "sync");
    for (const c of crowd) await c.say(c === crowd[0] ? "r0" : (c.frames.find((f) => f.type === "presence") as { room: string }).room, "sync");
    expect(crowd.map(heard)).toEqual(crowd.map(() => accepted));
    expect(heard(outsider)).toBe(0);
  });
});
