"""--overwrite never deletes what relora did not write (issue 15, section 1: a data-loss path).

A new user's trial: `relora train --data RAW_TEXT_DIR` hinted `relora prepare --out RAW_TEXT_DIR`, then
`--overwrite`, and the corpus was gone. Each path that can replace a directory (prepare, export, finetune)
is run here against a directory of user files, which must stay byte-identical.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import one_thread, run_config
from test_bad_inputs import snapshot

from relora.cli import main
from relora.fileio import ownership


def user_corpus(root: Path) -> Path:
    """A directory of a user's text files, some without an extension, one in a subdirectory."""
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"notes{i}.txt").write_text(f"my own notes, file {i}\n" * 30)
    (root / "README").write_text("a file without an extension\n" * 10)
    (root / "sub").mkdir()
    (root / "sub" / "draft.md").write_text("# draft\n" + "text " * 100)
    return root


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    with one_thread():
        code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prepared_data) -> Path:
    from relora.train import train

    run = tmp_path_factory.mktemp("overwrite") / "run"
    with one_thread():
        train(run_config(prepared_data, run, steps=4, warmup_steps=1, warm_start_steps=2, reset_every=2,
                         restart_warmup_steps=1, save_every=2, eval_every=0, eval_tokens=256), progress=False)
    return run


def test_following_the_hints_never_deletes_the_corpus(tmp_path, capsys, monkeypatch):
    """The trial's exact path: train on raw text, follow the hint, then try --overwrite on the corpus."""
    monkeypatch.chdir(tmp_path)
    corpus = user_corpus(tmp_path / "my corpus")
    before = snapshot(corpus)

    code, err = run_cli(capsys, "train", "--data", corpus, "--preset", "tiny", "--no-progress")
    assert code == 2 and "not a prepared dataset" in err
    hint = re.search(r"`(relora prepare [^`]+)`", err).group(1)
    argv = shlex.split(hint)[1:]
    assert Path(argv[argv.index("--out") + 1]) != corpus, "the hint must name a new directory"
    code, err = run_cli(capsys, *argv, "--vocab-size", "300", "--val-fraction", "0.3", "--no-progress")
    assert code == 0, err
    assert snapshot(corpus) == before

    code, err = run_cli(capsys, "prepare", corpus, "--out", corpus, "--overwrite", "--no-progress")
    assert code == 2 and "input" in err and "never deletes" in err, err
    assert snapshot(corpus) == before


@pytest.mark.parametrize("inside", [False, True])
def test_prepare_overwrite_refuses_a_directory_of_user_files(tmp_path, capsys, inside):
    """Not the input of the command, or a folder above it: still the user's, still untouched."""
    source = user_corpus(tmp_path / "source")
    target = user_corpus(tmp_path / "target")
    if inside:  # the output is a folder that holds the input
        shutil.move(source, target / "source")
        source = target / "source"
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "prepare", source, "--out", target, "--overwrite", "--no-progress")
    assert code == 2 and "never deletes" in err, err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_prepare_overwrite_replaces_its_own_dataset_but_not_one_with_user_files(tmp_path, capsys, prepared_data):
    corpus = user_corpus(tmp_path / "corpus")
    out = tmp_path / "prepared"
    flags = ["--vocab-size", "300", "--val-fraction", "0.3", "--no-progress"]
    assert run_cli(capsys, "prepare", corpus, "--out", out, *flags)[0] == 0
    assert (out / ownership.MARKER).is_file()
    code, err = run_cli(capsys, "prepare", corpus, "--out", out, "--seed", "1", "--overwrite", *flags)
    assert code == 0, err  # relora's own dataset with other settings: replaced

    (out / "my_results.csv").write_text("precious\n")
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "prepare", corpus, "--out", out, "--seed", "2", "--overwrite", *flags)
    assert code == 2 and "my_results.csv" in err, err
    assert snapshot(tmp_path) == before


def test_a_dataset_prepared_before_markers_is_still_replaceable(tmp_path, prepared_data):
    legacy = Path(shutil.copytree(prepared_data, tmp_path / "legacy"))
    (legacy / ownership.MARKER).unlink()
    assert ownership.why_not_replaceable(legacy, ownership.PREPARED) is None
    (legacy / "extra.txt").write_text("user file\n")
    assert "extra.txt" in ownership.why_not_replaceable(legacy, ownership.PREPARED)


def test_export_overwrite_refuses_user_files_and_a_foreign_model(tmp_path, capsys, finished_run):
    from transformers import LlamaConfig, LlamaForCausalLM

    notes = user_corpus(tmp_path / "notes")
    own_model = tmp_path / "my_model"  # a Hugging Face model the user saved: not relora's to replace
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_hidden_layers=1)).save_pretrained(own_model)
    for out in (notes, own_model):
        before = snapshot(tmp_path)
        code, err = run_cli(capsys, "export", finished_run, out, "--overwrite")
        assert code == 2 and "never deletes" in err, err
        assert snapshot(tmp_path) == before

    export = tmp_path / "export"
    assert run_cli(capsys, "export", finished_run / "checkpoints" / "step_2", export)[0] == 0
    code, err = run_cli(capsys, "export", finished_run, export)
    assert code == 2 and "--overwrite" in err, err
    assert run_cli(capsys, "export", finished_run, export, "--overwrite")[0] == 0  # its own export: replaced
    (export / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "export", finished_run, export, "--overwrite")
    assert code == 2 and "notes.txt" in err, err
    assert snapshot(tmp_path) == before


def test_finetune_into_user_files_leaves_them_untouched(tmp_path, capsys, finished_run):
    notes = user_corpus(tmp_path / "notes")
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"example {i},{i % 2}\n" for i in range(8)))
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "finetune", data, "--model", finished_run / "final", "--out", notes)
    assert code == 2, err
    assert snapshot(tmp_path) == before


def test_save_dense_refuses_to_replace_what_relora_did_not_write(tmp_path):
    from relora.errors import ConfigError
    from relora.run.export import save_dense

    notes = user_corpus(tmp_path / "notes")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="never deletes"):
        save_dense(object(), None, notes)  # refused before the model is touched
    assert snapshot(tmp_path) == before
