// Bad input: tens of thousands of generated frames against live servers, and raw WebSocket
// protocol abuse. The seed is fixed and printed; FUZZ_SEED=<n> replays a run, FUZZ_FRAMES=<n> resizes it.
import { describe, expect, test } from "bun:test";
import { newSession, rawInRoom, serve, spawnCluster, spawnServer, tempDir, usersInRoom } from "./helpers.ts";
import { FUZZ_MAX_TEXT, runFuzz } from "./fuzz.ts";
import { encodeFrame, OP, RawSocket } from "./raw.ts";
import { describeWithServices } from "./services.ts";
import { metric } from "./probes.ts";

const SEED = Number(process.env.FUZZ_SEED ?? 20_251_126);
const FRAMES = Number(process.env.FUZZ_FRAMES ?? 30_000);
const FUZZ_ENV = { RATE_LIMIT: "1000000/1s", JOIN_LIMIT: "1000000/1s", MAX_TEXT: String(FUZZ_MAX_TEXT) };

describe("fuzz", () => {
  test("every generated frame gets its error or its echo; bystanders hear only accepted messages; the store keeps them byte for byte", async () => {
    console.log(`fuzz seed ${SEED}, ${FRAMES} frames (replay: FUZZ_SEED=${SEED} bun test test/fuzz.test.ts)`);
    using tmp = tempDir();
    await using child = await spawnServer({ ...FUZZ_ENV, DATABASE_URL: `sqlite://${tmp.dir}/chat.db` });
    const stats = await runFuzz({ seed: SEED, frames: FRAMES, chaos: Math.round(FRAMES / 6), url: child.url, bystanderUrls: [child.url, child.url] });
    console.log(`fuzz: ${JSON.stringify(stats)}`);
    expect(stats.valid).toBeGreaterThan(FRAMES / 4);
    expect(stats.refused).toBeGreaterThan(FRAMES / 2);
    // afterwards the server answers and a newcomer chats as usual
    expect((await fetch(`${child.url}/healthz`)).status).toBe(200);
    const { clients: [late] } = await usersInRoom(child.url, 1, "fuzz");
    expect((await late.say("fuzz", "still fine")).text).toBe("still fine");
    expect(child.proc.exitCode).toBeNull();
  }, 240_000);

  test("a frame of exactly 64 KiB is read; one byte more closes with 1009, and nobody else notices", async () => {
    await using chat = await serve({ maxText: 32_000 });
    const session = await newSession(chat.url);
    const { clients: [other] } = await usersInRoom(chat.url, 1, "room");
    const frameOf = (size: number) => {
      const base = JSON.stringify({ type: "say", room: "room", text: "" }).length;
      return new TextEncoder().encode(JSON.stringify({ type: "say", room: "room", text: "x".repeat(size - base) }));
    };
    const fits = await rawInRoom(chat.url, session.cookie, "room");
    fits.send(encodeFrame(OP.text, frameOf(64 * 1024)));
    // read, parsed and refused for MAX_TEXT (32,000): the frame itself was fine
    expect(await fits.next((m) => m.type === "error")).toMatchObject({ code: "bad_request", message: expect.stringContaining("longer than 32000") });
    fits.send(encodeFrame(OP.text, frameOf(64 * 1024 + 1)));
    expect(await fits.closed).toEqual({ code: 1009, reason: expect.any(String) });
    expect((await other.say("room", "unaffected")).id).toBe(1);
    expect(other.frames.filter((f) => f.type === "error")).toEqual([]);
  });

  test("invalid UTF-8 closes with 1007, protocol violations with 1002; the server and everyone else carry on", async () => {
    await using chat = await serve();
    const session = await newSession(chat.url);
    const { clients: [bystander] } = await usersInRoom(chat.url, 1, "room");
    const text = (s: string) => new TextEncoder().encode(s);
    const say = text(JSON.stringify({ type: "say", room: "room", text: "x" }));
    const cases: [string, Uint8Array, number][] = [
      ["invalid UTF-8 (0xff)", encodeFrame(OP.text, new Uint8Array([0x7b, 0xff, 0x7d])), 1007],
      ["an overlong encoding of /", encodeFrame(OP.text, new Uint8Array([0xc0, 0xaf])), 1007],
      ["a UTF-8 encoded surrogate", encodeFrame(OP.text, new Uint8Array([0xed, 0xa0, 0x80])), 1007],
      ["a truncated sequence", encodeFrame(OP.text, new Uint8Array([0x61, 0xe2, 0x82])), 1007],
      ["invalid UTF-8 split over fragments", new Uint8Array([...encodeFrame(OP.text, new Uint8Array([0x61, 0xe2]), { fin: false }), ...encodeFrame(OP.continuation, new Uint8Array([0x28]))]), 1007],
      ["a close reason in invalid UTF-8", encodeFrame(OP.close, new Uint8Array([0x03, 0xe8, 0xff])), 1007],
      ["an unmasked frame", encodeFrame(OP.text, say, { mask: false }), 1002],
      ["a reserved bit without an extension", encodeFrame(OP.text, say, { rsv: 4 }), 1002],
      ["a reserved opcode", encodeFrame(3, say), 1002],
      ["a control frame over 125 bytes", encodeFrame(OP.ping, new Uint8Array(126)), 1002],
      ["a fragmented control frame", encodeFrame(OP.ping, new Uint8Array(2), { fin: false }), 1002],
      ["a continuation with nothing to continue", encodeFrame(OP.continuation, say), 1002],
      ["a close code that may not be sent", encodeFrame(OP.close, new Uint8Array([0x03, 0xed])), 1002],
      ["a one-byte close payload", encodeFrame(OP.close, new Uint8Array([0x03])), 1002],
    ];
    for (const [what, bytes, code] of cases) {
      const raw = await rawInRoom(chat.url, session.cookie, "room");
      raw.send(bytes);
      const closed = await raw.closed;
      expect({ what, code: closed.code }).toEqual({ what, code });
      // nothing of it reached the room
      expect(raw.texts().some((m) => m.type === "message")).toBe(false);
    }
    // half a frame, then the connection drops
    const cut = await RawSocket.open(chat.url, { cookie: session.cookie });
    await cut.next((m) => m.type === "welcome");
    cut.send(encodeFrame(OP.text, text(JSON.stringify({ type: "say", room: "room", text: "y".repeat(5000) }))).slice(0, 100));
    cut.destroy();
    expect((await bystander.say("room", "all good")).id).toBe(1);
    expect(bystander.frames.filter((f) => f.type === "message").map((f) => (f as { text: string }).text)).toEqual(["all good"]);
    expect(bystander.frames.some((f) => f.type === "error")).toBe(false);
    expect(await metric(chat.url, "chat_messages_received_total")).toBe(1);
  });
});

describeWithServices("fuzz, cluster", (services) => {

  test("fuzzing a cluster node: Postgres keeps every accepted text byte for byte, and bystanders on both nodes hear exactly those", async () => {
    await using cluster = await spawnCluster(services, ["fuzz-a", "fuzz-b"], FUZZ_ENV);
    const [a, b] = cluster.nodes;
    const frames = Math.round(FRAMES / 5);
    const stats = await runFuzz({ seed: SEED + 1, frames, chaos: Math.round(frames / 5), url: a.url, bystanderUrls: [a.url, b.url] });
    console.log(`fuzz, cluster: ${JSON.stringify(stats)}`);
    expect(stats.valid).toBeGreaterThan(frames / 4);
    for (const node of [a, b]) expect(await metric(node.url, "chat_store_errors_total")).toBe(0);
    const { clients: [late] } = await usersInRoom(b.url, 1, "fuzz");
    expect((await late.say("fuzz", "still fine")).text).toBe("still fine");
  }, 120_000);
});
