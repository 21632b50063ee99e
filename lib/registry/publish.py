"""Publishing a run folder as a new registry version: gated, atomic and verified (imported by the publish stage).

Layout under the registry root (``s3://bucket/prefix`` or a folder):

    <model_name>/latest.json                 {"version", "manifest_sha256", "created", "updated"}
    <model_name>/<version>/manifest.json     every file with size + sha256, and what was left out and why;
                                             written last = commit marker
    <model_name>/<version>/README.md         generated model card
    <model_name>/<version>/model/...  export/...  metrics.json  params.yaml  *.png

Only a run the serving install can load is published (servable: an ONNX export whose serving.json names a file that
is there, and metrics.json["served"] describing that file); the gate judges that served file's own metrics (gate.py).
A version holds what serving loads and what its card shows; training logs and by-products stay out (leave_out).

Publish verifies by reading every uploaded object back and hashing it: S3 ETags are not SHA-256 for
multipart uploads, S3's own SHA-256 checksums of multipart objects are checksums of part checksums, and
S3-compatible servers differ in checksum support. latest.json then moves by a conditional write (move_latest), and
never to a version created before the one it names. Pull downloads into a temp folder, checks size + SHA-256 of
every file, writes a marker holding the manifest's SHA-256 and renames the folder into the cache; a later pull
of that version re-checks only the marker, the cached manifest's hash and every file's size (full_check=True
re-hashes everything).
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from lib.distill import STUDENT_DIR
from lib.files import JSONFileError, byte_bar, read_json, sha256_file, write_json
from lib.params import GateParams
from lib.predict import EXPORT_DIR, SERVING_FILE
from lib.registry.card import metrics_summary, model_card
from lib.registry.gate import gate_report, judged, served_metrics
from lib.registry.storage import (
    CARD,
    LATEST,
    MANIFEST,
    ConflictError,
    RegistryError,
    Storage,
    _check_name,
    open_storage,
)

log = logging.getLogger(__name__)

PUBLISH_RECORD = "publish.json"

REQUIRED_FILES = ("metrics.json", "params.yaml")

PUBLISHED_DIRS = ("model", EXPORT_DIR)

# What the torch-free serving install reads from a version's model/ folder (class names, preprocessing).
SERVING_MODEL_FILES = ("config.json", "preprocessing.json")

# Why training leftovers stay out of a version: a version holds what serving loads and what its card shows.
TENSORBOARD_LEFT_OUT = "TensorBoard event files: a training log, read by neither serving nor the card"
CHECKPOINTS_LEFT_OUT = "Trainer checkpoints (weights with optimizer state): training state, not a served model"
# In export/<STUDENT_DIR>/ only the student's ONNX files are served; by first path segment, why the rest is not.
STUDENT_LEFT_OUT = {
    "distill_history.json": "the distillation's step-by-step training log",
    "distill_summary.json": 'the distillation summary, kept in metrics.json["export"]["student"]["distillation"]',
    "params.yaml": "the params handed to the distillation's worker processes; the version's params.yaml has the run's",
    "model": "the student's PyTorch weights, used only to export its ONNX files; serving loads the ONNX file",
}
STUDENT_OTHER_LEFT_OUT = "a by-product of the student's distillation; serving loads only the student's ONNX files"

LATEST_ATTEMPTS = 10


def _utcnow() -> datetime:
    """Current UTC time (one place, so tests can pin it)."""
    return datetime.now(UTC)


def leave_out(rel: str) -> str | None:
    """Why a run file (relative posix path) stays out of a version, None when it is published."""
    parts = rel.split("/")
    if "runs" in parts[:-1] or parts[-1].startswith("events.out.tfevents"):
        return TENSORBOARD_LEFT_OUT
    if "checkpoints" in parts[:-1]:
        return CHECKPOINTS_LEFT_OUT
    student = f"{EXPORT_DIR}/{STUDENT_DIR}/"
    if rel.startswith(student):
        inside = rel[len(student) :]
        if "/" in inside or not inside.endswith(".onnx"):
            return STUDENT_LEFT_OUT.get(inside.split("/")[0], STUDENT_OTHER_LEFT_OUT)
    return None


def run_files(run_dir: Path) -> tuple[list[tuple[str, Path]], list[dict]]:
    """The files of a run folder that get published, as (relative posix path, local path), and those of its
    published folders that are left out, as {"path", "size", "reason"}."""
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
    kept, left_out = [], []
    for path in files:
        rel = path.relative_to(run_dir).as_posix()
        reason = leave_out(rel)
        if reason:
            left_out.append({"path": rel, "size": path.stat().st_size, "reason": reason})
        else:
            kept.append((rel, path))
    return kept, left_out


def serving_problem(run_dir: Path, metrics: dict) -> str | None:
    """Why the serving install (torch-free: ONNX Runtime only) could not load this run folder, None when it can."""
    run_dir = Path(run_dir)
    export_dir = run_dir / EXPORT_DIR
    serving_path = export_dir / SERVING_FILE
    try:
        serving = read_json(serving_path)
    except JSONFileError as exc:
        if not serving_path.exists():
            return (
                f"it has no ONNX export ({EXPORT_DIR}/{SERVING_FILE} is missing), and the serving install (the "
                "torch-free dashboard on EC2, batch classification) loads only ONNX files: set export.enabled: true "
                "and run the export stage (notebooks/03b_export.ipynb) before publishing"
            )
        return f"{exc}: re-run the export stage"
    file = serving.get("file") if isinstance(serving, dict) else None
    if not isinstance(file, str) or not file:
        return f"{EXPORT_DIR}/{SERVING_FILE} names no served file: re-run the export stage"
    if not (export_dir / file).is_file():
        return f"{EXPORT_DIR}/{SERVING_FILE} serves {file}, missing from {EXPORT_DIR}/: re-run the export stage"
    if leave_out(f"{EXPORT_DIR}/{file}"):
        return f"{EXPORT_DIR}/{SERVING_FILE} serves {file}, which is not a servable file: re-run the export stage"
    absent = [f"model/{name}" for name in SERVING_MODEL_FILES if not (run_dir / "model" / name).is_file()]
    if absent:
        return f"it lacks {', '.join(absent)}, which serving reads: re-run the train stage"
    served = served_metrics(metrics)
    if served is None:
        return 'metrics.json has no "served" block (the served file\'s own figures): re-run the export stage'
    if served.get("file") != f"{EXPORT_DIR}/{file}":
        return (
            f'metrics.json["served"] describes {served.get("file")!r} but {EXPORT_DIR}/{SERVING_FILE} serves '
            f"{EXPORT_DIR}/{file}: re-run the export stage"
        )
    return None


def _content_hash(entries: list[dict]) -> str:
    """Hash of the (path, size, sha256) list: the content part of a version id."""
    text = "\n".join(f"{e['path']}\t{e['size']}\t{e['sha256']}" for e in sorted(entries, key=lambda e: e["path"]))
    return hashlib.sha256(text.encode()).hexdigest()


def verify_uploaded(storage: Storage, base: str, entries: list[dict], progress: bool = False) -> None:
    """Read every object back and compare size and sha256 with the manifest entries."""
    with byte_bar(sum(e["size"] for e in entries), "read back", progress) as bar:
        for e in entries:
            verify_entry(storage, base, e)
            bar.update(e["size"])


def verify_entry(storage: Storage, base: str, e: dict) -> None:
    """Compare one stored object's size and sha256 with its manifest entry."""
    size, digest = storage.digest(f"{base}/{e['path']}")
    if size != e["size"]:
        raise RegistryError(f"verification failed for {base}/{e['path']}: size {size} != {e['size']}")
    if digest != e["sha256"]:
        raise RegistryError(f"verification failed for {base}/{e['path']}: sha256 mismatch")


def _parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time (naive ones read as UTC), None when it is not one."""
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def version_created(storage: Storage, model_name: str, latest: dict) -> datetime | None:
    """When the version latest.json names was created: its own "created", else its manifest's (latest.json written
    before it held one), else the time in the version id; None when none of these can be read."""
    created = _parse_time(latest.get("created"))
    if created:
        return created
    version = str(latest.get("version"))
    try:
        manifest = json.loads(storage.get_bytes(f"{model_name}/{_check_name('version', version)}/{MANIFEST}"))
        created = _parse_time(manifest.get("created")) if isinstance(manifest, dict) else None
    except (RegistryError, ValueError):
        created = None
    if created:
        return created
    try:
        return datetime.strptime(version.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def move_latest(storage: Storage, model_name: str, version: str, manifest_sha: str, created: datetime) -> dict:
    """Point <model_name>/latest.json at version unless it names a version created later; return what was done:
    {"moved", "version" (what latest names now), "reason"}.

    The write is conditional (S3: If-Match on the ETag read, If-None-Match when there was none; a folder: a lock and
    a compare): a publish that read latest.json before another one moved it re-reads and decides again, so a slow
    publish of an older run can never point latest back at it.
    """
    key = f"{model_name}/{LATEST}"
    body = {
        "version": version,
        "manifest_sha256": manifest_sha,
        "created": created.isoformat(timespec="microseconds"),
    }
    for _ in range(LATEST_ATTEMPTS):
        data, token = storage.read_versioned(key)
        current = None
        if data is not None:
            try:
                current = json.loads(data)
            except ValueError:
                current = None
            if not isinstance(current, dict) or not current.get("version"):
                log.warning("%s/%s is not a latest record; replacing it", storage.url, key)
                current = None
        if current is not None:
            current_created = version_created(storage, model_name, current)
            if current_created is not None and (current_created, str(current["version"])) >= (created, version):
                reason = (
                    f"{LATEST} names {current['version']}, created {current_created.isoformat()}, later than this "
                    f"version ({created.isoformat()}): left unchanged"
                )
                log.warning("latest not moved: %s", reason)
                return {"moved": False, "version": current["version"], "reason": reason}
        body["updated"] = _utcnow().isoformat(timespec="seconds")
        try:
            storage.put_if(key, json.dumps(body, indent=2).encode(), token)
        except ConflictError as exc:
            log.info("%s; reading it again", exc)
            continue
        previous = f" (was {current['version']})" if current else ""
        return {"moved": True, "version": version, "reason": f"{LATEST} now names {version}{previous}"}
    raise RegistryError(
        f"{storage.url}/{key} changed on each of {LATEST_ATTEMPTS} attempts to move it to {version}; "
        "the version is published, latest was not moved: publish again or check who writes it"
    )


def publish(
    run_dir: Path,
    registry: str,
    model_name: str,
    gate: GateParams,
    region: str | None = None,
    *,
    multipart_threshold: int | None = None,
    progress: bool = True,
) -> dict:
    """Check the run is servable, gate its served model, upload, verify, and only then move latest.json to the new
    version (conditionally: never back to an older one); record publish.json in run_dir."""
    run_dir = Path(run_dir)
    _check_name("model name", model_name)
    try:
        metrics = read_json(run_dir / "metrics.json")
    except JSONFileError as exc:
        raise RegistryError(str(exc)) from None
    files, left_out = run_files(run_dir)
    problem = serving_problem(run_dir, metrics)
    if problem:
        raise RegistryError(f"not publishing {run_dir}: {problem}")
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
            "judged": judged(metrics),
            "conditions": [c.model_dump(exclude_none=True) for c in gate.conditions],
            "report": report,
        },
        "failures": failures,
        "time": _utcnow().isoformat(timespec="seconds"),
    }
    if failures:
        log.warning("gate failed, nothing published: %s", "; ".join(failures))
        write_json(run_dir / PUBLISH_RECORD, result)
        return result

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
    data_summary = read_json(summary_path, default=None)
    created_iso = created.isoformat(timespec="microseconds")  # orders versions published within one second
    card = model_card(
        model_name,
        version,
        created.isoformat(timespec="seconds"),
        metrics,
        params_tree,
        data_summary,
        [e["path"] for e in entries],
        gate=result["gate"],
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
        "served": metrics_summary(served_metrics(metrics) or {}),
        "gate": result["gate"],
        "files": entries,
        "left_out": left_out,
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()

    log.info("publishing %d files to %s/%s (%d left out)", len(entries), storage.url, base, len(left_out))
    with byte_bar(sum(e["size"] for e in entries if e["path"] != CARD), "upload", progress) as bar:
        for rel, path in files:
            storage.put_file(f"{base}/{rel}", path, bar.update)
    storage.put_bytes(f"{base}/{CARD}", card_bytes)
    verify_uploaded(storage, base, entries, progress)
    # The manifest is the commit marker: written only once every file verified, never over an existing one.
    storage.put_bytes(f"{base}/{MANIFEST}", manifest_bytes, exclusive=True)
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    verify_uploaded(storage, base, [{"path": MANIFEST, "size": len(manifest_bytes), "sha256": manifest_sha}])
    latest = move_latest(storage, model_name, version, manifest_sha, created)

    result.update(published=True, version=version, url=f"{storage.url}/{base}", latest=latest, manifest=manifest)
    write_json(run_dir / PUBLISH_RECORD, result)
    log.info("published %s; %s", result["url"], latest["reason"])
    return result
