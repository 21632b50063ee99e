"""Model building, freezing, recipe pieces (loss, mixup/cutmix, layer-wise LR decay)."""

import numpy as np
import pytest
import torch

from lib import model as M
from lib import train as T
from lib.labels import config_labels
from lib.params import ModelParams, TrainParams, VitConfig
from lib.predict import read_temperature

torch.set_num_threads(2)
LABELS = [f"c{i}" for i in range(5)]
TINY = VitConfig(
    image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
)


def tiny(freeze: int = 0):
    return M.build_model(ModelParams(config=TINY, freeze_layers=freeze), LABELS)


def test_build_from_config_has_labels_and_spec():
    model, processor, spec = tiny()
    assert model.config.id2label == dict(enumerate(LABELS)) and spec.size == 16
    assert len(M.encoder_layers(model)) == 3


@pytest.mark.parametrize("n", [0, 1, 3])
def test_freezing_really_freezes_the_first_n_layers(n):
    model, _, _ = tiny(freeze=n)
    layers = M.encoder_layers(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = model(pixel_values=torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    opt.step()
    changed = {id(p): not torch.equal(p, b) for p, b in zip(model.parameters(), before)}
    for i, layer in enumerate(layers):
        assert all(changed[id(p)] != (i < n) for p in layer.parameters() if p.ndim > 1), f"layer {i}"
    emb = model.base_model.embeddings.patch_embeddings.projection.weight
    assert changed[id(emb)] == (n == 0)
    assert changed[id(model.classifier.weight)]
    counts = M.count_parameters(model)
    assert (counts["trainable"] < counts["total"]) == (n > 0)


def test_freezing_more_layers_than_exist_is_an_error():
    model, _, _ = tiny()
    with pytest.raises(ValueError, match="3 encoder layers"):
        M.freeze_layers(model, 4)


def test_save_and_load_round_trip(tmp_path):
    model, processor, spec = tiny()
    M.save_model(model, processor, spec, tmp_path / "m")
    M.save_temperature(tmp_path / "m", 1.7)
    again = M.load_model(tmp_path / "m")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(pixel_values=x).logits, again(pixel_values=x).logits)
    assert config_labels(tmp_path / "m") == LABELS and read_temperature(tmp_path / "m") == 1.7
    assert read_temperature(tmp_path) == 1.0


@pytest.mark.parametrize("crop_pct", [None, 0.875])
def test_saved_processor_is_the_evaluation_transform(tmp_path, crop_pct):
    """A backbone whose own processor resizes straight to 224, bilinear (like google/vit-base-patch16-224). Without
    model.crop_pct evaluation does the same; with it, the shorter side goes to 224 / crop_pct and a 224 center crop
    follows, with the processor's filter, mean and std. The saved processor and preprocessing.json say the same."""
    import json

    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    from lib.transforms import ImageSpec, load_spec

    backbone = tmp_path / "backbone"
    cfg = ViTConfig(
        image_size=224, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    ViTForImageClassification(cfg).save_pretrained(backbone)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ViTImageProcessorPil(size={"height": 224, "width": 224}, image_mean=mean, image_std=std).save_pretrained(backbone)
    mp = ModelParams(source="local", name_or_path=str(backbone), crop_pct=crop_pct)
    model, processor, spec = M.build_model(mp, LABELS)
    M.save_model(model, processor, spec, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    assert (saved["image_mean"], saved["image_std"], saved["resample"]) == (mean, std, 2)
    if crop_pct is None:
        assert spec == ImageSpec(224, tuple(mean), tuple(std), crop_pct=1.0, resize="squash", resample="bilinear")
        assert saved["size"] == {"height": 224, "width": 224} and not saved["do_center_crop"]
    else:
        assert spec == ImageSpec(224, tuple(mean), tuple(std), crop_pct=0.875, resample="bilinear")
        assert saved["size"] == {"shortest_edge": 256} and saved["crop_size"] == {"height": 224, "width": 224}
        assert saved["do_center_crop"]
    assert load_spec(tmp_path / "m") == spec
    assert processor.to_dict() == M.image_processor(spec).to_dict()


def test_soft_cross_entropy_matches_torch_with_label_smoothing():
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    torch.testing.assert_close(T.soft_cross_entropy(logits, y, 0.1), expected)
    soft = torch.nn.functional.one_hot(y, 5).float()
    torch.testing.assert_close(T.soft_cross_entropy(logits, soft), torch.nn.functional.cross_entropy(logits, y))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mix_batch_weights_labels_by_pixel_shares(mixup, cutmix, seed):
    """Image i is the constant i, with its own label: each mixed image blends two source images, and its soft label
    must put the same shares on those two images' labels (mean pixel = label weights x the labels' image values)."""
    n, num_labels = 6, 7
    labels = torch.tensor([3, 0, 5, 1, 6, 2])  # image i carries labels[i]; label 4 belongs to no image
    pixels = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 16, 16).clone()
    batch = {"pixel_values": pixels, "labels": labels}
    out = T.mix_batch(batch, num_labels, mixup, cutmix, np.random.default_rng(seed))
    soft, mixed = out["labels"], out["pixel_values"]
    assert soft.shape == (n, num_labels) and mixed.shape == pixels.shape
    torch.testing.assert_close(soft.sum(1), torch.ones(n))
    image_of_label = torch.zeros(num_labels)
    image_of_label[labels] = torch.arange(n, dtype=torch.float32)
    torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), soft @ image_of_label)
    for k in range(n):
        sources = set(image_of_label[soft[k] > 0].tolist())
        assert k in sources and len(sources) <= 2  # the image itself and at most one partner
        if cutmix and not mixup:  # a pasted box: every pixel comes from one of the two images
            assert set(mixed[k].unique().tolist()) <= sources
    two = soft[(soft > 0).sum(1) == 2]
    assert len(two) >= n // 2  # the batch really mixed, with shares that tell the two images apart
    assert ((two.max(1).values - 0.5).abs() > 0.02).any()
    assert T.mix_batch(batch, num_labels, 0.0, 0.0, np.random.default_rng(seed)) is batch


def test_layer_decay_scales_learning_rate_by_depth():
    model, _, _ = tiny()
    tp = TrainParams(learning_rate=1e-3, layer_decay=0.5, weight_decay=0.1)
    groups = T.param_groups(model, tp)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    layers = M.encoder_layers(model)
    assert lr_of[id(model.classifier.weight)] == pytest.approx(1e-3)
    assert lr_of[
        id(layers[2].mlp.fc1.weight if hasattr(layers[2], "mlp") else next(layers[2].parameters()))
    ] == pytest.approx(5e-4)
    assert lr_of[id(model.base_model.embeddings.patch_embeddings.projection.weight)] == pytest.approx(1e-3 * 0.5**4)
    assert wd_of[id(model.classifier.bias)] == 0.0 and wd_of[id(model.classifier.weight)] == 0.1
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_cpu_refuses_gpu_precision():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert T.device_precision("auto") == {"bf16": False, "fp16": False, "use_cpu": True}
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        T.device_precision("bf16")


def test_torchrun_command():
    cmd = T.torchrun_command("p.yaml", TrainParams(num_gpus=4, nodes=2), node_rank=1, master="10.0.0.1:29400")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {
        "--nnodes=2",
        "--nproc_per_node=4",
        "--node_rank=1",
        "--master_addr=10.0.0.1",
        "--master_port=29400",
    } <= set(cmd)
    assert cmd[-3:] == ["-m", "lib.train", "p.yaml"]
    assert T.distributed(TrainParams(num_gpus=2)) and not T.distributed(TrainParams())
