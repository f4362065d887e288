"""`gmtier bench-quality`: does the Switch model pay off against its dense twin?

It trains a Switch config and its dense twin of equal FLOPs per token (by default the same
config with `model.switch_every = 0`: every block's FFN has the d_ff of one expert) on the same
data with the same seed, batches and steps, evaluating both on the validation split (each corpus
of a mixture, and their weighted mean) every `--eval-every` steps and at step 0. Training is
`Trainer.fit` in stretches between evaluations, so the wall time it reports (`wall_s` in each
run's metrics.jsonl) is training alone: evaluation and the final checkpoint are outside it.

`--runs SWITCH_DIR [SWITCH_DIR...] DENSE_DIR` compares runs already trained (by `gmtier train`,
e.g. at the same time on one GPU, or on two machines) from the evaluations in their
metrics.jsonl, without training: their `wall_s` is then the runs' own (evaluations and
checkpoints included), and the time comparison is only fair for runs that had a machine each.

The step at which a Switch run first reaches the dense final loss is read mid-schedule, at a
learning rate not yet decayed, against a dense loss read at the end of its decay; a user with a
budget of that many steps would train with a schedule ending there, which can land above or
below that curve. `--switch-steps N1,N2,...` trains the Switch model once per length, each with
its schedule ending there, and reports the length whose final loss reaches the dense final loss,
interpolated linearly between the lengths around it (`schedule_matched`).

It prints validation loss at equal steps, at equal wall time (each run's curve interpolated
linearly at the other's evaluation times), the step and the time at which the Switch model first
reaches the dense model's final validation loss (interpolated between evaluations), and writes
the two runs' curves with `gmtier plot`'s figure, the dense final loss drawn across it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click

from gmtier import config as config_mod
from gmtier import progress
from gmtier.bench import counts
from gmtier.user_errors import Command

FLOPS_TOLERANCE = 0.02  # the twin's FLOPs per token may differ by the routers' share, not more


def forward_flops_per_token(m: config_mod.ModelConfig) -> int:
    """Forward FLOPs per token: 2 x the weights a token multiplies (attention, the FFN of each
    block or its one expert, the routers, the tied head) + causal attention over seq_len
    (QK and AV, half of the square)."""
    n_switch = len(m.switch_layers())
    weights = m.n_layer * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff) + n_switch * m.n_experts * m.d_model
    return 2 * (weights + m.vocab_size * m.d_model) + 2 * m.n_layer * m.seq_len * m.d_model


def check_twins(switch: config_mod.Config, dense: config_mod.Config) -> None:
    """Refuse a pair that is not a fair comparison: other data, seed, batch, seq_len or learning
    rate schedule shape, a 'Switch' config without Switch layers, or FLOPs per token that differ
    beyond the routers. The step counts may differ: a Switch run with a schedule of fewer steps
    asks whether it reaches the dense final loss in that many steps (see `--switch-steps`)."""
    if not switch.model.switch_layers():
        raise config_mod.ConfigError("bench-quality: the --config model has no Switch layers (model.switch_every = 0); "
                                     "give the Switch config, e.g. configs/small.toml")
    if dense.model.switch_layers():
        raise config_mod.ConfigError("bench-quality: the --dense model has Switch layers; give a dense config "
                                     "(model.switch_every = 0), e.g. configs/small-dense.toml")
    for key in ("data", "train.seed", "train.batch_size", "train.micro_batches", "train.lr", "train.min_lr",
                "train.warmup_steps", "model.seq_len", "model.vocab_size"):
        section, _, name = key.partition(".")
        a, b = getattr(switch, section), getattr(dense, section)
        if name:
            a, b = getattr(a, name), getattr(b, name)
        if a != b:
            raise config_mod.ConfigError(f"bench-quality: the two configs differ in {key} ({a!r} vs {b!r}); "
                                         "train both on the same data, seed, batches and learning rate schedule")
    fs, fd = forward_flops_per_token(switch.model), forward_flops_per_token(dense.model)
    if abs(fs / fd - 1) > FLOPS_TOLERANCE:
        raise config_mod.ConfigError(f"bench-quality: FLOPs per token differ ({fs:,} Switch vs {fd:,} dense, "
                                     f"{fs / fd:.3f}x); the dense twin needs the d_ff of one expert in every block")


def interpolate(points: list[dict], x_key: str, x: float, y_key: str = "val_loss") -> float | None:
    """`y_key` at `x` on the curve through `points` (sorted by `x_key`), linearly; None outside it."""
    for a, b in zip(points, points[1:]):
        if a[x_key] <= x <= b[x_key]:
            if b[x_key] == a[x_key]:
                return b[y_key]
            t = (x - a[x_key]) / (b[x_key] - a[x_key])
            return a[y_key] + t * (b[y_key] - a[y_key])
    if points and points[-1][x_key] == x:
        return points[-1][y_key]
    return None


def first_reach(points: list[dict], target: float) -> dict | None:
    """The step and wall time at which the validation loss first reaches `target`, linearly
    between the evaluations around the crossing; None if it never does."""
    for a, b in zip(points, points[1:]):
        if b["val_loss"] <= target:
            if a["val_loss"] <= target:
                return {"step": a["step"], "wall_s": a["wall_s"]}
            t = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return {k: a[k] + t * (b[k] - a[k]) for k in ("step", "wall_s")}
    return None


def compare(switch: list[dict], dense: list[dict]) -> dict:
    """The comparison of two runs' validation points (`step`, `wall_s`, `val_loss`, from step 0)."""
    dense_steps = {p["step"]: p for p in dense}
    equal_steps = [{"step": p["step"], "switch": p["val_loss"], "dense": dense_steps[p["step"]]["val_loss"]}
                   for p in switch if p["step"] in dense_steps]
    times = sorted({p["wall_s"] for p in switch + dense if p["wall_s"] > 0})
    equal_time = [{"wall_s": t, "switch": interpolate(switch, "wall_s", t), "dense": interpolate(dense, "wall_s", t)}
                  for t in times]
    target = dense[-1]["val_loss"]
    reach = first_reach(switch, target)
    return {
        "dense_final_val_loss": target, "dense_steps": dense[-1]["step"], "dense_wall_s": dense[-1]["wall_s"],
        "switch_final_val_loss": switch[-1]["val_loss"], "switch_steps": switch[-1]["step"],
        "switch_wall_s": switch[-1]["wall_s"],
        "switch_reaches_dense_final": reach,
        # < 1: the Switch model needs fewer steps (less time) than the dense one for its final loss.
        "steps_ratio": reach["step"] / dense[-1]["step"] if reach else None,
        "time_ratio": reach["wall_s"] / dense[-1]["wall_s"] if reach else None,
        "equal_steps": equal_steps, "equal_time": equal_time,
    }


def schedule_matched(lengths: list[dict], target: float, dense_steps: int) -> dict:
    """How many steps the Switch model needs when its learning rate schedule ends there: from
    Switch runs of several lengths (`steps`, `final_val_loss`), each annealed over its own steps,
    the shortest length whose final loss reaches `target` (the dense final loss), linearly
    between the two lengths around the crossing. `steps` is None where no run reaches it (then
    `more_than` the longest) or where the shortest already does (then `at_most` it)."""
    runs = sorted(lengths, key=lambda r: r["steps"])
    out = {"lengths": runs, "dense_final_val_loss": target, "dense_steps": dense_steps,
           "steps": None, "steps_ratio": None, "at_most": None, "more_than": None}
    reach = next((i for i, r in enumerate(runs) if r["final_val_loss"] <= target), None)
    if reach is None:
        out["more_than"] = runs[-1]["steps"]
    elif reach == 0:
        out["at_most"] = runs[0]["steps"]
    else:
        a, b = runs[reach - 1], runs[reach]
        t = (a["final_val_loss"] - target) / (a["final_val_loss"] - b["final_val_loss"])
        out["steps"] = a["steps"] + t * (b["steps"] - a["steps"])
        out["steps_ratio"] = out["steps"] / dense_steps
    return out


def train_and_evaluate(cfg: config_mod.Config, eval_every: int, eval_batches: int, log) -> tuple[list[dict], int]:
    """Train `cfg` from scratch, evaluating at step 0 and every `eval_every` steps between stretches
    of `Trainer.fit` (so `wall_s` counts training only); the evaluations are appended to the run's
    metrics.jsonl as the training loop's own are. Returns the validation points and the run's
    final checkpoint step (saved after the last evaluation, for `gmtier eval`)."""
    from gmtier.evaluate import validate
    from gmtier.train import Trainer
    from gmtier.user_errors import StoppedBySignal

    cfg.train.eval_every = cfg.train.checkpoint_every = 0
    trainer = Trainer(cfg, fresh=True, log=lambda s: None)
    try:
        points = []

        def evaluate() -> None:
            val = validate(trainer.val_data, lambda d: (trainer.evaluate(d, eval_batches), trainer.eval_batches_read))
            record = {"step": trainer.step, **val.record(), "wall_s": trainer.wall_s}
            trainer._emit(record)
            points.append(record)
            log(f"  step {trainer.step:6d} | {trainer.wall_s:8.1f} s | {val.summary()}")

        evaluate()
        while trainer.step < cfg.train.steps:
            trainer.fit(until=trainer.step + eval_every)
            if trainer.stopped_by_signal:  # checkpointed by fit; the bench stops with it
                raise StoppedBySignal(trainer.step)
            evaluate()
        trainer.save_checkpoint()
        return points, trainer.step
    finally:
        trainer.close()


def finished_run(run_dir: str | Path) -> tuple[config_mod.Config, list[dict]]:
    """(config, validation points) of a run trained by `gmtier train`: the evaluations of its
    metrics.jsonl by step (of a step evaluated twice, across a resume, the later one)."""
    from gmtier.checkpoint import RunDir

    run = RunDir(run_dir)
    cfg = config_mod.from_dict(run.saved_config())
    points = {r["step"]: r for r in run.read_metrics() if "val_loss" in r}
    if len(points) < 2:
        raise config_mod.ConfigError(f"bench-quality --runs: {run_dir} has {len(points)} evaluation(s) in its "
                                     "metrics.jsonl, two are needed; train it with train.eval_every > 0")
    return cfg, [points[s] for s in sorted(points)]


def _configs(path: str, dense_path: str | None, overrides, steps: int | None, switch_steps: list[int], work: Path):
    """The Switch configs (one per --switch-steps length, or one of --steps) and the dense twin."""
    extra = [f"train.steps={steps}"] if steps else []
    name = Path(path).stem
    switches = [(config_mod.load(path, list(overrides) + extra), name)] if not switch_steps else [
        (config_mod.load(path, list(overrides) + extra + [f"train.steps={n}"]), f"{name}-s{n}") for n in switch_steps]
    dense = config_mod.load(dense_path or path, list(overrides) + extra + ([] if dense_path else ["model.switch_every=0"]))
    dense_name = Path(dense_path).stem if dense_path else f"{name}-dense"
    if dense_name == name:
        dense_name += "-dense"
    for cfg, n in (*switches, (dense, dense_name)):
        cfg.train.run_dir = str(work / n)
        cfg.experts.store_dir = ""
    return [cfg for cfg, _ in switches], dense


def _steps_list(text: str | None) -> list[int]:
    """--switch-steps "2500" or "2500,3250" -> [2500, 3250]."""
    if not text:
        return []
    steps = counts(text, "--switch-steps", "2500,3250")
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise click.BadParameter(f"{text!r}: give distinct step counts, e.g. 2500 or 2500,3250", param_hint="--switch-steps")
    return steps


def _fmt(v, fmt="{:.4f}") -> str:
    return "—" if v is None else fmt.format(v)


def _report(r: dict) -> str:
    names = r["names"]
    lines = [f"{names['switch']} ({r['params']['switch_total']:,} params, {r['params']['switch_active']:,} active) vs "
             f"{names['dense']} ({r['params']['dense_total']:,} params), {r['flops_per_token']['switch']:,} vs "
             f"{r['flops_per_token']['dense']:,} forward FLOPs/token, {r['tokens_per_step']:,} tokens a step",
             "", "validation loss at equal steps", f"{'step':>8}  {'Switch':>8}  {'dense':>8}  {'Switch - dense':>14}"]
    lines += [f"{p['step']:>8}  {p['switch']:8.4f}  {p['dense']:8.4f}  {p['switch'] - p['dense']:14.4f}" for p in r["equal_steps"]]
    lines += ["", "validation loss at equal wall time (training only; interpolated, — where a run had stopped)",
              f"{'wall s':>8}  {'Switch':>8}  {'dense':>8}"]
    lines += [f"{p['wall_s']:8.1f}  {_fmt(p['switch']):>8}  {_fmt(p['dense']):>8}" for p in r["equal_time"]]
    reach = r["switch_reaches_dense_final"]
    if r["switch_steps"] != r["dense_steps"]:
        lines += ["", f"schedules: Switch {r['switch_steps']} steps, dense {r['dense_steps']} steps, each warming up and "
                      "decaying to min_lr over its own steps (at equal steps the two are at different learning rates)"]
    m = r.get("schedule_matched")
    if m:
        lines += ["", "Switch runs each annealed over its own steps: final val loss against the dense final "
                      f"{m['dense_final_val_loss']:.4f} ({m['dense_steps']} steps)"]
        lines += [f"{x['steps']:>8}  {x['final_val_loss']:8.4f}  {x['final_val_loss'] - m['dense_final_val_loss']:+8.4f}"
                  for x in m["lengths"]]
        if m["steps"] is not None:
            lines.append(f"a Switch schedule of ~{m['steps']:.0f} steps reaches it ({m['steps_ratio']:.2f} of the dense "
                         f"steps, interpolated between the lengths around it)")
        elif m["at_most"] is not None:
            lines.append(f"the shortest Switch schedule ({m['at_most']} steps, {m['at_most'] / m['dense_steps']:.2f} of "
                         "the dense steps) already reaches it")
        else:
            lines.append(f"no Switch schedule up to {m['more_than']} steps reaches it")
    lines += ["", f"dense final val loss {r['dense_final_val_loss']:.4f} at step {r['dense_steps']} "
                  f"({r['dense_wall_s']:.1f} s); Switch final {r['switch_final_val_loss']:.4f} at step "
                  f"{r['switch_steps']} ({r['switch_wall_s']:.1f} s)"]
    if reach:
        lines.append(f"the Switch model reaches it at step {reach['step']:.0f} ({r['steps_ratio']:.2f} of the dense "
                     f"steps, {1 / r['steps_ratio']:.2f}x fewer) and {reach['wall_s']:.1f} s ({r['time_ratio']:.2f} "
                     f"of the dense time)")
    else:
        lines.append(f"the Switch model does not reach it in {r['switch_steps']} steps")
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    if r["kept"]:
        lines.append(f"runs: {' '.join(r['run_dirs'])} (gmtier eval --run DIR)")
    return "\n".join(lines)


@click.command("bench-quality", cls=Command)
@click.option("--config", "config_path", default="configs/small.toml", show_default=True, type=click.Path(dir_okay=False),
              help="the Switch config")
@click.option("--dense", "dense_path", default=None, type=click.Path(dir_okay=False),
              help="its dense twin of equal FLOPs per token (default: --config with model.switch_every=0)")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override for both configs")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="training steps of both (default: train.steps)")
@click.option("--switch-steps", default=None, metavar="N[,N...]",
              help="train the Switch model this many steps, its learning rate schedule ending there (several: one run "
                   "each), against the dense model's --steps: which Switch budget reaches the dense final loss? "
                   "(default: --steps)")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="steps between evaluations (default: steps / 10)")
@click.option("--eval-batches", type=click.IntRange(min=1), default=None,
              help="validation batches per corpus at each evaluation (default: train.eval_batches)")
@click.option("--dir", "work_dir", type=click.Path(file_okay=False), default="gmtier-bench-quality", show_default=True,
              help="where the runs go")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default="bench-quality.png", show_default=True,
              help="the PNG to write (needs matplotlib; skipped with a note without it)")
@click.option("--keep", is_flag=True, help="keep the run directories (for gmtier eval) instead of deleting them")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the tables")
@click.option("--runs", "runs", is_flag=True,
              help="compare runs trained already (their metrics.jsonl evaluations) instead of training: RUN_DIRS are "
                   "one or more Switch runs, then the dense one; --config and the training options are unused")
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False, exists=True))
def bench_quality(config_path, dense_path, overrides, steps, switch_steps, eval_every, eval_batches, work_dir, plot_path,
                  keep, as_json, runs, run_dirs):
    """Train a Switch config and its dense twin on the same data; compare validation loss at equal
    steps and equal wall time, and when the Switch model reaches the dense model's final loss.
    With --runs, compare RUN_DIRS (SWITCH_DIR... DENSE_DIR) trained already."""
    from gmtier.data import ensure_data

    log = lambda s: progress.echo(s, err=True)  # noqa: E731
    if runs or run_dirs:
        if not runs or len(run_dirs) < 2:
            raise click.UsageError("give --runs and at least two run directories: SWITCH_DIR [SWITCH_DIR...] DENSE_DIR")
        done = [finished_run(d) for d in run_dirs]
        (dense, dense_points), switches = done[-1], done[:-1]
        for switch, _ in switches:
            check_twins(switch, dense)
        result = _result([(cfg, points, str(d)) for (cfg, points), d in zip(switches, run_dirs)],
                         (dense, dense_points, str(run_dirs[-1])), kept=True)
        result["plot"] = _plot(result, plot_path, log)
        click.echo(json.dumps(result, indent=1) if as_json else _report(result))
        return
    work = Path(work_dir)
    switches, dense = _configs(config_path, dense_path, overrides, steps, _steps_list(switch_steps), work)
    vocab = ensure_data(dense, log)[0].vocab_size  # prepared once, before any run; sizes the FLOPs
    for cfg in (*switches, dense):
        cfg.model.vocab_size = cfg.model.vocab_size or vocab
    for cfg in switches:
        check_twins(cfg, dense)
    every = eval_every or max(1, dense.train.steps // 10)
    batches = eval_batches or dense.train.eval_batches
    try:
        curves = []
        for cfg in (*switches, dense):
            name = Path(cfg.train.run_dir).name
            log(f"[{name}] training {cfg.train.steps} steps, validation every {every} ...")
            t0 = time.perf_counter()
            curves.append((cfg, train_and_evaluate(cfg, every, batches, log)[0], cfg.train.run_dir))
            log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
        result = _result(curves[:-1], curves[-1], keep)
        result["plot"] = _plot(result, plot_path, log)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    click.echo(json.dumps(result, indent=1) if as_json else _report(result))


def _result(switches: list[tuple], dense: tuple, kept: bool) -> dict:
    """The comparison of the first Switch run (config, validation points, run dir) with the dense
    one; with Switch runs of other lengths than the dense run, also `schedule_matched`."""
    from gmtier.model import count_params

    (switch, switch_points, switch_dir), (dense_cfg, dense_points, dense_dir) = switches[0], dense
    result = {"names": {"switch": Path(switch_dir).name, "dense": Path(dense_dir).name},
              **compare(switch_points, dense_points),
              "tokens_per_step": switch.train.micro_batches * switch.train.batch_size * switch.model.seq_len,
              "flops_per_token": {"switch": forward_flops_per_token(switch.model),
                                  "dense": forward_flops_per_token(dense_cfg.model)},
              "params": {"switch_total": count_params(switch.model)["total"],
                         "switch_active": count_params(switch.model)["active_per_token"],
                         "dense_total": count_params(dense_cfg.model)["total"]},
              "val_points": {"switch": switch_points, "dense": dense_points},
              "run_dirs": [d for _, _, d in switches] + [dense_dir], "kept": kept}
    if len(switches) > 1 or switch_points[-1]["step"] != dense_points[-1]["step"]:
        lengths = [{"steps": points[-1]["step"], "final_val_loss": points[-1]["val_loss"], "run_dir": d}
                   for _, points, d in switches]
        result["schedule_matched"] = schedule_matched(lengths, dense_points[-1]["val_loss"], dense_points[-1]["step"])
    return result


def _plot(result: dict, path: str, log) -> str | None:
    """The runs on `gmtier plot`'s figure with the dense final loss across the loss panels;
    None (and a note) without matplotlib."""
    from gmtier import plot as plotting

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log(f"no plot: {plotting.MISSING}")
        return None
    line = (result["dense_final_val_loss"], f"{result['names']['dense']} final val loss")
    return str(plotting.plot_runs(result["run_dirs"], path, hline=line))
