"""Class names: the 15 actions of `Bingsu/Human_Action_Recognition`, and the labels a saved model carries.

A run's labels always come from its dataset's ClassLabel feature (prepare) and then from the saved model's config
(everything after train). HAR_CLASSES is only for code that stands in for the dataset: the demo generator, the
offline caches of the rehearsal, and the benchmarks' generated photos.
"""

from __future__ import annotations

import json
from pathlib import Path

HAR_CLASSES: tuple[str, ...] = (  # the dataset's ClassLabel names, in its order
    "calling",
    "clapping",
    "cycling",
    "dancing",
    "drinking",
    "eating",
    "fighting",
    "hugging",
    "laughing",
    "listening_to_music",
    "running",
    "sitting",
    "sleeping",
    "texting",
    "using_laptop",
)


def config_labels(model_dir: str | Path) -> list[str]:
    """Label names in class-index order from a saved model's config.json (plain json: no transformers import)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]


class LabelMismatchError(ValueError):
    """A saved model's class names are not its dataset's, in the dataset's order (a corrupted or foreign config)."""


def check_labels(model_dir: str | Path, dataset_names: list[str] | tuple[str, ...]) -> list[str]:
    """Check that a saved model's config.json maps index i to the dataset's i-th ClassLabel name, both ways (id2label
    and label2id); return the names, or raise LabelMismatchError listing every index that differs.

    A permuted id2label loads and predicts without any error: the logits are right and every name printed for them
    is wrong. The evaluate and export stages can call this with `lib.data.class_names(split)` before trusting names.
    """
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    expected = list(dataset_names)
    id2label = {str(k): v for k, v in (cfg.get("id2label") or {}).items()}
    label2id = cfg.get("label2id") or {}
    problems = []
    if len(id2label) != len(expected):
        problems.append(f"id2label has {len(id2label)} classes, the dataset {len(expected)}")
    problems += [
        f"id2label[{i}] is {id2label.get(str(i))!r}, the dataset's class {i} is {name!r}"
        for i, name in enumerate(expected)
        if id2label.get(str(i)) != name
    ]
    if label2id:  # transformers writes both maps; a hand-edited config may disagree with itself
        problems += [
            f"label2id[{name!r}] is {label2id.get(name)!r}, not {i}"
            for i, name in enumerate(expected)
            if label2id.get(name) != i
        ]
    if problems:
        raise LabelMismatchError(
            f"{path} does not match the dataset's class names ({len(problems)} differences): " + "; ".join(problems)
        )
    return expected
