// Micro-benchmark of the load client's receive path (framing + text scan + accounting), per frame,
// on 64 KiB reads of chat-server and raw-echo frames: `bun bench/parse-bench.ts`.
import { Client, onFrame } from "./load.ts";

const encoder = new TextEncoder();
const pad = (n: number, w: number) => String(n).padStart(w, "0");
const FRAMES = {
  chat: (i: number) =>
    `{"type":"message","room":"bench","id":${i + 1},"user":{"id":"uAbCdEfGhIjKl","name":"user${i % 64}"},"text":"${pad(1234567, 10)}:${pad(i % 64, 9)}:${pad(i >> 6, 10)}","ts":1764115200000,"ref":"${pad(i >> 6, 10)}"}`,
  raw: (i: number) => `{"type":"say","room":"bench","text":"${pad(1234567, 10)}:${pad(i % 64, 9)}:${pad(i >> 6, 10)}","ref":"${pad(i >> 6, 10)}"}`,
};

for (const [name, make] of [...Object.entries(FRAMES), ...Object.entries(FRAMES)]) {
  const bytes: number[] = [];
  let count = 0;
  while (bytes.length < 65_000) {
    const t = encoder.encode(make(count++));
    bytes.push(0x81, ...(t.length < 126 ? [t.length] : [126, t.length >> 8, t.length & 255]), ...t);
  }
  const chunk = new Uint8Array(bytes);
  const c = new Client(1_000_000, "sid=x") as any;
  c.state = 1;
  c.flush = () => {};
  c.got = new Int32Array(64);
  const reps = 5000;
  const t0 = performance.now();
  for (let k = 0; k < reps; k++) {
    c.got.fill(0);
    c.receive(chunk);
  }
  const ns = ((performance.now() - t0) * 1e6) / (reps * count);
  console.log(`${name}: ${ns.toFixed(0)} ns per frame (${count} frames of ~${Math.round(chunk.length / count)} bytes per read)`);
  void onFrame;
}
process.exit(0);
