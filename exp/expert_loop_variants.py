"""Where the tiered `small` step's time goes: the same step as is; with the expert AdamW replaced
by a no-op (no CPU AdamW work beside the backward loop); with 4 or 8 AdamW threads; with a 0.2 ms
GIL switch interval; with dW sent to RAM one expert at a time (no groups); with blocking instead
of spinning CUDA events for the host's waits; with the launching thread alone on the physical core
of CPU 0 (every other thread off it and its SMT siblings); and the same model fully resident.
Variants combine (`pin-main adam-threads-7`). One process per run, median of 10 steps after 6.
Needs a CUDA GPU and the prepared corpus (data/ruslit).

    python exp/expert_loop_variants.py {as-is,no-adam,adam-threads-N,...,resident} [...] [--dir D]
"""

import argparse
import os
import sys
import time

import torch

from gmtier import config as config_mod
from gmtier.train import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", metavar="variant",
                    help="as-is, no-adam, adam-threads-N, gil-switch, ungrouped, blocking-events, pin-main, resident")
    ap.add_argument("--dir", default="gmtier-bench-variants", help="run directory (the store goes here)")
    a = ap.parse_args()
    known = {"as-is", "no-adam", "gil-switch", "ungrouped", "blocking-events", "pin-main", "resident"}
    for v in a.variants:
        if v not in known and not (v.startswith("adam-threads-") and v.rsplit("-", 1)[1].isdigit()):
            ap.error(f"unknown variant {v!r}")
    variants = set(a.variants)
    if not torch.cuda.is_available():
        sys.exit("expert_loop_variants: needs a CUDA GPU")
    over = ['experts.ram_budget="4GiB"', 'experts.gpu_budget="1GiB"', f'train.run_dir="{a.dir}"',
            "train.eval_every=0", "train.checkpoint_every=0"]
    over += [f"experts.adam_threads={v.rsplit('-', 1)[1]}" for v in variants if v.startswith("adam-threads-")]
    if "gil-switch" in variants:
        sys.setswitchinterval(0.0002)
    if "ungrouped" in variants:
        import gmtier.config

        gmtier.config.GRAD_GROUP = 1  # read by config.grad_staging when the runtime plans its slots
    if "blocking-events" in variants:
        cuda_event = torch.cuda.Event
        torch.cuda.Event = lambda enable_timing=False: cuda_event(enable_timing=enable_timing, blocking=True)
    if "resident" in variants:
        over.append('experts.mode="resident"')
    cores = sorted(os.sched_getaffinity(0))
    main_core = smt_siblings(cores[0]) & set(cores)
    if "pin-main" in variants:  # threads started from now on (AdamW workers, their pool) keep off that core
        os.sched_setaffinity(0, set(cores) - main_core)
    cfg = config_mod.load("configs/small.toml", over)
    tr = Trainer(cfg, fresh=True, log=lambda s: None)
    if "no-adam" in variants:
        tr.runtime.store.adam_step = lambda keys, grads, **kw: [False] * len(keys)  # nothing computed
    try:
        times = []
        for i in range(16):
            x, y = tr.train_data.batch(cfg.train.batch_size, cfg.model.seq_len, tr.rng)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tr.train_step(x, y)
            torch.cuda.synchronize()
            if i == 1 and "pin-main" in variants:  # after step 0 started the AdamW threads
                os.sched_setaffinity(0, {cores[0]})  # this thread only (Linux: per thread)
            if i == 5 and tr.runtime:
                tr.runtime.metrics()  # reset the counters after the warm-up
            elif i > 5:
                times.append(time.perf_counter() - t0)
        times.sort()
        n = len(times)
        line = f"{' '.join(a.variants)}: step median {times[n // 2]:.4f} s, min {times[0]:.4f} s"
        if tr.runtime:
            m = tr.runtime.metrics()
            line += (f"; per step: expert loops fwd {m['expert_fwd_s'] / n:.4f} / bwd {m['expert_bwd_s'] / n:.4f} s, "
                     f"phases fwd {m['fwd_phase_s'] / n:.4f} / bwd {m['bwd_phase_s'] / n:.4f} / rest "
                     f"{m['rest_phase_s'] / n:.4f} s, AdamW kernels {m['adam_kernel_s'] / n:.4f} s, waited for "
                     f"the AdamW backlog {m['adam_backlog_s'] / n:.4f} s")
        print(line)
    finally:
        tr.close()


def smt_siblings(cpu: int) -> set[int]:
    """The logical CPUs sharing `cpu`'s physical core (itself alone without SMT)."""
    try:
        text = open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read().strip()
    except OSError:
        return {cpu}
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


if __name__ == "__main__":
    main()
