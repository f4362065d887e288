"""Does a Switch layer's gate hold it back early? A CPU probe at `tiny` scale (not a product
option): dense twin, Switch every 2nd block and in every block, each with the gate as in Switch
(output x router probability) and with a straight-through gate (output x p / p.detach(): the
value 1, the router's gradient as before up to a per-token scale, which AdamW normalises).
Prints the validation loss at each evaluation and the mean gate of the last step.

    python exp/gate_scale.py [steps]        (default 240, tiny's; ~1 min a run on 2 cores)
"""

import sys
import tempfile
from pathlib import Path

import torch

import gmtier.model as model_mod
from gmtier import config
from gmtier.evaluate import validate
from gmtier.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 240
plain_route = model_mod.route
gates: list[float] = []


def straight_route(*args, **kwargs):
    r = plain_route(*args, **kwargs)
    gates.append(r.gate.mean().item())
    r.gate = r.gate / r.gate.detach()
    return r


def watched_route(*args, **kwargs):
    r = plain_route(*args, **kwargs)
    gates.append(r.gate.mean().item())
    return r


def run(name: str, overrides: list[str], route) -> None:
    model_mod.route = route
    gates.clear()
    with tempfile.TemporaryDirectory() as work:
        cfg = config.load(ROOT / "configs/tiny.toml", [f"train.steps={STEPS}", 'experts.mode="resident"',
                                                       f'train.run_dir="{work}/run"', "train.checkpoint_every=0",
                                                       "train.eval_every=0", *overrides])
        cfg.data.dir = str(ROOT / cfg.data.dir)
        cfg.data.source = str((ROOT / cfg.data.source).resolve())
        tr = Trainer(cfg, fresh=True, log=lambda s: None)
        points = []
        for until in range(STEPS // 4, STEPS + 1, STEPS // 4):
            tr.fit(until=until)
            val = validate(tr.val_data, lambda d: (tr.evaluate(d, 8), tr.eval_batches_read))
            points.append(f"{until}: {val.loss:.4f}")
        tr.close()
    n_switch = len(cfg.model.switch_layers())
    last = gates[-n_switch:] if n_switch else []
    first = gates[:n_switch] if n_switch else []
    print(f"{name:28s} " + "  ".join(points) + (f"   mean gate first/last step {sum(first) / len(first):.3f} / "
                                                 f"{sum(last) / len(last):.3f}" if last else ""), flush=True)


torch.set_num_threads(2)
run("dense twin", ["model.switch_every=0"], watched_route)
for every in (2, 1):
    run(f"Switch every {every}, gate", [f"model.switch_every={every}"], watched_route)
    run(f"Switch every {every}, straight", [f"model.switch_every={every}"], straight_route)
