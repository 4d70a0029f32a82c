"""--gradient-checkpointing and --compile change speed and memory, never the training itself."""

import json

import pytest
from conftest import one_thread, run_config

from relora.train import train

SETTINGS = dict(steps=12, warmup_steps=2, warm_start_steps=4, reset_every=4, restart_warmup_steps=1, eval_every=0,
                eval_tokens=256)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_run(prepared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    with one_thread():
        train(run_config(prepared_data, out, **SETTINGS), progress=False)
    return out


def test_activation_checkpointing_gives_the_same_loss_curve(prepared_data, plain_run, tmp_path):
    with one_thread():
        train(run_config(prepared_data, tmp_path, gradient_checkpointing=True, **SETTINGS), progress=False)
    # the recomputed forward is the same computation: the curves agree to float32 rounding
    assert losses(tmp_path) == pytest.approx(losses(plain_run), rel=1e-5)
    assert len(losses(tmp_path)) == 12


@pytest.mark.slow
def test_compiled_model_trains_through_merges_to_the_same_loss_curve(prepared_data, plain_run, tmp_path):
    """Compiled before and again after wrapping; merges write the weights in place under the compiled graph."""
    with one_thread():
        train(run_config(prepared_data, tmp_path, compile=True, **SETTINGS), progress=False)
    # inductor fuses and reorders float32 arithmetic: equal up to rounding, not bit for bit
    assert losses(tmp_path) == pytest.approx(losses(plain_run), rel=2e-3)
