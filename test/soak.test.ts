// The soak in its CI length: a thousand churning clients for 60 s against a spawned server, in a
// process of its own; any failed check (memory, open files, empty state, stored history) fails it.
// Longer runs: bun test/soak.ts --duration 600
import { expect, test } from "bun:test";
import { join } from "node:path";
import { BUN, ROOT } from "./helpers.ts";

const DURATION = Number(process.env.SOAK_DURATION ?? 60);
const CLIENTS = Number(process.env.SOAK_CLIENTS ?? 1000);

test(`the soak passes every check: ${CLIENTS} clients churning for ${DURATION} s`, async () => {
  const proc = Bun.spawn([BUN, join(ROOT, "test/soak.ts"), "--duration", String(DURATION), "--clients", String(CLIENTS)], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
  const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  console.log(out.trim());
  if (err.trim()) console.log(err.trim());
  expect(out).toContain("soak: all checks passed");
  expect(code).toBe(0);
}, (DURATION + 200) * 1000);
