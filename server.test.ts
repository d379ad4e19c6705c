// The core service, end to end: real servers on port 0, real sessions, real WebSocket clients.
import { describe, expect, test } from "bun:test";
import { Database } from "bun:sqlite";
import { existsSync, mkdirSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { ClientMessage, parseClientMessage, parseConfig, readSettings } from "./server.ts";
import { BUN, Client, cookieAnswers, diffWith, newSession, putName, ROOT, serve, type Session, spawnServer, tempDir, until, UPGRADE, upgradeStatus, usersInRoom } from "./test/helpers.ts";
import { rowsCheckpointed } from "./test/probes.ts";

describe("chat", () => {
  test("a message reaches every member, sender included, with the author's name", async () => {
    await using chat = await serve();
    const { sessions: [alice], clients: [a, b] } = await usersInRoom(chat.url, 2, "general");
    const before = Date.now();
    const sent = await a.say("general", "hello bob", "r1-hello");
    const after = Date.now();
    const got = await b.next((f) => f.type === "message");
    expect(sent).toMatchObject({ room: "general", id: 1, text: "hello bob", ref: "r1-hello", user: { id: alice.id, name: alice.name } });
    expect(got).toEqual(sent);
    const reply = await b.say("general", "hi alice");
    expect((await a.next((f) => f.type === "message")) as unknown).toEqual(reply);
    expect(reply.id).toBe(sent.id + 1);
    // stamped by the server between the send and the echo
    expect(sent.ts).toBeGreaterThanOrEqual(before);
    expect(sent.ts).toBeLessThanOrEqual(after);
  });

  test("default names are random words and digits, unique, and say nothing of how many came before; the public id is not the cookie", async () => {
    await using chat = await serve();
    const sessions = await Promise.all(Array.from({ length: 20 }, () => newSession(chat.url)));
    expect(new Set(sessions.map((s) => s.name)).size).toBe(20);
    for (const s of sessions) {
      expect(s.name).toMatch(/^[a-z]+-[a-z]+-\d{4}$/);
      expect(s.cookie).not.toContain(s.id);
    }
  });

  test("the page sets no cookie; the session cookie comes from /api/me, signed, HttpOnly, SameSite=Lax, Path=/, holding only a random id", async () => {
    await using chat = await serve();
    const page = await fetch(`${chat.url}/`);
    expect(page.headers.get("content-type")).toBe("text/html; charset=utf-8");
    expect(page.headers.get("set-cookie")).toBeNull();
    expect(await chat.store.countSessions()).toBe(0);
    const res = await fetch(`${chat.url}/api/me`);
    const cookie = res.headers.get("set-cookie")!;
    expect(cookie).toMatch(/^sid=[A-Za-z0-9_-]{32}\.[^;]+;/);
    expect(cookie).toContain("HttpOnly");
    expect(cookie).toContain("SameSite=Lax");
    expect(cookie).toContain("Path=/");
    expect(cookie).not.toContain("Secure");
    expect(await chat.store.countSessions()).toBe(1);
    const again = await fetch(`${chat.url}/api/me`, { headers: { cookie: cookie.split(";")[0] } });
    expect(again.headers.get("set-cookie")).toBeNull();
    expect(await chat.store.countSessions()).toBe(1);
    // over https (here: said by a proxy) the cookie is __Host-sid, Secure
    const secure = await fetch(`${chat.url}/api/me`, { headers: { "x-forwarded-proto": "https" } });
    expect(secure.headers.get("set-cookie")).toMatch(/^__Host-sid=[^;]+;.*Secure/);
  });

  test("a rename reaches every room the user is in, and the name sticks", async () => {
    await using chat = await serve();
    const { sessions: [alice, bob], clients: [a, b] } = await usersInRoom(chat.url, 2, "one");
    await a.join("two");
    await b.join("two");
    const { clients: [c] } = await usersInRoom(chat.url, 1, "three");
    const res = await putName(chat.url, alice.cookie, "  Alice  ");
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ id: alice.id, name: "Alice", registered: false, admin: false });
    const renamed = await b.next((f) => f.type === "renamed");
    expect(renamed).toEqual({ type: "renamed", user: { id: alice.id, name: "Alice" }, previous: alice.name });
    await a.next((f) => f.type === "renamed");
    // bob shares two rooms with alice but hears of it once; carol shares none
    await b.say("one", "after rename");
    expect(b.untaken().filter((f) => f.type === "renamed")).toEqual([]);
    expect(c.frames.some((f) => f.type === "renamed")).toBe(false);
    expect((await a.say("two", "it's me")).user.name).toBe("Alice");
    const me = await fetch(`${chat.url}/api/me`, { headers: { cookie: alice.cookie } });
    expect(await me.json()).toEqual({ id: alice.id, name: "Alice", registered: false, admin: false });

    // the nick frame does the same
    b.send({ type: "nick", name: "Bob" });
    expect(await a.next((f) => f.type === "renamed")).toMatchObject({ user: { id: bob.id, name: "Bob" }, previous: bob.name });
  });

  test("a bad or taken name is refused with a clear error", async () => {
    await using chat = await serve();
    const [alice, bob] = [await newSession(chat.url), await newSession(chat.url)];
    const bad: [string, RegExp][] = [
      ["{", /JSON/],
      ["{}", /name/],
      [JSON.stringify({ name: "" }), /name is empty/],
      [JSON.stringify({ name: "   " }), /name is empty/],
      [JSON.stringify({ name: "x".repeat(33) }), /longer than 32/],
      [JSON.stringify({ name: "a\u0007b" }), /control characters/],
      [JSON.stringify({ name: "ok", extra: 1 }), /extra/],
    ];
    for (const [body, message] of bad) {
      const res = await fetch(`${chat.url}/api/me`, { method: "PUT", headers: { cookie: alice.cookie, "content-type": "application/json" }, body });
      expect({ body, status: res.status }).toEqual({ body, status: 400 });
      const json = (await res.json()) as { error: { code: string; message: string } };
      expect(json.error.code).toBe("bad_request");
      expect(json.error.message).toMatch(message);
    }
    expect((await putName(chat.url, alice.cookie, "Zoë")).status).toBe(200);
    const taken = await putName(chat.url, bob.cookie, "zoë");
    expect(taken.status).toBe(409);
    expect(((await taken.json()) as any).error.code).toBe("name_taken");
    const b = await Client.connect(chat.url, bob);
    b.send({ type: "nick", name: "ZOË" });
    expect(await b.next((f) => f.type === "error")).toMatchObject({ code: "name_taken" });
  });

  test("presence counts a user with two tabs once; presence_diff names the user on the first and last tab only", async () => {
    await using chat = await serve();
    const [alice, bob] = [await newSession(chat.url), await newSession(chat.url)];
    const b = await Client.connect(chat.url, bob);
    await b.join("room");
    await b.next(diffWith("joins", bob.id)); // bob's arrival is published: a joiner's list has him
    const tab1 = await Client.connect(chat.url, alice);
    const { presence } = await tab1.join("room");
    expect(presence.users).toEqual([{ id: bob.id, name: bob.name }, { id: alice.id, name: alice.name }]);
    expect(await b.next(diffWith("joins", alice.id))).toEqual({ type: "presence_diff", room: "room", joins: [{ id: alice.id, name: alice.name }], leaves: [] });
    const tab2 = await Client.connect(chat.url, alice);
    const second = await tab2.join("room");
    expect(second.presence.users).toHaveLength(2);
    await tab1.close();
    await tab2.close();
    // alice's second tab arriving and first tab going changed nothing: the next diff bob hears is her last tab leaving
    expect(await b.next((f) => f.type === "presence_diff")).toEqual({ type: "presence_diff", room: "room", joins: [], leaves: [{ id: alice.id, name: alice.name }] });
    const rooms = (await (await fetch(`${chat.url}/api/rooms`)).json()) as { name: string; online: number }[];
    expect(rooms.find((r) => r.name === "room")?.online).toBe(1);
  });

  test("a leave frame ends membership: no more messages, say answers not_joined", async () => {
    await using chat = await serve();
    const { sessions: [, bob], clients: [a, b] } = await usersInRoom(chat.url, 2, "room");
    await a.next(diffWith("joins", bob.id)); // else his arrival and departure fall in one interval, and a hears of neither
    b.send({ type: "leave", room: "room" });
    await a.next(diffWith("leaves", bob.id));
    await a.say("room", "bob is gone");
    b.send({ type: "say", room: "room", text: "can I?", ref: "x" });
    expect(await b.next((f) => f.type === "error")).toMatchObject({ code: "not_joined", ref: "x" });
    expect(b.frames.some((f) => f.type === "message")).toBe(false);
  });

  test("typing reaches the others in the room, not the typist, and is never stored", async () => {
    await using chat = await serve();
    const { sessions: [alice], clients: [a, b] } = await usersInRoom(chat.url, 2, "room");
    a.send({ type: "typing", room: "room" });
    expect(await b.next((f) => f.type === "typing")).toEqual({ type: "typing", room: "room", user: { id: alice.id, name: alice.name } });
    await a.say("room", "done typing");
    expect(a.frames.some((f) => f.type === "typing")).toBe(false);
    const c = await Client.connect(chat.url, await newSession(chat.url));
    const { history } = await c.join("room");
    expect(history.messages.map((m) => m.text)).toEqual(["done typing"]);
  });

  test("join sends the last HISTORY_ON_JOIN messages, and complete says whether older ones exist", async () => {
    await using chat = await serve({ historyOnJoin: 3 });
    const a = await Client.connect(chat.url, await newSession(chat.url));
    const first = await a.join("room");
    expect(first.history).toEqual({ type: "history", room: "room", seq: 0, messages: [], updates: [], complete: true, more: false });
    for (let i = 1; i <= 5; i++) await a.say("room", `m${i}`);
    const b = await Client.connect(chat.url, await newSession(chat.url));
    const { history } = await b.join("room");
    expect(history.messages.map((m) => m.text)).toEqual(["m3", "m4", "m5"]);
    expect(history.complete).toBe(false);
    expect(history.messages.map((m) => m.id)).toEqual([3, 4, 5]);
    // scrollback fills in the older ones
    const older = await fetch(`${chat.url}/api/rooms/room/messages?before=3&limit=10`, { headers: { cookie: (await newSession(chat.url)).cookie } });
    expect(((await older.json()) as any).messages.map((m: any) => m.text)).toEqual(["m1", "m2"]);
  });

  test("a client that rejoins with since gets exactly what it missed", async () => {
    await using chat = await serve({ recoveryLimit: 4 });
    const [alice, bob] = [await newSession(chat.url), await newSession(chat.url)];
    const a = await Client.connect(chat.url, alice);
    await a.join("room");
    const seen = await a.say("room", "before");
    await a.close();
    const b = await Client.connect(chat.url, bob);
    await b.join("room");
    for (const text of ["x", "y", "z"]) await b.say("room", text);
    const back = await Client.connect(chat.url, alice);
    const { history } = await back.join("room", seen.id);
    expect(history.complete).toBe(true);
    expect(history.messages.map((m) => [m.id, m.text])).toEqual([[2, "x"], [3, "y"], [4, "z"]]);
    // live messages continue right after, with no duplicate
    await b.say("room", "live");
    const live = await back.next((f) => f.type === "message");
    expect(live).toMatchObject({ id: 5, text: "live" });

    // nothing missed: an empty, complete history
    const again = await Client.connect(chat.url, alice);
    expect((await again.join("room", 5)).history).toEqual({ type: "history", room: "room", seq: 5, messages: [], updates: [], complete: true, more: false });

    // more missed than RECOVERY_LIMIT: the newest RECOVERY_LIMIT and complete: false
    for (let i = 0; i < 6; i++) await b.say("room", `more${i}`);
    const late = await Client.connect(chat.url, alice);
    const recovered = (await late.join("room", 5)).history;
    expect(recovered.complete).toBe(false);
    expect(recovered.messages.map((m) => m.id)).toEqual([8, 9, 10, 11]);
  });

  test("a join of a room already joined is answered with presence only: no history, no second membership, and it costs a join", async () => {
    await using chat = await serve({ joinLimit: "2/60s" });
    const { sessions: [session], clients: [a] } = await usersInRoom(chat.url, 1, "room");
    await a.say("room", "one");
    a.send({ type: "join", room: "room", since: 0 });
    expect(await a.next((f) => f.type === "presence")).toEqual({ type: "presence", room: "room", users: [{ id: session.id, name: session.name }] });
    a.send({ type: "join", room: "room" });
    expect(await a.next((f) => f.type === "error")).toMatchObject({ code: "rate_limited", room: "room" });
    await a.say("room", "two");
    expect(a.frames.filter((f) => f.type === "history")).toHaveLength(1);
    expect(a.untaken().filter((f) => f.type === "message")).toEqual([]);
  });

  test("history and sessions survive a restart on the same database file", async () => {
    using tmp = tempDir();
    const databaseUrl = `sqlite://${tmp.dir}/chat.db`;
    let alice, sent;
    {
      await using chat = await serve({ databaseUrl });
      const { sessions, clients: [a] } = await usersInRoom(chat.url, 1, "room");
      alice = sessions[0];
      expect((await putName(chat.url, alice.cookie, "Alice")).status).toBe(200);
      sent = await a.say("room", "remember me");
    }
    expect(existsSync(`${tmp.dir}/chat.db`)).toBe(true);
    await using chat = await serve({ databaseUrl });
    const me = await fetch(`${chat.url}/api/me`, { headers: { cookie: alice.cookie } });
    expect(me.headers.get("set-cookie")).toBeNull();
    expect(await me.json()).toEqual({ id: alice.id, name: "Alice", registered: false, admin: false });
    const a = await Client.connect(chat.url, alice);
    const { history } = await a.join("room");
    expect(history.messages).toEqual([{ ...sent, user: { id: alice.id, name: "Alice" } }]);
    expect((await a.say("room", "next")).id).toBe(sent.id + 1);
  });

  test("a say resent with a ref its user already used is stored once: the resender gets the stored message, on another socket and after a restart", async () => {
    using tmp = tempDir();
    const databaseUrl = `sqlite://${tmp.dir}/chat.db`;
    let alice: Session, bob: Session, first: Awaited<ReturnType<Client["say"]>>;
    {
      await using chat = await serve({ databaseUrl });
      const { sessions, clients: [a, b] } = await usersInRoom(chat.url, 2, "room");
      [alice, bob] = sessions;
      first = await a.say("room", "sent once", "draft-1");
      await b.next((f) => f.type === "message" && f.id === first.id);
      // the echo was lost with the socket: the page resends on a new one
      const again = await Client.connect(chat.url, alice);
      await again.join("room");
      expect(await again.say("room", "sent once", "draft-1")).toEqual(first);
      // another user's ref is their own
      expect((await b.say("room", "mine", "draft-1")).id).toBe(first.id + 1);
      expect(b.untaken().filter((f) => f.type === "message" && f.id === first.id)).toEqual([]);
    }
    await using chat = await serve({ databaseUrl });
    const a = await Client.connect(chat.url, alice);
    await a.join("room");
    expect(await a.say("room", "sent once", "draft-1")).toEqual(first);
    expect((await a.say("room", "new", "draft-2")).id).toBe(first.id + 2);
    const b = await Client.connect(chat.url, bob);
    expect((await b.join("room")).history.messages.map((m) => m.text)).toEqual(["sent once", "mine", "new"]);
  });

  test("a thread of its own at nice 19 copies the WAL into the database file while the server runs", async () => {
    using tmp = tempDir();
    const file = `${tmp.dir}/chat.db`;
    await using chat = await spawnServer({ DATABASE_URL: `sqlite://${file}`, RATE_LIMIT: "100000/1s" });
    const { clients: [a] } = await usersInRoom(chat.url, 1, "room");
    for (let i = 0; i < 30; i++) await a.say("room", `m${i}`);
    // the file alone, without its -wal, holds only what a checkpoint copied (no connection autocheckpoints)
    const copied = () => rowsCheckpointed(file, "messages") === 30;
    await until(copied, 5000, "a checkpoint");
    const nice = (tid: string) => {
      const stat = readFileSync(`/proc/${chat.proc.pid}/task/${tid}/stat`, "utf8");
      return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]);
    };
    const tasks = readdirSync(`/proc/${chat.proc.pid}/task`);
    expect(nice(String(chat.proc.pid))).toBe(0);
    expect(tasks.filter((tid) => nice(tid) === 19)).toHaveLength(1);
  }, 10_000);

  test("a locked database holds messages back until they are stored, then delivers every one in order", async () => {
    using tmp = tempDir();
    const file = `${tmp.dir}/chat.db`;
    // a server process of its own, so frames reach it at any moment of its event loop
    await using chat = await spawnServer({ DATABASE_URL: `sqlite://${file}`, RATE_LIMIT: "100000/1s" });
    const { clients } = await usersInRoom(chat.url, 4, "room");
    const [a] = clients;
    const first = await a.say("room", "first");
    // another connection holding the write lock: the server's commits fail with SQLITE_BUSY and retry
    using locker = new Database(file);
    locker.run("PRAGMA busy_timeout = 1000");
    locker.run("BEGIN IMMEDIATE");
    const sent: string[][] = clients.map(() => []);
    const send = () =>
      clients.forEach((c, i) => {
        const ref = `c${i}-${sent[i].length}`;
        sent[i].push(ref);
        c.send({ type: "say", room: "room", text: ref, ref });
      });
    for (let i = 0; i < 5; i++) send();
    a.send({ type: "say", room: "elsewhere", text: "x", ref: "barrier" });
    await a.next((f) => f.type === "error" && f.ref === "barrier"); // the server has read a's frames before it
    expect(a.untaken().filter((f) => f.type === "message")).toEqual([]); // nothing unstored is broadcast
    // keep sending while the lock comes and goes, so retried commits finish while more frames arrive
    let ticks = 0;
    const ticker = setInterval(() => {
      send();
      if (++ticks % 10 === 0) locker.run(locker.inTransaction ? "COMMIT" : "BEGIN IMMEDIATE");
      if (ticks === 300) stop();
    }, 1);
    const stop = () => {
      clearInterval(ticker);
      if (locker.inTransaction) locker.run("COMMIT");
    };
    const total = 4 * 305;
    const got = await a.collect("message", total, 20_000).finally(stop);
    for (let i = 0; i < 4; i++) expect(got.map((m) => m.ref).filter((r) => r!.startsWith(`c${i}-`))).toEqual(sent[i]);
    expect(got.map((m) => m.id)).toEqual(got.map((_, i) => first.id + 1 + i));
    expect((await a.say("room", "after")).id).toBe(first.id + total + 1);
  });

  test("a commit that gives up answers unavailable, and the ids it had taken are handed out again", async () => {
    using tmp = tempDir();
    const file = `${tmp.dir}/chat.db`;
    await using chat = await serve({ databaseUrl: `sqlite://${file}`, rateLimit: "100000/1s" });
    const { clients: [a] } = await usersInRoom(chat.url, 1, "one");
    await a.join("two");
    const firstOne = await a.say("one", "first");
    const firstTwo = await a.say("two", "first");
    // held past the writer's ~2 s of retries: the batch (both rooms, three messages) fails as a whole
    using locker = new Database(file);
    locker.run("BEGIN IMMEDIATE");
    for (const [room, ref] of [["one", "a"], ["two", "b"], ["one", "c"]]) a.send({ type: "say", room, text: ref, ref });
    const errors = [await a.next((f) => f.type === "error", 10_000), await a.next((f) => f.type === "error"), await a.next((f) => f.type === "error")];
    locker.run("ROLLBACK");
    expect(errors.map((e) => [e.code, e.ref])).toEqual([["unavailable", "a"], ["unavailable", "b"], ["unavailable", "c"]]);
    expect(a.untaken().filter((f) => f.type === "message")).toEqual([]);
    expect((await a.say("one", "again")).id).toBe(firstOne.id + 1);
    expect((await a.say("two", "again")).id).toBe(firstTwo.id + 1);
  }, 20_000);

  test("every kind of bad frame gets a bad_request error, the socket stays usable and nobody else hears it", async () => {
    await using chat = await serve();
    const { clients: [a, b] } = await usersInRoom(chat.url, 2, "room");
    const bad: [string | Uint8Array | object, RegExp][] = [
      ["not json", /invalid JSON/],
      ["", /invalid JSON/],
      ["[]", /JSON object/],
      ["null", /JSON object/],
      ["42", /JSON object/],
      [{ type: "shout", room: "room" }, /type/],
      [{ room: "room", text: "no type" }, /type/],
      [{ type: "say", room: "room" }, /text/],
      [{ type: "say", room: "Room!", text: "x" }, /room/],
      [{ type: "say", room: "room", text: 5 }, /text/],
      [{ type: "say", room: "room", text: "" }, /text/],
      [{ type: "say", room: "room", text: "a\u0000b" }, /text/],
      [{ type: "say", room: "room", text: "x", extra: true }, /extra/],
      [{ type: "say", room: "room", text: "x", ref: "r".repeat(65) }, /ref/],
      [{ type: "join", room: "room", since: -1 }, /since/],
      [{ type: "join", room: "room", since: 1.5 }, /since/],
      [{ type: "nick", name: "" }, /name/],
      [new Uint8Array([1, 2, 3]), /binary/],
      ['{"type":"say","room":"room","text":"\\ud800"}', /surrogate/],
      ['{"__proto__":{"type":"say"},"type":"say","room":"room","text":"x"}', /__proto__/],
    ];
    for (const [frame, message] of bad) {
      a.send(frame);
      const error = await a.next((f) => f.type === "error");
      expect(error.code).toBe("bad_request");
      expect(error.message).toMatch(message);
    }
    // a schema error echoes a usable ref
    a.send({ type: "say", room: "room", text: "", ref: "mine" });
    expect(await a.next((f) => f.type === "error")).toMatchObject({ code: "bad_request", ref: "mine" });
    // too long for MAX_TEXT
    a.send({ type: "say", room: "room", text: "x".repeat(2001), ref: "long" });
    expect(await a.next((f) => f.type === "error")).toMatchObject({ code: "bad_request", ref: "long" });
    const ok = await a.say("room", "still works");
    expect(ok.id).toBe(1);
    await b.next((f) => f.type === "message");
    expect(b.frames.filter((f) => f.type === "error" || f.type === "message")).toEqual([ok]);
    const metrics = await (await fetch(`${chat.url}/metrics`)).text();
    expect(metrics).toContain(`chat_frames_rejected_total ${bad.length + 2}`);
  });

  test("the hand-written check for say frames accepts exactly what the zod schema accepts", () => {
    const rooms = [undefined, "room", "a", "a".repeat(32), "a".repeat(33), "", "Room", "-x", "x y", 5, null];
    const texts = [undefined, "hi", "", " ", "a\u0000b", "tab\tnew\nline", "\u007f", "\ud800", "😀", "\u202eRTL", "x".repeat(2001), 7, ["x"],
      "cr\r\n", "a\u0085b", "a\u009bb", "x\u2028y", "\u200b\u200d\u2060", "\u3164", "👩\u200d👩\u200d👧", "\ufe0f\u{e0041}"];
    const refs = [undefined, "r1", "", "r".repeat(64), "r".repeat(65), "\u0001", "\udc00", 1, null, "r\r", "\u0085", "\u2029", "\u200b"];
    const extras = [{}, { extra: 1 }, JSON.parse('{"__proto__":{"x":1}}'), { constructor: "x" }, { type: "Say" }];
    let accepted = 0;
    for (const room of rooms) for (const text of texts) for (const ref of refs) for (const extra of extras) {
      const raw = JSON.stringify({ type: "say", room, text, ref, ...extra });
      const fast = parseClientMessage(raw);
      const slow = ClientMessage.safeParse(JSON.parse(raw));
      expect(fast.ok).toBe(slow.success);
      if (fast.ok && slow.success) {
        expect(fast.value).toEqual(slow.data);
        expect(Object.keys(fast.value)).toEqual(Object.keys(slow.data));
        accepted++;
      }
    }
    expect(accepted).toBe(90); // of 14,300 frames
  });

  test("a frame over 64 KiB closes the socket with 1009", async () => {
    await using chat = await serve();
    const a = await Client.connect(chat.url, await newSession(chat.url));
    a.send({ type: "say", room: "room", text: "x".repeat(64 * 1024) });
    expect((await a.closed).code).toBe(1009);
  });

  test("the rate limit answers rate_limited with retryAfterMs and stores nothing extra", async () => {
    await using chat = await serve({ rateLimit: "3/60s" });
    const { clients: [a] } = await usersInRoom(chat.url, 1, "room");
    for (let i = 0; i < 3; i++) await a.say("room", `ok ${i}`);
    a.send({ type: "say", room: "room", text: "too many", ref: "r4" });
    const error = await a.next((f) => f.type === "error");
    expect(error).toMatchObject({ code: "rate_limited", ref: "r4" });
    expect(error.retryAfterMs).toBeGreaterThan(10_000);
    expect(error.retryAfterMs).toBeLessThanOrEqual(20_000);
    const b = await Client.connect(chat.url, await newSession(chat.url));
    const { history } = await b.join("room");
    expect(history.messages.map((m) => m.text)).toEqual(["ok 0", "ok 1", "ok 2"]);
    expect(await (await fetch(`${chat.url}/metrics`)).text()).toContain('chat_rate_limited_total{reason="say"} 1');
  });

  test("by default a user may say 20 messages per 10 s", async () => {
    await using chat = await serve();
    const { clients: [a] } = await usersInRoom(chat.url, 1, "room");
    for (let i = 0; i < 21; i++) a.send({ type: "say", room: "room", text: `m${i}`, ref: String(i) });
    expect(await a.next((f) => f.type === "error")).toMatchObject({ code: "rate_limited", ref: "20" });
    expect((await a.collect("message", 20)).map((m) => m.ref)).toEqual(Array.from({ length: 20 }, (_, i) => String(i)));
  });

  test("the upgrade answers 426 to plain GET, 401 without a session, 403 to a foreign origin", async () => {
    await using chat = await serve();
    const session = await newSession(chat.url);
    expect((await fetch(`${chat.url}/chat`, { headers: { cookie: session.cookie } })).status).toBe(426);
    expect((await fetch(`${chat.url}/chat`, { headers: UPGRADE })).status).toBe(401);
    const foreign = await fetch(`${chat.url}/chat`, { headers: { ...UPGRADE, cookie: session.cookie, origin: "https://evil.example" } });
    expect(foreign.status).toBe(403);
    // the same over a complete WebSocket handshake
    expect(await upgradeStatus(chat.url, { cookie: session.cookie, origin: "https://evil.example" })).toBe(403);
    // same host is fine, as is no Origin at all (non-browser clients)
    const host = new URL(chat.url).host;
    await (await Client.connect(chat.url, session, { origin: `http://${host}` })).close();
    await (await Client.connect(chat.url, session)).close();
  });

  test("ALLOWED_ORIGINS replaces the same-host rule", async () => {
    await using chat = await serve({ allowedOrigins: "https://chat.example.com, https://other.example" });
    const session = await newSession(chat.url);
    await (await Client.connect(chat.url, session, { origin: "https://chat.example.com" })).close();
    expect(await upgradeStatus(chat.url, { cookie: session.cookie, origin: `http://${new URL(chat.url).host}` })).toBe(403);
  });

  test("a tampered, forged or other-secret cookie is not a session", async () => {
    await using chat = await serve();
    await using other = await serve();
    const session = await newSession(chat.url);
    const [value, signature] = session.cookie.slice(4).split(".");
    const flip = (s: string) => s.slice(0, -1) + (s.at(-1) === "A" ? "B" : "A");
    const fakes = [
      `sid=${flip(value)}.${signature}`,
      `sid=${value}.${flip(signature)}`,
      `sid=${value}`,
      `sid=${value}.`,
      `sid=${value.slice(0, 10)}.${signature}`,
      (await newSession(other.url)).cookie, // signed with another server's secret
    ];
    // each one is refused on the socket; over HTTP it gets a new cookie and a fresh user of its own
    const known = new Set([session.id]);
    for (const cookie of fakes) {
      const { id, ...answer } = await cookieAnswers(chat.url, cookie);
      expect({ cookie, ...answer, known: known.has(id) }).toEqual({ cookie, upgrade: 401, newCookie: true, known: false });
      known.add(id);
    }
  });

  test("health and metrics report the server's state", async () => {
    await using chat = await serve();
    const health = await fetch(`${chat.url}/healthz`);
    expect(health.status).toBe(200);
    expect(await health.json()).toEqual({ status: "ok" });
    const { clients: [a] } = await usersInRoom(chat.url, 1, "room");
    await a.say("room", "count me");
    const res = await fetch(`${chat.url}/metrics`);
    expect(res.headers.get("content-type")).toStartWith("text/plain; version=0.0.4");
    const text = await res.text();
    for (const line of ["chat_connections 1", "chat_rooms 1", "chat_messages_received_total 1", "chat_messages_published_total 1", "chat_frames_rejected_total 0", 'chat_rate_limited_total{reason="say"} 0', "chat_slow_consumers_closed_total 0"]) {
      expect(text).toContain(`\n${line}\n`);
    }
    expect(text).toContain("# TYPE chat_connections gauge");
  });

  test("the REST API lists rooms and pages back through history", async () => {
    await using chat = await serve();
    const { sessions: [session], clients: [a] } = await usersInRoom(chat.url, 1, "alpha");
    await a.join("beta");
    for (let i = 1; i <= 7; i++) await a.say("alpha", `a${i}`);
    await a.say("beta", "b1");
    const get = (path: string) => fetch(`${chat.url}${path}`, { headers: { cookie: session.cookie } });
    expect(await (await get("/api/rooms")).json()).toEqual([
      { name: "alpha", online: 1, lastId: 7, visibility: "public" },
      { name: "beta", online: 1, lastId: 1, visibility: "public" },
    ]);
    const page1 = (await (await get("/api/rooms/alpha/messages?limit=3")).json()) as any;
    expect(page1.messages.map((m: any) => m.id)).toEqual([5, 6, 7]);
    const page2 = (await (await get("/api/rooms/alpha/messages?before=5&limit=3")).json()) as any;
    expect(page2.messages.map((m: any) => m.text)).toEqual(["a2", "a3", "a4"]);
    for (const path of ["/api/rooms/Bad!/messages", "/api/rooms/alpha/messages?limit=0", "/api/rooms/alpha/messages?limit=101", "/api/rooms/alpha/messages?before=x"]) {
      const res = await get(path);
      expect(res.status).toBe(400);
      expect(((await res.json()) as any).error.code).toBe("bad_request");
    }
  });
});

describe("process", () => {
  test("invalid config fails at start with one clear line and exit code 2", async () => {
    for (const [env, pattern] of [
      [{ PORT: "nope" }, /^Cannot parse PORT="nope": /],
      [{ RATE_LIMIT: "20 per 10s" }, /^Cannot parse RATE_LIMIT="20 per 10s": expected <count>\/<seconds>s/],
      [{ MAX_TEXT: "0" }, /^Cannot parse MAX_TEXT="0": /],
      [{ ALLOWED_ORIGINS: "not a url" }, /^Cannot parse ALLOWED_ORIGINS=/],
      [{ DATABASE_URL: "chat2.db" }, /^Cannot parse DATABASE_URL="chat2.db": expected sqlite:\/\/<file>, :memory: or postgres:\/\//],
      [{ DATABASE_URL: "sqlite://" }, /^Cannot parse DATABASE_URL="sqlite:\/\/": expected sqlite:\/\/<file>/],
      [{ DATABASE_URL: "mysql://db/chat" }, /^Cannot parse DATABASE_URL="mysql:\/\/db\/chat": /],
    ] as const) {
      const proc = Bun.spawn([BUN, "server.ts"], { cwd: ROOT, env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe" });
      expect(await proc.exited).toBe(2);
      const stderr = await new Response(proc.stderr).text();
      expect(stderr.trim().split("\n")).toHaveLength(1);
      expect(stderr).toMatch(pattern);
    }
    const flag = Bun.spawn([BUN, "server.ts", "--bogus"], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
    expect(await flag.exited).toBe(2);
    const help = Bun.spawn([BUN, "server.ts", "--help"], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
    expect(await help.exited).toBe(0);
    const text = await new Response(help.stdout).text();
    for (const word of ["--port", "--host", "--db", "PORT", "DATABASE_URL", "SESSION_SECRET", "RATE_LIMIT"]) expect(text).toContain(word);
  });

  test("defaults apply when nothing is set, rate limits included", () => {
    expect(parseConfig(readSettings({}, []))).toMatchObject({
      port: 3000, host: "0.0.0.0", databaseUrl: "sqlite://chat.db", historyOnJoin: 50, recoveryLimit: 500, maxText: 2000,
      rateLimit: { count: 20, perMs: 10_000 }, renameLimit: { count: 5, perMs: 60_000 }, joinLimit: { count: 100, perMs: 60_000 },
    });
  });

  test("flags win over env and parse into typed config", () => {
    const config = parseConfig(readSettings({ PORT: "1", RATE_LIMIT: "5/2s" }, ["--port", "4000", "--db=:memory:", "--host", "::1"]));
    expect(config).toMatchObject({ port: 4000, databaseUrl: ":memory:", host: "::1", rateLimit: { count: 5, perMs: 2000 }, historyOnJoin: 50, recoveryLimit: 500, maxText: 2000 });
  });

  test("SIGTERM: health turns 503, accepted messages are stored, sockets close with 1001, exit 0", async () => {
    using tmp = tempDir();
    const env = { DATABASE_URL: `sqlite://${tmp.dir}/chat.db`, RATE_LIMIT: "1000/1s" };
    let sentIds: number[];
    {
      await using child = await spawnServer(env);
      const { clients: [a] } = await usersInRoom(child.url, 1, "room");
      // a burst, then SIGTERM before the echoes: everything accepted must be stored
      for (let i = 0; i < 50; i++) a.send({ type: "say", room: "room", text: `burst ${i}`, ref: String(i) });
      const first = await a.next((f) => f.type === "message");
      child.proc.kill("SIGTERM");
      const closed = await a.closed;
      expect(closed.code).toBe(1001);
      expect(await child.proc.exited).toBe(0);
      sentIds = [first, ...a.untaken()].filter((f) => f.type === "message").map((f) => (f as { id: number }).id);
      expect(child.lines.some((l) => l.includes('"event":"stop"'))).toBe(true);
    }
    await using again = await spawnServer(env);
    const b = await Client.connect(again.url, await newSession(again.url));
    const { history } = await b.join("room");
    const stored = history.messages.map((m) => m.id);
    // what the server echoed is exactly what it stored (frames it had not read yet were never accepted)
    expect(stored).toEqual(sentIds);
    expect(stored).toEqual(Array.from({ length: stored.length }, (_, i) => i + 1));
  });

  test("while shutting down, health answers 503 and new sockets are refused", async () => {
    await using chat = await serve();
    const { sessions: [session], clients: [a] } = await usersInRoom(chat.url, 1, "room");
    chat.drain();
    const health = await fetch(`${chat.url}/healthz`);
    expect(health.status).toBe(503);
    expect(await health.json()).toEqual({ status: "shutting_down" });
    expect(await upgradeStatus(chat.url, { cookie: session.cookie })).toBe(503);
    expect((await a.say("room", "still served while draining")).id).toBe(1);
    await chat.stop();
    expect((await a.closed).code).toBe(1001);
  });

  test("the compiled binary serves the page and chats from another directory", async () => {
    using out = tempDir("chat-bin-");
    const build = Bun.spawn([BUN, "build", "--compile", join(ROOT, "server.ts"), "--outfile", join(out.dir, "chat")], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
    expect(await build.exited).toBe(0);
    const elsewhere = join(out.dir, "run");
    mkdirSync(elsewhere);
    await using child = await spawnServer({ DATABASE_URL: "sqlite://chat.db" }, [join(out.dir, "chat")], elsewhere);
    const page = await fetch(`${child.url}/`);
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('<script type="module">');
    const { clients: [a] } = await usersInRoom(child.url, 1, "general");
    expect((await a.say("general", "from the binary")).text).toBe("from the binary");
    await until(() => existsSync(join(elsewhere, "chat.db")), 5000, "chat.db in the working directory");
    // the binary names itself in its help, knows its version, and has the operations commands
    const bin = join(out.dir, "chat");
    const output = (args: string[]) => Bun.spawnSync([bin, ...args], { cwd: elsewhere, env: { ...process.env, DATABASE_URL: "sqlite://chat.db" } });
    expect(output(["--version"]).stdout.toString().trim()).toBe(`chat ${(await Bun.file(join(ROOT, "package.json")).json()).version} (Bun ${Bun.version})`);
    const help = output(["--help"]).stdout.toString();
    expect(help).toStartWith(`Usage: ${bin} `);
    expect(help).not.toContain("bun run server.ts");
    expect(output(["check"]).exitCode).toBe(0);
    const backup = output(["backup", "copy.db"]);
    expect({ code: backup.exitCode, err: backup.stderr.toString() }).toEqual({ code: 0, err: "" });
    expect(existsSync(join(elsewhere, "copy.db"))).toBe(true);
  }, 120_000);
});
