"""The tensors of an expert's store record and their names: the one place that spells them.

A record holds the expert's weights (`w1` [d_ff, d_model], `w2` [d_model, d_ff]) in its
training dtype in the "weights" section, and its AdamW state in the "state" section: an fp32
master of each weight where the weights are half precision (else the weight is its own master),
both moments of each, and the expert's own `step` counter.
"""

from __future__ import annotations

import torch

from gmtier import dtypes

WEIGHTS = ("w1", "w2")
STEP = "step"


def master(name: str) -> str:
    return f"{name}.master"


def exp_avg(name: str) -> str:
    return f"{name}.exp_avg"


def exp_avg_sq(name: str) -> str:
    return f"{name}.exp_avg_sq"


def expert_schema(d_model: int, d_ff: int, dtype: torch.dtype) -> list[tuple[str, str, list[int], str]]:
    """The store record of one expert: (name, store dtype, shape, section)."""
    shapes = {"w1": [d_ff, d_model], "w2": [d_model, d_ff]}
    half = dtype != torch.float32
    schema = [(n, dtypes.store_name(dtype), s, "weights") for n, s in shapes.items()]
    for n, s in shapes.items():
        if half:
            schema.append((master(n), "f32", s, "state"))
        schema += [(exp_avg(n), "f32", s, "state"), (exp_avg_sq(n), "f32", s, "state")]
    schema.append((STEP, "i64", [1], "state"))
    return schema


def initial_record(w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A new expert's record from its fp32 weights (moments and step start at zero)."""
    rec = {"w1": w1.to(dtype), "w2": w2.to(dtype)}
    if dtype != torch.float32:
        rec.update({master("w1"): w1, master("w2"): w2})
    return rec
