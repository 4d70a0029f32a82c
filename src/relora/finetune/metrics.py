"""Classification metrics as GLUE reports them: accuracy, F1 and Matthews correlation.

Written with numpy rather than taken from scikit-learn, which is not a
dependency. Conventions follow scikit-learn's defaults, so numbers compare
with published GLUE results: binary F1 is the F1 of the positive class (id 1);
multi-class F1 is the unweighted mean over the classes that occur in the
labels or the predictions (macro); a 0/0 anywhere counts as 0.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j] = how many examples of class i were predicted as class j."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return float(np.mean(labels == predictions)) if labels.size else 0.0


def _f1_per_class(counts: np.ndarray) -> np.ndarray:
    tp = np.diag(counts).astype(np.float64)
    denominator = counts.sum(axis=0) + counts.sum(axis=1)  # 2 TP + FP + FN
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Binary: F1 of class 1. More classes: macro F1 over the classes present."""
    counts = confusion_matrix(labels, predictions, num_classes)
    per_class = _f1_per_class(counts)
    if num_classes == 2:
        return float(per_class[1])
    present = (counts.sum(axis=0) + counts.sum(axis=1)) > 0
    return float(per_class[present].mean()) if present.any() else 0.0


def matthews_corrcoef(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Matthews correlation; for more than two classes Gorodkin's R_K (GLUE's CoLA metric)."""
    counts = confusion_matrix(labels, predictions, num_classes).astype(np.float64)
    total, correct = counts.sum(), np.trace(counts)
    true_k, pred_k = counts.sum(axis=1), counts.sum(axis=0)
    numerator = correct * total - pred_k @ true_k
    denominator = np.sqrt((total**2 - pred_k @ pred_k) * (total**2 - true_k @ true_k))
    return float(numerator / denominator) if denominator > 0 else 0.0


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    return {
        "accuracy": accuracy(labels, predictions),
        "f1": f1(labels, predictions, num_classes),
        "mcc": matthews_corrcoef(labels, predictions, num_classes),
    }
