"""The tensors of an expert's store record and their names: the one place that spells them.

A record holds the expert's weights (`w1` [d_ff, d_model], `w2` [d_model, d_ff]) in the
"weights" section and its AdamW state in the "state" section, in one of two kinds
(`experts.state`):

- "fp32": the weights in their training dtype; an fp32 master of each where they are half
  precision (else the weight is its own master), both moments of each in fp32: 14 B/param
  with bf16 weights.
- "compact": bf16 weights that are their own master (stochastic rounding,
  `gmtier.compact_adam`); each moment in 8-bit codes (`.m_codes`, `.v_codes`) with one fp32
  scale per block of `COMPACT_BLOCK` elements (`.m_scales`, `.v_scales`): 4 B/param and
  16 / `COMPACT_BLOCK` for the scales.

Both end in the expert's own `step` counter.
"""

from __future__ import annotations

import math

import torch

from gmtier import _core, dtypes

STATES = ("fp32", "compact")
# Elements per block scale of the compact moments: see docs/performance.md for how it was chosen.
COMPACT_BLOCK = _core.ADAM_COMPACT_BLOCKS[2]
COMPACT_PARTS = ("m_codes", "v_codes", "m_scales", "v_scales")

WEIGHTS = ("w1", "w2")
STEP = "step"


def master(name: str) -> str:
    return f"{name}.master"


def exp_avg(name: str) -> str:
    return f"{name}.exp_avg"


def exp_avg_sq(name: str) -> str:
    return f"{name}.exp_avg_sq"


def compact(name: str, part: str) -> str:
    """A compact moment's tensor: `part` one of `COMPACT_PARTS`."""
    return f"{name}.{part}"


def state_of(names) -> str:
    """The state kind ("fp32" or "compact") of a record with these tensor names."""
    return "compact" if compact(WEIGHTS[0], "m_codes") in set(names) else "fp32"


def expert_schema(d_model: int, d_ff: int, dtype: torch.dtype,
                  state: str = "fp32") -> list[tuple[str, str, list[int], str]]:
    """The store record of one expert: (name, store dtype, shape, section). A compact record's
    weights are bf16 whatever `dtype` says (the config refuses another)."""
    shapes = {"w1": [d_ff, d_model], "w2": [d_model, d_ff]}
    if state == "compact":
        schema = [(n, "bf16", s, "weights") for n, s in shapes.items()]
        for n, s in shapes.items():
            blocks = -(-math.prod(s) // COMPACT_BLOCK)
            schema += [(compact(n, "m_codes"), "u8", [math.prod(s)], "state"),
                       (compact(n, "v_codes"), "u8", [math.prod(s)], "state"),
                       (compact(n, "m_scales"), "f32", [blocks], "state"),
                       (compact(n, "v_scales"), "f32", [blocks], "state")]
        schema.append((STEP, "i64", [1], "state"))
        return schema
    half = dtype != torch.float32
    schema = [(n, dtypes.store_name(dtype), s, "weights") for n, s in shapes.items()]
    for n, s in shapes.items():
        if half:
            schema.append((master(n), "f32", s, "state"))
        schema += [(exp_avg(n), "f32", s, "state"), (exp_avg_sq(n), "f32", s, "state")]
    schema.append((STEP, "i64", [1], "state"))
    return schema


def initial_record(w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype,
                   state: str = "fp32") -> dict[str, torch.Tensor]:
    """A new expert's record from its fp32 weights (moments, scales and step start at zero;
    a compact record's weights are bf16, rounded to nearest)."""
    if state == "compact":
        return {"w1": w1.to(torch.bfloat16), "w2": w2.to(torch.bfloat16)}
    rec = {"w1": w1.to(dtype), "w2": w2.to(dtype)}
    if dtype != torch.float32:
        rec.update({master("w1"): w1, master("w2"): w2})
    return rec
