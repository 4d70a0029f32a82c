"""ReLoRAConfig: the hyper-parameters of the method (RELORA_SPEC.md sections 2-5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PRUNE_METHODS = ("magnitude", "random", "full", "none", "independent")  # relora.core.pruning
# Adam's step counter after a prune (spec section 4): "keep" (paper, reference code) or "reset".
RESTART_ADAM_STEPS = ("keep", "reset")
FROZEN_DTYPES = ("float32", "bfloat16")
QUANT_TYPES = ("nf4", "int8")  # storage formats of relora.integrations.quantize (bitsandbytes)
MASTER_WEIGHTS = ("cpu",)
# Defects of the reference / relora-pico code, reproducible one at a time FOR STUDY ONLY (spec sections 2-4;
# docs/method.md "Reference defects"). Never on by default.
REFERENCE_DEFECTS = ("zero-init-a", "unscaled-merge", "independent-masks")


@dataclass
class ReLoRAConfig:
    """What to wrap, and when to merge, prune and restart.

    Defaults are the paper's runs: r=128, alpha=32 (scale 0.25), 99% magnitude
    pruning of the adapters' Adam moments, 100-step LR re-warmup.
    ``reset_every=None`` means no restarts at all (plain LoRA).
    """

    r: int = 128
    alpha: float = 32.0
    dropout: float = 0.0
    # Module-name patterns; None = every linear layer except the output head
    # (for LLaMA: q/k/v/o_proj and gate/up/down_proj).
    target_modules: list[str] | None = None
    # 5000 steps between restarts: the authors' released pretraining scripts.
    reset_every: int | None = 5000
    # Merge more often than resetting = Online ReLoRA (paper, Section 3).
    merge_every: int | None = None
    restart_warmup_steps: int = 100
    prune: str = "magnitude"
    prune_ratio: float = 0.99
    # Adam's step counter of the pruned tensors at a restart (spec section 4): "reset" (default), so that bias
    # correction starts afresh for the fresh moments, or "keep" (the paper and the reference code). Under "keep",
    # a pruned entry's update is ~3.2x lr one step after a restart at beta2 = 0.999, 6.5x after 10 steps.
    # The default is "reset" since the study's Table 3b (docs/method.md): ahead of "keep" beyond the noise.
    restart_adam_step: str = "reset"
    warm_start_steps: int = 0
    # Seed for adapter initialisation and random pruning masks; identical on
    # every data-parallel rank so that all ranks draw the same values.
    seed: int = 0
    # Storage of the frozen base weights of wrapped layers: "bfloat16" halves
    # their memory (merges are still computed in float32, rounded once).
    frozen_dtype: str = "float32"
    # Quantized storage of those weights ("nf4" or "int8", with bitsandbytes; relora.integrations.quantize): merges
    # dequantize to float32, add s B A and re-quantize. master_weights="cpu" keeps a float32 copy of them
    # in CPU memory that merges go into, so quantization error does not accumulate over restarts.
    # With quantize set, frozen_dtype does not apply.
    quantize: str | None = None
    master_weights: str | None = None
    # STUDY ONLY: reproduce defects of the reference / relora-pico code, each alone (REFERENCE_DEFECTS):
    # "zero-init-a": A zeroed with B at wrap (no adapter gradient until the first merge; re-inits stay Kaiming);
    # "unscaled-merge": merges fold B A, not s B A (the function changes by (1 - s) B A at every merge);
    # "independent-masks": with prune="random", m and v get independent random masks (orphan first moments).
    reference_defects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.reference_defects, list):
            self.reference_defects = tuple(self.reference_defects)
        if self.merge_every is None:
            self.merge_every = self.reset_every
        self.validate()

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.prune not in PRUNE_METHODS:
            raise ValueError(f"prune must be one of {', '.join(PRUNE_METHODS)}; got {self.prune!r}")
        if not 0.0 <= self.prune_ratio <= 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1], got {self.prune_ratio!r}")
        if self.restart_adam_step not in RESTART_ADAM_STEPS:
            raise ValueError(f"restart_adam_step must be one of {', '.join(RESTART_ADAM_STEPS)}; "
                             f"got {self.restart_adam_step!r}")
        if self.restart_warmup_steps < 0:
            raise ValueError(f"restart_warmup_steps must be >= 0, got {self.restart_warmup_steps!r}")
        if self.warm_start_steps < 0:
            raise ValueError(f"warm_start_steps must be >= 0, got {self.warm_start_steps!r}")
        if self.reset_every is not None:
            if self.reset_every <= 0:
                raise ValueError(f"reset_every must be a positive integer or None, got {self.reset_every!r}")
            if self.reset_every < self.restart_warmup_steps:
                raise ValueError(
                    f"reset_every ({self.reset_every}) must be >= restart_warmup_steps "
                    f"({self.restart_warmup_steps}): each cycle needs room for its LR re-warmup"
                )
        if self.merge_every is not None:
            if self.merge_every <= 0:
                raise ValueError(f"merge_every must be a positive integer or None, got {self.merge_every!r}")
            if self.reset_every is not None and self.reset_every % self.merge_every:
                raise ValueError(
                    f"merge_every ({self.merge_every}) must divide reset_every ({self.reset_every}): "
                    "every optimizer reset happens at a merge"
                )
        elif self.reset_every is not None:
            raise ValueError("merge_every is None but reset_every is set: a reset needs a merge")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}; got {self.frozen_dtype!r}")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ValueError(f"quantize must be one of {', '.join(QUANT_TYPES)} (or None); got {self.quantize!r}")
        if self.master_weights is not None and self.master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"master_weights must be one of {', '.join(MASTER_WEIGHTS)} (or None); "
                             f"got {self.master_weights!r}")
        if self.master_weights is not None and self.quantize is None:
            raise ValueError("master_weights needs quantize: only quantized weights need a float32 master copy")
        if self.target_modules is not None and (
            isinstance(self.target_modules, str) or not all(isinstance(t, str) for t in self.target_modules)
        ):
            raise ValueError(f"target_modules must be a list of strings, got {self.target_modules!r}")
        self._validate_defects()

    def _validate_defects(self) -> None:
        """Known names, and only where the defect is reproduced exactly (docs/method.md, "Reference defects")."""
        defects = self.reference_defects
        if not isinstance(defects, tuple) or not all(isinstance(d, str) for d in defects):
            raise ValueError(f"reference_defects must be a list of names ({', '.join(REFERENCE_DEFECTS)}), "
                             f"got {defects!r}")
        unknown = [d for d in defects if d not in REFERENCE_DEFECTS]
        if unknown:
            raise ValueError(f"unknown reference defect {unknown[0]!r}; the names are {', '.join(REFERENCE_DEFECTS)}")
        if "unscaled-merge" in defects and self.quantize is not None:
            raise ValueError("reference defect unscaled-merge is not exact with quantize: each merge re-quantizes, "
                             "so the function changes by more than (1 - s) B A; drop quantize for the study")
        if "independent-masks" in defects and self.prune not in ("random", "none"):
            raise ValueError(f"reference defect independent-masks draws independent random masks: use it with "
                             f"prune='random' (--prune random), not {self.prune!r}; the reference code's "
                             "magnitude-ranked independent rule is prune='independent'")

    def to_dict(self) -> dict:
        values = asdict(self)
        values["reference_defects"] = list(self.reference_defects)  # as JSON stores it: resumes compare equal
        return values
