"""``relora bench --quantize none,int8,nf4``: ReLoRA steps with the frozen weights stored in each format.

The same preset, rank and batch as ``relora bench``, and its model building
(``bench.build``); one ReLoRA model per storage format. Throughput: the
models' steps timed in alternation in one process (median), as ``relora
bench`` does. Memory, each format alone in a fresh process
(``peak_memory``, the measurement ``relora bench`` makes): the bytes the
frozen weights occupy (codes and scales, counted from the tensors, beside the
cost model's figure) and the peak of the training steps after the model is
built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from relora.analysis.bench import build, make_step, step_figures
from relora.analysis.bench_setup import BenchSetup
from relora.analysis.peak_memory import measure_peak_memory
from relora.errors import ConfigError

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
    return build(setup, "relora", quantize=None if fmt == "none" else fmt)


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


def _prepare_format(setup: BenchSetup, fmt: str) -> tuple[Callable[[], None], dict]:
    """In the memory measurement's fresh process: the training step of ReLoRA in ``fmt``, and its frozen bytes."""
    model, optimizer = build_relora(setup, fmt)
    return make_step(setup, model, optimizer), {"frozen_bytes": frozen_bytes(model)}


def measure_memory(setup: BenchSetup, fmt: str, steps: int = 2) -> dict:
    """Peak memory of ``steps`` training steps and bytes of frozen weights, measured alone in a fresh process."""
    return measure_peak_memory(_prepare_format, (setup, fmt), device=setup.device, steps=steps, label=fmt)


def run_quantize_bench(setup: BenchSetup, formats: tuple[str, ...] = FORMATS, *, warmup: int = 2, repeats: int = 5,
                       memory: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Measure ReLoRA steps with each frozen-weight format; the JSON-ready result."""
    say = progress or (lambda text: None)
    built = {}
    for fmt in formats:
        say(f"building relora with frozen weights {fmt}")
        model, optimizer = build_relora(setup, fmt)
        built[fmt] = (model, make_step(setup, model, optimizer))
    result: dict = {"setup": dataclasses.asdict(setup), "tokens_per_step": setup.micro_batch * setup.seq_len,
                    "formats": step_figures(setup, built, warmup, repeats, say)}
    for fmt, figures in result["formats"].items():
        figures.update(frozen_bytes=frozen_bytes(built[fmt][0]), frozen_bytes_model=_cost(setup, fmt))
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
