"""Validation loss and perplexity on a fixed set of validation windows."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from relora.data import PreparedData, TokenWindows, load_prepared
from relora.data.tokenizer import tokenizer_fingerprint
from relora.errors import DataError

# `relora eval` of a model that comes from no run; a run's model is evaluated as the run evaluated it
EVAL_DEFAULTS = {"seq_len": 256, "eval_tokens": 1_000_000, "micro_batch": 16}


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of windows of seq_len + 1 tokens, in float32."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: TokenWindows,
    *,
    num_windows: int,
    micro_batch: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> float:
    """Mean loss over ``num_windows`` sequential windows spread evenly over the whole split.

    The same windows at every evaluation, so curves are comparable across steps
    and runs on the same prepared data. Spread, not the first ones: a split
    keeps the corpus' file order, and the first 65,536 tokens of the stdlib's
    test split are mostly generated codec tables (near-copies of training
    files: ppl 11 there against 103 on val). With several processes each
    evaluates an equal share (``num_windows`` rounded down to a multiple of
    ``world_size``: a sharded model needs every rank in every forward pass)
    and ``reduce`` sums the totals across them.
    """
    picked = spread_windows(len(windows), num_windows)
    share = max(len(picked) // world_size, 1)
    mine = picked[rank * share:(rank + 1) * share]
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(mine), micro_batch):
        batch = windows.get(mine[start:start + micro_batch]).to(device)
        with autocast or contextlib.nullcontext():
            total += lm_loss(model, batch).item() * batch.shape[0]
    model.train(was_training)
    count = float(share)
    if reduce is not None:
        total, count = reduce([total, count])
    return total / count


def spread_windows(available: int, wanted: int) -> np.ndarray:
    """Indices of ``min(wanted, available)`` windows evenly spaced over ``available``: floor(i * available / n)."""
    n = min(wanted, available)
    return (np.arange(n, dtype=np.int64) * available) // n


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def run_config_of(model: Path) -> dict | None:
    """The training config of the run ``model`` comes from: a checkpoint's own, or the run directory's for
    its ``final/`` and ``reference/``; None for a model from elsewhere (or an unreadable config)."""
    import yaml

    from relora.run import checkpoint as ckpt

    if (model / ckpt.MARKER).is_file():
        file = model / "config.yaml"
    else:
        run = model.resolve().parent
        if not ((run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()):
            return None
        file = run / "config.yaml"
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def eval_settings(model: Path, given: dict[str, int | None]) -> tuple[dict[str, int], dict | None]:
    """seq_len, eval_tokens and micro_batch for evaluating ``model``: those given (not None), else the run's own
    (so that evaluating a run's ``final/`` reproduces its summary.json), else ``EVAL_DEFAULTS``."""
    config = run_config_of(model)
    settings = {}
    for name, default in EVAL_DEFAULTS.items():
        value = given.get(name)
        settings[name] = value if value is not None else (config or {}).get(name, default)
    return settings, config


def check_same_tokenizer(model: Path, data: PreparedData, run_config: dict | None) -> str | None:
    """Refuse data tokenized by another tokenizer than the model's: its perplexity would be meaningless.

    The model's tokenizer is the one saved beside it (``final/`` and exports hold one), else that of the
    data its run trained on. When either side is unknown, return a warning for the caller to log.
    """
    model_hash, source = tokenizer_fingerprint(model), f"the tokenizer in {model}"
    fix = f"prepare the corpus again with `relora prepare ... --tokenizer {model}`"
    if model_hash is None and run_config and run_config.get("data"):
        trained_on = Path(run_config["data"])
        try:
            model_hash = load_prepared(trained_on).tokenizer_hash
        except DataError:
            pass
        source = f"the tokenizer of {trained_on}, the data it was trained on"
        fix = f"evaluate on {trained_on} or data prepared with `relora prepare ... --tokenizer {trained_on}/tokenizer`"
    data_hash = data.tokenizer_hash
    if model_hash is None or data_hash is None:
        return (f"WARNING: cannot check that {data.path} was prepared with the model's tokenizer "
                f"({model if model_hash is None else data.path} holds none): if it was not, the perplexity means nothing")
    if model_hash != data_hash:
        raise DataError(f"{data.path} was prepared with another tokenizer than the model's ({source}; fingerprints "
                        f"{data_hash} and {model_hash}): {fix}")
    return None
