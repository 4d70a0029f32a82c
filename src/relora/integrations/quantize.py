"""Quantized frozen weights (QLoRA-style ReLoRA): NF4 or int8 storage of the wrapped layers' base weights.

Between restarts W does not change, so it can be stored in 4 or 8 bits
(RELORA_SPEC.md section 2). The base layers become bitsandbytes layers
(``Linear4bit`` NF4 / ``Linear8bitLt`` int8) and peft wraps them with its
quantized LoRA layers. A merge dequantizes W to float32, adds s B A and
re-quantizes in place (spec section 3). Each merge thus adds up to half a
quantization step of error, and over many restarts these errors add up;
with a float32 master copy of W in CPU memory (``master_weights="cpu"``)
merges go into the master and W is re-quantized from it, so W is never
more than one rounding away from the exact sum.

Hand-written here rather than taken from peft or bitsandbytes:
- peft's ``merge`` re-creates the weight parameter (a new tensor object,
  with 8-bit weights rounded through float16 on the way); we write the new
  codes and scales into the existing tensors, so DDP and anything else that
  holds a reference to them stays valid.
- int8 quantization: bitsandbytes casts weights to float16 before its
  row-wise absmax quantization (its CUDA kernel accepts only float16). That
  extra rounding would blur the "at most half a step" bound of a merge, so
  the same row-wise format (int8 codes, float32 row absmax ``SCB``) is
  computed here in float32, identically on CPU and GPU.
NF4 quantization and dequantization use bitsandbytes' own kernels, with one
fix on CPU (``relora.integrations.nf4_cpu_fix``).

Importing this module registers it with the core as the storage backend of the
formats nf4 and int8 (``relora.core.frozen_storage``): ``relora.wrap``, merges,
weight decay, ``unwrap`` and parameter counts reach these layers through it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import nn

from relora.core import DropMessages, frozen_storage
from relora.core.config import QUANT_TYPES
from relora.errors import BitsAndBytesMissing
from relora.integrations.nf4_cpu_fix import fix_cpu_nf4_dequantize

NF4_BLOCKSIZE = 64  # QLoRA's block size: one float32 absmax per 64 weights
# LLM.int8()'s outlier threshold (transformers' default): input columns with a value above it are
# multiplied in 16 bits. It affects only bitsandbytes' int8 matmul kernel (CUDA, and CPU in eval mode).
INT8_THRESHOLD = 6.0
INSTALL_HINT = "pip install 'relora[quantize]' (or: pip install bitsandbytes)"
_MASTER = "relora_master_weight"


# A bitsandbytes warning that is no news to a user of this module: at every int8 matmul of float32 inputs
# (CUDA, and CPU in eval mode), that they are cast to float16, which is how LLM.int8() works. (The one
# bitsandbytes logs at import, when peft imports it, is quieted by relora.core.)
logging.getLogger("bitsandbytes.autograd._functions").addFilter(DropMessages("MatMul8bitLt: inputs will be cast"))


def require_bitsandbytes(quant_type: str = "nf4") -> ModuleType:
    """The bitsandbytes module, or an error naming what to install."""
    try:
        import bitsandbytes
    except ImportError:
        raise BitsAndBytesMissing(
            f"quantize={quant_type!r} needs bitsandbytes, which is not installed: {INSTALL_HINT}"
        ) from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` (a base layer) stores its weight with bitsandbytes."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and hasattr(module, "weight")


# ---------------------------------------------------------------- int8, row-wise absmax
def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' LLM.int8() weight format, in float32: codes round(127 w / absmax_row), scales absmax_row."""
    weight = weight.float()
    absmax = weight.abs().amax(dim=1)
    codes = torch.round(weight * (127.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)).unsqueeze(1))
    return codes.to(torch.int8), absmax


def _int8_scales(base: nn.Module) -> list[torch.Tensor]:
    """Where a Linear8bitLt keeps its row scales: on the weight until its first forward, then in its state."""
    return [s for s in (getattr(base.weight, "SCB", None), base.state.SCB) if s is not None]


# ---------------------------------------------------------------- building quantized layers
_CONV1D = "relora_from_conv1d"  # set on a quantized layer made from a GPT-2 Conv1D: the export turns it back


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear, or of transformers' Conv1D (GPT-2), which stores it as (in, out)."""
    return module.weight.detach().T if _is_conv1d(module) else module.weight.detach()


def _nf4_linear(linear: nn.Module, bnb: ModuleType) -> nn.Module:
    fix_cpu_nf4_dequantize(bnb)
    weight = _linear_weight(linear)
    packed, state = bnb.functional.quantize_4bit(weight.float().contiguous(), blocksize=NF4_BLOCKSIZE,
                                                  compress_statistics=False, quant_type="nf4")
    # Each layer owns its code table: shared, safetensors would save it once and then refuse the load.
    state.code = state.code.clone()
    module = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, quant_type="nf4",
                               compress_statistics=False, compute_dtype=torch.float32, device="meta")
    module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCKSIZE,
                                      compress_statistics=False, quant_type="nf4", module=module,
                                      bnb_quantized=True)
    module.quant_state = state
    # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place for a bf16
    # inference kernel the first time it runs in eval mode without grad (our evaluations). Later training
    # steps then go through that kernel, which has no autograd: the input gradient silently becomes None
    # and earlier layers stop learning. Training must keep the one layout that our merges also rewrite.
    module.support_avx512bf16_for_cpu = False
    module.register_forward_pre_hook(_compute_like_autocast)
    return module


def _compute_like_autocast(module: nn.Module, args: tuple) -> None:
    """Under CUDA autocast, multiply in autocast's dtype, as an nn.Linear would (else in float32)."""
    x = args[0]
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        module.compute_dtype = torch.get_autocast_dtype("cuda")
    else:
        module.compute_dtype = torch.float32


def _int8_linear(linear: nn.Module, bnb: ModuleType) -> nn.Module:
    weight = _linear_weight(linear)
    codes, scales = _int8_rows(weight)
    module = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False,
                                 threshold=INT8_THRESHOLD, device="meta")
    module.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
    return module


def quantize_linears(model: nn.Module, names: list[str], quant_type: str, *,
                     master_weights: str | None = None) -> None:
    """Replace the ``nn.Linear`` modules ``names`` of ``model`` by bitsandbytes layers storing their weights
    in ``quant_type``, quantized on the device the weights are on; biases are kept as they are.

    GPT-2's ``Conv1D`` layers (a linear map with its weight stored transposed) are quantized as the
    linear map they are; ``to_linear`` gives them back as ``Conv1D``, so an exported model loads as
    the architecture it came from. With ``master_weights="cpu"`` the exact float32 weight is kept in
    CPU memory beside each layer.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {', '.join(QUANT_TYPES)}; got {quant_type!r}")
    bnb = require_bitsandbytes(quant_type)
    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear and not _is_conv1d(linear):
            raise ValueError(f"{name}: only nn.Linear and GPT-2 Conv1D layers can be quantized, not "
                             f"{type(linear).__name__}; leave it out of target_modules or train without quantize")
        with torch.no_grad():
            module = _nf4_linear(linear, bnb) if quant_type == "nf4" else _int8_linear(linear, bnb)
        module.bias = linear.bias
        module.train(linear.training)
        module.register_load_state_dict_pre_hook(_load_quant_state)
        if master_weights == "cpu":
            setattr(module, _MASTER, _linear_weight(linear).to("cpu", torch.float32, copy=True))
        if _is_conv1d(linear):
            setattr(module, _CONV1D, True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def peft_sees_quantized(model: nn.Module, quant_type: str | None) -> Iterator[None]:
    """peft builds its quantized LoRA layers only for a model flagged as loaded in 4 or 8 bits (as
    transformers flags models it quantized itself); flag ``model`` for the injection only."""
    flag = {"nf4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}.get(quant_type or "")
    if flag is None:
        yield
        return
    setattr(model, flag, True)
    try:
        yield
    finally:
        delattr(model, flag)


# ---------------------------------------------------------------- dequantize, re-quantize, merge
def dequantize(base: nn.Module) -> torch.Tensor:
    """The weight a quantized base layer multiplies by, in float32, on its device."""
    weight = base.weight
    if type(base).__name__ == "Linear4bit":
        import bitsandbytes.functional as F

        return F.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = _int8_scales(base)[0]
    # the same operations, in the same order, as bitsandbytes' int8 training matmul
    return weight.data.float() * scales.unsqueeze(1).mul(1.0 / 127.0)


@torch.no_grad()
def requantize_(base: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` (float) in the quantized layer, writing into its existing tensors."""
    weight = weight.to(base.weight.device, torch.float32).contiguous()
    if type(base).__name__ == "Linear4bit":
        import bitsandbytes.functional as F

        state = base.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # see _nf4_linear: never created by this module
            raise RuntimeError("the NF4 weight was repacked for bitsandbytes' CPU inference kernel; cannot merge")
        packed, new = F.quantize_4bit(weight, blocksize=state.blocksize, compress_statistics=False, quant_type="nf4")
        base.weight.data.copy_(packed)
        state.absmax.copy_(new.absmax)
        return
    codes, scales = _int8_rows(weight)
    base.weight.data.copy_(codes)
    if base.state.CB is not None and base.state.CB.data_ptr() != base.weight.data.data_ptr():
        base.state.CB.copy_(codes)  # moved across devices after its first forward: a separate copy
    for holder in _int8_scales(base):
        holder.copy_(scales)


@torch.no_grad()
def scale_(base: nn.Module, factor: float) -> None:
    """W <- factor * W in place. Codes stay; the float32 scales (NF4 block absmax, int8 row absmax) and the
    master copy are multiplied, so the dequantized weight is scaled exactly (up to float32 rounding)."""
    master = master_weight(base)
    if master is not None:
        master.mul_(factor)
    if type(base).__name__ == "Linear4bit":
        base.weight.quant_state.absmax.mul_(factor)
        return
    scales = _int8_scales(base)
    scales[0].mul_(factor)
    for holder in scales[1:]:  # the same row scales held twice (or the same tensor twice)
        if holder.data_ptr() != scales[0].data_ptr():
            holder.copy_(scales[0])


def master_weight(base: nn.Module) -> torch.Tensor | None:
    return getattr(base, _MASTER, None)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The float32 weight the layer stands for: the master copy if kept, else the dequantized weight."""
    master = master_weight(base)
    return master.to(base.weight.device, copy=True) if master is not None else dequantize(base)


@torch.no_grad()
def merge_(base: nn.Module, delta: torch.Tensor) -> None:
    """W <- W + delta in float32, then re-quantized (from the master copy when kept: no drift)."""
    master = master_weight(base)
    if master is not None:
        master.add_(delta.to(master.device, torch.float32))
        requantize_(base, master)
    else:
        requantize_(base, dequantize(base) + delta.to(base.weight.device, torch.float32))


def to_linear(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain nn.Linear holding ``weight`` (float32, (out, in)) and the quantized layer's bias; a
    transformers Conv1D holding its transpose if the layer was made from one."""
    if getattr(base, _CONV1D, False):
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(base.out_features, base.in_features)
        conv.weight = nn.Parameter(weight.float().T.contiguous(), requires_grad=True)
        conv.bias = base.bias
        return conv
    linear = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.float(), requires_grad=True)
    linear.bias = base.bias
    return linear


# ---------------------------------------------------------------- checkpoints
def master_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float32 master weights by module name (empty without master weights)."""
    return {name: master_weight(m) for name, m in model.named_modules() if master_weight(m) is not None}


@torch.no_grad()
def load_master_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Restore master weights saved by ``master_state``; every name must match."""
    own = master_state(model)
    if set(own) != set(tensors):
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise ValueError(f"master weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in tensors.items():
        own[name].copy_(tensor)


def _load_quant_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                      missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Take a quantized layer's scales out of a state dict into the layer, in place.

    bitsandbytes saves them beside the weight (NF4: ``weight.absmax``, ``weight.quant_map`` and a packed
    description; int8: ``SCB``) but loads them only through transformers' quantizer. The codes
    themselves load as the ``weight`` parameter, like any other.
    """
    if type(module).__name__ == "Linear4bit":
        import bitsandbytes.utils

        state = module.weight.quant_state
        absmax = state_dict.pop(prefix + "weight.absmax", None)
        code = state_dict.pop(prefix + "weight.quant_map", None)
        packed = state_dict.pop(prefix + "weight.quant_state.bitsandbytes__nf4", None)
        if absmax is None or code is None or packed is None:
            missing_keys.append(prefix + "weight.absmax")
            return
        saved = bitsandbytes.utils.unpack_tensor_to_dict(packed)
        if (saved.get("quant_type"), saved.get("blocksize"), list(saved.get("shape") or [])) != (
                "nf4", state.blocksize, list(state.shape)) or not torch.equal(code.to(state.code), state.code):
            error_msgs.append(f"{prefix}weight: saved as {saved}, the model holds NF4 blocks of {state.blocksize} "
                              f"of shape {list(state.shape)}")
            return
        state.absmax.copy_(absmax)
        return
    scales = state_dict.pop(prefix + "SCB", None)
    state_dict.pop(prefix + "weight_format", None)  # always "row" (0) in the bitsandbytes versions we support
    if scales is None:
        missing_keys.append(prefix + "SCB")
        return
    for holder in _int8_scales(module):
        holder.copy_(scales)


# ---------------------------------------------------------------- sizes
def frozen_bytes_per_weight(quant_type: str | None, in_features: int, *, dtype_bytes: int = 4) -> float:
    """Bytes one frozen weight takes, scales included: int8 1 + 4 / d_in (a float32 absmax per row),
    NF4 0.5 + 4 / 64 (a float32 absmax per block of 64); unquantized ``dtype_bytes``."""
    if quant_type is None:
        return float(dtype_bytes)
    if quant_type == "int8":
        return 1.0 + 4.0 / in_features
    if quant_type == "nf4":
        return 0.5 + 4.0 / NF4_BLOCKSIZE
    raise ValueError(f"quantize must be one of {', '.join(QUANT_TYPES)}; got {quant_type!r}")


def storage_bytes(base: nn.Module) -> int:
    """Bytes the frozen weight of one quantized base layer occupies (codes and scales)."""
    if type(base).__name__ == "Linear4bit":
        state = base.weight.quant_state
        return base.weight.numel() * base.weight.element_size() + state.absmax.numel() * state.absmax.element_size()
    scales = _int8_scales(base)[0]
    return base.weight.numel() * base.weight.element_size() + scales.numel() * scales.element_size()


def packed_numel(param: torch.Tensor) -> int | None:
    """Number of weights an NF4 tensor stands for (two per byte); None for any other tensor."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None and getattr(state, "shape", None) else None


# ---------------------------------------------------------------- the core's interface
frozen_storage.register(frozen_storage.StorageBackend(
    name="bitsandbytes", formats=QUANT_TYPES, owns=is_quantized, convert=quantize_linears,
    injecting=peft_sees_quantized, dense_weight=dense_weight, merge_=merge_, scale_=scale_, to_dense=to_linear,
    numel=packed_numel,
))
