"""Typed configs loaded from TOML: `[model]`, `[data]`, `[train]`, `[experts]`.

Every key has a type and a default; an unknown key, a wrong type or a budget that cannot work
raises `ConfigError` naming the key and what to change. `--set section.key=value` overrides go
through the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gmtier import _core, dtypes, record


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: take it from the prepared data's meta.json
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    seq_len: int = 128
    positions: str = "rope"  # "rope" or "learned"
    n_experts: int = 8
    switch_every: int = 2  # every k-th block has a Switch FFN (blocks k-1, 2k-1, ...); 0 = dense
    capacity_factor: float = 1.25  # 0 = dropless
    eval_capacity_factor: float = 0.0  # when not training (eval, generate): 0 = dropless; the Switch paper evaluates at 2.0
    router_jitter: float = 0.0  # multiplicative input noise U(1-eps, 1+eps) for the router (training only)
    aux_loss_coef: float = 0.01  # Switch eq. 4 alpha
    z_loss_coef: float = 0.001
    init_std: float = 0.02

    def switch_layers(self) -> list[int]:
        """Block indices that have a Switch FFN."""
        if self.switch_every <= 0 or self.n_experts <= 0:
            return []
        return [i for i in range(self.n_layer) if (i + 1) % self.switch_every == 0]


DEFAULT_SOURCE = "../shared/data/ruslit"
_CORPUS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class CorpusConfig:
    """One corpus of a mixture (a `[[data.corpora]]` table)."""
    source: str = ""  # corpus directory: train/val .jsonl(.gz) or .txt files, or shards train-*.jsonl.gz
    weight: float = 1.0  # share of the train batches' rows drawn from it (weights are normalised)
    name: str = ""  # "" = the source directory's name; names the corpus's files and its val metrics


@dataclass
class DataConfig:
    dir: str = "data/ruslit"  # a directory written by `gmtier prepare`; prepared on first use if missing
    source: str = DEFAULT_SOURCE  # corpus used to prepare `dir` when it is missing
    vocab_size: int = 8192  # tokenizer size when preparing
    # 0 = all of the train split. With `corpora`, the total: each corpus gets at most its weight's share.
    max_train_chars: int = 0
    max_val_chars: int = 0  # 0 = all of the val split (with `corpora`: of each corpus's val split)
    # A mixture instead of `source`: [[data.corpora]] tables (source, weight, name); one tokenizer
    # over all of them, train batches drawn by weight, one validation split per corpus.
    corpora: list[CorpusConfig] = field(default_factory=list)

    def mixture(self) -> list[CorpusConfig]:
        """The corpora to train on: `corpora`, or the one `source` (weight 1)."""
        if self.corpora:
            return self.corpora
        return [CorpusConfig(source=self.source, weight=1.0, name=corpus_name(self.source))]


def corpus_name(source: str) -> str:
    """A corpus's default name: its directory's name."""
    return Path(source).resolve().name if source else ""


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    precision: str = "auto"  # "auto" (bf16 where supported, else fp16 on cuda; fp32 on cpu), "fp32", "bf16", "fp16"
    seed: int = 1337
    steps: int = 200
    batch_size: int = 16  # sequences per micro-batch (the batch that runs through the dense blocks at once)
    # Micro-batches per optimizer step: a step is micro_batches x batch_size sequences. With more
    # than one the step is layer-major (gmtier.layer_major): each block runs over every
    # micro-batch before the next block, so each expert is paged once per step for all of them.
    micro_batches: int = 1
    # Where a layer-major step keeps the block inputs it saves for backward: this much on the
    # compute device, then this much of pinned host memory (its own budget, outside
    # experts.ram_budget), the rest spilled to activations_dir with O_DIRECT I/O.
    activations_gpu_budget: int | str = "2GB"
    activations_ram_budget: int | str = "4GB"
    activations_dir: str = ""  # "" = <run_dir>/activations (scratch: deleted at the end of each step)
    # Cap on the whole process's GPU memory (torch's per-process memory fraction), e.g. "11GB" to
    # hold a run to an 11 GB card's envelope on a larger GPU; "" = no cap.
    gpu_memory_limit: int | str = ""
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # applies to the dense parameters (experts are updated during backward); 0 = off
    activation_checkpointing: bool = False
    dense_optimizer: str = "torch"  # "torch" (AdamW on the device) or "cpu" (Rust CPU AdamW, host memory)
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    # Also write the metrics.jsonl scalars (same names) to <run_dir>/tensorboard/ for TensorBoard;
    # needs the tensorboard package: pip install "gmtier[tensorboard]".
    tensorboard: bool = False


@dataclass
class ExpertsConfig:
    mode: str = "tiered"  # "tiered" (experts in the store) or "resident" (nn.Parameters + torch AdamW)
    store_dir: str = ""  # "" = <run_dir>/store
    ram_budget: int | str = "256MB"
    gpu_budget: int | str = "1GB"
    dtype: str = "auto"  # expert weights: "auto" (= training precision), "fp32", "bf16", "fp16"
    # The record's optimizer state (gmtier.record): "fp32" (fp32 master and moments, 14 B/param
    # with bf16 weights) or "compact" (bf16 weights as their own master, 8-bit moments: 4 B/param).
    state: str = "fp32"
    # Record slots of the store file beyond one per expert. "auto": one per expert (2x the
    # records on disk), so every checkpoint is exact whatever it changed. Fewer: a smaller file;
    # where more experts change between two checkpoints than there are spares, the store commits
    # on its own, and a run killed after that cannot resume exactly (it is refused).
    spare_slots: int | str = "auto"
    prefetch: bool = True  # router-predicted read-ahead into RAM (skipped when RAM holds every record)
    gpu_prefetch: bool = True  # with prefetch: also copy the nearest layer's predicted experts to the GPU early
    prefetch_depth: int = 2  # how many following Switch layers the router predicts for
    io_threads: int = 4
    direct: bool = True  # O_DIRECT reads/writes (falls back where the filesystem refuses)
    async_adam: bool = True  # run the expert AdamW in a worker thread while backward continues
    # Where RAM cannot hold every record: the last N records a step updates (the first Switch
    # layer's last experts with tokens) are written back once the step's updates are done, while
    # the next forward computes, instead of each as its update ends (which would leave the disk
    # writing alone at the end of backward). "auto": as many as RAM has slots, so the whole first
    # layer where it fits (ExpertPlan.deferred_writes); 0: none.
    deferred_writes: int | str = "auto"
    # Whether the store's reads and writes run at once ("together") or take turns of 1 GiB, never
    # at once ("turns"): some disks move fewer bytes a second doing both at once than one after
    # the other (on H200 boxes, 2.18 GB/s at once against 2.44 in turns), others more. "auto":
    # where RAM cannot hold every record (so steps write back), short probes of the store's disk
    # when it opens decide (gmtier.store.disk.read_write_turns); "together" where RAM holds all.
    # "together" by default: turns have not yet beaten it in a training step (docs/performance.md).
    read_write: str = "together"
    # CPU threads of the expert AdamW; 0 = all cores (on an H200 box, 16 beat 8, 4 and 2: the
    # update is memory-bound and sits close to the critical path of backward).
    adam_threads: int = 0  # 0: all cores but two on machines with 8 or more, else all
    # Each expert's token count rounded up to a multiple of this (zero rows fill the gap), so the
    # GEMM shapes repeat from step to step and cuBLAS finds them in its cache. "auto": 128 on CUDA,
    # none on CPU (no such cache there: padding would only add work); 0 or 1: no padding.
    pad_rows: int | str = "auto"
    # How the experts' GEMMs run: "grouped" (one torch._grouped_mm per matrix for all the experts
    # of a layer on the GPU, forward, dx and dW), "loop" (a GEMM per expert, runs everywhere) or
    # "auto" (grouped where torch has the kernel: sm90/sm100 GPUs in bf16). Experts the tiered
    # store pages in one by one always run in the loop. Grouped GEMMs that raise or differ from
    # the loop at their first use fall back to it, with a warning.
    gemm: str = "auto"
    # Resident Switch layers with grouped GEMMs: "auto" replays each layer's training forward and
    # backward as CUDA graphs where they give the eager layer's numbers (gmtier.experts.graphed);
    # "off" launches every kernel eagerly.
    graphs: str = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)

    # ---- derived quantities -------------------------------------------------------------
    def device(self) -> str:
        """The device to run on; a ConfigError where train.device names CUDA and there is none."""
        device = self._device()
        if device.startswith("cuda") and not _cuda_available():
            raise ConfigError(f"train.device = {device!r}, but CUDA is not available on this machine "
                              "(no GPU, or torch built without CUDA); use train.device=cpu or auto")
        return device

    def _device(self) -> str:
        """The device train.device names, whether or not it exists here (a config for CUDA
        still loads, and says what it would use, on a machine without it)."""
        if self.train.device == "auto":
            return "cuda" if _cuda_available() else "cpu"
        return self.train.device

    def precision(self) -> str:
        """fp32, bf16 or fp16 for this device."""
        import torch

        p = self.train.precision
        if self._device() == "cpu":
            return "fp32" if p == "auto" else p
        if p == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return p

    def expert_dtype(self) -> str:
        if self.experts.dtype == "auto":
            return "bf16" if self.experts.state == "compact" else self.precision()
        return self.experts.dtype

    def spare_slots(self) -> int | None:
        """experts.spare_slots as the store takes it (None: one per expert)."""
        return None if self.experts.spare_slots == "auto" else self.experts.spare_slots

    def expert_pad_rows(self) -> int:
        if self.experts.pad_rows == "auto":
            return 128 if self._device().startswith("cuda") else 0
        return self.experts.pad_rows

    def store_dir(self) -> Path:
        return Path(self.experts.store_dir) if self.experts.store_dir else Path(self.train.run_dir) / "store"

    def expert_schema(self) -> list[tuple[str, str, list[int], str]]:
        """The store record of one expert of this model (`gmtier.record.expert_schema`)."""
        return record.expert_schema(self.model.d_model, self.model.d_ff, dtypes.from_config(self.expert_dtype()),
                                    self.experts.state)

    def expert_bytes(self) -> tuple[int, int]:
        """(weights_bytes, record_bytes) of one expert record, as the Rust store lays it out."""
        _, record_bytes, weights_bytes = _core.record_layout(self.expert_schema())
        return weights_bytes, record_bytes

    def plan(self, device: str, gpu_tier: bool) -> "ExpertPlan":
        """The tiers' slots, dW groups and prefetch room of a tiered run on `device`
        (`gpu_tier`: whether the run has a GPU tier: on CUDA, or emulated on CPU)."""
        return ExpertPlan.build(self, device, gpu_tier)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


GRAD_GROUP = 8  # experts whose dW leave together where both tiers hold every record


def grad_staging(cfg: Config, ram_bytes: int, gpu_bytes: int, n_records: int) -> tuple[int, int]:
    """(experts per dW group, GPU slots that stage dW). Where both tiers hold every record with
    room to spare, the dW of up to `GRAD_GROUP` experts leave in one D2H copy and get one AdamW
    job: backward at small experts is bound by its host work per expert (events, copies, the
    hand-off to the AdamW thread), and this does that work once per group; two groups of slots
    (one being filled while the other drains to RAM). Else one expert at a time: two staging
    slots where the GPU budget holds at least six experts, else one."""
    weights, record = cfg.expert_bytes()
    group = min(GRAD_GROUP, cfg.model.n_experts)
    # Room in RAM for the updates in flight (3 groups) and the records in copies and paging.
    ram_holds_all = ram_bytes // record >= n_records + 3 * group + 5
    gpu_holds_all = not gpu_bytes or gpu_bytes // weights - 2 * group >= n_records + 2
    if group > 1 and ram_holds_all and gpu_holds_all:
        return group, (2 * group if gpu_bytes else 0)
    if not gpu_bytes:
        return 1, 0
    return 1, (2 if gpu_bytes // weights >= 6 else 1)


@dataclass(frozen=True)
class ExpertPlan:
    """What a tiered run's budgets buy, in the store's own sizes (`_core.record_layout`).

    Experts waiting for their AdamW stay pinned (RAM and GPU); two more are pinned by the
    paging loop (current + next), so the budgets bound how many updates may be in flight. On
    CUDA the GPU tier keeps a RAM record pinned until the H2D copy that read it has finished:
    two such copies are counted in flight, and one GPU prefetch copy. GPU prefetch runs where
    the tier cannot keep every expert (it keeps those it has room for, refreshed after each
    AdamW)."""

    weights_bytes: int
    record_bytes: int
    ram_bytes: int
    gpu_bytes: int  # 0 without a GPU tier
    n_records: int
    ram_slots: int
    gpu_slots: int  # GPU slots for weights (the budget less the dW staging slots)
    grad_group: int  # experts whose dW leave in one copy and get one AdamW job
    grad_slots: int  # GPU slots that stage dW
    gpu_prefetch: bool
    max_pending: int  # expert updates that may be queued or running
    prefetch_room: int  # RAM slots left for read-ahead
    deferred_writes: int  # the step's last updated records written during the next forward

    @classmethod
    def build(cls, cfg: Config, device: str, gpu_tier: bool) -> "ExpertPlan":
        e = cfg.experts
        weights, record = cfg.expert_bytes()
        n_records = len(cfg.model.switch_layers()) * cfg.model.n_experts
        gpu_bytes = parse_bytes(e.gpu_budget, "experts.gpu_budget") if gpu_tier else 0
        ram_bytes = parse_bytes(e.ram_budget, "experts.ram_budget")
        group, grad_slots = grad_staging(cfg, ram_bytes, gpu_bytes, n_records)
        ram_slots = ram_bytes // record
        gpu_slots = gpu_bytes // weights - grad_slots if gpu_bytes else 0
        gpu_prefetch = bool(gpu_bytes) and e.prefetch and e.gpu_prefetch and gpu_slots - 2 < n_records
        in_copy = (2 + gpu_prefetch) if gpu_bytes else 0
        slots = ram_slots - in_copy
        if gpu_bytes:
            slots = min(slots, gpu_slots)
        # Up to 8 updates queued (three groups where dW goes in groups) lets backward run ahead of
        # the CPU AdamW (2 put the AdamW on the critical path of the `small` step on an H200);
        # small budgets keep fewer.
        cap = max(8, 3 * group)
        max_pending = max(0, min(min(cap, max(2, (slots - 2) // 2)), slots - 2)) if e.async_adam else 0
        # Prefetching more than the RAM slots left once those pins are counted would only evict
        # records before their use and read them twice.
        prefetch_room = max(0, ram_slots - in_copy - 2 - max_pending)
        # The step's last updates may stay dirty until the next forward as far as RAM has slots:
        # a read that needs one of them sooner writes it first, one after the other, which on the
        # H200 box's disk is no slower than writing beside the reads. On that box deferring all 8
        # records of the first layer (RAM 8 slots) beat 4 and 0 (exp/store_ab.py). None
        # where RAM holds every record: that writes at the commit only.
        all_in_ram = _ram_holds_all(ram_slots, n_records, max_pending)
        deferred = (0 if all_in_ram else ram_slots) if e.deferred_writes == "auto" else e.deferred_writes
        return cls(weights, record, ram_bytes, gpu_bytes, n_records, ram_slots, gpu_slots, group, grad_slots,
                   gpu_prefetch, max_pending, prefetch_room, deferred)

    @property
    def all_in_ram(self) -> bool:
        """Whether the RAM tier holds every record besides the updates in flight and the two paged."""
        return _ram_holds_all(self.ram_slots, self.n_records, self.max_pending)


def _ram_holds_all(ram_slots: int, n_records: int, max_pending: int) -> bool:
    return ram_slots >= n_records + max_pending + 2


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | str, key: str) -> int:
    """`123`, `"512MB"`, `"11 GB"`, `"1.5GiB"` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r}: expected a byte count such as 11GB or 512MiB")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key} = {value}: a budget cannot be negative; use a byte count such as 11GB or 0")
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"{key} = {value!r}: expected a byte count such as 11GB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


EXPERT_GEMMS = ("auto", "grouped", "loop")  # experts.gemm (see gmtier.experts.bank.resolve_gemm)
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "experts": ExpertsConfig}
_CHOICES = {
    "model.positions": ("rope", "learned"),
    "train.precision": ("auto", *dtypes.CONFIG),
    "train.dense_optimizer": ("torch", "cpu"),
    "experts.mode": ("tiered", "resident"),
    "experts.dtype": ("auto", *dtypes.CONFIG),
    "experts.state": record.STATES,
    "experts.gemm": EXPERT_GEMMS,
    "experts.graphs": ("auto", "off"),
}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _corpora(key: str, value) -> list[CorpusConfig]:
    """`[[data.corpora]]` tables (a list of dicts; a saved config.json has the same) -> CorpusConfig."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{key} must be a list of tables, each with source, weight and (optionally) name: "
                          f'[[data.corpora]] source = "../shared/data/ruslit" weight = 0.5')
    fields = {f.name: f for f in dataclasses.fields(CorpusConfig)}
    corpora = []
    for i, table in enumerate(value):
        corpus = CorpusConfig()
        for k, v in table.items():
            if k not in fields:
                raise ConfigError(f"unknown key {key}[{i}].{k}; known keys: {', '.join(fields)}")
            setattr(corpus, k, _check_type(f"{key}[{i}].{k}", v, fields[k].type))
        corpora.append(corpus)
    return corpora


def _check_type(key: str, value, annotation):
    if annotation == "list[CorpusConfig]":
        return _corpora(key, value)
    kinds = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,), "int | str": (int, str)}[annotation]
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{key} = {value!r}: expected {annotation}, got a boolean")
    if not isinstance(value, kinds):
        raise ConfigError(f"{key} = {value!r}: expected {annotation}, got {type(value).__name__}")
    return float(value) if annotation == "float" else value


def from_dict(raw: dict) -> Config:
    cfg = Config()
    for section, values in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section [{section}]; known sections: {', '.join(_SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        obj = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown key {section}.{key}; known keys in [{section}]: {', '.join(fields)}")
            setattr(obj, key, _check_type(f"{section}.{key}", value, fields[key].type))
    validate(cfg)
    return cfg


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.key=value` (value parsed as TOML, else taken as a string) into the raw dict."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=50")
        path, text = item.split("=", 1)
        section, key = path.strip().split(".", 1)
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        raw.setdefault(section, {})[key] = value
    return raw


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(apply_overrides(raw, list(overrides)))


def validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r}: choose one of {', '.join(map(repr, choices))}")
    _validate_data(cfg.data)
    m, t, e = cfg.model, cfg.train, cfg.experts
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", t.device):
        raise ConfigError(f"train.device = {t.device!r}: choose one of 'auto', 'cpu', 'cuda' or 'cuda:N'")
    for key in ("n_layer", "n_head", "d_model", "d_ff", "seq_len"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key} = {getattr(m, key)}: must be positive")
    if m.d_model % m.n_head:
        raise ConfigError(f"model.d_model = {m.d_model} is not divisible by model.n_head = {m.n_head}")
    if m.positions == "rope" and (m.d_model // m.n_head) % 2:
        raise ConfigError(f"model.positions = 'rope' needs an even head size; d_model / n_head = {m.d_model // m.n_head}")
    if m.switch_every < 0 or m.n_experts < 0:
        raise ConfigError("model.switch_every and model.n_experts must be >= 0 (0 = dense)")
    if m.switch_every > m.n_layer:
        raise ConfigError(f"model.switch_every = {m.switch_every} > model.n_layer = {m.n_layer}: no block would be a Switch block; use 0 for dense")
    if m.capacity_factor < 0:
        raise ConfigError(f"model.capacity_factor = {m.capacity_factor}: use a value >= 1 or 0 for dropless")
    if m.eval_capacity_factor < 0:
        raise ConfigError(f"model.eval_capacity_factor = {m.eval_capacity_factor}: use a value >= 1 (the Switch paper "
                          "evaluates at 2.0) or 0 for dropless")
    if not 0 <= m.router_jitter < 1:
        raise ConfigError(f"model.router_jitter = {m.router_jitter}: must be in [0, 1)")
    if t.steps <= 0 or t.batch_size <= 0:
        raise ConfigError("train.steps and train.batch_size must be positive")
    if t.micro_batches < 1:
        raise ConfigError(f"train.micro_batches = {t.micro_batches}: must be >= 1 (1 = one batch a step)")
    parse_bytes(t.activations_gpu_budget, "train.activations_gpu_budget")
    parse_bytes(t.activations_ram_budget, "train.activations_ram_budget")
    if t.gpu_memory_limit != "":
        parse_bytes(t.gpu_memory_limit, "train.gpu_memory_limit")
    if t.warmup_steps < 0 or t.lr <= 0 or t.min_lr < 0:
        raise ConfigError("train.lr must be > 0, train.min_lr and train.warmup_steps >= 0")
    for key in ("log_every", "eval_every", "checkpoint_every", "eval_batches"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0")
    if e.adam_threads < 0:
        raise ConfigError(f"experts.adam_threads = {e.adam_threads}: use 0 (the default: all cores, less two on 8+ cores) or a positive count")
    if e.deferred_writes != "auto" and (isinstance(e.deferred_writes, (str, bool)) or e.deferred_writes < 0):
        raise ConfigError(f"experts.deferred_writes = {e.deferred_writes!r}: use \"auto\", 0 (write every record "
                          f"as its update ends) or a number of records")
    if e.read_write not in ("auto", "together", "turns"):
        raise ConfigError(f"experts.read_write = {e.read_write!r}: use \"auto\" (probe the disk), \"together\" "
                          f"(reads and writes at once) or \"turns\" (reads and writes take turns)")
    if e.pad_rows != "auto" and (isinstance(e.pad_rows, str) or e.pad_rows < 0):
        raise ConfigError(f"experts.pad_rows = {e.pad_rows!r}: use \"auto\", 0 (no padding) or a row multiple such as 128")
    if e.state == "compact" and cfg.expert_dtype() != "bf16":
        raise ConfigError(f"experts.state = 'compact' keeps bf16 weights as the master copy, but experts.dtype = "
                          f"{e.dtype!r}; use experts.dtype = 'auto' or 'bf16' (or experts.state = 'fp32')")
    if e.spare_slots != "auto" and (isinstance(e.spare_slots, str) or e.spare_slots < 1):
        raise ConfigError(f"experts.spare_slots = {e.spare_slots!r}: use \"auto\" (one per expert) or a count >= 1")
    if e.prefetch_depth < 0 or e.io_threads <= 0:
        raise ConfigError("experts.prefetch_depth must be >= 0 and experts.io_threads > 0")
    ram = parse_bytes(e.ram_budget, "experts.ram_budget")
    gpu = parse_bytes(e.gpu_budget, "experts.gpu_budget")
    if m.switch_layers() and e.mode == "tiered":
        weights, record = cfg.expert_bytes()
        if ram < 2 * record:
            raise ConfigError(
                f"experts.ram_budget = {e.ram_budget!r} ({ram} B) holds fewer than 2 expert records of "
                f"{record} B each; raise it to at least {2 * record} B ({math.ceil(2 * record / 2**20)}MiB)")
        # A config for CUDA still loads on a machine without it (cfg.device() says CUDA is
        # missing): its GPU budget is checked where it runs.
        if cfg._device().startswith("cuda") and _cuda_available() and gpu < 3 * weights:
            raise ConfigError(
                f"experts.gpu_budget = {e.gpu_budget!r} ({gpu} B) holds fewer than 3 experts of {weights} B (two "
                f"being computed, one staging gradients); raise it to at least {3 * weights} B "
                f"({math.ceil(3 * weights / 2**20)}MiB)")


def _validate_data(d: DataConfig) -> None:
    if d.max_train_chars < 0 or d.max_val_chars < 0:
        raise ConfigError("data.max_train_chars and data.max_val_chars must be >= 0 (0 = the whole split)")
    if not d.corpora:
        return
    if d.source not in ("", DEFAULT_SOURCE):
        raise ConfigError(f"data.source = {d.source!r} and data.corpora are both given; put the corpus in "
                          "data.corpora (a [[data.corpora]] table with its source and weight) and drop data.source")
    d.source = ""  # the mixture is data.corpora alone (so a saved config.json loads back as it was)
    for i, c in enumerate(d.corpora):
        key = f"data.corpora[{i}]"
        if not c.source:
            raise ConfigError(f"{key}.source is missing: give the corpus directory, e.g. source = \"../shared/data/ru-docs\"")
        if not c.weight > 0 or math.isinf(c.weight):
            raise ConfigError(f"{key}.weight = {c.weight}: must be a positive number (weights are normalised to sum to 1)")
        c.name = c.name or corpus_name(c.source)
        if not _CORPUS_NAME.fullmatch(c.name):
            raise ConfigError(f"{key}.name = {c.name!r}: use letters, digits, '.', '_' or '-' (it names the corpus's "
                              "directory in data.dir and its val metrics)")
    names = [c.name for c in d.corpora]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"data.corpora: two corpora are named {name!r}; give each a distinct name = \"...\"")
