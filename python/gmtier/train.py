"""The training loop: forward -> backward (experts updated by the CPU AdamW as their gradients
appear) -> dense optimizer step; periodic validation; checkpoints (`gmtier.checkpoint`) and resume.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from gmtier import progress
from gmtier.activations import ActivationStash
from gmtier.build import autocast_dtype, build_model
from gmtier.checkpoint import CheckpointError, RunDir
from gmtier.config import Config, ConfigError, parse_bytes
from gmtier.layer_major import LayerMajorStep
from gmtier.data import ensure_data, require_eval_batch
from gmtier.distributed import RankRunDir, Ranks
from gmtier.evaluate import validate
from gmtier.model import SwitchFFN
from gmtier.optim import HostAdamW
from gmtier.user_errors import StoppedBySignal


def _malloc_trim():
    """glibc keeps freed heap pages of the step's variable-size CPU tensors (routing gives every
    expert a different token count), so RSS creeps up step after step; give them back."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return lambda: None
    return lambda: libc.malloc_trim(0)


release_host_memory = _malloc_trim()


class StopOnSigterm:
    """While training, SIGTERM (a scheduler's notice, a preemption, `timeout`) asks the loop to
    finish its step, write a checkpoint and return, so `--resume` loses no step. A second
    SIGTERM ends the process at once, as it would without this."""

    def __init__(self):
        self.requested = False
        self._installed = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._installed:  # None: a handler not set from Python, which stands for the default here
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    done = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)  # share of the decay
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, done)))


def tensorboard_writer_class():
    """torch's SummaryWriter, or a ConfigError naming the extra: asked for when the trainer starts,
    so a missing package is said before any step, not at the first log."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the separate tensorboard package
        raise ConfigError('train.tensorboard = true needs the tensorboard package: pip install "gmtier[tensorboard]" '
                          '(or set train.tensorboard = false)') from None
    return SummaryWriter


def dense_param_groups(model: torch.nn.Module, weight_decay: float):
    """Matrices decay, vectors (norms) do not. Resident experts are included (they are the reference)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def limit_gpu_memory(cfg: Config, device: str) -> None:
    """train.gpu_memory_limit: cap the whole process's GPU memory (torch's memory fraction)."""
    if not device.startswith("cuda"):
        return
    dev = torch.device(device)
    dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    total = torch.cuda.get_device_properties(dev).total_memory
    if cfg.train.gpu_memory_limit == "":  # none (also undoes an earlier run's cap in this process)
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        return
    limit = parse_bytes(cfg.train.gpu_memory_limit, "train.gpu_memory_limit")
    if limit > total:
        raise ConfigError(f"train.gpu_memory_limit = {cfg.train.gpu_memory_limit!r} is more than this GPU's "
                          f"{total / 1e9:.1f} GB; lower it or set it to \"\"")
    torch.cuda.set_per_process_memory_fraction(limit / total, dev)
    # Under a cap, fragmentation decides what fits: a layer-major step allocates and frees tensors
    # of the whole step's size (GBs) between micro-batch-sized ones, and fixed segments left split
    # by the small ones cannot take the next large one. Expandable segments map memory as needed.
    if hasattr(torch.cuda.memory, "_set_allocator_settings"):
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def activation_stash(cfg: Config, device: str) -> ActivationStash:
    """The tiers a layer-major step keeps its activations in (train.activations_*)."""
    t, m = cfg.train, cfg.model
    spill = Path(t.activations_dir) if t.activations_dir else Path(t.run_dir) / "activations"
    piece = t.batch_size * m.seq_len * m.d_model * 4  # one micro-batch's block input in fp32
    return ActivationStash(device, parse_bytes(t.activations_gpu_budget, "train.activations_gpu_budget"),
                           parse_bytes(t.activations_ram_budget, "train.activations_ram_budget"), spill, piece,
                           io_threads=cfg.experts.io_threads, direct=cfg.experts.direct)


class Trainer:
    """One run being trained. Holds the run directory's lock from construction to `close`."""

    def __init__(self, cfg: Config, resume: bool = False, fresh: bool = False, log=print):
        # Under torchrun (several ranks, gmtier.distributed) the trainer runs with its rank's view of
        # the config (its budgets, store and GPU); the run's own config is what config.json keeps.
        self.run_cfg = cfg
        self.ranks = Ranks.start(cfg)
        if self.ranks is not None:
            cfg = self.ranks.rank_config(cfg)
            if not self.ranks.leader:
                log = _silent
        self.cfg, self.log = cfg, log
        self.leader = self.ranks is None or self.ranks.leader
        self.device = self.ranks.device if self.ranks is not None else cfg.device()
        self.precision = cfg.precision()
        if self.precision == "bf16" and self.device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision = 'bf16' but this GPU has no bf16; use 'fp16' (with loss scaling) or 'auto'")
        self.run_dir = Path(cfg.train.run_dir)
        self.run = RunDir(self.run_dir) if self.ranks is None else RankRunDir(self.run_dir, self.ranks)
        self.runtime = self.tensorboard = self.layer_major = None
        writer_class = tensorboard_writer_class() if cfg.train.tensorboard else None
        self.run.lock()
        try:
            self._setup(resume, fresh)
            if writer_class is not None and self.leader:  # after _setup: --fresh clears the run directory
                self.tensorboard = writer_class(log_dir=str(self.run_dir / "tensorboard"))
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: bool, fresh: bool) -> None:
        cfg, log = self.cfg, self.log
        if fresh:
            self.run.clear()
        resuming = self.run.latest_step() is not None
        if resuming and not resume:
            raise CheckpointError(f"{self.run_dir} already holds a checkpoint; pass --resume to continue it or --fresh to start over")

        self.train_data, self.val_data = ensure_data(cfg, log)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.train_data.vocab_size
        elif cfg.model.vocab_size < self.train_data.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} < the data's vocabulary {self.train_data.vocab_size}; use 0 to take it from the data")
        if cfg.train.eval_every:  # found now rather than after the steps before the first evaluation
            require_eval_batch(self.val_data, cfg.train.batch_size, cfg.model.seq_len)
        if resuming:
            self.run.check_resumable(cfg)

        limit_gpu_memory(cfg, self.device)
        torch.manual_seed(cfg.train.seed)
        # A new run may replace a store left in its own directory by a run that never reached a
        # checkpoint; one elsewhere (experts.store_dir) only with --fresh.
        own_store = cfg.store_dir().resolve().is_relative_to(self.run_dir.resolve())
        if resuming and cfg.experts.mode == "tiered":
            self.run.align_stores(cfg.store_dir())
        self.model, self.runtime = build_model(cfg, self.device, store_create=not resuming,
                                               store_overwrite=fresh or own_store, log=log, ranks=self.ranks)
        self.model.set_checkpointing(cfg.train.activation_checkpointing)
        if self.ranks is not None and self.ranks.rank:
            # Every rank builds the dense part from the same seed; what torch draws from then on
            # (the router's jitter) is each rank's own stream, or every rank would put the same
            # noise on its own tokens. Rank 0 keeps the seed's stream; checkpoints keep each one's.
            torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, self.ranks.rank]).generate_state(1)[0]))
        if cfg.train.micro_batches > 1:
            self.layer_major = LayerMajorStep(self.model, activation_stash(cfg, self.device), self.autocast)
        groups = dense_param_groups(self.model, cfg.train.weight_decay)
        t = cfg.train
        if t.dense_optimizer == "cpu":
            self.opt = HostAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        else:
            fused = self.device.startswith("cuda")
            self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused or None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.amp = autocast_dtype(self.precision)
        self.rng = np.random.default_rng(t.seed)
        self.step = 0
        self.wall_s = 0.0  # wall time of the run so far (eval and checkpoints included), over resumes
        self.stopped_by_signal = False  # the last fit() stopped on SIGTERM (StopOnSigterm)
        self._stop: StopOnSigterm | None = None  # while fit() runs: whether SIGTERM came (train_step reads it)
        if resuming:
            self.load_checkpoint()
            self.wall_s = max((r.get("wall_s", 0.0) for r in self.run.read_metrics()), default=0.0)
        else:
            if resume:
                log(f"{self.run_dir}: no checkpoint yet, starting from step 0")
            self.run.metrics.unlink(missing_ok=True)
            self.run.routing.unlink(missing_ok=True)
        self.run.write_config(self.run_cfg)  # only once the run is accepted: a refused resume leaves the run as it was

    # ---- one step ---------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.split(":")[0], dtype=self.amp, enabled=self.amp is not None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        cfg = self.cfg
        self.model.train()
        lr = lr_at(cfg, self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        if self.runtime is not None:
            self.runtime.begin_step(lr=lr, grad_scale=scale)
        if self.layer_major is not None:  # x holds micro_batches x batch_size sequences
            b = cfg.train.batch_size
            try:
                loss, aux = self.layer_major.run(list(x.split(b)), list(y.split(b)), loss_scale=scale)
            except torch.cuda.OutOfMemoryError as e:
                limit = f"train.gpu_memory_limit = {cfg.train.gpu_memory_limit!r}" if cfg.train.gpu_memory_limit else "the GPU"
                torch_says = str(e).strip().split("\n")[0][:400]
                raise ConfigError(
                    f"a step of train.micro_batches = {cfg.train.micro_batches} x train.batch_size = {b} sequences ran out "
                    f"of GPU memory under {limit} ({self.layer_major.where}; torch: {torch_says}): a Switch block "
                    f"holds the step's sorted tokens and their outputs at once. Lower train.micro_batches, "
                    f"train.activations_gpu_budget or experts.gpu_budget, or set train.dense_optimizer = 'cpu'") from None
        else:
            with self.autocast():
                _, loss, aux = self.model(x, y)
            self.scaler.scale(loss + aux).backward()  # expert AdamW runs inside, as each expert's grads appear
        if self.runtime is not None:
            self.runtime.end_step()
        if self.ranks is not None:
            self.ranks.average_dense_grads(self.model)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        if cfg.train.grad_clip > 0:  # the dense part only: experts were already updated during backward
            dense = [p for n, p in self.model.named_parameters() if p.grad is not None and ".experts." not in n]
            torch.nn.utils.clip_grad_norm_(dense, cfg.train.grad_clip)
        self.scaler.step(self.opt)
        if self.scaler.is_enabled() and self.runtime is not None and self._any_rank(self.runtime.step_skipped):
            # Expert gradients overflowed at this loss scale (the scaler only sees the dense
            # ones): back off as GradScaler would, or the experts could skip every step.
            self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
        else:
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        stop = self._stop is not None and self._stop.requested
        if self.ranks is not None:  # each rank's are the means over its tokens; a stop asked on any rank is every rank's
            loss, aux, asked = self.ranks.mean(loss, aux, torch.full((), float(stop), device=loss.device))
            stop = bool(asked > 0)
        return {"loss": loss.item(), "aux": aux.item(), "lr": lr, "stop": stop}

    def _any_rank(self, flag: bool) -> bool:
        return flag if self.ranks is None else self.ranks.any(flag)

    def next_batch(self):
        """The step's sequences (micro_batches x batch_size of them on each rank): every rank
        draws the step's batch for all ranks from the same generator and takes its share."""
        t = self.cfg.train
        world = 1 if self.ranks is None else self.ranks.world
        x, y = self.train_data.batch(world * t.micro_batches * t.batch_size, self.cfg.model.seq_len, self.rng)
        return (x, y) if self.ranks is None else (self.ranks.shard(x), self.ranks.shard(y))

    @torch.no_grad()
    def evaluate(self, data, batches: int | None = None) -> float:
        """Mean cross entropy over one split's (`TokenData`'s) first `batches` (train.eval_batches)
        batches of fixed windows: a sample of the split (`gmtier eval` reads all of it). Sets
        `eval_batches_read`."""
        self.model.eval()
        total, n = 0.0, 0
        for x, y in data.eval_batches(self.cfg.train.batch_size, self.cfg.model.seq_len, batches or self.cfg.train.eval_batches):
            with self.autocast():
                _, loss, _ = self.model(x.to(self.device), y.to(self.device))
            total, n = total + loss.item(), n + 1
        self.model.train()
        if n == 0:
            require_eval_batch(data, self.cfg.train.batch_size, self.cfg.model.seq_len)
        self.eval_batches_read = n
        return total / n

    def _record_routing(self) -> None:
        """Append the experts each Switch layer used this step to routing.jsonl: the trace
        `gmtier bench-paging --trace` replays (rank 0's tokens, with several ranks)."""
        if not self.leader:
            return
        layers = [sorted(m.last_experts) for m in self.model.modules() if isinstance(m, SwitchFFN)]
        if layers:
            with open(self.run.routing, "a") as f:
                f.write(json.dumps({"step": self.step, "experts": layers}) + "\n")

    def _emit(self, record: dict) -> None:
        if not self.leader:
            return
        with open(self.run.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def fit(self, until: int | None = None) -> list[float]:
        """Train to train.steps (or stop after step `until`, as an interruption would); returns the losses."""
        cfg, t = self.cfg, self.cfg.train
        losses = []
        until = t.steps if until is None else min(until, t.steps)
        tokens_per_step = t.micro_batches * t.batch_size * cfg.model.seq_len * (1 if self.ranks is None else self.ranks.world)
        t0, tok0 = time.perf_counter(), 0
        start, start_step, wall0 = time.perf_counter(), self.step, self.wall_s
        # In a terminal one bar (steps, ETA, the last logged loss and tok/s) replaces the per-step
        # log lines; elsewhere the log lines are written as they always were.
        live = progress.interactive()
        self.stopped_by_signal = False
        with StopOnSigterm() as self._stop, progress.bar(total=until, initial=self.step, desc="training", unit="step") as bar:
            while self.step < until:
                x, y = self.next_batch()
                out = self.train_step(x, y)
                losses.append(out["loss"])
                tok0 += tokens_per_step
                bar.update(1)
                self.wall_s = wall0 + time.perf_counter() - start
                self._record_routing()
                if self.step % 10 == 0:
                    release_host_memory()
                if t.log_every and (self.step % t.log_every == 0 or self.step == t.steps):
                    dt = time.perf_counter() - t0
                    rec = {"step": self.step, "loss": out["loss"], "aux": out["aux"], "lr": out["lr"],
                           "tokens_per_s": tok0 / dt if dt > 0 else 0.0, "wall_s": self.wall_s}
                    if self.runtime is not None:
                        rec.update(self.runtime.metrics())
                    if self.layer_major is not None:
                        rec.update(self.layer_major.stash.metrics())
                    if self.scaler.is_enabled():
                        rec["loss_scale"] = self.scaler.get_scale()
                    self._emit(rec)
                    if live:
                        bar.set_postfix_str(" | ".join(self._progress_fields(rec, brief=True)))
                    else:
                        self.log(self._progress_line(rec))
                    t0, tok0 = time.perf_counter(), 0
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    t_eval = time.perf_counter()
                    val = validate(self.val_data, lambda d: (self.evaluate(d), self.eval_batches_read))
                    self.wall_s = wall0 + time.perf_counter() - start
                    self._emit({"step": self.step, **val.record(), "wall_s": self.wall_s})
                    self.log(f"step {self.step:6d} | {val.summary()} ({val.sample_note()})")
                    t0 += time.perf_counter() - t_eval
                saved = t.checkpoint_every and (self.step % t.checkpoint_every == 0 or self.step == t.steps)
                if saved:
                    t_ckpt = time.perf_counter()
                    self.save_checkpoint()
                    self.log(f"step {self.step:6d} | checkpoint {self.run_dir}/ckpt-{self.step}")
                    t0 += time.perf_counter() - t_ckpt  # tokens/s counts training time only
                if out["stop"]:  # every rank stops after the same step (train_step reduces the flag)
                    if not saved:
                        self.save_checkpoint()
                    self.log(f"step {self.step:6d} | stopped by SIGTERM: checkpoint {self.run_dir}/ckpt-{self.step}; "
                             f"continue with gmtier train --resume")
                    self.stopped_by_signal = True
                    break
        self._stop = None
        if self.step > start_step:
            wall = time.perf_counter() - start
            self.log(f"done: {self.step - start_step} steps in {wall:.1f}s "
                     f"({(self.step - start_step) * tokens_per_step / wall:,.0f} tok/s including eval and checkpoints)")
        return losses

    def _progress_fields(self, r: dict, brief: bool = False) -> list[str]:
        """What a logged step shows: the log line's fields, or (`brief`, the terminal's bar, which
        must fit one line beside the step count and ETA) those without lr and prefetch P/R."""
        fields = [f"loss {r['loss']:.4f}", *([] if brief else [f"lr {r['lr']:.2e}"]), f"{r['tokens_per_s']:,.0f} tok/s"]
        if "ram_hit_rate" in r:
            fields.append(f"ram hit {r['ram_hit_rate']:.2f}")
        if "gpu_hit_rate" in r:
            fields.append(f"gpu hit {r['gpu_hit_rate']:.2f}")
        if "prefetch_recall" in r and not brief:
            fields.append(f"prefetch P/R {r['prefetch_precision']:.2f}/{r['prefetch_recall']:.2f}")
        return fields

    def _progress_line(self, r: dict) -> str:
        return " | ".join([f"step {r['step']:6d}/{self.cfg.train.steps}", *self._progress_fields(r)])

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        return self.run.save(self.step, self.model, self.opt, self.rng, self.scaler, self.device, self.runtime)

    def load_checkpoint(self) -> None:
        step = self.run.resume_step(self.runtime)
        self.run.load_dense(step, self.model)
        self.step = self.run.load_training_state(step, self.opt, self.rng, self.scaler, self.device)
        self.log(f"resumed {self.run_dir} at step {self.step}")

    def close(self) -> None:
        try:
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.runtime is not None:
                self.runtime.close()
            if self.layer_major is not None:
                self.layer_major.stash.close()
        finally:
            self.run.unlock()
            if self.ranks is not None:
                self.ranks.close()


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0 (rank 0 speaks for the run)."""


def train(cfg: Config, resume: bool = False, fresh: bool = False, log=print) -> list[float]:
    trainer = Trainer(cfg, resume=resume, fresh=fresh, log=log)
    try:
        losses = trainer.fit()
    finally:
        trainer.close()
    if trainer.stopped_by_signal:
        raise StoppedBySignal(trainer.step)
    return losses
