// The page used every day (issue 17), in headless Chromium: the outbox, drafts, right-to-left text, reconnects,
// rooms and the directory, tabs that agree, the phone layout, attention and the keyboard.
// Skips with one line when /usr/bin/chromium is missing, unless CHAT_TEST_REQUIRE_ALL=1 (then it fails).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { Browser, BrowserContextOptions, Page } from "playwright-core";
import { launchChromium, shown, shownText, skipWithoutChromium, texts } from "./chromium.ts";
import { Client, newSession, putName, ROOT, serve, tempDir, until } from "./helpers.ts";

const WAIT_MS = 5_000; // any one wait on the page
const SEND_MS = 15_000; // a wait that spans rate limits or a restart
const TEST_MS = 30_000;
const SKIP = skipWithoutChromium("page tests");
const PHONE = { viewport: { width: 360, height: 740 }, hasTouch: true, isMobile: true } satisfies BrowserContextOptions;

const confirmed = (page: Page) => page.locator(".log:not([hidden]) > .msg[data-id]");

/** The texts of a room's stored messages, oldest first, as the HTTP API has them. */
async function stored(baseUrl: string, room: string) {
  const res = await fetch(`${baseUrl}/api/rooms/${room}/messages?limit=100`, { headers: { cookie: (await newSession(baseUrl)).cookie } });
  return ((await res.json()) as { messages: { text: string }[] }).messages.map((m) => m.text);
}

describe.skipIf(SKIP)("the page, used every day", () => {
  let browser: Browser;

  beforeAll(async () => {
    browser = await launchChromium("page tests");
  });
  afterAll(async () => {
    await browser?.close();
  });

  /** A fresh profile (its own cookie, so its own user) with the chat open; `tabs` more pages of the same profile. */
  async function open(baseUrl: string, path = "/", options: BrowserContextOptions & { setup?: (page: Page) => Promise<void>; wait?: boolean } = {}) {
    const { setup = async () => {}, wait = true, ...contextOptions } = options;
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...contextOptions });
    context.setDefaultTimeout(WAIT_MS);
    const errors: string[] = [];
    const newPage = async (at = path) => {
      const page = await context.newPage();
      page.on("pageerror", (error) => errors.push(String(error)));
      await setup(page);
      await page.goto(baseUrl + at);
      if (wait) await connected(page);
      return page;
    };
    const page = await newPage();
    return {
      context,
      page,
      errors,
      newPage,
      async [Symbol.asyncDispose]() {
        await context.close();
      },
    };
  }

  async function connected(page: Page) {
    await page.locator('#status[data-state="connected"]').waitFor();
    await page.locator(".log:not([hidden])").waitFor({ state: "attached" });
  }

  async function send(page: Page, text: string) {
    await page.locator("#text").fill(text);
    await page.locator("#text").press("Enter");
  }

  async function joinRoom(page: Page, name: string) {
    await page.locator("#join-input").fill(name);
    await page.locator("#join-input").press("Enter");
    await page.locator("#room-title", { hasText: `#${name.replace(/^#/, "").toLowerCase()}` }).waitFor();
  }

  test("1. rate-limited messages wait in the outbox and go out by themselves, each once, in the order typed", async () => {
    await using chat = await serve({ rateLimit: "4/2s" });
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const typed = Array.from({ length: 12 }, (_, i) => `quick ${i}`);
    for (const text of typed) await send(a.page, text);
    // some wait out the limit, said on the message, with no button to press
    await a.page.locator(".msg.queued .state-text", { hasText: /^Waiting: too many messages, it goes out by itself in \d s$/ }).first().waitFor();
    expect(await a.page.locator(".msg.failed").count()).toBe(0);
    for (const page of [a.page, b.page]) {
      await until(async () => (await confirmed(page).count()) === typed.length, SEND_MS, "every message confirmed");
      expect(await texts(page)).toEqual(typed);
    }
    expect(await a.page.locator(".log .pending, .log .failed").count()).toBe(0);
    expect(await stored(chat.url, "general")).toEqual(typed);
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("the outbox outlives a reload of its tab: what waited goes out after it, each once, in the order typed", async () => {
    await using chat = await serve({ rateLimit: "2/3s" });
    await using a = await open(chat.url);
    const typed = Array.from({ length: 6 }, (_, i) => `before the reload ${i}`);
    for (const text of typed) await send(a.page, text);
    await a.page.locator(".msg.queued .state-text", { hasText: /^Waiting: too many messages/ }).first().waitFor();
    await a.page.reload();
    await connected(a.page);
    // the ones not confirmed before the reload are back, pending, and go out by themselves
    await until(async () => (await confirmed(a.page).count()) === typed.length, SEND_MS, "every message confirmed after the reload");
    expect(await texts(a.page)).toEqual(typed);
    expect(await a.page.locator(".log .pending, .log .failed").count()).toBe(0);
    expect(await stored(chat.url, "general")).toEqual(typed);
    expect(await a.page.evaluate(() => sessionStorage.getItem("chat.outbox"))).toBeNull();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("the outbox keeps what is typed while the server restarts and sends it once, in order; presence greys out meanwhile", async () => {
    const tmp = tempDir();
    const databaseUrl = `sqlite://${tmp.dir}/chat.db`;
    let chat = await serve({ databaseUrl });
    const port = chat.port;
    try {
      await using a = await open(chat.url, "/?backoff=200");
      await send(a.page, "before");
      await confirmed(a.page).first().waitFor();
      await chat.stop();
      await a.page.locator('#status[data-state="reconnecting"]').waitFor();
      // finding 4: the composer stays usable; presence greys out and says why
      expect(await a.page.locator("#composer-fields").isDisabled()).toBe(false);
      await a.page.locator("aside.stale #people-stale", { hasText: "Not connected" }).waitFor();
      expect(await a.page.locator("#people").evaluate((el) => Number(getComputedStyle(el).opacity))).toBeLessThan(1);
      await a.page.locator("#retry-now").waitFor();
      const offline = ["typed offline 1", "typed offline 2", "typed offline 3"];
      for (const text of offline) await send(a.page, text);
      await a.page.locator(".msg.pending .state-text", { hasText: "Waiting for the connection" }).first().waitFor();
      expect(await a.page.locator(".log:not([hidden]) > .msg.pending").count()).toBe(3);
      chat = await serve({ databaseUrl, port });
      await until(async () => (await confirmed(a.page).count()) === 4, SEND_MS, "the queued messages confirmed");
      expect(await texts(a.page)).toEqual(["before", ...offline]);
      expect(await stored(chat.url, "general")).toEqual(["before", ...offline]);
      await a.page.locator("aside:not(.stale)").waitFor();
      expect(await a.page.locator("#people-stale").isHidden()).toBe(true);
      expect(a.errors).toEqual([]);
    } finally {
      await chat.stop();
      tmp[Symbol.dispose]();
    }
  }, TEST_MS);

  test("4. the page reconnects at once when the browser comes back online or the tab becomes visible, not at the end of its backoff", async () => {
    const tmp = tempDir();
    const databaseUrl = `sqlite://${tmp.dir}/chat.db`;
    let chat = await serve({ databaseUrl });
    const port = chat.port;
    try {
      // a backoff of a minute: only an immediate reconnect can pass this test
      await using a = await open(chat.url, "/?backoff=60000");
      for (const bringBack of [
        () => a.context.setOffline(true).then(() => a.context.setOffline(false)),
        () => a.page.evaluate(() => document.dispatchEvent(new Event("visibilitychange"))),
      ]) {
        await chat.stop();
        await a.page.locator("#status-wait", { hasText: /in (59|60) s/ }).waitFor();
        chat = await serve({ databaseUrl, port });
        await bringBack();
        await a.page.locator('#status[data-state="connected"]').waitFor();
      }
      expect(a.errors).toEqual([]);
    } finally {
      await chat.stop();
      tmp[Symbol.dispose]();
    }
  }, TEST_MS);

  test("2. a draft stays with its room: it does not follow into the next, comes back on return and after a reload", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await joinRoom(a.page, "drafts");
    await a.page.locator('.room-link[href="#general"]').click();
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    await a.page.locator("#text").fill("half a thought for general");
    await a.page.locator('.room-link[href="#drafts"]').click();
    await a.page.locator("#room-title", { hasText: "#drafts" }).waitFor();
    expect(await a.page.locator("#text").inputValue()).toBe("");
    await a.page.locator("#text").press("Enter"); // nothing to post in #drafts
    await a.page.locator("#text").fill("drafts' own draft");
    await a.page.locator('.room-link[href="#general"]').click();
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    expect(await a.page.locator("#text").inputValue()).toBe("half a thought for general");
    await a.page.reload();
    await connected(a.page);
    expect(await a.page.locator("#text").inputValue()).toBe("half a thought for general");
    await a.page.locator("#text").press("Enter");
    await confirmed(a.page).first().waitFor();
    await a.page.locator('.room-link[href="#drafts"]').click();
    await a.page.locator("#room-title", { hasText: "#drafts" }).waitFor();
    expect(await a.page.locator("#text").inputValue()).toBe("drafts' own draft");
    expect(await shown(a.page).count()).toBe(0);
    // a sent message leaves no draft behind
    await a.page.locator('.room-link[href="#general"]').click();
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    expect(await a.page.locator("#text").inputValue()).toBe("");
    expect(await stored(chat.url, "general")).toEqual(["half a thought for general"]);
    expect(await stored(chat.url, "drafts")).toEqual([]);
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("3. Arabic with an English word reads right to left in the composer, the log and the reply bar; names sit in <bdi>", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    await using b = await open(chat.url);
    const arabic = "مرحبا بكم في Chat اليوم";
    await a.page.locator("#text").fill(arabic);
    expect(await a.page.locator("#text").evaluate((el) => el.matches(":dir(rtl)"))).toBe(true);
    await a.page.locator("#text").press("Enter");
    const got = shownText(b.page, arabic).and(b.page.locator("[data-id]"));
    await got.waitFor();
    expect(await got.locator(".text").evaluate((el) => el.matches(":dir(rtl)"))).toBe(true);
    expect(await got.locator(".author").evaluate((el) => el.tagName)).toBe("BDI");
    // the first word is at the right edge of its line
    const [word, line] = await got.locator(".text").evaluate((el) => {
      const range = document.createRange();
      range.setStart(el.firstChild!, 0);
      range.setEnd(el.firstChild!, 5);
      return [range.getBoundingClientRect().right, el.getBoundingClientRect().right];
    });
    expect(line - word).toBeLessThan(20);
    await got.hover();
    await got.locator(".tools .reply").click();
    await b.page.locator("#reply-text").waitFor();
    expect(await b.page.locator("#reply-text bdi").last().evaluate((el) => el.matches(":dir(rtl)"))).toBe(true);
    expect([...a.errors, ...b.errors]).toEqual([]);
  }, TEST_MS);

  test("5. any room can be left, #general too, and stays left after a reload; #Random is #random; a long paste is kept and refused with a reason; spaces alone say why; the icon is no 404", async () => {
    await using chat = await serve({ maxText: 50 });
    const missing: string[] = [];
    const setup = async (page: Page) => {
      page.on("response", (r) => r.status() === 404 && r.url().includes("favicon") && missing.push(r.url()));
    };
    await using a = await open(chat.url, "/", { setup });
    await joinRoom(a.page, "#Random");
    expect(new URL(a.page.url()).hash).toBe("#random");
    await a.page.evaluate(() => (location.hash = "#Other"));
    await a.page.locator("#room-title", { hasText: "#other" }).waitFor();
    expect(new URL(a.page.url()).hash).toBe("#other");
    // a paste past the limit is all there, counted, and refused with a reason when sent
    const long = "x".repeat(60);
    await a.page.locator("#text").focus();
    await a.page.keyboard.insertText(long);
    expect(await a.page.locator("#text").inputValue()).toBe(long);
    expect(await a.page.locator("#counter").textContent()).toBe("60 / 50: 10 too many");
    await a.page.keyboard.press("Enter");
    await a.page.locator("#composer-hint", { hasText: "Too long by 10 characters" }).waitFor();
    expect(await a.page.locator("#text").inputValue()).toBe(long);
    await a.page.locator("#text").fill("   \n  ");
    await a.page.locator("#text").press("Enter");
    await a.page.locator("#composer-hint", { hasText: "Nothing to send: the message is only spaces" }).waitFor();
    expect(await shown(a.page).count()).toBe(0);
    // leave #general: gone, and still gone after a reload
    await a.page.locator('.room-link[href="#general"]').click();
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    await a.page.locator("#leave").click();
    await a.page.locator('.room-link[href="#general"]').waitFor({ state: "detached" });
    await a.page.goto(chat.url + "/");
    await connected(a.page);
    expect(await a.page.locator(".room-link").evaluateAll((links) => links.map((l) => l.getAttribute("href")))).toEqual(["#random", "#other"]);
    // the page draws its own icon; /favicon.ico answers for browsers that ask anyway
    expect(await a.page.locator("#favicon").getAttribute("href")).toMatch(/^data:image\/png;base64,/);
    const icon = await fetch(`${chat.url}/favicon.ico`);
    expect(icon.status).toBe(200);
    expect(icon.headers.get("content-type")).toBe("image/svg+xml");
    expect(missing).toEqual([]);
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("6. the room directory lists public rooms from GET /api/rooms with online counts, searches them and joins one", async () => {
    await using chat = await serve();
    const bob = await Client.connect(chat.url, await newSession(chat.url));
    const ann = await Client.connect(chat.url, await newSession(chat.url));
    for (const room of ["books", "bikes"]) await bob.join(room);
    await ann.join("books");
    await using a = await open(chat.url);
    // with no room left, the page offers the directory
    await a.page.locator("#leave").click();
    await a.page.locator("#empty", { hasText: "You are in no room" }).waitFor();
    await a.page.locator("#empty-browse").click();
    await a.page.locator("#directory-dialog[open]").waitFor();
    const row = (name: string) => a.page.locator(`#directory-list li[data-room="${name}"]`);
    await row("books").locator(".tag", { hasText: "2 online" }).waitFor();
    await row("bikes").locator(".tag", { hasText: "1 online" }).waitFor();
    expect(await a.page.locator("#directory-list li").evaluateAll((lis) => lis.map((li) => (li as HTMLElement).dataset.room))).toEqual(["books", "bikes"]);
    await a.page.locator("#directory-search").fill("BOO");
    const listed = () => a.page.locator("#directory-list li").evaluateAll((lis) => lis.map((li) => (li as HTMLElement).dataset.room).join());
    await until(async () => (await listed()) === "books,boo", WAIT_MS, "the search to narrow the list (and offer #boo)");
    await a.page.locator("#directory-search").fill("boats");
    await row("boats").locator(".tag", { hasText: "new" }).waitFor();
    await a.page.locator("#directory-search").fill("books");
    await row("books").getByRole("button", { name: "Join #books" }).click();
    await a.page.locator("#room-title", { hasText: "#books" }).waitFor();
    await a.page.locator("#people li").nth(2).waitFor();
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("text");
    bob.close();
    ann.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("7. two tabs of one browser agree: a room joined or left in one is joined or left in the other, with the same unread counts", async () => {
    await using chat = await serve();
    await using a = await open(chat.url);
    const tab2 = await a.newPage();
    await joinRoom(a.page, "side");
    await tab2.locator('.room-link[href="#side"]').waitFor();
    await a.page.locator('.room-link[href="#general"]').click();
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    const bob = await Client.connect(chat.url, await newSession(chat.url));
    await bob.join("side");
    await bob.say("side", "one");
    await bob.say("side", "two");
    for (const page of [a.page, tab2]) {
      await page.locator('.room-link[href="#side"] .unread-count', { hasText: /^2$/ }).waitFor();
      expect(await page.title()).toBe("(2) #general · Chat");
    }
    await a.page.bringToFront();
    await a.page.locator('.room-link[href="#side"]').click();
    for (const page of [a.page, tab2]) await page.locator('.room-link[href="#side"] .unread').waitFor({ state: "hidden" });
    await a.page.locator("#leave").click();
    await tab2.locator('.room-link[href="#side"]').waitFor({ state: "detached" });
    bob.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("8. on a 360x740 phone with 10 rooms and 10 people, the conversation is full height and every room and person is reachable from the header's drawers", async () => {
    await using chat = await serve();
    const names = ["general", ...Array.from({ length: 9 }, (_, i) => `room-${i + 1}`)];
    const others: Client[] = [];
    for (let i = 0; i < 10; i++) {
      const session = await newSession(chat.url);
      await putName(chat.url, session.cookie, `person${i}`);
      const client = await Client.connect(chat.url, session);
      await client.join("general");
      others.push(client);
    }
    const setup = async (page: Page) => {
      await page.addInitScript((rooms) => localStorage.getItem("chat.rooms") ?? localStorage.setItem("chat.rooms", JSON.stringify(rooms)), names);
    };
    await using a = await open(chat.url, "/#general", { ...PHONE, setup });
    await until(async () => (await a.page.locator("#people li").count()) === 11, WAIT_MS, "11 people online");
    await others[0].join("room-9");
    await others[0].say("room-9", "far down the list");
    await a.page.locator("#rooms-unread", { hasText: /^1$/ }).waitFor(); // an unread room off-screen shows on the header
    expect(await a.page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(360);
    // the conversation takes the height: no rows of rooms or people above it
    const scroller = (await a.page.locator("#scroller").boundingBox())!;
    expect(scroller.height).toBeGreaterThan(740 * 0.6);
    expect(await a.page.locator("nav").isVisible()).toBe(false);
    const send = (await a.page.locator("#send").boundingBox())!;
    expect(send.y + send.height).toBeLessThanOrEqual(740);

    /** Each item, scrolled into view, is in the viewport and is what a finger there would touch. */
    const reachable = async (selector: string) => {
      const items = a.page.locator(selector);
      const count = await items.count();
      for (let i = 0; i < count; i++) {
        const item = items.nth(i);
        await item.scrollIntoViewIfNeeded();
        const hit = await item.evaluate((el) => {
          const box = el.getBoundingClientRect();
          const [x, y] = [box.left + box.width / 2, box.top + box.height / 2];
          const inside = box.left >= 0 && box.right <= innerWidth && box.top >= 0 && box.bottom <= innerHeight;
          return inside && el.contains(document.elementFromPoint(x, y));
        });
        expect(hit ? "reachable" : `${await item.textContent()} is not reachable`).toBe("reachable");
      }
      return count;
    };
    await a.page.locator("#rooms-open").click();
    await a.page.locator("nav").waitFor({ state: "visible" });
    expect(await reachable(".room-link")).toBe(10);
    await a.page.keyboard.press("Escape");
    await a.page.locator("nav").waitFor({ state: "hidden" });
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("rooms-open");
    await a.page.locator("#people-open").click();
    await a.page.locator("aside").waitFor({ state: "visible" });
    expect(await reachable("#people .person")).toBe(11);
    await a.page.locator("#drawer-backdrop").click({ position: { x: 20, y: 700 } });
    await a.page.locator("aside").waitFor({ state: "hidden" });
    // a room picked in the drawer opens, the drawer closes
    await a.page.locator("#rooms-open").click();
    await a.page.locator('.room-link[href="#room-9"]').click();
    await a.page.locator("#room-title", { hasText: "#room-9" }).waitFor();
    await a.page.locator("nav").waitFor({ state: "hidden" });
    // Enter is a new line on a touch screen; the Send button sends
    await a.page.locator("#text").fill("line one");
    await a.page.locator("#text").press("Enter");
    await a.page.keyboard.type("line two");
    expect(await a.page.locator("#text").inputValue()).toBe("line one\nline two");
    await a.page.locator("#send").tap();
    await shownText(a.page, "line two").and(a.page.locator("[data-id]")).waitFor();
    expect(await texts(a.page)).toEqual(["far down the list", "line one\nline two"]);
    for (const c of others) c.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("9. keyboard only: a skip link reaches the composer, Tab does not walk the history's links, Alt+↑/↓ change rooms and the focus never stays on a hidden log", async () => {
    await using chat = await serve({ rateLimit: "100/1s" });
    const bob = await Client.connect(chat.url, await newSession(chat.url));
    await bob.join("general");
    for (let i = 0; i < 30; i++) await bob.say("general", `link ${i}: https://example.com/${i}`);
    await using a = await open(chat.url);
    await joinRoom(a.page, "second");
    await a.page.locator('.room-link[href="#general"]').click();
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    await a.page.reload();
    await connected(a.page);
    await shownText(a.page, "link 29").waitFor();
    await a.page.keyboard.press("Tab");
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("skip");
    expect(await a.page.locator("#skip").isVisible()).toBe(true);
    await a.page.keyboard.press("Enter");
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("text");
    expect(new URL(a.page.url()).hash).toBe("#general");
    // Tab from the top: the log is one stop (its newest message), however many links it holds
    await a.page.reload();
    await connected(a.page);
    await shownText(a.page, "link 29").waitFor();
    let tabs = 0;
    while ((await a.page.evaluate(() => document.activeElement?.id)) !== "text") {
      if (++tabs > 25) throw new Error("Tab walked the history before reaching the composer");
      await a.page.keyboard.press("Tab");
    }
    expect(await a.page.evaluate(() => { const s = document.getElementById("scroller")!; return s.scrollHeight - s.scrollTop - s.clientHeight; })).toBeLessThan(40);
    await a.page.keyboard.press("Alt+ArrowDown");
    await a.page.locator("#room-title", { hasText: "#second" }).waitFor();
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("text");
    await a.page.keyboard.press("Alt+ArrowUp");
    await a.page.locator("#room-title", { hasText: "#general" }).waitFor();
    // from a message of the log: the next room's composer gets the focus, not the body
    await a.page.keyboard.press("Shift+Tab");
    expect(await a.page.evaluate(() => document.activeElement?.closest(".log") !== null)).toBe(true);
    await a.page.keyboard.press("Alt+ArrowDown");
    await a.page.locator("#room-title", { hasText: "#second" }).waitFor();
    expect(await a.page.evaluate(() => document.activeElement?.id)).toBe("text");
    bob.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("10. a hash that is not valid percent-encoding, on load or later, is ignored and the page keeps chatting", async () => {
    await using chat = await serve();
    await using a = await open(chat.url, "/#%E0%A4%A");
    expect(new URL(a.page.url()).hash).toBe("#general");
    await a.page.evaluate(() => (location.hash = "#%E0%A4%A"));
    await send(a.page, "still here");
    await confirmed(a.page).first().waitFor();
    expect(await a.page.locator("#room-title").textContent()).toBe("#general");
    expect(a.errors).toEqual([]);
  }, TEST_MS);

  test("attention: the title and the drawn icon count unread; a mention in a hidden tab notifies (permission asked on a click only) and chimes", async () => {
    await using chat = await serve();
    // what the page asks of the browser's notification and audio APIs is recorded, the APIs still run
    const record = async (page: Page) => {
      await page.addInitScript(() => {
        const w = window as unknown as { __asked: number; __shown: string[]; __chimes: number };
        Object.assign(w, { __asked: 0, __shown: [], __chimes: 0 });
        const Real = window.Notification;
        const ask = Real.requestPermission.bind(Real);
        window.Notification = class extends Real {
          constructor(title: string, options?: NotificationOptions) {
            super(title, options);
            w.__shown.push(title);
          }
          static override requestPermission = () => (w.__asked++, ask());
        } as typeof Notification;
        const start = OscillatorNode.prototype.start;
        OscillatorNode.prototype.start = function (...args) {
          w.__chimes++;
          return start.apply(this, args);
        };
      });
    };
    await using a = await open(chat.url, "/", { setup: record });
    const seen = () =>
      a.page.evaluate(() => {
        const { __asked, __shown, __chimes } = window as unknown as { __asked: number; __shown: string[]; __chimes: number };
        return { __asked, __shown, __chimes };
      });
    const aName = (await a.page.locator("#me-name").textContent())!;
    expect((await seen()).__asked).toBe(0); // never on load
    await a.context.grantPermissions(["notifications"]);
    await a.page.locator("#notify-pref").check();
    await a.page.locator("#sound-pref").check();
    expect(await a.page.locator("#notify-pref").isChecked()).toBe(true);
    const chimesBefore = (await seen()).__chimes; // the sound box plays a sample
    // the tab goes to the background
    await a.page.evaluate(() => {
      Object.defineProperty(document, "visibilityState", { value: "hidden", configurable: true });
      document.dispatchEvent(new Event("visibilitychange"));
    });
    const bob = await Client.connect(chat.url, await newSession(chat.url));
    await bob.join("general");
    await bob.say("general", `hello @${aName}`);
    await bob.say("general", "and no mention");
    await until(async () => (await seen()).__shown.length === 1, WAIT_MS, "one notification");
    const after = await seen();
    expect(after.__shown[0]).toMatch(/ mentioned you in #general$/);
    expect(after.__chimes).toBe(chimesBefore + 1);
    expect(await a.page.title()).toBe("(2) #general · Chat");
    expect(await a.page.locator("#favicon").getAttribute("data-unread")).toBe("2");
    expect(await a.page.locator("#favicon").getAttribute("href")).toMatch(/^data:image\/png;base64,/);
    bob.close();
    expect(a.errors).toEqual([]);
  }, TEST_MS);
});

// No browser needed: read the page's source.
describe("client.html, issue 17", () => {
  const html = readFileSync(join(ROOT, "client.html"), "utf8");
  test("the reconnect backoff is capped at 5 s", () => {
    const backoff = html.match(/const BACKOFF = \{ minMs: (\d+), maxMs: ([\d_]+),/);
    expect(backoff).not.toBeNull();
    expect(Number(backoff![2].replaceAll("_", ""))).toBeLessThanOrEqual(5_000);
  });
  test("the composer has no maxlength (a paste is never cut) and reads its direction from its text", () => {
    const textarea = html.match(/<textarea id="text"[^>]*>/)![0];
    expect(textarea).not.toContain("maxlength");
    expect(textarea).toContain('dir="auto"');
  });
});
