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
