"""The jagged cosine learning-rate schedule (RELORA_SPEC.md section 5)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def jagged_cosine(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    restart_steps: Sequence[int] = (),
    restart_warmup_steps: int = 0,
    min_ratio: float = 0.1,
) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based).

    One cosine envelope from ``warmup_steps`` to ``total_steps`` decays to
    ``min_ratio``; after each restart step t_k the LR re-warms linearly from
    exactly 0 at t_k to the envelope's value at t_k + restart_warmup_steps.
    ``restart_steps`` must be sorted. With no restarts this is the usual
    linear-warmup cosine schedule.

    A restart inside the initial warm-up (``--no-warm-start`` with
    ``reset_every < warmup_steps``) restarts the LR at 0 too, re-warming to
    the plain schedule's value at t_k + restart_warmup_steps (there the
    warm-up line rather than the envelope): right after a reset the pruned
    moments make Adam's steps large, whatever the phase of the schedule.
    """

    def plain(t: int) -> float:  # warm-up, then the cosine envelope: the schedule without restarts
        if t < warmup_steps:
            return t / warmup_steps
        progress = min(max(t - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    k = bisect.bisect_right(restart_steps, step) - 1
    if k >= 0 and restart_warmup_steps > 0 and step - restart_steps[k] < restart_warmup_steps:
        start = restart_steps[k]
        return plain(start + restart_warmup_steps) * (step - start) / restart_warmup_steps
    return plain(step)


def jagged_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    restart_steps: Sequence[int] = (),
    restart_warmup_steps: int = 0,
    min_ratio: float = 0.1,
    start_step: int = 0,
    peak_change: tuple[int, float] | None = None,
) -> LambdaLR:
    """A LambdaLR whose multiplier at scheduler step t is ``jagged_cosine(start_step + t, ...)``.

    ``start_step`` lets a scheduler built mid-run (at the switch from the warm
    start to ReLoRA, with a new optimizer) continue the same envelope.
    ``peak_change`` = (step s, factor f) multiplies the multiplier by f from
    run step s on: the peak LR steps from ``lr`` to ``f * lr`` at s and the
    envelope continues, which is what a warm-started adapter run's LR does at
    its switch. The ``full-ws-lr`` control gives full-rank training that
    schedule (a function of the step alone, so a resume reproduces it).
    """
    restarts = sorted(restart_steps)
    change_at, factor = peak_change if peak_change is not None else (0, 1.0)

    def multiplier(step: int) -> float:
        return (factor if start_step + step >= change_at else 1.0) * jagged_cosine(
            start_step + step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            restart_steps=restarts,
            restart_warmup_steps=restart_warmup_steps,
            min_ratio=min_ratio,
        )

    return LambdaLR(optimizer, multiplier)
