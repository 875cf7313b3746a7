#!/usr/bin/env python3
"""Read the serial log of a ci/xen/run boot; print the test lines; write the JSON results.

usage: results.py LOG OUT.json BOOT_SECONDS QEMU_RC BINARY_NAME...
Exit status 1 if a test failed, XVM-DONE is missing (crash or timeout), no test
ran, or a binary reported no test case.
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

for t in tests:
    print(f"XVM-TEST {t['name']} {t['status']} {t['detail']}".rstrip())
for b in bench:
    print("XVM-JSON " + json.dumps(b))
with open(out, "w") as f:
    json.dump({"tests": tests, "bench": bench, "boot_seconds": round(boot_seconds, 1)}, f, indent=1)
failed = sum(t["status"] == "FAIL" for t in tests)
passed = len(tests) - failed
print(f"xen: {passed} passed, {failed} failed")
sys.exit(1 if failed or not passed else 0)
