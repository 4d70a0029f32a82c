"""Measured optimizer-state bytes of every method at the paper's model sizes, without training.

Builds each preset's model, takes one optimizer step of each method on random
tokens (the state's size does not depend on the data) and sums the tensors the
optimizer holds (``relora.optim.optimizer_state_bytes``). ReLoRA and LoRA are
measured in their adapter phase; their full-rank warm start holds AdamW's state
(the ``full`` row). Needs ``pip install 'relora[baselines]'``.

    python benchmarks/optimizer_state.py --presets tiny,60m,130m --out docs/results/baselines/state.md
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from relora.adapters import wrap
from relora.evaluation import lm_loss
from relora.optim import optimizer_state_bytes
from relora.run_config import resolve_config
from relora.train import build_phase, make_model

METHODS = ("full", "relora", "galore", "apollo", "apollo-mini")


def measure(preset: str, method: str, *, rank: int | None, proj_rank: int | None, seq_len: int = 64) -> dict:
    """Optimizer-state bytes and trainable parameters of ``method`` at ``preset`` after one step."""
    overrides = {"method": method, "data": "unused", "device": "cpu", "rank": rank, "proj_rank": proj_rank}
    cfg = resolve_config(preset=preset, overrides=overrides)
    model = make_model(cfg, cfg.vocab_size)
    wrapped = cfg.relora_config() is not None
    if wrapped:
        wrap(model, cfg.relora_config())
    optimizer = build_phase(cfg, model, wrapped=wrapped).optimizer
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    lm_loss(model, tokens).backward()
    optimizer.step()
    result = {"preset": preset, "method": method, "state_bytes": optimizer_state_bytes(optimizer),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total": sum(p.numel() for p in model.parameters())}
    del model, optimizer
    gc.collect()
    return result


def table(results: list[dict]) -> str:
    full = {r["preset"]: r["state_bytes"] for r in results if r["method"] == "full"}
    lines = ["| preset | method | parameters | trainable | optimizer state MB | / full |", "|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["state_bytes"] / full[r["preset"]] if r["preset"] in full else float("nan")
        lines.append(f"| {r['preset']} | {r['method']} | {r['total'] / 1e6:.1f}M | {r['trainable'] / 1e6:.1f}M | "
                     f"{r['state_bytes'] / 1e6:,.2f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,60m", help="comma-separated presets (default tiny,60m)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--rank", type=int, help="ReLoRA's adapter rank (default: the preset's)")
    parser.add_argument("--proj-rank", type=int, help="GaLore's / APOLLO's rank (default: theirs; APOLLO-mini keeps 1)")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for preset in args.presets.split(","):
        for method in args.methods.split(","):
            proj_rank = None if method == "apollo-mini" else args.proj_rank  # rank 1 is what makes APOLLO-mini
            results.append(measure(preset, method, rank=args.rank, proj_rank=proj_rank))
            print(f"{preset} {method}: {results[-1]['state_bytes'] / 1e6:,.2f} MB", flush=True)
    text = table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
