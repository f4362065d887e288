"""One Switch layer at `small`'s shapes (d_model 512, d_ff 2048, 32 x 512 = 16384 tokens, capacity
1.25) forward + backward in bf16 on the GPU: the per-expert loop against grouped GEMMs
(experts.gemm), 16 and 64 experts, beside a dense FFN of the same d_ff (equal FLOPs per token).

Times with CUDA events around each iteration (so GPU idle time while the host launches or syncs
counts, which is what the loop pays) and with the wall clock; medians of --iters after --warmup.
One JSON line per case, then a summary table. Run from the repo root: python exp/grouped_layer.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gmtier.config import ModelConfig
from gmtier.experts.bank import GEMM_FALLBACKS, ResidentExperts
from gmtier.model import DenseFFN, SwitchFFN


def timed(fn, iters: int, warmup: int) -> tuple[float, float]:
    """(median CUDA-event ms, median wall ms) of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gpu, wall = [], []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        fn()
        b.record()
        b.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        gpu.append(a.elapsed_time(b))
    return statistics.median(gpu), statistics.median(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--experts", default="16,64")
    ap.add_argument("--tokens", type=int, default=32 * 512)
    ap.add_argument("--pad-rows", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    d, f, T = 512, 2048, args.tokens
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda")  # the layer norm's output: fp32 under autocast
    gy = torch.randn(T, d, device="cuda")
    rows = []

    def case(name: str, layer, gemm: str | None, n_experts: int | None):
        def fwd_bwd():
            xi = x.detach().requires_grad_()
            with torch.autocast("cuda", torch.bfloat16):
                y = layer(xi)
            y.float().backward(gy)
            layer.zero_grad(set_to_none=True)

        def fwd():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                layer(x)

        fb_gpu, fb_wall = timed(fwd_bwd, args.iters, args.warmup)
        f_gpu, f_wall = timed(fwd, args.iters, args.warmup)
        used = getattr(getattr(layer, "experts", None), "gemm_used", None)
        row = {"case": name, "experts": n_experts, "gemm_asked": gemm, "gemm_ran": used, "fwd_bwd_ms": fb_gpu,
               "fwd_bwd_wall_ms": fb_wall, "fwd_ms": f_gpu, "fwd_wall_ms": f_wall}
        print(json.dumps(row), flush=True)
        rows.append(row)

    cfg = ModelConfig(d_model=d, d_ff=f, n_experts=16, switch_every=1, n_layer=8, capacity_factor=1.25)
    case("dense FFN", DenseFFN(cfg).cuda(), None, None)
    for n in [int(v) for v in args.experts.split(",")]:
        cfg = ModelConfig(d_model=d, d_ff=f, n_experts=n, switch_every=1, n_layer=8, capacity_factor=1.25)
        for gemm in ("loop", "grouped"):
            torch.manual_seed(1)
            layer = SwitchFFN(cfg, 0, ResidentExperts(cfg, 0, 0, args.pad_rows, gemm)).cuda().train()
            case(f"switch {n} experts, {gemm}", layer, gemm, n)
            del layer
            torch.cuda.empty_cache()
    dense = rows[0]["fwd_bwd_ms"]
    print(f"\n{'case':32} {'ran':8} {'fwd+bwd ms':>10} {'wall':>8} {'fwd ms':>8} {'/ dense':>8}")
    for r in rows:
        print(f"{r['case']:32} {str(r['gemm_ran'] or '-'):8} {r['fwd_bwd_ms']:10.3f} {r['fwd_bwd_wall_ms']:8.3f} "
              f"{r['fwd_ms']:8.3f} {r['fwd_bwd_ms'] / dense:8.2f}")
    if GEMM_FALLBACKS:
        print("grouped GEMMs fell back:", GEMM_FALLBACKS)


if __name__ == "__main__":
    main()
