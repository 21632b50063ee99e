"""The files a batch run keeps in its output folder, written so that a killed run, a resumed one or a reader never
meets half a file: predictions in part files created under names that never repeat, joined into one table at the
end; errors.csv; and the atomic write every output goes through."""

from __future__ import annotations

import csv
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

PREDICTIONS = "predictions.parquet"
ERRORS = "errors.csv"
SETTINGS = "run.json"
SUMMARY = "summary.json"
SHEET = "least_confident.png"
PARTS = "parts"
COLUMNS = ("path", "label", "probability", "top_labels", "top_probabilities", "model_version", "variant")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """write(tmp), flush it to disk, then rename it over path: a reader, a resumed run or a power cut never sees
    half a file. The temporary name is unique, so two writers of one path never write into each other's file."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        sync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sync(path: Path) -> None:
    """fsync a file that a library wrote and closed (parquet, PNG): the rename after it must not outrun the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def empty_predictions() -> pd.DataFrame:
    """A predictions table with no rows but every column, so that counts, sorting and merging need no special case."""
    return pd.DataFrame({name: pd.Series(dtype=float if name == "probability" else object) for name in COLUMNS})


def write_part(dest: Path, rows: list[dict]) -> Path:
    """One more part file of predictions, created exclusively under a name that sorts by time and never repeats,
    whatever parts an interrupted run left behind."""
    parts = dest / PARTS
    parts.mkdir(exist_ok=True)
    target = parts / f"part-{time.time_ns():020d}-{uuid.uuid4().hex}.parquet"
    tmp = parts / f".{target.name}.tmp"
    try:
        pd.DataFrame(rows, columns=list(COLUMNS)).to_parquet(tmp, index=False)
        sync(tmp)
        try:
            os.link(tmp, target)  # fails rather than replace a part that exists
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: the random name alone keeps parts apart
            os.rename(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def part_files(dest: Path) -> list[Path]:
    """The part files of an unfinished run, oldest first."""
    return sorted((dest / PARTS).glob("part-*.parquet"))


def read_predictions(dest: Path) -> pd.DataFrame:
    """Every prediction written so far in dest: predictions.parquet and the parts of an unfinished run (a row that
    a consolidation cut short left in both counts once), sorted by path."""
    files = ([dest / PREDICTIONS] if (dest / PREDICTIONS).is_file() else []) + part_files(dest)
    tables = [t for t in (pd.read_parquet(f) for f in files) if len(t)]
    if not tables:
        return empty_predictions()
    table = pd.concat(tables, ignore_index=True)
    return table.drop_duplicates("path", keep="last").sort_values("path", ignore_index=True)


def consolidate(dest: Path) -> pd.DataFrame:
    """Join predictions.parquet and the parts into one sorted predictions.parquet, then drop the parts (a run killed
    in between finds its rows in both and counts them once)."""
    table = read_predictions(dest)
    write_atomic(dest / PREDICTIONS, lambda tmp: table.to_parquet(tmp, index=False))
    for part in part_files(dest):
        part.unlink()
    for leftover in (dest / PARTS).glob(".part-*.tmp"):  # of a part write that a killed run cut short
        leftover.unlink()
    if (dest / PARTS).is_dir() and not any((dest / PARTS).iterdir()):
        (dest / PARTS).rmdir()
    return table


def write_errors(dest: Path, errors: list[tuple[str, str]]) -> None:
    """errors.csv: path, reason (rewritten whole)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows(sorted(errors))

    write_atomic(dest / ERRORS, write)


def read_errors(dest: Path) -> list[tuple[str, str]]:
    """The rows of dest/errors.csv (none when there is no file)."""
    path = dest / ERRORS
    if not path.is_file():
        return []
    return list(pd.read_csv(path, dtype=str, keep_default_na=False).itertuples(index=False, name=None))
