"""Training on a CUDA GPU (run on the GPU machine: `pytest -m gpu`); skipped without CUDA."""

import json

import pytest
import torch

from test_train import data_dir, losses_of, tiny  # noqa: F401  (data_dir is a fixture)
from gmtier.train import Trainer, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_cfg(data_dir, run_dir, precision="bf16", **sections):
    sections.setdefault("train", {}).update(device="cuda", precision=precision)
    ex = sections.setdefault("experts", {})
    ex.setdefault("gpu_budget", 3 * 32768)  # 2 GPU slots + 1 gradient slot for 8 experts: every step copies
    ex.setdefault("ram_budget", 6 * 240_000)  # 6 records: 2 in use, 2 waiting for AdamW, 2 feeding H2D copies
    return tiny(data_dir, run_dir, **sections)


@pytest.mark.parametrize("gpu_slots", [3, 20])
def test_tiered_matches_resident_bf16(data_dir, tmp_path, gpu_slots):
    # 3 slots: every expert is copied in forward and again in backward. 20 slots (all 8 experts
    # fit): the GPU copy is refreshed after each update, forward finds it there without RAM, and
    # backward reads only the state section into the 6 RAM slots.
    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    res = train(gpu_cfg(data_dir, tmp_path / "res", experts=dict(mode="resident")), log=lambda s: None)
    tiered = train(gpu_cfg(data_dir, tmp_path / "tiered", experts=dict(async_adam=True, gpu_budget=gpu_slots * 32768)),
                   log=lambda s: None)
    assert res[-1] < res[0] - 0.4
    # bf16 expert weights (tiered: rounded from the fp32 master by the CPU AdamW; resident: cast by
    # autocast) and GPU reductions in a different order: close, not equal.
    assert tiered == pytest.approx(res, abs=0.05)
    rows = [json.loads(l) for l in (tmp_path / "tiered" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["expert_updates"] > 0 and "gpu_hit_rate" in last and last["h2d_bytes"] > 0


def test_padded_gemm_rows_on_gpu_match_unpadded(data_dir, tmp_path):
    # pad_rows "auto" pads to 128 rows on CUDA: the same model as without padding, to bf16 noise.
    ex = dict(async_adam=True, gpu_budget=20 * 32768)
    auto = gpu_cfg(data_dir, tmp_path / "auto", experts=dict(ex))
    assert auto.expert_pad_rows() == 128
    plain = train(gpu_cfg(data_dir, tmp_path / "plain", experts=dict(ex, pad_rows=0)), log=lambda s: None)
    assert train(auto, log=lambda s: None) == pytest.approx(plain, abs=0.02)


def test_gpu_prefetch_copies_the_guesses_early_and_matches_resident(data_dir, tmp_path):
    # 6 slots (4 weights + 2 dW staging) for 8 experts, RAM for 7 records: the router's guesses
    # for the next layer are copied to the GPU between the current layer's experts.
    res = train(gpu_cfg(data_dir, tmp_path / "res", experts=dict(mode="resident")), log=lambda s: None)
    run = tmp_path / "tiered"
    cfg = gpu_cfg(data_dir, run, experts=dict(async_adam=True, gpu_budget=6 * 32768, ram_budget=7 * 240_000))
    assert train(cfg, log=lambda s: None) == pytest.approx(res, abs=0.05)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    copies = sum(r["gpu_prefetch_copies"] for r in rows)
    assert copies > 0 and sum(r["gpu_prefetch_hits"] for r in rows) > copies / 2


def test_fp16_with_loss_scaling_trains(data_dir, tmp_path):
    cfg = gpu_cfg(data_dir, tmp_path / "run", precision="fp16", train=dict(steps=30))
    losses = train(cfg, log=lambda s: None)
    assert all(l == l and l < 20 for l in losses)  # finite
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3  # a few early steps skip while the loss scale settles
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss_scale"] > 0


def test_gpu_tier_stays_within_budget_and_resumes(data_dir, tmp_path):
    cfg = gpu_cfg(data_dir, tmp_path / "run", train=dict(steps=10, checkpoint_every=5))
    t = Trainer(cfg, log=lambda s: None)
    try:
        t.fit(until=7)
        gpu = t.runtime.store.gpu
        assert gpu.arena.numel() <= 3 * 32768
        assert gpu.num_slots + gpu.grad_slots == 3 * 32768 // t.runtime.store.weights_bytes
    finally:
        t.close()
    ref = train(gpu_cfg(data_dir, tmp_path / "ref", train=dict(steps=10)), log=lambda s: None)
    t = Trainer(gpu_cfg(data_dir, tmp_path / "run", train=dict(steps=10, checkpoint_every=5)), resume=True, log=lambda s: None)
    try:
        assert t.step == 5
        rest = t.fit()
    finally:
        t.close()
    # The same batches and state; GPU kernels may reorder reductions, so close rather than equal.
    assert rest == pytest.approx(ref[5:], abs=2e-2)


def test_dense_optimizer_offloaded_on_gpu(data_dir, tmp_path):
    cfg = gpu_cfg(data_dir, tmp_path / "run", train=dict(steps=10, dense_optimizer="cpu"))
    losses = train(cfg, log=lambda s: None)
    assert losses[-1] < losses[0]


def test_activation_checkpointing_same_losses(data_dir, tmp_path):
    a = train(gpu_cfg(data_dir, tmp_path / "a", train=dict(steps=5)), log=lambda s: None)
    b = train(gpu_cfg(data_dir, tmp_path / "b", train=dict(steps=5, activation_checkpointing=True)), log=lambda s: None)
    assert b == pytest.approx(a, abs=1e-2)
