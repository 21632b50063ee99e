"""Dataset loading (Hub id, image folder, embedded generator), de-duplication, stratified splits, transforms."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from lib.params import DataParams, resolve_path
from lib.transforms import ImageSpec, eval_transform, train_transform

SPLITS = ("train", "validation", "test")


def embedded_folder(p: DataParams, cache_root: Path) -> Path:
    """Write (once) the embedded generator's images as an image folder and return its path."""
    from lib.synthetic import write_image_folder

    root = cache_root / f"embedded_n{p.embedded.images_per_class}_s{p.embedded.seed}"
    return write_image_folder(root, p.embedded.images_per_class, seed=p.embedded.seed)


def _standardise(ds: Any) -> Any:
    """Rename the label column to 'label' and the image column to 'image'; check their types."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    label_cols = [c for c, f in ds.features.items() if isinstance(f, ClassLabel)]
    image_cols = [c for c, f in ds.features.items() if isinstance(f, ImageFeature)]
    if len(label_cols) != 1 or len(image_cols) != 1:
        raise ValueError(
            f"expected one image column and one ClassLabel column, found features {dict(ds.features)} "
            "(an image folder needs one subfolder per class, at least two classes)"
        )
    if label_cols[0] != "label":
        ds = ds.rename_column(label_cols[0], "label")
    if image_cols[0] != "image":
        ds = ds.rename_column(image_cols[0], "image")
    return ds.select_columns(["image", "label"])


def load_source(p: DataParams, cache_root: Path) -> Any:
    """Load the configured source as one datasets.Dataset with columns image and label (ClassLabel)."""
    from datasets import load_dataset

    if p.source == "hub":
        ds = load_dataset(p.hub_id, split=p.hub_split)
    else:
        folder = embedded_folder(p, cache_root) if p.source == "embedded" else resolve_path(p.path or "")
        ds = load_dataset("imagefolder", data_dir=str(folder), split="train")
    return _standardise(ds)


def content_hashes(ds: Any) -> list[str]:
    """sha256 of each image's encoded bytes (file content), without decoding pixels."""
    from datasets import Image as ImageFeature

    raw = ds.cast_column("image", ImageFeature(decode=False)).select_columns(["image"])
    hashes = []
    for batch in raw.iter(batch_size=512):
        for item in batch["image"]:
            data = item.get("bytes") or Path(item["path"]).read_bytes()
            hashes.append(hashlib.sha256(data).hexdigest())
    return hashes


def first_occurrences(hashes: list[str]) -> np.ndarray:
    """Indices of the first occurrence of each distinct hash, in order."""
    seen: set[str] = set()
    keep = []
    for i, h in enumerate(hashes):
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def cap_per_class(labels: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most max_per_class random examples of each label (all when None)."""
    idx = np.arange(len(labels))
    if max_per_class is None:
        return idx
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(idx[labels == c])[:max_per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded stratified train/validation/test index split."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    counts = np.bincount(labels)
    if counts[counts > 0].min() < 3:
        raise ValueError("every class needs at least 3 images for a train/validation/test split")
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    val_share = val_fraction / (1 - test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "validation": np.sort(val), "test": np.sort(test)}


def prepare(p: DataParams, out_dir: Path, cache_root: Path) -> tuple[Any, dict]:
    """Load, de-duplicate, cap, split and save the dataset under out_dir; return (DatasetDict, summary)."""
    from datasets import DatasetDict

    ds = load_source(p, cache_root)
    hashes = content_hashes(ds)
    ds = ds.add_column("sha256", hashes)
    n_loaded = len(ds)
    if p.dedup:
        ds = ds.select(first_occurrences(hashes))
    labels = np.asarray(ds["label"])
    ds = ds.select(cap_per_class(labels, p.max_per_class, p.seed))
    parts = stratified_split(np.asarray(ds["label"]), p.val_fraction, p.test_fraction, p.seed)
    dd = DatasetDict({name: ds.select(parts[name]) for name in SPLITS})
    out_dir.mkdir(parents=True, exist_ok=True)
    dd.save_to_disk(str(out_dir))
    names = class_names(dd["train"])
    summary = {
        "source": p.source if p.source != "hub" else f"hub:{p.hub_id}[{p.hub_split}]",
        "loaded": n_loaded,
        "duplicates_dropped": n_loaded - len(set(hashes)) if p.dedup else 0,
        "class_names": names,
        "split_sizes": {name: len(dd[name]) for name in SPLITS},
        "per_class": {
            name: np.bincount(np.asarray(dd[name]["label"]), minlength=len(names)).tolist() for name in SPLITS
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return dd, summary


def load_splits(data_dir: Path) -> Any:
    """Load the DatasetDict saved by prepare()."""
    from datasets import load_from_disk

    if not (Path(data_dir) / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"no prepared dataset in {data_dir}: run the prepare stage first")
    return load_from_disk(str(data_dir))


def class_names(ds: Any) -> list[str]:
    """Label names, from the dataset's ClassLabel feature."""
    return list(ds.features["label"].names)


def class_table(dd: Any) -> Any:
    """Per-class image counts for each split as a pandas DataFrame."""
    import pandas as pd

    names = class_names(dd["train"])
    table = pd.DataFrame(
        {s: np.bincount(np.asarray(dd[s]["label"]), minlength=len(names)) for s in dd}, index=names
    )
    table.loc["total"] = table.sum()
    return table


def train_batch_transform(spec: ImageSpec, augment: dict) -> Callable[[dict], dict]:
    """A with_transform function applying random augmentation (for the train split only)."""
    import torch

    def apply(batch: dict) -> dict:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        rng = np.random.default_rng(seed)
        pixels = np.stack([train_transform(im, spec, rng, **augment) for im in batch["image"]])
        return {"pixel_values": torch.from_numpy(pixels), "labels": torch.as_tensor(batch["label"])}

    return apply


def eval_batch_transform(spec: ImageSpec) -> Callable[[dict], dict]:
    """A with_transform function applying the deterministic resize + center crop."""
    import torch

    def apply(batch: dict) -> dict:
        pixels = np.stack([eval_transform(im, spec) for im in batch["image"]])
        return {"pixel_values": torch.from_numpy(pixels), "labels": torch.as_tensor(batch["label"])}

    return apply


def collate(examples: list[dict]) -> dict:
    """Stack transformed examples into a batch."""
    import torch

    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.stack([torch.as_tensor(e["labels"]) for e in examples]),
    }


def open_image(ds: Any, i: int) -> Image.Image:
    """The i-th image of a split as RGB PIL."""
    from lib.transforms import to_rgb

    return to_rgb(ds[int(i)]["image"])
