"""GPU benchmark for a lent accelerator machine: training and evaluation images/s of ViT-B/16, training images/s of
each profile's backbone, distillation images/s of the served student and batch classification images/s.

python -m tools.bench.gpu [--out outputs/bench] [--batch 128] [--budget-s 420] [--backbones vit dinov2 siglip]
python -m tools.bench.gpu --dry-run          # tiny settings, runs on the CPU, for tests

Training (random init, synthetic tensors, AdamW): bf16 autocast + SDPA attention vs plain fp32 eager (TF32 off).
Per backbone (har_vit: ViT-B/16, har_dinov2: DINOv2-base ViT-B/14, har_siglip: SigLIP-base ViT-B/16 vision tower),
bf16 autocast + SDPA at the profiles' 224 px.
Evaluation: ours (batched, bf16 autocast, SDPA, inference_mode; model-only and end to end through
lib.predict.dataset_logits) vs the per-image fp32 loop (HF image processor + model, batch 1).
Distillation: the student of the profile's export.student_layers blocks (lib.distill.build_student) trained against
the frozen ViT-B/16 teacher with lib.distill.distillation_loss (the profile's temperature and alpha), bf16 + SDPA:
one teacher forward and one student step per batch, as the export stage distils.
Batch classification: lib.batch over generated JPEGs with the int8 ONNX export of ViT-B/16 and of the student. It
runs on the machine's CPU cores (ONNX Runtime's CPU provider, as served), not on the GPU.
Refuses to run without CUDA unless --dry-run: CPU numbers are never reported as GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lib.params import ROOT

BACKBONES = ("vit", "dinov2", "siglip")  # har_vit, har_dinov2, har_siglip


def positive_int(text: str) -> int:
    """argparse type: a count that must be at least 1 (0 or a negative count would measure nothing)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(
        prog="python -m tools.bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench", help="where gpu-<timestamp>.json goes")
    ap.add_argument("--dry-run", action="store_true", help="tiny model and sizes; allowed on the CPU (for tests)")
    ap.add_argument("--batch", type=positive_int, help="training batch (default 128, dry run 4)")
    ap.add_argument("--steps", type=positive_int, help="timed training steps per mode (default 20, dry run 2)")
    ap.add_argument(
        "--eval-images", type=positive_int, help="images for the end-to-end evaluation (default 2048, dry run 8)"
    )
    ap.add_argument(
        "--loop-images", type=positive_int, help="images for the per-image fp32 loop (default 200, dry run 4)"
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new parts after this many seconds")
    ap.add_argument(
        "--backbones",
        nargs="*",
        choices=BACKBONES,
        default=list(BACKBONES),
        help="backbones whose bf16 + SDPA training images/s are measured (none: skip)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        default=ROOT / "params" / "har_vit.yaml",
        help="params whose export.student_layers, distill_temperature and distill_alpha the distillation uses",
    )
    ap.add_argument(
        "--student-layers", type=positive_int, help="student blocks (default: the profile's export.student_layers)"
    )
    ap.add_argument(
        "--batch-images", type=positive_int, help="generated JPEGs for batch classification (default 1000, dry run 12)"
    )
    ap.add_argument(
        "--ort-threads",
        type=positive_int,
        help="ONNX Runtime intra-op threads for batch classification (default: ONNX Runtime's choice, dry run 1)",
    )
    return ap.parse_args(argv)


def vit_config(dry_run: bool, attn: str) -> Any:
    """ViT-B/16 at 224 px (ViTConfig defaults), or the tiny project default for a dry run; 15 labels."""
    from transformers import ViTConfig

    from lib.params import VitConfig

    cfg = ViTConfig(**VitConfig().model_dump(), num_labels=15) if dry_run else ViTConfig(num_labels=15)
    cfg._attn_implementation = attn
    return cfg


def new_model(dry_run: bool, attn: str, device: str, backbone: str = "vit") -> Any:
    """A randomly initialised classifier with 15 labels on the device: ViT-B/16 (vit_config), or another profile's
    backbone (backbone_classifier)."""
    import torch
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    if backbone != "vit":
        return backbone_classifier(backbone, dry_run, attn).to(device)
    return ViTForImageClassification(vit_config(dry_run, attn)).to(device)


def backbone_classifier(backbone: str, dry_run: bool, attn: str) -> Any:
    """DINOv2-base (position embeddings for 518 px, as facebook/dinov2-base) or SigLIP-base's vision tower with a
    15-class head; the tiny stand-ins of tools.hub_cache for a dry run."""
    import transformers as tf

    from tools.hub_cache import TINY_DINOV2, TINY_SIGLIP_TEXT, TINY_VIT

    if backbone == "dinov2":
        model = tf.Dinov2ForImageClassification(
            tf.Dinov2Config(**(TINY_DINOV2 if dry_run else {"image_size": 518, "patch_size": 14}), num_labels=15)
        )
    elif backbone == "siglip":
        tiny = {"vision_config": TINY_VIT, "text_config": TINY_SIGLIP_TEXT} if dry_run else {}
        model = tf.SiglipForImageClassification(tf.SiglipConfig(**tiny, num_labels=15))
    else:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    model.set_attn_implementation(attn)
    return model


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_speed(step: Callable[[], Any], batch: int, warmup: int, steps: int, device: str) -> dict:
    """Images/s of `steps` calls of step on `batch` images after `warmup` untimed ones (queued GPU work included),
    with the GPU's peak memory from the first call on (NaN on the CPU)."""
    import torch

    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "batch": batch,
        "steps": steps,
        "seconds": seconds,
        "images_per_s": batch * steps / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan"),
    }


def halve_on_oom(measure: Callable[[int], dict], batch: int) -> dict:
    """measure(batch), or measure(batch // 2) once when the GPU runs out of memory."""
    import torch

    try:
        return measure(batch)
    except torch.OutOfMemoryError:
        logging.getLogger(__name__).warning("out of GPU memory at batch %d: measuring at %d", batch, batch // 2)
    # Outside the handler: the failed attempt's frames, and the tensors they held, are released by now.
    torch.cuda.empty_cache()
    return measure(max(1, batch // 2))


def train_speed(
    dry_run: bool, device: str, mode: str, batch: int, steps: int, warmup: int = 3, backbone: str = "vit"
) -> dict:
    """Training images/s: mode 'bf16_sdpa' (bf16 autocast + SDPA) or 'fp32_eager' (fp32, eager attention, TF32 off),
    at the profiles' input size: 224 px (DINOv2's 518-px position embeddings interpolated); tiny sizes in a dry run."""
    import torch

    attn = "sdpa" if mode == "bf16_sdpa" else "eager"
    model = new_model(dry_run, attn, device, backbone).train()
    size = model.config.image_size if backbone == "vit" else 32 if dry_run else 224
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 15, (batch,), device=device)
    use_bf16 = mode == "bf16_sdpa" and device.startswith("cuda")

    def step(model: Any, opt: Any) -> float:  # both passed in: the caller deletes them to free the GPU
        with torch.autocast(
            device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=use_bf16
        ):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    speed = step_speed(partial(step, model, opt), batch, warmup, steps, device)
    del model, opt
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"mode": mode, "backbone": backbone, "image_size": size, **speed}


def synthetic_dataset(n: int, seed: int = 0) -> Any:
    """An in-memory datasets.Dataset of n photo-sized JPEG-decodable images with labels."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from tools.bench.cpu import HAR_LABELS, synthetic_image

    rng = np.random.default_rng(seed)
    images = [synthetic_image(rng) for _ in range(n)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=HAR_LABELS)})
    return Dataset.from_dict({"image": images, "label": [i % 15 for i in range(n)]}, features=features)


def eval_speed(dry_run: bool, device: str, n_images: int, n_loop: int, batch: int = 256) -> dict:
    """Evaluation images/s: ours (bf16, batched: model-only and through dataset_logits) vs the per-image fp32 loop."""
    import torch
    from transformers import ViTImageProcessor

    from lib.predict import dataset_logits
    from lib.transforms import ImageSpec, to_rgb

    model = new_model(dry_run, "sdpa", device).eval()
    size = model.config.image_size
    spec = ImageSpec(size=size)
    on_gpu = device.startswith("cuda")
    # model only: pre-made tensors, batched, bf16 autocast
    x = torch.randn(batch, 3, size, size, device=device)
    with (
        torch.inference_mode(),
        torch.autocast(device_type="cuda" if on_gpu else "cpu", dtype=torch.bfloat16, enabled=on_gpu),
    ):
        for _ in range(2):
            model(pixel_values=x)
        sync(device)
        reps = 2 if dry_run else 10
        start = time.perf_counter()
        for _ in range(reps):
            model(pixel_values=x)
        sync(device)
        model_only = batch * reps / (time.perf_counter() - start)
    ds = synthetic_dataset(max(n_images, n_loop))
    workers = 0 if dry_run else min(8, os.cpu_count() or 1)
    dataset_logits(
        model, ds.select(range(min(len(ds), batch))), spec, batch_size=batch, num_workers=workers, device=device
    )
    start = time.perf_counter()
    dataset_logits(model, ds.select(range(n_images)), spec, batch_size=batch, num_workers=workers, device=device)
    sync(device)
    end_to_end = n_images / (time.perf_counter() - start)
    # the per-image fp32 loop: HF processor + eager fp32 model, batch 1
    ref = new_model(dry_run, "sdpa", device).eval()
    processor = ViTImageProcessor(size={"height": size, "width": size})
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        for i in range(min(2, n_loop)):
            ref(**processor(images=to_rgb(ds[i]["image"]), return_tensors="pt").to(device))
        sync(device)
        start = time.perf_counter()
        for i in range(n_loop):
            ref(**processor(images=to_rgb(ds[i]["image"]), return_tensors="pt").to(device)).logits.float().cpu()
        sync(device)
        loop = n_loop / (time.perf_counter() - start)
    del model, ref
    return {
        "ours_model_only_images_per_s": model_only,
        "ours_dataset_logits_images_per_s": end_to_end,
        "reference_loop_images_per_s": loop,
        "ratio_dataset_logits_vs_loop": end_to_end / loop,
        "ratio_model_only_vs_loop": model_only / loop,
        "eval_batch": batch,
        "num_workers": workers,
        "images": n_images,
        "loop_images": n_loop,
    }


def student_plan(args: argparse.Namespace) -> dict:
    """The student's depth, the blocks it keeps and the distillation settings: the profile's export.student_layers
    (or --student-layers), temperature, alpha and train.label_smoothing. A dry run's tiny teacher has fewer blocks
    than a real student keeps, and build_student refuses a student deeper than its teacher: there the depth is capped
    at half the teacher's blocks. Raises ValueError before anything is measured when the depth does not fit."""
    from lib.distill import kept_blocks
    from lib.params import load_params
    from tools.bench.cpu import student_layers

    p = load_params(args.profile)
    layers, source = student_layers(args.profile, args.student_layers)
    teacher_blocks = vit_config(args.dry_run, "sdpa").num_hidden_layers
    if args.dry_run and layers > teacher_blocks // 2:
        layers, source = max(1, teacher_blocks // 2), f"{source}, capped at half the tiny teacher's blocks (dry run)"
    return {
        "student_layers": layers,
        "student_layers_source": source,
        "teacher_blocks": teacher_blocks,
        "kept_blocks": kept_blocks(teacher_blocks, layers),  # ValueError naming the depth when it does not fit
        "temperature": p.export.distill_temperature,
        "alpha": p.export.distill_alpha,
        "label_smoothing": p.train.label_smoothing,
    }


def distill_speed(dry_run: bool, device: str, batch: int, steps: int, plan: dict, warmup: int = 3) -> dict:
    """Distillation training images/s: per batch the frozen ViT-B/16 teacher's forward pass (no_grad) and the
    student's step (lib.distill.build_student of it, lib.distill.distillation_loss, AdamW); bf16 autocast + SDPA on
    the GPU, fp32 on the CPU; tiny sizes in a dry run."""
    import torch

    from lib.distill import build_student, distillation_loss
    from lib.model import encoder_layers

    teacher = new_model(dry_run, "sdpa", device).eval().requires_grad_(False)
    student = build_student(teacher, plan["student_layers"]).train().requires_grad_(True)
    size = teacher.config.image_size
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 15, (batch,), device=device)
    on_gpu = device.startswith("cuda")

    def step(teacher: Any, student: Any, opt: Any) -> float:  # passed in: the caller deletes them to free the GPU
        with torch.autocast(device_type="cuda" if on_gpu else "cpu", dtype=torch.bfloat16, enabled=on_gpu):
            with torch.no_grad():
                teacher_logits = teacher(pixel_values=x).logits
            loss = distillation_loss(
                student(pixel_values=x).logits,
                teacher_logits,
                y,
                plan["temperature"],
                plan["alpha"],
                plan["label_smoothing"],
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    speed = step_speed(partial(step, teacher, student, opt), batch, warmup, steps, device)
    blocks = {
        "student_blocks": len(encoder_layers(student)),
        "teacher_blocks": len(encoder_layers(teacher)),
        "kept_blocks": list(student.config.distilled_from_blocks),
    }
    del teacher, student, opt
    if on_gpu:
        torch.cuda.empty_cache()
    return {
        "mode": "bf16_sdpa" if on_gpu else "fp32_sdpa",
        "image_size": size,
        **speed,
        **blocks,
        "student_layers_source": plan["student_layers_source"],
        "temperature": plan["temperature"],
        "alpha": plan["alpha"],
    }


def batch_classify_speed(dry_run: bool, n_images: int, threads: int | None, plan: dict, batch_size: int = 32) -> dict:
    """lib.batch images/s over n generated JPEGs with the int8 ONNX exports of a random ViT-B/16 (tiny in a dry run)
    and of its student, on the CPU through ONNX Runtime's CPU provider, as batch classification runs when served."""
    import onnxruntime
    import psutil

    from lib.batch.classify import classify
    from lib.predict import read_serving
    from tools.bench.cpu import build_random_run, build_student_run, prepare_export, write_synthetic

    workers = 2  # decoding threads, python -m lib.batch's default
    rows = {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-batch-") as tmp:
        work = Path(tmp)
        write_synthetic(work / "images", n_images)
        teacher_root, _ = prepare_export(build_random_run(work, quick=dry_run), work, random_weights=True)
        models = {
            "teacher_int8": (teacher_root, "tiny ViT (dry run)" if dry_run else "ViT-B/16, 224 px"),
            "student_int8": (
                build_student_run(teacher_root / "model", work, plan["student_layers"]),
                f"student, {plan['student_layers']} of {plan['teacher_blocks']} blocks",
            ),
        }
        for name, (root, model) in models.items():
            start = time.perf_counter()
            out = work / f"out-{name}"
            summary = classify(
                str(root), work / "images", out, batch_size=batch_size, threads=threads, workers=workers, progress=False
            )
            wall = time.perf_counter() - start
            rows[name] = {
                "model": model,
                "file": read_serving(root)["file"],
                "variant": summary["variant"],
                "n_images": n_images,
                "images_classified": int(summary["images_classified"]),
                "errors": int(summary["errors"]),
                "images_per_s": summary["run"]["images_per_s"],
                "end_to_end_images_per_s": summary["images_classified"] / wall,  # model loading and summary included
            }
    return {
        "runs_on": "CPU: ONNX Runtime's CPUExecutionProvider (lib.predict.onnx_session) on the machine's cores; "
        "the GPU is not used",
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers_available": onnxruntime.get_available_providers(),
        "cpu_count": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ort_intra_op_threads": threads or "ONNX Runtime's default (one per physical core)",
        "decode_workers": workers,
        "batch_size": batch_size,
        "n_images": n_images,
        "images": "generated JPEGs (tools.bench.cpu.write_synthetic), 160-480 x 120-360 px",
        "rows": rows,
    }


def run(args: argparse.Namespace) -> dict:
    """Every measurement within the time budget; skipped parts are named in the result."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dry = args.dry_run
    batch = args.batch or (4 if dry else 128)
    steps = args.steps or (2 if dry else 20)
    n_eval = args.eval_images or (8 if dry else 2048)
    n_loop = args.loop_images or (4 if dry else 200)
    n_batch = args.batch_images or (12 if dry else 1000)
    ort_threads = args.ort_threads or (1 if dry else None)
    plan = student_plan(args)  # fails here, before anything is measured, when the student does not fit
    begin = time.perf_counter()
    result: dict[str, Any] = {
        "timestamp": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "dry_run": dry,
        "device": device,
        "card": torch.cuda.get_device_name(0) if cuda else "cpu (dry run: not GPU numbers)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "model": "tiny ViT (dry run)" if dry else "ViT-B/16, 224 px, random init",
        "train": {},
        "skipped": [],
    }
    print(f"device: {result['card']}", flush=True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for mode in ("fp32_eager", "bf16_sdpa"):
        if time.perf_counter() - begin > args.budget_s:
            result["skipped"].append(f"train {mode}")
            continue
        result["train"][mode] = halve_on_oom(lambda b, mode=mode: train_speed(dry, device, mode, b, steps), batch)
        print(f"train {mode}: {result['train'][mode]['images_per_s']:.1f} images/s", flush=True)
    if len(result["train"]) == 2:
        result["train_speedup_bf16_sdpa"] = (
            result["train"]["bf16_sdpa"]["images_per_s"] / result["train"]["fp32_eager"]["images_per_s"]
        )
    result["train_backbones"] = {}
    for backbone in args.backbones:
        if backbone == "vit" and "bf16_sdpa" in result["train"]:
            result["train_backbones"][backbone] = result["train"]["bf16_sdpa"]
            continue
        if time.perf_counter() - begin > args.budget_s:
            result["skipped"].append(f"train {backbone}")
            continue
        result["train_backbones"][backbone] = halve_on_oom(
            lambda b, backbone=backbone: train_speed(dry, device, "bf16_sdpa", b, steps, backbone=backbone), batch
        )
        print(f"train {backbone} bf16_sdpa: {result['train_backbones'][backbone]['images_per_s']:.1f} images/s")
    if time.perf_counter() - begin > args.budget_s:
        result["skipped"].append("eval")
    else:
        result["eval"] = eval_speed(dry, device, n_eval, n_loop)
        print(f"eval: {json.dumps(result['eval'])}", flush=True)
    if time.perf_counter() - begin > args.budget_s:
        result["skipped"].append("distill")
    else:
        result["distill"] = d = halve_on_oom(lambda b: distill_speed(dry, device, b, steps, plan), batch)
        print(
            f"distill {d['mode']} (student of {d['student_blocks']}/{d['teacher_blocks']} blocks, teacher forward "
            f"included): {d['images_per_s']:.1f} images/s",
            flush=True,
        )
    if time.perf_counter() - begin > args.budget_s:
        result["skipped"].append("batch_classify")
    else:
        result["batch_classify"] = bc = batch_classify_speed(dry, n_batch, ort_threads, plan)
        for name, row in bc["rows"].items():
            print(
                f"batch classify {name} ({row['file']}, ONNX Runtime CPU, {bc['cpu_count']} cores, intra-op threads: "
                f"{ort_threads or 'default'}): {row['images_per_s']:.1f} images/s over {row['images_classified']} "
                "images",
                flush=True,
            )
    result["seconds"] = time.perf_counter() - begin
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run, print, write outputs/bench/gpu-<timestamp>.json; exit 2 without CUDA (unless --dry-run)."""
    import torch

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available() and not args.dry_run:
        print(
            "error: CUDA is not available; refusing to report CPU numbers as GPU numbers "
            "(use --dry-run to test the script)",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{result['timestamp']}{'-dry' if result['dry_run'] else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    if "train_speedup_bf16_sdpa" in result:
        print(f"training speed-up bf16+SDPA vs fp32 eager: {result['train_speedup_bf16_sdpa']:.2f}x")
    if "eval" in result:
        print(
            "evaluation speed-up, dataset_logits bf16 vs per-image fp32 loop: "
            f"{result['eval']['ratio_dataset_logits_vs_loop']:.2f}x"
        )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
