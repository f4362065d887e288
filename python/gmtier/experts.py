"""The glue between the Switch layers and the tiered store.

One record per (switch layer, expert) holds the expert's weights (`w1` [d_ff, d], `w2` [d, d_ff]
in the training precision; fp32 on CPU) and its AdamW state (fp32 masters when the weights are
half precision, `exp_avg`, `exp_avg_sq`, and the expert's own `step`).

A training step is expert-major: the whole batch reaches a Switch layer together, and
`ExpertLayerFn` runs every expert that got tokens once in forward (paged in, computed, released;
only the layer's input is saved) and once in backward (paged in again, dx and dW computed, dW
copied to pinned RAM, the CPU AdamW applied to the record where it lives, the new weights
written in the same pass, the record marked dirty and released). Where both tiers hold every
record, the dW of up to `GRAD_GROUP` experts in a row go to RAM in one copy and are updated by
one AdamW job (`grad_staging`). Experts without tokens are not
touched at all (lazy Adam, per-expert step counts).

While block l computes, the routers of the next Switch layers are applied to block l's input
(the residual stream) to predict their experts, which are prefetched into RAM with a priority
that falls with distance, and those of the nearest layer on into the GPU tier as their records
reach RAM (one copy at a time, between the current layer's experts). When the real routing
differs, the wrong guesses are corrected: their reads not yet started are cancelled and their
unused copies are the first evicted on both tiers. Precision and recall are kept per layer.
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

from gmtier.config import Config, parse_bytes
from gmtier.model import expert_ffn, expert_starts, from_gemm_rows, gemm_row_layout, init_expert, to_gemm_rows
from gmtier.tiers import emulated as gpu_tier_emulated

_TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_STORE_DTYPE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_TORCH_DTYPE_OF = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "i64": torch.int64}


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
        # The GEMM row layout forward uses is the one backward needs: made once.
        layout = gemm_row_layout(counts, runtime.pad_rows, x_sorted.device)
        ctx.runtime, ctx.layer, ctx.counts, ctx.layout = runtime, layer, counts, layout
        return runtime.forward(layer, x_sorted, counts, layout)

    @staticmethod
    def backward(ctx, grad_out):
        (x_sorted,) = ctx.saved_tensors
        dx = ctx.runtime.backward(ctx.layer, x_sorted, grad_out, ctx.counts, ctx.layout)
        return dx, None, None, None


class ExpertRuntime:
    """Owns the store, pages experts for the Switch layers, runs their AdamW, predicts and
    prefetches, and keeps the paging metrics."""

    def __init__(self, cfg: Config, device: str, create: bool = False, log=print):
        from gmtier.store import TieredExpertStore

        self.cfg, self.device, self.log = cfg, torch.device(device), log
        m = cfg.model
        self.switch_layers = m.switch_layers()
        self.n_experts = m.n_experts
        self.dtype = _TORCH_DTYPE[cfg.expert_dtype()]
        self.half = self.dtype != torch.float32
        self.pad_rows = cfg.expert_pad_rows()  # see gemm_row_layout
        self.n_records = len(self.switch_layers) * self.n_experts
        path = cfg.store_dir()
        if create or not (path / "index.json").exists():
            self._create(path)
        gpu_bytes = (parse_bytes(cfg.experts.gpu_budget, "experts.gpu_budget")
                     if self.device.type == "cuda" or gpu_tier_emulated() else 0)
        ram_bytes = parse_bytes(cfg.experts.ram_budget, "experts.ram_budget")
        self.grad_group, grad_slots = grad_staging(cfg, ram_bytes, gpu_bytes, self.n_records)
        self.store = TieredExpertStore.open(
            path, ram_bytes=ram_bytes, gpu_bytes=gpu_bytes, device=self.device, io_threads=cfg.experts.io_threads,
            direct=cfg.experts.direct, gpu_grad_slots=grad_slots, gpu_grad_group=self.grad_group)
        self._check_geometry(path, record_schema(m.d_model, m.d_ff, self.dtype))
        t = cfg.train
        self.hyper = dict(beta1=t.beta1, beta2=t.beta2, eps=t.eps, weight_decay=t.weight_decay,
                          threads=cfg.experts.adam_threads or default_adam_threads())
        self.lr, self.grad_scale = t.lr, 1.0
        self.step_skipped = 0
        # Experts waiting for their AdamW stay pinned (RAM and GPU); two more are pinned by the
        # paging loop (current + next), so the budgets bound how many updates may be in flight.
        # On CUDA the GPU tier keeps a RAM record pinned until the H2D copy that read it has
        # finished; count two such copies in flight, and one GPU prefetch copy. GPU prefetch runs
        # where the tier cannot keep every expert (it keeps those it has room for, refreshed
        # after each AdamW).
        self.gpu_prefetch = (bool(gpu_bytes) and cfg.experts.prefetch and cfg.experts.gpu_prefetch
                             and self.store.gpu.num_slots - 2 < self.n_records)
        in_copy = (2 + self.gpu_prefetch) if gpu_bytes else 0
        slots = self.store.ram_slots - in_copy
        if gpu_bytes:
            slots = min(slots, self.store.gpu.num_slots)
        # Up to 8 updates queued (three groups where dW goes in groups) lets backward run ahead of
        # the CPU AdamW (2 put the AdamW on the critical path of the `small` step on an H200);
        # small budgets keep fewer.
        cap = max(8, 3 * self.grad_group)
        self.max_pending = max(0, min(min(cap, max(2, (slots - 2) // 2)), slots - 2)) if cfg.experts.async_adam else 0
        # RAM slots left for read-ahead once those pins are counted: prefetching more than fits
        # would only evict records before their use and read them twice.
        self.prefetch_room = max(0, self.store.ram_slots - in_copy - 2 - self.max_pending)
        # Two workers: while one waits for its expert's dW to reach RAM (or does its bookkeeping),
        # the other's AdamW keeps the cores busy; both share one rayon pool. With one worker the
        # `small` step on an H200 ran the AdamW at half the memory bandwidth, and backward waited.
        workers = min(2, self.max_pending)
        # dW host buffers (a group each): one per group of updates that may be queued or running,
        # plus the one being copied.
        self.store.gpu.reserve_host_grads(-(-self.max_pending // self.grad_group) + 2)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="gmtier-adam") if self.max_pending else None
        self.pending: list[tuple[Future, int]] = []  # (update job, its number of experts)
        self.model = None
        self.write_behind = self.all_in_ram = False
        self.predicted: dict[int, set[int]] = {}
        self.gpu_wanted: list[tuple[tuple[int, int], int]] = []  # (key, priority) to copy to the GPU early
        self.used: dict[int, list[int]] = {}  # experts each layer used in this step's forward
        # adam_s: time in each update (adam_d2h_wait_s of it waiting for dW, adam_kernel_s in the
        # AdamW); adam_backlog_s: time the step waited for updates to finish (queue full, or at
        # its end); expert_fwd_s/expert_bwd_s: host time in the Switch layers' expert loops;
        # ram_prefetch_demoted: wrong guesses demoted or cancelled in the RAM tier.
        # Phases of a step, for where the disk idles: "fwd" from begin_step to the first expert
        # backward, "bwd" from there to the end of the step's updates, "rest" until the next
        # begin_step (the dense optimizer, logging); wall time and disk bytes of each. They
        # tile the time since training began, so their bytes add up to the disk traffic.
        self.stats = {"tp": 0, "fp": 0, "fn": 0, "expert_updates": 0, "skipped_updates": 0, "adam_s": 0.0,
                      "adam_d2h_wait_s": 0.0, "adam_kernel_s": 0.0, "adam_backlog_s": 0.0, "wait_s": 0.0,
                      "expert_fwd_s": 0.0, "expert_bwd_s": 0.0, "ram_prefetch_demoted": 0,
                      **dict.fromkeys(_PHASE_STATS, 0.0)}
        self._phase: tuple | None = None  # (name, time, bytes read, bytes written) at its start
        self.active_layer: int | None = None  # the Switch layer whose expert loop runs now
        self.layer_stats = [dict.fromkeys(_LAYER_COUNTERS, 0) for _ in self.switch_layers]
        self._base = self.store.tier_metrics()

    # ---- setup ------------------------------------------------------------------------------
    def _check_geometry(self, path: Path, schema) -> None:
        """An existing store must have been made for this model (layers, experts, record schema)."""
        from gmtier.config import ConfigError

        have = [(t.name, str(t.dtype).removeprefix("torch."), list(t.shape)) for t in self.store.layout]
        want = [(n, str(_TORCH_DTYPE_OF[d]).removeprefix("torch."), list(sh)) for n, d, sh, _ in schema]
        if (self.store.num_layers, self.store.num_experts) != (len(self.switch_layers), self.n_experts) or have != want:
            self.store.close()
            raise ConfigError(
                f"the expert store {path} holds {self.store.num_layers} layers x {self.store.num_experts} experts with "
                f"records {have}, but the config needs {len(self.switch_layers)} x {self.n_experts} with {want} "
                f"(model.* or experts.dtype changed); train with --fresh or point experts.store_dir elsewhere")

    def _create(self, path: Path) -> None:
        """A new store filled from the seeded init, one record at a time, committed as step 0."""
        import shutil

        from gmtier.store import TieredExpertStore

        m, seed = self.cfg.model, self.cfg.train.seed
        t0 = time.perf_counter()
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def init(layer: int, expert: int) -> dict[str, torch.Tensor]:
            w1, w2 = init_expert(seed, self.switch_layers[layer], expert, m.d_model, m.d_ff, m.init_std, m.n_layer)
            rec = {"w1": w1.to(self.dtype), "w2": w2.to(self.dtype)}  # moments and step start at zero
            if self.half:
                rec.update({"w1.master": w1, "w2.master": w2})
            return rec

        schema = record_schema(m.d_model, m.d_ff, self.dtype)
        TieredExpertStore.create(path, len(self.switch_layers), m.n_experts, schema, init=init,
                                 user_meta=json.dumps({"step": 0}))
        self.log(f"created expert store {path}: {len(self.switch_layers)} layers x {m.n_experts} experts "
                 f"in {time.perf_counter() - t0:.1f}s")

    def bank(self, layer: int) -> TieredExperts:
        return TieredExperts(self, layer)

    def attach(self, model) -> None:
        self.model = model
        # Prefetch fills the RAM tier; when the RAM budget holds every record, all experts stay
        # in RAM after their first read and predicting costs a host sync per block for nothing
        # (measured on an H200: `small` ran 0.128 s a step with it, 0.103 s without).
        self.all_in_ram = self.store.ram_slots >= self.n_records + self.max_pending + 2
        needed = not self.all_in_ram or self.gpu_prefetch
        model.prefetcher = self.predict_and_prefetch if self.cfg.experts.prefetch and needed else None
        # Records that stay in RAM are written at the commit only; otherwise each is written as
        # soon as its update is done, overlapping the reads that follow.
        self.write_behind = not self.all_in_ram

    def committed_step(self) -> int | None:
        meta = self.store.user_meta()
        return json.loads(meta).get("step") if meta else None

    # ---- forward / backward of one layer ------------------------------------------------------
    def _prefetch(self, keys, priority: int, sections: str) -> None:
        """Read-ahead into RAM of what `store.acquire(key, sections=...)` will read: in forward
        ("weights") nothing for experts whose current weights are on the GPU; in backward
        ("state") the weights too for experts the GPU lacks."""
        if sections in ("weights", "state"):
            on_gpu = [self.store.gpu.holds(k) for k in keys]
            if sections == "state":
                lacking = [k for k, g in zip(keys, on_gpu) if not g]
                if lacking:
                    self.store.prefetch(lacking, priority=priority, sections="all")
            keys = [k for k, g in zip(keys, on_gpu) if g == (sections == "state")]
        if keys:
            self.store.prefetch(keys, priority=priority, sections=sections)

    def _each_expert(self, layer: int, counts: list[int], compute, done, sections: str) -> None:
        """For every expert with tokens, in order: `compute(e, start, n, w1, w2)` (enqueues its
        kernels), then `done([key])` (release, or hand over to the AdamW). `sections`: what of
        the record the step needs in RAM ("weights" in forward, "state"/"all" in backward).

        Experts that need no read are taken in one call up front: in forward those whose
        current weights are on the GPU (released together at the end), in backward all of them
        when the RAM tier holds every record. The others are paged one ahead: the next one is
        acquired after the current one's kernels are enqueued, so its read and H2D copy overlap
        that compute."""
        keys = [(layer, e) for e, c in enumerate(counts) if c]
        # This layer's experts are demanded now; copies still wanted are for layers ahead.
        self.gpu_wanted = [w for w in self.gpu_wanted if w[0][0] != layer]
        if not keys:
            return
        starts = expert_starts(counts)
        gpu = self.store.gpu
        if sections == "weights" and gpu.active:
            # Forward: no update is in flight; two slots stay for the experts paged one ahead.
            ready = self.store.acquire_resident_many(keys, limit=max(0, gpu.num_slots - 2))
        elif (sections != "weights" and self.all_in_ram
              and (not gpu.active or len(keys) + self.max_pending <= gpu.num_slots)):
            # Backward, all at once: the earlier updates still in flight keep their GPU pins.
            ready = self.store.acquire_many(keys, priority=10, sections=sections)
        else:
            ready = {}
        paged = [k for k in keys if k not in ready]
        room = self.prefetch_room if self.cfg.experts.prefetch and not self.all_in_ram else 0
        ahead = {paged[0]: self.store.acquire(paged[0], priority=10, sections=sections)} if paged else {}
        j = 0  # position in `paged` of the expert acquired ahead
        for key in keys:
            w = ready.get(key) or ahead.pop(key)
            if key not in ready and room:
                self._prefetch(paged[j + 2: j + 2 + room], 5, sections)
            e = key[1]
            compute(e, starts[e], counts[e], w["w1"], w["w2"])
            if key not in ready:
                j += 1
                if j < len(paged):
                    ahead[paged[j]] = self.store.acquire(paged[j], priority=10, sections=sections)
                done([key])
            elif sections != "weights":
                done([key])  # backward: each update starts as soon as its dW is on its way
            self._pump_gpu_prefetch(reserve=max(0, len(paged) - j - 1))
        if sections == "weights" and ready:
            done(list(ready))

    def forward(self, layer: int, x_sorted: torch.Tensor, counts: list[int], layout=None) -> torch.Tensor:
        """`layout`: `gemm_row_layout(counts, self.pad_rows, ...)` where the caller has it."""
        self.used[layer] = [e for e, c in enumerate(counts) if c]
        # One dtype conversion (and row padding) per layer, not per expert: the loop is host-bound
        # at small experts, and each conversion is another kernel launch.
        counts_p, rows = layout or gemm_row_layout(counts, self.pad_rows, x_sorted.device)
        xs = to_gemm_rows(x_sorted.to(self.dtype), rows, sum(counts_p))
        out = torch.empty_like(xs)

        def compute(e, s, n, w1, w2):
            with torch.no_grad(), torch.autocast(x_sorted.device.type, enabled=False):
                expert_ffn(xs[s:s + n], w1, w2, out=out[s:s + n])

        t0 = time.perf_counter()
        with self._per_layer(layer):
            self._each_expert(layer, counts_p, compute, self.store.release, "weights")
        self.stats["expert_fwd_s"] += time.perf_counter() - t0
        return from_gemm_rows(out, rows).to(x_sorted.dtype)

    def backward(self, layer: int, x_sorted: torch.Tensor, grad_out: torch.Tensor, counts: list[int],
                 layout) -> torch.Tensor:
        """`layout`: the `gemm_row_layout` forward used."""
        if self._phase is not None and self._phase[0] == "fwd":
            self._enter_phase("bwd")
        counts_p, rows = layout
        xs = to_gemm_rows(x_sorted.to(self.dtype), rows, sum(counts_p))
        dys = to_gemm_rows(grad_out.to(self.dtype), rows, sum(counts_p))  # zero rows: no dW from padding
        dx = torch.empty_like(xs)
        if layer > 0 and self.cfg.experts.prefetch and not self.all_in_ram:
            # Backward walks the layers in reverse, and forward already told us which experts the
            # previous Switch layer used: read them ahead exactly.
            prev = self.used.get(layer - 1, [])[-self.prefetch_room:] if self.prefetch_room else []
            self._prefetch([(layer - 1, e) for e in reversed(prev)], 1, "state" if self.half else "all")
        if layer > 0 and self.gpu_prefetch:
            self._want_on_gpu([(layer - 1, e) for e in reversed(self.used.get(layer - 1, []))], 1)

        gpu = self.store.gpu if self.store.gpu.active else None
        # The experts whose dW go to RAM together and get one AdamW job (in the loop's order).
        used, size = [e for e, c in enumerate(counts) if c], self.grad_group
        group_of = {e: used[i - i % size: i - i % size + size] for i, e in enumerate(used)}
        staged: dict[int, dict] = {}  # expert -> its GPU staging views, for the group being computed
        first_slot: dict[int, int] = {}  # group's first expert -> its first staging slot
        grads: dict[int, dict] = {}  # expert -> its dW on the CPU (no GPU tier)

        def compute(e, s, n, w1, w2):
            with torch.no_grad(), torch.autocast(x_sorted.device.type, enabled=False):
                group = group_of[e]
                if gpu is not None and e == group[0]:
                    first_slot[e], views = gpu.grad_buffers(len(group))
                    staged.update(zip(group, views))
                _, dw = expert_ffn_backward(xs[s:s + n], w1, w2, dys[s:s + n], out=staged.pop(e, None), dx=dx[s:s + n])
                if gpu is None:
                    grads[e] = dw

        # Half-precision experts: the AdamW writes the new weights from the fp32 master, so backward
        # needs only the state in RAM when the GPU holds the weights (fp32: the weights are the master).
        def done(keys):
            for key in keys:
                group = group_of[key[1]]
                if key[1] != group[-1]:
                    continue  # its update leaves with the group's last expert
                group_keys = [(layer, e) for e in group]
                if gpu is not None:
                    host = self.store.grads_to_host(group_keys, staging=first_slot.pop(group[0]))
                else:
                    host = self.store.grads_to_host(group_keys, [grads.pop(e) for e in group])
                self._update(group_keys, host)

        t0 = time.perf_counter()
        with self._per_layer(layer):
            self._each_expert(layer, counts_p, compute, done, "state" if self.half else "all")
        self.stats["expert_bwd_s"] += time.perf_counter() - t0
        return from_gemm_rows(dx, rows).to(x_sorted.dtype)

    @contextlib.contextmanager
    def _per_layer(self, layer: int):
        """Count the RAM and GPU tier hits and the host's wait for reads of one layer's expert
        loop into its `layer_stats`, and tag its GPU stalls with the layer."""
        def counters():
            m, g = self.store.core.metrics(), self.store.gpu.m
            return m["hits"], m["misses"], g["hits"], g["misses"], self.store.host_wait_s

        before = counters()
        self.store.gpu.stall_tag = self.active_layer = layer
        try:
            yield
        finally:
            self.store.gpu.stall_tag = self.active_layer = None
            s = self.layer_stats[layer]
            for name, a, b in zip(("ram_hits", "ram_misses", "gpu_hits", "gpu_misses", "host_wait_s"), counters(), before):
                s[name] += a - b

    # ---- the expert update --------------------------------------------------------------------
    def begin_step(self, lr: float, grad_scale: float = 1.0) -> None:
        self.lr, self.grad_scale = lr, grad_scale
        self.step_skipped = 0  # expert updates skipped for inf/NaN gradients in this step
        self._enter_phase("fwd")

    @property
    def phase(self) -> str | None:
        """The phase of the step now: "fwd", "bwd" or "rest" (None before the first step)."""
        return self._phase[0] if self._phase is not None else None

    def _enter_phase(self, name: str, disk: tuple[int, int] | None = None) -> None:
        """Close the current phase (its wall time and disk bytes into `stats`), open `name`.
        `disk`: (bytes read, bytes written) now, where the caller has them."""
        if disk is None:
            m = self.store.core.metrics()
            disk = (m["bytes_read"], m["bytes_written"])
        now = (name, time.perf_counter(), *disk)
        if self._phase is not None:
            prev, t, r, w = self._phase
            self.stats[f"{prev}_phase_s"] += now[1] - t
            self.stats[f"{prev}_read_bytes"] += now[2] - r
            self.stats[f"{prev}_write_bytes"] += now[3] - w
        self._phase = now

    def _update(self, keys, host) -> None:
        """With the dW of experts `keys` on their way to pinned RAM (`host`, a GradsOnHost),
        AdamW on their records where they live, in one call (in a worker thread when async);
        then the records are dirty, their GPU copies get the new weights, their write-back starts
        at once when RAM cannot hold every record (so the slots are clean by the time a read needs
        them), and they are released."""
        lr, scale = self.lr, self.grad_scale

        def run():
            t0 = time.perf_counter()
            try:
                host.wait()
                t1 = time.perf_counter()
                skipped = self.store.adam_step(keys, host.tensors, lr=lr, grad_scale=scale, **self.hyper)
                t2 = time.perf_counter()
            finally:
                host.release()
            updated = [k for k, skip in zip(keys, skipped) if not skip]  # a skipped update wrote nothing
            if updated:
                self.store.mark_dirty(updated, refresh_gpu=True, filled="weights" if self.half else "none")
                if self.write_behind:
                    self.store.write_back(updated)
            self.store.release(keys)
            return {"adam_s": time.perf_counter() - t0, "adam_d2h_wait_s": t1 - t0, "adam_kernel_s": t2 - t1}, skipped

        if self.pool is None:
            self._account(run())
            return
        t0 = time.perf_counter()
        while self.pending and sum(n for _, n in self.pending) + len(keys) > self.max_pending:
            self._account(self.pending.pop(0)[0].result())
        self.stats["adam_backlog_s"] += time.perf_counter() - t0
        self.pending.append((self.pool.submit(run), len(keys)))

    def _account(self, result) -> None:
        times, skipped = result
        for k, v in times.items():
            self.stats[k] += v
        self.stats["expert_updates"] += len(skipped)
        self.stats["skipped_updates"] += sum(skipped)
        self.step_skipped += sum(skipped)

    def end_step(self) -> None:
        """Wait for the expert updates of this step."""
        t0 = time.perf_counter()
        while self.pending:
            self._account(self.pending.pop(0)[0].result())
        self.stats["adam_backlog_s"] += time.perf_counter() - t0
        if self._phase is not None and self._phase[0] != "rest":
            self._enter_phase("rest")
        self.predicted.clear()
        self.gpu_wanted.clear()

    # ---- prediction and prefetch --------------------------------------------------------------
    @torch.no_grad()
    def predict_and_prefetch(self, block: int, x: torch.Tensor) -> None:
        """Called with block `block`'s input: predict the experts of the next Switch layers
        (after this block) with their own routers and prefetch them, nearest first.

        Predictions are made at the first block and at each block that follows a Switch block
        (the residual stream right after a Switch layer), one host sync for all layers ahead;
        a later prediction replaces an earlier one and the last one made is scored."""
        if self.model is None:
            return
        if block > 0 and block - 1 not in self.switch_layers:
            return
        depth = self.cfg.experts.prefetch_depth
        ahead = [i for i, l in enumerate(self.switch_layers) if l > block][:depth]
        if not ahead:
            return
        h = x.reshape(-1, x.shape[-1])
        votes = []
        for slot in ahead:
            blk = self.model.blocks[self.switch_layers[slot]]
            votes.append(torch.bincount(blk.ffn.router_logits(blk.ln_2(h)).argmax(-1), minlength=self.n_experts))
        for rank, (slot, counts) in enumerate(zip(ahead, torch.stack(votes).tolist())):
            experts = sorted((e for e, c in enumerate(counts) if c), key=lambda e: -counts[e])
            dropped = self.predicted.get(slot, set()) - set(experts)
            if dropped:  # an earlier prediction for this layer said otherwise
                self._demote(slot, dropped)
            self.predicted[slot] = set(experts)
            room = self.prefetch_room if rank == 0 else self.prefetch_room // 2  # the nearest layer first
            if room and not self.all_in_ram:
                self._prefetch([(slot, e) for e in experts[:room]], 2 - rank, "weights")
            if rank == 0 and self.gpu_prefetch:
                self._want_on_gpu([(slot, e) for e in experts], 2)
        if block not in self.switch_layers:
            # No experts of this block compete for GPU slots: start the copies whose records are
            # in RAM now (a Switch block starts them between its own experts instead).
            self._pump_gpu_prefetch(max_in_flight=len(self.gpu_wanted))

    def _want_on_gpu(self, keys, priority: int) -> None:
        """Copy these experts (most wanted first) into the GPU tier early, as their RAM records
        become ready; replaces what was wanted before. At most half the tier's free slots, so
        the guesses do not push out what the current layer still needs."""
        gpu = self.store.gpu
        room = max(0, gpu.num_slots - 2) // 2
        self.gpu_wanted = [(k, priority) for k in keys if not gpu.holds(k)][:room]

    def _pump_gpu_prefetch(self, reserve: int = 0, max_in_flight: int = 1) -> None:
        """Start GPU copies of the wanted experts whose RAM records hold their weights, while
        fewer than `max_in_flight` prefetch copies run and `reserve` GPU slots stay free for the
        current layer's experts still to come. Called between the experts of a layer with one
        copy at a time, so a demand copy queued behind a prefetch waits for one expert at most
        and the copies are paced with compute."""
        if not self.gpu_wanted or not self.store.gpu.can_prefetch(max_in_flight, reserve):
            return
        keys = [k for k, _ in self.gpu_wanted]
        slots = self.store.core.pin_resident(keys, "weights")
        keep, unpin, issued, busy = [], [], 0, False
        for (key, priority), slot in zip(self.gpu_wanted, slots):
            if slot is None:
                keep.append((key, priority))  # not in RAM yet
            elif busy:
                unpin.append(key)
                keep.append((key, priority))
            else:
                outcome = self.store.gpu.prefetch(key, slot, priority, max_in_flight, reserve)  # takes or drops the pin
                issued += outcome == "copied"
                busy = outcome == "busy" or issued >= max_in_flight
                if outcome == "busy":
                    keep.append((key, priority))
        if unpin:
            self.store.core.release(unpin)
        self.gpu_wanted = keep

    def _demote(self, slot: int, experts) -> None:
        """Experts of layer `slot` predicted wrongly: cancel their pending reads and make their
        unused prefetched copies the first evicted, in RAM and on the GPU."""
        keys = [(slot, e) for e in experts]
        if not self.all_in_ram:
            self.stats["ram_prefetch_demoted"] += self.store.core.demote_prefetched(keys)
        self.store.gpu.demote(keys)
        self.gpu_wanted = [w for w in self.gpu_wanted if w[0] not in keys]

    def observe(self, slot: int, counts: list[int]) -> None:
        """The real routing of layer `slot`: score the prediction made for it, and correct the
        prefetches of the experts it got wrong."""
        if slot not in self.predicted:
            return
        pred, real = self.predicted.pop(slot), {e for e, c in enumerate(counts) if c}
        if pred - real:
            self._demote(slot, pred - real)
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
        # Time the step waited for experts: the host blocked on reads into RAM, plus the GPU's
        # compute stream stalled on H2D copies (timed on the GPU).
        host_wait, self.store.host_wait_s = self.store.host_wait_s, 0.0
        stalls = self.store.gpu.take_stalls()
        gpu_stall = sum(stalls.values())
        out["per_layer"] = [_layer_report(self.switch_layers[i], s, stalls.get(i, 0.0))
                            for i, s in enumerate(self.layer_stats)]
        self.stats.update(host_wait_s=host_wait, gpu_stall_s=gpu_stall, wait_s=host_wait + gpu_stall)
        out.update({k: self.stats[k] for k in ("expert_updates", "skipped_updates", "adam_s", "adam_d2h_wait_s",
                                              "adam_kernel_s", "adam_backlog_s", "expert_fwd_s", "expert_bwd_s",
                                              "wait_s", "host_wait_s", "gpu_stall_s", "ram_prefetch_demoted")})
        now = self.store.tier_metrics()
        if self._phase is not None:  # split the open phase where this window ends
            self._enter_phase(self._phase[0], (now["ram_bytes_read"], now["ram_bytes_written"]))
        out.update({k: self.stats[k] for k in _PHASE_STATS})
        out.update(self._tier_metrics(now))
        for k in self.stats:
            self.stats[k] = 0 if isinstance(self.stats[k], int) else 0.0
        for s in self.layer_stats:
            s.update(dict.fromkeys(_LAYER_COUNTERS, 0))
        return out

    # ---- persistence ---------------------------------------------------------------------------
    def commit(self, meta: dict) -> None:
        self.end_step()
        self.store.commit(json.dumps(meta))

    def _tier_metrics(self, now: dict) -> dict:
        """RAM and GPU hit rates and traffic since the last call (`now`: store.tier_metrics())."""
        d = {k: now[k] - self._base[k] for k in now if isinstance(now[k], (int, float)) and not isinstance(now[k], bool)
             and isinstance(self._base.get(k), (int, float))}
        self._base = now
        out = {"ram_hit_rate": d["ram_hits"] / max(1, d["ram_hits"] + d["ram_misses"]),
               "disk_read_bytes": d["ram_bytes_read"], "disk_write_bytes": d["ram_bytes_written"],
               "ram_stall_s": d["ram_stall_s"], "ram_evictions": d["ram_evictions"],
               "ram_prefetch_cancelled": d["ram_prefetch_cancelled"]}
        if self.store.gpu.active:
            out["gpu_hit_rate"] = d["gpu_hits"] / max(1, d["gpu_hits"] + d["gpu_misses"])
            out["h2d_bytes"] = d["gpu_h2d_bytes"]
            # GPU prefetch: copies made early, how many were then used, evicted unused, demoted.
            out.update({k: d[k] for k in ("gpu_prefetch_copies", "gpu_prefetch_hits", "gpu_prefetch_wasted",
                                          "gpu_prefetch_demoted")})
            # Host blocked for a dW staging slot (its previous D2H copy) or a free pinned dW buffer.
            out["grad_wait_s"] = d["gpu_grad_wait_s"]
        return out

    def close(self) -> None:
        self.end_step()
        if self.pool is not None:
            self.pool.shutdown()
        self.store.close()


PHASES = ("fwd", "bwd", "rest")
_PHASE_STATS = tuple(f"{ph}_{k}" for ph in PHASES for k in ("phase_s", "read_bytes", "write_bytes"))
_LAYER_COUNTERS = ("tp", "fp", "fn", "ram_hits", "ram_misses", "gpu_hits", "gpu_misses", "host_wait_s")


def _layer_report(block: int, s: dict, gpu_stall_s: float) -> dict:
    """One Switch layer's figures since the last metrics(): prediction precision/recall (where
    predicted), RAM and GPU tier hit rates of its expert loops, and the time they waited."""
    def rate(hit, miss):
        return s[hit] / (s[hit] + s[miss]) if s[hit] + s[miss] else None

    out = {"block": block}
    if s["tp"] + s["fp"] + s["fn"]:
        out["precision"] = s["tp"] / max(1, s["tp"] + s["fp"])
        out["recall"] = s["tp"] / max(1, s["tp"] + s["fn"])
    out.update(ram_hit_rate=rate("ram_hits", "ram_misses"), gpu_hit_rate=rate("gpu_hits", "gpu_misses"),
               host_wait_s=s["host_wait_s"], gpu_stall_s=gpu_stall_s)
    return out


def default_adam_threads() -> int:
    """AdamW threads when experts.adam_threads = 0: all cores but two on a big machine, so the
    thread that launches the GPU work and the I/O completions are not starved; all on a small one."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return n - 2 if n >= 8 else n


GRAD_GROUP = 8  # experts whose dW leave together where both tiers hold every record


def grad_staging(cfg: Config, ram_bytes: int, gpu_bytes: int, n_records: int) -> tuple[int, int]:
    """(experts per dW group, GPU slots that stage dW). Where both tiers hold every record with
    room to spare, the dW of up to `GRAD_GROUP` experts leave in one D2H copy and get one AdamW
    job: backward at small experts is bound by its host work per expert (events, copies, the
    hand-off to the AdamW thread), and this does that work once per group; two groups of slots
    (one being filled while the other drains to RAM). Else one expert at a time: two staging
    slots where the GPU budget holds at least six experts, else one."""
    weights, record = cfg.expert_bytes()
    group = min(GRAD_GROUP, cfg.model.n_experts)
    # Room in RAM for the updates in flight (3 groups) and the records in copies and paging.
    ram_holds_all = ram_bytes // record >= n_records + 3 * group + 5
    gpu_holds_all = not gpu_bytes or gpu_bytes // weights - 2 * group >= n_records + 2
    if group > 1 and ram_holds_all and gpu_holds_all:
        return group, (2 * group if gpu_bytes else 0)
    if not gpu_bytes:
        return 1, 0
    return 1, (2 if gpu_bytes // weights >= 6 else 1)


def expert_ffn_backward(x, w1, w2, dy, out: dict | None = None, dx: torch.Tensor | None = None):
    """Gradients of `expert_ffn` by hand (no autograd graph over the store's views):
    returns (dx, {"w1": dW1, "w2": dW2}); dW is written into `out`'s tensors when given (a GPU
    staging slot), dx into `dx` when given."""
    a = torch.nn.functional.linear(x, w1)
    h = torch.nn.functional.gelu(a)
    if out is None:
        out = {"w1": torch.empty_like(w1), "w2": torch.empty_like(w2)}
    torch.mm(dy.t(), h, out=out["w2"])
    da = torch.ops.aten.gelu_backward(dy.mm(w2), a)
    torch.mm(da.t(), x, out=out["w1"])
    return (da.mm(w1) if dx is None else torch.mm(da, w1, out=dx)), out
