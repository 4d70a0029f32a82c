"""What ``relora bench`` measures (BenchSetup) and how (BenchOptions): each setting declared once, as a field.

The ``relora bench`` flags and their help are generated from these fields
(relora.cli.flags), as ``relora train``'s are from TrainConfig's. A setting
that means what a TrainConfig setting means takes that field's help text
(``like_train``) instead of writing it again. Torch-free, so that ``relora
--help`` loads no torch: the model and the cost model are imported when used.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import TYPE_CHECKING, Any

from relora.errors import ConfigError
from relora.run.config import TrainConfig
from relora.run.fields import setting

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from relora.analysis.costs import CostModel

DEFAULT_VOCAB = 32100  # the paper's T5 tokenizer, for presets that do not name a vocabulary
PRESETS_DEFAULT = " (default: the preset's)"


def like_train(name: str, note: str = "", default: Any = MISSING, **kwargs: Any) -> Any:
    """A bench setting that means what TrainConfig's ``name`` means: that field's help text (plus ``note``), so it
    is written once; ``default`` (none: ``from_preset`` resolves it) and the other ``setting`` keywords are the
    bench's own."""
    return setting(default, TrainConfig.__dataclass_fields__[name].metadata["help"] + note, **kwargs)


@dataclass(frozen=True)
class BenchSetup:
    """What is benchmarked: one preset's architecture at a rank, sequence length and micro-batch.

    The fields without a default are resolved from the preset by ``from_preset``; a flag not given takes the
    preset's value there."""

    preset: str = like_train("preset", " (default tiny)")
    rank: int = like_train("rank", PRESETS_DEFAULT)
    seq_len: int = like_train("seq_len", PRESETS_DEFAULT)
    micro_batch: int = setting(help="sequences per step (default: the preset's on GPU, 1 on CPU)")
    vocab_size: int = setting(help="vocabulary (default: the preset's, else 32100)")
    device: str = like_train("device")
    frozen_dtype: str = setting("float32", "storage of frozen weights: float32 or bfloat16 (default: bf16 on GPU)")
    gradient_checkpointing: bool = like_train("gradient_checkpointing", "; both methods", default=False)
    compile: bool = like_train("compile", "; both methods, compiled in the warm-up",
                                         default=False)
    seed: int = setting(0, "seed of the models' initialization", flag=None)

    @classmethod
    def from_preset(cls, preset: str = "tiny", *, rank: int | None = None, seq_len: int | None = None,
                    micro_batch: int | None = None, device: str = "auto", frozen_dtype: str | None = None,
                    vocab_size: int | None = None, gradient_checkpointing: bool = False,
                    compile: bool = False) -> BenchSetup:
        """The setup of ``preset`` with the settings given; the others are the preset's (ConfigError if one is
        not a positive integer, or an unknown frozen dtype)."""
        from relora.models import load_preset
        from relora.run.device import check_device

        train = load_preset(preset)["train"]
        check_device(device)
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        setup = cls(
            preset=preset,
            # `is None`, not `or`: an explicit 0 is an error to report, not a request for the default
            rank=train.get("rank", 128) if rank is None else rank,
            seq_len=train.get("seq_len", 256) if seq_len is None else seq_len,
            micro_batch=(train.get("micro_batch", 1) if device.startswith("cuda") else 1) if micro_batch is None
            else micro_batch,
            vocab_size=train.get("vocab_size", DEFAULT_VOCAB) if vocab_size is None else vocab_size,
            device=device,
            frozen_dtype=frozen_dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
        )
        for name in ("rank", "seq_len", "micro_batch", "vocab_size"):
            if getattr(setup, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(setup, name)}")
        if setup.frozen_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--frozen-dtype must be float32 or bfloat16, got {setup.frozen_dtype!r}")
        return setup

    @property
    def llama(self) -> LlamaConfig:
        """The preset's LLaMA configuration at this vocabulary and sequence length."""
        from relora.models import llama_config, load_preset

        return llama_config(load_preset(self.preset)["model"], self.vocab_size, self.seq_len)

    def cost_model(self) -> CostModel:
        """The cost model of this setup (FLOPs and state bytes of each method)."""
        from relora.analysis.costs import CostModel

        return CostModel(self.llama, self.seq_len, self.rank, frozen_bytes=2 if self.frozen_dtype == "bfloat16" else 4)


@dataclass(frozen=True)
class BenchOptions:
    """How ``relora bench`` measures: which methods, how many rounds, and what besides throughput."""

    methods: str = setting("full,relora", "comma-separated: full, relora (default both)")
    warmup: int = setting(2, "untimed rounds first (default 2)")
    repeats: int = setting(5, "timed rounds; the median is reported (default 5)")
    memory: bool = setting(True, "skip the peak-memory subprocesses")
    merge: bool = setting(False, "also time merge_and_reinit of the whole model")
    max_micro_batch: bool = setting(False, "GPU only: also find the largest micro-batch each method fits (doubling, "
                                    "then bisecting)")
