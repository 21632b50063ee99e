"""GPU benchmark for a lent accelerator machine: training and evaluation images/s of ViT-B/16, and training images/s
of each profile's backbone.

python -m lib.bench.gpu [--out outputs/bench] [--batch 128] [--budget-s 420] [--backbones vit dinov2 siglip]
python -m lib.bench.gpu --dry-run          # tiny settings, runs on the CPU, for tests

Training (random init, synthetic tensors, AdamW): bf16 autocast + SDPA attention vs plain fp32 eager (TF32 off).
Per backbone (har_vit: ViT-B/16, har_dinov2: DINOv2-base ViT-B/14, har_siglip: SigLIP-base ViT-B/16 vision tower),
bf16 autocast + SDPA at the profiles' 224 px.
Evaluation: ours (batched, bf16 autocast, SDPA, inference_mode; model-only and end to end through
lib.predict.dataset_logits) vs the per-image fp32 loop (HF image processor + model, batch 1).
Refuses to run without CUDA unless --dry-run: CPU numbers are never reported as GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from lib.params import ROOT

BACKBONES = ("vit", "dinov2", "siglip")  # har_vit, har_dinov2, har_siglip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(
        prog="python -m lib.bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench", help="where gpu-<timestamp>.json goes")
    ap.add_argument("--dry-run", action="store_true", help="tiny model and sizes; allowed on the CPU (for tests)")
    ap.add_argument("--batch", type=int, help="training batch (default 128, dry run 4)")
    ap.add_argument("--steps", type=int, help="timed training steps per mode (default 20, dry run 2)")
    ap.add_argument("--eval-images", type=int, help="images for the end-to-end evaluation (default 2048, dry run 8)")
    ap.add_argument("--loop-images", type=int, help="images for the per-image fp32 loop (default 200, dry run 4)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new parts after this many seconds")
    ap.add_argument(
        "--backbones",
        nargs="*",
        choices=BACKBONES,
        default=list(BACKBONES),
        help="backbones whose bf16 + SDPA training images/s are measured (none: skip)",
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
    15-class head; the tiny stand-ins of lib.rehearsal.hub_cache for a dry run."""
    import transformers as tf

    from lib.rehearsal.hub_cache import TINY_DINOV2, TINY_SIGLIP_TEXT, TINY_VIT

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
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step(model: Any, opt: Any) -> float:  # both passed in: the caller deletes them to free the GPU
        with torch.autocast(
            device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=use_bf16
        ):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step(model, opt)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(model, opt)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    del model, opt
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "mode": mode,
        "backbone": backbone,
        "image_size": size,
        "batch": batch,
        "steps": steps,
        "seconds": seconds,
        "images_per_s": batch * steps / seconds,
        "peak_gib": peak,
    }


def synthetic_dataset(n: int, seed: int = 0) -> Any:
    """An in-memory datasets.Dataset of n photo-sized JPEG-decodable images with labels."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from lib.bench.cpu import HAR_LABELS, synthetic_image

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
        try:
            result["train"][mode] = train_speed(dry, device, mode, batch, steps)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            result["train"][mode] = train_speed(dry, device, mode, batch // 2, steps)
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
        try:
            result["train_backbones"][backbone] = train_speed(dry, device, "bf16_sdpa", batch, steps, backbone=backbone)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            result["train_backbones"][backbone] = train_speed(
                dry, device, "bf16_sdpa", batch // 2, steps, backbone=backbone
            )
        print(f"train {backbone} bf16_sdpa: {result['train_backbones'][backbone]['images_per_s']:.1f} images/s")
    if time.perf_counter() - begin > args.budget_s:
        result["skipped"].append("eval")
    else:
        result["eval"] = eval_speed(dry, device, n_eval, n_loop)
        print(f"eval: {json.dumps(result['eval'])}", flush=True)
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
