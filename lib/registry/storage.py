"""Where registry versions live: the layout's names, and the local-folder and S3 backends behind one interface."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mimetypes
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lib.files import MIB, sha256_file
from lib.params import resolve_path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

LATEST = "latest.json"

CARD = "README.md"

MARKER = ".verified.json"

MIN_PART_SIZE = 5 * MIB  # S3's smallest allowed multipart part (except the last one)

DEFAULT_MULTIPART_THRESHOLD = 64 * MIB

READ_CHUNK = 1 * MIB

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")

BUCKET_RE = re.compile(r"^(?!\d+\.\d+\.\d+\.\d+$)(?!xn--)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class RegistryError(RuntimeError):
    """A publish or pull could not be done safely; the message says what and where."""


class ConflictError(RegistryError):
    """A conditional write found the object changed (or created) since it was read: re-read and decide again."""


def _token(data: bytes) -> str:
    """The folder backend's stand-in for an ETag: the content's SHA-256."""
    return hashlib.sha256(data).hexdigest()


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

    def put_file(self, key: str, path: Path, progress: Callable[[int], None] | None = None) -> None:
        """Copy a local file to key; progress(bytes) once it is there."""
        self._write(key, lambda tmp: shutil.copyfile(path, tmp))
        if progress:
            progress(Path(path).stat().st_size)

    def put_bytes(self, key: str, data: bytes, exclusive: bool = False) -> None:
        """Write bytes to key; with exclusive, fail if key already exists."""
        self._write(key, lambda tmp: tmp.write_bytes(data), exclusive)

    def get_bytes(self, key: str) -> bytes:
        """Read key fully."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{self.url}/{key} not found") from None

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(bytes, token) of key, (None, None) when absent; put_if takes the token to replace exactly this content."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None, None
        return data, _token(data)

    def put_if(self, key: str, data: bytes, token: str | None) -> None:
        """Write key only if it still holds what read_versioned returned with token (None: only if it is absent);
        ConflictError otherwise.

        A lock file next to key (flock: released by the kernel when a process dies) makes the compare and the rename
        one step for every writer that goes through here; readers need no lock, since the rename is atomic.
        """
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(f".{target.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    current = _token(target.read_bytes())
                except FileNotFoundError:
                    current = None
                if current != token:
                    state = "was created" if token is None else "changed" if current else "was deleted"
                    raise ConflictError(f"{self.url}/{key} {state} since it was read")
                self._write(key, lambda tmp: tmp.write_bytes(data))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def get_file(self, key: str, dest: Path, progress: Callable[[int], None] | None = None) -> None:
        """Copy key to a local file; progress(bytes) once it is there."""
        try:
            shutil.copyfile(self._path(key), dest)
            if progress:
                progress(Path(dest).stat().st_size)
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

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the folders directly under prefix (dot folders skipped)."""
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

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

    def put_file(self, key: str, path: Path, progress: Callable[[int], None] | None = None) -> None:
        """Upload a local file; multipart above the configured threshold (boto3 transfer manager, which calls
        progress with each chunk's byte count)."""
        try:
            self.client.upload_file(
                str(path),
                self.bucket,
                self._key(key),
                ExtraArgs=self._content_type(key),
                Config=self.transfer,
                Callback=progress,
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

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(bytes, ETag) of key, (None, None) when absent; put_if takes the ETag to replace exactly this object."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]
        except Exception as exc:
            if self._status(exc) == 404:
                return None, None
            raise self._error(exc, f"get {key}") from None

    def put_if(self, key: str, data: bytes, token: str | None) -> None:
        """Write key only if its ETag is still token (If-Match), or, with token None, only if it is absent
        (If-None-Match: *); ConflictError otherwise."""
        from botocore.exceptions import ClientError

        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data, **self._content_type(key)}
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            try:
                self.client.put_object(**args, **condition)
            except ClientError as exc:
                status = self._status(exc)
                # 412: the precondition failed; 409: a concurrent conditional write to the same key; 404: If-Match
                # on an object deleted since it was read.
                if status in (409, 412) or (status == 404 and token is not None):
                    raise ConflictError(f"{self.url}/{key} changed since it was read") from None
                if status != 501:
                    raise
                log.warning(
                    "%s does not support conditional writes: %s is written unconditionally "
                    "(a concurrent writer could be overwritten)",
                    self.url,
                    key,
                )
                self.client.put_object(**args)
        except RegistryError:
            raise
        except Exception as exc:
            raise self._error(exc, f"put {key}") from None

    def get_file(self, key: str, dest: Path, progress: Callable[[int], None] | None = None) -> None:
        """Download key to a local file (boto3 transfer manager; progress gets each chunk's byte count)."""
        try:
            self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer, Callback=progress)
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

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the 'folders' (common prefixes up to the next '/') directly under prefix."""
        full = self._key(prefix.rstrip("/") + "/" if prefix else "")
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")
            found = [p["Prefix"][len(full) :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]
        except Exception as exc:
            raise self._error(exc, f"list {prefix or '/'}") from None
        return sorted(name for name in found if name)

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


def _check_name(kind: str, value: str) -> str:
    """Model names and versions become key segments: letters, digits, '.', '_', '-' only."""
    if not NAME_RE.match(value) or value in (".", ".."):
        raise RegistryError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' and '-'")
    return value
