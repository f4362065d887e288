"""Spill-file bandwidth on this machine's disk: `SpillFile.write` then `read` of --gib GiB from
--threads Python threads (disjoint ranges, each a --range-mib buffer, as the layer-major step
spills one micro-batch's block input each), against `_core.raw_read` of the same file (the
disk's read limit). Buffers are page-locked with cudaHostRegister when CUDA exists, as the
activation tier's are, and one D2H + H2D copy per range is timed alongside, so the bound the
step sees (disk or PCIe) shows in one run.

    PYTHONPATH=python python exp/spill_bandwidth.py --dir /tmp --gib 8 --threads 4
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from gmtier import _core
from gmtier.host_memory import aligned_tensor


def timed_threads(n: int, work) -> float:
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp", help="directory on the disk to measure")
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--range-mib", type=int, default=256, help="bytes a write/read call moves")
    ap.add_argument("--threads", type=int, default=4, help="Python threads calling write/read")
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--chunk-mib", type=int, default=4)
    args = ap.parse_args()
    size = args.range_mib << 20
    ranges = max(args.threads, int(args.gib * 1024) // args.range_mib)
    bufs = [aligned_tensor(size) for _ in range(args.threads)]
    cuda = torch.cuda.is_available()
    if cuda:
        for b in bufs:
            assert int(torch.cuda.cudart().cudaHostRegister(b.data_ptr(), b.numel(), 0)) == 0
    for i, b in enumerate(bufs):
        b.view(torch.float32).normal_(generator=torch.Generator().manual_seed(i))
    path = Path(args.dir) / "spill_bandwidth.spill"
    crcs = [0] * ranges
    with _core.SpillFile(path, io_threads=args.io_threads, chunk_bytes=args.chunk_mib << 20) as f:
        def write(t):
            for r in range(t, ranges, args.threads):
                crcs[r] = f.write(r * size, bufs[t].data_ptr(), size)

        def read(t):
            for r in range(t, ranges, args.threads):
                f.read(r * size, bufs[t].data_ptr(), size, expect_crc=crcs[r])

        write_s = timed_threads(args.threads, write)
        _core.drop_cache(str(path))  # matters only where O_DIRECT fell back to buffered I/O
        read_s = timed_threads(args.threads, read)
        raw_bytes, raw_s, raw_direct = _core.raw_read(str(path), [(0, ranges * size)], args.chunk_mib << 20,
                                                      args.io_threads)
        out = {"bytes": ranges * size, "direct": f.direct, "raw_direct": raw_direct,
               "write_GBps": ranges * size / write_s / 1e9, "read_GBps": ranges * size / read_s / 1e9,
               "raw_read_GBps": raw_bytes / raw_s / 1e9, "threads": args.threads, "io_threads": args.io_threads,
               "range_mib": args.range_mib, "chunk_mib": args.chunk_mib}
    if cuda:
        dev = torch.empty(size, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            dev.copy_(bufs[0], non_blocking=True)
            bufs[0].copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        out["pcie_h2d_d2h_GBps"] = 8 * size / (time.perf_counter() - t0) / 1e9
        for b in bufs:
            torch.cuda.cudart().cudaHostUnregister(b.data_ptr())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
