// Micro-benchmark of the store's hot commit alone: µs per commit of 1 and 3 rows into the messages table,
// with server.ts's writer settings (WAL, synchronous=NORMAL, no autocheckpoint, a prepared statement).
//   bun bench/commit-bench.ts [--commits N]       (pin it like the bench: taskset -c 0 bun …)
// Under `strace -c -f` it shows the syscalls per commit (pwrite64 and fcntl WAL locks).
import { Database } from "bun:sqlite";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";

const { values } = parseArgs({ args: Bun.argv.slice(2), options: { commits: { type: "string", default: "10000" } } });
const COMMITS = Number(values.commits);
if (!(COMMITS > 0)) throw new Error("Cannot parse --commits: expected a positive number");

function measure(rowsPerCommit: number) {
  const dir = mkdtempSync(join(os.tmpdir(), "commit-bench-"));
  try {
    const file = join(dir, "chat.db");
    const setup = new Database(file);
    setup.run("PRAGMA journal_mode = WAL");
    setup.run(`CREATE TABLE messages (room TEXT NOT NULL, id BIGINT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL,
      text TEXT NOT NULL, ts BIGINT NOT NULL, ref TEXT, PRIMARY KEY (room, id)) WITHOUT ROWID`);
    const db = new Database(file);
    db.run("PRAGMA synchronous = NORMAL");
    db.run("PRAGMA wal_autocheckpoint = 0");
    const insert = db.prepare("INSERT INTO messages (room, id, user_id, name, text, ts, ref) VALUES (?, ?, ?, ?, ?, ?, ?)");
    type Row = { id: number; text: string; ref: string };
    const one = (r: Row) => insert.run("bench", r.id, "uAbCdEfGhIjKl", "user12", r.text, 1764115200000, r.ref);
    const many = db.transaction((rows: Row[]) => rows.forEach(one));
    let id = 0;
    const batches = Array.from({ length: COMMITS }, () =>
      Array.from({ length: rowsPerCommit }, () => ({ id: ++id, text: `0001234567:000000012:${id} hello there`, ref: crypto.randomUUID() })),
    );
    const t0 = performance.now();
    for (const rows of batches) rows.length === 1 ? one(rows[0]) : many(rows);
    const us = ((performance.now() - t0) * 1000) / COMMITS;
    db.close();
    setup.close();
    return us;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

for (const rows of [1, 3]) console.log(`${rows} row(s) per commit: ${measure(rows).toFixed(1)} µs per commit (${COMMITS} commits)`);
