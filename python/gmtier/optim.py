"""Host-side optimizers: the AdamW for the dense part when its state lives in host memory, and
the flat (safetensors-friendly) form of an optimizer's state for checkpoints."""

from __future__ import annotations

import torch

from gmtier.adam import AdamTensors, adamw_step


class HostAdamW(torch.optim.Optimizer):
    """AdamW for device parameters whose fp32 master, exp_avg and exp_avg_sq live in host memory
    (pinned on CUDA) and are updated by the Rust CPU AdamW: gradients go D2H, the new weights
    H2D. For when the dense part's optimizer state does not fit the GPU. Works with GradScaler
    (it unscales the device gradients before `step`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _state(self, p):
        st = self.state[p]
        if not st:
            pin = p.is_cuda
            st["master"] = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin).copy_(p.detach())
            st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
            st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
            st["step"] = torch.zeros(1, dtype=torch.int64)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            items = []
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                st = self._state(p)
                g = p.grad.detach().to("cpu", torch.float32, non_blocking=True).reshape(-1)
                items.append(AdamTensors(st["master"].reshape(-1), st["exp_avg"].reshape(-1),
                                         st["exp_avg_sq"].reshape(-1), g, st["step"]))
            if not items:
                continue
            if params[0].is_cuda:
                torch.cuda.current_stream(params[0].device).synchronize()  # the D2H copies landed
            adamw_step(items, lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])
            for p in params:
                p.copy_(self.state[p]["master"], non_blocking=True)
        return None

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for p, st in self.state.items():  # torch moved the state to the parameters' device: back to host
            for k, v in list(st.items()):
                if torch.is_tensor(v) and k != "step":
                    st[k] = v.to("cpu", torch.float32).pin_memory() if p.is_cuda else v.to("cpu", torch.float32)
                elif k == "step":
                    st[k] = v.to("cpu", torch.int64).reshape(1)


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
