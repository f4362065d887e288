"""Where the tiered `small` step's host time goes: the same step as is, with the expert AdamW
replaced by a no-op (no CPU AdamW work beside the backward loop), with 4 AdamW threads, and with
a 0.2 ms GIL switch interval. One variant per process (run it once per variant), median of 10
steps after 6. Needs a CUDA GPU and the prepared corpus (data/ruslit).

    python benches/expert_loop_variants.py {as-is,no-adam,adam-threads-4,gil-switch} [--dir D]
"""

import argparse
import sys
import time

import torch

from gmtier import config as config_mod
from gmtier.train import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=["as-is", "no-adam", "adam-threads-4", "gil-switch"])
    ap.add_argument("--dir", default="gmtier-bench-variants", help="run directory (the store goes here)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("expert_loop_variants: needs a CUDA GPU")
    over = ['experts.ram_budget="4GiB"', 'experts.gpu_budget="1GiB"', f'train.run_dir="{a.dir}"',
            "train.eval_every=0", "train.checkpoint_every=0"]
    if a.variant == "adam-threads-4":
        over.append("experts.adam_threads=4")
    if a.variant == "gil-switch":
        sys.setswitchinterval(0.0002)
    cfg = config_mod.load("configs/small.toml", over)
    tr = Trainer(cfg, fresh=True, log=lambda s: None)
    if a.variant == "no-adam":
        tr.runtime.store.adam_step = lambda key, grads, **kw: False  # "not skipped", nothing computed
    try:
        times = []
        for i in range(16):
            x, y = tr.train_data.batch(cfg.train.batch_size, cfg.model.seq_len, tr.rng)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tr.train_step(x, y)
            torch.cuda.synchronize()
            if i == 5:
                tr.runtime.metrics()  # reset the counters after the warm-up
            elif i > 5:
                times.append(time.perf_counter() - t0)
        m = tr.runtime.metrics()
        times.sort()
        n = len(times)
        print(f"{a.variant}: step median {times[n // 2]:.4f} s, min {times[0]:.4f} s; per step: expert loops "
              f"fwd {m['expert_fwd_s'] / n:.4f} / bwd {m['expert_bwd_s'] / n:.4f} s, AdamW kernels "
              f"{m['adam_kernel_s'] / n:.4f} s, waited for the AdamW backlog {m['adam_backlog_s'] / n:.4f} s")
    finally:
        tr.close()


if __name__ == "__main__":
    main()
