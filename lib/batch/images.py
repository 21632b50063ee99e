"""Where batch images come from: a folder or an s3:// prefix, listed in sorted order, split into shards, read as
bytes and decoded at the scale the model needs (JPEG draft mode)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from lib.dashboard.uploads import DECODE_FORMATS, SUPPORTED
from lib.registry.storage import open_storage
from lib.transforms import ImageSpec, resize_for_crop, to_rgb

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif"})
# The array index each engine gives its workers (AWS Batch array jobs; Kubernetes Jobs with completionMode Indexed).
SHARD_INDEX_ENV = ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX")
SHARD_COUNT_ENV = "AWS_BATCH_JOB_ARRAY_SIZE"


@dataclass(frozen=True)
class Shard:
    """Part index of count: the files at positions index, index + count, ... of the sorted list."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def folder(self) -> str:
        """The shard's own output folder name: shards of one job can share an output folder."""
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def select(self, keys: list[str]) -> list[str]:
        """This shard's part of keys (sorted first): together the shards cover every key exactly once."""
        return sorted(keys)[self.index :: self.count]


def parse_shard(text: str) -> Shard:
    """'i/N' -> Shard(i, N), with a clear error for anything else."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N (e.g. 0/4), not {text!r}") from None
    return Shard(index, count)


def shard_from(text: str | None, count: int | None, env: dict[str, str] | None = None) -> Shard | None:
    """The shard to classify: --shard i/N if given, else the array index of AWS Batch or a Kubernetes indexed Job
    (the count from AWS_BATCH_JOB_ARRAY_SIZE or --num-shards); None when nothing asks for a shard."""
    env = dict(os.environ if env is None else env)
    if text:
        return parse_shard(text)
    name = next((n for n in SHARD_INDEX_ENV if env.get(n, "").strip()), None)
    if name is None:
        if count is not None:
            raise ValueError(f"--num-shards {count} needs a shard index: --shard i/N, or one of {SHARD_INDEX_ENV}")
        return None
    count = count or (int(env[SHARD_COUNT_ENV]) if env.get(SHARD_COUNT_ENV, "").strip() else None)
    if count is None:
        raise ValueError(f"{name} is set but the number of shards is not: pass --num-shards N")
    return Shard(int(env[name]), count)


class ImageSource:
    """Images under a local folder or an s3://bucket/prefix: keys relative to it, bytes by key."""

    def __init__(self, location: str | Path, region: str | None = None) -> None:
        self.location = str(location)
        if self.location.startswith("s3://"):
            self.storage = open_storage(self.location, region)
            self.url = self.storage.url
        else:
            self.storage = None
            self.root = Path(location).expanduser().resolve()
            if not self.root.is_dir():
                raise FileNotFoundError(f"image folder {self.root} does not exist")
            self.url = str(self.root)

    def keys(self) -> list[str]:
        """Every image key (by file suffix, dot files skipped), sorted; relative to the folder or prefix."""
        if self.storage is not None:
            found = self.storage.list("")
        else:
            found = [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()]
        return sorted(k for k in found if Path(k).suffix.lower() in IMAGE_SUFFIXES and not Path(k).name.startswith("."))

    def read(self, key: str) -> bytes:
        """The bytes of one image."""
        if self.storage is not None:
            return self.storage.get_bytes(key)
        return (self.root / key).read_bytes()

    def loader(self, spec: ImageSpec, draft: bool = True) -> Callable[[str], Image.Image]:
        """A function key -> the image read, decoded and resized for the model (for a thread pool)."""
        return lambda key: resize_for_crop(decode(self.read(key), spec, draft), spec)[0]


def decode(data: bytes, spec: ImageSpec, draft: bool = True) -> Image.Image:
    """Decode image bytes to RGB (first frame, EXIF orientation applied). With draft, a JPEG decodes at 1/2, 1/4
    or 1/8 scale as long as both sides stay at least the size the eval transform resizes to: most of the decoding
    cost of a large photo saved, at the price of pixels that differ slightly from a full decode."""
    if not data:
        raise ValueError("empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except UnidentifiedImageError:
        raise ValueError(f"not an image this reader decodes ({SUPPORTED})") from None
    if draft:
        img.draft(img.mode, (spec.resize_to, spec.resize_to))  # a no-op for formats other than JPEG
    img.load()
    return to_rgb(ImageOps.exif_transpose(img) or img)
