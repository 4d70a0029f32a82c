"""The relora command: contract flags, exit codes, one-line errors, files left intact."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL
from transformers import AutoModelForCausalLM

from relora.cli import main

CONTRACT = {
    "prepare": ["--out", "--tokenizer", "--vocab-size", "--val-fraction", "--test-fraction", "--text-field", "--overwrite"],
    "train": ["--config", "--preset", "--method", "--data", "--out", "--steps", "--warm-start-steps",
              "--reset-every", "--merge-every", "--restart-warmup-steps", "--rank", "--alpha", "--prune",
              "--prune-ratio", "--lr", "--batch-tokens", "--micro-batch", "--seq-len", "--eval-every",
              "--save-every", "--init-from", "--resume", "--seed", "--no-restarts", "--no-optimizer-reset",
              "--no-jagged", "--no-warm-start"],
    "eval": ["--model", "--data"],
    "export": ["CHECKPOINT", "OUT"],
}


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("command", CONTRACT)
def test_help_lists_every_contract_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in CONTRACT[command]:
        assert flag in text, flag


@pytest.fixture
def tiny_config(tmp_path, prepared_data) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(
        model=TINY_MODEL, data=str(prepared_data), steps=20, warmup_steps=2, warm_start_steps=6,
        reset_every=6, restart_warmup_steps=2, rank=4, batch_tokens=256, micro_batch=8, seq_len=32,
        eval_every=10, eval_tokens=512, save_every=10, device="cpu")))
    return path


def train_args(config, out, *extra):
    return ["train", "--config", str(config), "--out", str(out), "--no-progress", *extra]


def test_train_eval_export_round_trip(tiny_config, prepared_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_config, run)) == 0
    out = capsys.readouterr().out
    assert "val ppl" in out and "restarts     2" in out
    assert (run / "config.yaml").is_file() and (run / "final" / "config.json").is_file()

    assert main(["eval", "--model", str(run / "final"), "--data", str(prepared_data), "--seq-len", "32",
                 "--eval-tokens", "512"]) == 0
    assert "val ppl" in capsys.readouterr().out

    exported = tmp_path / "exported"
    assert main(["export", str(run), str(exported)]) == 0
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (exported / "tokenizer.json").is_file()

    # a finished run resumed does no more steps and fails on nothing
    assert main(train_args(tiny_config, run, "--resume")) == 0


BAD_TRAIN = [
    (["--preset", "tinyy"], "unknown preset 'tinyy'"),
    (["--method", "loraa"], "unknown method"),
    (["--rank", "0"], "rank must be a positive integer"),
    (["--prune", "biggest"], "prune must be one of"),
    (["--prune-ratio", "1.5"], "prune_ratio"),
    (["--reset-every", "1"], "reset_every"),
    (["--micro-batch", "3"], "micro_batch"),
    (["--data", "/nonexistent/data"], "/nonexistent/data"),
    (["--init-from", "/nonexistent/model"], "/nonexistent/model"),
]


@pytest.mark.parametrize("flags, message", BAD_TRAIN, ids=[m for _, m in BAD_TRAIN])
def test_bad_train_input_is_one_line_and_exit_2(flags, message, tiny_config, tmp_path, capsys):
    assert main(train_args(tiny_config, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relora: error:") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_existing_run_is_refused_and_left_intact(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_config, run)) == 0
    before = tree_digest(run)
    capsys.readouterr()
    assert main(train_args(tiny_config, run)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(train_args(tiny_config, run, "--resume", "--rank", "8")) == 2
    assert "different rank" in capsys.readouterr().err
    assert tree_digest(run) == before


def test_resume_of_a_directory_without_run_fails_clearly(tiny_config, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(train_args(tiny_config, tmp_path / "empty", "--resume")) == 2
    assert "no run to resume" in capsys.readouterr().err


def test_export_refuses_non_checkpoint_and_existing_output(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err


def test_prepare_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err


def test_unknown_flag_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--rnak", "4"])
    assert exit_info.value.code == 2


def test_console_script_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "relora", "--version"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")})
    assert result.returncode == 0 and "relora" in result.stdout
