// The benchmark runs end to end in its tiny configuration and loses nothing. No timing assertions.
import { expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { BUN, ROOT, tempDir } from "./helpers.ts";

test("the quick bench runs every scenario against every server and loses nothing", async () => {
  using tmp = tempDir("chat-bench-test-");
  const out = join(tmp.dir, "results.jsonl");
  const proc = Bun.spawn([BUN, join(ROOT, "bench", "run.ts"), "--quick", "--out", out], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  const timer = setTimeout(() => proc.kill(9), 100_000);
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(timer);
  expect(code, `${stdout}\n${stderr}`).toBe(0);

  const lines = readFileSync(out, "utf8").trim().split("\n").map((l) => JSON.parse(l));
  const runs = new Set(lines.map((l) => `${l.scenario} ${l.target}`));
  for (const scenario of ["flood-8", "rate-8", "idle", "storm"]) {
    for (const target of ["chat", "raw-bun", "node-ws"]) expect(runs.has(`${scenario} ${target}`)).toBe(true);
  }
  expect(runs.has("recovery chat")).toBe(true);
  expect(runs.has("mixed-8 chat")).toBe(true);
  for (const target of ["chat", "floor", "raw-bun"]) expect(runs.has(`restart-storm ${target}`)).toBe(true);

  for (const { scenario, target, error, metrics: m } of lines) {
    const what = `${scenario} ${target}`;
    expect(error, what).toBeNull();
    if (scenario.startsWith("flood-") || scenario.startsWith("rate-") || scenario.startsWith("mixed-")) {
      expect(m.sent, what).toBeGreaterThan(0);
      expect(m.lost, what).toBe(0);
      expect(m.dups, what).toBe(0);
      expect(m.copies, what).toBe(m.expectedCopies);
      expect(m.unexpectedCloses, what).toBe(0);
      expect(m.p99Us, what).toBeGreaterThan(0);
      if (scenario.startsWith("mixed-")) expect(m.changesSent, what).toBeGreaterThan(0);
    } else if (scenario === "idle") {
      expect(m.failed, what).toBe(0);
      expect(m.broadcastLost, what).toBe(0);
      // 200 sockets are too few to weigh: GC can make the difference negative, so only check it was measured
      expect(Number.isFinite(m.kibPerConn), what).toBe(true);
    } else if (scenario === "restart-storm") {
      // every client back with its recovery: 20 missed messages for ours and the floor (raw Bun sends none)
      for (const phase of target === "chat" ? [m.cold, m.warm] : [m.warm]) {
        expect(phase.opened, what).toBe(m.clients);
        if (target !== "raw-bun") expect(phase.historyBytesPerClient, what).toBeGreaterThan(1000);
      }
    } else if (scenario === "storm") {
      expect(m.ok, what).toBe(m.joins);
    } else if (scenario === "recovery") {
      expect(m.valid, what).toBe(true);
      expect(m.plainMessages, what).toBe(50);
    }
  }

  // the table prints from the same file
  const table = Bun.spawnSync([BUN, join(ROOT, "bench", "table.ts"), "--in", out], { cwd: ROOT });
  expect(table.exitCode).toBe(0);
  expect(table.stdout.toString()).toContain("| scenario | metric |");
  // --sha keeps the runs of one server.ts: this run's, and none of a version never measured
  const sha = lines.find((l) => l.target === "chat")!.serverSha;
  const ofSha = Bun.spawnSync([BUN, join(ROOT, "bench", "table.ts"), "--in", out, "--run", "all", "--sha", sha], { cwd: ROOT });
  expect(ofSha.stdout.toString()).toBe(table.stdout.toString());
  const none = Bun.spawnSync([BUN, join(ROOT, "bench", "table.ts"), "--in", out, "--run", "all", "--sha", "not-a-sha"], { cwd: ROOT });
  expect(none.exitCode).toBe(1);
  expect(none.stderr.toString()).toContain("Cannot find run all of server.ts not-a-sha");
}, 120_000);
