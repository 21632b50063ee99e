"""Behavioural tests of a trained model: mirror invariance, no collapsed class, and the saved class names.

A small demo model is trained once, in-process, on a generated split (80 stick-figure images per class, the demo's
tiny ViT for 16 epochs: about 60 s on 2 idle cores). The thresholds are measured on that recipe, with the margins
explained next to each. lib.labels.check_labels, which the evaluate or export stage can call, is tested both on
hand-written configs and on the trained model with its class names shuffled.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lib.data import class_names, prepare
from lib.labels import HAR_CLASSES, LabelMismatchError, check_labels, config_labels
from lib.metrics import classification_metrics
from lib.params import Params
from lib.predict import Predictor, load_predictor
from lib.train import train

# Measured on this recipe, seeded as the fixture seeds it, with training seeds 42 (the fixture's), 1, 2, 3, 4, 5, 6 on
# data seed 0 and seed 42 on data seed 1: 297 test images, 19-20 per class. On one machine the fixture's run is
# repeatable; the other seeds show how far a run can move, as it may on other hardware or library versions.
#
# Flip invariance: share of test images whose top-1 is the same for the image and its mirror. The actions are
# left-right symmetric (the generator mirrors half of its scenes, training flips at random). Measured: 0.973 (seed
# 42), 0.943-0.980 over all eight runs. The same models keep their top-1 on only 0.76-0.86 of the images turned upside
# down and 0.80-0.86 of those turned by 90 degrees (the scene behind the figure carries much of the label), so 0.9
# asks for more than that generic robustness; it is about 3 standard errors of a 297-image share below the lowest
# value measured.
MIN_FLIP_AGREEMENT = 0.9
# Per-class recall floor: no class may collapse. Lowest recall of the 15 classes: 0.53 (seed 42), 0.47-0.58 over all
# eight runs, nearly always sitting, which the generator draws in the living room of using_laptop with the laptop as
# the only cue. Chance is 1/15 = 0.07, and a collapsed class sits near it: an earlier, unseeded run of this recipe at
# 60 images per class merged using_laptop into sitting (recall 0.07). 0.2 is 4 of 19-20 images, three times chance.
MIN_CLASS_RECALL = 0.2
# The model must have learnt something for the checks above to mean anything. Measured: 0.848 (seed 42), 0.808-0.852.
MIN_ACCURACY = 0.7


@dataclass
class Trained:
    """A trained demo run: its folder, the test split as PIL images with labels, and the dataset's class names."""

    run: Path
    images: list[Image.Image]
    labels: np.ndarray
    names: list[str]

    @property
    def model_dir(self) -> Path:
        return self.run / "model"


def behaviour_params(root: Path) -> Params:
    """The demo recipe, shrunk: 80 images per class, a quarter of them for testing, 16 epochs."""
    return Params.model_validate(
        {
            "run": {"output_root": str(root), "seed": 42},
            "data": {
                "embedded": {"images_per_class": 80, "seed": 0},
                "near_duplicate_distance": None,
                "val_fraction": 0.1,
                "test_fraction": 0.25,
            },
            "model": {
                "config": {
                    "image_size": 64,
                    "patch_size": 8,
                    "hidden_size": 128,
                    "num_hidden_layers": 4,
                    "num_attention_heads": 2,
                    "intermediate_size": 256,
                }
            },
            "train": {
                "epochs": 16,
                "batch_size": 32,
                "learning_rate": 2e-3,
                "label_smoothing": 0.1,
                "torch_threads": 2,
                "report_to": ["none"],
                "save_total_limit": 1,
            },
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Generate, split and train once for the module (no export: predictions go through the PyTorch model)."""
    from transformers import set_seed

    root = tmp_path_factory.mktemp("behaviour")
    params = behaviour_params(root)
    run = root / "run"
    splits, _ = prepare(params.data, run / "data", root / "cache")
    # train() builds the model before the Trainer seeds anything, so the initial weights would differ between
    # processes (and with them which class comes out worst); seeding here makes the run repeatable.
    set_seed(params.run.seed)
    train(params, run)
    test = splits["test"]
    images = [img.convert("RGB") for img in test["image"]]
    return Trained(run, images, np.asarray(test["label"]), class_names(test))


def top1(predictor: Predictor, images: list[Image.Image]) -> np.ndarray:
    """Top-1 class index of each image."""
    return predictor.logits(images).argmax(1)


@pytest.fixture(scope="module")
def predictor(trained: Trained) -> Predictor:
    return load_predictor(trained.run, backend="torch")


@pytest.fixture(scope="module")
def predictions(trained: Trained, predictor: Predictor) -> np.ndarray:
    return top1(predictor, trained.images)


@pytest.mark.integration
def test_model_is_trained_enough_to_judge(trained: Trained, predictions: np.ndarray):
    accuracy = float((predictions == trained.labels).mean())
    assert accuracy >= MIN_ACCURACY, f"test accuracy {accuracy:.3f} < {MIN_ACCURACY}: the behaviour checks are moot"


@pytest.mark.integration
def test_prediction_survives_a_horizontal_flip(trained: Trained, predictor: Predictor, predictions: np.ndarray):
    mirrored = top1(predictor, [ImageOps.mirror(img) for img in trained.images])
    agreement = float((mirrored == predictions).mean())
    assert agreement >= MIN_FLIP_AGREEMENT, f"top-1 unchanged by a mirror on {agreement:.3f} of the test images"


@pytest.mark.integration
def test_no_class_collapses(trained: Trained, predictions: np.ndarray):
    per_class = classification_metrics(trained.labels, predictions, trained.names)["per_class"]
    recalls = {name: round(c["recall"], 3) for name, c in per_class.items()}
    low = {name: r for name, r in recalls.items() if r < MIN_CLASS_RECALL}
    assert not low, f"recall below {MIN_CLASS_RECALL}: {low} (all: {recalls})"


@pytest.mark.integration
def test_saved_labels_are_the_dataset_class_names_in_order(trained: Trained):
    assert trained.names == list(HAR_CLASSES)
    assert check_labels(trained.model_dir, trained.names) == config_labels(trained.model_dir) == trained.names


@pytest.mark.integration
def test_permuted_saved_labels_are_caught(trained: Trained, predictor: Predictor, predictions: np.ndarray, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(trained.model_dir, broken / "model")
    cfg_path = broken / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    shifted = trained.names[1:] + trained.names[:1]  # a cyclic shift: no class keeps its name
    cfg["id2label"] = {str(i): name for i, name in enumerate(shifted)}
    cfg["label2id"] = {name: i for i, name in enumerate(shifted)}  # self-consistent, so transformers loads it
    cfg_path.write_text(json.dumps(cfg))

    with pytest.raises(LabelMismatchError, match=r"id2label\[0\] is 'clapping', the dataset's class 0 is 'calling'"):
        check_labels(broken / "model", trained.names)

    # Unchecked, the corrupted model loads and runs: same logits, other names. Its names disagree with the known-good
    # prediction on every image, and scored by name against the test labels, as the evaluate stage scores, every
    # class's recall falls below the floor (measured: at most 0.1 over the eight runs above, 0.05 on the fixture's).
    corrupt = load_predictor(broken, backend="torch")
    good_names = [predictor.labels[i] for i in predictions]
    corrupt_names = [corrupt.labels[i] for i in top1(corrupt, trained.images)]
    assert all(g != c for g, c in zip(good_names, corrupt_names))

    def recall_by_name(names: list[str]) -> dict[str, float]:
        ids = np.array([trained.names.index(name) for name in names])
        per_class = classification_metrics(trained.labels, ids, trained.names)["per_class"]
        return {name: round(c["recall"], 3) for name, c in per_class.items()}

    good, bad = recall_by_name(good_names), recall_by_name(corrupt_names)
    assert min(good.values()) >= MIN_CLASS_RECALL and max(bad.values()) < MIN_CLASS_RECALL, (good, bad)


# --------------------------------------------------------------------------- check_labels on hand-written configs


def write_config(folder: Path, id2label: dict, label2id: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"id2label": {str(k): v for k, v in id2label.items()}}
    if label2id is not None:
        cfg["label2id"] = label2id
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_check_labels_accepts_the_dataset_order(tmp_path: Path):
    names = ["calling", "clapping", "sitting"]
    model_dir = write_config(tmp_path, dict(enumerate(names)), {n: i for i, n in enumerate(names)})
    assert check_labels(model_dir, names) == names


def test_check_labels_names_each_mismatch(tmp_path: Path):
    names = ["calling", "clapping", "sitting"]
    swapped = write_config(tmp_path / "a", {0: "clapping", 1: "calling", 2: "sitting"})
    with pytest.raises(LabelMismatchError) as err:
        check_labels(swapped, names)
    message = str(err.value)
    assert str(swapped / "config.json") in message and "2 differences" in message
    assert "id2label[0] is 'clapping', the dataset's class 0 is 'calling'" in message
    assert "id2label[1] is 'calling', the dataset's class 1 is 'clapping'" in message

    short = write_config(tmp_path / "b", {0: "calling", 1: "clapping"})
    with pytest.raises(LabelMismatchError, match="id2label has 2 classes, the dataset 3"):
        check_labels(short, names)

    # id2label right, label2id pointing elsewhere: a config that disagrees with itself
    inconsistent = write_config(tmp_path / "c", dict(enumerate(names)), {"calling": 0, "clapping": 2, "sitting": 1})
    with pytest.raises(LabelMismatchError, match=r"label2id\['clapping'\] is 2, not 1"):
        check_labels(inconsistent, names)
