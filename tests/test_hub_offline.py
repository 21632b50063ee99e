"""The real profile's Hub ids load offline from locally built caches, through the pipeline's own notebooks."""

import json
import os
import subprocess
import sys

import pytest

from lib.labels import HAR_CLASSES
from lib.params import ROOT, load_params
from tools.hub_cache import HUB_DATASET_ID, HUB_MODEL_ID, write_dataset_cache, write_model_cache

pytestmark = pytest.mark.integration  # notebooks, subprocesses, servers or a browser


def test_real_profile_prepares_and_trains_offline(tmp_path):
    profile = load_params(ROOT / "params" / "har_vit.yaml")
    assert (profile.data.hub_id, profile.model.name_or_path) == (HUB_DATASET_ID, HUB_MODEL_ID)
    write_model_cache(tmp_path / "hub")
    # 12 per class: a validation split of 18, not one image per class (15 hid the mixup crash on evaluation)
    write_dataset_cache(tmp_path / "datasets", per_class=12)
    env = dict(
        os.environ,
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_DATASETS_CACHE=str(tmp_path / "datasets"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="2",
    )
    overrides = [
        f"run.output_root={tmp_path / 'outputs'}",
        "train.epochs=1",
        "train.batch_size=16",
        "train.num_workers=0",
        "evaluate.num_workers=0",
        "train.torch_threads=2",
    ]
    cmd = [
        sys.executable,
        "-m",
        "lib.pipeline",
        "--params",
        str(ROOT / "params" / "har_vit.yaml"),
        "--stages",
        "prepare,train,evaluate",
    ]
    for item in overrides:
        cmd += ["--set", item]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    out = tmp_path / "outputs" / "har_vit"
    summary = json.loads((out / "data" / "summary.json").read_text())
    assert summary["source"] == f"hub:{HUB_DATASET_ID}[train]"
    assert summary["class_names"] == list(HAR_CLASSES)
    assert summary["split_sizes"] == {"train": 126, "validation": 18, "test": 36}
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"]["0"] == "calling" and len(config["id2label"]) == 15
    assert config["hidden_size"] == 32  # the tiny model built in the cache, not a fresh default ViT
    train_summary = json.loads((out / "train_summary.json").read_text())
    assert train_summary["parameters"]["trainable"] == train_summary["parameters"]["total"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 36 and metrics["tta_flip"] is True
    history = json.loads((out / "train_history.json").read_text())
    assert any("eval_accuracy" in h for h in history)  # validation ran after the mixed training epoch
