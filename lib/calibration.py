"""Confidence calibration: temperature scaling fitted on validation logits, ECE and reliability diagrams."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from lib.metrics import classification_metrics

if TYPE_CHECKING:
    import pandas as pd

# Search range for the temperature; a fitted value at either end means the logits are degenerate.
T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    m = z.max(axis=1, keepdims=True)
    log_norm = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    labels = np.asarray(labels, dtype=np.int64)
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T in [0.05, 20] minimising the NLL of softmax(logits / T): golden-section search on log T."""
    # The NLL is convex in 1/T, hence unimodal in log T, so a bracketing search finds the global minimum.
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one example")
    lo, hi = np.log(T_MIN), np.log(T_MAX)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, np.exp(a)), nll(logits, labels, np.exp(b))
    while hi - lo > 1e-6:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2.0))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> pd.DataFrame:
    """Per equal-width confidence bin (lo, hi]: count, mean top-1 confidence and accuracy (NaN when empty)."""
    import pandas as pd  # here, not at the top: the torch-free predictor imports softmax from this module

    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted on the inner edges puts c in bin i when edges[i] < c <= edges[i + 1] (0 joins the first bin).
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    return pd.DataFrame(
        {"bin_lower": edges[:-1], "bin_upper": edges[1:], "count": count, "confidence": mean_conf, "accuracy": accuracy}
    )


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: sum over confidence bins of (bin share of examples) * |accuracy - mean confidence|."""
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins[bins["count"] > 0]
    weights = filled["count"] / bins["count"].sum()
    return float((weights * (filled["accuracy"] - filled["confidence"]).abs()).sum())


def reliability_diagram(before: pd.DataFrame, after: pd.DataFrame, ece_before: float, ece_after: float):
    """Two-panel reliability diagram (accuracy per confidence bin vs the diagonal), before and after scaling."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    panels = [
        (before, f"Before calibration: ECE {ece_before:.3f}"),
        (after, f"After temperature scaling: ECE {ece_after:.3f}"),
    ]
    for ax, (bins, title) in zip(axes, panels):
        width = bins["bin_upper"] - bins["bin_lower"]
        centers = bins["bin_lower"] + width / 2
        filled = bins["count"] > 0
        ax.bar(
            centers[filled],
            bins["accuracy"][filled],
            width=width[filled],
            color="tab:blue",
            edgecolor="white",
            label="accuracy",
        )
        # Hatched gap between the mean confidence and the accuracy of each bin.
        gap = bins["confidence"][filled] - bins["accuracy"][filled]
        ax.bar(
            centers[filled],
            gap,
            bottom=bins["accuracy"][filled],
            width=width[filled],
            color="tab:red",
            alpha=0.3,
            hatch="//",
            edgecolor="tab:red",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", title=title)
        ax.set_aspect("equal")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def calibrate(
    val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray, test_labels: np.ndarray
) -> dict[str, float]:
    """Fit T on the validation split; ECE and NLL on the test split before (T=1) and after scaling."""
    temperature = fit_temperature(val_logits, val_labels)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(softmax(test_logits), test_labels),
        "ece_after": expected_calibration_error(softmax(test_logits, temperature), test_labels),
        "nll_before": nll(test_logits, test_labels),
        "nll_after": nll(test_logits, test_labels, temperature),
    }


def served_calibration(
    val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray, test_labels: np.ndarray, fit: bool = True
) -> dict[str, float]:
    """What one served model and view achieves: T fitted on its own validation logits (1.0 when fit is off), and its
    test accuracy, F1 (weighted and macro, as the evaluated model's), ECE before and after scaling, and NLL at T.

    The logits must come from the file and view that serving runs (one view, no flip averaging): a temperature fitted
    on other logits (TTA, or the fp32 model when int8 is served) describes a different model. The test logits and
    labels only measure: nothing here is fitted on them.
    """
    test_labels = np.asarray(test_labels, dtype=np.int64)
    temperature = fit_temperature(val_logits, val_labels) if fit and len(val_labels) else 1.0
    scores = {"accuracy": float("nan"), "f1_weighted": float("nan"), "f1_macro": float("nan")}
    if len(test_labels):
        n_classes = np.shape(test_logits)[1]
        found = classification_metrics(test_labels, np.argmax(test_logits, 1), [str(i) for i in range(n_classes)])
        scores = {k: float(found[k]) for k in scores}
    return {
        "temperature": temperature,
        **scores,
        "ece": expected_calibration_error(softmax(test_logits, temperature), test_labels),
        "ece_uncalibrated": expected_calibration_error(softmax(test_logits), test_labels),
        "nll": nll(test_logits, test_labels, temperature),
        "test_images": int(len(test_labels)),
        "validation_images": int(len(val_labels)),
    }
