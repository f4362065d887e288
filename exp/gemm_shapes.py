"""Host time of a bf16 GEMM call for shapes cuBLAS has seen against shapes it has not: why the
expert GEMMs pad each expert's rows (`experts.pad_rows`). Needs a CUDA GPU.

    python exp/gemm_shapes.py [--d-model 512] [--d-ff 2048]
"""

import argparse
import random
import sys
import time

import torch


def host_us_per_call(x, w, out, rows) -> float:
    """Mean host time of one `torch.mm` over `rows` (the GPU work is not waited for in the loop)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for n in rows:
        torch.mm(x[:n], w.t(), out=out[:n])
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / len(rows) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemm_shapes: needs a CUDA GPU (cuBLAS's shape cache is what it measures)")
    lo, hi = 700, 1300  # the per-expert token counts of `small` (16,384 tokens over 16 experts)
    x = torch.randn(hi, a.d_model, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(a.d_ff, a.d_model, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(hi + 128, a.d_ff, device="cuda", dtype=torch.bfloat16)
    x = torch.cat([x, x.new_zeros(128, a.d_model)])
    host_us_per_call(x, w, out, [1024] * 50)
    fresh = random.Random(0).sample(range(lo, hi), a.calls)
    padded = [-(-n // 64) * 64 for n in random.Random(1).sample(range(lo, hi), a.calls)]
    print(f"{torch.cuda.get_device_name(0)}, bf16 [n, {a.d_model}] x [{a.d_model}, {a.d_ff}], host time per call:")
    print(f"  one shape, repeated:                  {host_us_per_call(x, w, out, [1024] * a.calls):7.1f} us")
    print(f"  {a.calls} row counts not seen before:      {host_us_per_call(x, w, out, fresh):7.1f} us")
    print(f"  the same {a.calls} again:                  {host_us_per_call(x, w, out, fresh):7.1f} us")
    print(f"  {a.calls} counts rounded up to 64 rows:   {host_us_per_call(x, w, out, padded):7.1f} us")


if __name__ == "__main__":
    main()
