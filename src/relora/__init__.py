"""relora: high-rank training through low-rank updates (ReLoRA, arXiv 2307.05695).

The public API is imported lazily (PEP 562): ``import relora`` and ``relora --help`` load no torch,
peft or transformers (about 4.5 s here); the first use of a name below imports its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "ReLoRA": "relora.core.controller",
    "StepEvent": "relora.core.controller",
    "ReLoRACallback": "relora.integrations.callback",
    "ReLoRAConfig": "relora.core.config",
    "adapter_parameters": "relora.core.adapters",
    "merge_and_reinit": "relora.core.adapters",
    "merged": "relora.core.adapters",
    "unwrap": "relora.core.adapters",
    "wrap": "relora.core.adapters",
    "prune_optimizer_state": "relora.core.pruning",
    "jagged_cosine": "relora.core.schedule",
    "jagged_cosine_scheduler": "relora.core.schedule",
}

__all__ = [*sorted(_EXPORTS), "__version__"]
# Storage backends of frozen weights register themselves with relora.core when imported: with them loaded,
# relora.wrap(model, ReLoRAConfig(quantize="nf4")) finds its backend (bitsandbytes itself loads only then).
_BACKENDS = ("relora.integrations.quantize",)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'relora' has no attribute {name!r}")
    for backend in _BACKENDS:
        importlib.import_module(backend)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from relora.core.adapters import (
        adapter_parameters,
        merge_and_reinit,
        merged,
        unwrap,
        wrap,
    )
    from relora.core.config import ReLoRAConfig
    from relora.core.controller import ReLoRA, StepEvent
    from relora.core.pruning import prune_optimizer_state
    from relora.core.schedule import jagged_cosine, jagged_cosine_scheduler
    from relora.integrations.callback import ReLoRACallback
