"""The small files stages and services exchange: JSON objects read and written atomically, SHA-256 of a file."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

MIB = 2**20
_REQUIRED = object()


class JSONFileError(ValueError):
    """A JSON file is missing or unreadable; the message names the file."""


def read_json(path: str | Path, default: Any = _REQUIRED) -> Any:
    """The JSON value stored in path.

    With a default, that default is returned when the file is absent or torn by an interrupted write; without
    one, JSONFileError says which of these it was.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        problem = "not found"
    except (OSError, ValueError) as exc:
        problem = f"is not valid JSON: {exc}"
    else:
        return data
    if default is _REQUIRED:
        raise JSONFileError(f"{path} {problem}")
    return default


def write_json(path: str | Path, data: Any) -> Path:
    """Write data as indented JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path


def byte_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar counting bytes (a widget in a notebook, text in a terminal); .update(n) with each chunk."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=True)


def sha256_file(path: str | Path, chunk: int = MIB) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
