"""The commands around training: ``prepare``, ``eval``, ``export``, ``analyze``, ``plot`` and ``bench``.

Each reads its parsed flags and calls the library; torch loads inside the
command, not when the parser is built.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from relora.errors import UsageError

logger = logging.getLogger("relora")


# Commands whose transformers bars ("Loading weights", "Writing model shards": one per load or save of a
# model of a few files) say nothing to the user; finetune keeps them unless --no-progress.
QUIET_TRANSFORMERS = ("train", "eval", "export", "analyze", "compare")


def quiet_transformers() -> None:
    """Silence transformers' own progress bars (``save_pretrained`` / ``from_pretrained`` draw one each)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


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


def cmd_eval(args: argparse.Namespace) -> int:
    from relora.data import TokenWindows, load_prepared
    from relora.run.build import model_from_path
    from relora.run.device import autocast_for, check_device, pick_device
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


def cmd_bench(args: argparse.Namespace) -> int:
    from relora.analysis.bench import format_result, run_bench, write_json
    from relora.analysis.bench_setup import BenchOptions, BenchSetup
    from relora.analysis.costs import METHODS
    from relora.cli.flags import setting_values

    options = BenchOptions(**setting_values(args, BenchOptions))
    methods = tuple(m.strip() for m in options.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown bench method {(unknown or [options.methods])[0]!r}; --methods takes a "
                         f"comma-separated subset of: {', '.join(METHODS)}")
    if options.warmup < 0 or options.repeats < 1:
        raise UsageError("--warmup must be >= 0 and --repeats >= 1")
    setup = BenchSetup.from_preset(**setting_values(args, BenchSetup))
    if args.quantize:
        return _bench_quantize(args, options, setup)
    cost = setup.cost_model()
    print(f"preset {setup.preset}, rank {setup.rank}, seq {setup.seq_len}, micro-batch {setup.micro_batch}: "
          f"the cost model says")
    print(cost.explain())
    if args.explain:
        return 0
    if options.max_micro_batch and not setup.device.startswith("cuda"):
        raise UsageError("--max-micro-batch needs a CUDA device (on CPU, running out of RAM swaps or kills the "
                         "process instead of raising an error); drop the flag or use --device cuda")
    result = run_bench(setup, methods=methods, warmup=options.warmup, repeats=options.repeats, memory=options.memory,
                       merge=options.merge, progress=lambda text: logger.info("bench: %s", text))
    if options.max_micro_batch:
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


def _bench_quantize(args: argparse.Namespace, options, setup) -> int:
    """relora bench --quantize none,int8,nf4: ReLoRA with each storage of the frozen weights."""
    from relora.analysis.quant_bench import (
        format_quantize_result,
        parse_formats,
        run_quantize_bench,
    )

    formats = parse_formats(args.quantize)
    result = run_quantize_bench(setup, formats, warmup=options.warmup, repeats=options.repeats, memory=options.memory,
                                progress=lambda text: logger.info("bench: %s", text))
    print(format_quantize_result(result))
    if args.json:
        from relora.analysis.bench import write_json

        write_json(result, Path(args.json))
        print(f"wrote {args.json}")
    return 0
