"""Tests for the synthetic stick-figure dataset generator."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.demo import synthetic
from lib.demo.synthetic import (
    CLASS_NAMES,
    MANIFEST,
    _background,
    _duplicate_plan,
    _pick_setting,
    render,
    write_image_folder,
)

N = 4  # images per class: small enough to keep the tests fast


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every image under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("*/*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("synth") / "data", N, seed=0)


def test_class_names_are_the_fifteen_actions() -> None:
    assert CLASS_NAMES == (
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


@pytest.mark.parametrize("label", range(len(CLASS_NAMES)))
def test_render_is_rgb_of_requested_size_and_deterministic(label: int) -> None:
    a = render(label, np.random.default_rng(7), (150, 100))
    b = render(label, np.random.default_rng(7), (150, 100))
    c = render(label, np.random.default_rng(8), (150, 100))
    assert a.mode == "RGB" and a.size == (150, 100)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def _drawn_pixels(label: int, seed: list[int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of pixels that differ strongly from the bare background, i.e. the drawing."""
    w, h = size
    drawn = np.asarray(render(label, np.random.default_rng(seed), size), dtype=np.float32)
    rng = np.random.default_rng(seed)  # render draws the setting and background first, from the same stream
    bare = np.asarray(_background(rng, w, h, _pick_setting(label, rng)), dtype=np.float32)
    return np.nonzero(np.abs(drawn - bare).mean(axis=2) > 50)


@pytest.mark.parametrize("size", [(300, 120), (100, 250), (160, 160)])
def test_full_figures_stay_inside_the_evaluation_center_crop(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With full-body framing, the drawing lies in the central square that resize + center crop keeps."""
    monkeypatch.setattr(synthetic, "FRAMING", {name: (1.0, 0.0, 0.0) for name in CLASS_NAMES})
    monkeypatch.setattr(synthetic, "BLUR_FRACTION", 0.0)  # blur would also change background edges
    w, h = size
    side = 0.875 * min(w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2
    for label in range(len(CLASS_NAMES)):
        for k in range(3):
            ys, xs = _drawn_pixels(label, [label, k], size)
            assert len(xs) > 0.005 * w * h, (label, k)  # a figure was drawn
            inside = (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side)
            assert inside.mean() > 0.97, (label, k, inside.mean())


def test_upper_body_framing_fits_the_top_and_lets_the_legs_run_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upper-body shot of a standing figure: head inside the center crop, legs continuing below it."""
    monkeypatch.setattr(synthetic, "FRAMING", {name: (0.0, 1.0, 0.0) for name in CLASS_NAMES})
    w, h = 120, 240
    side = 0.875 * w
    y0 = (h - side) / 2
    for k in range(5):
        ys, xs = _drawn_pixels(CLASS_NAMES.index("calling"), [0, k], (w, h))
        assert ys.min() >= y0 - 1 and ys.max() > y0 + side, k
        assert ((ys >= y0) & (ys < y0 + side)).mean() > 0.5, k


def test_layout_names_counts_sizes_and_formats(generated: Path) -> None:
    folders = sorted(p.name for p in generated.iterdir() if p.is_dir())
    assert folders == sorted(CLASS_NAMES)
    sizes, formats = set(), Counter()
    for name in CLASS_NAMES:
        files = sorted((generated / name).iterdir())
        assert len(files) == N
        for i, path in enumerate(files):
            assert re.fullmatch(rf"{name}_{i:04d}\.(jpg|png)", path.name), path.name
            with Image.open(path) as img:
                sizes.add(img.size)
                formats[img.format] += 1
                w, h = img.size
                assert 96 <= w <= 320 and 80 <= h <= 288 and 0.5 <= w / h <= 2.5
    assert len(sizes) > N * len(CLASS_NAMES) // 2  # sizes really vary
    assert set(formats) == {"JPEG", "PNG"} and formats["JPEG"] > formats["PNG"]


def test_every_file_is_a_valid_image_matching_its_extension(generated: Path) -> None:
    for path in generated.glob("*/*"):
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
            assert img.mode == "RGB"
            assert img.format == {".jpg": "JPEG", ".png": "PNG"}[path.suffix]


def test_each_class_has_byte_identical_duplicates_only_within_itself(generated: Path) -> None:
    owner: dict[str, set[str]] = {}
    for rel, data in _files(generated).items():
        owner.setdefault(hashlib.sha256(data).hexdigest(), set()).add(rel)
    dup_groups = [paths for paths in owner.values() if len(paths) > 1]
    classes_with_dups = {next(iter(paths)).split("/")[0] for paths in dup_groups}
    assert classes_with_dups == set(CLASS_NAMES)
    for paths in dup_groups:
        assert len({p.split("/")[0] for p in paths}) == 1  # never across classes


def test_duplicate_plan_is_about_one_percent_and_copies_earlier_originals() -> None:
    plan = _duplicate_plan(200, seed=3, label=5)
    assert len(plan) == 2
    assert all(src < dst for dst, src in plan.items())
    assert not set(plan.values()) & set(plan)  # a copy is never made of another copy


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path, generated: Path) -> None:
    again = _files(write_image_folder(tmp_path / "again", N, seed=0))
    assert again == _files(generated)
    other = _files(write_image_folder(tmp_path / "other", N, seed=1))
    shared = set(other) & set(again)
    assert sum(other[k] != again[k] for k in shared) >= 0.9 * len(shared)


def test_images_do_not_depend_on_how_many_are_generated(tmp_path: Path, generated: Path) -> None:
    """Sample i of a class is seeded by (seed, class, i) only: a bigger set shares its first image."""
    bigger = _files(write_image_folder(tmp_path / "bigger", N + 3, seed=0))
    small = _files(generated)
    for name in CLASS_NAMES:
        first = [k for k in small if k.startswith(f"{name}/{name}_0000.")]
        assert first and bigger[first[0]] == small[first[0]]


def test_second_call_does_not_rewrite(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", 2, seed=0)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["images_per_class"] == 2 and manifest["seed"] == 0
    assert write_image_folder(root, 2, seed=0) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_changed_parameters_or_missing_file_regenerate(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", 3, seed=0)
    victim = next((root / "sleeping").iterdir())
    victim.unlink()
    write_image_folder(root, 3, seed=0)
    assert victim.exists()

    write_image_folder(root, 2, seed=5)
    assert all(len(list((root / n).iterdir())) == 2 for n in CLASS_NAMES)  # leftovers of the larger set removed
    assert json.loads((root / MANIFEST).read_text())["seed"] == 5


def test_new_generator_version_regenerates_a_cached_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_image_folder(tmp_path / "d", 2, seed=0)
    victim = next((root / "calling").iterdir())
    victim.write_bytes(b"stale")
    write_image_folder(root, 2, seed=0)
    assert victim.read_bytes() == b"stale"  # same version: the cache is trusted
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    write_image_folder(root, 2, seed=0)
    assert victim.read_bytes() != b"stale"
    assert json.loads((root / MANIFEST).read_text())["generator_version"] == synthetic.GENERATOR_VERSION


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_image_folder(tmp_path, 0)
    with pytest.raises(ValueError):
        write_image_folder(tmp_path, 2, seed=-1)
