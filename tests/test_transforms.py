"""Transforms: evaluation is deterministic resize + center crop, training is random; any image mode works."""

import numpy as np
import pytest
from PIL import Image

from lib.transforms import ImageSpec, eval_transform, resize_center_crop, to_rgb, train_transform

SPEC = ImageSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.875)


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(478, 84), (84, 318), (275, 183), (32, 32), (10, 7)])
def test_eval_transform_shape_and_determinism(size):
    img = photo(*size)
    a, b = eval_transform(img, SPEC), eval_transform(img, SPEC)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert -1.0 <= a.min() and a.max() <= 1.0


def test_eval_is_a_center_crop():
    # Left half black, right half white, wide image: the center crop must hold both halves equally.
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 150:] = 255
    crop = np.asarray(resize_center_crop(Image.fromarray(arr), SPEC))
    assert crop.shape == (32, 32, 3)
    assert crop[:, :14].max() < 20 and crop[:, 18:].min() > 235


def test_eval_normalisation_matches_spec():
    grey = Image.new("RGB", (64, 64), (255, 0, 128))
    out = eval_transform(grey, ImageSpec(size=16, mean=(0.5, 0.0, 0.25), std=(0.5, 1.0, 0.25)))
    np.testing.assert_allclose(out[:, 8, 8], [1.0, 0.0, (128 / 255 - 0.25) / 0.25], atol=1e-5)


def test_train_transform_is_random_but_seedable():
    img = photo(200, 150)
    a = train_transform(img, SPEC, np.random.default_rng(1))
    b = train_transform(img, SPEC, np.random.default_rng(2))
    c = train_transform(img, SPEC, np.random.default_rng(1))
    assert a.shape == (3, 32, 32)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_to_rgb_handles_modes(mode):
    img = photo(20, 10).convert(mode) if mode not in ("I;16",) else Image.fromarray(np.full((10, 20), 40000, np.uint16))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("written", "read"),
    [
        ({"crop_pct": 0.875}, ImageSpec(size=32, crop_pct=0.875, resize="shorter_side", resample="bicubic")),
        ({"crop_pct": 0.875, "resize": "crop"}, ImageSpec(size=32, crop_pct=0.875, resize="shorter_side")),
        # squash never cropped before the filter was recorded, whatever crop_pct said
        ({"crop_pct": 0.875, "resize": "squash"}, ImageSpec(size=32, crop_pct=1.0, resize="squash")),
    ],
    ids=["no-resize", "crop", "squash"],
)
def test_older_preprocessing_files_keep_their_meaning(tmp_path, written, read):
    """preprocessing.json from before the filter and the squash crop were recorded loads as the transform it meant."""
    import json

    from lib.transforms import SPEC_FILE, load_spec

    (tmp_path / SPEC_FILE).write_text(json.dumps({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3} | written))
    assert load_spec(tmp_path) == read


def test_a_squash_with_crop_resizes_both_sides_then_crops():
    """DeiT's rule: squash to 36 x 36, then a 32 center crop, whatever the aspect ratio."""
    spec = ImageSpec(size=32, crop_pct=32 / 36, resize="squash")
    arr = np.zeros((50, 300, 3), np.uint8)
    arr[:, :150] = 255  # left half white
    crop = np.asarray(resize_center_crop(Image.fromarray(arr), spec))
    assert spec.resize_to == 36 and crop.shape == (32, 32, 3)
    assert crop[:, :14].min() > 235 and crop[:, 18:].max() < 20


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"resize": "crop"}, "resize"), ({"crop_pct": 1.2}, "crop_pct"), ({"resample": "sinc"}, "resample")],
)
def test_a_bad_spec_is_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=named):
        ImageSpec(size=32, **kwargs)


def test_a_processor_with_a_non_square_input_is_refused(tmp_path):
    from transformers import ViTImageProcessorPil

    from lib.transforms import spec_from_processor

    with pytest.raises(ValueError, match="224 x 320: only square inputs"):
        spec_from_processor(ViTImageProcessorPil(size={"height": 224, "width": 320}))
