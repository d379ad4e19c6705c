// Regenerates docs/screenshots/*.png: the chat with a short conversation, desktop (1280x800) and a
// 360x740 phone, light and dark; the phone's rooms drawer; Arabic and English mixed (rtl.png).
// Run: bun test/screenshots.ts (needs /usr/bin/chromium).
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { launchChromium } from "./chromium.ts";
import { Client, newSession, ROOT, serve, type Session } from "./helpers.ts";

const OUT = join(ROOT, "docs", "screenshots");
const SHOTS = [
  { file: "desktop-light.png", width: 1280, height: 800, colorScheme: "light" },
  { file: "desktop-dark.png", width: 1280, height: 800, colorScheme: "dark" },
  { file: "mobile-light.png", width: 360, height: 740, colorScheme: "light" },
  { file: "mobile-dark.png", width: 360, height: 740, colorScheme: "dark" },
] as const;

async function rename(baseUrl: string, session: Session, name: string) {
  const res = await fetch(`${baseUrl}/api/me`, {
    method: "PUT",
    headers: { cookie: session.cookie, "content-type": "application/json" },
    body: JSON.stringify({ name }),
  });
  if (!res.ok) throw new Error(`Cannot rename to ${name}: ${res.status}`);
}

/** POSTs JSON as a session; the answer, or a throw naming what failed. */
async function post(baseUrl: string, session: Session, path: string, body: unknown) {
  const res = await fetch(`${baseUrl}${path}`, { method: "POST", headers: { cookie: session.cookie, "content-type": "application/json" }, body: JSON.stringify(body) });
  if (!res.ok) throw new Error(`POST ${path}: ${res.status}`);
  return res;
}

if (import.meta.main) {
  mkdirSync(OUT, { recursive: true });
  await using chat = await serve();
  const [ada, grace, linus, sara] = [await newSession(chat.url), await newSession(chat.url), await newSession(chat.url), await newSession(chat.url)];
  await rename(chat.url, ada, "Ada");
  await rename(chat.url, grace, "Grace");
  await rename(chat.url, linus, "Linus");
  await rename(chat.url, sara, "سارة");
  // Ada has an account (the page shows "Signed in as"), a private room and a dm with Grace
  ada.cookie = (await post(chat.url, ada, "/api/me/password", { password: "correct horse battery" })).headers.get("set-cookie")!.split(";")[0]!;
  await post(chat.url, ada, "/api/rooms", { name: "team", visibility: "private" });
  await post(chat.url, ada, "/api/dms", { user: grace.id });
  const g = await Client.connect(chat.url, grace);
  const l = await Client.connect(chat.url, linus);
  const s = await Client.connect(chat.url, sara);
  for (const c of [g, l]) for (const room of ["general", "random", "design"]) await c.join(room);
  await s.join("arabic");

  const browser = await launchChromium("screenshots");
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const [name, value] = ada.cookie.split("=");
    await context.addCookies([{ name, value, url: chat.url }]);
    const page = await context.newPage();
    await page.goto(`${chat.url}/#design`);
    await page.locator('#status[data-state="connected"]').waitFor();
    await page.goto(`${chat.url}/#random`);
    await page.locator('#status[data-state="connected"]').waitFor();
    await page.goto(`${chat.url}/#general`);
    await page.locator("#composer-fields:not([disabled])").waitFor();

    const ownSay = async (text: string) => {
      await page.locator("#text").fill(text);
      await page.locator("#text").press("Enter");
      await page.locator(".log:not([hidden]) > .msg:not(.pending)").filter({ hasText: text }).waitFor();
    };
    const question = await g.say("general", "Morning! Did anyone try the new build?");
    const faster = await g.say("general", "Startup feels faster.");
    g.send({ type: "edit", room: "general", id: faster.id, text: "Startup feels a lot faster on my machine.", ref: "edit" });
    await g.next((f) => f.type === "updated" && f.ref === "edit");
    // a reply (quoted line of the original) that mentions Ada (highlighted on her page)
    l.send({ type: "say", room: "general", text: "@Ada yes: cold start went from 900 ms to about 120 ms.", replyTo: question.id, ref: "reply" });
    await l.next((f) => f.type === "message" && f.ref === "reply");
    await ownSay("Nice. I wrote the notes up here: https://example.com/notes/startup");
    await ownSay("Next up: reconnect after a restart.\nIt rejoins every room with `since`, so nothing is missed.");
    await l.say("general", "Ship it!");
    await page.locator(".log:not([hidden]) > .msg").filter({ hasText: "Ship it!" }).waitFor();
    await page.locator(".log:not([hidden]) > .msg.mention .quote", { hasText: "Grace: Morning!" }).waitFor();
    await g.say("random", "Lunch at noon?");
    await l.say("random", "Sure");
    await l.say("design", "New icons are in the shared folder.");
    await page.locator('.room-link[href="#random"] .unread-count', { hasText: "2" }).waitFor();
    await page.locator('.room-link[href="#general"] .unread').waitFor({ state: "hidden" }); // read once seen

    for (const shot of SHOTS) {
      await page.setViewportSize({ width: shot.width, height: shot.height });
      await page.emulateMedia({ colorScheme: shot.colorScheme });
      g.send({ type: "typing", room: "general" });
      await page.locator("#typing", { hasText: "Grace is typing" }).waitFor();
      await page.screenshot({ path: join(OUT, shot.file) });
      console.log(`wrote docs/screenshots/${shot.file}`);
      await Bun.sleep(1_100); // the server passes on one typing frame a second per user
    }
    // the phone's rooms drawer, opened from the header
    await page.setViewportSize({ width: 360, height: 740 });
    await page.emulateMedia({ colorScheme: "light" });
    await page.locator("#rooms-open").click();
    await page.locator("nav").waitFor({ state: "visible" });
    await page.waitForFunction(() => getComputedStyle(document.querySelector("nav")!).transform === "none"); // slid in
    await page.screenshot({ path: join(OUT, "mobile-rooms.png") });
    console.log("wrote docs/screenshots/mobile-rooms.png");
    await page.keyboard.press("Escape");

    // Arabic and English in one conversation: each message and name takes its own direction
    await page.setViewportSize({ width: 1100, height: 560 });
    await page.goto(`${chat.url}/#arabic`);
    await page.locator("#composer-fields:not([disabled])").waitFor();
    await page.locator('#status[data-state="connected"]').waitFor();
    await s.say("arabic", "مرحبا Ada! هل جربت Bun 1.4 اليوم؟");
    await ownSay("Yes, وكان سريعا جدا: about 120 ms to start.");
    await s.say("arabic", "ممتاز. سأكتب الملاحظات في https://example.com/notes غدا.");
    await page.locator("#text").fill("Thanks سارة, see you tomorrow");
    await page.locator(".log:not([hidden]) > .msg").filter({ hasText: "غدا" }).waitFor();
    await page.locator('.room-link[href="#arabic"] .unread').waitFor({ state: "hidden" }); // read once seen
    await page.screenshot({ path: join(OUT, "rtl.png") });
    console.log("wrote docs/screenshots/rtl.png");
    await context.close();
  } finally {
    await browser.close();
    g.close();
    l.close();
    s.close();
  }
}
