"""Summarise a `relora compare` run directory while it is still running: one row per run, finished or not.

    python docs/results/progress.py docs/results/tiny/runs > docs/results/tiny/progress.md

The tables of `relora compare` appear only when every run has finished; this is the record to commit while a
long comparison is under way (the run directories themselves, with their weights, are not committed).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RUN_NAME = re.compile(r"^(?P<method>.+)-lr(?P<lr>[0-9.e+-]+)-seed(?P<seed>\d+)$")  # compare's run directories


def rows(runs: Path) -> list[str]:
    out = []
    for run in sorted(p for p in runs.iterdir() if (p / "config.yaml").is_file()):
        summary = run / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            out.append(f"| {run.name} | done | {s['val_ppl']:.2f} | {s['test_ppl']:.2f} | {s['wall_s']:.0f} |")
            continue
        if (run / "diverged.json").is_file():
            out.append(f"| {run.name} | diverged | | | |")
            continue
        metrics = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
        step = json.loads(metrics[-1])["step"] if metrics else 0
        out.append(f"| {run.name} | at step {step} | | | |")
    return out


def grid(runs: Path) -> list[str]:
    """Seed 0's final val ppl per method and LR, the lowest in bold: the LR choice as it stands."""
    val: dict[str, dict[float, float]] = {}
    for summary in runs.glob("*/summary.json"):
        name = RUN_NAME.match(summary.parent.name)
        if name and name["seed"] == "0":
            val.setdefault(name["method"], {})[float(name["lr"])] = json.loads(summary.read_text())["val_ppl"]
    lrs = sorted({lr for by_lr in val.values() for lr in by_lr})
    out = ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for method, by_lr in sorted(val.items()):
        best = min(by_lr, key=by_lr.get)
        cells = ["" if lr not in by_lr else f"**{by_lr[lr]:.2f}**" if lr == best else f"{by_lr[lr]:.2f}"
                 for lr in lrs]
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return out


def main(runs: Path) -> str:
    table = rows(runs)
    done = sum("| done |" in r for r in table)
    return "\n".join([
        f"# Progress of `relora compare` in `{runs}`", "",
        "Seed 0's final val ppl by peak LR (the lowest in bold; an empty cell has not finished):", "",
        *grid(runs), "",
        f"{done} of {len(table)} started runs finished (val/test ppl at the end of each run; wall seconds).", "",
        "| run | state | val ppl | test ppl | wall s |", "|---|---|---|---|---|", *table, ""])


if __name__ == "__main__":
    sys.stdout.write(main(Path(sys.argv[1])))
