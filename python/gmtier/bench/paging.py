"""`gmtier bench-paging`: each tier boundary of the expert store against the raw hardware.

In one run, on one file larger than the RAM budget:
1. raw: the disk's O_DIRECT read bandwidth over the same records (concurrent aligned preads);
2. store: NVMe -> RAM throughput of the store for a routing trace (uniform and Zipf expert
   choice; the next layer's experts are prefetched, as the router-based predictor does), with
   hit rate and the time callers stalled;
3. on a GPU: RAM -> GPU through the store's GPU tier vs a plain pinned torch copy of the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import click
import numpy as np

from gmtier import progress
from gmtier.store.metrics import hit_rate
from gmtier.user_errors import Command

MiB = 1 << 20


def _trace(kind: str, rng, n_experts: int, k: int, zipf_s: float):
    """k distinct experts of one layer for one step."""
    if kind == "uniform":
        return rng.choice(n_experts, size=k, replace=False)
    p = 1.0 / np.arange(1, n_experts + 1) ** zipf_s
    return rng.choice(n_experts, size=k, replace=False, p=p / p.sum())


def _synthetic_plan(kind: str, steps: int, layers: int, n_experts: int, k: int, zipf_s: float, seed: int):
    """steps x layers lists of (layer, expert) keys drawn from a uniform or Zipf expert choice."""
    rng = np.random.default_rng(seed)
    return [[[(layer, int(e)) for e in _trace(kind, rng, n_experts, k, zipf_s)] for layer in range(layers)]
            for _ in range(steps)]


def load_routing_trace(path) -> list[list[list[tuple[int, int]]]]:
    """A routing trace recorded by `gmtier train` (routing.jsonl: one line per step, the experts
    that got tokens in each Switch layer) as steps x layers lists of keys."""
    plan = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                layers = json.loads(line)["experts"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise click.BadParameter(f"{path}:{line_no}: not a routing-trace line ({e}); "
                                         "give the routing.jsonl of a training run", param_hint="--trace") from None
            plan.append([[(l, int(e)) for e in experts] for l, experts in enumerate(layers)])
    if not plan:
        raise click.BadParameter(f"{path}: empty routing trace", param_hint="--trace")
    return plan


def _run_trace(store, kind: str, plan, prefetch: bool):
    """Walk the trace layer by layer: prefetch layer l+1's experts, request layer l's, wait, release."""
    flat = [keys for step in plan for keys in step]
    m0 = store.metrics()
    t0 = time.perf_counter()
    for i, keys in enumerate(flat):
        if prefetch and i + 1 < len(flat):
            store.prefetch(flat[i + 1], 1)
        slots = store.request(keys).wait()
        assert len(slots) == len(keys)
        store.release(keys)
    dt = time.perf_counter() - t0
    m1 = store.metrics()
    d = {key: m1[key] - m0[key] for key in ("hits", "misses", "prefetch_hits", "bytes_read", "stall_s", "reads")}
    n = d["hits"] + d["misses"]
    return {
        "trace": kind,
        "seconds": dt,
        "bytes_read": d["bytes_read"],
        "gbps": d["bytes_read"] / dt / 1e9,
        "hit_rate": hit_rate(d["hits"], d["misses"]),
        "prefetch_hits": d["prefetch_hits"],
        "stall_s": d["stall_s"],
        "requests": n,
        "queue_depth_max": m1["queue_depth_max"],
    }


def _h2d(store_path, ram_bytes, record_bytes, weights_bytes, n_experts, gpu_mb, rounds, io_threads, queue_depth):
    """RAM -> GPU: plain pinned torch copies vs the store's GPU tier, same bytes, same piece size."""
    import torch

    from gmtier.store import TieredExpertStore

    dev = torch.device("cuda")
    ram_slots = ram_bytes // record_bytes
    resident = min(ram_slots, n_experts)  # experts kept in RAM so that only H2D is measured
    gpu_slots = max(1, min(int(gpu_mb * MiB) // weights_bytes, resident // 2))
    copies = rounds * resident
    # Raw: pinned source pieces -> a device arena of gpu_slots pieces, one stream.
    src = torch.empty(resident * weights_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(gpu_slots * weights_bytes, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(dev)
    for warm in (True, False):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for i in range(resident if warm else copies):
                r, g = i % resident, i % gpu_slots
                dst[g * weights_bytes:(g + 1) * weights_bytes].copy_(
                    src[r * weights_bytes:(r + 1) * weights_bytes], non_blocking=True)
        torch.cuda.synchronize()
        raw_s = time.perf_counter() - t0
    del src, dst
    raw_gbps = copies * weights_bytes / raw_s / 1e9
    # Store: the same copies through acquire/release of the GPU tier (RAM hits after a warm-up).
    s = TieredExpertStore.open(store_path, ram_bytes=ram_bytes, gpu_bytes=gpu_slots * weights_bytes, device=dev,
                               io_threads=io_threads, queue_depth=queue_depth)
    keys = [(0, e) for e in range(resident)] if resident <= n_experts else []
    for k in keys:  # bring them into RAM
        s.acquire(k)
        s.release([k])
    torch.cuda.synchronize()
    m0 = s.gpu.metrics()
    t0 = time.perf_counter()
    for i in range(copies):
        k = keys[i % resident]
        s.acquire(k)
        s.release([k])
    torch.cuda.synchronize()
    store_s = time.perf_counter() - t0
    m1 = s.gpu.metrics()
    moved = m1["h2d_bytes"] - m0["h2d_bytes"]
    s.close()
    store_gbps = moved / store_s / 1e9
    return {
        "h2d_raw_gbps": raw_gbps,
        "h2d_store_gbps": store_gbps,
        "h2d_efficiency": store_gbps / raw_gbps,
        "h2d_copies": copies,
        "h2d_piece_mb": weights_bytes / MiB,
        "h2d_overhead_us_per_expert": max(0.0, (store_s - raw_s) / copies * 1e6),
        "gpu_slots": gpu_slots,
        "gpu_hit_rate": m1["hit_rate"],
    }


@click.command("bench-paging", cls=Command)
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="gmtier-bench-paging",
              show_default=True, help="Where the expert file goes (put it on the disk you want to measure).")
@click.option("--data-mb", type=int, default=1024, show_default=True,
              help="Committed expert records (the file holds 2 slots per expert, so it is about twice this).")
@click.option("--ram-mb", type=int, default=256, show_default=True, help="RAM budget of the store.")
@click.option("--gpu-mb", type=int, default=1024, show_default=True, help="GPU budget (GPU runs only).")
@click.option("--record-mb", type=float, default=16, show_default=True, help="Bytes per expert record.")
@click.option("--weights-frac", type=float, default=0.25, show_default=True,
              help="Fraction of a record that is the weights section (what goes to the GPU).")
@click.option("--layers", type=int, default=4, show_default=True)
@click.option("--experts-per-step", type=int, default=0,
              help="Experts requested per layer per step (default: a quarter of the RAM slots).")
@click.option("--steps", type=int, default=0, help="Steps per trace (default: read about the file once).")
@click.option("--zipf", "zipf_s", type=float, default=1.2, show_default=True, help="Zipf exponent of the skewed trace.")
@click.option("--io-threads", type=int, default=8, show_default=True)
@click.option("--queue-depth", type=int, default=32, show_default=True)
@click.option("--chunk-mb", type=float, default=4, show_default=True, help="Bytes per pread.")
@click.option("--repeats", type=int, default=3, show_default=True,
              help="Alternate raw and store measurements this many times; medians are reported.")
@click.option("--no-prefetch", is_flag=True, help="Do not prefetch the next layer's experts.")
@click.option("--keep", is_flag=True, help="Keep the expert file (reused by later runs with the same sizes).")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Also replay a routing trace recorded by training (<run_dir>/routing.jsonl); "
                   "its layer and expert counts set --layers and the experts per layer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def bench_paging(directory, data_mb, ram_mb, gpu_mb, record_mb, weights_frac, layers, experts_per_step, steps,
                 zipf_s, io_threads, queue_depth, chunk_mb, repeats, no_prefetch, trace_path, keep, as_json):
    """Measure the store's NVMe->RAM and RAM->GPU paging against raw O_DIRECT reads and pinned copies."""
    import torch

    from gmtier import _core

    say = (lambda *a: None) if as_json else progress.echo
    rb = int(record_mb * MiB) // 4096 * 4096
    wb = max(4096, int(rb * weights_frac) // 4096 * 4096)
    recorded = load_routing_trace(trace_path) if trace_path else None
    if recorded is not None:
        layers = len(recorded[0])
    n_experts = max(2, int(data_mb * MiB) // (rb * layers))
    if recorded is not None:
        n_experts = max(n_experts, 1 + max(e for step in recorded for keys in step for _, e in keys))
    ram_bytes = int(ram_mb * MiB)
    ram_slots = ram_bytes // rb
    if ram_slots < 2:
        raise click.BadParameter(f"--ram-mb {ram_mb} holds {ram_slots} records of {rb / MiB:.1f} MiB; "
                                 "give at least two", param_hint="--ram-mb")
    data_bytes = n_experts * layers * rb
    if data_bytes <= ram_bytes:
        raise click.BadParameter("the records must be larger than the RAM budget (raise --data-mb)",
                                 param_hint="--data-mb")
    k = experts_per_step or max(1, min(n_experts, ram_slots // 4))
    if k > n_experts:
        raise click.BadParameter(f"{k} experts per step but only {n_experts} per layer", param_hint="--experts-per-step")
    steps = steps or max(2, int(np.ceil(2 * data_bytes / (k * layers * rb))))
    schema = [("w", "u8", [wb], "weights"), ("state", "u8", [rb - wb], "state")]
    path = Path(directory)
    geom = {"layers": layers, "experts": n_experts, "record_bytes": rb, "weights_bytes": wb}
    stamp = path / "bench-geometry.json"
    reuse = stamp.exists() and json.loads(stamp.read_text()) == geom
    t_create = None
    if not reuse:
        if path.exists():
            shutil.rmtree(path)
        rng = np.random.default_rng(0)
        block = rng.integers(0, 256, size=rb, dtype=np.uint8)  # real bytes: unwritten extents would read as free zeros

        def init(layer, expert):
            block[:16] = np.frombuffer(np.array([layer, expert], dtype=np.int64).tobytes(), dtype=np.uint8)
            return block

        say(f"creating {path}: {layers} layers x {n_experts} experts x {rb / MiB:.1f} MiB "
            f"({data_bytes / 1e9:.2f} GB of records, file {2 * data_bytes / 1e9:.2f} GB)")
        t0 = time.perf_counter()
        with progress.bar(total=layers * n_experts, desc="creating store", unit="expert") as bar:
            _core.ExpertStore.create(str(path), layers, n_experts, schema, init=progress.counted(init, bar))
        t_create = time.perf_counter() - t0
        stamp.write_text(json.dumps(geom))
    data_file = path / "experts.safetensors"
    probe = _core.ExpertStore.open(str(path), rb, io_threads=1, queue_depth=1)
    start = probe.data_start
    direct = probe.metrics()["direct"]
    probe.close()
    del probe
    if not direct:
        say("warning: the filesystem refused O_DIRECT; dropping the page cache before each measurement")
    chunk = int(chunk_mb * MiB)
    # The committed copy (slot 0) of every expert: the bytes the store reads.
    ranges = [(start + ((l * n_experts + e) * 2) * rb, rb) for l in range(layers) for e in range(n_experts)]
    # Raw and store runs alternate, `repeats` times, and medians are reported: a shared disk's
    # bandwidth drifts, and alternating exposes both to the same drift.
    raws, runs = [], {"uniform": [], "zipf": [], "recorded": []}
    phases = progress.bar(total=repeats * (3 if recorded is None else 4), desc="measuring", unit="phase")
    for rep in range(repeats):
        if not direct:
            _core.drop_cache(str(data_file))
        nbytes, secs, raw_direct = _core.raw_read(str(data_file), ranges, chunk_bytes=chunk, threads=io_threads)
        raws.append(nbytes / secs / 1e9)
        say(f"[{rep + 1}/{repeats}] raw O_DIRECT read: {nbytes / 1e9:.2f} GB in {secs:.2f}s = {raws[-1]:.3f} GB/s")
        phases.update(1)
        for kind, seed in (("uniform", 1), ("zipf", 2), ("recorded", 0)):
            if kind == "recorded":
                if recorded is None:
                    continue
                plan = recorded
            else:
                plan = _synthetic_plan(kind, steps, layers, n_experts, k, zipf_s, seed + 10 * rep)
            if not direct:
                _core.drop_cache(str(data_file))
            s = _core.ExpertStore.open(str(path), ram_bytes, io_threads=io_threads, queue_depth=queue_depth,
                                       chunk_bytes=chunk)
            r = _run_trace(s, kind, plan, prefetch=not no_prefetch)
            s.close()
            del s
            runs[kind].append(r)
            say(f"[{rep + 1}/{repeats}] store {kind}: {r['gbps']:.3f} GB/s, hit rate {r['hit_rate']:.2f}")
            phases.update(1)
    phases.close()
    raw_gbps = float(np.median(raws))

    def median_run(rs):
        return sorted(rs, key=lambda r: r["gbps"])[len(rs) // 2]

    rows = [median_run(runs[kind]) for kind in ("uniform", "zipf", "recorded") if runs[kind]]
    uni, zipf = rows[:2]
    out = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dir": str(path.resolve()),
        "direct": bool(direct and raw_direct),
        "file_bytes": os.path.getsize(data_file),
        "record_bytes": rb,
        "weights_bytes": wb,
        "ram_bytes": ram_bytes,
        "ram_slots": ram_slots,
        "layers": layers,
        "experts_per_layer": n_experts,
        "experts_per_step": k,
        "steps": steps,
        "io_threads": io_threads,
        "queue_depth": queue_depth,
        "chunk_bytes": chunk,
        "create_write_gbps": data_bytes / t_create / 1e9 if t_create else None,
        "raw_read_gbps": raw_gbps,
        "raw_read_gbps_runs": raws,
        "store_read_gbps_runs": [r["gbps"] for r in runs["uniform"]],
        "store_read_gbps": uni["gbps"],
        "read_efficiency": uni["gbps"] / raw_gbps,
        "zipf_store_read_gbps": zipf["gbps"],
        "hit_rate": zipf["hit_rate"],
        "uniform_hit_rate": uni["hit_rate"],
        "stall_s": uni["stall_s"] + zipf["stall_s"],
        "recorded_trace": trace_path,
        "recorded_store_read_gbps": rows[2]["gbps"] if recorded else None,
        "recorded_hit_rate": rows[2]["hit_rate"] if recorded else None,
        "traces": rows,
        "h2d_raw_gbps": None,
        "h2d_store_gbps": None,
        "h2d_efficiency": None,
    }
    if torch.cuda.is_available():
        out.update(_h2d(str(path), ram_bytes, rb, wb, n_experts, gpu_mb, rounds=4, io_threads=io_threads,
                        queue_depth=queue_depth))
    if not keep:
        shutil.rmtree(path, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"\nfile {out['file_bytes'] / 1e9:.2f} GB, records {rb / MiB:.1f} MiB (weights {wb / MiB:.1f} MiB), "
               f"RAM {ram_slots} slots, {k} experts/layer/step x {layers} layers x {steps} steps, "
               f"direct={out['direct']}, {out['device']}")
    click.echo(f"{'boundary':<28}{'GB/s':>9}{'vs raw':>9}{'hit rate':>10}{'stall s':>9}")
    click.echo(f"{'NVMe raw O_DIRECT read':<28}{raw_gbps:>9.3f}{'1.00':>9}{'':>10}{'':>9}")
    for r in rows:
        click.echo(f"{'NVMe->RAM store, ' + r['trace']:<28}{r['gbps']:>9.3f}{r['gbps'] / raw_gbps:>9.2f}"
                   f"{r['hit_rate']:>10.2f}{r['stall_s']:>9.2f}")
    if out["h2d_raw_gbps"] is not None:
        click.echo(f"{'RAM->GPU pinned torch copy':<28}{out['h2d_raw_gbps']:>9.2f}{'1.00':>9}")
        click.echo(f"{'RAM->GPU store GPU tier':<28}{out['h2d_store_gbps']:>9.2f}{out['h2d_efficiency']:>9.2f}"
                   f"  ({out['h2d_overhead_us_per_expert']:.0f} us/expert overhead)")
    else:
        click.echo("RAM->GPU: no CUDA device (h2d_* are null)")
