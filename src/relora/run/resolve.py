"""Resolving a run's config: defaults <- preset <- ``--config FILE`` <- flags, or a resumed run's saved config
<- the same layers. What the settings are and which are valid: relora.run.config.
"""

from __future__ import annotations

import difflib
import functools
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from relora.data import load_prepared
from relora.errors import ConfigError, DataError, UsageError
from relora.models import load_preset
from relora.run.config import FIELD_NAMES, TrainConfig, incompatible_changes
from relora.run.fields import numeric_from_string

# Step counts that are fractions of a run: when --steps (or steps: in a config file) shortens or lengthens a
# preset, those the user did not set themselves are scaled with it, so that `--preset tiny --steps 60` keeps
# the preset's shape (a quarter warm start, four cycles) instead of failing on a 120-step warm start.
SCALED_WITH_STEPS = ("warmup_steps", "warm_start_steps", "reset_every", "restart_warmup_steps", "eval_every",
                     "save_every")

logger = logging.getLogger(__name__)


def _check_keys(values: dict, where: str) -> None:
    for key in values:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown setting {key!r} in {where}{hint}")


def read_config_file(path: str | Path) -> dict:
    """A YAML mapping of TrainConfig fields (``model:`` for the architecture)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    _check_keys(values, str(path))
    return values


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """defaults <- preset <- config file <- overrides (flags); validated."""
    file_values = read_config_file(config_file) if config_file else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(overrides, "the overrides")
    name = overrides.get("preset") or file_values.get("preset") or preset or TrainConfig.preset
    values: dict[str, Any] = {"preset": name}
    preset_values = load_preset(name)
    values["model"] = dict(preset_values.get("model", {}))
    values.update(preset_values.get("train", {}))
    _check_keys(values, f"preset {name}")
    for layer in (file_values, overrides):
        _merge_layer(values, layer)
    values.pop("data_id", None)  # derived by the run from its data; a run's config.yaml reused as --config has one
    steps_given = "steps" in file_values or "steps" in overrides
    if steps_given:
        given = set(file_values) | set(overrides)
        scale_with_steps(values, preset_values.get("train", {}).get("steps", TrainConfig.steps),
                         [name for name in SCALED_WITH_STEPS if name not in given])
    config = TrainConfig(**values)
    config.validate()
    return config


def scale_with_steps(values: dict[str, Any], preset_steps: int, names: list[str]) -> None:
    """Scale the step counts ``names`` of a preset by ``values["steps"] / preset_steps``, in place.

    Rounded down (a warm start shorter than the run stays shorter), at least 1 where the preset's is positive
    (0 keeps its meaning: "only at the end", "no warm-up").
    """
    steps = numeric_from_string(values["steps"], ["int"])
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0 or steps == preset_steps:
        return  # a bad --steps is validate()'s to report
    changed = []
    for name in names:
        old = values.get(name, getattr(TrainConfig, name))
        if isinstance(old, int) and not isinstance(old, bool) and old > 0:
            values[name] = max(1, old * steps // preset_steps)
            changed.append(f"{name} {old} -> {values[name]}")
    if changed:
        _say_once(f"steps {steps} instead of the preset's {preset_steps}: scaled {', '.join(changed)} "
                  "(set them to override)")


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    """Log ``message`` once per process: `relora compare` resolves the same settings for every run of a set."""
    logger.info("%s", message)


def _merge_layer(values: dict[str, Any], layer: dict[str, Any]) -> None:
    """``values`` updated in place by a later layer of settings (``model:`` merged key by key)."""
    for key, value in layer.items():
        values[key] = merge_model(values.get("model", {}), value) if key == "model" else value


def merge_model(base: dict, update: Any) -> dict:
    """A ``model:`` mapping updated by another one (a later layer of settings)."""
    if not isinstance(update, dict):
        raise ConfigError(f"model must be a mapping of LlamaConfig fields (e.g. hidden_size: 512), got {update!r}")
    return {**base, **update}


# ---------------------------------------------------------------- the run directory: new, or resumed
def new_run_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                   peak_lr: float | None = None) -> TrainConfig:
    """A new run's config (``resolve_config``, then ``--lr`` as the method's peak LR) and its run directory:
    ``runs/PRESET-METHOD-TIME`` unless given, and refused unless new or empty."""
    overrides = dict(overrides or {})
    if "init_from" in overrides and "warm_start_steps" not in overrides:
        overrides["warm_start_steps"] = 0  # the loaded model is the warm start
    config = resolve_config(config_file=config_file, overrides=overrides)
    config.set_peak_lr(peak_lr)
    if config.out is None:
        config.out = str(Path("runs") / f"{config.preset}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run directory {out} is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"run directory {out} is not empty; pass --resume to continue it or choose another --out")
    return config


def resume_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                  peak_lr: float | None = None) -> tuple[TrainConfig, list[str]]:
    """The config of a resumed run: its saved config.yaml <- config file <- overrides, as for a new run; validated.

    The run is ``overrides["out"]``, else the newest of its preset and method under runs/. A change of a
    setting in RESUME_INCOMPATIBLE is refused (ConfigError); returns the config and the settings that changed.
    """
    overrides = dict(overrides or {})
    _check_keys(overrides, "the overrides")
    run_dir = Path(overrides["out"]) if "out" in overrides else _newest_run(
        overrides.get("preset", TrainConfig.preset), overrides.get("method", TrainConfig.method))
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} holds no run to resume (no config.yaml); check --out")
    saved = read_config_file(run_dir / "config.yaml")  # a damaged or foreign file: one line, not a traceback
    values = dict(saved)
    for layer in (read_config_file(config_file) if config_file else {}, overrides):
        _merge_layer(values, layer)
    config = TrainConfig(**{**values, "out": str(run_dir)})
    config.set_peak_lr(peak_lr)
    config.validate()
    if config.data != saved.get("data"):  # another path, working directory or dataset: compared by identity
        config.data_id = _data_identity(config.data)
        if not saved.get("data_id"):  # an older run's config: the identity of what its path holds now
            saved["data_id"] = _data_identity(saved.get("data"), missing_ok=True)
    changed = incompatible_changes(saved, config.to_dict())
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir} with a different {', '.join(changed)}; drop those flags or start a new --out"
        )
    current = config.to_dict()
    return config, sorted(k for k, v in current.items() if saved.get(k) != v and k not in ("out", "data_id"))


def _newest_run(preset: str, method: str) -> Path:
    runs = sorted(Path("runs").glob(f"{preset}-{method}-*"))
    runs = [r for r in runs if (r / "config.yaml").is_file()]
    if not runs:
        raise UsageError(f"no run of preset {preset} and method {method} under runs/; pass --out RUN_DIR")
    return runs[-1]


def _data_identity(path: str | None, *, missing_ok: bool = False) -> str | None:
    """The identity of the prepared data at ``path`` (DataError if there is none, or None with ``missing_ok``)."""
    try:
        return load_prepared(path).identity if path else None
    except DataError:
        if missing_ok:
            return None
        raise
