// Real Redis and Postgres servers for tests: temp folders, free loopback ports, stopped by pid.
import { afterAll, beforeAll, describe } from "bun:test";
import { chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const PG_ROOT = "/usr/lib/postgresql";

export const REDIS_SERVER = Bun.which("redis-server");
export const PG_BIN = existsSync(PG_ROOT)
  ? readdirSync(PG_ROOT).map((v) => join(PG_ROOT, v, "bin")).find((dir) => existsSync(join(dir, "postgres")))
  : undefined;

/** Why cluster tests cannot run here, or null. CI sets CHAT_TEST_REQUIRE_ALL=1, which turns a skip into a failure. */
export function missingServices(): string | null {
  const missing = [!REDIS_SERVER && "redis-server", !PG_BIN && "postgresql"].filter(Boolean);
  if (missing.length === 0) return null;
  const why = `cluster tests skipped: ${missing.join(" and ")} not installed (apt-get install redis-server postgresql)`;
  if (process.env.CHAT_TEST_REQUIRE_ALL === "1") throw new Error(why.replace("skipped", "cannot run"));
  console.log(why);
  return why;
}

/** A port that was free a moment ago on 127.0.0.1. */
export function freePort(): number {
  const listener = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = listener.port;
  listener.stop(true);
  return port;
}

async function waitFor(check: () => Promise<boolean>, timeoutMs: number, what: string) {
  const deadline = Date.now() + timeoutMs;
  while (!(await check().catch(() => false))) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(50);
  }
}

async function canConnect(port: number): Promise<boolean> {
  const { promise, resolve } = Promise.withResolvers<boolean>();
  Bun.connect({ hostname: "127.0.0.1", port, socket: { open: (s) => (s.end(), resolve(true)), data() {}, error: () => resolve(false), connectError: () => resolve(false) } }).catch(() => resolve(false));
  return promise;
}

/** A redis-server on a free port; restart() brings it back on the same port, empty. */
export async function startRedis() {
  const dir = mkdtempSync(join(tmpdir(), "chat-redis-"));
  const port = freePort();
  let proc: Bun.Subprocess;
  async function start() {
    proc = Bun.spawn([REDIS_SERVER!, "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir], { stdout: "ignore", stderr: "ignore" });
    await waitFor(() => canConnect(port), 10_000, "redis-server");
  }
  async function stop() {
    proc.kill(9);
    await proc.exited;
  }
  await start();
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    get pid() {
      return proc.pid;
    },
    stop,
    async restart() {
      await stop();
      await start();
    },
    async [Symbol.asyncDispose]() {
      await stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Runs a Postgres program as the postgres user when we are root (initdb refuses root). */
function asPostgres(cmd: string[]): string[] {
  return process.getuid?.() === 0 ? ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", ...cmd] : cmd;
}

/** A throwaway Postgres cluster on a free port (trust auth on loopback; fsync off for tests, the bench sets its own). */
export async function startPostgres(settings: Record<string, string> = { fsync: "off" }) {
  const dir = mkdtempSync(join(tmpdir(), "chat-pg-"));
  if (process.getuid?.() === 0) {
    const id = async (flag: string) => Number((await Bun.$`id ${flag} postgres`.text()).trim());
    chownSync(dir, await id("-u"), await id("-g"));
  }
  const data = join(dir, "data");
  const init = Bun.spawn(asPostgres([join(PG_BIN!, "initdb"), "-D", data, "-U", "chat", "--auth=trust", "--no-sync"]), { stdout: "ignore", stderr: "pipe" });
  if ((await init.exited) !== 0) throw new Error(`initdb failed: ${await new Response(init.stderr).text()}`);
  const port = freePort();
  let proc: Bun.Subprocess;
  async function start() {
    proc = Bun.spawn(asPostgres([join(PG_BIN!, "postgres"), "-D", data, "-p", String(port), "-h", "127.0.0.1", "-k", dir, ...Object.entries(settings).flatMap(([k, v]) => ["-c", `${k}=${v}`]), "-c", "max_connections=200"]), { stdout: "ignore", stderr: "ignore" });
    await waitFor(() => canConnect(port), 20_000, "postgres");
    // accepting TCP is not yet accepting queries
    await waitFor(async () => {
      const ping = Bun.spawn([join(PG_BIN!, "pg_isready"), "-h", "127.0.0.1", "-p", String(port)], { stdout: "ignore", stderr: "ignore" });
      return (await ping.exited) === 0;
    }, 20_000, "postgres ready");
  }
  /** Fast shutdown (SIGINT), as an operator would stop it. */
  async function stop() {
    proc.kill("SIGINT");
    await proc.exited;
  }
  await start();
  let db = 0;
  return {
    port,
    /** the postmaster's pid (its backends and workers are its children) */
    get pid() {
      return proc.pid;
    },
    /** A fresh database per call, so tests do not share state. */
    async createDatabase() {
      const name = `chat${++db}`;
      const create = Bun.spawn([join(PG_BIN!, "createdb"), "-h", "127.0.0.1", "-p", String(port), "-U", "chat", name], { stdout: "ignore", stderr: "pipe" });
      if ((await create.exited) !== 0) throw new Error(`createdb failed: ${await new Response(create.stderr).text()}`);
      return `postgres://chat@127.0.0.1:${port}/${name}`;
    },
    stop,
    start,
    async [Symbol.asyncDispose]() {
      if (proc.exitCode === null) await stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export type Redis = Awaited<ReturnType<typeof startRedis>>;
export type Postgres = Awaited<ReturnType<typeof startPostgres>>;

export type Services = { redis: Redis; pg: Postgres };

/** One redis-server and one Postgres for the enclosing describe block, stopped after it. */
export function sharedServices() {
  const services = {} as Services;
  beforeAll(async () => {
    [services.redis, services.pg] = await Promise.all([startRedis(), startPostgres()]);
  });
  afterAll(async () => {
    await services.redis?.[Symbol.asyncDispose]();
    await services.pg?.[Symbol.asyncDispose]();
  });
  return services;
}

/** A describe block with one shared redis-server and Postgres; skipped with one line where they are missing (CI fails instead). */
export function describeWithServices(name: string, fn: (services: Services) => void) {
  const skip = missingServices();
  describe.skipIf(!!skip)(name, () => fn(sharedServices()));
}
