"""Sweep gmtier's Adam knobs that are read once per process (GMTIER_ADAM_STREAM, GMTIER_ADAM_CHUNK,
GMTIER_ADAM_PREFETCH) and the thread count, timing gmtier alone (bf16 pipeline and plain fp32). One JSON line
per setting; each setting is `threads:stream:chunk:prefetch`.

    python exp/adam_sweep.py --params 128000000 --settings 16:half:16384:0 16:none:16384:0 16:half:16384:256
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(params: int, tensors: int, threads: int, repeats: int) -> None:
    import torch

    from gmtier import adam

    n = params // tensors

    def timed(items):
        step = lambda: adam.adamw_step(items, lr=1e-4, threads=threads)  # noqa: E731
        for _ in range(2):
            step()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), min(ts)

    items = [adam.AdamTensors(torch.randn(n), torch.zeros(n), torch.zeros(n), (torch.randn(n) * 1e-3).bfloat16(),
                              torch.zeros(1, dtype=torch.int64), torch.empty(n, dtype=torch.bfloat16))
             for _ in range(tensors)]
    med, best = timed(items)
    del items
    items = [adam.AdamTensors(torch.randn(n), torch.zeros(n), torch.zeros(n), torch.randn(n) * 1e-3,
                              torch.zeros(1, dtype=torch.int64)) for _ in range(tensors)]
    med32, _ = timed(items)
    p = n * tensors
    print(json.dumps({"stream": os.environ.get("GMTIER_ADAM_STREAM", "auto"),
                      "prefetch": int(os.environ.get("GMTIER_ADAM_PREFETCH", "0")),
                      "chunk": int(os.environ.get("GMTIER_ADAM_CHUNK", adam._core.adam_chunk_elements())),
                      "threads": threads, "mparams_s": p / med / 1e6, "best_mparams_s": p / best / 1e6,
                      "gbps_effective": 28 * p / med / 1e9, "fp32_mparams_s": p / med32 / 1e6}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=64_000_000)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--settings", nargs="+", default=["0:auto:16384:0"], help="threads:stream:chunk:prefetch")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.params, a.tensors, a.child, a.repeats)
        return
    for setting in a.settings:
        threads, stream, chunk, prefetch = setting.split(":")
        env = dict(os.environ, GMTIER_ADAM_STREAM=stream, GMTIER_ADAM_CHUNK=chunk, GMTIER_ADAM_PREFETCH=prefetch)
        subprocess.run([sys.executable, __file__, "--child", threads, "--params", str(a.params), "--tensors",
                        str(a.tensors), "--repeats", str(a.repeats)], env=env, check=False)


if __name__ == "__main__":
    main()
