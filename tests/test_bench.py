"""bench-train on CPU: one whole tiny run and its figures (the disk probes: test_disk.py)."""

import json
import os

import pytest
from click.testing import CliRunner

from gmtier.store import emulation as tiers
from gmtier.bench import train as bench
from gmtier.cli import main
from test_train import _write_toml, data_dir, tiny  # noqa: F401  (data_dir is a fixture)


def test_bench_train_tiny_on_cpu(data_dir, tmp_path, monkeypatch):
    # Small probes: the test checks how the figures are put together, not this disk.
    write_rate = bench.disk_write_rate
    monkeypatch.setattr(bench, "disk_write_rate", lambda d, threads=4: write_rate(d, nbytes=8 << 20, threads=threads))
    monkeypatch.setattr(bench, "disk_mixed_rate", lambda *a, **k: {"read_gbps": 1.0, "write_gbps": 1.0, "total_gbps": 1.5})
    toml = _write_toml(tmp_path / "tiny.toml", tiny(data_dir, tmp_path / "cfg"))
    timeline = tmp_path / "timeline.jsonl"
    r = CliRunner().invoke(main, ["bench-train", "--config", str(toml), "--steps", "1", "--warmup", "1",
                                  "--dir", str(tmp_path / "work"), "--json", "--timeline", str(timeline)])
    assert r.exit_code == 0, r.output
    (res,) = json.loads(r.stdout)
    # The disk counters of the timed step, sampled from its start to its end.
    samples = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert len(samples) >= 2 and {s["config"] for s in samples} == {"tiny"} and {s["step"] for s in samples} == {0}
    assert all(s["phase"] in ("fwd", "bwd", "rest") and s["layer"] in (None, 0, 1) for s in samples)
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    moved = [(b["read"] - a["read"], b["written"] - a["written"]) for a, b in zip(samples, samples[1:])]
    assert all(r >= 0 and w >= 0 for r, w in moved)
    assert sum(r for r, _ in moved) <= res["disk_read_bytes_per_step"]
    assert res["device"] == "cpu" and res["step_s"] > 0 and res["bound_s"] > 0
    assert res["bound_s"] == max(res[k] for k in ("gpu_compute_s", "pcie_s", "disk_s", "adam_s"))
    assert res["step_over_bound"] == pytest.approx(res["step_s"] / res["bound_s"])
    # The disk is probed before and after the timed steps; the bound takes the mean of each rate.
    for k in ("read", "write", "mixed_total"):
        before, after = res[f"disk_{k}_gbps_before"], res[f"disk_{k}_gbps_after"]
        assert before > 0 and after > 0
        assert res["disk_mixed_total_gbps" if k == "mixed_total" else f"disk_{k}_gbps"] == pytest.approx((before + after) / 2)
    assert res["expert_updates_per_step"] > 0 and res["disk_read_bytes_per_step"] > 0  # the tiny budget pages
    assert res["rss_bytes"] >= res["rss_before_trainer_bytes"] > 0
    assert res["tiered_vs_resident"] > 0 and res["resident_step_s"] > 0
    # The dense twin (model.switch_every=0), timed in the same run; the expert GEMMs' path.
    assert res["dense_twin_step_s"] > 0
    assert res["resident_over_dense_twin"] == pytest.approx(res["resident_step_s"] / res["dense_twin_step_s"])
    assert res["expert_gemm_resident"] == res["expert_gemm_tiered"] == "loop"  # CPU, experts.gemm = "auto"
    # The phases tile the timed steps, so they split the step's disk bytes exactly; backward
    # reads the state of the experts the tiny RAM budget could not keep.
    phases = ("fwd", "bwd", "rest")
    assert all(res[f"{ph}_phase_s"] > 0 for ph in phases)
    for what in ("read", "write"):
        assert sum(res[f"{ph}_{what}_bytes_per_step"] for ph in phases) == pytest.approx(res[f"disk_{what}_bytes_per_step"], rel=1e-12)
    assert res["bwd_read_bytes_per_step"] > 0 and res["bwd_disk_gbps"] > 0
    if not tiers.emulated():  # no GPU tier on CPU (GMTIER_EMULATE_GPU_TIER=1 runs one in host memory)
        assert res["gpu_prefetch_copies_per_step"] is None
    assert res["ram_prefetch_cancelled_per_step"] >= 0
    layers = res["per_layer"]  # one entry per Switch layer: hit rates and waits of its loops
    assert [L["block"] for L in layers] == [0, 1] and all(0 <= L["ram_hit_rate"] <= 1 for L in layers)
    assert sum(L["host_wait_s"] for L in layers) == pytest.approx(res["host_wait_s"] * res["timed_steps"], rel=1e-6)
    assert [L["block"] for L in res["prefetch_off_per_layer"]] == [0, 1]
    table = bench._table([res])
    assert "Switch layer 1, prefetch off: recall, RAM/GPU hit, waited (s)" in table and "tiered / resident" in table
    assert "resident step / dense twin step" in table
    assert not (tmp_path / "work").exists()  # stores removed without --keep


def test_bench_train_sweeps_micro_batches(data_dir, tmp_path, monkeypatch):
    """--micro-batches 1,2: one result per step size, each with its tokens a step and the
    activations it kept (none at M = 1)."""
    monkeypatch.setattr(bench, "disk_write_rate", lambda d, threads=4: 1.0)
    monkeypatch.setattr(bench, "disk_mixed_rate", lambda *a, **k: {"read_gbps": 1.0, "write_gbps": 1.0, "total_gbps": 1.5})
    toml = _write_toml(tmp_path / "tiny.toml", tiny(data_dir, tmp_path / "cfg", train=dict(batch_size=4)))
    r = CliRunner().invoke(main, ["bench-train", "--config", str(toml), "--steps", "1", "--warmup", "1", "--micro-batches",
                                  "1,2", "--no-prefetch-off", "--no-dense-twin", "--dir", str(tmp_path / "work"), "--json"])
    assert r.exit_code == 0, r.output
    one, two = json.loads(r.stdout)
    assert one["dense_twin_step_s"] is None and one["resident_over_dense_twin"] is None
    assert (one["config"], two["config"]) == ("tiny", "tiny M=2")
    assert (one["micro_batches"], two["micro_batches"]) == (1, 2)
    assert two["tokens_per_step"] == 2 * one["tokens_per_step"] == 2 * 4 * 32
    assert one["act_gpu_peak_bytes"] == 0 and two["act_gpu_peak_bytes"] > 0
    assert two["tokens_per_s"] == pytest.approx(two["tokens_per_step"] / two["step_s"])
    r = CliRunner().invoke(main, ["bench-train", "--config", str(toml), "--micro-batches", "1,x"])
    assert r.exit_code != 0 and "--micro-batches" in r.output


def test_bench_adam_has_the_compact_row():
    """bench-adam times the compact state beside the fp32-state pipeline and rates both against
    the copy bandwidth measured in the same run."""
    r = CliRunner().invoke(main, ["bench-adam", "--params", "300000", "--tensors", "2", "--repeats", "1",
                                  "--threads", "1", "--bw-bytes", str(8 << 20), "--no-deepspeed", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["compact_mparams_s"] > 0 and d["gmtier_mparams_s"] > 0 and d["compact_block"] >= 256
    assert d["bandwidth_fraction_compact"] == pytest.approx(d["gbps_effective_compact"] / d["dram_copy_gbps"])
    assert d["compact_speedup_vs_fp32_state"] == pytest.approx(d["compact_mparams_s"] / d["gmtier_mparams_s"])
    r = CliRunner().invoke(main, ["bench-adam", "--params", "300000", "--tensors", "2", "--repeats", "1",
                                  "--threads", "1", "--bw-bytes", str(8 << 20), "--no-deepspeed"])
    assert "compact state, bf16 grad: gmtier" in r.output and "of the copy bandwidth" in r.output, r.output
