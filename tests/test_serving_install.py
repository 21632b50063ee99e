"""The serving install: `pip install <repo>` with no extras (what deploy/bootstrap.sh puts on the EC2 host) holds
no torch and no training stack, and still serves: the dashboard and the Voila server's modules import, the registry
pulls, and a photo (JPEG and HEIC) is classified by the ONNX model exactly as the full install classifies it."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_dashboard import MODEL_NAME, photo, publish_run, shared_run
from test_uploads import heic

from lib.params import ROOT
from tools.rehearsal.runner import HAR_SAMPLE

pytestmark = pytest.mark.integration  # notebooks, subprocesses, servers or a browser

# Voila itself depends on nbformat, so the serving install has it although the research extra names it too.
SHARED_WITH_SERVING = {"nbformat"}
TOP_K = 5

# Run inside the serving venv, from a folder outside the checkout: `lib` must come from the installed package.
SERVING_SCRIPT = r"""
import json, sys
from pathlib import Path

import lib.dashboard.server  # the Voila server process's module
from lib.batch.classify import classify  # batch classification
from lib.dashboard.app import handle_image, load_bundle
from lib.params import DashboardParams
from lib.registry.pull import pull
from PIL import Image

registry, model_name, cache, photo, heic_file, top_k = sys.argv[1:7]
root = pull(registry, model_name, "latest", cache_dir=Path(cache))
p = DashboardParams(top_k=int(top_k))
bundle = load_bundle(p, {"HAR_MODEL_DIR": str(root), "HAR_THREADS": "1"})
cards = {
    name: handle_image(bundle, p, name, Path(path).read_bytes(), saliency=True)
    for name, path in (("photo.jpg", photo), ("IMG_0001.HEIC", heic_file))
}
probs = bundle.predictor.predict_proba([Image.open(photo).convert("RGB")])[0]
heavy = ("torch", "transformers", "datasets", "accelerate", "evaluate", "sklearn", "matplotlib", "onnx")
print(json.dumps({
    "lib": lib.__file__,
    "root": str(root),
    "backend": bundle.predictor.backend,
    "probs": [float(x) for x in probs],
    "cards": cards,
    "imported": sorted(m for m in heavy if m in sys.modules),
}))
"""


SERVING_APPS: dict[str, Path] = {}  # built once per test session (test_deploy's bootstrap test uses it too)


def serving_app(config: pytest.Config) -> Path:
    """A copy of the project (what `pip install <repo>` builds from, and what the bootstrap needs beside it) with a
    .venv holding the base install only; built on first use, removed when the test session ends.

    It lies outside pytest's own temporary folder, which only root may enter, and its Python is the system's when
    there is one: the bootstrap test's service user runs it. pip uses its cache and the configured index.
    """
    if "app" not in SERVING_APPS:
        app = Path(tempfile.mkdtemp(prefix="har-serving-"))
        config.add_cleanup(lambda: shutil.rmtree(app, ignore_errors=True))
        app.chmod(0o755)
        skip = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
        for name in ("pyproject.toml", "README.md", "voila.json"):
            shutil.copy2(ROOT / name, app)
        for name in ("lib", "notebooks", "params", "deploy"):
            shutil.copytree(ROOT / name, app / name, ignore=skip)
        system = Path("/usr/bin/python3")
        python = str(system) if system.exists() else sys._base_executable
        subprocess.run([python, "-m", "venv", str(app / ".venv")], check=True)
        done = subprocess.run(
            [str(app / ".venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", str(app)],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        SERVING_APPS["app"] = app
    return SERVING_APPS["app"]


def requirement_names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings, normalised as pip does."""
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group(0)).lower() for r in requirements}


@pytest.fixture
def serving_python(request: pytest.FixtureRequest) -> Path:
    """The serving venv's Python."""
    return serving_app(request.config) / ".venv" / "bin" / "python"


def test_serving_install_has_no_training_stack(serving_python: Path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    research = requirement_names(project["optional-dependencies"]["research"]) - SHARED_WITH_SERVING
    assert {"torch", "transformers"} <= research
    listed = subprocess.run(
        [str(serving_python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    ).stdout
    installed = requirement_names([d["name"] for d in json.loads(listed)])
    assert research.isdisjoint(installed), sorted(research & installed)
    assert requirement_names(project["dependencies"]) <= installed  # the serving set itself is there
    for tool in ("voila", "jupyter-kernel"):
        assert (serving_python.parent / tool).exists(), tool


def test_serving_install_pulls_and_classifies_without_torch(
    serving_python: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
):
    run_dir = shared_run(tmp_path_factory)  # trained and exported with the full install
    publish_run(run_dir, str(tmp_path / "registry"))
    real = sorted((HAR_SAMPLE / "running").glob("*.jpg"))
    data = real[0].read_bytes() if real else photo(11, (500, 375))
    (tmp_path / "photo.jpg").write_bytes(data)
    (tmp_path / "photo.heic").write_bytes(heic(Image.open(io.BytesIO(data)).convert("RGB"), quality=90))
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run(
        [str(serving_python), "-c", SERVING_SCRIPT, str(tmp_path / "registry"), MODEL_NAME, str(tmp_path / "cache")]
        + [str(tmp_path / "photo.jpg"), str(tmp_path / "photo.heic"), str(TOP_K)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        # A PYTHONPATH naming a checkout would put its lib/ before the installed package under test.
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["lib"].startswith(str(ROOT)), result["lib"]  # the installed package, not the checkout
    assert result["imported"] == [] and result["backend"] == "onnx"
    for name, card in result["cards"].items():
        assert card.startswith('<div class="har-result"') and card.count('class="har-pred"') == TOP_K, name
        assert 'class="har-saliency"' in card, name  # the occlusion map runs too
    # the same probabilities as the full install's predictor on the same photo
    from lib.predict import load_predictor

    image = Image.open(io.BytesIO(data)).convert("RGB")
    expected = load_predictor(Path(result["root"]), threads=1).predict_proba([image])[0]
    np.testing.assert_allclose(result["probs"], expected, atol=1e-5)
