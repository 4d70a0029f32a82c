"""Bad inputs to every ``relora`` command, table-driven (issue 7, reliability).

Each case runs against realistic existing state: a prepared data directory and
a finished run with checkpoints (made once per module). The command must exit
with 2 and one ``relora: error:`` line naming the problem, no traceback, no
log lines, and leave every existing file byte-identical: nothing added (no
temporary leftovers, no new output directory), removed or changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import TINY_MODEL, one_thread, run_config

from relora.cli import main


@dataclass
class World:
    """Existing state shared by the module (``root``) and each case's own scratch directory (``tmp``)."""

    root: Path
    data: Path  # prepared data directory
    run: Path  # finished relora run: config.yaml, metrics.jsonl, checkpoints/step_2, step_4, reference/, final/
    config: Path  # a train config YAML of the run's settings
    corpus: Path  # a small corpus of text files (other than the one behind ``data``)
    tmp: Path

    def scratch(self, name: str) -> Path:
        return self.tmp / name

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def config_plus(self, name: str, text: str) -> Path:
        """The run's train config with the settings of the YAML ``text`` replaced or added."""
        values = {**yaml.safe_load(self.config.read_text()), **yaml.safe_load(text)}
        return self.write(name, yaml.safe_dump(values))

    def dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def copy(self, source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, self.tmp / name))

    def small_vocab_model(self) -> Path:
        """A Hugging Face LLaMA whose embedding (16 tokens) is smaller than the data's vocabulary."""
        from transformers import LlamaConfig, LlamaForCausalLM

        path = self.tmp / "small_vocab_model"
        LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     num_hidden_layers=1, max_position_embeddings=64)).save_pretrained(path)
        return path

    def damaged_run(self, config_text: str) -> Path:
        """A copy of the run whose config.yaml reads ``config_text``."""
        copy = self.tmp / "damaged_run"
        shutil.copytree(self.run, copy)
        (copy / "config.yaml").write_text(config_text)
        return copy


RUN_SETTINGS = dict(steps=4, warmup_steps=1, warm_start_steps=2, reset_every=2, restart_warmup_steps=1,
                    save_every=2, eval_every=0, eval_tokens=256)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prepared_data) -> World:
    from relora.train import train

    root = tmp_path_factory.mktemp("bad_inputs")
    data = root / "data"
    shutil.copytree(prepared_data, data)
    run = root / "run"
    with one_thread():
        train(run_config(data, run, **RUN_SETTINGS), progress=False)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=TINY_MODEL, data=str(data), rank=4, alpha=8, batch_tokens=256, micro_batch=4, seq_len=32,
        log_every=1, device="cpu", **RUN_SETTINGS)))
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"another corpus, document {i}\n" * 20)
    return World(root, data, run, config, corpus, root)


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and directory under ``roots``, hidden ones included: path -> sha256 (or "dir")."""
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                found[str(Path(dirpath, name))] = "dir"
            for name in filenames:
                path = Path(dirpath, name)
                found[str(path)] = "link" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str]]:
    return {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(p for p in set(before) & set(after) if before[p] != after[p]),
    }


@dataclass
class Case:
    id: str
    argv: Callable[[World], list]
    message: str  # a distinctive substring of the error line
    usage: bool = False  # an argparse-level error: SystemExit(2) and argparse's own message


def train(w: World, *flags) -> list:
    return ["train", "--config", w.config, "--out", w.scratch("new_run"), "--no-progress", *flags]


CASES = [
    # ------------------------------------------------------------ prepare
    Case("prepare-missing-input", lambda w: ["prepare", "--no-progress", w.scratch("nope"), "--out", w.scratch("out")],
         "input path"),
    Case("prepare-empty-dir", lambda w: ["prepare", "--no-progress", w.dir("empty"), "--out", w.scratch("out")],
         "no supported files found"),
    Case("prepare-only-empty-documents",
         lambda w: ["prepare", "--no-progress", w.write("blank/a.txt", "  \n").parent, "--out", w.scratch("new/deeper/out")],
         "no usable documents"),
    Case("prepare-unsupported-file", lambda w: ["prepare", "--no-progress", w.write("x.bin", "abc"), "--out", w.scratch("out")],
         "unsupported type"),
    Case("prepare-into-existing-data-without-overwrite", lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.data],
         "--overwrite"),
    Case("prepare-into-existing-run-dir", lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.run],
         "relora did not write"),
    Case("prepare-overwrite-into-run-dir", lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.run,
                                                      "--overwrite"], "relora did not write"),
    Case("prepare-overwrite-into-its-input", lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.corpus,
                                                        "--overwrite"], "this command's input"),
    Case("prepare-val-fraction-above-range",
         lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.scratch("out"), "--val-fraction", "1.5"], "val_fraction"),
    Case("prepare-val-fraction-negative",
         lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.scratch("out"), "--val-fraction", "-0.1"], "val_fraction"),
    Case("prepare-vocab-size-zero",
         lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.scratch("out"), "--vocab-size", "0"], "vocab_size"),
    Case("prepare-empty-text-field",
         lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.scratch("out"), "--text-field", ""], "text_field"),
    Case("prepare-missing-tokenizer",
         lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.scratch("out"), "--tokenizer", w.scratch("tok")],
         "tokenizer path"),
    Case("prepare-vocab-size-not-int", lambda w: ["prepare", "--no-progress", w.corpus, "--out", w.scratch("out"),
                                                  "--vocab-size", "big"], "--vocab-size", usage=True),
    # ------------------------------------------------------------ train: presets and config files
    Case("train-unknown-preset", lambda w: train(w, "--preset", "tinyy"), "did you mean 'tiny'?"),
    Case("train-config-typo-key",
         lambda w: train(w, "--config", w.config_plus("typo.yaml", "reset_evry: 2\n")), "did you mean 'reset_every'?"),
    Case("train-config-missing", lambda w: train(w, "--config", w.scratch("missing.yaml")), "does not exist"),
    Case("train-config-invalid-yaml", lambda w: train(w, "--config", w.write("bad.yaml", "steps: [1,\n")),
         "not valid YAML"),
    Case("train-config-a-list", lambda w: train(w, "--config", w.write("list.yaml", "- steps\n- 4\n")),
         "must hold a mapping"),
    Case("train-config-a-directory", lambda w: train(w, "--config", w.dir("confdir")), "does not exist"),
    Case("train-config-non-string-key", lambda w: train(w, "--config", w.config_plus("int.yaml", "1: 2\n")),
         "unknown setting"),
    Case("train-config-model-not-a-mapping",
         lambda w: train(w, "--config", w.config_plus("model.yaml", "model: 32\n")), "model"),
    Case("train-config-model-typo-key",
         lambda w: train(w, "--config", w.config_plus("arch.yaml", "model: {hidden_sise: 32}\n")),
         "did you mean 'hidden_size'?"),
    Case("train-config-steps-not-a-number", lambda w: train(w, "--config", w.config_plus("s.yaml", "steps: ten\n")),
         "steps"),
    Case("train-config-lr-not-a-number", lambda w: train(w, "--config", w.config_plus("lr.yaml", "lr: fast\n")), "lr"),
    Case("train-config-alpha-not-a-number",
         lambda w: train(w, "--config", w.config_plus("alpha.yaml", "alpha: big\n")), "alpha"),
    Case("train-config-prune-ratio-not-a-number",
         lambda w: train(w, "--config", w.config_plus("pr.yaml", "prune_ratio: most\n")), "prune_ratio"),
    Case("train-config-restart-warmup-not-a-number",
         lambda w: train(w, "--config", w.config_plus("rw.yaml", "restart_warmup_steps: some\n")), "restart_warmup_steps"),
    Case("train-config-target-modules-not-a-list",
         lambda w: train(w, "--config", w.config_plus("tm.yaml", "target_modules: 5\n")), "target_modules"),
    # ------------------------------------------------------------ train: flags
    Case("train-rank-zero", lambda w: train(w, "--rank", "0"), "rank must be a positive integer"),
    Case("train-prune-ratio-1.5", lambda w: train(w, "--prune-ratio", "1.5"), "prune_ratio"),
    Case("train-prune-bogus", lambda w: train(w, "--prune", "bogus"), "prune must be one of"),
    Case("train-method-bogus", lambda w: train(w, "--method", "bogus"), "unknown method 'bogus'"),
    Case("train-steps-zero", lambda w: train(w, "--steps", "0"), "steps must be a positive integer"),
    Case("train-micro-batch-not-dividing", lambda w: train(w, "--micro-batch", "3"), "micro_batch (3) must divide"),
    Case("train-lr-negative", lambda w: train(w, "--lr", "-1"), "relora_lr must be > 0"),
    Case("train-lr-negative-full", lambda w: train(w, "--method", "full", "--lr", "-1"), "lr must be > 0"),
    Case("train-alpha-zero", lambda w: train(w, "--alpha", "0"), "alpha must be > 0"),
    Case("train-warm-start-not-before-end", lambda w: train(w, "--warm-start-steps", "4"), "warm_start_steps"),
    Case("train-merge-every-not-dividing", lambda w: train(w, "--method", "online-relora", "--merge-every", "3"),
         "merge_every (3) must divide reset_every (2)"),
    Case("train-online-without-merge-every", lambda w: train(w, "--method", "online-relora"), "--merge-every"),
    Case("train-seq-len-not-dividing-batch", lambda w: train(w, "--seq-len", "100"), "multiple of seq_len"),
    Case("train-seq-len-beyond-data",
         lambda w: train(w, "--seq-len", "65536", "--batch-tokens", "65536", "--micro-batch", "1"),
         "too few for windows"),
    Case("train-steps-beyond-data", lambda w: train(w, "--steps", "1000000"), "--sampling random"),
    Case("train-sampling-bogus", lambda w: train(w, "--sampling", "bogus"), "sampling"),
    Case("train-eval-every-negative", lambda w: train(w, "--eval-every", "-1"), "eval_every"),
    Case("train-dist-timeout-zero", lambda w: train(w, "--dist-timeout-s", "0"), "dist_timeout_s"),
    Case("train-distributed-bogus", lambda w: train(w, "--distributed", "bogus"), "distributed must be one of"),
    Case("train-device-bogus", lambda w: train(w, "--device", "gpu0"), "unknown device 'gpu0'"),
    Case("train-on-bad-steps-bogus", lambda w: train(w, "--on-bad-steps", "ignore"), "on_bad_steps must be"),
    Case("train-max-bad-steps-negative", lambda w: train(w, "--max-bad-steps", "-1"), "max_bad_steps"),
    Case("train-quantize-bogus", lambda w: train(w, "--quantize", "int4"), "int4"),
    Case("train-steps-not-int", lambda w: train(w, "--steps", "many"), "--steps", usage=True),
    Case("train-unknown-flag", lambda w: train(w, "--rnak", "4"), "--rnak", usage=True),
    # ------------------------------------------------------------ train: data and paths
    Case("train-data-missing", lambda w: train(w, "--data", w.scratch("nodata")), "does not exist"),
    Case("train-data-not-prepared", lambda w: train(w, "--data", w.corpus), "not a prepared dataset"),
    Case("train-data-is-a-run", lambda w: train(w, "--data", w.run), "not a prepared dataset"),
    Case("train-into-existing-run", lambda w: train(w, "--out", w.run), "--resume"),
    Case("train-out-is-a-file", lambda w: train(w, "--out", w.write("file", "x")), "not a directory"),
    Case("train-init-from-missing", lambda w: train(w, "--init-from", w.scratch("nomodel")), "does not exist"),
    Case("train-init-from-not-a-model", lambda w: train(w, "--init-from", w.data), "not a model directory"),
    Case("train-init-from-smaller-vocab", lambda w: train(w, "--init-from", w.small_vocab_model()),
         "larger than the model's embedding"),
    Case("train-resume-different-rank", lambda w: train(w, "--out", w.run, "--resume", "--rank", "8"),
         "different rank"),
    Case("train-resume-different-method", lambda w: train(w, "--out", w.run, "--resume", "--method", "lora"),
         "different method"),
    Case("train-resume-bad-flag", lambda w: train(w, "--out", w.run, "--resume", "--prune-ratio", "2"),
         "prune_ratio"),
    Case("train-resume-config-typo", lambda w: train(w, "--out", w.run, "--resume", "--config",
                                                     w.config_plus("typo.yaml", "reset_evry: 2\n")),
         "did you mean 'reset_every'?"),
    Case("train-resume-config-different-rank", lambda w: train(w, "--out", w.run, "--resume", "--config",
                                                               w.config_plus("rank.yaml", "rank: 8\n")),
         "different rank"),
    Case("train-resume-without-out-and-no-runs",
         lambda w: ["train", "--config", w.config, "--resume", "--no-progress"], "no run of preset"),
    Case("train-resume-no-run", lambda w: train(w, "--out", w.dir("empty_run"), "--resume"), "no run to resume"),
    Case("train-resume-missing-dir", lambda w: train(w, "--out", w.scratch("absent"), "--resume"),
         "no run to resume"),
    Case("train-resume-the-data-dir", lambda w: train(w, "--out", w.data, "--resume"), "no run to resume"),
    Case("train-resume-damaged-config",
         lambda w: train(w, "--out", w.damaged_run("steps: [4,\n"), "--resume"), "config.yaml"),
    Case("train-resume-config-unknown-key",
         lambda w: train(w, "--out", w.damaged_run(
             (w.run / "config.yaml").read_text() + "reset_evry: 2\n"), "--resume"), "did you mean 'reset_every'?"),
    Case("train-resume-config-not-a-mapping",
         lambda w: train(w, "--out", w.damaged_run("- 1\n"), "--resume"), "config.yaml"),
    # ------------------------------------------------------------ eval
    Case("eval-missing-model", lambda w: ["eval", "--model", w.scratch("nomodel"), "--data", w.data,
                                          "--device", "cpu"], "does not exist"),
    Case("eval-missing-data", lambda w: ["eval", "--model", w.run / "final", "--data", w.scratch("nodata"),
                                         "--device", "cpu"], "does not exist"),
    Case("eval-data-not-prepared", lambda w: ["eval", "--model", w.run / "final", "--data", w.corpus,
                                              "--device", "cpu"], "not a prepared dataset"),
    Case("eval-model-is-data", lambda w: ["eval", "--model", w.data, "--data", w.data, "--device", "cpu"],
         "not a model directory"),
    Case("eval-seq-len-zero", lambda w: ["eval", "--model", w.run / "final", "--data", w.data, "--seq-len", "0",
                                         "--device", "cpu"], "seq-len"),
    Case("eval-seq-len-beyond-data", lambda w: ["eval", "--model", w.run / "final", "--data", w.data,
                                                "--seq-len", "1000000", "--device", "cpu"], "too few for windows"),
    Case("eval-micro-batch-zero", lambda w: ["eval", "--model", w.run / "final", "--data", w.data,
                                             "--micro-batch", "0", "--device", "cpu"], "micro-batch"),
    Case("eval-eval-tokens-zero", lambda w: ["eval", "--model", w.run / "final", "--data", w.data,
                                             "--eval-tokens", "0", "--device", "cpu"], "eval-tokens"),
    Case("eval-device-bogus", lambda w: ["eval", "--model", w.run / "final", "--data", w.data,
                                         "--device", "gpu0"], "unknown device 'gpu0'"),
    Case("eval-data-vocab-larger-than-model", lambda w: ["eval", "--model", w.small_vocab_model(), "--data", w.data,
                                                        "--device", "cpu"], "larger than the model's embedding"),
    Case("eval-without-model", lambda w: ["eval", "--data", w.data], "--model", usage=True),
    # ------------------------------------------------------------ export
    Case("export-missing-checkpoint", lambda w: ["export", w.scratch("nockpt"), w.scratch("out")],
         "neither a checkpoint"),
    Case("export-data-dir", lambda w: ["export", w.data, w.scratch("out")], "neither a checkpoint"),
    Case("export-into-non-empty-out", lambda w: ["export", w.run, w.data], "relora never deletes it"),
    Case("export-overwrite-into-data", lambda w: ["export", w.run, w.data, "--overwrite"], "not a dense model"),
    Case("export-into-run-final", lambda w: ["export", w.run / "checkpoints" / "step_2", w.run / "final"],
         "--overwrite"),
    Case("export-over-its-own-run", lambda w: ["export", w.run / "checkpoints" / "step_4", w.run, "--overwrite"],
         "holds the checkpoint being exported"),
    Case("export-over-its-own-checkpoint", lambda w: ["export", w.run / "checkpoints" / "step_4",
                                                      w.run / "checkpoints" / "step_4", "--overwrite"],
         "holds the checkpoint being exported"),
    Case("export-run-over-itself", lambda w: ["export", w.run, w.run, "--overwrite"],
         "holds the checkpoint being exported"),
    Case("export-out-is-a-file", lambda w: ["export", w.run, w.run / "config.yaml"], "not a directory"),
    # ------------------------------------------------------------ analyze
    Case("analyze-missing-path", lambda w: ["analyze", w.scratch("norun")], "does not exist"),
    Case("analyze-labels-mismatch", lambda w: ["analyze", w.run, "--labels", "a,b"], "--labels has 2 names"),
    Case("analyze-no-model", lambda w: ["analyze", w.data], "holds no model"),
    Case("analyze-missing-reference", lambda w: ["analyze", w.run, "--reference", w.scratch("noref")],
         "does not exist"),
    Case("analyze-threshold-zero", lambda w: ["analyze", w.run, "--threshold", "0"], "threshold"),
    Case("analyze-model-without-reference", lambda w: ["analyze", w.copy(w.run / "final", "model"), "--out",
                                                       w.scratch("an")], "no reference weights"),
    # ------------------------------------------------------------ plot
    Case("plot-not-a-run", lambda w: ["plot", w.data], "not a run directory"),
    Case("plot-missing-dir", lambda w: ["plot", w.scratch("norun")], "not a run directory"),
    Case("plot-labels-mismatch", lambda w: ["plot", w.run, "--labels", "a,b,c"], "--labels has 3 names"),
    # ------------------------------------------------------------ compare
    Case("compare-bad-set", lambda w: ["compare", "--set", "some", "--out", w.scratch("cmp")], "--set",
         usage=True),
    Case("compare-unknown-preset", lambda w: ["compare", "--preset", "tinyy", "--out", w.scratch("cmp")],
         "did you mean 'tiny'?"),
    Case("compare-config-typo", lambda w: ["compare", "--config", w.write("typo.yaml", "rnak: 4\n"),
                                           "--out", w.scratch("cmp")], "did you mean 'rank'?"),
    Case("compare-steps-zero", lambda w: ["compare", "--config", w.config, "--steps", "0",
                                          "--out", w.scratch("cmp")], "steps must be a positive integer"),
    Case("compare-missing-data", lambda w: ["compare", "--config", w.config, "--data", w.scratch("nodata"),
                                            "--out", w.scratch("cmp")], "does not exist"),
    # ------------------------------------------------------------ bench
    Case("bench-unknown-preset", lambda w: ["bench", "--preset", "tinyy", "--device", "cpu"], "did you mean 'tiny'?"),
    Case("bench-methods-bogus", lambda w: ["bench", "--methods", "bogus", "--device", "cpu", "--no-memory"],
         "unknown bench method 'bogus'"),
    Case("bench-methods-bogus-explain", lambda w: ["bench", "--methods", "full,bogus", "--explain"],
         "unknown bench method 'bogus'"),
    Case("bench-rank-zero", lambda w: ["bench", "--rank", "0", "--device", "cpu", "--explain"], "--rank"),
    Case("bench-seq-len-zero", lambda w: ["bench", "--seq-len", "0", "--device", "cpu", "--explain"], "--seq-len"),
    Case("bench-repeats-zero", lambda w: ["bench", "--repeats", "0", "--device", "cpu", "--no-memory"], "--repeats"),
    Case("bench-frozen-dtype-bogus", lambda w: ["bench", "--frozen-dtype", "int8", "--device", "cpu"],
         "--frozen-dtype"),
    Case("bench-max-micro-batch-on-cpu", lambda w: ["bench", "--device", "cpu", "--max-micro-batch", "--no-memory"],
         "needs a CUDA device"),
    Case("bench-device-bogus", lambda w: ["bench", "--device", "gpu0", "--no-memory"], "unknown device 'gpu0'"),
    # ------------------------------------------------------------ finetune
    Case("finetune-missing-file", lambda w: ["finetune", w.scratch("train.csv"), "--model", w.run / "final",
                                             "--out", w.scratch("ft")], "does not exist"),
    Case("finetune-unsupported-file", lambda w: ["finetune", w.write("train.txt", "a\n"), "--model", w.run / "final",
                                                 "--out", w.scratch("ft")], "unsupported file type"),
    Case("finetune-missing-model", lambda w: ["finetune", w.write("train.csv", "text,label\na,0\nb,1\nc,0\n"),
                                              "--model", w.scratch("nomodel"), "--out", w.scratch("ft")],
         "does not exist"),
    Case("finetune-rank-zero", lambda w: ["finetune", w.write("train.csv", "text,label\na,0\nb,1\n"), "--model",
                                          w.run / "final", "--out", w.scratch("ft"), "--rank", "0"], "rank"),
    Case("finetune-out-not-empty", lambda w: ["finetune", w.write("train.csv", "text,label\na,0\nb,1\nc,1\n"),
                                              "--model", w.run / "final", "--out", w.run], "not empty"),
    Case("finetune-out-is-a-file", lambda w: ["finetune", w.write("train.csv", "text,label\na,0\nb,1\nc,1\n"),
                                              "--model", w.run / "final", "--out", w.run / "config.yaml"],
         "not a directory"),
    Case("finetune-device-bogus", lambda w: ["finetune", w.write("train.csv", "text,label\na,0\nb,1\n"), "--model",
                                             w.run / "final", "--out", w.scratch("ft"), "--device", "gpu0"],
         "unknown device 'gpu0'"),
    Case("finetune-method-bogus", lambda w: ["finetune", w.write("train.csv", "text,label\na,0\n"), "--model",
                                             w.run / "final", "--out", w.scratch("ft"), "--method", "full"],
         "--method", usage=True),
]


@pytest.fixture
def world(workspace, tmp_path, monkeypatch) -> World:
    monkeypatch.chdir(tmp_path)  # default outputs (runs/, analysis/, loss.png, comparison/) land here
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # and the default corpus' cache: nothing may appear
    return World(workspace.root, workspace.data, workspace.run, workspace.config, workspace.corpus, tmp_path)


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly_and_touches_nothing(case, world, capsys, caplog):
    argv = [str(a) for a in case.argv(world)]  # builds the case's own scratch inputs first
    before = snapshot(world.root, world.tmp)
    capsys.readouterr()
    caplog.set_level(logging.INFO)  # the CLI logs INFO to stderr: a clean failure logs nothing
    with one_thread():
        if case.usage:
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            code = exit_info.value.code
        else:
            code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = err.strip().splitlines()
    if case.usage:  # argparse: usage lines, then `relora COMMAND: error: ...`
        assert lines and re.match(r"relora( \w+)?: error: ", lines[-1]), err
        assert case.message in lines[-1], err
    else:
        assert len(lines) == 1, err
        assert lines[0].startswith("relora: error:"), err
        assert case.message in lines[0], err
        logged = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records]
        assert not logged, logged
    assert changes(before, snapshot(world.root, world.tmp)) == changes(before, before)


def test_real_process_stderr_is_one_line(workspace, tmp_path):
    """The same contract seen from outside: logging configured as the console script does it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    before = snapshot(workspace.root)
    result = subprocess.run(
        [sys.executable, "-m", "relora", "train", "--config", str(workspace.config), "--out", str(workspace.run),
         "--rank", "0"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["relora: error: rank must be a positive integer, got 0"]
    assert snapshot(workspace.root) == before
