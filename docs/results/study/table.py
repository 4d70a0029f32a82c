"""One study table from several ``relora compare`` outputs (each variant of a setting is its own invocation).

    PYTHONPATH=src python docs/results/study/table.py [--merge-jumps] LABEL=OUT[@SEEDS]:METHOD [LABEL=OUT:METHOD ...]

Each argument names a row: the ``results.json`` under OUT and the method row in it. OUT may join several outputs
with ``+`` (``OUT1+OUT2``): the row is then the seed runs of all of them at one chosen LR, e.g. seeds 0-1 of one
invocation and seed 2 of another that was run later with ``seed: 2`` in its ``--config`` (a run's seed is the
config's ``seed`` plus its index, so that run is the one ``--seeds 3`` would have trained). An output may keep
only some of its seeds with ``@SEEDS`` (``OUT@0`` or ``OUT@0,1``), e.g. when one seed was run again on another
corpus and the row must pair each seed with runs on its own corpus. The first row is the
reference: every other row gets Welch's two-sided p of its seeds' test perplexities against the reference's
(the rule, * when p < 0.05) and the paired t-test's p over the seeds both rows ran, as ``relora compare``
does within one invocation (relora.analysis.stats). The val ppl column is the same seeds' final validation
perplexity (exp of ``val_loss``), reported beside the test ppl that the p-values judge. Prints a markdown table.

With --merge-jumps it prints instead the val ppl jump at each merge of the same seed runs (``--eval-merges`` runs):
every merge record of ``metrics.jsonl`` holds ``merge_loss_before`` and ``merge_loss_after``, the val loss on one
fixed set of windows right before and right after that merge, and the jump is exp(after) - exp(before) (a correct
merge's is float rounding). Per row: merges per run, the mean and the largest jump over all merges of all seeds,
and the mean relative jump exp(after - before) - 1; a row without merge records (full-rank, or trained without
``--eval-merges``) says so.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from relora.analysis.compare_tables import seed_runs, test_ppl_by_seed
from relora.analysis.stats import SIGNIFICANCE_LEVEL, format_p, mean_std, paired_t_test, welch_t_test


def row(arg: str) -> tuple[str, dict]:
    label, _, where = arg.partition("=")
    outs, _, method = where.rpartition(":")
    if not (label and outs and method):
        raise SystemExit(f"table.py: error: {arg!r} is not LABEL=OUT:METHOD")
    parts, selected = [], False
    for out in outs.split("+"):
        out, seeds = split_seeds(out)
        if not (Path(out) / "results.json").is_file():
            raise SystemExit(f"table.py: error: {out}/results.json not found: OUT is a `relora compare --out` "
                             "directory that has finished")
        results = json.loads((Path(out) / "results.json").read_text())
        if method not in results["methods"]:
            raise SystemExit(f"table.py: error: {out}/results.json has no method {method!r}: "
                             f"{', '.join(results['methods'])}")
        m = results["methods"][method]
        if seeds is not None:
            selected = True
            kept = [r for r in seed_runs(m) if r["seed"] in seeds]
            if {r["seed"] for r in kept} != seeds:
                raise SystemExit(f"table.py: error: {out}: no finished run at the chosen LR for seed(s) "
                                 f"{sorted(seeds - {r['seed'] for r in kept})}; it has "
                                 f"{sorted(r['seed'] for r in seed_runs(m))}")
            m = {**m, "runs": kept}
        parts.append(m)
    return label, parts[0] if len(parts) == 1 and not selected else joined(label, parts)


def split_seeds(out: str) -> tuple[str, set[int] | None]:
    """``OUT@0,1`` -> (OUT, {0, 1}); ``OUT`` -> (OUT, None)."""
    path, at, seeds = out.rpartition("@")
    if not at:
        return out, None
    try:
        return path, {int(s) for s in seeds.split(",")}
    except ValueError:
        raise SystemExit(f"table.py: error: {out!r}: after @ comes a comma-separated list of seeds, "
                         "e.g. @0,1") from None


def joined(label: str, parts: list[dict]) -> dict:
    """One row from several outputs' entries of a method: their seed runs at the one LR they all chose."""
    chosen = {m["chosen_lr"] for m in parts}
    if len(chosen) != 1:
        raise SystemExit(f"table.py: error: {label}: the joined outputs chose different LRs "
                         f"({', '.join(f'{lr:g}' for lr in sorted(chosen))}); join only runs at one LR")
    runs = [r for m in parts for r in seed_runs(m)]
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"table.py: error: {label}: the joined outputs share a seed ({sorted(seeds)}); "
                         "join outputs of different seeds")
    return {"runs": runs, "chosen_lr": chosen.pop(), "chosen_lr_at_edge": any(m.get("chosen_lr_at_edge")
                                                                            for m in parts),
            "n_seeds": len(runs), "test_ppls": [r["test_ppl"] for r in runs]}


def val_ppls(m: dict) -> list[float]:
    return [math.exp(r["val_loss"]) for r in seed_runs(m)]


def merge_ppl_jumps(run: str | Path) -> dict[int, tuple[float, float]]:
    """{merge step: (val ppl after - val ppl before, relative jump)} of one run."""
    jumps = {}
    for line in Path(run, "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "merge_loss_before" in r:
            before, after = r["merge_loss_before"], r["merge_loss_after"]
            jumps[r["step"]] = (math.exp(after) - math.exp(before), math.expm1(after - before))
    return jumps


def print_merge_jumps(rows: list[tuple[str, dict]]) -> None:
    print("| run | seeds | merges per run | mean jump (ppl) | largest jump (ppl) | mean relative jump |")
    print("|---|---|---|---|---|---|")
    for label, m in rows:
        per_run = [merge_ppl_jumps(r["run_dir"]) for r in seed_runs(m)]
        jumps = [j for run in per_run for j in run.values()]
        if not jumps:
            print(f"| {label} | {len(per_run)} | no merge records | | | |")
            continue
        absolute = [a for a, _ in jumps]
        merges = "/".join(str(n) for n in sorted({len(run) for run in per_run}))
        print(f"| {label} | {len(per_run)} | {merges} | {sum(absolute) / len(absolute):+.3g} | "
              f"{max(absolute, key=abs):+.3g} | {sum(r for _, r in jumps) / len(jumps):+.2%} |")


def mean_pm_std(values: list[float]) -> str:
    if not values:
        return "diverged"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def main(args: list[str]) -> None:
    jumps = "--merge-jumps" in args
    args = [a for a in args if a != "--merge-jumps"]
    if not args:
        raise SystemExit(__doc__)
    rows = [row(a) for a in args]
    if jumps:
        print_merge_jumps(rows)
        return
    reference = rows[0][1]["test_ppls"]
    print(f"| run | chosen LR | seeds | val ppl | test ppl (mean ± std) | Welch p vs {rows[0][0]} | paired p |")
    print("|---|---|---|---|---|---|---|")
    for label, m in rows:
        test = welch_t_test(m["test_ppls"], reference) if m is not rows[0][1] else None
        p = "" if test is None else f"{format_p(test[2]).lstrip('=')}{' *' if test[2] < SIGNIFICANCE_LEVEL else ''}"
        paired = paired_t_test(test_ppl_by_seed(m), test_ppl_by_seed(rows[0][1])) if m is not rows[0][1] else None
        p += " | " + ("" if paired is None else format_p(paired[2]).lstrip("="))
        edge = " (edge)" if m.get("chosen_lr_at_edge") else ""
        print(f"| {label} | {m['chosen_lr']:g}{edge} | {m['n_seeds']} | {mean_pm_std(val_ppls(m))} | "
              f"{mean_pm_std(m['test_ppls'])} | {p} |")


if __name__ == "__main__":
    main(sys.argv[1:])
