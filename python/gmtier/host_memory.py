"""Torch tensors over host memory that Rust owns: the store's RAM arena and the page-aligned
buffers activations spill from and are read back into (`_core.AlignedBuffer`, moved to and from
disk by `_core.SpillFile`). Zero-copy: the tensor's bytes are the owner's, and the owner lives
as long as any view of them."""

from __future__ import annotations

import ctypes
import warnings

import torch

from gmtier import _core


def tensor_over(address: int, nbytes: int, owner: object) -> torch.Tensor:
    """A uint8 tensor over `nbytes` at `address`, memory that `owner` frees when it is dropped."""
    buf = (ctypes.c_uint8 * nbytes).from_address(address)
    buf._gmtier_owner = owner  # torch.frombuffer keeps `buf` alive, and `buf` the owner
    with warnings.catch_warnings():
        # Some ctypes/torch pairs warn about the array's PEP 3118 format; the bytes are plain uint8.
        warnings.simplefilter("ignore")
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)


def aligned_tensor(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of `nbytes` rounded up to a multiple of 4096, starting on a page
    boundary: what `SpillFile.write`/`read` (O_DIRECT) need. Page-lock it with cudaHostRegister
    for async copies to and from the GPU."""
    buf = _core.AlignedBuffer(nbytes)
    return tensor_over(buf.address, buf.nbytes, buf)
