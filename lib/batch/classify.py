"""Classify a folder or an s3:// prefix with a published version or a run folder: batched ONNX Runtime, decoding in
a thread pool ahead of inference, results written in parts so that a rerun resumes, bad files listed apart."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from lib.batch.images import ImageSource, Shard
from lib.batch.manifest import (
    Manifest,
    default_location,
    manifest_of,
    read_manifest,
    resolve_location,
    write_manifest,
)
from lib.batch.outputs import (
    PREDICTIONS,
    SETTINGS,
    consolidate,
    part_files,
    read_predictions,
    write_atomic,
    write_errors,
    write_part,
)
from lib.batch.summary import write_summary
from lib.predict import Predictor, load_predictor, read_serving

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "outputs/registry"
DEFAULT_MODEL_NAME = "har-vit-demo"
# Settings a resumed run must share with the rows already written, or one table would mix two models; a run of a
# planned manifest also keeps to that manifest, or its shard's rows would follow another split of another list.
RESUME_KEYS = ("images", "model_version", "variant", "top_k", "shard")
PLANNED_RESUME_KEYS = (*RESUME_KEYS, "manifest_sha256")


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


def check_settings(dest: Path, settings: dict, keys: tuple[str, ...] = RESUME_KEYS) -> None:
    """Record the run's settings in dest/run.json; refuse to resume rows written with other ones."""
    path = dest / SETTINGS
    if path.is_file():
        before = json.loads(path.read_text())
        differ = [k for k in keys if before.get(k) != settings.get(k)]
        written = (dest / PREDICTIONS).exists() or bool(part_files(dest))
        if differ and written:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in differ)
            raise ValueError(f"{dest} holds results of another run ({shown}): choose another --out or delete it")
    dest.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=2)))


def planned_manifest(
    source: ImageSource, out: str | Path, manifest: str | Path | None, shard: Shard | None
) -> Manifest | None:
    """The planned list this run classifies, or None for an unsharded run without one (it lists the images itself,
    see own_manifest). A shard, or a run given --manifest, never lists the images itself: no plan, no start."""
    location = resolve_location(manifest) if manifest else default_location(out)
    found = read_manifest(location)
    if found is None and (shard or manifest):
        raise FileNotFoundError(
            f"no manifest at {location}: the shards of a run classify one fixed list. Write it once, before any "
            f"shard starts: python -m lib.batch plan --images {source.location} --out {out}"
            + (f" --manifest {manifest}" if manifest else "")
        )
    if found is None or not found.planned:
        if shard:
            raise ValueError(
                f"{location} is the file list of an unsharded run, not a plan: give the shards another --out "
                "(or delete it and run python -m lib.batch plan)"
            )
        return None
    if found.images != source.url:
        raise ValueError(f"the manifest {location} lists the files of {found.images}, not of {source.url}")
    return found


def own_manifest(source: ImageSource, out: str | Path) -> Manifest:
    """An unsharded run without a plan lists the images now, so that a rerun also finds new ones (classify keeps
    the list in OUT/manifest.json once the run goes ahead)."""
    return manifest_of(default_location(out), source.url, source.keys(), planned=False)


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


def nothing_classified(manifest: Manifest, shard: Shard | None, listed: int) -> str:
    """Why a run's table is empty, in words for summary.json and the log."""
    if not manifest.files:
        return f"no images in {manifest.images}"
    if not listed:
        return f"shard {shard} has no images: the manifest lists {len(manifest.files)} for {shard.count} shards"
    return f"none of the {listed} images could be classified: errors.csv says why"


def classify(
    model: str,
    images: str | Path,
    out: str | Path,
    *,
    registry: str = DEFAULT_REGISTRY,
    model_name: str = DEFAULT_MODEL_NAME,
    shard: Shard | None = None,
    manifest: str | Path | None = None,
    top_k: int = 5,
    batch_size: int = 32,
    threads: int | None = None,
    workers: int = 2,
    chunk_size: int = 512,
    draft: bool = True,
    progress: bool = True,
) -> dict:
    """Classify every file of the run's manifest (or of one shard of it) not yet in `out`; return the summary.

    A shard reads the manifest at `manifest` (default OUT/manifest.json) that `plan` wrote; see planned_manifest.
    Writes predictions.parquet, errors.csv, run.json and summary.json (class counts) into out (or out/<shard>);
    chunk_size predictions per part file while it runs, so that an interrupted run keeps what it finished."""
    if top_k < 1 or batch_size < 1 or workers < 1 or chunk_size < 1:
        raise ValueError("top_k, batch_size, workers and chunk_size must be >= 1")
    source = ImageSource(images)
    listing = planned_manifest(source, out, manifest, shard)
    predictor, info = open_model(model, registry, model_name, threads)
    listing = listing or own_manifest(source, out)
    predictor.batch_size = batch_size
    top_k = min(top_k, len(predictor.labels))
    dest = output_folder(out, shard)
    settings = {
        "images": source.url,
        **info,
        "top_k": top_k,
        "shard": str(shard) if shard else None,
        "manifest": listing.location,
        "manifest_sha256": listing.sha256,
    }
    check_settings(dest, settings, PLANNED_RESUME_KEYS if listing.planned else RESUME_KEYS)
    if not listing.planned:  # replaces the list of the previous start only now that this run goes ahead
        write_manifest(listing.location, listing.images, list(listing.files), planned=False)
    keys = shard.select(list(listing.files)) if shard else list(listing.files)
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
    note = nothing_classified(listing, shard, len(keys)) if table.empty else None
    if note:
        log.warning("%s", note)
    return write_summary(dest, table, errors, source, run, listed=len(keys), note=note)
