"""The GPU tier: a uint8 CUDA arena of `gpu_bytes // weights_bytes` slots, filled by torch copies
on a dedicated copy stream. Its bookkeeping is the Rust `_core.GpuSlots`, kept by the store under
the store's own lock: which expert each slot holds, the slot states (free, copying, ready,
stale, prefetched), the pins and the eviction policy (the RAM tier's), each acquire's RAM pin,
and the RAM pins held by copies in flight. This module keeps what must be torch: the arena and
its views, the streams, the events that order the device's work, stall timing, and the dW
staging.

Ordering, all on the device, never the host:
- copy into GPU slot g waits on `free_after[g]` (an event recorded on the consumer's stream at
  release), so a copy never overwrites weights a kernel still reads;
- `ready[g]` is recorded after the copy; `acquire` makes the caller's stream wait on it;
- the RAM record feeding a copy stays pinned until the copy is done, so the DMA never reads a
  slot that is being refilled: a CUDA host function queued on the copy stream after the copy
  (`cuLaunchHostFunc`, calling into Rust on the driver's thread, no Python) reports it to
  `GpuSlots`, which drops the pin and wakes, on the store's condvar, a request waiting for a RAM
  slot. Nothing polls.

Expert gradients live inside the same budget: `grad_slots` slots of the arena (the weights'
size and layout) stage one expert's dW each until its D2H copy to pinned RAM has finished, so
the experts never take more GPU memory than `gpu_bytes`, however far backward runs ahead of the
copies. The staging slots are used in groups of `grad_group` consecutive slots: the dW of a
group's experts leaves in one D2H copy (one event, one AdamW job), which is what keeps the
per-expert host work of backward small where the budget has room for several. On the host, dW
lands in a fixed ring of pinned buffers of a group each (`host_grad_buffers`, allocated as
first needed, each given back once its AdamW is done): a stated amount of host memory rather
than whatever CUDA's caching host allocator keeps (it rounds each request up to a power of two
and never gives memory back).

Prefetch: `prefetch` copies the weights of an expert the router predicted (whose RAM record
already holds them) into a free or evictable slot ahead of use, unpinned and protected from
lower-priority prefetches; `demote` makes a wrong guess the first slot evicted.

On a CPU-only machine (or gpu_bytes == 0 on CPU) the tier serves the RAM views of the weights.
With GMTIER_EMULATE_GPU_TIER=1 and gpu_bytes > 0 on CPU, the tier runs as on a GPU but in host
memory (`gmtier.store.emulation`).
"""

from __future__ import annotations

import ctypes
import threading
import time

import torch

from gmtier._core import GpuSlots
from gmtier.store.emulation import HostStreams, emulated
from gmtier.store.layout import views
from gmtier.store.metrics import hit_rate


class GradsOnHost:
    """Gradients of one or more experts copied to pinned host memory on a side stream (one dict
    of tensors per expert in `tensors`); `wait()` before reading them, `release()` once done with
    them (their buffer goes back to the GPU tier's ring)."""

    def __init__(self, tensors: list[dict], event=None, give_back=None):
        self.tensors, self.event, self._give_back = tensors, event, give_back

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def release(self) -> None:
        if self._give_back is not None:
            self.wait()  # the copy into the buffer must be over before anyone refills it
            give_back, self._give_back, self.tensors = self._give_back, None, []
            give_back()


def _host_func_launcher() -> int:
    """The address of the CUDA driver's `cuLaunchHostFunc` (libcuda, which torch has loaded):
    what `GpuSlots.signal_done` queues its host function with."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchHostFunc
    except (OSError, AttributeError) as e:
        raise RuntimeError(f"the GPU tier needs cuLaunchHostFunc from the CUDA driver (libcuda.so.1): {e}") from None
    return ctypes.cast(fn, ctypes.c_void_p).value


class GpuTier:
    """Weights of experts on the compute device, and the staging of their gradients.

    One class (a long one): the copies it issues and the events ordering them, the stall
    timing and the dW staging ring; every question of slot state goes to `self.slots`
    (`_core.GpuSlots`). Its lock orders a slot's copy after the event of its last release."""

    def __init__(self, store, gpu_bytes: int, device: torch.device, grad_slots: int = 0, grad_group: int = 1):
        self.store = store
        self.device = torch.device(device)
        real = self.device.type == "cuda" and torch.cuda.is_available()
        # active: the tier keeps its own copies (on the GPU, or in host memory when emulated).
        self.active = real or (self.device.type == "cpu" and int(gpu_bytes) > 0 and emulated())
        self._emulated = not real
        self._cuda = torch.cuda if real else HostStreams
        self._lock = threading.RLock()
        # The device side's counters; the slots' (hits, misses, prefetch_*) are kept in Rust.
        self._m = {"h2d_bytes": 0, "h2d_copies": 0, "copy_issue_s": 0.0, "d2h_bytes": 0, "grad_wait_s": 0.0}
        self._weight_names = {t.name for t in store.layout if t.section == "weights"}
        self._stalls: list[tuple] = []  # (before, after) timing events around waits for copies
        self._timing_events: list = []  # free timing events
        self._stall_s: dict = {}  # stall time already read from finished timing events, by tag
        self.stall_tag = None  # set by the caller (e.g. the Switch layer) to attribute stalls
        # The pinned host ring for dW: at most `host_grad_buffers` buffers of a group each, free
        # ones in `_free_host`.
        self.grad_group = max(1, int(grad_group))
        self.host_grad_buffers = 1
        self._host_bufs: list[torch.Tensor] = []
        self._free_host: list[tuple[torch.Tensor, list[dict]]] = []  # (buffer, each expert's views)
        self._host_cv = threading.Condition()
        if not self.active:
            self.num_slots = 0
            self.slots = GpuSlots(store.core, 0)  # records acquires and their RAM pins only
            return
        wb = store.weights_bytes
        if wb == 0:
            raise ValueError("the record schema has no 'weights' section: nothing to put on the GPU")
        total = int(gpu_bytes) // wb
        self.grad_slots = int(grad_slots)
        if self.grad_slots % self.grad_group:
            raise ValueError(f"{self.grad_slots} gradient staging slots do not make whole groups of {self.grad_group}")
        self.num_slots = total - self.grad_slots
        if self.num_slots < 1:
            need = (1 + self.grad_slots) * wb
            raise ValueError(f"GPU budget of {int(gpu_bytes)} bytes holds {total} expert weight slots of {wb} bytes, "
                             f"fewer than 1 + {self.grad_slots} for gradients; raise gpu_bytes to at least {need}")
        self.arena = torch.empty(total * wb, dtype=torch.uint8, device=self.device)
        self.copy_stream = self._cuda.Stream(device=self.device)
        self.signal_stream = self._cuda.Stream(device=self.device)  # host functions reporting copies done
        self.ready: list = [None] * self.num_slots
        self.free_after: list = [None] * self.num_slots
        self._views = [self._make_views(g) for g in range(self.num_slots)]
        self._grad_views = [self._make_views(self.num_slots + i) for i in range(self.grad_slots)]
        self._grad_busy: list = [None] * (self.grad_slots // self.grad_group)  # D2H copy event of each group
        self._next_grad = 0  # the group grad_buffers() hands out next
        self.host_grad_buffers = self.grad_slots // self.grad_group + 1
        self.d2h_stream = self._cuda.Stream(device=self.device)
        launcher = _host_func_launcher() if real else None
        self.slots = GpuSlots(store.core, self.num_slots)
        if launcher is not None:
            self.slots.use_launcher(launcher)

    def _make_views(self, g: int) -> dict:
        return views(self.arena, self.store.layout, g * self.store.weights_bytes, sections=("weights",))

    @property
    def m(self) -> dict:
        """The counters: the device side's and the slots' (from Rust)."""
        m = dict(self._m)
        m.update(self.slots.metrics())
        del m["copies_in_flight"]
        return m

    def drain(self) -> None:
        """Wait for every copy in flight and the RAM pins they held to be dropped."""
        if self.active:
            self.copy_stream.synchronize()
            self.signal_stream.synchronize()
            # The host functions have run once their stream is done; this only checks it.
            self.slots.wait_copies(timeout=60)

    # ---- the API the store uses ------------------------------------------------------------------
    def acquire(self, key, ram_slot: int, need_hit: bool = False) -> dict[str, torch.Tensor]:
        """Weights of `key` (whose RAM record is pinned in `ram_slot`) on the device, ready for the
        current stream. Takes one GPU pin; the RAM pin passes to the tier (released at release).
        `need_hit`: the RAM slot lacks the weights, so the tier must already hold them."""
        key = tuple(key)
        if not self.active:
            self.slots.acquire(key, ram_slot)
            return {n: t for n, t in self.store.slot_views(ram_slot).items()
                    if n in self._weight_names}
        with self._lock:
            slot, copy = self.slots.acquire(key, ram_slot, need_hit)
            if copy is not None:
                self._copy_in(slot, ram_slot, copy)
            self._wait_ready(slot)
            return self._views[slot]

    def acquire_resident(self, keys, limit: int) -> dict:
        """The experts among `keys` (at most `limit`) whose current weights the tier holds, pinned
        and ready for the current stream, without their RAM records (`release` each once):
        key -> weights."""
        if not self.active:
            return {}
        keys = [tuple(k) for k in keys]
        with self._lock:
            out = {}
            for i, slot in self.slots.acquire_resident(keys, limit):
                self._wait_ready(slot)
                out[keys[i]] = self._views[slot]
            return out

    def can_prefetch(self, max_in_flight: int = 1, reserve: int = 0) -> bool:
        """Whether a prefetch copy may start now: fewer than `max_in_flight` of them running, and
        more slots neither pinned nor holding unused prefetches than the `reserve` the current
        layer still needs."""
        return self.slots.can_prefetch(max_in_flight, reserve)

    def prefetch(self, key, ram_slot: int, priority: int, max_in_flight: int = 1, reserve: int = 0) -> str:
        """Copy `key`'s weights from its RAM record (pinned in `ram_slot` by the caller; the pin
        passes to the tier, dropped once the copy is done) into a free or evictable slot ahead of
        use: unpinned, protected from prefetches of lower priority. Returns "copied"; "held"
        when the tier has a copy already; "busy" when `max_in_flight` prefetch copies are still
        running, or when fewer than `reserve` slots (what the current layer will still page in)
        would stay neither pinned nor prefetched, so the guess would only be evicted again (try
        later). Only "copied" keeps the pin."""
        with self._lock:
            outcome, slot, copy = self.slots.prefetch(tuple(key), int(priority), max_in_flight, reserve)
            if outcome == "copied":
                self._copy_in(slot, ram_slot, copy)
        return outcome

    def demote(self, keys) -> None:
        """The router predicted these experts wrongly: their unused prefetched copies become
        the first slots evicted."""
        self.slots.demote([tuple(k) for k in keys])

    def holds(self, key) -> bool:
        """Whether the tier holds a current copy of `key`'s weights."""
        return self.slots.holds(tuple(key))

    def ram_slot(self, key) -> int | None:
        """The RAM slot of the acquired `key`'s record, while an acquire of it pins it."""
        return self.slots.ram_slot(tuple(key))

    def refresh(self, key) -> None:
        """The pinned RAM record of the acquired `key` was updated: copy its new weights over
        the GPU copy rather than dropping it, so the next forward finds them on the GPU. Called
        once the kernels that read the old weights have finished (AdamW ran on their dW)."""
        with self._lock:
            got = self.slots.refresh(tuple(key))
            if got is not None:
                self._copy_in(*got)

    def _copy_in(self, slot: int, ram_slot: int, copy: int) -> None:
        """Copy RAM slot `ram_slot`'s weights into GPU slot `slot` on the copy stream, after the
        last reader of the GPU slot; `ready[slot]` marks the end of the copy, and a host function
        after it reports `copy` done to `self.slots` (which drops the RAM pins it holds)."""
        t0 = time.perf_counter()
        wb = self.store.weights_bytes
        cs = self.copy_stream
        if self.free_after[slot] is not None:
            cs.wait_event(self.free_after[slot])
        self.ready[slot] = self._copy_on(cs, self.arena[slot * wb:(slot + 1) * wb], self.store.weights_bytes_view(ram_slot),
                                         copy)
        self._m["h2d_bytes"] += wb
        self._m["h2d_copies"] += 1
        self._m["copy_issue_s"] += time.perf_counter() - t0

    def _copy_on(self, stream, dst: torch.Tensor, src: torch.Tensor, copy: int | None = None):
        """Enqueue dst <- src on `stream` without waiting; returns the event marking its end.
        `copy`: the id under which `self.slots` is told the copy is done, once it is."""
        with self._cuda.stream(stream):
            if self._emulated:
                stream.enqueue(lambda: dst.copy_(src))
                if copy is not None:  # reported as the copy runs, whoever makes it run
                    stream.enqueue(lambda: self.slots.copy_done(copy))
            else:
                dst.copy_(src, non_blocking=True)
            # Default (spinning) events: blocking ones, which sleep in synchronize(), measured no
            # faster on the `small` step (docs/performance.md).
            ev = self._cuda.Event()
            ev.record(stream)
        if copy is not None and not self._emulated:
            # The host function runs on a stream of its own, after the copy's event: a host
            # function holds back the work queued behind it on its stream until it has run
            # (~200 us an expert measured when it sat on the copy stream: the GPU tier fell to
            # 0.60 of a plain pinned copy in bench-paging), and neither compute nor the next
            # copy must wait for it.
            self.signal_stream.wait_event(ev)
            self.slots.signal_done(copy, self.signal_stream.cuda_stream)
        return ev

    def _wait_ready(self, slot: int) -> None:
        """Make the current stream wait for GPU slot `slot`'s last copy; time the wait on the GPU
        when the copy has not finished yet."""
        ready = self.ready[slot]
        if ready is None or ready.query():
            return
        stream = self._cuda.current_stream(self.device)
        # Timing events are reused (creating two per wait cost ~30 us per expert in bench-paging).
        before = self._timing_events.pop() if self._timing_events else self._cuda.Event(enable_timing=True)
        after = self._timing_events.pop() if self._timing_events else self._cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(ready)
        after.record(stream)
        self._stalls.append((before, after, self.stall_tag))
        if len(self._stalls) > 64:  # nobody asked for the total lately: keep the list short
            self._fold_stalls(block=False)

    def release(self, keys) -> None:
        """Drop one acquire per key: its GPU pin (the consumer's stream marks when the slot is
        free) and the RAM pin it took (after the copy that read it has finished). Keys not
        acquired are plain RAM releases."""
        keys = [tuple(k) for k in keys]
        if not self.active:
            self.slots.release(keys)
            return
        with self._lock:
            freed = self.slots.release(keys)
            if freed:
                # One event marks the end of the kernels enqueued so far: it frees every slot released here.
                ev = self._cuda.Event()
                ev.record(self._cuda.current_stream(self.device))
                for slot in freed:
                    self.free_after[slot] = ev

    def invalidate(self, keys) -> None:
        """The RAM records of these experts changed: their GPU copies are stale (dropped at
        once, or at their last release where pinned)."""
        self.slots.invalidate([tuple(k) for k in keys])

    # ---- expert gradients ------------------------------------------------------------------------
    def grad_buffers(self, n: int = 1) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """Staging slots for `n` experts' dW (at most `grad_group`; tensors named and shaped like
        the weights), consecutive slots of the next group, to be filled on the current stream and
        then handed to `grads_to_host(first, n)` together; returns (first slot, their views).
        Waits for the D2H copy that last read the group, so the gradients in flight stay within
        the budget."""
        if not 1 <= n <= self.grad_group:
            raise ValueError(f"grad_buffers({n}): a group holds 1 to {self.grad_group} experts")
        g = self._next_grad
        self._next_grad = (g + 1) % len(self._grad_busy)
        ev = self._grad_busy[g]
        if ev is not None and not ev.query():
            t0 = time.perf_counter()
            ev.synchronize()
            self._m["grad_wait_s"] += time.perf_counter() - t0
        self._grad_busy[g] = None
        first = g * self.grad_group
        return first, self._grad_views[first:first + n]

    def reserve_host_grads(self, n: int) -> None:
        """Let the pinned dW ring hold `n` buffers (of a group each): one per group of updates
        that may be in flight (queued or running AdamW) plus the one being copied. Set before
        training."""
        with self._host_cv:
            self.host_grad_buffers = max(int(n), len(self._host_bufs), 1)

    @property
    def host_grad_bytes(self) -> int:
        """Pinned host memory the dW ring may hold (what it holds once every buffer was needed)."""
        return self.host_grad_buffers * self.grad_group * self.store.weights_bytes if self.active else 0

    def _take_host_buffer(self) -> tuple[torch.Tensor, list[dict]]:
        """A free pinned buffer of the ring and each expert's views in it, named like the weights
        (allocated while under the ring's size), waiting for an update to give one back when all
        are in use."""
        with self._host_cv:
            if not self._free_host and len(self._host_bufs) < self.host_grad_buffers:
                wb = self.store.weights_bytes
                buf = torch.empty(self.grad_group * wb, dtype=torch.uint8, pin_memory=not self._emulated)
                self._host_bufs.append(buf)
                return buf, [views(buf, self.store.layout, j * wb, sections=("weights",))
                             for j in range(self.grad_group)]
            t0 = time.perf_counter()
            if not self._host_cv.wait_for(lambda: self._free_host, timeout=60):
                raise RuntimeError(f"all {len(self._host_bufs)} pinned dW buffers stayed in use for 60 s: an update "
                                   "did not give its buffer back (GradsOnHost.release), or reserve_host_grads() "
                                   "was set below the updates in flight")
            self._m["grad_wait_s"] += time.perf_counter() - t0
            return self._free_host.pop()

    def _give_host_buffer(self, buf: tuple[torch.Tensor, list[dict]]) -> None:
        with self._host_cv:
            self._free_host.append(buf)
            self._host_cv.notify()

    def grads_to_host(self, first: int, n: int = 1, weights_of=()):
        """Copy staging slots `first`..`first + n - 1` (from `grad_buffers(n)`) to a pinned host
        buffer of the ring in one copy on the D2H stream, after the current stream's work;
        returns each expert's host tensors (named like the weights), the copy's event, and the
        function that gives the buffer back (once the tensors are no longer read). `weights_of`:
        acquired experts whose RAM records lack their weights section; their GPU copies (the
        current weights) go into it first, on the same stream, so the event covers them too."""
        wb = self.store.weights_bytes
        taken = self._take_host_buffer()
        host, views = taken
        s = self.d2h_stream
        s.wait_stream(self._cuda.current_stream(self.device))
        for key in weights_of:
            slot, ram_slot = self.slots.lookup(tuple(key)), self.slots.ram_slot(tuple(key))
            self._copy_on(s, self.store.weights_bytes_view(ram_slot), self.arena[slot * wb:(slot + 1) * wb])
            self._m["d2h_bytes"] += wb
        base = (self.num_slots + first) * wb
        ev = self._copy_on(s, host[:n * wb], self.arena[base: base + n * wb])
        self._grad_busy[first // self.grad_group] = ev
        self._m["d2h_bytes"] += n * wb
        return views[:n], ev, lambda: self._give_host_buffer(taken)

    def _fold_stalls(self, block: bool) -> None:
        """Add the finished stall timings to `_stall_s` (by tag) and recycle their events (all of
        them, waiting, with `block`)."""
        keep = []
        for before, after, tag in self._stalls:
            if block:
                after.synchronize()
            elif not after.query():
                keep.append((before, after, tag))
                continue
            self._stall_s[tag] = self._stall_s.get(tag, 0.0) + before.elapsed_time(after) / 1e3
            self._timing_events += (before, after)
        self._stalls = keep

    def take_stalls(self) -> dict:
        """Seconds the compute stream waited for H2D copies since the last call, by the
        `stall_tag` set when each wait was issued (synchronizes with those events; call between
        steps)."""
        if not self.active:
            return {}
        with self._lock:
            self._fold_stalls(block=True)
            out, self._stall_s = self._stall_s, {}
        return out

    def metrics(self) -> dict:
        m = self.m
        m["hit_rate"] = hit_rate(m["hits"], m["misses"])
        m["slots"] = self.num_slots
        return m

    def __repr__(self) -> str:
        if not self.active:
            return "GpuTier(cpu: serves RAM views)"
        where = " emulated in host memory" if self._emulated else ""
        return f"GpuTier({self.device}{where}, {self.num_slots} slots x {self.store.weights_bytes} B)"
