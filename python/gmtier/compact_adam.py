"""The compact-state AdamW (the Rust kernel in `gmtier._core`): bf16 weights that are their own
master copy, m and v in 8 bits with one fp32 scale per block of ``block`` elements.

One fused pass per block: gradient (fp32/bf16/fp16, times ``clip_coef / grad_scale``) ->
dequantize m and v -> AdamW in fp32 (the fp32 path's math and order, the expert's own step
count) -> the new weight rounded to bf16 stochastically with bits from a counter-based RNG of
(seed, stream, step, element index), the same for any thread count -> m and v requantized with
fresh absmax scales. The maps (m: sign + E4M3, v: unsigned E5M3, both of ``|x| / absmax``) are
in ``rust/core/src/adam/compact/quant.rs``; :func:`maps` returns their 256 values.

:class:`CompactTensors` is one tensor's state; :func:`compact_state` makes a fresh one from a
weight; :func:`adamw_compact_step` steps groups of them (one group per expert, each skipped on
its own, untouched, for an inf/NaN gradient with ``check_finite``). ``gmtier bench-adam`` times
it next to the fp32-state path.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple, Sequence

import torch

from gmtier import _core, adam

__all__ = [
    "CompactTensors",
    "compact_state",
    "adamw_compact_step",
    "dequantize",
    "maps",
    "MIN_BLOCK",
    "MAX_BLOCK",
    "DEFAULT_BLOCK",
]

MIN_BLOCK, MAX_BLOCK, DEFAULT_BLOCK = _core.ADAM_COMPACT_BLOCKS


class CompactTensors(NamedTuple):
    """One tensor's compact AdamW state and gradient (all CPU, contiguous)."""

    weight: torch.Tensor  # bf16, n elements: the weight and its master, updated in place
    m_codes: torch.Tensor  # uint8, n
    v_codes: torch.Tensor  # uint8, n
    m_scales: torch.Tensor  # fp32, ceil(n / block)
    v_scales: torch.Tensor  # fp32, ceil(n / block)
    grad: torch.Tensor  # fp32, bf16 or fp16, n (read only)
    step: torch.Tensor  # int64, one element; may be shared by the tensors of one expert
    stream: int = 0  # the rounding RNG's stream, e.g. (layer * experts + expert) * tensors + tensor


def compact_state(weight: torch.Tensor, block: int = DEFAULT_BLOCK) -> dict[str, torch.Tensor]:
    """Fresh compact state for ``weight`` (any float dtype, rounded to bf16 nearest): zero
    moments. Returns weight, m_codes, v_codes, m_scales, v_scales, step."""
    n = weight.numel()
    nb = -(-n // int(block))
    return {
        "weight": weight.detach().to("cpu", torch.bfloat16).contiguous().reshape(-1).clone(),
        "m_codes": torch.zeros(n, dtype=torch.uint8),
        "v_codes": torch.zeros(n, dtype=torch.uint8),
        "m_scales": torch.zeros(nb, dtype=torch.float32),
        "v_scales": torch.zeros(nb, dtype=torch.float32),
        "step": torch.zeros(1, dtype=torch.int64),
    }


def maps() -> tuple[torch.Tensor, torch.Tensor]:
    """The 256 fp32 values of the m map and of the v map (index = code)."""
    m, v = _core.adam_compact_maps()
    return torch.tensor(m, dtype=torch.float32), torch.tensor(v, dtype=torch.float32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, which: str, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """m (``which="m"``) or v (``"v"``) in fp32 from its codes and block scales."""
    table = maps()[0 if which == "m" else 1]
    vals = table[codes.to(torch.int64).reshape(-1)]
    per = scales.repeat_interleave(int(block))[: vals.numel()]
    return vals * per


def _check_block(block: int) -> int:
    block = int(block)
    if not (MIN_BLOCK <= block <= MAX_BLOCK) or block & (block - 1):
        raise ValueError(f"block must be a power of two in {MIN_BLOCK}..{MAX_BLOCK}, got {block}")
    return block


def _as_tensors(item: Any, i: int) -> CompactTensors:
    return adam._as_named(item, i, CompactTensors,
                          "CompactTensors(weight, m_codes, v_codes, m_scales, v_scales, grad, step, stream=0)")


def _specs(tensors: Sequence[Any], block: int) -> list[tuple]:
    specs, spans = [], []
    for i, item in enumerate(tensors):
        t = _as_tensors(item, i)
        what = f"tensors[{i}]"
        adam._check_tensor(t.weight, f"{what}.weight", {torch.bfloat16: 0}, None)
        n = t.weight.numel()
        nb = -(-n // block)
        for name, dt, size in (("m_codes", torch.uint8, n), ("v_codes", torch.uint8, n),
                               ("m_scales", torch.float32, nb), ("v_scales", torch.float32, nb)):
            x = getattr(t, name)
            adam._check_tensor(x, f"{what}.{name}", {dt: 0}, None)
            if x.numel() != size:
                raise ValueError(f"{what}.{name}: has {x.numel()} elements, expected {size} "
                                 f"(weight {n}, block {block})")
        adam._check_tensor(t.grad, f"{what}.grad", adam._GRAD_DTYPES, n)
        adam._check_tensor(t.step, f"{what}.step", {torch.int64: 0}, 1)
        stream = int(t.stream)
        if not 0 <= stream < 1 << 64:
            raise ValueError(f"{what}.stream must be in [0, 2**64), got {stream}")
        if n:
            for name in ("weight", "m_codes", "v_codes", "m_scales", "v_scales", "grad"):
                x = getattr(t, name)
                start = x.data_ptr()
                spans.append((start, start + x.numel() * x.element_size(), f"{what}.{name}", name != "grad"))
        specs.append((t.weight.data_ptr(), t.m_codes.data_ptr(), t.v_codes.data_ptr(), t.m_scales.data_ptr(),
                      t.v_scales.data_ptr(), t.grad.data_ptr(), adam._GRAD_DTYPES[t.grad.dtype], n,
                      t.step.data_ptr(), stream))
    spans.sort()
    for (s0, e0, a, w0), (s1, e1, b, w1) in zip(spans, spans[1:]):
        if s1 < e0 and (w0 or w1):
            raise ValueError(f"{a} and {b} overlap in memory; every written array must be separate")
    return specs


def adamw_compact_step(
    groups: Sequence[Sequence[Any]],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    grad_scale: float = 1.0,
    clip_coef: float = 1.0,
    check_finite: bool = False,
    block: int = DEFAULT_BLOCK,
    seed: int = 0,
    simd: str = "auto",
    threads: int | None = None,
) -> list[bool]:
    """One compact AdamW step over ``groups`` (one list of :class:`CompactTensors`, dicts or
    tuples per expert) in one parallel pass. Returns whether each group was skipped
    (``check_finite`` found an inf/NaN in its gradients: nothing of it was written, step
    counters included). ``block`` must be the block size the state was made with."""
    block = _check_block(block)
    seed = int(seed)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    groups = [list(g) for g in groups]
    specs = _specs([t for g in groups for t in g], block)
    ends = list(itertools.accumulate(len(g) for g in groups))
    beta1, beta2 = (float(b) for b in betas)
    return list(_core.adamw_compact_step_groups_raw(
        specs, ends, float(lr), beta1, beta2, float(eps), float(weight_decay), float(grad_scale),
        float(clip_coef), bool(check_finite), block, seed, adam._simd(simd), adam._threads(threads)))
