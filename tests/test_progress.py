"""Progress where people look: the runner streams stage output while it runs, training prints plain lines,
TensorBoard event files land in the run folder, and JupyterLab and the runner use the project's kernel."""

import io
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest
import torch
from test_train import prepared_run, tiny_params  # one tiny run folder recipe for the training tests

from lib import pipeline as P
from lib import train as T
from lib.params import ROOT, ParamsError, TrainParams, load_params, run_dir

torch.set_num_threads(2)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


# --------------------------------------------------------------------------- the callback's lines


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def state(**fields):
    from transformers import TrainerState

    return TrainerState(max_steps=100, num_train_epochs=4, **fields)


def test_progress_lines_read_step_epoch_loss_lr_speed_and_time_left():
    clock, lines = Clock(), []
    callback = T.progress_callback_class()(clock=clock, emit=lines.append)
    st = state(global_step=0, epoch=0.0)
    callback.on_train_begin(None, st, None)
    st.global_step, st.epoch, clock.now = 10, 0.4, 105.0  # 2 steps/s, 90 steps to go
    callback.on_log(None, st, None, logs={"loss": 2.71828, "grad_norm": 1.0, "learning_rate": 0.0012, "epoch": 0.4})
    st.global_step, st.epoch, clock.now = 25, 1.0, 112.5
    callback.on_evaluate(None, st, None, metrics={"eval_loss": 1.23456, "eval_accuracy": 0.5, "epoch": 1.0})
    callback.on_log(None, st, None, logs={"eval_loss": 1.23456, "eval_accuracy": 0.5, "epoch": 1.0})  # not twice
    st.global_step, st.epoch, st.best_metric = 100, 4.0, 0.875
    callback.on_log(None, st, None, logs={"train_runtime": 3723.4, "train_loss": 1.1, "epoch": 4.0})
    assert lines == [
        "step 10/100 (10%) | epoch 0.40/4 | loss 2.7183 | lr 1.20e-03 | 2 it/s | 0:45 left",
        "epoch 1/4 | val accuracy 0.5000 | val loss 1.2346 | step 25/100 (25%) | 0:38 left",
        "done: 100 steps in 1:02:03 | train loss 1.1000 | best val accuracy 0.8750",
    ]


def test_progress_lines_resumed_run_and_other_ranks():
    clock, lines = Clock(), []
    callback = T.progress_callback_class()(clock=clock, emit=lines.append)
    st = state(global_step=40, epoch=1.6)
    callback.on_train_begin(None, st, None)  # resumed at step 40: its speed counts from there
    callback.on_log(None, st, None, logs={"loss": 1.0})
    st.global_step, st.epoch, clock.now = 50, 2.0, 110.0
    callback.on_log(None, st, None, logs={"loss": 0.9})
    worker = state(global_step=50, epoch=2.0, is_world_process_zero=False)
    callback.on_log(None, worker, None, logs={"loss": 0.9})
    callback.on_evaluate(None, worker, None, metrics={"eval_accuracy": 0.5})
    assert lines == [
        "step 40/100 (40%) | epoch 1.60/4 | loss 1.0000 | - it/s | - left",
        "step 50/100 (50%) | epoch 2/4 | loss 0.9000 | 1 it/s | 0:50 left",
    ]
    assert T.format_duration(59.6) == "1:00" and T.format_duration(3600) == "1:00:00"


# --------------------------------------------------------------------------- tracking


def test_report_to_accepts_a_name_or_a_list_and_reaches_the_trainer(tmp_path):
    assert TrainParams().report_to == ["tensorboard"]
    assert TrainParams(report_to="wandb").report_to == ["wandb"]
    assert TrainParams(report_to=["tensorboard", "mlflow"]).report_to == ["tensorboard", "mlflow"]
    args = T.training_arguments(TrainParams(report_to="none", precision="fp32"), tmp_path / "run", 0)
    assert args.report_to == [] and args.run_name == "run"
    for bad in ("train.report_to=tensorbord", "train.report_to=[none,wandb]"):
        with pytest.raises(ParamsError, match="report_to"):
            load_params(ROOT / "params" / "demo.yaml", [bad])
    for profile in ("demo", "har_vit", "har_vit_reference"):
        assert load_params(ROOT / "params" / f"{profile}.yaml").train.report_to == ["tensorboard"], profile


def test_report_to_makes_no_output_stale_and_resume_keeps_the_events(tmp_path):
    demo = ROOT / "params" / "demo.yaml"
    p = load_params(demo, [f"run.output_root={tmp_path}"])
    before = P.stage_params(p, "train")
    del before["train"]["report_to"]  # a record written before the key existed
    untracked = load_params(demo, [f"run.output_root={tmp_path}", "train.report_to=none"])
    assert P.params_diff(before, P.stage_params(untracked, "train")) == []
    out = run_dir(p)
    for marker in P.BY_NAME["prepare"].markers:
        (out / marker).parent.mkdir(parents=True, exist_ok=True)
        (out / marker).write_text("{}")
    P.finish_stage(out, "prepare", p)
    events = out / "runs" / "events.out.tfevents.1.host.0"
    events.parent.mkdir()
    events.write_bytes(b"")
    P.begin_stage(out, "train", load_params(demo, [f"run.output_root={tmp_path}", "train.resume=true"]))
    assert events.exists()  # a resumed run continues the same curves
    P.begin_stage(out, "train", p)
    assert not (out / "runs").exists()


def test_tiny_training_prints_plain_lines_and_writes_event_files_to_runs(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = prepared_run(tmp_path)
    capsys.readouterr()  # the datasets bars of save_to_disk above
    T.train(tiny_params(tmp_path, epochs=2), out)
    printed = capsys.readouterr()
    assert "\r" not in printed.out
    assert not re.search(r"\d+/20 \[", printed.err), printed.err  # outside a notebook no tqdm bar over the 20 steps
    assert re.search(r"^step 10/20 \(50%\) \| epoch 1/2 \| loss \d+\.\d{4} \| lr ", printed.out, re.M), printed.out
    for epoch in (1, 2):
        assert re.search(rf"^epoch {epoch}/2 \| val accuracy [01]\.\d{{4}} \| val loss ", printed.out, re.M)
    assert re.search(r"^done: 20 steps in \d+:\d\d \| train loss ", printed.out, re.M)

    events = sorted((out / "runs").glob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if "events" in p.name)
    assert not list((out / "checkpoints").rglob("events.out.tfevents.*"))
    tags = EventAccumulator(str(out / "runs")).Reload().Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/accuracy", "eval/loss"} <= set(tags), tags


# --------------------------------------------------------------------------- the runner


def test_stage_output_writes_whole_lines_once_each():
    stream = io.StringIO()
    sink = P.StageOutput("train", stream)
    sink.write("first li")
    sink.flush()  # papermill flushes after each chunk: half a line is not written yet
    assert stream.getvalue() == ""
    sink.write("ne\nbar  10%\rbar  50%\r")
    sink.write("bar 100%\r\nlast, unterminated")
    sink.close()
    assert stream.getvalue() == "[train] first line\n[train] bar 100%\n[train] last, unterminated\n"


def test_torchrun_output_is_split_at_newlines_only():
    # torchrun's output reaches the notebook through T.stream: a bar's redraws stay one line for the sink above
    code = "import sys; sys.stdout.write('bar 10%\\rbar 100%\\n'); sys.stdout.flush(); print('next')"
    assert list(T.stream([sys.executable, "-c", code])) == ["bar 10%\rbar 100%\n", "next\n"]


@pytest.mark.integration
def test_runner_streams_training_progress_while_the_stage_runs(tmp_path):
    settings = [
        f"run.output_root={tmp_path / 'outputs'}",
        "data.embedded.images_per_class=10",
        "data.val_fraction=0.15",
        "data.test_fraction=0.2",
        "train.epochs=2",
        "train.batch_size=8",  # about 12 steps per epoch: logging steps 10 and 20 print a line each
    ]
    cmd = [
        sys.executable,
        "-m",
        "lib.pipeline",
        "--params",
        str(ROOT / "params" / "demo.yaml"),
        "--stages",
        "prepare,train",
        *(arg for s in settings for arg in ("--set", s)),
    ]
    out = tmp_path / "outputs" / "demo"
    with open(tmp_path / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(600, proc.kill)
        watchdog.start()
        lines, seen_live = [], None
        try:
            for line in proc.stdout:
                lines.append(line)
                if seen_live is None and line.startswith("[train] epoch 1/2 | val accuracy"):
                    # Streamed, not replayed: the stage has not finished (no record, epoch 2 still to train).
                    seen_live = not P.record_path(out, "train").exists()
            rc = proc.wait()
        finally:
            watchdog.cancel()
        err.seek(0)
        stderr = err.read()
    stdout = "".join(lines)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert seen_live is True, stdout[-3000:]
    assert "\r" not in stdout
    assert re.search(r"^\[prepare\] ", stdout, re.M)
    step_line = r"^\[train\] step 10/\d+ \(\d+%\) \| epoch 0\.\d\d/2 \| loss .* it/s \| \d+:\d\d left$"
    assert re.search(step_line, stdout, re.M), stdout[-3000:]
    assert re.search(r"^\[train\] epoch 2/2 \| val accuracy [01]\.\d{4} \|", stdout, re.M)
    assert stdout.index("[train] epoch 2/2 | val accuracy") < stdout.index("<== train done")
    executed = json.loads((out / "notebooks" / "02_train.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    assert "epoch 1/2 | val accuracy" in text  # the executed notebook keeps the same lines
    assert list((out / "runs").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------- the project kernel


def write_kernelspec(folder, python):
    spec = folder / "kernels" / P.PROJECT_KERNEL
    spec.mkdir(parents=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "x", "language": "python"}))


def test_runner_uses_the_project_kernel_only_when_it_runs_this_python(tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    write_kernelspec(tmp_path / "mine", sys.executable)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "mine"))  # searched before the environment's own kernels
    assert P.kernel_name() == "har-vit"
    write_kernelspec(tmp_path / "other", "/elsewhere/venv/bin/python")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "other"))
    assert P.kernel_name() == "python3"

    def missing(self, name):
        raise NoSuchKernel(name)

    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", missing)  # a bare venv, no `make setup`
    assert P.kernel_name() == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_name_the_project_kernel(path):
    spec = json.loads(path.read_text())["metadata"]["kernelspec"]
    # language: where har-vit is not registered (a server without `make setup`), Voila picks a python kernel
    assert spec["name"] == P.PROJECT_KERNEL and spec["language"] == "python"


def make_dry_run(*targets):
    # --no-print-directory: under `make test` this is a sub-make, which would print "Entering directory" lines
    res = subprocess.run(
        ["make", "-n", "--no-print-directory", *targets], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_registers_the_kernel_and_serves_tensorboard_on_loopback(tmp_path):
    setup = make_dry_run(f"VENV={tmp_path / 'venv'}", "setup")
    assert '-m ipykernel install --sys-prefix --name har-vit --display-name "HAR-ViT (.venv)"' in setup
    board = make_dry_run("tensorboard").strip().splitlines()[-1]
    assert "--logdir outputs" in board and "--host 127.0.0.1" in board and "--bind_all" not in board


@pytest.mark.integration
def test_make_lab_opens_at_the_root_and_starts_kernels_in_notebooks():
    lab = make_dry_run("lab").strip().splitlines()[-1].split()
    assert lab[1:3] == ["lab", "--notebook-dir=."], lab
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    extra = ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}"]
    extra += [f"--IdentityProvider.token={token}", *(["--allow-root"] if os.geteuid() == 0 else [])]
    server = subprocess.Popen(lab + extra, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def api(method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    try:
        deadline = time.time() + 90
        while True:
            try:
                api("GET", "/api/status")
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "jupyter lab did not start"
                time.sleep(0.5)
        assert {"notebooks", "params", "outputs", "lib"} <= {c["name"] for c in api("GET", "/api/contents")["content"]}
        kernel = P.kernel_name()  # har-vit after `make setup`
        session = api(
            "POST",
            "/api/sessions",
            {"path": "notebooks/x.ipynb", "type": "notebook", "name": "x.ipynb", "kernel": {"name": kernel}},
        )
        assert session["kernel"]["name"] == kernel
        kernels = []
        while not kernels and time.time() < deadline:
            time.sleep(0.2)
            children = psutil.Process(server.pid).children(recursive=True)
            kernels = [k for k in children if "ipykernel" in str(k.cmdline())]
        assert kernels and kernels[0].cwd() == str(ROOT / "notebooks")
        api("DELETE", f"/api/sessions/{session['id']}")
    finally:
        server.terminate()
        server.wait(30)
