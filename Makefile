# One entry point per task; `make setup` runs first when the venv is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PARAMS ?= params/demo.yaml
PROFILE ?= params/har_vit.yaml

.PHONY: setup demo test lab dashboard bench check rehearsal clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup  ## run the whole pipeline on the embedded dataset (CPU, offline)
	$(PY) -m lib.pipeline --params $(PARAMS)

test: setup  ## the test suite
	$(PY) -m pytest -q

lab: setup  ## JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

dashboard: setup  ## serve the Voila dashboard on 127.0.0.1 with the demo's published model
	$(VENV)/bin/voila notebooks/dashboard.ipynb --no-browser --Voila.ip=127.0.0.1 --port=8866

bench: setup  ## CPU serving and evaluation benchmark
	$(PY) -m lib.bench $(BENCH_ARGS)

rehearsal: setup  ## the real profile, every stage, full-size ViT-B/16, offline (CPU, or the GPU when present)
	$(PY) -m lib.rehearsal --profile $(PROFILE) $(REHEARSAL_ARGS)

check: setup  ## validate the params and print the stage plan
	$(PY) -m lib.pipeline --params $(PARAMS) --check

clean:  ## remove run outputs (keeps outputs/README.md)
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
