"""How ``relora compare`` tunes and repeats each method (issue 17), and trains or reuses its runs.

Each method's peak LR is tuned on a grid (one run per grid LR at the first
seed, the LR with the lowest final validation loss chosen, flagged when it
sits at the grid's edge), then the chosen LR is repeated over more seeds; a
method's result is the *test* split's perplexity as mean and sample std over
those seeds. A finished run whose config matches is reused and an unfinished
one is resumed, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relora.analysis.compare_sets import CLIP_RULES, RunSpec, lr_field
from relora.analysis.stats import mean_std
from relora.errors import ConfigError
from relora.run.config import TrainConfig, incompatible_changes
from relora.run.records import read_config, read_summary

logger = logging.getLogger(__name__)

DIVERGED = "diverged.json"  # written into a run that stopped on non-finite losses (Table 6 has such a row)
WIDEN_FACTOR = 3.0  # one widening step: about half a decade, the spacing of the grids in docs/results


@dataclass(frozen=True)
class Procedure:
    """How each method is tuned and repeated: the LR grid (None: the config's LR), seeds, clipping rule."""

    lr_grid: tuple[float, ...] | None = None
    seeds: int = 1
    methods: tuple[str, ...] | None = None  # run only the rows of these names (None: every row of the sets)
    clip_rule: str = "published"  # "same": every method clips at the config's grad_clip
    widen_edges: int = 0  # times a method's grid may grow past the edge its choice sits at (0: only flag it)

    def validate(self) -> None:
        if self.lr_grid is not None and (not self.lr_grid or not all(lr > 0 for lr in self.lr_grid)):
            raise ConfigError(f"--lr-grid must list positive learning rates, got {list(self.lr_grid)}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"--seeds must be a positive integer, got {self.seeds!r}")
        if not isinstance(self.widen_edges, int) or self.widen_edges < 0:
            raise ConfigError(f"--widen-edges must be a non-negative integer, got {self.widen_edges!r}")
        if self.clip_rule not in CLIP_RULES:
            raise ConfigError(f"--clip-rule must be one of {', '.join(CLIP_RULES)}, got {self.clip_rule!r}")


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
    from relora.train import train  # looked up at each call: tests stand in for the trainer

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
        if summary.stop_requested:  # the signal came in the run's last step: it finished, the next must not start
            raise KeyboardInterrupt
    return trained


def finished_summary(run: Path) -> dict[str, Any]:
    """A finished run's summary; a one-line error for a run that diverged or has not finished."""
    summary = read_summary(run)
    if summary is None and (run / DIVERGED).is_file():
        raise ConfigError(f"{run.name} diverged ({run / DIVERGED}); a method table needs every run to finish")
    if summary is None:
        raise ConfigError(f"{run} has not finished; run relora compare again to complete it")
    return summary


def summary_unless_diverged(run: Path) -> dict[str, Any] | None:
    """A finished run's summary; None for a run that diverged (a result of its own)."""
    if read_summary(run) is None and (run / DIVERGED).is_file():
        return None
    return finished_summary(run)


def choose_lr(val_losses: dict[float, float | None]) -> tuple[float, bool]:
    """The grid LR with the lowest final val loss (a diverged run's NaN or missing loss counts as infinite),
    and whether it is the grid's smallest or largest value (then the grid should be widened)."""
    def key(lr: float) -> float:
        loss = val_losses[lr]
        return math.inf if loss is None or math.isnan(loss) else loss

    chosen = min(sorted(val_losses), key=key)
    at_edge = len(val_losses) > 1 and chosen in (min(val_losses), max(val_losses))
    return chosen, at_edge


def widened_lr(val_losses: dict[float, float | None]) -> float | None:
    """The next grid LR past the edge the choice sits at (x3 above the largest LR, /3 below the smallest), to 3
    significant digits so that run names stay readable; None when the choice lies inside the grid."""
    chosen, at_edge = choose_lr(val_losses)
    if not at_edge:
        return None
    lr = chosen * WIDEN_FACTOR if chosen == max(val_losses) else chosen / WIDEN_FACTOR
    return float(f"{lr:.3g}")


def grid_summaries(grid: list[TrainConfig]) -> dict[float, dict[str, Any] | None]:
    """Each finished grid run's summary by its LR (None: it diverged)."""
    field = lr_field(grid[0].method)
    return {getattr(c, field): summary_unless_diverged(Path(c.out)) for c in grid}


def widen_grids(grids: dict[str, list[TrainConfig]], rounds: int, resolve: Callable[[str, float], TrainConfig],
                *, progress: bool = True) -> dict[str, float]:
    """Up to ``rounds`` times, give every method whose choice sits at its grid's edge one more first-seed run past
    that edge (``resolve(name, lr)``), trained before the next round; ``grids`` grows in place, kept sorted by LR.

    This is the widening the issue asks for ("widened until no chosen LR sits at an edge") done per method, so
    one invocation gives one table; a choice still at an edge after the last round stays flagged.
    """
    trained: dict[str, float] = {}
    for _ in range(rounds):
        new = {}
        for name, grid in grids.items():
            lr = widened_lr({lr: s and s.get("val_loss") for lr, s in grid_summaries(grid).items()})
            if lr is not None:
                logger.info("%s: the chosen LR is at the grid's edge; trying %g", name, lr)
                new[name] = resolve(name, lr)
        if not new:
            break
        trained.update(run_set(list(new.values()), progress=progress))
        for name, config in new.items():
            field = lr_field(config.method)
            grids[name] = sorted([*grids[name], config], key=lambda c, field=field: getattr(c, field))
    return trained


def seeds_at_chosen_lr(grid: list[TrainConfig], seeds: int,
                       resolve: Callable[[float, int], TrainConfig]) -> list[TrainConfig]:
    """The configs of seeds 1..``seeds``-1 at the LR the finished ``grid`` runs choose (``resolve(lr, k)``);
    none if the method diverged at that LR: more seeds would only diverge again, and its row says so."""
    summaries = grid_summaries(grid)
    chosen, _ = choose_lr({lr: s and s.get("val_loss") for lr, s in summaries.items()})
    return [] if summaries[chosen] is None else [resolve(chosen, k) for k in range(1, seeds)]


def method_result(spec: RunSpec, grid: list[TrainConfig], seeds: list[TrainConfig]) -> dict[str, Any]:
    """results.json's entry of one method: its runs, the chosen LR, and test ppl over the chosen LR's seeds."""
    field = lr_field(grid[0].method)
    runs = []
    for config in [*grid, *seeds]:
        s = summary_unless_diverged(Path(config.out))
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
