#!/usr/bin/env python3
"""Read the serial log of a ci/xen/run boot; print the test lines; write the JSON results.

usage: results.py LOG OUT.json BOOT_SECONDS QEMU_RC BINARY_NAME...
Exit status 1 if a test failed, XVM-DONE is missing (crash or timeout), no test
ran, or a binary reported no test case.

Block bench rows (`"bench":"block"`) of our implementation (`"impl":"ours"`)
get two ratios to vm-memory 0.18 `xen` (the vm-memory-peer binary), stored in the row:
  ratio_requests_per_s  ours' speed-up. From interleaved rounds when the row has
                        them (xen-dom0-tests' bench drives `vm-memory-peer serve`,
                        one peer round next to each of ours, A B B A ...): the
                        median of the per-round ratios (peer ns/request over ours),
                        with ratio_min / ratio_max, the spread, in the row too.
                        Otherwise ours.requests_per_s over the peer's own run
                        (`"impl":"vm-memory-xen"`) at the same batch.
  ratio_syscalls        peer syscalls/request over ours (exact counts on both
                        sides); null when ours makes 0 syscalls per request (e.g.
                        "premapped"), since the ratio is infinite and JSON has no
                        infinity.
Both are null when no peer figure exists (or its rate is 0).
A markdown table of every block row and its ratios closes the output, then one of the
lazy FOREIGN rows (`"bench":"lazy-foreign"`): eager against lazy mapping of a 1 GiB FOREIGN
region, ratios lazy over eager (median and min-max of interleaved rounds).
"""
import json
import re
import sys

log, out, boot_seconds, qemu_rc, names = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
TEST = re.compile(r"XVM-TEST (\S+) (PASS|FAIL)(?: (.*))?$")
tests, bench, done = [], [], False
with open(log, encoding="utf-8", errors="replace") as f:
    for line in f:
        line = line.rstrip("\r\n").replace("\r", "")
        if m := TEST.search(line):
            tests.append({"name": m[1], "status": m[2], "detail": m[3] or ""})
        elif (i := line.find("XVM-JSON ")) >= 0:
            try:
                bench.append(json.loads(line[i + 9:]))
            except ValueError as e:  # e.g. a kernel message cut into the line
                tests.append({"name": "harness/xvm-json", "status": "FAIL", "detail": f"{e}: {line[i:]}"})
        elif re.search(r"XVM-DONE\b", line):
            done = True

# Harness-level checks, reported like tests.
if not done:
    tests.append({"name": "harness/xvm-done", "status": "FAIL",
                  "detail": f"XVM-DONE not seen: dom0 or Xen crashed, or timed out (qemu exit {qemu_rc})"})
for n in names:
    if not any(t["name"].startswith(n + "/") for t in tests):
        tests.append({"name": f"{n}/no-cases", "status": "FAIL", "detail": "binary printed no XVM-TEST line"})


def lazy_table(bench):
    """Markdown table of the lazy FOREIGN rows (xen-dom0-tests' lazy_foreign.rs): eager against lazy."""
    rows = {b.get("row"): b for b in bench if b.get("bench") == "lazy-foreign"}
    if not rows:
        return ""
    out = ["| lazy FOREIGN, 1 GiB of the domU's frames | eager | lazy | lazy ÷ eager: median (min-max) "
           "| goal | device syscalls eager / lazy |",
           "|---|---:|---:|---:|---:|---:|"]
    spread = lambda b, f: f"{b['ratio_median']:{f}} ({b['ratio_min']:{f}}-{b['ratio_max']:{f}})"  # noqa: E731
    goal = lambda b, s: f"{s} {'met' if b.get('goal_met') else 'NOT met'}"  # noqa: E731
    if c := rows.get("create"):
        out.append(f"| SET_MEM_TABLE: region creation, ms ({c['rounds']} interleaved rounds) | {c['eager_ms']:.1f} "
                   f"| {c['lazy_ms']:.3f} | {spread(c, '.6f')} | {goal(c, '<= 0.02')} "
                   f"| {c['eager_syscalls']} / {c['lazy_syscalls']} |")
        out.append(f"| region teardown, ms | {c['eager_drop_ms']:.1f} | {c['lazy_drop_ms']:.3f} | - | - "
                   f"| {c['eager_drop_syscalls']} / {c['lazy_drop_syscalls']} |")
    if m := rows.get("set-mem-table"):
        out.append(f"| SET_MEM_TABLE through the protocol (blk daemon, REPLY_ACK), ms ({m['rounds']} interleaved rounds) "
                   f"| {m['eager_ms']:.1f} | {m['lazy_ms']:.3f} | {spread(m, '.6f')} | {goal(m, '<= 0.02')} "
                   f"| {m['eager_syscalls']} / {m['lazy_syscalls']} |")
    if d := rows.get("teardown-touched"):
        out.append(f"| region teardown after every bucket was touched, ms (one each) | {d['eager_ms']:.1f} "
                   f"| {d['lazy_ms']:.1f} | - | - | {d['eager_syscalls']} / {d['lazy_syscalls']} |")
    if t := rows.get("first-touch"):
        out.append(f"| first touch of a {t['bucket_kib'] // 1024} MiB bucket, us: median ({t['us_min']:.0f}-{t['us_max']:.0f}); "
                   f"all {t['buckets']} in {t['all_buckets_ms']:.0f} ms | - | {t['us_median']:.0f} | - | - "
                   f"| - / {t['syscalls_per_touch']:g} |")
    for key, what in [("warm-4k", "warm request: 4 KiB read + 4 KiB write"),
                      ("warm-4k-bounded", "same, lazy on a handle with a bound (scopes hold the buckets they touch)"),
                      ("warm-read-obj", "warm request: one 8-byte read_obj"),
                      ("warm-scope-only", "warm request: scope opened and finished, no access")]:
        if w := rows.get(key):
            out.append(f"| {what}, requests/s ({w['rounds']} interleaved rounds x {w['requests_per_round']}) "
                       f"| {w['eager_requests_per_s']:.0f} | {w['lazy_requests_per_s']:.0f} "
                       f"| {spread(w, '.3f')} (time) | {goal(w, '<= 1.1') if key.startswith('warm-4k') else '- (parts of a request)'} "
                       f"| {w['eager_syscalls_per_request']} / {w['lazy_syscalls_per_request']} |")
    return "\n".join(out)


def hvm_table(bench):
    """Markdown tables of the HVM stage (ci/xen/hvm): rng ours against vhost-device-rng (interleaved
    rounds, median and min-max of per-round ratios), Xen system calls per request of each daemon,
    the frontend's cost per request, and blk at QD1 and QD32."""
    rng = [b for b in bench if b.get("bench") == "hvm-rng"]
    alone = [b["bytes_per_sec"] for b in bench if b.get("bench") == "hvm-rng-ours-alone"]
    if not rng and not alone and not any(b.get("bench") == "hvm-blk" for b in bench):
        return ""
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    by_round = {}
    for b in rng:
        by_round.setdefault(b["round"], {})[b["impl"]] = b["bytes_per_sec"]
    ratios = [r["ours"] / r["vhost-device-rng"] for r in by_round.values()
              if r.get("ours") and r.get("vhost-device-rng")]
    ours = [b["bytes_per_sec"] for b in rng if b["impl"] == "ours"]
    peer = [b["bytes_per_sec"] for b in rng if b["impl"] == "vhost-device-rng"]
    out = ["| HVM domU, Linux virtio-rng (64-byte requests) | ours | vhost-device-rng | ours ÷ peer: median (min-max) |",
           "|---|---:|---:|---:|"]
    if alone:
        out.append(f"| /dev/hwrng bytes/s, ours alone ({len(alone)} rounds of 8 KiB) | {med(alone):.0f} | - | - |")
    if ratios:
        out.append(f"| /dev/hwrng bytes/s ({len(ratios)} interleaved rounds of 8 KiB) | {med(ours):.0f} | {med(peer):.0f} "
                   f"| {med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    count = next((b for b in bench if b.get("bench") == "hvm-rng-count"), None)
    sysc = {b["impl"]: b for b in bench if b.get("bench") == "hvm-rng-syscalls"}
    if count and sysc:
        before, after = count["frontend_before"]["devices"], count["frontend_after"]["devices"]
        reqs = [a["kicks"] - b["kicks"] for a, b in zip(after, before)]
        per = {impl: (sysc[impl]["xen_syscalls"] / reqs[i] if i < len(reqs) and reqs[i] else None)
               for i, impl in enumerate(["ours", "peer"]) if impl in sysc}
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        reqs = reqs + [0] * (2 - len(reqs))
        out.append(f"| Xen system calls (ioctl, mmap, munmap) per request, counted window ({reqs[0]} / {reqs[1]} requests) "
                   f"| {fmt(per.get('ours'))} | {fmt(per.get('peer'))} | "
                   f"{fmt(per['ours'] / per['peer']) if per.get('ours') is not None and per.get('peer') else '-'} |")
        traps = [(a["reads"] + a["writes"]) - (b["reads"] + b["writes"]) for a, b in zip(after, before)] + [0, 0]
        out.append(f"| frontend: trapped accesses per request (counted window) | {traps[0] / max(reqs[0], 1):.2f} "
                   f"| {traps[1] / max(reqs[1], 1):.2f} | - |")
    out.append("")
    blk = [b for b in bench if b.get("bench") == "hvm-blk"]
    if blk:
        out += ["| HVM domU, Linux virtio-blk, 4 KiB O_DIRECT | memory | IOPS: median (min-max) | p50 us | p99 us |",
                "|---|---|---:|---:|---:|"]
        keys = sorted({(b["mode"], b["qd"], b["memory"]) for b in blk}, key=lambda k: (k[1], k[0], k[2]))
        for mode, qd, mem in keys:
            rows = [b for b in blk if (b["mode"], b["qd"], b["memory"]) == (mode, qd, mem)]
            iops = [b["iops"] for b in rows]
            out.append(f"| {mode} QD{qd} ({len(rows)} runs) | {mem} | {med(iops):.0f} ({min(iops):.0f}-{max(iops):.0f}) "
                       f"| {med([b['p50_us'] for b in rows]):.0f} | {med([b['p99_us'] for b in rows]):.0f} |")
    fe = next((b for b in bench if b.get("bench") == "hvm-frontend"), None)
    if fe and fe.get("stats"):
        st = fe["stats"]
        out.append("")
        out.append(f"Frontend, whole first domU: {st['ioreqs']} ioreqs, {st['irq_dm_ops']} interrupt DM_OPs, "
                   f"asserts per IRQ {st['irq_asserts']}, per window (rng, rng peer, blk): "
                   + "; ".join(f"{d['reads']} reads {d['writes']} writes {d['kicks']} kicks {d['calls']} calls"
                               for d in st["devices"]))
    return "\n".join(out)


def add_ratios(bench):
    """Store ratio_requests_per_s and ratio_syscalls in each block row of ours (see above)."""
    peer = {b.get("batch"): b for b in bench
            if b.get("bench") == "block" and b.get("impl") == "vm-memory-xen"}
    for b in bench:
        if b.get("bench") != "block" or b.get("impl") != "ours":
            continue
        rps, spr = b.get("requests_per_s"), b.get("syscalls_per_request")
        if b.get("ratio_median") is not None:  # interleaved rounds
            b["ratio_requests_per_s"] = b["ratio_median"]
            pspr = b.get("peer_syscalls_per_request")
        else:
            p = peer.get(b.get("batch"))
            b["ratio_requests_per_s"] = (round(rps / p["requests_per_s"], 3)
                                         if p and rps is not None and p.get("requests_per_s") else None)
            pspr = p.get("syscalls_per_request") if p else None
        b["ratio_syscalls"] = round(pspr / spr, 3) if spr and pspr is not None else None


def block_table(bench):
    """Markdown table of the block rows: ours (with ratios to vm-memory-xen) and the peer's own run."""
    rows = [b for b in bench if b.get("bench") == "block"]
    if not rows:
        return ""
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    out = ["| impl | strategy | batch | requests/s | syscalls/request | vm-memory requests/s, same rounds "
           "| vm-memory syscalls/request | x requests/s vs vm-memory: median (min-max) | x fewer syscalls vs vm-memory |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    key = lambda b: (b.get("impl") != "vm-memory-xen", b.get("batch") or 0)  # noqa: E731
    for b in sorted(rows, key=key):  # stable: ours in the order measured
        if b.get("impl") == "vm-memory-xen":
            out.append(f"| vm-memory-xen (own run) | - | {b.get('batch')} | {fmt(b.get('requests_per_s'), '.0f')} "
                       f"| {fmt(b.get('syscalls_per_request'), '.3g')} | - | - | 1 | 1 |")
            continue
        r_rps = fmt(b.get("ratio_requests_per_s"), ".2f")
        if b.get("ratio_min") is not None:
            r_rps += f" ({b['ratio_min']:.2f}-{b['ratio_max']:.2f})"
        r_sys = ("inf (0 syscalls)" if b.get("syscalls_per_request") == 0 and b.get("ratio_syscalls") is None
                 and (b.get("peer_syscalls_per_request") is not None
                      or any(p.get("impl") == "vm-memory-xen" and p.get("batch") == b.get("batch") for p in rows))
                 else fmt(b.get("ratio_syscalls"), ".1f"))
        out.append(f"| {b.get('impl')} | {b.get('strategy')} | {b.get('batch')} | {fmt(b.get('requests_per_s'), '.0f')} "
                   f"| {fmt(b.get('syscalls_per_request'), '.3g')} | {fmt(b.get('peer_requests_per_s'), '.0f')} "
                   f"| {fmt(b.get('peer_syscalls_per_request'), '.3g')} | {r_rps} | {r_sys} |")
    return "\n".join(out)


add_ratios(bench)
for t in tests:
    print(f"XVM-TEST {t['name']} {t['status']} {t['detail']}".rstrip())
for b in bench:
    print("XVM-JSON " + json.dumps(b))
with open(out, "w") as f:
    json.dump({"tests": tests, "bench": bench, "boot_seconds": round(boot_seconds, 1)}, f, indent=1)
failed = sum(t["status"] == "FAIL" for t in tests)
passed = len(tests) - failed
if table := block_table(bench):
    print("\n" + table + "\n")
if table := lazy_table(bench):
    print(table + "\n")
if table := hvm_table(bench):
    print(table + "\n")
print(f"xen: {passed} passed, {failed} failed")
# The failures again, last: CI shows the end of a failed run's output.
for t in tests:
    if t["status"] == "FAIL":
        print(f"FAILED: {t['name']}: {t['detail']}"[:2000])
sys.exit(1 if failed or not passed else 0)
