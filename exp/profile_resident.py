"""Where a resident training step's time goes: `small` (grouped expert GEMMs, its Switch layers
replayed as CUDA graphs; and launched eagerly, `small-eager`) against its dense twin
`small-dense`, in one process on the GPU. For each: the median wall step of --steps
(no profiler), then torch.profiler over --prof-steps: the GPU's kernel time a step, kernel
launches a step, the GPU-busy share of the wall step, and the kernels by total time; then
cProfile's top host functions of the Switch model's step. Run from the repo root:

    python exp/profile_resident.py [--trace-dir DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from gmtier.bench.train import _load
from gmtier.model import SwitchFFN
from gmtier.train import Trainer

RUNS = [("small-dense", "configs/small-dense.toml", []), ("small", "configs/small.toml", []),
        ("small-eager", "configs/small.toml", ["experts.graphs='off'"])]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steps(tr, n: int) -> list[float]:
    out = []
    for _ in range(n):
        x, y = tr.next_batch()
        sync()
        t0 = time.perf_counter()
        tr.train_step(x, y)
        sync()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prof-steps", type=int, default=3)
    ap.add_argument("--trace-dir", default=None, help="write each run's Chrome trace and kernel totals (JSON) here")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="override for both runs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gmtier-prof-"))
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
    forward = SwitchFFN.forward

    def labelled(self, x):  # the Switch layers' forward as a named range in the profile
        with record_function(f"switch_forward_{self.layer}"):
            return forward(self, x)

    SwitchFFN.forward = labelled
    for name, path, extra in RUNS:
        cfg = _load(path, [], work, name, ["experts.mode='resident'", *extra, *args.extra])
        tr = Trainer(cfg, fresh=True, log=lambda s: None)
        steps(tr, 4)
        wall = statistics.median(steps(tr, args.steps))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            prof_wall = statistics.median(steps(tr, args.prof_steps))
        events = prof.key_averages()
        # The device-side events less the GPU spans of the labelled ranges (not kernels).
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.key.startswith("switch_forward_")]
        gpu_us = sum(e.self_device_time_total for e in kernels) / args.prof_steps
        launches = sum(e.count for e in kernels) / args.prof_steps
        print(f"\n##### {name}: wall step {wall * 1e3:.2f} ms (under the profiler {prof_wall * 1e3:.2f} ms); "
              f"GPU kernels {gpu_us / 1e3:.2f} ms a step = {gpu_us / 1e3 / (wall * 1e3):.2f} of the wall step; "
              f"{launches:.0f} kernels a step", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70))
        print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
        if args.trace_dir:
            prof.export_chrome_trace(str(Path(args.trace_dir) / f"{name}.json"))
            totals = {e.key: {"us_per_step": e.self_device_time_total / args.prof_steps,
                              "count_per_step": e.count / args.prof_steps} for e in kernels}
            (Path(args.trace_dir) / f"kernels-{name}.json").write_text(json.dumps(totals, indent=0))
        if name == "small":
            with cProfile.Profile() as host:
                steps(tr, args.prof_steps)
            st = pstats.Stats(host).sort_stats("tottime")
            st.print_stats(30)
        tr.close()
        del tr
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
