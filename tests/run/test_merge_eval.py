"""--eval-merges: the validation loss right before and right after each merge, without changing training."""

import json

import pytest
from conftest import run_config

from relora.cli import build_parser, train_overrides
from relora.core.controller import ReLoRA
from relora.errors import ConfigError
from relora.run.merge_eval import MERGE_EVAL_WINDOWS, merge_eval_windows
from relora.run.resolve import resolve_config
from relora.train import train

MERGE_FIELDS = ("merge_loss_before", "merge_loss_after")
TIMING = ("tokens_per_s", "peak_mem_bytes")


def _records(prepared_data, out, **overrides) -> list[dict]:
    train(run_config(prepared_data, out, **overrides), progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _merge_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "merge_loss_before" in r]


@pytest.mark.parametrize("method, extra", [("relora", {}), ("online-relora", {"merge_every": 5})])
def test_a_correct_merge_leaves_the_loss_unchanged(prepared_data, tmp_path, method, extra):
    records = _records(prepared_data, tmp_path / method, method=method, eval_merges=True, **extra)
    merges = _merge_records(records)
    # every merge, and only merges: relora 10 + 10 k for k < 3 (none at the last step), online-relora every 5
    assert [r["step"] for r in merges] == ([20, 30] if method == "relora" else [15, 20, 25, 30, 35])
    assert merges[-1]["merges"] == records[-1]["merges"] == len(merges)
    for r in merges:
        assert abs(r["merge_loss_after"] - r["merge_loss_before"]) < 1e-5 * r["merge_loss_before"]
        assert 1.0 < r["merge_loss_before"] < 10.0  # a real loss of the 512-token vocabulary, not a placeholder


def test_an_unscaled_merge_changes_the_loss(prepared_data, tmp_path):
    """alpha 8, rank 4: the defect folds B A instead of 2 B A, so the function changes by -B A at each merge.

    Measured: a loss change of 2.6e-3 and 1.2e-2 (5e-4 and 2e-3 relative) at the two merges, against at most
    6e-8 (1e-8 relative) for the correct merges of the same run; the bound is 10x the correct merges' one."""
    records = _records(prepared_data, tmp_path, eval_merges=True, reference_defects=["unscaled-merge"])
    merges = _merge_records(records)
    assert len(merges) == 2
    for r in merges:
        assert abs(r["merge_loss_after"] - r["merge_loss_before"]) > 1e-4 * r["merge_loss_before"]


def test_evaluating_merges_does_not_change_training(prepared_data, tmp_path):
    """The same losses, gradient norms and validation losses bit for bit (dropout on: an RNG draw would show)."""
    on = _records(prepared_data, tmp_path / "on", eval_merges=True, dropout=0.1)
    off = _records(prepared_data, tmp_path / "off", dropout=0.1)
    assert _merge_records(on) and not _merge_records(off)
    strip = MERGE_FIELDS + TIMING
    assert [{k: v for k, v in r.items() if k not in strip} for r in on] == \
        [{k: v for k, v in r.items() if k not in strip} for r in off]


def test_full_rank_runs_ignore_the_flag(prepared_data, tmp_path):
    """`relora compare --eval-merges` passes it to every row; a method without merges trains as without it."""
    assert not _merge_records(_records(prepared_data, tmp_path, method="full", steps=12, eval_merges=True))


def test_the_controller_says_which_steps_merge(model):
    from relora.core.adapters import wrap
    from relora.core.config import ReLoRAConfig

    config = ReLoRAConfig(r=4, reset_every=6, merge_every=3, restart_warmup_steps=1, warm_start_steps=2)
    wrap(model, config)
    import torch

    controller = ReLoRA(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), config,
                        total_steps=20)
    assert [s for s in range(25) if controller.merges_at(s)] == controller.merge_steps() == [5, 8, 11, 14, 17]
    assert controller.merges == 0  # asking merges nothing


def test_merge_evaluation_reads_a_small_fixed_set_of_windows():
    assert merge_eval_windows(resolve_config(overrides={"eval_tokens": 65536, "seq_len": 128})) == MERGE_EVAL_WINDOWS
    assert merge_eval_windows(resolve_config(overrides={"eval_tokens": 256, "seq_len": 128})) == 2


def test_flags_for_the_merge_evaluation_and_adams_betas():
    parser = build_parser()
    args = parser.parse_args(["train", "--eval-merges", "--beta1", "0.8", "--beta2", "0.95"])
    assert train_overrides(args) == {"eval_merges": True, "beta1": 0.8, "beta2": 0.95}
    args = parser.parse_args(["compare", "--eval-merges", "--beta2", "0.95", "--out", "x"])
    assert {"eval_merges": True, "beta2": 0.95}.items() <= train_overrides(args).items()
    with pytest.raises(ConfigError, match="beta2 must be in"):
        resolve_config(overrides={"beta2": 1.0, "device": "cpu"}).validate()
