"""Type stubs for the Rust extension `gmtier._core`."""

from typing import Callable, Optional, Sequence

__version__: str

# --- store ---

Key = tuple[int, int]

class StoreError(RuntimeError):
    """Damaged/truncated/mismatched store (checksum errors, unknown index version, tensor table
    checksum included), all slots pinned, closed, or already open (the store directory's `lock`
    is held by this or another process)."""

class Ticket:
    def wait(self, timeout: Optional[float] = None) -> list[int]: ...
    def ready(self) -> bool: ...
    def keys(self) -> list[Key]: ...
    @property
    def sections(self) -> str: ...  # what was requested: "all" | "weights" | "state"
    @property
    def store(self) -> "ExpertStore": ...

class ExpertStore:
    @staticmethod
    def create(
        path: str,
        num_layers: int,
        num_experts: int,
        schema: Sequence[tuple],
        init: Optional[Callable[[int, int], object]] = None,
        init_into: Optional[Callable[[int, int, bytearray], None]] = None,
    ) -> None: ...
    @staticmethod
    def open(
        path: str,
        ram_bytes: int,
        io_threads: int = 8,
        queue_depth: int = 32,
        direct: bool = True,
        chunk_bytes: int = 4194304,
    ) -> "ExpertStore": ...  # locks the store: a second open (any process) raises StoreError until close()
    @property
    def record_bytes(self) -> int: ...
    @property
    def weights_bytes(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def ram_slots(self) -> int: ...
    @property
    def data_start(self) -> int: ...
    @property
    def path(self) -> str: ...
    def tensor_layout(self) -> list[tuple[str, str, list[int], int, int, str]]: ...
    def arena_address(self) -> tuple[int, int]: ...
    # sections: "all" | "weights" | "state" (only what the RAM slot lacks of it is read)
    def request(self, keys: Sequence[Key], priority: int = 0, sections: str = "all") -> Ticket: ...
    def prefetch(self, keys: Sequence[Key], priority: int = 0, sections: str = "all") -> None: ...
    def slot_sections(self, slot: int) -> list[str]: ...  # valid sections of a RAM slot
    def pin_resident(self, keys: Sequence[Key], sections: str = "weights") -> list[Optional[int]]: ...  # pins, no reads
    def demote_prefetched(self, keys: Sequence[Key]) -> int: ...  # wrong predictions: cancel / evict first
    def release(self, keys: Sequence[Key]) -> None: ...
    def mark_dirty(self, keys: Sequence[Key], filled: str = "none") -> None: ...  # filled: sections overwritten whole
    def write_back(self, keys: Sequence[Key]) -> None: ...  # async write-behind of dirty records
    def flush(self) -> None: ...
    def commit(self, user_meta: str = "") -> None: ...
    def user_meta(self) -> str: ...
    def commit_count(self) -> int: ...
    def metrics(self) -> dict: ...
    def read_record(self, layer: int, expert: int) -> bytes: ...
    def write_record(self, layer: int, expert: int, data: object) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> "ExpertStore": ...
    def __exit__(self, *exc: object) -> bool: ...

class GpuSlots:
    """The GPU tier's accounting, kept by the store under its lock: slot states, pins, prefetch
    policy, each acquire's RAM pin, and the RAM pins of copies in flight."""
    def __init__(self, store: ExpertStore, num_slots: int) -> None: ...  # 0: acquires only pin RAM
    @property
    def num_slots(self) -> int: ...
    # -> None without a GPU tier, else (GPU slot, copy id to issue, or None on a hit)
    def acquire(self, key: Key, ram_slot: int, need_hit: bool = False) -> Optional[tuple[int, Optional[int]]]: ...
    def acquire_resident(self, keys: Sequence[Key], limit: int) -> list[tuple[int, int]]: ...  # (index in keys, slot)
    def release(self, keys: Sequence[Key]) -> list[int]: ...  # GPU slots released; keys not acquired: RAM releases
    # -> ("copied", slot, copy) | ("held" | "busy", None, None); only "copied" keeps the RAM pin
    def prefetch(self, key: Key, priority: int, max_in_flight: int, reserve: int) -> tuple[str, Optional[int], Optional[int]]: ...
    def can_prefetch(self, max_in_flight: int, reserve: int) -> bool: ...
    def demote(self, keys: Sequence[Key]) -> None: ...
    def holds(self, key: Key) -> bool: ...
    def refresh(self, key: Key) -> Optional[tuple[int, int, int]]: ...  # (GPU slot, RAM slot, copy)
    def invalidate(self, keys: Sequence[Key]) -> None: ...
    def ram_slot(self, key: Key) -> Optional[int]: ...
    def copy_done(self, copy: int) -> None: ...  # the CPU emulation's report
    def use_launcher(self, address: int) -> None: ...  # address of cuLaunchHostFunc
    def signal_done(self, copy: int, stream: int) -> None: ...  # host function on a CUDA stream handle
    def wait_copies(self, timeout: Optional[float] = None) -> None: ...
    def state(self, slot: int) -> str: ...  # "free" | "copying" | "ready" | "stale" | "prefetched"
    def lookup(self, key: Key) -> Optional[int]: ...
    def pinned(self) -> int: ...
    def metrics(self) -> dict: ...

class SlotPool:
    def __init__(self, num_slots: int) -> None: ...
    def acquire(self, key: Key, priority: int = 0, pin: bool = True) -> tuple[int, bool, Optional[Key]]: ...
    def release(self, key: Key) -> None: ...
    def lookup(self, key: Key) -> Optional[int]: ...
    def invalidate(self, key: Key) -> bool: ...
    def demote(self, key: Key) -> bool: ...  # a wrong prefetch: evicted first
    def pins(self, slot: int) -> int: ...
    def key_of(self, slot: int) -> Optional[Key]: ...
    @property
    def num_slots(self) -> int: ...
    def resident(self) -> int: ...
    def pinned(self) -> int: ...

def raw_read(
    path: str, ranges: Sequence[tuple[int, int]], chunk_bytes: int = 4194304, threads: int = 8, direct: bool = True
) -> tuple[int, float, bool]: ...
def drop_cache(path: str) -> None: ...
def record_layout(schema: Sequence[tuple]) -> tuple[list[tuple[str, str, list[int], int, int, str]], int, int]: ...
    # (tensor layout as ExpertStore.tensor_layout lists it, record_bytes, weights_bytes)

# --- adam ---

# spec: (master, exp_avg, exp_avg_sq, grad, grad_dtype, half (0 = none), half_dtype, numel, step)
# as data_ptr() addresses; dtypes "float32" | "bfloat16" | "float16". Use gmtier.adam, which validates.
AdamSpec = tuple[int, int, int, int, str, int, str, int, int]

class AdamJob:
    def wait(self) -> bool: ...  # True when the step was skipped; GIL released
    def done(self) -> bool: ...

def adamw_step_raw_async(
    specs: Sequence[AdamSpec],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: float = 1.0,
    clip_coef: float = 1.0,
    check_finite: bool = False,
    simd: str = "auto",
    threads: int = 0,
    stores: str = "auto",  # streaming stores: "auto" | "none" | "half" | "all"
) -> AdamJob: ...
def adamw_step_groups_raw(
    specs: Sequence[AdamSpec],
    group_ends: Sequence[int],  # group i is specs[group_ends[i - 1]:group_ends[i]]
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: float = 1.0,
    clip_coef: float = 1.0,
    check_finite: bool = False,
    simd: str = "auto",
    threads: int = 0,
    stores: str = "auto",  # streaming stores: "auto" | "none" | "half" | "all"
) -> list[bool]: ...  # per group: skipped (non-finite gradient)
def grad_sumsq_raw(grads: Sequence[tuple[int, str, int]], simd: str = "auto", threads: int = 0) -> tuple[float, bool]: ...
def memory_bandwidth(nbytes: int = 1073741824, threads: int = 0, repeats: int = 5) -> dict:
    """GB/s (bytes read + written), best of `repeats`: copy_gbps (best of memcpy_gbps and
    stream_copy_gbps), triad_gbps, inplace_gbps, copy_median_gbps; plus threads, nbytes."""
def adam_simd_available() -> list[str]: ...
def adam_simd_best() -> str: ...
def adam_chunk_elements() -> int: ...

# --- compact-state adam (gmtier.compact_adam validates; use it) ---

# spec: (weight bf16, m_codes u8, v_codes u8, m_scales f32, v_scales f32, grad, grad_dtype, numel,
# step int64[1], stream) as data_ptr() addresses; scales have ceil(numel / block) elements.
CompactAdamSpec = tuple[int, int, int, int, int, int, str, int, int, int]
ADAM_COMPACT_BLOCKS: tuple[int, int, int]  # (min, max, default) block size; powers of two

def adamw_compact_step_groups_raw(
    specs: Sequence[CompactAdamSpec],
    group_ends: Sequence[int],  # group i is specs[group_ends[i - 1]:group_ends[i]]
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: float = 1.0,
    clip_coef: float = 1.0,
    check_finite: bool = False,
    block: int = 2048,
    seed: int = 0,  # with stream, step and element index: the stochastic-rounding bits
    simd: str = "auto",
    threads: int = 0,
) -> list[bool]: ...  # per group: skipped (non-finite gradient)
def adam_compact_maps() -> tuple[list[float], list[float]]: ...  # m map, v map (256 values each)
def adam_compact_sr_key(seed: int, stream: int, step: int) -> int: ...
