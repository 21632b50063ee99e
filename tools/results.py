"""Write docs/results.md from the JSON records that `make bench`, `make rehearsal` and tools/near_duplicates.py leave
in outputs/.

    python tools/results.py            # collect new records into docs/measurements/, then render docs/results.md
    python tools/results.py --check    # exit 1 when docs/results.md is not what the records render to

outputs/ is not in git, so each record is first copied into docs/measurements/<kind>/ (a few KiB of JSON
each): the history of every measurement stays with the code, and results.md is always rendered from all of it, newest
first, each table naming the machine it was measured on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("bench", "rehearsal", "near_duplicates")
ISA_ORDER = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def collect(outputs: Path, store: Path) -> list[Path]:
    """Copy outputs/<kind>/*.json that the store lacks into store/<kind>/; return the new copies."""
    new = []
    for kind in KINDS:
        (store / kind).mkdir(parents=True, exist_ok=True)
        for src in sorted((outputs / kind).glob("*.json")):
            dest = store / kind / src.name
            if not dest.exists():
                json.loads(src.read_text())  # a truncated record is refused here, not rendered
                shutil.copyfile(src, dest)
                new.append(dest)
    return new


def machine_line(m: dict) -> str:
    """'CPU, N cores, M GiB; ISA: …' for one record's machine block."""
    isa = m.get("isa") or {}
    flags = [f for f in ISA_ORDER if isa.get(f)] + sorted(f for f, on in isa.items() if on and f not in ISA_ORDER)
    cores = m.get("usable_cores") or m.get("logical_cores")
    return f"{m.get('cpu') or 'unknown CPU'}, {cores} cores, {m.get('memory_gib')} GiB; ISA: {' '.join(flags) or '-'}"


def busy_line(m: dict) -> str:
    """How much of the CPUs other processes took while the record was measured."""
    busy = m.get("other_processes_cpu_percent") or {}
    if not busy:
        return ""
    return "other processes: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f}%" for k, v in busy.items())


def fmt(value: object, spec: str = ".1f") -> str:
    """A number formatted, or '-' when the record lacks it."""
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def bench_section(name: str, r: dict) -> list[str]:
    """One `make bench` record: latency, memory and throughput tables."""
    m, s, lat, solo = r["machine"], r["settings"], r["latency"], r.get("latency_alone", {})
    ref = lat["reference"]["p50_ms"]
    rows = [
        ("reference: HF processor + PyTorch fp32, batch 1", "reference", r.get("reference_rss_mib")),
        (f"served: {r['serving_model']}", "ours", r.get("serving_rss_mib")),
        (f"student: {r['student_layers']} of {r['teacher_layers']} blocks, int8", "student", r.get("student_rss_mib")),
        ("fp32 ONNX, same preprocessing", "fp32_onnx", (r.get("rss", {}).get("fp32_onnx") or {}).get("peak_rss_mib")),
    ]
    out = [
        f"### bench {name}",
        "",
        f"Machine: {machine_line(m)}. {s['threads']} threads; model: {s['model']}; images: {s['images']}."
        + (f" {busy_line(m)}." if busy_line(m) else ""),
        "",
        "| path | p50 ms (alternated) | p50 ms (alone) | ratio to reference | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key, rss in rows:
        if key in lat:
            p50 = lat[key]["p50_ms"]
            alone = (solo.get(key) or {}).get("p50_ms")
            out.append(f"| {label} | {p50:.1f} | {fmt(alone)} | {ref / p50:.2f}× | {fmt(rss, '.0f')} |")
    ev, b = r.get("eval"), r.get("batch")
    if ev and b:
        rate = ev["reference_images_per_s"]
        out += [
            "",
            f"| throughput over {ev['images']} images | images/s | vs loop |",
            "|---|---:|---:|",
            f"| reference per-image loop | {rate:.2f} | 1.00× |",
            f"| `dataset_logits` (the evaluate stage) | {ev['dataset_logits_images_per_s']:.2f} | "
            f"{ev['dataset_logits_images_per_s'] / rate:.2f}× |",
            f"| batched ONNX (the export check) | {ev['onnx_batched_images_per_s']:.2f} | "
            f"{ev['onnx_batched_images_per_s'] / rate:.2f}× |",
            f"| `lib.batch`, served file | {b['served']['images_per_s']:.2f} | {r['batch_throughput_ratio']:.2f}× |",
            f"| `lib.batch`, student | {b['student']['images_per_s']:.2f} | "
            f"{r['batch_student_throughput_ratio']:.2f}× |",
        ]
    return out + [""]


def rehearsal_section(name: str, r: dict) -> list[str]:
    """One `make rehearsal` record: every step's time and memory."""
    profiles = ", ".join(sorted({c["profile"] for c in r.get("coverage", {}).values()})) or "?"
    images = r.get("images", {})
    out = [
        f"### rehearsal {name}: {profiles}, {'every step passed' if r.get('ok') else 'FAILED'}",
        "",
        f"Machine: {machine_line(r['machine'])}; device {r['device']['kind']} ({r['device']['name']}). "
        f"Images: {images.get('source')}, {images.get('per_class')} per class. "
        f"Total {fmt(r.get('total_seconds'))} s.",
        "",
        "| step | ok | seconds | peak RSS MiB | peak PSS MiB |",
        "|---|---|---:|---:|---:|",
    ]
    for s in r.get("stages", []):
        ok = "skipped" if s.get("ok") is None else ("yes" if s["ok"] else "**no**")
        rss, pss = s.get("peak_rss_mib"), s.get("peak_pss_mib")
        out.append(f"| {s['stage']} | {ok} | {fmt(s.get('seconds'))} | {fmt(rss, ',')} | {fmt(pss, ',')} |")
    return out + [""]


def near_duplicates_section(name: str, r: dict) -> list[str]:
    """One near-duplicate measurement: precision and recall of each grouping rule on labelled pairs."""
    out = [
        f"### near-duplicate grouping {name}",
        "",
        f"{r['labelled_pairs']} pairs of `{Path(r['images']).name}` labelled by eye ({r['pairs']}), "
        f"{r['duplicates']} of them copies. Highest similarity of an unrelated pair: "
        f"{fmt(r.get('max_unrelated_similarity'), '.3f')}; "
        f"lowest of a copy: {fmt(r.get('min_duplicate_similarity'), '.3f')}.",
        "",
        "| rule | pairs joined | copies | unrelated | precision | recall |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rules"]:
        out.append(
            f"| {row['rule']} | {row['joined']} | {row['duplicates']} | {row['unrelated']} | "
            f"{row['precision']:.2f} | {row['recall']:.2f} ({row['duplicates']}/{r['duplicates']}) |"
        )
    return out + [""]


TITLES = {"bench": "Serving benchmark", "rehearsal": "Rehearsal", "near_duplicates": "Near-duplicate grouping"}


def render(store: Path) -> str:
    """results.md from every stored record, newest first."""
    lines = [
        "# Results",
        "",
        "Generated by `make results` (`python tools/results.py`) from the JSON records of `make bench`,",
        "`make rehearsal` and `tools/near_duplicates.py`, kept in `docs/measurements/`. Do not edit by hand.",
        "Every timing table names the machine it was measured on; compare paths only within one record.",
        "",
    ]
    sections = {"bench": bench_section, "rehearsal": rehearsal_section, "near_duplicates": near_duplicates_section}
    for kind, section in sections.items():
        records = sorted((store / kind).glob("*.json"), reverse=True)
        lines += [f"## {TITLES[kind]} ({len(records)} records)", ""]
        for path in records:
            lines += section(path.stem, json.loads(path.read_text()))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Collect and render, or check that results.md is current."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", type=Path, default=ROOT / "outputs")
    ap.add_argument("--store", type=Path, default=ROOT / "docs" / "measurements")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--check", action="store_true", help="render from the store only and compare with --out")
    args = ap.parse_args(argv)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != render(args.store):
            print(f"{args.out} is stale: run python tools/results.py", file=sys.stderr)
            return 1
        return 0
    for path in collect(args.outputs, args.store):
        print(f"collected {path.relative_to(args.store.parent) if path.is_relative_to(args.store.parent) else path}")
    args.out.write_text(render(args.store))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
