"""Whole resident training steps (forward, backward, AdamW) on the GPU in one process: `small`
with grouped expert GEMMs (its Switch layers replayed as CUDA graphs, and launched eagerly) and
with looped ones, its dense twin `small-dense`, and `small` with 64 experts a layer (the same three). Median step over --steps after --warmup (bench-train's timing),
one JSON line each, then each Switch run's step over the dense twin's of its round (targets:
small <= 1.25, 64 experts <= 1.5). Run from the repo root: python exp/grouped_steps.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch

from gmtier.bench.train import _graphs_note, _load, _time_steps
from gmtier.experts.bank import GEMM_FALLBACKS
from gmtier.train import Trainer

RUNS = [
    ("small-dense", "configs/small-dense.toml", []),
    ("small grouped", "configs/small.toml", ["experts.gemm='grouped'"]),
    ("small grouped eager", "configs/small.toml", ["experts.gemm='grouped'", "experts.graphs='off'"]),
    ("small loop", "configs/small.toml", ["experts.gemm='loop'"]),
    ("small 64 experts grouped", "configs/small.toml", ["model.n_experts=64", "experts.gemm='grouped'"]),
    ("small 64 experts grouped eager", "configs/small.toml",
     ["model.n_experts=64", "experts.gemm='grouped'", "experts.graphs='off'"]),
    ("small 64 experts loop", "configs/small.toml", ["model.n_experts=64", "experts.gemm='loop'"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=None, help="run directories (default: a temporary one)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
    ap.add_argument("--rounds", type=int, default=1, help="run the list this many times, alternating (the box drifts)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="gmtier-grouped-"))
    keep = {s.strip() for s in args.only.split(",") if s.strip()}
    rows = []
    for rnd, (name, path, extra) in ((rnd, run) for rnd in range(args.rounds) for run in RUNS):
        if keep and name not in keep:
            continue
        cfg = _load(path, [], work, name.replace(" ", "-"), ["experts.mode='resident'", *extra])
        tr = Trainer(cfg, fresh=True, log=lambda s: None)
        try:
            r = _time_steps(tr, args.warmup, args.steps, desc=name)
            switch = tr.model.switch_blocks()
            row = {"run": name, "round": rnd, "step_s": r["step_s"], "step_s_all": r["step_s_all"],
                   "tokens_per_s": cfg.train.batch_size * cfg.model.seq_len / r["step_s"],
                   "gemm_ran": switch[0].experts.gemm_used if switch else None,
                   "launched_as": _graphs_note(switch) if switch else None,
                   "max_gpu_bytes": torch.cuda.max_memory_allocated()}
        finally:
            tr.close()
            del tr
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'round':5} {'run':32} {'ran':8} {'step ms':>9} {'tokens/s':>10} {'/ dense':>8}")
    for r in rows:
        dense = next((d["step_s"] for d in rows if d["run"] == "small-dense" and d["round"] == r["round"]), None)
        ratio = f"{r['step_s'] / dense:8.2f}" if dense else "       -"
        print(f"{r['round']:5} {r['run']:32} {str(r['gemm_ran'] or '-'):8} {r['step_s'] * 1e3:9.2f} {r['tokens_per_s']:10,.0f} {ratio}"
              f"  {r['launched_as'] or ''}")
    if GEMM_FALLBACKS:
        print("grouped GEMMs fell back:", GEMM_FALLBACKS)


if __name__ == "__main__":
    main()
