"""Where a layer-major step keeps what forward saves for backward (gmtier.layer_major).

Three tiers, each with a budget (`train.activations_gpu_budget`, `train.activations_ram_budget`):
the compute device, then a pinned host pool, then a scratch spill file written and read with
O_DIRECT through `gmtier._core.SpillFile` (the store's I/O pool). A step's entries are read
back in the reverse order of blocks, so the tiers are filled from the end: told the step's
total beforehand (`begin_step`), the stash sends the first entries put (read last in backward,
with the most time to come back) to disk, the next to RAM and the last ones (read first) stay
on the device. Disk reads run ahead of backward in that known order (`expect`), into a ring
of staging buffers carved from the host pool, two pieces at a time, on I/O threads.

Entries that leave the device are cut into pieces of at most `piece_bytes`, so the staging
buffers stay small however large a step-level entry (a Switch layer's sorted tokens) is.
The host pool is allocated (and page-locked) in segments as a step first needs them, so the
process holds what the steps used, within the budget, not the whole budget.
Every entry is read once: `get` removes it. Nothing outlives the step (`end_step`).

Besides what backward needs, a step sets tensors of the size of its whole residual stream aside
for a while (a Switch block's outputs before they are combined, its output gradients while the
experts run): `park` holds them, off the device when the step's activations exceed the device
budget, in one of two pinned scratch banks that are reused as soon as they are empty (one is
read while the other fills), so the device holds one micro-batch of them at a time.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gmtier import _core
from gmtier.config import ConfigError
from gmtier.host_memory import tensor_over

ALIGN = 4096  # O_DIRECT: offsets, addresses and lengths in multiples of a page
STAGING_BUFFERS = 2  # pieces in flight between the host pool and the spill file
SEGMENT_BYTES = 256 << 20  # the host pool grows by segments of this much (or of a piece, if larger)


class ActivationBudgetError(ConfigError):
    """A budget that cannot hold what the step must keep; names the key and the smallest value."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class _Piece:
    nbytes: int
    tier: str  # "ram" or "disk"
    at: int  # offset in the spill file, or in the host pool's segment `segment`
    crc: int | None = None
    ready: concurrent.futures.Future | None = None  # a read ahead into staging buffer `staging`
    staging: int | None = None
    segment: int = 0


class _ScratchBank:
    """Pinned scratch for parked tensors: a bump allocator over segments that are allocated as
    first needed and kept for the next steps (a parked tensor never moves; the bank is reused
    from its start once every entry is unparked)."""

    def __init__(self, allocate, segment_bytes: int):
        self.allocate, self.segment_bytes = allocate, segment_bytes
        self.segments: list[torch.Tensor] = []
        self.entries = 0
        self._at = (0, 0)  # (segment, offset) of the next free byte

    @property
    def used(self) -> int:
        seg, off = self._at
        return sum(s.numel() for s in self.segments[:seg]) + off

    def reset(self) -> None:
        self.entries, self._at = 0, (0, 0)

    def take(self, nbytes: int) -> torch.Tensor:
        n = _aligned(nbytes)
        seg, off = self._at
        if seg < len(self.segments) and off + n > self.segments[seg].numel():
            seg, off = seg + 1, 0
        while seg < len(self.segments) and self.segments[seg].numel() < n:
            seg += 1  # a segment too small for this one (made for smaller tensors): skipped
        if seg == len(self.segments):
            self.segments.append(self.allocate(max(self.segment_bytes, n)))
        self._at = (seg, off + n)
        self.entries += 1
        return self.segments[seg][off: off + nbytes]


@dataclass
class _Entry:
    dtype: torch.dtype
    shape: tuple
    device_tensor: torch.Tensor | None = None  # kept on the device as it is
    pieces: list[_Piece] = field(default_factory=list)


class ActivationStash:
    """The saved activations of one layer-major step, on three tiers (see the module doc)."""

    def __init__(self, device, gpu_bytes: int, ram_bytes: int, spill_dir: Path, piece_bytes: int,
                 io_threads: int = 4, direct: bool = True, segment_bytes: int = SEGMENT_BYTES):
        self.device = torch.device(device)
        self.gpu_bytes, self.ram_bytes = int(gpu_bytes), int(ram_bytes)
        self.piece_bytes = _aligned(int(piece_bytes))
        self.spill_dir, self.io_threads, self.direct = Path(spill_dir), io_threads, direct
        self._cuda = self.device.type == "cuda"
        self.segment_bytes = max(self.piece_bytes, _aligned(int(segment_bytes)))
        self._segments: list[torch.Tensor] = []  # the host pool, allocated as first needed
        self._staging_buf = None  # the spill's staging buffers (allocated at the first spill)
        self._buffers: list = []  # every AlignedBuffer, and whether it was page-locked
        self._spill = None
        self._io = None
        self._entries: dict = {}
        self._order: list = []  # keys in the order backward gets them (`expect`)
        self._plan_total = 0
        # Peaks (bytes held at once) and totals (bytes moved) since the last `metrics()`.
        self.m = {"act_gpu_peak_bytes": 0, "act_ram_peak_bytes": 0, "act_ram_bytes": 0, "act_disk_write_bytes": 0,
                  "act_disk_read_bytes": 0, "act_disk_wait_s": 0.0, "act_parked_peak_bytes": 0}
        self._banks = [_ScratchBank(self._buffer, self.segment_bytes) for _ in range(2)]  # see `park`
        self._parked: dict = {}  # key -> (bank, host view) or the tensor itself (not off the device)
        self._reset()

    # ---- budgets ----------------------------------------------------------------------------------
    @property
    def staging_bytes(self) -> int:
        """Host memory the spill path needs, out of the RAM budget."""
        return STAGING_BUFFERS * self.piece_bytes

    def check(self, total: int) -> None:
        """A step keeping `total` bytes must fit the tiers: a spill needs its staging buffers in
        the RAM budget."""
        if total > self.gpu_bytes + self.ram_bytes and self.ram_bytes < self.staging_bytes:
            raise self._staging_error(f"this step's activations ({total} B) are more than the device and RAM budgets hold")

    def _staging_error(self, why: str) -> ActivationBudgetError:
        return ActivationBudgetError(
            f"train.activations_ram_budget = {self.ram_bytes} B cannot stage the spill to disk ({why}): it needs "
            f"at least {self.staging_bytes} B ({math.ceil(self.staging_bytes / 2**20)}MiB: two pieces of one "
            f"micro-batch's block input)")

    # ---- a step -----------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._put_bytes = 0  # bytes put so far this step
        self._gpu_used = self._ram_used = self._disk_used = 0
        self._ram_at = (0, 0)  # bump allocator of the host pool: (segment, offset)
        self._write_busy: list = [None] * STAGING_BUFFERS  # the write future using each staging buffer
        self._next_staging = 0

    def begin_step(self, total_bytes: int) -> None:
        """A step that will put about `total_bytes`: decides which share goes to each tier."""
        self.check(total_bytes)
        self._reset()
        self._plan_total = int(total_bytes)

    # ---- set aside within the step ----------------------------------------------------------------
    @property
    def parks_off_device(self) -> bool:
        """Whether `park` moves tensors off the device: this step's activations exceed its budget."""
        return self._plan_total > self.gpu_bytes

    def park(self, key, t: torch.Tensor, bank: int) -> None:
        """Hold `t` until `unpark(key)` (or `peek`), in scratch bank 0 or 1 when off the device.
        A bank is reused once all its entries are unparked: alternate banks between a tensor set
        read and the one being written."""
        if not self.parks_off_device:
            self._parked[key] = t
            return
        host = self._banks[bank].take(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        host.copy_(t, non_blocking=self._cuda)  # stream-ordered: a bank reused later is written after this is read
        self._parked[key] = (bank, host)
        self.m["act_parked_peak_bytes"] = max(self.m["act_parked_peak_bytes"], sum(b.used for b in self._banks))

    def peek(self, key) -> torch.Tensor:
        """A parked tensor on the device, still parked."""
        held = self._parked[key]
        if isinstance(held, torch.Tensor):
            return held
        return held[1].to(self.device, non_blocking=self._cuda)

    def unpark(self, key) -> torch.Tensor:
        """A parked tensor on the device, no longer parked."""
        out = self.peek(key)
        held = self._parked.pop(key)
        if not isinstance(held, torch.Tensor):
            bank = self._banks[held[0]]
            bank.entries -= 1
            if not bank.entries:
                bank.reset()
        return out

    def put(self, key, t: torch.Tensor, may_spill: bool = True) -> None:
        """Keep `t` for backward (the stash owns it: do not write to it afterwards). Without
        `may_spill` (what backward itself puts aside: the disk's staging buffers are reading
        then) it stays on the device unless the device or RAM share has room."""
        t = t.detach()
        n = t.numel() * t.element_size()
        before, self._put_bytes = self._put_bytes, self._put_bytes + n
        entry = _Entry(t.dtype, tuple(t.shape))
        # Filled from the end: what is put last is read first.
        to_host = self._plan_total - self.gpu_bytes
        ram_room = self._ram_fits([min(self.piece_bytes, n - off) for off in range(0, n, self.piece_bytes)])
        if not may_spill and self._gpu_used + n > self.gpu_bytes and not ram_room:
            entry.device_tensor = t  # beyond the device budget: as if it had not been put aside
        elif before + n > to_host and self._gpu_used + n <= self.gpu_bytes:
            entry.device_tensor = t
            self._gpu_used += n
            self.m["act_gpu_peak_bytes"] = max(self.m["act_gpu_peak_bytes"], self._gpu_used)
        else:
            flat = t.contiguous().view(-1).view(torch.uint8)
            to_ram = to_host - (self.ram_bytes - self.staging_bytes)
            for off in range(0, n, self.piece_bytes):
                part = flat[off: off + self.piece_bytes]
                pos = before + off
                if (pos + part.numel() > to_ram or not may_spill) and self._ram_fits([part.numel()]):
                    entry.pieces.append(self._to_ram(part))
                else:
                    entry.pieces.append(self._to_disk(part))
        self._entries[key] = entry

    # ---- the host pool -----------------------------------------------------------------------------
    def _buffer(self, nbytes: int) -> torch.Tensor:
        """Page-aligned host memory, page-locked on CUDA (the copies are then DMA at full PCIe speed)."""
        buf = _core.AlignedBuffer(nbytes)
        registered = self._cuda and int(torch.cuda.cudart().cudaHostRegister(buf.address, buf.nbytes, 0)) == 0
        self._buffers.append((buf, registered))
        return tensor_over(buf.address, buf.nbytes, buf)

    @property
    def _pool_capacity(self) -> int:
        """Bytes the host pool may hold: the RAM budget less the staging buffers."""
        return max(0, self.ram_bytes - self.staging_bytes)

    def _segment_size(self, i: int) -> int:
        return min(self.segment_bytes, self._pool_capacity - i * self.segment_bytes)

    def _ram_place(self, sizes, commit: bool):
        """Where pieces of `sizes` bytes go in the host pool, from the allocator's position (None
        if they do not all fit the budget); with `commit`, taken (segments allocated as needed)."""
        seg, off = self._ram_at
        places = []
        for n in sizes:
            n = _aligned(n)
            if off + n > self._segment_size(seg):
                seg, off = seg + 1, 0
                if n > self._segment_size(seg):
                    return None
            places.append((seg, off))
            off += n
        if commit:
            self._ram_at = (seg, off)
            while len(self._segments) <= seg:
                self._segments.append(self._buffer(self._segment_size(len(self._segments))))
        return places

    def _ram_fits(self, sizes) -> bool:
        return self._ram_place(sizes, commit=False) is not None

    @property
    def ram_allocated_bytes(self) -> int:
        """Host memory the stash holds now (pool segments, staging buffers, scratch banks)."""
        return sum(buf.nbytes for buf, _ in self._buffers)

    def _to_ram(self, part: torch.Tensor) -> _Piece:
        ((seg, at),) = self._ram_place([part.numel()], commit=True)
        self._segments[seg][at: at + part.numel()].copy_(part, non_blocking=self._cuda)
        self._ram_used += part.numel()
        self.m["act_ram_bytes"] += part.numel()
        self.m["act_ram_peak_bytes"] = max(self.m["act_ram_peak_bytes"], self._ram_used)
        return _Piece(part.numel(), "ram", at, segment=seg)

    def _staging(self, i: int) -> torch.Tensor:
        if self._staging_buf is None:
            self._staging_buf = self._buffer(self.staging_bytes)
        return self._staging_buf[i * self.piece_bytes: (i + 1) * self.piece_bytes]

    def _staging_address(self, i: int) -> int:
        return self._staging(i).data_ptr()

    def _to_disk(self, part: torch.Tensor) -> _Piece:
        if self.ram_bytes < self.staging_bytes:
            raise self._staging_error("the device budget is full")
        if self._spill is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._spill = _core.SpillFile(str(self.spill_dir / "activations.spill"), io_threads=self.io_threads,
                                          direct=self.direct)
            self._io = concurrent.futures.ThreadPoolExecutor(STAGING_BUFFERS, thread_name_prefix="gmtier-spill")
        i = self._next_staging
        self._next_staging = (i + 1) % STAGING_BUFFERS
        piece = _Piece(part.numel(), "disk", self._disk_used)
        self._disk_used += _aligned(part.numel())
        self._wait_write(i)
        buf = self._staging(i)
        buf[:part.numel()].copy_(part)  # a device-to-host copy waits for the kernels that made `part`
        n_io = _aligned(part.numel())
        addr = self._staging_address(i)

        def write():
            piece.crc = self._spill.write(piece.at, addr, n_io)

        self._write_busy[i] = self._io.submit(write)
        self.m["act_disk_write_bytes"] += n_io
        return piece

    def _wait_write(self, i: int) -> None:
        fut = self._write_busy[i]
        if fut is not None:
            t0 = time.perf_counter()
            fut.result()
            self.m["act_disk_wait_s"] += time.perf_counter() - t0
            self._write_busy[i] = None

    # ---- backward ---------------------------------------------------------------------------------
    def expect(self, keys: list) -> None:
        """The order backward will `get` the entries in: disk pieces are read ahead in it."""
        for i in range(STAGING_BUFFERS):
            self._wait_write(i)  # every spill is on disk before the staging buffers are reused
        self._order = [p for k in keys for p in self._entries[k].pieces if p.tier == "disk"]
        self._free_staging = list(range(STAGING_BUFFERS))
        self._read_ahead()

    def _read_ahead(self) -> None:
        while self._order and self._free_staging:
            piece = self._order.pop(0)
            i = self._free_staging.pop(0)
            piece.staging = i
            addr = self._staging_address(i)
            piece.ready = self._io.submit(self._spill.read, piece.at, addr, _aligned(piece.nbytes), piece.crc)

    def get(self, key) -> torch.Tensor:
        """The entry on the device (removed from the stash)."""
        entry = self._entries.pop(key)
        if entry.device_tensor is not None:
            self._gpu_used = max(0, self._gpu_used - entry.device_tensor.numel() * entry.device_tensor.element_size())
            return entry.device_tensor
        out = torch.empty(entry.shape, dtype=entry.dtype, device=self.device)
        flat = out.view(-1).view(torch.uint8)
        off = 0
        for piece in entry.pieces:
            dst = flat[off: off + piece.nbytes]
            if piece.tier == "ram":
                dst.copy_(self._segments[piece.segment][piece.at: piece.at + piece.nbytes], non_blocking=self._cuda)
            else:
                if piece.ready is None:  # not expected: read now
                    self._order = [p for p in self._order if p is not piece]
                    if not self._free_staging:
                        raise RuntimeError("activation stash: a piece was read out of the expected order")
                    self._order.insert(0, piece)
                    self._read_ahead()
                t0 = time.perf_counter()
                piece.ready.result()
                self.m["act_disk_wait_s"] += time.perf_counter() - t0
                # Synchronous: the staging buffer is refilled by the next read right after.
                dst.copy_(self._staging(piece.staging)[:piece.nbytes])
                self.m["act_disk_read_bytes"] += _aligned(piece.nbytes)
                self._free_staging.append(piece.staging)
                self._read_ahead()
            off += piece.nbytes
        return out

    def end_step(self) -> None:
        """Drop whatever is left; the host pool and the spill file are reused by the next step."""
        if self._io is not None:
            for i in range(STAGING_BUFFERS):
                self._wait_write(i)
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()  # the host pool's copies are done
        self._entries.clear()
        self._order = []
        self._parked.clear()
        for bank in self._banks:
            bank.reset()
        self._reset()

    def metrics(self) -> dict:
        """Since the last call: the most bytes held on the device and in RAM at once, the bytes
        copied to RAM (each comes back once), written to and read from disk, and the time spent
        waiting for the disk."""
        out = dict(self.m)
        out["act_ram_allocated_bytes"] = self.ram_allocated_bytes
        if self._spill is not None:
            out["act_spill_direct"] = self._spill.direct
        self.m = {k: type(v)() for k, v in self.m.items()}
        return out

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        if self._spill is not None:
            self._spill.close()  # scratch: deletes the file
            self._spill = None
        if any(registered for _, registered in self._buffers):
            torch.cuda.synchronize()
        for buf, registered in self._buffers:
            if registered:
                torch.cuda.cudart().cudaHostUnregister(buf.address)
        self._segments, self._staging_buf, self._buffers = [], None, []
        for bank in self._banks:
            bank.segments = []
            bank.reset()
