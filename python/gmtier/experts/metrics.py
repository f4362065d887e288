"""The expert runtime's figures: per step phase, per Switch layer, prediction scores, update
times and the tiers' traffic, reported (and reset) by `RuntimeStats.report`.

Counters of `stats`: adam_s is the time in each update (adam_d2h_wait_s of it waiting for dW,
adam_kernel_s in the AdamW); adam_backlog_s the time the step waited for updates to finish
(queue full, or at its end); expert_fwd_s/expert_bwd_s the host time in the Switch layers'
expert loops; ram_prefetch_demoted the wrong guesses demoted or cancelled in the RAM tier.

Phases of a step, for where the disk idles: "fwd" from begin_step to the first expert backward,
"bwd" from there to the end of the step's updates, "rest" until the next begin_step (the dense
optimizer, logging); wall time and disk bytes of each. They tile the time since training began,
so their bytes add up to the disk traffic.
"""

from __future__ import annotations

import contextlib
import time

from gmtier.store import TieredExpertStore
from gmtier.store.metrics import hit_rate

PHASES = ("fwd", "bwd", "rest")
_PHASE_STATS = tuple(f"{ph}_{k}" for ph in PHASES for k in ("phase_s", "read_bytes", "write_bytes"))
_LAYER_COUNTERS = ("tp", "fp", "fn", "ram_hits", "ram_misses", "gpu_hits", "gpu_misses", "host_wait_s")
_REPORTED = ("expert_updates", "skipped_updates", "adam_s", "adam_d2h_wait_s", "adam_kernel_s", "adam_backlog_s",
             "expert_fwd_s", "expert_bwd_s", "wait_s", "host_wait_s", "gpu_stall_s", "ram_prefetch_demoted")


class RuntimeStats:
    """Counters of the expert runtime since the last `report`."""

    def __init__(self, store: TieredExpertStore, switch_layers: list[int]):
        self.store, self.switch_layers = store, switch_layers
        self.stats = {"tp": 0, "fp": 0, "fn": 0, "expert_updates": 0, "skipped_updates": 0, "adam_s": 0.0,
                      "adam_d2h_wait_s": 0.0, "adam_kernel_s": 0.0, "adam_backlog_s": 0.0, "wait_s": 0.0,
                      "expert_fwd_s": 0.0, "expert_bwd_s": 0.0, "ram_prefetch_demoted": 0,
                      **dict.fromkeys(_PHASE_STATS, 0.0)}
        self.layer_stats = [dict.fromkeys(_LAYER_COUNTERS, 0) for _ in switch_layers]
        self.phase_start: tuple | None = None  # (name, time, bytes read, bytes written) at its start
        self.active_layer: int | None = None  # the Switch layer whose expert loop runs now
        self._base = store.tier_metrics()

    # ---- phases -----------------------------------------------------------------------------
    @property
    def phase(self) -> str | None:
        return self.phase_start[0] if self.phase_start is not None else None

    def enter_phase(self, name: str, disk: tuple[int, int] | None = None) -> None:
        """Close the current phase (its wall time and disk bytes into `stats`), open `name`.
        `disk`: (bytes read, bytes written) now, where the caller has them."""
        if disk is None:
            m = self.store.ram_metrics()
            disk = (m["bytes_read"], m["bytes_written"])
        now = (name, time.perf_counter(), *disk)
        if self.phase_start is not None:
            prev, t, r, w = self.phase_start
            self.stats[f"{prev}_phase_s"] += now[1] - t
            self.stats[f"{prev}_read_bytes"] += now[2] - r
            self.stats[f"{prev}_write_bytes"] += now[3] - w
        self.phase_start = now

    # ---- counting -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def per_layer(self, layer: int):
        """Count the RAM and GPU tier hits and the host's wait for reads of one layer's expert
        loop into its `layer_stats`, and tag its GPU stalls with the layer."""
        def counters():
            m, g = self.store.ram_metrics(), self.store.gpu.m
            return m["hits"], m["misses"], g["hits"], g["misses"], self.store.host_wait_s

        before = counters()
        self.store.gpu.stall_tag = self.active_layer = layer
        try:
            yield
        finally:
            self.store.gpu.stall_tag = self.active_layer = None
            s = self.layer_stats[layer]
            names = ("ram_hits", "ram_misses", "gpu_hits", "gpu_misses", "host_wait_s")
            for name, a, b in zip(names, counters(), before):
                s[name] += a - b

    def score_prediction(self, layer: int, predicted: set[int], real: set[int]) -> None:
        for d in (self.layer_stats[layer], self.stats):
            d["tp"] += len(predicted & real)
            d["fp"] += len(predicted - real)
            d["fn"] += len(real - predicted)

    def add_update(self, times: dict, skipped: list[bool]) -> None:
        """One finished update job: its times and whether each expert's update was skipped."""
        for k, v in times.items():
            self.stats[k] += v
        self.stats["expert_updates"] += len(skipped)
        self.stats["skipped_updates"] += sum(skipped)

    # ---- the report -----------------------------------------------------------------------------
    def report(self) -> dict:
        """The figures since the last report (which they are reset from)."""
        out = {}
        tp, fp, fn = self.stats["tp"], self.stats["fp"], self.stats["fn"]
        if tp + fp + fn:
            out["prefetch_precision"] = tp / max(1, tp + fp)
            out["prefetch_recall"] = tp / max(1, tp + fn)
        # Time the step waited for experts: the host blocked on reads into RAM, plus the GPU's
        # compute stream stalled on H2D copies (timed on the GPU).
        host_wait, self.store.host_wait_s = self.store.host_wait_s, 0.0
        stalls = self.store.gpu.take_stalls()
        gpu_stall = sum(stalls.values())
        out["per_layer"] = [_layer_report(self.switch_layers[i], s, stalls.get(i, 0.0))
                            for i, s in enumerate(self.layer_stats)]
        self.stats.update(host_wait_s=host_wait, gpu_stall_s=gpu_stall, wait_s=host_wait + gpu_stall)
        out.update({k: self.stats[k] for k in _REPORTED})
        now = self.store.tier_metrics()
        if self.phase_start is not None:  # split the open phase where this window ends
            self.enter_phase(self.phase_start[0], (now["ram_bytes_read"], now["ram_bytes_written"]))
        out.update({k: self.stats[k] for k in _PHASE_STATS})
        out.update(self._tier_deltas(now))
        for k in self.stats:
            self.stats[k] = 0 if isinstance(self.stats[k], int) else 0.0
        for s in self.layer_stats:
            s.update(dict.fromkeys(_LAYER_COUNTERS, 0))
        return out

    def _tier_deltas(self, now: dict) -> dict:
        """RAM and GPU hit rates and traffic since the last call (`now`: store.tier_metrics())."""
        d = {k: now[k] - self._base[k] for k in now if isinstance(now[k], (int, float)) and not isinstance(now[k], bool)
             and isinstance(self._base.get(k), (int, float))}
        self._base = now
        out = {"ram_hit_rate": hit_rate(d["ram_hits"], d["ram_misses"], 0.0),
               "disk_read_bytes": d["ram_bytes_read"], "disk_write_bytes": d["ram_bytes_written"],
               "ram_stall_s": d["ram_stall_s"], "ram_evictions": d["ram_evictions"],
               "ram_prefetch_cancelled": d["ram_prefetch_cancelled"]}
        if self.store.gpu.active:
            out["gpu_hit_rate"] = hit_rate(d["gpu_hits"], d["gpu_misses"], 0.0)
            out["h2d_bytes"] = d["gpu_h2d_bytes"]
            # GPU prefetch: copies made early, how many were then used, evicted unused, demoted.
            out.update({k: d[k] for k in ("gpu_prefetch_copies", "gpu_prefetch_hits", "gpu_prefetch_wasted",
                                          "gpu_prefetch_demoted")})
            # Host blocked for a dW staging slot (its previous D2H copy) or a free pinned dW buffer.
            out["grad_wait_s"] = d["gpu_grad_wait_s"]
        return out


def _layer_report(block: int, s: dict, gpu_stall_s: float) -> dict:
    """One Switch layer's figures since the last report: prediction precision/recall (where
    predicted), RAM and GPU tier hit rates of its expert loops, and the time they waited."""
    out = {"block": block}
    if s["tp"] + s["fp"] + s["fn"]:
        out["precision"] = s["tp"] / max(1, s["tp"] + s["fp"])
        out["recall"] = s["tp"] / max(1, s["tp"] + s["fn"])
    out.update(ram_hit_rate=hit_rate(s["ram_hits"], s["ram_misses"]),
               gpu_hit_rate=hit_rate(s["gpu_hits"], s["gpu_misses"]),
               host_wait_s=s["host_wait_s"], gpu_stall_s=gpu_stall_s)
    return out
