#!/usr/bin/env python3
"""The host's side of the vsock lab (ci/qemu/vsock/run): host programs on the daemon's
Unix sockets, in vhost-device-vsock's hybrid conventions.

  host.py serve UDS               listeners for guest connections: UDS_6000 and UDS_6001 answer
                                  crc32+length of each stream, UDS_6002 echoes (ping-pong)
  host.py conc UDS N BYTES        N connections to guest port 5000 at once (CONNECT 5000), BYTES
                                  each, every answer checked
  host.py put UDS BYTES CHUNK     one stream of BYTES to guest port 5000 in CHUNK writes; MiB/s
  host.py go UDS PORT [SECS]      connect to guest port PORT (the guest's "go"), retrying

Streams: an 8-byte length, then the pattern of vtool.c (64 KiB block from the seed, block
index mixed into its first 4 bytes), checked with zlib's CRC-32; no half-close (vhost-device-
vsock 0.3.0 ends a connection whose host side shuts down writing). Lines for the log start
with "HOST: ".
"""
import os
import socket
import struct
import sys
import threading
import time
import zlib


def block(seed):
    x = (seed * 2654435761 + 1) & 0xFFFFFFFF
    out = bytearray(65536)
    for i in range(65536):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x & 0xFF
    return bytes(out)


def chunks(seed, total, chunk):
    """The stream's bytes in pieces of `chunk` (a multiple of 64 KiB, or smaller than it)."""
    b = block(seed)
    off = 0
    while off < total:
        n = min(chunk, total - off)
        piece = bytearray()
        while len(piece) < n:
            i = off + len(piece)
            bi, j = i >> 16, i & 0xFFFF
            seg = bytearray(b[j:j + min(65536 - j, n - len(piece))])
            for k in range(max(0, 4 - j)):
                if k < len(seg):
                    seg[k] ^= (bi >> (8 * (j + k))) & 0xFF
            piece += seg
        yield bytes(piece)
        off += n


def connect_guest(uds, port, timeout=30):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(uds)
    s.sendall(b"CONNECT %d\n" % port)
    line = b""
    while not line.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            raise ConnectionError("closed before OK (guest refused?)")
        line += c
    if not line.startswith(b"OK "):
        raise ConnectionError("answer %r" % line)
    return s


def send_checked(s, seed, total, chunk):
    crc = 0
    s.sendall(struct.pack("<Q", total))
    for piece in chunks(seed, total, chunk):
        crc = zlib.crc32(piece, crc)
        s.sendall(piece)
    ans = b""
    while len(ans) < 8:
        c = s.recv(8 - len(ans))
        if not c:
            raise ConnectionError("no answer")
        ans += c
    got_crc, got_len = struct.unpack("<II", ans)
    return got_crc == crc and got_len == total & 0xFFFFFFFF


def recv_exact(conn, n):
    b = b""
    while len(b) < n:
        c = conn.recv(n - len(b))
        if not c:
            break
        b += c
    return b


def serve_sum(conn):
    crc, n = 0, 0
    with conn:
        hdr = recv_exact(conn, 8)
        if len(hdr) < 8:
            return
        (want,) = struct.unpack("<Q", hdr)
        while n < want:
            b = conn.recv(min(1 << 16, want - n))
            if not b:
                break
            crc = zlib.crc32(b, crc)
            n += len(b)
        conn.sendall(struct.pack("<II", crc, n & 0xFFFFFFFF))
        while conn.recv(1 << 16):  # the sender closes first
            pass


def serve_echo(conn):
    with conn:
        while True:
            b = conn.recv(4096)
            if not b:
                return
            conn.sendall(b)


def listener(path, handler):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    l.bind(path)
    # The daemon may run as another user (ours drops root for nobody): let it connect.
    os.chmod(path, 0o777)
    l.listen(256)
    while True:
        c, _ = l.accept()
        threading.Thread(target=handler, args=(c,), daemon=True).start()


def main():
    cmd, uds = sys.argv[1], sys.argv[2]
    if cmd == "serve":
        for port, h in ((6000, serve_sum), (6001, serve_sum), (6002, serve_echo)):
            threading.Thread(target=listener, args=("%s_%d" % (uds, port), h), daemon=True).start()
        while True:
            time.sleep(3600)
    elif cmd == "conc":
        n, total = int(sys.argv[3]), int(sys.argv[4])
        results = [None] * n
        socks = []
        t0 = time.monotonic()
        for i in range(n):  # all connected before any sends
            try:
                socks.append(connect_guest(uds, 5000))
            except Exception as e:  # noqa: BLE001 - reported, counted
                socks.append(None)
                results[i] = "connect: %s" % e

        def run(i):
            try:
                results[i] = send_checked(socks[i], 200 + i, total, 65536) or "mismatch"
            except Exception as e:  # noqa: BLE001
                results[i] = "io: %s" % e

        ts = [threading.Thread(target=run, args=(i,)) for i in range(n) if socks[i]]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        ok = sum(1 for r in results if r is True)
        bad = sorted(set(str(r) for r in results if r is not True))
        print("HOST: conc-h2g ok=%d/%d bytes=%d secs=%.3f %s" % (ok, n, total, time.monotonic() - t0, "; ".join(bad)))
        sys.exit(0 if ok == n else 1)
    elif cmd == "put":
        total, chunk = int(sys.argv[3]), int(sys.argv[4])
        s = connect_guest(uds, 5000)
        # Pattern generation off the clock: the stream is built first.
        data = list(chunks(7, total, chunk))
        crc = 0
        for piece in data:
            crc = zlib.crc32(piece, crc)
        t0 = time.monotonic()
        s.sendall(struct.pack("<Q", total))
        for piece in data:
            s.sendall(piece)
        ans = b""
        while len(ans) < 8:
            c = s.recv(8 - len(ans))
            if not c:
                break
            ans += c
        t = time.monotonic() - t0
        ok = len(ans) == 8 and struct.unpack("<II", ans) == (crc, total & 0xFFFFFFFF)
        print("HOST: put ok=%d bytes=%d secs=%.3f mibs=%.2f" % (ok, total, t, total / t / 1048576))
        sys.exit(0 if ok else 1)
    elif cmd == "go":
        port = int(sys.argv[3])
        limit = float(sys.argv[4]) if len(sys.argv) > 4 else 60
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            try:
                connect_guest(uds, port, timeout=5).close()
                print("HOST: go %d after %.2fs" % (port, time.monotonic() - t0))
                return
            except Exception:  # noqa: BLE001 - retried
                time.sleep(0.2)
        print("HOST: go %d FAIL within %.0fs" % (port, limit))
        sys.exit(1)


if __name__ == "__main__":
    main()
