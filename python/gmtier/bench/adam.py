"""`gmtier bench-adam`: the fused CPU AdamW against what a torch user has, in one run.

Same machine, same thread count, same parameter count (split into ``--tensors`` expert-sized
tensors), median of ``--repeats`` timed steps after warm-up:

1. the offloaded-expert update: bf16 gradient -> fp32, ``torch.optim.AdamW(fused=True)``, fp32
   master -> bf16 weight copy (the torch pipeline) vs gmtier's single pass;
2. plain fp32 AdamW: gmtier vs torch fused, torch foreach and DeepSpeedCPUAdam (when importable;
   its JIT build failing is reported, not fatal);
3. the compact state (`experts.state = "compact"`, `gmtier.compact_adam`): bf16 gradient ->
   8-bit m, v and the bf16 weight that is its own master, beside the fp32-state pipeline of 1.

It also measures the machine's memory bandwidth in the same run (multi-threaded copy and triad
over arrays far larger than the caches, bytes read + written per second) and reports gmtier's
effective bandwidth: bytes the kernel must move per second: 28 per parameter in workloads 1 and 2
(read grad, master, m, v; write master, m, v and the half copy), 10 in the compact one (read the
bf16 grad, weight and the m, v codes; write weight and codes; the block scales add 16 / block).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time

import click

from gmtier import dtypes, progress
from gmtier.user_errors import Command

BYTES_PER_PARAM = {"pipeline": 2 + 12 + 12 + 2, "fp32": 4 + 12 + 12, "compact": 2 + 2 * (2 + 1 + 1)}


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send fd 1 to stderr (DeepSpeed's logs and its JIT build print there), so --json stays clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _sizes(params: int, tensors: int) -> list[int]:
    base = params // tensors
    return [base + (1 if i < params % tensors else 0) for i in range(tensors)]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


HP = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _gmtier_pipeline(sizes, threads, repeats, simd, check_finite=False, grad_dtype="bf16"):
    import torch

    from gmtier import adam

    gdt = dtypes.from_config(grad_dtype)
    items = []
    for n in sizes:
        items.append(adam.AdamTensors(torch.randn(n), torch.zeros(n), torch.zeros(n), (torch.randn(n) * 1e-3).to(gdt),
                                      torch.zeros(1, dtype=torch.int64), torch.empty(n, dtype=torch.bfloat16)))
    t = _time(lambda: adam.adamw_step(items, simd=simd, threads=threads, check_finite=check_finite, **HP), repeats)
    return t


def _gmtier_fp32(sizes, threads, repeats, simd):
    import torch

    from gmtier import adam

    items = [adam.AdamTensors(torch.randn(n), torch.zeros(n), torch.zeros(n), torch.randn(n) * 1e-3,
                              torch.zeros(1, dtype=torch.int64)) for n in sizes]
    return _time(lambda: adam.adamw_step(items, simd=simd, threads=threads, **HP), repeats)


def _gmtier_compact(sizes, threads, repeats, simd) -> tuple[float, int]:
    """(seconds a step, the block size) of the compact AdamW on a bf16 gradient, one group per tensor."""
    import torch

    from gmtier import compact_adam as ca
    from gmtier.record import COMPACT_BLOCK

    groups = []
    for i, n in enumerate(sizes):
        st = ca.compact_state(torch.randn(n), COMPACT_BLOCK)
        grad = (torch.randn(n) * 1e-3).bfloat16()
        groups.append([ca.CompactTensors(st["weight"], st["m_codes"], st["v_codes"], st["m_scales"], st["v_scales"],
                                         grad, st["step"], stream=i)])
    t = _time(lambda: ca.adamw_compact_step(groups, block=COMPACT_BLOCK, simd=simd, threads=threads, **HP), repeats)
    return t, COMPACT_BLOCK


def _torch_pipeline(sizes, repeats):
    import torch

    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    grads16 = [(torch.randn(n) * 1e-3).bfloat16() for n in sizes]
    halves = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = torch.optim.AdamW(params, fused=True, **HP)

    @torch.no_grad()
    def step():
        for p, g in zip(params, grads16):
            p.grad.copy_(g)  # bf16 gradient -> fp32
        opt.step()
        for h, p in zip(halves, params):
            h.copy_(p)  # fp32 master -> bf16 weight

    return _time(step, repeats)


def _torch_plain(sizes, repeats, fused: bool):
    import torch

    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, fused=fused, foreach=None if fused else True, **HP)
    return _time(opt.step, repeats)


def _deepspeed(sizes, repeats):
    """(seconds, None) or (None, why not)."""
    # The CPU accelerator builds CPUAdam without the CUDA toolkit (the same SIMD kernel); this
    # process never uses DeepSpeed on the GPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import torch

        with _stdout_to_stderr():
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            lr, (b1, b2), eps, wd = HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]
            opt = DeepSpeedCPUAdam(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, adamw_mode=True)
            return _time(opt.step, repeats), None
    except Exception as e:  # not installed, JIT build failed, ...
        return None, f"{type(e).__name__}: {e}"[:500]


@click.command("bench-adam", cls=Command)
@click.option("--params", default=64_000_000, show_default=True, type=int,
              help="parameters per workload (default leaves the caches: ~1 GB of state and gradients per workload)")
@click.option("--tensors", default=8, show_default=True, type=int, help="split into this many tensors (experts)")
@click.option("--threads", default=None, type=int, help="threads for every contender [default: all CPUs]")
@click.option("--repeats", default=5, show_default=True, type=int, help="timed steps (median) after 2 warm-up")
@click.option("--simd", default="auto", show_default=True, type=click.Choice(["auto", "avx512", "avx2", "scalar"]))
@click.option("--bw-bytes", default=512 << 20, show_default=True, type=int, help="bytes per array of the bandwidth probe")
@click.option("--deepspeed/--no-deepspeed", default=True, show_default=True, help="try DeepSpeedCPUAdam")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_adam(params, tensors, threads, repeats, simd, bw_bytes, deepspeed, as_json):
    """Fused CPU AdamW vs torch (bf16 pipeline, fused, foreach) and DeepSpeedCPUAdam, plus DRAM bandwidth."""
    threads = threads or len(os.sched_getaffinity(0))
    # OpenMP runtimes (torch's and DeepSpeed's, which may be a different libgomp) read this at load.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from gmtier import adam

    torch.set_num_threads(threads)
    sizes = _sizes(params, tensors)
    log = lambda line: progress.echo(line, err=as_json)  # noqa: E731  (--json: stdout holds the JSON only)
    phases = progress.bar(total=9, desc="bench-adam", unit="phase")
    load0 = os.getloadavg()[0]
    log(f"bench-adam: {params / 1e6:.1f}M params in {tensors} tensors, {threads} threads, simd={simd} "
        f"({adam.simd_best() if simd == 'auto' else simd}), {repeats} repeats, load avg {load0:.2f}")

    with progress.phase(phases, "memory bandwidth"):
        bw = adam.memory_bandwidth(bw_bytes, threads=threads, repeats=max(3, repeats))
    log(f"  memory: copy {bw['copy_gbps']:.1f} GB/s (median {bw['copy_median_gbps']:.1f}; memcpy {bw['memcpy_gbps']:.1f}, "
        f"streaming {bw['stream_copy_gbps']:.1f}), triad {bw['triad_gbps']:.1f}, in place {bw['inplace_gbps']:.1f} GB/s")

    res = {}
    with progress.phase(phases, "gmtier pipeline"):
        res["gmtier_pipeline_s"] = _gmtier_pipeline(sizes, threads, repeats, simd)
    log(f"  gmtier pipeline: {params / res['gmtier_pipeline_s'] / 1e6:.0f} Mparams/s")
    with progress.phase(phases, "gmtier pipeline, check_finite"):
        res["gmtier_pipeline_check_s"] = _gmtier_pipeline(sizes, threads, repeats, simd, check_finite=True)
    with progress.phase(phases, "gmtier compact state"):
        res["gmtier_compact_s"], block = _gmtier_compact(sizes, threads, repeats, simd)
    log(f"  gmtier compact state: {params / res['gmtier_compact_s'] / 1e6:.0f} Mparams/s")
    with progress.phase(phases, "torch pipeline"):
        res["torch_pipeline_s"] = _torch_pipeline(sizes, repeats)
    log(f"  torch pipeline: {params / res['torch_pipeline_s'] / 1e6:.0f} Mparams/s")
    with progress.phase(phases, "gmtier fp32"):
        res["gmtier_fp32_s"] = _gmtier_fp32(sizes, threads, repeats, simd)
    with progress.phase(phases, "torch fused"):
        res["torch_fused_s"] = _torch_plain(sizes, repeats, fused=True)
    with progress.phase(phases, "torch foreach"):
        res["torch_foreach_s"] = _torch_plain(sizes, repeats, fused=False)
    with progress.phase(phases, "DeepSpeed CPUAdam"):
        ds_s, ds_err = _deepspeed(sizes, repeats) if deepspeed else (None, "skipped (--no-deepspeed)")
    phases.close()
    load1 = os.getloadavg()[0]

    mps = lambda s: None if s is None else params / s / 1e6  # noqa: E731
    g = mps(res["gmtier_pipeline_s"])
    eff = BYTES_PER_PARAM["pipeline"] * params / res["gmtier_pipeline_s"] / 1e9
    eff32 = BYTES_PER_PARAM["fp32"] * params / res["gmtier_fp32_s"] / 1e9
    compact_bytes = BYTES_PER_PARAM["compact"] * params + 16 * sum(-(-n // block) for n in sizes)
    eff_compact = compact_bytes / res["gmtier_compact_s"] / 1e9
    out = {
        "gmtier_mparams_s": g,
        "torch_pipeline_mparams_s": mps(res["torch_pipeline_s"]),
        "torch_fused_mparams_s": mps(res["torch_fused_s"]),
        "torch_foreach_mparams_s": mps(res["torch_foreach_s"]),
        "deepspeed_mparams_s": mps(ds_s),
        "speedup_vs_torch_pipeline": res["torch_pipeline_s"] / res["gmtier_pipeline_s"],
        "speedup_vs_torch_fused": res["torch_fused_s"] / res["gmtier_fp32_s"],
        "gbps_effective": eff,
        "dram_copy_gbps": bw["copy_gbps"],
        # extras
        "gmtier_fp32_mparams_s": mps(res["gmtier_fp32_s"]),
        "gmtier_check_finite_mparams_s": mps(res["gmtier_pipeline_check_s"]),
        "check_finite_overhead": res["gmtier_pipeline_check_s"] / res["gmtier_pipeline_s"] - 1,
        "speedup_vs_deepspeed": None if ds_s is None else ds_s / res["gmtier_fp32_s"],
        "gbps_effective_fp32": eff32,
        "compact_mparams_s": mps(res["gmtier_compact_s"]),
        "compact_block": block,
        "compact_speedup_vs_fp32_state": res["gmtier_pipeline_s"] / res["gmtier_compact_s"],
        "gbps_effective_compact": eff_compact,
        "bandwidth_fraction_compact": eff_compact / bw["copy_gbps"],
        "bandwidth_fraction": eff / bw["copy_gbps"],
        "dram_triad_gbps": bw["triad_gbps"],
        "dram_inplace_gbps": bw["inplace_gbps"],
        "bandwidth_fraction_inplace": eff / bw["inplace_gbps"],
        "dram_copy_median_gbps": bw["copy_median_gbps"],
        "deepspeed_error": ds_err,
        "params": params,
        "tensors": tensors,
        "threads": threads,
        "repeats": repeats,
        "simd": adam.simd_best() if simd == "auto" else simd,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_avg_start": load0,
        "load_avg_end": load1,
    }
    if as_json:
        print(json.dumps(out))
        return
    f = lambda x: "-" if x is None else f"{x:,.0f}"  # noqa: E731
    print()
    print(f"{'workload':<34}{'Mparams/s':>12}{'vs gmtier':>11}")
    rows = [
        ("bf16 grad -> bf16 weight: gmtier", g, None),
        ("  gmtier, check_finite=True", out["gmtier_check_finite_mparams_s"], None),
        ("  torch pipeline (fused AdamW)", out["torch_pipeline_mparams_s"], None),
        ("fp32 AdamW: gmtier", out["gmtier_fp32_mparams_s"], None),
        ("  torch fused", out["torch_fused_mparams_s"], None),
        ("  torch foreach", out["torch_foreach_mparams_s"], None),
        ("  DeepSpeedCPUAdam", out["deepspeed_mparams_s"], None),
        ("compact state, bf16 grad: gmtier", out["compact_mparams_s"], None),
    ]
    for name, v, _ in rows:
        ref = g if name.startswith(("bf16", "  gmtier, c", "  torch pipeline")) else out["gmtier_fp32_mparams_s"]
        ratio = "" if v is None or name.startswith(("bf16", "fp32", "compact")) else f"{ref / v:.2f}x"
        print(f"{name:<34}{f(v):>12}{ratio:>11}")
    print()
    print(f"speedup vs torch pipeline {out['speedup_vs_torch_pipeline']:.2f}x (target >= 1.5), "
          f"vs torch fused {out['speedup_vs_torch_fused']:.2f}x (target >= 1)"
          + ("" if ds_s is None else f", vs DeepSpeed {out['speedup_vs_deepspeed']:.2f}x (target > 1)"))
    print(f"effective bandwidth {eff:.1f} GB/s (fp32 workload {eff32:.1f}) = {100 * out['bandwidth_fraction']:.0f}% "
          f"of the measured copy {bw['copy_gbps']:.1f} GB/s (target >= 85%); triad {bw['triad_gbps']:.1f} GB/s, "
          f"in-place read+write {bw['inplace_gbps']:.1f} GB/s ({100 * out['bandwidth_fraction_inplace']:.0f}% of it)")
    print(f"compact state: {out['compact_speedup_vs_fp32_state']:.2f}x the fp32-state pipeline in params/s "
          f"(target >= 2.5), {eff_compact:.1f} GB/s for its {compact_bytes / params:.2f} B/param = "
          f"{100 * out['bandwidth_fraction_compact']:.0f}% of the copy bandwidth (target >= 85%), block {block}")
    print(f"check_finite costs {100 * out['check_finite_overhead']:.1f}%")
    if ds_err:
        print(f"DeepSpeed: {ds_err}")
    print(f"{out['cpu']}, {threads} threads, simd {out['simd']}, load avg {load0:.2f} -> {load1:.2f}")
