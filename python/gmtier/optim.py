"""Host-side optimizers: one AdamW over the Rust CPU kernel (`gmtier.adam`) whose state lives in
host memory, for CPU parameters (updated in place) and for device parameters (an fp32 master in
host memory); and the flat (safetensors-friendly) form of an optimizer's state for checkpoints."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from gmtier import dtypes
from gmtier.adam import AdamHandle, AdamTensors, _check_tensor, _simd, _threads, adamw_step, grad_sumsq


class HostAdamW(torch.optim.Optimizer):
    """AdamW on the fused Rust CPU kernel, its state (fp32 master, exp_avg, exp_avg_sq, an int64
    step per parameter) in host memory, with the math of ``torch.optim.AdamW``.

    Where a parameter's weights live decides what is updated:

    * ``in_place=False`` (the dense part's optimizer when its state does not fit the GPU): each
      parameter gets an fp32 master in host memory (pinned on CUDA) in its state; gradients go
      D2H, the kernel updates the master, the new weights go H2D. Works with GradScaler (it
      unscales the device gradients before ``step``).
    * ``in_place=True`` (``CpuAdamW``): CPU fp32 parameters are their own masters, updated where
      they are. A parameter group may hold ``"half_copies"``: a list aligned with ``"params"``
      of bf16/fp16 tensors (or None) that receive the new weights, rounded to nearest even, in
      the same pass; ``step_async`` runs the step on the kernel's thread pool.

    Parameters without ``.grad`` are skipped and keep their step count. ``step()`` returns the
    closure's loss and takes the fp16 loss scale (``grad_scale``) and a clipping coefficient
    (``clip_coef``, see ``gmtier.adam.clip_coef``); :attr:`last_step_skipped` tells whether
    ``check_finite`` found an inf/NaN gradient and skipped the step (nothing written).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        in_place: bool = False,
        check_finite: bool = False,
        simd: str = "auto",
        threads: int | None = None,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if eps < 0:
            raise ValueError(f"invalid eps: {eps}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        self.in_place = bool(in_place)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.check_finite = bool(check_finite)
        self.simd = _simd(simd)
        self.threads = _threads(threads)
        self.last_step_skipped = False
        for group in self.param_groups:
            self._check_group(group)

    def _check_group(self, group: dict) -> None:
        if not self.in_place:
            return
        for i, p in enumerate(group["params"]):
            _check_tensor(p, f"params[{i}]", {torch.float32: 0}, None)
        halves = group.get("half_copies")
        if halves is not None:
            if len(halves) != len(group["params"]):
                raise ValueError(
                    f"half_copies has {len(halves)} entries, the group {len(group['params'])} params"
                )
            for i, (p, h) in enumerate(zip(group["params"], halves)):
                if h is not None:
                    _check_tensor(h, f"half_copies[{i}]", dict.fromkeys(dtypes.HALF, 0), p.numel())

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "simd"):
            self._check_group(self.param_groups[-1])

    def _state(self, p: torch.Tensor) -> dict:
        """The parameter's state, made at its first step: the moments (and, without `in_place`,
        the host master, a copy of the parameter) in host memory."""
        st = self.state[p]
        if not st:
            if self.in_place:
                st["step"] = torch.zeros(1, dtype=torch.int64)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            else:
                pin = p.is_cuda
                st["master"] = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin).copy_(p.detach())
                st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
                st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
                st["step"] = torch.zeros(1, dtype=torch.int64)
        step = st["step"]
        if step.dtype != torch.int64 or step.numel() != 1:  # e.g. a torch AdamW state dict
            st["step"] = torch.tensor([int(step.reshape(-1)[0].item())], dtype=torch.int64)
        return st

    def _group_tensors(self, group: dict) -> tuple[list, list[AdamTensors]]:
        """The group's parameters with gradients and the kernel's tensors for each (gradients of
        device parameters on their way to host memory)."""
        params, out = [], []
        halves = group.get("half_copies") or [None] * len(group["params"])
        for p, h in zip(group["params"], halves):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("HostAdamW does not support sparse gradients")
            st = self._state(p)
            if self.in_place:
                grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                out.append(AdamTensors(p.detach(), st["exp_avg"], st["exp_avg_sq"], grad, st["step"], h))
            else:
                g = p.grad.detach().to("cpu", torch.float32, non_blocking=True).reshape(-1)
                out.append(AdamTensors(st["master"].reshape(-1), st["exp_avg"].reshape(-1),
                                       st["exp_avg_sq"].reshape(-1), g, st["step"]))
            params.append(p)
        if params and params[0].is_cuda:
            torch.cuda.current_stream(params[0].device).synchronize()  # the D2H copies landed
        return params, out

    def _launch(self, grad_scale: float, clip: float, async_: bool) -> tuple[list, list, bool]:
        groups = [(g, *self._group_tensors(g)) for g in self.param_groups]
        groups = [(g, ps, ts) for g, ps, ts in groups if ts]
        if self.check_finite and groups:
            _, finite = grad_sumsq([t.grad for _, _, ts in groups for t in ts], simd=self.simd, threads=self.threads)
            if not finite:
                return [], [], True
        jobs, keep = [], []
        for g, params, ts in groups:
            kw = dict(
                lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
                grad_scale=grad_scale, clip_coef=clip, simd=self.simd, threads=self.threads,
            )
            if async_:
                h = adamw_step(ts, async_=True, **kw)
                jobs.extend(h._jobs)
                keep.append(ts)
                continue
            adamw_step(ts, **kw)
            if not self.in_place:
                for p in params:
                    p.copy_(self.state[p]["master"], non_blocking=True)
        return jobs, keep, False

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scale: float = 1.0,
        clip_coef: float = 1.0,
    ) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _, _, skipped = self._launch(grad_scale, clip_coef, async_=False)
        self.last_step_skipped = skipped
        return loss

    @torch.no_grad()
    def step_async(self, *, grad_scale: float = 1.0, clip_coef: float = 1.0) -> AdamHandle:
        """Start the step on the Adam thread pool (`in_place` only: the new weights are the
        parameters themselves); leave params, grads and state untouched until
        ``handle.wait()`` returned (it returns True if ``check_finite`` skipped the step)."""
        if not self.in_place:
            raise RuntimeError("step_async needs in_place=True (device parameters get their weights after the step)")
        jobs, keep, skipped = self._launch(grad_scale, clip_coef, async_=True)
        self.last_step_skipped = skipped
        h = AdamHandle(jobs, keep)
        if skipped:
            h._skipped = True
        return h

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.in_place:
            return
        for p, st in self.state.items():  # torch moved the state to the parameters' device: back to host
            for k, v in list(st.items()):
                if torch.is_tensor(v) and k != "step":
                    st[k] = v.to("cpu", torch.float32).pin_memory() if p.is_cuda else v.to("cpu", torch.float32)
                elif k == "step":
                    st[k] = v.to("cpu", torch.int64).reshape(1)


class CpuAdamW(HostAdamW):
    """Drop-in ``torch.optim.AdamW`` for CPU fp32 parameters: `HostAdamW` with ``in_place=True``
    (and torch's default weight decay)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        check_finite: bool = False,
        simd: str = "auto",
        threads: int | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, in_place=True, check_finite=check_finite, simd=simd,
                         threads=threads)


def optimizer_to_flat(opt) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as flat tensors ('<param index>.<name>') + JSON-able metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
