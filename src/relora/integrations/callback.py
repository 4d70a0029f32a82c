"""ReLoRA inside a Hugging Face ``Trainer``: a callback that merges, prunes and restarts.

The decisions (which steps merge, which prune, which restart the schedule)
are the ``relora.ReLoRA`` controller's, exactly as in ``relora train``; this
module only connects them to the Trainer's hooks, its optimizer, its LR
scheduler and its checkpoints.

The schedule. The jagged cosine (spec section 5) must be 0 at every restart
step, so the Trainer's own schedulers cannot be used. We considered three
ways to give the Trainer ours:

- subclassing ``Trainer`` to override ``create_scheduler``: clean for a plain
  Trainer, but it is a wrapper, and it collides with every other Trainer
  subclass (SFTTrainer, a user's own) that the callback should work with;
- replacing the multiplier inside the Trainer's ``LambdaLR`` from the callback:
  relies on private details of both the Trainer and torch;
- handing the Trainer a scheduler through its public ``optimizers=(optimizer,
  scheduler)`` argument (or by setting ``trainer.lr_scheduler`` after
  ``trainer.create_optimizer()``): no subclass, no private API.

We take the third. ``callback.scheduler(optimizer)`` returns a ``LambdaLR``
whose multiplier is a ``JaggedSchedule``; the total number of steps and the
warmup are only known once ``Trainer.train`` has counted the data, so the
callback fills them in (with the controller's restart steps) in
``on_train_begin``. Training with the callback but another scheduler raises
an error rather than silently skipping the LR re-warmup: without it an
optimizer reset diverges (paper, Table 6).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from relora.core.adapters import (
    adapter_parameters,
    load_merge_residuals,
    lora_layers,
    merge_residual,
    merge_residuals,
)
from relora.core.config import ReLoRAConfig
from relora.core.controller import ReLoRA, StepEvent
from relora.core.schedule import jagged_cosine
from relora.fileio import write_atomic

logger = logging.getLogger(__name__)

# Beside the Trainer's files in each checkpoint-N/ when frozen weights are bf16: what the merges could not store
# in them (relora.core.adapters.merge_residual). Too large for trainer_state.json, which holds the controller state.
MERGE_RESIDUALS_FILE = "relora_merge_residuals.safetensors"


class JaggedSchedule:
    """The LR multiplier of a Trainer run; ``ReLoRACallback`` sets its steps when training starts.

    A callable object rather than a closure: ``LambdaLR`` saves a callable
    object's attributes in the Trainer's ``scheduler.pt``, and the callback
    finds its schedule on whatever scheduler the Trainer hands it.
    """

    def __init__(self, min_ratio: float = 0.1) -> None:
        self.min_ratio = min_ratio
        self.total_steps: int | None = None
        self.warmup_steps = 0
        self.restart_steps: list[int] = []
        self.restart_warmup_steps = 0

    def configure(self, *, total_steps: int, warmup_steps: int, restart_steps: list[int],
                  restart_warmup_steps: int) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.restart_steps = sorted(restart_steps)
        self.restart_warmup_steps = restart_warmup_steps

    def __call__(self, step: int) -> float:
        if self.total_steps is None:
            if step == 0:  # LambdaLR's constructor; on_train_begin sets the real value before the first step
                return 0.0
            raise RuntimeError("this scheduler follows ReLoRACallback's restarts: add the callback to the Trainer")
        return jagged_cosine(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                             restart_steps=self.restart_steps, restart_warmup_steps=self.restart_warmup_steps,
                             min_ratio=self.min_ratio)


def _schedule_of(lr_scheduler: Any) -> JaggedSchedule | None:
    for fn in getattr(lr_scheduler, "lr_lambdas", []):
        if isinstance(fn, JaggedSchedule):
            return fn
    return None


class ReLoRACallback(TrainerCallback, ExportableState):
    """Merges, prunes the optimizer state and restarts the LR of a ``Trainer`` run at ReLoRA's steps.

    The model must already be wrapped with ``relora.wrap(model, config)`` and
    the Trainer given ``callback.scheduler(optimizer)`` as its LR scheduler.
    Steps are the Trainer's global steps, i.e. optimizer steps, so gradient
    accumulation is accounted for. The model is wrapped before training
    starts, so restarts count from step 0: do a full-rank warm start as its
    own run first (spec section 6) and wrap its result.

    Checkpoints: the controller's counters are saved in each checkpoint's
    ``trainer_state.json`` (the Trainer's stateful-callback mechanism) and
    restored by ``trainer.train(resume_from_checkpoint=...)``. With bf16
    frozen weights (``frozen_dtype``) the merge residuals are saved beside
    them, in ``checkpoint-N/relora_merge_residuals.safetensors``; a resume
    reads them from ``args.output_dir/checkpoint-N``, where the Trainer wrote
    them (the Trainer does not tell callbacks which checkpoint it resumes). (With
    ``restore_callback_states_from_checkpoint=True`` the Trainer replaces this
    object by a new one built from the saved state; read it back from
    ``trainer.callback_handler.callbacks`` then.)
    """

    def __init__(self, config: ReLoRAConfig | dict) -> None:
        self.config = config if isinstance(config, ReLoRAConfig) else ReLoRAConfig(**config)
        if self.config.warm_start_steps:
            raise ValueError(
                "ReLoRACallback cannot switch from full-rank to adapters inside one Trainer run: set "
                "warm_start_steps=0, train the warm start as its own run and wrap its result"
            )
        self.controller: ReLoRA | None = None
        self.events: list[StepEvent] = []  # every merge of this process's run, restarts marked

    def scheduler(self, optimizer: torch.optim.Optimizer, *, min_lr_ratio: float = 0.1) -> LambdaLR:
        """The jagged cosine schedule for ``Trainer(optimizers=(optimizer, callback.scheduler(optimizer)))``.

        Peak LR: the optimizer's. Warmup: ``TrainingArguments.warmup_steps``.
        Restarts: this callback's, re-warmed over ``restart_warmup_steps``.
        """
        return LambdaLR(optimizer, JaggedSchedule(min_lr_ratio))

    # ------------------------------------------------------------ Trainer hooks
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        if model is None or not adapter_parameters(model):
            raise ValueError("ReLoRACallback needs a model wrapped with relora.wrap(model, config) before training")
        schedule = _schedule_of(lr_scheduler)
        if schedule is None:
            raise ValueError(
                "ReLoRACallback needs its jagged cosine schedule (LR 0 at each restart): pass "
                "Trainer(..., optimizers=(optimizer, callback.scheduler(optimizer)))"
            )
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.controller = ReLoRA(model, torch_optimizer, self.config, start_step=0, total_steps=state.max_steps)
        if state.global_step > 0:  # resuming: TrainerState was read from the checkpoint
            saved = self._saved_attributes(state)
            self.controller.load_state_dict(saved["controller_state"])
            if saved.get("merge_residuals"):
                self._load_merge_residuals(args, state, model)
            logger.info("ReLoRA resumed at step %d: %d merges, %d restarts so far",
                        state.global_step, self.controller.merges, self.controller.restarts)
        schedule.configure(total_steps=state.max_steps, warmup_steps=args.get_warmup_steps(state.max_steps),
                           restart_steps=self.controller.restart_steps(),
                           restart_warmup_steps=self.config.restart_warmup_steps)
        # LambdaLR set the LR when it was built, before the step counts were known: set it for this step.
        lrs = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
        for group, lr in zip(lr_scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        lr_scheduler._last_lr = lrs  # what get_last_lr() (the Trainer's logged LR) reports

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        event = self.controller.step(state.global_step)  # after optimizer.step() and scheduler.step()
        if event.merged:
            self.events.append(event)

    # ------------------------------------------------------------ checkpoints (ExportableState)
    def state(self) -> dict:
        """What the Trainer writes into ``trainer_state.json`` at each checkpoint."""
        model = self.controller.model if self.controller else None
        has_residuals = model is not None and any(merge_residual(layer) is not None for layer in lora_layers(model))
        return {
            "args": {"config": self.config.to_dict()},
            "attributes": {"controller_state": self.controller.state_dict() if self.controller else None,
                           "merge_residuals": has_residuals},
        }

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        """Write the bf16 merge residuals into the checkpoint the Trainer has just saved."""
        from safetensors.torch import save_file

        residuals = merge_residuals(model) if model is not None else {}  # every rank: sharded ones are gathered
        if not residuals or not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / MERGE_RESIDUALS_FILE
        write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in residuals.items()}, str(tmp)))

    def _load_merge_residuals(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        from safetensors.torch import load_file

        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / MERGE_RESIDUALS_FILE
        if not path.is_file():
            raise ValueError(
                f"the checkpoint at step {state.global_step} had bf16 merge residuals but {path} is missing: resume "
                f"from the checkpoint in output_dir, or copy its {MERGE_RESIDUALS_FILE} there"
            )
        load_merge_residuals(model, load_file(str(path)))

    def _saved_attributes(self, state: TrainerState) -> dict:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):  # several ReLoRACallbacks: the Trainer keeps a list
            saved = saved[0]
        attributes = (saved or {}).get("attributes", {})
        if attributes.get("controller_state") is None:
            raise ValueError(
                f"the checkpoint at step {state.global_step} holds no ReLoRA state: it was not saved with a "
                "ReLoRACallback, so the merges and restarts already done are unknown"
            )
        return attributes
