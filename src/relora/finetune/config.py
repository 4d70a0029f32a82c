"""FinetuneConfig: the settings of ``relora finetune``, each declared once with its help text.

The CLI generates the command's flags from these fields (relora.cli.flags);
torch is imported only inside the checks that need it, so that
``relora --help`` loads none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from relora.errors import ConfigError
from relora.run.fields import setting

if TYPE_CHECKING:
    from relora.core.config import ReLoRAConfig

METHODS = ("lora", "relora")


def _columns(text: str) -> list[str]:
    """--text-columns: comma-separated column names, as written."""
    return [c.strip() for c in text.split(",")]


@dataclass
class FinetuneConfig:
    """A fine-tuning run; field names are the ``relora finetune`` flags with dashes as underscores."""

    data: str = setting(help="training examples (.csv, .tsv with a header row, or .jsonl)", flag="TRAIN_FILE")
    model: str = setting(help="local model directory (a causal LM or classifier)")
    out: str = setting(help="output directory (must be empty or new)")
    tokenizer: str | None = setting(None, "tokenizer directory (default: the model directory)")
    val_file: str | None = setting(None, "validation examples (default: hold out --val-fraction of TRAIN_FILE)")
    text_columns: list[str] | None = setting(None, "one or two comma-separated text columns (default: text, or "
                                             "text_a,text_b)", parse=_columns)
    label_column: str = setting("label", "the label column (default: label)")
    val_fraction: float = setting(0.1, "fraction held out for validation (default 0.1)")
    method: str = setting("relora", "relora (default): restarts every --reset-every", choices=METHODS)
    rank: int = setting(8, "adapter rank (default 8)")
    alpha: float = setting(16.0, "adapter alpha, scale = alpha / rank (default 16)")
    reset_every: int = setting(100, "steps between ReLoRA restarts (default 100)")
    restart_warmup_steps: int | None = setting(None, "LR re-warmup after a restart (default reset-every/10)")
    prune_ratio: float = setting(0.99, "fraction of the adapters' Adam moments zeroed at each restart", flag=None)
    epochs: int = setting(3, "passes over the training data (default 3)")
    lr: float = setting(1e-3, "peak learning rate (default 1e-3)")
    batch_size: int = setting(16, "examples per step (default 16)")
    max_length: int = setting(128, "tokens per example, longer ones truncated (default 128)")
    warmup_fraction: float = setting(0.06, "LR warm-up, a fraction of all steps: the usual GLUE recipe (RoBERTa)",
                                     flag=None)
    seed: int = setting(0, "seed of the split, data order and head init (default 0)")
    device: str = setting("auto", "auto (default), cpu, cuda")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        from relora.run.device import check_device

        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in ("rank", "reset_every", "epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or not self.alpha > 0:
            raise ConfigError(f"lr and alpha must be > 0, got lr={self.lr!r}, alpha={self.alpha!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise ConfigError(f"text_columns names one or two columns, got {self.text_columns!r}")
        check_device(self.device)

    @property
    def rewarm_steps(self) -> int:
        if self.restart_warmup_steps is not None:
            return self.restart_warmup_steps
        return max(1, self.reset_every // 10)

    def relora_config(self, targets: list[str]) -> ReLoRAConfig:
        from relora.core.config import ReLoRAConfig

        restarts = self.method == "relora"
        try:
            return ReLoRAConfig(r=self.rank, alpha=self.alpha, target_modules=targets,
                                reset_every=self.reset_every if restarts else None,
                                restart_warmup_steps=self.rewarm_steps if restarts else 0,
                                prune_ratio=self.prune_ratio, seed=self.seed)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("r must", "rank must")) from None
