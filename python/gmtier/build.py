"""A config made into a model: the GPT on its device and, in tiered mode, the expert runtime that
owns the store. Training, evaluation and the benches all build their model here."""

from __future__ import annotations

import torch

from gmtier import dtypes
from gmtier.config import Config
from gmtier.model import GPT, ResidentExperts


def autocast_dtype(precision: str):
    """The torch.autocast dtype of a resolved train.precision (None: fp32, no autocast)."""
    dtype = dtypes.from_config(precision)
    return dtype if dtype in dtypes.HALF else None


def build_model(cfg: Config, device: str, store_create: bool = False, store_overwrite: bool = False, log=print):
    """The model on `device` and, in tiered mode, the expert runtime (None in resident mode).
    `store_create`: make a new store (only a new training run does; over an existing one only
    with `store_overwrite`); otherwise open the existing one."""
    runtime = None
    if cfg.experts.mode == "tiered" and cfg.model.switch_layers():
        from gmtier.experts import ExpertRuntime

        runtime = ExpertRuntime(cfg, device, create=store_create, log=log, overwrite=store_overwrite)
        model = GPT(cfg.model, cfg.train.seed, expert_bank=runtime.bank)
    else:
        seed, pad_rows, gemm = cfg.train.seed, cfg.expert_pad_rows(), cfg.experts.gemm
        model = GPT(cfg.model, seed, expert_bank=lambda layer: ResidentExperts(cfg.model, layer, seed, pad_rows, gemm))
    model.to(device)
    if runtime is not None:
        runtime.attach(model)
    return model, runtime
