"""relora finetune: GLUE-style classification with LoRA / ReLoRA, and its metrics."""

import csv
import json
import random

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from relora.cli import main
from relora.finetune.classification import (
    FinetuneConfig,
    finetune,
    load_classifier,
    prepare_adapters,
)
from relora.finetune.metrics import accuracy, f1, matthews_corrcoef

pytestmark = pytest.mark.usefixtures("single_thread")

NOISE = [f"w{i}" for i in range(30)]


# ---------------------------------------------------------------- metrics
def test_binary_metrics_by_hand():
    labels, predictions = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]  # TP 2, FN 1, FP 1, TN 2
    assert accuracy(labels, predictions) == pytest.approx(4 / 6)
    assert f1(labels, predictions, 2) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(labels, predictions, 2) == pytest.approx((2 * 2 - 1 * 1) / 9)  # sqrt(3*3*3*3) = 9


def test_multiclass_metrics_by_hand():
    labels, predictions = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    # per-class F1: 2*1/(2+1+1), 2*2/(4+1+0), 2*1/(2+0+1)
    assert f1(labels, predictions, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # R_K: (c*s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)), c=4, s=6, t=(2,2,2), p=(2,3,1)
    assert matthews_corrcoef(labels, predictions, 3) == pytest.approx(12 / np.sqrt(22 * 24))


def reference_binary(labels, predictions):
    tp = sum(1 for y, p in zip(labels, predictions) if y == 1 and p == 1)
    tn = sum(1 for y, p in zip(labels, predictions) if y == 0 and p == 0)
    fp = sum(1 for y, p in zip(labels, predictions) if y == 0 and p == 1)
    fn = sum(1 for y, p in zip(labels, predictions) if y == 1 and p == 0)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 2 * precision * recall / (precision + recall), mcc


def reference_multiclass_mcc(labels, predictions, k):
    """MCC as the correlation of one-hot label and prediction vectors (an independent definition)."""
    x, y = np.eye(k)[labels], np.eye(k)[predictions]
    cov = lambda a, b: float(((a - a.mean(0)) * (b - b.mean(0))).sum())  # noqa: E731
    return cov(x, y) / np.sqrt(cov(x, x) * cov(y, y))


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_reference_formulas_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    labels, predictions = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    expected_f1, expected_mcc = reference_binary(labels, predictions)
    assert f1(labels, predictions, 2) == pytest.approx(expected_f1)
    assert matthews_corrcoef(labels, predictions, 2) == pytest.approx(expected_mcc)
    labels, predictions = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    assert matthews_corrcoef(labels, predictions, 4) == pytest.approx(reference_multiclass_mcc(labels, predictions, 4))
    per_class = []
    for c in range(4):
        tp = int(np.sum((labels == c) & (predictions == c)))
        per_class.append(2 * tp / (np.sum(labels == c) + np.sum(predictions == c)))
    assert f1(labels, predictions, 4) == pytest.approx(np.mean(per_class))
    assert accuracy(labels, predictions) == pytest.approx(np.mean(labels == predictions))


def test_degenerate_predictions_give_zero_not_nan():
    assert matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1], 2) == 0.0
    assert f1([0, 0, 0], [0, 0, 0], 2) == 0.0  # no positives anywhere: 0/0 counts as 0


# ---------------------------------------------------------------- a learnable task
def sentiment_rows(n, seed, pair=False):
    """Noise words with "good" (label pos) or "bad" (label neg) somewhere in them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("neg", "pos")[i % 2]
        words = rng.choices(NOISE, k=rng.randint(4, 10))
        words.insert(rng.randint(0, len(words)), "good" if label == "pos" else "bad")
        row = {"text": " ".join(words), "label": label}
        if pair:
            row = {"text_a": row["text"], "text_b": " ".join(rng.choices(NOISE, k=3)), "label": label}
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A word-level tokenizer and a tiny random LLaMA classifier, saved together."""
    path = tmp_path_factory.mktemp("classifier")
    vocab = {"[PAD]": 0, "[UNK]": 1, "good": 2, "bad": 3, **{w: i + 4 for i, w in enumerate(NOISE)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=64, pad_token_id=0, num_labels=2)).save_pretrained(path)
    return path


def test_head_stays_full_rank_and_unwrapped(model_dir, tmp_path):
    cfg = FinetuneConfig(data="unused", model=str(model_dir), out=str(tmp_path))
    model, _, new = load_classifier(cfg, ["neg", "pos"])
    prepare_adapters(model, cfg, new)
    assert not isinstance(model.score, LoraLayer) and model.score.weight.requires_grad
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == 14  # q, k, v, o, gate, up, down x 2 layers
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"score.weight"} | {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert len(trainable) == 1 + 2 * 14  # the base model (embeddings, norms, W) is frozen


def test_parameters_new_to_the_checkpoint_train_at_full_rank(model_dir, tmp_path):
    """A masked LM has no pooler: it is initialised fresh, so it trains like the head, not through adapters."""
    from transformers import BertConfig, BertForMaskedLM

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64)).save_pretrained(tmp_path)
    cfg = FinetuneConfig(data="unused", model=str(tmp_path), out=str(tmp_path / "out"))
    model, _, new = load_classifier(cfg, ["neg", "pos"])
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= new
    prepare_adapters(model, cfg, new)
    assert not isinstance(model.bert.pooler.dense, LoraLayer) and model.bert.pooler.dense.weight.requires_grad
    assert not isinstance(model.classifier, LoraLayer) and model.classifier.weight.requires_grad
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LoraLayer)
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad


@pytest.mark.parametrize("method", ["lora", "relora"])
def test_finetune_learns_a_separable_task(method, model_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(240, seed=0))
    val_rows = sentiment_rows(60, seed=1)
    val_file = write_jsonl(tmp_path / "val.jsonl", val_rows)
    result = finetune(FinetuneConfig(data=str(train_file), val_file=str(val_file), model=str(model_dir),
                                     out=str(tmp_path / "out"), method=method, epochs=4, lr=1e-2, reset_every=10,
                                     batch_size=16, device="cpu"))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["majority_accuracy"] == 0.5 and saved["positive_label"] == "pos"
    assert result.metrics["accuracy"] > 0.8 and saved["accuracy"] == result.metrics["accuracy"]
    assert result.metrics["mcc"] > 0.6
    assert len(saved["history"]) == 4
    assert (result.restarts, result.merges) == ((5, 5) if method == "relora" else (0, 0))  # 60 steps, every 10

    # The exported model is a plain classifier, last cycle merged: it reproduces the reported accuracy.
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model").eval()
    assert type(exported).__name__ == "LlamaForSequenceClassification"
    assert not any("lora" in name for name, _ in exported.named_parameters())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "out" / "model")
    batch = tokenizer([r["text"] for r in val_rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = exported(**batch).logits.argmax(-1).numpy()
    labels = np.array([r["label"] == "pos" for r in val_rows], dtype=np.int64)
    assert accuracy(labels, predicted) == result.metrics["accuracy"]


def test_cli_finetunes_sentence_pairs_from_csv(model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "pairs.csv", sentiment_rows(300, seed=2, pair=True))
    code = main(["finetune", str(data), "--model", str(model_dir), "--out", str(tmp_path / "out"), "--method",
                 "relora", "--epochs", "3", "--lr", "1e-2", "--reset-every", "20", "--val-fraction", "0.2",
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    assert "accuracy" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (saved["train_examples"], saved["val_examples"]) == (240, 60)
    assert saved["accuracy"] > 0.8 and saved["restarts"] == 2  # 45 steps: restarts at 20 and 40


def test_cli_reads_glue_tsv_with_named_columns(model_dir, tmp_path, capsys):
    """GLUE's SST-2 layout: unquoted TSV, a `sentence` column, labels 0/1 (1 is the positive class)."""
    rows = sentiment_rows(200, seed=3)
    lines = ["sentence\tlabel"] + [f'"{r["text"]}\t{int(r["label"] == "pos")}' for r in rows]  # GLUE: quotes are text
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    code = main(["finetune", str(tmp_path / "train.tsv"), "--text-columns", "sentence", "--model", str(model_dir),
                 "--out", str(tmp_path / "out"), "--method", "lora", "--epochs", "3", "--lr", "1e-2",
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["labels"] == ["0", "1"] and saved["positive_label"] == "1"
    assert saved["accuracy"] > 0.8 and saved["config"]["text_columns"] == ["sentence"]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("sentence,label\nfoo,1\nbar,0\n", "no text (or text_a, text_b) column"),
    ("text,target\nfoo,1\nbar,0\n", "no label column"),
    ("text,label\nfoo,1\nbar,\n", "line 3: no value in column 'label'"),
    ("text,label\nfoo,1\nfoo,1\n", "a classifier needs two or more"),
    ('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\nnot json\n', "line 3: not valid JSON"),
    ('{"text": "a", "label": 0.5}\n', "must be a string or an integer"),
])
def test_bad_data_is_a_one_line_error(content, message, model_dir, tmp_path, capsys):
    suffix = ".jsonl" if content and content.startswith("{") else ".csv"
    data = tmp_path / f"data{suffix}"
    if content is not None:
        data.write_text(content)
    assert main(["finetune", str(data), "--model", str(model_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_validation_label_is_a_one_line_error(model_dir, tmp_path, capsys):
    train_file = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20, seed=0))
    val_file = write_jsonl(tmp_path / "val.jsonl", [{"text": "good w1", "label": "neutral"}])
    assert main(["finetune", str(train_file), "--val-file", str(val_file), "--model", str(model_dir),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "label 'neutral' does not occur in the training data" in err and len(err.splitlines()) == 1
