"""Pipeline runner and stage graph: validate params, then execute the stage notebooks in order with papermill.

`GRAPH` is the one description of the stages: their order, notebook, the stages each needs, the params each
depends on and every file or folder each writes into the run folder. Every stage notebook calls `begin_stage`
in its first code cell and `finish_stage` in its last one, so the rules hold under the runner and in JupyterLab:

- begin refuses (StageError) when a stage it needs has no completion record, or when the params an upstream
  stage's outputs depend on differ from the current ones; then it deletes the outputs and records of this stage
  and of every stage after it, before any work is done. A re-run stage thus never leaves later stages' results
  (metrics, ONNX files, temperature) next to outputs they were not computed from.
- finish writes `<run>/stages/<stage>.json`: start and finish times, the params the stage depends on, the files
  it wrote.

The runner streams each stage's printed output (training progress included) to its own stdout and stderr, line by
line, while the stage runs; the executed notebook is written as well.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from lib.files import read_json, write_json
from lib.params import (
    ROOT,
    Params,
    ParamsError,
    dump_params,
    explain,
    flatten,
    load_params,
    parse_override,
    run_dir,
    save_params,
)

NOTEBOOKS = ROOT / "notebooks"
RECORDS = "stages"  # <run>/stages/<stage>.json once completed, <stage>.running.json while it runs
HOW = "--params <profile>"  # how the run was invoked, for the command in a refusal; the runner fills it in
PROJECT_KERNEL = "har-vit"  # `make setup`: python -m ipykernel install --sys-prefix --name har-vit
FALLBACK_KERNEL = "python3"  # ipykernel's own kernel: the interpreter running the runner
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One stage: its notebook, the stages it needs, the params it depends on, what it writes in the run folder."""

    name: str
    notebook: str
    needs: tuple[str, ...]  # earlier stages whose outputs it reads; one switched off (`enabled: false`) is not required
    params: tuple[str, ...]  # params sections ("data") or keys ("run.seed") its outputs depend on
    outputs: tuple[str, ...]  # files and folders it writes; all deleted when it or an earlier stage runs again
    markers: tuple[str, ...]  # files that exist once it completed
    merged: tuple[tuple[str, str], ...] = ()  # (another stage's JSON file, key) it merges its results into


GRAPH: tuple[Stage, ...] = (
    Stage(
        "prepare",
        "01_prepare_data.ipynb",
        needs=(),
        params=("data",),  # run.seed only picks the images shown in samples.png
        outputs=("data", "samples.png"),
        markers=("data/dataset_dict.json", "data/summary.json"),
    ),
    Stage(
        "train",
        "02_train.ipynb",
        needs=("prepare",),
        params=("model", "train", "run.seed"),
        outputs=("model", "checkpoints", "runs", "train_history.json", "train_summary.json", "curves.png"),
        markers=("model/config.json", "model/model.safetensors", "model/preprocessing.json"),
    ),
    Stage(
        "evaluate",
        "03_evaluate.ipynb",
        needs=("prepare", "train"),
        params=("evaluate",),
        # calibration.json goes into train's model/ folder: that one file is evaluate's, the folder is train's
        outputs=("metrics.json", "confusion_matrix.png", "mistakes.png", "reliability.png", "model/calibration.json"),
        markers=("metrics.json", "confusion_matrix.png"),
    ),
    Stage(
        "export",
        "03b_export.ipynb",
        needs=("prepare", "train", "evaluate"),
        params=("export",),
        outputs=("export",),
        markers=("export/serving.json",),
        # export also replaces evaluate's metrics.json["served"] (the PyTorch model) with the ONNX file's figures:
        # evaluate's entry cannot be restored, so invalidating export leaves none rather than a stale one
        merged=(("metrics.json", "export"), ("metrics.json", "served")),
    ),
    Stage(
        "publish",
        "04_publish.ipynb",
        needs=("evaluate", "export"),
        params=("publish",),
        outputs=("publish.json",),  # the registry version it uploaded is immutable and stays
        markers=("publish.json",),
    ),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in GRAPH}
STAGES: dict[str, str] = {s.name: s.notebook for s in GRAPH}  # name -> notebook, in pipeline order
# Keys that change how a stage runs, not what it writes: a difference in them makes no output stale (so they are
# the only keys in which params.yaml may differ from the params that produced the folder's outputs).
RUN_ONLY_KEYS = frozenset(
    {
        "train.resume",
        "train.num_workers",
        "train.torch_threads",
        "train.report_to",  # trackers only receive the numbers; nothing downstream reads runs/
        "evaluate.num_workers",
        "export.enabled",
        "publish.enabled",
    }
)
_PLANNED: dict = {"planned": True}  # pre-flight's stand-in for the record a planned stage will leave
_ABSENT = object()


class StageError(RuntimeError):
    """A stage failed or cannot start."""


def upstream(stage: str) -> list[str]:
    """Every stage that `stage` needs, directly or through another one, in pipeline order."""
    found: set[str] = set()
    todo = list(BY_NAME[stage].needs)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += BY_NAME[name].needs
    return [s for s in STAGES if s in found]


def downstream(stage: str) -> list[str]:
    """Every stage that needs `stage`, directly or through another one, in pipeline order."""
    return [s for s in STAGES if stage in upstream(s)]


def enabled(stage: str, params: Params) -> bool:
    """Whether the params switch the stage on (only export and publish have an `enabled` key)."""
    return bool(getattr(getattr(params, stage, None), "enabled", True))


def stage_params(params: Params, stage: str) -> dict[str, Any]:
    """The params a stage's outputs depend on, e.g. {"model": {...}, "train": {...}, "run.seed": 42}."""
    tree = params.model_dump(mode="json")
    picked = {}
    for spec in BY_NAME[stage].params:
        node = tree
        for part in spec.split("."):
            node = node[part]
        picked[spec] = node
    return picked


def params_diff(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: <value then> when it ran, <value now> now' for each dotted key that differs (run-only keys ignored)."""
    old = {k: v for spec, sub in recorded.items() for k, v in flatten(sub, f"{spec}.").items()}
    new = {k: v for spec, sub in current.items() for k, v in flatten(sub, f"{spec}.").items()}
    keys = sorted(old.keys() | new.keys())
    differ = [k for k in keys if k not in RUN_ONLY_KEYS and old.get(k, _ABSENT) != new.get(k, _ABSENT)]
    show = lambda tree, k: json.dumps(tree[k]) if k in tree else "(absent)"  # noqa: E731
    return [f"{k}: {show(old, k)} when it ran, {show(new, k)} now" for k in differ]


def record_path(out: Path, stage: str) -> Path:
    """Where the stage's completion record lives."""
    return Path(out) / RECORDS / f"{stage}.json"


def _running_path(out: Path, stage: str) -> Path:
    return Path(out) / RECORDS / f"{stage}.running.json"


def read_record(out: Path, stage: str) -> dict | None:
    """The stage's completion record, or None when it has not completed."""
    record = read_json(record_path(out, stage), default=None)
    return record if isinstance(record, dict) else None


def _records(out: Path) -> dict[str, dict]:
    return {name: record for name in STAGES if (record := read_record(out, name)) is not None}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def missing_outputs(out: Path, stage: str) -> list[str]:
    """The marker files of a stage that are not in the run folder."""
    return [f for f in BY_NAME[stage].markers if not (Path(out) / f).exists()]


def require_stage(out: Path, stage: str) -> None:
    """Raise StageError unless the stage and the stages it needs left their marker files.

    Files only: stage notebooks call begin_stage, which also requires completion records and matching params.
    """
    for needed in (*upstream(stage), stage):
        missing = missing_outputs(Path(out), needed)
        if missing:
            raise StageError(
                f"stage '{needed}' has not completed in {out}: missing {', '.join(missing)}. "
                f"Run it first: python -m lib.pipeline {HOW} --stages {needed}"
            )


def _problems(out: Path, stage: str, params: Params, records: dict[str, dict]) -> list[tuple[str, str]]:
    """(upstream stage, what is wrong with it) for every upstream stage that keeps `stage` from starting."""
    found = []
    for up in upstream(stage):
        record = records.get(up)
        if record is None:
            if enabled(up, params):
                running = read_json(_running_path(out, up), default=None)
                since = ""
                if isinstance(running, dict):
                    since = f" (it started at {running.get('started')} and did not finish)"
                found.append((up, f"stage '{up}' has not completed{since}"))
            continue
        if record is _PLANNED:
            continue
        missing = missing_outputs(out, up)
        if missing:
            found.append((up, f"stage '{up}' completed, but its outputs are gone: {', '.join(missing)}"))
        # Every record in the folder is compared, a switched-off stage's too: its outputs would still be published.
        diff = params_diff(record.get("params") or {}, stage_params(params, up))
        if diff:
            found.append((up, f"stage '{up}' was produced with other params: " + "; ".join(diff)))
    return found


def _refusal(
    out: Path, stage: str, problems: list[tuple[str, str]], params: Params, how: str, plan: list[str] | None = None
) -> str:
    """The StageError message: what is wrong, and the command that re-runs from the first stage at fault."""
    order = list(STAGES)
    first = min((name for name, _ in problems), key=order.index)
    span = order[order.index(first) : order.index(stage) + 1]
    rerun = [s for s in order if (s in span or s in (plan or [])) and (enabled(s, params) or s == first)]
    lines = [f"stage '{stage}' cannot start in {out}:", *(f"  - {text}" for _, text in problems)]
    lines.append(f"Re-run from '{first}': python -m lib.pipeline {how} --stages {','.join(rerun)}")
    return "\n".join(lines)


def _remove(path: Path) -> bool:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return False
    return True


def _drop_key(path: Path, key: str) -> bool:
    data = read_json(path, default=None)
    if not isinstance(data, dict) or key not in data:
        return False
    del data[key]
    write_json(path, data)
    return True


def _kept(stage: str, params: Params) -> tuple[str, ...]:
    """Outputs a re-run keeps: train.resume continues from the checkpoints (and TensorBoard events) of the run."""
    return ("checkpoints", "runs") if stage == "train" and params.train.resume else ()


def invalidate(out: Path, stage: str, keep: tuple[str, ...] = ()) -> list[str]:
    """Delete the outputs and records of `stage` and of every stage after it; return what was removed."""
    out = Path(out)
    removed = []
    for name in (stage, *downstream(stage)):
        spec = BY_NAME[name]
        paths = [rel for rel in spec.outputs if rel not in keep]
        if name != stage:
            # A later stage's executed notebook shows results that are gone. The stage's own is left alone:
            # under the runner papermill is writing it right now.
            paths.append(f"notebooks/{spec.notebook}")
        for rel in paths:
            is_dir = (out / rel).is_dir()
            if _remove(out / rel):
                removed.append(rel + "/" if is_dir else rel)
        removed += [f"{file}[{key!r}]" for file, key in spec.merged if _drop_key(out / file, key)]
        for path in (record_path(out, name), _running_path(out, name)):
            if _remove(path):
                removed.append(path.relative_to(out).as_posix())
    return removed


def begin_stage(out: Path, stage: str, params: Params, how: str = HOW) -> list[str]:
    """Start a stage: refuse if a stage it needs is missing or stale, else clear it and every later stage.

    Raises StageError naming the stage at fault, the differing keys and the command to re-run. Returns the removed
    paths (relative to the run folder). Also writes the params to `<run>/params.yaml`.
    """
    out = Path(out)
    problems = _problems(out, stage, params, _records(out))
    if problems:
        raise StageError(_refusal(out, stage, problems, params, how))
    removed = invalidate(out, stage, _kept(stage, params))
    write_json(_running_path(out, stage), {"stage": stage, "started": _now(), "params": stage_params(params, stage)})
    # Every record left in the folder now agrees with these params on the keys its outputs depend on (checked
    # above; the rest was just deleted), so params.yaml cannot describe params that did not produce the folder.
    save_params(params, out / "params.yaml")
    if removed:
        print(f"{stage}: removed the earlier outputs of this and later stages: {', '.join(removed)}")
    return removed


def _files(out: Path, rel: str) -> list[str]:
    path = out / rel
    if path.is_dir():
        return sorted(p.relative_to(out).as_posix() for p in path.rglob("*") if p.is_file())
    return [rel] if path.is_file() else []


def finish_stage(out: Path, stage: str, params: Params, how: str = HOW) -> Path:
    """Record the stage as completed (times, the params it depends on, the files it wrote); return the record's path.

    Refuses when the stage's marker files are missing, or when a stage it needs is no longer complete and current.
    """
    out = Path(out)
    problems = _problems(out, stage, params, _records(out))
    if problems:
        raise StageError(_refusal(out, stage, problems, params, how))
    missing = missing_outputs(out, stage)
    if missing:
        raise StageError(f"stage '{stage}' did not write {', '.join(missing)} in {out}: not recording it as completed")
    spec = BY_NAME[stage]
    running = read_json(_running_path(out, stage), default=None)
    record = {
        "stage": stage,
        "notebook": spec.notebook,
        "started": running.get("started") if isinstance(running, dict) else None,
        "finished": _now(),
        "params": stage_params(params, stage),
        "files": [f for rel in spec.outputs for f in _files(out, rel)],
    }
    if spec.merged:
        record["merged"] = [
            f"{file}[{key!r}]" for file, key in spec.merged if key in (read_json(out / file, default=None) or {})
        ]
    write_json(record_path(out, stage), record)
    _running_path(out, stage).unlink(missing_ok=True)
    return record_path(out, stage)


def preflight(out: Path, plan: list[str], params: Params, how: str = HOW) -> None:
    """Raise StageError before anything runs when a planned stage would find a stage it needs missing or stale.

    Plays the plan on the records: each planned stage drops its own and later stages' records and leaves a fresh
    one, so `--stages train,publish` refuses because train would drop the evaluate record that publish needs.
    """
    records = _records(Path(out))
    for stage in plan:
        problems = _problems(Path(out), stage, params, records)
        if problems:
            raise StageError(_refusal(Path(out), stage, problems, params, how, plan))
        for name in (stage, *downstream(stage)):
            records.pop(name, None)
        records[stage] = _PLANNED


def stage_plan(params: Params, stages: list[str]) -> list[str]:
    """The stages to run, in pipeline order, skipping disabled ones."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ParamsError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    return [s for s in STAGES if s in stages and enabled(s, params)]


def kernel_name() -> str:
    """The project's kernel when it is registered for this interpreter, else ipykernel's python3 (a bare venv)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(PROJECT_KERNEL)
    except NoSuchKernel:
        return FALLBACK_KERNEL
    # A har-vit kernel found elsewhere (~/.local, another checkout's venv) would run another interpreter and import
    # that checkout's lib. Paths are compared unresolved: every venv's python links to the same system binary.
    exe = Path(spec.argv[0]) if spec.argv else Path()
    if exe.is_absolute() and exe.is_relative_to(sys.prefix):
        return PROJECT_KERNEL
    log.warning("kernel %r runs %s, not this environment's Python; using %r", PROJECT_KERNEL, exe, FALLBACK_KERNEL)
    return FALLBACK_KERNEL


class StageOutput:
    """A file-like sink for one stream of a stage's kernel: writes whole lines to `stream`, prefixed with the stage.

    papermill hands it each chunk the kernel sends, which may end mid-line. A line redrawn with carriage returns
    (a tqdm bar) is written once, as it last looked, when its newline comes.
    """

    def __init__(self, stage: str, stream: TextIO):
        self.prefix = f"[{stage}] "
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:  # papermill flushes after every chunk: a partial line waits for its end
        self.stream.flush()

    def close(self) -> None:
        """Write what is left of an unterminated last line."""
        if self.pending:
            self._emit(self.pending)
            self.pending = ""

    def _emit(self, line: str) -> None:
        self.stream.write(self.prefix + line.rstrip("\r").rsplit("\r", 1)[-1] + "\n")
        self.stream.flush()


def run_stage(stage: str, params_file: Path, out: Path) -> Path:
    """Execute one stage notebook with papermill into out/notebooks, streaming its output; StageError on failure."""
    import papermill as pm

    target = out / "notebooks" / STAGES[stage]
    target.parent.mkdir(parents=True, exist_ok=True)
    sinks = StageOutput(stage, sys.stdout), StageOutput(stage, sys.stderr)
    try:
        # The kernel's own stdout and stderr go to the sinks as they arrive (training prints a line per logging
        # step and per epoch). papermill's log_output would log each chunk as it comes, partial lines and tqdm
        # redraws included, and its per-cell bar would cut through the lines, so both stay off.
        pm.execute_notebook(
            str(NOTEBOOKS / STAGES[stage]),
            str(target),
            parameters={"params_file": str(params_file), "overrides": []},
            cwd=str(NOTEBOOKS),
            kernel_name=kernel_name(),
            progress_bar=False,
            log_output=False,
            stdout_file=sinks[0],
            stderr_file=sinks[1],
        )
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's error
        reason = getattr(exc, "ename", type(exc).__name__) + ": " + str(getattr(exc, "evalue", exc))
        raise StageError(f"stage '{stage}' failed; executed notebook: {target}\n{reason}") from None
    finally:
        for sink in sinks:
            sink.close()
    return target


def run_pipeline(params: Params, stages: list[str], how: str = HOW) -> Path:
    """Check the plan, save the resolved params into the run folder and execute the planned stages in order."""
    out = run_dir(params)
    plan = stage_plan(params, stages)
    preflight(out, plan, params, how)
    if not plan:
        return out
    # Pre-flight compared every record this leaves with these params and this deletes the rest (as the first stage's
    # begin_stage would), so params.yaml cannot describe params that did not produce the folder's outputs, even
    # when that stage fails before its first cell.
    invalidate(out, plan[0], _kept(plan[0], params))
    params_file = save_params(params, out / "params.yaml")
    for stage in plan:
        start = time.time()
        print(f"==> {stage}: {STAGES[stage]}", flush=True)
        run_stage(stage, params_file, out)
        print(f"<== {stage} done in {time.time() - start:.0f} s", flush=True)
    return out


def sweep_overrides(sweeps: list[str]) -> list[tuple[str, list[str]]]:
    """Expand 'key=v1,v2' sweeps into (run-name suffix, overrides) pairs, one per combination."""
    axes = []
    for text in sweeps:
        key, value = parse_override(text)
        raw = text.split("=", 1)[1]
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise ParamsError(f"sweep {text!r} lists no values")
        axes.append([(key, v) for v in values])
    combos = []
    for combo in itertools.product(*axes):
        suffix = "-".join(f"{k.split('.')[-1]}{v}" for k, v in combo)
        combos.append((suffix, [f"{k}={v}" for k, v in combo]))
    return combos


def _how(params_file: str, overrides: list[str]) -> str:
    """The runner arguments that reproduce a run, for the command in a refusal."""
    return " ".join(["--params", shlex.quote(params_file), *(f"--set {shlex.quote(o)}" for o in overrides)])


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m lib.pipeline --params FILE [--stages a,b] [--set k=v] [--run NAME] [--sweep k=v1,v2]
    [--check | --explain | --begin STAGE | --finish STAGE]."""
    parser = argparse.ArgumentParser(prog="python -m lib.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(ROOT / "params" / "demo.yaml"), help="YAML profile")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", help="run name (outputs/<run>/); default: run.name from the params")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="one run per value")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only validate params, print the plan and pre-flight it")
    mode.add_argument("--explain", action="store_true", help="print every key: resolved value, default, description")
    # For a stage run outside the runner (training launched on several machines by hand) or a run folder made
    # before completion records existed: what the stage notebook's first and last cells do.
    mode.add_argument("--begin", choices=list(STAGES), metavar="STAGE", help="check a stage's inputs, clear outputs")
    mode.add_argument("--finish", choices=list(STAGES), metavar="STAGE", help="record a stage as completed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    base = args.overrides + ([f"run.name={args.run}"] if args.run else [])
    try:
        runs = [(None, base)]
        if args.sweep:
            name = load_params(args.params, base).run.name
            runs = [
                (f"{name}-{sfx}", base + ovr + [f"run.name={name}-{sfx}"]) for sfx, ovr in sweep_overrides(args.sweep)
            ]
        resolved = [load_params(args.params, ovr) for _, ovr in runs]
        plans = [stage_plan(p, stages) for p in resolved]
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hows = [_how(args.params, ovr) for _, ovr in runs]
    for params, plan, how in zip(resolved, plans, hows):
        try:
            if args.explain:
                print(f"# python -m lib.pipeline {how}\n{explain(params)}")
            elif args.check:
                print(dump_params(params))
                print(f"run folder: {run_dir(params)}")
                print(f"stages: {' -> '.join(plan) or '(none)'}")
                preflight(run_dir(params), plan, params, how)
                print("pre-flight: ok")
            elif args.begin:
                begin_stage(run_dir(params), args.begin, params, how)
                print(f"began {args.begin} in {run_dir(params)}")
            elif args.finish:
                print(f"recorded {finish_stage(run_dir(params), args.finish, params, how)}")
            else:
                print(f"results in {run_pipeline(params, stages, how)}")
        except StageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
