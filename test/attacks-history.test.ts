// The attacks on joins, history and names, at default limits: the attacker and the bystander are told apart
// by X-Forwarded-For (TRUSTED_PROXIES=127.0.0.1). Counts only; bench/attacks.ts measures the bystander's latency.
import { Database } from "bun:sqlite";
import type { Config } from "../server.ts";
import { describe, expect, test } from "bun:test";
import { allowed, Client, DEFAULT_LIMITS, putName, serve, sessionFrom, tempDir } from "./helpers.ts";

const ATTACKER = "198.51.100.1";
const BIG = { messages: 500, chars: 2000 }; // ~3 MB of UTF-8: what one join with since 0 sent before

const budgets = (chat: { config: Config }) => chat.config;

const isPresence = (f: { type: string }) => f.type === "presence_diff";

/** A server on a SQLite file that already holds room "big": 500 messages of 2000 CJK characters. */
async function serveWithBigRoom() {
  const tmp = tempDir();
  const databaseUrl = `sqlite://${tmp.dir}/chat.db`;
  await (await serve({ databaseUrl })).stop(); // the server makes its tables
  const db = new Database(`${tmp.dir}/chat.db`);
  const text = Array.from({ length: BIG.chars }, (_, i) => String.fromCharCode(0x4e00 + ((i * 7919) % 20000))).join("");
  db.transaction(() => {
    db.query("INSERT INTO rooms (name, last_id) VALUES ('big', ?)").run(BIG.messages);
    for (let id = 1; id <= BIG.messages; id++) db.query("INSERT INTO messages (room, id, user_id, name, text, ts, ref) VALUES ('big', ?, 'seed', 'seed', ?, ?, NULL)").run(id, text, Date.now());
  })();
  db.close();
  const chat = await serve({ ...DEFAULT_LIMITS, databaseUrl });
  return Object.assign(chat, {
    async [Symbol.asyncDispose]() {
      await chat.stop();
      tmp[Symbol.dispose]();
    },
  });
}

/** Opens a socket for `cookie` from `ip`. */
const connect = (url: string, cookie: string, ip: string) => Client.connect(url, { cookie, id: "", name: "", registered: false, admin: false }, { "x-forwarded-for": ip });

describe("attacks on joins, history and names, defended", () => {
  test("join loop: reconnecting does not renew JOIN_LIMIT, and the room hears at most one presence frame per 100 ms", async () => {
    await using chat = await serve(DEFAULT_LIMITS);
    const bystanderSession = await sessionFrom(chat.url, "192.0.2.1");
    const bystander = await connect(chat.url, bystanderSession.cookie, "192.0.2.1");
    await bystander.join("lobby");
    const attacker = await sessionFrom(chat.url, ATTACKER);
    const started = Date.now();
    let accepted = 0;
    const refusals: { code: string; retryAfterMs?: number }[] = [];
    for (let round = 0; round < 3; round++) {
      const ws = await connect(chat.url, attacker.cookie, ATTACKER);
      for (let i = 0; i < 100; i++) {
        ws.send({ type: "join", room: "lobby" });
        ws.send({ type: "leave", room: "lobby" });
      }
      // each join is answered by the room's presence, or refused naming the room
      const answers = [];
      for (let i = 0; i < 100; i++) answers.push(await ws.next((f) => (f.type === "presence" && f.room === "lobby") || (f.type === "error" && f.room === "lobby")));
      accepted += answers.filter((f) => f.type === "presence").length;
      refusals.push(...(answers.filter((f) => f.type === "error") as unknown as { code: string; retryAfterMs?: number }[]));
      await ws.close();
    }
    const elapsed = Date.now() - started;
    expect(accepted).toBeLessThanOrEqual(allowed(chat.config.joinLimit, elapsed)); // 300 when every connection had its own
    expect(refusals.length).toBe(300 - accepted);
    expect(refusals.every((f) => f.code === "rate_limited" && f.retryAfterMs! > 0)).toBe(true);
    // the bystander's echo comes after everything sent to it before
    await bystander.say("lobby", "sync");
    const heard = bystander.frames.filter(isPresence).length;
    expect(heard).toBeLessThanOrEqual(Math.ceil((Date.now() - started) / 100) + 1);
  });

  test("history amplification: since 0 sends one bounded page, a rejoin sends no history, and past the byte budget joins are rate_limited", async () => {
    await using chat = await serveWithBigRoom();
    const attacker = await sessionFrom(chat.url, ATTACKER);
    const ws = await connect(chat.url, attacker.cookie, ATTACKER);
    ws.send({ type: "join", room: "big", since: 0 });
    const { historyPageBytes, historyBytesPerAddress } = budgets(chat);
    const started = Date.now();
    const first = await ws.next((f) => f.type === "history" && f.room === "big");
    expect(Buffer.byteLength(JSON.stringify(first))).toBeLessThanOrEqual(historyPageBytes);
    expect(first.more).toBe(true); // the rest is asked for page by page
    await ws.next((f) => f.type === "presence" && f.room === "big");
    // a rejoin of a room the socket is in: presence, no messages again
    ws.send({ type: "join", room: "big" });
    await ws.next((f) => f.type === "presence" && f.room === "big");
    expect(ws.untaken().filter((f) => f.type === "history").flatMap((f) => (f as { messages: unknown[] }).messages)).toEqual([]);

    // two users' 20 sockets joining with since 0 until refused: the address's byte budget ends it before their join limits
    const other = await sessionFrom(chat.url, ATTACKER);
    const sockets = [ws, ...(await Promise.all(Array.from({ length: 19 }, (_, i) => connect(chat.url, (i % 2 ? attacker : other).cookie, ATTACKER))))];
    let bytes = 0;
    let accepted = 0;
    let refusal: Record<string, unknown> | undefined;
    for (let i = 0; i < 2000 && !refusal; i++) {
      const socket = sockets[i % 20];
      socket.send({ type: "leave", room: "big" });
      socket.send({ type: "join", room: "big", since: 0 });
      const answer = await socket.next((f) => (f.type === "history" && f.room === "big") || (f.type === "error" && f.room === "big"));
      if (answer.type === "error") refusal = answer;
      else (bytes += Buffer.byteLength(JSON.stringify(answer))), accepted++;
    }
    expect(refusal).toMatchObject({ code: "rate_limited", retryAfterMs: expect.any(Number) });
    expect(accepted).toBeLessThan(2 * chat.config.joinLimit.count);
    // before: 100 joins × 3 MB per connection, without end; now the address's budget (a full one pays one page more)
    expect(bytes).toBeLessThanOrEqual(allowed(historyBytesPerAddress, Date.now() - started) + historyPageBytes);
  });

  test("REST paging: one address paging without pause gets 429 with Retry-After once its history byte budget is spent", async () => {
    await using chat = await serveWithBigRoom();
    const get = (before: number) => fetch(`${chat.url}/api/rooms/big/messages?limit=100&before=${before}`, { headers: { "x-forwarded-for": ATTACKER } });
    const { historyBytesPerAddress } = budgets(chat);
    const started = Date.now();
    const page = await get(BIG.messages + 1);
    const body = await page.text();
    expect(page.status).toBe(200);
    let bytes = Buffer.byteLength(body);
    let refused: Response | undefined;
    for (let i = 0; i < 2000 && !refused; i++) {
      const res = await get(BIG.messages + 1 - (i % 5) * 100);
      if (res.status === 429) refused = res;
      else bytes += (await res.arrayBuffer()).byteLength;
    }
    expect(refused?.status).toBe(429);
    expect(Number(refused!.headers.get("retry-after"))).toBeGreaterThan(0);
    expect(bytes).toBeLessThanOrEqual(allowed(historyBytesPerAddress, Date.now() - started) + Buffer.byteLength(body)); // a full budget pays any page
    // another address pages as usual
    expect((await fetch(`${chat.url}/api/rooms/big/messages?limit=10`, { headers: { "x-forwarded-for": "192.0.2.1" } })).status).toBe(200);
  });

  test("names: bidi controls are refused, and a look-alike of a taken name is taken", async () => {
    await using chat = await serve(DEFAULT_LIMITS);
    const [alice, mallory] = [await sessionFrom(chat.url, "192.0.2.1"), await sessionFrom(chat.url, ATTACKER)];
    expect((await putName(chat.url, alice.cookie, "ape")).status).toBe(200);
    expect((await putName(chat.url, mallory.cookie, "\u202Eepa")).status).toBe(400);
    expect((await putName(chat.url, mallory.cookie, "\u0430\u0440\u0435")).status).toBe(409); // Cyrillic "аре"
  });
});
