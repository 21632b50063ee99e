"""The fixed list of files a run classifies. `python -m lib.batch plan` lists the images once and writes the manifest
(a local file or an s3:// object), refusing to replace one; every shard reads it and none lists the images itself,
so files that arrive during a run can neither be classified twice nor fall between shards. An unsharded run without
a planned manifest lists the images itself, each time it starts, and keeps that list as its manifest. run.json
records the manifest's SHA-256, and merge checks the shards against the manifest it names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lib.batch.images import ImageSource
from lib.registry.storage import LocalStorage, RegistryError, Storage, open_storage

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """What a manifest holds (images: the folder or prefix its files are relative to; planned: written by plan,
    not by an unsharded run for itself), where it is stored and the SHA-256 of its bytes."""

    location: str
    images: str
    files: tuple[str, ...]
    planned: bool
    sha256: str


def default_location(out: str | Path) -> str:
    """Where plan writes the manifest and the shards look for it unless told otherwise: OUT/manifest.json."""
    return str(Path(out).expanduser().resolve() / MANIFEST)


def resolve_location(location: str | Path) -> str:
    """An s3:// URL as given, a local path made absolute (run.json records it, and merge reads it back)."""
    location = str(location)
    return location if location.startswith("s3://") else str(Path(location).expanduser().resolve())


def storage_of(location: str) -> tuple[Storage, str]:
    """The storage holding a manifest location, and the manifest's key in it."""
    if location.startswith("s3://"):
        parent, _, name = location.rstrip("/").rpartition("/")
        if not name.endswith(".json") or parent == "s3:/":
            raise ValueError(f"a manifest on S3 is an object ending in .json (s3://bucket/path/name.json): {location}")
        return open_storage(parent), name
    path = Path(location)
    return LocalStorage(path.parent), path.name


def manifest_bytes(images: str, files: list[str], planned: bool) -> bytes:
    """The manifest's bytes: the same list always gives the same bytes, hence the same hash."""
    body = {"images": images, "planned": planned, "count": len(files), "files": sorted(files)}
    return (json.dumps(body, indent=1) + "\n").encode()


def parse_manifest(location: str, data: bytes) -> Manifest:
    """A Manifest from stored bytes, with a clear error for anything that is not one."""
    try:
        body = json.loads(data)
        files = tuple(body["files"])
        if not all(isinstance(f, str) for f in files) or body["count"] != len(files):
            raise ValueError("its count and its file list disagree")
        return Manifest(location, str(body["images"]), files, bool(body["planned"]), hashlib.sha256(data).hexdigest())
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{location} is not a batch manifest: {exc}") from None


def manifest_of(location: str, images: str, files: list[str], planned: bool) -> Manifest:
    """The manifest of a file list, as write_manifest would store it at location (same bytes, same hash)."""
    return parse_manifest(location, manifest_bytes(images, files, planned))


def read_manifest(location: str) -> Manifest | None:
    """The manifest stored at location, or None when there is none."""
    storage, key = storage_of(location)
    if not storage.exists(key):
        return None
    return parse_manifest(location, storage.get_bytes(key))


def write_manifest(location: str, images: str, files: list[str], planned: bool) -> Manifest:
    """Store a manifest. A planned one is created exclusively (a second plan, or a plan racing another, fails and
    the first list stands); an unsharded run's own list replaces its previous one."""
    storage, key = storage_of(location)
    data = manifest_bytes(images, files, planned)
    if planned:
        if isinstance(storage, LocalStorage):
            storage.root.mkdir(parents=True, exist_ok=True)
        else:
            storage.ensure(create=False)  # a missing bucket is a typo more often than a wish for a new one
        if storage.exists(key):  # also the only guard on an S3-compatible server without conditional writes
            raise RegistryError(already_planned(location))
        try:
            storage.put_bytes(key, data, exclusive=True)
        except RegistryError:
            if storage.exists(key):  # another plan won the race
                raise RegistryError(already_planned(location)) from None
            raise
    else:
        storage.put_bytes(key, data)
    return manifest_of(location, images, files, planned)


def already_planned(location: str) -> str:
    """Why a second plan is refused, and what to do instead."""
    return (
        f"a manifest already exists at {location}: the shards of that run use its list. To plan anew, delete it "
        "first, and only when no shard of that run is running"
    )


def plan(images: str | Path, out: str | Path, manifest: str | Path | None = None) -> Manifest:
    """List the images once and write the manifest every shard of the run reads (at manifest, else OUT/manifest.json);
    refuse when one exists."""
    source = ImageSource(images)
    location = resolve_location(manifest) if manifest else default_location(out)
    existing = read_manifest(location)
    if existing is not None and not existing.planned:
        raise ValueError(f"{location} is the file list of an unsharded run: plan the shards into another --out")
    return write_manifest(location, source.url, source.keys(), planned=True)
