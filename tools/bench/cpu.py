"""CPU benchmark: the reference PyTorch path vs our serving path (ONNX Runtime via load_predictor).

python -m tools.bench [--model-dir RUN] [--images DIR] [--quick] [--out outputs/bench]

Measures, on the ViT-B/16 architecture at 224 px (random weights unless a trained run is given), with 2 threads:
1. latency per image, batch 1: HF image processor + PyTorch fp32 model (reference) vs load_predictor (ours) and
   vs the int8 student of export.student_layers blocks (lib.distill.build_student). Each path is first timed
   alone, the reference before any ONNX Runtime session exists; then the paths are alternated image by image so
   that drift on a shared machine cancels in the pair-by-pair ratio. Our sessions never spin between runs
   (lib.predict.onnx_session), so they leave the cores to the reference in between;
2. peak RSS of a fresh process that loads each path and predicts once;
3. evaluation throughput over >= 500 images: the reference per-image loop vs dataset_logits (the evaluate
   stage's batched path), vs batched ONNX Runtime (the export stage's check path) and vs batch classification
   (lib.batch: draft decoding in threads ahead of batched ONNX Runtime), served model and student.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lib.batch.images import IMAGE_SUFFIXES
from lib.labels import HAR_CLASSES
from lib.params import ROOT
from lib.predict import EXPORT_DIR, SERVING_FILE, load_predictor, model_folder, read_serving
from tools.machine import cpu_snapshot, machine_info, others_percent

HAR_LABELS = list(HAR_CLASSES)  # labels of the generated benchmark photos
DEFAULT_STUDENT_LAYERS = 6  # when the profile sets no export.student_layers: half of ViT-B/16's 12 blocks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model-dir", type=Path, help="trained run folder (model/ and maybe export/); default: random ViT-B/16"
    )
    ap.add_argument("--images", type=Path, help="folder of images (searched recursively); default: generated images")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench", help="where <timestamp>.json goes")
    ap.add_argument("--quick", action="store_true", help="tiny model, few iterations (same JSON structure)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--iters", type=int, help="latency pairs (default 40, quick 3)")
    ap.add_argument("--eval-images", type=int, help="images for the throughput comparison (default 500, quick 16)")
    ap.add_argument("--eval-batch", type=int, default=32, help="batch size of our evaluation and batch paths")
    ap.add_argument(
        "--profile",
        type=Path,
        default=ROOT / "params" / "har_vit.yaml",
        help="profile whose export.student_layers sizes the student (default params/har_vit.yaml)",
    )
    ap.add_argument("--student-layers", type=int, help="encoder blocks of the student (default: from --profile)")
    return ap.parse_args(argv)


def synthetic_image(rng: np.random.Generator) -> Image.Image:
    """A photo-sized RGB image: smooth colour fields plus noise, random size and aspect ratio."""
    w, h = int(rng.integers(160, 480)), int(rng.integers(120, 360))
    low = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_synthetic(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Write n synthetic JPEGs into folder/<label>/ (decoding costs like real photos)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / HAR_LABELS[i % len(HAR_LABELS)] / f"synthetic_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(rng).save(path, quality=90)
        paths.append(path)
    return paths


def image_files(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n image files of a folder (recursive), in a seeded random order (classes mixed); cycles if too few."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[order[i % len(files)]] for i in range(n)]


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file to RGB (loaded into memory)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def build_random_run(work: Path, quick: bool) -> Path:
    """Save a random-weight ViT-B/16 (tiny ViT when quick) with its processor and spec under work/model."""
    from lib.model import build_model, save_model
    from lib.params import ModelParams, VitConfig

    cfg = (
        VitConfig()
        if quick
        else VitConfig(
            image_size=224,
            patch_size=16,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        )
    )
    model, processor, spec = build_model(ModelParams(source="config", config=cfg), HAR_LABELS)
    save_model(model, processor, spec, work / "model")
    return work


def prepare_export(root: Path, work: Path, random_weights: bool) -> tuple[Path, dict]:
    """The folder to serve from: root itself if it was exported, else work/ with a fresh export (model/ linked)."""
    from lib.export import FP32_FILE, INT8_FILE, export_model

    serving = read_serving(root)
    if serving is not None:
        return root, serving
    if work != root:
        (work / "model").unlink(missing_ok=True)
        (work / "model").symlink_to(model_folder(root).resolve(), target_is_directory=True)
    info = export_model(work / "model", work / EXPORT_DIR, opset=18, quantize="dynamic")
    serving = {
        "file": INT8_FILE,
        "variant": "int8",
        "fp32_file": FP32_FILE,
        "fused_ops": info["fused_ops"],
        "reason": (
            "random weights: the agreement rule needs a trained model, so the bench serves int8 as the export stage "
            "does for a model that passes it (the fp32 ONNX row shows the other branch)"
            if random_weights
            else "no export/serving.json in the run: exported here with quantize=dynamic, int8 served"
        ),
    }
    (work / EXPORT_DIR / SERVING_FILE).write_text(json.dumps(serving, indent=2))
    return work, serving


def student_layers(profile: Path, override: int | None) -> tuple[int, str]:
    """The student's depth and where it came from: the override, export.student_layers of the profile, or
    DEFAULT_STUDENT_LAYERS when the profile sets none."""
    from lib.params import load_params

    if override:
        return int(override), "--student-layers"
    layers = getattr(load_params(profile).export, "student_layers", None)
    if layers:
        return int(layers), f"export.student_layers of {profile.name}"
    return DEFAULT_STUDENT_LAYERS, f"{profile.name} sets no export.student_layers: {DEFAULT_STUDENT_LAYERS} blocks"


def build_student_run(model_dir: Path, work: Path, layers: int) -> Path:
    """work/student: lib.distill.build_student's cut of the model (not distilled: its speed and memory do not depend
    on its weights) with the teacher's preprocessing, exported like the teacher and served as int8."""
    from lib.distill import build_student
    from lib.export import INT8_FILE, export_model
    from lib.model import load_model, save_model
    from lib.transforms import load_spec

    root = work / "student"
    student = build_student(load_model(model_dir), layers)
    save_model(student, None, load_spec(model_dir), root / "model")
    info = export_model(root / "model", root / EXPORT_DIR, opset=18, quantize="dynamic")
    serving = {"file": INT8_FILE, "files": info["files"], "reason": f"{layers}-block student, int8"}
    (root / EXPORT_DIR / SERVING_FILE).write_text(json.dumps(serving, indent=2))
    return root


def reference_path(model_dir: Path) -> Callable[[Image.Image], np.ndarray]:
    """The reference: HF image processor per image + PyTorch fp32 model, batch 1, softmax."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)

    def predict(image: Image.Image) -> np.ndarray:
        inputs = processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            return model(**inputs).logits.softmax(-1).numpy()

    return predict


def percentiles(times: list[float]) -> dict:
    """p50 / p95 / mean in milliseconds."""
    a = np.asarray(times) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "mean_ms": float(a.mean()),
        "n": len(a),
    }


def alternate(
    paths: dict[str, Callable[[Image.Image], Any]], images: list[Image.Image], iters: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each path, the paths alternated image by image (order rotated each round)."""
    names = list(paths)
    for im in images[:warmup]:
        for name in names:
            paths[name](im)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        im = images[i % len(images)]
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            paths[name](im)
            times[name].append(time.perf_counter() - start)
    return times


_PROBE = r"""
import json, resource, sys, time
kind, where, image, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
from PIL import Image
img = Image.open(image).convert("RGB")
if kind == "reference":
    import torch
    torch.set_num_threads(threads)
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(where).eval()
    processor = AutoImageProcessor.from_pretrained(where)
    with torch.inference_mode():
        model(**processor(images=img, return_tensors="pt")).logits.softmax(-1)
elif kind == "serving":
    from lib.predict import load_predictor
    load_predictor(where, backend="onnx", threads=threads).predict_proba([img])
else:  # an ONNX file, served with the same preprocessing
    from lib.labels import config_labels
    from lib.predict import Predictor, model_folder, onnx_runner, onnx_session, read_temperature
    from lib.transforms import load_spec
    model_dir = model_folder(where)
    run = onnx_runner(onnx_session(kind, threads))
    labels, spec, temperature = config_labels(model_dir), load_spec(model_dir), read_temperature(model_dir)
    Predictor(run, labels, spec, temperature, "onnx", kind).predict_proba([img])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:  # VmHWM: the peak of this process image only (ru_maxrss also carries the parent's size across fork + exec)
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
except (OSError, StopIteration):
    pass
print(json.dumps({
    "peak_rss_mib": peak,
    "seconds": time.perf_counter() - start,
    "torch_imported": "torch" in sys.modules,
    "transformers_imported": "transformers" in sys.modules,
}))
"""


def peak_rss(kind: str, where: Path, image: Path, threads: int) -> dict:
    """Peak RSS (MiB) of a fresh process that loads one path and predicts one image (ru_maxrss of that process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, kind, str(where), str(image), str(threads)],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe '{kind}' failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def eval_dataset(paths: list[Path]) -> Any:
    """A datasets.Dataset (image, label) over image files, decoded lazily like a prepared split."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    labels = [HAR_LABELS.index(p.parent.name) if p.parent.name in HAR_LABELS else 0 for p in paths]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=HAR_LABELS)})
    return Dataset.from_dict({"image": [str(p) for p in paths], "label": labels}, features=features)


def eval_throughput(
    root: Path, model_dir: Path, paths: list[Path], batch_size: int, threads: int
) -> tuple[dict, np.ndarray]:
    """Images/s over the same images: reference per-image loop, dataset_logits (torch, batched), batched ONNX
    (the served file); and the reference's top-1 class of each image."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from lib.export import predictor_logits
    from lib.predict import dataset_logits
    from lib.transforms import load_spec, to_rgb

    ds = eval_dataset(paths)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    start = time.perf_counter()
    ref = []
    with torch.inference_mode():
        for i in range(len(ds)):
            image = to_rgb(ds[i]["image"])
            ref.append(model(**processor(images=image, return_tensors="pt")).logits.numpy()[0])
    t_ref = time.perf_counter() - start
    start = time.perf_counter()
    ours = dataset_logits(model, ds, load_spec(model_dir), batch_size=batch_size, device="cpu")
    t_ours = time.perf_counter() - start
    pred = load_predictor(root, backend="onnx", threads=threads)
    start = time.perf_counter()
    onnx_logits = predictor_logits(pred, ds, batch_size)
    t_onnx = time.perf_counter() - start
    ref = np.stack(ref)
    return {
        "images": len(ds),
        "reference_images_per_s": len(ds) / t_ref,
        "dataset_logits_images_per_s": len(ds) / t_ours,
        "onnx_batched_images_per_s": len(ds) / t_onnx,
        "eval_path": f"lib.predict.dataset_logits (PyTorch fp32, batch {batch_size}, the evaluate stage)",
        "onnx_path": (
            f"lib.export.predictor_logits ({Path(pred.model_file).name}, batch {batch_size}, the export check)"
        ),
        "top1_agreement_dataset_logits_vs_reference": float(np.mean(ours.argmax(1) == ref.argmax(1))),
        "top1_agreement_onnx_vs_reference": float(np.mean(onnx_logits.argmax(1) == ref.argmax(1))),
    }, ref.argmax(1)


def batch_throughput(root: Path, folder: Path, out: Path, reference_top1: np.ndarray, args: argparse.Namespace) -> dict:
    """lib.batch over a folder of links named by image index: its own images/s (decoding, inference and writing the
    parts) and end to end (model loading and summary included); top-1 agreement with the reference loop."""
    import pandas as pd

    from lib.batch.classify import classify

    start = time.perf_counter()
    summary = classify(
        str(root), folder, out, batch_size=args.eval_batch, threads=args.threads, workers=2, progress=False
    )
    wall = time.perf_counter() - start
    table = pd.read_parquet(out / "predictions.parquet")
    index = table["path"].str.slice(0, 5).astype(int).to_numpy()
    top1 = np.asarray([HAR_LABELS.index(label) for label in table["label"]])
    return {
        "images": int(summary["images_classified"]),
        "errors": int(summary["errors"]),
        "variant": summary["variant"],
        "images_per_s": summary["run"]["images_per_s"],
        "end_to_end_images_per_s": summary["images_classified"] / wall,
        "batch_size": args.eval_batch,
        "decode_workers": 2,
        "top1_agreement_vs_reference": float(np.mean(top1 == reference_top1[index])),
    }


def link_images(paths: list[Path], folder: Path) -> Path:
    """A folder of links to paths, named by position (a file listed twice gets two names)."""
    folder.mkdir(parents=True)
    for i, path in enumerate(paths):
        (folder / f"{i:05d}_{path.name}").symlink_to(path.resolve())
    return folder


def run_bench(args: argparse.Namespace) -> dict:
    """Run every measurement and return the result dictionary."""
    import torch

    torch.set_num_threads(args.threads)
    iters = args.iters or (3 if args.quick else 40)
    n_eval = args.eval_images or (16 if args.quick else 500)
    info = machine_info()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=args.out) as tmp:
        work = Path(tmp)
        folder = args.images
        if folder is None:
            folder = work / "images"
            write_synthetic(folder, max(n_eval, 60), seed=0)
        files = image_files(folder, max(n_eval, iters + 2))
        random_weights = args.model_dir is None
        root = build_random_run(work, args.quick) if random_weights else Path(args.model_dir)
        start = time.time()
        serve_root, serving = prepare_export(root, work, random_weights)
        export_s = time.time() - start
        model_dir = model_folder(serve_root)
        layers, layers_source = student_layers(args.profile, args.student_layers)
        teacher_layers = int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])
        if args.quick:  # the tiny model has fewer blocks than a real student keeps
            layers, layers_source = max(1, teacher_layers // 2), "quick: half of the tiny model's blocks"
        start = time.time()
        student_root = build_student_run(model_dir, work, layers)
        student_export_s = time.time() - start
        images = [open_rgb(p) for p in files[: min(len(files), max(iters, 8))]]

        # The reference alone, before this process holds any ONNX Runtime session.
        reference = reference_path(model_dir)
        before = cpu_snapshot()
        alone = alternate({"reference": reference}, images, iters)
        ours = load_predictor(serve_root, backend="onnx", threads=args.threads)
        student = load_predictor(student_root, backend="onnx", threads=args.threads)
        paths: dict[str, Callable[[Image.Image], Any]] = {
            "reference": reference,
            "ours": lambda im, served=ours: served.predict_proba([im]),
            "student": lambda im, served=student: served.predict_proba([im]),
        }
        fp32_path = serve_root / EXPORT_DIR / "model.onnx"
        if fp32_path.is_file() and Path(ours.model_file).name != fp32_path.name:
            from lib.predict import Predictor, onnx_runner, onnx_session

            fp32 = Predictor(
                onnx_runner(onnx_session(fp32_path, args.threads)),
                ours.labels,
                ours.spec,
                ours.temperature,
                "onnx",
                str(fp32_path),
            )
            paths["fp32_onnx"] = lambda im: fp32.predict_proba([im])
        for name, path in paths.items():
            if name != "reference":
                alone |= alternate({name: path}, images, iters)
        contention = {"latency_alone": others_percent(before, cpu_snapshot())}
        before = cpu_snapshot()
        times = alternate(paths, images, iters)
        contention["latency"] = others_percent(before, cpu_snapshot())
        ratios = np.asarray(times["reference"]) / np.asarray(times["ours"])
        student_ratios = np.asarray(times["reference"]) / np.asarray(times["student"])
        latency = {name: percentiles(t) for name, t in times.items()}
        latency_alone = {name: percentiles(t) for name, t in alone.items()}
        rss = {
            "reference": peak_rss("reference", model_dir, files[0], args.threads),
            "serving": peak_rss("serving", serve_root, files[0], args.threads),
            "student": peak_rss("serving", student_root, files[0], args.threads),
        }
        if "fp32_onnx" in paths:
            rss["fp32_onnx"] = peak_rss(str(fp32_path), serve_root, files[0], args.threads)
        del paths, ours, student, reference
        before = cpu_snapshot()
        throughput, reference_top1 = eval_throughput(
            serve_root, model_dir, files[:n_eval], args.eval_batch, args.threads
        )
        contention["eval"] = others_percent(before, cpu_snapshot())
        linked = link_images(files[:n_eval], work / "batch-images")
        before = cpu_snapshot()
        batch = {
            "served": batch_throughput(serve_root, linked, work / "batch-served", reference_top1, args),
            "student": batch_throughput(student_root, linked, work / "batch-student", reference_top1, args),
        }
        contention["batch"] = others_percent(before, cpu_snapshot())
    info["load_average_end"] = list(os.getloadavg())
    info["other_processes_cpu_percent"] = contention
    ref_rate = throughput["reference_images_per_s"]
    result = {
        "timestamp": stamp,
        "machine": info,
        "settings": {
            "threads": args.threads,
            "quick": bool(args.quick),
            "model": "random ViT-B/16 (ViTConfig defaults), 224 px"
            if random_weights and not args.quick
            else ("random tiny ViT (quick)" if random_weights else str(args.model_dir)),
            "images": str(args.images) if args.images else "synthetic JPEGs",
            "latency_pairs": iters,
            "export_seconds": round(export_s, 1),
            "student_export_seconds": round(student_export_s, 1),
            "onnxruntime_spinning": "off (session.intra_op / inter_op.allow_spinning = 0)",
        },
        "serving_model": Path(serving["file"]).name,
        "serving_reason": serving.get("reason", ""),
        "fused_ops": serving.get("fused_ops"),
        "reference_p50_ms": latency["reference"]["p50_ms"],
        "reference_p95_ms": latency["reference"]["p95_ms"],
        "reference_alone_p50_ms": latency_alone["reference"]["p50_ms"],
        "ours_p50_ms": latency["ours"]["p50_ms"],
        "ours_p95_ms": latency["ours"]["p95_ms"],
        "latency_ratio_p50": latency["reference"]["p50_ms"] / latency["ours"]["p50_ms"],
        "latency_ratio_pairwise_median": float(np.median(ratios)),
        "latency_ratio_p50_alone": latency_alone["reference"]["p50_ms"] / latency_alone["ours"]["p50_ms"],
        "latency": latency,
        "latency_alone": latency_alone,
        "student_layers": layers,
        "student_layers_source": layers_source,
        "teacher_layers": teacher_layers,
        "student_p50_ms": latency["student"]["p50_ms"],
        "student_latency_ratio_p50": latency["reference"]["p50_ms"] / latency["student"]["p50_ms"],
        "student_latency_ratio_pairwise_median": float(np.median(student_ratios)),
        "student_latency_ratio_p50_alone": latency_alone["reference"]["p50_ms"] / latency_alone["student"]["p50_ms"],
        "serving_rss_mib": rss["serving"]["peak_rss_mib"],
        "reference_rss_mib": rss["reference"]["peak_rss_mib"],
        "student_rss_mib": rss["student"]["peak_rss_mib"],
        "rss": rss,
        "eval": throughput,
        "eval_throughput_ratio": throughput["dataset_logits_images_per_s"] / ref_rate,
        "eval_onnx_throughput_ratio": throughput["onnx_batched_images_per_s"] / ref_rate,
        "batch": batch,
        "batch_throughput_ratio": batch["served"]["images_per_s"] / ref_rate,
        "batch_student_throughput_ratio": batch["student"]["images_per_s"] / ref_rate,
    }
    return result


def format_table(r: dict) -> str:
    """The result as a plain-text table."""

    def row(name: str, t: dict, rss: float, alone: dict | None = None) -> str:
        solo = f"{alone['p50_ms']:>9.1f}" if alone else f"{'':>9}"
        return f"{name:<44}{t['p50_ms']:>9.1f}{t['p95_ms']:>9.1f}{solo}{rss:>14.0f}"

    m, lat, solo, ev, b = r["machine"], r["latency"], r["latency_alone"], r["eval"], r["batch"]
    busy = m["other_processes_cpu_percent"]
    isa = " ".join(flag for flag, present in m["isa"].items() if present) or "none of " + ", ".join(m["isa"])
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB; threads {r['settings']['threads']}; "
        "other processes used " + " / ".join(f"{busy[k]:.0f}% ({k.replace('_', ' ')})" for k in busy) + " of the CPUs",
        f"ISA: {isa}",
        f"model: {r['settings']['model']}; images: {r['settings']['images']}; served: {r['serving_model']}; "
        f"student: {r['student_layers']} of {r['teacher_layers']} blocks, int8 ({r['student_layers_source']})",
        "",
        f"{'path (alternated; alone = own block)':<44}{'p50 ms':>9}{'p95 ms':>9}{'alone':>9}{'peak RSS MiB':>14}",
        row("reference: HF processor + PyTorch fp32, b=1", lat["reference"], r["reference_rss_mib"], solo["reference"]),
        row("ours: load_predictor -> " + r["serving_model"], lat["ours"], r["serving_rss_mib"], solo["ours"]),
        row(
            f"student: {r['student_layers']} blocks, model.int8.onnx",
            lat["student"],
            r["student_rss_mib"],
            solo["student"],
        ),
    ]
    if "fp32_onnx" in lat:
        rss = r["rss"].get("fp32_onnx", {}).get("peak_rss_mib", float("nan"))
        lines.append(row("(fp32 ONNX, same preprocessing)", lat["fp32_onnx"], rss, solo.get("fp32_onnx")))
    lines += [
        f"latency ratio reference/ours: p50 {r['latency_ratio_p50']:.2f}x, "
        f"pair-by-pair median {r['latency_ratio_pairwise_median']:.2f}x, alone {r['latency_ratio_p50_alone']:.2f}x",
        f"latency ratio reference/student: p50 {r['student_latency_ratio_p50']:.2f}x, "
        f"pair-by-pair median {r['student_latency_ratio_pairwise_median']:.2f}x, "
        f"alone {r['student_latency_ratio_p50_alone']:.2f}x",
        f"reference timed alone (no ONNX Runtime session in the process yet): p50 {r['reference_alone_p50_ms']:.1f} ms"
        f" vs {r['reference_p50_ms']:.1f} ms alternated",
        "",
        f"evaluation throughput over {ev['images']} images (images/s):",
        f"  reference per-image loop       {ev['reference_images_per_s']:8.2f}",
        f"  dataset_logits (evaluate)      {ev['dataset_logits_images_per_s']:8.2f}"
        f"  -> {r['eval_throughput_ratio']:.2f}x",
        f"  batched ONNX (export check)    {ev['onnx_batched_images_per_s']:8.2f}"
        f"  -> {r['eval_onnx_throughput_ratio']:.2f}x",
        f"  lib.batch, served file         {b['served']['images_per_s']:8.2f}"
        f"  -> {r['batch_throughput_ratio']:.2f}x (end to end {b['served']['end_to_end_images_per_s']:.2f})",
        f"  lib.batch, student             {b['student']['images_per_s']:8.2f}"
        f"  -> {r['batch_student_throughput_ratio']:.2f}x (end to end {b['student']['end_to_end_images_per_s']:.2f})",
    ]
    if max(busy.values()) > 5:
        lines.append(
            "warning: other processes were busy during the run; PyTorch with 2 threads slows down far more than "
            "ONNX Runtime under contention, so the ratios are inflated: rerun on a quiet machine"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run, print the table, write outputs/bench/<timestamp>.json."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_bench(args)
    path = args.out / f"{result['timestamp']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
