"""Inference: batched logits over a dataset split (evaluation) and a calibrated predictor over PIL images (serving).

The ONNX predictor imports neither torch nor transformers: a dashboard kernel stays small. Torch is
imported inside the functions that need it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lib.calibration import softmax
from lib.files import read_json
from lib.labels import config_labels
from lib.transforms import ImageSpec, eval_batch, load_spec

EXPORT_DIR = "export"
SERVING_FILE = "serving.json"
BACKENDS = ("auto", "onnx", "torch")


def dataset_logits(
    model: Any,
    ds: Any,
    spec: ImageSpec,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    tta_flip: bool = False,
    precision: str = "auto",
    per_view: bool = False,
    progress: str | None = None,
) -> np.ndarray:
    """Logits (N, C) for a split: batched DataLoader, inference_mode, bf16/fp16 autocast on GPU (precision="fp32"
    disables it).

    progress names a progress bar over the batches (None: no bar).
    tta_flip averages the logits of each image and its mirror. per_view returns (N, V, C) instead: view 0 the
    image as served, view 1 its mirror when tta_flip, so one pass gives both the TTA and the served logits.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from lib.data import collate, eval_batch_transform

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    model = model.to(device).eval()
    loader = DataLoader(
        ds.with_transform(eval_batch_transform(spec)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=on_gpu,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float16
    use_autocast = on_gpu and precision != "fp32"
    out = []
    with (
        torch.inference_mode(),
        torch.autocast(device_type="cuda" if on_gpu else "cpu", dtype=dtype, enabled=use_autocast),
    ):
        for batch in tqdm(loader, desc=progress, unit="batch", disable=progress is None):
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            if tta_flip:
                # one forward pass over the batch and its mirror keeps the GPU busier than two
                both = model(pixel_values=torch.cat([pixels, pixels.flip(-1)])).logits.float()
                views = torch.stack([both[: len(pixels)], both[len(pixels) :]], dim=1)
            else:
                views = model(pixel_values=pixels).logits.float()[:, None]
            out.append(views.cpu().numpy())
    views = np.concatenate(out) if out else np.zeros((0, 2 if tta_flip else 1, model.config.num_labels), np.float32)
    return views if per_view else views.mean(axis=1)


class Predictor:
    """A calibrated image classifier: eval_transform preprocessing, a torch or ONNX model, softmax(logits / T)."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        labels: list[str],
        spec: ImageSpec,
        temperature: float,
        backend: str,
        model_file: str,
        batch_size: int = 16,
    ) -> None:
        self._run = run
        self.labels = list(labels)
        self.spec = spec
        self.temperature = float(temperature)
        self.backend = backend
        self.model_file = model_file
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return (
            f"Predictor(backend={self.backend!r}, model_file={self.model_file!r}, classes={len(self.labels)}, "
            f"T={self.temperature:.3f})"
        )

    def pixels(self, images: list[Image.Image]) -> np.ndarray:
        """The model input for these images: exactly lib.transforms.eval_transform, stacked (N, 3, S, S)."""
        return eval_batch(list(images), self.spec)

    def logits(self, images: list[Image.Image]) -> np.ndarray:
        """Raw logits (N, C), in chunks of batch_size images."""
        images = list(images)
        if not images:
            return np.zeros((0, len(self.labels)), np.float32)
        parts = [
            np.asarray(self._run(self.pixels(images[i : i + self.batch_size])), dtype=np.float32)
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(parts)

    def predict_proba(self, images: list[Image.Image]) -> np.ndarray:
        """Calibrated class probabilities (N, C): softmax(logits / temperature)."""
        return softmax(self.logits(images), self.temperature).astype(np.float32)

    def top_k(self, image: Image.Image, k: int = 5) -> list[tuple[str, float]]:
        """The k most likely labels for one image with their probabilities, most likely first."""
        proba = self.predict_proba([image])[0]
        order = np.argsort(-proba, kind="stable")[: max(1, min(int(k), len(self.labels)))]
        return [(self.labels[i], float(proba[i])) for i in order]


def model_folder(root: Path) -> Path:
    """The saved-model folder of a run or registry version folder (root/model), or root itself if it is one."""
    root = Path(root)
    model_dir = root / "model" if (root / "model").is_dir() else root
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no saved model in {root} (expected {root / 'model' / 'config.json'}): run the train stage first"
        )
    return model_dir


def read_temperature(model_dir: Path) -> float:
    """The PyTorch model's temperature (calibration.json, fitted on its single-view logits), 1.0 if none."""
    path = Path(model_dir) / "calibration.json"
    return float(json.loads(path.read_text())["temperature"]) if path.is_file() else 1.0


def serving_temperature(root: Path, serving: dict | None) -> float:
    """The temperature fitted on the served ONNX file's own logits (serving.json), else model/calibration.json."""
    if serving is not None and "temperature" in serving:
        return float(serving["temperature"])
    return read_temperature(model_folder(root))


def read_serving(root: Path) -> dict | None:
    """export/serving.json of a run or registry version folder, None if the model was not exported."""
    path = Path(root) / EXPORT_DIR / SERVING_FILE
    return read_json(path, default=None)


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session: full graph optimisation, sequential execution, intra-op threads that sleep
    when idle instead of spinning."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads) if threads else 0
    so.inter_op_num_threads = 1
    # Idle ONNX Runtime threads otherwise spin for a while after each run and take the cores from whatever runs
    # next: another kernel's request, the image decoding of a batch, a PyTorch model in the same process.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_runner(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function pixels (N, 3, S, S) float32 -> logits (N, C) over an ONNX Runtime session."""
    name = session.get_inputs()[0].name

    def run(pixels: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    return run


def torch_runner(model: Any, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A function pixels (N, 3, S, S) float32 -> logits (N, C) over a torch classifier, fp32, inference_mode."""
    import torch

    model = model.to(device).eval()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(device)
            return model(pixel_values=x).logits.float().cpu().numpy()

    return run


def resolve_backend(root: Path, backend: str = "auto", device: str = "cpu") -> str:
    """'auto' means onnx when export/serving.json exists (and the device is the CPU), torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "onnx" if device == "cpu" and read_serving(root) is not None else "torch"


def load_predictor(root: Path, backend: str = "auto", device: str = "cpu", threads: int | None = None) -> Predictor:
    """A calibrated Predictor for a run or registry version folder (holding model/ and maybe export/)."""
    root = Path(root)
    model_dir = model_folder(root)
    labels, spec, temperature = config_labels(model_dir), load_spec(model_dir), read_temperature(model_dir)
    chosen = resolve_backend(root, backend, device)
    if chosen == "onnx":
        if device != "cpu":
            raise ValueError("the onnx backend runs on the CPU only; use backend='torch' for a GPU")
        serving = read_serving(root)
        if serving is None:
            raise FileNotFoundError(f"no {EXPORT_DIR}/{SERVING_FILE} in {root}: run the export stage first")
        path = root / EXPORT_DIR / serving["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{SERVING_FILE} names {serving['file']} but {path} is missing")
        run = onnx_runner(onnx_session(path, threads))
        return Predictor(run, labels, spec, serving_temperature(root, serving), "onnx", str(path))
    import torch

    from lib.model import load_model

    if threads:
        torch.set_num_threads(int(threads))
    run = torch_runner(load_model(model_dir), device)
    return Predictor(run, labels, spec, temperature, "torch", str(model_dir / "model.safetensors"))
