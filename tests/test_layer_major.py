"""The layer-major step (train.micro_batches > 1): M micro-batches equal one batch of the same
tokens; each expert is paged once a step; activations spilled to disk change nothing."""

import contextlib
import copy
import json
import os
import signal
import time
from collections import Counter

import pytest
import torch

import gmtier._core

from gmtier import config
from gmtier.activations import ActivationBudgetError, ActivationStash
from gmtier.experts.bank import ResidentExperts
from gmtier.layer_major import LayerMajorStep
from gmtier.model import GPT
from gmtier.train import Trainer, train
from test_train import _spawn_train, _write_toml, data_dir, losses_of, needs_store, tiny  # noqa: F401 (fixture)

_core_has_spill = hasattr(gmtier._core, "SpillFile")
needs_spill = pytest.mark.skipif(not _core_has_spill, reason="gmtier._core.SpillFile not built")

MB = 4  # micro-batches of the tests' steps


def _small_model(capacity_factor: float, jitter: float) -> config.ModelConfig:
    return config.ModelConfig(vocab_size=64, n_layer=4, n_head=4, d_model=32, d_ff=64, seq_len=16, n_experts=4,
                              capacity_factor=capacity_factor, router_jitter=jitter)


@pytest.mark.parametrize("capacity_factor,jitter,pad_rows", [(0.0, 0.0, 0), (1.0, 0.0, 0), (1.25, 0.1, 8)])
def test_one_step_equals_one_big_batch(capacity_factor, jitter, pad_rows, tmp_path):
    """Loss, router losses and every gradient of a layer-major step over 4 micro-batches equal
    those of one batch of the same sequences (capacity and router losses over the step's tokens;
    jitter replayed in the recompute; GEMM rows padded or not), on fresh random weights and tokens."""
    m = _small_model(capacity_factor, jitter)
    ref = GPT(m, 0, expert_bank=lambda layer: ResidentExperts(m, layer, 0, pad_rows)).train()
    lm = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(int(time.time()))
    x, y = torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g)
    torch.manual_seed(5)
    _, loss, aux = ref(x, y)
    (loss + aux).backward()
    stash = ActivationStash("cpu", 10**9, 0, tmp_path / "spill", 2 * 16 * 32 * 4)
    torch.manual_seed(5)
    loss2, aux2 = LayerMajorStep(lm, stash, contextlib.nullcontext).run(list(x.split(2)), list(y.split(2)))
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    assert aux2.item() == pytest.approx(aux.item(), rel=1e-6)
    for (name, p), q in zip(ref.named_parameters(), lm.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def _lm(data_dir, run, mb=MB, **sections):
    """`tiny` with a step of `mb` micro-batches of 2 sequences (8 sequences a step, as tiny's batch)."""
    sections.setdefault("train", {})
    sections["train"] = dict(batch_size=8 // mb, micro_batches=mb, steps=10) | sections["train"]
    return tiny(data_dir, run, **sections)


def test_resident_micro_batches_equal_one_batch_over_ten_steps(data_dir, tmp_path):
    one = Trainer(tiny(data_dir, tmp_path / "one", train=dict(steps=10), experts=dict(mode="resident")),
                  log=lambda s: None)
    ref = one.fit()
    many = Trainer(_lm(data_dir, tmp_path / "many", experts=dict(mode="resident")), log=lambda s: None)
    got = many.fit()
    assert got == pytest.approx(ref, abs=1e-5)
    for (name, p), q in zip(one.model.named_parameters(), many.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)
    one.close()
    many.close()


@needs_store
@pytest.mark.parametrize("emulate", [False, True])
def test_tiered_matches_resident(data_dir, tmp_path, monkeypatch, emulate):
    if emulate:
        monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
    res = train(_lm(data_dir, tmp_path / "res", experts=dict(mode="resident")), log=lambda s: None)
    # Emulated: GEMM rows padded as on CUDA, too.
    experts = dict(gpu_budget=5 * 2 * 64 * 128 * 4, pad_rows=16) if emulate else {}
    tiered = train(_lm(data_dir, tmp_path / "tiered", experts=experts), log=lambda s: None)
    assert tiered == pytest.approx(res, abs=2e-4)


@needs_store
@pytest.mark.parametrize("mb", [1, 4, 16])
def test_each_expert_paged_once_a_step(data_dir, tmp_path, monkeypatch, mb):
    """Every expert with tokens is acquired exactly once in forward and once in backward a step,
    whatever the number of micro-batches."""
    from gmtier.store import TieredExpertStore

    acquired: Counter = Counter()
    phase = {}
    real_many, real_resident = TieredExpertStore.acquire_many, TieredExpertStore.acquire_resident_many

    def acquire_many(self, keys, *a, **k):
        out = real_many(self, keys, *a, **k)
        acquired.update((phase["now"](), tuple(key)) for key in out)
        return out

    def acquire_resident_many(self, keys, *a, **k):
        out = real_resident(self, keys, *a, **k)
        acquired.update((phase["now"](), tuple(key)) for key in out)
        return out

    monkeypatch.setattr(TieredExpertStore, "acquire_many", acquire_many)
    monkeypatch.setattr(TieredExpertStore, "acquire_resident_many", acquire_resident_many)
    cfg = _lm(data_dir, tmp_path / "run", mb=mb, model=dict(n_layer=2, switch_every=1), train=dict(
        batch_size=32 // mb, steps=1))
    t = Trainer(cfg, log=lambda s: None)
    phase["now"] = lambda: t.runtime.phase
    t.fit()
    used = json.loads((tmp_path / "run" / "routing.jsonl").read_text().splitlines()[0])["experts"]
    want = Counter({(p, (layer, e)): 1 for p in ("fwd", "bwd") for layer, es in enumerate(used) for e in es})
    t.close()
    assert acquired == want


def test_stash_puts_the_last_entries_on_the_device_and_spills_the_first(tmp_path):
    """Filled from the end: with room for 2 of 6 entries on the device and 2 in RAM, the first two
    go to disk, and every entry comes back as it went in."""
    if not _core_has_spill:
        pytest.skip("gmtier._core.SpillFile not built")
    piece = 4096
    ts = [torch.randn(1024) for _ in range(6)]  # 4 KiB each
    stash = ActivationStash("cpu", 2 * piece, 2 * piece + 2 * piece, tmp_path / "spill", piece)
    stash.begin_step(6 * piece)
    for i, t in enumerate(ts):
        stash.put(i, t)
    tiers = [("gpu" if e.device_tensor is not None else e.pieces[0].tier) for e in stash._entries.values()]
    assert tiers == ["disk", "disk", "ram", "ram", "gpu", "gpu"]
    assert stash.ram_allocated_bytes == 2 * piece + 2 * piece  # the RAM pieces and the two staging buffers
    stash.expect(list(reversed(range(6))))
    for i in reversed(range(6)):
        assert torch.equal(stash.get(i), ts[i])
    m = stash.metrics()
    assert m["act_disk_write_bytes"] == m["act_disk_read_bytes"] == 2 * piece
    assert m["act_ram_bytes"] == m["act_ram_peak_bytes"] == 2 * piece and m["act_gpu_peak_bytes"] == 2 * piece
    stash.end_step()
    stash.close()
    assert not list((tmp_path / "spill").glob("*"))  # scratch: gone


def test_a_spill_without_room_to_stage_it_names_the_key_and_the_smallest_value(tmp_path):
    stash = ActivationStash("cpu", 4096, 0, tmp_path / "spill", 8192)
    with pytest.raises(ActivationBudgetError, match=r"train.activations_ram_budget = 0 B .* at least 16384 B"):
        stash.begin_step(3 * 8192)


def test_micro_batches_below_one_refused(data_dir, tmp_path):
    with pytest.raises(config.ConfigError, match="train.micro_batches = 0"):
        tiny(data_dir, tmp_path / "run", train=dict(micro_batches=0))


@needs_store
@needs_spill
def test_everything_spilled_equals_nothing_spilled(data_dir, tmp_path):
    """A device budget of 0 and a RAM budget of just the staging buffers: every activation goes
    to disk and back, and the losses are the same bits."""
    kept = train(_lm(data_dir, tmp_path / "kept"), log=lambda s: None)
    piece = 2 * 32 * 64 * 4
    spilled_cfg = _lm(data_dir, tmp_path / "spilled", train=dict(activations_gpu_budget=0,
                                                                 activations_ram_budget=2 * piece))
    t = Trainer(spilled_cfg, log=lambda s: None)
    spilled = t.fit()
    rec = [json.loads(line) for line in (tmp_path / "spilled" / "metrics.jsonl").read_text().splitlines()][-1]
    t.close()
    assert spilled == kept
    assert rec["act_disk_write_bytes"] > 0 and rec["act_disk_read_bytes"] == rec["act_disk_write_bytes"]
    assert rec["act_gpu_peak_bytes"] == 0
    assert rec["act_parked_peak_bytes"] > 0  # the residual stream and gradients set aside off the device


@needs_store
@needs_spill
def test_sigkill_with_spilled_activations_then_resume(data_dir, tmp_path):
    steps = 30
    spill = dict(activations_gpu_budget=0, activations_ram_budget=2 * 2 * 32 * 64 * 4)
    ref_cfg = _write_toml(tmp_path / "ref.toml", _lm(data_dir, tmp_path / "ref", train=dict(steps=steps, **spill)))
    p = _spawn_train(ref_cfg)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    cfg = _write_toml(tmp_path / "run.toml", _lm(data_dir, tmp_path / "run", train=dict(
        steps=steps, checkpoint_every=5, **spill)))
    p = _spawn_train(cfg)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if (tmp_path / "run" / "metrics.jsonl").exists() and len(losses_of(tmp_path / "run")) >= 12:
            break
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed:\n" + p.communicate()[0]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p = _spawn_train(cfg, "--resume")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    ref, got = losses_of(tmp_path / "ref"), losses_of(tmp_path / "run")
    assert [got[s] for s in range(1, steps + 1)] == pytest.approx([ref[s] for s in range(1, steps + 1)], abs=1e-6)


@needs_store
def test_experts_run_in_chunks_of_rows_with_the_same_numbers(data_dir, tmp_path, monkeypatch):
    """An expert with more rows than EXPERT_CHUNK_BYTES allows runs in chunks (dW added up): the
    same losses as in one piece, here with chunks of 8 rows."""
    import gmtier.experts.bank as bank

    whole = train(_lm(data_dir, tmp_path / "whole"), log=lambda s: None)
    monkeypatch.setattr(bank, "EXPERT_CHUNK_BYTES", 3 * 128 * 4 * 8)  # d_ff 128, fp32: 8 rows
    assert bank.expert_chunk_rows(128, torch.float32, 0) == 8
    calls = Counter()
    real = bank.expert_ffn
    monkeypatch.setattr(bank, "expert_ffn", lambda *a, **k: (calls.update(["fwd"]), real(*a, **k))[1])
    chunked = train(_lm(data_dir, tmp_path / "chunked"), log=lambda s: None)
    assert calls["fwd"] > 10 * 2 * 4  # more than one call per expert a step
    assert chunked == pytest.approx(whole, abs=1e-5)


def test_the_host_pool_holds_what_the_step_uses_not_the_whole_budget(tmp_path):
    """A 1 GiB RAM budget and three 4 KiB entries: one 16 KiB segment is allocated, and a later
    step that needs more grows the pool by segments; the entries come back intact."""
    stash = ActivationStash("cpu", 0, 1 << 30, tmp_path / "spill", 4096, segment_bytes=16384)
    for n_entries in (3, 9):
        ts = [torch.randn(1024) for _ in range(n_entries)]
        stash.begin_step(n_entries * 4096)
        for i, t in enumerate(ts):
            stash.put(i, t)
        assert stash.ram_allocated_bytes == 16384 * -(-n_entries // 4)
        stash.expect(list(reversed(range(n_entries))))
        for i in reversed(range(n_entries)):
            assert torch.equal(stash.get(i), ts[i])
        stash.end_step()
    stash.close()


def test_parked_tensors_leave_the_device_and_each_bank_is_reused_once_empty(tmp_path):
    """Where a step's activations exceed the device budget, parked tensors are copies in the
    scratch banks (intact while the other bank fills), and a bank emptied is reused from its
    start; within the budget, parking holds the tensor itself."""
    stash = ActivationStash("cpu", 0, 1 << 20, tmp_path / "spill", 4096, segment_bytes=16384)
    stash.begin_step(1 << 20)
    assert stash.parks_off_device
    for round_ in range(2):
        a = [torch.randn(1024) for _ in range(3)]
        for m, t in enumerate(a):
            stash.park(("a", m), t, 0)
        b = [torch.randn(1024) for _ in range(3)]
        for m, t in enumerate(b):
            stash.park(("b", m), t, 1)
        assert all(stash.peek(("a", m)) is not a[m] and torch.equal(stash.peek(("a", m)), a[m]) for m in range(3))
        assert [torch.equal(stash.unpark(("a", m)), a[m]) for m in range(3)] == [True] * 3
        assert [torch.equal(stash.unpark(("b", m)), b[m]) for m in range(3)] == [True] * 3
        assert stash.ram_allocated_bytes == 2 * 16384  # one segment a bank, the second round reuses it
    stash.end_step()
    stash.begin_step(0)  # everything fits the device budget
    t = torch.randn(8)
    stash.park("t", t, 0)
    assert not stash.parks_off_device and stash.unpark("t") is t
    stash.close()
