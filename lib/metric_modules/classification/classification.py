"""Accuracy, precision, recall and F1 as an offline `evaluate` module.

Load with `evaluate.load("<repo>/lib/metric_modules/classification", "f1")`; the config name picks
the metric (accuracy, precision, recall, f1). Precision, recall and F1 take
`average="macro" | "weighted" | None` (None: one value per class) and optional `labels`.
"""

import datasets
import evaluate
import numpy as np

METRICS = ("accuracy", "precision", "recall", "f1")


def per_class(predictions, references, labels=None) -> tuple:
    """Per-class (precision, recall, f1, support) arrays; 0 where a ratio is undefined."""
    predictions, references = np.asarray(predictions, int), np.asarray(references, int)
    if labels is None:
        labels = np.unique(np.concatenate([predictions, references]))
    labels = np.asarray(labels, int)
    n = int(max(labels.max(initial=0), predictions.max(initial=0), references.max(initial=0))) + 1
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (references, predictions), 1)
    cm = cm[np.ix_(labels, labels)]
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(axis=0).astype(float), cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def reduce(values: np.ndarray, support: np.ndarray, how):
    """Average per-class values: 'macro', 'weighted', or None for the per-class list."""
    if how is None:
        return values.tolist()
    if how == "macro":
        return float(values.mean()) if len(values) else 0.0
    if how == "weighted":
        return float((values * support).sum() / support.sum()) if support.sum() else 0.0
    raise ValueError(f"average must be 'macro', 'weighted' or None, not {how!r}")


class Classification(evaluate.Metric):
    """Single-label classification metrics over integer class ids."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in METRICS:
            raise KeyError(f"config name must be one of {METRICS}, not {self.config_name!r}")
        return evaluate.MetricInfo(
            description=f"{self.config_name} of integer class predictions",
            citation="",
            inputs_description="predictions, references: int class ids; average: macro | weighted | None; labels",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="weighted", labels=None):
        if self.config_name == "accuracy":
            predictions, references = np.asarray(predictions), np.asarray(references)
            return {"accuracy": float((predictions == references).mean()) if len(references) else 0.0}
        values = per_class(predictions, references, labels)
        index = METRICS.index(self.config_name) - 1
        return {self.config_name: reduce(values[index], values[3], average)}
