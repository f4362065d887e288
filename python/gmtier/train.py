"""The training loop: forward -> backward (experts updated by the CPU AdamW as their gradients
appear) -> dense optimizer step; periodic validation; atomic checkpoints; resume.

A run directory holds:

    config.json        the resolved config
    store/             the expert store (tiered mode); its last commit is the experts' checkpoint
    ckpt-<step>/       model.safetensors (dense weights; all weights in resident mode),
                       optim.safetensors + state.json (optimizer, step, data and torch RNG, loss scale)
    latest.json        {"step": S}: the last complete checkpoint
    metrics.jsonl      one JSON object per logged step / evaluation

A checkpoint is written as ckpt-<S>.tmp, renamed to ckpt-<S>, then the store is committed with
{"step": S}, then latest.json is replaced. A kill at any point leaves either the previous
checkpoint (store commit still at the previous step) or the new one complete; on resume the
store's committed step picks the dense checkpoint, and a mismatch is a clear error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gmtier.config import Config, ConfigError, parse_bytes
from gmtier.model import GPT, ResidentExperts, SwitchFFN
from gmtier.optim import HostAdamW, optimizer_from_flat, optimizer_to_flat


class CheckpointError(RuntimeError):
    pass


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_data(cfg: Config, log=print):
    """Prepare the data directory on first use (README: `gmtier train` prepares RusLit itself)."""
    from gmtier import data

    if not (Path(cfg.data.dir) / "meta.json").is_file():
        log(f"preparing {cfg.data.dir} from {cfg.data.source} (vocab {cfg.data.vocab_size}) ...")
        data.prepare(cfg.data.source, cfg.data.dir, cfg.data.vocab_size,
                     cfg.data.max_train_chars or None, cfg.data.max_val_chars or None)
    return data.TokenData(cfg.data.dir, "train"), data.TokenData(cfg.data.dir, "val")


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


def autocast_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def build_model(cfg: Config, device: str, store_create: bool = False, log=print):
    """The model on `device` and, in tiered mode, the expert runtime (None in resident mode)."""
    runtime = None
    if cfg.experts.mode == "tiered" and cfg.model.switch_layers():
        from gmtier.experts import ExpertRuntime

        runtime = ExpertRuntime(cfg, device, create=store_create, log=log)
        model = GPT(cfg.model, cfg.train.seed, expert_bank=runtime.bank)
    else:
        seed, pad_rows = cfg.train.seed, cfg.expert_pad_rows()
        model = GPT(cfg.model, seed, expert_bank=lambda layer: ResidentExperts(cfg.model, layer, seed, pad_rows))
    model.to(device)
    if runtime is not None:
        runtime.attach(model)
    return model, runtime


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def dense_param_groups(model: torch.nn.Module, weight_decay: float):
    """Matrices decay, vectors (norms) do not. Resident experts are included (they are the reference)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, fresh: bool = False, log=print):
        self.cfg, self.log = cfg, log
        self.device = cfg.device()
        self.precision = cfg.precision()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"train.device = {cfg.train.device!r} but CUDA is not available; use \"cpu\" or \"auto\"")
        if self.precision == "bf16" and self.device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision = 'bf16' but this GPU has no bf16; use 'fp16' (with loss scaling) or 'auto'")
        self.run_dir = Path(cfg.train.run_dir)
        if fresh and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        has_ckpt = (self.run_dir / "latest.json").exists()
        if has_ckpt and not resume:
            raise CheckpointError(f"{self.run_dir} already holds a checkpoint; pass --resume to continue it or --fresh to start over")
        self.run_dir.mkdir(parents=True, exist_ok=True)

        self.train_data, self.val_data = ensure_data(cfg, log)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = self.train_data.vocab_size
        elif cfg.model.vocab_size < self.train_data.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} < the data's vocabulary {self.train_data.vocab_size}; use 0 to take it from the data")
        _write_json(self.run_dir / "config.json", cfg.to_dict())

        torch.manual_seed(cfg.train.seed)
        self.model, self.runtime = build_model(cfg, self.device, store_create=not (resume and has_ckpt), log=log)
        self.model.set_checkpointing(cfg.train.activation_checkpointing)
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
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume and has_ckpt:
            self.load_checkpoint()
        else:
            if resume:
                log(f"{self.run_dir}: no checkpoint yet, starting from step 0")
            self.metrics_path.unlink(missing_ok=True)
            (self.run_dir / "routing.jsonl").unlink(missing_ok=True)

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
        if self.runtime is not None:
            self.runtime.begin_step(lr=lr, grad_scale=self.scaler.get_scale() if self.scaler.is_enabled() else 1.0)
        with self.autocast():
            _, loss, aux = self.model(x, y)
        self.scaler.scale(loss + aux).backward()  # expert AdamW runs inside, as each expert's grads appear
        if self.runtime is not None:
            self.runtime.end_step()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        if cfg.train.grad_clip > 0:  # the dense part only: experts were already updated during backward
            dense = [p for n, p in self.model.named_parameters() if p.grad is not None and ".experts." not in n]
            torch.nn.utils.clip_grad_norm_(dense, cfg.train.grad_clip)
        self.scaler.step(self.opt)
        if self.scaler.is_enabled() and self.runtime is not None and self.runtime.step_skipped:
            # Expert gradients overflowed at this loss scale (the scaler only sees the dense
            # ones): back off as GradScaler would, or the experts could skip every step.
            self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
        else:
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss.item(), "aux": aux.item(), "lr": lr}

    @torch.no_grad()
    def evaluate(self, data=None, batches: int | None = None) -> float:
        """Mean cross entropy over the split's first `batches` fixed windows."""
        data = data or self.val_data
        self.model.eval()
        total, n = 0.0, 0
        for x, y in data.eval_batches(self.cfg.train.batch_size, self.cfg.model.seq_len, batches or self.cfg.train.eval_batches):
            with self.autocast():
                _, loss, _ = self.model(x.to(self.device), y.to(self.device))
            total, n = total + loss.item(), n + 1
        self.model.train()
        if n == 0:
            raise ConfigError(f"the {data.split} split is shorter than one batch of train.batch_size x model.seq_len tokens")
        return total / n

    def _record_routing(self) -> None:
        """Append the experts each Switch layer used this step to routing.jsonl: the trace
        `gmtier bench-paging --trace` replays."""
        from gmtier.model import SwitchFFN

        layers = [sorted(m.last_experts) for m in self.model.modules() if isinstance(m, SwitchFFN)]
        if layers:
            with open(self.run_dir / "routing.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "experts": layers}) + "\n")

    def _emit(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self, until: int | None = None) -> list[float]:
        """Train to train.steps (or stop after step `until`, as an interruption would); returns the losses."""
        cfg, t = self.cfg, self.cfg.train
        losses = []
        until = t.steps if until is None else min(until, t.steps)
        tokens_per_step = t.batch_size * cfg.model.seq_len
        t0, tok0 = time.perf_counter(), 0
        start, start_step = time.perf_counter(), self.step
        while self.step < until:
            x, y = self.train_data.batch(t.batch_size, cfg.model.seq_len, self.rng)
            out = self.train_step(x, y)
            losses.append(out["loss"])
            tok0 += tokens_per_step
            self._record_routing()
            if self.step % 10 == 0:
                release_host_memory()
            if t.log_every and (self.step % t.log_every == 0 or self.step == t.steps):
                dt = time.perf_counter() - t0
                rec = {"step": self.step, "loss": out["loss"], "aux": out["aux"], "lr": out["lr"],
                       "tokens_per_s": tok0 / dt if dt > 0 else 0.0}
                if self.runtime is not None:
                    rec.update(self.runtime.metrics())
                if self.scaler.is_enabled():
                    rec["loss_scale"] = self.scaler.get_scale()
                self._emit(rec)
                self.log(self._progress_line(rec))
                t0, tok0 = time.perf_counter(), 0
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                t_eval = time.perf_counter()
                val = self.evaluate()
                self._emit({"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
                self.log(f"step {self.step:6d} | val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.2f}")
                t0 += time.perf_counter() - t_eval
            if t.checkpoint_every and (self.step % t.checkpoint_every == 0 or self.step == t.steps):
                t_ckpt = time.perf_counter()
                self.save_checkpoint()
                self.log(f"step {self.step:6d} | checkpoint {self.run_dir}/ckpt-{self.step}")
                t0 += time.perf_counter() - t_ckpt  # tokens/s counts training time only
        if self.step > start_step:
            wall = time.perf_counter() - start
            self.log(f"done: {self.step - start_step} steps in {wall:.1f}s "
                     f"({(self.step - start_step) * tokens_per_step / wall:,.0f} tok/s including eval and checkpoints)")
        return losses

    def _progress_line(self, r: dict) -> str:
        line = f"step {r['step']:6d}/{self.cfg.train.steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s"
        if "ram_hit_rate" in r:
            line += f" | ram hit {r['ram_hit_rate']:.2f}"
        if "gpu_hit_rate" in r:
            line += f" | gpu hit {r['gpu_hit_rate']:.2f}"
        if "prefetch_recall" in r:
            line += f" | prefetch P/R {r['prefetch_precision']:.2f}/{r['prefetch_recall']:.2f}"
        return line

    # ---- checkpoints ------------------------------------------------------------------------
    def _dense_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}

    def save_checkpoint(self) -> Path:
        step = self.step
        final = self.run_dir / f"ckpt-{step}"
        tmp = self.run_dir / f"ckpt-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(self._dense_state(), str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(self.opt)
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.device.startswith("cuda"):
            rng["torch_cuda"] = torch.cuda.get_rng_state(torch.device(self.device))
        save_file({**opt_tensors, **{f"rng.{k}": v for k, v in rng.items()}}, str(tmp / "optim.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "data_rng": self.rng.bit_generator.state,
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.run_dir)
        if self.runtime is not None:
            self.runtime.commit({"step": step})  # the experts' snapshot for this step
        _write_json(self.run_dir / "latest.json", {"step": step, "dir": final.name})
        for old in self.run_dir.glob("ckpt-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> None:
        step = json.loads((self.run_dir / "latest.json").read_text())["step"]
        if self.runtime is not None:
            store_step = self.runtime.committed_step()
            if store_step != step:
                # A kill between the store commit and latest.json: the store is one checkpoint
                # ahead, and its dense half is already complete on disk.
                if store_step is not None and (self.run_dir / f"ckpt-{store_step}" / "state.json").exists():
                    step = store_step
                else:
                    raise CheckpointError(
                        f"{self.run_dir}: the expert store was committed at step {store_step} but the last dense "
                        f"checkpoint is step {step}; the run directory was changed by hand. Start over with --fresh.")
        d = self.run_dir / f"ckpt-{step}"
        state = json.loads((d / "state.json").read_text())
        weights = load_file(str(d / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.startswith("rope_")]:
            raise CheckpointError(f"{d}: checkpoint does not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        flat = load_file(str(d / "optim.safetensors"))
        optimizer_from_flat(self.opt, {k: v for k, v in flat.items() if not k.startswith("rng.")}, state["optimizer"])
        torch.set_rng_state(flat["rng.torch_cpu"])
        if "rng.torch_cuda" in flat and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(flat["rng.torch_cuda"], torch.device(self.device))
        self.rng.bit_generator.state = state["data_rng"]
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        # Drop metrics and routing logged after the checkpoint by the run that was killed.
        for path in (self.metrics_path, self.run_dir / "routing.jsonl"):
            if path.exists():
                _keep_lines_up_to(path, self.step)
        self.log(f"resumed {self.run_dir} at step {self.step}")

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()


def _keep_lines_up_to(path: Path, step: int) -> None:
    """Keep the JSON lines of `path` logged at or before `step` (and none cut by a kill)."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg: Config, resume: bool = False, fresh: bool = False, log=print) -> list[float]:
    trainer = Trainer(cfg, resume=resume, fresh=fresh, log=log)
    try:
        return trainer.fit()
    finally:
        trainer.close()
