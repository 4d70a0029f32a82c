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

PRUNE_METHODS = ("magnitude", "random", "full", "none", "independent")


def _topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest entries of ``scores``."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[scores.flatten().topk(keep, sorted=False).indices] = True
    return mask.view_as(scores)


def _random_mask(shape: torch.Size, ratio: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Each entry kept with probability 1 - ratio; drawn on the CPU so every rank agrees."""
    return (torch.rand(shape, generator=generator) >= ratio).to(device)


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
        if method == "magnitude":
            mask = _topk_mask(v, keep)
            m.mul_(mask)
            v.mul_(mask)
        elif method == "random":
            mask = _random_mask(v.shape, ratio, generator, v.device)
            m.mul_(mask)
            v.mul_(mask)
        elif method == "full":
            m.zero_()
            v.zero_()
        elif method == "independent":
            m.mul_(_topk_mask(m.abs(), keep))
            v.mul_(_topk_mask(v, keep))
        if method != "none":
            zeroed += int(((m == 0) & (v == 0)).sum())
            total += v.numel()
    return zeroed / total if total else 0.0
