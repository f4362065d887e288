"""The tiered expert store as torch sees it.

`TieredExpertStore` wraps the Rust `gmtier._core.ExpertStore` (NVMe data file + RAM slot arena,
asynchronous reads, write-back, crash-safe commit) and adds:

- a zero-copy uint8 torch tensor over the RAM arena, page-locked with `cudaHostRegister` when
  CUDA exists, and per-slot named tensor views (`slot_views`);
- the GPU tier (`gmtier.store.gpu.GpuTier`): weights sections copied on a dedicated copy stream,
  one CUDA event per slot; on a CPU-only machine the "GPU" views are the RAM views;
- `acquire`/`release` for the Switch layers: an expert's weights on the compute device, with its
  RAM record pinned so Adam can update it in place (`adam_step`, `mark_dirty`).

Pins: every `wait`/`acquire` pins once; `release` unpins once. A pinned record is never evicted.
What each acquire pinned (RAM record, GPU slot) is kept in Rust with the GPU tier's slots
(`_core.GpuSlots`), under the store's lock.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from gmtier import _core
from gmtier.adam import RecordSpecCache, adamw_raw_groups
from gmtier.host_memory import tensor_over
from gmtier._core import StoreError, Ticket
from gmtier.store.gpu import GpuTier, GradsOnHost
from gmtier.store.layout import check_tensors, normalize_schema, pack_record, record_layout, tensor_infos, views
from gmtier.store.metrics import hit_rate

Key = tuple[int, int]

# The files of a store directory (named by the Rust store).
DATA_FILE, INDEX_FILE = "experts.safetensors", "index.json"


def data_file_bytes(store_dir) -> int:
    """The size of a store directory's data file (0 where there is none)."""
    f = Path(store_dir) / DATA_FILE
    return f.stat().st_size if f.exists() else 0


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store where one is opened: the data file is missing."""


class StoreIndexMissingError(StoreError, FileNotFoundError):
    """A store directory whose data file is there but whose `index.json` is not: it cannot be
    opened, and nothing in it is touched (the message says how to restore)."""


class StoreExistsError(StoreError, ValueError):
    """`create` over a directory that already holds a store, without `overwrite` (a ValueError
    too, as the core's refusal of it is)."""



class TieredExpertStore:
    """NVMe -> pinned RAM -> GPU expert store. Build with `create` (once) and `open`.

    One class (a long one): the RAM tier's calls, the acquires that pair a RAM pin with a GPU
    pin (through the GPU tier, whose Rust accounting records which acquire pinned what), and the
    AdamW on acquired records."""

    # ---- construction --------------------------------------------------------------------------
    @staticmethod
    def create(path, num_layers: int, num_experts: int, schema, init: Callable | None = None,
               user_meta: str | None = None, overwrite: bool = False, spare_slots: int | None = None) -> None:
        """Create a store directory. `init(layer, expert)` returns a dict name -> tensor (missing
        names are zero) or a bytes-like record; streamed: the next record is filled while the last
        is written. A directory that holds a store already (its data file or its index) is
        refused with `StoreExistsError` unless `overwrite`, which deletes the directory first.
        `spare_slots`: record slots beyond one per expert (None: one per expert; see
        docs/design.md "The store on disk")."""
        path = Path(path)
        if (path / DATA_FILE).exists() or (path / INDEX_FILE).exists():
            if not overwrite:
                raise StoreExistsError(f"{path} already exists as an expert store; it is kept as it is (start the run "
                                       f"over with `gmtier train --fresh` to replace it, or point experts.store_dir "
                                       f"elsewhere)")
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = normalize_schema(schema)
        fill = None
        if init is not None:
            layout: list = []  # known once the core has accepted the schema

            def fill(layer: int, expert: int, out: bytearray) -> None:
                rec, dst = init(layer, expert), np.frombuffer(out, dtype=np.uint8)
                if isinstance(rec, Mapping):
                    if not layout:
                        layout.extend(record_layout(schema)[0])
                    pack_record(layout, dst, rec, f"init({layer}, {expert})")
                    return
                src = np.frombuffer(rec, dtype=np.uint8)
                if src.size != dst.size:
                    raise ValueError(f"init({layer}, {expert}) returned {src.size} bytes; a record is {dst.size} "
                                     f"bytes (see the store's layout)")
                dst[:] = src

        _core.ExpertStore.create(str(path), num_layers, num_experts, schema, init_into=fill, spare_slots=spare_slots)
        if user_meta:
            s = _core.ExpertStore.open(str(path), record_layout(schema)[1])
            s.commit(user_meta)
            s.close()

    @classmethod
    def open(cls, path, ram_bytes: int, gpu_bytes: int = 0, device=None, io_threads: int = 8,
             queue_depth: int = 32, direct: bool = True, pin_memory: bool = True,
             gpu_grad_slots: int = 0, gpu_grad_group: int = 1) -> "TieredExpertStore":
        """Open a store. `ram_bytes` bounds the RAM tier, `gpu_bytes` the GPU tier (on `device`),
        `gpu_grad_slots` of whose slots stage expert gradients, in groups of `gpu_grad_group`
        copied to RAM together. Reads and writes run at once until `core.set_turn_bytes` says
        otherwise. A store whose index.json is missing is refused with `StoreIndexMissingError`
        (never re-created)."""
        path = Path(path)
        if (path / DATA_FILE).exists() and not (path / INDEX_FILE).exists():
            raise StoreIndexMissingError(
                f"{path / INDEX_FILE} is missing, so the expert store {path} cannot be opened; its data file "
                f"{path / DATA_FILE} was left untouched. Restore {INDEX_FILE} (or the whole store directory) "
                f"from a backup of the run")
        try:
            core = _core.ExpertStore.open(str(path), int(ram_bytes), io_threads=io_threads,
                                          queue_depth=queue_depth, direct=direct)
        except FileNotFoundError as e:  # a StoreError too, so that callers need catch one class
            raise StoreNotFoundError(str(e)) from None
        return cls(core, gpu_bytes=gpu_bytes, device=device, pin_memory=pin_memory, gpu_grad_slots=gpu_grad_slots,
                   gpu_grad_group=gpu_grad_group)

    def __init__(self, core: "_core.ExpertStore", gpu_bytes: int = 0, device=None, pin_memory: bool = True,
                 gpu_grad_slots: int = 0, gpu_grad_group: int = 1):
        self.core = core
        self.layout = tensor_infos(core.tensor_layout())
        self.record_bytes, self.weights_bytes = core.record_bytes, core.weights_bytes
        self.num_layers, self.num_experts, self.ram_slots = core.num_layers, core.num_experts, core.ram_slots
        self.spare_slots = core.spare_slots
        ptr, nbytes = core.arena_address()
        self.arena = tensor_over(ptr, nbytes, core)  # the arena lives as long as any view of it
        self.pinned = False
        self._registered = None
        if pin_memory and torch.cuda.is_available():
            # Page-lock the arena so H2D copies are true async DMA at full PCIe speed.
            err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
            if int(err) == 0:
                self.pinned, self._registered = True, ptr
        self._slot_views: dict[int, dict] = {}
        self._adam_specs = RecordSpecCache()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        try:
            self.gpu = GpuTier(self, gpu_bytes, self.device, grad_slots=gpu_grad_slots, grad_group=gpu_grad_group)
        except BaseException:  # a bad GPU budget: give the arena back (and its page-locking) before saying so
            self._unregister()
            core.close()
            raise
        self.host_wait_s = 0.0  # time acquire() blocked for records to reach RAM
        self._closed = False

    # ---- layout and views ------------------------------------------------------------------------
    def slot_views(self, slot: int) -> dict[str, torch.Tensor]:
        """Named views of RAM slot `slot` (all sections). Zero-copy: writes change the record.
        After a request for one section, check `slot_sections(slot)` (or use `valid_views`)."""
        v = self._slot_views.get(slot)
        if v is None:
            if not 0 <= slot < self.ram_slots:
                raise ValueError(f"RAM slot {slot} out of range (the store has {self.ram_slots})")
            v = self._slot_views[slot] = views(self.arena, self.layout, slot * self.record_bytes)
        return v

    def weights_bytes_view(self, slot: int) -> torch.Tensor:
        """The weights section of RAM slot `slot` as uint8 (what an H2D copy moves)."""
        base = slot * self.record_bytes
        return self.arena[base: base + self.weights_bytes]

    # ---- the RAM tier --------------------------------------------------------------------------
    def request(self, keys: Sequence[Key], priority: int = 0, sections: str = "all") -> Ticket:
        """Ask for experts (never blocks); `wait()` the ticket (or `self.wait(ticket)`).
        `sections`: "all", "weights" or "state"; only what a RAM slot lacks of it is read."""
        return self.core.request([tuple(k) for k in keys], priority, sections)

    def wait(self, ticket: Ticket, timeout: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Views of the requested records, in order (pins them; release each key once). For a
        ticket of one section, only the tensors of the sections valid in the slot."""
        slots = ticket.wait(timeout)
        if ticket.sections == "all":
            return [self.slot_views(s) for s in slots]
        return [self.valid_views(s) for s in slots]

    def slot_sections(self, slot: int) -> list[str]:
        """The sections valid in RAM slot `slot` ("weights", "state"): only their views hold
        the record (they stay valid while the slot is pinned)."""
        return self.core.slot_sections(slot)

    def valid_views(self, slot: int) -> dict[str, torch.Tensor]:
        """Named views of RAM slot `slot`'s valid sections only (see `slot_sections`)."""
        secs = self.core.slot_sections(slot)
        if len(secs) == 2:
            return self.slot_views(slot)
        return views(self.arena, self.layout, slot * self.record_bytes, tuple(secs))

    def get(self, keys: Sequence[Key], priority: int = 0, timeout: float | None = None) -> list[dict]:
        """request + wait: RAM views of the records, pinned."""
        return self.wait(self.request(keys, priority), timeout)

    def prefetch(self, keys: Sequence[Key], priority: int = 0, sections: str = "all") -> None:
        """Best-effort read-ahead into RAM (lower priority than any request); `sections` as in
        `request`."""
        self.core.prefetch([tuple(k) for k in keys], priority, sections)

    def release(self, keys: Sequence[Key]) -> None:
        """Unpin experts. Keys that were `acquire`d also leave the GPU tier's pin (their RAM pin
        goes once the H2D copy that read it is done)."""
        self.gpu.release(keys)

    def pin_resident(self, keys: Sequence[Key], sections: str = "weights") -> list[int | None]:
        """Pin the records of `keys` whose `sections` are in RAM now, without reading anything:
        each one's RAM slot (give the pin back with `unpin`), None for the others."""
        return self.core.pin_resident([tuple(k) for k in keys], sections)

    def unpin(self, keys: Sequence[Key]) -> None:
        """Drop RAM pins taken by `pin_resident` or handed over with a RAM slot (not `acquire`s)."""
        self.core.release([tuple(k) for k in keys])

    def demote_prefetched(self, keys: Sequence[Key]) -> int:
        """Wrong read-ahead guesses: cancel their reads not yet started, and make their unused
        RAM records the first evicted; returns how many were demoted or cancelled."""
        return self.core.demote_prefetched([tuple(k) for k in keys])

    def mark_dirty(self, keys: Sequence[Key], refresh_gpu: bool = False, filled: str = "none") -> None:
        """The RAM records changed (e.g. by Adam): write back before eviction. Their GPU copies
        are stale: dropped, or with `refresh_gpu` (acquired keys only) overwritten by the new
        weights, which is what the next forward wants. `filled`: sections the caller overwrote
        whole ("weights" after an AdamW that writes them from the master), valid from now on."""
        keys = [tuple(k) for k in keys]
        self.core.mark_dirty(keys, filled)
        if not refresh_gpu:
            self.gpu.invalidate(keys)
            return
        for k in keys:
            self.gpu.refresh(k)

    def write_back(self, keys: Sequence[Key]) -> None:
        """Start writing these experts' dirty RAM records back now (write-behind, asynchronous;
        keys not resident or clean are ignored), so a later eviction need not wait for it."""
        self.core.write_back([tuple(k) for k in keys])

    def flush(self) -> None:
        """Write all dirty records back (to the uncommitted disk slots)."""
        self.gpu.drain()
        self.core.flush()

    def commit(self, user_meta: str = "") -> None:
        """Flush + fsync + atomic index replacement; a crash keeps the previous commit."""
        self.gpu.drain()
        self.core.commit(user_meta)

    def user_meta(self) -> str:
        return self.core.user_meta()

    def interim_commits(self) -> int:
        """Commits the store made on its own since the last `commit` (its spare slots ran out):
        when not 0, some experts are newer than `user_meta` says."""
        return self.core.interim_commits()

    # ---- the compute device ----------------------------------------------------------------------
    def acquire(self, key: Key, priority: int = 0, timeout: float | None = None,
                sections: str = "all") -> dict[str, torch.Tensor]:
        """The expert's weights on the compute device (GPU tier; RAM views on CPU), ready for the
        current stream; `release` once. With `sections="all"` the whole RAM record is pinned too
        (so `adam_step` can update it). With `sections="weights"` (forward) a current GPU copy is
        used as it is, without the RAM record; else only the weights section is read into RAM.
        With `sections="state"` (backward) only the state is read when the GPU holds the
        weights: an AdamW that rewrites half-precision weights from the fp32 master needs no
        more, and one that reads master weights gets them from the GPU copy
        (`grads_to_host(fill_weights=True)`)."""
        key = tuple(key)
        if sections == "weights":
            got = self.acquire_resident_many([key], limit=1)
            if got:
                return got[key]
        return self.acquire_many([key], priority, sections, timeout)[key]

    def acquire_many(self, keys: Sequence[Key], priority: int = 0, sections: str = "all",
                     timeout: float | None = None) -> dict[Key, dict[str, torch.Tensor]]:
        """`acquire` of several experts at once through their RAM records, one RAM request per
        kind of read and one lock: for experts whose records fit the RAM tier (and weights the
        GPU tier) all together. `release` each key once, or all in one call."""
        keys = [tuple(k) for k in keys]
        # The group asked for goes first: with "state", its GPU copies (which it relies on) are
        # pinned before the copies of the experts read whole ("all") can evict them.
        groups: dict[str, list] = {sections: []}
        for k in keys:
            need = "all" if sections == "state" and not self.gpu.holds(k) else sections
            groups.setdefault(need, []).append(k)
        out: dict = {}
        try:
            for need, ks in groups.items():
                if not ks:
                    continue
                t0 = time.perf_counter()
                # A full RAM tier frees up as the copies holding its records finish: the GPU
                # tier's accounting drops their pins and wakes this wait.
                slots = self.request(ks, priority, need).wait(timeout)
                self.host_wait_s += time.perf_counter() - t0
                for i, (k, slot) in enumerate(zip(ks, slots)):
                    try:
                        out[k] = self.gpu.acquire(k, slot, need_hit=need == "state")
                    except BaseException:
                        self.core.release(ks[i:])  # this key and the rest of its request
                        raise
        except BaseException:
            self.release(list(out))
            raise
        return out

    def acquire_resident_many(self, keys: Sequence[Key], limit: int) -> dict[Key, dict[str, torch.Tensor]]:
        """The experts among `keys` (at most `limit`) whose current weights are on the GPU tier,
        pinned there without their RAM records (forward); `release` each once."""
        return self.gpu.acquire_resident(keys, limit)

    def record(self, key: Key) -> dict[str, torch.Tensor]:
        """All tensors of an `acquire`d expert's RAM record (weights and state)."""
        slot = self.gpu.ram_slot(key)
        if slot is None:
            raise ValueError(f"expert {tuple(key)} is not acquired; call acquire() first")
        return self.slot_views(slot)

    def grads_to_host(self, keys: Sequence[Key], grads: Sequence[Mapping[str, torch.Tensor]] | None = None,
                      staging: int | None = None, fill_weights: bool = False) -> GradsOnHost:
        """The gradients of experts `keys` in host memory for `adam_step`: CPU tensors as they
        are (a dict per key in `grads`), or the GPU staging slots from `staging` on (from
        `gpu.grad_buffers(len(keys))`) copied to pinned RAM asynchronously; `.wait()` before
        reading. `fill_weights`: the experts whose RAM records were read without their weights
        (`sections="state"`) get them from their GPU copies in the same wait, for an AdamW that
        reads the weights (compact records: the bf16 weights are their own master)."""
        if staging is not None:
            lacking = [k for k in keys if "weights" not in self.core.slot_sections(self.gpu.ram_slot(k))] \
                if fill_weights else []
            return GradsOnHost(*self.gpu.grads_to_host(staging, len(keys), weights_of=lacking))
        for key, g in zip(keys, grads, strict=True):
            if any(t.is_cuda for t in g.values()):
                raise ValueError(f"grads_to_host({tuple(key)}): CUDA gradients must be computed into a GPU "
                                 "staging slot (gpu.grad_buffers()) so they stay within the GPU budget")
        return GradsOnHost([{n: t.detach() for n, t in g.items()} for g in grads])

    def adam_step(self, keys: Sequence[Key], grads: Sequence[Mapping[str, torch.Tensor]], lr: float,
                  grad_scale: float = 1.0, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
                  weight_decay: float = 0.0, threads: int | None = None) -> list[bool]:
        """AdamW on the acquired experts' records in place (fp32 master + moments, new weights
        written in the same pass), all in one call; `grads` holds a dict per key. Returns
        whether each expert's update was skipped (non-finite gradients; the others go on)."""
        groups = []
        for key, g in zip(keys, grads, strict=True):
            slot = self.gpu.ram_slot(key)
            if slot is None:
                raise ValueError(f"expert {tuple(key)} is not acquired; call acquire() first")
            groups.append(self._adam_specs.specs(slot, self.slot_views(slot), g))
        return adamw_raw_groups(groups, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                                grad_scale=grad_scale, check_finite=True, threads=threads)

    # ---- convenience ----------------------------------------------------------------------------
    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Copies of an expert's tensors."""
        key = (layer, expert)
        views = self.get([key])[0]
        try:
            return {n: t.clone() for n, t in views.items()}
        finally:
            self.core.release([key])

    def write_expert(self, layer: int, expert: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace named tensors of an expert (others keep their values); persisted by commit()."""
        key = (layer, expert)
        check_tensors(self.layout, tensors, f"write_expert({layer}, {expert})")
        views = self.get([key])[0]
        try:
            for name, value in tensors.items():
                views[name].copy_(value)
            self.mark_dirty([key])
        finally:
            self.core.release([key])

    def ram_metrics(self) -> dict:
        """The RAM tier's own counters (hits, misses, bytes read and written, ...), as the core
        keeps them."""
        return self.core.metrics()

    def metrics(self) -> dict:
        """RAM-tier counters (hit rate included) and the GPU tier's under `gpu_`."""
        m = dict(self.core.metrics())
        m["hit_rate"] = hit_rate(m["hits"], m["misses"])
        m.update({f"gpu_{k}": v for k, v in self.gpu.metrics().items()})
        return m

    def tier_metrics(self) -> dict:
        """Metrics for the training log (prefixed `ram_`/`gpu_`)."""
        m = self.core.metrics()
        out = {f"ram_{k}": m[k] for k in ("hits", "misses", "prefetch_hits", "prefetch_cancelled", "bytes_read",
                                          "bytes_written", "stall_s", "evictions", "writebacks", "queue_depth_max")}
        out["ram_hit_rate"] = hit_rate(m["hits"], m["misses"])
        out.update({f"gpu_{k}": v for k, v in self.gpu.metrics().items()})
        return out

    def close(self) -> None:
        """Stop I/O and unregister the arena; uncommitted changes are dropped."""
        if self._closed:
            return
        self._closed = True
        self.gpu.drain()
        self.core.close()
        self._unregister()

    def _unregister(self) -> None:
        """Undo the page-locking of the RAM arena (after every copy that reads it)."""
        if self._registered is not None:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return (f"TieredExpertStore({self.core.path}, {self.num_layers}x{self.num_experts} experts, "
                f"record {self.record_bytes} B, {self.ram_slots} RAM slots, {self.gpu!r})")
