"""The ``relora`` command line: one subparser per command.

The flags of ``train``, ``compare``, ``finetune`` and ``bench`` are generated
from the fields of TrainConfig, FinetuneConfig and BenchSetup / BenchOptions
(relora.cli.flags); only each command's own flags are written here.
"""

from __future__ import annotations

import argparse

from relora import __version__
from relora.analysis.bench_setup import BenchOptions, BenchSetup
from relora.cli.flags import add_setting_flags, float_list, names
from relora.cli.tools import (
    cmd_analyze,
    cmd_bench,
    cmd_eval,
    cmd_export,
    cmd_plot,
    cmd_prepare,
)
from relora.cli.training import cmd_compare, cmd_finetune, cmd_train
from relora.finetune.config import FinetuneConfig
from relora.run.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    """The ``relora`` parser: a subparser per command, its ``func`` the command to call."""
    parser = argparse.ArgumentParser(prog="relora", description="ReLoRA: high-rank training through low-rank updates")
    parser.add_argument("--version", action="version", version=f"relora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prepare, _add_train, _add_finetune, _add_eval, _add_export, _add_analyze, _add_plot,
                _add_compare, _add_bench):  # in --help's order
        add(sub)
    return parser


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    """``relora prepare``."""
    p = sub.add_parser("prepare", help="tokenize a corpus into a training-ready directory",
                       description="Tokenize text files, JSONL/Parquet or a HF dataset into token arrays.")
    p.add_argument("inputs", nargs="*", help="files, directories or a dataset name (default: --corpus)")
    p.add_argument("--corpus", default="stdlib", choices=["stdlib", "site-packages"],
                   help="built-in corpus when no inputs are given: the Python stdlib's sources (~3M tokens), or "
                        "site-packages: the installed packages' sources (~190 MB here; versions in meta.json)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", help="existing tokenizer.json or tokenizer directory (default: train a BPE)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out for validation")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="fraction of documents held out for the test split, disjoint from validation "
                        "(default: the validation fraction; 0: none)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSON/Parquet records")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset that relora prepared in OUT (never a directory with other files)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``relora train``."""
    t = sub.add_parser("train", help="pretrain a model with full-rank, LoRA or ReLoRA",
                       description="Train a LLaMA-style model; flags override --config, which overrides --preset.",
                       argument_default=argparse.SUPPRESS)
    t.add_argument("--config", default=None, help="YAML file of settings (flags override it)")
    add_setting_flags(t, TrainConfig)
    t.add_argument("--resume", action="store_true", default=False, help="continue the latest checkpoint of --out")
    t.add_argument("--no-progress", action="store_true", default=False, help="no progress bar")
    t.set_defaults(func=cmd_train)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    """``relora finetune``."""
    f = sub.add_parser("finetune", help="fine-tune a classifier with LoRA or ReLoRA (GLUE-style)",
                       description="Fine-tune a local model directory as a sequence classifier on a CSV, TSV or "
                                   "JSONL file of text,label or text_a,text_b,label rows; report accuracy, F1 and "
                                   "Matthews correlation; write OUT/metrics.json and the merged model OUT/model.",
                       argument_default=argparse.SUPPRESS)
    add_setting_flags(f, FinetuneConfig)
    f.add_argument("--no-progress", action="store_true", default=False, help="no transformers progress bars")
    f.set_defaults(func=cmd_finetune)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """``relora eval``."""
    e = sub.add_parser("eval", help="validation loss and perplexity of a model",
                       description="Validation loss and perplexity of a model on prepared data. A model from a "
                                   "run (RUN/final, RUN/reference or a checkpoint) is evaluated with the run's "
                                   "--seq-len, --eval-tokens and --micro-batch unless given, so evaluating RUN/final "
                                   "on the run's data reproduces the val_ppl of RUN/summary.json. Data prepared with "
                                   "another tokenizer than the model's is refused.")
    e.add_argument("--model", required=True, help="Hugging Face model directory or relora checkpoint")
    e.add_argument("--data", required=True, help="prepared data directory")
    e.add_argument("--seq-len", type=int, help="sequence length (default: the run's, else 256)")
    e.add_argument("--eval-tokens", type=int, help="validation tokens to evaluate (default: the run's, else 1,000,000)")
    e.add_argument("--micro-batch", type=int, help="sequences per forward pass (default: the run's, else 16)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda")
    e.set_defaults(func=cmd_eval)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``relora export``."""
    x = sub.add_parser("export", help="write a checkpoint as a plain Hugging Face model (adapters merged)")
    x.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint directory (checkpoints/step_N) or a run directory (latest)")
    x.add_argument("out", metavar="OUT", help="output directory")
    x.add_argument("--overwrite", action="store_true",
                   help="replace a model that relora exported into OUT (never a directory with other files)")
    x.set_defaults(func=cmd_export)


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    """``relora analyze``."""
    a = sub.add_parser("analyze", help="singular values of the update dW = W - W_reference, as JSON and figures",
                       description="Spectra of dW per matrix type (q, k, v, o, gate, up, down), like the paper's "
                                   "Figures 3 and 4. Several runs are overlaid.")
    a.add_argument("runs", nargs="+", metavar="RUN_OR_CHECKPOINT",
                   help="run directory (its final/ model), checkpoint or Hugging Face model directory")
    a.add_argument("--reference", help="weights to subtract (default: each run's reference/, end of its warm start)")
    a.add_argument("--out", help="output directory (default: RUN/analysis for one run, else ./analysis)")
    a.add_argument("--threshold", type=float, default=0.1, help="count singular values below this (default 0.1)")
    a.add_argument("--labels", help="comma-separated legend names, one per run (default: run directory names)")
    a.set_defaults(func=cmd_analyze)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    """``relora plot``."""
    pl = sub.add_parser("plot", help="loss and validation-perplexity curves of runs, restarts marked",
                        description="Training loss and validation perplexity of several runs on one figure.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    pl.add_argument("--out", help="PNG file (default: RUN/loss.png for one run, else ./loss.png)")
    pl.add_argument("--labels", help="comma-separated legend names, one per run (default: run directory names)")
    pl.add_argument("--title", help="figure title")
    pl.set_defaults(func=cmd_plot)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    """``relora compare``."""
    c = sub.add_parser("compare", help="run the paper's methods (and Table 6 ablation) with matched budgets",
                       description="Train full, full-ws-lr, control, lora, lora-ws, relora (main set) and the rows "
                                   "of the paper's Table 6, LoRA plus each combination of ReLoRA's components "
                                   "(ablation set), from one config, or ReLoRA with and without warm start "
                                   "beside full, full-ws-lr, full-split-lr, lora-ws, GaLore, APOLLO and APOLLO-mini "
                                   "(baselines set); write tables and figures. Finished runs are reused, unfinished ones "
                                   "resumed.",
                       argument_default=argparse.SUPPRESS)
    c.add_argument("--set", default="all", choices=["main", "ablation", "baselines", "all"],
                   help="which set of runs (default all: main and ablation; baselines needs "
                        "pip install 'relora[baselines]')")
    c.add_argument("--out", default="comparison", help="where tables and figures go (default ./comparison)")
    c.add_argument("--runs", default=None, help="where the run directories go (default OUT/runs)")
    c.add_argument("--config", default=None, help="YAML file of settings shared by every run")
    c.add_argument("--threshold", type=float, default=0.1, help="singular-value threshold of the spectra figure")
    c.add_argument("--methods", type=names, default=None,
                   help="comma-separated rows to run, named as in the tables, e.g. full,relora or relora-no-jagged")
    c.add_argument("--lr", type=float, help="one peak LR for every method's main phase (as relora train --lr)")
    c.add_argument("--lr-grid", type=float_list, default=None,
                   help="comma-separated peak LRs tried per method at the first seed (relora_lr for adapter methods, "
                        "the LR of galore/apollo, lr of full); the lowest final val loss is chosen")
    c.add_argument("--widen-edges", type=int, default=0,
                   help="up to N times, a method whose chosen LR is its grid's largest (smallest) also runs at 3x "
                        "(1/3) that LR at the first seed, before the seeds (default 0: only mark the edge)")
    c.add_argument("--seeds", type=int, default=1, help="seeds run at each method's chosen LR (default 1)")
    c.add_argument("--clip-rule", choices=["published", "same"], default="published",
                   help="published (default): GaLore/APOLLO unclipped as in their scripts, the others at "
                        "--grad-clip; same: every method at --grad-clip")
    add_setting_flags(c, TrainConfig, compare=True)  # not those it sets per run (method, out, LR) or lacks
    c.add_argument("--no-progress", action="store_true", default=False, help="no progress bars")
    c.set_defaults(func=cmd_compare)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``relora bench``."""
    b = sub.add_parser("bench", help="full-rank vs ReLoRA step throughput and memory, against the cost model's bounds",
                       description="Time full-rank and ReLoRA training steps side by side (median after warm-up), "
                                   "measure each method's peak memory in a fresh process, and compare the ratios "
                                   "with the bounds computed from FLOPs and state bytes.",
                       argument_default=argparse.SUPPRESS)
    add_setting_flags(b, BenchSetup, optional=True)  # what is not given: the preset's (BenchSetup.from_preset)
    add_setting_flags(b, BenchOptions)
    b.add_argument("--quantize", metavar="FORMATS", default=None,
                   help="compare ReLoRA with its frozen weights stored as each of these, e.g. none,int8,nf4 "
                        "(needs pip install 'relora[quantize]'); --methods is then ignored")
    b.add_argument("--explain", action="store_true", default=False,
                   help="print the cost model's bounds only; measure nothing")
    b.add_argument("--json", default=None, help="write the results to this JSON file")
    b.set_defaults(func=cmd_bench)
