"""Weight decay: which parameters AdamW decays (its parameter groups).

The frozen W of a wrapped layer is not a parameter the optimizer steps; it is decayed by
``relora.core.adapters.decay_frozen_``, by the same factor as the adapters' B here, so that
W + s B A decays as a full-rank weight would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def decay_groups(named: Iterable[tuple[str, torch.Tensor]], modules: dict[str, torch.nn.Module],
                 weight_decay: float, **group: object) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` for the matrices of linear maps, none for the rest.

    Not decayed: biases and norm scales (one dimension: decaying them pulls a
    layer's scale and offset to 0 for nothing), input and position embeddings
    (``nn.Embedding``: a token seldom seen would only shrink; a choice, as
    minGPT's), and the adapters' A. Decayed: every other matrix, the output
    head (unless tied to the embedding) and the adapters' B. Decaying B and not
    A shrinks the cycle's update s B A by exactly AdamW's factor (1 - lr wd);
    with the frozen W decayed by the same factor (``adapters.decay_frozen_``),
    W + s B A decays as a full-rank weight would. ``modules``: the model's
    ``named_modules()``. Empty groups are left out; ``group`` is added to each.
    """
    decay, no_decay = [], []
    for name, param in named:
        owner = modules.get(name.rpartition(".")[0])
        plain = param.ndim < 2 or isinstance(owner, torch.nn.Embedding) or ".lora_A." in name
        (no_decay if plain else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, **group},
              {"params": no_decay, "weight_decay": 0.0, **group}]
    return [g for g in groups if g["params"]]
