// A small WebSocket client over raw TCP (Bun.connect), built to be cheap at millions of frames per second:
// the HTTP upgrade is done by hand, client frames are masked, server frames are parsed incrementally
// straight from each TCP read (one JS call per read, not one event per frame), and text frames reach
// the owner as byte ranges (no string, no JSON.parse) through `onText(conn, bytes, start, end, nowUs)`.
import type { Socket } from "bun";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * Microseconds since the epoch with sub-µs resolution: the process's time origin (wall clock, taken
 * once) plus the monotonic performance.now(). Comparable across processes to ~10 µs, which is what the
 * bench needs (Bun's process.hrtime counts from process start, so it is not).
 */
const ORIGIN_US = performance.timeOrigin * 1000;
export function nowUs(): number {
  return ORIGIN_US + performance.now() * 1000;
}

/** Reads and bytes received by all connections of this process (reads per frame shows batching). */
export const READS = { reads: 0, bytes: 0 };

export type TextHandler = (conn: Conn, bytes: Uint8Array, start: number, end: number, nowUs: number) => void;

/** One client connection; `id` and `user` are free for the owner. */
export class Conn {
  socket: Socket<Conn> | null = null;
  /** 0 upgrading, 1 open, 2 closed, 3 closing (close frame seen) */
  state = 0;
  closeCode = 0;
  error: string | null = null;
  /** incoming bytes not yet parsed (a partial frame or header) */
  private acc: Uint8Array | null = null;
  private accLen = 0;
  private fragments: Uint8Array[] | null = null;
  /** outgoing bytes not yet written */
  private out = new Uint8Array(256);
  private outLen = 0;
  private key = "";
  private maskSeed = (Math.random() * 0xffffffff) >>> 0;
  private upgraded: PromiseWithResolvers<void> | null = null;
  readonly closed = Promise.withResolvers<void>();
  onText: TextHandler = () => {};
  /** the upgrade's path: the chat's socket, or Socket.IO's (bench/cluster.ts) */
  path = "/chat";
  /** per-owner state */
  inFlight = 0;
  sent = 0;
  got: Int32Array | null = null;

  constructor(
    readonly id: number,
    readonly cookie: string,
  ) {}

  /** Connects and upgrades; resolves when the 101 arrived (frames may follow in the same read). */
  async connect(host: string, port: number): Promise<void> {
    this.upgraded = Promise.withResolvers<void>();
    const key = Buffer.from(crypto.getRandomValues(new Uint8Array(16))).toString("base64");
    this.key = key;
    try {
      await Bun.connect<Conn>({ hostname: host, port, data: this, socket: HANDLERS });
    } catch (error) {
      this.fail(`connect: ${error}`);
    }
    if (this.state === 0 && this.socket) {
      this.socket.write(
        `GET ${this.path} HTTP/1.1\r\nHost: ${host}:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
          `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\nCookie: ${this.cookie}\r\n\r\n`,
      );
    }
    return this.upgraded.promise;
  }

  /** Queues a text frame; `flush()` writes (the data handler flushes after each read). */
  queueText(text: string) {
    const payload = encoder.encode(text);
    this.queueUtf8(payload, payload.length);
  }

  /** Queues a text frame from UTF-8 bytes (the first `n` of `payload`), masked as a client must. */
  queueUtf8(payload: Uint8Array, n: number) {
    this.reserve(10 + 4 + n);
    const o = this.out;
    let p = this.outLen;
    o[p++] = 0x81;
    if (n < 126) o[p++] = 0x80 | n;
    else if (n < 65536) {
      o[p++] = 0x80 | 126;
      o[p++] = n >>> 8;
      o[p++] = n & 255;
    } else {
      o[p++] = 0x80 | 127;
      for (let i = 7; i >= 0; i--) o[p++] = i >= 4 ? 0 : (n >>> (i * 8)) & 255;
    }
    this.queueMasked(p, payload, n);
  }

  private queueMasked(p: number, payload: Uint8Array, n: number) {
    // xorshift32: a fresh mask per frame, cheap
    let x = this.maskSeed;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.maskSeed = x >>> 0;
    const o = this.out;
    const m0 = x & 255, m1 = (x >>> 8) & 255, m2 = (x >>> 16) & 255, m3 = (x >>> 24) & 255;
    o[p] = m0;
    o[p + 1] = m1;
    o[p + 2] = m2;
    o[p + 3] = m3;
    p += 4;
    let i = 0;
    for (; i + 4 <= n; i += 4) {
      o[p + i] = payload[i] ^ m0;
      o[p + i + 1] = payload[i + 1] ^ m1;
      o[p + i + 2] = payload[i + 2] ^ m2;
      o[p + i + 3] = payload[i + 3] ^ m3;
    }
    for (; i < n; i++) o[p + i] = payload[i] ^ ((x >>> ((i & 3) * 8)) & 255);
    this.outLen = p + n;
  }

  private queueControl(opcode: number, payload: Uint8Array) {
    this.reserve(2 + 4 + payload.length);
    this.out[this.outLen] = 0x80 | opcode;
    this.out[this.outLen + 1] = 0x80 | payload.length;
    this.queueMasked(this.outLen + 2, payload, payload.length);
  }

  sendText(text: string) {
    this.queueText(text);
    this.flush();
  }

  private reserve(n: number) {
    if (this.outLen + n <= this.out.length) return;
    const bigger = new Uint8Array(Math.max(this.out.length * 2, this.outLen + n));
    bigger.set(this.out.subarray(0, this.outLen));
    this.out = bigger;
  }

  /** Writes queued bytes; what the kernel does not take waits for `drain`. */
  flush() {
    if (this.outLen === 0 || !this.socket || this.state === 2) return;
    const written = this.socket.write(this.out, 0, this.outLen);
    if (written < 0) return;
    if (written < this.outLen) this.out.copyWithin(0, written, this.outLen);
    this.outLen -= written;
  }

  /** Sends a close frame and ends the socket. */
  close(code = 1000) {
    if (this.state === 2 || !this.socket) return this.closed.promise;
    if (this.state === 1) {
      this.queueControl(8, new Uint8Array([code >>> 8, code & 255]));
      this.flush();
    }
    this.socket.end();
    return this.closed.promise;
  }

  fail(message: string) {
    this.error ??= message;
    this.upgraded?.reject(new Error(message));
    this.socket?.terminate();
    this.markClosed();
  }

  markClosed() {
    if (this.state === 2) return;
    this.state = 2;
    this.upgraded?.reject(new Error(this.error ?? "closed before the upgrade"));
    this.closed.resolve();
  }

  /** Appends a read to the pending bytes and parses everything complete. */
  receive(chunk: Uint8Array) {
    READS.reads++;
    READS.bytes += chunk.length;
    let bytes = chunk;
    let len = chunk.length;
    if (this.accLen > 0) {
      const need = this.accLen + len;
      if (this.acc!.length < need) {
        const bigger = new Uint8Array(Math.max(need, this.acc!.length * 2));
        bigger.set(this.acc!.subarray(0, this.accLen));
        this.acc = bigger;
      }
      this.acc!.set(chunk, this.accLen);
      bytes = this.acc!;
      len = need;
    }
    let pos = 0;
    if (this.state === 0) {
      pos = this.parseUpgrade(bytes, len);
      if (pos < 0) return this.keep(bytes, 0, len);
    }
    const now = nowUs();
    while (pos + 2 <= len && this.state === 1) {
      const b0 = bytes[pos];
      const b1 = bytes[pos + 1];
      let n = b1 & 127;
      let header = 2;
      if (n === 126) {
        if (pos + 4 > len) break;
        n = (bytes[pos + 2] << 8) | bytes[pos + 3];
        header = 4;
      } else if (n === 127) {
        if (pos + 10 > len) break;
        n = bytes[pos + 6] * 0x1000000 + ((bytes[pos + 7] << 16) | (bytes[pos + 8] << 8) | bytes[pos + 9]);
        header = 10;
      }
      if (b1 & 0x80) return this.fail("server sent a masked frame");
      const start = pos + header;
      const end = start + n;
      if (end > len) break;
      pos = end;
      const opcode = b0 & 15;
      if (opcode === 1 && b0 & 0x80) this.onText(this, bytes, start, end, now);
      else this.control(b0, opcode, bytes, start, end, now);
    }
    this.keep(bytes, pos, len);
    this.flush();
  }

  private keep(bytes: Uint8Array, pos: number, len: number) {
    const rest = len - pos;
    if (rest === 0) {
      this.accLen = 0;
      return;
    }
    if (bytes === this.acc) {
      if (pos > 0) this.acc.copyWithin(0, pos, len);
    } else {
      if (!this.acc || this.acc.length < rest) this.acc = new Uint8Array(Math.max(rest * 2, 4096));
      this.acc.set(bytes.subarray(pos, len));
    }
    this.accLen = rest;
  }

  /** Non-final text, continuation, binary, close, ping, pong. */
  private control(b0: number, opcode: number, bytes: Uint8Array, start: number, end: number, now: number) {
    const fin = (b0 & 0x80) !== 0;
    switch (opcode) {
      case 0:
      case 1: {
        if (opcode === 1) this.fragments = [];
        if (!this.fragments) return this.fail("continuation frame without a start");
        this.fragments.push(bytes.slice(start, end));
        if (!fin) return;
        const whole = Buffer.concat(this.fragments);
        this.fragments = null;
        return this.onText(this, whole, 0, whole.length, now);
      }
      case 2:
        return this.fail("server sent a binary frame");
      case 8:
        this.closeCode = end - start >= 2 ? (bytes[start] << 8) | bytes[start + 1] : 1005;
        if (this.state === 1) this.queueControl(8, bytes.slice(start, Math.min(end, start + 2)));
        this.flush();
        this.state = 3; // stop parsing; the socket's close event follows
        this.socket?.end();
        return;
      case 9:
        return this.queueControl(10, bytes.slice(start, end));
      case 10:
        return;
      default:
        return this.fail(`unknown opcode ${opcode}`);
    }
  }

  /** Parses the 101 response; returns the offset after it, or -1 while incomplete. */
  private parseUpgrade(bytes: Uint8Array, len: number): number {
    let headerEnd = -1;
    for (let i = 3; i < len; i++) {
      if (bytes[i] === 10 && bytes[i - 1] === 13 && bytes[i - 2] === 10 && bytes[i - 3] === 13) {
        headerEnd = i + 1;
        break;
      }
    }
    if (headerEnd < 0) {
      if (len > 16384) this.fail("upgrade response headers too long");
      return -1;
    }
    const head = decoder.decode(bytes.subarray(0, headerEnd));
    const status = /^HTTP\/1\.1 (\d{3})/.exec(head)?.[1];
    if (status !== "101") {
      this.fail(`upgrade answered ${status ?? "garbage"}: ${decoder.decode(bytes.subarray(headerEnd, Math.min(len, headerEnd + 200)))}`);
      return -1;
    }
    const accept = /\r\nsec-websocket-accept:\s*(\S+)/i.exec(head)?.[1];
    const expected = new Bun.CryptoHasher("sha1").update(this.key + GUID).digest("base64");
    if (accept !== expected) {
      this.fail("bad Sec-WebSocket-Accept");
      return -1;
    }
    this.state = 1;
    this.upgraded!.resolve();
    return headerEnd;
  }
}

const HANDLERS = {
  binaryType: "uint8array" as const,
  open(socket: Socket<Conn>) {
    socket.setNoDelay(true); // small frames go out at once, as browsers' sockets do
    socket.data.socket = socket;
  },
  data(socket: Socket<Conn>, chunk: Uint8Array) {
    socket.data.receive(chunk);
  },
  drain(socket: Socket<Conn>) {
    socket.data.flush();
  },
  close(socket: Socket<Conn>) {
    socket.data.markClosed();
  },
  end(socket: Socket<Conn>) {
    socket.end();
  },
  error(socket: Socket<Conn>, error: Error) {
    socket.data.fail(String(error));
  },
  connectError(socket: Socket<Conn>, error: Error) {
    socket.data.fail(`connect: ${error}`);
  },
};
