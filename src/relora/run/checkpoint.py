"""Checkpoints: atomic save, find the latest complete one, load.

A checkpoint is a directory ``checkpoints/step_N/`` holding the model weights
(safetensors, adapters included, quantized weights as their codes and scales;
under FSDP2 a sharded ``dcp/`` directory of model and optimizer written by
``torch.distributed.checkpoint``), the float32 master copies of quantized
weights if the run keeps them, the optimizer, scheduler and controller
states, RNG states, the trainer's counters (incl. the data position) and the
resolved config. RNG states are saved for every rank (each restores its own: dropout masks differ by
rank), and bf16 frozen weights keep their merge residuals (``relora.core.adapters.merge_residual``) beside
them. It is written into a temporary sibling, fsynced and renamed,
and ``complete.json`` is written last inside it, so a directory without it is
never taken for a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from relora.errors import DiskSpaceError
from relora.fileio import fsync_dir as _fsync_dir
from relora.fileio import swap_dir, write_json_atomic, write_text_atomic  # noqa: F401  (ckpt.write_*: train's callers)
from relora.integrations.quantize import load_master_state, master_state

logger = logging.getLogger(__name__)

MARKER = "complete.json"
MASTER_WEIGHTS = "master_weights.safetensors"
MERGE_RESIDUALS = "merge_residuals.safetensors"
SHARDED_DIR = "dcp"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def current_umask() -> int:
    """The process's umask (read from /proc on Linux, so no other thread sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes the user's umask asks for (0o777 / 0o666 minus it).

    A directory made by ``tempfile.mkdtemp`` is 0o700, and safetensors writes through a private temporary
    file (0o600): renamed into place, they would stay readable by their owner only.
    """
    mask = current_umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def rng_state(device: torch.device | None = None) -> dict:
    """This process's torch (CPU), numpy and python RNG states, and CUDA's: with a ``device`` (a rank's
    own GPU under torchrun) that GPU's alone, without one every visible GPU's (one process owns them all)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    elif device is None and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_rng_states(seed: int, rank: int = 0) -> None:
    """Seed this process's torch (every device), numpy and python RNGs from the run's seed and the rank.

    What draws from them during training (adapter dropout, anything a user's model samples) then repeats
    with the seed: without it the streams start wherever the process left them, and two runs with one
    seed differed from the first step with dropout (issue 16). Ranks get different, seed-determined
    streams (numpy's SeedSequence of (seed, rank)), so dropout masks differ across ranks as under DDP they
    should. A resume replaces these states by the saved ones (``restore_rng_states``).
    """
    value = int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
    torch.manual_seed(value)  # every CUDA device too
    np.random.seed(value % 2**32)
    random.seed(value)


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` returned (``device``: the GPU a ``cuda_device`` state belongs to)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)


def gather_rng_states(dist: Any = None) -> list[dict] | None:
    """Every rank's ``rng_state``, in rank order, on rank 0 (None on the others); a collective under torchrun."""
    if dist is None or not dist.active:
        return [rng_state()]
    return dist.gather_object(rng_state(dist.device))


def restore_rng_states(saved: dict | list[dict], *, rank: int = 0, world_size: int = 1,
                       device: torch.device | None = None) -> None:
    """Give this rank the RNG state it saved (``saved``: ``gather_rng_states``' list; a dict is an older
    checkpoint's one state, rank 0's).

    At another world size than the save's, ranks beyond the saved ones get a state derived from rank 0's
    and their rank (deterministic: a second resume draws the same), and rank 0 warns that dropout will
    not repeat the interrupted run's; surplus saved states are unused. Per-rank batches differ then anyway.
    """
    states = [saved] if isinstance(saved, dict) else list(saved)
    if len(states) != world_size and rank == 0:
        logger.warning(
            "resuming on %d process(es) from a checkpoint with the RNG states of %d: %s, so dropout will not "
            "repeat what the saved run would have drawn", world_size, len(states),
            f"ranks {len(states)}-{world_size - 1} start from states derived from rank 0's and their rank"
            if world_size > len(states) else f"the states of ranks {world_size}-{len(states) - 1} are unused")
    if rank < len(states):
        set_rng_state(states[rank], device)
        return
    digest = hashlib.sha256(states[0]["torch"].numpy().tobytes() + rank.to_bytes(8, "little")).digest()
    seed = int.from_bytes(digest[:8], "little") >> 1  # torch.manual_seed takes up to 2**63 - 1
    torch.manual_seed(seed)  # also every GPU's generator
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    model: nn.Module,
    states: dict[str, Any],
    trainer_state: dict,
    config: dict,
    keep: int,
    dist: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write ``checkpoints_dir/step_{step}`` atomically; keep only the newest ``keep``.

    ``states`` holds the scheduler / controller (and, unsharded, optimizer)
    state dicts (saved with torch.save); ``trainer_state`` is JSON (step,
    tokens, data position). With a ``relora.run.distributed.Dist`` every rank
    calls this: an FSDP2 model and its ``optimizer`` are saved sharded with
    ``torch.distributed.checkpoint`` by all ranks into ``dcp/`` (loadable at
    any world size); everything else is written by rank 0 alone (under DDP
    every rank holds the same weights).
    """
    sharded = dist is not None and dist.sharded
    main = dist is None or dist.is_main
    from relora.core.adapters import (
        merge_residuals,  # peft: only when saving, not for readers of run directories
    )

    rngs = gather_rng_states(dist)  # collectives first, on every rank
    residuals = merge_residuals(model)
    final = checkpoints_dir / f"step_{step}"
    tmp = None
    if main:
        tmp = _new_temporary(checkpoints_dir, step, estimate_bytes(model, {**states, "residuals": residuals},
                                                                   optimizer if sharded else None))
    if sharded:
        tmp = dist.broadcast_object(tmp)
    try:
        if sharded:
            _save_sharded(model, optimizer, tmp / SHARDED_DIR)
            dist.barrier()  # every rank's shards are on disk before rank 0 marks the checkpoint complete
        if main:
            if not sharded:
                # save_model stores tied weights (GPT-2's head is its embedding) once; save_file refuses them.
                save_model(model, str(tmp / "model.safetensors"))
            _write_states(tmp, model, {**states, "rng": rngs}, residuals, trainer_state, config)
            _fsync_tree(tmp)
            _write_json(tmp / MARKER, {"step": step, "sha256": _checksums(tmp)})
            apply_umask_modes(tmp)
            _fsync_dir(tmp)
            swap_dir(tmp, final)
            _fsync_dir(checkpoints_dir)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        for old in list_checkpoints(checkpoints_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist is not None:
        dist.barrier()  # nobody reads or prunes checkpoints while rank 0 is still renaming
    return final


def _new_temporary(checkpoints_dir: Path, step: int, needed_bytes: int) -> Path:
    """A fresh temporary directory for step ``step``'s checkpoint, once the space for it is known to be there."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(checkpoints_dir)
    check_free_space(checkpoints_dir, needed_bytes)
    return Path(tempfile.mkdtemp(prefix=f".step_{step}.tmp-", dir=checkpoints_dir))


def _write_states(tmp: Path, model: nn.Module, states: dict[str, Any], residuals: dict[str, torch.Tensor],
                  trainer_state: dict, config: dict) -> None:
    """Everything of a checkpoint but the weights: master weights, merge residuals, states.pt, JSON, config."""
    masters = master_state(model)
    if masters:  # what a quantized run's weights really are: resume needs them, not only the codes
        save_file({k: v.contiguous() for k, v in masters.items()}, str(tmp / MASTER_WEIGHTS))
    if residuals:  # bf16 frozen weights: what the merges could not store in them
        save_file({k: v.contiguous() for k, v in residuals.items()}, str(tmp / MERGE_RESIDUALS))
    torch.save(states, tmp / "states.pt")
    _write_json(tmp / "trainer_state.json", trainer_state)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _remove_stale_temporaries(checkpoints_dir: Path) -> None:
    """Temporary directories left by a save that was killed (never complete checkpoints)."""
    for path in checkpoints_dir.glob(".step_*"):
        shutil.rmtree(path, ignore_errors=True)


def estimate_bytes(model: nn.Module, states: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes a checkpoint will take: every tensor of the model and of the saved states (a close upper bound)."""

    def tensor_bytes(value: Any) -> int:
        if torch.is_tensor(value):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(tensor_bytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(tensor_bytes(v) for v in value)
        return 0

    total = sum(tensor_bytes(t) for t in model.state_dict().values()) + tensor_bytes(states)
    total += tensor_bytes(master_state(model))
    if optimizer is not None:
        total += tensor_bytes(list(optimizer.state.values()))
    return total


def check_free_space(directory: Path, needed: int, margin: float = 1.1) -> None:
    """Fail before writing anything when ``directory``'s file system cannot hold ``needed`` bytes."""
    free = shutil.disk_usage(directory).free
    if free < needed * margin:
        raise DiskSpaceError(
            f"not enough disk space for a checkpoint in {directory}: {free / 2**30:.2f} GiB free, about "
            f"{needed * margin / 2**30:.2f} GiB needed; free some space (or lower --keep-checkpoints) and --resume"
        )


def _checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(path: Path) -> str | None:
    """None if every file the marker names is there with its checksum; else what is wrong, in a few words."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return f"{MARKER} is missing or unreadable"
    expected = marker.get("sha256")
    if not isinstance(expected, dict):  # written before checksums were recorded: trust the marker alone
        return None
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)


def _save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    """Every rank writes its shards of the model and optimizer (FQN-keyed, so any world size can load them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [])
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint at ``path`` holds FSDP2 shards (``dcp/``) rather than one safetensors file."""
    return (path / SHARDED_DIR).is_dir()


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore a sharded model and optimizer from ``path/dcp``; the world size may differ from the save's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    _load_merge_residuals(model, path)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path, *, verify: bool = False) -> Path | None:
    """The newest complete checkpoint; with ``verify``, the newest whose files match their checksums,
    skipping (with a warning) any newer one that is corrupt."""
    found = list_checkpoints(checkpoints_dir)
    if not verify:
        return found[-1] if found else None
    for path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is corrupt (%s): skipping it, trying the one before", path.name, problem)
    return None


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def read_config(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text())


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint's weights into an unsharded ``model`` (strict: every key must match).

    A sharded (FSDP2) checkpoint is read whole by one process: DCP reshards on load.
    """
    if is_sharded(path):
        import torch.distributed.checkpoint as dcp

        weights = model.state_dict()
        with warnings.catch_warnings():  # loading in one process is the intent here, not an accident
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({"model": weights}, checkpoint_id=str(path / SHARDED_DIR))
        model.load_state_dict(weights, strict=True)
        _load_merge_residuals(model, path)
        return
    load_model(model, str(path / "model.safetensors"), strict=True)  # restores tied weights from their one copy
    _load_merge_residuals(model, path)
    masters = master_state(model)
    if masters or (path / MASTER_WEIGHTS).is_file():
        if not (path / MASTER_WEIGHTS).is_file():
            raise ValueError(f"{path} holds no {MASTER_WEIGHTS}, but the model keeps master weights")
        load_master_state(model, load_file(str(path / MASTER_WEIGHTS)))


def _load_merge_residuals(model: nn.Module, path: Path) -> None:
    if (path / MERGE_RESIDUALS).is_file():
        from relora.core.adapters import load_merge_residuals

        load_merge_residuals(model, load_file(str(path / MERGE_RESIDUALS)))


def load_states(path: Path) -> dict:
    # weights_only=False: the file holds numpy / python RNG states, and it is our own file.
    return torch.load(path / "states.pt", map_location="cpu", weights_only=False)
