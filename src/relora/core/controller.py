"""When to merge, prune and restart: the ReLoRA controller (Algorithm 1 of the paper)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from relora.core.adapters import adapter_parameters, merge_and_reinit
from relora.core.config import ReLoRAConfig
from relora.core.pruning import check_prunable, prune_optimizer_state

logger = logging.getLogger(__name__)


@dataclass
class StepEvent:
    """What ``ReLoRA.step`` did at one step."""

    step: int
    merged: bool = False
    restarted: bool = False
    pruned_fraction: float | None = None


class ReLoRA:
    """Calls merges, optimizer resets and LR restarts at the right steps.

    The training loop calls ``step(global_step)`` once after every optimizer
    step, with the number of optimizer steps completed so far. The ReLoRA
    phase starts at ``start_step`` (default: ``config.warm_start_steps``, the
    step at which the model was wrapped). Counting from there, every
    ``merge_every`` steps the adapters are merged and re-initialised, and every
    ``reset_every`` steps the adapters' optimizer state is also pruned: a
    "restart". The LR schedule must restart at ``restart_steps(total)``, the
    same steps (build it with ``relora.jagged_cosine_scheduler``). With
    ``total_steps`` given, nothing happens at or after the last step: a restart
    there would only waste work (``unwrap`` merges the last cycle anyway).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: ReLoRAConfig,
        *,
        start_step: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.start_step = config.warm_start_steps if start_step is None else start_step
        self.total_steps = total_steps
        self.merges = 0
        self.restarts = 0
        self.last_pruned_fraction: float | None = None
        # Refuse an optimizer whose state a restart could not prune now, not at the first restart hours later.
        self._layout_checked = self._check_optimizer(probe=True)

    def _check_optimizer(self, *, probe: bool) -> bool:
        """Whether the adapters' optimizer state is known prunable (ValueError when it is not)."""
        if self.config.reset_every is None:  # no restarts: nothing is ever pruned
            return True
        return check_prunable(self.optimizer, adapter_parameters(self.model), self.config.prune, probe=probe,
                              independent_masks="independent-masks" in self.config.reference_defects)

    def _is_due(self, step: int, every: int | None) -> bool:
        offset = step - self.start_step
        before_end = self.total_steps is None or step < self.total_steps
        return every is not None and offset > 0 and offset % every == 0 and before_end

    def _due_steps(self, every: int | None, total_steps: int | None) -> list[int]:
        total = self.total_steps if total_steps is None else total_steps
        if total is None:
            raise ValueError("total_steps is needed: pass it here or to ReLoRA(...)")
        return [] if every is None else list(range(self.start_step + every, total, every))

    def restart_steps(self, total_steps: int | None = None) -> list[int]:
        """Steps (< total_steps) at which optimizer resets and LR restarts happen."""
        return self._due_steps(self.config.reset_every, total_steps)

    def merge_steps(self, total_steps: int | None = None) -> list[int]:
        """Steps (< total_steps) at which adapters are merged and re-initialised."""
        return self._due_steps(self.config.merge_every, total_steps)

    def merges_at(self, global_step: int) -> bool:
        """Whether ``step(global_step)`` will merge: a caller can look at the model right before the merge."""
        return self._is_due(global_step, self.config.merge_every)

    def step(self, global_step: int) -> StepEvent:
        """Merge / prune if ``global_step`` (optimizer steps done) is due."""
        event = StepEvent(step=global_step)
        if not self._layout_checked:  # the probe could not run: check the state the first steps created
            self._layout_checked = self._check_optimizer(probe=False)
        if not self.merges_at(global_step):
            return event
        # Seed from the step: identical on every rank, different every cycle.
        merge_and_reinit(self.model, seed=self.config.seed + global_step,
                         unscaled="unscaled-merge" in self.config.reference_defects)  # study-only defect
        self.merges += 1
        event.merged = True
        if self._is_due(global_step, self.config.reset_every):
            generator = torch.Generator().manual_seed(self.config.seed + global_step)
            event.pruned_fraction = prune_optimizer_state(
                self.optimizer,
                adapter_parameters(self.model),
                self.config.prune,
                self.config.prune_ratio,
                generator=generator,
                restart_step=self.config.restart_adam_step == "reset",
                independent_masks="independent-masks" in self.config.reference_defects,  # study-only defect
            )
            self.restarts += 1
            event.restarted = True
            self.last_pruned_fraction = event.pruned_fraction
            logger.info(
                "restart %d at step %d: merged adapters, pruned %.4f of their optimizer state (%s)",
                self.restarts, global_step, event.pruned_fraction, self.config.prune,
            )
        return event

    def state_dict(self) -> dict:
        return {
            "start_step": self.start_step,
            "merges": self.merges,
            "restarts": self.restarts,
            "last_pruned_fraction": self.last_pruned_fraction,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = {k: v for k, v in state.get("config", {}).items() if k not in ("warm_start_steps",)}
        current = {k: v for k, v in self.config.to_dict().items() if k in saved}
        if saved and saved != current:
            changed = sorted(k for k in saved if saved[k] != current.get(k))
            raise ValueError(f"controller state was saved with a different ReLoRA config (fields: {', '.join(changed)})")
        self.start_step = state["start_step"]
        self.merges = state["merges"]
        self.restarts = state["restarts"]
        self.last_pruned_fraction = state["last_pruned_fraction"]
