"""Frozen base weights stored in a format of their own (quantized): the interface the adapters use.

The adapters' math is written for float weights. A base layer that stores its
frozen weight otherwise (NF4 or int8 codes and scales) needs a few operations
from whoever made it: read the weight as float32, write a merged float32 weight
back, scale it, turn it into a plain layer. A storage backend provides them and
registers itself here when it is imported, as peft dispatches LoRA to its
quantized layers (``peft/tuners/lora/bnb.py``) without the LoRA code knowing
bitsandbytes. ``relora.integrations.quantize`` is the one backend today.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StorageBackend:
    """What the core needs of base layers that store their frozen weight in a format of their own."""

    name: str
    formats: tuple[str, ...]  # the ``ReLoRAConfig.quantize`` values it stores
    owns: Callable[[nn.Module], bool]  # whether a base layer is one of its layers
    # (model, names, fmt, *, master_weights): replace the linear layers ``names`` by its layers storing ``fmt``
    convert: Callable[..., None]
    # (model, fmt): around peft's adapter injection, so that peft builds its LoRA layers for this storage
    injecting: Callable[[nn.Module, str], AbstractContextManager[None]]
    dense_weight: Callable[[nn.Module], torch.Tensor]  # the float32 (out, in) weight a layer stands for
    merge_: Callable[[nn.Module, torch.Tensor], None]  # W <- W + delta, summed in float32, stored in place
    scale_: Callable[[nn.Module, float], None]  # W <- factor * W, in place
    to_dense: Callable[[nn.Module, torch.Tensor], nn.Module]  # a plain float layer holding a given float32 weight
    numel: Callable[[torch.Tensor], int | None]  # weights one of its stored parameters stands for; None if not its own


_BACKENDS: dict[str, StorageBackend] = {}


def register(backend: StorageBackend) -> None:
    """Make ``backend`` known to the core (again: a re-imported backend replaces itself)."""
    _BACKENDS[backend.name] = backend


def backend_of(base: nn.Module) -> StorageBackend | None:
    """The backend that stores ``base``'s weight, or None for a plain float layer."""
    return next((b for b in _BACKENDS.values() if b.owns(base)), None)


def backend_for(fmt: str) -> StorageBackend:
    """The backend that stores weights in ``fmt`` (a ``ReLoRAConfig.quantize`` value)."""
    for backend in _BACKENDS.values():
        if fmt in backend.formats:
            return backend
    raise RuntimeError(f"quantize={fmt!r}: no storage backend for it is registered; "
                       "import relora.integrations.quantize first (relora.wrap does)")


def logical_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter stands for (an NF4 tensor packs two per byte): ``numel()`` unless stored."""
    for backend in _BACKENDS.values():
        count = backend.numel(param)
        if count is not None:
            return count
    return param.numel()
