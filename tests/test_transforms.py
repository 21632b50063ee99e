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
