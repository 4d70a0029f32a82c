"""Singular-value spectra of the update dW = W - W_reference (the paper's Figures 3 and 4).

ReLoRA's claim is that a sequence of rank-r updates sums to a high-rank one.
This module measures it: for every wrapped matrix, the singular values of the
difference between a trained model and a reference (by default the weights
where low-rank training started), grouped by matrix type (q, k, v, o, gate,
up, down). SVDs run in float64 so that the numerical-rank count is not limited
by float32 round-off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from relora.core.adapters import find_targets

DEFAULT_THRESHOLD = 0.1  # the paper's Figure 4 counts singular values below 0.1
RANK_RTOL = 1e-6  # singular values above RANK_RTOL * largest count toward the numerical rank


def matrix_type(module_name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q``; names without ``_proj`` are kept (``c_attn``)."""
    last = module_name.rsplit(".", 1)[-1]
    return last[: -len("_proj")] if last.endswith("_proj") and len(last) > len("_proj") else last


def singular_values(delta: torch.Tensor) -> np.ndarray:
    """Singular values of a 2-D update, largest first, computed in float64."""
    if delta.ndim != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(delta.shape)}")
    return torch.linalg.svdvals(delta.detach().to(device="cpu", dtype=torch.float64)).numpy()


def count_below(values: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> int:
    """How many singular values are below ``threshold`` (Figure 4's measure)."""
    return int(np.count_nonzero(np.asarray(values) < threshold))


def numerical_rank(values: np.ndarray, rtol: float = RANK_RTOL) -> int:
    """How many singular values exceed ``rtol`` times the largest one."""
    values = np.asarray(values)
    if values.size == 0 or values.max() == 0:
        return 0
    return int(np.count_nonzero(values > rtol * values.max()))


@dataclass
class UpdateSpectra:
    """Singular values of dW per wrapped matrix, grouped by matrix type."""

    values: dict[str, list[np.ndarray]] = field(default_factory=dict)  # type -> one array per layer
    names: dict[str, list[str]] = field(default_factory=dict)  # type -> module names, same order

    def below(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
        """Per type, the mean over layers of the count of singular values below ``threshold``."""
        return {t: float(np.mean([count_below(v, threshold) for v in vs])) for t, vs in self.values.items()}

    def ranks(self, rtol: float = RANK_RTOL) -> dict[str, list[int]]:
        """Per type, the numerical rank of each layer's dW."""
        return {t: [numerical_rank(v, rtol) for v in vs] for t, vs in self.values.items()}

    def to_dict(self, threshold: float = DEFAULT_THRESHOLD) -> dict:
        return {
            "threshold": threshold,
            "rank_rtol": RANK_RTOL,
            "below_threshold": self.below(threshold),
            "numerical_rank": self.ranks(),
            "matrices": {
                t: [{"name": n, "singular_values": v.tolist()} for n, v in zip(self.names[t], vs, strict=True)]
                for t, vs in self.values.items()
            },
        }


def update_spectra(
    weights: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], modules: list[str]
) -> UpdateSpectra:
    """Spectra of ``weights[m.weight] - reference[m.weight]`` for every module name in ``modules``."""
    spectra = UpdateSpectra()
    for name in modules:
        key = f"{name}.weight"
        if key not in weights or key not in reference:
            missing = "model" if key not in weights else "reference"
            raise KeyError(f"{key} is missing from the {missing}")
        w, ref = weights[key], reference[key]
        if w.shape != ref.shape:
            raise ValueError(f"{key}: shape {tuple(w.shape)} differs from the reference's {tuple(ref.shape)}")
        delta = w.detach().to(torch.float64) - ref.detach().to(w.device, torch.float64)
        kind = matrix_type(name)
        spectra.values.setdefault(kind, []).append(singular_values(delta))
        spectra.names.setdefault(kind, []).append(name)
    return spectra


def model_update_spectra(model: nn.Module, reference: nn.Module, patterns: list[str] | None = None) -> UpdateSpectra:
    """Spectra of dW between two dense models of the same architecture (default targets as ``relora.wrap``)."""
    return update_spectra(model.state_dict(), reference.state_dict(), find_targets(model, patterns))
