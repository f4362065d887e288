"""The glue between the Switch layers and the tiered store.

One record per (switch layer, expert) holds the expert's weights (`w1` [d_ff, d], `w2` [d, d_ff]
in the training precision; fp32 on CPU) and its AdamW state (fp32 masters when the weights are
half precision, `exp_avg`, `exp_avg_sq`, and the expert's own `step`).

A training step is expert-major: the whole batch reaches a Switch layer together, and
`ExpertLayerFn` runs every expert that got tokens once in forward (paged in, computed, released;
only the layer's input is saved) and once in backward (paged in again, dx and dW computed, dW
copied to pinned RAM, the CPU AdamW applied to the record where it lives, the new weights
written in the same pass, the record marked dirty and released). Experts without tokens are not
touched at all (lazy Adam, per-expert step counts).

While block l computes, the routers of the next Switch layers are applied to block l's input
(the residual stream) to predict their experts, which are prefetched with a priority that falls
with distance; precision and recall of the predictions are kept per layer.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

from gmtier.config import Config, parse_bytes
from gmtier.model import expert_ffn, init_expert

_TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_STORE_DTYPE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def record_schema(d_model: int, d_ff: int, dtype: torch.dtype) -> list[tuple[str, str, list[int], str]]:
    """The store record of one expert: (name, dtype, shape, section)."""
    shapes = {"w1": [d_ff, d_model], "w2": [d_model, d_ff]}
    half = dtype != torch.float32
    schema = [(n, _STORE_DTYPE[dtype], s, "weights") for n, s in shapes.items()]
    for n, s in shapes.items():
        if half:
            schema.append((f"{n}.master", "f32", s, "state"))
        schema += [(f"{n}.exp_avg", "f32", s, "state"), (f"{n}.exp_avg_sq", "f32", s, "state")]
    schema.append(("step", "i64", [1], "state"))
    return schema


class TieredExperts(nn.Module):
    """The expert bank of one Switch layer when its experts live in the store."""

    def __init__(self, runtime: "ExpertRuntime", layer: int):
        super().__init__()
        self.runtime, self.layer = runtime, layer
        self.slot = runtime.switch_layers.index(layer)  # the store's layer index

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        self.runtime.observe(self.slot, counts)
        if torch.is_grad_enabled() and self.training:
            return ExpertLayerFn.apply(x_sorted, self.runtime, self.slot, counts)
        return self.runtime.forward(self.slot, x_sorted, counts)


class ExpertLayerFn(torch.autograd.Function):
    """All experts of one Switch layer: saves only the sorted input; pages each expert once in
    forward and once in backward; the expert update happens in backward."""

    @staticmethod
    def forward(ctx, x_sorted, runtime, layer, counts):
        ctx.save_for_backward(x_sorted)
        ctx.runtime, ctx.layer, ctx.counts = runtime, layer, counts
        return runtime.forward(layer, x_sorted, counts)

    @staticmethod
    def backward(ctx, grad_out):
        (x_sorted,) = ctx.saved_tensors
        dx = ctx.runtime.backward(ctx.layer, x_sorted, grad_out, ctx.counts)
        return dx, None, None, None


class RamViews:
    """Torch views of the store's RAM arena: `views(slot)[name]` is the tensor `name` of the
    record in RAM slot `slot` (zero-copy; the store keeps the arena alive until close)."""

    _DT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "i64": torch.int64, "u8": torch.uint8}

    def __init__(self, store, pin: bool):
        import ctypes

        ptr, nbytes = store.arena_address()
        self.arena = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)
        self.base_ptr = ptr
        self.pinned = False
        if pin and torch.cuda.is_available():
            # Page-lock the arena so H2D/D2H copies run at full speed, asynchronously.
            rc = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
            self.pinned = rc == 0 or int(rc) == 0
            self.ptr = ptr
        self.record_bytes = store.record_bytes
        self.layout = [(name, self._DT[dt], tuple(shape), off, nb) for name, dt, shape, off, nb, _ in store.tensor_layout()]
        self.weights_bytes = store.weights_bytes
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        v = self._cache.get(slot)
        if v is None:
            # One buffer per tensor, not slices of one arena tensor: slices would share autograd's
            # version counter, and Adam writing one record would invalidate another's saved views.
            import ctypes

            base = self.base_ptr + slot * self.record_bytes
            v = {name: torch.frombuffer((ctypes.c_uint8 * nb).from_address(base + off), dtype=torch.uint8).view(dt).view(shape)
                 for name, dt, shape, off, nb in self.layout}
            self._cache[slot] = v
        return v

    def weights_bytes_of(self, slot: int) -> torch.Tensor:
        base = slot * self.record_bytes
        return self.arena[base: base + self.weights_bytes]

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.ptr)
            self.pinned = False
        self._cache.clear()


class ExpertRuntime:
    """Owns the store, pages experts for the Switch layers, runs their AdamW, predicts and
    prefetches, and keeps the paging metrics."""

    def __init__(self, cfg: Config, device: str, create: bool = False, log=print):
        from gmtier._core import ExpertStore

        self.cfg, self.device, self.log = cfg, torch.device(device), log
        m = cfg.model
        self.switch_layers = m.switch_layers()
        self.n_experts = m.n_experts
        self.dtype = _TORCH_DTYPE[cfg.expert_dtype()]
        self.half = self.dtype != torch.float32
        path = cfg.store_dir()
        self.schema = record_schema(m.d_model, m.d_ff, self.dtype)
        ram = parse_bytes(cfg.experts.ram_budget, "experts.ram_budget")
        fresh = create or not (path / "index.json").exists()
        if fresh:
            if path.exists():
                import shutil

                shutil.rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            ExpertStore.create(str(path), len(self.switch_layers), m.n_experts, self.schema)
        self.store = ExpertStore.open(str(path), ram, io_threads=cfg.experts.io_threads, direct=cfg.experts.direct)
        self.ram = RamViews(self.store, pin=self.device.type == "cuda")
        self.gpu = None
        if self.device.type == "cuda":
            from gmtier.tiers import GpuTier

            self.gpu = GpuTier(self.store, self.ram, parse_bytes(cfg.experts.gpu_budget, "experts.gpu_budget"), self.device)
        t = cfg.train
        self.hyper = dict(betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay)
        self.lr, self.grad_scale = t.lr, 1.0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="gmtier-adam") if cfg.experts.async_adam else None
        self.pending: list[Future] = []
        self.model = None
        self.predicted: dict[int, set[int]] = {}
        self.stats = {"tp": 0, "fp": 0, "fn": 0, "expert_updates": 0, "adam_s": 0.0, "skipped_updates": 0, "wait_s": 0.0}
        self.layer_stats = [{"tp": 0, "fp": 0, "fn": 0} for _ in self.switch_layers]
        self._store_base = dict(self.store.metrics())
        if fresh:
            self._fill(path)

    # ---- setup ------------------------------------------------------------------------------
    def _fill(self, path: Path) -> None:
        """Write the seeded init into the new store, one record at a time, and commit it as step 0."""
        m, seed = self.cfg.model, self.cfg.train.seed
        t0 = time.perf_counter()
        for layer, block in enumerate(self.switch_layers):
            for e in range(m.n_experts):
                key = (layer, e)
                (slot,) = self.store.request([key]).wait()
                w1, w2 = init_expert(seed, block, e, m.d_model, m.d_ff, m.init_std, m.n_layer)
                v = self.ram.views(slot)
                for name, w in (("w1", w1), ("w2", w2)):
                    v[name].copy_(w)
                    if self.half:
                        v[f"{name}.master"].copy_(w)
                    v[f"{name}.exp_avg"].zero_()
                    v[f"{name}.exp_avg_sq"].zero_()
                v["step"].zero_()
                self.store.mark_dirty([key])
                self.store.release([key])
        self.store.commit(json.dumps({"step": 0}))
        self.log(f"created expert store {path}: {len(self.switch_layers)} layers x {m.n_experts} experts "
                 f"in {time.perf_counter() - t0:.1f}s")

    def bank(self, layer: int) -> TieredExperts:
        return TieredExperts(self, layer)

    def attach(self, model) -> None:
        self.model = model
        model.prefetcher = self.predict_and_prefetch if self.cfg.experts.prefetch else None

    def committed_step(self) -> int | None:
        meta = self.store.user_meta()
        return json.loads(meta).get("step") if meta else None

    # ---- forward / backward of one layer ------------------------------------------------------
    def _used(self, counts):
        return [e for e, c in enumerate(counts) if c]

    def _paged(self, layer: int, experts: list[int]):
        """Yield (expert, slot, w1, w2) with the weights on the compute device, one expert at a
        time; the next expert's read is already queued while the current one computes. Each
        yielded expert is pinned in RAM; the caller releases it."""
        keys = [(layer, e) for e in experts]
        tickets = {}
        for i, key in enumerate(keys):
            for k in keys[i:i + 2]:  # this one and the next: requests run ahead by one expert
                if k not in tickets:
                    tickets[k] = self.store.request([k], priority=10)
            t0 = time.perf_counter()
            (slot,) = tickets.pop(key).wait()
            self.stats["wait_s"] += time.perf_counter() - t0
            if self.gpu is not None:
                w = self.gpu.weights(key, slot)  # H2D on the copy stream; the compute stream waits on its event
            else:
                w = self.ram.views(slot)
            yield key[1], slot, w["w1"], w["w2"]

    def forward(self, layer: int, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = torch.empty(x_sorted.shape, dtype=x_sorted.dtype, device=x_sorted.device)
        starts = _offsets(counts)
        for e, slot, w1, w2 in self._paged(layer, self._used(counts)):
            s, n = starts[e], counts[e]
            with torch.autocast(x_sorted.device.type, enabled=False):
                out[s:s + n] = expert_ffn(x_sorted[s:s + n].to(w1.dtype), w1, w2).to(out.dtype)
            self.store.release([(layer, e)])
        return out

    def backward(self, layer: int, x_sorted: torch.Tensor, grad_out: torch.Tensor, counts: list[int]) -> torch.Tensor:
        dx = torch.empty(x_sorted.shape, dtype=x_sorted.dtype, device=x_sorted.device)
        starts = _offsets(counts)
        for e, slot, w1, w2 in self._paged(layer, self._used(counts)):
            s, n = starts[e], counts[e]
            with torch.enable_grad(), torch.autocast(x_sorted.device.type, enabled=False):
                xe = x_sorted[s:s + n].detach().to(w1.dtype).requires_grad_()
                w1r, w2r = w1.detach().requires_grad_(), w2.detach().requires_grad_()
                y = expert_ffn(xe, w1r, w2r)
                gx, g1, g2 = torch.autograd.grad(y, (xe, w1r, w2r), grad_out[s:s + n].to(y.dtype))
            dx[s:s + n] = gx.to(dx.dtype)
            self._update(layer, e, slot, g1, g2)
        return dx

    # ---- the expert update --------------------------------------------------------------------
    def begin_step(self, lr: float, grad_scale: float = 1.0) -> None:
        self.lr, self.grad_scale = lr, grad_scale

    def _update(self, layer: int, expert: int, slot: int, g1: torch.Tensor, g2: torch.Tensor) -> None:
        """dW to pinned RAM, then AdamW on the record where it lives (in a worker thread when
        async), then mark dirty and release. A GPU copy of the expert is dropped: its next use
        reads the new weights from RAM."""
        key = (layer, expert)
        if self.gpu is not None:
            grads, ready = self.gpu.grads_to_host({"w1": g1, "w2": g2})  # async D2H into pinned buffers
            self.gpu.invalidate(key)
        else:
            grads, ready = {"w1": g1, "w2": g2}, None
        lr, scale = self.lr, self.grad_scale
        rec = self.ram.views(slot)

        def run():
            t0 = time.perf_counter()
            if ready is not None:
                ready.synchronize()
            skipped = expert_adamw(rec, grads, self.half, lr=lr, grad_scale=scale, **self.hyper)
            if self.gpu is not None:
                self.gpu.recycle(grads)
            self.store.mark_dirty([key])
            self.store.release([key])
            return time.perf_counter() - t0, skipped

        if self.pool is None:
            self._account(run())
        else:
            self.pending.append(self.pool.submit(run))

    def _account(self, result) -> None:
        dt, skipped = result
        self.stats["adam_s"] += dt
        self.stats["expert_updates"] += 1
        self.stats["skipped_updates"] += int(bool(skipped))

    def end_step(self) -> None:
        """Wait for the expert updates of this step."""
        for f in self.pending:
            self._account(f.result())
        self.pending.clear()
        self.predicted.clear()

    # ---- prediction and prefetch --------------------------------------------------------------
    @torch.no_grad()
    def predict_and_prefetch(self, block: int, x: torch.Tensor) -> None:
        """Called with block `block`'s input: predict the experts of the next Switch layers
        (after this block) with their own routers and prefetch them."""
        if self.model is None:
            return
        depth = self.cfg.experts.prefetch_depth
        ahead = [i for i, l in enumerate(self.switch_layers) if l > block][:depth]
        h = x.reshape(-1, x.shape[-1])
        for rank, slot in enumerate(ahead):
            if slot in self.predicted:
                continue
            blk = self.model.blocks[self.switch_layers[slot]]
            logits = blk.ffn.router_logits(blk.ln_2(h))
            experts = torch.bincount(logits.argmax(-1), minlength=self.n_experts).nonzero().squeeze(1).tolist()
            self.predicted[slot] = set(experts)
            self.store.prefetch([(slot, e) for e in experts], priority=1 - rank)

    def observe(self, slot: int, counts: list[int]) -> None:
        """The real routing of layer `slot`: score the prediction made for it."""
        if slot not in self.predicted:
            return
        pred, real = self.predicted.pop(slot), {e for e, c in enumerate(counts) if c}
        s = self.layer_stats[slot]
        for d in (s, self.stats):
            d["tp"] += len(pred & real)
            d["fp"] += len(pred - real)
            d["fn"] += len(real - pred)

    def metrics(self) -> dict:
        out = {}
        tp, fp, fn = self.stats["tp"], self.stats["fp"], self.stats["fn"]
        if tp + fp + fn:
            out["prefetch_precision"] = tp / max(1, tp + fp)
            out["prefetch_recall"] = tp / max(1, tp + fn)
            out["prefetch_per_layer"] = [
                {"precision": s["tp"] / max(1, s["tp"] + s["fp"]), "recall": s["tp"] / max(1, s["tp"] + s["fn"])}
                for s in self.layer_stats]
        out.update({k: self.stats[k] for k in ("expert_updates", "skipped_updates", "adam_s")})
        out.update(self._tier_metrics())
        for k in self.stats:
            self.stats[k] = 0 if isinstance(self.stats[k], int) else 0.0
        for s in self.layer_stats:
            s.update(tp=0, fp=0, fn=0)
        return out

    # ---- persistence ---------------------------------------------------------------------------
    def commit(self, meta: dict) -> None:
        self.end_step()
        self.store.commit(json.dumps(meta))

    def _tier_metrics(self) -> dict:
        """RAM (and GPU) hit rates and disk traffic since the last call."""
        now = dict(self.store.metrics())
        d = {k: now[k] - self._store_base.get(k, 0) for k in ("hits", "misses", "bytes_read", "bytes_written", "stall_s", "evictions", "prefetch_hits", "prefetches")}
        self._store_base = now
        out = {"ram_hit_rate": d["hits"] / max(1, d["hits"] + d["misses"]), "disk_read_bytes": d["bytes_read"],
               "disk_write_bytes": d["bytes_written"], "ram_stall_s": d["stall_s"], "ram_evictions": d["evictions"]}
        if self.gpu is not None:
            out.update(self.gpu.metrics())
        return out

    def close(self) -> None:
        self.end_step()
        if self.pool is not None:
            self.pool.shutdown()
        if self.gpu is not None:
            self.gpu.close()
        self.ram.close()
        self.store.close()


def _offsets(counts: list[int]) -> list[int]:
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


def expert_adamw(rec: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], half: bool, *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, grad_scale: float = 1.0) -> bool:
    """AdamW on one expert's record in RAM (torch.optim.AdamW's math): the fp32 master (or the
    fp32 weights), exp_avg, exp_avg_sq and the expert's step; half weights rewritten in the same
    pass. Returns True when the step was skipped for inf/NaN gradients."""
    return _torch_expert_adamw(rec, grads, half, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                               grad_scale=grad_scale)


def _torch_expert_adamw(rec, grads, half, *, lr, betas, eps, weight_decay, grad_scale=1.0) -> bool:
    """The same update in torch ops (torch.optim.AdamW's single-tensor path, op for op)."""
    gs = {n: g.float() / grad_scale if grad_scale != 1.0 else g.float() for n, g in grads.items()}
    if grad_scale != 1.0 and not all(bool(torch.isfinite(g).all()) for g in gs.values()):
        return True
    rec["step"] += 1
    step = int(rec["step"][0])
    b1, b2 = betas
    bc1, bc2_sqrt = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
    for n, g in gs.items():
        p = rec[f"{n}.master"] if half else rec[n]
        m, v = rec[f"{n}.exp_avg"], rec[f"{n}.exp_avg_sq"]
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-lr / bc1)
        if half:
            rec[n].copy_(p)
    return False
