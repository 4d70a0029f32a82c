"""Reading what a training run left behind: metrics, summary, weights, reference weights.

Run directory layout (written by ``relora.train``): ``config.yaml``,
``metrics.jsonl``, ``summary.json`` (written last, so it marks a finished
run), ``reference/`` (dense weights where low-rank training started),
``checkpoints/step_N/`` and ``final/`` (dense model, last cycle merged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from relora.errors import ConfigError
from relora.run import checkpoint as ckpt
from relora.run.config import TWO_PHASE_LR_METHODS, TrainConfig


@dataclass
class Curves:
    """A run's metrics as columns, for plotting."""

    label: str
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_ppl: list[float] = field(default_factory=list)
    restarts: list[int] = field(default_factory=list)
    switch: int | None = None  # first step trained with adapters (end of the warm start)


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def read_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def read_summary(run: Path) -> dict | None:
    path = run / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_curves(run: Path, label: str | None = None) -> Curves:
    """Loss, validation perplexity and restart steps from ``metrics.jsonl``."""
    if not is_run_dir(run):
        raise ConfigError(f"{run} is not a run directory (no config.yaml and metrics.jsonl); pass a --out of relora train")
    curves = Curves(label=label or run.name)
    config = TrainConfig(**read_config(run))
    if config.method in TWO_PHASE_LR_METHODS and config.relora_phase_start > 0:  # full-ws-lr: where its LR steps
        curves.switch = config.relora_phase_start
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "loss" in record:
            curves.steps.append(record["step"])
            curves.loss.append(record["loss"])
        if "val_ppl" in record:
            curves.val_steps.append(record["step"])
            curves.val_ppl.append(record["val_ppl"])
        if record.get("restart"):
            curves.restarts.append(record["step"])
    if not curves.steps:
        raise ConfigError(f"{run}/metrics.jsonl holds no training records yet; let the run log a few steps first")
    return curves


def trained_weights(path: Path) -> Path:
    """The weights ``relora analyze`` reads for PATH: a run's ``final/`` (else its latest checkpoint),
    a checkpoint, or a Hugging Face model directory."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a run directory, a checkpoint or a model directory")
    if (path / ckpt.MARKER).is_file() or (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():
        return path / "final"
    latest = ckpt.latest_checkpoint(path / "checkpoints")
    if latest is not None:
        return latest
    raise ConfigError(f"{path} holds no model: no final/, no complete checkpoint, no config.json")


def default_reference(path: Path) -> Path:
    """The run's ``reference/`` for a run directory, a checkpoint in it, or its ``final/``."""
    for run in (path, path.parent, path.parent.parent):
        if (run / "reference" / "config.json").is_file() and is_run_dir(run):
            return run / "reference"
    raise ConfigError(
        f"no reference weights found for {path} (runs save them in RUN/reference/ where low-rank training "
        f"starts); pass --reference CHECKPOINT"
    )


def run_label(path: Path) -> str:
    """A short name for legends: the run directory's name."""
    for run in (path, path.parent, path.parent.parent):
        if is_run_dir(run):
            return run.name
    return path.name
