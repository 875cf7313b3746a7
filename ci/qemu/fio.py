#!/usr/bin/env python3
"""ci/qemu/run fio's helpers. Side A is FIO_PAIR's first backend, B its second; ratios are A/B
per round, then median and min-max over rounds.

  fio.py libs  ROOT BIN DEST            copy BIN's shared libraries (NEEDED, recursively, found
                                        under ROOT) into DEST; exit 1 naming any not found
  fio.py watch IMG SECTOR PID OUT       append "time cpu_ticks marker" to OUT whenever the
                                        guest's marker sector in IMG changes (PID's utime+stime);
                                        a row's CPU is from its start marker to its end marker,
                                        cpu_busy that CPU over the window's wall time (cores)
  fio.py collect RES R LOG SIDE BE SAMPLES [SIDE BE SAMPLES]
                                        one JSON line per row and side of that boot into RES
  fio.py round RES R A B                the ratios of round R
  fio.py table RES N A B                the final markdown table
  fio.py json  RES N A B META           the same as JSON (META: a JSON object merged in)
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

TCK = os.sysconf("SC_CLK_TCK")


def inside(root, path):
    """path's target with links resolved inside root (a package's absolute links point at /)."""
    for _ in range(40):
        if not os.path.islink(path):
            return path
        t = os.readlink(path)
        path = os.path.join(root, t.lstrip("/")) if t.startswith("/") else os.path.join(os.path.dirname(path), t)
    return path


def libs(root, binary, dest):
    index = {}
    for dp, _, files in os.walk(root):
        for f in files:
            if ".so" in f:
                index.setdefault(f, os.path.join(dp, f))
    seen, missing, todo = set(), set(), [binary]
    while todo:
        out = subprocess.run(["readelf", "-d", todo.pop()], capture_output=True, text=True, check=True).stdout
        for name in re.findall(r"\(NEEDED\).*\[(.*)\]", out):
            if name in seen or name in missing:
                continue
            if name not in index:
                missing.add(name)
                continue
            seen.add(name)
            real = inside(root, index[name])
            shutil.copy(real, os.path.join(dest, name))
            todo.append(real)
    if missing:
        print("not in the unpacked packages: " + " ".join(sorted(missing)), file=sys.stderr)
        sys.exit(1)
    print(len(seen))


def ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime: the whole process, all threads


def watch(img, sector, pid, out):
    # 20 ms polling of one sector: cheap, and much closer in time than the serial console.
    fd = os.open(img, os.O_RDONLY)
    last = os.pread(fd, 512, sector * 512)
    with open(out, "a") as o:
        while os.path.exists(f"/proc/{pid}"):
            cur = os.pread(fd, 512, sector * 512)
            if cur != last and cur.startswith(b"QTFIO "):
                try:
                    t = ticks(pid)
                except (OSError, IndexError):
                    break
                text = cur.split(b"\0", 1)[0].decode(errors="replace").strip()
                o.write(f"{time.time():.3f} {t} {text}\n")
                o.flush()
                last = cur
            time.sleep(0.02)


def collect(res, rnd, logf, *sides):
    n = 0
    for i in range(0, len(sides), 3):
        n += collect_side(res, rnd, logf, *sides[i:i + 3])
    print(n)


def collect_side(res, rnd, logf, side, be, samples):
    fio, stat, engine = {}, {}, None
    for line in open(logf, errors="replace"):
        m = re.match(r"QT: FIO (\S+) (\S+) (\{.*)", line)
        if m and m.group(1) == side:
            fio[m.group(2)] = m.group(3)
        m = re.match(r"QT: FIOSTAT (\S+) (\S+) rc=(\d+) sectors=(\d+)", line)
        if m and m.group(1) == side:
            stat[m.group(2)] = (int(m.group(3)), int(m.group(4)))
        m = re.match(r"QT: fio .*engine=(\S+)", line)
        if m:
            engine = m.group(1)
    marks = []  # (ticks, what, row, time)
    if os.path.exists(samples):
        for line in open(samples):
            f = line.split()
            if len(f) == 6:  # time ticks QTFIO seq start|end row
                marks.append((int(f[1]), f[4], f[5], float(f[0])))
    n = 0
    with open(res, "a") as o:
        for row, text in fio.items():
            rc, sectors = stat.get(row, (1, 0))
            try:
                job = json.loads(text)["jobs"][0]
            except (ValueError, KeyError, IndexError):
                continue
            if rc != 0:
                continue
            d = job["write"] if "write" in row.split("-")[1] else job["read"]
            pct = d["clat_ns"].get("percentile", {})
            # CPU: from the sample at this row's start marker to its end marker (or the next
            # row's start, should the watcher have missed the end).
            cpu = busy = None
            for i, (t, what, r, when) in enumerate(marks):
                if what == "start" and r == row:
                    nxt = next((m for m in marks[i + 1:]), None)
                    if nxt:
                        cpu = (nxt[0] - t) / TCK
                        busy = cpu / (nxt[3] - when) if nxt[3] > when else None
                    break
            rec = {"round": rnd, "side": side, "backend": be, "row": row, "engine": engine,
                   "iops": d["iops"], "bw_bytes": d["bw_bytes"],
                   "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
                   "bytes": sectors * 512, "cpu_s": cpu, "cpu_busy": busy,
                   "cpu_s_per_gib": cpu / (sectors * 512 / 2**30) if cpu is not None and sectors else None}
            o.write(json.dumps(rec) + "\n")
            n += 1
    return n


ROWS = [f"qd{q}-{rw}" for q in (1, 32) for rw in ("randread-4k", "randwrite-4k", "read-128k", "write-128k")]


def load(res):
    data = {}
    for line in open(res):
        r = json.loads(line)
        data[(r["round"], r["side"], r["row"])] = r
    return data


def rows(data):
    seen = {k[2] for k in data}
    return [r for r in ROWS if r in seen] + sorted(seen - set(ROWS))


def spread(v, nd=1):
    v = [x for x in v if x is not None]
    if not v:
        return None
    return {"median": round(statistics.median(v), nd), "min": round(min(v), nd), "max": round(max(v), nd)}


def summary(data, n):
    out = []
    for row in rows(data):
        s = {"row": row}
        for side in "AB":
            v = [data[(r, side, row)] for r in range(1, n + 1) if (r, side, row) in data]
            s[side] = {"runs": len(v), "iops": spread([x["iops"] for x in v]),
                       "mibs": spread([x["bw_bytes"] / 2**20 for x in v], 2),
                       "p50_us": spread([x["p50_us"] for x in v]), "p99_us": spread([x["p99_us"] for x in v]),
                       "cpu_s_per_gib": spread([x["cpu_s_per_gib"] for x in v], 2),
                       "cpu_busy": spread([x.get("cpu_busy") for x in v], 3),
                       "engine": sorted({x["engine"] for x in v if x["engine"]})}
        ratios = [data[(r, "A", row)]["iops"] / data[(r, "B", row)]["iops"] for r in range(1, n + 1)
                  if (r, "A", row) in data and (r, "B", row) in data and data[(r, "B", row)]["iops"] > 0]
        s["ratio"] = ratios and dict(spread(ratios, 3), per_round=[round(x, 3) for x in ratios]) or None
        out.append(s)
    return out


def fmt(x, nd=0):
    return "-" if x is None else f"{x['median']:.{nd}f} ({x['min']:.{nd}f}-{x['max']:.{nd}f})"


def med(x, nd=0):
    return "-" if x is None else f"{x['median']:.{nd}f}"


def main():
    cmd = sys.argv[1]
    if cmd == "libs":
        return libs(*sys.argv[2:5])
    if cmd == "watch":
        return watch(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    if cmd == "collect":
        return collect(sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
    res = sys.argv[2]
    data = load(res)
    if cmd == "round":
        r, a, b = int(sys.argv[3]), sys.argv[4], sys.argv[5]
        parts = []
        for row in rows(data):
            if (r, "A", row) in data and (r, "B", row) in data and data[(r, "B", row)]["iops"]:
                parts.append(f"{row}={data[(r, 'A', row)]['iops'] / data[(r, 'B', row)]['iops']:.2f}")
        print(f"fio round {r}: {a}/{b} IOPS " + " ".join(parts))
        return
    n, a, b = int(sys.argv[3]), sys.argv[4], sys.argv[5]
    s = summary(data, n)
    if cmd == "table":
        print(f"\n{n} round(s), order alternated; median (min-max) over rounds; "
              f"{a}/{b} = per-round IOPS ratio; p50/p99 = fio clat in us; CPU = daemon s per GiB moved\n")
        print(f"| row | {a} IOPS | {b} IOPS | {a}/{b} | {a} p50/p99 us | {b} p50/p99 us | {a} CPU s/GiB | {b} CPU s/GiB |")
        print("|---|---|---|---|---|---|---|---|")
        for x in s:
            A, B = x["A"], x["B"]
            print(f"| {x['row']} | {fmt(A['iops'])} | {fmt(B['iops'])} | {fmt(x['ratio'], 2)} "
                  f"| {med(A['p50_us'])}/{med(A['p99_us'])} | {med(B['p50_us'])}/{med(B['p99_us'])} "
                  f"| {med(A['cpu_s_per_gib'], 2)} | {med(B['cpu_s_per_gib'], 2)} |")
    else:
        meta = json.loads(sys.argv[6])
        print(json.dumps(dict(meta, rounds=n, a=a, b=b, rows=s), indent=1))


if __name__ == "__main__":
    main()
