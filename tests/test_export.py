"""Export stage end to end on a tiny model: ONNX files (standard ops and ORT-fused), int8 (dynamic and static),
checks on the validation split, the serving rule, the chosen file measured once on the test split, metrics.json."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import lib.export as E
from lib.export import (
    FP32_FILE,
    INT8_FILE,
    STANDARD_FILE,
    choose_serving,
    choose_variant,
    export_table,
    require_fp32_agreement,
    run_export,
    scale_to_div,
)
from lib.model import build_model, save_model, save_temperature
from lib.params import ExportParams, ModelParams, Params
from lib.pipeline import require_stage
from lib.predict import Predictor, load_predictor, onnx_runner, onnx_session

LABELS = [f"action_{i:02d}" for i in range(15)]
SIZES = {"train": 17, "validation": 22, "test": 30}  # distinct: a split is recognised by its size

torch.set_num_threads(1)


def tiny_split(n: int, seed: int) -> Dataset:  # noqa: F821
    """A split with columns image (datasets Image), label (ClassLabel, 15 names), sha256 (string)."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    images, hashes = [], []
    for _ in range(n):
        w, h = int(rng.integers(48, 128)), int(rng.integers(48, 128))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
        hashes.append(hashlib.sha256(buf.getvalue()).hexdigest())
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=LABELS), "sha256": Value("string")})
    return Dataset.from_dict(
        {"image": images, "label": [i % 15 for i in range(n)], "sha256": hashes}, features=features
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed run folder as evaluate leaves it (prepare, train, evaluate outputs), not exported."""
    from datasets import DatasetDict

    root = tmp_path_factory.mktemp("evaluated")
    DatasetDict({name: tiny_split(n, seed) for seed, (name, n) in enumerate(SIZES.items())}).save_to_disk(
        str(root / "data")
    )
    (root / "data" / "summary.json").write_text("{}")
    torch.manual_seed(0)
    model, processor, spec = build_model(ModelParams(), LABELS)
    save_model(model, processor, spec, root / "model")
    save_temperature(root / "model", 1.5)
    (root / "metrics.json").write_text(json.dumps({"accuracy": 0.1, "f1_weighted": 0.1}))
    (root / "confusion_matrix.png").write_bytes(b"")
    require_stage(root, "evaluate")
    return root


@pytest.fixture(scope="module")
def exported(evaluated: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The evaluated run folder, copied, with the export stage run on it."""
    root = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(evaluated, root)
    return root, run_export(Params(), root)


def test_stage_outputs(exported: tuple[Path, dict]) -> None:
    """The three ONNX files and serving.json exist; the stage counts as completed; no temporary files are left."""
    root, result = exported
    files = sorted(p.name for p in (root / "export").iterdir())
    assert files == sorted([STANDARD_FILE, FP32_FILE, INT8_FILE, "serving.json"])
    require_stage(root, "export")
    serving = json.loads((root / "export" / "serving.json").read_text())
    assert serving["file"] in (FP32_FILE, INT8_FILE)
    assert serving["opset"] == 18 and serving["reason"]
    assert serving == result["serving"]
    assert serving["files"] == {"standard": STANDARD_FILE, "fp32": FP32_FILE, "int8": INT8_FILE}


def test_metrics_json_keeps_other_keys(exported: tuple[Path, dict]) -> None:
    """metrics.json gains an 'export' key with agreement and accuracy figures; earlier keys stay."""
    root, _ = exported
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["accuracy"] == 0.1 and metrics["f1_weighted"] == 0.1
    variants = metrics["export"]["variants"]
    assert set(variants) == {"torch", "standard", "fp32", "int8"}
    for fp in ("standard", "fp32"):
        assert variants[fp]["agreement"] == 1.0
        assert abs(variants[fp]["accuracy_drop"]) < 1e-9
        assert variants[fp]["max_abs_logit_diff"] < 1e-3
    assert 0.0 <= variants["int8"]["agreement"] <= 1.0
    assert variants["int8"]["size_mib"] < variants["fp32"]["size_mib"]
    assert (metrics["export"]["split"], metrics["export"]["images"]) == ("validation", SIZES["validation"])
    assert all(v["latency_ms"] > 0 for v in variants.values())


def test_the_checks_are_measured_on_validation(exported: tuple[Path, dict]) -> None:
    """Every variant's agreement and accuracy in metrics.json["export"] are its figures on the validation images,
    recomputed here from the files themselves."""
    from datasets import load_from_disk

    from lib.model import load_model
    from lib.predict import dataset_logits
    from lib.transforms import load_spec

    root, result = exported
    val = load_from_disk(str(root / "data"))["validation"]
    y = np.asarray(val["label"])
    spec = load_spec(root / "model")
    ref = dataset_logits(load_model(root / "model"), val, spec, batch_size=8, device="cpu", precision="fp32")
    assert result["variants"]["torch"]["accuracy"] == pytest.approx(float(np.mean(ref.argmax(1) == y)))
    for variant, name in (("fp32", FP32_FILE), ("int8", INT8_FILE)):
        pred = Predictor(onnx_runner(onnx_session(root / "export" / name, 1)), LABELS, spec, 1.0, "onnx", name)
        logits = pred.logits(list(val["image"]))
        row = result["variants"][variant]
        assert row["agreement"] == pytest.approx(float(np.mean(logits.argmax(1) == ref.argmax(1)))), variant
        assert row["accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == y))), variant


def split_named_by_size(ds) -> str:
    return next(name for name, n in SIZES.items() if n == len(ds))


@pytest.mark.parametrize(
    ("int8_passes_on", "served"),
    [("validation", INT8_FILE), ("test", FP32_FILE)],
)
def test_the_choice_follows_validation_and_test_is_measured_once_after_it(
    evaluated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, int8_passes_on: str, served: str
) -> None:
    """The int8 file's check figures are made to pass the gate on one split and fail it on the other: the served file
    is the one the validation figures choose; no file is checked on the test split; the chosen file's test figures
    are measured once, after the choice, and reported as served (metrics.json, serving.json)."""
    from datasets import load_from_disk

    from lib.metrics import classification_metrics

    root = tmp_path / "run"
    shutil.copytree(evaluated, root)
    real_check = E.check_exports
    checked = []

    def check_with_int8_figures(model_dir, export_dir, ds, *args, **kwargs):
        check, logits = real_check(model_dir, export_dir, ds, *args, **kwargs)
        split = split_named_by_size(ds)
        checked.append(split)
        good = split == int8_passes_on
        check["variants"]["int8"] |= {"agreement": 1.0 if good else 0.5, "accuracy_drop": 0.0 if good else 0.2}
        return check, logits

    monkeypatch.setattr(E, "check_exports", check_with_int8_figures)
    result = run_export(Params(), root)
    assert checked == ["validation"]
    serving = json.loads((root / "export" / "serving.json").read_text())
    assert serving["file"] == served and serving["decided_on"] == "validation"
    assert "on the validation split" in serving["reason"]
    assert serving["agreement"] == result["variants"]["int8" if served == INT8_FILE else "fp32"]["agreement"]
    assert serving["validation_images"] == SIZES["validation"] and serving["reported_on"] == "test"

    test = load_from_disk(str(root / "data"))["test"]
    y = np.asarray(test["label"])
    pred = load_predictor(root, threads=1)
    assert Path(pred.model_file).name == served
    figures = classification_metrics(y, pred.logits(list(test["image"])).argmax(1), LABELS)
    metrics = json.loads((root / "metrics.json").read_text())
    for key in ("accuracy", "f1_weighted", "f1_macro"):
        assert metrics["served"][key] == pytest.approx(figures[key]), key
        assert serving[f"test_{key}"] == metrics["served"][key], key
    assert (metrics["served"]["decided_on"], metrics["served"]["reported_on"]) == ("validation", "test")
    assert metrics["served"]["test_images"] == serving["test_images"] == SIZES["test"]


def test_attention_is_fused_and_int8_keeps_norms_in_float(exported: tuple[Path, dict]) -> None:
    """fp32: one fused Attention op per block; int8: QAttention + integer MatMuls, LayerNorms left in float."""
    root, result = exported
    layers = ModelParams().config.num_hidden_layers
    assert result["fused_ops"]["Attention"] == layers
    fp32_ops = [n.op_type for n in onnx.load(str(root / "export" / FP32_FILE)).graph.node]
    assert fp32_ops.count("Attention") == layers and "Softmax" not in fp32_ops
    int8_ops = [n.op_type for n in onnx.load(str(root / "export" / INT8_FILE)).graph.node]
    assert int8_ops.count("QAttention") == layers
    assert "MatMulInteger" in int8_ops or "DynamicQuantizeMatMul" in int8_ops
    assert int8_ops.count("SkipLayerNormalization") == fp32_ops.count("SkipLayerNormalization") > 0


def test_standard_file_is_plain_onnx_and_matches_pytorch(exported: tuple[Path, dict]) -> None:
    """model.standard.onnx passes onnx.checker, uses only default-domain ops (no ONNX Runtime contrib op), and onnx's
    own reference evaluator (numpy, no ONNX Runtime) gives PyTorch's logits on test images."""
    from datasets import load_from_disk
    from onnx.reference import ReferenceEvaluator

    from lib.export import check_standard
    from lib.model import load_model
    from lib.transforms import eval_batch, load_spec

    root, result = exported
    path = root / "export" / STANDARD_FILE
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert sorted(check_standard(path)) == result["standard_op_types"]
    assert "Attention" not in result["standard_op_types"] and "Softmax" in result["standard_op_types"]
    test = load_from_disk(str(root / "data"))["test"]
    pixels = eval_batch(list(test[:4]["image"]), load_spec(root / "model"))
    with torch.inference_mode():
        ref = load_model(root / "model")(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    logits = ReferenceEvaluator(proto).run(None, {"pixel_values": pixels})[0]
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4)
    assert (logits.argmax(1) == ref.argmax(1)).all()


def test_fused_file_is_not_standard(exported: tuple[Path, dict]) -> None:
    """check_standard refuses the ORT-fused model.onnx and names its contrib ops."""
    from lib.export import check_standard

    root, _ = exported
    with pytest.raises(ValueError, match=r"com\.microsoft\.Attention"):
        check_standard(root / "export" / FP32_FILE)


def test_dynamic_batch(exported: tuple[Path, dict]) -> None:
    """All three files take any batch size."""
    root, _ = exported
    size = ModelParams().config.image_size
    for name in (STANDARD_FILE, FP32_FILE, INT8_FILE):
        session = onnx_session(root / "export" / name, threads=1)
        for batch in (1, 3):
            x = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
            assert session.run(None, {"pixel_values": x})[0].shape == (batch, 15)


def test_predictor_serves_the_choice(exported: tuple[Path, dict]) -> None:
    """load_predictor on the run folder picks the ONNX backend and the chosen file."""
    root, result = exported
    pred = load_predictor(root, threads=1)
    assert pred.backend == "onnx" and Path(pred.model_file).name == result["serving"]["file"]


def test_served_file_is_calibrated_on_its_own_logits(exported: tuple[Path, dict]) -> None:
    """The predictor's temperature is fitted on the served ONNX file's single-view validation logits (not the PyTorch
    model's T=1.5 from evaluate), and metrics.json reports that file's accuracy and ECE."""
    from datasets import load_from_disk

    from lib.calibration import expected_calibration_error, fit_temperature, softmax

    root, result = exported
    splits = load_from_disk(str(root / "data"))
    pred = load_predictor(root, threads=1)
    val_logits = pred.logits(list(splits["validation"]["image"]))
    expected = fit_temperature(val_logits, np.asarray(splits["validation"]["label"]))
    assert pred.temperature == pytest.approx(expected, rel=1e-4) and abs(pred.temperature - 1.5) > 1e-3
    served = json.loads((root / "metrics.json").read_text())["served"]
    assert served["file"] == f"export/{result['serving']['file']}" and served["backend"] == "onnx"
    test_logits = pred.logits(list(splits["test"]["image"]))
    y = np.asarray(splits["test"]["label"])
    assert served["accuracy"] == pytest.approx(float(np.mean(test_logits.argmax(1) == y)))
    assert served["ece"] == pytest.approx(
        expected_calibration_error(softmax(test_logits, pred.temperature), y), abs=1e-6
    )
    assert (served["test_images"], served["validation_images"]) == (SIZES["test"], SIZES["validation"])


def test_table(exported: tuple[Path, dict]) -> None:
    """The comparison table has one row per variant and marks the served one."""
    _, result = exported
    table = export_table(result)
    assert list(table.index) == ["torch", "standard", "fp32", "int8"]
    assert int(table["serving"].sum()) == 1
    assert "serving" not in export_table({"variants": result["variants"]})  # checked, nothing chosen yet


def test_variants_figure(exported: tuple[Path, dict]) -> None:
    """The notebook's figure: size, latency and agreement, one bar per variant."""
    from lib.plots import export_variants

    _, result = exported
    fig = export_variants(result, min_agreement=0.99)
    assert [len(ax.patches) for ax in fig.axes] == [4, 4, 4]


def test_static_int8_differs_from_dynamic_and_agrees_with_pytorch(exported: tuple[Path, dict], tmp_path: Path) -> None:
    """export.quantize static: a QDQ file calibrated on validation images, another file than the dynamic one, whose
    top-1 class agrees with PyTorch on the validation split as the gate asks of an int8 file."""
    from datasets import load_from_disk

    from lib.transforms import load_spec

    root, dynamic = exported
    val = load_from_disk(str(root / "data"))["validation"]
    pixels = E.calibration_pixels(val, load_spec(root / "model"))
    assert len(pixels) == SIZES["validation"]
    info = E.export_model(root / "model", tmp_path, quantize="static", calibration=pixels)
    assert info["quantize"] == "static" and info["files"]["int8"] == INT8_FILE
    static_file = tmp_path / INT8_FILE
    assert static_file.read_bytes() != (root / "export" / INT8_FILE).read_bytes()
    ops = {n.op_type for n in onnx.load(str(static_file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "DynamicQuantizeLinear" not in ops
    assert not (tmp_path / "model.static-src.onnx").exists()  # the unfused source is removed
    check, _ = E.check_exports(root / "model", tmp_path, val, batch_size=8, threads=1)
    int8 = check["variants"]["int8"]
    assert int8["size_mib"] < check["variants"]["fp32"]["size_mib"]
    ep = ExportParams(quantize="static")
    verdict = next(v for v in E.gate_verdicts(check, ep) if v["variant"] == "int8")
    assert int8["agreement"] >= ep.min_agreement and verdict["passed"], verdict
    assert choose_variant(check, ep)[:2] == (INT8_FILE, "int8")
    with pytest.raises(ValueError, match="calibration images"):
        E.export_model(root / "model", tmp_path / "none", quantize="static", calibration=None)


def test_without_int8_the_teacher_fp32_is_served(exported: tuple[Path, dict]) -> None:
    """No int8 file (quantize none) and no student: nothing is gated, the teacher's fp32 file is served."""
    _, result = exported
    no_int8 = {**result, "variants": {k: v for k, v in result["variants"].items() if k != "int8"}}
    assert choose_variant(no_int8, ExportParams())[:2] == (FP32_FILE, "fp32")


def test_fp32_files_must_agree_with_pytorch() -> None:
    """An fp32 file below min_agreement stops the stage; an empty split has nothing to check."""
    rows = {"standard": {"file": STANDARD_FILE, "agreement": 1.0}, "fp32": {"file": FP32_FILE, "agreement": 0.9}}
    with pytest.raises(RuntimeError, match="fp32 ONNX export .* on the validation split"):
        require_fp32_agreement({"split": "validation", "images": 10, "variants": rows}, 0.99)
    require_fp32_agreement({"split": "validation", "images": 0, "variants": rows}, 0.99)


@pytest.mark.parametrize(
    ("agreement", "drop", "expected"),
    [
        (0.995, 0.001, INT8_FILE),  # both conditions hold
        (0.99, 0.005, INT8_FILE),  # boundaries are inclusive
        (1.0, -0.01, INT8_FILE),  # int8 more accurate than PyTorch
        (0.989, 0.0, FP32_FILE),  # agreement too low
        (0.999, 0.0051, FP32_FILE),  # accuracy drop too large
        (0.5, 0.2, FP32_FILE),  # both fail
        (None, None, FP32_FILE),  # quantization disabled
        (float("nan"), float("nan"), FP32_FILE),  # empty test split
    ],
)
def test_choose_serving(agreement: float | None, drop: float | None, expected: str) -> None:
    """int8 only if agreement >= min_agreement and accuracy drop <= max_accuracy_drop."""
    file, reason = choose_serving(agreement, drop, min_agreement=0.99, max_accuracy_drop=0.005)
    assert file == expected and reason


def test_scale_to_div_rewrites_only_scaled_softmax() -> None:
    """Mul-by-constant feeding a Softmax becomes Div by the reciprocal; other Muls stay."""
    from onnx import TensorProto, helper, numpy_helper

    scale = numpy_helper.from_array(np.array(0.125, np.float32), "scale")
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["s"], name="scores"),
            helper.make_node("Softmax", ["s"], ["p"], axis=-1),
            helper.make_node("Mul", ["p", "scale"], ["y"], name="other"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [scale],
    )
    proto = helper.make_model(graph)
    assert scale_to_div(proto) == 1
    ops = {n.name: n for n in proto.graph.node}
    assert ops["scores"].op_type == "Div" and ops["other"].op_type == "Mul"
    recip = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}[ops["scores"].input[1]]
    assert float(recip) == 8.0


def test_attention_shape_reads_the_vision_tower_and_refuses_per_stage_heads():
    from lib.export import attention_shape

    assert attention_shape({"num_attention_heads": 12, "hidden_size": 768}) == (12, 768)
    siglip = {
        "text_config": {"num_attention_heads": 4, "hidden_size": 64},
        "vision_config": {"num_attention_heads": 6, "hidden_size": 384},
    }
    assert attention_shape(siglip) == (6, 384)
    assert attention_shape({"num_heads": [3, 6, 12, 24], "embed_dim": 96}) == (0, 0)  # Swin: heads per stage
    assert attention_shape({"num_attention_heads": [1, 2], "hidden_size": 8}) == (0, 0)


def test_fuse_checked_falls_back_to_the_plain_export_when_the_fused_file_disagrees(tmp_path, monkeypatch):
    """A fused file that computes something else (here: another model's weights) is not kept as model.onnx."""
    import lib.export as E

    def tiny(seed):
        torch.manual_seed(seed)
        config = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2}
        return build_model(
            ModelParams(source="config", config=config | {"num_attention_heads": 4, "intermediate_size": 64}), ["a"]
        )[0]

    plain = E.export_torchscript(tiny(0), tmp_path / "plain.onnx", 32, 18)
    good = E.fuse_checked(plain, tmp_path / "good.onnx", "vit", 4, 32, 32)
    assert good["applied"] and good["fused_ops"]["Attention"] == 2 and good["max_abs_logit_diff"] < 1e-4
    other = E.export_torchscript(tiny(1), tmp_path / "other.onnx", 32, 18)
    real_fuse = E.fuse_for_ort
    monkeypatch.setattr(E, "fuse_for_ort", lambda raw, dst, *a, **k: real_fuse(other, dst, *a, **k))
    bad = E.fuse_checked(plain, tmp_path / "bad.onnx", "vit", 4, 32, 32)
    assert not bad["applied"] and "differ" in bad["reason"] and bad["max_abs_logit_diff"] > 1e-3
    assert (tmp_path / "bad.onnx").read_bytes() == plain.read_bytes()
    skipped = E.fuse_checked(plain, tmp_path / "convnext.onnx", "convnext", 0, 0, 32)
    assert not skipped["applied"] and skipped["reason"].startswith("convnext:") and skipped["fused_ops"] == {}
    assert (tmp_path / "convnext.onnx").read_bytes() == plain.read_bytes()
