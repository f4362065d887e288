"""The dtypes gmtier uses, and each of their names: one table.

Three vocabularies meet here, each fixed by its own interface: the record schema of the store
(`f32`, the Rust store's spelling), the config (`fp32`, as users write `train.precision` and
`experts.dtype`) and the Rust AdamW kernel's specs (`float32`).
"""

from __future__ import annotations

import torch

# torch dtype: (store name, config name or None, AdamW kernel name or None)
_TABLE = {
    torch.float32: ("f32", "fp32", "float32"),
    torch.bfloat16: ("bf16", "bf16", "bfloat16"),
    torch.float16: ("f16", "fp16", "float16"),
    torch.int64: ("i64", None, None),
    torch.uint8: ("u8", None, None),
}

STORE = {store: dt for dt, (store, _, _) in _TABLE.items()}  # store name -> torch dtype
CONFIG = {cfg: dt for dt, (_, cfg, _) in _TABLE.items() if cfg}  # config name -> torch dtype
KERNEL = {dt: k for dt, (_, _, k) in _TABLE.items() if k}  # torch dtype -> AdamW kernel name
HALF = (torch.bfloat16, torch.float16)


def store_name(dtype) -> str:
    """The store's name of a torch dtype (a string passes as it is: the Rust store checks it)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _TABLE:
            raise ValueError(f"dtype {dtype} is not supported by the store; use one of {sorted(STORE)}")
        return _TABLE[dtype][0]
    return str(dtype)


def from_config(name: str) -> torch.dtype:
    """`fp32` | `bf16` | `fp16` -> torch dtype."""
    return CONFIG[name]
