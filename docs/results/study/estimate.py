"""The time estimates of docs/results/study/README.md, from relora's cost model (relora.analysis.costs); nothing is trained.

    PYTHONPATH=src python docs/results/study/estimate.py [--peak-tflops 989] [--mfu 0.4]

CPU: a run's training FLOPs (full-rank steps, the warm start included, at ``flops_per_token("full")``, adapter steps
at ``flops_per_token("relora")``) divided by the FLOP rate of the one measured run, ``relora train --preset tiny``
on this 2-core machine: 480 steps x 2048 tokens, 3,420 tokens/s of training, 323 s of wall time in all (the rest is
evaluation, start-up and saves; that share is applied to every run). An estimate for any other shape assumes the
same FLOP rate; narrow models (pico-tiny's d_model 96, head size 8) likely run below it, so read those as lower
bounds. GPU: hours = tokens x FLOPs per token / (peak x MFU), per run.
"""

from __future__ import annotations

import argparse

from relora.analysis.costs import CostModel
from relora.models import llama_config, load_preset

TINY_STEPS, TINY_BATCH, TINY_TOKENS_PER_S, TINY_WALL_S = 480, 2048, 3420, 323  # measured: relora train --preset tiny


def run_flops(preset: str, method: str, *, steps: int | None = None, rank: int | None = None,
              vocab: int | None = None, seq_len: int | None = None, batch_tokens: int | None = None,
              warm_start: bool = True) -> float:
    """Training FLOPs of one run of ``method`` (full, lora-ws, relora) at a preset, steps scaled as --steps does."""
    p = load_preset(preset)
    t = p["train"]
    seq_len, steps = seq_len or t["seq_len"], steps or t["steps"]
    batch_tokens = batch_tokens or t["batch_tokens"]
    cost = CostModel(llama_config(p["model"], vocab or t["vocab_size"], seq_len), seq_len, rank or t["rank"])
    if method == "full":
        return steps * batch_tokens * cost.flops_per_token("full")
    warm = t["warm_start_steps"] * steps // t["steps"] if warm_start else 0
    return batch_tokens * (warm * cost.flops_per_token("full") + (steps - warm) * cost.flops_per_token("relora"))


CPU_FLOPS = run_flops("tiny", "relora") / (TINY_STEPS * TINY_BATCH / TINY_TOKENS_PER_S)  # sustained FLOP/s
WALL_FACTOR = TINY_WALL_S / (TINY_STEPS * TINY_BATCH / TINY_TOKENS_PER_S)


def cpu_minutes(preset: str, method: str, **kwargs) -> float:
    return run_flops(preset, method, **kwargs) / CPU_FLOPS * WALL_FACTOR / 60


# (table, invocation, [(preset, method, runs, run_flops kwargs)]); runs = grid points + seeds - 1 per method.
# Table "3?": instead of table 3's 4M-token rank rows, if full-rank and lora-ws are still within the noise at 4M.
GRID5, GRID2 = 5 + 3 - 1, 2 + 3 - 1  # the 5-point (2-point) LR grid, then seeds 2 and 3 at the chosen LR
CPU_PLAN = [
    ("1", "shipped (0 if issue 17's tiny runs exist)", [("tiny", "full", GRID5, {}), ("tiny", "relora", GRID5, {})]),
    ("1", "--restart-adam-step reset", [("tiny", "relora", 3, {})]),
    ("1", "beta2 0.95", [("tiny", "relora", 3, {})]),
    ("1", "restart warm-up 5, 25, 90", [("tiny", "relora", 9, {})]),
    ("2", "correct: full, relora, relora-no-warm-start", [("pico-tiny", "full", GRID5, {}),
                                                         ("pico-tiny", "relora", GRID5, {}),
                                                         ("pico-tiny", "relora", GRID5, {"warm_start": False})]),
    ("2", "3 defects alone + all three", [("pico-tiny", "relora", 12, {"warm_start": False})]),
    ("3", "budget 1M tokens: full, lora-ws r4", [("pico-tiny", "full", GRID5, {}),
                                                  ("pico-tiny", "lora-ws", GRID5, {"rank": 4})]),
    ("3", "budget 4M tokens: full, lora-ws r4", [("pico-tiny", "full", GRID2, {"steps": 2000}),
                                                  ("pico-tiny", "lora-ws", GRID2, {"steps": 2000, "rank": 4})]),
    ("3?", "budget 16M tokens: full, lora-ws r4", [("pico-tiny", "full", GRID2, {"steps": 8000}),
                                                   ("pico-tiny", "lora-ws", GRID2, {"steps": 8000, "rank": 4})]),
]
for steps, tokens, table in ((2000, "4M", "3"), (8000, "16M", "3?")):
    CPU_PLAN.append((table, f"ranks at {tokens} tokens: relora r4; lora-ws, relora r16, r64", [
        ("pico-tiny", "relora", GRID2, {"steps": steps, "rank": 4}),
        *[("pico-tiny", m, GRID2, {"steps": steps, "rank": r}) for r in (16, 64) for m in ("lora-ws", "relora")],
    ]))

# GPU recipe: (label, preset, data vocabulary, seq_len or None, steps or None, batch tokens or None, arms)
PICO = dict(seq_len=2048, steps=20000, batch_tokens=1024 * 2048)  # docs/results/study/pico-gpu.yaml
PICO_ARMS = [("full", {}), ("relora", {}), ("relora-no-warm-start", {"warm_start": False}),
             ("each defect alone (3 runs)", {"warm_start": False, "runs": 3}),
             ("all three defects", {"warm_start": False})]
PAPER_ARMS = [("full", {}), ("lora-ws", {}), ("relora", {})]
GPU_PLAN = [
    ("paper 60M (C4, T5 tokenizer)", "60m", 32100, {}, PAPER_ARMS),
    ("paper 130M (C4, T5 tokenizer)", "130m", 32100, {}, PAPER_ARMS),
    ("relora-pico tiny (OLMo tokenizer)", "pico-tiny", 50280, PICO, PICO_ARMS),
    ("relora-pico small (OLMo tokenizer)", "pico-small", 50280, PICO, PICO_ARMS),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="sustained fraction of the peak")
    args = parser.parse_args()

    print(f"CPU: {CPU_FLOPS / 1e9:.1f} GFLOP/s sustained (tiny relora run), wall = {WALL_FACTOR:.3f} x training")
    totals: dict[str, float] = {}
    for table, label, parts in CPU_PLAN:
        minutes = sum(n * cpu_minutes(preset, method, **kw) for preset, method, n, kw in parts)
        runs = sum(n for _, _, n, _ in parts)
        per_run = ", ".join(f"{method}{' r' + str(kw['rank']) if 'rank' in kw else ''} "
                            f"{cpu_minutes(preset, method, **kw):.1f}" for preset, method, _, kw in parts)
        print(f"table {table}: {label}: {runs} runs, {minutes / 60:.2f} h (min per run: {per_run})")
        totals[table] = totals.get(table, 0.0) + minutes
    print("CPU hours per table (every line above):", {t: round(m / 60, 2) for t, m in totals.items()})

    rate = args.peak_tflops * 1e12 * args.mfu
    print(f"\nGPU: {args.peak_tflops:g} TFLOP/s peak x MFU {args.mfu:g} = {rate / 1e12:.0f} TFLOP/s sustained")
    for label, preset, vocab, shape, arms in GPU_PLAN:
        t = load_preset(preset)["train"]
        steps, batch = shape.get("steps", t["steps"]), shape.get("batch_tokens", t["batch_tokens"])
        seq = shape.get("seq_len", t["seq_len"])
        cost = CostModel(llama_config(load_preset(preset)["model"], vocab, seq), seq, t["rank"])
        print(f"{label}: {steps * batch / 1e9:.2f}B tokens, training FLOPs per token full "
              f"{cost.flops_per_token('full') / 1e6:.0f}M, relora {cost.flops_per_token('relora') / 1e6:.0f}M")
        total = 0.0
        for arm, kw in arms:
            kw = dict(kw)
            n = kw.pop("runs", 1)
            method = "full" if arm == "full" else "relora"
            hours = n * run_flops(preset, method, steps=steps, vocab=vocab, seq_len=seq, batch_tokens=batch,
                                  **kw) / rate / 3600
            total += hours
            print(f"  {arm}: {hours:.2f} GPU h")
        print(f"  all arms, one seed: {total:.1f} GPU h")


if __name__ == "__main__":
    main()
