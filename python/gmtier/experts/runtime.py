"""The expert runtime: the store of a tiered run, and the paging loop of its Switch layers.

A training step is expert-major: the whole batch reaches a Switch layer together, and
`ExpertLayerFn` (bank.py) runs every expert that got tokens once in forward (paged in,
computed, released; only the layer's input is saved) and once in backward (paged in again, dx
and dW computed, dW copied to pinned RAM, the CPU AdamW applied to the record where it lives
(updates.py), the new weights written in the same pass, the record marked dirty and released).
Experts without tokens are not touched at all (lazy Adam, per-expert step counts). Prediction
and prefetch are prefetch.py's, the figures metrics.py's, the budgets' arithmetic the config's
`ExpertPlan`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import gmtier.experts.bank as expert_bank  # the module: its expert_ffn is looked up at each call (tests count them)
from gmtier import dtypes, progress, record
from gmtier.config import Config, ConfigError
from gmtier.experts.bank import (TieredExperts, chunks, expert_chunk_rows, expert_starts, from_gemm_rows,
                                 gemm_row_layout, to_gemm_rows)
from gmtier.experts.metrics import RuntimeStats
from gmtier.experts.prefetch import Prefetcher
from gmtier.experts.updates import ExpertUpdates
from gmtier.store import StoreError, TieredExpertStore, disk, emulated
from gmtier.store.tiered import DATA_FILE


class ExpertRuntime:
    """Owns the store and pages experts for the Switch layers; its parts run the AdamW
    (`updates`), predict and prefetch (`prefetcher`) and keep the figures (`figures`).

    `create`: make a new store from the seeded init (a new training run); a directory that
    holds a store already is refused unless `overwrite`. Without `create` the store must exist:
    one whose index.json is missing is refused (`StoreIndexMissingError`), never re-created."""

    def __init__(self, cfg: Config, device: str, create: bool = False, log=print, overwrite: bool = False,
                 expert_id=None):
        """`expert_id(layer, e)`: the model's expert that the store's expert `e` of Switch layer
        `layer` (the store's layer index) is, for its initial weights (default: `e`; expert
        parallelism gives each rank a store of its own share, `gmtier.distributed`)."""
        self.cfg, self.device, self.log = cfg, torch.device(device), log
        self.expert_id = expert_id or (lambda layer, e: e)
        m = cfg.model
        self.switch_layers = m.switch_layers()
        self.n_experts = m.n_experts
        self.dtype = dtypes.from_config(cfg.expert_dtype())
        # Whether the weights are a half-precision copy of an fp32 master in the state section:
        # the AdamW then rewrites them from the master. Otherwise (fp32, compact) they are the
        # master the AdamW reads. Either way backward reads only the state of the experts whose
        # weights the GPU tier holds: the master weights come from the GPU copy, with the dW.
        self.half = self.dtype != torch.float32 and cfg.experts.state == "fp32"
        self.pad_rows = cfg.expert_pad_rows()  # see gemm_row_layout
        self.chunk_rows = expert_chunk_rows(m.d_ff, self.dtype, self.pad_rows)  # see EXPERT_CHUNK_BYTES
        # Experts already on the device when a layer's loop starts run in grouped GEMMs where
        # experts.gemm resolves so ("grouped"), the ones paged in one by one in the loop.
        self.gemm = expert_bank.resolve_gemm(cfg.experts.gemm, str(self.device), self.dtype, m.d_model, m.d_ff)
        self.plan = cfg.plan(device, gpu_tier=self.device.type == "cuda" or emulated())
        path = cfg.store_dir()
        if create:
            self._create(path, overwrite)
        p = self.plan
        self.store = TieredExpertStore.open(
            path, ram_bytes=p.ram_bytes, gpu_bytes=p.gpu_bytes, device=self.device, io_threads=cfg.experts.io_threads,
            direct=cfg.experts.direct, gpu_grad_slots=p.grad_slots, gpu_grad_group=p.grad_group)
        self._check_geometry(path)
        self.read_write, self.disk_rates = self._choose_read_write(path)
        # The plan's sizes come from the same RecordLayout as the store's: they must agree.
        assert (p.ram_slots, p.gpu_slots) == (self.store.ram_slots, self.store.gpu.num_slots), (p, self.store)
        self.figures = RuntimeStats(self.store, self.switch_layers)
        self.updates = ExpertUpdates(cfg, p, self.store, self.figures)
        self.prefetcher = Prefetcher(cfg, p, self.store, self.figures)
        self.used: dict[int, list[int]] = {}  # experts each layer used in this step's forward

    # ---- what the plan decided (read by the trainer, benches and tests) -------------------
    max_pending = property(lambda self: self.plan.max_pending)
    grad_group = property(lambda self: self.plan.grad_group)
    all_in_ram = property(lambda self: self.plan.all_in_ram)
    write_behind = property(lambda self: self.updates.write_behind)
    step_skipped = property(lambda self: self.updates.step_skipped, doc="expert updates skipped (inf/NaN) this step")
    active_layer = property(lambda self: self.figures.active_layer, doc="the Switch layer whose expert loop runs now")

    @property
    def phase(self) -> str | None:
        """The phase of the step now: "fwd", "bwd" or "rest" (None before the first step)."""
        return self.figures.phase

    # ---- setup ------------------------------------------------------------------------------
    def _check_geometry(self, path: Path) -> None:
        """An existing store must have been made for this model (layers, experts, record schema)."""
        have = [(t.name, str(t.dtype).removeprefix("torch."), list(t.shape)) for t in self.store.layout]
        want = [(n, str(dtypes.STORE[d]).removeprefix("torch."), list(sh)) for n, d, sh, _ in self.cfg.expert_schema()]
        state, wanted = record.state_of(n for n, _, _ in have), self.cfg.experts.state
        if state != wanted:
            self.store.close()
            raise ConfigError(
                f"the expert store {path} holds {state}-state records, but the config says experts.state = "
                f"{wanted!r}; set experts.state = {state!r} to use it, or train with --fresh to make a new store")
        if (self.store.num_layers, self.store.num_experts) != (len(self.switch_layers), self.n_experts) or have != want:
            self.store.close()
            raise ConfigError(
                f"the expert store {path} holds {self.store.num_layers} layers x {self.store.num_experts} experts with "
                f"records {have}, but the config needs {len(self.switch_layers)} x {self.n_experts} with {want} "
                f"(model.* or experts.dtype changed); train with --fresh or point experts.store_dir elsewhere")

    def _choose_read_write(self, path: Path) -> tuple[str, dict]:
        """experts.read_write resolved ("together" or "turns") and set on the store, with the
        disk probe's rates where "auto" ran it (gmtier.store.disk.read_write_turns)."""
        choice, rates = self.cfg.experts.read_write, {}
        if choice == "auto":
            choice = "together"  # where RAM holds every record nothing is written between commits
            if not self.plan.all_in_ram:
                try:
                    turns, rates = disk.read_write_turns(path / DATA_FILE, path, threads=self.cfg.experts.io_threads)
                except OSError as e:  # a full disk, say: the probe's scratch file could not be written
                    self.log(f"experts.read_write = auto: the disk probe failed ({e}); reads and writes run together")
                else:
                    choice = "turns" if turns else "together"
                    self.log(f"experts.read_write = auto: {choice} (disk probe, GB/s: read {rates['read_gbps']:.2f}, "
                             f"write {rates['write_gbps']:.2f}, both at once {rates['together_gbps']:.2f}, in turns "
                             f"{rates['turns_gbps']:.2f})")
        self.store.core.set_turn_bytes(disk.TURN_BYTES if choice == "turns" else 0)
        return choice, rates

    def _create(self, path: Path, overwrite: bool) -> None:
        """A new store filled from the seeded init, one record at a time, committed as step 0."""
        m, seed = self.cfg.model, self.cfg.train.seed
        t0 = time.perf_counter()

        def init(layer: int, expert: int) -> dict[str, torch.Tensor]:
            w1, w2 = expert_bank.init_expert(seed, self.switch_layers[layer], self.expert_id(layer, expert), m.d_model, m.d_ff,
                                             m.init_std, m.n_layer)
            return record.initial_record(w1, w2, self.dtype, self.cfg.experts.state)

        n_records = len(self.switch_layers) * m.n_experts
        with progress.bar(total=n_records, desc="creating expert store", unit="expert") as bar:
            TieredExpertStore.create(path, len(self.switch_layers), m.n_experts, self.cfg.expert_schema(),
                                     init=progress.counted(init, bar), user_meta=json.dumps({"step": 0}),
                                     overwrite=overwrite, spare_slots=self.cfg.spare_slots())
        self.log(f"created expert store {path}: {len(self.switch_layers)} layers x {m.n_experts} experts "
                 f"in {time.perf_counter() - t0:.1f}s")

    def bank(self, layer: int) -> TieredExperts:
        return TieredExperts(self, layer)

    def attach(self, model) -> None:
        """Start predicting for `model` (a GPT whose Switch banks are this runtime's) where it pays."""
        if self.prefetcher.predicts:
            self.prefetcher.route_votes = model.route_votes
            model.set_block_input_hook(self.prefetcher.on_block_input)
        else:
            model.set_block_input_hook(None)

    def committed_step(self) -> int | None:
        """The step of the store's last commit; refused where the store committed on its own
        since (its spare slots ran out): its experts are then past that step."""
        if n := self.store.interim_commits():
            raise StoreError(
                f"the expert store {self.cfg.store_dir()} made {n} commits of its own after its last checkpoint "
                f"(more experts changed than its {self.store.spare_slots} spare record slots hold), so some "
                f"experts are newer than that checkpoint and the run cannot resume exactly; start over with --fresh, "
                f"and raise experts.spare_slots (or checkpoint more often) to keep checkpoints exact")
        meta = self.store.user_meta()
        return json.loads(meta).get("step") if meta else None

    def observe(self, slot: int, counts: list[int]) -> None:
        self.prefetcher.observe(slot, counts)

    # ---- forward / backward of one layer ------------------------------------------------------
    def _each_expert(self, layer: int, counts: list[int], compute, done, sections: str, compute_group=None) -> None:
        """For every expert with tokens, in order: `compute(e, start, n, w1, w2)` (enqueues its
        kernels), then `done([key])` (release, or hand over to the AdamW). `sections`: what of
        the record the step needs in RAM ("weights" in forward, "state"/"all" in backward).

        Experts that need no read are taken in one call up front: in forward those whose
        current weights are on the GPU (released together at the end), in backward all of them
        when the RAM tier holds every record. With `compute_group`, runs of them that follow
        one another in the row order go to `compute_group([(e, start, n, w1, w2), ...])` in one
        call instead (which calls `done` itself in backward). The others are paged one ahead:
        the next one is acquired after the current one's kernels are enqueued, so its read and
        H2D copy overlap that compute; in forward those whose weights are in RAM come first."""
        keys = [(layer, e) for e, c in enumerate(counts) if c]
        pf = self.prefetcher
        pf.layer_demanded(layer)
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
        runs = self._ready_runs(keys, ready, counts) if compute_group is not None else {}
        in_runs = {k for run in runs.values() for k in run}
        paged = [k for k in keys if k not in ready]
        held = set()
        if sections == "weights" and len(paged) > 1 and not self.all_in_ram:
            # Forward: the experts whose weights are in RAM go first, pinned until their turn. In
            # expert order the reads of the ones before them would evict them first, as the least
            # recently used (the step before's; the step's last updates stay in RAM for this).
            held = {k for k, s in zip(paged, self.store.pin_resident(paged, "weights")) if s is not None}
            if held:
                paged = [k for k in paged if k in held] + [k for k in paged if k not in held]
                order = iter(paged)
                keys = [k if k in ready else next(order) for k in keys]
        room = self.plan.prefetch_room if pf.reads_ahead else 0
        try:
            ahead = {paged[0]: self.store.acquire(paged[0], priority=10, sections=sections)} if paged else {}
            j = 0  # position in `paged` of the expert acquired ahead
            for key in keys:
                if key in runs:
                    compute_group([(k[1], starts[k[1]], counts[k[1]], ready[k]["w1"], ready[k]["w2"]) for k in runs[key]])
                    pf.pump_gpu(reserve=max(0, len(paged) - j))
                    continue
                if key in in_runs:
                    continue
                w = ready.get(key) or ahead.pop(key)
                if key not in ready and room:
                    pf.read_ahead(paged[j + 2: j + 2 + room], 5, sections)
                e = key[1]
                compute(e, starts[e], counts[e], w["w1"], w["w2"])
                if key not in ready:
                    j += 1
                    if j < len(paged):
                        ahead[paged[j]] = self.store.acquire(paged[j], priority=10, sections=sections)
                    done([key])
                    if key in held:
                        held.discard(key)
                        self.store.unpin([key])
                elif sections != "weights":
                    done([key])  # backward: each update starts as soon as its dW is on its way
                pf.pump_gpu(reserve=max(0, len(paged) - j - 1))
        finally:
            if held:
                self.store.unpin(list(held))
        if sections == "weights" and ready:
            done(list(ready))

    def _ready_runs(self, keys, ready, counts) -> dict:
        """Runs of two or more experts of `ready` one after another in `keys`, of at most
        `chunk_rows` rows together (one with more runs alone, in chunks): first key -> the run."""
        runs, run, rows = {}, [], 0
        for key in [*keys, None]:
            n = counts[key[1]] if key is not None else 0
            if key is None or key not in ready or n > self.chunk_rows or rows + n > self.chunk_rows:
                if len(run) > 1:
                    runs[run[0]] = run
                run, rows = [], 0
            if key is not None and key in ready and n <= self.chunk_rows:
                run.append(key)
                rows += n
        return runs

    def forward(self, layer: int, x_sorted: torch.Tensor, counts: list[int], layout=None,
                training: bool = False) -> torch.Tensor:
        """`layout`: `gemm_row_layout(counts, self.pad_rows, ...)` where the caller has it;
        `training`: a backward of this layer follows in the step."""
        self.used[layer] = [e for e, c in enumerate(counts) if c]
        # The last Switch layer's backward is the first one: its state is read from now, behind
        # this layer's weights, while the disk has little else to do until backward (the head and
        # the blocks after it run first).
        last = training and layer == len(self.switch_layers) - 1
        if last:
            self.read_ahead_state(layer)
        # One dtype conversion (and row padding) per layer, not per expert: the loop is host-bound
        # at small experts, and each conversion is another kernel launch.
        counts_p, rows = layout or gemm_row_layout(counts, self.pad_rows, x_sorted.device)
        xs = to_gemm_rows(x_sorted.to(self.dtype), rows, sum(counts_p))
        out = torch.empty_like(xs)

        def compute(e, s, n, w1, w2):
            with torch.no_grad(), torch.autocast(x_sorted.device.type, enabled=False):
                for c, k in chunks(s, n, self.chunk_rows):
                    expert_bank.expert_ffn(xs[c:c + k], w1, w2, out=out[c:c + k])

        def compute_group(items):
            s0, end = items[0][1], items[-1][1] + items[-1][2]
            with torch.no_grad(), torch.autocast(x_sorted.device.type, enabled=False):
                w1, w2 = (expert_bank.stacked([it[i] for it in items]) for i in (3, 4))
                offs = expert_bank.group_ends([it[2] for it in items], xs.device)
                out[s0:end] = expert_bank.grouped_ffn(xs[s0:end], w1, w2, offs)[0]

        t0 = time.perf_counter()
        with self.figures.per_layer(layer):
            self._each_expert(layer, counts_p, compute, self.store.release, "weights",
                              compute_group if self.gemm == "grouped" else None)
        self.figures.stats["expert_fwd_s"] += time.perf_counter() - t0
        if last:
            self.ahead_of_backward(layer)  # now also onto the GPU, the layer's own copies done
        return from_gemm_rows(out, rows).to(x_sorted.dtype)

    def backward(self, layer: int, x_sorted: torch.Tensor, grad_out: torch.Tensor, counts: list[int],
                 layout) -> torch.Tensor:
        """`layout`: the `gemm_row_layout` forward used."""
        if self.figures.phase == "fwd":
            self.figures.enter_phase("bwd")
        counts_p, rows = layout
        xs = to_gemm_rows(x_sorted.to(self.dtype), rows, sum(counts_p))
        dys = to_gemm_rows(grad_out.to(self.dtype), rows, sum(counts_p))  # zero rows: no dW from padding
        dx = torch.empty_like(xs)
        self.ahead_of_backward(layer - 1)

        gpu = self.store.gpu if self.store.gpu.active else None
        used = [e for e, c in enumerate(counts) if c]
        group_of = self.updates.groups(used)
        # Backward's last updates of the step (the first Switch layer's last experts, in the
        # loop's order) are written back while the next forward runs.
        n = min(self.plan.deferred_writes, len(used)) if layer == 0 else 0
        deferred = {(layer, e) for e in used[len(used) - n:]}
        staged: dict[int, dict] = {}  # expert -> its GPU staging views, for the group being computed
        first_slot: dict[int, int] = {}  # group's first expert -> its first staging slot
        grads: dict[int, dict] = {}  # expert -> its dW on the CPU (no GPU tier)

        def compute(e, s, n, w1, w2):
            with torch.no_grad(), torch.autocast(x_sorted.device.type, enabled=False):
                group = group_of[e]
                if gpu is not None and e == group[0]:
                    first_slot[e], views = gpu.grad_buffers(len(group))
                    staged.update(zip(group, views))
                dw = staged.pop(e, None)
                for i, (c, k) in enumerate(chunks(s, n, self.chunk_rows)):
                    _, dw = expert_bank.expert_ffn_backward(xs[c:c + k], w1, w2, dys[c:c + k], out=dw, dx=dx[c:c + k],
                                                            accumulate=i > 0)
                if gpu is None:
                    grads[e] = dw

        def done(keys):
            for key in keys:
                group = group_of[key[1]]
                if key[1] != group[-1]:
                    continue  # its update leaves with the group's last expert
                group_keys = [(layer, e) for e in group]
                if gpu is not None:
                    host = self.store.grads_to_host(group_keys, staging=first_slot.pop(group[0]),
                                                    fill_weights=not self.half)
                else:
                    host = self.store.grads_to_host(group_keys, [grads.pop(e) for e in group])
                self.updates.submit(group_keys, host, defer=[k for k in group_keys if k in deferred])

        def compute_group(items):
            """Grouped GEMMs for dx of the run, then its dW update group by group: each group's dW
            goes to its staging slots and leaves (done) before the next group takes slots."""
            s0, end = items[0][1], items[-1][1] + items[-1][2]
            with torch.no_grad(), torch.autocast(x_sorted.device.type, enabled=False):
                w1, w2 = (expert_bank.stacked([it[i] for it in items]) for i in (3, 4))
                x, dy = xs[s0:end], dys[s0:end]
                offs = expert_bank.group_ends([it[2] for it in items], xs.device)
                a = expert_bank.grouped_pre_activation(x, w1, offs)
                dx[s0:end], h, da = expert_bank.grouped_ffn_dx(x, a, w1, w2, dy, offs)
                i = 0
                while i < len(items):
                    group = group_of[items[i][0]]
                    part = [it for it in items[i:] if it[0] in group]
                    r0, r1 = part[0][1] - s0, part[-1][1] + part[-1][2] - s0
                    dw1, dw2 = expert_bank.grouped_ffn_dw(x[r0:r1], h[r0:r1], da[r0:r1], dy[r0:r1],
                                                          expert_bank.group_ends([it[2] for it in part], xs.device))
                    dst, src = [], []
                    for k, it in enumerate(part):
                        e = it[0]
                        if gpu is None:
                            grads[e] = {"w1": dw1[k], "w2": dw2[k]}
                            continue
                        if e == group[0]:
                            first_slot[e], views = gpu.grad_buffers(len(group))
                            staged.update(zip(group, views))
                        view = staged.pop(e)
                        dst += [view["w1"], view["w2"]]
                        src += [dw1[k], dw2[k]]
                    if dst:
                        torch._foreach_copy_(dst, src)
                    done([(layer, it[0]) for it in part])
                    i += len(part)

        t0 = time.perf_counter()
        with self.figures.per_layer(layer):
            # Only the state is read where the GPU holds the weights (see `self.half`).
            self._each_expert(layer, counts_p, compute, done, "state",
                              compute_group if self.gemm == "grouped" else None)
        self.figures.stats["expert_bwd_s"] += time.perf_counter() - t0
        return from_gemm_rows(dx, rows).to(x_sorted.dtype)

    def ahead_of_backward(self, layer: int) -> None:
        """Read ahead what the backward of Switch layer `layer` will page in (called as the
        backward of the layer after it starts, and, in a layer-major step, again once that
        layer's experts are done, when RAM has room and dense recompute is ahead)."""
        if layer < 0:
            return
        self.read_ahead_state(layer)
        if self.plan.gpu_prefetch:
            self.prefetcher.want_on_gpu([(layer, e) for e in reversed(self.used.get(layer, []))], 1)

    def read_ahead_state(self, layer: int) -> None:
        """Read into RAM what the backward of Switch layer `layer` pages in, as far as the RAM
        budget's read-ahead room goes: backward walks the layers in reverse, and forward already
        told us which experts the layer used, so the guess is exact."""
        pf, room = self.prefetcher, self.plan.prefetch_room
        if pf.reads_ahead and room:
            used = self.used.get(layer, [])[-room:]
            pf.read_ahead([(layer, e) for e in reversed(used)], 1, "state")

    # ---- steps --------------------------------------------------------------------------------
    def begin_step(self, lr: float, grad_scale: float = 1.0) -> None:
        self.updates.begin_step(lr, grad_scale)
        self.figures.enter_phase("fwd")

    def end_step(self) -> None:
        """Wait for the expert updates of this step."""
        self.updates.drain()
        if self.figures.phase not in (None, "rest"):
            self.figures.enter_phase("rest")
        self.prefetcher.end_step()

    def metrics(self) -> dict:
        """The runtime's figures since the last call (see metrics.py)."""
        return self.figures.report()

    def commit(self, meta: dict) -> None:
        self.end_step()
        self.store.commit(json.dumps(meta))

    def close(self) -> None:
        self.end_step()
        self.updates.close()
        self.store.close()
