"""Every supported backbone family through prepare -> train -> evaluate -> export, from a tiny random model in an
offline hub cache with the family's own preprocessor_config.json, through the lib stage functions the notebooks
call. Checks layer freezing, the evaluation transform against the processors, ONNX against PyTorch and the
torch-free predictor on the export. SigLIP 2 NaFlex (model type siglip2) is not here: it takes patch sequences, and
lib.model.build_model refuses it (tests/test_families.py); fixed-resolution SigLIP 2 checkpoints are model type
siglip."""

import json
import shutil

import numpy as np
import pytest
import torch
from test_families import photos, tiny_model

from lib import calibration, data, export, metrics, predict
from lib import model as M
from lib import train as T
from lib.labels import HAR_CLASSES
from lib.params import Params
from lib.transforms import eval_batch, load_spec
from tools.hub_cache import IMAGENET_MEAN, IMAGENET_STD, write_snapshot

pytestmark = pytest.mark.integration  # seven tiny trainings and exports, about a minute

torch.set_num_threads(2)
THREADS = 2  # ONNX Runtime sessions: fixed, so idle spinning threads do not slow what runs next
HALF = [0.5] * 3


def processor(kind: str, **extra) -> dict:
    """A preprocessor_config.json shaped like the family's real repo, at tiny size."""
    base = {"image_processor_type": kind, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255}
    return base | {"do_normalize": True} | extra


# Tiny model family: the repo's processor at tiny size. google/vit-base-patch16-224, microsoft/beit-base-patch16-224
# and microsoft/swin-tiny-patch4-window7-224 squash the image, facebook/deit-base-distilled-patch16-224 squashes to
# 256 then crops 224, DINOv2 and ConvNeXt resize the shorter side and crop, SigLIP squashes; evaluation follows each.
SQUASH_32 = {"size": {"height": 32, "width": 32}}
CASES = {
    "vit": processor("ViTImageProcessor", **SQUASH_32, resample=2, image_mean=HALF, image_std=HALF),
    "deit": processor(
        "DeiTImageProcessor",
        size={"height": 36, "width": 36},
        do_center_crop=True,
        crop_size={"height": 32, "width": 32},
        resample=3,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ),
    "beit": processor(
        "BeitImageProcessor", **SQUASH_32, do_center_crop=False, resample=2, image_mean=HALF, image_std=HALF
    ),
    "dinov2": processor(
        "BitImageProcessor",
        do_convert_rgb=True,
        size={"shortest_edge": 37},
        do_center_crop=True,
        crop_size={"height": 32, "width": 32},
        resample=3,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ),
    "siglip": processor("SiglipImageProcessor", **SQUASH_32, resample=3, image_mean=HALF, image_std=HALF),
    "swin": processor("ViTImageProcessor", **SQUASH_32, resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    # ConvNextImageProcessor resizes the shorter side to int(29 / 0.875) = 33, then crops 29
    "convnext": processor(
        "ConvNextImageProcessor",
        size={"shortest_edge": 29},
        crop_pct=0.875,
        resample=3,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ),
}
FUSED = {"vit", "deit", "siglip"}  # export.ORT_FUSED_FAMILIES, stated here so that a change is noticed


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The embedded data, 8 images per class, prepared once: 68 / 16 / 21 images once the generator's planted copies
    are dropped (no size equals another or the 15 classes; a stratified split needs 15 in validation and test)."""
    root = tmp_path_factory.mktemp("families")
    p = profile(root, "prepared", "unused")
    splits, summary = data.prepare(p.data, root / "prepared" / "data", cache_root=root / "_cache")
    sizes = summary["split_sizes"]
    assert sizes == {"train": 68, "validation": 16, "test": 21}
    return root


def profile(root, name: str, model_id: str) -> Params:
    return Params.model_validate(
        {
            "run": {"name": name, "output_root": str(root), "seed": 0},
            "data": {
                "source": "embedded",
                "embedded": {"images_per_class": 8, "seed": 0},
                "near_duplicate_distance": None,
                "val_fraction": 0.15,
                "test_fraction": 0.2,
            },
            "model": {"source": "hub", "name_or_path": model_id, "freeze_layers": 1, "attn_implementation": "eager"},
            "train": {
                "epochs": 1,
                "batch_size": 34,  # 2 optimizer steps over 68 images
                "learning_rate": 1e-3,
                "layer_decay": 0.75,
                "torch_threads": 2,
                "report_to": ["none"],
                "save_total_limit": 1,
            },
            "evaluate": {"batch_size": 8, "tta_flip": True, "calibrate": True},
            "export": {"quantize": "dynamic"},
        }
    )


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache that the Hub client reads offline (its constants are read at call time)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def evaluate_stage(p: Params, out) -> dict:
    """The evaluate notebook's steps: test metrics over the flip-averaged logits, the served temperature."""
    splits = data.load_splits(out / "data")
    clf, spec = M.load_model(out / "model"), load_spec(out / "model")

    def views(split):
        return predict.dataset_logits(clf, splits[split], spec, p.evaluate.batch_size, 0, tta_flip=True, per_view=True)

    test, val = views("test"), views("validation")
    y_test, y_val = np.asarray(splits["test"]["label"]), np.asarray(splits["validation"]["label"])
    result = metrics.classification_metrics(y_test, test.mean(1).argmax(1), list(HAR_CLASSES))
    served = calibration.served_calibration(val[:, 0], y_val, test[:, 0], y_test, fit=True)
    M.save_temperature(out / "model", served["temperature"])
    metrics.update_metrics(out / "metrics.json", result | {"served": served})
    return result


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_runs_every_stage(family, prepared, offline_hub):
    own_processor = CASES[family]
    model_id = f"har-tests/tiny-{family}"
    snapshot = write_snapshot(offline_hub, model_id, tiny_model(family), own_processor, "0" * 40)
    p = profile(prepared, family, model_id)
    out = prepared / family
    shutil.copytree(prepared / "prepared" / "data", out / "data")

    # train: the hub id resolves offline; the embeddings and block 0 stay as loaded, the other blocks train
    summary = T.train(p, out)
    assert summary["global_steps"] == 2
    loaded, _, _ = M.build_model(p.model, list(HAR_CLASSES))
    trained = M.load_model(out / "model")
    assert trained.config.model_type == family
    before, after = M.layout(loaded), M.layout(trained)
    for part_before, part_after, frozen in [
        (before.embeddings, after.embeddings, True),
        (before.blocks[0], after.blocks[0], True),
        (before.blocks[-1], after.blocks[-1], False),
    ]:
        same = [torch.equal(a, b) for a, b in zip(part_before.state_dict().values(), part_after.state_dict().values())]
        assert all(same) if frozen else not all(same)

    # preprocessing: the backbone's own processor and the saved model's (what transformers.pipeline uses) both give
    # eval_transform's pixels
    from transformers import AutoImageProcessor

    spec = load_spec(out / "model")
    images = photos()
    ours = eval_batch(images, spec)
    saved = AutoImageProcessor.from_pretrained(out / "model", backend="pil")(images, return_tensors="np")
    np.testing.assert_allclose(saved["pixel_values"], ours, rtol=0, atol=1e-5)
    own = AutoImageProcessor.from_pretrained(snapshot, backend="pil")(images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(own, ours, rtol=0, atol=1e-5)

    result = evaluate_stage(p, out)
    assert result["n_test"] == 21

    # export: ONNX at the training resolution, fused where ONNX Runtime fuses the family, int8 through the gate
    done = export.run_export(p, out)
    assert done["fusion"]["applied"] == (family in FUSED), done["fusion"]
    if family in FUSED:
        assert done["fused_ops"].get("Attention", 0) >= 1
    else:
        assert done["fused_ops"] == {}
    rows = done["variants"]
    assert set(rows) >= {"torch", "standard", "fp32", "int8"}
    assert rows["standard"]["max_abs_logit_diff"] < 1e-4 and rows["fp32"]["max_abs_logit_diff"] < 1e-4
    assert np.isfinite(rows["int8"]["agreement"])
    x = ours[:3]
    with torch.inference_mode():
        ref = trained(pixel_values=torch.from_numpy(x)).logits.numpy()
    for name in ("model.standard.onnx", "model.onnx", "model.int8.onnx"):
        session = predict.onnx_session(out / "export" / name, THREADS)
        assert session.get_inputs()[0].shape[2:] == [spec.size, spec.size], name
        got = predict.onnx_runner(session)(x)
        assert got.shape == (3, len(HAR_CLASSES))
        if name != "model.int8.onnx":
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)

    # serving: the torch-free predictor on the export folder classifies a photo with the served file
    serving = json.loads((out / "export" / "serving.json").read_text())
    predictor = predict.load_predictor(out, threads=THREADS)
    assert predictor.backend == "onnx" and predictor.model_file.endswith(serving["file"])
    top = predictor.top_k(images[0], k=3)
    assert len(top) == 3 and all(label in HAR_CLASSES for label, _ in top)
    assert sum(predictor.predict_proba([images[0]])[0]) == pytest.approx(1.0, abs=1e-5)
