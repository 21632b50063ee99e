"""What a batch run found: class counts, a contact sheet of the least confident images, and the merge of shard
outputs into one table."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from lib.batch.images import ImageSource, decode
from lib.batch.manifest import MANIFEST, Manifest, read_manifest, resolve_location
from lib.batch.outputs import (
    PREDICTIONS,
    SETTINGS,
    SHEET,
    SUMMARY,
    empty_predictions,
    part_files,
    read_errors,
    write_atomic,
    write_errors,
)
from lib.registry.storage import RegistryError
from lib.transforms import ImageSpec

log = logging.getLogger(__name__)

SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")
TILE = 160  # thumbnail side in the contact sheet, pixels
CAPTION = 30  # caption height under each thumbnail, pixels


def class_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per predicted class, their share and mean top-1 probability, most frequent first."""
    if table.empty:
        return pd.DataFrame(columns=["images", "share", "mean_probability"])
    grouped = table.groupby("label")["probability"]
    counts = pd.DataFrame({"images": grouped.size(), "mean_probability": grouped.mean()})
    counts.insert(1, "share", counts["images"] / counts["images"].sum())
    return counts.sort_values(["images", "mean_probability"], ascending=[False, False])


def least_confident(table: pd.DataFrame, n: int = 16) -> pd.DataFrame:
    """The n rows with the lowest top-1 probability, least confident first."""
    return table.sort_values(["probability", "path"]).head(n)


def thumbnail(source: ImageSource | None, key: str) -> Image.Image:
    """A TILE x TILE tile of one image (grey with a note when it cannot be read any more, or from here)."""
    tile = Image.new("RGB", (TILE, TILE), (235, 235, 235))
    try:
        if source is None:
            raise FileNotFoundError(key)
        img = decode(source.read(key), ImageSpec(size=TILE))
    except Exception:
        ImageDraw.Draw(tile).text((8, TILE // 2), "unreadable now", fill=(90, 90, 90))
        return tile
    img.thumbnail((TILE, TILE), Image.Resampling.BICUBIC)
    tile.paste(img, ((TILE - img.width) // 2, (TILE - img.height) // 2))
    return tile


def contact_sheet(source: ImageSource | None, rows: pd.DataFrame, cols: int = 4) -> Image.Image:
    """The given rows' images in a grid, each captioned with its top-1 label, probability and path (its end)."""
    n = max(1, len(rows))
    cols = min(cols, n)
    sheet = Image.new("RGB", (cols * TILE, -(-n // cols) * (TILE + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    if rows.empty:
        draw.text((8, 8), "no predictions", fill="black", font=font)
    for i, row in enumerate(rows.itertuples()):
        x, y = (i % cols) * TILE, (i // cols) * (TILE + CAPTION)
        sheet.paste(thumbnail(source, row.path), (x, y))
        name = row.path if len(row.path) <= 26 else "…" + row.path[-25:]
        draw.text((x + 4, y + TILE + 2), f"{row.label} {row.probability:.2f}", fill="black", font=font)
        draw.text((x + 4, y + TILE + 15), name, fill=(90, 90, 90), font=font)
    return sheet


def write_summary(
    dest: Path,
    table: pd.DataFrame,
    errors: list[tuple[str, str]],
    source: ImageSource | None,
    run: dict,
    listed: int,
    note: str | None = None,
) -> dict:
    """summary.json (settings, files listed, classified and failed, counts, speed, and a note when nothing was
    classified) and least_confident.png in dest; return the summary."""
    settings = json.loads((dest / SETTINGS).read_text())
    counts = class_counts(table)
    summary = {
        **settings,
        "images_listed": listed,
        "images_classified": int(len(table)),
        "errors": len(errors),
        "class_counts": {label: int(n) for label, n in counts["images"].items()},
        "run": run,
        **({"note": note} if note else {}),
    }
    sheet = contact_sheet(source, least_confident(table))
    write_atomic(dest / SHEET, lambda tmp: sheet.save(tmp, format="PNG"))
    write_atomic(dest / SUMMARY, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary


def shard_folders(out: Path) -> list[Path]:
    """The shard folders out/shard-i-of-N of one split, in order; refuse a mix of splits or a missing shard."""
    shards = {}
    for folder in out.iterdir() if out.is_dir() else []:
        m = SHARD_RE.match(folder.name)
        if m and folder.is_dir():
            shards[(int(m[1]), int(m[2]))] = folder
    if not shards:
        raise FileNotFoundError(f"no shard folders (shard-i-of-N) in {out}")
    counts = {count for _, count in shards}
    if len(counts) != 1:
        raise ValueError(f"{out} holds shards of different splits (of {sorted(counts)}): merge one split at a time")
    (count,) = counts
    missing = [i for i in range(count) if (i, count) not in shards]
    if missing:
        raise ValueError(f"shards {missing} of {count} are missing in {out}: run them first")
    return [shards[(i, count)] for i in range(count)]


def shards_manifest(out: Path, settings: list[dict], location: str | None) -> Manifest:
    """The manifest the shards classified: at location when given, else where they recorded it (else, for a
    folder copied from elsewhere, OUT/manifest.json); its hash must be the one every shard recorded."""
    hashes = {s.get("manifest_sha256") for s in settings}
    if None in hashes:
        raise ValueError(f"shards of {out} ran without a manifest: rerun them after python -m lib.batch plan")
    if len(hashes) != 1:
        raise ValueError(f"shards of {out} classified different manifests (SHA-256 {sorted(hashes)}): plan once")
    (sha256,) = hashes
    if location:
        candidates = [resolve_location(location)]
    else:
        recorded = settings[0]["manifest"]
        candidates = list(dict.fromkeys([recorded, str(out.resolve() / MANIFEST)]))
    for candidate in candidates:
        found = read_manifest(candidate)
        if found is None:
            continue
        if found.sha256 != sha256:
            raise ValueError(
                f"the manifest at {candidate} is not the one the shards classified (SHA-256 "
                f"{found.sha256}, not {sha256}): was it planned again?"
            )
        return found
    raise FileNotFoundError(f"the shards' manifest is not at {' or '.join(candidates)}: pass merge --manifest")


def shown(paths: list[str], limit: int = 10) -> str:
    """Up to limit paths for an error message, and how many more there are."""
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def check_complete(listed: tuple[str, ...], table: pd.DataFrame, errors: list[tuple[str, str]]) -> None:
    """Every listed file exactly once, classified or in errors.csv, and nothing else; else say which files."""
    seen = Counter(table["path"]) + Counter(path for path, _ in errors)
    expected = set(listed)
    problems = []
    if missing := sorted(expected - seen.keys()):
        problems.append(f"missing from every shard ({len(missing)}): {shown(missing)}")
    if twice := sorted(p for p, n in seen.items() if n > 1):
        problems.append(f"there more than once ({len(twice)}): {shown(twice)}")
    if unlisted := sorted(seen.keys() - expected):
        problems.append(f"not in the manifest ({len(unlisted)}): {shown(unlisted)}")
    if problems:
        raise ValueError("the shards do not cover the manifest exactly once: " + "; ".join(problems))


def merge(out: str | Path, manifest: str | Path | None = None) -> dict:
    """Join the shard folders out/shard-i-of-N into out/predictions.parquet, errors.csv, summary.json and the
    contact sheet; refuse when a shard is missing, unfinished, or ran with another model or manifest, or when the
    shards do not hold every file of the manifest exactly once (the message names the files)."""
    out = Path(out)
    folders = shard_folders(out)
    unfinished = [f.name for f in folders if not (f / SUMMARY).is_file() or part_files(f)]
    if unfinished:
        raise ValueError(f"shards not finished (rerun them to resume): {', '.join(unfinished)}")
    if (out / SETTINGS).is_file() and "merged_shards" not in json.loads((out / SETTINGS).read_text()):
        raise ValueError(f"{out} holds the results of an unsharded run, which a merge would replace: move them away")
    settings = [json.loads((f / SETTINGS).read_text()) for f in folders]
    for key in ("images", "model_version", "variant", "top_k"):
        if len({json.dumps(s[key]) for s in settings}) != 1:
            raise ValueError(f"shards of {out} differ in {key}: {sorted({str(s[key]) for s in settings})}")
    listing = shards_manifest(out, settings, None if manifest is None else str(manifest))
    tables = [t for t in (pd.read_parquet(f / PREDICTIONS) for f in folders) if len(t)]
    table = empty_predictions()
    if tables:
        table = pd.concat(tables, ignore_index=True).sort_values("path", ignore_index=True)
    errors = [e for f in folders for e in read_errors(f)]
    check_complete(listing.files, table, errors)
    write_atomic(out / PREDICTIONS, lambda tmp: table.to_parquet(tmp, index=False))
    write_errors(out, errors)
    merged = {**settings[0], "shard": None, "manifest": listing.location, "merged_shards": len(folders)}
    write_atomic(out / SETTINGS, lambda tmp: tmp.write_text(json.dumps(merged, indent=2)))
    runs = [json.loads((f / SUMMARY).read_text())["run"] for f in folders]
    run = {"shards": len(folders), "seconds_per_shard": [r["seconds"] for r in runs]}
    try:
        source = ImageSource(merged["images"])
    except (FileNotFoundError, RegistryError) as exc:  # merging where the images cannot be read: tiles say so
        log.warning("contact sheet without thumbnails: %s", exc)
        source = None
    note = None
    if not listing.files:
        note = f"no images in {listing.images}"
    elif table.empty:
        note = f"none of the {len(listing.files)} images could be classified: errors.csv says why"
    return write_summary(out, table, errors, source, run, listed=len(listing.files), note=note)
