"""Saving a run's model as a plain Hugging Face directory: the reference weights and the final model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from torch import nn

from relora.core.adapters import unwrap
from relora.core.config import ReLoRAConfig
from relora.errors import ConfigError
from relora.fileio import ownership, swap_dir
from relora.run import checkpoint as ckpt
from relora.run.build import gathered_model
from relora.run.config import ADAPTER_METHODS, TrainConfig
from relora.run.distributed import Dist


def save_dense(model: nn.Module, tokenizer: object | None, out: Path) -> Path:
    """Save an unwrapped model (+ tokenizer) as a Hugging Face directory, atomically.

    An existing `out` is replaced only if relora wrote it (ownership.py): never a directory of the user's.
    """
    reason = ownership.why_not_replaceable(out, ownership.MODEL)
    if reason is not None:
        raise ConfigError(f"{out} cannot be replaced: {reason}; relora never deletes it, choose another directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        ownership.mark(tmp, ownership.MODEL)
        ckpt.apply_umask_modes(tmp)
        swap_dir(tmp, out)  # the old copy goes only once the new one is in: never neither
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_dense(model: nn.Module, tokenizer: object | None, out: Path) -> Path:
    """Merge the last cycle, drop the adapters, save a plain HF model (+ tokenizer) atomically.

    Merging first avoids the reference code's defect of saving the final model
    without its last cycle (spec section 3).
    """
    return save_dense(unwrap(model).cpu(), tokenizer, out)


def reference_step(cfg: TrainConfig) -> int | None:
    """Step whose weights ``relora analyze`` measures the update against by default.

    Where low-rank training starts: the end of the warm start, or step 0
    without one. Methods that train every weight (full, control, GaLore,
    APOLLO) use the step at which the adapter methods of the same config
    switch, so that dW spans the same steps in every run (for full-rank
    training with equal seeds the warm starts are even identical).
    """
    if cfg.method not in ADAPTER_METHODS:
        step = cfg.warm_start_steps if cfg.warm_start else 0
    else:
        step = cfg.relora_phase_start
    return step if step < cfg.steps else None


def save_reference(cfg: TrainConfig, relora_cfg: ReLoRAConfig | None, model: nn.Module, dist: Dist, *,
                   vocab_size: int, wrapped: bool) -> None:
    """The dense weights of ``reference_step`` into the run's ``reference/``; a collective under FSDP2."""
    dense = gathered_model(cfg, relora_cfg, model, dist, vocab_size=vocab_size, wrapped=wrapped)
    if dense is not None:
        save_dense(dense, None, Path(cfg.out) / "reference")
    dist.barrier()
