"""What a batch run found: class counts, a contact sheet of the least confident images, and the merge of shard
outputs into one table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from lib.batch.classify import ERRORS, PARTS, PREDICTIONS, SETTINGS, write_atomic, write_errors
from lib.batch.images import ImageSource, decode
from lib.transforms import ImageSpec

SUMMARY = "summary.json"
SHEET = "least_confident.png"
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


def thumbnail(source: ImageSource, key: str) -> Image.Image:
    """A TILE x TILE tile of one image (grey with a note when it cannot be read any more)."""
    tile = Image.new("RGB", (TILE, TILE), (235, 235, 235))
    try:
        img = decode(source.read(key), ImageSpec(size=TILE))
    except Exception:
        ImageDraw.Draw(tile).text((8, TILE // 2), "unreadable now", fill=(90, 90, 90))
        return tile
    img.thumbnail((TILE, TILE), Image.Resampling.BICUBIC)
    tile.paste(img, ((TILE - img.width) // 2, (TILE - img.height) // 2))
    return tile


def contact_sheet(source: ImageSource, rows: pd.DataFrame, cols: int = 4) -> Image.Image:
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
    dest: Path, table: pd.DataFrame, errors: list[tuple[str, str]], source: ImageSource, run: dict
) -> dict:
    """summary.json (settings, counts, errors, speed) and least_confident.png in dest; return the summary."""
    settings = json.loads((dest / SETTINGS).read_text())
    counts = class_counts(table)
    summary = {
        **settings,
        "images_classified": int(len(table)),
        "errors": len(errors),
        "class_counts": {label: int(n) for label, n in counts["images"].items()},
        "run": run,
    }
    sheet = contact_sheet(source, least_confident(table))
    write_atomic(dest / SHEET, lambda tmp: sheet.save(tmp, format="PNG"))
    write_atomic(dest / SUMMARY, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    return summary


def read_errors(dest: Path) -> list[tuple[str, str]]:
    """The rows of dest/errors.csv (none when there is no file)."""
    path = dest / ERRORS
    if not path.is_file():
        return []
    return list(pd.read_csv(path, dtype=str, keep_default_na=False).itertuples(index=False, name=None))


def merge(out: str | Path) -> dict:
    """Join the shard folders out/shard-i-of-N into out/predictions.parquet, errors.csv, summary.json and the
    contact sheet; refuse when a shard is missing, unfinished, or ran with another model."""
    out = Path(out)
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
    folders = [shards[(i, count)] for i in range(count)]
    unfinished = [f.name for f in folders if not (f / SUMMARY).is_file() or (f / PARTS).exists()]
    if unfinished:
        raise ValueError(f"shards not finished (rerun them to resume): {', '.join(unfinished)}")
    settings = [json.loads((f / SETTINGS).read_text()) for f in folders]
    for key in ("images", "model_version", "variant", "top_k"):
        if len({json.dumps(s[key]) for s in settings}) != 1:
            raise ValueError(f"shards of {out} differ in {key}: {sorted({str(s[key]) for s in settings})}")
    table = pd.concat([pd.read_parquet(f / PREDICTIONS) for f in folders], ignore_index=True)
    table = table.sort_values("path", ignore_index=True)
    errors = [e for f in folders for e in read_errors(f)]
    write_atomic(out / PREDICTIONS, lambda tmp: table.to_parquet(tmp, index=False))
    write_errors(out, errors)
    merged = {**settings[0], "shard": None, "merged_shards": count}
    write_atomic(out / SETTINGS, lambda tmp: tmp.write_text(json.dumps(merged, indent=2)))
    runs = [json.loads((f / SUMMARY).read_text())["run"] for f in folders]
    run = {"shards": count, "seconds_per_shard": [r["seconds"] for r in runs]}
    return write_summary(out, table, errors, ImageSource(merged["images"]), run)
