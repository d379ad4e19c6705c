// Units of server.ts on their own: the rate limits and the janitor's pruning, the fan-out codec, and the two
// pieces of code that run outside the event loop (the checkpointer thread and the presence script in Redis),
// each run directly against a real SQLite file or a real redis-server.
import { describe, expect, test } from "bun:test";
import { RedisClient } from "bun";
import { Database } from "bun:sqlite";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { FanoutCodec, PRESENCE_LUA, RateLimiter, startCheckpointer, TokenBucket, TypingThrottle, type FanoutPayload } from "../server.ts";
import { tempDir, until } from "./helpers.ts";
import { missingServices, startRedis } from "./services.ts";
import { rowsCheckpointed } from "./probes.ts";

describe("rate limits", () => {
  test("a token bucket holds count tokens and refills them evenly over its period", () => {
    const t0 = 1_000;
    const bucket = new TokenBucket({ count: 2, perMs: 1000 }, t0);
    expect([bucket.take(t0), bucket.take(t0)]).toEqual([0, 0]);
    expect(bucket.take(t0)).toBe(500); // one token comes back every 500 ms
    expect(bucket.take(t0 + 250)).toBe(250);
    expect(bucket.take(t0 + 500)).toBe(0);
    expect(bucket.take(t0 + 10_000)).toBe(0); // full again, but never more than count
    expect(bucket.take(t0 + 10_000)).toBe(0);
    expect(bucket.take(t0 + 10_000)).toBe(500);
  });

  test("a rate limiter gives each key its own bucket", () => {
    const limiter = new RateLimiter({ count: 1, perMs: 60_000 });
    expect(limiter.take("alice")).toBe(0);
    expect(limiter.take("alice")).toBeGreaterThan(59_000);
    expect(limiter.take("bob")).toBe(0);
  });

  test("the janitor forgets idle buckets past the cap, but never the bucket of a user still here", () => {
    const limiter = new RateLimiter({ count: 1, perMs: 60_000 });
    for (const key of ["gone", "here"]) limiter.take(key);
    limiter.prune(performance.now() + 1, (key) => key === "here", 5); // under the cap: nothing to do
    expect(limiter.size).toBe(2);
    limiter.prune(performance.now() + 1, (key) => key === "here", 0);
    expect(limiter.size).toBe(1);
    expect(limiter.take("here")).toBeGreaterThan(0); // still limited: its bucket was kept
    expect(limiter.take("gone")).toBe(0); // a new, full bucket
  });

  test("typing passes once per second per user and room, and the janitor forgets old entries", () => {
    const throttle = new TypingThrottle();
    expect(throttle.allow("u1", "room", 0)).toBe(true);
    expect(throttle.allow("u1", "room", 999)).toBe(false);
    expect(throttle.allow("u1", "other", 999)).toBe(true);
    expect(throttle.allow("u2", "room", 999)).toBe(true);
    expect(throttle.allow("u1", "room", 1000)).toBe(true);
    throttle.prune(1000); // entries last seen before 1000 go
    expect(throttle.size).toBe(1);
  });
});

describe("fan-out codec", () => {
  test("every kind of payload survives encoding, frames with newlines and tabs included", () => {
    const frame = JSON.stringify({ type: "message", text: "two\nlines\tand a tab" });
    const payloads: FanoutPayload[] = [
      { kind: "message", id: 7, sentAt: 1234, frame },
      { kind: "typing", node: "n1", frame },
      { kind: "presence", change: "left", user: { id: "u1", name: "A\nB" }, frame: "" },
      { kind: "renamed", node: "n2", user: { id: "u1", name: "Ann" }, previous: "user1", frame: "" },
    ];
    for (const { frame: body, ...header } of payloads) {
      expect(FanoutCodec.decode(FanoutCodec.encode(header, body))).toEqual({ ...header, frame: body });
    }
  });

  test("a payload that is not ours decodes to nothing", () => {
    for (const payload of ["", "m\t1\t2\t{}", "{}", '{"kind":"message","id":-1,"sentAt":1}\n{}', '{"kind":"shout"}', "not json\n{}", '{"kind":"typing","node":"n","extra":1}']) {
      expect({ payload, decoded: FanoutCodec.decode(payload) }).toEqual({ payload, decoded: undefined });
    }
  });
});

describe("checkpointer", () => {
  test("its thread copies the WAL into the database file, and rewinds a WAL past its threshold", async () => {
    using tmp = tempDir();
    const file = join(tmp.dir, "chat.db");
    using db = new Database(file);
    db.run("PRAGMA journal_mode = WAL");
    db.run("PRAGMA wal_autocheckpoint = 0"); // only the checkpointer copies
    db.run("CREATE TABLE t (x TEXT)");
    const insert = db.prepare("INSERT INTO t VALUES (?)");
    for (let i = 0; i < 100; i++) insert.run("x".repeat(1000));
    const worker = startCheckpointer(file, { intervalMs: 10, rewindBytes: 64 * 1024 });
    try {
      // the file alone, without its -wal, holds only what a checkpoint copied
      await until(() => rowsCheckpointed(file, "t") === 100, 5000, "a checkpoint");
      // 100 KB of WAL is past the threshold: a RESTART lets the next commit start the WAL over (new salts in its header)
      const salt = () => readFileSync(`${file}-wal`).subarray(16, 24).toString("hex");
      const before = salt();
      await until(() => (insert.run("y"), salt() !== before), 5000, "the WAL to rewind");
    } finally {
      worker.terminate();
    }
  });
});

const skip = missingServices();

describe.skipIf(!!skip)("presence script", () => {
  test("it counts a user once across nodes, announces joined and left once, renames, syncs and drops a node", async () => {
    await using redis = await startRedis();
    const client = new RedisClient(redis.url);
    const listener = new RedisClient(redis.url);
    const heard: FanoutPayload[] = [];
    await listener.subscribe("chat:room:r", (payload) => void heard.push(FanoutCodec.decode(payload)!));
    const run = (...args: string[]) => client.send("EVAL", [PRESENCE_LUA, "0", ...args]);
    const presence = async () => (await client.send("HGETALL", ["chat:presence:r"])) as Record<string, string>;
    try {
      await run("join", "n1", "r", "u1", "Ann");
      await run("join", "n2", "r", "u1", "Ann"); // the same user on a second node: no second joined
      await run("join", "n1", "r", "u1", "Ann"); // a repeat changes nothing
      await run("leave", "n1", "r", "u1"); // still on n2: no left
      expect(await presence()).toEqual({ u1: "Ann" });
      await run("rename", "n2", "u1", "r", "Anna");
      expect(await presence()).toEqual({ u1: "Anna" });
      await run("sync", "n2", JSON.stringify([["r", "u2", "Bob"]])); // n2 now holds only Bob
      await run("drop", "n2");
      expect(await presence()).toEqual({});
      expect(await client.send("SMEMBERS", ["chat:nodes"])).toEqual([]);
      await until(() => heard.length >= 4, 5000, "four announcements");
      expect(heard).toEqual([
        { kind: "presence", change: "joined", user: { id: "u1", name: "Ann" }, frame: "" },
        { kind: "presence", change: "left", user: { id: "u1", name: "Anna" }, frame: "" },
        { kind: "presence", change: "joined", user: { id: "u2", name: "Bob" }, frame: "" },
        { kind: "presence", change: "left", user: { id: "u2", name: "Bob" }, frame: "" },
      ]);
    } finally {
      listener.close();
      client.close();
    }
  });
});
