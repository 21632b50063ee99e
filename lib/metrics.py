"""Classification metrics through `evaluate` (offline, module kept in the repo), confusion matrix, mistakes."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

METRIC_MODULE = Path(__file__).parent / "metric_modules" / "classification"


@lru_cache(maxsize=None)
def load_metric(name: str) -> Any:
    """evaluate.load of one of accuracy, precision, recall, f1 from the repo's own module (no Hub)."""
    import evaluate

    return evaluate.load(str(METRIC_MODULE), name)


def classification_metrics(references: np.ndarray, predictions: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, weighted and macro precision/recall/F1, and per-class precision/recall/F1/support."""
    refs, preds = np.asarray(references).tolist(), np.asarray(predictions).tolist()
    ids = list(range(len(labels)))
    result: dict[str, Any] = {"accuracy": load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]}
    per_class: dict[str, dict[str, float]] = {name: {} for name in labels}
    for metric in ("precision", "recall", "f1"):
        module = load_metric(metric)
        for how in ("weighted", "macro"):
            result[f"{metric}_{how}"] = module.compute(predictions=preds, references=refs, average=how, labels=ids)[metric]
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
    """Merge updates into a metrics.json (created when missing) and return the whole dict."""
    path = Path(path)
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(updates)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(path)
    return metrics
