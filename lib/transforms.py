"""Image transforms in PIL + NumPy (no torch): deterministic eval transform, random train transform."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

SPEC_FILE = "preprocessing.json"
RESAMPLE = Image.Resampling.BICUBIC  # training crops, display; evaluation uses the spec's own filter
RESIZE_MODES = ("shorter_side", "squash")
# The largest ConvNeXt input its processor still crops for: from 384 up it resizes straight to size x size.
CONVNEXT_NO_CROP_FROM = 384


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects: square input size, normalisation, and the evaluation resize and crop.

    resize "shorter_side": shorter side to resize_to, aspect ratio kept (ViT-style crop: DINOv2, ConvNeXt, CLIP).
    resize "squash": both sides to resize_to, aspect ratio not kept (ViT, BEiT, Swin, SigLIP; DeiT then crops).
    Then a center crop of size x size; resize_to = round(size / crop_pct), so crop_pct 1 means no crop.
    resample: the PIL filter of that resize, by name (bicubic, bilinear, ...), as the backbone's processor uses it.
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 0.875
    resize: str = "shorter_side"
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], not {self.crop_pct}")
        resample_filter(self.resample)

    @property
    def resize_to(self) -> int:
        """Side (shorter side, or both sides for squash) after the resize that precedes the center crop."""
        return int(math.floor(self.size / self.crop_pct + 0.5))

    @property
    def filter(self) -> Image.Resampling:
        return resample_filter(self.resample)


def resample_filter(name: str) -> Image.Resampling:
    """PIL's resampling filter of that name (bicubic, bilinear, lanczos, nearest, box, hamming)."""
    try:
        return Image.Resampling[name.upper()]
    except KeyError:
        names = ", ".join(f.name.lower() for f in Image.Resampling)
        raise ValueError(f"resample must be one of {names}, not {name!r}") from None


def _side(size: Any, *keys: str) -> int | None:
    """The first of keys in a processor size (a dict, transformers' SizeDict, or an int for every key)."""
    if isinstance(size, int):
        return size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    return next((int(v) for v in map(get, keys) if v), None)


def spec_from_processor(processor: Any) -> ImageSpec:
    """The evaluation transform of a Hugging Face image processor (ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt, SigLIP,
    CLIP ...), as an ImageSpec: its resize (shorter side or both sides), center crop, filter, mean and std."""
    name = type(processor).__name__
    size = getattr(processor, "size", None) or {}
    shortest = _side(size, "shortest_edge")
    height, width = _side(size, "height"), _side(size, "width")
    if not shortest and height != width:
        raise ValueError(f"{name} resizes to {height} x {width}: only square inputs are supported")
    # BEiT's processor keeps a default crop_size with do_center_crop false: the crop only where it is done.
    crop = _side(processor.crop_size, "height") if getattr(processor, "do_center_crop", None) else None
    resize, resize_to = ("shorter_side", shortest) if shortest else ("squash", height)
    if not resize_to:
        raise ValueError(f"cannot read an input size from {name}")
    if crop is None and shortest and getattr(processor, "crop_pct", None):
        # ConvNeXt: shorter side to shortest_edge / crop_pct, then crop shortest_edge, below 384; from 384 it
        # resizes straight to shortest_edge x shortest_edge.
        if shortest < CONVNEXT_NO_CROP_FROM:
            crop, resize_to = shortest, int(shortest / processor.crop_pct)
        else:
            resize = "squash"
    side = crop or resize_to
    mean = tuple(float(x) for x in (processor.image_mean or (0.5, 0.5, 0.5)))
    std = tuple(float(x) for x in (processor.image_std or (0.5, 0.5, 0.5)))
    resample = Image.Resampling(int(getattr(processor, "resample", RESAMPLE))).name.lower()
    return ImageSpec(
        size=side,
        mean=mean,
        std=std,
        crop_pct=side / resize_to,
        resize=resize,
        resample=resample,  # type: ignore[arg-type]
    )


def processor_config(spec: ImageSpec) -> dict[str, Any]:
    """Settings of a transformers image processor (ViTImageProcessor, PIL backend) that does exactly eval_transform:
    RGB with transparency on white, resize (shorter side, or squash) to spec.resize_to with spec's filter, center
    crop spec.size, rescale by 1/255, normalise with spec.mean and spec.std."""
    square = {"height": spec.resize_to, "width": spec.resize_to}
    return {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": square if spec.resize == "squash" else {"shortest_edge": spec.resize_to},
        "resample": int(spec.filter),
        "do_center_crop": spec.resize_to != spec.size,
        "crop_size": {"height": spec.size, "width": spec.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
    }


def save_spec(spec: ImageSpec, model_dir: str | Path) -> Path:
    """Write the spec next to a saved model as preprocessing.json."""
    path = Path(model_dir) / SPEC_FILE
    path.write_text(json.dumps(asdict(spec), indent=2))
    return path


def load_spec(model_dir: str | Path) -> ImageSpec:
    """Read preprocessing.json from a saved model folder."""
    raw = json.loads((Path(model_dir) / SPEC_FILE).read_text())
    resize, crop_pct = str(raw.get("resize", "shorter_side")), float(raw["crop_pct"])
    if "resample" not in raw:
        # Written before the filter was recorded: always bicubic, "crop" meant the shorter-side resize, and "squash"
        # never cropped whatever crop_pct said.
        resize, crop_pct = ("squash", 1.0) if resize == "squash" else ("shorter_side", crop_pct)
    return ImageSpec(
        size=int(raw["size"]),
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        crop_pct=crop_pct,
        resize=resize,
        resample=str(raw.get("resample", "bicubic")),
    )


def _levels_to_rgb(levels: np.ndarray) -> Image.Image:
    """Grey levels on the 0-255 scale (any float array) as an 8-bit RGB image, rounded and clipped."""
    return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, LA, I;16, I, F, CMYK ...) to 8-bit RGB; transparency goes on white.

    Deeper greys are rescaled, never clipped: I;16 (16-bit PNG or TIFF) from 0-65535; I (32-bit integer TIFF), whose
    mode says nothing of its range, from 0-255 when no level exceeds 255, else from 0-65535; F (float TIFF) from 0-1
    when every value lies there (the float image convention), as levels when they lie in 0-255, else from its own
    minimum and maximum."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        return _levels_to_rgb(np.asarray(img, dtype=np.float64) * (255.0 / 65535.0))
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        return _levels_to_rgb(arr if not arr.size or arr.max() <= 255 else arr * (255.0 / 65535.0))
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        if lo >= 0 and hi <= 1:
            return _levels_to_rgb(arr * 255.0)
        if lo >= 0 and hi <= 255:
            return _levels_to_rgb(arr)
        return _levels_to_rgb((arr - lo) / ((hi - lo) or 1.0) * 255.0)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _normalize(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32, rescaled to [0, 1] and normalised."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def resize_shape(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """(width, height) after the resize that precedes the center crop: shorter side spec.resize_to (squash: both)."""
    if spec.resize == "squash":
        return spec.resize_to, spec.resize_to
    short, long = min(width, height), max(width, height)
    # The longer side is truncated, not rounded: torchvision's Resize and transformers' shortest_edge resize do so,
    # and the saved image processor (processor_config) must land on the same pixel grid.
    long = int(spec.resize_to * long / short)
    nw, nh = (spec.resize_to, long) if width <= height else (long, spec.resize_to)
    return max(spec.size, nw), max(spec.size, nh)


def resize_for_crop(img: Image.Image, spec: ImageSpec) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The image resized as spec says (shorter side or both sides to spec.resize_to), and the center-crop box in it."""
    img = to_rgb(img)
    nw, nh = resize_shape(*img.size, spec)
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
    return img.resize((nw, nh), spec.filter), (left, top, left + spec.size, top + spec.size)


def resize_center_crop(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize to spec.resize_to (shorter side, or both for squash), then center-crop spec.size x spec.size."""
    resized, box = resize_for_crop(img, spec)
    return resized.crop(box)


def eval_transform(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Deterministic transform for validation, test and serving: resize, center crop, normalise."""
    return _normalize(resize_center_crop(img, spec), spec)


def eval_batch(images: list[Image.Image], spec: ImageSpec) -> np.ndarray:
    """Stack eval transforms into an (N, 3, S, S) float32 array."""
    return (
        np.stack([eval_transform(im, spec) for im in images])
        if images
        else np.zeros((0, 3, spec.size, spec.size), np.float32)
    )


def train_transform(
    img: Image.Image,
    spec: ImageSpec,
    rng: np.random.Generator,
    scale_min: float = 0.6,
    hflip: bool = True,
    rotation_deg: float = 10.0,
    color_jitter: float = 0.2,
) -> np.ndarray:
    """Random augmentation for training only: resized crop, flip, small rotation, colour jitter."""
    img = to_rgb(img)
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:
        cw = ch = min(w, h)
        left, top = (w - cw) // 2, (h - ch) // 2
    # Crop and shrink first, so that rotation and jitter work on spec.size pixels, not the full photo.
    img = img.resize((spec.size, spec.size), RESAMPLE, box=(left, top, left + cw, top + ch), reducing_gap=2.0)
    if rotation_deg > 0:
        img = img.rotate(
            float(rng.uniform(-rotation_deg, rotation_deg)), Image.Resampling.BILINEAR, fillcolor=(124, 116, 104)
        )
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if color_jitter > 0:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhancer(img).enhance(float(rng.uniform(1 - color_jitter, 1 + color_jitter)))
    return _normalize(img, spec)
