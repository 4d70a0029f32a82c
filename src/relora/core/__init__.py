"""The method: config, adapters, pruning, schedule, controller, sharding.

Imports torch, peft, transformers and relora's two leaves (errors, fileio) only; optional backends
(quantized frozen weights) register themselves with ``relora.core.frozen_storage``.
"""

from __future__ import annotations

import logging


class DropMessages(logging.Filter):
    """A logging filter that drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# peft imports bitsandbytes when it is installed, and bitsandbytes logs at import on CPU that an optional faster
# 4-bit inference kernel (downloaded from the Hugging Face hub by the `kernels` package) is not there: no news to
# anyone training with relora. A logger filter must be in place before the record is logged, so it is added here,
# in the package whose modules are the only ones to import peft, before any of them runs.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(DropMessages("Failed to load CPU gemm_4bit_forward"))
