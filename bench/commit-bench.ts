// Micro-benchmark of the store's hot path alone: µs per `store.append` of 1 and 3 messages, through
// server.ts's own openStore on a fresh SQLite file (the prepared insert on its writer connection, WAL,
// the checkpointer thread), as the flush loop calls it once per event-loop turn.
//   taskset -c 0 bun bench/commit-bench.ts [--commits N]
// Under `strace -c -f` it shows the syscalls per commit (pwrite64 and fcntl WAL locks).
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { openStore } from "../server.ts";

const { values } = parseArgs({ args: Bun.argv.slice(2), options: { commits: { type: "string", default: "10000" } } });
const COMMITS = Number(values.commits);
if (!(COMMITS > 0)) throw new Error("Cannot parse --commits: expected a positive number");

async function measure(perCommit: number) {
  const dir = mkdtempSync(join(os.tmpdir(), "commit-bench-"));
  const store = await openStore(`sqlite://${join(dir, "chat.db")}`);
  try {
    const user = { id: "uAbCdEfGhIjKl", name: "user12" };
    let n = 0;
    const batches = Array.from({ length: COMMITS }, () =>
      Array.from({ length: perCommit }, () => ({ room: "bench", user, text: `0001234567:000000012:${++n} hello there`, ts: Date.now(), ref: crypto.randomUUID() })),
    );
    const t0 = performance.now();
    for (const batch of batches) await store.append(batch);
    return ((performance.now() - t0) * 1000) / COMMITS;
  } finally {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

for (const perCommit of [1, 3]) console.log(`${perCommit} message(s) per commit: ${(await measure(perCommit)).toFixed(1)} µs per append (${COMMITS} commits)`);
