#!/usr/bin/env python3
"""Writes the daemon target's seed inputs (see fuzz_targets/daemon.rs for the format)."""
import struct, os
d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "daemon")
V1, NR = 1, 5  # hflags: version 1; version 1 + NEED_REPLY
MEMFD1, EVENTFD = 0x11, 0x05
def rec(code, body=b"", h=V1, fds=0):
    return struct.pack("<BBBH", code, h, fds, len(body)) + body
u64 = lambda v: struct.pack("<Q", v)
GPA, SIZE, UADDR = 0x100000, 1 << 20, 0x7000_0000_0000
region = struct.pack("<QQQQ", GPA, SIZE, UADDR, 0)
proto = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15)
nego = rec(3) + rec(1) + rec(2, u64((1 << 32) | (1 << 30))) + rec(15) + rec(16, u64(proto), NR)
def ring(q, fds=True):
    desc, avail, used = UADDR + 0x1000 * (q + 1), UADDR + 0x1000 * (q + 1) + 0x100, UADDR + 0x1000 * (q + 1) + 0x200
    r = rec(8, struct.pack("<II", q, 16), NR) + rec(9, struct.pack("<IIQQQQ", q, 0, desc, used, avail, 0), NR)
    r += rec(10, struct.pack("<II", q, 0), NR)
    if fds:
        r += rec(12, u64(q), NR, EVENTFD) + rec(13, u64(q), NR, EVENTFD)
    return r + rec(18, struct.pack("<II", q, 1), NR)
seeds = {
    "negotiate": nego,
    "mem_table_rings": nego + rec(5, struct.pack("<II", 1, 0) + region, NR, MEMFD1) + ring(0) + ring(1),
    "hotplug": nego + rec(37, u64(0) + region, NR, MEMFD1) + ring(0) + rec(38, u64(0) + region, NR, MEMFD1)
               + rec(37, u64(0) + region, NR, MEMFD1),
    "config_and_junk": nego + rec(24, struct.pack("<III", 0, 60, 0) + bytes(60), NR) + rec(99, b"\xff" * 8, NR)
                       + rec(5, struct.pack("<II", 9, 0) + region, NR, MEMFD1),
}
for name, b in seeds.items():
    open(os.path.join(d, name), "wb").write(b)
