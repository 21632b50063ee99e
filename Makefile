# One entry point per task; `make setup` runs first when the venv is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PARAMS ?= params/demo.yaml
PROFILE ?= params/har_vit.yaml
TENSORBOARD_PORT ?= 6006

.PHONY: setup demo test test-fast lint format lab tensorboard dashboard bench check rehearsal results clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[research,dev]'  # the base install alone is the slim serving set
	$(PY) -m ipykernel install --sys-prefix --name har-vit --display-name "HAR-ViT (.venv)"
	if [ -d .git ]; then $(VENV)/bin/pre-commit install >/dev/null; fi  # strip notebook outputs, ruff, on commit
	touch $@

demo: setup  ## run the whole pipeline on the embedded dataset (CPU, offline)
	$(PY) -m lib.pipeline --params $(PARAMS)

test: setup  ## the whole test suite (unit and integration)
	$(PY) -m pytest -q

test-fast: setup  ## the unit tests only (no notebooks, subprocess pipelines, servers or browser)
	$(PY) -m pytest -q -m "not integration"

lint: setup  ## ruff: lint and format check of lib, tests, deploy and the notebooks
	$(VENV)/bin/ruff check lib tools tests deploy notebooks
	$(VENV)/bin/ruff format --check lib tools tests deploy notebooks

format: setup  ## ruff: fix what can be fixed, then format
	$(VENV)/bin/ruff check --fix lib tools tests deploy notebooks
	$(VENV)/bin/ruff format lib tools tests deploy notebooks

# Kernels start in their notebook's folder (Jupyter's default), so notebooks/ keeps its relative paths.
lab: setup  ## JupyterLab at the repository root (notebooks, params, outputs), on the project's kernel
	$(VENV)/bin/jupyter lab --notebook-dir=.

tensorboard: setup  ## TensorBoard on http://127.0.0.1:$(TENSORBOARD_PORT) over every run in outputs/
	$(VENV)/bin/tensorboard --logdir outputs --host 127.0.0.1 --port $(TENSORBOARD_PORT)

dashboard: setup  ## serve the Voila dashboard on 127.0.0.1 with the demo's published model
	$(VENV)/bin/voila notebooks/dashboard.ipynb --no-browser --Voila.ip=127.0.0.1 --port=8866

bench: setup  ## CPU serving and evaluation benchmark
	$(PY) -m tools.bench $(BENCH_ARGS)

# IMAGES: a folder or s3://bucket/prefix (default: the demo's generated images); BATCH_ARGS: --model, --shard i/N ...
IMAGES ?= outputs/_cache/embedded_n120_s0
BATCH_OUT ?= outputs/batch
.PHONY: classify
classify: setup  ## classify every image of IMAGES with the latest published model into BATCH_OUT (resumable)
	$(PY) -m lib.batch --images $(IMAGES) --out $(BATCH_OUT) $(BATCH_ARGS)

rehearsal: setup  ## the real profile, every stage, full-size ViT-B/16, offline (CPU, or the GPU when present)
	$(PY) -m tools.rehearsal --profile $(PROFILE) $(REHEARSAL_ARGS)

results: setup  ## collect new bench and rehearsal records into docs/measurements/ and regenerate docs/results.md
	$(PY) tools/results.py

check: setup  ## validate the params and print the stage plan
	$(PY) -m lib.pipeline --params $(PARAMS) --check

clean:  ## remove run outputs (keeps outputs/README.md)
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
