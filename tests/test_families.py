"""Every supported backbone family: layer freezing, layer-wise LR decay, and the evaluation transform against the
family's own image processor. Tiny random models and processors, built in-process."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lib import model as M
from lib import train as T
from lib.params import ModelParams, TrainParams
from lib.transforms import eval_batch, spec_from_processor

torch.set_num_threads(2)
LABELS = [f"c{i}" for i in range(3)]
SIDE = 32
VIT_LIKE = {"image_size": SIDE, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2}


def tiny_model(family: str):
    """A seeded random classifier of the family with 3 blocks (stages for Swin and ConvNeXt), 32 px input (ConvNeXt
    takes any size)."""
    import transformers as tf

    torch.manual_seed(0)
    head = {"num_labels": len(LABELS)}
    if family == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(**VIT_LIKE, intermediate_size=32, **head))
    if family == "deit":
        return tf.DeiTForImageClassification(tf.DeiTConfig(**VIT_LIKE, intermediate_size=32, **head))
    if family == "beit":
        return tf.BeitForImageClassification(tf.BeitConfig(**VIT_LIKE, intermediate_size=32, **head))
    if family == "dinov2":  # position embeddings for 40 px, interpolated to 32 px like the real 518 -> 224
        cfg = tf.Dinov2Config(**VIT_LIKE | {"image_size": 40}, mlp_ratio=2, **head)
        return tf.Dinov2ForImageClassification(cfg)
    if family in ("siglip", "siglip2"):
        vision = {k: v for k, v in VIT_LIKE.items() if k != "image_size"} | {"intermediate_size": 32}
        if family == "siglip":
            cfg = tf.SiglipConfig(vision_config=vision | {"image_size": SIDE}, **head)
            return tf.SiglipForImageClassification(cfg)
        cfg = tf.Siglip2Config(vision_config=vision | {"num_patches": (SIDE // 8) ** 2}, **head)
        return tf.Siglip2ForImageClassification(cfg)
    if family == "swin":
        cfg = tf.SwinConfig(
            image_size=SIDE, patch_size=4, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 2], window_size=2, **head
        )
        return tf.SwinForImageClassification(cfg)
    if family == "convnext":
        cfg = tf.ConvNextConfig(hidden_sizes=[8, 16, 24], depths=[1, 1, 1], num_stages=3, **head)
        return tf.ConvNextForImageClassification(cfg)
    raise AssertionError(family)


def forward(model, x: torch.Tensor):
    if model.config.model_type == "siglip2":  # NaFlex: patches are flattened and their grid is passed along
        n, c, h, w = x.shape
        p = 8
        patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)
        grid = torch.tensor([[h // p, w // p]] * n)
        mask = torch.ones(n, patches.shape[1], dtype=torch.long)
        return model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=grid)
    return model(pixel_values=x)


FAMILIES = sorted(M.FAMILIES)


def test_the_table_covers_the_supported_families():
    assert set(FAMILIES) == {"vit", "deit", "beit", "dinov2", "siglip", "siglip2", "swin", "convnext"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [1, 2])
def test_freezing_freezes_exactly_the_embeddings_and_the_first_n_blocks(family, n):
    model = tiny_model(family)
    assert model.config.model_type == family
    parts = M.layout(model)
    assert len(parts.blocks) == 3
    M.freeze_layers(model, n)
    frozen = {id(p) for m in [parts.embeddings] + parts.blocks[:n] for p in m.parameters()}
    assert all(p.requires_grad == (id(p) not in frozen) for p in model.parameters())

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    forward(model.train(), torch.randn(4, 3, SIDE, SIDE)).logits.pow(2).sum().backward()
    opt.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    names = {id(p): name for name, p in model.named_parameters()}
    assert not changed & {names[i] for i in frozen}
    # every later block and the classifier really trained
    for i, block in enumerate(parts.blocks[n:], start=n):
        assert any(names[id(p)] in changed for p in block.parameters()), f"block {i} did not train"
    assert "classifier.weight" in changed


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_decay_gives_the_head_the_base_lr_and_decays_by_depth(family):
    model = tiny_model(family)
    parts = M.layout(model)
    tp = TrainParams(learning_rate=1e-3, layer_decay=0.5, weight_decay=0.1)
    groups = T.param_groups(model, tp)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter in exactly one group
    top = len(parts.blocks) + 1
    assert lr_of[id(model.classifier.weight)] == pytest.approx(1e-3)
    for p in parts.embeddings.parameters():
        assert lr_of[id(p)] == pytest.approx(1e-3 * 0.5**top)
    for i, block in enumerate(parts.blocks):
        for p in block.parameters():
            assert lr_of[id(p)] == pytest.approx(1e-3 * 0.5 ** (top - 1 - i)), f"block {i}"


def test_an_unknown_family_is_refused_by_name():
    from transformers import ResNetConfig, ResNetForImageClassification

    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    with pytest.raises(ValueError, match="'resnet' is not supported"):
        M.freeze_layers(model, 1)
    with pytest.raises(ValueError, match="'resnet' is not supported"):
        T.param_groups(model, TrainParams(layer_decay=0.75))
    assert T.param_groups(model, TrainParams(layer_decay=None))  # no decay: nothing to discover


# The real repos' preprocessor_config.json (facebook/dinov2-base, google/siglip-base-patch16-224), and tiny versions.
DINOV2 = {
    "image_processor_type": "BitImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}
SIGLIP = {
    "image_processor_type": "SiglipImageProcessor",
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
VIT = SIGLIP | {"image_processor_type": "ViTImageProcessor", "resample": 2}  # google/vit-base-patch16-224
DEIT = DINOV2 | {  # facebook/deit-base-distilled-patch16-224: squash to 256, crop 224
    "image_processor_type": "DeiTImageProcessor",
    "size": {"height": 256, "width": 256},
}
CONVNEXT = DINOV2 | {  # facebook/convnext-base-224: shorter side 224 / crop_pct, crop 224 (no do_center_crop)
    "image_processor_type": "ConvNextImageProcessor",
    "size": {"shortest_edge": 224},
    "crop_pct": 0.875,
    "do_center_crop": None,
}
# name: (preprocessor_config.json, expected resize, input side, side after the resize, filter)
PROCESSORS = {
    "vit": (VIT, "squash", 224, 224, "bilinear"),
    "deit": (DEIT, "squash", 224, 256, "bicubic"),
    "deit-tiny": (
        DEIT | {"size": {"height": 36, "width": 36}, "crop_size": {"height": 32, "width": 32}},
        "squash",
        32,
        36,
        "bicubic",
    ),
    "dinov2": (DINOV2, "shorter_side", 224, 256, "bicubic"),
    "dinov2-tiny": (
        DINOV2 | {"size": {"shortest_edge": 37}, "crop_size": {"height": 32, "width": 32}},
        "shorter_side",
        32,
        37,
        "bicubic",
    ),
    "convnext": (CONVNEXT, "shorter_side", 224, 256, "bicubic"),
    "convnext-truncated": (CONVNEXT | {"size": {"shortest_edge": 30}}, "shorter_side", 30, 34, "bicubic"),  # 34.29
    "convnext-384": (CONVNEXT | {"size": {"shortest_edge": 384}}, "squash", 384, 384, "bicubic"),
    "siglip": (SIGLIP, "squash", 224, 224, "bicubic"),
    "siglip-tiny": (SIGLIP | {"size": {"height": 32, "width": 32}}, "squash", 32, 32, "bicubic"),
}


def photos() -> list[Image.Image]:
    """Landscape, portrait, square and small photos of noise: every resize path, up and down."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        for w, h in [(320, 240), (180, 300), (256, 256), (50, 41)]
    ]


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_eval_transform_matches_the_familys_image_processor(name, tmp_path):
    """Pixel for pixel: the same PIL resize (and crop), then float32 rescale and normalise; the only
    difference allowed is float32 rounding (abs 1e-5 on normalised values, ~1/400 of one 8-bit level)."""
    from transformers import AutoImageProcessor

    config, mode, side, resize_to, resample = PROCESSORS[name]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    own = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    spec = spec_from_processor(own)
    assert (spec.resize, spec.size, spec.resize_to, spec.resample) == (mode, side, resize_to, resample)
    assert (spec.mean, spec.std) == (tuple(config["image_mean"]), tuple(config["image_std"]))
    images = photos()
    expected = own(images, return_tensors="np")["pixel_values"]
    assert expected.shape == (len(images), 3, side, side)
    np.testing.assert_allclose(eval_batch(images, spec), expected, rtol=0, atol=1e-5)
    # the processor saved with a model (lib.model.image_processor) does the same
    saved = M.image_processor(spec)(images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(saved, expected, rtol=0, atol=1e-5)


def test_the_input_size_is_the_crop_only_where_the_processor_crops(tmp_path):
    """BEiT's processor keeps a default crop_size of 224 with do_center_crop false: its input is size, not that."""
    from transformers import AutoImageProcessor

    beit = SIGLIP | {"image_processor_type": "BeitImageProcessor", "size": {"height": 32, "width": 32}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(beit | {"do_center_crop": False}))
    own = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert own.crop_size["height"] == 224 and spec_from_processor(own).size == 32
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(beit | {"do_center_crop": True, "crop_size": {"height": 24, "width": 24}})
    )
    assert spec_from_processor(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")).size == 24


def test_patch_input_families_are_refused_by_the_pipeline(tmp_path):
    """SigLIP 2 NaFlex takes patch sequences: building it for training is refused with the reason."""
    tiny_model("siglip2").save_pretrained(tmp_path / "naflex")
    (tmp_path / "naflex" / "preprocessor_config.json").write_text(json.dumps(PROCESSORS["siglip-tiny"][0]))
    with pytest.raises(ValueError, match="NaFlex .* takes patch sequences"):
        M.build_model(ModelParams(source="local", name_or_path=str(tmp_path / "naflex")), LABELS)


def test_a_siglip_backbone_is_built_with_the_squash_transform(tmp_path):
    from lib.transforms import load_spec

    backbone = tmp_path / "backbone"
    tiny_model("siglip").save_pretrained(backbone)
    (backbone / "preprocessor_config.json").write_text(json.dumps(PROCESSORS["siglip-tiny"][0]))
    model, processor, spec = M.build_model(
        ModelParams(source="local", name_or_path=str(backbone), freeze_layers=1), LABELS
    )
    assert spec.resize == "squash" and spec.size == SIDE
    assert not any(p.requires_grad for p in M.layout(model).embeddings.parameters())
    M.save_model(model, processor, spec, tmp_path / "m")
    assert load_spec(tmp_path / "m") == spec
    saved = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": SIDE, "width": SIDE} and not saved["do_center_crop"]


@pytest.mark.parametrize("name", ["har_vit", "har_vit_reference", "har_dinov2", "har_siglip"])
def test_the_model_card_names_each_profiles_hub_backbone(name):
    import yaml

    from lib.params import ROOT, load_params
    from lib.registry.card import card_data

    p = load_params(ROOT / "params" / f"{name}.yaml")
    assert p.model.source == "hub"
    data = card_data(p.publish.model_name, {"accuracy": 0.5}, yaml.safe_load(yaml.safe_dump(p.model_dump())))
    assert data.base_model == p.model.name_or_path
    assert data.base_model in {
        "google/vit-base-patch16-224",
        "google/vit-base-patch16-224-in21k",
        "facebook/dinov2-base",
        "google/siglip-base-patch16-224",
    }
