// A WebSocket client over raw TCP (Bun.connect), for what a well-behaved client cannot do:
// send invalid UTF-8 or protocol violations, stop reading (pause) or vanish mid-stream.
import type { Socket } from "bun";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
export const OP = { continuation: 0, text: 1, binary: 2, close: 8, ping: 9, pong: 10 } as const;

export type RawFrame = { opcode: number; payload: Uint8Array };
export type RawOptions = { cookie?: string; origin?: string; headers?: Record<string, string> };

/** Encodes one client frame; masked unless `mask` is false (which a server must refuse). */
export function encodeFrame(opcode: number, payload: Uint8Array, { fin = true, mask = true, rsv = 0 } = {}): Uint8Array {
  const len = payload.length;
  const head = len < 126 ? 2 : len < 65536 ? 4 : 10;
  const out = new Uint8Array(head + (mask ? 4 : 0) + len);
  out[0] = (fin ? 0x80 : 0) | (rsv << 4) | opcode;
  out[1] = (mask ? 0x80 : 0) | (len < 126 ? len : len < 65536 ? 126 : 127);
  const view = new DataView(out.buffer);
  if (head === 4) view.setUint16(2, len);
  if (head === 10) view.setBigUint64(2, BigInt(len));
  if (!mask) {
    out.set(payload, head);
    return out;
  }
  const key = crypto.getRandomValues(new Uint8Array(4));
  out.set(key, head);
  for (let i = 0; i < len; i++) out[head + 4 + i] = payload[i] ^ key[i & 3];
  return out;
}

/** A raw client connection; `frames` collects what the server sent, `closed` settles on a close frame or TCP end. */
export class RawSocket {
  readonly frames: RawFrame[] = [];
  /** The server's close frame (code, reason), or code 1006 when TCP ended without one. */
  readonly closed: Promise<{ code: number; reason: string }>;
  /** Total bytes received from the server (after the handshake). */
  received = 0;
  private buffer = new Uint8Array(0);
  private resolveClosed!: (v: { code: number; reason: string }) => void;
  private wake: (() => void) | null = null;
  private constructor(readonly socket: Socket<RawSocket>) {
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
  }

  /** Connects to `url` (http://host:port), upgrades /chat and resolves once the 101 arrived; rejects with the status otherwise. */
  static async open(url: string, options: RawOptions = {}): Promise<RawSocket> {
    const { hostname, port } = new URL(url);
    const handshake = Promise.withResolvers<RawSocket>();
    let raw: RawSocket | null = null;
    let header = "";
    let upgraded = false;
    const socket = await Bun.connect<RawSocket>({
      hostname,
      port: Number(port),
      socket: {
        data(s, chunk) {
          if (upgraded) return raw!.feed(chunk);
          header += Buffer.from(chunk).toString("latin1");
          const end = header.indexOf("\r\n\r\n");
          if (end < 0) return;
          const status = Number(header.slice(9, 12));
          if (status !== 101) {
            handshake.reject(new Error(`upgrade answered ${status}`));
            return void s.end();
          }
          upgraded = true;
          handshake.resolve(raw!);
          const rest = Buffer.from(header.slice(end + 4), "latin1");
          if (rest.length) raw!.feed(new Uint8Array(rest));
        },
        close() {
          handshake.reject(new Error("closed during the handshake"));
          raw?.resolveClosed({ code: 1006, reason: "" });
          raw?.wake?.();
        },
        error() {},
      },
    });
    raw = new RawSocket(socket);
    const key = Buffer.from(crypto.getRandomValues(new Uint8Array(16))).toString("base64");
    const headers: Record<string, string> = {
      host: `${hostname}:${port}`,
      upgrade: "websocket",
      connection: "Upgrade",
      "sec-websocket-key": key,
      "sec-websocket-version": "13",
      ...(options.cookie ? { cookie: options.cookie } : {}),
      ...(options.origin ? { origin: options.origin } : {}),
      ...options.headers,
    };
    socket.write(`GET /chat HTTP/1.1\r\n${Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join("")}\r\n`);
    // a caller's own sec-websocket-key (e.g. from UPGRADE) replaces ours: check the accept against the one sent
    const expected = new Bun.CryptoHasher("sha1").update(headers["sec-websocket-key"] + GUID).digest("base64");
    await handshake.promise;
    if (!header.toLowerCase().includes(expected.toLowerCase())) throw new Error("bad Sec-WebSocket-Accept");
    return raw;
  }

  private feed(chunk: Uint8Array) {
    this.received += chunk.length;
    const merged = new Uint8Array(this.buffer.length + chunk.length);
    merged.set(this.buffer);
    merged.set(chunk, this.buffer.length);
    let at = 0;
    for (;;) {
      if (merged.length - at < 2) break;
      const opcode = merged[at] & 0x0f;
      let len = merged[at + 1] & 0x7f;
      let head = 2;
      if (len === 126) {
        if (merged.length - at < 4) break;
        len = (merged[at + 2] << 8) | merged[at + 3];
        head = 4;
      } else if (len === 127) {
        if (merged.length - at < 10) break;
        len = Number(new DataView(merged.buffer, merged.byteOffset + at + 2, 8).getBigUint64(0));
        head = 10;
      }
      if (merged.length - at < head + len) break;
      const payload = merged.slice(at + head, at + head + len);
      at += head + len;
      this.frames.push({ opcode, payload });
      if (opcode === OP.close) {
        const code = payload.length >= 2 ? (payload[0] << 8) | payload[1] : 1005;
        this.resolveClosed({ code, reason: new TextDecoder().decode(payload.subarray(2)) });
      }
    }
    this.buffer = merged.slice(at);
    this.wake?.();
  }

  /** The text frames received so far, parsed as JSON. */
  texts(): any[] {
    return this.frames.filter((f) => f.opcode === OP.text).map((f) => JSON.parse(new TextDecoder().decode(f.payload)));
  }

  /** Waits until a received JSON text frame matches, or the deadline passes. */
  async next(pred: (msg: any) => boolean, timeoutMs = 5000): Promise<any> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.texts().find(pred);
      if (found) return found;
      if (Date.now() > deadline) throw new Error(`raw socket: timed out; got ${JSON.stringify(this.texts()).slice(0, 500)}`);
      const { promise, resolve } = Promise.withResolvers<void>();
      this.wake = resolve;
      const timer = setTimeout(resolve, Math.max(1, deadline - Date.now()));
      await promise;
      clearTimeout(timer);
    }
  }

  send(bytes: Uint8Array) {
    this.socket.write(bytes);
  }

  sendText(text: string) {
    this.send(encodeFrame(OP.text, new TextEncoder().encode(text)));
  }

  sendJson(msg: object) {
    this.sendText(JSON.stringify(msg));
  }

  /** Stops reading: the server sees TCP backpressure once the kernel buffers fill. */
  pause() {
    this.socket.pause();
  }

  /** Drops the TCP connection without a close frame. */
  destroy() {
    this.socket.terminate();
  }
}
