"""The ``relora`` command: thin parsing over the library's plain functions.

Exit codes: 0 success, 2 a user error (one line on stderr, no traceback),
1 an internal error (with traceback, since that is a bug to report).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import time
import traceback
from pathlib import Path

import yaml

from relora import __version__
from relora.errors import USER_ERRORS, UsageError

logger = logging.getLogger("relora")

def _user_errors() -> tuple[type[BaseException], ...]:
    return USER_ERRORS


# ---------------------------------------------------------------- prepare
def cmd_prepare(args: argparse.Namespace) -> int:
    from relora.data import load_prepared, prepare

    out = prepare(args.inputs or None, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  val_fraction=args.val_fraction, test_fraction=args.test_fraction, text_field=args.text_field,
                  overwrite=args.overwrite, seed=args.seed, progress=not args.no_progress, corpus=args.corpus)
    meta = load_prepared(out).meta
    print(f"prepared {out}: {_describe_data(meta)}")
    return 0


def _describe_data(meta: dict) -> str:
    splits = meta["splits"]
    return ", ".join([f"{name} {s['docs']:,} docs / {s['tokens']:,} tokens" for name, s in splits.items()]
                     + [f"vocabulary {meta['vocab_size']:,}"])


# ---------------------------------------------------------------- train
def _yes_no(text: str) -> bool:
    """A boolean flag value: yes/no, true/false, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def _name_list(text: str) -> list[str]:
    """A comma-separated list of names; checked against the known names by the config (a one-line error)."""
    return [name.strip() for name in text.split(",") if name.strip()]


TRAIN_FLAGS = {  # flag -> (type, help); each maps to the TrainConfig field of the same name
    "--preset": (str, "model size and recipe: tiny, 9m, 20m, 60m, 130m, 250m, 350m, 1b; pico-tiny, pico-small "
                      "(relora-pico's architectures; src/relora/configs/)"),
    "--method": (str, "full, control, lora, lora-ws, relora (default), online-relora; galore, apollo, apollo-mini "
                      "(pip install 'relora[baselines]')"),
    "--data": (str, "prepared data directory (default: the Python stdlib corpus, prepared once into the cache)"),
    "--out": (str, "run directory (default: runs/PRESET-METHOD-TIME)"),
    "--steps": (int, "optimizer steps in total, warm start included; the preset's step counts that are not "
                     "given (warm start, restart interval, eval/save intervals) scale with it"),
    "--warm-start-steps": (int, "full-rank steps before LoRA/ReLoRA starts"),
    "--reset-every": (int, "steps between ReLoRA restarts (merge, optimizer reset, LR re-warmup)"),
    "--merge-every": (int, "steps between merges for online-relora (must divide --reset-every)"),
    "--restart-warmup-steps": (int, "steps of linear LR re-warmup after each restart"),
    "--rank": (int, "adapter rank r"),
    "--alpha": (float, "adapter alpha (scale = alpha / rank)"),
    "--quantize": (str, "store the frozen weights of wrapped layers in nf4 or int8 (pip install 'relora[quantize]')"),
    "--master-weights": (str, "with --quantize: cpu keeps a float32 copy of the frozen weights in CPU memory; "
                              "merges go into it, so quantization error does not accumulate"),
    "--frozen-dtype": (str, "storage of the frozen weights of wrapped layers: float32 (default) or bfloat16 "
                            "(half the device memory; merges keep their rounding residual in CPU memory)"),
    "--prune": (str, "optimizer reset: magnitude (default), random, full, none, independent"),
    "--prune-ratio": (float, "fraction of the adapters' Adam moments zeroed at each restart"),
    "--restart-adam-step": (str, "Adam's step counter of the pruned adapters at a restart: keep (default, as the "
                                 "paper) or reset (bias correction starts afresh for the fresh moments)"),
    "--reference-defects": (_name_list, "FOR STUDY ONLY, off by default: reproduce defects of the reference / "
                                        "relora-pico code, comma-separated: zero-init-a (A zeroed with B at wrap), "
                                        "unscaled-merge (merges fold B A, not alpha/rank B A), independent-masks "
                                        "(with --prune random: separate random masks for Adam's m and v); "
                                        "adapter methods only, see docs/method.md"),
    "--lr": (float, "peak learning rate of the method (for adapter methods: after the warm start)"),
    "--weight-decay": (float, "AdamW's decoupled weight decay of matrices (not of norms, biases, embeddings; "
                              "for adapter methods of W + s B A: docs/method.md); default 0"),
    "--grad-clip": (float, "clip the gradient norm at this value (default 1.0; 0: no clipping)"),
    "--proj-lr": (float, "peak LR of galore / apollo / apollo-mini (default 0.01, as their papers)"),
    "--proj-rank": (int, "rank of GaLore's / APOLLO's gradient projection (default: GaLore's rank for the model "
                         "width, e.g. 128 at 60m, 256 at 130m-350m, width/4 otherwise; 1 for apollo-mini)"),
    "--update-proj-gap": (int, "steps between GaLore's / APOLLO's projection updates (default 200)"),
    "--proj-scale": (float, "GaLore's / APOLLO's scale (default: galore 0.25, apollo 1, apollo-mini 128)"),
    "--scale-front": (_yes_no, "APOLLO: apply the norm-growth limiter after the scale, yes or no "
                               "(default: yes for apollo-mini, no for apollo)"),
    "--batch-tokens": (int, "global batch size in tokens"),
    "--micro-batch": (int, "sequences per forward pass (gradient accumulation is derived)"),
    "--seq-len": (int, "sequence length in tokens"),
    "--sampling": (str, "sequential (one shuffled pass, no repetition) or random windows"),
    "--eval-every": (int, "steps between evaluations (0: only at the end)"),
    "--eval-tokens": (int, "validation tokens per evaluation"),
    "--save-every": (int, "steps between checkpoints (0: only at the end)"),
    "--log-every": (int, "steps between metrics records"),
    "--init-from": (str, "start from a Hugging Face model directory or a relora checkpoint (no warm start)"),
    "--seed": (int, "random seed (model init, data order, adapter init)"),
    "--vocab-size": (int, "tokenizer vocabulary when the default corpus is prepared"),
    "--device": (str, "auto (default), cpu, cuda, cuda:N"),
    "--threads": (int, "CPU threads (default 0: as many as CPUs are idle at start, or OMP_NUM_THREADS if set; "
                       "2 threads beside another busy process ran 4x slower than 1, see benchmarks/threads.py)"),
    "--max-bad-steps": (int, "consecutive non-finite steps (skipped) before --on-bad-steps acts (default 10)"),
    "--on-bad-steps": (str, "rollback (to the last checkpoint with a lower LR, default) or stop"),
    "--distributed": (str, "under torchrun: ddp (default, DistributedDataParallel) or fsdp (FSDP2 sharding)"),
    "--dist-timeout-s": (float, "seconds a collective may wait before the job fails (a rank died or hangs)"),
    "--cache-dir": (str, "where the default corpus is prepared (default: ~/.cache/relora)"),
}
ABLATIONS = {
    "--no-restarts": ("restarts", "ablation: no merges/restarts (ReLoRA becomes LoRA after the warm start)"),
    "--no-optimizer-reset": ("optimizer_reset", "ablation: restarts keep the adapters' optimizer state"),
    "--no-jagged": ("jagged", "ablation: plain cosine schedule, no LR re-warmup at restarts"),
    "--no-warm-start": ("warm_start", "ablation: adapters from step 0, no full-rank warm start"),
}

SPEED_OPTIONS = {  # off by default; each is measured by `relora bench` (docs/performance.md)
    "--gradient-checkpointing": ("gradient_checkpointing", "recompute each block's activations in the backward "
                                 "pass: less memory, about a third more compute"),
    "--compile": ("compile", "torch.compile the model (slow first steps; measured in docs/performance.md)"),
}


def _train_overrides(args: argparse.Namespace) -> dict:
    given = {k: v for k, v in vars(args).items() if k in {f[2:].replace("-", "_") for f in TRAIN_FLAGS}}
    for flag, (name, _) in ABLATIONS.items():
        if getattr(args, flag[2:].replace("-", "_"), False):
            given[name] = False
    for flag, (name, _) in SPEED_OPTIONS.items():
        if getattr(args, name, False):
            given[name] = True
    for name in ("wandb", "wandb_project"):  # train only: TRAIN_FLAGS are shared with compare
        if name in vars(args):
            given[name] = getattr(args, name)
    return given


def _set_lr(config, lr: float | None) -> None:
    """--lr is the peak LR of the method's main phase: relora_lr for adapter methods, proj_lr for GaLore/APOLLO."""
    from relora.run.config import ADAPTER_METHODS, PROJECTION_METHODS

    if lr is not None:
        if config.method in ADAPTER_METHODS:
            config.relora_lr = lr
        elif config.method in PROJECTION_METHODS:
            config.proj_lr = lr
        else:
            config.lr = lr


def _name_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of names, e.g. full,relora."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _float_list(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers, e.g. 1e-3,3e-3."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1e-3,3e-3; got {text!r}") from None


def _newest_run(preset: str, method: str) -> Path:
    runs = sorted(Path("runs").glob(f"{preset}-{method}-*"))
    runs = [r for r in runs if (r / "config.yaml").is_file()]
    if not runs:
        raise UsageError(f"no run of preset {preset} and method {method} under runs/; pass --out RUN_DIR")
    return runs[-1]


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from relora.errors import ConfigError
    from relora.run.config import (
        TrainConfig,
        incompatible_changes,
        merge_model,
        read_config_file,
        resolve_config,
    )
    from relora.run.summary import finished_summary
    from relora.train import train

    overrides = _train_overrides(args)
    lr = overrides.pop("lr", None)
    if args.resume:
        run_dir = Path(overrides["out"]) if "out" in overrides else _newest_run(
            overrides.get("preset", TrainConfig.preset), overrides.get("method", TrainConfig.method))
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} holds no run to resume (no config.yaml); check --out")
        saved = read_config_file(run_dir / "config.yaml")  # a damaged or foreign file: one line, not a traceback
        values = dict(saved)
        for layer in (read_config_file(args.config) if args.config else {}, overrides):  # as for a new run
            for key, value in layer.items():
                values[key] = merge_model(values.get("model", {}), value) if key == "model" else value
        config = TrainConfig(**{**values, "out": str(run_dir)})
        _set_lr(config, lr)
        config.validate()
        if config.data != saved.get("data"):  # another path, working directory or dataset: compared by identity
            config.data_id = _data_identity(config.data)
            if not saved.get("data_id"):  # an older run's config: the identity of what its path holds now
                saved["data_id"] = _data_identity(saved.get("data"), missing_ok=True)
        changed = incompatible_changes(saved, config.to_dict())
        if changed:
            raise ConfigError(
                f"cannot resume {run_dir} with a different {', '.join(changed)}; drop those flags or start a new --out"
            )
        done = finished_summary(run_dir)
        if done is not None:  # exit 0: the run is where --resume would take it (scripts may resume blindly)
            print(f"{run_dir} is finished (it has summary.json): nothing to resume, nothing changed. To train "
                  f"further, start a new run from its model: relora train --init-from {run_dir / 'final'} --out NEW")
            print(_format_summary(done))
            return 0
        harmless = sorted(k for k, v in config.to_dict().items() if saved.get(k) != v and k not in ("out", "data_id"))
        if harmless:
            logger.info("resuming with changed settings: %s", ", ".join(harmless))
    else:
        if "init_from" in overrides and "warm_start_steps" not in overrides:
            overrides["warm_start_steps"] = 0  # the loaded model is the warm start
        config = resolve_config(config_file=args.config, overrides=overrides)
        _set_lr(config, lr)
        if config.out is None:
            config.out = str(Path("runs") / f"{config.preset}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        out = Path(config.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"run directory {out} is not a directory; choose another --out")
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"run directory {out} is not empty; pass --resume to continue it or choose another --out")
        if config.data is None:
            config.data = str(_default_corpus(config, progress=not args.no_progress))
        config.validate()
    from relora.run.distributed import env_rank
    from relora.run.inputs import check_inputs

    check_inputs(config)  # a missing dataset or device is the first thing the user reads, not the config dump
    main_rank = env_rank() == 0
    if main_rank:
        print(yaml.safe_dump({"config": config.to_dict()}, sort_keys=False), end="", flush=True)
    if args.no_progress:
        _quiet_transformers()
    with logging_redirect_tqdm():
        summary = train(config, resume=args.resume, progress=not args.no_progress)
    if main_rank:
        print(_format_summary(summary))
    return 130 if summary.interrupted else 0


def _data_identity(path: str | None, *, missing_ok: bool = False) -> str | None:
    """The identity of the prepared data at ``path`` (DataError if there is none, or None with ``missing_ok``)."""
    from relora.data import load_prepared
    from relora.errors import DataError

    try:
        return load_prepared(path).identity if path else None
    except DataError:
        if missing_ok:
            return None
        raise


def _default_corpus(config, *, progress: bool) -> Path:
    """Prepare the default corpus once: under torchrun rank 0 prepares it, the others wait for it to appear.

    (No process group exists yet here; the prepared directory appears
    atomically, so waiting for its meta.json is enough.)
    """
    from relora.data import prepare_default_corpus
    from relora.data.store import default_data_dir
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


def _format_summary(s) -> str:
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


# Commands whose transformers bars ("Loading weights", "Writing model shards": one per load or save of a
# model of a few files) say nothing to the user; finetune keeps them unless --no-progress.
QUIET_TRANSFORMERS = ("train", "eval", "export", "analyze", "compare")


def _quiet_transformers() -> None:
    """Silence transformers' own progress bars (``save_pretrained`` / ``from_pretrained`` draw one each)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------- finetune
def cmd_finetune(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from relora.finetune.classification import FinetuneConfig, finetune

    names = {f.name for f in fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})  # absent flags: the defaults
    if args.no_progress:
        _quiet_transformers()
    result = finetune(config)
    m = result.metrics
    print(f"{config.method}: accuracy {m['accuracy']:.4f}  F1 {m['f1']:.4f}  MCC {m['mcc']:.4f}  "
          f"({result.restarts} restarts, {result.merges} merges)")
    print(f"wrote {result.out / 'metrics.json'} and {result.out / 'model'} (dense classifier, adapters merged)")
    return 0


# ---------------------------------------------------------------- eval / export
def cmd_eval(args: argparse.Namespace) -> int:
    from relora.data import TokenWindows, load_prepared
    from relora.models import check_device
    from relora.run.build import model_from_path
    from relora.run.device import autocast_for, pick_device
    from relora.run.evaluation import (
        check_same_tokenizer,
        eval_settings,
        evaluate,
        perplexity,
    )

    given = {flag: getattr(args, flag) for flag in ("seq_len", "eval_tokens", "micro_batch")}
    for flag, value in given.items():
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    settings, run_config = eval_settings(Path(args.model), given)
    check_device(args.device)
    data = load_prepared(args.data)
    unchecked = check_same_tokenizer(Path(args.model), data, run_config)  # a mismatch fails before loading
    device = pick_device(args.device)
    model = model_from_path(args.model).to(device)
    if model.get_input_embeddings().num_embeddings < data.vocab_size:
        raise UsageError(f"the data's vocabulary ({data.vocab_size}) is larger than the model's embedding "
                         f"({model.get_input_embeddings().num_embeddings}); evaluate on data prepared with the "
                         "model's tokenizer")
    if unchecked:
        logger.warning("%s", unchecked)
    seq_len = settings["seq_len"]
    windows = TokenWindows(data.val, seq_len, mode="sequential", name="the validation split")
    n = max(1, settings["eval_tokens"] // seq_len)
    loss = evaluate(model, windows, num_windows=n, micro_batch=settings["micro_batch"], device=device,
                    autocast=autocast_for(device))
    source = "; the run's evaluation settings" if run_config and set(given.values()) == {None} else ""
    print(f"val loss {loss:.4f}  val ppl {perplexity(loss):.2f}  ({min(n, len(windows)) * seq_len:,} tokens, "
          f"seq-len {seq_len}{source})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from relora.data import load_prepared
    from relora.errors import ConfigError
    from relora.fileio import ownership
    from relora.run import checkpoint as ckpt
    from relora.run.build import model_from_checkpoint
    from relora.run.export import export_dense

    source = Path(args.checkpoint)
    if not (source / ckpt.MARKER).is_file():
        latest = ckpt.latest_checkpoint(source / "checkpoints")
        if latest is None:
            raise ConfigError(f"{source} is neither a checkpoint nor a run directory with checkpoints")
        source = latest
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another OUT")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise ConfigError(f"{out} holds the checkpoint being exported ({source}); choose an OUT outside it")
    reason = ownership.why_not_replaceable(out, ownership.MODEL)
    if reason is not None:  # --overwrite replaces only an export relora wrote, never the user's files
        raise ConfigError(f"{out} cannot be replaced: {reason}; relora never deletes it, choose another OUT")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{out} already holds an exported model; pass --overwrite to replace it or choose another OUT")
    model = model_from_checkpoint(source)
    data_dir = ckpt.read_config(source).get("data")
    tokenizer = load_prepared(data_dir).tokenizer() if data_dir and Path(data_dir, "meta.json").is_file() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    export_dense(model, tokenizer, out)
    print(f"exported {source} -> {out}" + ("" if tokenizer else " (tokenizer not found, not included)"))
    return 0


# ---------------------------------------------------------------- analyze / plot / compare
def _default_out(paths: list[str], name: str) -> Path:
    """Beside a single run, else in the working directory."""
    from relora.run.records import is_run_dir

    if len(paths) == 1 and is_run_dir(Path(paths[0])):
        return Path(paths[0]) / name
    return Path(name)


def _labels(text: str | None, count: int) -> list[str] | None:
    if text is None:
        return None
    labels = [x.strip() for x in text.split(",")]
    if len(labels) != count:
        raise UsageError(f"--labels has {len(labels)} names for {count} runs; give one comma-separated name per run")
    return labels


def cmd_analyze(args: argparse.Namespace) -> int:
    from relora.analysis.report import analyze_runs, write_analysis

    out = Path(args.out) if args.out else _default_out(args.runs, "analysis")
    spectra = analyze_runs([Path(p) for p in args.runs], reference=Path(args.reference) if args.reference else None,
                           labels=_labels(args.labels, len(args.runs)), threshold=args.threshold)
    written = write_analysis(spectra, out, threshold=args.threshold)
    for label, s in spectra.items():
        below = ", ".join(f"{t} {v:.1f}" for t, v in s.below(args.threshold).items())
        ranks = ", ".join(f"{t} {min(r)}-{max(r)}" for t, r in s.ranks().items())
        print(f"{label}: rank of dW per layer {ranks}; singular values < {args.threshold:g} per matrix: {below}")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from relora.analysis.plots import plot_curves
    from relora.run.records import read_curves

    labels = _labels(args.labels, len(args.runs)) or [None] * len(args.runs)
    curves = [read_curves(Path(p), label) for p, label in zip(args.runs, labels, strict=True)]
    out = Path(args.out) if args.out else _default_out(args.runs, "loss.png")
    print(f"wrote {plot_curves(curves, out, title=args.title)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from relora.analysis.compare import PAPER_SETS, Procedure, compare
    from relora.data import prepare_default_corpus
    from relora.run.config import resolve_config

    overrides = _train_overrides(args)
    lr, grid = overrides.pop("lr", None), getattr(args, "lr_grid", None)
    if lr is not None and grid is not None:
        raise UsageError("pass --lr (one LR for every method) or --lr-grid (tuned per method), not both")
    procedure = Procedure(lr_grid=(lr,) if lr is not None else grid, seeds=getattr(args, "seeds", 1),
                          methods=getattr(args, "methods", None), clip_rule=getattr(args, "clip_rule", "published"))
    procedure.validate()
    base = resolve_config(config_file=args.config, overrides=overrides)  # validates before any work
    if base.data is None:
        overrides["data"] = str(prepare_default_corpus(base.cache_dir, base.vocab_size, progress=not args.no_progress))
    sets = list(PAPER_SETS) if args.set == "all" else [args.set]
    if args.no_progress:
        _quiet_transformers()
    with logging_redirect_tqdm():
        results = compare(sets=sets, out=Path(args.out), runs_dir=Path(args.runs) if args.runs else None,
                          preset=None, config_file=args.config, overrides=overrides,
                          threshold=args.threshold, progress=not args.no_progress, procedure=procedure)
    for name, result in results["sets"].items():
        print(f"\n{name} set:\n{result['table']}")
    print(f"trained {len(results['trained_s'])} runs in {results['elapsed_s'] / 60:.1f} min; results in {args.out}")
    return 0


# ---------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from relora.analysis.bench import BenchSetup, format_result, run_bench, write_json
    from relora.analysis.costs import METHODS

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown bench method {(unknown or [args.methods])[0]!r}; --methods takes a comma-separated "
                         f"subset of: {', '.join(METHODS)}")
    if args.warmup < 0 or args.repeats < 1:
        raise UsageError("--warmup must be >= 0 and --repeats >= 1")
    setup = BenchSetup.from_preset(args.preset, rank=args.rank, seq_len=args.seq_len, micro_batch=args.micro_batch,
                                   device=args.device, frozen_dtype=args.frozen_dtype, vocab_size=args.vocab_size,
                                   gradient_checkpointing=args.gradient_checkpointing, compile=args.compile)
    if args.quantize:
        return _bench_quantize(args, setup)
    cost = setup.cost_model()
    print(f"preset {setup.preset}, rank {setup.rank}, seq {setup.seq_len}, micro-batch {setup.micro_batch}: "
          f"the cost model says")
    print(cost.explain())
    if args.explain:
        return 0
    if args.max_micro_batch and not setup.device.startswith("cuda"):
        raise UsageError("--max-micro-batch needs a CUDA device (on CPU, running out of RAM swaps or kills the "
                         "process instead of raising an error); drop the flag or use --device cuda")
    result = run_bench(setup, methods=methods, warmup=args.warmup, repeats=args.repeats, memory=not args.no_memory,
                       merge=args.merge, progress=lambda text: logger.info("bench: %s", text))
    if args.max_micro_batch:
        from relora.analysis.bench import max_micro_batch

        result["max_micro_batch"] = {}
        for method in methods:
            logger.info("bench: largest micro-batch of %s", method)
            result["max_micro_batch"][method] = max_micro_batch(setup, method)
    print(format_result(result))
    if args.json:
        write_json(result, Path(args.json))
        print(f"wrote {args.json}")
    return 0


def _bench_quantize(args: argparse.Namespace, setup) -> int:
    """relora bench --quantize none,int8,nf4: ReLoRA with each storage of the frozen weights."""
    from relora.analysis.quant_bench import (
        format_quantize_result,
        parse_formats,
        run_quantize_bench,
    )

    formats = parse_formats(args.quantize)
    result = run_quantize_bench(setup, formats, warmup=args.warmup, repeats=args.repeats, memory=not args.no_memory,
                                progress=lambda text: logger.info("bench: %s", text))
    print(format_quantize_result(result))
    if args.json:
        from relora.analysis.bench import write_json

        write_json(result, Path(args.json))
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relora", description="ReLoRA: high-rank training through low-rank updates")
    parser.add_argument("--version", action="version", version=f"relora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    t = sub.add_parser("train", help="pretrain a model with full-rank, LoRA or ReLoRA",
                       description="Train a LLaMA-style model; flags override --config, which overrides --preset.",
                       argument_default=argparse.SUPPRESS)
    t.add_argument("--config", default=None, help="YAML file of settings (flags override it)")
    for flag, (kind, text) in TRAIN_FLAGS.items():
        t.add_argument(flag, type=kind, help=text)
    for flag, (_, text) in {**ABLATIONS, **SPEED_OPTIONS}.items():
        t.add_argument(flag, action="store_true", help=text)
    t.add_argument("--wandb", action="store_true", help="also log metrics to Weights & Biases (pip install wandb)")
    t.add_argument("--wandb-project", help="Weights & Biases project (default: relora)")
    t.add_argument("--resume", action="store_true", default=False, help="continue the latest checkpoint of --out")
    t.add_argument("--no-progress", action="store_true", default=False, help="no progress bar")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("finetune", help="fine-tune a classifier with LoRA or ReLoRA (GLUE-style)",
                       description="Fine-tune a local model directory as a sequence classifier on a CSV, TSV or "
                                   "JSONL file of text,label or text_a,text_b,label rows; report accuracy, F1 and "
                                   "Matthews correlation; write OUT/metrics.json and the merged model OUT/model.",
                       argument_default=argparse.SUPPRESS)
    f.add_argument("data", metavar="TRAIN_FILE", help="training examples (.csv, .tsv with a header row, or .jsonl)")
    f.add_argument("--model", required=True, help="local model directory (a causal LM or classifier)")
    f.add_argument("--out", required=True, help="output directory (must be empty or new)")
    f.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    f.add_argument("--val-file", help="validation examples (default: hold out --val-fraction of TRAIN_FILE)")
    f.add_argument("--val-fraction", type=float, help="fraction held out for validation (default 0.1)")
    f.add_argument("--text-columns", type=lambda text: [c.strip() for c in text.split(",")],
                   help="one or two comma-separated text columns (default: text, or text_a,text_b)")
    f.add_argument("--label-column", help="the label column (default: label)")
    f.add_argument("--method", choices=["lora", "relora"], help="relora (default): restarts every --reset-every")
    f.add_argument("--rank", type=int, help="adapter rank (default 8)")
    f.add_argument("--alpha", type=float, help="adapter alpha, scale = alpha / rank (default 16)")
    f.add_argument("--reset-every", type=int, help="steps between ReLoRA restarts (default 100)")
    f.add_argument("--restart-warmup-steps", type=int, help="LR re-warmup after a restart (default reset-every/10)")
    f.add_argument("--epochs", type=int, help="passes over the training data (default 3)")
    f.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    f.add_argument("--batch-size", type=int, help="examples per step (default 16)")
    f.add_argument("--max-length", type=int, help="tokens per example, longer ones truncated (default 128)")
    f.add_argument("--seed", type=int, help="seed of the split, data order and head init (default 0)")
    f.add_argument("--device", help="auto (default), cpu, cuda")
    f.add_argument("--no-progress", action="store_true", default=False, help="no transformers progress bars")
    f.set_defaults(func=cmd_finetune)

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

    x = sub.add_parser("export", help="write a checkpoint as a plain Hugging Face model (adapters merged)")
    x.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint directory (checkpoints/step_N) or a run directory (latest)")
    x.add_argument("out", metavar="OUT", help="output directory")
    x.add_argument("--overwrite", action="store_true",
                   help="replace a model that relora exported into OUT (never a directory with other files)")
    x.set_defaults(func=cmd_export)

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

    pl = sub.add_parser("plot", help="loss and validation-perplexity curves of runs, restarts marked",
                        description="Training loss and validation perplexity of several runs on one figure.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    pl.add_argument("--out", help="PNG file (default: RUN/loss.png for one run, else ./loss.png)")
    pl.add_argument("--labels", help="comma-separated legend names, one per run (default: run directory names)")
    pl.add_argument("--title", help="figure title")
    pl.set_defaults(func=cmd_plot)

    c = sub.add_parser("compare", help="run the paper's methods (and Table 6 ablation) with matched budgets",
                       description="Train full, control, lora, lora-ws, relora (main set) and the rows of the paper's "
                                   "Table 6, LoRA plus each combination of ReLoRA's components (ablation set), "
                                   "from one config, or ReLoRA with and "
                                   "without warm start beside full, lora-ws, GaLore, APOLLO and APOLLO-mini "
                                   "(baselines set); write tables and figures. Finished runs are reused, "
                                   "unfinished ones resumed.",
                       argument_default=argparse.SUPPRESS)
    c.add_argument("--set", default="all", choices=["main", "ablation", "baselines", "all"],
                   help="which set of runs (default all: main and ablation; baselines needs "
                        "pip install 'relora[baselines]')")
    c.add_argument("--out", default="comparison", help="where tables and figures go (default ./comparison)")
    c.add_argument("--runs", default=None, help="where the run directories go (default OUT/runs)")
    c.add_argument("--config", default=None, help="YAML file of settings shared by every run")
    c.add_argument("--threshold", type=float, default=0.1, help="singular-value threshold of the spectra figure")
    c.add_argument("--methods", type=_name_list, default=None,
                   help="comma-separated rows to run, named as in the tables, e.g. full,relora or relora-no-jagged")
    c.add_argument("--lr", type=float, help="one peak LR for every method's main phase (as relora train --lr)")
    c.add_argument("--lr-grid", type=_float_list, default=None,
                   help="comma-separated peak LRs tried per method at the first seed (relora_lr for adapter methods, "
                        "the LR of galore/apollo, lr of full); the lowest final val loss is chosen")
    c.add_argument("--seeds", type=int, default=1, help="seeds run at each method's chosen LR (default 1)")
    c.add_argument("--clip-rule", choices=["published", "same"], default="published",
                   help="published (default): GaLore/APOLLO unclipped as in their scripts, the others at "
                        "--grad-clip; same: every method at --grad-clip")
    for flag, (kind, text) in TRAIN_FLAGS.items():
        if flag not in ("--out", "--method", "--init-from", "--lr", "--quantize", "--master-weights"):
            c.add_argument(flag, type=kind, help=text)
    c.add_argument("--no-progress", action="store_true", default=False, help="no progress bars")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="full-rank vs ReLoRA step throughput and memory, against the cost model's bounds",
                       description="Time full-rank and ReLoRA training steps side by side (median after warm-up), "
                                   "measure each method's peak memory in a fresh process, and compare the ratios "
                                   "with the bounds computed from FLOPs and state bytes.")
    b.add_argument("--preset", default="tiny", help="architecture to benchmark (default tiny)")
    b.add_argument("--rank", type=int, help="adapter rank (default: the preset's)")
    b.add_argument("--seq-len", type=int, help="sequence length (default: the preset's)")
    b.add_argument("--micro-batch", type=int, help="sequences per step (default: the preset's on GPU, 1 on CPU)")
    b.add_argument("--methods", default="full,relora", help="comma-separated: full, relora (default both)")
    b.add_argument("--vocab-size", type=int, help="vocabulary (default: the preset's, else 32100)")
    b.add_argument("--frozen-dtype", help="storage of frozen weights: float32 or bfloat16 (default: bf16 on GPU)")
    b.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    b.add_argument("--gradient-checkpointing", action="store_true", help="both methods with activation checkpointing")
    b.add_argument("--compile", action="store_true", help="both methods torch.compile'd (warm-up includes compiling)")
    b.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    b.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    b.add_argument("--merge", action="store_true", help="also time merge_and_reinit of the whole model")
    b.add_argument("--max-micro-batch", action="store_true",
                   help="GPU only: also find the largest micro-batch each method fits (doubling, then bisecting)")
    b.add_argument("--quantize", metavar="FORMATS",
                   help="compare ReLoRA with its frozen weights stored as each of these, e.g. none,int8,nf4 "
                        "(needs pip install 'relora[quantize]'); --methods is then ignored")
    b.add_argument("--explain", action="store_true", help="print the cost model's bounds only; measure nothing")
    b.add_argument("--json", help="write the results to this JSON file")
    b.set_defaults(func=cmd_bench)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; an unknown flag is reported by its subcommand's parser (its usage, not the top-level one)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        sub = commands[args.command]
        message = f"unrecognized arguments: {' '.join(unknown)}"
        flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        for word in unknown:
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1) if word.startswith("-") else []
            if close:
                message += f"; did you mean {close[0]}?"
                break
        sub.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command in QUIET_TRANSFORMERS:
        _quiet_transformers()
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"relora: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"relora: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"relora: internal error: {type(exc).__name__}: {exc} (please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
