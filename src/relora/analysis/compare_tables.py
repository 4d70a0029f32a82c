"""The tables ``relora compare`` writes: the method table, the paper's Table 6 layout, and the header over both.

Test ppl is reported as mean and sample std over the seeds at the chosen LR,
with Welch's t-test against full-rank (and ReLoRA against LoRA with warm
start) as the rule, and the paired t-test over shared seeds beside it. The
per-run columns are the chosen LR's first seed's, read from its run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from relora.analysis.compare_procedure import WIDEN_FACTOR, Procedure, finished_summary
from relora.analysis.compare_sets import ABLATION_SWITCHES, RunSpec, ablation_switches
from relora.analysis.stats import SIGNIFICANCE_LEVEL, format_p, paired_t_test, welch_t_test
from relora.run.config import ADAPTER_METHODS, FIELD_NAMES, PROJECTION_METHODS, TWO_PHASE_LR_METHODS, TrainConfig
from relora.run.records import read_config

# besides every method against full-rank: relora against lora-ws, and the warm-started rows against full-rank
# with their own two-phase LR (full-ws-lr), which separates what the schedule gives from what the adapters do
SIGNIFICANCE_PAIRS = {"relora": ("full", "lora-ws", "full-ws-lr"), "lora-ws": ("full", "full-ws-lr"),
                      **{m: ("full", "full-split-lr") for m in ("galore", "apollo", "apollo-mini")}}


def seed_runs(m: dict) -> list[dict]:
    """A method's finished (not diverged) runs at its chosen LR, one per seed, as results.json lists them."""
    return [r for r in m["runs"] if r["lr"] == m["chosen_lr"] and not r["diverged"]]


def test_ppl_by_seed(m: dict) -> dict[int, float]:
    """{seed: test ppl} of a method's finished runs at its chosen LR."""
    return {r["seed"]: r["test_ppl"] for r in seed_runs(m)}


def significance(name: str, methods: dict[str, dict], against: tuple[str, ...] | None = None
                 ) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Welch's p (the rule) and the paired t-test's p (over shared seeds, reported beside it) of this method's
    seeds' test ppl against each of ``against``: by default full-rank's, and SIGNIFICANCE_PAIRS' controls."""
    welch: dict[str, float | None] = {}
    paired: dict[str, float | None] = {}
    for other in against or SIGNIFICANCE_PAIRS.get(name, ("full",)):
        if other != name and other in methods:
            test = welch_t_test(methods[name]["test_ppls"], methods[other]["test_ppls"])
            welch[other] = None if test is None else test[2]
            test = paired_t_test(test_ppl_by_seed(methods[name]), test_ppl_by_seed(methods[other]))
            paired[other] = None if test is None else test[2]
    return welch, paired


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _fmt_state(summary: dict) -> str:
    """Optimizer state at the end of the run in MB; a larger peak (ReLoRA's full-rank warm start) after it."""
    final, peak = summary.get("optimizer_state_bytes"), summary.get("peak_optimizer_state_bytes", 0)
    if final is None:  # a run from before the state was measured
        return "n/a"
    return f"{final / 1e6:.2f}" + (f" (peak {peak / 1e6:.2f})" if peak > final else "")


def _fmt_significance(welch: dict[str, float | None], paired: dict[str, float | None]) -> str:
    cells = []
    for other, p in welch.items():
        if p is None:
            cells.append(f"vs {other}: n/a (1 seed)")
            continue
        extra = "" if paired.get(other) is None else f", paired p{format_p(paired[other])}"
        cells.append(f"vs {other}: {'yes' if p < SIGNIFICANCE_LEVEL else 'no'} (p{format_p(p)}{extra})")
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


def fairness_header(procedure: Procedure, configs: list[TrainConfig],
                    grids: dict[str, list[float]] | None = None) -> str:
    """What every row shares and how the numbers were produced, written above each table; ``grids`` (each
    method's final grid) names the LRs that widening added."""
    c = configs[0]
    # the warm start's own LR (lr, not tuned), from a run that has one: a full-rank row's lr is its grid LR
    warm_lr = next((f" at lr {x.lr:g}" for x in configs if x.method in TWO_PHASE_LR_METHODS and x.relora_phase_start),
                   "")
    grid = "each method's configured LR" if procedure.lr_grid is None else \
        "grid " + ", ".join(f"{lr:g}" for lr in procedure.lr_grid)
    if procedure.widen_edges and procedure.lr_grid is not None:
        added = {name: [lr for lr in lrs if lr not in procedure.lr_grid] for name, lrs in (grids or {}).items()}
        grid += (f", widened per method up to {procedure.widen_edges} times by x{WIDEN_FACTOR:g} past the edge "
                 "its choice sat at ("
                 + ("; ".join(f"{name} +{', '.join(f'{lr:g}' for lr in lrs)}" for name, lrs in added.items() if lrs)
                    or "none needed") + ")")
    clip = ("as published: GaLore/APOLLO unclipped, the others at the configured norm" if procedure.clip_rule
            == "published" else f"the same for every method ({c.grad_clip:g}; 0 = none)")
    return "\n".join([
        f"Fairness: every run trains {c.steps} steps of {c.batch_tokens} tokens; seed k fixes model init and data "
        f"order for every method (seeds {c.seed}..{c.seed + procedure.seeds - 1}); val and test are evaluated on "
        f"the same {max(1, c.eval_tokens // c.seq_len)} windows of {c.seq_len} tokens, spread evenly over each split.",
        f"LR: {grid} for the peak LR of each method's main phase (relora_lr after the warm start{warm_lr} for the "
        "adapter methods and full-ws-lr, proj_lr for GaLore/APOLLO, lr for full-rank); the lowest final val loss "
        "at the first seed chooses; (edge) = chosen at the grid's edge, widen the grid.",
        f"Gradient clipping: {clip}.",
        f"test ppl: mean ± sample std over the seeds at the chosen LR. Significance: Welch's t-test on the seeds' "
        f"test ppl, two-sided, 'yes' when p < {SIGNIFICANCE_LEVEL}; n/a below 2 seeds. Beside it, not the rule: the "
        "paired t-test's p over the seeds both methods ran (seed k shares init and data order across methods, so "
        "it removes the noise the seeds have in common).",
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
        config = TrainConfig(**read_config(run))
        if m["diverged"]:  # every grid run diverged: a row that says so, as in the ablation table
            rows.append({"name": spec.name, "diverged": True, "chosen_lr": m["chosen_lr"], "test_ppl_mean": None,
                         "test_ppl_std": None, "p_values": {}, "paired_p_values": {}, "ppl_over_full": None,
                         "mean_rank": None})
            lines.append(f"| {spec.name} | {_rank_of(config, run)} | - | {_fmt_lr(m)} | "
                         "diverged | - | - | diverged |" + " - |" * 7)
            continue
        s = finished_summary(run)
        # None without a full-rank row to divide by (a --methods subset), as n/a in the table and null in JSON
        ratio = (m["test_ppl_mean"] / full["test_ppl_mean"]
                 if full and full["test_ppl_mean"] and m["test_ppl_mean"] is not None else None)
        rank = spectra_rank.get(spec.name)  # None where not measured (control: another shape than the reference)
        rank_cell = "n/a" if rank is None else f"{rank:.1f}"
        speed = s.get("tokens_per_s") or s["tokens"] / s["wall_s"]
        pvalues, paired = significance(spec.name, methods)
        rows.append({"name": spec.name, **s, "test_ppl_mean": m["test_ppl_mean"], "test_ppl_std": m["test_ppl_std"],
                     "chosen_lr": m["chosen_lr"], "chosen_lr_at_edge": m["chosen_lr_at_edge"], "p_values": pvalues,
                     "paired_p_values": paired, "ppl_over_full": ratio, "mean_rank": rank})
        lines.append(
            f"| {spec.name} | {_rank_of(config, run)} | {config.grad_clip:g} | {_fmt_lr(m)} | {_fmt_ppl(m)} | "
            f"{'n/a' if ratio is None else f'{ratio:.3f}'} | {_fmt_significance(pvalues, paired)} | {s['val_ppl']:.2f} | "
            f"{_fmt_params(s['trainable_params'])} | {_fmt_params(s['total_params'])} | {_fmt_state(s)} | "
            f"{rank_cell} | {s['restarts']} | {speed:,.0f} | {s['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n", rows


def ablation_table(specs: list[RunSpec], methods: dict[str, dict]) -> tuple[str, list[dict]]:
    """Table 6's layout: the paper's row, one column per ReLoRA component as the run had it, then the chosen LR,
    test ppl over seeds and whether it differs from LoRA's (the row every Table 6 row adds components to).

    The components are read from the chosen run's saved config (``ablation_switches``): a label says what ran.
    A method whose every grid run diverged is a ``diverged`` row (the paper's Table 6 has one).
    """
    mark = {True: "yes", False: "no"}
    lines = ["| run | Table 6 row | restarts | optimizer reset | jagged schedule | warm start | chosen LR | test ppl "
             "| differs from lora (Welch p < 0.05) | val ppl |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for spec in specs:
        m = methods[spec.name]
        run = Path(m["chosen_run"])
        saved = {k: v for k, v in read_config(run).items() if k in FIELD_NAMES}
        on = ablation_switches(TrainConfig(**saved))
        cells = [mark[on[k]] if on else "full-rank" for k in ABLATION_SWITCHES]
        summary = None if m["diverged"] else finished_summary(run)
        pvalues, paired = significance(spec.name, methods, against=("lora",)) if not m["diverged"] else ({}, {})
        rows.append({"name": spec.name, "paper_row": spec.paper, **on, "diverged": m["diverged"],
                     "val_ppl": summary and summary["val_ppl"], "test_ppl_mean": m["test_ppl_mean"],
                     "test_ppl_std": m["test_ppl_std"], "chosen_lr": m["chosen_lr"], "p_values": pvalues,
                     "paired_p_values": paired})
        values = ("diverged | - | diverged" if m["diverged"] else
                  f"{_fmt_ppl(m)} | {_fmt_significance(pvalues, paired)} | {summary['val_ppl']:.2f}")
        lines.append(f"| {spec.name} | {spec.paper or ''} | {' | '.join(cells)} | {_fmt_lr(m)} | {values} |")
    return "\n".join(lines) + "\n", rows
