"""Reading the registry: resolve a version, list and show versions, pull a verified copy into the local cache."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from lib.files import byte_bar, sha256_file
from lib.metrics import SUMMARY_METRICS
from lib.predict import EXPORT_DIR, SERVING_FILE
from lib.registry.publish import _utcnow
from lib.registry.storage import (
    LATEST,
    MANIFEST,
    MARKER,
    NAME_RE,
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
        others = [m for m in model_names(storage) if m != model_name]
        there = f"; models there: {', '.join(others)}" if others else ""
        raise RegistryError(f"no published version of {model_name!r} in {storage.url} (no {LATEST}){there}")
    return _check_name("version", str(latest.get("version"))), latest.get("manifest_sha256")


def model_names(storage: Storage) -> list[str]:
    """The models of a registry: its top-level folders whose names are valid model names, sorted."""
    return [name for name in storage.list_dirs("") if NAME_RE.match(name) and name not in (".", "..")]


def unservable(manifest: dict) -> str | None:
    """Why the torch-free serving install cannot load a version (from its manifest), None when it can."""
    if f"{EXPORT_DIR}/{SERVING_FILE}" in {e["path"] for e in manifest["files"]}:
        return None
    return (
        f"it has no ONNX export (no {EXPORT_DIR}/{SERVING_FILE}: it was published with export.enabled: false, before "
        "publish refused such versions)"
    )


def torch_installed() -> bool:
    """Whether this install can serve a PyTorch-only version (the serving install has no torch)."""
    return importlib.util.find_spec("torch") is not None


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


def _version_rows(storage: Storage, model_name: str) -> list[dict]:
    """Committed versions of one model (those with a manifest), oldest first."""
    keys = storage.list(f"{_check_name('model name', model_name)}/")
    versions = sorted({k.split("/")[1] for k in keys if k.count("/") == 2 and k.endswith(f"/{MANIFEST}")})
    latest = (_latest(storage, model_name) or {}).get("version") if versions else None
    rows = []
    for v in versions:
        manifest = _parse_manifest(storage.get_bytes(f"{model_name}/{v}/{MANIFEST}"), f"{storage.url}/{model_name}/{v}")
        served = manifest.get("served") if isinstance(manifest.get("served"), dict) else {}
        rows.append(
            {
                "model": model_name,
                "version": v,
                "latest": v == latest,
                "created": manifest.get("created"),
                "files": len(manifest["files"]),
                "bytes": sum(int(e["size"]) for e in manifest["files"]),
                **{k: manifest.get("metrics", {}).get(k) for k in SUMMARY_METRICS},
                "served_accuracy": served.get("accuracy"),
                "onnx": unservable(manifest) is None,
            }
        )
    return sorted(rows, key=lambda r: (str(r["created"]), r["version"]))


def list_versions(registry: str, model_name: str | None = None, region: str | None = None) -> list[dict]:
    """Committed versions (those with a manifest) of model_name, or of every model in the registry when it is None,
    by model and oldest first, with key metrics (the PyTorch model's and the served file's accuracy), whether it has
    an ONNX export, and the latest flag."""
    storage = open_storage(registry, region)
    storage.ensure(create=False)
    names = [model_name] if model_name is not None else model_names(storage)
    return [row for name in names for row in _version_rows(storage, name)]


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


def _install(tmp: Path, target: Path, accept: Callable[[Path], bool]) -> None:
    """Move the verified folder tmp to target, unless a concurrent pull installed an acceptable copy meanwhile.

    A lock file per version (flock: released by the kernel if the process dies) makes check-and-replace one step
    between pulls on this machine. A copy that fails `accept` is moved aside before it is deleted, so that files a
    process still holds open stay readable; an acceptable copy is never touched, since another pull may have
    returned it to a caller that is loading it.
    """
    aside = None
    with open(target.with_name(f".{target.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if accept(target):
                log.info("%s was installed by a concurrent pull; keeping it", target)
                return
            if target.exists():
                aside = target.with_name(f".stale-{target.name}-{uuid.uuid4().hex[:8]}")
                os.replace(target, aside)
            os.replace(tmp, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _check_servable(manifest: dict, where: str, require_onnx: bool | None) -> None:
    """Refuse a version this install could not serve (require_onnx None: when PyTorch is not installed)."""
    problem = unservable(manifest)
    if problem is None:
        return
    if require_onnx is None:
        require_onnx = not torch_installed()
    if not require_onnx:
        log.warning("%s %s: only the PyTorch backend can serve it", where, problem)
        return
    raise RegistryError(
        f"{where} cannot be served by an install without PyTorch: {problem}. Publish a version exported with "
        "export.enabled: true, or pin a servable version (--version, dashboard.version, HAR_MODEL_VERSION)"
    )


def pull(
    registry: str,
    model_name: str = "har-vit",
    version: str = "latest",
    cache_dir: Path | None = None,
    region: str | None = None,
    *,
    full_check: bool = False,
    progress: bool = False,
    require_onnx: bool | None = None,
) -> Path:
    """Download a version into the local cache, verified file by file; return its folder (cached when valid).

    require_onnx: refuse a version without an ONNX export (one published with export.enabled: false), naming why;
    None (default): refuse it where PyTorch is not installed, i.e. on the serving install, which could not load it.
    """
    storage = open_storage(registry, region)
    version, expected_manifest = resolve_version(storage, model_name, version)
    target = cache_root(cache_dir) / _cache_slug(storage) / model_name / version
    where = f"{storage.url}/{model_name}/{version}"

    def accept(folder: Path, manifest_sha: str | None = expected_manifest) -> bool:
        """A verified copy of this version (of the manifest expected, when one is)."""
        if not cached_ok(folder, full=full_check):
            return False
        marker = json.loads((folder / MARKER).read_text())
        return manifest_sha is None or marker["manifest_sha256"] == manifest_sha

    if accept(target):
        _check_servable(_parse_manifest((target / MANIFEST).read_bytes(), where), where, require_onnx)
        log.info("serving %s from cache %s", version, target)
        return target

    storage.ensure(create=False)
    base = f"{model_name}/{version}"
    if not storage.exists(f"{base}/{MANIFEST}"):
        raise RegistryError(f"version {version!r} of {model_name!r} not found in {storage.url}")
    manifest_bytes = storage.get_bytes(f"{base}/{MANIFEST}")
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    if expected_manifest and manifest_sha != expected_manifest:
        raise RegistryError(f"{where}/{MANIFEST}: sha256 does not match the one recorded in {LATEST}")
    manifest = _parse_manifest(manifest_bytes, where)
    _check_servable(manifest, where, require_onnx)

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
        _install(tmp, target, lambda folder: accept(folder, manifest_sha))
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pulled %s into %s", where, target)
    return target
