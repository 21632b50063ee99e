"""CLI: python -m lib.registry list|show|pull URL [--model NAME] [--version V] [--cache-dir DIR]."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lib.metrics import SUMMARY_METRICS
from lib.registry.pull import list_versions, pull, show
from lib.registry.storage import RegistryError


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m lib.registry list|show|pull URL [--model NAME] [--version V] [--cache-dir DIR]."""
    parser = argparse.ArgumentParser(prog="python -m lib.registry", description="Browse and pull the model registry.")
    parser.add_argument("command", choices=["list", "show", "pull"])
    parser.add_argument("url", help="s3://bucket/prefix or a local folder")
    parser.add_argument("--model", default="har-vit")
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
                print(f"no versions of {args.model} in {args.url}")
                return 0
            cols = (*SUMMARY_METRICS, "files", "bytes")
            print(f"{'version':<26}" + "".join(f"{c:>13}" for c in cols) + f"{'created (UTC)':>21}  latest")
            for r in rows:
                cells = "".join(f"{r[c]:>13.4f}" if isinstance(r[c], float) else f"{r[c]!s:>13}" for c in cols)
                created = str(r["created"])[:19]
                print(f"{r['version']:<26}{cells}{created:>21}" + ("  *" if r["latest"] else ""))
        elif args.command == "show":
            print(json.dumps(show(args.url, args.model, args.version, args.region), indent=2))
        else:
            print(pull(args.url, args.model, args.version, args.cache_dir, args.region, progress=True))
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
