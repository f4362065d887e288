"""The expert store as torch sees it: `TieredExpertStore` (tiered.py) over the Rust
`_core.ExpertStore`, the GPU tier's copies and events (gpu.py), its CPU emulation
(emulation.py), and a record's tensors as views (layout.py)."""

from gmtier._core import SlotPool, StoreError, Ticket
from gmtier.store.emulation import emulated
from gmtier.store.gpu import GpuTier, GradsOnHost
from gmtier.store.layout import TensorInfo, normalize_schema, record_layout
from gmtier.store.tiered import (Key, StoreExistsError, StoreIndexMissingError, StoreNotFoundError,
                                 TieredExpertStore)

__all__ = ["GpuTier", "GradsOnHost", "Key", "SlotPool", "StoreError", "StoreExistsError", "StoreIndexMissingError",
           "StoreNotFoundError", "TensorInfo", "Ticket", "TieredExpertStore", "emulated", "normalize_schema",
           "record_layout"]
