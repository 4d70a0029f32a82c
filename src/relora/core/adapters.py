"""Adapters: wrap linear layers with peft LoRA layers, merge them, re-init them.

We build on peft's ``LoraLayer`` (base_layer, lora_A, lora_B, scaling) so that
quantized base layers and the peft ecosystem work, and add ReLoRA's rules
(RELORA_SPEC.md sections 2-3): A Kaiming-uniform and B zero at wrap and at
every re-init, frozen base weights, everything else trainable at full rank,
merges computed in float32 in place. peft's own ``merge`` adds the delta in the
base weight's dtype and ``reset_lora_parameters`` draws from the global RNG;
neither is deterministic across data-parallel ranks, hence the code below.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from relora.core import frozen_storage, sharding
from relora.core.config import ReLoRAConfig

ADAPTER = "default"


def _linear_types() -> tuple[type, ...]:
    try:  # GPT-2 style models use transformers' Conv1D (a linear with transposed weight)
        from transformers.pytorch_utils import Conv1D

        return (nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)


def _name_matches(name: str, pattern: str) -> bool:
    """peft's rule (exact name or dotted suffix), plus a full-name regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Names of the linear layers to wrap.

    ``patterns=None`` selects every linear layer except the output head: for
    LLaMA that is q/k/v/o_proj and gate/up/down_proj (spec section 2). A pattern
    matches a module's full name, a dotted suffix of it (``"q_proj"``), or is a
    regular expression matched against the full name.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    linear = _linear_types()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, linear)
        and module is not head
        and (patterns is None or any(_name_matches(name, p) for p in patterns))
    ]


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """Every wrapped layer, in module order (the order all ranks agree on)."""
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B matrices of every adapter: the parameters ReLoRA resets."""
    params = []
    for layer in lora_layers(model):
        params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
    return params


def base_weight(layer: LoraLayer) -> torch.Tensor:
    """The frozen weight W of a wrapped layer (float storage; quantized layers go through ``frozen_storage``)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise NotImplementedError(
            f"merging into a {type(base).__name__} base layer is not supported yet (only float weights)"
        )
    return weight


def delta_weight(layer: LoraLayer, scale: float | None = None) -> torch.Tensor:
    """s * B @ A in float32, laid out like the base weight: the one place it is computed.

    Whole on every rank, also when A and B are sharded (they are small).
    ``scale`` replaces s (the layer's alpha / r) only for the study-only
    reference defect ``unscaled-merge`` (scale 1).
    """
    a = sharding.full(layer.lora_A[ADAPTER].weight).float()
    b = sharding.full(layer.lora_B[ADAPTER].weight).float()
    delta = (b @ a) * (layer.scaling[ADAPTER] if scale is None else scale)
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


@torch.no_grad()
def merge_layer(layer: LoraLayer, scale: float | None = None) -> None:
    """W <- W + s B A, summed in float32 and rounded once to W's dtype, in place.

    In place on the same tensor object, so the optimizer and any DDP/FSDP
    references stay valid. A sharded W gets the slice of the delta it holds.
    A bf16 W also adds the residual the previous merges' roundings left
    (``merge_residual``) and keeps the new one, so many small merges add up
    to their sum rounded once. A quantized W is dequantized, summed in
    float32 and re-quantized.
    ``scale`` replaces s (``delta_weight``; only the reference defect ``unscaled-merge``).
    """
    storage = frozen_storage.backend_of(layer.get_base_layer())
    if storage is not None:
        storage.merge_(layer.get_base_layer(), delta_weight(layer, scale))
        return
    weight = base_weight(layer)
    part = sharding.local(weight)
    total = part.float() + sharding.local_part(delta_weight(layer, scale), weight)
    if part.dtype == torch.float32:
        part.copy_(total)
        return
    # Rounding W + dW to bf16 drops whatever of dW is below half an ulp of W (a third of a small update);
    # carried into the next merge, Kahan-style, the sum of all merges is rounded once, not once per merge.
    residual = merge_residual(layer)
    if residual is not None:
        total += residual.to(total.device)
    part.copy_(total)
    _set_merge_residual(layer, total - part.float())


_RESIDUAL = "relora_merge_residual"


def merge_residual(layer: LoraLayer) -> torch.Tensor | None:
    """What earlier merges into a low-precision (bf16) W could not store: float32, laid out like this rank's
    part of W, in CPU memory; None before the first merge (and always for float32 or quantized W).

    W + residual is the float32 weight the merges add up to. It lives in CPU memory, as the quantized
    layers' master weights do, so that bf16 storage keeps its device-memory saving (2 bytes per frozen
    weight on the device, 4 more in CPU memory); each merge moves one layer's residual to the device and back.
    """
    return getattr(layer.get_base_layer(), _RESIDUAL, None)


def _set_merge_residual(layer: LoraLayer, residual: torch.Tensor) -> None:
    setattr(layer.get_base_layer(), _RESIDUAL, residual.detach().to("cpu", torch.float32))


def merge_residuals(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's merge residual whole, by layer name (for checkpoints; empty before the first bf16 merge).

    A collective when W is sharded (FSDP2): every rank must call it.
    """
    residuals = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and merge_residual(layer) is not None:
            residuals[name] = _whole(merge_residual(layer), base_weight(layer))
    return residuals


def _whole(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``part`` is this rank's slice, sliced as ``like`` (a DTensor) is."""
    if not sharding.is_sharded(like):
        return part
    from torch.distributed.tensor import DTensor

    local = part.to(sharding.local(like).device)
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor().cpu()


def load_merge_residuals(model: nn.Module, residuals: dict[str, torch.Tensor]) -> None:
    """Restore residuals saved by ``merge_residuals`` (each rank keeps its slice); every name must be a wrapped
    layer stored below float32."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    unknown = sorted(set(residuals) - {n for n, m in layers.items() if base_weight(m).dtype != torch.float32})
    if unknown:
        raise ValueError(f"merge residuals for layers without low-precision frozen weights: {unknown[:3]}")
    for name, whole in residuals.items():
        weight = base_weight(layers[name])
        if tuple(whole.shape) != tuple(weight.shape):
            raise ValueError(f"merge residual of {name} has shape {tuple(whole.shape)}, "
                             f"its weight {tuple(weight.shape)}")
        _set_merge_residual(layers[name], sharding.local_part(whole.float(), weight))


@torch.no_grad()
def reinit_adapters(model: nn.Module, seed: int, *, zero_a: bool = False) -> None:
    """A <- Kaiming-uniform(a=sqrt(5)), B <- 0 for every adapter.

    Values are drawn in float32 on the CPU from one generator seeded with
    ``seed``, so every rank and every device type draws the same numbers.
    Never both zero: with A = B = 0 neither gets a gradient (the reference
    code's defect, spec section 2) -- except with ``zero_a``, which ``wrap``
    sets for the study-only reference defect ``zero-init-a``.
    """
    generator = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model):
        a = layer.lora_A[ADAPTER].weight
        values = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        if zero_a:  # REFERENCE DEFECT zero-init-a (study only): A = B = 0, no adapter gradient until a merge
            values.zero_()
        sharding.assign_(a, values)  # a sharded A keeps its slice of the same whole matrix
        layer.lora_B[ADAPTER].weight.zero_()


def wrap(model: nn.Module, config: ReLoRAConfig) -> nn.Module:
    """Add a LoRA adapter to every target linear layer, in place; return the model.

    Base weights of wrapped layers are frozen (no weight gradient is computed:
    ReLoRA's compute saving). Every other parameter keeps the trainability it
    had: embeddings, norms, head and biases train at full rank. With
    ``config.quantize`` the base weights are first stored in NF4 or int8 (by
    the storage backend registered for it, ``relora.integrations.quantize``),
    and peft wraps them with its quantized LoRA layers.
    """
    targets = find_targets(model, config.target_modules)
    if not targets:
        raise ValueError(
            f"target_modules: no linear layer of {type(model).__name__} matched {config.target_modules!r}"
        )
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("model is already wrapped with LoRA adapters; call relora.unwrap(model) first")
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    storage = frozen_storage.backend_for(config.quantize) if config.quantize else None
    if storage is not None:
        storage.convert(model, targets, config.quantize, master_weights=config.master_weights)
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
        init_lora_weights=True,
    )
    with storage.injecting(model, config.quantize) if storage is not None else contextlib.nullcontext():
        inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER)
    # peft froze everything but the adapters; restore the rest.
    for name, param in model.named_parameters():
        original = name.replace(".base_layer.", ".")
        if ".lora_A." in name or ".lora_B." in name:
            param.requires_grad_(True)
        elif param.is_floating_point():  # quantized codes can never require a gradient
            param.requires_grad_(trainable.get(original, True))
    for layer in lora_layers(model):
        layer.get_base_layer().weight.requires_grad_(False)
        if config.frozen_dtype != "float32" and not config.quantize:
            store_frozen_as(layer, getattr(torch, config.frozen_dtype))
    # REFERENCE DEFECT zero-init-a (study only): A zeroed at wrap; re-inits at merges stay Kaiming, as in the reference
    reinit_adapters(model, config.seed, zero_a="zero-init-a" in config.reference_defects)
    return model


_CAST_HOOKS = "_relora_cast_hooks"


def store_frozen_as(layer: LoraLayer, dtype: torch.dtype) -> None:
    """Keep a wrapped layer's frozen weight in ``dtype`` (e.g. bf16: half the memory).

    The base layer then computes in ``dtype`` and returns the caller's dtype, so
    float32 activations and float32 adapters keep working outside autocast.
    Hooks rather than a subclass: peft owns the module types.
    """
    base = layer.get_base_layer()
    weight = base_weight(layer)
    weight.data = weight.data.to(dtype)
    if getattr(base, _CAST_HOOKS, None) is not None:
        return
    seen: dict[str, torch.dtype] = {}

    def cast_in(module: nn.Module, args: tuple) -> tuple:
        seen["dtype"] = args[0].dtype
        return (args[0].to(module.weight.dtype), *args[1:])

    def cast_out(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(seen["dtype"]) if torch.is_floating_point(output) else output

    setattr(base, _CAST_HOOKS, (base.register_forward_pre_hook(cast_in), base.register_forward_hook(cast_out)))


def _restore_float32(base: nn.Module, merged: torch.Tensor) -> None:
    """Undo ``store_frozen_as`` on an unwrapped base layer: float32 weight, no hooks."""
    base.weight.data = merged
    for handle in getattr(base, _CAST_HOOKS, ()) or ():
        handle.remove()
    if hasattr(base, _CAST_HOOKS):
        delattr(base, _CAST_HOOKS)


@torch.no_grad()
def merge_and_reinit(model: nn.Module, seed: int, *, unscaled: bool = False) -> int:
    """Merge every adapter into its base weight, then re-init it from ``seed``.

    The model's function is unchanged (up to rounding of W's dtype). Returns
    the number of adapters merged. ``unscaled`` is the study-only reference
    defect ``unscaled-merge``: W <- W + B A, so the function changes by
    (1 - s) B A x per layer.
    """
    layers = lora_layers(model)
    for layer in layers:
        merge_layer(layer, 1.0 if unscaled else None)  # REFERENCE DEFECT unscaled-merge: scale 1, not s
    reinit_adapters(model, seed)
    return len(layers)


@torch.no_grad()
def unwrap(model: nn.Module) -> nn.Module:
    """Merge the current cycle and replace each wrapped layer by its base layer.

    The result is a plain dense model (what ``transformers`` loads unchanged).
    Merging first avoids the reference code's defect of silently dropping the
    last cycle's update (spec section 3). A quantized layer becomes an
    ``nn.Linear`` holding the float32 sum: its master copy (or dequantized
    weight) plus the last cycle's delta, not rounded to the storage format.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        storage = frozen_storage.backend_of(base)
        if storage is not None:  # the float32 sum, not rounded to the storage format
            delta = delta_weight(module).to(base.weight.device)
            base = storage.to_dense(base, storage.dense_weight(base) + delta)
        elif base_weight(module).dtype != torch.float32:  # bf16 storage: export the float32 sum, unrounded
            weight = base_weight(module).float() + delta_weight(module).to(base.weight.device)
            residual = merge_residual(module)
            if residual is not None:  # what earlier merges could not store in bf16
                weight += residual.to(weight.device)
                delattr(base, _RESIDUAL)
            _restore_float32(base, weight)
        else:
            merge_layer(module)
        base.weight.requires_grad_(True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


merged = unwrap


@torch.no_grad()
def decay_frozen_(model: nn.Module, factor: float) -> None:
    """W <- factor * W for every wrapped layer's frozen weight, in place: AdamW's decoupled weight decay
    (factor = 1 - lr * weight_decay), which W, not being a parameter the optimizer steps, would never get.

    Float32 weights (sharded or not) are scaled directly; quantized ones by their storage backend, through
    their scales, which scales the stored weight exactly. Weights stored in a lower precision are refused:
    a factor this close to 1 would round away.
    """
    for layer in lora_layers(model):
        base = layer.get_base_layer()
        storage = frozen_storage.backend_of(base)
        if storage is not None:
            storage.scale_(base, factor)
            continue
        weight = base_weight(layer)
        if weight.dtype != torch.float32:
            raise ValueError(f"weight decay of {weight.dtype} frozen weights would round away; store them in float32")
        sharding.local(weight).mul_(factor)
