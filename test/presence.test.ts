// Presence as coalesced diffs, and history in pages paid from byte budgets: what a bystander, a joiner
// and a recovering client receive, counted in frames and bytes (bounds, not timings).
import { describe, expect, test } from "bun:test";
import type { NewMessage, ServerMessage } from "../server.ts";
import { Client, diffWith, newSession, rawInRoom, serve, type Session, until, usersInRoom } from "./helpers.ts";
import { metric } from "./probes.ts";

type Frame = ServerMessage;
const INTERVAL = 100; // PRESENCE_INTERVAL_MS's default

/** Frames of one type a client received so far. */
const framesOf = <K extends Frame["type"]>(client: Client, type: K) => client.frames.filter((f): f is Extract<Frame, { type: K }> => f.type === type);

/**
 * Replays a client's presence frames for a room and checks each diff against the view so far: it never leaves
 * someone not in the view, and joins someone already in it only when that is the client itself. The final view.
 */
function replayPresence(client: Client, room: string, self: string): string[] {
  let view = new Set<string>();
  for (const f of client.frames) {
    if (f.type === "presence" && f.room === room) view = new Set(f.users.map((u) => u.id));
    if (f.type !== "presence_diff" || f.room !== room) continue;
    for (const u of f.leaves) expect({ leaves: u.id, known: view.has(u.id) }).toEqual({ leaves: u.id, known: true });
    for (const u of f.leaves) view.delete(u.id);
    for (const u of f.joins) if (u.id !== self) expect({ joins: u.id, known: view.has(u.id) }).toEqual({ joins: u.id, known: false });
    for (const u of f.joins) view.add(u.id);
  }
  return [...view].sort();
}

/** `count` messages of `chars` CJK characters (3 UTF-8 bytes each), stored straight into a room. */
async function seed(chat: Awaited<ReturnType<typeof serve>>, room: string, count: number, chars = 2000) {
  const user = { id: "useed", name: "seed" };
  const batch: NewMessage[] = Array.from({ length: count }, (_, i) => ({ room, user, text: String.fromCharCode(0x4e00 + i).repeat(chars), ts: Date.now() }));
  await chat.store.append(batch);
}

describe("presence diffs", () => {
  test("a join/leave loop by one user costs a bystander at most one presence_diff per interval, and its view ends right", async () => {
    await using chat = await serve();
    const { sessions: [bob], clients: [b] } = await usersInRoom(chat.url, 1, "room");
    await b.next(diffWith("joins", bob.id));
    const [alice, carol] = [await newSession(chat.url), await newSession(chat.url)];
    const a = await Client.connect(chat.url, alice);
    const started = performance.now();
    for (let i = 0; i < 40; i++) {
      await a.join("room");
      a.send({ type: "leave", room: "room" });
    }
    // carol arrives after the loop: the diff naming her carries alice's final state too
    const c = await Client.connect(chat.url, carol);
    await c.join("room");
    await b.next(diffWith("joins", carol.id));
    const intervals = (performance.now() - started) / INTERVAL;
    const diffs = framesOf(b, "presence_diff");
    expect(diffs.length - 1).toBeLessThanOrEqual(Math.ceil(intervals) + 1); // the first one was bob's own arrival
    expect(replayPresence(b, "room", bob.id)).toEqual([bob.id, carol.id].sort());
  });

  test("M arrivals cost each present member O(M): at most one diff per interval, each arrival named once", async () => {
    await using chat = await serve();
    const M = 24;
    const started = performance.now();
    const { sessions, clients } = await usersInRoom(chat.url, M, "crowd");
    const last = sessions.at(-1)!;
    await Promise.all(clients.map((c) => c.next(diffWith("joins", last.id))));
    const intervals = (performance.now() - started) / INTERVAL;
    const everyone = sessions.map((s) => s.id).sort();
    for (const [i, client] of clients.entries()) {
      const diffs = framesOf(client, "presence_diff");
      expect(diffs.length).toBeLessThanOrEqual(Math.ceil(intervals) + 1);
      const named = diffs.flatMap((d) => d.joins.map((u) => u.id)).filter((id) => id !== sessions[i].id);
      expect(new Set(named).size).toBe(named.length);
      expect(replayPresence(client, "crowd", sessions[i].id)).toEqual(everyone);
    }
  });

  test("a user who arrives and leaves within one interval appears in neither list", async () => {
    await using chat = await serve({ presenceIntervalMs: 2_000 });
    const { sessions: [bob], clients: [b] } = await usersInRoom(chat.url, 1, "room");
    await b.next(diffWith("joins", bob.id), 10_000);
    const [alice, carol] = [await newSession(chat.url), await newSession(chat.url)];
    const a = await Client.connect(chat.url, alice);
    await a.join("room"); // starts the next interval
    await a.close();
    await (await Client.connect(chat.url, carol)).join("room");
    const diff = await b.next(diffWith("joins", carol.id), 10_000);
    expect(diff).toEqual({ type: "presence_diff", room: "room", joins: [{ id: carol.id, name: carol.name }], leaves: [] });
    expect(b.frames.some((f) => f.type === "presence_diff" && [...f.joins, ...f.leaves].some((u) => u.id === alice.id))).toBe(false);
  });

  test("a joiner's view after its list and the diffs that follow equals the room's members, through tabs coming and going", async () => {
    await using chat = await serve();
    const sessions: Session[] = [];
    for (let i = 0; i < 6; i++) sessions.push(await newSession(chat.url));
    const tabs: { session: Session; client: Client }[] = [];
    // joins and leaves interleaved, some users with two tabs, without waiting for any diff in between
    for (let round = 0; round < 3; round++) {
      for (const session of sessions) {
        const client = await Client.connect(chat.url, session);
        await client.join("mix");
        tabs.push({ session, client });
      }
      for (const i of [7, 5, 3, 1]) {
        if (i >= tabs.length) continue;
        const [gone] = tabs.splice(i, 1);
        await gone.client.close();
      }
    }
    const present = [...new Set(tabs.map((t) => t.session.id))].sort();
    // a last arrival: every diff before it is out by the one that names it
    const lastcomer = await newSession(chat.url);
    const late = await Client.connect(chat.url, lastcomer);
    await late.join("mix");
    tabs.push({ session: lastcomer, client: late });
    for (const { client } of tabs) await client.next(diffWith("joins", lastcomer.id));
    for (const { session, client } of tabs) expect(replayPresence(client, "mix", session.id)).toEqual([...present, lastcomer.id].sort());
  });
});

describe("history pages and budgets", () => {
  test("a recovery of 500 messages of 2000 CJK characters comes in pages within HISTORY_PAGE_BYTES, every message once, in order", async () => {
    await using chat = await serve();
    await seed(chat, "big", 500);
    const c = await Client.connect(chat.url, await newSession(chat.url));
    const { pages } = await c.recover("big", 0);
    expect(pages.length).toBeGreaterThan(1);
    for (const page of pages) expect(Buffer.byteLength(JSON.stringify(page))).toBeLessThanOrEqual(chat.config.historyPageBytes);
    expect(pages.every((p) => p.complete)).toBe(true);
    expect(pages.flatMap((p) => p.messages.map((m) => m.id))).toEqual(Array.from({ length: 500 }, (_, i) => i + 1));
    // a plain join gets the newest that fit one page, and complete: false (older ones are scrollback)
    const d = await Client.connect(chat.url, await newSession(chat.url));
    const { history } = await d.join("big");
    expect(Buffer.byteLength(JSON.stringify(history))).toBeLessThanOrEqual(chat.config.historyPageBytes);
    expect(history).toMatchObject({ complete: false, more: false });
    expect(history.messages.at(-1)!.id).toBe(500);
  });

  test("when the byte budget cannot pay: a page gets rate_limited with retryAfterMs and the socket stays joined; a join is refused whole", async () => {
    await using chat = await serve({ historyBytes: "300000/60s" });
    await seed(chat, "big", 100);
    await seed(chat, "other", 10);
    const session = await newSession(chat.url);
    const c = await Client.connect(chat.url, session);
    c.send({ type: "join", room: "big", since: 0 });
    let last = await c.next((f) => f.type === "history");
    let refused: Frame | undefined;
    while (!refused) {
      c.send({ type: "history", room: "big", after: last.seq });
      const f = await c.next((f) => f.type === "history" || f.type === "error");
      if (f.type === "error") refused = f;
      else last = f;
    }
    expect(refused).toMatchObject({ type: "error", code: "rate_limited", room: "big" });
    expect((refused as { retryAfterMs: number }).retryAfterMs).toBeGreaterThan(0);
    expect((await c.say("big", "still joined")).room).toBe("big");
    c.send({ type: "join", room: "other", since: 0 });
    expect(await c.next((f) => f.type === "error")).toMatchObject({ code: "rate_limited", room: "other", retryAfterMs: expect.any(Number) });
    c.send({ type: "say", room: "other", text: "x", ref: "r" });
    expect(await c.next((f) => f.type === "error")).toMatchObject({ code: "not_joined", ref: "r" });
    // a page of a room not joined names the problem
    c.send({ type: "history", room: "other", after: 0 });
    expect(await c.next((f) => f.type === "error")).toMatchObject({ code: "not_joined", room: "other" });
  });

  test("REST scrollback is paid from the address's budget: 429 with Retry-After once spent, and the socket's history shares it", async () => {
    await using chat = await serve({ historyBytesPerAddress: "200000/60s" });
    await seed(chat, "big", 100);
    const session = await newSession(chat.url);
    const get = () => fetch(`${chat.url}/api/rooms/big/messages?limit=20`, { headers: { cookie: session.cookie } });
    const first = await get();
    expect(first.status).toBe(200);
    expect(((await first.json()) as { messages: unknown[] }).messages).toHaveLength(20);
    let res = await get();
    while (res.status === 200) res = await get();
    expect(res.status).toBe(429);
    expect(Number(res.headers.get("retry-after"))).toBeGreaterThan(0);
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("rate_limited");
    const c = await Client.connect(chat.url, session);
    c.send({ type: "join", room: "big", since: 0 });
    expect(await c.next((f) => f.type === "error")).toMatchObject({ code: "rate_limited", room: "big" });
  });

  test("a reader that stops reading while history pages are sent to it is closed and counted as a slow consumer", async () => {
    await using chat = await serve({ historyBytes: "1000000000/1s", historyBytesPerAddress: "1000000000/1s", historyPageBytes: 4 * 1024 * 1024 });
    await seed(chat, "big", 300);
    const raw = await rawInRoom(chat.url, (await newSession(chat.url)).cookie, "big");
    raw.pause();
    for (let i = 0; i < 40; i++) raw.sendJson({ type: "history", room: "big", after: 0 });
    await until(async () => (await metric(chat.url, "chat_connections")) === 0, 10_000, "the stopped reader to be closed");
    expect(await metric(chat.url, "chat_slow_consumers_closed_total")).toBe(1);
    raw.destroy();
  });
});
