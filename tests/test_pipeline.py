"""The whole papermill pipeline on a shrunken demo profile, and the runner's failure modes."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from lib.labels import HAR_CLASSES
from lib.params import ROOT
from lib.pipeline import STAGES

pytestmark = pytest.mark.integration  # notebooks, subprocesses, servers or a browser


def run_pipeline(*args, timeout=900):
    cmd = [sys.executable, "-m", "lib.pipeline", "--params", str(ROOT / "params" / "demo.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def shrunk(tmp_path, *extra):
    items = [
        f"run.output_root={tmp_path / 'outputs'}",
        "data.embedded.images_per_class=10",
        "data.val_fraction=0.15",
        "data.test_fraction=0.2",
        "train.epochs=1",
        "export.distill_epochs=1",
        "evaluate.n_mistakes=4",
        f"publish.registry={tmp_path / 'registry'}",
        "publish.gate.enabled=false",
        *extra,
    ]
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One full run; training goes through torchrun with two gloo processes (DDP on CPU)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    res = run_pipeline(*shrunk(tmp, "train.num_gpus=2"))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return tmp, tmp / "outputs" / "demo", res


def test_outputs_have_the_expected_contents(demo_run):
    """The reported figures are those of the saved files: the test metrics recomputed from the saved model on the
    saved test split, the served figures from the file the run serves, the supports from the split itself."""
    from sklearn.metrics import f1_score

    from lib.data import load_splits, open_image
    from lib.model import load_model
    from lib.params import load_params
    from lib.predict import dataset_logits, load_predictor
    from lib.transforms import load_spec

    tmp, out, res = demo_run
    assert f"results in {out}" in res.stdout
    summary = json.loads((out / "data" / "summary.json").read_text())
    assert summary["class_names"] == list(HAR_CLASSES)
    metrics = json.loads((out / "metrics.json").read_text())
    p = load_params(out / "params.yaml")
    test = load_splits(out / "data")["test"]
    y = np.asarray(test["label"])
    support = np.bincount(y, minlength=len(HAR_CLASSES)).tolist()
    assert metrics["n_test"] == len(y) == summary["split_sizes"]["test"]
    assert summary["per_class"]["test"] == support
    assert [metrics["per_class"][name]["support"] for name in HAR_CLASSES] == support

    logits = dataset_logits(
        load_model(out / "model"), test, load_spec(out / "model"), p.evaluate.batch_size, device="cpu",
        tta_flip=p.evaluate.tta_flip,
    )  # fmt: skip
    predicted = logits.argmax(1)
    assert metrics["accuracy"] == pytest.approx(float((predicted == y).mean()), abs=1e-9)
    for how in ("weighted", "macro"):
        expected = f1_score(y, predicted, average=how, labels=range(len(HAR_CLASSES)), zero_division=0)
        assert metrics[f"f1_{how}"] == pytest.approx(expected, abs=1e-9), how

    served = json.loads((out / "export" / "serving.json").read_text())
    assert metrics["export"]["serving"]["file"] == served["file"]
    predictor = load_predictor(out, threads=2)
    assert predictor.backend == "onnx" and Path(predictor.model_file) == out / "export" / served["file"]
    served_logits = predictor.logits([open_image(test, i) for i in range(len(test))])
    assert metrics["served"]["accuracy"] == pytest.approx(float((served_logits.argmax(1) == y).mean()), abs=1e-9)

    assert metrics["train"]["epochs"] == 1 and metrics["train"]["world_size"] == 2
    for png in ("confusion_matrix.png", "curves.png", "samples.png", "mistakes.png", "reliability.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.width > 200, png
    history = json.loads((out / "train_history.json").read_text())
    assert any("eval_accuracy" in h for h in history)
    resolved = (out / "params.yaml").read_text()
    assert "images_per_class: 10" in resolved and "epochs: 1" in resolved


def test_saved_model_predicts_the_fifteen_classes(demo_run):
    from lib.labels import config_labels
    from lib.model import load_model

    _, out, _ = demo_run
    assert config_labels(out / "model") == list(HAR_CLASSES)
    model = load_model(out / "model")
    logits = model(pixel_values=__import__("torch").zeros(1, 3, 64, 64)).logits
    assert logits.shape == (1, 15) and np.isfinite(logits.detach().numpy()).all()


def test_executed_notebooks_are_kept_without_errors(demo_run):
    _, out, _ = demo_run
    for stage, name in STAGES.items():
        nb = nbformat.read(out / "notebooks" / name, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], stage
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and str(out / "params.yaml") in injected[0].source, stage


def test_publish_stage_put_a_version_in_the_registry(demo_run):
    tmp, out, _ = demo_run
    record = json.loads((out / "publish.json").read_text())
    assert record["published"] is True
    latest = json.loads((tmp / "registry" / "har-vit-demo" / "latest.json").read_text())
    manifest = json.loads((tmp / "registry" / "har-vit-demo" / latest["version"] / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {"model/model.safetensors", "model/config.json", "metrics.json", "export/serving.json"} <= paths


def test_later_stage_refuses_missing_earlier_outputs(tmp_path):
    res = run_pipeline("--stages", "evaluate", *shrunk(tmp_path))
    assert res.returncode == 1
    assert "stage 'prepare' has not completed" in res.stderr or "stage 'train' has not completed" in res.stderr


def test_failing_stage_names_stage_notebook_and_error(tmp_path):
    for name in ("calling", "clapping"):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (i, len(name), 0)).save(folder / f"{i}.png")
    res = run_pipeline(
        "--stages", "prepare", *shrunk(tmp_path, "data.source=imagefolder", f"data.path={tmp_path / 'images'}")
    )
    assert res.returncode == 1
    assert "stage 'prepare' failed" in res.stderr
    assert str(tmp_path / "outputs" / "demo" / "notebooks" / "01_prepare_data.ipynb") in res.stderr
    assert "at least 3 images" in res.stderr


def test_bad_params_stop_before_any_stage(tmp_path):
    res = run_pipeline(*shrunk(tmp_path, "train.batch_size=zero"))
    assert res.returncode == 2 and "train.batch_size" in res.stderr
    assert not (tmp_path / "outputs").exists()
