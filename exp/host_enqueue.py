"""How long the host takes to launch a resident training step, against the step's wall time:
`small-dense`, `small` (Switch layers replayed as CUDA graphs) and `small` launched eagerly, in
one process on the GPU. Each timed step launches forward, backward, the gradient clip, AdamW and
zero_grad without reading the loss (host time: until the last launch returns), then waits for
the GPU (wall time). Host time near the wall time: the step is bound by its launches. With
--profile, the top host functions of the graphed step's launches (cProfile). Run from the repo root:

    python exp/host_enqueue.py [--steps N]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gmtier.bench.train import _load
from gmtier.train import Trainer, lr_at

RUNS = [("small-dense", "configs/small-dense.toml", []), ("small", "configs/small.toml", []),
        ("small-eager", "configs/small.toml", ["experts.graphs='off'"])]


def launch_step(tr, x, y) -> None:
    """train_step's launches, less the loss read at its end (the only host wait of a resident step)."""
    for g in tr.opt.param_groups:
        g["lr"] = lr_at(tr.cfg, tr.step)
    with tr.autocast():
        _, loss, aux = tr.model(x, y)
    (loss + aux).backward()
    dense = [p for n, p in tr.model.named_parameters() if p.grad is not None and ".experts." not in n]
    torch.nn.utils.clip_grad_norm_(dense, tr.cfg.train.grad_clip)
    tr.opt.step()
    tr.opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="cProfile the graphed step's launches")
    ap.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gmtier-host-"))
    keep = {s.strip() for s in args.only.split(",") if s.strip()}
    for name, path, extra in RUNS:
        if keep and name not in keep:
            continue
        tr = Trainer(_load(path, [], work, name, ["experts.mode='resident'", *extra]), fresh=True, log=lambda s: None)
        tr.model.train()
        batches = [tuple(t.to(tr.device) for t in tr.next_batch()) for _ in range(4)]
        host, wall = [], []
        for i in range(args.steps + 3):
            x, y = batches[i % len(batches)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            launch_step(tr, x, y)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= 3:
                host.append(t1 - t0)
                wall.append(t2 - t0)
        h, w = statistics.median(host), statistics.median(wall)
        print(f"{name:12} host {h * 1e3:6.2f} ms  wall {w * 1e3:6.2f} ms  host/wall {h / w:.2f}", flush=True)
        if name == "small" and args.profile:
            with cProfile.Profile() as prof:
                for i in range(5):
                    launch_step(tr, *batches[i % len(batches)])
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        tr.close()
        del tr
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
