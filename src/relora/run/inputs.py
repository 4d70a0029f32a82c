"""A run's data: the prepared tokens, checked, cut into the windows it trains and evaluates on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relora.data import PreparedData, TokenWindows, load_prepared
from relora.errors import ConfigError
from relora.run.config import TrainConfig
from relora.run.device import pick_device


@dataclass
class RunData:
    """The prepared data and its windows; ``order`` is the shuffled pass of sequential sampling."""

    prepared: PreparedData
    train: TokenWindows
    val: TokenWindows
    test: TokenWindows | None
    order: np.ndarray | None


def load_run_data(cfg: TrainConfig, *, check_identity: bool) -> RunData:
    """The data of ``cfg``; ``check_identity``: a resumed run must find the tokens it started on."""
    data = load_prepared(cfg.data)
    if check_identity:
        check_data_identity(cfg, data)
    train = _train_windows(cfg, data)
    val = _eval_windows(cfg, data.val, "validation")
    test = None if data.test is None else _eval_windows(cfg, data.test, "test")
    return RunData(data, train, val, test, data_order(cfg, train))


def data_order(cfg: TrainConfig, windows: TokenWindows) -> np.ndarray | None:
    """Sequential sampling: one shuffled pass over non-overlapping windows, no repetition."""
    if cfg.sampling == "random":
        return None
    needed = cfg.steps * cfg.sequences_per_step
    if needed > len(windows):
        raise ConfigError(
            f"{cfg.steps} steps need {needed} windows of {cfg.seq_len} tokens but the training data has "
            f"{len(windows)}; use --sampling random, fewer --steps, or more data"
        )
    return np.random.default_rng(cfg.seed).permutation(len(windows))


def check_inputs(cfg: TrainConfig) -> None:
    """Raise the errors a run would meet in its first seconds (device, data) before anything is printed or written."""
    pick_device(cfg.device)
    data = load_prepared(cfg.data)
    check_data_identity(cfg, data)
    data_order(cfg, _train_windows(cfg, data))
    _eval_windows(cfg, data.val, "validation")


def check_data_identity(cfg: TrainConfig, data: PreparedData) -> None:
    """A resumed run (its config has a ``data_id``) must find the tokens it started on, wherever they are now."""
    if cfg.data_id is not None and cfg.data_id != data.identity:
        raise ConfigError(f"{cfg.data} holds other tokens than the data this run started on (prepared again?); "
                          "pass the run's data with --data, or start a new --out")


def _train_windows(cfg: TrainConfig, data: PreparedData) -> TokenWindows:
    return TokenWindows(data.train, cfg.seq_len, mode=cfg.sampling, seed=cfg.seed, name="the train split")


def _eval_windows(cfg: TrainConfig, tokens: np.ndarray, split: str) -> TokenWindows:
    return TokenWindows(tokens, cfg.seq_len, mode="sequential", name=f"the {split} split")
