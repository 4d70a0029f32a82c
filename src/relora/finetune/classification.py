"""Fine-tuning a classifier with LoRA or ReLoRA (the paper's Appendix B: GLUE).

``finetune(config)`` reads top to bottom: read the examples (CSV, TSV or
JSONL of ``text,label`` or ``text_a,text_b,label``), load the model as
``AutoModelForSequenceClassification`` from a local directory, freeze it,
wrap its linear layers with adapters (the classification head stays outside
the adapters and trains at full rank), train with the jagged cosine schedule
(``relora``: merges, optimizer resets and LR re-warmups every
``reset_every`` steps; ``lora``: no restarts), evaluate accuracy, F1 and
Matthews correlation after every epoch, and write ``metrics.json`` and the
merged dense model.

Unlike pretraining (spec section 2), embeddings and norms are frozen here:
fine-tuning trains only the adapters and the new head, as LoRA fine-tuning
does and as the paper's GLUE runs compare.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from relora.core.adapters import find_targets, unwrap, wrap
from relora.core.config import ReLoRAConfig
from relora.core.controller import ReLoRA
from relora.core.schedule import jagged_cosine_scheduler
from relora.errors import ConfigError
from relora.fileio import write_json_atomic
from relora.finetune.config import FinetuneConfig
from relora.finetune.examples import (
    Examples,
    encode_labels,
    label_names,
    read_examples,
    split_examples,
)
from relora.finetune.metrics import classification_metrics
from relora.models import count_parameters
from relora.run.device import pick_device
from relora.run.export import save_dense

logger = logging.getLogger(__name__)



@dataclass
class FinetuneResult:
    out: Path
    metrics: dict[str, float]  # after the last epoch
    history: list[dict] = field(default_factory=list)  # one record per epoch
    restarts: int = 0
    merges: int = 0


def load_classifier(cfg: FinetuneConfig, names: list[str]) -> tuple[nn.Module, object, set[str]]:
    """The model directory as a sequence classifier with a new head of ``len(names)`` classes, its tokenizer,
    and the names of the parameters the directory did not hold (the new head; e.g. BERT's pooler when
    loading a masked LM)."""
    for what, directory in (("model", cfg.model), ("tokenizer", cfg.tokenizer or cfg.model)):
        if not Path(directory).is_dir():
            raise ConfigError(f"{what} directory {directory} does not exist; pass a local directory")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {cfg.tokenizer or cfg.model}: {_first_line(exc)}; "
                          "pass --tokenizer DIR") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an eos token; "
                              "set pad_token in tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token  # decoder LMs: the classifier reads the last non-pad token
    try:
        model, loading = transformers.AutoModelForSequenceClassification.from_pretrained(
            cfg.model, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True, dtype=torch.float32,  # a saved head of another size is replaced
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load a sequence classifier from {cfg.model}: {_first_line(exc)}") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.problem_type = "single_label_classification"
    new_parameters = set(loading["missing_keys"]) | {key for key, *_ in loading["mismatched_keys"]}
    return model, tokenizer, new_parameters


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters outside the base model (``score``, ``classifier``, ...): the new task head."""
    prefix = getattr(model, "base_model_prefix", "")
    return [name for name, _ in model.named_parameters() if not prefix or not name.startswith(prefix + ".")]


def prepare_adapters(model: nn.Module, cfg: FinetuneConfig, new_parameters: set[str] = frozenset()) -> ReLoRAConfig:
    """Freeze the base model, wrap its linear layers; the head trains at full rank, unwrapped.

    ``new_parameters``, initialised fresh inside the base model (a pooler a
    masked-LM checkpoint lacks), are treated like the head: a frozen random
    matrix plus a low-rank update would waste them.
    """
    head = set(head_parameter_names(model))
    if not head:
        raise ConfigError(f"{type(model).__name__} has no classification head outside its base model")
    full_rank = head | set(new_parameters)
    prefix = model.base_model_prefix + "."
    targets = [name for name in find_targets(model)
               if name.startswith(prefix) and name + ".weight" not in full_rank]
    for name, param in model.named_parameters():
        param.requires_grad_(name in full_rank)
    relora_cfg = cfg.relora_config(targets)
    wrap(model, relora_cfg)  # keeps each other parameter's trainability: frozen base, trainable head
    return relora_cfg


# ---------------------------------------------------------------- batches and evaluation
def tokenize(tokenizer: object, examples: Examples, max_length: int) -> list[list[int]]:
    encoded = tokenizer(examples.text_a, examples.text_b, truncation=True, max_length=max_length)
    return encoded["input_ids"]


def collate(tokenizer: object, ids: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


@torch.no_grad()
def predict(model: nn.Module, tokenizer: object, ids: list[list[int]], batch_size: int,
            device: torch.device) -> np.ndarray:
    was_training = model.training
    model.eval()
    predictions = []
    for start in range(0, len(ids), batch_size):
        logits = model(**collate(tokenizer, ids[start:start + batch_size], device)).logits
        predictions.append(logits.argmax(-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(predictions)


# ---------------------------------------------------------------- the run
def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and write ``metrics.json`` and ``model/`` into ``cfg.out``."""
    cfg.validate()
    out = _empty_output(Path(cfg.out))
    train_examples, val_examples, names = _labelled_examples(cfg)
    train_labels = encode_labels(train_examples.labels, names, str(cfg.data))
    val_labels = encode_labels(val_examples.labels, names, str(cfg.val_file or cfg.data))

    torch.manual_seed(cfg.seed)  # the new head's initialisation
    device = pick_device(cfg.device)
    model, tokenizer, new_parameters = load_classifier(cfg, names)
    relora_cfg = prepare_adapters(model, cfg, new_parameters)
    model.to(device).train()
    train_ids = tokenize(tokenizer, train_examples, cfg.max_length)
    val_ids = tokenize(tokenizer, val_examples, cfg.max_length)

    total_steps = math.ceil(len(train_ids) / cfg.batch_size) * cfg.epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    controller = ReLoRA(model, optimizer, relora_cfg, start_step=0, total_steps=total_steps)
    scheduler = _schedule(cfg, optimizer, controller, total_steps)
    trainable, total = count_parameters(model)
    logger.info("finetune %s: %d train / %d val examples, %d classes, %d steps, %s trainable of %s parameters",
                cfg.method, len(train_ids), len(val_ids), len(names), total_steps, f"{trainable:,}", f"{total:,}")

    history, step = [], 0
    for epoch in range(cfg.epochs):
        order = np.random.default_rng(cfg.seed + epoch).permutation(len(train_ids))
        loss_sum = 0.0
        for start in range(0, len(order), cfg.batch_size):
            pick = order[start:start + cfg.batch_size]
            batch = collate(tokenizer, [train_ids[i] for i in pick], device)
            loss = model(**batch, labels=torch.from_numpy(train_labels[pick]).to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            controller.step(step)  # relora: merge, prune, restart when due; lora: never due
            loss_sum += loss.item() * len(pick)
        predictions = predict(model, tokenizer, val_ids, cfg.batch_size, device)
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / len(order),
                  **classification_metrics(val_labels, predictions, len(names))}
        history.append(record)
        logger.info("epoch %d: train loss %.4f, val accuracy %.4f, F1 %.4f, MCC %.4f", record["epoch"],
                    record["train_loss"], record["accuracy"], record["f1"], record["mcc"])

    out.mkdir(parents=True, exist_ok=True)
    save_dense(unwrap(model).cpu(), tokenizer, out / "model")  # last cycle merged: a plain classifier
    metrics = {k: history[-1][k] for k in ("accuracy", "f1", "mcc")}
    majority = float(np.bincount(val_labels, minlength=len(names)).max() / len(val_labels))
    write_json_atomic(out / "metrics.json", {
        **metrics, "majority_accuracy": majority, "method": cfg.method, "labels": names,
        "positive_label": names[1] if len(names) == 2 else None, "train_examples": len(train_ids),
        "val_examples": len(val_ids), "steps": total_steps, "restarts": controller.restarts,
        "merges": controller.merges, "trainable_params": trainable, "total_params": total,
        "history": history, "config": asdict(cfg),
    })
    return FinetuneResult(out=out, metrics=metrics, history=history, restarts=controller.restarts,
                          merges=controller.merges)


def _empty_output(out: Path) -> Path:
    """``out`` if it is absent or an empty directory: fine-tuning never writes into a user's files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} is not empty; choose another --out")
    return out


def _labelled_examples(cfg: FinetuneConfig) -> tuple[Examples, Examples, list[str]]:
    """Train and validation examples (a file each, or a split of one) and the label names, sorted."""
    train_examples = read_examples(cfg.data, cfg.text_columns, cfg.label_column)
    if cfg.val_file:
        val_examples = read_examples(cfg.val_file, cfg.text_columns, cfg.label_column)
    else:
        train_examples, val_examples = split_examples(train_examples, cfg.val_fraction, cfg.seed)
    names = label_names(train_examples.labels)
    if len(names) < 2:
        raise ConfigError(f"{cfg.data}: every training example has label {names[0]!r}; a classifier needs two or more")
    return train_examples, val_examples, names


def _schedule(cfg: FinetuneConfig, optimizer: torch.optim.Optimizer, controller: ReLoRA,
              total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The jagged cosine with the controller's restarts (none for LoRA), warned about when relora gets none."""
    restart_steps = controller.restart_steps() if cfg.method == "relora" else []
    if cfg.method == "relora" and not restart_steps:
        logger.warning("relora: %d steps in all, reset_every %d: no restart will happen; lower --reset-every",
                       total_steps, cfg.reset_every)
    return jagged_cosine_scheduler(optimizer, total_steps=total_steps,
                                   warmup_steps=round(cfg.warmup_fraction * total_steps),
                                   restart_steps=restart_steps,
                                   restart_warmup_steps=controller.config.restart_warmup_steps)
