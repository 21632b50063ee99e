"""The rehearsal's cheap, deterministic parts: override policy, key coverage, the offline dataset cache."""

import os
import subprocess
import sys

import pytest
import yaml

from lib.labels import HAR_CLASSES
from lib.params import ROOT, flatten
from tools.hub_cache import (
    HUB_DATASET_ID,
    HUB_DINOV2_ID,
    HUB_IN21K_ID,
    HUB_MODEL_ID,
    HUB_MODELS,
    HUB_SIGLIP_ID,
    write_dataset_cache,
    write_model_cache,
)
from tools.rehearsal.runner import (
    GATE_OFF,
    PROFILE,
    REFERENCE,
    RehearsalError,
    base_overrides,
    check_overrides,
    coverage,
    hub_models,
    parse_args,
    planned_runs,
    profile_mismatches,
    with_length,
)


def test_override_policy_refuses_recipe_keys():
    check_overrides({"train.batch_size": 16, "train.max_steps": 4, "publish.registry": "s3://b/r"})
    for key in ("train.mixup_alpha", "train.learning_rate", "export.min_agreement", "publish.gate.enabled"):
        with pytest.raises(RehearsalError, match=f"refused: {key}"):
            check_overrides({"train.epochs": 1, key: 0})
    check_overrides({"publish.gate.enabled": False}, extra=tuple(GATE_OFF))  # the publish step's one exception


def test_cli_refuses_a_recipe_override_before_any_work():
    res = subprocess.run(
        [sys.executable, "-m", "tools.rehearsal", "--set", "train.mixup_alpha=0", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "refused: train.mixup_alpha" in res.stderr


PROFILES = [PROFILE, ROOT / "params" / "har_dinov2.yaml", ROOT / "params" / "har_siglip.yaml"]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_coverage_lists_every_leaf_key_of_the_profile(profile, tmp_path):
    base = base_overrides(profile, "cpu", tmp_path, "s3://bucket/registry")
    ovr = with_length(profile, "cpu", 115, base)
    per_step = {"prepare": base, "train": ovr, "publish": ovr | {"publish.gate.enabled": False}}
    cov = coverage(profile, per_step)
    profile_keys = set(flatten(yaml.safe_load(profile.read_text())))
    assert [r["key"] for r in cov["keys"]] == list(flatten(yaml.safe_load(profile.read_text())))
    assert {"train.mixup_alpha", "train.layer_decay", "publish.gate.conditions", "export.min_agreement"} <= profile_keys
    rows = {r["key"]: r for r in cov["keys"]}
    assert rows["train.mixup_alpha"] == {"key": "train.mixup_alpha", "profile": 0.2, "ran": "profile"}
    assert rows["train.batch_size"]["ran"] == "overridden" and rows["train.batch_size"]["override"] == 16
    assert rows["publish.gate.enabled"]["steps"] == ["publish"]
    assert cov["overridden"] + cov["at_profile_value"] == len(profile_keys)
    overridden = {r["key"] for r in cov["keys"] if r["ran"] == "overridden"}
    assert overridden - set(GATE_OFF) <= {
        "run.name",
        "run.output_root",
        "train.batch_size",
        "train.num_workers",
        "evaluate.batch_size",
        "evaluate.num_workers",
        "publish.registry",
        "dashboard.registry",
    }
    # the run length is a key the profile file does not set (or train.epochs while max_steps does not exist)
    length = {r["key"]: r for r in cov["not_in_profile"]} | {k: rows[k] for k in ("train.epochs",) if k in overridden}
    assert set(length) & {"train.max_steps", "train.epochs"}
    if "train.max_steps" in length:
        assert length["train.max_steps"]["override"] == 2 * 8  # 2 epochs of ceil(115 / 16) steps


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_only_har_vit_brings_the_reference_profile_and_each_run_names_its_hub_models(profile):
    args = parse_args(["--profile", str(profile)])
    runs = planned_runs(args)
    assert [r[0] for r in runs] == ([PROFILE, REFERENCE] if profile == PROFILE else [profile])
    assert planned_runs(parse_args(["--profile", str(profile), "--no-reference"]))[0][0] == profile
    models = hub_models(args)
    expected = {
        "har_vit": [HUB_MODEL_ID, HUB_IN21K_ID],
        "har_dinov2": [HUB_DINOV2_ID],
        "har_siglip": [HUB_SIGLIP_ID],
    }[profile.stem]
    assert models == expected and set(models) <= set(HUB_MODELS)


def test_a_profile_naming_an_unknown_hub_model_is_refused_before_any_work(tmp_path):
    tree = yaml.safe_load(PROFILES[1].read_text())
    tree["model"]["name_or_path"] = "facebook/dinov2-large"
    (tmp_path / "large.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(RehearsalError, match="no offline stand-in for model 'facebook/dinov2-large'"):
        hub_models(parse_args(["--profile", str(tmp_path / "large.yaml")]))


def test_profile_mismatches_spot_a_changed_recipe_key(tmp_path):
    tree = yaml.safe_load(PROFILE.read_text())
    tree["train"]["batch_size"] = 16
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(tree))
    assert profile_mismatches(PROFILE, tmp_path / "same.yaml", {"train.batch_size": 16}) == []
    tree["train"]["mixup_alpha"] = 0.0
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(tree))
    mismatches = profile_mismatches(PROFILE, tmp_path / "changed.yaml", {"train.batch_size": 16})
    assert [m.split(":")[0] for m in mismatches] == ["train.mixup_alpha"]


def test_dataset_cache_loads_offline_with_the_hub_schema(tmp_path):
    write_dataset_cache(tmp_path / "datasets", per_class=2, test_images=3)
    code = (
        "import datasets, json\n"
        f"dd = datasets.load_dataset({HUB_DATASET_ID!r})\n"
        "print(json.dumps({s: len(d) for s, d in dd.items()}))\n"
        "print(json.dumps({'names': dd['train'].features['labels'].names,\n"
        "                  'image': type(dd['train'].features['image']).__name__,\n"
        "                  'train': list(dd['train']['labels']), 'test': list(dd['test']['labels']),\n"
        "                  'size': dd['train'][0]['image'].size}))\n"
    )
    env = dict(
        os.environ,
        HF_DATASETS_CACHE=str(tmp_path / "datasets"),
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    sizes, info = (yaml.safe_load(line) for line in res.stdout.strip().splitlines()[-2:])
    assert sizes == {"train": 30, "test": 3}
    assert info["names"] == list(HAR_CLASSES) and info["image"] == "Image"
    assert info["train"] == [c for c in range(15) for _ in range(2)] and info["test"] == [0, 0, 0]
    assert min(info["size"]) >= 100  # photo-sized generated images, not thumbnails


@pytest.mark.integration  # a subprocess: the Hub client reads HF_HUB_OFFLINE at import
def test_every_hub_stand_in_resolves_offline_with_its_repos_processor(tmp_path):
    """Tiny stand-ins of every id in HUB_MODELS load through transformers with the Hub offline: the architecture
    the real repo declares, and the image processor class and resize rule of its preprocessor_config.json."""
    for model_id in HUB_MODELS:
        write_model_cache(tmp_path / "hub", model_id, "tiny")
    code = (
        "import json\n"
        "from transformers import AutoConfig, AutoImageProcessor\n"
        "from tools.hub_cache import HUB_MODELS\n"
        "found = {}\n"
        "for m in HUB_MODELS:\n"
        "    cfg, proc = AutoConfig.from_pretrained(m), AutoImageProcessor.from_pretrained(m, backend='pil')\n"
        "    found[m] = [cfg.model_type, cfg.architectures[0], type(proc).__name__, proc.do_center_crop is True]\n"
        "print(json.dumps(found))\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    found = yaml.safe_load(res.stdout.strip().splitlines()[-1])
    assert found == {
        HUB_MODEL_ID: ["vit", "ViTForImageClassification", "ViTImageProcessorPil", False],
        HUB_IN21K_ID: ["vit", "ViTModel", "ViTImageProcessorPil", False],
        HUB_DINOV2_ID: ["dinov2", "Dinov2Model", "BitImageProcessorPil", True],
        HUB_SIGLIP_ID: ["siglip", "SiglipModel", "SiglipImageProcessorPil", False],
    }
