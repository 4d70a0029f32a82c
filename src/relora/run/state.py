"""What a run carries from step to step and checkpoints as ``trainer_state.json``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# in every trainer_state.json since the first; the others have defaults for checkpoints written before them
_REQUIRED = ("step", "tokens", "wall_s", "skipped_steps", "wrapped", "vocab_size")
# written only once set: lr_scale by a resume or rollback, val_loss by the first evaluation,
# spike_watch by the first save
_OPTIONAL = ("lr_scale", "val_loss", "spike_watch")


@dataclass
class RunState:
    """The run's position and counters: enough, with the checkpointed weights and optimizer, to resume
    exactly where it stopped. ``to_dict`` / ``from_dict`` are the ``trainer_state.json`` format; the fields
    are in the order a run that saves before its first evaluation has always written them."""

    step: int = 0
    tokens: int = 0
    wall_s: float = 0.0  # wall time of the run so far, across resumes
    train_s: float = 0.0  # time in training steps only, the divisor of tokens_per_s (no evaluation or saving)
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    wrapped: bool = False  # past the warm start: the model has adapters
    peak_optimizer_state_bytes: int = 0
    vocab_size: int = 0
    world_size: int = 1
    # the logging window and the bad-step streak are part of the checkpoint: after a resume the next record
    # averages the same steps as in the uninterrupted run, and a streak of non-finite steps goes on counting
    window_loss: float = 0.0
    window_steps: int = 0
    bad_streak: int = 0
    spike_watch: dict[str, Any] | None = None  # SpikeWatch.state_dict()
    val_loss: float | None = None  # the latest evaluation's
    lr_scale: float | None = None  # set by a resume: the LR factor of rollbacks (None: 1, never resumed)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of another version, written back as read

    @property
    def scale(self) -> float:
        """The LR factor in force: 1 unless a rollback lowered it."""
        return 1.0 if self.lr_scale is None else self.lr_scale

    def to_dict(self) -> dict[str, Any]:
        """The JSON of trainer_state.json (optional keys only once set, unknown keys kept)."""
        values = {name: getattr(self, name) for name in _KEYS}
        return {**{k: v for k, v in values.items() if k not in _OPTIONAL or v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunState:
        """Read trainer_state.json; a key missing from an older checkpoint takes its default (KeyError for
        the keys every version wrote)."""
        missing = [key for key in _REQUIRED if key not in values]
        if missing:
            raise KeyError(missing[0])
        known = {k: v for k, v in values.items() if k in _KEYS}
        return cls(**known, extra={k: v for k, v in values.items() if k not in _KEYS})


_KEYS = tuple(f.name for f in fields(RunState) if f.name != "extra")
