"""Fused multi-threaded SIMD CPU AdamW (the Rust kernel in `gmtier._core`).

One pass per chunk of every tensor: gradient (fp32/bf16/fp16) -> AdamW update of the fp32 master
weight and both moments -> optional bf16/fp16 copy of the new weight (round to nearest even),
with the math and operation order of ``torch.optim.AdamW``. The GIL is released while it runs.

The ways in:

* :func:`adamw_step` on raw tensors: ``AdamTensors(master, exp_avg, exp_avg_sq, grad, step,
  half=None)``, ``step`` being the int64[1] step counter (incremented once per call, only for
  tensors passed; tensors of one expert may share it). ``async_=True`` returns an
  :class:`AdamHandle` so GPU work continues.
* :func:`adamw_record` on one expert's record (the names of `gmtier.record`), and for the store's
  RAM slots, whose memory is fixed, specs validated once (:class:`RecordSpecCache`) stepped by
  :func:`adamw_raw_groups` (one call for several experts; :func:`adamw_raw` for one).
* ``gmtier.optim.HostAdamW`` / ``CpuAdamW``, the ``torch.optim.Optimizer`` over this kernel.

Loss scaling and clipping: pass ``grad_scale`` (the fp16 loss scale; gradients are multiplied by
``1 / grad_scale`` in the pass) and ``clip_coef`` (from :func:`clip_coef`, which computes the
global norm with :func:`grad_sumsq`). ``check_finite=True`` first scans the gradients and skips
the whole step, writing nothing, when any is inf/NaN; a caller that already computed the global
norm knows that (``math.isfinite(norm)``) and can leave it off.
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch

from gmtier import _core, dtypes, record

__all__ = [
    "AdamTensors",
    "AdamHandle",
    "adamw_step",
    "adamw_record",
    "record_tensors",
    "grad_sumsq",
    "clip_coef",
    "simd_available",
    "simd_best",
    "memory_bandwidth",
]

_GRAD_DTYPES = dtypes.KERNEL  # torch dtype -> the kernel's name of it
_HALF_DTYPES = {dt: dtypes.KERNEL[dt] for dt in dtypes.HALF}
SIMD_CHOICES = ("auto", "avx512", "avx2", "scalar")


def simd_available() -> list[str]:
    """SIMD paths this CPU can run, fastest first (``"scalar"`` always)."""
    return list(_core.adam_simd_available())


def simd_best() -> str:
    """The path ``simd="auto"`` uses."""
    return _core.adam_simd_best()


def memory_bandwidth(nbytes: int = 1 << 30, threads: int | None = None, repeats: int = 5) -> dict:
    """Multi-threaded copy / triad bandwidth (GB/s, bytes read + written) over ``nbytes`` arrays."""
    return dict(_core.memory_bandwidth(int(nbytes), _threads(threads), int(repeats)))


class AdamTensors(NamedTuple):
    """One tensor's AdamW state and gradient (all CPU, contiguous, same numel)."""

    master: torch.Tensor  # fp32, updated in place
    exp_avg: torch.Tensor  # fp32
    exp_avg_sq: torch.Tensor  # fp32
    grad: torch.Tensor  # fp32, bf16 or fp16 (read only)
    step: torch.Tensor  # int64, one element; may be shared by the tensors of one expert
    half: torch.Tensor | None = None  # bf16 or fp16: receives the rounded new weight


def _threads(threads: int | None) -> int:
    if threads is None:
        return 0
    threads = int(threads)
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 or None = all CPUs), got {threads}")
    return threads


def _simd(simd: str) -> str:
    if simd not in SIMD_CHOICES:
        raise ValueError(f"simd must be one of {SIMD_CHOICES}, got {simd!r}")
    if simd != "auto" and simd not in simd_available():
        raise RuntimeError(
            f"simd path {simd!r} is not available on this CPU (available: {', '.join(simd_available())})"
        )
    return simd


def _check_tensor(t: Any, what: str, dtypes: dict, numel: int | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what}: must be on the CPU, is on {t.device}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{what}: dtype {str(t.dtype).replace('torch.', '')} not supported ({names})")
    if not t.is_contiguous():
        raise ValueError(f"{what}: must be contiguous (call .contiguous() or pass a flat view)")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{what}: has {t.numel()} elements, the master weight has {numel}")


def _as_named(item: Any, i: int, cls: type, signature: str):
    """`item` as the NamedTuple `cls` (given as one, a dict, or a tuple of its fields with or
    without the defaulted ones); `signature` names the fields in the error."""
    if isinstance(item, cls):
        return item
    if isinstance(item, dict):
        try:
            return cls(**item)
        except TypeError as e:
            raise TypeError(f"tensors[{i}]: {e}") from None
    n_all = len(cls._fields)
    n_required = n_all - len(cls._field_defaults)
    if isinstance(item, (tuple, list)) and n_required <= len(item) <= n_all:
        return cls(*item)
    raise TypeError(f"tensors[{i}]: expected {signature}, a dict or a {n_required}/{n_all}-tuple, "
                    f"got {type(item).__name__}")


def _as_tensors(item: Any, i: int) -> AdamTensors:
    return _as_named(item, i, AdamTensors, "AdamTensors(master, exp_avg, exp_avg_sq, grad, step, half=None)")


def _specs(tensors: Iterable[Any]) -> tuple[list[tuple], list[AdamTensors]]:
    specs, items = [], []
    spans = []  # (start, end, label, writable) for the overlap check
    for i, item in enumerate(tensors):
        t = _as_tensors(item, i)
        _check_tensor(t.master, f"tensors[{i}].master", {torch.float32: 0}, None)
        n = t.master.numel()
        _check_tensor(t.exp_avg, f"tensors[{i}].exp_avg", {torch.float32: 0}, n)
        _check_tensor(t.exp_avg_sq, f"tensors[{i}].exp_avg_sq", {torch.float32: 0}, n)
        _check_tensor(t.grad, f"tensors[{i}].grad", _GRAD_DTYPES, n)
        _check_tensor(t.step, f"tensors[{i}].step", {torch.int64: 0}, 1)
        if t.half is not None:
            _check_tensor(t.half, f"tensors[{i}].half", _HALF_DTYPES, n)
        if n:
            for name in ("master", "exp_avg", "exp_avg_sq", "grad", "half"):
                x = getattr(t, name)
                if x is not None:
                    start = x.data_ptr()
                    spans.append((start, start + x.numel() * x.element_size(), f"tensors[{i}].{name}", name != "grad"))
        specs.append(
            (
                t.master.data_ptr(),
                t.exp_avg.data_ptr(),
                t.exp_avg_sq.data_ptr(),
                t.grad.data_ptr(),
                _GRAD_DTYPES[t.grad.dtype],
                0 if t.half is None else t.half.data_ptr(),
                "" if t.half is None else _HALF_DTYPES[t.half.dtype],
                n,
                t.step.data_ptr(),
            )
        )
        items.append(t)
    spans.sort()
    for (s0, e0, a, w0), (s1, e1, b, w1) in zip(spans, spans[1:]):
        if s1 < e0 and (w0 or w1):
            raise ValueError(f"{a} and {b} overlap in memory; every written array must be separate")
    return specs, items


class AdamHandle:
    """A step running on the Adam thread pool. Keep the tensors untouched until :meth:`wait`."""

    def __init__(self, jobs: list, keep: list) -> None:
        self._jobs = jobs
        self._keep = keep  # the tensors, alive until the step finished
        self._skipped: bool | None = None

    def done(self) -> bool:
        """Whether the step finished (never blocks)."""
        return self._skipped is not None or all(j.done() for j in self._jobs)

    def wait(self) -> bool:
        """Block (GIL released) until the step finished; returns True when it was skipped."""
        if self._skipped is None:
            skipped = False
            for j in self._jobs:
                skipped |= bool(j.wait())
            self._skipped = skipped
            self._keep = []
        return self._skipped

    @property
    def skipped(self) -> bool:
        return self.wait()

    def __del__(self) -> None:
        # Dropped without wait(): the kernel may still be writing into the tensors this handle
        # keeps alive, so finish it before they can be freed.
        if self._skipped is None and self._keep:
            try:
                self.wait()
            except Exception:
                pass


def adamw_step(
    tensors: Sequence[Any],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    grad_scale: float = 1.0,
    clip_coef: float = 1.0,
    check_finite: bool = False,
    simd: str = "auto",
    threads: int | None = None,
    async_: bool = False,
) -> bool | AdamHandle:
    """One fused AdamW step over ``tensors`` (a list of :class:`AdamTensors`, dicts or tuples).

    Returns True when the step was skipped (``check_finite`` found an inf/NaN gradient; nothing
    was written, step counters included), False otherwise; with ``async_=True`` an
    :class:`AdamHandle` whose ``wait()`` returns that flag.
    """
    specs, items = _specs(tensors)
    if async_:
        args = _raw_args(specs, lr, betas, eps, weight_decay, grad_scale, clip_coef, check_finite, simd, threads)
        return AdamHandle([_core.adamw_step_raw_async(*args)], items)
    return adamw_raw(specs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale,
                     clip_coef=clip_coef, check_finite=check_finite, simd=simd, threads=threads)


def _raw_args(specs, lr, betas, eps, weight_decay, grad_scale, clip_coef, check_finite, simd, threads) -> tuple:
    beta1, beta2 = (float(b) for b in betas)
    return (specs, float(lr), beta1, beta2, float(eps), float(weight_decay), float(grad_scale),
            float(clip_coef), bool(check_finite), _simd(simd), _threads(threads))


class RecordSpecCache:
    """Validated raw specs of `record_tensors(rec, grads)`, kept per (RAM slot, gradient
    buffers): the store's slots and its dW buffers are fixed memory, so the checks of
    :func:`_specs` (dtypes, sizes, contiguity, overlap; ~100 µs of Python under the GIL that
    the update threads would otherwise pay per update) run once per pair. A gradient buffer is
    known by address, dtype, size and contiguity, so freed and reused memory of another shape
    gets its own entry; the cache is cleared when it grows past `max_entries`."""

    def __init__(self, max_entries: int = 8192) -> None:
        self.max_entries = max_entries
        self._specs: dict = {}
        self._lock = threading.Lock()

    def specs(self, slot: int, rec: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> list[tuple]:
        key = (slot, tuple((n, g.data_ptr(), g.dtype, g.numel(), g.device.type, g.is_contiguous())
                           for n, g in grads.items()))
        specs = self._specs.get(key)
        if specs is None:
            specs = _specs(record_tensors(rec, grads))[0]
            with self._lock:
                if len(self._specs) >= self.max_entries:
                    self._specs.clear()
                self._specs[key] = specs
        return specs


def adamw_raw(specs: list[tuple], *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 1e-2, grad_scale: float = 1.0, clip_coef: float = 1.0,
              check_finite: bool = False, simd: str = "auto", threads: int | None = None) -> bool:
    """:func:`adamw_step` on specs already validated (`RecordSpecCache.specs`); the caller keeps
    the tensors alive and untouched until it returns. Returns True when skipped."""
    return adamw_raw_groups([specs], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale,
                            clip_coef=clip_coef, check_finite=check_finite, simd=simd, threads=threads)[0]


def adamw_raw_groups(groups: list[list[tuple]], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8, weight_decay: float = 1e-2, grad_scale: float = 1.0, clip_coef: float = 1.0,
                     check_finite: bool = False, simd: str = "auto", threads: int | None = None) -> list[bool]:
    """:func:`adamw_raw` of several groups of specs (one per expert) in one call and one
    parallel pass, each group skipped on its own for an inf/NaN gradient; returns whether each
    was skipped."""
    ends = list(itertools.accumulate(len(g) for g in groups))
    specs, *rest = _raw_args([s for g in groups for s in g], lr, betas, eps, weight_decay, grad_scale, clip_coef,
                             check_finite, simd, threads)
    return list(_core.adamw_step_groups_raw(specs, ends, *rest))


def record_tensors(rec: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> list[AdamTensors]:
    """:class:`AdamTensors` for an expert record (the store's schema): for each gradient name
    ``n``, ``rec[f"{n}.master"]`` (fp32; absent when ``rec[n]`` itself is the fp32 weight),
    ``rec[f"{n}.exp_avg"]``, ``rec[f"{n}.exp_avg_sq"]``, the shared ``rec["step"]``, and
    ``rec[n]`` as the half copy when it is bf16/fp16. Flat views, so shapes need not match."""
    out = []
    for n, g in grads.items():
        m, v = record.exp_avg(n), record.exp_avg_sq(n)
        for need in (m, v, record.STEP):
            if need not in rec:
                raise KeyError(f"record has no {need!r} (tensors: {', '.join(rec)})")
        w = rec.get(n)
        master = rec.get(record.master(n))
        half = None
        if master is None:
            if w is None or w.dtype != torch.float32:
                raise KeyError(f"record has no fp32 master for {n!r} ({record.master(n)!r} absent, {n!r} not fp32)")
            master = w
        elif w is not None:
            if w.dtype not in _HALF_DTYPES:
                raise TypeError(f"record tensor {n!r}: dtype {w.dtype} is neither bf16 nor fp16")
            half = w.reshape(-1)
        out.append(AdamTensors(master.reshape(-1), rec[m].reshape(-1), rec[v].reshape(-1), g.reshape(-1),
                               rec[record.STEP].reshape(-1), half))
    return out


def adamw_record(
    rec: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    clip_coef: float = 1.0,
    check_finite: bool = True,
    simd: str = "auto",
    threads: int | None = None,
    async_: bool = False,
) -> bool | AdamHandle:
    """AdamW on one expert's record in place (see :func:`record_tensors`): one fused pass per
    tensor, the expert's step incremented once. Returns True when skipped (inf/NaN gradient),
    or an :class:`AdamHandle` with ``async_=True``."""
    return adamw_step(record_tensors(rec, grads), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                      grad_scale=grad_scale, clip_coef=clip_coef, check_finite=check_finite, simd=simd,
                      threads=threads, async_=async_)


def grad_sumsq(
    grads: Iterable[torch.Tensor],
    *,
    grad_scale: float = 1.0,
    simd: str = "auto",
    threads: int | None = None,
) -> tuple[float, bool]:
    """Sum of squares of all gradients divided by ``grad_scale**2`` (float64 accumulation of
    fp32 partial sums), and whether all elements are finite. One multi-threaded read pass."""
    raw, keep = [], []
    for i, g in enumerate(grads):
        _check_tensor(g, f"grads[{i}]", _GRAD_DTYPES, None)
        raw.append((g.data_ptr(), _GRAD_DTYPES[g.dtype], g.numel()))
        keep.append(g)
    s, nonfinite = _core.grad_sumsq_raw(raw, _simd(simd), _threads(threads))
    return float(s) / (float(grad_scale) ** 2), not nonfinite


def clip_coef(
    grads: Iterable[torch.Tensor],
    max_norm: float,
    *,
    grad_scale: float = 1.0,
    extra_sumsq: float = 0.0,
    simd: str = "auto",
    threads: int | None = None,
) -> tuple[float, float]:
    """``(clip_coef, total_norm)`` as ``torch.nn.utils.clip_grad_norm_`` computes them
    (``min(1, max_norm / (norm + 1e-6))``), over these gradients plus ``extra_sumsq`` (e.g. the
    dense part's squared norm from the GPU). A non-finite norm gives ``(1.0, inf/nan)``."""
    s, finite = grad_sumsq(grads, grad_scale=grad_scale, simd=simd, threads=threads)
    total = math.sqrt(s + float(extra_sumsq)) if finite else float("nan")
    if not math.isfinite(total):
        return 1.0, total
    return min(1.0, float(max_norm) / (total + 1e-6)), total
