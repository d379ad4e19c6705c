// Text and names: the one rule (README "Text and names"), on the schemas alone and over a real server:
// controls, invisible-only text, bidi and zero-width names, look-alike scripts and confusable twins.
import { describe, expect, test } from "bun:test";
import { ClientMessage, Name, nameKey, parseClientMessage, Ref, Text } from "../server.ts";
import { Client, newSession, putName, serve } from "./helpers.ts";
import { FUZZ_MAX_TEXT, generate } from "./fuzz.ts";

/** The first problem zod words for a value, or "ok". */
const verdict = (schema: typeof Name | typeof Text | typeof Ref, value: string) => {
  const result = schema.safeParse(value);
  return result.success ? "ok" : result.error.issues[0].message;
};

/** The attack list's names, each with the words its error must contain. */
const BAD_NAMES: [string, string, RegExp][] = [
  ["a bidi override (shows nimdA as Admin)", "\u202Enimda", /bidi/],
  ["a bidi isolate", "\u2067Admin\u2069", /bidi/],
  ["a right-to-left mark", "Admin\u200F", /bidi/],
  ["a zero-width space", "Ad\u200Bmin", /invisible/],
  ["a zero-width joiner (emoji sequences too)", "👩\u200D👩\u200D👧", /invisible/],
  ["a soft hyphen", "Ad\u00ADmin", /invisible/],
  ["a no-break space", "Ad\u00A0min", /invisible/],
  ["a Hangul filler", "Admin\u3164", /invisible/],
  ["only invisible characters", "\u200B\u200C\u2060", /only invisible/],
  ["only Hangul fillers", "\u3164\u115F", /only invisible/],
  ["a Cyrillic А in a Latin name", "\u0410dmin", /mixes scripts \(Cyrillic and Latin\)/],
  ["a Greek ο in a Latin name", "r\u03BFot", /mixes scripts/],
  ["a Cherokee Ꭺ in a Latin name", "\u13AADMIN", /mixes scripts/],
  ["a stack of combining marks", "Z\u0334\u0321\u032A\u0354\u0344", /combining marks/],
  ["a C1 control", "a\u0085b", /control/],
  ["a line separator", "a\u2028b", /control/],
  ["a tab inside", "a\tb", /control/],
  ["a private-use character", "a\uE000", /private-use/],
];

const GOOD_NAMES = [
  "quiet-otter-4821", "Zoë", "Mary Jane", "محمد", "שלום", "李小龍", "山田たろう", "Tanaka田中", "김민수", "नमस्ते", "Ελένη", "Мария",
  "བསྒྲུབས", "Nguyễn", "😀 smile", "e\u0301", "user42",
];

describe("text and names, the schemas", () => {
  test("text refuses CR, C1 controls, line separators and text of invisible characters only, naming the problem", () => {
    const cases: [string, RegExp][] = [
      ["line\r\nbreak", /control characters \(only tab and newline/],
      ["a\u0085b", /control characters/],
      ["a\u009Bb", /control characters/],
      ["x\u2028y", /control characters/],
      ["x\u2029", /control characters/],
      ["\u200B\u200D\u2060", /only invisible characters/],
      [" \t\n ", /only invisible characters/],
      ["\u3164\uFE0F\u{E0041}\u180E", /only invisible characters/],
      ["\u202E\u2066", /only invisible characters/],
    ];
    for (const [text, problem] of cases) expect({ text, verdict: verdict(Text, text) }).toEqual({ text, verdict: expect.stringMatching(problem) });
    for (const text of ["tab\tand\nnewline", "👩\u200D👩\u200D👧", "\u200Bvisible", "❤️", "שלום \u202Eworld", "Аdmin in text is fine"]) {
      expect({ text, verdict: verdict(Text, text) }).toEqual({ text, verdict: "ok" });
    }
  });

  test("ref follows the text's control rule", () => {
    for (const ref of ["r\r", "r\u0085", "r\u009B", "r\u2028", "r\u0000", "\uD800"]) expect(verdict(Ref, ref)).toMatch(/control characters or a lone surrogate/);
    for (const ref of ["", "r1", "tab\tref", "\u200B"]) expect(verdict(Ref, ref)).toBe("ok");
  });

  test("names refuse bidi controls, invisible characters, mark stacks and mixed scripts; single-script names pass", () => {
    for (const [what, name, problem] of BAD_NAMES) expect({ what, verdict: verdict(Name, name) }).toEqual({ what, verdict: expect.stringMatching(problem) });
    for (const name of GOOD_NAMES) expect({ name, verdict: verdict(Name, name) }).toEqual({ name, verdict: "ok" });
  });

  test("names are the same when they differ only in case or by look-alike characters (UTS #39 skeleton)", () => {
    const same: [string, string][] = [
      ["Admin", "admin"], ["Admin", "\u0410dmin"], ["admin", "adrnin"], ["ape", "\u0430\u0440\u0435"], ["paypal", "\u0440\u0430\u0443\u0440\u0430l"],
      ["BOB", "b0b"], ["Zoë", "zoe\u0308"], ["ＡＤＭＩＮ", "admin"],
    ];
    for (const [a, b] of same) expect({ a, b, same: nameKey(a) === nameKey(b) }).toEqual({ a, b, same: true });
    for (const [a, b] of [["ape", "apa"], ["Mary", "Marty"], ["李", "季"]]) expect(nameKey(a)).not.toBe(nameKey(b));
  });

  test("the fuzzer's labels agree with the schemas: every generated valid say parses, every refused frame does not", () => {
    let says = 0;
    for (const c of generate(7, 5_000)) {
      if (typeof c.frame !== "string") continue;
      const parsed = parseClientMessage(c.frame);
      // too long for MAX_TEXT: refused by the chat, after the schema
      if (parsed.ok && parsed.value.type === "say" && parsed.value.text.length > FUZZ_MAX_TEXT) continue;
      const valid = "say" in c.expect || c.expect.error === "not_joined";
      expect({ frame: c.frame.slice(0, 200), ok: parsed.ok }).toEqual({ frame: c.frame.slice(0, 200), ok: valid });
      // the hand-written say check and zod agree on every frame zod accepts
      if (parsed.ok) expect(parsed.value).toEqual(ClientMessage.parse(JSON.parse(c.frame)));
      if ("say" in c.expect) says++;
    }
    expect(says).toBeGreaterThan(1_000);
  });
});

describe("text and names, over a real server", () => {
  test("say refuses each attack text and ref with a bad_request naming the problem; legit text is stored as sent", async () => {
    await using chat = await serve();
    const a = await Client.connect(chat.url, await newSession(chat.url));
    await a.join("room");
    const bad: [Record<string, string>, RegExp][] = [
      [{ text: "one\rtwo" }, /text: text has control characters/],
      [{ text: "a\u0085b" }, /text: text has control characters/],
      [{ text: "a\u009Bb" }, /text: text has control characters/],
      [{ text: "a\u2028b" }, /text: text has control characters/],
      [{ text: "\u200B\u200D\u2060\u3164" }, /text: text is only invisible characters/],
      [{ text: "ok", ref: "r\r" }, /ref: ref has control characters/],
      [{ text: "ok", ref: "r\u0085" }, /ref: ref has control characters/],
      [{ text: "ok", ref: "r\u2028" }, /ref: ref has control characters/],
    ];
    for (const [fields, problem] of bad) {
      a.send({ type: "say", room: "room", ...fields });
      const error = await a.next((f) => f.type === "error");
      expect({ fields, code: error.code, message: error.message }).toEqual({ fields, code: "bad_request", message: expect.stringMatching(problem) });
    }
    for (const text of ["tab\tand\nnewline", "👩\u200D👩\u200D👧 family", "مرحبا \u2067x\u2069"]) expect((await a.say("room", text)).text).toBe(text);
  });

  test("nick and PUT /api/me refuse each attack name with a bad_request naming the problem", async () => {
    await using chat = await serve({ renameLimit: "1000/1s" });
    const session = await newSession(chat.url);
    const a = await Client.connect(chat.url, session);
    for (const [what, name, problem] of BAD_NAMES) {
      const res = await putName(chat.url, session.cookie, name);
      const body = (await res.json()) as { error: { code: string; message: string } };
      expect({ what, status: res.status, code: body.error.code, message: body.error.message })
        .toEqual({ what, status: 400, code: "bad_request", message: expect.stringMatching(problem) });
      a.send({ type: "nick", name });
      const error = await a.next((f) => f.type === "error");
      expect({ what, code: error.code, message: error.message }).toEqual({ what, code: "bad_request", message: expect.stringMatching(problem) });
    }
    for (const name of GOOD_NAMES) expect({ name, status: (await putName(chat.url, session.cookie, name)).status }).toEqual({ name, status: 200 });
  });

  test("a look-alike or case twin of a taken name is name_taken, over PUT /api/me and nick", async () => {
    await using chat = await serve({ renameLimit: "1000/1s" });
    const [owner, other] = [await newSession(chat.url), await newSession(chat.url)];
    expect((await putName(chat.url, owner.cookie, "ape")).status).toBe(200);
    // Cyrillic а, р, е: one script, so allowed as a name, but the same skeleton as Latin "ape"
    for (const twin of ["\u0430\u0440\u0435", "APE", "Ape"]) {
      const res = await putName(chat.url, other.cookie, twin);
      expect({ twin, status: res.status, code: ((await res.json()) as any).error.code }).toEqual({ twin, status: 409, code: "name_taken" });
    }
    expect((await putName(chat.url, owner.cookie, "Admin")).status).toBe(200);
    const b = await Client.connect(chat.url, other);
    for (const twin of ["admin", "adrnin", "ＡＤＭＩＮ"]) {
      b.send({ type: "nick", name: twin });
      const error = await b.next((f) => f.type === "error");
      expect({ twin, code: error.code }).toEqual({ twin, code: "name_taken" });
    }
    // the owner may change the case of its own name
    expect((await putName(chat.url, owner.cookie, "ADMIN")).status).toBe(200);
  });
});
