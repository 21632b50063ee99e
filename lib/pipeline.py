"""Pipeline runner: validate params, then execute the stage notebooks in order with papermill."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

from lib.params import ROOT, Params, ParamsError, dump_params, load_params, parse_override, run_dir, save_params

NOTEBOOKS = ROOT / "notebooks"
STAGES: dict[str, str] = {
    "prepare": "01_prepare_data.ipynb",
    "train": "02_train.ipynb",
    "evaluate": "03_evaluate.ipynb",
    "export": "03b_export.ipynb",
    "publish": "04_publish.ipynb",
}
# Files a stage leaves behind when it completed; later stages check them before starting.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("data/dataset_dict.json", "data/summary.json"),
    "train": ("model/config.json", "model/model.safetensors", "model/preprocessing.json"),
    "evaluate": ("metrics.json", "confusion_matrix.png"),
    "export": ("export/serving.json",),
    "publish": ("publish.json",),
}
NEEDS: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "train": ("prepare",),
    "evaluate": ("prepare", "train"),
    "export": ("prepare", "train", "evaluate"),
    "publish": ("evaluate",),
}


class StageError(RuntimeError):
    """A stage failed or cannot start."""


def missing_outputs(out: Path, stage: str) -> list[str]:
    """The expected outputs of a stage that are not in the run folder."""
    return [f for f in STAGE_OUTPUTS[stage] if not (out / f).exists()]


def require_stage(out: Path, stage: str) -> None:
    """Raise StageError unless the given stage (and what it needs) completed in the run folder."""
    for needed in (*NEEDS[stage], stage):
        missing = missing_outputs(Path(out), needed)
        if missing:
            raise StageError(
                f"stage '{needed}' has not completed in {out}: missing {', '.join(missing)}. "
                f"Run it first: python -m lib.pipeline --params <profile> --stages {needed}"
            )


def stage_plan(params: Params, stages: list[str]) -> list[str]:
    """The stages to run, in pipeline order, skipping disabled ones."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ParamsError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    plan = [s for s in STAGES if s in stages]
    if not params.export.enabled:
        plan = [s for s in plan if s != "export"]
    if not params.publish.enabled:
        plan = [s for s in plan if s != "publish"]
    return plan


def run_stage(stage: str, params_file: Path, out: Path) -> Path:
    """Execute one stage notebook with papermill into out/notebooks; raise StageError on failure."""
    import papermill as pm

    target = out / "notebooks" / STAGES[stage]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(
            str(NOTEBOOKS / STAGES[stage]),
            str(target),
            parameters={"params_file": str(params_file), "overrides": []},
            cwd=str(NOTEBOOKS),
            kernel_name="python3",
            progress_bar=True,
            log_output=False,
        )
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's error
        reason = getattr(exc, "ename", type(exc).__name__) + ": " + str(getattr(exc, "evalue", exc))
        raise StageError(f"stage '{stage}' failed; executed notebook: {target}\n{reason}") from None
    return target


def run_pipeline(params: Params, stages: list[str]) -> Path:
    """Save the resolved params into the run folder and execute the planned stages in order."""
    out = run_dir(params)
    plan = stage_plan(params, stages)
    if plan and plan[0] != "prepare":
        require_stage(out, NEEDS[plan[0]][-1]) if NEEDS[plan[0]] else None
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


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m lib.pipeline --params FILE [--stages a,b] [--set k=v] [--run NAME] [--sweep k=v1,v2] [--check]."""
    parser = argparse.ArgumentParser(prog="python -m lib.pipeline", description=__doc__)
    parser.add_argument("--params", default=str(ROOT / "params" / "demo.yaml"), help="YAML profile")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", help="run name (outputs/<run>/); default: run.name from the params")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="one run per value")
    parser.add_argument("--check", action="store_true", help="only validate params and print the plan")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    base = args.overrides + ([f"run.name={args.run}"] if args.run else [])
    try:
        runs = [(None, base)]
        if args.sweep:
            name = load_params(args.params, base).run.name
            runs = [(f"{name}-{sfx}", base + ovr + [f"run.name={name}-{sfx}"]) for sfx, ovr in sweep_overrides(args.sweep)]
        resolved = [load_params(args.params, ovr) for _, ovr in runs]
        plans = [stage_plan(p, stages) for p in resolved]
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for params, plan in zip(resolved, plans):
            print(dump_params(params))
            print(f"run folder: {run_dir(params)}")
            print(f"stages: {' -> '.join(plan) or '(none)'}")
        return 0
    for params in resolved:
        try:
            out = run_pipeline(params, stages)
        except StageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
