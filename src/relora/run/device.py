"""The device a run trains on: choosing it, its autocast, and its peak memory."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

from relora.errors import ConfigError


def check_device(name: str) -> None:
    """ConfigError unless ``name`` is ``auto`` or a device string torch understands (cpu, cuda, cuda:N, ...)."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; a CUDA device without CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it (float32 master weights); float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count afresh, so that a run in a process that ran others (``relora compare``)
    reports its own peak. On CPU, Linux resets the process's peak RSS on writing 5 to clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    """The peak since ``reset_peak_memory``: allocated tensors on CUDA, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
