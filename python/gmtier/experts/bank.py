"""Expert banks: what a Switch layer hands its sorted tokens to.

`ResidentExperts` keeps every expert as nn.Parameters (the reference); `TieredExperts` pages
them from the tiered store through the `ExpertRuntime`, inside `ExpertLayerFn` (the autograd
Function that saves only the layer's sorted input and updates the experts in backward). Both
compute `expert_ffn` on the same GEMM row layout, so they agree to floating point.

The experts' GEMMs run one of two ways (`experts.gemm`, resolved by `resolve_gemm`): a loop of
per-expert GEMMs (`expert_ffn`, runs everywhere), or grouped GEMMs (`grouped_ffn`: one
`torch._grouped_mm` per matrix for all the experts of a layer on the GPU, forward, dx and dW
alike) where the GPU and dtype have them. The resident bank then routes without a host sync
(`token_rows`: each token's GEMM row from a device cumsum of the counts).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gmtier.config import EXPERT_GEMMS as GEMM_CHOICES
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
    return padded, to_device(rows, device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on `device` without a host sync (CUDA: through pinned memory, as a
    pageable copy would wait for the stream)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def group_ends(counts, device) -> torch.Tensor:
    """The int32 cumulative ends of groups of `counts` rows (`torch._grouped_mm`'s offs) on `device`."""
    return to_device(torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32), device)


def to_gemm_rows(t: torch.Tensor, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """The sorted rows `t` moved to `rows` of a zeroed [n_rows, d] (as is without padding)."""
    return t if rows is None else t.new_zeros((n_rows, t.shape[1])).index_copy(0, rows, t)


def from_gemm_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


# ---- grouped expert GEMMs ----------------------------------------------------------------

def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def grouped_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor):
    """`expert_ffn` of many experts in two grouped GEMMs: x [R, d] holds the experts' rows one
    after another (expert g's are rows offs[g-1]:offs[g]; offs: int32 cumulative ends on x's
    device; an expert may have none), w1 [G, d_ff, d], w2 [G, d, d_ff]. Returns (y [R, d], and
    what backward needs: the pre-activation a and h = gelu(a), [R, d_ff]); rows from offs[-1]
    on are unspecified."""
    a = grouped_pre_activation(x, w1, offs)
    h = F.gelu(a)
    return _grouped_mm(h, w2.transpose(-2, -1), offs), a, h


def grouped_pre_activation(x: torch.Tensor, w1: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x w1^T of each expert's rows (what `grouped_ffn` calls a)."""
    return _grouped_mm(x, w1.transpose(-2, -1), offs)


def grouped_ffn_dx(x, a, w1, w2, dy, offs, h=None):
    """dx of `grouped_ffn` (rows from offs[-1] on unspecified), with h = gelu(a) (computed
    here unless given) and d(loss)/da for `grouped_ffn_dw`: (dx, h, da)."""
    da = torch.ops.aten.gelu_backward(_grouped_mm(dy, w2, offs), a)
    return _grouped_mm(da, w1, offs), F.gelu(a) if h is None else h, da


def grouped_ffn_dw(x, h, da, dy, offs, out_dtype: torch.dtype | None = None):
    """(dW1 [G, d_ff, d], dW2 [G, d, d_ff]) of groups of rows 0..offs[-1] of x [R, d], h and da
    [R, d_ff], dy [R, d], in `out_dtype` (default x's: where the GEMM can write fp32 from bf16
    inputs it does, else they are converted). The groups here must all have rows: callers
    leave the empty ones out (a K-grouped GEMM of an empty group is not defined on every
    version)."""
    out_dtype = out_dtype or x.dtype
    if out_dtype != x.dtype and _writes_dtype(x.device.type, x.dtype, out_dtype):
        return (torch._grouped_mm(da.t(), x, offs=offs, out_dtype=out_dtype),
                torch._grouped_mm(dy.t(), h, offs=offs, out_dtype=out_dtype))
    return _grouped_mm(da.t(), x, offs).to(out_dtype), _grouped_mm(dy.t(), h, offs).to(out_dtype)


@functools.lru_cache(maxsize=None)
def _writes_dtype(device_type: str, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` takes `out_dtype` here (bf16 in, fp32 out: the dW straight
    into the parameters' dtype, without a conversion pass over them) and gets the converted
    product's numbers."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, generator=g).to(device_type, dtype) for shape in ((32, 48), (48, 16)))
    offs = torch.tensor([16, 48], dtype=torch.int32, device=device_type)
    try:
        got = torch._grouped_mm(a, b, offs=offs, out_dtype=out_dtype)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    want = _grouped_mm(a, b, offs).to(out_dtype)
    return got.dtype == out_dtype and bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))


class HostCopy:
    """A small device tensor (or a list) in host memory without a host sync: the copy goes to
    pinned memory on the current stream, and `tolist()` waits for that copy only (by the time
    backward or the end of the step asks, it finished long ago)."""

    def __init__(self, values):
        self._list, self._event = None, None
        if not isinstance(values, torch.Tensor):
            self._list = list(values)
        elif values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values

    def tolist(self) -> list:
        if self._list is None:
            if self._event is not None:
                self._event.synchronize()
            self._list = self._host.tolist()
        return self._list


@dataclass
class TokenRows:
    """Each token's row in the grouped GEMMs' input, made on the device (`token_rows`)."""
    rows: torch.Tensor  # [T] long: the row of each kept token; dropped tokens: the spare last row
    keep: torch.Tensor  # [T] bool
    offs: torch.Tensor  # [n_experts] int32: the end of each expert's (padded) rows
    kept: torch.Tensor  # [n_experts] long: kept tokens per expert, on the device
    counts: HostCopy | None  # the same on its way to the host (None: not asked for, see token_rows)
    n_rows: int  # rows of the GEMM input: at least every expert's padded rows, + the spare row
    multiple: int  # each expert's rows are its count rounded up to this

    def padded_counts(self) -> list[int]:
        m = self.multiple
        return [-(-c // m) * m for c in self.counts.tolist()]


def token_rows(expert: torch.Tensor, rank: torch.Tensor, keep: torch.Tensor, n_experts: int, max_kept: int,
               multiple: int, to_host: bool = True) -> TokenRows:
    """The GEMM row layout of `gemm_row_layout` (each expert's kept tokens in token order, its
    count rounded up to `multiple`) without the counts on the host: `rank` is each token's place
    in its expert's queue (route's), `max_kept` a bound of the kept tokens (sizes the input).
    `to_host`: start the counts' copy to the host (not inside a CUDA graph capture: the caller
    copies `kept` after the replay)."""
    m = max(1, multiple)
    counts = torch.zeros(n_experts, dtype=torch.long, device=expert.device).scatter_add_(0, expert, keep.long())
    padded = (counts + (m - 1)) // m * m
    ends = padded.cumsum(0)
    n_rows = max_kept + n_experts * (m - 1) + 1
    rows = torch.where(keep, (ends - padded)[expert] + rank, n_rows - 1)
    return TokenRows(rows, keep, ends.to(torch.int32), counts, HostCopy(counts) if to_host else None, n_rows, m)


def _copy_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst[rows] = src, row by row, in place. Through 8-byte views where a row is a whole number of
    them: index_copy moves one element at a time, so a bf16 row takes four times the element
    moves (its CUDA kernel took 0.53 ms of the resident `small` step on an H200)."""
    if dst.shape[1] * dst.element_size() % 8 == 0 and dst.is_contiguous() and src.is_contiguous():
        dst.view(torch.int64).index_copy_(0, rows, src.view(torch.int64))
    else:
        dst.index_copy_(0, rows, src)
    return dst


class _ToTokenRows(torch.autograd.Function):
    """h [T, d] as the GEMM input [n_rows, d]: each kept token at its row, zeros in the experts'
    padding rows. The dropped tokens all land on the spare last row, which no expert's rows
    include (so whatever it holds reaches nothing); their gradient is zero."""

    @staticmethod
    def forward(ctx, h, rows, keep, n_rows: int):
        ctx.save_for_backward(rows, keep)
        return _copy_rows(h.new_zeros((n_rows, h.shape[1])), rows, h.contiguous())

    @staticmethod
    def backward(ctx, g):
        rows, keep = ctx.saved_tensors
        return torch.where(keep.unsqueeze(1), g.index_select(0, rows), 0), None, None, None


def to_token_rows(h: torch.Tensor, t: TokenRows) -> torch.Tensor:
    """h [T, d] as the GEMM input [n_rows, d] laid out by `t` (see _ToTokenRows)."""
    return _ToTokenRows.apply(h, t.rows, t.keep, t.n_rows)


class _GatedTokens(torch.autograd.Function):
    """y [n_rows, d] (the GEMM output, rows as `TokenRows` lays them out) back to the tokens,
    each times its gate (0 for the dropped tokens): [T, d] in the gate's dtype. Its backward
    puts the tokens' gradients back on their rows with one index_copy: each kept token has a
    row of its own, the dropped ones all write zeros to the spare row (index_select's own
    backward would index_add, with atomics, ~5x the time on an H200)."""

    @staticmethod
    def forward(ctx, y, rows, gate_kept):
        # The dropped tokens read row 0 (the spare row is unspecified and may hold NaN; any row
        # of a kept token is finite) and are multiplied by their gate of 0.
        y_tok = y.index_select(0, torch.where(gate_kept != 0, rows, 0))
        ctx.save_for_backward(y_tok, rows, gate_kept)
        ctx.n_rows = y.shape[0]
        return y_tok * gate_kept.unsqueeze(1)

    @staticmethod
    def backward(ctx, g):
        y_tok, rows, gate_kept = ctx.saved_tensors
        dy = _copy_rows(g.new_zeros((ctx.n_rows, g.shape[1]), dtype=y_tok.dtype), rows,
                        (g * gate_kept.unsqueeze(1)).to(y_tok.dtype).contiguous())
        d_gate = (g * y_tok).sum(1) if ctx.needs_input_grad[2] else None
        return dy, None, d_gate


def from_token_rows(y: torch.Tensor, t: TokenRows, gate: torch.Tensor) -> torch.Tensor:
    """The GEMM output back to the tokens [T, d], each times its `gate` [T]; zero for the
    dropped ones. In the dtype of y and gate promoted (fp32 for a bf16 GEMM and an fp32 gate)."""
    return _GatedTokens.apply(y, t.rows, torch.where(t.keep, gate, 0))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' GEMMs run in for input x: autocast's where it is on, else x's."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def _side_by_side(ts) -> bool:
    """Whether equal contiguous tensors lie one after another in one storage."""
    t0, n = ts[0], ts[0].numel()
    return all(
        t.is_contiguous() and t.shape == t0.shape and t.dtype == t0.dtype and t.device == t0.device
        and t.untyped_storage().data_ptr() == t0.untyped_storage().data_ptr()
        and t.storage_offset() == t0.storage_offset() + i * n for i, t in enumerate(ts))


def stacked(ts) -> torch.Tensor:
    """Equal tensors as one [n, ...] tensor: a view where they lie side by side in one storage
    (as `ResidentExperts` lays its parameters out), else a copy."""
    ts = [t.detach() for t in ts]
    if _side_by_side(ts):
        t0 = ts[0]
        return t0.as_strided((len(ts), *t0.shape), (t0.numel(), *t0.stride()), t0.storage_offset())
    return torch.stack(ts)


GEMM_FALLBACKS: dict[tuple, str] = {}  # (setting, device, dtype) -> why grouped GEMMs were not used


def _fast_grouped(device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int) -> bool:
    """Whether torch has a grouped GEMM kernel here (sm90 / sm100, bf16, 16-byte strides): else
    `torch._grouped_mm` is a loop of GEMMs with a host sync, and our own loop is better."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return ((major, minor) == (9, 0) or major == 10) and d_model % 8 == 0 and d_ff % 8 == 0


def _grouped_problem(device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int) -> str | None:
    """None where grouped GEMMs of these shapes run here and give the loop's numbers (a few small
    problems, an empty expert among them, at both of torch's tile sizes), else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    g = torch.Generator().manual_seed(0)
    try:
        for counts in ([16, 0, 24], [256, 0, 320]):
            rows, used = sum(counts), [e for e, c in enumerate(counts) if c]
            x, dy = torch.randn(rows, d_model, generator=g), torch.randn(rows, d_model, generator=g)
            w1 = torch.randn(len(counts), d_ff, d_model, generator=g) / math.sqrt(d_model)
            w2 = torch.randn(len(counts), d_model, d_ff, generator=g) / math.sqrt(d_ff)
            x, dy, w1, w2 = (t.to(device, dtype) for t in (x, dy, w1, w2))
            offs = group_ends(counts, device)
            y, a, _ = grouped_ffn(x, w1, w2, offs)
            dx, h, da = grouped_ffn_dx(x, a, w1, w2, dy, offs)
            dw1, dw2 = grouped_ffn_dw(x, h, da, dy, group_ends([counts[e] for e in used], device))
            ref_y, ref_dx = torch.empty(rows, d_model), torch.empty(rows, d_model)
            got, want = [y, dx], [ref_y, ref_dx]
            for i, (e, s) in enumerate((e, expert_starts(counts)[e]) for e in used):
                n = counts[e]
                xe, w1e, w2e, dye = (t.float().cpu() for t in (x[s:s + n], w1[e], w2[e], dy[s:s + n]))
                ref_y[s:s + n] = expert_ffn(xe, w1e, w2e)
                ref_dx[s:s + n], dw = expert_ffn_backward(xe, w1e, w2e, dye)
                got += [dw1[i], dw2[i]]
                want += [dw["w1"], dw["w2"]]
            for name, a_, b_ in zip(["y", "dx"] + ["dW1", "dW2"] * len(used), got, want):
                err = ((a_.float().cpu() - b_).abs().max() / b_.abs().max().clamp_min(1e-6)).item()
                if not err <= tol:
                    return f"{name} differs from the per-expert loop's by {err:.1e} of its largest value"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001  (whatever the op raises, the loop runs instead)
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


@functools.lru_cache(maxsize=None)
def resolve_gemm(setting: str, device: str, dtype: torch.dtype, d_model: int, d_ff: int) -> str:
    """How the expert GEMMs run: "grouped" or "loop". `setting` is experts.gemm: "loop"; "auto"
    (grouped where torch has a grouped kernel: sm90/sm100 GPUs in bf16); "grouped" (wherever
    torch._grouped_mm exists, e.g. on the CPU, where torch runs it as a loop). Grouped GEMMs are
    tried on small problems first: where they raise or differ from the loop, the loop runs and
    a RuntimeWarning says why (`GEMM_FALLBACKS` keeps it); a run never dies of it."""
    if setting not in GEMM_CHOICES:
        raise ValueError(f"experts.gemm = {setting!r}: choose one of {', '.join(map(repr, GEMM_CHOICES))}")
    dev = torch.device(device)
    if setting == "loop" or (setting == "auto" and not _fast_grouped(dev, dtype, d_model, d_ff)):
        return "loop"
    why = _grouped_problem(dev, dtype, d_model, d_ff)
    if why is None:
        return "grouped"
    GEMM_FALLBACKS[(setting, str(dev), dtype)] = why
    warnings.warn(f"experts.gemm = {setting!r}: grouped expert GEMMs failed their first use on {dev} in "
                  f"{str(dtype).removeprefix('torch.')} ({why}); the per-expert loop runs instead",
                  RuntimeWarning, stacklevel=2)
    return "loop"


@functools.lru_cache(maxsize=None)
def _empty_groups_are_zero(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a K-grouped `torch._grouped_mm` (the dW GEMMs) writes zeros for a group of no
    rows here (not so on every version). Its output block is first filled with NaN and freed,
    so that a kernel that skips the group leaves NaN where the allocator hands the block back."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, generator=g).to(device_type, dtype) for shape in ((32, 48), (48, 16)))
    offs = torch.tensor([16, 16, 48], dtype=torch.int32, device=device_type)  # group 1 has no rows
    try:
        for _ in range(2):
            torch.full((3, 32, 16), float("nan"), device=device_type, dtype=dtype)
            got = _grouped_mm(a, b, offs)
            if not (torch.equal(got[1], torch.zeros_like(got[1])) and bool(torch.isfinite(got).all())):
                return False
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


class GroupedExpertsFn(torch.autograd.Function):
    """All experts of a resident bank in grouped GEMMs over rows `x` (grouped as `offs` says),
    its weights the bank's parameters. The experts without rows get no gradient, as in the loop,
    so their AdamW skips them: `counts()` gives each expert's rows on the host (a `HostCopy`'s
    where routing ran on the device). Where the dW GEMMs write zeros for an empty
    group, backward computes every expert's dW and reads the counts only at the end of the
    backward pass, to take the empty experts' gradients back (`_drop_empty_grads`): a host
    wait in the middle of backward would drain the GPU's queue of launched work, and the rest of
    backward would run at the pace of the host's launches. `counts` a list (the rows already on
    the host): the dW of the experts with rows only, so that several calls in one backward pass
    (expert parallelism's groups of experts) each leave the others' gradients alone. `counts`
    None (a CUDA graph's capture, `gmtier.experts.graphed`, where only that probe's answer lets
    it): every expert's dW, zeros for the empty ones, which the caller takes back."""

    @staticmethod
    def forward(ctx, x, offs, counts, dtype, n_experts: int, *weights):
        with torch.autocast(x.device.type, enabled=False):
            w1 = stacked(weights[:n_experts]).to(dtype)
            w2 = stacked(weights[n_experts:]).to(dtype)
            xc = x.to(dtype)
            y, a, h = grouped_ffn(xc, w1, w2, offs)
        ctx.save_for_backward(xc, a, h, w1, w2, offs)
        ctx.counts, ctx.n_experts, ctx.in_dtype, ctx.w_dtype = counts, n_experts, x.dtype, weights[0].dtype
        ctx.weights = weights
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, h, w1, w2, offs = ctx.saved_tensors
        E = ctx.n_experts
        dy = dy.to(x.dtype).contiguous()
        dx, h, da = grouped_ffn_dx(x, a, w1, w2, dy, offs, h)
        grads = [None] * (2 * E)
        if any(ctx.needs_input_grad[5:]):
            if ctx.counts is None:
                dw1, dw2 = grouped_ffn_dw(x, h, da, dy, offs, ctx.w_dtype)
                grads = [*dw1.unbind(), *dw2.unbind()]
            elif callable(ctx.counts) and _empty_groups_are_zero(x.device.type, x.dtype):
                dw1, dw2 = grouped_ffn_dw(x, h, da, dy, offs, ctx.w_dtype)
                grads = [*dw1.unbind(), *dw2.unbind()]
                had_grad = [w.grad is not None for w in ctx.weights]
                torch.autograd.Variable._execution_engine.queue_callback(
                    functools.partial(_drop_empty_grads, ctx.weights, had_grad, ctx.counts, E))
            else:
                counts = ctx.counts() if callable(ctx.counts) else ctx.counts
                used = [e for e, c in enumerate(counts) if c]
                if used:
                    dw1, dw2 = grouped_ffn_dw(x, h, da, dy, group_ends([counts[e] for e in used], x.device), ctx.w_dtype)
                    for i, e in enumerate(used):
                        grads[e], grads[E + e] = dw1[i], dw2[i]
        return (dx.to(ctx.in_dtype), None, None, None, None, *grads)


def _drop_empty_grads(weights, had_grad: list[bool], counts, n_experts: int) -> None:
    """At the end of a backward pass: the experts that had no rows lose the zero gradient that
    pass gave them (those with a gradient from an earlier pass keep it, unchanged by the zero)."""
    for e, c in enumerate(counts()):
        if not c:
            for w, had in ((weights[e], had_grad[e]), (weights[n_experts + e], had_grad[n_experts + e])):
                if not had:
                    w.grad = None


# ---- the banks ----------------------------------------------------------------------------

class ResidentExperts(nn.Module):
    """The reference expert bank: every expert is a pair of nn.Parameters on the model's device
    (each weight's experts side by side in one tensor, so grouped GEMMs take them as they are).
    `gemm`: experts.gemm (see `resolve_gemm`)."""

    def __init__(self, cfg: ModelConfig, layer: int, seed: int, pad_rows: int = 0, gemm: str = "auto",
                 experts: list[int] | None = None):
        """`experts`: which of the layer's experts this bank holds, in order (default: all; expert
        parallelism gives each rank its share, `gmtier.distributed`)."""
        super().__init__()
        if gemm not in GEMM_CHOICES:
            raise ValueError(f"experts.gemm = {gemm!r}: choose one of {', '.join(map(repr, GEMM_CHOICES))}")
        self.pad_rows = pad_rows  # see gemm_row_layout
        self.gemm, self.d_model, self.d_ff = gemm, cfg.d_model, cfg.d_ff
        self.gemm_used: str | None = None  # how the last forward ran its GEMMs: "grouped" or "loop"
        self.w1 = nn.ParameterList()
        self.w2 = nn.ParameterList()
        for e in (range(cfg.n_experts) if experts is None else experts):
            w1, w2 = init_expert(seed, layer, e, cfg.d_model, cfg.d_ff, cfg.init_std, cfg.n_layer)
            self.w1.append(nn.Parameter(w1))
            self.w2.append(nn.Parameter(w2))
        self._lay_out()

    def _lay_out(self) -> None:
        """Each weight's experts as views of one [n_experts, ...] tensor (after init and after
        every move: `.to(device)` gives each parameter a tensor of its own)."""
        with torch.no_grad():
            for params in (self.w1, self.w2):
                if len(params) and not _side_by_side(list(params)):
                    flat = torch.stack([p.data for p in params])
                    for p, view in zip(params, flat):
                        p.data = view
        # Indexing a ParameterList costs microseconds of Python an item: a step reads them from here.
        self._weights = [*self.w1, *self.w2]

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._lay_out()
        return out

    def _mode(self, x: torch.Tensor) -> str:
        self.gemm_used = resolve_gemm(self.gemm, str(x.device), compute_dtype(x), self.d_model, self.d_ff)
        return self.gemm_used

    def takes_device_routing(self, x: torch.Tensor) -> bool:
        """Whether the Switch layer should hand over its routing as it is on the device
        (`forward_tokens`, no host sync) rather than sorted tokens and host counts."""
        return self._mode(x) == "grouped"

    def _grouped(self, x: torch.Tensor, offs: torch.Tensor, counts) -> torch.Tensor:
        """The grouped GEMMs in x's dtype (the compute dtype already)."""
        return GroupedExpertsFn.apply(x, offs, counts, x.dtype, len(self.w1), *self._weights)

    def forward_tokens(self, h: torch.Tensor, t: TokenRows, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The experts' outputs for every token of h [T, d], each times its `gate` (zero for the
        dropped ones), routed by `t`, their GEMMs in `dtype`. Without `t.counts` on their way to
        the host, the experts without tokens get zero gradients (see GroupedExpertsFn)."""
        x = to_token_rows(h.to(dtype), t)
        return from_token_rows(self._grouped(x, t.offs, t.padded_counts if t.counts is not None else None), t, gate)

    def weights(self) -> list[nn.Parameter]:
        """Every expert's w1, then every expert's w2."""
        return self._weights

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted: the kept tokens sorted by expert; counts[e] tokens go to expert e."""
        counts_p, rows = gemm_row_layout(counts, self.pad_rows, x_sorted.device)
        xs = to_gemm_rows(x_sorted, rows, sum(counts_p))
        if self._mode(x_sorted) == "grouped" and sum(counts_p):
            y = self._grouped(xs.to(compute_dtype(x_sorted)), group_ends(counts_p, xs.device), counts_p)
            return from_gemm_rows(y, rows)
        outs = []
        for e, part in enumerate(torch.split(xs, counts_p)):
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

    @property
    def gemm_used(self) -> str:
        return self.runtime.gemm

    def takes_device_routing(self, x: torch.Tensor) -> bool:
        return False  # the paging loop needs each expert's count on the host

    def step_forward(self, x_sorted: torch.Tensor, counts: list[int]):
        """(outputs, what step_backward needs): each expert paged once for the step. The rows
        come in the GEMM layout already (counts multiples of `pad_rows`, zero rows between)."""
        self.runtime.observe(self.slot, counts)
        layout = (counts, None)
        return self.runtime.forward(self.slot, x_sorted, counts, layout, training=True), layout

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
        return runtime.forward(layer, x_sorted, counts, layout, training=True)

    @staticmethod
    def backward(ctx, grad_out):
        (x_sorted,) = ctx.saved_tensors
        dx = ctx.runtime.backward(ctx.layer, x_sorted, grad_out, ctx.counts, ctx.layout)
        return dx, None, None, None
