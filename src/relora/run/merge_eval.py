"""What a merge does to the model's function: the validation loss right before and right after it.

A correct merge (W <- W + s B A, B <- 0, A re-initialised) leaves the model's
function unchanged up to float rounding; the study's ``unscaled-merge`` defect
(relora.core.config.REFERENCE_DEFECTS) changes it at every merge. With
``--eval-merges`` the loop measures that on a small fixed set of validation
windows (the same at every merge), and the merge step's metrics.jsonl record
holds both losses. The evaluation draws no random numbers and leaves the model
in train mode, so the run trains exactly as without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from relora.core.controller import ReLoRA, StepEvent
from relora.run.config import TrainConfig

# At most this many windows (spread over the validation split): enough to see a function change of 1e-4 in the
# loss, cheap enough to run twice at every merge
MERGE_EVAL_WINDOWS = 32


@dataclass
class MergeLosses:
    """The validation loss of the same windows right before and right after one merge."""

    before: float
    after: float
    seconds: float  # spent evaluating: not training time

    def record(self) -> dict[str, float]:
        """The fields of the merge step's metrics.jsonl record."""
        return {"merge_loss_before": self.before, "merge_loss_after": self.after}


def merge_eval_windows(cfg: TrainConfig) -> int:
    """How many validation windows a merge evaluation reads: the run's evaluation windows, at most 32."""
    return max(1, min(cfg.eval_tokens // cfg.seq_len, MERGE_EVAL_WINDOWS))


def controller_step(controller: ReLoRA | None, step: int,
                    measure: Callable[[], float] | None) -> tuple[StepEvent | None, MergeLosses | None]:
    """The controller's step (None without a controller); with ``measure`` (the validation loss of the model
    now), the loss right before and right after the merge when the step merges."""
    if controller is None:
        return None, None
    if measure is None or not controller.merges_at(step):
        return controller.step(step), None
    start = time.perf_counter()
    before = measure()
    middle = time.perf_counter()
    event = controller.step(step)
    after_start = time.perf_counter()
    after = measure()
    return event, MergeLosses(before, after, middle - start + time.perf_counter() - after_start)
