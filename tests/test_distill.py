"""The student: cut from the teacher's own blocks, distilled through the train stage's Trainer, exported and offered to
the serving gate, which serves the cheapest variant that passes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.distill import build_student, distillation_loss, kept_blocks
from lib.export import FP32_FILE, INT8_FILE, choose_variant, export_table, gate_verdicts, run_export
from lib.model import encoder_layers
from lib.params import ExportParams, ModelParams, Params, TrainParams
from lib.train import soft_cross_entropy

torch.set_num_threads(1)
LABELS = ["clapping", "running", "sitting"]
SIDE = 32


def kl_to_teacher(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float = 1.0) -> float:
    """Mean KL(teacher || student) over the rows of two logit arrays, at a temperature (NumPy, float64)."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64) / temperature
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_s, log_t = log_softmax(student_logits), log_softmax(teacher_logits)
    return float(np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=-1)))


def tiny_vit(layers: int = 5, hidden: int = 16, seed: int = 0):
    """A seeded random ViT classifier for the 3 labels."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.ViTConfig(
        image_size=SIDE,
        patch_size=8,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        num_labels=len(LABELS),
    )
    return tf.ViTForImageClassification(cfg).eval()


# ----------------------------------------------------------------------------------------------- building a student


@pytest.mark.parametrize(
    ("total", "keep", "expected"),
    [
        (12, 6, [0, 2, 4, 7, 9, 11]),
        (12, 4, [0, 4, 7, 11]),
        (4, 2, [0, 3]),
        (5, 3, [0, 2, 4]),
        (3, 1, [2]),
        (3, 3, [0, 1, 2]),
    ],
)
def test_kept_blocks_spread_from_the_first_to_the_last(total: int, keep: int, expected: list[int]) -> None:
    assert kept_blocks(total, keep) == expected


@pytest.mark.parametrize("keep", [0, 6])
def test_kept_blocks_refuses_impossible_depths(keep: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 5"):
        kept_blocks(5, keep)


def test_student_blocks_equal_the_chosen_teacher_blocks_before_distillation() -> None:
    """Every weight of student block i is teacher block kept_blocks[i]'s; embeddings, final norm and head are the
    teacher's; the teacher keeps its 5 blocks and does not share storage with the student."""
    teacher = tiny_vit(layers=5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_student(teacher, 3)
    t_blocks, s_blocks = encoder_layers(teacher), encoder_layers(student)
    assert (len(t_blocks), len(s_blocks)) == (5, 3)
    assert student.config.num_hidden_layers == 3 and student.config.distilled_from_blocks == [0, 2, 4]
    for s_block, t_index in zip(s_blocks, [0, 2, 4]):
        t_state, s_state = t_blocks[t_index].state_dict(), s_block.state_dict()
        assert list(s_state) == list(t_state)
        for name in t_state:
            assert torch.equal(s_state[name], t_state[name]), name
    # Everything outside the blocks is the teacher's too, and a dropped block's weights are gone.
    outside = {k: v for k, v in teacher.state_dict().items() if ".layers." not in k and ".layer." not in k}
    s_state = student.state_dict()
    assert outside and all(torch.equal(s_state[k], v) for k, v in outside.items())
    assert not torch.equal(next(t_blocks[1].parameters()), next(t_blocks[2].parameters()))  # blocks differ
    with torch.no_grad():
        next(s_blocks[0].parameters()).add_(1.0)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())
    logits = student(pixel_values=torch.zeros(2, 3, SIDE, SIDE)).logits
    assert logits.shape == (2, len(LABELS))


def test_a_saved_student_loads_with_its_own_depth(tmp_path: Path) -> None:
    """config.json carries the student's depth: from_pretrained rebuilds it with the same outputs."""
    from lib.model import load_model

    student = build_student(tiny_vit(layers=4), 2)
    student.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    x = torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    assert len(encoder_layers(loaded)) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, student(pixel_values=x).logits)


def test_families_without_a_student_are_refused_by_name() -> None:
    """Swin's stages differ in width: no student; a family lib.model does not list: refused by its name."""
    import transformers as tf

    swin = tf.SwinForImageClassification(
        tf.SwinConfig(image_size=SIDE, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2)
    )
    with pytest.raises(ValueError, match="swin"):
        build_student(swin, 1)
    resnet = tf.ResNetForImageClassification(tf.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8))
    with pytest.raises(ValueError, match="'resnet' is not supported"):
        build_student(resnet, 1)


# ----------------------------------------------------------------------------------------------- the loss


def test_distillation_loss_mixes_kl_and_label_loss() -> None:
    """alpha 0: the label loss alone; alpha 1: T^2 x KL, zero for the teacher's own logits; sum = mean x batch."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 3, generator=g), 3 * torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ce = soft_cross_entropy(student, labels, 0.1)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, 2.0, 0.0, 0.1), ce)
    assert float(distillation_loss(teacher, teacher, labels, 3.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    t = 2.5
    kl = kl_to_teacher(student.numpy(), teacher.numpy(), temperature=t)
    assert float(distillation_loss(student, teacher, labels, t, 1.0)) == pytest.approx(t * t * kl, rel=1e-5)
    mixed = distillation_loss(student, teacher, labels, t, 0.3, 0.1)
    assert float(mixed) == pytest.approx(0.3 * t * t * kl + 0.7 * float(ce), rel=1e-5)
    assert float(distillation_loss(student, teacher, labels, t, 0.3, 0.1, reduction="sum")) == pytest.approx(
        6 * float(mixed), rel=1e-5
    )


# ----------------------------------------------------------------------------------------------- the gate


def row(file: str, layers: int, precision: str, agreement: float, drop: float, latency: float = 10.0) -> dict:
    return {
        "file": file,
        "layers": layers,
        "precision": precision,
        "agreement": agreement,
        "accuracy_drop": drop,
        "latency_ms": latency,
    }


def variants(**over: dict) -> dict:
    """A checked export: teacher (4 blocks) fp32 and int8, student (2 blocks) fp32 and int8, all passing unless
    overridden; listed expensive first so that the order of the rows cannot decide."""
    rows = {
        "torch": row("model/model.safetensors", 4, "fp32", 1.0, 0.0),
        "fp32": row(FP32_FILE, 4, "fp32", 1.0, 0.0),
        "int8": row(INT8_FILE, 4, "int8", 0.995, 0.0, latency=1.0),  # the fastest measured: latency does not decide
        "student_fp32": row("student/model.onnx", 2, "fp32", 0.97, 0.004),
        "student_int8": row("student/model.int8.onnx", 2, "int8", 0.96, 0.005),
    }
    return {"split": "validation", "images": 200, "variants": {k: {**v, **over.get(k, {})} for k, v in rows.items()}}


EP = ExportParams(min_agreement=0.99, min_student_agreement=0.95, max_accuracy_drop=0.005, student_layers=2)


@pytest.mark.parametrize(
    ("over", "file", "variant"),
    [
        ({}, "student/model.int8.onnx", "student_int8"),  # cheapest passes (boundaries inclusive)
        ({"student_int8": {"accuracy_drop": 0.006}}, "student/model.onnx", "student_fp32"),
        ({"student_int8": {"agreement": 0.94}}, "student/model.onnx", "student_fp32"),
        # a student's 0.97 passes its own threshold, but the teacher's int8 needs 0.99
        ({"student_int8": {"agreement": 0.5}, "int8": {"agreement": 0.97}}, "student/model.onnx", "student_fp32"),
        ({"student_int8": {"agreement": 0.5}, "student_fp32": {"accuracy_drop": 0.02}}, INT8_FILE, "int8"),
        (
            {"student_int8": {"agreement": 0.5}, "student_fp32": {"agreement": 0.9}, "int8": {"agreement": 0.98}},
            FP32_FILE,
            "fp32",
        ),
        ({"student_int8": {"accuracy_drop": -0.01}}, "student/model.int8.onnx", "student_int8"),  # better than teacher
    ],
)
def test_the_gate_serves_the_cheapest_passing_variant(over: dict, file: str, variant: str) -> None:
    chosen_file, chosen, reason = choose_variant(variants(**over), EP)
    assert (chosen_file, chosen) == (file, variant)
    assert reason.endswith(f"serving {file}" if variant != "fp32" else "serving the trained model's fp32 ONNX")


def test_the_gate_falls_back_to_the_teacher_and_says_why() -> None:
    """No variant passes: fp32 teacher, and the reason names every failed variant and the split; NaN figures (an
    empty validation split) never pass; without int8 and student the teacher's fp32 file is all there is."""
    failing = {"student_int8": {"agreement": 0.9}, "student_fp32": {"accuracy_drop": 0.05}, "int8": {"agreement": 0.9}}
    file, variant, reason = choose_variant(variants(**failing), EP)
    assert (file, variant) == (FP32_FILE, "fp32")
    assert reason.startswith("no variant passes the gate on the validation split")
    assert "student_int8: top-1 agreement 0.9000 < 0.95" in reason and "student_fp32: accuracy drop 0.0500" in reason
    assert "int8: top-1 agreement 0.9000 < 0.99" in reason
    nan = {
        k: {"agreement": float("nan"), "accuracy_drop": float("nan")} for k in ("int8", "student_fp32", "student_int8")
    }
    assert choose_variant(variants(**nan), EP)[:2] == (FP32_FILE, "fp32")
    reasons = {v["reason"] for v in gate_verdicts(variants(**nan), EP)}
    assert reasons == {"could not be checked (empty validation split)"}
    alone = {"variants": {k: v for k, v in variants()["variants"].items() if k in ("torch", "fp32")}}
    assert choose_variant(alone, EP)[:2] == (FP32_FILE, "fp32")


def test_gate_verdicts_are_ordered_by_compute() -> None:
    """Fewer blocks first, int8 before fp32 at one depth; PyTorch and the fp32 files are not candidates."""
    verdicts = gate_verdicts(variants(student_int8={"agreement": 0.9}), EP)
    assert [v["variant"] for v in verdicts] == ["student_int8", "student_fp32", "int8"]
    assert [v["passed"] for v in verdicts] == [False, True, True]


# ----------------------------------------------------------------------------------------------- distillation, export


def demo_split(n: int, seed: int):
    """n generated stick-figure images of the 3 labels (the demo's generator), as a datasets split."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    from lib.demo.synthetic import render

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % len(LABELS)
        buf = io.BytesIO()
        render([2, 10, 11][label], rng, (48, 48)).save(buf, format="PNG")  # clapping, running, sitting
        images.append({"bytes": buf.getvalue(), "path": None})
        labels.append(label)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=LABELS), "sha256": Value("string")})
    return Dataset.from_dict(
        {"image": images, "label": labels, "sha256": [str(i) for i in range(n)]}, features=features
    )


def run_folder(root: Path, layers: int) -> Path:
    """A run folder as evaluate leaves it: data/ (train 21, validation 8, test 11) and a saved opinionated teacher.

    The teacher's weights are random but large (std 0.3, not 0.02), so its logits are far from uniform and a
    student without its middle blocks disagrees with it: there is something to distil.
    """
    from datasets import DatasetDict

    from lib.model import build_model, save_model
    from lib.pipeline import require_stage

    DatasetDict({"train": demo_split(21, 0), "validation": demo_split(8, 1), "test": demo_split(11, 2)}).save_to_disk(
        str(root / "data")
    )
    (root / "data" / "summary.json").write_text("{}")
    teacher = tiny_vit(layers=layers, hidden=32)
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if name.endswith("weight") and param.ndim == 2:
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    config = {"image_size": SIDE, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": layers}
    _, processor, spec = build_model(ModelParams(config=config | {"num_attention_heads": 2}), LABELS)
    save_model(teacher, processor, spec, root / "model")
    (root / "metrics.json").write_text(json.dumps({"accuracy": 0.4, "f1_weighted": 0.4}))
    (root / "confusion_matrix.png").write_bytes(b"")
    require_stage(root, "evaluate")
    return root


def params(**export: object) -> Params:
    """The run's params: a short CPU recipe (no tracker), the given export keys."""
    train = TrainParams(batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, torch_threads=1, report_to=["none"])
    return Params(train=train, evaluate={"batch_size": 16}, export=ExportParams(**export))


def split_logits(model, ds, root: Path) -> np.ndarray:
    """A model's logits on a split, with the run's evaluation transform."""
    from lib.predict import dataset_logits
    from lib.transforms import load_spec

    return dataset_logits(model, ds, load_spec(root / "model"), batch_size=16, device="cpu", precision="fp32")


@pytest.mark.integration
def test_distillation_reduces_the_kl_divergence_to_the_teacher(tmp_path: Path) -> None:
    """The cut student before distillation vs after, on the training images and on the test images it never saw."""
    from datasets import load_from_disk

    from lib.distill import distill, student_dir
    from lib.model import load_model

    root = run_folder(tmp_path, layers=4)
    teacher = load_model(root / "model")
    splits = load_from_disk(str(root / "data"))
    ref = {s: split_logits(teacher, splits[s], root) for s in ("train", "test")}
    cut = build_student(teacher, 2)
    before = {s: kl_to_teacher(split_logits(cut, splits[s], root), ref[s]) for s in ref}
    summary = distill(params(student_layers=2, distill_epochs=10, distill_alpha=1.0), root)
    student = load_model(student_dir(root) / "model")
    after = {s: kl_to_teacher(split_logits(student, splits[s], root), ref[s]) for s in ref}
    assert before["train"] > 0.05  # the cut student really differs from the teacher
    assert after["train"] < 0.5 * before["train"], (before, after)
    assert after["test"] < before["test"], (before, after)
    assert summary["kept_blocks"] == [0, 3] and summary["global_steps"] == 10 * 3  # 21 images, batch 8: 3 steps
    assert not (student_dir(root) / "checkpoints").exists()  # the best checkpoint is saved as model/, the rest gone


def onnx_logits(path: Path, root: Path, ds) -> np.ndarray:
    """An ONNX file's raw logits on a split, through the serving predictor's preprocessing."""
    from lib.predict import Predictor, onnx_runner, onnx_session
    from lib.transforms import load_spec

    pred = Predictor(onnx_runner(onnx_session(path, 1)), LABELS, load_spec(root / "model"), 1.0, "onnx", str(path))
    return pred.logits(list(ds["image"]))


def forced(check: dict, **figures: dict) -> dict:
    """A copy of a check whose gated variants get the given figures (agreement, accuracy_drop)."""
    return {**check, "variants": {k: {**v, **figures.get(k, {})} for k, v in check["variants"].items()}}


@pytest.mark.integration
def test_the_export_stage_distils_exports_and_gates_the_student(tmp_path: Path) -> None:
    """run_export with export.student_layers: the student's files under export/student/, smaller than the teacher's;
    its rows in metrics.json measured on the validation split against the teacher; then checks built so that only
    the student passes, and so that nothing does: the served file, serving.json, metrics.json["served"] (that file's
    test figures) and the predictor follow; and a rerun without a student removes the old one."""
    from datasets import load_from_disk

    import lib.export as E
    from lib.model import load_model
    from lib.predict import load_predictor

    root = run_folder(tmp_path, layers=3)
    ep = {"student_layers": 1, "distill_epochs": 1, "distill_max_steps": 2, "min_student_agreement": 0.6}
    p = params(**ep)
    result = run_export(p, root)
    student = root / "export" / "student"
    assert {p.name for p in student.iterdir()} >= {"model", "model.onnx", "model.int8.onnx", "model.standard.onnx"}
    metrics = json.loads((root / "metrics.json").read_text())
    rows = metrics["export"]["variants"]
    assert set(rows) == {"torch", "standard", "fp32", "int8", "student_fp32", "student_int8"}
    export = root / "export"
    assert (student / FP32_FILE).stat().st_size < (export / FP32_FILE).stat().st_size  # 1 block of 3
    assert (student / INT8_FILE).stat().st_size < (student / FP32_FILE).stat().st_size
    splits = load_from_disk(str(root / "data"))
    val, test = splits["validation"], splits["test"]
    teacher = split_logits(load_model(root / "model"), val, root).argmax(1)
    for name, file in (("student_fp32", "student/model.onnx"), ("student_int8", "student/model.int8.onnx")):
        r = rows[name]
        assert r["file"] == file and r["layers"] == 1 and r["latency_ms"] > 0
        own = onnx_logits(export / file, root, val).argmax(1)
        assert r["agreement"] == pytest.approx(float(np.mean(own == teacher))), name
        assert r["accuracy"] == pytest.approx(float(np.mean(own == np.asarray(val["label"])))), name
        assert r["accuracy_drop"] == pytest.approx(rows["torch"]["accuracy"] - r["accuracy"])
    assert rows["fp32"]["layers"] == 3 and rows["student_fp32"]["agreement_pytorch"] == 1.0
    assert metrics["export"]["student"]["distillation"]["global_steps"] == 2
    serving = json.loads((export / "serving.json").read_text())
    assert [v["variant"] for v in serving["gate"]] == ["student_int8", "student_fp32", "int8"]
    assert serving["files"]["student_int8"] == "student/model.int8.onnx"
    table = export_table(result)
    assert list(table.index[-2:]) == ["student_fp32", "student_int8"] and int(table["serving"].sum()) == 1
    verdicts = {v["variant"]: "passes" if v["passed"] else "fails" for v in serving["gate"]}
    assert table["gate"].to_dict() == {v: verdicts.get(v, "") for v in table.index}

    check = {k: result[k] for k in ("split", "images", "variants")}
    info = {k: v for k, v in result.items() if k not in (*check, "student", "serving")}
    low = {"agreement": 0.5, "accuracy_drop": 0.2}
    only_student = forced(
        check, int8=low, student_int8=low, student_fp32={"agreement": 0.7, "accuracy_drop": 0.0}
    )  # 0.7 passes the student's bar (0.6), not the teacher's int8 one (0.99)
    nothing = forced(check, int8=low, student_int8=low, student_fp32=low)
    for built, file, variant in ((only_student, "student/model.onnx", "student_fp32"), (nothing, FP32_FILE, "fp32")):
        chosen_file, chosen, reason = choose_variant(built, p.export)
        assert (chosen_file, chosen) == (file, variant)
        served = E.report_served(root / "model", export / file, val, onnx_logits(export / file, root, val), test, p)
        E.write_results(root, info, built, file, reason, served, p.export, result["student"])
        serving = json.loads((export / "serving.json").read_text())
        metrics = json.loads((root / "metrics.json").read_text())
        assert (serving["file"], serving["variant"], serving["reason"]) == (file, variant, reason)
        assert (metrics["served"]["file"], metrics["served"]["variant"]) == (f"export/{file}", variant)
        expected = float(np.mean(onnx_logits(export / file, root, test).argmax(1) == np.asarray(test["label"])))
        assert metrics["served"]["accuracy"] == serving["test_accuracy"] == pytest.approx(expected)
        assert Path(load_predictor(root, threads=1).model_file) == export / file

    run_export(params(), root)
    assert not student.exists()
    assert set(json.loads((root / "metrics.json").read_text())["export"]["variants"]) == {
        "torch", "standard", "fp32", "int8"
    }  # fmt: skip


def test_card_and_dashboard_say_which_variant_is_served_and_why() -> None:
    from types import SimpleNamespace

    from lib.dashboard.app import ModelBundle, render_model_info
    from lib.params import DashboardParams
    from lib.registry.card import model_card

    reason = "student_int8 is the cheapest variant passing the gate (agreement 0.9700 >= 0.95, accuracy drop 0.0000)"
    served = {
        "backend": "onnx",
        "variant": "student_int8",
        "file": "export/student/model.int8.onnx",
        "reason": reason,
        "accuracy": 0.84,
        "ece": 0.05,
        "temperature": 0.9,
    }
    card = model_card("har-vit-demo", "v1", "2026-12-02", {"accuracy": 0.84, "served": served}, {}, None, [])
    assert "`export/student/model.int8.onnx` (onnx, student_int8," in card and f"Why this file: {reason}." in card
    predictor = SimpleNamespace(labels=LABELS, backend="onnx", model_file="export/student/model.int8.onnx")
    bundle = ModelBundle(predictor, None, Path("v1"), "har-vit-demo", "v1", served=served)  # type: ignore[arg-type]
    panel = render_model_info(bundle, DashboardParams())
    assert "student_int8 (model.int8.onnx): accuracy 0.840" in panel
    assert "why this file</summary>student_int8 is the cheapest variant passing the gate" in panel


def test_the_rehearsal_distils_for_a_few_steps_only() -> None:
    """har_vit.yaml's student runs in the rehearsal, shortened like training: a few steps on the CPU, an epoch on a
    GPU, and a length given with --set wins."""
    from tools.rehearsal.runner import CPU_DISTILL_STEPS, OVERRIDABLE, PROFILE, check_overrides, with_length

    assert "export.distill_max_steps" in OVERRIDABLE
    cpu = with_length(PROFILE, "cpu", 115, {"train.batch_size": 16})
    assert cpu["export.distill_max_steps"] == CPU_DISTILL_STEPS and cpu["train.max_steps"] == 2 * 8
    check_overrides(cpu)
    assert with_length(PROFILE, "cuda", 6400, {})["export.distill_max_steps"] == 100  # 6400 / 64
    assert with_length(PROFILE, "cpu", 115, {"export.distill_max_steps": 1})["export.distill_max_steps"] == 1
