"""Run comparison on fake run folders, and the 05_compare_runs notebook executed with papermill."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import nbformat
import numpy as np
import pytest
import yaml

from lib.compare import (
    backbone_table,
    find_runs,
    per_class_f1,
    plot_histories,
    plot_metrics,
    plot_per_class,
    plot_tradeoff,
    runs_table,
)
from lib.params import ROOT, load_params, save_params

NOTEBOOK = ROOT / "notebooks" / "05_compare_runs.ipynb"
CLASSES = ["calling", "clapping", "cycling", "dancing", "drinking"]
# (run name, overrides, accuracy)
RUNS = [
    ("demo-freeze_layers0", ["model.freeze_layers=0"], 0.61),
    ("demo-freeze_layers2", ["model.freeze_layers=2"], 0.55),
    ("demo-freeze_layers2-lr", ["model.freeze_layers=2", "train.learning_rate=0.0005"], 0.58),
]


def params_file(tmp_path: Path, overrides: list[str]):
    """Resolved params: the demo profile when it exists, all defaults otherwise."""
    demo = ROOT / "params" / "demo.yaml"
    if not demo.is_file():
        demo = tmp_path / "empty.yaml"
        demo.write_text("{}\n")
    return load_params(demo, overrides)


def make_run(
    root: Path, tmp_path: Path, name: str, overrides: list[str], accuracy: float, calibration: bool = True
) -> Path:
    """A run folder as the pipeline leaves it: params.yaml, metrics.json, train_history.json."""
    run = root / name
    save_params(params_file(tmp_path, overrides + [f"run.name={name}"]), run / "params.yaml")
    per_class = {
        c: {"precision": accuracy, "recall": accuracy, "f1": round(accuracy - 0.1 * i, 3), "support": 12}
        for i, c in enumerate(CLASSES)
    }
    metrics = {
        "accuracy": accuracy,
        "f1_weighted": accuracy - 0.01,
        "f1_macro": accuracy - 0.02,
        "precision_weighted": accuracy,
        "recall_weighted": accuracy,
        "per_class": per_class,
        "train": {"train_runtime_s": 100.0 + 10 * len(overrides), "epochs": 2},
    }
    if calibration:
        metrics["calibration"] = {
            "temperature": 1.5,
            "ece_before": 0.12,
            "ece_after": 0.04,
            "nll_before": 1.3,
            "nll_after": 1.1,
        }
    (run / "metrics.json").write_text(json.dumps(metrics))
    history = [
        {"epoch": 1.0, "loss": 2.0, "step": 10},
        {"epoch": 1.0, "eval_loss": 1.8, "eval_accuracy": accuracy - 0.1, "step": 10},
        {"epoch": 2.0, "loss": 1.5, "step": 20},
        {"epoch": 2.0, "eval_loss": 1.4, "eval_accuracy": accuracy, "step": 20},
    ]
    (run / "train_history.json").write_text(json.dumps(history))
    return run


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    for name, overrides, accuracy in RUNS:
        make_run(root, tmp_path, name, overrides, accuracy)
    (root / "registry").mkdir()  # not a run: no metrics.json
    (root / "demo-unfinished").mkdir()
    save_params(params_file(tmp_path, []), root / "demo-unfinished" / "params.yaml")
    return root


def test_find_runs_keeps_finished_runs_matching_pattern(runs_root: Path, tmp_path: Path):
    assert [p.name for p in find_runs(runs_root)] == [name for name, _, _ in RUNS]
    assert [p.name for p in find_runs(runs_root, "*-lr")] == ["demo-freeze_layers2-lr"]
    assert find_runs(tmp_path / "missing") == []


def test_find_runs_sorts_numbers_naturally(tmp_path: Path):
    root = tmp_path / "outputs"
    for n in (10, 2, 0):
        make_run(root, tmp_path, f"demo-freeze_layers{n}", [f"model.freeze_layers={min(n, 4)}"], 0.5)
    assert [p.name for p in find_runs(root)] == ["demo-freeze_layers0", "demo-freeze_layers2", "demo-freeze_layers10"]


def test_runs_table_shows_varying_params_and_metrics(runs_root: Path):
    table = runs_table(find_runs(runs_root))
    assert table.attrs["varying"] == ["model.freeze_layers", "train.learning_rate"]
    assert table["run"].tolist() == [name for name, _, _ in RUNS]
    assert table["model.freeze_layers"].tolist() == [0, 2, 2]
    assert table["train.learning_rate"].tolist()[2] == 0.0005
    assert table["accuracy"].tolist() == [acc for _, _, acc in RUNS]
    assert table["f1_macro"].tolist() == pytest.approx([acc - 0.02 for _, _, acc in RUNS])
    assert table["ece_after"].tolist() == [0.04] * 3
    assert table["train_runtime_s"].tolist() == [110.0, 110.0, 120.0]
    # Params equal in every run, and the run name, are not columns.
    assert "train.epochs" not in table.columns and "run.name" not in table.columns
    assert table["model"].nunique() == 1


def test_runs_table_without_calibration_or_variation(tmp_path: Path):
    root = tmp_path / "outputs"
    make_run(root, tmp_path, "only", ["model.freeze_layers=1"], 0.5, calibration=False)
    table = runs_table(find_runs(root))
    assert len(table) == 1 and table.attrs["varying"] == []
    assert "ece_before" not in table.columns
    plt.close(plot_metrics(table))


def test_per_class_f1_frame(runs_root: Path):
    f1 = per_class_f1(find_runs(runs_root))
    assert f1.shape == (len(CLASSES), len(RUNS))
    assert f1.index.tolist() == CLASSES
    assert f1.loc["clapping", "demo-freeze_layers0"] == pytest.approx(0.51)


def test_plots_are_figures(runs_root: Path):
    runs = find_runs(runs_root)
    figures = [plot_metrics(runs_table(runs)), plot_per_class(per_class_f1(runs)), plot_histories(runs)]
    try:
        assert all(isinstance(fig, matplotlib.figure.Figure) for fig in figures)
        assert len(figures[0].axes) == 3  # metrics, ECE, training time
        assert len(figures[2].axes[0].lines) == len(RUNS)
    finally:
        for fig in figures:
            plt.close(fig)


# (run, Hub id, family, test accuracy, training seconds, served variant, its latency ms, parameters)
BACKBONES = [
    ("har_vit", "google/vit-base-patch16-224", "vit", 0.874, 610.0, "int8", 211.5, 85_810_191),
    ("har_dinov2", "facebook/dinov2-base", "dinov2", 0.902, 745.0, "fp32", 402.0, 86_592_015),
    ("har_siglip", "google/siglip-base-patch16-224", "siglip", 0.893, 580.0, "int8", 190.25, 92_896_527),
]


def make_backbone_run(root: Path, tmp_path: Path, name, model_id, family, accuracy, seconds, variant, ms, n_params):
    """A hub-backbone run that went through export: model/config.json, metrics with export and served sections."""
    run = make_run(root, tmp_path, name, ["model.source=config"], accuracy, calibration=False)
    tree = yaml.safe_load((run / "params.yaml").read_text())
    tree["model"].update(source="hub", name_or_path=model_id)
    (run / "params.yaml").write_text(yaml.safe_dump(tree))
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text(json.dumps({"model_type": family}))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["train"] |= {"train_runtime_s": seconds, "device": "cuda", "parameters": {"total": n_params}}
    files = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    metrics["export"] = {
        "variants": {
            "torch": {"file": "model/model.safetensors", "latency_ms": 999.0},
            **{v: {"file": f, "latency_ms": ms if v == variant else ms * 1.7} for v, f in files.items()},
        }
    }
    metrics["served"] = {"variant": variant, "file": f"export/{files[variant]}", "accuracy": accuracy - 0.004}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_backbones_side_by_side_with_training_time_and_served_latency(tmp_path: Path):
    root = tmp_path / "outputs"
    for row in BACKBONES:
        make_backbone_run(root, tmp_path, *row)
    table = runs_table(find_runs(root))
    assert table.attrs["varying"] == ["model.name_or_path"]
    side = backbone_table(table)
    order = sorted(BACKBONES, key=lambda r: -r[3])
    assert side["run"].tolist() == [r[0] for r in order] == ["har_dinov2", "har_siglip", "har_vit"]
    assert side["model"].tolist() == [r[1] for r in order]
    assert side["family"].tolist() == [r[2] for r in order]
    assert side["train_runtime_s"].tolist() == [r[4] for r in order]
    assert side["served_file"].tolist() == ["model.onnx", "model.int8.onnx", "model.int8.onnx"]
    assert side["served_latency_ms"].tolist() == [r[6] for r in order]  # the served variant's, not another's
    assert side["parameters_m"].tolist() == [86.6, 92.9, 85.8]
    assert side["served_accuracy"].tolist() == pytest.approx([r[3] - 0.004 for r in order])
    assert list(side.columns[:3]) == ["run", "model", "family"] and "accuracy" in side.columns
    figures = [plot_metrics(table), plot_tradeoff(table)]
    try:
        assert len(figures[0].axes) == 3  # metrics, training time, served latency (no calibration in these runs)
        assert len(figures[1].axes[0].collections) == len(BACKBONES)
    finally:
        for fig in figures:
            plt.close(fig)


def test_served_latency_is_found_by_file_when_the_variant_name_is_unknown(tmp_path: Path):
    root = tmp_path / "outputs"
    run = make_backbone_run(root, tmp_path, *BACKBONES[0])
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["served"]["variant"] = "renamed"
    (run / "metrics.json").write_text(json.dumps(metrics))
    row = runs_table([run]).iloc[0]
    assert row["served_latency_ms"] == 211.5 and row["served_file"] == "model.int8.onnx"
    plain = make_run(root, tmp_path, "no-export", [], 0.5)
    row = runs_table([plain]).iloc[0]
    assert row["served_file"] is None and np.isnan(row["served_latency_ms"]) and row["family"] is None


def test_notebook_is_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert code[0].source == (
        'runs_root = "../outputs"  # folder holding run folders\n'
        'pattern = "*"  # glob on run names, e.g. "demo-freeze_layers*"'
    )
    assert all(c.outputs == [] and c.execution_count is None for c in code)


def execute(tmp_path: Path, runs_root: Path, pattern: str = "*") -> nbformat.NotebookNode:
    """Run the notebook like the pipeline does (kernel python3, cwd notebooks/) and read the result."""
    import papermill as pm

    out = tmp_path / "05_executed.ipynb"
    pm.execute_notebook(
        str(NOTEBOOK),
        str(out),
        parameters={"runs_root": str(runs_root), "pattern": pattern},
        cwd=str(NOTEBOOK.parent),
        kernel_name="python3",
        progress_bar=False,
    )
    return nbformat.read(out, as_version=4)


def output_text(nb: nbformat.NotebookNode) -> str:
    """All text an executed notebook shows (streams, plain text and HTML results)."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            data = output.get("data", {})
            parts += [data.get("text/plain", ""), data.get("text/html", "")]
    return "\n".join(parts)


def errors(nb: nbformat.NotebookNode) -> list:
    return [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.mark.integration
def test_notebook_compares_runs(tmp_path: Path, runs_root: Path):
    nb = execute(tmp_path, runs_root, "demo-*")
    assert errors(nb) == []
    text = output_text(nb)
    for name, _, _ in RUNS:
        assert name in text
    assert "model.freeze_layers" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # metrics, per-class heatmap, training curves


@pytest.mark.integration
def test_notebook_with_no_runs(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    nb = execute(tmp_path, empty)
    assert errors(nb) == []
    assert "No finished runs" in output_text(nb)


@pytest.mark.integration
def test_notebook_compares_backbones(tmp_path: Path):
    root = tmp_path / "outputs"
    for row in BACKBONES:
        make_backbone_run(root, tmp_path, *row)
    nb = execute(tmp_path, root, "har_*")
    assert errors(nb) == []
    text = output_text(nb)
    for _, model_id, family, *_ in BACKBONES:
        assert model_id in text and family in text
    assert "served_latency_ms" in text and "190.25" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 4  # accuracy against latency, metrics, per-class heatmap, training curves
