"""The model of a run: built from its config, rebuilt from a checkpoint, prepared for training, gathered whole.

Every model a run trains is made here, by ``run_model``: the preset or
``--init-from`` model, wrapped with the adapters once the warm start is over.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from relora.core.adapters import load_merge_residuals, merge_residuals, unwrap, wrap
from relora.core.config import ReLoRAConfig
from relora.errors import ConfigError
from relora.models import (
    build_model,
    control_model_config,
    enable_activation_checkpointing,
    llama_config,
    load_pretrained,
)
from relora.run import checkpoint as ckpt
from relora.run.config import TrainConfig
from relora.run.distributed import Dist
from relora.run.state import RunState


def make_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The model this method trains: from --init-from, the control size, or the preset."""
    if cfg.init_from:
        model = model_from_path(cfg.init_from)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ConfigError(
                f"the data's vocabulary ({vocab_size}) is larger than the model's embedding "
                f"({model.get_input_embeddings().num_embeddings}); prepare the data with the model's tokenizer"
            )
        positions = learned_positions(model)
        if positions is not None and cfg.seq_len > positions:
            raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the {positions} positions {type(model).__name__} "
                              f"has learned embeddings for; use --seq-len {positions} or less")
        return model
    arch = cfg.model
    if cfg.method == "control":
        arch = control_model_config(cfg.model, vocab_size, cfg.rank)
    return build_model(llama_config(arch, vocab_size, cfg.seq_len), cfg.seed)


def run_model(cfg: TrainConfig, relora_cfg: ReLoRAConfig | None, vocab_size: int, *, wrapped: bool) -> nn.Module:
    """A fresh model of the run, with the adapters of ``relora_cfg`` when ``wrapped`` (past the warm start)."""
    model = make_model(cfg, vocab_size)
    if wrapped:
        wrap(model, relora_cfg)
    return model


def learned_positions(model: nn.Module) -> int | None:
    """How many positions a model with learned absolute position embeddings (GPT-2's ``wpe``) can take;
    None for rotary or other relative schemes, which have no hard limit."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "position_embeddings"):
            return module.num_embeddings
    return None


def prepare_for_training(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """The optional speed/memory trade-offs, applied to the model about to be trained.

    Activation checkpointing is transformers' own, per decoder block.
    ``nn.Module.compile`` compiles in place: parameter names, state dicts and
    the in-place merges are unchanged, and a wrapped model is compiled anew.
    """
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(model).__name__} does not support --gradient-checkpointing")
        enable_activation_checkpointing(model)
    if cfg.compile:
        model.compile()
    return model


def model_from_path(path: str | Path) -> nn.Module:
    """A dense model from a Hugging Face directory or a checkpoint of this project."""
    path = Path(path)
    if (path / ckpt.MARKER).is_file():
        return model_from_checkpoint(path)
    return load_pretrained(path)


def model_from_checkpoint(path: Path) -> nn.Module:
    """Rebuild a checkpoint's model and return it dense (adapters merged)."""
    saved = TrainConfig(**ckpt.read_config(path))
    state = RunState.from_dict(ckpt.read_trainer_state(path))
    # init_from is kept for the architecture (a GPT-2 run is no preset LLaMA); the weights come from the checkpoint
    relora_cfg = saved.relora_config() if state.wrapped else None
    model = run_model(saved, relora_cfg, state.vocab_size, wrapped=state.wrapped)
    ckpt.load_weights(model, path)
    return unwrap(model) if state.wrapped else model


def gathered_model(cfg: TrainConfig, relora_cfg: ReLoRAConfig | None, model: nn.Module, dist: Dist, *,
                   vocab_size: int, wrapped: bool) -> nn.Module | None:
    """On rank 0 the whole model (under FSDP2 a CPU copy rebuilt from the gathered weights); None elsewhere.

    A collective under FSDP2: every rank must call it.
    """
    if not dist.sharded:
        return model if dist.is_main else None
    weights = dist.full_state_dict(model)
    residuals = merge_residuals(model)
    if not dist.is_main:
        return None
    copy = run_model(cfg, relora_cfg, vocab_size, wrapped=wrapped)
    copy.load_state_dict(weights)
    load_merge_residuals(copy, residuals)  # bf16 frozen weights: the export adds them back
    return copy
