// The HTTP surface's small promises: JSON bodies only as JSON, nosniff everywhere, errors that echo
// nothing, /metrics kept to operators, and a /healthz that notices when the store cannot write.
import { describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import pkg from "../package.json" with { type: "json" };
import { Client, newSession, serve, tempDir, until, usersInRoom } from "./helpers.ts";
import type { Family } from "parse-prometheus-text-format";
import { scrape } from "./probes.ts";

describe("http", () => {
  test("a JSON body must say it is JSON: text/plain, form data and no content type get 415, and nothing changes", async () => {
    await using chat = await serve();
    const alice = await newSession(chat.url);
    const body = JSON.stringify({ name: "Mallory" });
    for (const type of ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonp", undefined]) {
      const headers: Record<string, string> = { cookie: alice.cookie };
      if (type) headers["content-type"] = type;
      const res = await fetch(`${chat.url}/api/me`, { method: "PUT", headers, body });
      expect({ type, status: res.status }).toEqual({ type, status: 415 });
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("unsupported_media_type");
    }
    const me = (await (await fetch(`${chat.url}/api/me`, { headers: { cookie: alice.cookie } })).json()) as { name: string };
    expect(me.name).toBe(alice.name);
    const ok = await fetch(`${chat.url}/api/me`, { method: "PUT", headers: { cookie: alice.cookie, "content-type": "application/json; charset=utf-8" }, body });
    expect(ok.status).toBe(200);
  });

  test("every response says nosniff, and error bodies never repeat the request", async () => {
    await using chat = await serve();
    const probe = "<script>alert(1)</script>";
    const answers = await Promise.all([
      fetch(`${chat.url}/`),
      fetch(`${chat.url}/api/me`),
      fetch(`${chat.url}/healthz`),
      fetch(`${chat.url}/metrics`),
      fetch(`${chat.url}/chat`),
      fetch(`${chat.url}/${encodeURIComponent(probe)}`),
      fetch(`${chat.url}/api/rooms/${encodeURIComponent(probe)}/messages`),
      fetch(`${chat.url}/api/rooms/room/messages?limit=${encodeURIComponent(probe)}`),
    ]);
    for (const res of answers) {
      expect({ url: res.url, nosniff: res.headers.get("x-content-type-options") }).toEqual({ url: res.url, nosniff: "nosniff" });
      const text = await res.text();
      if (res.status >= 400) {
        expect(res.headers.get("content-type")).toStartWith("application/json");
        expect(text).not.toContain("script");
        expect(text).not.toContain("alert");
      }
    }
    expect(answers.map((r) => r.status)).toEqual([200, 200, 200, 200, 426, 404, 400, 400]);
  });

  test("/metrics answers this machine only; a forwarded request, or any request once METRICS_TOKEN is set, needs the token", async () => {
    {
      await using chat = await serve();
      expect((await fetch(`${chat.url}/metrics`)).status).toBe(200);
      // a proxy on the same machine forwards everyone's requests from loopback
      expect((await fetch(`${chat.url}/metrics`, { headers: { "x-forwarded-for": "203.0.113.9" } })).status).toBe(403);
      const text = await (await fetch(`${chat.url}/metrics`)).text();
      expect(text).not.toContain(String(process.pid)); // the node id is random, not the pid
    }
    {
      const token = "a-metrics-token-of-some-length";
      await using chat = await serve({ metricsToken: token });
      expect((await fetch(`${chat.url}/metrics`)).status).toBe(403);
      expect((await fetch(`${chat.url}/metrics`, { headers: { authorization: `Bearer ${token}x` } })).status).toBe(403);
      expect((await fetch(`${chat.url}/metrics`, { headers: { authorization: `Bearer ${token}` } })).status).toBe(200);
    }
  });

  test("/metrics reads as Prometheus text to a real parser: process, build, event-loop lag, two histograms, rate limits by reason", async () => {
    await using chat = await serve({ rateLimit: "1/60s" });
    const { clients: [a] } = await usersInRoom(chat.url, 1, "room");
    await a.say("room", "stored and delivered");
    a.send({ type: "say", room: "room", text: "one too many", ref: "r2" });
    await a.next((f) => f.type === "error" && f.ref === "r2");
    const families = await scrape(chat.url);
    for (const [name, family] of families) {
      expect(name).toMatch(/^[a-zA-Z_:][a-zA-Z0-9_:]*$/);
      if (family.type === "COUNTER") expect(name).toEndWith("_total");
      for (const m of family.metrics) if (m.value !== undefined) expect(Number.isFinite(Number(m.value))).toBe(true);
    }
    const one = (name: string, type: Family["type"]) => {
      const family = families.get(name);
      expect({ name, type: family?.type }).toEqual({ name, type });
      return family!.metrics;
    };
    expect(Number(one("process_cpu_seconds_total", "COUNTER")[0].value)).toBeGreaterThan(0);
    expect(Number(one("process_resident_memory_bytes", "GAUGE")[0].value)).toBeGreaterThan(1 << 20);
    expect(Number(one("process_open_fds", "GAUGE")[0].value)).toBeGreaterThan(2);
    expect(Number(one("process_max_fds", "GAUGE")[0].value)).toBeGreaterThan(2);
    const started = Number(one("process_start_time_seconds", "GAUGE")[0].value);
    expect(started).toBeLessThanOrEqual(Date.now() / 1000 + 1);
    expect(started).toBeGreaterThan(Date.now() / 1000 - 24 * 3600);
    expect(one("chat_build_info", "GAUGE")).toEqual([{ value: "1", labels: { version: pkg.version, bun: Bun.version } }]);
    expect(Number(one("chat_event_loop_lag_seconds", "GAUGE")[0].value)).toBeGreaterThanOrEqual(0);
    for (const [name, least] of [["chat_delivery_seconds", 1], ["chat_frame_handling_seconds", 3]] as const) {
      const [h] = one(name, "HISTOGRAM");
      expect(Number(h.count)).toBeGreaterThanOrEqual(least);
      expect(Number(h.sum)).toBeGreaterThan(0);
      // by bound (an object lists integer keys like "1" first)
      const counts = Object.entries(h.buckets!).sort(([x], [y]) => Number(x.replace("+Inf", "Infinity")) - Number(y.replace("+Inf", "Infinity"))).map(([, n]) => Number(n));
      expect(counts).toEqual(counts.toSorted((x, y) => x - y)); // cumulative
      expect(h.buckets!["+Inf"]).toBe(h.count!);
    }
    const limited = Object.fromEntries(one("chat_rate_limited_total", "COUNTER").map((m) => [m.labels!.reason, Number(m.value)]));
    expect(Object.keys(limited).sort()).toEqual(["history", "join", "read", "rename", "renames_per_address", "say", "say_per_address", "scrollback", "typing"]);
    expect(limited).toMatchObject({ say: 1, join: 0, rename: 0 });
    expect(one("chat_refused_total", "COUNTER").map((m) => m.labels!.reason)).toContain("say_per_address");
  });

  test("METRICS_PORT serves /metrics on its own loopback listener and removes it from the chat port", async () => {
    await using chat = await serve({ metricsPort: 0 });
    expect((await fetch(`${chat.url}/metrics`)).status).toBe(404);
    const res = await fetch(`http://127.0.0.1:${chat.metricsPort}/metrics`);
    expect(res.status).toBe(200);
    expect(await res.text()).toContain("chat_connections 0");
    expect((await fetch(`http://127.0.0.1:${chat.metricsPort}/api/me`)).status).toBe(404);
  });
});

// a full disk needs a small filesystem of its own: root mounts a tmpfs (CI runs as root)
const canMount = process.getuid?.() === 0;

describe.skipIf(!canMount)("a full disk", () => {
  test("/healthz turns 503 degraded while the store cannot write, say answers unavailable, and both recover when space is back", async () => {
    using tmp = tempDir();
    const mnt = `${tmp.dir}/small`;
    mkdirSync(mnt);
    expect(spawnSync("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt]).status).toBe(0);
    try {
      await using chat = await serve({ databaseUrl: `sqlite://${mnt}/chat.db` });
      const alice = await newSession(chat.url);
      const a = await Client.connect(chat.url, alice);
      await a.join("room");
      await a.say("room", "before");
      expect(await (await fetch(`${chat.url}/healthz`)).json()).toEqual({ status: "ok" });
      // fill the disk to the last byte
      const filler = `${mnt}/filler`;
      for (let size = 4 * 1024 * 1024; size >= 512; size = Math.floor(size / 2)) {
        try {
          writeFileSync(`${filler}-${size}`, Buffer.alloc(size));
        } catch {}
      }
      const degraded = await until(async () => {
        const res = await fetch(`${chat.url}/healthz`);
        return res.status === 503 ? res.json() : undefined;
      }, 10_000, "/healthz to notice the full disk");
      expect(degraded).toEqual({ status: "degraded", store: "failing" });
      a.send({ type: "say", room: "room", text: "x".repeat(2000), ref: "full" });
      expect(await a.next((f) => f.type === "error" && f.ref === "full", 10_000)).toMatchObject({ code: "unavailable" });
      spawnSync("sh", ["-c", `rm -f ${filler}-*`]);
      await until(async () => (await fetch(`${chat.url}/healthz`)).status === 200, 10_000, "/healthz to recover");
      expect((await a.say("room", "after")).text).toBe("after");
    } finally {
      spawnSync("umount", ["-l", mnt]);
      rmSync(mnt, { recursive: true, force: true });
    }
  });
});
