// The admin console: /admin and /api/admin for instance admins only, per-second samples of every node, the
// tables and the actions (each audited and logged), in headless Chromium as an admin and as a non-admin,
// and in a real cluster where one node's console shows the other, and marks it down once it is gone.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Browser } from "playwright-core";
import { StatsSample } from "../server.ts";
import { launchChromium, skipWithoutChromium } from "./chromium.ts";
import { Client, newSession, putName, serve, type Session, spawnCluster, until, usersInRoom } from "./helpers.ts";
import { describeWithServices } from "./services.ts";

const SKIP_BROWSER = skipWithoutChromium("admin browser tests");
const json = { "content-type": "application/json" };

type Stats = { now: number; nodes: { node: string; self: boolean; up: boolean; samples: StatsSample[] }[] };

/** A guest that signs up with a password (the instance's first account is its admin): the session with its new cookie. */
async function account(baseUrl: string, name: string): Promise<Session> {
  const guest = await newSession(baseUrl);
  expect((await putName(baseUrl, guest.cookie, name)).status).toBe(200);
  const res = await fetch(`${baseUrl}/api/me/password`, { method: "POST", headers: { ...json, cookie: guest.cookie }, body: JSON.stringify({ password: "correct horse battery" }) });
  expect(res.status).toBe(200);
  return { ...guest, ...((await res.json()) as object), cookie: res.headers.get("set-cookie")!.split(";")[0] } as Session;
}

const getAs = (baseUrl: string, path: string, cookie?: string) => fetch(`${baseUrl}${path}`, { headers: cookie ? { cookie } : {} });
const act = (baseUrl: string, cookie: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${baseUrl}/api/admin/actions`, { method: "POST", headers: { ...json, cookie, ...headers }, body: JSON.stringify(body) });

/** Waits until this node's stats show every named node up with a sample. */
async function statsWith(baseUrl: string, cookie: string, nodes: string[], up = true): Promise<Stats> {
  const stats = await until(async () => {
    const body = (await (await getAs(baseUrl, "/api/admin/stats", cookie)).json()) as Stats;
    return nodes.every((name) => body.nodes.some((n) => n.node === name && n.up === up && n.samples.length > 0)) ? body : undefined;
  }, 20_000, `stats of ${nodes.join(", ")} ${up ? "up" : "down"}`);
  return stats!;
}

describe("admin console", () => {
  test("the console is for the instance's admins: no session 401, a guest and a plain account 403 (and /admin answers 403 with its page)", async () => {
    await using chat = await serve();
    const admin = await account(chat.url, "Root");
    const bob = await account(chat.url, "Bob");
    const guest = await newSession(chat.url);
    expect([admin.admin, bob.admin]).toEqual([true, false]);
    for (const path of ["/api/admin/stats", "/api/admin/rooms", "/api/admin/users", "/api/admin/audit"]) {
      expect({ path, status: (await getAs(chat.url, path)).status }).toEqual({ path, status: 401 });
      for (const who of [guest, bob]) {
        const res = await getAs(chat.url, path, who.cookie);
        expect({ path, status: res.status }).toEqual({ path, status: 403 });
        expect(((await res.json()) as { error: { code: string } }).error.code).toBe("forbidden");
      }
      expect({ path, status: (await getAs(chat.url, path, admin.cookie)).status }).toEqual({ path, status: 200 });
    }
    expect((await act(chat.url, bob.cookie, { action: "ban", user: admin.id, banned: true })).status).toBe(403);
    for (const [who, status] of [[undefined, 403], [guest.cookie, 403], [bob.cookie, 403], [admin.cookie, 200]] as const) {
      const page = await getAs(chat.url, "/admin", who);
      expect(page.status).toBe(status);
      expect(page.headers.get("content-security-policy")).toContain("script-src 'sha256-");
      expect(await page.text()).toContain("Admin console");
    }
  });

  test("an admin reads every second of the node, its rooms, users with their session handles (never a sid), and the audit log", async () => {
    await using chat = await serve();
    const admin = await account(chat.url, "Root");
    const { sessions: [alice], clients: [a] } = await usersInRoom(chat.url, 1, "lobby");
    await a.say("lobby", "one");
    await a.say("lobby", "two");
    const stats = await until(async () => {
      const body = (await (await getAs(chat.url, "/api/admin/stats", admin.cookie)).json()) as Stats;
      return body.nodes[0]?.samples.some((s) => s.messages > 0 && s.p50 !== null) ? body : undefined;
    }, 10_000, "a sample with the messages") as Stats;
    expect(stats.nodes).toHaveLength(1);
    expect(stats.nodes[0]).toMatchObject({ self: true, up: true });
    for (const sample of stats.nodes[0].samples) StatsSample.parse(sample);
    const last = stats.nodes[0].samples.at(-1)!;
    expect(last).toMatchObject({ connections: 1, rooms: 1 });
    expect(last.rss).toBeGreaterThan(1 << 20);
    // since: only what came after
    const later = (await (await getAs(chat.url, `/api/admin/stats?since=${last.at}`, admin.cookie)).json()) as Stats;
    expect(later.nodes[0].samples.every((s) => s.at > last.at)).toBe(true);
    expect((await getAs(chat.url, "/api/admin/stats?since=soon", admin.cookie)).status).toBe(400);

    const rooms = (await (await getAs(chat.url, "/api/admin/rooms", admin.cookie)).json()) as { name: string; online: number; messages: number; lastActivity: number; closed: boolean }[];
    expect(rooms.find((r) => r.name === "lobby")).toMatchObject({ online: 1, messages: 2, closed: false });
    expect(rooms.find((r) => r.name === "lobby")!.lastActivity).toBeGreaterThan(Date.now() - 60_000);

    const usersText = await (await getAs(chat.url, "/api/admin/users", admin.cookie)).text();
    const sid = (cookie: string) => decodeURIComponent(cookie.split("=")[1]).split(".")[0];
    for (const who of [admin, alice]) expect(usersText).not.toContain(sid(who.cookie));
    const users = JSON.parse(usersText) as { id: string; name: string; sessions: { id: string }[] }[];
    const mine = (await (await getAs(chat.url, "/api/me/sessions", admin.cookie)).json()) as { id: string }[];
    expect(users.find((u) => u.id === admin.id)?.sessions.map((s) => s.id)).toEqual(mine.map((s) => s.id));
    expect(users.find((u) => u.id === alice.id)?.sessions).toHaveLength(1);
    const found = (await (await getAs(chat.url, "/api/admin/users?name=root", admin.cookie)).json()) as { id: string }[];
    expect(found.map((u) => u.id)).toEqual([admin.id]);
    expect(await (await getAs(chat.url, "/api/admin/audit", admin.cookie)).json()).toEqual([]);
  });

  test("each action goes through its owner, is audited and logged: revoke closes that session (4001), ban every one (4003), delete sends a tombstone, close removes everyone and refuses joins until reopened", async () => {
    const events: Record<string, unknown>[] = [];
    await using chat = await serve({ log: (event) => events.push(event) });
    const admin = await account(chat.url, "Root");
    const bob = await account(chat.url, "Bob");
    const { sessions: [carol], clients: [c] } = await usersInRoom(chat.url, 1, "lobby");
    const b = await Client.connect(chat.url, bob);
    await b.join("lobby");
    const sent = await c.say("lobby", "a message to delete");
    const ok = async (body: unknown) => expect((await act(chat.url, admin.cookie, body)).status).toBe(204);

    await ok({ action: "delete", room: "lobby", id: sent.id });
    for (const client of [b, c]) {
      expect(await client.next((f) => f.type === "updated")).toMatchObject({ message: { id: sent.id, deleted: true, text: "" } });
    }
    expect((await act(chat.url, admin.cookie, { action: "delete", room: "lobby", id: 999 })).status).toBe(404);

    await ok({ action: "close", room: "lobby", closed: true });
    for (const client of [b, c]) expect(await client.next((f) => f.type === "removed")).toMatchObject({ room: "lobby", reason: "closed", by: { id: admin.id } });
    c.send({ type: "join", room: "lobby" });
    expect(await c.next((f) => f.type === "error")).toMatchObject({ code: "forbidden", room: "lobby", message: expect.stringContaining("closed") });
    const rooms = (await (await getAs(chat.url, "/api/admin/rooms", admin.cookie)).json()) as { name: string; closed: boolean }[];
    expect(rooms.find((r) => r.name === "lobby")?.closed).toBe(true);
    await ok({ action: "close", room: "lobby", closed: false });
    await c.join("lobby");
    expect((await act(chat.url, admin.cookie, { action: "close", room: "nowhere", closed: true })).status).toBe(404);

    expect(await (await getAs(chat.url, "/api/admin/users?name=nobody-here", admin.cookie)).json()).toEqual([]);
    const carolSessions = ((await (await getAs(chat.url, "/api/admin/users", admin.cookie)).json()) as { id: string; sessions: { id: string }[] }[]).find((u) => u.id === carol.id)!.sessions;
    await ok({ action: "revoke", user: carol.id, session: carolSessions[0].id });
    expect((await c.closed).code).toBe(4001);
    expect((await act(chat.url, admin.cookie, { action: "revoke", user: carol.id, session: carolSessions[0].id })).status).toBe(404);

    await ok({ action: "ban", user: bob.id, banned: true });
    expect((await b.closed).code).toBe(4003);
    expect((await act(chat.url, admin.cookie, { action: "ban", user: admin.id, banned: true })).status).toBe(403); // admins cannot be banned
    await ok({ action: "ban", user: bob.id, banned: false });

    const audit = (await (await getAs(chat.url, "/api/admin/audit", admin.cookie)).json()) as { room: string; action: string; user: { id: string }; by: { id: string } }[];
    expect(audit.map((e) => [e.room, e.action]).reverse()).toEqual([
      ["lobby", "delete"], ["lobby", "close"], ["lobby", "reopen"], ["", "revoke"], ["", "ban_user"], ["", "unban_user"],
    ]);
    expect(audit.every((e) => e.by.id === admin.id)).toBe(true);
    expect(audit.find((e) => e.action === "delete")?.user.id).toBe(carol.id);
    // the room's own audit log, as its moderators read it, has its entries too
    const roomAudit = (await (await getAs(chat.url, "/api/rooms/lobby/audit", admin.cookie)).json()) as { action: string }[];
    expect(roomAudit.map((e) => e.action)).toEqual(["reopen", "close", "delete"]);
    const logged = events.filter((e) => e.event === "moderation");
    expect(logged.map((e) => e.action)).toEqual(["delete", "close", "close", "revoke", "instance_ban", "instance_unban"]);
    expect(logged.every((e) => e.by === admin.id)).toBe(true);
    expect(JSON.stringify(logged)).not.toContain("a message to delete");
  });

  test("admin actions are validated by zod, JSON only, and refused from a foreign origin", async () => {
    await using chat = await serve();
    const admin = await account(chat.url, "Root");
    const bad = async (body: unknown) => {
      const res = await act(chat.url, admin.cookie, body);
      return { status: res.status, error: ((await res.json()) as { error: { code: string; message: string } }).error };
    };
    expect(await bad({ action: "explode" })).toMatchObject({ status: 400, error: { code: "bad_request" } });
    expect(await bad({ action: "delete", room: "Not A Room", id: 1 })).toMatchObject({ status: 400, error: { message: expect.stringContaining("room") } });
    expect(await bad({ action: "ban", user: "u1", banned: "yes" })).toMatchObject({ status: 400, error: { message: expect.stringContaining("banned") } });
    expect(await bad({ action: "close", room: "lobby", closed: true, extra: 1 })).toMatchObject({ status: 400 });
    expect(await bad("close everything")).toMatchObject({ status: 400 });
    const form = await fetch(`${chat.url}/api/admin/actions`, { method: "POST", headers: { cookie: admin.cookie, "content-type": "application/x-www-form-urlencoded" }, body: "action=close&room=lobby&closed=true" });
    expect(form.status).toBe(415);
    const foreign = await act(chat.url, admin.cookie, { action: "close", room: "lobby", closed: true }, { origin: "https://evil.example" });
    expect(foreign.status).toBe(403);
    expect((await act(chat.url, admin.cookie, { action: "revoke", user: admin.id, session: "nope" }, { origin: chat.url })).status).toBe(404);
  });
});

describe.skipIf(SKIP_BROWSER)("admin console in Chromium", () => {
  let browser: Browser;
  beforeAll(async () => {
    browser = await launchChromium("admin browser tests");
  });
  afterAll(async () => {
    await browser?.close();
  });

  async function openAs(baseUrl: string, cookie: string) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    context.setDefaultTimeout(10_000);
    const [name, value] = cookie.split("=");
    await context.addCookies([{ name, value, url: baseUrl }]);
    const page = await context.newPage();
    const errors: string[] = [];
    page.on("pageerror", (error) => errors.push(String(error)));
    page.on("console", (message) => void (message.type() === "error" && errors.push(message.text())));
    const res = await page.goto(`${baseUrl}/admin`);
    return { page, errors, status: res?.status(), [Symbol.asyncDispose]: () => context.close() };
  }

  test("as an admin: the charts draw every second, the tables fill, and closing a room from the page removes its members", async () => {
    await using chat = await serve();
    const admin = await account(chat.url, "Root");
    const { clients: [a] } = await usersInRoom(chat.url, 1, "lobby");
    await a.say("lobby", "hello");
    await using opened = await openAs(chat.url, admin.cookie);
    const { page, errors } = opened;
    expect(opened.status).toBe(200);
    for (const chart of ["connections", "messages", "rooms", "latency", "refusals", "memory", "lag"]) {
      await page.locator(`svg[data-chart="${chart}"] polyline`).first().waitFor({ state: "attached" });
    }
    // a line grows as seconds pass, without a reload
    const points = () => page.locator('svg[data-chart="connections"] polyline').first().getAttribute("points").then((p) => p!.split(" ").length);
    const before = await points();
    await until(async () => (await points()) > before, 10_000, "another point");
    await page.locator(".node .badge.up").first().waitFor();
    const row = page.locator('#rooms tr[data-room="lobby"]');
    await row.waitFor();
    await page.locator(`#users tr[data-user="${admin.id}"]`).waitFor();
    await row.getByRole("button", { name: "Close" }).click();
    expect(await a.next((f) => f.type === "removed")).toMatchObject({ room: "lobby", reason: "closed" });
    await page.locator("#status", { hasText: "Closed #lobby" }).waitFor();
    await page.locator("#audit tbody tr", { hasText: "close" }).waitFor();
    await row.getByRole("button", { name: "Reopen" }).waitFor();
    expect(errors).toEqual([]); // no CSP violation, no script error
  });

  test("as a non-admin: 403, and the page says the console is for admins", async () => {
    await using chat = await serve();
    await account(chat.url, "Root");
    const bob = await account(chat.url, "Bob");
    await using opened = await openAs(chat.url, bob.cookie);
    expect(opened.status).toBe(403);
    await opened.page.locator("#refused", { hasText: "Admins only" }).waitFor();
    expect(await opened.page.locator("#console").isHidden()).toBe(true);
    expect(await opened.page.locator("svg[data-chart]").count()).toBe(0);
  });
});

describeWithServices("admin console, cluster", (services) => {
  test("each node's console shows every node, from samples shared through Redis; a node that stops is marked down", async () => {
    await using cluster = await spawnCluster(services, ["adm-a", "adm-b"]);
    const [a, b] = cluster.nodes;
    const admin = await account(a.url, "Root");
    await usersInRoom(b.url, 2, "busy");
    const fromA = await statsWith(a.url, admin.cookie, ["adm-a", "adm-b"]);
    expect(fromA.nodes.find((n) => n.node === "adm-a")?.self).toBe(true);
    expect(fromA.nodes.find((n) => n.node === "adm-b")?.samples.at(-1)?.connections).toBe(2);
    const fromB = await statsWith(b.url, admin.cookie, ["adm-a", "adm-b"]);
    expect(fromB.nodes.find((n) => n.node === "adm-b")?.self).toBe(true);
    a.proc.kill(9);
    await a.proc.exited;
    const after = await statsWith(b.url, admin.cookie, ["adm-a"], false);
    expect(after.nodes.find((n) => n.node === "adm-b")?.up).toBe(true);
  });
});
