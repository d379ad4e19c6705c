// Accounts: a guest becomes an account with a password, signs in on another device as the same user,
// signs out, sees and ends its sessions; brute force is refused; admins ban from the instance;
// GUESTS limits what guests may do. Real servers, real sockets, a real cluster for revocations.
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { BUN, Client, newSession, putName, ROOT, serve, type Session, spawnCluster, tempDir, upgradeStatus } from "./helpers.ts";
import { describeWithServices } from "./services.ts";
import { metric } from "./probes.ts";

type Me = { id: string; name: string; registered: boolean; admin: boolean };
const json = { "content-type": "application/json" };

function post(baseUrl: string, path: string, body: unknown, cookie?: string, headers: Record<string, string> = {}) {
  return fetch(`${baseUrl}${path}`, { method: "POST", headers: { ...json, ...(cookie ? { cookie } : {}), ...headers }, body: JSON.stringify(body) });
}
const cookieOf = (res: Response) => res.headers.get("set-cookie")?.split(";")[0];

/** A guest that registers with this password: its session, with the rotated cookie. */
async function account(baseUrl: string, name: string, password = "correct horse battery") {
  const guest = await newSession(baseUrl);
  expect((await putName(baseUrl, guest.cookie, name)).status).toBe(200);
  const res = await post(baseUrl, "/api/me/password", { password }, guest.cookie);
  expect(res.status).toBe(200);
  const me = (await res.json()) as Me;
  return { ...guest, ...me, cookie: cookieOf(res)!, password } as Session & { password: string };
}

async function login(baseUrl: string, name: string, password: string, headers: Record<string, string> = {}) {
  const res = await post(baseUrl, "/api/login", { name, password }, undefined, headers);
  return { res, cookie: cookieOf(res), body: (await res.json().catch(() => null)) as (Partial<Me> & { error?: { code: string; message: string } }) | null };
}

describe("accounts", () => {
  test("a guest becomes an account and keeps its id, name and messages; the first account is the admin; the sid is rotated and the open socket stays", async () => {
    await using chat = await serve();
    const guest = await newSession(chat.url);
    expect((await putName(chat.url, guest.cookie, "Alice")).status).toBe(200);
    const socket = await Client.connect(chat.url, guest);
    await socket.join("room");
    const sent = await socket.say("room", "before signing up");
    const res = await post(chat.url, "/api/me/password", { password: "correct horse battery" }, guest.cookie);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ id: guest.id, name: "Alice", registered: true, admin: true });
    const rotated = cookieOf(res)!;
    expect(rotated).not.toBe(guest.cookie);
    // the old sid names nobody now; the new one is the same user
    expect(await upgradeStatus(chat.url, { cookie: guest.cookie })).toBe(401);
    expect(await (await fetch(`${chat.url}/api/me`, { headers: { cookie: rotated } })).json()).toEqual({ id: guest.id, name: "Alice", registered: true, admin: true });
    expect((await socket.say("room", "after signing up")).user).toEqual({ id: guest.id, name: "Alice" });
    // the second account is not an admin
    const bob = await account(chat.url, "Bob");
    expect(bob.admin).toBe(false);
    expect(bob.registered).toBe(true);
    // and the messages stay the user's
    const history = (await (await fetch(`${chat.url}/api/rooms/room/messages`)).json()) as { messages: { id: number; user: { id: string } }[] };
    expect(history.messages.find((m) => m.id === sent.id)?.user.id).toBe(guest.id);
  });

  test("passwords are 8 to 256 characters; a change needs the current one (else 403) and ends the other sessions with 4001", async () => {
    await using chat = await serve();
    const guest = await newSession(chat.url);
    for (const password of ["short", "x".repeat(257), 12345678]) {
      const res = await post(chat.url, "/api/me/password", { password }, guest.cookie);
      expect({ password, status: res.status }).toEqual({ password, status: 400 });
    }
    expect((await post(chat.url, "/api/me/password", { password: "12345678" })).status).toBe(401); // no session
    const alice = await account(chat.url, "Alice");
    const laptop = await login(chat.url, "Alice", alice.password);
    const phone = await Client.connect(chat.url, { ...alice, cookie: laptop.cookie! });
    for (const currentPassword of [undefined, "wrong password"]) {
      const res = await post(chat.url, "/api/me/password", { password: "a new password", currentPassword }, alice.cookie);
      expect(res.status).toBe(403);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe("forbidden");
    }
    expect((await login(chat.url, "Alice", alice.password)).res.status).toBe(200); // unchanged
    const changed = await post(chat.url, "/api/me/password", { password: "a new password", currentPassword: alice.password }, alice.cookie);
    expect(changed.status).toBe(200);
    expect(await phone.closed).toEqual({ code: 4001, reason: "signed out" });
    expect((await login(chat.url, "Alice", alice.password)).res.status).toBe(401);
    expect((await login(chat.url, "Alice", "a new password")).res.status).toBe(200);
  });

  test("logging in from another browser is the same user, with a new sid; wrong name and wrong password get the same 401", async () => {
    await using chat = await serve();
    const alice = await account(chat.url, "Alice");
    const laptop = await Client.connect(chat.url, alice);
    await laptop.join("room");
    const sent = await laptop.say("room", "from the laptop");
    // the phone has a guest session of its own first; logging in ends it and never reuses its sid
    const phoneGuest = await newSession(chat.url);
    const res = await post(chat.url, "/api/login", { name: "alice", password: alice.password }, phoneGuest.cookie);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ id: alice.id, name: "Alice", registered: true, admin: true });
    const phoneCookie = cookieOf(res)!;
    expect(phoneCookie).not.toBe(phoneGuest.cookie);
    expect(await upgradeStatus(chat.url, { cookie: phoneGuest.cookie })).toBe(401);
    const phone = await Client.connect(chat.url, { ...alice, cookie: phoneCookie });
    const { history } = await phone.join("room");
    expect(history.messages.map((m) => [m.id, m.user.id])).toEqual([[sent.id, alice.id]]);
    expect((await phone.say("room", "from the phone")).user).toEqual({ id: alice.id, name: "Alice" });
    // refusals: one answer for both
    const wrongPassword = await login(chat.url, "Alice", "not the password");
    const wrongName = await login(chat.url, "Nobody", "not the password");
    const guestName = await login(chat.url, (await newSession(chat.url)).name, "whatever it is");
    for (const r of [wrongPassword, wrongName, guestName]) {
      expect(r.res.status).toBe(401);
      expect(r.body).toEqual({ error: { code: "unauthorized", message: "Wrong name or password" } });
      expect(r.cookie).toBeUndefined();
    }
    expect(await metric(chat.url, "chat_login_failures_total")).toBe(3);
    // an account's name cannot be taken by a guest
    expect((await putName(chat.url, (await newSession(chat.url)).cookie, "ALICE")).status).toBe(409);
  });

  test("brute force: past 10 failures in 15 minutes per name, or per address, logins get 429 with Retry-After, even with the right password", async () => {
    await using chat = await serve({ trustedProxies: "127.0.0.1" });
    const alice = await account(chat.url, "Alice");
    const from = (ip: string) => ({ "x-forwarded-for": ip });
    // per name: ten addresses, one failure each
    for (let i = 0; i < 10; i++) expect((await login(chat.url, "Alice", `guess ${i}`, from(`203.0.113.${i}`))).res.status).toBe(401);
    const locked = await login(chat.url, "Alice", alice.password, from("198.51.100.1"));
    expect(locked.res.status).toBe(429);
    expect(Number(locked.res.headers.get("retry-after"))).toBeGreaterThan(60);
    expect(locked.cookie).toBeUndefined();
    // per address: one address guessing many names
    const bob = await account(chat.url, "Bob");
    for (let i = 0; i < 10; i++) expect((await login(chat.url, `user${i}`, "guess", from("192.0.2.7"))).res.status).toBe(401);
    expect((await login(chat.url, "Bob", bob.password, from("192.0.2.7"))).res.status).toBe(429);
    expect((await login(chat.url, "Bob", bob.password, from("192.0.2.8"))).res.status).toBe(200);
    expect(await metric(chat.url, 'chat_refused_total{reason="login_failures"}')).toBe(2);
  });

  test("logout and revoking a session end it server-side: its sockets close with 4001 and its cookie names nobody", async () => {
    await using chat = await serve();
    const alice = await account(chat.url, "Alice");
    const other = await login(chat.url, "Alice", alice.password);
    const third = await login(chat.url, "Alice", alice.password);
    const a = await Client.connect(chat.url, alice);
    const b = await Client.connect(chat.url, { ...alice, cookie: other.cookie! });
    const c = await Client.connect(chat.url, { ...alice, cookie: third.cookie! });
    const list = (await (await fetch(`${chat.url}/api/me/sessions`, { headers: { cookie: alice.cookie } })).json()) as { id: string; createdAt: number; lastSeenAt: number; current: boolean }[];
    expect(list.length).toBe(3);
    expect(list.filter((s) => s.current).length).toBe(1);
    for (const s of list) expect(JSON.stringify(s)).not.toContain(other.cookie!.split("=")[1].split(".")[0]); // a handle, never a sid
    // sign out the "other" device from this one
    const otherHandle = ((await (await fetch(`${chat.url}/api/me/sessions`, { headers: { cookie: other.cookie! } })).json()) as { id: string; current: boolean }[]).find((s) => s.current)!.id;
    expect((await fetch(`${chat.url}/api/me/sessions/${otherHandle}`, { method: "DELETE", headers: { cookie: alice.cookie } })).status).toBe(204);
    expect(await b.closed).toEqual({ code: 4001, reason: "signed out" });
    expect(await upgradeStatus(chat.url, { cookie: other.cookie! })).toBe(401);
    // someone else's handle, or a made-up one: 404
    const mallory = await newSession(chat.url);
    const aliceHandle = list.find((s) => s.current)!.id;
    expect((await fetch(`${chat.url}/api/me/sessions/${aliceHandle}`, { method: "DELETE", headers: { cookie: mallory.cookie } })).status).toBe(404);
    // logout
    const out = await post(chat.url, "/api/logout", {}, third.cookie);
    expect(out.status).toBe(204);
    expect(out.headers.get("set-cookie")).toMatch(/^sid=;.*Max-Age=0/);
    expect(await c.closed).toEqual({ code: 4001, reason: "signed out" });
    expect(await upgradeStatus(chat.url, { cookie: third.cookie! })).toBe(401);
    // the first device is untouched
    await a.join("room");
    expect((await a.say("room", "still here")).user.id).toBe(alice.id);
    expect(((await (await fetch(`${chat.url}/api/me/sessions`, { headers: { cookie: alice.cookie } })).json()) as unknown[]).length).toBe(1);
  });

  test("an admin bans a user from the instance: every session ends, sockets close with 4003, login answers 403 until lifted; nobody else may", async () => {
    await using chat = await serve();
    const admin = await account(chat.url, "Admin");
    const bob = await account(chat.url, "Bob");
    const carol = await account(chat.url, "Carol");
    const b = await Client.connect(chat.url, bob);
    const ban = (who: Session, userId: string, method = "PUT") => fetch(`${chat.url}/api/users/${userId}/ban`, { method, headers: { cookie: who.cookie } });
    expect((await ban(carol, bob.id)).status).toBe(403); // not an admin
    expect((await ban(bob, admin.id)).status).toBe(403);
    expect((await ban(admin, admin.id)).status).toBe(403); // admins are not banned
    expect((await ban(admin, "u-nobody")).status).toBe(404);
    expect((await ban(admin, bob.id)).status).toBe(204);
    expect(await b.closed).toEqual({ code: 4003, reason: "banned" });
    expect(await upgradeStatus(chat.url, { cookie: bob.cookie })).toBe(401);
    const refused = await login(chat.url, "Bob", bob.password);
    expect(refused.res.status).toBe(403);
    expect(refused.body?.error?.code).toBe("forbidden");
    expect((await login(chat.url, "Bob", "wrong password")).res.status).toBe(401); // a wrong password learns nothing
    expect((await ban(admin, bob.id, "DELETE")).status).toBe(204);
    expect((await login(chat.url, "Bob", bob.password)).res.status).toBe(200);
  });

  test("GUESTS=read: guests join and read, but say and typing answer forbidden; accounts chat", async () => {
    await using chat = await serve({ guests: "read" });
    const alice = await account(chat.url, "Alice");
    const guest = await newSession(chat.url);
    const g = await Client.connect(chat.url, guest);
    const a = await Client.connect(chat.url, alice);
    await g.join("room");
    await a.join("room");
    g.send({ type: "say", room: "room", text: "hi", ref: "g1" });
    expect(await g.next((f) => f.type === "error")).toMatchObject({ code: "forbidden", ref: "g1" });
    g.send({ type: "typing", room: "room" });
    expect(await g.next((f) => f.type === "error")).toMatchObject({ code: "forbidden" });
    const sent = await a.say("room", "accounts may");
    expect(await g.next((f) => f.type === "message")).toEqual(sent);
    // signing up on the open socket lets it write at once
    expect((await post(chat.url, "/api/me/password", { password: "guest no more" }, guest.cookie)).status).toBe(200);
    expect((await g.say("room", "now I may")).user.id).toBe(guest.id);
  });

  test("GUESTS=off: a guest's upgrade gets 401 while /api/me still answers, so the page can offer sign-up; accounts connect", async () => {
    await using chat = await serve({ guests: "off" });
    const guest = await newSession(chat.url);
    expect(guest.registered).toBe(false);
    expect(await upgradeStatus(chat.url, { cookie: guest.cookie })).toBe(401);
    const alice = await account(chat.url, "Alice");
    expect(await upgradeStatus(chat.url, { cookie: alice.cookie })).toBe(101);
  });

  test("grant-admin <name> makes an account an admin from the command line, while the server runs; a guest or unknown name exits 1", async () => {
    using tmp = tempDir();
    const databaseUrl = `sqlite://${tmp.dir}/chat.db`;
    await using chat = await serve({ databaseUrl });
    await account(chat.url, "Alice");
    const bob = await account(chat.url, "Bob");
    await putName(chat.url, (await newSession(chat.url)).cookie, "Guest");
    const run = (...args: string[]) => Bun.spawnSync([BUN, join(ROOT, "server.ts"), "grant-admin", ...args], { env: { ...process.env, DATABASE_URL: databaseUrl } });
    const granted = run("bob");
    expect({ code: granted.exitCode, out: granted.stdout.toString(), err: granted.stderr.toString() }).toMatchObject({ code: 0, out: expect.stringContaining("Bob") });
    expect(run("Guest").exitCode).toBe(1);
    expect(run("nobody").exitCode).toBe(1);
    expect(run().exitCode).toBe(2);
    expect(((await (await fetch(`${chat.url}/api/me`, { headers: { cookie: bob.cookie } })).json()) as Me).admin).toBe(true);
    // the new admin's rights hold at once
    const carol = await account(chat.url, "Carol");
    expect((await fetch(`${chat.url}/api/users/${carol.id}/ban`, { method: "PUT", headers: { cookie: bob.cookie } })).status).toBe(204);
  });
});

describeWithServices("accounts, cluster", (services) => {
  test("a logout or a ban on one node closes the user's sockets on every node", async () => {
    await using cluster = await spawnCluster(services, ["acc-a", "acc-b"]);
    const [a, b] = cluster.nodes;
    const admin = await account(a.url, `Admin${Date.now() % 100000}`);
    const bob = await account(a.url, `Bob${Date.now() % 100000}`);
    const onB = await Client.connect(b.url, bob);
    const second = await login(b.url, bob.name, bob.password);
    const secondSocket = await Client.connect(b.url, { ...bob, cookie: second.cookie! });
    expect((await post(a.url, "/api/logout", {}, bob.cookie)).status).toBe(204);
    expect(await onB.closed).toEqual({ code: 4001, reason: "signed out" });
    expect((await fetch(`${a.url}/api/users/${bob.id}/ban`, { method: "PUT", headers: { cookie: admin.cookie } })).status).toBe(204);
    expect(await secondSocket.closed).toEqual({ code: 4003, reason: "banned" });
  });
});
