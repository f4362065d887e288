"""Router prediction and prefetch for the tiered experts.

While block l computes, the routers of the next Switch layers are applied to block l's input
(the residual stream; the model's `route_votes`) to predict their experts, which are prefetched
into RAM with a priority that falls with distance, and those of the nearest layer on into the
GPU tier as their records reach RAM (one copy at a time, between the current layer's experts).
When the real routing differs, the wrong guesses are corrected: their reads not yet started are
cancelled and their unused copies are the first evicted on both tiers. Precision and recall are
kept per layer (in the runtime's `RuntimeStats`).
"""

from __future__ import annotations

from typing import Callable

import torch

from gmtier.config import Config, ExpertPlan
from gmtier.experts.metrics import RuntimeStats
from gmtier.store import TieredExpertStore

Key = tuple[int, int]


class Prefetcher:
    """Predicts the experts of the Switch layers ahead and reads (and copies) them early."""

    def __init__(self, cfg: Config, plan: ExpertPlan, store: TieredExpertStore, stats: RuntimeStats):
        self.store, self.stats = store, stats
        self.switch_layers = cfg.model.switch_layers()
        self.depth = cfg.experts.prefetch_depth
        self.enabled = cfg.experts.prefetch
        self.room, self.gpu_prefetch, self.all_in_ram = plan.prefetch_room, plan.gpu_prefetch, plan.all_in_ram
        # `route_votes(blocks, x)`: for hidden states x at the input of a block, the tokens each
        # Switch block's router would send to each expert (set by `attach`).
        self.route_votes: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
        self.predicted: dict[int, set[int]] = {}  # Switch layer -> the experts predicted for it
        self.gpu_wanted: list[tuple[Key, int]] = []  # (key, priority) to copy to the GPU early

    @property
    def predicts(self) -> bool:
        """Whether predicting pays: where the RAM budget holds every record, all experts stay in
        RAM after their first read and predicting costs a host sync per block for nothing
        (measured on an H200: `small` ran 0.128 s a step with it, 0.103 s without), unless the
        GPU tier wants the guesses."""
        return self.enabled and (not self.all_in_ram or self.gpu_prefetch)

    @property
    def reads_ahead(self) -> bool:
        """Whether the paging loop reads records ahead into RAM."""
        return self.enabled and not self.all_in_ram

    def end_step(self) -> None:
        self.predicted.clear()
        self.gpu_wanted.clear()

    # ---- read-ahead into RAM ----------------------------------------------------------------
    def read_ahead(self, keys, priority: int, sections: str) -> None:
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

    # ---- prediction ---------------------------------------------------------------------------
    @torch.no_grad()
    def on_block_input(self, block: int, x: torch.Tensor) -> None:
        """Called with block `block`'s input: predict the experts of the next Switch layers
        (after this block) with their own routers and prefetch them, nearest first.

        Predictions are made at the first block and at each block that follows a Switch block
        (the residual stream right after a Switch layer), one host sync for all layers ahead;
        a later prediction replaces an earlier one and the last one made is scored."""
        if self.route_votes is None:
            return
        if block > 0 and block - 1 not in self.switch_layers:
            return
        ahead = [i for i, l in enumerate(self.switch_layers) if l > block][:self.depth]
        if not ahead:
            return
        votes = self.route_votes([self.switch_layers[slot] for slot in ahead], x)
        for rank, (slot, counts) in enumerate(zip(ahead, votes.tolist())):
            experts = sorted((e for e, c in enumerate(counts) if c), key=lambda e: -counts[e])
            dropped = self.predicted.get(slot, set()) - set(experts)
            if dropped:  # an earlier prediction for this layer said otherwise
                self.demote(slot, dropped)
            self.predicted[slot] = set(experts)
            room = self.room if rank == 0 else self.room // 2  # the nearest layer first
            if room and not self.all_in_ram:
                self.read_ahead([(slot, e) for e in experts[:room]], 2 - rank, "weights")
            if rank == 0 and self.gpu_prefetch:
                self.want_on_gpu([(slot, e) for e in experts], 2)
        if block not in self.switch_layers:
            # No experts of this block compete for GPU slots: start the copies whose records are
            # in RAM now (a Switch block starts them between its own experts instead).
            self.pump_gpu(max_in_flight=len(self.gpu_wanted))

    def observe(self, slot: int, counts: list[int]) -> None:
        """The real routing of layer `slot`: score the prediction made for it, and correct the
        prefetches of the experts it got wrong."""
        if slot not in self.predicted:
            return
        pred, real = self.predicted.pop(slot), {e for e, c in enumerate(counts) if c}
        if pred - real:
            self.demote(slot, pred - real)
        self.stats.score_prediction(slot, pred, real)

    def demote(self, slot: int, experts) -> None:
        """Experts of layer `slot` predicted wrongly: cancel their pending reads and make their
        unused prefetched copies the first evicted, in RAM and on the GPU."""
        keys = [(slot, e) for e in experts]
        if not self.all_in_ram:
            self.stats.stats["ram_prefetch_demoted"] += self.store.demote_prefetched(keys)
        self.store.gpu.demote(keys)
        self.gpu_wanted = [w for w in self.gpu_wanted if w[0] not in keys]

    # ---- copies into the GPU tier -------------------------------------------------------------
    def want_on_gpu(self, keys, priority: int) -> None:
        """Copy these experts (most wanted first) into the GPU tier early, as their RAM records
        become ready; replaces what was wanted before. At most half the tier's free slots, so
        the guesses do not push out what the current layer still needs."""
        gpu = self.store.gpu
        room = max(0, gpu.num_slots - 2) // 2
        self.gpu_wanted = [(k, priority) for k in keys if not gpu.holds(k)][:room]

    def layer_demanded(self, layer: int) -> None:
        """Layer `layer`'s experts are demanded now: the copies still wanted are for layers ahead."""
        self.gpu_wanted = [w for w in self.gpu_wanted if w[0][0] != layer]

    def pump_gpu(self, reserve: int = 0, max_in_flight: int = 1) -> None:
        """Start GPU copies of the wanted experts whose RAM records hold their weights, while
        fewer than `max_in_flight` prefetch copies run and `reserve` GPU slots stay free for the
        current layer's experts still to come. Called between the experts of a layer with one
        copy at a time, so a demand copy queued behind a prefetch waits for one expert at most
        and the copies are paced with compute."""
        if not self.gpu_wanted or not self.store.gpu.can_prefetch(max_in_flight, reserve):
            return
        keys = [k for k, _ in self.gpu_wanted]
        slots = self.store.pin_resident(keys, "weights")
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
            self.store.unpin(unpin)
        self.gpu_wanted = keep
