"""Model building (Hub id, local folder or config), layer freezing, saving with its preprocessing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lib.params import ModelParams, resolve_path
from lib.transforms import ImageSpec, save_spec, spec_from_processor

CALIBRATION_FILE = "calibration.json"


def label_maps(labels: list[str]) -> dict[str, dict]:
    """id2label / label2id dictionaries for a config."""
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def build_model(mp: ModelParams, labels: list[str]) -> tuple[Any, Any, ImageSpec]:
    """Build (model, image processor, eval ImageSpec) with a fresh head for these labels."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification
    from transformers import ViTImageProcessorPil as ViTImageProcessor  # PIL backend: no torchvision needed

    if mp.source == "config":
        cfg = ViTConfig(**mp.config.model_dump(), num_labels=len(labels), **label_maps(labels))
        cfg._attn_implementation = mp.attn_implementation
        model = ViTForImageClassification(cfg)
        size = mp.config.image_size
        processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        name = mp.name_or_path if mp.source == "hub" else str(resolve_path(mp.name_or_path))
        model = AutoModelForImageClassification.from_pretrained(
            name,
            num_labels=len(labels),
            ignore_mismatched_sizes=True,
            attn_implementation=mp.attn_implementation,
            **label_maps(labels),
        )
        processor = AutoImageProcessor.from_pretrained(name, backend="pil")
    freeze_layers(model, mp.freeze_layers)
    return model, processor, spec_from_processor(processor, mp.crop_pct)


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
    """save_pretrained the model and processor, plus preprocessing.json, into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    save_spec(spec, out_dir)
    return out_dir


def load_model(model_dir: Path) -> Any:
    """Load a saved classifier for inference (eval mode)."""
    from transformers import AutoModelForImageClassification

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no saved model in {model_dir}: run the train stage first")
    return AutoModelForImageClassification.from_pretrained(model_dir).eval()


def model_labels(model_dir: Path) -> list[str]:
    """Label names from a saved model's config.json (no transformers import)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return [cfg["id2label"][str(i)] for i in range(len(cfg["id2label"]))]


def save_temperature(model_dir: Path, temperature: float) -> Path:
    """Store the calibration temperature next to the model."""
    path = Path(model_dir) / CALIBRATION_FILE
    path.write_text(json.dumps({"temperature": float(temperature)}))
    return path


def load_temperature(model_dir: Path) -> float:
    """The stored calibration temperature, 1.0 if none."""
    path = Path(model_dir) / CALIBRATION_FILE
    return float(json.loads(path.read_text())["temperature"]) if path.is_file() else 1.0
