"""Peak memory of a few training steps, measured alone in a fresh process: the one measurement of ``relora bench``.

Why a fresh process: a process's peak cannot be read for one model among
several. On CPU the resident set's high-water mark counts everything the
process ever held (the benchmark's parent holds every model it times), and
``getrusage``'s ``ru_maxrss`` is even carried over fork + exec; on CUDA the
caching allocator keeps the other models' blocks. A spawned child starts with
an address space of its own and builds only the model measured.

What is measured: the peak of the training steps after the model is built,
counted from before building, so the model's weights are in it but not the
transients of building it (every model starts as a float32 one, then is
wrapped, converted or quantized; a peak that included that staging would hide
what a storage format saves). On CUDA: ``max_memory_allocated``, reset after
building. On CPU (Linux): the peak resident size ``VmHWM``, reset after
building, minus the resident size before building.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_module
from collections.abc import Callable, Iterator
from typing import Any

import torch

# A function run in the child: builds one model and returns its training step and any measurements of the model
# (bytes of its frozen weights, say). Module-level, so that it can be pickled for the spawned process.
Prepare = Callable[..., tuple[Callable[[], None], dict[str, Any]]]

# glibc keeps freed heap memory resident (and fragmented), so RSS would report what the process once used, not
# what it holds. Serving every allocation of 64 KiB or more by mmap, and trimming the heap at once, returns it
# to the system on free: the high-water mark then follows live memory. Read by the child's malloc at start.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_bytes(field: str) -> int:
    """A size line of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes.

    ``VmHWM`` belongs to this process's own address space, which exec creates
    afresh: not ``getrusage().ru_maxrss``, which Linux carries over fork + exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def _child(prepare: Prepare, args: tuple, device_name: str, steps: int, queue) -> None:
    """In the fresh process: build, reset the peak, run ``steps`` steps, report the peak and ``prepare``'s figures."""
    try:
        device = torch.device(device_name)
        before = 0 if device.type == "cuda" else _status_bytes("VmRSS")
        step, figures = prepare(*args)
        _reset_peak(device)
        for _ in range(steps):
            step()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = _status_bytes("VmHWM") - before
        queue.put({**figures, "peak_mem_bytes": int(peak)})
    except BaseException as exc:  # the parent turns this into an error message
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in os.environ for a child about to start, the parent's own environment restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wait_for_result(proc, queue, label: str) -> dict[str, Any]:
    """The child's message; an error if it dies without one (killed for memory, say), rather than a hang."""
    while True:
        alive = proc.is_alive()  # read before waiting: a child dead before a wait that got nothing sent nothing
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            if not alive:
                raise RuntimeError(f"memory measurement of {label} failed: its process exited with code "
                                   f"{proc.exitcode} (out of memory?)") from None


def measure_peak_memory(prepare: Prepare, args: tuple, *, device: str, steps: int, label: str) -> dict[str, Any]:
    """``prepare(*args)``'s figures and ``peak_mem_bytes``, the peak of ``steps`` of its training steps, measured
    in a fresh process (see the module's docstring for why and what). ``label`` names it in errors."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(prepare, args, device, steps, queue))
    with _environment(MALLOC_ENV):
        proc.start()
    result = _wait_for_result(proc, queue, label)
    proc.join()
    if "error" in result:
        raise RuntimeError(f"memory measurement of {label} failed: {result['error']}")
    return result
