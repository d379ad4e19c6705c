// Slow and dead consumers: a reader that stops reading is cut off at the backpressure limit
// without costing the server memory or the others a message; a peer that vanishes without a
// close frame is found by pings and leaves presence. Spawned servers, raw TCP clients.
import { describe, expect, test } from "bun:test";
import { BUN, Client, diffWith, newSession, rawInRoom, spawnServer, tempDir, until, usersInRoom } from "./helpers.ts";
import { RawSocket } from "./raw.ts";
import { countEchoes, metric, rssMiB } from "./probes.ts";

const SLOW = 8; // readers that stop reading
const MESSAGES = 20_000;
const TEXT = 2000; // characters per message (MAX_TEXT): 20,000 of them are ~40 MB for each reader
const WINDOW = 32; // unconfirmed messages per sender, so the readers that do read never fall 1 MiB behind

describe("slow consumers", () => {
  test("a reader that stops reading is closed past 1 MiB; memory stays bounded, /metrics counts it, and everyone else gets every message", async () => {
    using tmp = tempDir();
    await using child = await spawnServer({ DATABASE_URL: `sqlite://${tmp.dir}/chat.db`, RATE_LIMIT: "1000000/1s" });
    const { clients: [senderA, senderB, reader] } = await usersInRoom(child.url, 3, "flood");
    const slow: RawSocket[] = [];
    for (let i = 0; i < SLOW; i++) {
      const raw = await rawInRoom(child.url, (await newSession(child.url)).cookie, "flood");
      raw.pause();
      slow.push(raw);
    }
    // a warm-up round, then the baseline
    await senderA.say("flood", "warm-up");
    const baseline = rssMiB(child.proc.pid);
    let peak = baseline;
    const sampler = setInterval(() => (peak = Math.max(peak, rssMiB(child.proc.pid))), 25);

    const text = "x".repeat(TEXT - 8);
    await Promise.all([senderA, senderB].map(async (sender, s) => {
      const echoes = countEchoes(sender);
      for (let i = 0; i < MESSAGES / 2; i++) {
        sender.send({ type: "say", room: "flood", text: `${s}:${String(i).padStart(5, "0")} ${text}` });
        if (i >= WINDOW) await echoes.atLeast(i - WINDOW + 1);
      }
    }));
    const messagesOf = (c: Client) => c.frames.filter((f) => f.type === "message");
    await until(() => [senderA, senderB, reader].every((c) => messagesOf(c).length >= MESSAGES + 1), 60_000, "every message at every reader");
    clearInterval(sampler);
    const got = [senderA, senderB, reader].map(messagesOf);

    // everyone who reads got every message, in order
    for (const list of got) expect(list.map((m) => m.id)).toEqual(Array.from({ length: MESSAGES + 1 }, (_, i) => i + 1));
    // the readers that stopped were cut off and counted, and are gone from presence
    await until(async () => (await metric(child.url, "chat_connections")) === 3, 10_000, "the slow readers to be closed");
    expect(await metric(child.url, "chat_slow_consumers_closed_total")).toBe(SLOW);
    const rooms = (await (await fetch(`${child.url}/api/rooms`, { headers: { cookie: (await newSession(child.url)).cookie } })).json()) as { name: string; online: number }[];
    expect(rooms.find((r) => r.name === "flood")?.online).toBe(3);
    // unbounded queues would hold ~40 MB per stopped reader (~320 MB); bounded, they hold 1 MiB each
    const perReaderMiB = (MESSAGES * TEXT) / 2 ** 20;
    console.log(`slow consumers: rss ${baseline.toFixed(0)} → peak ${peak.toFixed(0)} MiB; unbounded would add ~${(SLOW * perReaderMiB).toFixed(0)} MiB`);
    expect(peak - baseline).toBeLessThan((SLOW * perReaderMiB) / 3);
    // once they read again they find the connection closed, having received only part of the flood
    for (const raw of slow) {
      raw.socket.resume();
      await raw.closed;
      expect(raw.texts().filter((m) => m.type === "message").length).toBeLessThan(MESSAGES);
    }
  }, 120_000);
});

describe("dead peers", () => {
  test("a peer that stops answering (half-open) is dropped by the ping timeout and leaves presence; an idle live one stays", async () => {
    using tmp = tempDir();
    // Bun rounds idle timeouts under 8 s up to 8 s
    await using child = await spawnServer({ DATABASE_URL: `sqlite://${tmp.dir}/chat.db`, IDLE_TIMEOUT: "4" });
    const { clients: [watcher, idle] } = await usersInRoom(child.url, 2, "room");
    // the ghost runs in its own process, so it can be frozen: the kernel keeps its TCP connection, nothing answers pings
    const ghost = await newSession(child.url);
    const code = `
      const ws = new WebSocket(process.env.CHAT_URL, { headers: { cookie: process.env.CHAT_COOKIE } });
      ws.onmessage = (e) => {
        const m = JSON.parse(e.data);
        if (m.type === "welcome") ws.send(JSON.stringify({ type: "join", room: "room" }));
        if (m.type === "presence") console.log("joined");
      };`;
    const proc = Bun.spawn([BUN, "-e", code], { env: { ...process.env, CHAT_URL: `${child.url.replace("http", "ws")}/chat`, CHAT_COOKIE: ghost.cookie }, stdout: "pipe" });
    try {
      await proc.stdout.getReader().read();
      await watcher.next(diffWith("joins", ghost.id));
      expect(await metric(child.url, "chat_connections")).toBe(3);
      proc.kill("SIGSTOP");
      const left = await watcher.next((f) => f.type === "presence_diff" && f.leaves.length > 0, 40_000);
      expect(left).toEqual({ type: "presence_diff", room: "room", joins: [], leaves: [{ id: ghost.id, name: ghost.name }] });
      expect(await metric(child.url, "chat_connections")).toBe(2);
      // the idle client said nothing for at least as long, but answered the pings: still here
      expect(idle.ws.readyState).toBe(WebSocket.OPEN);
      expect(watcher.people("room")).not.toContain(ghost.id);
      expect(watcher.people("room")).toHaveLength(2);
      const rooms = (await (await fetch(`${child.url}/api/rooms`, { headers: { cookie: ghost.cookie } })).json()) as { name: string; online: number }[];
      expect(rooms.find((r) => r.name === "room")?.online).toBe(2);
      expect((await idle.say("room", "still here")).text).toBe("still here");
    } finally {
      proc.kill("SIGKILL");
      await proc.exited;
    }
  }, 60_000);
});
