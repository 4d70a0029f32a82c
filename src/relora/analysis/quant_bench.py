"""``relora bench --quantize none,int8,nf4``: ReLoRA steps with the frozen weights stored in each format.

The same preset, rank and batch as ``relora bench``; one ReLoRA model per
storage format. Throughput: the models' steps timed in alternation in one
process (median), as ``relora bench`` does. Memory, each format alone in a
fresh process: the bytes the frozen weights occupy (codes and scales,
counted from the tensors, beside the cost model's figure) and the peak of
the training steps, measured after the model is built (building starts from
a float32 model for every format, so a peak that included it would hide the
difference): CUDA's peak allocation, or on CPU the peak resident set size
(Linux ``VmHWM``, reset after building) minus the resident size before
building.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import statistics
from collections.abc import Callable

import torch

from relora.analysis.bench import BenchSetup, make_step, time_alternating
from relora.errors import ConfigError
from relora.models import build_model, count_parameters

FORMATS = ("none", "int8", "nf4")


def parse_formats(text: str) -> tuple[str, ...]:
    """``"none,int8,nf4"`` -> the formats, checked."""
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"unknown --quantize format {(unknown or [text])[0]!r}; give a comma-separated subset of: "
                          f"{', '.join(FORMATS)}")
    if any(f != "none" for f in formats):
        from relora.errors import BitsAndBytesMissing
        from relora.integrations.quantize import require_bitsandbytes

        try:
            require_bitsandbytes()
        except BitsAndBytesMissing as exc:
            raise ConfigError(str(exc)) from None
    return formats


def build_relora(setup: BenchSetup, fmt: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A ReLoRA model with its frozen weights stored as ``fmt``, and its AdamW, on the setup's device."""
    from relora import ReLoRAConfig, wrap

    model = build_model(setup.llama, setup.seed)
    wrap(model, ReLoRAConfig(r=setup.rank, alpha=32, reset_every=10**9, restart_warmup_steps=0,
                             frozen_dtype=setup.frozen_dtype, quantize=None if fmt == "none" else fmt))
    model.to(setup.device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-5)


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes the frozen weights of the wrapped layers occupy, counted from their tensors."""
    from relora.core.adapters import lora_layers
    from relora.integrations import quantize

    total = 0
    for layer in lora_layers(model):
        base = layer.get_base_layer()
        total += quantize.storage_bytes(base) if quantize.is_quantized(base) else base.weight.nbytes
    return total


def _cost(setup: BenchSetup, fmt: str) -> int:
    """The cost model's bytes of the frozen weights in ``fmt``."""
    from relora.analysis.costs import CostModel

    bytes_ = 2 if setup.frozen_dtype == "bfloat16" else 4
    return CostModel(setup.llama, setup.seq_len, setup.rank, frozen_bytes=bytes_,
                     quantize=None if fmt == "none" else fmt).frozen_weight_bytes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_child(setup: BenchSetup, fmt: str, steps: int, queue) -> None:
    """In a fresh process: build one format, reset the peak, run ``steps`` steps, report."""
    try:
        cuda = setup.device.startswith("cuda")
        before = 0 if cuda else _status_kib("VmRSS") * 1024
        model, optimizer = build_relora(setup, fmt)
        step = make_step(setup, model, optimizer)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        for _ in range(steps):
            step()
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024 - before
        queue.put({"peak_mem_bytes": int(peak), "frozen_bytes": frozen_bytes(model)})
    except BaseException as exc:  # the parent turns this into an error message
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_memory(setup: BenchSetup, fmt: str, steps: int = 2) -> dict:
    """Peak memory of ``steps`` training steps and bytes of frozen weights, measured alone in a subprocess."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    # freed tensors go back to the OS at once (glibc would otherwise keep some in its heap and raise the RSS)
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        proc = ctx.Process(target=_memory_child, args=(setup, fmt, steps, queue))
        proc.start()
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"memory measurement of {fmt} failed: {result['error']}")
    return result


def run_quantize_bench(setup: BenchSetup, formats: tuple[str, ...] = FORMATS, *, warmup: int = 2, repeats: int = 5,
                       memory: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Measure ReLoRA steps with each frozen-weight format; the JSON-ready result."""
    say = progress or (lambda text: None)
    tokens = setup.micro_batch * setup.seq_len
    built = {}
    for fmt in formats:
        say(f"building relora with frozen weights {fmt}")
        model, optimizer = build_relora(setup, fmt)
        built[fmt] = (model, make_step(setup, model, optimizer))
    times = time_alternating({f: step for f, (_, step) in built.items()}, warmup, repeats, say)
    result: dict = {"setup": dataclasses.asdict(setup), "tokens_per_step": tokens, "formats": {}}
    for fmt in formats:
        model = built[fmt][0]
        trainable, total = count_parameters(model)
        median = statistics.median(times[fmt])
        result["formats"][fmt] = {"tokens_per_s": tokens / median, "step_s": median, "step_s_all": times[fmt],
                                  "trainable_params": trainable, "total_params": total,
                                  "frozen_bytes": frozen_bytes(model), "frozen_bytes_model": _cost(setup, fmt)}
    built.clear()
    if memory:
        for fmt in formats:
            say(f"peak memory with frozen weights {fmt} (fresh process)")
            result["formats"][fmt]["peak_mem_bytes"] = measure_memory(setup, fmt)["peak_mem_bytes"]
    return result


def format_quantize_result(result: dict) -> str:
    """The table ``relora bench --quantize`` prints (MiB = 2^20 bytes)."""
    s = result["setup"]
    lines = [f"relora, preset {s['preset']}  rank {s['rank']}  seq {s['seq_len']}  micro-batch {s['micro_batch']}  "
             f"device {s['device']}",
             f"{'frozen':>6} {'tokens/s':>10} {'step s':>8} {'frozen MiB':>10} {'(model)':>8} {'peak MiB':>9}"]
    for fmt, m in result["formats"].items():
        peak = f"{m['peak_mem_bytes'] / 2**20:,.1f}" if "peak_mem_bytes" in m else "-"
        label = fmt if fmt != "none" else {"float32": "fp32", "bfloat16": "bf16"}[s["frozen_dtype"]]
        lines.append(f"{label:>6} {m['tokens_per_s']:>10,.0f} {m['step_s']:>8.3f} {m['frozen_bytes'] / 2**20:>10,.2f} "
                     f"{m['frozen_bytes_model'] / 2**20:>8,.2f} {peak:>9}")
    return "\n".join(lines)
