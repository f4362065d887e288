"""The compact-state AdamW against the fp32-state pipeline by CPU time of the process, on each
SIMD path: steadier than wall time on a shared machine (a preempted thread's wait is not counted).

    python exp/adam_cpu_time.py [threads] [block] [log2 of the parameters, 23]

At 2^23 parameters the arrays are in DRAM (on a shared box its bandwidth is shared too); at 2^17
(1.3 MB) they stay in L2 and the time is the kernel's arithmetic.
"""

import sys
import time

import torch

from gmtier import adam, compact_adam as ca

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
block = int(sys.argv[2]) if len(sys.argv) > 2 else ca.DEFAULT_BLOCK
n = 1 << (int(sys.argv[3]) if len(sys.argv) > 3 else 23)
REPEATS = max(7, min(200, (1 << 27) // n))
st = ca.compact_state(torch.randn(n), block)
g = (torch.randn(n) * 1e-3).bfloat16()
t = ca.CompactTensors(st["weight"], st["m_codes"], st["v_codes"], st["m_scales"], st["v_scales"], g, st["step"])
fp = adam.AdamTensors(torch.randn(n), torch.zeros(n), torch.zeros(n), g, torch.zeros(1, dtype=torch.int64),
                      torch.empty(n, dtype=torch.bfloat16))


def best(fn, repeats: int = REPEATS) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return min(ts)


for simd in adam.simd_available():
    tc = best(lambda: ca.adamw_compact_step([[t]], lr=1e-3, block=block, threads=threads, simd=simd))
    tf = best(lambda: adam.adamw_step([fp], lr=1e-3, threads=threads, simd=simd))
    print(f"{simd}: compact {n / tc / 1e6:.0f} Mparams/CPU-s, fp32-state pipeline {n / tf / 1e6:.0f}, "
          f"ratio {tf / tc:.2f}")
