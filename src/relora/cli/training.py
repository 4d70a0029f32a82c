"""The commands that train: ``relora train``, ``relora compare`` and ``relora finetune``.

Each turns its parsed flags into a config (relora.run.resolve,
relora.finetune.config) and calls the library; torch loads inside the
command, not when the parser is built.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import yaml

from relora.cli.flags import setting_values
from relora.cli.tools import quiet_transformers
from relora.errors import UsageError
from relora.run.config import TrainConfig

logger = logging.getLogger("relora")


def train_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig settings given as flags of ``train`` or ``compare`` (``lr``: the method's peak LR)."""
    return setting_values(args, TrainConfig)


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from relora.run.distributed import env_rank
    from relora.run.inputs import check_inputs
    from relora.run.resolve import new_run_config, resume_config
    from relora.run.summary import finished_summary
    from relora.train import train

    overrides = train_overrides(args)
    lr = overrides.pop("lr", None)
    if args.resume:
        config, changed = resume_config(args.config, overrides, peak_lr=lr)
        done = finished_summary(Path(config.out))
        if done is not None:  # exit 0: the run is where --resume would take it (scripts may resume blindly)
            print(f"{config.out} is finished (it has summary.json): nothing to resume, nothing changed. To train "
                  f"further, start a new run from its model: relora train --init-from {Path(config.out) / 'final'} "
                  "--out NEW")
            print(format_summary(done))
            return 0
        if changed:
            logger.info("resuming with changed settings: %s", ", ".join(changed))
    else:
        config = new_run_config(args.config, overrides, peak_lr=lr)
        if config.data is None:
            config.data = str(_default_corpus(config, progress=not args.no_progress))
        config.validate()
    check_inputs(config)  # a missing dataset or device is the first thing the user reads, not the config dump
    main_rank = env_rank() == 0
    if main_rank:
        print(yaml.safe_dump({"config": config.to_dict()}, sort_keys=False), end="", flush=True)
    if args.no_progress:
        quiet_transformers()
    with logging_redirect_tqdm():
        summary = train(config, resume=args.resume, progress=not args.no_progress)
    if main_rank:
        print(format_summary(summary))
    return 130 if summary.interrupted else 0


def _default_corpus(config: TrainConfig, *, progress: bool) -> Path:
    """Prepare the default corpus once: under torchrun rank 0 prepares it, the others wait for it to appear.

    (No process group exists yet here; the prepared directory appears
    atomically, so waiting for its meta.json is enough.)
    """
    from relora.data import prepare_default_corpus
    from relora.data.preparation import default_data_dir
    from relora.errors import ConfigError
    from relora.run.distributed import env_rank

    if env_rank() == 0:
        return prepare_default_corpus(config.cache_dir, config.vocab_size, progress=progress)
    target = default_data_dir(config.cache_dir, config.vocab_size)
    deadline = time.monotonic() + config.dist_timeout_s
    while not (target / "meta.json").is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"rank 0 did not prepare {target} within {config.dist_timeout_s:.0f} s; "
                              "prepare it first with relora prepare and pass --data")
        time.sleep(1.0)
    return target


def format_summary(s) -> str:
    """A finished (or interrupted) run, as the lines ``relora train`` ends with."""
    ppl = f"{s.val_ppl:.2f}" if s.val_ppl is not None else "n/a"
    lines = [
        "",
        f"run          {s.run_dir}",
        f"method       {s.method}",
        f"steps        {s.steps:,}   tokens {s.tokens:,}   time {s.wall_s:.0f} s",
        f"val ppl      {ppl}" + (f"   (val loss {s.val_loss:.4f})" if s.val_loss is not None else ""),
        *([f"test ppl     {s.test_ppl:.2f}   (test loss {s.test_loss:.4f})"] if s.test_loss is not None else []),
        f"parameters   {s.trainable_params:,} trainable of {s.total_params:,}",
        f"restarts     {s.restarts}   merges {s.merges}",
        f"peak memory  {s.peak_mem_bytes / 2**20:,.0f} MiB   optimizer state {s.optimizer_state_bytes / 2**20:,.2f} MiB"
        + (f" (peak {s.peak_optimizer_state_bytes / 2**20:,.2f} MiB)"
           if s.peak_optimizer_state_bytes > s.optimizer_state_bytes else ""),
    ]
    if s.tokens_per_s:
        lines.append(f"throughput   {s.tokens_per_s:,.0f} tokens/s (training steps only)")
    if s.skipped_steps:
        lines.append(f"skipped      {s.skipped_steps} steps with non-finite loss or gradients")
    if not s.interrupted:
        lines.append(f"model        {s.run_dir / 'final'}  (plain Hugging Face model, last cycle merged)")
    lines += s.notes
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from relora.analysis.compare import compare
    from relora.analysis.compare_procedure import Procedure
    from relora.analysis.compare_sets import PAPER_SETS, READ_ONLY_BY
    from relora.data import prepare_default_corpus
    from relora.run.resolve import resolve_config

    overrides = train_overrides(args)
    lr, grid = overrides.pop("lr", None), getattr(args, "lr_grid", None)
    if lr is not None and grid is not None:
        raise UsageError("pass --lr (one LR for every method) or --lr-grid (tuned per method), not both")
    procedure = Procedure(lr_grid=(lr,) if lr is not None else grid, seeds=getattr(args, "seeds", 1),
                          methods=getattr(args, "methods", None), clip_rule=getattr(args, "clip_rule", "published"),
                          widen_edges=getattr(args, "widen_edges", 0))
    procedure.validate()
    # validates before any work; the settings that only some methods read (READ_ONLY_BY) are checked per row by
    # compare, which drops them from the others, so the base (the config's own method) is checked without them
    base = resolve_config(config_file=args.config,
                          overrides={k: v for k, v in overrides.items() if k not in READ_ONLY_BY})
    if base.data is None:
        overrides["data"] = str(prepare_default_corpus(base.cache_dir, base.vocab_size, progress=not args.no_progress))
    sets = list(PAPER_SETS) if args.set == "all" else [args.set]
    if args.no_progress:
        quiet_transformers()
    try:
        with logging_redirect_tqdm():
            results = compare(sets=sets, out=Path(args.out), runs_dir=Path(args.runs) if args.runs else None,
                              preset=None, config_file=args.config, overrides=overrides,
                              threshold=args.threshold, progress=not args.no_progress, procedure=procedure)
    except KeyboardInterrupt:  # SIGINT/SIGTERM: the run in progress saved a checkpoint, finished runs are kept
        print("relora compare: interrupted; finished runs are kept and the run in progress saved a checkpoint: "
              "run the same command again to continue", file=sys.stderr)
        return 130
    for name, result in results["sets"].items():
        print(f"\n{name} set:\n{result['table']}")
    print(f"trained {len(results['trained_s'])} runs in {results['elapsed_s'] / 60:.1f} min; results in {args.out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from relora.finetune.classification import finetune
    from relora.finetune.config import FinetuneConfig

    config = FinetuneConfig(**setting_values(args, FinetuneConfig))  # absent flags: the defaults
    if args.no_progress:
        quiet_transformers()
    result = finetune(config)
    m = result.metrics
    print(f"{config.method}: accuracy {m['accuracy']:.4f}  F1 {m['f1']:.4f}  MCC {m['mcc']:.4f}  "
          f"({result.restarts} restarts, {result.merges} merges)")
    print(f"wrote {result.out / 'metrics.json'} and {result.out / 'model'} (dense classifier, adapters merged)")
    return 0
