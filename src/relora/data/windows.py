"""Stateless, deterministic training windows over a flat token array."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from relora.errors import DataError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixing hash of uint64 values (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class TokenWindows:
    """Deterministic windows of seq_len+1 tokens (inputs plus shifted targets) over a flat token array.

    Window j is a pure function of (j, seed, mode), so a trainer only needs a counter to resume exactly
    or to shard across processes. "sequential": window j = tokens[j*seq_len : j*seq_len + seq_len + 1],
    for j < len(self). "random": the start of window j is uniform in [0, n - seq_len - 1], drawn from a
    counter-based generator (the j-th SplitMix64 output for `seed`), for any j >= 0.
    """

    def __init__(
        self, tokens: np.ndarray, seq_len: int, mode: str = "random", seed: int = 0, *, name: str = "the token array"
    ) -> None:
        """`name` (e.g. "the val split") is used in the error for a too-short array."""
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if len(tokens) <= seq_len + 1:
            raise DataError(
                f"{name} has only {len(tokens)} tokens, too few for windows of seq_len+1 = {seq_len + 1}: "
                "use a smaller --seq-len or a bigger corpus"
            )
        self.tokens, self.seq_len, self.mode, self.seed = tokens, seq_len, mode, seed
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)
        # The generator's state for counter 0; window j uses the (j+1)-th step from it.
        self._key = _mix64(np.array([seed % 2**64], dtype=np.uint64) + _GOLDEN)

    def __len__(self) -> int:
        """Number of non-overlapping windows (stride seq_len): the sequential length, one epoch for random."""
        return (len(self.tokens) - 1) // self.seq_len

    def starts(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Start positions (int64) of the windows with these global indices."""
        j = np.asarray(indices, dtype=np.int64).reshape(-1)
        if j.size and j.min() < 0:
            raise IndexError(f"window indices must be non-negative, got {int(j.min())}")
        if self.mode == "sequential":
            if j.size and j.max() >= len(self):
                raise IndexError(
                    f"sequential window {int(j.max())} is out of range: there are only {len(self)} windows "
                    f"of {self.seq_len} tokens"
                )
            return j * self.seq_len
        h = _mix64(self._key + (j.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
        return (h % np.uint64(len(self.tokens) - self.seq_len)).astype(np.int64)

    def get(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """LongTensor [len(indices), seq_len+1] of the windows with these global indices."""
        rows = self.tokens[self.starts(indices)[:, None] + self._offsets]
        return torch.from_numpy(np.asarray(rows, dtype=np.int64))
