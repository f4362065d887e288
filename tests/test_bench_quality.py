"""bench-quality: the comparison arithmetic on curves made by hand, the twin checks, and a whole
tiny run (Switch and dense, a few steps on CPU) through the command."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gmtier import config
from gmtier.bench import quality
from gmtier.cli import main
from test_train import _write_toml, data_dir, tiny  # noqa: F401  (data_dir is a fixture)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _curve(rows):
    return [{"step": s, "wall_s": w, "val_loss": l} for s, w, l in rows]


def test_interpolation_and_first_reach():
    c = _curve([(0, 0.0, 8.0), (10, 4.0, 6.0), (20, 8.0, 5.0)])
    assert quality.interpolate(c, "wall_s", 2.0) == pytest.approx(7.0)
    assert quality.interpolate(c, "step", 20) == 5.0
    assert quality.interpolate(c, "wall_s", 9.0) is None  # the run had stopped
    assert quality.first_reach(c, 5.5) == {"step": pytest.approx(15.0), "wall_s": pytest.approx(6.0)}
    assert quality.first_reach(c, 4.0) is None


def test_compare_at_equal_steps_and_time():
    switch = _curve([(0, 0.0, 8.0), (10, 4.0, 5.0), (20, 8.0, 4.0)])  # slower a step, better at equal steps
    dense = _curve([(0, 0.0, 8.0), (10, 1.0, 6.0), (20, 2.0, 5.5)])
    r = quality.compare(switch, dense)
    assert [(p["step"], p["switch"], p["dense"]) for p in r["equal_steps"]] == [(0, 8.0, 8.0), (10, 5.0, 6.0), (20, 4.0, 5.5)]
    at = {p["wall_s"]: p for p in r["equal_time"]}
    assert sorted(at) == [1.0, 2.0, 4.0, 8.0]
    assert at[2.0]["switch"] == pytest.approx(6.5) and at[2.0]["dense"] == 5.5
    assert at[4.0]["dense"] is None and at[4.0]["switch"] == 5.0
    # The dense final loss 5.5: the Switch curve falls from 8.0 (step 0, 0 s) to 5.0 (step 10, 4 s),
    # passing 5.5 at 2.5/3 of the way: step 25/3, 10/3 s.
    assert r["switch_reaches_dense_final"]["step"] == pytest.approx(25 / 3)
    assert r["steps_ratio"] == pytest.approx(25 / 3 / 20) and r["time_ratio"] == pytest.approx((10 / 3) / 2.0)


def test_the_shipped_twins_pass_and_unfair_pairs_are_refused():
    switch, dense = config.load(CONFIGS / "small.toml"), config.load(CONFIGS / "small-dense.toml")
    for c in (switch, dense):
        c.model.vocab_size = 8192
    quality.check_twins(switch, dense)
    f_s, f_d = quality.forward_flops_per_token(switch.model), quality.forward_flops_per_token(dense.model)
    assert 1 < f_s / f_d < 1.002  # the routers' FLOPs alone
    with pytest.raises(config.ConfigError, match="has Switch layers"):
        quality.check_twins(switch, switch)
    wide = config.load(CONFIGS / "small-dense.toml", ["model.d_ff=4096", "model.vocab_size=8192"])
    with pytest.raises(config.ConfigError, match="FLOPs per token differ"):
        quality.check_twins(switch, wide)
    other = config.load(CONFIGS / "small-dense.toml", ["train.seed=1", "model.vocab_size=8192"])
    with pytest.raises(config.ConfigError, match=r"differ in train.seed \(1337 vs 1\)"):
        quality.check_twins(switch, other)
    hotter = config.load(CONFIGS / "small-dense.toml", ["train.lr=0.002", "model.vocab_size=8192"])
    with pytest.raises(config.ConfigError, match=r"differ in train.lr"):
        quality.check_twins(switch, hotter)
    shorter = config.load(CONFIGS / "small.toml", ["train.steps=500", "model.vocab_size=8192"])
    quality.check_twins(shorter, dense)  # a Switch schedule of fewer steps is the question --switch-steps asks


def test_bench_quality_tiny_on_cpu(data_dir, tmp_path):
    toml = _write_toml(tmp_path / "tiny.toml", tiny(data_dir, tmp_path / "unused", experts=dict(mode="resident")))
    work, png = tmp_path / "work", tmp_path / "q.png"
    args = ["bench-quality", "--config", str(toml), "--steps", "4", "--eval-every", "2", "--eval-batches", "1",
            "--dir", str(work), "--plot", str(png), "--keep"]
    r = CliRunner().invoke(main, args + ["--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert [p["step"] for p in out["equal_steps"]] == [0, 2, 4]
    assert out["names"] == {"switch": "tiny", "dense": "tiny-dense"} and out["dense_steps"] == 4
    for name in ("switch", "dense"):
        points = out["val_points"][name]
        assert [p["step"] for p in points] == [0, 2, 4]
        assert points[0]["wall_s"] == 0 and points[1]["wall_s"] < points[2]["wall_s"]
        rows = [json.loads(l) for l in (work / out["names"][name] / "metrics.jsonl").read_text().splitlines()]
        assert [r["val_loss"] for r in rows if "val_loss" in r] == [p["val_loss"] for p in points]
        assert (work / out["names"][name] / "ckpt-4").is_dir()  # kept for gmtier eval
    assert out["equal_steps"][0]["switch"] != out["equal_steps"][0]["dense"]  # two different models
    pytest.importorskip("matplotlib")
    assert out["plot"] == str(png) and png.stat().st_size > 10_000
    text = CliRunner().invoke(main, args[:-1] + ["--dir", str(tmp_path / "w2")])
    assert text.exit_code == 0 and "validation loss at equal steps" in text.output and not (tmp_path / "w2").exists()
    # --runs compares the kept runs from their metrics.jsonl, without training: the same curves
    again = CliRunner().invoke(main, ["bench-quality", "--runs", str(work / "tiny"), str(work / "tiny-dense"),
                                      "--plot", str(tmp_path / "again.png"), "--json"])
    assert again.exit_code == 0, again.output
    again = json.loads(again.output[again.output.index("{"):])
    assert again["equal_steps"] == out["equal_steps"] and again["val_points"] == out["val_points"]
    assert again["steps_ratio"] == out["steps_ratio"] and again["params"] == out["params"]


def test_schedule_matched_interpolates_between_lengths():
    runs = [{"steps": 3000, "final_val_loss": 2.60}, {"steps": 2000, "final_val_loss": 2.80}]
    m = quality.schedule_matched(runs, 2.70, 4000)
    assert [r["steps"] for r in m["lengths"]] == [2000, 3000]
    assert m["steps"] == pytest.approx(2500) and m["steps_ratio"] == pytest.approx(0.625)
    assert quality.schedule_matched(runs, 2.90, 4000)["at_most"] == 2000  # the shortest already reaches it
    none = quality.schedule_matched(runs, 2.50, 4000)
    assert none["steps"] is None and none["more_than"] == 3000


def test_bench_quality_switch_steps_trains_shorter_switch_schedules(data_dir, tmp_path):
    toml = _write_toml(tmp_path / "tiny.toml", tiny(data_dir, tmp_path / "unused", experts=dict(mode="resident")))
    work = tmp_path / "work"
    args = ["bench-quality", "--config", str(toml), "--steps", "4", "--switch-steps", "2,4", "--eval-every", "2",
            "--eval-batches", "1", "--dir", str(work), "--plot", str(tmp_path / "q.png"), "--keep"]
    r = CliRunner().invoke(main, args + ["--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["names"] == {"switch": "tiny-s2", "dense": "tiny-dense"}
    assert out["switch_steps"] == 2 and out["dense_steps"] == 4
    assert [p["step"] for p in out["val_points"]["switch"]] == [0, 2]
    assert [p["step"] for p in out["val_points"]["dense"]] == [0, 2, 4]
    m = out["schedule_matched"]
    assert [x["steps"] for x in m["lengths"]] == [2, 4] and m["dense_final_val_loss"] == out["dense_final_val_loss"]
    finals = {x["steps"]: x["final_val_loss"] for x in m["lengths"]}
    assert finals[2] == out["switch_final_val_loss"]
    reached = [n for n in (2, 4) if finals[n] <= m["dense_final_val_loss"]]
    assert (m["more_than"] == 4) == (not reached) and (m["at_most"] == 2) == (reached[:1] == [2])
    # the kept runs compared again from their metrics: the same schedule table, and a readable report
    runs = [str(work / n) for n in ("tiny-s2", "tiny-s4", "tiny-dense")]
    again = CliRunner().invoke(main, ["bench-quality", "--runs", *runs, "--plot", str(tmp_path / "a.png"), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output[again.output.index("{"):])["schedule_matched"]["lengths"] == [
        {**x, "run_dir": d} for x, d in zip(m["lengths"], runs[:2])]
    text = CliRunner().invoke(main, ["bench-quality", "--runs", *runs, "--plot", str(tmp_path / "b.png")])
    assert text.exit_code == 0 and "schedules: Switch 2 steps, dense 4 steps" in text.output
    assert "each annealed over its own steps" in text.output
    bad = CliRunner().invoke(main, ["bench-quality", "--runs", runs[0]])
    assert bad.exit_code != 0 and "at least two run directories" in bad.output
    bad = CliRunner().invoke(main, args[:5] + ["--switch-steps", "2,x"])
    assert bad.exit_code != 0 and "--switch-steps" in bad.output


def test_bench_quality_runs_needs_evaluations(tmp_path):
    from gmtier.checkpoint import RunDir

    run = tmp_path / "run"
    run.mkdir()
    RunDir(run).write_config(config.load(CONFIGS / "small.toml", ["model.vocab_size=8192"]))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 20, "loss": 5.0}) + "\n"
                                       + json.dumps({"step": 250, "val_loss": 4.0, "wall_s": 9.0}) + "\n")
    r = CliRunner().invoke(main, ["bench-quality", "--runs", str(run), str(run)])
    assert r.exit_code != 0 and "1 evaluation(s)" in r.output and "train.eval_every" in r.output
