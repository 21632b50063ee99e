"""Reading the registry: resolve a version, list and show versions, pull a verified copy into the local cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lib.files import byte_bar, sha256_file
from lib.metrics import SUMMARY_METRICS
from lib.registry.publish import _utcnow
from lib.registry.storage import (
    LATEST,
    MANIFEST,
    MARKER,
    RegistryError,
    S3Storage,
    Storage,
    _check_name,
    open_storage,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/har-vit/registry")


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
    progress: bool = False,
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
    bar = byte_bar(sum(int(e["size"]) for e in manifest["files"]), "pull", progress)
    try:
        for e in manifest["files"]:
            dest = tmp.joinpath(*e["path"].split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            storage.get_file(f"{base}/{e['path']}", dest, bar.update)
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
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pulled %s into %s", where, target)
    return target
