"""What a finished (or interrupted) run reports, and reading it back from ``summary.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from relora.errors import ConfigError


@dataclass
class RunSummary:
    """What a finished (or interrupted) run reports."""

    run_dir: Path
    method: str
    steps: int
    tokens: int
    wall_s: float
    trainable_params: int
    total_params: int
    restarts: int
    merges: int
    peak_mem_bytes: int
    optimizer_state_bytes: int = 0  # measured at the end of the run (the method's steady state)
    peak_optimizer_state_bytes: int = 0  # the largest measured during the run (a warm start's full AdamW)
    tokens_per_s: float | None = None  # training throughput, evaluation and checkpointing excluded
    val_loss: float | None = None
    val_ppl: float | None = None
    test_loss: float | None = None  # once, at the end, on the test split's fixed windows; None: the data has none
    test_ppl: float | None = None
    skipped_steps: int = 0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    # SIGINT/SIGTERM arrived. A run asked during its last step still finishes (not interrupted), but whoever
    # runs several (relora compare) must stop before the next. About this process, so not in summary.json.
    stop_requested: bool = False

    def to_dict(self) -> dict:
        values = asdict(self)
        values["run_dir"] = str(self.run_dir)
        del values["stop_requested"]
        return values


def finished_summary(run_dir: Path) -> RunSummary | None:
    """The summary of a finished run (summary.json is written last), None if the run is not finished."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    known = {f.name for f in fields(RunSummary)}
    try:
        saved = json.loads(path.read_text())
        return RunSummary(**{**{k: v for k, v in saved.items() if k in known}, "run_dir": run_dir})
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                          "the run finished: its model is in final/") from None
