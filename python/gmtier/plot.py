"""`gmtier plot`: the curves of one or more runs, from their metrics.jsonl, on one PNG.

Panels: loss and validation loss against step, tokens and wall time; tokens/s; the tier hit rates;
the learning rate. One colour per run (the legend names the runs); within a panel, training
curves are solid and validation curves dashed with dots (for a mixture, the weighted mean; each
corpus's validation loss is dotted beside it against step, a marker per corpus). matplotlib is an optional extra
(`pip install "gmtier[plot]"`), imported only here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gmtier.checkpoint import CheckpointError, RunDir

MISSING = 'gmtier plot needs matplotlib: pip install "gmtier[plot]"'
DPI = 100
CORPUS_MARKERS = "s^vD*x"


@dataclass
class Curves:
    """One run's metrics as columns: `train` (logged steps) and `val` (evaluations) records."""
    name: str
    tokens_per_step: int
    train: list[dict]
    val: list[dict]

    def xy(self, which: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """`key` over the `which` ("train"/"val") records that have it, against `x`: "step",
        "tokens" or "wall_s" (records from before wall_s was logged have no wall time)."""
        need = "wall_s" if x == "wall_s" else "step"
        rows = [r for r in getattr(self, which) if r.get(key) is not None and r.get(need) is not None]
        scale = self.tokens_per_step if x == "tokens" else 1
        return [r["wall_s"] if x == "wall_s" else r["step"] * scale for r in rows], [r[key] for r in rows]

    def corpora(self) -> list[str]:
        """The corpora of a mixture run, whose val losses are logged one by one (`val_loss/NAME`)."""
        names = [k.split("/", 1)[1] for r in self.val for k in r if k.startswith("val_loss/")]
        return list(dict.fromkeys(names))


def load_curves(run_dir: str | Path, name: str) -> Curves:
    run = RunDir(run_dir)
    raw = run.saved_config()  # names a path that is no run directory
    records = run.read_metrics()
    if not records:
        raise CheckpointError(f"{run_dir}: no metrics.jsonl records yet; train the run first (train.log_every > 0)")
    t = raw["train"]
    tokens_per_step = t.get("micro_batches", 1) * t["batch_size"] * raw["model"]["seq_len"]
    return Curves(name, tokens_per_step, [r for r in records if "loss" in r], [r for r in records if "val_loss" in r])


def run_names(run_dirs: list[str]) -> list[str]:
    """Each run's directory name, or the path as given where two runs share a name."""
    names = [Path(r).name or str(r) for r in run_dirs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, run_dirs)]


def plot_runs(run_dirs: list[str], out: str | Path, width: int = 1500, height: int = 900,
              hline: tuple[float, str] | None = None) -> Path:
    """Write the PNG (`width` x `height` pixels) and return its path. ImportError without matplotlib.
    `hline` = (loss, label): a reference loss drawn across the loss panels (`gmtier bench-quality`:
    the dense model's final validation loss)."""
    runs = [load_curves(r, n) for r, n in zip(run_dirs, run_names(run_dirs))]  # what is no run is named first
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(width / DPI, height / DPI), dpi=DPI)
    (by_step, by_tokens, by_wall), (rate, hits, lr) = axes
    loss_panels = ((by_step, "step", "step"), (by_tokens, "tokens", "tokens"), (by_wall, "wall_s", "wall time (s)"))
    for i, c in enumerate(runs):
        color = f"C{i % 10}"
        for ax, x, _ in loss_panels:
            ax.plot(*c.xy("train", "loss", x), "-", color=color, label=c.name if ax is by_step else None)
            ax.plot(*c.xy("val", "val_loss", x), "--o", color=color, markersize=3)
        for k, corpus in enumerate(c.corpora()):  # a mixture's corpora, dotted beside their weighted mean
            by_step.plot(*c.xy("val", f"val_loss/{corpus}"), ":", marker=CORPUS_MARKERS[k % len(CORPUS_MARKERS)],
                         color=color, markersize=4, label=f"{c.name}: val {corpus}")
        rate.plot(*c.xy("train", "tokens_per_s"), "-", color=color)
        hits.plot(*c.xy("train", "ram_hit_rate"), "-", color=color)
        hits.plot(*c.xy("train", "gpu_hit_rate"), "--", color=color)
        lr.plot(*c.xy("train", "lr"), "-", color=color)

    for ax, _, xlabel in loss_panels:
        ax.set(xlabel=xlabel, ylabel="loss (solid: train, dashed: val)")
        if hline is not None:
            ax.axhline(hline[0], color="0.4", linestyle=":", linewidth=1, label=hline[1] if ax is by_step else None)
    rate.set(xlabel="step", ylabel="tokens/s")
    hits.set(xlabel="step", ylabel="hit rate (solid: RAM, dashed: GPU)", ylim=(-0.02, 1.02))
    if not any(len(line.get_xdata()) for line in hits.get_lines()):
        hits.text(0.5, 0.5, "no hit rates: every run's experts resident", ha="center", va="center",
                  transform=hits.transAxes, color="0.4")
    lr.set(xlabel="step", ylabel="learning rate")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.legend(loc="upper center", ncol=min(len(by_step.get_legend_handles_labels()[1]), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)  # no bbox_inches="tight": the PNG keeps the size asked for
    plt.close(fig)
    return out
