"""docs/results.md is rendered from the bench and rehearsal records: new records are collected into the store once,
every table names its machine, and --check catches a stale page."""

import json
from pathlib import Path

import numpy as np
import pytest

from tools import results

MACHINE = {
    "cpu": "Test CPU 9000",
    "isa": {"avx2": True, "avx512f": False, "avx512_vnni": True, "amx_tile": False},
    "usable_cores": 3,
    "memory_gib": 7.5,
    "other_processes_cpu_percent": {"latency": 2.0},
}


def bench_record(ref_ms: float, ours_ms: float) -> dict:
    lat = {"reference": {"p50_ms": ref_ms}, "ours": {"p50_ms": ours_ms}, "student": {"p50_ms": ours_ms / 2}}
    return {
        "machine": MACHINE,
        "settings": {"threads": 3, "model": "random ViT-B/16", "images": "synthetic JPEGs"},
        "latency": lat,
        "latency_alone": {"reference": {"p50_ms": ref_ms + 1}},
        "serving_model": "model.int8.onnx",
        "student_layers": 5,
        "teacher_layers": 11,
        "reference_rss_mib": 801,
        "serving_rss_mib": 203,
        "student_rss_mib": 107,
    }


def rehearsal_record(ok: bool) -> dict:
    return {
        "ok": ok,
        "machine": MACHINE,
        "device": {"kind": "cpu", "name": "Test CPU 9000"},
        "images": {"source": "real photos", "per_class": 11},
        "total_seconds": 432.5,
        "coverage": {"profile": {"profile": "params/har_vit.yaml"}},
        "stages": [
            {"stage": "train", "ok": True, "seconds": 142.0, "peak_rss_mib": 6647, "peak_pss_mib": 5608},
            {"stage": "dashboard", "ok": None, "seconds": 0.0, "peak_rss_mib": None},
        ],
    }


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    outputs, store, out = tmp_path / "outputs", tmp_path / "docs" / "measurements", tmp_path / "docs" / "results.md"
    (outputs / "bench").mkdir(parents=True)
    (outputs / "rehearsal").mkdir(parents=True)
    (outputs / "bench" / "20260101-000000.json").write_text(json.dumps(bench_record(150.0, 50.0)))
    (outputs / "rehearsal" / "20260102-000000.json").write_text(json.dumps(rehearsal_record(True)))
    return outputs, store, out


def args(outputs: Path, store: Path, out: Path, *extra: str) -> list[str]:
    return ["--outputs", str(outputs), "--store", str(store), "--out", str(out), *extra]


def test_render_names_the_machine_and_the_ratios(tree):
    outputs, store, out = tree
    assert results.main(args(outputs, store, out)) == 0
    text = out.read_text()
    assert "Test CPU 9000, 3 cores, 7.5 GiB; ISA: avx2 avx512_vnni" in text
    assert "| served: model.int8.onnx | 50.0 | - | 3.00× | 203 |" in text
    assert "| student: 5 of 11 blocks, int8 | 25.0 | - | 6.00× | 107 |" in text
    assert "| train | yes | 142.0 | 6,647 | 5,608 |" in text
    assert "| dashboard | skipped |" in text
    assert "params/har_vit.yaml, every step passed" in text


def test_collect_keeps_history_and_never_overwrites(tree):
    outputs, store, out = tree
    results.main(args(outputs, store, out))
    stored = store / "bench" / "20260101-000000.json"
    # A later record is added; the stored copy of the first stays as it was even if outputs/ changes or is cleaned.
    (outputs / "bench" / "20260101-000000.json").write_text(json.dumps(bench_record(999.0, 1.0)))
    (outputs / "bench" / "20260301-000000.json").write_text(json.dumps(bench_record(120.0, 40.0)))
    results.main(args(outputs, store, out))
    assert json.loads(stored.read_text())["latency"]["reference"]["p50_ms"] == 150.0
    text = out.read_text()
    assert text.index("bench 20260301-000000") < text.index("bench 20260101-000000")  # newest first
    assert "Serving benchmark (2 records)" in text


def test_check_reports_a_stale_page(tree):
    outputs, store, out = tree
    results.main(args(outputs, store, out))
    assert results.main(args(outputs, store, out, "--check")) == 0
    (store / "rehearsal" / "20260103-000000.json").write_text(json.dumps(rehearsal_record(False)))
    assert results.main(args(outputs, store, out, "--check")) == 1


def test_a_truncated_record_is_refused(tree):
    outputs, store, out = tree
    (outputs / "bench" / "20260401-000000.json").write_text('{"machine": ')
    with pytest.raises(json.JSONDecodeError):
        results.main(args(outputs, store, out))
    assert not (store / "bench" / "20260401-000000.json").exists()


def test_near_duplicate_measure_scores_each_rule_on_labelled_pairs(tmp_path: Path):
    from PIL import Image, ImageDraw

    from tools import near_duplicates

    rng = np.random.default_rng(3)

    def photo(seed: int) -> Image.Image:
        r = np.random.default_rng(seed)
        base = (r.random((12, 16, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(base).resize((160, 120), Image.Resampling.BICUBIC)
        ImageDraw.Draw(img).ellipse((40, 20, 100, 90), fill=tuple(int(v) for v in r.integers(0, 255, 3)))
        return img

    (tmp_path / "a").mkdir()
    original = photo(1)
    original.save(tmp_path / "a" / "orig.jpg", quality=95)
    original.save(tmp_path / "a" / "copy.jpg", quality=60)  # a re-encode: 0 bits apart, similarity near 1
    for i in range(4):
        photo(100 + int(rng.integers(1000))).save(tmp_path / "a" / f"other{i}.jpg")
    pairs = tmp_path / "pairs.csv"
    lines = ["file_a,file_b,label", "a/orig.jpg,a/copy.jpg,duplicate"]
    lines += [f"a/orig.jpg,a/other{i}.jpg,not" for i in range(4)]
    pairs.write_text("\n".join(lines) + "\n")
    record = near_duplicates.measure(tmp_path, pairs)
    assert record["labelled_pairs"] == 5 and record["duplicates"] == 1
    rules = {r["rule"]: r for r in record["rules"]}
    strict = rules["<= 12 bits and similarity >= 0.8"]
    assert strict["duplicates"] == 1 and strict["unrelated"] == 0 and strict["precision"] == 1.0
    # Each rule's counts add up, and a looser hash-only rule never joins fewer pairs than a stricter one.
    assert all(r["joined"] == r["duplicates"] + r["unrelated"] for r in record["rules"])
    joined = [rules[f"hash only, <= {d} bits"]["joined"] for d in near_duplicates.HASH_ONLY]
    assert joined == sorted(joined)


def test_near_duplicate_records_render_with_their_counts(tree):
    outputs, store, out = tree
    (outputs / "near_duplicates").mkdir()
    record = {
        "images": "/data/har_sample",
        "pairs": "tests/data/near_duplicate_pairs.csv",
        "labelled_pairs": 283,
        "duplicates": 7,
        "max_unrelated_similarity": 0.72,
        "min_duplicate_similarity": 0.67,
        "rules": [
            {
                "rule": "hash only, <= 4 bits",
                "joined": 2,
                "duplicates": 2,
                "unrelated": 0,
                "precision": 1.0,
                "recall": 2 / 7,
            },
        ],
    }
    (outputs / "near_duplicates" / "20260105-000000.json").write_text(json.dumps(record))
    results.main(args(outputs, store, out))
    assert "| hash only, <= 4 bits | 2 | 2 | 0 | 1.00 | 0.29 (2/7) |" in out.read_text()
