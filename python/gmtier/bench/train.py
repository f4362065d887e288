"""`gmtier bench-train`: real training steps against their hardware lower bound, same run (the
ceilings themselves are measured by `gmtier.bench.ceilings`).

For each config it times tiered training steps and measures, on the same machine in the same
run, every rate the bound needs:

    bound = max(GPU compute time,              fwd+bwd of the same model with experts resident
                PCIe bytes / pinned H2D rate,  torch copy of pinned memory to the GPU
                disk bytes / O_DIRECT rates,   reads of the store's file, writes beside it,
                                               and both at once (a shared or full-duplex disk)
                Adam bytes / DRAM bandwidth)   multi-threaded copy over buffers >> caches

and reports step / bound, the share of transfer time hidden behind compute (1 - time the loop
waited for experts / transfer time), prefetch precision/recall, peak GPU memory and RSS, and,
where the whole model fits on the GPU, the same model fully resident for comparison, beside its
dense twin (`model.switch_every = 0`: equal FLOPs per token) and which path the expert GEMMs took.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import click
import torch

from gmtier import config as config_mod
from gmtier import progress
from gmtier.bench import counts as parse_counts
from gmtier.bench.ceilings import _sync, h2d_rate, rss_bytes
from gmtier.experts import PHASES
from gmtier.store.disk import GB, disk_mixed_rate, disk_read_rate, disk_time, disk_write_rate
from gmtier.store.tiered import DATA_FILE
from gmtier.user_errors import Command


def _adam_bytes_per_param(expert_dtype: str) -> int:
    """Bytes the fused AdamW moves per expert parameter: the gradient in; master, m and v in and
    out; the new half-precision weight out (fp32 experts: the weight is the master)."""
    half = expert_dtype in ("bf16", "fp16")
    return (2 if half else 4) + 3 * 4 * 2 + (2 if half else 0)


def _load(path: str, overrides, work_dir: Path, name: str, extra: list[str]):
    cfg = config_mod.load(path, list(overrides) + extra)
    cfg.train.run_dir = str(work_dir / name)
    cfg.experts.store_dir = ""
    cfg.train.eval_every = cfg.train.checkpoint_every = 0
    return cfg


class DiskTimeline:
    """Samples the store's disk counters in a thread every `period` seconds while the timed steps
    run, one JSON line each: seconds since the first timed step, step, phase ("fwd", "bwd",
    "rest"), the Switch layer whose expert loop runs (or null), and the bytes read and written
    so far. Shows where in a disk-bound step the disk idles."""

    def __init__(self, runtime, path: Path, config: str, period: float = 0.05):
        import threading

        self.runtime, self.path, self.config, self.period = runtime, Path(path), config, period
        self.step, self.t0 = -1, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gmtier-disk-timeline", daemon=True)
        self._rows: list[dict] = []

    def start(self, step: int) -> None:
        """Called before each timed step; the first call starts the sampling."""
        self.step = step
        if self.t0 is None:
            self.t0 = time.perf_counter()
            self._thread.start()

    def _sample(self) -> None:
        m = self.runtime.store.ram_metrics()
        self._rows.append({"config": self.config, "t": round(time.perf_counter() - self.t0, 4), "step": self.step,
                           "phase": self.runtime.phase, "layer": self.runtime.active_layer,
                           "read": m["bytes_read"], "written": m["bytes_written"]})

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.period):
            self._sample()

    def close(self) -> None:
        """Stop sampling (one last sample at the end of the timed steps) and write the rows."""
        self._stop.set()
        if self.t0 is not None:
            self._thread.join()
            self._sample()
        with self.path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in self._rows)


def disk_probes(cfg) -> dict:
    """The disk's read, write and read+write-at-once rates on the store's own file and directory,
    with as many requests in flight as the store's I/O pool keeps (experts.io_threads)."""
    store_file = cfg.store_dir() / DATA_FILE
    io = cfg.experts.io_threads
    read_gbps, direct = disk_read_rate(store_file, threads=io)
    write_gbps = disk_write_rate(store_file.parent, threads=io)
    mixed = disk_mixed_rate(store_file, store_file.parent, read_gbps, write_gbps, threads=io)
    return {"read_gbps": read_gbps, "direct": direct, "write_gbps": write_gbps, "mixed": mixed}


def mean_probes(sets: list[dict]) -> dict:
    """The mean of probe sets, rate by rate (O_DIRECT only if every set had it)."""
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"read_gbps": mean([p["read_gbps"] for p in sets]), "direct": all(p["direct"] for p in sets),
            "write_gbps": mean([p["write_gbps"] for p in sets]),
            "mixed": {k: mean([p["mixed"][k] for p in sets]) for k in sets[0]["mixed"]}}


def _time_steps(trainer, warmup: int, steps: int, fwd_bwd_only: bool = False,
                sampler: DiskTimeline | None = None, desc: str = "steps") -> dict:
    """Median step time over `steps` after `warmup`, plus the expert traffic of the timed steps;
    `sampler` samples the disk counters of the timed steps."""
    cfg = trainer.cfg
    times, traffic, rss = [], {}, 0
    if trainer.runtime is not None:
        trainer.runtime.metrics()  # reset the counters
    stash = trainer.layer_major.stash if trainer.layer_major is not None else None
    t = cfg.train
    for i in progress.bar(range(warmup + steps), desc=desc, unit="step"):  # drawn between the timed steps
        x, y = trainer.train_data.batch(t.micro_batches * t.batch_size, cfg.model.seq_len, trainer.rng)
        _sync()
        if sampler is not None and i >= warmup:
            sampler.start(i - warmup)
        t0 = time.perf_counter()
        if fwd_bwd_only:
            x, y = x.to(trainer.device), y.to(trainer.device)
            if trainer.layer_major is not None:
                trainer.layer_major.run(list(x.split(t.batch_size)), list(y.split(t.batch_size)))
            else:
                with trainer.autocast():
                    _, loss, aux = trainer.model(x, y)
                (loss + aux).backward()
            trainer.model.zero_grad(set_to_none=True)
        else:
            trainer.train_step(x, y)
        _sync()
        dt = time.perf_counter() - t0
        rss = max(rss, rss_bytes())
        if i == warmup - 1:
            for counters in (trainer.runtime, stash):
                if counters is not None:
                    counters.metrics()  # reset
        if i >= warmup:
            times.append(dt)
    if sampler is not None:
        sampler.close()
    if trainer.runtime is not None:
        m = trainer.runtime.metrics()
        traffic = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        traffic["per_layer"] = m.get("per_layer")
    if stash is not None:
        traffic.update(stash.metrics())
    # statistics.median: an even count averages the middle two (the upper one alone would be
    # the slower of two timed steps)
    return {"step_s": statistics.median(times), "step_s_all": times, "rss_bytes": rss, **traffic}


def _resident_fits(cfg) -> bool:
    """Whether the whole model with fp32 weights, grads and AdamW moments fits half the GPU."""
    if not torch.cuda.is_available():
        return True
    m = cfg.model
    expert_params = len(m.switch_layers()) * m.n_experts * 2 * m.d_model * m.d_ff
    dense_params = m.n_layer * 12 * m.d_model**2 + 2 * m.vocab_size * m.d_model
    return (expert_params + dense_params) * 16 < 0.5 * torch.cuda.get_device_properties(0).total_memory


def _gemm_note(gemm: str | None) -> str | None:
    """How the expert GEMMs ran ("grouped" / "loop"), with why where grouped ones fell back."""
    from gmtier.experts.bank import GEMM_FALLBACKS

    return gemm if gemm != "loop" or not GEMM_FALLBACKS else f"loop ({'; '.join(GEMM_FALLBACKS.values())})"


def _graphs_note(switch) -> str | None:
    """How the resident Switch layers launched their kernels: replayed CUDA graphs or eagerly."""
    from gmtier.experts.graphed import CAPTURE_FAILURES

    graphs = switch[0].graphs if switch else None
    if graphs is not None and graphs.replays:
        return f"CUDA graphs ({graphs.captures} capture, {graphs.replays} layer replays)"
    return f"eager ({'; '.join(CAPTURE_FAILURES.values())})" if CAPTURE_FAILURES else "eager"


def bench_config(path: str, overrides, work_dir: Path, warmup: int, steps: int, resident: bool, prefetch_off: bool,
                 log, timeline: Path | None = None, dense_twin: bool = True) -> dict:
    from gmtier.adam import memory_bandwidth
    from gmtier.train import Trainer

    name = Path(path).stem
    micro_batches = config_mod.load(path, list(overrides)).train.micro_batches
    if micro_batches > 1:
        name = f"{name} M={micro_batches}"
    quiet = lambda s: None  # noqa: E731
    out: dict = {"config": name, "overrides": list(overrides)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out["device"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"

    def run_tiered(prefetch: bool, timeline: Path | None = None, probe_first: bool = False) -> tuple[dict, object]:
        cfg = _load(path, overrides, work_dir, f"{name}-tiered", [f"experts.prefetch={str(prefetch).lower()}"])
        if device == "cuda":
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
        gc.collect()
        rss_before = rss_bytes()  # interpreter, torch, CUDA context: before the trainer exists
        tr = Trainer(cfg, fresh=True, log=quiet)
        try:
            # The disk's rates drift within a run on some virtual disks: probe them before the
            # timed steps as well as after, and bound the steps by the mean.
            before = disk_probes(tr.cfg) if probe_first and tr.runtime else None
            sampler = DiskTimeline(tr.runtime, timeline, name) if timeline and tr.runtime else None
            res = _time_steps(tr, warmup, steps, sampler=sampler, desc="tiered steps")
            res["max_gpu_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
            res["dense_param_bytes"] = sum(p.numel() * p.element_size() for p in tr.model.parameters())
            res["rss_before_bytes"] = rss_before
            res["host_grad_ring_bytes"] = tr.runtime.store.gpu.host_grad_bytes if tr.runtime else 0
            res["read_write"] = tr.runtime.read_write if tr.runtime else None
            res["disk_probes_before"] = before
            return res, tr
        except BaseException:
            tr.close()
            raise

    log(f"[{name}] disk probes, tiered training with prefetch on, disk probes again ...")
    tiered, trainer = run_tiered(True, timeline, probe_first=True)
    cfg = trainer.cfg
    tiered_gemm = trainer.runtime.gemm if trainer.runtime is not None else None
    tokens = cfg.train.micro_batches * cfg.train.batch_size * cfg.model.seq_len
    weights_bytes, record_bytes = cfg.expert_bytes()
    try:
        log(f"[{name}] hardware ceilings ...")
        probes = {"before": tiered["disk_probes_before"], "after": disk_probes(cfg)}
        disk = mean_probes([p for p in probes.values() if p])
        disk_gbps, direct, disk_write_gbps = disk["read_gbps"], disk["direct"], disk["write_gbps"]
        mixed = disk["mixed"]
        h2d_gbps = h2d_rate()
        dram_gbps = memory_bandwidth(1 << 30, threads=os.cpu_count())["copy_gbps"]
    finally:
        trainer.close()
        del trainer
        gc.collect()

    expert_params = 2 * cfg.model.d_model * cfg.model.d_ff
    adam_bytes = tiered.get("expert_updates", 0) / steps * expert_params * _adam_bytes_per_param(cfg.expert_dtype())
    # Saved activations share the disk with the store, and the PCIe link with the experts (what
    # goes to RAM in forward comes back in backward).
    act_write, act_read = tiered.get("act_disk_write_bytes", 0) / steps, tiered.get("act_disk_read_bytes", 0) / steps
    act_pcie = (2 * tiered.get("act_ram_bytes", 0) / steps + act_write + act_read) if device == "cuda" else 0
    read_bytes, write_bytes = tiered.get("disk_read_bytes", 0) / steps, tiered.get("disk_write_bytes", 0) / steps
    pcie_bytes = tiered.get("h2d_bytes", 0) / steps + act_pcie + (
        tiered.get("expert_updates", 0) / steps * weights_bytes if device == "cuda" else 0)  # + dW to host

    log(f"[{name}] GPU compute time: fwd+bwd with experts resident ...")
    m = cfg.model
    fit_experts = m.n_experts
    extra = ["experts.mode='resident'", "train.gpu_memory_limit=''"]  # the compute, without the run's cap
    if not _resident_fits(cfg):
        # Top-1 routing: FLOPs per token do not depend on the expert count, so fewer experts time
        # the same compute (capacity-factor drops aside).
        while fit_experts > 1 and not _resident_fits(_load(path, overrides, work_dir, "probe", extra + [f"model.n_experts={fit_experts}"])):
            fit_experts //= 2
        extra.append(f"model.n_experts={fit_experts}")
    rcfg = _load(path, overrides, work_dir, f"{name}-resident", extra)
    rtr = Trainer(rcfg, fresh=True, log=quiet)
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        compute = _time_steps(rtr, warmup, steps, fwd_bwd_only=True, desc="resident fwd+bwd")
        # The dense part's peak (weights, grads, AdamW moments, activations): the peak of whole
        # resident training steps less its experts' fp32 weights, grads and moments (16 B/param).
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        full_resident = _time_steps(rtr, 1, steps if (resident and fit_experts == m.n_experts) else 1,
                                    desc="resident steps")
        if not (resident and fit_experts == m.n_experts):
            full_resident = None
        resident_expert_bytes = len(m.switch_layers()) * fit_experts * 2 * m.d_model * m.d_ff * 16
        dense_peak = torch.cuda.max_memory_allocated() - resident_expert_bytes if device == "cuda" else None
        switch = rtr.model.switch_blocks()
        resident_gemm = switch[0].experts.gemm_used if switch else None
        resident_graphs = _graphs_note(switch)
    finally:
        rtr.close()
        del rtr
        gc.collect()

    twin = None
    if dense_twin and m.switch_layers():
        # The dense twin: the same model with one FFN of the same d_ff per block (equal FLOPs per
        # token), whole training steps as the resident ones: what a Switch layer costs beyond its FLOPs.
        log(f"[{name}] dense twin (model.switch_every=0) training steps ...")
        ttr = Trainer(_load(path, overrides, work_dir, f"{name}-dense", extra + ["model.switch_every=0"]), fresh=True,
                      log=quiet)
        try:
            twin = _time_steps(ttr, warmup, steps, desc="dense twin steps")
        finally:
            ttr.close()
            del ttr
            gc.collect()

    prefetch_off_res = again = None
    if prefetch_off:
        log(f"[{name}] tiered training, prefetch off ...")
        prefetch_off_res, tr = run_tiered(False)
        tr.close()
    if full_resident is not None and tiered["step_s"] < 2.0:
        # The first run in a process pays one-time costs (kernel and GEMM-heuristic caches for
        # the per-expert shapes, pinned host pools) that the resident run after it does not:
        # time tiered again, in the same warm state as the resident run.
        log(f"[{name}] tiered training again, prefetch on ...")
        again, tr = run_tiered(True)
        tr.close()

    comp_s = compute["step_s"]
    parts = {"gpu_compute_s": comp_s,
             "pcie_s": pcie_bytes / (h2d_gbps * GB) if h2d_gbps else 0.0,
             "disk_s": disk_time(read_bytes + act_read, write_bytes + act_write, disk_gbps, disk_write_gbps,
                                 mixed["total_gbps"]),
             "adam_s": adam_bytes / (dram_gbps * GB)}
    bound = max(parts.values())
    transfer_s = max(parts["pcie_s"], parts["disk_s"])
    waited = tiered.get("wait_s", 0.0) / steps
    step_s = tiered["step_s"]
    ram_budget = config_mod.parse_bytes(cfg.experts.ram_budget, "experts.ram_budget")
    gpu_budget = config_mod.parse_bytes(cfg.experts.gpu_budget, "experts.gpu_budget")
    out.update({
        "micro_batches": cfg.train.micro_batches,
        **{k: tiered.get(k, 0) / (1 if "peak" in k or "allocated" in k else steps) for k in (
            "act_gpu_peak_bytes", "act_ram_peak_bytes", "act_ram_allocated_bytes", "act_ram_bytes",
            "act_disk_write_bytes", "act_disk_read_bytes", "act_disk_wait_s")},
        "timed_steps": steps, "tokens_per_step": tokens, "step_s": step_s, "step_s_all": tiered["step_s_all"],
        "tokens_per_s": tokens / step_s,
        "bound_s": bound, "bound_term": max(parts, key=parts.get), "step_over_bound": step_s / bound, **parts,
        "h2d_gbps": h2d_gbps, "disk_read_gbps": disk_gbps, "disk_write_gbps": disk_write_gbps, "disk_direct": direct,
        "disk_mixed_total_gbps": mixed["total_gbps"], "disk_mixed_read_gbps": mixed["read_gbps"],
        "disk_mixed_write_gbps": mixed["write_gbps"],
        # Each probe set alone (before and after the timed steps); the rates above are their mean.
        **{f"disk_{k}_gbps_{when}": p["mixed"]["total_gbps"] if k == "mixed_total" else p[f"{k}_gbps"]
           for when, p in probes.items() if p for k in ("read", "write", "mixed_total")},
        "dram_copy_gbps": dram_gbps, "disk_read_bytes_per_step": read_bytes, "disk_write_bytes_per_step": write_bytes,
        "disk_serial_s": read_bytes / (disk_gbps * GB) + write_bytes / (disk_write_gbps * GB), "pcie_bytes_per_step": pcie_bytes, "adam_bytes_per_step": adam_bytes,
        "expert_updates_per_step": tiered.get("expert_updates", 0) / steps,
        # The store's disk traffic of a step over the parameters of the experts it updated (what
        # `gmtier info` gives per paged expert from the record's layout, here as measured:
        # records still in RAM from the step before are not read again).
        "disk_bytes_per_updated_param": ((read_bytes + write_bytes) / (tiered["expert_updates"] / steps * expert_params)
                                         if tiered.get("expert_updates") else None),
        "wait_for_experts_s": waited,
        "host_wait_s": tiered.get("host_wait_s", 0.0) / steps, "gpu_stall_s": tiered.get("gpu_stall_s", 0.0) / steps,
        **{k: tiered.get(k, 0.0) / steps for k in ("expert_fwd_s", "expert_bwd_s", "adam_backlog_s", "adam_kernel_s",
                                                   "adam_d2h_wait_s", "grad_wait_s")},
        "transfer_hidden": None if transfer_s == 0 else max(0.0, 1 - waited / transfer_s),
        "prefetch_precision": tiered.get("prefetch_precision"), "prefetch_recall": tiered.get("prefetch_recall"),
        "per_layer": tiered.get("per_layer"),
        "prefetch_off_per_layer": prefetch_off_res.get("per_layer") if prefetch_off_res else None,
        "ram_hit_rate": tiered.get("ram_hit_rate"), "gpu_hit_rate": tiered.get("gpu_hit_rate"),
        # GPU-tier prefetch: copies started early per step, the share of them used, wrong guesses
        # demoted; RAM reads of wrong guesses cancelled before they started.
        **{f"{k}_per_step": tiered[k] / steps if k in tiered else None
           for k in ("gpu_prefetch_copies", "gpu_prefetch_demoted", "ram_prefetch_cancelled")},
        "gpu_prefetch_used": (tiered["gpu_prefetch_hits"] / tiered["gpu_prefetch_copies"]
                              if tiered.get("gpu_prefetch_copies") else None),
        "compute_measured_with_experts": fit_experts,
        "max_gpu_bytes": tiered["max_gpu_bytes"], "gpu_budget": gpu_budget if device == "cuda" else None,
        "dense_peak_bytes": dense_peak, "gpu_limit_bytes": gpu_budget + dense_peak if dense_peak else None,
        "dense_param_bytes": tiered["dense_param_bytes"],
        # Host memory: the peak RSS over the timed steps against the RAM budget plus what the
        # process held before the trainer existed (interpreter, torch, CUDA context).
        "rss_bytes": tiered["rss_bytes"], "ram_budget": ram_budget, "rss_before_trainer_bytes": tiered["rss_before_bytes"],
        "rss_over_budget_and_runtime_bytes": tiered["rss_bytes"] - ram_budget - tiered["rss_before_bytes"],
        "host_grad_ring_bytes": tiered["host_grad_ring_bytes"],  # pinned dW buffers, part of that
        "read_write": tiered["read_write"],  # experts.read_write as resolved ("auto": the store's probe)
        "resident_step_s": full_resident["step_s"] if full_resident else None,
        "tiered_again_step_s": again["step_s"] if again else None,
        "tiered_vs_resident": (full_resident["step_s"] / again["step_s"]) if again else None,
        "tiered_vs_resident_first_run": (full_resident["step_s"] / step_s) if full_resident else None,
        "disk_achieved_gbps": (read_bytes + write_bytes) / step_s / GB,
        # Per phase of the step (forward up to the first expert backward; backward to the end
        # of the updates; the rest, to the next step): its time, and the rate the disk moved
        # reads + writes in it.
        **{f"{ph}_phase_s": tiered.get(f"{ph}_phase_s", 0.0) / steps for ph in PHASES},
        **{f"{ph}_disk_gbps": ((tiered.get(f"{ph}_read_bytes", 0) + tiered.get(f"{ph}_write_bytes", 0))
                               / tiered[f"{ph}_phase_s"] / GB if tiered.get(f"{ph}_phase_s") else None)
           for ph in PHASES},
        **{f"{ph}_{k}_per_step": tiered.get(f"{ph}_{k}", 0) / steps for ph in PHASES
           for k in ("read_bytes", "write_bytes")},
        "prefetch_off_step_s": prefetch_off_res["step_s"] if prefetch_off_res else None,
        "prefetch_off_wait_s": prefetch_off_res.get("wait_s", 0.0) / steps if prefetch_off_res else None,
        "prefetch_off_gpu_stall_s": prefetch_off_res.get("gpu_stall_s", 0.0) / steps if prefetch_off_res else None,
        "prefetch_off_gpu_hit_rate": prefetch_off_res.get("gpu_hit_rate") if prefetch_off_res else None,
        "expert_gemm_resident": _gemm_note(resident_gemm), "expert_gemm_tiered": _gemm_note(tiered_gemm),
        "resident_switch_launches": resident_graphs,
        "dense_twin_step_s": twin["step_s"] if twin else None,
        "resident_over_dense_twin": (full_resident["step_s"] / twin["step_s"]) if twin and full_resident else None,
        "tiered_over_dense_twin": ((again or tiered)["step_s"] / twin["step_s"]) if twin else None,
    })
    return out


def _table(results: list[dict]) -> str:
    rows = [
        ("device", "device", "{}"), ("micro-batches a step", "micro_batches", "{}"),
        ("tokens a step", "tokens_per_step", "{:,}"), ("tokens/s", "tokens_per_s", "{:,.0f}"), ("step (s)", "step_s", "{:.3f}"),
        ("bound (s)", "bound_s", "{:.3f}"), ("bound term", "bound_term", "{}"), ("step / bound", "step_over_bound", "{:.2f}"),
        ("  GPU compute (s)", "gpu_compute_s", "{:.3f}"), ("  PCIe (s)", "pcie_s", "{:.3f}"), ("  disk (s)", "disk_s", "{:.3f}"),
        ("  Adam (s)", "adam_s", "{:.3f}"), ("H2D GB/s", "h2d_gbps", "{:.1f}"), ("disk read GB/s (mean of the probes before and after the steps)", "disk_read_gbps", "{:.2f}"),
        ("  before the timed steps", "disk_read_gbps_before", "{:.2f}"), ("  after them", "disk_read_gbps_after", "{:.2f}"),
        ("disk write GB/s (mean)", "disk_write_gbps", "{:.2f}"),
        ("  before the timed steps", "disk_write_gbps_before", "{:.2f}"), ("  after them", "disk_write_gbps_after", "{:.2f}"),
        ("disk read+write at once GB/s", "disk_mixed_total_gbps", "{:.2f}"),
        ("the store's reads and writes ran (experts.read_write)", "read_write", "{}"),
        ("disk bytes read/step", "disk_read_bytes_per_step", "{:.2e}"),
        ("disk bytes written/step", "disk_write_bytes_per_step", "{:.2e}"),
        ("  read+written per parameter of the updated experts (B)", "disk_bytes_per_updated_param", "{:.2f}"),
        ("activations: peak on the GPU", "act_gpu_peak_bytes", "{:.2e}"),
        ("  peak in pinned RAM", "act_ram_peak_bytes", "{:.2e}"), ("  pinned RAM allocated", "act_ram_allocated_bytes", "{:.2e}"), ("  to RAM and back/step", "act_ram_bytes", "{:.2e}"),
        ("  spilled to disk/step (in the disk bytes)", "act_disk_write_bytes", "{:.2e}"),
        ("  waited for the spill (s)", "act_disk_wait_s", "{:.3f}"),
        ("DRAM copy GB/s", "dram_copy_gbps", "{:.1f}"), ("waited for experts (s)", "wait_for_experts_s", "{:.3f}"),
        ("  host blocked on reads (s)", "host_wait_s", "{:.3f}"), ("  GPU stalled on copies (s)", "gpu_stall_s", "{:.3f}"),
        ("host time in expert loops fwd (s)", "expert_fwd_s", "{:.3f}"), ("  bwd (s)", "expert_bwd_s", "{:.3f}"),
        ("  waiting for AdamW backlog (s)", "adam_backlog_s", "{:.3f}"),
        ("  waiting for a dW staging slot or buffer (s)", "grad_wait_s", "{:.3f}"),
        ("AdamW kernel time, all updates (s)", "adam_kernel_s", "{:.3f}"),
        ("  updates waiting for dW D2H (s)", "adam_d2h_wait_s", "{:.3f}"),
        ("transfer hidden", "transfer_hidden", "{:.1%}"), ("prefetch precision", "prefetch_precision", "{:.2f}"),
        ("prefetch recall", "prefetch_recall", "{:.2f}"), ("RAM hit rate", "ram_hit_rate", "{:.2f}"),
        ("GPU hit rate", "gpu_hit_rate", "{:.2f}"),
        ("GPU prefetch copies/step", "gpu_prefetch_copies_per_step", "{:.1f}"), ("  of them used", "gpu_prefetch_used", "{:.2f}"),
        ("  wrong guesses demoted/step", "gpu_prefetch_demoted_per_step", "{:.1f}"),
        ("RAM prefetch reads cancelled/step", "ram_prefetch_cancelled_per_step", "{:.1f}"),
        ("peak GPU bytes", "max_gpu_bytes", "{:.2e}"), ("  budget + dense peak", "gpu_limit_bytes", "{:.2e}"), ("peak RSS in the steps", "rss_bytes", "{:.2e}"),
        ("  RAM budget", "ram_budget", "{:.2e}"), ("  RSS before the trainer", "rss_before_trainer_bytes", "{:.2e}"),
        ("  RSS beyond both", "rss_over_budget_and_runtime_bytes", "{:.2e}"),
        ("    of it the pinned dW ring (at most)", "host_grad_ring_bytes", "{:.2e}"),
        ("disk read+write in the step GB/s", "disk_achieved_gbps", "{:.2f}"),
        ("  forward phase (s), to the 1st expert backward", "fwd_phase_s", "{:.3f}"),
        ("    its disk read+write GB/s", "fwd_disk_gbps", "{:.2f}"),
        ("  backward phase (s), to the last update", "bwd_phase_s", "{:.3f}"),
        ("    its disk read+write GB/s", "bwd_disk_gbps", "{:.2f}"),
        ("  the rest (s): dense update, to the next step", "rest_phase_s", "{:.3f}"),
        ("    its disk read+write GB/s", "rest_disk_gbps", "{:.2f}"),
        ("resident step (s)", "resident_step_s", "{:.3f}"), ("tiered step, run again (s)", "tiered_again_step_s", "{:.3f}"),
        ("tiered / resident speed", "tiered_vs_resident", "{:.2f}"),
        ("  first tiered run / resident", "tiered_vs_resident_first_run", "{:.2f}"),
        ("dense twin step (s)", "dense_twin_step_s", "{:.3f}"),
        ("resident step / dense twin step", "resident_over_dense_twin", "{:.2f}"),
        ("tiered step / dense twin step", "tiered_over_dense_twin", "{:.2f}"),
        ("expert GEMMs: resident", "expert_gemm_resident", "{}"), ("  tiered", "expert_gemm_tiered", "{}"),
        ("resident Switch layers launched as", "resident_switch_launches", "{}"),
        ("prefetch off: step (s)", "prefetch_off_step_s", "{:.3f}"), ("prefetch off: waited (s)", "prefetch_off_wait_s", "{:.3f}"),
        ("  GPU stalled on copies (s)", "prefetch_off_gpu_stall_s", "{:.3f}"), ("  GPU hit rate", "prefetch_off_gpu_hit_rate", "{:.2f}"),
    ]
    # One row per Switch layer: prediction recall, RAM / GPU hit rates, time waited per step,
    # with prefetch on and then off (cells in copies of the results, which stay as the JSON
    # output has them).
    results = [dict(r) for r in results]
    f = lambda v, fmt: "—" if v is None else fmt.format(v)  # noqa: E731
    for key, label in (("per_layer", ""), ("prefetch_off_per_layer", ", prefetch off")):
        for i in range(max(len(r.get(key) or []) for r in results)):
            rows.append((f"  Switch layer {i}{label}: recall, RAM/GPU hit, waited (s)", f"_{key}{i}", "{}"))
            for r in results:
                layers = r.get(key) or []
                if i < len(layers):
                    L = layers[i]
                    wait = (L["host_wait_s"] + L["gpu_stall_s"]) / r.get("timed_steps", 1)
                    r[f"_{key}{i}"] = (f"{f(L.get('recall'), '{:.2f}')} {f(L['ram_hit_rate'], '{:.2f}')}/"
                                       f"{f(L['gpu_hit_rate'], '{:.2f}')} {wait:.3f}")
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{r['config']:>16}" for r in results)]
    for label, key, fmt in rows:
        cells = [("—" if r.get(key) is None else fmt.format(r[key])) for r in results]
        lines.append(f"{label:{width}}  " + "  ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


@click.command("bench-train", cls=Command)
@click.option("--config", "configs", multiple=True, default=["configs/small.toml"], show_default=True,
              help="a config to bench (repeat for several)")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override for every config")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--steps", type=int, default=5, show_default=True, help="timed steps (median reported)")
@click.option("--dir", "work_dir", type=click.Path(file_okay=False), default="gmtier-bench-train", show_default=True,
              help="where the benchmark's stores go (put it on the NVMe disk)")
@click.option("--resident/--no-resident", default=True, help="also time the model fully resident where it fits")
@click.option("--prefetch-off/--no-prefetch-off", default=True, help="also time tiered training with prefetch off")
@click.option("--dense-twin/--no-dense-twin", default=True,
              help="also time the dense twin (model.switch_every=0: equal FLOPs per token), resident")
@click.option("--micro-batches", "sweep", default="", metavar="M[,M...]",
              help="sweep the tokens a step: train.micro_batches for each run (e.g. 1,64); default: the config's")
@click.option("--keep", is_flag=True, help="keep the stores afterwards")
@click.option("--json", "as_json", is_flag=True, help="print one JSON list instead of a table")
@click.option("--timeline", type=click.Path(dir_okay=False), default=None,
              help="append the disk counters of the timed tiered steps, sampled every 50 ms, to this JSONL file")
def bench_train(configs, overrides, warmup, steps, work_dir, resident, prefetch_off, dense_twin, sweep, keep, as_json,
                timeline):
    """Time real training steps and compare them with their hardware lower bound."""
    work = Path(work_dir)
    log = (lambda s: progress.echo(s, err=True))
    counts = parse_counts(sweep, "--micro-batches", "1,16,64") if sweep else [None]
    runs = [(c, list(overrides) + ([f"train.micro_batches={m}"] if m else [])) for c in configs for m in counts]
    def bench_or_error(c, o):
        """One run; in a sweep, a run that cannot go (out of memory, a budget) is a result too."""
        try:
            return bench_config(c, o, work, warmup, steps, resident, prefetch_off, log, Path(timeline) if timeline else None,
                                dense_twin)
        except (config_mod.ConfigError, torch.cuda.OutOfMemoryError) as e:
            if len(runs) == 1:
                raise
            log(f"[{Path(c).stem}] {' '.join(o)}: {e}")
            return {"config": f"{Path(c).stem} {' '.join(o[len(overrides):])}", "error": str(e)}

    try:
        results = [bench_or_error(c, o) for c, o in runs]
    except config_mod.ConfigError as e:
        raise click.ClickException(str(e)) from None
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    click.echo(json.dumps(results, indent=1) if as_json else _table(results))
