// The room list, retention, MAX_ROOMS and renames, on a real server with a SQLite file.
import { describe, expect, test } from "bun:test";
import { openStore } from "../server.ts";
import { Client, newSession, putName, serve, until } from "./helpers.ts";
import { describeWithServices } from "./services.ts";

type Listed = { name: string; online: number; lastId: number; visibility?: string };
const roomsOf = async (url: string) => (await (await fetch(`${url}/api/rooms`)).json()) as Listed[];
const LOOSE = { rateLimit: "10000/1s", joinLimit: "10000/1s", maxRoomsPerConnection: 500 };
const OLD = Date.now() - 3 * 24 * 3600_000;
const someone = { id: "u-old", name: "old-timer" };

/** Joins many rooms at once and waits for each presence. */
async function joinAll(client: Client, rooms: string[]) {
  for (const room of rooms) client.send({ type: "join", room });
  await client.collect("presence", rooms.length, 20_000);
}

describe("rooms", () => {
  test("the room list never exceeds 100 entries: with 300 rooms in use, the busiest come first", async () => {
    await using chat = await serve(LOOSE);
    const names = Array.from({ length: 300 }, (_, i) => `r${i}`);
    const a = await Client.connect(chat.url, await newSession(chat.url));
    await joinAll(a, names);
    for (const room of names) a.send({ type: "say", room, text: "hi", ref: room });
    await a.collect("message", 300, 20_000);
    for (let i = 0; i < 3; i++) await a.say("r7", `more ${i}`);
    const b = await Client.connect(chat.url, await newSession(chat.url));
    await b.join("r250");

    const list = await roomsOf(chat.url);
    expect(list).toHaveLength(100);
    expect(list[0]).toEqual({ name: "r250", online: 2, lastId: 1, visibility: "public" });
    expect(list[1]).toEqual({ name: "r7", online: 1, lastId: 4, visibility: "public" });
    const order = list.map((r) => [-r.online, -r.lastId]);
    expect(order).toEqual(order.toSorted(([o1, l1], [o2, l2]) => o1 - o2 || l1 - l2));

    // nobody online: the rooms with the most messages, still at most 100
    await a.close();
    await b.close();
    const idle = await until(async () => {
      const rooms = await roomsOf(chat.url);
      return rooms.every((r) => r.online === 0) ? rooms : undefined;
    });
    expect(idle).toHaveLength(100);
    expect(idle![0]).toEqual({ name: "r7", online: 0, lastId: 4, visibility: "public" });
  });

  test("a restarted server lists the rooms with the most messages from the stored last ids", async () => {
    await using first = await serve();
    await first.store.append([1, 2, 3].map((n) => ({ room: "busy", user: someone, text: `m${n}`, ts: Date.now() })));
    await first.store.append([{ room: "quiet", user: someone, text: "m", ts: Date.now() }]);
    const url = first.config.databaseUrl;
    await first.stop();
    await using second = await serve({ databaseUrl: url });
    expect(await roomsOf(second.url)).toEqual([
      { name: "busy", online: 0, lastId: 3, visibility: "public" },
      { name: "quiet", online: 0, lastId: 1, visibility: "public" },
    ]);
  });

  test("RETENTION_DAYS deletes old messages in batches; a room emptied with nobody in it is dropped, and ids never restart", async () => {
    await using chat = await serve({ retentionDays: 1 });
    const old = (room: string, n: number) => Array.from({ length: n }, (_, i) => ({ room, user: someone, text: `old ${i}`, ts: OLD }));
    await chat.store.append(old("gone", 2_500)); // more than one batch
    await chat.store.append([...old("mixed", 2), { room: "mixed", user: someone, text: "new", ts: Date.now() }]);
    await chat.store.append(old("kept", 5));
    const session = await newSession(chat.url);
    const keeper = await Client.connect(chat.url, session);
    const { history } = await keeper.join("kept", 5);
    expect(history.messages).toEqual([]);

    await chat.prune();
    expect(await chat.store.tail("gone", 10)).toEqual([]);
    expect((await chat.store.tail("mixed", 10)).map((m) => m.text)).toEqual(["new"]);
    expect(await chat.store.tail("kept", 10)).toEqual([]);
    expect(await chat.store.hasRoom("gone")).toBe(false);
    expect(await chat.store.hasRoom("kept")).toBe(true); // someone is in it
    expect((await roomsOf(chat.url)).map((r) => r.name).sort()).toEqual(["kept", "mixed"]);

    // a client that joined with since before retention gets the next id, not a restarted one
    expect((await keeper.say("kept", "still here")).id).toBe(6);
    // a dropped room made again continues past every dropped id
    const back = await keeper.join("gone", 2_500);
    expect(back.history.messages).toEqual([]);
    expect((await keeper.say("gone", "again")).id).toBeGreaterThan(2_500);
  });

  test("MAX_ROOMS refuses a new room when every stored one has messages, drops empty ones first, and keeps existing rooms working", async () => {
    await using chat = await serve({ maxRooms: 3, retentionDays: 1 });
    for (const room of ["a", "b"]) await chat.store.append([{ room, user: someone, text: "x", ts: Date.now() }]);
    await chat.store.append([{ room: "c", user: someone, text: "x", ts: OLD }]);
    const client = await Client.connect(chat.url, await newSession(chat.url));
    client.send({ type: "join", room: "d" });
    expect(await client.next((f) => f.type === "error")).toMatchObject({ code: "limit_exceeded", room: "d" });
    await client.join("a");
    expect((await client.say("a", "existing rooms work")).id).toBe(2);

    // c loses its messages while someone is in it: kept until they leave, then the next new room takes its place
    await client.join("c");
    await chat.prune();
    expect(await chat.store.hasRoom("c")).toBe(true);
    client.send({ type: "leave", room: "c" });
    await until(async () => (await roomsOf(chat.url)).find((r) => r.name === "c")?.online === 0);
    await client.join("d");
    expect(await chat.store.hasRoom("c")).toBe(false);
    await client.say("d", "made");
    expect(await chat.store.countRooms()).toBe(3);
  });

  test("a rename reaches exactly the sockets sharing a room with the user, and the user's own, once each", async () => {
    await using chat = await serve(LOOSE);
    const names = Array.from({ length: 50 }, (_, i) => `s${i}`);
    const others = await Promise.all(Array.from({ length: 5 }, async () => Client.connect(chat.url, await newSession(chat.url))));
    for (const [i, other] of others.entries()) await joinAll(other, names.slice(i * 10, i * 10 + 10));
    const alice = await newSession(chat.url);
    const tabs = [await Client.connect(chat.url, alice), await Client.connect(chat.url, alice)];
    await joinAll(tabs[0], ["s0", "s1", "s25"]); // rooms of others[0] (twice) and others[2]
    await joinAll(tabs[1], []);

    expect((await putName(chat.url, alice.cookie, "Alice")).status).toBe(200);
    // frames arrive in order: once a later round trip is back, any copy of renamed would be here too
    const everyone = [...others, ...tabs];
    for (const client of everyone) await client.join("after");
    const heard = everyone.map((c) => c.frames.filter((f) => f.type === "renamed").length);
    expect(heard).toEqual([1, 0, 1, 0, 0, 1, 1]);
  });
});

describeWithServices("rooms, Postgres", (services) => {
  test("expire, dropRoom and the id floor work on Postgres too", async () => {
    const store = await openStore(await services.pg.createDatabase(), { retention: true });
    try {
      await store.append(Array.from({ length: 3 }, (_, i) => ({ room: "pg-old", user: someone, text: `${i}`, ts: OLD })));
      await store.append([{ room: "pg-new", user: someone, text: "new", ts: Date.now() }]);
      expect(await store.countRooms()).toBe(2);
      expect(await store.expire(Date.now() - 24 * 3600_000, 2)).toEqual({ deleted: 2, emptied: [] });
      expect(await store.expire(Date.now() - 24 * 3600_000, 2)).toEqual({ deleted: 1, emptied: ["pg-old"] });
      expect(await store.dropRoom("pg-new")).toBe(false); // it has messages
      expect(await store.dropRoom("pg-old")).toBe(true);
      expect([await store.countRooms(), await store.hasRoom("pg-old"), await store.lastId("pg-old")]).toEqual([1, false, 3]);
      expect(await store.append([{ room: "pg-old", user: someone, text: "again", ts: Date.now() }])).toEqual([4]);
      expect(await store.rooms(100)).toEqual([{ name: "pg-old", lastId: 4 }, { name: "pg-new", lastId: 1 }]);
    } finally {
      await store.close();
    }
  });
});
