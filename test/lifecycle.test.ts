// Messages that change: edit, delete, react and reply, each the room's next seq; and exact recovery of all of it by a
// client that was away, single node, across a restart and across nodes. Real servers, real sockets.
import { Database } from "bun:sqlite";
import { describe, expect, test } from "bun:test";
import { SQL } from "bun";
import { copyFileSync } from "node:fs";
import { join } from "node:path";
import { type ServerMessage } from "../server.ts";
import { Client, newSession, ROOT, serve, type Session, spawnCluster, tempDir, usersInRoom } from "./helpers.ts";
import { describeWithServices } from "./services.ts";
import { storedHistory } from "./probes.ts";

type Message = Extract<ServerMessage, { type: "message" }>;
type Updated = Extract<ServerMessage, { type: "updated" }>;
const isUpdated = (ref?: string) => (f: ServerMessage): f is Updated => f.type === "updated" && (ref === undefined || f.ref === ref);

/** What a client makes of a room: message id → state, and the last seq applied. */
class View {
  readonly messages = new Map<number, Message>();
  seq = 0;
  apply(f: ServerMessage) {
    if (f.type === "history") {
      for (const m of [...f.messages, ...f.updates]) this.messages.set(m.id, m);
      this.seq = Math.max(this.seq, f.seq);
    } else if (f.type === "message") {
      this.messages.set(f.id, f);
      this.seq = Math.max(this.seq, f.seq);
    } else if (f.type === "updated") {
      this.messages.set(f.message.id, f.message);
      this.seq = Math.max(this.seq, f.seq);
    }
  }
  /** Without the refs, which only the sender's copy of a change carries. */
  state() {
    return [...this.messages.values()].sort((a, b) => a.id - b.id);
  }
}

async function change(client: Client, frame: Record<string, unknown>) {
  const ref = crypto.randomUUID();
  client.send({ ...frame, ref });
  return client.next((f): f is Updated | Extract<ServerMessage, { type: "error" }> => (f.type === "updated" || f.type === "error") && "ref" in f && f.ref === ref);
}

describe("changes", () => {
  test("an edit, a deletion and a reaction each take the room's next seq and reach everyone once; the requester's copy carries its ref", async () => {
    await using chat = await serve();
    const { sessions: [alice], clients: [a, b] } = await usersInRoom(chat.url, 2, "room");
    const first = await a.say("room", "helo");
    expect(first.seq).toBe(first.id);
    const edited = (await change(a, { type: "edit", room: "room", id: first.id, text: "hello" })) as Updated;
    expect(edited).toMatchObject({ type: "updated", room: "room", seq: first.id + 1, message: { id: first.id, seq: first.id + 1, text: "hello", user: { id: alice.id } } });
    expect(edited.message.editedAt).toBeNumber();
    const heard = await b.next(isUpdated());
    expect(heard).toEqual({ type: "updated", room: "room", seq: edited.seq, message: edited.message });
    const reacted = (await change(b, { type: "react", room: "room", id: first.id, emoji: "👍", on: true })) as Updated;
    expect(reacted.seq).toBe(edited.seq + 1);
    expect(reacted.message.reactions).toEqual({ "👍": [b.frames.find((f) => f.type === "welcome")!.user.id] });
    const second = await a.say("room", "a new one");
    expect(second.id).toBe(reacted.seq + 1); // ids are seqs: no longer contiguous
    const deleted = (await change(a, { type: "delete", room: "room", id: first.id })) as Updated;
    expect(deleted.message).toEqual({ type: "message", room: "room", id: first.id, seq: second.seq + 1, user: first.user, text: "", ts: first.ts, ref: first.ref, deleted: true });
    // the requester heard each change once, with its ref; the other once, without
    expect(a.frames.filter((f) => f.type === "updated").length).toBe(3);
    await b.next(isUpdated()); // the reaction, as the others heard it
    expect(b.frames.filter((f) => f.type === "updated").map((f) => (f as Updated).seq)).toEqual([edited.seq, reacted.seq, deleted.seq]);
    // REST shows current states, tombstones included
    const stored = await storedHistory(chat.url, "room", alice.cookie);
    expect(stored.map((m) => [m.id, m.seq, m.text, m.deleted ?? false])).toEqual([[first.id, deleted.seq, "", true], [second.id, second.seq, "a new one", false]]);
  });

  test("refusals change nothing: not_found, forbidden (not yours), deleted messages, bad emoji, too many emoji; repeats take no seq", async () => {
    await using chat = await serve({ rateLimit: "1000/1s" });
    const { clients: [a, b] } = await usersInRoom(chat.url, 2, "room");
    const m = await a.say("room", "mine");
    const refusals: [Client, Record<string, unknown>, string][] = [
      [a, { type: "edit", room: "room", id: 999, text: "x" }, "not_found"],
      [b, { type: "edit", room: "room", id: m.id, text: "not yours" }, "forbidden"],
      [b, { type: "delete", room: "room", id: m.id }, "forbidden"],
      [a, { type: "react", room: "room", id: m.id, emoji: "ab", on: true }, "bad_request"],
      [a, { type: "react", room: "room", id: m.id, emoji: "👍👍", on: true }, "bad_request"],
      [a, { type: "edit", room: "room", id: m.id, text: "bad\u0007" }, "bad_request"],
      [a, { type: "edit", room: "other", id: m.id, text: "x" }, "not_joined"],
    ];
    for (const [client, frame, code] of refusals) expect({ frame, answer: await change(client, frame) }).toMatchObject({ frame, answer: { type: "error", code } });
    // a reaction already there, or a removal of one that is not, answers the state and takes no seq
    const on = (await change(b, { type: "react", room: "room", id: m.id, emoji: "🎉", on: true })) as Updated;
    const again = (await change(b, { type: "react", room: "room", id: m.id, emoji: "🎉", on: true })) as Updated;
    expect(again.seq).toBe(on.seq);
    expect((await change(b, { type: "react", room: "room", id: m.id, emoji: "👀", on: false }) as Updated).seq).toBe(on.seq);
    // at most 20 different emoji
    const emoji = ["😀", "😁", "😂", "🤣", "😃", "😄", "😅", "😆", "😉", "😊", "😋", "😎", "😍", "😘", "🥰", "😗", "😙", "😚", "🙂"];
    for (const e of emoji) expect((await change(a, { type: "react", room: "room", id: m.id, emoji: e, on: true })).type).toBe("updated");
    expect(await change(a, { type: "react", room: "room", id: m.id, emoji: "🤔", on: true })).toMatchObject({ code: "limit_exceeded" });
    expect(await change(a, { type: "react", room: "room", id: m.id, emoji: "🎉", on: true })).toMatchObject({ type: "updated" }); // an existing one
    // flags, keycaps and skin tones are one emoji each
    for (const e of ["🇫🇷", "1️⃣", "👍🏽", "👩‍👩‍👧"]) expect((await change(b, { type: "react", room: "room", id: m.id, emoji: e, on: false })).type).toBe("updated");
    // a deleted message cannot be edited or reacted to; deleting it again changes nothing
    const gone = (await change(a, { type: "delete", room: "room", id: m.id })) as Updated;
    expect(gone.message.reactions).toBeUndefined();
    expect(await change(a, { type: "edit", room: "room", id: m.id, text: "back" })).toMatchObject({ code: "not_found" });
    expect(((await change(a, { type: "delete", room: "room", id: m.id })) as Updated).seq).toBe(gone.seq);
  });

  test("a room's owner or moderator deletes anyone's message; a reply names its message, and a reply to none is sent without", async () => {
    await using chat = await serve();
    const owner = await newSession(chat.url);
    const res = await fetch(`${chat.url}/api/me/password`, { method: "POST", headers: { cookie: owner.cookie, "content-type": "application/json" }, body: JSON.stringify({ password: "a long password" }) });
    const ownerCookie = res.headers.get("set-cookie")!.split(";")[0];
    expect((await fetch(`${chat.url}/api/rooms`, { method: "POST", headers: { cookie: ownerCookie, "content-type": "application/json" }, body: JSON.stringify({ name: "hall", visibility: "public" }) })).status).toBe(201);
    const o = await Client.connect(chat.url, { ...owner, cookie: ownerCookie });
    const other = await newSession(chat.url);
    const x = await Client.connect(chat.url, other);
    await o.join("hall");
    await x.join("hall");
    const m = await x.say("hall", "spam");
    x.send({ type: "say", room: "hall", text: "re: spam", ref: "r1", replyTo: m.id });
    expect((await x.next((f) => f.type === "message" && f.ref === "r1")) as Message).toMatchObject({ replyTo: m.id });
    x.send({ type: "say", room: "hall", text: "re: nothing", ref: "r2", replyTo: 12345 });
    expect(((await x.next((f) => f.type === "message" && f.ref === "r2")) as Message).replyTo).toBeUndefined();
    expect(await change(o, { type: "delete", room: "hall", id: m.id })).toMatchObject({ type: "updated", message: { id: m.id, deleted: true } });
  });
});

/** Alice watches a room, goes away at seq `since`; Bob changes old and new messages; Alice comes back with since. */
async function awayAndBack(urls: { bob: string; alice: string }, restart?: () => Promise<void>) {
  const alice = await newSession(urls.alice);
  const bob = await newSession(urls.alice);
  const a = await Client.connect(urls.alice, alice);
  const b = await Client.connect(urls.bob, bob);
  const view = new View();
  view.apply((await a.join("room")).history);
  await b.join("room");
  const old1 = await b.say("room", "old one");
  const old2 = await b.say("room", "old two");
  const old3 = await b.say("room", "old three");
  view.apply(await a.next((f) => f.type === "message" && f.id === old3.id));
  for (const f of a.untaken()) view.apply(f);
  const since = view.seq;
  await a.close();
  // while away: new messages, an edit and a deletion of old ones, reactions on old and new, an edit of a new one
  const new1 = await b.say("room", "new one");
  await change(b, { type: "edit", room: "room", id: old1.id, text: "old one, edited" });
  await change(b, { type: "delete", room: "room", id: old2.id });
  await change(b, { type: "react", room: "room", id: old3.id, emoji: "👍", on: true });
  await change(b, { type: "react", room: "room", id: new1.id, emoji: "🎉", on: true });
  await change(b, { type: "edit", room: "room", id: new1.id, text: "new one, edited" });
  const new2 = await b.say("room", "new two");
  await restart?.();
  const back = await Client.connect(urls.alice, alice);
  const { pages } = await back.recover("room", since);
  expect(pages[0].complete).toBe(true);
  for (const page of pages) view.apply(page);
  expect(view.seq).toBe(new2.seq);
  expect(pages.flatMap((p) => p.updates).map((m) => m.id).sort()).toEqual([old1.id, old2.id, old3.id].sort());
  expect(pages.flatMap((p) => p.messages).map((m) => m.id)).toEqual([new1.id, new2.id]);
  // exactly the server's state
  const stored = await storedHistory(urls.alice, "room", alice.cookie);
  expect(view.state()).toEqual(stored);
  // and live frames continue right after
  const b2 = restart ? await Client.connect(urls.bob, bob) : b;
  if (restart) await b2.join("room");
  const next = await b2.say("room", "live again");
  expect(next.seq).toBe(view.seq + 1);
  expect((await back.next((f) => f.type === "message" && f.id === next.id)) as Message).toEqual(next);
  return { stored };
}

describe("recovery", () => {
  test("a client away during edits, deletions and reactions gets each once, in its current state, with since; then live frames follow at seq + 1", async () => {
    await using chat = await serve();
    await awayAndBack({ bob: chat.url, alice: chat.url });
  });

  test("the same across a restart on the same database file", async () => {
    using tmp = tempDir();
    const databaseUrl = `sqlite://${tmp.dir}/chat.db`;
    let chat = await serve({ databaseUrl });
    const url = { current: chat.url };
    try {
      await awayAndBack({ get bob() { return url.current; }, get alice() { return url.current; } } as { bob: string; alice: string }, async () => {
        await chat.stop();
        chat = await serve({ databaseUrl, port: Number(new URL(url.current).port) });
      });
    } finally {
      await chat.stop();
    }
  });

  test("a recovery spread over pages ends with the same state", async () => {
    await using chat = await serve({ historyPageBytes: 1024, rateLimit: "1000/1s" });
    const { sessions: [alice], clients: [a, b] } = await usersInRoom(chat.url, 2, "room");
    const view = new View();
    const ids: number[] = [];
    for (let i = 0; i < 10; i++) ids.push((await a.say("room", `m${i} ${"x".repeat(100)}`)).id);
    for (const f of b.untaken()) view.apply(f);
    const since = (await b.next((f) => f.type === "message" && f.id === ids.at(-1)) as Message).seq;
    view.apply({ type: "history", room: "room", seq: since, messages: [], updates: [], complete: true, more: false });
    for (const f of b.frames) view.apply(f);
    await b.close();
    for (let i = 0; i < 10; i++) await a.say("room", `n${i} ${"y".repeat(100)}`);
    for (const id of ids.slice(0, 5)) await change(a, { type: "edit", room: "room", id, text: `edited ${id} ${"z".repeat(100)}` });
    for (const id of ids.slice(5)) await change(a, { type: "react", room: "room", id, emoji: "👍", on: true });
    const back = await Client.connect(chat.url, alice);
    const { pages } = await back.recover("room", since);
    expect(pages.length).toBeGreaterThan(2);
    for (const page of pages) view.apply(page);
    expect(view.state()).toEqual(await storedHistory(chat.url, "room", alice.cookie));
  });
});

describe("storage", () => {
  test("a database made by the previous release (schema 2) is upgraded in place: nothing lost, ids become seqs, old cookies work", async () => {
    using tmp = tempDir();
    const file = join(tmp.dir, "chat.db");
    copyFileSync(join(ROOT, "test/fixtures/chat-v2.db"), file);
    const fixture = (await Bun.file(join(ROOT, "test/fixtures/chat-v2.json")).json()) as { ann: Session; bob: Session; dm: string; sessionSecret: string };
    for (let open = 0; open < 2; open++) {
      // twice: the upgrade is idempotent
      await using chat = await serve({ databaseUrl: `sqlite://${file}`, sessionSecret: fixture.sessionSecret });
      const me = await (await fetch(`${chat.url}/api/me`, { headers: { cookie: fixture.ann.cookie } })).json();
      expect(me).toEqual({ id: fixture.ann.id, name: "Ann", registered: true, admin: true });
      const stored = await storedHistory(chat.url, "general", fixture.ann.cookie);
      expect(stored.map((m) => [m.id, m.seq, m.user.name, m.text])).toEqual([
        [1, 1, "Ann", "hello from v2"], [2, 2, "Ann", "second message"], [3, 3, "Ann", "@Bob are you there?"], [4, 4, "Bob", "yes, hi Ann"],
      ].map(([id, seq, name, text], i) => (open === 1 && i === 0 ? [id, 5, name, "hello from v3"] : [id, seq, name, text])));
      if (open === 0) {
        const a = await Client.connect(chat.url, fixture.ann);
        await a.join("general");
        expect(await change(a, { type: "edit", room: "general", id: 1, text: "hello from v3" })).toMatchObject({ seq: 5 });
      }
      const b = await Client.connect(chat.url, fixture.bob);
      expect((await b.join(fixture.dm)).history.messages.map((m) => m.text)).toEqual(["just us"]);
    }
    const db = new Database(file, { readonly: true });
    try {
      expect(db.query("SELECT value FROM meta WHERE key = 'schema_version'").get()).toEqual({ value: "3" });
    } finally {
      db.close();
    }
  });
});

describeWithServices("changes, cluster", (services) => {
  test("a client away from one node while another changes messages comes back exact; concurrent reactions from two nodes end in one order everywhere", async () => {
    await using cluster = await spawnCluster(services, ["lc-a", "lc-b"], { RATE_LIMIT: "1000/1s" });
    const [a, b] = cluster.nodes;
    await awayAndBack({ bob: b.url, alice: a.url });
    // reactions racing from both nodes on one message
    const [ann, bob] = [await newSession(a.url), await newSession(a.url)];
    const ca = await Client.connect(a.url, ann);
    const cb = await Client.connect(b.url, bob);
    await ca.join("race");
    await cb.join("race");
    const m = await ca.say("race", "react to me");
    await cb.next((f) => f.type === "message" && f.id === m.id);
    const emoji = ["😀", "😁", "😂", "🤣", "😃"];
    for (const e of emoji) {
      ca.send({ type: "react", room: "race", id: m.id, emoji: e, on: true });
      cb.send({ type: "react", room: "race", id: m.id, emoji: e, on: true });
    }
    const last = (c: Client) => c.next((f) => f.type === "updated" && Object.values(f.message.reactions ?? {}).flat().length === 10, 10_000) as Promise<Updated>;
    const [fromA, fromB] = await Promise.all([last(ca), last(cb)]);
    expect(fromA.message.reactions).toEqual(fromB.message.reactions);
    const stored = await storedHistory(a.url, "race", ann.cookie);
    expect(stored[0].reactions).toEqual(fromA.message.reactions);
  }, 60_000);
});

describeWithServices("storage, Postgres", (services) => {
  test("a Postgres database of schema 2 is upgraded in place too: messages keep their ids as seqs, and take changes after", async () => {
    const databaseUrl = await services.pg.createDatabase();
    {
      // schema 2's messages and meta, as the previous release made them
      await using sql = new SQL(databaseUrl);
      await sql`CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`;
      await sql`INSERT INTO meta VALUES ('schema_version', '2')`;
      await sql`CREATE TABLE rooms (name TEXT PRIMARY KEY, last_id BIGINT NOT NULL, visibility TEXT NOT NULL DEFAULT 'public', owner TEXT)`;
      await sql`CREATE TABLE messages (room TEXT NOT NULL, id BIGINT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL, text TEXT NOT NULL, ts BIGINT NOT NULL, ref TEXT, PRIMARY KEY (room, id))`;
      await sql`INSERT INTO rooms VALUES ('old', 2, 'public', NULL)`;
      await sql`INSERT INTO messages VALUES ('old', 1, 'u1', 'Ann', 'first', 1, NULL), ('old', 2, 'u1', 'Ann', 'second', 2, NULL)`;
    }
    for (let open = 0; open < 2; open++) {
      await using chat = await serve({ databaseUrl });
      const session = await newSession(chat.url);
      const stored = await storedHistory(chat.url, "old", session.cookie);
      expect(stored.map((m) => [m.id, m.seq, m.text])).toEqual(open ? [[1, 1, "first"], [2, 3, ""]] : [[1, 1, "first"], [2, 2, "second"]]);
      if (!open) {
        const c = await Client.connect(chat.url, session);
        await c.join("old");
        expect(await chat.store.change({ kind: "delete", room: "old", id: 2, user: "u1", moderator: false })).toMatchObject({ ok: true, changed: true, message: { seq: 3, deleted: true } });
      }
    }
  }, 60_000);
});
