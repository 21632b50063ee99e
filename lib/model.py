"""Model building (Hub id, local folder or config), layer freezing, saving with its preprocessing.

A saved model folder works outside this repository: its preprocessor_config.json is derived from the same
ImageSpec as preprocessing.json, so `transformers.pipeline("image-classification", model=folder)` preprocesses
exactly as evaluation and serving do (lib.transforms.eval_transform).
"""

from __future__ import annotations

import json
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
        spec = ImageSpec(size=mp.config.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=mp.crop_pct)
    else:
        name = mp.name_or_path if mp.source == "hub" else str(resolve_path(mp.name_or_path))
        model = AutoModelForImageClassification.from_pretrained(
            name,
            num_labels=len(labels),
            ignore_mismatched_sizes=True,
            attn_implementation=mp.attn_implementation,
            **label_maps(labels),
        )
        # The backbone's processor gives size, mean and std; its resize rule is replaced by the evaluation transform's.
        spec = spec_from_processor(AutoImageProcessor.from_pretrained(name, backend="pil"), mp.crop_pct)
    freeze_layers(model, mp.freeze_layers)
    return model, image_processor(spec), spec


def encoder_layers(model: Any) -> list[Any]:
    """The backbone's encoder blocks, in order ([encoder.]layer(s) for ViT, BEiT, DINOv2; stages for Swin, ConvNeXt)."""
    base = model.base_model
    for owner in (getattr(base, "encoder", None), base):
        for attr in ("layer", "layers", "stages"):
            blocks = getattr(owner, attr, None)
            if blocks is not None:
                return list(blocks)
    raise ValueError(f"cannot find encoder layers in {type(base).__name__}")


def freeze_layers(model: Any, n: int) -> None:
    """Freeze the embeddings and the first n encoder layers (n=0 trains everything)."""
    for param in model.parameters():
        param.requires_grad = True
    if n <= 0:
        return
    layers = encoder_layers(model)
    if n > len(layers):
        raise ValueError(f"freeze_layers={n} but the model has {len(layers)} encoder layers")
    embeddings = getattr(model.base_model, "embeddings", None)
    for module in ([embeddings] if embeddings is not None else []) + layers[:n]:
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
