"""Partial optimizer reset: prune the adapters' optimizer state (RELORA_SPEC.md section 4).

One mask per parameter tensor is applied to every per-entry moment. Pruning m
and v independently (the paper's Algorithm 1 read literally, and the
reference code) leaves "orphan" entries with m != 0 and v == 0; right after a
re-init A's gradient is exactly zero, so Adam's update there is m / eps, about
1e8 times m, and the loss blows up at the restart (measured: spec section 4).

Which state is pruned, for which optimizers (Adam/AdamW and AMSGrad,
bitsandbytes 8-bit, Adafactor), is ``relora.core.optimizer_state``; any other
state is refused. ``check_prunable`` finds this out before training starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from relora.core import sharding
from relora.core.config import PRUNE_METHODS
from relora.core.optimizer_state import StateLayout, state_layout, unprunable

logger = logging.getLogger(__name__)


def keep_count(numel: int, ratio: float) -> int:
    """Entries a magnitude prune keeps: ``round((1 - ratio) * numel)``, but at least one when ratio < 1.

    Without the floor, tensors under 50 entries at ratio 0.99 would be reset
    completely, a different method than the one asked for.
    """
    if ratio >= 1.0 or numel == 0:
        return 0
    return min(numel, max(1, round((1.0 - ratio) * numel)))


def _topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest entries of ``scores``."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[scores.flatten().topk(keep, sorted=False).indices] = True
    return mask.view_as(scores)


def _random_mask(shape: torch.Size, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each entry kept with probability 1 - ratio; drawn on the CPU so every rank agrees."""
    return torch.rand(shape, generator=generator) >= ratio


def _check_method(optimizer: torch.optim.Optimizer, layout: StateLayout, method: str, state: dict,
                  independent_masks: bool = False) -> None:
    if method == "independent" and layout.factored:
        raise unprunable(optimizer, state, "prune='independent' ranks two per-entry moments separately and a "
                                           "factored second moment has none; use magnitude, random or full")
    if independent_masks and method == "random" and layout.factored:
        raise unprunable(optimizer, state, "the reference defect independent-masks masks two per-entry moments "
                                           "separately and a factored second moment has none")


def _check_managed(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Every parameter to prune is one this optimizer updates (not, say, one built before ``relora.wrap``)."""
    managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = sum(id(p) not in managed for p in params)
    if missing:
        raise ValueError(
            f"{missing} of the {len(params)} parameters to prune are not in the param groups of "
            f"{type(optimizer).__name__}: build the optimizer after relora.wrap(model, config), over the "
            "parameters that require gradients"
        )


def _count_zero(tensors: list[torch.Tensor]) -> int:
    """Entries that are zero in every one of ``tensors`` (same shape), summed across shards."""
    zero = tensors[0] == 0
    for t in tensors[1:]:
        zero = zero & (t == 0)
    total = zero.sum()
    return int(total.full_tensor() if sharding.is_sharded(total) else total)


def _prune_per_entry(layout: StateLayout, method: str, ratio: float, generator: torch.Generator | None,
                     independent_masks: bool = False) -> int:
    """One mask for every per-entry moment; returns the entries zero in all of them afterwards.

    ``independent_masks`` (with "random") is the study-only reference defect
    of relora-pico: m gets its own random mask, drawn after v's.
    """
    v, m = layout.second, layout.first
    shape = v.tensor.shape
    if method == "magnitude":
        mask_v = mask_m = _topk_mask(sharding.full(v.values()), keep_count(v.tensor.numel(), ratio))
    elif method == "random" and independent_masks:  # REFERENCE DEFECT independent-masks: orphan first moments
        mask_v = _random_mask(shape, ratio, generator)
        mask_m = _random_mask(shape, ratio, generator)
    elif method == "random":
        mask_v = mask_m = _random_mask(shape, ratio, generator)
    elif method == "full":
        mask_v = mask_m = torch.zeros(shape, dtype=torch.bool)
    else:  # independent: the reference code's rule, kept only to study it
        keep = keep_count(v.tensor.numel(), ratio)
        mask_v = _topk_mask(sharding.full(v.values()), keep)
        mask_m = _topk_mask(sharding.full(m.values()).abs(), keep) if m is not None else mask_v
    for moment in (v, *layout.others):
        moment.keep_only(mask_v)
    if m is not None:
        m.keep_only(mask_m)
    return _count_zero([x.values() for x in (m, v, *layout.others) if x is not None])


def _prune_factored(layout: StateLayout, method: str, ratio: float, generator: torch.Generator | None) -> int:
    """Keep a block of rows x columns of a factored second moment, and rescale it to stay consistent.

    Adafactor stores v_ij ~ row_i * col_j / mean(row). An entry-wise mask is
    not representable in that form; a rows x columns block is: the pruned
    v' = v * (rows ⊗ cols) is again rank one, and its factors are rows'
    statistics scaled by the fraction of column mass kept, and vice versa, so
    the optimizer reconstructs exactly the kept entries of v and zero
    elsewhere. "Magnitude" keeps the rows with the largest row statistic and
    the columns with the largest column statistic (the block of v's largest
    entries), sized close to ``keep_count`` entries in the matrix's aspect
    ratio; "random" keeps each row and each column with probability
    sqrt(1 - ratio). A first moment (transformers' Adafactor with beta1)
    gets the same block mask.
    """
    r, c = layout.row.reshape(-1).float(), layout.col.reshape(-1).float()
    n_rows, n_cols = r.numel(), c.numel()
    if method == "magnitude":
        keep = keep_count(n_rows * n_cols, ratio)
        kr = min(n_rows, max(1, round(math.sqrt(keep * n_rows / n_cols)))) if keep else 0
        kc = min(n_cols, max(1, round(keep / kr))) if keep else 0
        rows, cols = _topk_mask(r, kr), _topk_mask(c, kc)
    elif method == "random":
        keep_prob = math.sqrt(1.0 - ratio)
        rows = torch.rand(n_rows, generator=generator) < keep_prob
        cols = torch.rand(n_cols, generator=generator) < keep_prob
    else:  # full
        rows = torch.zeros(n_rows, dtype=torch.bool)
        cols = torch.zeros(n_cols, dtype=torch.bool)
    rows, cols = rows.to(r.device), cols.to(c.device)
    r_kept, c_kept = r * rows, c * cols
    # row' = row * (column mass kept), col' = col * (row mass kept): row' col' / mean(row') = v on the block.
    row_scale = c_kept.mean() / c.mean() if c.mean() > 0 else c.new_zeros(())
    col_scale = r_kept.mean() / r.mean() if r.mean() > 0 else r.new_zeros(())
    layout.row.copy_((r_kept * row_scale).view_as(layout.row))
    layout.col.copy_((c_kept * col_scale).view_as(layout.col))
    if layout.first is not None:
        layout.first.keep_only(rows[:, None] & cols[None, :])
    v_zero = (layout.row.reshape(-1, 1) == 0) | (layout.col.reshape(1, -1) == 0)
    if layout.first is None:
        return int(v_zero.sum())
    return int((v_zero & (layout.first.values() == 0)).sum())


def _restart_step(state: dict) -> None:
    """Step counter back to 0, so the next step's bias correction is that of a fresh moment."""
    if "step" not in state:
        return
    if torch.is_tensor(state["step"]):
        state["step"].zero_()
    else:
        state["step"] = type(state["step"])(0)


@torch.no_grad()
def prune_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    method: str = "magnitude",
    ratio: float = 0.99,
    *,
    generator: torch.Generator | None = None,
    restart_step: bool = False,
    independent_masks: bool = False,
) -> float:
    """Prune the optimizer state of ``params`` in place, one mask per tensor for all its moments.

    - magnitude: keep the ``keep_count(numel, ratio)`` entries with the
      largest second moment v (``round((1 - ratio) * numel)``, at least one
      while ratio < 1), zero every moment elsewhere;
    - random: one random mask, each entry zeroed with probability ``ratio``;
    - full: zero everything;
    - independent: m and v each keep their own largest entries (the reference
      code's rule; unstable, kept only to study it);
    - none: do nothing (any optimizer is accepted).

    Per layout (``relora.core.optimizer_state``): Adam's ``max_exp_avg_sq`` (AMSGrad) gets
    v's mask. bitsandbytes' 8-bit moments are ranked by their dequantized
    values (code map x block scale) and pruned by writing the code of exactly
    0; the block scales stay, so every kept entry keeps its value. A factored
    second moment (Adafactor) is pruned by blocks of rows x columns
    (``_prune_factored``). ``restart_step`` also sets the pruned tensors'
    ``step`` to 0 (``ReLoRAConfig.restart_adam_step="reset"``).

    ``independent_masks`` is the study-only reference defect of relora-pico
    (``ReLoRAConfig.reference_defects``): with method "random", the first
    moment gets its own random mask instead of v's, each entry zeroed with
    probability ``ratio``, which leaves orphan first moments (spec section
    4). A separate switch rather than a prune method, so that it changes only
    the sharing of the mask; it does nothing with other methods.

    Parameters the optimizer holds but has no state for yet (never stepped)
    have nothing to prune and are skipped. A parameter that is not in the
    optimizer at all, or whose state has none of the known layouts, is a
    ValueError naming the optimizer class and the state keys. Returns the
    fraction of the pruned tensors' entries that are zero in every moment
    afterwards, counted on the optimizer's own tensors, so a pruning that
    silently worked on a copy reports ~0.

    Sharded moments (FSDP2 DTensors) are pruned as if whole: the mask is
    computed on the gathered tensor, identically on every rank, and each rank
    applies its slice of it.
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PRUNE_METHODS)}; got {method!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    if method == "none":
        return 0.0
    params = list(params)
    _check_managed(optimizer, params)
    zeroed = total = 0
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue
        layout = state_layout(optimizer, state, param)
        _check_method(optimizer, layout, method, state, independent_masks)
        if layout.factored:
            zeroed += _prune_factored(layout, method, ratio, generator)
        else:
            zeroed += _prune_per_entry(layout, method, ratio, generator, independent_masks)
        total += param.numel()
        if restart_step:
            _restart_step(state)
    return zeroed / total if total else 0.0


def check_prunable(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], method: str, *, probe: bool = True,
    independent_masks: bool = False,
) -> bool:
    """Raise the ValueError that ``prune_optimizer_state`` would raise at the first restart, now.

    Parameters that have state are checked on it. A param group whose
    parameters have no state yet (adapters right after wrapping) is probed:
    an optimizer of the same class, with that group's hyper-parameters, takes
    one step on a zero copy of the group's largest parameter, and the state it
    creates is checked. The layout depends on the class, on hyper-parameters
    (amsgrad, beta1) and on the shape (Adafactor factors only matrices;
    bitsandbytes keeps tensors under 4096 entries in 32 bits), all of which
    the probe shares, where a list of known classes would miss subclasses and
    settings. An optimizer that keeps no state at all is refused too: its
    restarts could reset nothing. Returns False when a group could not be
    probed (a constructor with required arguments, a step that needs a
    closure); ``ReLoRA`` then checks the real state after the first step.
    ``method="none"`` accepts anything.
    """
    if method == "none":
        return True
    params = list(params)
    _check_managed(optimizer, params)
    checked = True
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        mine = [p for p in params if id(p) in ids]
        stated = [p for p in mine if optimizer.state.get(p)]
        for param in stated:
            state = optimizer.state[param]
            _check_method(optimizer, state_layout(optimizer, state, param), method, state, independent_masks)
        if mine and not stated:
            biggest = max(mine, key=lambda p: p.numel())
            checked = probe and _probe(optimizer, group, biggest, method, independent_masks) and checked
    return checked


def _probe(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor, method: str,
           independent_masks: bool = False) -> bool:
    """One step of a twin optimizer on a zero copy of ``param``; check the state it creates (no RNG is used)."""
    local = sharding.local(param).detach()
    twin_param = nn.Parameter(torch.zeros_like(local))
    twin_param.grad = torch.linspace(-1.0, 1.0, local.numel(), device=local.device).to(local.dtype).view_as(local)
    try:
        twin = type(optimizer)([{**{k: v for k, v in group.items() if k != "params"}, "params": [twin_param]}])
        twin.step()
    except Exception as exc:  # any failure of someone else's optimizer: fall back to the real state
        logger.warning("could not probe the state layout of %s (%s: %s); it is checked after the first step",
                       type(optimizer).__name__, type(exc).__name__, exc)
        return False
    state = twin.state.get(twin_param)
    if not state:
        raise unprunable(optimizer, {}, "it keeps no per-parameter state, so a restart would reset nothing")
    _check_method(optimizer, state_layout(optimizer, state, twin_param), method, state, independent_masks)
    return True
