"""The hardware ceilings `bench-train` puts a step against, each measured on this machine in the
run that uses it: pinned host -> GPU copies (the disk's probes and bound: gmtier.store.disk); and
the process's RSS."""

from __future__ import annotations

import os
import resource
import time

import torch

from gmtier.store.disk import GB


def rss_bytes() -> int:
    """The process's resident set now (ru_maxrss, the lifetime peak, where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def h2d_rate(nbytes: int = 1 << 28, repeats: int = 5) -> float | None:
    """Pinned host -> GPU copy rate (GB/s) of one large buffer: the PCIe ceiling."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    src.random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        _sync()
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2] / GB
