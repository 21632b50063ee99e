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
RESAMPLE = Image.Resampling.BICUBIC
RESIZE_MODES = ("crop", "squash")


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects: square input size, crop ratio, normalisation, resize mode.

    resize "crop": shorter side to resize_to, then center crop size x size (ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt).
    resize "squash": straight to size x size, aspect ratio not kept, no crop (SigLIP; crop_pct is then unused).
    """

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float = 0.875
    resize: str = "crop"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")

    @property
    def resize_to(self) -> int:
        """Shorter side after the resize that precedes the center crop."""
        return int(math.floor(self.size / self.crop_pct + 0.5))


def spec_from_processor(processor: Any, crop_pct: float = 0.875, resize: str = "crop") -> ImageSpec:
    """Build an ImageSpec from a Hugging Face image processor (ViT, DINOv2, BEiT, ConvNeXt, Swin, SigLIP ...): its
    input size, mean and std; the resize rule is resize (lib.model.FAMILIES says which one a family uses)."""
    # The crop size only where the processor crops: BEiT's keeps a default crop_size with do_center_crop false.
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", None) else None
    size = crop or getattr(processor, "size", None) or {}
    if isinstance(size, int):
        side = size
    else:  # a dict, or transformers' SizeDict
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        side = get("height") or get("shortest_edge") or get("width")
    if not side:
        raise ValueError(f"cannot read an input size from {type(processor).__name__}")
    mean = tuple(float(x) for x in (processor.image_mean or (0.5, 0.5, 0.5)))
    std = tuple(float(x) for x in (processor.image_std or (0.5, 0.5, 0.5)))
    return ImageSpec(size=int(side), mean=mean, std=std, crop_pct=crop_pct, resize=resize)  # type: ignore[arg-type]


def processor_config(spec: ImageSpec) -> dict[str, Any]:
    """Settings of a transformers image processor (ViTImageProcessor, PIL backend) that does exactly eval_transform:
    RGB with transparency on white, bicubic resize of the shorter side to spec.resize_to, center crop spec.size,
    rescale by 1/255, normalise with spec.mean and spec.std. For resize "squash": bicubic resize to spec.size x
    spec.size and no crop."""
    if spec.resize == "squash":
        return {
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"height": spec.size, "width": spec.size},
            "resample": int(RESAMPLE),
            "do_center_crop": False,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(spec.mean),
            "image_std": list(spec.std),
        }
    if spec.resize_to < spec.size:  # eval_transform then stretches the image; a shortest-edge resize cannot say that
        raise ValueError(f"crop_pct {spec.crop_pct} > 1 has no image processor equivalent")
    return {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": spec.resize_to},
        "resample": int(RESAMPLE),
        "do_center_crop": True,
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
    # Files written before the resize mode existed describe a crop.
    return ImageSpec(
        size=int(raw["size"]),
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        crop_pct=float(raw["crop_pct"]),
        resize=str(raw.get("resize", "crop")),
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, LA, I;16, CMYK ...) to 8-bit RGB; transparency goes on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        arr = arr / (65535.0 if hi > 255 else 255.0) * 255.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
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
    """(width, height) after the resize that precedes the center crop: shorter side spec.resize_to (squash: size)."""
    if spec.resize == "squash":
        return spec.size, spec.size
    short, long = min(width, height), max(width, height)
    # The longer side is truncated, not rounded: torchvision's Resize and transformers' shortest_edge resize do so,
    # and the saved image processor (processor_config) must land on the same pixel grid.
    long = int(spec.resize_to * long / short)
    nw, nh = (spec.resize_to, long) if width <= height else (long, spec.resize_to)
    return max(spec.size, nw), max(spec.size, nh)


def resize_for_crop(img: Image.Image, spec: ImageSpec) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The image resized so its shorter side is spec.resize_to, and the center-crop box within it (squash: the image
    resized to spec.size x spec.size and the whole of it)."""
    img = to_rgb(img)
    nw, nh = resize_shape(*img.size, spec)
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
    return img.resize((nw, nh), RESAMPLE), (left, top, left + spec.size, top + spec.size)


def resize_center_crop(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize the shorter side to spec.resize_to, then center-crop spec.size x spec.size (squash: resize only)."""
    resized, box = resize_for_crop(img, spec)
    return resized.crop(box)


def eval_transform(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Deterministic transform for validation, test and serving: resize, center crop (unless squash), normalise."""
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
