"""CLI: python -m lib.batch --images DIR|s3://bucket/prefix --out DIR [--model latest|VERSION|RUN_FOLDER] ...;
for a sharded run, python -m lib.batch plan --images ... --out DIR first (the manifest every shard reads), and
python -m lib.batch merge DIR last (joins the shard folders and checks them against the manifest)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lib.batch.classify import DEFAULT_MODEL_NAME, DEFAULT_REGISTRY, classify
from lib.batch.images import SHARD_COUNT_ENV, SHARD_INDEX_ENV, shard_from
from lib.batch.manifest import MANIFEST, plan
from lib.batch.summary import merge
from lib.registry.storage import RegistryError

MANIFEST_HELP = f"the run's file list, a path or s3://bucket/path.json (default: OUT/{MANIFEST})"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options of the classify command."""
    ap = argparse.ArgumentParser(
        prog="python -m lib.batch",
        description="Classify every image of a folder or s3:// prefix; writes predictions.parquet, errors.csv, "
        "summary.json and least_confident.png into --out. A rerun skips the images already classified there. "
        "Sharded runs: `python -m lib.batch plan --images SRC --out OUT` once before the shards start, then each "
        "shard with --shard i/N, then `python -m lib.batch merge OUT`.",
    )
    ap.add_argument("--images", required=True, help="folder (searched recursively) or s3://bucket/prefix")
    ap.add_argument("--out", required=True, help="output folder (a shard writes into OUT/shard-i-of-N)")
    ap.add_argument(
        "--model",
        default="latest",
        help="a run or version folder (with export/), or a version of --model-name in --registry (default: latest)",
    )
    ap.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"folder or s3://bucket/prefix ({DEFAULT_REGISTRY})")
    ap.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help=f"name in the registry ({DEFAULT_MODEL_NAME})")
    ap.add_argument(
        "--shard",
        help=f"i/N: classify part i of N of the planned file list; default: {' or '.join(SHARD_INDEX_ENV)} when set",
    )
    ap.add_argument(
        "--num-shards", type=int, help=f"N when the index comes from the environment (default: {SHARD_COUNT_ENV})"
    )
    ap.add_argument(
        "--manifest",
        help=MANIFEST_HELP + "; a shard refuses to start without it, an unsharded run without a plan lists the images "
        "itself on each start",
    )
    ap.add_argument("--top-k", type=int, default=5, help="labels kept per image (5)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per ONNX Runtime call (32)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads, working ahead of inference (2)")
    ap.add_argument("--chunk-size", type=int, default=512, help="predictions per part file written while running")
    ap.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size (slower, exact pixels)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def parse_plan_args(argv: list[str]) -> argparse.Namespace:
    """Options of the plan command."""
    ap = argparse.ArgumentParser(
        prog="python -m lib.batch plan",
        description="List the images once and write the manifest that every shard of a run classifies; refuses "
        "to replace an existing one. Run it before any shard starts.",
    )
    ap.add_argument("--images", required=True, help="folder (searched recursively) or s3://bucket/prefix")
    ap.add_argument("--out", required=True, help="the output folder the shards will share")
    ap.add_argument("--manifest", help=MANIFEST_HELP + "; on S3 when the shards do not share OUT")
    return ap.parse_args(argv)


def parse_merge_args(argv: list[str]) -> argparse.Namespace:
    """Options of the merge command."""
    ap = argparse.ArgumentParser(
        prog="python -m lib.batch merge",
        description="Join the shard folders OUT/shard-i-of-N into OUT; refuses missing, unfinished or mismatched "
        "shards, and shards that do not hold every file of the manifest exactly once.",
    )
    ap.add_argument("out", help="the folder holding the shard folders")
    ap.add_argument("--manifest", help="where the manifest is now, if not where the shards recorded it")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the classify or merge command; errors print one line and exit 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if argv[:1] == ["plan"]:
            args = parse_plan_args(argv[1:])
            listing = plan(args.images, args.out, args.manifest)
            summary = {
                "manifest": listing.location,
                "images": listing.images,
                "count": len(listing.files),
                "sha256": listing.sha256,
            }
        elif argv[:1] == ["merge"]:
            args = parse_merge_args(argv[1:])
            summary = merge(args.out, args.manifest)
        else:
            args = parse_args(argv)
            summary = classify(
                args.model,
                args.images,
                args.out,
                registry=args.registry,
                model_name=args.model_name,
                shard=shard_from(args.shard, args.num_shards),
                manifest=args.manifest,
                top_k=args.top_k,
                batch_size=args.batch_size,
                threads=args.threads,
                workers=args.workers,
                chunk_size=args.chunk_size,
                draft=not args.no_draft,
                progress=not args.quiet,
            )
    except (FileNotFoundError, ValueError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
