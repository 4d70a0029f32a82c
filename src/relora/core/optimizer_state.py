"""How optimizers keep per-parameter state: the layouts ReLoRA's optimizer reset can prune, and its size.

An optimizer's per-parameter state is recognised by its keys ("layouts"):
Adam's ``exp_avg`` / ``exp_avg_sq`` (+ AMSGrad's ``max_exp_avg_sq``),
bitsandbytes' ``state1`` / ``state2`` (32-bit, or 8-bit codes with their block
scales), and Adafactor's factored second moment (torch: ``row_var`` /
``col_var``; transformers: ``exp_avg_sq_row`` / ``exp_avg_sq_col``, with an
optional ``exp_avg``). Any other state (SGD momentum, Lion, a custom
optimizer) is refused with a ValueError, because a restart that silently
prunes nothing looks like a healthy run (RELORA_SPEC.md section 4). The
pruning itself is ``relora.core.pruning``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from relora.core import sharding

# Per-entry layouts: (first moment or None, second moment, other second-moment-like tensors pruned with it).
_PER_ENTRY = (
    ("exp_avg", "exp_avg_sq", ("max_exp_avg_sq",)),  # torch Adam/AdamW (AMSGrad); transformers Adafactor, 1-D
    ("state1", "state2", ()),  # bitsandbytes Adam/AdamW (8-bit, paged, 32-bit)
    (None, "variance", ()),  # torch Adafactor, 1-D
    (None, "exp_avg_sq", ()),  # transformers Adafactor without beta1, 1-D
)
# Factored second moment, v_ij ~ row_i * col_j / mean(row): (first moment or None, row, col).
_FACTORED = (
    (None, "row_var", "col_var"),  # torch.optim.Adafactor
    ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"),  # transformers.optimization.Adafactor
)
_SCALES = ("qmap1", "qmap2", "absmax1", "absmax2")  # bitsandbytes 8-bit: code maps and block scales


@dataclass
class Moment:
    """One per-entry state tensor; 8-bit bitsandbytes codes are read through their code map and block scales."""

    tensor: torch.Tensor
    qmap: torch.Tensor | None = None
    absmax: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        """The moment as numbers (dequantized for 8-bit codes)."""
        if self.qmap is None:
            return self.tensor
        codes = self.qmap[self.tensor.long()]
        if self.absmax is None:  # one scale per tensor: the code order is the value order
            return codes
        flat = codes.flatten()
        block = _block_size(flat.numel(), self.absmax.numel())
        scales = self.absmax.repeat_interleave(block)[: flat.numel()]
        return (flat * scales).view_as(codes)

    def keep_only(self, mask: torch.Tensor) -> None:
        """Zero the entries outside ``mask``, in place (an 8-bit entry gets the code of exactly 0)."""
        if self.qmap is None:
            # masked_fill, not a multiply: an inf or nan in a pruned entry must become 0 too
            sharding.local(self.tensor).masked_fill_(~sharding.local_part(mask, self.tensor), 0)
            return
        zero = (self.qmap == 0).nonzero().flatten()
        self.tensor[~mask.to(self.tensor.device)] = zero[0].to(self.tensor.dtype)


def _block_size(numel: int, blocks: int) -> int:
    """bitsandbytes' block size (a power of two) from the number of block scales it keeps."""
    size = 1
    while -(-numel // size) > blocks:
        size *= 2
    return size


@dataclass
class StateLayout:
    """Where a parameter's prunable state is, and how it is read."""

    first: Moment | None = None
    second: Moment | None = None
    others: list[Moment] = field(default_factory=list)  # pruned with the second moment's mask (AMSGrad)
    row: torch.Tensor | None = None  # factored second moment
    col: torch.Tensor | None = None

    @property
    def factored(self) -> bool:
        return self.row is not None


def unprunable(optimizer: torch.optim.Optimizer, state: dict, why: str) -> ValueError:
    """The error for state a restart cannot prune: the optimizer, its state keys, why, and what relora knows."""
    keys = ", ".join(sorted(map(str, state))) or "none"
    return ValueError(
        f"cannot prune the optimizer state of {type(optimizer).__name__} (state keys: {keys}): {why}; "
        "ReLoRA's optimizer reset knows Adam/AdamW (also AMSGrad, fused), bitsandbytes (8-bit/paged) Adam/AdamW "
        "and Adafactor (torch, transformers). Use one of them, or prune='none' to restart without a reset"
    )


def state_layout(optimizer: torch.optim.Optimizer, state: dict, param: torch.Tensor) -> StateLayout:
    """The prunable state of one parameter; ValueError for state relora does not know (spec section 4)."""
    known: set[str] = {"step"}
    layout = StateLayout()
    for first, second, others in _PER_ENTRY:
        if second in state and (first is None or first in state):
            quantized = state[second].dtype == torch.uint8
            if quantized and sharding.is_sharded(state[second]):
                raise unprunable(optimizer, state, "8-bit state sharded with FSDP is not supported")

            def moment(key: str, i: int) -> Moment:
                if state[key].dtype != torch.uint8:
                    return Moment(state[key])
                if f"qmap{i}" not in state or not bool((state[f"qmap{i}"] == 0).any()):
                    raise unprunable(optimizer, state, f"8-bit {key} without a code for 0")
                return Moment(state[key], state[f"qmap{i}"], state.get(f"absmax{i}"))

            layout.second = moment(second, 2)
            layout.first = moment(first, 1) if first is not None else None
            layout.others = [Moment(state[k]) for k in others if k in state]
            known |= {second, *others, *([first] if first else []), *_SCALES}
            break
    else:
        for first, row, col in _FACTORED:
            if row in state and col in state:
                if param.dim() != 2 or any(sharding.is_sharded(state[k]) for k in (row, col)):
                    raise unprunable(optimizer, state,
                                     "a factored second moment is pruned for matrices only, unsharded")
                layout.row, layout.col = state[row], state[col]
                layout.first = Moment(state[first]) if first is not None and first in state else None
                known |= {row, col, *([first] if first else [])}
                break
    if layout.second is None and layout.row is None:
        raise unprunable(optimizer, state, "it has no second moment relora knows how to prune")
    tensors = [layout.first, layout.second, *layout.others]
    if any(m is not None and m.tensor.shape != param.shape for m in tensors):
        raise unprunable(optimizer, state, "its moments are not shaped like the parameter")
    unknown = [k for k, v in state.items() if k not in known and torch.is_tensor(v) and v.numel() > 1]
    if unknown:  # a third moment left unpruned would keep the old state alive
        raise unprunable(optimizer, state, f"it holds per-entry state relora would not prune ({', '.join(unknown)})")
    return layout


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process's optimizer state holds: every tensor reachable from ``optimizer.state``, measured.

    The walk goes through dicts, lists, tuples and the attributes of other
    objects, so the projection matrices that GaLore and APOLLO keep on a
    projector object inside the state are counted with the moments. Each
    storage is counted once and whole, views included: that is what stays
    allocated (GaLore 1.0 keeps a slice of the full SVD factor, so it holds
    min(m, n) x n, not r x n). Sharded (FSDP2) state counts the local shard.
    """
    seen: set[tuple[str, int]] = set()

    def walk(value: object, depth: int) -> int:
        if torch.is_tensor(value):
            storage = sharding.local(value).untyped_storage()
            key = (str(storage.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                return 0
            seen.add(key)
            return storage.nbytes()
        if depth > 4:
            return 0
        if isinstance(value, dict):
            return sum(walk(v, depth + 1) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v, depth + 1) for v in value)
        if hasattr(value, "__dict__") and not isinstance(value, type):
            return sum(walk(v, depth + 1) for v in vars(value).values())
        return 0

    return sum(walk(state, 0) for state in optimizer.state.values())
