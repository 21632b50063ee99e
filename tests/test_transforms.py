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


RAMP = np.arange(256, dtype=np.float64).reshape(16, 16)  # every 8-bit level once


def palette_image() -> Image.Image:
    """A P image whose index i is the colour (i, 255 - i, 7 * i mod 256)."""
    img = Image.fromarray(RAMP.astype(np.uint8), "P")
    img.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
    return img


def grey(levels: np.ndarray) -> np.ndarray:
    """The RGB array of a grey image with these 8-bit levels."""
    return np.repeat(np.asarray(levels, np.uint8)[..., None], 3, axis=-1)


# Each mode with a ramp or mid values, the 8-bit RGB it stands for, and the tolerance (alpha blending rounds). A plain
# convert("RGB") clips the deep modes (a 16-bit ramp saturates at 255), drops alpha instead of putting it on white,
# and ignores a float image's 0-1 range.
MODE_CASES = {
    "L": (lambda: Image.fromarray(RAMP.astype(np.uint8), "L"), grey(RAMP), 0),
    "P": (palette_image, np.stack([RAMP, 255 - RAMP, (7 * RAMP) % 256], axis=-1).astype(np.uint8), 0),
    "RGBA": (  # blue over white, by alpha
        lambda: Image.fromarray(np.stack([RAMP * 0, RAMP * 0, RAMP * 0 + 255, RAMP], -1).astype(np.uint8), "RGBA"),
        np.stack([255 - RAMP, 255 - RAMP, RAMP * 0 + 255], -1).astype(np.uint8),
        1,
    ),
    "LA": (lambda: Image.fromarray(np.stack([RAMP * 0, RAMP], -1).astype(np.uint8), "LA"), grey(255 - RAMP), 1),
    "1": (lambda: Image.fromarray(RAMP >= 128), grey(np.where(RAMP >= 128, 255, 0)), 0),
    "CMYK": (  # black ink only: K level k is grey 255 - k
        lambda: Image.fromarray(np.stack([RAMP * 0, RAMP * 0, RAMP * 0, RAMP], -1).astype(np.uint8), "CMYK"),
        grey(255 - RAMP),
        0,
    ),
    "I;16": (lambda: Image.fromarray((RAMP * 257).astype(np.uint16)), grey(RAMP), 0),
    "I;16 dark": (lambda: Image.fromarray(RAMP.astype(np.uint16)), grey(np.rint(RAMP / 257)), 0),
    "I;16 mid": (lambda: Image.fromarray(np.full((16, 16), 0x8000, np.uint16)), grey(np.full((16, 16), 128)), 0),
    "I 16-bit": (lambda: Image.fromarray((RAMP * 257).astype(np.int32)), grey(RAMP), 0),
    "I 8-bit": (lambda: Image.fromarray(RAMP.astype(np.int32)), grey(RAMP), 0),
    "F 0-1": (lambda: Image.fromarray((RAMP / 255).astype(np.float32)), grey(RAMP), 0),
    "F flat mid": (lambda: Image.fromarray(np.full((16, 16), 0.5, np.float32)), grey(np.full((16, 16), 128)), 0),
    "F 0-255": (lambda: Image.fromarray((RAMP * 0.75).astype(np.float32)), grey(np.rint(RAMP * 0.75)), 0),
    "F other range": (lambda: Image.fromarray((RAMP * 4 - 300).astype(np.float32)), grey(RAMP), 0),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_to_rgb_keeps_the_levels_of_every_mode(case: str):
    make, expected, tolerance = MODE_CASES[case]
    img = make()
    assert img.mode == case.split()[0]
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (16, 16)
    np.testing.assert_allclose(np.asarray(out, np.int16), expected.astype(np.int16), atol=tolerance)


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
