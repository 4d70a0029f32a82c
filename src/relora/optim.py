"""Partial optimizer reset: prune the adapters' Adam moments (RELORA_SPEC.md section 4).

One mask per parameter tensor is applied to both moments. Pruning m and v
independently (the paper's Algorithm 1 read literally, and the reference code)
leaves "orphan" entries with m != 0 and v == 0; right after a re-init A's
gradient is exactly zero, so Adam's update there is m / eps, about 1e8 times m,
and the loss blows up at the restart (measured: spec section 4).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from relora import sharding

PRUNE_METHODS = ("magnitude", "random", "full", "none", "independent")


def _topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest entries of ``scores``."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[scores.flatten().topk(keep, sorted=False).indices] = True
    return mask.view_as(scores)


def _random_mask(shape: torch.Size, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each entry kept with probability 1 - ratio; drawn on the CPU so every rank agrees."""
    return torch.rand(shape, generator=generator) >= ratio


@torch.no_grad()
def prune_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    method: str = "magnitude",
    ratio: float = 0.99,
    *,
    generator: torch.Generator | None = None,
) -> float:
    """Prune ``exp_avg`` (m) and ``exp_avg_sq`` (v) of ``params`` in place.

    - magnitude: keep the ``round((1 - ratio) * numel)`` entries with the
      largest v, zero m and v elsewhere (one mask for both moments);
    - random: one random mask, each entry zeroed with probability ``ratio``;
    - full: zero everything;
    - independent: m and v each keep their own largest entries (the reference
      code's rule; unstable, kept only to study it);
    - none: do nothing.

    Works for any optimizer whose state holds ``exp_avg`` and ``exp_avg_sq``
    (torch Adam/AdamW and friends). Parameters without state yet are skipped;
    other parameters are never touched. Returns the fraction of the pruned
    tensors' entries that are zero in both moments afterwards, counted on the
    optimizer's own tensors, so a pruning that silently worked on a copy
    reports ~0.

    Sharded moments (FSDP2 DTensors) are pruned as if whole: the mask is
    computed on the gathered tensor, identically on every rank, and each rank
    applies its slice of it.
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PRUNE_METHODS)}; got {method!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    zeroed = total = 0
    for param in params:
        state = optimizer.state.get(param, {})
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        if m is None or v is None:
            continue
        keep = round((1.0 - ratio) * v.numel())
        m_part, v_part = sharding.local(m), sharding.local(v)
        if method == "magnitude":
            mask = sharding.local_part(_topk_mask(sharding.full(v), keep), v)
            m_part.mul_(mask)
            v_part.mul_(mask)
        elif method == "random":
            mask = sharding.local_part(_random_mask(v.shape, ratio, generator), v)
            m_part.mul_(mask)
            v_part.mul_(mask)
        elif method == "full":
            m_part.zero_()
            v_part.zero_()
        elif method == "independent":
            m_part.mul_(sharding.local_part(_topk_mask(sharding.full(m).abs(), keep), m))
            v_part.mul_(sharding.local_part(_topk_mask(sharding.full(v), keep), v))
        if method != "none":
            zeroed += sharding.count_zero_in_both(m, v)
            total += v.numel()
    return zeroed / total if total else 0.0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process's optimizer state holds: every tensor reachable from ``optimizer.state``, measured.

    The walk goes through dicts, lists, tuples and the attributes of other
    objects, so the projection matrices that GaLore and APOLLO keep on a
    projector object inside the state are counted with the moments. Each
    storage is counted once and whole, views included: that is what stays
    allocated (GaLore 1.0 keeps a slice of the full SVD factor, so it holds
    min(m, n) x n, not r x n). Sharded (FSDP2) state counts the local shard.
    """
    seen: set[tuple[str, int]] = set()

    def walk(value: object, depth: int) -> int:
        if torch.is_tensor(value):
            storage = sharding.local(value).untyped_storage()
            key = (str(storage.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                return 0
            seen.add(key)
            return storage.nbytes()
        if depth > 4:
            return 0
        if isinstance(value, dict):
            return sum(walk(v, depth + 1) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v, depth + 1) for v in value)
        if hasattr(value, "__dict__") and not isinstance(value, type):
            return sum(walk(v, depth + 1) for v in vars(value).values())
        return 0

    return sum(walk(state, 0) for state in optimizer.state.values())


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
