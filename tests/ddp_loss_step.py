"""One training step of the recipe's Trainer on a fixed global batch of 8 examples; writes loss and grad norm.

Run as `python tests/ddp_loss_step.py OUT` (one process, batch 8) or under
`torchrun --nproc_per_node=2` (two gloo processes, batch 4 each): both see the same global batch.
"""

import json
import os
import sys
from pathlib import Path

import torch

from lib.model import build_model
from lib.params import ModelParams, Params, TrainParams, VitConfig
from lib.train import build_trainer

GLOBAL_BATCH = 8
LABELS = [f"c{i}" for i in range(5)]


def main(out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = VitConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model, _, _ = build_model(ModelParams(config=config), LABELS)
    gen = torch.Generator().manual_seed(1)
    examples = [
        {"pixel_values": torch.randn(3, 16, 16, generator=gen), "labels": torch.tensor(i % 5)}
        for i in range(GLOBAL_BATCH)
    ]
    params = Params(
        train=TrainParams(
            batch_size=GLOBAL_BATCH // world,
            max_steps=1,
            label_smoothing=0.1,
            layer_decay=0.75,
            mixup_alpha=0.0,
            num_workers=0,
        )
    )
    trainer = build_trainer(params, model, examples, examples, out)
    trainer.args.logging_steps = 1  # the recipe logs every 10 steps; this run has one
    trainer.train()
    if trainer.is_world_process_zero():
        logged = next(h for h in trainer.state.log_history if "grad_norm" in h)
        (out / "step.json").write_text(json.dumps({"world_size": world, **logged}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
