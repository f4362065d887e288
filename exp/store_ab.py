"""A store setting compared within one process: the scaled seed-envelope at M = 32 (the
layer-major section of docs/performance.md) trains with the values of `--knob` in --values taken in
turn, `--block` steps each, `--cycles` times round; the disk drifts over minutes on the H200 boxes,
so the values alternate on the same store and disk rather than run one after the other. The first
step of a block carries the previous value's writes into its forward: only the later steps of a
block count. Prints each step and the median per value, with its phases and disk bytes and rates.
Knobs: experts.deferred_writes (records, e.g. 0,4,8) and experts.read_write (together,turns; turns-N: a
turn starts while at most N chunks of the one before still run).

    python exp/store_ab.py [--knob deferred_writes] [--values 0,4,8] [--block 2] [--cycles 2] [--dir /root/b/ab]
    python exp/store_ab.py --knob read_write --values together,turns --block 3 --cycles 3
"""

import argparse
import dataclasses
import json
import statistics
import time

import torch

from gmtier import config
from gmtier.bench.train import disk_probes, mean_probes
from gmtier.store.disk import TURN_BYTES, disk_time
from gmtier.train import Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--knob", choices=["deferred_writes", "read_write"], default="deferred_writes")
parser.add_argument("--values", default="0,4,8")
parser.add_argument("--block", type=int, default=2)
parser.add_argument("--cycles", type=int, default=2)
parser.add_argument("--micro-batches", type=int, default=32)
parser.add_argument("--dir", default="/root/b/ab")
parser.add_argument("--json", default=None, help="write every step's record here")
parser.add_argument("--config", default="configs/seed-envelope.toml")
parser.add_argument("--set", action="append", default=[], help="more overrides (after the scaled envelope's)")
args = parser.parse_args()

overrides = ["model.n_experts=8", 'experts.ram_budget="4GB"', 'experts.gpu_budget="2GB"', 'train.precision="bf16"',
             'train.gpu_memory_limit="11GB"', 'train.dense_optimizer="cpu"', 'train.activations_gpu_budget="0"',
             'train.activations_ram_budget="40GB"', f"train.micro_batches={args.micro_batches}",
             f'train.run_dir="{args.dir}"', "train.eval_every=0", "train.checkpoint_every=0",
             'experts.read_write="together"']  # (set per block below; no probe when the store opens)
cfg = config.load(args.config, overrides + args.set)
trainer = Trainer(cfg, fresh=True, log=lambda s: None)
rt, t = trainer.runtime, cfg.train
print(f"plan: {rt.plan}", flush=True)
values = [int(v) if args.knob == "deferred_writes" else v for v in args.values.split(",")]


def apply(v) -> None:
    if args.knob == "deferred_writes":
        rt.plan = dataclasses.replace(rt.plan, deferred_writes=v)
    else:
        # "turns-N": a turn starts while at most N chunks of the one before still run.
        rt.store.core.set_turn_bytes(TURN_BYTES if v.startswith("turns") else 0, int(v.partition("-")[2] or 0))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step() -> dict:
    x, y = trainer.train_data.batch(t.micro_batches * t.batch_size, cfg.model.seq_len, trainer.rng)
    sync()
    rt.metrics()
    t0 = time.perf_counter()
    trainer.train_step(x, y)
    sync()
    dt = time.perf_counter() - t0
    m = rt.metrics()
    return {"step_s": dt, **{k: m.get(k) for k in ("fwd_phase_s", "bwd_phase_s", "rest_phase_s", "fwd_write_bytes",
                                                     "bwd_write_bytes", "rest_write_bytes", "fwd_read_bytes",
                                                     "bwd_read_bytes", "rest_read_bytes")}}


step()  # warm-up
probes = [disk_probes(cfg)]
rows = []
for cycle in range(args.cycles):
    for v in values:
        apply(v)
        for i in range(args.block):
            r = {args.knob: v, "cycle": cycle, "in_block": i, **step()}
            rows.append(r)
            print(json.dumps({k: round(x, 3) if isinstance(x, float) else x for k, x in r.items()}), flush=True)
probes.append(disk_probes(cfg))
trainer.close()
p = mean_probes(probes)
print(f"disk probes (mean of before and after): read {p['read_gbps']:.2f}, write {p['write_gbps']:.2f}, "
      f"both at once {p['mixed']['total_gbps']:.2f} GB/s")
for v in values:
    kept = [r for r in rows if r[args.knob] == v and r["in_block"] > 0]
    med = lambda k: statistics.median(r[k] or 0 for r in kept)  # noqa: E731
    moved = [sum(r[f"{ph}_read_bytes"] or 0 for ph in ("fwd", "bwd", "rest")) for r in kept], \
        [sum(r[f"{ph}_write_bytes"] or 0 for ph in ("fwd", "bwd", "rest")) for r in kept]
    bound = disk_time(statistics.median(moved[0]), statistics.median(moved[1]), p["read_gbps"], p["write_gbps"],
                      p["mixed"]["total_gbps"])
    bwd_gbps = [((r["bwd_read_bytes"] or 0) + (r["bwd_write_bytes"] or 0)) / r["bwd_phase_s"] / 1e9 for r in kept]
    print(f"{args.knob}={v}: step {med('step_s'):.3f} s (of {[round(r['step_s'], 2) for r in kept]}), "
          f"disk bound {bound:.3f} s, step / bound {med('step_s') / bound:.3f}, "
          f"fwd {med('fwd_phase_s'):.2f} s writing {med('fwd_write_bytes') / 1e9:.2f} GB, "
          f"bwd {med('bwd_phase_s'):.2f} s writing {med('bwd_write_bytes') / 1e9:.2f} GB "
          f"reading {med('bwd_read_bytes') / 1e9:.2f} GB at {statistics.median(bwd_gbps):.2f} GB/s")
if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f)
