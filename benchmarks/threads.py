"""Tokens/s of the `tiny` preset's training step at 1 and 2 intra-op threads, quiet and beside a busy process.

Issue 15: with the default two threads on a 2-core machine where another job
ran, `relora train --preset tiny` managed 358-403 tokens/s, against 1,720 with
OMP_NUM_THREADS=1. This measures why, to choose relora's default thread
policy (`--threads auto`, relora/run/threads.py).

Method: one process holds the full-rank and the ReLoRA model of the preset
(micro-batch 16 x 128 tokens, rank 8: the preset's real step); each round runs
one step of every (method, threads) pair in turn, switching with
torch.set_num_threads, so machine noise falls on all pairs alike; medians over
the rounds. Then the same again while a second process spins on one core
(`while True: pass`): the "other CPU-bound job" of the issue.

    OMP_NUM_THREADS=2 python benchmarks/threads.py --repeats 8

Prints a table of tokens/s and the ratio 2 threads / 1 thread per condition.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from relora.analysis.bench import BenchSetup, build, make_step, time_alternating


def measure(repeats: int, warmup: int, threads: tuple[int, ...]) -> dict[str, float]:
    setup = BenchSetup.from_preset("tiny", device="cpu", micro_batch=16, seq_len=128, vocab_size=8192)
    tokens = setup.micro_batch * setup.seq_len
    steps = {}
    for method in ("full", "relora"):
        model, optimizer = build(setup, method)
        step = make_step(setup, model, optimizer)
        for n in threads:
            def run(step=step, n=n) -> None:
                torch.set_num_threads(n)
                step()
            steps[f"{method}/{n}"] = run
    times = time_alternating(steps, warmup, repeats, lambda text: print(f"  {text}", file=sys.stderr))
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    threads = (1, 2)
    results = {"cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    print("quiet machine ...", file=sys.stderr)
    results["quiet"] = measure(args.repeats, args.warmup, threads)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        print("one other CPU-bound process running ...", file=sys.stderr)
        results["loaded"] = measure(args.repeats, args.warmup, threads)
    finally:
        busy.kill()
        busy.wait()
    print(f"tiny preset, 2048 tokens per step, {results['cpus']} CPUs, torch {results['torch']}")
    print("| condition | method | 1 thread tok/s | 2 threads tok/s | 2 / 1 |")
    print("|---|---|---|---|---|")
    for condition in ("quiet", "loaded"):
        for method in ("full", "relora"):
            one, two = results[condition][f"{method}/1"], results[condition][f"{method}/2"]
            print(f"| {condition} | {method} | {one:,.0f} | {two:,.0f} | {two / one:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
