"""Data: de-duplication, stratified seeded splits with no duplicate straddling splits, label column names."""

import shutil

import numpy as np
import pytest
from PIL import Image

from lib import data
from lib.params import DataParams

NAMES = ["calling", "clapping", "cycling"]


def image_folder(root, per_class=10, duplicates=3):
    """An image folder of random JPEGs, with `duplicates` byte-identical copies in each class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(NAMES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{i:03d}.jpg")
        for i in range(duplicates):
            shutil.copy(folder / f"{i:03d}.jpg", folder / f"copy_{i:03d}.jpg")
    return root


def test_stratified_split_is_seeded_disjoint_and_stratified():
    labels = np.repeat(np.arange(5), 40)
    a = data.stratified_split(labels, 0.1, 0.2, seed=3)
    b = data.stratified_split(labels, 0.1, 0.2, seed=3)
    c = data.stratified_split(labels, 0.1, 0.2, seed=4)
    assert all(np.array_equal(a[s], b[s]) for s in data.SPLITS)
    assert not np.array_equal(a["test"], c["test"])
    together = np.concatenate([a[s] for s in data.SPLITS])
    assert sorted(together) == list(range(len(labels)))
    for split, n in (("train", 28), ("validation", 4), ("test", 8)):
        assert (np.bincount(labels[a[split]]) == n).all(), split


def test_split_refuses_tiny_classes():
    with pytest.raises(ValueError, match="at least 3"):
        data.stratified_split(np.array([0, 0, 0, 1, 1]), 0.2, 0.2, 0)


def test_first_occurrences_and_cap():
    assert data.first_occurrences(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 3]
    labels = np.array([0] * 10 + [1] * 3)
    kept = data.cap_per_class(labels, 4, seed=0)
    assert np.bincount(labels[kept]).tolist() == [4, 3]
    assert len(data.cap_per_class(labels, None, 0)) == 13


def test_prepare_drops_duplicates_so_none_straddle_splits(tmp_path):
    folder = image_folder(tmp_path / "images")
    p = DataParams(source="imagefolder", path=str(folder), val_fraction=0.2, test_fraction=0.2)
    dd, summary = data.prepare(p, tmp_path / "out", cache_root=tmp_path / "cache")
    assert summary["loaded"] == 39 and summary["duplicates_dropped"] == 9
    assert summary["split_sizes"] == {"train": 18, "validation": 6, "test": 6}
    hashes = [set(dd[s]["sha256"]) for s in data.SPLITS]
    assert sum(len(h) for h in hashes) == len(set.union(*hashes)) == 30
    assert data.class_names(dd["train"]) == NAMES
    assert set(dd["train"].column_names) == {"image", "label", "sha256"}
    reloaded = data.load_splits(tmp_path / "out")
    assert reloaded["test"]["sha256"] == dd["test"]["sha256"]
    assert (tmp_path / "out" / "summary.json").is_file()


def test_prepare_without_dedup_keeps_copies(tmp_path):
    folder = image_folder(tmp_path / "images")
    p = DataParams(source="imagefolder", path=str(folder), dedup=False, val_fraction=0.2, test_fraction=0.2)
    _, summary = data.prepare(p, tmp_path / "out", cache_root=tmp_path / "cache")
    assert summary["duplicates_dropped"] == 0 and sum(summary["split_sizes"].values()) == 39


def test_hub_style_labels_column_is_renamed():
    import datasets

    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=NAMES)})
    img = Image.new("RGB", (8, 8))
    ds = datasets.Dataset.from_dict({"image": [img, img], "labels": [0, 2]}, features=features)
    out = data._standardise(ds)
    assert out.column_names == ["image", "label"] and data.class_names(out) == NAMES


def test_load_splits_explains_missing_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare stage"):
        data.load_splits(tmp_path)


def test_batch_transforms(tmp_path):
    import torch

    from lib.transforms import ImageSpec

    folder = image_folder(tmp_path / "images", per_class=4, duplicates=0)
    dd, _ = data.prepare(DataParams(source="imagefolder", path=str(folder), val_fraction=0.25, test_fraction=0.25), tmp_path / "o", tmp_path / "c")
    spec = ImageSpec(size=16)
    ev = dd["train"].with_transform(data.eval_batch_transform(spec))
    assert torch.equal(ev[0]["pixel_values"], ev[0]["pixel_values"])
    tr = dd["train"].with_transform(data.train_batch_transform(spec, {"scale_min": 0.3}))
    assert not torch.equal(tr[0]["pixel_values"], tr[0]["pixel_values"])
    batch = data.collate([ev[0], ev[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].dtype == torch.int64
