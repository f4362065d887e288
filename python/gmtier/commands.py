"""The click commands for preparing data, training and using a model: prepare, train, eval,
generate, info, plot. (The bench-* commands live in `gmtier.bench`; `gmtier.cli` gathers both.)"""

from __future__ import annotations

import json
import os
import signal

import click

from gmtier import progress
from gmtier.user_errors import Command


@click.command("prepare", cls=Command)
@click.option("--source", type=click.Path(file_okay=False), default="../shared/data/ruslit", show_default=True,
              help="corpus directory with train/val .jsonl(.gz) or .txt files")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="data/ruslit", show_default=True)
@click.option("--vocab-size", type=int, default=8192, show_default=True)
@click.option("--max-train-chars", type=click.IntRange(min=1), default=None, help="use only the first N characters of the train split")
@click.option("--max-val-chars", type=click.IntRange(min=1), default=None)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="prepare a training config's data.dir as `gmtier train` would on first use (from data.source or "
                   "the mixture data.corpora) instead of --source/--out; e.g. before starting several runs on it")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="with --config: override a config value")
def prepare(source, out_dir, vocab_size, max_train_chars, max_val_chars, config_path, overrides):
    """Train a byte-level BPE tokenizer and tokenize a corpus into memory-mapped token files."""
    from gmtier.data import load_meta
    from gmtier.data import prepare as run

    if config_path:
        from gmtier import config
        from gmtier.data import ensure_data

        cfg = config.load(config_path, overrides)
        ensure_data(cfg, lambda s: progress.echo(s, err=True))  # a prepared data.dir is checked, not redone
        out_dir, meta = cfg.data.dir, load_meta(cfg.data.dir)
    else:
        meta = run(source, out_dir, vocab_size, max_train_chars, max_val_chars)
    counts = [(c["name"], c["n_tokens"]) for c in meta["corpora"]] if "corpora" in meta else [("", meta["n_tokens"])]
    for name, n in counts:
        where = f"{out_dir}/{name}" if name else out_dir
        click.echo(f"prepared {where}: vocab {meta['vocab_size']}, train {n['train']:,} tokens, val {n['val']:,} tokens")


@click.command("train", cls=Command)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="a TOML config, e.g. configs/tiny.toml")
@click.option("--resume", is_flag=True, help="continue from the run directory's last checkpoint")
@click.option("--fresh", is_flag=True, help="delete the run directory first")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a config value, e.g. --set train.steps=50")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="processes (ranks) on this machine, one per GPU, each with its share of the experts: "
                   "launches torchrun --nproc-per-node N (see docs/training.md, 'Several GPUs')")
def train(config_path, resume, fresh, overrides, nproc):
    """Train a Switch GPT; experts live in the tiered store (or resident, per the config)."""
    from gmtier import config
    from gmtier.distributed import world_size_from_env
    from gmtier.train import train as run

    cfg = config.load(config_path, overrides)  # checked here before any process starts
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise SystemExit(_launch(nproc, config_path, resume, fresh, overrides))
    if nproc > 1 and world_size_from_env() != nproc:
        raise config.ConfigError(f"--nproc {nproc} under a launcher of {world_size_from_env()} processes; "
                                 f"drop --nproc when launching with torchrun")
    run(cfg, resume=resume, fresh=fresh, log=progress.echo)  # on SIGTERM: StoppedBySignal, exit 143 (Command)


def _launch(nproc: int, config_path, resume: bool, fresh: bool, overrides) -> int:
    """`gmtier train` again under torchrun on this machine, `nproc` processes; its exit status."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "gmtier.cli", "train", "--config", str(config_path)]
    args += ["--resume"] * resume + ["--fresh"] * fresh + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(args)
    # SIGTERM to this launcher reaches torchrun, which passes it to the ranks: they checkpoint and stop.
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@click.command("eval", cls=Command)
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="a run directory (train.run_dir)")
@click.option("--split", default="val", show_default=True, help="a split of the run's prepared data")
@click.option("--text", "text_file", type=click.Path(dir_okay=False, exists=True), help="evaluate on this text file instead")
@click.option("--batches", type=click.IntRange(min=0), default=0, help="at most this many batches (0 = the whole split)")
@click.option("--choice", "choice_file", type=click.Path(dir_okay=False, exists=True),
              help="score a PARus/COPA or multiple-choice .jsonl file zero-shot instead (accuracy)")
@click.option("--device", default=None, help="override train.device")
@click.option("--json", "as_json", is_flag=True)
def eval_(run_dir, split, text_file, batches, choice_file, device, as_json):
    """Perplexity of a run's last checkpoint on a prepared split (all of it, unlike the training log's
    sample of train.eval_batches batches; each corpus of a mixture) or a text file; or zero-shot
    accuracy on a choice file."""
    import numpy as np

    from gmtier.data import load_tokenizer, read_text
    from gmtier.evaluate import load_run, perplexity, ppl, split_perplexity, text_batch_count, text_batches

    if choice_file and text_file:
        raise click.UsageError("give at most one of --text or --choice")
    cfg, model, runtime, step = load_run(run_dir, device)
    try:
        if choice_file:
            return _eval_choice(cfg, model, run_dir, step, choice_file, as_json)
        bs, sl = cfg.train.batch_size, cfg.model.seq_len
        if text_file:
            ids = np.asarray(load_tokenizer(cfg.data.dir).encode(read_text(text_file)).ids)
            source, what = text_file, "the whole file"
        else:
            source = f"{cfg.data.dir}:{split}"
            what = f"the first {batches} batches" if batches else "the whole split"
        try:
            if text_file:
                loss, tokens = perplexity(cfg, model, text_batches(ids, bs, sl), text_batch_count(ids, bs, sl))
                result = {"tokens": tokens, "loss": loss, "ppl": ppl(loss)}
            else:
                result = split_perplexity(cfg, model, split, batches or None)
        except ValueError as e:
            raise click.ClickException(f"{source}: {e}") from None
    finally:
        if runtime is not None:
            runtime.close()
    out = {"run": run_dir, "step": step, "source": source, **result}
    if as_json:
        click.echo(json.dumps(out))
        return
    mixture = " (weighted mean of the corpora)" if "corpora" in out else ""
    click.echo(f"{source} ({what}): {out['tokens']:,} tokens, loss {out['loss']:.4f}, perplexity {out['ppl']:.2f}"
               f"{mixture} (step {step})")
    for name, c in out.get("corpora", {}).items():
        click.echo(f"  {name}: {c['tokens']:,} tokens, loss {c['loss']:.4f}, perplexity {c['ppl']:.2f}")


def _eval_choice(cfg, model, run_dir, step, path, as_json) -> None:
    """`gmtier eval --choice`: accuracy by sum and mean log-probability, with 95 % intervals."""
    import time

    from gmtier.choice import evaluate_choice

    t0 = time.perf_counter()
    out = {"run": run_dir, "step": step, "file": path, **evaluate_choice(cfg, model, path)}
    out["seconds"] = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(out))
        return
    kinds = ", ".join(f"{n} {k}" for k, n in out["kinds"].items() if n)
    ci = lambda lo_hi: f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"  # noqa: E731
    click.echo(f"{path}: {out['items']} items ({kinds}); accuracy by sum log-prob {out['accuracy_sum']:.3f} "
               f"{ci(out['ci95_sum'])}, by mean log-prob per token {out['accuracy_mean']:.3f} {ci(out['ci95_mean'])} "
               f"(95 % Wilson intervals; step {step}, {out['seconds']:.1f} s)")


@click.command("generate", cls=Command)
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False))
@click.option("--prompt", default="", help="text to continue")
@click.option("--tokens", "max_new", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True, help="0 = greedy")
@click.option("--top-k", type=click.IntRange(min=0), default=50, show_default=True, help="0 = no limit")
@click.option("--seed", type=int, default=0)
@click.option("--device", default=None)
def generate(run_dir, prompt, max_new, temperature, top_k, seed, device):
    """Sample a continuation of a prompt from a run's last checkpoint."""
    import torch

    from gmtier.data import load_meta, load_tokenizer
    from gmtier.evaluate import load_run

    cfg, model, runtime, _ = load_run(run_dir, device)
    try:
        tok = load_tokenizer(cfg.data.dir)
        ids = tok.encode(prompt).ids or [load_meta(cfg.data.dir)["eot_id"]]
        idx = torch.tensor([ids], device=cfg.device())
        g = torch.Generator(device=cfg.device()).manual_seed(seed)
        out = model.generate(idx, max_new, temperature, top_k or None, generator=g)
    finally:
        if runtime is not None:
            runtime.close()
    click.echo(tok.decode(out[0].tolist()))


@click.command("info", cls=Command)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="a TOML config")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="or a run directory")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--json", "as_json", is_flag=True)
def info(config_path, run_dir, overrides, as_json):
    """Total vs active parameters per token, and bytes on each tier."""
    from pathlib import Path

    from gmtier import config
    from gmtier.checkpoint import RunDir
    from gmtier.evaluate import info as compute

    if bool(config_path) == bool(run_dir):
        raise click.UsageError("give exactly one of --config or --run")
    if run_dir:
        raw = RunDir(run_dir).saved_config()
        raw["train"]["run_dir"] = str(run_dir)  # the run's own store, wherever the run now lies
        cfg = config.from_dict(config.apply_overrides(raw, list(overrides)))
    else:
        cfg = config.load(config_path, overrides)
    if cfg.model.vocab_size == 0:
        meta = Path(cfg.data.dir) / "meta.json"
        cfg.model.vocab_size = json.loads(meta.read_text())["vocab_size"] if meta.exists() else cfg.data.vocab_size
    d = compute(cfg)
    world = RunDir(run_dir).trained_world_size() if run_dir else 1
    if world > 1:  # each rank's store holds its own experts (gmtier.distributed)
        from gmtier.distributed import ranks_info

        d["ranks"] = ranks_info(cfg, world)
        d["disk_bytes_actual"] = sum(r["disk_bytes_actual"] for r in d["ranks"])
    elif run_dir:
        from gmtier.store.tiered import data_file_bytes

        d["disk_bytes_actual"] = data_file_bytes(cfg.store_dir())
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    gib = lambda b: f"{b / 2**30:.3f} GiB"
    click.echo(f"parameters: {d['params_total']:,} total, {d['params_active_per_token']:,} active per token "
               f"({d['params_dense']:,} dense + {d['experts']} experts x {d['params_per_expert']:,})")
    state = "fp32 state" if d["expert_state"] == "fp32" else "8-bit moments, the weights their own master"
    click.echo(f"expert record: {d['expert_record_bytes']:,} B ({d['expert_dtype']} weights {d['expert_weights_bytes']:,} B "
               f"+ {state}): {d['record_bytes_per_param']:.2f} B/param")
    click.echo(f"disk: {gib(d['disk_bytes'])} ({d['disk_bytes'] / 1e9:.1f} GB) = {d['experts']} records + {d['spare_slots']} spare slots: "
               f"{d['disk_bytes_per_param']:.2f} B/param")
    t = d["step_disk_bytes_per_expert"]
    click.echo(f"disk traffic of a step per paged expert: {d['step_disk_bytes_per_param']:.2f} B/param "
               f"(forward reads {t['forward_read']:,} B, backward {t['backward_read']:,} B, write-back {t['write_back']:,} B)")
    click.echo(f"ram : budget {gib(d['ram_budget_bytes'])} = {d['ram_slots']} expert records (all fit: {d['experts_fit_in_ram']})")
    click.echo(f"gpu : budget {gib(d['gpu_budget_bytes'])} = {d['gpu_slots']} expert weight slots (all fit: {d['experts_fit_on_gpu']}), "
               f"dense part {gib(d['dense_bytes_on_device'])}")
    if "disk_bytes_actual" in d:
        click.echo(f"on disk now: {gib(d['disk_bytes_actual'])}")
    for r in d.get("ranks", []):
        click.echo(f"rank {r['rank']}: experts per Switch layer {r['experts_per_layer']}, RAM share "
                   f"{gib(r['ram_budget_bytes'])}, store {r['store_dir']}: {gib(r['disk_bytes_actual'])} on disk "
                   f"(planned {gib(r['disk_bytes'])}), committed at step {r['store_committed_step']}")


@click.command("plot", cls=Command)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the PNG to write, e.g. runs/loss.png")
@click.option("--width", type=click.IntRange(min=300), default=1500, show_default=True, help="pixels")
@click.option("--height", type=click.IntRange(min=200), default=900, show_default=True, help="pixels")
def plot(runs, out, width, height):
    """Plot runs' metrics.jsonl on one PNG: loss and val loss against step, tokens and wall time,
    tokens/s, tier hit rates, learning rate (one colour per run)."""
    from gmtier import plot as plotting

    try:
        path = plotting.plot_runs(list(runs), out, width, height)
    except ImportError as e:
        if not (e.name or "").startswith("matplotlib"):
            raise
        raise click.ClickException(plotting.MISSING) from None
    click.echo(f"wrote {path} ({width}x{height}, {len(runs)} runs)")


COMMANDS = [prepare, train, eval_, generate, info, plot]
