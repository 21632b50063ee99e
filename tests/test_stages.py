"""Stage records: a re-run stage clears every later stage, and no stage starts on missing or stale inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib.params import ROOT, Params, load_params
from lib.pipeline import (
    BY_NAME,
    STAGES,
    StageError,
    begin_stage,
    downstream,
    finish_stage,
    main,
    preflight,
    read_record,
    record_path,
    upstream,
)

DEMO = ROOT / "params" / "demo.yaml"
# What each stage leaves in the run folder, in miniature (every output the graph names, plus folder contents).
FAKE = {
    "prepare": {
        "data/dataset_dict.json": "{}",
        "data/summary.json": "{}",
        "data/train/data-00000-of-00001.arrow": "",
        "samples.png": "",
    },
    "train": {
        "model/config.json": "{}",
        "model/model.safetensors": "weights",
        "model/preprocessing.json": "{}",
        "checkpoints/checkpoint-3/optimizer.pt": "",
        "runs/events.out.tfevents": "",
        "train_history.json": "[]",
        "train_summary.json": "{}",
        "curves.png": "",
    },
    "evaluate": {
        "metrics.json": json.dumps({"accuracy": 0.9, "served": {"backend": "torch"}}),
        "confusion_matrix.png": "",
        "mistakes.png": "",
        "reliability.png": "",
        "model/calibration.json": json.dumps({"temperature": 1.5}),
    },
    "export": {"export/model.onnx": "", "export/model.int8.onnx": "", "export/serving.json": "{}"},
    "publish": {"publish.json": "{}"},
}


def params(tmp_path: Path, *overrides: str) -> Params:
    return load_params(DEMO, [f"run.output_root={tmp_path}", *overrides])


def fake_stage(p: Params, stage: str) -> Path:
    """Run a stage the way its notebook does: begin, write its outputs, finish."""
    out = Path(p.run.output_root) / p.run.name
    begin_stage(out, stage, p)
    for rel, text in FAKE[stage].items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    if stage == "export":  # run_export merges its results into evaluate's metrics.json
        metrics = json.loads((out / "metrics.json").read_text())
        ours = {"export": {"serving": {"file": "model.onnx"}}, "served": {"backend": "onnx"}}
        (out / "metrics.json").write_text(json.dumps({**metrics, **ours}))
    executed = out / "notebooks" / STAGES[stage]  # what the runner's papermill call leaves
    executed.parent.mkdir(parents=True, exist_ok=True)
    executed.write_text("{}")
    finish_stage(out, stage, p)
    return out


def fake_run(p: Params, stages=tuple(STAGES)) -> Path:
    for stage in stages:
        out = fake_stage(p, stage)
    return out


# --------------------------------------------------------------------------- the graph


def test_graph_order_needs_and_notebooks():
    order = list(STAGES)
    assert order == ["prepare", "train", "evaluate", "export", "publish"]
    for stage in order:
        assert all(order.index(n) < order.index(stage) for n in BY_NAME[stage].needs), stage
        assert (ROOT / "notebooks" / STAGES[stage]).is_file()
    assert upstream("publish") == ["prepare", "train", "evaluate", "export"]
    assert downstream("train") == ["evaluate", "export", "publish"] and downstream("publish") == []
    owned = [o for s in BY_NAME.values() for o in s.outputs]
    assert len(owned) == len(set(owned)), "an output belongs to one stage"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_notebook_begins_and_finishes_its_stage(stage):
    nb = json.loads((ROOT / "notebooks" / STAGES[stage]).read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and "parameters" not in c["metadata"].get("tags", [])]
    assert f'begin_stage(out, "{stage}", p)' in "".join(cells[0]["source"]), "begin in the first cell after the params"
    assert f"finish_stage(out, '{stage}', p)" in code[-1]
    assert not any("require_stage" in c for c in code)


# --------------------------------------------------------------------------- records and invalidation


def test_finish_records_times_params_and_files(tmp_path):
    p = params(tmp_path)
    out = fake_run(p)
    train = read_record(out, "train")
    assert set(train["params"]) == {"model", "train", "run.seed"} and train["params"]["train"]["epochs"] == 18
    assert train["started"] and train["finished"] and train["notebook"] == "02_train.ipynb"
    assert {"model/config.json", "checkpoints/checkpoint-3/optimizer.pt", "curves.png"} <= set(train["files"])
    assert "model/calibration.json" not in train["files"]
    assert "model/calibration.json" in read_record(out, "evaluate")["files"]
    assert read_record(out, "export")["merged"] == ["metrics.json['export']", "metrics.json['served']"]
    assert set(read_record(out, "prepare")["params"]) == {"data"}
    assert sorted(f.name for f in (out / "stages").iterdir()) == [f"{s}.json" for s in sorted(STAGES)]
    assert load_params(out / "params.yaml") == p


def test_publish_after_train_rerun_refuses_naming_evaluate(tmp_path):
    p = params(tmp_path)
    out = fake_run(p, ("prepare", "train", "evaluate"))
    fake_stage(p, "train")
    for gone in ("metrics.json", "confusion_matrix.png", "model/calibration.json", "notebooks/03_evaluate.ipynb"):
        assert not (out / gone).exists(), gone
    assert read_record(out, "evaluate") is None and read_record(out, "train") is not None
    with pytest.raises(StageError) as err:
        begin_stage(out, "publish", p)
    message = str(err.value)
    assert "stage 'evaluate' has not completed" in message
    assert "python -m lib.pipeline --params <profile> --stages evaluate,export,publish" in message
    assert not (out / "publish.json").exists() and not (tmp_path / "registry").exists()
    no_export = params(tmp_path, "export.enabled=false")
    with pytest.raises(StageError, match=r"--stages evaluate,publish$"):
        begin_stage(out, "publish", no_export)


def test_rerunning_evaluate_clears_export_and_publish(tmp_path):
    p = params(tmp_path)
    out = fake_run(p)
    removed = begin_stage(out, "evaluate", p)
    for gone in ("metrics.json", "model/calibration.json", "export", "publish.json", "notebooks/04_publish.ipynb"):
        assert not (out / gone).exists(), gone
    assert {"export/", "publish.json", "model/calibration.json", "stages/export.json"} <= set(removed)
    for kept in ("model/config.json", "model/model.safetensors", "data/summary.json", "curves.png"):
        assert (out / kept).exists(), kept
    assert [s for s in STAGES if read_record(out, s)] == ["prepare", "train"]


def test_rerunning_export_drops_only_its_part_of_metrics(tmp_path):
    p = params(tmp_path)
    out = fake_run(p)
    assert json.loads((out / "metrics.json").read_text())["served"] == {"backend": "onnx"}
    removed = begin_stage(out, "export", p)
    assert json.loads((out / "metrics.json").read_text()) == {"accuracy": 0.9}, "no export figures, none stale"
    assert {"metrics.json['export']", "metrics.json['served']"} <= set(removed)
    assert not (out / "export").exists() and not (out / "publish.json").exists()
    assert read_record(out, "evaluate") is not None and read_record(out, "publish") is None


def test_upstream_params_change_refuses_naming_the_keys(tmp_path):
    p = params(tmp_path)
    out = fake_run(p, ("prepare", "train", "evaluate"))
    with pytest.raises(StageError) as err:
        begin_stage(out, "export", params(tmp_path, "train.epochs=3", "model.freeze_layers=1"))
    message = str(err.value)
    assert "stage 'train' was produced with other params" in message
    assert "train.epochs: 18.0 when it ran, 3.0 now" in message
    assert "model.freeze_layers: 0 when it ran, 1 now" in message
    assert "--stages train,evaluate,export" in message
    assert (out / "metrics.json").exists() and read_record(out, "evaluate"), "a refusal deletes nothing"
    with pytest.raises(StageError, match=r"stage 'prepare' was produced with other params: data\.seed: 42"):
        begin_stage(out, "evaluate", params(tmp_path, "data.seed=7"))
    with pytest.raises(StageError, match=r"run\.seed"):
        begin_stage(out, "publish", params(tmp_path, "run.seed=1"))
    # Keys that do not change what a stage writes are not compared.
    begin_stage(out, "evaluate", params(tmp_path, "train.num_workers=2", "train.torch_threads=1"))


def test_record_without_its_files_or_unfinished_stage_refuses(tmp_path):
    p = params(tmp_path)
    out = fake_run(p, ("prepare", "train"))
    (out / "model" / "model.safetensors").unlink()
    with pytest.raises(StageError, match=r"stage 'train' completed, but its outputs are gone: model/model.safetensors"):
        begin_stage(out, "evaluate", p)
    begin_stage(out, "train", p)  # interrupted: begun, outputs written, never finished
    for rel, text in FAKE["train"].items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    with pytest.raises(StageError, match=r"stage 'train' has not completed \(it started at .* and did not finish\)"):
        begin_stage(out, "evaluate", p)


def test_finish_refuses_when_the_stage_wrote_nothing(tmp_path):
    p = params(tmp_path)
    out = fake_run(p, ("prepare",))
    begin_stage(out, "train", p)
    with pytest.raises(StageError, match="did not write model/config.json"):
        finish_stage(out, "train", p)
    assert not record_path(out, "train").exists()


def test_train_resume_keeps_checkpoints(tmp_path):
    p = params(tmp_path)
    out = fake_run(p, ("prepare", "train"))
    begin_stage(out, "train", params(tmp_path, "train.resume=true"))
    assert (out / "checkpoints" / "checkpoint-3").is_dir() and not (out / "model").exists()
    begin_stage(out, "train", p)
    assert not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- the runner


def cli(tmp_path, capsys, *args):
    rc = main(["--params", str(DEMO), "--set", f"run.output_root={tmp_path}", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_runner_preflight_refuses_before_anything_runs(tmp_path, capsys):
    p = params(tmp_path)
    out = fake_run(p, ("prepare", "train", "evaluate"))
    fake_stage(p, "train")
    (out / "params.yaml").write_text("left as it was\n")
    rc, _, err = cli(tmp_path, capsys, "--stages", "publish")
    assert rc == 1 and "stage 'evaluate' has not completed" in err
    assert f"--set run.output_root={tmp_path} --stages evaluate,export,publish" in err
    assert (out / "params.yaml").read_text() == "left as it was\n" and not (tmp_path / "registry").exists()

    out = fake_run(p)  # complete again; train would now drop the evaluate record that publish needs
    rc, _, err = cli(tmp_path, capsys, "--stages", "train,publish")
    assert rc == 1 and "stage 'publish' cannot start" in err and "stage 'evaluate' has not completed" in err
    assert "--stages train,evaluate,export,publish" in err
    assert (out / "metrics.json").exists() and read_record(out, "publish"), "nothing was deleted"

    rc, _, err = cli(tmp_path, capsys, "--stages", "publish", "--set", "evaluate.tta_flip=true")
    assert rc == 1 and "evaluate.tta_flip: false when it ran, true now" in err

    rc, stdout, err = cli(tmp_path, capsys, "--stages", "publish", "--set", "train.epochs=2", "--check")
    assert rc == 1 and "stages: publish" in stdout and "train.epochs: 18.0 when it ran, 2.0 now" in err

    rc, _, err = cli(tmp_path / "empty", capsys, "--stages", "evaluate")
    assert rc == 1 and "stage 'prepare' has not completed" in err and "stage 'train' has not completed" in err


def test_preflight_accepts_a_plan_that_makes_what_it_needs(tmp_path):
    p = params(tmp_path)
    out = fake_run(p, ("prepare", "train"))
    preflight(out, ["evaluate", "export", "publish"], p)
    preflight(out, ["train", "evaluate", "publish"], params(tmp_path, "train.epochs=2", "export.enabled=false"))
    with pytest.raises(StageError, match="stage 'export' has not completed"):
        preflight(out, ["evaluate", "publish"], p)


def test_begin_and_finish_from_the_command_line(tmp_path, capsys):
    """A run folder made without records (or a stage run by hand on several machines) is recorded stage by stage."""
    out = tmp_path / "demo"
    for stage in ("prepare", "train"):
        for rel, text in FAKE[stage].items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(text)
    rc, _, err = cli(tmp_path, capsys, "--finish", "train")
    assert rc == 1 and "stage 'prepare' has not completed" in err
    assert cli(tmp_path, capsys, "--finish", "prepare")[0] == 0
    assert cli(tmp_path, capsys, "--finish", "train")[0] == 0
    assert read_record(out, "train")["params"]["train"]["epochs"] == 18
    assert cli(tmp_path, capsys, "--begin", "train")[0] == 0
    assert not (out / "model").exists() and read_record(out, "train") is None


# --------------------------------------------------------------------------- through the real notebooks


def run_cli(*args, timeout=900):
    cmd = [sys.executable, "-m", "lib.pipeline", "--params", str(DEMO), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.integration
def test_retrained_run_is_not_published_with_stale_metrics(tmp_path):
    """prepare, train, evaluate; train again; publish refuses (runner and notebook) and the registry stays empty."""
    from test_pipeline import shrunk as shrunk_demo  # the shrunken demo profile of the pipeline tests

    shrunk = shrunk_demo(tmp_path)
    out = tmp_path / "outputs" / "demo"
    res = run_cli("--stages", "prepare,train,evaluate", *shrunk)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [s for s in STAGES if read_record(out, s)] == ["prepare", "train", "evaluate"]
    assert (out / "model" / "calibration.json").is_file()
    owned = {o.split("/")[0] for s in BY_NAME.values() for o in s.outputs}
    assert {p.name for p in out.iterdir()} <= owned | {"params.yaml", "notebooks", "stages"}, "an output no stage owns"

    res = run_cli("--stages", "train", *shrunk)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (out / "metrics.json").exists() and not (out / "model" / "calibration.json").exists()

    res = run_cli("--stages", "publish", *shrunk)
    assert res.returncode != 0
    assert "stage 'evaluate' has not completed" in res.stderr and "--stages evaluate" in res.stderr
    assert not (tmp_path / "registry").exists() and not (out / "publish.json").exists()

    # The notebook refuses by itself too, as when it is run by hand in JupyterLab.
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError, match="stage 'evaluate' has not completed"):
        pm.execute_notebook(
            str(ROOT / "notebooks" / STAGES["publish"]),
            str(tmp_path / "publish.ipynb"),
            parameters={"params_file": str(out / "params.yaml"), "overrides": []},
            cwd=str(ROOT / "notebooks"),
            kernel_name="python3",
            progress_bar=False,
        )
    assert not (tmp_path / "registry").exists() and not (out / "publish.json").exists()
