"""lib.bench --quick writes the benchmark JSON; lib.bench.gpu refuses without CUDA and runs --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib.bench import cpu as bench
from lib.bench import gpu as gpu_bench

torch.set_num_threads(1)

REQUIRED = (
    "latency_ratio_p50",
    "reference_p50_ms",
    "ours_p50_ms",
    "serving_rss_mib",
    "reference_rss_mib",
    "eval_throughput_ratio",
    "serving_model",
)


@pytest.mark.integration
def test_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--quick: tiny model, generated images, every required key with a positive value, a printed table."""
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    files = list(out.glob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    for key in REQUIRED:
        assert key in result, key
    for key in REQUIRED[:-1]:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["serving_model"] in ("model.int8.onnx", "model.onnx")
    assert result["machine"]["cpu"] and result["machine"]["onnxruntime"]
    assert result["rss"]["serving"]["torch_imported"] is False
    assert result["rss"]["reference"]["torch_imported"] is True
    assert result["eval"]["images"] >= 16
    assert result["latency"]["reference"]["n"] == result["latency"]["ours"]["n"] == 3
    assert list(out.iterdir()) == files  # the temporary work folder is gone
    assert "latency ratio" in capsys.readouterr().out


def test_gpu_bench_refuses_without_cuda(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without CUDA and without --dry-run: exit status 2, a message, no JSON."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.integration
def test_gpu_bench_dry_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--dry-run runs the whole script on the CPU with tiny settings and labels its numbers as not GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu-*-dry.json")
    result = json.loads(path.read_text())
    assert result["dry_run"] is True and result["device"] == "cpu" and "not GPU" in result["card"]
    assert set(result["train"]) == {"fp32_eager", "bf16_sdpa"}
    assert all(r["images_per_s"] > 0 for r in result["train"].values())
    assert result["eval"]["ours_dataset_logits_images_per_s"] > 0 and result["eval"]["reference_loop_images_per_s"] > 0
