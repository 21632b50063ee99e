"""Precision and recall of near-duplicate grouping on pairs of real photos labelled by eye.

    python tools/near_duplicates.py [--images ../shared/data/har_sample]   # writes outputs/near_duplicates/<stamp>.json

The labelled pairs (file names and a duplicate / not label, no images) are tests/data/near_duplicate_pairs.csv: every
pair of the HAR sample within 12 dHash bits, plus every pair at any distance whose thumbnails correlate at 0.71 or
more, so the two-stage rows below are complete for similarity thresholds of 0.75 and up. Each rule is scored with
lib.data's own fingerprint, so the record measures what `prepare` does. `make results` renders the record.
"""

from __future__ import annotations

import argparse
import csv
import json
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from lib.data import fingerprint, popcount64, thumbnail_similarity

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "tests" / "data" / "near_duplicate_pairs.csv"
HASH_ONLY = (4, 6, 8, 10, 12)
TWO_STAGE = ((10, 0.8), (12, 0.7), (12, 0.75), (12, 0.8), (12, 0.85), (16, 0.75), (16, 0.8))


def measure(images: Path, pairs_csv: Path = PAIRS) -> dict:
    """Every rule's joined pairs, true and false matches, precision and recall over the labelled pairs."""
    rows = list(csv.DictReader(pairs_csv.open()))
    names = sorted({r[k] for r in rows for k in ("file_a", "file_b")})
    index = {n: i for i, n in enumerate(names)}
    prints = [fingerprint(Image.open(images / n)) for n in names]
    hashes = np.array([h for h, _ in prints], dtype=np.uint64)
    thumbs = np.stack([t for _, t in prints])
    pairs = np.array([(index[r["file_a"]], index[r["file_b"]]) for r in rows])
    duplicate = np.array([r["label"] == "duplicate" for r in rows])
    bits = popcount64(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]).astype(int)
    similarity = thumbnail_similarity(thumbs, pairs)
    rules = [(f"hash only, <= {d} bits", d, None, bits <= d) for d in HASH_ONLY]
    rules += [(f"<= {d} bits and similarity >= {s}", d, s, (bits <= d) & (similarity >= s)) for d, s in TWO_STAGE]
    scored = []
    for name, distance, min_similarity, joined in rules:
        true, false = int((joined & duplicate).sum()), int((joined & ~duplicate).sum())
        scored.append(
            {
                "rule": name,
                "distance": distance,
                "min_similarity": min_similarity,
                "joined": true + false,
                "duplicates": true,
                "unrelated": false,
                "precision": true / max(true + false, 1),
                "recall": true / max(int(duplicate.sum()), 1),
            }
        )
    return {
        "labelled_pairs": len(rows),
        "duplicates": int(duplicate.sum()),
        "max_unrelated_similarity": float(similarity[~duplicate].max()) if (~duplicate).any() else None,
        "min_duplicate_similarity": float(similarity[duplicate].min()) if duplicate.any() else None,
        "rules": scored,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and write outputs/near_duplicates/<timestamp>.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "har_sample")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "near_duplicates")
    args = ap.parse_args(argv)
    if not args.images.is_dir():
        ap.error(f"{args.images} is not a folder: the labelled pairs name photos of the HAR sample")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {"timestamp": stamp, "images": str(args.images), "pairs": PAIRS.relative_to(ROOT).as_posix()}
    record |= measure(args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    for r in record["rules"]:
        print(f"{r['rule']:<36} joined {r['joined']:>4}  precision {r['precision']:.2f}  recall {r['recall']:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
