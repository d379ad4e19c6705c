// The browser client (client.html) in headless Chromium: real servers, real pages, real sockets.
// Skips with one line when /usr/bin/chromium is missing, unless CHAT_TEST_REQUIRE_ALL=1 (then it fails).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { Browser, Page, WebSocketRoute } from "playwright-core";
import { ServerMessage, type ServerOptions } from "../server.ts";
import { launchChromium, shown, shownText, skipWithoutChromium, texts } from "./chromium.ts";
import { Client, newSession, ROOT, serve, tempDir, until } from "./helpers.ts";
import { metric } from "./probes.ts";

const WAIT_MS = 5_000; // any one wait on the page
const TEST_MS = 20_000; // a whole test (bun's default is 5 s; a timeout also kills the shared browser)
const SKIP = skipWithoutChromium("browser tests");


describe.skipIf(SKIP)("browser client", () => {
  let browser: Browser;

  beforeAll(async () => {
    browser = await launchChromium("browser tests");
  });
  afterAll(async () => {
    await browser?.close();
  });

  /** A fresh profile (its own cookie, so its own user) with the chat open and connected. */
  async function open(baseUrl: string, path = "/", { viewport = { width: 1280, height: 800 }, setup = async (_: Page) => {} } = {}) {
    const context = await browser.newContext({ viewport });
    context.setDefaultTimeout(WAIT_MS);
    const page = await context.newPage();
    const errors: string[] = [];
    page.on("pageerror", (error) => errors.push(String(error)));
    await setup(page);
    await page.goto(baseUrl + path);
    await connected(page);
    return {
      context,
      page,
      errors,
      name: () => page.locator("#me-name").textContent(),
      async [Symbol.asyncDispose]() {
        await context.close();
      },
    };
  }

  type Opened = Awaited<ReturnType<typeof open>>;

  /** A server on a database file of its own that a test restarts on the same port while a page is offline. */
  async function restartable() {
    const tmp = tempDir();
    const databaseUrl = `sqlite://${tmp.dir}/chat.db`;
    let current = await serve({ databaseUrl });
    const port = current.port;
    return {
      get current() {
        return current;
      },
      /** Stops the server, waits for the page to see it and takes the page offline, then starts a new server. */
      async restartWhileOffline(a: Opened, options: ServerOptions = {}) {
        await current.stop();
        await a.page.locator('#status[data-state="reconnecting"]', { hasText: "Reconnecting in" }).waitFor();
        await a.context.setOffline(true); // kept out while the restarted server changes things
        await a.page.locator('#status[data-state="offline"]').waitFor();
        current = await serve({ databaseUrl, port, ...options });
        return current;
      },
      async [Symbol.asyncDispose]() {
        await current.stop();
        tmp[Symbol.dispose]();
      },
    };
  }

  /** Waits until the page is connected and the open room's history is in. */
  async function connected(page: Page) {
    await page.locator('#status[data-state="connected"]').waitFor();
    await page.locator("#composer-fields:not([disabled])").waitFor();
  }

  async function say(page: Page, text: string) {
    await page.locator("#text").fill(text);
    await page.locator("#text").press("Enter");
    await shownText(page, text).and(page.locator(":not(.pending)")).last().waitFor();
  }

  test("two users chat both ways and see each other's names", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const [aName, bName] = [await a.name(), await b.name()];
    expect(aName).toMatch(/^[a-z]+-[a-z]+-\d{4}$/);
    expect(bName).not.toBe(aName);
    await a.page.locator("#people", { hasText: bName! }).waitFor();

    await say(a.page, "hello from a");
    const got = shownText(b.page, "hello from a");
    await got.waitFor();
    expect(await got.locator(".author").textContent()).toBe(aName);
    expect(await got.getAttribute("class")).not.toContain("own");
    expect(await shownText(a.page, "hello from a").getAttribute("class")).toContain("own");

    await say(b.page, "hi a, b here");
    const reply = shownText(a.page, "hi a, b here");
    await reply.waitFor();
    expect(await reply.locator(".author").textContent()).toBe(bName);
    // consecutive messages by one author are grouped under one header
    await say(b.page, "second line from b");
    await expect(shownText(a.page, "second line from b").getAttribute("class")).resolves.toContain("cont");
    expect(await texts(a.page)).toEqual(["hello from a", "hi a, b here", "second line from b"]);
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("a rename shows in the other page, refusals show inline, and the name survives a reload", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    await a.page.locator("#me-name").click();
    await a.page.locator("#me-input").fill("Alice");
    await a.page.locator("#me-input").press("Enter");
    await a.page.locator("#me-name", { hasText: /^Alice$/ }).waitFor();
    await b.page.locator("#people .person-name", { hasText: /^Alice$/ }).waitFor();
    await say(a.page, "now I am Alice");
    expect(await shownText(b.page, "now I am Alice").locator(".author").textContent()).toBe("Alice");

    // 409: taken (names are unique ignoring case); 400: empty
    await b.page.locator("#me-name").click();
    await b.page.locator("#me-input").fill("alice");
    await b.page.locator("#me-input").press("Enter");
    await b.page.locator("#me-error", { hasText: "taken" }).waitFor();
    await b.page.locator("#me-input").fill("   ");
    await b.page.locator("#me-input").press("Enter");
    await b.page.locator("#me-error", { hasText: "name is empty" }).waitFor();
    await b.page.locator("#me-input").press("Escape");
    expect(await b.page.locator("#me-form").isHidden()).toBe(true);

    await a.page.reload();
    await connected(a.page);
    expect(await a.name()).toBe("Alice");
    expect(await texts(a.page)).toEqual(["now I am Alice"]);
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("an HTML payload shows as literal text and runs nothing; http links become safe anchors", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const payload = `<img src=x onerror=window.__pwned=1><script>window.__pwned=1</script><b>bold</b>`;
    await say(a.page, payload);
    await say(a.page, "docs at https://example.com/a?b=1&c=(2). and javascript:alert(1) stays text");
    for (const { page } of [a, b]) {
      await shownText(page, "docs at").waitFor();
      expect(await texts(page)).toEqual([payload, "docs at https://example.com/a?b=1&c=(2). and javascript:alert(1) stays text"]);
      expect(await page.locator(".log img, .log script, .log b").count()).toBe(0);
      expect(await page.evaluate(() => (window as { __pwned?: number }).__pwned)).toBeUndefined();
      const links = page.locator(".log a");
      expect(await links.count()).toBe(1);
      expect(await links.getAttribute("href")).toBe("https://example.com/a?b=1&c=(2)");
      expect(await links.getAttribute("rel")).toBe("noopener noreferrer");
      expect(await links.getAttribute("target")).toBe("_blank");
    }
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("names sit in <bdi> and message text has dir=auto, so right-to-left names reorder nothing; a non-ASCII host shows as punycode", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    // Hebrew letters and digits: without isolation they would pull the text after them to the left
    const rtl = "שלום 42";
    await a.page.locator("#me-name").click();
    await a.page.locator("#me-input").fill(rtl);
    await a.page.locator("#me-input").press("Enter");
    await a.page.locator("#me-name bdi", { hasText: rtl }).waitFor();
    await b.page.locator("#people bdi.person-name", { hasText: rtl }).waitFor();
    await a.page.locator("#text").fill("typing");
    await b.page.locator("#typing bdi", { hasText: rtl }).waitFor();
    expect(await b.page.locator("#typing").textContent()).toBe(`${rtl} is typing…`);
    // the page shows it with the punycode host, so say() would not find it
    await a.page.locator("#text").fill("see https://\u0430pple.com/login and https://example.com/");
    await a.page.locator("#text").press("Enter");
    for (const { page } of [a, b]) {
      const message = shownText(page, "see https://xn--pple-43d.com/login and https://example.com/").and(page.locator(":not(.pending)"));
      await message.waitFor();
      expect(await message.locator("bdi.author").textContent()).toBe(rtl);
      expect(await message.locator(".text").getAttribute("dir")).toBe("auto");
      const links = message.locator(".text a");
      expect(await links.allTextContents()).toEqual(["https://xn--pple-43d.com/login", "https://example.com/"]);
      expect(await links.first().getAttribute("href")).toBe("https://xn--pple-43d.com/login");
      expect(await links.first().getAttribute("title")).toContain("xn--pple-43d.com");
      expect(await links.nth(1).getAttribute("title")).toBeNull();
    }
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("a hash that is not valid percent-encoding is ignored: the page connects and chats", async () => {
    await using chat = await serve();
    // decodeURIComponent throws on it; the page opens the default room instead
    await using a = await open(chat.url, "/#%E0%A4%A");
    await using b = await open(chat.url);
    expect(await a.page.evaluate(() => location.hash)).toBe("#general");
    await say(a.page, "hello despite the hash");
    await shownText(b.page, "hello despite the hash").waitFor();
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("the page runs under a strict Content-Security-Policy that refuses any script it did not ship", async () => {
    await using chat = await serve();
    const res = await fetch(chat.url);
    const csp = res.headers.get("content-security-policy");
    expect(csp).toMatch(/^default-src 'none'; script-src 'sha256-[^']+'; style-src 'sha256-[^']+'; connect-src 'self';/);
    expect(csp).toContain("frame-ancestors 'none'");
    expect(res.headers.get("x-content-type-options")).toBe("nosniff");
    // violations are recorded from before the page's first line (init scripts are not subject to the policy)
    const watch = async (page: Page) => {
      await page.addInitScript(() => {
        const seen: string[] = ((window as unknown as { __violations: string[] }).__violations = []);
        document.addEventListener("securitypolicyviolation", (e) => seen.push(e.effectiveDirective));
      });
    };
    await using a = await open(chat.url, "/", { setup: watch });
    await using b = await open(chat.url, "/", { setup: watch });
    await say(a.page, "styled, scripted and connected under the policy");
    await shownText(b.page, "under the policy").waitFor();
    const violations = (page: Page) => page.evaluate(() => (window as unknown as { __violations: string[] }).__violations);
    expect(await violations(a.page)).toEqual([]);
    expect(await a.page.locator("#composer-fields").evaluate((el) => getComputedStyle(el).display)).not.toBe("inline"); // the <style> applied
    // a script element added by anyone but the page's own code is refused
    await a.page.evaluate(() => {
      const script = document.createElement("script");
      script.textContent = "window.__ran = 1";
      document.body.append(script);
    });
    await a.page.waitForFunction(() => (window as unknown as { __violations: string[] }).__violations.length > 0);
    expect(await violations(a.page)).toEqual(["script-src-elem"]);
    expect(await a.page.evaluate(() => (window as { __ran?: number }).__ran)).toBeUndefined();
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("the typing indicator shows in the other page and clears when the message arrives or after 5 s", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const aName = await a.name();
    await a.page.locator("#text").pressSequentially("hel");
    await b.page.locator("#typing", { hasText: `${aName} is typing…` }).waitFor();
    expect(await a.page.locator("#typing").textContent()).toBe("");
    await a.page.locator("#text").pressSequentially("lo");
    await a.page.locator("#text").press("Enter");
    await shownText(b.page, "hello").waitFor();
    expect(await b.page.locator("#typing").textContent()).toBe("");

    // typing again (over 2 s later), then nothing: the indicator goes after 5 s without a new frame
    await until(async () => {
      await a.page.locator("#text").pressSequentially("x");
      return b.page.locator("#typing", { hasText: "is typing" }).isVisible();
    }, WAIT_MS, "a second typing indicator");
    const since = Date.now();
    await b.page.locator("#typing:empty").waitFor({ timeout: 8_000 });
    expect(Date.now() - since).toBeGreaterThan(3_000);
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("rooms: join by name, unread counts, each room keeps its messages, the hash opens and switches rooms", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    const join = async (name: string) => {
      await a.page.locator("#join-input").fill(name);
      await a.page.locator("#join-input").press("Enter");
    };
    await join("Not A Room!");
    await a.page.locator("#join-error", { hasText: "not a room name" }).waitFor();
    await join("random");
    await a.page.locator("#room-title", { hasText: "#random" }).waitFor();
    expect(new URL(a.page.url()).hash).toBe("#random");
    await connected(a.page);

    // a link with the room in the hash opens it
    await using b = await open(chat.url, "/#random");
    expect(await b.page.locator("#room-title").textContent()).toBe("#random");
    await say(a.page, "in random first");

    await a.page.locator('.room-link[href="#general"]').click();
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    await say(a.page, "in general");
    await say(b.page, "unread one");
    await say(b.page, "unread two");
    const badge = a.page.locator('.room-link[href="#random"] .unread-count');
    await a.page.locator('.room-link[href="#random"] .unread-count', { hasText: /^2$/ }).waitFor();
    expect(await a.page.title()).toBe("(2) #general · Chat");
    expect(await texts(a.page)).toEqual(["in general"]);

    await a.page.locator('.room-link[href="#random"]').click();
    await a.page.locator("#room-title", { hasText: "#random" }).waitFor();
    await badge.waitFor({ state: "hidden" }); // once the messages are in view: the page sends read
    expect(await texts(a.page)).toEqual(["in random first", "unread one", "unread two"]);
    await a.page.evaluate(() => (location.hash = "#general"));
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    expect(await texts(a.page)).toEqual(["in general"]);

    // leaving: the room goes from the list and b sees a leave
    await a.page.evaluate(() => (location.hash = "#random"));
    await a.page.locator("#room-title", { hasText: "#random" }).waitFor();
    expect(await b.page.locator("#people li").count()).toBe(2);
    await a.page.locator("#leave").click();
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    expect(await a.page.locator('.room-link[href="#random"]').count()).toBe(0);
    await until(async () => (await b.page.locator("#people li").count()) === 1, WAIT_MS, "b's presence list to drop a");
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("keyboard only: Tab reaches the composer, Shift+Enter adds a line, Enter sends", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    let tabs = 0;
    while ((await a.page.evaluate(() => document.activeElement?.id)) !== "text") {
      if (++tabs > 30) throw new Error("Tab never reached the composer");
      await a.page.keyboard.press("Tab");
    }
    expect(await a.page.evaluate(() => document.activeElement?.matches(":focus-visible"))).toBe(true);
    await a.page.keyboard.type("line one");
    await a.page.keyboard.press("Shift+Enter");
    await a.page.keyboard.type("line two");
    expect(await a.page.locator("#counter").textContent()).toBe("17 / 2000");
    await a.page.keyboard.press("Enter");
    await shownText(a.page, "line two").and(a.page.locator(":not(.pending)")).waitFor();
    expect(await texts(a.page)).toEqual(["line one\nline two"]);
    expect(await a.page.locator("#text").inputValue()).toBe("");
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("text");
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("keyboard only: a user's menu opens from the Online list with Enter, its first action has the focus, and Escape gives the focus back", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const bName = (await b.name())!;
    await a.page.locator("#people .person-button", { hasText: bName }).waitFor();
    await a.page.locator("#text").focus();
    let tabs = 0;
    while (!(await a.page.evaluate(() => document.activeElement?.classList.contains("person-button") ?? false))) {
      if (++tabs > 10) throw new Error("Tab never reached the Online list");
      await a.page.keyboard.press("Tab");
    }
    expect(await a.page.evaluate(() => document.activeElement?.matches(":focus-visible"))).toBe(true);
    await a.page.keyboard.press("Enter");
    await a.page.locator("#user-dialog[open]").waitFor();
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("user-message");
    expect(await a.page.locator("#user-dialog").getAttribute("aria-labelledby")).toBe("user-title");
    expect(await a.page.locator("#user-title").textContent()).toBe(bName);
    await a.page.keyboard.press("Escape");
    await a.page.locator("#user-dialog").waitFor({ state: "hidden" });
    expect(await a.page.evaluate(() => document.activeElement?.textContent)).toBe(bName);
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("a rate-limited message says it waits, with no button to press, and goes out by itself after retryAfterMs", async () => {
    await using chat = await serve({ rateLimit: "2/2s" });
    await using a = await open(chat.url);
    for (const text of ["one", "two", "three"]) {
      await a.page.locator("#text").fill(text);
      await a.page.locator("#text").press("Enter");
    }
    const waiting = shownText(a.page, "three");
    await waiting.locator(".state-text", { hasText: /^Waiting: too many messages, it goes out by itself in [12] s$/ }).waitFor();
    expect(await waiting.getAttribute("class")).toContain("queued");
    expect(await waiting.locator(".retry").isHidden()).toBe(true);
    await shownText(a.page, "three").and(a.page.locator("[data-id]")).waitFor();
    expect(await texts(a.page)).toEqual(["one", "two", "three"]);
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("a join shows the newest messages and Load older pages back through the rest", async () => {
    await using chat = await serve({ historyOnJoin: 5 });
    const poster = await Client.connect(chat.url, await newSession(chat.url));
    await poster.join("general");
    for (let i = 1; i <= 12; i++) await poster.say("general", `m${i}`);
    await using a = await open(chat.url);
    await shownText(a.page, "m12").waitFor();
    expect(await texts(a.page)).toEqual(["m8", "m9", "m10", "m11", "m12"]);
    await a.page.locator("#older").click();
    await shownText(a.page, /^m1$/).waitFor();
    expect(await texts(a.page)).toEqual(Array.from({ length: 12 }, (_, i) => `m${i + 1}`));
    expect(await a.page.locator("#older").isHidden()).toBe(true);
    poster.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("the list sticks to the bottom until the reader scrolls up; then a New messages button appears", async () => {
    await using chat = await serve({ rateLimit: "1000/1s" }); // one poster fills the page
    const poster = await Client.connect(chat.url, await newSession(chat.url));
    await poster.join("general");
    for (let i = 1; i <= 30; i++) await poster.say("general", `line ${i}`);
    await using a = await open(chat.url, "/", { viewport: { width: 800, height: 500 } });
    const scroller = a.page.locator("#scroller");
    const atBottom = () => scroller.evaluate((e) => e.scrollHeight - e.scrollTop - e.clientHeight < 2);
    await shownText(a.page, "line 30").waitFor();
    await until(atBottom, WAIT_MS, "the list to start at the bottom");
    await poster.say("general", "line 31");
    await shownText(a.page, "line 31").waitFor();
    await until(atBottom, WAIT_MS, "the list to follow a new message");
    expect(await a.page.locator("#jump").isHidden()).toBe(true);

    await scroller.evaluate((e) => (e.scrollTop = 0));
    await poster.say("general", "line 32");
    await shownText(a.page, "line 32").waitFor();
    await a.page.locator("#jump").waitFor();
    expect(await scroller.evaluate((e) => e.scrollTop)).toBe(0);
    await a.page.locator("#jump").click();
    await until(atBottom, WAIT_MS, "the jump to the bottom");
    expect(await a.page.locator("#jump").isHidden()).toBe(true);
    poster.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("the composer's limit and counter follow the server's maxText; a longer text is kept and refused with a reason", async () => {
    await using chat = await serve({ maxText: 12 });
    await using a = await open(chat.url);
    await a.page.locator("#text").focus();
    await a.page.keyboard.type("abcdefghijklmnop");
    expect(await a.page.locator("#text").inputValue()).toBe("abcdefghijklmnop");
    expect(await a.page.locator("#counter").textContent()).toBe("16 / 12: 4 too many");
    expect(await a.page.locator("#counter").getAttribute("class")).toContain("over");
    await a.page.keyboard.press("Enter");
    await a.page.locator("#composer-hint", { hasText: "Too long by 4 characters" }).waitFor();
    for (let i = 0; i < 4; i++) await a.page.keyboard.press("Backspace");
    expect(await a.page.locator("#counter").textContent()).toBe("12 / 12");
    expect(await a.page.locator("#counter").getAttribute("class")).toContain("near");
    expect(await a.page.locator("#composer-hint").textContent()).toBe("");
    await a.page.keyboard.press("Enter");
    await shownText(a.page, "abcdefghijkl").and(a.page.locator("[data-id]")).waitFor();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("after a server restart on the same database the page shows each missed message exactly once, through history pages and a refused page", async () => {
    await using server = await restartable();
    const first = server.current;
    {
      // ?backoff: a fixed reconnect delay, so the page comes back promptly once it can
      await using a = await open(first.url, "/?backoff=150");
      const name = await a.name();
      const bob = await newSession(first.url);
      const b1 = await Client.connect(first.url, bob);
      await b1.join("general");
      await say(a.page, "before the restart");
      await b1.say("general", "bob before");
      await shownText(a.page, "bob before").waitFor();

      // pages of about two missed messages, and a budget that refuses the second page for a moment
      const second = await server.restartWhileOffline(a, { historyPageBytes: 1024, historyBytes: "700/1s" });
      expect(await a.page.locator("#text").isDisabled()).toBe(false); // usable offline: what is sent waits in the outbox
      const b2 = await Client.connect(second.url, bob);
      const { history } = await b2.join("general");
      expect(history.messages.map((m) => m.text)).toEqual(["before the restart", "bob before"]);
      const missed = ["missed 1", "missed 2", "missed 3"].map((text) => `${text} ${".".repeat(300)}`);
      for (const text of missed) await b2.say("general", text);
      expect(await texts(a.page)).toEqual(["before the restart", "bob before"]);

      await a.context.setOffline(false);
      await connected(a.page);
      await shownText(a.page, "missed 3").waitFor();
      expect(await a.name()).toBe(name);
      await b2.say("general", "live again");
      await shownText(a.page, "live again").waitFor();
      await say(a.page, "a is back");
      await b2.next((f) => f.type === "message" && f.text === "a is back");
      expect(await texts(a.page)).toEqual(["before the restart", "bob before", ...missed, "live again", "a is back"]);
      expect(await metric(second.url, "chat_rate_limited_total")).toBeGreaterThan(0); // a page was refused, and asked again
      expect(await a.page.locator(".log > .msg[data-id]").evaluateAll((els) => els.map((e) => Number(e.getAttribute("data-id"))))).toEqual([1, 2, 3, 4, 5, 6, 7]);
      b1.close();
      b2.close();
      expect(a.errors).toEqual([]);
    }
  }, TEST_MS);

  test("a message whose echo was lost is matched by its ref in the recovered history; a lost say is sent again once", async () => {
    await using chat = await serve();
    // the page's socket goes through a proxy that can drop one frame and cut the line
    let drop = { fromServer: "", fromPage: "", done: Promise.withResolvers<void>() };
    let line: { page: WebSocketRoute; server: WebSocketRoute } | undefined;
    const setup = (page: Page) =>
      page.routeWebSocket(/\/chat$/, (ws) => {
        const server = ws.connectToServer();
        line = { page: ws, server };
        ws.onMessage((frame) => {
          if (drop.fromPage && String(frame).includes(drop.fromPage)) return drop.done.resolve();
          server.send(frame);
        });
        server.onMessage((frame) => {
          if (drop.fromServer && String(frame).includes(drop.fromServer)) return drop.done.resolve();
          ws.send(frame);
        });
      });
    const dropNext = (where: { fromServer?: string; fromPage?: string }) =>
      (drop = { fromServer: "", fromPage: "", ...where, done: Promise.withResolvers<void>() });
    /** Cuts the line after the drop happened; the page reconnects (?backoff=50) and catches up. */
    const cutAndReconnect = async () => {
      await drop.done.promise;
      dropNext({});
      const old = line!;
      await old.server.close({ code: 1000 });
      await old.page.close({ code: 4000, reason: "test cut the line" });
      await a.page.locator('#status:not([data-state="connected"])').waitFor();
      await connected(a.page);
    };
    await using a = await open(chat.url, "/?backoff=50", { setup });
    const bob = await Client.connect(chat.url, await newSession(chat.url));
    await bob.join("general");

    // 1. stored and broadcast, but the echo never reaches the page: it stays pending…
    dropNext({ fromServer: "echo lost" });
    await a.page.locator("#text").fill("echo lost");
    await a.page.locator("#text").press("Enter");
    await bob.next((f) => f.type === "message" && f.text === "echo lost");
    await cutAndReconnect();
    // …until the recovered history shows the same ref: marked sent, not sent again
    await shownText(a.page, "echo lost").and(a.page.locator("[data-id]")).waitFor();
    expect(await a.page.locator(".log .pending").count()).toBe(0);

    // 2. the say never reaches the server: after the reconnect it is sent again, with its ref
    dropNext({ fromPage: "say lost" });
    await a.page.locator("#text").fill("say lost");
    await a.page.locator("#text").press("Enter");
    expect(await shownText(a.page, "say lost").getAttribute("class")).toContain("pending");
    await cutAndReconnect();
    await shownText(a.page, "say lost").and(a.page.locator("[data-id]")).waitFor();
    expect(await texts(a.page)).toEqual(["echo lost", "say lost"]);
    const again = await bob.next((f) => f.type === "message" && f.text === "say lost");
    expect(again.ref).toMatch(/^[0-9a-f]{24}$/);
    const res = await fetch(`${chat.url}/api/rooms/general/messages`, { headers: { cookie: (await newSession(chat.url)).cookie } });
    const stored = ((await res.json()) as { messages: { text: string }[] }).messages.map((m) => m.text);
    expect(stored).toEqual(["echo lost", "say lost"]);
    bob.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("accounts: a guest chats and signs up keeping its name, logs in on a second device as the same user, and signs the first device out from there", async () => {
    await using chat = await serve();
    await using a = await open(chat.url, "/?backoff=50");
    const name = (await a.name())!;
    await say(a.page, "said as a guest");
    // sign up: the guest's name becomes an account's
    await a.page.locator("#signup-open").click();
    await a.page.locator("#signup-password").fill("short");
    await a.page.locator("#signup-password").press("Enter");
    await a.page.locator("#signup-error", { hasText: "8 characters or more" }).waitFor();
    await a.page.locator("#signup-password").fill("correct horse battery");
    await a.page.locator("#signup-password").press("Enter");
    await a.page.locator("#me-view", { hasText: `Signed in as ${name}` }).waitFor();
    expect(await a.page.locator("#signup-dialog").isVisible()).toBe(false);
    expect(await a.page.locator("#signup-open").isHidden()).toBe(true);
    await say(a.page, "said after signing up"); // the socket stayed open

    // a second device: a guest first, then logged in as the account
    await using b = await open(chat.url, "/?backoff=50");
    expect(await b.name()).not.toBe(name);
    await shownText(b.page, "said as a guest").and(b.page.locator(":not(.own)")).waitFor();
    await b.page.locator("#login-open").click();
    await b.page.locator("#login-name").fill(name);
    await b.page.locator("#login-password").fill("not the password");
    await b.page.locator("#login-password").press("Enter");
    await b.page.locator("#login-error", { hasText: "Wrong name or password" }).waitFor();
    await b.page.locator("#login-password").fill("correct horse battery");
    await b.page.locator("#login-password").press("Enter");
    await b.page.locator("#me-view", { hasText: `Signed in as ${name}` }).waitFor();
    await connected(b.page);
    expect(await b.name()).toBe(name);
    // the earlier messages are the account's own now
    await shownText(b.page, "said as a guest").and(b.page.locator(".own")).waitFor();
    await say(b.page, "said from the second device");
    await shownText(a.page, "said from the second device").and(a.page.locator(".own")).waitFor();

    // the sessions list: two, this one marked; signing the other out closes the first page's socket
    await b.page.locator("#sessions-open").click();
    const sessions = b.page.locator("#sessions-list > li");
    await sessions.nth(1).waitFor();
    expect(await sessions.count()).toBe(2);
    expect(await sessions.filter({ hasText: "this device" }).count()).toBe(1);
    await sessions.getByRole("button", { name: /^Sign out/ }).click();
    await a.page.locator(".alert", { hasText: "You were signed out (on this or another device)" }).waitFor();
    await until(async () => (await sessions.count()) === 1, WAIT_MS, "the sessions list to drop the first device");
    await b.page.keyboard.press("Escape");
    // the first page carries on as a fresh guest; the account's messages are not its own there now
    await a.page.locator("#me-view", { hasText: /^You are / }).waitFor();
    await connected(a.page);
    expect(await a.name()).not.toBe(name);
    await shownText(a.page, "said as a guest").and(a.page.locator(":not(.own)")).waitFor();
    expect(await b.page.locator("#status").getAttribute("data-state")).toBe("connected");

    // logging out makes the second device a guest too
    await b.page.locator("#logout").click();
    await b.page.locator("#me-view", { hasText: /^You are / }).waitFor();
    await connected(b.page);
    expect(await b.name()).not.toBe(name);
    expect(await b.page.locator(".alert", { hasText: "signed out" }).count()).toBe(0); // its own doing: no notice
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  /** Signs the page's guest up with a password (keeping its name), through the Sign up dialog. */
  async function signUp(page: Page, password = "correct horse battery") {
    await page.locator("#signup-open").click();
    await page.locator("#signup-password").fill(password);
    await page.locator("#signup-password").press("Enter");
    await page.locator("#me-view", { hasText: "Signed in as" }).waitFor();
  }

  /** A private room made through the New room dialog by a signed-up page, open and joined. */
  async function createPrivate(page: Page, name: string) {
    await page.locator("#create-open").click();
    await page.locator("#create-name").fill(name);
    await page.locator("#create-private").check();
    await page.locator("#create-name").press("Enter");
    await page.locator("#room-title", { hasText: `#${name}` }).waitFor();
    await connected(page);
  }

  /** Opens a user's menu from the open room's Online list. */
  async function menuOf(page: Page, name: string) {
    await page.locator("#people .person-button", { hasText: name }).click();
    await page.locator("#user-dialog[open]").waitFor();
    return page.locator("#user-dialog");
  }

  test("private rooms: made from the New room dialog, an invitation from the Online list reaches the other page, which joins; a kick shows the removed notice", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const [aName, bName] = [(await a.name())!, (await b.name())!];
    // a guest cannot make a private room: the dialog says why
    await b.page.locator("#create-open").click();
    await b.page.locator("#create-name").fill("guestroom");
    await b.page.locator("#create-private").check();
    await b.page.locator("#create-name").press("Enter");
    await b.page.locator("#create-error", { hasText: "sign up first" }).waitFor();
    await b.page.keyboard.press("Escape");

    await signUp(a.page);
    await createPrivate(a.page, "secret");
    expect(await a.page.locator('.room-link[href="#secret"] .room-kind').textContent()).toContain("(private)");
    await a.page.locator("#settings-open").waitFor(); // the owner's settings button

    await a.page.locator('.room-link[href="#general"]').click();
    const menu = await menuOf(a.page, bName);
    await menu.getByRole("button", { name: "Invite to #secret" }).click();
    await a.page.locator("#user-dialog").waitFor({ state: "hidden" });
    const invitation = b.page.locator(".alert", { hasText: `${aName} invited you to #secret` });
    await invitation.waitFor();
    await invitation.getByRole("button", { name: "Join" }).click();
    await b.page.locator("#room-title", { hasText: "#secret" }).waitFor();
    await connected(b.page);
    await say(b.page, "b in the secret room");
    await a.page.locator('.room-link[href="#secret"]').click();
    await shownText(a.page, "b in the secret room").waitFor();

    // the kick, from the author's name on the message
    await shownText(a.page, "b in the secret room").locator(".author-button").click();
    await a.page.locator("#user-dialog[open] #user-kick").click();
    await b.page.locator(".alert", { hasText: `You were removed from #secret by ${aName} (kicked)` }).waitFor();
    expect(await b.page.locator('.room-link[href="#secret"]').count()).toBe(0);
    await a.page.locator(".log:not([hidden]) .system", { hasText: `${aName} removed ${bName}` }).waitFor();
    // out of a private room means out: joining it by name is refused and says so
    await b.page.evaluate(() => (location.hash = "#secret"));
    await b.page.locator(".alert", { hasText: "You cannot join #secret" }).waitFor();
    expect(await b.page.locator('.room-link[href="#secret"]').count()).toBe(0);
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("moderation: a mute shows in both pages and on the muted user's message; the settings panel lists members, mutes and the audit log, and lifts the mute; a ban removes", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const [aName, bName] = [(await a.name())!, (await b.name())!];
    await signUp(a.page);
    await createPrivate(a.page, "club");
    await a.page.locator('.room-link[href="#general"]').click();
    await (await menuOf(a.page, bName)).getByRole("button", { name: "Invite to #club" }).click();
    await b.page.locator(".alert", { hasText: "invited you to #club" }).getByRole("button", { name: "Join" }).click();
    await connected(b.page);
    await a.page.locator('.room-link[href="#club"]').click();
    await a.page.locator("#people .person-button", { hasText: bName }).waitFor();

    // mute for 5 minutes from the user's menu
    const menu = await menuOf(a.page, bName);
    await menu.getByLabel("Mute for minutes").fill("5");
    await menu.getByRole("button", { name: "Mute" }).click();
    await b.page.locator(".alert", { hasText: `${aName} muted you in #club for 5 min` }).waitFor();
    await a.page.locator(".log:not([hidden]) .system", { hasText: `${aName} muted ${bName} for 5 min` }).waitFor();
    await b.page.locator("#text").fill("can anyone hear me");
    await b.page.locator("#text").press("Enter");
    await shownText(b.page, "can anyone hear me").locator(".state-text", { hasText: "You are muted in #club for 5 more minutes" }).waitFor();

    // the settings panel: members with roles, the mute in force, the audit log; unmute from there
    await a.page.locator("#settings-open").click();
    const panel = a.page.locator("#settings-dialog");
    await panel.locator("#members-list li", { hasText: bName }).waitFor();
    expect(await panel.locator("#members-list li", { hasText: aName }).textContent()).toContain("owner");
    expect(await panel.locator("#members-list li", { hasText: bName }).textContent()).toContain("member");
    await panel.locator("#audit-list li", { hasText: `${aName} muted ${bName}` }).waitFor();
    await panel.locator("#mutes-list li", { hasText: bName }).getByRole("button", { name: /^Unmute/ }).click();
    await b.page.locator(".alert", { hasText: `${aName} unmuted you in #club` }).waitFor();
    await until(async () => (await panel.locator("#mutes-list li").count()) === 0, WAIT_MS, "the mutes list to empty");
    await panel.locator("#members-list li", { hasText: bName }).getByRole("button", { name: /^Make moderator/ }).click();
    await panel.locator("#members-list li", { hasText: bName }).filter({ hasText: "moderator" }).getByRole("button", { name: /^Remove moderator/ }).waitFor();
    await panel.locator("#members-list li", { hasText: bName }).getByRole("button", { name: /^Remove moderator/ }).click();
    await panel.locator("#members-list li", { hasText: bName }).getByRole("button", { name: /^Make moderator/ }).waitFor();
    await a.page.keyboard.press("Escape");
    await say(b.page, "heard again");

    // a ban (until lifted) takes b out of the room
    const again = await menuOf(a.page, bName);
    await again.getByRole("button", { name: "Ban" }).click();
    await b.page.locator(".alert", { hasText: `You were removed from #club by ${aName} (banned)` }).waitFor();
    await a.page.locator("#settings-open").click();
    await panel.locator("#bans-list li", { hasText: bName }).filter({ hasText: "until lifted" }).waitFor();
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("the settings panel invites by name anyone online in the page's rooms, and says so for a name it cannot find", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const [aName, bName] = [(await a.name())!, (await b.name())!];
    await signUp(a.page);
    await createPrivate(a.page, "backroom");
    await a.page.locator("#settings-open").click();
    await a.page.locator("#invite-name").fill("nobody-here");
    await a.page.locator("#invite-name").press("Enter");
    await a.page.locator("#settings-error", { hasText: "No one named “nobody-here” is online in your rooms" }).waitFor();
    await a.page.locator("#invite-name").fill(bName.toUpperCase()); // names match ignoring case
    await a.page.locator("#invite-name").press("Enter");
    const invitation = b.page.locator(".alert", { hasText: `${aName} invited you to #backroom` });
    await invitation.waitFor();
    await a.page.locator("#members-list li", { hasText: bName }).waitFor();
    await a.page.keyboard.press("Escape");

    // a member's Leave leaves a private room for good: gone from the members and, after a reload, from b's list
    await invitation.getByRole("button", { name: "Join" }).click();
    await b.page.locator("#room-title", { hasText: "#backroom" }).waitFor();
    await connected(b.page);
    expect(await b.page.locator("#settings-open").isHidden()).toBe(true); // a member does not moderate
    await b.page.getByRole("button", { name: "Leave #backroom for good" }).click(); // once b's role is known
    await b.page.locator("#room-title", { hasText: "#general" }).waitFor();
    await a.page.locator("#settings-open").click();
    await a.page.locator("#members-list li", { hasText: aName }).waitFor();
    await until(async () => (await a.page.locator("#members-list li", { hasText: bName }).count()) === 0, WAIT_MS, "b to leave the members");
    await b.page.reload();
    await connected(b.page);
    expect(await b.page.locator('.room-link[href="#backroom"]').count()).toBe(0);
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("GUESTS=read: a guest's message is refused on the message and in one notice; after signing up, its retry is sent", async () => {
    await using chat = await serve({ guests: "read" });
    await using a = await open(chat.url);
    await a.page.locator("#text").fill("a guest tries");
    await a.page.locator("#text").press("Enter");
    const refused = shownText(a.page, "a guest tries");
    await refused.locator(".state-text", { hasText: "Guests may read but not write here" }).waitFor();
    await a.page.locator(".alert", { hasText: "Guests may read but not write here" }).waitFor();
    await signUp(a.page);
    await refused.locator(".retry").click();
    await shownText(a.page, "a guest tries").and(a.page.locator("[data-id]")).waitFor();
    expect(await a.page.locator(".alert").count()).toBe(1);
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("GUESTS=off: the page says why a guest cannot connect, and connects once it logs in", async () => {
    await using chat = await serve({ guests: "off" });
    const account = await newSession(chat.url);
    const made = await fetch(`${chat.url}/api/me/password`, { method: "POST", headers: { cookie: account.cookie, "content-type": "application/json" }, body: JSON.stringify({ password: "correct horse battery" }) });
    expect(made.status).toBe(200);
    const context = await browser.newContext();
    context.setDefaultTimeout(WAIT_MS);
    try {
      const page = await context.newPage();
      await page.goto(`${chat.url}/?backoff=50`);
      await page.locator(".alert", { hasText: "if this server is for accounts only, sign up or log in" }).waitFor();
      await page.locator("#login-open").click();
      await page.locator("#login-name").fill(account.name);
      await page.locator("#login-password").fill("correct horse battery");
      await page.locator("#login-password").press("Enter");
      await page.locator("#me-view", { hasText: `Signed in as ${account.name}` }).waitFor();
      await connected(page);
      await say(page, "an account may chat");
    } finally {
      await context.close();
    }
  }, TEST_MS);

  test("an instance ban closes the page's socket with 4003: it says the account is banned and does not reconnect", async () => {
    await using chat = await serve();
    const admin = await newSession(chat.url);
    const made = await fetch(`${chat.url}/api/me/password`, { method: "POST", headers: { cookie: admin.cookie, "content-type": "application/json" }, body: JSON.stringify({ password: "correct horse battery" }) });
    expect(((await made.json()) as { admin: boolean }).admin).toBe(true);
    const cookie = made.headers.get("set-cookie")!.split(";")[0]!;
    await using b = await open(chat.url, "/?backoff=50");
    const id = await b.page.evaluate(async () => ((await (await fetch("/api/me")).json()) as { id: string }).id);
    expect((await fetch(`${chat.url}/api/users/${id}/ban`, { method: "PUT", headers: { cookie } })).status).toBe(204);
    await b.page.locator(".alert", { hasText: "This account is banned" }).waitFor();
    await b.page.locator('#status[data-state="stopped"]', { hasText: "Disconnected" }).waitFor();
    expect(await b.page.locator("#retry-now").isHidden()).toBe(true);
    expect(await b.page.locator("#text").isDisabled()).toBe(true);
    expect(b.errors).toEqual([]);
  }, TEST_MS);

  test("a direct message starts from a user's menu and shows as @name in both pages' room lists", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const [aName, bName] = [(await a.name())!, (await b.name())!];
    await (await menuOf(a.page, bName)).getByRole("button", { name: "Message" }).click();
    await a.page.locator("#room-title", { hasText: `@${bName}` }).waitFor();
    expect(new URL(a.page.url()).hash).toMatch(/^#dm-[0-9a-f]{20}$/);
    await connected(a.page);
    await say(a.page, "just between us");
    expect(await a.page.locator('.room-link[data-kind="dm"] .room-name').textContent()).toBe(bName);
    // the other page finds it in GET /api/rooms
    await b.page.reload();
    await connected(b.page);
    const dm = b.page.locator('.room-link[data-kind="dm"]', { hasText: aName });
    await dm.click();
    await shownText(b.page, "just between us").waitFor();
    expect(await b.page.locator("#room-title").textContent()).toBe(`@${aName}`);
    expect(await b.page.locator("#settings-open").isHidden()).toBe(true); // dms have no moderation
    // Leave closes a dm here, and it stays closed after a reload
    await b.page.locator("#leave").click();
    await b.page.locator("#room-title", { hasText: "#general" }).waitFor();
    await b.page.reload();
    await connected(b.page);
    expect(await b.page.locator('.room-link[data-kind="dm"]').count()).toBe(0);
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  /** A shown server message by id, in the open room. */
  const byId = (page: Page, id: string | number) => page.locator(`.log:not([hidden]) > .msg[data-id="${id}"]`);
  /** A message's tool (Reply, React, Edit, Delete): shown on hover, then clicked. */
  async function tool(message: ReturnType<Page["locator"]>, name: string) {
    await message.hover();
    await message.locator(".tools").getByRole("button", { name, exact: true }).click();
  }

  test("edit: your own message only, inline (Escape cancels, Enter saves), marked edited on both pages; delete asks first and leaves a tombstone on both", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    await say(a.page, "teh typo");
    const id = (await shownText(a.page, "teh typo").getAttribute("data-id"))!;
    const [onA, onB] = [byId(a.page, id), byId(b.page, id)];
    await onB.waitFor();
    await onB.hover();
    expect(await onB.locator(".tools .edit").isHidden()).toBe(true); // not b's to edit or delete
    expect(await onB.locator(".tools .delete").isHidden()).toBe(true);

    await tool(onA, "Edit");
    const input = onA.locator(".edit-input");
    expect(await a.page.evaluate(() => document.activeElement?.className)).toBe("edit-input");
    await input.fill("changed my mind");
    await input.press("Escape");
    expect(await input.count()).toBe(0);
    expect(await onA.locator(".text").textContent()).toBe("teh typo");
    await tool(onA, "Edit");
    await input.fill("the typo, fixed");
    await input.press("Enter");
    for (const message of [onA, onB]) await message.locator(".edited", { hasText: "edited" }).waitFor();
    expect(await texts(b.page)).toEqual(["the typo, fixed"]);
    await onA.locator(".state").waitFor({ state: "hidden" }); // "Saving…" went with the updated frame

    // delete: Cancel keeps it; Delete makes it a tombstone everywhere
    await tool(onA, "Delete");
    const dialog = a.page.locator("#delete-dialog");
    await dialog.locator("#delete-text", { hasText: "“the typo, fixed” will show as “message deleted” for everyone" }).waitFor();
    await dialog.getByRole("button", { name: "Cancel" }).click();
    await dialog.waitFor({ state: "hidden" });
    expect(await texts(a.page)).toEqual(["the typo, fixed"]);
    await tool(onA, "Delete");
    await dialog.getByRole("button", { name: "Delete", exact: true }).click();
    for (const page of [a.page, b.page]) await byId(page, id).and(page.locator(".deleted")).waitFor();
    for (const page of [a.page, b.page]) expect(await texts(page)).toEqual(["message deleted"]);
    expect(await onB.locator(".edited").count()).toBe(0);
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("reactions: the picker adds one, chips count with yours pressed, a click toggles, and the picker offers the ones already there", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const bob = await Client.connect(chat.url, await newSession(chat.url));
    await bob.join("general");
    await say(a.page, "react to me");
    const id = Number(await shownText(a.page, "react to me").getAttribute("data-id"));
    const [onA, onB] = [byId(a.page, id), byId(b.page, id)];
    await onB.waitFor();
    await tool(onB, "React");
    await onB.getByRole("button", { name: "React with 🎉" }).click();
    await onA.locator('.chip[aria-pressed="false"]', { hasText: "🎉 1" }).waitFor();
    await onB.locator('.chip[aria-pressed="true"]', { hasText: "🎉 1" }).waitFor();
    expect(await onB.locator(".picker").count()).toBe(0);

    await onA.locator(".chip").click(); // a joins in
    await onB.locator(".chip", { hasText: "🎉 2" }).waitFor();
    await onA.locator('.chip[aria-pressed="true"]', { hasText: "🎉 2" }).waitFor();
    await onB.locator(".chip").click(); // b takes its own back
    await onA.locator(".chip", { hasText: "🎉 1" }).waitFor();
    await onB.locator('.chip[aria-pressed="false"]', { hasText: "🎉 1" }).waitFor();

    // an emoji not among the common ones is offered once it is on the message; Escape closes the picker
    bob.send({ type: "react", room: "general", id, emoji: "🦀", on: true });
    await onA.locator(".chip", { hasText: "🦀 1" }).waitFor();
    expect(await onA.locator(".chip").allTextContents()).toEqual(["🎉 1", "🦀 1"]);
    await tool(onA, "React");
    await onA.getByRole("button", { name: "React with 🦀" }).waitFor();
    await onA.getByRole("button", { name: "Take back 🎉" }).waitFor();
    await a.page.keyboard.press("Escape");
    expect(await onA.locator(".picker").count()).toBe(0);
    bob.close();
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("reply: the message shows a quoted line of the original; a click jumps to it, loading older history when it is not shown", async () => {
    await using chat = await serve({ historyOnJoin: 5 });
    const bob = await Client.connect(chat.url, await newSession(chat.url));
    await bob.join("general");
    const original = await bob.say("general", "the original question");
    for (let i = 1; i <= 8; i++) await bob.say("general", `filler ${i}`);
    bob.send({ type: "say", room: "general", text: "an answer, much later", replyTo: original.id, ref: "r1" });
    await bob.next((f) => f.type === "message" && f.ref === "r1");
    await using a = await open(chat.url);
    const answer = shownText(a.page, "an answer, much later");
    await answer.locator(".quote", { hasText: "an earlier message" }).waitFor(); // not loaded yet
    await answer.locator(".quote").click();
    const shownOriginal = byId(a.page, original.id);
    await shownOriginal.waitFor();
    await a.page.waitForFunction((id) => document.activeElement?.getAttribute("data-id") === String(id), original.id);
    await answer.locator(".quote", { hasText: `${original.user.name}: the original question` }).waitFor();

    // replying from the page: the composer says to what, and the other side sees the quote
    await tool(byId(a.page, original.id), "Reply");
    await a.page.locator("#reply-bar", { hasText: `Replying to ${original.user.name}: the original question` }).waitFor();
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("text");
    await say(a.page, "me too");
    expect(await a.page.locator("#reply-bar").isHidden()).toBe(true);
    const got = await bob.next((f) => f.type === "message" && f.text === "me too");
    expect(got.replyTo).toBe(original.id);
    await shownText(a.page, "me too").locator(".quote", { hasText: "the original question" }).waitFor();
    bob.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("a page offline across a server restart during an edit, a delete and a reaction shows all three after it reconnects, then live changes again", async () => {
    await using server = await restartable();
    const first = server.current;
    {
      await using a = await open(first.url, "/?backoff=150");
      const bob = await newSession(first.url);
      const b1 = await Client.connect(first.url, bob);
      await b1.join("general");
      const [edit, gone, react] = [await b1.say("general", "to edit"), await b1.say("general", "to delete"), await b1.say("general", "to react")];
      await shownText(a.page, "to react").waitFor();

      const second = await server.restartWhileOffline(a);
      const b2 = await Client.connect(second.url, bob);
      await b2.join("general");
      b2.send({ type: "edit", room: "general", id: edit.id, text: "edited while away", ref: "e" });
      b2.send({ type: "delete", room: "general", id: gone.id, ref: "d" });
      b2.send({ type: "react", room: "general", id: react.id, emoji: "👍", on: true, ref: "r" });
      for (const ref of ["e", "d", "r"]) await b2.next((f) => f.type === "updated" && f.ref === ref);
      expect(await texts(a.page)).toEqual(["to edit", "to delete", "to react"]);

      await a.context.setOffline(false);
      await connected(a.page);
      await byId(a.page, edit.id).locator(".edited").waitFor();
      await byId(a.page, gone.id).and(a.page.locator(".deleted")).waitFor();
      await byId(a.page, react.id).locator(".chip", { hasText: "👍 1" }).waitFor();
      expect(await texts(a.page)).toEqual(["edited while away", "message deleted", "to react"]);
      // live again, in sequence: no gap, nothing twice
      b2.send({ type: "react", room: "general", id: react.id, emoji: "👍", on: false, ref: "r2" });
      await byId(a.page, react.id).locator(".chip").waitFor({ state: "detached" });
      await b2.say("general", "live again");
      await shownText(a.page, "live again").waitFor();
      expect(await texts(a.page)).toEqual(["edited while away", "message deleted", "to react", "live again"]);
      b1.close();
      b2.close();
      expect(a.errors).toEqual([]);
    }
  }, TEST_MS);

  test("unread counts come from GET /api/me/rooms and agree on two pages of one account; reading on one clears the other", async () => {
    await using chat = await serve();
    await using a1 = await open(chat.url);
    const name = (await a1.name())!;
    await signUp(a1.page);
    await a1.page.locator("#join-input").fill("random");
    await a1.page.locator("#join-input").press("Enter");
    await a1.page.locator("#room-title", { hasText: "#random" }).waitFor();
    await connected(a1.page);
    await a1.page.locator('.room-link[href="#general"]').click();
    await a1.page.locator("#room-title", { hasText: "#general" }).waitFor();
    // the second device logs in as the account: the room list follows it there
    await using a2 = await open(chat.url);
    await a2.page.locator("#login-open").click();
    await a2.page.locator("#login-name").fill(name);
    await a2.page.locator("#login-password").fill("correct horse battery");
    await a2.page.locator("#login-password").press("Enter");
    await a2.page.locator("#me-view", { hasText: `Signed in as ${name}` }).waitFor();
    await a2.page.locator('.room-link[href="#random"]').waitFor();
    await connected(a2.page);

    const bob = await Client.connect(chat.url, await newSession(chat.url));
    await bob.join("random");
    await bob.say("random", "unread one");
    await bob.say("random", "unread two");
    const badge = (page: Page) => page.locator('.room-link[href="#random"] .unread');
    for (const { page } of [a1, a2]) await badge(page).locator(".unread-count", { hasText: /^2$/ }).waitFor();
    // a reload counts the same, from the server
    await a2.page.reload();
    await connected(a2.page);
    await badge(a2.page).locator(".unread-count", { hasText: /^2$/ }).waitFor();
    expect(await a2.page.title()).toBe("(2) #general · Chat");

    await a1.page.locator('.room-link[href="#random"]').click();
    await shownText(a1.page, "unread two").waitFor();
    for (const { page } of [a1, a2]) await badge(page).waitFor({ state: "hidden" });
    await a2.page.reload();
    await connected(a2.page);
    expect(await badge(a2.page).isHidden()).toBe(true);
    // the divider marks the first unread message when a room opens
    await bob.say("random", "after the divider");
    await badge(a2.page).locator(".unread-count", { hasText: /^1$/ }).waitFor();
    await a2.page.locator('.room-link[href="#random"]').click();
    await shownText(a2.page, "after the divider").waitFor();
    expect(await a2.page.locator(".log:not([hidden]) > .divider + .msg .text").textContent()).toBe("after the divider");
    bob.close();
    expect([...a1.errors, ...a2.errors]).toEqual([]);
  }, TEST_MS);

  test("search: the room's search box finds messages by their words, newest first, and a result jumps to its message (loading older history)", async () => {
    await using chat = await serve({ historyOnJoin: 5 });
    const bob = await Client.connect(chat.url, await newSession(chat.url));
    await bob.join("general");
    const needle = await bob.say("general", "the quarterly numbers are in");
    for (let i = 1; i <= 8; i++) await bob.say("general", `filler ${i}`);
    await bob.say("general", "numbers again, later");
    await using a = await open(chat.url);
    const search = async (q: string) => {
      await a.page.locator("#search-input").fill(q);
      await a.page.locator("#search-input").press("Enter");
    };
    await search("numbers");
    await a.page.locator("#search-status", { hasText: "2 messages in #general match “numbers”" }).waitFor();
    expect(await a.page.locator("#search-results .hit-text").allTextContents()).toEqual(["numbers again, later", "the quarterly numbers are in"]);
    await search("quarterly num"); // every word, the last one as a prefix
    await a.page.locator("#search-status", { hasText: "1 message in #general matches “quarterly num”" }).waitFor();
    expect(await byId(a.page, needle.id).count()).toBe(0); // older than the join's history
    await a.page.locator("#search-results .hit").click();
    await byId(a.page, needle.id).waitFor();
    await a.page.waitForFunction((id) => document.activeElement?.getAttribute("data-id") === String(id), needle.id);
    // an edit is reflected at once; Escape closes the results
    bob.send({ type: "edit", room: "general", id: needle.id, text: "the yearly figures are in", ref: "e" });
    await byId(a.page, needle.id).locator(".text", { hasText: "the yearly figures are in" }).waitFor();
    await search("quarterly");
    await a.page.locator("#search-status", { hasText: "No messages in #general match “quarterly”" }).waitFor();
    await a.page.locator("#search-input").press("Escape");
    expect(await a.page.locator("#search-panel").isHidden()).toBe(true);
    bob.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("keyboard only: Tab enters the log at the newest message, arrows move between messages, Tab reaches their buttons, Escape cancels a reply", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await say(a.page, "first");
    await say(a.page, "second");
    const focused = () => a.page.evaluate(() => {
      const active = document.activeElement!;
      return active.matches(".msg") ? `message ${active.querySelector(".text")!.textContent}` : active.textContent;
    });
    await a.page.locator("#scroller").focus();
    await a.page.keyboard.press("Tab");
    expect(await focused()).toBe("message second");
    expect(await a.page.evaluate(() => document.activeElement?.matches(":focus-visible"))).toBe(true);
    await a.page.keyboard.press("ArrowUp");
    expect(await focused()).toBe("message first");
    await a.page.keyboard.press("Tab");
    expect(await focused()).toBe("Reply");
    await a.page.keyboard.press("Enter");
    await a.page.locator("#reply-bar", { hasText: "first" }).waitFor();
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("text");
    await a.page.keyboard.press("Escape");
    expect(await a.page.locator("#reply-bar").isHidden()).toBe(true);
    // the log stays one tab stop: coming back, Tab lands on the message last focused
    await a.page.locator("#scroller").focus();
    await a.page.keyboard.press("Tab");
    expect(await focused()).toBe("message first");
    await a.page.keyboard.press("End");
    expect(await focused()).toBe("message second");
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("mentions: @ completes names from the room's presence; the message mentioning you is highlighted and counted in the room list", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const bName = (await b.name())!;
    await a.page.locator("#people .person-button", { hasText: bName }).waitFor();
    await a.page.locator("#text").pressSequentially(`hi @${bName.slice(0, 3)}`);
    const option = a.page.locator("#mention-list [role=option]", { hasText: bName });
    await option.waitFor();
    expect(await option.getAttribute("aria-selected")).toBe("true");
    expect(await a.page.locator("#text").getAttribute("aria-expanded")).toBe("true");
    await a.page.locator("#text").press("Enter"); // picks the name; a second Enter sends
    expect(await a.page.locator("#text").inputValue()).toBe(`hi @${bName} `);
    expect(await a.page.locator("#mention-list").isHidden()).toBe(true);
    await a.page.locator("#text").pressSequentially("look");
    await a.page.locator("#text").press("Enter");
    const text = `hi @${bName} look`;
    await shownText(b.page, text).and(b.page.locator(".mention")).waitFor();
    await shownText(a.page, text).and(a.page.locator("[data-id]")).waitFor();
    expect(await shownText(a.page, text).getAttribute("class")).not.toContain("mention"); // it mentions b, not a

    // in another room, b's list counts the mention
    await b.page.locator("#join-input").fill("random");
    await b.page.locator("#join-input").press("Enter");
    await b.page.locator("#room-title", { hasText: "#random" }).waitFor();
    await connected(b.page);
    await say(a.page, `@${bName} again`);
    const general = b.page.locator('.room-link[href="#general"]');
    await general.locator(".mention-count", { hasText: /^1$/ }).waitFor();
    expect(await general.locator(".unread-count").textContent()).toBe("1");
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("at 360 px wide nothing overflows sideways and the composer stays in view", async () => {
    await using chat = await serve();
    await using a = await open(chat.url, "/", { viewport: { width: 360, height: 720 } });
    await say(a.page, "a long word: " + "x".repeat(300));
    expect(await a.page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(360);
    const box = await a.page.locator("#text").boundingBox();
    expect(box!.y + box!.height).toBeLessThanOrEqual(720);
    expect(box!.width).toBeGreaterThan(200);
    expect(a.errors).toEqual([]);
  }, TEST_MS);
});

// No browser needed: read the page's source.
describe("client.html", () => {
  test("the handlers table has a handler for every ServerMessage type, and no HTML is ever parsed from strings", () => {
    const html = readFileSync(join(ROOT, "client.html"), "utf8");
    const start = html.indexOf("const handlers = {");
    expect(start).toBeGreaterThan(0);
    const body = html.slice(start, html.indexOf("\n};\n", start));
    const handlers = [...body.matchAll(/^  (\w+)\(msg\b/gm)].map((m) => m[1]).sort();
    const types = ServerMessage.options.map((o) => o.shape.type.value).sort();
    expect(handlers).toEqual(types);
    expect(html).not.toMatch(/innerHTML|outerHTML|insertAdjacentHTML|document\.write/);
  });
});
