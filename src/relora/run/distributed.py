"""Process group, DDP / FSDP2 application, and the few collectives the trainer needs.

The only module that reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK). Everything else receives a ``Dist`` object; with one process and
no torchrun it is inert (``mode == "none"``) and every method is a no-op, so
the training loop reads the same in both cases.

Backends: NCCL on CUDA, gloo on CPU. Collectives time out after
``timeout_s`` so that a rank that died (or hangs) ends the job with an error
instead of leaving the others waiting forever; under torchrun the launcher
also stops every other rank as soon as one fails.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from relora.core import sharding
from relora.errors import DistributedError

logger = logging.getLogger(__name__)

MODES = ("ddp", "fsdp")


@dataclass
class Dist:
    """This process's place in the job."""

    mode: str = "none"  # "none" (one process, no wrapper), "ddp" or "fsdp"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @property
    def active(self) -> bool:
        return self.mode != "none"

    # ------------------------------------------------------------ collectives
    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum (or max) of ``values`` over ranks, in float64."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor.tolist()

    def broadcast_object(self, value: object) -> object:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather_object(self, value: object) -> list | None:
        """Every rank's ``value``, in rank order, on rank 0; None on the other ranks."""
        if not self.active:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.active:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ------------------------------------------------------------ parallelism
    def parallelize(self, model: nn.Module) -> nn.Module:
        """The module to run forward/backward on: DDP around ``model``, or ``model`` sharded in place.

        FSDP2 shards every transformer block, then the root (embeddings, final
        norm, head), as torchtitan does: one all-gather per block, freed after
        use. The model's own methods (merge, state_dict) keep working on it.
        """
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            dtypes = {p.dtype for p in model.parameters()}
            if len(dtypes) > 1:
                raise DistributedError(
                    f"FSDP2 needs one parameter dtype but the model has {sorted(map(str, dtypes))}; "
                    "keep frozen weights in float32 with --distributed fsdp"
                )
            for block in transformer_blocks(model):
                fully_shard(block, mesh=self.mesh)
            fully_shard(model, mesh=self.mesh)
        return model

    @property
    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        return self._mesh

    @contextlib.contextmanager
    def gradient_sync(self, engine: nn.Module, enabled: bool):
        """Synchronise gradients only on the last micro-batch of an accumulation.

        DDP's ``no_sync`` skips the all-reduce; FSDP2's switch skips the
        reduce-scatter. Either way the gradients of earlier micro-batches
        accumulate locally and are reduced once, with the last.
        """
        if self.mode == "ddp" and not enabled:
            with engine.no_sync():
                yield
            return
        if self.mode == "fsdp":
            engine.set_requires_gradient_sync(enabled)
        yield

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of ``model.state_dict()`` whole, on the CPU, on every rank (collective when sharded)."""
        return {k: sharding.full(v).detach().cpu() for k, v in model.state_dict().items()}

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a Hugging Face model (the classes it names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise DistributedError(f"cannot find the transformer blocks of {type(model).__name__} to shard with FSDP2")
    return blocks


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun); no process group needed."""
    return int(os.environ.get("RANK", 0))


def setup(mode: str, device: torch.device, timeout_s: float = 600.0) -> Dist:
    """Join the job torchrun started (or run alone) and return this process's ``Dist``.

    ``device`` is the device type chosen for the run; under torchrun a CUDA run
    uses ``cuda:LOCAL_RANK``. ``--distributed fsdp`` without torchrun forms a
    group of one, so FSDP2 (and its sharded checkpoints) work on one device too.
    """
    if mode not in MODES:
        raise DistributedError(f"unknown --distributed {mode!r}; choose one of: {', '.join(MODES)}")
    launched = launched_by_torchrun()
    if not launched and mode == "ddp":
        return Dist(device=device)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "use --nproc-per-node <= the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        pass  # a caller (a test, a notebook) formed the group already
    elif launched:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if rank != 0:  # only rank 0 reports; other ranks still show warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("relora").setLevel(logging.WARNING)
    logger.info("distributed: %s over %d process(es), backend %s, device %s", mode, world, backend, device.type)
    return Dist(mode=mode, rank=rank, world_size=world, local_rank=local_rank, device=device)
