"""Using a trained run: perplexity on a split (per corpus of a mixture) or a text file, the training
log's validation record, sampling, and parameter / tier byte counts. (Zero-shot choice scoring:
`gmtier.choice`.)"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gmtier import progress
from gmtier.build import autocast_dtype, build_model
from gmtier.checkpoint import RunDir
from gmtier.config import Config, from_dict, parse_bytes
from gmtier.data import Mixture, TokenData
from gmtier.model import count_params


def load_run(run_dir: str | Path, device: str | None = None, overrides: dict | None = None):
    """(cfg, model, runtime, step) of a run's last checkpoint, in eval mode. The run is
    self-contained: its store is found inside `run_dir` (wherever the run was trained or moved
    to), and its dense checkpoint and store commit must be of the same step, as on resume."""
    run = RunDir(run_dir)
    raw = run.saved_config()
    run.world_size = run.trained_world_size()
    run.checkpoint_step()  # refuse a run without one before opening its store
    raw["train"]["run_dir"] = str(run.path)
    if device:
        raw["train"]["device"] = device
    for section, values in (overrides or {}).items():
        raw[section].update(values)
    cfg = from_dict(raw)
    if run.world_size > 1:  # trained by several ranks: their shares of the experts, in this process
        from gmtier.distributed import load_ranks_checkpoint

        model, runtime, step = load_ranks_checkpoint(cfg, run)
        model.eval()
        return cfg, model, runtime, step
    model, runtime = build_model(cfg, cfg.device(), store_create=False, log=lambda *_: None)
    try:
        step = run.resume_step(runtime)
        run.load_dense(step, model)
    except BaseException:
        if runtime is not None:
            runtime.close()
        raise
    model.eval()
    return cfg, model, runtime, step


def text_batch_count(ids: np.ndarray, batch_size: int, seq_len: int) -> int:
    """How many batches `text_batches` yields."""
    return -(-((len(ids) - 1) // seq_len) // batch_size)


def text_batches(ids: np.ndarray, batch_size: int, seq_len: int):
    n = (len(ids) - 1) // seq_len
    for first in range(0, n, batch_size):
        rows = range(first, min(n, first + batch_size))
        chunk = torch.from_numpy(np.stack([ids[r * seq_len: r * seq_len + seq_len + 1] for r in rows]).astype(np.int64))
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def perplexity(cfg: Config, model, batches, n_batches: int | None = None) -> tuple[float, int]:
    """(mean token cross entropy, tokens) over (x, y) batches (`n_batches` of them, for the progress bar)."""
    device = cfg.device()
    amp = autocast_dtype(cfg.precision())
    total, tokens = 0.0, 0
    for x, y in progress.bar(batches, total=n_batches, desc="evaluating", unit="batch"):
        with torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
            _, loss, _ = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        tokens += y.numel()
    if tokens == 0:
        raise ValueError("not enough text for one window of model.seq_len + 1 tokens")
    return total / tokens, tokens


def split_perplexity(cfg: Config, model, split: str, batches: int | None = None) -> dict:
    """Perplexity of a run's model on a split of its prepared data (the first `batches` batches,
    or all of it), per corpus of a mixture: `tokens`, `loss`, `ppl`, and for a mixture
    `corpora` = {name: {tokens, loss, ppl}} with `loss` their weighted mean (by data.corpora's
    weights, as the training log)."""
    bs, sl = cfg.train.batch_size, cfg.model.seq_len
    data = Mixture(cfg.data.dir, split)
    per = {}
    for name, _, part in data.parts:
        loss, tokens = perplexity(cfg, model, part.eval_batches(bs, sl, batches), part.eval_batch_count(bs, sl, batches))
        per[name] = {"tokens": tokens, "loss": loss, "ppl": ppl(loss)}
    mean = float(sum(w * per[n]["loss"] for n, w, _ in data.parts))
    out = {"tokens": sum(p["tokens"] for p in per.values()), "loss": mean, "ppl": ppl(mean)}
    if len(per) > 1:
        out["corpora"] = per
    return out


@dataclass
class Validation:
    """Validation losses per corpus (`names`, `losses`, `batches`) with the corpora's weights;
    `loss` is their weighted mean (one corpus: its loss)."""
    names: list[str]
    weights: list[float]
    losses: list[float]
    batches: list[int]

    @property
    def loss(self) -> float:
        return float(sum(w * l for w, l in zip(self.weights, self.losses)))

    def record(self) -> dict:
        """The metrics.jsonl fields: `val_loss`, `val_ppl` (of the weighted mean loss), `val_batches`
        and, for a mixture, `val_loss/NAME` and `val_ppl/NAME` per corpus."""
        out = {"val_loss": self.loss, "val_ppl": ppl(self.loss), "val_batches": max(self.batches)}
        if len(self.names) > 1:
            for name, loss in zip(self.names, self.losses):
                out[f"val_loss/{name}"], out[f"val_ppl/{name}"] = loss, ppl(loss)
        return out

    def summary(self) -> str:
        """`val loss L | val ppl P`, then each corpus's loss for a mixture."""
        line = f"val loss {self.loss:.4f} | val ppl {ppl(self.loss):.2f}"
        if len(self.names) > 1:
            line += " (weighted mean) | " + " | ".join(f"{n} {l:.4f} / {ppl(l):.2f}" for n, l in zip(self.names, self.losses))
        return line

    def sample_note(self) -> str:
        """What was read: the training log evaluates the first train.eval_batches batches."""
        each = " of each corpus's" if len(self.names) > 1 else " of"
        return f"first {max(self.batches)} batches{each} val; `gmtier eval` reads the whole split"


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50))


def validate(val: Mixture, loss_of: Callable[[TokenData], tuple[float, int]]) -> Validation:
    """`loss_of(split) -> (loss, batches read)` over each corpus's validation split."""
    results = [loss_of(data) for _, _, data in val.parts]
    return Validation(val.names, [float(w) for w in val.weights], [r[0] for r in results], [r[1] for r in results])


def info(cfg: Config) -> dict:
    """Parameter counts and bytes per tier (from the config alone)."""
    p = count_params(cfg.model)
    weights, record = cfg.expert_bytes()
    n_experts = len(cfg.model.switch_layers()) * cfg.model.n_experts
    ram = parse_bytes(cfg.experts.ram_budget, "experts.ram_budget")
    gpu = parse_bytes(cfg.experts.gpu_budget, "experts.gpu_budget")
    dense_bytes = p["dense"] * 4 * (3 if cfg.train.dense_optimizer == "torch" else 1)  # fp32 weights (+ m, v)
    spares = n_experts if cfg.spare_slots() is None else cfg.spare_slots()
    # A paged expert's disk traffic in a step: forward reads its weights; backward reads its
    # state where a GPU tier holds its weights (the AdamW takes the master weights from that copy,
    # or rewrites a half copy from the fp32 master), else the whole record (an expert-major step
    # evicts it in between); the write-back writes the whole record.
    backward = record - weights if gpu > 0 else record
    per_expert = max(1, p["expert"])
    return {
        "params_total": p["total"], "params_active_per_token": p["active_per_token"],
        "params_dense": p["dense"], "params_per_expert": p["expert"], "experts": n_experts,
        "expert_dtype": cfg.expert_dtype(), "expert_state": cfg.experts.state, "expert_record_bytes": record,
        "expert_weights_bytes": weights, "spare_slots": spares,
        "disk_bytes": (n_experts + spares) * record,  # the store file, less its header (< 0.1 %)
        "record_bytes_per_param": record / per_expert,
        "disk_bytes_per_param": (n_experts + spares) * record / (per_expert * max(1, n_experts)),
        "step_disk_bytes_per_expert": {"forward_read": weights, "backward_read": backward, "write_back": record},
        "step_disk_bytes_per_param": (weights + backward + record) / per_expert,
        "ram_budget_bytes": ram, "ram_slots": ram // record if record else 0,
        "gpu_budget_bytes": gpu, "gpu_slots": gpu // weights if weights else 0,
        "dense_bytes_on_device": dense_bytes,
        "experts_fit_in_ram": n_experts * record <= ram, "experts_fit_on_gpu": n_experts * weights <= gpu,
    }
