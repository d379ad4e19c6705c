// A replayable fuzzer for the chat protocol: generated frames with what the server must answer,
// and a run against live servers that checks the answers, the bystanders and the stored history.
import { Client, newSession, until } from "./helpers.ts";
import { metric, prng, storedHistory, type Message, type Random } from "./probes.ts";

/** MAX_TEXT of the fuzzed servers: raised, so long valid texts near the 64 KiB frame limit are tried too. */
export const FUZZ_MAX_TEXT = 20_000;
const FRAME_LIMIT = 64 * 1024;
/** Rooms the fuzzer and the bystanders join; "constructor" checks that room names are never object keys. */
export const FUZZ_ROOMS = ["fuzz", "constructor"] as const;

// the server's rule written out independently: C0 but tab and newline, DEL, C1, U+2028/2029
const CONTROL = /[\u0000-\u0008\u000B-\u001F\u007F-\u009F\u2028\u2029]/;

/** Pieces that show nothing: text made only of these is refused, anywhere else they are fine. */
const INVISIBLE_PIECES = [
  " ", "\t", "\n", "\u00A0", "\u3000", "\u200F", "\u200E", "\u202E", "\u202D", "\u2066", "\u2069", "\u061C", "\u200B", "\u200C", "\u200D",
  "\u2060", "\uFEFF", "\u00AD", "\u034F", "\uFE0F", "\u180E", "\u115F", "\u1160", "\u3164", "\uFFA0", "\u{E0041}", "\u{E007F}", "\u2800",
];
/** Text pieces a valid message is built from: every Unicode edge, markup and SQL. */
const PIECES = [
  "hello", "a", "😀", "👩‍👩‍👧‍👦", "🇺🇦", "👍🏽", "\u{1F600}\u{FE0F}", "\u{10FFFF}", "\u{1D11E}", "𝓗", "\u{E000}",
  "שלום", "مرحبا", "ﷺ", "e\u0301", "Z\u0334\u0321\u032A\u0354\u0344", "\u0410dmin", "https://\u0430pple.com/",
  "\uFFFE", "\uFFFF", "\uFFFD", ...INVISIBLE_PIECES,
  "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "'; DROP TABLE messages; --", "\" OR 1=1 --", "' OR ''='",
  "%00", "%s%n%x", "\\", "\\u0000", "\\\"", "\\ud800", "`${process.exit()}`", "{{7*7}}", "../../etc/passwd", "null", "undefined",
  '{"type":"say"}', "&amp;&lt;&#0;", "__proto__", "constructor", "room:fuzz",
];
/** Pieces a text or ref may not hold: CR, C1 controls, line and paragraph separators. */
const CONTROL_PIECES = ["\r\n", "\r", "\u0085", "\u0080", "\u009B", "\u009F", "\u2028", "\u2029"];
/** Keys that must never reach an object's prototype, and other unknown keys. */
const ODD_KEYS = ["__proto__", "constructor", "prototype", "toString", "hasOwnProperty", "", "extra", "Type", "type ", "\u0000", "😀", "id", "user", "ts", "valueOf"];
const BAD_ROOMS = ["", "Room", "ROOM", "-room", "_room", "room!", "ro om", "x".repeat(33), "😀", "__proto__", "room\u0000", "room/..", "r\u200B", "１"];
const BAD_TYPES = ["Say", "SAY", "say ", " say", "welcome", "message", "error", "history", "__proto__", "constructor", "toString", "", "sayy"];
const WRONG_VALUES: unknown[] = [0, -1, 1.5, 1e308, -1e308, true, false, null, [], {}, ["say"], { type: "say" }, "", [[[[[]]]]]];
const BAD_NAMES = ["", "   ", "\t", "x".repeat(33), "a\u0000b", "a\u0007", "a\u007F", "a\u0085b", "a\u2028b", "a\u009Fb",
  "\u202Enimda", "ad\u200Bmin", "\u0410dmin", "\u200B\u200B", "\u3164", "Z\u0334\u0321\u032A\u0354\u0344", "a\u00A0b", "\u2066x\u2069"];
const TYPES = ["join", "leave", "say", "typing", "nick"] as const;

/** What the server must answer to one frame: an error with this code (and ref), or the echo of this message. */
export type Expect = { error: "bad_request" | "not_joined"; ref?: string } | { say: { room: string; text: string; ref?: string } };
export type Case = { frame: string | Uint8Array; expect: Expect };

const isRef = (v: unknown): v is string => typeof v === "string" && v.length <= 64 && !CONTROL.test(v) && v.isWellFormed();
const byteLength = (s: string) => Buffer.byteLength(s);

/** Encodes a JSON string with random (valid) escaping: \uXXXX for any code point, short escapes, \/. */
function jsonString(s: string, r: Random): string {
  let out = '"';
  for (const ch of s) {
    const code = ch.codePointAt(0)!;
    const escape = code < 0x20 || r.chance(0.08);
    if (ch === '"') out += '\\"';
    else if (ch === "\\") out += "\\\\";
    else if (ch === "/" && r.chance(0.3)) out += "\\/";
    else if (escape && r.chance(0.5) && SHORT[ch]) out += SHORT[ch];
    else if (escape) {
      const units = code > 0xffff ? [ch.charCodeAt(0), ch.charCodeAt(1)] : [code];
      for (const u of units) out += "\\u" + (r.chance(0.5) ? u.toString(16).toUpperCase() : u.toString(16)).padStart(4, "0");
    } else out += ch;
  }
  return out + '"';
}
const SHORT: Record<string, string> = { "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f" };

/** A raw JSON value: strings through jsonString; `raw` for text that is spliced in as is. */
type Raw = { raw: string };
function jsonValue(v: unknown, r: Random): string {
  if (v && typeof v === "object" && "raw" in (v as object)) return (v as Raw).raw;
  if (typeof v === "string") return jsonString(v, r);
  if (Array.isArray(v)) return `[${v.map((x) => jsonValue(x, r)).join(",")}]`;
  if (v && typeof v === "object") return jsonObject(Object.entries(v), r);
  return JSON.stringify(v);
}
const SPACES = ["", "", "", " ", "\n", "\t", "\r\n", "  "];
/** An object from [key, value] pairs in the given order, with random whitespace; keys like __proto__ stay own keys. */
function jsonObject(pairs: [string, unknown][], r: Random): string {
  const ws = () => r.pick(SPACES);
  return `{${ws()}${pairs.map(([k, v]) => `${jsonString(k, r)}${ws()}:${ws()}${jsonValue(v, r)}`).join(`${ws()},${ws()}`)}${ws()}}`;
}
function shuffle<T>(items: T[], r: Random): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = r.int(i + 1);
    [items[i], items[j]] = [items[j], items[i]];
  }
  return items;
}

function validText(r: Random, long = false): string {
  const target = long ? 1 + r.int(FUZZ_MAX_TEXT) : 1 + r.int(r.chance(0.8) ? 40 : 400);
  let text = "";
  let visible = false;
  while (text.length < target) {
    const piece = r.pick(PIECES);
    visible ||= !INVISIBLE_PIECES.includes(piece);
    text += piece;
  }
  // text of invisible characters only is refused; one visible letter in front makes it valid
  if (!visible) text = "a" + text;
  while (text.length > FUZZ_MAX_TEXT) text = [...text].slice(0, -1).join("");
  return text;
}
let refsMade = 0; // a non-empty ref names one message (the server answers a repeat with the first): each is unique
function validRef(r: Random): string | undefined {
  if (r.chance(0.2)) return undefined;
  if (r.chance(0.1)) return "";
  const unique = `${(refsMade++).toString(36)}~`;
  let ref = unique;
  const target = r.chance(0.1) ? 64 : unique.length + 1 + r.int(24);
  while (ref.length < target) ref += r.pick([...PIECES.filter((p) => !CONTROL.test(p)), "ref", "-", "1"]);
  while (ref.length > target || !isRef(ref)) ref = [...ref].slice(0, -1).join("");
  return ref;
}

/** A valid say to one of the joined rooms, with unicode-edged text, shuffled keys and random escaping. */
function validSay(r: Random): Case {
  const room = r.pick(FUZZ_ROOMS);
  const text = validText(r, r.chance(0.02));
  const ref = validRef(r);
  const pairs = shuffle<[string, unknown]>([["type", "say"], ["room", room], ["text", text], ...(ref === undefined ? [] : [["ref", ref] as [string, unknown]])], r);
  return { frame: jsonObject(pairs, r), expect: { say: { room, text, ref } } };
}

/** A valid frame of any type, as a starting point for mutation. */
function anyValidFrame(r: Random): string {
  switch (r.pick(TYPES)) {
    case "say":
      return validSay(r).frame as string;
    case "join":
      return jsonObject([["type", "join"], ["room", r.pick([...FUZZ_ROOMS, "other", "a1"])], ...(r.chance(0.5) ? [["since", r.int(50)] as [string, unknown]] : [])], r);
    case "leave":
      return jsonObject([["type", "leave"], ["room", r.pick(FUZZ_ROOMS)]], r);
    case "typing":
      return jsonObject([["type", "typing"], ["room", r.pick(FUZZ_ROOMS)]], r);
    case "nick":
      return jsonObject([["type", "nick"], ["name", `fz${r.int(1e6)}`]], r);
  }
}

/** Fields of a valid frame of the given type, before something is broken. */
function fieldsOf(type: (typeof TYPES)[number], r: Random): [string, unknown][] {
  switch (type) {
    case "say": {
      const ref = validRef(r);
      return [["type", "say"], ["room", r.pick(FUZZ_ROOMS)], ["text", validText(r)], ...(ref === undefined ? [] : [["ref", ref] as [string, unknown]])];
    }
    case "join":
      return [["type", "join"], ["room", r.pick(FUZZ_ROOMS)], ...(r.chance(0.5) ? [["since", r.int(100)] as [string, unknown]] : [])];
    case "leave":
    case "typing":
      return [["type", type], ["room", r.pick(FUZZ_ROOMS)]];
    case "nick":
      return [["type", "nick"], ["name", `n${r.int(1e6)}`]];
  }
}

function deepArray(depth: number) {
  return { raw: "[".repeat(depth) + "]".repeat(depth) };
}
function deepObject(depth: number) {
  return { raw: '{"a":'.repeat(depth) + "1" + "}".repeat(depth) };
}
function bigNumber(r: Random) {
  // none of these is a valid id: too big, infinite after parsing, or fractional
  return { raw: r.pick(["1e400", "-1e400", "9".repeat(400), "1" + "0".repeat(30), "9007199254740993", "-1E+2", "123456789012345678901234567890.5", "5e-1"]) };
}

/** The ref an error must echo: a valid ref of a frame that is a JSON object, else none. */
function echoedRef(frame: string): string | undefined {
  try {
    const json = JSON.parse(frame);
    const ref = json && typeof json === "object" ? json.ref : undefined;
    return isRef(ref) ? ref : undefined;
  } catch {
    return undefined;
  }
}

/** One frame the server must refuse with bad_request (or not_joined), with the reason it must. */
function invalidCase(r: Random): Case {
  let kind = r.int(16);
  // frames of tens of KiB (kinds 5 and 14) a quarter as often, so the run stays quick
  if ((kind === 5 || kind === 14) && r.chance(0.75)) kind = 2;
  let frame: string | Uint8Array;
  let code: "bad_request" | "not_joined" = "bad_request";
  switch (kind) {
    case 0: {
      // random text: practically never a valid frame; checked below
      let s = "";
      const n = r.int(r.chance(0.9) ? 60 : 5000);
      while (s.length < n) s += r.chance(0.7) ? String.fromCodePoint(32 + r.int(95)) : r.pick(PIECES);
      frame = s;
      break;
    }
    case 1: {
      // a valid frame cut before its closing brace
      const whole = anyValidFrame(r);
      frame = whole.slice(0, r.int(whole.lastIndexOf("}")));
      if (/[\uD800-\uDBFF]$/.test(frame)) frame = frame.slice(0, -1);
      break;
    }
    case 2: {
      // one field of the wrong type
      const fields = fieldsOf(r.pick(TYPES), r);
      const i = r.int(fields.length);
      const [key] = fields[i];
      const wrong = key === "type" ? r.pick([...BAD_TYPES, ...WRONG_VALUES])
        : key === "room" ? r.pick([...BAD_ROOMS, ...WRONG_VALUES])
        : key === "since" ? r.pick<unknown>([-1, 1.5, "1", true, null, [], {}, 2 ** 53, bigNumber(r)])
        : key === "ref" ? r.pick<unknown>(["r".repeat(65), 1, null, [], {}, "nul\u0000", { raw: '"\\ud800"' }, "bell\u0007"])
        : key === "name" ? r.pick<unknown>([...BAD_NAMES, ...WRONG_VALUES.filter((v) => typeof v !== "string"), { raw: '"a\\udc00"' }])
        : r.pick<unknown>([...WRONG_VALUES.filter((v) => typeof v !== "string"), bigNumber(r), deepArray(1 + r.int(5000)), deepObject(1 + r.int(2000))]);
      fields[i] = [key, wrong];
      if (key === "text" && typeof wrong === "string") fields[i] = [key, 5];
      frame = jsonObject(shuffle(fields, r), r);
      break;
    }
    case 3: {
      // an unknown key, __proto__ and constructor among them
      const fields = fieldsOf(r.pick(TYPES), r);
      const key = r.pick(ODD_KEYS);
      fields.push([key, r.pick<unknown>([...WRONG_VALUES, "x", { raw: '{"type":"say","room":"fuzz","text":"polluted"}' }, { raw: '{"isAdmin":true}' }])]);
      frame = jsonObject(shuffle(fields, r), r);
      break;
    }
    case 4: {
      // a required key missing
      const fields = fieldsOf(r.pick(TYPES), r).filter(([k]) => k !== "since" && k !== "ref");
      fields.splice(r.int(fields.length), 1);
      frame = jsonObject(shuffle(fields, r), r);
      break;
    }
    case 5: {
      // text longer than MAX_TEXT, up to the frame limit
      const unit = r.pick(["x", "é", "😀", "\u200B", "<"]);
      const count = Math.ceil((FUZZ_MAX_TEXT + 1 + r.int(20_000)) / unit.length);
      const ref = validRef(r);
      frame = jsonObject([["type", "say"], ["room", r.pick(FUZZ_ROOMS)], ["text", unit.repeat(count)], ...(ref === undefined ? [] : [["ref", ref] as [string, unknown]])], r);
      while (byteLength(frame) > FRAME_LIMIT) frame = JSON.stringify({ type: "say", room: "fuzz", text: "x".repeat(FUZZ_MAX_TEXT + 1 + r.int(30_000)) });
      break;
    }
    case 6: {
      // text with a control character, a lone surrogate (as a JSON escape) or empty
      const bad = r.pick([{ raw: '"\\ud800"' }, { raw: '"a\\udfffb"' }, { raw: '"\\udc00\\ud800"' }, { raw: '"x\\ud83d"' }, "", "a\u0000b", "\u0001", "x\u0008", "\u000B", "\u000C", "\u001F", "\u007F", "ok\u001Bok",
        `a${r.pick(CONTROL_PIECES)}b`, r.pick(CONTROL_PIECES), r.pick(INVISIBLE_PIECES).repeat(1 + r.int(3)) + r.pick(INVISIBLE_PIECES)]);
      const ref = validRef(r);
      frame = jsonObject(shuffle<[string, unknown]>([["type", "say"], ["room", r.pick(FUZZ_ROOMS)], ["text", bad], ...(ref === undefined ? [] : [["ref", ref] as [string, unknown]])], r), r);
      break;
    }
    case 7:
      // a name that is refused
      frame = jsonObject([["type", "nick"], ["name", r.pick<unknown>([...BAD_NAMES, { raw: '"\\ud800x"' }])]], r);
      break;
    case 8:
      // JSON that is not an object, or is nested deep
      frame = r.pick([
        () => "null", () => "true", () => "0", () => "-1e400", () => '"say"', () => "[]", () => '[{"type":"say","room":"fuzz","text":"x"}]',
        () => deepArray(1 + r.int(30_000)).raw, () => deepObject(1 + r.int(10_000)).raw, () => bigNumber(r).raw, () => '"\\ud800"',
      ])();
      break;
    case 9:
      // a binary frame, JSON or not
      frame = r.chance(0.5) ? crypto.getRandomValues(new Uint8Array(1 + r.int(2000))) : new TextEncoder().encode(validSay(r).frame as string);
      break;
    case 10:
      frame = r.pick(["", " ", "\n", "{", "}", "{}", '{"type":null}', '{"type":"say"', "undefined", "NaN", "{'type':'say'}", '{"type":"say",}', "\uFEFF{}"]);
      break;
    case 11: {
      // a say to a room this socket never joined: not_joined, with the ref
      const ref = validRef(r);
      frame = jsonObject(shuffle<[string, unknown]>([["type", "say"], ["room", r.pick(["elsewhere", "tostring", "prototype", "x"])], ["text", validText(r)], ...(ref === undefined ? [] : [["ref", ref] as [string, unknown]])], r), r);
      code = "not_joined";
      break;
    }
    case 12:
      // typing in a room this socket never joined
      frame = jsonObject([["type", "typing"], ["room", "elsewhere"]], r);
      code = "not_joined";
      break;
    case 13: {
      // a server message type sent by a client
      frame = jsonObject([["type", r.pick(["welcome", "history", "presence", "message", "presence_diff", "renamed", "error"])], ["room", "fuzz"], ["user", { id: "u1", name: "x" }]], r);
      break;
    }
    case 14: {
      // a long string where a short one belongs
      frame = jsonObject([["type", "say"], ["room", "r".repeat(33 + (r.chance(0.2) ? r.int(60_000) : r.int(100)))], ["text", "x"]], r);
      break;
    }
    default: {
      // a ref that may not be stored: too long, a control character, a lone surrogate
      const ref = r.pick<unknown>(["r".repeat(65 + r.int(1000)), "a\u0000", "\u0007", "\u007F", { raw: '"\\udbff"' }, { raw: '"a\\ud800\\ud800"' }, `r${r.pick(CONTROL_PIECES)}`]);
      frame = jsonObject(shuffle<[string, unknown]>([["type", "say"], ["room", r.pick(FUZZ_ROOMS)], ["text", "hello"], ["ref", ref]], r), r);
    }
  }
  if (typeof frame === "string") {
    if (byteLength(frame) > FRAME_LIMIT) return invalidCase(r);
    // random text could, in theory, be a valid frame: never label that invalid
    try {
      const json = JSON.parse(frame);
      if (json && typeof json === "object" && !Array.isArray(json) && TYPES.includes(json.type) && kind === 0) return invalidCase(r);
    } catch {}
  }
  return { frame, expect: { error: code, ref: typeof frame === "string" ? echoedRef(frame) : undefined } };
}

/** The labelled stream: about a third valid says, the rest frames that must be refused. */
export function generate(seed: number, count: number): Case[] {
  refsMade = 0;
  const r = prng(seed);
  const cases: Case[] = [];
  for (let i = 0; i < count; i++) {
    const c = r.chance(0.35) ? validSay(r) : invalidCase(r);
    if (typeof c.frame === "string" && byteLength(c.frame) > FRAME_LIMIT) {
      i--;
      continue;
    }
    cases.push(c);
  }
  return cases;
}

/** The chaos stream: valid frames of every type with 1–3 random edits; the answer is not predicted. */
export function mutate(seed: number, count: number): string[] {
  const r = prng(seed ^ 0x5eed);
  const inserts = ['"', "{", "}", "[", "]", ":", ",", "\\", "0", "-", "e", " ", "u", "\u0000", "😀", "\\u0000", "\\ud800", "null", "__proto__"];
  const out: string[] = [];
  for (let i = 0; i < count; i++) {
    let s = anyValidFrame(r);
    for (let edits = 1 + r.int(3); edits > 0; edits--) {
      const cps = [...s];
      const at = r.int(cps.length);
      const op = r.int(4);
      if (op === 0) cps.splice(at, 1);
      else if (op === 1) cps.splice(at, 0, r.pick(inserts));
      else if (op === 2) cps.splice(at, 0, ...cps.slice(at, at + 1 + r.int(8)));
      else [cps[at], cps[cps.length - 1 - at]] = [cps[cps.length - 1 - at], cps[at]];
      s = cps.join("");
    }
    if (byteLength(s) > FRAME_LIMIT) {
      i--;
      continue;
    }
    out.push(s.toWellFormed());
  }
  return out;
}

type Frame = Client["frames"][number];

/** Waits until `count` frames matching `pred` have arrived at a client. */
async function waitCount(client: Client, pred: (f: Frame) => boolean, count: number, what: string, timeoutMs = 30_000) {
  await until(() => client.frames.filter(pred).length >= count || client.ws.readyState === WebSocket.CLOSED, timeoutMs, what).catch((error) => {
    throw new Error(`${error.message}: ${client.frames.filter(pred).length} of ${count}`);
  });
  if (client.ws.readyState === WebSocket.CLOSED) throw new Error(`${what}: the socket closed (${JSON.stringify(await client.closed)})`);
}

export type FuzzOptions = { seed: number; frames: number; chaos: number; url: string; bystanderUrls: string[] };

/**
 * Sends the labelled stream from one socket and the chaos stream from another while bystanders
 * listen, then checks every answer, every bystander frame and the stored history. Throws on any
 * difference; returns counts for the log.
 */
export async function runFuzz({ seed, frames, chaos, url, bystanderUrls }: FuzzOptions) {
  const cases = generate(seed, frames);
  const fuzzSession = await newSession(url);
  const reader = await newSession(url);
  const bystanders = await Promise.all(bystanderUrls.map(async (u) => Client.connect(u, await newSession(u))));
  for (const b of bystanders) for (const room of FUZZ_ROOMS) await b.join(room);
  const fuzzer = await Client.connect(url, fuzzSession);
  for (const room of FUZZ_ROOMS) await fuzzer.join(room);
  const chaosClient = await Client.connect(url, await newSession(url));
  for (const room of [...FUZZ_ROOMS, "sentinel"]) await chaosClient.join(room);

  // labelled stream, in windows so no reader falls 1 MiB behind
  const expectedErrors: { code: string; ref?: string }[] = [];
  const expectedSays: { room: string; text: string; ref?: string }[] = [];
  const isAnswer = (f: Frame) => f.type === "error" || (f.type === "message" && f.user.id === fuzzSession.id);
  const WINDOW = 250;
  for (let at = 0; at < cases.length; at += WINDOW) {
    for (const c of cases.slice(at, at + WINDOW)) {
      fuzzer.send(c.frame);
      if ("say" in c.expect) expectedSays.push(c.expect.say);
      else expectedErrors.push({ code: c.expect.error, ...(c.expect.ref === undefined ? {} : { ref: c.expect.ref }) });
    }
    // one answer per frame: its error, or its echo
    await waitCount(fuzzer, isAnswer, Math.min(at + WINDOW, cases.length), `answers to frames up to ${at + WINDOW}`);
  }

  // chaos stream: mutated frames; after each window a say in the sentinel room proves everything before it was handled
  const mutated = mutate(seed, chaos);
  const candidates = new Map<string, number>(); // texts of mutated frames that parse as a say
  for (let at = 0; at < mutated.length; at += WINDOW) {
    for (const frame of mutated.slice(at, at + WINDOW)) {
      try {
        const json = JSON.parse(frame);
        if (json?.type === "say" && typeof json.text === "string") candidates.set(json.text, (candidates.get(json.text) ?? 0) + 1);
      } catch {}
      chaosClient.send(frame);
    }
    const sentinel = `sentinel ${at}`;
    chaosClient.send({ type: "say", room: "sentinel", text: sentinel });
    await chaosClient.next((f) => f.type === "message" && f.text === sentinel, 30_000);
  }

  // the labelled answers, exactly and in order
  const errors = fuzzer.frames.filter((f) => f.type === "error");
  const echoes = fuzzer.frames.filter((f) => f.type === "message" && f.user.id === fuzzSession.id) as Message[];
  const got = errors.map((e) => ({ code: e.code, ...(e.ref === undefined ? {} : { ref: e.ref }) }));
  for (let i = 0; i < Math.max(got.length, expectedErrors.length); i++) {
    if (JSON.stringify(got[i]) !== JSON.stringify(expectedErrors[i])) {
      const refused = cases.filter((c) => "error" in c.expect);
      const around = (list: unknown[]) => list.slice(Math.max(0, i - 3), i + 2).map((x) => JSON.stringify(x)?.slice(0, 200));
      const frames = refused.slice(Math.max(0, i - 3), i + 2).map((c) => (typeof c.frame === "string" ? JSON.stringify(c.frame.slice(0, 200)) : "(binary)"));
      throw new Error(`error #${i} differs (seed ${seed}).\nexpected ${around(expectedErrors).join("\n  ")}\ngot      ${around(errors).join("\n  ")}\nframes   ${frames.join("\n  ")}`);
    }
  }
  for (const e of errors) if (!e.message || e.message.length > 1000) throw new Error(`unclear error message: ${JSON.stringify(e).slice(0, 300)}`);
  if (echoes.length !== expectedSays.length) throw new Error(`expected ${expectedSays.length} echoes, got ${echoes.length}`);
  echoes.forEach((m, i) => {
    const want = expectedSays[i];
    if (m.room !== want.room || m.text !== want.text || m.ref !== want.ref) {
      throw new Error(`echo #${i} differs from what was sent: sent ${JSON.stringify(want).slice(0, 300)}, got ${JSON.stringify(m).slice(0, 300)}`);
    }
  });

  // a last say of the fuzzer's in each fuzz room: once it is back, the fuzzer holds every message before it
  // (the chaos socket may have left a room, so its sentinel alone does not prove the fuzzer heard its last says)
  for (const room of FUZZ_ROOMS) await fuzzer.say(room, `fence ${room}`);
  // every message accepted from either socket, by room and id: the fuzzer stays in the fuzz rooms
  // throughout, so it holds all of theirs; the chaos socket holds its own elsewhere
  const accepted = new Map<string, Map<number, Message>>();
  for (const f of [...fuzzer.frames, ...chaosClient.frames]) {
    if (f.type !== "message") continue;
    const room = accepted.get(f.room) ?? new Map<number, Message>();
    if (room.has(f.id) && JSON.stringify(room.get(f.id)) !== JSON.stringify(f)) throw new Error(`two different messages with id ${f.room}#${f.id}`);
    room.set(f.id, f);
    accepted.set(f.room, room);
  }
  // a message accepted from the chaos socket must be a text it sent
  const chaosUser = (chaosClient.frames.find((f) => f.type === "welcome") as Extract<Frame, { type: "welcome" }>).user.id;
  const chaosAccepted = [...accepted.values()].flatMap((m) => [...m.values()]).filter((m) => m.user.id === chaosUser && m.room !== "sentinel");
  for (const m of chaosAccepted) {
    const left = candidates.get(m.text) ?? 0;
    if (left <= 0) throw new Error(`the chaos socket's message was never sent as such: ${JSON.stringify(m).slice(0, 300)}`);
    candidates.set(m.text, left - 1);
  }
  if (chaosClient.ws.readyState !== WebSocket.OPEN) throw new Error(`the chaos socket was closed: ${JSON.stringify(await chaosClient.closed)}`);

  // bystanders heard exactly the accepted messages of their rooms, and no error
  for (const b of bystanders) {
    for (const room of FUZZ_ROOMS) {
      const want = [...(accepted.get(room)?.values() ?? [])].sort((x, y) => x.id - y.id);
      await waitCount(b, (f) => f.type === "message" && f.room === room, want.length, `bystander messages in ${room}`);
      const heard = b.frames.filter((f) => f.type === "message" && f.room === room) as Message[];
      if (JSON.stringify(heard) !== JSON.stringify(want)) throw new Error(`a bystander heard something else in ${room}: ${heard.length} vs ${want.length} messages`);
    }
    const odd = b.frames.filter((f) => !["welcome", "history", "presence", "message", "presence_diff", "renamed", "typing"].includes(f.type));
    if (odd.length) throw new Error(`a bystander got ${JSON.stringify(odd).slice(0, 300)}`);
  }

  // the store holds exactly the accepted messages, byte for byte
  for (const [room, messages] of accepted) {
    const stored = await storedHistory(url, room, reader.cookie);
    const want = [...messages.values()].sort((x, y) => x.id - y.id);
    if (stored.map((m) => m.id).join() !== Array.from({ length: stored.length }, (_, i) => i + 1).join()) throw new Error(`ids in ${room} are not 1..n`);
    if (JSON.stringify(stored.filter((m) => messages.has(m.id))) !== JSON.stringify(want)) {
      const diff = want.find((m, i) => JSON.stringify(m) !== JSON.stringify(stored.find((s) => s.id === m.id)));
      throw new Error(`stored history of ${room} differs from what was accepted, e.g. ${JSON.stringify(diff).slice(0, 300)}`);
    }
    // elsewhere the chaos socket may have left a room before its echo came back
    if (stored.length !== want.length && (FUZZ_ROOMS as readonly string[]).includes(room)) throw new Error(`${room}: ${stored.length} stored, ${want.length} accepted`);
  }

  // the counters agree with what the sockets were told
  const rejected = [fuzzer, chaosClient].flatMap((c) => c.frames).filter((f) => f.type === "error" && f.code === "bad_request").length;
  const counted = await metric(url, "chat_frames_rejected_total");
  if (counted !== rejected) throw new Error(`chat_frames_rejected_total is ${counted}, the sockets got ${rejected} bad_request errors`);

  const stats = {
    frames: cases.length,
    valid: expectedSays.length,
    refused: expectedErrors.length,
    binary: cases.filter((c) => typeof c.frame !== "string").length,
    chaos: mutated.length,
    chaosAccepted: chaosAccepted.length,
    stored: [...accepted.values()].reduce((n, m) => n + m.size, 0),
  };
  for (const c of [fuzzer, chaosClient, ...bystanders]) c.close();
  return stats;
}
