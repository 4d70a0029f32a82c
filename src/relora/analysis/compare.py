"""``relora compare``: the paper's method comparison, its Table 6 ablation, and ReLoRA beside GaLore and APOLLO.

Every run of a set is one ``relora train`` with the same preset, data, token
budget, schedule and seed, differing only in its method or one ablation
switch. The ``baselines`` set puts both ReLoRA rows that later papers
disagree on (with the warm start, as the paper prescribes, and without it, as
GaLore's Table 2 measured it) next to full-rank training, LoRA and the
published GaLore and APOLLO optimizers.

The procedure a reviewer would accept (issue 17): each method's peak LR is
tuned on a grid (one run per grid LR at the first seed, the LR with the
lowest final validation loss chosen, flagged when it sits at the grid's
edge), then the chosen LR is repeated over more seeds, and the tables report
the *test* split's perplexity as mean and sample std over the seeds, with
Welch's t-test against full-rank (and ReLoRA against LoRA with warm start).
A seed fixes model init and data order, so every method sees the same tokens
in the same order per seed, and every run is evaluated on the same fixed
windows. Runs live in ``RUNS/NAME-lrLR-seedSEED/``; a finished run whose
config matches is reused and an unfinished one is resumed, so an interrupted
comparison continues where it stopped. Results: markdown tables, a JSON file,
the loss figure and the spectra figures under ``OUT/``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relora.analysis.plots import plot_curves
from relora.analysis.report import analyze_runs, write_analysis
from relora.analysis.spectra import DEFAULT_THRESHOLD
from relora.analysis.stats import SIGNIFICANCE_LEVEL, mean_std, welch_t_test
from relora.data import load_prepared
from relora.errors import ConfigError
from relora.fileio import write_text_atomic
from relora.run.config import (
    ADAPTER_METHODS,
    FIELD_NAMES,
    PROJECTION_METHODS,
    TrainConfig,
    incompatible_changes,
)
from relora.run.records import read_config, read_curves, read_summary
from relora.run.resolve import resolve_config

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


# Gradient clipping as each method's authors published it: GaLore's and APOLLO's training scripts do not clip
# (issue 17); ReLoRA's clips at 1.0, the config's default.
PUBLISHED_GRAD_CLIP = {"galore": 0.0, "apollo": 0.0, "apollo-mini": 0.0}
CLIP_RULES = ("published", "same")


@dataclass(frozen=True)
class Procedure:
    """How each method is tuned and repeated: the LR grid (None: the config's LR), seeds, clipping rule."""

    lr_grid: tuple[float, ...] | None = None
    seeds: int = 1
    methods: tuple[str, ...] | None = None  # run only the rows of these names (None: every row of the sets)
    clip_rule: str = "published"  # "same": every method clips at the config's grad_clip

    def validate(self) -> None:
        if self.lr_grid is not None and (not self.lr_grid or not all(lr > 0 for lr in self.lr_grid)):
            raise ConfigError(f"--lr-grid must list positive learning rates, got {list(self.lr_grid)}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"--seeds must be a positive integer, got {self.seeds!r}")
        if self.clip_rule not in CLIP_RULES:
            raise ConfigError(f"--clip-rule must be one of {', '.join(CLIP_RULES)}, got {self.clip_rule!r}")


def lr_field(method: str) -> str:
    """The config field ``--lr`` sets for a method: the peak LR of its main phase (as ``relora train --lr``).

    Adapter methods: ``relora_lr``, the LR after the warm start (the warm start keeps ``lr``, full-rank
    training's); GaLore/APOLLO: ``proj_lr``; full-rank and control: ``lr``.
    """
    if method in ADAPTER_METHODS:
        return "relora_lr"
    return "proj_lr" if method in PROJECTION_METHODS else "lr"


def run_name(spec: RunSpec, lr: float, seed: int) -> str:
    return f"{spec.name}-lr{lr:g}-seed{seed}"


def resolve_run(spec: RunSpec, runs_dir: Path, *, preset: str | None, config_file: str | None,
                overrides: dict[str, Any], lr: float | None = None, seed_index: int = 0,
                clip_rule: str = "published") -> TrainConfig:
    """The config of one run: the set's settings, this spec's method, a grid LR and the k-th seed after --seed."""
    values = {**overrides, **spec.settings}
    if values.get("method") not in ADAPTER_METHODS:  # the study-only reference defects are adapters' defects:
        values.pop("reference_defects", None)  # full-rank runs are the same run without them, and reused
    if clip_rule == "published" and spec.settings["method"] in PUBLISHED_GRAD_CLIP:
        values["grad_clip"] = PUBLISHED_GRAD_CLIP[spec.settings["method"]]
    base = resolve_config(preset=preset, config_file=config_file, overrides=values)
    field = lr_field(base.method)
    lr = getattr(base, field) if lr is None else lr
    seed = base.seed + seed_index
    values.update({field: lr, "seed": seed, "out": str(runs_dir / run_name(spec, lr, seed))})
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
    from relora.errors import DivergedError
    from relora.fileio import write_json_atomic
    from relora.train import train

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


def _finished_summary(run: Path) -> dict[str, Any] | None:
    """A finished run's summary; None for a run that diverged (a result of its own)."""
    if read_summary(run) is None and (run / DIVERGED).is_file():
        return None
    return _row_values(run)


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


def choose_lr(val_losses: dict[float, float | None]) -> tuple[float, bool]:
    """The grid LR with the lowest final val loss (a diverged run's NaN or missing loss counts as infinite),
    and whether it is the grid's smallest or largest value (then the grid should be widened)."""
    def key(lr: float) -> float:
        loss = val_losses[lr]
        return math.inf if loss is None or math.isnan(loss) else loss

    chosen = min(sorted(val_losses), key=key)
    at_edge = len(val_losses) > 1 and chosen in (min(val_losses), max(val_losses))
    return chosen, at_edge


def method_result(spec: RunSpec, grid: list[TrainConfig], seeds: list[TrainConfig]) -> dict[str, Any]:
    """results.json's entry of one method: its runs, the chosen LR, and test ppl over the chosen LR's seeds."""
    field = lr_field(grid[0].method)
    runs = []
    for config in [*grid, *seeds]:
        s = _finished_summary(Path(config.out))
        runs.append({"lr": getattr(config, field), "seed": config.seed, "diverged": s is None,
                     "val_loss": s and s.get("val_loss"), "test_loss": s and s.get("test_loss"),
                     "test_ppl": s and s.get("test_ppl"), "run_dir": config.out})
    chosen, at_edge = choose_lr({r["lr"]: r["val_loss"] for r in runs[:len(grid)]})
    at_chosen = [r for r in runs if r["lr"] == chosen]
    finished = [r for r in at_chosen if not r["diverged"]]
    if any(r["test_ppl"] is None for r in finished):
        raise ConfigError(f"{spec.name}: a run has no test ppl (its data has no test split): prepare the corpus "
                          "again with relora prepare into a new --out and pass it as --data")
    ppls = [r["test_ppl"] for r in finished]
    mean, std = mean_std(ppls) if ppls else (None, None)
    return {"runs": runs, "lr_field": field, "grid": [getattr(c, field) for c in grid], "chosen_lr": chosen,
            "chosen_lr_at_edge": at_edge, "test_ppl_mean": mean, "test_ppl_std": std, "n_seeds": len(ppls),
            "diverged": not ppls, "chosen_run": (finished or at_chosen)[0]["run_dir"], "test_ppls": ppls}


SIGNIFICANCE_PAIRS = {"relora": ("full", "lora-ws")}  # besides every method against full-rank


def significance(name: str, methods: dict[str, dict]) -> dict[str, float | None]:
    """Welch's p of this method's seeds' test ppl against full-rank's (and relora's against lora-ws's)."""
    out: dict[str, float | None] = {}
    for other in SIGNIFICANCE_PAIRS.get(name, ("full",)):
        if other != name and other in methods:
            test = welch_t_test(methods[name]["test_ppls"], methods[other]["test_ppls"])
            out[other] = None if test is None else test[2]
    return out


def _fmt_significance(pvalues: dict[str, float | None]) -> str:
    cells = []
    for other, p in pvalues.items():
        verdict = "n/a (1 seed)" if p is None else f"{'yes' if p < SIGNIFICANCE_LEVEL else 'no'} (p={p:.3f})"
        cells.append(f"vs {other}: {verdict}")
    return "; ".join(cells) or "-"


def _fmt_ppl(m: dict) -> str:
    std = f" ± {m['test_ppl_std']:.2f}" if m["test_ppl_std"] is not None else ""
    return f"{m['test_ppl_mean']:.2f}{std} (n={m['n_seeds']})"


def _fmt_lr(m: dict) -> str:
    return f"{m['chosen_lr']:g}" + (" (edge)" if m["chosen_lr_at_edge"] else "")


def _rank_of(config: TrainConfig, run: Path) -> str:
    """The rank that limits each method: LoRA's r, GaLore's/APOLLO's projection rank; '-' at full rank."""
    if config.method in ADAPTER_METHODS:
        return str(config.rank)
    if config.method in PROJECTION_METHODS:
        if config.proj_rank is not None or config.method == "apollo-mini":
            return f"{config.proj_rank or 1} (projection)"
        from relora.baselines import default_rank

        hidden = json.loads((run / "final" / "config.json").read_text())["hidden_size"]
        return f"{default_rank(hidden)} (projection)"
    return "-"


def fairness_header(procedure: Procedure, configs: list[TrainConfig]) -> str:
    """What every row shares and how the numbers were produced, written above each table."""
    c = configs[0]
    grid = "each method's configured LR" if procedure.lr_grid is None else \
        "grid " + ", ".join(f"{lr:g}" for lr in procedure.lr_grid)
    clip = ("as published: GaLore/APOLLO unclipped, the others at the configured norm" if procedure.clip_rule
            == "published" else f"the same for every method ({c.grad_clip:g}; 0 = none)")
    return "\n".join([
        f"Fairness: every run trains {c.steps} steps of {c.batch_tokens} tokens; seed k fixes model init and data "
        f"order for every method (seeds {c.seed}..{c.seed + procedure.seeds - 1}); val and test are evaluated on "
        f"the same {max(1, c.eval_tokens // c.seq_len)} windows of {c.seq_len} tokens, spread evenly over each split.",
        f"LR: {grid} for the peak LR of each method's main phase (relora_lr after the warm start, proj_lr for "
        "GaLore/APOLLO, lr for full-rank); the lowest final val loss at the first seed chooses; (edge) = chosen "
        "at the grid's edge, widen the grid.",
        f"Gradient clipping: {clip}.",
        f"test ppl: mean ± sample std over the seeds at the chosen LR. Significance: Welch's t-test on the seeds' "
        f"test ppl, two-sided, 'yes' when p < {SIGNIFICANCE_LEVEL}; n/a below 2 seeds.",
    ]) + "\n\n"


def comparison_table(specs: list[RunSpec], methods: dict[str, dict], spectra_rank: dict[str, float]
                     ) -> tuple[str, list[dict]]:
    """Markdown table of test ppl over seeds, ratio to full-rank, significance, and the chosen run's measurements.

    tokens/s is the training throughput the run measured (evaluation and
    checkpoints excluded); wall time is the whole run; the per-run columns are
    those of the chosen LR's first seed.
    """
    rows = []
    full = methods.get("full")
    lines = [
        "| method | rank | grad clip | chosen LR | test ppl | ppl / full | differs (Welch p < 0.05) | val ppl "
        "| trainable params | total params | optimizer state MB | mean rank of dW | restarts | tokens/s | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in specs:
        m = methods[spec.name]
        run = Path(m["chosen_run"])
        s, config = _row_values(run), TrainConfig(**read_config(run))
        ratio = m["test_ppl_mean"] / full["test_ppl_mean"] if full else math.nan
        rank = spectra_rank.get(spec.name, math.nan)
        speed = s.get("tokens_per_s") or s["tokens"] / s["wall_s"]
        pvalues = significance(spec.name, methods)
        rows.append({"name": spec.name, **s, "test_ppl_mean": m["test_ppl_mean"], "test_ppl_std": m["test_ppl_std"],
                     "chosen_lr": m["chosen_lr"], "chosen_lr_at_edge": m["chosen_lr_at_edge"], "p_values": pvalues,
                     "ppl_over_full": ratio, "mean_rank": rank})
        lines.append(
            f"| {spec.name} | {_rank_of(config, run)} | {config.grad_clip:g} | {_fmt_lr(m)} | {_fmt_ppl(m)} | "
            f"{ratio:.3f} | {_fmt_significance(pvalues)} | {s['val_ppl']:.2f} | {_fmt_params(s['trainable_params'])} "
            f"| {_fmt_params(s['total_params'])} | {_fmt_state(s)} | {rank:.1f} | {s['restarts']} | "
            f"{speed:,.0f} | {s['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n", rows


def ablation_table(specs: list[RunSpec], methods: dict[str, dict]) -> tuple[str, list[dict]]:
    """Table 6's layout: the paper's row, one column per ReLoRA component as the run had it, then the chosen LR
    and test ppl over seeds.

    The components are read from the chosen run's saved config (``ablation_switches``): a label says what ran.
    A method whose every grid run diverged is a ``diverged`` row (the paper's Table 6 has one).
    """
    mark = {True: "yes", False: "no"}
    lines = ["| run | Table 6 row | restarts | optimizer reset | jagged schedule | warm start | chosen LR | test ppl "
             "| val ppl |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for spec in specs:
        m = methods[spec.name]
        run = Path(m["chosen_run"])
        saved = {k: v for k, v in read_config(run).items() if k in FIELD_NAMES}
        on = ablation_switches(TrainConfig(**saved))
        cells = [mark[on[k]] if on else "full-rank" for k in ABLATION_SWITCHES]
        summary = None if m["diverged"] else _row_values(run)
        rows.append({"name": spec.name, "paper_row": spec.paper, **on, "diverged": m["diverged"],
                     "val_ppl": summary and summary["val_ppl"], "test_ppl_mean": m["test_ppl_mean"],
                     "test_ppl_std": m["test_ppl_std"], "chosen_lr": m["chosen_lr"]})
        values = "diverged | diverged" if m["diverged"] else f"{_fmt_ppl(m)} | {summary['val_ppl']:.2f}"
        lines.append(f"| {spec.name} | {spec.paper or ''} | {' | '.join(cells)} | {_fmt_lr(m)} | {values} |")
    return "\n".join(lines) + "\n", rows


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

    First every method at every grid LR at the first seed; then, once each
    method's LR is chosen, the remaining seeds at that LR.
    """
    procedure = procedure or Procedure()
    procedure.validate()
    for name in sets:
        if name not in SETS:
            raise ConfigError(f"unknown set {name!r}; choose from: {', '.join(SETS)}")
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir else out / "runs"
    overrides = dict(overrides or {})
    members = {name: [s for s in SETS[name] if procedure.methods is None or s.name in procedure.methods]
               for name in sets}
    if procedure.methods is not None:
        known = {s.name for name in sets for s in SETS[name]}
        unknown = sorted(set(procedure.methods) - known)
        if unknown:
            raise ConfigError(f"--methods {', '.join(unknown)} not in the {'/'.join(sets)} set; choose from: "
                              f"{', '.join(sorted(known))}")
    specs: dict[str, RunSpec] = {}
    for name in sets:
        for spec in members[name]:
            specs.setdefault(spec.name, spec)

    def resolve(spec: RunSpec, lr: float | None, k: int) -> TrainConfig:
        return resolve_run(spec, runs_dir, preset=preset, config_file=config_file, overrides=overrides, lr=lr,
                           seed_index=k, clip_rule=procedure.clip_rule)

    lrs = list(procedure.lr_grid) if procedure.lr_grid is not None else [None]
    grid = {name: [resolve(spec, lr, 0) for lr in lrs] for name, spec in specs.items()}
    first = [c for configs in grid.values() for c in configs]
    if first[0].data is not None:  # fail on missing, damaged or test-less data before hours of training
        load_prepared(first[0].data).test_split()
    for config in first:  # fail on a mismatching run directory before hours of training
        run_state(config)
    start = time.perf_counter()
    trained = run_set(first, progress=progress)
    seeds: dict[str, list[TrainConfig]] = {}
    for name, spec in specs.items():
        field = lr_field(grid[name][0].method)
        summaries = {getattr(c, field): _finished_summary(Path(c.out)) for c in grid[name]}
        chosen, _ = choose_lr({lr: s and s.get("val_loss") for lr, s in summaries.items()})
        # more seeds of an LR at which the method diverged would only diverge again: its row says so
        seeds[name] = [] if summaries[chosen] is None else [resolve(spec, chosen, k) for k in range(1, procedure.seeds)]
    trained.update(run_set([c for configs in seeds.values() for c in configs], progress=progress))
    elapsed = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    methods = {name: method_result(spec, grid[name], seeds[name]) for name, spec in specs.items()}
    header = fairness_header(procedure, first)
    results: dict[str, Any] = {
        "preset": first[0].preset, "runs_dir": str(runs_dir), "trained_s": trained, "elapsed_s": elapsed,
        "procedure": {"lr_grid": procedure.lr_grid, "seeds": procedure.seeds, "clip_rule": procedure.clip_rule,
                      "significance": f"Welch's t-test on test ppl, two-sided, p < {SIGNIFICANCE_LEVEL}"},
        "methods": methods, "sets": {},
    }
    for name in sets:
        if not members[name]:
            continue
        chosen_runs = [Path(methods[s.name]["chosen_run"]) for s in members[name]]
        curves = [read_curves(run, label=s.name) for run, s in zip(chosen_runs, members[name]) if _has_curve(run)]
        figures = {"loss": plot_curves(curves, out / f"{name}-loss.png", title=f"{first[0].preset}: {name} set")}
        if name in TABLE_SETS:
            adapter_runs = [(s, r) for s, r in zip(members[name], chosen_runs) if s.name != "control"]  # another shape
            spectra = analyze_runs([r for _, r in adapter_runs], labels=[s.name for s, _ in adapter_runs],
                                   threshold=threshold)
            figures.update(write_analysis(spectra, out, threshold=threshold, prefix=f"{name}-"))
            ranks = {label: _mean([r for rs in sp.ranks().values() for r in rs]) for label, sp in spectra.items()}
            table, rows = comparison_table(members[name], methods, ranks)
        else:
            table, rows = ablation_table(members[name], methods)
        table = header + table
        write_text_atomic(out / f"{name}.md", table)
        results["sets"][name] = {"table": table, "rows": rows, "figures": {k: str(v) for k, v in figures.items()}}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=str))
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
