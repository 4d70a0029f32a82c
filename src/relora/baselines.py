"""GaLore and APOLLO, the memory-efficient optimizers later papers compare ReLoRA with, as published.

Both keep every weight trainable at full rank and shrink the optimizer state
instead: the gradient of a weight matrix is projected to rank r, Adam's
moments live in that small space, and the update is mapped back (GaLore,
arXiv 2403.03507) or used only to estimate per-channel / per-tensor scaling
of the raw gradient (APOLLO, arXiv 2412.05270). We use the authors' PyPI
packages (``galore-torch``, ``apollo-torch``; ``pip install relora[baselines]``)
rather than re-implementations, so a difference in results is not a difference
in code.

The projection applies to the matrices ReLoRA wraps (every linear map inside
attention and MLP blocks, ``relora.core.adapters.find_targets``): the same split as
the authors' scripts (``nn.Linear`` modules under ``attn`` / ``mlp``).
Embeddings, norms and the head go in a plain parameter group of the same
optimizer, which then behaves as AdamW for them, at the same LR, as in those
scripts.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch and the core only where used: run.config (and so `relora --help`) imports this module
    import torch
    from torch import nn
from relora.errors import ConfigError

logger = logging.getLogger(__name__)

# Full-rank weights, low-rank optimizer state: the published GaLore / APOLLO optimizers.
PROJECTION_METHODS = ("galore", "apollo", "apollo-mini")
EXTRA = "pip install 'relora[baselines]'"

# GaLore's ranks by model width (GaLore paper Table 2 and its benchmark_c4 scripts: 60M 128, 130M 256,
# 350M 256, 1B 512); APOLLO's scripts use the same. Other widths: a quarter of the width, the 60M/350M/1B ratio.
PAPER_RANKS = {512: 128, 768: 256, 1024: 256, 2048: 512}


class ProjectionConfig(Protocol):
    """The settings of a run that this module reads (``relora.run.config.TrainConfig`` has them all)."""

    method: str  # one of PROJECTION_METHODS
    proj_rank: int | None  # None: the method's published rank
    update_proj_gap: int
    proj_scale: float | None  # None: the method's published scale
    scale_front: bool | None  # None: on for apollo-mini only
    target_modules: list[str] | None  # the matrices to project: those ReLoRA would wrap
    weight_decay: float
    beta1: float
    beta2: float

    def peak_lr(self, wrapped: bool) -> float: ...


@dataclass(frozen=True)
class ProjectionSettings:
    """The projected parameter group's settings for one method (the optimizers' group keys)."""

    rank: int
    update_proj_gap: int
    scale: float
    proj_type: str = "std"  # project the smaller side of each matrix (both papers)
    proj: str | None = None  # APOLLO only: "random" projection (no SVD)
    scale_type: str | None = None  # APOLLO only: "channel" (APOLLO) or "tensor" (APOLLO-mini)
    scale_front: bool = False  # APOLLO only: norm-growth limiter after the scale

    def group(self) -> dict:
        keys = {"rank": self.rank, "update_proj_gap": self.update_proj_gap, "scale": self.scale,
                "proj_type": self.proj_type}
        if self.proj is not None:
            keys.update(proj=self.proj, scale_type=self.scale_type)
        return keys


def default_rank(hidden_size: int) -> int:
    return PAPER_RANKS.get(hidden_size, max(1, hidden_size // 4))


def projection_settings(cfg: ProjectionConfig, hidden_size: int) -> ProjectionSettings:
    """The published defaults of ``cfg.method``, overridden by the config's proj_* fields.

    GaLore: rank by width, scale 0.25, gap 200 (benchmark_c4 scripts). APOLLO:
    GaLore's rank, channel-wise scaling, random projection, scale 1, gap 200.
    APOLLO-mini: rank 1, tensor-wise scaling, scale 128 (the README's default;
    the 60M and 350M scripts use 128, the 130M one 192), with the norm-growth
    limiter applied after the scale (``--scale_front``: the 60M and 130M
    scripts, and the README's advice for short warmups). Both APOLLO variants:
    the ``pretrain_c4`` scripts and the package README.
    """
    method = cfg.method
    if method not in PROJECTION_METHODS:
        raise ValueError(f"{method!r} is not a projection method ({', '.join(PROJECTION_METHODS)})")
    mini = method == "apollo-mini"
    rank = cfg.proj_rank or (1 if mini else default_rank(hidden_size))
    if method == "galore":
        return ProjectionSettings(rank=rank, update_proj_gap=cfg.update_proj_gap,
                                  scale=cfg.proj_scale if cfg.proj_scale is not None else 0.25)
    default_scale = 128.0 if mini else 1.0
    return ProjectionSettings(
        rank=rank, update_proj_gap=cfg.update_proj_gap,
        scale=cfg.proj_scale if cfg.proj_scale is not None else default_scale,
        proj="random", scale_type="tensor" if mini else "channel",
        scale_front=cfg.scale_front if cfg.scale_front is not None else mini,
    )


def optimizer_class(method: str) -> type[torch.optim.Optimizer]:
    """The published optimizer of ``method``; a missing package is a one-line ConfigError naming the extra."""
    module, name, package = {
        "galore": ("galore_torch", "GaLoreAdamW", "galore-torch"),
        "apollo": ("apollo_torch", "APOLLOAdamW", "apollo-torch"),
        "apollo-mini": ("apollo_torch", "APOLLOAdamW", "apollo-torch"),
    }[method]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ConfigError(f"--method {method} needs the {package} package ({exc.name or module} is missing): "
                          f"{EXTRA}") from None


def projected_parameters(model: nn.Module, target_modules: list[str] | None = None) -> list[nn.Parameter]:
    """The weight of every linear map ReLoRA would wrap: the matrices whose gradients are projected."""
    modules = dict(model.named_modules())
    from relora.core.adapters import find_targets

    return [modules[name].weight for name in find_targets(model, target_modules)]


def build_projection_optimizer(cfg: ProjectionConfig, model: nn.Module) -> torch.optim.Optimizer:
    """GaLoreAdamW or APOLLOAdamW over the model: projected matrices in one group, the rest in a plain one."""
    from relora.core.weight_decay import decay_groups

    settings = projection_settings(cfg, model.config.hidden_size)
    projected = [p for p in projected_parameters(model, cfg.target_modules) if p.requires_grad]
    ids = {id(p) for p in projected}
    regular = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    groups = [*decay_groups(regular, dict(model.named_modules()), cfg.weight_decay),
              {"params": projected, **settings.group()}]  # last: the projected matrices, decayed
    common = dict(lr=cfg.peak_lr(wrapped=False), betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    cls = optimizer_class(cfg.method)
    if cfg.method == "galore":  # GaLoreAdamW copies transformers' deprecated AdamW, warning included
        optimizer = cls(groups, no_deprecation_warning=True, **common)
    else:
        optimizer = cls(groups, scale_front=settings.scale_front, **common)
    logger.info("%s: %d projected matrices (rank %d, gap %d, scale %g), %d other tensors", cfg.method,
                len(projected), settings.rank, settings.update_proj_gap, settings.scale, len(regular))
    return optimizer

