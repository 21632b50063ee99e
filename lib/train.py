"""Training with the Hugging Face Trainer: recipe, mixup/cutmix, layer-wise LR decay, progress lines, DDP launch."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lib.params import Params, TrainParams, load_params, run_dir

if TYPE_CHECKING:
    from lib.model import Layout


def device_precision(precision: str) -> dict[str, bool]:
    """TrainingArguments flags for the precision setting ('auto': bf16 on a capable GPU, fp16 on others, fp32 on
    the CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision in ("bf16", "fp16") and not cuda:
        raise ValueError(f"train.precision={precision} needs a CUDA GPU; use fp32 or auto on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not cuda}


def soft_cross_entropy(logits: Any, targets: Any, label_smoothing: float = 0.0, reduction: str = "mean") -> Any:
    """Cross-entropy against int class ids or soft (mixed) target distributions, with label smoothing.

    reduction: "mean" or "sum" over the batch.
    """
    import torch

    n = logits.shape[-1]
    if targets.dtype in (torch.long, torch.int32, torch.int64):
        targets = torch.nn.functional.one_hot(targets.long(), n).to(logits.dtype)
    targets = targets * (1 - label_smoothing) + label_smoothing / n
    losses = -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    return losses.sum() if reduction == "sum" else losses.mean()


def loss_function(label_smoothing: float) -> Callable:
    """A Trainer compute_loss_func: the summed cross-entropy divided by the Trainer's example count.

    The Trainer counts `num_items_in_batch` over the whole step (all gradient-accumulation micro-batches, and
    all processes when `average_tokens_across_devices` is on, the default), then multiplies our loss by the
    number of processes because DDP averages gradients. Sum / global count is therefore the mean over the
    global batch, the same with 1 or N processes. A per-batch mean here would come out N times too large.
    """

    def compute(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        if num_items_in_batch is None:  # evaluation without a count, or a model the Trainer does not count for
            return soft_cross_entropy(outputs.logits, labels, label_smoothing)
        return soft_cross_entropy(outputs.logits, labels, label_smoothing, reduction="sum") / num_items_in_batch

    return compute


def mix_batch(batch: dict, num_labels: int, mixup_alpha: float, cutmix_alpha: float, rng: np.random.Generator) -> dict:
    """Apply mixup or cutmix (one, chosen at random when both are on) to a collated batch; labels become soft."""
    import torch

    pixels, labels = batch["pixel_values"], batch["labels"]
    modes = [m for m, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not modes or len(labels) < 2:
        return batch
    mode = modes[int(rng.integers(len(modes)))]
    lam = float(rng.beta(*(2 * [mixup_alpha if mode == "mixup" else cutmix_alpha])))
    perm = torch.from_numpy(rng.permutation(len(labels))).to(pixels.device)
    if mode == "mixup":
        pixels = lam * pixels + (1 - lam) * pixels[perm]
    else:
        h, w = pixels.shape[-2:]
        ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        pixels = pixels.clone()
        pixels[..., y0:y1, x0:x1] = pixels[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    onehot = torch.nn.functional.one_hot(labels.long(), num_labels).float()
    return {"pixel_values": pixels, "labels": lam * onehot + (1 - lam) * onehot[perm]}


def batch_mixer(num_labels: int, tp: TrainParams, seed: int) -> Callable[[dict], dict] | None:
    """mix_batch bound to the recipe and to a generator of this process's own (seed, rank); None when off.

    It runs in the training process, on the device, just before the forward pass (as timm does), not in the
    DataLoader's collate function: there every worker would copy one generator and draw the same mixing
    sequence, the Trainer would mix evaluation batches too (it collates them with the same function), and
    soft labels would spoil the Trainer's count of examples per batch.
    """
    if tp.mixup_alpha <= 0 and tp.cutmix_alpha <= 0:
        return None
    rng = np.random.default_rng([seed, int(os.environ.get("RANK", 0))])

    def apply(batch: dict) -> dict:
        return mix_batch(batch, num_labels, tp.mixup_alpha, tp.cutmix_alpha, rng)

    return apply


def recipe_trainer_class() -> type:
    """A Trainer subclass whose training batches (and only those) pass through `self.mixer` before the loss."""
    from transformers import Trainer

    class RecipeTrainer(Trainer):
        mixer: Callable[[dict], dict] | None = None

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
            # Evaluation runs with model.eval(): validation batches keep their integer labels and pixels.
            if self.mixer is not None and model.training:
                inputs = self.mixer(inputs)
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        # The Trainer reloads checkpoints with a raw load_state_dict, but save_pretrained writes the checkpoint
        # in the original Hub key layout (ViT: vit.encoder.layer.N...), which the live model (vit.layers.N...) does
        # not match: every encoder weight was reported "missing" and silently kept its last-epoch (or, on resume,
        # freshly initialised) value. from_pretrained knows the mapping.
        def _load_best_model(self) -> None:
            load_checkpoint_weights(self.model, self.state.best_model_checkpoint)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            load_checkpoint_weights(model or self.model, resume_from_checkpoint)

    return RecipeTrainer


def load_checkpoint_weights(model: Any, folder: str | Path) -> None:
    """Copy the weights of a Trainer checkpoint folder into model, through from_pretrained's key mapping."""
    saved = type(model).from_pretrained(str(folder), config=model.config)
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {folder} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def layer_id(name: str, parts: Layout) -> int:
    """Depth of a parameter for layer-wise LR decay: 0 embeddings, 1..n encoder blocks (stages for Swin and ConvNeXt),
    n+1 everything after them (final norm, pooling head, classifier)."""
    if name.startswith(parts.embeddings_prefix):
        return 0
    if name.startswith(parts.block_prefix):
        return int(name[len(parts.block_prefix) :].split(".", 1)[0]) + 1
    return len(parts.blocks) + 1


def param_groups(model: Any, tp: TrainParams) -> list[dict]:
    """AdamW parameter groups: no weight decay on biases/norms/tokens/position embeddings; per-depth LR when
    layer_decay is set (head at the base LR, times layer_decay per block below it)."""
    from lib.model import layout

    parts = layout(model) if tp.layer_decay else None
    n_layers = len(parts.blocks) if parts else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith((".bias", "_token")) or "position_embedding" in name
        depth = layer_id(name, parts) if parts else n_layers + 1
        scale = tp.layer_decay ** (n_layers + 1 - depth) if parts else 1.0
        group = groups.setdefault(
            (depth, no_decay),
            {"params": [], "lr": tp.learning_rate * scale, "weight_decay": 0.0 if no_decay else tp.weight_decay},
        )
        group["params"].append(param)
    return list(groups.values())


def accuracy_metric(eval_pred: Any) -> dict[str, float]:
    """Trainer compute_metrics: validation accuracy."""
    logits, labels = eval_pred
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def training_arguments(tp: TrainParams, out: Path, seed: int) -> Any:
    """TrainingArguments for the recipe: checkpoint each epoch, keep the best by validation accuracy."""
    from transformers import TrainingArguments

    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    backend = None if tp.ddp_backend == "auto" else tp.ddp_backend
    flags = device_precision(tp.precision)
    if distributed and backend is None and flags["use_cpu"]:
        backend = "gloo"
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=tp.epochs,
        per_device_train_batch_size=tp.batch_size,
        per_device_eval_batch_size=tp.batch_size * 2,
        gradient_accumulation_steps=tp.grad_accum,
        learning_rate=tp.learning_rate,
        weight_decay=tp.weight_decay,
        max_steps=tp.max_steps or -1,  # -1: train for num_train_epochs
        warmup_steps=tp.warmup_ratio,  # transformers 5 reads a float below 1 as a share of all steps
        lr_scheduler_type=tp.lr_scheduler,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="steps",
        logging_steps=10,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        save_total_limit=tp.save_total_limit,
        dataloader_num_workers=tp.num_workers,
        dataloader_persistent_workers=tp.num_workers > 0,
        remove_unused_columns=False,
        report_to=list(tp.report_to),
        run_name=out.name,  # the run folder's name in wandb / mlflow
        seed=seed,
        ddp_backend=backend,
        ddp_find_unused_parameters=False if distributed else None,
        **flags,
    )


def format_duration(seconds: float) -> str:
    """'4:05' below an hour, '1:02:03' from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_callback_class() -> type:
    """A TrainerCallback printing one plain line per logging step, per evaluation and at the end of training.

    The Trainer's tqdm bar redraws one line with carriage returns: through papermill, a pipe or a log file every
    redraw becomes a line of its own. These lines read the same in a terminal, a log and an executed notebook.
    Speed and time left are averaged from the start of this training (evaluations and checkpoints included).
    """
    from transformers import TrainerCallback

    class ProgressLines(TrainerCallback):
        def __init__(self, clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None):
            self.clock = clock
            self.emit = emit or (lambda line: print(line, flush=True))
            self.start: tuple[float, int] | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = (self.clock(), state.global_step)  # a resumed run starts at its checkpoint's step

        def speed(self, state: Any) -> tuple[str, str]:
            """('3.2 it/s', '1:05 left'), or dashes before the first step."""
            t0, step0 = self.start or (self.clock(), state.global_step)
            elapsed, steps = self.clock() - t0, state.global_step - step0
            if elapsed <= 0 or steps <= 0:
                return "- it/s", "- left"
            rate = steps / elapsed
            return f"{rate:.3g} it/s", f"{format_duration(max(state.max_steps - state.global_step, 0) / rate)} left"

        def where(self, state: Any) -> str:
            share = state.global_step / state.max_steps if state.max_steps else 0.0
            return f"step {state.global_step}/{state.max_steps} ({share:.0%})"

        def epoch(self, state: Any) -> str:
            epoch = state.epoch or 0.0
            shown = f"{epoch:.0f}" if abs(epoch - round(epoch)) < 1e-6 else f"{epoch:.2f}"
            return f"epoch {shown}/{state.num_train_epochs}"

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            logs = logs or {}
            if "loss" in logs:
                rate, left = self.speed(state)
                lr = f" | lr {logs['learning_rate']:.2e}" if "learning_rate" in logs else ""
                self.emit(f"{self.where(state)} | {self.epoch(state)} | loss {logs['loss']:.4f}{lr} | {rate} | {left}")
            elif "train_runtime" in logs:
                best = f" | best val accuracy {state.best_metric:.4f}" if state.best_metric is not None else ""
                loss = f" | train loss {logs['train_loss']:.4f}" if "train_loss" in logs else ""
                self.emit(f"done: {state.global_step} steps in {format_duration(logs['train_runtime'])}{loss}{best}")

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
            metrics = metrics or {}
            if not state.is_world_process_zero or "eval_accuracy" not in metrics:
                return
            loss = f" | val loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
            _, left = self.speed(state)
            accuracy = f"val accuracy {metrics['eval_accuracy']:.4f}{loss}"
            self.emit(f"{self.epoch(state)} | {accuracy} | {self.where(state)} | {left}")

    return ProgressLines


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (JupyterLab, papermill), where the Trainer draws an HTML bar."""
    from transformers.utils import is_in_notebook

    return is_in_notebook()


def last_checkpoint(out: Path) -> str | None:
    """Path of the newest Trainer checkpoint in the run folder, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = out / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def build_trainer(
    params: Params,
    model: Any,
    train_ds: Any,
    eval_ds: Any,
    out: Path,
    optimizer: Any = None,
    trainer_class: type | None = None,
) -> Any:
    """The recipe's Trainer over already transformed datasets (AdamW with param_groups unless given an optimizer);
    trainer_class: a subclass of recipe_trainer_class() to build instead (lib.distill's)."""
    import torch

    from lib.data import collate

    tp = params.train
    trainer = (trainer_class or recipe_trainer_class())(
        model=model,
        args=training_arguments(tp, out, params.run.seed),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collate,
        compute_loss_func=loss_function(tp.label_smoothing),
        compute_metrics=accuracy_metric,
        optimizers=(optimizer or torch.optim.AdamW(param_groups(model, tp), lr=tp.learning_rate), None),
    )
    trainer.mixer = batch_mixer(model.config.num_labels, tp, params.run.seed)
    trainer.add_callback(progress_callback_class()())
    if not in_notebook():
        from transformers.trainer_callback import ProgressCallback

        # Outside a notebook (torchrun's processes, whose output the notebook streams; the CLI) the tqdm bar's
        # redraws would each become a line; the progress lines replace it. A notebook keeps its HTML bar.
        trainer.remove_callback(ProgressCallback)
    send_tensorboard_to(trainer, out / "runs")
    return trainer


def send_tensorboard_to(trainer: Any, folder: Path) -> None:
    """Make the Trainer's TensorBoard callback, if report_to has one, write its event files into `folder`.

    transformers 5 has no TrainingArguments.logging_dir: by default the events would land among the checkpoints,
    in checkpoints/runs/<date>_<host>/, where `make tensorboard` and the stage's outputs would not name them.
    """
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(folder)


def train(params: Params, out: Path) -> dict:
    """Train on the prepared splits; save the best model to out/model and the history; return a summary."""
    import torch
    from transformers import set_seed

    from lib.data import class_names, eval_batch_transform, load_splits, train_batch_transform
    from lib.model import build_model, count_parameters, save_model

    tp = params.train
    if tp.torch_threads:
        torch.set_num_threads(tp.torch_threads)
    splits = load_splits(out / "data")
    labels = class_names(splits["train"])
    set_seed(params.run.seed)  # the Trainer seeds only after the model exists: seed its new head and weights too
    model, processor, spec = build_model(params.model, labels)
    train_ds = splits["train"].with_transform(train_batch_transform(spec, tp.augment.model_dump()))
    trainer = build_trainer(
        params, model, train_ds, splits["validation"].with_transform(eval_batch_transform(spec)), out
    )
    args = trainer.args
    resume = last_checkpoint(out) if tp.resume else None
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    runtime = time.time() - start
    history = trainer.state.log_history
    summary = {
        "train_runtime_s": round(runtime, 1),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "epochs": tp.epochs,
        "max_steps": tp.max_steps,
        "global_steps": trainer.state.global_step,
        "best_val_accuracy": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": resume,
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "parameters": count_parameters(model),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    }
    if trainer.is_world_process_zero():
        save_model(trainer.model, processor, spec, out / "model")
        (out / "train_history.json").write_text(json.dumps(history, indent=2))
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def torchrun_command(
    params_file: Path, tp: TrainParams, node_rank: int = 0, master: str = "127.0.0.1:29500", module: str = "lib.train"
) -> list[str]:
    """The torchrun command that runs `python -m <module>` (lib.train; lib.distill) in num_gpus processes on each of
    `nodes` machines."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={tp.nodes}",
        f"--nproc_per_node={tp.num_gpus}",
        f"--node_rank={node_rank}",
        f"--master_addr={master.split(':')[0]}",
        f"--master_port={master.split(':')[1]}",
        "-m", module, str(params_file),
    ]  # fmt: skip


def stream(cmd: list[str], env: dict | None = None) -> Iterator[str]:
    """Run a command and yield its output lines as they come; raise on a non-zero exit.

    Lines end at newlines only: text mode would also end one at each carriage return, so every redraw of a
    progress bar in the command's output would arrive as a line of its own.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    for raw in proc.stdout:
        yield raw.decode(errors="replace")
    if proc.wait():
        raise RuntimeError(f"command failed with exit status {proc.returncode}: {' '.join(cmd)}")


def launch_distributed(params_file: Path, tp: TrainParams, module: str = "lib.train") -> None:
    """Launch DDP training (`python -m <module>`) with torchrun and stream its progress (for the notebook's
    output)."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for line in stream(torchrun_command(params_file, tp, module=module), env=env):
        print(line, end="", flush=True)


def distributed(tp: TrainParams) -> bool:
    """Whether the recipe asks for more than one training process."""
    return tp.num_gpus * tp.nodes > 1


def torchrun_main(stage: Callable[[Params, Path], Any], prog: str, argv: list[str] | None = None) -> int:
    """Entry point for torchrun: python -m PROG PARAMS_FILE [key=value ...] runs stage(params, run folder) in every
    process (lib.train, lib.distill)."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    parser.add_argument("params_file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params_file, args.overrides)
    stage(params, run_dir(params))
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m lib.train PARAMS_FILE [key=value ...], alone or under torchrun."""
    return torchrun_main(train, "lib.train", argv)


if __name__ == "__main__":
    raise SystemExit(main())
