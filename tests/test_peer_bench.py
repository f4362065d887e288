"""benches/peer_deepspeed.py on the CPU: the DeepSpeed configs it writes for a gmtier run, its
table's ratios, and the harness end to end (gmtier measured in a child process, a DeepSpeed mode
without CUDA reported as a result with its error)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from gmtier import config
from gmtier.build import build_model
from test_train import _write_toml, data_dir, tiny  # noqa: F401  (data_dir is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def _peer():
    spec = importlib.util.spec_from_file_location("peer_deepspeed", ROOT / "benches" / "peer_deepspeed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_cfg(tmp_path, **train):
    cfg = tiny(tmp_path / "data", tmp_path / "run", train=dict(precision="bf16", grad_clip=0.5, **train),
               experts=dict(mode="resident"))  # as the DeepSpeed modes load it
    cfg.model.vocab_size = 512
    return cfg


def test_deepspeed_configs_follow_the_gmtier_run(tmp_path):
    peer = _peer()
    cfg = _tiny_cfg(tmp_path)
    stats = peer.model_stats(build_model(cfg, "cpu")[0])
    m = cfg.model
    assert stats["expert_params"] == len(m.switch_layers()) * m.n_experts * 2 * m.d_model * m.d_ff
    assert stats["bank_tensors"] == 2 * m.n_experts and stats["largest_param"] == m.vocab_size * m.d_model

    z2 = peer.deepspeed_config(cfg, "zero2-offload", 4, str(tmp_path / "nvme"), stats)
    t = cfg.train
    assert z2["train_micro_batch_size_per_gpu"] == t.batch_size and z2["gradient_accumulation_steps"] == 4
    assert z2["bf16"]["enabled"] and not z2["fp16"]["enabled"] and z2["gradient_clipping"] == 0.5
    assert z2["optimizer"] == {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                                            "weight_decay": t.weight_decay}}
    assert z2["zero_optimization"]["stage"] == 2 and z2["zero_optimization"]["offload_optimizer"]["device"] == "cpu"

    z3 = peer.deepspeed_config(cfg, "zero3-nvme", 1, str(tmp_path / "nvme"), stats,
                               ["aio.queue_depth=16", "zero_optimization.sub_group_size=1e8"])
    zo = z3["zero_optimization"]
    assert zo["stage"] == 3 and zo["offload_param"]["device"] == zo["offload_optimizer"]["device"] == "nvme"
    assert zo["offload_param"]["nvme_path"] == str(tmp_path / "nvme")
    # Every tensor fits a swap buffer, and a whole expert bank can be gathered at once.
    size = zo["offload_param"]["buffer_size"]
    assert size >= stats["largest_param"] and size % (1 << 20) == 0
    assert zo["offload_param"]["buffer_count"] > stats["bank_tensors"]
    assert z3["aio"]["queue_depth"] == 16 and zo["sub_group_size"] == 1e8  # the --ds-set overrides
    with pytest.raises(ValueError, match="KEY.PATH=JSON"):
        peer.deepspeed_config(cfg, "zero3-nvme", 1, "x", stats, ["aio.queue_depth"])
    with pytest.raises(ValueError, match="not a DeepSpeed mode"):
        peer.deepspeed_config(cfg, "gmtier", 1, "x", stats)



def test_deepspeed_accepts_the_configs(tmp_path):
    ds = pytest.importorskip("deepspeed.runtime.config")  # DeepSpeed is not a dependency: where installed
    peer = _peer()
    cfg = _tiny_cfg(tmp_path)
    stats = peer.model_stats(build_model(cfg, "cpu")[0])
    for mode in peer.DS_MODES:
        d = peer.deepspeed_config(cfg, mode, 4, str(tmp_path / "nvme"), stats)
        parsed = ds.DeepSpeedConfig(d)
        assert parsed.gradient_accumulation_steps == d["gradient_accumulation_steps"]
        assert parsed.zero_optimization_stage == d["zero_optimization"]["stage"]


def test_table_gives_gmtier_over_each_peer_at_the_same_m():
    peer = _peer()
    base = dict(config="c", params=100, n_experts=8, disk_read_bytes_per_step=400.0, disk_write_bytes_per_step=200.0)
    results = [dict(base, mode="gmtier", micro_batches=1, tokens_per_step=10, step_s=1.0, tokens_per_s=10.0),
               dict(base, mode="zero3-nvme", micro_batches=1, tokens_per_step=10, step_s=4.0, tokens_per_s=2.5,
                    experts_with_tokens_per_step=3.0),
               dict(base, mode="gmtier", micro_batches=4, tokens_per_step=40, step_s=1.0, tokens_per_s=40.0),
               {"config": "c", "mode": "zero3-nvme", "micro_batches": 4, "error": "CUDA out of memory"}]
    out = peer.table(results)
    assert "gmtier / zero3-nvme tokens/s at M=1: 4.00" in out
    assert "gmtier M=4 / zero3-nvme M=1 tokens/s: 16.00" in out
    assert "zero3-nvme M=4: CUDA out of memory" in out
    assert "3.0/8" in out and "4.0" in out  # experts with tokens; 400 B read / 100 params


@pytest.mark.slow  # two child processes, each importing torch
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour of the DeepSpeed modes")
def test_peer_bench_runs_gmtier_and_reports_a_mode_that_cannot_run(data_dir, tmp_path):  # noqa: F811
    peer = _peer()
    toml = _write_toml(tmp_path / "tiny.toml", tiny(data_dir, tmp_path / "cfg", train=dict(batch_size=4)))
    out = tmp_path / "peer.jsonl"
    results = peer.main(["--config", str(toml), "--modes", "gmtier,zero2-offload", "--micro-batches", "2",
                         "--steps", "1", "--warmup", "1", "--work-dir", str(tmp_path / "work"),
                         "--json-out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
    g, ds = results
    assert g["mode"] == "gmtier" and g["micro_batches"] == 2 and g["tokens_per_step"] == 2 * 4 * 32
    assert g["step_s"] > 0 and g["tokens_per_s"] == pytest.approx(g["tokens_per_step"] / g["step_s"])
    # The tiny store's RAM budget holds 3 of its 8 records: the timed step reads experts from disk.
    assert g["gmtier_disk_read_bytes_per_step"] > 0 and g["vm_hwm_bytes"] > 0
    assert ds["mode"] == "zero2-offload" and "needs CUDA" in ds["error"]
    assert not list((tmp_path / "work").glob("*"))  # each run's store removed
