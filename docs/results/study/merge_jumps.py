"""The val ppl jump at each merge, per study row (``--eval-merges`` runs), as a markdown table.

    PYTHONPATH=src python docs/results/study/merge_jumps.py LABEL=OUT:METHOD [LABEL=OUT:METHOD ...]

Rows are named as in table.py. For each, the seed runs at the method's chosen LR are read: every merge record of
``metrics.jsonl`` holds ``merge_loss_before`` and ``merge_loss_after``, the val loss on one fixed set of windows
right before and right after that merge. The jump is exp(after) - exp(before); a correct merge's is float rounding.
Printed per row: the number of merges per run, the mean and the largest jump over all merges of all seeds, and the
mean relative jump exp(after - before) - 1. A row whose runs have no merge records (trained without
``--eval-merges``, or full-rank) says so.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


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


def seed_runs(out: str, method: str) -> list[str]:
    results = json.loads((Path(out) / "results.json").read_text())
    if method not in results["methods"]:
        raise SystemExit(f"merge_jumps.py: error: {out}/results.json has no method {method!r}: "
                         f"{', '.join(results['methods'])}")
    m = results["methods"][method]
    return [r["run_dir"] for r in m["runs"] if r["lr"] == m["chosen_lr"] and not r["diverged"]]


def main(args: list[str]) -> None:
    if not args:
        raise SystemExit(__doc__)
    print("| run | seeds | merges per run | mean jump (ppl) | largest jump (ppl) | mean relative jump |")
    print("|---|---|---|---|---|---|")
    for arg in args:
        label, _, where = arg.partition("=")
        out, _, method = where.rpartition(":")
        if not (label and out and method):
            raise SystemExit(f"merge_jumps.py: error: {arg!r} is not LABEL=OUT:METHOD")
        per_run = [merge_ppl_jumps(run) for run in seed_runs(out, method)]
        jumps = [j for run in per_run for j in run.values()]
        if not jumps:
            print(f"| {label} | {len(per_run)} | no merge records | | | |")
            continue
        merges = sorted({len(run) for run in per_run})
        absolute = [a for a, _ in jumps]
        relative = sum(r for _, r in jumps) / len(jumps)
        print(f"| {label} | {len(per_run)} | {'/'.join(map(str, merges))} | {sum(absolute) / len(absolute):+.3g} | "
              f"{max(absolute, key=abs):+.3g} | {relative:+.2%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
