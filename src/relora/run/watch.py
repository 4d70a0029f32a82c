"""What watches a training loop from outside the math: a stop signal, and loss spikes after restarts."""

from __future__ import annotations

import contextlib
import logging
import signal

from relora.core.controller import ReLoRA, StepEvent

logger = logging.getLogger(__name__)


class StopOnSignal:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop after the current
    step (never mid-step, so the checkpoint is consistent); a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: saving a checkpoint after this step", signal.Signals(signum).name)

    def __enter__(self) -> StopOnSignal:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class SpikeWatch:
    """Warn when the loss right after a restart jumps above its level before the restart.

    Heuristic, logging only: a spike here is 3 consecutive steps within the
    re-warmup (plus 10 steps) whose loss exceeds the mean of the 10 steps
    before the restart by more than 10% + 0.1 nats. One noisy step is not a
    spike: at small batches single-step losses swing that much on their own
    (seen in docs/results/baselines). Users tune ``--restart-warmup-steps`` with it.
    """

    RUN = 3

    def __init__(self, restart_warmup_steps: int) -> None:
        self.window = restart_warmup_steps + 10
        self.recent: list[float] = []
        self.baseline: float | None = None
        self.until = -1
        self.restart = 0
        self.above: list[float] = []

    def observe(self, step: int, loss: float, event: StepEvent | None, controller: ReLoRA | None) -> None:
        if event is not None and event.restarted and self.recent:
            self.baseline = sum(self.recent) / len(self.recent)
            self.until, self.restart, self.above = step + self.window, controller.restarts, []
        elif self.baseline is not None and step <= self.until:
            self.above = self.above + [loss] if loss > 1.1 * self.baseline + 0.1 else []
            if len(self.above) == self.RUN:
                logger.warning("loss spike after restart %d: %.3f on average over steps %d-%d against %.3f before "
                               "it; a longer --restart-warmup-steps may help", self.restart,
                               sum(self.above) / self.RUN, step - self.RUN + 1, step, self.baseline)
                self.baseline = None  # once per restart
        self.recent = (self.recent + [loss])[-10:]

    def state_dict(self) -> dict:
        """JSON-able: checkpointed with the trainer state, so a resumed run warns where the uninterrupted one would."""
        return {"recent": list(self.recent), "baseline": self.baseline, "until": self.until,
                "restart": self.restart, "above": list(self.above)}

    def load_state_dict(self, state: dict) -> None:
        self.recent, self.above = list(state["recent"]), list(state["above"])
        self.baseline, self.until, self.restart = state["baseline"], state["until"], state["restart"]
