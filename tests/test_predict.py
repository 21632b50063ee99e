"""The predictor: torch and ONNX backends agree, ONNX path stays torch-free, same pixels as evaluation, temperature."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib.export import FP32_FILE, export_model
from lib.model import build_model, save_model, save_temperature
from lib.params import ROOT, ModelParams
from lib.predict import Predictor, dataset_logits, load_predictor, resolve_backend, softmax
from lib.transforms import eval_transform, load_spec

LABELS = [f"action_{i:02d}" for i in range(15)]
TEMPERATURE = 2.0

torch.set_num_threads(1)


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Images of assorted sizes and modes (RGB, L, RGBA, P), like uploads."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        images.append([im, im.convert("L"), im.convert("RGBA"), im.convert("P")][i % 4])
    return images


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a tiny random ViT (model/, calibration T=2) and its fp32 + int8 ONNX export serving fp32."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model, processor, spec = build_model(ModelParams(), LABELS)
    save_model(model, processor, spec, root / "model")
    save_temperature(root / "model", TEMPERATURE)
    export_model(root / "model", root / "export", opset=18, quantize="dynamic")
    (root / "export" / "serving.json").write_text(json.dumps({"file": FP32_FILE, "reason": "test"}))
    return root


def test_backends_agree(run_root: Path) -> None:
    """Same top-1 and probabilities within 1e-4 for torch and fp32 ONNX.

    Both see identical pixels; the fused ONNX kernels only reorder fp32 sums (logit differences ~1e-6), and a
    softmax moves by at most half the logit change, so 1e-4 leaves two orders of magnitude of headroom while
    still catching any real divergence (a wrong op or preprocessing shifts probabilities by >1e-2)."""
    images = make_images(12)
    onnx_pred = load_predictor(run_root, backend="onnx", threads=1)
    torch_pred = load_predictor(run_root, backend="torch", threads=1)
    assert (onnx_pred.backend, torch_pred.backend) == ("onnx", "torch")
    assert onnx_pred.model_file.endswith(FP32_FILE)
    p_onnx, p_torch = onnx_pred.predict_proba(images), torch_pred.predict_proba(images)
    assert p_onnx.shape == p_torch.shape == (12, 15)
    np.testing.assert_array_equal(p_onnx.argmax(1), p_torch.argmax(1))
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4)
    np.testing.assert_allclose(p_onnx.sum(1), 1.0, atol=1e-5)


def test_int8_backend_runs_and_is_close(run_root: Path, tmp_path: Path) -> None:
    """Serving the int8 file: valid probabilities, close to fp32 on this random model."""
    root = tmp_path / "run"
    shutil.copytree(run_root, root)
    (root / "export" / "serving.json").write_text(json.dumps({"file": "model.int8.onnx"}))
    pred = load_predictor(root, threads=1)
    assert pred.backend == "onnx" and pred.model_file.endswith("model.int8.onnx")
    images = make_images(4)
    p8 = pred.predict_proba(images)
    p32 = load_predictor(run_root, threads=1).predict_proba(images)
    np.testing.assert_allclose(p8.sum(1), 1.0, atol=1e-5)
    assert np.abs(p8 - p32).max() < 0.05


def test_onnx_path_imports_neither_torch_nor_transformers(run_root: Path, tmp_path: Path) -> None:
    """A fresh process that loads the ONNX predictor and predicts keeps torch and transformers out of sys.modules."""
    image = tmp_path / "x.png"
    make_images(1)[0].save(image)
    code = (
        "import json, sys\n"
        "from PIL import Image\n"
        "from lib.predict import load_predictor\n"
        f"pred = load_predictor({str(run_root)!r}, threads=1)\n"
        f"top = pred.top_k(Image.open({str(image)!r}), k=3)\n"
        "print(json.dumps({'backend': pred.backend, 'top': top,"
        " 'heavy': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "onnx"
    assert out["heavy"] == []
    assert len(out["top"]) == 3


def test_onnx_input_is_exactly_eval_transform(run_root: Path) -> None:
    """The array fed to the ONNX session equals lib.transforms.eval_transform, bit for bit, for every image mode."""
    pred = load_predictor(run_root, backend="onnx", threads=1)
    spec = load_spec(run_root / "model")
    seen: list[np.ndarray] = []
    inner = pred._run

    def spy(pixels: np.ndarray) -> np.ndarray:
        seen.append(pixels.copy())
        return inner(pixels)

    pred._run = spy
    images = make_images(6, seed=3)
    pred.predict_proba(images)
    expected = np.stack([eval_transform(im, spec) for im in images])
    fed = np.concatenate(seen)
    assert fed.dtype == np.float32 and fed.shape == expected.shape == (6, 3, spec.size, spec.size)
    np.testing.assert_array_equal(fed, expected)


def test_temperature_is_applied(run_root: Path) -> None:
    """predict_proba = softmax(logits / T) with T from calibration.json."""
    pred = load_predictor(run_root, backend="onnx", threads=1)
    assert pred.temperature == TEMPERATURE
    images = make_images(5, seed=1)
    logits = pred.logits(images)
    proba = pred.predict_proba(images)
    z = logits / TEMPERATURE
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(proba, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(proba, softmax(logits, 1.0), atol=1e-6)


def test_top_k_sorted_with_labels(run_root: Path) -> None:
    """top_k returns k (label, probability) pairs, most likely first, matching predict_proba."""
    pred = load_predictor(run_root, backend="onnx", threads=1)
    image = make_images(1, seed=7)[0]
    top = pred.top_k(image, k=5)
    assert len(top) == 5 and all(label in LABELS for label, _ in top)
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True)
    proba = pred.predict_proba([image])[0]
    assert top[0] == (LABELS[int(proba.argmax())], pytest.approx(float(proba.max())))
    assert len(pred.top_k(image, k=99)) == 15
    assert pred.labels == LABELS


def test_auto_backend_choice(run_root: Path, tmp_path: Path) -> None:
    """auto = onnx with export/serving.json on the CPU, torch without it or on a GPU; unknown names fail."""
    assert resolve_backend(run_root, "auto", "cpu") == "onnx"
    assert resolve_backend(run_root, "auto", "cuda") == "torch"
    bare = tmp_path / "bare"
    shutil.copytree(run_root / "model", bare / "model")
    assert resolve_backend(bare, "auto", "cpu") == "torch"
    pred = load_predictor(bare, threads=1)
    assert pred.backend == "torch"
    with pytest.raises(FileNotFoundError, match="export"):
        load_predictor(bare, backend="onnx")
    with pytest.raises(ValueError):
        resolve_backend(run_root, "tensorrt")
    with pytest.raises(FileNotFoundError):
        load_predictor(tmp_path / "nothing")


def test_dataset_logits_match_predictor(run_root: Path) -> None:
    """The evaluation path (batched dataset_logits) gives the serving predictor's logits on the same images."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from lib.model import load_model

    images = [im.convert("RGB") for im in make_images(10, seed=5)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=LABELS)})
    ds = Dataset.from_dict({"image": images, "label": list(range(10))}, features=features)
    spec = load_spec(run_root / "model")
    model = load_model(run_root / "model")
    batched = dataset_logits(model, ds, spec, batch_size=4, device="cpu")
    assert batched.shape == (10, 15)
    served = load_predictor(run_root, backend="onnx", threads=1).logits(list(ds["image"]))
    np.testing.assert_allclose(batched, served, atol=1e-4)


def test_per_view_logits_put_the_served_view_first(run_root: Path) -> None:
    """With tta_flip, per_view gives (N, 2, C): view 0 is the image as served (unflipped), view 1 its mirror, and
    the TTA logits are their mean. Evaluation reads view 0 as the served model's logits."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from lib.model import load_model

    images = [im.convert("RGB") for im in make_images(7, seed=9)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=LABELS)})
    ds = Dataset.from_dict({"image": images, "label": list(range(7))}, features=features)
    spec = load_spec(run_root / "model")
    model = load_model(run_root / "model")
    views = dataset_logits(model, ds, spec, batch_size=3, device="cpu", tta_flip=True, per_view=True)
    assert views.shape == (7, 2, 15)
    pixels = torch.from_numpy(np.stack([eval_transform(im, spec) for im in images]))
    with torch.inference_mode():
        plain = model(pixel_values=pixels).logits.numpy()
        mirrored = model(pixel_values=pixels.flip(-1)).logits.numpy()
    assert np.abs(plain - mirrored).max() > 1e-3  # the two views differ, so their order shows
    np.testing.assert_allclose(views[:, 0], plain, atol=1e-4)
    np.testing.assert_allclose(views[:, 1], mirrored, atol=1e-4)
    tta = dataset_logits(model, ds, spec, batch_size=3, device="cpu", tta_flip=True)
    np.testing.assert_allclose(tta, views.mean(axis=1), atol=1e-6)
    single = dataset_logits(model, ds, spec, batch_size=3, device="cpu", per_view=True)
    assert single.shape == (7, 1, 15)
    np.testing.assert_allclose(single[:, 0], views[:, 0], atol=1e-4)


def test_empty_input() -> None:
    """No images, no rows."""
    from lib.transforms import ImageSpec

    pred = Predictor(lambda x: np.zeros((len(x), 3), np.float32), ["a", "b", "c"], ImageSpec(size=16), 1.0, "onnx", "m")
    assert pred.predict_proba([]).shape == (0, 3)
