"""The model card (README.md of a version): Hugging Face metadata, data, recipe, metrics, per-class table, confusion
matrix.

The card opens with the YAML front matter the Hugging Face Hub reads (library, pipeline tag, base model, dataset,
tags, and a model-index with the test metrics), written with huggingface_hub's ModelCard / ModelCardData, so the
version folder can be uploaded to the Hub as it is and `ModelCard.load` reads the metadata back.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib.params import flatten
from lib.registry.storage import MANIFEST

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

TAGS = ("vision-transformer", "human-action-recognition", "image-classification")
TASK = "image-classification"


def metrics_summary(metrics: dict) -> dict[str, float | int]:
    """Top-level numeric metrics (no per-class detail)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat_scalars(tree: dict) -> dict[str, Any]:
    """The scalar leaves of a nested metrics dict under dotted keys."""
    return {k: v for k, v in flatten(tree).items() if isinstance(v, (str, int, float, bool)) or v is None}


def _fmt(value: Any, fixed: bool) -> str:
    """Table cell: metrics with 4 decimals (fixed), settings in their shortest form."""
    if isinstance(value, float):
        return f"{value:.4f}" if fixed and abs(value) < 1e4 else f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _table(rows: Iterable[tuple[Any, ...]], header: tuple[str, ...], fixed: bool = False) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c, fixed) for c in row) + " |" for row in rows]
    return lines


def _eval_dataset(data: dict) -> dict[str, Any]:
    """The model-index dataset fields of the test split this run was evaluated on."""
    held_out = {key: data[key] for key in ("test_fraction", "seed") if key in data}
    source = data.get("source", "embedded")
    if source == "hub":
        hub_id, split = str(data.get("hub_id")), str(data.get("hub_split", "train"))
        # The Hub split is the labelled one the test part was carved from (HAR's own `test` split has no labels):
        # naming `test` here would claim a result on that split.
        return {
            "dataset_type": hub_id,
            "dataset_name": f"{hub_id} ({split} split, held-out test part)",
            "dataset_split": split,
            "dataset_args": held_out or None,
        }
    name = (
        "generated stick figures (lib/demo/synthetic.py)"
        if source == "embedded"
        else f"image folder {Path(str(data.get('path') or '')).name}"
    )
    return {"dataset_type": source, "dataset_name": name, "dataset_split": "test", "dataset_args": held_out or None}


def card_data(model_name: str, metrics: dict, params: dict) -> ModelCardData:
    """Hugging Face card metadata: library, task, base model and dataset when they are on the Hub, tags, and the
    test metrics (accuracy, weighted F1, the served file's accuracy) as a model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    data, model = params.get("data", {}) or {}, params.get("model", {}) or {}
    dataset = _eval_dataset(data)

    def result(metric_type: str, value: Any, name: str, **extra: Any) -> EvalResult:
        return EvalResult(
            task_type=TASK, metric_type=metric_type, metric_value=value, metric_name=name, **dataset, **extra
        )

    results = []
    if isinstance(metrics.get("accuracy"), (int, float)):
        results.append(result("accuracy", metrics["accuracy"], "Test accuracy"))
    if isinstance(metrics.get("f1_weighted"), (int, float)):
        results.append(result("f1", metrics["f1_weighted"], "Test F1 (weighted)", metric_args={"average": "weighted"}))
    served = metrics.get("served") if isinstance(metrics.get("served"), dict) else {}
    as_served = f"as served ({served.get('file')}, {served.get('variant')}, one view)"
    if isinstance(served.get("accuracy"), (int, float)):
        results.append(result("accuracy", served["accuracy"], f"Test accuracy {as_served}", metric_config="served"))
    if isinstance(served.get("f1_weighted"), (int, float)):
        results.append(
            result(
                "f1",
                served["f1_weighted"],
                f"Test F1 (weighted) {as_served}",
                metric_config="served",
                metric_args={"average": "weighted"},
            )
        )
    return ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=TASK,
        # A local folder or a config-built model has no Hub id to point at.
        base_model=model.get("name_or_path") if model.get("source") == "hub" else None,
        datasets=[data["hub_id"]] if data.get("source") == "hub" and data.get("hub_id") else None,
        tags=list(TAGS),
        metrics=["accuracy", "f1"],
        eval_results=results or None,
    )


def gate_lines(gate: dict) -> list[str]:
    """The card's account of the publish gate: which model's figures were judged, and each condition's verdict."""
    if not gate.get("enabled"):
        return ["The publish gate was off (`publish.gate.enabled: false`): this version was published unjudged."]
    seen = gate.get("judged") or {}
    lines = [
        f"Judged on the served model's own figures, `{seen.get('metrics')}`: `{seen.get('file')}` "
        f"({seen.get('backend')}, {seen.get('variant')}, {seen.get('views')} view, {seen.get('split')} split), "
        "not on the PyTorch model's table above.",
        "",
    ]
    rows = [
        (
            row.get("key", row.get("metric")),
            row.get("value"),
            "" if row.get("min") is None else row["min"],
            "" if row.get("max") is None else row["max"],
            "passed" if row.get("passed") else "failed",
        )
        for row in gate.get("report") or []
    ]
    return lines + _table(rows, ("figure", "value", "min", "max", "verdict"), fixed=True)


def model_card(
    model_name: str,
    version: str,
    created: str,
    metrics: dict,
    params: dict,
    data_summary: dict | None,
    files: list[str],
    gate: dict | None = None,
) -> str:
    """Model card: Hugging Face front matter (card_data), then data, recipe, metrics, the publish gate (gate: the
    publish record's "gate", saying which figures were judged), per-class table, confusion matrix in Markdown."""
    from huggingface_hub import ModelCard

    run, data = params.get("run", {}) or {}, params.get("data", {}) or {}
    model, train = params.get("model", {}) or {}, params.get("train", {}) or {}
    per_class = metrics.get("per_class") or {}
    lines = [
        f"# {model_name} — version {version}",
        "",
        f"Vision Transformer image classifier of {len(per_class) or 'the'} human actions. "
        f"Published {created} from run `{run.get('name', '?')}`. Every file with its size and SHA-256 is "
        f"listed in `{MANIFEST}`.",
        "",
        "## Data",
        "",
    ]
    info = data_summary or (metrics.get("data") if isinstance(metrics.get("data"), dict) else {}) or {}
    source = info.get("source") or data.get("source", "?")
    if source == "hub":
        source = f"hub:{data.get('hub_id')}[{data.get('hub_split')}]"
    elif source == "imagefolder":
        source = f"imagefolder:{Path(str(data.get('path') or '')).name}"
    rows: list[tuple[Any, ...]] = [("source", source)]
    for key in ("loaded", "duplicates_dropped"):
        if key in info:
            rows.append((key.replace("_", " "), info[key]))
    dup = info.get("duplicates") if isinstance(info.get("duplicates"), dict) else {}
    for key in (
        "exact_groups",
        "near_duplicate_distance",
        "near_groups",
        "near_group_images",
        "exact_mixed_label_groups",
        "near_mixed_label_groups",
    ):
        if key in dup:  # near-duplicate groups are kept, each whole on one side of the split
            rows.append((key.replace("_", " "), "off" if dup[key] is None else dup[key]))
    sizes = info.get("split_sizes") or {}
    rows += [(f"{name} images", n) for name, n in sizes.items()]
    if not sizes and "n_test" in metrics:
        rows.append(("test images", metrics["n_test"]))
    for key in ("dedup", "max_per_class", "val_fraction", "test_fraction", "seed"):
        if key in data:
            rows.append((f"data.{key}", data[key]))
    lines += _table(rows, ("item", "value"))

    lines += ["", "## Recipe", ""]
    rows = [("model.source", model.get("source", "?"))]
    if model.get("source") in ("hub", "local"):
        rows.append(("model.name_or_path", model.get("name_or_path")))
    else:
        for key, value in (model.get("config") or {}).items():
            rows.append((f"model.config.{key}", value))
    for key in ("freeze_layers",):
        if key in model:
            rows.append((f"model.{key}", model[key]))
    for key in (
        "epochs",
        "batch_size",
        "grad_accum",
        "learning_rate",
        "lr_scheduler",
        "warmup_ratio",
        "weight_decay",
        "label_smoothing",
        "layer_decay",
        "mixup_alpha",
        "cutmix_alpha",
        "precision",
        "num_gpus",
    ):
        if key in train:
            rows.append((f"train.{key}", train[key]))
    if "seed" in run:
        rows.append(("run.seed", run["seed"]))
    trained = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
    for key, value in _flat_scalars(trained).items():
        if key not in ("best_checkpoint", "resumed_from"):  # local paths, meaningless elsewhere
            rows.append((f"trained: {key}", value))
    lines += _table(rows, ("setting", "value"))

    lines += ["", "## Metrics (test split)", ""]
    served = metrics.get("served") if isinstance(metrics.get("served"), dict) else {}
    if served:
        lines += [
            f"What is served: `{served.get('file')}` ({served.get('backend')}, {served.get('variant')}, one view, "
            f"temperature {_fmt(served.get('temperature'), True)} fitted on its own validation logits): accuracy "
            f"{_fmt(served.get('accuracy'), True)}, expected calibration error {_fmt(served.get('ece'), True)}. "
            "The table below is the trained PyTorch model as evaluated (with flip averaging when `tta_flip` is on).",
            "",
        ]
        if served.get("reason"):  # the export stage's serving gate: the cheapest variant that passes, or the fallback
            lines += [f"Why this file: {served['reason']}.", ""]
    lines += _table(metrics_summary(metrics).items(), ("metric", "value"), fixed=True)
    if gate is not None:
        lines += ["", "## Publish gate", "", *gate_lines(gate)]
    if per_class:
        lines += ["", "## Per class", ""]
        lines += _table(
            (
                (name, *(c.get(k, "") for k in ("precision", "recall", "f1", "support")))
                for name, c in per_class.items()
                if isinstance(c, dict)
            ),
            ("class", "precision", "recall", "f1", "support"),
            fixed=True,
        )
    for section in ("served", "calibration", "export"):
        if isinstance(metrics.get(section), dict) and metrics[section]:
            lines += ["", f"## {section.capitalize()}", ""]
            lines += _table(_flat_scalars(metrics[section]).items(), ("item", "value"), fixed=True)
    exported = [f for f in files if f.startswith("export/")]
    if exported:
        lines += ["", "Exported files: " + ", ".join(f"`{f}`" for f in exported)]
    pngs = [f for f in files if "/" not in f and f.endswith(".png")]
    if "confusion_matrix.png" in pngs:
        lines += ["", "## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)"]
    for png in pngs:
        if png != "confusion_matrix.png":
            lines += ["", f"![{png[:-4].replace('_', ' ')}]({png})"]
    meta = card_data(model_name, metrics, params).to_yaml()
    return str(ModelCard(f"---\n{meta}\n---\n\n" + "\n".join(lines) + "\n"))
