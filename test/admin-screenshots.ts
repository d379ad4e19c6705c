// Regenerates docs/screenshots/admin.png: the admin console of a two-node cluster (a throwaway redis-server and
// Postgres from test/services.ts) after a minute of chatting at a changing rate, with some refusals and a closed room.
// Run: bun test/admin-screenshots.ts (needs /usr/bin/chromium, redis-server and postgresql; takes about 70 s).
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { launchChromium } from "./chromium.ts";
import { Client, newSession, putName, ROOT, serve, type Session } from "./helpers.ts";
import { startPostgres, startRedis } from "./services.ts";

const OUT = join(ROOT, "docs", "screenshots");
const TRAFFIC_S = 60;

async function post(baseUrl: string, cookie: string, path: string, body: unknown) {
  const res = await fetch(`${baseUrl}${path}`, { method: "POST", headers: { cookie, "content-type": "application/json" }, body: JSON.stringify(body) });
  if (!res.ok) throw new Error(`POST ${path}: ${res.status}`);
  return res;
}

/** A named guest connected to `baseUrl`, in these rooms. */
async function member(baseUrl: string, name: string, rooms: string[]): Promise<{ session: Session; client: Client }> {
  const session = await newSession(baseUrl);
  await putName(baseUrl, session.cookie, name);
  const client = await Client.connect(baseUrl, session);
  for (const room of rooms) await client.join(room);
  return { session, client };
}

if (import.meta.main) {
  mkdirSync(OUT, { recursive: true });
  await using redis = await startRedis();
  await using pg = await startPostgres();
  const databaseUrl = await pg.createDatabase();
  await using a = await serve({ databaseUrl, redisUrl: redis.url, nodeId: "node-a", rateLimit: "5/1s" });
  await using b = await serve({ databaseUrl, redisUrl: redis.url, nodeId: "node-b", rateLimit: "5/1s" });
  const root = await newSession(a.url);
  await putName(a.url, root.cookie, "Ada");
  const adminCookie = (await post(a.url, root.cookie, "/api/me/password", { password: "correct horse battery" })).headers.get("set-cookie")!.split(";")[0];
  const names = ["Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Radia", "Edsger"];
  const people = await Promise.all(names.map((name, i) => member(i % 2 ? b.url : a.url, name, i < 5 ? ["general", "design"] : ["general", "random", "ops"])));
  // a minute of chatting, faster in the middle, with a burst past the rate limit now and then
  for (let second = 0; second < TRAFFIC_S; second++) {
    const rate = 2 + Math.round(6 * Math.sin((Math.PI * second) / TRAFFIC_S));
    for (let i = 0; i < rate; i++) {
      const { client } = people[(second + i) % people.length];
      client.send({ type: "say", room: i % 3 ? "general" : "random", text: `message ${second}.${i}` });
    }
    if (second % 15 === 7) for (let i = 0; i < 8; i++) people[0].client.send({ type: "say", room: "general", text: `burst ${i}` });
    if (second === 40) for (const { client } of people.slice(5, 7)) await client.close();
    await Bun.sleep(1_000);
  }
  await post(a.url, adminCookie, "/api/admin/actions", { action: "close", room: "ops", closed: true });

  const browser = await launchChromium("screenshots");
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 1180 }, colorScheme: "light" });
    const [name, value] = adminCookie.split("=");
    await context.addCookies([{ name, value, url: a.url }]);
    const page = await context.newPage();
    await page.goto(`${a.url}/admin`);
    await page.locator('svg[data-chart="messages"] polyline').first().waitFor();
    await page.locator('#rooms tr[data-room="general"]').waitFor();
    await page.locator("#audit tbody tr").first().waitFor();
    await page.screenshot({ path: join(OUT, "admin.png") });
    console.log("wrote docs/screenshots/admin.png");
    await context.close();
  } finally {
    await browser.close();
    for (const { client } of people) client.close();
  }
}
