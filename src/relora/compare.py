"""``relora compare``: the paper's method comparison, its Table 6 ablation, and ReLoRA beside GaLore and APOLLO.

Every run of a set is one ``relora train`` with the same preset, data, token
budget, schedule and seed, differing only in its method or one ablation
switch. The ``baselines`` set puts both ReLoRA rows that later papers
disagree on (with the warm start, as the paper prescribes, and without it, as
GaLore's Table 2 measured it) next to full-rank training, LoRA and the
published GaLore and APOLLO optimizers. Runs live in ``RUNS/NAME/``; a finished run whose config matches is
reused and an unfinished one is resumed, so an interrupted comparison
continues where it stopped. Results: markdown tables, a JSON file, the loss
figure and the spectra figures under ``OUT/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relora.analysis import analyze_runs, write_analysis
from relora.data import load_prepared
from relora.models import ConfigError
from relora.plots import plot_curves
from relora.run_config import ADAPTER_METHODS, TrainConfig, incompatible_changes, resolve_config
from relora.runs import read_config, read_curves, read_summary
from relora.spectra import DEFAULT_THRESHOLD

logger = logging.getLogger(__name__)

ABLATION_SWITCHES = ("restarts", "optimizer_reset", "jagged", "warm_start")


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a directory name and the settings that make it that method."""

    name: str
    settings: dict[str, Any]

    def switches(self) -> dict[str, bool]:
        """Table 6's columns: which ReLoRA components this run has."""
        method = self.settings["method"]
        if method not in ADAPTER_METHODS:
            return {}
        on = {k: self.settings.get(k, True) for k in ABLATION_SWITCHES}
        if method in ("lora", "lora-ws"):
            on.update(restarts=False, optimizer_reset=False, jagged=False)
        if method == "lora":
            on["warm_start"] = False
        return on


MAIN_SET = [
    RunSpec("full", {"method": "full"}),
    RunSpec("control", {"method": "control"}),
    RunSpec("lora", {"method": "lora"}),
    RunSpec("lora-ws", {"method": "lora-ws"}),
    RunSpec("relora", {"method": "relora"}),
]
ABLATION_SET = [
    RunSpec("relora", {"method": "relora"}),
    *[RunSpec(f"relora-no-{s.replace('_', '-')}", {"method": "relora", s: False}) for s in ABLATION_SWITCHES],
    RunSpec("lora", {"method": "lora"}),
    RunSpec("lora-ws", {"method": "lora-ws"}),
    RunSpec("full", {"method": "full"}),
]
BASELINES_SET = [
    RunSpec("full", {"method": "full"}),
    RunSpec("lora-ws", {"method": "lora-ws"}),
    RunSpec("relora", {"method": "relora"}),
    RunSpec("relora-no-warm-start", {"method": "relora", "warm_start": False}),  # GaLore Table 2's ReLoRA
    RunSpec("galore", {"method": "galore"}),
    RunSpec("apollo", {"method": "apollo"}),
    # rank 1 is what makes APOLLO-mini (APOLLO paper): a --proj-rank given to the set is GaLore's and APOLLO's
    RunSpec("apollo-mini", {"method": "apollo-mini", "proj_rank": 1}),
]
SETS = {"main": MAIN_SET, "ablation": ABLATION_SET, "baselines": BASELINES_SET}
TABLE_SETS = ("main", "baselines")  # sets written as the method table (the others as Table 6)
PAPER_SETS = ("main", "ablation")  # what ``--set all`` runs: the ReLoRA paper's tables, no extra packages


def resolve_run(spec: RunSpec, runs_dir: Path, *, preset: str | None, config_file: str | None,
                overrides: dict[str, Any]) -> TrainConfig:
    values = {**overrides, **spec.settings, "out": str(runs_dir / spec.name)}
    if values.get("method") not in ADAPTER_METHODS:  # the study-only reference defects are adapters' defects:
        values.pop("reference_defects", None)  # full-rank runs are the same run without them, and reused
    return resolve_config(preset=preset, config_file=config_file, overrides=values)


def run_state(config: TrainConfig) -> str:
    """``new``, ``done`` (finished with this config) or ``partial`` (same config, not finished)."""
    run = Path(config.out)
    if not (run / "config.yaml").is_file():
        if run.exists() and any(run.iterdir()):
            raise ConfigError(f"{run} exists but holds no run; remove it or pass another --runs directory")
        return "new"
    changed = incompatible_changes(read_config(run), config.to_dict())
    if changed:
        raise ConfigError(
            f"{run} holds a run with a different {', '.join(changed)}; pass another --runs directory or remove it"
        )
    return "done" if read_summary(run) is not None else "partial"


def run_set(configs: list[TrainConfig], *, progress: bool = True) -> dict[str, float]:
    """Train every config not already finished (resuming partial runs); returns wall seconds per run trained."""
    from relora.train import train

    trained: dict[str, float] = {}
    for i, config in enumerate(configs, 1):
        name, state = Path(config.out).name, run_state(config)
        if state == "done":
            logger.info("[%d/%d] %s: finished before, reused", i, len(configs), name)
            continue
        logger.info("[%d/%d] %s: %s", i, len(configs), name, "resuming" if state == "partial" else "training")
        start = time.perf_counter()
        summary = train(config, resume=state == "partial", progress=progress)
        if summary.interrupted:
            raise KeyboardInterrupt
        trained[name] = time.perf_counter() - start
        logger.info("[%d/%d] %s: val ppl %.2f in %.0f s", i, len(configs), name, summary.val_ppl or math.nan,
                    trained[name])
    return trained


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _row_values(run: Path) -> dict[str, Any]:
    summary = read_summary(run)
    if summary is None:
        raise ConfigError(f"{run} has not finished; run relora compare again to complete it")
    return summary


def _fmt_state(summary: dict) -> str:
    """Optimizer state at the end of the run in MB; a larger peak (ReLoRA's full-rank warm start) after it."""
    final, peak = summary.get("optimizer_state_bytes"), summary.get("peak_optimizer_state_bytes", 0)
    if final is None:  # a run from before the state was measured
        return "n/a"
    return f"{final / 1e6:.2f}" + (f" (peak {peak / 1e6:.2f})" if peak > final else "")


def comparison_table(specs: list[RunSpec], runs_dir: Path, spectra_rank: dict[str, float]) -> tuple[str, list[dict]]:
    """Markdown table of final val ppl, ratio to full-rank, parameters, optimizer state, dW rank, speed and time.

    tokens/s is the training throughput the run measured (evaluation and
    checkpoints excluded); wall time is the whole run.
    """
    rows = []
    full = read_summary(runs_dir / "full") if (runs_dir / "full").is_dir() else None
    lines = [
        "| method | val ppl | ppl / full | trainable params | total params | optimizer state MB | mean rank of dW "
        "| restarts | tokens/s | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in specs:
        s = _row_values(runs_dir / spec.name)
        ratio = s["val_ppl"] / full["val_ppl"] if full and full.get("val_ppl") else math.nan
        rank = spectra_rank.get(spec.name, math.nan)
        speed = s.get("tokens_per_s") or s["tokens"] / s["wall_s"]
        rows.append({"name": spec.name, **s, "ppl_over_full": ratio, "mean_rank": rank})
        lines.append(
            f"| {spec.name} | {s['val_ppl']:.2f} | {ratio:.3f} | {_fmt_params(s['trainable_params'])} | "
            f"{_fmt_params(s['total_params'])} | {_fmt_state(s)} | {rank:.1f} | {s['restarts']} | "
            f"{speed:,.0f} | {s['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n", rows


def ablation_table(specs: list[RunSpec], runs_dir: Path) -> tuple[str, list[dict]]:
    """Table 6's layout: one column per ReLoRA component, then the final val ppl."""
    mark = {True: "yes", False: "no"}
    lines = ["| run | restarts | optimizer reset | jagged schedule | warm start | val ppl |", "|---|---|---|---|---|---|"]
    rows = []
    for spec in specs:
        s = _row_values(runs_dir / spec.name)
        on = spec.switches()
        cells = [mark[on[k]] if on else "full-rank" for k in ABLATION_SWITCHES]
        rows.append({"name": spec.name, **on, "val_ppl": s["val_ppl"]})
        lines.append(f"| {spec.name} | {' | '.join(cells)} | {s['val_ppl']:.2f} |")
    return "\n".join(lines) + "\n", rows


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
) -> dict[str, Any]:
    """Run the requested sets and write their tables and figures under ``out``; returns the results."""
    for name in sets:
        if name not in SETS:
            raise ConfigError(f"unknown set {name!r}; choose from: {', '.join(SETS)}")
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir else out / "runs"
    overrides = dict(overrides or {})
    specs: dict[str, RunSpec] = {}
    for name in sets:
        for spec in SETS[name]:
            specs.setdefault(spec.name, spec)
    configs = [resolve_run(s, runs_dir, preset=preset, config_file=config_file, overrides=overrides)
               for s in specs.values()]
    if configs[0].data is not None:  # fail on missing or damaged data before hours of training
        load_prepared(configs[0].data)
    for config in configs:  # fail on a mismatching run directory before hours of training
        run_state(config)
    start = time.perf_counter()
    trained = run_set(configs, progress=progress)
    elapsed = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"preset": configs[0].preset, "runs_dir": str(runs_dir), "trained_s": trained,
                               "elapsed_s": elapsed, "sets": {}}
    for name in sets:
        members = SETS[name]
        curves = [read_curves(runs_dir / s.name) for s in members]
        figures = {"loss": plot_curves(curves, out / f"{name}-loss.png", title=f"{configs[0].preset}: {name} set")}
        if name in TABLE_SETS:
            adapter_runs = [s for s in members if s.name != "control"]  # control is a different shape
            spectra = analyze_runs([runs_dir / s.name for s in adapter_runs], threshold=threshold)
            figures.update(write_analysis(spectra, out, threshold=threshold, prefix=f"{name}-"))
            ranks = {label: _mean([r for rs in sp.ranks().values() for r in rs]) for label, sp in spectra.items()}
            table, rows = comparison_table(members, runs_dir, ranks)
        else:
            table, rows = ablation_table(members, runs_dir)
        _write_text(out / f"{name}.md", table)
        results["sets"][name] = {"table": table, "rows": rows, "figures": {k: str(v) for k, v in figures.items()}}
    _write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
