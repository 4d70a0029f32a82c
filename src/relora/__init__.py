"""relora: high-rank training through low-rank updates (ReLoRA, arXiv 2307.05695)."""

from relora.adapters import adapter_parameters, merge_and_reinit, merged, unwrap, wrap
from relora.callback import ReLoRACallback
from relora.config import ReLoRAConfig
from relora.controller import ReLoRA, StepEvent
from relora.optim import prune_optimizer_state
from relora.schedule import jagged_cosine, jagged_cosine_scheduler

__version__ = "0.1.0"

__all__ = [
    "ReLoRA",
    "ReLoRACallback",
    "ReLoRAConfig",
    "StepEvent",
    "adapter_parameters",
    "jagged_cosine",
    "jagged_cosine_scheduler",
    "merge_and_reinit",
    "merged",
    "prune_optimizer_state",
    "unwrap",
    "wrap",
    "__version__",
]
