"""Classify a folder or an s3:// prefix with a published version or a run folder: batched ONNX Runtime, decoding in
a thread pool ahead of inference, results written in parts so that a rerun resumes, bad files listed apart."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from lib.batch.images import ImageSource, Shard
from lib.predict import Predictor, load_predictor, read_serving

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.parquet"
ERRORS = "errors.csv"
SETTINGS = "run.json"
PARTS = "parts"
DEFAULT_REGISTRY = "outputs/registry"
DEFAULT_MODEL_NAME = "har-vit-demo"
# Settings a resumed run must share with the rows already written, or one table would mix two models.
RESUME_KEYS = ("images", "model_version", "variant", "top_k", "shard")


def served_variant(serving: dict) -> str:
    """The served file's variant name (int8, fp32, student ...) from export/serving.json."""
    if serving.get("variant"):
        return str(serving["variant"])
    by_file = {name: variant for variant, name in (serving.get("files") or {}).items()}
    return by_file.get(serving["file"], Path(serving["file"]).name)


def open_model(
    model: str, registry: str = DEFAULT_REGISTRY, model_name: str = DEFAULT_MODEL_NAME, threads: int | None = None
) -> tuple[Predictor, dict]:
    """The torch-free ONNX predictor of a run or version folder, or of a version ('latest' or a name) pulled from
    registry; and what identifies it (model_version, variant, folder)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        root = folder.resolve()
        version = f"run:{root.name}"
    elif "/" in model or os.sep in model:
        raise FileNotFoundError(f"model folder {model} does not exist (a registry version is a bare name or 'latest')")
    else:
        from lib.registry.pull import pull

        local = not registry.startswith("s3://")
        root = pull(str(Path(registry).expanduser().resolve()) if local else registry, model_name, model)
        version = f"{model_name}/{root.name}"
    serving = read_serving(root)
    if serving is None:
        raise FileNotFoundError(f"{root} has no export/serving.json: batch classification serves the exported model")
    predictor = load_predictor(root, backend="onnx", threads=threads)
    return predictor, {"model": str(root), "model_version": version, "variant": served_variant(serving)}


def output_folder(out: str | Path, shard: Shard | None) -> Path:
    """Where one run writes: out itself, or out/shard-i-of-N when sharded (shards may share out)."""
    return Path(out) / shard.folder if shard else Path(out)


def check_settings(dest: Path, settings: dict) -> None:
    """Record the run's settings in dest/run.json; refuse to resume rows written with other ones."""
    path = dest / SETTINGS
    if path.is_file():
        before = json.loads(path.read_text())
        differ = [k for k in RESUME_KEYS if before.get(k) != settings.get(k)]
        written = (dest / PREDICTIONS).exists() or any((dest / PARTS).glob("*.parquet"))
        if differ and written:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in differ)
            raise ValueError(f"{dest} holds results of another run ({shown}): choose another --out or delete it")
    dest.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=2)))


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """write(tmp) then rename over path: a reader (or a resumed run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def read_predictions(dest: Path) -> pd.DataFrame:
    """Every prediction written so far in dest: predictions.parquet and the parts of an unfinished run."""
    files = ([dest / PREDICTIONS] if (dest / PREDICTIONS).is_file() else []) + sorted((dest / PARTS).glob("*.parquet"))
    if not files:
        return pd.DataFrame(columns=["path"])
    table = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return table.drop_duplicates("path", keep="last").sort_values("path", ignore_index=True)


def write_part(dest: Path, rows: list[dict]) -> None:
    """One more part file of predictions (numbered after the existing ones)."""
    parts = dest / PARTS
    parts.mkdir(exist_ok=True)
    n = len(list(parts.glob("*.parquet")))
    write_atomic(parts / f"part-{n:05d}.parquet", lambda tmp: pd.DataFrame(rows).to_parquet(tmp, index=False))


def write_errors(dest: Path, errors: list[tuple[str, str]]) -> None:
    """errors.csv: path, reason (rewritten whole)."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows(sorted(errors))

    write_atomic(dest / ERRORS, write)


def consolidate(dest: Path) -> pd.DataFrame:
    """Join predictions.parquet and the parts into one sorted predictions.parquet, then drop the parts."""
    table = read_predictions(dest)
    write_atomic(dest / PREDICTIONS, lambda tmp: table.to_parquet(tmp, index=False))
    for part in (dest / PARTS).glob("*.parquet"):
        part.unlink()
    if (dest / PARTS).is_dir():
        (dest / PARTS).rmdir()
    return table


def prefetched(
    keys: list[str], load: Callable[[str], Image.Image], batch_size: int, pool: ThreadPoolExecutor, ahead: int = 2
) -> Iterator[list[tuple[str, Future]]]:
    """Batches of (key, future image): the pool decodes up to `ahead` batches beyond the one being classified."""
    pending: deque[list[tuple[str, Future]]] = deque()
    for start in range(0, len(keys), batch_size):
        pending.append([(key, pool.submit(load, key)) for key in keys[start : start + batch_size]])
        if len(pending) > ahead:
            yield pending.popleft()
    yield from pending


def reason(exc: BaseException) -> str:
    """One line saying why a file could not be classified."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, ValueError) and text else f"{type(exc).__name__}: {text}"


def rows_for(keys: list[str], probs: np.ndarray, labels: list[str], top_k: int, info: dict) -> list[dict]:
    """Prediction rows: path, top-1 label and probability, the top-k labels and probabilities, model, variant."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [
        {
            "path": key,
            "label": labels[int(idx[0])],
            "probability": float(p[idx[0]]),
            "top_labels": [labels[int(i)] for i in idx],
            "top_probabilities": [float(p[i]) for i in idx],
            "model_version": info["model_version"],
            "variant": info["variant"],
        }
        for key, p, idx in zip(keys, probs, order)
    ]


def predict_batch(
    predictor: Predictor, batch: list[tuple[str, Future]], errors: list[tuple[str, str]]
) -> tuple[list[str], np.ndarray]:
    """(keys, calibrated probabilities) of a batch's good images; failures go to errors, one image at a time when a
    whole batch fails."""
    keys, images = [], []
    for key, future in batch:
        try:
            images.append(future.result())
            keys.append(key)
        except Exception as exc:
            errors.append((key, reason(exc)))
    try:
        return keys, predictor.predict_proba(images)
    except Exception:  # find the image that broke the batch; the others still get their row
        kept, probs = [], []
        for key, image in zip(keys, images):
            try:
                probs.append(predictor.predict_proba([image])[0])
                kept.append(key)
            except Exception as exc:
                errors.append((key, reason(exc)))
        return kept, np.asarray(probs, np.float32).reshape(len(kept), len(predictor.labels))


def classify(
    model: str,
    images: str | Path,
    out: str | Path,
    *,
    registry: str = DEFAULT_REGISTRY,
    model_name: str = DEFAULT_MODEL_NAME,
    shard: Shard | None = None,
    top_k: int = 5,
    batch_size: int = 32,
    threads: int | None = None,
    workers: int = 2,
    chunk_size: int = 512,
    draft: bool = True,
    progress: bool = True,
) -> dict:
    """Classify every image of `images` (or of one shard of them) not yet in `out`; return the run's summary.

    Writes predictions.parquet, errors.csv, run.json and summary.json (class counts) into out (or out/<shard>);
    chunk_size predictions per part file while it runs, so that an interrupted run keeps what it finished."""
    from tqdm.auto import tqdm

    from lib.batch.summary import write_summary

    if top_k < 1 or batch_size < 1 or workers < 1 or chunk_size < 1:
        raise ValueError("top_k, batch_size, workers and chunk_size must be >= 1")
    source = ImageSource(images)
    predictor, info = open_model(model, registry, model_name, threads)
    predictor.batch_size = batch_size
    top_k = min(top_k, len(predictor.labels))
    dest = output_folder(out, shard)
    check_settings(dest, {"images": source.url, **info, "top_k": top_k, "shard": str(shard) if shard else None})
    keys = shard.select(source.keys()) if shard else source.keys()
    done = set(read_predictions(dest)["path"])
    todo = [k for k in keys if k not in done]
    where = f"{source.url} (shard {shard})" if shard else source.url
    log.info("%d images in %s: %d done before, %d to classify", len(keys), where, len(done), len(todo))
    rows: list[dict] = []
    errors: list[tuple[str, str]] = []
    start = time.perf_counter()
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="har-decode") as pool,
        tqdm(total=len(todo), desc="classify", unit="img", disable=not progress) as bar,
    ):
        for batch in prefetched(todo, source.loader(predictor.spec, draft), batch_size, pool):
            ok, probs = predict_batch(predictor, batch, errors)
            rows += rows_for(ok, probs, predictor.labels, top_k, info)
            bar.update(len(batch))
            if len(rows) >= chunk_size:
                write_part(dest, rows)
                write_errors(dest, errors)
                rows = []
        if rows:
            write_part(dest, rows)
    seconds = time.perf_counter() - start
    write_errors(dest, errors)
    table = consolidate(dest)
    run = {"classified_now": len(todo) - len(errors), "seconds": round(seconds, 3)}
    run["images_per_s"] = round(len(todo) / seconds, 3) if todo and seconds > 0 else None
    return write_summary(dest, table, errors, source, run)
