"""Several processes (ranks) training one run, one per GPU (`torchrun --nproc-per-node N -m
gmtier.cli train ...`, or `gmtier train --nproc N`, which launches it): NCCL on GPUs, gloo on CPU.

- Expert parallelism. Each rank owns a contiguous block of every Switch layer's experts
  (`placement`): as many experts as the others, give or take one, the extra ones rotating from
  layer to layer. Every expert moves the same bytes a step (its record: read, updated, written
  back), so equal counts are equal bytes, and contiguous blocks keep a rank's tokens grouped by
  owner in the order routing sorts them in. A rank has its own store (`<run_dir>/rank-<r>/store`,
  or `experts.store_dir/rank-<r>`) holding only its experts, its own RAM and GPU tiers, I/O pool
  and AdamW threads, pinned to its own share of the machine's cores.
- Budgets. `experts.ram_budget` and `train.activations_ram_budget` are the machine's: each rank
  gets its share (1/N of them); `experts.gpu_budget` and `train.activations_gpu_budget` are per
  GPU, so per rank. A share too small to work is refused (`rank_config`).
- Routing is over the step's tokens: the ranks exchange their tokens-per-expert counts
  (`Ranks.route_sync`), so capacity, the drop order (rank 0's tokens first, then rank 1's, ...)
  and the load-balancing shares are those of one process running the whole step. Rank r takes
  the r-th contiguous share of the step's sequences (`Ranks.shard`).
- Tokens move by all-to-all (`ExpertParallel`): the per-expert counts are exchanged, then one
  variable-size `all_to_all_single` takes every kept token to its expert's rank and another
  brings the outputs back; in backward the output gradients go the same way and the input
  gradients come back (one exchange each way per Switch layer and direction). With resident
  experts the exchange goes in groups of experts and overlaps their compute
  (`ExpertParallel._groups`; in the layer-major step too).
- The dense part is data-parallel: its gradients are averaged over the ranks in one all-reduce
  of a flat buffer a step (`Ranks.average_dense_grads`), so it stays identical on every rank.
  Each rank's loss is the mean over its tokens, so the mean over the ranks is the step's; the
  experts' gradients, which gather the tokens of every rank, are divided by the world size on
  their way back.
- Checkpoints (`RankRunDir`): each rank writes `rank-<r>/ckpt-<S>` (dense weights, optimizer,
  RNGs; in resident mode its experts too) and flushes its store; after a barrier each commits
  its store at step S; after another, rank 0 writes `latest.json` (with the world size). A kill
  before every rank has committed leaves every store at the previous checkpoint (resumed from
  there); a kill after leaves every store at S with every dense half on disk (resumed from S).
  A kill inside the commit window itself (index replacements, after every flush) can leave
  some stores at S and the others at the previous checkpoint: before it commits, each rank
  keeps its store's last commit as `index.prev.json`, and a resume puts that back on the ranks
  that are ahead (`align_stores`: nothing has been written since, so the records it names are
  intact and checked by CRC on open), so every rank resumes from the previous checkpoint.
  Resuming with another world size is refused (the experts are split by it).
- Evaluation of such a run takes one process (`load_ranks_checkpoint`): every rank's experts,
  from its checkpoint (resident) or its store (tiered, `StitchedExperts`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from gmtier.checkpoint import CheckpointError, RunDir, fsync_dir, write_atomic
from gmtier.config import Config, ConfigError, parse_bytes
from gmtier.experts.bank import from_gemm_rows, gemm_row_layout, to_gemm_rows
from gmtier.store.tiered import INDEX_FILE, data_file_bytes


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def placement(n_experts: int, n_layers: int, world: int) -> list[list[int]]:
    """Per Switch layer, the world + 1 bounds of the ranks' contiguous blocks of experts (rank r
    owns experts bounds[r] .. bounds[r+1] - 1). Blocks differ by at most one expert; the ranks
    that get one more rotate with the layer, so no rank takes the extra of every layer."""
    q, rem = divmod(n_experts, world)
    bounds = []
    for layer in range(n_layers):
        extra = {(layer * rem + k) % world for k in range(rem)}
        bounds.append(list(itertools.accumulate((q + (r in extra) for r in range(world)), initial=0)))
    return bounds


class Ranks:
    """This process's place among the ranks of a run, and the collectives the trainer uses."""

    def __init__(self, rank: int, world: int, local_rank: int, local_world: int, device: str):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world
        self.device = device
        self.bounds: list[list[int]] = []  # set by rank_config (placement)
        self.switch_layers: list[int] = []

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # ---- setup ----------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: Config) -> "Ranks | None":
        """Join the process group torchrun describes (None in a single process): NCCL where the
        run is on CUDA (rank r on cuda:<local rank>), gloo on CPU. Pins the process to its share
        of the cores (its AdamW and I/O threads inherit it)."""
        world = world_size_from_env()
        if world <= 1:
            return None
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        device = cfg._device()
        if device.startswith("cuda"):
            if device != "cuda":
                raise ConfigError(f"train.device = {device!r} names one GPU, but the run has {world} ranks, each on "
                                  f"its own GPU (rank r on cuda:<local rank>); use train.device = 'cuda' or 'auto'")
            cfg.device()  # CUDA must be there
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"rank {rank} is local rank {local_rank} but this machine has "
                                  f"{torch.cuda.device_count()} GPU(s); launch at most that many processes per node")
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        ranks = cls(rank, world, local_rank, local_world, device)
        if not dist.is_initialized():
            timeout = timedelta(seconds=float(os.environ.get("GMTIER_DIST_TIMEOUT_S", "600")))
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
        ranks._pin_cores()
        return ranks

    def _pin_cores(self) -> None:
        """This rank's contiguous share of the cores the process may use (all of them where
        there are fewer cores than ranks on the machine)."""
        if not hasattr(os, "sched_setaffinity"):
            return
        cores = sorted(os.sched_getaffinity(0))
        n = len(cores) // self.local_world
        if n >= 1:
            mine = cores[self.local_rank * n:(self.local_rank + 1) * n]
            os.sched_setaffinity(0, mine)
            torch.set_num_threads(len(mine))

    def rank_config(self, cfg: Config) -> Config:
        """This rank's view of the run's config: its share of the machine's RAM budgets, its own
        store and spill directories, its GPU; the model and data sections are the run's own
        objects (what the trainer learns of them, e.g. the vocabulary, holds for both)."""
        m, e, t = cfg.model, cfg.experts, cfg.train
        self.switch_layers = m.switch_layers()
        if self.switch_layers and m.n_experts < self.world:
            raise ConfigError(f"model.n_experts = {m.n_experts} is less than the {self.world} ranks: every rank needs "
                              f"at least one expert of each Switch layer; use at most {m.n_experts} processes")
        self.bounds = placement(m.n_experts, len(self.switch_layers), self.world)
        r = self.rank
        ram = parse_bytes(e.ram_budget, "experts.ram_budget")
        act_ram = parse_bytes(t.activations_ram_budget, "train.activations_ram_budget")
        run_dir = Path(t.run_dir)
        store = Path(e.store_dir) / f"rank-{r}" if e.store_dir else run_dir / f"rank-{r}" / "store"
        spill = Path(t.activations_dir) / f"rank-{r}" if t.activations_dir else run_dir / f"rank-{r}" / "activations"
        experts = dataclasses.replace(e, ram_budget=ram // self.local_world, store_dir=str(store))
        train = dataclasses.replace(t, activations_ram_budget=act_ram // self.local_world, activations_dir=str(spill),
                                    device="cpu" if self.device == "cpu" else "cuda")
        out = dataclasses.replace(cfg, experts=experts, train=train)
        if e.mode == "tiered" and self.switch_layers:
            _, record = self.store_config(out).expert_bytes()
            if experts.ram_budget < 2 * record:
                raise ConfigError(
                    f"experts.ram_budget = {e.ram_budget!r} is the machine's, shared by its {self.local_world} ranks: "
                    f"{experts.ram_budget} B each, fewer than the 2 expert records of {record} B a rank needs; raise it "
                    f"to at least {2 * record * self.local_world} B "
                    f"({-(-2 * record * self.local_world // 2**20)}MiB) or run fewer processes")
        return out

    # ---- placement ------------------------------------------------------------------------
    def block(self, slot: int) -> tuple[int, int]:
        """(first, end) of this rank's experts of Switch layer `slot` (the store's layer index)."""
        b = self.bounds[slot]
        return b[self.rank], b[self.rank + 1]

    def owned(self, layer: int) -> list[int]:
        """This rank's experts of the Switch layer in block `layer`."""
        lo, hi = self.block(self.switch_layers.index(layer))
        return list(range(lo, hi))

    def store_experts(self) -> int:
        """Experts per layer of this rank's store: its largest block (a smaller block leaves a
        record unused)."""
        return max(b[self.rank + 1] - b[self.rank] for b in self.bounds)

    def store_config(self, cfg: Config) -> Config:
        """The config of this rank's store and expert runtime: its experts only."""
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_experts=self.store_experts()))

    def expert_id(self, slot: int, e: int) -> int:
        """The model's expert that record `e` of layer `slot` of this rank's store is (an unused
        record gets an id past the model's experts: its own seeded init, never trained)."""
        lo, hi = self.block(slot)
        return lo + e if lo + e < hi else self.bounds[slot][-1] + e

    def parallel_bank(self, bank):
        """`bank(layer)` (the local bank of block `layer`) wrapped to take the whole layer's tokens."""
        return lambda layer: ExpertParallel(self, self.switch_layers.index(layer), bank(layer))

    def attach(self, model, runtime=None) -> None:
        """Route `model`'s Switch layers over the step's tokens; predict this rank's own experts
        (the tiered runtime's prefetch, from this rank's tokens)."""
        for ffn in model.switch_blocks():
            ffn.route_sync = self.route_sync
        if runtime is not None and runtime.prefetcher.route_votes is not None:
            votes = runtime.prefetcher.route_votes
            n_store = self.store_experts()

            def local_votes(blocks, x):
                v = votes(blocks, x)
                out = v.new_zeros((len(blocks), n_store))
                for k, b in enumerate(blocks):
                    lo, hi = self.block(self.switch_layers.index(b))
                    out[k, :hi - lo] = v[k, lo:hi]
                return out

            runtime.prefetcher.route_votes = local_votes

    # ---- collectives ----------------------------------------------------------------------
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """`t` where the backend takes it (NCCL: the GPU; gloo: the CPU)."""
        return t.to(self.device) if self.device.startswith("cuda") else t.cpu()

    def route_sync(self, counts: torch.Tensor):
        """For `route`: (the step's tokens per expert, those of the ranks before this one, the
        step's token count) from this rank's tokens per expert."""
        parts = [torch.empty_like(c) for c in [self._comm(counts)] * self.world]
        dist.all_gather(parts, self._comm(counts))
        parts = [p.to(counts.device) for p in parts]
        total = torch.stack(parts).sum(0)
        before = sum(parts[:self.rank], torch.zeros_like(counts))
        return total, before, int(round(total.sum().item()))

    def gather_counts(self, counts: list[int]) -> list[list[int]]:
        """Every rank's tokens per expert of one layer (each rank's `counts`)."""
        mine = self._comm(torch.tensor(counts, dtype=torch.int64))
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        return torch.stack(parts).tolist()

    def all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """Rows `in_splits[k]` of `x` (in order) to rank k; `out_splits[k]` rows from rank k."""
        return self.start_all_to_all(x, out_splits, in_splits).wait()

    def start_all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> "_InFlight":
        """`all_to_all` started and not waited for: its `wait()` gives the rows received."""
        x = x.detach().contiguous()
        sent = self._comm(x)
        out = sent.new_empty((sum(out_splits), *x.shape[1:]))
        work = dist.all_to_all_single(out, sent, out_splits, in_splits, async_op=True)
        return _InFlight(work, sent, out, x.device)

    def average_dense_grads(self, model: nn.Module) -> None:
        """Average the dense part's gradients over the ranks: one all-reduce of a flat buffer
        (a parameter without a gradient on this rank counts zero)."""
        params = [p for n, p in model.named_parameters() if p.requires_grad and ".experts." not in n]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self._comm(torch.cat([g.reshape(-1) for g in grads]))
        dist.all_reduce(flat)
        flat = flat.to(grads[0].device).div_(self.world)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def mean(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """The mean over the ranks of each 0-d tensor."""
        both = self._comm(torch.stack([v.detach().float().reshape(()) for v in values]))
        dist.all_reduce(both)
        return list((both / self.world).cpu().unbind())

    def any(self, flag: bool) -> bool:
        t = self._comm(torch.tensor([int(flag)]))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a step's rows (sequences)."""
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def barrier(self) -> None:
        dist.barrier()

    def gather_object(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- the token exchange -----------------------------------------------------------------

@dataclasses.dataclass
class _InFlight:
    """An all-to-all on its way: what it sends is kept alive until `wait()` returns what came."""
    work: object
    sent: torch.Tensor
    out: torch.Tensor
    device: torch.device

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.out.to(self.device)


# Groups of a rank's experts per Switch layer whose token exchanges overlap the others' compute
# (resident banks; `ExpertParallel._groups`).
EXCHANGE_CHUNKS = 2


@dataclasses.dataclass
class _Plan:
    """Where one layer's tokens go and come from (see `ExpertParallel`)."""
    send: list[int]  # rows this rank sends to each rank
    recv: list[int]  # rows it receives from each rank
    local_counts: list[int]  # tokens of each of its experts, from all ranks
    perm: torch.Tensor | None  # received rows (by source rank, then expert) -> by expert, then source rank
    inv: torch.Tensor | None  # the inverse
    parts: list[slice] | None = None  # a group's (`_groups`): this rank's rows it sends to each rank


def _regroup(mine: list[list[int]], device):
    """Received rows come in segments (source rank, expert), `mine[src][e]` rows each; the
    permutation that takes them by (expert, source rank), the order one process would have, and
    its inverse (None, None where there are none)."""
    c = torch.tensor(mine, dtype=torch.int64)  # [ranks, experts]
    if not c.numel() or not c.sum():
        return None, None
    first = (c.flatten().cumsum(0) - c.flatten()).view_as(c).t().flatten()  # each segment's first row
    n = c.t().flatten()  # segment lengths in the new order
    perm = torch.repeat_interleave(first - (n.cumsum(0) - n), n) + torch.arange(int(n.sum()))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    return perm.to(device), inv.to(device)


class _Exchange(torch.autograd.Function):
    """An all-to-all whose backward sends the gradients back the way the rows came, times
    `grad_scale`. `keep` (a tensor or None): an input whose graph must reach backward even
    where the rows of this rank have none (its gradient is zero): every rank's backward must
    run the same exchanges."""

    @staticmethod
    def forward(ctx, x, keep, ranks, out_splits, in_splits, grad_scale):
        ctx.ranks, ctx.out_splits, ctx.in_splits, ctx.grad_scale = ranks, out_splits, in_splits, grad_scale
        ctx.keep_shape = None if keep is None else keep.shape
        return ranks.all_to_all(x, out_splits, in_splits)

    @staticmethod
    def backward(ctx, g):
        dx = ctx.ranks.all_to_all(g, ctx.in_splits, ctx.out_splits)
        if ctx.grad_scale != 1:
            dx = dx * ctx.grad_scale
        keep = None if ctx.keep_shape is None else g.new_zeros(ctx.keep_shape)
        return dx, keep, None, None, None, None


class _Arrived(_Exchange):
    """`_Exchange` whose all-to-all was started before (`Ranks.start_all_to_all` of x): forward
    waits for it; backward sends the gradients back as `_Exchange` does."""

    @staticmethod
    def forward(ctx, x, keep, ranks, out_splits, in_splits, grad_scale, in_flight):
        ctx.ranks, ctx.out_splits, ctx.in_splits, ctx.grad_scale = ranks, out_splits, in_splits, grad_scale
        ctx.keep_shape = None if keep is None else keep.shape
        return in_flight.wait()

    @staticmethod
    def backward(ctx, g):
        return (*_Exchange.backward(ctx, g), None)


def chunk_bounds(n_local: int, groups: int) -> list[int]:
    """Bounds of `groups` groups of a rank's `n_local` experts, as even as they go."""
    return [round(i * n_local / groups) for i in range(groups + 1)]


class ExpertParallel(nn.Module):
    """A Switch layer's expert bank across the ranks: takes this rank's kept tokens sorted by
    expert (`counts` over all the layer's experts), runs each on its expert's rank, returns the
    outputs in the same order. `inner` is this rank's bank (`ResidentExperts` of its experts, or
    `TieredExperts` of its store), given the tokens of its experts from every rank, sorted by
    expert and, within an expert, by rank (the order one process would have)."""

    def __init__(self, ranks: Ranks, slot: int, inner: nn.Module):
        super().__init__()
        self.ranks, self.slot, self.inner = ranks, slot, inner
        self.lo, self.hi = ranks.block(slot)
        # ResidentExperts holds exactly its experts; a store may hold one record more.
        self.n_local = len(inner.w1) if hasattr(inner, "w1") else ranks.store_experts()
        # Groups of experts whose exchanges overlap each other's compute. A resident bank takes
        # a group at a time; the tiered runtime pages a layer's experts in one pass (its
        # prediction and paging state is the layer's), so it takes all of them at once.
        self.chunks = EXCHANGE_CHUNKS if hasattr(inner, "w1") else 1

    # The layer-major step pads no rows for this bank: the inner bank's padding is done here.
    pad_rows = 0
    runtime = property(lambda self: getattr(self.inner, "runtime", None))

    def _plan(self, counts: list[int]) -> _Plan:
        every = self.ranks.gather_counts(counts)
        bounds = self.ranks.bounds[self.slot]
        send = [sum(counts[bounds[k]:bounds[k + 1]]) for k in range(self.ranks.world)]
        mine = [row[self.lo:self.hi] for row in every]  # [source rank][my expert]
        recv = [sum(row) for row in mine]
        local = [sum(col) for col in zip(*mine)] if mine else []
        local += [0] * (self.n_local - len(local))
        perm, inv = _regroup(mine, self.ranks.device) if self.ranks.world > 1 else (None, None)
        return _Plan(send, recv, local, perm, inv)

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if self.chunks > 1 and self.ranks.world > 1:
            return self._forward_overlapped(x_sorted, counts)
        p = self._plan(counts)
        w = self.ranks.world
        x_in = _Exchange.apply(x_sorted, None, self.ranks, p.recv, p.send, float(w))
        x_local = x_in if p.perm is None else x_in.index_select(0, p.perm)
        y_local = self.inner(x_local, p.local_counts)
        y_back = y_local if p.inv is None else y_local.index_select(0, p.inv)
        keep = x_in if torch.is_grad_enabled() and x_in.requires_grad and not y_back.requires_grad else None
        return _Exchange.apply(y_back.to(x_sorted.dtype), keep, self.ranks, p.send, p.recv, 1.0 / w)

    def _groups(self, counts: list[int]) -> list[_Plan]:
        """The exchange in groups of experts (`chunk_bounds` of each rank's block, as many groups
        on every rank): each group's `_Plan`, and in `parts` this rank's rows of the sorted
        tokens it sends (to each rank in turn). A group holds whole experts, so the numbers are
        those of one exchange."""
        ranks, w = self.ranks, self.ranks.world
        every = ranks.gather_counts(counts)  # [source rank][expert of the layer]
        bounds = ranks.bounds[self.slot]
        k_groups = max(1, min(self.chunks, *(bounds[r + 1] - bounds[r] for r in range(w))))
        groups = [[bounds[r] + c for c in chunk_bounds(bounds[r + 1] - bounds[r], k_groups)] for r in range(w)]
        starts = list(itertools.accumulate(counts, initial=0))
        mine_bounds = groups[ranks.rank]
        plans = []
        for k in range(k_groups):
            parts = [slice(starts[groups[r][k]], starts[groups[r][k + 1]]) for r in range(w)]
            mine = [row[mine_bounds[k]:mine_bounds[k + 1]] for row in every]  # [source rank][expert of the group]
            local = [0] * self.n_local
            local[mine_bounds[k] - self.lo:mine_bounds[k + 1] - self.lo] = [sum(col) for col in zip(*mine)]
            perm, inv = _regroup(mine, ranks.device)
            plans.append(_Plan([q.stop - q.start for q in parts], [sum(row) for row in mine], local, perm, inv, parts))
        return plans

    def _forward_overlapped(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """`forward` with the exchanges overlapping the experts' compute (`_groups`): every
        group's tokens start on their way at once, each group computes as soon as its tokens are
        in while the later ones are still moving, and its outputs start back at once. In
        backward the exchanges are issued one after another, in the same order on every rank
        (autograd's): every group's output gradients, last group first, then each group's
        backward and its input gradients."""
        ranks, w = self.ranks, self.ranks.world
        plans = self._groups(counts)
        sends = [torch.cat([x_sorted[q] for q in p.parts]) for p in plans]
        flights = [ranks.start_all_to_all(x, p.recv, p.send) for x, p in zip(sends, plans)]
        back = []
        for x_send, p, flight in zip(sends, plans, flights):
            x_in = _Arrived.apply(x_send, None, ranks, p.recv, p.send, float(w), flight)
            x_local = x_in if p.perm is None else x_in.index_select(0, p.perm)
            y_local = self.inner(x_local, p.local_counts)
            y_back = (y_local if p.inv is None else y_local.index_select(0, p.inv)).to(x_sorted.dtype)
            keep = x_in if torch.is_grad_enabled() and x_in.requires_grad and not y_back.requires_grad else None
            back.append((y_back, keep, ranks.start_all_to_all(y_back, p.send, p.recv)))
        outs = [_Arrived.apply(y, keep, ranks, p.send, p.recv, 1.0 / w, f) for (y, keep, f), p in zip(back, plans)]
        return self._in_sorted_order(outs, plans)

    def _in_sorted_order(self, outs: list[torch.Tensor], plans: list[_Plan]) -> torch.Tensor:
        """The groups' returned rows in the sorted tokens' order: rank by rank, its groups in turn."""
        pieces = [o.split(p.send) for o, p in zip(outs, plans)]
        return torch.cat([pieces[k][r] for r in range(self.ranks.world) for k in range(len(plans))])

    # ---- the layer-major step (gmtier.layer_major) ----------------------------------------
    def _to_local(self, t: torch.Tensor, p: _Plan) -> torch.Tensor:
        t = self.ranks.all_to_all(t, p.recv, p.send)
        return t if p.perm is None else t.index_select(0, p.perm)

    def _from_local(self, t: torch.Tensor, p: _Plan) -> torch.Tensor:
        return self.ranks.all_to_all(t if p.inv is None else t.index_select(0, p.inv), p.send, p.recv)

    def step_forward(self, x_sorted: torch.Tensor, counts: list[int]):
        if self.chunks > 1 and self.ranks.world > 1:
            return self._step_forward_overlapped(x_sorted, counts)
        p = self._plan(counts)
        counts_in, rows = gemm_row_layout(p.local_counts, self.inner.pad_rows, x_sorted.device)
        x_local = to_gemm_rows(self._to_local(x_sorted, p), rows, sum(counts_in))
        y_local, saved = self.inner.step_forward(x_local, counts_in)
        return self._from_local(from_gemm_rows(y_local, rows), p).to(x_sorted.dtype), (p, counts_in, rows, saved)

    def step_backward(self, x_sorted, dy_sorted, counts, saved) -> torch.Tensor:
        """The step's inputs travel again with their output gradients, in one exchange (rather
        than kept on this rank through the step)."""
        if isinstance(saved, _GroupsSaved):
            return self._step_backward_overlapped(x_sorted, dy_sorted, saved)
        p, counts_in, rows, inner_saved = saved
        d = x_sorted.shape[1]
        both = self._to_local(torch.cat([x_sorted, dy_sorted.to(x_sorted.dtype)], 1), p)
        x_local = to_gemm_rows(both[:, :d], rows, sum(counts_in))
        dy_local = to_gemm_rows(both[:, d:] / self.ranks.world, rows, sum(counts_in))
        dx = self.inner.step_backward(x_local, dy_local, counts_in, inner_saved)
        return (self._from_local(from_gemm_rows(dx, rows), p) * self.ranks.world).to(x_sorted.dtype)


    # The layer-major step with the exchanges in groups of experts (`_groups`), each group's
    # compute overlapping the later groups' exchanges, as in `_forward_overlapped`.
    def _step_forward_overlapped(self, x_sorted: torch.Tensor, counts: list[int]):
        ranks, device = self.ranks, x_sorted.device
        plans = self._groups(counts)
        flights = [ranks.start_all_to_all(torch.cat([x_sorted[q] for q in p.parts]), p.recv, p.send) for p in plans]
        back, layouts = [], []
        for p, flight in zip(plans, flights):
            x_in = flight.wait()
            counts_in, rows = gemm_row_layout(p.local_counts, self.inner.pad_rows, device)
            x_local = to_gemm_rows(x_in if p.perm is None else x_in.index_select(0, p.perm), rows, sum(counts_in))
            y_local, inner_saved = self.inner.step_forward(x_local, counts_in)
            y_back = from_gemm_rows(y_local, rows)
            y_back = y_back if p.inv is None else y_back.index_select(0, p.inv)
            back.append(ranks.start_all_to_all(y_back.to(x_sorted.dtype), p.send, p.recv))
            layouts.append((counts_in, rows, inner_saved))
        return self._in_sorted_order([f.wait() for f in back], plans), _GroupsSaved(plans, layouts)

    def _step_backward_overlapped(self, x_sorted, dy_sorted, saved: "_GroupsSaved") -> torch.Tensor:
        ranks, w, d = self.ranks, self.ranks.world, x_sorted.shape[1]
        both = torch.cat([x_sorted, dy_sorted.to(x_sorted.dtype)], 1)
        flights = [ranks.start_all_to_all(torch.cat([both[q] for q in p.parts]), p.recv, p.send) for p in saved.plans]
        back = []
        for p, (counts_in, rows, inner_saved), flight in zip(saved.plans, saved.layouts, flights):
            got = flight.wait()
            got = got if p.perm is None else got.index_select(0, p.perm)
            x_local = to_gemm_rows(got[:, :d], rows, sum(counts_in))
            dy_local = to_gemm_rows(got[:, d:] / w, rows, sum(counts_in))
            dx = from_gemm_rows(self.inner.step_backward(x_local, dy_local, counts_in, inner_saved), rows)
            back.append(ranks.start_all_to_all(dx if p.inv is None else dx.index_select(0, p.inv), p.send, p.recv))
        return (self._in_sorted_order([f.wait() for f in back], saved.plans) * w).to(x_sorted.dtype)


@dataclasses.dataclass
class _GroupsSaved:
    """What the grouped layer-major forward hands its backward: each group's plan and layout."""
    plans: list[_Plan]
    layouts: list[tuple]  # (padded counts, GEMM rows, the inner bank's saved) of each group


# ---- the run directory of a rank ----------------------------------------------------------

class RankRunDir(RunDir):
    """A rank's part of a run directory: `<run_dir>/rank-<r>/` holds its lock, its store (by
    default), its checkpoints `ckpt-<S>` and its spill directory; the run's `config.json`,
    `latest.json`, `metrics.jsonl` and `routing.jsonl` stay at the top, written by rank 0."""

    def __init__(self, run_dir: str | os.PathLike, ranks: Ranks):
        super().__init__(Path(run_dir) / f"rank-{ranks.rank}")
        self.ranks = ranks
        self.top = RunDir(run_dir)
        self.top.world_size = self.world_size = ranks.world
        if ranks.leader:
            self.metrics, self.routing = self.top.metrics, self.top.routing

    def clear(self) -> None:
        """--fresh: each rank clears its own directory; rank 0 the run's files and the
        directories of ranks this run does not have."""
        super().clear()
        if self.ranks.leader:
            for entry in self.top.path.iterdir():
                if entry.name.startswith("rank-") and entry.name[5:].isdigit() and int(entry.name[5:]) < self.world_size:
                    continue
                if entry.name != "lock":
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.ranks.barrier()

    def saved_config(self) -> dict:
        return self.top.saved_config()

    def write_config(self, cfg: Config) -> None:
        if self.ranks.leader:
            self.top.write_config(cfg)

    def latest_step(self) -> int | None:
        return self.top.latest_step()

    def resume_step(self, runtime) -> int:
        """The step every rank resumes from; refused on every rank where one cannot."""
        try:
            mine, error = super().resume_step(runtime), None
        except (CheckpointError, RuntimeError, ValueError) as e:  # StoreError is a RuntimeError
            mine, error = None, str(e)
        every = self.ranks.gather_object((mine, error))
        errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(every) if e]
        if errors:
            raise CheckpointError("; ".join(errors))
        steps = [s for s, _ in every]
        if len(set(steps)) > 1:
            raise CheckpointError(
                f"{self.top.path}: the ranks' expert stores are at different checkpoints "
                f"({', '.join(f'rank {r}: step {s}' for r, s in enumerate(steps))}) and the ranks ahead kept no "
                f"{_PREV_INDEX} of the step before (the run was killed while its ranks were committing one "
                f"checkpoint, by a gmtier that kept none, or the stores were changed by hand), so it cannot "
                f"resume exactly; restore the run directory from a backup or start over with --fresh")
        return steps[0]

    def align_stores(self, store_dir: Path) -> None:
        """Before a resume opens the stores: where a kill landed inside the commit window (some
        ranks' stores committed at step S, the others' still at the checkpoint before), the
        ranks ahead put back the commit they kept (`index.prev.json`, written just before they
        committed S; no record has been written since), so all are at the checkpoint before.
        Where that cannot be done, the stores are left as they are and `resume_step` refuses."""
        index, prev = store_dir / _INDEX, store_dir / _PREV_INDEX
        mine = _committed_step(index)
        steps = [s for s in self.ranks.gather_object(mine) if s is not None]
        if len(set(steps)) > 1 and mine is not None and mine > min(steps) and _committed_step(prev) == min(steps):
            os.replace(prev, index)
            fsync_dir(store_dir)
        self.ranks.barrier()

    def save(self, step: int, model, opt, data_rng, scaler, device: str, runtime) -> Path:
        """Checkpoint `step` on every rank (see the module docstring for the order)."""
        final = self.write_dense(step, model, opt, data_rng, scaler, device)
        if runtime is not None:
            runtime.end_step()
            runtime.store.flush()  # the slow part of the commit, before the barrier
            # The last commit, for `align_stores` should another rank not reach this one.
            store_dir = runtime.cfg.store_dir()
            write_atomic(store_dir / _PREV_INDEX, (store_dir / _INDEX).read_bytes())
        self.ranks.barrier()
        if runtime is not None:
            runtime.commit({"step": step})
        self.ranks.barrier()
        if self.ranks.leader:
            self.top.mark_latest(step)
        self.ranks.barrier()
        self.prune(step)
        return final


# ---- a run of several ranks, in one process (evaluation, generation) ------------------------

class StitchedExperts(nn.Module):
    """A Switch layer of a run trained by several ranks, in one process: each rank's bank (its
    store's `TieredExperts`) holds its contiguous block of the layer's experts (`bounds`, as
    `placement` made them); the tokens sorted by expert go to the bank that holds theirs and the
    outputs come back in the same order. Forward only."""

    def __init__(self, bounds: list[int], banks: list[nn.Module], n_local: list[int]):
        """`n_local[r]`: the experts a layer of rank r's store holds (its largest block)."""
        super().__init__()
        self.bounds, self.banks, self.n_local = bounds, nn.ModuleList(banks), n_local

    def takes_device_routing(self, x: torch.Tensor) -> bool:
        return False

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs, start = [], 0
        for r, bank in enumerate(self.banks):
            mine = list(counts[self.bounds[r]:self.bounds[r + 1]])
            n = sum(mine)
            if n:
                outs.append(bank(x_sorted[start:start + n], mine + [0] * (self.n_local[r] - len(mine))).to(x_sorted.dtype))
            start += n
        return torch.cat(outs) if outs else x_sorted[:0]


class _Runtimes:
    """The expert runtimes of every rank's store, closed together."""

    def __init__(self, runtimes: list):
        self.runtimes = runtimes

    def close(self) -> None:
        for runtime in self.runtimes:
            runtime.close()


_RANK_EXPERT = re.compile(r"blocks\.(\d+)\.ffn\.experts\.inner\.(w[12])\.(\d+)")


def load_ranks_checkpoint(cfg: Config, run: RunDir):
    """(model, runtimes, step): the last checkpoint of a run trained by `run.world_size` ranks, in
    one process on cfg's device, for evaluation. The dense weights are rank 0's (the same on every
    rank). Resident: each rank's checkpoint holds its experts, which go to one resident bank;
    tiered: each rank's store is opened (with its share of the RAM budget, as in training) and
    a `StitchedExperts` reads each layer's experts from the stores that hold them (runtimes:
    None in resident mode)."""
    from gmtier.build import build_model
    from gmtier.experts import ExpertRuntime
    from gmtier.model import GPT

    world, device = run.world_size, cfg.device()
    step = run.checkpoint_step()
    ranks = [Ranks(r, world, r, world, device) for r in range(world)]
    rank_cfgs = [rk.rank_config(cfg) for rk in ranks]
    rank_dirs = [RunDir(run.path / f"rank-{r}") for r in range(world)]
    quiet = lambda *_: None  # noqa: E731
    if cfg.experts.mode != "tiered" or not cfg.model.switch_layers():
        model, _ = build_model(cfg, device, log=quiet)
        weights = {}
        for rk, rank_dir in zip(ranks, rank_dirs):
            for name, w in rank_dir.read_dense(step).items():
                m = _RANK_EXPERT.fullmatch(name)
                if m:  # this rank's k-th expert of the layer is the layer's expert owned(layer)[k]
                    weights[f"blocks.{m[1]}.ffn.experts.{m[2]}.{rk.owned(int(m[1]))[int(m[3])]}"] = w
                elif rk.leader:
                    weights[name] = w
        rank_dirs[0].load_dense(step, model, weights)
        return model, None, step
    runtimes = _Runtimes([])
    try:
        for rk, rank_cfg in zip(ranks, rank_cfgs):
            runtimes.runtimes.append(ExpertRuntime(rk.store_config(rank_cfg), device, create=False, log=quiet,
                                                   expert_id=rk.expert_id))
        steps = [d.step_with_store(step, rt) for d, rt in zip(rank_dirs, runtimes.runtimes)]
        if len(set(steps)) > 1:
            raise CheckpointError(
                f"{run.path}: the ranks' expert stores are at different checkpoints "
                f"({', '.join(f'rank {r}: step {s}' for r, s in enumerate(steps))}): the run was killed while it "
                f"committed one; resume it once (gmtier train --resume --nproc {world}), which settles the "
                f"stores, then evaluate")
        step = steps[0]
        n_local = [rk.store_experts() for rk in ranks]

        def bank(layer):
            slot = ranks[0].switch_layers.index(layer)
            return StitchedExperts(ranks[0].bounds[slot], [rt.bank(layer) for rt in runtimes.runtimes], n_local)

        model = GPT(cfg.model, cfg.train.seed, expert_bank=bank)
        model.to(device)
        rank_dirs[0].load_dense(step, model)
    except BaseException:
        runtimes.close()
        raise
    return model, runtimes, step


def ranks_info(cfg: Config, world: int) -> list[dict]:
    """Per rank of a run trained by `world` ranks on one machine (as `load_ranks_checkpoint`
    assumes): its experts of each Switch layer, its share of the RAM budget, its store and what
    that holds on disk, and the checkpoint step its store was last committed at."""
    from gmtier.evaluate import info as tier_info

    out = []
    for r in range(world):
        rk = Ranks(r, world, r, world, "cpu")
        rank_cfg = rk.rank_config(cfg)
        store = Path(rank_cfg.store_dir())
        own = tier_info(rk.store_config(rank_cfg)) if rk.switch_layers else None
        out.append({
            "rank": r, "experts_per_layer": [b[r + 1] - b[r] for b in rk.bounds],
            "ram_budget_bytes": rank_cfg.experts.ram_budget, "store_dir": str(store),
            "disk_bytes": own["disk_bytes"] if own else 0,
            "disk_bytes_actual": data_file_bytes(store),
            "store_committed_step": _committed_step(store / _INDEX),
        })
    return out


_INDEX, _PREV_INDEX = INDEX_FILE, "index.prev.json"


def _committed_step(index: Path) -> int | None:
    """The checkpoint step a store index was committed at (its caller's metadata), or None where
    the file is missing or unreadable (the store's open reports that) or where the store has
    committed on its own since (its records are then past that step)."""
    try:
        idx = json.loads(index.read_text())
        return None if idx.get("interim_commits") else json.loads(idx["user_meta"]).get("step")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
