"""Build offline Hugging Face caches (model hub cache + datasets Arrow cache) for the real profile's ids."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from lib.synthetic import CLASS_NAMES

HUB_MODEL_ID = "google/vit-base-patch16-224"
HUB_DATASET_ID = "Bingsu/Human_Action_Recognition"


def write_model_cache(hub_cache: Path, model_id: str = HUB_MODEL_ID) -> Path:
    """Save a tiny ViT (1000-class head, like the real checkpoint) as a hub-cache snapshot of model_id."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    repo = hub_cache / ("models--" + model_id.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / sha
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, num_labels=1000)
    ViTForImageClassification(cfg).save_pretrained(snapshot)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def _jpeg(rng: np.random.Generator, label: int) -> bytes:
    """A small JPEG whose colour depends on the label."""
    arr = rng.integers(0, 40, (int(rng.integers(40, 90)), int(rng.integers(40, 90)), 3), dtype=np.uint8)
    arr[..., label % 3] += np.uint8(60 + 10 * label)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_dataset_cache(datasets_cache: Path, per_class: int = 6, dataset_id: str = HUB_DATASET_ID) -> Path:
    """Write an Arrow cache with the schema of Bingsu/Human_Action_Recognition (image, labels; train and test splits)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=list(CLASS_NAMES))})
    rng = np.random.default_rng(0)
    namespace, name = dataset_id.split("/")
    folder = datasets_cache / f"{namespace}___{datasets.naming.camelcase_to_snakecase(name)}" / "default" / "0.0.0" / "0000000000000000"
    folder.mkdir(parents=True, exist_ok=True)
    split_infos = {}
    for split, n in (("train", per_class), ("test", 2)):
        labels = [c for c in range(len(CLASS_NAMES)) for _ in range(n)]
        images = [{"bytes": _jpeg(rng, c), "path": None} for c in labels]
        if split == "test":
            labels = [0] * len(labels)  # the real test split carries no real labels
        ds = datasets.Dataset.from_dict({"image": images, "labels": labels}, features=features)
        path = folder / f"{datasets.naming.camelcase_to_snakecase(name)}-{split}.arrow"
        with datasets.arrow_writer.ArrowWriter(path=str(path), features=features) as writer:
            writer.write_table(ds.data.table)
        split_infos[split] = {"name": split, "num_bytes": path.stat().st_size, "num_examples": len(ds)}
    info = {
        "features": features.to_dict(),
        "builder_name": "parquet",
        "config_name": "default",
        "dataset_name": datasets.naming.camelcase_to_snakecase(name),
        "version": {"version_str": "0.0.0", "major": 0, "minor": 0, "patch": 0},
        "splits": split_infos,
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder
