"""Rehearsal of a real profile: every stage at full size (ViT-B/16, DINOv2-base, SigLIP-base), offline, on this
machine (CPU or one GPU).

    make rehearsal [PROFILE=params/har_dinov2.yaml]   # python -m tools.rehearsal --profile ...
    python -m tools.rehearsal --dry-run [--device cuda]   # the plan only: overrides, key coverage, commands

Steps, each in its own process, timed, with the peak RSS and PSS of its process tree sampled:
  caches        offline Hugging Face caches in the work folder: seeded random full-size snapshots of the Hub ids
                the runs load (tools.hub_cache.HUB_MODELS: each repo's architecture and processor), and an
                Arrow cache of Bingsu/Human_Action_Recognition holding the real photos of ../shared/data/har_sample
                (the embedded generator's images when that folder is missing);
  prepare .. publish   the profile (default params/har_vit.yaml) through every stage (`python -m lib.pipeline
                --stages X`) against moto's S3 on 127.0.0.1 with fake credentials. publish_gate runs the profile's
                own gate, which must refuse (random weights) with nothing uploaded; publish then runs with the gate
                off and really uploads;
  dashboard     Voila as `make dashboard` runs it pulls the published version from the moto S3 into a fresh cache;
                headless Chromium uploads a photo and waits for the top-k labels; kernel and server RSS;
  reference/*   with har_vit.yaml only: params/har_vit_reference.yaml through prepare, train and evaluate;
  gpu_bench     on a CUDA machine only: python -m tools.bench.gpu.
Only run-length/size keys and the registry location may differ from the profile (OVERRIDABLE); anything else is
refused. Prints a table and writes outputs/rehearsal/<timestamp>.json; exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import datasets
import numpy as np
import onnxruntime
import psutil
import torch
import transformers
import yaml
from botocore.exceptions import ClientError
from playwright.sync_api import sync_playwright

from lib.dashboard.headless import CHROMIUM, launch_options, wait_for_port
from lib.data import split_sizes
from lib.files import MIB, read_json
from lib.params import ROOT, TrainParams, flatten, load_params, parse_override
from lib.registry.gate import check_gate
from tools.fake_s3 import FAKE_AWS_ENV, UNSET_AWS_ENV, free_port, start_moto
from tools.hub_cache import HUB_MODELS, generated_jpeg
from tools.machine import cpu_snapshot, machine_info, others_percent

PROFILE = ROOT / "params" / "har_vit.yaml"
REFERENCE = ROOT / "params" / "har_vit_reference.yaml"
OUT_ROOT = ROOT / "outputs" / "rehearsal"
HAR_SAMPLE = ROOT.parent / "shared" / "data" / "har_sample"
BUCKET = "har-rehearsal"
SAMPLE_S = 0.2  # RSS sampling period; spikes shorter than this can be missed
STEP_TIMEOUT_S = 1800  # a hung step is killed and reported, the rehearsal goes on
PAGE_TIMEOUT_S = 600  # the kernel pulls ~750 MB from the moto S3 and hashes it before the page shows

# CPU sizes. Measured here (2 cores): ViT-B/16 takes ~0.2 s per image forward and ~0.8 s forward + backward.
# 11 photos per class -> 165 -> train/validation/test 115 / 17 / 33 with the profile's 10 % / 20 %: validation is
# not 15 (a 15-image validation hid a crash: a (15,) array compared with a (15, 15) one broadcasts), and 11 is the
# fewest above 10 that keeps >= 15 validation images, which a stratified split over 15 classes needs.
# Train batch 16 -> 8 steps per epoch; 2 epochs (16 steps, 230 images: the train stage took 251 s) give two
# validation passes, so the best checkpoint is really chosen on validation; the whole rehearsal took 9 min 1 s.
# Evaluation batch 16 leaves a one-image last batch on both splits (33 = 2 x 16 + 1, 17 = 16 + 1). One DataLoader
# worker runs the worker path of the profile's 8 (pickled transforms, persistent workers) without eight torch
# processes on two cores.
CPU_PER_CLASS = 11
CPU_EPOCHS = 2
CPU_TRAIN_BATCH = 16
CPU_EVAL_BATCH = 16
CPU_WORKERS = 1
# GPU: the profile's batch sizes, workers and precision, one epoch over every cached photo.
GPU_PER_CLASS = 100
GPU_EPOCHS = 1
GPU_BENCH_BUDGET_S = 120  # keeps the whole GPU rehearsal within one 8-minute call
# Distillation of the export stage's student (export.student_layers), on the CPU: 4 optimizer steps of 16 images
# (half an epoch). Estimated from the figures above: a 6-block student's forward + backward and the 12-block
# teacher's forward cost ~0.6 s per image, so ~40 s of steps; with the student's ONNX export and its checks the
# export stage grows by ~90 s. On a GPU, one epoch like the train stage.
CPU_DISTILL_STEPS = 4

# The keys a rehearsal may change: how long and how big the run is, where its outputs and its registry go.
# Every other key runs at the profile's value, so the rehearsal exercises the recipe itself.
OVERRIDABLE: dict[str, str] = {
    "run.name": "rehearsal run folder",
    "run.output_root": "rehearsal work folder",
    "train.max_steps": "run length",
    "export.distill_max_steps": "run length (the student's distillation, when export.student_layers is set)",
    "train.epochs": "run length (the rehearsal sets max_steps when TrainParams has it, epochs otherwise)",
    "train.batch_size": "size: memory and seconds per step on this machine",
    "train.num_workers": "size: DataLoader processes on this machine",
    "evaluate.batch_size": "size: memory on this machine",
    "evaluate.num_workers": "size: DataLoader processes on this machine",
    "publish.registry": "registry location: the local moto S3",
    "dashboard.registry": "registry location: the local moto S3",
}
# Allowed in the publish step only, after the gated publish refused.
GATE_OFF = {
    "publish.gate.enabled": (
        False,
        (
            "the profile's gate (accuracy and weighted F1 >= 0.85) cannot pass with random weights; "
            "publish_gate ran it and it refused with nothing uploaded; "
            "this step switches it off so the upload to S3 really happens"
        ),
    )
}
PIPELINE_STEPS = ("prepare", "train", "evaluate", "export", "publish_gate", "publish")
REFERENCE_STEPS = ("prepare", "train", "evaluate")
ACCELERATED = {"train", "evaluate"}  # steps that use the GPU when there is one; the others run on the CPU


class RehearsalError(RuntimeError):
    """A refused override, or a step whose result is not what the rehearsal requires."""


# --------------------------------------------------------------------------- override policy and key coverage


def check_overrides(overrides: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    """Refuse any override that is not a run-length/size setting or the registry location (or in extra)."""
    refused = sorted(k for k in overrides if k not in OVERRIDABLE and k not in extra)
    if refused:
        raise RehearsalError(
            f"the rehearsal overrides only run-length/size settings and the registry location "
            f"({', '.join(OVERRIDABLE)}); refused: {', '.join(refused)}"
        )


def length_key() -> str:
    """train.max_steps once TrainParams has it, else train.epochs (whole epochs: the same run)."""
    return "train.max_steps" if "max_steps" in TrainParams.model_fields else "train.epochs"


def size_overrides(profile: Path, device: str) -> dict[str, Any]:
    """Batch sizes and workers for the device: the CPU sizes above where the profile differs, none on a GPU."""
    if device == "cuda":
        return {}
    sizes = {
        "train.batch_size": CPU_TRAIN_BATCH,
        "train.num_workers": CPU_WORKERS,
        "evaluate.batch_size": CPU_EVAL_BATCH,
        "evaluate.num_workers": CPU_WORKERS,
    }
    p = load_params(profile).model_dump()
    return {k: v for k, v in sizes.items() if p[k.split(".")[0]][k.split(".")[1]] != v}


def with_length(profile: Path, device: str, n_train: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """overrides plus the run length: CPU_EPOCHS or GPU_EPOCHS epochs over n_train images, as max_steps when that
    key exists. A length given with --set wins."""
    epochs = GPU_EPOCHS if device == "cuda" else CPU_EPOCHS
    key = length_key()
    if key == "train.epochs":
        return {key: epochs, **overrides}
    p = load_params(profile, as_sets(overrides))
    tp = p.train
    batches = math.ceil(n_train / (tp.batch_size * tp.num_gpus * tp.nodes))
    steps = max(batches // tp.grad_accum, 1)  # the Trainer's optimizer steps per epoch
    length = {key: epochs * steps}
    if p.export.enabled and p.export.student_layers is not None:
        length["export.distill_max_steps"] = steps if device == "cuda" else CPU_DISTILL_STEPS
    return {**length, **overrides}


def as_sets(overrides: dict[str, Any]) -> list[str]:
    """{key: value} as the runner's KEY=VALUE strings (values as YAML)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]


def coverage(profile: Path, step_overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """For every leaf key of the profile file: its value, and whether it ran at it or was overridden (where, how).

    Also lists the overridden keys the file does not set (they replace a default of lib/params.py).
    """
    leaves = flatten(yaml.safe_load(profile.read_text()) or {})
    keys = []
    for key, value in leaves.items():
        where = {step: ovr[key] for step, ovr in step_overrides.items() if key in ovr}
        row: dict[str, Any] = {"key": key, "profile": value, "ran": "profile"}
        if where:
            values = list({json.dumps(v): v for v in where.values()}.values())
            row.update(ran="overridden", override=values[0] if len(values) == 1 else values, steps=list(where))
        keys.append(row)
    added: dict[str, dict[str, Any]] = {}
    for step, ovr in step_overrides.items():
        for key, value in ovr.items():
            if key not in leaves:
                added.setdefault(key, {"key": key, "override": value, "steps": []})["steps"].append(step)
    overridden = sum(r["ran"] != "profile" for r in keys)
    return {
        "profile": rel(profile),
        "at_profile_value": len(keys) - overridden,
        "overridden": overridden,
        "keys": keys,
        "not_in_profile": list(added.values()),
    }


def _norm(value: Any) -> Any:
    """A params value for comparison: numbers as float, None-valued keys of list items dropped."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_norm({k: v for k, v in x.items() if v is not None} if isinstance(x, dict) else x) for x in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def profile_mismatches(profile: Path, resolved: Path, overrides: dict[str, Any]) -> list[str]:
    """Keys of the profile file whose value in a run's resolved params.yaml differs without an override."""
    want = flatten(yaml.safe_load(profile.read_text()) or {})
    got = flatten(yaml.safe_load(resolved.read_text()) or {})
    return [
        f"{k}: profile {v!r}, ran {got.get(k)!r}"
        for k, v in want.items()
        if k not in overrides and _norm(v) != _norm(got.get(k))
    ]


# --------------------------------------------------------------------------- processes and memory


def rel(path: Path | str) -> str:
    """A path relative to the repository root when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def tree_memory(pid: int) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes of a process and all its descendants.

    RSS counts a page shared by several processes (a forked DataLoader worker, the kernel's parent) once per
    process; PSS splits it among them, so the PSS sum is what the tree really holds.
    """

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    rss = pss = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()  # /proc/<pid>/smaps_rollup: a few ms
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
    return rss, pss


@contextlib.contextmanager
def sampled_peak(pid: int) -> Iterator[dict[str, float]]:
    """Sample tree_memory(pid) every SAMPLE_S in a thread. The yielded dict holds, when the block ends, the peaks
    in MiB ('peak_rss_mib', 'peak_pss_mib') and the share of the CPUs other processes used meanwhile."""
    peaks = [0, 0]
    stop = threading.Event()

    def loop() -> None:
        """Keep the highest sums seen until told to stop."""
        while not stop.is_set():
            peaks[:] = map(max, peaks, tree_memory(pid))
            stop.wait(SAMPLE_S)

    box: dict[str, float] = {}
    before = cpu_snapshot()
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join()
        box.update(
            peak_rss_mib=round(peaks[0] / MIB),
            peak_pss_mib=round(peaks[1] / MIB),
            others_cpu_percent=round(others_percent(before, cpu_snapshot()), 1),
        )


def stop_tree(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Terminate a process we started, then kill it and any descendant still running after grace_s."""

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


def run_measured(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float = STEP_TIMEOUT_S) -> dict:
    """Run cmd from the repository root, output into log; rc, seconds, the tree's peak RSS / PSS, others' CPU."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with sampled_peak(proc.pid) as box:
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                stop_tree(proc)
                rc = None
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1), **box}


def failure_text(log: Path) -> dict[str, Any]:
    """The runner's error (stage, executed notebook, error line) and the notebook's traceback tail, from a log."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    found: dict[str, Any] = {"error": "\n".join(lines[starts[-1] :][:12] if starts else lines[-15:])}
    match = re.search(r"executed notebook: (\S+)", found["error"])
    if match:
        found["notebook"] = rel(match.group(1))
        found["traceback_tail"] = notebook_traceback(Path(match.group(1)))
    return found


def notebook_traceback(notebook: Path, lines: int = 15) -> str:
    """The last lines of the first error output in an executed notebook (ANSI colours removed)."""
    try:
        cells = json.loads(notebook.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return ""
    for cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(output.get("traceback", [])))
                return "\n".join(text.splitlines()[-lines:])
    return ""


# --------------------------------------------------------------------------- steps


def pipeline_cmd(profile: Path, run_name: str, stage: str, overrides: dict[str, Any]) -> list[str]:
    """The runner's command line for one stage (run.name goes through --run)."""
    sets = as_sets({k: v for k, v in overrides.items() if k != "run.name"})
    return [
        sys.executable,
        "-m",
        "lib.pipeline",
        "--params",
        rel(profile),
        "--run",
        run_name,
        "--stages",
        stage,
        *(arg for s in sets for arg in ("--set", s)),
    ]


def s3_objects(bucket: str, prefix: str) -> dict[str, int]:
    """Key -> size of every object under prefix in the (moto) bucket; {} when the bucket does not exist."""

    client = boto3.client("s3")
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return {}
        raise


def check_prepare(out: Path, device: str) -> dict:
    """Split sizes from data/summary.json; the CPU plan needs a validation split other than 15 images."""
    summary = read_json(out / "data" / "summary.json", default={})
    sizes = summary.get("split_sizes") or {}
    if not sizes:
        raise RehearsalError("data/summary.json has no split sizes")
    if device == "cpu" and sizes.get("validation") == 15:
        raise RehearsalError("validation has exactly 15 images: choose another --images-per-class")
    return {
        "split_sizes": sizes,
        "loaded": summary.get("loaded"),
        "duplicates_dropped": summary.get("duplicates_dropped"),
    }


def check_train(out: Path, epochs: int) -> dict:
    """Evaluations in the history (at least `epochs`), best checkpoint and validation accuracy, device, precision."""
    history = json.loads((out / "train_history.json").read_text())
    summary = read_json(out / "train_summary.json", default={})
    evals = [h for h in history if "eval_accuracy" in h]
    found = {
        "optimizer_steps": max((int(h.get("step", 0)) for h in history), default=0),
        "evaluations": [{"epoch": h.get("epoch"), "accuracy": h["eval_accuracy"]} for h in evals],
        "best_val_accuracy": summary.get("best_val_accuracy"),
        "best_checkpoint": rel(summary["best_checkpoint"]) if summary.get("best_checkpoint") else None,
        "precision": summary.get("precision"),
        "train_device": summary.get("device"),
        "parameters": summary.get("parameters"),
    }
    if len(evals) < epochs:
        raise RehearsalError(f"{len(evals)} validation pass(es) in train_history.json, {epochs} planned")
    return found


def check_evaluate(out: Path) -> dict:
    """Headline metrics of metrics.json."""
    m = read_json(out / "metrics.json", default={})
    return {k: m.get(k) for k in ("accuracy", "f1_weighted", "n_test", "tta_flip")} | {
        "temperature": (m.get("calibration") or {}).get("temperature")
    }


def check_export(out: Path, profile: Path) -> dict:
    """The serving choice and the variants' sizes and agreement; the student's rows when the profile asks for one."""
    serving = read_json(out / "export" / "serving.json", default={})
    variants = (read_json(out / "metrics.json", default={}).get("export") or {}).get("variants") or {}
    if load_params(profile).export.student_layers is not None and "student_fp32" not in variants:
        raise RehearsalError("export.student_layers is set but metrics.json has no student variant")
    fields = ("layers", "size_mib", "agreement", "accuracy_drop", "latency_ms")
    return {
        "serving_file": serving.get("file"),
        "serving_variant": serving.get("variant"),
        "serving_reason": serving.get("reason"),
        "variants": {k: {f: v.get(f) for f in fields} for k, v in variants.items()},
    }


def check_gate_refused(out: Path, profile: Path, bucket: str, prefix: str) -> dict:
    """The gated publish refused for the right reason (every failure a gate condition the metrics miss) and
    uploaded nothing."""

    record = read_json(out / "publish.json", default={})
    expected = check_gate(read_json(out / "metrics.json", default={}), load_params(profile).publish.gate.conditions)
    uploaded = s3_objects(bucket, prefix)
    found = {
        "published": record.get("published"),
        "failures": record.get("failures"),
        "objects_in_registry": len(uploaded),
    }
    if record.get("published") or not record.get("failures"):
        raise RehearsalError(f"the profile's gate did not refuse: {record}")
    if record["failures"] != expected:
        raise RehearsalError(f"the gate refused for another reason: {record['failures']} (expected {expected})")
    if uploaded:
        raise RehearsalError(f"the refused publish left {len(uploaded)} object(s) in s3://{bucket}/{prefix}")
    return found


def check_published(out: Path, bucket: str, prefix: str, model_name: str) -> dict:
    """The version is in the moto S3 with model, ONNX fp32 and int8 files, and latest.json points at it."""
    record = read_json(out / "publish.json", default={})
    if not record.get("published"):
        raise RehearsalError(f"nothing published: {record.get('failures')}")
    version = record["version"]
    objects = s3_objects(bucket, f"{prefix}/{model_name}/{version}/")
    names = {k.rsplit(f"{version}/", 1)[1] for k in objects}
    missing = [
        f
        for f in ("manifest.json", "model/model.safetensors", "export/model.onnx", "export/model.int8.onnx")
        if f not in names
    ]
    if missing:
        raise RehearsalError(f"published version {version} lacks {', '.join(missing)} in s3://{bucket}/{prefix}")

    body = boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{model_name}/latest.json")["Body"]
    latest = json.loads(body.read())
    if latest.get("version") != version:
        raise RehearsalError(f"latest.json names {latest.get('version')}, not {version}")
    return {
        "version": version,
        "url": record.get("url"),
        "objects": len(objects),
        "uploaded_mib": round(sum(objects.values()) / MIB, 1),
    }


def check_step(name: str, out: Path, profile: Path, device: str) -> dict:
    """What the rehearsal requires of a pipeline step beyond its exit status; the figures worth keeping."""
    if name == "prepare":
        return check_prepare(out, device)
    if name == "train":
        return check_train(out, GPU_EPOCHS if device == "cuda" else CPU_EPOCHS)
    if name == "evaluate":
        return check_evaluate(out)
    if name == "export":
        return check_export(out, profile)
    if name == "publish_gate":
        return check_gate_refused(out, profile, BUCKET, "registry")
    if name == "publish":
        return check_published(out, BUCKET, "registry", load_params(profile).publish.model_name)
    return {}


def pipeline_step(
    step: str, profile: Path, run_name: str, stage: str, overrides: dict[str, Any], env: dict[str, str], logs: Path
) -> tuple[dict, Path]:
    """Run one stage through the runner, measured; on success compare the resolved params with the profile."""
    out = Path(overrides["run.output_root"]) / run_name
    log = logs / (step.replace("/", "_") + ".log")
    print(f"==> {step}: stage {stage} of {rel(profile)}  (log: {rel(log)})", flush=True)
    result = {
        "stage": step,
        **run_measured(pipeline_cmd(profile, run_name, stage, overrides), env, log),
        "log": rel(log),
    }
    result["ok"] = result.pop("rc") == 0
    if result["ok"]:
        mismatches = profile_mismatches(profile, out / "params.yaml", overrides)
        if mismatches:
            result.update(ok=False, error="resolved params differ from the profile: " + "; ".join(mismatches))
    else:
        result.update(failure_text(log))
    return result, out


def skipped(stage: str, why: str) -> dict:
    """A step that did not run."""
    return {"stage": stage, "ok": False, "seconds": 0.0, "peak_rss_mib": None, "skipped": why}


def run_profile(
    profile: Path,
    prefix: str,
    steps: tuple[str, ...],
    ovr: dict[str, Any],
    device: str,
    labels: dict[str, str],
    env: dict[str, str],
    work: Path,
    report: dict,
) -> Path:
    """Run a profile's steps in order (a failure skips the rest); record steps, overrides, coverage. Return its run
    folder."""
    key = prefix.rstrip("/") or "profile"
    per_step: dict[str, dict[str, Any]] = {}
    out = Path(ovr["run.output_root"]) / ovr["run.name"]
    failed = None
    for name in steps:
        label = prefix + name
        if failed:
            report["stages"].append(skipped(label, f"{failed} failed"))
            continue
        step_ovr = dict(ovr)
        if name == "publish":
            step_ovr |= {k: v[0] for k, v in GATE_OFF.items()}
        check_overrides(step_ovr, extra=tuple(GATE_OFF) if name == "publish" else ())
        per_step[label] = step_ovr
        stage = "publish" if name == "publish_gate" else name
        step, out = pipeline_step(label, profile, ovr["run.name"], stage, step_ovr, env, work / "logs")
        step["device"] = labels["gpu" if name in ACCELERATED else "cpu"]
        if step["ok"]:
            try:
                step.update(check_step(name, out, profile, device))
            except (RehearsalError, OSError, ValueError, KeyError) as exc:
                step.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        if step["ok"] and name == "prepare":
            report["split_sizes"][key] = step["split_sizes"]
            # The run length counts the prepared train split (de-duplication can shrink it); prepare ignores it.
            ovr = with_length(profile, device, step["split_sizes"]["train"], ovr)
            check_overrides(ovr)
        report["stages"].append(step)
        print(
            f"<== {label}: {'ok' if step['ok'] else 'FAILED'} in {step['seconds']:.0f} s, "
            f"peak RSS {step['peak_rss_mib']:,} MiB, PSS {step['peak_pss_mib']:,} MiB",
            flush=True,
        )
        if not step["ok"]:
            print("\n".join(filter(None, [step.get("error"), step.get("traceback_tail")])), file=sys.stderr)
            failed = label
    used = sorted({k for o in per_step.values() for k in o})
    report["overrides"][key] = {
        "profile": rel(profile),
        "steps": per_step,
        "why": {k: OVERRIDABLE[k] if k in OVERRIDABLE else GATE_OFF[k][1] for k in used},
    }
    report["coverage"][key] = coverage(profile, per_step)
    return out


def voila_rss(server_pid: int) -> tuple[list[int], int]:
    """(RSS of each live ipykernel child, RSS of the Voila server) in bytes."""

    server = psutil.Process(server_pid)
    kernels = []
    for child in server.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and "ipykernel_launcher" in " ".join(child.cmdline()):
                kernels.append(child.memory_info().rss)
    return kernels, server.memory_info().rss


def browse(url: str, photo: Path, top_k: int, server_pid: int) -> dict:
    """Open the page in headless Chromium, upload the photo, wait for the top-k rows; timings, labels, RSS."""

    with sync_playwright() as pw:
        browser = pw.chromium.launch(**launch_options())
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
            start = time.perf_counter()
            page.goto(url)
            page.wait_for_selector(".har-model-info, .har-error")
            if page.locator(".har-model-info").count() == 0:
                raise RehearsalError("the page shows an error: " + page.locator(".har-error").first.inner_text())
            shown = time.perf_counter() - start
            info = page.locator(".har-model-info")
            start = time.perf_counter()
            with page.expect_file_chooser() as chooser:
                page.click(".har-upload")
            chooser.value.set_files(str(photo))
            page.wait_for_selector(".har-results .har-result, .har-results .har-error")
            errors = page.locator(".har-results .har-error")
            if errors.count():
                raise RehearsalError("the upload gave an error card: " + errors.first.inner_text())
            card = page.locator(".har-results .har-result").first
            rows = card.locator(".har-pred")
            top = [
                {"label": row.get_attribute("data-label"), "prob": float(row.get_attribute("data-prob") or "nan")}
                for row in rows.all()
            ]
            found = {
                "page_seconds": round(shown, 1),
                "result_seconds": round(time.perf_counter() - start, 1),
                "shown_model": info.get_attribute("data-model"),
                "shown_version": info.get_attribute("data-version"),
                "photo": rel(photo),
                "top": top,
                "predict_ms_shown": float(card.get_attribute("data-ms") or "nan"),
            }
            kernels, server = voila_rss(server_pid)  # the kernel holds the loaded model now, after one prediction
        finally:
            browser.close()
    found.update(
        kernel_rss_mib=round(max(kernels) / MIB) if kernels else None,
        kernels=len(kernels),
        server_rss_mib=round(server / MIB),
    )
    if len(top) != top_k:
        raise RehearsalError(f"the page shows {len(top)} labels, top_k is {top_k}")
    return found


def serve_and_browse(env: dict[str, str], photo: Path, top_k: int, log: Path) -> dict:
    """Voila on the dashboard notebook, as `make dashboard` runs it, on a free port; one photo through Chromium.

    Returns the page's figures, ok/error, and the seconds and memory of the Voila tree (server and kernels).
    """
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "voila",
        "notebooks/dashboard.ipynb",
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        f"--port={port}",
    ]
    found: dict[str, Any] = {"log": rel(log)}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with sampled_peak(proc.pid) as box:
            try:
                wait_for_port(port, proc, timeout_s=120)
                found.update(browse(f"http://127.0.0.1:{port}/", photo, top_k, proc.pid), ok=True)
            except Exception as exc:  # a browser timeout or a page error: reported, the rehearsal goes on
                found.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            finally:
                stop_tree(proc)
    found.update(seconds=round(time.perf_counter() - start, 1), **box)
    if not found["ok"]:
        found["log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    return found


def int8_copy(pulled: Path, dest: Path) -> Path:
    """A copy of a pulled version (hard links) whose serving.json names the int8 file; the cache stays intact."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(pulled, dest, copy_function=os.link)
    serving = dest / "export" / "serving.json"
    record = read_json(serving, default={})
    serving.unlink()  # a hard link to the cached file: replace it, never write through it
    record.update(file="model.int8.onnx", reason="rehearsal: int8 loaded to measure the kernel's memory")
    serving.write_text(json.dumps(record, indent=2))
    return dest


def dashboard_step(run_dir: Path, registry: str, version: str, photo: Path, env: dict[str, str], work: Path) -> dict:
    """The dashboard pulling the published version from S3 into a fresh cache, one photo classified in Chromium.

    With random weights the export's agreement rule usually serves fp32 ONNX; the kernel's memory with the int8
    model is then measured in a second Voila run on a copy of the pulled version that serves int8 (HAR_MODEL_DIR,
    the deployment's pre-pulled path).
    """
    p = load_params(run_dir / "params.yaml").dashboard
    cache = work / "registry-cache"
    shutil.rmtree(cache, ignore_errors=True)
    print(
        f"==> dashboard: voila, {p.model_name} {version} pulled from {registry}  "
        f"(log: {rel(work / 'logs' / 'dashboard.log')})",
        flush=True,
    )
    if not CHROMIUM.exists():  # not a pipeline failure: the machine lacks the browser
        return {
            "stage": "dashboard",
            "ok": None,
            "seconds": 0.0,
            "peak_rss_mib": None,
            "skipped": f"{CHROMIUM} is missing",
        }
    env = {
        **env,
        "HAR_PARAMS_FILE": str(run_dir / "params.yaml"),
        "HAR_MODEL_NAME": p.model_name,
        "HAR_MAX_KERNELS": "2",
    }
    result = {
        "stage": "dashboard",
        **serve_and_browse(
            {**env, "HAR_REGISTRY": registry, "HAR_MODEL_VERSION": version, "HAR_REGISTRY_CACHE": str(cache)},
            photo,
            p.top_k,
            work / "logs" / "dashboard.log",
        ),
    }
    result["peak_scope"] = "Voila server + its kernels (not the browser)"
    pulled = list(cache.glob(f"*/{p.model_name}/{version}"))
    if not pulled:
        result.update(ok=False, error=result.get("error") or f"nothing was pulled into {rel(cache)}")
    else:
        result.update(
            pulled_into=rel(pulled[0]),
            served_file=read_json(pulled[0] / "export" / "serving.json", default={}).get("file"),
        )
        if result["ok"] and result["served_file"] != "model.int8.onnx":
            print("    the export serves fp32 for this model: the int8 kernel is measured on a copy", flush=True)
            int8 = serve_and_browse(
                {**env, "HAR_MODEL_DIR": str(int8_copy(pulled[0], work / "int8-version"))},
                photo,
                p.top_k,
                work / "logs" / "dashboard_int8.log",
            )
            keep = (
                "ok",
                "error",
                "seconds",
                "kernel_rss_mib",
                "server_rss_mib",
                "peak_rss_mib",
                "peak_pss_mib",
                "predict_ms_shown",
                "top",
                "log",
            )
            result["int8"] = {k: int8[k] for k in keep if k in int8} | {
                "why": "the export's agreement rule chose fp32 ONNX for this random-weight model (see export); "
                "this second page serves export/model.int8.onnx from a copy of the pulled version"
            }
            result["ok"] = result["ok"] and int8["ok"]
            result["seconds"] = round(result["seconds"] + int8["seconds"], 1)
        int8_figures = result.get("int8") or (result if result["served_file"] == "model.int8.onnx" else {})
        result["kernel_rss_mib_int8"] = int8_figures.get("kernel_rss_mib")
    print(f"<== dashboard: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s", flush=True)
    if not result["ok"]:
        print(result.get("error") or result.get("int8", {}).get("error"), file=sys.stderr)
    return result


def pick_photo(images: Path | None, per_class: int, work: Path) -> Path:
    """A real photo the training did not see (har_sample) when there is one, else a generated image."""
    if images is not None:
        files = sorted((images / "running").glob("*.jpg"))
        if files:
            return files[min(per_class, len(files) - 1)]

    path = work / "photo.jpg"
    path.write_bytes(generated_jpeg(10, np.random.default_rng(123)))
    return path


# --------------------------------------------------------------------------- plan, report, CLI


def hf_env(cache: Path) -> dict[str, str]:
    """Offline Hugging Face settings pointing both libraries at the rehearsal's caches."""
    return {
        "HF_HUB_CACHE": str(cache / "hub"),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
    }


def detect_device(choice: str) -> tuple[str, str]:
    """('cuda' or 'cpu', a readable name) for --device auto|cpu|cuda."""

    cuda = torch.cuda.is_available()
    if choice == "cuda" or (choice == "auto" and cuda):
        return "cuda", torch.cuda.get_device_name(0) if cuda else "no CUDA here: dry run only"
    info = machine_info()
    return "cpu", f"{info['cpu']}, {info['usable_cores']} cores"


def base_overrides(profile: Path, device: str, output_root: Path, registry: str | None) -> dict[str, Any]:
    """The overrides every stage of a run gets (the run length is added once prepare has counted the split)."""
    ovr: dict[str, Any] = {
        "run.name": "rehearsal-" + profile.stem,
        "run.output_root": str(output_root),
        **size_overrides(profile, device),
    }
    if registry:
        ovr |= {"publish.registry": registry, "dashboard.registry": registry}
    return ovr


def planned_runs(args: argparse.Namespace) -> list[tuple[Path, str, str | None, tuple[str, ...]]]:
    """(profile, step prefix, registry or None, steps) of each profile the rehearsal runs."""
    runs = [(args.profile, "", f"s3://{BUCKET}/registry", PIPELINE_STEPS)]
    # The reference recipe is har_vit.yaml's comparison; another profile's rehearsal does not repeat it.
    if not args.no_reference and args.profile.resolve() == PROFILE.resolve():
        runs.append((args.reference, "reference/", None, REFERENCE_STEPS))
    return runs


def hub_models(args: argparse.Namespace) -> list[str]:
    """The Hub model ids the planned runs load, each needing a stand-in in the offline cache (HUB_MODELS)."""

    ids = []
    for profile, *_ in planned_runs(args):
        mp = load_params(profile).model
        if mp.source == "hub" and mp.name_or_path not in ids:
            if mp.name_or_path not in HUB_MODELS:
                raise RehearsalError(
                    f"{rel(profile)}: no offline stand-in for model {mp.name_or_path!r} "
                    f"(tools/hub_cache.py HUB_MODELS knows {', '.join(HUB_MODELS)})"
                )
            ids.append(mp.name_or_path)
    return ids


def print_table(stages: list[dict], total: float) -> None:
    """Each step's wall time, peak RSS and PSS of its process tree, status and device."""
    print(f"\n{'step':<20}{'seconds':>9}{'peak RSS MiB':>14}{'peak PSS MiB':>14}  {'ok':<8}device")
    for s in stages:
        ok = "skipped" if s.get("ok") is None else ("yes" if s["ok"] else "FAILED")
        rss, pss = (f"{s[k]:,}" if s.get(k) is not None else "-" for k in ("peak_rss_mib", "peak_pss_mib"))
        print(f"{s['stage']:<20}{s.get('seconds', 0):>9.1f}{rss:>14}{pss:>14}  {ok:<8}{s.get('device', '')}")
        for label, fig in (("", s), ("int8 ", s.get("int8") or {})):
            if fig.get("kernel_rss_mib"):
                served = "" if label else f" ({s.get('served_file')})"
                print(
                    f"{'':<20}kernel RSS {fig['kernel_rss_mib']} MiB with the {label}model{served}, "
                    f"Voila server {fig['server_rss_mib']} MiB"
                )
    print(f"{'total':<20}{total:>9.1f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(
        prog="python -m tools.rehearsal", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--profile", type=Path, default=PROFILE, help="profile run through every stage")
    ap.add_argument("--reference", type=Path, default=REFERENCE, help="profile run through prepare, train, evaluate")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference profile")
    ap.add_argument("--images", type=Path, default=HAR_SAMPLE, help="real photos, <class>/*.jpg (else generated)")
    ap.add_argument(
        "--images-per-class", type=int, help=f"default {CPU_PER_CLASS} on the CPU, {GPU_PER_CLASS} on a GPU"
    )
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override; run-length/size keys only, others are refused",
    )
    ap.add_argument("--out", type=Path, default=OUT_ROOT, help="work folder and <timestamp>.json go here")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (overrides, coverage, commands) and stop")
    return ap.parse_args(argv)


def dry_run(args: argparse.Namespace, device: str, per_class: int, extra: dict[str, Any]) -> int:
    """Print the plan, split sizes assumed from images per class (no duplicates); validate every override."""

    print(f"device {device}, {per_class} images per class, work folder {rel(args.out / 'work')}")
    print(f"offline Hub cache: {', '.join(hub_models(args))} (random weights, the repos' configs and processors)")
    for profile, prefix, registry, steps in planned_runs(args):
        data = load_params(profile).data
        sizes = split_sizes(15 * per_class, data.val_fraction, data.test_fraction)
        base = base_overrides(profile, device, args.out / "work" / "runs", registry) | extra
        ovr = with_length(profile, device, sizes["train"], base)
        gate_off = {k: v[0] for k, v in GATE_OFF.items()}
        per_step = {prefix + s: base if s == "prepare" else ovr | (gate_off if s == "publish" else {}) for s in steps}
        for step_ovr in per_step.values():
            check_overrides(step_ovr, extra=tuple(GATE_OFF))
            load_params(profile, as_sets(step_ovr))  # every key and value validated, in a second
        cov = coverage(profile, per_step)
        print(
            f"\n{rel(profile)}: splits {sizes}; {cov['at_profile_value']} keys at the profile value, "
            f"{cov['overridden']} overridden:"
        )
        for row in cov["keys"] + cov["not_in_profile"]:
            if "override" in row:
                steps_note = "" if len(row["steps"]) == len(per_step) else f"  (only {', '.join(row['steps'])})"
                was = repr(row["profile"]) if "profile" in row else "default"
                print(f"  {row['key']}: {was} -> {row['override']!r}{steps_note}")
        for step, step_ovr in per_step.items():
            stage = step.removeprefix(prefix).replace("publish_gate", "publish")
            print(f"  {step}: {' '.join(pipeline_cmd(profile, ovr['run.name'], stage, step_ovr)[1:])}")
    if device == "cuda":
        print(f"\ngpu_bench: python -m tools.bench.gpu --budget-s {GPU_BENCH_BUDGET_S}")
    return 0


def rehearse(args: argparse.Namespace, device: str, device_name: str, per_class: int, extra: dict[str, Any]) -> int:
    """The rehearsal proper (see the module docstring); returns the exit status."""

    began = time.perf_counter()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_root = args.out.resolve()
    work = out_root / "work"
    shutil.rmtree(work, ignore_errors=True)  # the previous rehearsal's caches, runs and logs (its JSON stays)
    (work / "logs").mkdir(parents=True)
    images = args.images.resolve() if args.images and args.images.is_dir() else None
    labels = {"cpu": f"cpu: {device_name}" if device == "cpu" else "cpu of the GPU machine"}
    labels["gpu"] = f"cuda: {device_name}" if device == "cuda" else labels["cpu"]
    report: dict[str, Any] = {
        "timestamp": stamp,
        "ok": False,
        "device": {"kind": device, "name": device_name},
        "machine": machine_info(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
            "datasets": datasets.__version__,
            "cuda": torch.version.cuda,
        },
        "images": {
            "source": "real photos" if images else "generated (lib/demo/synthetic.py)",
            "folder": rel(images) if images else None,
            "per_class": per_class,
        },
        "work": rel(work),
        "split_sizes": {},
        "overrides": {},
        "coverage": {},
        "stages": [],
    }
    stages: list[dict] = report["stages"]
    cache = work / "cache"
    env = {**os.environ, **hf_env(cache)}
    server = None
    try:
        models = hub_models(args)
        log = work / "logs" / "caches.log"
        cmd = [
            sys.executable,
            "-m",
            "tools.hub_cache",
            str(cache / "hub"),
            str(cache / "datasets"),
            "--size",
            "base",
            "--per-class",
            str(per_class),
            *(["--images", str(images)] if images else []),
            "--models",
            *models,
        ]
        print(f"==> caches: {', '.join(models)}, {per_class} images per class  (log: {rel(log)})", flush=True)
        step = {"stage": "caches", **run_measured(cmd, env, log), "log": rel(log), "device": labels["cpu"]}
        step["ok"] = step.pop("rc") == 0
        step.update(json.loads(log.read_text().splitlines()[-1]) if step["ok"] else failure_text(log))
        stages.append(step)
        if not step["ok"]:
            raise RehearsalError("the offline caches could not be built")

        server, endpoint = start_moto()
        aws = {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": endpoint}
        for key in UNSET_AWS_ENV:  # this process checks the bucket too: the same fake credentials only
            os.environ.pop(key, None)
            env.pop(key, None)
        os.environ.update(aws)
        env.update(aws)
        report["registry"] = {"endpoint": endpoint, "url": f"s3://{BUCKET}/registry", "credentials": "fake"}

        photo = pick_photo(images, per_class, work)
        for profile, prefix, registry, steps in planned_runs(args):
            ovr = base_overrides(profile, device, work / "runs", registry) | extra
            out = run_profile(profile, prefix, steps, ovr, device, labels, env, work, report)
            if registry:
                publish = next(s for s in stages if s["stage"] == prefix + "publish")
                step = skipped("dashboard", "nothing was published")
                if publish.get("ok"):
                    step = dashboard_step(out, registry, publish["version"], photo, env, work)
                    report["registry"].update(version=publish["version"], uploaded_mib=publish["uploaded_mib"])
                stages.append({**step, "device": labels["cpu"]})

        if device == "cuda":
            log = work / "logs" / "gpu_bench.log"
            cmd = [
                sys.executable,
                "-m",
                "tools.bench.gpu",
                "--out",
                str(work / "bench"),
                "--budget-s",
                str(GPU_BENCH_BUDGET_S),
            ]
            print(f"==> gpu_bench  (log: {rel(log)})", flush=True)
            step = {"stage": "gpu_bench", **run_measured(cmd, env, log), "log": rel(log), "device": labels["gpu"]}
            step["ok"] = step.pop("rc") == 0
            found = sorted((work / "bench").glob("gpu-*.json"))
            report["gpu_bench"] = read_json(found[-1], default={}) if found else None
            stages.append(step)
    except RehearsalError as exc:
        report["error"] = str(exc)
        print(f"error: {exc}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        total = time.perf_counter() - began
        report["total_seconds"] = round(total, 1)
        report["ok"] = bool(stages) and "error" not in report and all(s.get("ok") is not False for s in stages)
        # moto keeps the uploaded objects in this process, so its peak includes them
        report["rehearsal_process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        path = out_root / f"{stamp}.json"
        path.write_text(json.dumps(report, indent=2, default=str))
        print_table(stages, total)
        print(f"\n{'every step passed' if report['ok'] else 'FAILED'}; report: {rel(path)}")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """Run the rehearsal (or print its plan); 0 only when every step passed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        extra = dict(parse_override(s) for s in args.overrides)
        check_overrides(extra)  # refused before anything heavy starts
    except (RehearsalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device, device_name = detect_device(args.device)
    per_class = args.images_per_class or (GPU_PER_CLASS if device == "cuda" else CPU_PER_CLASS)
    if args.dry_run:
        return dry_run(args, device, per_class, extra)
    if device == "cuda" and "dry run only" in device_name:
        print("error: --device cuda needs a CUDA machine (--dry-run shows the GPU plan)", file=sys.stderr)
        return 2
    return rehearse(args, device, device_name, per_class, extra)


if __name__ == "__main__":
    raise SystemExit(main())
