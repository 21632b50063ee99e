"""Model registry: gated, atomic, verified publish and pull of run folders, on S3 or a local folder.

Layout under the registry root (``s3://bucket/prefix`` or a folder):

    <model_name>/latest.json                 {"version", "manifest_sha256", "updated"}
    <model_name>/<version>/manifest.json     every file with size + sha256; written last = commit marker
    <model_name>/<version>/README.md         generated model card
    <model_name>/<version>/model/...  export/...  metrics.json  params.yaml  *.png

Publish verifies by reading every uploaded object back and hashing it: S3 ETags are not SHA-256 for
multipart uploads, S3's own SHA-256 checksums of multipart objects are checksums of part checksums, and
S3-compatible servers differ in checksum support. Pull downloads into a temp folder, checks size + SHA-256 of
every file, writes a marker holding the manifest's SHA-256 and renames the folder into the cache; a later pull
of that version re-checks only the marker, the cached manifest's hash and every file's size (full_check=True
re-hashes everything).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import mimetypes
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from lib.params import GateCondition, GateParams, resolve_path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest.json"
CARD = "README.md"
MARKER = ".verified.json"
PUBLISH_RECORD = "publish.json"
MIB = 1024 * 1024
MIN_PART_SIZE = 5 * MIB  # S3's smallest allowed multipart part (except the last one)
DEFAULT_MULTIPART_THRESHOLD = 64 * MIB
READ_CHUNK = 1 * MIB
DEFAULT_CACHE = Path("~/.cache/har-vit/registry")
REQUIRED_FILES = ("metrics.json", "params.yaml")
PUBLISHED_DIRS = ("model", "export")
SUMMARY_METRICS = ("accuracy", "f1_macro", "f1_weighted")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
BUCKET_RE = re.compile(r"^(?!\d+\.\d+\.\d+\.\d+$)(?!xn--)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class RegistryError(RuntimeError):
    """A publish or pull could not be done safely; the message says what and where."""


# --------------------------------------------------------------------------- gate


def metric_value(metrics: dict, key: str) -> Any:
    """Look up a dotted metric key ('per_class.sitting.f1'); keys that themselves hold dots are matched too."""
    if key in metrics:
        return metrics[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in metrics and isinstance(metrics[head], dict):
            return metric_value(metrics[head], ".".join(parts[i:]))
    raise KeyError(key)


def _gate_failure(cond: GateCondition, metrics: dict) -> tuple[Any, str]:
    """(value, failure message or '') for one condition."""
    bounds = " and ".join(f"{n} {v:g}" for n, v in (("min", cond.min), ("max", cond.max)) if v is not None)
    try:
        value = metric_value(metrics, cond.metric)
    except KeyError:
        return None, f"{cond.metric}: missing from metrics (gate needs {bounds})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value, f"{cond.metric}: not a number (got {value!r}; gate needs {bounds})"
    if value != value:  # NaN passes no comparison
        return value, f"{cond.metric}: is NaN (gate needs {bounds})"
    if cond.min is not None and value < cond.min:
        return value, f"{cond.metric} = {value:.4f} is below min {cond.min:.4f} by {cond.min - value:.4f}"
    if cond.max is not None and value > cond.max:
        return value, f"{cond.metric} = {value:.4f} is above max {cond.max:.4f} by {value - cond.max:.4f}"
    return value, ""


def gate_report(metrics: dict, conditions: list[GateCondition]) -> list[dict]:
    """One row per condition: metric, value, min, max, passed, and the failure message (empty when passed)."""
    rows = []
    for cond in conditions:
        value, failure = _gate_failure(cond, metrics)
        rows.append(
            {
                "metric": cond.metric,
                "value": value,
                "min": cond.min,
                "max": cond.max,
                "passed": not failure,
                "failure": failure,
            }
        )
    return rows


def check_gate(metrics: dict, conditions: list[GateCondition]) -> list[str]:
    """Failed conditions, each naming the metric, the threshold and by how much it was missed."""
    return [row["failure"] for row in gate_report(metrics, conditions) if row["failure"]]


# --------------------------------------------------------------------------- storage


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(READ_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class LocalStorage:
    """Registry in a local (or mounted) folder; every write is a temp file renamed into place."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def ensure(self, create: bool) -> None:
        """Check the folder exists (create it when asked) and is writable for publishing."""
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry {self.root} exists but is not a folder")
        if not self.root.exists():
            if not create:
                raise RegistryError(f"registry folder {self.root} does not exist")
            self.root.mkdir(parents=True, exist_ok=True)
        if create and not os.access(self.root, os.W_OK):
            raise RegistryError(f"registry folder {self.root} is not writable")

    def _write(self, key: str, write: Any, exclusive: bool = False) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            write(tmp)
            if exclusive:
                try:
                    os.link(tmp, target)  # atomic create-if-absent
                except FileExistsError:
                    raise RegistryError(f"{self.url}/{key} already exists; refusing to overwrite") from None
            else:
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, key: str, path: Path) -> None:
        """Copy a local file to key."""
        self._write(key, lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, key: str, data: bytes, exclusive: bool = False) -> None:
        """Write bytes to key; with exclusive, fail if key already exists."""
        self._write(key, lambda tmp: tmp.write_bytes(data), exclusive)

    def get_bytes(self, key: str) -> bytes:
        """Read key fully."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{self.url}/{key} not found") from None

    def get_file(self, key: str, dest: Path) -> None:
        """Copy key to a local file."""
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError:
            raise RegistryError(f"{self.url}/{key} not found") from None

    def list(self, prefix: str) -> list[str]:
        """Every key under prefix (temp files and dot files skipped)."""
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")
        )

    def exists(self, key: str) -> bool:
        """Whether key exists."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """Size of key in bytes."""
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise RegistryError(f"{self.url}/{key} not found") from None

    def digest(self, key: str) -> tuple[int, str]:
        """(size, sha256) of what is stored at key, read back in full."""
        path = self._path(key)
        if not path.is_file():
            raise RegistryError(f"{self.url}/{key} not found")
        return path.stat().st_size, sha256_file(path)


_LOADER: Any = None


def _s3_client(region: str | None) -> Any:
    """S3 client from a fresh session (credentials resolved now through boto3's chain, never cached across calls)."""
    global _LOADER
    import boto3.session
    import botocore.loaders
    import botocore.session

    if _LOADER is None:
        _LOADER = botocore.loaders.create_loader()  # service models are read once per process
    core = botocore.session.Session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core, region_name=region).client("s3")


class S3Storage:
    """Registry in an S3 (or S3-compatible, via AWS_ENDPOINT_URL) bucket; boto3's credential chain only."""

    def __init__(
        self, bucket: str, prefix: str = "", region: str | None = None, multipart_threshold: int | None = None
    ):
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = _s3_client(region)
        threshold = DEFAULT_MULTIPART_THRESHOLD if multipart_threshold is None else int(multipart_threshold)
        self.transfer = TransferConfig(
            multipart_threshold=threshold, multipart_chunksize=max(MIN_PART_SIZE, min(threshold, 16 * MIB))
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, what: str) -> RegistryError:
        """Translate a botocore/boto3 failure into a RegistryError naming the operation and location."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"{self.url} ({what})"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return RegistryError(
                f"no AWS credentials found for {where}: set them through boto3's standard chain "
                "(AWS_PROFILE / ~/.aws, AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, SSO, instance or task role)"
            )
        if isinstance(exc, EndpointConnectionError):
            return RegistryError(f"cannot reach the S3 endpoint for {where}: {exc}")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return RegistryError(f"S3 error on {where}: {err.get('Code', status)} {err.get('Message', '')}".rstrip())
        return RegistryError(f"S3 failure on {where}: {exc}")

    @staticmethod
    def _status(exc: Exception) -> int | None:
        response = getattr(exc, "response", None) or {}
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")

    def ensure(self, create: bool) -> None:
        """Check credentials and bucket before anything else; create the bucket (region-aware) when asked."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            status = self._status(exc)
            if status == 403:
                raise RegistryError(
                    f"access denied to bucket {self.bucket!r}: it belongs to another account, "
                    "or these credentials lack s3:ListBucket on it"
                ) from None
            if status != 404:
                raise self._error(exc, "head bucket") from None
        except BotoCoreError as exc:
            raise self._error(exc, "head bucket") from None
        if not create:
            raise RegistryError(f"bucket {self.bucket!r} does not exist")
        region = self.client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
            log.info("created bucket %s in %s", self.bucket, region or "us-east-1")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "BucketAlreadyOwnedByYou":
                return
            if code == "BucketAlreadyExists":
                raise RegistryError(
                    f"bucket name {self.bucket!r} is taken by another account; choose another"
                ) from None
            raise self._error(exc, "create bucket") from None
        except BotoCoreError as exc:
            raise self._error(exc, "create bucket") from None

    @staticmethod
    def _content_type(key: str) -> dict[str, str]:
        kind = mimetypes.guess_type(key)[0]
        return {"ContentType": kind} if kind else {}

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file; multipart above the configured threshold (boto3 transfer manager)."""
        try:
            self.client.upload_file(
                str(path), self.bucket, self._key(key), ExtraArgs=self._content_type(key), Config=self.transfer
            )
        except Exception as exc:
            raise self._error(exc, f"upload {key}") from None

    def put_bytes(self, key: str, data: bytes, exclusive: bool = False) -> None:
        """Write bytes to key; with exclusive, a conditional put (If-None-Match: *) refuses to overwrite."""
        from botocore.exceptions import ClientError

        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data, **self._content_type(key)}
        try:
            try:
                self.client.put_object(**args, **({"IfNoneMatch": "*"} if exclusive else {}))
            except ClientError as exc:
                if exclusive and self._status(exc) in (409, 412):
                    raise RegistryError(f"{self.url}/{key} already exists; refusing to overwrite") from None
                if (
                    exclusive and self._status(exc) == 501
                ):  # server without conditional writes: existence was pre-checked
                    self.client.put_object(**args)
                else:
                    raise
        except RegistryError:
            raise
        except Exception as exc:
            raise self._error(exc, f"put {key}") from None

    def get_bytes(self, key: str) -> bytes:
        """Read key fully."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:
            if self._status(exc) == 404:
                raise RegistryError(f"{self.url}/{key} not found") from None
            raise self._error(exc, f"get {key}") from None

    def get_file(self, key: str, dest: Path) -> None:
        """Download key to a local file (boto3 transfer manager)."""
        try:
            self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer)
        except Exception as exc:
            if self._status(exc) == 404:
                raise RegistryError(f"{self.url}/{key} not found") from None
            raise self._error(exc, f"download {key}") from None

    def list(self, prefix: str) -> list[str]:
        """Every key under prefix, relative to the registry root."""
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            return sorted(obj["Key"][strip:] for page in pages for obj in page.get("Contents", []))
        except Exception as exc:
            raise self._error(exc, f"list {prefix}") from None

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if self._status(exc) == 404:
                return None
            raise self._error(exc, f"head {key}") from None

    def exists(self, key: str) -> bool:
        """Whether key exists."""
        return self._head(key) is not None

    def size(self, key: str) -> int:
        """Size of key in bytes (HEAD)."""
        head = self._head(key)
        if head is None:
            raise RegistryError(f"{self.url}/{key} not found")
        return int(head["ContentLength"])

    def digest(self, key: str) -> tuple[int, str]:
        """(size, sha256) of what is stored at key, streamed back and hashed."""
        h, n = hashlib.sha256(), 0
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            for chunk in body.iter_chunks(READ_CHUNK):
                h.update(chunk)
                n += len(chunk)
        except Exception as exc:
            if self._status(exc) == 404:
                raise RegistryError(f"{self.url}/{key} not found") from None
            raise self._error(exc, f"read back {key}") from None
        return n, h.hexdigest()


Storage = LocalStorage | S3Storage


def open_storage(registry: str, region: str | None = None, multipart_threshold: int | None = None) -> Storage:
    """Storage for a registry URL: 's3://bucket/prefix' or a folder (relative to the repository root)."""
    registry = str(registry).strip()
    if not registry:
        raise RegistryError("empty registry URL: use s3://bucket/prefix or a folder path")
    if registry.startswith("s3://"):
        parsed = urlparse(registry)
        bucket = parsed.netloc
        if "@" in bucket or ":" in bucket:
            raise RegistryError("the registry URL must not hold credentials or a port; use boto3's credential chain")
        if not BUCKET_RE.match(bucket) or ".." in bucket:
            raise RegistryError(
                f"invalid bucket name {bucket!r}: 3-63 characters of a-z, 0-9, '.', '-', "
                "starting and ending with a letter or digit"
            )
        return S3Storage(bucket, parsed.path, region, multipart_threshold)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", registry):
        raise RegistryError(f"unsupported registry URL {registry!r}: use s3://bucket/prefix or a folder path")
    return LocalStorage(resolve_path(registry))


# --------------------------------------------------------------------------- publish


def _check_name(kind: str, value: str) -> str:
    """Model names and versions become key segments: letters, digits, '.', '_', '-' only."""
    if not NAME_RE.match(value) or value in (".", ".."):
        raise RegistryError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-'")
    return value


def _utcnow() -> datetime:
    """Current UTC time (one place, so tests can pin it)."""
    return datetime.now(UTC)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path} not found") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path} must hold a JSON object")
    return data


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def run_files(run_dir: Path) -> list[tuple[str, Path]]:
    """The files of a run folder that get published, as (relative posix path, local path)."""
    run_dir = Path(run_dir)
    missing = [name for name in REQUIRED_FILES if not (run_dir / name).is_file()]
    model_dir = run_dir / "model"
    if not model_dir.is_dir() or not any(p.is_file() for p in model_dir.rglob("*")):
        missing.append("model/")
    if missing:
        raise RegistryError(f"run folder {run_dir} lacks {', '.join(missing)}; run the earlier stages first")
    files = [run_dir / name for name in REQUIRED_FILES] + sorted(run_dir.glob("*.png"))
    for name in PUBLISHED_DIRS:
        if (run_dir / name).is_dir():
            files += sorted(
                p
                for p in (run_dir / name).rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)
            )
    return [(p.relative_to(run_dir).as_posix(), p) for p in files]


def metrics_summary(metrics: dict) -> dict[str, float | int]:
    """Top-level numeric metrics (no per-class detail)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat_scalars(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(value: Any, fixed: bool) -> str:
    """Table cell: metrics with 4 decimals (fixed), settings in their shortest form."""
    if isinstance(value, float):
        return f"{value:.4f}" if fixed and abs(value) < 1e4 else f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _table(rows: Iterable[tuple[Any, ...]], header: tuple[str, ...], fixed: bool = False) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c, fixed) for c in row) + " |" for row in rows]
    return lines


def model_card(
    model_name: str,
    version: str,
    created: str,
    metrics: dict,
    params: dict,
    data_summary: dict | None,
    files: list[str],
) -> str:
    """Markdown model card: data, recipe, metrics, per-class table, confusion matrix."""
    run, data = params.get("run", {}) or {}, params.get("data", {}) or {}
    model, train = params.get("model", {}) or {}, params.get("train", {}) or {}
    per_class = metrics.get("per_class") or {}
    lines = [
        f"# {model_name} — version {version}",
        "",
        f"Vision Transformer image classifier of {len(per_class) or 'the'} human actions. "
        f"Published {created} from run `{run.get('name', '?')}`. Every file with its size and SHA-256 is "
        f"listed in `{MANIFEST}`.",
        "",
        "## Data",
        "",
    ]
    info = data_summary or (metrics.get("data") if isinstance(metrics.get("data"), dict) else {}) or {}
    source = info.get("source") or data.get("source", "?")
    if source == "hub":
        source = f"hub:{data.get('hub_id')}[{data.get('hub_split')}]"
    elif source == "imagefolder":
        source = f"imagefolder:{Path(str(data.get('path') or '')).name}"
    rows: list[tuple[Any, ...]] = [("source", source)]
    for key in ("loaded", "duplicates_dropped"):
        if key in info:
            rows.append((key.replace("_", " "), info[key]))
    dup = info.get("duplicates") if isinstance(info.get("duplicates"), dict) else {}
    for key in ("exact_groups", "near_duplicate_distance", "near_groups", "near_group_images",
                "exact_mixed_label_groups", "near_mixed_label_groups"):
        if key in dup:  # near-duplicate groups are kept, each whole on one side of the split
            rows.append((key.replace("_", " "), "off" if dup[key] is None else dup[key]))
    sizes = info.get("split_sizes") or {}
    rows += [(f"{name} images", n) for name, n in sizes.items()]
    if not sizes and "n_test" in metrics:
        rows.append(("test images", metrics["n_test"]))
    for key in ("dedup", "max_per_class", "val_fraction", "test_fraction", "seed"):
        if key in data:
            rows.append((f"data.{key}", data[key]))
    lines += _table(rows, ("item", "value"))

    lines += ["", "## Recipe", ""]
    rows = [("model.source", model.get("source", "?"))]
    if model.get("source") in ("hub", "local"):
        rows.append(("model.name_or_path", model.get("name_or_path")))
    else:
        for key, value in (model.get("config") or {}).items():
            rows.append((f"model.config.{key}", value))
    for key in ("freeze_layers",):
        if key in model:
            rows.append((f"model.{key}", model[key]))
    for key in (
        "epochs",
        "batch_size",
        "grad_accum",
        "learning_rate",
        "lr_scheduler",
        "warmup_ratio",
        "weight_decay",
        "label_smoothing",
        "layer_decay",
        "mixup_alpha",
        "cutmix_alpha",
        "precision",
        "num_gpus",
    ):
        if key in train:
            rows.append((f"train.{key}", train[key]))
    if "seed" in run:
        rows.append(("run.seed", run["seed"]))
    trained = metrics.get("train") if isinstance(metrics.get("train"), dict) else {}
    for key, value in _flat_scalars(trained).items():
        if key not in ("best_checkpoint", "resumed_from"):  # local paths, meaningless elsewhere
            rows.append((f"trained: {key}", value))
    lines += _table(rows, ("setting", "value"))

    lines += ["", "## Metrics (test split)", ""]
    served = metrics.get("served") if isinstance(metrics.get("served"), dict) else {}
    if served:
        lines += [
            f"What is served: `{served.get('file')}` ({served.get('backend')}, {served.get('variant')}, one view, "
            f"temperature {_fmt(served.get('temperature'), True)} fitted on its own validation logits): accuracy "
            f"{_fmt(served.get('accuracy'), True)}, expected calibration error {_fmt(served.get('ece'), True)}. "
            "The table below is the trained PyTorch model as evaluated (with flip averaging when `tta_flip` is on).",
            "",
        ]
    lines += _table(metrics_summary(metrics).items(), ("metric", "value"), fixed=True)
    if per_class:
        lines += ["", "## Per class", ""]
        lines += _table(
            (
                (name, *(c.get(k, "") for k in ("precision", "recall", "f1", "support")))
                for name, c in per_class.items()
                if isinstance(c, dict)
            ),
            ("class", "precision", "recall", "f1", "support"),
            fixed=True,
        )
    for section in ("served", "calibration", "export"):
        if isinstance(metrics.get(section), dict) and metrics[section]:
            lines += ["", f"## {section.capitalize()}", ""]
            lines += _table(_flat_scalars(metrics[section]).items(), ("item", "value"), fixed=True)
    exported = [f for f in files if f.startswith("export/")]
    if exported:
        lines += ["", "Exported files: " + ", ".join(f"`{f}`" for f in exported)]
    pngs = [f for f in files if "/" not in f and f.endswith(".png")]
    if "confusion_matrix.png" in pngs:
        lines += ["", "## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)"]
    for png in pngs:
        if png != "confusion_matrix.png":
            lines += ["", f"![{png[:-4].replace('_', ' ')}]({png})"]
    return "\n".join(lines) + "\n"


def _content_hash(entries: list[dict]) -> str:
    """Hash of the (path, size, sha256) list: the content part of a version id."""
    text = "\n".join(f"{e['path']}\t{e['size']}\t{e['sha256']}" for e in sorted(entries, key=lambda e: e["path"]))
    return hashlib.sha256(text.encode()).hexdigest()


def verify_uploaded(storage: Storage, base: str, entries: list[dict]) -> None:
    """Read every object back and compare size and sha256 with the manifest entries."""
    for e in entries:
        size, digest = storage.digest(f"{base}/{e['path']}")
        if size != e["size"]:
            raise RegistryError(f"verification failed for {base}/{e['path']}: size {size} != {e['size']}")
        if digest != e["sha256"]:
            raise RegistryError(f"verification failed for {base}/{e['path']}: sha256 mismatch")


def publish(
    run_dir: Path,
    registry: str,
    model_name: str,
    gate: GateParams,
    region: str | None = None,
    *,
    multipart_threshold: int | None = None,
) -> dict:
    """Gate, upload, verify and only then point latest.json at a new version; record publish.json in run_dir."""
    run_dir = Path(run_dir)
    _check_name("model name", model_name)
    metrics = _read_json(run_dir / "metrics.json")
    report = gate_report(metrics, gate.conditions) if gate.enabled else []
    failures = [row["failure"] for row in report if row["failure"]]
    result: dict[str, Any] = {
        "published": False,
        "model_name": model_name,
        "registry": str(registry),
        "version": None,
        "url": None,
        "gate": {
            "enabled": gate.enabled,
            "conditions": [c.model_dump(exclude_none=True) for c in gate.conditions],
            "report": report,
        },
        "failures": failures,
        "time": _utcnow().isoformat(timespec="seconds"),
    }
    if failures:
        log.warning("gate failed, nothing published: %s", "; ".join(failures))
        _write_json_atomic(run_dir / PUBLISH_RECORD, result)
        return result

    files = run_files(run_dir)
    storage = open_storage(registry, region, multipart_threshold)
    storage.ensure(create=True)
    result["registry"] = storage.url

    entries = [{"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in files]
    created = _utcnow()
    version = f"{created:%Y%m%dT%H%M%SZ}-{_content_hash(entries)[:8]}"
    base = f"{model_name}/{version}"
    if storage.exists(f"{base}/{MANIFEST}"):
        raise RegistryError(f"version {version} already exists in {storage.url}/{model_name}; refusing to overwrite")

    params_tree = yaml.safe_load((run_dir / "params.yaml").read_text())
    params_tree = params_tree if isinstance(params_tree, dict) else {}
    summary_path = run_dir / "data" / "summary.json"
    data_summary = _read_json(summary_path) if summary_path.is_file() else None
    created_iso = created.isoformat(timespec="microseconds")  # orders versions published within one second
    card = model_card(
        model_name,
        version,
        created.isoformat(timespec="seconds"),
        metrics,
        params_tree,
        data_summary,
        [e["path"] for e in entries],
    )
    card_bytes = card.encode()
    entries.append({"path": CARD, "size": len(card_bytes), "sha256": hashlib.sha256(card_bytes).hexdigest()})
    entries.sort(key=lambda e: e["path"])
    manifest = {
        "schema": 1,
        "model_name": model_name,
        "version": version,
        "created": created_iso,
        "run": (params_tree.get("run") or {}).get("name"),
        "metrics": metrics_summary(metrics),
        "gate": result["gate"],
        "files": entries,
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()

    log.info("publishing %d files to %s/%s", len(entries), storage.url, base)
    for rel, path in files:
        storage.put_file(f"{base}/{rel}", path)
    storage.put_bytes(f"{base}/{CARD}", card_bytes)
    verify_uploaded(storage, base, entries)
    # The manifest is the commit marker: written only once every file verified, never over an existing one.
    storage.put_bytes(f"{base}/{MANIFEST}", manifest_bytes, exclusive=True)
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    verify_uploaded(storage, base, [{"path": MANIFEST, "size": len(manifest_bytes), "sha256": manifest_sha}])
    latest = {"version": version, "manifest_sha256": manifest_sha, "updated": _utcnow().isoformat(timespec="seconds")}
    storage.put_bytes(f"{model_name}/{LATEST}", json.dumps(latest, indent=2).encode())

    result.update(published=True, version=version, url=f"{storage.url}/{base}", manifest=manifest)
    _write_json_atomic(run_dir / PUBLISH_RECORD, result)
    log.info("published %s", result["url"])
    return result


# --------------------------------------------------------------------------- read side


def _latest(storage: Storage, model_name: str) -> dict | None:
    if not storage.exists(f"{model_name}/{LATEST}"):
        return None
    try:
        latest = json.loads(storage.get_bytes(f"{model_name}/{LATEST}"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{storage.url}/{model_name}/{LATEST} is not valid JSON: {exc}") from None
    if not isinstance(latest, dict):
        raise RegistryError(f"{storage.url}/{model_name}/{LATEST} must hold a JSON object")
    return latest


def resolve_version(storage: Storage, model_name: str, version: str = "latest") -> tuple[str, str | None]:
    """(version, expected manifest sha256 or None) for 'latest' or an explicit version."""
    _check_name("model name", model_name)
    if version != "latest":
        return _check_name("version", version), None
    latest = _latest(storage, model_name)
    if not latest:
        raise RegistryError(f"no published version of {model_name!r} in {storage.url} (no {LATEST})")
    return _check_name("version", str(latest.get("version"))), latest.get("manifest_sha256")


def _parse_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        for e in files:
            path = e["path"]
            if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/") or "\\" in path:
                raise RegistryError(f"{where}: unsafe path {path!r} in manifest")
            int(e["size"]), str(e["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"{where}: malformed manifest ({exc})") from None
    return manifest


def list_versions(registry: str, model_name: str = "har-vit", region: str | None = None) -> list[dict]:
    """Committed versions (those with a manifest), oldest first, with key metrics and the latest flag."""
    storage = open_storage(registry, region)
    storage.ensure(create=False)
    keys = storage.list(f"{_check_name('model name', model_name)}/")
    versions = sorted({k.split("/")[1] for k in keys if k.count("/") == 2 and k.endswith(f"/{MANIFEST}")})
    latest = (_latest(storage, model_name) or {}).get("version")
    rows = []
    for v in versions:
        manifest = _parse_manifest(storage.get_bytes(f"{model_name}/{v}/{MANIFEST}"), f"{storage.url}/{model_name}/{v}")
        rows.append(
            {
                "version": v,
                "latest": v == latest,
                "created": manifest.get("created"),
                "files": len(manifest["files"]),
                "bytes": sum(int(e["size"]) for e in manifest["files"]),
                **{k: manifest.get("metrics", {}).get(k) for k in SUMMARY_METRICS},
            }
        )
    return sorted(rows, key=lambda r: (str(r["created"]), r["version"]))


def show(registry: str, model_name: str = "har-vit", version: str = "latest", region: str | None = None) -> dict:
    """One version's manifest (files, metrics summary, gate), plus its full metrics.json."""
    storage = open_storage(registry, region)
    storage.ensure(create=False)
    version, _ = resolve_version(storage, model_name, version)
    base = f"{model_name}/{version}"
    manifest = _parse_manifest(storage.get_bytes(f"{base}/{MANIFEST}"), f"{storage.url}/{base}")
    manifest["metrics_full"] = json.loads(storage.get_bytes(f"{base}/metrics.json"))
    manifest["url"] = f"{storage.url}/{base}"
    return manifest


def cache_root(cache_dir: Path | None = None) -> Path:
    """Local cache root: cache_dir, else $HAR_REGISTRY_CACHE, else ~/.cache/har-vit/registry."""
    return Path(cache_dir or os.environ.get("HAR_REGISTRY_CACHE") or DEFAULT_CACHE).expanduser()


def _cache_slug(storage: Storage) -> str:
    """Readable, collision-safe folder name for one registry (endpoint included for S3)."""
    if isinstance(storage, S3Storage):
        ident = f"{storage.client.meta.endpoint_url}|{storage.url}"
        readable = f"s3-{storage.bucket}" + (f"-{storage.prefix.replace('/', '_')}" if storage.prefix else "")
    else:
        ident = str(storage.root.resolve())
        readable = f"local-{storage.root.name or 'root'}"
    return f"{readable}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"


def cached_ok(folder: Path, full: bool = False) -> bool:
    """Cheap re-check of a cached version: marker names the manifest's sha256, every file present with its size."""
    marker, manifest_path = folder / MARKER, folder / MANIFEST
    if not marker.is_file() or not manifest_path.is_file():
        return False
    try:
        expected = json.loads(marker.read_text())["manifest_sha256"]
        manifest_bytes = manifest_path.read_bytes()
        if hashlib.sha256(manifest_bytes).hexdigest() != expected:
            return False
        for e in json.loads(manifest_bytes)["files"]:
            path = folder / e["path"]
            if not path.is_file() or path.stat().st_size != e["size"]:
                return False
            if full and sha256_file(path) != e["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def pull(
    registry: str,
    model_name: str = "har-vit",
    version: str = "latest",
    cache_dir: Path | None = None,
    region: str | None = None,
    *,
    full_check: bool = False,
) -> Path:
    """Download a version into the local cache, verified file by file; return its folder (cached when valid)."""
    storage = open_storage(registry, region)
    version, expected_manifest = resolve_version(storage, model_name, version)
    target = cache_root(cache_dir) / _cache_slug(storage) / model_name / version
    if cached_ok(target, full=full_check):
        marker = json.loads((target / MARKER).read_text())
        if expected_manifest is None or marker["manifest_sha256"] == expected_manifest:
            log.info("serving %s from cache %s", version, target)
            return target

    storage.ensure(create=False)
    base = f"{model_name}/{version}"
    where = f"{storage.url}/{base}"
    if not storage.exists(f"{base}/{MANIFEST}"):
        raise RegistryError(f"version {version!r} of {model_name!r} not found in {storage.url}")
    manifest_bytes = storage.get_bytes(f"{base}/{MANIFEST}")
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    if expected_manifest and manifest_sha != expected_manifest:
        raise RegistryError(f"{where}/{MANIFEST}: sha256 does not match the one recorded in {LATEST}")
    manifest = _parse_manifest(manifest_bytes, where)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{version}-", dir=target.parent))
    try:
        for e in manifest["files"]:
            dest = tmp.joinpath(*e["path"].split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            storage.get_file(f"{base}/{e['path']}", dest)
            size = dest.stat().st_size
            if size != e["size"]:
                raise RegistryError(
                    f"checksum error in {where}/{e['path']}: size {size} bytes, manifest says {e['size']}; refusing it"
                )
            if sha256_file(dest) != e["sha256"]:
                raise RegistryError(
                    f"checksum error in {where}/{e['path']}: sha256 does not match the manifest; refusing it"
                )
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        marker = {"manifest_sha256": manifest_sha, "verified": _utcnow().isoformat(timespec="seconds"), "source": where}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():
            shutil.rmtree(target)  # a stale or damaged copy: it failed cached_ok above
        try:
            os.replace(tmp, target)
        except OSError:
            if not cached_ok(target):  # lost a race to a concurrent pull that did not verify
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pulled %s into %s", where, target)
    return target


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m lib.registry list|show|pull URL [--model NAME] [--version V] [--cache-dir DIR]."""
    parser = argparse.ArgumentParser(prog="python -m lib.registry", description="Browse and pull the model registry.")
    parser.add_argument("command", choices=["list", "show", "pull"])
    parser.add_argument("url", help="s3://bucket/prefix or a local folder")
    parser.add_argument("--model", default="har-vit")
    parser.add_argument("--version", default="latest")
    parser.add_argument("--region", default=None)
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default $HAR_REGISTRY_CACHE or ~/.cache/har-vit/registry"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            rows = list_versions(args.url, args.model, args.region)
            if not rows:
                print(f"no versions of {args.model} in {args.url}")
                return 0
            cols = (*SUMMARY_METRICS, "files", "bytes")
            print(f"{'version':<26}" + "".join(f"{c:>13}" for c in cols) + f"{'created (UTC)':>21}  latest")
            for r in rows:
                cells = "".join(f"{r[c]:>13.4f}" if isinstance(r[c], float) else f"{r[c]!s:>13}" for c in cols)
                created = str(r["created"])[:19]
                print(f"{r['version']:<26}{cells}{created:>21}" + ("  *" if r["latest"] else ""))
        elif args.command == "show":
            print(json.dumps(show(args.url, args.model, args.version, args.region), indent=2))
        else:
            print(pull(args.url, args.model, args.version, args.cache_dir, args.region))
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
