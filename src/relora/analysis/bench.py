"""``relora bench``: full-rank vs ReLoRA training steps, measured side by side, against the cost model's bounds.

Throughput: both models live in one process and their steps are timed in
alternation (warm-up first, then ``repeats`` rounds, median), so machine noise
hits both alike and the ratio is meaningful even on a busy machine. Peak
memory: each method runs alone in a fresh process (``peak_memory``, shared
with ``relora bench --quantize``). Each model is prepared as the trainer
prepares it (``prepare_for_training``: activation checkpointing, compile).
The setup and its flags: ``bench_setup``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from relora.analysis.bench_setup import BenchSetup
from relora.analysis.costs import METHODS, CostModel
from relora.analysis.peak_memory import measure_peak_memory
from relora.errors import ConfigError
from relora.models import build_model, count_parameters, load_preset

logger = logging.getLogger(__name__)


def build(setup: BenchSetup, method: str, quantize: str | None = None
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and AdamW of ``method`` (its frozen weights stored as ``quantize``, for ReLoRA) on the setup's
    device, prepared as the trainer prepares a model (activation checkpointing, compile)."""
    from relora import ReLoRAConfig, wrap
    from relora.run.build import prepare_for_training
    from relora.run.config import TrainConfig

    model = build_model(setup.llama, setup.seed)
    if method == "relora":
        wrap(model, ReLoRAConfig(r=setup.rank, alpha=32, reset_every=10**9, restart_warmup_steps=0,
                                 frozen_dtype=setup.frozen_dtype, quantize=quantize))
    model.to(setup.device).train()
    prepare_for_training(TrainConfig(gradient_checkpointing=setup.gradient_checkpointing, compile=setup.compile),
                         model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-5)


def make_step(setup: BenchSetup, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """One training step on a fixed random batch: forward, backward, clip, AdamW, zero_grad."""
    from relora.run.device import autocast_for, pick_device

    device = pick_device(setup.device)
    autocast = autocast_for(device)
    batch = torch.randint(0, setup.vocab_size, (setup.micro_batch, setup.seq_len),
                          generator=torch.Generator().manual_seed(1)).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def _prepare_method(setup: BenchSetup, method: str) -> tuple[Callable[[], None], dict]:
    """In the memory measurement's fresh process: the training step of ``method``, and no other figures."""
    model, optimizer = build(setup, method)
    return make_step(setup, model, optimizer), {}


def measure_method_memory(setup: BenchSetup, method: str, steps: int = 2) -> int:
    """Peak memory of ``steps`` training steps of ``method``, measured alone in a fresh process."""
    return measure_peak_memory(_prepare_method, (setup, method), device=setup.device, steps=steps,
                               label=method)["peak_mem_bytes"]


def measure_merge_seconds(model: torch.nn.Module, repeats: int = 3) -> float:
    """Median wall time of one ``merge_and_reinit`` of every adapter of ``model``."""
    from relora import merge_and_reinit

    times = []
    for i in range(repeats):
        start = time.perf_counter()
        merge_and_reinit(model, seed=i)
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def largest_fitting(fits: Callable[[int], bool], limit: int = 4096) -> int:
    """The largest n in [1, limit] with ``fits(n)``, assuming fitting is monotone; 0 if not even 1 fits.

    Doubles until a size fails, then bisects between the last success and the
    failure: about 2 log2(n) trials.
    """
    if not fits(1):
        return 0
    good = 1
    while good < limit:
        trial = min(2 * good, limit)
        if not fits(trial):
            bad = trial
            break
        good = trial
    else:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def max_micro_batch(setup: BenchSetup, method: str, limit: int = 4096) -> int:
    """Largest micro-batch whose training step fits in GPU memory for ``method`` (the paper's speedup came
    partly from ReLoRA's freed optimizer memory going to bigger batches)."""
    if not setup.device.startswith("cuda"):
        raise ConfigError("--max-micro-batch needs a CUDA device: on CPU, memory is the machine's RAM and "
                          "running out of it swaps or kills the process instead of raising an error")
    built = list(build(setup, method))  # a list, so that the finally below can drop both before empty_cache

    def fits(micro_batch: int) -> bool:
        model, optimizer = built
        try:
            step = make_step(replace(setup, micro_batch=micro_batch), model, optimizer)
            step()
            step()  # the second step holds the Adam moments the first one allocated
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    try:
        return largest_fitting(fits, limit)
    finally:
        built.clear()
        torch.cuda.empty_cache()


def time_alternating(steps: dict[str, Callable[[], None]], warmup: int, repeats: int,
                     say: Callable[[str], None]) -> dict[str, list[float]]:
    """Seconds of each step function over ``repeats`` rounds after ``warmup`` untimed ones.

    One call of every function per round, in turn, so that machine noise
    (another job, thermal throttling) falls on all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
        say(f"round {i + 1}/{warmup + repeats}" + (" (warm-up)" if i < warmup else ""))
    return times


def step_figures(setup: BenchSetup, built: dict[str, tuple[torch.nn.Module, Callable[[], None]]], warmup: int,
                 repeats: int, say: Callable[[str], None]) -> dict[str, dict]:
    """Each built model's training step timed in alternation: tokens/s and seconds (median, every step), and
    its parameter counts."""
    tokens = setup.micro_batch * setup.seq_len
    times = time_alternating({name: step for name, (_, step) in built.items()}, warmup, repeats, say)
    figures = {}
    for name, (model, _) in built.items():
        trainable, total = count_parameters(model)
        median = statistics.median(times[name])
        figures[name] = {"tokens_per_s": tokens / median, "step_s": median, "step_s_all": times[name],
                         "trainable_params": trainable, "total_params": total}
    return figures


def run_bench(setup: BenchSetup, *, methods: tuple[str, ...] = METHODS, warmup: int = 2, repeats: int = 5,
              memory: bool = True, merge: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Measure every method and return the JSON-ready result (see ``relora bench --help``)."""
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"unknown bench method {method!r}; choose from: {', '.join(METHODS)}")
    say = progress or (lambda text: None)
    cost = setup.cost_model()
    built = {}
    for method in methods:
        say(f"building {method}")
        model, optimizer = build(setup, method)
        built[method] = (model, make_step(setup, model, optimizer))
    result: dict = {"setup": setup.__dict__, "tokens_per_step": setup.micro_batch * setup.seq_len,
                    "cost_model": cost.to_dict(), "methods": step_figures(setup, built, warmup, repeats, say)}
    if merge and "relora" in built:
        say("timing merge_and_reinit")
        result["merge"] = merge_figures(setup, built["relora"][0], result["methods"]["relora"]["step_s"])
    built.clear()
    if memory:
        for method in methods:
            say(f"peak memory of {method} (fresh process)")
            result["methods"][method]["peak_mem_bytes"] = measure_method_memory(setup, method)
    if set(methods) == set(METHODS):
        result.update(_against_bounds(setup, cost, result["methods"], memory))
    return result


def merge_figures(setup: BenchSetup, model: torch.nn.Module, step_s: float) -> dict:
    """Seconds of one ``merge_and_reinit`` of ``model``, and their share of a reset interval of the preset's
    training at ``step_s`` seconds per micro-step."""
    merge_s = measure_merge_seconds(model)
    train = load_preset(setup.preset)["train"]
    tokens = setup.micro_batch * setup.seq_len
    steps_per_interval = train.get("reset_every", 0)
    micro_steps = train.get("batch_tokens", tokens) / tokens  # micro-steps per optimizer step
    interval_s = steps_per_interval * micro_steps * step_s
    return {"merge_s": merge_s, "reset_every": steps_per_interval, "interval_train_s": interval_s,
            "merge_fraction": merge_s / interval_s if interval_s else None}


def _against_bounds(setup: BenchSetup, cost: CostModel, methods: dict[str, dict], memory: bool) -> dict:
    """ReLoRA's measured ratios to full-rank beside the cost model's bounds and prediction; adds each method's
    predicted peak to ``methods``."""
    full, relora = methods["full"], methods["relora"]
    out = {"throughput_ratio": relora["tokens_per_s"] / full["tokens_per_s"], "throughput_bound": cost.throughput_bound}
    out["throughput_of_bound"] = out["throughput_ratio"] / cost.throughput_bound
    if not memory:
        return out
    out["memory_ratio"] = relora["peak_mem_bytes"] / full["peak_mem_bytes"]
    out["memory_bound"] = cost.memory_bound
    out["memory_of_bound"] = out["memory_ratio"] / cost.memory_bound
    act_bytes = 2 if setup.device.startswith("cuda") else 4  # autocast bf16 on GPU (roughly)
    ckpt = setup.gradient_checkpointing
    out["memory_predicted"] = cost.memory_predicted(setup.micro_batch, act_bytes, ckpt)
    out["memory_of_predicted"] = out["memory_ratio"] / out["memory_predicted"]
    for name, m in methods.items():
        m["predicted_peak_bytes"] = cost.peak_bytes(name, setup.micro_batch, act_bytes, ckpt)["peak"]
    return out


def format_result(result: dict) -> str:
    """The table ``relora bench`` prints."""
    s = result["setup"]
    lines = [f"preset {s['preset']}  rank {s['rank']}  seq {s['seq_len']}  micro-batch {s['micro_batch']}  "
             f"device {s['device']}  frozen {s['frozen_dtype']}"
             + ("  activation checkpointing" if s.get("gradient_checkpointing") else "")
             + ("  compiled" if s.get("compile") else ""),
             (f"{'method':>8} {'tokens/s':>10} {'step s':>8} {'peak MiB':>9} {'predicted':>9} {'trainable':>12} "
              f"{'total':>12}")]
    for method, m in result["methods"].items():
        peak = f"{m['peak_mem_bytes'] / 2**20:,.0f}" if "peak_mem_bytes" in m else "-"
        predicted = f"{m['predicted_peak_bytes'] / 2**20:,.0f}" if "predicted_peak_bytes" in m else "-"
        lines.append(f"{method:>8} {m['tokens_per_s']:>10,.0f} {m['step_s']:>8.3f} {peak:>9} {predicted:>9} "
                     f"{m['trainable_params']:>12,} {m['total_params']:>12,}")
    if "throughput_ratio" in result:
        lines.append(f"throughput relora/full {result['throughput_ratio']:.3f}  bound {result['throughput_bound']:.3f}"
                     f"  measured/bound {result['throughput_of_bound']:.3f}")
    if "memory_ratio" in result:
        lines.append(f"memory     relora/full {result['memory_ratio']:.3f}  bound {result['memory_bound']:.3f}"
                     f"  measured/bound {result['memory_of_bound']:.3f}  (bound: weights+grads+Adam, no activations)")
        lines.append(f"           predicted peak ratio {result['memory_predicted']:.3f} (activations and AdamW "
                     f"temporaries included)  measured/predicted {result['memory_of_predicted']:.3f}")
    for method, size in result.get("max_micro_batch", {}).items():
        lines.append(f"largest micro-batch that fits, {method}: {size}")
    if "merge" in result:
        m = result["merge"]
        lines.append(f"merge_and_reinit {m['merge_s']:.3f} s = {100 * (m['merge_fraction'] or 0):.2g}% of one reset "
                     f"interval ({m['reset_every']} steps, {m['interval_train_s']:,.0f} s of training at this speed)")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    from relora.fileio import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
