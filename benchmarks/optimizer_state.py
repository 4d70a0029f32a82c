"""Measured optimizer-state bytes (and, optionally, step time) of every method at any preset, without training.

Builds each preset's model once per method, takes one optimizer step on random
tokens (the state's size does not depend on the data) and sums the tensors the
optimizer holds (``relora.core.optimizer_state.optimizer_state_bytes``). ReLoRA is measured in
its adapter phase; its full-rank warm start holds AdamW's state (the ``full``
row). With ``--repeats N`` it then times N more steps of each method on one
micro-batch of the preset, round-robin across methods so that load from other
processes falls on all of them alike, and reports the median. Needs
``pip install 'relora[baselines]'``.

    python benchmarks/optimizer_state.py --presets 60m,130m,350m
    python benchmarks/optimizer_state.py --presets tiny --rank 64 --proj-rank 64 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from relora.core.adapters import wrap
from relora.core.optimizer_state import optimizer_state_bytes
from relora.run.build import make_model
from relora.run.config import TrainConfig
from relora.run.evaluation import lm_loss
from relora.run.phase import build_phase
from relora.run.resolve import resolve_config

METHODS = ("full", "relora", "galore", "apollo", "apollo-mini")


def build(preset: str, method: str, *, rank: int | None, proj_rank: int | None):
    """(config, model, optimizer) of ``method`` at ``preset``; ReLoRA and LoRA wrapped, as after the warm start."""
    overrides = {"method": method, "data": "unused", "device": "cpu", "rank": rank, "proj_rank": proj_rank}
    cfg = resolve_config(preset=preset, overrides=overrides)
    model = make_model(cfg, cfg.vocab_size)
    wrapped = cfg.relora_config() is not None
    if wrapped:
        wrap(model, cfg.relora_config())
    return cfg, model, build_phase(cfg, model, wrapped=wrapped).optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    lm_loss(model, tokens).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def random_tokens(cfg: TrainConfig, batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))


def measure_preset(preset: str, methods: list[str], *, rank: int | None, proj_rank: int | None,
                   repeats: int) -> list[dict]:
    """State bytes after one step of each method; with ``repeats``, median seconds per step (round-robin)."""
    built, results = {}, []
    for method in methods:
        # rank 1 is what makes APOLLO-mini; a --proj-rank given here is GaLore's and APOLLO's
        cfg, model, optimizer = build(preset, method, rank=rank,
                                      proj_rank=None if method == "apollo-mini" else proj_rank)
        train_step(model, optimizer, random_tokens(cfg, 1, 64))
        results.append({"preset": preset, "method": method, "state_bytes": optimizer_state_bytes(optimizer),
                        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                        "total": sum(p.numel() for p in model.parameters()), "step_s": None})
        print(f"{preset} {method}: {results[-1]['state_bytes'] / 1e6:,.2f} MB", flush=True)
        if repeats:
            built[method] = (model, optimizer, random_tokens(cfg, cfg.micro_batch, cfg.seq_len))
        else:
            del model, optimizer
    times: dict[str, list[float]] = {m: [] for m in built}
    for _ in range(repeats):
        for method, (model, optimizer, tokens) in built.items():
            start = time.perf_counter()
            train_step(model, optimizer, tokens)
            times[method].append(time.perf_counter() - start)
    for r in results:
        if times.get(r["method"]):
            r["step_s"] = statistics.median(times[r["method"]])
    return results


def table(results: list[dict]) -> str:
    full = {r["preset"]: r["state_bytes"] for r in results if r["method"] == "full"}
    timed = any(r["step_s"] for r in results)
    head = "| preset | method | parameters | trainable | optimizer state MB | / full |" + (" s / step |" if timed else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        ratio = r["state_bytes"] / full[r["preset"]] if r["preset"] in full else float("nan")
        line = (f"| {r['preset']} | {r['method']} | {r['total'] / 1e6:.1f}M | {r['trainable'] / 1e6:.1f}M | "
                f"{r['state_bytes'] / 1e6:,.2f} | {ratio:.3f} |")
        lines.append(line + (f" {r['step_s']:.3f} |" if timed else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,60m", help="comma-separated presets (default tiny,60m)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--rank", type=int, help="ReLoRA's adapter rank (default: the preset's)")
    parser.add_argument("--proj-rank", type=int, help="GaLore's / APOLLO's rank (default: theirs; APOLLO-mini keeps 1)")
    parser.add_argument("--repeats", type=int, default=0, help="also time this many steps per method (default 0)")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for preset in args.presets.split(","):
        results += measure_preset(preset, args.methods.split(","), rank=args.rank, proj_rank=args.proj_rank,
                                  repeats=args.repeats)
    text = table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
