"""Params validation: bad profiles and overrides stop before any heavy work, naming file and key."""

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from lib.params import ROOT, Params, ParamsError, dump_params, flatten, load_params, parse_override

PROFILES = sorted((ROOT / "params").glob("*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_shipped_profile_validates(path):
    params = load_params(path)
    assert load_params(path, []).model_dump() == params.model_dump()


def test_demo_is_offline_cpu_tiny(monkeypatch):
    """The demo needs no network (generated images, a ViT built from its config, local registry, no online
    tracker), runs on a machine without a GPU, and is small enough to train there in minutes."""
    import torch

    from lib.labels import HAR_CLASSES
    from lib.model import build_model, count_parameters
    from lib.train import device_precision

    p = load_params(ROOT / "params" / "demo.yaml")
    assert (p.data.source, p.model.source) == ("embedded", "config")
    assert set(p.train.report_to) <= {"tensorboard", "none"}  # wandb and mlflow log to a server
    assert not p.publish.registry.startswith("s3://") and not p.dashboard.registry.startswith("s3://")
    assert p.train.num_gpus * p.train.nodes == 1 and p.train.ddp_backend != "nccl"
    assert p.dashboard.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_precision(p.train.precision) == {"bf16": False, "fp16": False, "use_cpu": True}
    assert p.model.config.image_size <= 64 and len(HAR_CLASSES) * p.data.embedded.images_per_class <= 2000
    model, _, _ = build_model(p.model, list(HAR_CLASSES))
    assert count_parameters(model)["total"] < 2_000_000  # a ViT-Tiny has 5.7 M, ViT-B/16 86 M


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(ParamsError) as info:
        load_params(path, overrides)
    return str(info.value)


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, {"train": {"epoks": 3}})
    msg = error_of(path)
    assert str(path) in msg and "train.epoks" in msg and "unknown key" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    msg = error_of(write(tmp_path, {"train": {"batch_size": "big"}}))
    assert "train.batch_size" in msg and "'big'" in msg


def test_split_fractions_must_leave_training_data(tmp_path):
    msg = error_of(write(tmp_path, {"data": {"val_fraction": 0.5, "test_fraction": 0.5}}))
    assert "data" in msg and "val_fraction + test_fraction" in msg


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"near_duplicate_distance": 10, "near_duplicate_min_similarity": None}, "without near_duplicate_min_sim"),
        ({"near_duplicate_min_similarity": 0}, "data.near_duplicate_min_similarity"),
        ({"near_duplicate_min_similarity": 1.2}, "data.near_duplicate_min_similarity"),
        ({"near_duplicate_distance": 17}, "data.near_duplicate_distance"),
        ({"near_duplicate_distance": -1}, "data.near_duplicate_distance"),
    ],
)
def test_near_duplicate_thresholds_are_validated(tmp_path, data, expected):
    """A hash-only distance wide enough to join look-alike photos, and thresholds outside their range, stop."""
    assert expected in error_of(write(tmp_path, {"data": data}))


def test_near_duplicate_thresholds_that_make_sense_pass(tmp_path):
    from lib.params import HASH_ONLY_MAX_DISTANCE

    for data in (
        {"near_duplicate_distance": HASH_ONLY_MAX_DISTANCE, "near_duplicate_min_similarity": None},
        {"near_duplicate_distance": None, "near_duplicate_min_similarity": None},
        {"near_duplicate_distance": 16, "near_duplicate_min_similarity": 1},
    ):
        p = load_params(write(tmp_path, {"data": data})).data
        assert (p.near_duplicate_distance, p.near_duplicate_min_similarity) == tuple(data.values())


def test_missing_image_folder_is_an_error(tmp_path):
    msg = error_of(write(tmp_path, {"data": {"source": "imagefolder", "path": str(tmp_path / "nope")}}))
    assert "data.path" in msg and "not a folder" in msg


def test_missing_local_model_is_an_error(tmp_path):
    msg = error_of(write(tmp_path, {"model": {"source": "local", "name_or_path": "no/such/model"}}))
    assert "model.name_or_path" in msg


def test_enabled_gate_without_conditions_is_an_error(tmp_path):
    msg = error_of(write(tmp_path, {"publish": {"gate": {"enabled": True, "conditions": []}}}))
    assert "publish.gate" in msg and "condition" in msg


def test_overrides_are_parsed_and_validated(tmp_path):
    path = write(tmp_path, {})
    p = load_params(path, ["train.epochs=2", "model.freeze_layers=1", "publish.gate.enabled=false"])
    assert (p.train.epochs, p.model.freeze_layers, p.publish.gate.enabled) == (2, 1, False)
    assert "train.epochs" in error_of(path, ["train.epochs=-1"])
    assert "train.nope" in error_of(path, ["train.nope=1"])
    with pytest.raises(ParamsError, match="key=value"):
        load_params(path, ["train.epochs"])


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=text") == ("a.b", "text")


def test_dump_round_trips(tmp_path):
    p = load_params(ROOT / "params" / "demo.yaml", ["train.epochs=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_params(p))
    assert load_params(path).model_dump() == p.model_dump()


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--check", "stages: prepare -> train -> evaluate -> export -> publish"),
        ("--explain", "train.augment.scale_min = 0.6  (default: 0.6)"),
    ],
)
def test_cli_fails_fast_without_importing_torch(tmp_path, flag, expected):
    bad = write(tmp_path, {"train": {"epochs": "many"}})
    code = (
        f"import sys; from lib.pipeline import main; rc = main(['--params', sys.argv[1], '{flag}']); "
        "assert 'torch' not in sys.modules, 'params check imported torch'; sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "train.epochs" in res.stderr and str(bad) in res.stderr
    ok = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "params" / "demo.yaml")], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert expected in ok.stdout


def fields_of(model: type[BaseModel], prefix: str = "") -> dict:
    """Dotted key -> pydantic FieldInfo for every field of model and of every model its fields hold (lists too)."""
    found = {}
    for name, field in model.model_fields.items():
        found[prefix + name] = field
        todo = [field.annotation]
        while todo:  # unwrap X | None, list[X], Literal[...] down to the models inside
            annotation = todo.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found |= fields_of(annotation, f"{prefix}{name}.")
            else:
                todo += get_args(annotation)
    return found


def test_every_params_key_has_a_description():
    fields = fields_of(Params)
    for key in ("run", "data.embedded.images_per_class", "train.augment.scale_min", "publish.gate.conditions.metric"):
        assert key in fields, key
    missing = sorted(key for key, field in fields.items() if not (field.description or "").strip())
    assert not missing, f"params keys without a description: {missing}"


def test_explain_shows_every_key_with_value_default_and_description(capsys):
    from lib.pipeline import main

    assert main(["--params", str(ROOT / "params" / "demo.yaml"), "--set", "train.epochs=3", "--explain"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for key in flatten(load_params(ROOT / "params" / "demo.yaml").model_dump()):
        assert any(line.startswith(f"{key} = ") for line in lines), key
    assert "[train.augment] " + Params.model_fields["train"].annotation.model_fields["augment"].description in lines
    at = lines.index("train.epochs = 3.0  (default: 8.0)")  # the override, and the default beside it
    assert lines[at + 1].strip().startswith("Passes over the training split")
    assert "publish.gate.conditions[].metric  (each item; required)" in lines
    assert "model.config.hidden_size = 128  (default: 192)" in lines


def test_sweep_expands_to_one_run_per_value():
    from lib.pipeline import sweep_overrides

    runs = sweep_overrides(["model.freeze_layers=0,2,11"])
    assert runs == [
        ("freeze_layers0", ["model.freeze_layers=0"]),
        ("freeze_layers2", ["model.freeze_layers=2"]),
        ("freeze_layers11", ["model.freeze_layers=11"]),
    ]
    assert len(sweep_overrides(["train.epochs=1,2", "train.learning_rate=0.1,0.2"])) == 4
    with pytest.raises(ParamsError, match="lists no values"):
        sweep_overrides(["train.epochs="])


def test_sweep_check_validates_every_run(capsys):
    from lib.pipeline import main

    assert main(["--params", str(ROOT / "params" / "demo.yaml"), "--sweep", "model.freeze_layers=0,2", "--check"]) == 0
    out = capsys.readouterr().out
    assert "outputs/demo-freeze_layers0" in out and "outputs/demo-freeze_layers2" in out
    assert main(["--params", str(ROOT / "params" / "demo.yaml"), "--sweep", "model.freeze_layers=0,9", "--check"]) == 2
    assert "freeze_layers=9 exceeds" in capsys.readouterr().err
