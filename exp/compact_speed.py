"""The compact AdamW's speed on this machine's cores, against the multi-threaded copy probe and the
fp32-state pipeline, in one short run (bench-adam's compact figures without its other contenders):
for comparing two builds alternately in one GPU-machine call (PYTHONPATH picks the build).

    python exp/compact_speed.py [--params 64000000] [--tensors 8] [--threads 16] [--repeats 5]
"""

import argparse
import json
import statistics
import time

import torch

from gmtier import adam, compact_adam as ca

ap = argparse.ArgumentParser()
ap.add_argument("--params", type=int, default=64_000_000)
ap.add_argument("--tensors", type=int, default=8)
ap.add_argument("--threads", type=int, default=16)
ap.add_argument("--repeats", type=int, default=5)
a = ap.parse_args()
n = a.params // a.tensors
compact = []
for _ in range(a.tensors):
    st = ca.compact_state(torch.randn(n), ca.DEFAULT_BLOCK)
    compact.append(ca.CompactTensors(st["weight"], st["m_codes"], st["v_codes"], st["m_scales"], st["v_scales"],
                                     (torch.randn(n) * 1e-3).bfloat16(), st["step"]))
fp32 = [adam.AdamTensors(torch.randn(n), torch.zeros(n), torch.zeros(n), (torch.randn(n) * 1e-3).bfloat16(),
                         torch.zeros(1, dtype=torch.int64), torch.empty(n, dtype=torch.bfloat16)) for _ in range(a.tensors)]


def median_s(step) -> float:
    for _ in range(2):
        step()
    ts = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


copy = adam.memory_bandwidth(1 << 29, threads=a.threads)["copy_gbps"]
tc = median_s(lambda: ca.adamw_compact_step([compact], lr=1e-4, threads=a.threads))
tf = median_s(lambda: adam.adamw_step(fp32, lr=1e-4, threads=a.threads))
nparams = n * a.tensors
print(json.dumps({"compact_mparams_s": round(nparams / tc / 1e6), "fp32_state_mparams_s": round(nparams / tf / 1e6),
                  "compact_over_fp32_state": round(tf / tc, 3), "copy_gbps": round(copy, 1),
                  "compact_of_copy": round(nparams * 10 / tc / 1e9 / copy, 3)}))
