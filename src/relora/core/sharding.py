"""Reading and writing tensors that may be sharded (FSDP2 DTensors), as if they were whole.

The ReLoRA math (merge, re-init, optimizer pruning) is defined on whole
matrices: a magnitude mask is a top-k over the whole tensor, a re-init draws
the whole of A from one seeded generator. Under FSDP2 each rank holds only a
row-slice of W, A, B and of their Adam moments. These helpers let the math
gather what it must (A, B and the moments are small: r x (d_in + d_out)),
compute on whole tensors exactly as on one process, and write back only the
local slice. Without sharding they are plain tensor operations, so the math
modules do not need to know which case they are in.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - builds of torch without distributed support
    DTensor = None
    distribute_tensor = None


def is_sharded(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor; the tensor itself otherwise)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (the tensor itself when not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The slice of ``whole`` that this rank holds of ``like``; ``whole`` must be equal on every rank.

    No communication: ``src_data_rank=None`` makes each rank cut its own slice.
    """
    if not is_sharded(like):
        return whole.to(like.device)
    whole = whole.to(like.device_mesh.device_type)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


@torch.no_grad()
def assign_(target: torch.Tensor, whole: torch.Tensor) -> None:
    """target <- whole (cast to target's dtype), writing only the local slice of a sharded target."""
    local(target).copy_(local_part(whole, target))


def count_zero_in_both(m: torch.Tensor, v: torch.Tensor) -> int:
    """Entries where m == 0 and v == 0, over the whole tensors (summed across shards)."""
    zero = (m == 0) & (v == 0)
    total = zero.sum()
    return int(total.full_tensor() if is_sharded(total) else total)
