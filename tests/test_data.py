"""Data: de-duplication, near-duplicate grouping (dHash candidates confirmed by thumbnail correlation), stratified
seeded splits with no duplicate or near duplicate straddling splits, label column names, batch transforms."""

import csv
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lib import data
from lib.params import HASH_ONLY_MAX_DISTANCE, DataParams

NAMES = ["calling", "clapping", "cycling"]


def image_folder(root, per_class=10, duplicates=3):
    """An image folder of random JPEGs, with `duplicates` byte-identical copies in each class."""
    rng = np.random.default_rng(0)
    for name in NAMES:
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
    dd, summary = data.prepare(p, tmp_path / "out", cache_root=tmp_path / "cache")
    assert summary["duplicates_dropped"] == 0 and sum(summary["split_sizes"].values()) == 39
    assert (summary["duplicates"]["exact_groups"], summary["duplicates"]["exact_copies_dropped"]) == (9, 0)
    sides = {}
    for s in data.SPLITS:
        for h in dd[s]["sha256"]:
            sides.setdefault(h, set()).add(s)
    assert len(sides) == 30 and all(len(v) == 1 for v in sides.values())  # kept copies share a split


# --------------------------------------------------------------------------------------- near-duplicates


def scene(seed, size=(160, 120)):
    """A smooth random 'photo': a coarse random colour field upscaled bicubically, plus pixel noise."""
    rng = np.random.default_rng([7, seed])
    coarse = rng.integers(20, 200, (8, 10, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    arr = arr + rng.integers(-12, 13, (size[1], size[0], 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encoded(img, edit="original"):
    """The JPEG bytes of img after an edit: original (quality 95), requality (30), resized (5/8 size),
    brighter (+30 on every channel), watermark (white text in a corner) or recrop (5 % off the left and top,
    2.5 % off the right and bottom)."""
    w, h = img.size
    quality = {"original": 95, "requality": 30}.get(edit, 85)
    if edit == "resized":
        img = img.resize((w * 5 // 8, h * 5 // 8), Image.Resampling.LANCZOS)
    elif edit == "recrop":
        img = img.crop((w // 20, h // 20, w - w // 40, h - h // 40))
    elif edit == "brighter":
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + 30, 0, 255).astype(np.uint8))
    elif edit == "watermark":
        img = img.copy()
        ImageDraw.Draw(img).text((w - 64, h - 14), "(c) stock", fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def dhash_of(data_bytes):
    return data.dhash(Image.open(io.BytesIO(data_bytes)))


def bits(a, b):
    return bin(a ^ b).count("1")


EDITS = ("requality", "resized", "brighter", "watermark")


def test_dhash_bit_layout():
    ramp = np.tile(np.arange(9, dtype=np.uint8) * 20, (8, 1))
    assert data.dhash(Image.fromarray(ramp, "L")) == 2**64 - 1  # brighter to the right everywhere
    assert data.dhash(Image.fromarray(ramp[:, ::-1].copy(), "L")) == 0
    top_row_only = ramp[:, ::-1].copy()
    top_row_only[0] = ramp[0]
    assert data.dhash(Image.fromarray(top_row_only, "L")) == 0xFF << 56  # row-major, first bit most significant
    last = np.full((8, 9), 100, dtype=np.uint8)
    last[7, 8] = 101
    assert data.dhash(Image.fromarray(last, "L")) == 1
    img = scene(0)
    opaque = img.convert("RGBA")
    assert data.dhash(opaque) == data.dhash(img) == data.dhash(img.convert("L"))


def test_dhash_is_stable_under_edits_and_far_for_unrelated_images():
    limit = HASH_ONLY_MAX_DISTANCE  # these edits group even where the hash alone decides
    bases = [scene(i, (w, h)) for i, (w, h) in enumerate([(160, 120), (320, 210), (275, 183), (200, 260), (400, 300)])]
    hashes = [dhash_of(encoded(b)) for b in bases]
    for b, h in zip(bases, hashes):
        distances = {edit: bits(h, dhash_of(encoded(b, edit))) for edit in EDITS}
        assert max(distances.values()) <= limit, distances
    unrelated = [bits(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(unrelated) >= 12, unrelated


def test_popcount_near_pairs_and_groups(monkeypatch):
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, 40, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 40).astype(np.uint64)
    hashes[7] = hashes[3] ^ np.uint64(0b1011)  # 3 bits from hashes[3]
    hashes[30] = hashes[7] ^ np.uint64(1 << 63)  # 1 bit from hashes[7], 4 from hashes[3]
    expected = [bin(int(h)).count("1") for h in hashes]
    assert data.popcount64(hashes).tolist() == expected
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # the numpy < 2 path: a byte table
    assert data.popcount64(hashes).tolist() == expected
    monkeypatch.undo()
    brute = {(i, j) for i in range(40) for j in range(i + 1, 40) if bits(int(hashes[i]), int(hashes[j])) <= 3}
    for block in (7, 40, 1 << 22):  # blocks of a few rows, exactly one row, everything at once
        assert set(map(tuple, data.near_pairs(hashes, 3, block_elems=block).tolist())) == brute
    assert {(3, 7), (7, 30)} <= brute and (3, 30) not in brute
    groups = data.connected_groups(40, data.near_pairs(hashes, 3))
    assert groups[3] == groups[7] == groups[30] == 3  # joined through 7, labelled by the lowest index
    assert sorted(set(groups.tolist()) - {3}) == [i for i in range(40) if i not in (3, 7, 30)]
    chain = data.connected_groups(8, np.array([[5, 6], [1, 5], [0, 2], [6, 3]]))
    assert chain.tolist() == [0, 1, 0, 1, 4, 1, 1, 7]


def studio(seed, size=(240, 180)):
    """A figure on a plain light background (head, torso, limbs), placed and posed at random: the kind of photo
    whose coarse 9x8 layout many unrelated stock photos share."""
    rng = np.random.default_rng([11, seed])
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(img)
    cx, top = int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.1, 0.25))
    colour = tuple(int(v) for v in rng.integers(20, 120, 3))
    r, half = int(h * 0.08), int(w * rng.uniform(0.08, 0.16))
    draw.ellipse((cx - r, top, cx + r, top + 2 * r), fill=tuple(int(v) for v in rng.integers(150, 210, 3)))
    draw.rectangle((cx - half, top + 2 * r, cx + half, int(h * 0.65)), fill=colour)
    for side in (-1, 1):
        angle, x0, y0 = rng.uniform(-1.2, 1.2), cx + side * half, top + 3 * r
        draw.line((x0, y0, x0 + side * int(40 * np.cos(angle)), y0 + int(40 * np.sin(angle))), fill=colour, width=8)
        foot = cx + side * int(w * rng.uniform(0.02, 0.15))
        draw.line((cx + side * half // 2, int(h * 0.65), foot, h - 5), fill=colour, width=10)
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-3, 4, (h, w, 1))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def fingerprints(encoded_images):
    prints = [data.fingerprint(Image.open(io.BytesIO(b))) for b in encoded_images]
    return np.array([h for h, _ in prints], dtype=np.uint64), np.stack([t for _, t in prints])


def test_thumbnail_similarity_is_blind_to_brightness_and_contrast_only():
    rng = np.random.default_rng(3)
    base = rng.integers(40, 200, (data.THUMB_SIDE, data.THUMB_SIDE)).astype(np.float64)
    other = rng.integers(40, 200, base.shape).astype(np.float64)
    flat = np.full(base.shape, 90.0)
    thumbs = np.stack([base, 0.5 * base + 60, 255 - base, other, flat, flat + 40]).astype(np.uint8)
    pairs = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [4, 5], [1, 3]])
    sim = data.thumbnail_similarity(thumbs, pairs)
    assert sim[0] == pytest.approx(1.0, abs=0.01)  # gain and offset: the same picture
    assert sim[1] == pytest.approx(-1.0, abs=0.01)  # the negative
    assert abs(sim[2]) < 0.1 and abs(sim[5]) < 0.1  # unrelated noise
    assert (sim[3], sim[4]) == (0.0, 1.0)  # flat against textured; two flat thumbnails
    np.testing.assert_allclose(data.thumbnail_similarity(thumbs, pairs, chunk=4), sim)  # chunks change nothing


def test_two_stage_grouping_joins_edited_copies_and_not_lookalike_backgrounds():
    """A photo's re-encode, brightness shift and slight re-crop group with it, even where the re-crop moves the hash
    beyond what hash-only grouping may use; two unrelated figures on plain backgrounds within the candidate distance
    do not, though hash-only grouping at that distance would join them."""
    p = DataParams()
    photos = [scene(i, size) for i, size in enumerate([(160, 120), (320, 210), (275, 183), (400, 300)])]
    edits = ("original", "requality", "brighter", "recrop")
    images = [encoded(photo, edit) for photo in photos for edit in edits]
    images += [encoded(studio(6)), encoded(studio(19))]
    hashes, thumbs = fingerprints(images)
    n_photos = len(photos) * len(edits)
    recrop_bits = [int(data.popcount64(hashes[k : k + 1] ^ hashes[k + 3 : k + 4])[0]) for k in range(0, n_photos, 4)]
    assert max(recrop_bits) > HASH_ONLY_MAX_DISTANCE, recrop_bits  # the copies the hash alone would miss
    lookalike_bits = int(data.popcount64(hashes[-2:-1] ^ hashes[-1:])[0])
    assert lookalike_bits <= p.near_duplicate_distance  # a candidate pair, only the confirmation refuses it

    near, n_candidates = data.near_duplicate_pairs(
        hashes, thumbs, p.near_duplicate_distance, p.near_duplicate_min_similarity
    )
    sha = [hashlib.sha256(b).hexdigest() for b in images]
    groups = data.duplicate_groups(sha, near)
    expected = [4 * (i // 4) for i in range(n_photos)] + [n_photos, n_photos + 1]
    assert groups.tolist() == expected
    assert n_candidates > len(near)

    hash_only, _ = data.near_duplicate_pairs(hashes, thumbs, p.near_duplicate_distance, None)
    assert data.duplicate_groups(sha, hash_only)[-1] == data.duplicate_groups(sha, hash_only)[-2]


def test_labelled_near_duplicate_pairs_are_well_formed():
    """The pairs of real photos labelled by eye (the measurement in the data docs) name each pair once, sorted, with
    a known label; the copies found are a minority, as in any photo collection."""
    path = Path(__file__).parent / "data" / "near_duplicate_pairs.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"file_a", "file_b", "label", "note", "found_by"}
    pairs = [(r["file_a"], r["file_b"]) for r in rows]
    assert len(set(pairs)) == len(pairs) and all(a < b for a, b in pairs)
    assert all(re.fullmatch(r"[a-z_]+/Image_\d+\.jpg", name) for pair in pairs for name in pair)
    assert {r["label"] for r in rows} == {"duplicate", "not"}
    assert 0 < sum(r["label"] == "duplicate" for r in rows) < len(rows) // 10


def test_group_split_keeps_groups_whole_with_the_usual_sizes():
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1, 2], [23, 31, 17])
    rng.shuffle(labels)
    groups = np.arange(len(labels))
    for members in np.split(rng.permutation(len(labels))[:30], [3, 5, 9, 11, 14, 16, 20, 22, 25]):
        groups[members] = members.min()  # ten groups of 2-5 images, some of them mixed-label
    a = data.group_split(labels, groups, 0.15, 0.2, seed=3)
    b = data.group_split(labels, groups, 0.15, 0.2, seed=3)
    c = data.group_split(labels, groups, 0.15, 0.2, seed=4)
    assert all(np.array_equal(a[s], b[s]) for s in data.SPLITS)
    assert not np.array_equal(a["test"], c["test"])
    assert sorted(np.concatenate([a[s] for s in data.SPLITS])) == list(range(len(labels)))
    side = np.empty(len(labels), dtype=int)
    for k, s in enumerate(data.SPLITS):
        side[a[s]] = k
    assert all(len(set(side[groups == g])) == 1 for g in np.unique(groups))
    sizes = {s: len(a[s]) for s in data.SPLITS}
    assert sizes == data.split_sizes(71, 0.15, 0.2) == {"train": 45, "validation": 11, "test": 15}
    for k, frac in enumerate((0.65, 0.15, 0.2)):
        per_class = np.bincount(labels[side == k], minlength=3)
        assert (np.abs(per_class - frac * np.array([23, 31, 17])) <= 3).all(), (k, per_class)


def test_group_split_without_groups_is_the_plain_stratified_split():
    labels = np.repeat(np.arange(4), [9, 14, 11, 20])
    for seed in (0, 1, 42):
        plain = data.stratified_split(labels, 0.1, 0.25, seed)
        grouped = data.group_split(labels, np.arange(len(labels)), 0.1, 0.25, seed)
        assert all(np.array_equal(plain[s], grouped[s]) for s in data.SPLITS)


def test_group_split_refuses_classes_with_too_few_images_or_groups():
    labels = np.array([0] * 8 + [1] * 4)
    with pytest.raises(ValueError, match="at least 3 images"):
        data.group_split(labels[:10], np.arange(10), 0.2, 0.2, 0)
    groups = np.arange(12)
    groups[9] = 8  # class 1: four images in three groups: fine
    assert sum(len(v) for v in data.group_split(labels, groups, 0.2, 0.2, 0).values()) == 12
    groups[10] = 8  # now two groups
    with pytest.raises(ValueError, match=r"\[1\] have fewer than 3 groups"):
        data.group_split(labels, groups, 0.2, 0.2, 0)


def near_duplicate_folder(root):
    """Unrelated scenes (12, 14, 13 per class) plus edited copies, byte copies and cross-label copies.

    Returns {group name: [file paths]} for the five near-duplicate groups and the two byte-copy pairs."""
    counts = {"calling": 12, "clapping": 14, "cycling": 13}
    files, seed = {}, 100
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            path = root / name / f"{i:03d}.jpg"
            size = (int(140 + 17 * (seed % 9)), int(100 + 13 * (seed % 7)))
            img = scene(seed, size)
            path.write_bytes(encoded(img))
            files[name, i] = (path, img)
            seed += 1

    def copy(name, i, edit, dest_class=None):
        path, img = files[name, i]
        out = root / (dest_class or name) / f"{path.stem}_{name}_{edit}.jpg"
        out.write_bytes(path.read_bytes() if edit == "bytes" else encoded(img, edit))
        return out

    groups = {
        "calling0": [files["calling", 0][0], copy("calling", 0, "requality"), copy("calling", 0, "resized")],
        "calling1": [files["calling", 1][0], copy("calling", 1, "brighter")],
        "clapping0": [files["clapping", 0][0]] + [copy("clapping", 0, e) for e in EDITS if e != "resized"],
        "cycling0": [files["cycling", 0][0], copy("cycling", 0, "resized"), copy("cycling", 0, "recrop")],
        "mixed_near": [files["calling", 2][0], copy("calling", 2, "resized", dest_class="clapping")],
        "exact": [files["cycling", 1][0], copy("cycling", 1, "bytes")],
        "mixed_exact": [files["clapping", 1][0], copy("clapping", 1, "bytes", dest_class="cycling")],
    }
    return groups


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_keeps_near_duplicate_groups_on_one_side(tmp_path):
    groups = near_duplicate_folder(tmp_path / "images")
    p = DataParams(source="imagefolder", path=str(tmp_path / "images"), val_fraction=0.15, test_fraction=0.25)
    dd, summary = data.prepare(p, tmp_path / "out", cache_root=tmp_path / "cache")
    split_of = {h: s for s in data.SPLITS for h in dd[s]["sha256"]}
    for name, paths in groups.items():
        assert len({split_of[sha(f)] for f in paths}) == 1, name
    assert summary["loaded"] == 50 and summary["duplicates_dropped"] == 2
    assert summary["split_sizes"] == data.split_sizes(48, 0.15, 0.25) == {"train": 28, "validation": 8, "test": 12}
    assert sum(summary["per_class"]["train"]) == 28
    dup = summary["duplicates"]
    assert (dup["exact_groups"], dup["exact_copies_dropped"], dup["exact_mixed_label_groups"]) == (2, 2, 1)
    assert sorted(dup["mixed_label_groups"]["exact"][0]["labels"]) == ["clapping", "cycling"]
    assert dup["mixed_label_groups"]["exact"][0]["sha256"] == sha(groups["mixed_exact"][0])
    # Five groups, 3 + 2 + 4 + 3 + 2 images: an unrelated image joining any of them would change these counts.
    assert (dup["near_groups"], dup["near_group_images"], dup["largest_near_group"]) == (5, 14, 4)
    defaults = DataParams()
    assert (dup["near_duplicate_distance"], dup["near_duplicate_min_similarity"]) == (
        defaults.near_duplicate_distance,
        defaults.near_duplicate_min_similarity,
    )
    assert dup["near_candidate_pairs"] >= dup["near_pairs"] >= 9  # each copy is near its original
    assert dup["near_mixed_label_groups"] == 1
    (mixed,) = dup["mixed_label_groups"]["near"]
    assert sorted(mixed["labels"]) == ["calling", "clapping"]
    assert set(mixed["sha256"]) == {sha(f) for f in groups["mixed_near"]}
    assert mixed["split"] == split_of[sha(groups["mixed_near"][0])]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["duplicates"] == dup
    table = data.duplicate_table(summary)
    assert table.loc["near-duplicate groups (kept, one split each)", "count"] == 5
    assert data.mixed_label_table(summary)["kind"].tolist() == ["exact", "near"]


def test_prepare_without_near_grouping_is_the_old_split(tmp_path):
    groups = near_duplicate_folder(tmp_path / "images")
    common = dict(source="imagefolder", path=str(tmp_path / "images"), val_fraction=0.15, test_fraction=0.25)
    dd, summary = data.prepare(DataParams(**common, near_duplicate_distance=None), tmp_path / "o", tmp_path / "c")
    dup = summary["duplicates"]
    assert (dup["near_duplicate_distance"], dup["near_pairs"], dup["near_groups"]) == (None, 0, 0)
    assert (dup["near_duplicate_min_similarity"], dup["near_candidate_pairs"]) == (None, 0)
    assert data.duplicate_table(summary).loc["thumbnail correlation confirming a pair", "count"] == "off"
    assert dup["exact_groups"] == 2 and summary["duplicates_dropped"] == 2
    # The same images split by plain stratification: what grouping has to fix does happen without it.
    split_of = {h: s for s in data.SPLITS for h in dd[s]["sha256"]}
    near = [n for n in groups if not n.endswith("exact")]
    assert any(len({split_of[sha(f)] for f in groups[n]}) > 1 for n in near)
    kept = data.load_source(DataParams(**common), tmp_path / "c")
    hashes = data.content_hashes(kept)
    labels = np.asarray(kept.select(data.first_occurrences(hashes))["label"])
    plain = data.stratified_split(labels, 0.15, 0.25, 42)
    assert {s: len(plain[s]) for s in data.SPLITS} == summary["split_sizes"]
    order = [hashes[i] for i in data.first_occurrences(hashes)]
    assert all([order[i] for i in plain[s]] == dd[s]["sha256"] for s in data.SPLITS)


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

    from lib.transforms import ImageSpec, eval_transform

    folder = image_folder(tmp_path / "images", per_class=4, duplicates=0)
    dd, _ = data.prepare(
        DataParams(source="imagefolder", path=str(folder), val_fraction=0.25, test_fraction=0.25),
        tmp_path / "o",
        tmp_path / "c",
    )
    spec = ImageSpec(size=16)
    train = dd["train"]
    ev = train.with_transform(data.eval_batch_transform(spec))
    for i in (0, len(train) - 1):
        expected = torch.from_numpy(eval_transform(data.open_image(train, i), spec))
        assert torch.equal(ev[i]["pixel_values"], expected)  # exactly the serving transform, nothing random
        assert int(ev[i]["labels"]) == train[i]["label"]
    tr = train.with_transform(data.train_batch_transform(spec, {"scale_min": 0.3}))
    first = tr[0]
    assert first["pixel_values"].shape == (3, 16, 16) and first["pixel_values"].dtype == torch.float32
    assert int(first["labels"]) == train[0]["label"]
    assert not torch.equal(first["pixel_values"], ev[0]["pixel_values"])  # augmented
    assert not torch.equal(tr[0]["pixel_values"], first["pixel_values"])  # and drawn anew at each read
    batch = data.collate([ev[0], ev[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == [train[0]["label"], train[1]["label"]]


def test_training_augmentation_differs_between_ranks_and_repeats_for_the_same_draw(monkeypatch):
    """DDP processes seed torch alike and their DataLoader workers share one base seed, so the batch transform's
    draw from torch is the same on every rank; the rank (RANK) keeps their augmentations apart. The same rank with
    the same torch state (the same epoch and batch of a seeded run) augments exactly alike."""
    import torch

    from lib.transforms import ImageSpec

    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 255, (30 + 3 * i, 40, 3), dtype=np.uint8)) for i in range(5)]
    batch = {"image": images, "label": [0, 2, 1, 1, 0]}
    apply = data.train_batch_transform(ImageSpec(size=16), {"scale_min": 0.5})

    def augmented(rank, torch_seed, batches=1):
        monkeypatch.setenv("RANK", str(rank))
        torch.manual_seed(torch_seed)
        return [apply(batch)["pixel_values"] for _ in range(batches)]

    (rank0,) = augmented(0, 7)
    (rank1,) = augmented(1, 7)
    (again,) = augmented(0, 7)
    assert torch.equal(rank0, again)
    assert not torch.equal(rank0, rank1)
    assert all(not torch.equal(rank0[i], rank1[i]) for i in range(len(images)))  # every image, not just one
    first, second = augmented(0, 7, batches=2)
    assert torch.equal(first, rank0) and not torch.equal(first, second)  # the next batch draws anew
    monkeypatch.delenv("RANK")
    torch.manual_seed(7)
    assert torch.equal(apply(batch)["pixel_values"], rank0)  # a single process is rank 0
