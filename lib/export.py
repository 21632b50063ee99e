"""Export stage: the trained classifier to ONNX (dynamic batch), fused for ONNX Runtime, quantized to int8,
checked against PyTorch on the validation split, and the serving model chosen there by a stated rule; the chosen
file's test metrics are then measured once and reported.

Two fp32 files are kept: model.standard.onnx, the exporter's output with standard ONNX ops only (any runtime that
implements the opset), and model.onnx, fused with ONNX Runtime's contrib ops (Attention, SkipLayerNormalization,
BiasGelu: ONNX Runtime only), which is what is served.

With export.student_layers set, export_student also distils a student with fewer encoder blocks from the trained
model (lib.distill) and exports it the same way into export/student/; the serving gate (choose_variant) then serves
the cheapest variant that passes on the validation split, the teacher's fp32 file when none does.

The test split plays no part in the choice: were the gate measured on it, the figures reported for the chosen file
would be those it was selected for, and optimistic. Only the chosen file is run on the test split (report_served).

The stage's steps are public functions: export_model, export_student, check_exports (with require_fp32_agreement),
choose_variant, report_served, write_results. run_export calls them in order; 03b_export.ipynb calls them one cell
each.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lib.files import MIB
from lib.labels import config_labels
from lib.metrics import update_metrics
from lib.params import ExportParams, Params
from lib.predict import (
    EXPORT_DIR,
    SERVING_FILE,
    Predictor,
    onnx_runner,
    onnx_session,
    read_temperature,
    torch_runner,
)
from lib.transforms import ImageSpec, eval_batch, load_spec

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
STANDARD_FILE = "model.standard.onnx"
STANDARD_DOMAINS = ("", "ai.onnx")  # the default operator set's two spellings
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
# Quantized op types: the projections and MLP (MatMul) and the fused self-attention (-> QAttention).
# LayerNorm, Softmax, GELU, the patch embedding and the classifier head stay in float.
DYNAMIC_OPS = ["MatMul", "Attention"]
STATIC_OPS = ["MatMul"]
DECISION_SPLIT = "validation"  # the split the export checks and the serving gate are measured on
REPORT_SPLIT = "test"  # the split the chosen file's reported figures come from, measured once after the choice


def export_torchscript(model: Any, path: Path, image_size: int, opset: int) -> Path:
    """torch.onnx.export with the TorchScript exporter (it fuses better than dynamo), eager attention, dynamic batch."""
    import torch

    model = model.eval().to("cpu")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    dummy = torch.zeros(1, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def check_standard(path: Path) -> dict[str, int]:
    """onnx.checker on a file and its op types, count each; ValueError if an op is outside the default domain."""
    import onnx

    onnx.checker.check_model(str(path))  # by path: also works above protobuf's 2 GiB limit
    proto = onnx.load(str(path), load_external_data=False)
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain not in STANDARD_DOMAINS})
    if foreign:
        raise ValueError(f"{Path(path).name} holds ops outside the default ONNX domain: {', '.join(foreign)}")
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return dict(sorted(ops.items()))


def scale_to_div(proto: Any) -> int:
    """Rewrite 'scores * c -> Softmax' as 'scores / (1/c)' so ORT's attention fusion recognises the block; return
    the number of rewrites."""
    import onnx
    from onnx import numpy_helper

    producers = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {t.name: t for t in proto.graph.initializer}
    count = 0
    for node in proto.graph.node:
        if node.op_type != "Mul" or not any(c.op_type == "Softmax" for c in consumers.get(node.output[0], [])):
            continue
        scale = node.input[1]
        if scale in inits:
            value = numpy_helper.to_array(inits[scale])
        elif scale in producers and producers[scale].op_type == "Constant":
            value = numpy_helper.to_array(onnx.helper.get_attribute_value(producers[scale].attribute[0]))
        else:
            continue
        if value.size != 1 or float(value.reshape(-1)[0]) == 0.0:
            continue
        name = f"{node.name or node.output[0]}_reciprocal"
        proto.graph.initializer.append(numpy_helper.from_array((1.0 / value).astype(value.dtype), name))
        node.op_type, node.input[1] = "Div", name
        count += 1
    return count


def fuse_for_ort(raw: Path, dst: Path, num_heads: int, hidden_size: int, attention: bool = True) -> dict[str, int]:
    """ORT transformer optimizer (model_type vit): fused Attention, SkipLayerNorm, BiasGelu; return fused op counts."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    proto = onnx.load(str(raw))
    rewrites = scale_to_div(proto)
    options = FusionOptions("vit")
    options.enable_attention = attention
    level = logging.getLogger("onnxruntime.transformers").level
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    try:
        fused = optimize_model(
            proto,
            model_type="vit",
            num_heads=num_heads,
            hidden_size=hidden_size,
            optimization_options=options,
            opt_level=0,
        )
    finally:
        logging.getLogger("onnxruntime.transformers").setLevel(level)
    fused.save_model_to_file(str(dst))
    stats = {k: int(v) for k, v in fused.get_fused_operator_statistics().items() if v}
    return {**stats, "scale_rewrites": rewrites}


# Families whose attention ONNX Runtime's transformer optimizer (model type "vit") fuses into its Attention op, with
# SkipLayerNormalization and BiasGelu / FastGelu around it (tests/test_family_pipeline.py checks it per family).
# For BEiT, DINOv2 and Swin it fuses no attention whichever of its model types is asked (vit, swin, clip, bert;
# tried on tiny models), and ConvNeXt has none: those are served as the plain export, which ONNX Runtime still
# optimises at load time.
ORT_FUSED_FAMILIES = ("vit", "deit", "siglip")
FUSION_ATOL = 1e-3  # fused vs plain logits on random pixels: float reassociation only; a wrong head count is far off


def attention_shape(cfg: dict) -> tuple[int, int]:
    """(heads, hidden size) of a config.json for the attention fusion; SigLIP keeps them in vision_config. (0, 0)
    where there is no single pair (Swin's heads per stage, ConvNeXt)."""
    cfg = cfg.get("vision_config") or cfg
    heads, hidden = cfg.get("num_attention_heads", 0), cfg.get("hidden_size", 0)
    return (heads, hidden) if isinstance(heads, int) and isinstance(hidden, int) else (0, 0)


def fuse_checked(standard: Path, dst: Path, model_type: str, heads: int, hidden: int, size: int) -> dict:
    """model.onnx: fuse_for_ort for the ORT_FUSED_FAMILIES, checked against the plain export on random pixels;
    the plain export itself for other families or when the fused file disagrees. Says which and why."""
    import shutil

    if model_type not in ORT_FUSED_FAMILIES or not heads or not hidden:
        shutil.copyfile(standard, dst)
        return {
            "applied": False,
            "reason": f"{model_type or 'unknown'}: ONNX Runtime's transformer optimizer fuses no attention for this "
            "family; model.onnx is the plain export",
            "fused_ops": {},
        }
    fused = fuse_for_ort(standard, dst, heads, hidden)
    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    plain, got = (onnx_runner(onnx_session(path, 1))(pixels) for path in (standard, dst))
    diff = float(np.max(np.abs(plain - got)))
    if not diff <= FUSION_ATOL * max(1.0, float(np.max(np.abs(plain)))):
        shutil.copyfile(standard, dst)
        return {
            "applied": False,
            "reason": f"fused logits differ from the plain export by {diff:.3g}; model.onnx is the plain export",
            "fused_ops": {},
            "max_abs_logit_diff": diff,
        }
    attention = "" if fused.get("Attention") else "; it fused no attention in this graph"
    return {
        "applied": True,
        "reason": f"{model_type}: ONNX Runtime transformer fusion (model type vit){attention}",
        "fused_ops": fused,
        "max_abs_logit_diff": diff,
    }


class _PixelReader:
    """CalibrationDataReader over preprocessed pixel batches (static quantization)."""

    def __init__(self, pixels: np.ndarray, batch_size: int = 8) -> None:
        self._batches = iter([{INPUT_NAME: pixels[i : i + batch_size]} for i in range(0, len(pixels), batch_size)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_int8(src: Path, dst: Path, mode: str, calibration: np.ndarray | None = None) -> Path:
    """int8 weights: 'dynamic' (MatMul + fused Attention, per-tensor) or 'static' (QDQ MatMul, per-channel,
    calibrated)."""
    import onnx

    extra = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # silences the quantizer's 'consider pre-processing' notice
    try:
        _quantize(src, dst, mode, calibration, extra)
    finally:
        root.setLevel(level)
    return dst


def _quantize(src: Path, dst: Path, mode: str, calibration: np.ndarray | None, extra: dict) -> None:
    """quantize_dynamic / quantize_static with this stage's choices."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=DYNAMIC_OPS,
            per_channel=False,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            extra_options=extra,
        )
    elif mode == "static":
        if calibration is None or not len(calibration):
            raise ValueError("static quantization needs calibration images")
        quantize_static(
            str(src),
            str(dst),
            _PixelReader(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=STATIC_OPS,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=extra,
        )
    else:
        raise ValueError(f"unknown quantization mode {mode!r}")


def dataset_images(ds: Any, start: int, stop: int) -> list[Any]:
    """Decoded PIL images ds[start:stop]."""
    return list(ds[start:stop]["image"])


def predictor_logits(predictor: Predictor, ds: Any, batch_size: int = 32, progress: str | None = None) -> np.ndarray:
    """Logits (N, C) of a dataset split through a Predictor (batched; same eval_transform as evaluation); progress
    names a progress bar over the batches."""
    from tqdm.auto import tqdm

    starts = tqdm(range(0, len(ds), batch_size), desc=progress, unit="batch", disable=progress is None)
    parts = [predictor.logits(dataset_images(ds, i, min(i + batch_size, len(ds)))) for i in starts]
    return np.concatenate(parts) if parts else np.zeros((0, len(predictor.labels)), np.float32)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose top-1 class is the same in both logit arrays."""
    return float(np.mean(np.argmax(a, 1) == np.argmax(b, 1))) if len(a) else float("nan")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float(np.mean(np.argmax(logits, 1) == np.asarray(labels))) if len(logits) else float("nan")


def choose_serving(
    agreement_int8: float | None,
    accuracy_drop_int8: float | None,
    min_agreement: float,
    max_accuracy_drop: float,
) -> tuple[str, str]:
    """(file, reason) for the teacher alone: int8 only if its top-1 agreement >= min_agreement and accuracy drop <=
    max_accuracy_drop (choose_variant's gate with no student)."""
    rows = {"fp32": {"file": FP32_FILE, "layers": None, "precision": "fp32"}}
    if agreement_int8 is not None and accuracy_drop_int8 is not None:
        rows["int8"] = {
            "file": INT8_FILE,
            "agreement": agreement_int8,
            "accuracy_drop": accuracy_drop_int8,
            "layers": None,
            "precision": "int8",
        }
    ep = ExportParams(min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop)
    file, _, reason = choose_variant({"variants": rows}, ep)
    return file, reason


def latency_ms(predictor: Predictor, images: list[Any], warmup: int = 2) -> float:
    """Median milliseconds per image of predict_proba on one image at a time (preprocessing included)."""
    for im in images[:warmup]:
        predictor.predict_proba([im])
    times = []
    for im in images:
        start = time.perf_counter()
        predictor.predict_proba([im])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3) if times else float("nan")


def size_mib(path: Path) -> float:
    """File size in MiB."""
    return round(Path(path).stat().st_size / MIB, 1)


def export_model(
    model_dir: Path,
    export_dir: Path,
    opset: int = 18,
    quantize: str = "dynamic",
    calibration: np.ndarray | None = None,
) -> dict:
    """Write export_dir/model.standard.onnx (standard ops), model.onnx (fused fp32) and, unless quantize='none',
    model.int8.onnx; return what was done."""
    from lib.model import load_model

    model_dir, export_dir = Path(model_dir), Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    for stale in (SERVING_FILE, STANDARD_FILE, FP32_FILE, INT8_FILE):
        (export_dir / stale).unlink(missing_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    spec = load_spec(model_dir)
    standard = export_dir / STANDARD_FILE
    heads, hidden = attention_shape(cfg)
    model_type = str(cfg.get("model_type", ""))
    start = time.time()
    # At the training resolution (spec.size): position embeddings made for another grid (DINOv2's 518 px) are
    # interpolated to it inside the graph; only the batch dimension is dynamic.
    export_torchscript(load_model(model_dir), standard, spec.size, opset)
    standard_ops = check_standard(standard)
    fusion = fuse_checked(standard, export_dir / FP32_FILE, model_type, heads, hidden, spec.size)
    info = {
        "opset": opset,
        "quantize": quantize,
        "model_type": model_type,
        "fusion": {k: v for k, v in fusion.items() if k != "fused_ops"},
        "fused_ops": fusion["fused_ops"],
        "standard_op_types": sorted(standard_ops),
        "files": {"standard": STANDARD_FILE, "fp32": FP32_FILE},
    }
    if quantize != "none":
        src = export_dir / FP32_FILE
        if quantize == "static" and fusion["applied"]:  # QDQ MatMuls over the unfused attention; ORT fuses them
            src = export_dir / "model.static-src.onnx"  # into integer ops at load
            fuse_for_ort(standard, src, heads, hidden, attention=False)
        quantize_int8(src, export_dir / INT8_FILE, quantize, calibration)
        if src.name != FP32_FILE:
            src.unlink()
        info["files"]["int8"] = INT8_FILE
    info["seconds"] = round(time.time() - start, 1)
    return info


def encoder_depth(model: Any) -> int | None:
    """Encoder blocks of a classifier (lib.model's FAMILIES table), None for a family the table does not know."""
    from lib.model import encoder_layers

    try:
        return len(encoder_layers(model))
    except ValueError:
        return None


def _file_row(
    path: Path, name: str, model_dir: Path, ds: Any, ref: np.ndarray, batch_size: int, threads: int | None, timing: list
) -> tuple[dict, np.ndarray]:
    """One ONNX file on a split: its row (size, agreement with the reference logits, accuracy, delta, latency) without
    the accuracy drop, and its logits."""
    labels, spec, temperature = config_labels(model_dir), load_spec(model_dir), read_temperature(model_dir)
    pred = Predictor(onnx_runner(onnx_session(path, threads)), labels, spec, temperature, "onnx", str(path))
    logits = predictor_logits(pred, ds, batch_size, progress=name)
    y = np.asarray(ds["label"]) if len(ds) else np.zeros(0, int)
    row = {
        "file": name,
        "size_mib": size_mib(path),
        "agreement": agreement(logits, ref),
        "accuracy": accuracy(logits, y),
        "max_abs_logit_diff": float(np.max(np.abs(logits - ref))) if len(ref) else float("nan"),
        "latency_ms": latency_ms(pred, timing),
    }
    return row, logits


def check_exports(
    model_dir: Path,
    export_dir: Path,
    ds: Any,
    batch_size: int = 32,
    latency_images: int = 12,
    threads: int | None = None,
    student_dir: Path | None = None,
    split: str = DECISION_SPLIT,
) -> tuple[dict, dict[str, np.ndarray]]:
    """PyTorch (fp32) and each ONNX file on a split (ds, named by split): agreement, accuracy, delta, size, latency
    per image, encoder blocks and precision; and the logits of each variant on the split (the served variant's
    temperature is fitted on them).

    student_dir (export/student, as export_student leaves it): its fp32 and int8 files are checked too, as variants
    student_fp32 and student_int8: agreement with the trained (teacher) PyTorch model, accuracy drop against it, and
    agreement_pytorch, the agreement with the student's own PyTorch model (an export check).
    """
    from lib.model import load_model
    from lib.predict import dataset_logits

    model_dir, export_dir = Path(model_dir), Path(export_dir)
    labels, spec, temperature = config_labels(model_dir), load_spec(model_dir), read_temperature(model_dir)
    model = load_model(model_dir)
    depth = encoder_depth(model)
    y = np.asarray(ds["label"]) if len(ds) else np.zeros(0, int)

    def pytorch_logits(m: Any, name: str) -> np.ndarray:
        if not len(ds):
            return np.zeros((0, len(labels)))
        return dataset_logits(m, ds, spec, batch_size=batch_size, device="cpu", precision="fp32", progress=name)

    ref = pytorch_logits(model, "pytorch")
    torch_pred = Predictor(
        torch_runner(model, "cpu"), labels, spec, temperature, "torch", str(model_dir / "model.safetensors")
    )
    timing = dataset_images(ds, 0, min(latency_images, len(ds)))
    acc_ref = accuracy(ref, y)
    kept = {"torch": ref}
    rows = {
        "torch": {
            "file": "model/model.safetensors",
            "size_mib": size_mib(model_dir / "model.safetensors"),
            "agreement": 1.0,
            "accuracy": acc_ref,
            "accuracy_drop": 0.0,
            "latency_ms": latency_ms(torch_pred, timing),
            "layers": depth,
            "precision": "fp32",
        }
    }
    for variant, name in (("standard", STANDARD_FILE), ("fp32", FP32_FILE), ("int8", INT8_FILE)):
        path = export_dir / name
        if not path.is_file():
            continue
        row, kept[variant] = _file_row(path, name, model_dir, ds, ref, batch_size, threads, timing)
        precision = "int8" if variant == "int8" else "fp32"
        rows[variant] = {**row, "accuracy_drop": acc_ref - row["accuracy"], "layers": depth, "precision": precision}
    student_model = Path(student_dir) / "model" if student_dir is not None else None
    if student_model is not None and (student_model / "config.json").is_file():
        student = load_model(student_model)
        own = pytorch_logits(student, "student pytorch")
        for variant, name in (("student_fp32", FP32_FILE), ("student_int8", INT8_FILE)):
            path = Path(student_dir) / name
            if not path.is_file():
                continue
            row, kept[variant] = _file_row(
                path, f"{path.parent.name}/{name}", student_model, ds, ref, batch_size, threads, timing
            )
            rows[variant] = {
                **row,
                "accuracy_drop": acc_ref - row["accuracy"],
                "agreement_pytorch": agreement(kept[variant], own),
                "layers": encoder_depth(student),
                "precision": "int8" if variant.endswith("int8") else "fp32",
            }
    return {"split": split, "images": int(len(ds)), "variants": rows}, kept


def report_served(model_dir: Path, path: Path, val: Any, val_logits: np.ndarray, test: Any, p: Params) -> dict:
    """What the chosen ONNX file achieves, once the choice is made: its temperature fitted on its single-view
    validation logits (val_logits, from check_exports; T = 1 with evaluate.calibrate off), and its test accuracy,
    F1 (weighted, macro), ECE and NLL from its logits on the test split, which is run here and nowhere before.
    """
    from lib.calibration import served_calibration

    pred = Predictor(
        onnx_runner(onnx_session(path)), config_labels(model_dir), load_spec(model_dir), 1.0, "onnx", str(path)
    )
    test_logits = predictor_logits(pred, test, p.evaluate.batch_size, progress=REPORT_SPLIT)
    fit = p.evaluate.calibrate and len(val) > 0
    served = served_calibration(val_logits, np.asarray(val["label"]), test_logits, np.asarray(test["label"]), fit=fit)
    return {"decided_on": DECISION_SPLIT, "reported_on": REPORT_SPLIT, **served}


def calibration_pixels(ds: Any, spec: ImageSpec, n: int = 64) -> np.ndarray:
    """Up to n evenly spaced images of a split, preprocessed, for static quantization."""
    if not len(ds):
        return np.zeros((0, 3, spec.size, spec.size), np.float32)
    idx = np.unique(np.linspace(0, len(ds) - 1, num=min(n, len(ds))).astype(int))
    return eval_batch([ds[int(i)]["image"] for i in idx], spec)


def require_fp32_agreement(check: dict, min_agreement: float) -> None:
    """Raise RuntimeError when an fp32 file (standard or fused) disagrees with PyTorch on the checked split.

    Both files are published and neither is quantized, so anything beyond float noise is an export bug.
    """
    rows, where = check["variants"], _on_split(check)
    for fp in ("standard", "fp32"):
        if check["images"] and rows[fp]["agreement"] < min_agreement:
            raise RuntimeError(
                f"the {fp} ONNX export ({rows[fp]['file']}) disagrees with PyTorch (top-1 agreement "
                f"{rows[fp]['agreement']:.4f}{where}): not publishing it"
            )
    # A student's fp32 file answers to the student's own PyTorch model (its agreement with the teacher is the gate's).
    student = rows.get("student_fp32")
    if student and check["images"] and student["agreement_pytorch"] < min_agreement:
        raise RuntimeError(
            f"the student's fp32 ONNX export ({student['file']}) disagrees with the student's PyTorch model (top-1 "
            f"agreement {student['agreement_pytorch']:.4f}{where}): not publishing it"
        )


def _on_split(check: dict) -> str:
    """' on the <split> split' for messages about a check, '' for a check that does not name its split."""
    return f" on the {check['split']} split" if check.get("split") else ""


# Variants the gate may serve. The teacher's fp32 model.onnx is the fallback: it is served when none of these passes,
# and only require_fp32_agreement (an export check) stands before it.
GATED_VARIANTS = ("int8", "student_int8", "student_fp32")


def variant_cost(row: dict) -> tuple[float, int]:
    """Sort key of a variant by compute: fewer encoder blocks first, then int8 before fp32 at the same depth.

    Compute is a property of the file; measured latency moves with the machine's load from run to run, and a choice
    made on it would not be reproducible. An unknown depth (a family lib.model does not list) sorts last.
    """
    layers = row.get("layers")
    return (float("inf") if layers is None else float(layers), 0 if row.get("precision") == "int8" else 1)


def gate_verdicts(check: dict, ep: ExportParams) -> list[dict]:
    """Every gated variant of a check, cheapest first (variant_cost), with whether it passes the gate and why.

    Passing: accuracy drop against the trained PyTorch model <= export.max_accuracy_drop, and top-1 agreement with it
    >= export.min_agreement for the teacher's int8 file, >= export.min_student_agreement for a student's files, both
    measured on the check's split (run_export: validation).
    """
    rows = check["variants"]
    verdicts = []
    for variant in sorted((v for v in rows if v in GATED_VARIANTS), key=lambda v: variant_cost(rows[v])):
        row = rows[variant]
        need = ep.min_student_agreement if variant.startswith("student") else ep.min_agreement
        agree, drop = float(row["agreement"]), float(row["accuracy_drop"])
        if not np.isfinite(agree) or not np.isfinite(drop):
            passed, why = False, f"could not be checked (empty {check.get('split', 'checked')} split)"
        elif agree < need:
            passed, why = False, f"top-1 agreement {agree:.4f} < {need}"
        elif drop > ep.max_accuracy_drop + 1e-12:
            passed, why = False, f"accuracy drop {drop:.4f} > {ep.max_accuracy_drop}"
        else:
            passed, why = True, f"agreement {agree:.4f} >= {need}, accuracy drop {drop:.4f} <= {ep.max_accuracy_drop}"
        verdicts.append(
            {
                "variant": variant,
                "file": row["file"],
                "layers": row.get("layers"),
                "precision": row.get("precision"),
                "passed": passed,
                "reason": why,
            }
        )
    return verdicts


def choose_variant(check: dict, ep: ExportParams) -> tuple[str, str, str]:
    """(file, variant, reason): the cheapest gated variant that passes (gate_verdicts), else the teacher's fp32 ONNX;
    the reason names the split the gate was measured on."""
    verdicts, where = gate_verdicts(check, ep), _on_split(check)
    if not verdicts:
        return FP32_FILE, "fp32", "no int8 model (quantization disabled) and no student: serving fp32 ONNX"
    chosen = next((v for v in verdicts if v["passed"]), None)
    cheaper = verdicts[: verdicts.index(chosen)] if chosen else verdicts  # all of them fail
    failing = "; ".join(f"{v['variant']}: {v['reason']}" for v in cheaper)
    if chosen is None:
        reason = f"no variant passes the gate{where} ({failing}): serving the trained model's fp32 ONNX"
        return FP32_FILE, "fp32", reason
    reason = f"{chosen['variant']} is the cheapest variant passing the gate{where} ({chosen['reason']})"
    if cheaper:
        reason += f"; cheaper variants fail ({failing})"
    return chosen["file"], chosen["variant"], f"{reason}: serving {chosen['file']}"


def export_student(p: Params, out: Path, calibration: np.ndarray | None = None) -> dict | None:
    """With export.student_layers set: distil a student from <run>/model (lib.distill, the train stage's Trainer) and
    export it like the teacher into export/student/ (model.standard.onnx, model.onnx, model.int8.onnx; the student's
    PyTorch folder in model/); return its distillation summary and export info. None without a student. A student
    folder left by an earlier run is removed first either way."""
    import shutil

    from lib.distill import run_distillation, student_dir

    work = student_dir(out)
    shutil.rmtree(work, ignore_errors=True)
    if p.export.student_layers is None:
        return None
    ep = p.export
    distillation = run_distillation(p, out)
    return {"distillation": distillation, **export_model(work / "model", work, ep.opset, ep.quantize, calibration)}


def write_results(
    out: Path,
    info: dict,
    check: dict,
    file: str,
    reason: str,
    served: dict,
    ep: ExportParams,
    student: dict | None = None,
) -> dict:
    """Write export/serving.json (what the predictor loads) and metrics.json["export"] and ["served"]; return the
    export result (export info, checks, serving; the student's distillation and export info when there is one).

    check is the decision split's (check_exports); served is report_served's. serving.json keeps both apart: the
    gate's figures (agreement, accuracy_drop, validation_*) under decided_on, the chosen file's test figures (test_*)
    under reported_on; metrics.json["served"] holds the test figures (accuracy, f1_weighted, f1_macro, ece) alone.
    """
    from lib.distill import STUDENT_DIR

    out = Path(out)
    variant = next(v for v, row in check["variants"].items() if row["file"] == file)
    chosen, torch_row = check["variants"][variant], check["variants"]["torch"]
    # every file of export/ by variant; "standard" runs on any ONNX runtime (the others need ONNX Runtime)
    files = dict(info["files"])
    if student:
        files |= {f"student_{k}": f"{STUDENT_DIR}/{name}" for k, name in student["files"].items()}
    split = check.get("split", DECISION_SPLIT)
    serving = {
        "file": file,
        "variant": variant,
        "reason": reason,
        "layers": chosen.get("layers"),
        "decided_on": split,
        f"{split}_images": check["images"],
        "agreement": chosen["agreement"],
        "accuracy_drop": chosen["accuracy_drop"],
        f"{split}_accuracy": chosen["accuracy"],
        f"{split}_accuracy_torch": torch_row["accuracy"],
        "reported_on": served.get("reported_on", REPORT_SPLIT),
        "test_images": served["test_images"],
        **{f"test_{k}": served[k] for k in ("accuracy", "f1_weighted", "f1_macro")},
        "min_agreement": ep.min_agreement,
        "min_student_agreement": ep.min_student_agreement,
        "max_accuracy_drop": ep.max_accuracy_drop,
        "gate": gate_verdicts(check, ep),  # every candidate, cheapest first, passed or not and why (decided_on)
        "quantize": ep.quantize,
        "opset": ep.opset,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "temperature": served["temperature"],
        "files": files,
    }
    result = {**info, **check, **({"student": student} if student else {}), "serving": serving}
    update_metrics(
        out / "metrics.json",
        {
            "export": result,
            "served": {
                "backend": "onnx",
                "variant": variant,
                "file": f"{EXPORT_DIR}/{file}",
                "reason": reason,
                "layers": chosen.get("layers"),
                **served,
            },
        },
    )
    # Last: serving.json marks the stage's outputs as complete (a crash before it leaves no servable export).
    (out / EXPORT_DIR / SERVING_FILE).write_text(json.dumps(serving, indent=2))
    return result


def run_export(p: Params, out: Path) -> dict:
    """The export stage in one call, the steps 03b_export.ipynb shows one by one: export, fuse and quantize; distil and
    export the student (export.student_layers); check every file against PyTorch on the validation split; choose the
    serving file there; calibrate it on validation and measure it once on the test split; write serving.json and
    metrics."""
    from lib.data import load_splits
    from lib.distill import student_dir

    out = Path(out)
    model_dir, export_dir = out / "model", out / EXPORT_DIR
    ep = p.export
    splits = load_splits(out / "data")
    calibration = calibration_pixels(splits["validation"], load_spec(model_dir)) if ep.quantize == "static" else None
    info = export_model(model_dir, export_dir, ep.opset, ep.quantize, calibration)
    student = export_student(p, out, calibration)
    val = splits[DECISION_SPLIT]
    check, logits = check_exports(
        model_dir,
        export_dir,
        val,
        batch_size=p.evaluate.batch_size,
        student_dir=student_dir(out) if student else None,
        split=DECISION_SPLIT,
    )
    require_fp32_agreement(check, ep.min_agreement)
    file, variant, reason = choose_variant(check, ep)
    served = report_served(model_dir, export_dir / file, val, logits[variant], splits[REPORT_SPLIT], p)
    return write_results(out, info, check, file, reason, served, ep, student)


def export_table(result: dict) -> Any:
    """The variants of a check or export result as a pandas DataFrame (encoder blocks, precision, size, agreement,
    accuracy, latency), with the gate's verdict and a serving column once the result holds the choice."""
    import pandas as pd

    table = pd.DataFrame(result["variants"]).T
    cols = ["file", "layers", "precision", "size_mib", "agreement", "accuracy", "accuracy_drop", "latency_ms"]
    cols = [c for c in cols if c in table.columns]  # a check from before layers and precision were recorded
    if "serving" in result:
        verdicts = {v["variant"]: "passes" if v["passed"] else "fails" for v in result["serving"].get("gate", [])}
        table["gate"] = [verdicts.get(v, "") for v in table.index]  # blank: not a gated variant (PyTorch, fp32 files)
        table["serving"] = table["file"] == result["serving"]["file"]
        cols += ["gate", "serving"]
    return table[cols]
