"""Training on CPU: loss falls on RusLit, tiered == resident, kill -9 and resume, the commands."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gmtier import config
from gmtier.train import Trainer, train

# The bundled corpus sits beside the checkout (../shared); GMTIER_RUSLIT points elsewhere (GPU machine).
RUSLIT = Path(os.environ.get("GMTIER_RUSLIT", Path(__file__).resolve().parents[2] / "shared" / "data" / "ruslit"))
if not RUSLIT.exists():
    RUSLIT = Path("../shared/data/ruslit").resolve()


def _tiered_available() -> bool:
    import gmtier._core

    return hasattr(gmtier._core, "ExpertStore")


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
needs_store = pytest.mark.skipif(not _tiered_available(), reason="gmtier._core.ExpertStore not built")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small RusLit subset: 400k characters of train, 40k of val, a 512-token vocabulary."""
    from gmtier.data import prepare

    out = tmp_path_factory.mktemp("ruslit")
    prepare(RUSLIT, out, vocab_size=512, max_train_chars=400_000, max_val_chars=40_000)
    return out


def tiny(data_dir, run_dir, **sections) -> config.Config:
    raw = {
        "model": dict(n_layer=2, n_head=2, d_model=64, d_ff=128, seq_len=32, n_experts=4, switch_every=1,
                      capacity_factor=1.25, router_jitter=0.0),
        "data": dict(dir=str(data_dir)),
        "train": dict(run_dir=str(run_dir), device="cpu", precision="fp32", steps=20, batch_size=8, lr=3e-3,
                      min_lr=3e-4, warmup_steps=4, log_every=1, eval_every=0, eval_batches=2, checkpoint_every=0),
        "experts": dict(mode="tiered", ram_budget=3 * 2 * 64 * 128 * 4 * 3 + 3 * 8192, io_threads=2, async_adam=False),
    }
    for section, values in sections.items():
        raw[section].update(values)
    return config.from_dict(raw)


def losses_of(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # being written
            continue
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def test_resident_loss_falls_and_checkpoint_round_trips(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "run", train=dict(steps=60, eval_every=60, checkpoint_every=30),
               experts=dict(mode="resident"))
    losses = train(cfg, log=lambda s: None)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert val and val[-1]["val_ppl"] == pytest.approx(math.exp(val[-1]["val_loss"]))
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 60
    assert [p.name for p in (tmp_path / "run").glob("ckpt-*")] == ["ckpt-60"]


def test_resume_continues_the_same_curve_in_process(data_dir, tmp_path):
    full = tiny(data_dir, tmp_path / "full", train=dict(steps=12), experts=dict(mode="resident"))
    ref = train(full, log=lambda s: None)
    part = tiny(data_dir, tmp_path / "part", train=dict(steps=12, checkpoint_every=5), experts=dict(mode="resident"))
    t = Trainer(part, log=lambda s: None)
    t.fit(until=7)  # stop after step 7: the last checkpoint is step 5
    t.close()
    t = Trainer(tiny(data_dir, tmp_path / "part", train=dict(steps=12, checkpoint_every=5), experts=dict(mode="resident")),
                resume=True, log=lambda s: None)
    assert t.step == 5
    rest = t.fit()
    assert rest == pytest.approx(ref[5:], abs=1e-6)


def test_existing_run_needs_resume_or_fresh(data_dir, tmp_path):
    from gmtier.checkpoint import CheckpointError

    cfg = tiny(data_dir, tmp_path / "run", train=dict(steps=2, checkpoint_every=2), experts=dict(mode="resident"))
    train(cfg, log=lambda s: None)
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer(cfg, log=lambda s: None)
    assert train(cfg, fresh=True, log=lambda s: None)


@needs_store
def test_tiered_matches_resident_with_every_step_paging(data_dir, tmp_path):
    """RAM budget of 3 records for 8 experts: experts are evicted and re-read every step."""
    res = train(tiny(data_dir, tmp_path / "res", experts=dict(mode="resident")), log=lambda s: None)
    tiered_small = train(tiny(data_dir, tmp_path / "small"), log=lambda s: None)
    assert tiered_small == pytest.approx(res, abs=2e-4)
    tiered_big = train(tiny(data_dir, tmp_path / "big", experts=dict(ram_budget="64MiB", async_adam=True)), log=lambda s: None)
    assert tiered_big == pytest.approx(tiered_small, abs=1e-5)
    m = [json.loads(l) for l in (tmp_path / "small" / "metrics.jsonl").read_text().splitlines()][-1]
    assert m["expert_updates"] > 0
    # The routing trace (what bench-paging --trace replays): one line per step, every Switch layer.
    from gmtier.bench.paging import load_routing_trace

    plan = load_routing_trace(tmp_path / "small" / "routing.jsonl")
    assert len(plan) == len(res) and all(len(step) == 2 for step in plan)
    assert all(0 <= e < 4 and layer in (0, 1) for step in plan for keys in step for layer, e in keys)


def test_padded_expert_gemms_match_unpadded(data_dir, tmp_path, monkeypatch):
    """experts.pad_rows rounds each expert's rows up with zero rows: same losses, padded GEMMs."""
    import gmtier.experts.bank

    plain = train(tiny(data_dir, tmp_path / "plain", train=dict(steps=6)), log=lambda s: None)
    rows, real = [], gmtier.experts.bank.expert_ffn
    for module in (gmtier.experts.bank,):
        monkeypatch.setattr(module, "expert_ffn", lambda x, w1, w2, out=None: (rows.append(x.shape[0]), real(x, w1, w2, out=out))[1])
    padded = train(tiny(data_dir, tmp_path / "padded", train=dict(steps=6), experts=dict(pad_rows=8)), log=lambda s: None)
    assert padded == pytest.approx(plain, abs=1e-6)
    assert rows and all(n % 8 == 0 for n in rows) and any(n > 0 for n in rows)
    rows.clear()  # the resident bank pads the same way
    resident = train(tiny(data_dir, tmp_path / "resident", train=dict(steps=6), experts=dict(mode="resident", pad_rows=8)),
                     log=lambda s: None)
    assert resident == pytest.approx(plain, abs=2e-4)
    assert rows and all(n % 8 == 0 for n in rows)


def test_gemm_row_layout():
    from gmtier.experts.bank import from_gemm_rows, gemm_row_layout, to_gemm_rows

    padded, rows = gemm_row_layout([3, 0, 5], 4, "cpu")
    assert padded == [4, 0, 8] and rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert gemm_row_layout([3, 0, 5], 1, "cpu") == ([3, 0, 5], None)
    x = torch.arange(8.0).repeat(2, 1).t()
    xp = to_gemm_rows(x, rows, 12)
    assert xp[3].tolist() == [0, 0] and xp[9:].abs().sum() == 0 and xp[4].tolist() == [3, 3]
    assert torch.equal(from_gemm_rows(xp, rows), x)
    cfg = tiny(Path("."), Path("."))
    assert cfg.experts.pad_rows == "auto" and cfg.expert_pad_rows() == 0  # CPU: nothing to gain
    for bad in (-1, "big"):
        with pytest.raises(config.ConfigError, match="pad_rows"):
            tiny(Path("."), Path("."), experts=dict(pad_rows=bad))


def _spawn_train(cfg_path: Path, *extra: str) -> subprocess.Popen:
    code = "import sys; from gmtier.commands import train; train(sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, "--config", str(cfg_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _toml_value(v) -> str:
    """JSON's spelling of a scalar or a list is TOML's; a table (data.corpora's entries) is inline."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def _write_toml(path: Path, cfg: config.Config) -> Path:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("mode", ["tiered", "resident"])
def test_sigkill_then_resume_matches_uninterrupted(data_dir, tmp_path, mode):
    if mode == "tiered" and not _tiered_available():
        pytest.skip("gmtier._core.ExpertStore not built")
    steps = 40
    ref_cfg = _write_toml(tmp_path / "ref.toml", tiny(data_dir, tmp_path / "ref", train=dict(steps=steps), experts=dict(mode=mode)))
    p = _spawn_train(ref_cfg)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out

    cfg = _write_toml(tmp_path / "run.toml", tiny(data_dir, tmp_path / "run", train=dict(steps=steps, checkpoint_every=10),
                                                   experts=dict(mode=mode)))
    p = _spawn_train(cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(losses_of(tmp_path / "run")) >= 15:
            break
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed:\n" + p.communicate()[0]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = max(losses_of(tmp_path / "run"))
    assert killed_at < steps

    p = _spawn_train(cfg, "--resume")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "resumed" in out
    ref, got = losses_of(tmp_path / "ref"), losses_of(tmp_path / "run")
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == pytest.approx([ref[s] for s in range(1, steps + 1)], abs=1e-6)


def test_sigterm_checkpoints_then_resume_matches_uninterrupted(data_dir, tmp_path):
    """SIGTERM (a preemption, `timeout`) mid-run: the step finishes, a checkpoint of that step is
    written although train.checkpoint_every never comes, the exit status is 143, and --resume
    gives the uninterrupted run's losses from the next step on."""
    steps = 40
    ref = train(tiny(data_dir, tmp_path / "ref", train=dict(steps=steps), experts=dict(mode="resident")),
                log=lambda s: None)
    cfg = _write_toml(tmp_path / "run.toml", tiny(data_dir, tmp_path / "run", train=dict(steps=steps, checkpoint_every=0),
                                                   experts=dict(mode="resident")))
    p = _spawn_train(cfg)
    deadline = time.time() + 240
    metrics = tmp_path / "run" / "metrics.jsonl"
    while time.time() < deadline and p.poll() is None and not (metrics.exists() and len(losses_of(tmp_path / "run")) >= 10):
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be stopped:\n" + p.communicate()[0]
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, out
    stopped_at = max(losses_of(tmp_path / "run"))
    assert 10 <= stopped_at < steps and f"step {stopped_at:6d} | stopped by SIGTERM" in out and "--resume" in out
    assert (tmp_path / "run" / f"ckpt-{stopped_at}").is_dir()

    p = _spawn_train(cfg, "--resume")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert f"resumed {tmp_path / 'run'} at step {stopped_at}" in out
    got = losses_of(tmp_path / "run")
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == pytest.approx(ref, abs=1e-6)


def test_commands_eval_generate_info(data_dir, tmp_path):
    from gmtier.commands import eval_, generate, info

    cfg = _write_toml(tmp_path / "c.toml", tiny(data_dir, tmp_path / "run", train=dict(steps=4, checkpoint_every=4),
                                                 experts=dict(mode="tiered" if _tiered_available() else "resident")))
    from gmtier.commands import train as train_cmd

    runner = CliRunner()
    r = runner.invoke(train_cmd, ["--config", str(cfg), "--set", "train.log_every=2"])
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.output
    r = runner.invoke(eval_, ["--run", str(tmp_path / "run"), "--batches", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["step"] == 4 and out["ppl"] == pytest.approx(math.exp(out["loss"]))
    text = tmp_path / "t.txt"
    text.write_text("Мой дядя самых честных правил, когда не в шутку занемог. " * 20, encoding="utf-8")
    r = runner.invoke(eval_, ["--run", str(tmp_path / "run"), "--text", str(text)])
    assert r.exit_code == 0 and "perplexity" in r.output, r.output
    r = runner.invoke(generate, ["--run", str(tmp_path / "run"), "--prompt", "Мой дядя", "--tokens", "5"])
    assert r.exit_code == 0 and r.output.startswith("Мой дядя"), r.output
    r = runner.invoke(info, ["--run", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["params_total"] > d["params_active_per_token"]
    r = runner.invoke(train_cmd, ["--config", str(cfg), "--set", "model.n_layers=3"])
    assert r.exit_code != 0 and "unknown key model.n_layers" in r.output


def test_dense_optimizer_offloaded_to_cpu_adam_matches_torch(data_dir, tmp_path):
    ref = train(tiny(data_dir, tmp_path / "a", train=dict(steps=8), experts=dict(mode="resident")), log=lambda s: None)
    got = train(tiny(data_dir, tmp_path / "b", train=dict(steps=8, dense_optimizer="cpu"), experts=dict(mode="resident")),
                log=lambda s: None)
    assert got == pytest.approx(ref, abs=1e-4)
    # and it checkpoints / resumes
    cfg = tiny(data_dir, tmp_path / "c", train=dict(steps=8, checkpoint_every=4, dense_optimizer="cpu"), experts=dict(mode="resident"))
    t = Trainer(cfg, log=lambda s: None)
    t.fit(until=4)
    t.close()
    t = Trainer(cfg, resume=True, log=lambda s: None)
    assert t.fit() == pytest.approx(got[4:], abs=1e-6)


def test_readme_main_command(tmp_path):
    """The README's first command (minus `pip install .`), shortened to a few steps."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "gmtier train --config configs/tiny.toml" in l)
    cmd = shlex.split(re.sub(r"^.*?&&\s*", "", line) if "&&" in line else line)
    assert cmd[:2] == ["gmtier", "train"]
    cmd += ["--set", f'train.run_dir="{tmp_path / "run"}"', "--set", "train.steps=4", "--set", "train.eval_every=2",
            "--set", "train.eval_batches=1", "--set", "train.log_every=2"]
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", "import sys; from gmtier.cli import main; main(sys.argv[1:])", *cmd[1:]],
                       cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "val ppl" in p.stdout and "tok/s" in p.stdout
    assert (tmp_path / "run" / "latest.json").exists()


@needs_store
def test_paging_reads_sections_and_writes_behind(data_dir, tmp_path):
    """RAM for 3 of 8 records: forward reads only the weights section, each updated record is
    written back right after its update (before any commit), so a step reads far less than two
    whole records per expert."""
    # Prefetch off: with 3 slots a read-ahead may be evicted before its use and read again.
    t = Trainer(tiny(data_dir, tmp_path / "run", experts=dict(prefetch=False)), log=lambda s: None)
    try:
        store, rt = t.runtime.store, t.runtime
        assert rt.write_behind and not rt.all_in_ram
        rt.metrics()
        steps, used = 3, 0
        for _ in range(steps):
            t.train_step(*t.train_data.batch(t.cfg.train.batch_size, t.cfg.model.seq_len, t.rng))
            used += sum(len(es) for es in rt.used.values())
        m = rt.metrics()
        deadline = time.monotonic() + 10  # the last write-behinds may still be running
        while store.metrics()["writebacks"] < used and time.monotonic() < deadline:
            time.sleep(0.01)
        core = store.metrics()
        assert core["section_reads"] > 0 and core["writebacks"] >= used and core["commits"] == 0
        assert m["disk_read_bytes"] <= used * (store.weights_bytes + store.record_bytes)
        assert m["disk_read_bytes"] < 2 * used * store.record_bytes
    finally:
        t.close()


@needs_store
@pytest.mark.parametrize("async_adam", [False, True])
def test_the_steps_last_write_backs_wait_for_its_updates(data_dir, tmp_path, async_adam):
    """experts.deferred_writes = 2: the first Switch layer's last two experts with tokens (the
    step's last updates) start their write-back only after every update of the step, every other
    record as its update ends; the losses and every record are those of writing each at once."""
    runs = {}
    for deferred in (2, 0):
        cfg = tiny(data_dir, tmp_path / f"run-{deferred}",
                   experts=dict(prefetch=False, async_adam=async_adam, deferred_writes=deferred))
        t = Trainer(cfg, log=lambda s: None)
        try:
            store, events = t.runtime.store, []
            assert t.runtime.write_behind and t.runtime.plan.deferred_writes == deferred
            adam_step, write_back = store.adam_step, store.write_back
            store.adam_step = lambda keys, *a, **kw: (events.append(("adam", list(keys))), adam_step(keys, *a, **kw))[1]
            store.write_back = lambda keys: (events.append(("write", list(keys))), write_back(keys))[1]
            losses, used = [], []
            for _ in range(3):
                events.append(("step", None))
                losses.append(t.train_step(*t.train_data.batch(cfg.train.batch_size, cfg.model.seq_len, t.rng))["loss"])
                used.append(list(t.runtime.used[0]))
            store.flush()
            records = [store.read_expert(layer, e) for layer in range(2) for e in range(cfg.model.n_experts)]
            runs[deferred] = losses, records
        finally:
            t.close()
        steps = [[]]
        for kind, keys in events[1:]:
            steps.append([]) if kind == "step" else steps[-1].append((kind, keys))
        for step, first_layer in zip(steps, used, strict=True):
            last_adam = max(i for i, (kind, _) in enumerate(step) if kind == "adam")
            writes = [(i, k) for i, (kind, keys) in enumerate(step) if kind == "write" for k in keys]
            after = sorted(k for i, k in writes if i > last_adam)
            assert len(first_layer) > 2 and any(k[0] == 1 for _, k in writes), step
            if deferred:
                assert after == [(0, e) for e in first_layer[-2:]], step
                assert any(k[0] == 0 and i < last_adam for i, k in writes), step  # the layer's first ones at once
            else:
                assert set(after) <= {(0, first_layer[-1])}, step  # only the last update's own write follows it
    assert runs[2][0] == runs[0][0]
    for a, b in zip(runs[2][1], runs[0][1], strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name


@needs_store
def test_reads_and_writes_taking_turns_train_as_together(data_dir, tmp_path, monkeypatch):
    """experts.read_write = "turns" (turns of one chunk here, so they switch at every record):
    the same losses and records as "together", with write-backs during the steps."""
    from gmtier.store import disk

    monkeypatch.setattr(disk, "TURN_BYTES", 4096)
    runs = {}
    for mode in ("turns", "together"):
        cfg = tiny(data_dir, tmp_path / mode, experts=dict(read_write=mode))
        t = Trainer(cfg, log=lambda s: None)
        try:
            assert t.runtime.read_write == mode and not t.runtime.plan.all_in_ram
            losses = [t.train_step(*t.train_data.batch(cfg.train.batch_size, cfg.model.seq_len, t.rng))["loss"]
                      for _ in range(4)]
            assert t.runtime.store.core.metrics()["writebacks"] > 0
            t.runtime.store.flush()
            runs[mode] = losses, [t.runtime.store.read_expert(layer, e) for layer in range(2) for e in range(4)]
        finally:
            t.close()
    assert runs["turns"][0] == runs["together"][0]
    for a, b in zip(runs["turns"][1], runs["together"][1], strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name


@needs_store
def test_read_write_auto_follows_the_disk_probe(data_dir, tmp_path, monkeypatch):
    """"auto" probes the store's disk when RAM cannot hold every record and takes its verdict
    (logged); where RAM holds every record it runs together without probing."""
    from gmtier.store import disk

    rates = {"read_gbps": 2.0, "write_gbps": 3.0, "together_gbps": 2.0, "turns_gbps": 2.4}
    for verdict, want in ((True, "turns"), (False, "together")):
        probed = []
        monkeypatch.setattr(disk, "read_write_turns",
                            lambda path, directory, threads: (probed.append(path), (verdict, rates))[1])
        lines = []
        t = Trainer(tiny(data_dir, tmp_path / want, experts=dict(read_write="auto")), log=lines.append)
        try:
            assert t.runtime.read_write == want and t.runtime.disk_rates == rates
            assert probed == [t.cfg.store_dir() / "experts.safetensors"]
            assert any(f"experts.read_write = auto: {want} (disk probe" in line for line in lines), lines
        finally:
            t.close()
    monkeypatch.setattr(disk, "read_write_turns", lambda *a, **k: pytest.fail("probed with every record in RAM"))
    t = Trainer(tiny(data_dir, tmp_path / "all-in-ram", experts=dict(ram_budget="64MiB", read_write="auto")),
                log=lambda s: None)
    try:
        assert t.runtime.plan.all_in_ram and t.runtime.read_write == "together"
    finally:
        t.close()


@needs_store
def test_forward_takes_the_experts_in_ram_first(data_dir, tmp_path):
    """RAM for 3 records of 8: a Switch layer's forward acquires the experts whose weights are in
    RAM before the others (in expert order the reads of the first ones would evict them), reads
    less, and trains to the same losses as the expert order."""
    runs = {}
    for reorder in (True, False):
        # no GPU tier (also where GMTIER_EMULATE_GPU_TIER=1 would emulate one): the forward reads weights from RAM
        cfg = tiny(data_dir, tmp_path / f"run-{reorder}", experts=dict(prefetch=False, gpu_budget="0"))
        t = Trainer(cfg, log=lambda s: None)
        try:
            store, rt, events = t.runtime.store, t.runtime, []
            pin, acquire = store.pin_resident, store.acquire

            def pin_logged(keys, sections="weights"):
                slots = pin(keys, sections) if reorder else [None] * len(keys)
                events.append(("held", {k for k, s in zip(keys, slots) if s is not None}))
                return slots

            store.pin_resident = pin_logged
            store.acquire = lambda key, **kw: (events.append(("acquire", tuple(key))), acquire(key, **kw))[1]
            losses, fwd_read = [], 0
            for _ in range(4):
                rt.metrics()
                losses.append(t.train_step(*t.train_data.batch(cfg.train.batch_size, cfg.model.seq_len, t.rng))["loss"])
                fwd_read += rt.metrics()["fwd_read_bytes"]
            runs[reorder] = losses, fwd_read
            if reorder:
                held = [(i, h) for i, (kind, h) in enumerate(events) if kind == "held" and h]
                assert held, events
                for i, h in held:
                    after = [k for kind, k in events[i + 1:] if kind == "acquire"][:len(h)]
                    assert set(after) == h, (h, after)
        finally:
            t.close()
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] < runs[False][1], runs


def test_deferred_writes_take_as_many_records_as_ram_has_slots():
    """auto: as many records as RAM has slots; none where RAM holds every record (it writes at
    the commit only); a bad value is refused by name."""
    seed = config.load(CONFIGS / "seed-envelope.toml", ["model.n_experts=8", 'experts.ram_budget="4GB"',
                                                      'experts.gpu_budget="2GB"', 'train.precision="bf16"'])
    p = seed.plan("cuda", gpu_tier=True)
    assert (p.ram_slots, p.deferred_writes) == (8, 8)
    roomy = config.load(CONFIGS / "seed-envelope.toml", ["model.n_experts=8", 'experts.ram_budget="64GB"'])
    assert roomy.plan("cuda", gpu_tier=True).all_in_ram and roomy.plan("cuda", gpu_tier=True).deferred_writes == 0
    with pytest.raises(config.ConfigError, match="experts.deferred_writes"):
        config.load(CONFIGS / "seed-envelope.toml", ["experts.deferred_writes=-1"])
    with pytest.raises(config.ConfigError, match="experts.read_write = 'both'.*\"turns\""):
        config.load(CONFIGS / "seed-envelope.toml", ['experts.read_write="both"'])


def test_each_expert_is_paged_once_in_forward_and_once_in_backward(data_dir, tmp_path):
    t = Trainer(tiny(data_dir, tmp_path / "run", train=dict(batch_size=16)), log=lambda s: None)
    try:
        calls = []
        acquire = t.runtime.store.acquire
        t.runtime.store.acquire = lambda key, **kw: (calls.append(tuple(key)), acquire(key, **kw))[1]
        x, y = t.train_data.batch(16, t.cfg.model.seq_len, t.rng)
        t.train_step(x, y)
        used = {(slot, e) for slot, es in t.runtime.used.items() for e in es}
        assert used and sorted(calls) == sorted(list(used) * 2)
        assert t.runtime.metrics()["expert_updates"] == len(used)
    finally:
        t.close()


@needs_store
def test_resume_with_a_different_model_is_refused(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "run", train=dict(steps=2, checkpoint_every=2))
    train(cfg, log=lambda s: None)
    with pytest.raises(config.ConfigError, match="--fresh"):
        Trainer(tiny(data_dir, tmp_path / "run", model=dict(n_experts=8), train=dict(steps=4)), resume=True, log=lambda s: None)


@needs_store
def test_evaluation_does_not_change_training(data_dir, tmp_path):
    """Validation between steps (tiered: it pages the experts' weights through the small RAM
    tier) leaves the training that follows as it would have been."""
    quiet = tiny(data_dir, tmp_path / "quiet", train=dict(steps=16, eval_every=0))
    evaluated = tiny(data_dir, tmp_path / "evaluated", train=dict(steps=16, eval_every=4))
    assert train(evaluated, log=lambda s: None) == train(quiet, log=lambda s: None)


def test_sigterm_handler_is_only_installed_while_training():
    from gmtier.train import StopOnSigterm

    before = signal.getsignal(signal.SIGTERM)
    with StopOnSigterm() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)  # the first one only asks
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) == (signal.SIG_DFL if before is None else before)
