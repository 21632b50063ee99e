"""Offline Hugging Face caches for the profiles' ids: hub-cache model snapshots and a datasets Arrow cache.

Used by the rehearsal (full-size backbones with random weights, real or generated photos) and by the tests (tiny
models, a handful of generated images). Both libraries resolve these without a network once HF_HUB_CACHE /
HF_DATASETS_CACHE point at the folders and HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 are set in the environment of
the process that loads them.

    python -m tools.hub_cache HUB_DIR DATASETS_DIR [--size base] [--per-class 11] \
        [--images ../shared/data/har_sample] [--models ID ...]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lib.labels import HAR_CLASSES

HUB_MODEL_ID = "google/vit-base-patch16-224"
HUB_IN21K_ID = "google/vit-base-patch16-224-in21k"
HUB_DINOV2_ID = "facebook/dinov2-base"
HUB_SIGLIP_ID = "google/siglip-base-patch16-224"
HUB_DATASET_ID = "Bingsu/Human_Action_Recognition"
# The tiny stand-in keeps the tests fast; "base" is ViTConfig's defaults, the architecture of both Google ids
# (224 px, patch 16, hidden 768, 12 layers, 12 heads, MLP 3072).
TINY_VIT = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
# DINOv2 at tiny size keeps what matters about the real repo: its position embeddings are for a larger grid than
# the processor's crop (518 px vs 224 px there, 40 vs 32 px here), so every forward pass interpolates them.
TINY_DINOV2 = {
    "image_size": 40,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
}
TINY_SIGLIP_TEXT = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def fake_revision(model_id: str, size: str) -> str:
    """A stable 40-hex 'commit' for the snapshot folder and refs/main."""
    return hashlib.sha1(f"{model_id}|{size}".encode()).hexdigest()


def write_snapshot(hub_cache: Path, model_id: str, model: Any, processor: dict[str, Any], revision: str) -> Path:
    """save_pretrained(model) plus processor as preprocessor_config.json into the hub-cache snapshot of model_id,
    with refs/main pointing at it; return the snapshot folder."""
    repo = Path(hub_cache) / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    model.save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def vit_repo(size: str, classifier: bool) -> tuple[Any, dict[str, Any]]:
    """google/vit-base-patch16-224 (classifier, 1000 classes) or -in21k (ViTModel with its pooler, no head), and
    their processor: ViTImageProcessor, square resize, mean/std 0.5, bilinear."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    cfg = ViTConfig(**(TINY_VIT if size == "tiny" else {}), **({"num_labels": 1000} if classifier else {}))
    model = ViTForImageClassification(cfg) if classifier else ViTModel(cfg, add_pooling_layer=True)
    side = cfg.image_size
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": side, "width": side},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    return model, processor


def dinov2_repo(size: str) -> tuple[Any, dict[str, Any]]:
    """facebook/dinov2-base: a bare Dinov2Model (ViT-B/14, position embeddings for 518 px, layer scale), and its
    BitImageProcessor: shorter side 256, bicubic, center crop 224, ImageNet mean/std."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**(TINY_DINOV2 if size == "tiny" else {"image_size": 518, "patch_size": 14})))
    crop = 32 if size == "tiny" else 224
    processor = {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": round(crop / 0.875)},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
    }
    return model, processor


def siglip_repo(size: str) -> tuple[Any, dict[str, Any]]:
    """google/siglip-base-patch16-224: the image-text SiglipModel (both towers; the classifier keeps the vision
    one), and its SiglipImageProcessor: straight to 224 x 224, bicubic, mean/std 0.5, no crop."""
    from transformers import SiglipConfig, SiglipModel

    if size == "tiny":
        cfg = SiglipConfig(text_config=TINY_SIGLIP_TEXT, vision_config=TINY_VIT)
    else:
        cfg = SiglipConfig()  # its defaults are the base model: both towers 12 x 768, 224 px, patch 16
    side = cfg.vision_config.image_size
    processor = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": side, "width": side},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    return SiglipModel(cfg), processor


# The Hub ids the profiles name, and how to build a stand-in of each repo.
HUB_MODELS = {
    HUB_MODEL_ID: lambda size: vit_repo(size, classifier=True),
    HUB_IN21K_ID: lambda size: vit_repo(size, classifier=False),
    HUB_DINOV2_ID: dinov2_repo,
    HUB_SIGLIP_ID: siglip_repo,
}


def write_model_cache(
    hub_cache: Path, model_id: str = HUB_MODEL_ID, size: Literal["tiny", "base"] = "tiny", seed: int = 0
) -> Path:
    """Save a seeded random stand-in of model_id (one of HUB_MODELS: the real repo's architecture, config and image
    processor) as its hub-cache snapshot; return the snapshot folder."""
    import torch

    if model_id not in HUB_MODELS:
        raise ValueError(f"no offline stand-in for {model_id!r}; known ids: {', '.join(HUB_MODELS)}")
    torch.manual_seed(seed)
    model, processor = HUB_MODELS[model_id](size)
    return write_snapshot(hub_cache, model_id, model, processor, fake_revision(model_id, size))


def generated_jpeg(label: int, rng: np.random.Generator) -> bytes:
    """One image of class `label` from the embedded generator, photo-like size, as JPEG bytes."""
    from lib.demo.synthetic import render

    size = (int(rng.integers(160, 321)), int(rng.integers(120, 241)))
    buf = io.BytesIO()
    render(label, rng, size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def folder_images(image_folder: Path, per_class: int) -> list[tuple[bytes, int]]:
    """The first per_class image files (sorted by name) of each class folder, as (bytes, label)."""
    items = []
    for label, name in enumerate(HAR_CLASSES):
        files = sorted(p for p in (Path(image_folder) / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < per_class:
            raise ValueError(f"{image_folder / name} holds {len(files)} images, {per_class} wanted")
        items += [(p.read_bytes(), label) for p in files[:per_class]]
    return items


def write_dataset_cache(
    datasets_cache: Path,
    per_class: int = 6,
    dataset_id: str = HUB_DATASET_ID,
    image_folder: Path | None = None,
    test_images: int = 30,
    seed: int = 0,
) -> Path:
    """Write an Arrow cache with the schema of Bingsu/Human_Action_Recognition; return its folder.

    Features: image (Image) and labels (ClassLabel, the 15 names); splits train and test. Train holds per_class
    images of each class, read from image_folder/<class>/ when given, else drawn by the embedded generator.
    Test holds test_images generated images, all labelled 0: the real test split carries no labels.
    """
    import datasets

    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=list(HAR_CLASSES))})
    rng = np.random.default_rng(seed)
    if image_folder is not None:
        train = folder_images(image_folder, per_class)
    else:
        train = [(generated_jpeg(c, rng), c) for c in range(len(HAR_CLASSES)) for _ in range(per_class)]
    test = [(generated_jpeg(i % len(HAR_CLASSES), rng), 0) for i in range(test_images)]
    namespace, name = dataset_id.split("/")
    snake = datasets.naming.camelcase_to_snakecase(name)
    folder = Path(datasets_cache) / f"{namespace}___{snake}" / "default" / "0.0.0" / "0000000000000000"
    folder.mkdir(parents=True, exist_ok=True)
    split_infos = {}
    for split, items in (("train", train), ("test", test)):
        table = {"image": [{"bytes": b, "path": None} for b, _ in items], "labels": [c for _, c in items]}
        ds = datasets.Dataset.from_dict(table, features=features)
        path = folder / f"{snake}-{split}.arrow"
        with datasets.arrow_writer.ArrowWriter(path=str(path), features=features) as writer:
            writer.write_table(ds.data.table)
        split_infos[split] = {"name": split, "num_bytes": path.stat().st_size, "num_examples": len(ds)}
    info = {
        "features": features.to_dict(),
        "builder_name": "parquet",
        "config_name": "default",
        "dataset_name": snake,
        "version": {"version_str": "0.0.0", "major": 0, "minor": 0, "patch": 0},
        "splits": split_infos,
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def main(argv: list[str] | None = None) -> int:
    """CLI: build both Google ids and the dataset cache; print a JSON summary."""
    ap = argparse.ArgumentParser(
        prog="python -m tools.hub_cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("hub_cache", type=Path)
    ap.add_argument("datasets_cache", type=Path)
    ap.add_argument("--size", choices=["tiny", "base"], default="base")
    ap.add_argument("--per-class", type=int, default=11)
    ap.add_argument("--images", type=Path, help="image folder with one subfolder per class (default: generated)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--models",
        nargs="+",
        default=[HUB_MODEL_ID, HUB_IN21K_ID],
        choices=list(HUB_MODELS),
        metavar="ID",
        help=f"Hub ids to build (default: the two ViT ids; known: {', '.join(HUB_MODELS)})",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    snapshots = {m: write_model_cache(args.hub_cache, m, args.size, seed=args.seed) for m in args.models}
    folder = write_dataset_cache(args.datasets_cache, args.per_class, image_folder=args.images, seed=args.seed)
    info = json.loads((folder / "dataset_info.json").read_text())
    print(
        json.dumps(
            {
                "models": {k: str(v) for k, v in snapshots.items()},
                "dataset": str(folder),
                "images": "generated" if args.images is None else str(args.images),
                "splits": {k: v["num_examples"] for k, v in info["splits"].items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
