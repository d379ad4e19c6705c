// When the database or the fan-out fails under a running server: real Postgres and Redis processes on loopback,
// stopped and started by pid, and in-process servers whose log lines the tests read.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { RedisClient, SQL } from "bun";
import { FanoutCodec, type Log } from "../server.ts";
import { Client, diffWith, newSession, retryUntilServed, serve, usersInRoom } from "./helpers.ts";
import { missingServices, startPostgres, startRedis, type Postgres, type Redis } from "./services.ts";
import { metric } from "./probes.ts";

const skip = missingServices();

/** A log that keeps every event, and finds them. */
function recorder() {
  const events: Record<string, unknown>[] = [];
  const log: Log = (event) => void events.push(event);
  return { log, events, has: (fields: Record<string, unknown>) => events.some((e) => Object.entries(fields).every(([k, v]) => e[k] === v)) };
}

describe.skipIf(!!skip)("one node on Postgres", () => {
  let pg: Postgres;
  beforeAll(async () => {
    pg = await startPostgres();
  });
  afterAll(async () => {
    await pg?.[Symbol.asyncDispose]();
  });

  test("a single node chats, renames and pages history on Postgres, and keeps it all across a restart", async () => {
    const databaseUrl = await pg.createDatabase();
    const alice = await (async () => {
      await using chat = await serve({ databaseUrl });
      const [alice, bob] = [await newSession(chat.url), await newSession(chat.url)];
      const [a, b] = [await Client.connect(chat.url, alice), await Client.connect(chat.url, bob)];
      await a.join("room");
      await b.join("room");
      for (let i = 1; i <= 3; i++) expect((await a.say("room", `m${i}`)).id).toBe(i);
      expect(await b.collect("message", 3)).toEqual(a.frames.filter((f) => f.type === "message") as never);
      a.send({ type: "nick", name: "Alice" });
      expect(await b.next((f) => f.type === "renamed")).toEqual({ type: "renamed", user: { id: alice.id, name: "Alice" }, previous: alice.name });
      return alice;
    })();
    await using chat = await serve({ databaseUrl });
    const me = await fetch(`${chat.url}/api/me`, { headers: { cookie: alice.cookie } });
    expect(await me.json()).toEqual({ id: alice.id, name: "Alice", registered: false, admin: false });
    const page = await fetch(`${chat.url}/api/rooms/room/messages?before=3&limit=10`, { headers: { cookie: alice.cookie } });
    expect(((await page.json()) as { messages: { text: string }[] }).messages.map((m) => m.text)).toEqual(["m1", "m2"]);
    const a = await Client.connect(chat.url, alice);
    expect((await a.join("room")).history.messages.map((m) => m.id)).toEqual([1, 2, 3]);
    expect((await a.say("room", "after the restart")).id).toBe(4);
    expect(await (await fetch(`${chat.url}/api/rooms`)).json()).toEqual([{ name: "room", online: 1, lastId: 4, visibility: "public" }]);
  }, 30_000);

  test("with the database down: a room that cannot load answers unavailable naming it, renames answer unavailable, and both work once it is back", async () => {
    const logs = recorder();
    await using chat = await serve({ databaseUrl: await pg.createDatabase(), log: logs.log });
    const { sessions: [alice, bob], clients: [a, b] } = await usersInRoom(chat.url, 2, "up");
    await Promise.all([a, b].map((c) => c.next(diffWith("joins", bob.id))));
    await pg.stop();
    try {
      a.send({ type: "join", room: "down" });
      expect(await a.next((f) => f.type === "error", 20_000)).toMatchObject({ code: "unavailable", room: "down", message: expect.stringContaining("Cannot join down") });
      expect(logs.has({ level: "error", event: "load_room", room: "down" })).toBe(true);
      a.send({ type: "nick", name: "Nope" });
      expect(await a.next((f) => f.type === "error", 20_000)).toMatchObject({ code: "unavailable", message: expect.stringContaining("rename") });
      expect(logs.has({ level: "error", event: "nick" })).toBe(true);
    } finally {
      await pg.start();
    }
    // nothing of the failed join reached anyone, and the rename never happened
    expect(a.untaken()).toEqual([]);
    expect(b.untaken()).toEqual([]);
    // the failed room was dropped, not kept as failed: a later join loads it
    const history = await retryUntilServed(a, { type: "join", room: "down" }, (f) => f.type === "history" && f.room === "down");
    expect(history).toEqual({ type: "history", room: "down", seq: 0, messages: [], updates: [], complete: true, more: false });
    const renamed = await retryUntilServed(a, { type: "nick", name: "Alice" }, (f) => f.type === "renamed");
    expect(renamed).toEqual({ type: "renamed", user: { id: alice.id, name: "Alice" }, previous: alice.name });
    expect(await b.next((f) => f.type === "renamed")).toEqual(renamed as never);
  }, 60_000);

  test("a join with since ahead of the node asks the store; when that read fails the join still gets the newest messages", async () => {
    const logs = recorder();
    await using chat = await serve({ databaseUrl: await pg.createDatabase(), log: logs.log });
    const { sessions: [alice], clients: [a] } = await usersInRoom(chat.url, 1, "room");
    await a.next(diffWith("joins", alice.id)); // published: a joiner's list has her
    const bob = await newSession(chat.url);
    const b = await Client.connect(chat.url, bob); // opened before the database goes: the upgrade reads the session
    const sent = await a.say("room", "the newest");
    await pg.stop();
    try {
      // a client that believes it saw id 9 (its server was another node, or a reset database)
      const { history, presence } = await b.join("room", sent.id + 8);
      expect(history).toEqual({ type: "history", room: "room", seq: sent.seq, messages: [sent], updates: [], complete: false, more: false });
      expect(presence.users.map((u) => u.id)).toEqual([alice.id, bob.id]);
      expect(logs.has({ level: "error", event: "read_room", room: "room" })).toBe(true);
    } finally {
      await pg.start();
    }
    const next = await retryUntilServed(a, { type: "say", room: "room", text: "back", ref: "r" }, (f) => f.type === "message" && f.ref === "r");
    expect(next).toMatchObject({ id: sent.id + 1, text: "back" });
    expect(await b.next((f) => f.type === "message" && f.ref === "r")).toEqual(next);
  }, 60_000);
});

describe.skipIf(!!skip)("a cluster node filling gaps", () => {
  let pg: Postgres;
  let redis: Redis;
  beforeAll(async () => {
    [pg, redis] = await Promise.all([startPostgres(), startRedis()]);
  });
  afterAll(async () => {
    await redis?.[Symbol.asyncDispose]();
    await pg?.[Symbol.asyncDispose]();
  });

  /** A message frame as another node would publish it. */
  const published = (room: string, id: number, text: string) => {
    const frame = JSON.stringify({ type: "message", room, id, seq: id, user: { id: "u-other", name: "other" }, text, ts: Date.now() });
    return FanoutCodec.encode({ kind: "message", id, sentAt: Date.now() }, frame);
  };

  test("a message that arrives ahead of one it has not seen waits while the missing one is read from the store", async () => {
    const databaseUrl = await pg.createDatabase();
    await using chat = await serve({ databaseUrl, redisUrl: redis.url, nodeId: "fills" });
    const a = await Client.connect(chat.url, await newSession(chat.url));
    await a.join("gap");
    const first = await a.say("gap", "one");
    // another node stored id 2 and 3, and only the publish of 3 reaches this node
    await using sql = new SQL(databaseUrl);
    await sql`INSERT INTO messages (room, id, seq, user_id, name, text, ts) VALUES ('gap', 2, 2, 'u-other', 'other', 'two', ${Date.now()})`;
    await sql`UPDATE rooms SET last_id = 3 WHERE name = 'gap'`;
    const publisher = new RedisClient(redis.url);
    await publisher.publish("chat:room:gap", published("gap", 3, "three"));
    publisher.close();
    const [two, three] = await a.collect("message", 2);
    expect([two.id, two.text, three.id, three.text]).toEqual([2, "two", 3, "three"]);
    expect(await metric(chat.url, "chat_gaps_filled_total")).toBe(1);
    expect(first.id).toBe(1);
  }, 30_000);

  test("a gap the store cannot fill is skipped after a few reads, and later messages flow again", async () => {
    const logs = recorder();
    await using chat = await serve({ databaseUrl: await pg.createDatabase(), redisUrl: redis.url, nodeId: "skips", log: logs.log });
    const a = await Client.connect(chat.url, await newSession(chat.url));
    await a.join("hole");
    await a.say("hole", "one");
    // id 3 without an id 2 anywhere: a broken store; the node must not hold the room forever
    const publisher = new RedisClient(redis.url);
    await publisher.publish("chat:room:hole", published("hole", 3, "three"));
    publisher.close();
    expect(await a.next((f) => f.type === "message" && f.id === 3, 10_000)).toMatchObject({ text: "three" });
    expect(logs.events.find((e) => e.event === "gap_skipped")).toMatchObject({ room: "hole", from: 2, to: 2 });
    expect(await metric(chat.url, "chat_gaps_filled_total")).toBe(0);
    // a client joining now is served from the same state
    const b = await Client.connect(chat.url, await newSession(chat.url));
    expect((await b.join("hole")).history.messages.map((m) => m.id)).toEqual([1, 3]);
  }, 30_000);
});

describe("typing", () => {
  test("is passed on once per second per user and room, until the janitor forgets it", async () => {
    await using chat = await serve();
    const [a, b] = [await Client.connect(chat.url, await newSession(chat.url)), await Client.connect(chat.url, await newSession(chat.url))];
    for (const c of [a, b]) {
      await c.join("one");
      await c.join("two");
    }
    for (let i = 0; i < 5; i++) a.send({ type: "typing", room: "one" });
    a.send({ type: "typing", room: "two" });
    await a.say("one", "barrier");
    await b.next((f) => f.type === "message");
    expect(b.frames.filter((f) => f.type === "typing").map((f) => (f as { room: string }).room)).toEqual(["one", "two"]);
    // as if a minute had passed: the entries are gone, so the next typing frame passes at once
    chat.forgetStale(performance.now() + 61_000);
    a.send({ type: "typing", room: "one" });
    await a.say("one", "barrier 2");
    await b.next((f) => f.type === "message" && f.text === "barrier 2");
    expect(b.frames.filter((f) => f.type === "typing")).toHaveLength(3);
  });
});
