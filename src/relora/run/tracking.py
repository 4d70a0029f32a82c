"""Optional Weights & Biases logging of the metrics records ``relora train`` writes.

``wandb`` is not a dependency: it is imported only when a run asks for it
(``--wandb``), and a missing package is a one-line user error.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from relora.errors import ConfigError

MISSING = "--wandb needs the wandb package: pip install wandb"


def check_wandb_installed() -> None:
    """Fail at config time, before any data is prepared or model built."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(MISSING)


def start_wandb(cfg: Any) -> Any | None:
    """A wandb run for a TrainConfig with ``wandb`` set, else None.

    The run id is derived from the run directory, so ``--resume`` continues
    the same wandb run instead of starting a second one.
    """
    if not getattr(cfg, "wandb", False):
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError(MISSING) from None
    run_dir = Path(cfg.out).resolve()
    return wandb.init(project=cfg.wandb_project or "relora", name=run_dir.name,
                      id=hashlib.sha1(str(run_dir).encode()).hexdigest()[:16], resume="allow",
                      config=cfg.to_dict(), dir=str(run_dir))


def log_wandb(run: Any | None, record: dict) -> None:
    """The numeric fields of one metrics.jsonl record, at its step."""
    if run is None:
        return
    values = {k: v for k, v in record.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    run.log(values, step=record["step"])


def finish_wandb(run: Any | None) -> None:
    if run is not None:
        run.finish()
