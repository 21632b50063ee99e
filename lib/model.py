"""Model building (Hub id, local folder or config), layer freezing, saving with its preprocessing.

A saved model folder works outside this repository: its preprocessor_config.json is derived from the same
ImageSpec as preprocessing.json, so `transformers.pipeline("image-classification", model=folder)` preprocesses
exactly as evaluation and serving do (lib.transforms.eval_transform).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lib.params import ModelParams, resolve_path
from lib.transforms import ImageSpec, processor_config, save_spec, spec_from_processor

CALIBRATION_FILE = "calibration.json"


def label_maps(labels: list[str]) -> dict[str, dict]:
    """id2label / label2id dictionaries for a config."""
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def image_processor(spec: ImageSpec) -> Any:
    """A transformers image processor that does exactly eval_transform for this spec (PIL backend: no torchvision)."""
    from transformers import ViTImageProcessorPil

    # ViTImageProcessor adds nothing to the base resize / crop / normalise steps, so it suits any backbone.
    return ViTImageProcessorPil(**processor_config(spec))


def build_model(mp: ModelParams, labels: list[str]) -> tuple[Any, Any, ImageSpec]:
    """Build (model, image processor, eval ImageSpec) with a fresh head for these labels; the processor returned is
    the evaluation transform's (image_processor(spec)), not the backbone's own."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    if mp.source == "config":
        cfg = ViTConfig(**mp.config.model_dump(), num_labels=len(labels), **label_maps(labels))
        cfg._attn_implementation = mp.attn_implementation
        model = ViTForImageClassification(cfg)
        # No backbone processor to follow: without crop_pct, ViTImageProcessor's resize to size x size (bicubic).
        spec = ImageSpec(size=mp.config.image_size, crop_pct=1.0, resize="squash")
    else:
        name = mp.name_or_path if mp.source == "hub" else str(resolve_path(mp.name_or_path))
        model = AutoModelForImageClassification.from_pretrained(
            name,
            num_labels=len(labels),
            ignore_mismatched_sizes=True,
            attn_implementation=mp.attn_implementation,
            **label_maps(labels),
        )
        if model.config.model_type in PATCH_INPUT:
            raise ValueError(f"{name}: {PATCH_INPUT[model.config.model_type]}")
        # Evaluation preprocesses as the backbone's own image processor does (resize, crop, filter, mean, std).
        spec = spec_from_processor(AutoImageProcessor.from_pretrained(name, backend="pil"))
    if mp.crop_pct is not None:  # the params override the resize: shorter side to size / crop_pct, center crop
        spec = replace(spec, resize="shorter_side", crop_pct=mp.crop_pct)
    freeze_layers(model, mp.freeze_layers)
    return model, image_processor(spec), spec


@dataclass(frozen=True)
class Family:
    """Where one model type keeps its parts, as dotted paths from model.base_model.

    blocks: the block list, one path per transformers layout (current first; older releases nest ViT-style blocks
    at encoder.layer). embeddings: the patch (and position) embeddings. (The evaluation transform comes from each
    backbone's own image processor: lib.transforms.spec_from_processor.)
    Hierarchical families (Swin, ConvNeXt) list stages: depth and freezing go by stage.
    """

    blocks: tuple[str, ...]
    embeddings: str = "embeddings"


FAMILIES: dict[str, Family] = {
    "vit": Family(blocks=("layers", "encoder.layer")),
    "deit": Family(blocks=("layers", "encoder.layer")),
    "beit": Family(blocks=("layers", "encoder.layer")),
    "dinov2": Family(blocks=("encoder.layer",)),
    # SigLIP's classifier is the whole model (no base-model attribute), so base_model is the model itself.
    "siglip": Family(blocks=("vision_model.encoder.layers",), embeddings="vision_model.embeddings"),
    "siglip2": Family(blocks=("vision_model.encoder.layers",), embeddings="vision_model.embeddings"),
    "swin": Family(blocks=("encoder.layers",)),
    "convnext": Family(blocks=("encoder.stages",)),
}


# Families whose classifier takes patch sequences, not images: layer freezing and LLRD know them (FAMILIES), but
# training, evaluation, export and serving feed pixel_values (N, 3, S, S), so the pipeline refuses to build one.
PATCH_INPUT = {
    "siglip2": "SigLIP 2 NaFlex (model type siglip2) takes patch sequences with their grid, not images, which this "
    "pipeline's training, evaluation, export and serving do not produce; use a fixed-resolution SigLIP 2 checkpoint "
    "(model type siglip, e.g. google/siglip2-base-patch16-224)",
}


@dataclass(frozen=True)
class Layout:
    """One built model's parts: its family, the blocks in order, and the parameter-name prefixes they carry."""

    model_type: str
    blocks: list[Any]
    embeddings: Any
    block_prefix: str  # f"{block_prefix}{i}." starts the name of every parameter of block i
    embeddings_prefix: str


def family(model_type: str) -> Family:
    """The table entry for a config.model_type; ValueError naming it when the family is not supported."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model family {model_type!r} is not supported for layer freezing and layer-wise LR decay "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def _attr_path(root: Any, path: str) -> Any:
    """getattr along a dotted path; None where a part is missing."""
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def layout(model: Any) -> Layout:
    """Resolve the model's family table entry against the built model (ValueError for an unknown family)."""
    model_type = getattr(model.config, "model_type", "")
    fam = family(model_type)
    base = model.base_model
    names = {id(m): n for n, m in model.named_modules()}
    for path in fam.blocks:
        blocks = _attr_path(base, path)
        if blocks is not None:
            break
    else:
        raise ValueError(f"{type(model).__name__} ({model_type}) has none of {fam.blocks} under its base model")
    embeddings = _attr_path(base, fam.embeddings)
    if embeddings is None:
        raise ValueError(f"{type(model).__name__} ({model_type}) has no {fam.embeddings} under its base model")
    return Layout(
        model_type=model_type,
        blocks=list(blocks),
        embeddings=embeddings,
        block_prefix=names[id(blocks)] + ".",
        embeddings_prefix=names[id(embeddings)] + ".",
    )


def encoder_layers(model: Any) -> list[Any]:
    """The backbone's encoder blocks in order (stages for Swin, ConvNeXt), from the FAMILIES table."""
    return layout(model).blocks


def freeze_layers(model: Any, n: int) -> None:
    """Freeze the embeddings and the first n encoder layers (n=0 trains everything)."""
    for param in model.parameters():
        param.requires_grad = True
    if n <= 0:
        return
    parts = layout(model)
    if n > len(parts.blocks):
        raise ValueError(f"freeze_layers={n} but the model has {len(parts.blocks)} encoder layers")
    for module in [parts.embeddings] + parts.blocks[:n]:
        for param in module.parameters():
            param.requires_grad = False


def count_parameters(model: Any) -> dict[str, int]:
    """Total and trainable parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def save_model(model: Any, processor: Any, spec: ImageSpec, out_dir: Path) -> Path:
    """save_pretrained the model and image_processor(spec), plus preprocessing.json, into out_dir.

    processor (what build_model returned) is not saved as given: the saved one is rebuilt from spec, so that
    preprocessor_config.json and preprocessing.json always describe the same transform.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor(spec).save_pretrained(out_dir)
    save_spec(spec, out_dir)
    return out_dir


def load_model(model_dir: Path) -> Any:
    """Load a saved classifier for inference (eval mode)."""
    from transformers import AutoModelForImageClassification

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no saved model in {model_dir}: run the train stage first")
    return AutoModelForImageClassification.from_pretrained(model_dir).eval()


def save_temperature(model_dir: Path, temperature: float) -> Path:
    """Store the calibration temperature next to the model."""
    path = Path(model_dir) / CALIBRATION_FILE
    path.write_text(json.dumps({"temperature": float(temperature)}))
    return path
