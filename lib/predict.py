"""Inference: batched logits over a dataset split (evaluation)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lib.transforms import ImageSpec


def dataset_logits(
    model: Any,
    ds: Any,
    spec: ImageSpec,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    tta_flip: bool = False,
) -> np.ndarray:
    """Logits (N, C) for a split: batched DataLoader, inference_mode, bf16/fp16 autocast on GPU."""
    import torch
    from torch.utils.data import DataLoader

    from lib.data import collate, eval_batch_transform

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    loader = DataLoader(
        ds.with_transform(eval_batch_transform(spec)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=device == "cuda",
        persistent_workers=False,
    )
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    out = []
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=dtype, enabled=device == "cuda"):
        for batch in loader:
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            logits = model(pixel_values=pixels).logits.float()
            if tta_flip:
                logits = (logits + model(pixel_values=pixels.flip(-1)).logits.float()) / 2
            out.append(logits.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels), np.float32)
