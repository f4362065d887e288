"""Issue 14 end to end through the CLI on the tiny config: a trained store is never deleted or
mixed up, a run directory is self-contained and locked, and every bad input ends in one line
that names the problem (no traceback)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gmtier.cli import main
from test_train import RUSLIT, _tiered_available, _write_toml, data_dir, losses_of, tiny  # noqa: F401  (fixture)

needs_store = pytest.mark.skipif(not _tiered_available(), reason="gmtier._core.ExpertStore not built")
MODE = "tiered" if _tiered_available() else "resident"


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(r) -> str:
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


def user_error(r, *needles: str) -> str:
    """A refusal: exit code != 0 from a ClickException (not an escaped exception), one error
    line, no traceback, each needle named in it."""
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), f"escaped {r.exception!r}\n{r.output}"
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, r.output
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def toml_for(tmp_path: Path, data_dir, run_dir: Path, name: str = "c.toml", **sections) -> Path:
    sections.setdefault("experts", {}).setdefault("mode", MODE)
    train = dict(steps=2, checkpoint_every=2, log_every=1)
    train.update(sections.pop("train", {}))
    return _write_toml(tmp_path / name, tiny(data_dir, run_dir, train=train, **sections))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A tiny run trained 2 steps (checkpoint at step 2); tests copy it."""
    base = tmp_path_factory.mktemp("trained")
    ok(cli("train", "--config", toml_for(base, data_dir, base / "run")))
    return base / "run"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run, as if it had been trained where it now lies."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw["train"]["run_dir"] = str(dst)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


_HOLD = """
import sys
from gmtier import config
from gmtier.train import Trainer
trainer = Trainer(config.load(sys.argv[1]), resume=True, log=lambda s: None)
print("ready", flush=True)
sys.stdin.read()
trainer.close()
"""


class Holder:
    """Another process holding a run open for training (its lock and its store) until closed."""

    def __init__(self, cfg_path: Path):
        self.p = subprocess.Popen([sys.executable, "-c", _HOLD, str(cfg_path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.p.stdout.readline()
        assert line.strip() == "ready", line + self.p.stdout.read()

    def __enter__(self):
        return self.p.pid

    def __exit__(self, *exc):
        self.p.stdin.close()
        assert self.p.wait(timeout=60) == 0, self.p.stdout.read()


def _digest(path: Path) -> bytes:
    import hashlib

    return hashlib.sha256(path.read_bytes()).digest()


# ---- 1. a missing index.json never re-creates the store ------------------------------------------
@needs_store
def test_missing_index_keeps_the_trained_experts(run, data_dir, tmp_path):
    (run / "store" / "index.json").unlink()
    data = run / "store" / "experts.safetensors"
    before = _digest(data)
    user_error(cli("eval", "--run", run, "--batches", "1"), "index.json")
    user_error(cli("generate", "--run", run, "--tokens", "2"), "index.json")
    user_error(cli("train", "--config", toml_for(tmp_path, data_dir, run, train=dict(steps=4)), "--resume"), "index.json")
    assert _digest(data) == before and not (run / "store" / "index.json").exists()


# ---- 2. a run directory is self-contained -----------------------------------------------------------
def test_moved_run_evaluates_its_own_store(run, tmp_path):
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    run.rename(moved)
    out = json.loads(ok(cli("eval", "--run", moved, "--batches", "1", "--json")))
    assert out["step"] == 2
    assert not run.exists()  # nothing created where the run used to be
    ok(cli("generate", "--run", moved, "--tokens", "2"))
    assert not run.exists()


@needs_store
def test_copy_with_another_copys_store_is_refused(run, data_dir, tmp_path):
    backup = tmp_path / "backup"
    shutil.copytree(run, backup)  # a backup at step 2; the run goes on to step 4
    ok(cli("train", "--config", toml_for(tmp_path, data_dir, run, train=dict(steps=4)), "--resume"))
    assert json.loads(ok(cli("eval", "--run", backup, "--batches", "1", "--json")))["step"] == 2
    assert json.loads(ok(cli("eval", "--run", run, "--batches", "1", "--json")))["step"] == 4
    shutil.rmtree(backup / "store")
    shutil.copytree(run / "store", backup / "store")  # step-4 experts beside step-2 dense weights
    user_error(cli("eval", "--run", backup, "--batches", "1"), "step 4", "step 2")
    user_error(cli("generate", "--run", backup, "--tokens", "2"), "step 4", "step 2")


# ---- 3 and 4. a refused resume leaves the run as it was; what may change ------------------------------
@pytest.mark.parametrize("key, old, new", [("model.d_ff", 128, 96), ("model.n_head", 2, 4), ("model.vocab_size", 512, 1024)])
def test_resume_with_another_model_is_refused_naming_the_key(run, data_dir, tmp_path, key, old, new):
    config_json = (run / "config.json").read_bytes()
    cfg = toml_for(tmp_path, data_dir, run, train=dict(steps=4))
    user_error(cli("train", "--config", cfg, "--resume", "--set", f"{key}={new}"), key, str(old), str(new), "--fresh")
    assert (run / "config.json").read_bytes() == config_json
    assert json.loads(ok(cli("eval", "--run", run, "--batches", "1", "--json")))["step"] == 2


def test_resume_may_change_steps_schedule_eval_and_budgets(run, data_dir, tmp_path):
    cfg = toml_for(tmp_path, data_dir, run, train=dict(steps=4, lr=1e-3, warmup_steps=1, eval_every=4, log_every=2),
                   experts=dict(ram_budget="64MiB"))
    out = ok(cli("train", "--config", cfg, "--resume"))
    assert "resumed" in out and "at step 2" in out
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4  # written once accepted


# ---- 5. one trainer per run directory -------------------------------------------------------------------
def test_second_trainer_is_refused_naming_the_holder(run, data_dir, tmp_path):
    cfg_path = toml_for(tmp_path, data_dir, run, train=dict(steps=4))
    with Holder(cfg_path) as pid:
        metrics = (run / "metrics.jsonl").read_bytes()
        user_error(cli("train", "--config", cfg_path, "--resume"), f"process {pid}", str(run))
        user_error(cli("train", "--config", cfg_path, "--fresh"), f"process {pid}")  # --fresh deletes nothing
        assert (run / "metrics.jsonl").read_bytes() == metrics and (run / "latest.json").exists()
    assert "resumed" in ok(cli("train", "--config", cfg_path, "--resume"))


@needs_store
def test_store_open_for_training_is_refused_to_a_second_process(run, data_dir, tmp_path):
    """The Rust store lock: eval while a trainer holds the store names the holder."""
    with Holder(toml_for(tmp_path, data_dir, run, train=dict(steps=4))) as pid:
        user_error(cli("eval", "--run", run, "--batches", "1"), str(pid))


# ---- 6. bad inputs: one line naming the problem ------------------------------------------------------------
def _store_header_end(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _corrupt_records(store: Path):
    data = store / "experts.safetensors"
    start, size = _store_header_end(data), data.stat().st_size
    with open(data, "r+b") as f:
        for off in range(start, size, 1024):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))


def _truncate(store: Path):
    data = store / "experts.safetensors"
    os.truncate(data, data.stat().st_size // 2)


def _bad_header(store: Path):
    with open(store / "experts.safetensors", "r+b") as f:
        f.seek(9)
        f.write(b"\x00garbage\x00" * 4)


def _bad_index(store: Path):
    (store / "index.json").write_text("{ not json")


def _meta_not_json(store: Path):
    index = json.loads((store / "index.json").read_text())
    index["user_meta"] = "step: two"
    (store / "index.json").write_text(json.dumps(index))


def _no_data_file(store: Path):
    (store / "experts.safetensors").unlink()


@needs_store
@pytest.mark.parametrize("damage, needle", [(_corrupt_records, "experts.safetensors"), (_truncate, "experts.safetensors"),
                                            (_bad_header, "experts.safetensors"), (_bad_index, "index.json"),
                                            (_meta_not_json, "index.json"), (_no_data_file, "experts.safetensors")])
def test_a_damaged_store_is_named_in_one_line(run, damage, needle):
    damage(run / "store")
    user_error(cli("eval", "--run", run), needle)


def test_disk_full_at_checkpoint_names_the_file_and_keeps_the_previous(data_dir, tmp_path, monkeypatch):
    import gmtier.checkpoint

    real, calls = gmtier.checkpoint.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) > 2:  # the second checkpoint's model.safetensors
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(gmtier.checkpoint, "save_file", save_file)
    cfg = toml_for(tmp_path, data_dir, tmp_path / "run", train=dict(steps=4))
    user_error(cli("train", "--config", cfg, "--set", "train.checkpoint_every=2"), "model.safetensors", "no space left")
    monkeypatch.setattr(gmtier.checkpoint, "save_file", real)
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 2
    assert "at step 2" in ok(cli("train", "--config", cfg, "--set", "train.checkpoint_every=2", "--resume"))


@needs_store
def test_disk_full_at_store_creation_names_the_file(data_dir, tmp_path, monkeypatch):
    from gmtier.store import TieredExpertStore

    def create(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "experts.safetensors"))

    monkeypatch.setattr(TieredExpertStore, "create", staticmethod(create))
    user_error(cli("train", "--config", toml_for(tmp_path, data_dir, tmp_path / "run")), "experts.safetensors", "no space left")


def test_non_utf8_text_is_named(run, tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "train.txt").write_bytes("Мой дядя".encode("cp1251") * 100)
    (src / "val.txt").write_text("Мой дядя самых честных правил", encoding="utf-8")
    user_error(cli("prepare", "--source", src, "--out", tmp_path / "prep", "--vocab-size", 300), "train.txt", "UTF-8")
    user_error(cli("eval", "--run", run, "--text", src / "train.txt"), "train.txt", "UTF-8")


def test_bad_eval_and_generate_arguments(run, tmp_path):
    user_error(cli("eval", "--run", run, "--text", tmp_path / "missing.txt"), "missing.txt")
    user_error(cli("eval", "--run", run, "--split", "test"), "'test'", "val")
    user_error(cli("eval", "--run", tmp_path / "no-run"), "no-run")
    user_error(cli("generate", "--run", run, "--top-k", "-3"), "--top-k")
    user_error(cli("generate", "--run", run, "--tokens", "-5"), "--tokens")
    user_error(cli("generate", "--run", run, "--temperature", "-1"), "--temperature")


def test_an_unexpected_error_keeps_its_traceback(run, monkeypatch):
    import gmtier.evaluate

    def load_run(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(gmtier.evaluate, "load_run", load_run)
    r = cli("eval", "--run", run)
    assert r.exit_code != 0 and isinstance(r.exception, RuntimeError)


@pytest.mark.parametrize("setting, needle", [("train.device=\"tpu\"", "train.device"),
                                             ("experts.gpu_budget=-1", "experts.gpu_budget"),
                                             ("model.n_layers=3", "model.n_layers")])
def test_bad_config_values(data_dir, tmp_path, setting, needle):
    user_error(cli("train", "--config", toml_for(tmp_path, data_dir, tmp_path / "run"), "--set", setting), needle)
    assert not (tmp_path / "run" / "latest.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_missing_is_said_first(data_dir, tmp_path):
    # A GPU budget too small for the tiny experts: CUDA's absence must be the complaint.
    user_error(cli("train", "--config", toml_for(tmp_path, data_dir, tmp_path / "run"), "--set", "train.device=\"cuda\"",
                   "--set", "experts.gpu_budget=1"), "CUDA")


# ---- 7. found at start -----------------------------------------------------------------------------------
def test_short_validation_split_is_refused_before_training(tmp_path):
    from gmtier.data import prepare

    short = tmp_path / "short"
    prepare(RUSLIT, short, vocab_size=300, max_train_chars=50_000, max_val_chars=200)
    cfg = toml_for(tmp_path, short, tmp_path / "run", train=dict(steps=4, eval_every=2, batch_size=8))
    user_error(cli("train", "--config", cfg), "val split", "batch")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "config.json").exists()


def test_empty_corpus_is_refused(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "train.txt").write_text("  \n")
    (src / "val.txt").write_text("some text")
    user_error(cli("prepare", "--source", src, "--out", tmp_path / "prep", "--vocab-size", 300), "train.txt", "no text")
    assert not (tmp_path / "prep" / "meta.json").exists()


def test_validation_perplexities_say_what_they_cover(run, data_dir, tmp_path):
    cfg = toml_for(tmp_path, data_dir, run, train=dict(steps=4, eval_every=4, eval_batches=1))
    out = ok(cli("train", "--config", cfg, "--resume"))
    assert "val ppl" in out and "first 1 batches of val" in out
    assert "the whole split" in ok(cli("eval", "--run", run))
    assert "the first 1 batches" in ok(cli("eval", "--run", run, "--batches", "1"))


# ---- kill -9 between the store commit and latest.json ------------------------------------------------
_KILL_AFTER_COMMIT = """
import os, signal, sys
import gmtier.checkpoint as ckpt
from gmtier.commands import train

real = ckpt.write_json
def write_json(path, obj):
    if path.name == "latest.json" and obj["step"] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # the store is committed at this step; latest.json is not
    real(path, obj)
ckpt.write_json = write_json
train(sys.argv[1:])
"""


@needs_store
def test_sigkill_between_store_commit_and_latest_json_resumes_from_the_store(data_dir, tmp_path):
    steps = 30
    ref = toml_for(tmp_path, data_dir, tmp_path / "ref", "ref.toml", train=dict(steps=steps, checkpoint_every=0))
    ok(cli("train", "--config", ref))
    cfg = toml_for(tmp_path, data_dir, tmp_path / "run", "run.toml", train=dict(steps=steps, checkpoint_every=10))
    p = subprocess.run([sys.executable, "-c", _KILL_AFTER_COMMIT, "--config", str(cfg)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "KILL_AT": "20"})
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 10
    out = ok(cli("train", "--config", cfg, "--resume"))
    assert "at step 20" in out
    got, want = losses_of(tmp_path / "run"), losses_of(tmp_path / "ref")
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(got)], abs=1e-6)
