"""Model registry on a real S3 endpoint (moto server) and a local folder: gate, atomicity, verification, cache, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image

import lib.registry.__main__ as registry_cli
import lib.registry.publish as publish_module
import lib.registry.pull as pull_module
import lib.registry.storage as storage_module
from lib.params import ROOT, GateCondition, GateParams, Params, save_params
from lib.pipeline import finish_stage
from lib.registry.card import model_card
from lib.registry.gate import check_gate
from lib.registry.publish import publish
from lib.registry.pull import list_versions, pull
from lib.registry.storage import RegistryError

CLASSES = ["calling", "clapping", "sitting"]
GATE = GateParams(conditions=[GateCondition(metric="accuracy", min=0.5)])
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


SERVED_FILE = "model.int8.onnx"


def write_metrics(
    run: Path,
    accuracy: float = 0.9,
    sitting_f1: float = 0.8,
    served_accuracy: float = 0.8812,
    served_file: str = f"export/{SERVED_FILE}",
) -> None:
    """metrics.json in the evaluate and export stages' format: the PyTorch model's figures at the top, the served
    file's own single-view figures under "served"."""
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
            "file": served_file,
            "temperature": 1.3,
            "accuracy": served_accuracy,
            "f1_weighted": 0.8634,
            "f1_macro": 0.8577,
            "ece": 0.0213,
        },
    }
    (run / "metrics.json").write_text(json.dumps(metrics))


def make_run(root: Path, name: str = "run1", registry_url: str = "outputs/registry", model_bytes: int = 4096) -> Path:
    """A fake run folder as the earlier stages leave it (small files), serving a (fake) int8 ONNX file."""
    run = root / name
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text(json.dumps({"id2label": dict(enumerate(CLASSES))}))
    (run / "model" / "model.safetensors").write_bytes(os.urandom(model_bytes))
    (run / "model" / "preprocessing.json").write_text(json.dumps({"size": 64}))
    (run / "export").mkdir()
    (run / "export" / SERVED_FILE).write_bytes(os.urandom(1536))
    (run / "export" / "serving.json").write_text(json.dumps({"file": SERVED_FILE, "variant": "int8"}))
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
    served = {"accuracy": 0.42, "loss": 1.5, "per_class": {"sitting": {"f1": 0.3}}, "name": "x"}
    metrics = {"accuracy": 0.97, "loss": 0.1, "f1_macro": 0.9, "served": served}  # the PyTorch model's: not judged
    conds = [
        GateCondition(metric="accuracy", min=0.5),
        GateCondition(metric="loss", max=1.0),
        GateCondition(metric="per_class.sitting.f1", min=0.25),
        GateCondition(metric="per_class.sitting.f1", min=0.4, max=0.9),
        GateCondition(metric="f1_macro", min=0.1),
        GateCondition(metric="name", min=0.1),
        GateCondition(metric="served.accuracy", max=0.4),
    ]
    failures = check_gate(metrics, conds)
    assert failures[0] == "accuracy = 0.4200 is below min 0.5000 by 0.0800"
    assert failures[1] == "loss = 1.5000 is above max 1.0000 by 0.5000"
    assert failures[2] == "per_class.sitting.f1 = 0.3000 is below min 0.4000 by 0.1000"
    assert failures[3] == 'f1_macro: missing from metrics.json["served"] (it has accuracy, loss; gate needs min 0.1)'
    assert failures[4].startswith("name: not a number")
    assert failures[5] == "served.accuracy = 0.4200 is above max 0.4000 by 0.0200"  # 'served.' names the same block
    assert len(failures) == 6
    assert check_gate({"served": {"accuracy": 0.5}}, conds[:1]) == []  # the threshold itself passes
    assert check_gate({"accuracy": 0.9}, conds[:1]) == [
        "accuracy: metrics.json has no 'served' block, the served model's own figures "
        "(run the export stage; gate needs min 0.5)"
    ]


@pytest.mark.parametrize(("teacher", "served", "published"), [(0.9, 0.843, False), (0.84, 0.862, True)])
def test_gate_judges_the_served_file_not_the_pytorch_model(
    run: Path, tmp_path: Path, teacher: float, served: float, published: bool
):
    write_metrics(run, accuracy=teacher, served_accuracy=served)
    gate = GateParams(conditions=[GateCondition(metric="accuracy", min=0.85)])
    reg = tmp_path / "registry"
    result = publish(run, str(reg), "har-vit", gate)
    assert result["published"] is published
    judged = {"metrics": 'metrics.json["served"]', "file": f"export/{SERVED_FILE}", "variant": "int8"}
    assert judged.items() <= result["gate"]["judged"].items() and result["gate"]["judged"]["views"] == 1
    (row,) = result["gate"]["report"]
    assert (row["key"], row["value"], row["passed"]) == ("served.accuracy", served, published)
    record = json.loads((run / "publish.json").read_text())
    assert record["gate"]["judged"] == result["gate"]["judged"]
    if not published:
        assert result["failures"] == [f"accuracy = {served:.4f} is below min 0.8500 by {0.85 - served:.4f}"]
        assert not reg.exists()
        return
    manifest = result["manifest"]
    assert manifest["gate"]["judged"]["file"] == f"export/{SERVED_FILE}"
    assert manifest["served"]["accuracy"] == served and manifest["metrics"]["accuracy"] == teacher
    card = (reg / "har-vit" / result["version"] / "README.md").read_text()
    gate_section = card.split("## Publish gate", 1)[1].split("\n## ", 1)[0]
    assert f"`export/{SERVED_FILE}` (onnx, int8, 1 view, test split)" in gate_section
    assert f"| served.accuracy | {served:.4f} | 0.8500 |  | passed |" in gate_section
    assert f"{teacher:.4f}" not in gate_section  # the PyTorch model's accuracy is not what was gated


def test_gate_condition_on_a_figure_the_served_block_lacks_fails_naming_it(run: Path, tmp_path: Path):
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["served"]["f1_weighted"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    gate = GateParams(conditions=[GateCondition(metric="f1_weighted", min=0.5)])
    result = publish(run, str(tmp_path / "registry"), "har-vit", gate)
    assert not result["published"]
    assert result["failures"][0].startswith('f1_weighted: missing from metrics.json["served"] (it has accuracy, ')
    assert not (tmp_path / "registry").exists()


def test_disabled_gate_publishes_a_failing_run(run: Path, tmp_path: Path):
    write_metrics(run, accuracy=0.1, served_accuracy=0.1)
    reg = tmp_path / "reg"
    result = publish(run, str(reg), "har-vit", GateParams(enabled=False))
    assert result["published"] and result["failures"] == []
    card = (reg / "har-vit" / result["version"] / "README.md").read_text()
    assert "The publish gate was off (`publish.gate.enabled: false`)" in card


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
        f"export/{SERVED_FILE}",
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
    assert manifest["left_out"] == []  # nothing of this run folder's model/ and export/ is a leftover
    record = json.loads((run / "publish.json").read_text())
    assert record["published"] and record["version"] == version and record["url"].endswith(f"har-vit/{version}")
    assert record["latest"] == {"moved": True, "version": version, "reason": f"latest.json now names {version}"}
    assert latest["created"] == manifest["created"]


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
    assert set(results) == {("accuracy", None), ("f1", None), ("accuracy", "served"), ("f1", "served")}
    assert results["accuracy", None].metric_value == metrics["accuracy"]
    assert results["f1", None].metric_value == metrics["f1_weighted"]
    assert results["f1", None].metric_args == {"average": "weighted"}
    assert results["accuracy", "served"].metric_value == metrics["served"]["accuracy"]
    assert results["f1", "served"].metric_value == metrics["served"]["f1_weighted"]
    assert results["f1", "served"].metric_args == {"average": "weighted"}
    for r in data.eval_results:  # the test part of the labelled train split, not HAR's unlabelled test split
        assert (r.task_type, r.dataset_type, r.dataset_split) == (
            "image-classification",
            "Bingsu/Human_Action_Recognition",
            "train",
        )
        assert r.dataset_args == {"test_fraction": 0.2, "seed": 42}
    assert card.text.lstrip().startswith("# har-vit — version ")  # the Markdown body follows the front matter
    assert "| sitting |" in card.text and "![confusion matrix](confusion_matrix.png)" in card.text


def test_card_front_matter_of_a_config_built_model_on_generated_data(run: Path):
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["served"]  # not exported (publish refuses such a run; the card alone still reads)
    params_tree = yaml.safe_load((run / "params.yaml").read_text())
    data = ModelCard(model_card("har-vit", "v1", "2030-01-01T00:00:00+00:00", metrics, params_tree, None, [])).data
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
    write_metrics(run, served_accuracy=0.4)
    gate = GateParams(
        conditions=[GateCondition(metric="accuracy", min=0.5), GateCondition(metric="f1_weighted", min=0.9)]
    )
    result = publish(run, reg, "har-vit", gate)
    assert not result["published"] and result["version"] is None
    assert result["failures"] == [
        "accuracy = 0.4000 is below min 0.5000 by 0.1000",
        "f1_weighted = 0.8634 is below min 0.9000 by 0.0366",
    ]
    assert all_keys(reg) == []
    assert json.loads((run / "publish.json").read_text())["failures"] == result["failures"]


def test_run_folder_without_model_is_refused_before_upload(run: Path, reg: str):
    for f in (run / "model").iterdir():
        f.unlink()
    with pytest.raises(RegistryError, match="model/"):
        publish(run, reg, "har-vit", GATE)
    assert all_keys(reg) == []


def break_export(run: Path, problem: str) -> None:
    """Make a run folder one the torch-free serving install could not load, in one of several ways."""
    if problem == "not exported":  # export.enabled: false
        shutil.rmtree(run / "export")
        metrics = json.loads((run / "metrics.json").read_text())
        del metrics["served"]
        (run / "metrics.json").write_text(json.dumps(metrics))
    elif problem == "served file missing":
        (run / "export" / SERVED_FILE).unlink()
    elif problem == "metrics describe another file":
        write_metrics(run, served_file="export/model.onnx")


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("not exported", r"has no ONNX export .*set export\.enabled: true and run the export stage"),
        ("served file missing", rf"serving\.json serves {SERVED_FILE}, missing from export/: re-run the export stage"),
        ("metrics describe another file", r"metrics\.json\[\"served\"\] describes 'export/model\.onnx' but"),
    ],
)
def test_a_run_the_serving_install_cannot_load_is_refused_before_any_upload(
    run: Path, reg: str, problem: str, message: str
):
    break_export(run, problem)
    with pytest.raises(RegistryError, match=message):
        publish(run, reg, "har-vit", GateParams(enabled=False))
    assert all_keys(reg) == []  # not even the bucket or folder was created
    assert not (run / "publish.json").exists()


STUDENT_LEFTOVERS = {
    "export/student/runs/events.out.tfevents.1733.host.0": "TensorBoard",
    "export/student/distill_history.json": "training log",
    "export/student/distill_summary.json": "metrics.json",
    "export/student/params.yaml": "worker processes",
    "export/student/model/model.safetensors": "PyTorch weights",
    "export/student/model/config.json": "PyTorch weights",
    "export/student/checkpoints/checkpoint-9/optimizer.pt": "checkpoints",
    "export/student/trainer_state.json": "by-product",
    "model/runs/events.out.tfevents.1733.host.1": "TensorBoard",
}


def test_training_leftovers_stay_out_and_the_manifest_says_why(run: Path, reg: str, tmp_path: Path):
    student_files = ("export/student/model.onnx", "export/student/model.int8.onnx")
    for rel in (*STUDENT_LEFTOVERS, *student_files):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(os.urandom(300 + len(rel)))
    result = publish(run, reg, "har-vit", GATE)
    version, manifest = result["version"], result["manifest"]
    published = {e["path"] for e in manifest["files"]}
    assert set(student_files) <= published  # what a student variant serves from
    assert published.isdisjoint(STUDENT_LEFTOVERS)
    left_out = {e["path"]: e for e in manifest["left_out"]}
    assert set(left_out) == set(STUDENT_LEFTOVERS)
    for rel, why in STUDENT_LEFTOVERS.items():
        assert why in left_out[rel]["reason"], (rel, left_out[rel]["reason"])
        assert left_out[rel]["size"] == (run / rel).stat().st_size
    assert json.loads(stored(reg, f"har-vit/{version}/manifest.json"))["left_out"] == manifest["left_out"]
    stored_keys = {k.split(f"har-vit/{version}/", 1)[1] for k in all_keys(reg) if f"har-vit/{version}/" in k}
    assert stored_keys == published | {"manifest.json"}
    pulled = pull(reg, cache_dir=tmp_path / "cache")
    assert {p.relative_to(pulled).as_posix() for p in pulled.rglob("*") if p.is_file()} == published | {
        "manifest.json",
        ".verified.json",
    }


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


def test_conditional_write_replaces_only_what_was_read(reg: str):
    storage = storage_module.open_storage(reg)
    storage.ensure(create=True)
    assert storage.read_versioned("m/latest.json") == (None, None)
    storage.put_if("m/latest.json", b"one", None)  # create-only
    with pytest.raises(storage_module.ConflictError):
        storage.put_if("m/latest.json", b"created twice", None)
    data, token = storage.read_versioned("m/latest.json")
    assert data == b"one"
    storage.put_if("m/latest.json", b"two", token)
    with pytest.raises(storage_module.ConflictError):  # token of "one": stale now
        storage.put_if("m/latest.json", b"three", token)
    assert stored(reg, "m/latest.json") == b"two"
    assert storage.list("m/") == ["m/latest.json"]  # the folder backend's lock file is not a registry object


def ticking_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """publish's clock moves one second per reading, so whichever publish reads it first is created first."""
    times = iter(datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=i) for i in range(10_000))
    monkeypatch.setattr(publish_module, "_utcnow", lambda: next(times))


def second_run(tmp_path: Path) -> Path:
    """Another run folder (other weights, better figures): the newer run of the interleaving tests."""
    newer = make_run(tmp_path / "outputs", "run2")
    write_metrics(newer, accuracy=0.95, served_accuracy=0.94)
    return newer


def test_older_publish_finishing_last_leaves_latest_on_the_newer(
    run: Path, reg: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """The older run's publish starts first and is slow: the newer one starts and finishes while the older one is
    still uploading, then the older one commits its version and reaches latest.json last."""
    ticking_clock(monkeypatch)
    newer_run = second_run(tmp_path)
    backend = storage_module.S3Storage if reg.startswith("s3://") else storage_module.LocalStorage
    real_put_bytes = backend.put_bytes
    newer: dict = {}

    def put_bytes(self, key, data, exclusive=False):
        if key.endswith("/manifest.json") and not newer:  # the older publish, about to commit
            newer["started"] = True
            newer.update(publish(newer_run, reg, "har-vit", GATE))
        real_put_bytes(self, key, data, exclusive)

    monkeypatch.setattr(backend, "put_bytes", put_bytes)
    older = publish(run, reg, "har-vit", GATE)
    assert older["published"] and newer["published"]
    assert older["manifest"]["created"] < newer["manifest"]["created"]
    assert json.loads(stored(reg, "har-vit/latest.json"))["version"] == newer["version"]
    assert older["latest"]["moved"] is False and older["latest"]["version"] == newer["version"]
    assert f"names {newer['version']}" in older["latest"]["reason"]
    assert json.loads((run / "publish.json").read_text())["latest"] == older["latest"]
    rows = list_versions(reg)  # the older version is committed and listed; only latest stays on the newer
    assert [(r["version"], r["latest"]) for r in rows] == [(older["version"], False), (newer["version"], True)]
    assert pull(reg, cache_dir=tmp_path / "cache").name == newer["version"]


def test_latest_written_between_read_and_write_is_not_overwritten(
    run: Path, reg: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """The older publish reads latest.json (nothing newer there yet); the newer publish moves it; the older one's
    write must then fail its condition, re-read, and leave latest on the newer version."""
    ticking_clock(monkeypatch)
    first = publish(run, reg, "har-vit", GATE)["version"]
    write_metrics(run, accuracy=0.91, served_accuracy=0.9)
    newer_run = second_run(tmp_path)
    backend = storage_module.S3Storage if reg.startswith("s3://") else storage_module.LocalStorage
    real_read = backend.read_versioned
    reads: list[str] = []
    newer: dict = {}

    def read_versioned(self, key):
        found = real_read(self, key)
        reads.append(key)
        if key.endswith("latest.json") and not newer:
            newer["started"] = True
            newer.update(publish(newer_run, reg, "har-vit", GATE))  # lands after this read
        return found

    monkeypatch.setattr(backend, "read_versioned", read_versioned)
    older = publish(run, reg, "har-vit", GATE)
    assert first != older["version"] != newer["version"]
    assert older["manifest"]["created"] < newer["manifest"]["created"]
    assert json.loads(stored(reg, "har-vit/latest.json"))["version"] == newer["version"]
    assert older["latest"]["moved"] is False
    assert reads.count("har-vit/latest.json") == 3  # older: read, (newer: read), older: read again after conflict


def test_latest_in_the_old_format_is_compared_through_its_manifest(
    run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """latest.json written before it held "created": the date comes from the version's manifest."""
    reg = tmp_path / "registry"
    ticking_clock(monkeypatch)
    older_created = publish_module._utcnow()  # this run's publish is created before the newer one
    newer = publish(second_run(tmp_path), str(reg), "har-vit", GATE)
    latest_path = reg / "har-vit" / "latest.json"
    old_format = {k: v for k, v in json.loads(latest_path.read_text()).items() if k != "created"}
    latest_path.write_text(json.dumps(old_format))
    monkeypatch.setattr(publish_module, "_utcnow", lambda: older_created)
    older = publish(run, str(reg), "har-vit", GATE)
    assert older["latest"]["moved"] is False
    assert json.loads(latest_path.read_text()) == old_format  # untouched
    assert newer["version"] in older["latest"]["reason"]


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


def leftovers(folder: Path) -> list[str]:
    """Temporary folders a pull left in a model's cache folder (downloads, copies set aside)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("."))


def test_a_concurrent_pull_keeps_the_copy_another_pull_returned(
    run: Path, reg: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Two pulls of one version both miss the cache; the first to finish returns its folder to a caller that is
    loading it. The second must not delete or replace that folder."""
    publish(run, reg, "har-vit", GATE)
    cache = tmp_path / "cache"
    backend = storage_module.S3Storage if reg.startswith("s3://") else storage_module.LocalStorage
    real_get = backend.get_file
    first: dict = {}

    def get_file(self, key, dest, progress=None):
        if not first:  # the second pull has missed the cache and is downloading: the first one runs to the end
            first["started"] = True
            path = pull(reg, cache_dir=cache)
            first.update(path=path, inode=(path / "model" / "model.safetensors").stat().st_ino)
            first["open"] = open(path / "metrics.json", "rb")  # held by its caller across the other pull
        real_get(self, key, dest, progress)

    monkeypatch.setattr(backend, "get_file", get_file)
    second = pull(reg, cache_dir=cache)
    with first["open"] as held:
        assert held.read() == (run / "metrics.json").read_bytes()
    assert second == first["path"]
    assert (second / "model" / "model.safetensors").stat().st_ino == first["inode"]  # the same files, untouched
    assert pull_module.cached_ok(second, full=True)
    assert leftovers(second.parent) == []


def test_a_damaged_cached_copy_is_replaced_whole(run: Path, tmp_path: Path):
    reg = str(tmp_path / "registry")
    publish(run, reg, "har-vit", GATE)
    cache = tmp_path / "cache"
    path = pull(reg, cache_dir=cache)
    (path / "model" / "model.safetensors").write_bytes(b"truncated")
    assert pull(reg, cache_dir=cache) == path
    assert (path / "model" / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    assert leftovers(path.parent) == []  # the damaged copy, set aside, is gone too


def publish_torch_only(run: Path, reg: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A version without an ONNX export, as publish made them before it refused such runs; its version id."""
    break_export(run, "not exported")
    with monkeypatch.context() as m:
        m.setattr(publish_module, "serving_problem", lambda *_: None)
        return publish(run, reg, "har-vit", GateParams(enabled=False))["version"]


def test_pulling_a_version_the_install_cannot_serve_says_why(
    run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    reg = str(tmp_path / "registry")
    version = publish_torch_only(run, reg, monkeypatch)
    cache = tmp_path / "cache"
    monkeypatch.setattr(pull_module, "torch_installed", lambda: False)  # the serving install
    with pytest.raises(RegistryError, match=r"cannot be served by an install without PyTorch: it has no ONNX export"):
        pull(reg, cache_dir=cache)
    assert cached_files(cache) == []
    with pytest.raises(RegistryError, match=r"export\.enabled: true, or pin a servable version"):
        pull(reg, version=version, cache_dir=cache)
    monkeypatch.setattr(pull_module, "torch_installed", lambda: True)  # a research install serves it with PyTorch
    with caplog.at_level("WARNING", logger="lib.registry.pull"):
        path = pull(reg, cache_dir=cache)
    assert path.name == version and "only the PyTorch backend can serve it" in caplog.text
    with pytest.raises(RegistryError, match="has no ONNX export"):  # cached now, still refused where it must be
        pull(reg, cache_dir=cache, require_onnx=True)
    rows = list_versions(reg)
    assert [(r["version"], r["onnx"]) for r in rows] == [(version, False)]


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
    assert registry_cli.main(["list", url, "--model", "har-vit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["har-vit", v1] and "0.9000" in lines[1] and not lines[1].endswith("*")
    assert lines[2].split()[:2] == ["har-vit", v2] and "0.9700" in lines[2] and lines[2].endswith("*")
    assert "0.8812" in lines[1] and lines[1].split()[-2:] != ["*"]  # the served file's accuracy, and ONNX: yes
    assert registry_cli.main(["show", url, "--version", v1]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == v1 and shown["metrics_full"]["per_class"]["sitting"]["f1"] == 0.8
    assert registry_cli.main(["pull", url, "--cache-dir", str(tmp_path / "cache")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == v2 and (path / "manifest.json").is_file()
    assert registry_cli.main(["show", url, "--model", "nope"]) == 1
    assert "no published version" in capsys.readouterr().err


def test_cli_list_without_a_model_lists_every_model(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    url = str(tmp_path / "registry")
    demo = publish(run, url, "har-vit-demo", GATE)["version"]
    write_metrics(run, accuracy=0.93, served_accuracy=0.9234)
    other = publish(run, url, "other-model", GATE)["version"]
    assert registry_cli.main(["list", url]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["har-vit-demo", demo], ["other-model", other]]
    assert all(row[-1] == "*" for row in rows)  # each model's latest
    assert "0.9234" in rows[1]
    assert [(r["model"], r["version"]) for r in list_versions(url)] == [("har-vit-demo", demo), ("other-model", other)]
    assert registry_cli.main(["list", url, "--model", "har-vit"]) == 0
    there = "(models there: har-vit-demo, other-model)"
    assert capsys.readouterr().out.strip() == f"no versions of har-vit in {url} {there}"
    assert registry_cli.main(["pull", url, "--cache-dir", str(tmp_path / "cache")]) == 1  # pull's default: har-vit
    assert "models there: har-vit-demo, other-model" in capsys.readouterr().err
    assert registry_cli.main(["list", str(tmp_path / "empty")]) == 1  # no such registry folder
    (tmp_path / "empty").mkdir()
    assert registry_cli.main(["list", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.strip() == f"no versions in {tmp_path / 'empty'}"


def test_cli_lists_every_model_of_an_s3_registry(run: Path, s3_bucket: str, capsys: pytest.CaptureFixture):
    url = f"s3://{s3_bucket}/models"
    versions = [publish(run, url, name, GATE)["version"] for name in ("b-model", "a-model")]
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="elsewhere/not-a-model/x.txt", Body=b"outside the registry's prefix")
    client.put_object(Bucket=s3_bucket, Key="models/stray.txt", Body=b"a file, not a model folder")
    assert registry_cli.main(["list", url]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["a-model", versions[1]], ["b-model", versions[0]]]


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
