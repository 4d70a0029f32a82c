"""A training phase: the optimizer, LR schedule and ReLoRA controller of the warm start or of the adapters.

A run has one or two phases. The switch at the end of the warm start wraps the
model and builds the second phase over the new trainable set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from relora.core import sharding
from relora.core.adapters import wrap
from relora.core.config import ReLoRAConfig
from relora.core.controller import ReLoRA
from relora.core.weight_decay import decay_groups
from relora.core.schedule import jagged_cosine_scheduler
from relora.run.build import make_model, prepare_for_training
from relora.run.config import PROJECTION_METHODS, TrainConfig
from relora.run.distributed import Dist


@dataclass
class Phase:
    """What changes at the switch from the warm start to ReLoRA."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    controller: ReLoRA | None
    wrapped: bool


def build_phase(cfg: TrainConfig, model: nn.Module, *, wrapped: bool, relora_cfg: ReLoRAConfig | None = None,
                previous: dict[str, dict] | None = None) -> Phase:
    """Optimizer, schedule and controller of the warm-start phase or, ``wrapped``, of the adapter phase.

    ``relora_cfg`` is the run's (None: ``cfg.relora_config()``). At the switch
    to ReLoRA the optimizer is rebuilt over the new trainable set; parameters
    that stay trainable (embeddings, norms, head) keep their Adam state
    (``previous``: state by parameter name, from ``optimizer_state_by_name``),
    adapters start empty (spec section 6). The schedule continues the same
    envelope: it is not restarted by the switch.
    """
    if relora_cfg is None:
        relora_cfg = cfg.relora_config()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.method in PROJECTION_METHODS:
        from relora.baselines import (
            build_projection_optimizer,  # imports the optional galore/apollo packages
        )

        optimizer = build_projection_optimizer(cfg, model)
    else:
        optimizer = torch.optim.AdamW(_adamw_groups(cfg, model, named, wrapped), lr=cfg.peak_lr(wrapped),
                                      betas=(cfg.beta1, cfg.beta2))
    for name, param in named:
        if previous and name in previous:
            optimizer.state[param] = {k: _like_param(v, param) for k, v in previous[name].items()}
    controller = None
    restart_steps: list[int] = []
    restart_warmup = 0
    if relora_cfg is not None:
        controller = ReLoRA(model, optimizer, relora_cfg, start_step=cfg.relora_phase_start, total_steps=cfg.steps)
        if cfg.jagged:  # the warm start's schedule already knows the restarts: one envelope for the run
            restart_steps, restart_warmup = controller.restart_steps(), relora_cfg.restart_warmup_steps
    scheduler = jagged_cosine_scheduler(
        optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, restart_steps=restart_steps,
        restart_warmup_steps=restart_warmup, min_ratio=cfg.min_lr_ratio,
        start_step=cfg.relora_phase_start if wrapped else 0,
        peak_change=cfg.peak_change,
    )
    return Phase(optimizer, scheduler, controller if wrapped else None, wrapped)


def _adamw_groups(cfg: TrainConfig, model: nn.Module, named: list[tuple[str, nn.Parameter]], wrapped: bool
                  ) -> list[dict]:
    """AdamW's groups: decayed or not (``decay_groups``) and, with ``matrix_lr_scale`` != 1, the matrices ReLoRA
    would wrap at that multiple of the peak LR. The LR schedule scales every group's LR by the same factor, so
    the ratio holds at every step."""
    from relora.baselines import projected_parameters  # the matrices GaLore would project; no optional import

    modules = dict(model.named_modules())
    if cfg.matrix_lr_scale == 1.0:
        return decay_groups(named, modules, cfg.weight_decay)
    targets = {id(p) for p in projected_parameters(model, cfg.target_modules)}
    return [*decay_groups([(n, p) for n, p in named if id(p) not in targets], modules, cfg.weight_decay),
            *decay_groups([(n, p) for n, p in named if id(p) in targets], modules, cfg.weight_decay,
                          lr=cfg.peak_lr(wrapped) * cfg.matrix_lr_scale)]


def switch_to_adapters(cfg: TrainConfig, relora_cfg: ReLoRAConfig, model: nn.Module, phase: Phase, dist: Dist,
                       vocab_size: int) -> tuple[nn.Module, nn.Module, Phase]:
    """End of the warm start: wrap the model with adapters and rebuild engine and optimizer.

    DDP registers its parameters when it is built, so it is rebuilt around the
    wrapped model. FSDP2 shards parameters in place, so the warm-started
    weights are gathered, a fresh model is wrapped and sharded, and the Adam
    state of the parameters that stay trainable is re-sharded onto it.
    """
    previous = optimizer_state_by_name(model, phase.optimizer, whole=dist.sharded)
    if dist.sharded:
        weights = dist.full_state_dict(model)
        model = make_model(cfg, vocab_size)
        model.load_state_dict(weights)
    wrap(model, relora_cfg)
    model.to(dist.device)
    engine = dist.parallelize(prepare_for_training(cfg, model))
    return model, engine, build_phase(cfg, model, wrapped=True, relora_cfg=relora_cfg, previous=previous)


def rescale_lr(phase: Phase, factor: float) -> None:
    """Multiply the phase's LR (and its schedule's peak) by ``factor``: how a rollback lowers the LR."""
    if factor == 1.0:
        return
    phase.scheduler.base_lrs = [lr * factor for lr in phase.scheduler.base_lrs]
    for group in phase.optimizer.param_groups:
        group["lr"] *= factor


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, *, whole: bool) -> dict[str, dict]:
    """The optimizer's per-parameter state keyed by parameter name; ``whole`` gathers sharded tensors."""
    by_name = {}
    for name, param in model.named_parameters():
        if param in optimizer.state:
            state = optimizer.state[param]
            by_name[name] = {k: sharding.full(v) if whole and torch.is_tensor(v) else v for k, v in state.items()}
    return by_name


def _like_param(value: object, param: torch.Tensor) -> object:
    """A moment saved whole, laid out like ``param`` (sharded the same way); other state as is."""
    if torch.is_tensor(value) and sharding.is_sharded(param) and value.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return value
