"""Publishing a run folder as a new registry version: gated, atomic and verified (imported by the publish stage).

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

import hashlib
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from lib.files import JSONFileError, byte_bar, read_json, sha256_file, write_json
from lib.params import GateParams
from lib.registry.card import metrics_summary, model_card
from lib.registry.gate import gate_report
from lib.registry.storage import (
    CARD,
    LATEST,
    MANIFEST,
    RegistryError,
    Storage,
    _check_name,
    open_storage,
)

log = logging.getLogger(__name__)

PUBLISH_RECORD = "publish.json"

REQUIRED_FILES = ("metrics.json", "params.yaml")

PUBLISHED_DIRS = ("model", "export")


def _utcnow() -> datetime:
    """Current UTC time (one place, so tests can pin it)."""
    return datetime.now(UTC)


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
    """Gate, upload, verify and only then point latest.json at a new version; record publish.json in run_dir."""
    run_dir = Path(run_dir)
    _check_name("model name", model_name)
    try:
        metrics = read_json(run_dir / "metrics.json")
    except JSONFileError as exc:
        raise RegistryError(str(exc)) from None
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
        write_json(run_dir / PUBLISH_RECORD, result)
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
    with byte_bar(sum(e["size"] for e in entries if e["path"] != CARD), "upload", progress) as bar:
        for rel, path in files:
            storage.put_file(f"{base}/{rel}", path, bar.update)
    storage.put_bytes(f"{base}/{CARD}", card_bytes)
    verify_uploaded(storage, base, entries, progress)
    # The manifest is the commit marker: written only once every file verified, never over an existing one.
    storage.put_bytes(f"{base}/{MANIFEST}", manifest_bytes, exclusive=True)
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    verify_uploaded(storage, base, [{"path": MANIFEST, "size": len(manifest_bytes), "sha256": manifest_sha}])
    latest = {"version": version, "manifest_sha256": manifest_sha, "updated": _utcnow().isoformat(timespec="seconds")}
    storage.put_bytes(f"{model_name}/{LATEST}", json.dumps(latest, indent=2).encode())

    result.update(published=True, version=version, url=f"{storage.url}/{base}", manifest=manifest)
    write_json(run_dir / PUBLISH_RECORD, result)
    log.info("published %s", result["url"])
    return result
