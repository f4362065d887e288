"""The run directory: its lock, its config, atomic checkpoints, and the step a run resumes from.

A run directory holds:

    lock               held (flock) by the process training the run; holds its pid
    config.json        the resolved config, written once the run is accepted
    store/             the expert store (tiered mode); its last commit is the experts' checkpoint
    ckpt-<step>/       model.safetensors (dense weights; all weights in resident mode),
                       optim.safetensors + state.json (optimizer, step, data and torch RNG, loss scale)
    latest.json        {"step": S}: the last complete checkpoint
    metrics.jsonl      one JSON object per logged step / evaluation
    routing.jsonl      the experts each Switch layer used, one line per step

A checkpoint is written as ckpt-<S>.tmp, renamed to ckpt-<S>, then the store is committed with
{"step": S}, then latest.json is replaced. A kill at any point leaves either the previous
checkpoint (store commit still at the previous step) or the new one complete. `RunDir.resume_step`
is the one place that decides which step a run continues from (training) or is read at (eval).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gmtier.config import Config, ConfigError
from gmtier.optim import optimizer_from_flat, optimizer_to_flat


class CheckpointError(RuntimeError):
    """A run directory that cannot be used as asked, with a message that says how to fix it."""


# Config keys a resume must keep: they shape the model (model.vocab_size: its tokens) or its experts.
# Everything else (train.steps, the lr schedule, eval, checkpoints, budgets, threads) may change.
_MODEL_SECTIONS = ("model",)
_MODEL_KEYS = ("experts.mode", "experts.dtype")
_ROUTING_ONLY_KEYS = ("model.eval_capacity_factor",)  # how evaluation routes, not what was trained


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    """Replace `path` atomically with `obj` as JSON (see `write_atomic`)."""
    write_atomic(path, json.dumps(obj, indent=1).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` atomically (write a .tmp, fsync, rename, fsync the directory)."""
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


@contextlib.contextmanager
def _writing(path: Path):
    """Name the file in a failed write (safetensors and a full disk do not)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e)
        why = "no space left on device; free some space" if full else f"{e}"
        raise CheckpointError(f"{path}: could not write it ({why}); "
                              f"the previous checkpoint is intact, resume from it with --resume") from None


def keep_lines_up_to(path: Path, step: int) -> None:
    """Keep the JSON lines of `path` logged at or before `step` (and none cut by a kill)."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(line + "\n" for line in keep))


class RunDir:
    """One run directory (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.routing = self.path / "routing.jsonl"
        self._lock_fd: int | None = None
        self.world_size = 1  # the processes (ranks) training the run; latest.json says how many made it

    # ---- the lock ---------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the run's exclusive lock (creating the directory), or refuse naming the holder.
        The kernel drops it when the process dies, so a kill leaves no stale lock."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(f"{self.path} is in use by process {holder} (another gmtier train); "
                                  f"wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def clear(self) -> None:
        """Delete everything in the run directory but the lock (--fresh; the lock must be held)."""
        for entry in self.path.iterdir():
            if entry.name != "lock":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    # ---- config and steps ---------------------------------------------------------------------
    def saved_config(self) -> dict:
        try:
            return json.loads((self.path / "config.json").read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no config.json; is it a run directory (train.run_dir)?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path / 'config.json'}: not valid JSON ({e}); restore it from a backup") from None

    def write_config(self, cfg: Config) -> None:
        write_json(self.path / "config.json", cfg.to_dict())

    def read_metrics(self) -> list[dict]:
        """The records of metrics.jsonl (training steps and evaluations), in order; a line cut
        short by a kill is skipped."""
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def check_resumable(self, cfg: Config) -> None:
        """Refuse a resume whose config changes the model (naming the key and both values)."""
        saved, now = self.saved_config(), cfg.to_dict()
        keys = [f"{s}.{k}" for s in _MODEL_SECTIONS for k in now[s] if f"{s}.{k}" not in _ROUTING_ONLY_KEYS]
        keys += list(_MODEL_KEYS)
        for key in keys:
            section, name = key.split(".")
            old, new = saved.get(section, {}).get(name), now[section][name]
            if old != new:
                raise ConfigError(
                    f"{self.path} was trained with {key} = {old!r} but the config says {new!r}, which changes the model; "
                    f"resume with {key} = {old!r} (a resume may change train.steps, the lr schedule, eval, "
                    f"checkpoints and budgets) or start over with --fresh")

    def _marker(self) -> tuple[int, int] | None:
        """(step, world size) of latest.json (None: no checkpoint)."""
        path = self.path / "latest.json"
        try:
            marker = json.loads(path.read_text())
            return marker["step"], marker.get("world_size", 1)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a checkpoint marker ({e}); restore it from a backup") from None

    def trained_world_size(self) -> int:
        """How many processes (ranks) made the last checkpoint (1 where there is none)."""
        marker = self._marker()
        return 1 if marker is None else marker[1]

    def latest_step(self) -> int | None:
        """The step of the last complete checkpoint, by latest.json (None: no checkpoint)."""
        marker = self._marker()
        if marker is None:
            return None
        step, world = marker
        if world != self.world_size:
            raise CheckpointError(
                f"{self.path} was trained by {world} process(es) (ranks, each with its own share of the experts) but "
                f"this run has {self.world_size}: its checkpoint cannot be split otherwise; resume with the same count "
                f"(gmtier train --nproc {world}, or torchrun --nproc-per-node {world}) or start over with --fresh")
        return step

    def checkpoint_step(self) -> int:
        """`latest_step`, refusing a run without a checkpoint."""
        step = self.latest_step()
        if step is None:
            raise CheckpointError(f"{self.path}: no checkpoint (latest.json); train with `gmtier train --config ...` first")
        return step

    def align_stores(self, store_dir: Path) -> None:
        """Before a resume opens the expert store: one process has one store, always at one
        commit (`gmtier.distributed.RankRunDir` aligns the stores of several ranks)."""

    def resume_step(self, runtime) -> int:
        """The checkpoint to continue from (or evaluate): latest.json's, unless a kill landed between
        the store commit and latest.json; then the store is one checkpoint ahead and that
        checkpoint's dense half is complete on disk. Any other disagreement between the dense
        checkpoint and the store (`runtime`; None in resident mode) is refused."""
        step = self.checkpoint_step()
        return step if runtime is None else self.step_with_store(step, runtime)

    def step_with_store(self, step: int, runtime) -> int:
        """Checkpoint `step` (latest.json's), or the one after it where the store (`runtime`)
        committed that one and its dense half here is complete; refused otherwise."""
        try:
            store_step = runtime.committed_step()
        except ValueError as e:
            raise CheckpointError(f"{runtime.cfg.store_dir() / 'index.json'}: the commit metadata is not JSON ({e}); "
                                  f"restore the store from a backup") from None
        if store_step == step:
            return step
        if store_step is not None and (self.path / f"ckpt-{store_step}" / "state.json").exists():
            return store_step
        raise CheckpointError(
            f"{self.path}: the expert store {runtime.cfg.store_dir()} was committed at step {store_step} but the last dense "
            f"checkpoint is step {step}: they come from different copies of the run (or were changed by hand); "
            f"restore both from the same backup, or start over with --fresh")

    # ---- save / load ---------------------------------------------------------------------------
    def save(self, step: int, model, opt, data_rng, scaler, device: str, runtime) -> Path:
        """Write checkpoint `step` (see the module docstring for the order that survives a kill)."""
        final = self.write_dense(step, model, opt, data_rng, scaler, device)
        if runtime is not None:
            runtime.commit({"step": step})  # the experts' snapshot for this step
        self.mark_latest(step)
        self.prune(step)
        return final

    # The three parts of `save`, in the order that survives a kill (`gmtier.distributed` runs them
    # on every rank with barriers between).
    def write_dense(self, step: int, model, opt, data_rng, scaler, device: str) -> Path:
        """ckpt-<step>: the dense weights (all of them in resident mode), optimizer and RNGs,
        written as ckpt-<step>.tmp and renamed."""
        final, tmp = self.path / f"ckpt-{step}", self.path / f"ckpt-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with _writing(tmp):
            tmp.mkdir()
        dense = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        with _writing(tmp / "model.safetensors"):
            save_file(dense, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(opt)
        rng = {"torch_cpu": torch.get_rng_state()}
        if device.startswith("cuda"):
            rng["torch_cuda"] = torch.cuda.get_rng_state(torch.device(device))
        with _writing(tmp / "optim.safetensors"):
            save_file({**opt_tensors, **{f"rng.{k}": v for k, v in rng.items()}}, str(tmp / "optim.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "data_rng": data_rng.bit_generator.state,
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        with _writing(tmp / "state.json"):
            (tmp / "state.json").write_text(json.dumps(state))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.path)
        return final

    def mark_latest(self, step: int) -> None:
        """latest.json: checkpoint `step` is complete (with the world size that made it, if not 1)."""
        marker = {"step": step, "dir": f"ckpt-{step}"}
        if self.world_size != 1:
            marker["world_size"] = self.world_size
        write_json(self.path / "latest.json", marker)

    def prune(self, step: int) -> None:
        """Delete the checkpoints other than `step`'s."""
        final = self.path / f"ckpt-{step}"
        for old in self.path.glob("ckpt-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def read_dense(self, step: int) -> dict[str, torch.Tensor]:
        """Checkpoint `step`'s model weights (the dense part; in resident mode the experts too)."""
        path = self.path / f"ckpt-{step}" / "model.safetensors"
        try:
            return load_file(str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing; restore the run directory from a backup") from None
        except SafetensorError as e:
            raise CheckpointError(f"{path}: unreadable ({e}); restore the run directory from a backup") from None

    def load_dense(self, step: int, model, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Load checkpoint `step`'s weights (or `weights`, read from it and renamed) into `model`,
        refusing one made for another model."""
        path = self.path / f"ckpt-{step}" / "model.safetensors"
        if weights is None:
            weights = self.read_dense(step)
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # a shape mismatch
            first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
            raise CheckpointError(f"{path}: made for another model ({first.strip()}); "
                                  f"use the run's own config.json or start over with --fresh") from None
        if unexpected or [k for k in missing if not k.startswith("rope_")]:
            raise CheckpointError(f"{path}: checkpoint does not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def load_training_state(self, step: int, opt, data_rng, scaler, device: str) -> int:
        """Restore the optimizer, the RNGs and the loss scale of checkpoint `step`; returns its step."""
        d = self.path / f"ckpt-{step}"
        state = json.loads((d / "state.json").read_text())
        flat = load_file(str(d / "optim.safetensors"))
        optimizer_from_flat(opt, {k: v for k, v in flat.items() if not k.startswith("rng.")}, state["optimizer"])
        torch.set_rng_state(flat["rng.torch_cpu"])
        if "rng.torch_cuda" in flat and device.startswith("cuda"):
            torch.cuda.set_rng_state(flat["rng.torch_cuda"], torch.device(device))
        data_rng.bit_generator.state = state["data_rng"]
        if state["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        # Drop metrics and routing logged after the checkpoint by the run that was killed.
        for path in (self.metrics, self.routing):
            if path.exists():
                keep_lines_up_to(path, state["step"])
        return state["step"]
