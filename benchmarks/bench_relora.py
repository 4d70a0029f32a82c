"""Full-rank vs ReLoRA throughput and memory, side by side, against the cost model's bounds.

The same as ``relora bench`` (see ``relora bench --help``); kept here so the
benchmarks live in one folder. The issue-6 targets:

    python benchmarks/bench_relora.py --preset 350m --rank 64 --seq-len 512 --json bench-350m.json
    python benchmarks/bench_relora.py --preset 1b --methods relora --merge --no-memory --warmup 1 --repeats 1
"""

import sys

from relora.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
