"""The Python store API on CPU: round trips, commit/reopen, the safetensors view, clear errors."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from gmtier import _core
from gmtier.store import StoreError, TieredExpertStore

SCHEMA = [
    ("w1", "bf16", [16, 32], "weights"),
    ("w2", torch.bfloat16, [32, 16], "weights"),
    ("w1.master", "float32", [16, 32], "state"),
    ("step", "i64", [1], "state"),
]


def rand_expert(layer, expert, version=0):
    g = torch.Generator().manual_seed(layer * 1000 + expert * 10 + version)
    return {
        "w1": torch.randn(16, 32, generator=g).to(torch.bfloat16),
        "w2": torch.randn(32, 16, generator=g).to(torch.bfloat16),
        "w1.master": torch.randn(16, 32, generator=g),
        "step": torch.tensor([version], dtype=torch.int64),
    }


def same(a, b):
    return all(torch.equal(a[n], b[n]) for n in b)


@pytest.fixture
def store_dir(tmp_path):
    d = tmp_path / "store"
    TieredExpertStore.create(d, 2, 4, SCHEMA, init=rand_expert, user_meta='{"step": 0}')
    return d


def record_bytes(d):
    s = _core.ExpertStore.open(str(d), 1 << 20)
    rb = s.record_bytes
    s.close()
    return rb


def test_round_trip_commit_reopen(store_dir):
    rb = record_bytes(store_dir)
    with TieredExpertStore.open(store_dir, ram_bytes=3 * rb) as s:
        assert s.user_meta() == '{"step": 0}'
        for l in range(2):
            for e in range(4):
                assert same(s.read_expert(l, e), rand_expert(l, e))
        # Change every expert through the zero-copy views (3 slots: evictions write back).
        for l in range(2):
            for e in range(4):
                v = s.get([(l, e)])[0]
                for n, t in rand_expert(l, e, 1).items():
                    v[n].copy_(t)
                s.mark_dirty([(l, e)])
                s.release([(l, e)])
        assert s.metrics()["writebacks"] > 0
        s.commit('{"step": 1}')
        s.write_expert(0, 0, rand_expert(0, 0, 2))  # not committed
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        assert s.user_meta() == '{"step": 1}'
        for l in range(2):
            for e in range(4):
                assert same(s.read_expert(l, e), rand_expert(l, e, 1)), (l, e)


def test_safetensors_reads_the_file(store_dir):
    from safetensors import safe_open

    rb = record_bytes(store_dir)
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        s.write_expert(1, 2, rand_expert(1, 2, 5))
        s.commit("x")
    import json

    # The index maps each expert to its record slot; the file names the slots' tensors.
    committed = json.loads((store_dir / "index.json").read_text())["experts"]
    with safe_open(str(store_dir / "experts.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "gmtier-store" and f.metadata()["version"] == "2"
        assert committed[1 * 4 + 2][0] >= 8, "the changed record went to a spare slot"
        for n, t in rand_expert(1, 2, 5).items():
            assert torch.equal(f.get_tensor(f"slots.{committed[1 * 4 + 2][0]}.{n}"), t)
        assert torch.equal(f.get_tensor(f"slots.{committed[3][0]}.w1"), rand_expert(0, 3)["w1"])


def test_views_are_zero_copy_and_layout(store_dir):
    rb = record_bytes(store_dir)
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        assert [t.name for t in s.layout] == ["w1", "w2", "w1.master", "step"]
        assert s.weights_bytes == 4096 and s.record_bytes % 4096 == 0
        v = s.get([(0, 1)])[0]
        slot = s.core.request([(0, 1)]).wait()[0]
        assert v["w1"].data_ptr() == s.arena.data_ptr() + slot * s.record_bytes
        s.release([(0, 1)])  # duplicates in one call count once
        s.release([(0, 1)])
        w = s.acquire((0, 2))  # CPU: the GPU tier serves the RAM views of the weights
        assert set(w) == {"w1", "w2"} and torch.equal(w["w1"], rand_expert(0, 2)["w1"])
        s.release([(0, 2)])
        assert s.metrics()["pinned"] == 0


def test_concurrent_threads(store_dir):
    rb = record_bytes(store_dir)
    errors = []
    with TieredExpertStore.open(store_dir, ram_bytes=4 * rb, io_threads=3) as s:
        def worker(t):
            try:
                rng = np.random.default_rng(t)
                for _ in range(60):
                    keys = list({(int(rng.integers(2)), int(rng.integers(4))) for _ in range(2)})
                    views = s.get(keys, timeout=20)
                    for k, v in zip(keys, views):
                        assert torch.equal(v["w1"], rand_expert(*k)["w1"])
                    s.release(keys)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        m = s.metrics()
        assert m["pinned"] == 0 and m["resident"] <= 4


def test_bad_inputs(tmp_path, store_dir):
    rb = record_bytes(store_dir)
    with pytest.raises(ValueError, match="smaller than one expert record"):
        TieredExpertStore.open(store_dir, ram_bytes=rb - 1)
    with pytest.raises(FileNotFoundError, match="no expert store"):
        TieredExpertStore.open(tmp_path / "missing", ram_bytes=rb)
    with pytest.raises(ValueError, match="unknown dtype"):
        TieredExpertStore.create(tmp_path / "x", 1, 1, [("w", "f64", [2], "weights")])
    with pytest.raises(ValueError, match="unknown section"):
        TieredExpertStore.create(tmp_path / "x", 1, 1, [("w", "f32", [2], "gpu")])
    with pytest.raises(ValueError, match="already exists"):
        TieredExpertStore.create(store_dir, 1, 1, SCHEMA)
    with pytest.raises(ValueError, match="shape"):
        TieredExpertStore.create(tmp_path / "y", 1, 1, SCHEMA, init=lambda l, e: {"w1": torch.zeros(3, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=f"init\\(0, 0\\) failed: .*returned 3 bytes; a record is {rb} bytes"):
        TieredExpertStore.create(tmp_path / "y", 1, 1, SCHEMA, init=lambda l, e: b"abc")

    def fails_at_the_third(layer, expert):
        if (layer, expert) == (0, 2):
            raise RuntimeError("no more randomness")
        return bytes(rb)

    with pytest.raises(ValueError, match="init\\(0, 2\\) failed: .*no more randomness"):
        TieredExpertStore.create(tmp_path / "y", 1, 4, SCHEMA, init=fails_at_the_third)
    assert not (tmp_path / "y" / "experts.safetensors").exists()  # nothing half-made is left
    with pytest.raises(ValueError, match="not both"):
        _core.ExpertStore.create(str(tmp_path / "y"), 1, 1, SCHEMA, init=bytes, init_into=bytes)
    # A bytes-like record is taken as it is.
    TieredExpertStore.create(tmp_path / "z", 1, 2, SCHEMA, init=lambda l, e: bytes([e + 1]) * rb)
    with TieredExpertStore.open(tmp_path / "z", ram_bytes=2 * rb) as z:
        assert z.core.read_record(0, 1) == bytes([2]) * rb
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        with pytest.raises(ValueError, match="dtype"):
            s.write_expert(0, 0, {"w1": torch.zeros(16, 32)})
        with pytest.raises(ValueError, match="shape"):
            s.write_expert(0, 0, {"w1": torch.zeros(4, 4, dtype=torch.bfloat16)})
        with pytest.raises(ValueError, match="not in the record schema"):
            s.write_expert(0, 0, {"w3": torch.zeros(1)})
        with pytest.raises(ValueError, match="outside the store"):
            s.get([(5, 0)])
        with pytest.raises(ValueError, match="only 2 slots"):
            s.request([(0, 0), (0, 1), (0, 2)])
        with pytest.raises(ValueError, match="not pinned"):
            s.release([(0, 0)])
        with pytest.raises(ValueError, match="a record is 8192 bytes"):
            s.core.write_record(0, 0, b"abc")
        s.get([(0, 0), (0, 1)])
        with pytest.raises(TimeoutError, match="RAM slots are pinned"):
            s.get([(1, 1)], timeout=0.2)
        s.release([(0, 0), (0, 1)])


def committed_offset(store_dir, flat: int) -> int:
    """File offset of expert `flat`'s committed record: its record slot from index.json."""
    s = _core.ExpertStore.open(str(store_dir), record_bytes(store_dir))
    start, rb = s.data_start, s.record_bytes
    s.close()
    return start + json.loads((store_dir / "index.json").read_text())["experts"][flat][0] * rb


def test_truncated_and_corrupt_files(store_dir):
    rb = record_bytes(store_dir)
    data = store_dir / "experts.safetensors"
    # Flip bytes in the committed record of layer 1 expert 3.
    with open(data, "r+b") as f:
        f.seek(committed_offset(store_dir, 1 * 4 + 3) + 64)
        f.write(b"\xde\xad")
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        with pytest.raises(StoreError, match=r"checksum mismatch.*layer 1 expert 3"):
            s.read_expert(1, 3)
        assert same(s.read_expert(1, 2), rand_expert(1, 2))  # the rest still works
        assert s.metrics()["pinned"] == 0
    size = os.path.getsize(data)
    os.truncate(data, size - 4096)
    with pytest.raises(StoreError, match="truncated"):
        TieredExpertStore.open(store_dir, ram_bytes=2 * rb)
    os.truncate(data, 100)
    with pytest.raises(StoreError, match="header"):
        TieredExpertStore.open(store_dir, ram_bytes=2 * rb)


def test_disk_full_during_writeback_loses_nothing(tmp_path, store_dir):
    """Write-back past a file-size limit (RLIMIT_FSIZE, as a full disk would) fails with a clear
    OSError; the last commit stays readable."""
    rb = record_bytes(store_dir)
    code = textwrap.dedent(f"""
        import resource, signal, torch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from gmtier.store import TieredExpertStore
        s = TieredExpertStore.open({str(store_dir)!r}, ram_bytes={2 * rb})
        resource.setrlimit(resource.RLIMIT_FSIZE, ({rb * 4}, {rb * 4}))
        v = s.get([(1, 3)])[0]
        v["w1"].fill_(7)
        s.mark_dirty([(1, 3)])
        s.release([(1, 3)])
        try:
            s.commit("lost")
        except OSError as e:
            print("ERR", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERR" in out.stdout and "file size limit" in out.stdout and "last commit is intact" in out.stdout, out
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        assert s.user_meta() == '{"step": 0}'
        for l in range(2):
            for e in range(4):
                assert same(s.read_expert(l, e), rand_expert(l, e))


def test_slot_pool():
    p = _core.SlotPool(2)
    assert p.acquire((0, 0)) == (0, False, None)
    assert p.acquire((0, 1)) == (1, False, None)
    with pytest.raises(StoreError, match="all 2 slots are pinned"):
        p.acquire((0, 2))
    p.release((0, 0))
    assert p.acquire((0, 2)) == (0, False, (0, 0))
    assert p.lookup((0, 0)) is None and p.invalidate((0, 2))
    with pytest.raises(ValueError):
        _core.SlotPool(0)


def test_timed_out_ticket_stays_pending(store_dir):
    """A wait that times out keeps the ticket (and its pins): waiting again completes it."""
    rb = record_bytes(store_dir)
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        held = s.core.request([(0, 0), (0, 1)])
        held.wait()
        ticket = s.core.request([(1, 3)])
        with pytest.raises(TimeoutError, match="RAM slots are pinned"):
            ticket.wait(0.05)
        threading.Timer(0.1, s.core.release, args=([(0, 0)],)).start()
        (slot,) = ticket.wait(10)
        assert same({n: t.clone() for n, t in s.slot_views(slot).items()}, rand_expert(1, 3))
        s.core.release([(0, 1), (1, 3)])


def wait_for(pred, timeout=10.0):
    import time

    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.001)


def test_write_back_is_eager_and_async(store_dir):
    """write_back starts a dirty record's write now (while still pinned); eviction then writes nothing."""
    rb = record_bytes(store_dir)
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        v = s.get([(0, 1)])[0]
        for n, t in rand_expert(0, 1, 3).items():
            v[n].copy_(t)
        s.mark_dirty([(0, 1)])
        s.write_back([(0, 1), (1, 2)])  # (1, 2) is not resident: ignored
        wait_for(lambda: s.metrics()["writebacks"] == 1)
        s.release([(0, 1)])
        for e in (0, 2, 3):
            s.read_expert(0, e)  # evicts (0, 1): clean already
        assert s.metrics()["writebacks"] == 1
        s.commit("wb")
        assert s.metrics()["writebacks"] == 1
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        assert same(s.read_expert(0, 1), rand_expert(0, 1, 3))


def test_section_requests(store_dir):
    """weights-only then state reads equal a whole read; only the missing section is read."""
    rb = record_bytes(store_dir)
    wb = 4096
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        t = s.request([(1, 2)], sections="weights")
        assert t.sections == "weights"
        (v,) = s.wait(t)
        assert set(v) == {"w1", "w2"}  # only the valid section's views
        (slot,) = s.core.request([(1, 2)], 0, "weights").wait()
        assert s.slot_sections(slot) == ["weights"]
        m = s.metrics()
        assert (m["bytes_read"], m["section_reads"]) == (wb, 1)
        with pytest.raises(ValueError, match="holds only its weights section"):
            s.mark_dirty([(1, 2)])
        (v,) = s.get([(1, 2)])  # the whole record: only the state is read
        assert s.slot_sections(slot) == ["weights", "state"]
        assert s.metrics()["bytes_read"] == rb and s.metrics()["section_reads"] == 2
        assert same({n: t.clone() for n, t in v.items()}, rand_expert(1, 2))
        s.release([(1, 2)])
        s.release([(1, 2)])
        s.release([(1, 2)])
        # State first, then weights, against a whole read of the same record.
        (v,) = s.wait(s.request([(0, 3)], sections="state"))
        assert set(v) == {"w1.master", "step"}
        state = {n: t.clone() for n, t in v.items()}
        (w,) = s.wait(s.request([(0, 3)], sections="weights"))
        s.release([(0, 3)])
        s.release([(0, 3)])
        assert same({**state, **{n: t.clone() for n, t in w.items()}}, rand_expert(0, 3))
        s.prefetch([(0, 0)], 1, sections="weights")
        with pytest.raises(ValueError, match='sections must be "all", "weights" or "state"'):
            s.request([(0, 0)], sections="bias")
        with pytest.raises(ValueError, match="sections must be"):
            s.prefetch([(0, 0)], sections="")
        wait_for(lambda: s.metrics()["pinned"] == 0)


def test_corrupt_state_section(store_dir):
    """One flipped byte in the state section: state and whole reads fail, a weights read works."""
    rb = record_bytes(store_dir)
    with open(store_dir / "experts.safetensors", "r+b") as f:
        f.seek(committed_offset(store_dir, 1 * 4 + 1) + 4096 + 10)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        (w,) = s.wait(s.request([(1, 1)], sections="weights"))
        assert torch.equal(w["w1"], rand_expert(1, 1)["w1"])
        with pytest.raises(StoreError, match=r"checksum mismatch.*layer 1 expert 1.*state section"):
            s.wait(s.request([(1, 1)], sections="state"))
        s.release([(1, 1)])
        with pytest.raises(StoreError, match=r"checksum mismatch.*layer 1 expert 1"):
            s.read_expert(1, 1)
        assert s.metrics()["pinned"] == 0


def test_index_without_section_crcs(store_dir):
    """An index written before section reads (no section_crcs) opens; section requests read the
    whole (verified) record."""
    import json

    rb = record_bytes(store_dir)
    p = store_dir / "index.json"
    idx = json.loads(p.read_text())
    del idx["section_crcs"]
    p.write_text(json.dumps(idx))
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        (v,) = s.wait(s.request([(0, 2)], sections="weights"))
        assert s.metrics()["bytes_read"] == rb and s.metrics()["section_reads"] == 0
        assert same({n: t.clone() for n, t in v.items()}, rand_expert(0, 2))  # whole record valid
        s.release([(0, 2)])
        s.write_expert(1, 0, rand_expert(1, 0, 4))
        s.commit("new")
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        (v,) = s.wait(s.request([(1, 0)], sections="state"))
        assert s.metrics()["bytes_read"] == 4096
        assert torch.equal(v["w1.master"], rand_expert(1, 0, 4)["w1.master"])
        s.release([(1, 0)])


def test_state_read_then_filled_weights_round_trip(store_dir):
    """Backward of a half-precision expert: read only the state, rewrite the weights from the
    master (as the AdamW does), mark_dirty(filled="weights"): the new record persists whole."""
    rb = record_bytes(store_dir)
    new = rand_expert(1, 1, version=7)
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        (slot,) = s.core.request([(1, 1)], 0, "state").wait()
        assert s.slot_sections(slot) == ["state"]
        for name, view in s.slot_views(slot).items():
            view.copy_(new[name])
        s.mark_dirty([(1, 1)], filled="weights")
        assert s.slot_sections(slot) == ["weights", "state"]
        assert s.metrics()["bytes_read"] == rb - 4096  # the weights section was never read
        s.release([(1, 1)])
        s.commit('{"step": 1}')
    with TieredExpertStore.open(store_dir, ram_bytes=2 * rb) as s:
        assert same(s.read_expert(1, 1), new)
        with pytest.raises(ValueError, match="sections must be"):
            s.core.mark_dirty([(1, 1)], "bias")


def test_a_store_without_its_index_is_refused_and_left_untouched(store_dir):
    """Issue 14 item 1: a missing index.json never re-creates the store, here or through the
    expert runtime; the data file stays byte for byte."""
    from gmtier import config
    from gmtier.experts import ExpertRuntime
    from gmtier.store import StoreIndexMissingError

    data = store_dir / "experts.safetensors"
    before = data.read_bytes()
    (store_dir / "index.json").unlink()
    with pytest.raises(StoreIndexMissingError, match=r"index.json is missing.*left untouched.*[Rr]estore"):
        TieredExpertStore.open(store_dir, ram_bytes=1 << 20)
    cfg = config.load("configs/tiny.toml", [f'experts.store_dir="{store_dir}"'])
    with pytest.raises(StoreError, match=r"index.json is missing"):
        ExpertRuntime(cfg, "cpu", log=lambda s: None)
    assert data.read_bytes() == before and not (store_dir / "index.json").exists()


def test_create_over_a_store_needs_overwrite(tmp_path):
    from gmtier import config
    from gmtier.experts import ExpertRuntime
    from gmtier.store import StoreExistsError

    cfg = config.load("configs/tiny.toml", [f'experts.store_dir="{tmp_path / "store"}"'])
    ExpertRuntime(cfg, "cpu", create=True, log=lambda s: None).close()
    data = tmp_path / "store" / "experts.safetensors"
    before = data.read_bytes()
    with pytest.raises(StoreExistsError, match="already exists as an expert store.*--fresh"):
        ExpertRuntime(cfg, "cpu", create=True, log=lambda s: None)
    assert data.read_bytes() == before
    (tmp_path / "store" / "index.json").unlink()  # the data file alone is a store too
    with pytest.raises(StoreExistsError):
        ExpertRuntime(cfg, "cpu", create=True, log=lambda s: None)
    rt = ExpertRuntime(cfg, "cpu", create=True, overwrite=True, log=lambda s: None)
    assert rt.committed_step() == 0
    rt.close()
