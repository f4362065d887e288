"""Expert banks: what a Switch layer hands its sorted tokens to.

`ResidentExperts` keeps every expert as nn.Parameters (the reference); `TieredExperts` pages
them from the tiered store through the `ExpertRuntime`, inside `ExpertLayerFn` (the autograd
Function that saves only the layer's sorted input and updates the experts in backward). Both
compute `expert_ffn` on the same GEMM row layout, so they agree to floating point.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gmtier.config import ModelConfig


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert: x [n, d] -> gelu(x w1^T) w2^T, with w1 [d_ff, d] and w2 [d, d_ff] (bias-free);
    written into `out` (a slice of the layer's output, same dtype) when given."""
    h = F.gelu(F.linear(x, w1))
    return F.linear(h, w2) if out is None else torch.mm(h, w2.t(), out=out)


def expert_ffn_backward(x, w1, w2, dy, out: dict | None = None, dx: torch.Tensor | None = None,
                        accumulate: bool = False):
    """Gradients of `expert_ffn` by hand (no autograd graph over the store's views):
    returns (dx, {"w1": dW1, "w2": dW2}); dW is written into `out`'s tensors when given (a GPU
    staging slot), added to them with `accumulate` (the next chunk of an expert's rows), dx
    into `dx` when given."""
    a = F.linear(x, w1)
    h = F.gelu(a)
    if out is None:
        out = {"w1": torch.empty_like(w1), "w2": torch.empty_like(w2)}
    da = torch.ops.aten.gelu_backward(dy.mm(w2), a)
    if accumulate:
        out["w2"].addmm_(dy.t(), h)
        out["w1"].addmm_(da.t(), x)
    else:
        torch.mm(dy.t(), h, out=out["w2"])
        torch.mm(da.t(), x, out=out["w1"])
    return (da.mm(w1) if dx is None else torch.mm(da, w1, out=dx)), out


# An expert's [rows, d_ff] intermediates (about three of them at once in backward) are kept under
# this many bytes: an expert with more rows than that (a layer-major step gives each expert the
# tokens of many micro-batches) runs in chunks of rows, whose dW add up.
EXPERT_CHUNK_BYTES = 256 << 20


def expert_chunk_rows(d_ff: int, dtype: torch.dtype, multiple: int) -> int:
    """Rows an expert's GEMMs take at once (a multiple of the GEMM row multiple, so chunk shapes
    repeat too)."""
    rows = EXPERT_CHUNK_BYTES // (3 * d_ff * torch.empty((), dtype=dtype).element_size())
    multiple = max(1, multiple)
    return max(multiple, rows // multiple * multiple)


def chunks(start: int, n: int, rows: int):
    """(start, length) of the row chunks of an expert's `n` rows from `start`."""
    return [(start + c, min(rows, n - c)) for c in range(0, n, rows)]


def init_expert(seed: int, layer: int, expert: int, d_model: int, d_ff: int, std: float, n_layer: int):
    """The initial (w1, w2) of one expert in fp32, a pure function of (seed, layer, expert), so a
    store can be filled one record at a time and a resident bank gets the same numbers."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + expert + 1)
    w1 = torch.randn(d_ff, d_model, generator=g) * std
    w2 = torch.randn(d_model, d_ff, generator=g) * (std / math.sqrt(2 * n_layer))
    return w1, w2


# ---- the GEMM row layout ------------------------------------------------------------------

def expert_starts(counts: list[int]) -> list[int]:
    """The first row of each expert's tokens in the sorted order (counts[e] rows each)."""
    return list(itertools.accumulate(counts, initial=0))[:-1]


def gemm_row_layout(counts: list[int], multiple: int, device) -> tuple[list[int], torch.Tensor | None]:
    """Rows of the per-expert GEMMs: each expert's count rounded up to `multiple`, zero rows
    filling the gap, so the GEMM shapes repeat from step to step and cuBLAS finds them in its
    heuristics cache (on an H200 a bf16 GEMM of a new shape took ~600 us of host time, one it had
    seen ~30 us). Returns the padded counts and the padded row of every sorted token, or
    (counts, None) when `multiple` <= 1."""
    if multiple <= 1:
        return counts, None
    padded = [-(-c // multiple) * multiple for c in counts]
    n = sum(counts)
    shift = torch.tensor(expert_starts(padded)) - torch.tensor(expert_starts(counts))
    rows = torch.arange(n) + shift.repeat_interleave(torch.tensor(counts), output_size=n)
    if torch.device(device).type == "cuda":  # from pinned memory: a pageable copy would sync the stream
        rows = rows.pin_memory().to(device, non_blocking=True)
    return padded, rows


def to_gemm_rows(t: torch.Tensor, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """The sorted rows `t` moved to `rows` of a zeroed [n_rows, d] (as is without padding)."""
    return t if rows is None else t.new_zeros((n_rows, t.shape[1])).index_copy(0, rows, t)


def from_gemm_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


# ---- the banks ----------------------------------------------------------------------------

class ResidentExperts(nn.Module):
    """The reference expert bank: every expert is a pair of nn.Parameters on the model's device."""

    def __init__(self, cfg: ModelConfig, layer: int, seed: int, pad_rows: int = 0, experts: list[int] | None = None):
        """`experts`: which of the layer's experts this bank holds, in order (default: all; expert
        parallelism gives each rank its share, `gmtier.distributed`)."""
        super().__init__()
        self.pad_rows = pad_rows  # see gemm_row_layout
        self.w1 = nn.ParameterList()
        self.w2 = nn.ParameterList()
        for e in (range(cfg.n_experts) if experts is None else experts):
            w1, w2 = init_expert(seed, layer, e, cfg.d_model, cfg.d_ff, cfg.init_std, cfg.n_layer)
            self.w1.append(nn.Parameter(w1))
            self.w2.append(nn.Parameter(w2))

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted: the kept tokens sorted by expert; counts[e] tokens go to expert e."""
        counts_p, rows = gemm_row_layout(counts, self.pad_rows, x_sorted.device)
        outs = []
        for e, part in enumerate(torch.split(to_gemm_rows(x_sorted, rows, sum(counts_p)), counts_p)):
            if counts_p[e]:
                outs.append(expert_ffn(part, self.w1[e].to(part.dtype), self.w2[e].to(part.dtype)))
        return from_gemm_rows(torch.cat(outs), rows) if outs else x_sorted.new_zeros(x_sorted.shape)

    # The layer-major step (gmtier.layer_major) runs a layer's experts once over a whole step,
    # its rows in the GEMM layout already (counts multiples of `pad_rows`, zero rows between).
    def step_forward(self, x_sorted: torch.Tensor, counts: list[int]):
        """(outputs, what step_backward needs) without an autograd graph."""
        with torch.no_grad():
            return self(x_sorted, counts), None

    def step_backward(self, x_sorted, dy_sorted, counts, saved) -> torch.Tensor:
        """dx of the step's sorted tokens; dW accumulates into the parameters' .grad (forward is
        recomputed: the reference bank keeps no graph across the step)."""
        with torch.enable_grad():
            x = x_sorted.detach().requires_grad_()
            y = self(x, counts)
            torch.autograd.backward(y, dy_sorted.to(y.dtype))
        return x.grad


class TieredExperts(nn.Module):
    """The expert bank of one Switch layer when its experts live in the store."""

    def __init__(self, runtime, layer: int):
        super().__init__()
        self.runtime, self.layer = runtime, layer
        self.slot = runtime.switch_layers.index(layer)  # the store's layer index

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        self.runtime.observe(self.slot, counts)
        if torch.is_grad_enabled() and self.training:
            return ExpertLayerFn.apply(x_sorted, self.runtime, self.slot, counts)
        return self.runtime.forward(self.slot, x_sorted, counts)

    @property
    def pad_rows(self) -> int:
        return self.runtime.pad_rows

    def step_forward(self, x_sorted: torch.Tensor, counts: list[int]):
        """(outputs, what step_backward needs): each expert paged once for the step. The rows
        come in the GEMM layout already (counts multiples of `pad_rows`, zero rows between)."""
        self.runtime.observe(self.slot, counts)
        layout = (counts, None)
        return self.runtime.forward(self.slot, x_sorted, counts, layout), layout

    def step_backward(self, x_sorted, dy_sorted, counts, layout) -> torch.Tensor:
        """dx of the step's sorted tokens; each expert paged once, its AdamW run on its dW."""
        dx = self.runtime.backward(self.slot, x_sorted, dy_sorted, counts, layout)
        self.runtime.ahead_of_backward(self.slot - 1)  # the block's recompute and the dense blocks come first
        return dx


class ExpertLayerFn(torch.autograd.Function):
    """All experts of one Switch layer: saves only the sorted input; pages each expert once in
    forward and once in backward; the expert update happens in backward."""

    @staticmethod
    def forward(ctx, x_sorted, runtime, layer, counts):
        ctx.save_for_backward(x_sorted)
        # The GEMM row layout forward uses is the one backward needs: made once.
        layout = gemm_row_layout(counts, runtime.pad_rows, x_sorted.device)
        ctx.runtime, ctx.layer, ctx.counts, ctx.layout = runtime, layer, counts, layout
        return runtime.forward(layer, x_sorted, counts, layout)

    @staticmethod
    def backward(ctx, grad_out):
        (x_sorted,) = ctx.saved_tensors
        dx = ctx.runtime.backward(ctx.layer, x_sorted, grad_out, ctx.counts, ctx.layout)
        return dx, None, None, None
