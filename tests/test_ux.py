"""Issue 19, what a new user meets: progress bars only where a person watches (stdout a terminal),
`gmtier plot`, TensorBoard logging, `gmtier info --json`, and that CI's tests ran in its venv."""

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gmtier import progress
from gmtier.cli import main
from test_reliability import ok, toml_for, user_error
from test_train import data_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- progress: one rule, stdout a terminal ---------------------------------------------------------
def test_progress_is_off_when_stdout_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV)
    assert not sys.stdout.isatty()  # pytest captures it
    assert not progress.interactive()
    with progress.bar(total=3, desc="work") as b:
        assert b.disable
        b.update(3)
    assert capsys.readouterr().err == ""


def test_progress_is_on_when_stdout_is_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV)
    leader, follower = pty.openpty()
    with open(follower, "w") as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        assert progress.interactive()
        with progress.bar(total=3, desc="work", mininterval=0) as b:
            assert not b.disable
            b.update(3)
    os.close(leader)
    err = capsys.readouterr().err
    assert "work" in err and "3/3" in err  # drawn on stderr, not on the terminal's stdout


def test_progress_can_be_forced(monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.interactive()
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.interactive()


def test_counted_advances_once_per_call(monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")  # a disabled bar counts nothing
    with progress.bar(total=4) as b:
        f = progress.counted(lambda layer, expert: layer + expert, b)
        assert [f(0, e) for e in range(4)] == [0, 1, 2, 3]
        assert b.n == 4


def _train_cmd(cfg_path, *extra):
    return [sys.executable, "-c", "import sys; from gmtier.cli import main; main(sys.argv[1:])",
            "train", "--config", str(cfg_path), *extra]


def test_training_shows_one_bar_in_a_terminal_and_log_lines_elsewhere(data_dir, tmp_path):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    # Not a terminal (a pipe): the log lines of today, no bar.
    cfg = toml_for(tmp_path, data_dir, tmp_path / "piped", train=dict(steps=4, log_every=2, checkpoint_every=4))
    p = subprocess.run(_train_cmd(cfg), capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "step      2/4 | loss" in p.stdout and "step      4/4 | loss" in p.stdout and "done:" in p.stdout
    assert "\r" not in p.stderr and "it/s" not in p.stderr and "step/s" not in p.stderr

    # A terminal: stdout on a pty; the bar (steps, tok/s, loss, ETA) on stderr replaces the step lines.
    cfg = toml_for(tmp_path, data_dir, tmp_path / "tty", name="t.toml", train=dict(steps=4, log_every=2, checkpoint_every=4))
    leader, follower = pty.openpty()
    p = subprocess.run(_train_cmd(cfg), stdout=follower, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: the pty is drained and closed
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    out = out.decode()
    assert p.returncode == 0, out + p.stderr
    assert "| loss" not in out and "done:" in out and "checkpoint" in out
    assert "training" in p.stderr and "tok/s" in p.stderr and "loss" in p.stderr and "4/4" in p.stderr
    assert "creating expert store" in p.stderr


# ---- gmtier plot -------------------------------------------------------------------------------------
def _fake_run(path: Path, loss0: float) -> Path:
    """A run directory as training leaves it, as far as plot reads it: config.json, metrics.jsonl."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"train": {"batch_size": 8}, "model": {"seq_len": 32}}))
    lines = []
    for step in range(10, 110, 10):
        lines.append({"step": step, "loss": loss0 - step / 50, "lr": 1e-3, "tokens_per_s": 1000 + step,
                      "wall_s": step / 10, "ram_hit_rate": 0.5 + step / 400, "gpu_hit_rate": 0.9})
        if step % 50 == 0:
            lines.append({"step": step, "val_loss": loss0 - step / 60, "val_ppl": 100.0, "val_batches": 4, "wall_s": step / 10 + 0.5})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_plot_writes_a_png_of_the_asked_size_with_each_runs_curves(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    import numpy as np

    a, b = _fake_run(tmp_path / "switch", 7.0), _fake_run(tmp_path / "dense", 6.5)
    out = tmp_path / "plots" / "runs.png"
    r = ok(cli("plot", a, b, "--out", out, "--width", 1200, "--height", 700))
    assert str(out) in r
    img = matplotlib.image.imread(out)[..., :3]
    assert img.shape[:2] == (700, 1200)
    assert (img < 0.99).any(axis=-1).mean() > 0.02, "the figure is blank"
    for color in ("#1f77b4", "#ff7f0e"):  # C0, C1: one colour per run, curves drawn in both
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)]) / 255
        assert (np.abs(img - rgb).max(axis=-1) < 0.02).sum() > 500, f"no {color} curves"


def test_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    user_error(cli("plot", _fake_run(tmp_path / "r", 7.0), "--out", tmp_path / "p.png"), 'pip install "gmtier[plot]"')


def test_plot_of_a_directory_that_is_no_run_is_one_line(tmp_path):
    user_error(cli("plot", tmp_path, "--out", tmp_path / "p.png"), "no config.json")


# ---- TensorBoard ---------------------------------------------------------------------------------------
def test_tensorboard_writes_the_metrics_as_scalars(data_dir, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    ok(cli("train", "--config", toml_for(tmp_path, data_dir, run, train=dict(steps=2, eval_every=2, tensorboard=True))))
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "wall_s", "val_loss", "val_ppl"} <= tags
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in metrics if "loss" in r])


def test_tensorboard_missing_is_one_line_before_any_step(data_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = tmp_path / "run"
    user_error(cli("train", "--config", toml_for(tmp_path, data_dir, run, train=dict(tensorboard=True))),
               'pip install "gmtier[tensorboard]"')
    assert not (run / "metrics.jsonl").exists() and not (run / "store").exists()


def test_tensorboard_must_be_a_boolean(data_dir, tmp_path):  # noqa: F811
    user_error(cli("train", "--config", toml_for(tmp_path, data_dir, tmp_path / "run"), "--set", "train.tensorboard=1"),
               "train.tensorboard")


# ---- gmtier info --json ------------------------------------------------------------------------------
def test_info_json_is_one_json_object():
    r = CliRunner().invoke(main, ["info", "--config", str(ROOT / "configs" / "tiny.toml"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert isinstance(d, dict)
    assert d["params_total"] > d["params_active_per_token"] > 0 and d["experts"] == 16
    assert d["ram_slots"] == d["ram_budget_bytes"] // d["expert_record_bytes"]


# ---- CI: the README's test command ran in the venv it installed into ------------------------------------
@pytest.mark.skipif(not os.environ.get("GMTIER_EXPECT_PREFIX"), reason="set by .ci/run to its venv")
def test_runs_in_the_venv_that_installed_gmtier():
    import gmtier

    venv = Path(os.environ["GMTIER_EXPECT_PREFIX"]).resolve()
    assert Path(sys.prefix).resolve() == venv, f"python -m pytest ran {sys.executable}, not the venv's"
    assert venv in Path(gmtier.__file__).resolve().parents, f"gmtier imported from {gmtier.__file__}"
