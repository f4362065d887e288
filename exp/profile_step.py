"""Profile tiered training steps with torch.profiler: where the step time goes beyond GPU compute.

    python exp/profile_step.py --config configs/small.toml --set 'experts.ram_budget="4GiB"'
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gmtier import config
from gmtier.train import Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--config", default="configs/small.toml")
parser.add_argument("--set", dest="overrides", action="append", default=[])
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--run-dir", default="/tmp/gmtier-profile")
parser.add_argument("--trace", default=None, help="write a Chrome trace here")
parser.add_argument("--cprofile", action="store_true",
                    help="profile the host's Python with cProfile instead (torch.profiler inflates launch costs)")
args = parser.parse_args()

cfg = config.load(args.config, args.overrides)
cfg.train.run_dir = args.run_dir
cfg.train.eval_every = cfg.train.checkpoint_every = 0
trainer = Trainer(cfg, fresh=True, log=lambda s: None)
t = cfg.train
for _ in range(3):
    trainer.train_step(*trainer.train_data.batch(t.batch_size, cfg.model.seq_len, trainer.rng))
cuda = torch.cuda.is_available()
if args.cprofile:
    import cProfile
    import pstats

    with cProfile.Profile() as host_prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(*trainer.train_data.batch(t.batch_size, cfg.model.seq_len, trainer.rng))
        if cuda:
            torch.cuda.synchronize()
    print(f"{args.steps} steps {time.perf_counter() - t0:.3f}s under cProfile")
    stats = pstats.Stats(host_prof).sort_stats("tottime")
    stats.print_stats(40)
    stats.sort_stats("cumulative").print_stats(60)
    trainer.close()
    raise SystemExit
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
with profile(activities=activities) as prof:
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step(*trainer.train_data.batch(t.batch_size, cfg.model.seq_len, trainer.rng))
        if cuda:
            torch.cuda.synchronize()
        print(f"step {time.perf_counter() - t0:.3f}s")
print(trainer.runtime.metrics() if trainer.runtime else "resident")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
if cuda:
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
if args.trace:
    prof.export_chrome_trace(args.trace)
trainer.close()
