"""The GPU tier's logic on any machine: GMTIER_EMULATE_GPU_TIER=1 runs the tier in host memory
(synchronous stand-ins for streams and events), so its slot bookkeeping, prefetch, corrections
and gradient staging are checked here, and tiered training through it against resident
training. The real copies and their overlap are tested on a GPU (test_store_gpu.py)."""

import json
import threading
import time

import pytest
import torch

from gmtier.store import TieredExpertStore
from test_train import data_dir, tiny  # noqa: F401  (data_dir is a fixture)

SCHEMA = [("w1", "f32", [16, 32], "weights"), ("w2", "f32", [32, 16], "weights"),
          ("w1.exp_avg", "f32", [16, 32], "state"), ("step", "i64", [1], "state")]


def expert(layer, e):
    g = torch.Generator().manual_seed(layer * 100 + e)
    return {"w1": torch.randn(16, 32, generator=g), "w2": torch.randn(32, 16, generator=g)}


on_cuda = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])


@pytest.fixture(params=["cpu", on_cuda])
def store(tmp_path, monkeypatch, request):
    """A store of 8 experts whose GPU tier (emulated on "cpu") has 3 weight slots."""
    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
    TieredExpertStore.create(tmp_path / "s", 1, 8, SCHEMA, init=expert)
    probe = TieredExpertStore.open(tmp_path / "s", ram_bytes=1 << 20)
    rb, wb = probe.record_bytes, probe.weights_bytes
    probe.close()
    # 3 weight slots + 1 gradient slot on the "GPU"; RAM for 6 records.
    s = TieredExpertStore.open(tmp_path / "s", ram_bytes=6 * rb, gpu_bytes=4 * wb, device=request.param,
                               gpu_grad_slots=1)
    yield s
    s.close()


def in_ram(store, key):
    """Pin `key`'s RAM record (reading it first): its slot, as a GPU prefetch is given it."""
    store.get([key])
    store.release([key])
    return store.core.pin_resident([key], "weights")[0]


def test_prefetched_copy_is_used_without_a_copy(store):
    gpu = store.gpu
    assert gpu.active and gpu.num_slots == 3 and ("emulated" in repr(gpu)) == (store.device.type == "cpu")
    assert store.core.pin_resident([(0, 0)], "weights") == [None], "not in RAM: nothing pinned, nothing read"
    assert store.metrics()["reads"] == 0
    assert gpu.prefetch((0, 0), in_ram(store, (0, 0)), priority=2) == "copied"
    gpu.drain()
    assert store.metrics()["pinned"] == 0, "the RAM pin went with the finished copy"
    # Already there: nothing copied, the pin given is dropped.
    assert gpu.prefetch((0, 0), in_ram(store, (0, 0)), priority=2) == "held"
    assert store.metrics()["pinned"] == 0
    copies = gpu.m["h2d_copies"]
    w = store.acquire((0, 0), sections="weights")
    assert w["w1"].device.type == store.device.type
    assert torch.equal(w["w1"].cpu(), expert(0, 0)["w1"]) and torch.equal(w["w2"].cpu(), expert(0, 0)["w2"])
    store.release([(0, 0)])
    m = gpu.metrics()
    assert (m["h2d_copies"], m["prefetch_copies"], m["prefetch_hits"]) == (copies, 1, 1)


def test_wrong_guesses_are_evicted_first_and_budgets_hold(store):
    gpu = store.gpu
    # A guess evicted before any use counts as wasted.
    assert gpu.prefetch((0, 1), in_ram(store, (0, 1)), priority=2) == "copied"
    for e in (2, 3, 4):
        store.acquire((0, e))  # three pinned experts need all three slots
    assert not gpu.holds((0, 1)) and gpu.metrics()["prefetch_wasted"] == 1
    # With every slot pinned (or `reserve` slots needed by the layer) a prefetch waits.
    assert gpu.prefetch((0, 5), in_ram(store, (0, 5)), priority=2) == "busy"
    store.release([(0, 2), (0, 3), (0, 4)])
    assert gpu.prefetch((0, 5), in_ram(store, (0, 5)), priority=2, reserve=3) == "busy"
    gpu.drain()
    assert store.metrics()["pinned"] == 0, "a refused prefetch drops its RAM pin"
    # Protected from demand while the guess stands; demoted, it is the first slot evicted.
    assert gpu.prefetch((0, 5), in_ram(store, (0, 5)), priority=2) == "copied"
    store.acquire((0, 6))
    assert gpu.holds((0, 5)), "demand evicts older unprotected copies before a prefetch"
    gpu.demote([(0, 5)])
    store.acquire((0, 7))
    assert not gpu.holds((0, 5)) and gpu.holds((0, 6))
    store.release([(0, 6), (0, 7)])
    assert gpu.metrics()["prefetch_demoted"] == 1


def test_a_request_waiting_on_pins_of_copies_in_flight_goes_on_when_they_finish(store, monkeypatch):
    """A full RAM tier whose records are held by H2D copies still in flight: an acquire waiting
    for a RAM slot is woken by the copies' completion (reported by the copy stream), and by
    nothing before it: no polling, no timeout slicing."""
    from gmtier.store.emulation import HostStreams

    gpu = store.gpu
    monkeypatch.setattr(HostStreams.Stream, "copy_engine_delay_s", 3600.0)  # emulated copies wait to be run
    if store.device.type == "cuda":  # hold the copy stream back for about a second
        gate = torch.cuda.Stream()
        with torch.cuda.stream(gate):
            torch.cuda._sleep(2_000_000_000)
        gpu.copy_stream.wait_stream(gate)
    for e in (0, 1, 2):  # three RAM records held by prefetch copies in flight ...
        assert gpu.prefetch((0, e), in_ram(store, (0, e)), priority=2, max_in_flight=3) == "copied"
    held = [(0, 3), (0, 4), (0, 5)]
    store.get(held)  # ... and three by the test: every RAM slot is pinned
    assert store.metrics()["pinned"] == 6 and gpu.metrics()["hits"] == 0
    got = {}
    waiter = threading.Thread(target=lambda: got.update(w=store.acquire((0, 6))))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "no RAM slot frees up before a copy is done"
    if store.device.type == "cpu":
        gpu.copy_stream.synchronize()  # the emulated copy engine gets to the copies now
    waiter.join(30)
    assert not waiter.is_alive() and torch.equal(got["w"]["w1"].cpu(), expert(0, 6)["w1"])
    store.release(held + [(0, 6)])
    gpu.drain()
    assert store.metrics()["pinned"] == 0 and [gpu.holds((0, e)) for e in (0, 1, 2, 6)] == [False, True, True, True]


def test_acquire_many_pins_the_copies_it_relies_on_before_evicting(store):
    # (0, 0) is on the tier and least recently used, (0, 3) is not: taking (0, 3) first would
    # evict (0, 0), whose "state" acquire reads no weights into RAM and relies on the GPU copy.
    for e in (0, 1, 2):
        store.acquire((0, e))
        store.release([(0, e)])
    store.acquire((0, 1))
    store.acquire((0, 2))
    store.release([(0, 1), (0, 2)])
    got = store.acquire_many([(0, 3), (0, 0)], sections="state")
    assert set(got) == {(0, 3), (0, 0)}
    assert torch.equal(got[(0, 0)]["w1"].cpu(), expert(0, 0)["w1"])
    store.release([(0, 3), (0, 0)])
    store.gpu.drain()
    assert store.metrics()["pinned"] == 0


def test_dw_lands_in_a_fixed_ring_of_host_buffers(store):
    import threading

    gpu = store.gpu
    gpu.reserve_host_grads(2)
    store.acquire((0, 0))
    hosts = []
    for v in (1.0, 2.0):
        i, (dw,) = gpu.grad_buffers(1)
        for t in dw.values():
            t.fill_(v)
        hosts.append(store.grads_to_host([(0, 0)], staging=i))
    # Both buffers in use: the next copy waits until an update gives one back.
    threading.Timer(0.1, hosts[0].release).start()
    i, (dw,) = gpu.grad_buffers(1)
    for t in dw.values():
        t.fill_(3.0)
    third = store.grads_to_host([(0, 0)], staging=i)
    third.wait()
    hosts[1].wait()
    assert all(bool((t == 3.0).all()) for t in third.tensors[0].values())
    assert all(bool((t == 2.0).all()) for t in hosts[1].tensors[0].values()), "a buffer in use was not reused"
    assert gpu.metrics()["grad_wait_s"] > 0.05 and len(gpu._host_bufs) == 2
    assert gpu.host_grad_bytes == 2 * store.weights_bytes
    for h in (hosts[1], third):
        h.release()
        h.release()  # once only
    assert len(gpu._free_host) == 2
    with pytest.raises(ValueError, match="1 to 1 experts"):
        gpu.grad_buffers(2)
    store.release([(0, 0)])


@pytest.mark.parametrize("device", ["cpu", on_cuda])
def test_grouped_dw_leaves_in_one_copy_per_group(tmp_path, monkeypatch, device):
    """Staging slots in groups of 3: each group's dW reach the host together, each expert's in
    its own views; a group's slots are refilled only after its copy has read them."""
    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
    TieredExpertStore.create(tmp_path / "s", 1, 8, SCHEMA, init=expert)
    probe = TieredExpertStore.open(tmp_path / "s", ram_bytes=1 << 20)
    rb, wb = probe.record_bytes, probe.weights_bytes
    probe.close()
    with pytest.raises(ValueError, match="whole groups"):
        TieredExpertStore.open(tmp_path / "s", ram_bytes=8 * rb, gpu_bytes=12 * wb, device=device,
                               gpu_grad_slots=4, gpu_grad_group=3)
    store = TieredExpertStore.open(tmp_path / "s", ram_bytes=8 * rb, gpu_bytes=12 * wb, device=device,
                                   gpu_grad_slots=6, gpu_grad_group=3)
    try:
        gpu = store.gpu
        assert gpu.num_slots == 6 and gpu.host_grad_bytes == 3 * 3 * wb  # 2 groups + 1 being copied
        gpu.reserve_host_grads(4)
        hosts, firsts = [], []
        for g in range(4):  # two rounds over both groups
            n = 3 if g < 3 else 2
            first, views = gpu.grad_buffers(n)
            firsts.append(first)
            assert len(views) == n
            for j, dw in enumerate(views):
                for t in dw.values():
                    t.fill_(10 * g + j)
            hosts.append(store.grads_to_host([(0, j) for j in range(n)], staging=first))
        assert firsts == [0, 3, 0, 3]
        for g, h in enumerate(hosts):
            h.wait()
            assert len(h.tensors) == (3 if g < 3 else 2)
            for j, dw in enumerate(h.tensors):
                assert set(dw) == {"w1", "w2"}
                assert all(bool((t == 10 * g + j).all()) for t in dw.values()), (g, j)
            h.release()
        assert gpu.metrics()["d2h_bytes"] == 11 * wb
    finally:
        store.close()


def test_training_gives_every_dw_buffer_back(data_dir, tmp_path, monkeypatch):
    from gmtier.train import Trainer

    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
    weights = 2 * 64 * 128 * 4
    cfg = tiny(data_dir, tmp_path / "run", train=dict(steps=3),
               experts=dict(gpu_budget=6 * weights, ram_budget="4MiB", async_adam=True))
    t = Trainer(cfg, log=lambda s: None)
    try:
        t.fit()
        gpu, rt = t.runtime.store.gpu, t.runtime
        assert rt.max_pending > 0 and gpu.host_grad_buffers == -(-rt.max_pending // rt.grad_group) + 2
        assert 0 < len(gpu._host_bufs) <= gpu.host_grad_buffers
        assert len(gpu._free_host) == len(gpu._host_bufs), "every update gave its dW buffer back"
    finally:
        t.close()


def train_losses(cfg):
    from gmtier.train import train

    return train(cfg, log=lambda s: None)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("gpu_slots,async_adam,precision", [(6, False, "fp32"), (6, True, "fp32"),
                                                             (12, True, "fp32"), (6, True, "bf16")])
def test_training_through_the_emulated_gpu_tier_matches_resident(data_dir, tmp_path, monkeypatch, gpu_slots,
                                                                  async_adam, precision):
    # 8 expert records. 6 GPU slots (4 for weights, 2 staging dW) with RAM for 7 records: experts
    # are copied every step and the router's guesses for the next layer are copied early. 12
    # slots: every expert stays on the "GPU", refreshed after its AdamW. bf16: backward reads
    # only the state section of experts whose weights the tier holds (the AdamW rewrites them
    # from the fp32 master).
    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
    weights = 2 * 64 * 128 * (4 if precision == "fp32" else 2)
    record = 2 * 64 * 128 * 4 * (3 if precision == "fp32" else 3.5) + 4096
    train = dict(precision=precision)
    res = train_losses(tiny(data_dir, tmp_path / "res", train=train, experts=dict(mode="resident")))
    run = tmp_path / "tiered"
    cfg = tiny(data_dir, run, train=train, experts=dict(gpu_budget=gpu_slots * weights, ram_budget=int(7 * record),
                                                        async_adam=async_adam))
    # bf16: weights rounded from the fp32 master (tiered) or cast by autocast (resident).
    assert train_losses(cfg) == pytest.approx(res, abs=2e-4 if precision == "fp32" else 5e-3)
    rows = _rows(run)
    copies = sum(r["gpu_prefetch_copies"] for r in rows)
    assert all(r["h2d_bytes"] > 0 for r in rows)
    if gpu_slots == 6:
        assert copies > 0 and sum(r["gpu_prefetch_hits"] for r in rows) > copies / 2
    else:
        assert copies == 0 and rows[-1]["gpu_hit_rate"] == 1.0


def test_guesses_are_copied_at_dense_blocks_and_wrong_ones_demoted(data_dir, tmp_path, monkeypatch):
    # Switch layers at every 2nd block: at the dense block before a Switch layer, the copies of
    # its guessed experts already in RAM start at once; wrong guesses are demoted, not wasted.
    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
    model = dict(n_layer=4, switch_every=2, n_experts=8)
    res = train_losses(tiny(data_dir, tmp_path / "res", model=model, experts=dict(mode="resident")))
    run = tmp_path / "tiered"
    cfg = tiny(data_dir, run, model=model, experts=dict(gpu_budget=10 * 2 * 64 * 128 * 4, ram_budget="16MiB",
                                                        async_adam=True))
    assert train_losses(cfg) == pytest.approx(res, abs=2e-4)
    rows = _rows(run)
    copies, used = (sum(r[k] for r in rows) for k in ("gpu_prefetch_copies", "gpu_prefetch_hits"))
    assert copies > len(rows) and used > copies / 2
    assert sum(r["gpu_prefetch_wasted"] for r in rows) <= sum(r["gpu_prefetch_demoted"] for r in rows)


# Budget corners (weight slots on the GPU, records in RAM) the paging loops must all get right:
# all records in RAM with part of a layer on the GPU (bf16: backward reads only the state of
# experts the GPU holds), tiny budgets on both tiers, prefetch or GPU prefetch off.
CORNERS = [
    ("bf16", dict(n_layer=2, switch_every=1, n_experts=16), 20, 64, dict()),
    ("bf16", dict(n_layer=3, switch_every=1, n_experts=8), 7, 3, dict(prefetch=False)),
    ("fp32", dict(n_layer=2, switch_every=1, n_experts=4), 4, 3, dict(async_adam=False)),
    ("fp32", dict(n_layer=4, switch_every=2, n_experts=8), 3, 10, dict(prefetch_depth=1)),
    ("bf16", dict(n_layer=4, switch_every=2, n_experts=8), 10, 3, dict(gpu_prefetch=False)),
]


@pytest.mark.parametrize("precision,model,gpu_slots,ram_records,extra", CORNERS)
def test_budget_corners_match_resident(data_dir, tmp_path, monkeypatch, precision, model, gpu_slots, ram_records,
                                       extra):
    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
    weights = 2 * 64 * 128 * (4 if precision == "fp32" else 2)
    record = 2 * 64 * 128 * 4 * (3 if precision == "fp32" else 3.5) + 4096
    train = dict(precision=precision, steps=5)
    res = train_losses(tiny(data_dir, tmp_path / "res", model=model, train=train, experts=dict(mode="resident")))
    experts = dict(gpu_budget=gpu_slots * weights, ram_budget=int(ram_records * record), **{"async_adam": True, **extra})
    got = train_losses(tiny(data_dir, tmp_path / "tiered", model=model, train=train, experts=experts))
    assert got == pytest.approx(res, abs=2e-4 if precision == "fp32" else 5e-3)


@pytest.mark.parametrize("precision,n_experts,async_adam,emulate", [("bf16", 16, True, "1"), ("fp32", 4, False, "1"),
                                                                   ("fp32", 16, True, "0")])
def test_grouped_updates_match_resident(data_dir, tmp_path, monkeypatch, precision, n_experts, async_adam, emulate):
    # Budgets that hold every record on both tiers: the dW of up to 8 experts go to RAM in one
    # copy (GPU tier emulated) or as they are (CPU), and one AdamW call updates them.
    from gmtier.config import parse_bytes
    from gmtier.experts import grad_staging

    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", emulate)
    model = dict(n_layer=2, switch_every=1, n_experts=n_experts)
    train = dict(precision=precision, steps=5)
    res = train_losses(tiny(data_dir, tmp_path / "res", model=model, train=train, experts=dict(mode="resident")))
    experts = dict(gpu_budget="8MiB", ram_budget="16MiB", async_adam=async_adam)
    cfg = tiny(data_dir, tmp_path / "tiered", model=model, train=train, experts=experts)
    group, slots = grad_staging(cfg, parse_bytes("16MiB", ""), parse_bytes("8MiB", "") if emulate == "1" else 0,
                                2 * n_experts)
    assert group == min(8, n_experts) and slots == (2 * group if emulate == "1" else 0)
    assert train_losses(cfg) == pytest.approx(res, abs=2e-4 if precision == "fp32" else 5e-3)
    rows = _rows(tmp_path / "tiered")
    assert sum(r["expert_updates"] for r in rows if "expert_updates" in r) > 0


def test_backward_leaves_gpu_slots_to_updates_in_flight(data_dir, tmp_path, monkeypatch):
    # A layer's 16 experts taken at once in backward while the previous layer's updates (slowed
    # down here) still hold their GPU pins: the up-front acquire must count those pins.
    monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
    from gmtier.store import TieredExpertStore

    adam_step = TieredExpertStore.adam_step

    def slow_adam_step(self, *args, **kwargs):
        time.sleep(0.01)
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(TieredExpertStore, "adam_step", slow_adam_step)
    model = dict(n_layer=2, switch_every=1, n_experts=16)
    weights = 2 * 64 * 128 * 2
    cfg = tiny(data_dir, tmp_path / "run", model=model, train=dict(precision="bf16", steps=3, batch_size=16),
               experts=dict(gpu_budget=20 * weights, ram_budget="64MiB", async_adam=True))
    losses = train_losses(cfg)
    assert len(losses) == 3



@pytest.mark.parametrize("state", ["compact", "fp32"])
def test_backward_takes_the_master_weights_from_the_gpu_copy(data_dir, tmp_path, monkeypatch, state):
    """Records whose weights are their own master (compact, or fp32 weights with fp32 state):
    where the GPU tier holds an expert's weights, backward reads only its state from disk and
    its AdamW gets the weights from the GPU copy (with the dW). The same losses and records as
    without a GPU tier, where backward reads whole records, and fewer bytes read."""
    from gmtier.train import Trainer

    precision, rec_bytes = ("bf16", 69632) if state == "compact" else ("fp32", 2 * 64 * 128 * 4 * 4 + 4096)
    weights = 2 * 64 * 128 * (2 if state == "compact" else 4)
    runs = {}
    for tier in (True, False):
        if tier:
            monkeypatch.setenv("GMTIER_EMULATE_GPU_TIER", "1")
        else:
            monkeypatch.delenv("GMTIER_EMULATE_GPU_TIER", raising=False)
        # RAM for 3 of the 8 records: every step pages; 12 GPU slots: every expert's weights stay there.
        cfg = tiny(data_dir, tmp_path / f"run-{tier}", train=dict(precision=precision, steps=6),
                   experts=dict(state=state, ram_budget=3 * rec_bytes, gpu_budget=12 * weights, prefetch=False))
        t = Trainer(cfg, log=lambda s: None)
        try:
            assert t.runtime.store.gpu.active == tier and not t.runtime.half
            losses = [t.train_step(*t.train_data.batch(cfg.train.batch_size, cfg.model.seq_len, t.rng))["loss"]
                      for _ in range(6)]
            read = t.runtime.store.core.metrics()["bytes_read"]
            t.runtime.store.flush()
            records = [t.runtime.store.read_expert(layer, e) for layer in range(2) for e in range(4)]
        finally:
            t.close()
        runs[tier] = losses, records, read
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert runs[True][2] < runs[False][2], (runs[True][2], runs[False][2])
