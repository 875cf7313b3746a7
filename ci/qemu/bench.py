#!/usr/bin/env python3
"""ci/qemu/run bench's tables. Input: TSV lines "round side backend row iops mibs" (side A is
BENCH_PAIR's first backend, B its second; the ratio is A/B, per round, then median and spread).

  bench.py round TSV R A B                  the ratio of round R, one line per row
  bench.py table TSV N A B                  the final markdown table
  bench.py json  TSV N A B SECS ACCEL SMP   the same as JSON
"""
import json
import statistics
import sys

ROWS = ["seq-read-4k", "seq-write-4k", "rand-read-4k", "rand-write-4k",
        "seq-read-64k", "seq-write-64k", "rand-read-64k", "rand-write-64k"]


def load(path):
    data = {}  # (round, side, row) -> (iops, mibs)
    for line in open(path):
        f = line.split()
        if len(f) == 6:
            data[(int(f[0]), f[1], f[3])] = (float(f[4]), float(f[5]))
    return data


def rows(data):
    seen = {k[2] for k in data}
    return [r for r in ROWS if r in seen] + sorted(seen - set(ROWS))


def summary(data, n):
    out = []
    for row in rows(data):
        s = {"row": row}
        for side in "AB":
            v = [data[(r, side, row)] for r in range(1, n + 1) if (r, side, row) in data]
            iops = [x[0] for x in v]
            mibs = [x[1] for x in v]
            s[side] = {"iops_median": round(statistics.median(iops), 1), "iops_min": min(iops), "iops_max": max(iops),
                       "mibs_median": round(statistics.median(mibs), 2), "mibs_min": min(mibs), "mibs_max": max(mibs),
                       "runs": len(v)}
        ratios = [data[(r, "A", row)][0] / data[(r, "B", row)][0] for r in range(1, n + 1)
                  if (r, "A", row) in data and (r, "B", row) in data and data[(r, "B", row)][0] > 0]
        s["ratio"] = {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3),
                      "per_round": [round(x, 3) for x in ratios]}
        out.append(s)
    return out


def main():
    cmd, path = sys.argv[1], sys.argv[2]
    data = load(path)
    if cmd == "round":
        r, a, b = int(sys.argv[3]), sys.argv[4], sys.argv[5]
        print(f"round {r}: {'row':<15} {a + ' IOPS':>10} {a + ' MiB/s':>11} {b + ' IOPS':>10} {b + ' MiB/s':>11} {a + '/' + b:>9}")
        for row in rows(data):
            if (r, "A", row) in data and (r, "B", row) in data:
                (ia, ma), (ib, mb) = data[(r, "A", row)], data[(r, "B", row)]
                print(f"round {r}: {row:<15} {ia:>10.0f} {ma:>11.2f} {ib:>10.0f} {mb:>11.2f} {ia / ib if ib else 0:>9.3f}")
        return
    n, a, b = int(sys.argv[3]), sys.argv[4], sys.argv[5]
    s = summary(data, n)
    if cmd == "table":
        print(f"\n{n} round(s), order flipped each round; median (min-max) over rounds; ratio = {a}/{b} per round\n")
        print(f"| row | {a} IOPS | {a} MiB/s | {b} IOPS | {b} MiB/s | {a}/{b} |")
        print("|---|---|---|---|---|---|")
        for x in s:
            A, B, R = x["A"], x["B"], x["ratio"]
            print(f"| {x['row']} | {A['iops_median']:.0f} ({A['iops_min']:.0f}-{A['iops_max']:.0f}) "
                  f"| {A['mibs_median']:.2f} ({A['mibs_min']:.2f}-{A['mibs_max']:.2f}) "
                  f"| {B['iops_median']:.0f} ({B['iops_min']:.0f}-{B['iops_max']:.0f}) "
                  f"| {B['mibs_median']:.2f} ({B['mibs_min']:.2f}-{B['mibs_max']:.2f}) "
                  f"| {R['median']:.2f} ({R['min']:.2f}-{R['max']:.2f}) |")
    else:
        secs, accel, smp = float(sys.argv[6]), sys.argv[7], int(sys.argv[8])
        print(json.dumps({"rounds": n, "a": a, "b": b, "secs_per_row": secs, "accel": accel, "smp": smp,
                          "queue_depth": 1, "direct_io": True, "rows": s}, indent=1))


if __name__ == "__main__":
    main()
