"""The relora command: contract flags, exit codes, one-line errors, files left intact."""

import hashlib
import json
import logging
import os
import re
import shutil
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
    (["--restart-adam-step", "never"], "restart_adam_step must be one of keep, reset"),
    (["--reference-defects", "zero-init-b"],
     "unknown reference defect 'zero-init-b'; the names are zero-init-a, unscaled-merge, independent-masks"),
    (["--reference-defects", "unscaled-merge", "--quantize", "nf4"], "unscaled-merge is not exact with quantize"),
    (["--reference-defects", "independent-masks"], "use it with prune='random' (--prune random)"),
    (["--method", "full", "--reference-defects", "zero-init-a"], "method full has none"),
    (["--reset-every", "1"], "reset_every"),
    (["--micro-batch", "3"], "micro_batch"),
    (["--data", "/nonexistent/data"], "/nonexistent/data"),
    (["--init-from", "/nonexistent/model"], "/nonexistent/model"),
    (["--frozen-dtype", "float16"], "frozen_dtype must be one of float32, bfloat16"),
    (["--frozen-dtype", "bfloat16", "--distributed", "fsdp"], "use --frozen-dtype float32 or --distributed ddp"),
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


def test_restart_adam_step_flag_reaches_the_controller_config():
    from relora.cli import build_parser, train_overrides
    from relora.run.resolve import resolve_config

    args = build_parser().parse_args(["train", "--restart-adam-step", "reset"])
    assert resolve_config(overrides=train_overrides(args)).relora_config().restart_adam_step == "reset"
    assert resolve_config().relora_config().restart_adam_step == "reset"
    args = build_parser().parse_args(["train", "--restart-adam-step", "keep"])
    assert resolve_config(overrides=train_overrides(args)).relora_config().restart_adam_step == "keep"


def test_reference_defects_flag_reaches_train_and_compare_configs():
    from relora.cli import build_parser, train_overrides
    from relora.run.resolve import resolve_config

    for command in ("train", "compare"):
        args = build_parser().parse_args([command, "--reference-defects", "zero-init-a,unscaled-merge"])
        config = resolve_config(overrides=train_overrides(args))
        assert config.relora_config().reference_defects == ("zero-init-a", "unscaled-merge")
    assert resolve_config().relora_config().reference_defects == ()
    assert "STUDY ONLY" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_compare_checks_row_only_settings_per_row_not_against_the_configs_own_method(tmp_path, capsys):
    """A config whose method is full-rank, compared on adapter rows with --reference-defects (which full-rank
    refuses): compare must not fail on the config's own method; it gets past validation to the data check."""
    config = tmp_path / "full.yaml"
    config.write_text(f"method: full\nmodel: {json.dumps(TINY_MODEL)}\n")
    missing = tmp_path / "nodata"
    for extra in (["--reference-defects", "zero-init-a"], ["--matrix-lr-scale", "0.5"]):
        rc = main(["compare", "--config", str(config), "--methods", "full,relora", "--data", str(missing),
                   "--out", str(tmp_path / "cmp"), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert rc != 0
        assert "does not exist" in err and "has none" not in err and "drop --matrix-lr-scale" not in err, err
        assert not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------- issue 19: each setting declared once
def subparser(command: str):
    from relora.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices[command]


def config_flags(command: str, own: set[str]) -> dict[str, list]:
    """The flags of ``command`` by destination, less its own (not config fields) and --help."""
    found: dict[str, list] = {}
    for action in subparser(command)._actions:
        if action.dest not in own | {"help"}:
            found.setdefault(action.dest, []).append(action)
    return found


@pytest.mark.parametrize("command", ["train", "compare", "finetune"])
def test_every_exposed_setting_has_exactly_one_flag_with_help(command):
    """The flags of train, compare and finetune are the config fields that declare one, each once, with the
    field's help text: none written again by hand."""
    from dataclasses import fields

    from relora.finetune.config import FinetuneConfig
    from relora.run.config import TrainConfig

    config_class, own = {
        "train": (TrainConfig, {"config", "resume", "no_progress"}),
        "compare": (TrainConfig, {"set", "out", "runs", "config", "threshold", "methods", "lr", "lr_grid", "seeds",
                                  "clip_rule", "widen_edges", "no_progress"}),
        "finetune": (FinetuneConfig, {"no_progress"}),
    }[command]
    exposed = {f.name: f for f in fields(config_class) if f.metadata["flag"] is not None
               and (command != "compare" or f.metadata["compare"])}
    flags = config_flags(command, own)
    assert set(flags) == set(exposed)
    for name, actions in flags.items():
        assert len(actions) == 1, name
        assert actions[0].help and actions[0].help == exposed[name].metadata["help"], name
    assert all(f.metadata["help"].strip() for f in fields(config_class)), "every field says what it means"


def test_bench_flags_are_its_settings_fields_with_help():
    """The flags of bench are the fields of BenchSetup and BenchOptions that declare one, each once, with the
    field's help; a setting that means what a TrainConfig one means has that field's help text (written once)."""
    from dataclasses import fields

    from relora.analysis.bench_setup import BenchOptions, BenchSetup
    from relora.run.config import TrainConfig

    declared = [f for cls in (BenchSetup, BenchOptions) for f in fields(cls)]
    exposed = {f.name: f for f in declared if f.metadata["flag"] is not None}
    flags = config_flags("bench", {"quantize", "explain", "json"})
    assert set(flags) == set(exposed)
    for name, actions in flags.items():
        assert len(actions) == 1, name
        assert actions[0].help and actions[0].help == exposed[name].metadata["help"], name
    assert all(f.metadata["help"].strip() for f in declared), "every field says what it means"
    train_help = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
    for name in ("preset", "rank", "seq_len", "device", "gradient_checkpointing", "compile"):
        assert exposed[name].metadata["help"].startswith(train_help[name]), name


def test_bench_flags_keep_their_names_and_defaults():
    from relora.analysis.bench_setup import BenchOptions, BenchSetup
    from relora.cli import build_parser
    from relora.cli.flags import setting_values

    args = build_parser().parse_args(["bench"])
    assert setting_values(args, BenchSetup) == {} and BenchOptions(**setting_values(args, BenchOptions)) == \
        BenchOptions("full,relora", 2, 5, True, False, False)
    assert (args.quantize, args.explain, args.json) == (None, False, None)
    args = build_parser().parse_args(["bench", "--preset", "20m", "--rank", "8", "--seq-len", "64", "--micro-batch",
                                      "3", "--vocab-size", "100", "--frozen-dtype", "bfloat16", "--device", "cpu",
                                      "--gradient-checkpointing", "--compile", "--methods", "relora", "--warmup", "0",
                                      "--repeats", "1", "--no-memory", "--merge", "--max-micro-batch"])
    assert setting_values(args, BenchSetup) == {"preset": "20m", "rank": 8, "seq_len": 64, "micro_batch": 3,
                                                "vocab_size": 100, "frozen_dtype": "bfloat16", "device": "cpu",
                                                "gradient_checkpointing": True, "compile": True}
    assert setting_values(args, BenchOptions) == {"methods": "relora", "warmup": 0, "repeats": 1, "memory": False,
                                                  "merge": True, "max_micro_batch": True}


def test_switch_flags_turn_their_setting_off_or_on():
    from relora.cli import build_parser, train_overrides

    args = build_parser().parse_args(["train", "--no-restarts", "--no-jagged", "--compile", "--scale-front", "no"])
    assert train_overrides(args) == {"restarts": False, "jagged": False, "compile": True, "scale_front": False}
    assert train_overrides(build_parser().parse_args(["train"])) == {}  # absent flags: the config's values


# ---------------------------------------------------------------- issue 15: misleading results, silent behaviour
FINISHED_SETTINGS = dict(model=TINY_MODEL, steps=20, warmup_steps=2, warm_start_steps=6, reset_every=6,
                         restart_warmup_steps=2, rank=4, batch_tokens=256, micro_batch=8, seq_len=32, eval_every=10,
                         eval_tokens=384, save_every=10, device="cpu")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, prepared_data):
    """A finished tiny ReLoRA run trained by the real console script with its progress bar on: (run, stderr)."""
    root = tmp_path_factory.mktemp("finished")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({**FINISHED_SETTINGS, "data": str(prepared_data)}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "relora", "train", "--config", str(config), "--out", "run"],
                            capture_output=True, text=True, env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "run", result.stderr


def printed_eval(text: str) -> tuple[float, float]:
    match = re.search(r"val loss (\S+)  val ppl (\S+)", text)
    assert match, text
    return float(match.group(1)), float(match.group(2))


def test_val_ppl_is_printed_above_the_progress_bar_when_evaluated(finished):
    run, stderr = finished
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "val_ppl" in r]
    assert [r["step"] for r in evaluated] == [10, 20]
    segments = re.split(r"[\r\n]", stderr)  # tqdm redraws its bar with \r; a log line is a segment of its own
    for r in evaluated:
        line = f"step {r['step']}: val loss {r['val_loss']:.4f}, val ppl {r['val_ppl']:.2f}"
        assert line in segments, stderr


def test_eval_of_a_runs_model_reproduces_its_summary(finished, prepared_data, capsys):
    """Without --seq-len / --eval-tokens / --micro-batch, eval uses the run's, so it prints summary.json's numbers."""
    run, _ = finished
    summary = json.loads((run / "summary.json").read_text())
    for model in (run / "final", run / "checkpoints" / "step_20"):
        assert main(["eval", "--model", str(model), "--data", str(prepared_data), "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        loss, ppl = printed_eval(out)
        assert "seq-len 32; the run's evaluation settings)" in out and "(384 tokens" in out, out
        assert abs(loss - summary["val_loss"]) <= 5e-5 + 1e-6, (loss, summary["val_loss"])  # printed to 4 decimals
        assert abs(ppl - summary["val_ppl"]) <= 5e-3 + 1e-5 * ppl, (ppl, summary["val_ppl"])  # and to 2
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "default: the run's, else 256" in help_text and "default: the run's, else 1,000,000" in help_text


def test_eval_refuses_data_prepared_with_another_tokenizer(finished, prepared_data, tmp_path, capsys, caplog):
    from relora.data import prepare

    run, _ = finished
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"a different corpus, document number {i}; " * 80)
    other = prepare([corpus], tmp_path / "other", vocab_size=300, val_fraction=0.5, progress=False)
    for model in (run / "final", run / "checkpoints" / "step_20"):  # final/'s tokenizer; the run's data's
        assert main(["eval", "--model", str(model), "--data", str(other), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("relora: error:") and len(err.splitlines()) == 1, err
        assert "another tokenizer" in err and "--tokenizer" in err, err

    # data prepared before meta.json stored the hash: computed from its tokenizer/, and it matches
    old = Path(shutil.copytree(prepared_data, tmp_path / "old"))
    meta = json.loads((old / "meta.json").read_text())
    del meta["tokenizer_hash"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", "--model", str(run / "final"), "--data", str(old), "--device", "cpu"]) == 0

    # a model directory without a tokenizer and outside any run: evaluated, with a loud warning
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (run / "final" / name).is_file():
            shutil.copy(run / "final" / name, bare / name)
    caplog.set_level(logging.WARNING)
    assert main(["eval", "--model", str(bare), "--data", str(other), "--device", "cpu"]) == 0
    assert any("cannot check" in r.getMessage() for r in caplog.records), caplog.records


def test_resume_of_a_finished_run_says_so_and_changes_nothing(finished, tmp_path, capsys):
    run = Path(shutil.copytree(finished[0], tmp_path / "run"))
    before = tree_digest(run)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "is finished" in out and "nothing changed" in out and "--init-from" in out, out
    assert tree_digest(run) == before
    assert f"val ppl      {json.loads((run / 'summary.json').read_text())['val_ppl']:.2f}" in out, out


def test_resume_finds_its_data_by_identity_not_spelling(prepared_data, tmp_path, monkeypatch, capsys):
    """The run stores its data resolved with an identity: resumable from another directory, by another path to
    the same tokens; other tokens are refused, also when they replace the data at the same path."""
    from relora.data import load_prepared, prepare
    from relora.run.resolve import resolve_config

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = Path(shutil.copytree(prepared_data, work / "data"))
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump({**FINISHED_SETTINGS, "steps": 10, "eval_every": 0, "save_every": 5,
                                      "data": "data"}))  # relative, as typed
    monkeypatch.chdir(work)
    assert main(["train", "--config", "tiny.yaml", "--out", "run", "--no-progress"]) == 0
    run = work / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"] == str(data.resolve()) and saved["data_id"] == load_prepared(data).identity
    # the run's config.yaml reused as --config of a new run: the identity is the new run's to compute
    assert resolve_config(config_file=run / "config.yaml").data_id is None

    def resume(*flags):
        (run / "summary.json").unlink()  # unfinished again: --resume has work (the export) left to do
        code = main(["train", "--out", str(run), "--resume", "--no-progress", *flags])
        if code != 0:
            (run / "summary.json").write_text("{}")
        return code, capsys.readouterr()

    monkeypatch.chdir(elsewhere)
    assert resume()[0] == 0  # another working directory
    assert resume("--data", str(data.resolve()))[0] == 0  # an absolute path
    copy = shutil.copytree(data, tmp_path / "moved" / "data")
    assert resume("--data", str(copy))[0] == 0  # the same tokens elsewhere
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == str(copy.resolve())

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"other data, document {i}; " * 200)
    other = prepare([corpus], tmp_path / "other", vocab_size=512, val_fraction=0.5, progress=False)
    code, captured = resume("--data", str(other))
    assert code == 2 and "different data" in captured.err, captured.err
    shutil.rmtree(copy)
    shutil.copytree(other, copy)  # other tokens where the run's data was
    code, captured = resume()
    assert code == 2 and "holds other tokens" in captured.err, captured.err

    # a run config from before data_id: resumed as before, from its own directory
    shutil.rmtree(copy)
    shutil.copytree(data, copy)
    old = yaml.safe_load((run / "config.yaml").read_text())
    old.pop("data_id")
    old["data"] = "data"
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    monkeypatch.chdir(work)
    assert resume()[0] == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data_id"] == load_prepared(data).identity


@pytest.mark.parametrize("argv, command, close", [
    (["train", "--rnak", "4"], "train", "--rank"),
    (["train", "--warmstart-steps=5"], "train", "--warm-start-steps"),
    (["eval", "--model", "m", "--data", "d", "--eval-tokns", "9"], "eval", "--eval-tokens"),
    (["export", "a", "b", "--overwirte"], "export", "--overwrite"),
    (["train", "--zzzzzz"], "train", None),
])
def test_flag_typo_prints_the_subcommands_usage_and_the_closest_flag(argv, command, close, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: relora {command} " in err and "unrecognized arguments" in err
    assert (f"did you mean {close}?" in err) if close else ("did you mean" not in err)


@pytest.mark.parametrize("extra, message", [
    (["--data", "{tmp}/no-such-data"], "no-such-data does not exist"),
    (["--data", "{tmp}"], "not a prepared dataset"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--steps", "100000"], "--sampling random"),
])
def test_data_and_device_errors_come_before_the_config_dump(extra, message, tiny_config, tmp_path, capsys,
                                                           monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = [e.format(tmp=tmp_path) for e in extra]
    assert main(train_args(tiny_config, tmp_path / "run", *extra)) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()] and message in captured.err
    assert "config:" not in captured.out + captured.err and "batch_tokens" not in captured.out + captured.err
    assert not (tmp_path / "run").exists()


def test_prepare_train_export_eval_stderr_has_no_noise(tiny_config, tmp_path):
    """What reaches a user's terminal: relora's own lines, not transformers' or bitsandbytes' internals."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src"), "OMP_NUM_THREADS": "1"}
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i}.txt").write_text(f"document {i}: " + "words to tokenize, and more words " * (i + 5))

    def relora(*argv):
        result = subprocess.run([sys.executable, "-m", "relora", *map(str, argv)], capture_output=True, text=True,
                                env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    prepared = relora("prepare", corpus, "--out", tmp_path / "data", "--vocab-size", "300", "--no-progress")
    lines = (prepared.stdout + prepared.stderr).splitlines()
    assert len([line for line in lines if line.startswith("prepared ")]) == 1, lines
    runs = [prepared,
            relora("train", "--config", tiny_config, "--data", tmp_path / "data", "--out", tmp_path / "run",
                   "--steps", "12", "--eval-every", "6", "--save-every", "6"),
            relora("export", tmp_path / "run", tmp_path / "export"),
            relora("eval", "--model", tmp_path / "run" / "final", "--data", tmp_path / "data", "--seq-len", "32",
                   "--eval-tokens", "512")]
    for result in runs:
        for noise in ("Writing model shards", "Loading weights", "kernels", "pin_memory", "Warning", "warn"):
            assert noise not in result.stderr, result.stderr


def test_help_imports_no_torch():
    """`relora --help` and a subcommand's help answer without loading torch, peft or transformers (issue 19)."""
    probe = ("import sys\nfrom relora.cli import main\nfor argv in (['--help'], ['train', '--help'], ['prepare', "
             "'--help'], ['bench', '--help']):\n    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr


def test_public_api_is_importable_as_before():
    import relora

    expected = {"ReLoRAConfig", "wrap", "merge_and_reinit", "prune_optimizer_state", "jagged_cosine", "ReLoRA",
                "unwrap", "ReLoRACallback", "jagged_cosine_scheduler", "merged", "adapter_parameters", "StepEvent"}
    assert expected <= set(relora.__all__) and expected <= set(dir(relora))
    from relora import ReLoRACallback, ReLoRAConfig, wrap  # noqa: F401

    assert relora.wrap.__module__ == "relora.core.adapters" and relora.ReLoRAConfig().r == 128
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        relora.nope  # noqa: B018
