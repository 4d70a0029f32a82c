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
from relora.run_config import ADAPTER_METHODS, FIELD_NAMES, TrainConfig, incompatible_changes, resolve_config
from relora.runs import read_config, read_curves, read_summary
from relora.spectra import DEFAULT_THRESHOLD

logger = logging.getLogger(__name__)

ABLATION_SWITCHES = ("restarts", "optimizer_reset", "jagged", "warm_start")


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a directory name and the settings that make it that method."""

    name: str
    settings: dict[str, Any]
    paper: str | None = None  # the row of the paper's Table 6 this run reproduces


def ablation_switches(config: TrainConfig) -> dict[str, bool]:
    """Table 6's columns: which ReLoRA components a run of ``config`` actually has; {} if full-rank.

    Read from what the trainer does, not from the switches as given: restarts
    are merges and re-inits of the adapters; an optimizer reset is a prune of
    their moments at those merges; a jagged schedule puts the LR at 0 there
    and re-warms it; a warm start is full-rank training before the adapters.
    ``--no-restarts`` thus runs (and is labelled) with no reset and no jagged
    schedule either: there is nothing for them to act at.
    """
    relora_cfg = config.relora_config()
    if relora_cfg is None:
        return {}
    restarts = relora_cfg.merge_every is not None
    return {
        "restarts": restarts,
        "optimizer_reset": restarts and relora_cfg.prune != "none" and relora_cfg.prune_ratio > 0,
        "jagged": restarts and config.jagged and relora_cfg.restart_warmup_steps > 0,
        "warm_start": config.relora_phase_start > 0,
    }


MAIN_SET = [
    RunSpec("full", {"method": "full"}),
    RunSpec("control", {"method": "control"}),
    RunSpec("lora", {"method": "lora"}),
    RunSpec("lora-ws", {"method": "lora-ws"}),
    RunSpec("relora", {"method": "relora"}),
]
_NO_WARM_START = {"method": "relora", "warm_start": False}
# The rows of the paper's Table 6 (130M), each adding components to LoRA from scratch; the paper's perplexity
# beside them in RELORA_SPEC.md section 8 (docs/method.md quotes the table).
ABLATION_SET = [
    RunSpec("lora", {"method": "lora"}, "LoRA"),
    RunSpec("lora-restarts", {**_NO_WARM_START, "optimizer_reset": False, "jagged": False}, "+ restarts"),
    RunSpec("lora-restarts-reset", {**_NO_WARM_START, "jagged": False}, "+ restarts + optimizer reset"),
    RunSpec("lora-restarts-jagged", {**_NO_WARM_START, "optimizer_reset": False}, "+ restarts + jagged schedule"),
    RunSpec("relora-no-warm-start", dict(_NO_WARM_START), "restarts + reset + jagged, no warm start"),
    RunSpec("lora-ws", {"method": "lora-ws"}, "warm start only"),
    RunSpec("relora", {"method": "relora"}, "all four (ReLoRA)"),
    RunSpec("full", {"method": "full"}, "full-rank training"),
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


DIVERGED = "diverged.json"  # written into a run that stopped on non-finite losses (Table 6 has such a row)


def run_state(config: TrainConfig) -> str:
    """``new``, ``done`` (finished or diverged with this config) or ``partial`` (same config, not finished)."""
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
    return "done" if read_summary(run) is not None or (run / DIVERGED).is_file() else "partial"


def run_set(configs: list[TrainConfig], *, progress: bool = True) -> dict[str, float]:
    """Train every config not already finished (resuming partial runs); returns wall seconds per run trained."""
    from relora.checkpoint import write_json_atomic
    from relora.train import DivergedError, train

    trained: dict[str, float] = {}
    for i, config in enumerate(configs, 1):
        name, state = Path(config.out).name, run_state(config)
        if state == "done":
            logger.info("[%d/%d] %s: finished before, reused", i, len(configs), name)
            continue
        logger.info("[%d/%d] %s: %s", i, len(configs), name, "resuming" if state == "partial" else "training")
        start = time.perf_counter()
        try:
            summary = train(config, resume=state == "partial", progress=progress)
        except DivergedError as exc:  # a result, not a failure of the comparison: the paper reports one too
            logger.warning("[%d/%d] %s: diverged (%s)", i, len(configs), name, exc)
            write_json_atomic(Path(config.out) / DIVERGED, {"error": str(exc)})
            trained[name] = time.perf_counter() - start
            continue
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
    if summary is None and (run / DIVERGED).is_file():
        raise ConfigError(f"{run.name} diverged ({run / DIVERGED}); a method table needs every run to finish")
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
    """Table 6's layout: the paper's row, one column per ReLoRA component as the run had it, the final val ppl.

    The components are read from the run's saved config (``ablation_switches``): a label says what ran.
    """
    mark = {True: "yes", False: "no"}
    lines = ["| run | Table 6 row | restarts | optimizer reset | jagged schedule | warm start | val ppl |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    for spec in specs:
        run = runs_dir / spec.name
        diverged = (run / DIVERGED).is_file() and read_summary(run) is None
        ppl = None if diverged else _row_values(run)["val_ppl"]
        saved = {k: v for k, v in read_config(run).items() if k in FIELD_NAMES}
        on = ablation_switches(TrainConfig(**saved))
        cells = [mark[on[k]] if on else "full-rank" for k in ABLATION_SWITCHES]
        rows.append({"name": spec.name, "paper_row": spec.paper, **on, "val_ppl": ppl, "diverged": diverged})
        value = "diverged" if diverged else f"{ppl:.2f}"
        lines.append(f"| {spec.name} | {spec.paper or ''} | {' | '.join(cells)} | {value} |")
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
        curves = [read_curves(runs_dir / s.name) for s in members if _has_curve(runs_dir / s.name)]
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
