"""The tiered experts: banks and the autograd Function (bank.py), the paging loop (runtime.py),
router prediction and prefetch (prefetch.py), dW -> AdamW (updates.py), figures (metrics.py)."""

from gmtier.config import grad_staging
from gmtier.experts.bank import ExpertLayerFn, ResidentExperts, TieredExperts, expert_ffn
from gmtier.experts.metrics import PHASES
from gmtier.experts.runtime import ExpertRuntime
from gmtier.experts.updates import default_adam_threads

__all__ = ["PHASES", "ExpertLayerFn", "ExpertRuntime", "ResidentExperts", "TieredExperts",
           "default_adam_threads", "expert_ffn", "grad_staging"]
