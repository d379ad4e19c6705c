// Rooms people make and run: private rooms, direct messages, members and roles, kicks, bans, mutes and the
// audit log, and every refusal. Real servers and sockets; a real cluster for changes that cross nodes.
import { describe, expect, test } from "bun:test";
import { Client, newSession, putName, serve, type Session, spawnCluster } from "./helpers.ts";
import { describeWithServices } from "./services.ts";

const json = { "content-type": "application/json" };
type Api = (method: string, path: string, who: Session, body?: unknown) => Promise<Response>;
const apiOf = (baseUrl: string): Api => (method, path, who, body) =>
  fetch(`${baseUrl}${path}`, { method, headers: { ...json, cookie: who.cookie }, body: body === undefined ? undefined : JSON.stringify(body) });

/** A registered user named `name` (the first one on a server is its admin). */
async function member(baseUrl: string, name: string): Promise<Session> {
  const guest = await newSession(baseUrl);
  expect((await putName(baseUrl, guest.cookie, name)).status).toBe(200);
  const res = await fetch(`${baseUrl}/api/me/password`, { method: "POST", headers: { ...json, cookie: guest.cookie }, body: JSON.stringify({ password: "a long password" }) });
  expect(res.status).toBe(200);
  const me = (await res.json()) as { admin: boolean };
  return { ...guest, name, registered: true, admin: me.admin, cookie: res.headers.get("set-cookie")!.split(";")[0] };
}

/** Everything a socket heard of a room (error frames about it included). */
const about = (client: Client, room: string) => client.frames.filter((f) => "room" in f && f.room === room);

describe("private rooms and direct messages", () => {
  test("a private room: made by an account (not a guest), joined by members only; a non-member cannot join, list, read or learn its members", async () => {
    await using chat = await serve();
    const api = apiOf(chat.url);
    await member(chat.url, "Admin"); // the first account is the instance's admin: keep the others plain
    const owner = await member(chat.url, "Owner");
    const outsider = await member(chat.url, "Outsider");
    const guest = await newSession(chat.url);
    expect((await api("POST", "/api/rooms", guest, { name: "secret", visibility: "private" })).status).toBe(403);
    const made = await api("POST", "/api/rooms", owner, { name: "secret", visibility: "private" });
    expect(made.status).toBe(201);
    expect(await made.json()).toEqual({ name: "secret", visibility: "private", owner: { id: owner.id, name: "Owner" } });
    expect((await api("POST", "/api/rooms", outsider, { name: "secret", visibility: "public" })).status).toBe(409);
    expect((await api("POST", "/api/rooms", owner, { name: "dm-mine", visibility: "public" })).status).toBe(400);

    const o = await Client.connect(chat.url, owner);
    await o.join("secret");
    await o.say("secret", "for members only");
    // the outsider: refused, and hears nothing of the room
    const x = await Client.connect(chat.url, outsider);
    x.send({ type: "join", room: "secret", since: 0 });
    expect(await x.next((f) => f.type === "error")).toMatchObject({ code: "forbidden", room: "secret" });
    await o.say("secret", "still secret");
    await x.join("elsewhere"); // a later frame: anything of "secret" would have arrived before it
    expect(about(x, "secret").map((f) => f.type)).toEqual(["error"]);
    expect((await api("GET", "/api/rooms", outsider)).ok).toBe(true);
    expect(((await (await api("GET", "/api/rooms", outsider)).json()) as { name: string }[]).map((r) => r.name)).not.toContain("secret");
    for (const path of ["/api/rooms/secret/messages", "/api/rooms/secret/members", "/api/rooms/secret/audit"]) {
      const res = await api("GET", path, outsider);
      expect({ path, status: res.status, body: await res.json() }).toEqual({ path, status: 404, body: { error: { code: "not_found", message: "No such room" } } });
    }
    expect((await fetch(`${chat.url}/api/rooms/secret/messages`)).status).toBe(404); // no session at all
    // the owner invites: the invitee hears of it, joins, reads, and sees the room listed as private
    expect((await api("PUT", `/api/rooms/secret/members/${outsider.id}`, outsider)).status).toBe(404); // not a member: no such room
    expect((await api("PUT", `/api/rooms/secret/members/${outsider.id}`, owner)).status).toBe(204);
    expect(await x.next((f) => f.type === "invited")).toEqual({ type: "invited", room: "secret", by: { id: owner.id, name: "Owner" } });
    const { history } = await x.join("secret");
    expect(history.messages.map((m) => m.text)).toEqual(["for members only", "still secret"]);
    const listed = (await (await api("GET", "/api/rooms", outsider)).json()) as { name: string; visibility: string }[];
    expect(listed.find((r) => r.name === "secret")).toMatchObject({ visibility: "private" });
    expect(await (await api("GET", "/api/rooms/secret/members", outsider)).json()).toEqual([
      { id: owner.id, name: "Owner", role: "owner" },
      { id: outsider.id, name: "Outsider", role: "member" },
    ]);
    // a member may leave; then it is an outsider again
    expect((await api("DELETE", `/api/rooms/secret/members/${outsider.id}`, outsider)).status).toBe(204);
    expect(await x.next((f) => f.type === "removed")).toMatchObject({ room: "secret", reason: "left" });
    x.send({ type: "join", room: "secret" });
    expect(await x.next((f) => f.type === "error" && f.room === "secret")).toMatchObject({ code: "forbidden" });
  });

  test("a dm: the same room whoever starts it; only its two users join or read it", async () => {
    await using chat = await serve();
    const api = apiOf(chat.url);
    const [ann, bob, eve] = [await newSession(chat.url), await newSession(chat.url), await newSession(chat.url)];
    const started = await api("POST", "/api/dms", ann, { user: bob.id });
    expect(started.status).toBe(200);
    const { room } = (await started.json()) as { room: string };
    expect(room).toMatch(/^dm-[0-9a-f]{20}$/);
    expect(await (await api("POST", "/api/dms", bob, { user: ann.id })).json()).toEqual({ room });
    expect((await api("POST", "/api/dms", ann, { user: ann.id })).status).toBe(400);
    expect((await api("POST", "/api/dms", ann, { user: "u-nobody" })).status).toBe(404);
    const [a, b, e] = await Promise.all([ann, bob, eve].map((s) => Client.connect(chat.url, s)));
    await a.join(room);
    await b.join(room);
    const sent = await a.say(room, "just us");
    expect(await b.next((f) => f.type === "message")).toEqual(sent);
    e.send({ type: "join", room });
    expect(await e.next((f) => f.type === "error")).toMatchObject({ code: "forbidden", room });
    expect((await api("GET", `/api/rooms/${room}/messages`, eve)).status).toBe(404);
    // an unknown dm name is not made by joining it
    e.send({ type: "join", room: "dm-00000000000000000000" });
    expect(await e.next((f) => f.type === "error" && f.room === "dm-00000000000000000000")).toMatchObject({ code: "forbidden" });
    const listed = (await (await api("GET", "/api/rooms", bob)).json()) as { name: string; visibility: string; with?: unknown }[];
    expect(listed.find((r) => r.name === room)).toMatchObject({ visibility: "dm", with: { id: ann.id, name: ann.name } });
    expect(((await (await api("GET", "/api/rooms", eve)).json()) as { name: string }[]).map((r) => r.name)).not.toContain(room);
    // no moderation in a dm
    expect((await api("PUT", `/api/rooms/${room}/bans/${bob.id}`, ann)).status).toBe(403);
  });
});

describe("moderation", () => {
  /** A public room made by Owner (so it has one), with Mod as its moderator and Member and Other in it. */
  async function roomWithStaff() {
    const chat = await serve();
    const api = apiOf(chat.url);
    const admin = await member(chat.url, "Admin");
    const owner = await member(chat.url, "Owner");
    const mod = await member(chat.url, "Mod");
    const plain = await member(chat.url, "Member");
    const other = await member(chat.url, "Other");
    expect((await api("POST", "/api/rooms", owner, { name: "hall", visibility: "public" })).status).toBe(201);
    expect((await api("PUT", `/api/rooms/hall/moderators/${mod.id}`, owner)).status).toBe(204);
    const sockets = await Promise.all([owner, mod, plain, other].map((s) => Client.connect(chat.url, s)));
    for (const s of sockets) await s.join("hall");
    return { chat, api, admin, owner, mod, plain, other, sockets };
  }

  test("a kick takes the user's sockets out of a public room with a removed frame; everyone sees it; the user may join again", async () => {
    const { chat, api, mod, plain, sockets: [o, , p, x] } = await roomWithStaff();
    await using _ = chat;
    expect((await api("DELETE", `/api/rooms/hall/members/${plain.id}`, mod)).status).toBe(204);
    expect(await p.next((f) => f.type === "removed")).toEqual({ type: "removed", room: "hall", by: { id: mod.id, name: "Mod" }, reason: "kicked" });
    for (const c of [o, x]) {
      expect(await c.next((f) => f.type === "moderation")).toEqual({ type: "moderation", room: "hall", action: "kick", user: { id: plain.id, name: "Member" }, by: { id: mod.id, name: "Mod" } });
    }
    p.send({ type: "say", room: "hall", text: "am I here?", ref: "k" });
    expect(await p.next((f) => f.type === "error" && f.ref === "k")).toMatchObject({ code: "not_joined" });
    await o.say("hall", "after the kick");
    expect(p.untaken().filter((f) => f.type === "message")).toEqual([]);
    await p.join("hall"); // a kick is not a ban
  });

  test("a ban removes the user and refuses every later join until lifted or expired; a mute keeps them reading but silent", async () => {
    const { chat, api, owner, mod, plain, other, sockets: [o, , p, x] } = await roomWithStaff();
    await using _ = chat;
    expect((await api("PUT", `/api/rooms/hall/bans/${plain.id}`, owner, { minutes: 60 })).status).toBe(204);
    expect(await p.next((f) => f.type === "removed")).toMatchObject({ room: "hall", reason: "banned" });
    const banned = (await o.next((f) => f.type === "moderation")) as { until?: number };
    expect(banned).toMatchObject({ action: "ban", user: { id: plain.id } });
    expect(banned.until! - Date.now()).toBeGreaterThan(59 * 60_000);
    p.send({ type: "join", room: "hall" });
    expect(await p.next((f) => f.type === "error" && f.room === "hall")).toMatchObject({ code: "forbidden" });
    // a second socket, opened after the ban, is refused too
    const late = await Client.connect(chat.url, plain);
    late.send({ type: "join", room: "hall" });
    expect(await late.next((f) => f.type === "error")).toMatchObject({ code: "forbidden", room: "hall" });
    expect((await api("DELETE", `/api/rooms/hall/bans/${plain.id}`, mod)).status).toBe(204);
    await p.join("hall");

    // mute: say and typing answer forbidden with the time left; reading goes on
    expect((await api("PUT", `/api/rooms/hall/mutes/${other.id}`, mod, { minutes: 10 })).status).toBe(204);
    expect(await o.next((f) => f.type === "moderation" && f.action === "mute")).toMatchObject({ user: { id: other.id } });
    x.send({ type: "say", room: "hall", text: "let me speak", ref: "m1" });
    const refused = (await x.next((f) => f.type === "error" && f.ref === "m1")) as { code: string; retryAfterMs: number };
    expect(refused.code).toBe("forbidden");
    expect(refused.retryAfterMs).toBeGreaterThan(9 * 60_000);
    x.send({ type: "typing", room: "hall" });
    expect(await x.next((f) => f.type === "error" && f.code === "forbidden" && f.ref === undefined)).toMatchObject({ room: "hall" });
    const heard = await o.say("hall", "you can still read");
    expect(await x.next((f) => f.type === "message" && f.id === heard.id)).toEqual(heard);
    expect((await api("DELETE", `/api/rooms/hall/mutes/${other.id}`, mod)).status).toBe(204);
    expect((await x.say("hall", "thanks")).text).toBe("thanks");
    // a ban without minutes lasts until lifted; a mute needs minutes
    expect((await api("PUT", `/api/rooms/hall/bans/${other.id}`, owner)).status).toBe(204);
    expect((await api("PUT", `/api/rooms/hall/mutes/${plain.id}`, owner, {})).status).toBe(400);
  });

  test("nobody moderates their own or a higher rank; every refusal is 403 and changes nothing; the audit log is for staff, newest first", async () => {
    const { chat, api, admin, owner, mod, plain, other, sockets: [o] } = await roomWithStaff();
    await using _ = chat;
    const refusals: [Session, string, string, unknown?][] = [
      [plain, "DELETE", `/api/rooms/hall/members/${other.id}`], // a member kicks
      [plain, "PUT", `/api/rooms/hall/mutes/${other.id}`, { minutes: 5 }],
      [mod, "DELETE", `/api/rooms/hall/members/${owner.id}`], // a moderator kicks the owner
      [mod, "PUT", `/api/rooms/hall/bans/${mod.id}`], // or itself
      [mod, "PUT", `/api/rooms/hall/moderators/${plain.id}`], // a moderator promotes
      [owner, "PUT", `/api/rooms/hall/bans/${admin.id}`], // the owner bans an admin
      [other, "GET", "/api/rooms/hall/audit"],
    ];
    for (const [who, method, path, body] of refusals) {
      const res = await api(method, path, who, body);
      expect({ who: who.name, method, path, status: res.status, code: ((await res.json()) as { error: { code: string } }).error.code })
        .toEqual({ who: who.name, method, path, status: 403, code: "forbidden" });
    }
    // the only entry is the promotion made while setting up
    const audit = await (await api("GET", "/api/rooms/hall/audit", mod)).json();
    expect(audit).toEqual([{ action: "promote", user: { id: mod.id, name: "Mod" }, by: { id: owner.id, name: "Owner" }, at: expect.any(Number) }]);
    // a demoted moderator cannot moderate any more, with the socket it already had
    expect((await api("DELETE", `/api/rooms/hall/moderators/${mod.id}`, owner)).status).toBe(204);
    expect(await o.next((f) => f.type === "moderation" && f.action === "demote")).toMatchObject({ user: { id: mod.id } });
    expect((await api("PUT", `/api/rooms/hall/mutes/${plain.id}`, mod, { minutes: 5 })).status).toBe(403);
    // an admin moderates everywhere, the owner included
    expect((await api("PUT", `/api/rooms/hall/mutes/${owner.id}`, admin, { minutes: 1 })).status).toBe(204);
    const log = (await (await api("GET", "/api/rooms/hall/audit", owner)).json()) as { action: string; user: { name: string }; by: { name: string } }[];
    expect(log.map((e) => [e.action, e.user.name, e.by.name])).toEqual([["mute", "Owner", "Admin"], ["demote", "Mod", "Owner"], ["promote", "Mod", "Owner"]]);
  });

  test("in a private room a kick or ban ends membership: the user cannot join again until invited", async () => {
    await using chat = await serve();
    const api = apiOf(chat.url);
    const owner = await member(chat.url, "Owner");
    const guest = await newSession(chat.url);
    expect((await api("POST", "/api/rooms", owner, { name: "club", visibility: "private" })).status).toBe(201);
    expect((await api("PUT", `/api/rooms/club/members/${guest.id}`, owner)).status).toBe(204);
    const g = await Client.connect(chat.url, guest);
    await g.join("club");
    expect((await api("DELETE", `/api/rooms/club/members/${guest.id}`, owner)).status).toBe(204);
    expect(await g.next((f) => f.type === "removed")).toMatchObject({ room: "club", reason: "kicked" });
    g.send({ type: "join", room: "club" });
    expect(await g.next((f) => f.type === "error")).toMatchObject({ code: "forbidden", room: "club" });
    expect((await api("GET", "/api/rooms/club/members", guest)).status).toBe(404);
  });
});

describeWithServices("moderation, cluster", (services) => {
  test("a kick, a ban, a mute and an invite made on one node reach the user's sockets on another", async () => {
    await using cluster = await spawnCluster(services, ["mod-a", "mod-b"]);
    const [a, b] = cluster.nodes;
    const api = apiOf(a.url);
    const owner = await member(a.url, `Owner${Date.now() % 100000}`);
    const bob = await newSession(a.url);
    expect((await api("POST", "/api/rooms", owner, { name: "lounge", visibility: "public" })).status).toBe(201);
    expect((await api("POST", "/api/rooms", owner, { name: "vault", visibility: "private" })).status).toBe(201);
    const onB = await Client.connect(b.url, bob);
    await onB.join("lounge");
    // invite on a, heard on b; b lets bob in
    expect((await api("PUT", `/api/rooms/vault/members/${bob.id}`, owner)).status).toBe(204);
    expect(await onB.next((f) => f.type === "invited")).toMatchObject({ room: "vault" });
    await onB.join("vault");
    // mute on a: bob's socket on b is refused once b has the news
    expect((await api("PUT", `/api/rooms/lounge/mutes/${bob.id}`, owner, { minutes: 5 })).status).toBe(204);
    expect(await onB.next((f) => f.type === "moderation" && f.action === "mute")).toMatchObject({ user: { id: bob.id } });
    onB.send({ type: "say", room: "lounge", text: "muted?", ref: "x" });
    expect(await onB.next((f) => f.type === "error" && f.ref === "x")).toMatchObject({ code: "forbidden" });
    // ban on a: bob is out on b, and b refuses his join
    expect((await api("PUT", `/api/rooms/vault/bans/${bob.id}`, owner)).status).toBe(204);
    expect(await onB.next((f) => f.type === "removed")).toMatchObject({ room: "vault", reason: "banned" });
    onB.send({ type: "join", room: "vault" });
    expect(await onB.next((f) => f.type === "error" && f.room === "vault")).toMatchObject({ code: "forbidden" });
    // kick on a
    expect((await api("DELETE", `/api/rooms/lounge/members/${bob.id}`, owner)).status).toBe(204);
    expect(await onB.next((f) => f.type === "removed")).toMatchObject({ room: "lounge", reason: "kicked" });
  });
});
