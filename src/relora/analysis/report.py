"""``relora analyze``: spectra of dW for one or more runs, written as JSON and figures."""

from __future__ import annotations

import logging
from pathlib import Path

from relora.analysis.plots import plot_below_threshold, plot_spectra
from relora.analysis.spectra import (
    DEFAULT_THRESHOLD,
    UpdateSpectra,
    model_update_spectra,
)
from relora.errors import ConfigError
from relora.fileio import write_json_atomic
from relora.run.records import default_reference, run_label, trained_weights

logger = logging.getLogger(__name__)


def analyze_runs(
    paths: list[Path],
    *,
    reference: Path | None = None,
    labels: list[str] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    target_modules: list[str] | None = None,
) -> dict[str, UpdateSpectra]:
    """Spectra of dW for each path (run, checkpoint or model) against ``reference`` or each run's own."""
    from relora.run.build import (
        model_from_path,  # imports torch/transformers: only when analysing
    )

    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"got {len(labels)} labels for {len(paths)} runs; give one label per run")
    if not threshold > 0:
        raise ConfigError(f"threshold must be > 0, got {threshold}")
    results: dict[str, UpdateSpectra] = {}
    cache: dict[Path, object] = {}
    for i, path in enumerate(paths):
        path = Path(path)
        weights = trained_weights(path)
        ref = Path(reference) if reference is not None else default_reference(path)
        if ref.resolve() not in cache:
            cache[ref.resolve()] = model_from_path(trained_weights(ref))
        model = model_from_path(weights)
        label = labels[i] if labels else run_label(path)
        while label in results:
            label += "'"
        try:
            results[label] = model_update_spectra(model, cache[ref.resolve()], target_modules)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{weights} and reference {ref} do not match ({exc}); pass a reference of the same model") from None
        logger.info("%s: dW against %s, %d matrices", label, ref, sum(len(v) for v in results[label].values.values()))
    return results


def write_analysis(spectra: dict[str, UpdateSpectra], out: Path, *, threshold: float = DEFAULT_THRESHOLD,
                   prefix: str = "") -> dict[str, Path]:
    """``{prefix}spectra.json``, ``{prefix}spectra.png`` and ``{prefix}below_threshold.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {label: s.to_dict(threshold) for label, s in spectra.items()}
    json_path = out / f"{prefix}spectra.json"
    write_json_atomic(json_path, data, indent=None)
    return {
        "json": json_path,
        "spectra": plot_spectra(spectra, out / f"{prefix}spectra.png"),
        "below": plot_below_threshold(spectra, out / f"{prefix}below_threshold.png", threshold=threshold),
    }
