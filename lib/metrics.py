"""Classification metrics through `evaluate` (offline, module kept in the repo), confusion matrix, mistakes."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from lib.files import read_json, write_json

# The headline metrics shown in registry listings and the dashboard's model panel.
SUMMARY_METRICS = ("accuracy", "f1_macro", "f1_weighted")
METRIC_MODULE = Path(__file__).parent / "metric_modules" / "classification"


@cache
def load_metric(name: str) -> Any:
    """evaluate.load of one of accuracy, precision, recall, f1 from the repo's own module (no Hub)."""
    import evaluate

    return evaluate.load(str(METRIC_MODULE), name)


def classification_metrics(references: np.ndarray, predictions: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, weighted and macro precision/recall/F1, and per-class precision/recall/F1/support."""
    refs, preds = np.asarray(references).tolist(), np.asarray(predictions).tolist()
    ids = list(range(len(labels)))
    result: dict[str, Any] = {
        "accuracy": load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
    }
    per_class: dict[str, dict[str, float]] = {name: {} for name in labels}
    for metric in ("precision", "recall", "f1"):
        module = load_metric(metric)
        for how in ("weighted", "macro"):
            result[f"{metric}_{how}"] = module.compute(predictions=preds, references=refs, average=how, labels=ids)[
                metric
            ]
        values = module.compute(predictions=preds, references=refs, average=None, labels=ids)[metric]
        for name, value in zip(labels, values):
            per_class[name][metric] = float(value)
    support = np.bincount(np.asarray(refs, int), minlength=len(labels))
    for name, count in zip(labels, support):
        per_class[name]["support"] = int(count)
    result["per_class"] = per_class
    result["n_test"] = len(refs)
    return result


def confusion_matrix(references: np.ndarray, predictions: np.ndarray, n_labels: int) -> np.ndarray:
    """Counts: rows are true classes, columns predicted classes."""
    cm = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(references, int), np.asarray(predictions, int)), 1)
    return cm


def most_confident_mistakes(probs: np.ndarray, references: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to n wrong predictions, most confident first."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != np.asarray(references))
    return wrong[np.argsort(-probs[wrong, preds[wrong]], kind="stable")][:n]


def update_metrics(path: Path, updates: dict) -> dict:
    """Merge updates into a metrics.json (created when missing), written atomically; return the whole dict."""
    metrics = {**(read_json(path) if Path(path).is_file() else {}), **updates}
    write_json(path, metrics)
    return metrics
