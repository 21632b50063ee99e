"""Params validation: bad profiles and overrides stop before any heavy work, naming file and key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lib.params import ROOT, ParamsError, dump_params, load_params, parse_override

PROFILES = sorted((ROOT / "params").glob("*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_shipped_profile_validates(path):
    params = load_params(path)
    assert load_params(path, []).model_dump() == params.model_dump()


def test_demo_is_offline_cpu_tiny():
    p = load_params(ROOT / "params" / "demo.yaml")
    assert (p.data.source, p.model.source) == ("embedded", "config")


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


def test_check_cli_fails_fast_without_importing_torch(tmp_path):
    bad = write(tmp_path, {"train": {"epochs": "many"}})
    code = (
        "import sys; from lib.pipeline import main; rc = main(['--params', sys.argv[1], '--check']); "
        "assert 'torch' not in sys.modules, 'params check imported torch'; sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "train.epochs" in res.stderr and str(bad) in res.stderr
    ok = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "params" / "demo.yaml")], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert "stages: prepare -> train -> evaluate -> export -> publish" in ok.stdout


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
