"""relora: high-rank training through low-rank updates (ReLoRA, arXiv 2307.05695).

The public API is imported lazily (PEP 562): ``import relora`` and ``relora --help`` load no torch,
peft or transformers (about 4.5 s here); the first use of a name below imports its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "ReLoRA": "relora.controller",
    "StepEvent": "relora.controller",
    "ReLoRACallback": "relora.callback",
    "ReLoRAConfig": "relora.config",
    "adapter_parameters": "relora.adapters",
    "merge_and_reinit": "relora.adapters",
    "merged": "relora.adapters",
    "unwrap": "relora.adapters",
    "wrap": "relora.adapters",
    "prune_optimizer_state": "relora.optim",
    "jagged_cosine": "relora.schedule",
    "jagged_cosine_scheduler": "relora.schedule",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'relora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from relora.adapters import adapter_parameters, merge_and_reinit, merged, unwrap, wrap
    from relora.callback import ReLoRACallback
    from relora.config import ReLoRAConfig
    from relora.controller import ReLoRA, StepEvent
    from relora.optim import prune_optimizer_state
    from relora.schedule import jagged_cosine, jagged_cosine_scheduler
