"""Dataset loading (Hub id, image folder, embedded generator), de-duplication, near-duplicate grouping (dHash
candidates confirmed by thumbnail correlation), group-aware stratified splits, transforms."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lib.params import DataParams, resolve_path
from lib.transforms import ImageSpec, eval_transform, train_transform

SPLITS = ("train", "validation", "test")
# Difference hash: a 9x8 grey thumbnail gives 8 rows of 8 horizontal neighbour comparisons, 64 bits.
DHASH_COLS, DHASH_ROWS = 9, 8
# BOX averages every source pixel into its cell, so a resized, re-encoded or noisy copy lands on nearly the same
# thumbnail; NEAREST would sample one pixel per cell and flip bits on JPEG noise and watermarks.
DHASH_RESAMPLE = Image.Resampling.BOX
# JPEGs are decoded at the smallest DCT scale (1/2 .. 1/8) that keeps both sides at least this large. Smaller
# drafts are faster but let a copy and its resized copy decode at different scales whose thumbnails drift apart
# (64 px: up to 5 bits on 5/8-size copies of generated scenes; 96 px: 3, as with no draft).
DHASH_DRAFT = (96, 96)
# Near-duplicate confirmation: the grey thumbnail two candidate images are compared on, THUMB_SIDE x THUMB_SIDE
# (squashed, BOX-averaged like the hash). The 9x8 hash sees only the coarse layout, which a plain studio background
# with a figure in the middle shares with many unrelated photos; 1,024 pixels tell those apart, while re-encoding,
# resizing and small crops barely move them.
THUMB_SIDE = 32


def embedded_folder(p: DataParams, cache_root: Path) -> Path:
    """Write (once) the embedded generator's images as an image folder and return its path."""
    from lib.demo.synthetic import write_image_folder

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


def _encoded_images(ds: Any) -> Iterator[bytes]:
    """Each image's encoded bytes (file content), without decoding pixels."""
    from datasets import Image as ImageFeature

    raw = ds.cast_column("image", ImageFeature(decode=False)).select_columns(["image"])
    for batch in raw.iter(batch_size=512):
        for item in batch["image"]:
            yield item.get("bytes") or Path(item["path"]).read_bytes()


def content_hashes(ds: Any) -> list[str]:
    """sha256 of each image's encoded bytes (file content), without decoding pixels."""
    return [hashlib.sha256(data).hexdigest() for data in _encoded_images(ds)]


def fingerprint(img: Image.Image) -> tuple[int, np.ndarray]:
    """(dHash, grey thumbnail) of one image from one decode: the 64-bit difference hash (one bit per horizontally
    adjacent pair of a 9x8 grey thumbnail, set where the right pixel is brighter; row-major, first bit most
    significant) and a THUMB_SIDE x THUMB_SIDE uint8 grey thumbnail."""
    # JPEG: decode only the luma channel, at a reduced DCT scale, inside the decoder; a no-op for other formats.
    img.draft("L", DHASH_DRAFT)
    if img.mode not in ("L", "RGB"):
        from lib.transforms import to_rgb

        img = to_rgb(img)  # transparency on white, 16-bit scaled, as the model sees the image
    grey = img.convert("L")
    cells = np.asarray(grey.resize((DHASH_COLS, DHASH_ROWS), DHASH_RESAMPLE), dtype=np.int16)
    thumb = np.asarray(grey.resize((THUMB_SIDE, THUMB_SIDE), DHASH_RESAMPLE), dtype=np.uint8)
    return int.from_bytes(np.packbits(cells[:, 1:] > cells[:, :-1]).tobytes(), "big"), thumb


def dhash(img: Image.Image) -> int:
    """The 64-bit difference hash of fingerprint()."""
    return fingerprint(img)[0]


def image_fingerprints(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """dHash (uint64, n) and grey thumbnail (uint8, n x THUMB_SIDE x THUMB_SIDE) of each image of a dataset."""
    hashes = np.zeros(len(ds), dtype=np.uint64)
    thumbs = np.zeros((len(ds), THUMB_SIDE, THUMB_SIDE), dtype=np.uint8)
    for i, data in enumerate(_encoded_images(ds)):
        h, thumbs[i] = fingerprint(Image.open(io.BytesIO(data)))
        hashes[i] = np.uint64(h)
    return hashes, thumbs


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64, as uint8."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _BYTE_BITS[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def near_pairs(hashes: np.ndarray, max_distance: int, block_elems: int = 1 << 22) -> np.ndarray:
    """All index pairs (i < j) whose hashes differ in at most max_distance bits, as an (n_pairs, 2) array.

    Every pair is compared, in row blocks of about block_elems XORs (32 MiB) against the rows at and after the
    block, so each pair is seen once and memory stays flat: 12,600 hashes are 79 M comparisons."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    rows = max(1, block_elems // max(n, 1))
    found = [np.empty((0, 2), dtype=np.int64)]
    for start in range(0, n, rows):
        dist = popcount64(h[start : start + rows, None] ^ h[None, start:])
        i, j = np.nonzero(dist <= max_distance)
        upper = j > i  # both offsets are relative to start: j > i is the upper triangle, diagonal excluded
        found.append(np.stack([i[upper], j[upper]], axis=1).astype(np.int64) + start)
    return np.concatenate(found)


def connected_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group id of each of n items after joining every pair (transitively); the id is the group's lowest index."""
    groups = np.arange(n)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        # Union-find done as vectorised min-label propagation: both ends of a pair take the lower label, then
        # every label jumps to its label's label (pointer jumping: long chains close in a few rounds). A group's
        # lowest index keeps its own label, so at the fixed point (every pair agrees) a group carries it.
        low = np.minimum(groups[a], groups[b])
        new = groups.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]
        if np.array_equal(new, groups):
            return groups
        groups = new


def thumbnail_similarity(thumbs: np.ndarray, pairs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Pearson correlation of the two thumbnails of each index pair, in [-1, 1]: blind to brightness and contrast
    (gain and offset), 1 for copies, low for unrelated images. Two flat thumbnails count as 1 (nothing tells them
    apart at this size), one flat and one not as 0."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    flat = np.asarray(thumbs).reshape(len(thumbs), -1)
    out = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), chunk):  # chunks keep memory flat however many candidates there are
        a, b = (flat[pairs[start : start + chunk, k]].astype(np.float64) for k in (0, 1))
        a -= a.mean(axis=1, keepdims=True)
        b -= b.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        dot = (a * b).sum(axis=1)
        both_flat = ~a.any(axis=1) & ~b.any(axis=1)
        out[start : start + chunk] = np.where(norms > 0, dot / np.where(norms > 0, norms, 1), both_flat)
    return out


def near_duplicate_pairs(
    dhashes: np.ndarray, thumbs: np.ndarray, max_distance: int, min_similarity: float | None
) -> tuple[np.ndarray, int]:
    """(near-duplicate pairs, number of candidates): the candidates are the index pairs whose dHashes differ in at
    most max_distance bits; each is kept when its thumbnails correlate at least min_similarity (every candidate
    when min_similarity is None)."""
    candidates = near_pairs(dhashes, max_distance)
    if min_similarity is None or not len(candidates):
        return candidates, len(candidates)
    return candidates[thumbnail_similarity(thumbs, candidates) >= min_similarity], len(candidates)


def duplicate_groups(sha256: list[str], near: np.ndarray | None = None) -> np.ndarray:
    """Group ids joining byte-identical images and the given near-duplicate index pairs (transitively)."""
    _, first, inverse = np.unique(np.asarray(sha256, dtype=str), return_index=True, return_inverse=True)
    same = np.stack([np.arange(len(sha256)), first[inverse.reshape(-1)]], axis=1)  # each image to its first copy
    near = np.empty((0, 2), dtype=np.int64) if near is None else np.asarray(near, dtype=np.int64).reshape(-1, 2)
    return connected_groups(len(sha256), np.concatenate([same, near]))


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


def group_labels(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit of each image, majority label of each unit): units are the distinct groups, numbered in the order
    of their first image; a tie between labels goes to the lower label index."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    _, first, unit = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    unit = rank[unit.reshape(-1)]
    votes = np.zeros((len(first), int(labels.max()) + 1), dtype=np.int64)
    np.add.at(votes, (unit, labels), 1)
    return unit, votes.argmax(axis=1)


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """The split sizes stratified_split gives n images (scikit-learn rounds each held-out part up)."""
    n_test = math.ceil(test_fraction * n)
    n_val = math.ceil(val_fraction / (1 - test_fraction) * (n - n_test))
    return {"train": n - n_test - n_val, "validation": n_val, "test": n_test}


def _rebalance(
    side: np.ndarray,
    movable: np.ndarray,
    labels: np.ndarray,
    targets: np.ndarray,
    fractions: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Move movable images (groups of one) from splits above their target size to splits below it, one at a time,
    each time an image of the class most over-represented on the giving side and short on the receiving side."""
    side = side.copy()
    n_classes = int(labels.max()) + 1
    want = np.outer(fractions, np.bincount(labels, minlength=n_classes))  # ideal count per (split, class)
    have = np.zeros((len(SPLITS), n_classes), dtype=np.int64)
    np.add.at(have, (side, labels), 1)
    while True:
        surplus = have.sum(axis=1) - targets
        give, take = int(np.argmax(surplus)), int(np.argmin(surplus))
        candidates = movable & (side == give)
        if surplus[give] <= 0 or not candidates.any():
            return side
        score = (have[give] - want[give]) + (want[take] - have[take])
        score[np.bincount(labels[candidates], minlength=n_classes) == 0] = -np.inf
        cls = int(np.argmax(score))
        pick = rng.choice(np.flatnonzero(candidates & (labels == cls)))
        side[pick] = take
        have[give, cls] -= 1
        have[take, cls] += 1


def group_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Seeded stratified split that never separates a group.

    Groups are the units of stratified_split, each labelled by its majority label; then, since a unit of several
    images moves a split's size by more than one, single images are moved between splits until the sizes are the
    ones stratified_split would give (split_sizes). With every image in a group of its own nothing moves and the
    result is exactly stratified_split(labels, ...)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    if counts[counts > 0].min() < 3:
        raise ValueError("every class needs at least 3 images for a train/validation/test split")
    unit, unit_label = group_labels(labels, groups)
    per_class = np.bincount(unit_label, minlength=len(counts))
    short = [int(c) for c in np.flatnonzero(counts) if per_class[c] < 3]
    if short:
        raise ValueError(
            f"class(es) {short} have fewer than 3 groups of near-duplicate images (groups counted by majority "
            "label): every class needs at least 3 groups for a train/validation/test split; lower or disable "
            "data.near_duplicate_distance, or add images"
        )
    parts = stratified_split(unit_label, val_fraction, test_fraction, seed)
    unit_side = np.empty(len(unit_label), dtype=np.int64)
    for k, name in enumerate(SPLITS):
        unit_side[parts[name]] = k
    sizes = split_sizes(len(labels), val_fraction, test_fraction)
    targets = np.array([sizes[name] for name in SPLITS])
    fractions = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    movable = np.bincount(unit)[unit] == 1
    side = _rebalance(unit_side[unit], movable, labels, targets, fractions, np.random.default_rng(seed))
    return {name: np.flatnonzero(side == k) for k, name in enumerate(SPLITS)}


def exact_duplicate_report(sha256: list[str], labels: np.ndarray, names: list[str]) -> dict:
    """Groups of byte-identical images among all loaded ones: how many, how many extra copies, which carry
    different labels (each with its copies' labels in load order; the first copy is the one dedup keeps)."""
    members: dict[str, list[int]] = {}
    for i, h in enumerate(sha256):
        members.setdefault(h, []).append(i)
    groups = [m for m in members.values() if len(m) > 1]
    mixed = [
        {"sha256": sha256[m[0]], "labels": [names[labels[i]] for i in m]}
        for m in groups
        if len({int(labels[i]) for i in m}) > 1
    ]
    return {"groups": len(groups), "copies": sum(len(m) - 1 for m in groups), "mixed_label": mixed}


def near_duplicate_report(
    groups: np.ndarray, sha256: list[str], labels: np.ndarray, names: list[str], parts: dict[str, np.ndarray]
) -> dict:
    """Groups holding at least two different files (near-duplicates, possibly with byte copies of them): how many,
    how many images they hold, the largest, and which carry different labels (with their split)."""
    split_of = np.empty(len(groups), dtype=object)
    for name in SPLITS:
        split_of[parts[name]] = name
    members: dict[int, list[int]] = {}
    for i, g in enumerate(np.asarray(groups).tolist()):
        members.setdefault(g, []).append(i)
    near = [m for m in members.values() if len({sha256[i] for i in m}) > 1]
    mixed = [
        {"sha256": [sha256[i] for i in m], "labels": [names[labels[i]] for i in m], "split": split_of[m[0]]}
        for m in near
        if len({int(labels[i]) for i in m}) > 1
    ]
    return {
        "groups": len(near),
        "images": sum(len(m) for m in near),
        "largest": max((len(m) for m in near), default=0),
        "mixed_label": mixed,
    }


def prepare(p: DataParams, out_dir: Path, cache_root: Path) -> tuple[Any, dict]:
    """Load, de-duplicate, cap, group near-duplicates, split and save the dataset under out_dir; return
    (DatasetDict, summary)."""
    from datasets import DatasetDict

    ds = load_source(p, cache_root)
    hashes = content_hashes(ds)
    ds = ds.add_column("sha256", hashes)
    n_loaded = len(ds)
    names = class_names(ds)
    exact = exact_duplicate_report(hashes, np.asarray(ds["label"]), names)
    if p.dedup:
        ds = ds.select(first_occurrences(hashes))
    labels = np.asarray(ds["label"])
    ds = ds.select(cap_per_class(labels, p.max_per_class, p.seed))
    labels, kept = np.asarray(ds["label"]), ds["sha256"]
    # Hashed after the cap: only the images that get split can leak, and a capped run decodes fewer images.
    joined, n_candidates, similarity = np.empty((0, 2), dtype=np.int64), 0, None
    if p.near_duplicate_distance is not None:
        dhashes, thumbs = image_fingerprints(ds)
        similarity = p.near_duplicate_min_similarity
        joined, n_candidates = near_duplicate_pairs(dhashes, thumbs, p.near_duplicate_distance, similarity)
    groups = duplicate_groups(kept, joined)
    parts = group_split(labels, groups, p.val_fraction, p.test_fraction, p.seed)
    near = near_duplicate_report(groups, kept, labels, names, parts)
    dd = DatasetDict({name: ds.select(parts[name]) for name in SPLITS})
    out_dir.mkdir(parents=True, exist_ok=True)
    dd.save_to_disk(str(out_dir))
    summary = {
        "source": p.source if p.source != "hub" else f"hub:{p.hub_id}[{p.hub_split}]",
        "loaded": n_loaded,
        "duplicates_dropped": exact["copies"] if p.dedup else 0,
        "class_names": names,
        "split_sizes": {name: len(dd[name]) for name in SPLITS},
        "per_class": {
            name: np.bincount(np.asarray(dd[name]["label"]), minlength=len(names)).tolist() for name in SPLITS
        },
        # Exact counts are over all loaded images, near counts over the images that were split. A near group whose
        # images carry different labels is kept whole on one side, not dropped; an exact one keeps its first copy
        # like any exact group. Both kinds are listed.
        "duplicates": {
            "exact_groups": exact["groups"],
            "exact_copies_dropped": exact["copies"] if p.dedup else 0,
            "exact_mixed_label_groups": len(exact["mixed_label"]),
            "near_duplicate_distance": p.near_duplicate_distance,
            "near_duplicate_min_similarity": similarity,
            "near_candidate_pairs": n_candidates,
            "near_pairs": len(joined),
            "near_groups": near["groups"],
            "near_group_images": near["images"],
            "largest_near_group": near["largest"],
            "near_mixed_label_groups": len(near["mixed_label"]),
            "mixed_label_groups": {"exact": exact["mixed_label"], "near": near["mixed_label"]},
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
    table = pd.DataFrame({s: np.bincount(np.asarray(dd[s]["label"]), minlength=len(names)) for s in dd}, index=names)
    table.loc["total"] = table.sum()
    return table


def duplicate_table(summary: dict) -> Any:
    """The duplicate counts of a prepare() summary as a one-column pandas DataFrame."""
    import pandas as pd

    dup = summary["duplicates"]
    distance, similarity = dup["near_duplicate_distance"], dup.get("near_duplicate_min_similarity")
    rows = {
        "exact duplicate groups (same sha256)": dup["exact_groups"],
        "exact copies dropped": dup["exact_copies_dropped"],
        "exact groups with mixed labels": dup["exact_mixed_label_groups"],
        "near-duplicate distance (dHash bits)": "off" if distance is None else distance,
        "candidate pairs within that distance": dup.get("near_candidate_pairs", dup["near_pairs"]),
        "thumbnail correlation confirming a pair": "off" if similarity is None else similarity,
        "near pairs (confirmed candidates)": dup["near_pairs"],
        "near-duplicate groups (kept, one split each)": dup["near_groups"],
        "images in near-duplicate groups": dup["near_group_images"],
        "largest near-duplicate group": dup["largest_near_group"],
        "near groups with mixed labels": dup["near_mixed_label_groups"],
    }
    return pd.DataFrame({"count": rows})


def mixed_label_table(summary: dict) -> Any:
    """One row per duplicate group whose images carry different labels: kind, labels, split (near groups)."""
    import pandas as pd

    groups = summary["duplicates"]["mixed_label_groups"]
    rows = [
        {"kind": kind, "images": len(g["labels"]), "labels": ", ".join(g["labels"]), "split": g.get("split", "")}
        for kind in ("exact", "near")
        for g in groups[kind]
    ]
    return pd.DataFrame(rows, columns=["kind", "images", "labels", "split"])


def train_batch_transform(spec: ImageSpec, augment: dict) -> Callable[[dict], dict]:
    """A with_transform function applying random augmentation (for the train split only)."""
    import torch

    def apply(batch: dict) -> dict:
        # torch seeds each DataLoader worker differently, but every DDP rank alike: the rank keeps ranks apart.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        rng = np.random.default_rng([seed, int(os.environ.get("RANK", 0))])
        pixels = np.stack([train_transform(im, spec, rng, **augment) for im in batch["image"]])
        return {"pixel_values": torch.from_numpy(pixels), "labels": torch.as_tensor(batch["label"])}

    return apply


def eval_batch_transform(spec: ImageSpec) -> Callable[[dict], dict]:
    """A with_transform function applying the deterministic evaluation transform (resize, center crop)."""
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
