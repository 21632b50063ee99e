"""Batch classification: same answers as the predictor, bad files listed while the rest go on, resume, shards that
split the list disjointly and completely and merge back into the unsharded table, an s3:// prefix, a published
version."""

from __future__ import annotations

import io
import json
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import lib.batch.images as batch_images
from lib.batch.__main__ import main as batch_main
from lib.batch.classify import PARTS, classify, served_variant
from lib.batch.images import Shard, decode, parse_shard, shard_from
from lib.batch.summary import merge
from lib.export import FP32_FILE, export_model
from lib.model import build_model, save_model, save_temperature
from lib.params import ModelParams
from lib.predict import load_predictor
from lib.registry.storage import RegistryError
from lib.transforms import ImageSpec

LABELS = ["calling", "clapping", "cycling", "dancing", "eating"]  # 5 classes; folders of 11 and 13 images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder: tiny random ViT (T=1.5) and its ONNX export, serving fp32 (stable across batch sizes)."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model, processor, spec = build_model(ModelParams(), LABELS)
    save_model(model, processor, spec, root / "model")
    save_temperature(root / "model", 1.5)
    info = export_model(root / "model", root / "export", opset=18, quantize="none")
    serving = {"file": FP32_FILE, "files": info["files"], "reason": "test"}
    (root / "export" / "serving.json").write_text(json.dumps(serving))
    return root


def write_images(folder: Path, n: int, seed: int = 0, start: int = 0) -> list[str]:
    """n small images of assorted sizes, modes and formats in two sub-folders; their keys."""
    rng = np.random.default_rng(seed)
    keys = []
    for i in range(start, start + n):
        w, h = int(rng.integers(30, 120)), int(rng.integers(30, 120))
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        key = f"{'ab'[i % 2]}/img_{i:03d}.{('jpg', 'png', 'png')[i % 3]}"
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        [im, im.convert("L"), im.convert("RGBA")][i % 3].save(folder / key)
        keys.append(key)
    return keys


def run(model: Path, images: Path | str, out: Path, **kw) -> dict:
    """classify with small, single-threaded settings."""
    kw = {"batch_size": 4, "threads": 1, "workers": 1, "progress": False, "top_k": 3, **kw}
    return classify(str(model), images, out, **kw)


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_split_disjointly_and_completely(count: int) -> None:
    for n in (0, 1, 5, 11, 23):
        keys = [f"k{i:03d}" for i in np.random.default_rng(n).permutation(n)]
        parts = [Shard(i, count).select(keys) for i in range(count)]
        assert sorted(k for p in parts for k in p) == sorted(keys)  # complete, nothing twice
        assert all(not set(a) & set(b) for a, b in combinations(parts, 2))  # disjoint
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
        assert [Shard(i, count).select(list(reversed(keys))) for i in range(count)] == parts  # order-independent


def test_shard_from_flag_and_array_job_environments() -> None:
    assert parse_shard("2/5") == Shard(2, 5)
    for bad in ("5/5", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    assert shard_from(None, None, {}) is None
    assert shard_from("1/3", None, {"JOB_COMPLETION_INDEX": "0"}) == Shard(1, 3)  # the flag wins
    aws = {"AWS_BATCH_JOB_ARRAY_INDEX": "3", "AWS_BATCH_JOB_ARRAY_SIZE": "4"}
    assert shard_from(None, None, aws) == Shard(3, 4)
    assert shard_from(None, 6, {"JOB_COMPLETION_INDEX": "5"}) == Shard(5, 6)
    with pytest.raises(ValueError, match="--num-shards"):
        shard_from(None, None, {"JOB_COMPLETION_INDEX": "5"})
    with pytest.raises(ValueError, match="shard index"):
        shard_from(None, 3, {})


# --------------------------------------------------------------------------- decoding


def test_draft_decoding_keeps_the_side_the_transform_needs_and_exif_orientation() -> None:
    spec = ImageSpec(size=64)  # resize_to 73
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    big.save(buf, format="JPEG", exif=exif)
    drafted, full = decode(buf.getvalue(), spec), decode(buf.getvalue(), spec, draft=False)
    assert full.size == (900, 1200)  # turned upright
    assert drafted.size == (113, 150)  # 1/8 scale: both sides still >= 73
    assert min(decode(buf.getvalue(), ImageSpec(size=224)).size) >= 256  # 1/2 scale for a 224-pixel model
    with pytest.raises(ValueError, match="empty"):
        decode(b"", spec)
    with pytest.raises(ValueError, match="not an image"):
        decode(b"%PDF-1.4 not an image at all", spec)


def test_served_variant_names() -> None:
    files = {"standard": "model.standard.onnx", "fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert served_variant({"file": "model.int8.onnx", "files": files}) == "int8"
    assert served_variant({"file": "student/model.int8.onnx", "variant": "student-int8"}) == "student-int8"
    assert served_variant({"file": "other.onnx"}) == "other.onnx"


# --------------------------------------------------------------------------- classify


def test_predictions_equal_the_predictor_and_summary(run_root: Path, tmp_path: Path) -> None:
    keys = write_images(tmp_path / "images", 11)
    (tmp_path / "images" / "notes.txt").write_text("not an image, not listed")
    summary = run(run_root, tmp_path / "images", tmp_path / "out", draft=False)
    table = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert table["path"].tolist() == sorted(keys)
    predictor = load_predictor(run_root, backend="onnx", threads=1)
    images = [Image.open(tmp_path / "images" / k) for k in table["path"]]
    probs = predictor.predict_proba(images)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    assert table["label"].tolist() == [LABELS[i] for i in top[:, 0]]
    assert [list(t) for t in table["top_labels"]] == [[LABELS[i] for i in row] for row in top]
    np.testing.assert_allclose(np.stack(table["top_probabilities"]), np.take_along_axis(probs, top, 1), atol=1e-5)
    assert set(table["model_version"]) == {f"run:{run_root.name}"} and set(table["variant"]) == {"fp32"}
    assert summary["images_classified"] == 11 and summary["errors"] == 0
    assert summary["class_counts"] == table["label"].value_counts().to_dict()
    sheet = Image.open(tmp_path / "out" / "least_confident.png")
    assert sheet.width == 4 * 160 and sheet.height == 3 * (160 + 30)  # 11 images (< 16) in rows of 4
    assert not (tmp_path / "out" / PARTS).exists()


def test_bad_files_are_listed_and_the_rest_classified(run_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    good = write_images(folder, 7)
    (folder / "a" / "empty.png").write_bytes(b"")
    (folder / "a" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    buf = io.BytesIO()
    Image.new("RGB", (200, 150), (10, 120, 30)).save(buf, format="JPEG")
    (folder / "b" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    summary = run(run_root, folder, tmp_path / "out")
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors["path"].tolist() == ["a/empty.png", "a/noise.jpg", "b/truncated.jpg"]
    reasons = dict(zip(errors["path"], errors["reason"]))
    assert reasons["a/empty.png"] == "empty file"
    assert reasons["a/noise.jpg"].startswith("not an image")
    assert "truncated" in reasons["b/truncated.jpg"].lower()
    assert pd.read_parquet(tmp_path / "out" / "predictions.parquet")["path"].tolist() == sorted(good)
    assert summary["errors"] == 3 and summary["images_classified"] == 7


class Interrupted(BaseException):
    """Stands for Ctrl-C or a killed job in the middle of a run."""


def test_resume_classifies_only_what_is_missing(run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder, out = tmp_path / "images", tmp_path / "out"
    write_images(folder, 13)
    decoded: list[int] = []
    real = batch_images.decode

    def counting(data: bytes, spec: ImageSpec, draft: bool = True, fail_at: int | None = None) -> Image.Image:
        decoded.append(1)
        if fail_at is not None and len(decoded) == fail_at:
            raise Interrupted
        return real(data, spec, draft)

    # Interrupted at the 9th image: batches of 4 and parts of 4 rows, so two parts (8 rows) are on disk.
    monkeypatch.setattr(batch_images, "decode", lambda *a, **k: counting(*a, **k, fail_at=9))
    with pytest.raises(Interrupted):
        run(run_root, folder, out, chunk_size=4)
    assert len(list((out / PARTS).glob("*.parquet"))) == 2 and not (out / "predictions.parquet").exists()

    monkeypatch.setattr(batch_images, "decode", counting)
    decoded.clear()
    run(run_root, folder, out, chunk_size=4)
    assert len(decoded) == 13 - 8
    first = pd.read_parquet(out / "predictions.parquet")
    assert len(first) == 13 and first["path"].is_unique and not (out / PARTS).exists()

    decoded.clear()
    write_images(folder, 2, seed=5, start=13)
    summary = run(run_root, folder, out)
    assert len(decoded) == 2 and summary["images_classified"] == 15
    table = pd.read_parquet(out / "predictions.parquet")
    pd.testing.assert_frame_equal(table[table["path"].isin(first["path"])].reset_index(drop=True), first)

    with pytest.raises(ValueError, match="top_k"):
        run(run_root, folder, out, top_k=2)


def test_merged_shards_equal_the_unsharded_run(
    run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    write_images(folder, 11)
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    whole = tmp_path / "whole"
    run(run_root, folder, whole)
    sharded = tmp_path / "sharded"
    run(run_root, folder, sharded, shard=Shard(0, 3))
    with pytest.raises(ValueError, match=r"shards \[1, 2\] of 3 are missing"):
        merge(sharded)
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "1")  # shard 1 as an AWS Batch array child finds it
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_SIZE", "3")
    common = ["--images", str(folder), "--out", str(sharded), "--model", str(run_root), "--threads", "1", "--quiet"]
    assert batch_main([*common, "--batch-size", "4", "--top-k", "3"]) == 0
    monkeypatch.delenv("AWS_BATCH_JOB_ARRAY_INDEX")
    assert batch_main([*common, "--shard", "2/3", "--batch-size", "5", "--top-k", "3"]) == 0
    assert {p.name for p in sharded.iterdir()} == {f"shard-0000{i}-of-00003" for i in range(3)}
    capsys.readouterr()
    assert batch_main(["merge", str(sharded)]) == 0
    assert json.loads(capsys.readouterr().out)["merged_shards"] == 3
    a, b = pd.read_parquet(whole / "predictions.parquet"), pd.read_parquet(sharded / "predictions.parquet")
    assert len(a) == 11
    pd.testing.assert_frame_equal(a.drop(columns="top_probabilities"), b.drop(columns="top_probabilities"))
    np.testing.assert_allclose(np.stack(a["top_probabilities"]), np.stack(b["top_probabilities"]), atol=1e-5)
    pd.testing.assert_frame_equal(pd.read_csv(whole / "errors.csv"), pd.read_csv(sharded / "errors.csv"))
    summaries = [json.loads((d / "summary.json").read_text()) for d in (whole, sharded)]
    assert summaries[0]["class_counts"] == summaries[1]["class_counts"]


def test_cli_errors_are_one_line(run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert batch_main(["--images", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--model", str(run_root)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "images").mkdir()
    args = ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no/run")]
    assert batch_main(args) == 1
    assert "model folder" in capsys.readouterr().err


def test_s3_prefix(run_root: Path, tmp_path: Path, s3_bucket: str) -> None:
    """The same images from a moto S3 prefix and from a folder give the same table; keys outside the prefix are
    not listed."""
    import boto3

    folder = tmp_path / "images"
    keys = write_images(folder, 6)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=s3_bucket)
    for key in keys:
        s3.upload_file(str(folder / key), s3_bucket, f"photos/2026/{key}")
    s3.put_object(Bucket=s3_bucket, Key="photos/2026/a/broken.jpg", Body=b"\xff\xd8\xff not really")
    s3.upload_file(str(folder / keys[0]), s3_bucket, f"elsewhere/{keys[0]}")
    summary = run(run_root, f"s3://{s3_bucket}/photos/2026", tmp_path / "s3out")
    assert summary["images"] == f"s3://{s3_bucket}/photos/2026"
    local = run(run_root, folder, tmp_path / "localout")
    assert local["images_classified"] == summary["images_classified"] == 6
    from_s3 = pd.read_parquet(tmp_path / "s3out" / "predictions.parquet")
    pd.testing.assert_frame_equal(from_s3, pd.read_parquet(tmp_path / "localout" / "predictions.parquet"))
    assert pd.read_csv(tmp_path / "s3out" / "errors.csv")["path"].tolist() == ["a/broken.jpg"]


def test_latest_published_version(run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--model latest pulls the newest version of --model-name from --registry, and names it in every row."""
    from test_registry import GATE, make_run

    from lib.registry.publish import publish

    published = make_run(tmp_path / "outputs")
    for sub in ("model", "export"):
        shutil.rmtree(published / sub)
        shutil.copytree(run_root / sub, published / sub)
    monkeypatch.setenv("HAR_REGISTRY_CACHE", str(tmp_path / "cache"))
    result = publish(published, str(tmp_path / "registry"), "har-vit-demo", GATE, progress=False)
    write_images(tmp_path / "images", 5)
    summary = run("latest", tmp_path / "images", tmp_path / "out", registry=str(tmp_path / "registry"))
    table = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert set(table["model_version"]) == {f"har-vit-demo/{result['version']}"} == {summary["model_version"]}
    with pytest.raises(RegistryError, match="no published version"):
        run("latest", tmp_path / "images", tmp_path / "out2", registry=str(tmp_path / "registry"), model_name="x")


@pytest.mark.integration
def test_notebook_runs_with_papermill(run_root: Path, tmp_path: Path) -> None:
    """06_batch_classify.ipynb classifies a folder with a run folder's model and shows the table and the sheet."""
    import nbformat
    import papermill as pm

    from lib.params import ROOT

    write_images(tmp_path / "images", 9)
    (tmp_path / "images" / "b" / "bad.jpg").write_bytes(b"nope")
    notebook = ROOT / "notebooks" / "06_batch_classify.ipynb"
    executed = tmp_path / "executed.ipynb"
    pm.execute_notebook(
        str(notebook),
        str(executed),
        parameters={"model": str(run_root), "images": str(tmp_path / "images"), "out": str(tmp_path / "out")},
        cwd=str(notebook.parent),
        kernel_name="python3",
        progress_bar=False,
    )
    outputs = [o for c in nbformat.read(executed, as_version=4).cells for o in c.get("outputs", [])]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "9 images classified" in text and "1 unreadable" in text and "b/bad.jpg" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert len(pd.read_parquet(tmp_path / "out" / "predictions.parquet")) == 9


@pytest.mark.integration
def test_cli_runs_on_the_serving_dependencies(run_root: Path, tmp_path: Path) -> None:
    """python -m lib.batch in a fresh process imports none of the research packages (torch, transformers,
    scikit-learn, matplotlib, datasets, onnx): the slim serving install runs it."""
    import subprocess
    import sys

    from lib.params import ROOT

    write_images(tmp_path / "images", 3)
    args = ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--model", str(run_root)]
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['lib.batch', *{args!r}, '--quiet', '--threads', '1']\n"
        "try:\n"
        "    runpy.run_module('lib.batch', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "research = {'torch', 'transformers', 'sklearn', 'matplotlib', 'datasets', 'onnx', 'seaborn'}\n"
        "print(sorted(research & {m.split('.')[0] for m in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert len(pd.read_parquet(tmp_path / "out" / "predictions.parquet")) == 3
