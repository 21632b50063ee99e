"""Batch classification: same answers as the predictor (through draft decoding, as in production), bad files listed
while the rest go on, a batch that fails as a whole retried image by image, resume (after a kill anywhere, never
under another model), shards that classify one planned manifest and merge back into the unsharded table, merge's
checks, shards with nothing to classify, an s3:// prefix and manifest, a published version."""

from __future__ import annotations

import ast
import hashlib
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
from lib.batch.classify import classify, served_variant
from lib.batch.images import ImageSource, Shard, decode, parse_shard, shard_from
from lib.batch.manifest import plan
from lib.batch.outputs import PARTS, write_atomic
from lib.batch.summary import CAPTION, TILE, merge, thumbnail
from lib.export import FP32_FILE, export_model
from lib.model import build_model, save_model, save_temperature
from lib.params import ROOT, ModelParams
from lib.predict import Predictor, load_predictor
from lib.registry.storage import RegistryError
from lib.transforms import ImageSpec

LABELS = ["calling", "clapping", "cycling", "dancing", "eating"]  # 5 classes; folders of 7 to 24 images

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


def picture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A w x h photo-like image: smooth colour fields with grain (JPEG keeps it small, draft decoding changes it)."""
    base = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    grain = rng.integers(-25, 26, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(base, np.int16) + grain, 0, 255).astype(np.uint8))


def write_images(folder: Path, n: int, seed: int = 0, start: int = 0, sides: tuple[int, int] = (30, 120)) -> list[str]:
    """n images of assorted sizes (sides in [lo, hi)), modes and formats in two sub-folders; their keys."""
    rng = np.random.default_rng(seed)
    keys = []
    for i in range(start, start + n):
        im = picture(rng, int(rng.integers(*sides)), int(rng.integers(*sides)))
        key = f"{'ab'[i % 2]}/img_{i:03d}.{('jpg', 'png', 'png')[i % 3]}"
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        [im, im.convert("L"), im.convert("RGBA")][i % 3].save(folder / key)
        keys.append(key)
    return keys


def run(model: Path | str, images: Path | str, out: Path, **kw) -> dict:
    """classify with small, single-threaded settings."""
    kw = {"batch_size": 4, "threads": 1, "workers": 1, "progress": False, "top_k": 3, **kw}
    return classify(str(model), images, out, **kw)


def plan_cli(images: Path | str, out: Path, *extra: str) -> int:
    """python -m lib.batch plan, as a user runs it before the shards."""
    return batch_main(["plan", "--images", str(images), "--out", str(out), *extra])


def covered(out: Path) -> list[str]:
    """Every path of out's predictions.parquet and errors.csv, repeats kept, sorted."""
    found = pd.read_parquet(out / "predictions.parquet")["path"].tolist()
    found += pd.read_csv(out / "errors.csv", dtype=str)["path"].tolist()
    return sorted(found)


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


def test_batch_modules_import_one_way() -> None:
    """lib.batch's modules import each other one way only: no module reaches back to one that imports it."""
    graph = {}
    for path in (ROOT / "lib" / "batch").glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lib.batch."):
                imported.add(node.module.removeprefix("lib.batch."))
        graph[path.stem] = imported

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    assert {"classify", "summary", "manifest", "outputs", "images"} <= graph.keys()
    assert [m for m in sorted(graph) if reaches(m, m, set())] == []


def test_predictions_equal_the_predictor_through_draft_decoding(
    run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The production default, draft decoding, on photos large enough for it: each JPEG decodes at a reduced scale
    that still covers the model's resize, and the rows equal the predictor on the same drafted images. 19 images, so
    the contact sheet shows the 16 least confident, in order."""
    folder = tmp_path / "images"
    keys = write_images(folder, 19, sides=(150, 420))
    (folder / "notes.txt").write_text("not an image, not listed")
    decoded: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
    real = batch_images.decode

    def spying(data: bytes, spec: ImageSpec, draft: bool = True) -> Image.Image:
        original = Image.open(io.BytesIO(data))
        img = real(data, spec, draft)
        decoded.append((original.format, original.size, img.size))
        return img

    monkeypatch.setattr(batch_images, "decode", spying)
    summary = run(run_root, folder, tmp_path / "out")
    predictor = load_predictor(run_root, backend="onnx", threads=1)
    side = predictor.spec.resize_to
    jpegs = [(full, got) for fmt, full, got in decoded if fmt == "JPEG"]
    assert len(decoded) == 19 and len(jpegs) == 7
    assert all(got[0] < full[0] and got[1] < full[1] and min(got) >= side for full, got in jpegs)
    assert all(got == full for fmt, full, got in decoded if fmt != "JPEG")

    table = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert table["path"].tolist() == sorted(keys)

    def opened(key: str, draft: bool) -> Image.Image:
        img = Image.open(folder / key)
        if draft:
            img.draft(img.mode, (side, side))
        img.load()
        return img

    probs = predictor.predict_proba([opened(k, draft=True) for k in table["path"]])
    full = predictor.predict_proba([opened(k, draft=False) for k in table["path"]])
    assert np.abs(probs - full).max() > 1e-4  # the comparison below tells drafted pixels from full ones
    top = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    assert table["label"].tolist() == [LABELS[i] for i in top[:, 0]]
    assert [list(t) for t in table["top_labels"]] == [[LABELS[i] for i in row] for row in top]
    np.testing.assert_allclose(np.stack(table["top_probabilities"]), np.take_along_axis(probs, top, 1), atol=1e-5)
    assert set(table["model_version"]) == {f"run:{run_root.name}"} and set(table["variant"]) == {"fp32"}
    assert summary["images_listed"] == summary["images_classified"] == 19 and summary["errors"] == 0
    assert summary["class_counts"] == table["label"].value_counts().to_dict() and "note" not in summary
    assert not (tmp_path / "out" / PARTS).exists()

    sheet = Image.open(tmp_path / "out" / "least_confident.png").convert("RGB")
    assert sheet.size == (4 * TILE, 4 * (TILE + CAPTION))  # 16 of the 19, in rows of 4
    paths = table["path"].tolist()
    least = sorted(range(len(paths)), key=lambda i: (probs[i].max(), paths[i]))[:16]
    source = ImageSource(folder)
    for slot, i in enumerate(least):
        x, y = (slot % 4) * TILE, (slot // 4) * (TILE + CAPTION)
        tile = sheet.crop((x, y, x + TILE, y + TILE))
        assert np.array_equal(np.asarray(tile), np.asarray(thumbnail(source, paths[i]))), (slot, paths[i])


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


def test_a_batch_that_fails_as_a_whole_is_classified_image_by_image(
    run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the model call fails for a whole batch, each of its images is tried alone: the one that breaks it is
    listed with the reason, its batch mates get their rows, with the probabilities they get alone."""
    folder = tmp_path / "images"
    good = write_images(folder, 9)
    Image.new("RGB", (90, 70), (0, 0, 0)).save(folder / "a" / "black.png")  # sorts first: batch 1 of 3
    real = Predictor.predict_proba
    calls: list[int] = []

    def fragile(self: Predictor, images: list[Image.Image]) -> np.ndarray:
        calls.append(len(images))
        if any(np.asarray(im).max() == 0 for im in images):
            raise RuntimeError("ONNX Runtime failed on this batch")
        return real(self, images)

    monkeypatch.setattr(Predictor, "predict_proba", fragile)
    summary = run(run_root, folder, tmp_path / "out", batch_size=4)
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert errors.values.tolist() == [["a/black.png", "RuntimeError: ONNX Runtime failed on this batch"]]
    table = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert table["path"].tolist() == sorted(good)
    assert calls == [4, 1, 1, 1, 1, 4, 2]  # the failed batch of 4, then its images one by one, then the others
    monkeypatch.setattr(Predictor, "predict_proba", real)
    predictor = load_predictor(run_root, backend="onnx", threads=1)
    alone = np.stack([predictor.predict_proba([Image.open(folder / k)])[0] for k in table["path"]])
    np.testing.assert_allclose(table["probability"], alone.max(axis=1), atol=1e-5)
    assert summary["images_classified"] == 9 and summary["errors"] == 1


def test_resume_refuses_another_model_version(run_root: Path, tmp_path: Path) -> None:
    """Rows of one model are never resumed with another: the rerun is refused and what was written stays."""
    folder, out = tmp_path / "images", tmp_path / "out"
    write_images(folder, 7)
    run(run_root, folder, out)
    before = {name: (out / name).read_bytes() for name in ("predictions.parquet", "run.json", "summary.json")}
    other = tmp_path / "other-run"  # the same files, published as another version
    shutil.copytree(run_root, other)
    write_images(folder, 2, seed=4, start=7)  # work left to do, so that a resume would write rows
    with pytest.raises(ValueError, match=rf"model_version: 'run:{run_root.name}' -> 'run:other-run'"):
        run(other, folder, out)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (out / PARTS).exists()


def test_a_run_killed_while_consolidating_resumes_without_losing_a_row(
    run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed inside consolidate after it removed one part file: the resumed run writes new parts under names that
    no part left behind holds, and every image ends up in the table exactly once."""
    folder, out = tmp_path / "images", tmp_path / "out"
    keys = write_images(folder, 13)
    real_unlink = Path.unlink

    def killed(self: Path, missing_ok: bool = False) -> None:
        if self.parent.name == PARTS and self.name.endswith(".parquet"):
            raise Interrupted
        real_unlink(self, missing_ok=missing_ok)

    with monkeypatch.context() as mp:
        mp.setattr(Path, "unlink", killed)
        with pytest.raises(Interrupted):
            run(run_root, folder, out, chunk_size=4)  # parts of 4, 4, 4 and 1 rows
    parts = sorted((out / PARTS).glob("*.parquet"))
    assert len(parts) == 4 and len(pd.read_parquet(out / "predictions.parquet")) == 13
    parts[0].unlink()  # what consolidate had removed when the kill came
    keys += write_images(folder, 11, seed=2, start=13)  # work for the resumed run: three more parts
    summary = run(run_root, folder, out, chunk_size=4)
    table = pd.read_parquet(out / "predictions.parquet")
    assert table["path"].tolist() == sorted(keys)
    assert summary["images_classified"] == 24 and not (out / PARTS).exists()


def test_write_atomic_leaves_no_half_file_and_no_shared_temporary(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("before")

    def half(tmp: Path) -> None:
        tmp.write_text("half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half)
    assert path.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]

    def outer(tmp: Path) -> None:  # a second writer of the same file finishes while the first is writing
        tmp.write_text("outer")
        write_atomic(path, lambda other: other.write_text("inner"))
        assert path.read_text() == "inner"

    write_atomic(path, outer)
    assert path.read_text() == "outer" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# --------------------------------------------------------------------------- shards, manifest, merge


def test_merged_shards_equal_the_unsharded_run(
    run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    write_images(folder, 11)
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    whole = tmp_path / "whole"
    run(run_root, folder, whole)
    sharded = tmp_path / "sharded"
    with pytest.raises(FileNotFoundError, match="python -m lib.batch plan"):
        run(run_root, folder, sharded, shard=Shard(0, 3))  # no shard starts without the planned list
    capsys.readouterr()
    assert plan_cli(folder, sharded) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 12
    run(run_root, folder, sharded, shard=Shard(0, 3))
    with pytest.raises(ValueError, match=r"shards \[1, 2\] of 3 are missing"):
        merge(sharded)
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "1")  # shard 1 as an AWS Batch array child finds it
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_SIZE", "3")
    common = ["--images", str(folder), "--out", str(sharded), "--model", str(run_root), "--threads", "1", "--quiet"]
    assert batch_main([*common, "--batch-size", "4", "--top-k", "3"]) == 0
    monkeypatch.delenv("AWS_BATCH_JOB_ARRAY_INDEX")
    assert batch_main([*common, "--shard", "2/3", "--batch-size", "5", "--top-k", "3"]) == 0
    assert {p.name for p in sharded.iterdir()} == {f"shard-0000{i}-of-00003" for i in range(3)} | {"manifest.json"}
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
    assert summaries[1]["images_listed"] == 12


def test_files_arriving_during_a_sharded_run_change_no_shard(run_root: Path, tmp_path: Path) -> None:
    """The shards classify the planned list, whatever arrives after the plan: no file twice, none missed; every
    run.json records the manifest's hash; a second plan is refused."""
    folder, out = tmp_path / "images", tmp_path / "out"
    planned = write_images(folder, 10)
    assert plan_cli(folder, out) == 0
    manifest = (out / "manifest.json").read_bytes()
    run(run_root, folder, out, shard=Shard(0, 3))
    write_images(folder, 3, seed=7, start=20)  # a/img_020 and a/img_022 move every file of b one place on
    (folder / "a" / "img_000.jpg").rename(folder / "a" / "img_000-late.jpg")  # and one file renamed
    run(run_root, folder, out, shard=Shard(1, 3))
    run(run_root, folder, out, shard=Shard(2, 3))
    merge(out)
    found = covered(out)
    assert found == sorted(planned)  # a/img_000.jpg, renamed after shard 0 read it, is classified once
    digest = hashlib.sha256(manifest).hexdigest()
    for i in range(3):
        settings = json.loads((out / Shard(i, 3).folder / "run.json").read_text())
        assert settings["manifest_sha256"] == digest and settings["manifest"] == str(out.resolve() / "manifest.json")
    assert plan_cli(folder, out) == 1
    assert (out / "manifest.json").read_bytes() == manifest
    (tmp_path / "other-images").mkdir()
    with pytest.raises(ValueError, match="lists the files of"):
        run(run_root, tmp_path / "other-images", out, shard=Shard(1, 3))  # every shard classifies the same folder


def test_merge_names_missing_and_duplicated_files(run_root: Path, tmp_path: Path) -> None:
    """merge checks the shards against the manifest: each listed file exactly once, classified or in errors.csv,
    and refuses a manifest other than the one the shards classified."""
    folder, out = tmp_path / "images", tmp_path / "out"
    keys = sorted(write_images(folder, 8))
    (folder / "b" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    plan(folder, out)
    for i in range(3):
        run(run_root, folder, out, shard=Shard(i, 3))
    merge(out)
    assert covered(out) == sorted([*keys, "b/zz-broken.jpg"])

    one = out / Shard(1, 3).folder / "predictions.parquet"
    rows = pd.read_parquet(one)
    lost, extra = rows["path"].iloc[0], pd.read_parquet(out / Shard(0, 3).folder / "predictions.parquet").iloc[:1]
    pd.concat([rows.iloc[1:], extra], ignore_index=True).to_parquet(one, index=False)
    with pytest.raises(ValueError, match=rf"missing from every shard \(1\): {lost}; there more than once \(1\): "):
        merge(out)
    with pytest.raises(ValueError, match=extra["path"].iloc[0]):
        merge(out)
    rows.to_parquet(one, index=False)
    moved = tmp_path / "gathered"  # the folder copied elsewhere: its own manifest.json, or --manifest, is read
    shutil.copytree(out, moved)
    shutil.move(out / "manifest.json", tmp_path / "kept.json")
    assert batch_main(["merge", str(moved)]) == 0 and covered(moved) == covered(out)
    (moved / "manifest.json").unlink()
    assert batch_main(["merge", str(moved), "--manifest", str(tmp_path / "kept.json")]) == 0
    shutil.move(tmp_path / "kept.json", out / "manifest.json")

    (out / "manifest.json").unlink()  # planned again, with a file that arrived since
    (folder / "a" / "late.png").write_bytes((folder / keys[1]).read_bytes())
    plan(folder, out)
    with pytest.raises(ValueError, match="not the one the shards classified"):
        merge(out)


def test_an_unsharded_runs_folder_is_neither_planned_nor_merged_over(run_root: Path, tmp_path: Path) -> None:
    """An unsharded run keeps its own list (relisted on each start); shards never take it for a plan, plan never
    replaces it, and merge never writes over an unsharded run's table."""
    folder, out = tmp_path / "images", tmp_path / "out"
    keys = write_images(folder, 3)
    run(run_root, folder, out)
    own = json.loads((out / "manifest.json").read_text())
    assert own["planned"] is False and own["files"] == sorted(keys)
    keys += write_images(folder, 2, seed=1, start=3)
    assert run(run_root, folder, out)["images_classified"] == 5  # a rerun lists anew
    assert json.loads((out / "manifest.json").read_text())["files"] == sorted(keys)
    with pytest.raises(ValueError, match="unsharded run"):
        plan(folder, out)
    with pytest.raises(ValueError, match="unsharded run"):
        run(run_root, folder, out, shard=Shard(0, 2))
    assert not (out / Shard(0, 2).folder).exists()

    both = tmp_path / "both"
    plan(folder, both)
    run(run_root, folder, both)  # an unsharded run of the planned list, into the folder the shards share
    for i in range(2):
        run(run_root, folder, both, shard=Shard(i, 2))
    table = (both / "predictions.parquet").read_bytes()
    with pytest.raises(ValueError, match="results of an unsharded run"):
        merge(both)
    assert (both / "predictions.parquet").read_bytes() == table


def test_shards_with_nothing_to_classify_end_with_a_summary_and_merge(run_root: Path, tmp_path: Path) -> None:
    """More shards than images, and a shard whose every file fails: each shard ends with a summary that says why
    it holds no rows, and merge joins them (even where the images cannot be read any more)."""
    folder, out = tmp_path / "images", tmp_path / "out"
    keys = write_images(folder, 2)
    plan(folder, out)
    summaries = [run(run_root, folder, out, shard=Shard(i, 3), top_k=4) for i in range(3)]
    assert [s["images_listed"] for s in summaries] == [1, 1, 0]
    assert summaries[2]["images_classified"] == 0 and "shard 2/3 has no images" in summaries[2]["note"]
    assert (out / Shard(2, 3).folder / "least_confident.png").is_file()
    folder.rename(tmp_path / "moved")
    merged = merge(out)
    assert merged["images_classified"] == 2 and covered(out) == sorted(keys) and "note" not in merged

    folder, out = tmp_path / "failing", tmp_path / "out-failing"
    good = write_images(folder, 4)
    bad = ["a/img_001-bad.jpg", "b/img_003-bad.png"]  # positions 1 and 4 of the sorted six: shard 1 of 3
    for key in bad:
        (folder / key).write_bytes(b"not an image")
    plan(folder, out)
    summaries = [run(run_root, folder, out, shard=Shard(i, 3)) for i in range(3)]
    assert summaries[1]["images_classified"] == 0 and summaries[1]["errors"] == 2
    assert "none of the 2 images could be classified" in summaries[1]["note"]
    merged = merge(out)
    assert merged["images_classified"] == 4 and merged["errors"] == 2
    assert covered(out) == sorted(good + bad)


def test_an_empty_folder_ends_with_a_summary(run_root: Path, tmp_path: Path) -> None:
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "sub" / "readme.txt").write_text("no images here")
    summary = run(run_root, tmp_path / "images", tmp_path / "out")
    assert summary["images_listed"] == summary["images_classified"] == summary["errors"] == 0
    assert summary["note"].startswith("no images in") and summary["class_counts"] == {}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert (tmp_path / "out" / "least_confident.png").is_file()
    assert pd.read_parquet(tmp_path / "out" / "predictions.parquet").empty

    assert plan_cli(tmp_path / "images", tmp_path / "sharded") == 0
    for i in range(2):
        run(run_root, tmp_path / "images", tmp_path / "sharded", shard=Shard(i, 2))
    assert merge(tmp_path / "sharded")["note"].startswith("no images in")


def test_cli_errors_are_one_line(run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert batch_main(["--images", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--model", str(run_root)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "images").mkdir()
    args = ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no/run")]
    assert batch_main(args) == 1
    assert "model folder" in capsys.readouterr().err
    args = ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "o"), "--model", str(run_root)]
    assert batch_main([*args, "--shard", "1/2"]) == 1
    assert "python -m lib.batch plan --images" in capsys.readouterr().err


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


def test_s3_manifest_for_shards_that_share_no_folder(run_root: Path, tmp_path: Path, s3_bucket: str) -> None:
    """Shards on machines without a shared folder read the manifest from S3; merge reads it from where the shards
    recorded it; a second plan to the same object is refused."""
    import boto3

    folder = tmp_path / "images"
    keys = write_images(folder, 7)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=s3_bucket)
    for key in keys:
        s3.upload_file(str(folder / key), s3_bucket, f"photos/{key}")
    images, manifest = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/plans/run-1.json"
    assert plan_cli(images, tmp_path / "plan-here", "--manifest", manifest) == 0
    assert not (tmp_path / "plan-here" / "manifest.json").exists()
    s3.upload_file(str(folder / keys[0]), s3_bucket, "photos/a/arrived-late.jpg")
    for i in range(2):  # each machine its own output folder, gathered afterwards
        run(run_root, images, tmp_path / f"machine-{i}", shard=Shard(i, 2), manifest=manifest)
        shutil.copytree(tmp_path / f"machine-{i}" / Shard(i, 2).folder, tmp_path / "out" / Shard(i, 2).folder)
    settings = json.loads((tmp_path / "out" / Shard(1, 2).folder / "run.json").read_text())
    stored = s3.get_object(Bucket=s3_bucket, Key="plans/run-1.json")["Body"].read()
    assert settings["manifest"] == manifest and settings["manifest_sha256"] == hashlib.sha256(stored).hexdigest()
    merged = merge(tmp_path / "out")
    assert covered(tmp_path / "out") == sorted(keys) and merged["images_listed"] == 7
    with pytest.raises(RegistryError, match="already exists"):
        plan(images, tmp_path / "again", manifest)
    with pytest.raises(ValueError, match="s3://bucket/path/name.json"):
        plan(images, tmp_path / "again", f"s3://{s3_bucket}/plans/")


def test_latest_published_version(run_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--model latest pulls the newest version of --model-name from --registry, and names it in every row."""
    from test_registry import GATE, make_run

    from lib.registry.publish import publish

    published = make_run(tmp_path / "outputs")
    for sub in ("model", "export"):
        shutil.rmtree(published / sub)
        shutil.copytree(run_root / sub, published / sub)
    metrics = json.loads((published / "metrics.json").read_text())
    metrics["served"]["file"] = f"export/{FP32_FILE}"  # the figures describe the file now served
    (published / "metrics.json").write_text(json.dumps(metrics))
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
