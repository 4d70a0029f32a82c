"""Validation loss and perplexity on a fixed set of validation windows."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from relora.data import TokenWindows


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of windows of seq_len + 1 tokens, in float32."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: TokenWindows,
    *,
    num_windows: int,
    micro_batch: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> float:
    """Mean loss over the first ``num_windows`` sequential validation windows.

    The same windows at every evaluation, so curves are comparable across steps
    and runs on the same prepared data. With several processes each evaluates
    an equal share (``num_windows`` rounded down to a multiple of
    ``world_size``: a sharded model needs every rank in every forward pass) and
    ``reduce`` sums the totals across them.
    """
    num_windows = min(num_windows, len(windows))
    share = max(num_windows // world_size, 1)
    was_training = model.training
    model.eval()
    total = 0.0
    first = rank * share
    for start in range(first, first + share, micro_batch):
        batch = windows.get(range(start, min(start + micro_batch, first + share))).to(device)
        with autocast or contextlib.nullcontext():
            total += lm_loss(model, batch).item() * batch.shape[0]
    model.train(was_training)
    count = float(share)
    if reduce is not None:
        total, count = reduce([total, count])
    return total / count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
