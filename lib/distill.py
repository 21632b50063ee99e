"""A cheaper student for serving: fewer encoder blocks taken from the fine-tuned teacher, then trained by knowledge
distillation on the training split through the train stage's Trainer (GPU, bf16, DDP as the train stage runs).

The export stage (lib.export.run_export) calls `distill` when `export.student_layers` is set, exports the student to
ONNX like the teacher and lets the serving gate choose between them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from lib.params import Params

STUDENT_DIR = "student"  # <run>/export/student/: the student's ONNX files; model/ inside it, the student itself
# Families whose blocks are stages of different widths (Swin, ConvNeXt): dropping a stage changes the shapes the
# next one expects, so a student cannot be cut from them.
HIERARCHICAL = ("swin", "convnext")


def kept_blocks(total: int, keep: int) -> list[int]:
    """Indices of the `keep` teacher blocks a student keeps, evenly spread from the first block to the last.

    The first block is kept because it is the one trained on the patch embeddings' output, the last because the
    final norm and the head were trained on its output; the others are evenly spaced between them, so every depth
    of the teacher's computation keeps a representative (12 -> 6 keeps 0, 2, 4, 7, 9, 11, DistilBERT's choice;
    4 -> 2 keeps 0 and 3). One block: the last, for the head's sake.
    """
    if not 1 <= keep <= total:
        raise ValueError(f"a student keeps between 1 and {total} encoder blocks of its teacher, not {keep}")
    if keep == 1:
        return [total - 1]
    # Spacing (total - 1) / (keep - 1) >= 1, so the rounded positions are distinct and increasing.
    return [int(i) for i in np.rint(np.linspace(0, total - 1, keep))]


def depth_config(model: Any) -> Any:
    """The config object holding the encoder's num_hidden_layers (SigLIP keeps it in vision_config)."""
    cfg = model.config
    vision = getattr(cfg, "vision_config", None)
    if vision is not None and hasattr(vision, "num_hidden_layers"):
        return vision
    if not hasattr(cfg, "num_hidden_layers"):
        raise ValueError(f"{type(model).__name__} has no num_hidden_layers in its config: cannot make a student")
    return cfg


def build_student(teacher: Any, num_layers: int) -> Any:
    """A copy of the fine-tuned teacher (same family, embeddings, final norm and head) keeping `num_layers` of its
    encoder blocks, chosen by kept_blocks; the kept blocks' weights equal the teacher's. The teacher is unchanged.

    The blocks are found through lib.model's FAMILIES table; a family it does not list, or a hierarchical one
    (Swin, ConvNeXt), is refused with a ValueError naming it.
    """
    import torch

    from lib.model import layout

    parts = layout(teacher)  # ValueError naming an unsupported family
    if parts.model_type in HIERARCHICAL:
        raise ValueError(
            f"a student cannot be cut from a {parts.model_type} model: its encoder is a sequence of stages of "
            "different widths, and dropping one breaks the shapes the next expects"
        )
    keep = kept_blocks(len(parts.blocks), int(num_layers))
    student = copy.deepcopy(teacher)
    path = parts.block_prefix.rstrip(".")  # the block list's module name, e.g. vit.layers or vit.encoder.layer
    owner_path, _, attr = path.rpartition(".")
    owner = student.get_submodule(owner_path) if owner_path else student
    blocks = getattr(owner, attr)
    setattr(owner, attr, torch.nn.ModuleList([blocks[i] for i in keep]))
    cfg = depth_config(student)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "stage_names", None) is not None:  # backbone configs (BEiT, DINOv2) name one stage per block
        cfg.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(keep) + 1)]
        cfg.set_output_features_output_indices(out_features=None, out_indices=None)  # the last block, the default
    for new, block in enumerate(getattr(owner, attr)):  # modules that know their depth (layer_idx) learn the new one
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    student.config.distilled_from_blocks = keep  # saved with config.json: which teacher blocks the student began as
    return student


def distillation_loss(
    student_logits: Any,
    teacher_logits: Any,
    labels: Any,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Any:
    """alpha x T^2 x KL(teacher || student) at temperature T, plus (1 - alpha) x cross-entropy with the labels (int
    ids or mixed soft targets, smoothed as in training). The T^2 keeps the distillation term's gradients at the
    scale of the label term's whatever T is (Hinton et al., 2015). reduction: "mean" or "sum" over the batch."""
    import torch

    from lib.train import soft_cross_entropy

    t = float(temperature)
    log_student = torch.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1) * t * t
    ce = soft_cross_entropy(student_logits, labels, label_smoothing, reduction="sum")
    total = alpha * kl.sum() + (1 - alpha) * ce
    return total if reduction == "sum" else total / max(len(kl), 1)


def distill_trainer_class() -> type:
    """The train stage's RecipeTrainer, its loss made the distillation loss against a frozen teacher.

    The teacher runs in eval mode, without gradients, on the very batch the student sees: after the random crops,
    flips and mixup / cutmix, which change every epoch. Logits precomputed once per image would belong to another
    view than the student's; matching the teacher on the same augmented view is what lets a student match it
    closely ("consistent" teaching, Beyer et al. 2022). It costs one teacher forward pass per step.
    Evaluation batches (validation, best checkpoint) get the train stage's label loss, so val loss compares.
    """
    import torch
    from transformers import Trainer

    from lib.train import recipe_trainer_class

    class DistillTrainer(recipe_trainer_class()):
        teacher: Any = None
        temperature: float = 1.0
        alpha: float = 1.0
        label_smoothing: float = 0.0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The Trainer calls compute_loss_func after its forward pass and scales the result for DDP; the label
            # loss given by build_trainer stays in use for evaluation.
            self.label_loss = self.compute_loss_func
            self.compute_loss_func = self.loss
            self.teacher_logits = None

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
            self.teacher_logits = None
            if model.training:
                if self.mixer is not None:
                    inputs = self.mixer(inputs)
                pixels = inputs["pixel_values"]
                if next(self.teacher.parameters()).device != pixels.device:
                    self.teacher.to(pixels.device)
                # autocast: the teacher runs in the precision the student trains in (bf16 / fp16 on a GPU)
                with torch.no_grad(), self.accelerator.autocast():
                    self.teacher_logits = self.teacher(pixel_values=pixels).logits
            # Trainer's own step, not RecipeTrainer's, which would mix the batch a second time.
            return Trainer.compute_loss(
                self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        def loss(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
            if self.teacher_logits is None:
                return self.label_loss(outputs, labels, num_items_in_batch=num_items_in_batch)
            args = (outputs.logits, self.teacher_logits, labels, self.temperature, self.alpha, self.label_smoothing)
            if num_items_in_batch is None:
                return distillation_loss(*args)
            # Sum over the global count, as lib.train.loss_function does: the same loss with 1 or N processes.
            return distillation_loss(*args, reduction="sum") / num_items_in_batch

    return DistillTrainer


def distill_params(p: Params) -> Params:
    """The params the distillation's Trainer runs with: train's recipe (batch, learning rate, schedule, augmentation,
    precision, processes), export.distill_epochs / distill_max_steps for its length, never resumed."""
    tp = p.train.model_copy(
        update={"epochs": p.export.distill_epochs, "max_steps": p.export.distill_max_steps, "resume": False}
    )
    return p.model_copy(update={"train": tp})


def student_dir(out: Path) -> Path:
    """<run>/export/student: the student's ONNX files, its model/ folder and its distillation record."""
    from lib.predict import EXPORT_DIR

    return Path(out) / EXPORT_DIR / STUDENT_DIR


def distill(p: Params, out: Path) -> dict:
    """Cut a student of export.student_layers blocks from <run>/model, distil it on the training split, save it to
    <run>/export/student/model (best checkpoint by validation accuracy); return a summary (also written there as
    distill_summary.json by process 0)."""
    import torch
    from transformers import set_seed

    from lib.data import eval_batch_transform, load_splits, train_batch_transform
    from lib.model import count_parameters, encoder_layers, load_model, save_model
    from lib.train import build_trainer
    from lib.transforms import load_spec

    ep = p.export
    if ep.student_layers is None:
        raise ValueError("export.student_layers is null: there is no student to distil")
    out = Path(out)
    dp = distill_params(p)
    tp = dp.train
    if tp.torch_threads:
        torch.set_num_threads(tp.torch_threads)
    model_dir, work = out / "model", student_dir(out)
    spec = load_spec(model_dir)
    splits = load_splits(out / "data")
    teacher = load_model(model_dir)  # eval mode: no dropout, and it stays so (the Trainer never sees it)
    teacher.requires_grad_(False)
    set_seed(p.run.seed)
    student = build_student(teacher, ep.student_layers)
    student.requires_grad_(True)
    train_ds = splits["train"].with_transform(train_batch_transform(spec, tp.augment.model_dump()))
    val_ds = splits["validation"].with_transform(eval_batch_transform(spec))
    trainer = build_trainer(dp, student, train_ds, val_ds, work, trainer_class=distill_trainer_class())
    trainer.teacher = teacher
    trainer.temperature, trainer.alpha, trainer.label_smoothing = (
        ep.distill_temperature,
        ep.distill_alpha,
        tp.label_smoothing,
    )
    start = time.time()
    result = trainer.train()
    summary = {
        "student_layers": ep.student_layers,
        "teacher_layers": len(encoder_layers(teacher)),
        "kept_blocks": list(student.config.distilled_from_blocks),
        "temperature": ep.distill_temperature,
        "alpha": ep.distill_alpha,
        "epochs": ep.distill_epochs,
        "max_steps": ep.distill_max_steps,
        "global_steps": trainer.state.global_step,
        "runtime_s": round(time.time() - start, 1),
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        "best_val_accuracy": trainer.state.best_metric,
        "parameters": count_parameters(trainer.model)["total"],
        "teacher_parameters": count_parameters(teacher)["total"],
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
    }
    trainer.accelerator.wait_for_everyone()  # every process has reloaded the best checkpoint before it is deleted
    if trainer.is_world_process_zero():
        save_model(trainer.model, None, spec, work / "model")
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the best one is saved above
        (work / "distill_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        (work / "distill_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_distillation(p: Params, out: Path) -> dict:
    """distill in this process, or in train.num_gpus x train.nodes DDP processes through torchrun (as the train stage
    launches them) when the recipe asks for more than one; return the summary."""
    from lib.params import save_params
    from lib.train import distributed, launch_distributed

    if not distributed(p.train):
        return distill(p, out)
    work = student_dir(out)
    resolved = save_params(p, work / "params.yaml")
    launch_distributed(resolved, p.train, module="lib.distill")
    return json.loads((work / "distill_summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """python -m lib.distill PARAMS_FILE [key=value ...], alone or under torchrun."""
    from lib.train import torchrun_main

    return torchrun_main(distill, "lib.distill", argv)


if __name__ == "__main__":
    raise SystemExit(main())
