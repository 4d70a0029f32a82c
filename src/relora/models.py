"""Model presets -> LlamaConfig, building and loading models, parameter budgets.

Presets are data (``configs/NAME.yaml``): a ``model:`` mapping of LlamaConfig
architecture fields and a ``train:`` mapping of TrainConfig fields. The
architecture is LLaMA as the paper trains it (RELORA_SPEC.md section 8):
pre-norm RMSNorm, SwiGLU MLP, rotary positions, no biases, untied head.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
import yaml
from packaging.version import Version
from transformers import LlamaConfig, LlamaForCausalLM

from relora.core.frozen_storage import logical_numel
from relora.errors import ConfigError

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).parent / "configs"

# What the paper's models are (spec section 8); a preset's ``model:`` may override any of it.
LLAMA_DEFAULTS = dict(
    hidden_act="silu",  # SwiGLU: down(silu(gate x) * up x)
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
)
REQUIRED_MODEL_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
# Set by the run, not by the architecture: the tokenizer decides the vocabulary, seq_len the positions.
RUN_KEYS = {
    "vocab_size": "it is set by the data's tokenizer (--vocab-size when preparing the default corpus)",
    "max_position_embeddings": "it is set from seq_len",
}
# Control-model search (spec section 7): how close to ReLoRA's trainable count counts as equal.
CONTROL_TOLERANCE = 0.02
CONTROL_MAX_ERROR = 0.05
CONTROL_HIDDEN_STEP = 8


def list_presets() -> list[str]:
    """Preset names, smallest model first."""
    return sorted((p.stem for p in PRESETS_DIR.glob("*.yaml")), key=_preset_order)


def _preset_order(name: str) -> tuple[float, str]:
    units = {"m": 1e6, "b": 1e9}
    if name[:-1].isdigit() and name[-1] in units:
        return int(name[:-1]) * units[name[-1]], name
    return (0.0 if name == "tiny" else math.inf), name


def load_preset(name: str) -> dict:
    """``{"model": {...}, "train": {...}}`` of a named preset."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = list_presets()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown preset {name!r}; {hint}choose one of: {', '.join(names)} (or pass --config FILE)")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict) or set(values) - {"model", "train"} or not all(
        isinstance(v, dict) for v in values.values()
    ):
        raise ConfigError(f"preset file {path} must hold only 'model:' and 'train:' mappings")
    return {"model": dict(values.get("model", {})), "train": dict(values.get("train", {}))}


def _llama_fields() -> list[str]:
    """Every keyword LlamaConfig accepts (its own fields and the shared config ones)."""
    params = inspect.signature(LlamaConfig.__init__).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    # transformers 5 folds these 4.x fields into ``rope_parameters`` but still accepts them.
    legacy = {"rope_theta", "rope_scaling"}
    return sorted(named | set(LlamaConfig().to_dict()) | legacy)


def llama_config(model: dict, vocab_size: int, max_position_embeddings: int) -> LlamaConfig:
    """A LLaMA-style config (spec section 8) from a preset's ``model:`` mapping."""
    valid = _llama_fields()
    for key in model:
        if key in RUN_KEYS:
            raise ConfigError(f"model.{key} cannot be set in a preset or config: {RUN_KEYS[key]}")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown model setting {key!r} (not a LlamaConfig field){hint}")
    missing = [k for k in REQUIRED_MODEL_KEYS if k not in model]
    if missing:
        raise ConfigError(f"model settings lack {', '.join(missing)}; give all of: {', '.join(REQUIRED_MODEL_KEYS)}")
    for key in REQUIRED_MODEL_KEYS:
        if not isinstance(model[key], int) or isinstance(model[key], bool) or model[key] <= 0:
            raise ConfigError(f"model.{key} must be a positive integer, got {model[key]!r}")
    hidden, heads = model["hidden_size"], model["num_attention_heads"]
    if "head_dim" not in model and hidden % heads:
        raise ConfigError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    values = {**LLAMA_DEFAULTS, **model}
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        attn_implementation="sdpa",
        **values,
    )


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised float32 model; the same seed gives the same weights.

    The seed is applied inside ``fork_rng`` so that building a model (e.g. the
    control model next to another) does not shift the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters; shared tensors are counted once, an NF4 tensor
    (two weights per byte) by the weights it stands for."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(logical_numel(p) for p in params)


def decoder_linear_shapes(cfg: LlamaConfig | SimpleNamespace) -> list[tuple[int, int, bool]]:
    """(in, out, has_bias) of the linear maps of one decoder layer (q, k, v, o, gate, up, down): the ones ReLoRA
    wraps; computed from the config, without building a model (the cost model and the control-model search)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q = cfg.num_attention_heads * head_dim
    kv = (cfg.num_key_value_heads or cfg.num_attention_heads) * head_dim
    ab, mb = bool(cfg.attention_bias), bool(cfg.mlp_bias)
    return [(h, q, ab), (h, kv, ab), (h, kv, ab), (q, h, ab), (h, inter, mb), (h, inter, mb), (inter, h, mb)]


def embedding_head_norm_parameters(cfg: LlamaConfig | SimpleNamespace) -> int:
    """Parameters of the input embedding, the output head (unless tied) and the norms: what every method trains
    at full rank."""
    h = cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return cfg.vocab_size * h + head + (2 * cfg.num_hidden_layers + 1) * h


def _dense_parameters(cfg: LlamaConfig | SimpleNamespace) -> int:
    """Total parameters of a LlamaForCausalLM built from ``cfg`` (without building it)."""
    layer = sum(i * o + (o if bias else 0) for i, o, bias in decoder_linear_shapes(cfg))
    return embedding_head_norm_parameters(cfg) + cfg.num_hidden_layers * layer


def relora_trainable_parameters(model_cfg: dict, vocab_size: int, rank: int) -> int:
    """What ReLoRA trains at this architecture and rank.

    Embeddings, head, norms (and biases, if any) at full rank, plus r * (d_in + d_out)
    for each wrapped linear map (q, k, v, o, gate, up, down; spec section 2).
    """
    cfg = llama_config(model_cfg, vocab_size, 1)
    per_layer = sum(rank * (i + o) + (o if bias else 0) for i, o, bias in decoder_linear_shapes(cfg))
    return embedding_head_norm_parameters(cfg) + cfg.num_hidden_layers * per_layer


def _intermediate_for(hidden: int) -> int:
    """SwiGLU's ~8/3 h hidden width, rounded up to a multiple of 8."""
    return 8 * -(-hidden // 3)  # ceil(8h/3 / 8) * 8


def _heads_for(hidden: int, head_dim: int) -> int:
    """The number of heads whose even head size is closest to ``head_dim``."""
    dims = [d for d in range(2, hidden + 1, 2) if hidden % d == 0]
    best = min(dims, key=lambda d: (abs(d - head_dim), -d))
    return hidden // best


def control_model_config(model_cfg: dict, vocab_size: int, rank: int) -> dict:
    """A smaller full-rank LLaMA with as many parameters as ReLoRA trains (spec section 7, 'control').

    Search rule: the vocabulary and untied head stay; candidates have hidden
    size a multiple of 8 up to the original's, 1 to the original number of
    layers, intermediate ~8/3 hidden (multiple of 8), and the number of heads
    whose even head size is closest to the original's. Among candidates whose
    total parameter count is within 2% of ReLoRA's trainable count, the one
    that looks most like the model it stands for wins: the original head size
    kept exactly first, then the width-to-depth ratio closest to the
    original's. If none is within 2%, the closest count wins, provided it is
    within 5%. Grouped-query attention and an explicit head_dim are not
    carried over; other keys of ``model_cfg`` are kept.
    """
    budget = relora_trainable_parameters(model_cfg, vocab_size, rank)
    base = llama_config(model_cfg, vocab_size, 1)
    full = _dense_parameters(base)
    if budget >= full:
        raise ConfigError(
            f"at rank {rank} ReLoRA trains {budget:,} parameters, not fewer than the full model's {full:,}, "
            "so there is no smaller control model; lower the rank"
        )
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    aspect = math.log(base.hidden_size / base.num_hidden_layers)
    extra = {k: v for k, v in model_cfg.items() if k not in (*REQUIRED_MODEL_KEYS, "num_key_value_heads", "head_dim")}
    shared = {k: getattr(base, k) for k in ("vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias")}
    candidates = []
    for hidden in range(CONTROL_HIDDEN_STEP, base.hidden_size + 1, CONTROL_HIDDEN_STEP):
        for layers in range(1, base.num_hidden_layers + 1):
            arch = dict(
                hidden_size=hidden,
                intermediate_size=_intermediate_for(hidden),
                num_attention_heads=_heads_for(hidden, head_dim),
                num_hidden_layers=layers,
            )
            count = _dense_parameters(SimpleNamespace(**shared, **arch, num_key_value_heads=None, head_dim=None))
            error = abs(count - budget) / budget
            likeness = (hidden != arch["num_attention_heads"] * head_dim, abs(math.log(hidden / layers) - aspect))
            candidates.append((error, likeness, arch, count))
    close = [c for c in candidates if c[0] <= CONTROL_TOLERANCE]
    error, _, arch, count = min(close, key=lambda c: c[1]) if close else min(candidates, key=lambda c: c[0])
    if error > CONTROL_MAX_ERROR:
        raise ConfigError(
            f"no smaller LLaMA has within {CONTROL_MAX_ERROR:.0%} of ReLoRA's {budget:,} trainable parameters "
            f"(closest: {count:,}, hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers); "
            "raise the rank or lower the vocabulary"
        )
    logger.info("control model: %s, %s parameters (ReLoRA trains %s)", arch, f"{count:,}", f"{budget:,}")
    return {**extra, **arch}


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """transformers' per-block activation checkpointing, non-reentrant (frozen weights and adapters need no
    special care); under its current name where this transformers has it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_pretrained(path: str | Path) -> transformers.PreTrainedModel:
    """A causal LM saved with ``save_pretrained`` in a local directory, in float32; never downloads."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"model directory {path} does not exist; pass a local directory saved with save_pretrained")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} is not a model directory (no config.json); pass a directory saved with save_pretrained"
        )
    # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56; the old name warns from then on.
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, **{dtype_key: torch.float32}
        )
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot load a causal LM from {path}: {first}") from None
