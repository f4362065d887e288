"""GPU tier tests: run on the GPU machine with `pytest -m gpu tests/test_store_gpu.py`."""

import pytest
import torch

from gmtier.store import TieredExpertStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SCHEMA = [("w1", "bf16", [256, 512], "weights"), ("w2", "bf16", [512, 256], "weights"),
          ("w1.master", "f32", [256, 512], "state"), ("step", "i64", [1], "state")]


def expert(l, e, v=0):
    g = torch.Generator().manual_seed(l * 100 + e * 7 + v)
    return {"w1": torch.randn(256, 512, generator=g).bfloat16(), "w2": torch.randn(512, 256, generator=g).bfloat16()}


@pytest.fixture
def store(tmp_path):
    TieredExpertStore.create(tmp_path / "s", 2, 6, SCHEMA, init=expert)
    s = TieredExpertStore.open(tmp_path / "s", ram_bytes=8 << 20, gpu_bytes=0, device="cpu")
    rb, wb = s.record_bytes, s.weights_bytes
    s.close()
    s = TieredExpertStore.open(tmp_path / "s", ram_bytes=4 * rb, gpu_bytes=4 * wb, device="cuda", gpu_grad_slots=1)
    yield s
    s.close()


def test_arena_is_pinned(store):
    assert store.pinned and store.gpu.num_slots == 3


def test_round_trip_through_gpu_tier(store):
    # 12 experts through 3 GPU slots and 4 RAM slots: every path (miss, hit, eviction) is exercised.
    for rep in range(2):
        for l in range(2):
            for e in range(6):
                w = store.acquire((l, e))
                assert w["w1"].is_cuda
                ref = expert(l, e)
                assert torch.equal(w["w1"].cpu(), ref["w1"]) and torch.equal(w["w2"].cpu(), ref["w2"]), (rep, l, e)
                store.release([(l, e)])
    m = store.gpu.metrics()
    assert m["misses"] >= 12 and m["h2d_bytes"] == m["h2d_copies"] * store.weights_bytes
    torch.cuda.synchronize()
    store.gpu.drain()
    assert store.metrics()["pinned"] == 0


def test_update_then_reacquire_sees_new_weights(store):
    key = (1, 2)
    store.acquire(key)
    new = expert(1, 2, v=9)
    store.record(key)["w1"].copy_(new["w1"])
    store.mark_dirty([key])
    store.release([key])  # stale GPU copy dropped here
    w = store.acquire(key)
    assert torch.equal(w["w1"].cpu(), new["w1"])
    store.release([key])


def test_copy_stream_ordering(store):
    """Compute on the default stream reads a slot while the tier refills other slots; a slot is
    only overwritten after the kernel that used it (free_after event), and compute waits for the
    copy (ready event) without a host sync."""
    outs = []
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    for i in range(24):
        key = (i % 2, i % 6)
        w = store.acquire(key)
        outs.append((key, (x.float() @ w["w1"].float()).sum()))  # queued, not synchronized
        store.release([key])
    torch.cuda.synchronize()
    for key, got in outs:
        ref = (x.cpu().float() @ expert(*key)["w1"].float()).sum()  # fp32 both: another expert's weights are far off
        assert torch.allclose(got.cpu(), ref, rtol=1e-3, atol=0.1), key


def test_grads_staged_within_the_budget(store):
    key = (0, 1)
    store.acquire(key)
    assert store.gpu.arena.numel() == 4 * store.weights_bytes  # 3 weight slots + 1 gradient slot
    hosts = []
    for v in (1.0, 2.0):  # one staging slot: the second fill must wait for the first copy
        i, (dw,) = store.gpu.grad_buffers(1)
        for t in dw.values():
            t.fill_(v)
        hosts.append(store.grads_to_host([key], staging=i))
    for v, h in zip((1.0, 2.0), hosts):
        h.wait()
        assert set(h.tensors[0]) == {"w1", "w2"}
        assert all(not t.is_cuda and t.is_pinned() and bool((t == v).all()) for t in h.tensors[0].values())
    with pytest.raises(ValueError, match="staging"):
        store.grads_to_host([key], [{"w1": torch.ones(256, 512, device="cuda")}])
    store.release([key])
