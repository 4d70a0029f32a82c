"""Summarise a `relora compare` run directory while it is still running: one row per run, finished or not.

    python docs/results/progress.py docs/results/tiny/runs > docs/results/tiny/progress.md

The tables of `relora compare` appear only when every run has finished; this is the record to commit while a
long comparison is under way (the run directories themselves, with their weights, are not committed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


def main(runs: Path) -> str:
    table = rows(runs)
    done = sum("| done |" in r for r in table)
    return "\n".join([
        f"# Progress of `relora compare` in `{runs}`", "",
        f"{done} of {len(table)} started runs finished (val/test ppl at the end of each run; wall seconds).", "",
        "| run | state | val ppl | test ppl | wall s |", "|---|---|---|---|---|", *table, ""])


if __name__ == "__main__":
    sys.stdout.write(main(Path(sys.argv[1])))
