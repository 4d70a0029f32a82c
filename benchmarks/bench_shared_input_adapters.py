"""Would one matrix product for the A matrices of q/k/v (which share an input) beat three?

Times, side by side in alternation, the A-side work of ReLoRA's q/k/v adapters
for one block and one micro-batch: the forward products A x, the input
gradient sum_i g_i A_i and the weight gradients g_i^T x, computed per adapter
(as peft does) and as one concatenated product. Prints both medians, their
ratio, and the frozen q/k/v products for scale. docs/performance.md reports
the result. Usage: OMP_NUM_THREADS=1 python benchmarks/bench_shared_input_adapters.py [T h r]
"""

import statistics
import sys
import time

import torch


def main(tokens: int = 512, hidden: int = 1024, rank: int = 64, repeats: int = 300) -> None:
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden)
    a = [torch.randn(rank, hidden) for _ in range(3)]
    g = [torch.randn(tokens, rank) for _ in range(3)]

    def separate() -> None:
        [x @ ai.T for ai in a]
        g[0] @ a[0] + g[1] @ a[1] + g[2] @ a[2]
        [gi.T @ x for gi in g]

    def fused() -> None:
        a_all = torch.cat(a)
        (x @ a_all.T).split(rank, 1)
        g_all = torch.cat(g, 1)
        g_all @ a_all
        (g_all.T @ x).split(rank, 0)

    times = {"separate": [], "fused": []}
    for i in range(repeats):
        order = (("separate", separate), ("fused", fused)) if i % 2 else (("fused", fused), ("separate", separate))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v[20:]) for k, v in times.items()}
    w = torch.randn(3 * hidden, hidden)
    dense = []
    for _ in range(50):
        start = time.perf_counter()
        x @ w.T
        torch.randn(tokens, 3 * hidden) @ w
        dense.append(time.perf_counter() - start)
    print(f"T={tokens} h={hidden} r={rank}: separate {median['separate'] * 1e3:.2f} ms, fused "
          f"{median['fused'] * 1e3:.2f} ms, fused/separate {median['fused'] / median['separate']:.3f}; frozen q/k/v "
          f"forward + input gradient {statistics.median(dense) * 1e3:.1f} ms")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:4]))
