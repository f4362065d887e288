"""The GPU tier: a uint8 CUDA arena of `gpu_bytes // weights_bytes` slots, accounted by the Rust
`SlotPool` (same policy as the RAM tier), filled by torch copies on a dedicated copy stream.

Ordering, all on the device, never the host:
- copy into GPU slot g waits on `free_after[g]` (an event recorded on the consumer's stream at
  release), so a copy never overwrites weights a kernel still reads;
- `ready[g]` is recorded after the copy; `acquire` makes the caller's stream wait on it;
- the RAM record feeding a copy stays pinned until the copy's event has completed (checked
  without blocking at each call, or waited for by `drain`), so the DMA never reads a slot that
  is being refilled.

On a CPU-only machine (or gpu_bytes == 0 on CPU) the tier serves the RAM views of the weights.
"""

from __future__ import annotations

import threading
import time

import torch

from gmtier._core import SlotPool


class GpuTier:
    """Weights of experts on the compute device."""

    def __init__(self, store, gpu_bytes: int, device: torch.device):
        self.store = store
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._lock = threading.RLock()
        self.m = {"hits": 0, "misses": 0, "h2d_bytes": 0, "h2d_copies": 0, "copy_issue_s": 0.0}
        self._weight_names = {t.name for t in store.layout if t.section == "weights"}
        if not self.cuda:
            self.num_slots = 0
            return
        wb = store.weights_bytes
        if wb == 0:
            raise ValueError("the record schema has no 'weights' section: nothing to put on the GPU")
        self.num_slots = int(gpu_bytes) // wb
        if self.num_slots == 0:
            raise ValueError(f"GPU budget of {int(gpu_bytes)} bytes is smaller than one expert's weights "
                             f"({wb} bytes); raise gpu_bytes to at least {wb}")
        self.arena = torch.empty(self.num_slots * wb, dtype=torch.uint8, device=self.device)
        self.pool = SlotPool(self.num_slots)
        self.copy_stream = torch.cuda.Stream(device=self.device)
        self.ready: list = [None] * self.num_slots
        self.free_after: list = [None] * self.num_slots
        self._views = [self._make_views(g) for g in range(self.num_slots)]
        self._inflight: list[tuple] = []  # (event, key): RAM pins held until the copy is done
        self._stale: set = set()

    def _make_views(self, g: int) -> dict:
        from gmtier.store import _views

        return _views(self.arena, self.store.layout, g * self.store.weights_bytes, sections=("weights",))

    # ---- host-side bookkeeping -------------------------------------------------------------------
    def _reap(self, block: bool = False) -> None:
        """Release RAM pins whose H2D copies have finished."""
        done, keep = [], []
        for ev, key in self._inflight:
            if block and ev is not None:
                ev.synchronize()
            if block or ev is None or ev.query():
                done.append(key)
            else:
                keep.append((ev, key))
        self._inflight = keep
        if done:
            self.store.core.release(done)

    def drain(self) -> None:
        """Wait for every copy in flight and drop the RAM pins they held."""
        if self.cuda:
            with self._lock:
                self._reap(block=True)

    # ---- the API the store uses ------------------------------------------------------------------
    def acquire(self, key, ram_slot: int) -> dict[str, torch.Tensor]:
        """Weights of `key` (whose RAM record is pinned in `ram_slot`) on the device, ready for the
        current stream. Takes one GPU pin; the RAM pin passes to the tier (released at release)."""
        if not self.cuda:
            return {n: t for n, t in self.store.slot_views(ram_slot).items()
                    if n in self._weight_names}
        with self._lock:
            self._reap()
            stream = torch.cuda.current_stream(self.device)
            slot, hit, _evicted = self.pool.acquire(tuple(key), 0, True)
            if hit:
                self.m["hits"] += 1
            else:
                self.m["misses"] += 1
                t0 = time.perf_counter()
                src = self.store.weights_bytes_view(ram_slot)
                cs = self.copy_stream
                if self.free_after[slot] is not None:
                    cs.wait_event(self.free_after[slot])
                with torch.cuda.stream(cs):
                    wb = self.store.weights_bytes
                    self.arena[slot * wb:(slot + 1) * wb].copy_(src, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(cs)
                self.ready[slot] = ev
                self.m["h2d_bytes"] += self.store.weights_bytes
                self.m["h2d_copies"] += 1
                self.m["copy_issue_s"] += time.perf_counter() - t0
            if self.ready[slot] is not None:
                stream.wait_event(self.ready[slot])
            return self._views[slot]

    def release(self, keys) -> None:
        """Drop one GPU pin per key (the consumer's stream marks when the slot is free) and the
        RAM pin the matching acquire() took (after the copy that read it has finished)."""
        if not self.cuda:
            self.store.core.release([tuple(k) for k in keys])
            return
        with self._lock:
            stream = torch.cuda.current_stream(self.device)
            for k in keys:
                k = tuple(k)
                slot = self.pool.lookup(k)
                if slot is None:
                    raise ValueError(f"release of expert {k}, which is not on the GPU tier")
                ev = torch.cuda.Event()
                ev.record(stream)
                self.free_after[slot] = ev
                self.pool.release(k)
                if k in self._stale and self.pool.pins(slot) == 0:
                    self._stale.discard(k)
                    self.pool.invalidate(k)
                # The last copy into this slot read the RAM record: keep the RAM pin until it is done.
                self._inflight.append((self.ready[slot], k))
            self._reap()

    def invalidate(self, keys) -> None:
        """The RAM records of these experts changed: their GPU copies are stale."""
        if not self.cuda:
            return
        with self._lock:
            for k in keys:
                k = tuple(k)
                slot = self.pool.lookup(k)
                if slot is None:
                    continue
                if self.pool.pins(slot) > 0:
                    self._stale.add(k)  # dropped at its last release
                else:
                    self.pool.invalidate(k)

    def metrics(self) -> dict:
        m = dict(self.m)
        n = m["hits"] + m["misses"]
        m["hit_rate"] = m["hits"] / n if n else None
        m["slots"] = self.num_slots
        return m

    def __repr__(self) -> str:
        if not self.cuda:
            return "GpuTier(cpu: serves RAM views)"
        return f"GpuTier({self.device}, {self.num_slots} slots x {self.store.weights_bytes} B)"
