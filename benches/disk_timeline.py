"""Print the disk timeline that `gmtier bench-train --timeline FILE` wrote: the read and write
rates in bins of a step, with the phase (fwd, bwd, rest) and the Switch layers whose expert
loops ran, so that the stretches where the disk idles stand out.

    python benches/disk_timeline.py FILE [--bin 0.5] [--config seed-envelope]

The store counts a record's bytes when its whole read or write completes, so bins shorter than
a record's transfer time look lumpy.
"""

import argparse
import json
from collections import Counter

parser = argparse.ArgumentParser()
parser.add_argument("file")
parser.add_argument("--bin", type=float, default=0.5, help="seconds per row")
parser.add_argument("--config", default=None, help="only this config's samples")
parser.add_argument("--scale", type=float, default=10.0, help="bar characters per GB/s")
args = parser.parse_args()

rows = [json.loads(line) for line in open(args.file)]
if args.config:
    rows = [r for r in rows if r["config"] == args.config]
if len(rows) < 2:
    raise SystemExit("fewer than two samples")

totals = Counter()
start, inside = rows[0], []
for r in rows[1:]:
    inside.append(r)
    if r["t"] - start["t"] < args.bin and r is not rows[-1]:
        continue
    dt = r["t"] - start["t"]
    read, written = (r["read"] - start["read"]) / dt / 1e9, (r["written"] - start["written"]) / dt / 1e9
    phase = Counter(s["phase"] for s in inside).most_common(1)[0][0]
    layers = ",".join(str(x) for x in sorted({s["layer"] for s in inside if s["layer"] is not None}))
    totals[phase, "s"] += dt
    totals[phase, "read"] += read * dt
    totals[phase, "written"] += written * dt
    print(f"{start['t']:8.2f} step {r['step']} {phase:4s} layers {layers:8s} read {read:5.2f} write {written:5.2f} GB/s "
          f"{'R' * round(read * args.scale)}|{'W' * round(written * args.scale)}")
    start, inside = r, []

print()
for phase in ("fwd", "bwd", "rest"):
    s = totals[phase, "s"]
    if s:
        print(f"{phase:4s} {s:8.2f} s  read {totals[phase, 'read'] / s:5.2f}  write {totals[phase, 'written'] / s:5.2f} GB/s")
