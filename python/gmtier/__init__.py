"""gmtier: train Switch Transformer LMs whose experts live on NVMe, paged through pinned RAM to the GPU."""

__version__ = "0.1.0"
