"""A config made into a model: the GPT on its device and, in tiered mode, the expert runtime that
owns the store. Training, evaluation and the benches all build their model here."""

from __future__ import annotations

import torch

from gmtier import dtypes
from gmtier.config import Config
from gmtier.experts.graphed import SwitchGraphs
from gmtier.model import GPT, ResidentExperts


def autocast_dtype(precision: str):
    """The torch.autocast dtype of a resolved train.precision (None: fp32, no autocast)."""
    dtype = dtypes.from_config(precision)
    return dtype if dtype in dtypes.HALF else None


def build_model(cfg: Config, device: str, store_create: bool = False, store_overwrite: bool = False, log=print,
                ranks=None):
    """The model on `device` and, in tiered mode, the expert runtime (None in resident mode).
    `store_create`: make a new store (only a new training run does; over an existing one only
    with `store_overwrite`); otherwise open the existing one. `ranks` (`gmtier.distributed.Ranks`,
    None in a single process): this rank holds its share of the experts, the rest are reached
    through the other ranks."""
    runtime = None
    seed = cfg.train.seed
    if cfg.experts.mode == "tiered" and cfg.model.switch_layers():
        from gmtier.experts import ExpertRuntime

        if ranks is None:
            runtime = ExpertRuntime(cfg, device, create=store_create, log=log, overwrite=store_overwrite)
        else:
            runtime = ExpertRuntime(ranks.store_config(cfg), device, create=store_create, log=log,
                                    overwrite=store_overwrite, expert_id=ranks.expert_id)
        bank = runtime.bank
    else:
        pad_rows, gemm = cfg.expert_pad_rows(), cfg.experts.gemm

        def bank(layer):
            return ResidentExperts(cfg.model, layer, seed, pad_rows, gemm,
                                   experts=None if ranks is None else ranks.owned(layer))
    if ranks is not None:
        bank = ranks.parallel_bank(bank)
    model = GPT(cfg.model, seed, expert_bank=bank)
    model.to(device)
    if runtime is None and ranks is None and cfg.experts.graphs == "auto" and torch.device(device).type == "cuda":
        graphs = SwitchGraphs(model.switch_blocks())
        for ffn in model.switch_blocks():
            ffn.graphs = graphs
    if runtime is not None:
        runtime.attach(model)
    if ranks is not None:
        ranks.attach(model, runtime)
    return model, runtime
