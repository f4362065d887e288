"""Sweep the fused CPU AdamW's thread count and store policy (the kernel's `stores=` option:
auto, none, half, all), timing gmtier alone on the bf16 pipeline and on plain fp32. One JSON
line per setting; each setting is `threads:stores`.

    python exp/adam_sweep.py --params 128000000 --settings 16:auto 16:none 16:half 16:all 8:half
"""

import argparse
import json
import statistics
import time

import torch

from gmtier import _core, adam


def timed(specs, threads: int, stores: str, repeats: int) -> tuple[float, float]:
    def step():
        _core.adamw_step_groups_raw(specs, [len(specs)], 1e-4, 0.9, 0.999, 1e-8, 0.0, threads=threads, stores=stores)

    for _ in range(2):
        step()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=64_000_000)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--settings", nargs="+", default=["0:auto"], help="threads:stores")
    a = ap.parse_args()
    n = a.params // a.tensors
    bf16 = [adam.AdamTensors(torch.randn(n), torch.zeros(n), torch.zeros(n), (torch.randn(n) * 1e-3).bfloat16(),
                             torch.zeros(1, dtype=torch.int64), torch.empty(n, dtype=torch.bfloat16))
            for _ in range(a.tensors)]
    fp32 = [adam.AdamTensors(torch.randn(n), torch.zeros(n), torch.zeros(n), torch.randn(n) * 1e-3,
                             torch.zeros(1, dtype=torch.int64)) for _ in range(a.tensors)]
    bf16_specs, _ = adam._specs(bf16)  # validated raw specs; the tensors stay alive above
    fp32_specs, _ = adam._specs(fp32)
    p = n * a.tensors
    for setting in a.settings:
        threads, stores = setting.split(":")
        med, best = timed(bf16_specs, int(threads), stores, a.repeats)
        med32, _ = timed(fp32_specs, int(threads), stores, a.repeats)
        print(json.dumps({"threads": int(threads), "stores": stores, "mparams_s": p / med / 1e6,
                          "best_mparams_s": p / best / 1e6, "gbps_effective": 28 * p / med / 1e9,
                          "fp32_mparams_s": p / med32 / 1e6}), flush=True)


if __name__ == "__main__":
    main()
