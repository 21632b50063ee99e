"""The Trainer recipe on a tiny ViT: mixup on training batches only, per-worker mixing draws, the best checkpoint
really loaded, resuming from the last checkpoint, and the same loss and gradient with one or two DDP processes."""

import copy
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lib import train as T
from lib.params import ROOT, Params

torch.set_num_threads(2)
CLASSES = [f"action{i}" for i in range(15)]
# 15 classes, and no split of 15 images: a validation split of exactly one image per class hid a mixup crash.
SPLIT_SIZES = {"train": 60, "validation": 22, "test": 8}


def prepared_run(tmp_path):
    """A run folder whose data/ holds small coloured images in train/validation/test, as the prepare stage saves."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    parts = {}
    for split, n in SPLIT_SIZES.items():
        labels = [i % len(CLASSES) for i in range(n)]
        images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in labels]
        parts[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    out = tmp_path / "run"
    datasets.DatasetDict(parts).save_to_disk(str(out / "data"))
    return out


def tiny_params(tmp_path, **train):
    return Params.model_validate(
        {
            "run": {"output_root": str(tmp_path)},
            "model": {
                "config": {
                    "image_size": 16,
                    "patch_size": 8,
                    "hidden_size": 16,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "intermediate_size": 32,
                }
            },
            "train": {"epochs": 1, "batch_size": 6, "learning_rate": 1e-3, "torch_threads": 2, **train},
        }
    )


def test_mixup_leaves_validation_labels_integer(tmp_path, monkeypatch):
    seen, real = [], T.accuracy_metric

    def metric(eval_pred):
        seen.append(np.asarray(eval_pred[1]))
        return real(eval_pred)

    monkeypatch.setattr(T, "accuracy_metric", metric)
    out = prepared_run(tmp_path)
    summary = T.train(tiny_params(tmp_path, mixup_alpha=0.4, cutmix_alpha=1.0), out)
    assert len(seen) == 1 and seen[0].shape == (SPLIT_SIZES["validation"],)
    assert seen[0].dtype.kind == "i" and sorted(set(seen[0])) == list(range(15))
    assert 0.0 <= summary["best_val_accuracy"] <= 1.0


def test_mixing_draws_differ_between_dataloader_workers(tmp_path, monkeypatch):
    targets = []
    real = T.soft_cross_entropy

    def spy(logits, labels, *args, **kwargs):
        targets.append(labels.detach().clone())
        return real(logits, labels, *args, **kwargs)

    monkeypatch.setattr(T, "soft_cross_entropy", spy)
    T.train(tiny_params(tmp_path, mixup_alpha=0.8, num_workers=2), prepared_run(tmp_path))
    mixed = [t for t in targets if t.ndim == 2]  # training batches; validation keeps integer labels
    assert len(mixed) == SPLIT_SIZES["train"] // 6
    # Each row is lam * onehot(y) + (1 - lam) * onehot(y[perm]): where the two classes differ its largest entry
    # is max(lam, 1 - lam), the batch's mixing draw.
    draws = [round(float(t.max(1).values.min()), 6) for t in mixed]
    assert all(0.5 <= d < 1.0 for d in draws), draws
    assert len(set(draws)) == len(draws), f"two batches shared a mixing draw: {draws}"


def test_train_saves_the_best_checkpoint_not_the_last(tmp_path, monkeypatch):
    scores = iter([0.9, 0.1])  # epoch 1 is the best by validation accuracy, whatever the model does
    monkeypatch.setattr(T, "accuracy_metric", lambda eval_pred: {"accuracy": next(scores)})
    out = prepared_run(tmp_path)
    summary = T.train(tiny_params(tmp_path, epochs=2, learning_rate=0.05), out)
    assert summary["best_checkpoint"].endswith("checkpoint-10")

    from transformers import ViTForImageClassification

    def weights(folder):
        return ViTForImageClassification.from_pretrained(folder).state_dict()

    saved, best = weights(out / "model"), weights(summary["best_checkpoint"])
    last = weights(out / "checkpoints" / "checkpoint-20")
    assert saved.keys() == best.keys()
    for name in saved:
        torch.testing.assert_close(saved[name], best[name], msg=name)
    assert any(not torch.equal(saved[n], last[n]) for n in saved if "encoder" in n or "layers" in n)


@pytest.mark.integration
def test_ddp_loss_and_gradient_match_one_process(tmp_path):
    script = ROOT / "tests" / "ddp_loss_step.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    runs = {
        1: [sys.executable, str(script), str(tmp_path / "one")],
        2: [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path / "two"),
        ],
    }
    logged = {}
    for world, cmd in runs.items():
        folder = tmp_path / ("one" if world == 1 else "two")
        folder.mkdir()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        logged[world] = json.loads((folder / "step.json").read_text())
    assert logged[2]["world_size"] == 2
    # Same global batch, same weights: only the float32 summation order differs (two partial sums plus gloo's
    # all-reduce against one sum), which moves these values by ~1e-7 relative; 1e-4 leaves a wide margin while
    # the fault this guards against (a loss scaled by the number of processes) is off by a factor of 2.
    for key in ("loss", "grad_norm"):
        assert logged[2][key] == pytest.approx(logged[1][key], rel=1e-4), key


def test_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    """A run stopped after its first epoch's checkpoint and started again with train.resume picks up that checkpoint:
    the same step count, its weights and its optimizer state, and trains only the steps that are left."""
    from transformers import TrainerCallback, ViTForImageClassification

    out = prepared_run(tmp_path)
    steps_per_epoch = SPLIT_SIZES["train"] // 6
    seen = {}

    class StopAfterFirstEpoch(TrainerCallback):  # as if the machine went away after the first checkpoint
        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            seen["start_step"] = state.global_step
            seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            seen["optimizer"] = copy.deepcopy(optimizer.state_dict())  # the live state moves on
            seen["steps"] = 0

        def on_step_end(self, args, state, control, **kwargs):
            seen["steps"] += 1

    real = T.build_trainer
    extra = [StopAfterFirstEpoch()]

    def build(*args, **kwargs):
        trainer = real(*args, **kwargs)
        for callback in extra + [Spy()]:
            trainer.add_callback(callback)
        return trainer

    monkeypatch.setattr(T, "build_trainer", build)
    first = T.train(tiny_params(tmp_path, epochs=2, resume=True), out)  # nothing to resume from yet
    assert first["resumed_from"] is None and first["global_steps"] == steps_per_epoch == seen["steps"]
    checkpoint = T.last_checkpoint(out)
    assert checkpoint is not None and checkpoint.endswith(f"checkpoint-{steps_per_epoch}")

    extra.clear()
    second = T.train(tiny_params(tmp_path, epochs=2, resume=True), out)
    assert second["resumed_from"] == checkpoint
    assert seen["start_step"] == steps_per_epoch and seen["steps"] == steps_per_epoch
    assert second["global_steps"] == 2 * steps_per_epoch
    saved = ViTForImageClassification.from_pretrained(checkpoint).state_dict()
    assert saved.keys() == seen["weights"].keys()
    for name in saved:
        torch.testing.assert_close(seen["weights"][name], saved[name], msg=name)
    saved_optimizer = torch.load(f"{checkpoint}/optimizer.pt", weights_only=True)["state"]
    state = seen["optimizer"]["state"]
    assert state and state.keys() == saved_optimizer.keys()
    for key, moments in saved_optimizer.items():
        assert int(state[key]["step"]) == steps_per_epoch
        torch.testing.assert_close(state[key]["exp_avg"], moments["exp_avg"])
        torch.testing.assert_close(state[key]["exp_avg_sq"], moments["exp_avg_sq"])
    assert T.last_checkpoint(out).endswith(f"checkpoint-{2 * steps_per_epoch}")
