// Read state, the user's rooms and mentions: a read on one device reaches the user's other devices (on every node),
// GET /api/me/rooms lists the same rooms everywhere with unread and mention counts. Real servers and sockets.
import { Database } from "bun:sqlite";
import { describe, expect, test } from "bun:test";
import { mentionCandidates, type MyRoom } from "../server.ts";
import { Client, newSession, putName, serve, type Session, spawnCluster, until } from "./helpers.ts";
import { describeWithServices } from "./services.ts";

const json = { "content-type": "application/json" };
const cookieOf = (res: Response) => res.headers.get("set-cookie")!.split(";")[0];

/** A guest named `name` that sets a password: the account's session. */
async function account(baseUrl: string, name: string): Promise<Session> {
  const guest = await newSession(baseUrl);
  expect((await putName(baseUrl, guest.cookie, name)).status).toBe(200);
  const res = await fetch(`${baseUrl}/api/me/password`, { method: "POST", headers: { ...json, cookie: guest.cookie }, body: JSON.stringify({ password: "correct horse battery" }) });
  expect(res.status).toBe(200);
  return { ...guest, name, registered: true, cookie: cookieOf(res) };
}

/** The same account signed in again: another device. */
async function otherDevice(baseUrl: string, user: Session): Promise<Session> {
  const res = await fetch(`${baseUrl}/api/login`, { method: "POST", headers: json, body: JSON.stringify({ name: user.name, password: "correct horse battery" }) });
  expect(res.status).toBe(200);
  return { ...user, cookie: cookieOf(res) };
}

async function myRooms(baseUrl: string, user: Session): Promise<MyRoom[]> {
  const res = await fetch(`${baseUrl}/api/me/rooms`, { headers: { cookie: user.cookie } });
  expect(res.status).toBe(200);
  return (await res.json()) as MyRoom[];
}

/** Polls GET /api/me/rooms until `check` holds (the user's rooms are written after the join is answered). */
const roomsUntil = (baseUrl: string, user: Session, check: (rooms: MyRoom[]) => boolean) =>
  until(async () => {
    const rooms = await myRooms(baseUrl, user);
    return check(rooms) ? rooms : undefined;
  }, 5000, "the user's rooms");

const names = (rooms: MyRoom[]) => rooms.map((r) => r.name).sort();
const isRead = (f: { type: string }) => f.type === "read";

/** A frame round trip on a socket: everything the server sent it before is in. */
async function settle(client: Client) {
  client.send({ type: "read", room: "never-joined", seq: 0 });
  await client.next((f) => f.type === "error" && f.room === "never-joined");
}

describe("read state", () => {
  test("a read reaches the user's other sockets and devices, not the socket that sent it; only forward, never past the head", async () => {
    await using chat = await serve();
    const ann = await account(chat.url, "Ann");
    const bob = await newSession(chat.url);
    const tab = await Client.connect(chat.url, ann);
    const sameSession = await Client.connect(chat.url, ann);
    const phone = await Client.connect(chat.url, await otherDevice(chat.url, ann));
    const writer = await Client.connect(chat.url, bob);
    for (const client of [tab, sameSession, phone, writer]) await client.join("room");
    for (const text of ["one", "two", "three"]) await writer.say("room", text);

    tab.send({ type: "read", room: "room", seq: 2 });
    for (const other of [sameSession, phone]) expect(await other.next(isRead)).toEqual({ type: "read", room: "room", seq: 2 });
    await settle(tab);
    expect(tab.frames.filter(isRead)).toEqual([]);

    // an older position changes nothing and tells nobody; a seq past the head is the head
    phone.send({ type: "read", room: "room", seq: 1 });
    phone.send({ type: "read", room: "room", seq: 1000 });
    for (const other of [tab, sameSession]) expect(await other.next(isRead)).toEqual({ type: "read", room: "room", seq: 3 });
    await settle(phone);
    expect(sameSession.untaken().filter(isRead)).toEqual([]);
    expect((await myRooms(chat.url, ann)).find((r) => r.name === "room")).toMatchObject({ seq: 3, readSeq: 3, unread: 0 });

    // a room this socket has not joined, and a bad seq, are refused by name
    tab.send({ type: "read", room: "elsewhere", seq: 1 });
    expect(await tab.next((f) => f.type === "error" && f.room === "elsewhere")).toMatchObject({ code: "not_joined" });
    tab.send({ type: "read", room: "room", seq: -1 });
    expect((await tab.next((f) => f.type === "error" && f.code === "bad_request")).message).toStartWith("seq:");
    expect(writer.frames.filter(isRead)).toEqual([]); // nobody else hears of it
  });

  test("GET /api/me/rooms counts unread messages after the read position, not your own nor deleted ones, and those that mention you", async () => {
    await using chat = await serve();
    const ann = await account(chat.url, "Ann");
    const bob = await account(chat.url, "Bob");
    expect((await fetch(`${chat.url}/api/me/rooms`)).status).toBe(401);
    const cb = await Client.connect(chat.url, bob);
    await cb.join("lobby");
    expect(await roomsUntil(chat.url, bob, (rooms) => rooms.length === 1)).toEqual([{ name: "lobby", visibility: "public", seq: 0, readSeq: 0, unread: 0, mentions: 0 }]);

    const ca = await Client.connect(chat.url, ann);
    await ca.join("lobby");
    const sent = [];
    for (const text of ["@Bob hi", "plain", "@bob again"]) sent.push(await ca.say("lobby", text));
    await cb.say("lobby", "mine");
    // the lead's say path stores mentions; here they are written as it will: resolveMentions' ids as a JSON array
    const db = new Database(chat.config.databaseUrl.slice("sqlite://".length));
    db.run("PRAGMA busy_timeout = 5000");
    for (const m of sent) {
      const mentions = await chat.store.reading.resolveMentions(m.text);
      if (mentions.length) db.query("UPDATE messages SET mentions = ? WHERE room = 'lobby' AND id = ?").run(JSON.stringify(mentions), m.id);
    }
    db.query("UPDATE messages SET deleted = 1, text = '', mentions = NULL WHERE room = 'lobby' AND id = ?").run(sent[2].id); // a tombstone
    db.close();

    expect(await myRooms(chat.url, bob)).toEqual([{ name: "lobby", visibility: "public", seq: 4, readSeq: 0, unread: 2, mentions: 1 }]);
    // Ann joined at the head: her list starts read, and Bob's "mine" is her only unread message
    expect(await myRooms(chat.url, ann)).toEqual([{ name: "lobby", visibility: "public", seq: 4, readSeq: 0, unread: 1, mentions: 0 }]);
    cb.send({ type: "read", room: "lobby", seq: 1 });
    expect(await roomsUntil(chat.url, bob, (rooms) => rooms[0].readSeq === 1)).toEqual([{ name: "lobby", visibility: "public", seq: 4, readSeq: 1, unread: 1, mentions: 0 }]);
  });

  test("a leave frame takes the room off the list on every device; a socket that closes does not; a room you were removed from is not listed", async () => {
    await using chat = await serve();
    const ann = await account(chat.url, "Ann");
    const bob = await account(chat.url, "Bob");
    const laptop = await Client.connect(chat.url, ann);
    for (const room of ["alpha", "beta", "gamma"]) await laptop.join(room);
    const phone = await otherDevice(chat.url, ann);
    await roomsUntil(chat.url, phone, (rooms) => names(rooms).join() === "alpha,beta,gamma");
    await laptop.close();
    expect(names(await myRooms(chat.url, ann))).toEqual(["alpha", "beta", "gamma"]);

    const socket = await Client.connect(chat.url, phone);
    await socket.join("alpha");
    socket.send({ type: "leave", room: "alpha" });
    await roomsUntil(chat.url, ann, (rooms) => names(rooms).join() === "beta,gamma");
    expect(names(await myRooms(chat.url, phone))).toEqual(["beta", "gamma"]);

    // a private room: listed while a member, gone once removed
    const made = await fetch(`${chat.url}/api/rooms`, { method: "POST", headers: { ...json, cookie: ann.cookie }, body: JSON.stringify({ name: "club", visibility: "private" }) });
    expect(made.status).toBe(201);
    expect((await fetch(`${chat.url}/api/rooms/club/members/${bob.id}`, { method: "PUT", headers: { cookie: ann.cookie } })).status).toBe(204);
    const cb = await Client.connect(chat.url, bob);
    await cb.join("club");
    expect(await roomsUntil(chat.url, bob, (rooms) => rooms.length === 1)).toMatchObject([{ name: "club", visibility: "private" }]);
    expect((await fetch(`${chat.url}/api/rooms/club/members/${bob.id}`, { method: "DELETE", headers: { cookie: ann.cookie } })).status).toBe(204);
    expect(await myRooms(chat.url, bob)).toEqual([]);
  });
});

describe("the user's rooms", () => {
  test("a user's list keeps at most 1000 rooms: joining more drops the longest joined", async () => {
    await using chat = await serve();
    const ann = await newSession(chat.url);
    for (let i = 0; i <= 1000; i++) await chat.store.reading.join(ann.id, `r${i}`, 0);
    expect(await chat.store.reading.rooms(ann.id, false, 2000)).toHaveLength(1000);
  });
});

describe("mentions", () => {
  test("@name resolves to current users by name key, word-bounded, the longest name first, each once", async () => {
    await using chat = await serve();
    const bob = await account(chat.url, "Bob");
    const ann = await newSession(chat.url);
    expect((await putName(chat.url, ann.cookie, "Ann")).status).toBe(200);
    const annLee = await newSession(chat.url);
    expect((await putName(chat.url, annLee.cookie, "Ann Lee")).status).toBe(200);
    const resolve = (text: string) => chat.store.reading.resolveMentions(text);
    expect(await resolve("@Bob hi")).toEqual([bob.id]);
    expect(await resolve("hi @BOB, and @bob again")).toEqual([bob.id]);
    expect(await resolve("(@Bob)")).toEqual([bob.id]);
    expect(await resolve("@Ann Lee says hi to @Ann")).toEqual([annLee.id, ann.id]);
    expect(await resolve("@Ann Leeds")).toEqual([ann.id]); // "Ann Lee" is glued to "ds"
    for (const none of ["@Bobby", "mail bob@Bob.example", "@ Bob", "no mention", "@"]) expect({ none, ids: await resolve(none) }).toEqual({ none, ids: [] });
  });

  test("the `@`s looked up are capped, and a name's longest candidate is 32 characters", () => {
    expect(mentionCandidates(Array.from({ length: 30 }, (_, i) => `@u${i}`).join(" "))).toHaveLength(20);
    const [names] = mentionCandidates(`@${"x ".repeat(40)}`);
    expect(names[0]).toHaveLength(31); // 32 characters end in a space: the longest candidate ends before it
    expect(names.at(-1)).toBe("x");
    expect(mentionCandidates("@😀😀")).toEqual([["😀😀", "😀"]]); // never half a surrogate pair
  });
});

describeWithServices("read state in a cluster", (services) => {
  test("a read on one node reaches the user's sockets on another node, and the list on every node agrees", async () => {
    await using cluster = await spawnCluster(services, ["read-a", "read-b"], { RATE_LIMIT: "1000/1s" });
    const [a, b] = cluster.nodes;
    const ann = await account(a.url, "Ann");
    const bob = await newSession(a.url);
    const onA = await Client.connect(a.url, ann);
    const onB = await Client.connect(b.url, await otherDevice(b.url, ann));
    const writer = await Client.connect(b.url, bob);
    for (const client of [onA, onB, writer]) await client.join("room");
    for (const text of ["one", "two"]) await writer.say("room", text);
    await onA.next((f) => f.type === "message" && f.text === "two");

    onA.send({ type: "read", room: "room", seq: 2 });
    expect(await onB.next(isRead, 10_000)).toEqual({ type: "read", room: "room", seq: 2 });
    await settle(onA);
    expect(onA.frames.filter(isRead)).toEqual([]);
    for (const node of [a, b]) expect(await myRooms(node.url, ann)).toEqual([{ name: "room", visibility: "public", seq: 2, readSeq: 2, unread: 0, mentions: 0 }]);
    await writer.say("room", "three");
    await roomsUntil(b.url, ann, (rooms) => rooms[0]?.unread === 1);
  });
});
