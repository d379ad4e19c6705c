// Deploying: the server behind Caddy (Debian's, with its own local certificate authority) as deploy/Caddyfile
// sets it up, reached over https and wss on ::1 while Caddy reaches the server on 127.0.0.1; and the systemd unit.
import { describe, expect, test } from "bun:test";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { freePort } from "./services.ts";
import { ROOT, serve, tempDir, until } from "./helpers.ts";

const CADDY = Bun.which("caddy");
const REQUIRE_ALL = !!process.env.CHAT_TEST_REQUIRE_ALL;

/** deploy/Caddyfile with the test's names: https on [::1]:port with Caddy's local CA, and the server's port. */
async function caddyfile(dir: string, httpsPort: number, serverPort: number): Promise<string> {
  const shipped = await Bun.file(join(ROOT, "deploy", "Caddyfile")).text();
  expect(shipped).toContain("chat.example.com {\n\treverse_proxy 127.0.0.1:3000\n}");
  const global = `{\n\tadmin off\n\tskip_install_trust\n\tauto_https disable_redirects\n\thttp_port ${freePort()}\n\thttps_port ${httpsPort}\n\tstorage file_system ${dir}/data\n}\n`;
  return global + shipped
    .replace("chat.example.com {", `https://[::1]:${httpsPort} {\n\tbind ::1\n\ttls internal`)
    .replace("127.0.0.1:3000", `127.0.0.1:${serverPort}`);
}

/** Caddy running that file until disposed (stopped by its pid). */
async function startCaddy(dir: string, config: string) {
  await Bun.write(join(dir, "Caddyfile"), config);
  const env = { ...process.env, HOME: dir, XDG_DATA_HOME: join(dir, "xdg"), XDG_CONFIG_HOME: join(dir, "xdg") };
  const proc = Bun.spawn([CADDY!, "run", "--config", join(dir, "Caddyfile"), "--adapter", "caddyfile"], { env, stdout: "ignore", stderr: "ignore" });
  return {
    proc,
    async [Symbol.asyncDispose]() {
      proc.kill();
      await proc.exited;
    },
  };
}

describe.skipIf(!CADDY && !REQUIRE_ALL)("behind Caddy with TLS", () => {
  test("the page loads over https, the cookie is __Host- and Secure, the socket works through the proxy, and TRUSTED_PROXIES makes the client address right", async () => {
    if (!CADDY) throw new Error("caddy is not installed: apt-get install caddy (.ci/run does)");
    using tmp = tempDir("chat-caddy-");
    const lines: Record<string, unknown>[] = [];
    await using chat = await serve({ trustedProxies: "127.0.0.1/32", logLevel: "debug", log: (l) => void lines.push(l) });
    const httpsPort = freePort();
    await using caddy = await startCaddy(tmp.dir, await caddyfile(tmp.dir, httpsPort, chat.port));
    const base = `https://[::1]:${httpsPort}`;
    // Caddy's root certificate, made at its start: clients verify the chain rather than skip verification
    const rootPath = join(tmp.dir, "data/pki/authorities/local/root.crt");
    // read afresh each time: a Bun.file keeps the size it first saw, and Caddy writes the file after making it
    const root = await until(() => (existsSync(rootPath) && readFileSync(rootPath, "utf8").includes("-----END CERTIFICATE-----") ? readFileSync(rootPath, "utf8") : ""), 10_000, "Caddy's local CA");
    const tls = { ca: root };
    const page = (await until(() => fetch(`${base}/`, { tls }).catch(() => null), 10_000, "Caddy to answer"))!;
    expect(caddy.proc.exitCode).toBeNull();
    expect(page.status).toBe(200);
    expect(page.headers.get("content-security-policy")).toContain("default-src");
    expect(await page.text()).toContain("<script");

    const me = await fetch(`${base}/api/me`, { tls });
    const setCookie = me.headers.get("set-cookie") ?? "";
    expect(setCookie).toMatch(/^__Host-sid=[^;]+; .*Path=\/; HttpOnly; Secure; SameSite=Lax$/);
    const { id } = (await me.json()) as { id: string };

    const ws = new WebSocket(`wss://[::1]:${httpsPort}/chat`, { headers: { cookie: setCookie.split(";")[0], origin: base }, tls } as never);
    const frames: { type: string; user?: { id: string }; text?: string }[] = [];
    ws.onmessage = (e) => frames.push(JSON.parse(String(e.data)));
    await until(() => frames.some((f) => f.type === "welcome"), 10_000, "welcome through the proxy");
    expect(frames[0].user?.id).toBe(id);
    ws.send(JSON.stringify({ type: "join", room: "tls" }));
    ws.send(JSON.stringify({ type: "say", room: "tls", text: "over wss" }));
    await until(() => frames.some((f) => f.type === "message" && f.text === "over wss"), 10_000, "the echo through the proxy");
    ws.close();

    // the client came from ::1; Caddy from 127.0.0.1, which is trusted, so the client is ::1's /64
    expect(lines.find((l) => l.event === "connection_opened" && l.user === id)).toMatchObject({ address: "0000:0000:0000:0000::/64" });
  }, 60_000);
});

describe.skipIf(!Bun.which("systemd-analyze"))("the systemd unit", () => {
  test("deploy/chat.service verifies, and is hardened as the README says", async () => {
    using tmp = tempDir("chat-unit-");
    const unit = await Bun.file(join(ROOT, "deploy", "chat.service")).text();
    for (const line of ["DynamicUser=yes", "StateDirectory=chat", "NoNewPrivileges=yes", "ProtectSystem=strict", "KillSignal=SIGTERM", "Environment=BUN_JSC_useFTLJIT=0"]) expect(unit).toContain(`\n${line}\n`);
    // the binary is not installed here: verify the unit with a program that exists
    await Bun.write(join(tmp.dir, "chat.service"), unit.replace("ExecStart=/usr/local/bin/chat", `ExecStart=${Bun.which("true")}`));
    const verify = Bun.spawnSync(["systemd-analyze", "verify", "--man=no", join(tmp.dir, "chat.service")]);
    expect({ code: verify.exitCode, err: verify.stderr.toString() }).toEqual({ code: 0, err: "" });
  });
});
