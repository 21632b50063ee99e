"""CLI: python -m lib.registry list|show|pull URL [--model NAME] [--version V] [--cache-dir DIR]."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lib.metrics import SUMMARY_METRICS
from lib.registry.pull import list_versions, model_names, pull, show
from lib.registry.storage import RegistryError, open_storage

DEFAULT_MODEL = "har-vit"

LIST_COLUMNS = (*SUMMARY_METRICS, "served_accuracy", "files", "bytes")


def print_versions(rows: list[dict]) -> None:
    """The list command's table: one line per version, grouped by model; * marks each model's latest."""
    width = max(len("model"), *(len(r["model"]) for r in rows)) + 2
    header = "".join(f"{c.replace('served_accuracy', 'served acc'):>13}" for c in LIST_COLUMNS)
    print(f"{'model':<{width}}{'version':<26}{header}{'onnx':>6}{'created (UTC)':>21}  latest")
    for r in rows:
        cells = "".join(f"{r[c]:>13.4f}" if isinstance(r[c], float) else f"{r[c]!s:>13}" for c in LIST_COLUMNS)
        onnx = "yes" if r["onnx"] else "NO"
        created = str(r["created"])[:19]
        print(f"{r['model']:<{width}}{r['version']:<26}{cells}{onnx:>6}{created:>21}" + ("  *" if r["latest"] else ""))


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m lib.registry list|show|pull URL [--model NAME] [--version V] [--cache-dir DIR]."""
    parser = argparse.ArgumentParser(prog="python -m lib.registry", description="Browse and pull the model registry.")
    parser.add_argument("command", choices=["list", "show", "pull"])
    parser.add_argument("url", help="s3://bucket/prefix or a local folder")
    parser.add_argument(
        "--model", default=None, help=f"model name; list: every model when omitted, show/pull: {DEFAULT_MODEL}"
    )
    parser.add_argument("--version", default="latest")
    parser.add_argument("--region", default=None)
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default $HAR_REGISTRY_CACHE or ~/.cache/har-vit/registry"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "list":
            rows = list_versions(args.url, args.model, args.region)
            if not rows:
                if args.model is None:
                    print(f"no versions in {args.url}")
                else:
                    storage = open_storage(args.url, args.region)
                    others = [m for m in model_names(storage) if m != args.model]
                    there = f" (models there: {', '.join(others)})" if others else ""
                    print(f"no versions of {args.model} in {args.url}{there}")
                return 0
            print_versions(rows)
        elif args.command == "show":
            print(json.dumps(show(args.url, args.model or DEFAULT_MODEL, args.version, args.region), indent=2))
        else:
            model = args.model or DEFAULT_MODEL
            print(pull(args.url, model, args.version, args.cache_dir, args.region, progress=True))
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
