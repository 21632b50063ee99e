"""Compare finished runs: one table of params that differ and metrics, per-class F1, and plots."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from lib.files import read_json
from lib.params import flatten

# Params that differ between runs without changing the results: the run name and where outputs go,
# and the sections used after training (publishing, dashboard).
IGNORED_PARAMS = ("run.name", "run.output_root", "publish.", "dashboard.")
METRICS = ("accuracy", "f1_weighted", "f1_macro")


def _natural_key(path: Path) -> list:
    """Sort key so that 'demo-freeze_layers2' comes before 'demo-freeze_layers10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def find_runs(root: str | Path, pattern: str = "*") -> list[Path]:
    """Run folders under root whose name matches the glob pattern and that hold a metrics.json."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob(pattern) if (p / "metrics.json").is_file()), key=_natural_key)


def flat_params(run: Path) -> dict[str, Any]:
    """The run's params.yaml flattened to dotted keys ('model.freeze_layers': 2); {} when absent."""
    path = Path(run) / "params.yaml"
    tree = yaml.safe_load(path.read_text()) if path.is_file() else {}
    # Lists (e.g. gate conditions) become JSON text so that they can be compared and shown.
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(tree or {}).items()}


def varying_params(params: list[dict[str, Any]]) -> list[str]:
    """Dotted keys whose value is not the same in every run (missing counts as a value), in file order."""
    keys = list(dict.fromkeys(k for p in params for k in p))
    keys = [k for k in keys if not any(k == i or (i.endswith(".") and k.startswith(i)) for i in IGNORED_PARAMS)]
    return [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in params}) > 1]


def model_label(params: dict[str, Any]) -> str:
    """Short model description: Hub id or local path, or the ViT config size for models built from scratch."""
    if not params:
        return "?"
    if params.get("model.source") == "config":
        return (
            f"ViT {params.get('model.config.num_hidden_layers')}L-{params.get('model.config.hidden_size')}d "
            f"(from scratch, {params.get('model.config.image_size')}px)"
        )
    return str(params.get("model.name_or_path", "?"))


def model_family(run: Path) -> str | None:
    """The backbone family of a run's saved model (config.json model_type: vit, dinov2, siglip ...); None without."""
    return read_json(Path(run) / "model" / "config.json", default={}).get("model_type")


def served_figures(metrics: dict) -> dict[str, Any]:
    """What the export stage chose to serve: file, its test accuracy (one view) and its median latency per image
    on the CPU that ran the export (metrics.json "served" and the matching "export" variant); NaN where absent."""
    served = metrics.get("served") or {}
    variants = (metrics.get("export") or {}).get("variants") or {}
    row = variants.get(served.get("variant")) or {}
    if not row:  # a file name is the one key every writer of "served" keeps
        name = Path(str(served.get("file", ""))).name
        row = next((v for v in variants.values() if Path(str(v.get("file", ""))).name == name), {})
    return {
        "served_file": Path(str(served["file"])).name if served.get("file") else None,
        "served_accuracy": served.get("accuracy", np.nan),
        "served_latency_ms": row.get("latency_ms", np.nan),
    }


def runs_table(runs: list[Path]) -> pd.DataFrame:
    """One row per run: name, model and its family, the params that differ across runs, test metrics, ECE, training
    time and parameter count, and the served file with its accuracy and latency."""
    params = [flat_params(run) for run in runs]
    varying = varying_params(params) if len(runs) > 1 else []
    rows = []
    for run, p in zip(runs, params):
        metrics = read_json(Path(run) / "metrics.json", default={})
        calibration = metrics.get("calibration") or {}
        train = metrics.get("train") or {}
        row = {"run": Path(run).name, "model": model_label(p), "family": model_family(run)}
        row.update({key: p.get(key) for key in varying})
        row.update({m: metrics.get(m, np.nan) for m in METRICS})
        if calibration:
            row.update({k: calibration.get(k, np.nan) for k in ("temperature", "ece_before", "ece_after")})
        row["train_runtime_s"] = train.get("train_runtime_s", np.nan)
        row["train_device"] = train.get("device")
        row["parameters_m"] = round(train["parameters"]["total"] / 1e6, 1) if train.get("parameters") else np.nan
        row.update(served_figures(metrics))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["varying"] = varying
    return table


BACKBONE_COLUMNS = (
    "run",
    "model",
    "family",
    "parameters_m",
    "accuracy",
    "f1_weighted",
    "served_accuracy",
    "train_runtime_s",
    "train_device",
    "served_file",
    "served_latency_ms",
)


def backbone_table(table: pd.DataFrame) -> pd.DataFrame:
    """runs_table's columns for comparing backbones side by side: accuracy next to training time and served latency,
    best test accuracy first."""
    return table[[c for c in BACKBONE_COLUMNS if c in table.columns]].sort_values(
        "accuracy", ascending=False, na_position="last", kind="stable"
    )


def per_class_f1(runs: list[Path]) -> pd.DataFrame:
    """Test F1 per class (rows) and run (columns); NaN where a run lacks the class."""
    columns = {}
    for run in runs:
        per_class = read_json(Path(run) / "metrics.json", default={}).get("per_class") or {}
        columns[Path(run).name] = {name: scores.get("f1", np.nan) for name, scores in per_class.items()}
    return pd.DataFrame(columns)


def load_history(run: Path) -> pd.DataFrame:
    """Trainer log history as a frame (epoch, loss, eval_loss, eval_accuracy, ...); empty when absent."""
    return pd.DataFrame(read_json(Path(run) / "train_history.json", default=[]))


def plot_metrics(table: pd.DataFrame):
    """Bar charts across runs: accuracy and F1 scores, ECE when present, training time, and served latency when a
    run was exported."""
    import matplotlib.pyplot as plt

    has_ece = "ece_before" in table.columns
    has_latency = "served_latency_ms" in table.columns and table["served_latency_ms"].notna().any()
    ncols = 2 + has_ece + has_latency
    width_per_run = max(3.0, 0.6 * len(table))
    fig, axes = plt.subplots(1, ncols, figsize=(width_per_run * ncols, 4), squeeze=False)
    axes = axes[0]
    names = table["run"].tolist()
    x = np.arange(len(names))

    def grouped(ax, columns: list[str], labels: list[str]) -> None:
        width = 0.8 / len(columns)
        for i, (col, label) in enumerate(zip(columns, labels)):
            ax.bar(x + (i - (len(columns) - 1) / 2) * width, table[col].astype(float), width=width, label=label)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.legend(fontsize=8)

    grouped(axes[0], list(METRICS), ["accuracy", "F1 weighted", "F1 macro"])
    axes[0].set(ylim=(0, 1), title="Test metrics (higher is better)")
    if has_ece:
        grouped(axes[1], ["ece_before", "ece_after"], ["ECE before", "ECE after T-scaling"])
        axes[1].set(title="Calibration error (lower is better)")
    ax = axes[1 + has_ece]
    ax.bar(x, table["train_runtime_s"].astype(float) / 60, color="tab:gray")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="minutes", title="Training time")
    if has_latency:
        ax = axes[-1]
        ax.bar(x, table["served_latency_ms"].astype(float), color="tab:purple")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set(ylabel="ms per image (median)", title="Served latency, export CPU")
    fig.tight_layout()
    return fig


def plot_tradeoff(table: pd.DataFrame):
    """Test accuracy against served latency, one point per exported run, labelled with its model."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    shown = table.dropna(subset=["accuracy", "served_latency_ms"]) if "served_latency_ms" in table else table[:0]
    for _, row in shown.iterrows():
        ax.scatter(row["served_latency_ms"], row["accuracy"])
        ax.annotate(f"{row['run']}\n{row['model']}", (row["served_latency_ms"], row["accuracy"]), fontsize=7)
    ax.set(xlabel="served latency, ms per image", ylabel="test accuracy", title="Accuracy against served latency")
    fig.tight_layout()
    return fig


def plot_per_class(df: pd.DataFrame):
    """Heatmap of per-class F1 (classes x runs), each cell annotated."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * max(len(df.columns), 1), 1.0 + 0.35 * max(len(df), 1)))
    image = ax.imshow(df.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(df.columns)), df.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(df.index)), df.index)
    for (i, j), value in np.ndenumerate(df.to_numpy(dtype=float)):
        if not np.isnan(value):
            color = "white" if value < 0.6 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(image, ax=ax, label="F1")
    ax.set_title("Per-class F1 on the test split")
    fig.tight_layout()
    return fig


def plot_histories(runs: list[Path]):
    """Validation loss and accuracy per epoch, one line per run (runs without history are skipped)."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        history = load_history(run)
        if "eval_loss" not in history.columns or "epoch" not in history.columns:
            continue
        evals = history.dropna(subset=["eval_loss"])
        ax_loss.plot(evals["epoch"], evals["eval_loss"], marker="o", label=Path(run).name)
        if "eval_accuracy" in evals.columns:
            ax_acc.plot(evals["epoch"], evals["eval_accuracy"], marker="o", label=Path(run).name)
    ax_loss.set(xlabel="epoch", ylabel="validation loss", title="Validation loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    fig.tight_layout()
    return fig
