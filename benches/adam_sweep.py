"""Sweep gmtier's Adam knobs that are read once per process (GMTIER_ADAM_STREAM, GMTIER_ADAM_CHUNK)
and the thread count, timing only gmtier's bf16 pipeline step. One JSON line per setting.

    python benches/adam_sweep.py --params 128000000 --threads 16 8 4 1
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
    items = [adam.AdamTensors(torch.randn(n), torch.zeros(n), torch.zeros(n), (torch.randn(n) * 1e-3).bfloat16(),
                              torch.zeros(1, dtype=torch.int64), torch.empty(n, dtype=torch.bfloat16))
             for _ in range(tensors)]
    step = lambda: adam.adamw_step(items, lr=1e-4, threads=threads)  # noqa: E731
    for _ in range(2):
        step()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    med = statistics.median(ts)
    print(json.dumps({"stream": os.environ.get("GMTIER_ADAM_STREAM", "auto"),
                      "chunk": int(os.environ.get("GMTIER_ADAM_CHUNK", adam._core.adam_chunk_elements())),
                      "threads": threads, "mparams_s": n * tensors / med / 1e6,
                      "best_mparams_s": n * tensors / min(ts) / 1e6, "gbps_effective": 28 * n * tensors / med / 1e9}),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=64_000_000)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[0])
    ap.add_argument("--streams", nargs="+", default=["none", "half", "all"])
    ap.add_argument("--chunks", type=int, nargs="+", default=[8192, 16384, 65536])
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.params, a.tensors, a.threads[0], a.repeats)
        return
    for threads in a.threads:
        for stream in a.streams:
            for chunk in a.chunks:
                env = dict(os.environ, GMTIER_ADAM_STREAM=stream, GMTIER_ADAM_CHUNK=str(chunk))
                subprocess.run([sys.executable, __file__, "--child", "--params", str(a.params), "--tensors",
                                str(a.tensors), "--repeats", str(a.repeats), "--threads", str(threads)], env=env,
                               check=False)


if __name__ == "__main__":
    main()
