// Headless Chromium for the page tests and the screenshot scripts: where it is, how it starts, when a test skips,
// and the page's message log as the tests read it.
import { existsSync } from "node:fs";
import { chromium, type Browser, type Page } from "playwright-core";

export const CHROMIUM = "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--no-first-run",
];

/** Whether `what` skips: no Chromium and no CHAT_TEST_REQUIRE_ALL=1 (then said in one line). */
export function skipWithoutChromium(what: string): boolean {
  const skip = !existsSync(CHROMIUM) && process.env.CHAT_TEST_REQUIRE_ALL !== "1";
  if (skip) console.log(`${what} skipped: ${CHROMIUM} not found (apt-get install chromium)`);
  return skip;
}

/** A headless Chromium; a missing one is an error that names the fix. */
export function launchChromium(what: string): Promise<Browser> {
  if (!existsSync(CHROMIUM)) throw new Error(`${what} cannot run: ${CHROMIUM} not found (apt-get install chromium)`);
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
}

/** Messages shown in the open room, oldest first (pending ones included). */
export const shown = (page: Page) => page.locator(".log:not([hidden]) > .msg");
export const shownText = (page: Page, text: string | RegExp) => shown(page).filter({ has: page.locator(".text", { hasText: text }) });
export const texts = (page: Page) => page.locator(".log:not([hidden]) > .msg .text").allTextContents();
