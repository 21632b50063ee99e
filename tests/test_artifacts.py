"""Artifacts that work outside this repository: a saved model folder through transformers' own AutoImageProcessor and
pipeline (no lib code, no torchvision) reproduces lib's evaluation path, pixel for pixel and top-1 for top-1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib.calibration import softmax
from lib.data import class_names, prepare
from lib.model import build_model, image_processor, load_model, save_model
from lib.params import DataParams, EmbeddedData, ModelParams, VitConfig
from lib.predict import Predictor, dataset_logits, torch_runner
from lib.transforms import ImageSpec, eval_batch, eval_transform, load_spec, resize_shape

torch.set_num_threads(1)

# eval_transform rescales in float32, transformers in float64 and then normalises in another order: the two differ by
# a few float32 ulps (measured: 1.2e-7 at std 0.5, 7.2e-7 at ImageNet's std 0.225). One grey level is 2/255 = 7.8e-3
# at std 0.5, so a resize, crop or resampling difference would be far above this.
PIXEL_ATOL = 1e-5
PROBA_ATOL = 1e-5
# A tiny ViT on the demo's 64 px input: trains in about a second, enough to spread its predictions over the classes.
TINY = VitConfig(
    image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
)


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A random RGB image of size w x h, converted to mode."""
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def odd_images() -> list[Image.Image]:
    """Sizes and aspect ratios beyond the demo's: smaller than the crop, exactly the resize target, 7:1 wide and
    1:7 tall, a longer side whose rounded and truncated targets differ, and a grey-level image."""
    sizes = [(20, 13), (73, 73), (64, 64), (1000, 140), (90, 600), (303, 200), (200, 303), (257, 129)]
    return [noise(w, h, i) for i, (w, h) in enumerate(sizes)] + [noise(150, 100, 99, "L")]


def fit_briefly(model: torch.nn.Module, pixels: np.ndarray, labels: list[int], steps: int = 20) -> torch.nn.Module:
    """A few full-batch AdamW steps, so that the model's top-1 depends on the image (a random one barely does)."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, y = torch.from_numpy(pixels), torch.as_tensor(labels)
    model.train()
    for _ in range(steps):
        loss = model(pixel_values=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A demo-like run: the embedded generator's images split as prepare does, a tiny ViT fitted on the train split
    and saved with save_model; returns (model folder, test split)."""
    root = tmp_path_factory.mktemp("artifacts")
    data = DataParams(
        embedded=EmbeddedData(images_per_class=10), near_duplicate_distance=None, val_fraction=0.15, test_fraction=0.2
    )
    splits, _ = prepare(data, root / "data", root / "cache")
    torch.manual_seed(0)
    model, processor, spec = build_model(ModelParams(config=TINY, crop_pct=0.875), class_names(splits["train"]))
    fit_briefly(model, eval_batch(list(splits["train"]["image"]), spec), list(splits["train"]["label"]))
    save_model(model, processor, spec, root / "model")
    return root / "model", splits["test"]


def test_processor_config_and_preprocessing_json_describe_one_transform(demo_run: tuple[Path, object]) -> None:
    """preprocessor_config.json: shorter side to round(size / crop_pct), center crop, bicubic, mean and std."""
    folder, _ = demo_run
    spec = load_spec(folder)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    assert cfg["size"] == {"shortest_edge": spec.resize_to} == {"shortest_edge": 73}
    assert cfg["do_center_crop"] and cfg["crop_size"] == {"height": spec.size, "width": spec.size}
    assert cfg["resample"] == int(Image.Resampling.BICUBIC) == 3
    assert tuple(cfg["image_mean"]) == spec.mean and tuple(cfg["image_std"]) == spec.std
    assert cfg["do_convert_rgb"] and cfg["do_rescale"] and cfg["do_normalize"]


@pytest.mark.parametrize(
    "spec",
    [
        ImageSpec(size=64),
        ImageSpec(size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875),
        ImageSpec(size=64, crop_pct=1.0, resize="squash", resample="bilinear"),  # ViT's processor
        ImageSpec(size=224, crop_pct=224 / 256, resize="squash"),  # DeiT's: squash to 256, crop 224
    ],
    ids=["demo-64", "imagenet-224", "vit-squash-64", "deit-squash-crop-224"],
)
def test_auto_image_processor_matches_eval_transform(spec: ImageSpec, tmp_path: Path) -> None:
    """AutoImageProcessor over the saved config gives eval_transform's pixels, for any size, aspect ratio or mode."""
    from transformers import AutoImageProcessor

    image_processor(spec).save_pretrained(tmp_path)
    # backend="pil" is what transformers picks when torchvision is missing, as here; where torchvision is installed it
    # picks the torchvision backend, whose antialiased bicubic is its own approximation of PIL's.
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    images = odd_images() + [noise(120, 80, 7, "P"), noise(60, 90, 8, "RGBA"), noise(90, 60, 9, "LA")]
    transparent = np.array(images[-2])
    transparent[::3, :, 3] = 0  # transparency goes on white in both
    images[-2] = Image.fromarray(transparent, "RGBA")
    if spec.resize == "shorter_side":
        truncated = [resize_shape(*im.size, spec) for im in images]
        rounded = [max(im.size) * spec.resize_to / min(im.size) for im in images]
        assert any(max(t) != round(r) for t, r in zip(truncated, rounded)), "no image where rounding would differ"
    for im in images:
        ours = eval_transform(im, spec)
        theirs = processor(im, return_tensors="np")["pixel_values"][0]
        assert theirs.shape == ours.shape == (3, spec.size, spec.size)
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=PIXEL_ATOL, err_msg=f"{im.size} {im.mode}")


def test_pipeline_gives_the_evaluate_top1(demo_run: tuple[Path, object]) -> None:
    """transformers.pipeline on the model folder alone: on the test split the same top-1 and probabilities as the
    evaluate stage's dataset_logits, and on odd sizes the same as lib's Predictor (torch runner)."""
    from transformers import AutoImageProcessor, pipeline

    folder, test = demo_run
    # PyPI's torchvision does not work with this torch: the model folder must load without it, on the PIL backend.
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__ == "ViTImageProcessorPil"
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    model, spec = load_model(folder), load_spec(folder)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    extra = odd_images()
    ref = np.concatenate(
        [
            dataset_logits(model, test, spec, batch_size=16, device="cpu", precision="fp32"),
            Predictor(torch_runner(model), labels, spec, 1.0, "torch", str(folder)).logits(extra),
        ]
    )
    images = list(test["image"]) + extra
    out = classify(images, top_k=len(labels))
    theirs = np.array([[{r["label"]: r["score"] for r in rows}[name] for name in labels] for rows in out])
    top1 = [rows[0]["label"] for rows in out]
    assert top1 == [labels[i] for i in ref.argmax(1)]
    np.testing.assert_allclose(theirs, softmax(ref), rtol=0, atol=PROBA_ATOL)
    assert len(set(top1)) >= 5, "the model should not predict one class for everything"
    y = np.asarray(test["label"])
    pipeline_accuracy = np.mean(np.array([labels.index(t) for t in top1[: len(test)]]) == y)
    assert pipeline_accuracy == np.mean(ref[: len(test)].argmax(1) == y)
