// Cluster mode: real redis-server, real Postgres and three real server processes on loopback.
import { expect, test } from "bun:test";
import { Client, diffWith, newSession, putName, retryUntilServed, spawnCluster, usersInRoom } from "./helpers.ts";
import { describeWithServices, startPostgres, startRedis } from "./services.ts";

const RATE_LIMIT = "1000/1s";

describeWithServices("cluster", (services) => {

  test("a message from one node reaches members on every node once, with names, presence and renames crossing nodes", async () => {
    await using cluster = await spawnCluster(services, ["lobby-a", "lobby-b", "lobby-c"], { RATE_LIMIT });
    const [a, b, c] = cluster.nodes;
    // a cookie issued by node a is valid on every node
    const alice = await newSession(a.url);
    const bob = await newSession(a.url);
    const carol = await newSession(a.url);
    const ca = await Client.connect(a.url, alice);
    const cb = await Client.connect(b.url, bob);
    const cc = await Client.connect(c.url, carol);
    await ca.join("lobby");
    await cb.join("lobby");
    const { presence } = await cc.join("lobby");
    expect(presence.users.map((u) => u.id).sort()).toEqual([alice.id, bob.id, carol.id].sort());
    expect(await ca.next(diffWith("joins", carol.id))).toMatchObject({ room: "lobby" });

    const sent = await ca.say("lobby", "hello from a");
    expect(sent.user).toEqual({ id: alice.id, name: alice.name });
    for (const client of [cb, cc]) expect(await client.next((f) => f.type === "message")).toEqual(sent);

    // rename on node b reaches rooms on every node
    expect((await putName(b.url, bob.cookie, "Bob")).status).toBe(200);
    for (const client of [ca, cc, cb]) {
      expect(await client.next((f) => f.type === "renamed")).toEqual({ type: "renamed", user: { id: bob.id, name: "Bob" }, previous: bob.name });
    }
    expect((await cb.say("lobby", "I am Bob")).user.name).toBe("Bob");

    // a second tab of alice on node c, then her first closed: presence unchanged; closing both: one leave
    const tab = await Client.connect(c.url, alice);
    await tab.join("lobby");
    await ca.close();
    await tab.say("lobby", "still alice");
    await tab.close();
    for (const client of [cb, cc]) {
      await client.next(diffWith("leaves", alice.id));
      expect(client.people("lobby")).toEqual([bob.id, carol.id].sort());
      expect(client.frames.filter(diffWith("joins", alice.id))).toHaveLength(0);
      expect(client.frames.filter((f) => f.type === "presence_diff" && f.leaves.length > 0)).toHaveLength(1);
      // each message exactly once
      const ids = client.frames.filter((f) => f.type === "message").map((f) => (f as { id: number }).id);
      expect(new Set(ids).size).toBe(ids.length);
    }
    const rooms = (await (await fetch(`${c.url}/api/rooms`)).json()) as { name: string; online: number }[];
    expect(rooms.find((r) => r.name === "lobby")?.online).toBe(2);
    // a room only node b has loaded is listed by node c, from Postgres, with its count from Redis
    await cb.join("side");
    await cb.say("side", "only here");
    const listed = (await (await fetch(`${c.url}/api/rooms`)).json()) as { name: string; online: number; lastId: number; visibility: string }[];
    expect(listed.find((r) => r.name === "side")).toEqual({ name: "side", online: 1, lastId: 1, visibility: "public" });
    const metrics = await (await fetch(`${a.url}/metrics`)).text();
    expect(metrics).toContain('\nchat_node_info{node="lobby-a",cluster="1"} 1\n');
    expect(metrics).toContain("chat_redis_connected 1");
    expect(metrics).toMatch(/chat_fanout_lag_ms \d+/);
  });

  test("each node sends its own presence_diff frames from the cluster's presence: watchers on both nodes end with the same view, at most one diff per interval", async () => {
    await using cluster = await spawnCluster(services, ["diff-a", "diff-b"], { RATE_LIMIT });
    const started = performance.now();
    const watchers = [(await usersInRoom(cluster.nodes[0].url, 1, "diff")), (await usersInRoom(cluster.nodes[1].url, 1, "diff"))];
    const arrivals: { id: string; client: Client }[] = [];
    for (let i = 0; i < 10; i++) {
      const node = cluster.nodes[i % 2];
      const session = await newSession(node.url);
      const client = await Client.connect(node.url, session);
      await client.join("diff");
      arrivals.push({ id: session.id, client });
    }
    // half of them go again; a last arrival's diff carries everything before it
    for (const gone of arrivals.splice(0, 5)) await gone.client.close();
    const last = await usersInRoom(cluster.nodes[0].url, 1, "diff");
    const expected = [...watchers.map((w) => w.sessions[0].id), ...arrivals.map((a) => a.id), last.sessions[0].id].sort();
    for (const { clients: [watcher] } of watchers) {
      await watcher.next(diffWith("joins", last.sessions[0].id), 10_000);
      expect(watcher.people("diff")).toEqual(expected);
      const intervals = (performance.now() - started) / 100;
      expect(watcher.frames.filter((f) => f.type === "presence_diff").length).toBeLessThanOrEqual(Math.ceil(intervals) + 1);
    }
  });

  test("concurrent senders on every node: ids strictly increase and every member sees the same order", async () => {
    await using cluster = await spawnCluster(services, ["race-a", "race-b", "race-c"], { RATE_LIMIT });
    const clients: Client[] = [];
    for (const node of cluster.nodes) clients.push(...(await usersInRoom(node.url, 1, "race")).clients);
    const PER = 60;
    await Promise.all(clients.map(async (client, n) => {
      for (let i = 0; i < PER; i++) client.send({ type: "say", room: "race", text: `n${n}-${i}` });
    }));
    const seen = await Promise.all(clients.map((client) => client.collect("message", PER * 3, 30_000)));
    const order = seen[0].map((m) => `${m.id}:${m.text}`);
    expect(seen[0].map((m) => m.id)).toEqual(Array.from({ length: PER * 3 }, (_, i) => i + 1));
    for (const list of seen) expect(list.map((m) => `${m.id}:${m.text}`)).toEqual(order);
    // each sender's own messages keep their order
    for (let n = 0; n < 3; n++) {
      const mine = seen[0].filter((m) => m.text.startsWith(`n${n}-`)).map((m) => Number(m.text.split("-")[1]));
      expect(mine).toEqual(Array.from({ length: PER }, (_, i) => i));
    }
  });

  test("a client moves from a killed node to another and recovers with no gap or duplicate; the dead node's users leave presence", async () => {
    await using cluster = await spawnCluster(services, ["move-a", "move-b", "move-c"], { RATE_LIMIT });
    const [a, b, c] = cluster.nodes;
    const [alice, bob, dave] = [await newSession(a.url), await newSession(a.url), await newSession(a.url)];
    const writer = await Client.connect(a.url, alice);
    await writer.join("move");
    const mover = await Client.connect(c.url, bob);
    await mover.join("move");
    const stayer = await Client.connect(c.url, dave); // dave has no other node: he must expire
    await stayer.join("move");
    await writer.next(diffWith("joins", dave.id));
    const before = [];
    for (let i = 0; i < 5; i++) before.push(await writer.say("move", `before ${i}`));
    await mover.collect("message", 5);
    c.proc.kill(9);
    await mover.closed;
    for (let i = 0; i < 7; i++) await writer.say("move", `while away ${i}`);
    const back = await Client.connect(b.url, bob);
    const { history } = await back.join("move", before.at(-1)!.id);
    expect(history.complete).toBe(true);
    expect(history.messages.map((m) => m.text)).toEqual(Array.from({ length: 7 }, (_, i) => `while away ${i}`));
    const live = await writer.say("move", "live again");
    expect(await back.next((f) => f.type === "message")).toEqual(live);
    // dave's only node died without cleanup: his membership expires (heartbeat TTL)
    const left = await writer.next(diffWith("leaves", dave.id), 30_000);
    expect(left.room).toBe("move");
    expect(writer.frames.some(diffWith("leaves", bob.id))).toBe(false);
  }, 60_000);

  test("Redis restarts mid-conversation: health says degraded, then chat resumes with nothing lost", async () => {
    await using ownRedis = await startRedis();
    await using cluster = await spawnCluster(services, ["storm-a", "storm-b"], { RATE_LIMIT, REDIS_URL: ownRedis.url });
    const [a, b] = cluster.nodes;
    const { clients: [ca] } = await usersInRoom(a.url, 1, "storm");
    const { clients: [cb] } = await usersInRoom(b.url, 1, "storm");
    await ca.say("storm", "before");
    await cb.next((f) => f.type === "message");
    await ownRedis.stop();
    const health = await (async () => {
      for (const deadline = Date.now() + 10_000; Date.now() < deadline; await Bun.sleep(50)) {
        const h = (await (await fetch(`${a.url}/healthz`)).json()) as { status: string };
        if (h.status !== "ok") return h;
      }
    })();
    expect(health as unknown).toEqual({ status: "degraded", redis: "disconnected" });
    // both sides keep talking during the outage: stored, shown locally, not yet fanned out
    const during = [await ca.say("storm", "during from a"), await cb.say("storm", "during from b")];
    await ownRedis.restart();
    await cb.next((f) => f.type === "message" && f.text === "during from a", 20_000);
    await ca.next((f) => f.type === "message" && f.text === "during from b", 20_000);
    const after = await ca.say("storm", "after");
    await cb.next((f) => f.type === "message" && f.text === "after", 10_000);
    for (const client of [ca, cb]) {
      const ids = client.frames.filter((f) => f.type === "message").map((f) => (f as { id: number }).id);
      expect(ids).toEqual([1, 2, 3, 4]);
    }
    expect(after.id).toBe(4);
    expect(during.map((m) => m.id).sort()).toEqual([2, 3]);
    expect((await (await fetch(`${b.url}/healthz`)).json()) as unknown).toEqual({ status: "ok" });
  }, 60_000);

  test("with Postgres down, say answers unavailable and nothing unstored is broadcast", async () => {
    await using ownPg = await startPostgres();
    await using cluster = await spawnCluster(services, ["db-a", "db-b"], { RATE_LIMIT, DATABASE_URL: await ownPg.createDatabase() });
    const [a, b] = cluster.nodes;
    const { clients: [ca] } = await usersInRoom(a.url, 1, "db");
    const { clients: [cb] } = await usersInRoom(b.url, 1, "db");
    await ca.say("db", "stored");
    await ownPg.stop();
    ca.send({ type: "say", room: "db", text: "lost?", ref: "x" });
    expect(await ca.next((f) => f.type === "error", 20_000)).toMatchObject({ code: "unavailable", ref: "x" });
    await ownPg.start();
    // the pool reconnects: the next message is id 2 everywhere, and "lost?" never appeared
    const next = await retryUntilServed(ca, { type: "say", room: "db", text: "back", ref: "y" }, (f) => f.type === "message" && f.ref === "y");
    expect(next).toMatchObject({ id: 2, text: "back" });
    expect(await cb.next((f) => f.type === "message" && f.text === "back")).toEqual(next as never);
    for (const client of [ca, cb]) expect(client.frames.some((f) => f.type === "message" && f.text === "lost?")).toBe(false);
  }, 60_000);
});
