"""``relora compare``: the paper's method comparison, its Table 6 ablation, and ReLoRA beside GaLore and APOLLO.

The runs of each set (``compare_sets``) are tuned and repeated by the
procedure a reviewer would accept (``compare_procedure``, issue 17): each
method's peak LR chosen on a grid by final validation loss at the first seed,
then the chosen LR repeated over more seeds; the tables (``compare_tables``)
report the *test* split's perplexity as mean and sample std over the seeds,
with Welch's t-test against full-rank. A seed fixes model init and data order,
so every method sees the same tokens in the same order per seed, and every
run is evaluated on the same fixed windows. Runs live in
``RUNS/NAME-lrLR-seedSEED/``; a finished run whose config matches is reused
and an unfinished one is resumed, so an interrupted comparison continues where
it stopped. Results: markdown tables, a JSON file, the loss figure and the
spectra figures under ``OUT/``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from relora.analysis.compare_procedure import (
    DIVERGED,
    Procedure,
    method_result,
    run_set,
    run_state,
    seeds_at_chosen_lr,
    widen_grids,
)
from relora.analysis.compare_sets import SETS, TABLE_SETS, RunSpec, dropped_settings, resolve_run
from relora.analysis.compare_tables import ablation_table, comparison_table, fairness_header
from relora.analysis.plots import plot_curves
from relora.analysis.report import analyze_runs, write_analysis
from relora.analysis.spectra import DEFAULT_THRESHOLD
from relora.analysis.stats import SIGNIFICANCE_LEVEL
from relora.data import load_prepared
from relora.errors import ConfigError
from relora.fileio import write_text_atomic
from relora.run.config import TrainConfig
from relora.run.records import read_curves

logger = logging.getLogger(__name__)


def compare(
    *,
    sets: list[str],
    out: Path,
    runs_dir: Path | None = None,
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    progress: bool = True,
    procedure: Procedure | None = None,
) -> dict[str, Any]:
    """Run the requested sets by ``procedure`` and write their tables and figures under ``out``; returns the results.

    First every method at every grid LR at the first seed; then, up to
    ``procedure.widen_edges`` times, one more LR past the edge for each method
    whose choice sits at its grid's edge; then, once each method's LR is
    chosen, the remaining seeds at that LR.
    """
    procedure = procedure or Procedure()
    procedure.validate()
    members = set_members(sets, procedure.methods)
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir else out / "runs"
    specs: dict[str, RunSpec] = {}
    for name in sets:
        for spec in members[name]:
            specs.setdefault(spec.name, spec)
    for key, names in dropped_settings(list(specs.values()), dict(overrides or {})).items():
        logger.warning("--%s applies only to the rows that read it; %s run without it",
                       key.replace("_", "-"), ", ".join(names))
    resolve = functools.partial(resolve_run, runs_dir=runs_dir, preset=preset, config_file=config_file,
                                overrides=dict(overrides or {}), clip_rule=procedure.clip_rule)
    lrs = list(procedure.lr_grid) if procedure.lr_grid is not None else [None]
    grid = {name: [resolve(spec, lr=lr, seed_index=0) for lr in lrs] for name, spec in specs.items()}
    first = [c for configs in grid.values() for c in configs]
    check_before_training(first)
    start = time.perf_counter()
    trained = run_set(first, progress=progress)
    trained.update(widen_grids(grid, procedure.widen_edges,
                               lambda name, lr: resolve(specs[name], lr=lr, seed_index=0), progress=progress))
    seeds = {name: seeds_at_chosen_lr(grid[name], procedure.seeds,
                                      lambda lr, k, spec=spec: resolve(spec, lr=lr, seed_index=k))
             for name, spec in specs.items()}
    trained.update(run_set([c for configs in seeds.values() for c in configs], progress=progress))
    elapsed = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    methods = {name: method_result(spec, grid[name], seeds[name]) for name, spec in specs.items()}
    results: dict[str, Any] = {
        "preset": first[0].preset, "runs_dir": str(runs_dir), "trained_s": trained, "elapsed_s": elapsed,
        "procedure": {"lr_grid": procedure.lr_grid, "widen_edges": procedure.widen_edges, "seeds": procedure.seeds,
                      "clip_rule": procedure.clip_rule,
                      "significance": f"Welch's t-test on test ppl, two-sided, p < {SIGNIFICANCE_LEVEL}",
                      "reported_beside": "paired t-test over shared seeds (rows' paired_p_values)"},
        "methods": methods, "sets": {},
    }
    header = fairness_header(procedure, first, {name: m["grid"] for name, m in methods.items()})
    for name in sets:
        if members[name]:
            results["sets"][name] = write_set(name, members[name], methods, out, header=header,
                                              title=f"{first[0].preset}: {name} set", threshold=threshold)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=str))
    return results


def set_members(sets: list[str], methods: tuple[str, ...] | None) -> dict[str, list[RunSpec]]:
    """The rows of each requested set, only those named in ``methods`` unless it is None; one-line errors for an
    unknown set or method."""
    for name in sets:
        if name not in SETS:
            raise ConfigError(f"unknown set {name!r}; choose from: {', '.join(SETS)}")
    members = {name: [s for s in SETS[name] if methods is None or s.name in methods] for name in sets}
    if methods is not None:
        known = {s.name for name in sets for s in SETS[name]}
        unknown = sorted(set(methods) - known)
        if unknown:
            raise ConfigError(f"--methods {', '.join(unknown)} not in the {'/'.join(sets)} set; choose from: "
                              f"{', '.join(sorted(known))}")
    return members


def check_before_training(configs: list[TrainConfig]) -> None:
    """Fail on missing, damaged or test-less data, or on a mismatching run directory, before hours of training."""
    if configs[0].data is not None:
        load_prepared(configs[0].data).test_split()
    for config in configs:
        run_state(config)


def write_set(name: str, members: list[RunSpec], methods: dict[str, dict], out: Path, *, header: str, title: str,
              threshold: float) -> dict[str, Any]:
    """A set's loss figure, its table (the method table, with spectra, or Table 6's layout) written to
    ``OUT/NAME.md``, and its entry of results.json."""
    chosen_runs = [Path(methods[s.name]["chosen_run"]) for s in members]
    curves = [read_curves(run, label=s.name) for run, s in zip(chosen_runs, members) if _has_curve(run)]
    figures = {"loss": plot_curves(curves, out / f"{name}-loss.png", title=title)}
    if name in TABLE_SETS:
        adapter_runs = [(s, r) for s, r in zip(members, chosen_runs)  # control: another shape; diverged: no model
                        if s.name != "control" and not methods[s.name]["diverged"]]
        spectra = analyze_runs([r for _, r in adapter_runs], labels=[s.name for s, _ in adapter_runs],
                               threshold=threshold)
        figures.update(write_analysis(spectra, out, threshold=threshold, prefix=f"{name}-"))
        ranks = {label: _mean([r for rs in sp.ranks().values() for r in rs]) for label, sp in spectra.items()}
        table, rows = comparison_table(members, methods, ranks)
    else:
        table, rows = ablation_table(members, methods)
    table = header + table
    write_text_atomic(out / f"{name}.md", table)
    return {"table": table, "rows": rows, "figures": {k: str(v) for k, v in figures.items()}}


def _has_curve(run: Path) -> bool:
    """Whether a run logged anything to plot: all did, but a run that diverged may have stopped before."""
    if not (run / DIVERGED).is_file():
        return True
    try:
        read_curves(run)
    except ConfigError:
        return False
    return True


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
