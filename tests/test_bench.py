"""tools.bench --quick writes the benchmark JSON (reference alone, student, batch classification, ISA flags); served
ONNX Runtime sessions never spin; tools.bench.gpu refuses without CUDA, runs --dry-run (distillation and batch
classification included) and names what its time budget skipped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lib.params import ROOT
from tools.bench import cpu as bench
from tools.bench import gpu as gpu_bench
from tools.machine import ISA_FLAGS

torch.set_num_threads(1)

REQUIRED = (
    "latency_ratio_p50",
    "reference_p50_ms",
    "reference_alone_p50_ms",
    "ours_p50_ms",
    "serving_rss_mib",
    "reference_rss_mib",
    "eval_throughput_ratio",
    "student_latency_ratio_p50",
    "student_latency_ratio_p50_alone",
    "student_rss_mib",
    "batch_throughput_ratio",
    "serving_model",
)


@pytest.mark.integration
def test_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--quick: tiny model with random weights, generated images, every required key with a positive value, each
    ratio the quotient of the figures it names, int8 served (random weights cannot pass the agreement rule, so the
    bench serves int8 and times the fp32 ONNX beside it), a printed table."""
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    files = list(out.glob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    for key in REQUIRED:
        assert key in result, key
    for key in REQUIRED[:-1]:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["serving_model"] == "model.int8.onnx" and result["serving_reason"].startswith("random weights")
    assert result["machine"]["cpu"] and result["machine"]["onnxruntime"]
    assert result["rss"]["serving"]["torch_imported"] is False
    assert result["rss"]["reference"]["torch_imported"] is True
    assert result["rss"]["student"]["torch_imported"] is False
    assert result["eval"]["images"] == 16  # --quick's default
    assert set(result["latency"]) == set(result["latency_alone"]) == {"reference", "ours", "student", "fp32_onnx"}
    assert set(result["rss"]) == {"reference", "serving", "student", "fp32_onnx"}
    lat, alone, ev, batch = result["latency"], result["latency_alone"], result["eval"], result["batch"]
    quotients = {
        "latency_ratio_p50": lat["reference"]["p50_ms"] / lat["ours"]["p50_ms"],
        "latency_ratio_p50_alone": alone["reference"]["p50_ms"] / alone["ours"]["p50_ms"],
        "student_latency_ratio_p50": lat["reference"]["p50_ms"] / lat["student"]["p50_ms"],
        "student_latency_ratio_p50_alone": alone["reference"]["p50_ms"] / alone["student"]["p50_ms"],
        "eval_throughput_ratio": ev["dataset_logits_images_per_s"] / ev["reference_images_per_s"],
        "batch_throughput_ratio": batch["served"]["images_per_s"] / ev["reference_images_per_s"],
    }
    assert {key: result[key] for key in quotients} == pytest.approx(quotients)
    assert (result["reference_p50_ms"], result["ours_p50_ms"]) == (lat["reference"]["p50_ms"], lat["ours"]["p50_ms"])
    assert (result["serving_rss_mib"], result["student_rss_mib"]) == (
        result["rss"]["serving"]["peak_rss_mib"],
        result["rss"]["student"]["peak_rss_mib"],
    )
    assert {name: t["n"] for name, t in result["latency"].items()} == {n: 3 for n in result["latency"]}
    assert {name: t["n"] for name, t in result["latency_alone"].items()} == {n: 3 for n in result["latency"]}
    assert result["student_layers"] == result["teacher_layers"] // 2  # --quick halves the tiny model
    for kind in ("served", "student"):
        assert (batch[kind]["images"], batch[kind]["errors"], batch[kind]["variant"]) == (16, 0, "int8")
    assert set(result["machine"]["isa"]) == set(ISA_FLAGS)
    assert list(out.iterdir()) == files  # the temporary work folder is gone
    printed = capsys.readouterr().out
    assert "latency ratio reference/student" in printed and "reference timed alone" in printed
    assert "ISA: " in printed and "lib.batch, served file" in printed


def test_served_sessions_never_spin(tmp_path: Path) -> None:
    """onnx_session turns ONNX Runtime's idle spinning off, so its threads do not take the cores after a run."""
    import onnx
    from onnx import TensorProto, helper

    from lib.predict import onnx_session

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    options = onnx_session(path, threads=1).get_session_options()
    if not hasattr(options, "get_session_config_entry"):
        pytest.skip("this ONNX Runtime does not expose session config entries")
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_student_layers_come_from_the_profile(tmp_path: Path) -> None:
    """--student-layers, else the profile's export.student_layers, else 6 (named as such in the JSON)."""
    base = re.sub(r"(?m)^\s*student_layers:.*\n", "", (ROOT / "params" / "demo.yaml").read_text())
    plain = tmp_path / "plain.yaml"
    plain.write_text(base)
    with_student = tmp_path / "student.yaml"
    with_student.write_text(base.replace("export:\n", "export:\n  student_layers: 3\n", 1))
    assert bench.student_layers(with_student, None) == (3, "export.student_layers of student.yaml")
    assert bench.student_layers(with_student, 5) == (5, "--student-layers")
    layers, source = bench.student_layers(plain, None)
    assert layers == bench.DEFAULT_STUDENT_LAYERS == 6 and "sets no export.student_layers" in source


def test_gpu_bench_refuses_without_cuda(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without CUDA and without --dry-run: exit status 2, a message, no JSON."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.integration
def test_gpu_bench_dry_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run runs the whole script on the CPU with tiny settings and labels its numbers as not GPU; the student
    is distilled at har_vit.yaml's depth (capped for the tiny teacher) and lib.batch classifies every image asked
    for with the teacher's and the student's int8 exports, on the CPU."""
    from lib.distill import kept_blocks
    from lib.params import VitConfig, load_params

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--dry-run", "--batch-images", "7", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu-*-dry.json")
    result = json.loads(path.read_text())
    assert result["dry_run"] is True and result["device"] == "cpu" and "not GPU" in result["card"]
    assert set(result["train"]) == {"fp32_eager", "bf16_sdpa"}
    assert all(r["images_per_s"] > 0 for r in result["train"].values())
    assert result["eval"]["ours_dataset_logits_images_per_s"] > 0 and result["eval"]["reference_loop_images_per_s"] > 0
    assert result["skipped"] == []

    distill = result["distill"]
    tiny_blocks = VitConfig().num_hidden_layers  # 4: fewer than the 6 har_vit.yaml keeps
    layers = min(load_params(ROOT / "params" / "har_vit.yaml").export.student_layers, tiny_blocks // 2)
    assert distill["images_per_s"] > 0 and distill["batch"] == 4 and distill["steps"] == 2
    assert distill["teacher_blocks"] == tiny_blocks and distill["student_blocks"] == layers
    assert distill["kept_blocks"] == kept_blocks(tiny_blocks, layers)
    assert "export.student_layers of har_vit.yaml" in distill["student_layers_source"]

    batch = result["batch_classify"]
    assert batch["n_images"] == 7 and "CPUExecutionProvider" in batch["runs_on"] and batch["ort_intra_op_threads"] == 1
    assert set(batch["rows"]) == {"teacher_int8", "student_int8"}
    for row in batch["rows"].values():
        assert (row["n_images"], row["images_classified"], row["errors"]) == (7, 7, 0)
        assert row["file"] == "model.int8.onnx" and row["images_per_s"] > 0
    printed = capsys.readouterr().out
    assert f"distill fp32_sdpa (student of {layers}/{tiny_blocks} blocks" in printed
    assert printed.count("batch classify ") == 2


def test_gpu_bench_budget_skips_every_part(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A budget of 0 s measures nothing and names every part, distillation and batch classification included."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--dry-run", "--budget-s", "0", "--backbones", "dinov2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu-*-dry.json")
    result = json.loads(path.read_text())
    parts = ["train fp32_eager", "train bf16_sdpa", "train dinov2", "eval", "distill", "batch_classify"]
    assert result["skipped"] == parts
    assert not {"eval", "distill", "batch_classify"} & set(result) and result["train"] == {}


def test_gpu_bench_refuses_a_student_deeper_than_its_teacher() -> None:
    """--student-layers beyond ViT-B/16's 12 blocks fails before anything is measured, naming the depth."""
    args = gpu_bench.parse_args(["--student-layers", "13"])
    with pytest.raises(ValueError, match="between 1 and 12 encoder blocks of its teacher, not 13"):
        gpu_bench.run(args)


@pytest.mark.parametrize("option", ["--batch-images", "--ort-threads", "--steps"])
def test_gpu_bench_refuses_counts_below_one(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A count of 0 or less stops at the command line, naming the option, instead of measuring nothing."""
    with pytest.raises(SystemExit):
        gpu_bench.parse_args([option, "-3"])
    assert option in capsys.readouterr().err
