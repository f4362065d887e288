"""The disk under an expert store, measured: O_DIRECT reads of the store's own file, overwrites of
a scratch file beside it, and both at once; the least time a step's bytes can take from those
rates; and from them whether the store's reads and writes should take turns (`experts.read_write`).
`bench-train` (gmtier.bench.train) bounds its steps with the same probes."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

GB = 1e9
# A turn when reads and writes take turns: long beside the idle moment of each switch (the last
# chunks of one kind finishing before the other starts), short enough that a demand read waits at
# most a few hundred milliseconds behind write-backs. (A training step's backward rarely fills a
# whole turn: each read waits for a dirty record to leave its slot; docs/performance.md.)
TURN_BYTES = 1 << 30
# Turns are chosen only when the probes say they save more than this share of the disk time:
# switching has a cost of its own, and the rates drift by about as much from second to second.
TURNS_MARGIN = 0.05


def disk_read_rate(path: Path, max_bytes: int = 4 << 30, threads: int = 8, passes: int = 2) -> tuple[float, bool]:
    """O_DIRECT read rate (GB/s) of the store's own file, the best of `passes`: the disk ceiling
    (a virtual disk's rate drifts between passes; a ceiling takes the best it showed)."""
    from gmtier import _core

    size = min(path.stat().st_size, max_bytes) // 4096 * 4096
    best, direct = 0.0, True
    for _ in range(passes):
        nbytes, seconds, direct = _core.raw_read(str(path), [(0, size)], 4 << 20, threads, True)
        best = max(best, nbytes / seconds / GB)
    return best, direct


@contextlib.contextmanager
def _scratch_writer(path: Path, nbytes: int, piece: int = 4 << 20, threads: int = 4):
    """A scratch file of `nbytes` written once (untimed), then a function that overwrites it with
    O_DIRECT pwrites of `piece` bytes on `threads` threads, fsync included, and returns the
    seconds taken. Overwriting is the store's own pattern (its slots are allocated when it is
    made); the first writes of a new file also allocate blocks (on a thin-provisioned virtual
    disk, host storage too): 0.40 GB/s against the 1.78 GB/s a step moved, on one box."""
    import mmap
    import threading

    buf = mmap.mmap(-1, piece)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(4096) * (piece // 4096))
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:  # a filesystem without O_DIRECT
        fd = os.open(path, flags & ~getattr(os, "O_DIRECT", 0), 0o644)
    n_pieces = max(1, nbytes // piece)

    def write_all() -> float:
        next_piece = iter(range(n_pieces))
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    i = next(next_piece, None)
                if i is None:
                    return
                os.pwrite(fd, buf, i * piece)  # releases the GIL

        t0 = time.perf_counter()
        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        os.fsync(fd)
        return time.perf_counter() - t0

    try:
        write_all()
        yield write_all
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def disk_write_rate(directory: Path, nbytes: int = 1 << 30, threads: int = 4, passes: int = 2) -> float:
    """O_DIRECT overwrite rate (GB/s) of a scratch file beside the store, fsync included; the
    best of `passes`."""
    with _scratch_writer(directory / "write-probe.bin", nbytes, threads=threads) as overwrite:
        return max(nbytes / overwrite() / GB for _ in range(passes))


def disk_mixed_rate(read_path: Path, directory: Path, read_gbps: float, write_gbps: float,
                    seconds: float = 2.0, threads: int = 8, passes: int = 2) -> dict:
    """Reads of the store's file and overwrites of a scratch file at the same time, sized so
    that each alone would take `seconds`: whether the disk moves both at once (full duplex) or
    shares one budget. Returns the rates each achieved and `total_gbps` = all bytes / elapsed,
    of the best of `passes` (a ceiling, as the read and write probes)."""
    import threading

    from gmtier import _core

    size = read_path.stat().st_size // 4096 * 4096
    # At least one read block and one 4 MiB write piece: a slow disk and a short probe would
    # otherwise round a direction down to no bytes at all, and a rate of 0.
    read_bytes = max(4096, int(read_gbps * GB * seconds) // 4096 * 4096)
    ranges, left = [], read_bytes  # the file read over again where it is smaller
    while left > 0:
        ranges.append((0, min(size, left)))
        left -= ranges[-1][1]
    write_bytes = max(4 << 20, int(write_gbps * GB * seconds) // (4 << 20) * (4 << 20))
    best: dict = {}
    with _scratch_writer(directory / "mixed-probe.bin", write_bytes, threads=threads) as overwrite:
        for _ in range(passes):
            result: dict = {}

            def reader():
                t = time.perf_counter()
                _core.raw_read(str(read_path), ranges, 4 << 20, threads, True)
                result["read_s"] = time.perf_counter() - t

            t0 = time.perf_counter()
            th = threading.Thread(target=reader)
            th.start()
            write_s = overwrite()
            th.join()
            elapsed = time.perf_counter() - t0
            rates = {"read_gbps": read_bytes / result["read_s"] / GB, "write_gbps": write_bytes / write_s / GB,
                     "total_gbps": (read_bytes + write_bytes) / elapsed / GB}
            if rates["total_gbps"] > best.get("total_gbps", 0.0):
                best = rates
    return best


def disk_time(read_bytes: float, write_bytes: float, read_gbps: float, write_gbps: float, total_gbps: float) -> float:
    """Least time to read and write these bytes: each direction at its own rate; and both
    together either one after the other or at once at the combined rate measured while they
    ran at the same time, whichever is faster."""
    if not read_bytes and not write_bytes:
        return 0.0
    serial = read_bytes / (read_gbps * GB) + write_bytes / (write_gbps * GB)
    together = (read_bytes + write_bytes) / (total_gbps * GB) if total_gbps else serial
    return max(read_bytes / (read_gbps * GB), write_bytes / (write_gbps * GB), min(serial, together))


def read_write_turns(read_path: Path, directory: Path, threads: int, probe_bytes: int = 256 << 20) -> tuple[bool, dict]:
    """Whether this disk moves a step's bytes faster with reads and writes taking turns than at
    once, from short probes (`probe_bytes` read from the store's own file, as many overwritten in a
    scratch file beside it, then both at once for as long as each took alone): a step reads and
    writes about as many bytes (each record read in forward and backward, written back once).
    Returns the verdict and the rates (GB/s: `read_gbps`, `write_gbps`, `together_gbps`, and
    `turns_gbps`, the rate of equal reads and writes one after the other)."""
    nbytes = max(4096, min(probe_bytes, read_path.stat().st_size) // 4096 * 4096)
    read_gbps, _direct = disk_read_rate(read_path, max_bytes=nbytes, threads=threads, passes=1)
    write_gbps = disk_write_rate(directory, nbytes=nbytes, threads=threads, passes=1)
    seconds = nbytes / (read_gbps * GB)
    together = disk_mixed_rate(read_path, directory, read_gbps, write_gbps, seconds=seconds, threads=threads,
                               passes=1)["total_gbps"]
    turns = 2 / (1 / read_gbps + 1 / write_gbps)
    rates = {"read_gbps": read_gbps, "write_gbps": write_gbps, "together_gbps": together, "turns_gbps": turns}
    return turns > together * (1 + TURNS_MARGIN), rates
