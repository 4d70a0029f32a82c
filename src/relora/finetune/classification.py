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

import csv
import json
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
from relora.finetune.metrics import classification_metrics
from relora.models import check_device, count_parameters
from relora.run.device import pick_device
from relora.run.export import save_dense

logger = logging.getLogger(__name__)

METHODS = ("lora", "relora")
SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


@dataclass
class FinetuneConfig:
    """A fine-tuning run; field names are the ``relora finetune`` flags with dashes as underscores."""

    data: str  # training examples: .csv, .tsv or .jsonl
    model: str  # local model directory (a causal LM or a classifier saved with save_pretrained)
    out: str
    tokenizer: str | None = None  # None: the model directory's tokenizer
    val_file: str | None = None  # None: hold out val_fraction of data
    text_columns: list[str] | None = None  # None: text, or text_a (and text_b)
    label_column: str = "label"
    val_fraction: float = 0.1
    method: str = "relora"
    rank: int = 8
    alpha: float = 16.0
    reset_every: int = 100
    restart_warmup_steps: int | None = None  # None: reset_every // 10, at least 1
    prune_ratio: float = 0.99
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    warmup_fraction: float = 0.06  # of all steps: the usual GLUE recipe (RoBERTa)
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
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
        restarts = self.method == "relora"
        try:
            return ReLoRAConfig(r=self.rank, alpha=self.alpha, target_modules=targets,
                                reset_every=self.reset_every if restarts else None,
                                restart_warmup_steps=self.rewarm_steps if restarts else 0,
                                prune_ratio=self.prune_ratio, seed=self.seed)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("r must", "rank must")) from None


@dataclass
class Examples:
    """Texts and their labels as written in the file."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Examples:
        pick = [int(i) for i in index]
        return Examples([self.text_a[i] for i in pick], [self.text_b[i] for i in pick] if self.text_b else None,
                        [self.labels[i] for i in pick])


@dataclass
class FinetuneResult:
    out: Path
    metrics: dict[str, float]  # after the last epoch
    history: list[dict] = field(default_factory=list)  # one record per epoch
    restarts: int = 0
    merges: int = 0


# ---------------------------------------------------------------- reading examples
def read_examples(path: str | Path, text_columns: list[str] | None = None, label_column: str = "label") -> Examples:
    """Rows of ``text,label`` or ``text_a,text_b,label`` from a CSV/TSV (header row) or JSONL file.

    ``text_columns`` names one or two other text columns (GLUE's files: e.g.
    ``sentence`` or ``sentence1,sentence2``), ``label_column`` another label.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist; pass a .csv, .tsv or .jsonl file of text,label rows")
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    rows = _jsonl_rows(path) if path.suffix.lower() in (".jsonl", ".json") else _csv_rows(path)
    if not rows:
        raise ConfigError(f"{path} holds no examples")
    columns = set(rows[0][1])
    listed = ", ".join(sorted(columns))
    if text_columns:
        missing = [c for c in text_columns if c not in columns]
        if missing:
            raise ConfigError(f"{path} has no {missing[0]} column (columns: {listed})")
    elif "text" in columns:
        text_columns = ["text"]
    elif "text_a" in columns:
        text_columns = ["text_a", "text_b"] if "text_b" in columns else ["text_a"]
    else:
        raise ConfigError(f"{path} has no text (or text_a, text_b) column (columns: {listed}); "
                          "name yours with --text-columns")
    if label_column not in columns:
        raise ConfigError(f"{path} has no {label_column} column (columns: {listed}); name yours with --label-column")
    texts: list[list[str]] = [[] for _ in text_columns]
    labels = []
    for line, row in rows:
        for column in (*text_columns, label_column):
            value = row.get(column)
            if value is None or (column == label_column and str(value).strip() == ""):
                raise ConfigError(f"{path}, line {line}: no value in column {column!r}")
        for column, values in zip(text_columns, texts):
            values.append(str(row[column]))
        labels.append(_label_name(row[label_column], path, line))
    return Examples(texts[0], texts[1] if len(texts) > 1 else None, labels)


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    # GLUE's .tsv files are not quoted; a quote character there is text.
    tsv = path.suffix.lower() == ".tsv"
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        if reader.fieldnames is None:
            return []
        return [(reader.line_num, row) for row in reader]


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"{path}, line {number}: not valid JSON") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _label_name(value: object, path: Path, line: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{path}, line {line}: label {value!r} must be a string or an integer")
    return str(value).strip()


def label_names(labels: list[str]) -> list[str]:
    """The classes, numerically sorted if all are integers (so binary 0/1 has 1 as the positive class)."""
    unique = set(labels)
    if all(_is_int(x) for x in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def encode_labels(labels: list[str], names: list[str], where: str) -> np.ndarray:
    ids = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(ids))
    if unknown:
        raise ConfigError(f"{where}: label {unknown[0]!r} does not occur in the training data ({', '.join(names)})")
    return np.array([ids[x] for x in labels], dtype=np.int64)


def split_examples(examples: Examples, val_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A seeded random hold-out of ``val_fraction`` of the examples."""
    n_val = max(1, round(val_fraction * len(examples)))
    if len(examples) - n_val < 1:
        raise ConfigError(f"{len(examples)} examples leave none for training after holding out {n_val}; add data")
    order = np.random.default_rng(seed).permutation(len(examples))
    return examples.subset(order[n_val:]), examples.subset(order[:n_val])


# ---------------------------------------------------------------- model
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
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} is not empty; choose another --out")
    train_examples = read_examples(cfg.data, cfg.text_columns, cfg.label_column)
    if cfg.val_file:
        val_examples = read_examples(cfg.val_file, cfg.text_columns, cfg.label_column)
    else:
        train_examples, val_examples = split_examples(train_examples, cfg.val_fraction, cfg.seed)
    names = label_names(train_examples.labels)
    if len(names) < 2:
        raise ConfigError(f"{cfg.data}: every training example has label {names[0]!r}; a classifier needs two or more")
    train_labels = encode_labels(train_examples.labels, names, str(cfg.data))
    val_labels = encode_labels(val_examples.labels, names, str(cfg.val_file or cfg.data))

    torch.manual_seed(cfg.seed)  # the new head's initialisation
    device = pick_device(cfg.device)
    model, tokenizer, new_parameters = load_classifier(cfg, names)
    relora_cfg = prepare_adapters(model, cfg, new_parameters)
    model.to(device).train()
    train_ids = tokenize(tokenizer, train_examples, cfg.max_length)
    val_ids = tokenize(tokenizer, val_examples, cfg.max_length)

    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    controller = ReLoRA(model, optimizer, relora_cfg, start_step=0, total_steps=total_steps)
    restart_steps = controller.restart_steps() if cfg.method == "relora" else []
    if cfg.method == "relora" and not restart_steps:
        logger.warning("relora: %d steps in all, reset_every %d: no restart will happen; lower --reset-every",
                       total_steps, cfg.reset_every)
    scheduler = jagged_cosine_scheduler(optimizer, total_steps=total_steps,
                                        warmup_steps=round(cfg.warmup_fraction * total_steps),
                                        restart_steps=restart_steps,
                                        restart_warmup_steps=relora_cfg.restart_warmup_steps)
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
