"""Figures: sample grid, training curves, confusion matrices, most confident mistakes, export variants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    """matplotlib.pyplot with a non-interactive backend outside notebooks."""
    import matplotlib

    if "ipykernel" not in __import__("sys").modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> Path:
    """Save a figure as PNG (150 dpi) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def sample_grid(ds: Any, labels: list[str], per_class: int = 4, seed: int = 0) -> Any:
    """A grid with per_class random images of each class (one row per class)."""
    plt = _plt()
    from lib.data import open_image

    y = np.asarray(ds["label"])
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(labels), per_class, figsize=(per_class * 1.6, len(labels) * 1.6), squeeze=False)
    for c, name in enumerate(labels):
        picks = rng.permutation(np.flatnonzero(y == c))[:per_class]
        for j, ax in enumerate(axes[c]):
            ax.axis("off")
            if j < len(picks):
                ax.imshow(open_image(ds, picks[j]))
        axes[c][0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def training_curves(history: list[dict]) -> Any:
    """Loss (train and validation) and validation accuracy against epochs."""
    plt = _plt()
    train = [(h["epoch"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["epoch"], h["eval_loss"], h.get("eval_accuracy")) for h in history if "eval_loss" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    if train:
        ax1.plot(*zip(*train), label="train loss")
    if evals:
        ax1.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="validation loss")
        ax2.plot([e[0] for e in evals], [e[2] for e in evals], "o-", color="tab:green")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax1.legend()
    ax2.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy", ylim=(0, 1))
    fig.tight_layout()
    return fig


def confusion_heatmaps(cm: np.ndarray, labels: list[str]) -> Any:
    """Side-by-side seaborn heatmaps: counts and row-normalised (recall per true class)."""
    plt = _plt()
    import seaborn as sns

    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(22, 9))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", xticklabels=labels, yticklabels=labels, ax=axes[0], cbar=False)
    sns.heatmap(
        norm, annot=True, fmt=".2f", cmap="Blues", vmin=0, vmax=1, xticklabels=labels, yticklabels=labels, ax=axes[1]
    )
    for ax, title in zip(axes, ("Confusion matrix (counts)", "Confusion matrix (row-normalised)")):
        ax.set(xlabel="predicted", ylabel="true", title=title)
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    return fig


def mistakes_grid(ds: Any, indices: np.ndarray, probs: np.ndarray, labels: list[str], cols: int = 4) -> Any:
    """The given test images with true label, predicted label and confidence."""
    plt = _plt()
    from lib.data import open_image

    rows = max(1, int(np.ceil(len(indices) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.8), squeeze=False)
    y = np.asarray(ds["label"])
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices):
        pred = int(probs[i].argmax())
        ax.imshow(open_image(ds, i))
        ax.set_title(f"true: {labels[y[i]]}\npred: {labels[pred]} ({probs[i, pred]:.2f})", fontsize=8)
    if len(indices) == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center")
    fig.tight_layout()
    return fig


def export_variants(check: dict, min_agreement: float | None = None) -> Any:
    """PyTorch and each ONNX file side by side: size, latency per image, top-1 agreement with PyTorch (the serving
    rule's threshold dashed)."""
    plt = _plt()
    rows = check["variants"]
    names = list(rows)
    colors = ["tab:gray" if n == "torch" else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    panels = (
        ("size_mib", "size (MiB)", "%.1f"),
        ("latency_ms", "latency per image (ms)", "%.1f"),
        ("agreement", "top-1 agreement with PyTorch", "%.3f"),
    )
    for ax, (key, title, fmt) in zip(axes, panels):
        bars = ax.bar(names, [float(rows[n][key]) for n in names], color=colors)
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        ax.set(title=title)
    if min_agreement is not None:
        axes[2].axhline(min_agreement, color="tab:red", linestyle="--", linewidth=1)
    axes[2].set_ylim(0, 1.05)
    fig.tight_layout()
    return fig
