"""A record's tensors as torch sees them: the schema, where each tensor sits (as the Rust
`RecordLayout` says, through `_core.record_layout` or a store's `tensor_layout`), named views
of a record in a byte buffer, and packing named tensors into one."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from gmtier import _core, dtypes


def normalize_schema(schema: Iterable[Sequence]) -> list[tuple[str, str, list[int], str]]:
    """(name, dtype, shape[, section]) entries, dtype as a string (torch dtypes accepted)."""
    out = []
    for entry in schema:
        entry = tuple(entry)
        if len(entry) not in (3, 4):
            raise ValueError(f"schema entry {entry!r} must be (name, dtype, shape[, section])")
        name, dtype, shape = entry[:3]
        section = entry[3] if len(entry) == 4 else "weights"
        out.append((str(name), dtypes.store_name(dtype), [int(d) for d in shape], str(section)))
    return out


class TensorInfo:
    """Where one named tensor lives inside a record."""

    __slots__ = ("name", "dtype", "shape", "offset", "nbytes", "section")

    def __init__(self, name, dtype, shape, offset, nbytes, section):
        self.name, self.dtype, self.shape = name, dtypes.STORE[dtype], tuple(shape)
        self.offset, self.nbytes, self.section = offset, nbytes, section

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.dtype}, {list(self.shape)}, offset={self.offset}, {self.section})"


def tensor_infos(layout: Sequence[tuple]) -> list[TensorInfo]:
    """`TensorInfo`s of a layout as the core lists it (`tensor_layout()`, `record_layout()`)."""
    return [TensorInfo(*t) for t in layout]


def record_layout(schema) -> tuple[list[TensorInfo], int, int]:
    """(tensors, record_bytes, weights_bytes) of a schema, from the Rust core, without a store."""
    layout, record_bytes, weights_bytes = _core.record_layout(normalize_schema(schema))
    return tensor_infos(layout), record_bytes, weights_bytes


def views(buf: torch.Tensor, infos: Sequence[TensorInfo], base: int, sections=("weights", "state")) -> dict:
    """Named dtype/shape views of `buf` (uint8) for a record starting at byte `base`."""
    out = {}
    for t in infos:
        if t.section in sections:
            out[t.name] = buf[base + t.offset: base + t.offset + t.nbytes].view(t.dtype).view(t.shape)
    return out


def check_tensors(layout: Sequence[TensorInfo], tensors: Mapping, where: str) -> dict[str, TensorInfo]:
    """Each named tensor's schema entry; raises naming the first whose name, dtype or shape the
    schema does not have."""
    known = {t.name: t for t in layout}
    out = {}
    for name, value in tensors.items():
        if name not in known:
            raise ValueError(f"{where}: tensor {name!r} is not in the record schema ({', '.join(known)})")
        t = known[name]
        if value.dtype != t.dtype:
            raise ValueError(f"{where}: tensor {name!r} has dtype {value.dtype}, the schema says {t.dtype}")
        if tuple(value.shape) != t.shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {list(value.shape)}, the schema says {list(t.shape)}")
        out[name] = t
    return out


def pack_record(layout: Sequence[TensorInfo], out: np.ndarray, tensors: Mapping, where: str) -> None:
    """Write named tensors into `out`, one zeroed record (missing names stay zero)."""
    tensors = {n: torch.as_tensor(v) for n, v in tensors.items()}
    for name, t in check_tensors(layout, tensors, where).items():
        value = tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        out[t.offset: t.offset + t.nbytes] = value.numpy()
