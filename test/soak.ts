// Soak: about a thousand clients connect, join, talk, leave and disconnect over and over against a
// spawned server (loopback only, bounded in time, stops by itself), while the server's memory and
// open files are sampled. Then everyone leaves and the checks run; exit code 0 only if all pass.
//
//   bun test/soak.ts [--duration 90] [--clients 1000] [--rooms 50] [--seed 1] [--json] [--server file.ts]
//
// Checks (each printed with its numbers):
//   rss-plateau     after a warm-up third, RSS stops growing: the last third's lowest sample (after a GC) is
//                   within 10% + 4 MiB of the middle third's, and its highest within 15% + 8 MiB of the middle third's
//   fds-baseline    open files return to the count before the first client (± 5) once everyone left
//   empty           /metrics chat_connections 0 and chat_rooms 0, every room in /api/rooms online 0
//   stored          every message any client received (live or in history) is stored, identical
//   echoed          every say that was echoed is stored
//   in-order        within each membership, ids continue exactly (history, then live; no gap, no duplicate)
//   no-errors       no error frame, no frame outside the schema, no close the client did not start
import { parseArgs } from "node:util";
import { ServerMessage } from "../server.ts";
import { spawnServer, tempDir, type Session } from "./helpers.ts";
import { metric, openFds, prng, rssMiB, storedHistory, type Message } from "./probes.ts";

export type SoakOptions = { duration: number; clients: number; rooms: number; seed?: number; server?: string; log?: (line: string) => void };
export type Check = { name: string; ok: boolean; detail: string };
export type SoakResult = { ok: boolean; checks: Check[]; stats: Record<string, number>; samples: { t: number; rss: number; fds: number }[] };

const TEXTS = ["hi", "hello there", "👋 ok", "שלום", "<b>not bold</b>", "'; --", "a\nb", "x".repeat(200), "ümlaut é", "🇺🇦🎉"];

/** Runs the soak and returns every check; never throws for a failed check. */
export async function runSoak({ duration, clients, rooms, seed = 1, server, log = () => {} }: SoakOptions): Promise<SoakResult> {
  using tmp = tempDir("chat-soak-");
  // RECOVERY_LIMIT 100: the rooms' in-memory tails fill in the warm-up third, so growth after it means a leak
  // every client is on loopback: one address, so its history budget is lifted
  const env = { DATABASE_URL: `sqlite://${tmp.dir}/chat.db`, RATE_LIMIT: "100/1s", RECOVERY_LIMIT: "100", HISTORY_BYTES_PER_ADDRESS: "1000000000/1s" };
  await using child = await spawnServer(env, server ? [process.execPath, server] : undefined);
  const pid = child.proc.pid;
  const url = child.url;
  const wsUrl = `${url.replace("http", "ws")}/chat`;
  const r = prng(seed);
  const roomNames = Array.from({ length: rooms }, (_, i) => `room${i}`);
  const violations = new Map<string, { count: number; example: string }>();
  const violate = (kind: string, example: string) => {
    const v = violations.get(kind) ?? { count: 0, example };
    v.count++;
    violations.set(kind, v);
  };
  const delivered = new Map<string, Map<number, string>>(); // room → id → the message as received
  const echoed: { room: string; id: number }[] = [];
  const stats = { connections: 0, joins: 0, rejoinsWithSince: 0, says: 0, leaves: 0, abruptCloses: 0, framesReceived: 0, freshSessions: 0 };

  /** A new session as newSession() gets one, but on a connection that closes, so no idle HTTP socket skews the file count. */
  async function newSession(baseUrl: string): Promise<Session> {
    const res = await fetch(`${baseUrl}/api/me`, { headers: { connection: "close" } });
    const me = (await res.json()) as { id: string; name: string; registered: boolean; admin: boolean };
    return { cookie: res.headers.get("set-cookie")!.split(";")[0], ...me };
  }
  // sessions first (one per client; some cycles use a fresh one), then the baseline
  const sessions: Session[] = [];
  for (let i = 0; i < clients; i += 50) sessions.push(...(await Promise.all(Array.from({ length: Math.min(50, clients - i) }, () => newSession(url)))));
  const lastSeen = new Map<string, number>(); // `${client}:${room}` → last id seen while a member
  const baseline = { rss: rssMiB(pid), fds: openFds(pid) };
  log(`soak: ${clients} clients, ${rooms} rooms, ${duration} s; server pid ${pid}, baseline rss ${baseline.rss.toFixed(1)} MiB, ${baseline.fds} fds`);

  const samples: SoakResult["samples"] = [];
  const start = performance.now();
  const deadline = start + duration * 1000;
  const sampler = setInterval(() => {
    try {
      samples.push({ t: (performance.now() - start) / 1000, rss: rssMiB(pid), fds: openFds(pid) });
    } catch {}
  }, 1000);
  const progress = setInterval(() => {
    const s = samples.at(-1);
    if (s) log(`  t=${s.t.toFixed(0)}s rss ${s.rss.toFixed(1)} MiB, ${s.fds} fds, ${stats.connections} connections so far, ${stats.says} says`);
  }, 10_000);

  /** One connection's life: connect, join 1–3 rooms, say a few things, maybe leave one, close (sometimes abruptly). */
  async function cycle(client: number) {
    const fresh = r.chance(0.1);
    const session = fresh ? await newSession(url) : sessions[client];
    if (fresh) stats.freshSessions++;
    const ws = new WebSocket(wsUrl, { headers: { cookie: session.cookie } } as never);
    const members = new Map<string, number>(); // room → next expected id
    const waiters = new Set<{ pred: (m: ServerMessage) => boolean; resolve: (m: ServerMessage) => void }>();
    let closing = false;
    const closed = Promise.withResolvers<void>();
    const wait = (pred: (m: ServerMessage) => boolean, what: string, ms = 15_000) =>
      new Promise<ServerMessage>((resolve, reject) => {
        const w = { pred, resolve: (m: ServerMessage) => (clearTimeout(timer), waiters.delete(w), resolve(m)) };
        const timer = setTimeout(() => (waiters.delete(w), reject(new Error(`timed out waiting for ${what}`))), ms);
        waiters.add(w);
      });
    const record = (m: Message) => {
      const json = JSON.stringify(m);
      const room = delivered.get(m.room) ?? new Map<number, string>();
      const known = room.get(m.id);
      if (known !== undefined && known !== json) violate("two different messages with one id", `${known} vs ${json}`);
      room.set(m.id, json);
      delivered.set(m.room, room);
      lastSeen.set(`${client}:${m.room}`, Math.max(lastSeen.get(`${client}:${m.room}`) ?? 0, m.id));
    };
    ws.onmessage = (e) => {
      stats.framesReceived++;
      const parsed = ServerMessage.safeParse(JSON.parse(e.data as string));
      if (!parsed.success) return violate("frame outside the schema", String(e.data).slice(0, 200));
      const m = parsed.data;
      if (m.type === "error") violate(`error ${m.code}`, JSON.stringify(m));
      if (m.type === "history") {
        const since = pendingSince.get(m.room);
        let next = since === undefined ? (m.messages[0]?.id ?? 1) : since + 1;
        if (since !== undefined && !m.complete) next = m.messages[0]?.id ?? next;
        for (const h of m.messages) {
          if (h.id !== next) violate("history out of order", `${m.room}: expected ${next}, got ${h.id}`);
          next = h.id + 1;
          record(h);
        }
        members.set(m.room, next);
      } else if (m.type === "message") {
        const next = members.get(m.room);
        if (next === undefined) return; // a message from before our leave took effect
        if (m.id !== next) violate("live message out of order", `${m.room}: expected ${next}, got ${m.id}`);
        members.set(m.room, m.id + 1);
        record(m);
      }
      for (const w of waiters) if (w.pred(m)) w.resolve(m);
    };
    ws.onclose = (e) => {
      if (!closing) violate("closed by the server", `code ${e.code} ${e.reason}`);
      closed.resolve();
    };
    const pendingSince = new Map<string, number>();
    try {
      await wait((m) => m.type === "welcome", "welcome");
      stats.connections++;
      const chosen = new Set<string>();
      for (let n = 1 + r.int(3); chosen.size < n; ) chosen.add(r.pick(roomNames));
      for (const room of chosen) {
        const last = lastSeen.get(`${client}:${room}`);
        const since = !fresh && last !== undefined && r.chance(0.5) ? last : undefined;
        if (since !== undefined) {
          pendingSince.set(room, since);
          stats.rejoinsWithSince++;
        }
        ws.send(JSON.stringify(since === undefined ? { type: "join", room } : { type: "join", room, since }));
        await wait((m) => m.type === "presence" && m.room === room, `presence in ${room}`);
        pendingSince.delete(room);
        stats.joins++;
      }
      const says = 1 + r.int(4);
      for (let k = 0; k < says && performance.now() < deadline; k++) {
        await Bun.sleep(500 + r.int(2500)); // pacing: people type at human speed
        if (ws.readyState !== WebSocket.OPEN) break;
        const room = r.pick([...chosen]);
        const ref = `${client}-${stats.says++}`;
        ws.send(JSON.stringify({ type: "say", room, text: r.pick(TEXTS), ref }));
        const echo = (await wait((m) => m.type === "message" && m.ref === ref, `echo of ${ref}`)) as Message;
        echoed.push({ room: echo.room, id: echo.id });
      }
      if (r.chance(0.3)) {
        const room = r.pick([...chosen]);
        members.delete(room);
        ws.send(JSON.stringify({ type: "leave", room }));
        stats.leaves++;
      }
    } catch (error) {
      violate("client step failed", String(error));
    } finally {
      closing = true;
      if (r.chance(0.2)) {
        stats.abruptCloses++;
        (ws as unknown as { terminate(): void }).terminate(); // Bun's client: drop TCP without a close frame
      } else ws.close(1000);
      await Promise.race([closed.promise, Bun.sleep(15_000)]);
    }
  }

  await Promise.all(Array.from({ length: clients }, async (_, client) => {
    await Bun.sleep(client * (3000 / clients)); // ramp up over 3 s
    while (performance.now() < deadline) {
      await cycle(client);
      await Bun.sleep(r.int(1000));
    }
  }));
  const ran = (performance.now() - start) / 1000;
  clearInterval(progress);

  // everyone has gone: the server must be back to empty
  const checks: Check[] = [];
  const settle = async (what: () => Promise<boolean>, ms: number) => {
    const until = Date.now() + ms;
    while (!(await what()) && Date.now() < until) await Bun.sleep(100);
    return what();
  };
  const get = (path: string) => fetch(`${url}${path}`, { headers: { cookie: sessions[0].cookie, connection: "close" } });
  const emptyNow = async () => (await metric(url, "chat_connections")) === 0 && (await metric(url, "chat_rooms")) === 0;
  const empty = await settle(emptyNow, 15_000);
  const roomList = (await (await get("/api/rooms")).json()) as { name: string; online: number }[];
  const busy = roomList.filter((x) => x.online !== 0);
  checks.push({
    name: "empty",
    ok: empty && busy.length === 0,
    detail: `chat_connections ${await metric(url, "chat_connections")}, chat_rooms ${await metric(url, "chat_rooms")}, rooms online ≠ 0: ${busy.length ? JSON.stringify(busy) : "none"}`,
  });
  await settle(async () => openFds(pid) <= baseline.fds + 5, 10_000);
  const fdsEnd = openFds(pid);
  checks.push({ name: "fds-baseline", ok: Math.abs(fdsEnd - baseline.fds) <= 5, detail: `${baseline.fds} before, ${fdsEnd} after; peak ${Math.max(...samples.map((s) => s.fds))}` });
  clearInterval(sampler);

  // memory: split the run into thirds; the first is warm-up
  const third = (k: number) => samples.filter((s) => s.t >= (ran * k) / 3 && s.t < (ran * (k + 1)) / 3);
  const peakOf = (xs: typeof samples) => Math.max(...xs.map((s) => s.rss));
  const troughOf = (xs: typeof samples) => Math.min(...xs.map((s) => s.rss));
  const [middle, last] = [third(1), third(2)];
  const troughLimit = troughOf(middle) * 1.1 + 4;
  const peakLimit = peakOf(middle) * 1.15 + 8;
  checks.push({
    name: "rss-plateau",
    ok: middle.length >= 3 && last.length >= 3 && troughOf(last) <= troughLimit && peakOf(last) <= peakLimit,
    detail: `baseline ${baseline.rss.toFixed(1)} MiB; middle third ${troughOf(middle).toFixed(1)}–${peakOf(middle).toFixed(1)}, last third ${troughOf(last).toFixed(1)}–${peakOf(last).toFixed(1)} (limits ${troughLimit.toFixed(1)}, ${peakLimit.toFixed(1)}); end ${samples.at(-1)?.rss.toFixed(1)}`,
  });

  // every message anyone received, and every echoed say, is stored exactly as received
  const stored = new Map<string, Map<number, string>>();
  for (const room of roomNames) stored.set(room, new Map((await storedHistory(url, room, sessions[0].cookie)).map((m) => [m.id, JSON.stringify(m)])));
  let missing = 0;
  let differ = 0;
  let example = "";
  for (const [room, messages] of delivered) {
    for (const [id, json] of messages) {
      const s = stored.get(room)?.get(id);
      if (s === undefined) missing++;
      else if (s !== json) differ++;
      if (s !== json && !example) example = `${json} vs stored ${s}`;
    }
  }
  const deliveredCount = [...delivered.values()].reduce((n, m) => n + m.size, 0);
  const storedCount = [...stored.values()].reduce((n, m) => n + m.size, 0);
  checks.push({ name: "stored", ok: missing === 0 && differ === 0 && deliveredCount > 0, detail: `${deliveredCount} distinct messages received, ${storedCount} stored; ${missing} missing, ${differ} different ${example}` });
  const unstored = echoed.filter((e) => !stored.get(e.room)?.has(e.id)).length;
  checks.push({ name: "echoed", ok: unstored === 0 && echoed.length > 0, detail: `${echoed.length} echoed says, ${unstored} not stored` });
  const order = ["history out of order", "live message out of order", "two different messages with one id"].map((k) => violations.get(k)?.count ?? 0);
  checks.push({ name: "in-order", ok: order.every((n) => n === 0), detail: `violations: history ${order[0]}, live ${order[1]}, conflicting ids ${order[2]}` });
  const other = [...violations].filter(([k]) => !k.includes("out of order") && !k.startsWith("two different"));
  checks.push({ name: "no-errors", ok: other.length === 0, detail: other.length ? other.map(([k, v]) => `${k} ×${v.count} (e.g. ${v.example.slice(0, 160)})`).join("; ") : "none" });

  const result = {
    ok: checks.every((c) => c.ok),
    checks,
    stats: { ...stats, seconds: Math.round(ran), messagesStored: storedCount, frames: stats.framesReceived },
    samples,
  };
  return result;
}

if (import.meta.main) {
  const { values } = parseArgs({
    options: {
      duration: { type: "string", default: "90" },
      clients: { type: "string", default: "1000" },
      rooms: { type: "string", default: "50" },
      seed: { type: "string", default: "1" },
      server: { type: "string" }, // another server file, e.g. a copy with a planted leak, to see the checks fail
      json: { type: "boolean", default: false },
    },
  });
  const options = { duration: Number(values.duration), clients: Number(values.clients), rooms: Number(values.rooms), seed: Number(values.seed), server: values.server };
  // a bound on the whole run, whatever happens
  const watchdog = setTimeout(() => {
    console.error("soak: watchdog expired");
    process.exit(2);
  }, (options.duration + 180) * 1000);
  watchdog.unref();
  const result = await runSoak({ ...options, log: (line) => console.log(line) });
  for (const c of result.checks) console.log(`${c.ok ? "ok  " : "FAIL"} ${c.name.padEnd(13)} ${c.detail}`);
  console.log(`stats: ${JSON.stringify(result.stats)}`);
  if (values.json) console.log(JSON.stringify(result));
  console.log(result.ok ? "soak: all checks passed" : "soak: FAILED");
  process.exit(result.ok ? 0 : 1);
}
