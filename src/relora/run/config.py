"""TrainConfig: every setting of a training run, resolved in one direction.

defaults -> preset (``configs/NAME.yaml``) -> ``--config FILE`` -> flags. The
resolved config is saved in the run directory and is what a resume compares
against.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from relora.baselines import PROJECTION_METHODS, optimizer_class
from relora.core.config import FROZEN_DTYPES, ReLoRAConfig
from relora.errors import ConfigError
from relora.models import check_device, llama_config, load_preset

METHODS = ("full", "control", "lora", "lora-ws", "relora", "online-relora", "galore", "apollo", "apollo-mini")
ADAPTER_METHODS = ("lora", "lora-ws", "relora", "online-relora")

# Changing these makes a checkpoint mean something else: a resume refuses them.
RESUME_INCOMPATIBLE = (
    "preset", "method", "model", "vocab_size", "data", "steps", "warmup_steps", "warm_start_steps",
    "reset_every", "merge_every", "restart_warmup_steps", "rank", "alpha", "dropout", "target_modules",
    "prune", "prune_ratio", "restart_adam_step", "lr", "relora_lr", "min_lr_ratio", "weight_decay", "beta1", "beta2",
    "grad_clip", "batch_tokens", "micro_batch", "seq_len", "sampling", "init_from", "seed",
    "restarts", "optimizer_reset", "jagged", "warm_start", "distributed", "quantize", "master_weights",
    "frozen_dtype",
    "proj_lr", "proj_rank", "update_proj_gap", "proj_scale", "scale_front", "reference_defects",
)
DISTRIBUTED_MODES = ("ddp", "fsdp")
# Step counts that are fractions of a run: when --steps (or steps: in a config file) shortens or lengthens a
# preset, those the user did not set themselves are scaled with it, so that `--preset tiny --steps 60` keeps
# the preset's shape (a quarter warm start, four cycles) instead of failing on a 120-step warm start.
SCALED_WITH_STEPS = ("warmup_steps", "warm_start_steps", "reset_every", "restart_warmup_steps", "eval_every",
                     "save_every")

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """A training run. Field names are the CLI flags with dashes as underscores."""

    preset: str = "tiny"
    method: str = "relora"
    data: str | None = None  # prepared data directory; None = the default corpus, prepared into cache_dir
    data_id: str | None = None  # set by the run: PreparedData.identity of `data`, what a resume compares
    out: str | None = None  # run directory; None = runs/<preset>-<method>-<time>
    cache_dir: str | None = None  # None = ~/.cache/relora
    model: dict = field(default_factory=dict)  # LlamaConfig architecture fields
    vocab_size: int = 8192  # for preparing the default corpus
    steps: int = 1000
    warmup_steps: int = 50
    warm_start_steps: int = 250
    reset_every: int = 250
    merge_every: int | None = None
    restart_warmup_steps: int = 25
    rank: int = 128
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    quantize: str | None = None  # frozen base weights of wrapped layers in "nf4" or "int8" (bitsandbytes)
    master_weights: str | None = None  # "cpu": float32 copy of those weights in CPU memory, merged into exactly
    frozen_dtype: str = "float32"  # or "bfloat16": frozen weights of wrapped layers in bf16 (merge residual kept)
    prune: str = "magnitude"
    prune_ratio: float = 0.99
    restart_adam_step: str = "keep"  # Adam's step counter of the pruned adapters at a restart: "keep" or "reset"
    # STUDY ONLY, never on by default: defects of the reference / relora-pico code to reproduce, each alone
    # (zero-init-a, unscaled-merge, independent-masks; relora.core.config.REFERENCE_DEFECTS, docs/method.md)
    reference_defects: list[str] = field(default_factory=list)
    lr: float = 1e-3  # peak LR of full-rank training (and of the warm start)
    relora_lr: float = 2e-3  # peak LR once adapters train (spec section 6: 1.5-2x full-rank)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    batch_tokens: int = 4096  # global batch
    micro_batch: int = 32  # sequences per forward pass; gradient accumulation is derived
    seq_len: int = 128
    sampling: str = "sequential"  # one shuffled pass without repetition (as the paper), or "random" windows
    eval_every: int = 250
    eval_tokens: int = 65536
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    init_from: str | None = None
    seed: int = 0
    restarts: bool = True  # Table 6 ablation switches
    optimizer_reset: bool = True
    jagged: bool = True
    warm_start: bool = True
    # GaLore / APOLLO / APOLLO-mini (relora.baselines); None = the method's published default
    proj_lr: float = 1e-2  # peak LR of the projection methods: 0.01 in the GaLore and APOLLO scripts
    proj_rank: int | None = None  # gradient projection rank; None: GaLore's rank for the width, 1 for apollo-mini
    update_proj_gap: int = 200  # steps between projection updates (both papers' scripts)
    proj_scale: float | None = None  # None: 0.25 galore, 1 apollo, 128 apollo-mini
    scale_front: bool | None = None  # APOLLO's norm-growth limiter after the scale; None: on for apollo-mini only
    device: str = "auto"
    threads: int = 0  # CPU threads for the matrix products; 0 = auto: the CPUs idle at start (relora/run/threads.py)
    gradient_checkpointing: bool = False  # recompute block activations in backward (memory for compute)
    compile: bool = False  # torch.compile the model
    max_bad_steps: int = 10  # consecutive steps with a non-finite loss or gradient norm before acting
    on_bad_steps: str = "rollback"  # "rollback" (to the last checkpoint, LR scaled down) or "stop"
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    distributed: str = "ddp"  # under torchrun: DistributedDataParallel, or "fsdp" (FSDP2, fully_shard)
    dist_timeout_s: float = 600.0  # a collective waiting longer than this ends the job (a rank died or hangs)
    wandb: bool = False  # log metrics to Weights & Biases (needs `pip install wandb`)
    wandb_project: str | None = None  # None = "relora"

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        self._check_types()
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.distributed not in DISTRIBUTED_MODES:
            raise ConfigError(f"distributed must be one of {', '.join(DISTRIBUTED_MODES)}, got {self.distributed!r}")
        if self.on_bad_steps not in ("rollback", "stop"):
            raise ConfigError(f"on_bad_steps must be 'rollback' or 'stop', got {self.on_bad_steps!r}")
        if not 0 < self.rollback_lr_factor < 1:
            raise ConfigError(f"rollback_lr_factor must be in (0, 1), got {self.rollback_lr_factor!r}")
        for name in ("max_bad_steps", "max_rollbacks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s!r}")
        if self.sampling not in ("sequential", "random"):
            raise ConfigError(f"sampling must be 'sequential' or 'random', got {self.sampling!r}")
        for name in ("steps", "batch_tokens", "micro_batch", "seq_len", "eval_tokens", "log_every", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_every", "save_every", "warmup_steps", "warm_start_steps", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.weight_decay and getattr(self, "frozen_dtype", "float32") != "float32":
            raise ConfigError("weight decay of frozen weights stored in bfloat16 would round away; "
                              "use --frozen-dtype float32 or --weight-decay 0")
        for name in ("lr", "relora_lr", "proj_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip!r}")
        if self.batch_tokens % self.seq_len:
            raise ConfigError(f"batch_tokens ({self.batch_tokens}) must be a multiple of seq_len ({self.seq_len})")
        if self.sequences_per_step % self.micro_batch:
            raise ConfigError(
                f"micro_batch ({self.micro_batch}) must divide the sequences per step "
                f"(batch_tokens / seq_len = {self.sequences_per_step})"
            )
        if self.method in ADAPTER_METHODS and self.relora_phase_start >= self.steps:
            raise ConfigError(
                f"warm_start_steps ({self.warm_start_steps}) must be < steps ({self.steps}) for method {self.method}; "
                "lower --warm-start-steps (warm_start_steps: in a config file) or raise --steps"
            )
        if self.proj_rank is not None and self.proj_rank < 1:
            raise ConfigError(f"proj_rank must be a positive integer, got {self.proj_rank!r}")
        if self.update_proj_gap < 1:
            raise ConfigError(f"update_proj_gap must be a positive integer, got {self.update_proj_gap!r}")
        if self.proj_scale is not None and not self.proj_scale > 0:
            raise ConfigError(f"proj_scale must be > 0, got {self.proj_scale!r}")
        if self.method in PROJECTION_METHODS:
            optimizer_class(self.method)  # a missing extra fails here, before any data is read
        if self.method == "online-relora" and self.merge_every is None:
            raise ConfigError("online-relora needs --merge-every N (smaller than --reset-every)")
        if self.reference_defects and self.method not in ADAPTER_METHODS:
            raise ConfigError(f"reference_defects are defects of ReLoRA's adapters; method {self.method} has none "
                              f"(use one of {', '.join(ADAPTER_METHODS)})")
        self.relora_config()  # ReLoRAConfig's own checks (rank, ratios, intervals, quantize, reference defects)
        if self.quantize is not None:
            if self.method not in ADAPTER_METHODS:
                raise ConfigError(f"quantize stores the frozen weights of adapter methods; method {self.method} "
                                  "trains every weight at full rank")
            if self.distributed == "fsdp":
                raise ConfigError("quantize does not work with --distributed fsdp (FSDP2 cannot shard quantized "
                                  "weights); use --distributed ddp")
            from relora.errors import BitsAndBytesMissing
            from relora.integrations.quantize import require_bitsandbytes

            try:
                require_bitsandbytes(self.quantize)
            except BitsAndBytesMissing as exc:
                raise ConfigError(str(exc)) from None
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ConfigError(f"frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got {self.frozen_dtype!r}")
        if self.frozen_dtype != "float32" and self.method in ADAPTER_METHODS and self.distributed == "fsdp":
            raise ConfigError(f"frozen_dtype {self.frozen_dtype} does not work with --distributed fsdp (FSDP2 "
                              "needs one parameter dtype); use --frozen-dtype float32 or --distributed ddp")
        check_device(self.device)
        if self.model and self.init_from is None:  # the architecture, before any data is read or prepared
            try:
                llama_config(self.model, self.vocab_size, self.seq_len)
            except ConfigError:
                raise
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"invalid model settings: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
        if self.wandb:
            from relora.run.tracking import check_wandb_installed

            check_wandb_installed()

    def _check_types(self) -> None:
        """Each field holds what its annotation says (a YAML file can hold anything)."""
        for f in fields(self):
            kinds = [k.strip() for k in str(f.type).split("|")]
            value = _numeric_from_string(getattr(self, f.name), kinds)
            setattr(self, f.name, value)
            if not any(_is_kind(value, kind) for kind in kinds):
                expected = " or ".join(_KIND_NAMES[kind] for kind in kinds)
                raise ConfigError(f"{f.name} must be {expected}, got {value!r}")

    @property
    def sequences_per_step(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def grad_accumulation(self) -> int:
        return self.micro_steps(1)

    def micro_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each of ``world_size`` processes.

        The global batch (``batch_tokens``) is what the config says whatever
        the world size; gradient accumulation absorbs the difference.
        """
        per_pass = self.micro_batch * world_size
        if self.sequences_per_step % per_pass:
            raise ConfigError(
                f"the global batch of {self.sequences_per_step} sequences (batch_tokens / seq_len) cannot be split "
                f"into {world_size} process(es) x micro-batch {self.micro_batch}; choose --micro-batch and "
                f"--nproc-per-node whose product divides {self.sequences_per_step}"
            )
        return self.sequences_per_step // per_pass

    @property
    def relora_phase_start(self) -> int:
        """Step at which the model is wrapped (0 for plain LoRA or without warm start)."""
        if self.method == "lora" or not self.warm_start:
            return 0
        return self.warm_start_steps

    def peak_lr(self, wrapped: bool) -> float:
        if self.method in PROJECTION_METHODS:
            return self.proj_lr
        return self.relora_lr if wrapped else self.lr

    def relora_config(self) -> ReLoRAConfig | None:
        """The adapter / restart settings this method and its ablation switches mean."""
        if self.method not in ADAPTER_METHODS:
            return None
        restarts = self.restarts and self.method in ("relora", "online-relora")
        reset_every = self.reset_every if restarts else None
        merge_every = self.merge_every if self.method == "online-relora" and restarts else reset_every
        try:
            return ReLoRAConfig(
                r=self.rank,
                alpha=self.alpha,
                dropout=self.dropout,
                target_modules=self.target_modules,
                reset_every=reset_every,
                merge_every=merge_every,
                restart_warmup_steps=self.restart_warmup_steps if restarts else 0,
                prune=self.prune if self.optimizer_reset else "none",
                prune_ratio=self.prune_ratio,
                restart_adam_step=self.restart_adam_step,
                warm_start_steps=self.relora_phase_start,
                seed=self.seed,
                quantize=self.quantize,
                master_weights=self.master_weights,
                frozen_dtype=self.frozen_dtype,
                reference_defects=tuple(self.reference_defects),
            )
        except ValueError as exc:
            message = str(exc).replace("r must", "rank must")
            if message.startswith("reset_every ("):  # the restart warm-up does not fit in a cycle
                message += "; change --reset-every or --restart-warmup-steps"
            raise ConfigError(message) from None

    def to_dict(self) -> dict:
        return asdict(self)


_KIND_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "dict": "a mapping", "list[str]": "a list of strings", "None": "null"}


def _numeric_from_string(value: Any, kinds: list[str]) -> Any:
    """A number written as a string, for a numeric field that takes no string; else ``value`` unchanged.

    YAML 1.1 (PyYAML) reads ``1e-3`` (no dot) and ``1_000e3``-like spellings as strings; a user means a number.
    """
    if not isinstance(value, str) or "str" in kinds or not {"int", "float"} & set(kinds):
        return value
    try:
        number = float(value.strip())
    except ValueError:
        return value  # not a number: _check_types names the field and what it must be
    if not math.isfinite(number):
        return value
    if "float" in kinds:
        return number
    return int(number) if number.is_integer() else value


def _is_kind(value: Any, kind: str) -> bool:
    """Whether ``value`` fits one alternative of a field annotation (bool is no number; int is a float)."""
    if kind in ("int", "float") and isinstance(value, bool):
        return False
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict,
                              "None": type(None)}[kind])


FIELD_NAMES = [f.name for f in fields(TrainConfig)]


def _check_keys(values: dict, where: str) -> None:
    for key in values:
        if key not in FIELD_NAMES:
            close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown setting {key!r} in {where}{hint}")


def read_config_file(path: str | Path) -> dict:
    """A YAML mapping of TrainConfig fields (``model:`` for the architecture)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    _check_keys(values, str(path))
    return values


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """defaults <- preset <- config file <- overrides (flags); validated."""
    file_values = read_config_file(config_file) if config_file else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(overrides, "the overrides")
    name = overrides.get("preset") or file_values.get("preset") or preset or TrainConfig.preset
    values: dict[str, Any] = {"preset": name}
    preset_values = load_preset(name)
    values["model"] = dict(preset_values.get("model", {}))
    values.update(preset_values.get("train", {}))
    _check_keys(values, f"preset {name}")
    for layer in (file_values, overrides):
        for key, value in layer.items():
            if key == "model":
                values["model"] = merge_model(values["model"], value)
            else:
                values[key] = value
    values.pop("data_id", None)  # derived by the run from its data; a run's config.yaml reused as --config has one
    steps_given = "steps" in file_values or "steps" in overrides
    if steps_given:
        given = set(file_values) | set(overrides)
        scale_with_steps(values, preset_values.get("train", {}).get("steps", TrainConfig.steps),
                         [name for name in SCALED_WITH_STEPS if name not in given])
    config = TrainConfig(**values)
    config.validate()
    return config


def scale_with_steps(values: dict[str, Any], preset_steps: int, names: list[str]) -> None:
    """Scale the step counts ``names`` of a preset by ``values["steps"] / preset_steps``, in place.

    Rounded down (a warm start shorter than the run stays shorter), at least 1 where the preset's is positive
    (0 keeps its meaning: "only at the end", "no warm-up").
    """
    steps = _numeric_from_string(values["steps"], ["int"])
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0 or steps == preset_steps:
        return  # a bad --steps is validate()'s to report
    changed = []
    for name in names:
        old = values.get(name, getattr(TrainConfig, name))
        if isinstance(old, int) and not isinstance(old, bool) and old > 0:
            values[name] = max(1, old * steps // preset_steps)
            changed.append(f"{name} {old} -> {values[name]}")
    if changed:
        _say_once(f"steps {steps} instead of the preset's {preset_steps}: scaled {', '.join(changed)} "
                  "(set them to override)")


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    """Log ``message`` once per process: `relora compare` resolves the same settings for every run of a set."""
    logger.info("%s", message)


def merge_model(base: dict, update: Any) -> dict:
    """A ``model:`` mapping updated by another one (a later layer of settings)."""
    if not isinstance(update, dict):
        raise ConfigError(f"model must be a mapping of LlamaConfig fields (e.g. hidden_size: 512), got {update!r}")
    return {**base, **update}


def incompatible_changes(saved: dict, current: dict) -> list[str]:
    """Fields that differ between a saved run config and a resume's config."""
    defaults = TrainConfig().to_dict()  # a key missing from an older run's config had its default
    return [k for k in RESUME_INCOMPATIBLE
            if (not _same_data(saved, current) if k == "data" else saved.get(k, defaults[k]) != current.get(k))]


def _same_data(saved: dict, current: dict) -> bool:
    """The same dataset: equal identities when both configs have one (any path or working directory),
    else the same resolved path (an older run's config, or a config not run yet)."""
    if saved.get("data_id") and current.get("data_id"):
        return saved["data_id"] == current["data_id"]
    paths = [Path(c["data"]).expanduser().resolve() if c.get("data") else None for c in (saved, current)]
    return paths[0] == paths[1]
