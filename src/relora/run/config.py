"""TrainConfig: every setting of a training run, each declared once with its help text.

Resolved in one direction (relora.run.resolve): defaults -> preset
(``configs/NAME.yaml``) -> ``--config FILE`` -> flags; saved in the run
directory, where a resume refuses the changes that would alter what its
checkpoints mean (``RESUME_INCOMPATIBLE``, derived from the fields). The CLI
generates its flags from the fields (relora.cli.flags).

Torch is imported only inside the checks that need it, so that ``relora --help``
loads none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from relora.baselines import (
    PROJECTION_METHODS,  # torch-free at import: `relora --help` reads this module
)
from relora.errors import ConfigError
from relora.run.fields import adapter_setting, check_types, setting

if TYPE_CHECKING:
    from relora.core.config import ReLoRAConfig

METHODS = ("full", "full-ws-lr", "control", "lora", "lora-ws", "relora", "online-relora", "galore", "apollo",
           "apollo-mini")
ADAPTER_METHODS = ("lora", "lora-ws", "relora", "online-relora")
# the methods whose main phase runs at relora_lr after warm_start_steps at lr: the adapters, and full-ws-lr, the
# control that gives full-rank training their two-phase LR
TWO_PHASE_LR_METHODS = (*ADAPTER_METHODS, "full-ws-lr")
FULL_RANK_METHODS = ("full", "full-ws-lr", "control")  # plain AdamW on every weight
DISTRIBUTED_MODES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """A training run. Each field is declared once, here: its default, its help text (the flag's), whether a
    resume may change it. The CLI flags are generated from these fields (relora.cli.flags)."""

    preset: str = setting("tiny", "model size and recipe: tiny, 9m, 20m, 60m, 130m, 250m, 350m, 1b; pico-tiny, "
                          "pico-small (relora-pico's architectures; src/relora/configs/)")
    method: str = setting("relora", "full, control, lora, lora-ws, relora (default), online-relora; galore, apollo, "
                          "apollo-mini (pip install 'relora[baselines]'); full-ws-lr (a control: full-rank training "
                          "with the warm-started methods' LR, lr until --warm-start-steps, then --lr)", compare=False)
    data: str | None = setting(None, "prepared data directory (default: the Python stdlib corpus, prepared once into "
                               "the cache)")
    data_id: str | None = setting(None, "set by the run: the identity of the prepared data at `data`, what a resume "
                                  "compares (with `data`)", flag=None, resumable=True)
    out: str | None = setting(None, "run directory (default: runs/PRESET-METHOD-TIME)", resumable=True,
                              compare=False)
    cache_dir: str | None = setting(None, "where the default corpus is prepared (default: ~/.cache/relora)",
                                    resumable=True)
    model: dict = setting(help="LlamaConfig architecture fields over the preset's (a mapping)", factory=dict,
                          flag=None)
    vocab_size: int = setting(8192, "tokenizer vocabulary when the default corpus is prepared")
    steps: int = setting(1000, "optimizer steps in total, warm start included; the preset's step counts that are "
                         "not given (warm start, restart interval, eval/save intervals) scale with it")
    warmup_steps: int = setting(50, "steps of linear LR warm-up at the start of the run", flag=None)
    warm_start_steps: int = setting(250, "full-rank steps before LoRA/ReLoRA starts")
    reset_every: int = adapter_setting(250, "steps between ReLoRA restarts (merge, optimizer reset, LR re-warmup)")
    merge_every: int | None = adapter_setting(None, "steps between merges for online-relora (must divide --reset-every)")
    restart_warmup_steps: int = adapter_setting(25, "steps of linear LR re-warmup after each restart")
    rank: int = adapter_setting(128, "adapter rank r")
    alpha: float = adapter_setting(32.0, "adapter alpha (scale = alpha / rank)")
    dropout: float = adapter_setting(0.0, "adapter dropout", flag=None)
    target_modules: list[str] | None = adapter_setting(None, "module-name patterns to wrap (default: every linear layer but "
                                               "the output head)", flag=None)
    quantize: str | None = adapter_setting(None, "store the frozen weights of wrapped layers in nf4 or int8 "
                                   "(pip install 'relora[quantize]')", compare=False)
    master_weights: str | None = adapter_setting(None, "with --quantize: cpu keeps a float32 copy of the frozen weights in "
                                         "CPU memory; merges go into it, so quantization error does not accumulate",
                                         compare=False)
    frozen_dtype: str = adapter_setting("float32", "storage of the frozen weights of wrapped layers: float32 (default) or "
                                "bfloat16 (half the device memory; merges keep their rounding residual in CPU "
                                "memory)")
    prune: str = adapter_setting("magnitude", "optimizer reset: magnitude (default), random, full, none, independent")
    prune_ratio: float = adapter_setting(0.99, "fraction of the adapters' Adam moments zeroed at each restart")
    restart_adam_step: str = adapter_setting("reset", "Adam's step counter of the pruned adapters at a restart: reset "
                                     "(default: bias correction starts afresh for the fresh moments; lets ReLoRA "
                                     "train at LoRA's higher LR) or keep (as the paper); see docs/method.md")
    # STUDY ONLY, never on by default: relora.core.config.REFERENCE_DEFECTS, docs/method.md
    reference_defects: list[str] = adapter_setting(
        help="FOR STUDY ONLY, off by default: reproduce defects of the reference / relora-pico code, "
             "comma-separated: zero-init-a (A zeroed with B at wrap), unscaled-merge (merges fold B A, not "
             "alpha/rank B A), independent-masks (with --prune random: separate random masks for Adam's m and v); "
             "adapter methods only, see docs/method.md", factory=list)
    # The field is the peak LR of full-rank training (and of the warm start); the flag --lr sets the peak LR of
    # the method's main phase (set_peak_lr), so relora_lr or proj_lr for the methods that have one.
    lr: float = setting(1e-3, "peak learning rate of the method (for adapter methods: after the warm start)",
                        compare=False)
    relora_lr: float = adapter_setting(2e-3, "peak LR once adapters train (spec section 6: 1.5-2x full-rank)", flag=None)
    min_lr_ratio: float = setting(0.1, "the cosine schedule's floor, a fraction of the peak LR", flag=None)
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay of matrices (not of norms, biases, "
                                  "embeddings; for adapter methods of W + s B A: docs/method.md); default 0")
    beta1: float = setting(0.9, "Adam's beta1, the decay of its first moment (AdamW, and the Adam of galore / "
                           "apollo; default 0.9)")
    beta2: float = setting(0.999, "Adam's beta2, the decay of its second moment (AdamW, and the Adam of galore / "
                           "apollo; default 0.999)")
    grad_clip: float = setting(1.0, "clip the gradient norm at this value (default 1.0; 0: no clipping)")
    batch_tokens: int = setting(4096, "global batch size in tokens")
    micro_batch: int = setting(32, "sequences per forward pass (gradient accumulation is derived)")
    seq_len: int = setting(128, "sequence length in tokens")
    sampling: str = setting("sequential", "sequential (one shuffled pass, no repetition) or random windows")
    eval_every: int = setting(250, "steps between evaluations (0: only at the end)", resumable=True)
    eval_tokens: int = setting(65536, "validation tokens per evaluation", resumable=True)
    eval_merges: bool = adapter_setting(False, "at every merge, the validation loss on a fixed subset of the evaluation "
                                "windows right before and right after it, as merge_loss_before / merge_loss_after in "
                                "metrics.jsonl (a correct merge leaves it unchanged)", resumable=True)
    save_every: int = setting(500, "steps between checkpoints (0: only at the end)", resumable=True)
    keep_checkpoints: int = setting(2, "checkpoints kept (the latest)", flag=None, resumable=True)
    log_every: int = setting(10, "steps between metrics records", resumable=True)
    init_from: str | None = setting(None, "start from a Hugging Face model directory or a relora checkpoint (no "
                                    "warm start)", compare=False)
    seed: int = setting(0, "random seed (model init, data order, adapter init)")
    # Table 6's ablation switches: a flag --no-NAME turns each off
    restarts: bool = setting(True, "ablation: no merges/restarts (ReLoRA becomes LoRA after the warm start)",
                             compare=False)
    optimizer_reset: bool = setting(True, "ablation: restarts keep the adapters' optimizer state", compare=False)
    jagged: bool = setting(True, "ablation: plain cosine schedule, no LR re-warmup at restarts", compare=False)
    warm_start: bool = setting(True, "ablation: adapters from step 0, no full-rank warm start", compare=False)
    # GaLore / APOLLO / APOLLO-mini (relora.baselines); None = the method's published default
    proj_lr: float = setting(1e-2, "peak LR of galore / apollo / apollo-mini (default 0.01, as their papers)")
    proj_rank: int | None = setting(None, "rank of GaLore's / APOLLO's gradient projection (default: GaLore's rank "
                                    "for the model width, e.g. 128 at 60m, 256 at 130m-350m, width/4 otherwise; 1 "
                                    "for apollo-mini)")
    update_proj_gap: int = setting(200, "steps between GaLore's / APOLLO's projection updates (default 200)")
    proj_scale: float | None = setting(None, "GaLore's / APOLLO's scale (default: galore 0.25, apollo 1, "
                                       "apollo-mini 128)")
    matrix_lr_scale: float = setting(1.0, "full-rank methods (full, full-ws-lr, control): peak LR of the linear "
                                     "maps ReLoRA would wrap (attention, MLP) as a multiple of the rest's "
                                     "(embeddings, head, norms); a diagnostic of GaLore's split, whose projected "
                                     "matrices step at scale 0.25 of its LR (default 1: one LR)")
    scale_front: bool | None = setting(None, "APOLLO: apply the norm-growth limiter after the scale, yes or no "
                                       "(default: yes for apollo-mini, no for apollo)")
    device: str = setting("auto", "auto (default), cpu, cuda, cuda:N", resumable=True)
    threads: int = setting(0, "CPU threads (default 0: as many as CPUs are idle at start, or OMP_NUM_THREADS if "
                           "set; 2 threads beside another busy process ran 4x slower than 1, see "
                           "benchmarks/threads.py)", resumable=True)
    # speed options, off by default; each is measured by `relora bench` (docs/performance.md)
    gradient_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass: less "
                                           "memory, about a third more compute", resumable=True, compare=False)
    compile: bool = setting(False, "torch.compile the model (slow first steps; measured in docs/performance.md)",
                            resumable=True, compare=False)
    max_bad_steps: int = setting(10, "consecutive non-finite steps (skipped) before --on-bad-steps acts (default "
                                 "10)", resumable=True)
    on_bad_steps: str = setting("rollback", "rollback (to the last checkpoint with a lower LR, default) or stop",
                                resumable=True)
    rollback_lr_factor: float = setting(0.5, "a rollback scales the LR by this", flag=None, resumable=True)
    max_rollbacks: int = setting(3, "rollbacks before the run stops", flag=None, resumable=True)
    distributed: str = setting("ddp", "under torchrun: ddp (default, DistributedDataParallel) or fsdp (FSDP2 "
                               "sharding)")
    dist_timeout_s: float = setting(600.0, "seconds a collective may wait before the job fails (a rank died or "
                                    "hangs)", resumable=True)
    wandb: bool = setting(False, "also log metrics to Weights & Biases (pip install wandb)", resumable=True,
                          compare=False)
    wandb_project: str | None = setting(None, "Weights & Biases project (default: relora)", resumable=True,
                                        compare=False)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        from relora.models import llama_config
        from relora.run.device import check_device

        check_types(self)
        self._check_choices()
        self._check_counts()
        self._check_optimizer()
        self._check_method()
        self._check_storage()
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

    def _check_choices(self) -> None:
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

    def _check_counts(self) -> None:
        for name in ("steps", "batch_tokens", "micro_batch", "seq_len", "eval_tokens", "log_every", "keep_checkpoints"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_every", "save_every", "warmup_steps", "warm_start_steps", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")

    def _check_optimizer(self) -> None:
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.weight_decay and getattr(self, "frozen_dtype", "float32") != "float32":
            raise ConfigError("weight decay of frozen weights stored in bfloat16 would round away; "
                              "use --frozen-dtype float32 or --weight-decay 0")
        for name in ("lr", "relora_lr", "proj_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip!r}")
        if self.batch_tokens % self.seq_len:
            raise ConfigError(f"batch_tokens ({self.batch_tokens}) must be a multiple of seq_len ({self.seq_len})")
        if self.sequences_per_step % self.micro_batch:
            raise ConfigError(
                f"micro_batch ({self.micro_batch}) must divide the sequences per step "
                f"(batch_tokens / seq_len = {self.sequences_per_step})"
            )

    def _check_method(self) -> None:
        if self.method == "full-ws-lr" and not (self.warm_start and 0 < self.warm_start_steps < self.steps):
            raise ConfigError(f"full-ws-lr changes its peak LR at --warm-start-steps, which must be in (0, steps = "
                              f"{self.steps}) with the warm start on; got {self.warm_start_steps}"
                              + ("" if self.warm_start else " and --no-warm-start"))
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
        if not self.matrix_lr_scale > 0:
            raise ConfigError(f"matrix_lr_scale must be > 0, got {self.matrix_lr_scale!r}")
        if self.matrix_lr_scale != 1.0 and self.method not in FULL_RANK_METHODS:
            raise ConfigError(f"matrix_lr_scale is for the full-rank methods ({', '.join(FULL_RANK_METHODS)}); "
                              f"method {self.method} sets its matrices' LR otherwise: drop --matrix-lr-scale")
        if self.method in PROJECTION_METHODS:
            from relora.baselines import optimizer_class

            optimizer_class(self.method)  # a missing extra fails here, before any data is read
        if self.method == "online-relora" and self.merge_every is None:
            raise ConfigError("online-relora needs --merge-every N (smaller than --reset-every)")
        if self.reference_defects and self.method not in ADAPTER_METHODS:
            raise ConfigError(f"reference_defects are defects of ReLoRA's adapters; method {self.method} has none "
                              f"(use one of {', '.join(ADAPTER_METHODS)})")
        self.relora_config()  # ReLoRAConfig's own checks (rank, ratios, intervals, quantize, reference defects)

    def _check_storage(self) -> None:
        """Quantized or bfloat16 frozen weights: which methods and modes can store them."""
        from relora.core.config import FROZEN_DTYPES

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
        """Step at which the model is wrapped (0 for plain LoRA or without warm start); for full-ws-lr the step
        at which its peak LR changes from lr to relora_lr."""
        if self.method == "lora" or not self.warm_start:
            return 0
        return self.warm_start_steps

    @property
    def peak_change(self) -> tuple[int, float] | None:
        """full-ws-lr's LR step without a switch of phase: (step, relora_lr / lr); None for every other method
        (the adapters' phases have an optimizer each, at its own peak LR)."""
        return (self.warm_start_steps, self.relora_lr / self.lr) if self.method == "full-ws-lr" else None

    def peak_lr(self, wrapped: bool) -> float:
        if self.method in PROJECTION_METHODS:
            return self.proj_lr
        return self.relora_lr if wrapped else self.lr

    def set_peak_lr(self, lr: float | None) -> None:
        """``--lr``: the peak LR of the method's main phase: relora_lr for adapter methods, proj_lr for
        GaLore/APOLLO, lr otherwise (None: unchanged)."""
        if lr is None:
            return
        if self.method in TWO_PHASE_LR_METHODS:
            self.relora_lr = lr
        elif self.method in PROJECTION_METHODS:
            self.proj_lr = lr
        else:
            self.lr = lr

    def relora_config(self) -> ReLoRAConfig | None:
        """The adapter / restart settings this method and its ablation switches mean.

        A ReLoRAConfig field that TrainConfig has too is passed as it is; the others are what the method and
        the ablation switches make of the run's settings.
        """
        from relora.core.config import ReLoRAConfig

        if self.method not in ADAPTER_METHODS:
            return None
        restarts = self.restarts and self.method in ("relora", "online-relora")
        reset_every = self.reset_every if restarts else None
        merge_every = self.merge_every if self.method == "online-relora" and restarts else reset_every
        shared = {f.name: getattr(self, f.name) for f in fields(ReLoRAConfig) if f.name in FIELD_NAMES}
        try:
            return ReLoRAConfig(**{
                **shared,
                "r": self.rank,
                "reset_every": reset_every,
                "merge_every": merge_every,
                "restart_warmup_steps": self.restart_warmup_steps if restarts else 0,
                "prune": self.prune if self.optimizer_reset else "none",
                "warm_start_steps": self.relora_phase_start,
                "reference_defects": tuple(self.reference_defects),
            })
        except ValueError as exc:
            message = str(exc).replace("r must", "rank must")
            if message.startswith("reset_every ("):  # the restart warm-up does not fit in a cycle
                message += "; change --reset-every or --restart-warmup-steps"
            raise ConfigError(message) from None

    def to_dict(self) -> dict:
        return asdict(self)


FIELD_NAMES = [f.name for f in fields(TrainConfig)]
# Changing these makes a checkpoint mean something else: a resume refuses them (and `relora compare` will not
# reuse a run that differs in one). Every field but those declared ``resumable``.
RESUME_INCOMPATIBLE = tuple(f.name for f in fields(TrainConfig) if not f.metadata["resumable"])
# What full-rank training never reads: `relora compare` pins these to the preset's values for its full-rank rows,
# so comparisons that vary only adapter settings (docs/results/study) reuse one full-rank run.
ADAPTER_ONLY = tuple(f.name for f in fields(TrainConfig) if f.metadata["adapters_only"])
PROJECTION_ONLY = ("proj_lr", "proj_rank", "update_proj_gap", "proj_scale")  # read by galore / apollo alone


def unread_settings(method: str | None) -> tuple[str, ...]:
    """The settings a full-rank run never reads: every adapter and projection setting (full-ws-lr reads relora_lr,
    the LR of its second phase). Empty for the other methods."""
    if method not in ("full", "full-ws-lr"):
        return ()
    return tuple(k for k in (*ADAPTER_ONLY, *PROJECTION_ONLY) if not (k == "relora_lr" and method == "full-ws-lr"))


def incompatible_changes(saved: dict, current: dict) -> list[str]:
    """Fields that differ between a saved run config and a resume's config. A setting the saved run's method
    never reads (``unread_settings``) is not one: its checkpoints mean the same under any value of it, e.g. a
    full-rank run saved before a changed adapter default."""
    defaults = TrainConfig().to_dict()  # a key missing from an older run's config had its default
    unread = unread_settings(saved.get("method", defaults["method"]))
    return [k for k in RESUME_INCOMPATIBLE if k not in unread
            and (not _same_data(saved, current) if k == "data" else saved.get(k, defaults[k]) != current.get(k))]


def _same_data(saved: dict, current: dict) -> bool:
    """The same dataset: equal identities when both configs have one (any path or working directory),
    else the same resolved path (an older run's config, or a config not run yet)."""
    if saved.get("data_id") and current.get("data_id"):
        return saved["data_id"] == current["data_id"]
    paths = [Path(c["data"]).expanduser().resolve() if c.get("data") else None for c in (saved, current)]
    return paths[0] == paths[1]
