// Message search: GET /api/rooms/:room/search on a real server, SQLite (FTS5 kept in step by triggers) and
// Postgres (to_tsvector GIN index); what matches, where, for whom, and that changes to the rows show at once.
import { describe, expect, test } from "bun:test";
import { Database } from "bun:sqlite";
import { SQL } from "bun";
import { Client, newSession, serve, type Session, tempDir } from "./helpers.ts";
import { describeWithServices } from "./services.ts";

const json = { "content-type": "application/json" };
type Found = { messages: { id: number; text: string; room: string }[] };

/** GET /api/rooms/:room/search: the status, and the texts found (newest first) when it is 200. */
async function search(baseUrl: string, who: Session, room: string, params: Record<string, string>) {
  const res = await fetch(`${baseUrl}/api/rooms/${room}/search?${new URLSearchParams(params)}`, { headers: { cookie: who.cookie } });
  const body = (await res.json()) as Found & { error?: { code: string; message: string } };
  return { status: res.status, texts: body.messages?.map((m) => m.text), ids: body.messages?.map((m) => m.id), body };
}
const texts = async (baseUrl: string, who: Session, room: string, q: string) => (await search(baseUrl, who, room, { q })).texts;

/** A session whose socket has joined `room` and said each text in turn. */
async function saying(baseUrl: string, room: string, lines: string[]) {
  const who = await newSession(baseUrl);
  const client = await Client.connect(baseUrl, who);
  await client.join(room);
  const ids: number[] = [];
  for (const text of lines) ids.push((await client.say(room, text)).id);
  return { who, client, ids };
}

/** The same promises on either engine; `update` changes a stored text as an edit or a deletion (text '') will. */
async function wordsAndChanges(baseUrl: string, update: (room: string, id: number, text: string) => Promise<void>) {
  const { who, client, ids } = await saying(baseUrl, "general", ["Hello brave new world", "hello again", "world peace", "helicopters over the world"]);
  expect(await texts(baseUrl, who, "general", "world")).toEqual(["helicopters over the world", "world peace", "Hello brave new world"]);
  expect(await texts(baseUrl, who, "general", "WORLD hello")).toEqual(["Hello brave new world"]);
  expect(await texts(baseUrl, who, "general", "world hel")).toEqual(["helicopters over the world", "Hello brave new world"]); // prefix on the last word
  expect(await texts(baseUrl, who, "general", "hel world")).toEqual([]); // …only on the last
  expect(await texts(baseUrl, who, "general", "nothing")).toEqual([]);
  const paged = await search(baseUrl, who, "general", { q: "world", before: String(ids[3]), limit: "1" });
  expect(paged.texts).toEqual(["world peace"]);
  expect((await search(baseUrl, who, "general", { q: "world", before: String(ids[2]), limit: "5" })).texts).toEqual(["Hello brave new world"]);
  await update("general", ids[2], "world war");
  expect(await texts(baseUrl, who, "general", "peace")).toEqual([]);
  expect(await texts(baseUrl, who, "general", "war")).toEqual(["world war"]);
  await update("general", ids[0], ""); // a tombstone
  expect(await texts(baseUrl, who, "general", "brave")).toEqual([]);
  expect(await texts(baseUrl, who, "general", "world")).toEqual(["helicopters over the world", "world war"]);
  await client.close();
}

describe("search", () => {
  test("every word must match, the last as a prefix, in any case, newest first; before and limit page; an edit and a deletion show at once", async () => {
    using tmp = tempDir();
    const file = `${tmp.dir}/chat.db`;
    await using chat = await serve({ databaseUrl: `sqlite://${file}` });
    // a second connection to the file: the index follows the rows by triggers, whoever writes them
    const db = new Database(file);
    db.run("PRAGMA busy_timeout = 5000");
    await wordsAndChanges(chat.url, async (room, id, text) => void db.query("UPDATE messages SET text = ? WHERE room = ? AND id = ?").run(text, room, id));
    db.close();
  });

  test("a search stays in its room; a private room or dm searched by a non-member is 404, by a member 200", async () => {
    await using chat = await serve();
    const { who } = await saying(chat.url, "general", ["the secret plan"]);
    await saying(chat.url, "other", ["another secret"]);
    expect(await texts(chat.url, who, "general", "secret")).toEqual(["the secret plan"]);
    expect(await texts(chat.url, who, "other", "secret")).toEqual(["another secret"]);
    expect(await texts(chat.url, who, "nowhere", "secret")).toEqual([]);
    // a private room: made by an account, with one message only its members may find
    const owner = await newSession(chat.url);
    const registered = await fetch(`${chat.url}/api/me/password`, { method: "POST", headers: { ...json, cookie: owner.cookie }, body: JSON.stringify({ password: "a long password" }) });
    owner.cookie = registered.headers.get("set-cookie")!.split(";")[0];
    expect((await fetch(`${chat.url}/api/rooms`, { method: "POST", headers: { ...json, cookie: owner.cookie }, body: JSON.stringify({ name: "hideout", visibility: "private" }) })).status).toBe(201);
    const client = await Client.connect(chat.url, owner);
    await client.join("hideout");
    await client.say("hideout", "secret hideout words");
    expect(await texts(chat.url, owner, "hideout", "secret")).toEqual(["secret hideout words"]);
    const outsider = await search(chat.url, who, "hideout", { q: "secret" });
    expect(outsider.status).toBe(404);
    expect(outsider.body).toEqual({ error: { code: "not_found", message: "No such room" } } as never);
    const dm = (await (await fetch(`${chat.url}/api/dms`, { method: "POST", headers: { ...json, cookie: owner.cookie }, body: JSON.stringify({ user: who.id }) })).json()) as { room: string };
    await client.join(dm.room);
    await client.say(dm.room, "secret between us");
    expect(await texts(chat.url, who, dm.room, "secret")).toEqual(["secret between us"]);
    expect((await search(chat.url, await newSession(chat.url), dm.room, { q: "secret" })).status).toBe(404);
    await client.close();
  });

  test("query syntax is only words: quotes, operators, NEAR(, *, -, column filters and SQL find words or answer 400, never an error", async () => {
    await using chat = await serve();
    const { who } = await saying(chat.url, "general", ["a OR b", "near the sea", "minus-sign here", 'say "quoted" words', "text: column"]);
    const queries = ["a OR b", "NEAR(", "NEAR(near sea)", '"', '"quoted', "quoted\"", "*", "**near", "near*", "-", "-minus", "minus -sign", "text:", "text : column",
      "scope : x", "{text}: near", "a AND", "NOT b", "^near", "'; DROP TABLE messages; --", "a' OR '1'='1", "(", ")", "a & b | !c", "near:*", "\\", "\u0000near"];
    for (const q of queries) {
      const { status } = await search(chat.url, who, "general", { q });
      expect({ q, status }).toEqual({ q, status: [".", "*", "-", '"', "(", ")", "\\"].some((c) => q === c) ? 400 : 200 } as never);
    }
    // the words of the syntax are found as words
    expect(await texts(chat.url, who, "general", "a OR b")).toEqual(["a OR b"]);
    expect(await texts(chat.url, who, "general", "NEAR(")).toEqual(["near the sea"]);
    expect(await texts(chat.url, who, "general", '"quoted"')).toEqual(['say "quoted" words']);
    expect(await texts(chat.url, who, "general", "minus -sign")).toEqual(["minus-sign here"]);
    expect(await texts(chat.url, who, "general", "text: column")).toEqual(["text: column"]);
    expect(await texts(chat.url, who, "general", "scope : x")).toEqual([]);
    expect((await fetch(`${chat.url}/api/rooms/general/messages`)).status).toBe(200); // nothing was dropped
  });

  test("a query without words, too many words, a too long word or a bad limit is 400 bad_request", async () => {
    await using chat = await serve();
    const { who } = await saying(chat.url, "general", ["anything"]);
    const cases: [Record<string, string>, RegExp][] = [
      [{}, /^q: /],
      [{ q: "" }, /no letters or digits/],
      [{ q: "  !?*  " }, /no letters or digits/],
      [{ q: "a b c d e f g h i" }, /more than 8 words/],
      [{ q: "x".repeat(65) }, /longer than 64/],
      [{ q: "x", limit: "51" }, /^limit: /],
      [{ q: "x", limit: "0" }, /^limit: /],
      [{ q: "x", before: "-1" }, /^before: /],
      [{ q: "x", extra: "1" }, /./],
    ];
    for (const [params, message] of cases) {
      const { status, body } = await search(chat.url, who, "general", params);
      expect({ params, status, code: body.error?.code }).toEqual({ params, status: 400, code: "bad_request" });
      expect(body.error?.message).toMatch(message);
    }
    expect((await search(chat.url, who, "general", { q: "a b c d e f g h" })).status).toBe(200);
    expect((await search(chat.url, who, "Bad Room", { q: "x" })).status).toBe(400);
  });

  test("accents and case fold; CJK has no spaces, so a run of CJK characters is one word: found by its start, not by a word inside it", async () => {
    await using chat = await serve();
    const { who } = await saying(chat.url, "general", ["Café crème", "東京タワーに行きました", "北京 上海"]);
    expect(await texts(chat.url, who, "general", "cafe CREME")).toEqual(["Café crème"]);
    expect(await texts(chat.url, who, "general", "東京")).toEqual(["東京タワーに行きました"]); // a prefix of the run
    expect(await texts(chat.url, who, "general", "タワー")).toEqual([]); // inside the run: not a word of its own (FTS5 unicode61)
    expect(await texts(chat.url, who, "general", "上海")).toEqual(["北京 上海"]); // separated by a space: words
  });

  test("each search is charged to the address's history bytes, as scrollback is: past the budget it is 429 with Retry-After", async () => {
    await using chat = await serve({ historyBytesPerAddress: "1000/60s" });
    const { who } = await saying(chat.url, "general", ["x".repeat(300)]);
    const statuses: number[] = [];
    for (let i = 0; i < 10 && statuses.at(-1) !== 429; i++) statuses.push((await search(chat.url, who, "general", { q: "xx" })).status);
    expect(statuses[0]).toBe(200); // a full budget pays any page
    expect(statuses.at(-1)).toBe(429); // ~400 bytes each from 1000, less the join's history frame
    const res = await fetch(`${chat.url}/api/rooms/general/search?q=x`, { headers: { cookie: who.cookie } });
    expect(res.status).toBe(429);
    expect(res.headers.get("retry-after")).toMatch(/^\d+$/);
  });

  test("retention's deletes leave the index, and documents stay in id order in a room after deletes and new messages", async () => {
    await using chat = await serve();
    const batch = (room: string, lines: string[]) => lines.map((text, i) => ({ room, user: { id: "u1", name: "Ann" }, text, ts: Date.now() + i }));
    const ids = await chat.store.append([...batch("log", ["entry one", "entry two", "entry three"]), ...batch("other", ["entry elsewhere"])]);
    const who = await newSession(chat.url);
    expect(await texts(chat.url, who, "log", "entry")).toEqual(["entry three", "entry two", "entry one"]);
    expect(await chat.store.expire(Date.now() + 60_000, 1)).toMatchObject({ deleted: 1 }); // the oldest: "entry one"
    expect(await texts(chat.url, who, "log", "entry")).toEqual(["entry three", "entry two"]);
    const [four] = await chat.store.append(batch("log", ["entry four"]));
    expect(four).toBe(ids[2] + 1);
    expect((await search(chat.url, who, "log", { q: "entry", before: String(four) })).texts).toEqual(["entry three", "entry two"]);
    expect((await search(chat.url, who, "log", { q: "entry", before: String(ids[2]) })).texts).toEqual(["entry two"]);
    expect((await search(chat.url, who, "log", { q: "entry", limit: "2" })).texts).toEqual(["entry four", "entry three"]);
  });

  test("a database made before search gets every stored message indexed when it is opened, once", async () => {
    using tmp = tempDir();
    const file = `${tmp.dir}/chat.db`;
    const databaseUrl = `sqlite://${file}`;
    const who = await (async () => {
      await using chat = await serve({ databaseUrl });
      return (await saying(chat.url, "general", ["hello from v2", "second message", "@Bob are you there?", "yes, hi Ann"])).who;
    })();
    // the database as the release before search left it: no index, no triggers, no mark in meta
    const db = new Database(file);
    for (const trigger of ["insert", "update", "delete"]) db.run(`DROP TRIGGER messages_search_${trigger}`);
    db.run("DROP TABLE message_words");
    db.run("DROP TABLE message_docs");
    db.run("DELETE FROM meta WHERE key = 'search_filled'");
    db.close();
    for (let open = 0; open < 2; open++) {
      await using chat = await serve({ databaseUrl });
      const said = open ? ["hello after opening 0"] : [];
      expect(await texts(chat.url, who, "general", "hello")).toEqual([...said, "hello from v2"]);
      expect(await texts(chat.url, who, "general", "bob THERE")).toEqual(["@Bob are you there?"]);
      const client = await Client.connect(chat.url, who);
      await client.join("general");
      await client.say("general", `hello after opening ${open}`);
      expect(await texts(chat.url, who, "general", "hello")).toEqual([`hello after opening ${open}`, ...said, "hello from v2"]);
      await client.close();
    }
  });
});

describeWithServices("search on Postgres", (services) => {
  test("every word must match, the last as a prefix, in any case, newest first; before and limit page; an edit and a deletion show at once", async () => {
    const databaseUrl = await services.pg.createDatabase();
    await using chat = await serve({ databaseUrl });
    const sql = new SQL(databaseUrl);
    await wordsAndChanges(chat.url, async (room, id, text) => void (await sql`UPDATE messages SET text = ${text} WHERE room = ${room} AND id = ${id}`));
    const [index] = await sql`SELECT indexdef FROM pg_indexes WHERE indexname = 'messages_fts'`;
    expect(index.indexdef).toContain("to_tsvector('simple'::regconfig, text)");
    await sql.close();
  });

  test("query syntax is only words; CJK runs are words found by their start; case folds, accents stay", async () => {
    await using chat = await serve({ databaseUrl: await services.pg.createDatabase() });
    const { who } = await saying(chat.url, "general", ["a OR b", "near the sea", "東京タワーに行きました", "Café"]);
    for (const q of ["a OR b", "a & b | !c", "NEAR(", "near:*", "'; DROP TABLE messages; --", "a' OR '1'='1", "(near)", "<->", "!near"]) {
      const { status } = await search(chat.url, who, "general", { q });
      expect({ q, status }).toEqual({ q, status: q === "<->" ? 400 : 200 });
    }
    expect(await texts(chat.url, who, "general", "a & b | !c")).toEqual([]);
    expect(await texts(chat.url, who, "general", "a | b")).toEqual(["a OR b"]);
    expect(await texts(chat.url, who, "general", "東京")).toEqual(["東京タワーに行きました"]);
    expect(await texts(chat.url, who, "general", "タワー")).toEqual([]); // inside the run: not a word of its own
    expect(await texts(chat.url, who, "general", "café")).toEqual(["Café"]);
    expect(await texts(chat.url, who, "general", "cafe")).toEqual([]); // 'simple' folds case, not accents (SQLite does both)
    expect(await texts(chat.url, who, "general", "other")).toEqual([]);
  });
});
