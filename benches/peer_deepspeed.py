"""gmtier side by side with DeepSpeed on the same Switch model, same machine, same call.

    python benches/peer_deepspeed.py --config configs/small.toml --data .carry/data/ruslit \
        --modes zero2-offload,gmtier --micro-batches 1,64 --steps 3 --warmup 1 --json-out peer.jsonl

Every mode trains gmtier's own model, built by `gmtier.build.build_model`: `gmtier.model.GPT` with
the resident expert bank (`ResidentExperts`: every expert a pair of nn.Parameters in a
ParameterList, the same routing code and the same per-expert init), on the same data, batch,
sequence length, micro-batches per optimizer step, precision and GPU cap (train.gpu_memory_limit,
torch's per-process memory fraction) as gmtier's run of the config:

- `gmtier`: gmtier's tiered training, as `gmtier bench-train` times it (`gmtier.bench.train`).
- `resident`: gmtier's resident reference (plain torch: experts on the GPU, torch AdamW).
- `zero2-offload`: DeepSpeed ZeRO-2, optimizer offloaded to the CPU (DeepSpeedCPUAdam).
- `zero3-nvme`: DeepSpeed ZeRO-3, parameters and optimizer offloaded to NVMe (ZeRO-Infinity,
  its async_io op, O_DIRECT). DeepSpeed's own MoE layer refuses ZeRO-3 (DeepSpeed issues 1392,
  2870), so the plain modules are trained with each `ResidentExperts` a ZeRO-3 leaf module
  (`deepspeed.utils.set_z3_leaf_modules`, as DeepSpeed documents for Mixtral): ZeRO-3 then
  gathers every expert of a layer in each micro-batch's forward and backward, whether it got
  tokens or not, and its optimizer step swaps in and steps the whole flat fp32 partition,
  the slices of experts that got no tokens included. The disk bytes a step, against the
  parameter bytes, show it.

DeepSpeed's gradient accumulation equals gmtier's micro-batches (train.micro_batches): the same
tokens per optimizer step. Each mode runs in its own subprocess (peaks and out-of-memory errors
are per mode; a mode that fails is a result, with its error). gmtier runs one process per M;
DeepSpeed runs all the M of a mode in one process (warm-up at the first M, then
`engine.set_train_batch_size`).

Per mode and M: tokens/s, the median step, peak GPU memory (torch's max allocated and reserved,
from after setup), peak RSS (VmHWM of the process, and the largest RSS at a step's end), disk bytes
a step (/proc/self/io read_bytes/write_bytes over the timed steps: reads served by the page cache
do not count; gmtier's store and DeepSpeed's NVMe swapper both use O_DIRECT, so theirs do), and
the ratios gmtier / DeepSpeed at each M. DeepSpeed is not a dependency of gmtier:
exp/peer_setup.sh installs it on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

DS_MODES = ("zero2-offload", "zero3-nvme")
GMTIER_MODES = ("gmtier", "resident")
MODES = GMTIER_MODES + DS_MODES
GB = 1e9


# ---- measurements -------------------------------------------------------------------------

def proc_io() -> tuple[int, int]:
    """(read_bytes, write_bytes) this process (all its threads) made the block layer move so far."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(fields["read_bytes"]), int(fields["write_bytes"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def vm_hwm() -> int:
    """The process's peak resident set (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cuda_peaks_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _cuda_peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"max_gpu_allocated_bytes": None, "max_gpu_reserved_bytes": None}
    return {"max_gpu_allocated_bytes": torch.cuda.max_memory_allocated(),
            "max_gpu_reserved_bytes": torch.cuda.max_memory_reserved()}


def free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def require_free(path: Path, need: int, what: str) -> None:
    """A clear error before a mode fills the disk: `what` needs `need` bytes under `path`."""
    have = free_bytes(path)
    if have < need:
        raise RuntimeError(f"{what} needs ~{need / GB:.1f} GB free under {path}, which has {have / GB:.1f} GB: "
                           f"free space there or point --work-dir / --nvme-dir at a larger disk")


# ---- configs ------------------------------------------------------------------------------

def load_config(args, name: str, extra: list[str]):
    """The config as gmtier bench-train loads it (its run directory under --work-dir)."""
    from gmtier.bench.train import _load

    return _load(args.config, overrides(args), Path(args.work_dir), name, extra)


def overrides(args) -> list[str]:
    return ([f"data.dir={json.dumps(args.data)}"] if args.data else []) + list(args.set or [])


def model_stats(model) -> dict:
    """Parameter counts of a built model: all, the experts', the largest tensor, the tensors of
    one expert bank."""
    from gmtier.model import ResidentExperts

    params = list(model.parameters())
    banks = [m for m in model.modules() if isinstance(m, ResidentExperts)]
    return {"params": sum(p.numel() for p in params),
            "expert_params": sum(p.numel() for b in banks for p in b.parameters()),
            "largest_param": max(p.numel() for p in params),
            "bank_tensors": max((len(list(b.parameters())) for b in banks), default=0)}


def _set_path(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
    d[last] = value


def deepspeed_config(cfg, mode: str, micro_batches: int, nvme_dir: str, stats: dict, ds_set=()) -> dict:
    """The DeepSpeed config of `mode` for gmtier config `cfg` at `micro_batches` micro-batches a
    step. `ds_set`: KEY.PATH=JSON overrides (--ds-set)."""
    if mode not in DS_MODES:
        raise ValueError(f"{mode!r} is not a DeepSpeed mode ({', '.join(DS_MODES)})")
    t = cfg.train
    precision = cfg.precision()
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                                   "weight_decay": t.weight_decay}},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if mode == "zero2-offload":
        ds["zero_optimization"] = {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                   "contiguous_gradients": True, "overlap_comm": True}
    else:
        # The parameter swapper's pinned buffers: each holds one parameter (the largest one fits),
        # and a leaf module's whole bank is gathered at once, with room for what is prefetched.
        align = 1 << 20
        buffer_size = -(-stats["largest_param"] // align) * align
        ds["zero_optimization"] = {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": True,
                              "buffer_count": 2 * stats["bank_tensors"] + 16, "buffer_size": buffer_size},
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme_dir, "pin_memory": True},
            # No parameter prefetch: DeepSpeed 0.19.8's NVMe prefetch asks its swapper twice for a
            # parameter that comes twice in its trace ("AssertionError: param N already assigned
            # swap buffer id M" on the H200); parameters are then fetched as each module needs them.
            "stage3_prefetch_bucket_size": 0,
        }
        # DeepSpeed's defaults are block 1 MiB, queue depth 8, one thread; gmtier's store keeps
        # experts.io_threads requests in flight, so DeepSpeed gets as many threads.
        ds["aio"] = {"block_size": 1 << 20, "queue_depth": 32, "intra_op_parallelism": cfg.experts.io_threads,
                     "single_submit": False, "overlap_events": True}
    for item in ds_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--ds-set {item!r}: expected KEY.PATH=JSON, e.g. aio.queue_depth=16")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        _set_path(ds, key, parsed)
    return ds


def nvme_bytes_needed(stats: dict) -> int:
    """Disk ZeRO-Infinity fills: half-precision parameters (2 B/param), fp32 master, moments and
    swapped gradients (16 B/param), with 10 % to spare."""
    return int(stats["params"] * 18 * 1.1)


def store_bytes_needed(cfg) -> int:
    """Disk gmtier's store of `cfg` fills: two slots a record (the shadow slots), 10 % to spare."""
    m = cfg.model
    _, record_bytes = cfg.expert_bytes()
    return int(len(m.switch_layers()) * m.n_experts * record_bytes * 2 * 1.1)


# ---- the modes, each run in a child process ------------------------------------------------

def _quiet(_msg) -> None:
    pass


def _result(cfg, mode: str, m: int, times: list[float], io: tuple[int, int], rss_steps: int, extra: dict) -> dict:
    tokens = m * cfg.train.batch_size * cfg.model.seq_len
    step = statistics.median(times)  # of an even count, the mean of the middle two
    return {"mode": mode, "micro_batches": m, "tokens_per_step": tokens, "step_s": step,
            "step_s_all": times, "tokens_per_s": tokens / step, "timed_steps": len(times),
            "disk_read_bytes_per_step": io[0] / len(times), "disk_write_bytes_per_step": io[1] / len(times),
            "rss_steps_bytes": rss_steps, "vm_hwm_bytes": vm_hwm(), **_cuda_peaks(), **extra}


def run_gmtier(args, mode: str, m: int) -> dict:
    """gmtier's training steps at M micro-batches, timed by bench-train's own loop (`_time_steps`)."""
    from gmtier.bench.train import _time_steps
    from gmtier.train import Trainer

    extra = [f"train.micro_batches={m}"] + (["experts.mode='resident'"] if mode == "resident" else [])
    cfg = load_config(args, f"peer-{mode}-M{m}", extra)
    if mode == "gmtier" and cfg.experts.mode == "tiered":
        require_free(Path(args.work_dir), store_bytes_needed(cfg), "gmtier's expert store")
    tr = Trainer(cfg, fresh=True, log=_quiet)
    try:
        _cuda_peaks_reset()
        if args.warmup:
            _time_steps(tr, 0, args.warmup, desc=f"{mode} warm-up")
        if tr.layer_major is not None:
            tr.layer_major.stash.metrics()  # reset: the figures of the timed steps only
        io0 = proc_io()
        res = _time_steps(tr, 0, steps_at(args, m), desc=f"{mode} M={m}")
        io1 = proc_io()
        keep = ("disk_read_bytes", "disk_write_bytes", "expert_updates", "wait_s", "act_ram_peak_bytes",
                "act_disk_write_bytes", "act_disk_read_bytes")
        n = len(res["step_s_all"])
        own = {(f"gmtier_{k}" if "peak" in k else f"gmtier_{k}_per_step"): res[k] / (1 if "peak" in k else n)
               for k in keep if isinstance(res.get(k), (int, float))}
        from gmtier.model import count_params

        counts = count_params(cfg.model)
        # The experts that got tokens in the last timed step (the routing's trace of it).
        own["experts_with_tokens_per_step"] = sum(len(s.last_experts) for s in tr.model.switch_blocks())
        return _result(cfg, mode, m, res["step_s_all"], (io1[0] - io0[0], io1[1] - io0[1]), res["rss_bytes"],
                       {**own, "params": counts["total"], "expert_params": counts["experts"],
                        "n_experts": len(cfg.model.switch_layers()) * cfg.model.n_experts,
                        "precision": cfg.precision()})
    finally:
        tr.close()
        shutil.rmtree(cfg.train.run_dir, ignore_errors=True)


def steps_at(args, m: int) -> int:
    """Timed steps at M micro-batches (--large-m-steps for M > 1 where given)."""
    return args.large_m_steps if (m > 1 and args.large_m_steps) else args.steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(args, mode: str, ms: list[int], emit) -> None:
    """DeepSpeed steps of `mode` at each M in `ms` (one engine: warm-up at ms[0], then
    set_train_batch_size for the next M); `emit(result)` for each M as it is measured."""
    import torch

    # DS_ACCELERATOR=cpu: a smoke test of this harness on a machine without a GPU (DeepSpeed's
    # CPU accelerator, gloo), not a measurement.
    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
    if not (torch.cuda.is_available() or on_cpu):
        raise RuntimeError(f"{mode} needs CUDA (DeepSpeed's engine and its offload run on a GPU; "
                           f"DS_ACCELERATOR=cpu runs a smoke test on the CPU)")
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    import numpy as np
    import setuptools  # noqa: F401  (on Python 3.12 it provides the distutils that DeepSpeed's libaio probe imports)
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from gmtier.bench.ceilings import rss_bytes
    from gmtier.build import build_model
    from gmtier.data import ensure_data
    from gmtier.model import ResidentExperts
    from gmtier.train import dense_param_groups, limit_gpu_memory, lr_at

    cfg = load_config(args, f"peer-{mode}", ["experts.mode='resident'", f"train.micro_batches={ms[0]}",
                                             f"experts.gemm={json.dumps(args.ds_gemm)}"])
    train_data, _ = ensure_data(cfg, _quiet)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = train_data.vocab_size
    if not on_cpu:
        limit_gpu_memory(cfg, "cuda")  # the same cap as gmtier's run (train.gpu_memory_limit)
    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg, "cpu")  # gmtier's model with resident experts, on the CPU for now
    model.set_checkpointing(cfg.train.activation_checkpointing)
    stats = model_stats(model)
    # gmtier's parameter groups (matrices decay), taken before ZeRO-3 empties the parameters' data.
    groups = dense_param_groups(model, cfg.train.weight_decay)
    nvme = Path(args.nvme_dir) / f"{mode}-{os.getpid()}"
    ds_cfg = deepspeed_config(cfg, mode, ms[0], str(nvme), stats, args.ds_set or ())
    setup_t0 = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    sync = (lambda: None) if on_cpu else torch.cuda.synchronize
    try:
        if mode == "zero3-nvme":
            require_free(Path(args.nvme_dir), nvme_bytes_needed(stats), "ZeRO-Infinity's NVMe files")
            set_z3_leaf_modules(model, [ResidentExperts])
            half = torch.bfloat16 if cfg.precision() == "bf16" else torch.float16
            for p in model.parameters():
                p.data = p.data.to(half)
            for mod in model.modules():  # buffers (RoPE tables) are not partitioned: to the GPU as they are
                for k, b in mod._buffers.items():
                    if b is not None:
                        mod._buffers[k] = b.to(device)
            # Partitioned to NVMe one parameter at a time (the whole model never sits on the GPU).
            deepspeed.zero.Init(module=model, config_dict_or_path=ds_cfg, remote_device="nvme", pin_memory=True)
            # Parameters used outside their own module's forward: the tied head reads the
            # embedding in GPT.forward, a Switch layer reads its router's weight itself.
            deepspeed.zero.register_external_parameter(model, model.wte.weight)
            for s in model.switch_blocks():
                deepspeed.zero.register_external_parameter(s, s.router.weight)
        schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731  gmtier's warmup + cosine
            opt, lambda s: lr_at(cfg, s) / cfg.train.lr)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg,
                                               lr_scheduler=schedule)
        setup_s = time.perf_counter() - setup_t0
        rng = np.random.default_rng(cfg.train.seed)
        b, seq = cfg.train.batch_size, cfg.model.seq_len
        switch = engine.module.switch_blocks()

        def step(m: int) -> int:
            """One optimizer step of m micro-batches; returns the experts that got tokens in it."""
            x, y = train_data.batch(m * b, seq, rng)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            used = set()
            for xb, yb in zip(x.split(b), y.split(b)):
                _, loss, aux = engine(xb, yb)
                engine.backward(loss + aux)
                engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
                used |= {(s.layer, e) for s in switch for e in s.last_experts}
            return len(used)

        n_experts = len(cfg.model.switch_layers()) * cfg.model.n_experts
        _cuda_peaks_reset()
        for i, m in enumerate(ms):
            if m != engine.gradient_accumulation_steps():
                engine.set_train_batch_size(m * b)
                if hasattr(engine.optimizer, "gradient_accumulation_steps"):
                    engine.optimizer.gradient_accumulation_steps = m
            for _ in range(args.warmup if i == 0 else 0):
                step(m)
            times, used, rss = [], [], 0
            io0 = proc_io()
            for _ in range(steps_at(args, m)):
                sync()
                t0 = time.perf_counter()
                used.append(step(m))
                sync()
                times.append(time.perf_counter() - t0)
                rss = max(rss, rss_bytes())
            io1 = proc_io()
            emit(_result(cfg, mode, m, times, (io1[0] - io0[0], io1[1] - io0[1]), rss, {
                "params": stats["params"], "expert_params": stats["expert_params"], "n_experts": n_experts,
                "experts_with_tokens_per_step": sum(used) / len(used), "setup_s": setup_s,
                "precision": cfg.precision(), "deepspeed": deepspeed.__version__, "ds_config": ds_cfg}))
            _cuda_peaks_reset()
    finally:
        shutil.rmtree(nvme, ignore_errors=True)


def child(args) -> None:
    """One mode in this process: its results, one JSON line each, appended to --child-out."""
    out = Path(args.child_out)

    def emit(r: dict) -> None:
        r["config"] = Path(args.config).stem
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")

    ms = parse_ms(args.micro_batches)
    if args.child in DS_MODES:
        run_deepspeed(args, args.child, ms, emit)
    else:
        emit(run_gmtier(args, args.child, ms[0]))


# ---- the parent: one child a mode, the table ---------------------------------------------

def parse_ms(text: str) -> list[int]:
    try:
        ms = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ms = []
    if not ms or min(ms) < 1:
        raise SystemExit(f"--micro-batches {text!r}: expected micro-batch counts such as 1,16")
    return ms


def _error_line(stderr: str) -> str:
    """The last exception line of a child's stderr (or its last line)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln or "Killed" in ln:
            return ln[:500]
    return lines[-1][:500] if lines else ""


def run_child(args, mode: str, ms: list[int], log) -> list[dict]:
    """`mode` at each M of `ms` in a subprocess; results for the M it measured, an error result
    for each M it did not (out of memory, unsupported, timed out), with its error."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, __file__, "--child", mode, "--child-out", str(result_path),
           "--micro-batches", ",".join(map(str, ms))] + args.passthrough
    t0 = time.perf_counter()
    log(f"[{Path(args.config).stem}] {mode} M={','.join(map(str, ms))} ...")
    # Its own process group: a timeout ends the child and whatever it started (compilers, I/O helpers).
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = p.communicate(timeout=args.mode_timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, stderr = p.communicate()
        rc = None
        stderr += f"\nTimeoutExpired: {mode} ran past --mode-timeout {args.mode_timeout} s"
    wall = time.perf_counter() - t0
    # What a killed child (timeout, out of host memory) left on the disk.
    for leftover in [*Path(args.nvme_dir).glob(f"{mode}-*"), *Path(args.work_dir).glob(f"peer-{mode}*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.log_dir) / f"{Path(args.config).stem}-{mode}-M{'_'.join(map(str, ms))}.err").write_text(stderr)
    results = [json.loads(line) for line in result_path.read_text().splitlines() if line.strip()]
    result_path.unlink(missing_ok=True)
    for r in results:
        r["wall_s"] = wall
    done = {r["micro_batches"] for r in results}
    for m in ms:
        if m not in done:
            err = _error_line(stderr) or f"exit status {rc}"
            log(f"[{Path(args.config).stem}] {mode} M={m}: {err}")
            results.append({"config": Path(args.config).stem, "mode": mode, "micro_batches": m, "error": err,
                            "returncode": rc, "stderr_tail": stderr[-3000:], "wall_s": wall})
    return results


def table(results: list[dict]) -> str:
    """Columns: each mode at each M; rows: the figures, then gmtier's tokens/s over each peer's at
    the same M."""
    cols = sorted(results, key=lambda r: (r["micro_batches"], MODES.index(r["mode"]) if r["mode"] in MODES else 9))
    def f(v, fmt):  # "GB": bytes shown in GB
        return "—" if v is None else f"{v / GB:.2f}" if fmt == "GB" else fmt.format(v)

    rows = [("tokens a step", "tokens_per_step", "{:,}"), ("step (s, median)", "step_s", "{:.3f}"),
            ("tokens/s", "tokens_per_s", "{:,.0f}"), ("peak GPU allocated (GB)", "max_gpu_allocated_bytes", "GB"),
            ("peak GPU reserved (GB)", "max_gpu_reserved_bytes", "GB"),
            ("peak RSS, VmHWM (GB)", "vm_hwm_bytes", "GB"), ("RSS at a step's end, max (GB)", "rss_steps_bytes", "GB"),
            ("disk read a step (GB)", "disk_read_bytes_per_step", "GB"),
            ("disk written a step (GB)", "disk_write_bytes_per_step", "GB"),
            ("  read, B a parameter", "_read_bpp", "{:.1f}"), ("  written, B a parameter", "_write_bpp", "{:.1f}"),
            ("experts with tokens a step / all", "_experts", "{}"), ("setup (s)", "setup_s", "{:.1f}")]
    cells = []
    for r in cols:
        r = dict(r)
        if r.get("params") and "disk_read_bytes_per_step" in r:
            r["_read_bpp"] = r["disk_read_bytes_per_step"] / r["params"]
            r["_write_bpp"] = r["disk_write_bytes_per_step"] / r["params"]
        if r.get("experts_with_tokens_per_step") is not None:
            r["_experts"] = f"{r['experts_with_tokens_per_step']:.1f}/{r['n_experts']}"
        cells.append(r)
    head = [f"{r['mode']} M={r['micro_batches']}" for r in cells]
    width = max(len(x[0]) for x in rows + [("gmtier / resident tokens/s", "", "")])
    cw = max(16, *(len(h) for h in head))
    lines = [f"{'':{width}}  " + "  ".join(f"{h:>{cw}}" for h in head)]
    for label, key, fmt in rows:
        lines.append(f"{label:{width}}  " + "  ".join(
            f"{('error' if 'error' in r else f(r.get(key), fmt)):>{cw}}" for r in cells))
    by = {(r["mode"], r["micro_batches"]): r for r in results if "error" not in r}
    for m in sorted({r["micro_batches"] for r in results}):
        g = by.get(("gmtier", m))
        for peer in ("resident",) + DS_MODES:
            p = by.get((peer, m))
            if g and p:
                lines.append(f"gmtier / {peer} tokens/s at M={m}: {g['tokens_per_s'] / p['tokens_per_s']:.2f}")
    best = max((r for r in results if r["mode"] == "gmtier" and "error" not in r), key=lambda r: r["tokens_per_s"],
               default=None)
    if best:
        for peer in DS_MODES:
            for (mode, m), p in sorted(by.items()):
                if mode == peer and m != best["micro_batches"]:
                    lines.append(f"gmtier M={best['micro_batches']} / {peer} M={m} tokens/s: "
                                 f"{best['tokens_per_s'] / p['tokens_per_s']:.2f}")
    for r in results:
        if "error" in r:
            lines.append(f"{r['mode']} M={r['micro_batches']}: {r['error']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a gmtier config (configs/small.toml)")
    p.add_argument("--data", default="", help="the prepared data (data.dir), e.g. .carry/data/ruslit")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="a gmtier config override (repeat)")
    p.add_argument("--modes", default="zero2-offload,zero3-nvme,gmtier", help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--micro-batches", default="", metavar="M[,M...]",
                   help="micro-batches a step for every mode (default: the config's train.micro_batches)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--large-m-steps", type=int, default=0, help="timed steps at M > 1 (default: --steps)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (DeepSpeed: at the first M)")
    p.add_argument("--work-dir", default="/tmp/gmtier-peer/work", help="gmtier's run directories and stores")
    p.add_argument("--nvme-dir", default="/tmp/gmtier-peer/nvme", help="ZeRO-Infinity's swap files (an NVMe disk)")
    p.add_argument("--ds-set", action="append", metavar="KEY.PATH=JSON",
                   help="DeepSpeed config override for the DeepSpeed modes (repeat), e.g. aio.queue_depth=16")
    p.add_argument("--ds-gemm", default="loop", choices=("loop", "grouped", "auto"),
                   help="experts.gemm of the DeepSpeed modes' model (default loop: one GEMM pair an expert, as "
                        "DeepSpeed's own MoE layer runs its experts; ZeRO-2 failed on the grouped path's gradients, "
                        "docs/performance.md)")
    p.add_argument("--mode-timeout", type=float, default=600, help="seconds a mode's process may take")
    p.add_argument("--json-out", default="", help="append one JSON line a result here")
    p.add_argument("--log-dir", default="", help="write each mode's stderr here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.large_m_steps < 0:
        p.error("--steps must be >= 1, --warmup and --large-m-steps >= 0")
    # What a child needs again (everything but the modes, the micro-batches and the outputs).
    args.passthrough = ["--config", args.config, "--data", args.data, "--steps", str(args.steps),
                        "--large-m-steps", str(args.large_m_steps), "--warmup", str(args.warmup),
                        "--work-dir", args.work_dir, "--nvme-dir", args.nvme_dir, "--ds-gemm", args.ds_gemm]
    args.passthrough += [x for s in (args.set or []) for x in ("--set", s)]
    args.passthrough += [x for s in (args.ds_set or []) for x in ("--ds-set", s)]
    return p, args


def main(argv=None) -> list[dict]:
    p, args = parse_args(argv)
    if args.child:
        try:
            child(args)
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
        return []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes {args.modes!r}: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(MODES)}")
    if not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file")
    from gmtier import config as config_mod

    try:  # a bad --set is said here, once, rather than by every child
        default_m = config_mod.load(args.config, overrides(args)).train.micro_batches
    except config_mod.ConfigError as e:
        p.error(str(e))
    ms = parse_ms(args.micro_batches) if args.micro_batches else [default_m]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for mode in modes:
        if mode in DS_MODES:  # one process for all M
            new = run_child(args, mode, ms, log)
        else:  # one process for each M
            new = [r for m in ms for r in run_child(args, mode, [m], log)]
        results += new
        if args.json_out:  # written as they come: a later mode that hangs the call leaves these
            with open(args.json_out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
    print(table(results), flush=True)
    return results


if __name__ == "__main__":
    try:
        import gmtier  # noqa: F401  (the installed wheel, or PYTHONPATH)
    except ImportError:  # this checkout's package (its _core built in place)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
    main()
