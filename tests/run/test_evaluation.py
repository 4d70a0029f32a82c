"""Evaluation windows: the same ones every time, spread over the whole split (issue 17's test split)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from relora.data import TokenWindows
from relora.run.evaluation import evaluate, spread_windows


@pytest.mark.parametrize("available, wanted", [(10, 3), (37, 8), (8, 8), (5, 12), (1000, 1)])
def test_spread_windows_are_evenly_spaced_from_the_start(available, wanted):
    picked = spread_windows(available, wanted)
    n = min(available, wanted)
    assert picked.tolist() == [int(np.floor(i * available / n)) for i in range(n)]
    assert len(set(picked.tolist())) == n and picked.max() < available


def test_evaluate_averages_the_spread_windows_and_splits_them_across_ranks():
    torch.manual_seed(0)
    model = tiny_llama()
    tokens = np.random.default_rng(1).integers(0, 128, size=40 * 16 + 1)
    tokens[: 20 * 16] = 7  # an easy first half: evaluating only the first windows would see nothing else
    windows = TokenWindows(tokens, 16, mode="sequential")
    picked = [i * len(windows) // 6 for i in range(6)]
    batch = windows.get(picked)
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
    whole = evaluate(model, windows, num_windows=6, micro_batch=4, device=torch.device("cpu"))
    assert whole == pytest.approx(expected, rel=1e-5)
    parts = [evaluate(model, windows, num_windows=6, micro_batch=2, device=torch.device("cpu"), rank=r,
                      world_size=2, reduce=lambda values: values) for r in (0, 1)]
    assert sum(parts) / 2 == pytest.approx(expected, rel=1e-5)  # each rank half of the same six windows
