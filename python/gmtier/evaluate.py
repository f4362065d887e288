"""Using a trained run: perplexity on a split or a text file, sampling, and parameter / tier byte counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gmtier import progress
from gmtier.build import autocast_dtype, build_model
from gmtier.checkpoint import RunDir
from gmtier.config import Config, from_dict, parse_bytes
from gmtier.model import count_params


def load_run(run_dir: str | Path, device: str | None = None, overrides: dict | None = None):
    """(cfg, model, runtime, step) of a run's last checkpoint, in eval mode. The run is
    self-contained: its store is found inside `run_dir` (wherever the run was trained or moved
    to), and its dense checkpoint and store commit must be of the same step, as on resume."""
    run = RunDir(run_dir)
    raw = run.saved_config()
    run.checkpoint_step()  # refuse a run without one before opening its store
    raw["train"]["run_dir"] = str(run.path)
    if device:
        raw["train"]["device"] = device
    for section, values in (overrides or {}).items():
        raw[section].update(values)
    cfg = from_dict(raw)
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


def info(cfg: Config) -> dict:
    """Parameter counts and bytes per tier (from the config alone)."""
    p = count_params(cfg.model)
    weights, record = cfg.expert_bytes()
    n_experts = len(cfg.model.switch_layers()) * cfg.model.n_experts
    ram = parse_bytes(cfg.experts.ram_budget, "experts.ram_budget")
    gpu = parse_bytes(cfg.experts.gpu_budget, "experts.gpu_budget")
    dense_bytes = p["dense"] * 4 * (3 if cfg.train.dense_optimizer == "torch" else 1)  # fp32 weights (+ m, v)
    spares = n_experts if cfg.spare_slots() is None else cfg.spare_slots()
    # A paged expert's disk traffic in a step: forward reads its weights; backward reads what the
    # AdamW needs (the state where the weights are a half copy of an fp32 master, else the whole
    # record: an expert-major step evicts it in between); the write-back writes the whole record.
    backward = record - weights if cfg.expert_dtype() != "fp32" and cfg.experts.state == "fp32" else record
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
