"""Model registry on a real S3 endpoint (moto server) and a local folder: gate, atomicity, verification, cache, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from huggingface_hub import ModelCard
from PIL import Image

import lib.registry.__main__ as registry_cli
import lib.registry.publish as publish_module
import lib.registry.storage as storage_module
from lib.params import ROOT, GateCondition, GateParams, Params, save_params
from lib.pipeline import finish_stage
from lib.registry.gate import check_gate
from lib.registry.publish import publish
from lib.registry.pull import list_versions, pull
from lib.registry.storage import RegistryError

CLASSES = ["calling", "clapping", "sitting"]
GATE = GateParams(conditions=[GateCondition(metric="accuracy", min=0.5)])
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def write_metrics(run: Path, accuracy: float = 0.9, sitting_f1: float = 0.8) -> None:
    """metrics.json in the evaluate stage's format."""
    per_class = {c: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 60} for c in CLASSES}
    per_class["sitting"]["f1"] = sitting_f1
    metrics = {
        "accuracy": accuracy,
        "f1_weighted": 0.88,
        "f1_macro": 0.87,
        "precision_weighted": 0.9,
        "recall_weighted": 0.9,
        "per_class": per_class,
        "n_test": 180,
        "calibration": {"ece": 0.03},
        "served": {
            "backend": "onnx",
            "variant": "int8",
            "file": "export/model.int8.onnx",
            "temperature": 1.3,
            "accuracy": 0.8812,
            "ece": 0.0213,
        },
    }
    (run / "metrics.json").write_text(json.dumps(metrics))


def make_run(root: Path, name: str = "run1", registry_url: str = "outputs/registry", model_bytes: int = 4096) -> Path:
    """A fake run folder as the earlier stages leave it (small files)."""
    run = root / name
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text(json.dumps({"id2label": dict(enumerate(CLASSES))}))
    (run / "model" / "model.safetensors").write_bytes(os.urandom(model_bytes))
    (run / "model" / "preprocessing.json").write_text(json.dumps({"size": 64}))
    (run / "export").mkdir()
    (run / "export" / "serving.json").write_text("{}")
    (run / "data").mkdir()
    (run / "data" / "dataset_dict.json").write_text("{}")
    (run / "data" / "summary.json").write_text(
        json.dumps(
            {
                "source": "embedded",
                "split_sizes": {"train": 1440, "validation": 180, "test": 180},
                "duplicates": {"exact_groups": 3, "near_duplicate_distance": 4, "near_groups": 7},
            }
        )
    )
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "state.bin").write_bytes(b"not published")
    write_metrics(run)
    params = Params.model_validate(
        {"run": {"name": name, "output_root": str(root)}, "publish": {"registry": registry_url}}
    )
    save_params(params, run / "params.yaml")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    (run / "confusion_matrix.png").write_bytes(buf.getvalue())
    for stage in ("prepare", "train", "evaluate", "export"):  # what the stage notebooks record as they finish
        finish_stage(run, stage, params)
    return run


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "outputs")


@pytest.fixture(params=["s3", "local"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A registry URL that does not exist yet: an S3 bucket on the moto server, or a local folder."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/models"
    return str(tmp_path / "registry")


def stored(url: str, key: str) -> bytes:
    """Raw bytes of a registry object, read without lib.registry."""
    if url.startswith("s3://"):
        bucket, prefix = url[5:].split("/", 1)
        return boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
    return (Path(url) / key).read_bytes()


def store(url: str, key: str, data: bytes) -> None:
    """Overwrite a registry object behind lib.registry's back."""
    if url.startswith("s3://"):
        bucket, prefix = url[5:].split("/", 1)
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
    else:
        (Path(url) / key).write_bytes(data)


def all_keys(url: str) -> list[str]:
    """Every object in the registry (S3: the whole bucket), or [] when the bucket/folder does not exist."""
    if url.startswith("s3://"):
        client = boto3.client("s3")
        bucket = url[5:].split("/", 1)[0]
        try:
            return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        except client.exceptions.NoSuchBucket:
            return []
    return [p.as_posix() for p in Path(url).rglob("*") if p.is_file()] if Path(url).exists() else []


def cached_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


# --------------------------------------------------------------------------- gate


def test_check_gate_names_metric_threshold_and_miss():
    metrics = {"accuracy": 0.42, "loss": 1.5, "per_class": {"sitting": {"f1": 0.3}}, "name": "x"}
    conds = [
        GateCondition(metric="accuracy", min=0.5),
        GateCondition(metric="loss", max=1.0),
        GateCondition(metric="per_class.sitting.f1", min=0.25),
        GateCondition(metric="per_class.sitting.f1", min=0.4, max=0.9),
        GateCondition(metric="f1_macro", min=0.1),
        GateCondition(metric="name", min=0.1),
    ]
    failures = check_gate(metrics, conds)
    assert failures[0] == "accuracy = 0.4200 is below min 0.5000 by 0.0800"
    assert failures[1] == "loss = 1.5000 is above max 1.0000 by 0.5000"
    assert failures[2] == "per_class.sitting.f1 = 0.3000 is below min 0.4000 by 0.1000"
    assert failures[3].startswith("f1_macro: missing")
    assert failures[4].startswith("name: not a number")
    assert len(failures) == 5
    assert check_gate({"accuracy": 0.5}, conds[:1]) == []  # the threshold itself passes


def test_disabled_gate_publishes_a_failing_run(run: Path, tmp_path: Path):
    write_metrics(run, accuracy=0.1)
    result = publish(run, str(tmp_path / "reg"), "har-vit", GateParams(enabled=False))
    assert result["published"] and result["failures"] == []


# --------------------------------------------------------------------------- publish


def test_publish_uploads_verified_version_and_moves_latest(run: Path, reg: str):
    result = publish(run, reg, "har-vit", GATE)
    assert result["published"] and result["failures"] == []
    version = result["version"]
    latest = json.loads(stored(reg, "har-vit/latest.json"))
    assert latest["version"] == version
    manifest_bytes = stored(reg, f"har-vit/{version}/manifest.json")
    assert hashlib.sha256(manifest_bytes).hexdigest() == latest["manifest_sha256"]
    manifest = json.loads(manifest_bytes)
    paths = {e["path"] for e in manifest["files"]}
    assert paths == {
        "model/config.json",
        "model/model.safetensors",
        "model/preprocessing.json",
        "export/serving.json",
        "metrics.json",
        "params.yaml",
        "confusion_matrix.png",
        "README.md",
    }
    for e in manifest["files"]:  # checksums match the bytes actually stored, and the run's files
        data = stored(reg, f"har-vit/{version}/{e['path']}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (e["size"], e["sha256"])
        if e["path"] != "README.md":
            assert data == (run / e["path"]).read_bytes()
    card = stored(reg, f"har-vit/{version}/README.md").decode()
    assert "![confusion matrix](confusion_matrix.png)" in card and "| sitting |" in card
    assert "What is served: `export/model.int8.onnx` (onnx, int8" in card
    assert "| near groups | 7 |" in card and "| near duplicate distance | 4 |" in card
    assert "accuracy 0.8812, expected calibration error 0.0213" in card
    assert (
        "| train images | 1440 |" in card
        and "| train.learning_rate | 0.001 |" in card
        and "| train.epochs | 8 |" in card
    )
    assert manifest["metrics"]["accuracy"] == 0.9 and "per_class" not in manifest["metrics"]
    record = json.loads((run / "publish.json").read_text())
    assert record["published"] and record["version"] == version and record["url"].endswith(f"har-vit/{version}")


def published_card(run: Path, tmp_path: Path) -> ModelCard:
    """Publish run to a local registry and read the version's README.md back as a Hugging Face model card."""
    reg = tmp_path / "registry"
    version = publish(run, str(reg), "har-vit", GATE)["version"]
    return ModelCard.load(reg / "har-vit" / version / "README.md")


def test_card_front_matter_names_hub_model_dataset_and_test_metrics(run: Path, tmp_path: Path):
    hub = {"data": {"source": "hub", "test_fraction": 0.2}, "model": {"source": "hub"}}
    save_params(
        Params.model_validate({"run": {"name": "run1", "output_root": str(run.parent)}, **hub}), run / "params.yaml"
    )
    card = published_card(run, tmp_path)
    data, metrics = card.data, json.loads((run / "metrics.json").read_text())
    assert (data.library_name, data.pipeline_tag) == ("transformers", "image-classification")
    assert data.base_model == "google/vit-base-patch16-224"
    assert data.datasets == ["Bingsu/Human_Action_Recognition"]
    assert {"vision-transformer", "human-action-recognition", "image-classification"} <= set(data.tags)
    assert data.license is None  # nothing in params says which license applies
    assert data.model_name == "har-vit"
    results = {(r.metric_type, r.metric_config): r for r in data.eval_results}
    assert set(results) == {("accuracy", None), ("f1", None), ("accuracy", "served")}
    assert results["accuracy", None].metric_value == metrics["accuracy"]
    assert results["f1", None].metric_value == metrics["f1_weighted"]
    assert results["f1", None].metric_args == {"average": "weighted"}
    assert results["accuracy", "served"].metric_value == metrics["served"]["accuracy"]
    for r in data.eval_results:  # the test part of the labelled train split, not HAR's unlabelled test split
        assert (r.task_type, r.dataset_type, r.dataset_split) == (
            "image-classification",
            "Bingsu/Human_Action_Recognition",
            "train",
        )
        assert r.dataset_args == {"test_fraction": 0.2, "seed": 42}
    assert card.text.lstrip().startswith("# har-vit — version ")  # the Markdown body follows the front matter
    assert "| sitting |" in card.text and "![confusion matrix](confusion_matrix.png)" in card.text


def test_card_front_matter_of_a_config_built_model_on_generated_data(run: Path, tmp_path: Path):
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["served"]  # not exported: no served accuracy
    (run / "metrics.json").write_text(json.dumps(metrics))
    data = published_card(run, tmp_path).data
    assert (data.library_name, data.pipeline_tag) == ("transformers", "image-classification")
    assert data.base_model is None and data.datasets is None  # no Hub id to point at
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("accuracy", metrics["accuracy"]),
        ("f1", metrics["f1_weighted"]),
    ]
    assert {(r.dataset_type, r.dataset_split) for r in data.eval_results} == {("embedded", "test")}


def test_gate_failure_uploads_nothing(run: Path, reg: str):
    if reg.startswith("s3://"):
        boto3.client("s3").create_bucket(Bucket=reg[5:].split("/")[0])
    write_metrics(run, accuracy=0.4, sitting_f1=0.1)
    gate = GateParams(
        conditions=[GateCondition(metric="accuracy", min=0.5), GateCondition(metric="per_class.sitting.f1", min=0.3)]
    )
    result = publish(run, reg, "har-vit", gate)
    assert not result["published"] and result["version"] is None
    assert result["failures"] == [
        "accuracy = 0.4000 is below min 0.5000 by 0.1000",
        "per_class.sitting.f1 = 0.1000 is below min 0.3000 by 0.2000",
    ]
    assert all_keys(reg) == []
    assert json.loads((run / "publish.json").read_text())["failures"] == result["failures"]


def test_run_folder_without_model_is_refused_before_upload(run: Path, reg: str):
    for f in (run / "model").iterdir():
        f.unlink()
    with pytest.raises(RegistryError, match="model/"):
        publish(run, reg, "har-vit", GATE)
    assert all_keys(reg) == []


def test_upload_dying_midway_keeps_previous_latest(
    run: Path, reg: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    first = publish(run, reg, "har-vit", GATE)["version"]
    write_metrics(run, accuracy=0.95)
    backend = storage_module.S3Storage if reg.startswith("s3://") else storage_module.LocalStorage
    real_put = backend.put_file
    calls = []

    def dying_put(self, key, path, progress=None):
        calls.append(key)
        if len(calls) > 3:
            raise ConnectionError("network dropped")
        real_put(self, key, path, progress)

    monkeypatch.setattr(backend, "put_file", dying_put)
    with pytest.raises(ConnectionError):
        publish(run, reg, "har-vit", GATE)
    assert len(calls) == 4  # three files landed before the failure
    assert json.loads(stored(reg, "har-vit/latest.json"))["version"] == first
    assert [v["version"] for v in list_versions(reg)] == [first]  # the half-written version is not listed
    assert pull(reg, cache_dir=tmp_path / "cache").name == first

    monkeypatch.setattr(backend, "put_file", real_put)
    second = publish(run, reg, "har-vit", GATE)["version"]
    assert second != first
    assert json.loads(stored(reg, "har-vit/latest.json"))["version"] == second
    assert json.loads((pull(reg, cache_dir=tmp_path / "cache") / "metrics.json").read_text())["accuracy"] == 0.95


def test_bytes_altered_in_transit_fail_verification(
    run: Path, reg: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    first = publish(run, reg, "har-vit", GATE)["version"]
    write_metrics(run, accuracy=0.96)
    backend = storage_module.S3Storage if reg.startswith("s3://") else storage_module.LocalStorage
    real_put = backend.put_file
    bad = tmp_path / "bad.bin"
    bad.write_bytes(os.urandom(4096))  # same size as the model, other bytes

    def altering_put(self, key, path, progress=None):
        real_put(self, key, bad if key.endswith("model.safetensors") else path)

    monkeypatch.setattr(backend, "put_file", altering_put)
    with pytest.raises(RegistryError, match="verification failed for .*model.safetensors: sha256 mismatch"):
        publish(run, reg, "har-vit", GATE)
    assert json.loads(stored(reg, "har-vit/latest.json"))["version"] == first
    assert [v["version"] for v in list_versions(reg)] == [first]


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_pull_refuses_damaged_object_and_caches_nothing(run: Path, reg: str, damage: str, tmp_path: Path):
    version = publish(run, reg, "har-vit", GATE)["version"]
    key = f"har-vit/{version}/model/model.safetensors"
    data = stored(reg, key)
    store(reg, key, data[:-100] if damage == "truncate" else data[:10] + bytes([data[10] ^ 1]) + data[11:])
    cache = tmp_path / "cache"
    with pytest.raises(RegistryError, match=r"checksum error in .*model/model\.safetensors"):
        pull(reg, cache_dir=cache)
    assert cached_files(cache) == []


def test_versions_never_overwritten_and_pulls_cached(
    run: Path, reg: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    pinned = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    monkeypatch.setattr(publish_module, "_utcnow", lambda: pinned)
    v1 = publish(run, reg, "har-vit", GATE)["version"]
    assert v1.startswith("20200102T030405Z-")
    manifest_before = stored(reg, f"har-vit/{v1}/manifest.json")
    with pytest.raises(RegistryError, match="already exists"):  # same content, same second: same id, refused
        publish(run, reg, "har-vit", GATE)
    assert stored(reg, f"har-vit/{v1}/manifest.json") == manifest_before
    monkeypatch.undo()

    write_metrics(run, accuracy=0.93)
    v2 = publish(run, reg, "har-vit", GATE)["version"]
    rows = list_versions(reg)
    assert [r["version"] for r in rows] == [v1, v2]
    assert [r["latest"] for r in rows] == [False, True]
    assert [r["accuracy"] for r in rows] == [0.9, 0.93]

    cache = tmp_path / "cache"
    p1, p2 = pull(reg, version=v1, cache_dir=cache), pull(reg, cache_dir=cache)
    assert p2.name == v2 and p1.name == v1
    assert json.loads((p1 / "metrics.json").read_text())["accuracy"] == 0.9
    assert (p2 / "model" / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()

    backend = storage_module.S3Storage if reg.startswith("s3://") else storage_module.LocalStorage

    def no_download(self, *args, **kwargs):
        raise AssertionError("downloaded although the verified cache holds this version")

    monkeypatch.setattr(backend, "get_file", no_download)
    assert pull(reg, version=v1, cache_dir=cache) == p1
    assert pull(reg, cache_dir=cache) == p2  # 'latest' reads latest.json only
    monkeypatch.undo()

    (p1 / "model" / "model.safetensors").write_bytes(b"damaged cache")  # size change: cheap check refetches
    assert pull(reg, version=v1, cache_dir=cache) == p1
    assert (p1 / "model" / "model.safetensors").read_bytes() == stored(reg, f"har-vit/{v1}/model/model.safetensors")


def test_manifest_is_written_exclusively(reg: str, tmp_path: Path):
    storage = storage_module.open_storage(reg)
    storage.ensure(create=True)
    storage.put_bytes("m/v/manifest.json", b"first", exclusive=True)
    with pytest.raises(RegistryError, match="refusing to overwrite"):
        storage.put_bytes("m/v/manifest.json", b"second", exclusive=True)
    assert stored(reg, "m/v/manifest.json") == b"first"


def test_pull_refuses_unsafe_names_and_paths(run: Path, tmp_path: Path):
    reg = str(tmp_path / "registry")
    version = publish(run, reg, "har-vit", GATE)["version"]
    with pytest.raises(RegistryError, match="invalid version"):
        pull(reg, version="../../etc", cache_dir=tmp_path / "cache")
    manifest_path = Path(reg) / "har-vit" / version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["path"] = "../../outside.txt"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match="sha256 does not match the one recorded in latest.json"):
        pull(reg, cache_dir=tmp_path / "cache")
    with pytest.raises(RegistryError, match="unsafe path"):
        pull(reg, version=version, cache_dir=tmp_path / "cache")
    assert cached_files(tmp_path / "cache") == []


# --------------------------------------------------------------------------- S3 specifics


def test_multipart_upload_verifies(s3_bucket: str, tmp_path: Path):
    run = make_run(tmp_path / "outputs", model_bytes=6 * 1024 * 1024 + 123)
    url = f"s3://{s3_bucket}/models"
    version = publish(run, url, "har-vit", GATE, multipart_threshold=1024 * 1024)["version"]
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key=f"models/har-vit/{version}/model/model.safetensors")
    assert head["ETag"].strip('"').endswith("-2")  # two parts: 5 MiB + the rest
    path = pull(url, cache_dir=tmp_path / "cache")
    assert (path / "model" / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("region", ["eu-west-1", "us-east-1"])
def test_bucket_created_in_requested_region(run: Path, s3_bucket: str, region: str):
    assert publish(run, f"s3://{s3_bucket}", "har-vit", GATE, region=region)["published"]
    location = boto3.client("s3", region_name=region).get_bucket_location(Bucket=s3_bucket)["LocationConstraint"]
    assert location == (None if region == "us-east-1" else region)
    assert "har-vit/latest.json" in all_keys(f"s3://{s3_bucket}")


def test_existing_bucket_reused(run: Path, s3_bucket: str):
    client = boto3.client("s3")
    client.create_bucket(Bucket=s3_bucket)
    client.put_object(Bucket=s3_bucket, Key="other/keep.txt", Body=b"keep")
    assert publish(run, f"s3://{s3_bucket}/models", "har-vit", GATE)["published"]
    assert client.get_object(Bucket=s3_bucket, Key="other/keep.txt")["Body"].read() == b"keep"


def test_missing_credentials_clear_error_no_upload(run: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as m:
        for key in SECRET_ENV:
            m.delenv(key)
        with pytest.raises(RegistryError, match="no AWS credentials"):
            publish(run, f"s3://{s3_bucket}/models", "har-vit", GATE)
    assert all_keys(f"s3://{s3_bucket}") == []
    assert not (run / "publish.json").exists()


def test_bucket_of_another_account_is_refused(run: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch):
    other = boto3.client("s3")
    other.meta.events.register(
        "before-sign.s3.*", lambda request, **_: request.headers.add_header("x-moto-account-id", "111122223333")
    )
    other.create_bucket(Bucket=s3_bucket)
    monkeypatch.setenv("MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS", "false")  # read by the in-process server per request
    with pytest.raises(RegistryError, match="access denied to bucket"):
        publish(run, f"s3://{s3_bucket}/models", "har-vit", GATE)
    assert other.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


@pytest.mark.parametrize("url", ["s3://Bad_Bucket/x", "s3://key:secret@bucket/x", "gs://bucket/x"])
def test_bad_registry_urls(url: str):
    with pytest.raises(RegistryError):
        storage_module.open_storage(url)


# --------------------------------------------------------------------------- CLI and notebook


def test_cli_list_show_pull(run: Path, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture):
    url = f"s3://{s3_bucket}/models"
    v1 = publish(run, url, "har-vit", GATE)["version"]
    write_metrics(run, accuracy=0.97)
    v2 = publish(run, url, "har-vit", GATE)["version"]
    assert registry_cli.main(["list", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(v1) and "0.9000" in lines[1] and not lines[1].endswith("*")
    assert lines[2].startswith(v2) and "0.9700" in lines[2] and lines[2].endswith("*")
    assert registry_cli.main(["show", url, "--version", v1]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == v1 and shown["metrics_full"]["per_class"]["sitting"]["f1"] == 0.8
    assert registry_cli.main(["pull", url, "--cache-dir", str(tmp_path / "cache")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == v2 and (path / "manifest.json").is_file()
    assert registry_cli.main(["show", url, "--model", "nope"]) == 1
    assert "no published version" in capsys.readouterr().err


@pytest.mark.integration
def test_executed_notebook_holds_no_secrets(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import papermill as pm

    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIANOTEBOOKLEAK42QX",
        "AWS_SECRET_ACCESS_KEY": "nbSecret/leakCheck+9f8e7d6c5b4a",
        "AWS_SESSION_TOKEN": "nbSessionToken/leakCheck+1a2b3c4d",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    url = f"s3://{s3_bucket}/models"
    run = make_run(tmp_path / "outputs", "nbrun", registry_url=url)
    executed = run / "notebooks" / "04_publish.ipynb"
    executed.parent.mkdir()
    pm.execute_notebook(
        str(ROOT / "notebooks" / "04_publish.ipynb"),
        str(executed),
        parameters={"params_file": str(run / "params.yaml"), "overrides": []},
        cwd=str(ROOT / "notebooks"),
        kernel_name="python3",
        progress_bar=False,
    )
    record = json.loads((run / "publish.json").read_text())
    assert record["published"]
    assert json.loads(stored(url, "har-vit/latest.json"))["version"] == record["version"]
    text = executed.read_text()
    assert record["version"] in text and "model/model.safetensors" in text  # the manifest table was displayed
    leaks = [
        (str(p), k) for p in run.rglob("*") if p.is_file() for k, v in secrets.items() if v.encode() in p.read_bytes()
    ]
    leaks += [
        (k, name)
        for k in all_keys(url)
        for name, v in secrets.items()
        if v.encode() in boto3.client("s3").get_object(Bucket=s3_bucket, Key=k)["Body"].read()
    ]
    assert leaks == []
