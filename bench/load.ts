// The load client: a worker process driven over IPC by bench/run.ts. It holds many connections
// (bench/ws-client.ts), joins rooms, floods or sends at a fixed rate, and accounts every copy:
// latency from the send time embedded in the text, and per-sender sequence numbers per receiver.
//
// Bench messages are `{"type":"say","room":"bench","text":"<µs>:<sender>:<seq>","ref":"<seq>"}` with
// fixed-width digit fields; <µs> counts from BENCH_BASE_US (set by run.ts, the same for all workers of
// a repetition). The chat server answers with `{"type":"message",…,"text":"…",…}` and the raw baselines echo the
// say frame, so frames are told apart by the byte after `{"type":"`, and the text is found by scanning
// for `"text":"` (it cannot occur unescaped inside a JSON string, and no earlier key of these frames is
// named text). No frame is turned into a string or JSON-parsed on the hot path.
//
// With `protocol: "socket.io"` (bench/cluster.ts) the same client speaks Socket.IO 4 over a plain WebSocket
// (`/socket.io/?EIO=4&transport=websocket`): it answers Engine.IO's open packet `0{…}` with `40` (connect to
// the namespace), pings `2` with `3`, joins with `42["join","<room>"]` (answered `42["joined",…]`) and says
// `42["say",{"room":"bench","text":"…"}]`, which comes back as `42["message",{…,"text":"…"}]`: the same text,
// found and accounted the same way, so no socket.io-client is measured.
import { Conn, nowUs, READS } from "./ws-client.ts";
import { Histogram } from "./lib.ts";

/** The sender id of the idle scenario's broadcast messages, outside the range of client ids. */
const BROADCAST_SENDER = 999_999_999;
const BASE_US = Number(process.env.BENCH_BASE_US ?? nowUs());

const decoder = new TextDecoder();

type JoinWaiter = { resolve: (r: JoinResult) => void; reject: (e: Error) => void; historyUs: number; historyBytes: number; history: string | null };
type JoinResult = { historyUs: number; historyBytes: number; history: string | null };

// A say frame rewritten in place for each send (no string, no encoder):
// {"type":"say","room":"bench","text":"<10-digit µs>:<9-digit sender>:<10-digit seq>","ref":"<10-digit seq>"}
// or, for Socket.IO, 42["say",{"room":"bench","text":"<10-digit µs>:<9-digit sender>:<10-digit seq>"}]
type Protocol = "chat" | "socket.io";
type Template = { bytes: Uint8Array; usAt: number; senderAt: number; seqAt: number; refAt: number };
const BENCH_TEXT = `${"0".repeat(10)}:${"0".repeat(9)}:${"0".repeat(10)}`;
function template(head: string, tail: string, refAt: (textEnd: number) => number): Template {
  const usAt = head.length;
  return { bytes: new TextEncoder().encode(head + BENCH_TEXT + tail), usAt, senderAt: usAt + 11, seqAt: usAt + 21, refAt: refAt(usAt + BENCH_TEXT.length) };
}
const TEMPLATES: Record<Protocol, Template> = {
  chat: template('{"type":"say","room":"bench","text":"', `","ref":"${"0".repeat(10)}"}`, (end) => end + '","ref":"'.length),
  "socket.io": template('42["say",{"room":"bench","text":"', '"}]', () => -1),
};
const PATHS: Record<Protocol, string> = { chat: "/chat", "socket.io": "/socket.io/?EIO=4&transport=websocket" };
/** the protocol of this worker's connections (set by `open`) */
let protocol: Protocol = "chat";
/** connections are spread over this many nodes (id % nodes); copies between nodes are timed apart */
let nodes = 1;

function putDigits(b: Uint8Array, at: number, width: number, v: number) {
  for (let i = at + width - 1; i >= at; i--) {
    const q = Math.floor(v / 10);
    b[i] = 48 + (v - q * 10);
    v = q;
  }
}

/** Microseconds since BENCH_BASE_US, as sent in the text (10 digits). */
function sendStamp(): number {
  return Math.min(9_999_999_999, Math.max(0, Math.round(nowUs() - BASE_US)));
}

// Horspool skip table for `"text":"`: look at the pattern's last byte, jump by how far its last
// occurrence is from the end (8 when the byte is not in the pattern).
const PATTERN = [0x22, 0x74, 0x65, 0x78, 0x74, 0x22, 0x3a, 0x22];
const SKIP = new Uint8Array(256).fill(8);
for (let k = 0; k < 7; k++) SKIP[PATTERN[k]] = 7 - k;

/** The offset right after `"text":"` in b[s..e), or -1. */
function findText(b: Uint8Array, s: number, e: number): number {
  const last = e - 8;
  let j = s + 9;
  while (j <= last) {
    const c = b[j + 7];
    if (c === 0x22 && b[j] === 0x22 && b[j + 1] === 0x74 && b[j + 2] === 0x65 && b[j + 3] === 0x78 && b[j + 4] === 0x74 && b[j + 5] === 0x22 && b[j + 6] === 0x3a) return j + 8;
    j += SKIP[c];
  }
  return -1;
}

/** `width` decimal digits at b[j…] as a number, or -1 if one is not a digit. */
function digits(b: Uint8Array, j: number, width: number): number {
  let v = 0;
  for (let k = 0; k < width; k++) {
    const d = b[j + k] - 48;
    if (d >>> 0 > 9) return -1;
    v = v * 10 + d;
  }
  return v;
}

class Client extends Conn {
  tpl = TEMPLATES[protocol];
  say = this.tpl.bytes.slice();
  welcomed = Promise.withResolvers<void>();
  joins: JoinWaiter[] = [];
  captureHistory = false;
  limit = Infinity;
  // the mixed flood: the newest own message (what an edit or reaction targets), the newest seq seen and read
  lastOwnId = 0;
  lastSeq = 0;
  readSeq = 0;
  says = 0;
  constructor(id: number, cookie: string) {
    super(id, cookie);
    putDigits(this.say, this.tpl.senderAt, 9, id);
    this.path = PATHS[protocol];
    this.onText = (protocol === "chat" ? onFrame : onSocketIoFrame) as never;
    this.welcomed.promise.catch(() => {});
    void this.closed.promise.then(() => {
      const why = new Error(`connection ${id} closed (${this.closeCode || "no close frame"}${this.error ? `: ${this.error}` : ""})`);
      this.welcomed.reject(why);
      for (const j of this.joins.splice(0)) j.reject(why);
      if (stopping) return;
      unexpectedCloses++;
      noteError(why.message);
    });
  }

  /** Joins a room: resolves when history and presence arrived. */
  join(room: string, since?: number): Promise<JoinResult> {
    const { promise, resolve, reject } = Promise.withResolvers<JoinResult>();
    this.joins.push({ resolve, reject, historyUs: 0, historyBytes: 0, history: null });
    if (protocol === "socket.io") this.sendText(`42["join","${room}"]`);
    else this.sendText(since === undefined ? `{"type":"join","room":"${room}"}` : `{"type":"join","room":"${room}","since":${since}}`);
    return promise;
  }
}

// ── Worker state ──

let conns: Client[] = [];
let stopping = false;
let unexpectedCloses = 0;
let mode: "idle" | "flood" | "rate" | "populate" = "idle";
let window = 1;
let measuring = false;
let hist = new Histogram();
/** latency of the copies that crossed from the sender's node to another (nodes > 1) */
let crossHist = new Histogram();
let copies = 0;
let gaps = 0;
let dups = 0;
let foreign = 0;
let otherFrames = 0;
let errorFrames = 0;
let firstError: string | null = null;
/** the mixed flood: after every CHANGE_EVERY-th say an edit or reaction of the sender's newest message (so 1 frame
 * in CHANGE_EVERY + 1 is a change), and a read of the newest seq seen every `readMs` */
let mixed: { changeEvery: number; readMs: number } | null = null;
let changes = 0;
let reads = 0;
let updates = 0; // updated frames received (each copy of an edit or reaction)
let readTimer: Timer | null = null;
const broadcasts = new Map<number, { count: number; firstUs: number; lastUs: number }>();

function noteError(message: string) {
  firstError ??= message.slice(0, 500);
}

function sendBench(c: Client) {
  const seq = c.sent++;
  c.inFlight++;
  const b = c.say;
  const t = c.tpl;
  putDigits(b, t.usAt, 10, sendStamp());
  putDigits(b, t.seqAt, 10, seq);
  if (t.refAt >= 0) putDigits(b, t.refAt, 10, seq);
  c.queueUtf8(b, b.length);
  if (mixed && ++c.says % mixed.changeEvery === 0 && c.lastOwnId > 0) sendChange(c);
}

/** An edit or a reaction (on, then off) of the sender's newest message, in turn; outside the window. */
function sendChange(c: Client) {
  const k = changes++;
  const id = c.lastOwnId;
  if (k % 2 === 0) c.queueText(`{"type":"edit","room":"bench","id":${id},"text":"edited ${k}"}`);
  else c.queueText(`{"type":"react","room":"bench","id":${id},"emoji":"👍","on":${k % 4 === 1}}`);
}

// {"type":"message","room":"bench","id":<id>,…: where the id of a bench message frame starts
const ID_AT = '{"type":"message","room":"bench","id":'.length;

/** The id of a bench message frame (its seq too: a new message's seq is its id), or 0. */
function messageId(b: Uint8Array, s: number, e: number): number {
  let v = 0;
  for (let j = s + ID_AT; j < e; j++) {
    const d = b[j] - 48;
    if (d >>> 0 > 9) break;
    v = v * 10 + d;
  }
  return v;
}

/** Every text frame of every connection comes here, as a byte range of the TCP read. */
function onFrame(c: Client, b: Uint8Array, s: number, e: number, now: number) {
  if (e - s < 12 || b[s] !== 0x7b) return void otherFrames++;
  const t = b[s + 9]; // the first letter of the type
  if (t === 0x6d /* message */ || t === 0x73 /* say, echoed by the raw servers */) return onBenchMessage(c, b, s, e, now);
  switch (t) {
    case 0x77: // welcome
      return c.welcomed.resolve();
    case 0x75: // updated: a copy of an edit or reaction
      return void updates++;
    case 0x68: {
      // history
      const j = c.joins[0];
      if (!j) return void otherFrames++;
      j.historyUs = now;
      j.historyBytes = e - s;
      if (c.captureHistory) j.history = decoder.decode(b.subarray(s, e));
      return;
    }
    case 0x70: {
      // presence (not presence_diff, which can arrive between a join's history and its presence): the end of a join
      if (b[s + 17] !== 0x22) return void otherFrames++;
      const j = c.joins.shift();
      if (!j) return void otherFrames++;
      return j.resolve({ historyUs: j.historyUs, historyBytes: j.historyBytes, history: j.history });
    }
    case 0x65: {
      // error: a refused say gives its window slot back, a refused join fails
      errorFrames++;
      const text = decoder.decode(b.subarray(s, e));
      noteError(text);
      const j = c.joins[0];
      if (j && !text.includes('"ref"')) {
        c.joins.shift();
        return j.reject(new Error(text));
      }
      if (c.inFlight > 0) {
        c.inFlight--;
        refill(c);
      }
      return;
    }
    default:
      otherFrames++; // presence_diff, typing, renamed
  }
}

/** Socket.IO's packets: Engine.IO open (0), ping (2), and Socket.IO's connect (40), event (42), connect error (44). */
function onSocketIoFrame(c: Client, b: Uint8Array, s: number, e: number, now: number) {
  const t = b[s];
  if (t === 0x32 /* 2 */ && e - s === 1) return c.queueText("3"); // flushed after this read
  if (t === 0x30 /* 0 */) return c.queueText("40");
  if (t !== 0x34 /* 4 */ || e - s < 2) return void otherFrames++;
  switch (b[s + 1]) {
    case 0x32: // 42["message",…] or 42["joined",…]
      if (b[s + 4] === 0x6d) return onBenchMessage(c, b, s, e, now);
      if (b[s + 4] === 0x6a) return void c.joins.shift()?.resolve({ historyUs: now, historyBytes: 0, history: null });
      return void otherFrames++;
    case 0x30: // 40{"sid":…}: connected to the namespace
      return c.welcomed.resolve();
    case 0x34: // 44{"message":…}: refused
      errorFrames++;
      return noteError(decoder.decode(b.subarray(s, e)));
    default:
      otherFrames++;
  }
}

function onBenchMessage(c: Client, b: Uint8Array, s: number, e: number, now: number) {
  // text: <10-digit µs>:<9-digit sender>:<10-digit seq>"
  const i = findText(b, s, e);
  if (i < 0 || i + 32 > e || b[i + 10] !== 0x3a || b[i + 20] !== 0x3a || b[i + 31] !== 0x22) return void foreign++;
  const sendUs = digits(b, i, 10);
  const sender = digits(b, i + 11, 9);
  const seq = digits(b, i + 21, 10);
  if (sendUs < 0 || sender < 0 || seq < 0) return void foreign++;

  if (sender === BROADCAST_SENDER) {
    let r = broadcasts.get(seq);
    if (!r) broadcasts.set(seq, (r = { count: 0, firstUs: now, lastUs: now }));
    r.count++;
    r.lastUs = now;
    return;
  }
  copies++;
  if (mixed) {
    const id = messageId(b, s, e);
    if (id > c.lastSeq) c.lastSeq = id;
    if (sender === c.id) c.lastOwnId = id;
  }
  if (measuring) {
    const latencyUs = now - BASE_US - sendUs;
    hist.record(latencyUs);
    secondHist.record(latencyUs);
    if (nodes > 1 && sender % nodes !== c.id % nodes) crossHist.record(latencyUs);
  }
  const got = c.got;
  if (got !== null && sender < got.length) {
    const g = got[sender];
    if (seq === g) got[sender] = g + 1;
    else if (seq > g) {
      gaps += seq - g;
      got[sender] = seq + 1;
    } else dups++;
  }
  if (sender === c.id) {
    c.inFlight--;
    refill(c);
  }
}

function refill(c: Client) {
  if (mode !== "flood" && mode !== "populate") return;
  while (c.inFlight < window && c.sent < c.limit) sendBench(c);
}

// ── Commands ──

async function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: Timer | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms} ms`)), ms)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function waitFor(check: () => boolean, ms: number, what: string) {
  const deadline = performance.now() + ms;
  while (!check()) {
    if (performance.now() > deadline) throw new Error(`${what}: timed out after ${ms} ms`);
    await Bun.sleep(2);
  }
}

type OpenArgs = {
  host: string; port: number; cookies: string[]; firstId: number; count: number; rooms: string[]; groups: number; concurrency: number; timeoutMs: number;
  /** a cluster's nodes: connection `id` goes to ports[id % ports.length] */
  ports?: number[];
  protocol?: Protocol;
  since?: number;
};

/** Opens `count` connections (ids firstId…), each waits for welcome then joins its rooms in turn (with `since`, if given). */
async function open(a: OpenArgs) {
  protocol = a.protocol ?? "chat";
  const ports = a.ports ?? [a.port];
  nodes = ports.length;
  const latency = new Histogram();
  let failed = 0;
  let historyBytes = 0;
  let next = 0;
  const t0 = performance.now();
  const one = async (i: number) => {
    const id = a.firstId + i;
    const c = new Client(id, a.cookies[id % a.cookies.length]);
    const start = nowUs();
    try {
      await c.connect(a.host, ports[id % ports.length]);
      await c.welcomed.promise;
      for (const room of a.rooms) {
        const joined = await c.join(room.replace("{g}", `g${id % a.groups}`), a.since);
        historyBytes += joined.historyBytes; // after the await: `x += await …` would add to a stale x
      }
      latency.record(nowUs() - start);
      conns.push(c);
    } catch (error) {
      failed++;
      noteError(String(error));
      c.socket?.terminate();
    }
  };
  const before = conns.length;
  const lanes = Array.from({ length: Math.min(a.concurrency, a.count) }, async () => {
    while (next < a.count) await one(next++);
  });
  await withTimeout(Promise.all(lanes), a.timeoutMs, `open ${a.count}`).catch((error) => {
    noteError(String(error));
    failed = a.count - (conns.length - before);
  });
  conns.sort((x, y) => x.id - y.id);
  return { opened: a.count - failed, failed, ms: performance.now() - t0, latency: latency.summary(), historyBytes, firstError };
}

/** Starts flooding (each connection keeps `window` of its own messages in flight) or a fixed total rate
 * (from every connection, or only from those whose id is a multiple of `sendEvery`: in a cluster, node 0's);
 * `mixed` adds edits, reactions and reads to a flood. */
function start(a: { mode: "flood" | "rate"; window: number; rate: number; senders: number; sendEvery?: number; mixed?: { changeEvery: number; readMs: number } }) {
  mode = a.mode;
  window = a.window;
  copies = gaps = dups = foreign = 0;
  changes = reads = updates = 0;
  mixed = a.mixed ?? null;
  if (mixed) readTimer = setInterval(sendReads, mixed.readMs);
  for (const c of conns) {
    c.got = new Int32Array(a.senders);
    c.sent = 0;
    c.inFlight = 0;
    c.limit = Infinity;
  }
  if (mode === "flood") {
    for (const c of conns) {
      refill(c);
      c.flush();
    }
    return { started: conns.length };
  }
  // fixed rate: a 1 ms tick sends what is due, round robin over the connections
  const t0 = performance.now();
  let total = 0;
  let rr = 0;
  const from = conns.filter((c) => c.id % (a.sendEvery ?? 1) === 0);
  rateTimer = setInterval(() => {
    const due = Math.floor(((performance.now() - t0) * a.rate) / 1000) - total;
    const touched = new Set<Client>();
    for (let k = 0; k < due; k++) {
      const c = from[rr++ % from.length];
      sendBench(c);
      touched.add(c);
    }
    total += Math.max(0, due);
    for (const c of touched) c.flush();
  }, 1);
  return { started: conns.length };
}
let rateTimer: Timer | null = null;

/** Each connection that saw new messages since its last read says it read up to the newest. */
function sendReads() {
  for (const c of conns) {
    if (c.lastSeq <= c.readSeq) continue;
    c.readSeq = c.lastSeq;
    c.queueText(`{"type":"read","room":"bench","seq":${c.lastSeq}}`);
    c.flush();
    reads++;
  }
}

let markAt = 0;
let markCopies = 0;
let markUpdates = 0;
/** copies per 100 ms of the measured window: shows stalls that an average hides */
let timeline: number[] = [];
/** p99 latency of each second of the measured window: tells a steady tail from periodic stalls */
let secondHist = new Histogram();
let p99PerSecondUs: number[] = [];
let timelineTimer: Timer | null = null;
function markStart() {
  hist = new Histogram();
  crossHist = new Histogram();
  secondHist = new Histogram();
  p99PerSecondUs = [];
  measuring = true;
  markAt = performance.now();
  markCopies = copies;
  markUpdates = updates;
  timeline = [];
  let last = copies;
  timelineTimer = setInterval(() => {
    timeline.push(copies - last);
    last = copies;
    if (timeline.length % 10 === 0) {
      p99PerSecondUs.push(secondHist.quantile(0.99));
      secondHist = new Histogram();
    }
  }, 100);
  return {};
}
function markEnd() {
  measuring = false;
  clearInterval(timelineTimer!);
  const ms = performance.now() - markAt;
  return { copies: copies - markCopies, updates: updates - markUpdates, ms, hist: hist.toJSON(), crossHist: crossHist.toJSON(), timeline, p99PerSecondUs };
}

/** Stops sending, waits until every connection has its own messages back and copies stop arriving. */
async function stop(a: { expectAll?: boolean; drainMs: number }) {
  if (rateTimer) clearInterval(rateTimer);
  rateTimer = null;
  if (readTimer) clearInterval(readTimer);
  readTimer = null;
  const wasMixed = mixed !== null;
  mixed = null;
  const wasMode = mode;
  mode = "idle";
  // every connection is a member of the room, so each one gets every message sent from this process
  const expected = a.expectAll ? conns.reduce((n, c) => n + c.sent, 0) * conns.length : undefined;
  const deadline = performance.now() + a.drainMs;
  let last = -1;
  let quietSince = performance.now();
  while (performance.now() < deadline) {
    const inFlight = conns.reduce((n, c) => n + c.inFlight, 0);
    if (copies !== last) {
      last = copies;
      quietSince = performance.now();
    }
    if (inFlight === 0 && (expected === undefined ? performance.now() - quietSince > 300 : copies >= expected)) break;
    if (performance.now() - quietSince > 3000) break; // nothing moves any more: report what is missing
    await Bun.sleep(5);
  }
  return {
    mode: wasMode,
    copies,
    sent: conns.map((c) => [c.id, c.sent]),
    got: conns.map((c) => Array.from(c.got ?? [])),
    inFlight: conns.reduce((n, c) => n + c.inFlight, 0),
    gaps,
    dups,
    foreign,
    errorFrames,
    unexpectedCloses,
    firstError,
    reads: READS.reads,
    bytesRead: READS.bytes,
    ...(wasMixed ? { changes, readFrames: reads, updates } : {}),
  };
}

/** Sends `count` messages from the first connection to a room (window in flight) and waits for all. */
async function populate(a: { count: number; window: number; timeoutMs: number }) {
  const c = conns[0];
  mode = "populate";
  window = a.window;
  c.sent = 0;
  c.inFlight = 0;
  c.limit = a.count;
  refill(c);
  c.flush();
  await waitFor(() => c.sent === a.count && c.inFlight === 0, a.timeoutMs, "populate");
  mode = "idle";
  return { sent: c.sent, errorFrames, firstError };
}

/** Repeats a join on a warm connection; returns the round trips join → history. */
async function history(a: { room: string; since?: number; reps: number; timeoutMs: number }) {
  const c = conns[0];
  const rtt = new Histogram();
  const samples: number[] = [];
  let first: { messages: number; complete: boolean; firstId: number; lastId: number; contiguous: boolean; bytes: number } | null = null;
  const deadline = performance.now() + a.timeoutMs;
  c.sendText(`{"type":"leave","room":"${a.room}"}`); // the connection joined its rooms when it opened
  for (let i = 0; i < a.reps && performance.now() < deadline; i++) {
    c.captureHistory = i === 0;
    const t0 = nowUs();
    const r = await withTimeout(c.join(a.room, a.since), 10_000, "join");
    c.sendText(`{"type":"leave","room":"${a.room}"}`); // a join of a room already joined would send no history
    rtt.record(r.historyUs - t0);
    samples.push(r.historyUs - t0);
    if (i === 0) {
      const h = JSON.parse(r.history!) as { messages: { id: number }[]; complete: boolean };
      const ids = h.messages.map((m) => m.id);
      first = {
        messages: ids.length, complete: h.complete, firstId: ids[0] ?? 0, lastId: ids.at(-1) ?? 0,
        contiguous: ids.every((id, k) => k === 0 || id === ids[k - 1] + 1), bytes: r.historyBytes,
      };
    }
  }
  c.captureHistory = false;
  return { reps: samples.length, rtt: rtt.summary(), first };
}

function broadcast(a: { k: number }) {
  const stamp = sendStamp();
  const text = `${String(stamp).padStart(10, "0")}:${BROADCAST_SENDER}:${String(a.k).padStart(10, "0")}`;
  conns[0].sendText(`{"type":"say","room":"bench","text":"${text}","ref":"b${a.k}"}`);
  return { sendUs: stamp + BASE_US };
}

async function awaitBroadcast(a: { k: number; expected: number; timeoutMs: number }) {
  await waitFor(() => (broadcasts.get(a.k)?.count ?? 0) >= a.expected, a.timeoutMs, `broadcast ${a.k}`).catch(() => {});
  return broadcasts.get(a.k) ?? { count: 0, firstUs: NaN, lastUs: NaN };
}

async function closeAll() {
  stopping = true;
  const all = conns;
  conns = [];
  for (const c of all) c.close();
  await withTimeout(Promise.all(all.map((c) => c.closed.promise)), 10_000, "close").catch(() => {
    for (const c of all) c.socket?.terminate();
  });
  stopping = false;
  return { closed: all.length };
}

const COMMANDS: Record<string, (args: any) => unknown> = {
  open, start, markStart, markEnd, stop, populate, history, broadcast, awaitBroadcast, closeAll,
  counters: () => ({ copies, errorFrames, unexpectedCloses, firstError, conns: conns.length }),
};

if (process.send) {
  process.on("message", async (msg: { id: number; cmd: string; args: unknown }) => {
    if (msg.cmd === "exit") {
      for (const c of conns) c.socket?.terminate();
      process.exit(0);
    }
    try {
      const run = COMMANDS[msg.cmd];
      if (!run) throw new Error(`unknown command ${msg.cmd}`);
      process.send!({ id: msg.id, result: await run(msg.args ?? {}) });
    } catch (error) {
      process.send!({ id: msg.id, error: String(error instanceof Error ? error.stack ?? error.message : error) });
    }
  });
  process.on("disconnect", () => process.exit(0));
  process.send({ ready: true });
}

/** For micro-benchmarks of the frame path (bench/parse-bench.ts). */
export { Client, onFrame, sendBench, COMMANDS };
